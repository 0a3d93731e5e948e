//! Conntrack: find a flow's entry, create both halves of a new flow, and keep
//! each half's clock, counters and TCP flags current.
//!
//! A new flow claims its translated port by inserting the reply half first
//! with BPF_NOEXIST: the insert itself is the test that no other flow to the
//! same remote endpoint uses that egress address and port, so one port serves
//! many destinations. The outbound half goes in second; if another CPU won
//! the race for the same flow, ours is rolled back and theirs is used.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use egress_common::{
    counters::Counter,
    flow::{DIR_REPLY, FlowEntryV4, FlowKeyV4, REPLY_ZONE, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::maps::CONNTRACK_V4;

/// Ports tried after the random start before a new flow gives up. Ranges no
/// larger than this are searched exhaustively.
pub const MAX_PORT_PROBES: u32 = 32;

const EEXIST: i32 = 17;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn lookup(key: &FlowKeyV4) -> Option<*mut FlowEntryV4> {
    CONNTRACK_V4.get_ptr_mut(key)
}

/// Counts a packet of `ip_len` bytes on one half of a flow.
#[inline(always)]
pub fn touch(entry: *mut FlowEntryV4, now: u64, ip_len: u16, tcp_flags: u8) {
    // SAFETY: `entry` came from a map lookup in this program run. The BPF
    // target has no atomic read-modify-write in `core`; a flow's packets
    // arrive on one CPU (RSS hashes the tuple), so a lost increment between
    // CPUs is rare and only ever touches statistics.
    unsafe {
        (*entry).last_seen_ns = now;
        (*entry).packets += 1;
        (*entry).bytes += u64::from(ip_len);
        let seen = tcp_flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK);
        if seen & !(*entry).tcp_flags != 0 {
            (*entry).tcp_flags |= seen;
        }
    }
}

/// A SYN without ACK on a flow that already ended starts a new connection
/// with the same tuple: both halves forget the old one's flags.
#[inline(always)]
pub fn reopen_if_closed(key: &FlowKeyV4, entry: *mut FlowEntryV4, tcp_flags: u8) {
    // SAFETY: as in `touch`.
    unsafe {
        if tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
            || (*entry).tcp_flags & (TCP_FIN | TCP_RST) == 0
        {
            return;
        }
        (*entry).tcp_flags = 0;
        let peer = key.peer_key(&*entry);
        if let Some(peer_entry) = CONNTRACK_V4.get_ptr_mut(peer) {
            (*peer_entry).tcp_flags = 0;
        }
    }
}

/// What a new flow translates to, before its entries exist.
pub struct Translation {
    pub addr: [u8; 4],
    pub port_min: u16,
    pub port_max: u16,
}

/// Creates both halves of the flow `key` and returns its outbound half.
#[inline(always)]
pub fn create_outbound(
    key: &FlowKeyV4,
    translation: &Translation,
    ingress_ifindex: u32,
    now: u64,
) -> Result<*mut FlowEntryV4, Counter> {
    let reply_entry = FlowEntryV4 {
        created_ns: now,
        last_seen_ns: now,
        nat_addr: key.src,
        nat_port: key.src_port,
        tenant: key.zone,
        ..FlowEntryV4::default()
    };
    let mut reply_key = FlowKeyV4 {
        src: key.dst,
        dst: translation.addr,
        src_port: key.dst_port,
        dst_port: 0,
        proto: key.proto,
        direction: DIR_REPLY,
        zone: REPLY_ZONE,
    };
    // The agent keeps port_min <= port_max; a torn read must not divide by 0.
    let Some(width) = translation.port_max.checked_sub(translation.port_min) else {
        return Err(Counter::OutDropPortsExhausted);
    };
    let span = u32::from(width) + 1;
    // SAFETY: helper without arguments.
    let start = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() } % span;
    let probes = if span < MAX_PORT_PROBES {
        span
    } else {
        MAX_PORT_PROBES
    };
    let mut claimed = false;
    for attempt in 0..MAX_PORT_PROBES {
        if attempt >= probes {
            break;
        }
        let port = u32::from(translation.port_min) + (start + attempt) % span;
        reply_key.dst_port = (port as u16).to_be();
        match CONNTRACK_V4.insert(reply_key, reply_entry, u64::from(BPF_NOEXIST)) {
            Ok(()) => {
                claimed = true;
                break;
            }
            Err(err) if err == -EEXIST => {}
            Err(_) => return Err(Counter::OutDropConntrackFull),
        }
    }
    if !claimed {
        return Err(Counter::OutDropPortsExhausted);
    }

    let outbound_entry = FlowEntryV4 {
        nat_addr: translation.addr,
        nat_port: reply_key.dst_port,
        ifindex: ingress_ifindex,
        ..reply_entry
    };
    match CONNTRACK_V4.insert(key, outbound_entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(err) => {
            // Whether another CPU created this flow first or the map refused
            // us, the claimed port must not outlive this attempt.
            let _ = CONNTRACK_V4.remove(reply_key);
            if err != -EEXIST {
                return Err(Counter::OutDropConntrackFull);
            }
        }
    }
    lookup(key).ok_or(Counter::OutDropConntrackFull)
}
