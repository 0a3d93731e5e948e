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
