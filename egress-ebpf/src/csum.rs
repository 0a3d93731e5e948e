//! Internet checksum arithmetic for incremental updates (RFC 1624, eqn. 3).
//!
//! Words are taken straight from the wire bytes in native order and written
//! back the same way: a one's-complement sum does not care about byte order
//! as long as every word is treated alike, so nothing is swapped.

#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
pub fn word(bytes: [u8; 2]) -> u16 {
    u16::from_ne_bytes(bytes)
}

/// Checksum after one covered 16-bit word changes from `old` to `new`.
#[inline(always)]
pub fn replace16(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let sum = u32::from(!word(check)) + u32::from(!old) + u32::from(new);
    (!fold(sum)).to_ne_bytes()
}

/// Checksum after a covered 32-bit field (an IPv4 address) changes.
#[inline(always)]
pub fn replace32(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let sum = u32::from(!word(check))
        + u32::from(!word([old[0], old[1]]))
        + u32::from(!word([old[2], old[3]]))
        + u32::from(word([new[0], new[1]]))
        + u32::from(word([new[2], new[3]]));
    (!fold(sum)).to_ne_bytes()
}

/// UDP sends "no checksum" as 0 and a computed 0 as 0xffff (RFC 768).
#[inline(always)]
pub fn udp_nonzero(check: [u8; 2]) -> [u8; 2] {
    if word(check) == 0 {
        [0xff, 0xff]
    } else {
        check
    }
}

/// What changing a covered 128-bit field (an IPv6 address) adds to a
/// checksum's sum: the old words taken out, the new ones added, unfolded
/// (at most 16 words of 0xffff, so it fits 32 bits). TC hands it to
/// `bpf_l4_csum_replace` as is; XDP folds it in with `apply_diff`.
#[inline(always)]
pub fn diff128(old: &[u8; 16], new: &[u8; 16]) -> u32 {
    let mut sum = 0u32;
    let mut at = 0;
    while at < 16 {
        sum += u32::from(!word([old[at], old[at + 1]])) + u32::from(word([new[at], new[at + 1]]));
        at += 2;
    }
    sum
}

/// Checksum after changes whose sum (as `diff128` makes it) is `diff`.
#[inline(always)]
pub fn apply_diff(check: [u8; 2], diff: u32) -> [u8; 2] {
    let sum = u64::from(!word(check)) + u64::from(diff);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}
