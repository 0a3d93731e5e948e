//! Connection tracking: one flow is two entries in `CONNTRACK_V4`.
//!
//! The outbound entry is keyed by the tenant's original tuple in the zone of
//! the ingress port it arrived on, and holds the tenant and the translated
//! source. Sources never overlap between the tenants of one port, so the
//! zone and tuple name the tenant: an established flow is found without
//! classifying its packet, and tenants that share addresses behind
//! different next hops never share an entry. The reply entry is keyed by the tuple replies
//! arrive with (remote -> egress address:port, zone 0) and holds the tenant
//! host to translate back to. Either entry is enough to rebuild the other's
//! key, which is how the agent removes both halves together.
//!
//! ICMP echo uses the identifier as the port: it sits in `src_port` of an
//! outbound request key and in `dst_port` of a reply key.

use crate::shared_layout;

/// `FlowKeyV4::direction` of the entry keyed by the tenant's original tuple.
pub const DIR_OUTBOUND: u8 = 0;
/// `FlowKeyV4::direction` of the entry keyed by the reply tuple.
pub const DIR_REPLY: u8 = 1;

/// Zone of reply keys: egress address and port make them unique already.
pub const REPLY_ZONE: u16 = 0;

shared_layout! {
    /// Key of `CONNTRACK_V4`.
    pub struct FlowKeyV4 {
        /// Source address, network byte order.
        pub src: [u8; 4],
        /// Destination address, network byte order.
        pub dst: [u8; 4],
        /// Source port (ICMP echo request: identifier), network byte order.
        pub src_port: u16,
        /// Destination port (ICMP echo reply: identifier), network byte order.
        pub dst_port: u16,
        /// IP protocol number.
        pub proto: u8,
        /// `DIR_OUTBOUND` or `DIR_REPLY`.
        pub direction: u8,
        /// Outbound keys: the ingress port id the packet was classified
        /// under (`ANY_PORT` for tenants chosen by source alone). Reply keys:
        /// `REPLY_ZONE`.
        pub zone: u16,
    }
}

shared_layout! {
    /// Value of `CONNTRACK_V4`. Each entry counts its own direction only, so
    /// the hot path touches one entry per packet; the agent combines the two
    /// into the flow's state.
    ///
    /// Exactly 64 bytes: with the kernel's 48-byte element header and the
    /// 16-byte key, an element is two whole cache lines, which is what a
    /// packet of a flow costs when the table no longer fits in the caches.
    pub struct FlowEntryV4 {
        /// CLOCK_MONOTONIC_COARSE nanoseconds of the last packet in this direction.
        pub last_seen_ns: u64,
        /// Packets seen in this direction.
        pub packets: u64,
        /// Bytes of IP packets seen in this direction.
        pub bytes: u64,
        /// CLOCK_MONOTONIC_COARSE seconds when the flow was created.
        pub created_s: u32,
        /// Outbound entry: egress address. Reply entry: tenant host address.
        /// Network byte order.
        pub nat_addr: [u8; 4],
        /// Port (or ICMP id) belonging with `nat_addr`, network byte order.
        pub nat_port: u16,
        /// Tenant id.
        pub tenant: u16,
        /// The outbound key's zone, so a reply entry can name its peer.
        pub zone: u16,
        /// `TCP_*` flags seen in this direction, accumulated.
        pub tcp_flags: u8,
        /// `FLOW_F_*` bits (`inbound::FLOW_F_INBOUND`).
        pub flags: u8,
        /// When the route was looked up, in `ROUTE_TICK_SHIFT` ticks of
        /// CLOCK_MONOTONIC_COARSE (wrapping).
        pub route_checked: u32,
        /// Where this direction's packets leave: the FIB's answer for the
        /// translated packet, reused for `ROUTE_CACHE_TICKS` (a FIB lookup
        /// is the most expensive step of the hit path).
        pub route_ifindex: u32,
        /// MTU of the cached route; 0: no route cached.
        pub route_mtu: u16,
        pub route_smac: [u8; 6],
        pub route_dmac: [u8; 6],
        pub _pad: [u8; 2],
    }
}

/// `FlowEntryV4::route_checked` counts nanoseconds shifted right by this
/// (ticks of about 1.05 ms): a shift, not a division, on the hot path.
pub const ROUTE_TICK_SHIFT: u32 = 20;

/// How long a flow reuses its cached next hop before asking the FIB again,
/// about one second: route and neighbour changes reach established flows
/// within this time.
pub const ROUTE_CACHE_TICKS: u32 = 954;

/// TCP flag bits as in the header's flags byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Protocol numbers the dataplane translates.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// ICMP or ICMPv6: queries tracked by identifier, one timeout.
#[inline(always)]
#[must_use]
pub const fn is_icmp(proto: u8) -> bool {
    proto == PROTO_ICMP || proto == PROTO_ICMPV6
}

const _: () = assert!(core::mem::size_of::<FlowEntryV4>() == 64);

/// Nanoseconds of CLOCK_MONOTONIC_COARSE in whole seconds, as `created_s`.
#[inline(always)]
#[must_use]
pub const fn seconds_of(ns: u64) -> u32 {
    (ns / 1_000_000_000) as u32
}

impl FlowEntryV4 {
    /// When the flow was created, on the dataplane's clock, to the second.
    #[must_use]
    pub const fn created_ns(&self) -> u64 {
        self.created_s as u64 * 1_000_000_000
    }
}

impl FlowKeyV4 {
    /// The key of the other half of the flow whose half `self` is, given that
    /// half's entry.
    #[must_use]
    pub fn peer_key(&self, entry: &FlowEntryV4) -> Self {
        if self.direction == DIR_OUTBOUND {
            Self {
                src: self.dst,
                dst: entry.nat_addr,
                src_port: self.dst_port,
                dst_port: entry.nat_port,
                proto: self.proto,
                direction: DIR_REPLY,
                zone: REPLY_ZONE,
            }
        } else {
            Self {
                src: entry.nat_addr,
                dst: self.src,
                src_port: entry.nat_port,
                dst_port: self.src_port,
                proto: self.proto,
                direction: DIR_OUTBOUND,
                zone: entry.zone,
            }
        }
    }
}

shared_layout! {
    /// Key of `CONNTRACK_V6`: `FlowKeyV4` with IPv6 addresses (40 bytes,
    /// in its own table so IPv4's keys stay 16 bytes).
    pub struct FlowKeyV6 {
        /// Source address, network byte order.
        pub src: [u8; 16],
        /// Destination address, network byte order.
        pub dst: [u8; 16],
        /// Source port (ICMPv6 echo request: identifier), network byte order.
        pub src_port: u16,
        /// Destination port (ICMPv6 echo reply: identifier), network byte order.
        pub dst_port: u16,
        /// Next header of the transport (after any extension headers).
        pub proto: u8,
        /// `DIR_OUTBOUND` or `DIR_REPLY`.
        pub direction: u8,
        /// As `FlowKeyV4::zone`.
        pub zone: u16,
    }
}

shared_layout! {
    /// Value of `CONNTRACK_V6`: the fields of `FlowEntryV4`, with the
    /// address widened and the order changed so nothing needs padding
    /// (80 bytes).
    pub struct FlowEntryV6 {
        /// CLOCK_MONOTONIC_COARSE nanoseconds of the last packet in this direction.
        pub last_seen_ns: u64,
        /// Packets seen in this direction.
        pub packets: u64,
        /// Bytes of IP packets (header included) seen in this direction.
        pub bytes: u64,
        /// CLOCK_MONOTONIC_COARSE seconds when the flow was created.
        pub created_s: u32,
        /// As `FlowEntryV4::route_checked`.
        pub route_checked: u32,
        /// Outbound entry: egress address. Reply entry: tenant host address.
        pub nat_addr: [u8; 16],
        /// Port (or ICMPv6 id) belonging with `nat_addr`, network byte order.
        pub nat_port: u16,
        /// Tenant id.
        pub tenant: u16,
        /// The outbound key's zone, so a reply entry can name its peer.
        pub zone: u16,
        /// `TCP_*` flags seen in this direction, accumulated.
        pub tcp_flags: u8,
        /// `FLOW_F_*` bits.
        pub flags: u8,
        /// The cached next hop, as in `FlowEntryV4`.
        pub route_ifindex: u32,
        /// MTU of the cached route; 0: no route cached.
        pub route_mtu: u16,
        pub route_smac: [u8; 6],
        pub route_dmac: [u8; 6],
        pub _pad: [u8; 6],
    }
}

const _: () = assert!(core::mem::size_of::<FlowKeyV6>() == 40);
const _: () = assert!(core::mem::size_of::<FlowEntryV6>() == 80);

impl FlowEntryV6 {
    /// When the flow was created, on the dataplane's clock, to the second.
    #[must_use]
    pub const fn created_ns(&self) -> u64 {
        self.created_s as u64 * 1_000_000_000
    }
}

impl FlowKeyV6 {
    /// The key of the other half of the flow whose half `self` is, given that
    /// half's entry (as `FlowKeyV4::peer_key`).
    #[must_use]
    pub fn peer_key(&self, entry: &FlowEntryV6) -> Self {
        if self.direction == DIR_OUTBOUND {
            Self {
                src: self.dst,
                dst: entry.nat_addr,
                src_port: self.dst_port,
                dst_port: entry.nat_port,
                proto: self.proto,
                direction: DIR_REPLY,
                zone: REPLY_ZONE,
            }
        } else {
            Self {
                src: entry.nat_addr,
                dst: self.src,
                src_port: entry.nat_port,
                dst_port: self.src_port,
                proto: self.proto,
                direction: DIR_OUTBOUND,
                zone: entry.zone,
            }
        }
    }
}

shared_layout! {
    /// Key of `FRAGS_V4`: one IPv4 datagram in fragments, as it arrived
    /// (before translation). RFC 791 makes (src, dst, id, proto) unique for
    /// the datagram's lifetime; the zone keeps tenants apart.
    pub struct FragKeyV4 {
        /// Source address, network byte order.
        pub src: [u8; 4],
        /// Destination address, network byte order.
        pub dst: [u8; 4],
        /// IP identification, network byte order.
        pub id: u16,
        /// IP protocol number.
        pub proto: u8,
        /// `DIR_OUTBOUND` or `DIR_REPLY`.
        pub direction: u8,
        /// Tenant id for outbound datagrams, `REPLY_ZONE` for replies.
        pub zone: u16,
        pub _pad: [u8; 2],
    }
}

shared_layout! {
    /// Value of `FRAGS_V4`: what the first fragment was translated to, so
    /// the rest (which carry no ports) follow it.
    pub struct FragEntryV4 {
        /// Outbound: egress address. Reply: tenant host address.
        pub nat_addr: [u8; 4],
        /// Tenant id.
        pub tenant: u16,
        pub _pad: [u8; 2],
        /// CLOCK_MONOTONIC_COARSE nanoseconds of the first fragment.
        pub created_ns: u64,
    }
}

shared_layout! {
    /// Key of `FRAGS_V6`: one IPv6 datagram in fragments, as it arrived.
    /// RFC 8200 4.5 makes (source, destination, identification) unique
    /// for the datagram's lifetime; the zone keeps tenants apart.
    pub struct FragKeyV6 {
        /// Source address, network byte order.
        pub src: [u8; 16],
        /// Destination address, network byte order.
        pub dst: [u8; 16],
        /// The fragment header's identification, as on the wire.
        pub id: [u8; 4],
        /// `DIR_OUTBOUND` or `DIR_REPLY`.
        pub direction: u8,
        pub _pad: u8,
        /// Tenant id for outbound datagrams, `REPLY_ZONE` for replies.
        pub zone: u16,
    }
}

shared_layout! {
    /// Value of `FRAGS_V6`: what the first fragment was translated to.
    pub struct FragEntryV6 {
        /// Outbound: egress address. Reply: tenant host address.
        pub nat_addr: [u8; 16],
        /// Tenant id.
        pub tenant: u16,
        pub _pad: [u8; 6],
        /// CLOCK_MONOTONIC_COARSE nanoseconds of the first fragment.
        pub created_ns: u64,
    }
}

/// TCP: SYN sent, nothing back yet.
pub const STATE_SYN_SENT: usize = 0;
/// TCP: the peer answered the handshake.
pub const STATE_ESTABLISHED: usize = 1;
/// TCP: one side sent FIN.
pub const STATE_FIN_WAIT: usize = 2;
/// TCP: both sides sent FIN.
pub const STATE_TIME_WAIT: usize = 3;
/// TCP: either side sent RST.
pub const STATE_CLOSE: usize = 4;
/// UDP (and other datagrams): packets out, none back yet.
pub const STATE_UNREPLIED: usize = 5;
/// UDP: replies seen.
pub const STATE_REPLIED: usize = 6;
/// ICMP queries, whatever was seen: one timeout.
pub const STATE_ICMP: usize = 7;
/// Number of `STATE_*` values: the length of a timeout table.
pub const STATE_COUNT: usize = 8;

/// The protocol state of a flow (`STATE_*`, close to Linux conntrack's),
/// from the TCP flags each direction accumulated and whether anything came
/// back. One function for the agent's sweeper and the dataplane's own
/// (`sweep`), so both expire a flow at the same moment.
#[inline(always)]
#[must_use]
pub const fn flow_state(proto: u8, out_flags: u8, back_flags: u8, replied: bool) -> usize {
    if is_icmp(proto) {
        return STATE_ICMP;
    }
    if proto != PROTO_TCP {
        return if replied {
            STATE_REPLIED
        } else {
            STATE_UNREPLIED
        };
    }
    if (out_flags | back_flags) & TCP_RST != 0 {
        STATE_CLOSE
    } else if out_flags & TCP_FIN != 0 && back_flags & TCP_FIN != 0 {
        STATE_TIME_WAIT
    } else if (out_flags | back_flags) & TCP_FIN != 0 {
        STATE_FIN_WAIT
    } else if back_flags & (TCP_SYN | TCP_ACK) != 0 {
        STATE_ESTABLISHED
    } else {
        STATE_SYN_SENT
    }
}
