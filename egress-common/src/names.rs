//! Names of the maps and programs in the BPF object.
//!
//! The BPF side names each map by its `static`'s identifier; these constants
//! are the same strings for the agent, and a test checks that every one of
//! them exists in the built object. The kernel keeps 15 characters of a name.

/// LPM trie `Key<SourceKeyV4>` -> tenant id (`u32`): which tenant a source belongs to.
pub const TENANT_SOURCES_V4: &str = "TENANT_SRC_V4";
/// Hash `IngressPortKey` -> port id (`u32`): frames that select a tenant by where they came in.
pub const INGRESS_PORTS: &str = "INGRESS_PORTS";
/// Array tenant id -> `TenantInfo`.
pub const TENANTS: &str = "TENANTS";
/// Array tenant id -> `TenantName`; for humans, the programs never read it.
pub const TENANT_NAMES: &str = "TENANT_NAMES";
/// Hash egress IPv4 address (`[u8; 4]`) -> tenant id (`u32`).
pub const EGRESS_ADDRS_V4: &str = "EGRESS_ADDR_V4";
/// Hash `FlowKeyV4` -> `FlowEntryV4`: both directions of every translated
/// flow. Not an LRU: nothing evicts a flow but the agent, both halves together.
pub const CONNTRACK_V4: &str = "CONNTRACK_V4";
/// LRU hash `FragKeyV4` -> `FragEntryV4`: datagrams whose first fragment
/// was translated, for the fragments that follow.
pub const FRAGS_V4: &str = "FRAGS_V4";
/// Array tenant id -> `TenantUsage`: flows created and new flows refused,
/// written by the programs.
pub const TENANT_USAGE: &str = "TENANT_USAGE";
/// Array tenant id -> flows the agent ended (`u64`), written by the agent.
pub const TENANT_ENDED: &str = "TENANT_ENDED";
/// Hash ifindex (`u32`) -> `InterfaceInfo`: the role of each interface the agent manages.
pub const INTERFACES: &str = "INTERFACES";
/// Array of one `DataplaneConfig`.
pub const CONFIG: &str = "DP_CONFIG";
/// Per-CPU array `Counter` index -> packets (`u64`).
pub const COUNTERS: &str = "COUNTERS";
/// Per-CPU hash `RedirectPair` -> `RedirectDrops`: XDP redirects the kernel
/// dropped after the programs returned, by (from, to) interface.
pub const REDIRECT_DROPS: &str = "REDIRECT_DROPS";

/// Ring buffer of `FlowEventV4`: flows the programs created, for the
/// translation log.
pub const FLOW_EVENTS: &str = "FLOW_EVENTS";

/// Hash `ForwardKeyV4` -> `ForwardV4`: port forwards and floating IPs.
pub const PORT_FORWARDS_V4: &str = "PORT_FWD_V4";
/// Hash `FloatingKeyV4` -> floating address (`[u8; 4]`): the address a
/// host with a floating IP leaves from.
pub const FLOATING_V4: &str = "FLOATING_V4";

/// Array of one `SelfSweep`: flow expiry by the programs, where no agent
/// process stays (a Kube-OVN egress gateway pod).
pub const SELF_SWEEP: &str = "SELF_SWEEP";
/// LPM trie `Key<[u8; 4]>` -> `u32` (unused): sources routed out of the
/// external interface untranslated (Kube-OVN's `snat: false` policies).
pub const ROUTED_SOURCES_V4: &str = "ROUTED_SRC_V4";
/// LPM trie `Key<[u8; 16]>` -> `u32` (unused): the same for IPv6.
pub const ROUTED_SOURCES_V6: &str = "ROUTED_SRC_V6";

/// LPM trie `Key<SourceKeyV6>` -> tenant id (`u32`): which tenant an IPv6 source belongs to.
pub const TENANT_SOURCES_V6: &str = "TENANT_SRC_V6";
/// Array tenant id -> `TenantEgressV6`: each tenant's IPv6 egress addresses.
pub const TENANT_ADDRS_V6: &str = "TENANT_ADDR_V6";
/// Hash egress IPv6 address (`[u8; 16]`) -> tenant id (`u32`).
pub const EGRESS_ADDRS_V6: &str = "EGRESS_ADDR_V6";
/// Hash `FlowKeyV6` -> `FlowEntryV6`: both directions of every IPv6 flow.
pub const CONNTRACK_V6: &str = "CONNTRACK_V6";

/// Hash `ForwardKeyV6` -> `ForwardV6`: IPv6 port forwards and floating IPs.
pub const PORT_FORWARDS_V6: &str = "PORT_FWD_V6";
/// Hash `FloatingKeyV6` -> floating address (`[u8; 16]`).
pub const FLOATING_V6: &str = "FLOATING_V6";

/// LRU hash `FragKeyV6` -> `FragEntryV6`: IPv6 datagrams whose first
/// fragment was translated, for the fragments that follow.
pub const FRAGS_V6: &str = "FRAGS_V6";

/// Program arrays: the IPv6 XDP (TC) programs the IPv4 ones tail-call, at
/// `config::V6_SLOT_*`. Pinned, so a dataplane left running without its
/// agent keeps serving IPv6 (a program array empties when nothing holds it).
pub const V6_PROGRAMS_XDP: &str = "V6_PROGRAMS_XDP";
pub const V6_PROGRAMS_TC: &str = "V6_PROGRAMS_TC";

/// Every map, in the order the agent pins them.
pub const ALL_MAPS: [&str; 28] = [
    TENANT_SOURCES_V4,
    INGRESS_PORTS,
    TENANTS,
    TENANT_NAMES,
    EGRESS_ADDRS_V4,
    CONNTRACK_V4,
    FRAGS_V4,
    TENANT_USAGE,
    TENANT_ENDED,
    INTERFACES,
    CONFIG,
    COUNTERS,
    REDIRECT_DROPS,
    FLOW_EVENTS,
    PORT_FORWARDS_V4,
    FLOATING_V4,
    SELF_SWEEP,
    ROUTED_SOURCES_V4,
    TENANT_SOURCES_V6,
    TENANT_ADDRS_V6,
    EGRESS_ADDRS_V6,
    CONNTRACK_V6,
    FRAGS_V6,
    PORT_FORWARDS_V6,
    FLOATING_V6,
    ROUTED_SOURCES_V6,
    V6_PROGRAMS_XDP,
    V6_PROGRAMS_TC,
];

/// XDP on internal interfaces: classify, track, translate, forward outbound traffic.
pub const PROG_SNAT_OUTBOUND: &str = "snat_outbound";
/// XDP on the external interface: translate replies back to tenant hosts.
pub const PROG_SNAT_REPLY: &str = "snat_reply";
/// TC ingress on internal interfaces where XDP is not safe: `snat_outbound`'s
/// packet path, compiled for TC.
pub const PROG_TC_OUTBOUND: &str = "tc_outbound";
/// TC ingress on the external interface where XDP is not safe: `snat_reply`'s
/// packet path, compiled for TC.
pub const PROG_TC_REPLY: &str = "tc_reply";
/// TC ingress on internal interfaces running XDP: sends translated packets whose neighbour
/// XDP could not resolve through the kernel's neighbour machinery.
pub const PROG_NEIGH_FALLBACK: &str = "neigh_fallback";
/// IPv6's part of `snat_outbound`, tail-called for IPv6 frames.
pub const PROG_SNAT_OUTBOUND6: &str = "snat_outbound6";
/// IPv6's part of `snat_reply`.
pub const PROG_SNAT_REPLY6: &str = "snat_reply6";
/// IPv6's part of `tc_outbound`.
pub const PROG_TC_OUTBOUND6: &str = "tc_outbound6";
/// IPv6's part of `tc_reply`.
pub const PROG_TC_REPLY6: &str = "tc_reply6";
/// A tenant's new IPv6 flow, tail-called from `snat_outbound6`.
pub const PROG_SNAT_NEW_FLOW6: &str = "snat_new_flow6";
/// A tenant's new IPv6 flow, tail-called from `tc_outbound6`.
pub const PROG_TC_NEW_FLOW6: &str = "tc_new_flow6";
/// An ICMPv6 error about a packet of a flow, either way, tail-called from
/// `snat_outbound6` and `snat_reply6`.
pub const PROG_SNAT_ICMP6_ERR: &str = "snat_icmp6_err";
/// The same, tail-called from `tc_outbound6` and `tc_reply6`.
pub const PROG_TC_ICMP6_ERR: &str = "tc_icmp6_err";

/// TC egress on the external interface: drops forwarded packets whose source is
/// not an egress address, whatever path they took through the kernel.
pub const PROG_LEAK_GUARD: &str = "leak_guard";
/// TC ingress on internal interfaces, before the outbound program, where no
/// agent process stays: expires idle flows (see `sweep`).
pub const PROG_CONNTRACK_SWEEP: &str = "conntrack_sweep";
/// Tracepoint `xdp:xdp_devmap_xmit`: counts frames a redirect target refused.
pub const PROG_REDIRECT_XMIT: &str = "redirect_xmit";
/// Tracepoint `xdp:xdp_redirect_err`: counts redirects refused before queueing.
pub const PROG_REDIRECT_ERR: &str = "redirect_err";
