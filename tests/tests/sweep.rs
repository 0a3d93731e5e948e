//! The dataplane's own flow expiry (`conntrack_sweep`), for gateways where
//! no agent process stays: on the real programs (BPF_PROG_TEST_RUN), flows
//! idle past their state's timeout end with both halves and are counted
//! against their tenant, as the agent's sweeper would; others stay; walks
//! happen once per interval; a lone half goes only after its grace time;
//! every packet is handed on untouched. Flows are made through the hook
//! under test (`EGRESS_TEST_HOOK=tc` for TC). Needs root.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use egress_agent::{
    config::Timeouts,
    conntrack::{self, FlowState, now_ns},
};
use egress_common::{
    flow::{DIR_REPLY, FlowEntryV4, FlowKeyV4, PROTO_UDP, REPLY_ZONE},
    names,
    sweep::{ORPHAN_GRACE_NS, SelfSweep},
};
use egress_tests::{
    frames::{self, Tcp, View},
    frames6::{self, View6},
    harness::{CONFIG_DUAL_STACK, Harness, XDP_REDIRECT},
    require_root,
};

const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
const HOST_B: Ipv4Addr = Ipv4Addr::new(172, 20, 20, 10);
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);
const EGRESS_B: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 150);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const HOST_A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);
/// TC_ACT_UNSPEC: the next filter (the outbound program) runs.
const HAND_ON: i32 = -1;
const HOUR: Duration = Duration::from_secs(3600);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[track_caller]
fn out(h: &Harness, frame: &[u8]) -> Vec<u8> {
    let result = h.outbound(frame);
    assert_eq!(result.action, XDP_REDIRECT, "outbound verdict");
    result.frame
}

#[track_caller]
fn back(h: &Harness, frame: &[u8]) {
    assert_eq!(h.reply(frame).action, XDP_REDIRECT, "reply verdict");
}

/// Runs the sweep program on one packet, which it must hand on.
#[track_caller]
fn sweep_packet(h: &Harness) {
    let frame = frames::udp(sock(HOST_A, 9), sock(REMOTE, 9), b"");
    assert_eq!(
        h.tc(names::PROG_CONNTRACK_SWEEP, &frame, h.internal),
        HAND_ON
    );
}

fn set_sweep(h: &mut Harness, sweep: SelfSweep) {
    h.maps.self_sweep.set(0, sweep, 0).expect("SELF_SWEEP");
}

fn sweep_state(h: &Harness) -> SelfSweep {
    h.maps.self_sweep.get(&0, 0).expect("SELF_SWEEP")
}

fn ended(h: &Harness, tenant: &str) -> u64 {
    let id = h.maps.tenant_ids().expect("ids")[tenant];
    h.maps.ended.get(&u32::from(id), 0).expect("TENANT_ENDED")
}

/// Short timeouts for the states that should go, an hour for the rest.
fn timeouts() -> Timeouts {
    Timeouts {
        tcp_syn_sent: HOUR,
        tcp_established: HOUR,
        tcp_fin_wait: HOUR,
        tcp_time_wait: HOUR,
        tcp_close: HOUR,
        udp: Duration::ZERO,
        udp_replied: HOUR,
        icmp: Duration::ZERO,
    }
}

#[test]
fn idle_flows_end_with_both_halves_and_count_against_their_tenant() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new();
    // An established TCP flow and a replied UDP flow (kept), an unreplied
    // UDP flow and a ping (their timeouts are zero: ended).
    let (client, server) = (sock(HOST_A, 40000), sock(REMOTE, 443));
    let syn = out(&h, &frames::tcp(client, server, Tcp::Syn, b""));
    let nat = sock(EGRESS_A, View::new(&syn).src_port());
    back(&h, &frames::tcp(server, nat, Tcp::SynAck, b""));
    let dns = out(&h, &frames::udp(sock(HOST_B, 5353), sock(REMOTE, 53), b"q"));
    let dns_nat = sock(EGRESS_B, View::new(&dns).src_port());
    back(&h, &frames::udp(sock(REMOTE, 53), dns_nat, b"a"));
    out(
        &h,
        &frames::udp(sock(HOST_A, 7000), sock(REMOTE, 7000), b"x"),
    );
    out(&h, &frames::echo_request(HOST_B, REMOTE, 77, 1));
    assert_eq!(h.flows().len(), 4);

    // Off (interval 0, as while an agent sweeps): nothing happens.
    sweep_packet(&h);
    assert_eq!(h.flows().len(), 4);
    assert_eq!(sweep_state(&h).walks, 0);

    let mut sweep = conntrack::self_sweep(Duration::from_nanos(1), &timeouts());
    // Interval over since "boot": the next packet walks.
    sweep.last_ns = 0;
    set_sweep(&mut h, sweep);
    let (ended_a, ended_b) = (ended(&h, "tenant-a"), ended(&h, "tenant-b"));
    sweep_packet(&h);

    let after = sweep_state(&h);
    assert_eq!(after.walks, 1);
    assert_eq!(after.ended, 2);
    let flows = h.flows();
    let mut kept: Vec<FlowState> = flows.iter().map(conntrack::Flow::state).collect();
    kept.sort_by_key(|s| s.as_str());
    assert_eq!(kept, [FlowState::Established, FlowState::Replied]);
    assert!(
        flows.iter().all(|f| f.reply.is_some()),
        "no half left: {flows:#?}"
    );
    assert_eq!(
        h.maps.conntrack.keys().count(),
        4,
        "two flows, two halves each"
    );
    assert_eq!(ended(&h, "tenant-a"), ended_a + 1);
    assert_eq!(ended(&h, "tenant-b"), ended_b + 1);

    // The ended UDP tuple opens a new flow on its next packet.
    out(
        &h,
        &frames::udp(sock(HOST_A, 7000), sock(REMOTE, 7000), b"y"),
    );
    assert_eq!(h.flows().len(), 3);
}

#[test]
fn walks_happen_once_per_interval() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new();
    out(
        &h,
        &frames::udp(sock(HOST_A, 7000), sock(REMOTE, 7000), b"x"),
    );
    // An interval far longer than the test, but shorter than the machine
    // has been up (a fresh CI machine's monotonic clock starts at boot, so
    // "an hour ago" may not exist yet; building the tests alone takes
    // minutes).
    let interval = Duration::from_secs(60);
    let mut sweep = conntrack::self_sweep(interval, &timeouts());
    sweep.last_ns = now_ns();
    set_sweep(&mut h, sweep);
    for _ in 0..3 {
        sweep_packet(&h);
    }
    assert_eq!(sweep_state(&h).walks, 0, "the interval is not over");
    assert_eq!(
        h.flows().len(),
        1,
        "an expired flow waits for the next walk"
    );

    let mut due = sweep_state(&h);
    due.last_ns = now_ns() - interval.as_nanos() as u64;
    set_sweep(&mut h, due);
    sweep_packet(&h);
    sweep_packet(&h);
    assert_eq!(sweep_state(&h).walks, 1, "one walk per interval");
    assert!(h.flows().is_empty());
}

#[test]
fn a_lone_half_goes_only_after_its_grace_time() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new();
    let now = now_ns();
    let lone = |port: u16, last_seen_ns: u64| {
        (
            FlowKeyV4 {
                src: REMOTE.octets(),
                dst: EGRESS_A.octets(),
                src_port: 53u16.to_be(),
                dst_port: port.to_be(),
                proto: PROTO_UDP,
                direction: DIR_REPLY,
                zone: REPLY_ZONE,
            },
            FlowEntryV4 {
                last_seen_ns,
                nat_addr: HOST_A.octets(),
                nat_port: port.to_be(),
                ..FlowEntryV4::default()
            },
        )
    };
    let (fresh_key, fresh) = lone(30001, now);
    let (stale_key, stale) = lone(30002, now - ORPHAN_GRACE_NS - 1_000_000_000);
    h.maps
        .conntrack
        .insert(fresh_key, fresh, 0)
        .expect("insert");
    h.maps
        .conntrack
        .insert(stale_key, stale, 0)
        .expect("insert");
    let mut sweep = conntrack::self_sweep(Duration::from_nanos(1), &timeouts());
    sweep.last_ns = 0;
    set_sweep(&mut h, sweep);
    sweep_packet(&h);
    assert_eq!(sweep_state(&h).orphans, 1);
    let keys: Vec<FlowKeyV4> = h.maps.conntrack.keys().map(Result::unwrap).collect();
    assert_eq!(
        keys,
        [fresh_key],
        "a half just inserted may be a new flow's first"
    );
}

/// IPv6 flows are walked as IPv4's are, in the same walk.
#[test]
fn ipv6_flows_are_walked_too() {
    if !require_root() {
        return;
    }
    let mut h = Harness::with_config(CONFIG_DUAL_STACK);
    let host = SocketAddrV6::new(HOST_A_V6, 7000, 0, 0);
    let remote = SocketAddrV6::new(REMOTE_V6, 7000, 0, 0);
    let udp = h.outbound(&frames6::udp(host, remote, b"x"));
    assert_eq!(udp.action, XDP_REDIRECT);
    // A replied UDP flow (kept: its timeout is an hour here).
    let kept = h.outbound(&frames6::udp(
        SocketAddrV6::new(HOST_A_V6, 7001, 0, 0),
        remote,
        b"x",
    ));
    let nat = View6::new(&kept.frame);
    let answer = frames6::udp(
        remote,
        SocketAddrV6::new(nat.src(), nat.src_port(), 0, 0),
        b"a",
    );
    assert_eq!(h.reply(&answer).action, XDP_REDIRECT);
    assert_eq!(h.flow_count_v6(), 2);
    let ended_before = ended(&h, "tenant-a");

    let mut sweep = conntrack::self_sweep(Duration::from_nanos(1), &timeouts());
    sweep.last_ns = 0;
    set_sweep(&mut h, sweep);
    sweep_packet(&h);

    assert_eq!(sweep_state(&h).ended, 1, "the unreplied IPv6 flow ended");
    assert_eq!(h.flow_count_v6(), 1, "the replied one stays");
    assert_eq!(h.maps.conntrack_v6.keys().count(), 2, "with both halves");
    assert_eq!(ended(&h, "tenant-a"), ended_before + 1);
}
