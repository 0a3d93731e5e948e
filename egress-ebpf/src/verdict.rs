//! What a program decided, and the counter that records why.
//!
//! Each program's `process` returns `Ok(Verdict)` for what it passes or
//! forwards and `Err(Counter)` for every drop, so no path can return an
//! action without counting it.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use egress_common::counters::Counter;

use crate::maps::COUNTERS;

pub struct Verdict {
    pub action: u32,
    pub counter: Counter,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(counter: Counter) -> Self {
        Self {
            action: XDP_PASS,
            counter,
        }
    }

    #[inline(always)]
    pub const fn drop(counter: Counter) -> Self {
        Self {
            action: XDP_DROP,
            counter,
        }
    }

    /// Records the verdict and returns the XDP action.
    #[inline(always)]
    pub fn finish(result: Result<Self, Counter>) -> u32 {
        let verdict = result.unwrap_or_else(Self::drop);
        count(verdict.counter);
        verdict.action
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}
