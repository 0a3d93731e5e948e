//! Per-interface IPv4 sysctls the dataplane needs, each restored on exit.
//!
//! Forwarding: `bpf_fib_lookup` refuses to route for an interface with
//! forwarding off, and the kernel paths the dataplane relies on
//! (time-exceeded, frag-needed, replies whose neighbour is unresolved) are
//! the kernel forwarding. Only the managed interfaces are switched on.
//!
//! ARP isolation: tenants selected by ingress port are next hops a router
//! resolves by ARP (a macvlan with its own address per tenant on the
//! internal NIC, as on the seeds' gateway VM). With the defaults every
//! interface answers ARP for every local address with its own MAC, so the
//! parent NIC claims the macvlans' addresses and the router sends every
//! tenant to the wrong MAC. `arp_ignore=1` (answer only for addresses of
//! the receiving interface) and `arp_announce=2` (ask with the outgoing
//! interface's own address) on those interfaces fix it, as the seeds'
//! script does.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// A sysctl this agent changed, with the value to put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    pub path: PathBuf,
    pub previous: String,
}

fn conf_path(interface: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/{name}"))
}

/// `net.ipv4.conf.eth0.forwarding` for `/proc/sys/net/ipv4/conf/eth0/forwarding`
/// (interface names keep their dots, as in `sysctl -w`'s slash form).
fn display_name(path: &Path) -> String {
    path.strip_prefix("/proc/sys")
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join(".")
}

/// Sets each sysctl to its value, leaving those that already have it;
/// returns what it changed. On error, what it changed so far is restored.
fn set(wanted: Vec<(PathBuf, &str)>) -> anyhow::Result<Vec<Changed>> {
    let mut changed = Vec::new();
    for (path, value) in wanted {
        let previous = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().to_owned(),
            Err(err) => {
                restore(&changed);
                return Err(err).with_context(|| format!("reading {}", path.display()));
            }
        };
        if previous == value {
            continue;
        }
        if let Err(err) = std::fs::write(&path, value) {
            restore(&changed);
            return Err(err).with_context(|| format!("setting {} to {value}", path.display()));
        }
        tracing::info!(sysctl = %display_name(&path), value, %previous, "set");
        changed.push(Changed { path, previous });
    }
    Ok(changed)
}

/// Turns forwarding on for each interface; returns what it changed.
pub fn enable_forwarding<'a>(
    interfaces: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<Vec<Changed>> {
    set(interfaces
        .into_iter()
        .map(|interface| (conf_path(interface, "forwarding"), "1"))
        .collect())
}

/// Turns IPv6 forwarding on. Unlike IPv4's, the kernel (and the FIB lookup
/// the dataplane makes, which answers "forwarding disabled" otherwise)
/// reads only `net.ipv6.conf.all.forwarding`; switching it on also stops
/// router advertisements being accepted where `accept_ra` is 1.
pub fn enable_ipv6_forwarding() -> anyhow::Result<Vec<Changed>> {
    set(vec![(
        PathBuf::from("/proc/sys/net/ipv6/conf/all/forwarding"),
        "1",
    )])
}

/// Makes each interface answer ARP only for its own addresses, and ask
/// with them; returns what it changed.
pub fn isolate_arp<'a>(
    interfaces: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<Vec<Changed>> {
    set(interfaces
        .into_iter()
        .flat_map(|interface| {
            [
                (conf_path(interface, "arp_ignore"), "1"),
                (conf_path(interface, "arp_announce"), "2"),
            ]
        })
        .collect())
}

/// Whether a change was to one of `interface`'s settings.
pub fn concerns(changed: &Changed, interface: &str) -> bool {
    changed.path.parent() == conf_path(interface, "forwarding").parent()
}

/// Puts back what was changed, last change first.
pub fn restore(changed: &[Changed]) {
    for Changed { path, previous } in changed.iter().rev() {
        match std::fs::write(path, previous) {
            Ok(()) => tracing::info!(sysctl = %display_name(path), value = %previous, "restored"),
            // The interface is gone, and its settings with it.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "could not restore sysctl")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_like_sysctl() {
        assert_eq!(
            display_name(&conf_path("eth0.100", "arp_ignore")),
            "net.ipv4.conf.eth0.100.arp_ignore"
        );
    }
}
