//! Outbound, IPv6: a tenant's IPv6 traffic arriving on an internal
//! interface, the same path as `outbound` with the family's own header,
//! maps and checksums.
//!
//! parse -> (link control to the kernel) -> conntrack -> classify (first
//! packets only) -> limits (new flows only) -> route -> translate ->
//! forward. What the kernel answers as a router (hop limit ending here,
//! packets too big for the next link: IPv6 routers never fragment) goes to
//! it untouched, and an unclassified source never leaves: the leak guard
//! covers IPv6 as well.
//!
//! ICMPv6 errors from tenant hosts about replies they received go on in
//! their own program: see `icmp6`.
//!
//! Fragments as IPv4's: a first fragment is translated as its flow and
//! remembered (`frags`), later ones follow it. The new-flow program gets
//! the parse handed over (`parse6::Walk`) rather than walking the
//! extension headers again.
//!
//! A host with a floating IP leaves from it, keeping its port (1:1), as
//! for IPv4.

use aya_ebpf::btf_maps::lpm_trie::Key;
use egress_common::{
    config::{V6_SLOT_ICMP_ERR, V6_SLOT_NEW_FLOW},
    counters::Counter,
    flow::{DIR_OUTBOUND, FlowEntryV6, FlowKeyV6, TCP_RST},
};

use crate::{
    classify, conntrack,
    conntrack::TranslationV6,
    events,
    forward::{self, Route},
    frags,
    hook::{Hook, L4FixV6},
    limits,
    maps::{NEW_FLOW_V6, ROUTED_SRC_V6, TENANTS},
    nat::{self, Side},
    outbound::parse_error,
    parse::Transport,
    parse6::{self, ICMPV6_ECHO_REQUEST, Ipv6Frame, Walk},
    verdict::{Verdict, count},
};

/// Packets of tracked flows, and what no tenant sent.
#[inline(always)]
pub fn run<H: Hook>(ctx: &H) -> i32 {
    Verdict::finish::<H>(process(ctx, false))
}

/// A tenant's packet that opens a flow, tail-called from `run`: a new
/// flow's two entries, keys and route need a program's whole stack.
#[inline(always)]
pub fn run_new_flow<H: Hook>(ctx: &H) -> i32 {
    Verdict::finish::<H>(process(ctx, true))
}

/// The path for both programs; `new_flows` tells which one this is. The
/// new-flow program parses and looks up again (a new flow costs far more
/// than that), so a flow created by another CPU meanwhile is joined.
#[inline(always)]
fn process<H: Hook>(ctx: &H, new_flows: bool) -> Result<Verdict, Counter> {
    let frame = if new_flows {
        parse6::resume(ctx, handed_over()?).map_err(parse_error)?
    } else {
        let Some(frame) = parse6::ipv6(ctx).map_err(parse_error)? else {
            return Ok(Verdict::pass(Counter::OutPassNotIp));
        };
        frame
    };
    if frame.is_link_control() || parse6::is_neighbor_discovery(ctx, &frame) {
        return Ok(Verdict::pass(Counter::OutPassLinkControl));
    }
    let ingress = ctx.ingress_ifindex();
    // SAFETY: the Ethernet header was bounds-checked by the parser.
    let port = classify::ingress_port(unsafe { (*frame.eth).dst_addr }, ingress);
    match parse6::transport(ctx, &frame, ICMPV6_ECHO_REQUEST) {
        Ok(transport) => {
            let key = conntrack::key_of_v6(&frame, &transport, DIR_OUTBOUND, port as u16);
            if !new_flows && let Some(entry) = conntrack::lookup_v6(&key) {
                if let Some(expiring) = expiring(&frame) {
                    return expiring;
                }
                return established(ctx, &frame, &transport, &key, entry, ingress);
            }
            let Some(tenant) = classify::tenant_v6(&frame, port) else {
                return unclassified(ctx, &frame, ingress);
            };
            if let Some(expiring) = expiring(&frame) {
                return expiring;
            }
            if !new_flows {
                hand_over(&frame)?;
                ctx.tail_call_v6(V6_SLOT_NEW_FLOW);
                return Err(Counter::OutDropIpv6Unserved);
            }
            new_flow(ctx, &frame, &transport, &key, tenant)
        }
        // The new-flow program sees only packets that parsed (it was
        // called for one): what follows is left out of it.
        Err(_) if new_flows => Err(Counter::OutDropInvalid),
        Err(err) => match classify::tenant_v6(&frame, port) {
            // A later fragment follows its first fragment's translation.
            Some(tenant) if frame.fragment.is_some_and(|f| f.later) => {
                if let Some(expiring) = expiring(&frame) {
                    return expiring;
                }
                later_fragment(ctx, &frame, tenant, ingress)
            }
            // A tenant host's error about a reply it received: `icmp6` (a
            // tail call, which returns only if that program is not loaded).
            Some(_) if parse6::is_icmp_error(ctx, &frame) => {
                if let Some(expiring) = expiring(&frame) {
                    return expiring;
                }
                ctx.tail_call_v6(V6_SLOT_ICMP_ERR);
                Err(Counter::OutDropUnsupported)
            }
            Some(_) => Err(parse_error(err)),
            None => unclassified(ctx, &frame, ingress),
        },
    }
}

/// Leaves the parse for the new-flow program in this CPU's scratch.
#[inline(always)]
fn hand_over(frame: &Ipv6Frame) -> Result<(), Counter> {
    let scratch = NEW_FLOW_V6
        .get_ptr_mut(0)
        .ok_or(Counter::OutDropIpv6Unserved)?;
    // SAFETY: this CPU's slot; programs do not interrupt each other on a CPU.
    unsafe { (*scratch).walk = frame.walk() };
    Ok(())
}

/// The parse `hand_over` left.
#[inline(always)]
fn handed_over() -> Result<&'static Walk, Counter> {
    let scratch = NEW_FLOW_V6.get_ptr(0).ok_or(Counter::OutDropIpv6Unserved)?;
    // SAFETY: this CPU's slot, written by the program that called this one.
    Ok(unsafe { &(*scratch).walk })
}

/// A tenant's packet whose hop limit ends here: the kernel answers it with
/// time-exceeded from its own address.
#[inline(always)]
fn expiring(frame: &Ipv6Frame) -> Option<Result<Verdict, Counter>> {
    (frame.ip().hop_limit <= 1).then_some(Ok(Verdict::pass(Counter::OutPassTtlExceeded)))
}

/// A packet of a tracked flow: its cached next hop (or the FIB), its
/// translation, out.
#[inline(always)]
fn established<H: Hook>(
    ctx: &H,
    frame: &Ipv6Frame,
    transport: &Transport,
    key: &FlowKeyV6,
    entry: *mut FlowEntryV6,
    ingress: u32,
) -> Result<Verdict, Counter> {
    // SAFETY: map value pointer returned by the kernel.
    let (nat_addr, nat_port, tenant) =
        unsafe { ((*entry).nat_addr, (*entry).nat_port, (*entry).tenant) };
    let now = conntrack::now();
    let wire_len = forward::wire_len_v6(ctx, frame, transport);
    let route = forward::flow_route(entry, now, wire_len, || {
        let route = forward::route_v6(
            ctx,
            frame,
            ingress,
            &nat_addr,
            &key.dst,
            (transport.src_port, transport.dst_port),
            wire_len,
        );
        match not_leaving(&route) {
            Some(verdict) => Err(verdict),
            None => Ok(route),
        }
    });
    let route = match route {
        Ok(route) => route,
        Err(verdict) => return Ok(verdict),
    };
    conntrack::reopen_if_closed_v6(key, entry, transport.tcp_flags);
    conntrack::touch(entry, now, frame.ip_len(), transport.tcp_flags);
    remember_first_fragment(frame, tenant, &nat_addr, now);
    Ok(send(ctx, frame, transport, (&nat_addr, nat_port), route))
}

/// The first packet of a flow: pick its egress address, route it, claim a
/// port and create both halves (or join the flow another CPU just
/// created), then send it like any other.
#[inline(always)]
fn new_flow<H: Hook>(
    ctx: &H,
    frame: &Ipv6Frame,
    transport: &Transport,
    key: &FlowKeyV6,
    tenant: u16,
) -> Result<Verdict, Counter> {
    let ingress = ctx.ingress_ifindex();
    if transport.tcp_flags & TCP_RST != 0 {
        return Err(Counter::OutDropInvalid);
    }
    let info = TENANTS
        .get(u32::from(tenant))
        .ok_or(Counter::OutDropNoEgressAddr)?;
    // A host with a floating IP leaves from it, keeping its port (1:1 NAT);
    // every other host from one of its tenant's egress addresses.
    let (addr, port_min, port_max) = match nat::floating_v6(info, key) {
        Some(addr) => {
            let port = u16::from_be(key.src_port);
            (addr, port, port)
        }
        None => (
            nat::pick_egress_v6(tenant, info, key).ok_or(Counter::OutDropNoEgressAddr)?,
            info.port_min,
            info.port_max,
        ),
    };
    let route = forward::route_v6(
        ctx,
        frame,
        ingress,
        &addr,
        &key.dst,
        (transport.src_port, transport.dst_port),
        forward::wire_len_v6(ctx, frame, transport),
    );
    if let Some(verdict) = not_leaving(&route) {
        return Ok(verdict);
    }
    let now = conntrack::now();
    let usage = limits::admit(tenant, info, now)?;
    let translation = TranslationV6 {
        addr,
        tenant,
        port_min,
        port_max,
        now,
        ip_len: frame.ip_len(),
        tcp_flags: transport.tcp_flags,
        route,
    };
    let ((nat_addr, nat_port), created) = conntrack::create_outbound_v6(key, &translation)
        .map_err(|refused| limits::refused(usage, refused))?;
    if created {
        limits::created(usage);
        events::flow_created_v6(key, (&nat_addr, nat_port), tenant, now);
    }
    count(Counter::OutNewFlow);
    remember_first_fragment(frame, tenant, &nat_addr, now);
    Ok(send(ctx, frame, transport, (&nat_addr, nat_port), route))
}

/// Traffic that will not leave through the external interface as it is,
/// and what becomes of it; `None` when it can be translated and sent. A
/// packet too big for the route goes to the kernel, which answers with
/// packet-too-big (IPv6 routers never fragment).
#[inline(always)]
pub fn not_leaving(route: &Route) -> Option<Verdict> {
    if !route.leaves_external() {
        return Some(Verdict::pass(Counter::OutPassNotEgress));
    }
    if let Route::TooBig { .. } = route {
        return Some(Verdict::pass(Counter::OutPassFragNeeded));
    }
    None
}

/// Translates a packet of a flow to `(nat_addr, nat_port)` and sends it
/// one router hop on.
#[inline(always)]
fn send<H: Hook>(
    ctx: &H,
    frame: &Ipv6Frame,
    transport: &Transport,
    (nat_addr, nat_port): (&[u8; 16], u16),
    route: Route,
) -> Verdict {
    let fix = nat::rewrite_v6(frame, transport, Side::Source, nat_addr, nat_port);
    transmit(ctx, frame, route, fix, Counter::OutTranslated)
}

/// A first fragment's translation, remembered for the fragments that
/// follow (before the header is rewritten: they arrive as it did).
#[inline(always)]
fn remember_first_fragment(frame: &Ipv6Frame, tenant: u16, nat_addr: &[u8; 16], now: u64) {
    if let Some(fragment) = frame.fragment {
        frags::remember_v6(
            frame,
            fragment,
            (DIR_OUTBOUND, tenant),
            nat_addr,
            tenant,
            now,
        );
    }
}

/// A fragment after the first: the address its first fragment was
/// translated to (its ports travelled in the first), or dropped if the
/// first was never seen.
#[inline(always)]
fn later_fragment<H: Hook>(
    ctx: &H,
    frame: &Ipv6Frame,
    tenant: u16,
    ingress: u32,
) -> Result<Verdict, Counter> {
    let fragment = frame.fragment.ok_or(Counter::OutDropFragmentUnknown)?;
    let nat_addr = frags::recall_v6(frame, fragment, DIR_OUTBOUND, tenant)
        .ok_or(Counter::OutDropFragmentUnknown)?;
    let route = forward::route_v6(
        ctx,
        frame,
        ingress,
        &nat_addr,
        &frame.ip().dst_addr,
        (0, 0),
        frame.ip_len(),
    );
    if let Some(verdict) = not_leaving(&route) {
        return Ok(verdict);
    }
    nat::rewrite_address_v6(frame, Side::Source, &nat_addr);
    forward::decrement_hop_limit(frame);
    Ok(forward::out(
        ctx,
        frame.eth,
        route,
        None::<L4FixV6>,
        Counter::OutFragmentTranslated,
        Counter::OutNeighRedirected,
    )
    .unwrap_or(Verdict::pass(Counter::OutPassNeighFallback)))
}

/// Sends a packet already translated (`fix` is its checksum update, still
/// owed) one router hop on, counted as `counter`.
#[inline(always)]
pub fn transmit<H: Hook>(
    ctx: &H,
    frame: &Ipv6Frame,
    route: Route,
    fix: L4FixV6,
    counter: Counter,
) -> Verdict {
    forward::decrement_hop_limit(frame);
    forward::out(
        ctx,
        frame.eth,
        route,
        Some(fix),
        counter,
        Counter::OutNeighRedirected,
    )
    // Translated already: the TC fallback sends it on (see `outbound`).
    .unwrap_or(Verdict::pass(Counter::OutPassNeighFallback))
}

/// A source that belongs to no tenant: fail closed towards the outside,
/// leave the gateway's own and internal traffic to the kernel.
#[inline(always)]
fn unclassified<H: Hook>(ctx: &H, frame: &Ipv6Frame, ingress: u32) -> Result<Verdict, Counter> {
    if !forward::route_as_is_v6(ctx, frame, ingress).leaves_external() {
        return Ok(Verdict::pass(Counter::OutPassNotEgress));
    }
    // Routed sources leave as they are, through the kernel (whose
    // forwarding the leak guard then lets out).
    if ROUTED_SRC_V6
        .get(&Key::new(128, frame.ip().src_addr))
        .is_some()
    {
        return Ok(Verdict::pass(Counter::RoutedPassed));
    }
    Err(Counter::OutDropUnclassified)
}
