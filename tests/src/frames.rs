//! Frames for the packet tests: built with etherparse, and read back with a
//! small independent parser whose checksums are computed from scratch over
//! the whole packet, so they check the dataplane's incremental arithmetic
//! rather than repeat it.

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{IpNumber, Ipv4Header, PacketBuilder, TcpHeader};

/// Source MAC of frames the tests send, and the gateway's MAC as they see it.
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x02];

pub const ETH_LEN: usize = 14;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tcp {
    Syn,
    SynAck,
    Ack,
    FinAck,
    Rst,
}

pub fn tcp_header(src: u16, dst: u16, kind: Tcp) -> TcpHeader {
    let mut header = TcpHeader::new(src, dst, 1000, 64240);
    match kind {
        Tcp::Syn => header.syn = true,
        Tcp::SynAck => {
            header.syn = true;
            header.ack = true;
            header.acknowledgment_number = 1001;
        }
        Tcp::Ack => {
            header.ack = true;
            header.acknowledgment_number = 1;
        }
        Tcp::FinAck => {
            header.fin = true;
            header.ack = true;
            header.acknowledgment_number = 1;
        }
        Tcp::Rst => header.rst = true,
    }
    header
}

pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, kind: Tcp, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(PEER_MAC, GATEWAY_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp_header(tcp_header(src.port(), dst.port(), kind));
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("building TCP");
    out
}

pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(PEER_MAC, GATEWAY_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("building UDP");
    out
}

pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(PEER_MAC, GATEWAY_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(id, seq);
    let mut out = Vec::new();
    builder
        .write(&mut out, b"ping payload")
        .expect("building echo");
    out
}

pub fn echo_reply(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(PEER_MAC, GATEWAY_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_reply(id, seq);
    let mut out = Vec::new();
    builder
        .write(&mut out, b"ping payload")
        .expect("building echo");
    out
}

/// Rewrites the IPv4 header of a frame with `edit` (TTL, flags, id,
/// options...), fixing its length fields and header checksum. L4
/// checksums stay as they were (they do not cover these fields).
pub fn edit_ipv4(frame: &[u8], edit: impl FnOnce(&mut Ipv4Header)) -> Vec<u8> {
    let (mut header, rest) = Ipv4Header::from_slice(&frame[ETH_LEN..]).expect("an IPv4 frame");
    let payload_len = usize::from(header.total_len) - header.header_len();
    let payload = rest[..payload_len].to_vec();
    edit(&mut header);
    header.total_len = (header.header_len() + payload.len()) as u16;
    header.header_checksum = header.calc_header_checksum();
    let mut out = frame[..ETH_LEN].to_vec();
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&payload);
    out
}

/// An ICMP error from `from` to `to` quoting `quoted` (an IPv4 packet,
/// without Ethernet) truncated to `quote_len` bytes. `rest` is the second
/// word of the ICMP header (the next-hop MTU of frag-needed).
pub fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: (u8, u8),
    rest: [u8; 4],
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let quote = &quoted[..quote_len.min(quoted.len())];
    let mut icmp = vec![kind.0, kind.1, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quote);
    let check = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut header = Ipv4Header::new(
        icmp.len() as u16,
        64,
        IpNumber::ICMP,
        from.octets(),
        to.octets(),
    )
    .expect("header");
    header.header_checksum = header.calc_header_checksum();
    let mut out = Vec::new();
    out.extend_from_slice(&GATEWAY_MAC);
    out.extend_from_slice(&PEER_MAC);
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&icmp);
    out
}

/// Frag-needed (type 3 code 4) with a next-hop MTU.
pub const FRAG_NEEDED: (u8, u8) = (3, 4);
pub const PORT_UNREACHABLE: (u8, u8) = (3, 3);
pub const TTL_EXCEEDED: (u8, u8) = (11, 0);

/// Splits an IPv4 frame into two fragments, the first carrying
/// `first_payload` bytes (a multiple of 8) of the IP payload.
pub fn fragment(frame: &[u8], first_payload: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(first_payload % 8, 0, "fragment offsets count 8-byte units");
    let (header, rest) = Ipv4Header::from_slice(&frame[ETH_LEN..]).expect("an IPv4 frame");
    let payload_len = usize::from(header.total_len) - header.header_len();
    let payload = &rest[..payload_len];
    let piece = |bytes: &[u8], offset: usize, more: bool| {
        let mut h = header.clone();
        h.more_fragments = more;
        h.dont_fragment = false;
        h.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).expect("offset");
        h.total_len = (h.header_len() + bytes.len()) as u16;
        h.header_checksum = h.calc_header_checksum();
        let mut out = frame[..ETH_LEN].to_vec();
        out.extend_from_slice(&h.to_bytes());
        out.extend_from_slice(bytes);
        out
    };
    (
        piece(&payload[..first_payload], 0, true),
        piece(&payload[first_payload..], first_payload, false),
    )
}

/// Puts two fragments (first, then last) back together into one frame.
pub fn reassemble(first: &[u8], last: &[u8]) -> Vec<u8> {
    let (header, _) = Ipv4Header::from_slice(&first[ETH_LEN..]).expect("an IPv4 frame");
    let mut payload = View::new(first).payload().to_vec();
    payload.extend_from_slice(View::new(last).payload());
    let mut whole = header.clone();
    whole.more_fragments = false;
    whole.fragment_offset = etherparse::IpFragOffset::ZERO;
    whole.total_len = (whole.header_len() + payload.len()) as u16;
    whole.header_checksum = whole.calc_header_checksum();
    let mut out = first[..ETH_LEN].to_vec();
    out.extend_from_slice(&whole.to_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A UDP datagram over IPv6, for what must not be forwarded at all.
pub fn udp6(payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(PEER_MAC, GATEWAY_MAC)
        .ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .udp(1000, 53);
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("building UDP/IPv6");
    out
}

/// The IPv4 packet inside a frame (what an ICMP error would quote).
pub fn ip_packet(frame: &[u8]) -> &[u8] {
    let total = usize::from(u16::from_be_bytes([frame[ETH_LEN + 2], frame[ETH_LEN + 3]]));
    &frame[ETH_LEN..ETH_LEN + total]
}

/// RFC 1071, over `bytes` (odd lengths padded with a zero byte).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A read-only view of an IPv4 frame, by byte offsets.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub frame: &'a [u8],
}

impl<'a> View<'a> {
    pub fn new(frame: &'a [u8]) -> Self {
        assert!(
            frame.len() >= ETH_LEN + 20,
            "not an IPv4 frame: {} bytes",
            frame.len()
        );
        Self { frame }
    }

    fn ip_at(&self) -> usize {
        ETH_LEN
    }

    pub fn eth_dst(&self) -> [u8; 6] {
        self.frame[0..6].try_into().expect("6 bytes")
    }

    pub fn eth_src(&self) -> [u8; 6] {
        self.frame[6..12].try_into().expect("6 bytes")
    }

    pub fn header_len(&self) -> usize {
        usize::from(self.frame[ETH_LEN] & 0x0f) * 4
    }

    pub fn total_len(&self) -> usize {
        usize::from(u16::from_be_bytes([
            self.frame[ETH_LEN + 2],
            self.frame[ETH_LEN + 3],
        ]))
    }

    pub fn ttl(&self) -> u8 {
        self.frame[ETH_LEN + 8]
    }

    pub fn proto(&self) -> u8 {
        self.frame[ETH_LEN + 9]
    }

    pub fn src(&self) -> Ipv4Addr {
        let at = self.ip_at() + 12;
        Ipv4Addr::new(
            self.frame[at],
            self.frame[at + 1],
            self.frame[at + 2],
            self.frame[at + 3],
        )
    }

    pub fn dst(&self) -> Ipv4Addr {
        let at = self.ip_at() + 16;
        Ipv4Addr::new(
            self.frame[at],
            self.frame[at + 1],
            self.frame[at + 2],
            self.frame[at + 3],
        )
    }

    pub fn fragment_offset(&self) -> usize {
        usize::from(u16::from_be_bytes([self.frame[ETH_LEN + 6], self.frame[ETH_LEN + 7]]) & 0x1fff)
            * 8
    }

    pub fn more_fragments(&self) -> bool {
        self.frame[ETH_LEN + 6] & 0x20 != 0
    }

    /// The IP payload (L4 header and data), as far as the frame holds it
    /// (a quote in an ICMP error is cut short).
    pub fn payload(&self) -> &'a [u8] {
        let end = (ETH_LEN + self.total_len()).min(self.frame.len());
        &self.frame[ETH_LEN + self.header_len()..end]
    }

    pub fn src_port(&self) -> u16 {
        let l4 = self.payload();
        u16::from_be_bytes([l4[0], l4[1]])
    }

    pub fn dst_port(&self) -> u16 {
        let l4 = self.payload();
        u16::from_be_bytes([l4[2], l4[3]])
    }

    pub fn icmp_type(&self) -> u8 {
        self.payload()[0]
    }

    pub fn echo_id(&self) -> u16 {
        let l4 = self.payload();
        u16::from_be_bytes([l4[4], l4[5]])
    }

    /// The packet an ICMP error quotes, viewed as a frame of its own.
    pub fn quoted(&self) -> Vec<u8> {
        let mut frame = self.frame[..ETH_LEN].to_vec();
        frame.extend_from_slice(&self.payload()[8..]);
        frame
    }

    /// Checks every checksum this frame carries, computed from scratch:
    /// the IPv4 header; for whole packets the TCP/UDP checksum with its
    /// pseudo-header, or the ICMP checksum; for ICMP errors also the quoted
    /// header's checksum, and the quoted UDP/ICMP checksum when the quote
    /// holds the whole packet.
    pub fn verify_checksums(&self) -> Result<(), String> {
        let header = &self.frame[ETH_LEN..ETH_LEN + self.header_len()];
        if internet_checksum(header) != 0 {
            return Err(format!("IPv4 header checksum is wrong: {header:02x?}"));
        }
        if self.fragment_offset() != 0 || self.more_fragments() {
            return Ok(());
        }
        let l4 = self.payload();
        let pseudo = |len: usize| {
            let mut p = Vec::with_capacity(12 + len);
            p.extend_from_slice(&self.src().octets());
            p.extend_from_slice(&self.dst().octets());
            p.extend_from_slice(&[0, self.proto()]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            p
        };
        match self.proto() {
            6 => {
                let mut all = pseudo(l4.len());
                all.extend_from_slice(l4);
                if internet_checksum(&all) != 0 {
                    return Err("TCP checksum is wrong".into());
                }
            }
            // UDP may omit its checksum (all zero).
            17 if l4[6..8] != [0, 0] => {
                let mut all = pseudo(l4.len());
                all.extend_from_slice(l4);
                if internet_checksum(&all) != 0 {
                    return Err("UDP checksum is wrong".into());
                }
            }
            1 => {
                if internet_checksum(l4) != 0 {
                    return Err("ICMP checksum is wrong".into());
                }
                if matches!(l4[0], 3 | 11 | 12) && l4.len() >= 28 {
                    let quoted = self.quoted();
                    let inner = View::new(&quoted);
                    let inner_header = &quoted[ETH_LEN..ETH_LEN + inner.header_len()];
                    if internet_checksum(inner_header) != 0 {
                        return Err("quoted IPv4 header checksum is wrong".into());
                    }
                    if quoted.len() >= ETH_LEN + inner.total_len() && inner.proto() != 6 {
                        inner
                            .verify_checksums()
                            .map_err(|e| format!("quoted packet: {e}"))?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `assert!` that every checksum of `frame` verifies.
#[track_caller]
pub fn assert_checksums(frame: &[u8]) {
    if let Err(err) = View::new(frame).verify_checksums() {
        panic!("{err} in {frame:02x?}");
    }
}
