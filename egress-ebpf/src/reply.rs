//! Reply: traffic arriving on the external interface.
//!
//! parse -> conntrack -> route -> translate -> forward. Packets addressed to
//! an egress address are replies of a tracked flow (or ICMP errors about
//! one, or later fragments of one), the opening packet of a port forward or
//! floating IP (`inbound`), or nothing: the gateway is not a way in, so
//! anything else sent to an egress address is dropped. So is anything
//! the kernel would forward inside (to a tenant host or any internal
//! network, routed sources excepted: they are reachable as they leave,
//! untranslated), before the kernel's own conntrack sees it. What is left (the
//! gateway's own addresses, ARP, routes to other places) goes to the kernel.

use aya_ebpf::btf_maps::lpm_trie::Key;
use egress_common::{
    config::ROLE_INTERNAL,
    config::V6_SLOT_REPLY,
    counters::Counter,
    flow::{DIR_REPLY, FlowEntryV4, FlowKeyV4, REPLY_ZONE},
};

use crate::{
    conntrack,
    forward::{self, Route},
    frags,
    hook::{Hook, L4Fix},
    inbound,
    maps::{EGRESS_ADDR_V4, ROUTED_SRC_V4},
    nat::{self, Side},
    parse::{self, ICMP_ECHO_REPLY, IcmpError, Ipv4Frame, ParseError, Payload, Transport},
    parse6,
    verdict::Verdict,
};

#[inline(always)]
pub fn run<H: Hook>(ctx: &H) -> i32 {
    Verdict::finish::<H>(process(ctx))
}

/// A frame the IPv4 parser found no IPv4 in: IPv6 goes on in the IPv6
/// program (a tail call, which returns only if that program is not
/// loaded: then the kernel takes the packet, and the leak guard still
/// keeps tenant sources in).
#[inline(always)]
fn ipv6<H: Hook>(ctx: &H) -> Verdict {
    if !parse6::is_ipv6(ctx) {
        return Verdict::pass(Counter::InPassNotIp);
    }
    ctx.tail_call_v6(V6_SLOT_REPLY);
    Verdict::pass(Counter::InPassIpv6Unserved)
}

#[inline(always)]
pub fn parse_error(err: ParseError) -> Counter {
    match err {
        ParseError::Malformed => Counter::InDropMalformed,
        ParseError::Unsupported => Counter::InDropUnsupported,
        ParseError::ExtHeaders => Counter::InDropExtHeaders,
    }
}

#[inline(always)]
fn process<H: Hook>(ctx: &H) -> Result<Verdict, Counter> {
    // Parse, as far as needed to see whether the packet is ours.
    let Some(frame) = parse::ipv4(ctx).map_err(parse_error)? else {
        return Ok(ipv6(ctx));
    };
    let ingress = ctx.ingress_ifindex();
    // A reply of a tracked flow is addressed to an egress address by
    // construction, so it is looked up first and the egress-address lookup
    // is left to everything else. The payload is matched once, here (see
    // `outbound::process`).
    match parse::payload(ctx, &frame, ICMP_ECHO_REPLY) {
        Ok(Payload::Flow(transport)) => {
            let key = conntrack::key_of(&frame, &transport, DIR_REPLY, REPLY_ZONE);
            // One call of `flow` for both: it is inlined, and twice it
            // changes how LLVM keeps the parsed frame in a way the verifier
            // refuses.
            let entry = match conntrack::lookup(&key) {
                Some(entry) => entry,
                None if to_egress_address(&frame) => {
                    inbound::open(&key, &transport)?.ok_or(Counter::InDropNoFlow)?
                }
                None => return not_egress(ctx, &frame, ingress),
            };
            flow(ctx, &frame, &transport, &key, entry, ingress)
        }
        _ if !to_egress_address(&frame) => not_egress(ctx, &frame, ingress),
        Ok(Payload::IcmpError(error)) => icmp_error(ctx, &frame, &error, ingress),
        Ok(Payload::LaterFragment) => later_fragment(ctx, &frame, ingress),
        Err(err) => Err(parse_error(err)),
    }
}

/// A packet from outside that is not for an egress address: the kernel's,
/// unless the kernel would forward it inside.
#[inline(always)]
fn not_egress<H: Hook>(ctx: &H, frame: &Ipv4Frame, ingress: u32) -> Result<Verdict, Counter> {
    if forward::route_as_is(ctx, frame, ingress).leaves_through(ROLE_INTERNAL) {
        // Routed sources are reachable as they are, as they leave.
        if ROUTED_SRC_V4
            .get(&Key::new(32, frame.ip().dst_addr))
            .is_some()
        {
            return Ok(Verdict::pass(Counter::RoutedPassed));
        }
        return Err(Counter::InDropToInternal);
    }
    Ok(Verdict::pass(Counter::InPassNotEgress))
}

/// Whether the packet is addressed to an egress address: the gateway
/// answers for those, and is not a way in through them.
#[inline(always)]
fn to_egress_address(frame: &Ipv4Frame) -> bool {
    EGRESS_ADDR_V4.get_ptr(frame.ip().dst_addr).is_some()
}

/// A reply of a flow: back to the tenant host it belongs to.
#[inline(always)]
fn flow<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    transport: &Transport,
    key: &FlowKeyV4,
    entry: *mut FlowEntryV4,
    ingress: u32,
) -> Result<Verdict, Counter> {
    refuse_expiring(frame)?;
    // SAFETY: map value pointer returned by the kernel.
    let (host_addr, host_port, tenant) =
        unsafe { ((*entry).nat_addr, (*entry).nat_port, (*entry).tenant) };

    let now = conntrack::now();
    let tot_len = u16::from_be_bytes(frame.ip().tot_len);
    let wire_len = forward::wire_len(ctx, frame, transport);
    // Only routes that passed `check_return` are cached.
    let route = forward::flow_route(entry, now, wire_len, || {
        let route = forward::route_v4(
            ctx,
            frame,
            ingress,
            key.src,
            host_addr,
            (transport.src_port, host_port),
            wire_len,
        );
        check_return(frame, &route).map(|()| route)
    })?;
    conntrack::touch(entry, now, tot_len, transport.tcp_flags);
    if frame.is_fragment() {
        frags::remember(frame, DIR_REPLY, REPLY_ZONE, host_addr, tenant, now);
    }
    let fix = nat::rewrite(frame, transport, Side::Destination, host_addr, host_port);
    Ok(deliver(ctx, frame, route, fix, Counter::InTranslated))
}

/// An ICMP error about a packet the gateway translated (a router's
/// time-exceeded or fragmentation-needed): the quoted packet names the flow;
/// the outer destination and the quoted source become the tenant host's, so
/// the host recognises the error (path-MTU discovery works through the NAT).
#[inline(always)]
fn icmp_error<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    error: &IcmpError,
    ingress: u32,
) -> Result<Verdict, Counter> {
    if error.inner_src != frame.ip().dst_addr {
        return Err(Counter::InDropNoFlow);
    }
    let key = FlowKeyV4 {
        src: error.inner_dst,
        dst: error.inner_src,
        src_port: error.inner_dst_port,
        dst_port: error.inner_src_port,
        proto: error.inner_proto,
        direction: DIR_REPLY,
        zone: REPLY_ZONE,
    };
    let entry = conntrack::lookup(&key).ok_or(Counter::InDropNoFlow)?;
    refuse_expiring(frame)?;
    // SAFETY: map value pointer returned by the kernel.
    let (host_addr, host_port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    let route = forward::route_v4(
        ctx,
        frame,
        ingress,
        frame.ip().src_addr,
        host_addr,
        (0, 0),
        frame.tot_len(),
    );
    check_return(frame, &route)?;
    nat::rewrite_icmp_error(frame, error, Side::Destination, host_addr, host_port);
    Ok(deliver(
        ctx,
        frame,
        route,
        None,
        Counter::InIcmpErrorTranslated,
    ))
}

/// A fragment after the first follows the translation its first got.
#[inline(always)]
fn later_fragment<H: Hook>(ctx: &H, frame: &Ipv4Frame, ingress: u32) -> Result<Verdict, Counter> {
    let first =
        frags::recall(frame, DIR_REPLY, REPLY_ZONE).ok_or(Counter::InDropFragmentUnknown)?;
    refuse_expiring(frame)?;
    let route = forward::route_v4(
        ctx,
        frame,
        ingress,
        frame.ip().src_addr,
        first.nat_addr,
        (0, 0),
        frame.tot_len(),
    );
    check_return(frame, &route)?;
    nat::rewrite_address(frame, Side::Destination, first.nat_addr);
    Ok(deliver(
        ctx,
        frame,
        route,
        None,
        Counter::InFragmentTranslated,
    ))
}

/// The kernel's time-exceeded would quote the translated header, naming the
/// tenant host to the outside: a reply about to expire is dropped instead.
#[inline(always)]
fn refuse_expiring(frame: &Ipv4Frame) -> Result<(), Counter> {
    if frame.ip().ttl <= 1 {
        return Err(Counter::InDropTtlExceeded);
    }
    Ok(())
}

/// The way back must lead inside, and a DF packet must fit (the kernel's
/// frag-needed would quote the tenant host, like time-exceeded).
#[inline(always)]
fn check_return(frame: &Ipv4Frame, route: &Route) -> Result<(), Counter> {
    if !route.leaves_through(ROLE_INTERNAL) {
        return Err(Counter::InDropNoRoute);
    }
    if let Route::TooBig { .. } = route
        && frame.dont_fragment()
    {
        return Err(Counter::InDropTooBig);
    }
    Ok(())
}

/// One router hop towards the tenant host, for a packet already translated
/// (`fix` is its TCP/UDP checksum update, still owed).
#[inline(always)]
fn deliver<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    route: Route,
    fix: Option<L4Fix>,
    counter: Counter,
) -> Verdict {
    if forward::sends_itself::<H>(&route) {
        forward::decrement_ttl(frame);
    }
    forward::out(
        ctx,
        frame.eth,
        route,
        fix,
        counter,
        Counter::InNeighRedirected,
    )
    // The kernel forwards it inside (resolving the neighbour, or
    // fragmenting a packet without DF); it decrements the TTL itself.
    .unwrap_or(Verdict::pass(Counter::InPassNeighFallback))
}
