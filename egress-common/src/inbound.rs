//! Inbound NAT: port forwards and floating IPs, the rules a NAT gateway's
//! users set on their egress addresses (Kube-OVN's `dnat-add` and
//! `floating-ip-add`).
//!
//! A port forward maps (egress address, protocol, port) to an internal
//! host and port; a floating IP maps a whole address to one internal host,
//! every port, both ways. Both live in `PORT_FORWARDS_V4`, a floating IP
//! under port 0 and protocol 0. The first packet from outside that matches
//! creates an ordinary flow (both halves, the same states, timeouts and
//! sweeper as any other), marked `FLOW_F_INBOUND`; from then on its packets
//! are translated like every flow's. A floating IP's host also leaves from
//! it: `FLOATING_V4` names the address its new outbound flows take.
//!
//! IPv6 has the same rules in maps of its own (`PORT_FORWARDS_V6`,
//! `FLOATING_V6`), keyed and valued with IPv6 addresses.

use crate::shared_layout;

shared_layout! {
    /// Key of `PORT_FORWARDS_V4`.
    pub struct ForwardKeyV4 {
        /// Egress (or floating) address, network byte order.
        pub addr: [u8; 4],
        /// External port, network byte order; 0 for a floating IP.
        pub port: u16,
        /// IP protocol; 0 for a floating IP.
        pub proto: u8,
        pub _pad: u8,
    }
}

shared_layout! {
    /// Value of `PORT_FORWARDS_V4`: where the traffic goes.
    pub struct ForwardV4 {
        /// Internal host, network byte order.
        pub host: [u8; 4],
        /// Internal port, network byte order; 0 keeps the external port
        /// (a floating IP).
        pub host_port: u16,
        /// Tenant the host's flows are counted under.
        pub tenant: u16,
        /// Conntrack zone of the host's own packets (the ingress port id
        /// they arrive with, `ANY_PORT` for tenants chosen by source).
        pub zone: u16,
        pub _pad: u16,
    }
}

shared_layout! {
    /// Key of `FLOATING_V4`: a host with a floating IP, in its zone.
    pub struct FloatingKeyV4 {
        /// Internal host, network byte order.
        pub host: [u8; 4],
        /// Conntrack zone of the host's packets.
        pub zone: u16,
        pub _pad: u16,
    }
}

shared_layout! {
    /// Key of `PORT_FORWARDS_V6`.
    pub struct ForwardKeyV6 {
        /// Egress (or floating) address.
        pub addr: [u8; 16],
        /// External port, network byte order; 0 for a floating IP.
        pub port: u16,
        /// IP protocol; 0 for a floating IP.
        pub proto: u8,
        pub _pad: u8,
    }
}

shared_layout! {
    /// Value of `PORT_FORWARDS_V6`: where the traffic goes.
    pub struct ForwardV6 {
        /// Internal host.
        pub host: [u8; 16],
        /// Internal port, network byte order; 0 keeps the external port
        /// (a floating IP).
        pub host_port: u16,
        /// Tenant the host's flows are counted under.
        pub tenant: u16,
        /// Conntrack zone of the host's own packets.
        pub zone: u16,
        pub _pad: u16,
    }
}

shared_layout! {
    /// Key of `FLOATING_V6`: a host with a floating IP, in its zone.
    pub struct FloatingKeyV6 {
        /// Internal host.
        pub host: [u8; 16],
        /// Conntrack zone of the host's packets.
        pub zone: u16,
        pub _pad: u16,
    }
}

/// `FlowEntryV4::flags`: the flow was opened from outside, by a port
/// forward or a floating IP.
pub const FLOW_F_INBOUND: u8 = 1;
