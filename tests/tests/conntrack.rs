//! Connection tracking and port allocation on the real programs
//! (BPF_PROG_TEST_RUN) with the agent's own sweeper: TCP states and
//! timeouts, expiry of both halves together, flows refreshed during a sweep,
//! port exhaustion and recovery, port reuse across destinations, several
//! egress IPs, tenants told apart by ingress MAC, and the batched read of
//! the table the sweeper and `flows` use. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use egress_agent::{config::Timeouts, conntrack::FlowState};
use egress_common::{
    counters::Counter,
    flow::{DIR_OUTBOUND, FlowEntryV4, FlowKeyV4, PROTO_UDP},
};
use egress_tests::{
    frames::{self, Tcp, View, assert_checksums},
    harness::{Harness, XDP_DROP, XDP_REDIRECT},
    require_root,
};

const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER_REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn now_ns() -> u64 {
    egress_agent::conntrack::now_ns()
}

fn secs(s: u64) -> u64 {
    s * 1_000_000_000
}

#[track_caller]
fn out(h: &Harness, frame: &[u8]) -> Vec<u8> {
    let result = h.outbound(frame);
    assert_eq!(result.action, XDP_REDIRECT, "outbound verdict");
    assert_checksums(&result.frame);
    result.frame
}

#[track_caller]
fn back(h: &Harness, frame: &[u8]) -> Vec<u8> {
    let result = h.reply(frame);
    assert_eq!(result.action, XDP_REDIRECT, "reply verdict");
    result.frame
}

fn only_state(h: &Harness) -> FlowState {
    let flows = h.flows();
    assert_eq!(flows.len(), 1, "{flows:#?}");
    flows[0].state()
}

#[test]
fn tcp_states_follow_the_connection() {
    if !require_root() {
        return;
    }
    let h = Harness::new();
    let (client, server) = (sock(HOST_A, 40000), sock(REMOTE, 443));
    let sent = out(&h, &frames::tcp(client, server, Tcp::Syn, b""));
    let nat = sock(EGRESS_A, View::new(&sent).src_port());
    assert_eq!(only_state(&h), FlowState::SynSent);
    back(&h, &frames::tcp(server, nat, Tcp::SynAck, b""));
    assert_eq!(only_state(&h), FlowState::Established);
    out(&h, &frames::tcp(client, server, Tcp::FinAck, b""));
    assert_eq!(only_state(&h), FlowState::FinWait);
    back(&h, &frames::tcp(server, nat, Tcp::FinAck, b""));
    assert_eq!(only_state(&h), FlowState::TimeWait);

    // The same tuple opens again after the close: same translation, state
    // back to the handshake.
    let again = out(&h, &frames::tcp(client, server, Tcp::Syn, b""));
    assert_eq!(View::new(&again).src_port(), nat.port());
    assert_eq!(only_state(&h), FlowState::SynSent);
    back(&h, &frames::tcp(server, nat, Tcp::Rst, b""));
    assert_eq!(only_state(&h), FlowState::Close);
    h.assert_no_half_entries();
}

#[test]
fn each_state_expires_after_its_own_timeout_with_both_halves() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new();
    let timeouts = Timeouts {
        tcp_established: Duration::from_secs(300),
        tcp_close: Duration::from_secs(10),
        udp: Duration::from_secs(30),
        ..Timeouts::default()
    };
    // An established TCP connection, one reset, one unanswered UDP flow.
    let est = out(
        &h,
        &frames::tcp(sock(HOST_A, 1), sock(REMOTE, 443), Tcp::Syn, b""),
    );
    back(
        &h,
        &frames::tcp(
            sock(REMOTE, 443),
            sock(EGRESS_A, View::new(&est).src_port()),
            Tcp::SynAck,
            b"",
        ),
    );
    let rst = out(
        &h,
        &frames::tcp(sock(HOST_A, 2), sock(REMOTE, 443), Tcp::Syn, b""),
    );
    back(
        &h,
        &frames::tcp(
            sock(REMOTE, 443),
            sock(EGRESS_A, View::new(&rst).src_port()),
            Tcp::Rst,
            b"",
        ),
    );
    out(&h, &frames::udp(sock(HOST_A, 3), sock(REMOTE, 53), b"q"));
    assert_eq!(h.flow_count(), 3);
    let t0 = now_ns();

    let report = h.sweep(t0 + secs(5), &timeouts);
    assert_eq!((report.flows_expired, report.flows_kept), (0, 3));
    let report = h.sweep(t0 + secs(12), &timeouts);
    assert_eq!(
        report.flows_expired, 1,
        "the reset connection, after tcpClose"
    );
    let report = h.sweep(t0 + secs(31), &timeouts);
    assert_eq!(
        report.flows_expired, 1,
        "the unanswered UDP flow, after udp"
    );
    assert_eq!(h.flow_count(), 1);
    h.assert_no_half_entries();
    assert_eq!(h.flows()[0].state(), FlowState::Established);
    let report = h.sweep(t0 + secs(301), &timeouts);
    assert_eq!(report.flows_expired, 1);
    assert!(
        h.maps.flows().is_empty(),
        "both halves of every flow are gone"
    );
}

#[test]
fn a_flow_refreshed_while_the_sweep_runs_is_kept() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new();
    let timeouts = Timeouts {
        udp: Duration::from_secs(1),
        ..Timeouts::default()
    };
    out(&h, &frames::udp(sock(HOST_A, 4000), sock(REMOTE, 53), b"q"));
    // The sweeper's snapshot is taken, then traffic arrives before it acts.
    let snapshot = h.maps.flows();
    std::thread::sleep(Duration::from_millis(20));
    out(&h, &frames::udp(sock(HOST_A, 4000), sock(REMOTE, 53), b"q"));
    let report = h.sweep_snapshot(snapshot, now_ns() + secs(60), &timeouts);
    assert_eq!((report.flows_expired, report.flows_kept), (0, 1));
    assert_eq!(h.flow_count(), 1);
    // Without new traffic the next sweep removes it.
    let report = h.sweep(now_ns() + secs(60), &timeouts);
    assert_eq!(report.flows_expired, 1);
}

#[test]
fn halves_evicted_by_the_lru_are_cleaned_up() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new();
    let a = out(&h, &frames::udp(sock(HOST_A, 5000), sock(REMOTE, 53), b"q"));
    out(&h, &frames::udp(sock(HOST_A, 5001), sock(REMOTE, 53), b"q"));
    // Simulate eviction of one flow's outbound half and the other's reply.
    let entries = h.maps.flows();
    let port_a = View::new(&a).src_port().to_be();
    for (key, entry) in &entries {
        let is_a = if key.direction == 0 {
            entry.nat_port == port_a
        } else {
            key.dst_port == port_a
        };
        if (is_a && key.direction == 0) || (!is_a && key.direction == 1) {
            h.maps.conntrack.remove(key).expect("removing a half");
        }
    }
    let report = h.sweep(now_ns() + secs(10), &Timeouts::default());
    assert_eq!(report.halves_orphaned, 2);
    assert!(h.maps.flows().is_empty());
    // Young orphans are left alone: they may be a flow being created.
    out(&h, &frames::udp(sock(HOST_A, 5002), sock(REMOTE, 53), b"q"));
    let report = h.sweep(now_ns(), &Timeouts::default());
    assert_eq!(report.halves_orphaned, 0);
}

#[test]
fn fragment_memories_expire() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new();
    let datagram = frames::udp(sock(HOST_A, 8000), sock(REMOTE, 9000), &[1; 600]);
    let (first, _) = frames::fragment(&datagram, 320);
    out(&h, &first);
    assert_eq!(h.sweep(now_ns(), &Timeouts::default()).fragments_expired, 0);
    assert_eq!(
        h.sweep(now_ns() + secs(31), &Timeouts::default())
            .fragments_expired,
        1
    );
}

const TINY_RANGE: &str = "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
    ports: {min: 20000, max: 20003}
conntrack: {maxFlows: 1024}
";

#[test]
fn exhausted_ports_drop_new_flows_until_ports_free_up() {
    if !require_root() {
        return;
    }
    let mut h = Harness::with_config(TINY_RANGE);
    let mut ports = BTreeSet::new();
    for source in 0..4 {
        let sent = out(
            &h,
            &frames::udp(sock(HOST_A, 30000 + source), sock(REMOTE, 53), b"q"),
        );
        ports.insert(View::new(&sent).src_port());
    }
    assert_eq!(
        ports,
        BTreeSet::from([20000, 20001, 20002, 20003]),
        "every port of the range, once"
    );

    let fifth = frames::udp(sock(HOST_A, 30004), sock(REMOTE, 53), b"q");
    assert_eq!(h.outbound(&fifth).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropPortsExhausted), 1);
    // Existing flows are untouched, both ways.
    let again = out(
        &h,
        &frames::udp(sock(HOST_A, 30000), sock(REMOTE, 53), b"q"),
    );
    let nat = View::new(&again).src_port();
    let reply = back(
        &h,
        &frames::udp(sock(REMOTE, 53), sock(EGRESS_A, nat), b"a"),
    );
    assert_eq!(View::new(&reply).dst_port(), 30000);
    // The range is per destination: another server can still be reached.
    out(
        &h,
        &frames::udp(sock(HOST_A, 30004), sock(OTHER_REMOTE, 53), b"q"),
    );
    h.assert_no_half_entries();

    // Once flows expire, new flows work again.
    let report = h.sweep(now_ns() + secs(3600), &Timeouts::default());
    assert_eq!(report.flows_expired, 5);
    out(&h, &fifth);
}

#[test]
fn ports_are_reused_towards_different_destinations() {
    if !require_root() {
        return;
    }
    let h = Harness::with_config(TINY_RANGE);
    // 4 ports, but 4 flows to each of 10 servers: 40 concurrent flows.
    for server in 0..10u8 {
        for source in 0..4u16 {
            let dst = sock(Ipv4Addr::new(198, 51, 100, 100 + server), 443);
            out(
                &h,
                &frames::tcp(sock(HOST_A, 31000 + source), dst, Tcp::Syn, b""),
            );
        }
    }
    assert_eq!(h.flow_count(), 40);
    assert_eq!(h.counter(Counter::OutDropPortsExhausted), 0);
    h.assert_no_half_entries();
}

#[test]
fn several_egress_ips_are_spread_by_source_and_destination() {
    if !require_root() {
        return;
    }
    let h = Harness::with_config(
        "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: spread
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101, 192.168.31.102, 192.168.31.103]
",
    );
    let mut by_host: BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for host in 2..62u8 {
        let src = Ipv4Addr::new(172, 20, 10, host);
        for port in [1000, 2000, 3000] {
            let sent = out(&h, &frames::udp(sock(src, port), sock(REMOTE, 53), b"q"));
            by_host
                .entry(src)
                .or_default()
                .insert(View::new(&sent).src());
        }
    }
    for (host, used) in &by_host {
        assert_eq!(
            used.len(),
            1,
            "{host} to one server must keep one egress IP, used {used:?}"
        );
    }
    let used: BTreeSet<Ipv4Addr> = by_host.values().flatten().copied().collect();
    assert_eq!(
        used.len(),
        3,
        "60 hosts spread over all three addresses: {used:?}"
    );
}

/// Seed 002: one pod CIDR, tenants told apart by the next-hop MAC.
const BY_MAC: &str = "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: ns-blue
    sources: [10.128.0.0/14]
    egressIPs: [192.168.31.113]
    ingress: [{interface: int0, mac: '02:00:00:00:00:0b'}]
  - name: ns-red
    sources: [10.128.0.0/14]
    egressIPs: [192.168.31.114]
    ingress: [{interface: int0, mac: '02:00:00:00:00:0c'}]
";

#[test]
fn tenants_sharing_a_pod_cidr_are_told_apart_by_next_hop_mac() {
    if !require_root() {
        return;
    }
    let h = Harness::with_config(BY_MAC);
    let pod = sock(Ipv4Addr::new(10, 128, 0, 10), 45000);
    let to_mac = |mac: [u8; 6]| {
        let mut frame = frames::udp(pod, sock(REMOTE, 53), b"q");
        frame[0..6].copy_from_slice(&mac);
        frame
    };
    let blue = out(&h, &to_mac([2, 0, 0, 0, 0, 0x0b]));
    let red = out(&h, &to_mac([2, 0, 0, 0, 0, 0x0c]));
    assert_eq!(View::new(&blue).src(), Ipv4Addr::new(192, 168, 31, 113));
    assert_eq!(View::new(&red).src(), Ipv4Addr::new(192, 168, 31, 114));
    assert_eq!(
        h.flow_count(),
        2,
        "the same tuple in two tenants is two flows"
    );
    // The gateway's own MAC belongs to no tenant: fail closed (seed 002's
    // stale-ARP leak).
    assert_eq!(h.outbound(&to_mac([2, 0, 0, 0, 0, 0x0d])).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropUnclassified), 1);
}

#[test]
fn the_batched_read_returns_exactly_the_table() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new();
    // More entries than buckets' worth of one chunk, so the read takes many
    // calls, and some buckets hold several entries.
    let mut written = BTreeMap::new();
    for i in 0..5000u32 {
        let key = FlowKeyV4 {
            src: (0x0a00_0000 + i).to_be_bytes(),
            dst: REMOTE.octets(),
            src_port: 1000u16.to_be(),
            dst_port: 53u16.to_be(),
            proto: PROTO_UDP,
            direction: DIR_OUTBOUND,
            zone: 0,
        };
        let entry = FlowEntryV4 {
            packets: u64::from(i),
            ..FlowEntryV4::default()
        };
        h.maps.conntrack.insert(key, entry, 0).expect("insert");
        written.insert(key, entry);
    }
    let walked: BTreeMap<_, _> = h.maps.conntrack.iter().map(|e| e.expect("entry")).collect();
    assert_eq!(walked, written, "the one-key walk sees the table");
    for chunk in [1, 7, 4096] {
        let batched = egress_agent::dataplane::batch::entries(&h.maps.conntrack, chunk)
            .unwrap_or_else(|err| panic!("batched read, chunk {chunk}: {err}"));
        assert_eq!(
            batched.len(),
            written.len(),
            "no entry twice, none missed (chunk {chunk})"
        );
        let batched: BTreeMap<_, _> = batched.into_iter().collect();
        assert_eq!(batched, written, "chunk {chunk}");
    }
    assert_eq!(h.maps.flows().len(), written.len());
}
