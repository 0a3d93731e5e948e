//! Every map of the dataplane. Layouts come from egress-common; the sizes
//! here are defaults the agent overrides at load time from its config.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    macros::btf_map,
};
use egress_common::{
    config::{DataplaneConfig, InterfaceInfo},
    counters::COUNTER_COUNT,
    events::{DEFAULT_EVENT_RING_BYTES, FlowEventV4},
    flow::{
        FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6, FragEntryV4, FragEntryV6, FragKeyV4,
        FragKeyV6,
    },
    inbound::{FloatingKeyV4, FloatingKeyV6, ForwardKeyV4, ForwardKeyV6, ForwardV4, ForwardV6},
    sweep::SelfSweep,
    tenant::{
        IngressPortKey, MAX_TENANTS, SourceKeyV4, SourceKeyV6, TenantEgressV6, TenantInfo,
        TenantName, TenantUsage,
    },
};

/// Source prefix (behind an ingress port id) -> tenant id.
#[btf_map]
pub static TENANT_SRC_V4: LpmTrie<SourceKeyV4, u32, 65_536> = LpmTrie::new();

/// (ifindex, destination MAC) -> ingress port id.
#[btf_map]
pub static INGRESS_PORTS: HashMap<IngressPortKey, u32, 4_096> = HashMap::new();

/// Tenant id -> what its flows translate to.
#[btf_map]
pub static TENANTS: Array<TenantInfo, { MAX_TENANTS as usize }> = Array::new();

/// Tenant id -> name. Only the agent and the CLI read it.
#[btf_map]
pub static TENANT_NAMES: Array<TenantName, { MAX_TENANTS as usize }> = Array::new();

/// Egress address -> tenant id; what the external side answers for.
#[btf_map]
pub static EGRESS_ADDR_V4: HashMap<[u8; 4], u32, 65_536> = HashMap::new();

/// Both halves of every flow. Not an LRU: an LRU evicts the halves of a
/// flow independently and whichever tenant's flows are coldest, so one
/// tenant's flood would break others' connections. Nothing is evicted here;
/// the agent's sweeper removes expired flows, both halves together, and
/// per-tenant quotas (`limits`) keep any tenant from filling the table.
#[btf_map]
pub static CONNTRACK_V4: HashMap<FlowKeyV4, FlowEntryV4, 524_288> = HashMap::new();

/// Tenant id -> flows created and new flows refused; programs write it.
#[btf_map]
pub static TENANT_USAGE: Array<TenantUsage, { MAX_TENANTS as usize }> = Array::new();

/// Tenant id -> flows the agent ended; only the agent writes it.
#[btf_map]
pub static TENANT_ENDED: Array<u64, { MAX_TENANTS as usize }> = Array::new();

/// First fragments' translations, for the fragments that follow.
#[btf_map]
pub static FRAGS_V4: LruHashMap<FragKeyV4, FragEntryV4, 8_192> = LruHashMap::new();

/// ifindex -> role of the interface.
#[btf_map]
pub static INTERFACES: HashMap<u32, InterfaceInfo, 256> = HashMap::new();

/// Dataplane-wide settings, one entry.
#[btf_map]
pub static DP_CONFIG: Array<DataplaneConfig, 1> = Array::new();

/// Packets per verdict reason, per CPU.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// XDP redirects the kernel dropped after the programs returned, per CPU,
/// by (from, to) interface; filled by `redirect_errors`.
#[btf_map]
pub static REDIRECT_DROPS: aya_ebpf::btf_maps::PerCpuHashMap<
    egress_common::redirect::RedirectPair,
    egress_common::redirect::RedirectDrops,
    { egress_common::redirect::REDIRECT_PAIRS as usize },
> = aya_ebpf::btf_maps::PerCpuHashMap::new();

/// Flows created, for the agent's translation log; sized by the agent
/// (`audit.eventRingSize`).
#[btf_map]
pub static FLOW_EVENTS: RingBuf<FlowEventV4, { DEFAULT_EVENT_RING_BYTES as usize }> =
    RingBuf::new();

/// Port forwards and floating IPs (port 0, protocol 0): where traffic from
/// outside to an egress address may open a flow.
#[btf_map]
pub static PORT_FWD_V4: HashMap<ForwardKeyV4, ForwardV4, 65_536> = HashMap::new();

/// Hosts with a floating IP -> the address their new flows leave from.
#[btf_map]
pub static FLOATING_V4: HashMap<FloatingKeyV4, [u8; 4], 16_384> = HashMap::new();

/// `PORT_FWD_V4` and `FLOATING_V4` for IPv6.
#[btf_map]
pub static PORT_FWD_V6: HashMap<ForwardKeyV6, ForwardV6, 65_536> = HashMap::new();

#[btf_map]
pub static FLOATING_V6: HashMap<FloatingKeyV6, [u8; 16], 16_384> = HashMap::new();

/// Flow expiry by the programs themselves (`sweep`); idle unless the agent
/// set an interval because no agent process will stay.
#[btf_map]
pub static SELF_SWEEP: Array<SelfSweep, 1> = Array::new();

/// Sources the external interface lets out untranslated (Kube-OVN's
/// `snat: false` policies): the leak guard passes them. Values unused.
#[btf_map]
pub static ROUTED_SRC_V4: LpmTrie<[u8; 4], u32, 4_096> = LpmTrie::new();

/// The same for IPv6 sources.
#[btf_map]
pub static ROUTED_SRC_V6: LpmTrie<[u8; 16], u32, 4_096> = LpmTrie::new();

/// IPv6 source prefix (behind an ingress port id) -> tenant id.
#[btf_map]
pub static TENANT_SRC_V6: LpmTrie<SourceKeyV6, u32, 65_536> = LpmTrie::new();

/// Tenant id -> its IPv6 egress addresses (their count is in `TENANTS`).
#[btf_map]
pub static TENANT_ADDR_V6: Array<TenantEgressV6, { MAX_TENANTS as usize }> = Array::new();

/// IPv6 egress address -> tenant id.
#[btf_map]
pub static EGRESS_ADDR_V6: HashMap<[u8; 16], u32, 65_536> = HashMap::new();

/// Both halves of every IPv6 flow, kept as `CONNTRACK_V4` is. Sized by
/// the agent like the IPv4 table.
#[btf_map]
pub static CONNTRACK_V6: HashMap<FlowKeyV6, FlowEntryV6, 131_072> = HashMap::new();

/// The IPv6 XDP programs the IPv4 ones tail-call for IPv6 frames, at
/// `egress_common::config::V6_SLOT_*`; filled by the agent at load.
#[btf_map]
pub static V6_PROGRAMS_XDP: ProgramArray<{ egress_common::config::V6_SLOTS as usize }> =
    ProgramArray::new();

/// The same for the TC programs.
#[btf_map]
pub static V6_PROGRAMS_TC: ProgramArray<{ egress_common::config::V6_SLOTS as usize }> =
    ProgramArray::new();

/// Scratch space for IPv6 FIB queries, one per CPU (see `forward::route_v6`).
#[btf_map]
pub static FIB_QUERY_V6: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup, 1> = PerCpuArray::new();

/// Scratch space for a new IPv6 flow's halves, one per CPU (see
/// `conntrack::create_outbound_v6`). Only the programs use it.
pub struct NewFlowV6 {
    /// The outbound program's parse, for the new-flow program it calls.
    pub walk: crate::parse6::Walk,
    pub reply_key: FlowKeyV6,
    pub reply: FlowEntryV6,
    pub outbound: FlowEntryV6,
}

#[btf_map]
pub static NEW_FLOW_V6: PerCpuArray<NewFlowV6, 1> = PerCpuArray::new();

/// First fragments' translations, for the IPv6 fragments that follow.
#[btf_map]
pub static FRAGS_V6: LruHashMap<FragKeyV6, FragEntryV6, 8_192> = LruHashMap::new();

/// Scratch space for an IPv6 fragment's key and entry, one per CPU (see
/// `frags`): the IPv6 programs' stacks have no room for another 40-byte key.
pub struct FragScratchV6 {
    pub key: FragKeyV6,
    pub entry: FragEntryV6,
}

#[btf_map]
pub static FRAG_SCRATCH_V6: PerCpuArray<FragScratchV6, 1> = PerCpuArray::new();
