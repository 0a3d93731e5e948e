//! Writes each `EgressGateway`'s report into its status subresource.
//!
//! Only the agent that serves an object writes its status (and, for an
//! object no node serves, every agent writes the same words, so the first
//! write makes the others see nothing to do). A status is patched only when
//! it differs from what the object shows, ignoring condition times, and a
//! change in the flow count alone is written at most every
//! `flows_interval`: the count moves all the time and is worth a write only
//! now and then. Kube-OVN's objects keep their status, which Kube-OVN owns.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::time::Instant;

use super::{
    crd::{EgressGateway, EgressGatewayStatus, FIELD_MANAGER},
    resolve::{ObjectKind, Report, Resolved},
    snapshot::Snapshot,
};

/// A status to write.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub namespace: String,
    pub name: String,
    pub status: EgressGatewayStatus,
    /// Only the flow count differs from what the object shows.
    pub flows_only: bool,
}

/// The statuses that differ from what the objects show. `flows` holds the
/// active flows of this node's tenants, by tenant name.
pub fn plan_updates(
    snapshot: &Snapshot,
    resolved: &Resolved,
    flows: &BTreeMap<String, u64>,
    now: Timestamp,
) -> Vec<StatusUpdate> {
    let mut updates = Vec::new();
    for report in &resolved.reports {
        if report.object.kind != ObjectKind::EgressGateway
            || !(report.served_here || report.node.is_none())
        {
            continue;
        }
        let Some(object) = snapshot.egress_gateways.iter().find(|o| {
            o.metadata.namespace.as_deref() == Some(report.object.namespace.as_str())
                && o.metadata.name.as_deref() == Some(report.object.name.as_str())
        }) else {
            continue;
        };
        let current = object.status.as_ref();
        let flows = if report.served_here && report.ready {
            Some(flows.get(&report.tenant).copied().unwrap_or(0))
        } else {
            None
        };
        let status = desired_status(report, current, flows, now);
        let unchanged = current.is_some_and(|c| same_ignoring_times(c, &status));
        if unchanged {
            continue;
        }
        let flows_only = current.is_some_and(|c| {
            let mut without_flows = status.clone();
            without_flows.active_flows = c.active_flows;
            same_ignoring_times(c, &without_flows)
        });
        updates.push(StatusUpdate {
            namespace: report.object.namespace.clone(),
            name: report.object.name.clone(),
            status,
            flows_only,
        });
    }
    updates
}

/// The status a report calls for. Conditions whose status is unchanged keep
/// their transition time, as Kubernetes' conventions ask.
pub fn desired_status(
    report: &Report,
    current: Option<&EgressGatewayStatus>,
    active_flows: Option<u64>,
    now: Timestamp,
) -> EgressGatewayStatus {
    let conditions = report
        .conditions()
        .into_iter()
        .map(|condition| {
            let status = if condition.status { "True" } else { "False" };
            let since = current
                .into_iter()
                .flat_map(|c| c.conditions.iter())
                .find(|c| c.type_ == condition.type_ && c.status == status)
                .map_or(Time(now), |c| c.last_transition_time.clone());
            Condition {
                type_: condition.type_,
                status: status.to_owned(),
                reason: condition.reason,
                message: condition.message,
                last_transition_time: since,
                observed_generation: report.generation,
            }
        })
        .collect();
    EgressGatewayStatus {
        ready: report.ready,
        conditions,
        egress_ips: if report.ready {
            report.egress_ips.iter().map(ToString::to_string).collect()
        } else {
            Vec::new()
        },
        node: report.node.clone(),
        matched_pods: i64::try_from(report.matched_pods).unwrap_or(i64::MAX),
        active_flows: active_flows.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        observed_generation: report.generation,
    }
}

/// Equal apart from when conditions last changed.
pub fn same_ignoring_times(a: &EgressGatewayStatus, b: &EgressGatewayStatus) -> bool {
    let strip = |status: &EgressGatewayStatus| {
        let mut status = status.clone();
        for condition in &mut status.conditions {
            condition.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        status
    };
    strip(a) == strip(b)
}

/// The merge patch that writes `status`; its `null`s clear what no longer
/// applies.
pub fn status_patch(status: &EgressGatewayStatus) -> serde_json::Value {
    serde_json::json!({ "status": status })
}

/// Writes statuses through the API, remembering what it wrote.
pub struct StatusPublisher {
    client: Client,
    flows_interval: Duration,
    /// Last write per object, so a write the watch has not shown yet is not
    /// repeated, and flow counts are not written too often.
    written: HashMap<(String, String), (EgressGatewayStatus, Instant)>,
}

/// What one round of publishing did.
#[derive(Debug, Default)]
pub struct PublishSummary {
    pub patched: usize,
    pub failed: Vec<(String, kube::Error)>,
}

impl StatusPublisher {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            flows_interval: Duration::from_secs(30),
            written: HashMap::new(),
        }
    }

    pub fn with_flows_interval(mut self, interval: Duration) -> Self {
        self.flows_interval = interval;
        self
    }

    /// Patches the status of every object whose report changed. Failures
    /// are returned, not retried: the next round computes them again.
    pub async fn publish(
        &mut self,
        snapshot: &Snapshot,
        resolved: &Resolved,
        flows: &BTreeMap<String, u64>,
    ) -> PublishSummary {
        let mut summary = PublishSummary::default();
        let updates = plan_updates(snapshot, resolved, flows, Timestamp::now());
        self.written.retain(|(namespace, name), _| {
            snapshot.egress_gateways.iter().any(|o| {
                o.metadata.namespace.as_deref() == Some(namespace)
                    && o.metadata.name.as_deref() == Some(name)
            })
        });
        for update in updates {
            let key = (update.namespace.clone(), update.name.clone());
            if let Some((written, at)) = self.written.get(&key) {
                let repeat = same_ignoring_times(written, &update.status);
                let too_soon = update.flows_only && at.elapsed() < self.flows_interval;
                if repeat || too_soon {
                    continue;
                }
            }
            let api: Api<EgressGateway> = Api::namespaced(self.client.clone(), &update.namespace);
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            };
            match api
                .patch_status(
                    &update.name,
                    &params,
                    &Patch::Merge(status_patch(&update.status)),
                )
                .await
            {
                Ok(_) => {
                    summary.patched += 1;
                    self.written.insert(key, (update.status, Instant::now()));
                }
                Err(error) => {
                    summary
                        .failed
                        .push((format!("{}/{}", update.namespace, update.name), error));
                }
            }
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use kube::api::ObjectMeta;

    use super::*;
    use crate::kubernetes::{
        crd::EgressGatewaySpec,
        resolve::{ObjectKey, ReportCondition, reason},
    };

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).expect("time")
    }

    fn report(ready: bool, served_here: bool, node: Option<&str>) -> Report {
        Report {
            object: ObjectKey {
                kind: ObjectKind::EgressGateway,
                namespace: "tenant-a".into(),
                name: "tenant-a".into(),
            },
            generation: Some(3),
            tenant: "tenant-a.tenant-a".into(),
            node: node.map(str::to_owned),
            served_here,
            ready,
            reason: if ready {
                reason::SERVING
            } else {
                reason::NO_SOURCES
            }
            .to_owned(),
            message: "words".into(),
            notes: Vec::new(),
            egress_ips: vec![Ipv4Addr::new(192, 168, 31, 101).into()],
            sources: vec!["172.20.10.0/24".parse().expect("net")],
            matched_pods: 2,
        }
    }

    fn object(status: Option<EgressGatewayStatus>) -> EgressGateway {
        EgressGateway {
            metadata: ObjectMeta {
                name: Some("tenant-a".into()),
                namespace: Some("tenant-a".into()),
                ..Default::default()
            },
            spec: EgressGatewaySpec::default(),
            status,
        }
    }

    fn setting(report: Report, status: Option<EgressGatewayStatus>) -> (Snapshot, Resolved) {
        let snapshot = Snapshot {
            egress_gateways: vec![object(status)],
            ..Default::default()
        };
        let resolved = Resolved {
            reports: vec![report],
            ..Default::default()
        };
        (snapshot, resolved)
    }

    #[test]
    fn a_served_object_gets_its_full_status() {
        let status = desired_status(&report(true, true, Some("worker-1")), None, Some(7), at(0));
        assert!(status.ready);
        assert_eq!(status.egress_ips, ["192.168.31.101"]);
        assert_eq!(status.node.as_deref(), Some("worker-1"));
        assert_eq!(status.matched_pods, 2);
        assert_eq!(status.active_flows, Some(7));
        assert_eq!(status.observed_generation, Some(3));
        let ready = &status.conditions[0];
        assert_eq!(
            (
                ready.type_.as_str(),
                ready.status.as_str(),
                ready.reason.as_str()
            ),
            ("Ready", "True", "Serving")
        );
        assert_eq!(ready.last_transition_time, Time(at(0)));
        assert_eq!(ready.observed_generation, Some(3));
    }

    #[test]
    fn transition_time_moves_only_when_the_condition_flips() {
        let first = desired_status(&report(true, true, Some("worker-1")), None, Some(1), at(0));
        let again = desired_status(
            &report(true, true, Some("worker-1")),
            Some(&first),
            Some(2),
            at(60),
        );
        assert_eq!(again.conditions[0].last_transition_time, Time(at(0)));
        let flipped = desired_status(
            &report(false, true, Some("worker-1")),
            Some(&again),
            None,
            at(120),
        );
        assert_eq!(flipped.conditions[0].last_transition_time, Time(at(120)));
        assert!(
            flipped.egress_ips.is_empty(),
            "no egress IP is in use when not ready"
        );
    }

    #[test]
    fn nothing_is_planned_when_the_object_already_shows_the_status() {
        let report = report(true, true, Some("worker-1"));
        let flows = BTreeMap::from([("tenant-a.tenant-a".to_owned(), 4)]);
        let current = desired_status(&report, None, Some(4), at(0));
        let (snapshot, resolved) = setting(report, Some(current));
        assert!(plan_updates(&snapshot, &resolved, &flows, at(30)).is_empty());
    }

    #[test]
    fn a_flow_count_change_alone_is_marked_as_such() {
        let report = report(true, true, Some("worker-1"));
        let current = desired_status(&report, None, Some(4), at(0));
        let (snapshot, resolved) = setting(report, Some(current));
        let flows = BTreeMap::from([("tenant-a.tenant-a".to_owned(), 5)]);
        let updates = plan_updates(&snapshot, &resolved, &flows, at(30));
        assert_eq!(updates.len(), 1);
        assert!(updates[0].flows_only);
        assert_eq!(updates[0].status.active_flows, Some(5));
    }

    #[test]
    fn objects_served_elsewhere_are_left_to_their_node() {
        let (snapshot, resolved) = setting(report(true, false, Some("worker-2")), None);
        assert!(plan_updates(&snapshot, &resolved, &BTreeMap::new(), at(0)).is_empty());
        let (snapshot, resolved) = setting(report(false, false, None), None);
        let updates = plan_updates(&snapshot, &resolved, &BTreeMap::new(), at(0));
        assert_eq!(
            updates.len(),
            1,
            "no node serves it, so every agent may say why"
        );
        assert!(!updates[0].flows_only);
        assert_eq!(updates[0].status.active_flows, None);
    }

    #[test]
    fn notes_become_conditions_after_ready() {
        let mut report = report(true, true, Some("worker-1"));
        report.notes.push(ReportCondition {
            type_: "BfdIgnored".into(),
            status: true,
            reason: "NoPeers".into(),
            message: "no peers".into(),
        });
        let status = desired_status(&report, None, None, at(0));
        let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "BfdIgnored"]);
    }

    #[test]
    fn the_patch_clears_fields_that_no_longer_apply() {
        let status = desired_status(&report(false, false, None), None, None, at(0));
        let patch = status_patch(&status);
        assert_eq!(patch["status"]["node"], serde_json::Value::Null);
        assert_eq!(patch["status"]["activeFlows"], serde_json::Value::Null);
        assert_eq!(patch["status"]["ready"], false);
        assert_eq!(patch["status"]["egressIPs"], serde_json::json!([]));
    }
}
