//! Conntrack: find a flow's entry, create both halves of a new flow, and keep
//! each half's clock, counters and TCP flags current.
//!
//! A new flow claims its translated port by inserting the reply half first
//! with BPF_NOEXIST: the insert itself is the test that no other flow to the
//! same remote endpoint uses that egress address and port, so one port serves
//! many destinations. The outbound half goes in second; if another CPU won
//! the race for the same flow, ours is rolled back and theirs is used.

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use egress_common::{
    counters::Counter,
    flow::{
        DIR_OUTBOUND, DIR_REPLY, FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6, REPLY_ZONE,
        TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, seconds_of,
    },
    inbound::{FLOW_F_INBOUND, ForwardKeyV4, ForwardV4, ForwardV6},
};

use crate::{
    forward::{self, Route},
    maps::{CONNTRACK_V4, CONNTRACK_V6, NEW_FLOW_V6, NewFlowV6, PORT_FWD_V4},
    parse::{Ipv4Frame, Transport},
    parse6::Ipv6Frame,
    zero,
};

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

#[inline(always)]
pub fn lookup_v6(key: &FlowKeyV6) -> Option<*mut FlowEntryV6> {
    CONNTRACK_V6.get_ptr_mut(key)
}

/// A flow half of either family: the clock, counters and flags `touch`
/// keeps, which both entries name alike.
pub trait FlowHalf {
    /// (last_seen_ns, packets, bytes, tcp_flags)
    fn counts(&mut self) -> (&mut u64, &mut u64, &mut u64, &mut u8);
}

macro_rules! flow_half {
    ($entry:ty) => {
        impl FlowHalf for $entry {
            #[inline(always)]
            fn counts(&mut self) -> (&mut u64, &mut u64, &mut u64, &mut u8) {
                (
                    &mut self.last_seen_ns,
                    &mut self.packets,
                    &mut self.bytes,
                    &mut self.tcp_flags,
                )
            }
        }
    };
}
flow_half!(FlowEntryV4);
flow_half!(FlowEntryV6);

/// Counts a packet of `ip_len` bytes on one half of a flow.
#[inline(always)]
pub fn touch(entry: *mut impl FlowHalf, now: u64, ip_len: u16, tcp_flags: u8) {
    // SAFETY: `entry` came from a map lookup in this program run. The BPF
    // target has no atomic read-modify-write in `core`; a flow's packets
    // arrive on one CPU (RSS hashes the tuple), so a lost increment between
    // CPUs is rare and only ever touches statistics.
    let (last_seen_ns, packets, bytes, flags) = unsafe { (*entry).counts() };
    *last_seen_ns = now;
    *packets += 1;
    *bytes += u64::from(ip_len);
    let seen = tcp_flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK);
    if seen & !*flags != 0 {
        *flags |= seen;
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

/// `reopen_if_closed` for an IPv6 flow.
#[inline(always)]
pub fn reopen_if_closed_v6(key: &FlowKeyV6, entry: *mut FlowEntryV6, tcp_flags: u8) {
    // SAFETY: as in `touch`.
    unsafe {
        if tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
            || (*entry).tcp_flags & (TCP_FIN | TCP_RST) == 0
        {
            return;
        }
        (*entry).tcp_flags = 0;
        let peer = key.peer_key(&*entry);
        if let Some(peer_entry) = CONNTRACK_V6.get_ptr_mut(peer) {
            (*peer_entry).tcp_flags = 0;
        }
    }
}

/// What a new flow translates to, before its entries exist.
pub struct Translation {
    pub addr: [u8; 4],
    pub tenant: u16,
    pub port_min: u16,
    pub port_max: u16,
    /// Ports of `addr` may be forwarded inward: skip those.
    pub avoid_forwards: bool,
}

/// The key of the flow half a packet belongs to, as the packet arrived.
#[inline(always)]
pub fn key_of(frame: &Ipv4Frame, transport: &Transport, direction: u8, zone: u16) -> FlowKeyV4 {
    FlowKeyV4 {
        src: frame.ip().src_addr,
        dst: frame.ip().dst_addr,
        src_port: transport.src_port,
        dst_port: transport.dst_port,
        proto: frame.ip().proto,
        direction,
        zone,
    }
}

/// A fresh half of a flow, built in `slot`.
#[inline(always)]
fn new_entry(
    slot: &mut MaybeUninit<FlowEntryV4>,
    now: u64,
    nat_addr: [u8; 4],
    nat_port: u16,
    tenant: u16,
    zone: u16,
) -> &mut FlowEntryV4 {
    // SAFETY: a plain C struct of integers; all-zero is a valid entry.
    let entry = unsafe { zero::zeroed(slot) };
    entry.created_s = seconds_of(now);
    entry.last_seen_ns = now;
    entry.nat_addr = nat_addr;
    entry.nat_port = nat_port;
    entry.tenant = tenant;
    entry.zone = zone;
    entry
}

/// Creates both halves of the flow `key` and returns the egress address and
/// port it translates to, and whether this call created the flow (false:
/// another CPU did, and this packet joins it). `record_first` records the
/// packet that opens the flow on the outbound half before it is inserted, so
/// a new flow costs two map updates and no lookup of what was just written.
///
/// Both halves or neither: if the outbound half cannot be inserted, the
/// reply half already claimed is removed again before returning.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the reply key is reused by every probe; passed by value it would be copied to the stack again"
)]
pub fn create_outbound(
    key: &FlowKeyV4,
    translation: &Translation,
    now: u64,
    record_first: impl Fn(*mut FlowEntryV4),
) -> Result<(([u8; 4], u16), bool), Counter> {
    let mut reply_slot = MaybeUninit::uninit();
    let reply_entry: &FlowEntryV4 = new_entry(
        &mut reply_slot,
        now,
        key.src,
        key.src_port,
        translation.tenant,
        key.zone,
    );
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
        if translation.avoid_forwards && forwarded(translation.addr, reply_key.dst_port, key.proto)
        {
            continue;
        }
        match CONNTRACK_V4.insert(&reply_key, reply_entry, u64::from(BPF_NOEXIST)) {
            Ok(()) => {
                claimed = true;
                break;
            }
            Err(err) if err == -EEXIST => {}
            // E2BIG: the table is full. Nothing is evicted for a new flow.
            Err(_) => return Err(Counter::OutDropConntrackFull),
        }
    }
    if !claimed {
        return Err(Counter::OutDropPortsExhausted);
    }

    let mut outbound_slot = MaybeUninit::uninit();
    let outbound_entry = new_entry(
        &mut outbound_slot,
        now,
        translation.addr,
        reply_key.dst_port,
        translation.tenant,
        key.zone,
    );
    record_first(outbound_entry);
    let translated = (outbound_entry.nat_addr, outbound_entry.nat_port);
    match CONNTRACK_V4.insert(key, outbound_entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok((translated, true)),
        Err(err) => {
            // Whether another CPU created this flow first or the map refused
            // us, the claimed port must not outlive this attempt.
            let _ = CONNTRACK_V4.remove(&reply_key);
            if err != -EEXIST {
                return Err(Counter::OutDropConntrackFull);
            }
            // The flow the other CPU created carries this packet instead.
            let winner = lookup(key).ok_or(Counter::OutDropConntrackFull)?;
            record_first(winner);
            // SAFETY: map value pointer returned by the kernel.
            Ok((unsafe { ((*winner).nat_addr, (*winner).nat_port) }, false))
        }
    }
}

/// Whether `port` (network order) of `addr` is forwarded inward for
/// `proto`: the allocator never hands such a port to an outbound flow.
#[inline(always)]
fn forwarded(addr: [u8; 4], port: u16, proto: u8) -> bool {
    let key = ForwardKeyV4 {
        addr,
        port,
        proto,
        _pad: 0,
    };
    PORT_FWD_V4.get_ptr(key).is_some()
}

/// Creates both halves of a flow opened from outside by `forward`: `key`
/// is the packet's own (reply-direction) key, and the host's port is the
/// forward's, or the packet's destination port for a floating IP. Returns
/// the outbound half's key if this call created the flow (`None`: another
/// CPU did just now).
///
/// Both halves or neither, as for outbound flows: the reply half goes in
/// first, and is removed again if the outbound half cannot be inserted
/// (the host already has a flow with that tuple).
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "passed by value the keys and entries would be copied to the stack again"
)]
pub fn create_inbound(
    key: &FlowKeyV4,
    forward: &ForwardV4,
    now: u64,
) -> Result<Option<FlowKeyV4>, Counter> {
    let host_port = if forward.host_port == 0 {
        key.dst_port
    } else {
        forward.host_port
    };
    let mut reply_slot = MaybeUninit::uninit();
    let reply_entry = new_entry(
        &mut reply_slot,
        now,
        forward.host,
        host_port,
        forward.tenant,
        forward.zone,
    );
    reply_entry.flags = FLOW_F_INBOUND;
    match CONNTRACK_V4.insert(key, &*reply_entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(err) if err == -EEXIST => return Ok(None),
        Err(_) => return Err(Counter::InDropConntrackFull),
    }
    let outbound_key = FlowKeyV4 {
        src: forward.host,
        dst: key.src,
        src_port: host_port,
        dst_port: key.src_port,
        proto: key.proto,
        direction: DIR_OUTBOUND,
        zone: forward.zone,
    };
    let mut outbound_slot = MaybeUninit::uninit();
    let outbound_entry = new_entry(
        &mut outbound_slot,
        now,
        key.dst,
        key.dst_port,
        forward.tenant,
        forward.zone,
    );
    outbound_entry.flags = FLOW_F_INBOUND;
    if CONNTRACK_V4
        .insert(&outbound_key, &*outbound_entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        let _ = CONNTRACK_V4.remove(key);
        return Err(Counter::InDropForwardBusy);
    }
    Ok(Some(outbound_key))
}

/// The key of an IPv6 flow half a packet belongs to, as it arrived.
#[inline(always)]
pub fn key_of_v6(frame: &Ipv6Frame, transport: &Transport, direction: u8, zone: u16) -> FlowKeyV6 {
    FlowKeyV6 {
        src: frame.ip().src_addr,
        dst: frame.ip().dst_addr,
        src_port: transport.src_port,
        dst_port: transport.dst_port,
        proto: frame.proto,
        direction,
        zone,
    }
}

/// What a new IPv6 flow translates to, and the packet that opens it
/// (recorded on the outbound half before it is inserted).
pub struct TranslationV6 {
    pub addr: [u8; 16],
    pub tenant: u16,
    pub port_min: u16,
    pub port_max: u16,
    pub now: u64,
    pub ip_len: u16,
    pub tcp_flags: u8,
    pub route: Route,
}

/// A fresh half of an IPv6 flow, written over `entry`.
#[inline(always)]
fn init_entry_v6(
    entry: &mut FlowEntryV6,
    now: u64,
    nat_addr: [u8; 16],
    nat_port: u16,
    tenant: u16,
    zone: u16,
) {
    // SAFETY: a plain C struct of integers; all-zero is a valid entry.
    *entry = unsafe { core::mem::zeroed() };
    entry.created_s = seconds_of(now);
    entry.last_seen_ns = now;
    entry.nat_addr = nat_addr;
    entry.nat_port = nat_port;
    entry.tenant = tenant;
    entry.zone = zone;
}

/// Records the packet that opens a flow on its outbound half.
#[inline(always)]
fn record_first(entry: *mut FlowEntryV6, translation: &TranslationV6) {
    touch(
        entry,
        translation.now,
        translation.ip_len,
        translation.tcp_flags,
    );
    forward::remember_route(entry, &translation.route, translation.now);
}

/// `create_outbound` for IPv6: the same claim of a port by inserting the
/// reply half first, in `CONNTRACK_V6`. Forwarded ports are not skipped
/// (a lookup per probe is more than the verifier takes in this program):
/// as in the kernel's NAT, the reply half's whole tuple is what must be
/// unique, and an outbound flow and an inbound one never share it.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the keys and entries live in map memory; passed by value they would be copied to the stack, which has no room for them"
)]
pub fn create_outbound_v6(
    key: &FlowKeyV6,
    translation: &TranslationV6,
) -> Result<(([u8; 16], u16), bool), Counter> {
    let now = translation.now;
    // The new halves and the reply key live in a per-CPU map: the new-flow
    // program's stack has no room for two 80-byte entries beside the rest.
    let scratch = NEW_FLOW_V6
        .get_ptr_mut(0)
        .ok_or(Counter::OutDropConntrackFull)?;
    // SAFETY: this CPU's slot; programs do not interrupt each other on a CPU.
    let NewFlowV6 {
        reply_key,
        reply: reply_entry,
        outbound: outbound_entry,
        ..
    } = unsafe { &mut *scratch };
    init_entry_v6(
        reply_entry,
        now,
        key.src,
        key.src_port,
        translation.tenant,
        key.zone,
    );
    *reply_key = FlowKeyV6 {
        src: key.dst,
        dst: translation.addr,
        src_port: key.dst_port,
        dst_port: 0,
        proto: key.proto,
        direction: DIR_REPLY,
        zone: REPLY_ZONE,
    };
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
        match CONNTRACK_V6.insert(&*reply_key, &*reply_entry, u64::from(BPF_NOEXIST)) {
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

    init_entry_v6(
        outbound_entry,
        now,
        translation.addr,
        reply_key.dst_port,
        translation.tenant,
        key.zone,
    );
    record_first(outbound_entry, translation);
    let translated = (outbound_entry.nat_addr, outbound_entry.nat_port);
    match CONNTRACK_V6.insert(key, &*outbound_entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok((translated, true)),
        Err(err) => {
            let _ = CONNTRACK_V6.remove(&*reply_key);
            if err != -EEXIST {
                return Err(Counter::OutDropConntrackFull);
            }
            let winner = lookup_v6(key).ok_or(Counter::OutDropConntrackFull)?;
            record_first(winner, translation);
            // SAFETY: map value pointer returned by the kernel.
            Ok((unsafe { ((*winner).nat_addr, (*winner).nat_port) }, false))
        }
    }
}

/// `create_inbound` for IPv6: both halves in `CONNTRACK_V6`, built in this
/// CPU's new-flow scratch (two 80-byte entries do not fit beside the reply
/// program's own stack).
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the keys and entries live in map memory; passed by value they would be copied to the stack, which has no room for them"
)]
pub fn create_inbound_v6(
    key: &FlowKeyV6,
    forward: &ForwardV6,
    now: u64,
) -> Result<Option<&'static FlowKeyV6>, Counter> {
    let host_port = if forward.host_port == 0 {
        key.dst_port
    } else {
        forward.host_port
    };
    let scratch = NEW_FLOW_V6
        .get_ptr_mut(0)
        .ok_or(Counter::InDropConntrackFull)?;
    // SAFETY: this CPU's slot; programs do not interrupt each other on a CPU.
    let NewFlowV6 {
        reply_key: outbound_key,
        reply: reply_entry,
        outbound: outbound_entry,
        ..
    } = unsafe { &mut *scratch };
    init_entry_v6(
        reply_entry,
        now,
        forward.host,
        host_port,
        forward.tenant,
        forward.zone,
    );
    reply_entry.flags = FLOW_F_INBOUND;
    match CONNTRACK_V6.insert(key, &*reply_entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(err) if err == -EEXIST => return Ok(None),
        Err(_) => return Err(Counter::InDropConntrackFull),
    }
    *outbound_key = FlowKeyV6 {
        src: forward.host,
        dst: key.src,
        src_port: host_port,
        dst_port: key.src_port,
        proto: key.proto,
        direction: DIR_OUTBOUND,
        zone: forward.zone,
    };
    init_entry_v6(
        outbound_entry,
        now,
        key.dst,
        key.dst_port,
        forward.tenant,
        forward.zone,
    );
    outbound_entry.flags = FLOW_F_INBOUND;
    if CONNTRACK_V6
        .insert(&*outbound_key, &*outbound_entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        let _ = CONNTRACK_V6.remove(key);
        return Err(Counter::InDropForwardBusy);
    }
    Ok(Some(outbound_key))
}
