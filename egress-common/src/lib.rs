//! The layouts the egress BPF programs and the agent agree on.
//!
//! Everything a map carries is defined here once, `#[repr(C)]`, with explicit
//! padding and the byte order written on every field. With the `user` feature
//! the types derive `bytemuck::Pod`, which refuses to compile if a layout has
//! hidden padding, and implement `aya::Pod` so userspace maps can carry them.
//!
//! IPv4 has its own keys and values (`*V4`) so the hot path hashes 16-byte
//! keys; IPv6 has parallel `*V6` maps rather than wider keys for both.
#![no_std]

pub mod bench;
pub mod config;
pub mod counters;
pub mod events;
pub mod flow;
pub mod inbound;
pub mod names;
pub mod redirect;
pub mod sweep;
pub mod tenant;

/// Declares a map layout: `#[repr(C)]`, copyable, and `Pod` on the user side.
macro_rules! shared_layout {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
        pub struct $name { $($body)* }

        // SAFETY: bytemuck::Pod (derived above) already proved the type is plain old data.
        #[cfg(feature = "user")]
        unsafe impl aya::Pod for $name {}
    };
}
pub(crate) use shared_layout;
