//! Configuration: the YAML file's model and its validation.
//!
//! Validation runs in two steps, both before the kernel is touched.
//! [`Config::plan`] checks everything the file alone can tell (addresses,
//! overlaps, duplicates, limits) and reports every problem at once, each
//! named by its field. [`Plan::resolve`] then checks the plan against a
//! snapshot of the machine's links and addresses. Only a [`Resolved`] plan
//! reaches the dataplane, so a bad file changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use egress_common::tenant::{MAX_EGRESS_ADDRS, MAX_TENANT_ID, TENANT_NAME_LEN};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::{
    hook_choice::{self, Choice, Hook, HookSetting, InterfaceFacts},
    system::{LinkFacts, SystemView},
};

/// Ports handed out when a tenant names no range.
pub const DEFAULT_PORTS: PortRange = PortRange {
    min: 1024,
    max: 65535,
};
/// Concurrent flows the conntrack map holds when the file does not say.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
const MIN_MAX_FLOWS: u32 = 16;
const MAX_MAX_FLOWS: u32 = 16 << 20;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    pub interfaces: Interfaces,
    #[serde(default)]
    pub tenants: Vec<Tenant>,
    #[serde(default)]
    pub conntrack: Conntrack,
    #[serde(default)]
    pub xdp: Xdp,
    /// Routes back to tenant networks behind other hosts (on a gateway VM:
    /// each node's pod CIDR via that node); Kubernetes mode adds its own.
    #[serde(default)]
    pub return_routes: Vec<ReturnRouteConfig>,
    #[serde(default)]
    pub bfd: BfdConfig,
    /// The translation log: JSON lines, IPFIX.
    #[serde(default)]
    pub audit: audit::Audit,
    /// Source CIDRs the gateway routes out of the external interface
    /// untranslated (Kube-OVN's `snat: false` policies); in no tenant.
    #[serde(default)]
    pub routed_sources: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReturnRouteConfig {
    pub destination: String,
    pub via: String,
    /// Defaults to the first internal interface.
    #[serde(default)]
    pub interface: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BfdConfig {
    #[serde(default)]
    pub peers: Vec<BfdPeerConfig>,
}

/// A router that runs BFD with this gateway (RFC 5880/5881, single hop).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BfdPeerConfig {
    pub address: String,
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default = "default_bfd_interval_ms")]
    pub min_tx_ms: u32,
    #[serde(default = "default_bfd_interval_ms")]
    pub min_rx_ms: u32,
    #[serde(default = "default_bfd_multiplier")]
    pub multiplier: u8,
}

/// Kube-OVN's defaults.
fn default_bfd_interval_ms() -> u32 {
    1000
}

fn default_bfd_multiplier() -> u8 {
    3
}

/// BFD intervals this agent accepts: RFC 5880 allows any, but below 10 ms a
/// userspace agent cannot keep time, and above a minute a failure goes
/// unnoticed too long to matter.
const BFD_INTERVAL_MS: std::ops::RangeInclusive<u32> = 10..=60_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interfaces {
    /// Where tenant traffic arrives (and replies leave).
    #[serde(deserialize_with = "one_or_many")]
    pub internal: Vec<String>,
    /// Where translated traffic leaves (and replies arrive).
    pub external: String,
    /// Where the packet path runs on every interface: `auto` (XDP where it
    /// is safe, TC elsewhere), `xdp` or `tc`.
    #[serde(default)]
    pub hook: Option<HookSetting>,
    /// `hook` for single interfaces, by name.
    #[serde(default)]
    pub hooks: BTreeMap<String, HookSetting>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tenant {
    pub name: String,
    /// Source CIDRs of the tenant's hosts, IPv4 or IPv6 (a dual-stack
    /// tenant lists both).
    #[serde(default)]
    pub sources: Vec<String>,
    /// Addresses the tenant's traffic leaves with: IPv4 ones for its IPv4
    /// sources, IPv6 ones for its IPv6 sources.
    #[serde(rename = "egressIPs", default)]
    pub egress_ips: Vec<String>,
    /// Where the tenant's traffic comes in, when sources alone cannot tell
    /// tenants apart (a router steering each tenant to its own next hop).
    #[serde(default)]
    pub ingress: Vec<Ingress>,
    /// Source ports (and ICMP ids) handed out on the egress addresses.
    #[serde(default)]
    pub ports: Option<PortRange>,
    /// Flows the tenant may hold at once; default: an equal share of what
    /// tenants without their own figure leave of `conntrack.maxFlows`.
    #[serde(default)]
    pub max_flows: Option<u32>,
    /// New flows per second the tenant may open; default: no limit.
    #[serde(default)]
    pub new_flows_per_second: Option<u32>,
    /// New flows the tenant may open at once above its rate; default: one
    /// second's worth.
    #[serde(default)]
    pub new_flow_burst: Option<u32>,
    /// Ports of its egress IPs forwarded to its hosts.
    #[serde(default)]
    pub port_forwards: Vec<inbound::PortForward>,
    /// Addresses that map one of its hosts 1:1.
    #[serde(rename = "floatingIPs", default)]
    pub floating_ips: Vec<inbound::FloatingIp>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Ingress {
    /// An internal interface, or a macvlan on one.
    pub interface: String,
    /// Destination MAC the router sends this tenant's frames to; without it
    /// the whole interface (or the macvlan's own MAC) selects the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Have the agent make `interface`, a macvlan on an internal interface
    /// with its own MAC and a /32 next-hop address (seed 002's per-tenant
    /// next hop), instead of the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<CreateMacvlan>,
}

/// A macvlan next hop the agent creates on start (and on a reload that
/// adds it), recreates when this changes, and removes on exit.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateMacvlan {
    /// The internal interface it sits on.
    pub parent: String,
    /// The next hop the router sends the tenant to: an IPv4 /32.
    pub address: String,
    /// Its MAC; by default one derived from the tenant's and the macvlan's
    /// names (locally administered), so it is the same on every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Conntrack {
    /// Concurrent flows held; each takes two map entries.
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// How often expired flows are removed.
    #[serde(default = "default_sweep_interval", deserialize_with = "duration")]
    pub sweep_interval: Duration,
    #[serde(default)]
    pub timeouts: Timeouts,
}

impl Default for Conntrack {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_MAX_FLOWS,
            sweep_interval: default_sweep_interval(),
            timeouts: Timeouts::default(),
        }
    }
}

fn default_sweep_interval() -> Duration {
    Duration::from_secs(10)
}

/// How long a flow may stay idle in each state. The defaults are Linux's
/// nf_conntrack ones (FIN_WAIT stands for fin_wait, close_wait and last_ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Timeouts {
    #[serde(deserialize_with = "duration", serialize_with = "as_seconds")]
    pub tcp_syn_sent: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "as_seconds")]
    pub tcp_established: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "as_seconds")]
    pub tcp_fin_wait: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "as_seconds")]
    pub tcp_time_wait: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "as_seconds")]
    pub tcp_close: Duration,
    /// UDP flows that have not been answered.
    #[serde(deserialize_with = "duration", serialize_with = "as_seconds")]
    pub udp: Duration,
    /// UDP flows with traffic both ways.
    #[serde(deserialize_with = "duration", serialize_with = "as_seconds")]
    pub udp_replied: Duration,
    #[serde(deserialize_with = "duration", serialize_with = "as_seconds")]
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent: Duration::from_secs(120),
            tcp_established: Duration::from_secs(432_000),
            tcp_fin_wait: Duration::from_secs(120),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_replied: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
        }
    }
}

/// The number a trimmed `text` starts with and the unit after it (`30s`:
/// 30 and `s`); `example` says what was expected when there is no number.
fn number_and_unit<'a>(text: &'a str, example: &str) -> Result<(u64, &'a str), String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value = number
        .parse()
        .map_err(|_| format!("{text:?} is not {example}"))?;
    Ok((value, unit.trim()))
}

/// Seconds as a number, or a number with a unit: `30`, `30s`, `2m`, `1h`, `5d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (value, unit) = number_and_unit(text, "a duration like 30s, 2m, 1h or 5d")?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unknown unit (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(value.saturating_mul(scale)))
}

fn duration<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Seconds(u64),
        Text(String),
    }
    match Written::deserialize(deserializer)? {
        Written::Seconds(seconds) => Ok(Duration::from_secs(seconds)),
        Written::Text(text) => parse_duration(&text).map_err(serde::de::Error::custom),
    }
}

fn as_seconds<S: serde::Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(value.as_secs())
}

/// `internal: eth0` reads as `internal: [eth0]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(name) => vec![name],
        OneOrMany::Many(names) => names,
    })
}

fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xdp {
    #[serde(default)]
    pub mode: XdpModeSetting,
}

/// How XDP programs attach.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native where the driver supports it, generic (with a warning) elsewhere.
    #[default]
    Auto,
    /// Native only: refuse to start on a driver without XDP support.
    Native,
    /// Generic (skb) mode everywhere; slower, works on any interface.
    Generic,
}

/// One thing wrong with the file, named by its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid configuration: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {}", path.display(), ProblemList(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        write!(
            f,
            "{count} problem{}, nothing was changed:",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in self.0 {
            write!(f, "\n  - {}: {}", problem.field, problem.message)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and parses a file; syntax errors carry YAML line and column.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Syntax {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|err| err.to_string())
    }

    /// Checks everything the file can tell on its own.
    pub fn plan(&self) -> Result<Plan, Vec<Problem>> {
        let mut problems = Problems::default();
        self.check_interfaces(&mut problems);
        let tenants = self.plan_tenants(&mut problems);
        let max_flows = self.conntrack.max_flows;
        if !(MIN_MAX_FLOWS..=MAX_MAX_FLOWS).contains(&max_flows) {
            problems.add(
                "conntrack.maxFlows",
                format!("{max_flows} is outside {MIN_MAX_FLOWS}..={MAX_MAX_FLOWS}"),
            );
        }
        let conntrack = &self.conntrack;
        if conntrack.sweep_interval.is_zero() {
            problems.add("conntrack.sweepInterval", "must be at least 1s");
        }
        let timeouts = conntrack.timeouts;
        for (name, value) in [
            ("tcpSynSent", timeouts.tcp_syn_sent),
            ("tcpEstablished", timeouts.tcp_established),
            ("tcpFinWait", timeouts.tcp_fin_wait),
            ("tcpTimeWait", timeouts.tcp_time_wait),
            ("tcpClose", timeouts.tcp_close),
            ("udp", timeouts.udp),
            ("udpReplied", timeouts.udp_replied),
            ("icmp", timeouts.icmp),
        ] {
            if value.is_zero() {
                problems.add(format!("conntrack.timeouts.{name}"), "must be at least 1s");
            }
        }
        let return_routes = self.plan_return_routes(&mut problems);
        let bfd_peers = self.plan_bfd(&mut problems);
        let hooks = self.plan_hooks(&mut problems);
        let audit = self.audit.plan(&mut problems);
        let routed_sources = self.plan_routed_sources(&mut problems, &tenants);
        problems.into_result(Plan {
            internal: self.interfaces.internal.clone(),
            external: self.interfaces.external.clone(),
            hooks,
            tenants,
            max_flows,
            sweep_interval: conntrack.sweep_interval,
            timeouts,
            xdp_mode: self.xdp.mode,
            return_routes,
            bfd_peers,
            audit,
            routed_sources,
        })
    }

    /// `routedSources`: CIDRs, none inside a tenant's sources (a packet is
    /// either translated or routed as it is, never both).
    fn plan_routed_sources(
        &self,
        problems: &mut Problems,
        tenants: &[PlannedTenant],
    ) -> Vec<IpNet> {
        let mut planned = Vec::new();
        for (i, text) in self.routed_sources.iter().enumerate() {
            let field = format!("routedSources[{i}]");
            match parse_prefix(text, "10.16.2.0/24 or fd00:10:16::/112") {
                Err(message) => problems.add(field, message),
                Ok(net) => {
                    let overlaps =
                        |s: IpNet| s.contains(&net.network()) || net.contains(&s.network());
                    let clash = tenants.iter().enumerate().find(|(_, t)| {
                        t.sources.iter().copied().map(IpNet::V4).any(overlaps)
                            || t.sources_v6.iter().copied().map(IpNet::V6).any(overlaps)
                    });
                    if let Some((index, tenant)) = clash {
                        problems.add(
                            field,
                            format!(
                                "{net} overlaps the sources of {}",
                                TenantField::new(index, &tenant.name)
                            ),
                        );
                    } else {
                        planned.push(net);
                    }
                }
            }
        }
        planned
    }

    /// The hook setting of each managed interface. A file from before
    /// `interfaces.hook` that forces an XDP mode keeps getting XDP.
    fn plan_hooks(&self, problems: &mut Problems) -> HookPlan {
        let default = match (self.interfaces.hook, self.xdp.mode) {
            (Some(setting), _) => setting,
            (None, XdpModeSetting::Auto) => HookSetting::Auto,
            (None, XdpModeSetting::Native | XdpModeSetting::Generic) => HookSetting::Xdp,
        };
        let managed = |name: &str| {
            self.interfaces.external == name || self.interfaces.internal.iter().any(|i| i == name)
        };
        for name in self.interfaces.hooks.keys() {
            if !managed(name) {
                problems.add(
                    format!("interfaces.hooks.{name}"),
                    format!("{name} is neither an internal nor the external interface"),
                );
            }
        }
        HookPlan {
            default,
            per_interface: self.interfaces.hooks.clone(),
        }
    }

    fn plan_return_routes(&self, problems: &mut Problems) -> Vec<PlannedRoute> {
        let mut planned: Vec<PlannedRoute> = Vec::new();
        for (i, route) in self.return_routes.iter().enumerate() {
            let field = format!("returnRoutes[{i}]");
            let destination = match route.destination.trim().parse::<IpNet>() {
                Ok(net) if net.trunc() == net => Some(net),
                Ok(net) => {
                    problems.add(
                        format!("{field}.destination"),
                        format!("{net} has host bits set; did you mean {}?", net.trunc()),
                    );
                    None
                }
                Err(_) => {
                    problems.add(
                        format!("{field}.destination"),
                        format!("{:?} is not an IPv4 or IPv6 CIDR", route.destination),
                    );
                    None
                }
            };
            let via = match route.via.trim().parse::<IpAddr>() {
                Ok(via) => Some(via),
                Err(_) => {
                    problems.add(
                        format!("{field}.via"),
                        format!("{:?} is not an IPv4 or IPv6 address", route.via),
                    );
                    None
                }
            };
            if let Some(interface) = &route.interface {
                check_ifname(problems, &format!("{field}.interface"), interface);
            }
            let (Some(destination), Some(via)) = (destination, via) else {
                continue;
            };
            if destination.addr().is_ipv4() != via.is_ipv4() {
                problems.add(
                    format!("{field}.via"),
                    format!("{via} is not of the same family as the destination {destination}"),
                );
                continue;
            }
            if planned.iter().any(|p| p.destination == destination) {
                problems.add(
                    format!("{field}.destination"),
                    format!("{destination} is routed twice"),
                );
            }
            planned.push(PlannedRoute {
                destination,
                via,
                interface: route.interface.clone(),
            });
        }
        planned
    }

    fn plan_bfd(&self, problems: &mut Problems) -> Vec<PlannedBfdPeer> {
        let mut planned: Vec<PlannedBfdPeer> = Vec::new();
        for (i, peer) in self.bfd.peers.iter().enumerate() {
            let field = format!("bfd.peers[{i}]");
            let address = match peer.address.trim().parse::<IpAddr>() {
                Ok(IpAddr::V6(v6)) if v6.is_unicast_link_local() && peer.interface.is_none() => {
                    problems.add(
                        format!("{field}.interface"),
                        format!("{v6} is link-local: name the interface the peer is on"),
                    );
                    continue;
                }
                Ok(address) => address,
                Err(_) => {
                    problems.add(
                        format!("{field}.address"),
                        format!("{:?} is not an IPv4 or IPv6 address", peer.address),
                    );
                    continue;
                }
            };
            for (name, value) in [("minTxMs", peer.min_tx_ms), ("minRxMs", peer.min_rx_ms)] {
                if !BFD_INTERVAL_MS.contains(&value) {
                    problems.add(
                        format!("{field}.{name}"),
                        format!(
                            "{value} is outside {}..={} ms",
                            BFD_INTERVAL_MS.start(),
                            BFD_INTERVAL_MS.end()
                        ),
                    );
                }
            }
            if peer.multiplier == 0 {
                problems.add(format!("{field}.multiplier"), "must be at least 1");
            }
            if let Some(interface) = &peer.interface {
                check_ifname(problems, &format!("{field}.interface"), interface);
            }
            if planned
                .iter()
                .any(|p| p.address == address && p.interface == peer.interface)
            {
                problems.add(
                    format!("{field}.address"),
                    format!("{address} is configured twice"),
                );
            }
            planned.push(PlannedBfdPeer {
                address,
                interface: peer.interface.clone(),
                min_tx: Duration::from_millis(u64::from(peer.min_tx_ms)),
                min_rx: Duration::from_millis(u64::from(peer.min_rx_ms)),
                multiplier: peer.multiplier,
            });
        }
        planned
    }

    fn check_interfaces(&self, problems: &mut Problems) {
        let interfaces = &self.interfaces;
        if interfaces.internal.is_empty() {
            problems.add("interfaces.internal", "must name at least one interface");
        }
        for (i, name) in interfaces.internal.iter().enumerate() {
            let field = format!("interfaces.internal[{i}]");
            check_ifname(problems, &field, name);
            if interfaces.internal[..i].contains(name) {
                problems.add(&field, format!("{name} is listed twice"));
            }
        }
        check_ifname(problems, "interfaces.external", &interfaces.external);
        if interfaces.internal.contains(&interfaces.external) {
            problems.add(
                "interfaces.external",
                format!(
                    "{} is also an internal interface; internal and external must differ",
                    interfaces.external
                ),
            );
        }
    }

    fn plan_tenants(&self, problems: &mut Problems) -> Vec<PlannedTenant> {
        if self.tenants.len() > MAX_TENANT_ID as usize {
            problems.add(
                "tenants",
                format!(
                    "{} tenants, at most {MAX_TENANT_ID} are supported",
                    self.tenants.len()
                ),
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut egress_owner: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut planned = Vec::with_capacity(self.tenants.len());
        for (index, tenant) in self.tenants.iter().enumerate() {
            let at = TenantField::new(index, &tenant.name);
            check_tenant_name(problems, &at, &tenant.name);
            if let Some(first) = names.insert(tenant.name.as_str(), index) {
                problems.add(
                    at.field("name"),
                    format!("{} is already the name of tenants[{first}]", tenant.name),
                );
            }
            let mut written = WrittenAt::default();
            let (sources, sources_v6) = parse_sources(problems, &at, &tenant.sources, &mut written);
            let (egress, egress_v6) = parse_egress(problems, &at, &tenant.egress_ips, &mut written);
            check_families(
                problems,
                &at,
                tenant,
                (&sources, &sources_v6),
                (&egress, &egress_v6),
            );
            let addrs = (egress.iter().copied().map(IpAddr::V4).zip(&written.egress)).chain(
                egress_v6
                    .iter()
                    .copied()
                    .map(IpAddr::V6)
                    .zip(&written.egress_v6),
            );
            for (addr, i) in addrs {
                let here = at.field(&format!("egressIPs[{i}]"));
                if let Some(owner) = egress_owner.get(&addr) {
                    problems.add(here, format!("{addr} is already claimed by {owner}"));
                } else {
                    egress_owner.insert(addr, at.to_string());
                }
            }
            let ports = tenant.ports.unwrap_or(DEFAULT_PORTS);
            if ports.min == 0 || ports.min > ports.max {
                problems.add(
                    at.field("ports"),
                    format!(
                        "{}-{} is not a range of ports: need 1 <= min <= max",
                        ports.min, ports.max
                    ),
                );
            }
            let mut ingress = Vec::with_capacity(tenant.ingress.len());
            for (i, entry) in tenant.ingress.iter().enumerate() {
                let here = at.field(&format!("ingress[{i}]"));
                check_ifname(problems, &format!("{here}.interface"), &entry.interface);
                let mac = entry.mac.as_deref().and_then(|mac| {
                    let parsed = parse_mac(mac);
                    if parsed.is_none() {
                        problems.add(
                            format!("{here}.mac"),
                            format!("{mac} is not a MAC address like 02:00:00:00:00:01"),
                        );
                    }
                    parsed
                });
                let create = entry.create.as_ref().and_then(|create| {
                    plan_macvlan(
                        problems,
                        &here,
                        &tenant.name,
                        &entry.interface,
                        create,
                        &self.interfaces.internal,
                    )
                });
                if let (Some(create), Some(mac)) = (&create, mac)
                    && create.mac != mac
                {
                    problems.add(
                        format!("{here}.mac"),
                        format!(
                            "the macvlan this entry creates has MAC {}; leave mac out or give that one",
                            format_mac(create.mac)
                        ),
                    );
                }
                ingress.push(PlannedIngress {
                    interface: entry.interface.clone(),
                    mac,
                    create,
                });
            }
            let limits = plan_limits(problems, &at, tenant, self.conntrack.max_flows);
            let all_egress: Vec<IpAddr> = egress
                .iter()
                .copied()
                .map(IpAddr::V4)
                .chain(egress_v6.iter().copied().map(IpAddr::V6))
                .collect();
            let (forwards, floating) = inbound::plan(
                problems,
                &at,
                (&tenant.port_forwards, &tenant.floating_ips),
                &all_egress,
                (&sources, &sources_v6),
            );
            if ingress.len() > 1 && !(forwards.is_empty() && floating.is_empty()) {
                problems.add(
                    at.field("portForwards"),
                    "a tenant chosen by several ingress ports cannot say which one its \
                     forwarded hosts are behind; give the rules to a tenant with one",
                );
            }
            planned.push(PlannedTenant {
                name: tenant.name.clone(),
                sources,
                sources_v6,
                egress,
                egress_v6,
                written,
                ingress,
                ports,
                limits,
                forwards,
                floating,
            });
        }
        share_flows(problems, &mut planned, self.conntrack.max_flows);
        check_source_overlaps(problems, &planned);
        check_egress_outside_sources(problems, &planned);
        check_created_macvlans(problems, &planned, &self.interfaces);
        inbound::check_across(problems, &planned);
        planned
    }
}

/// A next hop's address: an IPv4 /32 (a bare address means /32). A wider
/// prefix would give the macvlan a route to the parent's subnet that takes
/// the parent's traffic, which is why seed 002 insists on /32.
fn parse_next_hop(text: &str) -> Result<Ipv4Addr, String> {
    let text = text.trim();
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let not_an_address = || format!("{text:?} is not an IPv4 address like 172.18.0.201/32");
    let addr = match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(addr)) => addr,
        Ok(IpAddr::V6(addr)) => {
            return Err(format!(
                "{addr}: a next hop is an IPv4 address (the router's next hop for the \
                 tenant's IPv4 traffic)"
            ));
        }
        Err(_) => return Err(not_an_address()),
    };
    match prefix.map(str::parse::<u8>) {
        None | Some(Ok(32)) => {}
        Some(Ok(len)) if len < 32 => {
            return Err(format!(
                "{text}: a next hop's address must be a /32 (a /{len} would route the \
                 parent's subnet through the macvlan and take the parent's traffic)"
            ));
        }
        Some(_) => return Err(not_an_address()),
    }
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback() {
        return Err(format!("{addr} cannot be a next hop's address"));
    }
    Ok(addr)
}

/// What the file alone can tell about one `ingress[].create` block.
fn plan_macvlan(
    problems: &mut Problems,
    here: &str,
    tenant: &str,
    interface: &str,
    create: &CreateMacvlan,
    internal: &[String],
) -> Option<PlannedMacvlan> {
    let field = |name: &str| format!("{here}.create.{name}");
    check_ifname(problems, &field("parent"), &create.parent);
    let parent_ok = internal.contains(&create.parent);
    if !parent_ok {
        problems.add(
            field("parent"),
            format!(
                "{} is not an internal interface (interfaces.internal: {}): the next hop sits \
                 on the interface the tenant's traffic arrives on",
                create.parent,
                internal.join(", ")
            ),
        );
    }
    let address = parse_next_hop(&create.address)
        .map_err(|message| problems.add(field("address"), message))
        .ok();
    let mac = match create.mac.as_deref() {
        None => Some((derived_mac(tenant, interface), true)),
        Some(text) => match parse_mac(text) {
            None => {
                problems.add(
                    field("mac"),
                    format!("{text} is not a MAC address like 02:00:00:00:00:01"),
                );
                None
            }
            Some(mac) if mac[0] & 1 == 1 => {
                problems.add(
                    field("mac"),
                    format!("{text} is a multicast MAC; a next hop needs a unicast one"),
                );
                None
            }
            Some([0, 0, 0, 0, 0, 0]) => {
                problems.add(field("mac"), format!("{text} is not a usable MAC"));
                None
            }
            Some(mac) => Some((mac, false)),
        },
    };
    let (mac, derived_mac) = mac?;
    if !parent_ok {
        return None;
    }
    Some(PlannedMacvlan {
        parent: create.parent.clone(),
        address: address?,
        mac,
        derived_mac,
    })
}

/// The default MAC of a macvlan the agent creates: locally administered,
/// unicast, from the tenant's and the macvlan's names, so the router's
/// cached entry stays right across restarts. FNV-1a, whose result no Rust
/// release changes (std's hasher may).
pub fn derived_mac(tenant: &str, interface: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tenant.bytes().chain([0]).chain(interface.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    [(b[2] & 0xfc) | 0x02, b[3], b[4], b[5], b[6], b[7]]
}

/// Across tenants: no two create the same macvlan, address or MAC; a
/// created macvlan is not a managed interface; its address is no egress IP.
fn check_created_macvlans(
    problems: &mut Problems,
    tenants: &[PlannedTenant],
    interfaces: &Interfaces,
) {
    let mut names: BTreeMap<&str, String> = BTreeMap::new();
    let mut addresses: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut macs: BTreeMap<[u8; 6], String> = BTreeMap::new();
    for (index, tenant) in tenants.iter().enumerate() {
        let at = TenantField::new(index, &tenant.name);
        for (i, ingress) in tenant.ingress.iter().enumerate() {
            let Some(create) = &ingress.create else {
                continue;
            };
            let here = at.field(&format!("ingress[{i}]"));
            let name = ingress.interface.as_str();
            if interfaces.external == name || interfaces.internal.iter().any(|n| n == name) {
                problems.add(
                    format!("{here}.interface"),
                    format!(
                        "{name} is a managed interface (interfaces.internal or external); \
                         the macvlan to create needs a name of its own"
                    ),
                );
            } else if let Some(first) = names.get(name) {
                problems.add(
                    format!("{here}.interface"),
                    format!("{name} is already created by {first}"),
                );
            } else {
                names.insert(name, here.clone());
            }
            let addr = create.address;
            if let Some(owner) = tenants.iter().position(|t| t.egress.contains(&addr)) {
                problems.add(
                    format!("{here}.create.address"),
                    format!(
                        "{addr} is an egress IP of {}",
                        TenantField::new(owner, &tenants[owner].name)
                    ),
                );
            } else if let Some(first) = addresses.get(&addr) {
                problems.add(
                    format!("{here}.create.address"),
                    format!("{addr} is already the address of the macvlan {first} creates"),
                );
            } else {
                addresses.insert(addr, here.clone());
            }
            if let Some(first) = macs.get(&create.mac) {
                let hint = if create.derived_mac {
                    " (derived from the tenant's and the macvlan's names: set create.mac)"
                } else {
                    ""
                };
                problems.add(
                    format!("{here}.create.mac"),
                    format!(
                        "{} is already the MAC of the macvlan {first} creates{hint}",
                        format_mac(create.mac)
                    ),
                );
            } else {
                macs.insert(create.mac, here);
            }
        }
    }
}

const GENERIC_XDP_REASON: &str = "set by configuration (xdp.mode: generic): a socket buffer per \
     packet like TC, but partial checksums and GSO packets from co-located senders are not \
     handled; hook: tc does everything this does";

/// The hook each interface asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookPlan {
    pub default: HookSetting,
    pub per_interface: BTreeMap<String, HookSetting>,
}

impl HookPlan {
    pub fn setting(&self, interface: &str) -> HookSetting {
        self.per_interface
            .get(interface)
            .copied()
            .unwrap_or(self.default)
    }

    /// The field a refusal for `interface` names.
    fn field(&self, interface: &str) -> String {
        if self.per_interface.contains_key(interface) {
            format!("interfaces.hooks.{interface}")
        } else {
            "interfaces.hook".to_owned()
        }
    }
}

/// The file, checked: typed addresses, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub internal: Vec<String>,
    pub external: String,
    pub hooks: HookPlan,
    pub tenants: Vec<PlannedTenant>,
    pub max_flows: u32,
    pub sweep_interval: Duration,
    pub timeouts: Timeouts,
    pub xdp_mode: XdpModeSetting,
    pub return_routes: Vec<PlannedRoute>,
    pub bfd_peers: Vec<PlannedBfdPeer>,
    pub audit: audit::AuditPlan,
    pub routed_sources: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRoute {
    pub destination: IpNet,
    /// Of the destination's family.
    pub via: IpAddr,
    pub interface: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBfdPeer {
    pub address: IpAddr,
    pub interface: Option<String>,
    pub min_tx: Duration,
    pub min_rx: Duration,
    pub multiplier: u8,
}

/// A BFD peer checked against the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedBfdPeer {
    pub address: IpAddr,
    pub interface: Option<LinkRef>,
    pub min_tx: Duration,
    pub min_rx: Duration,
    pub multiplier: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTenant {
    pub name: String,
    pub sources: Vec<Ipv4Net>,
    pub sources_v6: Vec<Ipv6Net>,
    /// Translate the IPv4 sources.
    pub egress: Vec<Ipv4Addr>,
    /// Translate the IPv6 sources.
    pub egress_v6: Vec<Ipv6Addr>,
    /// Where each of the above was written.
    pub written: WrittenAt,
    pub ingress: Vec<PlannedIngress>,
    pub ports: PortRange,
    pub limits: TenantLimits,
    pub forwards: Vec<inbound::PlannedForward>,
    pub floating: Vec<inbound::PlannedFloating>,
}

/// Where each parsed entry of a tenant's `sources` and `egressIPs` was
/// written (its index in the file's list), by family: problems found after
/// the lists were split by family still name the entry the operator wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrittenAt {
    pub sources: Vec<usize>,
    pub sources_v6: Vec<usize>,
    pub egress: Vec<usize>,
    pub egress_v6: Vec<usize>,
}

impl PlannedTenant {
    /// Both families' sources, each with the index it was written at.
    fn written_sources(&self) -> impl Iterator<Item = (IpNet, usize)> + '_ {
        let v4 = self.sources.iter().map(|n| IpNet::V4(*n));
        let v6 = self.sources_v6.iter().map(|n| IpNet::V6(*n));
        v4.zip(self.written.sources.iter().copied())
            .chain(v6.zip(self.written.sources_v6.iter().copied()))
    }

    /// Both families' egress IPs, each with the index it was written at.
    fn written_egress(&self) -> impl Iterator<Item = (IpAddr, usize)> + '_ {
        let v4 = self.egress.iter().map(|a| IpAddr::V4(*a));
        let v6 = self.egress_v6.iter().map(|a| IpAddr::V6(*a));
        v4.zip(self.written.egress.iter().copied())
            .chain(v6.zip(self.written.egress_v6.iter().copied()))
    }
}

/// What one tenant may take of the dataplane (see `limits` in egress-ebpf).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantLimits {
    /// Flows held at once.
    pub max_flows: u32,
    /// The tenant's own figure, not its share of the table.
    #[serde(skip)]
    pub max_flows_set: bool,
    /// New flows per second; 0: no limit.
    pub new_flows_per_second: u32,
    /// New flows at once above the rate.
    pub new_flow_burst: u32,
}

/// An `ingress` entry, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedIngress {
    pub interface: String,
    pub mac: Option<[u8; 6]>,
    pub create: Option<PlannedMacvlan>,
}

/// An `ingress[].create` block, parsed; its MAC filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMacvlan {
    pub parent: String,
    pub address: Ipv4Addr,
    pub mac: [u8; 6],
    /// The MAC was derived, not written.
    pub derived_mac: bool,
}

/// A macvlan next hop the agent makes (or finds made as wanted): mode
/// bridge on `parent`, with `mac` and `address`/32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacvlanSpec {
    pub name: String,
    pub parent: LinkRef,
    pub address: Ipv4Addr,
    pub mac: [u8; 6],
}

/// An interface as the kernel knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRef {
    pub name: String,
    pub index: u32,
}

/// Frames arriving on `ifindex` (addressed to `mac`, or to any MAC when it
/// is `None`) belong to the tenants that name this port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IngressPort {
    pub ifindex: u32,
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTenant {
    pub name: String,
    pub sources: Vec<Ipv4Net>,
    pub sources_v6: Vec<Ipv6Net>,
    pub egress: Vec<Ipv4Addr>,
    pub egress_v6: Vec<Ipv6Addr>,
    pub ingress: Vec<IngressPort>,
    pub ports: PortRange,
    pub limits: TenantLimits,
    pub forwards: Vec<inbound::PlannedForward>,
    pub floating: Vec<inbound::PlannedFloating>,
}

/// Where one interface's packet path runs, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceHook {
    pub link: LinkRef,
    pub hook: Hook,
    pub reason: String,
}

/// A plan checked against the machine: what the dataplane will be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub internal: Vec<LinkRef>,
    pub external: LinkRef,
    /// One per internal interface, in order, then the external one.
    pub hooks: Vec<InterfaceHook>,
    pub tenants: Vec<ResolvedTenant>,
    pub max_flows: u32,
    pub sweep_interval: Duration,
    pub timeouts: Timeouts,
    pub xdp_mode: XdpModeSetting,
    pub return_routes: Vec<crate::routes::ReturnRoute>,
    pub bfd_peers: Vec<ResolvedBfdPeer>,
    /// Interfaces (by name) that must answer ARP only for their own
    /// addresses: each ingress port's interface and the internal one it is
    /// on, macvlans the agent creates included.
    pub arp_isolated: Vec<String>,
    /// Macvlan next hops the agent creates, by name.
    pub macvlans: Vec<MacvlanSpec>,
    pub audit: audit::AuditPlan,
    /// Sources routed out untranslated (`routedSources`), both families.
    pub routed_sources: Vec<IpNet>,
}

impl Resolved {
    /// The hook chosen for an interface; TC for one the plan never named.
    pub fn hook_of(&self, ifindex: u32) -> Hook {
        self.hooks
            .iter()
            .find(|h| h.link.index == ifindex)
            .map_or(Hook::Tc, |h| h.hook)
    }

    /// Every address the gateway answers for outside: each tenant's egress
    /// IPs (both families) and floating IPs.
    pub fn egress_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.tenants.iter().flat_map(|t| {
            let v4 = t.egress.iter().copied().map(IpAddr::V4);
            let v6 = t.egress_v6.iter().copied().map(IpAddr::V6);
            v4.chain(v6).chain(t.floating.iter().map(|f| f.address))
        })
    }
}

impl Plan {
    /// Checks the plan against the machine's links and addresses.
    pub fn resolve(&self, system: &SystemView) -> Result<Resolved, Vec<Problem>> {
        self.resolve_owning(system, &BTreeSet::new())
    }

    /// Like [`Plan::resolve`], for an agent that created the links with
    /// the ifindexes `owned` (its state file says which): those it may
    /// recreate or remove, where a link someone else made is only ever
    /// used as it is.
    pub fn resolve_owning(
        &self,
        system: &SystemView,
        owned: &BTreeSet<u32>,
    ) -> Result<Resolved, Vec<Problem>> {
        let mut problems = Problems::default();
        let link = |problems: &mut Problems, field: String, name: &str| -> Option<LinkRef> {
            match system.link_by_name(name) {
                Some(facts) => Some(LinkRef {
                    name: facts.name.clone(),
                    index: facts.index,
                }),
                None => {
                    problems.add(field, format!("no interface named {name} on this machine"));
                    None
                }
            }
        };
        let internal: Vec<Option<LinkRef>> = self
            .internal
            .iter()
            .enumerate()
            .map(|(i, name)| link(&mut problems, format!("interfaces.internal[{i}]"), name))
            .collect();
        let external = link(
            &mut problems,
            "interfaces.external".to_owned(),
            &self.external,
        );
        let internal: Vec<LinkRef> = internal.into_iter().flatten().collect();

        // Next hops to create resolve against this same snapshot, before
        // they exist: their ingress port is the parent's ifindex and their
        // own MAC, both known now. So the whole file is checked before the
        // agent changes anything, and the agent creates them afterwards.
        let mut macvlans: Vec<MacvlanSpec> = Vec::new();
        for (index, tenant) in self.tenants.iter().enumerate() {
            let at = TenantField::new(index, &tenant.name);
            for (i, ingress) in tenant.ingress.iter().enumerate() {
                if let Some(create) = &ingress.create
                    && let Some(spec) = resolve_macvlan(
                        &mut problems,
                        &at.field(&format!("ingress[{i}]")),
                        &ingress.interface,
                        create,
                        &internal,
                        system,
                        owned,
                    )
                {
                    macvlans.push(spec);
                }
            }
        }
        macvlans.sort_by(|a, b| a.name.cmp(&b.name));

        // Looked up once per egress IP: ten thousand of them against as
        // many addresses would be a hundred million comparisons.
        let mut holders: HashMap<IpAddr, u32> = HashMap::with_capacity(system.addresses.len());
        for facts in &system.addresses {
            holders.entry(facts.addr).or_insert(facts.index);
        }
        let gateway_own = external
            .as_ref()
            .map(|external| GatewayOwn::of(system, external));
        let mut tenants = Vec::with_capacity(self.tenants.len());
        let mut arp_isolated: BTreeSet<String> = BTreeSet::new();
        for (index, tenant) in self.tenants.iter().enumerate() {
            let at = TenantField::new(index, &tenant.name);
            let mut ports = Vec::new();
            for (i, ingress) in tenant.ingress.iter().enumerate() {
                let here = at.field(&format!("ingress[{i}]"));
                let created = macvlans.iter().find(|m| m.name == ingress.interface);
                let port = match created {
                    Some(spec) => created_port(&mut problems, &here, ingress, spec),
                    // Refused above already.
                    None if ingress.create.is_some() => None,
                    None => {
                        resolve_ingress(&mut problems, &here, ingress, &internal, system, owned)
                    }
                };
                if let Some(port) = port {
                    arp_isolated.extend(system.link_by_index(port.ifindex).map(|l| l.name.clone()));
                    arp_isolated.insert(ingress.interface.clone());
                    ports.push(port);
                }
            }
            ports.sort_unstable();
            ports.dedup();
            for (addr, i) in tenant.written_egress() {
                let holder = holders
                    .get(&addr)
                    .and_then(|index| system.link_by_index(*index));
                if let Some(holder) = holder
                    && Some(holder.index) != external.as_ref().map(|e| e.index)
                {
                    problems.add(
                        at.field(&format!("egressIPs[{i}]")),
                        format!(
                            "{addr} is already configured on {}, not on the external interface",
                            holder.name
                        ),
                    );
                } else if let Some(message) = gateway_own.as_ref().and_then(|g| g.refusal(addr)) {
                    problems.add(at.field(&format!("egressIPs[{i}]")), message);
                }
            }
            // A floating IP is added to the external interface like an
            // egress IP, under the same rules.
            for (i, float) in tenant.floating.iter().enumerate() {
                let addr = float.address;
                let holder = holders
                    .get(&addr)
                    .and_then(|index| system.link_by_index(*index));
                let refusal = match holder {
                    Some(holder) if Some(holder.index) != external.as_ref().map(|e| e.index) => {
                        Some(format!(
                            "{addr} is already configured on {}, not on the external interface",
                            holder.name
                        ))
                    }
                    _ => gateway_own.as_ref().and_then(|g| g.refusal(addr)),
                };
                if let Some(message) = refusal {
                    problems.add(at.field(&format!("floatingIPs[{i}].address")), message);
                }
            }
            tenants.push(ResolvedTenant {
                name: tenant.name.clone(),
                sources: tenant.sources.clone(),
                sources_v6: tenant.sources_v6.clone(),
                egress: tenant.egress.clone(),
                egress_v6: tenant.egress_v6.clone(),
                ingress: ports,
                ports: tenant.ports,
                limits: tenant.limits,
                forwards: tenant.forwards.clone(),
                floating: tenant.floating.clone(),
            });
        }
        check_port_scoped_overlaps(&mut problems, &self.tenants, &tenants);
        let mut return_routes = Vec::new();
        for (i, route) in self.return_routes.iter().enumerate() {
            let ifindex = match &route.interface {
                Some(name) => link(&mut problems, format!("returnRoutes[{i}].interface"), name)
                    .map(|l| l.index),
                None => internal.first().map(|l| l.index),
            };
            if let Some(ifindex) = ifindex {
                return_routes.push(crate::routes::ReturnRoute {
                    destination: route.destination,
                    via: route.via,
                    ifindex,
                });
            }
        }
        let mut bfd_peers = Vec::new();
        for (i, peer) in self.bfd_peers.iter().enumerate() {
            let interface = match &peer.interface {
                Some(name) => {
                    match link(&mut problems, format!("bfd.peers[{i}].interface"), name) {
                        Some(link) => Some(link),
                        None => continue,
                    }
                }
                None => None,
            };
            bfd_peers.push(ResolvedBfdPeer {
                address: peer.address,
                interface,
                min_tx: peer.min_tx,
                min_rx: peer.min_rx,
                multiplier: peer.multiplier,
            });
        }
        let hooks = external
            .as_ref()
            .map(|external| self.resolve_hooks(&mut problems, &internal, external, system))
            .unwrap_or_default();
        let resolved = external.map(|external| Resolved {
            internal,
            external,
            hooks,
            tenants,
            max_flows: self.max_flows,
            sweep_interval: self.sweep_interval,
            timeouts: self.timeouts,
            xdp_mode: self.xdp_mode,
            return_routes,
            bfd_peers,
            arp_isolated: arp_isolated.into_iter().collect(),
            macvlans,
            audit: self.audit.clone(),
            routed_sources: self.routed_sources.clone(),
        });
        match (problems.into_result(()), resolved) {
            (Ok(()), Some(resolved)) => Ok(resolved),
            (Err(problems), _) => Err(problems),
            (Ok(()), None) => unreachable!("a missing external interface is a problem"),
        }
    }
}

/// The addresses the gateway itself uses on its external interface, which
/// no tenant may take as an egress IP: the reply program would take their
/// traffic (dropping whatever is not a reply to a tenant flow), and the
/// gateway could no longer be reached or reach out there.
struct GatewayOwn {
    interface: String,
    /// Addresses of the interface this agent did not add, both families.
    own: HashMap<IpAddr, u8>,
    /// Gateways of the routes through it, with a route that uses each.
    next_hops: HashMap<Ipv4Addr, String>,
    /// The subnets of its own addresses, whose network and broadcast
    /// addresses are no host's.
    subnets: Vec<Ipv4Net>,
}

impl GatewayOwn {
    fn of(system: &SystemView, external: &LinkRef) -> Self {
        let mut own = HashMap::new();
        let mut subnets = Vec::new();
        for facts in system
            .addresses
            .iter()
            .filter(|a| a.index == external.index)
        {
            if facts.egress_owned {
                continue;
            }
            own.insert(facts.addr, facts.prefix_len);
            let IpAddr::V4(addr) = facts.addr else {
                continue;
            };
            if facts.prefix_len <= 30
                && let Ok(net) = Ipv4Net::new(addr, facts.prefix_len)
            {
                subnets.push(net.trunc());
            }
        }
        let mut next_hops = HashMap::new();
        for hop in system
            .next_hops
            .iter()
            .filter(|h| h.index == external.index)
        {
            next_hops
                .entry(hop.via)
                .or_insert_with(|| hop.destination.clone());
        }
        Self {
            interface: external.name.clone(),
            own,
            next_hops,
            subnets,
        }
    }

    /// Why `addr` cannot be an egress IP, if it is one of these. Next hops
    /// and subnets are known for IPv4 only (IPv6 routes are not read).
    fn refusal(&self, addr: IpAddr) -> Option<String> {
        let interface = &self.interface;
        if let Some(prefix_len) = self.own.get(&addr) {
            return Some(format!(
                "{addr} is the gateway's own address on {interface} ({addr}/{prefix_len}, not \
                 added by this agent): the dataplane would take its traffic and cut the \
                 gateway off; pick an unused address"
            ));
        }
        let IpAddr::V4(addr) = addr else {
            return None;
        };
        if let Some(destination) = self.next_hops.get(&addr) {
            return Some(format!(
                "{addr} is the gateway's next hop on {interface} (route {destination} via \
                 {addr}): the gateway would answer for its router; pick an unused address"
            ));
        }
        for net in &self.subnets {
            if addr == net.network() {
                return Some(format!(
                    "{addr} is the network address of {interface}'s subnet {net}, no \
                     host's address; pick an unused address"
                ));
            }
            if addr == net.broadcast() {
                return Some(format!(
                    "{addr} is the broadcast address of {interface}'s subnet {net}, no \
                     host's address; pick an unused address"
                ));
            }
        }
        None
    }
}

impl Plan {
    /// Picks each interface's hook from what the kernel says about it and
    /// the interfaces it redirects to: internal interfaces send to the
    /// external one, the external one to every internal one.
    fn resolve_hooks(
        &self,
        problems: &mut Problems,
        internal: &[LinkRef],
        external: &LinkRef,
        system: &SystemView,
    ) -> Vec<InterfaceHook> {
        let facts = |link: &LinkRef| -> InterfaceFacts {
            let known = system.link_by_index(link.index);
            InterfaceFacts {
                name: link.name.clone(),
                ifindex: link.index,
                kind: known.and_then(|l| l.kind.clone()),
                xdp_features: known.and_then(|l| l.xdp_features),
            }
        };
        // A NIC driver offers ndo_xdp_xmit only while an XDP program runs on
        // the NIC itself: a hardware target that will run ours is judged as
        // it will be then (and checked again once attached).
        let as_target = |link: &LinkRef| -> InterfaceFacts {
            let mut target = facts(link);
            let will_run_xdp = self.hooks.setting(&link.name) != HookSetting::Tc;
            let forwards = hook_choice::XDP_ACT_BASIC | hook_choice::XDP_ACT_REDIRECT;
            let hardware = hook_choice::is_hardware(&target);
            if let Some(features) = target.xdp_features.as_mut()
                && hardware
                && will_run_xdp
                && *features & forwards == forwards
            {
                *features |= hook_choice::XDP_ACT_NDO_XMIT;
            }
            target
        };
        let external_facts = [as_target(external)];
        let internal_targets: Vec<InterfaceFacts> = internal.iter().map(as_target).collect();
        let internal_facts: Vec<InterfaceFacts> = internal.iter().map(facts).collect();
        let mut hooks = Vec::new();
        let external_ingress = facts(external);
        let sides = internal
            .iter()
            .zip(&internal_facts)
            .map(|(link, f)| (link, f, &external_facts[..]))
            .chain([(external, &external_ingress, &internal_targets[..])]);
        for (link, ingress, targets) in sides {
            let setting = self.hooks.setting(&link.name);
            // Generic XDP redirects through the kernel's stack, which takes
            // any target; only what XDP cannot see remains to warn about.
            if setting == HookSetting::Xdp && self.xdp_mode == XdpModeSetting::Generic {
                hooks.push(InterfaceHook {
                    link: link.clone(),
                    hook: Hook::Xdp,
                    reason: GENERIC_XDP_REASON.to_owned(),
                });
                continue;
            }
            match hook_choice::choose(setting, ingress, targets) {
                Ok(Choice { hook, reason }) => hooks.push(InterfaceHook {
                    link: link.clone(),
                    hook,
                    reason,
                }),
                Err(refusal) => problems.add(self.hooks.field(&link.name), refusal),
            }
        }
        hooks
    }
}

/// How a link is described in a refusal: "a veth", "a macvlan on eth1".
fn describe_link(link: &LinkFacts, system: &SystemView) -> String {
    match (link.kind.as_deref(), link.parent) {
        (None, _) => "a physical interface".to_owned(),
        (Some("macvlan"), Some(parent)) => {
            let parent = system
                .link_by_index(parent)
                .map_or_else(|| format!("ifindex {parent}"), |l| l.name.clone());
            format!("a macvlan on {parent}")
        }
        (Some(kind), _) => format!("a {kind}"),
    }
}

/// Checks one `create` block against the machine. A link of that name
/// this agent created is its to recreate; one it did not create is used
/// as it is, if it is exactly the macvlan asked for, and refused otherwise.
fn resolve_macvlan(
    problems: &mut Problems,
    here: &str,
    name: &str,
    create: &PlannedMacvlan,
    internal: &[LinkRef],
    system: &SystemView,
    owned: &BTreeSet<u32>,
) -> Option<MacvlanSpec> {
    // The plan checked the parent is internal; a missing one is reported
    // at interfaces.internal.
    let parent = internal.iter().find(|l| l.name == create.parent)?.clone();
    let address = create.address;
    let mut fine = true;
    if let Some(link) = system
        .link_by_name(name)
        .filter(|l| !owned.contains(&l.index))
    {
        if link.kind.as_deref() != Some("macvlan") || link.parent != Some(parent.index) {
            problems.add(
                format!("{here}.interface"),
                format!(
                    "{name} already exists as {}, not as a macvlan on {}; the agent never \
                     replaces a link it did not create: delete it or choose another name",
                    describe_link(link, system),
                    parent.name
                ),
            );
            return None;
        }
        if link.mac != Some(create.mac) {
            let own = link.mac.map_or_else(|| "none".to_owned(), format_mac);
            problems.add(
                format!("{here}.create.mac"),
                format!(
                    "{name} already exists (not created by this agent) with MAC {own}, not {}; \
                     the agent uses such a macvlan as it is: give mac: \"{own}\", or delete \
                     it for the agent to create",
                    format_mac(create.mac)
                ),
            );
            fine = false;
        }
        let has_address = system
            .addresses
            .iter()
            .any(|a| a.index == link.index && a.addr == IpAddr::V4(address));
        if !has_address {
            problems.add(
                format!("{here}.create.address"),
                format!(
                    "{name} already exists (not created by this agent) without {address}; the \
                     agent uses such a macvlan as it is: add {address}/32 to it, or delete it \
                     for the agent to create"
                ),
            );
            fine = false;
        }
    }
    // The kernel refuses to bring up a macvlan whose MAC its parent or a
    // sibling already has (EADDRINUSE), and the port would be theirs.
    // Another macvlan this agent made gives its MAC up first, as below.
    let twin = system.links.iter().find(|l| {
        l.mac == Some(create.mac)
            && l.name != name
            && !owned.contains(&l.index)
            && (l.index == parent.index || l.parent == Some(parent.index))
    });
    if let Some(twin) = twin {
        problems.add(
            format!("{here}.create.mac"),
            format!(
                "{} is already the MAC of {}, on {}; a next hop needs a MAC of its own",
                format_mac(create.mac),
                twin.name,
                parent.name
            ),
        );
        fine = false;
    }
    // The address may already be on this very macvlan, or on another one
    // this agent made, which gives it up (recreated with its new address,
    // or removed) before any macvlan is created.
    let elsewhere = system
        .addresses
        .iter()
        .filter(|a| a.addr == IpAddr::V4(address))
        .filter_map(|a| system.link_by_index(a.index))
        .find(|holder| holder.name != name && !owned.contains(&holder.index));
    if let Some(holder) = elsewhere {
        problems.add(
            format!("{here}.create.address"),
            format!("{address} is already configured on {}", holder.name),
        );
        fine = false;
    }
    fine.then(|| MacvlanSpec {
        name: name.to_owned(),
        parent,
        address,
        mac: create.mac,
    })
}

/// The port of an entry naming a macvlan this file creates (its own
/// `create`, or another tenant's).
fn created_port(
    problems: &mut Problems,
    field: &str,
    ingress: &PlannedIngress,
    spec: &MacvlanSpec,
) -> Option<IngressPort> {
    if ingress.create.is_none()
        && let Some(mac) = ingress.mac
        && mac != spec.mac
    {
        problems.add(
            format!("{field}.mac"),
            format!(
                "{} is created with MAC {}; leave mac out or give that one",
                spec.name,
                format_mac(spec.mac)
            ),
        );
        return None;
    }
    Some(IngressPort {
        ifindex: spec.parent.index,
        mac: Some(spec.mac),
    })
}

fn resolve_ingress(
    problems: &mut Problems,
    field: &str,
    ingress: &PlannedIngress,
    internal: &[LinkRef],
    system: &SystemView,
    owned: &BTreeSet<u32>,
) -> Option<IngressPort> {
    let mac = ingress.mac;
    let Some(link) = system.link_by_name(&ingress.interface) else {
        problems.add(
            format!("{field}.interface"),
            format!("no interface named {} on this machine", ingress.interface),
        );
        return None;
    };
    if owned.contains(&link.index) {
        problems.add(
            format!("{field}.interface"),
            format!(
                "{} was created by this agent for a next hop this configuration no longer \
                 creates, and goes once it applies: give this entry the create block",
                link.name
            ),
        );
        return None;
    }
    if internal.iter().any(|i| i.index == link.index) {
        return Some(IngressPort {
            ifindex: link.index,
            mac,
        });
    }
    // A macvlan on an internal interface: XDP on the parent sees its frames
    // first, addressed to the macvlan's MAC.
    let macvlan_parent = link
        .parent
        .filter(|_| link.kind.as_deref() == Some("macvlan"));
    if let Some(parent) = macvlan_parent
        && !internal.iter().any(|i| i.index == parent)
    {
        let parent = system
            .link_by_index(parent)
            .map_or_else(|| format!("ifindex {parent}"), |l| l.name.clone());
        problems.add(
            format!("{field}.interface"),
            format!(
                "{} is a macvlan on {parent}, which is not an internal interface \
                 (XDP on the internal interface is what sees its frames)",
                link.name
            ),
        );
        return None;
    }
    if macvlan_parent.is_some()
        && !system
            .addresses
            .iter()
            .any(|a| a.index == link.index && a.addr.is_ipv4())
    {
        problems.add(
            format!("{field}.interface"),
            format!(
                "{} has no IPv4 address: the router finds a macvlan next hop by ARP for \
                 its address (give it one, e.g. a /32 in the parent's subnet)",
                link.name
            ),
        );
        return None;
    }
    match (macvlan_parent, link.mac) {
        (Some(parent), Some(own_mac)) => {
            if mac.is_some_and(|mac| mac != own_mac) {
                problems.add(
                    format!("{field}.mac"),
                    format!(
                        "{} has MAC {}; leave mac out or give that one",
                        link.name,
                        format_mac(own_mac)
                    ),
                );
                return None;
            }
            Some(IngressPort {
                ifindex: parent,
                mac: Some(own_mac),
            })
        }
        _ => {
            problems.add(
                format!("{field}.interface"),
                format!(
                    "{} is neither an internal interface nor a macvlan on one",
                    link.name
                ),
            );
            None
        }
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn into_result<T>(self, value: T) -> Result<T, Vec<Problem>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }
}

/// `tenants[3] (tenant-b)`: the index finds the line, the name the meaning.
struct TenantField<'a> {
    index: usize,
    name: &'a str,
}

impl<'a> TenantField<'a> {
    fn new(index: usize, name: &'a str) -> Self {
        Self { index, name }
    }

    fn field(&self, rest: &str) -> String {
        format!("{self}.{rest}")
    }
}

impl fmt::Display for TenantField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "tenants[{}]", self.index)
        } else {
            write!(f, "tenants[{}] ({})", self.index, self.name)
        }
    }
}

fn check_ifname(problems: &mut Problems, field: &str, name: &str) {
    if name.is_empty() || name.len() > IFNAME_MAX || name.contains(['/', ' ']) {
        problems.add(
            field,
            format!(
                "{name:?} is not an interface name (1 to {IFNAME_MAX} characters, no '/' or spaces)"
            ),
        );
    }
}

fn check_tenant_name(problems: &mut Problems, at: &TenantField<'_>, name: &str) {
    if name.is_empty() {
        problems.add(at.field("name"), "must not be empty");
    } else if name.len() >= TENANT_NAME_LEN || name.chars().any(char::is_control) {
        problems.add(
            at.field("name"),
            format!("must be under {TENANT_NAME_LEN} bytes without control characters"),
        );
    }
}

/// A tenant's sources, split by family; `written` learns where each was.
fn parse_sources(
    problems: &mut Problems,
    at: &TenantField<'_>,
    sources: &[String],
    written: &mut WrittenAt,
) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    if sources.is_empty() {
        problems.add(at.field("sources"), "must list at least one source CIDR");
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for (i, text) in sources.iter().enumerate() {
        let field = at.field(&format!("sources[{i}]"));
        match parse_source(text) {
            Ok(IpNet::V4(net)) if v4.contains(&net) => {
                problems.add(field, format!("{net} is listed twice"));
            }
            Ok(IpNet::V6(net)) if v6.contains(&net) => {
                problems.add(field, format!("{net} is listed twice"));
            }
            Ok(IpNet::V4(net)) => {
                v4.push(net);
                written.sources.push(i);
            }
            Ok(IpNet::V6(net)) => {
                v6.push(net);
                written.sources_v6.push(i);
            }
            Err(message) => problems.add(field, message),
        }
    }
    (v4, v6)
}

/// A tenant's egress IPs, split by family; `written` learns where each was.
fn parse_egress(
    problems: &mut Problems,
    at: &TenantField<'_>,
    egress: &[String],
    written: &mut WrittenAt,
) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for (i, text) in egress.iter().enumerate() {
        let field = at.field(&format!("egressIPs[{i}]"));
        match text.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(addr)) if v4.contains(&addr) => {
                problems.add(field, format!("{addr} is listed twice"));
            }
            Ok(IpAddr::V6(addr)) if v6.contains(&addr) => {
                problems.add(field, format!("{addr} is listed twice"));
            }
            Ok(IpAddr::V4(addr))
                if addr.is_unspecified()
                    || addr.is_broadcast()
                    || addr.is_multicast()
                    || addr.is_loopback() =>
            {
                problems.add(field, format!("{addr} cannot be a source address"));
            }
            Ok(IpAddr::V4(addr)) => {
                v4.push(addr);
                written.egress.push(i);
            }
            Ok(IpAddr::V6(addr)) => match unusable_v6_egress(addr) {
                Some(why) => problems.add(field, format!("{addr} {why}")),
                None => {
                    v6.push(addr);
                    written.egress_v6.push(i);
                }
            },
            Err(_) => problems.add(field, format!("{text:?} is not an IPv4 or IPv6 address")),
        }
    }
    for (family, count) in [("IPv4", v4.len()), ("IPv6", v6.len())] {
        if count > MAX_EGRESS_ADDRS {
            problems.add(
                at.field("egressIPs"),
                format!(
                    "{count} {family} addresses, at most {MAX_EGRESS_ADDRS} per tenant in each \
                     address family"
                ),
            );
        }
    }
    (v4, v6)
}

/// Why an IPv6 address cannot be an egress IP, if it cannot.
pub(crate) fn unusable_v6_egress(addr: Ipv6Addr) -> Option<&'static str> {
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
        Some("cannot be a source address")
    } else if addr.is_unicast_link_local() {
        Some("is link-local: translated flows leave the link, their replies could not come back")
    } else if addr.to_ipv4_mapped().is_some() {
        Some("is an IPv4-mapped IPv6 address: write the IPv4 address itself")
    } else {
        None
    }
}

/// Packets are translated within their family (NAT44, NAT66), never
/// across: each family of sources needs egress IPs of its own family.
/// Floating IPs stand in for egress IPs of their family (a NAT gateway's
/// host with only a floating IP: its hosts with one leave from it, the
/// others get nothing out).
fn check_families(
    problems: &mut Problems,
    at: &TenantField<'_>,
    tenant: &Tenant,
    (sources, sources_v6): (&[Ipv4Net], &[Ipv6Net]),
    (egress, egress_v6): (&[Ipv4Addr], &[Ipv6Addr]),
) {
    let floating: Vec<IpAddr> = tenant
        .floating_ips
        .iter()
        .filter_map(|f| f.address.trim().parse().ok())
        .collect();
    let (floating_v4, floating_v6) = (
        floating.iter().any(IpAddr::is_ipv4),
        floating.iter().any(IpAddr::is_ipv6),
    );
    if tenant.egress_ips.is_empty() && tenant.floating_ips.is_empty() {
        problems.add(
            at.field("egressIPs"),
            "must list at least one egress address (or the tenant's floatingIPs)",
        );
        return;
    }
    // Only when some address parsed: a list of typos is reported entry by entry.
    if !tenant.egress_ips.is_empty() && egress.is_empty() && egress_v6.is_empty() {
        return;
    }
    if !sources.is_empty() && egress.is_empty() && !floating_v4 {
        problems.add(
            at.field("egressIPs"),
            "the IPv4 sources need at least one IPv4 egress address (or the tenant's \
             floatingIPs): IPv6 addresses translate only IPv6 sources",
        );
    }
    if !sources_v6.is_empty() && egress_v6.is_empty() && !floating_v6 {
        problems.add(
            at.field("egressIPs"),
            "the IPv6 sources need at least one IPv6 egress address (or the tenant's \
             floatingIPs): IPv4 addresses translate only IPv4 sources",
        );
    }
}

/// The most new flows per second (and burst) a tenant may be given: far
/// beyond any single gateway, and small enough for the dataplane's token
/// arithmetic.
pub const MAX_NEW_FLOW_RATE: u32 = 10_000_000;

/// A tenant's own limits, checked; its quota is filled in by `share_flows`
/// when the tenant sets none.
fn plan_limits(
    problems: &mut Problems,
    at: &TenantField,
    tenant: &Tenant,
    table: u32,
) -> TenantLimits {
    let mut limits = TenantLimits::default();
    if let Some(max_flows) = tenant.max_flows {
        if max_flows == 0 || max_flows > table {
            problems.add(
                at.field("maxFlows"),
                format!("{max_flows} is outside 1..={table} (conntrack.maxFlows, the whole table)"),
            );
        }
        limits.max_flows = max_flows;
        limits.max_flows_set = true;
    }
    if let Some(rate) = tenant.new_flows_per_second {
        if !(1..=MAX_NEW_FLOW_RATE).contains(&rate) {
            problems.add(
                at.field("newFlowsPerSecond"),
                format!("{rate} is outside 1..={MAX_NEW_FLOW_RATE}"),
            );
        }
        limits.new_flows_per_second = rate;
        limits.new_flow_burst = rate;
    }
    if let Some(burst) = tenant.new_flow_burst {
        if tenant.new_flows_per_second.is_none() {
            problems.add(
                at.field("newFlowBurst"),
                "needs newFlowsPerSecond: a burst is the room above a rate",
            );
        } else if !(1..=MAX_NEW_FLOW_RATE).contains(&burst) {
            problems.add(
                at.field("newFlowBurst"),
                format!("{burst} is outside 1..={MAX_NEW_FLOW_RATE}"),
            );
        }
        limits.new_flow_burst = burst;
    }
    limits
}

/// Gives every tenant without its own `maxFlows` an equal share of what the
/// others leave of the table, so that, unless the operator overcommits on
/// purpose, the quotas add up to the table and no tenant can take room
/// another is owed.
fn share_flows(problems: &mut Problems, tenants: &mut [PlannedTenant], table: u32) {
    let explicit: u64 = tenants
        .iter()
        .filter(|t| t.limits.max_flows_set)
        .map(|t| u64::from(t.limits.max_flows))
        .sum();
    let sharing = tenants.iter().filter(|t| !t.limits.max_flows_set).count() as u64;
    if sharing == 0 {
        return;
    }
    let share = u64::from(table).saturating_sub(explicit) / sharing;
    if share == 0 {
        problems.add(
            "conntrack.maxFlows",
            format!(
                "{table} flows leave no share for the {sharing} tenants without maxFlows \
                 (tenants' own maxFlows take {explicit}): raise conntrack.maxFlows or \
                 give those tenants maxFlows"
            ),
        );
        return;
    }
    for tenant in tenants.iter_mut().filter(|t| !t.limits.max_flows_set) {
        tenant.limits.max_flows = share as u32;
    }
}

impl Resolved {
    /// Flows the tenants' quotas add up to beyond the table: 0 unless the
    /// operator gave tenants more than the table holds, in which case
    /// tenants together can fill it and then every tenant's new flows are
    /// refused (`out_drop_conntrack_full`) until flows end.
    pub fn overcommitted_flows(&self) -> u64 {
        let total: u64 = self
            .tenants
            .iter()
            .map(|t| u64::from(t.limits.max_flows))
            .sum();
        total.saturating_sub(u64::from(self.max_flows))
    }
}

/// A tenant's source prefix, IPv4 or IPv6, with no host bits set; a bare
/// address means its whole width (/32, /128).
pub fn parse_source(text: &str) -> Result<IpNet, String> {
    parse_prefix(text, "172.20.10.0/24 or fd00:10::/64")
}

/// A prefix of either family with no host bits set; `example` says what
/// was expected when `text` is none.
fn parse_prefix(text: &str, example: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let not_a_cidr = || format!("{text:?} is not a CIDR like {example}");
    let net = if text.contains('/') {
        text.parse::<IpNet>().map_err(|_| not_a_cidr())?
    } else {
        IpNet::from(text.parse::<IpAddr>().map_err(|_| not_a_cidr())?)
    };
    if net.addr() != net.network() {
        return Err(format!(
            "{net} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A source prefix and where it was written.
struct SourceAt {
    net: IpNet,
    tenant: usize,
    index: usize,
}

/// A prefix as (family, first, last) address: IPv4 sorts before IPv6, and
/// within a family the numbers compare as the addresses do.
fn span(net: &IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(net) => (
            false,
            u128::from(u32::from(net.network())),
            u128::from(u32::from(net.broadcast())),
        ),
        IpNet::V6(net) => (true, u128::from(net.network()), u128::from(net.broadcast())),
    }
}

/// An address as (family, number), comparable with `span`'s bounds.
fn point(addr: IpAddr) -> (bool, u128) {
    match addr {
        IpAddr::V4(addr) => (false, u128::from(u32::from(addr))),
        IpAddr::V6(addr) => (true, u128::from(addr)),
    }
}

/// Sources of tenants that share no ingress port must not overlap: a
/// packet's source would name two tenants. Sorted by family and network
/// address, a prefix overlaps an earlier one exactly when it starts before
/// the widest earlier prefix of its family ends, so one pass finds every
/// clash.
fn overlaps(items: &mut [SourceAt]) -> Vec<(usize, usize)> {
    items.sort_by_key(|s| {
        let (family, start, _) = span(&s.net);
        (family, start, s.net.prefix_len())
    });
    let mut clashes = Vec::new();
    let mut widest: Option<usize> = None;
    for i in 0..items.len() {
        let (family, start, _) = span(&items[i].net);
        if let Some(w) = widest {
            let (widest_family, _, widest_end) = span(&items[w].net);
            if family == widest_family && start <= widest_end {
                clashes.push((w, i));
                continue;
            }
        }
        widest = Some(i);
    }
    clashes
}

fn report_overlaps(problems: &mut Problems, names: &[&str], items: &mut [SourceAt]) {
    for (earlier, later) in overlaps(items) {
        let (a, b) = (&items[earlier], &items[later]);
        let here =
            TenantField::new(b.tenant, names[b.tenant]).field(&format!("sources[{}]", b.index));
        let there = TenantField::new(a.tenant, names[a.tenant]);
        let message = if a.tenant == b.tenant {
            format!("{} overlaps {} of the same tenant", b.net, a.net)
        } else {
            format!("{} overlaps {} of {there}", b.net, a.net)
        };
        problems.add(here, message);
    }
}

fn check_source_overlaps(problems: &mut Problems, tenants: &[PlannedTenant]) {
    // Tenants selected by ingress port are checked per port once ports are
    // resolved; here only tenants chosen by source alone.
    let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
    let mut items: Vec<SourceAt> = tenants
        .iter()
        .enumerate()
        .filter(|(_, t)| t.ingress.is_empty())
        .flat_map(|(tenant, t)| {
            t.written_sources()
                .map(move |(net, index)| SourceAt { net, tenant, index })
        })
        .collect();
    report_overlaps(problems, &names, &mut items);
}

/// `planned` and `resolved` are the same tenants in the same order: the
/// ports are resolved, the written indices planned.
fn check_port_scoped_overlaps(
    problems: &mut Problems,
    planned: &[PlannedTenant],
    resolved: &[ResolvedTenant],
) {
    let names: Vec<&str> = resolved.iter().map(|t| t.name.as_str()).collect();
    let mut by_port: BTreeMap<IngressPort, Vec<SourceAt>> = BTreeMap::new();
    for (tenant, (p, r)) in planned.iter().zip(resolved).enumerate() {
        for port in &r.ingress {
            for (net, index) in p.written_sources() {
                by_port
                    .entry(*port)
                    .or_default()
                    .push(SourceAt { net, tenant, index });
            }
        }
    }
    for items in by_port.values_mut() {
        report_overlaps(problems, &names, items);
    }
}

/// An egress address inside a tenant's sources would be translated to
/// itself and classified as the tenant's host at once.
fn check_egress_outside_sources(problems: &mut Problems, tenants: &[PlannedTenant]) {
    let mut ranges: Vec<(bool, u128, u128)> = tenants
        .iter()
        .flat_map(PlannedTenant::written_sources)
        .map(|(net, _)| span(&net))
        .collect();
    ranges.sort_unstable();
    // Merged into disjoint intervals per family, one binary search answers
    // "inside any?".
    let mut merged: Vec<(bool, u128, u128)> = Vec::with_capacity(ranges.len());
    for (family, start, end) in ranges {
        match merged.last_mut() {
            Some(last) if last.0 == family && start <= last.2 => last.2 = last.2.max(end),
            _ => merged.push((family, start, end)),
        }
    }
    for (index, tenant) in tenants.iter().enumerate() {
        for (addr, i) in tenant.written_egress() {
            let (family, value) = point(addr);
            let upto = merged.partition_point(|(f, start, _)| (*f, *start) <= (family, value));
            if upto == 0 || merged[upto - 1].0 != family || merged[upto - 1].2 < value {
                continue;
            }
            let owner = tenants
                .iter()
                .position(|t| t.written_sources().any(|(n, _)| n.contains(&addr)))
                .unwrap_or(index);
            let owner = TenantField::new(owner, &tenants[owner].name);
            problems.add(
                TenantField::new(index, &tenant.name).field(&format!("egressIPs[{i}]")),
                format!("{addr} lies inside the sources of {owner}"),
            );
        }
    }
}

pub mod audit;
pub mod inbound;

#[cfg(test)]
mod tests;
