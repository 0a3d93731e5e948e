//! Tenants: how a packet is matched to one, and what a tenant translates to.
//!
//! A tenant is chosen either by source prefix alone, or by the ingress port a
//! frame arrived on (an interface, or the per-tenant next-hop MAC a router
//! sent it to) together with a source prefix. Both live in one LPM trie whose
//! key starts with the port id, so one lookup answers either question.

use crate::shared_layout;

/// Tenant ids index `TENANTS`; 0 means "no tenant".
pub const MAX_TENANTS: u32 = 16_384;
/// The largest tenant id that can be used in conntrack zones.
pub const MAX_TENANT_ID: u32 = MAX_TENANTS - 1;
/// Egress addresses one tenant can spread its flows over.
pub const MAX_EGRESS_ADDRS: usize = 8;
/// Ingress port id of tenants that are chosen by their source alone.
pub const ANY_PORT: u32 = 0;
/// Bits of `SourceKeyV4` the trie always matches before the source prefix.
pub const PORT_PREFIX_BITS: u32 = 32;

shared_layout! {
    /// Data part of a `TENANT_SRC_V6` trie key: as `SourceKeyV4`, matching
    /// `PORT_PREFIX_BITS + source prefix length` bits.
    pub struct SourceKeyV6 {
        /// Ingress port id, big-endian.
        pub port_be: u32,
        /// IPv6 source address, network byte order.
        pub addr: [u8; 16],
    }
}

shared_layout! {
    /// Value of `TENANT_ADDR_V6`: a tenant's IPv6 egress addresses, beside
    /// `TenantInfo` (which keeps their count) so IPv4's hot path reads no
    /// wider a value than before.
    pub struct TenantEgressV6 {
        /// Network byte order; a flow picks one by hashing its source and
        /// destination, as for IPv4.
        pub addrs: [[u8; 16]; MAX_EGRESS_ADDRS],
    }
}

shared_layout! {
    /// Data part of a `TENANT_SRC_V4` trie key. The trie matches
    /// `PORT_PREFIX_BITS + source prefix length` bits.
    pub struct SourceKeyV4 {
        /// Ingress port id from `INGRESS_PORTS`, or `ANY_PORT`; big-endian so
        /// the trie's bit order is the number's.
        pub port_be: u32,
        /// IPv4 source address, network byte order.
        pub addr: [u8; 4],
    }
}

shared_layout! {
    /// Key of `INGRESS_PORTS`: the interface a frame arrived on and the
    /// destination MAC it was sent to (all zero: any MAC on that interface).
    pub struct IngressPortKey {
        /// Interface index, host byte order.
        pub ifindex: u32,
        /// Destination MAC of the frame, as on the wire.
        pub mac: [u8; 6],
        pub _pad: [u8; 2],
    }
}

shared_layout! {
    /// Value of `TENANTS`: what a tenant's flows are translated to.
    pub struct TenantInfo {
        /// Valid entries in `egress_v4`; 0 drops the tenant's new flows.
        pub egress_v4_count: u32,
        /// First source port (or ICMP id) handed out, host byte order.
        pub port_min: u16,
        /// Last source port (or ICMP id) handed out, inclusive, host byte order.
        pub port_max: u16,
        /// `TENANT_F_*` bits.
        pub flags: u32,
        /// Valid entries of the tenant's `TENANT_ADDR_V6` value; 0 drops
        /// the tenant's new IPv6 flows.
        pub egress_v6_count: u32,
        /// Egress IPv4 addresses, network byte order. A flow picks one by
        /// hashing its source and destination, so a host keeps one address
        /// towards one server.
        pub egress_v4: [[u8; 4]; MAX_EGRESS_ADDRS],
        /// Flows the tenant may hold at once (its share of the table);
        /// 0 refuses every new flow.
        pub max_flows: u32,
        /// New flows per second the tenant may open; 0: no limit.
        pub new_flow_rate: u32,
        /// New flows the tenant may open at once above its rate.
        pub new_flow_burst: u32,
        pub _pad: u32,
    }
}

shared_layout! {
    /// Value of `TENANT_USAGE`: what the dataplane counted for a tenant.
    /// Written only by the programs (the agent's side is `TENANT_ENDED`, so
    /// neither ever overwrites the other's counts).
    pub struct TenantUsage {
        /// Flows created since the tenant id was first used (atomic adds).
        pub created: u64,
        /// New flows refused by the quota.
        pub quota_drops: u64,
        /// New flows refused by the rate limit.
        pub rate_drops: u64,
        /// New flows refused because every port of the chosen egress
        /// address was taken towards that destination.
        pub ports_exhausted_drops: u64,
        /// New flows refused because the conntrack table was full.
        pub table_full_drops: u64,
        /// Rate limiter: tokens left, in thousandths of a flow.
        pub tokens_milli: u64,
        /// Rate limiter: CLOCK_MONOTONIC_COARSE ns of the last refill.
        pub refilled_ns: u64,
    }
}

impl TenantUsage {
    /// Flows the tenant holds, given how many of its flows the agent has
    /// ended (`TENANT_ENDED`).
    #[must_use]
    pub const fn live(&self, ended: u64) -> u64 {
        self.created.saturating_sub(ended)
    }
}

/// `TenantInfo::flags`: the tenant is configured and may create flows.
pub const TENANT_F_ACTIVE: u32 = 1;
/// `TenantInfo::flags`: some of its egress addresses have port forwards,
/// which new outbound flows must not take as their port.
pub const TENANT_F_FORWARDS: u32 = 2;
/// `TenantInfo::flags`: some of its hosts have a floating IP, which their
/// new outbound flows leave from.
pub const TENANT_F_FLOATING: u32 = 4;

/// Bytes of a tenant name kept in `TENANT_NAMES` (UTF-8, zero-padded).
pub const TENANT_NAME_LEN: usize = 128;

/// Value of `TENANT_NAMES`: the tenant's name, so pinned maps describe
/// themselves to `egress-agent status` even when no agent runs. The programs
/// never read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TenantName {
    pub bytes: [u8; TENANT_NAME_LEN],
}

// SAFETY: bytemuck::Pod (derived above) already proved the type is plain old data.
#[cfg(feature = "user")]
unsafe impl aya::Pod for TenantName {}
