//! Forward: ask the kernel's FIB where a packet goes, then rewrite the
//! Ethernet header, decrement the TTL and redirect it there.
//!
//! The FIB answers with the route the kernel itself would use (policy rules
//! included, since the lookup carries the translated source), so the
//! dataplane never keeps its own copy of the routing table.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup_helper,
};
use egress_common::{
    config::ROLE_EXTERNAL,
    flow::{FlowEntryV4, FlowEntryV6, ROUTE_CACHE_TICKS, ROUTE_TICK_SHIFT},
};
use network_types::eth::EthHdr;

use egress_common::counters::Counter;

use crate::{
    csum,
    hook::{ChecksumFix, Hook},
    maps::{FIB_QUERY_V6, INTERFACES},
    parse::{Ipv4Frame, Transport},
    parse6::Ipv6Frame,
    verdict::Verdict,
    zero,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where the kernel would send a packet.
#[derive(Clone, Copy)]
pub enum Route {
    /// Next hop resolved: send it there.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
        mtu: u16,
    },
    /// Route found, next hop's MAC not yet known.
    NoNeighbour { ifindex: u32 },
    /// Route found, but the packet exceeds its MTU.
    TooBig { ifindex: u32 },
    /// Local delivery, unreachable, blackhole, forwarding disabled...: the
    /// kernel decides.
    NotForwarded,
}

impl Route {
    /// The interface the route leaves through, if the packet would leave.
    #[inline(always)]
    pub fn ifindex(&self) -> Option<u32> {
        match *self {
            Route::Resolved { ifindex, .. }
            | Route::NoNeighbour { ifindex }
            | Route::TooBig { ifindex } => Some(ifindex),
            Route::NotForwarded => None,
        }
    }

    #[inline(always)]
    pub fn leaves_through(&self, role: u32) -> bool {
        self.ifindex()
            .is_some_and(|ifindex| role_of(ifindex) == role)
    }

    #[inline(always)]
    pub fn leaves_external(&self) -> bool {
        self.leaves_through(ROLE_EXTERNAL)
    }
}

/// A flow half that caches its next hop: both families' entries, whose
/// route fields have the same names.
pub trait RouteCache {
    fn cached(&self) -> (u32, u16, [u8; 6], [u8; 6], u32);
    fn cache(&mut self, ifindex: u32, mtu: u16, smac: [u8; 6], dmac: [u8; 6], checked: u32);
}

macro_rules! route_cache {
    ($entry:ty) => {
        impl RouteCache for $entry {
            #[inline(always)]
            fn cached(&self) -> (u32, u16, [u8; 6], [u8; 6], u32) {
                (
                    self.route_ifindex,
                    self.route_mtu,
                    self.route_smac,
                    self.route_dmac,
                    self.route_checked,
                )
            }

            #[inline(always)]
            fn cache(
                &mut self,
                ifindex: u32,
                mtu: u16,
                smac: [u8; 6],
                dmac: [u8; 6],
                checked: u32,
            ) {
                self.route_ifindex = ifindex;
                self.route_smac = smac;
                self.route_dmac = dmac;
                self.route_mtu = mtu;
                self.route_checked = checked;
            }
        }
    };
}
route_cache!(FlowEntryV4);
route_cache!(FlowEntryV6);

/// The flow half's cached next hop, if it is fresh and the packet (each segment of a GSO packet) fits
/// its MTU; otherwise the caller asks the FIB (which also answers "too big").
/// A cached route already passed the caller's checks of where it leads, so
/// an interface's changed role reaches it within `ROUTE_CACHE_TICKS` too.
#[inline(always)]
fn cached_route(entry: *const impl RouteCache, now: u64, wire_len: u16) -> Option<Route> {
    // SAFETY: map value pointer returned by the kernel. Another CPU
    // refreshing the cache at the same moment writes the same answer.
    let (ifindex, mtu, smac, dmac, checked) = unsafe { (*entry).cached() };
    if mtu == 0 || wire_len > mtu || route_tick(now).wrapping_sub(checked) >= ROUTE_CACHE_TICKS {
        return None;
    }
    Some(Route::Resolved {
        ifindex,
        smac,
        dmac,
        mtu,
    })
}

#[inline(always)]
fn route_tick(now: u64) -> u32 {
    (now >> ROUTE_TICK_SHIFT) as u32
}

/// A flow half's next hop: the cached one, or what `lookup` finds (and
/// accepts), which is then cached. `lookup`'s error ends the packet.
#[inline(always)]
pub fn flow_route<E>(
    entry: *mut impl RouteCache,
    now: u64,
    wire_len: u16,
    lookup: impl FnOnce() -> Result<Route, E>,
) -> Result<Route, E> {
    if let Some(route) = cached_route(entry, now, wire_len) {
        return Ok(route);
    }
    let route = lookup()?;
    remember_route(entry, &route, now);
    Ok(route)
}

/// Caches a resolved next hop in the flow half it was looked up for.
#[inline(always)]
pub fn remember_route(entry: *mut impl RouteCache, route: &Route, now: u64) {
    if let Route::Resolved {
        ifindex,
        smac,
        dmac,
        mtu,
    } = *route
    {
        // SAFETY: as in `cached_route`.
        unsafe { (*entry).cache(ifindex, mtu, smac, dmac, route_tick(now)) };
    }
}

#[inline(always)]
pub fn role_of(ifindex: u32) -> u32 {
    // SAFETY: map value pointer returned by the kernel.
    INTERFACES
        .get_ptr(ifindex)
        .map_or(0, |info| unsafe { (*info).role })
}

/// Looks up the route for the packet as it will be after translation: from
/// `src` to `dst`, arriving on `ingress_ifindex`. `ports` (network order) only
/// matter to policy rules that match on them. `wire_len` is what the route's
/// MTU is checked against: the packet's length, or a GSO packet's segment
/// length (see `wire_len`).
#[inline(always)]
pub fn route_v4<H: Hook>(
    ctx: &H,
    frame: &Ipv4Frame,
    ingress_ifindex: u32,
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    wire_len: u16,
) -> Route {
    let ip = frame.ip();
    let mut slot = MaybeUninit::uninit();
    let params = fib_query_v4(&mut slot, ip.proto, ip.tos, src, dst, ingress_ifindex);
    params.sport = ports.0;
    params.dport = ports.1;
    params.__bindgen_anon_1.tot_len = wire_len;

    match fib_lookup(ctx, params) {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Resolved {
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
            // SAFETY: on success the kernel stores the route's MTU here.
            mtu: unsafe { params.__bindgen_anon_1.mtu_result },
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour {
            ifindex: params.ifindex,
        },
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // The MTU check answers before the route's device is known: ask
            // again without a length to learn where it would have gone.
            params.__bindgen_anon_1.tot_len = 0;
            params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
            params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
            params.ifindex = ingress_ifindex;
            match fib_lookup(ctx, params) {
                // From TC, a lookup without a length checks the skb against
                // the route's device instead, and a device narrower than the
                // packet answers FRAG_NEEDED again, having named the device.
                BPF_FIB_LKUP_RET_SUCCESS
                | BPF_FIB_LKUP_RET_NO_NEIGH
                | BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig {
                    ifindex: params.ifindex,
                },
                _ => Route::NotForwarded,
            }
        }
        _ => Route::NotForwarded,
    }
}

/// Where the kernel would send the packet as it is, untranslated: what a
/// program asks before leaving a packet that is not its own to the kernel.
#[inline(always)]
pub fn route_as_is<H: Hook>(ctx: &H, frame: &Ipv4Frame, ingress_ifindex: u32) -> Route {
    let ip = frame.ip();
    route_v4(
        ctx,
        frame,
        ingress_ifindex,
        ip.src_addr,
        ip.dst_addr,
        (0, 0),
        frame.tot_len(),
    )
}

/// `route_v4` for IPv6: from `src` to `dst` (the translated packet's),
/// arriving on `ingress_ifindex`. The query lives in a per-CPU map, not on
/// the stack: the IPv6 programs' keys and addresses leave no room there.
#[inline(always)]
pub fn route_v6<H: Hook>(
    ctx: &H,
    frame: &Ipv6Frame,
    ingress_ifindex: u32,
    src: &[u8; 16],
    dst: &[u8; 16],
    ports: (u16, u16),
    wire_len: u16,
) -> Route {
    let Some(params) = FIB_QUERY_V6.get_ptr_mut(0) else {
        return Route::NotForwarded;
    };
    // SAFETY: this CPU's slot; programs do not interrupt each other on a CPU.
    let params = unsafe { &mut *params };
    fib_query_v6(params, frame.proto, src, dst, ingress_ifindex, ports);
    params.__bindgen_anon_1.tot_len = wire_len;
    match fib_lookup(ctx, params) {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Resolved {
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
            // SAFETY: on success the kernel stores the route's MTU here.
            mtu: unsafe { params.__bindgen_anon_1.mtu_result },
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour {
            ifindex: params.ifindex,
        },
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // As for IPv4: ask again without a length to learn the device.
            fib_query_v6(params, frame.proto, src, dst, ingress_ifindex, ports);
            match fib_lookup(ctx, params) {
                BPF_FIB_LKUP_RET_SUCCESS
                | BPF_FIB_LKUP_RET_NO_NEIGH
                | BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig {
                    ifindex: params.ifindex,
                },
                _ => Route::NotForwarded,
            }
        }
        _ => Route::NotForwarded,
    }
}

/// An IPv6 FIB query, written over whatever the last one left.
#[inline(always)]
pub fn fib_query_v6(
    params: &mut bpf_fib_lookup,
    proto: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    ifindex: u32,
    ports: (u16, u16),
) {
    // SAFETY: all-zero is the lookup struct's documented initial state.
    *params = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.l4_protocol = proto;
    params.__bindgen_anon_3.ipv6_src = words(src);
    params.__bindgen_anon_4.ipv6_dst = words(dst);
    params.ifindex = ifindex;
    params.sport = ports.0;
    params.dport = ports.1;
}

/// `route_as_is` for IPv6.
#[inline(always)]
pub fn route_as_is_v6<H: Hook>(ctx: &H, frame: &Ipv6Frame, ingress_ifindex: u32) -> Route {
    let ip = frame.ip();
    route_v6(
        ctx,
        frame,
        ingress_ifindex,
        &ip.src_addr,
        &ip.dst_addr,
        (0, 0),
        frame.ip_len(),
    )
}

/// An IPv6 address as the FIB query's four words (bytes kept in order).
#[inline(always)]
pub fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// An IPv4 FIB query from `src` to `dst` arriving on `ifindex`, built in
/// `slot` (zeroed inline: see `zero`); callers add what else they know.
#[inline(always)]
pub fn fib_query_v4(
    slot: &mut MaybeUninit<bpf_fib_lookup>,
    proto: u8,
    tos: u8,
    src: [u8; 4],
    dst: [u8; 4],
    ifindex: u32,
) -> &mut bpf_fib_lookup {
    // SAFETY: a plain C struct; all-zero is its documented initial state.
    let params = unsafe { zero::zeroed(slot) };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_2.tos = tos;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    params.ifindex = ifindex;
    params
}

/// Asks the FIB (from XDP or TC); returns its `BPF_FIB_LKUP_RET_*` answer.
#[inline(always)]
pub fn fib_lookup(ctx: &impl EbpfContext, params: &mut bpf_fib_lookup) -> u32 {
    // SAFETY: `params` is a valid, fully initialised lookup struct.
    let ret =
        unsafe { fib_lookup_helper(ctx.as_ptr(), params, size_of::<bpf_fib_lookup>() as i32, 0) };
    ret as u32
}

/// One router hop: TTL down by one, IPv4 checksum adjusted. Callers have
/// already refused packets whose TTL would expire here.
#[inline(always)]
pub fn decrement_ttl(frame: &Ipv4Frame) {
    // SAFETY: header pointer bounds-checked by the parser.
    let ip = unsafe { &mut *frame.ip };
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = csum::replace16(ip.check, old, new);
}

/// One router hop for IPv6: the hop limit down by one (no header checksum
/// to adjust). Callers have already refused packets whose limit ends here.
#[inline(always)]
pub fn decrement_hop_limit(frame: &Ipv6Frame) {
    // SAFETY: header pointer bounds-checked by the parser.
    unsafe { (*frame.ip).hop_limit -= 1 };
}

/// Addresses the frame to a resolved next hop.
#[inline(always)]
pub fn set_macs(eth: *mut EthHdr, smac: [u8; 6], dmac: [u8; 6]) {
    // SAFETY: header pointer bounds-checked by the parser.
    let eth = unsafe { &mut *eth };
    eth.src_addr = smac;
    eth.dst_addr = dmac;
}

/// The size of each packet this one becomes on the wire, for MTU checks.
#[inline(always)]
pub fn wire_len<H: Hook>(ctx: &H, frame: &Ipv4Frame, transport: &Transport) -> u16 {
    let headers = frame.l4_offset - EthHdr::LEN + transport.header_len;
    ctx.wire_len(frame.tot_len(), headers)
}

/// `wire_len` for IPv6.
#[inline(always)]
pub fn wire_len_v6<H: Hook>(ctx: &H, frame: &Ipv6Frame, transport: &Transport) -> u16 {
    let headers = frame.l4_offset - EthHdr::LEN + transport.header_len;
    ctx.wire_len(frame.ip_len(), headers)
}

/// Sends a translated packet on to its next hop: straight there when the
/// MAC is known, through the kernel's neighbour resolution where the hook
/// can. `None` when the kernel must take it instead. The owed checksum
/// update is applied either way, after every other write.
#[inline(always)]
pub fn out<H: Hook>(
    ctx: &H,
    eth: *mut EthHdr,
    route: Route,
    fix: Option<impl ChecksumFix>,
    counter: Counter,
    neigh_counter: Counter,
) -> Option<Verdict> {
    if let Route::Resolved { smac, dmac, .. } = route {
        set_macs(eth, smac, dmac);
    }
    if let Some(fix) = fix {
        fix.apply(ctx);
    }
    match route {
        Route::Resolved { ifindex, .. } => {
            Some(Verdict::redirected(ctx.redirect(ifindex), counter))
        }
        Route::NoNeighbour { ifindex } => ctx
            .redirect_neigh(ifindex)
            .map(|action| Verdict::redirected(action, neigh_counter)),
        _ => None,
    }
}

/// Whether `out` sends a packet on this route itself (so the caller
/// decrements its TTL) rather than leaving it to the kernel.
#[inline(always)]
pub fn sends_itself<H: Hook>(route: &Route) -> bool {
    match route {
        Route::Resolved { .. } => true,
        Route::NoNeighbour { .. } => H::RESOLVES_NEIGHBOURS,
        _ => false,
    }
}
