//! Translate: choose a new flow's egress address, and rewrite a packet's
//! source (outbound) or destination (reply) address and port with every
//! checksum updated incrementally: whole packets, later fragments (address
//! only) and ICMP errors (outer address and the quoted packet inside).

use egress_common::{
    flow::{FlowKeyV4, FlowKeyV6},
    inbound::{FloatingKeyV4, FloatingKeyV6},
    tenant::{MAX_EGRESS_ADDRS, TENANT_F_FLOATING, TenantInfo},
};

use crate::{
    csum,
    hook::{L4Fix, L4FixV6},
    maps::{FLOATING_V4, FLOATING_V6, TENANT_ADDR_V6},
    parse::{IcmpError, Ipv4Frame, L4, QuotedL4, Transport},
    parse6::{IcmpErrorV6, Ipv6Frame},
};

/// The egress address for a new flow. Hashing source and destination (not
/// ports) keeps one host on one address towards one server, as Linux SNAT
/// does with an address range.
#[inline(always)]
pub fn pick_egress(tenant: &TenantInfo, key: &FlowKeyV4) -> Option<[u8; 4]> {
    let count = tenant.egress_v4_count as usize;
    if count == 0 || count > MAX_EGRESS_ADDRS {
        return None;
    }
    let mix = (u32::from_ne_bytes(key.src) ^ u32::from_ne_bytes(key.dst).rotate_left(16))
        .wrapping_mul(0x9e37_79b1);
    // Multiply-shift maps the hash onto 0..count; unlike `%`, the verifier
    // can bound the result, so it may index the array.
    let index = (((mix >> 16) as usize) * count) >> 16;
    tenant.egress_v4.get(index).copied()
}

/// `pick_egress` for IPv6: the same hash over the addresses' last 32 bits
/// (the host part, which varies; prefixes are shared), from the tenant's
/// `TENANT_ADDR_V6` entry.
#[inline(always)]
pub fn pick_egress_v6(tenant_id: u16, tenant: &TenantInfo, key: &FlowKeyV6) -> Option<[u8; 16]> {
    let count = tenant.egress_v6_count as usize;
    if count == 0 || count > MAX_EGRESS_ADDRS {
        return None;
    }
    let tail = |addr: &[u8; 16]| u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    let mix = (tail(&key.src) ^ tail(&key.dst).rotate_left(16)).wrapping_mul(0x9e37_79b1);
    let index = (((mix >> 16) as usize) * count) >> 16;
    let addrs = TENANT_ADDR_V6.get(u32::from(tenant_id))?;
    addrs.addrs.get(index).copied()
}

/// The floating IP of a new flow's host, if it has one: looked up only
/// for tenants that have floating IPs, so others pay nothing for them.
#[inline(always)]
pub fn floating(tenant: &TenantInfo, key: &FlowKeyV4) -> Option<[u8; 4]> {
    if tenant.flags & TENANT_F_FLOATING == 0 {
        return None;
    }
    let host = FloatingKeyV4 {
        host: key.src,
        zone: key.zone,
        _pad: 0,
    };
    FLOATING_V4.get_ptr(host).map(|addr| {
        // SAFETY: map value pointer returned by the kernel.
        unsafe { *addr }
    })
}

/// `floating` for an IPv6 host.
#[inline(always)]
pub fn floating_v6(tenant: &TenantInfo, key: &FlowKeyV6) -> Option<[u8; 16]> {
    if tenant.flags & TENANT_F_FLOATING == 0 {
        return None;
    }
    let host = FloatingKeyV6 {
        host: key.src,
        zone: key.zone,
        _pad: 0,
    };
    FLOATING_V6.get_ptr(host).map(|addr| {
        // SAFETY: map value pointer returned by the kernel.
        unsafe { *addr }
    })
}

/// Which end of the packet changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    #[inline(always)]
    fn opposite(self) -> Self {
        match self {
            Side::Source => Side::Destination,
            Side::Destination => Side::Source,
        }
    }
}

/// Sets one address of an IPv4 header, adjusting its checksum; returns the
/// old address.
#[inline(always)]
fn set_address(ip: &mut network_types::ip::Ipv4Hdr, side: Side, addr: [u8; 4]) -> [u8; 4] {
    let field = if side == Side::Source {
        &mut ip.src_addr
    } else {
        &mut ip.dst_addr
    };
    let old = *field;
    *field = addr;
    ip.check = csum::replace32(ip.check, old, addr);
    old
}

/// A later fragment: only the address changes, the ports (and the L4
/// checksum covering them) travelled in the first fragment.
#[inline(always)]
pub fn rewrite_address(frame: &Ipv4Frame, side: Side, addr: [u8; 4]) {
    // SAFETY: header pointer bounds-checked by the parser.
    set_address(unsafe { &mut *frame.ip }, side, addr);
}

/// An ICMP error: the outer `side` becomes `addr`, and so does the other
/// side of the quoted packet, whose port (or echo id) becomes `port`. The
/// ICMP checksum covers the quote, so every changed word is folded into it.
#[inline(always)]
pub fn rewrite_icmp_error(
    frame: &Ipv4Frame,
    error: &IcmpError,
    side: Side,
    addr: [u8; 4],
    port: u16,
) {
    // SAFETY: header pointers were bounds-checked by the parser.
    let (icmp, inner) = unsafe { (&mut *error.icmp, &mut *error.inner_ip) };
    let inner_side = side.opposite();
    let old_inner_check = inner.check;
    let old_addr = set_address(inner, inner_side, addr);
    let mut check = csum::replace32(icmp.check, old_addr, addr);
    check = csum::replace16(check, csum::word(old_inner_check), csum::word(inner.check));
    match error.inner_l4 {
        QuotedL4::Ports {
            ports,
            check: l4_check,
            udp,
        } => {
            // SAFETY: bounds-checked by the parser.
            let ports = unsafe { &mut *ports };
            let at = if inner_side == Side::Source { 0 } else { 2 };
            let old_port = u16::from_ne_bytes([ports[at], ports[at + 1]]);
            let new = port.to_ne_bytes();
            ports[at] = new[0];
            ports[at + 1] = new[1];
            check = csum::replace16(check, old_port, port);
            if let Some(l4_check) = l4_check {
                // SAFETY: bounds-checked by the parser.
                let l4_check = unsafe { &mut *l4_check };
                if !(udp && csum::word(*l4_check) == 0) {
                    let old = *l4_check;
                    let mut updated = csum::replace32(old, old_addr, addr);
                    updated = csum::replace16(updated, old_port, port);
                    if udp {
                        updated = csum::udp_nonzero(updated);
                    }
                    *l4_check = updated;
                    check = csum::replace16(check, csum::word(old), csum::word(updated));
                }
            }
        }
        QuotedL4::Echo(echo) => {
            // SAFETY: bounds-checked by the parser.
            let echo = unsafe { &mut *echo };
            let old_id = u16::from_ne_bytes([echo.data[0], echo.data[1]]);
            let old_echo_check = echo.check;
            echo.check = csum::replace16(echo.check, old_id, port);
            let id = port.to_ne_bytes();
            echo.data[0] = id[0];
            echo.data[1] = id[1];
            check = csum::replace16(check, old_id, port);
            check = csum::replace16(check, csum::word(old_echo_check), csum::word(echo.check));
        }
    }
    icmp.check = check;
    // SAFETY: header pointer bounds-checked by the parser.
    set_address(unsafe { &mut *frame.ip }, side, addr);
}

/// Where the checksum sits in a TCP and a UDP header.
const TCP_CHECK_AT: usize = 16;
const UDP_CHECK_AT: usize = 6;

/// Rewrites one end of the packet to `addr`:`port` (both network order).
/// A TCP or UDP checksum update is returned for the hook to apply last
/// (see `hook`); ICMP's, which has no pseudo-header, is done here.
#[inline(always)]
pub fn rewrite(
    frame: &Ipv4Frame,
    transport: &Transport,
    side: Side,
    addr: [u8; 4],
    port: u16,
) -> Option<L4Fix> {
    // SAFETY: header pointers were bounds-checked by the parser.
    let ip = unsafe { &mut *frame.ip };
    let old_addr = if side == Side::Source {
        ip.src_addr
    } else {
        ip.dst_addr
    };
    // (checksum field, its offset in the frame, old port, UDP?)
    let (check, check_at, old_port, udp) = match transport.l4 {
        L4::Tcp(tcp) => {
            // SAFETY: as above.
            let tcp = unsafe { &mut *tcp };
            let old_port = set_port(side, &mut tcp.source, &mut tcp.dest, port);
            (&raw mut tcp.check, TCP_CHECK_AT, old_port, false)
        }
        L4::Udp(udp) => {
            // SAFETY: as above.
            let udp = unsafe { &mut *udp };
            let old_port = set_port(side, &mut udp.src, &mut udp.dst, port);
            (&raw mut udp.check, UDP_CHECK_AT, old_port, true)
        }
        L4::IcmpEcho(icmp) => {
            // SAFETY: as above. ICMP's checksum has no pseudo-header: only
            // the identifier matters.
            let icmp = unsafe { &mut *icmp };
            let old_id = u16::from_ne_bytes([icmp.data[0], icmp.data[1]]);
            icmp.check = csum::replace16(icmp.check, old_id, port);
            let id = port.to_ne_bytes();
            icmp.data[0] = id[0];
            icmp.data[1] = id[1];
            set_address(ip, side, addr);
            return None;
        }
    };
    set_address(ip, side, addr);
    Some(L4Fix {
        check: check.cast(),
        check_offset: frame.l4_offset + check_at,
        old_addr,
        new_addr: addr,
        old_port,
        new_port: port,
        udp,
    })
}

/// Sets the source or destination port; returns the old one.
#[inline(always)]
fn set_port(side: Side, source: &mut [u8; 2], destination: &mut [u8; 2], port: u16) -> u16 {
    let field = if side == Side::Source {
        source
    } else {
        destination
    };
    let old = u16::from_ne_bytes(*field);
    *field = port.to_ne_bytes();
    old
}

/// `rewrite` for IPv6: one end of the packet becomes `addr`:`port`. Every
/// transport's checksum (ICMPv6's too) covers the addresses, so each
/// returns its update for the hook to apply last; there is no IP header
/// checksum.
#[inline(always)]
pub fn rewrite_v6(
    frame: &Ipv6Frame,
    transport: &Transport,
    side: Side,
    addr: &[u8; 16],
    port: u16,
) -> L4FixV6 {
    // SAFETY: header pointers were bounds-checked by the parser.
    let ip = unsafe { &mut *frame.ip };
    let field = if side == Side::Source {
        &mut ip.src_addr
    } else {
        &mut ip.dst_addr
    };
    let addr_diff = csum::diff128(field, addr);
    *field = *addr;
    let (check, check_at, old_port, udp) = match transport.l4 {
        L4::Tcp(tcp) => {
            // SAFETY: as above.
            let tcp = unsafe { &mut *tcp };
            let old_port = set_port(side, &mut tcp.source, &mut tcp.dest, port);
            (&raw mut tcp.check, TCP_CHECK_AT, old_port, false)
        }
        L4::Udp(udp) => {
            // SAFETY: as above.
            let udp = unsafe { &mut *udp };
            let old_port = set_port(side, &mut udp.src, &mut udp.dst, port);
            (&raw mut udp.check, UDP_CHECK_AT, old_port, true)
        }
        L4::IcmpEcho(icmp) => {
            // SAFETY: as above; the identifier is the echo's "port".
            let icmp = unsafe { &mut *icmp };
            let old_id = u16::from_ne_bytes([icmp.data[0], icmp.data[1]]);
            let id = port.to_ne_bytes();
            icmp.data[0] = id[0];
            icmp.data[1] = id[1];
            (&raw mut icmp.check, ICMP_CHECK_AT, old_id, false)
        }
    };
    L4FixV6 {
        check: check.cast(),
        check_offset: frame.l4_offset + check_at,
        addr_diff,
        old_port,
        new_port: port,
        udp,
    }
}

/// A later IPv6 fragment: only the address changes (the transport
/// checksum covering it travelled in the first fragment).
#[inline(always)]
pub fn rewrite_address_v6(frame: &Ipv6Frame, side: Side, addr: &[u8; 16]) {
    // SAFETY: header pointer bounds-checked by the parser.
    let ip = unsafe { &mut *frame.ip };
    if side == Side::Source {
        ip.src_addr = *addr;
    } else {
        ip.dst_addr = *addr;
    }
}

/// Where the checksum sits in an ICMPv6 header.
const ICMP_CHECK_AT: usize = 2;

/// `rewrite_icmp_error` for IPv6: the outer `side` becomes `addr`, and so
/// does the other side of the quoted packet, whose port (or echo id)
/// becomes `port`. The caller checked the two addresses are the same.
///
/// Every change inside the ICMPv6 message (the quoted address, port and
/// transport checksum, which covers the quoted addresses: a quoted echo's
/// too) is folded into the ICMPv6 checksum here, so the message's own sum
/// does not move. The outer address is in the ICMPv6 checksum's
/// pseudo-header only: that update is returned, owed like a transport's
/// (see `hook`), so TC keeps a `CHECKSUM_COMPLETE` sum right.
#[inline(always)]
pub fn rewrite_icmp_error_v6(
    frame: &Ipv6Frame,
    error: &IcmpErrorV6,
    side: Side,
    addr: &[u8; 16],
    port: u16,
) -> L4FixV6 {
    // SAFETY: header pointers were bounds-checked by the parser.
    let (icmp, inner) = unsafe { (&mut *error.icmp, &mut *error.inner_ip) };
    let inner_side = side.opposite();
    let inner_field = if inner_side == Side::Source {
        &mut inner.src_addr
    } else {
        &mut inner.dst_addr
    };
    let inner_diff = csum::diff128(inner_field, addr);
    *inner_field = *addr;
    let mut check = csum::apply_diff(icmp.check, inner_diff);
    match error.inner_l4 {
        QuotedL4::Ports {
            ports,
            check: l4_check,
            udp,
        } => {
            // SAFETY: bounds-checked by the parser.
            let ports = unsafe { &mut *ports };
            let at = if inner_side == Side::Source { 0 } else { 2 };
            let old_port = u16::from_ne_bytes([ports[at], ports[at + 1]]);
            let new = port.to_ne_bytes();
            ports[at] = new[0];
            ports[at + 1] = new[1];
            check = csum::replace16(check, old_port, port);
            if let Some(l4_check) = l4_check {
                // SAFETY: bounds-checked by the parser.
                let l4_check = unsafe { &mut *l4_check };
                if !(udp && csum::word(*l4_check) == 0) {
                    let old = *l4_check;
                    let mut updated = csum::apply_diff(old, inner_diff);
                    updated = csum::replace16(updated, old_port, port);
                    if udp {
                        updated = csum::udp_nonzero(updated);
                    }
                    *l4_check = updated;
                    check = csum::replace16(check, csum::word(old), csum::word(updated));
                }
            }
        }
        QuotedL4::Echo(echo) => {
            // SAFETY: bounds-checked by the parser.
            let echo = unsafe { &mut *echo };
            let old_id = u16::from_ne_bytes([echo.data[0], echo.data[1]]);
            let old_echo_check = echo.check;
            let updated = csum::apply_diff(echo.check, inner_diff);
            echo.check = csum::replace16(updated, old_id, port);
            let id = port.to_ne_bytes();
            echo.data[0] = id[0];
            echo.data[1] = id[1];
            check = csum::replace16(check, old_id, port);
            check = csum::replace16(check, csum::word(old_echo_check), csum::word(echo.check));
        }
    }
    icmp.check = check;
    // SAFETY: header pointer bounds-checked by the parser.
    let ip = unsafe { &mut *frame.ip };
    let outer = if side == Side::Source {
        &mut ip.src_addr
    } else {
        &mut ip.dst_addr
    };
    let addr_diff = csum::diff128(outer, addr);
    *outer = *addr;
    L4FixV6 {
        check: (&raw mut icmp.check).cast(),
        check_offset: frame.l4_offset + ICMP_CHECK_AT,
        addr_diff,
        // No port of the outer message changes.
        old_port: 0,
        new_port: 0,
        udp: false,
    }
}
