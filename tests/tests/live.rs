//! A serving agent changing under it: SIGHUP reloads, flows of a tenant
//! that lost its egress IP end while others carry on, a bad file changes
//! nothing, and the HTTP endpoint tells health and readiness (a detached
//! program makes it unready). Needs root.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use egress_tests::{
    agent::{Agent, http_get, wait_until},
    netns::Netns,
    require_root,
    topology::{
        EGRESS_A, EGRESS_A_V6, EGRESS_B, HOST_A, HOST_B, SERVER, SERVER_V6, Topology, ipv6_of,
        seed_config,
    },
    traffic::{udp_echo_server, udp_request},
};

const LISTEN: &str = "127.0.0.1:9477";
const NEW_EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 102);

/// GET on the agent's endpoint from inside the gateway namespace.
fn get(gateway: &Netns, path: &str) -> (u16, String) {
    http_get(gateway, LISTEN, path)
}

fn gateway_has(gateway: &Netns, addr: Ipv4Addr) -> bool {
    let out = gateway.run("ip", &["-4", "-o", "addr", "show", "dev", "eth1"]);
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/32"))
}

#[test]
fn sighup_moves_a_tenant_to_a_new_egress_ip_and_leaves_the_other_alone() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let agent = Agent::start_with(&net.gateway, &seed_config(4096), &["--listen", LISTEN]);
    let echo = SocketAddrV4::new(SERVER, 5300);
    let server = udp_echo_server(&net.external, echo);
    let (a, b) = (&net.host(HOST_A).ns, &net.host(HOST_B).ns);
    assert!(udp_request(a, 32000, echo, b"1").is_some());
    assert!(udp_request(b, 32000, echo, b"1").is_some());
    let tenant_b_flows = |agent: &Agent| -> Vec<String> {
        agent
            .flows()
            .iter()
            .filter(|f| f["tenant"] == "tenant-b")
            .map(|f| format!("{} {}", f["original"], f["translated"]))
            .collect()
    };
    let b_before = tenant_b_flows(&agent);
    assert_eq!(b_before.len(), 1);

    // A file with a mistake is refused; the agent serves on unchanged.
    agent.reload("interfaces: {internal: [eth0], external: eth1}\ntenants: [{name: x, sources: [not-a-cidr]}]\n");
    wait_until("the refusal", Duration::from_secs(10), || {
        agent.log().contains("reload refused")
    });
    assert!(gateway_has(&net.gateway, EGRESS_A));
    assert_eq!(agent.flows().len(), 2);

    agent.reload(&seed_config(4096).replace(&EGRESS_A.to_string(), &NEW_EGRESS_A.to_string()));
    wait_until("the new address", Duration::from_secs(10), || {
        gateway_has(&net.gateway, NEW_EGRESS_A)
    });
    wait_until("the old address to go", Duration::from_secs(10), || {
        !gateway_has(&net.gateway, EGRESS_A)
    });
    assert!(gateway_has(&net.gateway, EGRESS_B));
    let flows = agent.flows();
    assert!(
        flows.iter().all(|f| f["tenant"] != "tenant-a"),
        "tenant-a's flow through the withdrawn address ended: {flows:#?}"
    );
    assert_eq!(
        tenant_b_flows(&agent),
        b_before,
        "tenant-b's flow untouched"
    );

    // The same host and port now leave from the new address.
    assert_eq!(
        udp_request(a, 32000, echo, b"2").as_deref(),
        Some(&b"2"[..])
    );
    assert_eq!(
        udp_request(b, 32000, echo, b"2").as_deref(),
        Some(&b"2"[..])
    );
    let peers = server.peer_ips();
    assert_eq!(peers.last(), Some(&EGRESS_B));
    assert!(peers.contains(&NEW_EGRESS_A), "{peers:?}");
    assert_eq!(tenant_b_flows(&agent), b_before, "still the same flow");
}

#[test]
fn readiness_follows_the_dataplane() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let agent = Agent::start_with(&net.gateway, &seed_config(1024), &["--listen", LISTEN]);
    wait_until("readiness", Duration::from_secs(5), || {
        get(&net.gateway, "/readyz").0 == 200
    });
    assert_eq!(get(&net.gateway, "/healthz").0, 200);
    assert!(
        udp_request(
            &net.host(HOST_A).ns,
            32001,
            SocketAddrV4::new(SERVER, 9),
            b"x"
        )
        .is_none()
    );
    let (code, metrics) = get(&net.gateway, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("egress_dataplane_serving 1"), "{metrics}");
    assert!(
        metrics.contains(
            "egress_program_attached{interface=\"eth0\",program=\"tc_outbound\",hook=\"tc/ingress\"} 1"
        ),
        "each interface's hook is on /metrics: {metrics}"
    );
    assert!(
        metrics.contains("egress_packets_total{verdict=\"out_new_flow\"} 1"),
        "{metrics}"
    );

    // Someone detaches the reply program behind the agent's back.
    let status = agent.status();
    let reply = status["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .find(|a| a["program"] == "tc_reply")
        .expect("tc_reply attached")
        .clone();
    let link = net.gateway.run("bpftool", &["-j", "link", "show"]);
    let links: serde_json::Value = serde_json::from_slice(&link.stdout).expect("bpftool JSON");
    let id = links
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["prog_id"] == reply["program_id"])
        .and_then(|l| l["id"].as_u64())
        .expect("the reply program's link");
    net.gateway
        .run("bpftool", &["link", "detach", "id", &id.to_string()]);
    wait_until("unreadiness", Duration::from_secs(5), || {
        get(&net.gateway, "/readyz").0 == 503
    });
    let (_, body) = get(&net.gateway, "/readyz");
    assert!(body.contains("detached"), "{body}");
    assert!(
        get(&net.gateway, "/metrics")
            .1
            .contains("egress_dataplane_serving 0")
    );
    assert_eq!(
        get(&net.gateway, "/healthz").0,
        200,
        "alive, though not ready"
    );
}

fn routes(gateway: &Netns) -> String {
    String::from_utf8_lossy(&gateway.run("ip", &["-4", "route", "show"]).stdout).into_owned()
}

#[test]
fn return_routes_are_kept_and_only_ours_are_ever_removed() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    // Someone else's route to a prefix the file also names.
    net.gateway
        .ip(&["route", "add", "10.16.9.0/24", "via", "172.20.10.10"]);
    let with_routes = |routes: &str| format!("{}returnRoutes:\n{routes}", seed_config(1024));
    let mut agent = Agent::start(
        &net.gateway,
        &with_routes(
            "  - {destination: 10.16.1.0/24, via: 172.20.10.10}\n  - {destination: 10.16.9.0/24, via: 172.20.20.10}\n",
        ),
    );
    let table = routes(&net.gateway);
    assert!(
        table.contains("10.16.1.0/24 via 172.20.10.10 dev eth0 proto 234"),
        "{table}"
    );
    assert!(
        table.contains("10.16.9.0/24 via 172.20.10.10 dev eth0 \n")
            || table
                .lines()
                .any(|l| l.trim() == "10.16.9.0/24 via 172.20.10.10 dev eth0"),
        "the foreign route is untouched: {table}"
    );
    assert!(
        agent.log().contains("not ours; left alone"),
        "{}",
        agent.log()
    );

    // The node moves: the route follows; a new node's route appears.
    agent.reload(&with_routes(
        "  - {destination: 10.16.1.0/24, via: 172.20.20.10}\n  - {destination: 10.16.2.0/24, via: 172.20.10.10}\n",
    ));
    wait_until("the moved route", Duration::from_secs(10), || {
        let table = routes(&net.gateway);
        table.contains("10.16.1.0/24 via 172.20.20.10 dev eth0 proto 234")
            && table.contains("10.16.2.0/24 via 172.20.10.10 dev eth0 proto 234")
    });
    assert!(agent.stop().success());
    let table = routes(&net.gateway);
    assert!(!table.contains("proto 234"), "ours are gone: {table}");
    assert!(
        table.contains("10.16.9.0/24 via 172.20.10.10"),
        "theirs stays: {table}"
    );
}

/// A node's IPv6 pod CIDR behind it: replies translated back to a pod
/// reach it only through the return route the agent keeps, via the node's
/// IPv6 address; the route goes when the agent stops.
#[test]
fn ipv6_return_routes_carry_replies_to_a_nodes_pods() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    net.add_ipv6();
    let node = ipv6_of(HOST_A);
    let pod = "2001:db8:77::5";
    let host_a = &net.host(HOST_A).ns;
    host_a.ip(&["addr", "add", &format!("{pod}/128"), "dev", "lo"]);
    let config = format!(
        "\
interfaces:
  internal: [eth0]
  external: eth1
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24, 2001:db8:10::/64, 2001:db8:77::/64]
    egressIPs: [{EGRESS_A}, {EGRESS_A_V6}]
returnRoutes:
  - {{destination: 2001:db8:77::/64, via: '{node}'}}
"
    );
    let ping_from_pod = || {
        host_a
            .try_run(
                "ping",
                &[
                    "-6",
                    "-c",
                    "2",
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    "-n",
                    "-I",
                    pod,
                    &SERVER_V6.to_string(),
                ],
            )
            .status
            .success()
    };
    let mut agent = Agent::start(&net.gateway, &config);
    let table = String::from_utf8_lossy(&net.gateway.run("ip", &["-6", "route", "show"]).stdout)
        .into_owned();
    assert!(
        table.contains(&format!("2001:db8:77::/64 via {node} dev eth0 proto 234")),
        "{table}"
    );
    assert!(ping_from_pod(), "the pod's ping6 comes back by the route");
    assert!(agent.stop().success());
    let table = String::from_utf8_lossy(&net.gateway.run("ip", &["-6", "route", "show"]).stdout)
        .into_owned();
    assert!(!table.contains("proto 234"), "ours are gone: {table}");
}

/// XDP chosen where it is safe stays safe only while its redirect targets
/// take XDP frames. This test is about that setting: it switches GRO on at
/// the veth peers the gateway redirects into (which gives them NAPI, so
/// they accept XDP frames), forces XDP, then switches one peer's GRO off
/// as a careless operator might. The dataplane must stop claiming to serve
/// and say why.
#[test]
fn an_xdp_target_that_stops_taking_redirects_makes_the_gateway_unready() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    net.lan.ethtool("gw", "gro", true);
    net.external.ethtool("eth0", "gro", true);
    let config = seed_config(1024).replace("external: eth1", "external: eth1\n  hook: xdp");
    let agent = Agent::start_with(&net.gateway, &config, &["--listen", LISTEN]);
    wait_until("readiness", Duration::from_secs(5), || {
        get(&net.gateway, "/readyz").0 == 200
    });
    let hooks: Vec<String> = agent.status()["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .map(|a| format!("{} {}", a["program"], a["hook"]))
        .collect();
    assert!(
        hooks
            .iter()
            .any(|h| h.contains("snat_outbound") && h.contains("xdp")),
        "{hooks:?}"
    );
    net.external.ethtool("eth0", "gro", false);
    wait_until("unreadiness", Duration::from_secs(5), || {
        get(&net.gateway, "/readyz").0 == 503
    });
    let (_, body) = get(&net.gateway, "/readyz");
    assert!(
        body.contains("eth1") && body.contains("no longer accepts XDP redirects"),
        "{body}"
    );
    // Back on: serving again.
    net.external.ethtool("eth0", "gro", true);
    wait_until("readiness again", Duration::from_secs(5), || {
        get(&net.gateway, "/readyz").0 == 200
    });
}
