//! Inbound NAT end to end: the real agent in the seed topology (kernel
//! default interfaces) with a port forward on tenant-a's egress IP and a
//! floating IP for tenant-b's host. From outside, the forwarded port
//! reaches the internal web server (which sees the real client), the
//! floating IP reaches its host both ways and the host leaves from it;
//! other ports reach nothing; the same over IPv6 on a dual-stack seed.
//! Needs root.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use egress_tests::{
    agent::Agent,
    require_root,
    topology::{
        EGRESS_A, EGRESS_A_V6, HOST_A, HOST_B, SERVER, SERVER_V6, Topology, dual_stack_config,
        ipv6_of, seed_config,
    },
    traffic::{curl, http_server, udp_echo_server, udp_request},
};

const FLOATING: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 200);

fn config() -> String {
    let mut yaml = seed_config(4096);
    yaml = yaml.replacen(
        "    egressIPs: [192.168.31.101]\n",
        "    egressIPs: [192.168.31.101]\n    portForwards:\n      \
         - {egressIP: 192.168.31.101, protocol: tcp, port: 8888, to: '172.20.10.10:80'}\n",
        1,
    );
    yaml.replacen(
        "    egressIPs: [192.168.31.150]\n",
        "    egressIPs: [192.168.31.150]\n    floatingIPs:\n      \
         - {address: 192.168.31.200, host: 172.20.20.10}\n",
        1,
    )
}

#[test]
fn forwarded_ports_and_floating_ips_reach_their_hosts_and_nothing_else_gets_in() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let agent = Agent::start(&net.gateway, &config());
    let web = http_server(&net.host(HOST_A).ns, SocketAddrV4::new(HOST_A, 80));

    // The forwarded port reaches tenant-a's web server, which sees the
    // real client: a port forward translates the destination only.
    let body = curl(&net.external, &format!("http://{EGRESS_A}:8888/")).expect("forwarded GET");
    assert_eq!(body, format!("you are {SERVER}\n"));
    assert_eq!(web.peer_ips(), [SERVER]);

    // Nothing else on the egress IP answers.
    assert!(curl(&net.external, &format!("http://{EGRESS_A}:8889/")).is_err());
    assert!(curl(&net.external, &format!("http://{EGRESS_A}:80/")).is_err());

    // The floating IP reaches tenant-b's host on any port, both ways...
    let _echo = udp_echo_server(&net.host(HOST_B).ns, SocketAddrV4::new(HOST_B, 7777));
    let echoed = udp_request(&net.external, 0, SocketAddrV4::new(FLOATING, 7777), b"hi");
    assert_eq!(echoed.as_deref(), Some(&b"hi"[..]));
    // ...and the host's own traffic leaves from it.
    let outside = http_server(&net.external, SocketAddrV4::new(SERVER, 8080));
    let body = curl(&net.host(HOST_B).ns, &format!("http://{SERVER}:8080/")).expect("GET out");
    assert_eq!(body, format!("you are {FLOATING}\n"));
    assert_eq!(outside.peer_ips(), [FLOATING]);

    let status = agent.status();
    assert!(status["counters"]["in_new_flow"].as_u64().unwrap_or(0) >= 2);
    assert!(status["counters"]["in_drop_no_flow"].as_u64().unwrap_or(0) >= 2);
}

#[test]
fn rules_change_live_and_a_removed_rule_ends_only_its_flows() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let plain = seed_config(4096);
    let mut agent = Agent::start(&net.gateway, &plain);
    let _dns = udp_echo_server(&net.host(HOST_A).ns, SocketAddrV4::new(HOST_A, 53));
    let _echo = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    let forward = SocketAddrV4::new(EGRESS_A, 5353);
    let ask = |port: u16| udp_request(&net.external, port, forward, b"q");
    assert_eq!(ask(6001), None, "no rule yet");

    // A reload adds the rule: the forwarded port answers.
    let with_rule = plain.replacen(
        "    egressIPs: [192.168.31.101]\n",
        "    egressIPs: [192.168.31.101]\n    portForwards:\n      \
         - {egressIP: 192.168.31.101, protocol: udp, port: 5353, to: '172.20.10.10:53'}\n",
        1,
    );
    agent.reload(&with_rule);
    egress_tests::agent::wait_until("the rule to serve", Duration::from_secs(10), || {
        ask(6002).is_some()
    });
    // An outbound flow of the same tenant, which the rule's removal must
    // leave alone.
    udp_request(
        &net.host(HOST_A).ns,
        7000,
        SocketAddrV4::new(SERVER, 9999),
        b"x",
    )
    .expect("tenant-a's own flow");
    let inbound = |agent: &Agent| {
        agent
            .flows()
            .iter()
            .filter(|f| f["inbound"] == true)
            .count()
    };
    assert_eq!(inbound(&agent), 1);

    // A reload without it ends its flow and nothing else.
    agent.reload(&plain);
    egress_tests::agent::wait_until("the rule's flow to end", Duration::from_secs(10), || {
        inbound(&agent) == 0
    });
    let flows = agent.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["original"].as_str().is_some_and(|o| o.contains(":7000 "))),
        "tenant-a's own flow survived: {flows:#?}"
    );
    assert_eq!(ask(6003), None, "the port is closed again");
    assert!(agent.stop().success());
}

const FLOATING_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x200);

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// The same rules on IPv6 addresses, with kernel-default interfaces: an
/// IPv6 port forward reaches the web server (which sees the real client),
/// an IPv6 floating IP its host both ways, and the host leaves from it.
#[test]
fn ipv6_forwarded_ports_and_floating_ips_reach_their_hosts_and_nothing_else_gets_in() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    net.add_ipv6();
    let (host_a, host_b) = (ipv6_of(HOST_A), ipv6_of(HOST_B));
    let config = dual_stack_config(4096)
        .replacen(
            &format!("    egressIPs: [{EGRESS_A}, {EGRESS_A_V6}]\n"),
            &format!(
                "    egressIPs: [{EGRESS_A}, {EGRESS_A_V6}]\n    portForwards:\n      \
                 - {{egressIP: '{EGRESS_A_V6}', protocol: tcp, port: 8888, to: '[{host_a}]:80'}}\n"
            ),
            1,
        )
        .replacen(
            "conntrack:",
            &format!(
                "    floatingIPs:\n      - {{address: '{FLOATING_V6}', host: '{host_b}'}}\nconntrack:"
            ),
            1,
        );
    let agent = Agent::start(&net.gateway, &config);
    let web = http_server(&net.host(HOST_A).ns, v6(host_a, 80));

    let body = curl(&net.external, &format!("http://[{EGRESS_A_V6}]:8888/"))
        .expect("forwarded GET over IPv6");
    assert_eq!(body, format!("you are {SERVER_V6}\n"));
    assert_eq!(web.peer_ips_v6(), [SERVER_V6]);
    assert!(curl(&net.external, &format!("http://[{EGRESS_A_V6}]:8889/")).is_err());

    let _echo = udp_echo_server(&net.host(HOST_B).ns, v6(host_b, 7777));
    let echoed = udp_request(&net.external, 0, v6(FLOATING_V6, 7777), b"hi");
    assert_eq!(echoed.as_deref(), Some(&b"hi"[..]));
    let outside = http_server(&net.external, v6(SERVER_V6, 8080));
    let body = curl(&net.host(HOST_B).ns, &format!("http://[{SERVER_V6}]:8080/"))
        .expect("GET out over IPv6");
    assert_eq!(body, format!("you are {FLOATING_V6}\n"));
    assert_eq!(outside.peer_ips_v6(), [FLOATING_V6]);

    let status = agent.status();
    assert!(status["counters"]["in_new_flow"].as_u64().unwrap_or(0) >= 2);
}
