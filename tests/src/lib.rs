//! Test support for egress: everything here needs root, and everything it
//! creates (network namespaces, BPF pins, agent processes, temp files) is
//! named uniquely per process and removed on drop, also when a test fails.
//!
//! - `netns`: namespaces and running code inside them.
//! - `topology`: the seeds' gateway topology (tenant hosts, LAN, gateway,
//!   external server).
//! - `shapes`: the seeds' other deployment shapes (a Kube-OVN gateway pod
//!   with a macvlan `net1`, a gateway VM with one macvlan per tenant).
//! - `agent`: the real `egress-agent` binary run against a topology.
//! - `kube_ovn`: the gateway image's scripts run as Kube-OVN runs them.
//! - `traffic`: servers that record their peers, clients, captures.
//! - `cleanup`: removes all of the above when a program is interrupted.
//! - `harness`: the real programs on crafted frames via BPF_PROG_TEST_RUN.
//! - `frames`: building those frames and checking what comes out.
//! - `apiserver`: an in-process Kubernetes API server (needs no root).
//! - `collector`: nfcapd and nfdump, an independent IPFIX collector on
//!   127.0.0.1.

pub mod agent;
pub mod apiserver;
pub mod cleanup;
pub mod collector;
pub mod frames;
pub mod frames6;
pub mod harness;
pub mod kube_ovn;
pub mod netns;
pub mod peers;
pub mod shapes;
pub mod topology;
pub mod traffic;

/// Skips (with a message saying why) when not running as root: every test
/// of this crate creates namespaces and loads BPF programs. Under CI
/// (`CI=true`) a missing privilege fails instead, so a run cannot pass by
/// skipping.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but not root: the privileged tests cannot run"
        );
        eprintln!("SKIPPED: needs root (network namespaces, BPF); run `cargo xtask test` as root");
    }
    root
}
