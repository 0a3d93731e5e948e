//! Inbound: a packet from outside to an egress address that belongs to no
//! flow may open one through a port forward or a floating IP.
//!
//! forward lookup -> may it open a flow (a TCP SYN, any UDP datagram) ->
//! the tenant's limits -> both halves -> reported. From then on its packets
//! are a flow like any other: the reply program translates them towards
//! the host, the outbound program the host's answers back to the egress
//! address and port. Everything else to an egress address stays dropped.

use egress_common::{
    counters::Counter,
    flow::{
        FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_RST,
        TCP_SYN,
    },
    inbound::{ForwardKeyV4, ForwardKeyV6, ForwardV4, ForwardV6},
};

use crate::{
    conntrack, events, limits,
    maps::{PORT_FWD_V4, PORT_FWD_V6, TENANTS},
    parse::Transport,
    verdict::count,
};

/// The rule the packet keyed `key` (reply direction) matches: a port
/// forward of its destination port, else a floating IP of its address.
#[inline(always)]
fn rule(key: &FlowKeyV4) -> Option<ForwardV4> {
    let exact = ForwardKeyV4 {
        addr: key.dst,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    if let Some(forward) = PORT_FWD_V4.get_ptr(exact) {
        // SAFETY: map value pointer returned by the kernel.
        return Some(unsafe { *forward });
    }
    let whole = ForwardKeyV4 {
        addr: key.dst,
        port: 0,
        proto: 0,
        _pad: 0,
    };
    // SAFETY: as above.
    PORT_FWD_V4
        .get_ptr(whole)
        .map(|forward| unsafe { *forward })
}

/// Whether a packet no flow knows may open one: a TCP SYN (not an ACK or
/// RST), any UDP datagram.
#[inline(always)]
fn opens(proto: u8, transport: &Transport) -> bool {
    match proto {
        PROTO_TCP => transport.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
        PROTO_UDP => true,
        _ => false,
    }
}

/// Opens the flow of a packet no flow knows, if a rule lets it; returns
/// its reply half, or `None` when no rule applies (the caller drops it).
#[inline(always)]
pub fn open(key: &FlowKeyV4, transport: &Transport) -> Result<Option<*mut FlowEntryV4>, Counter> {
    if !opens(key.proto, transport) {
        return Ok(None);
    }
    let Some(forward) = rule(key) else {
        return Ok(None);
    };
    let info = TENANTS
        .get(u32::from(forward.tenant))
        .ok_or(Counter::InDropTenantLimit)?;
    let now = conntrack::now();
    // A flood from outside takes the tenant's own share of the table, never
    // another tenant's.
    let usage = limits::admit(forward.tenant, info, now).map_err(|_| Counter::InDropTenantLimit)?;
    if let Some(outbound_key) = conntrack::create_inbound(key, &forward, now)? {
        limits::created(usage);
        events::flow_created(&outbound_key, (key.dst, key.dst_port), forward.tenant, now);
        count(Counter::InNewFlow);
    }
    Ok(conntrack::lookup(key))
}

/// `rule` for IPv6.
#[inline(always)]
fn rule_v6(key: &FlowKeyV6) -> Option<ForwardV6> {
    let mut wanted = ForwardKeyV6 {
        addr: key.dst,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    if let Some(forward) = PORT_FWD_V6.get_ptr(wanted) {
        // SAFETY: map value pointer returned by the kernel.
        return Some(unsafe { *forward });
    }
    wanted.port = 0;
    wanted.proto = 0;
    // SAFETY: as above.
    PORT_FWD_V6
        .get_ptr(wanted)
        .map(|forward| unsafe { *forward })
}

/// `open` for IPv6.
#[inline(always)]
pub fn open_v6(
    key: &FlowKeyV6,
    transport: &Transport,
) -> Result<Option<*mut FlowEntryV6>, Counter> {
    if !opens(key.proto, transport) {
        return Ok(None);
    }
    let Some(forward) = rule_v6(key) else {
        return Ok(None);
    };
    let info = TENANTS
        .get(u32::from(forward.tenant))
        .ok_or(Counter::InDropTenantLimit)?;
    let now = conntrack::now();
    let usage = limits::admit(forward.tenant, info, now).map_err(|_| Counter::InDropTenantLimit)?;
    if let Some(outbound_key) = conntrack::create_inbound_v6(key, &forward, now)? {
        limits::created(usage);
        events::flow_created_v6(outbound_key, (&key.dst, key.dst_port), forward.tenant, now);
        count(Counter::InNewFlow);
    }
    Ok(conntrack::lookup_v6(key))
}
