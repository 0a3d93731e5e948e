//! Kubernetes mode end to end: the real agent binary watches an in-process
//! API server (tests/src/apiserver.rs, the real HTTP protocol) that holds
//! the deploy/examples fixtures, and its maps, addresses and routes in the
//! gateway namespace follow the objects: pod churn and label changes, node
//! churn, status written back, an outage with changes and a 410 relist
//! after it. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use egress_tests::{
    agent::Agent,
    apiserver::FakeApiServer,
    netns::Netns,
    require_root,
    topology::{EGRESS_A, EGRESS_A_V6, EGRESS_B, HOST_A, HOST_B, SERVER, SERVER_V6, Topology},
    traffic::{udp_echo_server, udp_request},
};
use serde_json::{Value, json};

const GROUP_VERSION: &str = "egress-gateway.io/v1alpha1";
const SETTLE: Duration = Duration::from_secs(15);

/// The fake API server, listening on the gateway namespace's loopback
/// where the agent runs.
struct Cluster {
    server: Arc<FakeApiServer>,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn start(gateway: &Netns) -> Self {
        let server = Arc::new(gateway.within(FakeApiServer::start));
        server.register(
            "egress-gateway.io",
            "v1alpha1",
            "EgressGateway",
            "egressgateways",
            true,
        );
        let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", gateway.name()));
        server.write_kubeconfig(&kubeconfig);
        Self { server, kubeconfig }
    }

    fn apply_fixture(&self, file: &str) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/").to_owned() + file;
        let text = std::fs::read_to_string(&path).expect("fixture");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text).expect("fixture YAML");
        for document in documents {
            self.server.apply(document);
        }
    }

    fn node(&self, name: &str, pod_cidr: &str, internal_ip: Ipv4Addr) {
        self.server.apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": internal_ip.to_string()}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }));
    }

    fn pod(&self, namespace: &str, name: &str, app: &str, ip: Ipv4Addr) {
        self.server.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
        }));
    }

    fn status_of(&self, namespace: &str, name: &str) -> Value {
        self.server
            .get(GROUP_VERSION, "EgressGateway", Some(namespace), name)
            .map(|o| o["status"].clone())
            .unwrap_or(Value::Null)
    }

    /// Restores service from inside the namespace (the listener is bound
    /// where the call runs).
    fn restore(&self, gateway: &Netns) {
        let server = self.server.clone();
        gateway.within(move || server.set_outage(false));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn start_agent(net: &Topology, cluster: &Cluster) -> Agent {
    Agent::start_with(
        &net.gateway,
        "interfaces: {internal: [eth0], external: eth1}\nconntrack: {maxFlows: 4096}\n",
        &[
            "--kubernetes",
            "--kubeconfig",
            cluster.kubeconfig.to_str().expect("utf-8"),
            "--node-name",
            "gateway-vm",
        ],
    )
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn routes(gateway: &Netns) -> String {
    String::from_utf8_lossy(
        &gateway
            .run("ip", &["-4", "route", "show", "proto", "234"])
            .stdout,
    )
    .into_owned()
}

fn has_address(gateway: &Netns, addr: Ipv4Addr) -> bool {
    let out = gateway.run("ip", &["-4", "-o", "addr", "show", "dev", "eth1"]);
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/32"))
}

/// Which address a datagram from `host` reaches the echo server at `echo`
/// with (from the host's address of `echo`'s family).
fn leaves_from(net: &Topology, host: Ipv4Addr, port: u16, echo: SocketAddr) -> Option<IpAddr> {
    let server = udp_echo_server(&net.external, echo);
    udp_request(&net.host(host).ns, port, echo, b"k8s")?;
    server.peers().last().map(SocketAddr::ip)
}

fn leaves_as(net: &Topology, host: Ipv4Addr, port: u16) -> Option<Ipv4Addr> {
    let echo = SocketAddrV4::new(SERVER, 5400 + port % 100);
    match leaves_from(net, host, port, echo.into())? {
        IpAddr::V4(addr) => Some(addr),
        IpAddr::V6(_) => None,
    }
}

fn leaves_as_v6(net: &Topology, host: Ipv4Addr, port: u16) -> Option<Ipv6Addr> {
    let echo = SocketAddrV6::new(SERVER_V6, 5500 + port % 100, 0, 0);
    match leaves_from(net, host, port, echo.into())? {
        IpAddr::V6(addr) => Some(addr),
        IpAddr::V4(_) => None,
    }
}

/// A cluster with Kube-OVN's kinds, its subnets (`dual_stack`: the tenant
/// subnets with an IPv6 /64 beside their IPv4 range, as Kube-OVN writes a
/// dual-stack cidrBlock) and the tenants' namespaces.
fn kube_ovn_cluster(net: &Topology, dual_stack: bool) -> Cluster {
    let cluster = Cluster::start(&net.gateway);
    cluster.server.register(
        "kubeovn.io",
        "v1",
        "VpcEgressGateway",
        "vpc-egress-gateways",
        true,
    );
    cluster
        .server
        .register("kubeovn.io", "v1", "Subnet", "subnets", false);
    cluster.apply_fixture("kubeovn-subnets.yaml");
    let dual = [
        ("egress-internal-a", "2001:db8:10::/64"),
        ("egress-internal-b", "2001:db8:20::/64"),
    ];
    for (subnet, v6) in dual.iter().filter(|_| dual_stack) {
        let mut object = cluster
            .server
            .get("kubeovn.io/v1", "Subnet", None, subnet)
            .expect("the subnet");
        let v4 = object["spec"]["cidrBlock"]
            .as_str()
            .expect("cidr")
            .to_owned();
        object["spec"]["cidrBlock"] = json!(format!("{v4},{v6}"));
        object["spec"]["protocol"] = json!("Dual");
        cluster.server.apply(object);
    }
    for namespace in ["tenant-a", "tenant-b"] {
        cluster.server.apply(json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}
        }));
    }
    cluster
}

/// Tenant A's VpcEgressGateway, as the API server holds it.
fn tenant_a_gateway(cluster: &Cluster) -> Value {
    cluster
        .server
        .get(
            "kubeovn.io/v1",
            "VpcEgressGateway",
            Some("tenant-a"),
            "egress-tenant-a",
        )
        .expect("the object")
}

/// The agent serving Kube-OVN's gateways of `cluster`.
fn start_kube_ovn_agent(net: &Topology, cluster: &Cluster) -> Agent {
    Agent::start_with(
        &net.gateway,
        "interfaces: {internal: [eth0], external: eth1}\n",
        &[
            "--kubernetes",
            "--kube-ovn",
            "--kubeconfig",
            cluster.kubeconfig.to_str().expect("utf-8"),
            "--node-name",
            "gateway-vm",
        ],
    )
}

#[test]
fn a_gateway_vm_serves_the_fixtures_and_follows_nodes_and_outages() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let cluster = Cluster::start(&net.gateway);
    cluster.apply_fixture("egressgateway-tenants.yaml");
    cluster.node("node-1", "10.16.1.0/24", HOST_A);
    cluster.node("node-2", "10.16.2.0/24", HOST_B);
    let agent = start_agent(&net, &cluster);

    assert_eq!(leaves_as(&net, HOST_A, 33001), Some(EGRESS_A));
    assert_eq!(leaves_as(&net, HOST_B, 33002), Some(EGRESS_B));
    let flows = agent.flows();
    let b = flows
        .iter()
        .find(|f| f["tenant"] == "tenant-b.tenant-b")
        .unwrap_or_else(|| panic!("tenant-b's flow: {flows:#?}"));
    let port: u16 = b["translated"]
        .as_str()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|source| source.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("translated port");
    assert!(
        (20000..=29999).contains(&port),
        "the fixture's port range: {port}"
    );
    let table = routes(&net.gateway);
    assert!(
        table.contains("10.16.1.0/24 via 172.20.10.10 dev eth0"),
        "{table}"
    );
    assert!(
        table.contains("10.16.2.0/24 via 172.20.20.10 dev eth0"),
        "{table}"
    );

    // Status written back through the status subresource.
    eventually("tenant-a's status", || {
        let status = cluster.status_of("tenant-a", "tenant-a");
        status["ready"] == true
            && status["node"] == "gateway-vm"
            && status["egressIPs"] == json!(["192.168.31.101"])
    });

    // Node churn: one leaves, one moves, one joins.
    cluster.server.delete("v1", "Node", None, "node-2");
    cluster.node("node-1", "10.16.1.0/24", HOST_B);
    cluster.node("node-3", "10.16.3.0/24", HOST_A);
    eventually("routes to follow the nodes", || {
        let table = routes(&net.gateway);
        !table.contains("10.16.2.0/24")
            && table.contains("10.16.1.0/24 via 172.20.20.10")
            && table.contains("10.16.3.0/24 via 172.20.10.10")
    });

    // Outage: the gateway keeps serving what it has.
    cluster.server.set_outage(true);
    eventually("the agent to notice the outage", || {
        agent.status()["live"]["kubernetes"]["reachable"] == false
    });
    assert_eq!(leaves_as(&net, HOST_A, 33003), Some(EGRESS_A));
    // Meanwhile tenant-b is deleted and the history compacted: the
    // watchers' resourceVersions are gone, so they must relist (410).
    cluster
        .server
        .delete(GROUP_VERSION, "EgressGateway", Some("tenant-b"), "tenant-b");
    cluster.server.compact();
    assert!(
        has_address(&net.gateway, EGRESS_B),
        "nothing changes during the outage"
    );
    cluster.restore(&net.gateway);
    eventually("tenant-b to go after the relist", || {
        !has_address(&net.gateway, EGRESS_B)
    });
    assert!(has_address(&net.gateway, EGRESS_A));
    eventually("the agent to be reachable again", || {
        agent.status()["live"]["kubernetes"]["reachable"] == true
    });
    assert_eq!(
        leaves_as(&net, HOST_A, 33003),
        Some(EGRESS_A),
        "tenant-a's flow carries on"
    );
    assert_eq!(
        leaves_as(&net, HOST_B, 33004),
        None,
        "tenant-b no longer leaves"
    );
}

#[test]
fn pod_churn_and_label_changes_move_sources_in_and_out() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let cluster = Cluster::start(&net.gateway);
    cluster.server.apply(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"team": "blue"}}
    }));
    cluster.server.apply(json!({
        "apiVersion": GROUP_VERSION, "kind": "EgressGateway",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "egressIPs": [EGRESS_A.to_string()],
            "namespaceSelector": {"matchLabels": {"team": "blue"}},
            "podSelector": {"matchLabels": {"app": "web"}}
        }
    }));
    cluster.pod("shop", "web-1", "web", HOST_A);
    cluster.pod("shop", "db-1", "db", HOST_B);
    let _agent = start_agent(&net, &cluster);

    assert_eq!(leaves_as(&net, HOST_A, 34001), Some(EGRESS_A));
    assert_eq!(leaves_as(&net, HOST_B, 34002), None, "db-1 is not selected");
    eventually("matchedPods", || {
        cluster.status_of("shop", "web")["matchedPods"] == 1
    });

    // Relabel db-1 as a web pod: its address becomes a source.
    cluster.pod("shop", "db-1", "web", HOST_B);
    eventually("db-1 to be selected", || {
        leaves_as(&net, HOST_B, 34003) == Some(EGRESS_A)
    });
    eventually("matchedPods", || {
        cluster.status_of("shop", "web")["matchedPods"] == 2
    });

    // web-1 goes away: its address no longer leaves.
    cluster.server.delete("v1", "Pod", Some("shop"), "web-1");
    eventually("web-1 to be dropped", || {
        leaves_as(&net, HOST_A, 34004).is_none()
    });

    // The namespace stops matching: nothing of it leaves, the egress IP stays reserved.
    cluster.server.apply(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"team": "red"}}
    }));
    eventually("db-1 to be dropped", || {
        leaves_as(&net, HOST_B, 34005).is_none()
    });
    eventually("the status to say so", || {
        cluster.status_of("shop", "web")["matchedPods"] == 0
    });
}

#[test]
fn kube_ovn_vpc_egress_gateways_are_served_through_their_subnets() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let cluster = kube_ovn_cluster(&net, false);
    cluster.apply_fixture("vpcegressgateway-harvester.yaml");
    let agent = start_kube_ovn_agent(&net, &cluster);
    assert_eq!(leaves_as(&net, HOST_A, 35001), Some(EGRESS_A));
    assert_eq!(leaves_as(&net, HOST_B, 35002), Some(EGRESS_B));
    let tenants: Vec<String> = agent.status()["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    assert!(
        tenants.iter().all(|t| t.starts_with("veg:")),
        "served as Kube-OVN gateways: {tenants:?}"
    );
    // Kube-OVN owns these objects' status: the agent never writes it.
    let object = tenant_a_gateway(&cluster);
    assert!(
        object.get("status").is_none_or(Value::is_null),
        "{object:#}"
    );
}

/// Kube-OVN's dual-stack shapes: a subnet whose cidrBlock is "IPv4,IPv6"
/// and externalIPs written as "IPv4,IPv6" pairs. Each family of the
/// tenant's hosts leaves with its own external IP; tenant B, whose
/// externalIPs stay IPv4, gets nothing out over IPv6.
#[test]
fn a_dual_stack_vpc_egress_gateway_translates_each_family() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    net.add_ipv6();
    let cluster = kube_ovn_cluster(&net, true);
    cluster.apply_fixture("vpcegressgateway-harvester.yaml");
    let mut gateway = tenant_a_gateway(&cluster);
    gateway["spec"]["externalIPs"] = json!([format!("{EGRESS_A},{EGRESS_A_V6}")]);
    cluster.server.apply(gateway);
    let agent = start_kube_ovn_agent(&net, &cluster);
    eventually("tenant A's IPv6 egress IP", || {
        leaves_as_v6(&net, HOST_A, 36001) == Some(EGRESS_A_V6)
    });
    assert_eq!(leaves_as(&net, HOST_A, 35001), Some(EGRESS_A));
    assert_eq!(leaves_as(&net, HOST_B, 35002), Some(EGRESS_B));
    assert_eq!(
        leaves_as_v6(&net, HOST_B, 36002),
        None,
        "tenant B has no IPv6 external IP: its IPv6 hosts get nothing out"
    );
    let log = agent.log();
    assert!(
        log.contains("SourcesIgnored") && log.contains("not translated: no IPv6 egress IP"),
        "the agent says why tenant B's IPv6 subnet is not served: {log}"
    );
}
