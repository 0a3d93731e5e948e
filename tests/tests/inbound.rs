//! Port forwards and floating IPs on the real programs (BPF_PROG_TEST_RUN):
//! a packet from outside opens a flow through a rule, both halves, and the
//! host's answers leave from the rule's address and port; every rewritten
//! field and checksum is checked. The allocator never hands a forwarded port
//! to an outbound flow; a floating IP's host leaves from it with its own
//! port; what no rule covers stays dropped; removing a rule ends its flows
//! and nothing else. The same for IPv6 rules, on IPv6 frames. Run for both
//! hooks (`EGRESS_TEST_HOOK=tc`). Needs root.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use egress_agent::{
    config::inbound::{PlannedFloating, PlannedForward},
    conntrack,
};
use egress_common::counters::Counter;
use egress_tests::{
    frames::{self, Tcp, View, assert_checksums},
    frames6::{self, View6},
    harness::{Harness, XDP_DROP, XDP_REDIRECT},
    require_root,
};

const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
const HOST_B: Ipv4Addr = Ipv4Addr::new(172, 20, 20, 10);
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);
const EGRESS_B: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 150);
const FLOATING: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 200);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// tenant-a forwards TCP 8888 to its host's port 80, and UDP 40001, in the
/// middle of its own four-port SNAT range, to port 53; tenant-b's host has
/// a floating IP.
const CONFIG: &str = "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
    ports: {min: 40000, max: 40003}
    portForwards:
      - {egressIP: 192.168.31.101, protocol: tcp, port: 8888, to: '172.20.10.10:80'}
      - {egressIP: 192.168.31.101, protocol: udp, port: 40001, to: '172.20.10.10:53'}
  - name: tenant-b
    sources: [172.20.20.0/24]
    egressIPs: [192.168.31.150]
    floatingIPs:
      - {address: 192.168.31.200, host: 172.20.20.10}
";

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn harness() -> Option<Harness> {
    require_root().then(|| Harness::with_config(CONFIG))
}

#[track_caller]
fn redirected(outcome: egress_tests::harness::Outcome) -> Vec<u8> {
    assert_eq!(outcome.action, XDP_REDIRECT);
    assert_checksums(&outcome.frame);
    outcome.frame
}

#[track_caller]
fn endpoints(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let view = View::new(frame);
    (
        sock(view.src(), view.src_port()),
        sock(view.dst(), view.dst_port()),
    )
}

#[test]
fn a_port_forward_opens_a_flow_from_outside_and_its_answers_leave_from_it() {
    let Some(h) = harness() else { return };
    let client = sock(REMOTE, 5555);
    let syn = redirected(h.reply(&frames::tcp(client, sock(EGRESS_A, 8888), Tcp::Syn, b"")));
    assert_eq!(endpoints(&syn), (client, sock(HOST_A, 80)));
    assert_eq!(h.counter(Counter::InNewFlow), 1);
    let answer = redirected(h.outbound(&frames::tcp(sock(HOST_A, 80), client, Tcp::SynAck, b"")));
    assert_eq!(endpoints(&answer), (sock(EGRESS_A, 8888), client));
    let data = redirected(h.reply(&frames::tcp(
        client,
        sock(EGRESS_A, 8888),
        Tcp::Ack,
        b"GET / HTTP/1.0\r\n\r\n",
    )));
    assert_eq!(endpoints(&data), (client, sock(HOST_A, 80)));
    assert_eq!(h.flow_count(), 1);
    assert_eq!(h.counter(Counter::InNewFlow), 1, "one flow, opened once");
    h.assert_no_half_entries();

    // Only a SYN opens; a port no rule names opens nothing.
    let stray = h.reply(&frames::tcp(
        sock(REMOTE, 5556),
        sock(EGRESS_A, 8888),
        Tcp::Ack,
        b"",
    ));
    assert_eq!(stray.action, XDP_DROP);
    let closed = h.reply(&frames::tcp(
        sock(REMOTE, 5557),
        sock(EGRESS_A, 8889),
        Tcp::Syn,
        b"",
    ));
    assert_eq!(closed.action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropNoFlow), 2);
    assert_eq!(h.flow_count(), 1);
}

#[test]
fn the_allocator_never_hands_out_a_forwarded_port() {
    let Some(h) = harness() else { return };
    let mut ports = Vec::new();
    for port in 1..=3 {
        let out = redirected(h.outbound(&frames::udp(sock(HOST_A, port), sock(REMOTE, 53), b"q")));
        ports.push(View::new(&out).src_port());
    }
    ports.sort_unstable();
    assert_eq!(ports, [40000, 40002, 40003], "40001 is forwarded for UDP");
    let fourth = h.outbound(&frames::udp(sock(HOST_A, 4), sock(REMOTE, 53), b"q"));
    assert_eq!(fourth.action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropPortsExhausted), 1);
    // TCP may use 40001: only UDP is forwarded there.
    let tcp = redirected(h.outbound(&frames::tcp(
        sock(HOST_A, 5),
        sock(REMOTE, 53),
        Tcp::Syn,
        b"",
    )));
    assert!((40000..=40003).contains(&View::new(&tcp).src_port()));
    // And the forwarded UDP port still reaches its host.
    let query = redirected(h.reply(&frames::udp(sock(REMOTE, 53), sock(EGRESS_A, 40001), b"q")));
    assert_eq!(endpoints(&query), (sock(REMOTE, 53), sock(HOST_A, 53)));
}

#[test]
fn a_floating_ip_maps_its_host_both_ways() {
    let Some(h) = harness() else { return };
    let client = sock(REMOTE, 6000);
    let inbound = redirected(h.reply(&frames::udp(client, sock(FLOATING, 7777), b"ping")));
    assert_eq!(endpoints(&inbound), (client, sock(HOST_B, 7777)));
    let answer = redirected(h.outbound(&frames::udp(sock(HOST_B, 7777), client, b"pong")));
    assert_eq!(endpoints(&answer), (sock(FLOATING, 7777), client));
    // The host's own new flows leave from it, keeping their port.
    let own = redirected(h.outbound(&frames::udp(sock(HOST_B, 1234), sock(REMOTE, 53), b"q")));
    assert_eq!(endpoints(&own).0, sock(FLOATING, 1234));
    // Another host of the tenant leaves from the tenant's egress IP.
    let other = redirected(h.outbound(&frames::udp(
        sock(Ipv4Addr::new(172, 20, 20, 11), 1234),
        sock(REMOTE, 53),
        b"q",
    )));
    assert_eq!(View::new(&other).src(), EGRESS_B);
    assert_eq!(h.flow_count(), 3);
    h.assert_no_half_entries();
}

#[test]
fn removing_a_rule_ends_the_flows_it_opened_and_nothing_else() {
    let Some(mut h) = harness() else { return };
    let client = sock(REMOTE, 5555);
    redirected(h.reply(&frames::tcp(client, sock(EGRESS_A, 8888), Tcp::Syn, b"")));
    redirected(h.reply(&frames::udp(client, sock(FLOATING, 7777), b"ping")));
    redirected(h.outbound(&frames::udp(sock(HOST_A, 1), sock(REMOTE, 53), b"q")));
    redirected(h.outbound(&frames::udp(sock(HOST_B, 1234), sock(REMOTE, 53), b"q")));
    assert_eq!(h.flow_count(), 4);

    let ids = h.maps.tenant_ids().expect("ids");
    let tenant_a = conntrack::Allowed {
        egress: vec![EGRESS_A],
        sources: vec!["172.20.10.0/24".parse().expect("cidr")],
        zones: vec![0],
        // The TCP forward is gone; the UDP one stays.
        forwards: vec![PlannedForward {
            egress: EGRESS_A.into(),
            proto: 17,
            port: 40001,
            host: HOST_A.into(),
            host_port: 53,
        }],
        floating: Vec::new(),
        ..conntrack::Allowed::default()
    };
    let tenant_b = conntrack::Allowed {
        egress: vec![EGRESS_B],
        sources: vec!["172.20.20.0/24".parse().expect("cidr")],
        zones: vec![0],
        forwards: Vec::new(),
        floating: vec![PlannedFloating {
            address: FLOATING.into(),
            host: HOST_B.into(),
        }],
        ..conntrack::Allowed::default()
    };
    let allowed = HashMap::from([
        (ids["tenant-a"], tenant_a),
        (ids["tenant-b"], tenant_b.clone()),
    ]);
    let ended = conntrack::end_flows_not_allowed(&mut h.maps, &allowed).expect("ending");
    assert_eq!(ended.len(), 1, "only the TCP forward's flow: {ended:#?}");
    assert_eq!(ended[0].flow.endpoints().1.port(), 8888);

    // Without the floating IP, both flows through it end.
    let allowed = HashMap::from([(
        ids["tenant-b"],
        conntrack::Allowed {
            floating: Vec::new(),
            ..tenant_b
        },
    )]);
    let ended = conntrack::end_flows_not_allowed(&mut h.maps, &allowed).expect("ending");
    // tenant-a's flows go too: this map no longer names tenant-a.
    assert_eq!(ended.len(), 3, "{ended:#?}");
    assert_eq!(h.flow_count(), 0);
}

/// The same rules on IPv6 addresses: tenant-a forwards TCP 8888 of its
/// IPv6 egress IP to its host's port 80, tenant-b's host has an IPv6
/// floating IP.
const CONFIG_V6: &str = "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24, 2001:db8:10::/64]
    egressIPs: [192.168.31.101, 2001:db8:31::101]
    portForwards:
      - {egressIP: 2001:db8:31::101, protocol: tcp, port: 8888, to: '[2001:db8:10::10]:80'}
  - name: tenant-b
    sources: [172.20.20.0/24, 2001:db8:20::/64]
    egressIPs: [192.168.31.150, 2001:db8:31::150]
    floatingIPs:
      - {address: 2001:db8:31::200, host: 2001:db8:20::10}
";

const HOST_A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
const HOST_B_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x10);
const EGRESS_A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x101);
const EGRESS_B_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x150);
const FLOATING_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x200);
const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);

fn sock6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

#[track_caller]
fn redirected6(outcome: egress_tests::harness::Outcome) -> Vec<u8> {
    assert_eq!(outcome.action, XDP_REDIRECT);
    frames6::assert_checksums(&outcome.frame);
    outcome.frame
}

#[track_caller]
fn endpoints6(frame: &[u8]) -> (SocketAddrV6, SocketAddrV6) {
    let view = View6::new(frame);
    (
        sock6(view.src(), view.src_port()),
        sock6(view.dst(), view.dst_port()),
    )
}

#[test]
fn an_ipv6_port_forward_opens_a_flow_from_outside_and_its_answers_leave_from_it() {
    if !require_root() {
        return;
    }
    let h = Harness::with_config(CONFIG_V6);
    let client = sock6(REMOTE_V6, 5555);
    let forwarded = sock6(EGRESS_A_V6, 8888);
    let syn = redirected6(h.reply(&frames6::tcp(client, forwarded, Tcp::Syn, b"")));
    assert_eq!(endpoints6(&syn), (client, sock6(HOST_A_V6, 80)));
    assert_eq!(View6::new(&syn).hop_limit(), 63, "one router hop");
    assert_eq!(h.counter(Counter::InNewFlow), 1);
    let answer = redirected6(h.outbound(&frames6::tcp(
        sock6(HOST_A_V6, 80),
        client,
        Tcp::SynAck,
        b"",
    )));
    assert_eq!(endpoints6(&answer), (forwarded, client));
    let data = redirected6(h.reply(&frames6::tcp(
        client,
        forwarded,
        Tcp::Ack,
        b"GET / HTTP/1.0\r\n\r\n",
    )));
    assert_eq!(endpoints6(&data), (client, sock6(HOST_A_V6, 80)));
    assert_eq!(h.flow_count_v6(), 1);
    assert_eq!(h.counter(Counter::InNewFlow), 1, "one flow, opened once");
    h.assert_no_half_entries();

    // Only a SYN opens; a port no rule names opens nothing; nor does the
    // same port over IPv4, which has no such rule.
    let stray = h.reply(&frames6::tcp(
        sock6(REMOTE_V6, 5556),
        forwarded,
        Tcp::Ack,
        b"",
    ));
    assert_eq!(stray.action, XDP_DROP);
    let closed = h.reply(&frames6::tcp(
        sock6(REMOTE_V6, 5557),
        sock6(EGRESS_A_V6, 8889),
        Tcp::Syn,
        b"",
    ));
    assert_eq!(closed.action, XDP_DROP);
    let over_ipv4 = h.reply(&frames::tcp(
        sock(REMOTE, 5558),
        sock(EGRESS_A, 8888),
        Tcp::Syn,
        b"",
    ));
    assert_eq!(over_ipv4.action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropNoFlow), 3);
    assert_eq!(h.flow_count_v6(), 1);
    assert_eq!(h.flow_count(), 0);
}

#[test]
fn an_ipv6_floating_ip_maps_its_host_both_ways() {
    if !require_root() {
        return;
    }
    let mut h = Harness::with_config(CONFIG_V6);
    let client = sock6(REMOTE_V6, 6000);
    let inbound = redirected6(h.reply(&frames6::udp(client, sock6(FLOATING_V6, 7777), b"ping")));
    assert_eq!(endpoints6(&inbound), (client, sock6(HOST_B_V6, 7777)));
    let answer = redirected6(h.outbound(&frames6::udp(sock6(HOST_B_V6, 7777), client, b"pong")));
    assert_eq!(endpoints6(&answer), (sock6(FLOATING_V6, 7777), client));
    // The host's own new flows leave from it, keeping their port.
    let own = redirected6(h.outbound(&frames6::udp(
        sock6(HOST_B_V6, 1234),
        sock6(REMOTE_V6, 53),
        b"q",
    )));
    assert_eq!(endpoints6(&own).0, sock6(FLOATING_V6, 1234));
    // Another host of the tenant leaves from the tenant's egress IP.
    let other = redirected6(h.outbound(&frames6::udp(
        sock6(Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x11), 1234),
        sock6(REMOTE_V6, 53),
        b"q",
    )));
    assert_eq!(View6::new(&other).src(), EGRESS_B_V6);
    assert_eq!(h.flow_count_v6(), 3);
    h.assert_no_half_entries();

    // Without the floating IP, the flows through it end, and nothing else.
    let ids = h.maps.tenant_ids().expect("ids");
    let tenant_b = conntrack::Allowed {
        egress_v6: vec![EGRESS_B_V6],
        sources_v6: vec!["2001:db8:20::/64".parse().expect("cidr")],
        zones: vec![0],
        ..conntrack::Allowed::default()
    };
    let ended = conntrack::end_flows_not_allowed(
        &mut h.maps,
        &HashMap::from([(ids["tenant-b"], tenant_b)]),
    )
    .expect("ending");
    assert_eq!(ended.len(), 2, "{ended:#?}");
    assert!(
        ended
            .iter()
            .all(|e| e.flow.endpoints().0.ip() == IpAddr::V6(HOST_B_V6)),
        "{ended:#?}"
    );
    assert_eq!(h.flow_count_v6(), 1);
}
