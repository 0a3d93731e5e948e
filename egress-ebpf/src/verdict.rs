//! What a program decided, and the counter that records why.
//!
//! Each program's `process` returns `Ok(Verdict)` for what it passes or
//! forwards and `Err(Counter)` for every drop, so no path can return an
//! action without counting it. Actions are the hook's own only at the end
//! (`finish`), so the stages need not know which hook they run on.

use egress_common::counters::Counter;

use crate::{hook::Hook, maps::COUNTERS};

pub enum Action {
    /// The kernel takes the packet as it is now.
    Pass,
    Drop,
    /// What a redirect helper returned.
    Redirected(i32),
}

pub struct Verdict {
    pub action: Action,
    pub counter: Counter,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(counter: Counter) -> Self {
        Self {
            action: Action::Pass,
            counter,
        }
    }

    #[inline(always)]
    pub const fn drop(counter: Counter) -> Self {
        Self {
            action: Action::Drop,
            counter,
        }
    }

    #[inline(always)]
    pub const fn redirected(action: i32, counter: Counter) -> Self {
        Self {
            action: Action::Redirected(action),
            counter,
        }
    }

    /// Records the verdict and returns the hook's action.
    #[inline(always)]
    pub fn finish<H: Hook>(result: Result<Self, Counter>) -> i32 {
        let verdict = result.unwrap_or_else(Self::drop);
        count(verdict.counter);
        match verdict.action {
            Action::Pass => H::PASS,
            Action::Drop => H::DROP,
            Action::Redirected(action) => action,
        }
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}
