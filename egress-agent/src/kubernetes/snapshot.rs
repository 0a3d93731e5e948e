//! What the agent knows of the cluster at one moment: the input of
//! [`resolve`](super::resolve::resolve).
//!
//! Core objects are reduced to the few facts resolution reads (a pod's
//! labels and address, a node's addresses and pod CIDRs), so a snapshot is
//! small, cheap to compare, and unchanged by the constant status churn of
//! pods and nodes. Gateway objects are kept whole: their status is what the
//! status publisher compares against.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};

use super::{
    crd::EgressGateway,
    kubeovn::{Subnet, VpcEgressGateway},
    selector::Labels,
};

/// OVN-Kubernetes (OpenShift) leaves `spec.podCIDR` empty and records each
/// node's pod subnets in this annotation instead.
pub const OVN_K8S_NODE_SUBNETS: &str = "k8s.ovn.org/node-subnets";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The node this agent runs on.
    pub local: LocalNode,
    pub egress_gateways: Vec<EgressGateway>,
    /// Empty unless Kube-OVN compatibility is on.
    pub vpc_egress_gateways: Vec<VpcEgressGateway>,
    pub subnets: Vec<Subnet>,
    pub namespaces: Vec<NamespaceView>,
    /// Pods that can be sources: an IPv4 address of their own, not finished.
    pub pods: Vec<PodView>,
    pub nodes: Vec<NodeView>,
    /// Nodes where a Ready agent pod runs; `None` when the agent does not
    /// track its peers (a gateway outside the cluster), and every node that
    /// a gateway selects is then taken to run one.
    pub agent_nodes: Option<BTreeSet<String>>,
}

/// This agent's node. Outside the cluster (a gateway VM) there is no Node
/// object, and the labels come from the agent's own settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceView {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Both families: a dual-stack pod leaves from its tenant's egress IP
    /// of each.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub labels: Labels,
    /// The node's Ready condition is True.
    pub ready: bool,
    /// The first InternalIP of each family, IPv4 first: a pod CIDR is
    /// routed via the node's address of its own family.
    pub internal_ips: Vec<IpAddr>,
    /// Pod CIDRs of both families: `spec.podCIDRs`, else `spec.podCIDR`,
    /// else the OVN-Kubernetes annotation.
    pub pod_cidrs: Vec<IpNet>,
}

impl NamespaceView {
    pub fn from_namespace(namespace: &Namespace) -> Option<Self> {
        Some(Self {
            name: namespace.metadata.name.clone()?,
            labels: namespace.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

impl PodView {
    /// `None` for a pod that cannot be a source: on the host's network
    /// (its address is the node's), finished (its address may already be
    /// another pod's), or without an IPv4 address yet.
    ///
    /// Pending pods with an address are kept: their init containers send
    /// traffic too.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let mut addresses: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .chain(status.pod_ip.as_deref())
            .filter_map(|text| text.trim().parse::<IpAddr>().ok())
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        if addresses.is_empty() {
            return None;
        }
        Some(Self {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            addresses,
        })
    }
}

/// Whether `pod` is a Ready agent pod (`labels` all present); returns its node.
pub fn agent_pod_node(pod: &Pod, labels: &Labels) -> Option<String> {
    let pod_labels = pod.metadata.labels.as_ref()?;
    if !labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v)) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if status.phase.as_deref() != Some("Running") || !ready {
        return None;
    }
    pod.spec.as_ref()?.node_name.clone()
}

impl NodeView {
    pub fn from_node(node: &Node) -> Option<Self> {
        let name = node.metadata.name.clone()?;
        let status = node.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
        let internal: Vec<IpAddr> = status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
            .collect();
        let internal_ips: Vec<IpAddr> = [
            internal.iter().find(|a| a.is_ipv4()),
            internal.iter().find(|a| a.is_ipv6()),
        ]
        .into_iter()
        .flatten()
        .copied()
        .collect();
        let spec = node.spec.as_ref();
        let mut written: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if written.is_empty() {
            written.extend(spec.and_then(|s| s.pod_cidr.clone()));
        }
        if written.is_empty()
            && let Some(annotation) = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(OVN_K8S_NODE_SUBNETS))
        {
            written = ovn_k8s_node_subnets(annotation);
        }
        let mut pod_cidrs: Vec<IpNet> = written
            .iter()
            .filter_map(|text| text.trim().parse::<IpNet>().ok())
            .map(|net| net.trunc())
            .collect();
        pod_cidrs.sort_unstable();
        pod_cidrs.dedup();
        Some(Self {
            name,
            labels: node.metadata.labels.clone().unwrap_or_default(),
            ready,
            internal_ips,
            pod_cidrs,
        })
    }
}

/// `{"default":["10.128.2.0/23"]}`, or `{"default":"10.128.2.0/23"}` from
/// older releases: the default network's subnets.
fn ovn_k8s_node_subnets(annotation: &str) -> Vec<String> {
    let Ok(value) = serde_json::from_str::<BTreeMap<String, serde_json::Value>>(annotation) else {
        return Vec::new();
    };
    match value.get("default") {
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        Some(serde_json::Value::Array(many)) => many
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

impl Snapshot {
    /// Puts every list in a fixed order, so two snapshots of the same
    /// cluster compare equal whatever order the API listed things in.
    pub fn normalize(&mut self) {
        fn key<K: kube::Resource>(object: &K) -> (String, String) {
            let meta = object.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        }
        self.egress_gateways.sort_by_key(key);
        self.vpc_egress_gateways.sort_by_key(key);
        self.subnets.sort_by_key(key);
        self.namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        self.pods
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    }

    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        NodeAddress, NodeCondition, NodeSpec, NodeStatus, PodIP, PodSpec, PodStatus,
    };
    use kube::api::ObjectMeta;

    use super::*;
    use std::net::Ipv4Addr;

    fn pod(phase: &str, ips: &[&str], host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("shop".into()),
                labels: Some([("app".to_owned(), "web".to_owned())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                host_network: Some(host_network),
                node_name: Some("worker-1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ips.first().map(|ip| (*ip).to_owned()),
                pod_ips: Some(
                    ips.iter()
                        .map(|ip| PodIP {
                            ip: (*ip).to_owned(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn running_and_pending_pods_with_an_address_are_sources() {
        let view =
            PodView::from_pod(&pod("Running", &["10.16.0.5", "fd00::5"], false)).expect("source");
        assert_eq!(
            view.addresses,
            [
                IpAddr::V4(Ipv4Addr::new(10, 16, 0, 5)),
                "fd00::5".parse::<IpAddr>().expect("ip")
            ]
        );
        assert_eq!(view.labels["app"], "web");
        assert!(PodView::from_pod(&pod("Pending", &["10.16.0.6"], false)).is_some());
        assert!(
            PodView::from_pod(&pod("Running", &["fd00::5"], false)).is_some(),
            "IPv6-only pods too"
        );
    }

    #[test]
    fn finished_host_network_and_addressless_pods_are_not() {
        assert!(PodView::from_pod(&pod("Succeeded", &["10.16.0.5"], false)).is_none());
        assert!(PodView::from_pod(&pod("Failed", &["10.16.0.5"], false)).is_none());
        assert!(PodView::from_pod(&pod("Running", &["192.168.99.21"], true)).is_none());
        assert!(PodView::from_pod(&pod("Pending", &[], false)).is_none());
    }

    #[test]
    fn agent_pods_count_only_when_ready() {
        let labels: Labels = [("app".to_owned(), "web".to_owned())].into();
        let mut ready = pod("Running", &["192.168.99.21"], true);
        assert_eq!(
            agent_pod_node(&ready, &labels),
            None,
            "no Ready condition yet"
        );
        if let Some(status) = ready.status.as_mut() {
            status.conditions = Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]);
        }
        assert_eq!(agent_pod_node(&ready, &labels).as_deref(), Some("worker-1"));
        let other: Labels = [("app".to_owned(), "agent".to_owned())].into();
        assert_eq!(agent_pod_node(&ready, &other), None);
    }

    fn node(spec: NodeSpec, annotations: Option<BTreeMap<String, String>>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("worker-1".into()),
                annotations,
                ..Default::default()
            },
            spec: Some(spec),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "worker-1".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "fd00::21".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.168.99.21".into(),
                    },
                ]),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn node_pod_cidrs_prefer_the_list_and_keep_both_families() {
        let view = NodeView::from_node(&node(
            NodeSpec {
                pod_cidr: Some("10.244.9.0/24".into()),
                pod_cidrs: Some(vec!["10.244.1.0/24".into(), "fd00:244:1::/64".into()]),
                ..Default::default()
            },
            None,
        ))
        .expect("view");
        assert!(view.ready);
        assert_eq!(
            view.internal_ips,
            [
                IpAddr::V4(Ipv4Addr::new(192, 168, 99, 21)),
                "fd00::21".parse::<IpAddr>().expect("ip")
            ]
        );
        assert_eq!(
            view.pod_cidrs,
            ["10.244.1.0/24", "fd00:244:1::/64"].map(|c| c.parse::<IpNet>().expect("net"))
        );
    }

    #[test]
    fn node_pod_cidrs_fall_back_to_pod_cidr_then_ovn_kubernetes() {
        let single = NodeView::from_node(&node(
            NodeSpec {
                pod_cidr: Some("10.244.9.0/24".into()),
                ..Default::default()
            },
            None,
        ))
        .expect("view");
        assert_eq!(
            single.pod_cidrs,
            ["10.244.9.0/24".parse::<IpNet>().expect("net")]
        );
        for annotation in [
            r#"{"default":["10.132.0.0/23"]}"#,
            r#"{"default":"10.132.0.0/23"}"#,
        ] {
            let ovn = NodeView::from_node(&node(
                NodeSpec::default(),
                Some([(OVN_K8S_NODE_SUBNETS.to_owned(), annotation.to_owned())].into()),
            ))
            .expect("view");
            assert_eq!(
                ovn.pod_cidrs,
                ["10.132.0.0/23".parse::<IpNet>().expect("net")]
            );
        }
        let garbage = NodeView::from_node(&node(
            NodeSpec::default(),
            Some([(OVN_K8S_NODE_SUBNETS.to_owned(), "not json".to_owned())].into()),
        ))
        .expect("view");
        assert!(garbage.pod_cidrs.is_empty());
    }
}
