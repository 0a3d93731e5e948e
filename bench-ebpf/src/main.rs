//! The benchmark's programs, not the product:
//!
//! - `pktgen`: run with BPF_PROG_RUN in live-frames mode on the sender's
//!   veth; turns one template UDP frame into many flows (source address and
//!   port from a counter) and transmits it (XDP_TX: out of that veth, into
//!   the gateway).
//! - `sink`: on the receiver's veth; counts what arrives (and how much of it
//!   was translated), drops it, and lets latency probes through to a socket.
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
    ip::Ipv4Hdr,
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

const HEADERS: usize = EthHdr::LEN + Ipv4Hdr::LEN + UdpHdr::LEN;

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn headers(ctx: &XdpContext) -> Option<(*mut EthHdr, *mut Ipv4Hdr, *mut UdpHdr)> {
    if ctx.data() + HEADERS > ctx.data_end() {
        return None;
    }
    let eth = ctx.data() as *mut EthHdr;
    let ip = (ctx.data() + EthHdr::LEN) as *mut Ipv4Hdr;
    let udp = (ctx.data() + EthHdr::LEN + Ipv4Hdr::LEN) as *mut UdpHdr;
    Some((eth, ip, udp))
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
    let Some((eth, ip, udp)) = headers(&ctx) else {
        return XDP_ABORTED;
    };
    let Some(config) = PKTGEN_CONFIG.get(0) else {
        return XDP_ABORTED;
    };
    let Some(sequence) = SEQUENCE.get_ptr_mut(0) else {
        return XDP_ABORTED;
    };
    // SAFETY: per-CPU slot.
    let n = unsafe {
        let n = *sequence;
        *sequence = n + 1;
        n as u32
    };
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
    let host = rest % hosts;
    let ports = (65535 - u32::from(config.port_base)).max(1);
    let port = u32::from(config.port_base) + (rest / hosts) % ports;
    let src = config.src_base + tenant * config.tenant_stride + 1 + host;
    let dst_port = u32::from(config.dst_port) + rest % PKTGEN_DST_PORTS;
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

#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    let Some((eth, ip, udp)) = headers(&ctx) else {
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
