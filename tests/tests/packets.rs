//! The real dataplane programs on crafted frames (BPF_PROG_TEST_RUN), no
//! network involved: every verdict, every rewritten field and every
//! checksum, both directions. Needs root. See `egress_tests::harness` for
//! the routes the FIB answers with.

use std::net::{Ipv4Addr, SocketAddrV4};

use egress_common::counters::Counter;
use egress_tests::{
    frames::{self, Tcp, View, assert_checksums},
    harness::{
        HOST_A_MAC, HOST_B_MAC, Harness, PacketHook, ROUTER_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    },
    require_root,
};

const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
const HOST_B: Ipv4Addr = Ipv4Addr::new(172, 20, 20, 10);
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);
const EGRESS_B: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 150);
/// Behind the router, neighbour known.
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn harness() -> Option<Harness> {
    require_root().then(Harness::new)
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Sends an outbound frame that must be translated and redirected; returns
/// what left.
#[track_caller]
fn translate_out(h: &Harness, frame: &[u8]) -> Vec<u8> {
    let out = h.outbound(frame);
    assert_eq!(out.action, XDP_REDIRECT, "outbound verdict");
    assert_checksums(&out.frame);
    out.frame
}

#[track_caller]
fn translate_back(h: &Harness, frame: &[u8]) -> Vec<u8> {
    let out = h.reply(frame);
    assert_eq!(out.action, XDP_REDIRECT, "reply verdict");
    assert_checksums(&out.frame);
    out.frame
}

#[test]
fn tcp_handshake_is_translated_both_ways() {
    let Some(h) = harness() else { return };
    let syn = frames::tcp(sock(HOST_A, 40000), sock(REMOTE, 443), Tcp::Syn, b"");
    let out = translate_out(&h, &syn);
    let view = View::new(&out);
    assert_eq!(view.src(), EGRESS_A);
    assert_eq!(view.dst(), REMOTE);
    assert_eq!(view.dst_port(), 443);
    assert!(view.src_port() >= 1024, "ports come from 1024-65535");
    assert_eq!(view.ttl(), 63, "one router hop");
    assert_eq!(view.eth_dst(), ROUTER_MAC, "to the next hop the FIB named");
    assert_eq!(h.flow_count(), 1);
    h.assert_no_half_entries();

    let syn_ack = frames::tcp(
        sock(REMOTE, 443),
        sock(EGRESS_A, view.src_port()),
        Tcp::SynAck,
        b"",
    );
    let back = translate_back(&h, &syn_ack);
    let back = View::new(&back);
    assert_eq!(back.dst(), HOST_A);
    assert_eq!(back.dst_port(), 40000);
    assert_eq!(back.src(), REMOTE);
    assert_eq!(back.src_port(), 443);
    assert_eq!(back.eth_dst(), HOST_A_MAC);

    // The rest of the connection reuses the translation.
    let ack = frames::tcp(
        sock(HOST_A, 40000),
        sock(REMOTE, 443),
        Tcp::Ack,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let out2 = translate_out(&h, &ack);
    assert_eq!(View::new(&out2).src_port(), view.src_port());
    assert_eq!(h.flow_count(), 1);
    assert_eq!(h.counter(Counter::OutNewFlow), 1);
    assert_eq!(h.counter(Counter::OutTranslated), 2);
    assert_eq!(h.counter(Counter::InTranslated), 1);
}

#[test]
fn udp_and_echo_are_translated_both_ways() {
    let Some(h) = harness() else { return };
    let out = translate_out(
        &h,
        &frames::udp(sock(HOST_B, 5353), sock(REMOTE, 53), b"query"),
    );
    let view = View::new(&out);
    assert_eq!(
        (view.src(), view.dst(), view.dst_port()),
        (EGRESS_B, REMOTE, 53)
    );
    let back = translate_back(
        &h,
        &frames::udp(sock(REMOTE, 53), sock(EGRESS_B, view.src_port()), b"answer"),
    );
    let back = View::new(&back);
    assert_eq!(
        (back.dst(), back.dst_port(), back.eth_dst()),
        (HOST_B, 5353, HOST_B_MAC)
    );

    let out = translate_out(&h, &frames::echo_request(HOST_A, REMOTE, 77, 1));
    let view = View::new(&out);
    assert_eq!(view.src(), EGRESS_A);
    let nat_id = view.echo_id();
    let back = translate_back(&h, &frames::echo_reply(REMOTE, EGRESS_A, nat_id, 1));
    let back = View::new(&back);
    assert_eq!((back.dst(), back.echo_id()), (HOST_A, 77));
    h.assert_no_half_entries();
}

#[test]
fn unsolicited_traffic_to_an_egress_ip_is_dropped() {
    let Some(h) = harness() else { return };
    for frame in [
        frames::tcp(sock(REMOTE, 443), sock(EGRESS_A, 22), Tcp::Syn, b""),
        frames::udp(sock(REMOTE, 53), sock(EGRESS_B, 40000), b"x"),
        frames::echo_request(REMOTE, EGRESS_A, 1, 1),
        frames::echo_reply(REMOTE, EGRESS_A, 1, 1),
    ] {
        assert_eq!(h.reply(&frame).action, XDP_DROP);
    }
    assert_eq!(h.counter(Counter::InDropNoFlow), 3);
    assert_eq!(
        h.counter(Counter::InDropUnsupported),
        1,
        "an echo request is not a reply"
    );
    // Traffic for the gateway's own address is the kernel's business.
    let own = frames::tcp(
        sock(REMOTE, 443),
        sock(Ipv4Addr::new(192, 168, 31, 2), 22),
        Tcp::Syn,
        b"",
    );
    assert_eq!(h.reply(&own).action, XDP_PASS);
    assert_eq!(h.flow_count(), 0);
}

#[test]
fn unclassified_sources_never_leave_but_may_reach_the_gateway() {
    let Some(h) = harness() else { return };
    let stranger = Ipv4Addr::new(172, 20, 30, 10);
    let out = h.outbound(&frames::udp(sock(stranger, 1000), sock(REMOTE, 53), b"x"));
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropUnclassified), 1);
    let local = h.outbound(&frames::echo_request(
        stranger,
        Ipv4Addr::new(172, 20, 10, 1),
        1,
        1,
    ));
    assert_eq!(local.action, XDP_PASS);
    assert_eq!(h.flow_count(), 0);
}

/// Behind a route with MTU 576.
const NARROW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
/// Behind a next hop whose MAC is unknown.
const UNRESOLVED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
/// Covered by an unreachable route.
const UNREACHABLE: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 1);
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

/// Opens a UDP flow from `host:port` to REMOTE:53 and returns its egress port.
fn open_udp(h: &Harness, host: Ipv4Addr, port: u16) -> u16 {
    let out = translate_out(h, &frames::udp(sock(host, port), sock(REMOTE, 53), b"q"));
    View::new(&out).src_port()
}

#[test]
fn icmp_errors_about_translated_packets_are_translated_back() {
    let Some(h) = harness() else { return };
    // Frag-needed about a TCP segment, from a router on the way: the tenant
    // must see it about its own packet, or path-MTU discovery breaks.
    let syn = frames::tcp(sock(HOST_A, 40000), sock(REMOTE, 443), Tcp::Syn, &[7; 100]);
    let sent = translate_out(&h, &syn);
    let router = Ipv4Addr::new(192, 168, 31, 1);
    let error = frames::icmp_error(
        router,
        EGRESS_A,
        frames::FRAG_NEEDED,
        [0, 0, 0x05, 0xdc],
        frames::ip_packet(&sent),
        28,
    );
    let back = translate_back(&h, &error);
    let view = View::new(&back);
    assert_eq!(
        (view.src(), view.dst(), view.icmp_type()),
        (router, HOST_A, 3)
    );
    assert_eq!(
        &view.payload()[4..8],
        &[0, 0, 0x05, 0xdc],
        "the MTU survives"
    );
    let quoted = view.quoted();
    let inner = View::new(&quoted);
    assert_eq!(
        (inner.src(), inner.src_port(), inner.dst(), inner.dst_port()),
        (HOST_A, 40000, REMOTE, 443)
    );

    // Port unreachable about a UDP datagram, quoted whole: the quoted UDP
    // checksum is checked too.
    let sent = translate_out(
        &h,
        &frames::udp(sock(HOST_B, 5000), sock(REMOTE, 53), b"query"),
    );
    let whole = frames::ip_packet(&sent);
    let error = frames::icmp_error(
        REMOTE,
        EGRESS_B,
        frames::PORT_UNREACHABLE,
        [0; 4],
        whole,
        whole.len(),
    );
    let back = translate_back(&h, &error);
    let quoted = View::new(&back).quoted();
    let inner = View::new(&quoted);
    assert_eq!((inner.src(), inner.src_port()), (HOST_B, 5000));
    assert_checksums(&quoted);

    // Time exceeded about a ping (traceroute).
    let sent = translate_out(&h, &frames::echo_request(HOST_A, REMOTE, 900, 3));
    let whole = frames::ip_packet(&sent);
    let error = frames::icmp_error(
        router,
        EGRESS_A,
        frames::TTL_EXCEEDED,
        [0; 4],
        whole,
        whole.len(),
    );
    let back = translate_back(&h, &error);
    let quoted = View::new(&back).quoted();
    assert_eq!(
        (View::new(&quoted).src(), View::new(&quoted).echo_id()),
        (HOST_A, 900)
    );
    assert_eq!(h.counter(Counter::InIcmpErrorTranslated), 3);

    // An error about a flow that does not exist, or quoting a packet that
    // was never sent from this egress address, goes nowhere.
    let bogus = frames::udp(sock(EGRESS_A, 1), sock(REMOTE, 53), b"?");
    let error = frames::icmp_error(
        router,
        EGRESS_A,
        frames::PORT_UNREACHABLE,
        [0; 4],
        frames::ip_packet(&bogus),
        28,
    );
    assert_eq!(h.reply(&error).action, XDP_DROP);
    let other = frames::udp(
        sock(EGRESS_B, View::new(&sent).echo_id()),
        sock(REMOTE, 53),
        b"?",
    );
    let error = frames::icmp_error(
        router,
        EGRESS_A,
        frames::PORT_UNREACHABLE,
        [0; 4],
        frames::ip_packet(&other),
        28,
    );
    assert_eq!(h.reply(&error).action, XDP_DROP);
}

#[test]
fn icmp_errors_from_tenant_hosts_are_translated_out() {
    let Some(h) = harness() else { return };
    let nat_port = open_udp(&h, HOST_A, 6000);
    // The remote's late answer, as the tenant host received it...
    let delivered = translate_back(
        &h,
        &frames::udp(sock(REMOTE, 53), sock(EGRESS_A, nat_port), b"late"),
    );
    // ...and the host's port unreachable about it.
    let whole = frames::ip_packet(&delivered);
    let error = frames::icmp_error(
        HOST_A,
        REMOTE,
        frames::PORT_UNREACHABLE,
        [0; 4],
        whole,
        whole.len(),
    );
    let out = translate_out(&h, &error);
    let view = View::new(&out);
    assert_eq!(
        (view.src(), view.dst()),
        (EGRESS_A, REMOTE),
        "the host's address must not leave"
    );
    let quoted = view.quoted();
    let inner = View::new(&quoted);
    assert_eq!((inner.dst(), inner.dst_port()), (EGRESS_A, nat_port));
    assert_checksums(&quoted);
    assert_eq!(h.counter(Counter::OutIcmpErrorTranslated), 1);
}

#[test]
fn expiring_ttl_is_left_to_the_kernel_outbound_and_dropped_inbound() {
    let Some(h) = harness() else { return };
    for ttl in [0, 1] {
        let frame = frames::edit_ipv4(
            &frames::udp(sock(HOST_A, 7000), sock(REMOTE, 53), b"q"),
            |ip| ip.time_to_live = ttl,
        );
        let out = h.outbound(&frame);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(
            out.frame, frame,
            "untouched: the kernel answers time-exceeded from its own address"
        );
    }
    assert_eq!(h.counter(Counter::OutPassTtlExceeded), 2);
    assert_eq!(
        h.flow_count(),
        0,
        "nothing left the gateway, so nothing is tracked"
    );

    let nat_port = open_udp(&h, HOST_A, 7001);
    let reply = frames::edit_ipv4(
        &frames::udp(sock(REMOTE, 53), sock(EGRESS_A, nat_port), b"a"),
        |ip| ip.time_to_live = 1,
    );
    assert_eq!(
        h.reply(&reply).action,
        XDP_DROP,
        "time-exceeded from here would quote the tenant host"
    );
    assert_eq!(h.counter(Counter::InDropTtlExceeded), 1);
}

#[test]
fn fragments_follow_their_first_fragment_both_ways() {
    let Some(h) = harness() else { return };
    let datagram = frames::udp(sock(HOST_A, 8000), sock(REMOTE, 9000), &[0x5a; 600]);
    let (first, second) = frames::fragment(&datagram, 320);
    let out1 = translate_out(&h, &first);
    let out2 = translate_out(&h, &second);
    let (v1, v2) = (View::new(&out1), View::new(&out2));
    assert_eq!((v1.src(), v2.src()), (EGRESS_A, EGRESS_A));
    assert_eq!(v2.fragment_offset(), 320);
    // Reassembled, the datagram's UDP checksum (carried by the first
    // fragment, covering all of it) must verify with the new address.
    let whole = frames::reassemble(&out1, &out2);
    assert_checksums(&whole);
    assert_eq!(h.counter(Counter::OutFragmentTranslated), 1);

    // Replies in fragments likewise.
    let nat_port = View::new(&whole).src_port();
    let answer = frames::udp(sock(REMOTE, 9000), sock(EGRESS_A, nat_port), &[0xa5; 600]);
    let (first, second) = frames::fragment(&answer, 480);
    let back1 = translate_back(&h, &first);
    let back2 = translate_back(&h, &second);
    assert_eq!(
        (View::new(&back1).dst(), View::new(&back2).dst()),
        (HOST_A, HOST_A)
    );
    assert_eq!(h.counter(Counter::InFragmentTranslated), 1);
}

#[test]
fn fragments_without_their_first_are_dropped() {
    let Some(h) = harness() else { return };
    let datagram = frames::udp(sock(HOST_A, 8001), sock(REMOTE, 9000), &[1; 600]);
    let (_, second) = frames::fragment(&datagram, 320);
    assert_eq!(h.outbound(&second).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropFragmentUnknown), 1);
    let answer = frames::udp(sock(REMOTE, 9000), sock(EGRESS_A, 31337), &[1; 600]);
    let (_, second) = frames::fragment(&answer, 320);
    assert_eq!(h.reply(&second).action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropFragmentUnknown), 1);
}

#[test]
fn ip_options_are_carried_through_translation() {
    let Some(h) = harness() else { return };
    // Two NOPs and an end-of-list, padded to a word: IHL 6.
    let frame = frames::edit_ipv4(
        &frames::tcp(sock(HOST_A, 41000), sock(REMOTE, 80), Tcp::Syn, b""),
        |ip| {
            ip.options = [1u8, 1, 0, 0][..].try_into().expect("options");
        },
    );
    assert_eq!(View::new(&frame).header_len(), 24);
    let out = translate_out(&h, &frame);
    let view = View::new(&out);
    assert_eq!(
        (view.header_len(), view.src(), view.dst_port()),
        (24, EGRESS_A, 80)
    );
    assert_eq!(
        &out[frames::ETH_LEN + 20..frames::ETH_LEN + 24],
        &[1, 1, 0, 0]
    );
}

#[test]
fn non_ip_and_tagged_frames_go_to_the_kernel() {
    let Some(h) = harness() else { return };
    let udp = frames::udp(sock(HOST_A, 1), sock(REMOTE, 2), b"x");
    let mut arp = udp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut lldp = udp.clone();
    lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
    let mut tagged = udp[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    tagged.extend_from_slice(&udp[12..]);
    for frame in [&arp, &lldp, &tagged] {
        assert_eq!(h.outbound(frame).action, XDP_PASS);
        assert_eq!(h.reply(frame).action, XDP_PASS);
    }
    assert_eq!(h.counter(Counter::OutPassNotIp), 3);
    assert_eq!(h.counter(Counter::InPassNotIp), 3);
    // Multicast from a tenant (IGMP, OSPF hellos) is link-local control.
    let igmp = frames::udp(sock(HOST_A, 1), sock(Ipv4Addr::new(224, 0, 0, 22), 2), b"x");
    assert_eq!(h.outbound(&igmp).action, XDP_PASS);
    assert_eq!(h.flow_count(), 0);
}

#[test]
fn an_unresolved_next_hop_leaves_translated_through_the_kernels_neighbour_code() {
    let Some(h) = harness() else { return };
    let out = h.outbound(&frames::tcp(
        sock(HOST_A, 42000),
        sock(UNRESOLVED, 443),
        Tcp::Syn,
        b"",
    ));
    let view = View::new(&out.frame);
    assert_eq!(view.src(), EGRESS_A, "translated before it goes anywhere");
    assert_eq!(view.ttl(), 63);
    assert_checksums(&out.frame);
    match h.hook {
        // TC hands it to the kernel's neighbour resolution itself.
        PacketHook::Tc => {
            assert_eq!(out.action, XDP_REDIRECT);
            assert_eq!(h.counter(Counter::OutNeighRedirected), 1);
        }
        // XDP cannot: it passes the packet up, and the TC fallback on the
        // internal interface sends it on.
        PacketHook::Xdp => {
            assert_eq!(out.action, XDP_PASS);
            assert_eq!(h.counter(Counter::OutPassNeighFallback), 1);
            assert_eq!(
                h.tc("neigh_fallback", &out.frame, h.internal),
                TC_ACT_REDIRECT
            );
            assert_eq!(h.counter(Counter::TcNeighRedirected), 1);
        }
    }
    // Ordinary traffic passes the fallback untouched.
    let plain = frames::tcp(sock(HOST_A, 42000), sock(UNRESOLVED, 443), Tcp::Syn, b"");
    assert_eq!(h.tc("neigh_fallback", &plain, h.internal), TC_ACT_OK);
}

#[test]
fn unroutable_destinations_are_left_to_the_kernel_untranslated() {
    let Some(h) = harness() else { return };
    for dst in [UNREACHABLE, Ipv4Addr::new(8, 8, 8, 8)] {
        let frame = frames::udp(sock(HOST_A, 43000), sock(dst, 53), b"q");
        let out = h.outbound(&frame);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame, frame);
    }
    assert_eq!(h.counter(Counter::OutPassNotEgress), 2);
    assert_eq!(h.flow_count(), 0);
}

#[test]
fn packets_too_big_for_the_external_path() {
    let Some(h) = harness() else { return };
    let big = frames::udp(sock(HOST_A, 44000), sock(NARROW, 53), &[0; 700]);
    let with_df = frames::edit_ipv4(&big, |ip| ip.dont_fragment = true);
    let out = h.outbound(&with_df);
    assert_eq!(out.action, XDP_PASS, "the kernel answers frag-needed");
    assert_eq!(out.frame, with_df);
    let without_df = frames::edit_ipv4(&big, |ip| ip.dont_fragment = false);
    assert_eq!(
        h.outbound(&without_df).action,
        XDP_DROP,
        "XDP cannot fragment"
    );
    assert_eq!(h.counter(Counter::OutPassFragNeeded), 1);
    assert_eq!(h.counter(Counter::OutDropTooBig), 1);
    assert_eq!(h.flow_count(), 0);
    // Small packets on that path are fine.
    translate_out(
        &h,
        &frames::udp(sock(HOST_A, 44000), sock(NARROW, 53), &[0; 100]),
    );
}

/// The external device itself narrower than the packet (a 1500-byte uplink
/// behind a 9000-byte pod network): the same verdicts as a narrow route.
#[test]
fn packets_too_big_for_the_external_device() {
    let Some(h) = harness() else { return };
    h.netns().ip(&["link", "set", "ext0", "mtu", "1000"]);
    let big = frames::udp(sock(HOST_A, 44100), sock(REMOTE, 53), &[0; 1200]);
    let with_df = frames::edit_ipv4(&big, |ip| ip.dont_fragment = true);
    let out = h.outbound(&with_df);
    assert_eq!(out.action, XDP_PASS, "the kernel answers frag-needed");
    assert_eq!(out.frame, with_df);
    assert_eq!(h.counter(Counter::OutPassFragNeeded), 1);
    let without_df = frames::edit_ipv4(&big, |ip| ip.dont_fragment = false);
    assert_eq!(h.outbound(&without_df).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropTooBig), 1);
    assert_eq!(h.counter(Counter::OutPassNotEgress), 0);
    assert_eq!(h.flow_count(), 0);
}

/// A co-located sender with TSO hands the gateway 64 KB TCP segments; on
/// TC they are judged by the size of the packets they become, as the
/// kernel's own forwarding judges them.
#[test]
fn gso_super_packets_are_judged_by_their_segments_on_tc() {
    let Some(h) = harness() else { return };
    let payload = vec![0x5a; 1448 * 2];
    let open = frames::tcp(sock(HOST_A, 45000), sock(REMOTE, 443), Tcp::Syn, b"");
    translate_out(&h, &open);
    let segments = frames::tcp(sock(HOST_A, 45000), sock(REMOTE, 443), Tcp::Ack, &payload);
    let out = h.outbound_gso(&segments, 1448);
    assert_eq!(out.action, XDP_REDIRECT, "1500-byte segments fit the route");
    let view = View::new(&out.frame);
    assert_eq!(view.src(), EGRESS_A);
    assert_eq!(
        view.total_len(),
        segments.len() - 14,
        "headers rewritten, nothing cut"
    );
    assert_checksums(&out.frame);
    // Towards the 576-byte path the segments are too big: the kernel
    // answers frag-needed, from its own address, untranslated.
    let narrow = frames::tcp(sock(HOST_A, 45001), sock(NARROW, 443), Tcp::Ack, &payload);
    let out = h.outbound_gso(&narrow, 1448);
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(out.frame, narrow);
    // Small segments fit it.
    let out = h.outbound_gso(&narrow, 500);
    assert_eq!(out.action, XDP_REDIRECT);
    assert_eq!(View::new(&out.frame).src(), EGRESS_A);
}

#[test]
fn the_leak_guard_lets_only_egress_sources_out_of_forwarded_traffic() {
    let Some(h) = harness() else { return };
    let tenant = frames::udp(sock(HOST_A, 1), sock(REMOTE, 53), b"x");
    let translated = frames::udp(sock(EGRESS_A, 1), sock(REMOTE, 53), b"x");
    let ipv6 = frames::udp6(b"x");
    assert_eq!(h.tc("leak_guard", &tenant, h.internal), TC_ACT_SHOT);
    assert_eq!(h.tc("leak_guard", &ipv6, h.internal), TC_ACT_SHOT);
    assert_eq!(h.tc("leak_guard", &translated, h.internal), TC_ACT_OK);
    // The gateway's own traffic (not forwarded) is not the guard's business.
    assert_eq!(h.tc("leak_guard", &tenant, 0), TC_ACT_OK);
    assert_eq!(h.counter(Counter::TcLeakBlocked), 2);
}

#[test]
fn two_tenants_with_one_source_port_to_one_destination() {
    let Some(h) = harness() else { return };
    let a = translate_out(
        &h,
        &frames::udp(sock(HOST_A, 50000), sock(REMOTE, 53), b"a"),
    );
    let b = translate_out(
        &h,
        &frames::udp(sock(HOST_B, 50000), sock(REMOTE, 53), b"b"),
    );
    let (a, b) = (View::new(&a), View::new(&b));
    assert_ne!((a.src(), a.src_port()), (b.src(), b.src_port()));
    let back_a = translate_back(
        &h,
        &frames::udp(sock(REMOTE, 53), sock(a.src(), a.src_port()), b"A"),
    );
    let back_b = translate_back(
        &h,
        &frames::udp(sock(REMOTE, 53), sock(b.src(), b.src_port()), b"B"),
    );
    assert_eq!(View::new(&back_a).dst(), HOST_A);
    assert_eq!(View::new(&back_b).dst(), HOST_B);
}

#[test]
fn a_flow_remembers_its_next_hop_for_at_most_a_second() {
    let Some(h) = harness() else { return };
    let moved = [0x02, 0, 0, 0, 0x0e, 0x0e];
    let router_mac = |mac: [u8; 6]| {
        h.netns().static_neighbour("192.168.31.1", mac, "ext0");
    };
    // The cache's second is measured from the flow's first packet: on a
    // busy machine (parallel tests, `ip` taking its time) the second packet
    // may come later than that, and then proves nothing. Such a try starts
    // again with a fresh flow; one that fits the second must see the cache.
    let mut tries = 0;
    let (frame, first_packet) = loop {
        tries += 1;
        assert!(tries <= 5, "no try fitted in the cache's second");
        router_mac(ROUTER_MAC);
        let frame = frames::udp(sock(HOST_A, 44100 + tries), sock(REMOTE, 53), b"q");
        let started = std::time::Instant::now();
        assert_eq!(View::new(&translate_out(&h, &frame)).eth_dst(), ROUTER_MAC);
        // The router's MAC changes: the flow keeps the answer it cached...
        router_mac(moved);
        let again = View::new(&translate_out(&h, &frame)).eth_dst();
        if started.elapsed() < std::time::Duration::from_millis(800) {
            assert_eq!(
                again, ROUTER_MAC,
                "within its second the flow keeps its next hop"
            );
            break (frame, started);
        }
    };
    // ...while a new flow asks the FIB and sees the new one at once.
    let other = frames::udp(sock(HOST_A, 44200), sock(REMOTE, 53), b"q");
    assert_eq!(View::new(&translate_out(&h, &other)).eth_dst(), moved);
    // Once the cache is stale, the old flow asks again.
    std::thread::sleep(
        std::time::Duration::from_millis(1100).saturating_sub(first_packet.elapsed()),
    );
    assert_eq!(View::new(&translate_out(&h, &frame)).eth_dst(), moved);
}

#[test]
fn a_packet_above_the_cached_mtu_still_gets_frag_needed() {
    let Some(h) = harness() else { return };
    let small = frames::udp(sock(HOST_A, 44200), sock(NARROW, 53), &[0; 100]);
    translate_out(&h, &small);
    let big = frames::edit_ipv4(
        &frames::udp(sock(HOST_A, 44200), sock(NARROW, 53), &[0; 700]),
        |ip| ip.dont_fragment = true,
    );
    let out = h.outbound(&big);
    assert_eq!(out.action, XDP_PASS, "the kernel answers frag-needed");
    assert_eq!(out.frame, big, "untranslated, to the kernel");
    assert_eq!(h.counter(Counter::OutPassFragNeeded), 1);
    translate_out(&h, &small);
}
