//! Inbound NAT end to end: the real agent in the seed topology (kernel
//! default interfaces) with a port forward on tenant-a's egress IP and a
//! floating IP for tenant-b's host. From outside, the forwarded port
//! reaches the internal web server (which sees the real client), the
//! floating IP reaches its host both ways and the host leaves from it;
//! other ports reach nothing. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use egress_tests::{
    agent::Agent,
    require_root,
    topology::{EGRESS_A, HOST_A, HOST_B, SERVER, Topology, seed_config},
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
