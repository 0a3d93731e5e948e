//! Reply, IPv6: IPv6 traffic arriving on the external interface, the same
//! path as `reply` with the family's own header, maps and checksums.
//!
//! parse -> (link control to the kernel) -> conntrack -> route ->
//! translate -> forward. A packet to an IPv6 egress address is a reply of
//! a tracked flow, the opening packet of a port forward or floating IP
//! (`inbound`), or nothing (dropped and counted); one the kernel would
//! forward inside is dropped (the gateway is not a way in); the rest (the
//! gateway's own addresses, routes to other places) is the kernel's.
//!
//! ICMPv6 errors about translated packets (path-MTU discovery, traceroute)
//! go on in their own program: see `icmp6`.
//!
//! Fragments of replies as IPv4's: the first translated as its flow and
//! remembered, later ones sent to the host it went to.

use aya_ebpf::btf_maps::lpm_trie::Key;
use egress_common::{
    config::{ROLE_INTERNAL, V6_SLOT_ICMP_ERR},
    counters::Counter,
    flow::{DIR_REPLY, FlowEntryV6, FlowKeyV6, REPLY_ZONE},
};

use crate::{
    conntrack,
    forward::{self, Route},
    frags,
    hook::{Hook, L4FixV6},
    inbound,
    maps::{EGRESS_ADDR_V6, ROUTED_SRC_V6},
    nat::{self, Side},
    parse::Transport,
    parse6::{self, ICMPV6_ECHO_REPLY, Ipv6Frame},
    reply::parse_error,
    verdict::Verdict,
};

#[inline(always)]
pub fn run<H: Hook>(ctx: &H) -> i32 {
    Verdict::finish::<H>(process(ctx))
}

#[inline(always)]
fn process<H: Hook>(ctx: &H) -> Result<Verdict, Counter> {
    let Some(frame) = parse6::ipv6(ctx).map_err(parse_error)? else {
        return Ok(Verdict::pass(Counter::InPassNotIp));
    };
    if frame.is_link_control() || parse6::is_neighbor_discovery(ctx, &frame) {
        return Ok(Verdict::pass(Counter::InPassLinkControl));
    }
    let ingress = ctx.ingress_ifindex();
    match parse6::transport(ctx, &frame, ICMPV6_ECHO_REPLY) {
        Ok(transport) => {
            let key = conntrack::key_of_v6(&frame, &transport, DIR_REPLY, REPLY_ZONE);
            let entry = match conntrack::lookup_v6(&key) {
                Some(entry) => entry,
                None if to_egress_address(&frame) => {
                    inbound::open_v6(&key, &transport)?.ok_or(Counter::InDropNoFlow)?
                }
                None => return not_egress(ctx, &frame, ingress),
            };
            flow(ctx, &frame, &transport, &key, entry, ingress)
        }
        _ if !to_egress_address(&frame) => not_egress(ctx, &frame, ingress),
        Err(_) if frame.fragment.is_some_and(|f| f.later) => later_fragment(ctx, &frame, ingress),
        // An error about a packet of a flow: `icmp6` (a tail call, which
        // returns only if that program is not loaded).
        Err(_) if parse6::is_icmp_error(ctx, &frame) => {
            ctx.tail_call_v6(V6_SLOT_ICMP_ERR);
            Err(Counter::InDropUnsupported)
        }
        Err(err) => Err(parse_error(err)),
    }
}

/// A packet from outside that is not for an egress address: the kernel's,
/// unless the kernel would forward it inside.
#[inline(always)]
fn not_egress<H: Hook>(ctx: &H, frame: &Ipv6Frame, ingress: u32) -> Result<Verdict, Counter> {
    if forward::route_as_is_v6(ctx, frame, ingress).leaves_through(ROLE_INTERNAL) {
        // Routed sources are reachable as they are, as they leave.
        if ROUTED_SRC_V6
            .get(&Key::new(128, frame.ip().dst_addr))
            .is_some()
        {
            return Ok(Verdict::pass(Counter::RoutedPassed));
        }
        return Err(Counter::InDropToInternal);
    }
    Ok(Verdict::pass(Counter::InPassNotEgress))
}

#[inline(always)]
fn to_egress_address(frame: &Ipv6Frame) -> bool {
    EGRESS_ADDR_V6.get_ptr(frame.ip().dst_addr).is_some()
}

/// A reply of a flow: back to the tenant host it belongs to.
#[inline(always)]
fn flow<H: Hook>(
    ctx: &H,
    frame: &Ipv6Frame,
    transport: &Transport,
    key: &FlowKeyV6,
    entry: *mut FlowEntryV6,
    ingress: u32,
) -> Result<Verdict, Counter> {
    // The kernel's time-exceeded would quote the translated header, naming
    // the tenant host to the outside.
    if frame.ip().hop_limit <= 1 {
        return Err(Counter::InDropTtlExceeded);
    }
    // SAFETY: map value pointer returned by the kernel.
    let (host_addr, host_port, tenant) =
        unsafe { ((*entry).nat_addr, (*entry).nat_port, (*entry).tenant) };
    let now = conntrack::now();
    let wire_len = forward::wire_len_v6(ctx, frame, transport);
    let route = forward::flow_route(entry, now, wire_len, || {
        let route = forward::route_v6(
            ctx,
            frame,
            ingress,
            &key.src,
            &host_addr,
            (transport.src_port, host_port),
            wire_len,
        );
        check_return(&route).map(|()| route)
    })?;
    conntrack::touch(entry, now, frame.ip_len(), transport.tcp_flags);
    if let Some(fragment) = frame.fragment {
        frags::remember_v6(
            frame,
            fragment,
            (DIR_REPLY, REPLY_ZONE),
            &host_addr,
            tenant,
            now,
        );
    }
    let fix = nat::rewrite_v6(frame, transport, Side::Destination, &host_addr, host_port);
    Ok(deliver(ctx, frame, route, Some(fix), Counter::InTranslated))
}

/// A fragment after the first, to an egress address: the tenant host its
/// first fragment went to, or dropped if the first was never seen.
#[inline(always)]
fn later_fragment<H: Hook>(ctx: &H, frame: &Ipv6Frame, ingress: u32) -> Result<Verdict, Counter> {
    let fragment = frame.fragment.ok_or(Counter::InDropFragmentUnknown)?;
    let host_addr = frags::recall_v6(frame, fragment, DIR_REPLY, REPLY_ZONE)
        .ok_or(Counter::InDropFragmentUnknown)?;
    if frame.ip().hop_limit <= 1 {
        return Err(Counter::InDropTtlExceeded);
    }
    let route = forward::route_v6(
        ctx,
        frame,
        ingress,
        &frame.ip().src_addr,
        &host_addr,
        (0, 0),
        frame.ip_len(),
    );
    check_return(&route)?;
    nat::rewrite_address_v6(frame, Side::Destination, &host_addr);
    Ok(deliver(
        ctx,
        frame,
        route,
        None,
        Counter::InFragmentTranslated,
    ))
}

/// The way back must lead inside, and the packet must fit: the kernel's
/// packet-too-big would quote the tenant host, like time-exceeded.
#[inline(always)]
pub fn check_return(route: &Route) -> Result<(), Counter> {
    if !route.leaves_through(ROLE_INTERNAL) {
        return Err(Counter::InDropNoRoute);
    }
    if let Route::TooBig { .. } = route {
        return Err(Counter::InDropTooBig);
    }
    Ok(())
}

/// One router hop towards the tenant host, for a packet already translated
/// (`fix` is its checksum update, still owed), counted as `counter`.
#[inline(always)]
pub fn deliver<H: Hook>(
    ctx: &H,
    frame: &Ipv6Frame,
    route: Route,
    fix: Option<L4FixV6>,
    counter: Counter,
) -> Verdict {
    if forward::sends_itself::<H>(&route) {
        forward::decrement_hop_limit(frame);
    }
    forward::out(
        ctx,
        frame.eth,
        route,
        fix,
        counter,
        Counter::InNeighRedirected,
    )
    // The kernel forwards it inside (resolving the neighbour); it
    // decrements the hop limit itself.
    .unwrap_or(Verdict::pass(Counter::InPassNeighFallback))
}
