//! XDP redirects the kernel dropped after the program returned.
//!
//! An XDP program returns `XDP_REDIRECT` before anything is transmitted, so
//! it never learns that the target refused the frame (a veth whose peer has
//! no NAPI, a macvlan without `ndo_xdp_xmit`, a target that is down). The
//! kernel reports those failures in two tracepoints, which the programs of
//! `redirect_errors` count into `REDIRECT_DROPS` for the agent's health
//! check.
//!
//! The record layouts below were read from
//! `/sys/kernel/tracing/events/xdp/<event>/format` (Linux 6.18) and agree
//! with `TP_STRUCT__entry` in the kernel's `include/trace/events/xdp.h`.
//! Tracepoint layouts are not a stable ABI, so the agent compares these
//! offsets with the running kernel's format files before it attaches, and
//! leaves the watch off (saying so) where they differ.

use crate::shared_layout;

/// One field of a tracepoint record: its name in the format file, byte
/// offset and size (every field used here is a 4-byte `int` or `u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceField {
    pub name: &'static str,
    pub offset: usize,
}

/// `xdp:xdp_devmap_xmit`, emitted by `bq_xmit_all()` in
/// `kernel/bpf/devmap.c` once per flush of a per-CPU bulk queue. Frames
/// sent with `bpf_redirect()` from native XDP are queued there too and
/// flushed at the end of the receiving NAPI poll. `drops` is `cnt - sent`;
/// `err` is the negative errno when the driver's `ndo_xdp_xmit` failed for
/// the whole batch (then `sent` is 0), 0 otherwise: a veth whose peer has
/// no NAPI fails it with `-ENXIO` (before 6.3 always, since then when the
/// peer loses NAPI while frames are queued).
pub mod devmap_xmit {
    use super::TraceField;

    pub const CATEGORY: &str = "xdp";
    pub const NAME: &str = "xdp_devmap_xmit";
    /// `int from_ifindex`: the device the frames were received on.
    pub const FROM_IFINDEX: TraceField = TraceField {
        name: "from_ifindex",
        offset: 8,
    };
    /// `int to_ifindex`: the redirect target.
    pub const TO_IFINDEX: TraceField = TraceField {
        name: "to_ifindex",
        offset: 16,
    };
    /// `int drops`: frames of the batch the target did not take.
    pub const DROPS: TraceField = TraceField {
        name: "drops",
        offset: 20,
    };
    /// `int err`: 0, or the negative errno of a failed `ndo_xdp_xmit`.
    pub const ERR: TraceField = TraceField {
        name: "err",
        offset: 28,
    };
    pub const FIELDS: [TraceField; 4] = [FROM_IFINDEX, TO_IFINDEX, DROPS, ERR];
}

/// `xdp:xdp_redirect_err`, emitted by `xdp_do_redirect()` (and the generic
/// XDP path) when a redirect is refused before it is queued: the target
/// does not advertise XDP transmit (`-EOPNOTSUPP`: a macvlan, and since
/// Linux 6.3 a veth whose peer has no NAPI), the target is down
/// (`-ENETDOWN`) or the frame is too long for it (`-EMSGSIZE`), no such
/// device (`-EINVAL`). One event per frame. Current kernels report failed map redirects here too:
/// `include/trace/events/xdp.h` routes `_trace_xdp_redirect_map_err` to
/// this event, kept `xdp_redirect_map_err` only for old programs, and 6.18
/// does not list it at all.
pub mod redirect_err {
    use super::TraceField;

    pub const CATEGORY: &str = "xdp";
    pub const NAME: &str = "xdp_redirect_err";
    /// `int ifindex`: the device whose XDP program redirected.
    pub const IFINDEX: TraceField = TraceField {
        name: "ifindex",
        offset: 16,
    };
    /// `int err`: the negative errno.
    pub const ERR: TraceField = TraceField {
        name: "err",
        offset: 20,
    };
    /// `int to_ifindex`: the target (for `bpf_redirect()`, the ifindex asked for).
    pub const TO_IFINDEX: TraceField = TraceField {
        name: "to_ifindex",
        offset: 24,
    };
    pub const FIELDS: [TraceField; 3] = [IFINDEX, ERR, TO_IFINDEX];
}

shared_layout! {
    /// Key of `REDIRECT_DROPS`.
    pub struct RedirectPair {
        /// Where the frames came in (one of the dataplane's interfaces).
        pub from_ifindex: u32,
        /// Where they were redirected.
        pub to_ifindex: u32,
    }
}

shared_layout! {
    /// Per-CPU value of `REDIRECT_DROPS`.
    pub struct RedirectDrops {
        /// Frames lost to an outright failure: the redirect was refused
        /// (`xdp_redirect_err`), or the target's transmit failed for the
        /// whole batch (`xdp_devmap_xmit` with `err` set). Nothing gets
        /// through while this grows; the agent's health check follows it.
        pub failed: u64,
        /// Frames the target left out of a batch it otherwise took
        /// (`xdp_devmap_xmit` with `err` 0): its receive queue was full, or
        /// the frames were longer than it accepts. Congestion looks like
        /// this, so it is reported, not taken for a failure.
        pub partial: u64,
        /// The latest `err` of a failure on this CPU (a negative errno), 0
        /// before the first.
        pub last_err: i32,
        /// Padding.
        pub _pad: u32,
    }
}

/// Pairs `REDIRECT_DROPS` can hold; an event for a pair beyond them is not counted.
pub const REDIRECT_PAIRS: u32 = 1024;
