//! Outbound: tenant traffic arriving on an internal interface.
//!
//! parse -> conntrack -> classify (first packets only) -> limits (new flows
//! only) -> route -> translate -> forward, reporting each flow created
//! (`events`). Whatever is not leaving through the external interface
//! (traffic to the gateway itself, between internal networks) goes to the
//! kernel untouched, and so does every case a router answers with an ICMP
//! error (TTL expiring here, DF packets too big), because the kernel answers
//! those correctly from its own address. A tenant source never reaches the
//! external side from here: the packet is either translated first or not
//! sent there by this program at all, and the leak guard on the external
//! interface stops the kernel from doing it. Written once for both hooks
//! (see `hook`).

use aya_ebpf::btf_maps::lpm_trie::Key;
use egress_common::{
    config::V6_SLOT_OUTBOUND,
    counters::Counter,
    flow::{DIR_OUTBOUND, FlowEntryV4, FlowKeyV4, TCP_RST},
    tenant::TENANT_F_FORWARDS,
};

use crate::{
    classify, conntrack,
    conntrack::Translation,
    events,
    forward::{self, Route},
    frags,
    hook::{Hook, L4Fix},
    limits,
    maps::{ROUTED_SRC_V4, TENANTS},
    nat::{self, Side},
    parse::{self, ICMP_ECHO_REQUEST, IcmpError, Ipv4Frame, ParseError, Payload, Transport},
    parse6,
    verdict::{Verdict, count},
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
        return Verdict::pass(Counter::OutPassNotIp);
    }
    ctx.tail_call_v6(V6_SLOT_OUTBOUND);
    Verdict::pass(Counter::OutPassIpv6Unserved)
}

#[inline(always)]
pub fn parse_error(err: ParseError) -> Counter {
    match err {
        ParseError::Malformed => Counter::OutDropMalformed,
        ParseError::Unsupported => Counter::OutDropUnsupported,
        ParseError::ExtHeaders => Counter::OutDropExtHeaders,
    }
}

#[inline(always)]
fn process<H: Hook>(ctx: &H) -> Result<Verdict, Counter> {
    // Parse, as far as needed to know whether the packet is ours.
    let Some(frame) = parse::ipv4(ctx).map_err(parse_error)? else {
        return Ok(ipv6(ctx));
    };
    if frame.to_group() {
        return Ok(Verdict::pass(Counter::OutPassNotEgress));
    }
    let ingress = ctx.ingress_ifindex();
    let port = classify::ingress_port(frame.eth().dst_addr, ingress);

    // Conntrack before classification: a flow's tenant was decided by its
    // first packet, so the packets of an established flow skip the tenant
    // lookup and their cost does not grow with the number of tenants. The
    // parsed payload is matched once, here: kept alive across the lookup,
    // LLVM packs it in ways the verifier refuses.
    match parse::payload(ctx, &frame, ICMP_ECHO_REQUEST) {
        Ok(Payload::Flow(transport)) => {
            let key = flow_key(&frame, &transport, port);
            if let Some(entry) = conntrack::lookup(&key) {
                if let Some(expiring) = expiring(&frame) {
                    return expiring;
                }
                return established(ctx, &frame, &transport, &key, entry, ingress);
            }
            let Some(tenant) = classify::tenant_v4(&frame, port) else {
                return unclassified(ctx, &frame, ingress);
            };
            if let Some(expiring) = expiring(&frame) {
                return expiring;
            }
            new_flow(ctx, &frame, &transport, tenant, port, ingress)
        }
        Ok(Payload::IcmpError(error)) => {
            if classify::tenant_v4(&frame, port).is_none() {
                return unclassified(ctx, &frame, ingress);
            }
            if let Some(expiring) = expiring(&frame) {
                return expiring;
            }
            icmp_error(ctx, &frame, &error, port, ingress)
        }
        Ok(Payload::LaterFragment) => {
            let Some(tenant) = classify::tenant_v4(&frame, port) else {
                return unclassified(ctx, &frame, ingress);
            };
            if let Some(expiring) = expiring(&frame) {
                return expiring;
            }
            later_fragment(ctx, &frame, tenant, ingress)
        }
        // What no tenant sent is judged as unclassified, however malformed.
        Err(err) => match classify::tenant_v4(&frame, port) {
            Some(_) => Err(parse_error(err)),
            None => unclassified(ctx, &frame, ingress),
        },
    }
}

/// A tenant's packet whose TTL ends here: the kernel answers it with
/// time-exceeded from its own address, as a router does.
#[inline(always)]
fn expiring(frame: &Ipv4Frame) -> Option<Result<Verdict, Counter>> {
    (frame.ip().ttl <= 1).then_some(Ok(Verdict::pass(Counter::OutPassTtlExceeded)))
}

/// The outbound key of the flow a packet belongs to.
#[inline(always)]
fn flow_key(frame: &Ipv4Frame, transport: &Transport, port: u32) -> FlowKeyV4 {
    // Port ids are kept below 2^16 by the agent.
    conntrack::key_of(frame, transport, DIR_OUTBOUND, port as u16)
}

/// A packet of a tracked flow: its cached next hop (or the FIB), its
/// translation, out.
#[inline(always)]
fn established<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    transport: &Transport,
    key: &FlowKeyV4,
    entry: *mut FlowEntryV4,
    ingress: u32,
) -> Result<Verdict, Counter> {
    // SAFETY: map value pointer returned by the kernel.
    let (nat_addr, nat_port, tenant) =
        unsafe { ((*entry).nat_addr, (*entry).nat_port, (*entry).tenant) };
    let now = conntrack::now();
    let tot_len = u16::from_be_bytes(frame.ip().tot_len);
    let wire_len = forward::wire_len(ctx, frame, transport);
    // Only routes that passed `not_leaving` are cached.
    let route = forward::flow_route(entry, now, wire_len, || {
        let route = forward::route_v4(
            ctx,
            frame,
            ingress,
            nat_addr,
            key.dst,
            (transport.src_port, transport.dst_port),
            wire_len,
        );
        match not_leaving(frame, &route) {
            Some(verdict) => Err(verdict),
            None => Ok(route),
        }
    });
    let route = match route {
        Ok(route) => route,
        Err(verdict) => return verdict,
    };
    conntrack::reopen_if_closed(key, entry, transport.tcp_flags);
    conntrack::touch(entry, now, tot_len, transport.tcp_flags);
    Ok(send(
        ctx,
        frame,
        transport,
        tenant,
        (nat_addr, nat_port),
        route,
        now,
    ))
}

/// The first packet of a flow: pick its egress address, route it, claim a
/// port and create both halves, then send it like any other.
#[inline(always)]
fn new_flow<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    transport: &Transport,
    tenant: u16,
    port: u32,
    ingress: u32,
) -> Result<Verdict, Counter> {
    if transport.tcp_flags & TCP_RST != 0 {
        return Err(Counter::OutDropInvalid);
    }
    let key = flow_key(frame, transport, port);
    let info = TENANTS
        .get(u32::from(tenant))
        .ok_or(Counter::OutDropNoEgressAddr)?;
    // A host with a floating IP leaves from it, keeping its port (1:1 NAT);
    // every other host from one of its tenant's egress addresses.
    let translation = match nat::floating(info, &key) {
        Some(addr) => {
            let port = u16::from_be(key.src_port);
            Translation {
                addr,
                tenant,
                port_min: port,
                port_max: port,
                avoid_forwards: false,
            }
        }
        None => Translation {
            addr: nat::pick_egress(info, &key).ok_or(Counter::OutDropNoEgressAddr)?,
            tenant,
            port_min: info.port_min,
            port_max: info.port_max,
            avoid_forwards: info.flags & TENANT_F_FORWARDS != 0,
        },
    };
    let addr = translation.addr;

    // Route, as the translated packet.
    let route = forward::route_v4(
        ctx,
        frame,
        ingress,
        addr,
        key.dst,
        (transport.src_port, transport.dst_port),
        forward::wire_len(ctx, frame, transport),
    );
    if let Some(verdict) = not_leaving(frame, &route) {
        return verdict;
    }

    // The tenant's share of the table and its rate: what it cannot open
    // here, no other tenant loses.
    let now = conntrack::now();
    let usage = limits::admit(tenant, info, now)?;
    let tot_len = u16::from_be_bytes(frame.ip().tot_len);
    let (translated, created) = conntrack::create_outbound(&key, &translation, now, |entry| {
        conntrack::touch(entry, now, tot_len, transport.tcp_flags);
        forward::remember_route(entry, &route, now);
    })
    .map_err(|refused| limits::refused(usage, refused))?;
    if created {
        limits::created(usage);
        events::flow_created(&key, translated, tenant, now);
    }
    count(Counter::OutNewFlow);
    Ok(send(ctx, frame, transport, tenant, translated, route, now))
}

/// Translates a packet of a flow to `(nat_addr, nat_port)` and sends it.
#[inline(always)]
fn send<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    transport: &Transport,
    tenant: u16,
    (nat_addr, nat_port): ([u8; 4], u16),
    route: Route,
    now: u64,
) -> Verdict {
    if frame.is_fragment() {
        frags::remember(frame, DIR_OUTBOUND, tenant, nat_addr, tenant, now);
    }
    let fix = nat::rewrite(frame, transport, Side::Source, nat_addr, nat_port);
    transmit(ctx, frame, route, fix, Counter::OutTranslated)
}

/// An ICMP error a tenant host sends about a reply it received: the quoted
/// reply names the flow, and both the outer source and the quoted
/// destination become the flow's egress address and port.
#[inline(always)]
fn icmp_error<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    error: &IcmpError,
    port: u32,
    ingress: u32,
) -> Result<Verdict, Counter> {
    if error.inner_dst != frame.ip().src_addr {
        return Err(Counter::OutDropInvalid);
    }
    let key = FlowKeyV4 {
        src: error.inner_dst,
        dst: error.inner_src,
        src_port: error.inner_dst_port,
        dst_port: error.inner_src_port,
        proto: error.inner_proto,
        direction: DIR_OUTBOUND,
        zone: port as u16,
    };
    let entry = conntrack::lookup(&key).ok_or(Counter::OutDropInvalid)?;
    // SAFETY: map value pointer returned by the kernel.
    let (nat_addr, nat_port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    let route = forward::route_v4(
        ctx,
        frame,
        ingress,
        nat_addr,
        frame.ip().dst_addr,
        (0, 0),
        frame.tot_len(),
    );
    if let Some(verdict) = not_leaving(frame, &route) {
        return verdict;
    }
    nat::rewrite_icmp_error(frame, error, Side::Source, nat_addr, nat_port);
    Ok(transmit(
        ctx,
        frame,
        route,
        None,
        Counter::OutIcmpErrorTranslated,
    ))
}

/// A fragment after the first follows the translation its first got.
#[inline(always)]
fn later_fragment<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    tenant: u16,
    ingress: u32,
) -> Result<Verdict, Counter> {
    let first =
        frags::recall(frame, DIR_OUTBOUND, tenant).ok_or(Counter::OutDropFragmentUnknown)?;
    let route = forward::route_v4(
        ctx,
        frame,
        ingress,
        first.nat_addr,
        frame.ip().dst_addr,
        (0, 0),
        frame.tot_len(),
    );
    if let Some(verdict) = not_leaving(frame, &route) {
        return verdict;
    }
    nat::rewrite_address(frame, Side::Source, first.nat_addr);
    Ok(transmit(
        ctx,
        frame,
        route,
        None,
        Counter::OutFragmentTranslated,
    ))
}

/// Traffic that will not leave through the external interface as it is,
/// and what becomes of it; `None` when it can be translated and sent.
#[inline(always)]
fn not_leaving(frame: &Ipv4Frame, route: &Route) -> Option<Result<Verdict, Counter>> {
    if !route.leaves_external() {
        return Some(Ok(Verdict::pass(Counter::OutPassNotEgress)));
    }
    if let Route::TooBig { .. } = route {
        return Some(if frame.dont_fragment() {
            Ok(Verdict::pass(Counter::OutPassFragNeeded))
        } else {
            Err(Counter::OutDropTooBig)
        });
    }
    None
}

/// One router hop out of the external interface, for a packet already
/// translated (`fix` is its TCP/UDP checksum update, still owed).
#[inline(always)]
fn transmit<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    route: Route,
    fix: Option<L4Fix>,
    counter: Counter,
) -> Verdict {
    forward::decrement_ttl(frame);
    forward::out(
        ctx,
        frame.eth,
        route,
        fix,
        counter,
        Counter::OutNeighRedirected,
    )
    // Translated already, so the kernel sees an egress address as the
    // source: the TC fallback sends it on, and without it the kernel
    // drops it as a martian. Either way no tenant address leaves.
    .unwrap_or(Verdict::pass(Counter::OutPassNeighFallback))
}

/// A source that belongs to no tenant: fail closed towards the outside, but
/// leave the gateway's own and internal traffic to the kernel.
#[inline(always)]
fn unclassified<H: Hook>(ctx: &H, frame: &Ipv4Frame, ingress: u32) -> Result<Verdict, Counter> {
    if !forward::route_as_is(ctx, frame, ingress).leaves_external() {
        return Ok(Verdict::pass(Counter::OutPassNotEgress));
    }
    // Routed sources leave as they are, through the kernel (whose
    // forwarding the leak guard then lets out).
    if ROUTED_SRC_V4
        .get(&Key::new(32, frame.ip().src_addr))
        .is_some()
    {
        return Ok(Verdict::pass(Counter::RoutedPassed));
    }
    Err(Counter::OutDropUnclassified)
}
