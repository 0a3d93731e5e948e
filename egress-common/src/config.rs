//! Dataplane-wide settings and the roles of interfaces.

use crate::shared_layout;

shared_layout! {
    /// The single value of `DP_CONFIG`.
    pub struct DataplaneConfig {
        /// `CONFIG_F_*` bits.
        pub flags: u32,
        /// Future use.
        pub _reserved: [u32; 7],
    }
}

/// Some tenant is chosen by ingress port: look frames up in `INGRESS_PORTS`.
pub const CONFIG_F_INGRESS_PORTS: u32 = 1;
/// Report each new flow to the agent through `FLOW_EVENTS` (set while a
/// translation log is configured or someone follows the flows live).
pub const CONFIG_F_FLOW_EVENTS: u32 = 2;

shared_layout! {
    /// Value of `INTERFACES`, keyed by ifindex.
    pub struct InterfaceInfo {
        /// `ROLE_*`.
        pub role: u32,
        /// Future use.
        pub _reserved: u32,
    }
}

/// Tenant traffic arrives here; replies leave here.
pub const ROLE_INTERNAL: u32 = 1;
/// Translated traffic leaves here; replies arrive here.
pub const ROLE_EXTERNAL: u32 = 2;

/// Slots of `V6_PROGRAMS_XDP` and `V6_PROGRAMS_TC` (one array per program
/// type: the kernel lets only programs of the array's first user's type
/// tail-call through it): the IPv6 program each IPv4 program tail-calls,
/// the IPv6 outbound program's own for new flows, and the one both IPv6
/// programs call for ICMPv6 errors about packets of flows.
pub const V6_SLOT_OUTBOUND: u32 = 0;
pub const V6_SLOT_REPLY: u32 = 1;
pub const V6_SLOT_NEW_FLOW: u32 = 2;
pub const V6_SLOT_ICMP_ERR: u32 = 3;
/// Slots in each array.
pub const V6_SLOTS: u32 = 4;
