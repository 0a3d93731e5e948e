//! Outbound: tenant traffic arriving on an internal interface.
//!
//! parse -> classify -> conntrack -> route -> translate -> forward. Whatever
//! is not leaving through the external interface (traffic to the gateway
//! itself, between internal networks) goes to the kernel untouched, and so
//! does every case a router answers with an ICMP error (TTL expiring here,
//! DF packets too big), because the kernel answers those correctly from its
//! own address. A tenant source never reaches the external side from here:
//! the packet is either translated first or not sent there by XDP at all, and
//! the leak guard on the external interface stops the kernel from doing it.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use egress_common::{
    counters::Counter,
    flow::{DIR_OUTBOUND, FlowKeyV4, TCP_RST},
};

use crate::{
    classify, conntrack,
    conntrack::Translation,
    forward::{self, Route},
    maps::TENANTS,
    nat::{self, Side},
    parse::{self, ICMP_ECHO_REQUEST, ParseError},
    verdict::{Verdict, count},
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    Verdict::finish(process(ctx))
}

#[inline(always)]
fn parse_error(err: ParseError) -> Counter {
    match err {
        ParseError::Malformed => Counter::OutDropMalformed,
        ParseError::Unsupported => Counter::OutDropUnsupported,
    }
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Result<Verdict, Counter> {
    // Parse.
    let Some(frame) = parse::ipv4(ctx).map_err(parse_error)? else {
        return Ok(Verdict::pass(Counter::OutPassNotIpv4));
    };
    if frame.to_group() {
        return Ok(Verdict::pass(Counter::OutPassNotEgress));
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let (src, dst, ttl) = {
        let ip = frame.ip();
        (ip.src_addr, ip.dst_addr, ip.ttl)
    };

    // Classify.
    let Some(tenant_id) = classify::tenant_v4(&frame, ingress) else {
        return unclassified(ctx, &frame, ingress, src, dst);
    };
    let transport = parse::transport(ctx, &frame, ICMP_ECHO_REQUEST).map_err(parse_error)?;
    if ttl <= 1 {
        return Ok(Verdict::pass(Counter::OutPassTtlExceeded));
    }

    // Conntrack: an existing flow, or what a new one would translate to.
    let key = FlowKeyV4 {
        src,
        dst,
        src_port: transport.src_port,
        dst_port: transport.dst_port,
        proto: frame.ip().proto,
        direction: DIR_OUTBOUND,
        zone: tenant_id,
    };
    let existing = conntrack::lookup(&key);
    let (nat_addr, new_flow) = match existing {
        // SAFETY: map value pointer returned by the kernel.
        Some(entry) => (unsafe { (*entry).nat_addr }, None),
        None => {
            if transport.tcp_flags & TCP_RST != 0 {
                return Err(Counter::OutDropInvalid);
            }
            let tenant = TENANTS
                .get(u32::from(tenant_id))
                .ok_or(Counter::OutDropNoEgressAddr)?;
            let addr = nat::pick_egress(tenant, &key).ok_or(Counter::OutDropNoEgressAddr)?;
            let translation = Translation {
                addr,
                port_min: tenant.port_min,
                port_max: tenant.port_max,
            };
            (addr, Some(translation))
        }
    };

    // Route, as the translated packet.
    let ports = (transport.src_port, transport.dst_port);
    let route = forward::route_v4(ctx, &frame, ingress, nat_addr, dst, ports);
    if !route.leaves_external() {
        return Ok(Verdict::pass(Counter::OutPassNotEgress));
    }
    if let Route::TooBig { .. } = route {
        return if frame.dont_fragment() {
            Ok(Verdict::pass(Counter::OutPassFragNeeded))
        } else {
            Err(Counter::OutDropTooBig)
        };
    }

    let now = conntrack::now();
    let entry = match (existing, new_flow) {
        (Some(entry), _) => {
            conntrack::reopen_if_closed(&key, entry, transport.tcp_flags);
            entry
        }
        (None, Some(translation)) => {
            let entry = conntrack::create_outbound(&key, &translation, ingress, now)?;
            count(Counter::OutNewFlow);
            entry
        }
        (None, None) => return Err(Counter::OutDropConntrackFull),
    };
    // SAFETY: map value pointer returned by the kernel.
    let (nat_addr, nat_port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    conntrack::touch(
        entry,
        now,
        u16::from_be_bytes(frame.ip().tot_len),
        transport.tcp_flags,
    );

    // Translate and forward.
    nat::rewrite(&frame, &transport, Side::Source, nat_addr, nat_port);
    forward::decrement_ttl(&frame);
    match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => Ok(Verdict {
            action: forward::redirect(&frame, ifindex, smac, dmac),
            counter: Counter::OutTranslated,
        }),
        // Translated already, so the kernel sees an egress address as the
        // source: the TC fallback sends it on, and without it the kernel
        // drops it as a martian. Either way no tenant address leaves.
        _ => Ok(Verdict {
            action: XDP_PASS,
            counter: Counter::OutPassNeighFallback,
        }),
    }
}

/// A source that belongs to no tenant: fail closed towards the outside, but
/// leave the gateway's own and internal traffic to the kernel.
#[inline(always)]
fn unclassified(
    ctx: &XdpContext,
    frame: &parse::Ipv4Frame,
    ingress: u32,
    src: [u8; 4],
    dst: [u8; 4],
) -> Result<Verdict, Counter> {
    if forward::route_v4(ctx, frame, ingress, src, dst, (0, 0)).leaves_external() {
        Err(Counter::OutDropUnclassified)
    } else {
        Ok(Verdict::pass(Counter::OutPassNotEgress))
    }
}
