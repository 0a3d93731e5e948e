//! Limits: how much of the shared conntrack table one tenant may take, and
//! how fast it may open flows, so that no tenant can crowd out another.
//!
//! The table is a plain hash (nothing is evicted to make room), so a tenant
//! whose flows filled it would lock every other tenant out of new flows.
//! Each tenant therefore holds at most `TenantInfo::max_flows` flows: the
//! programs count every flow they create (`TENANT_USAGE`, atomic adds) and
//! the agent counts every flow it ends (`TENANT_ENDED`); the difference is
//! what the tenant holds. Two CPUs admitting the same tenant's new flows at
//! the same instant may both pass, so a tenant can overshoot its quota by at
//! most one flow per CPU. The rate limit is a token bucket kept without
//! atomics: concurrent refills can lose a few tokens, never create them
//! beyond the burst.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use egress_common::{
    counters::Counter,
    tenant::{TenantInfo, TenantUsage},
};

use crate::maps::{TENANT_ENDED, TENANT_USAGE};

/// Thousandths of a flow per flow: tokens are kept in milli-flows so that
/// low rates refill smoothly between packets.
const MILLI: u64 = 1_000;
/// A bucket idle this long is full whatever its rate (and the refill
/// arithmetic below cannot overflow).
const REFILL_CAP_NS: u64 = 10_000_000_000;

/// Adds one to a counter other CPUs add to as well. `core`'s atomic types
/// offer no read-modify-write on the BPF target (it has no compare-and-swap
/// before v3), but its atomic add is the `lock xadd` instruction the
/// verifier has always accepted on map values: the intrinsic, result
/// unused, compiles to exactly that.
#[inline(always)]
pub fn add(counter: *mut u64) {
    // SAFETY: `counter` points into a map value, 8-aligned by layout.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
}

/// Whether `tenant` may open one more flow now; its usage entry, for
/// `created` once the flow exists.
#[inline(always)]
pub fn admit(tenant: u16, info: &TenantInfo, now: u64) -> Result<*mut TenantUsage, Counter> {
    let index = u32::from(tenant);
    let usage = TENANT_USAGE
        .get_ptr_mut(index)
        .ok_or(Counter::OutDropTenantQuota)?;
    let ended = TENANT_ENDED.get(index).copied().unwrap_or(0);
    // SAFETY: map value pointer returned by the kernel.
    let created = unsafe { (*usage).created };
    if created.saturating_sub(ended) >= u64::from(info.max_flows) {
        // SAFETY: as above.
        add(unsafe { &raw mut (*usage).quota_drops });
        return Err(Counter::OutDropTenantQuota);
    }
    if info.new_flow_rate != 0 && !take_token(usage, info, now) {
        // SAFETY: as above.
        add(unsafe { &raw mut (*usage).rate_drops });
        return Err(Counter::OutDropTenantRate);
    }
    Ok(usage)
}

/// Counts a flow `admit` let in and conntrack created.
#[inline(always)]
pub fn created(usage: *mut TenantUsage) {
    // SAFETY: map value pointer from `admit`, same program run.
    add(unsafe { &raw mut (*usage).created });
}

/// Counts a new flow conntrack refused against the tenant that asked for
/// it, so per-tenant figures show who ran out of ports or room; returns
/// the refusal's counter.
#[inline(always)]
pub fn refused(usage: *mut TenantUsage, refusal: Counter) -> Counter {
    // SAFETY: map value pointer from `admit`, same program run.
    match refusal {
        Counter::OutDropPortsExhausted => add(unsafe { &raw mut (*usage).ports_exhausted_drops }),
        Counter::OutDropConntrackFull => add(unsafe { &raw mut (*usage).table_full_drops }),
        _ => {}
    }
    refusal
}

/// The token bucket: refill for the time since the last refill, then take
/// one flow's worth if there is one.
#[inline(always)]
fn take_token(usage: *mut TenantUsage, info: &TenantInfo, now: u64) -> bool {
    let capacity = u64::from(info.new_flow_burst.max(1)) * MILLI;
    // SAFETY: map value pointer returned by the kernel (see module docs on
    // races).
    let usage = unsafe { &mut *usage };
    let elapsed = now.saturating_sub(usage.refilled_ns);
    let mut tokens = if elapsed >= REFILL_CAP_NS {
        capacity
    } else {
        // rate flows/s is rate milli-flows per µs: elapsed (< 1e10 ns) times
        // a rate the agent keeps below 1e8 stays far inside u64.
        let refill = elapsed * u64::from(info.new_flow_rate) / 1_000_000;
        (usage.tokens_milli + refill).min(capacity)
    };
    usage.refilled_ns = now;
    let granted = tokens >= MILLI;
    if granted {
        tokens -= MILLI;
    }
    usage.tokens_milli = tokens;
    granted
}
