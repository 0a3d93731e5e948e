use std::{collections::BTreeSet, net::Ipv4Addr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, Time};

use super::*;
use crate::kubernetes::{
    crd::{BfdSpec, EgressGatewaySpec, EgressGatewayStatus},
    kubeovn::{Subnet, VegPolicy},
    snapshot::{LocalNode, NamespaceView, NodeView},
};

const GATEWAY_VM_TENANTS: &str =
    include_str!("../../../../deploy/examples/egressgateway-tenants.yaml");
const NAMESPACE_TENANTS: &str =
    include_str!("../../../../deploy/examples/egressgateway-namespaces.yaml");
const KUBEOVN_SUBNETS: &str = include_str!("../../../../deploy/examples/kubeovn-subnets.yaml");
const HARVESTER: &str = include_str!("../../../../deploy/examples/vpcegressgateway-harvester.yaml");
const GATEWAY1: &str = include_str!("../../../../deploy/examples/vpcegressgateway-gateway1.yaml");

/// Adds every object of a manifest to the snapshot, by kind.
fn load(snapshot: &mut Snapshot, manifest: &str) {
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(manifest).expect("manifest parses");
    for document in documents {
        match document["kind"].as_str() {
            Some("EgressGateway") => snapshot
                .egress_gateways
                .push(serde_json::from_value(document).expect("EgressGateway")),
            Some("VpcEgressGateway") => snapshot
                .vpc_egress_gateways
                .push(serde_json::from_value(document).expect("VpcEgressGateway")),
            Some("Subnet") => snapshot
                .subnets
                .push(serde_json::from_value(document).expect("Subnet")),
            Some("Namespace") => {
                let name = document["metadata"]["name"].as_str().expect("name");
                snapshot.namespaces.push(namespace(name, &[]));
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// As the API server makes them: with the name label every namespace gets.
fn namespace(name: &str, extra: &[(&str, &str)]) -> NamespaceView {
    let mut labels = labels(extra);
    labels.insert("kubernetes.io/metadata.name".into(), name.into());
    NamespaceView {
        name: name.into(),
        labels,
    }
}

fn pod(namespace: &str, name: &str, ip: &str, pairs: &[(&str, &str)]) -> PodView {
    PodView {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels(pairs),
        addresses: vec![ip.parse().expect("ip")],
    }
}

fn node(name: &str, pairs: &[(&str, &str)], ip: &str, cidrs: &[&str]) -> NodeView {
    let mut labels = labels(pairs);
    labels.insert("kubernetes.io/hostname".into(), name.into());
    NodeView {
        name: name.into(),
        labels,
        ready: true,
        internal_ips: vec![ip.parse().expect("ip")],
        pod_cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
    }
}

/// A gateway VM outside the cluster, in front of two workers.
fn gateway_vm() -> Snapshot {
    Snapshot {
        local: LocalNode {
            name: "gateway-vm".into(),
            labels: Labels::new(),
        },
        nodes: vec![
            node("worker-1", &[], "192.168.99.21", &["10.132.0.0/23"]),
            node("worker-2", &[], "192.168.99.22", &["10.132.2.0/23"]),
        ],
        ..Default::default()
    }
}

/// A Kube-OVN cluster seen from `local`, agents on both workers.
fn kube_ovn_cluster(local: &str) -> Snapshot {
    let nodes = vec![
        node("kube-ovn-control-plane", &[], "172.18.0.2", &[]),
        node(
            "kube-ovn-worker",
            &[("egress-gateway.io/gateway", "true")],
            "172.18.0.3",
            &[],
        ),
        node(
            "kube-ovn-worker2",
            &[("egress-gateway.io/gateway", "true")],
            "172.18.0.4",
            &[],
        ),
    ];
    let labels = nodes
        .iter()
        .find(|n| n.name == local)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    let mut snapshot = Snapshot {
        local: LocalNode {
            name: local.into(),
            labels,
        },
        nodes,
        agent_nodes: Some(BTreeSet::from([
            "kube-ovn-worker".into(),
            "kube-ovn-worker2".into(),
        ])),
        ..Default::default()
    };
    load(&mut snapshot, KUBEOVN_SUBNETS);
    snapshot
}

fn created(meta: &mut ObjectMeta, second: i64) {
    meta.creation_timestamp = Some(Time(
        Timestamp::from_second(1_700_000_000 + second).expect("time"),
    ));
}

fn egress_gateway(namespace: &str, name: &str, spec: EgressGatewaySpec) -> EgressGateway {
    let mut object = EgressGateway::new(name, spec);
    object.metadata.namespace = Some(namespace.into());
    object
}

fn blocks(egress: &str, sources: &[&str]) -> EgressGatewaySpec {
    EgressGatewaySpec {
        egress_ips: vec![egress.into()],
        ip_blocks: sources.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn report<'r>(resolved: &'r Resolved, kind: ObjectKind, namespace: &str, name: &str) -> &'r Report {
    resolved
        .report(&ObjectKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        })
        .unwrap_or_else(|| panic!("no report for {namespace}/{name}"))
}

fn eg<'r>(resolved: &'r Resolved, namespace: &str, name: &str) -> &'r Report {
    report(resolved, ObjectKind::EgressGateway, namespace, name)
}

fn veg<'r>(resolved: &'r Resolved, namespace: &str, name: &str) -> &'r Report {
    report(resolved, ObjectKind::VpcEgressGateway, namespace, name)
}

fn summary(resolved: &Resolved) -> Vec<(String, Vec<String>, Vec<String>)> {
    resolved
        .tenants
        .iter()
        .map(|t| (t.name.clone(), t.sources.clone(), t.egress_ips.clone()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn note_types(report: &Report) -> Vec<&str> {
    report.notes.iter().map(|n| n.type_.as_str()).collect()
}

/// The agent's own validation, as `run` applies it, accepts the result.
fn assert_config_accepts(resolved: Resolved) {
    let mut config = placeholder_config(resolved.tenants).expect("placeholder parses");
    config.return_routes = resolved
        .return_routes
        .iter()
        .map(ReturnRoute::to_config)
        .collect();
    config.bfd.peers = resolved.bfd_peers.iter().map(BfdPeer::to_config).collect();
    let problems = config.plan().err().unwrap_or_default();
    let about_tenants: Vec<_> = problems
        .iter()
        .filter(|p| !p.field.starts_with("interfaces"))
        .collect();
    assert!(about_tenants.is_empty(), "{about_tenants:?}");
}

#[test]
fn gateway_vm_seed_serves_both_tenants_with_their_own_ip() {
    let mut snapshot = gateway_vm();
    load(&mut snapshot, GATEWAY_VM_TENANTS);
    let resolved = resolve(&snapshot);
    assert_eq!(
        summary(&resolved),
        [
            (
                "tenant-a.tenant-a".into(),
                strings(&["172.20.10.0/24"]),
                strings(&["192.168.31.101"])
            ),
            (
                "tenant-b.tenant-b".into(),
                strings(&["172.20.20.0/24"]),
                strings(&["192.168.31.150"])
            ),
        ]
    );
    assert_eq!(resolved.tenants[0].ports, None);
    assert_eq!(
        resolved.tenants[1].ports,
        Some(PortRange {
            min: 20000,
            max: 29999
        })
    );
    assert!(resolved.outside_cluster);
    let a = eg(&resolved, "tenant-a", "tenant-a");
    assert!(a.ready && a.served_here, "{a:?}");
    assert_eq!(a.reason, reason::SERVING);
    assert_eq!(a.node.as_deref(), Some("gateway-vm"));
    assert!(a.notes.is_empty());
    assert_eq!(
        resolved.return_routes,
        [
            ReturnRoute {
                destination: "10.132.0.0/23".parse().expect("net"),
                via: IpAddr::V4(Ipv4Addr::new(192, 168, 99, 21))
            },
            ReturnRoute {
                destination: "10.132.2.0/23".parse().expect("net"),
                via: IpAddr::V4(Ipv4Addr::new(192, 168, 99, 22))
            },
        ]
    );
    assert_config_accepts(resolved);
}

#[test]
fn harvester_seed_resolves_subnets_to_their_cidr_blocks() {
    let mut snapshot = kube_ovn_cluster("kube-ovn-worker");
    load(&mut snapshot, HARVESTER);
    let resolved = resolve(&snapshot);
    assert_eq!(
        summary(&resolved),
        [
            (
                "veg:tenant-a.egress-tenant-a".into(),
                strings(&["172.20.10.0/24"]),
                strings(&["192.168.31.101"])
            ),
            (
                "veg:tenant-b.egress-tenant-b".into(),
                strings(&["172.20.20.0/24"]),
                strings(&["192.168.31.150"])
            ),
        ]
    );
    let a = veg(&resolved, "tenant-a", "egress-tenant-a");
    assert!(a.ready && a.served_here);
    assert!(a.notes.is_empty(), "{:?}", a.notes);
    assert!(!resolved.outside_cluster);
    assert_config_accepts(resolved);
}

#[test]
fn kube_ovn_gateway1_seed_is_served_on_its_node_with_replicas_reported() {
    let mut snapshot = kube_ovn_cluster("kube-ovn-worker");
    load(&mut snapshot, GATEWAY1);
    let resolved = resolve(&snapshot);
    assert_eq!(
        summary(&resolved),
        [(
            "veg:default.gateway1".into(),
            strings(&["10.16.0.0/16"]),
            strings(&["172.17.0.10", "172.17.0.11"])
        )]
    );
    let report = veg(&resolved, "default", "gateway1");
    assert_eq!(note_types(report), ["ReplicasIgnored"]);
    assert_eq!(report.notes[0].reason, "SingleInstance");

    // The other worker agrees on who serves it and serves nothing itself.
    let mut elsewhere = kube_ovn_cluster("kube-ovn-worker2");
    load(&mut elsewhere, GATEWAY1);
    let resolved = resolve(&elsewhere);
    assert!(resolved.tenants.is_empty());
    let report = veg(&resolved, "default", "gateway1");
    assert!(report.ready && !report.served_here);
    assert_eq!(report.node.as_deref(), Some("kube-ovn-worker"));
}

#[test]
fn kube_ovn_gateway1_without_external_ips_is_not_ready() {
    let mut snapshot = kube_ovn_cluster("kube-ovn-worker");
    load(&mut snapshot, GATEWAY1);
    let spec = &mut snapshot.vpc_egress_gateways[0].spec;
    spec.external_ips.clear();
    spec.node_selector.clear();
    spec.replicas = Some(1);
    let resolved = resolve(&snapshot);
    assert!(resolved.tenants.is_empty());
    let report = veg(&resolved, "default", "gateway1");
    assert!(!report.ready);
    assert_eq!(report.reason, reason::NO_EGRESS_IPS);
}

fn namespace_cluster(local: &str) -> Snapshot {
    let mut snapshot = Snapshot {
        local: LocalNode {
            name: local.into(),
            labels: Labels::new(),
        },
        nodes: vec![
            node(
                "gw-1",
                &[("egress-gateway.io/gateway", "true")],
                "192.168.99.31",
                &[],
            ),
            node(
                "gw-2",
                &[("egress-gateway.io/gateway", "true")],
                "192.168.99.32",
                &[],
            ),
            node("worker-1", &[], "192.168.99.21", &[]),
        ],
        agent_nodes: Some(BTreeSet::from([
            "gw-1".into(),
            "gw-2".into(),
            "worker-1".into(),
        ])),
        ..Default::default()
    };
    snapshot.local.labels = snapshot
        .node(local)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    load(&mut snapshot, NAMESPACE_TENANTS);
    snapshot.namespaces.push(namespace("default", &[]));
    snapshot.pods = vec![
        pod("ns-blue", "api-0", "10.128.0.10", &[("app", "api")]),
        pod("ns-blue", "api-1", "10.128.1.11", &[("app", "api")]),
        pod(
            "ns-red",
            "business-app-0",
            "10.128.0.20",
            &[("app", "business-app")],
        ),
        pod("ns-red", "cache-0", "10.128.0.21", &[("app", "cache")]),
        // Same labels in another namespace: a podSelector alone selects in
        // the gateway's own namespace.
        pod(
            "default",
            "business-app-9",
            "10.128.0.99",
            &[("app", "business-app")],
        ),
    ];
    snapshot
}

#[test]
fn namespace_and_pod_selectors_pick_pod_addresses() {
    let resolved = resolve(&namespace_cluster("gw-1"));
    assert_eq!(
        summary(&resolved),
        [
            (
                "ns-blue.blue".into(),
                strings(&["10.128.0.10/32", "10.128.1.11/32"]),
                strings(&["192.168.55.113"])
            ),
            (
                "ns-red.red".into(),
                strings(&["10.128.0.20/32"]),
                strings(&["192.168.55.114"])
            ),
        ]
    );
    assert_eq!(eg(&resolved, "ns-blue", "blue").matched_pods, 2);
    assert_eq!(eg(&resolved, "ns-red", "red").matched_pods, 1);
    assert_config_accepts(resolved);
}

#[test]
fn pod_churn_and_label_changes_follow_the_cluster() {
    let mut snapshot = namespace_cluster("gw-1");
    // A pod starts, another finishes (the watcher drops finished pods).
    snapshot
        .pods
        .push(pod("ns-blue", "api-2", "10.128.2.12", &[("app", "api")]));
    snapshot.pods.retain(|p| p.name != "api-0");
    // The cache becomes part of the business app, the app pod leaves it.
    for pod in &mut snapshot.pods {
        match pod.name.as_str() {
            "cache-0" => {
                pod.labels.insert("app".into(), "business-app".into());
            }
            "business-app-0" => {
                pod.labels.insert("app".into(), "retired".into());
            }
            _ => {}
        }
    }
    let resolved = resolve(&snapshot);
    assert_eq!(
        resolved.tenants[0].sources,
        ["10.128.1.11/32", "10.128.2.12/32"]
    );
    assert_eq!(resolved.tenants[1].sources, ["10.128.0.21/32"]);

    // The namespace no longer matches: blue has no sources left, and says so.
    for namespace in &mut snapshot.namespaces {
        if namespace.name == "ns-blue" {
            namespace
                .labels
                .insert("kubernetes.io/metadata.name".into(), "renamed".into());
        }
    }
    let resolved = resolve(&snapshot);
    let blue = eg(&resolved, "ns-blue", "blue");
    assert!(!blue.ready);
    assert_eq!(blue.reason, reason::NO_SOURCES);
    assert_eq!(blue.matched_pods, 0);
    assert_eq!(summary(&resolved).len(), 1);
}

#[test]
fn one_ready_node_running_the_agent_serves_each_gateway() {
    // gw-1 comes first by name, so gw-2 serves nothing.
    let resolved = resolve(&namespace_cluster("gw-2"));
    assert!(resolved.tenants.is_empty());
    let blue = eg(&resolved, "ns-blue", "blue");
    assert_eq!(blue.node.as_deref(), Some("gw-1"));
    assert!(blue.ready && !blue.served_here);

    // gw-1 stops being Ready (or its agent does): gw-2 takes over.
    let mut snapshot = namespace_cluster("gw-2");
    snapshot.nodes[0].ready = false;
    assert_eq!(resolve(&snapshot).tenants.len(), 2);
    let mut snapshot = namespace_cluster("gw-2");
    snapshot.agent_nodes = Some(BTreeSet::from(["gw-2".into()]));
    assert_eq!(resolve(&snapshot).tenants.len(), 2);

    // Once the status names gw-2, it keeps the gateway when gw-1 is back.
    let mut snapshot = namespace_cluster("gw-2");
    snapshot.egress_gateways[0].status = Some(EgressGatewayStatus {
        node: Some("gw-2".into()),
        ..Default::default()
    });
    let resolved = resolve(&snapshot);
    assert_eq!(summary(&resolved)[0].0, "ns-blue.blue");
    assert_eq!(eg(&resolved, "ns-red", "red").node.as_deref(), Some("gw-1"));
}

#[test]
fn a_node_selector_nothing_matches_contributes_nothing() {
    let mut snapshot = namespace_cluster("worker-1");
    let resolved = resolve(&snapshot);
    assert!(
        resolved.tenants.is_empty(),
        "worker-1 lacks the gateway label"
    );

    for object in &mut snapshot.egress_gateways {
        object.spec.node_selector = [("disk".to_owned(), "nvme".to_owned())].into();
    }
    let resolved = resolve(&snapshot);
    let blue = eg(&resolved, "ns-blue", "blue");
    assert!(!blue.ready);
    assert_eq!(blue.reason, reason::NO_GATEWAY_NODE);
    assert_eq!(blue.node, None);

    // Outside the cluster the gateway's own labels decide.
    let mut vm = gateway_vm();
    load(&mut vm, GATEWAY_VM_TENANTS);
    vm.egress_gateways[0].spec.node_selector = [("site".to_owned(), "dc-2".to_owned())].into();
    let resolved = resolve(&vm);
    assert_eq!(summary(&resolved).len(), 1);
    assert_eq!(
        eg(&resolved, "tenant-a", "tenant-a").reason,
        reason::NODE_NOT_SELECTED
    );
    vm.local.labels.insert("site".into(), "dc-2".into());
    assert_eq!(resolve(&vm).tenants.len(), 2);
}

#[test]
fn kube_ovn_node_selector_terms_and_bad_selectors() {
    let mut snapshot = kube_ovn_cluster("kube-ovn-worker2");
    load(&mut snapshot, GATEWAY1);
    snapshot.vpc_egress_gateways[0].spec.node_selector[0].match_labels = [(
        "kubernetes.io/hostname".to_owned(),
        "kube-ovn-worker2".to_owned(),
    )]
    .into();
    assert_eq!(resolve(&snapshot).tenants.len(), 1);

    snapshot.vpc_egress_gateways[0].spec.node_selector[0].match_expressions =
        vec![LabelSelectorRequirement {
            key: "zone".into(),
            operator: "Near".into(),
            values: Some(vec!["a".into()]),
        }];
    let resolved = resolve(&snapshot);
    let report = veg(&resolved, "default", "gateway1");
    assert_eq!(report.reason, reason::INVALID_SELECTOR);
    assert!(report.message.contains("Near"), "{}", report.message);
}

#[test]
fn the_older_object_keeps_a_contested_egress_ip() {
    let mut snapshot = kube_ovn_cluster("kube-ovn-worker");
    load(&mut snapshot, HARVESTER);
    load(&mut snapshot, GATEWAY_VM_TENANTS);
    // The Kube-OVN gateway is older: the EgressGateway for the same tenant
    // is refused, not merged.
    created(&mut snapshot.vpc_egress_gateways[0].metadata, 0);
    created(&mut snapshot.egress_gateways[0].metadata, 10);
    created(&mut snapshot.vpc_egress_gateways[1].metadata, 20);
    created(&mut snapshot.egress_gateways[1].metadata, 5);
    let resolved = resolve(&snapshot);
    let names: Vec<String> = resolved.tenants.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, ["veg:tenant-a.egress-tenant-a", "tenant-b.tenant-b"]);
    let loser = eg(&resolved, "tenant-a", "tenant-a");
    assert!(!loser.ready);
    assert_eq!(loser.reason, reason::EGRESS_IP_CONFLICT);
    assert!(
        loser
            .message
            .contains("VpcEgressGateway tenant-a/egress-tenant-a"),
        "{}",
        loser.message
    );
    assert_eq!(
        veg(&resolved, "tenant-b", "egress-tenant-b").reason,
        reason::EGRESS_IP_CONFLICT
    );
    assert_config_accepts(resolved);
}

#[test]
fn creation_time_ties_are_broken_by_name() {
    let mut snapshot = gateway_vm();
    snapshot.egress_gateways = vec![
        egress_gateway("ns", "zeta", blocks("192.168.31.5", &["10.1.0.0/16"])),
        egress_gateway("ns", "alpha", blocks("192.168.31.5", &["10.2.0.0/16"])),
    ];
    for object in &mut snapshot.egress_gateways {
        created(&mut object.metadata, 7);
    }
    let resolved = resolve(&snapshot);
    assert_eq!(summary(&resolved)[0].0, "ns.alpha");
    assert_eq!(
        eg(&resolved, "ns", "zeta").reason,
        reason::EGRESS_IP_CONFLICT
    );
}

#[test]
fn overlapping_sources_are_refused_for_the_later_object() {
    let mut snapshot = gateway_vm();
    snapshot.egress_gateways = vec![
        egress_gateway("a", "wide", blocks("192.168.31.1", &["10.0.0.0/8"])),
        egress_gateway(
            "b",
            "narrow",
            blocks("192.168.31.2", &["10.20.0.0/16", "172.16.0.0/12"]),
        ),
        egress_gateway("c", "disjoint", blocks("192.168.31.3", &["11.0.0.0/8"])),
    ];
    for (i, object) in snapshot.egress_gateways.iter_mut().enumerate() {
        created(&mut object.metadata, i64::try_from(i).expect("small"));
    }
    let resolved = resolve(&snapshot);
    let narrow = eg(&resolved, "b", "narrow");
    assert_eq!(narrow.reason, reason::SOURCE_CONFLICT);
    assert!(
        narrow.message.contains("10.20.0.0/16 overlaps 10.0.0.0/8"),
        "{}",
        narrow.message
    );
    assert_eq!(summary(&resolved).len(), 2);
    assert_config_accepts(resolved);
}

#[test]
fn a_pod_selected_by_two_gateways_stays_with_the_first() {
    let mut snapshot = namespace_cluster("gw-1");
    created(&mut snapshot.egress_gateways[0].metadata, 0);
    let mut greedy = egress_gateway(
        "ns-red",
        "greedy",
        EgressGatewaySpec {
            egress_ips: vec!["192.168.55.200".into()],
            namespace_selector: Some(LabelSelector::default()),
            ..Default::default()
        },
    );
    created(&mut greedy.metadata, 100);
    snapshot.egress_gateways.push(greedy);
    let resolved = resolve(&snapshot);
    let greedy = eg(&resolved, "ns-red", "greedy");
    assert_eq!(greedy.reason, reason::SOURCE_CONFLICT);
    assert_eq!(greedy.matched_pods, 5, "{{}} selects every namespace");
    assert_eq!(summary(&resolved).len(), 2);
}

#[test]
fn an_egress_ip_inside_another_tenants_sources_is_a_conflict() {
    let mut snapshot = gateway_vm();
    snapshot.egress_gateways = vec![
        egress_gateway("a", "lan", blocks("192.168.31.1", &["10.0.0.0/24"])),
        egress_gateway("b", "odd", blocks("10.0.0.7", &["10.9.0.0/24"])),
    ];
    created(&mut snapshot.egress_gateways[0].metadata, 0);
    created(&mut snapshot.egress_gateways[1].metadata, 1);
    let resolved = resolve(&snapshot);
    let odd = eg(&resolved, "b", "odd");
    assert_eq!(odd.reason, reason::EGRESS_IP_CONFLICT);
    assert!(
        odd.message.contains("lies inside 10.0.0.0/24"),
        "{}",
        odd.message
    );
}

#[test]
fn a_gateway_without_pods_still_holds_its_egress_ip() {
    let mut snapshot = namespace_cluster("gw-1");
    snapshot.pods.retain(|p| p.namespace != "ns-blue");
    created(&mut snapshot.egress_gateways[0].metadata, 0);
    let mut later = egress_gateway(
        "default",
        "later",
        blocks("192.168.55.113", &["10.50.0.0/16"]),
    );
    created(&mut later.metadata, 50);
    snapshot.egress_gateways.push(later);
    let resolved = resolve(&snapshot);
    assert_eq!(eg(&resolved, "ns-blue", "blue").reason, reason::NO_SOURCES);
    assert_eq!(
        eg(&resolved, "default", "later").reason,
        reason::EGRESS_IP_CONFLICT
    );
}

#[test]
fn unresolvable_subnets_are_reported() {
    let mut snapshot = kube_ovn_cluster("kube-ovn-worker");
    load(&mut snapshot, HARVESTER);
    snapshot.vpc_egress_gateways[0].spec.policies[0].subnets = vec!["missing".into()];
    snapshot.subnets.push(Subnet::new(
        "v6-only",
        crate::kubernetes::kubeovn::SubnetSpec {
            cidr_block: Some("fd00:20::/64".into()),
            ..Default::default()
        },
    ));
    snapshot.vpc_egress_gateways[1].spec.policies[0].subnets = vec!["v6-only".into()];
    let resolved = resolve(&snapshot);
    assert!(resolved.tenants.is_empty());
    let missing = veg(&resolved, "tenant-a", "egress-tenant-a");
    assert_eq!(missing.reason, reason::UNRESOLVED_SUBNET);
    assert!(
        missing.message.contains("subnet missing does not exist"),
        "{}",
        missing.message
    );
    // An IPv6 subnet behind IPv4 externalIPs only: nothing to translate
    // it with, and the report says why.
    let v6 = veg(&resolved, "tenant-b", "egress-tenant-b");
    assert_eq!(v6.reason, reason::NO_SOURCES);
    assert_eq!(note_types(v6), ["SourcesIgnored"]);
    assert!(
        v6.notes[0]
            .message
            .contains("fd00:20::/64) not translated: no IPv6 egress IP"),
        "{}",
        v6.notes[0].message
    );

    // Once the subnet exists the gateway is served; a dual-stack subnet
    // behind IPv4 externalIPs gives its IPv4 part.
    snapshot.subnets.push(Subnet::new(
        "missing",
        crate::kubernetes::kubeovn::SubnetSpec {
            cidr_block: Some("172.30.0.0/16,fd00:30::/64".into()),
            ..Default::default()
        },
    ));
    let resolved = resolve(&snapshot);
    assert_eq!(resolved.tenants[0].sources, ["172.30.0.0/16"]);
    assert_eq!(
        note_types(veg(&resolved, "tenant-a", "egress-tenant-a")),
        ["SourcesIgnored"]
    );
}

#[test]
fn what_the_dataplane_cannot_honour_is_reported_as_conditions() {
    let mut snapshot = kube_ovn_cluster("kube-ovn-worker");
    load(&mut snapshot, HARVESTER);
    let spec = &mut snapshot.vpc_egress_gateways[0].spec;
    spec.traffic_policy = Some("Local".into());
    spec.internal_ips = vec!["172.20.10.250".into()];
    spec.external_ips = vec!["192.168.31.101,fd00:31::101".into()];
    spec.bfd = Some(crate::kubernetes::kubeovn::VegBfd {
        enabled: true,
        ..Default::default()
    });
    spec.policies.push(VegPolicy {
        snat: false,
        ip_blocks: vec!["172.21.0.0/16".into()],
        ..Default::default()
    });
    spec.policies.push(VegPolicy {
        snat: true,
        ip_blocks: vec!["172.22.0.1/16".into(), "fd00:22::/64".into()],
        ..Default::default()
    });
    let resolved = resolve(&snapshot);
    let report = veg(&resolved, "tenant-a", "egress-tenant-a");
    assert!(report.ready, "{report:?}");
    assert_eq!(
        note_types(report),
        [
            "InternalIPsIgnored",
            "TrafficPolicyIgnored",
            "BfdIgnored",
            "PoliciesIgnored",
        ]
    );
    let policies = &report.notes[3];
    assert_eq!(policies.reason, "SnatDisabled");
    assert!(
        policies.message.contains("policies[1]"),
        "{}",
        policies.message
    );
    // Host bits of a Kube-OVN block are masked, as OVN does; the
    // "IPv4,IPv6" external IP pair serves both families.
    assert_eq!(
        resolved.tenants[0].sources,
        ["172.20.10.0/24", "172.22.0.0/16", "fd00:22::/64"]
    );
    assert_eq!(
        resolved.tenants[0].egress_ips,
        ["192.168.31.101", "fd00:31::101"]
    );
    let conditions = report.conditions();
    assert_eq!(conditions[0].type_, "Ready");
    assert!(conditions[1..].iter().all(|c| c.status));
}

#[test]
fn a_gateway_scaled_to_zero_is_off() {
    let mut snapshot = kube_ovn_cluster("kube-ovn-worker");
    load(&mut snapshot, HARVESTER);
    snapshot.vpc_egress_gateways[0].spec.replicas = Some(0);
    let resolved = resolve(&snapshot);
    assert_eq!(
        veg(&resolved, "tenant-a", "egress-tenant-a").reason,
        reason::SCALED_TO_ZERO
    );
    assert_eq!(resolved.tenants.len(), 1);
}

#[test]
fn invalid_specs_are_refused_with_the_field_named() {
    let mut snapshot = gateway_vm();
    let mut too_many = blocks("192.168.31.1", &["10.1.0.0/16"]);
    too_many.egress_ips = (1..=9).map(|i| format!("192.168.31.{i}")).collect();
    snapshot.egress_gateways = vec![
        egress_gateway("a", "multicast", blocks("224.0.0.5", &["10.0.0.0/16"])),
        egress_gateway("a", "host-bits", blocks("192.168.31.2", &["10.3.0.1/16"])),
        egress_gateway("a", "too-many", too_many),
        egress_gateway("a", "wrong-family", blocks("fd00::1", &["10.4.0.0/16"])),
        egress_gateway("a", "not-an-ip", blocks("gateway", &["10.7.0.0/16"])),
        egress_gateway(
            "a",
            "ports",
            EgressGatewaySpec {
                ports: Some(crate::kubernetes::crd::PortRangeSpec {
                    min: 3000,
                    max: 2000,
                }),
                ..blocks("192.168.31.20", &["10.5.0.0/16"])
            },
        ),
        egress_gateway(
            "a",
            "burst",
            EgressGatewaySpec {
                new_flow_burst: Some(5),
                ..blocks("192.168.31.21", &["10.6.0.0/16"])
            },
        ),
    ];
    let resolved = resolve(&snapshot);
    assert!(resolved.tenants.is_empty());
    for (name, field) in [
        ("multicast", "spec.egressIPs[0]"),
        ("host-bits", "spec.ipBlocks[0]"),
        ("too-many", "spec.egressIPs"),
        ("wrong-family", "spec.egressIPs: the IPv4 sources need"),
        (
            "not-an-ip",
            "spec.egressIPs[0]: \"gateway\" is not an IPv4 or IPv6",
        ),
        ("ports", "spec.ports"),
        ("burst", "spec.newFlowBurst"),
    ] {
        let report = eg(&resolved, "a", name);
        assert_eq!(report.reason, reason::INVALID_SPEC, "{name}");
        assert!(
            report.message.starts_with(field),
            "{name}: {}",
            report.message
        );
    }
    assert!(
        eg(&resolved, "a", "host-bits")
            .message
            .contains("did you mean 10.3.0.0/16"),
        "the configuration's own message"
    );
}

/// Dual-stack pods and blocks: each family leaves from the gateway's
/// egress IP of that family; a gateway with IPv4 egress IPs only serves
/// its pods' IPv4 addresses and says what it leaves out.
#[test]
fn dual_stack_gateways_translate_each_family_and_say_what_they_cannot() {
    let mut snapshot = namespace_cluster("gw-1");
    for pod in &mut snapshot.pods {
        let v4: std::net::Ipv4Addr = pod.addresses[0].to_string().parse().expect("v4");
        let [_, _, c, d] = v4.octets();
        pod.addresses
            .push(format!("fd00:128:{c}::{d:x}").parse().expect("v6"));
    }
    // Blue gets an IPv6 egress IP and block; red keeps IPv4 only.
    let blue = &mut snapshot.egress_gateways[0].spec;
    blue.egress_ips.push("2001:db8:55::113".into());
    blue.ip_blocks.push("fd00:129::/64".into());
    let resolved = resolve(&snapshot);
    assert_eq!(
        summary(&resolved),
        [
            (
                "ns-blue.blue".into(),
                strings(&[
                    "10.128.0.10/32",
                    "10.128.1.11/32",
                    "fd00:128:0::a/128",
                    "fd00:128:1::b/128",
                    "fd00:129::/64"
                ])
                .into_iter()
                .map(|s| s.parse::<IpNet>().expect("net").to_string())
                .collect(),
                strings(&["192.168.55.113", "2001:db8:55::113"])
            ),
            (
                "ns-red.red".into(),
                strings(&["10.128.0.20/32"]),
                strings(&["192.168.55.114"])
            ),
        ]
    );
    let red = eg(&resolved, "ns-red", "red");
    assert!(red.ready, "{red:?}");
    assert_eq!(note_types(red), ["SourcesIgnored"]);
    assert_eq!(
        red.notes[0].message,
        "1 pod prefix is (fd00:128::14/128) not translated: no IPv6 egress IP"
    );
    assert_eq!(
        eg(&resolved, "ns-blue", "blue").egress_ips,
        [
            "192.168.55.113".parse::<IpAddr>().expect("ip"),
            "2001:db8:55::113".parse().expect("ip")
        ]
    );
    assert_config_accepts(resolved);

    // A later object (by name: neither has a creation time) claiming blue's IPv6 egress IP, or a prefix inside
    // its IPv6 block, is refused as for IPv4.
    snapshot.egress_gateways.push(egress_gateway(
        "zz-later",
        "copy-ip",
        blocks("2001:db8:55::113", &["fd00:77::/64"]),
    ));
    snapshot.egress_gateways.push(egress_gateway(
        "zz-later",
        "copy-block",
        blocks("2001:db8:55::200", &["fd00:129::/80"]),
    ));
    let resolved = resolve(&snapshot);
    let copy_ip = eg(&resolved, "zz-later", "copy-ip");
    assert_eq!(copy_ip.reason, reason::EGRESS_IP_CONFLICT);
    assert!(
        copy_ip
            .message
            .contains("2001:db8:55::113 is already an egress IP of"),
        "{}",
        copy_ip.message
    );
    let copy_block = eg(&resolved, "zz-later", "copy-block");
    assert_eq!(copy_block.reason, reason::SOURCE_CONFLICT);
    assert!(
        copy_block
            .message
            .contains("fd00:129::/80 overlaps fd00:129::/64"),
        "{}",
        copy_block.message
    );
}

#[test]
fn invalid_label_selectors_are_reported() {
    let mut snapshot = namespace_cluster("gw-1");
    snapshot.egress_gateways[1].spec.pod_selector = Some(LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: "In".into(),
            values: None,
        }]),
        ..Default::default()
    });
    let resolved = resolve(&snapshot);
    let red = eg(&resolved, "ns-red", "red");
    assert_eq!(red.reason, reason::INVALID_SELECTOR);
    assert!(red.message.starts_with("podSelector"), "{}", red.message);
}

#[test]
fn gateways_of_one_node_must_agree_on_the_external_interface() {
    let mut snapshot = gateway_vm();
    load(&mut snapshot, GATEWAY_VM_TENANTS);
    created(&mut snapshot.egress_gateways[0].metadata, 0);
    created(&mut snapshot.egress_gateways[1].metadata, 1);
    snapshot.egress_gateways[0].spec.external_interface = Some("eth2".into());
    let resolved = resolve(&snapshot);
    assert_eq!(resolved.external_interface.as_deref(), Some("eth2"));
    assert_eq!(
        resolved.tenants.len(),
        2,
        "no interface named is no disagreement"
    );

    snapshot.egress_gateways[1].spec.external_interface = Some("eth3".into());
    let resolved = resolve(&snapshot);
    assert_eq!(
        eg(&resolved, "tenant-b", "tenant-b").reason,
        reason::EXTERNAL_INTERFACE_CONFLICT
    );
    assert_eq!(resolved.tenants.len(), 1);
}

#[test]
fn bfd_peers_come_from_served_gateways() {
    let mut snapshot = namespace_cluster("gw-1");
    created(&mut snapshot.egress_gateways[0].metadata, 0);
    created(&mut snapshot.egress_gateways[1].metadata, 1);
    let resolved = resolve(&snapshot);
    assert_eq!(
        resolved.bfd_peers,
        [BfdPeer {
            address: Ipv4Addr::new(192, 168, 99, 1).into(),
            min_rx_ms: 300,
            min_tx_ms: 300,
            multiplier: 3,
            tenants: vec!["ns-blue.blue".into()],
        }]
    );

    // Red asks for the same router with default timers: one session, and
    // red is told its timers are not used.
    snapshot.egress_gateways[1].spec.bfd = Some(BfdSpec {
        enabled: true,
        peers: vec!["192.168.99.1".into()],
        ..Default::default()
    });
    let resolved = resolve(&snapshot);
    assert_eq!(resolved.bfd_peers.len(), 1);
    assert_eq!(
        resolved.bfd_peers[0].tenants,
        ["ns-blue.blue", "ns-red.red"]
    );
    assert_eq!(
        note_types(eg(&resolved, "ns-red", "red")),
        ["BfdTimersIgnored"]
    );

    // Enabled without peers is reported; a gateway served elsewhere adds none.
    snapshot.egress_gateways[1].spec.bfd = Some(BfdSpec {
        enabled: true,
        ..Default::default()
    });
    let resolved = resolve(&snapshot);
    assert_eq!(note_types(eg(&resolved, "ns-red", "red")), ["BfdIgnored"]);
    let resolved = resolve(&namespace_cluster("gw-2"));
    assert!(resolved.bfd_peers.is_empty());
}

#[test]
fn tenant_names_are_stable_distinct_and_accepted() {
    assert_eq!(
        tenant_name(ObjectKind::EgressGateway, "shop", "web"),
        "shop.web"
    );
    assert_eq!(
        tenant_name(ObjectKind::VpcEgressGateway, "shop", "web"),
        "veg:shop.web"
    );
    let namespace = "n".repeat(63);
    let long_a = format!("{}-a", "x".repeat(200));
    let long_b = format!("{}-b", "x".repeat(200));
    let a = tenant_name(ObjectKind::EgressGateway, &namespace, &long_a);
    let b = tenant_name(ObjectKind::EgressGateway, &namespace, &long_b);
    assert!(a.len() < TENANT_NAME_LEN && b.len() < TENANT_NAME_LEN);
    assert_ne!(a, b);
    assert_eq!(
        a,
        tenant_name(ObjectKind::EgressGateway, &namespace, &long_a)
    );

    let mut snapshot = gateway_vm();
    snapshot.egress_gateways = vec![
        egress_gateway(
            &namespace,
            &long_a,
            blocks("192.168.31.1", &["10.1.0.0/16"]),
        ),
        egress_gateway(
            &namespace,
            &long_b,
            blocks("192.168.31.2", &["10.2.0.0/16"]),
        ),
    ];
    let resolved = resolve(&snapshot);
    assert_eq!(resolved.tenants.len(), 2);
    assert_config_accepts(resolved);
}

#[test]
fn return_routes_skip_this_node_and_report_oddities() {
    let mut snapshot = namespace_cluster("gw-1");
    snapshot.nodes = vec![
        node("gw-1", &[], "192.168.99.31", &["10.132.4.0/23"]),
        node("worker-1", &[], "192.168.99.21", &["10.132.0.0/23"]),
        node("worker-2", &[], "192.168.99.22", &["10.132.0.0/23"]),
        NodeView {
            internal_ips: Vec::new(),
            ..node("worker-3", &[], "192.168.99.23", &["10.132.6.0/23"])
        },
        // Dual-stack: each pod CIDR via the node's address of its family;
        // an IPv6 CIDR on a node with no IPv6 address is reported.
        NodeView {
            internal_ips: vec![
                "192.168.99.24".parse().expect("ip"),
                "fd00:99::24".parse().expect("ip"),
            ],
            ..node(
                "worker-4",
                &[],
                "192.168.99.24",
                &["10.132.8.0/23", "fd00:132:8::/64"],
            )
        },
        node("worker-5", &[], "192.168.99.25", &["fd00:132:a::/64"]),
    ];
    let resolved = resolve(&snapshot);
    assert_eq!(
        resolved.return_routes,
        [
            ReturnRoute {
                destination: "10.132.0.0/23".parse().expect("net"),
                via: "192.168.99.21".parse().expect("ip")
            },
            ReturnRoute {
                destination: "10.132.8.0/23".parse().expect("net"),
                via: "192.168.99.24".parse().expect("ip")
            },
            ReturnRoute {
                destination: "fd00:132:8::/64".parse().expect("net"),
                via: "fd00:99::24".parse().expect("ip")
            },
        ]
    );
    assert_eq!(resolved.warnings.len(), 3, "{:?}", resolved.warnings);
    assert!(
        resolved
            .warnings
            .iter()
            .any(|w| w
                == "node worker-5 has the IPv6 pod CIDR fd00:132:a::/64 but no IPv6 InternalIP"),
        "{:?}",
        resolved.warnings
    );
}

#[test]
fn sources_of_one_object_are_merged_not_refused() {
    let mut snapshot = namespace_cluster("gw-1");
    // Blue's block covers one of its own pods, and lists a prefix twice.
    snapshot.egress_gateways[0].spec.ip_blocks =
        vec!["10.128.0.0/24".into(), "10.128.0.0/24".into()];
    let resolved = resolve(&snapshot);
    assert_eq!(
        resolved.tenants[0].sources,
        ["10.128.0.0/24", "10.128.1.11/32"]
    );
    assert_config_accepts(resolved);
}

#[test]
fn dataplane_equality_ignores_reports() {
    let snapshot = namespace_cluster("gw-1");
    let first = resolve(&snapshot);
    let mut again = resolve(&snapshot);
    again.reports.clear();
    assert!(first.dataplane_eq(&again));
    let mut changed = namespace_cluster("gw-1");
    changed.pods.pop();
    changed
        .pods
        .push(pod("ns-blue", "api-3", "10.128.3.13", &[("app", "api")]));
    assert!(!first.dataplane_eq(&resolve(&changed)));
}

#[test]
fn an_empty_cluster_resolves_to_nothing() {
    let resolved = resolve(&Snapshot::default());
    assert!(resolved.tenants.is_empty() && resolved.reports.is_empty());
    assert!(resolved.outside_cluster);
}

#[test]
fn port_forwards_and_floating_ips_come_from_the_object() {
    let mut snapshot = gateway_vm();
    let mut spec = blocks("192.168.31.101", &["172.20.10.0/24"]);
    spec.port_forwards = vec![crate::kubernetes::crd::PortForwardSpec {
        egress_ip: "192.168.31.101".into(),
        protocol: "tcp".into(),
        port: 8888,
        to: "172.20.10.2:80".into(),
    }];
    spec.floating_ips = vec![crate::kubernetes::crd::FloatingIpSpec {
        address: "192.168.31.201".into(),
        host: "172.20.10.3".into(),
    }];
    snapshot
        .egress_gateways
        .push(egress_gateway("tenant-a", "web", spec));
    let resolved = resolve(&snapshot);
    let tenant = &resolved.tenants[0];
    assert_eq!(tenant.port_forwards.len(), 1);
    assert_eq!(tenant.port_forwards[0].to, "172.20.10.2:80");
    assert_eq!(tenant.floating_ips[0].address, "192.168.31.201");
    assert_config_accepts(resolved);
}
