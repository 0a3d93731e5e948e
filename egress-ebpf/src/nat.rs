//! Translate: choose a new flow's egress address, and rewrite a packet's
//! source (outbound) or destination (reply) address and port with every
//! checksum updated incrementally.

use egress_common::{
    flow::FlowKeyV4,
    tenant::{MAX_EGRESS_ADDRS, TenantInfo},
};

use crate::{
    csum,
    parse::{Ipv4Frame, L4, Transport},
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

/// Which end of the packet changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites one end of the packet to `addr`:`port` (both network order).
#[inline(always)]
pub fn rewrite(frame: &Ipv4Frame, transport: &Transport, side: Side, addr: [u8; 4], port: u16) {
    // SAFETY: header pointers were bounds-checked by the parser.
    let ip = unsafe { &mut *frame.ip };
    let old_addr = if side == Side::Source {
        ip.src_addr
    } else {
        ip.dst_addr
    };
    match transport.l4 {
        L4::Tcp(tcp) => {
            // SAFETY: as above.
            let tcp = unsafe { &mut *tcp };
            let port_field = if side == Side::Source {
                &mut tcp.source
            } else {
                &mut tcp.dest
            };
            let check = csum::replace32(tcp.check, old_addr, addr);
            tcp.check = csum::replace16(check, u16::from_ne_bytes(*port_field), port);
            *port_field = port.to_ne_bytes();
        }
        L4::Udp(udp) => {
            // SAFETY: as above.
            let udp = unsafe { &mut *udp };
            let port_field = if side == Side::Source {
                &mut udp.src
            } else {
                &mut udp.dst
            };
            if csum::word(udp.check) != 0 {
                let check = csum::replace32(udp.check, old_addr, addr);
                let check = csum::replace16(check, u16::from_ne_bytes(*port_field), port);
                udp.check = csum::udp_nonzero(check);
            }
            *port_field = port.to_ne_bytes();
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
        }
    }
    ip.check = csum::replace32(ip.check, old_addr, addr);
    if side == Side::Source {
        ip.src_addr = addr;
    } else {
        ip.dst_addr = addr;
    }
}
