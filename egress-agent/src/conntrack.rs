//! The conntrack tables as flows: each outbound entry paired with its reply
//! entry, the protocol state the two halves' flags add up to, and the
//! sweeper that removes flows idle past their state's timeout.
//!
//! IPv4 and IPv6 flows live in tables of their own (`CONNTRACK_V4`,
//! `CONNTRACK_V6`) with the same fields; [`FlowKey`] is what the code here
//! needs of either, so one sweeper, one pairing and one listing serve both.
//!
//! The dataplane records only what each direction saw; the state machine
//! lives here, where it costs nothing per packet. The sweeper always removes
//! both halves of a flow, outbound first: a packet racing the removal then
//! starts a new flow on another port instead of leaving with a port whose
//! replies can no longer be matched. An entry that moved since the snapshot
//! was refreshed and stays. Every flow it ends is counted for its tenant
//! (`TENANT_ENDED`): that is how the dataplane's quota sees the room again.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Debug,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::MapData;
use egress_common::{
    flow::{
        DIR_OUTBOUND, FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6, PROTO_ICMP, PROTO_ICMPV6,
        PROTO_TCP, PROTO_UDP, STATE_CLOSE, STATE_COUNT, STATE_ESTABLISHED, STATE_FIN_WAIT,
        STATE_ICMP, STATE_REPLIED, STATE_SYN_SENT, STATE_TIME_WAIT, STATE_UNREPLIED, flow_state,
        is_icmp,
    },
    inbound::FLOW_F_INBOUND,
    sweep::SelfSweep,
};
use serde::Serialize;

use crate::{
    audit::event::{EndReason, Traffic},
    config::Timeouts,
    dataplane::maps::Maps,
};

/// A conntrack entry of either family: the fields the agent reads.
pub trait FlowEntry: aya::Pod + Debug + Eq {
    fn last_seen_ns(&self) -> u64;
    fn created_ns(&self) -> u64;
    /// Seconds of creation as stored: with `last_seen_ns`, what tells a
    /// refreshed or recreated entry from the one a snapshot saw.
    fn created_s(&self) -> u32;
    fn packets(&self) -> u64;
    fn bytes(&self) -> u64;
    fn tenant(&self) -> u16;
    fn tcp_flags(&self) -> u8;
    /// `FLOW_F_*` bits.
    fn flags(&self) -> u8;
    /// Outbound entry: egress address. Reply entry: tenant host address.
    fn nat_addr(&self) -> IpAddr;
    /// The port (or ICMP id) with `nat_addr`, network byte order.
    fn nat_port(&self) -> u16;
}

/// A conntrack key of either family, and where its table is.
pub trait FlowKey: aya::Pod + Debug + Eq + Hash {
    type Entry: FlowEntry;
    /// The table's name, for messages.
    const TABLE: &'static str;
    fn table(maps: &Maps) -> &aya::maps::HashMap<MapData, Self, Self::Entry>;
    fn table_mut(maps: &mut Maps) -> &mut aya::maps::HashMap<MapData, Self, Self::Entry>;
    /// Every entry of the table, read in batches.
    fn entries(maps: &Maps) -> Vec<(Self, Self::Entry)>;
    /// The flow as one of either family.
    fn any(flow: Flow<Self>) -> AnyFlow;
    /// The key of the other half (`FlowKeyV4::peer_key`).
    fn peer(&self, entry: &Self::Entry) -> Self;
    fn proto(&self) -> u8;
    fn direction(&self) -> u8;
    fn zone(&self) -> u16;
    fn src(&self) -> IpAddr;
    fn dst(&self) -> IpAddr;
    /// Network byte order.
    fn src_port(&self) -> u16;
    /// Network byte order.
    fn dst_port(&self) -> u16;
}

/// Both families' entries and keys have the same fields but for the width
/// of their addresses.
macro_rules! flow_family {
    ($key:ty, $entry:ty, $addr:ty, $variant:ident, $table:ident, $entries:ident, $name:expr) => {
        impl FlowEntry for $entry {
            fn last_seen_ns(&self) -> u64 {
                self.last_seen_ns
            }
            fn created_ns(&self) -> u64 {
                <$entry>::created_ns(self)
            }
            fn created_s(&self) -> u32 {
                self.created_s
            }
            fn packets(&self) -> u64 {
                self.packets
            }
            fn bytes(&self) -> u64 {
                self.bytes
            }
            fn tenant(&self) -> u16 {
                self.tenant
            }
            fn tcp_flags(&self) -> u8 {
                self.tcp_flags
            }
            fn flags(&self) -> u8 {
                self.flags
            }
            fn nat_addr(&self) -> IpAddr {
                <$addr>::from(self.nat_addr).into()
            }
            fn nat_port(&self) -> u16 {
                self.nat_port
            }
        }

        impl FlowKey for $key {
            type Entry = $entry;
            const TABLE: &'static str = $name;
            fn table(maps: &Maps) -> &aya::maps::HashMap<MapData, Self, Self::Entry> {
                &maps.$table
            }
            fn table_mut(maps: &mut Maps) -> &mut aya::maps::HashMap<MapData, Self, Self::Entry> {
                &mut maps.$table
            }
            fn entries(maps: &Maps) -> Vec<(Self, Self::Entry)> {
                maps.$entries()
            }
            fn any(flow: Flow<Self>) -> AnyFlow {
                AnyFlow::$variant(flow)
            }
            fn peer(&self, entry: &Self::Entry) -> Self {
                self.peer_key(entry)
            }
            fn proto(&self) -> u8 {
                self.proto
            }
            fn direction(&self) -> u8 {
                self.direction
            }
            fn zone(&self) -> u16 {
                self.zone
            }
            fn src(&self) -> IpAddr {
                <$addr>::from(self.src).into()
            }
            fn dst(&self) -> IpAddr {
                <$addr>::from(self.dst).into()
            }
            fn src_port(&self) -> u16 {
                self.src_port
            }
            fn dst_port(&self) -> u16 {
                self.dst_port
            }
        }
    };
}

flow_family!(
    FlowKeyV4,
    FlowEntryV4,
    Ipv4Addr,
    V4,
    conntrack,
    flows,
    "CONNTRACK_V4"
);
flow_family!(
    FlowKeyV6,
    FlowEntryV6,
    Ipv6Addr,
    V6,
    conntrack_v6,
    flows_v6,
    "CONNTRACK_V6"
);

/// Protocol state of a flow, close to Linux conntrack's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlowState {
    /// TCP: SYN sent, nothing back yet.
    SynSent,
    /// TCP: the peer answered the handshake.
    Established,
    /// TCP: one side sent FIN.
    FinWait,
    /// TCP: both sides sent FIN.
    TimeWait,
    /// TCP: either side sent RST.
    Close,
    /// UDP/ICMP: packets out, none back yet.
    Unreplied,
    /// UDP/ICMP: replies seen.
    Replied,
}

impl FlowState {
    /// How long a flow of `proto` in this state may stay idle.
    pub fn timeout(self, proto: u8, timeouts: &Timeouts) -> Duration {
        if is_icmp(proto) {
            return timeouts.icmp;
        }
        match self {
            Self::SynSent => timeouts.tcp_syn_sent,
            Self::Established => timeouts.tcp_established,
            Self::FinWait => timeouts.tcp_fin_wait,
            Self::TimeWait => timeouts.tcp_time_wait,
            Self::Close => timeouts.tcp_close,
            Self::Unreplied => timeouts.udp,
            Self::Replied => timeouts.udp_replied,
        }
    }

    /// The dataplane's own sweep judges with the same function
    /// (`egress_common::flow::flow_state`).
    pub fn of<E: FlowEntry>(proto: u8, outbound: &E, reply: Option<&E>) -> Self {
        let back = reply.map_or(0, FlowEntry::tcp_flags);
        let replied = reply.is_some_and(|r| r.packets() > 0);
        match flow_state(proto, outbound.tcp_flags(), back, replied) {
            STATE_SYN_SENT => Self::SynSent,
            STATE_ESTABLISHED => Self::Established,
            STATE_FIN_WAIT => Self::FinWait,
            STATE_TIME_WAIT => Self::TimeWait,
            STATE_CLOSE => Self::Close,
            STATE_REPLIED => Self::Replied,
            // ICMP flows are unreplied or replied like UDP; their timeout
            // is the protocol's (`timeout`).
            STATE_ICMP if replied => Self::Replied,
            _ => Self::Unreplied,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SynSent => "SYN_SENT",
            Self::Established => "ESTABLISHED",
            Self::FinWait => "FIN_WAIT",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::Unreplied => "UNREPLIED",
            Self::Replied => "REPLIED",
        }
    }
}

/// The dataplane's own sweep (`SELF_SWEEP`) with these timeouts, walking
/// every `interval`: for gateways where no agent process stays.
pub fn self_sweep(interval: Duration, timeouts: &Timeouts) -> SelfSweep {
    let mut timeouts_ns = [0u64; STATE_COUNT];
    for (state, timeout) in [
        (STATE_SYN_SENT, timeouts.tcp_syn_sent),
        (STATE_ESTABLISHED, timeouts.tcp_established),
        (STATE_FIN_WAIT, timeouts.tcp_fin_wait),
        (STATE_TIME_WAIT, timeouts.tcp_time_wait),
        (STATE_CLOSE, timeouts.tcp_close),
        (STATE_UNREPLIED, timeouts.udp),
        (STATE_REPLIED, timeouts.udp_replied),
        (STATE_ICMP, timeouts.icmp),
    ] {
        timeouts_ns[state] = nanos(timeout);
    }
    SelfSweep {
        interval_ns: nanos(interval),
        timeouts_ns,
        ..SelfSweep::default()
    }
}

/// One flow: both halves, as far as they exist. IPv4 unless said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow<K: FlowKey = FlowKeyV4> {
    pub outbound_key: K,
    pub outbound: K::Entry,
    pub reply: Option<K::Entry>,
}

impl<K: FlowKey> Flow<K> {
    pub fn state(&self) -> FlowState {
        FlowState::of(
            self.outbound_key.proto(),
            &self.outbound,
            self.reply.as_ref(),
        )
    }

    pub fn tenant(&self) -> u16 {
        self.outbound.tenant()
    }

    pub fn timeout(&self, timeouts: &Timeouts) -> Duration {
        self.state().timeout(self.outbound_key.proto(), timeouts)
    }

    /// Most recent packet in either direction.
    pub fn last_seen_ns(&self) -> u64 {
        self.reply.map_or(self.outbound.last_seen_ns(), |r| {
            r.last_seen_ns().max(self.outbound.last_seen_ns())
        })
    }

    /// What the flow carried each way: outwards, and back to the tenant host.
    pub fn traffic(&self) -> (Traffic, Traffic) {
        let outbound = Traffic {
            packets: self.outbound.packets(),
            bytes: self.outbound.bytes(),
        };
        let inbound = self.reply.map_or_else(Traffic::default, |reply| Traffic {
            packets: reply.packets(),
            bytes: reply.bytes(),
        });
        (outbound, inbound)
    }

    /// The tenant host's end, before translation.
    pub fn inside(&self) -> SocketAddr {
        let key = &self.outbound_key;
        SocketAddr::new(key.src(), u16::from_be(key.src_port()))
    }

    /// The egress address and port the flow left with.
    pub fn outside(&self) -> SocketAddr {
        let entry = &self.outbound;
        SocketAddr::new(entry.nat_addr(), u16::from_be(entry.nat_port()))
    }

    /// The remote end.
    pub fn destination(&self) -> SocketAddr {
        let key = &self.outbound_key;
        SocketAddr::new(key.dst(), u16::from_be(key.dst_port()))
    }
}

/// A flow of either family, where both are handled alike: ended flows for
/// the translation log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyFlow {
    V4(Flow),
    V6(Flow<FlowKeyV6>),
}

impl From<Flow> for AnyFlow {
    fn from(flow: Flow) -> Self {
        Self::V4(flow)
    }
}

impl From<Flow<FlowKeyV6>> for AnyFlow {
    fn from(flow: Flow<FlowKeyV6>) -> Self {
        Self::V6(flow)
    }
}

impl AnyFlow {
    pub fn tenant(&self) -> u16 {
        match self {
            Self::V4(flow) => flow.tenant(),
            Self::V6(flow) => flow.tenant(),
        }
    }

    pub fn traffic(&self) -> (Traffic, Traffic) {
        match self {
            Self::V4(flow) => flow.traffic(),
            Self::V6(flow) => flow.traffic(),
        }
    }

    pub fn state(&self) -> FlowState {
        match self {
            Self::V4(flow) => flow.state(),
            Self::V6(flow) => flow.state(),
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            Self::V4(flow) => flow.outbound_key.proto,
            Self::V6(flow) => flow.outbound_key.proto,
        }
    }

    /// (inside, outside, destination), as [`Flow::inside`] and the others.
    pub fn endpoints(&self) -> (SocketAddr, SocketAddr, SocketAddr) {
        match self {
            Self::V4(flow) => (flow.inside(), flow.outside(), flow.destination()),
            Self::V6(flow) => (flow.inside(), flow.outside(), flow.destination()),
        }
    }

    /// When the flow was created, on the dataplane's clock.
    pub fn created_ns(&self) -> u64 {
        match self {
            Self::V4(flow) => flow.outbound.created_ns(),
            Self::V6(flow) => flow.outbound.created_ns(),
        }
    }
}

/// Pairs entries into flows. Reply entries whose outbound half is gone are
/// returned apart: they are what a sweeper removes.
pub fn pair<K: FlowKey>(entries: Vec<(K, K::Entry)>) -> (Vec<Flow<K>>, Vec<K>) {
    let mut replies: HashMap<K, K::Entry> = HashMap::new();
    let mut outbound = Vec::new();
    for (key, entry) in entries {
        if key.direction() == DIR_OUTBOUND {
            outbound.push((key, entry));
        } else {
            replies.insert(key, entry);
        }
    }
    let flows = outbound
        .into_iter()
        .map(|(key, entry)| Flow {
            reply: replies.remove(&key.peer(&entry)),
            outbound_key: key,
            outbound: entry,
        })
        .collect();
    (flows, replies.into_keys().collect())
}

pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".to_owned(),
        PROTO_UDP => "udp".to_owned(),
        PROTO_ICMP => "icmp".to_owned(),
        PROTO_ICMPV6 => "icmpv6".to_owned(),
        other => other.to_string(),
    }
}

/// `addr:port` (`[addr]:port` for IPv6) with the port in host order, or
/// the address alone for ICMP, whose id is shown apart.
pub fn endpoint(proto: u8, addr: impl Into<IpAddr>, port_be: u16) -> String {
    let addr = addr.into();
    if is_icmp(proto) {
        addr.to_string()
    } else {
        SocketAddr::new(addr, u16::from_be(port_be)).to_string()
    }
}

/// CLOCK_MONOTONIC_COARSE, the dataplane's clock.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// A flow the agent removed, and why: what the translation log records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedFlow {
    pub flow: AnyFlow,
    pub reason: EndReason,
}

/// What one sweep did, both families together.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Flows idle past their state's timeout, both halves removed.
    pub flows_expired: usize,
    /// Halves without their other half (left by an agent killed while
    /// removing a flow), removed.
    pub halves_orphaned: usize,
    /// Fragment memories older than the reassembly lifetime, removed.
    pub fragments_expired: usize,
    /// Flows left in place (alive, or refreshed while the sweep ran).
    pub flows_kept: usize,
    /// Every flow this sweep removed (expired ones and orphaned outbound
    /// halves), with its counters as last read.
    #[serde(skip)]
    pub ended: Vec<EndedFlow>,
    /// What the flows it kept hold, for the metrics.
    #[serde(skip)]
    pub held: HeldFigures,
}

/// What live flows held at one sweep: per tenant the traffic (outbound,
/// inbound) of its flows, per egress address the distinct ports in use.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeldFigures {
    pub traffic: BTreeMap<u16, (Traffic, Traffic)>,
    pub ports_in_use: BTreeMap<IpAddr, usize>,
}

impl HeldFigures {
    fn add<K: FlowKey>(&mut self, flow: &Flow<K>, ports: &mut HashSet<(IpAddr, u16)>) {
        let (outbound, inbound) = flow.traffic();
        let entry = self.traffic.entry(flow.tenant()).or_default();
        entry.0.packets += outbound.packets;
        entry.0.bytes += outbound.bytes;
        entry.1.packets += inbound.packets;
        entry.1.bytes += inbound.bytes;
        let nat_addr = flow.outbound.nat_addr();
        if ports.insert((nat_addr, flow.outbound.nat_port())) {
            *self.ports_in_use.entry(nat_addr).or_default() += 1;
        }
    }
}

/// A half without its other half may belong to a flow being created this
/// very moment (the dataplane writes the reply half first): leave it alone
/// this long.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(5);
/// Linux keeps fragments for reassembly this long (ipfrag_time).
pub const FRAGMENT_LIFETIME: Duration = Duration::from_secs(30);

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Removes expired flows (both halves) of both families, orphaned halves
/// and stale fragment memories, judged at `now_ns` on the dataplane's clock.
pub fn sweep(maps: &mut Maps, now_ns: u64, timeouts: &Timeouts) -> anyhow::Result<SweepReport> {
    let snapshot = maps.flows();
    let mut report = sweep_snapshot(maps, snapshot, now_ns, timeouts)?;
    let snapshot = maps.flows_v6();
    sweep_table(maps, snapshot, now_ns, timeouts, &mut report)?;
    Ok(report)
}

/// `sweep` of one family's table, judging a snapshot of it taken earlier:
/// entries that changed since were refreshed by traffic and stay. Stale
/// fragment memories go too.
pub fn sweep_snapshot<K: FlowKey>(
    maps: &mut Maps,
    snapshot: Vec<(K, K::Entry)>,
    now_ns: u64,
    timeouts: &Timeouts,
) -> anyhow::Result<SweepReport> {
    let mut report = SweepReport::default();
    sweep_table(maps, snapshot, now_ns, timeouts, &mut report)?;
    report.fragments_expired += expire_fragments(&mut maps.frags, now_ns, |e| e.created_ns);
    report.fragments_expired += expire_fragments(&mut maps.frags_v6, now_ns, |e| e.created_ns);
    Ok(report)
}

/// Removes the fragment memories of one family older than
/// `FRAGMENT_LIFETIME`; how many went.
fn expire_fragments<K: aya::Pod, V: aya::Pod>(
    frags: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    now_ns: u64,
    created_ns: impl Fn(&V) -> u64,
) -> usize {
    let stale: Vec<K> = frags
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, entry)| now_ns.saturating_sub(created_ns(entry)) >= nanos(FRAGMENT_LIFETIME))
        .map(|(key, _)| key)
        .collect();
    stale.iter().filter(|key| frags.remove(key).is_ok()).count()
}

/// Sweeps one family's table from `snapshot`, adding to `report`.
fn sweep_table<K: FlowKey>(
    maps: &mut Maps,
    snapshot: Vec<(K, K::Entry)>,
    now_ns: u64,
    timeouts: &Timeouts,
    report: &mut SweepReport,
) -> anyhow::Result<()> {
    let mut ended = BTreeMap::new();
    let mut ports = HashSet::new();
    let (flows, orphan_replies) = pair(snapshot);
    for flow in flows {
        let idle = now_ns.saturating_sub(flow.last_seen_ns());
        let expired = idle >= nanos(flow.timeout(timeouts));
        let orphaned = flow.reply.is_none()
            && now_ns.saturating_sub(flow.outbound.created_ns()) >= nanos(ORPHAN_GRACE);
        if !(expired || orphaned) || refreshed(maps, &flow.outbound_key, &flow.outbound) {
            report.flows_kept += 1;
            report.held.add(&flow, &mut ports);
            continue;
        }
        let reply_key = flow.outbound_key.peer(&flow.outbound);
        if let Some(reply) = &flow.reply
            && refreshed(maps, &reply_key, reply)
        {
            report.flows_kept += 1;
            report.held.add(&flow, &mut ports);
            continue;
        }
        let reason = if !expired {
            EndReason::Orphaned
        } else if matches!(flow.state(), FlowState::Close | FlowState::TimeWait) {
            EndReason::Closed
        } else {
            EndReason::Expired
        };
        if end(maps, &flow, &mut ended)? {
            report.ended.push(EndedFlow {
                flow: K::any(flow),
                reason,
            });
        }
        if expired {
            report.flows_expired += 1;
        } else {
            report.halves_orphaned += 1;
        }
    }
    maps.add_ended(&ended)?;
    // A reply half alone was never a flow of its own: its outbound half
    // was counted when it ended, or never created.
    for key in orphan_replies {
        let Ok(entry) = K::table(maps).get(&key, 0) else {
            continue;
        };
        if now_ns.saturating_sub(entry.created_ns()) >= nanos(ORPHAN_GRACE) {
            remove(maps, &key)?;
            report.halves_orphaned += 1;
        }
    }
    Ok(())
}

/// Whether an entry saw traffic since the snapshot `seen` was taken.
fn refreshed<K: FlowKey>(maps: &Maps, key: &K, seen: &K::Entry) -> bool {
    K::table(maps).get(key, 0).is_ok_and(|now| {
        now.last_seen_ns() != seen.last_seen_ns() || now.created_s() != seen.created_s()
    })
}

/// What a tenant may still translate to after a change of configuration.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    pub egress: Vec<Ipv4Addr>,
    pub egress_v6: Vec<Ipv6Addr>,
    /// The tenant's source prefixes; empty when it is chosen by where the
    /// packet came in, so any source is its own.
    pub sources: Vec<ipnet::Ipv4Net>,
    /// As `sources`, IPv6.
    pub sources_v6: Vec<ipnet::Ipv6Net>,
    /// The conntrack zones (ingress port ids) its flows may live in:
    /// `ANY_PORT` for a tenant chosen by source alone.
    pub zones: Vec<u16>,
    /// Its port forwards: flows they opened stay while their rule does.
    pub forwards: Vec<crate::config::inbound::PlannedForward>,
    /// Its floating IPs: the host's flows through one stay while it does.
    pub floating: Vec<crate::config::inbound::PlannedFloating>,
}

impl Allowed {
    /// Whether `flow`, one of this tenant's, may go on.
    fn keeps<K: FlowKey>(&self, flow: &Flow<K>) -> bool {
        let egress = flow.outbound.nat_addr();
        let source = flow.outbound_key.src();
        if !self.zones.contains(&flow.outbound_key.zone()) {
            return false;
        }
        let floating = self
            .floating
            .iter()
            .any(|f| f.address == egress && f.host == source);
        if flow.outbound.flags() & FLOW_F_INBOUND != 0 {
            let port = u16::from_be(flow.outbound.nat_port());
            let host_port = u16::from_be(flow.outbound_key.src_port());
            return floating
                || self.forwards.iter().any(|f| {
                    f.egress == egress
                        && f.port == port
                        && f.proto == flow.outbound_key.proto()
                        && f.host == source
                        && f.host_port == host_port
                });
        }
        let (has_egress, has_source) = match (egress, source) {
            (IpAddr::V4(egress), IpAddr::V4(source)) => (
                self.egress.contains(&egress),
                self.sources.is_empty() || self.sources.iter().any(|n| n.contains(&source)),
            ),
            (IpAddr::V6(egress), IpAddr::V6(source)) => (
                self.egress_v6.contains(&egress),
                self.sources_v6.is_empty() || self.sources_v6.iter().any(|n| n.contains(&source)),
            ),
            _ => (false, false),
        };
        floating || (has_egress && has_source)
    }
}

/// Ends (removes both halves of) every flow, of either family, whose tenant
/// is gone, whose egress address the tenant no longer has, whose source or
/// ingress port left the tenant, or whose port forward or floating IP was
/// removed: the dataplane finds established flows without classifying
/// their packets, so only this makes the next packet start a new flow that
/// follows the new configuration, instead of leaving from an address that
/// is withdrawn or as a tenant it no longer belongs to. Returns the flows
/// it ended.
pub fn end_flows_not_allowed(
    maps: &mut Maps,
    allowed: &HashMap<u16, Allowed>,
) -> anyhow::Result<Vec<EndedFlow>> {
    let mut gone = end_table_not_allowed::<FlowKeyV4>(maps, allowed)?;
    gone.extend(end_table_not_allowed::<FlowKeyV6>(maps, allowed)?);
    Ok(gone)
}

fn end_table_not_allowed<K: FlowKey>(
    maps: &mut Maps,
    allowed: &HashMap<u16, Allowed>,
) -> anyhow::Result<Vec<EndedFlow>> {
    let (flows, _) = pair(K::entries(maps));
    let mut ended = BTreeMap::new();
    let mut gone = Vec::new();
    for flow in flows {
        let keep = allowed.get(&flow.tenant()).is_some_and(|a| a.keeps(&flow));
        if keep {
            continue;
        }
        if end(maps, &flow, &mut ended)? {
            gone.push(EndedFlow {
                flow: K::any(flow),
                reason: EndReason::Config,
            });
        }
    }
    maps.add_ended(&ended)?;
    Ok(gone)
}

/// Every flow in both tables, as the translation log's last word on them
/// when the dataplane is taken down with them.
pub fn all_flows_ending(maps: &Maps) -> Vec<EndedFlow> {
    let v4 = pair(maps.flows()).0.into_iter().map(AnyFlow::V4);
    let v6 = pair(maps.flows_v6()).0.into_iter().map(AnyFlow::V6);
    v4.chain(v6)
        .map(|flow| EndedFlow {
            flow,
            reason: EndReason::Shutdown,
        })
        .collect()
}

/// Removes both halves of a flow, outbound first, and counts it as ended
/// for its tenant, if it was still there to remove. Whether it was.
fn end<K: FlowKey>(
    maps: &mut Maps,
    flow: &Flow<K>,
    ended: &mut BTreeMap<u16, u64>,
) -> anyhow::Result<bool> {
    let was_there = remove(maps, &flow.outbound_key)?;
    remove(maps, &flow.outbound_key.peer(&flow.outbound))?;
    if was_there {
        *ended.entry(flow.tenant()).or_default() += 1;
    }
    Ok(was_there)
}

/// Flows (outbound halves) each tenant holds in a snapshot, added to `held`.
pub fn held_by_tenant<K: FlowKey>(snapshot: &[(K, K::Entry)], held: &mut BTreeMap<u16, u64>) {
    for (key, entry) in snapshot {
        if key.direction() == DIR_OUTBOUND {
            *held.entry(entry.tenant()).or_default() += 1;
        }
    }
}

/// Makes the per-tenant counts of ended flows agree with the tables, for
/// maps the agent adopts from an earlier run that may have died between
/// removing flows and counting them.
pub fn reconcile_usage(maps: &mut Maps) -> anyhow::Result<()> {
    let usage = maps.tenant_usage()?;
    let mut held = BTreeMap::new();
    held_by_tenant(&maps.flows(), &mut held);
    held_by_tenant(&maps.flows_v6(), &mut held);
    maps.reconcile_ended(&usage, &held)
}

/// Removes an entry that may already be gone (removed by another tool
/// racing us): either way it is not there afterwards. Whether it was.
fn remove<K: FlowKey>(maps: &mut Maps, key: &K) -> anyhow::Result<bool> {
    match K::table_mut(maps).remove(key) {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(aya::maps::MapError::SyscallError(err))
            if err.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(false)
        }
        Err(err) => Err(err).with_context(|| format!("removing an entry of {}", K::TABLE)),
    }
}

#[cfg(test)]
mod tests {
    use egress_common::flow::{DIR_REPLY, REPLY_ZONE, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

    use super::*;

    fn entry(flags: u8, packets: u64) -> FlowEntryV4 {
        FlowEntryV4 {
            tcp_flags: flags,
            packets,
            ..FlowEntryV4::default()
        }
    }

    #[test]
    fn tcp_states_follow_the_flags_of_both_directions() {
        let tcp = |out, back: Option<u8>| {
            FlowState::of(
                PROTO_TCP,
                &entry(out, 1),
                back.map(|b| entry(b, 1)).as_ref(),
            )
        };
        assert_eq!(tcp(TCP_SYN, None), FlowState::SynSent);
        assert_eq!(tcp(TCP_SYN, Some(0)), FlowState::SynSent);
        assert_eq!(
            tcp(TCP_SYN | TCP_ACK, Some(TCP_SYN | TCP_ACK)),
            FlowState::Established
        );
        assert_eq!(
            tcp(TCP_SYN | TCP_ACK | TCP_FIN, Some(TCP_SYN | TCP_ACK)),
            FlowState::FinWait
        );
        assert_eq!(
            tcp(TCP_ACK | TCP_FIN, Some(TCP_ACK | TCP_FIN)),
            FlowState::TimeWait
        );
        assert_eq!(tcp(TCP_SYN, Some(TCP_RST)), FlowState::Close);
    }

    #[test]
    fn datagram_flows_are_replied_once_a_reply_was_counted() {
        assert_eq!(
            FlowState::of(PROTO_UDP, &entry(0, 3), None),
            FlowState::Unreplied
        );
        assert_eq!(
            FlowState::of(PROTO_UDP, &entry(0, 3), Some(&entry(0, 0))),
            FlowState::Unreplied
        );
        assert_eq!(
            FlowState::of(PROTO_ICMP, &entry(0, 3), Some(&entry(0, 1))),
            FlowState::Replied
        );
    }

    #[test]
    fn halves_are_paired_and_orphans_reported() {
        let out_key = FlowKeyV4 {
            src: [10, 0, 0, 1],
            dst: [192, 0, 2, 1],
            src_port: 1000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: PROTO_TCP,
            direction: DIR_OUTBOUND,
            zone: 2,
        };
        let out = FlowEntryV4 {
            nat_addr: [198, 51, 100, 1],
            nat_port: 40000u16.to_be(),
            tenant: 3,
            zone: 2,
            ..FlowEntryV4::default()
        };
        let reply_key = out_key.peer_key(&out);
        assert_eq!(reply_key.direction, DIR_REPLY);
        assert_eq!(reply_key.zone, REPLY_ZONE);
        assert_eq!(
            reply_key.peer_key(&FlowEntryV4 {
                nat_addr: out_key.src,
                nat_port: out_key.src_port,
                tenant: 3,
                zone: 2,
                ..FlowEntryV4::default()
            }),
            out_key
        );
        let orphan_key = FlowKeyV4 {
            dst_port: 40001u16.to_be(),
            ..reply_key
        };
        let (flows, orphans) = pair(vec![
            (reply_key, entry(TCP_SYN | TCP_ACK, 1)),
            (out_key, out),
            (orphan_key, entry(0, 1)),
        ]);
        assert_eq!(flows.len(), 1);
        assert!(flows[0].reply.is_some());
        assert_eq!(orphans, [orphan_key]);
    }

    fn v6(addr: &str) -> [u8; 16] {
        addr.parse::<Ipv6Addr>().expect("IPv6").octets()
    }

    fn v6_flow(src: &str, nat: &str, zone: u16) -> (FlowKeyV6, FlowEntryV6) {
        let key = FlowKeyV6 {
            src: v6(src),
            dst: v6("2001:db8:113::7"),
            src_port: 1000u16.to_be(),
            dst_port: 443u16.to_be(),
            proto: PROTO_TCP,
            direction: DIR_OUTBOUND,
            zone,
        };
        let entry = FlowEntryV6 {
            nat_addr: v6(nat),
            nat_port: 40000u16.to_be(),
            tenant: 3,
            zone,
            ..FlowEntryV6::default()
        };
        (key, entry)
    }

    #[test]
    fn ipv6_halves_are_paired_like_ipv4_ones() {
        let (out_key, out) = v6_flow("fd00:10::5", "2001:db8:31::101", 2);
        let reply_key = out_key.peer_key(&out);
        let reply = FlowEntryV6 {
            nat_addr: out_key.src,
            nat_port: out_key.src_port,
            tenant: 3,
            zone: 2,
            packets: 1,
            tcp_flags: TCP_SYN | TCP_ACK,
            ..FlowEntryV6::default()
        };
        assert_eq!(reply_key.peer_key(&reply), out_key);
        let orphan_key = FlowKeyV6 {
            dst_port: 40001u16.to_be(),
            ..reply_key
        };
        let (flows, orphans) = pair(vec![
            (reply_key, reply),
            (out_key, out),
            (orphan_key, entry_v6(0, 1)),
        ]);
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].reply, Some(reply));
        assert_eq!(
            flows[0].state(),
            FlowState::Established,
            "the peer answered"
        );
        assert_eq!(orphans, [orphan_key]);
        assert_eq!(flows[0].inside().to_string(), "[fd00:10::5]:1000");
        assert_eq!(flows[0].outside().to_string(), "[2001:db8:31::101]:40000");
    }

    fn entry_v6(flags: u8, packets: u64) -> FlowEntryV6 {
        FlowEntryV6 {
            tcp_flags: flags,
            packets,
            ..FlowEntryV6::default()
        }
    }

    #[test]
    fn icmpv6_flows_have_the_icmp_timeout() {
        let timeouts = Timeouts::default();
        let icmp = FlowState::of(PROTO_ICMPV6, &entry_v6(0, 1), None);
        assert_eq!(icmp.timeout(PROTO_ICMPV6, &timeouts), timeouts.icmp);
        assert_eq!(proto_name(PROTO_ICMPV6), "icmpv6");
    }

    #[test]
    fn endpoints_print_each_family_as_written() {
        let v4 = [10, 0, 0, 1];
        assert_eq!(endpoint(PROTO_TCP, v4, 80u16.to_be()), "10.0.0.1:80");
        let addr = Ipv6Addr::from(v6("fd00::1"));
        assert_eq!(endpoint(PROTO_UDP, addr, 53u16.to_be()), "[fd00::1]:53");
        assert_eq!(endpoint(PROTO_ICMPV6, addr, 7u16.to_be()), "fd00::1");
    }

    #[test]
    fn config_changes_keep_only_allowed_ipv6_flows() {
        let allowed = Allowed {
            egress: vec![Ipv4Addr::new(192, 168, 31, 101)],
            egress_v6: vec!["2001:db8:31::101".parse().unwrap()],
            sources: vec!["172.20.10.0/24".parse().unwrap()],
            sources_v6: vec!["fd00:10::/64".parse().unwrap()],
            zones: vec![0],
            ..Allowed::default()
        };
        let flow = |src: &str, nat: &str, zone: u16| {
            let (outbound_key, outbound) = v6_flow(src, nat, zone);
            Flow {
                outbound_key,
                outbound,
                reply: None,
            }
        };
        assert!(allowed.keeps(&flow("fd00:10::5", "2001:db8:31::101", 0)));
        assert!(
            !allowed.keeps(&flow("fd00:11::5", "2001:db8:31::101", 0)),
            "source left"
        );
        assert!(
            !allowed.keeps(&flow("fd00:10::5", "2001:db8:31::102", 0)),
            "egress address withdrawn"
        );
        assert!(
            !allowed.keeps(&flow("fd00:10::5", "2001:db8:31::101", 4)),
            "ingress port left"
        );
        // A v4-mapped egress never matches an IPv4 egress IP.
        assert!(!allowed.keeps(&flow("fd00:10::5", "::ffff:192.168.31.101", 0)));
    }
}
