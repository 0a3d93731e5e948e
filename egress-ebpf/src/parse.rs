//! Parse: bounds-checked views of a frame's Ethernet, IPv4 and L4 headers.
//!
//! `ptr_at` is the only place that turns an offset into a pointer, so the
//! verifier and the reader see the same check everywhere. A header that is
//! truncated or contradicts itself is `Malformed`; one that is well formed but
//! outside what the NAT translates is `Unsupported`. Each direction maps these
//! to its own counters.
//!
//! What follows the IPv4 header is one of three things to the NAT: the L4
//! header of a flow (whole packets and first fragments), an ICMP error that
//! quotes a packet of a flow, or a later fragment that carries no L4 header.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::helpers::bpf_csum_diff;
use egress_common::flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{hook::Hook, zero};

pub enum ParseError {
    Malformed,
    Unsupported,
    /// IPv6: more extension headers than `parse6::MAX_EXT_HEADERS`.
    ExtHeaders,
}

/// ICMP types the NAT tracks like ports.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP errors that quote the packet they are about (RFC 792).
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// IPv4 flags and fragment offset, in the host-order `frags` word.
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Hook, offset: usize) -> Result<*mut T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(ParseError::Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// An IPv4 packet in an Ethernet frame whose header is consistent with the
/// frame. Options and fragments are allowed.
pub struct Ipv4Frame {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Where the L4 header starts: after Ethernet and the IPv4 header with
    /// its options. At most 14 + 60.
    pub l4_offset: usize,
}

impl Ipv4Frame {
    #[inline(always)]
    pub fn ip(&self) -> &Ipv4Hdr {
        // SAFETY: `ipv4` checked the whole header lies inside the frame.
        unsafe { &*self.ip }
    }

    #[inline(always)]
    pub fn eth(&self) -> &EthHdr {
        // SAFETY: as above.
        unsafe { &*self.eth }
    }

    #[inline(always)]
    fn frags(&self) -> u16 {
        u16::from_be_bytes(self.ip().frags)
    }

    #[inline(always)]
    pub fn dont_fragment(&self) -> bool {
        self.frags() & IP_DF != 0
    }

    /// Part of a fragmented datagram (first or later).
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frags() & (IP_MF | IP_OFFSET) != 0
    }

    /// A fragment after the first: no L4 header.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frags() & IP_OFFSET != 0
    }

    /// The IPv4 total length.
    #[inline(always)]
    pub fn tot_len(&self) -> u16 {
        u16::from_be_bytes(self.ip().tot_len)
    }

    /// Bytes after the IPv4 header (and its options).
    #[inline(always)]
    pub fn payload_len(&self) -> usize {
        let ip = self.ip();
        usize::from(u16::from_be_bytes(ip.tot_len)) - usize::from(ip.vihl & 0x0f) * 4
    }

    /// Multicast or limited broadcast: link-local control traffic (IGMP,
    /// OSPF, VRRP...) or group traffic, never a NAT candidate.
    #[inline(always)]
    pub fn to_group(&self) -> bool {
        let dst = self.ip().dst_addr;
        dst[0] & 0xf0 == 0xe0 || dst == [0xff; 4]
    }
}

/// `Ok(None)` for frames that do not carry IPv4.
#[inline(always)]
pub fn ipv4(ctx: &impl Hook) -> Result<Option<Ipv4Frame>, ParseError> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 || ctx.vlan_tagged() {
        return Ok(None);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*ip };
    let header_len = usize::from(hdr.vihl & 0x0f) * 4;
    if hdr.vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(ParseError::Malformed);
    }
    let tot_len = usize::from(u16::from_be_bytes(hdr.tot_len));
    // Against the whole packet: a TC skb's payload may lie beyond the
    // linear headers.
    if tot_len < header_len || EthHdr::LEN + tot_len > ctx.len() {
        return Err(ParseError::Malformed);
    }
    // A corrupted header may carry a corrupted source, which would classify
    // into the wrong tenant: drop it, as a router's ip_rcv does.
    if !header_checksum_ok(ctx, header_len)? {
        return Err(ParseError::Malformed);
    }
    Ok(Some(Ipv4Frame {
        eth,
        ip,
        l4_offset: EthHdr::LEN + header_len,
    }))
}

/// Whether the IPv4 header (options included) sums to all ones.
///
/// The common 20-byte header is summed in place as ten 16-bit words, which
/// costs a few instructions where the `bpf_csum_diff` helper costs a call
/// (a tenth of the whole hit path). A header with options goes through the
/// helper: a loop over its words would multiply the verifier's states by
/// every length an IHL can have, and the verifier cannot bound a packet
/// range through a variable length, so it is copied to the stack first (the
/// copy checks its bounds at run time).
#[inline(always)]
fn header_checksum_ok(ctx: &impl Hook, header_len: usize) -> Result<bool, ParseError> {
    let sum = if header_len == Ipv4Hdr::LEN {
        let header: *const [u16; 10] = ptr_at(ctx, EthHdr::LEN)?;
        // SAFETY: the 20 bytes were bounds-checked by ptr_at. An IPv4 header
        // follows 14 bytes of Ethernet, so it is 2-byte aligned whenever the
        // frame is, and the JIT's loads do not fault on misalignment anyway.
        let words = unsafe { &*header };
        let mut sum = 0u64;
        for word in words {
            sum += u64::from(*word);
        }
        sum as i64
    } else {
        let mut slot = MaybeUninit::uninit();
        // SAFETY: all-zero is a valid array of integers.
        let copy: &mut [u32; 15] = unsafe { zero::zeroed(&mut slot) };
        // Re-read volatile: knowing the bounds, LLVM would drop the checks
        // below, and the verifier needs them to size the copy.
        // SAFETY: the IPv4 header was bounds-checked by the caller.
        let vihl = unsafe { core::ptr::read_volatile(ptr_at::<u8>(ctx, EthHdr::LEN)?) };
        let len = u32::from(vihl & 0x0f) * 4;
        if len <= Ipv4Hdr::LEN as u32 || len > 60 || len as usize != header_len {
            return Err(ParseError::Malformed);
        }
        // SAFETY: `copy` holds 60 bytes, the most an IHL can name.
        let copied = ctx.load_bytes(EthHdr::LEN as u32, copy.as_mut_ptr().cast(), len);
        if copied != 0 {
            return Err(ParseError::Malformed);
        }
        // SAFETY: as above, `len` <= 60 bytes of an initialised buffer.
        unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, copy.as_mut_ptr(), len, 0) }
    };
    if sum < 0 {
        return Err(ParseError::Malformed);
    }
    let sum = sum as u64;
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    Ok(sum == 0xffff)
}

/// The transport header of a flow the NAT tracks.
pub enum L4 {
    Tcp(*mut TcpHdr),
    Udp(*mut UdpHdr),
    IcmpEcho(*mut Icmpv4Hdr),
}

/// Ports as on the wire (network byte order); for ICMP echo the identifier
/// sits in `src_port` of requests and `dst_port` of replies.
pub struct Transport {
    pub l4: L4,
    pub src_port: u16,
    pub dst_port: u16,
    /// The TCP header's flags byte, 0 for other protocols.
    pub tcp_flags: u8,
    /// The L4 header's length (TCP options included).
    pub header_len: usize,
}

/// The L4 header of the packet an ICMP error quotes.
pub enum QuotedL4 {
    /// TCP or UDP ports; the checksum when the quote reaches it (TCP's sits
    /// past the 8 bytes every error carries).
    Ports {
        ports: *mut [u8; 4],
        check: Option<*mut [u8; 2]>,
        udp: bool,
    },
    /// An ICMP echo request or reply.
    Echo(*mut Icmpv4Hdr),
}

/// An ICMP error (destination unreachable, time exceeded, parameter
/// problem) and the packet it quotes. The quoted tuple uses the same port
/// convention as `Transport`.
pub struct IcmpError {
    pub icmp: *mut Icmpv4Hdr,
    pub inner_ip: *mut Ipv4Hdr,
    pub inner_l4: QuotedL4,
    pub inner_proto: u8,
    pub inner_src: [u8; 4],
    pub inner_dst: [u8; 4],
    pub inner_src_port: u16,
    pub inner_dst_port: u16,
}

pub enum Payload {
    /// A packet of a flow (whole, or a datagram's first fragment).
    Flow(Transport),
    /// An ICMP error about a packet of a flow.
    IcmpError(IcmpError),
    /// A fragment after the first.
    LaterFragment,
}

/// What follows the IPv4 header; `echo_type` is the ICMP echo message this
/// direction starts or continues flows with.
#[inline(always)]
pub fn payload(ctx: &impl Hook, frame: &Ipv4Frame, echo_type: u8) -> Result<Payload, ParseError> {
    if frame.is_later_fragment() {
        return Ok(Payload::LaterFragment);
    }
    let fragmented = frame.is_fragment();
    let payload = frame.payload_len();
    let l4 = frame.l4_offset;
    match frame.ip().proto {
        PROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*tcp };
            let data_offset = usize::from(hdr.doff()) * 4;
            // A first fragment must hold the whole TCP header (RFC 1858).
            if data_offset < TcpHdr::LEN || payload < data_offset {
                return Err(ParseError::Malformed);
            }
            // The flags byte follows the data-offset byte (RFC 9293 3.1).
            let bytes: *const [u8; 14] = tcp.cast();
            // SAFETY: inside the 20-byte header checked above.
            let flags = unsafe { (*bytes)[13] };
            Ok(Payload::Flow(Transport {
                l4: L4::Tcp(tcp),
                src_port: u16::from_ne_bytes(hdr.source),
                dst_port: u16::from_ne_bytes(hdr.dest),
                tcp_flags: flags,
                header_len: data_offset,
            }))
        }
        PROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*udp };
            let udp_len = usize::from(u16::from_be_bytes(hdr.len));
            // A first fragment carries part of the datagram the length names.
            let consistent = if fragmented {
                udp_len >= payload
            } else {
                udp_len >= UdpHdr::LEN && udp_len <= payload
            };
            if payload < UdpHdr::LEN || !consistent {
                return Err(ParseError::Malformed);
            }
            Ok(Payload::Flow(Transport {
                l4: L4::Udp(udp),
                src_port: u16::from_ne_bytes(hdr.src),
                dst_port: u16::from_ne_bytes(hdr.dst),
                tcp_flags: 0,
                header_len: UdpHdr::LEN,
            }))
        }
        PROTO_ICMP => {
            let icmp: *mut Icmpv4Hdr = ptr_at(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*icmp };
            if payload < size_of::<Icmpv4Hdr>() {
                return Err(ParseError::Malformed);
            }
            match hdr.type_ {
                t if t == echo_type && hdr.code == 0 => {
                    let (src_port, dst_port) = echo_ports(hdr);
                    Ok(Payload::Flow(Transport {
                        l4: L4::IcmpEcho(icmp),
                        src_port,
                        dst_port,
                        tcp_flags: 0,
                        header_len: size_of::<Icmpv4Hdr>(),
                    }))
                }
                ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
                    if !fragmented =>
                {
                    icmp_error(ctx, frame, icmp).map(Payload::IcmpError)
                }
                _ => Err(ParseError::Unsupported),
            }
        }
        _ => Err(ParseError::Unsupported),
    }
}

/// (src_port, dst_port) of an echo message: the id on the requester's side.
#[inline(always)]
fn echo_ports(hdr: &Icmpv4Hdr) -> (u16, u16) {
    let id = u16::from_ne_bytes([hdr.data[0], hdr.data[1]]);
    if hdr.type_ == ICMP_ECHO_REQUEST {
        (id, 0)
    } else {
        (0, id)
    }
}

/// Offsets of an ICMP error's parts in a frame whose outer header has no
/// options (routers send errors without them).
const ERR_ICMP: usize = EthHdr::LEN + Ipv4Hdr::LEN;
const ERR_INNER_IP: usize = ERR_ICMP + size_of::<Icmpv4Hdr>();
const ERR_INNER_L4: usize = ERR_INNER_IP + Ipv4Hdr::LEN;
/// Where TCP's checksum sits in the quoted segment.
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;

#[inline(always)]
fn icmp_error(
    ctx: &impl Hook,
    frame: &Ipv4Frame,
    icmp: *mut Icmpv4Hdr,
) -> Result<IcmpError, ParseError> {
    if frame.l4_offset != ERR_ICMP {
        return Err(ParseError::Unsupported);
    }
    let inner_ip: *mut Ipv4Hdr = ptr_at(ctx, ERR_INNER_IP)?;
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner_ip };
    if inner.vihl >> 4 != 4 || inner.vihl & 0x0f < 5 {
        return Err(ParseError::Malformed);
    }
    // Quotes of packets with options or of later fragments do not carry
    // the ports at a place we know: the NAT never made such packets.
    if inner.vihl & 0x0f != 5 || u16::from_be_bytes(inner.frags) & IP_OFFSET != 0 {
        return Err(ParseError::Unsupported);
    }
    // Every error quotes at least 8 bytes of the L4 header (RFC 792).
    let quoted: *mut [u8; 8] = ptr_at(ctx, ERR_INNER_L4)?;
    let (inner_l4, src_port, dst_port) = match inner.proto {
        PROTO_TCP | PROTO_UDP => {
            let udp = inner.proto == PROTO_UDP;
            let check_at = ERR_INNER_L4
                + if udp {
                    UDP_CHECK_OFFSET
                } else {
                    TCP_CHECK_OFFSET
                };
            let check: Option<*mut [u8; 2]> = ptr_at(ctx, check_at).ok();
            // SAFETY: bounds checked by ptr_at.
            let bytes = unsafe { &*quoted };
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
        PROTO_ICMP => {
            let echo: *mut Icmpv4Hdr = quoted.cast();
            // SAFETY: the 8 quoted bytes are exactly an ICMP header.
            let hdr = unsafe { &*echo };
            if hdr.type_ != ICMP_ECHO_REQUEST && hdr.type_ != ICMP_ECHO_REPLY {
                return Err(ParseError::Unsupported);
            }
            let (src_port, dst_port) = echo_ports(hdr);
            (QuotedL4::Echo(echo), src_port, dst_port)
        }
        _ => return Err(ParseError::Unsupported),
    };
    Ok(IcmpError {
        icmp,
        inner_ip,
        inner_l4,
        inner_proto: inner.proto,
        inner_src: inner.src_addr,
        inner_dst: inner.dst_addr,
        inner_src_port: src_port,
        inner_dst_port: dst_port,
    })
}
