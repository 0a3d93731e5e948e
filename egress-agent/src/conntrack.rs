//! The conntrack table as flows: each outbound entry paired with its reply
//! entry, the protocol state the two halves' flags add up to, and the
//! sweeper that removes flows idle past their state's timeout.
//!
//! The dataplane records only what each direction saw; the state machine
//! lives here, where it costs nothing per packet. The sweeper always removes
//! both halves of a flow, outbound first: a packet racing the removal then
//! starts a new flow on another port instead of leaving with a port whose
//! replies can no longer be matched. An entry that moved since the snapshot
//! was refreshed and stays. Every flow it ends is counted for its tenant
//! (`TENANT_ENDED`): that is how the dataplane's quota sees the room again.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::Context as _;
use egress_common::{
    flow::{
        DIR_OUTBOUND, FlowEntryV4, FlowKeyV4, PROTO_ICMP, PROTO_TCP, PROTO_UDP, STATE_CLOSE,
        STATE_COUNT, STATE_ESTABLISHED, STATE_FIN_WAIT, STATE_ICMP, STATE_REPLIED, STATE_SYN_SENT,
        STATE_TIME_WAIT, STATE_UNREPLIED, flow_state,
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
        if proto == PROTO_ICMP {
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
    pub fn of(proto: u8, outbound: &FlowEntryV4, reply: Option<&FlowEntryV4>) -> Self {
        let back = reply.map_or(0, |r| r.tcp_flags);
        let replied = reply.is_some_and(|r| r.packets > 0);
        match flow_state(proto, outbound.tcp_flags, back, replied) {
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

/// One flow: both halves, as far as they exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub outbound_key: FlowKeyV4,
    pub outbound: FlowEntryV4,
    pub reply: Option<FlowEntryV4>,
}

impl Flow {
    pub fn state(&self) -> FlowState {
        FlowState::of(self.outbound_key.proto, &self.outbound, self.reply.as_ref())
    }

    pub fn tenant(&self) -> u16 {
        self.outbound.tenant
    }

    pub fn timeout(&self, timeouts: &Timeouts) -> Duration {
        self.state().timeout(self.outbound_key.proto, timeouts)
    }

    /// Most recent packet in either direction.
    pub fn last_seen_ns(&self) -> u64 {
        self.reply.map_or(self.outbound.last_seen_ns, |r| {
            r.last_seen_ns.max(self.outbound.last_seen_ns)
        })
    }
}

/// Pairs entries into flows. Reply entries whose outbound half is gone are
/// returned apart: they are what a sweeper removes.
pub fn pair(entries: Vec<(FlowKeyV4, FlowEntryV4)>) -> (Vec<Flow>, Vec<FlowKeyV4>) {
    let mut replies: HashMap<FlowKeyV4, FlowEntryV4> = HashMap::new();
    let mut outbound = Vec::new();
    for (key, entry) in entries {
        if key.direction == DIR_OUTBOUND {
            outbound.push((key, entry));
        } else {
            replies.insert(key, entry);
        }
    }
    let flows = outbound
        .into_iter()
        .map(|(key, entry)| Flow {
            reply: replies.remove(&key.peer_key(&entry)),
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
        other => other.to_string(),
    }
}

/// `addr:port` with the port in host order, or `addr id N` for ICMP.
pub fn endpoint(proto: u8, addr: [u8; 4], port_be: u16) -> String {
    let addr = Ipv4Addr::from(addr);
    if proto == PROTO_ICMP {
        format!("{addr}")
    } else {
        format!("{addr}:{}", u16::from_be(port_be))
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
    pub flow: Flow,
    pub reason: EndReason,
}

/// What one sweep did.
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
    pub ports_in_use: BTreeMap<Ipv4Addr, usize>,
}

impl HeldFigures {
    fn add(&mut self, flow: &Flow, ports: &mut std::collections::HashSet<([u8; 4], u16)>) {
        let (outbound, inbound) = crate::audit::ring::traffic(flow);
        let entry = self.traffic.entry(flow.tenant()).or_default();
        entry.0.packets += outbound.packets;
        entry.0.bytes += outbound.bytes;
        entry.1.packets += inbound.packets;
        entry.1.bytes += inbound.bytes;
        if ports.insert((flow.outbound.nat_addr, flow.outbound.nat_port)) {
            *self
                .ports_in_use
                .entry(Ipv4Addr::from(flow.outbound.nat_addr))
                .or_default() += 1;
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

/// Removes expired flows (both halves), orphaned halves and stale fragment
/// memories, judged at `now_ns` on the dataplane's clock.
pub fn sweep(maps: &mut Maps, now_ns: u64, timeouts: &Timeouts) -> anyhow::Result<SweepReport> {
    let snapshot = maps.flows();
    sweep_snapshot(maps, snapshot, now_ns, timeouts)
}

/// `sweep` judging a snapshot taken earlier: entries that changed since
/// were refreshed by traffic and stay.
pub fn sweep_snapshot(
    maps: &mut Maps,
    snapshot: Vec<(FlowKeyV4, FlowEntryV4)>,
    now_ns: u64,
    timeouts: &Timeouts,
) -> anyhow::Result<SweepReport> {
    let mut report = SweepReport::default();
    let mut ended = BTreeMap::new();
    let mut ports = std::collections::HashSet::new();
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
        let reply_key = flow.outbound_key.peer_key(&flow.outbound);
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
            report.ended.push(EndedFlow { flow, reason });
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
        let Ok(entry) = maps.conntrack.get(&key, 0) else {
            continue;
        };
        if now_ns.saturating_sub(entry.created_ns()) >= nanos(ORPHAN_GRACE) {
            remove(maps, &key)?;
            report.halves_orphaned += 1;
        }
    }
    let stale: Vec<_> = maps
        .frags
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, entry)| now_ns.saturating_sub(entry.created_ns) >= nanos(FRAGMENT_LIFETIME))
        .map(|(key, _)| key)
        .collect();
    for key in stale {
        if maps.frags.remove(&key).is_ok() {
            report.fragments_expired += 1;
        }
    }
    Ok(report)
}

/// Whether an entry saw traffic since the snapshot `seen` was taken.
fn refreshed(maps: &Maps, key: &FlowKeyV4, seen: &FlowEntryV4) -> bool {
    maps.conntrack
        .get(key, 0)
        .is_ok_and(|now| now.last_seen_ns != seen.last_seen_ns || now.created_s != seen.created_s)
}

/// What a tenant may still translate to after a change of configuration.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    pub egress: Vec<std::net::Ipv4Addr>,
    /// The tenant's source prefixes; empty when it is chosen by where the
    /// packet came in, so any source is its own.
    pub sources: Vec<ipnet::Ipv4Net>,
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
    fn keeps(&self, flow: &Flow) -> bool {
        let egress = Ipv4Addr::from(flow.outbound.nat_addr);
        let source = Ipv4Addr::from(flow.outbound_key.src);
        if !self.zones.contains(&flow.outbound_key.zone) {
            return false;
        }
        let floating = self
            .floating
            .iter()
            .any(|f| f.address == egress && f.host == source);
        if flow.outbound.flags & FLOW_F_INBOUND != 0 {
            let port = u16::from_be(flow.outbound.nat_port);
            let host_port = u16::from_be(flow.outbound_key.src_port);
            return floating
                || self.forwards.iter().any(|f| {
                    f.egress == egress
                        && f.port == port
                        && f.proto == flow.outbound_key.proto
                        && f.host == source
                        && f.host_port == host_port
                });
        }
        floating
            || (self.egress.contains(&egress)
                && (self.sources.is_empty() || self.sources.iter().any(|n| n.contains(&source))))
    }
}

/// Ends (removes both halves of) every flow whose tenant is gone, whose
/// egress address the tenant no longer has, whose source or ingress port
/// left the tenant, or whose port forward or floating IP was removed: the dataplane finds established flows without
/// classifying their packets, so only this makes the next packet start a
/// new flow that follows the new configuration, instead of leaving from an
/// address that is withdrawn or as a tenant it no longer belongs to.
/// Returns the flows it ended.
pub fn end_flows_not_allowed(
    maps: &mut Maps,
    allowed: &HashMap<u16, Allowed>,
) -> anyhow::Result<Vec<EndedFlow>> {
    let (flows, _) = pair(maps.flows());
    let mut ended = BTreeMap::new();
    let mut gone = Vec::new();
    for flow in flows {
        let keep = allowed.get(&flow.tenant()).is_some_and(|a| a.keeps(&flow));
        if keep {
            continue;
        }
        if end(maps, &flow, &mut ended)? {
            gone.push(EndedFlow {
                flow,
                reason: EndReason::Config,
            });
        }
    }
    maps.add_ended(&ended)?;
    Ok(gone)
}

/// Every flow in the table, as the translation log's last word on them
/// when the dataplane is taken down with them.
pub fn all_flows_ending(maps: &Maps) -> Vec<EndedFlow> {
    pair(maps.flows())
        .0
        .into_iter()
        .map(|flow| EndedFlow {
            flow,
            reason: EndReason::Shutdown,
        })
        .collect()
}

/// Removes both halves of a flow, outbound first, and counts it as ended
/// for its tenant, if it was still there to remove. Whether it was.
fn end(maps: &mut Maps, flow: &Flow, ended: &mut BTreeMap<u16, u64>) -> anyhow::Result<bool> {
    let was_there = remove(maps, &flow.outbound_key)?;
    remove(maps, &flow.outbound_key.peer_key(&flow.outbound))?;
    if was_there {
        *ended.entry(flow.tenant()).or_default() += 1;
    }
    Ok(was_there)
}

/// Flows (outbound halves) each tenant holds in a snapshot.
pub fn held_by_tenant(snapshot: &[(FlowKeyV4, FlowEntryV4)]) -> BTreeMap<u16, u64> {
    let mut held = BTreeMap::new();
    for (key, entry) in snapshot {
        if key.direction == DIR_OUTBOUND {
            *held.entry(entry.tenant).or_default() += 1;
        }
    }
    held
}

/// Makes the per-tenant counts of ended flows agree with the table, for
/// maps the agent adopts from an earlier run that may have died between
/// removing flows and counting them.
pub fn reconcile_usage(maps: &mut Maps) -> anyhow::Result<()> {
    let usage = maps.tenant_usage()?;
    let held = held_by_tenant(&maps.flows());
    maps.reconcile_ended(&usage, &held)
}

/// Removes an entry that may already be gone (removed by another tool
/// racing us): either way it is not there afterwards. Whether it was.
fn remove(maps: &mut Maps, key: &FlowKeyV4) -> anyhow::Result<bool> {
    match maps.conntrack.remove(key) {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(aya::maps::MapError::SyscallError(err))
            if err.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(false)
        }
        Err(err) => Err(err).context("removing a conntrack entry"),
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
}
