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
    writers: Mutex<Vec<Writer>>,
}

impl Exporter {
    pub fn new(health: watch::Receiver<Health>, maps: Maps) -> Arc<Self> {
        Arc::new(Self {
            health,
            maps: Mutex::new(maps),
            flows_tracked: AtomicU64::new(0),
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
    /// Per tenant: flows held against the quota, and new flows refused.
    /// Four series per tenant (40,000 with 10,000 tenants), read from two
    /// array maps without walking the conntrack table.
    fn render_tenants(&self, out: &mut String) {
        let maps = self
            .maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (Ok(ids), Ok(usage)) = (maps.tenant_ids(), maps.tenant_usage()) else {
            return;
        };
        let mut held = String::new();
        let mut quota = String::new();
        let mut refused = String::new();
        for (name, id) in ids {
            let (usage, ended) = usage.get(usize::from(id)).copied().unwrap_or_default();
            let info = maps.tenants.get(&u32::from(id), 0).unwrap_or_default();
            let name = escape_label(&name);
            let _ = writeln!(
                held,
                "egress_tenant_flows{{tenant=\"{name}\"}} {}",
                usage.live(ended)
            );
            let _ = writeln!(
                quota,
                "egress_tenant_flow_quota{{tenant=\"{name}\"}} {}",
                info.max_flows
            );
            let _ = writeln!(
                refused,
                "egress_tenant_flows_refused_total{{tenant=\"{name}\",reason=\"quota\"}} {}",
                usage.quota_drops
            );
            let _ = writeln!(
                refused,
                "egress_tenant_flows_refused_total{{tenant=\"{name}\",reason=\"rate\"}} {}",
                usage.rate_drops
            );
        }
        let _ = write!(
            out,
            "# HELP egress_tenant_flows Flows each tenant holds (created minus ended).\n\
             # TYPE egress_tenant_flows gauge\n{held}\
             # HELP egress_tenant_flow_quota Flows each tenant may hold at once.\n\
             # TYPE egress_tenant_flow_quota gauge\n{quota}\
             # HELP egress_tenant_flows_refused_total New flows refused by the tenant's quota or rate limit.\n\
             # TYPE egress_tenant_flows_refused_total counter\n{refused}"
        );
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
