//! Reply: traffic arriving on the external interface.
//!
//! parse -> conntrack -> route -> translate -> forward. Packets addressed to
//! an egress address are replies of a tracked flow or nothing: the gateway is
//! not a way in, so anything else sent to an egress address is dropped.
//! Everything addressed elsewhere (the gateway's own address, ARP) is left to
//! the kernel.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use egress_common::{
    config::ROLE_INTERNAL,
    counters::Counter,
    flow::{DIR_REPLY, FlowKeyV4, REPLY_ZONE},
};

use crate::{
    conntrack,
    forward::{self, Route},
    maps::EGRESS_ADDR_V4,
    nat::{self, Side},
    parse::{self, ICMP_ECHO_REPLY, ParseError},
    verdict::Verdict,
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    Verdict::finish(process(ctx))
}

#[inline(always)]
fn parse_error(err: ParseError) -> Counter {
    match err {
        ParseError::Malformed => Counter::InDropMalformed,
        ParseError::Unsupported => Counter::InDropUnsupported,
    }
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Result<Verdict, Counter> {
    // Parse, as far as needed to see whether the packet is ours.
    let Some(frame) = parse::ipv4(ctx).map_err(parse_error)? else {
        return Ok(Verdict::pass(Counter::InPassNotIpv4));
    };
    let (src, dst, ttl) = {
        let ip = frame.ip();
        (ip.src_addr, ip.dst_addr, ip.ttl)
    };
    if EGRESS_ADDR_V4.get_ptr(dst).is_none() {
        return Ok(Verdict::pass(Counter::InPassNotEgress));
    }
    let transport = parse::transport(ctx, &frame, ICMP_ECHO_REPLY).map_err(parse_error)?;

    // Conntrack.
    let key = FlowKeyV4 {
        src,
        dst,
        src_port: transport.src_port,
        dst_port: transport.dst_port,
        proto: frame.ip().proto,
        direction: DIR_REPLY,
        zone: REPLY_ZONE,
    };
    let entry = conntrack::lookup(&key).ok_or(Counter::InDropNoFlow)?;
    // The kernel's time-exceeded would quote the translated header, naming
    // the tenant host to the outside: drop instead.
    if ttl <= 1 {
        return Err(Counter::InDropTtlExceeded);
    }
    // SAFETY: map value pointer returned by the kernel.
    let (host_addr, host_port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };

    // Route, as the translated packet; it must lead back inside.
    let ingress = ctx.ingress_ifindex() as u32;
    let ports = (transport.src_port, host_port);
    let route = forward::route_v4(ctx, &frame, ingress, src, host_addr, ports);
    if !route.leaves_through(ROLE_INTERNAL) {
        return Err(Counter::InDropNoRoute);
    }
    // Same reason as TTL: frag-needed from here would quote the tenant host.
    if let Route::TooBig { .. } = route
        && frame.dont_fragment()
    {
        return Err(Counter::InDropTooBig);
    }

    conntrack::touch(
        entry,
        conntrack::now(),
        u16::from_be_bytes(frame.ip().tot_len),
        transport.tcp_flags,
    );
    nat::rewrite(&frame, &transport, Side::Destination, host_addr, host_port);
    match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => {
            forward::decrement_ttl(&frame);
            Ok(Verdict {
                action: forward::redirect(&frame, ifindex, smac, dmac),
                counter: Counter::InTranslated,
            })
        }
        // The kernel forwards it inside (resolving the neighbour, or
        // fragmenting a packet without DF); it decrements the TTL itself.
        _ => Ok(Verdict {
            action: XDP_PASS,
            counter: Counter::InPassNeighFallback,
        }),
    }
}
