//! IPv6 frames for the packet tests: built with etherparse, read back by
//! byte offsets, and every checksum recomputed from scratch over the whole
//! packet (the pseudo-header included), as `frames` does for IPv4.

use std::net::{Ipv6Addr, SocketAddrV6};

use etherparse::{Icmpv6Type, IpHeaders, IpNumber, PacketBuilder, PacketBuilderStep};

use crate::frames::{ETH_LEN, GATEWAY_MAC, PEER_MAC, Tcp, internet_checksum, tcp_header};

const IPV6_LEN: usize = 40;
const HOP_LIMIT: u8 = 64;

fn builder(src: Ipv6Addr, dst: Ipv6Addr) -> PacketBuilderStep<IpHeaders> {
    PacketBuilder::ethernet2(PEER_MAC, GATEWAY_MAC).ipv6(src.octets(), dst.octets(), HOP_LIMIT)
}

pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, kind: Tcp, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    builder(*src.ip(), *dst.ip())
        .tcp_header(tcp_header(src.port(), dst.port(), kind))
        .write(&mut out, payload)
        .expect("building TCP/IPv6");
    out
}

pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    builder(*src.ip(), *dst.ip())
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .expect("building UDP/IPv6");
    out
}

pub fn echo_request(src: Ipv6Addr, dst: Ipv6Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .icmpv6_echo_request(id, seq)
        .write(&mut out, b"ping")
        .expect("building an echo request");
    out
}

pub fn echo_reply(src: Ipv6Addr, dst: Ipv6Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    builder(src, dst)
        .icmpv6_echo_reply(id, seq)
        .write(&mut out, b"ping")
        .expect("building an echo reply");
    out
}

/// A Neighbor Solicitation for `target`, sent to its solicited-node
/// multicast address as a host resolving it would.
pub fn neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let solicited = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, [0x33, 0x33, 0xff, t[13], t[14], t[15]])
        .ipv6(src.octets(), solicited.octets(), 255)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut out, &t)
        .expect("building a neighbor solicitation");
    out
}

/// A solicited Neighbor Advertisement for `target`, unicast from `src` to
/// `dst` (both global, as when the kernel solicited from an egress address).
pub fn neighbor_advertisement(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, GATEWAY_MAC)
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: 136,
            code_u8: 0,
            // Solicited and override.
            bytes5to8: [0x60, 0, 0, 0],
        })
        .write(&mut out, &target.octets())
        .expect("building a neighbor advertisement");
    out
}

/// `frame` (UDP or TCP over IPv6) with `count` destination-options headers
/// of 8 bytes inserted before its transport header.
pub fn with_dest_options(frame: &[u8], count: usize) -> Vec<u8> {
    let mut out = frame[..ETH_LEN + IPV6_LEN].to_vec();
    let transport = out[ETH_LEN + 6];
    out[ETH_LEN + 6] = 60;
    for i in 0..count {
        let next = if i + 1 == count { transport } else { 60 };
        // Next header, length 0 (8 bytes), a PadN option filling the rest.
        out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    out.extend_from_slice(&frame[ETH_LEN + IPV6_LEN..]);
    let payload = (out.len() - ETH_LEN - IPV6_LEN) as u16;
    out[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&payload.to_be_bytes());
    out
}

/// `frame` with a fragment header (first fragment, more to come).
pub fn as_first_fragment(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..ETH_LEN + IPV6_LEN].to_vec();
    let next = out[ETH_LEN + 6];
    out[ETH_LEN + 6] = 44;
    out.extend_from_slice(&[next, 0, 0, 1, 0, 0, 0, 7]);
    out.extend_from_slice(&frame[ETH_LEN + IPV6_LEN..]);
    let payload = (out.len() - ETH_LEN - IPV6_LEN) as u16;
    out[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&payload.to_be_bytes());
    out
}

/// An ICMPv6 error (`kind`: destination unreachable, packet too big, time
/// exceeded, parameter problem) from `from` to `to`, quoting `quoted` (an
/// IPv6 packet, without Ethernet) cut to `quote_len` bytes; its checksum
/// computed over the pseudo-header and the whole quote.
pub fn icmp_error(
    from: Ipv6Addr,
    to: Ipv6Addr,
    kind: Icmpv6Type,
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    builder(from, to)
        .icmpv6(kind)
        .write(&mut out, &quoted[..quote_len.min(quoted.len())])
        .expect("building an ICMPv6 error");
    out
}

/// The IPv6 packet inside a frame (what an ICMPv6 error would quote).
pub fn ip_packet(frame: &[u8]) -> &[u8] {
    let payload = usize::from(u16::from_be_bytes([frame[ETH_LEN + 4], frame[ETH_LEN + 5]]));
    &frame[ETH_LEN..ETH_LEN + IPV6_LEN + payload]
}

/// Splits a frame's datagram in two fragments (RFC 8200 4.5): the first
/// carries `first_payload` bytes (a multiple of 8) of what follows the
/// IPv6 header, the second the rest; both have identification `id`.
pub fn fragment(frame: &[u8], first_payload: usize, id: u32) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(first_payload % 8, 0, "fragments are cut at 8-byte units");
    let header = &frame[..ETH_LEN + IPV6_LEN];
    let next = header[ETH_LEN + 6];
    let payload = &frame[ETH_LEN + IPV6_LEN..];
    let piece = |bytes: &[u8], offset: usize, more: bool| {
        let mut out = header.to_vec();
        out[ETH_LEN + 6] = 44;
        let field = ((offset / 8) as u16) << 3 | u16::from(more);
        out.extend_from_slice(&[next, 0]);
        out.extend_from_slice(&field.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(bytes);
        let len = (out.len() - ETH_LEN - IPV6_LEN) as u16;
        out[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&len.to_be_bytes());
        out
    };
    (
        piece(&payload[..first_payload], 0, true),
        piece(&payload[first_payload..], first_payload, false),
    )
}

/// The datagram two fragments (as `fragment` makes them) carry, as one
/// frame with the first one's headers: what the receiver reassembles.
pub fn reassemble(first: &[u8], later: &[u8]) -> Vec<u8> {
    let mut out = first[..ETH_LEN + IPV6_LEN].to_vec();
    out[ETH_LEN + 6] = first[ETH_LEN + IPV6_LEN];
    out.extend_from_slice(&first[ETH_LEN + IPV6_LEN + 8..]);
    out.extend_from_slice(&later[ETH_LEN + IPV6_LEN + 8..]);
    let len = (out.len() - ETH_LEN - IPV6_LEN) as u16;
    out[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&len.to_be_bytes());
    out
}

/// `frame` with the hop limit set to `limit`.
pub fn with_hop_limit(frame: &[u8], limit: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[ETH_LEN + 7] = limit;
    out
}

/// A read-only view of an IPv6 frame, by byte offsets. Extension headers
/// of the kinds `with_dest_options` adds are stepped over.
#[derive(Debug, Clone, Copy)]
pub struct View6<'a> {
    pub frame: &'a [u8],
}

impl<'a> View6<'a> {
    pub fn new(frame: &'a [u8]) -> Self {
        assert!(
            frame.len() >= ETH_LEN + IPV6_LEN && frame[12..14] == [0x86, 0xdd],
            "not an IPv6 frame: {frame:02x?}"
        );
        Self { frame }
    }

    pub fn eth_dst(&self) -> [u8; 6] {
        self.frame[0..6].try_into().expect("6 bytes")
    }

    pub fn hop_limit(&self) -> u8 {
        self.frame[ETH_LEN + 7]
    }

    fn addr(&self, at: usize) -> Ipv6Addr {
        let bytes: [u8; 16] = self.frame[ETH_LEN + at..ETH_LEN + at + 16]
            .try_into()
            .expect("16 bytes");
        Ipv6Addr::from(bytes)
    }

    pub fn src(&self) -> Ipv6Addr {
        self.addr(8)
    }

    pub fn dst(&self) -> Ipv6Addr {
        self.addr(24)
    }

    /// (transport protocol, offset of its header in the frame)
    fn transport(&self) -> (u8, usize) {
        let mut next = self.frame[ETH_LEN + 6];
        let mut at = ETH_LEN + IPV6_LEN;
        while matches!(next, 0 | 43 | 60) {
            next = self.frame[at];
            at += (usize::from(self.frame[at + 1]) + 1) * 8;
        }
        (next, at)
    }

    pub fn proto(&self) -> u8 {
        self.transport().0
    }

    pub fn l4(&self) -> &'a [u8] {
        let end = ETH_LEN
            + IPV6_LEN
            + usize::from(u16::from_be_bytes([
                self.frame[ETH_LEN + 4],
                self.frame[ETH_LEN + 5],
            ]));
        &self.frame[self.transport().1..end.min(self.frame.len())]
    }

    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.l4()[0], self.l4()[1]])
    }

    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.l4()[2], self.l4()[3]])
    }

    pub fn echo_id(&self) -> u16 {
        u16::from_be_bytes([self.l4()[4], self.l4()[5]])
    }

    pub fn icmp_type(&self) -> u8 {
        self.l4()[0]
    }

    /// Whether this is an ICMPv6 error (types 1 to 4), which quotes a packet.
    pub fn is_icmp_error(&self) -> bool {
        self.proto() == 58 && (1..=4).contains(&self.icmp_type())
    }

    /// The packet an ICMPv6 error quotes, viewed as a frame of its own
    /// (this frame's Ethernet header in front).
    pub fn quoted(&self) -> Vec<u8> {
        let mut frame = self.frame[..ETH_LEN].to_vec();
        frame.extend_from_slice(&self.l4()[8..]);
        frame
    }

    /// Whether the quoted packet is whole (not cut short).
    fn quote_is_whole(quoted: &[u8]) -> bool {
        let payload = usize::from(u16::from_be_bytes([
            quoted[ETH_LEN + 4],
            quoted[ETH_LEN + 5],
        ]));
        quoted.len() >= ETH_LEN + IPV6_LEN + payload
    }

    /// Checks the TCP, UDP or ICMPv6 checksum, computed from scratch with
    /// its pseudo-header (RFC 8200 8.1), and for an ICMPv6 error quoting a
    /// whole packet, the quoted packet's checksum too. IPv6 has no header
    /// checksum.
    pub fn verify_checksums(&self) -> Result<(), String> {
        let (proto, _) = self.transport();
        let l4 = self.l4();
        let mut all = Vec::with_capacity(40 + l4.len());
        all.extend_from_slice(&self.src().octets());
        all.extend_from_slice(&self.dst().octets());
        all.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        all.extend_from_slice(&[0, 0, 0, proto]);
        all.extend_from_slice(l4);
        let named = match IpNumber(proto) {
            IpNumber::TCP => "TCP",
            IpNumber::UDP => "UDP",
            IpNumber::IPV6_ICMP => "ICMPv6",
            _ => return Ok(()),
        };
        if internet_checksum(&all) != 0 {
            return Err(format!("{named} checksum is wrong"));
        }
        if self.is_icmp_error() && l4.len() >= 8 + IPV6_LEN {
            let quoted = self.quoted();
            if Self::quote_is_whole(&quoted) {
                View6::new(&quoted)
                    .verify_checksums()
                    .map_err(|e| format!("quoted packet: {e}"))?;
            }
        }
        Ok(())
    }
}

/// `assert!` that every checksum of an IPv6 `frame` verifies.
#[track_caller]
pub fn assert_checksums(frame: &[u8]) {
    if let Err(err) = View6::new(frame).verify_checksums() {
        panic!("{err} in {frame:02x?}");
    }
}
