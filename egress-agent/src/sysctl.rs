//! IPv4 forwarding on the interfaces the dataplane uses.
//!
//! `bpf_fib_lookup` refuses to route for an interface with forwarding off,
//! and the kernel paths the dataplane relies on (time-exceeded, frag-needed,
//! replies whose neighbour is unresolved) are the kernel forwarding. Only the
//! managed interfaces are switched on, and each is restored on exit.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// A sysctl this agent changed, with the value to put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    pub path: PathBuf,
    pub previous: String,
}

fn forwarding_path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/forwarding"))
}

/// Turns forwarding on for each interface; returns what it changed.
pub fn enable_forwarding<'a>(
    interfaces: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<Vec<Changed>> {
    let mut changed = Vec::new();
    for interface in interfaces {
        let path = forwarding_path(interface);
        let previous = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        if previous == "1" {
            continue;
        }
        if let Err(err) = std::fs::write(&path, "1") {
            restore(&changed);
            return Err(err).with_context(|| format!("enabling forwarding on {interface}"));
        }
        tracing::info!(interface, "IPv4 forwarding enabled");
        changed.push(Changed { path, previous });
    }
    Ok(changed)
}

pub fn restore(changed: &[Changed]) {
    for Changed { path, previous } in changed {
        if let Err(err) = std::fs::write(path, previous) {
            tracing::warn!(path = %path.display(), error = %err, "could not restore sysctl");
        }
    }
}
