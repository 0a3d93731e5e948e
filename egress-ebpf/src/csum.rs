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
