//! Translation events: what the programs report to the agent through the
//! `FLOW_EVENTS` ring buffer.
//!
//! Only the dataplane sees a flow being created, so creations are reported
//! from there; every end is the agent's own doing (sweeper, configuration
//! change, shutdown) and never crosses the ring. An event the ring has no
//! room for is counted (`Counter::EventsLost`), never dropped silently.

use crate::{
    flow::{FlowKeyV4, FlowKeyV6},
    shared_layout,
};

/// `FlowEventV4::kind` of an IPv4 flow the dataplane created.
pub const EVENT_FLOW_CREATED: u32 = 1;
/// `FlowEventV6::kind` of an IPv6 flow the dataplane created.
pub const EVENT_FLOW_CREATED_V6: u32 = 2;

/// Offset of `kind` in every record: the reader tells the records apart by
/// it (and checks the record is as long as that kind's struct).
pub const EVENT_KIND_OFFSET: usize = 8;

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

shared_layout! {
    /// One record of `FLOW_EVENTS` for an IPv6 (NAT66) flow: `FlowEventV4`
    /// with the key and the egress address widened (72 bytes, no padding).
    ///
    /// Both kinds share one ring. `time_ns`, `kind`, `tenant` and
    /// `nat_port` sit at the same offsets in both, so the reader reads
    /// `kind` at `EVENT_KIND_OFFSET` first and decodes the rest as the
    /// struct that kind names (`EVENT_FLOW_CREATED_V6`: this one). The kind,
    /// not the record's length, decides: a later kind may share a length.
    pub struct FlowEventV6 {
        /// CLOCK_MONOTONIC_COARSE nanoseconds of the flow's first packet.
        pub time_ns: u64,
        /// `EVENT_FLOW_CREATED_V6`.
        pub kind: u32,
        /// Tenant id.
        pub tenant: u16,
        /// Port (ICMPv6 echo: identifier) the flow was translated to,
        /// network byte order.
        pub nat_port: u16,
        /// The flow's outbound key: the tenant host's tuple as it arrived.
        pub key: FlowKeyV6,
        /// Egress address the flow was translated to, network byte order.
        pub nat_addr: [u8; 16],
    }
}

const _: () = assert!(core::mem::size_of::<FlowEventV6>() == 72);
const _: () = assert!(core::mem::offset_of!(FlowEventV4, kind) == EVENT_KIND_OFFSET);
const _: () = assert!(core::mem::offset_of!(FlowEventV6, kind) == EVENT_KIND_OFFSET);

/// Default bytes of `FLOW_EVENTS` (a power of two, as the kernel requires):
/// about 87,000 IPv4 events (each takes its size and an 8-byte header;
/// about 52,000 IPv6 ones), a fifth of a second of the fastest new-flow rate
/// measured here, for the agent to drain.
pub const DEFAULT_EVENT_RING_BYTES: u32 = 4 << 20;
