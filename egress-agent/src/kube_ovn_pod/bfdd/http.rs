//! `/livez` (Kube-OVN's HTTP liveness probe: 200 with an empty body while
//! live, 503 "BFD supervisor is not live" otherwise) and `/metrics`, with
//! Kube-OVN's session gauges and the project's `egress_bfd_*` names.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

use super::{SharedState, control::SupervisorStatus, lock, status};
use crate::metrics::gauge;

/// Listens on `address` and serves until the runtime stops.
pub async fn serve(address: SocketAddr, shared: SharedState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    tracing::info!(%address, "serving /livez and /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, Arc::clone(&shared)));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    shared: SharedState,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let now = status(&shared);
    let (code, body) = match request.uri().path() {
        "/livez" if now.live => (StatusCode::OK, String::new()),
        "/livez" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "BFD supervisor is not live\n".to_owned(),
        ),
        "/metrics" => (StatusCode::OK, render(&shared, &now)),
        _ => (StatusCode::NOT_FOUND, "try /livez or /metrics\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    Ok(response)
}

fn render(shared: &SharedState, now: &SupervisorStatus) -> String {
    let mut out = String::new();
    let expected = now.sessions.len() as u64;
    let up = now.sessions.iter().filter(|s| s.phase == "Up").count() as u64;
    gauge(
        &mut out,
        "kube_ovn_bfdd_expected_sessions",
        "Number of BFD sessions expected by the supervisor.",
        expected,
    );
    gauge(
        &mut out,
        "kube_ovn_bfdd_up_sessions",
        "Number of expected BFD sessions currently Up.",
        up,
    );
    gauge(
        &mut out,
        "egress_dataplane_attached",
        "1 while the dataplane's classifier is on the internal interface's TC ingress.",
        u64::from(now.dataplane.attached),
    );
    let sessions = lock(shared)
        .bfd
        .as_ref()
        .map(crate::bfd::Bfd::snapshot)
        .unwrap_or_default();
    crate::bfd::write_metrics(&mut out, &sessions);
    out
}
