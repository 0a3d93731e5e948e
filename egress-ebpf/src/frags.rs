//! Fragments: only a datagram's first fragment carries the ports a flow is
//! found by, so the translation it got is remembered under the datagram's
//! (source, destination, IP id, protocol) and applied to the fragments that
//! follow. A later fragment whose first one was never seen is dropped: it
//! could only leave untranslated.

use aya_ebpf::bindings::BPF_ANY;
use egress_common::flow::{FragEntryV4, FragKeyV4};

use crate::{
    maps::{FRAG_SCRATCH_V6, FRAGS_V4, FRAGS_V6, FragScratchV6},
    parse::Ipv4Frame,
    parse6::{Fragment, Ipv6Frame},
};

/// The datagram's key, from the header as it arrived (before translation).
#[inline(always)]
fn key(frame: &Ipv4Frame, direction: u8, zone: u16) -> FragKeyV4 {
    let ip = frame.ip();
    FragKeyV4 {
        src: ip.src_addr,
        dst: ip.dst_addr,
        id: u16::from_ne_bytes(ip.id),
        proto: ip.proto,
        direction,
        zone,
        _pad: [0; 2],
    }
}

/// Records a first fragment's translation; call before rewriting it.
#[inline(always)]
pub fn remember(
    frame: &Ipv4Frame,
    direction: u8,
    zone: u16,
    nat_addr: [u8; 4],
    tenant: u16,
    now: u64,
) {
    let entry = FragEntryV4 {
        nat_addr,
        tenant,
        _pad: [0; 2],
        created_ns: now,
    };
    // A full LRU map evicts the oldest datagram; losing one only drops the
    // rest of that datagram.
    let _ = FRAGS_V4.insert(key(frame, direction, zone), entry, u64::from(BPF_ANY));
}

/// The translation of the datagram a later fragment belongs to.
#[inline(always)]
pub fn recall(frame: &Ipv4Frame, direction: u8, zone: u16) -> Option<FragEntryV4> {
    // SAFETY: map value pointer returned by the kernel.
    FRAGS_V4
        .get_ptr(key(frame, direction, zone))
        .map(|entry| unsafe { *entry })
}

/// This CPU's scratch, its key set to the IPv6 datagram's (as it arrived).
#[inline(always)]
fn scratch_v6(
    frame: &Ipv6Frame,
    fragment: Fragment,
    direction: u8,
    zone: u16,
) -> Option<&'static mut FragScratchV6> {
    let scratch = FRAG_SCRATCH_V6.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; programs do not interrupt each other on a CPU.
    let scratch = unsafe { &mut *scratch };
    let ip = frame.ip();
    scratch.key.src = ip.src_addr;
    scratch.key.dst = ip.dst_addr;
    scratch.key.id = fragment.id;
    scratch.key.direction = direction;
    scratch.key._pad = 0;
    scratch.key.zone = zone;
    Some(scratch)
}

/// `remember` for an IPv6 first fragment; call before rewriting it.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key and entry live in map memory; by value they would be copied to the stack"
)]
pub fn remember_v6(
    frame: &Ipv6Frame,
    fragment: Fragment,
    (direction, zone): (u8, u16),
    nat_addr: &[u8; 16],
    tenant: u16,
    now: u64,
) {
    let Some(scratch) = scratch_v6(frame, fragment, direction, zone) else {
        return;
    };
    scratch.entry.nat_addr = *nat_addr;
    scratch.entry.tenant = tenant;
    scratch.entry._pad = [0; 6];
    scratch.entry.created_ns = now;
    let _ = FRAGS_V6.insert(&scratch.key, &scratch.entry, u64::from(BPF_ANY));
}

/// The address a later IPv6 fragment's datagram was translated to.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key lives in map memory; by value it would be copied to the stack"
)]
pub fn recall_v6(
    frame: &Ipv6Frame,
    fragment: Fragment,
    direction: u8,
    zone: u16,
) -> Option<[u8; 16]> {
    let scratch = scratch_v6(frame, fragment, direction, zone)?;
    // SAFETY: map value pointer returned by the kernel.
    FRAGS_V6
        .get_ptr(&scratch.key)
        .map(|entry| unsafe { (*entry).nat_addr })
}
