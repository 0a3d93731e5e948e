//! Fragments: only a datagram's first fragment carries the ports a flow is
//! found by, so the translation it got is remembered under the datagram's
//! (source, destination, IP id, protocol) and applied to the fragments that
//! follow. A later fragment whose first one was never seen is dropped: it
//! could only leave untranslated.

use aya_ebpf::bindings::BPF_ANY;
use egress_common::flow::{FragEntryV4, FragKeyV4};

use crate::{maps::FRAGS_V4, parse::Ipv4Frame};

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
