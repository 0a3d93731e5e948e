//! The agent's HTTP endpoint: `/healthz` (the process answers), `/readyz`
//! (the dataplane serves: what Kubernetes probes and load balancers ask)
//! and `/metrics` (Prometheus text: packet verdicts, flows, BFD sessions).
//!
//! Concerns that have something to report register a writer, so this module
//! knows the format, not the subsystems.

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::{
    audit::event::EndReason,
    conntrack::HeldFigures,
    dataplane::{Attachment, maps::Maps},
    health::Health,
};

type Writer = Box<dyn Fn(&mut String) + Send + Sync>;

/// `egress_program_attached`: where each program runs and on which hook,
/// so a dashboard shows which interfaces got XDP and which TC (the reason
/// is in `status` and the startup log; it is prose, not a label).
pub fn export_attachments(exporter: &Exporter, attachments: Vec<Attachment>) {
    exporter.register(move |out| {
        let _ = writeln!(
            out,
            "# HELP egress_program_attached 1 for each program the agent attached, by interface and hook.\n\
             # TYPE egress_program_attached gauge"
        );
        for a in &attachments {
            let _ = writeln!(
                out,
                "egress_program_attached{{interface=\"{}\",program=\"{}\",hook=\"{}\"}} 1",
                a.interface, a.program, a.hook
            );
        }
    });
}

pub struct Exporter {
    health: watch::Receiver<Health>,
    maps: Mutex<Maps>,
    /// Flows in the conntrack table at the last sweep (a full count costs a
    /// walk of the table, which the sweeper does anyway).
    pub flows_tracked: AtomicU64,
    /// Per tenant and egress address, what live flows held at the last sweep.
    pub held: Mutex<HeldFigures>,
    /// Ends and their traffic, per tenant.
    pub audit: Mutex<Option<crate::audit::AuditHandle>>,
    writers: Mutex<Vec<Writer>>,
}

impl Exporter {
    pub fn new(health: watch::Receiver<Health>, maps: Maps) -> Arc<Self> {
        Arc::new(Self {
            health,
            maps: Mutex::new(maps),
            flows_tracked: AtomicU64::new(0),
            held: Mutex::new(HeldFigures::default()),
            audit: Mutex::new(None),
            writers: Mutex::new(Vec::new()),
        })
    }

    /// Adds a subsystem's metrics to every scrape.
    pub fn register(&self, writer: impl Fn(&mut String) + Send + Sync + 'static) {
        self.writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(writer));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let serving = self.health.borrow().is_serving();
        gauge(
            &mut out,
            "egress_dataplane_serving",
            "1 while every program is attached, the maps are readable and the kernel takes what they redirect.",
            u64::from(serving),
        );
        let _ = writeln!(
            out,
            "# HELP egress_packets_total Packets by dataplane verdict.\n# TYPE egress_packets_total counter"
        );
        let counters = self
            .maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .counters();
        if let Ok(counters) = counters {
            for (counter, value) in counters {
                if counter == egress_common::counters::Counter::EventsLost {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "egress_packets_total{{verdict=\"{}\"}} {value}",
                    counter.name()
                );
            }
        }
        gauge(
            &mut out,
            "egress_flows",
            "Flows in the conntrack table at the last sweep.",
            self.flows_tracked.load(Ordering::Relaxed),
        );
        self.render_tenants(&mut out);
        for writer in self
            .writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            writer(&mut out);
        }
        out
    }
}

impl Exporter {
    /// Per tenant: flows held and their quota, flows created and ended (by
    /// reason), new flows refused (by reason), packets and bytes each way;
    /// per egress address: ports in use and the port range. 17 series per
    /// tenant and 2 per egress address (190,000 with 10,000 tenants of one
    /// address each), read from array maps and the last sweep, never by
    /// walking the conntrack table per scrape.
    fn render_tenants(&self, out: &mut String) {
        let maps = self
            .maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (Ok(ids), Ok(usage)) = (maps.tenant_ids(), maps.tenant_usage()) else {
            return;
        };
        let ends = self
            .audit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(crate::audit::AuditHandle::tenant_ends)
            .unwrap_or_default();
        let held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut families = TenantFamilies::default();
        for (name, id) in ids {
            let (usage, ended) = usage.get(usize::from(id)).copied().unwrap_or_default();
            let info = maps.tenants.get(&u32::from(id), 0).unwrap_or_default();
            let name = escape_label(&name);
            let tenant = format!("tenant=\"{name}\"");
            let f = &mut families;
            series(&mut f.flows, &tenant, usage.live(ended));
            series(&mut f.quota, &tenant, u64::from(info.max_flows));
            series(&mut f.created, &tenant, usage.created);
            for (reason, count) in [
                ("quota", usage.quota_drops),
                ("rate", usage.rate_drops),
                ("ports_exhausted", usage.ports_exhausted_drops),
                ("table_full", usage.table_full_drops),
            ] {
                series(
                    &mut f.refused,
                    &format!("{tenant},reason=\"{reason}\""),
                    count,
                );
            }
            let tenant_ends = ends.get(&id).copied().unwrap_or_default();
            for (reason, count) in EndReason::ALL.iter().zip(tenant_ends.by_reason) {
                let labels = format!("{tenant},reason=\"{}\"", reason.as_str());
                series(&mut f.ended, &labels, count);
            }
            let live = held.traffic.get(&id).copied().unwrap_or_default();
            for (direction, ended, live) in [
                ("outbound", tenant_ends.outbound, live.0),
                ("inbound", tenant_ends.inbound, live.1),
            ] {
                let labels = format!("{tenant},direction=\"{direction}\"");
                series(&mut f.packets, &labels, ended.packets + live.packets);
                series(&mut f.bytes, &labels, ended.bytes + live.bytes);
            }
            let range = u64::from(info.port_max.saturating_sub(info.port_min)) + 1;
            for addr in maps.egress_addresses(u32::from(id), &info) {
                let labels = format!("{tenant},address=\"{addr}\"");
                let in_use = held.ports_in_use.get(&addr).copied().unwrap_or(0);
                series(&mut f.ports_in_use, &labels, in_use as u64);
                series(&mut f.ports, &labels, range);
            }
        }
        families.write(out);
    }
}

/// Appends `name{labels} value` to one family's lines (the name is added
/// by `TenantFamilies::write`).
fn series(lines: &mut String, labels: &str, value: u64) {
    let _ = writeln!(lines, "{{{labels}}} {value}");
}

/// The per-tenant metric families, each gathered before it is written so
/// every family's samples follow its own HELP and TYPE.
#[derive(Default)]
struct TenantFamilies {
    flows: String,
    quota: String,
    created: String,
    ended: String,
    refused: String,
    packets: String,
    bytes: String,
    ports_in_use: String,
    ports: String,
}

impl TenantFamilies {
    fn write(&self, out: &mut String) {
        for (name, kind, help, lines) in [
            (
                "egress_tenant_flows",
                "gauge",
                "Flows each tenant holds (created minus ended).",
                &self.flows,
            ),
            (
                "egress_tenant_flow_quota",
                "gauge",
                "Flows each tenant may hold at once.",
                &self.quota,
            ),
            (
                "egress_tenant_flows_created_total",
                "counter",
                "Flows the dataplane created for each tenant.",
                &self.created,
            ),
            (
                "egress_tenant_flows_ended_total",
                "counter",
                "Flows this agent ended, by reason (expired, closed, config, shutdown, orphaned).",
                &self.ended,
            ),
            (
                "egress_tenant_flows_refused_total",
                "counter",
                "New flows refused: by the tenant's quota or rate limit, for want of a free port (ports_exhausted), or a full table.",
                &self.refused,
            ),
            (
                "egress_tenant_packets_total",
                "counter",
                "Packets of the tenant's flows, outbound and inbound (ended flows plus live flows at the last sweep).",
                &self.packets,
            ),
            (
                "egress_tenant_bytes_total",
                "counter",
                "Bytes of IP packets of the tenant's flows, outbound and inbound (ended flows plus live flows at the last sweep).",
                &self.bytes,
            ),
            (
                "egress_egress_ip_ports_in_use",
                "gauge",
                "Distinct ports of each egress address that flows held at the last sweep (one port serves many destinations).",
                &self.ports_in_use,
            ),
            (
                "egress_egress_ip_ports",
                "gauge",
                "Ports each egress address hands out (the tenant's port range).",
                &self.ports,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for line in lines.lines() {
                let _ = writeln!(out, "{name}{line}");
            }
        }
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// Serves the endpoint until the runtime stops.
pub async fn serve(address: SocketAddr, exporter: Arc<Exporter>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let exporter = exporter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, exporter.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    exporter: Arc<Exporter>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => match &*exporter.health.borrow() {
            Health::Serving => (StatusCode::OK, "serving\n".to_owned()),
            other => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", serde_json::to_string(other).unwrap_or_default()),
            ),
        },
        "/metrics" => (StatusCode::OK, exporter.render()),
        _ => (
            StatusCode::NOT_FOUND,
            "try /healthz, /readyz or /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    Ok(response)
}
