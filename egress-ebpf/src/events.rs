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
    events::{EVENT_FLOW_CREATED, FlowEventV4},
    flow::FlowKeyV4,
};

use crate::{
    maps::{DP_CONFIG, FLOW_EVENTS},
    verdict::count,
};

/// Reports the flow `key` created now, translated to `(nat_addr, nat_port)`.
#[inline(always)]
pub fn flow_created(key: &FlowKeyV4, (nat_addr, nat_port): ([u8; 4], u16), tenant: u16, now: u64) {
    let wanted = DP_CONFIG
        .get(0)
        .is_some_and(|config| config.flags & CONFIG_F_FLOW_EVENTS != 0);
    if !wanted {
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
