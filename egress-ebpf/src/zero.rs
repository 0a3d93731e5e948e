//! Zeroing that stays inline. On the BPF target LLVM turns zero-filled
//! structs (`mem::zeroed`, `..Default::default()`, runs of zero stores) into
//! calls to a byte-at-a-time `memset` subprogram, which cost more than a
//! FIB lookup on the new-flow path. Volatile word stores cannot be fused
//! back into that call.

use core::mem::{MaybeUninit, align_of, size_of};

/// Zeroes `slot` in place, one 32-bit word at a time, and hands it out.
///
/// # Safety
/// All-zero bytes must be a valid `T` (plain C structs and integers).
#[inline(always)]
pub unsafe fn zeroed<T>(slot: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(align_of::<T>() >= 4 && size_of::<T>().is_multiple_of(4)) };
    let words = slot.as_mut_ptr().cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: `T` is at least 4-aligned and a whole number of words.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte is zero, which the caller vouches is a valid `T`.
    unsafe { slot.assume_init_mut() }
}
