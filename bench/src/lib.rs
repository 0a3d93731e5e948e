//! The benchmark harness: a topology of namespaces (sender, gateway, sink),
//! the gateways under test, the measurements and the report. The binary
//! (`main.rs`) runs them in order; `cargo xtask bench` starts it.

pub mod gateways;
pub mod measure;
pub mod profile;
pub mod progcost;
pub mod programs;
pub mod report;
pub mod topology;

/// The benchmark's BPF object built from bench-ebpf by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));
