//! Translation events on the real programs (BPF_PROG_TEST_RUN) and the
//! agent's own pipeline: a new flow produces exactly one creation record
//! with the tuple the packet was translated to; the sweeper's expiry, a
//! reset connection's close and a configuration change each produce the
//! end record with their reason and the flow's counters; a ring too small
//! for a flood counts every event it could not hold; an IPv6 (NAT66) flow
//! is reported in a record of its own kind and logged with its IPv6 ends.
//! Run for both hooks (`EGRESS_TEST_HOOK=tc`). Needs root.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use egress_agent::{
    audit::{
        Audit, Sink,
        event::{EndReason, EventKind, TranslationEvent},
        ring::{RawEvent, RingReader},
    },
    config::Timeouts,
    conntrack::{self, now_ns},
};
use egress_common::{
    config::CONFIG_F_FLOW_EVENTS,
    counters::Counter,
    events::{EVENT_FLOW_CREATED, EVENT_FLOW_CREATED_V6},
    flow::{DIR_OUTBOUND, PROTO_TCP},
};
use egress_tests::{
    frames::{self, Tcp, View},
    frames6::{self, View6},
    harness::{CONFIG_DUAL_STACK, Harness, XDP_REDIRECT},
    peers::TempDir,
    require_root,
};

const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
const HOST_B: Ipv4Addr = Ipv4Addr::new(172, 20, 20, 10);
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
// CONFIG_DUAL_STACK's IPv6 side.
const HOST_A6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
const HOST_B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x10);
const EGRESS_A6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x101);
const EGRESS_B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x150);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn sock6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// Keeps what the pipeline delivers, for the test to look at.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<TranslationEvent>>>);

impl Sink for Collected {
    fn name(&self) -> &'static str {
        "log"
    }

    fn write(&mut self, events: &[TranslationEvent]) -> anyhow::Result<()> {
        self.0.lock().expect("lock").extend_from_slice(events);
        Ok(())
    }
}

impl Collected {
    /// Waits until `count` events arrived; returns them all.
    #[track_caller]
    fn wait_for(&self, count: usize) -> Vec<TranslationEvent> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let events = self.0.lock().expect("lock").clone();
            if events.len() >= count || Instant::now() > deadline {
                assert_eq!(events.len(), count, "events delivered: {events:#?}");
                return events;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A harness with the pipeline reading its ring into `Collected`.
fn with_pipeline() -> Option<(Harness, Audit, Collected, TempDir)> {
    if !require_root() {
        return None;
    }
    pipeline_on(Harness::new())
}

/// `with_pipeline` on a harness of `CONFIG_DUAL_STACK`.
fn with_pipeline_dual_stack() -> Option<(Harness, Audit, Collected, TempDir)> {
    if !require_root() {
        return None;
    }
    pipeline_on(Harness::with_config(CONFIG_DUAL_STACK))
}

fn pipeline_on(h: Harness) -> Option<(Harness, Audit, Collected, TempDir)> {
    let run_dir = TempDir::new("audit");
    let collected = Collected::default();
    let audit = Audit::start(
        h.pin_dir(),
        run_dir.path(),
        true,
        vec![Box::new(collected.clone())],
    )
    .expect("starting the pipeline");
    let handle = audit.handle();
    let ids = h.maps.tenant_ids().expect("ids");
    handle.set_tenants(ids.iter().map(|(name, id)| (*id, name.as_str())));
    // The pipeline turns the dataplane's reporting on within a drain interval.
    let deadline = Instant::now() + Duration::from_secs(2);
    while h.maps.config.get(&0, 0).expect("config").flags & CONFIG_F_FLOW_EVENTS == 0 {
        assert!(
            Instant::now() < deadline,
            "the pipeline never asked for events"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Some((h, audit, collected, run_dir))
}

fn out(h: &Harness, frame: &[u8]) -> Vec<u8> {
    let outcome = h.outbound(frame);
    assert_eq!(outcome.action, XDP_REDIRECT);
    outcome.frame
}

fn back(h: &Harness, frame: &[u8]) {
    assert_eq!(h.reply(frame).action, XDP_REDIRECT);
}

#[test]
fn a_new_flow_is_recorded_once_with_its_translation() {
    let Some((h, audit, collected, _run)) = with_pipeline() else {
        return;
    };
    let before = jiff::Timestamp::now();
    let syn = out(
        &h,
        &frames::tcp(sock(HOST_A, 41234), sock(REMOTE, 443), Tcp::Syn, b""),
    );
    let nat_port = View::new(&syn).src_port();
    // More packets of the same flow, and a flow of another tenant.
    out(
        &h,
        &frames::tcp(sock(HOST_A, 41234), sock(REMOTE, 443), Tcp::Ack, b"x"),
    );
    let udp = out(&h, &frames::udp(sock(HOST_B, 5353), sock(REMOTE, 53), b"q"));
    let events = collected.wait_for(2);
    let tcp = &events[0];
    assert_eq!(tcp.event, EventKind::Create);
    assert_eq!(tcp.tenant, "tenant-a");
    assert_eq!(tcp.protocol, "tcp");
    assert_eq!(tcp.inside, SocketAddr::from(sock(HOST_A, 41234)));
    assert_eq!(tcp.outside, SocketAddr::from(sock(EGRESS_A, nat_port)));
    assert_eq!(tcp.destination, Some(SocketAddr::from(sock(REMOTE, 443))));
    assert_eq!((tcp.reason, tcp.outbound), (None, None));
    // Stamped on the dataplane's coarse clock: within a jiffy or two.
    let skew = jiff::SignedDuration::from_millis(50);
    assert!(
        tcp.time >= before - skew && tcp.time <= jiff::Timestamp::now() + skew,
        "{} not around {before}",
        tcp.time
    );
    let b = &events[1];
    assert_eq!(
        (b.tenant.as_str(), b.protocol.as_str()),
        ("tenant-b", "udp")
    );
    assert_eq!(
        b.outside,
        SocketAddr::from(sock(View::new(&udp).src(), View::new(&udp).src_port()))
    );
    assert_eq!(h.counter(Counter::EventsLost), 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        collected.0.lock().expect("lock").len(),
        2,
        "one record per flow"
    );
    audit.stop(Duration::from_secs(1));
}

#[test]
fn expiry_close_and_configuration_changes_end_flows_with_their_reason() {
    let Some((mut h, audit, collected, _run)) = with_pipeline() else {
        return;
    };
    let handle = audit.handle();
    // A UDP flow answered once; a TCP connection the server resets; a flow
    // of tenant-b, which the next configuration drops.
    let udp = out(
        &h,
        &frames::udp(sock(HOST_A, 5000), sock(REMOTE, 53), b"query"),
    );
    let udp_nat = View::new(&udp).src_port();
    back(
        &h,
        &frames::udp(sock(REMOTE, 53), sock(EGRESS_A, udp_nat), b"answer!"),
    );
    let syn = out(
        &h,
        &frames::tcp(sock(HOST_A, 6000), sock(REMOTE, 443), Tcp::Syn, b""),
    );
    back(
        &h,
        &frames::tcp(
            sock(REMOTE, 443),
            sock(EGRESS_A, View::new(&syn).src_port()),
            Tcp::Rst,
            b"",
        ),
    );
    out(&h, &frames::udp(sock(HOST_B, 7000), sock(REMOTE, 53), b"q"));
    collected.wait_for(3);

    // The reset connection goes after tcpClose, the UDP flow after udpReplied.
    let timeouts = Timeouts {
        tcp_close: Duration::from_secs(10),
        udp_replied: Duration::from_secs(120),
        ..Timeouts::default()
    };
    let t0 = now_ns();
    let report = h.sweep(t0 + 11_000_000_000, &timeouts);
    assert_eq!(report.ended.len(), 1);
    handle.ended(&report.ended);
    // Before tenant-b's flow expires, a configuration without tenant-b
    // ends it.
    let ids = h.maps.tenant_ids().expect("ids");
    let allowed: HashMap<u16, conntrack::Allowed> = HashMap::from([(
        ids["tenant-a"],
        conntrack::Allowed {
            egress: vec![EGRESS_A],
            sources: vec!["172.20.10.0/24".parse().expect("cidr")],
            zones: vec![0],
            ..conntrack::Allowed::default()
        },
    )]);
    let gone = conntrack::end_flows_not_allowed(&mut h.maps, &allowed).expect("ending");
    handle.ended(&gone);

    let report = h.sweep(t0 + 121_000_000_000, &timeouts);
    handle.ended(&report.ended);

    let events = collected.wait_for(6);
    let end_of = |port: u16| {
        events
            .iter()
            .find(|e| e.event == EventKind::End && e.inside.port() == port)
            .unwrap_or_else(|| panic!("no end record for inside port {port}: {events:#?}"))
    };
    let closed = end_of(6000);
    assert_eq!(closed.reason, Some(EndReason::Closed));
    assert_eq!(closed.outbound.map(|t| t.packets), Some(1));
    assert_eq!(closed.inbound.map(|t| t.packets), Some(1));
    let expired = end_of(5000);
    assert_eq!(expired.reason, Some(EndReason::Expired));
    assert_eq!(expired.outside, SocketAddr::from(sock(EGRESS_A, udp_nat)));
    // IP packet sizes: 20 + 8 + payload each way.
    assert_eq!(
        expired.outbound.map(|t| (t.packets, t.bytes)),
        Some((1, 33))
    );
    assert_eq!(expired.inbound.map(|t| (t.packets, t.bytes)), Some((1, 35)));
    let created = events
        .iter()
        .find(|e| e.event == EventKind::Create && e.inside.port() == 5000)
        .expect("creation record");
    // The end names the same flow: the start is the creation's, to the
    // second the table keeps.
    assert!(expired.start.duration_since(created.start).abs() < jiff::SignedDuration::from_secs(1));
    let config = end_of(7000);
    assert_eq!(config.reason, Some(EndReason::Config));
    assert_eq!(config.tenant, "tenant-b");
    assert_eq!(h.flow_count(), 0);
    audit.stop(Duration::from_secs(1));
}

#[test]
fn a_flood_larger_than_the_ring_is_counted_as_lost() {
    if !require_root() {
        return;
    }
    let h = Harness::with_config(
        "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
conntrack: {maxFlows: 8192}
audit: {eventRingSize: 64KiB}
",
    );
    // Reporting on, and nobody reading: the ring fills.
    let mut config = h.maps.config.get(&0, 0).expect("config");
    config.flags |= CONFIG_F_FLOW_EVENTS;
    let mut maps = egress_agent::dataplane::maps::Maps::open(h.pin_dir()).expect("maps");
    maps.config.set(0, config, 0).expect("config");
    let flows = 2000u16;
    for port in 0..flows {
        out(
            &h,
            &frames::udp(sock(HOST_A, 10_000 + port), sock(REMOTE, 53), b"q"),
        );
    }
    let mut reader = RingReader::open(h.pin_dir()).expect("ring");
    let mut held: Vec<RawEvent> = Vec::new();
    reader.drain(usize::MAX, &mut held);
    let lost = h.counter(Counter::EventsLost);
    assert!(lost > 0, "a 64 KiB ring cannot hold {flows} events");
    assert_eq!(held.len() as u64 + lost, u64::from(flows));
    assert!(
        held.iter()
            .all(|e| matches!(e, RawEvent::V4(e) if e.kind == EVENT_FLOW_CREATED))
    );
    assert_eq!(
        h.flow_count(),
        usize::from(flows),
        "every flow was still created"
    );
}

#[test]
fn without_anyone_asking_the_dataplane_reports_nothing() {
    if !require_root() {
        return;
    }
    let h = Harness::new();
    out(&h, &frames::udp(sock(HOST_A, 5000), sock(REMOTE, 53), b"q"));
    let mut held = Vec::new();
    RingReader::open(h.pin_dir())
        .expect("ring")
        .drain(usize::MAX, &mut held);
    assert!(held.is_empty());
    assert_eq!(h.counter(Counter::EventsLost), 0);
}

#[test]
fn an_ipv6_new_flow_is_one_record_of_its_own_kind_in_the_ring() {
    if !require_root() {
        return;
    }
    let h = Harness::with_config(CONFIG_DUAL_STACK);
    let mut config = h.maps.config.get(&0, 0).expect("config");
    config.flags |= CONFIG_F_FLOW_EVENTS;
    let mut maps = egress_agent::dataplane::maps::Maps::open(h.pin_dir()).expect("maps");
    maps.config.set(0, config, 0).expect("config");
    let before = now_ns();
    // An IPv4 flow, then an IPv6 one of two packets: one record each.
    out(&h, &frames::udp(sock(HOST_A, 5000), sock(REMOTE, 53), b"q"));
    let syn = out(
        &h,
        &frames6::tcp(sock6(HOST_A6, 41234), sock6(REMOTE6, 443), Tcp::Syn, b""),
    );
    out(
        &h,
        &frames6::tcp(sock6(HOST_A6, 41234), sock6(REMOTE6, 443), Tcp::Ack, b"x"),
    );
    let sent = View6::new(&syn);
    assert_eq!(sent.src(), EGRESS_A6);
    let mut held: Vec<RawEvent> = Vec::new();
    RingReader::open(h.pin_dir())
        .expect("ring")
        .drain(usize::MAX, &mut held);
    assert_eq!(held.len(), 2, "{held:#?}");
    assert!(matches!(held[0], RawEvent::V4(e) if e.kind == EVENT_FLOW_CREATED));
    let RawEvent::V6(v6) = held[1] else {
        panic!("not an IPv6 record: {:?}", held[1]);
    };
    assert_eq!(v6.kind, EVENT_FLOW_CREATED_V6);
    assert_eq!(v6.tenant, h.maps.tenant_ids().expect("ids")["tenant-a"]);
    assert_eq!(v6.key.src, HOST_A6.octets());
    assert_eq!(v6.key.dst, REMOTE6.octets());
    assert_eq!(u16::from_be(v6.key.src_port), 41234);
    assert_eq!(u16::from_be(v6.key.dst_port), 443);
    assert_eq!((v6.key.proto, v6.key.direction), (PROTO_TCP, DIR_OUTBOUND));
    // The tuple the packet left with.
    assert_eq!(v6.nat_addr, EGRESS_A6.octets());
    assert_eq!(u16::from_be(v6.nat_port), sent.src_port());
    assert!(v6.time_ns >= before && v6.time_ns <= now_ns() + 20_000_000);
    assert_eq!(h.counter(Counter::EventsLost), 0);
}

#[test]
fn ipv6_flows_are_logged_with_their_ipv6_ends_created_and_ended() {
    let Some((mut h, audit, collected, _run)) = with_pipeline_dual_stack() else {
        return;
    };
    let syn = out(
        &h,
        &frames6::tcp(sock6(HOST_A6, 41234), sock6(REMOTE6, 443), Tcp::Syn, b""),
    );
    let tcp_nat = View6::new(&syn).src_port();
    let echo = out(&h, &frames6::echo_request(HOST_B6, REMOTE6, 77, 1));
    let echo_id = View6::new(&echo).echo_id();
    let events = collected.wait_for(2);
    let tcp = &events[0];
    assert_eq!(tcp.event, EventKind::Create);
    assert_eq!(
        (tcp.tenant.as_str(), tcp.protocol.as_str()),
        ("tenant-a", "tcp")
    );
    assert_eq!(tcp.inside, SocketAddr::from(sock6(HOST_A6, 41234)));
    assert_eq!(tcp.outside, SocketAddr::from(sock6(EGRESS_A6, tcp_nat)));
    assert_eq!(tcp.destination, Some(SocketAddr::from(sock6(REMOTE6, 443))));
    let icmp = &events[1];
    assert_eq!(
        (icmp.tenant.as_str(), icmp.protocol.as_str()),
        ("tenant-b", "icmpv6")
    );
    assert_eq!(icmp.inside, SocketAddr::from(sock6(HOST_B6, 77)));
    assert_eq!(icmp.outside, SocketAddr::from(sock6(EGRESS_B6, echo_id)));

    // Expired, both end with the same ends.
    let report = h.sweep(now_ns() + 3_600_000_000_000, &Timeouts::default());
    assert_eq!(report.ended.len(), 2);
    audit.handle().ended(&report.ended);
    let events = collected.wait_for(4);
    let ended = events
        .iter()
        .find(|e| e.event == EventKind::End && e.protocol == "tcp")
        .expect("the TCP flow's end");
    assert_eq!(ended.reason, Some(EndReason::Expired));
    assert_eq!(
        (ended.inside, ended.outside, ended.destination),
        (tcp.inside, tcp.outside, tcp.destination)
    );
    assert_eq!(ended.outbound.map(|t| t.packets), Some(1));
    assert_eq!(h.counter(Counter::EventsLost), 0);
    audit.stop(Duration::from_secs(1));
}
