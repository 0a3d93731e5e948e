//! Parse, IPv6: the frame's IPv6 header, its extension headers and the
//! transport header of a flow, with the same bounds checks (`parse::ptr_at`)
//! and the same `Transport` the IPv4 path uses.
//!
//! Extension headers (hop-by-hop, routing, destination options) are walked
//! up to `MAX_EXT_HEADERS`; a longer chain gets its own verdict
//! (`ParseError::ExtHeaders`) rather than a guess, and so does a second
//! fragment header (`Unsupported`). Both verdicts come from `transport`,
//! after classification, so only a tenant's packets are judged by them.
//! A fragment header is recorded (`Fragment`): a first fragment carries
//! the transport header and is translated as its flow, a later one only
//! payload, translated by the first one's memory (`frags`). The new-flow
//! program takes the walk's result from the program that called it
//! (`Walk`, `resume`) instead of walking again.
//!
//! ICMPv6 errors quoting a packet of a flow are recognised by
//! `is_icmp_error` and parsed by `icmp_error`, in their own program
//! (`icmp6`). Link-local and multicast traffic (Neighbor Discovery, MLD,
//! router advertisements) never reaches the NAT: `is_link_control` sends
//! it to the kernel first.

use egress_common::flow::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv6Hdr,
    ip::Ipv6Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    hook::Hook,
    parse::{L4, ParseError, QuotedL4, Transport, ptr_at},
};

/// ICMPv6 echo messages (RFC 4443 4), tracked like ports.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMPv6 errors, which quote the packet they are about (RFC 4443 3):
/// destination unreachable, packet too big, time exceeded, parameter
/// problem.
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

/// Extension headers the walk steps over (RFC 8200 4.1).
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_DEST_OPTIONS: u8 = 60;

/// Extension headers walked before the transport header; real traffic
/// carries at most one or two.
pub const MAX_EXT_HEADERS: usize = 4;

/// A fragment header's fields (RFC 8200 4.5).
#[derive(Clone, Copy)]
pub struct Fragment {
    /// Identification, as on the wire.
    pub id: [u8; 4],
    /// Not the first fragment: no transport header follows.
    pub later: bool,
}

/// An IPv6 packet in an Ethernet frame, its extension headers walked.
pub struct Ipv6Frame {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    /// Where the transport header starts (a later fragment: its payload).
    pub l4_offset: usize,
    /// The transport protocol (the last next-header value).
    pub proto: u8,
    /// Part of a datagram in fragments.
    pub fragment: Option<Fragment>,
}

impl Ipv6Frame {
    #[inline(always)]
    pub fn ip(&self) -> &Ipv6Hdr {
        // SAFETY: `ipv6` checked the whole header lies inside the frame.
        unsafe { &*self.ip }
    }

    /// The IPv6 header's length plus its payload's: what a route's MTU is
    /// checked against, and what the flow's byte counters add.
    #[inline(always)]
    pub fn ip_len(&self) -> u16 {
        let payload = u16::from_be_bytes(self.ip().payload_len);
        payload.saturating_add(Ipv6Hdr::LEN as u16)
    }

    /// Bytes from the transport header to the end of the packet.
    #[inline(always)]
    pub fn transport_len(&self) -> usize {
        EthHdr::LEN + usize::from(self.ip_len()) - self.l4_offset
    }

    /// Traffic of the link itself, which is the kernel's: link-local or
    /// unspecified addresses (Neighbor Discovery, router solicitations,
    /// DAD probes) and multicast (MLD, all-nodes, all-routers).
    #[inline(always)]
    pub fn is_link_control(&self) -> bool {
        let ip = self.ip();
        is_multicast(&ip.dst_addr)
            || is_link_local(&ip.dst_addr)
            || is_link_local(&ip.src_addr)
            || ip.src_addr == [0; 16]
    }
}

#[inline(always)]
fn is_multicast(addr: &[u8; 16]) -> bool {
    addr[0] == 0xff
}

/// fe80::/10.
#[inline(always)]
fn is_link_local(addr: &[u8; 16]) -> bool {
    addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
}

/// Neighbor Discovery (RFC 4861 4: router solicitation and advertisement,
/// neighbor solicitation and advertisement, redirect).
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;

/// Whether the packet is Neighbor Discovery, whatever its addresses: the
/// kernel resolving a next hop for a translated packet solicits from the
/// egress address, so the answer comes back to a global address.
#[inline(always)]
pub fn is_neighbor_discovery(ctx: &impl Hook, frame: &Ipv6Frame) -> bool {
    frame.proto == PROTO_ICMPV6
        && ptr_at::<Icmpv6Hdr>(ctx, frame.l4_offset).is_ok_and(|icmp| {
            // SAFETY: bounds checked by ptr_at.
            let kind = unsafe { (*icmp).type_ };
            (ND_FIRST..=ND_LAST).contains(&kind)
        })
}

/// Whether the frame's EtherType is IPv6 (untagged, as `ipv6` requires).
#[inline(always)]
pub fn is_ipv6(ctx: &impl Hook) -> bool {
    ptr_at::<EthHdr>(ctx, 0).is_ok_and(|eth| {
        // SAFETY: bounds checked by ptr_at.
        let ether_type = unsafe { (*eth).ether_type };
        ether_type == EtherType::Ipv6 as u16 && !ctx.vlan_tagged()
    })
}

/// What `ipv6` found past the fixed header: handed to the new-flow program
/// with the packet it tail-calls for, so that program does not walk the
/// extension headers again (the walk's states, times a new flow's code,
/// are more than the verifier allows).
/// Plain integers only: map memory may hold any bytes, and a Rust enum
/// or bool read from it must be valid.
#[derive(Clone, Copy)]
pub struct Walk {
    pub l4_offset: usize,
    pub proto: u8,
    /// `WALK_WHOLE`, `WALK_FIRST_FRAGMENT` or `WALK_LATER_FRAGMENT`.
    pub fragment: u8,
    pub fragment_id: [u8; 4],
}

const WALK_WHOLE: u8 = 0;
const WALK_FIRST_FRAGMENT: u8 = 1;
const WALK_LATER_FRAGMENT: u8 = 2;

impl Ipv6Frame {
    #[inline(always)]
    pub fn walk(&self) -> Walk {
        let (fragment, fragment_id) = match self.fragment {
            None => (WALK_WHOLE, [0; 4]),
            Some(Fragment { id, later: false }) => (WALK_FIRST_FRAGMENT, id),
            Some(Fragment { id, later: true }) => (WALK_LATER_FRAGMENT, id),
        };
        Walk {
            l4_offset: self.l4_offset,
            proto: self.proto,
            fragment,
            fragment_id,
        }
    }
}

/// The furthest a walk of `MAX_EXT_HEADERS` can reach (each header at most
/// 2,048 bytes): a bound the verifier can see on a handed-over offset.
const MAX_L4_OFFSET: usize = EthHdr::LEN + Ipv6Hdr::LEN + MAX_EXT_HEADERS * 2_048 + 8;

/// The frame `ipv6` parsed before a tail call, its walk taken from `walk`
/// (this CPU's hand-over; nothing runs on the CPU between the call and
/// this program). The fixed header and the offset are checked again.
#[inline(always)]
pub fn resume(ctx: &impl Hook, walk: &Walk) -> Result<Ipv6Frame, ParseError> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let payload = usize::from(u16::from_be_bytes(unsafe { (*ip).payload_len }));
    let l4_offset = walk.l4_offset;
    if l4_offset > MAX_L4_OFFSET || l4_offset > EthHdr::LEN + Ipv6Hdr::LEN + payload {
        return Err(ParseError::Malformed);
    }
    let fragment = match walk.fragment {
        WALK_WHOLE => None,
        WALK_FIRST_FRAGMENT => Some(Fragment {
            id: walk.fragment_id,
            later: false,
        }),
        WALK_LATER_FRAGMENT => Some(Fragment {
            id: walk.fragment_id,
            later: true,
        }),
        _ => return Err(ParseError::Malformed),
    };
    Ok(Ipv6Frame {
        eth,
        ip,
        l4_offset,
        proto: walk.proto,
        fragment,
    })
}

/// `Ok(None)` for frames that do not carry IPv6.
#[inline(always)]
pub fn ipv6(ctx: &impl Hook) -> Result<Option<Ipv6Frame>, ParseError> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv6 as u16 || ctx.vlan_tagged() {
        return Ok(None);
    }
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*ip };
    if hdr.vcf[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload = usize::from(u16::from_be_bytes(hdr.payload_len));
    // A zero payload length is a jumbogram's (RFC 2675), or a BIG TCP
    // super-packet's; neither is ours to translate.
    if payload == 0 && ctx.len() > EthHdr::LEN + Ipv6Hdr::LEN {
        return Err(ParseError::Unsupported);
    }
    // Against the whole packet: a TC skb's payload may lie beyond the
    // linear headers. Ethernet padding may follow the packet.
    if EthHdr::LEN + Ipv6Hdr::LEN + payload > ctx.len() {
        return Err(ParseError::Malformed);
    }
    let mut next = hdr.next_hdr;
    let mut offset = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut fragment = None;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTIONS => {
                // Next header, then the length in 8-byte units beyond the first 8.
                let ext: *const [u8; 2] = ptr_at(ctx, offset)?;
                // SAFETY: bounds checked by ptr_at.
                let ext = unsafe { *ext };
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            // Only one fragment header per packet (RFC 8200 4.1); a second
            // stays as the protocol, which `transport` refuses.
            NEXT_FRAGMENT if fragment.is_none() => {
                // Next header, reserved, offset and flags, identification.
                let header: *const [u8; 8] = ptr_at(ctx, offset)?;
                // SAFETY: bounds checked by ptr_at.
                let header = unsafe { *header };
                next = header[0];
                offset += 8;
                let later = u16::from_be_bytes([header[2], header[3]]) >> 3 != 0;
                fragment = Some(Fragment {
                    id: [header[4], header[5], header[6], header[7]],
                    later,
                });
                if later {
                    // What follows is the datagram's payload, not headers.
                    break;
                }
            }
            _ => break,
        }
    }
    // A chain the walk did not finish, or a fragment, is kept as the
    // frame's protocol: `transport` refuses it, after the packet was
    // classified (what no tenant sent is not the NAT's to judge).
    if offset > EthHdr::LEN + Ipv6Hdr::LEN + payload {
        return Err(ParseError::Malformed);
    }
    Ok(Some(Ipv6Frame {
        eth,
        ip,
        l4_offset: offset,
        proto: next,
        fragment,
    }))
}

/// The transport header of a flow; `echo_type` is the ICMPv6 echo message
/// this direction starts or continues flows with. ICMPv6's header is laid
/// out as ICMP's (type, code, checksum, identifier), so it travels in
/// `L4::IcmpEcho`; only its checksum differs (it covers a pseudo-header),
/// which `nat::rewrite_v6` knows.
#[inline(always)]
pub fn transport(
    ctx: &impl Hook,
    frame: &Ipv6Frame,
    echo_type: u8,
) -> Result<Transport, ParseError> {
    let l4 = frame.l4_offset;
    let available = frame.transport_len();
    // A first fragment carries part of the datagram the lengths name.
    let first_fragment = frame.fragment.is_some();
    if frame.fragment.is_some_and(|f| f.later) {
        return Err(ParseError::Unsupported);
    }
    match frame.proto {
        NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTIONS => Err(ParseError::ExtHeaders),
        // A second fragment header.
        NEXT_FRAGMENT => Err(ParseError::Unsupported),
        PROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*tcp };
            let data_offset = usize::from(hdr.doff()) * 4;
            if data_offset < TcpHdr::LEN || available < data_offset {
                return Err(ParseError::Malformed);
            }
            let bytes: *const [u8; 14] = tcp.cast();
            // SAFETY: inside the 20-byte header checked above.
            let flags = unsafe { (*bytes)[13] };
            Ok(Transport {
                l4: L4::Tcp(tcp),
                src_port: u16::from_ne_bytes(hdr.source),
                dst_port: u16::from_ne_bytes(hdr.dest),
                tcp_flags: flags,
                header_len: data_offset,
            })
        }
        PROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*udp };
            let udp_len = usize::from(u16::from_be_bytes(hdr.len));
            let consistent = if first_fragment {
                udp_len >= available
            } else {
                udp_len >= UdpHdr::LEN && udp_len <= available
            };
            if available < UdpHdr::LEN || !consistent {
                return Err(ParseError::Malformed);
            }
            Ok(Transport {
                l4: L4::Udp(udp),
                src_port: u16::from_ne_bytes(hdr.src),
                dst_port: u16::from_ne_bytes(hdr.dst),
                tcp_flags: 0,
                header_len: UdpHdr::LEN,
            })
        }
        PROTO_ICMPV6 => {
            let icmp: *mut Icmpv6Hdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*icmp };
            if available < size_of::<Icmpv6Hdr>() {
                return Err(ParseError::Malformed);
            }
            if hdr.type_ != echo_type || hdr.code != 0 {
                // Errors quoting a translated packet go their own way
                // (`is_icmp_error`); the rest of ICMPv6 is link control,
                // handled above.
                return Err(ParseError::Unsupported);
            }
            let id = u16::from_ne_bytes([hdr.data[0], hdr.data[1]]);
            let (src_port, dst_port) = if hdr.type_ == ICMPV6_ECHO_REQUEST {
                (id, 0)
            } else {
                (0, id)
            };
            Ok(Transport {
                l4: L4::IcmpEcho(icmp.cast()),
                src_port,
                dst_port,
                tcp_flags: 0,
                header_len: size_of::<Icmpv6Hdr>(),
            })
        }
        _ => Err(ParseError::Unsupported),
    }
}

/// Offsets of an ICMPv6 error's parts in a frame without extension headers
/// (routers and hosts send errors without them).
const ERR_ICMP: usize = EthHdr::LEN + Ipv6Hdr::LEN;
const ERR_INNER_IP: usize = ERR_ICMP + size_of::<Icmpv6Hdr>();
const ERR_INNER_L4: usize = ERR_INNER_IP + Ipv6Hdr::LEN;
/// Where the checksum sits in the quoted TCP or UDP header.
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;

/// An ICMPv6 error and the packet it quotes (an IPv6 header without
/// extension headers, then at least 8 bytes of its transport header). The
/// quoted tuple uses the same port convention as `Transport`; the quoted
/// addresses are read through `inner_ip`. A quoted echo travels in
/// `QuotedL4::Echo`, its header laid out as ICMP's.
pub struct IcmpErrorV6 {
    pub icmp: *mut Icmpv6Hdr,
    pub inner_ip: *mut Ipv6Hdr,
    pub inner_l4: QuotedL4,
    pub inner_proto: u8,
    pub inner_src_port: u16,
    pub inner_dst_port: u16,
}

impl IcmpErrorV6 {
    #[inline(always)]
    pub fn inner(&self) -> &Ipv6Hdr {
        // SAFETY: `icmp_error` checked the quoted header lies inside the frame.
        unsafe { &*self.inner_ip }
    }
}

/// Whether the frame carries an ICMPv6 error (which `transport` refuses):
/// what `icmp_error` parses, in its own program.
#[inline(always)]
pub fn is_icmp_error(ctx: &impl Hook, frame: &Ipv6Frame) -> bool {
    // An error is never sent in fragments (RFC 4443 2.4 keeps it within
    // the minimum MTU); a later fragment's bytes are payload.
    if frame.proto != PROTO_ICMPV6 || frame.fragment.is_some() {
        return false;
    }
    // The whole header: a one-byte bound compiles to a test the verifier
    // does not take as one.
    ptr_at::<Icmpv6Hdr>(ctx, frame.l4_offset).is_ok_and(|icmp| {
        // SAFETY: bounds checked by ptr_at.
        let type_ = unsafe { (*icmp).type_ };
        (ICMPV6_DEST_UNREACHABLE..=ICMPV6_PARAMETER_PROBLEM).contains(&type_)
    })
}

/// The ICMPv6 error in `frame` (`is_icmp_error` said so) and the packet it
/// quotes. Errors behind extension headers, and quotes with extension
/// headers or of fragments, are `Unsupported`: the NAT never sends such
/// packets, and errors are sent without them.
#[inline(always)]
pub fn icmp_error(ctx: &impl Hook, frame: &Ipv6Frame) -> Result<IcmpErrorV6, ParseError> {
    if frame.proto != PROTO_ICMPV6 || frame.l4_offset != ERR_ICMP {
        return Err(ParseError::Unsupported);
    }
    let icmp: *mut Icmpv6Hdr = ptr_at(ctx, ERR_ICMP)?;
    let inner_ip: *mut Ipv6Hdr = ptr_at(ctx, ERR_INNER_IP)?;
    // Every error quotes at least the transport header's first 8 bytes
    // (what names the flow), and the outer length must cover them.
    let quoted: *mut [u8; 8] = ptr_at(ctx, ERR_INNER_L4)?;
    if frame.transport_len() < ERR_INNER_L4 + 8 - ERR_ICMP {
        return Err(ParseError::Malformed);
    }
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner_ip };
    if inner.vcf[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    // SAFETY: bounds checked by ptr_at.
    let bytes = unsafe { &*quoted };
    let (inner_l4, src_port, dst_port) = match inner.next_hdr {
        PROTO_TCP | PROTO_UDP => {
            let udp = inner.next_hdr == PROTO_UDP;
            let check_at = ERR_INNER_L4
                + if udp {
                    UDP_CHECK_OFFSET
                } else {
                    TCP_CHECK_OFFSET
                };
            // TCP's checksum lies past the 8 bytes every error carries;
            // it is fixed only where the quote (and the outer length)
            // reaches it.
            let check: Option<*mut [u8; 2]> = if frame.transport_len() >= check_at + 2 - ERR_ICMP {
                ptr_at(ctx, check_at).ok()
            } else {
                None
            };
            let l4 = QuotedL4::Ports {
                ports: quoted.cast(),
                check,
                udp,
            };
            (
                l4,
                u16::from_ne_bytes([bytes[0], bytes[1]]),
                u16::from_ne_bytes([bytes[2], bytes[3]]),
            )
        }
        PROTO_ICMPV6 => {
            let type_ = bytes[0];
            let id = u16::from_ne_bytes([bytes[4], bytes[5]]);
            let ports = match type_ {
                ICMPV6_ECHO_REQUEST => (id, 0),
                ICMPV6_ECHO_REPLY => (0, id),
                _ => return Err(ParseError::Unsupported),
            };
            (QuotedL4::Echo(quoted.cast()), ports.0, ports.1)
        }
        _ => return Err(ParseError::Unsupported),
    };
    Ok(IcmpErrorV6 {
        icmp,
        inner_ip,
        inner_l4,
        inner_proto: inner.next_hdr,
        inner_src_port: src_port,
        inner_dst_port: dst_port,
    })
}
