//! Parse: bounds-checked views of a frame's Ethernet, IPv4 and L4 headers.
//!
//! `ptr_at` is the only place that turns an offset into a pointer, so the
//! verifier and the reader see the same check everywhere. A header that is
//! truncated or contradicts itself is `Malformed`; one that is well formed but
//! outside what the NAT translates is `Unsupported`. Each direction maps these
//! to its own counters.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use egress_common::flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

pub enum ParseError {
    Malformed,
    Unsupported,
}

/// ICMP types the NAT tracks like ports.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// IPv4 "more fragments" flag and fragment offset, in the host-order `frags` word.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// IPv4 "don't fragment" flag.
const IP_DF: u16 = 0x4000;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(ParseError::Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// An IPv4 packet in an Ethernet frame whose header is consistent with the
/// frame. Options and fragments are allowed here; whether the NAT can
/// translate them is decided once it knows the packet is its business.
pub struct Ipv4Frame {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
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
    pub fn dont_fragment(&self) -> bool {
        u16::from_be_bytes(self.ip().frags) & IP_DF != 0
    }

    /// Multicast or limited broadcast: link-local control traffic (IGMP,
    /// OSPF, VRRP...) or group traffic, never a NAT candidate.
    #[inline(always)]
    pub fn to_group(&self) -> bool {
        let dst = self.ip().dst_addr;
        dst[0] & 0xf0 == 0xe0 || dst == [0xff; 4]
    }

    /// Whether the NAT can translate this packet's header as it stands:
    /// no options, not a fragment.
    #[inline(always)]
    pub fn translatable(&self) -> Result<(), ParseError> {
        let ip = self.ip();
        if ip.vihl & 0x0f != 5 || u16::from_be_bytes(ip.frags) & (IP_MF | IP_OFFSET) != 0 {
            return Err(ParseError::Unsupported);
        }
        Ok(())
    }
}

/// `Ok(None)` for frames that do not carry IPv4.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext) -> Result<Option<Ipv4Frame>, ParseError> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
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
    if tot_len < header_len || ctx.data() + EthHdr::LEN + tot_len > ctx.data_end() {
        return Err(ParseError::Malformed);
    }
    Ok(Some(Ipv4Frame { eth, ip }))
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
}

const L4_OFFSET: usize = EthHdr::LEN + Ipv4Hdr::LEN;

/// `echo_type` is the ICMP echo message this direction translates.
#[inline(always)]
pub fn transport(
    ctx: &XdpContext,
    frame: &Ipv4Frame,
    echo_type: u8,
) -> Result<Transport, ParseError> {
    frame.translatable()?;
    let ip = frame.ip();
    let payload = usize::from(u16::from_be_bytes(ip.tot_len)) - Ipv4Hdr::LEN;
    match ip.proto {
        PROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFFSET)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*tcp };
            let data_offset = usize::from(hdr.doff()) * 4;
            if data_offset < TcpHdr::LEN || payload < data_offset {
                return Err(ParseError::Malformed);
            }
            // The flags byte follows the data-offset byte (RFC 9293 3.1).
            let flags_ptr: *const [u8; 14] = tcp.cast();
            // SAFETY: inside the 20-byte header checked above.
            let flags = unsafe { (*flags_ptr)[13] };
            Ok(Transport {
                l4: L4::Tcp(tcp),
                src_port: u16::from_ne_bytes(hdr.source),
                dst_port: u16::from_ne_bytes(hdr.dest),
                tcp_flags: flags,
            })
        }
        PROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, L4_OFFSET)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*udp };
            if payload < UdpHdr::LEN || usize::from(u16::from_be_bytes(hdr.len)) > payload {
                return Err(ParseError::Malformed);
            }
            Ok(Transport {
                l4: L4::Udp(udp),
                src_port: u16::from_ne_bytes(hdr.src),
                dst_port: u16::from_ne_bytes(hdr.dst),
                tcp_flags: 0,
            })
        }
        PROTO_ICMP => {
            let icmp: *mut Icmpv4Hdr = ptr_at(ctx, L4_OFFSET)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { &*icmp };
            if payload < size_of::<Icmpv4Hdr>() {
                return Err(ParseError::Malformed);
            }
            if hdr.type_ != echo_type || hdr.code != 0 {
                return Err(ParseError::Unsupported);
            }
            let id = u16::from_ne_bytes([hdr.data[0], hdr.data[1]]);
            let (src_port, dst_port) = if echo_type == ICMP_ECHO_REQUEST {
                (id, 0)
            } else {
                (0, id)
            };
            Ok(Transport {
                l4: L4::IcmpEcho(icmp),
                src_port,
                dst_port,
                tcp_flags: 0,
            })
        }
        _ => Err(ParseError::Unsupported),
    }
}
