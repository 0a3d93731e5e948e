//! The IPv6 packet path on crafted frames (BPF_PROG_TEST_RUN): NAT66 for
//! TCP, UDP and ICMPv6 echo both ways with every checksum recomputed from
//! scratch, dual-stack tenants, link control left to the kernel, the
//! fail-closed cases, the extension-header walk and ICMPv6 errors about
//! translated packets, both ways. Both hooks: `cargo
//! xtask test` runs this file on XDP and again on TC. Needs root.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use etherparse::{
    Icmpv6Type,
    icmpv6::{DestUnreachableCode, ParameterProblemCode, ParameterProblemHeader, TimeExceededCode},
};

use egress_common::counters::Counter;
use egress_tests::{
    frames::{self, Tcp, View},
    frames6::{self, View6, assert_checksums},
    harness::{
        CONFIG_DUAL_STACK, HOST_A_MAC, Harness, ROUTER_MAC, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP,
        XDP_PASS, XDP_REDIRECT,
    },
    require_root,
};

const HOST_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
const HOST_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 0x10);
/// In no tenant's sources, but on an internal network.
const STRANGER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 1, 0, 0, 0, 0x99);
const GATEWAY_INSIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1);
const EGRESS_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x101);
const EGRESS_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x150);
const REMOTE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);
/// Behind a link with an MTU of 1280.
const NARROW: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 7);
/// The next hop on the external link, which sends ICMPv6 errors.
const ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 1);
const TIME_EXCEEDED: Icmpv6Type = Icmpv6Type::TimeExceeded(TimeExceededCode::HopLimitExceeded);

fn harness() -> Option<Harness> {
    require_root().then(|| Harness::with_config(CONFIG_DUAL_STACK))
}

fn sock(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

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
fn tcp_is_translated_both_ways() {
    let Some(h) = harness() else { return };
    let syn = frames6::tcp(sock(HOST_A, 40000), sock(REMOTE, 443), Tcp::Syn, b"");
    let out = translate_out(&h, &syn);
    let view = View6::new(&out);
    assert_eq!(view.src(), EGRESS_A);
    assert_eq!(view.dst(), REMOTE);
    assert_eq!(view.dst_port(), 443);
    assert!(view.src_port() >= 1024, "ports come from 1024-65535");
    assert_eq!(view.hop_limit(), 63, "one router hop");
    assert_eq!(view.eth_dst(), ROUTER_MAC, "to the next hop the FIB named");
    assert_eq!(h.counter(Counter::OutNewFlow), 1);

    let syn_ack = frames6::tcp(
        sock(REMOTE, 443),
        sock(EGRESS_A, view.src_port()),
        Tcp::SynAck,
        b"",
    );
    let back = translate_back(&h, &syn_ack);
    let back = View6::new(&back);
    assert_eq!((back.dst(), back.dst_port()), (HOST_A, 40000));
    assert_eq!((back.src(), back.src_port()), (REMOTE, 443));
    assert_eq!(back.eth_dst(), HOST_A_MAC);
    assert_eq!(back.hop_limit(), 63);

    // The rest of the connection keeps its translation.
    let ack = frames6::tcp(sock(HOST_A, 40000), sock(REMOTE, 443), Tcp::Ack, b"GET /");
    let again = translate_out(&h, &ack);
    assert_eq!(View6::new(&again).src_port(), view.src_port());
    assert_eq!(h.counter(Counter::OutNewFlow), 1);
    assert_eq!(h.counter(Counter::OutTranslated), 2);
    assert_eq!(h.counter(Counter::InTranslated), 1);
}

#[test]
fn udp_and_echo_are_translated_both_ways() {
    let Some(h) = harness() else { return };
    let out = translate_out(
        &h,
        &frames6::udp(sock(HOST_B, 5353), sock(REMOTE, 53), b"query"),
    );
    let view = View6::new(&out);
    assert_eq!(view.src(), EGRESS_B);
    let back = translate_back(
        &h,
        &frames6::udp(sock(REMOTE, 53), sock(EGRESS_B, view.src_port()), b"answer"),
    );
    let back = View6::new(&back);
    assert_eq!((back.dst(), back.dst_port()), (HOST_B, 5353));

    let out = translate_out(&h, &frames6::echo_request(HOST_A, REMOTE, 77, 1));
    let view = View6::new(&out);
    assert_eq!(view.src(), EGRESS_A);
    let id = view.echo_id();
    let back = translate_back(&h, &frames6::echo_reply(REMOTE, EGRESS_A, id, 1));
    let back = View6::new(&back);
    assert_eq!((back.dst(), back.echo_id()), (HOST_A, 77));
}

#[test]
fn each_family_leaves_from_its_own_egress_address() {
    let Some(h) = harness() else { return };
    let v4 = frames::udp(
        SocketAddrV4::new(Ipv4Addr::new(172, 20, 10, 10), 7000),
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 53),
        b"x",
    );
    let out = h.outbound(&v4);
    assert_eq!(out.action, XDP_REDIRECT);
    frames::assert_checksums(&out.frame);
    assert_eq!(
        View::new(&out.frame).src(),
        Ipv4Addr::new(192, 168, 31, 101)
    );
    let out = translate_out(
        &h,
        &frames6::udp(sock(HOST_A, 7000), sock(REMOTE, 53), b"x"),
    );
    assert_eq!(View6::new(&out).src(), EGRESS_A);
    assert_eq!(h.counter(Counter::OutNewFlow), 2);
}

#[test]
fn link_control_goes_to_the_kernel_untouched() {
    let Some(h) = harness() else { return };
    let solicitation = frames6::neighbor_solicitation(HOST_A, GATEWAY_INSIDE);
    let out = h.outbound(&solicitation);
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(out.frame, solicitation, "passed as it came");
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10);
    let from_link_local = frames6::udp(sock(link_local, 546), sock(REMOTE, 547), b"x");
    assert_eq!(h.outbound(&from_link_local).action, XDP_PASS);
    let solicitation = frames6::neighbor_solicitation(REMOTE, EGRESS_A);
    assert_eq!(h.reply(&solicitation).action, XDP_PASS);
    // The kernel resolving a translated packet's next hop solicits from
    // the egress address; the answer comes back between global addresses.
    let router = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 1);
    let advertisement = frames6::neighbor_advertisement(router, EGRESS_A, router);
    assert_eq!(h.reply(&advertisement).action, XDP_PASS);
    assert_eq!(h.counter(Counter::OutPassLinkControl), 2);
    assert_eq!(h.counter(Counter::InPassLinkControl), 2);
    assert_eq!(h.counter(Counter::InDropUnsupported), 0);
    assert_eq!(h.flow_count(), 0);
}

#[test]
fn sources_in_no_tenant_never_leave_but_may_reach_the_gateway() {
    let Some(h) = harness() else { return };
    let out = h.outbound(&frames6::udp(sock(STRANGER, 1), sock(REMOTE, 53), b"x"));
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropUnclassified), 1);
    let to_gateway = frames6::udp(sock(STRANGER, 1), sock(GATEWAY_INSIDE, 53), b"x");
    assert_eq!(h.outbound(&to_gateway).action, XDP_PASS);
    assert_eq!(h.counter(Counter::OutPassNotEgress), 1);
    assert_eq!(h.flow_count(), 0);
}

#[test]
fn unsolicited_traffic_from_outside_reaches_no_tenant() {
    let Some(h) = harness() else { return };
    let to_egress = frames6::tcp(sock(REMOTE, 443), sock(EGRESS_A, 40000), Tcp::Syn, b"");
    assert_eq!(h.reply(&to_egress).action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropNoFlow), 1);
    let to_host = frames6::tcp(sock(REMOTE, 443), sock(HOST_A, 22), Tcp::Syn, b"");
    assert_eq!(h.reply(&to_host).action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropToInternal), 1);
    assert_eq!(h.flow_count(), 0);
}

#[test]
fn what_a_router_answers_is_left_to_the_kernel() {
    let Some(h) = harness() else { return };
    let expiring = frames6::with_hop_limit(
        &frames6::udp(sock(HOST_A, 1), sock(REMOTE, 33434), b"probe"),
        1,
    );
    assert_eq!(h.outbound(&expiring).action, XDP_PASS);
    assert_eq!(h.counter(Counter::OutPassTtlExceeded), 1);
    // Too big for the 1280-byte link: the kernel answers packet-too-big.
    let big = frames6::udp(sock(HOST_A, 1), sock(NARROW, 9), &[0u8; 1400]);
    assert_eq!(h.outbound(&big).action, XDP_PASS);
    assert_eq!(h.counter(Counter::OutPassFragNeeded), 1);
    assert_eq!(h.flow_count(), 0, "nothing was translated");

    // A reply about to expire is dropped: the kernel's answer would quote
    // the tenant host.
    let out = translate_out(&h, &frames6::udp(sock(HOST_A, 2), sock(REMOTE, 53), b"q"));
    let port = View6::new(&out).src_port();
    let back = frames6::with_hop_limit(
        &frames6::udp(sock(REMOTE, 53), sock(EGRESS_A, port), b"a"),
        1,
    );
    assert_eq!(h.reply(&back).action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropTtlExceeded), 1);
}

#[test]
fn extension_headers_are_walked_to_a_bound() {
    let Some(h) = harness() else { return };
    let udp = frames6::udp(sock(HOST_A, 9000), sock(REMOTE, 53), b"opts");
    let two = frames6::with_dest_options(&udp, 2);
    let out = translate_out(&h, &two);
    let view = View6::new(&out);
    assert_eq!(
        (view.src(), view.proto(), view.dst_port()),
        (EGRESS_A, 17, 53)
    );

    let five = frames6::with_dest_options(&udp, 5);
    assert_eq!(h.outbound(&five).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropExtHeaders), 1);
    // Two fragment headers in one packet (RFC 8200 allows one).
    let twice = frames6::as_first_fragment(&frames6::as_first_fragment(&udp));
    assert_eq!(h.outbound(&twice).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropUnsupported), 1);
    // The same from a source in no tenant is judged as unclassified.
    let stranger = frames6::with_dest_options(
        &frames6::udp(sock(STRANGER, 9000), sock(REMOTE, 53), b"opts"),
        5,
    );
    assert_eq!(h.outbound(&stranger).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropUnclassified), 1);
}

#[test]
fn the_leak_guard_covers_ipv6() {
    let Some(h) = harness() else { return };
    let tenant = frames6::udp(sock(HOST_A, 1), sock(REMOTE, 53), b"x");
    let translated = frames6::udp(sock(EGRESS_A, 1), sock(REMOTE, 53), b"x");
    assert_eq!(h.tc("leak_guard", &tenant, h.internal), TC_ACT_SHOT);
    assert_eq!(h.tc("leak_guard", &translated, h.internal), TC_ACT_OK);
    assert_eq!(h.tc("leak_guard", &tenant, 0), TC_ACT_OK, "not forwarded");
    assert_eq!(h.counter(Counter::TcLeakBlocked), 1);
}

/// `routedSources` in IPv6 (a VpcEgressGateway's no-SNAT sources): out
/// and back untranslated through the kernel, let out by the leak guard;
/// every other stranger still gets nothing out.
#[test]
fn routed_ipv6_sources_leave_and_return_as_they_are() {
    if !require_root() {
        return;
    }
    let h = Harness::with_config(&format!(
        "{CONFIG_DUAL_STACK}routedSources: [2001:db8:10:1::/64]\n"
    ));
    h.ns()
        .ip(&["-6", "route", "add", "2001:db8:10:1::/64", "dev", "int0"]);
    let out = frames6::udp(sock(STRANGER, 5000), sock(REMOTE, 53), b"q");
    let verdict = h.outbound(&out);
    assert_eq!(verdict.action, XDP_PASS);
    assert_eq!(verdict.frame, out, "untouched");
    assert_eq!(h.counter(Counter::RoutedPassed), 1);
    assert_eq!(h.tc("leak_guard", &out, h.internal), TC_ACT_OK);
    assert_eq!(h.counter(Counter::RoutedPassed), 2);
    let back = frames6::udp(sock(REMOTE, 53), sock(STRANGER, 5000), b"a");
    let verdict = h.reply(&back);
    assert_eq!(verdict.action, XDP_PASS);
    assert_eq!(verdict.frame, back, "untouched");
    assert_eq!(h.counter(Counter::RoutedPassed), 3);
    assert_eq!(h.counter(Counter::InDropToInternal), 0);

    let other = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 2, 0, 0, 0, 0x99);
    let stray = frames6::udp(sock(other, 5000), sock(REMOTE, 53), b"q");
    assert_eq!(h.tc("leak_guard", &stray, h.internal), TC_ACT_SHOT);
    assert_eq!(h.flow_count_v6(), 0, "nothing translated");
}

#[test]
fn packet_too_big_about_a_translated_segment_comes_back_to_the_host() {
    let Some(h) = harness() else { return };
    // Path-MTU discovery: the router's packet-too-big must name the host's
    // own segment, or the host never lowers its MTU.
    let syn = frames6::tcp(sock(HOST_A, 40000), sock(REMOTE, 443), Tcp::Syn, &[7; 100]);
    let sent = translate_out(&h, &syn);
    let quote = frames6::ip_packet(&sent);
    let error = frames6::icmp_error(
        ROUTER,
        EGRESS_A,
        Icmpv6Type::PacketTooBig { mtu: 1280 },
        quote,
        quote.len(),
    );
    // Every checksum, the quoted segment's included (the quote is whole).
    let back = translate_back(&h, &error);
    let view = View6::new(&back);
    assert_eq!(
        (view.src(), view.dst(), view.icmp_type()),
        (ROUTER, HOST_A, 2)
    );
    assert_eq!(view.l4()[4..8], 1280u32.to_be_bytes(), "the MTU survives");
    assert_eq!(view.hop_limit(), 63, "one router hop");
    assert_eq!(view.eth_dst(), HOST_A_MAC);
    let quoted = view.quoted();
    let inner = View6::new(&quoted);
    assert_eq!(
        (inner.src(), inner.src_port(), inner.dst(), inner.dst_port()),
        (HOST_A, 40000, REMOTE, 443)
    );

    // The same from the remote end, its quote cut to the first 8 bytes of
    // TCP (the checksum is not in it).
    let error = frames6::icmp_error(
        REMOTE,
        EGRESS_A,
        Icmpv6Type::PacketTooBig { mtu: 1400 },
        quote,
        40 + 8,
    );
    let back = translate_back(&h, &error);
    let view = View6::new(&back);
    assert_eq!((view.src(), view.dst()), (REMOTE, HOST_A));
    let quoted = view.quoted();
    let inner = View6::new(&quoted);
    assert_eq!((inner.src(), inner.src_port()), (HOST_A, 40000));
    assert_eq!(h.counter(Counter::InIcmpErrorTranslated), 2);
}

#[test]
fn time_exceeded_about_translated_datagrams_and_echoes_comes_back() {
    let Some(h) = harness() else { return };
    // Traceroute over UDP, quoted whole: the quoted UDP checksum is checked.
    let sent = translate_out(
        &h,
        &frames6::udp(sock(HOST_B, 5000), sock(REMOTE, 33434), b"probe"),
    );
    let quote = frames6::ip_packet(&sent);
    let error = frames6::icmp_error(ROUTER, EGRESS_B, TIME_EXCEEDED, quote, quote.len());
    let back = translate_back(&h, &error);
    let view = View6::new(&back);
    assert_eq!((view.dst(), view.icmp_type()), (HOST_B, 3));
    let quoted = view.quoted();
    let inner = View6::new(&quoted);
    assert_eq!(
        (inner.src(), inner.src_port(), inner.dst_port()),
        (HOST_B, 5000, 33434)
    );

    // Traceroute over echo: the quoted echo's id and checksum (which
    // covers the quoted addresses) come back to the host's.
    let sent = translate_out(&h, &frames6::echo_request(HOST_A, REMOTE, 900, 3));
    let quote = frames6::ip_packet(&sent);
    let error = frames6::icmp_error(ROUTER, EGRESS_A, TIME_EXCEEDED, quote, quote.len());
    let back = translate_back(&h, &error);
    let view = View6::new(&back);
    assert_eq!(view.dst(), HOST_A);
    let quoted = view.quoted();
    let inner = View6::new(&quoted);
    assert_eq!((inner.src(), inner.echo_id()), (HOST_A, 900));
    assert_eq!(h.counter(Counter::InIcmpErrorTranslated), 2);
}

#[test]
fn unreachable_and_parameter_problem_about_translated_packets_come_back() {
    let Some(h) = harness() else { return };
    // A router with no route to the remote: the host's connect fails at
    // once instead of waiting out its retries.
    let sent = translate_out(
        &h,
        &frames6::tcp(sock(HOST_A, 41000), sock(REMOTE, 22), Tcp::Syn, &[]),
    );
    let quote = frames6::ip_packet(&sent);
    let unreachable = Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Address);
    let error = frames6::icmp_error(ROUTER, EGRESS_A, unreachable, quote, quote.len());
    let back = translate_back(&h, &error);
    let view = View6::new(&back);
    assert_eq!(
        (view.src(), view.dst(), view.icmp_type(), view.l4()[1]),
        (ROUTER, HOST_A, 1, 3),
        "type and code kept"
    );
    let quoted = view.quoted();
    let inner = View6::new(&quoted);
    assert_eq!(
        (inner.src(), inner.src_port(), inner.dst(), inner.dst_port()),
        (HOST_A, 41000, REMOTE, 22)
    );

    // The remote refusing a header field: the pointer names an offset in
    // the quoted packet, which the translation does not move.
    let sent = translate_out(
        &h,
        &frames6::udp(sock(HOST_B, 7000), sock(REMOTE, 4789), b"x"),
    );
    let quote = frames6::ip_packet(&sent);
    let problem = Icmpv6Type::ParameterProblem(ParameterProblemHeader {
        code: ParameterProblemCode::ErroneousHeaderField,
        pointer: 6,
    });
    let error = frames6::icmp_error(REMOTE, EGRESS_B, problem, quote, quote.len());
    let back = translate_back(&h, &error);
    let view = View6::new(&back);
    assert_eq!(
        (view.src(), view.dst(), view.icmp_type()),
        (REMOTE, HOST_B, 4)
    );
    assert_eq!(view.l4()[4..8], 6u32.to_be_bytes(), "the pointer survives");
    let quoted = view.quoted();
    let inner = View6::new(&quoted);
    assert_eq!(
        (inner.src(), inner.src_port(), inner.dst_port()),
        (HOST_B, 7000, 4789)
    );
    assert_eq!(h.counter(Counter::InIcmpErrorTranslated), 2);
}

#[test]
fn errors_about_no_flow_or_unsupported_quotes_are_dropped() {
    let Some(h) = harness() else { return };
    let sent = translate_out(
        &h,
        &frames6::udp(sock(HOST_A, 6000), sock(REMOTE, 53), b"q"),
    );
    // A packet this egress address never sent.
    let bogus = frames6::udp(sock(EGRESS_A, 1), sock(REMOTE, 53), b"?");
    let quote = frames6::ip_packet(&bogus);
    let error = frames6::icmp_error(ROUTER, EGRESS_A, TIME_EXCEEDED, quote, quote.len());
    assert_eq!(h.reply(&error).action, XDP_DROP);
    // A packet of a flow, but quoted as sent from another address than
    // the one the error goes to.
    let mut other = sent.clone();
    other[frames::ETH_LEN + 8..frames::ETH_LEN + 24].copy_from_slice(&EGRESS_B.octets());
    let quote = frames6::ip_packet(&other);
    let error = frames6::icmp_error(ROUTER, EGRESS_A, TIME_EXCEEDED, quote, quote.len());
    assert_eq!(h.reply(&error).action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropNoFlow), 2);

    // A quote with extension headers is not one the NAT made.
    let with_options = frames6::with_dest_options(&sent, 1);
    let quote = frames6::ip_packet(&with_options);
    let error = frames6::icmp_error(ROUTER, EGRESS_A, TIME_EXCEEDED, quote, quote.len());
    assert_eq!(h.reply(&error).action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropUnsupported), 1);
    // Nor one too short to hold the ports.
    let quote = frames6::ip_packet(&sent);
    let error = frames6::icmp_error(ROUTER, EGRESS_A, TIME_EXCEEDED, quote, 40 + 4);
    assert_eq!(h.reply(&error).action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropMalformed), 1);
    assert_eq!(h.counter(Counter::InIcmpErrorTranslated), 0);
}

#[test]
fn a_tenant_hosts_error_about_a_reply_goes_out_translated() {
    let Some(h) = harness() else { return };
    let out = translate_out(
        &h,
        &frames6::udp(sock(HOST_A, 6000), sock(REMOTE, 53), b"q"),
    );
    let nat_port = View6::new(&out).src_port();
    // The remote's late answer, as the tenant host received it...
    let delivered = translate_back(
        &h,
        &frames6::udp(sock(REMOTE, 53), sock(EGRESS_A, nat_port), b"late"),
    );
    // ...and the host's port unreachable about it, quoting it whole.
    let quote = frames6::ip_packet(&delivered);
    let error = frames6::icmp_error(
        HOST_A,
        REMOTE,
        Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
        quote,
        quote.len(),
    );
    let sent = translate_out(&h, &error);
    let view = View6::new(&sent);
    assert_eq!(
        (view.src(), view.dst(), view.icmp_type()),
        (EGRESS_A, REMOTE, 1),
        "the host's address must not leave"
    );
    assert_eq!(view.hop_limit(), 63);
    assert_eq!(view.eth_dst(), ROUTER_MAC);
    let quoted = view.quoted();
    let inner = View6::new(&quoted);
    assert_eq!(
        (inner.src(), inner.src_port(), inner.dst(), inner.dst_port()),
        (REMOTE, 53, EGRESS_A, nat_port)
    );
    assert_eq!(h.counter(Counter::OutIcmpErrorTranslated), 1);

    // About a reply no flow of this host had: nothing leaves.
    let stray = frames6::udp(sock(REMOTE, 53), sock(HOST_A, 6001), b"?");
    let quote = frames6::ip_packet(&stray);
    let error = frames6::icmp_error(
        HOST_A,
        REMOTE,
        Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
        quote,
        quote.len(),
    );
    assert_eq!(h.outbound(&error).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropInvalid), 1);
}

#[test]
fn fragments_follow_their_first_fragment_both_ways() {
    let Some(h) = harness() else { return };
    let datagram = frames6::udp(sock(HOST_A, 5300), sock(REMOTE, 53), &[7; 300]);
    let (first, later) = frames6::fragment(&datagram, 160, 0x0102_0304);
    let first_out = h.outbound(&first);
    let later_out = h.outbound(&later);
    assert_eq!(first_out.action, XDP_REDIRECT, "first fragment");
    assert_eq!(later_out.action, XDP_REDIRECT, "later fragment");
    assert_eq!(View6::new(&first_out.frame).src(), EGRESS_A);
    assert_eq!(View6::new(&later_out.frame).src(), EGRESS_A);
    assert_eq!(View6::new(&later_out.frame).hop_limit(), 63);
    // The receiver's view: the reassembled datagram, its checksum right.
    let whole = frames6::reassemble(&first_out.frame, &later_out.frame);
    assert_checksums(&whole);
    let sent = View6::new(&whole);
    assert_eq!((sent.src(), sent.dst_port()), (EGRESS_A, 53));
    assert_eq!(h.counter(Counter::OutFragmentTranslated), 1);

    // The answer in fragments comes back to the host.
    let answer = frames6::udp(sock(REMOTE, 53), sock(EGRESS_A, sent.src_port()), &[9; 400]);
    let (first, later) = frames6::fragment(&answer, 240, 0x0a0b_0c0d);
    let first_back = h.reply(&first);
    let later_back = h.reply(&later);
    assert_eq!(first_back.action, XDP_REDIRECT, "first fragment back");
    assert_eq!(later_back.action, XDP_REDIRECT, "later fragment back");
    let whole = frames6::reassemble(&first_back.frame, &later_back.frame);
    assert_checksums(&whole);
    let back = View6::new(&whole);
    assert_eq!((back.dst(), back.dst_port()), (HOST_A, 5300));
    assert_eq!(View6::new(&later_back.frame).dst(), HOST_A);
    assert_eq!(h.counter(Counter::InFragmentTranslated), 1);
}

#[test]
fn fragments_without_their_first_are_dropped() {
    let Some(h) = harness() else { return };
    let datagram = frames6::udp(sock(HOST_A, 5301), sock(REMOTE, 53), &[7; 300]);
    let (_, later) = frames6::fragment(&datagram, 160, 77);
    assert_eq!(h.outbound(&later).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropFragmentUnknown), 1);
    let answer = frames6::udp(sock(REMOTE, 53), sock(EGRESS_A, 40000), &[9; 300]);
    let (_, later) = frames6::fragment(&answer, 160, 78);
    assert_eq!(h.reply(&later).action, XDP_DROP);
    assert_eq!(h.counter(Counter::InDropFragmentUnknown), 1);
    // A stranger's later fragment is judged as unclassified.
    let stranger = frames6::udp(sock(STRANGER, 1), sock(REMOTE, 53), &[7; 300]);
    let (_, later) = frames6::fragment(&stranger, 160, 79);
    assert_eq!(h.outbound(&later).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropUnclassified), 1);
    assert_eq!(h.flow_count_v6(), 0);
}

#[test]
fn fragment_memories_expire_with_the_kernels_reassembly_time() {
    let Some(mut h) = harness() else { return };
    let datagram = frames6::udp(sock(HOST_A, 5302), sock(REMOTE, 53), &[7; 300]);
    let (first, _) = frames6::fragment(&datagram, 160, 0x0505_0505);
    assert_eq!(h.outbound(&first).action, XDP_REDIRECT);
    let now = egress_agent::conntrack::now_ns();
    let timeouts = egress_agent::config::Timeouts::default();
    assert_eq!(h.sweep(now, &timeouts).fragments_expired, 0, "young");
    assert_eq!(h.maps.frags_v6.keys().count(), 1);
    let report = h.sweep(now + 31_000_000_000, &timeouts);
    assert_eq!(report.fragments_expired, 1, "after 30 s");
    assert_eq!(h.maps.frags_v6.keys().count(), 0);
}
