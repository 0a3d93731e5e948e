//! What the controller tells the BFD container, as Kube-OVN's supervisor
//! reads it: `POD_IPS` and `BFD_PEER_IPS` are required comma lists,
//! `BFD_MIN_TX`/`BFD_MIN_RX` (ms) and `BFD_MULTI` positive integers with
//! Kube-OVN's defaults. The `BFDD_*` paths are the supervisor's overrides.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};

pub const DEFAULT_SOCKET: &str = "/var/run/kube-ovn/bfdd-supervisor/control.sock";
/// Kube-OVN's `:10669`, the container port named `bfdd-metrics`.
pub const DEFAULT_METRICS_PORT: u16 = 10669;
const DEFAULT_INTERVAL_MS: u32 = 1000;
const DEFAULT_MULTIPLIER: u8 = 3;

/// The settings `bfdd-control` may change at run time, as OpenBFDD's
/// `session new set ...` and `allow` do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sessions {
    pub min_tx_ms: u32,
    pub min_rx_ms: u32,
    pub multiplier: u8,
    /// Only these peers get a session; they open it, we answer.
    pub allowed: Vec<IpAddr>,
}

impl Sessions {
    pub fn min_tx(&self) -> Duration {
        Duration::from_millis(u64::from(self.min_tx_ms))
    }

    pub fn min_rx(&self) -> Duration {
        Duration::from_millis(u64::from(self.min_rx_ms))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub pod_ips: Vec<IpAddr>,
    pub sessions: Sessions,
    /// The interface whose TC ingress must carry the dataplane; by default
    /// the one holding the first of `pod_ips`.
    pub interface: Option<String>,
    pub socket: PathBuf,
    /// Kube-OVN's `BFDD_METRICS_ADDRESS` is a Go listen address: `:10669`
    /// means every address.
    pub metrics: String,
}

impl Config {
    /// Reads the environment through `var` (`std::env::var` outside tests).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let pod_ips = ip_list(&var("POD_IPS").unwrap_or_default()).context("invalid POD_IPS")?;
        let allowed =
            ip_list(&var("BFD_PEER_IPS").unwrap_or_default()).context("invalid BFD_PEER_IPS")?;
        let min_tx_ms = positive(&var, "BFD_MIN_TX", DEFAULT_INTERVAL_MS)?;
        let min_rx_ms = positive(&var, "BFD_MIN_RX", DEFAULT_INTERVAL_MS)?;
        let multiplier = positive(&var, "BFD_MULTI", u32::from(DEFAULT_MULTIPLIER))?;
        let multiplier = u8::try_from(multiplier)
            .map_err(|_| anyhow::anyhow!("invalid BFD_MULTI {multiplier:?}"))?;
        let non_empty = |name| var(name).filter(|value| !value.is_empty());
        Ok(Self {
            pod_ips,
            sessions: Sessions {
                min_tx_ms,
                min_rx_ms,
                multiplier,
                allowed,
            },
            interface: non_empty("EGRESS_INTERNAL_INTERFACE"),
            socket: socket_path(&var),
            metrics: non_empty("BFDD_METRICS_ADDRESS")
                .unwrap_or_else(|| format!(":{DEFAULT_METRICS_PORT}")),
        })
    }
}

/// Where the control socket is, for the server and the probes alike.
pub fn socket_path(var: impl Fn(&str) -> Option<String>) -> PathBuf {
    var("BFDD_SUPERVISOR_SOCKET")
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| DEFAULT_SOCKET.to_owned())
        .into()
}

/// A comma list of addresses, none of them empty (Go's `netip.ParseAddr`
/// on each part, as Kube-OVN parses it).
pub fn ip_list(value: &str) -> anyhow::Result<Vec<IpAddr>> {
    value
        .split(',')
        .map(|part| {
            part.trim()
                .parse()
                .with_context(|| format!("{:?} is not an IP address", part.trim()))
        })
        .collect()
}

fn positive(
    var: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: u32,
) -> anyhow::Result<u32> {
    let Some(value) = var(name).filter(|value| !value.is_empty()) else {
        return Ok(default);
    };
    match value.parse::<u32>() {
        Ok(parsed) if parsed > 0 => Ok(parsed),
        _ => bail!("invalid {name} {value:?}"),
    }
}

/// Where `/livez` and `/metrics` listen: `:PORT` is every address (IPv6
/// and IPv4 where the kernel allows both on one socket), anything else a
/// socket address.
pub fn metrics_addresses(value: &str) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    if let Some(port) = value.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .with_context(|| format!("invalid BFDD_METRICS_ADDRESS {value:?}"))?;
        return Ok(vec![
            (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
            (std::net::Ipv4Addr::UNSPECIFIED, port).into(),
        ]);
    }
    Ok(vec![value.parse().with_context(|| {
        format!("invalid BFDD_METRICS_ADDRESS {value:?}")
    })?])
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn reads_what_kube_ovn_sets() {
        let config = Config::from_env(env(&[
            ("POD_IPS", "10.0.1.5,fd00::5"),
            ("BFD_PEER_IPS", "10.0.1.254"),
            ("BFD_MIN_TX", "100"),
            ("BFD_MIN_RX", "200"),
            ("BFD_MULTI", "5"),
        ]))
        .unwrap();
        assert_eq!(
            config.pod_ips,
            vec![
                "10.0.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(
            config.sessions,
            Sessions {
                min_tx_ms: 100,
                min_rx_ms: 200,
                multiplier: 5,
                allowed: vec!["10.0.1.254".parse().unwrap()],
            }
        );
        assert_eq!(config.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(config.metrics, ":10669");
        assert_eq!(config.interface, None);
    }

    #[test]
    fn timers_default_to_kube_ovns() {
        let config = Config::from_env(env(&[
            ("POD_IPS", "10.0.1.5"),
            ("BFD_PEER_IPS", "10.0.1.254"),
        ]))
        .unwrap();
        assert_eq!(config.sessions.min_tx_ms, 1000);
        assert_eq!(config.sessions.min_rx_ms, 1000);
        assert_eq!(config.sessions.multiplier, 3);
    }

    #[test]
    fn refuses_what_kube_ovn_refuses() {
        let base = [("POD_IPS", "10.0.1.5"), ("BFD_PEER_IPS", "10.0.1.254")];
        for (name, value) in [
            ("POD_IPS", ""),
            ("POD_IPS", "10.0.1.5,"),
            ("BFD_PEER_IPS", "nope"),
            ("BFD_MIN_TX", "0"),
            ("BFD_MIN_RX", "-5"),
            ("BFD_MULTI", "256"),
            ("BFD_MULTI", "x"),
        ] {
            let mut pairs: Vec<(&str, &str)> =
                base.iter().copied().filter(|(k, _)| *k != name).collect();
            pairs.push((name, value));
            assert!(
                Config::from_env(env(&pairs)).is_err(),
                "{name}={value:?} was accepted"
            );
        }
    }

    #[test]
    fn overrides_come_from_the_environment() {
        let config = Config::from_env(env(&[
            ("POD_IPS", " 10.0.1.5 "),
            ("BFD_PEER_IPS", "10.0.1.254"),
            ("BFDD_SUPERVISOR_SOCKET", "/tmp/x.sock"),
            ("BFDD_METRICS_ADDRESS", "127.0.0.1:9999"),
            ("EGRESS_INTERNAL_INTERFACE", "eth0"),
        ]))
        .unwrap();
        assert_eq!(config.pod_ips, vec!["10.0.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(config.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(config.interface.as_deref(), Some("eth0"));
        assert_eq!(
            metrics_addresses(&config.metrics).unwrap(),
            vec!["127.0.0.1:9999".parse().unwrap()]
        );
        assert_eq!(metrics_addresses(":10669").unwrap().len(), 2);
    }
}
