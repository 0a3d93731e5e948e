//! The two hooks the packet path runs on, and everything that differs
//! between them. The stages (`outbound`, `reply` and what they call) are
//! written once against [`Hook`] and compiled for each.
//!
//! - **XDP** sees the frame before the kernel made a socket buffer of it:
//!   the fastest, but only right for frames from the wire (complete
//!   checksums, one packet per frame) and redirect targets that take XDP
//!   frames. The agent picks it only where both hold.
//! - **TC** sees the socket buffer: packets from co-located senders with
//!   `CHECKSUM_PARTIAL`, GSO super-packets up to 64 KB, and any redirect
//!   target. Its L4 checksum updates go through the kernel's helpers,
//!   which know the skb's checksum state; its MTU checks judge a GSO
//!   packet by its segments.
//!
//! What stays the same on both: headers are read and written through
//! direct packet access, and the IPv4 header, ICMP and quoted-packet
//! checksums are updated by hand (their bytes are never offloaded, and a
//! change and its checksum adjustment cancel in `CHECKSUM_COMPLETE`'s sum).
//! Only TCP and UDP checksums, which a sender may leave partial, differ:
//! their update is handed to the hook as an [`L4Fix`] and applied last, so
//! on TC the helper calls that invalidate packet pointers come after every
//! direct access.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    cty::c_void,
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

use crate::{
    csum,
    maps::{V6_PROGRAMS_TC, V6_PROGRAMS_XDP},
};

/// A TCP or UDP checksum update owed after a translation: an address of
/// the pseudo-header and a port changed.
pub struct L4Fix {
    /// The checksum field, and its offset from the frame's start (TC).
    pub check: *mut [u8; 2],
    pub check_offset: usize,
    pub old_addr: [u8; 4],
    pub new_addr: [u8; 4],
    pub old_port: u16,
    pub new_port: u16,
    /// UDP: a zero checksum means "none" and stays zero.
    pub udp: bool,
}

/// The IPv6 counterpart of [`L4Fix`]: an address of the pseudo-header
/// changed (as a `csum::diff128` sum, 16 bytes being too wide for the
/// helpers' replace-one-field form) and a port. ICMPv6 needs it too: its
/// checksum covers the pseudo-header, unlike ICMP's.
pub struct L4FixV6 {
    pub check: *mut [u8; 2],
    pub check_offset: usize,
    pub addr_diff: u32,
    pub old_port: u16,
    pub new_port: u16,
    /// UDP: a zero checksum (invalid in IPv6, RFC 8200 8.1) stays zero
    /// rather than becoming a valid-looking one.
    pub udp: bool,
}

/// A checksum update owed after a translation, applied by the hook last.
pub trait ChecksumFix {
    fn apply<H: Hook>(&self, ctx: &H);
}

impl ChecksumFix for L4Fix {
    #[inline(always)]
    fn apply<H: Hook>(&self, ctx: &H) {
        ctx.finish_l4(self);
    }
}

impl ChecksumFix for L4FixV6 {
    #[inline(always)]
    fn apply<H: Hook>(&self, ctx: &H) {
        ctx.finish_l4_v6(self);
    }
}

/// `bpf_l4_csum_replace`: the change is IPv6's, whose addresses
/// `CHECKSUM_COMPLETE`'s sum covers without an IP header checksum
/// compensating (uapi `BPF_F_IPV6`, Linux 6.16 and the stable kernels the
/// fix went to; older kernels refuse the flag, see `finish_l4_v6`).
const BPF_F_IPV6: u64 = 1 << 7;

pub trait Hook: EbpfContext {
    /// Hands the packet to the kernel as it is now.
    const PASS: i32;
    /// Drops the packet.
    const DROP: i32;
    /// Whether `redirect_neigh` can send a packet itself.
    const RESOLVES_NEIGHBOURS: bool;
    /// Goes on in this hook's IPv6 program at `slot` (`V6_SLOT_*`);
    /// returns only if that program is not loaded.
    fn tail_call_v6(&self, slot: u32);

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length; beyond `data_end` when TC's skb carries
    /// paged data.
    fn len(&self) -> usize;
    fn ingress_ifindex(&self) -> u32;
    /// An 802.1Q tag the driver took out of the frame (TC only): such a
    /// packet belongs to a VLAN interface, not to the one we run on.
    fn vlan_tagged(&self) -> bool;
    /// Copies `len` bytes at `offset` into `to`; 0 on success.
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64;
    /// The size of each packet this one becomes on the wire: the IPv4
    /// length, or a GSO super-packet's segment (headers plus `gso_size`),
    /// which is what a route's MTU is checked against (the kernel's own
    /// forwarding does the same, `skb_gso_validate_network_len`).
    fn wire_len(&self, tot_len: u16, headers_len: usize) -> u16;
    /// Applies a TCP/UDP checksum update; the last write to the packet.
    fn finish_l4(&self, fix: &L4Fix);
    /// The same for IPv6 (TCP, UDP and ICMPv6).
    fn finish_l4_v6(&self, fix: &L4FixV6);
    /// Sends the packet out of `ifindex`, its Ethernet header already set.
    fn redirect(&self, ifindex: u32) -> i32;
    /// Sends a packet whose next hop's MAC is unknown out of `ifindex`
    /// through the kernel's neighbour resolution; `None` where the hook
    /// cannot (XDP: the packet goes up to `neigh_fallback` instead).
    fn redirect_neigh(&self, ifindex: u32) -> Option<i32>;
}

impl Hook for XdpContext {
    const PASS: i32 = XDP_PASS as i32;
    const DROP: i32 = XDP_DROP as i32;
    const RESOLVES_NEIGHBOURS: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        false
    }

    #[inline(always)]
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64 {
        // SAFETY: the caller's buffer holds `len` bytes.
        unsafe { bpf_xdp_load_bytes(self.ctx, offset, to, len) }
    }

    #[inline(always)]
    fn wire_len(&self, tot_len: u16, _headers_len: usize) -> u16 {
        tot_len
    }

    /// XDP cannot tell a partial checksum from a full one; frames from the
    /// wire carry full ones, which is why the agent keeps XDP to NICs.
    #[inline(always)]
    fn finish_l4(&self, fix: &L4Fix) {
        // SAFETY: bounds-checked by the parser; nothing invalidates XDP's
        // packet pointers.
        let check = unsafe { &mut *fix.check };
        if fix.udp && csum::word(*check) == 0 {
            return;
        }
        let updated = csum::replace32(*check, fix.old_addr, fix.new_addr);
        let updated = csum::replace16(updated, fix.old_port, fix.new_port);
        *check = if fix.udp {
            csum::udp_nonzero(updated)
        } else {
            updated
        };
    }

    #[inline(always)]
    fn finish_l4_v6(&self, fix: &L4FixV6) {
        // SAFETY: as in `finish_l4`.
        let check = unsafe { &mut *fix.check };
        if fix.udp && csum::word(*check) == 0 {
            return;
        }
        let updated = csum::apply_diff(*check, fix.addr_diff);
        let updated = csum::replace16(updated, fix.old_port, fix.new_port);
        *check = if fix.udp {
            csum::udp_nonzero(updated)
        } else {
            updated
        };
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> i32 {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }

    #[inline(always)]
    fn redirect_neigh(&self, _ifindex: u32) -> Option<i32> {
        None
    }

    #[inline(always)]
    fn tail_call_v6(&self, slot: u32) {
        // SAFETY: a tail call; on success nothing after it runs.
        unsafe { V6_PROGRAMS_XDP.tail_call(self, slot) };
    }
}

/// Headers TC pulls into the linear area before parsing: Ethernet, an IPv4
/// header with options and the quoted headers of an ICMP error.
const TC_PULL_LEN: u32 = 14 + 60 + 8 + 60 + 8;

/// Makes the headers readable through direct packet access; paged data
/// (a GSO packet's payload) stays where it is.
#[inline(always)]
pub fn tc_pull_headers(ctx: &TcContext) {
    let len = ctx.len();
    let want = if len < TC_PULL_LEN { len } else { TC_PULL_LEN };
    if ctx.data() + want as usize > ctx.data_end() {
        // A failed pull leaves the packet short; the parser then calls it
        // malformed, which is what it is to us.
        let _ = ctx.pull_data(want);
    }
}

impl Hook for TcContext {
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;
    const RESOLVES_NEIGHBOURS: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context pointer is the program's own skb.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn vlan_tagged(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }

    #[inline(always)]
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64 {
        // SAFETY: the caller's buffer holds `len` bytes.
        unsafe { bpf_skb_load_bytes(self.as_ptr(), offset, to, len) }
    }

    #[inline(always)]
    fn wire_len(&self, tot_len: u16, headers_len: usize) -> u16 {
        // SAFETY: as above.
        let gso_size = unsafe { (*self.skb.skb).gso_size };
        if gso_size == 0 {
            return tot_len;
        }
        let segment = headers_len as u32 + gso_size;
        if segment < u32::from(tot_len) {
            segment as u16
        } else {
            tot_len
        }
    }

    /// The helpers update a partial checksum's pseudo-header seed (and
    /// leave the port to the device that finishes it), a full checksum as
    /// such, and `skb->csum` of a `CHECKSUM_COMPLETE` packet.
    #[inline(always)]
    fn finish_l4(&self, fix: &L4Fix) {
        let mangled = if fix.udp {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        // Failures cannot happen for an offset the parser checked; the
        // helpers return an error only for one beyond the packet.
        let _ = self.l4_csum_replace(
            fix.check_offset,
            u64::from(u32::from_ne_bytes(fix.old_addr)),
            u64::from(u32::from_ne_bytes(fix.new_addr)),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        );
        let _ = self.l4_csum_replace(
            fix.check_offset,
            u64::from(fix.old_port),
            u64::from(fix.new_port),
            mangled | 2,
        );
    }

    #[inline(always)]
    fn finish_l4_v6(&self, fix: &L4FixV6) {
        let mangled = if fix.udp {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
        // A kernel without BPF_F_IPV6 refuses the call and changes nothing:
        // then the checksum itself is still updated without it (only a
        // CHECKSUM_COMPLETE skb's sum goes stale, which forwarding ignores).
        if self
            .l4_csum_replace(
                fix.check_offset,
                0,
                u64::from(fix.addr_diff),
                pseudo | BPF_F_IPV6,
            )
            .is_err()
        {
            let _ = self.l4_csum_replace(fix.check_offset, 0, u64::from(fix.addr_diff), pseudo);
        }
        let _ = self.l4_csum_replace(
            fix.check_offset,
            u64::from(fix.old_port),
            u64::from(fix.new_port),
            mangled | 2,
        );
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> i32 {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }

    #[inline(always)]
    fn redirect_neigh(&self, ifindex: u32) -> Option<i32> {
        // SAFETY: plain helper call; a null nexthop lets the kernel route.
        Some(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32)
    }

    #[inline(always)]
    fn tail_call_v6(&self, slot: u32) {
        // SAFETY: a tail call; on success nothing after it runs.
        unsafe { V6_PROGRAMS_TC.tail_call(self, slot) };
    }
}
