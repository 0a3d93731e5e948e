//! Flow expiry by the dataplane itself, for gateways where no agent process
//! stays to sweep: in Kube-OVN's egress gateway pod the privileged init
//! container attaches the programs and exits, and the long-running
//! container may not call bpf(). There the `conntrack_sweep` program, run
//! before the outbound program on every packet, walks the table once per
//! interval and removes idle flows exactly as the agent's sweeper would.

use crate::{flow::STATE_COUNT, shared_layout};

shared_layout! {
    /// The one value of `SELF_SWEEP`.
    pub struct SelfSweep {
        /// How often the table is walked, ns; 0: never (an agent sweeps).
        pub interval_ns: u64,
        /// Idle time after which a flow ends, per `flow::STATE_*`, ns.
        pub timeouts_ns: [u64; STATE_COUNT],
        /// CLOCK_MONOTONIC_COARSE ns when the last walk started.
        pub last_ns: u64,
        /// Walks done.
        pub walks: u64,
        /// Flows ended by the walks.
        pub ended: u64,
        /// Halves whose other half was missing for longer than
        /// `ORPHAN_GRACE_NS`, removed.
        pub orphans: u64,
    }
}

/// A half without its peer is removed only once it has been idle this
/// long: a new flow's reply half is inserted before its outbound half, so
/// a walk between the two must not take it for an orphan.
pub const ORPHAN_GRACE_NS: u64 = 10_000_000_000;
