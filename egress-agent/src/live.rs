//! What the running agent knows beyond the pinned maps (dataplane health,
//! BFD sessions), published every second to `/run/<instance>/live.json`
//! for `egress-agent status`, and to `/metrics`.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    bfd::{self, PeerStatus},
    health::Health,
    instance::Instance,
    metrics::Exporter,
};

#[derive(Debug, Clone, Serialize)]
pub struct Live {
    /// The agent that wrote this: `status` trusts the file only while that
    /// process lives (or when it says the agent stopped).
    pub pid: u32,
    pub health: Health,
    pub bfd: Vec<PeerStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::kubernetes::sync::KubeView>,
    /// The translation log's counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::audit::pipeline::AuditView>,
}

/// The last published view, shared with the metrics endpoint.
#[derive(Clone, Default)]
pub struct Published(Arc<Mutex<Vec<PeerStatus>>>);

impl Published {
    /// Adds the BFD sessions to every scrape.
    pub fn export(&self, exporter: &Exporter) {
        let view = self.clone();
        exporter.register(move |out| {
            let sessions = view.0.lock().unwrap_or_else(PoisonError::into_inner);
            if sessions.is_empty() {
                return;
            }
            bfd::write_metrics(out, &sessions);
        });
    }

    /// Writes the view for `status` (atomically: status may read any time).
    pub fn publish(&self, instance: &Instance, live: Live) -> anyhow::Result<()> {
        write(instance, &live)?;
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = live.bfd;
        Ok(())
    }
}

fn write(instance: &Instance, live: &Live) -> anyhow::Result<()> {
    let path = instance.run_dir.join("live.json");
    let temporary = instance.run_dir.join("live.json.new");
    std::fs::write(&temporary, serde_json::to_vec_pretty(live)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))
}

/// Says, as this agent exits, that it leaves the dataplane unattended, so
/// the file never claims `serving` for a dataplane nobody watches.
pub fn publish_stopped(instance: &Instance, reason: &str) {
    let live = Live {
        pid: std::process::id(),
        health: Health::AgentStopped(reason.to_owned()),
        bfd: Vec::new(),
        kubernetes: None,
        audit: None,
    };
    if let Err(err) = write(instance, &live) {
        tracing::warn!(error = %format!("{err:#}"), "publishing that the agent stopped");
    }
}

/// Keeps the BFD sessions' view of the dataplane in step with its health:
/// sessions may be Up only while it serves.
pub fn follow_health(mut health: watch::Receiver<Health>) -> watch::Receiver<bfd::Health> {
    let serving = |h: &Health| {
        if h.is_serving() {
            bfd::Health::Serving
        } else {
            bfd::Health::NotServing
        }
    };
    let (tx, rx) = watch::channel(serving(&health.borrow()));
    tokio::spawn(async move {
        while health.changed().await.is_ok() {
            let next = serving(&health.borrow_and_update());
            tx.send_if_modified(|current| std::mem::replace(current, next) != next);
        }
    });
    rx
}

pub fn peer_configs(resolved: &crate::config::Resolved) -> Vec<bfd::PeerConfig> {
    resolved
        .bfd_peers
        .iter()
        .map(|peer| bfd::PeerConfig {
            address: peer.address,
            interface: peer.interface.as_ref().map(|l| l.name.clone()),
            min_tx: peer.min_tx,
            min_rx: peer.min_rx,
            multiplier: peer.multiplier,
            passive: false,
        })
        .collect()
}
