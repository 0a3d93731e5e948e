//! The two TC programs that back XDP up where only the kernel's stack can act.
//!
//! - `neigh_fallback` (internal ingress): XDP translated a packet but the
//!   FIB did not know the next hop's MAC yet, so XDP passed it up. Here the
//!   kernel's neighbour code takes it (`bpf_redirect_neigh` queues it while
//!   ARP resolves), so even the first packet to a new next hop is delivered.
//! - `leak_guard` (external egress): the last check before the wire. A
//!   forwarded packet (one that came in on some interface) may leave only
//!   with an egress address as its source, whatever path the kernel took.
//!   Locally generated traffic (the gateway's own, BFD, ICMP errors the kernel
//!   sends) is not forwarded and passes, and so do sources the operator
//!   routes untranslated (`ROUTED_SRC_V4`). Both families: a forwarded
//!   IPv6 packet leaves only from an IPv6 egress address.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    helpers::bpf_redirect_neigh,
    programs::TcContext,
};
use egress_common::{config::ROLE_EXTERNAL, counters::Counter};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    forward::{fib_lookup, fib_query_v4, role_of, words},
    maps::{EGRESS_ADDR_V4, EGRESS_ADDR_V6, ROUTED_SRC_V4, ROUTED_SRC_V6},
    verdict::count,
    zero,
};

/// The network header of a frame, as far as these programs look.
enum Network {
    V4(Ipv4Hdr),
    V6(Ipv6Hdr),
}

#[inline(always)]
fn network_header(ctx: &TcContext) -> Option<Network> {
    let eth: EthHdr = ctx.load(0).ok()?;
    if eth.ether_type == EtherType::Ipv4 as u16 {
        return ctx.load(EthHdr::LEN).ok().map(Network::V4);
    }
    if eth.ether_type == EtherType::Ipv6 as u16 {
        return ctx.load(EthHdr::LEN).ok().map(Network::V6);
    }
    None
}

const AF_INET6: u8 = 10;

#[inline(always)]
fn is_egress_addr(addr: [u8; 4]) -> bool {
    EGRESS_ADDR_V4.get_ptr(addr).is_some()
}

#[inline(always)]
fn is_egress_addr_v6(addr: &[u8; 16]) -> bool {
    EGRESS_ADDR_V6.get_ptr(addr).is_some()
}

#[inline(always)]
pub fn neigh_fallback(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is the program's own skb.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut slot = MaybeUninit::uninit();
    // A translated packet on an internal interface: XDP handed it over.
    let params = match network_header(ctx) {
        Some(Network::V4(ip)) if is_egress_addr(ip.src_addr) => fib_query_v4(
            &mut slot,
            ip.proto,
            ip.tos,
            ip.src_addr,
            ip.dst_addr,
            ingress,
        ),
        Some(Network::V6(ip)) if is_egress_addr_v6(&ip.src_addr) => {
            // SAFETY: a plain C struct; all-zero is its documented initial state.
            let params = unsafe { zero::zeroed(&mut slot) };
            params.family = AF_INET6;
            params.l4_protocol = ip.next_hdr;
            params.__bindgen_anon_3.ipv6_src = words(&ip.src_addr);
            params.__bindgen_anon_4.ipv6_dst = words(&ip.dst_addr);
            params.ifindex = ingress;
            params
        }
        _ => return TC_ACT_OK,
    };
    let ret = fib_lookup(ctx, params);
    let routed = ret == BPF_FIB_LKUP_RET_SUCCESS || ret == BPF_FIB_LKUP_RET_NO_NEIGH;
    if routed && role_of(params.ifindex) == ROLE_EXTERNAL {
        count(Counter::TcNeighRedirected);
        // SAFETY: plain helper call; a null nexthop lets the kernel route.
        return unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count(Counter::TcNeighDropped);
    TC_ACT_SHOT
}

#[inline(always)]
pub fn leak_guard(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is the program's own skb.
    let forwarded_from = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if forwarded_from == 0 {
        return TC_ACT_OK;
    }
    let ip = match network_header(ctx) {
        Some(Network::V4(ip)) => ip,
        Some(Network::V6(ip)) if is_egress_addr_v6(&ip.src_addr) => return TC_ACT_OK,
        Some(Network::V6(ip)) if ROUTED_SRC_V6.get(&Key::new(128, ip.src_addr)).is_some() => {
            count(Counter::RoutedPassed);
            return TC_ACT_OK;
        }
        _ => {
            count(Counter::TcLeakBlocked);
            return TC_ACT_SHOT;
        }
    };
    if is_egress_addr(ip.src_addr) {
        return TC_ACT_OK;
    }
    if ROUTED_SRC_V4.get(&Key::new(32, ip.src_addr)).is_some() {
        count(Counter::RoutedPassed);
        return TC_ACT_OK;
    }
    count(Counter::TcLeakBlocked);
    TC_ACT_SHOT
}
