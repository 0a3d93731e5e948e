//! The agent's side of Kubernetes mode: keeps a [`KubeWatch`] running,
//! turns each new snapshot into configuration the agent validates like a
//! file (the file then only describes the machine), and writes each object's
//! report back to its status.
//!
//! When the API server is unreachable the last snapshot stays in force:
//! nothing changes in the dataplane until the watchers have complete lists
//! again.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Serialize;

use super::{
    resolve::{self, Resolved},
    snapshot::Snapshot,
    status::StatusPublisher,
    watch::{self as kube_watch, AgentPods, Connectivity, KubeWatch, WatchOptions},
};
use crate::config::Config;

#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// A kubeconfig file (a gateway VM); in-cluster configuration otherwise.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`NODE_NAME`), or the VM's host name.
    pub node_name: String,
    /// Also serve Kube-OVN VpcEgressGateways (resolving Subnets).
    pub kube_ovn: bool,
    /// The namespace of the agent DaemonSet's pods (`POD_NAMESPACE`): a
    /// gateway goes only to a node where an agent runs.
    pub agent_namespace: Option<String>,
}

pub struct KubeSource {
    watch: KubeWatch,
    publisher: StatusPublisher,
    snapshot: Snapshot,
    resolved: Resolved,
    /// Why the machine refused what the cluster asked for, if it did.
    refused: Option<String>,
}

/// What `status` shows of Kubernetes mode.
#[derive(Debug, Clone, Serialize)]
pub struct KubeView {
    pub reachable: bool,
    pub last_sync_unix: Option<u64>,
    pub last_error: Option<String>,
    pub tenants: Vec<String>,
    pub refused: Option<String>,
}

impl KubeSource {
    /// Connects and waits for the first complete lists.
    pub async fn start(options: &KubeOptions) -> anyhow::Result<Self> {
        let client = kube_watch::client(options.kubeconfig.as_deref()).await?;
        let mut watch_options = WatchOptions::new(options.node_name.clone());
        watch_options.kube_ovn = options.kube_ovn;
        watch_options.agent_pods = options
            .agent_namespace
            .as_ref()
            .map(AgentPods::in_namespace);
        let mut watch = kube_watch::start(client.clone(), watch_options).await?;
        let snapshot = watch.snapshots.borrow_and_update().clone();
        let resolved = resolve::resolve(&snapshot);
        log_resolution(&resolved);
        Ok(Self {
            watch,
            publisher: StatusPublisher::new(client),
            snapshot,
            resolved,
            refused: None,
        })
    }

    /// Waits for a snapshot that changes what the dataplane should do.
    pub async fn changed(&mut self) -> anyhow::Result<()> {
        loop {
            self.watch.snapshots.changed().await?;
            self.snapshot = self.watch.snapshots.borrow_and_update().clone();
            let next = resolve::resolve(&self.snapshot);
            let differs = !next.dataplane_eq(&self.resolved);
            log_resolution(&next);
            self.resolved = next;
            if differs {
                return Ok(());
            }
        }
    }

    /// The file's configuration with the cluster's tenants, return routes
    /// and BFD peers added.
    pub fn merge_into(&self, config: &mut Config) {
        let resolved = &self.resolved;
        config.tenants.extend(resolved.tenants.iter().cloned());
        if let Some(external) = &resolved.external_interface {
            config.interfaces.external.clone_from(external);
        }
        // On a cluster node the CNI routes pod CIDRs already.
        if resolved.outside_cluster {
            config
                .return_routes
                .extend(resolved.return_routes.iter().map(|r| r.to_config()));
        }
        config
            .bfd
            .peers
            .extend(resolved.bfd_peers.iter().map(|p| p.to_config()));
    }

    /// Records that the machine refused the cluster's configuration: every
    /// object served here is reported not ready with the reason.
    pub fn refuse(&mut self, why: Option<String>) {
        if let Some(why) = &why {
            for report in self.resolved.reports.iter_mut().filter(|r| r.served_here) {
                report.set_not_ready("Refused", why.clone());
            }
        }
        self.refused = why;
    }

    /// Writes reports whose content changed to the objects' status.
    pub async fn publish(&mut self, flows_by_tenant: &BTreeMap<String, u64>) {
        let summary = self
            .publisher
            .publish(&self.snapshot, &self.resolved, flows_by_tenant)
            .await;
        for (object, err) in summary.failed {
            tracing::warn!(%object, error = %err, "writing status");
        }
    }

    pub fn connectivity(&self) -> Connectivity {
        self.watch.connectivity.borrow().clone()
    }

    pub fn view(&self) -> KubeView {
        let connectivity = self.connectivity();
        KubeView {
            reachable: connectivity.reachable,
            last_sync_unix: connectivity
                .last_sync
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            last_error: connectivity.last_error,
            tenants: self
                .resolved
                .tenants
                .iter()
                .map(|t| t.name.clone())
                .collect(),
            refused: self.refused.clone(),
        }
    }
}

fn log_resolution(resolved: &Resolved) {
    for warning in &resolved.warnings {
        tracing::warn!(%warning, "cluster");
    }
    for report in &resolved.reports {
        if !report.ready && report.served_here {
            tracing::warn!(
                object = ?report.object,
                reason = %report.reason,
                message = %report.message,
                "gateway not ready"
            );
        }
        // A VpcEgressGateway's status is Kube-OVN's: the log is where what
        // is not honoured shows.
        if report.served_here {
            for note in &report.notes {
                tracing::warn!(
                    object = ?report.object,
                    condition = %note.type_,
                    reason = %note.reason,
                    message = %note.message,
                    "not honoured"
                );
            }
        }
    }
}
