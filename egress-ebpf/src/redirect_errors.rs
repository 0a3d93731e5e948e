//! Redirect failures: what the kernel dropped after an XDP program returned
//! `XDP_REDIRECT`.
//!
//! Two tracepoint programs count the frames lost on the way out of the
//! dataplane's interfaces into `REDIRECT_DROPS`, by (from, to) interface:
//!
//! - `xdp:xdp_redirect_err` (`redirect_err`) runs only for a redirect the
//!   kernel refused before queueing it: one frame each. `-EOPNOTSUPP` from
//!   a target without XDP transmit (a macvlan; since Linux 6.3 also a veth
//!   whose peer has no NAPI, which then does not advertise it),
//!   `-ENETDOWN`, `-EMSGSIZE`.
//! - `xdp:xdp_devmap_xmit` (`redirect_xmit`) runs at every flush of a bulk
//!   queue, failed or not, so it returns at once unless the flush lost
//!   frames. `bpf_redirect()` frames from native XDP are flushed this way:
//!   a driver whose transmit fails the whole batch reports its error here
//!   (a veth whose peer has no NAPI: `-ENXIO`, on kernels before 6.3 or
//!   when the peer loses NAPI while frames are queued); frames left out
//!   of a batch the target otherwise took (queue full, too long) come
//!   with no error.
//!
//! `redirect_err` runs only on failures. `redirect_xmit` runs once per
//! flush (a NAPI poll's worth of frames to one target, not once per
//! packet) and reads two fields before it returns when nothing was lost.
//! Events from interfaces that are not in `INTERFACES` are someone else's
//! and are ignored.

use aya_ebpf::{EbpfContext as _, bindings::BPF_NOEXIST, programs::TracePointContext};
use egress_common::redirect::{RedirectDrops, RedirectPair, TraceField, devmap_xmit, redirect_err};

use crate::maps::{INTERFACES, REDIRECT_DROPS};

/// Reads an `int` field of the tracepoint record.
#[inline(always)]
fn field(ctx: &TracePointContext, field: TraceField) -> i32 {
    // SAFETY: a tracepoint program may read its record directly: the
    // verifier admits aligned reads within the record's bounds, and every
    // field read here is a 4-byte int at a 4-byte-aligned offset.
    unsafe {
        ctx.as_ptr()
            .cast::<u8>()
            .add(field.offset)
            .cast::<i32>()
            .read()
    }
}

/// `xdp:xdp_devmap_xmit`.
#[inline(always)]
pub fn devmap_xmit(ctx: &TracePointContext) {
    let drops = field(ctx, devmap_xmit::DROPS);
    let err = field(ctx, devmap_xmit::ERR);
    if drops <= 0 && err == 0 {
        return;
    }
    let from = field(ctx, devmap_xmit::FROM_IFINDEX) as u32;
    if !ours(from) {
        return;
    }
    let to = field(ctx, devmap_xmit::TO_IFINDEX) as u32;
    let lost = drops.max(0) as u64;
    if err != 0 {
        record(from, to, lost, 0, err);
    } else {
        record(from, to, 0, lost, 0);
    }
}

/// `xdp:xdp_redirect_err`.
#[inline(always)]
pub fn redirect_err(ctx: &TracePointContext) {
    let from = field(ctx, redirect_err::IFINDEX) as u32;
    if !ours(from) {
        return;
    }
    let to = field(ctx, redirect_err::TO_IFINDEX) as u32;
    let err = field(ctx, redirect_err::ERR);
    record(from, to, 1, 0, err);
}

#[inline(always)]
fn ours(ifindex: u32) -> bool {
    INTERFACES.get_ptr(ifindex).is_some()
}

#[inline(always)]
fn record(from: u32, to: u32, failed: u64, partial: u64, err: i32) {
    let key = RedirectPair {
        from_ifindex: from,
        to_ifindex: to,
    };
    let slot = match REDIRECT_DROPS.get_ptr_mut(key) {
        Some(slot) => slot,
        None => {
            // A pair's first failure. Another CPU may insert it at the same
            // moment; either way the lookup below finds it. A full map
            // (more pairs than it holds) loses the count.
            let _ = REDIRECT_DROPS.insert(key, RedirectDrops::default(), u64::from(BPF_NOEXIST));
            match REDIRECT_DROPS.get_ptr_mut(key) {
                Some(slot) => slot,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's slot of a per-CPU map; tracepoint programs do not
    // nest on one CPU, and entries are never removed by the programs.
    unsafe {
        (*slot).failed += failed;
        (*slot).partial += partial;
        if err != 0 {
            (*slot).last_err = err;
        }
    }
}
