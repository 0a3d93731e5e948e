//! Events: each flow the dataplane creates is reported to the agent through
//! the `FLOW_EVENTS` ring buffer, for the translation log.
//!
//! Reported only while the agent asks for it (`CONFIG_F_FLOW_EVENTS`), so a
//! gateway without a translation log pays one array read per new flow and
//! nothing per established packet. A full ring never holds the flow back:
//! the flow is created and the missing record is counted (`events_lost`),
//! which the agent shows in `status` and metrics.

use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
use egress_common::{
    config::CONFIG_F_FLOW_EVENTS,
    counters::Counter,
    events::{EVENT_FLOW_CREATED, EVENT_FLOW_CREATED_V6, FlowEventV4, FlowEventV6},
    flow::{FlowKeyV4, FlowKeyV6},
};

use crate::{
    maps::{DP_CONFIG, FLOW_EVENTS},
    verdict::count,
};

/// Whether the agent asks for events now.
#[inline(always)]
fn wanted() -> bool {
    DP_CONFIG
        .get(0)
        .is_some_and(|config| config.flags & CONFIG_F_FLOW_EVENTS != 0)
}

/// Reports the flow `key` created now, translated to `(nat_addr, nat_port)`.
#[inline(always)]
pub fn flow_created(key: &FlowKeyV4, (nat_addr, nat_port): ([u8; 4], u16), tenant: u16, now: u64) {
    if !wanted() {
        return;
    }
    let Some(mut slot) = FLOW_EVENTS.reserve(0) else {
        count(Counter::EventsLost);
        return;
    };
    slot.write(FlowEventV4 {
        time_ns: now,
        kind: EVENT_FLOW_CREATED,
        tenant,
        nat_port,
        key: *key,
        nat_addr,
        _pad: 0,
    });
    // The agent drains the ring on a timer, not per event: waking it for
    // each of hundreds of thousands of new flows a second would cost more
    // than the flows themselves.
    slot.submit(u64::from(BPF_RB_NO_WAKEUP));
}

/// Reports the IPv6 flow `key` created now, translated to
/// `(nat_addr, nat_port)`.
///
/// The 72-byte record is written field by field into the slot reserved in
/// the ring, never built on the stack first: the IPv6 new-flow program has
/// little of its 512 bytes to spare.
#[inline(always)]
pub fn flow_created_v6(
    key: &FlowKeyV6,
    (nat_addr, nat_port): (&[u8; 16], u16),
    tenant: u16,
    now: u64,
) {
    if !wanted() {
        return;
    }
    let Some(mut slot) = FLOW_EVENTS.reserve_untyped::<FlowEventV6>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let event = slot.as_mut_ptr();
    // SAFETY: `event` points to the slot the ring reserved for this record,
    // sized and aligned for it; every field is written before the submit.
    unsafe {
        (&raw mut (*event).time_ns).write(now);
        (&raw mut (*event).kind).write(EVENT_FLOW_CREATED_V6);
        (&raw mut (*event).tenant).write(tenant);
        (&raw mut (*event).nat_port).write(nat_port);
        (&raw mut (*event).key).write(*key);
        (&raw mut (*event).nat_addr).write(*nat_addr);
    }
    slot.submit(u64::from(BPF_RB_NO_WAKEUP));
}
