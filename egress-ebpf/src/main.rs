//! The egress dataplane. Each entry point is a thin wrapper around the
//! module that reads like the packet's path; the path is written once and
//! compiled for each hook (see `hook`), and the agent picks one hook per
//! interface:
//!
//! - `snat_outbound` (XDP) or `tc_outbound` (TC ingress), internal
//!   interfaces: see `outbound`.
//! - `snat_reply` (XDP) or `tc_reply` (TC ingress), external interface:
//!   see `reply`.
//! - `neigh_fallback` (TC ingress, internal interfaces on XDP) and
//!   `leak_guard` (TC egress, external): see `tc`.
//!
//! IPv6 takes the same path in its own modules (`parse6`, `outbound6`,
//! `reply6`), maps and programs (`snat_outbound6`, `snat_reply6`,
//! `tc_outbound6`, `tc_reply6`, with `icmp6`'s `snat_icmp6_err` and
//! `tc_icmp6_err` for ICMPv6 errors), which the IPv4 programs tail-call when a
//! frame carries IPv6 (`V6_PROGRAMS_XDP`, `V6_PROGRAMS_TC`): each program has BPF's 512 bytes of
//! stack to itself, and IPv6's keys and entries would not fit beside
//! IPv4's in one.
//!
//! The stages live one per module: `parse`, `classify`, `conntrack`,
//! `limits` (a tenant's share of the table), `nat` (translate), `forward`,
//! `events` (flows created, for the translation log), `inbound` (port
//! forwards and floating IPs opening flows from outside), with `frags` for fragments, `csum` for checksum
//! arithmetic, `verdict` for the counted outcome of every packet and `zero`
//! for zeroing that stays inline.
//!
//! `conntrack_sweep` (TC ingress, internal, only where no agent process
//! stays) expires idle flows: see `sweep`.
//!
//! Off the packet's path, two tracepoint programs (`redirect_xmit`,
//! `redirect_err`) count the redirects the kernel dropped after the XDP
//! programs returned: see `redirect_errors`.
#![no_std]
#![no_main]
// Atomic adds on map values (`limits`); the crate builds with
// RUSTC_BOOTSTRAP already, for -Z build-std.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod classify;
mod conntrack;
mod csum;
mod events;
mod forward;
mod frags;
mod hook;
mod icmp6;
mod inbound;
mod limits;
mod maps;
mod nat;
mod outbound;
mod outbound6;
mod parse;
mod parse6;
mod redirect_errors;
mod reply;
mod reply6;
mod sweep;
mod tc;
mod verdict;
mod zero;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn snat_outbound(ctx: XdpContext) -> u32 {
    outbound::run(&ctx) as u32
}

#[xdp]
pub fn snat_reply(ctx: XdpContext) -> u32 {
    reply::run(&ctx) as u32
}

#[classifier]
pub fn tc_outbound(ctx: TcContext) -> i32 {
    hook::tc_pull_headers(&ctx);
    outbound::run(&ctx)
}

#[classifier]
pub fn tc_reply(ctx: TcContext) -> i32 {
    hook::tc_pull_headers(&ctx);
    reply::run(&ctx)
}

/// IPv6 frames, tail-called from `snat_outbound`: see `outbound6`.
#[xdp]
pub fn snat_outbound6(ctx: XdpContext) -> u32 {
    outbound6::run(&ctx) as u32
}

/// IPv6 frames, tail-called from `snat_reply`: see `reply6`.
#[xdp]
pub fn snat_reply6(ctx: XdpContext) -> u32 {
    reply6::run(&ctx) as u32
}

/// An IPv6 tenant packet opening a flow, tail-called from `snat_outbound6`.
#[xdp]
pub fn snat_new_flow6(ctx: XdpContext) -> u32 {
    outbound6::run_new_flow(&ctx) as u32
}

/// An IPv6 tenant packet opening a flow, tail-called from `tc_outbound6`.
#[classifier]
pub fn tc_new_flow6(ctx: TcContext) -> i32 {
    outbound6::run_new_flow(&ctx)
}

/// An ICMPv6 error about a packet of a flow, either way, tail-called from
/// `snat_outbound6` and `snat_reply6`: see `icmp6`.
#[xdp]
pub fn snat_icmp6_err(ctx: XdpContext) -> u32 {
    icmp6::run(&ctx) as u32
}

/// The same, tail-called from `tc_outbound6` and `tc_reply6`.
#[classifier]
pub fn tc_icmp6_err(ctx: TcContext) -> i32 {
    icmp6::run(&ctx)
}

/// IPv6 frames, tail-called from `tc_outbound` (headers already pulled).
#[classifier]
pub fn tc_outbound6(ctx: TcContext) -> i32 {
    outbound6::run(&ctx)
}

/// IPv6 frames, tail-called from `tc_reply` (headers already pulled).
#[classifier]
pub fn tc_reply6(ctx: TcContext) -> i32 {
    reply6::run(&ctx)
}

/// Before `tc_outbound` where no agent sweeps: expires idle flows, hands
/// every packet on (TC_ACT_UNSPEC: the next filter runs).
#[classifier]
pub fn conntrack_sweep(_ctx: TcContext) -> i32 {
    sweep::maybe_walk();
    aya_ebpf::bindings::TC_ACT_UNSPEC
}

#[classifier]
pub fn neigh_fallback(ctx: TcContext) -> i32 {
    tc::neigh_fallback(&ctx)
}

#[classifier]
pub fn leak_guard(ctx: TcContext) -> i32 {
    tc::leak_guard(&ctx)
}

/// `xdp:xdp_devmap_xmit`: frames a redirect target refused; see `redirect_errors`.
#[aya_ebpf::macros::tracepoint]
pub fn redirect_xmit(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    redirect_errors::devmap_xmit(&ctx);
    0
}

/// `xdp:xdp_redirect_err`: redirects refused before queueing; see `redirect_errors`.
#[aya_ebpf::macros::tracepoint]
pub fn redirect_err(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    redirect_errors::redirect_err(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path to it.
    loop {}
}

/// bpf_fib_lookup and bpf_redirect_neigh are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
