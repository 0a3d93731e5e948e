//! Sweep: flow expiry by the dataplane itself, where no agent process
//! stays to do it (Kube-OVN's egress gateway pod: the init container
//! attaches the programs and exits; the long-running one may not call
//! bpf()).
//!
//! `conntrack_sweep` runs before the outbound program on the internal
//! interfaces and hands every packet on untouched. Once per interval
//! (`SELF_SWEEP`, 0 when an agent sweeps) the packet that finds the
//! interval over walks the table with `bpf_for_each_map_elem`: each flow is
//! judged from its outbound half, by the state both halves' flags give
//! (`flow_state`, the agent's rule) and the later of their last packets,
//! and ends with both halves; the tenant's ended count goes up as the
//! agent's would, so quotas hold. Both families' tables are walked, IPv4
//! then IPv6, by the same code (`Table`). A walk costs about a nanosecond
//! per table slot, paid by one packet per interval.

use core::ffi::c_void;

use aya_ebpf::helpers::bpf_for_each_map_elem;
use egress_common::{
    flow::{DIR_OUTBOUND, FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6, STATE_COUNT, flow_state},
    sweep::{ORPHAN_GRACE_NS, SelfSweep},
};

use crate::{
    conntrack, limits,
    maps::{CONNTRACK_V4, CONNTRACK_V6, SELF_SWEEP, TENANT_ENDED},
};

/// One family's conntrack table as the walk sees it: its key, its entry's
/// fields the judgement reads, and its map.
trait Table: Sized {
    type Entry;
    fn peer_key(&self, entry: &Self::Entry) -> Self;
    fn direction(&self) -> u8;
    fn proto(&self) -> u8;
    /// (last_seen_ns, tcp_flags, packets, tenant)
    fn facts(entry: &Self::Entry) -> (u64, u8, u64, u16);
    fn get(&self) -> Option<*const Self::Entry>;
    fn remove(&self) -> bool;
    /// The map, as `bpf_for_each_map_elem` takes it.
    fn map() -> *mut c_void;
}

macro_rules! table {
    ($key:ty, $entry:ty, $map:ident) => {
        impl Table for $key {
            type Entry = $entry;
            #[inline(always)]
            fn peer_key(&self, entry: &$entry) -> Self {
                <$key>::peer_key(self, entry)
            }
            #[inline(always)]
            fn direction(&self) -> u8 {
                self.direction
            }
            #[inline(always)]
            fn proto(&self) -> u8 {
                self.proto
            }
            #[inline(always)]
            fn facts(entry: &$entry) -> (u64, u8, u64, u16) {
                (
                    entry.last_seen_ns,
                    entry.tcp_flags,
                    entry.packets,
                    entry.tenant,
                )
            }
            #[inline(always)]
            fn get(&self) -> Option<*const $entry> {
                $map.get_ptr(*self)
            }
            #[inline(always)]
            fn remove(&self) -> bool {
                $map.remove(*self).is_ok()
            }
            fn map() -> *mut c_void {
                core::ptr::from_ref(&$map).cast_mut().cast()
            }
        }
    };
}

table!(FlowKeyV4, FlowEntryV4, CONNTRACK_V4);
table!(FlowKeyV6, FlowEntryV6, CONNTRACK_V6);

/// What the walk's callback needs.
#[repr(C)]
struct Walk {
    now: u64,
    /// The shortest of the timeouts and the orphan grace.
    shortest: u64,
    sweep: *mut SelfSweep,
}

/// Walks the table if the interval is over; cheap otherwise.
#[inline(always)]
pub fn maybe_walk() {
    let Some(sweep) = SELF_SWEEP.get_ptr_mut(0) else {
        return;
    };
    let now = conntrack::now();
    // SAFETY: map value pointer returned by the kernel. Two CPUs may both
    // see the interval over and walk at once: deleting a deleted flow
    // fails and is counted once, by whoever succeeded.
    unsafe {
        let interval = (*sweep).interval_ns;
        if interval == 0 || now.wrapping_sub((*sweep).last_ns) < interval {
            return;
        }
        (*sweep).last_ns = now;
        limits::add(&raw mut (*sweep).walks);
    }
    // SAFETY: as above.
    let timeouts = unsafe { (*sweep).timeouts_ns };
    let mut shortest = ORPHAN_GRACE_NS;
    for timeout in timeouts {
        shortest = shortest.min(timeout);
    }
    let mut walk = Walk {
        now,
        shortest,
        sweep,
    };
    walk_table::<FlowKeyV4>(&mut walk);
    walk_table::<FlowKeyV6>(&mut walk);
}

#[inline(always)]
fn walk_table<K: Table>(walk: &mut Walk) {
    // SAFETY: the map pointer is the map's definition (what the loader
    // relocates to its fd), the callback a static function of the
    // signature the helper documents, the context on this stack.
    unsafe {
        bpf_for_each_map_elem(
            K::map(),
            expire::<K> as *mut c_void,
            core::ptr::from_mut(walk).cast(),
            0,
        );
    }
}

/// One table entry: ends its flow if idle past its state's timeout.
/// Returns 0: continue the walk.
#[inline(never)]
extern "C" fn expire<K: Table>(
    _map: *mut c_void,
    key: *mut K,
    entry: *mut K::Entry,
    walk: *mut Walk,
) -> i64 {
    // SAFETY: the helper passes this entry's key and value and our context.
    let (key, entry, walk) = unsafe { (&*key, &*entry, &*walk) };
    let (last_seen, tcp_flags, _, tenant) = K::facts(entry);
    let idle = walk.now.wrapping_sub(last_seen);
    // A half that saw a packet more recently than the shortest timeout
    // (and the orphan grace) cannot end now, whatever its peer says: most
    // of a busy table is passed over without a second lookup.
    if idle < walk.shortest {
        return 0;
    }
    let peer_key = key.peer_key(entry);
    let Some(peer) = peer_key.get() else {
        if idle >= ORPHAN_GRACE_NS && key.remove() {
            // SAFETY: map value pointer from the walk's context.
            limits::add(unsafe { &raw mut (*walk.sweep).orphans });
        }
        return 0;
    };
    if key.direction() != DIR_OUTBOUND {
        // Judged once, from the outbound half.
        return 0;
    }
    // SAFETY: map value pointer returned by the kernel.
    let (peer_last_seen, peer_flags, peer_packets, _) = K::facts(unsafe { &*peer });
    let state = flow_state(key.proto(), tcp_flags, peer_flags, peer_packets > 0);
    // SAFETY: as above; `state` is below STATE_COUNT, the mask says so to
    // the verifier.
    let timeout = unsafe { (*walk.sweep).timeouts_ns[state & (STATE_COUNT - 1)] };
    let last = last_seen.max(peer_last_seen);
    if walk.now.wrapping_sub(last) < timeout {
        return 0;
    }
    let _ = peer_key.remove();
    if key.remove() {
        if let Some(ended) = TENANT_ENDED.get_ptr_mut(u32::from(tenant)) {
            limits::add(ended);
        }
        // SAFETY: map value pointer from the walk's context.
        limits::add(unsafe { &raw mut (*walk.sweep).ended });
    }
    0
}
