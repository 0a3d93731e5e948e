//! The benchmark's programs, not the product:
//!
//! - `pktgen`: run with BPF_PROG_RUN in live-frames mode on the sender's
//!   veth; turns one template UDP frame into many flows (source address and
//!   port from a counter) and transmits it (XDP_TX: out of that veth, into
//!   the gateway). IPv4 or IPv6, as its configuration and template say;
//!   IPv6 UDP carries a checksum (zero is not allowed there, and netfilter
//!   would call the packet invalid), computed for every frame.
//! - `sink`: on the receiver's veth; counts what arrives (and how much of it
//!   was translated, either family), drops it, and lets latency probes
//!   through to a socket.
//! - `forward`: on the gateway's internal veth for the ceiling run; sends
//!   every frame out of the external veth with no NAT at all.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    btf_maps::{Array, PerCpuArray},
    helpers::bpf_redirect,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use egress_common::bench::{
    BENCH_COUNTERS, ForwardConfig, PKTGEN_DST_PORTS, PKTGEN_SENT, PKTGEN_UNIQUE, PktgenConfig,
    SINK_RECEIVED, SINK_TRANSLATED, SinkConfig,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

#[btf_map]
static PKTGEN_CONFIG: Array<PktgenConfig, 1> = Array::new();
#[btf_map]
static SINK_CONFIG: Array<SinkConfig, 1> = Array::new();
#[btf_map]
static FORWARD_CONFIG: Array<ForwardConfig, 1> = Array::new();
#[btf_map]
static COUNTERS: PerCpuArray<u64, { BENCH_COUNTERS as usize }> = PerCpuArray::new();
/// The generator's flow counter, per CPU (one sender thread, one CPU).
#[btf_map]
static SEQUENCE: PerCpuArray<u64, 1> = PerCpuArray::new();

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *slot += 1 };
    }
}

/// The frame's Ethernet, IP (`Ipv4Hdr` or `Ipv6Hdr`, no options or
/// extension headers) and UDP headers, if the frame holds them all.
#[inline(always)]
fn headers<Ip>(ctx: &XdpContext) -> Option<(*mut EthHdr, *mut Ip, *mut UdpHdr)> {
    let ip_len = core::mem::size_of::<Ip>();
    if ctx.data() + EthHdr::LEN + ip_len + UdpHdr::LEN > ctx.data_end() {
        return None;
    }
    let eth = ctx.data() as *mut EthHdr;
    let ip = (ctx.data() + EthHdr::LEN) as *mut Ip;
    let udp = (ctx.data() + EthHdr::LEN + ip_len) as *mut UdpHdr;
    Some((eth, ip, udp))
}

/// The UDP checksum of an IPv6 datagram whose payload is all zeros (the
/// template's), from its addresses and header.
#[inline(always)]
fn udp6_checksum(src: &[u8; 16], dst: &[u8; 16], udp: &UdpHdr) -> [u8; 2] {
    let mut sum = 0u32;
    for i in 0..8 {
        sum += u32::from(u16::from_be_bytes([src[2 * i], src[2 * i + 1]]));
        sum += u32::from(u16::from_be_bytes([dst[2 * i], dst[2 * i + 1]]));
    }
    let len = u32::from(u16::from_be_bytes(udp.len));
    // Pseudo-header length and next header, then the UDP header's own
    // ports and length (the checksum field counts as zero).
    sum += len + 17;
    sum += u32::from(u16::from_be_bytes(udp.src));
    sum += u32::from(u16::from_be_bytes(udp.dst));
    sum += len;
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    match !(sum as u16) {
        // Zero means "no checksum", which IPv6 forbids.
        0 => [0xff, 0xff],
        check => check.to_be_bytes(),
    }
}

/// IPv4 header checksum from scratch (20 bytes, no options).
#[inline(always)]
fn ip_checksum(ip: &Ipv4Hdr) -> [u8; 2] {
    // SAFETY: the header is 20 bytes, ten words.
    let words: &[[u8; 2]; 10] = unsafe { &*(core::ptr::from_ref(ip).cast()) };
    let mut sum = 0u32;
    for (i, word) in words.iter().enumerate() {
        if i != 5 {
            sum += u32::from(u16::from_be_bytes(*word));
        }
    }
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

#[xdp]
pub fn pktgen(ctx: XdpContext) -> u32 {
    let Some(config) = PKTGEN_CONFIG.get(0) else {
        return XDP_ABORTED;
    };
    if config.ipv6 != 0 {
        return pktgen_v6(&ctx, config);
    }
    let Some((eth, ip, udp)) = headers::<Ipv4Hdr>(&ctx) else {
        return XDP_ABORTED;
    };
    let Some(n) = next_sequence() else {
        return XDP_ABORTED;
    };
    let Flow {
        tenant,
        host,
        port,
        dst_port,
    } = flow_of(config, n);
    let src = config.src_base + tenant * config.tenant_stride + 1 + host;
    // SAFETY: bounds checked by `headers`.
    unsafe {
        (*eth).dst_addr = config.eth_dst;
        (*eth).src_addr = config.eth_src;
        (*ip).ttl = 64;
        (*ip).src_addr = src.to_be_bytes();
        (*ip).dst_addr = config.dst_addr.to_be_bytes();
        (*ip).check = [0, 0];
        (*ip).check = ip_checksum(&*ip);
        (*udp).src = (port as u16).to_be_bytes();
        (*udp).dst = (dst_port as u16).to_be_bytes();
        (*udp).check = [0, 0];
    }
    count(PKTGEN_SENT);
    XDP_TX
}

/// Which flow the generator's `n`th frame is: its tenant prefix, host,
/// source and destination port.
struct Flow {
    tenant: u32,
    host: u32,
    port: u32,
    dst_port: u32,
}

#[inline(always)]
fn flow_of(config: &PktgenConfig, n: u32) -> Flow {
    let flow = if config.mode == PKTGEN_UNIQUE {
        config.start.wrapping_add(n)
    } else if config.flows == 0 {
        0
    } else {
        n % config.flows
    };
    let tenants = if config.tenants == 0 {
        1
    } else {
        config.tenants
    };
    let hosts = if config.hosts == 0 { 1 } else { config.hosts };
    let tenant = flow % tenants;
    let rest = flow / tenants;
    let ports = (65535 - u32::from(config.port_base)).max(1);
    Flow {
        tenant,
        host: rest % hosts,
        port: u32::from(config.port_base) + (rest / hosts) % ports,
        dst_port: u32::from(config.dst_port) + rest % PKTGEN_DST_PORTS,
    }
}

#[inline(always)]
fn next_sequence() -> Option<u32> {
    let sequence = SEQUENCE.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot.
    unsafe {
        let n = *sequence;
        *sequence = n + 1;
        Some(n as u32)
    }
}

/// `pktgen` for an IPv6 template.
#[inline(always)]
fn pktgen_v6(ctx: &XdpContext, config: &PktgenConfig) -> u32 {
    let Some((eth, ip, udp)) = headers::<Ipv6Hdr>(ctx) else {
        return XDP_ABORTED;
    };
    let Some(n) = next_sequence() else {
        return XDP_ABORTED;
    };
    let Flow {
        tenant,
        host,
        port,
        dst_port,
    } = flow_of(config, n);
    let mut src = config.src_base_v6;
    let first = u32::from(u16::from_be_bytes([src[4], src[5]]));
    let [_, _, hi, lo] = (first + tenant).to_be_bytes();
    src[4] = hi;
    src[5] = lo;
    let [_, _, hi, lo] = (host + 1).to_be_bytes();
    src[14] = hi;
    src[15] = lo;
    // SAFETY: bounds checked by `headers`.
    unsafe {
        (*eth).dst_addr = config.eth_dst;
        (*eth).src_addr = config.eth_src;
        (*ip).hop_limit = 64;
        (*ip).src_addr = src;
        (*ip).dst_addr = config.dst_addr_v6;
        (*udp).src = (port as u16).to_be_bytes();
        (*udp).dst = (dst_port as u16).to_be_bytes();
        (*udp).check = udp6_checksum(&src, &config.dst_addr_v6, &*udp);
    }
    count(PKTGEN_SENT);
    XDP_TX
}

#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    if let Some((eth, ip, udp)) = headers::<Ipv6Hdr>(&ctx)
        // SAFETY: bounds checked by `headers`.
        && unsafe { (*eth).ether_type } == EtherType::Ipv6 as u16
    {
        // SAFETY: as above.
        let (next, src, dst_port) = unsafe {
            (
                (*ip).next_hdr,
                (*ip).src_addr,
                u16::from_be_bytes((*udp).dst),
            )
        };
        let Some(config) = SINK_CONFIG.get(0) else {
            return XDP_PASS;
        };
        if next != 17 || dst_port == config.probe_port {
            return XDP_PASS;
        }
        count(SINK_RECEIVED);
        if src[..8] == config.egress_v6_prefix {
            count(SINK_TRANSLATED);
        }
        return XDP_DROP;
    }
    sink_v4(&ctx)
}

#[inline(always)]
fn sink_v4(ctx: &XdpContext) -> u32 {
    let Some((eth, ip, udp)) = headers::<Ipv4Hdr>(ctx) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by `headers`.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 || unsafe { (*ip).proto } != 17 {
        return XDP_PASS;
    }
    let Some(config) = SINK_CONFIG.get(0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by `headers`.
    let (src, dst_port) = unsafe {
        (
            u32::from_be_bytes((*ip).src_addr),
            u16::from_be_bytes((*udp).dst),
        )
    };
    if dst_port == config.probe_port {
        return XDP_PASS;
    }
    count(SINK_RECEIVED);
    if src & config.egress_mask == config.egress_net {
        count(SINK_TRANSLATED);
    }
    XDP_DROP
}

#[xdp]
pub fn forward(ctx: XdpContext) -> u32 {
    let Some(config) = FORWARD_CONFIG.get(0) else {
        return XDP_PASS;
    };
    if ctx.data() + EthHdr::LEN > ctx.data_end() {
        return XDP_DROP;
    }
    let eth = ctx.data() as *mut EthHdr;
    // SAFETY: bounds checked above.
    unsafe {
        (*eth).src_addr = config.smac;
        (*eth).dst_addr = config.dmac;
        bpf_redirect(config.ifindex, 0) as u32
    }
}

/// A plain XDP_PASS for veths that only need NAPI to receive redirects.
#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
