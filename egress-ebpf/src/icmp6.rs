//! ICMPv6 errors about packets of flows, both ways, in their own programs
//! (`snat_icmp6_err`, `tc_icmp6_err`): `reply6` and `outbound6` tail-call
//! them for an ICMPv6 error (`parse6::is_icmp_error`), so the quoted
//! packet's key and the translation get a program's whole stack. Which way
//! the error goes is the ingress interface's role.
//!
//! - Reply: a router's (or the remote's) error about a packet the gateway
//!   translated (packet too big, time exceeded, unreachable) names the flow
//!   by the quoted packet; the outer destination and the quoted source
//!   become the tenant host's, so the host recognises it: path-MTU
//!   discovery and traceroute work through the NAT. The MTU of packet too
//!   big stays as it is (the translation does not change the packet's
//!   size).
//! - Outbound: a tenant host's error about a reply it received; the outer
//!   source and the quoted destination become the flow's egress address
//!   and port, so the host's address never leaves. The caller classified
//!   the source and left expiring errors to the kernel.

use egress_common::{
    config::{ROLE_EXTERNAL, ROLE_INTERNAL},
    counters::Counter,
    flow::{DIR_OUTBOUND, DIR_REPLY, FlowKeyV6, REPLY_ZONE},
};

use crate::{
    classify, conntrack, forward,
    hook::Hook,
    nat::{self, Side},
    outbound, outbound6,
    parse6::{self, IcmpErrorV6},
    reply, reply6,
    verdict::Verdict,
};

#[inline(always)]
pub fn run<H: Hook>(ctx: &H) -> i32 {
    let ingress = ctx.ingress_ifindex();
    let result = match forward::role_of(ingress) {
        ROLE_EXTERNAL => from_outside(ctx, ingress),
        ROLE_INTERNAL => from_tenant(ctx, ingress),
        // Only the programs of the agent's interfaces call this one.
        _ => Err(Counter::InDropUnsupported),
    };
    Verdict::finish::<H>(result)
}

/// The key of the flow half the quoted packet belongs to, seen from the
/// sender of the quoted packet's reply: the quote's ends swapped.
#[inline(always)]
fn quoted_key(error: &IcmpErrorV6, direction: u8, zone: u16) -> FlowKeyV6 {
    let inner = error.inner();
    FlowKeyV6 {
        src: inner.dst_addr,
        dst: inner.src_addr,
        src_port: error.inner_dst_port,
        dst_port: error.inner_src_port,
        proto: error.inner_proto,
        direction,
        zone,
    }
}

/// An error from outside about a packet the gateway translated: back to
/// the tenant host that sent it.
#[inline(always)]
fn from_outside<H: Hook>(ctx: &H, ingress: u32) -> Result<Verdict, Counter> {
    let frame = parse6::ipv6(ctx)
        .map_err(reply::parse_error)?
        .ok_or(Counter::InDropUnsupported)?;
    let error = parse6::icmp_error(ctx, &frame).map_err(reply::parse_error)?;
    // The quoted packet left from the address the error is sent to.
    if error.inner().src_addr != frame.ip().dst_addr {
        return Err(Counter::InDropNoFlow);
    }
    let key = quoted_key(&error, DIR_REPLY, REPLY_ZONE);
    let entry = conntrack::lookup_v6(&key).ok_or(Counter::InDropNoFlow)?;
    // As for a reply: the kernel's time-exceeded would name the host.
    if frame.ip().hop_limit <= 1 {
        return Err(Counter::InDropTtlExceeded);
    }
    // SAFETY: map value pointer returned by the kernel.
    let (host_addr, host_port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    let route = forward::route_v6(
        ctx,
        &frame,
        ingress,
        &frame.ip().src_addr,
        &host_addr,
        (0, 0),
        frame.ip_len(),
    );
    reply6::check_return(&route)?;
    let fix = nat::rewrite_icmp_error_v6(&frame, &error, Side::Destination, &host_addr, host_port);
    Ok(reply6::deliver(
        ctx,
        &frame,
        route,
        Some(fix),
        Counter::InIcmpErrorTranslated,
    ))
}

/// A tenant host's error about a reply it received: out from the flow's
/// egress address.
#[inline(always)]
fn from_tenant<H: Hook>(ctx: &H, ingress: u32) -> Result<Verdict, Counter> {
    let frame = parse6::ipv6(ctx)
        .map_err(outbound::parse_error)?
        .ok_or(Counter::OutDropUnsupported)?;
    // SAFETY: the Ethernet header was bounds-checked by the parser.
    let port = classify::ingress_port(unsafe { (*frame.eth).dst_addr }, ingress);
    let error = parse6::icmp_error(ctx, &frame).map_err(outbound::parse_error)?;
    // The quoted reply was delivered to the host the error comes from.
    if error.inner().dst_addr != frame.ip().src_addr {
        return Err(Counter::OutDropInvalid);
    }
    // Port ids are kept below 2^16 by the agent.
    let key = quoted_key(&error, DIR_OUTBOUND, port as u16);
    let entry = conntrack::lookup_v6(&key).ok_or(Counter::OutDropInvalid)?;
    // SAFETY: map value pointer returned by the kernel.
    let (nat_addr, nat_port) = unsafe { ((*entry).nat_addr, (*entry).nat_port) };
    let route = forward::route_v6(
        ctx,
        &frame,
        ingress,
        &nat_addr,
        &frame.ip().dst_addr,
        (0, 0),
        frame.ip_len(),
    );
    if let Some(verdict) = outbound6::not_leaving(&route) {
        return Ok(verdict);
    }
    let fix = nat::rewrite_icmp_error_v6(&frame, &error, Side::Source, &nat_addr, nat_port);
    Ok(outbound6::transmit(
        ctx,
        &frame,
        route,
        fix,
        Counter::OutIcmpErrorTranslated,
    ))
}
