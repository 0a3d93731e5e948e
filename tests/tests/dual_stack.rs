//! Dual-stack tenants end to end: the seed topology with IPv6 beside IPv4
//! (hosts, gateway and server keep the kernel's interface defaults,
//! duplicate address detection included), the real `egress-agent`, and
//! servers on the external side that record who they see. Each family
//! leaves from its own egress address; a host in no tenant gets nothing
//! out in either; nothing from outside reaches a tenant host. Needs root.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    process::Stdio,
    time::{Duration, Instant},
};

use egress_tests::{
    agent::Agent,
    require_root,
    topology::{
        EGRESS_A, EGRESS_A_V6, EGRESS_B_V6, FAR_SERVER_V6, GATEWAY_EXTERNAL_V6, HOST_A, HOST_B,
        SERVER, SERVER_V6, STRANGER, Topology, dual_stack_config, ipv6_of,
    },
    traffic::{Received, bulk_transfer, curl, http_server, ping, udp_echo_server, udp_request},
};

fn start() -> Option<(Topology, Agent)> {
    if !require_root() {
        return None;
    }
    let topology = Topology::seed();
    topology.add_ipv6();
    let agent = Agent::start(&topology.gateway, &dual_stack_config(4096));
    Some((topology, agent))
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

#[test]
fn http_leaves_from_each_familys_egress_address() {
    let Some((net, agent)) = start() else { return };
    let server4 = http_server(&net.external, SocketAddrV4::new(SERVER, 8080));
    let server6 = http_server(&net.external, v6(SERVER_V6, 8080));
    let host_a = &net.host(HOST_A).ns;

    let over_v4 = curl(host_a, &format!("http://{SERVER}:8080/")).expect("GET over IPv4");
    let over_v6 = curl(host_a, &format!("http://[{SERVER_V6}]:8080/")).expect("GET over IPv6");
    let from_b = curl(&net.host(HOST_B).ns, &format!("http://[{SERVER_V6}]:8080/"))
        .expect("tenant-b GET over IPv6");

    assert_eq!(over_v4, format!("you are {EGRESS_A}\n"));
    assert_eq!(over_v6, format!("you are {EGRESS_A_V6}\n"));
    assert_eq!(from_b, format!("you are {EGRESS_B_V6}\n"));
    assert_eq!(server4.peer_ips(), [EGRESS_A]);
    assert_eq!(server6.peer_ips_v6(), [EGRESS_A_V6, EGRESS_B_V6]);
    let flows = agent.flows();
    assert!(
        flows
            .iter()
            .any(|f| f.to_string().contains(&EGRESS_A_V6.to_string())),
        "`flows` lists the IPv6 flows: {flows:#?}"
    );
}

#[test]
fn udp_and_ping_over_ipv6_are_translated_both_ways() {
    let Some((net, agent)) = start() else { return };
    let server = udp_echo_server(&net.external, v6(SERVER_V6, 9999));
    let host_a = &net.host(HOST_A).ns;
    let answer = udp_request(host_a, 0, v6(SERVER_V6, 9999), b"hello");
    assert_eq!(answer.as_deref(), Some(&b"hello"[..]));
    assert_eq!(server.peer_ips_v6(), [EGRESS_A_V6]);
    assert!(ping(host_a, SERVER_V6, 3), "ping6 through the gateway");
    assert!(agent.counter("in_translated") >= 4);
}

/// A datagram larger than the links' MTU travels in fragments both ways:
/// the host's kernel fragments it (IPv6 routers never do), the gateway
/// translates the first fragment as its flow and the later ones by the
/// first's memory, and the server's kernel reassembles and echoes it back
/// in fragments, which find the host the same way.
#[test]
fn datagrams_in_fragments_cross_both_ways() {
    let Some((net, agent)) = start() else { return };
    let server = udp_echo_server(&net.external, v6(SERVER_V6, 9998));
    let host_a = &net.host(HOST_A).ns;
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let answer = udp_request(host_a, 0, v6(SERVER_V6, 9998), &payload);
    let status = || agent.status().to_string();
    assert_eq!(
        answer.as_deref(),
        Some(&payload[..]),
        "the 4000-byte datagram came back whole\n{}",
        status()
    );
    assert_eq!(server.peer_ips_v6(), [EGRESS_A_V6]);
    // 4000 bytes over 1500-byte links: a first fragment and two more.
    assert!(
        agent.counter("out_fragment_translated") >= 2,
        "{}",
        status()
    );
    assert!(agent.counter("in_fragment_translated") >= 2, "{}", status());
    assert_eq!(agent.counter("out_drop_fragment_unknown"), 0);
    assert_eq!(agent.counter("in_drop_fragment_unknown"), 0);
}

#[test]
fn a_host_outside_every_tenant_gets_nothing_out_in_either_family() {
    let Some((net, agent)) = start() else { return };
    let server4 = http_server(&net.external, SocketAddrV4::new(SERVER, 8080));
    let server6 = http_server(&net.external, v6(SERVER_V6, 8080));
    let stranger = &net.host(STRANGER).ns;
    assert!(curl(stranger, &format!("http://{SERVER}:8080/")).is_err());
    assert!(curl(stranger, &format!("http://[{SERVER_V6}]:8080/")).is_err());
    assert!(!ping(stranger, SERVER_V6, 1));
    assert!(server4.peers().is_empty() && server6.peers().is_empty());
    assert!(agent.counter("out_drop_unclassified") > 0);
    // The gateway itself stays reachable for it (its router address).
    let router = Ipv6Addr::from(u128::from(ipv6_of(STRANGER)) & !0xffff_u128 | 1);
    assert!(
        ping(stranger, router, 1),
        "the gateway answers its own address"
    );
}

#[test]
fn unsolicited_ipv6_from_outside_reaches_no_tenant_host() {
    let Some((net, agent)) = start() else { return };
    let host_a = ipv6_of(HOST_A);
    let listener = udp_echo_server(&net.host(HOST_A).ns, v6(host_a, 7777));
    // The outside knows the way to the tenant network, as an attacker
    // next to the gateway would.
    net.external.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:10::/64",
        "via",
        &GATEWAY_EXTERNAL_V6.to_string(),
    ]);
    assert_eq!(
        udp_request(&net.external, 0, v6(EGRESS_A_V6, 7777), b"knock"),
        None
    );
    assert_eq!(
        udp_request(&net.external, 0, v6(host_a, 7777), b"knock"),
        None
    );
    assert!(listener.peers().is_empty(), "{:?}", listener.peers());
    assert!(agent.counter("in_drop_no_flow") > 0);
    assert!(agent.counter("in_drop_to_internal") > 0);
}

#[test]
fn path_mtu_discovery_over_ipv6_works_through_the_gateway() {
    if !require_root() {
        return;
    }
    let mut net = Topology::seed();
    net.add_far_server(1280);
    net.add_ipv6();
    let agent = Agent::start(&net.gateway, &dual_stack_config(4096));
    let host = &net.host(HOST_A).ns;
    let far = net.far.as_ref().expect("far server");
    // Full-size segments from the tenant hit the 1280-byte hop: the router
    // answers packet-too-big to the egress address, and the gateway must
    // hand it to the tenant host, or the upload stalls.
    let received = bulk_transfer(host, far, v6(FAR_SERVER_V6, 7002), 16 << 20, false)
        .expect("upload across the narrow hop");
    assert_eq!(
        received,
        Received {
            bytes: 16 << 20,
            intact: true
        }
    );
    assert!(
        agent.counter("in_icmp_error_translated") > 0,
        "the router's packet-too-big came back translated"
    );
    let route = host.ip(&["-6", "route", "get", &FAR_SERVER_V6.to_string()]);
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains("mtu 1280"),
        "the tenant host learned the path MTU: {route}"
    );
}

#[test]
fn each_ipv6_egress_address_is_announced_when_it_appears() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    net.add_ipv6();
    // tcpdump (not ours) on the server's side, listening before the agent
    // adds its addresses: an unsolicited Neighbor Advertisement each.
    let mut tcpdump = net
        .external
        .command("tcpdump")
        .args(["-l", "-nn", "-i", "eth0", "icmp6 and ip6[40] == 136"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcpdump");
    // Listening once its packet socket exists.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let listening = net.external.try_run("ss", &["-H", "-0"]);
        if !listening.stdout.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let agent = Agent::start(&net.gateway, &dual_stack_config(4096));
    std::thread::sleep(Duration::from_secs(1));
    let _ = tcpdump.kill();
    let out = tcpdump.wait_with_output().expect("tcpdump output");
    let seen = String::from_utf8_lossy(&out.stdout);
    for address in [EGRESS_A_V6, EGRESS_B_V6] {
        assert!(
            seen.lines().any(|l| l.contains("neighbor advertisement")
                && l.contains(&format!("tgt is {address}"))),
            "no advertisement of {address}; tcpdump saw:\n{seen}\nagent log:\n{}",
            agent.log()
        );
    }
}
