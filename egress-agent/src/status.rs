//! `egress-agent status` and `egress-agent flows`: what an instance is doing,
//! read from its state file and its pinned maps. Both work while the agent
//! runs and after it died (the pins outlive it), and say which it is.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::bail;
use egress_common::{counters::Counter, flow::is_icmp};
use serde::Serialize;

use crate::{
    audit::pipeline::AuditView,
    conntrack::{self, Flow, FlowEntry as _, FlowKey, FlowState},
    dataplane::{Attachment, maps::Maps},
    instance::{Instance, RunState, process_alive},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub instance: String,
    pub running: bool,
    pub pid: Option<u32>,
    pub config: Option<String>,
    pub uptime_seconds: Option<u64>,
    pub attachments: Vec<Attachment>,
    pub tenants: Vec<TenantStatus>,
    pub flows: usize,
    pub conntrack_entries: usize,
    pub conntrack_capacity: u32,
    pub counters: BTreeMap<String, u64>,
    /// XDP redirects the kernel dropped, by interface pair.
    pub redirect_drops: Vec<crate::redirects::Row>,
    /// The running agent's own view: dataplane health and BFD sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<serde_json::Value>,
}

#[derive(Debug, Default, Serialize)]
pub struct TenantStatus {
    pub id: u16,
    pub name: String,
    pub sources: Vec<String>,
    pub egress: Vec<IpAddr>,
    pub flows: usize,
    /// Flows the tenant may hold (its quota).
    pub max_flows: u32,
    /// New flows per second it may open; 0: no limit.
    pub new_flows_per_second: u32,
    /// New flows refused because it held its quota.
    pub quota_drops: u64,
    /// New flows refused because it opened them too fast.
    pub rate_drops: u64,
}

/// The instance's pins: in this mount namespace's bpffs, or else in the
/// running agent's (an agent started with `ip netns exec` mounted its own).
fn open_maps(instance: &Instance) -> anyhow::Result<Maps> {
    if instance.pin_dir.exists() {
        return Maps::open(&instance.pin_dir);
    }
    if let Some(pins) = pins_of_running_agent(instance) {
        return Maps::open(&pins);
    }
    bail!(
        "instance {} has no pinned dataplane at {} (is the agent running with --instance {}?)",
        instance.name,
        instance.pin_dir.display(),
        instance.name
    );
}

/// The pin directory as the running agent sees it, through its root in
/// /proc: in another mount namespace it may be another bpffs.
fn pins_of_running_agent(instance: &Instance) -> Option<PathBuf> {
    let pid = instance.read_state().ok().flatten()?.pid;
    let relative = instance.pin_dir.strip_prefix("/").ok()?;
    let pins = PathBuf::from(format!("/proc/{pid}/root")).join(relative);
    (process_alive(pid) && pins.exists()).then_some(pins)
}

pub fn collect(instance: &Instance) -> anyhow::Result<Status> {
    let maps = open_maps(instance)?;
    let running = instance.is_running();
    let state: Option<RunState> = instance.read_state()?;
    let (entries, entries_v6) = (maps.flows(), maps.flows_v6());
    let conntrack_entries = entries.len() + entries_v6.len();
    let (flows, _) = conntrack::pair(entries);
    let (flows_v6, _) = conntrack::pair(entries_v6);
    let mut per_tenant: BTreeMap<u16, usize> = BTreeMap::new();
    let tenants_of_flows =
        (flows.iter().map(Flow::tenant)).chain(flows_v6.iter().map(Flow::tenant));
    for tenant in tenants_of_flows {
        *per_tenant.entry(tenant).or_default() += 1;
    }
    let usage = maps.tenant_usage()?;
    let limited = |id: u16, mut row: TenantStatus| {
        let info = maps.tenants.get(&u32::from(id), 0).unwrap_or_default();
        let (usage, _) = usage.get(usize::from(id)).copied().unwrap_or_default();
        row.max_flows = info.max_flows;
        row.new_flows_per_second = info.new_flow_rate;
        row.quota_drops = usage.quota_drops;
        row.rate_drops = usage.rate_drops;
        row
    };
    let tenants = match &state {
        Some(state) => state
            .tenants
            .iter()
            .map(|t| {
                limited(
                    t.id,
                    TenantStatus {
                        id: t.id,
                        name: t.name.clone(),
                        sources: t.sources.clone(),
                        egress: t.egress.clone(),
                        flows: per_tenant.get(&t.id).copied().unwrap_or(0),
                        ..TenantStatus::default()
                    },
                )
            })
            .collect(),
        // No agent: the pinned maps still know names and egress addresses.
        None => maps
            .tenant_ids()?
            .into_iter()
            .map(|(name, id)| {
                let info = maps.tenants.get(&u32::from(id), 0).unwrap_or_default();
                limited(
                    id,
                    TenantStatus {
                        id,
                        name,
                        sources: Vec::new(),
                        egress: maps.egress_addresses(u32::from(id), &info),
                        flows: per_tenant.get(&id).copied().unwrap_or(0),
                        ..TenantStatus::default()
                    },
                )
            })
            .collect(),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let live = read_live(instance, running);
    Ok(Status {
        live,
        instance: instance.name.clone(),
        running,
        pid: state.as_ref().map(|s| s.pid),
        config: state.as_ref().map(|s| s.config.display().to_string()),
        uptime_seconds: state
            .as_ref()
            .filter(|_| running)
            .map(|s| now.saturating_sub(s.started_at)),
        attachments: if running {
            state
                .as_ref()
                .map(|s| s.attachments.clone())
                .unwrap_or_default()
        } else {
            Vec::new()
        },
        tenants,
        flows: flows.len() + flows_v6.len(),
        conntrack_entries,
        conntrack_capacity: maps.conntrack_capacity,
        redirect_drops: crate::redirects::rows(&instance.pin_dir),
        counters: maps
            .counters()?
            .into_iter()
            .map(|(counter, value)| (counter.name().to_owned(), value))
            .collect(),
    })
}

/// The running agent's view, if it can be believed: written by the agent
/// that holds the instance's lock and still lives, or saying that the agent
/// stopped. A file left by an agent that died (SIGKILL, a crash) says what
/// was true then, `serving` included, and is not shown.
fn read_live(instance: &Instance, running: bool) -> Option<serde_json::Value> {
    let bytes = std::fs::read(instance.run_dir.join("live.json")).ok()?;
    let live: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let stopped = live["health"]["state"] == "agent_stopped";
    let writer_alive = live["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .is_some_and(process_alive);
    (stopped || (running && writer_alive)).then_some(live)
}

/// The translation log: where records go, how many, and every one lost.
fn render_audit(out: &mut String, status: &Status) {
    let ring_lost = status
        .counters
        .iter()
        .find(|(name, _)| name.as_str() == Counter::EventsLost.name())
        .map_or(0, |(_, v)| *v);
    let Some(audit) = status.live.as_ref().map(|live| &live["audit"]) else {
        return;
    };
    let Ok(view) = serde_json::from_value::<AuditView>(audit.clone()) else {
        return;
    };
    let sinks = if view.sinks.is_empty() {
        "off".to_owned()
    } else {
        view.sinks.join(", ")
    };
    let _ = writeln!(
        out,
        "\ntranslation log: {sinks}; {} following live",
        view.followers
    );
    let _ = writeln!(
        out,
        "  records: {} created, {} ended",
        view.created, view.ended
    );
    let _ = writeln!(
        out,
        "  lost: {ring_lost} (ring full), {} (sinks too slow), {} (followers too slow); \
         write errors: log {}, ipfix {}",
        view.sink_lost, view.follower_lost, view.log_errors, view.ipfix_errors
    );
    if view.ipfix_skipped > 0 {
        let _ = writeln!(
            out,
            "  not sent over IPFIX: {} (IPv6 flows: no NAT66 session event)",
            view.ipfix_skipped
        );
    }
}

pub fn render_status(status: &Status) -> String {
    let mut out = String::new();
    let state = match (status.running, status.pid) {
        (true, Some(pid)) => format!("running (pid {pid})"),
        (true, None) => "running".to_owned(),
        (false, _) => "NOT RUNNING: pinned maps of a previous agent remain (`egress-agent cleanup` removes them)".to_owned(),
    };
    let _ = writeln!(out, "instance {}: {state}", status.instance);
    if let Some(config) = &status.config {
        let _ = writeln!(out, "config:   {config}");
    }
    if let Some(uptime) = status.uptime_seconds {
        let _ = writeln!(
            out,
            "uptime:   {}",
            human_duration(Duration::from_secs(uptime))
        );
    }
    let _ = writeln!(out, "\nprograms:");
    if status.attachments.is_empty() {
        let _ = writeln!(out, "  none attached");
    } else {
        let rows = status.attachments.iter().map(|a| {
            vec![
                a.interface.clone(),
                a.program.clone(),
                a.hook.clone(),
                if a.adopted { "adopted" } else { "attached" }.to_owned(),
                if a.reason.is_empty() { "-" } else { &a.reason }.to_owned(),
            ]
        });
        out.push_str(&table(
            &["INTERFACE", "PROGRAM", "HOOK", "LINK", "WHY THIS HOOK"],
            rows,
        ));
    }
    if let Some(live) = &status.live {
        let health = &live["health"];
        let _ = writeln!(
            out,
            "\ndataplane: {}{}",
            health["state"].as_str().unwrap_or("unknown"),
            health["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        if let Some(sessions) = live["bfd"].as_array().filter(|s| !s.is_empty()) {
            let _ = writeln!(out, "\nbfd:");
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            let rows = sessions.iter().map(|s| {
                vec![
                    text(&s["address"]),
                    text(&s["interface"]),
                    text(&s["local_state"]),
                    text(&s["remote_state"]),
                    text(&s["local_diag"]),
                    text(&s["tx_interval_ms"]),
                    text(&s["detection_time_ms"]),
                    text(&s["transitions"]),
                ]
            });
            out.push_str(&table(
                &[
                    "PEER",
                    "INTERFACE",
                    "STATE",
                    "REMOTE",
                    "DIAG",
                    "TX MS",
                    "DETECT MS",
                    "CHANGES",
                ],
                rows,
            ));
        }
    }
    render_audit(&mut out, status);
    let _ = writeln!(out, "\ntenants:");
    let rows = status.tenants.iter().map(|t| {
        vec![
            t.name.clone(),
            t.id.to_string(),
            if t.sources.is_empty() {
                "-".to_owned()
            } else {
                t.sources.join(",")
            },
            t.egress
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            format!("{}/{}", t.flows, t.max_flows),
            if t.new_flows_per_second == 0 {
                "-".to_owned()
            } else {
                t.new_flows_per_second.to_string()
            },
            format!("{}/{}", t.quota_drops, t.rate_drops),
        ]
    });
    out.push_str(&table(
        &[
            "NAME",
            "ID",
            "SOURCES",
            "EGRESS IPS",
            "FLOWS/QUOTA",
            "NEW/S",
            "REFUSED QUOTA/RATE",
        ],
        rows,
    ));
    let _ = writeln!(
        out,
        "\nflows: {} ({} of {} conntrack entries)",
        status.flows, status.conntrack_entries, status.conntrack_capacity
    );
    let nonzero: Vec<_> = status
        .counters
        .iter()
        .filter(|(name, v)| **v > 0 && name.as_str() != Counter::EventsLost.name())
        .collect();
    let _ = writeln!(out, "\npackets by verdict:");
    if nonzero.is_empty() {
        let _ = writeln!(out, "  none yet");
    }
    for (name, value) in nonzero {
        let _ = writeln!(out, "  {name:<28} {value}");
    }
    if !status.redirect_drops.is_empty() {
        let _ = writeln!(out, "\nXDP redirects the kernel dropped:");
        let rows = status.redirect_drops.iter().map(|r| {
            vec![
                r.from.clone(),
                r.to.clone(),
                r.failed.to_string(),
                r.partial.to_string(),
                r.last_error.clone(),
            ]
        });
        out.push_str(&table(
            &["FROM", "TO", "FAILED", "PARTIAL", "LAST ERROR"],
            rows,
        ));
    }
    out
}

#[derive(Debug, Serialize)]
pub struct FlowRow {
    pub tenant: String,
    pub proto: String,
    /// Opened from outside, by a port forward or a floating IP.
    pub inbound: bool,
    pub original: String,
    pub translated: String,
    pub state: FlowState,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    pub packets_out: u64,
    pub packets_in: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

pub fn flow_rows(instance: &Instance, tenant: Option<&str>) -> anyhow::Result<Vec<FlowRow>> {
    let maps = open_maps(instance)?;
    let names: BTreeMap<u16, String> = maps
        .tenant_ids()?
        .into_iter()
        .map(|(name, id)| (id, name))
        .collect();
    let now = conntrack::now_ns();
    let (flows, _) = conntrack::pair(maps.flows());
    let (flows_v6, _) = conntrack::pair(maps.flows_v6());
    let mut rows: Vec<(u16, u64, FlowRow)> = flows
        .iter()
        .map(|flow| flow_row(flow, &names, now))
        .chain(flows_v6.iter().map(|flow| flow_row(flow, &names, now)))
        .filter(|(_, _, row)| tenant.is_none_or(|t| row.tenant == t))
        .collect();
    // By tenant, then by age, whatever the family.
    rows.sort_by_key(|(tenant, created, _)| (*tenant, *created));
    Ok(rows.into_iter().map(|(_, _, row)| row).collect())
}

/// One flow's row, with the tenant id and creation time it sorts by.
fn flow_row<K: FlowKey>(
    flow: &Flow<K>,
    names: &BTreeMap<u16, String>,
    now: u64,
) -> (u16, u64, FlowRow) {
    let seconds = |ns: u64| Duration::from_nanos(now.saturating_sub(ns)).as_secs_f64();
    let key = &flow.outbound_key;
    let proto = key.proto();
    let remote = conntrack::endpoint(proto, key.dst(), key.dst_port());
    let original = format!(
        "{} -> {remote}",
        conntrack::endpoint(proto, key.src(), key.src_port())
    );
    let outbound = &flow.outbound;
    let translated = format!(
        "{} -> {remote}",
        conntrack::endpoint(proto, outbound.nat_addr(), outbound.nat_port())
    );
    let (original, translated) = if is_icmp(proto) {
        (
            format!("{original} id {}", u16::from_be(key.src_port())),
            format!("{translated} id {}", u16::from_be(outbound.nat_port())),
        )
    } else {
        (original, translated)
    };
    let row = FlowRow {
        tenant: names
            .get(&flow.tenant())
            .cloned()
            .unwrap_or_else(|| format!("#{}", flow.tenant())),
        proto: conntrack::proto_name(proto),
        inbound: outbound.flags() & egress_common::inbound::FLOW_F_INBOUND != 0,
        original,
        translated,
        state: flow.state(),
        age_seconds: seconds(outbound.created_ns()),
        idle_seconds: seconds(flow.last_seen_ns()),
        packets_out: outbound.packets(),
        packets_in: flow.reply.map_or(0, |r| r.packets()),
        bytes_out: outbound.bytes(),
        bytes_in: flow.reply.map_or(0, |r| r.bytes()),
    };
    (flow.tenant(), outbound.created_ns(), row)
}

pub fn render_flows(rows: &[FlowRow]) -> String {
    if rows.is_empty() {
        return "no flows\n".to_owned();
    }
    let body = rows.iter().map(|r| {
        vec![
            r.tenant.clone(),
            if r.inbound {
                format!("{} in", r.proto)
            } else {
                r.proto.clone()
            },
            r.original.clone(),
            r.translated.clone(),
            r.state.as_str().to_owned(),
            human_duration(Duration::from_secs_f64(r.age_seconds)),
            human_duration(Duration::from_secs_f64(r.idle_seconds)),
            format!("{}/{}", r.packets_out, r.packets_in),
        ]
    });
    table(
        &[
            "TENANT",
            "PROTO",
            "ORIGINAL",
            "TRANSLATED",
            "STATE",
            "AGE",
            "IDLE",
            "PKTS OUT/IN",
        ],
        body,
    )
}

fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86400, (secs % 86400) / 3600),
    }
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| (*h).to_owned()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![0; header.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "  {cell:<width$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Counter values by name, for tests and metrics.
pub fn counter_value(status: &Status, counter: Counter) -> u64 {
    status.counters.get(counter.name()).copied().unwrap_or(0)
}

#[cfg(test)]
mod flow_row_tests {
    use std::net::Ipv6Addr;

    use egress_common::flow::{DIR_OUTBOUND, FlowEntryV6, FlowKeyV6, PROTO_ICMPV6, PROTO_TCP};

    use super::*;

    fn v6(addr: &str) -> [u8; 16] {
        addr.parse::<Ipv6Addr>().expect("IPv6").octets()
    }

    fn row(proto: u8) -> FlowRow {
        let flow = Flow {
            outbound_key: FlowKeyV6 {
                src: v6("fd00:10::5"),
                dst: v6("2001:db8:113::7"),
                src_port: 7u16.to_be(),
                dst_port: 443u16.to_be(),
                proto,
                direction: DIR_OUTBOUND,
                zone: 0,
            },
            outbound: FlowEntryV6 {
                nat_addr: v6("2001:db8:31::101"),
                nat_port: 40000u16.to_be(),
                tenant: 3,
                packets: 2,
                ..FlowEntryV6::default()
            },
            reply: None,
        };
        let names = BTreeMap::from([(3, "tenant-a".to_owned())]);
        let (tenant, _, row) = flow_row(&flow, &names, 0);
        assert_eq!(tenant, 3);
        row
    }

    #[test]
    fn ipv6_flows_are_listed_with_bracketed_endpoints() {
        let tcp = row(PROTO_TCP);
        assert_eq!(tcp.tenant, "tenant-a");
        assert_eq!(tcp.original, "[fd00:10::5]:7 -> [2001:db8:113::7]:443");
        assert_eq!(
            tcp.translated,
            "[2001:db8:31::101]:40000 -> [2001:db8:113::7]:443"
        );
        assert_eq!(tcp.packets_out, 2);
        let icmp = row(PROTO_ICMPV6);
        assert_eq!(icmp.proto, "icmpv6");
        assert_eq!(icmp.original, "fd00:10::5 -> 2001:db8:113::7 id 7");
        assert_eq!(
            icmp.translated,
            "2001:db8:31::101 -> 2001:db8:113::7 id 40000"
        );
    }
}
