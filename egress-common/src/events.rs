//! Translation events: what the programs report to the agent through the
//! `FLOW_EVENTS` ring buffer.
//!
//! Only the dataplane sees a flow being created, so creations are reported
//! from there; every end is the agent's own doing (sweeper, configuration
//! change, shutdown) and never crosses the ring. An event the ring has no
//! room for is counted (`Counter::EventsLost`), never dropped silently.

use crate::{flow::FlowKeyV4, shared_layout};

/// `FlowEventV4::kind` of a flow the dataplane created.
pub const EVENT_FLOW_CREATED: u32 = 1;

shared_layout! {
    /// One record of `FLOW_EVENTS`.
    pub struct FlowEventV4 {
        /// CLOCK_MONOTONIC_COARSE nanoseconds of the flow's first packet.
        pub time_ns: u64,
        /// `EVENT_*`.
        pub kind: u32,
        /// Tenant id.
        pub tenant: u16,
        /// Port the flow was translated to, network byte order.
        pub nat_port: u16,
        /// The flow's outbound key: the tenant host's tuple as it arrived.
        pub key: FlowKeyV4,
        /// Egress address the flow was translated to, network byte order.
        pub nat_addr: [u8; 4],
        pub _pad: u32,
    }
}

const _: () = assert!(core::mem::size_of::<FlowEventV4>() == 40);

/// Default bytes of `FLOW_EVENTS` (a power of two, as the kernel requires):
/// about 87,000 events, a fifth of a second of the fastest new-flow rate
/// measured here, for the agent to drain.
pub const DEFAULT_EVENT_RING_BYTES: u32 = 4 << 20;
