//! Reading a whole hash map in a few system calls (BPF_MAP_LOOKUP_BATCH).
//!
//! aya 0.14 iterates a map one key at a time, two system calls per entry:
//! for a million flows that is seconds of CPU on every sweep, taken from
//! the cores that forward. The batch command copies a few thousand entries
//! per call; aya has no wrapper for it yet, so this is one.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{IterableMap, MapData},
};
use aya_obj::generated::bpf_cmd;

use super::sys;

/// Entries asked for per call; grown when one hash bucket holds more.
pub const DEFAULT_CHUNK: u32 = 4096;

/// No bucket of a sane hash map holds this many entries.
const MAX_CHUNK: u32 = 1 << 20;

/// Every entry of a hash map, `chunk` entries per system call at most.
/// Entries added or removed while it runs may or may not be seen, as with
/// any walk of a live map; none is seen twice.
pub fn entries<K: Pod, V: Pod>(
    map: &impl IterableMap<K, V>,
    chunk: u32,
) -> io::Result<Vec<(K, V)>> {
    entries_of(map.map(), chunk)
}

/// Every element of an array map, by index, in a few system calls.
pub fn array_elements<V: Pod>(map: &MapData) -> io::Result<Vec<(u32, V)>> {
    entries_of(map, DEFAULT_CHUNK)
}

fn entries_of<K: Pod, V: Pod>(map: &MapData, chunk: u32) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut chunk = chunk.max(1);
    let mut found = Vec::new();
    // The batch token is the next bucket's index for hash maps; 8 bytes
    // leave room for map types whose token is a key.
    let mut next: u64 = 0;
    let mut started = false;
    loop {
        let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(chunk as usize);
        let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(chunk as usize);
        let resume = next;
        let mut attr = sys::zeroed_attr();
        attr.batch.in_batch = if started {
            (&raw const resume) as u64
        } else {
            0
        };
        attr.batch.out_batch = (&raw mut next) as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = chunk;
        attr.batch.map_fd = fd as u32;
        // SAFETY: the buffers hold `chunk` keys and values and `resume` and
        // `next` a token each, all alive for the call; the kernel writes at
        // most `count` of each.
        let error = unsafe { sys::bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        // SAFETY: the kernel wrote back how many entries it filled.
        let filled = unsafe { attr.batch.count }.min(chunk) as usize;
        // SAFETY: the kernel initialised the first `filled` of each.
        unsafe {
            keys.set_len(filled);
            values.set_len(filled);
        }
        found.extend(
            keys.into_iter()
                .zip(values)
                // SAFETY: as above.
                .map(|(k, v)| unsafe { (k.assume_init(), v.assume_init()) }),
        );
        if let Some(error) = error {
            match error.raw_os_error() {
                // The walk is over (what came with the last call is kept).
                Some(libc::ENOENT) => return Ok(found),
                // One bucket holds more than `chunk`: ask again, for more.
                Some(libc::ENOSPC) if filled == 0 && chunk < MAX_CHUNK => {
                    chunk = chunk.saturating_mul(2);
                    next = resume;
                    continue;
                }
                _ => return Err(error),
            }
        }
        started = true;
    }
}
