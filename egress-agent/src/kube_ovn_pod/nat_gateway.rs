//! Kube-OVN's VpcNatGateway contract, served by this agent.
//!
//! The controller runs `bash /kube-ovn/nat-gateway.sh <verb> <rule>...` in
//! the gateway pod's privileged container (`sleep infinity`), counts a
//! non-zero exit or any byte on stderr as failure, and replays every rule
//! after a pod restart. Each verb here edits a rule set kept in one file,
//! turns the whole set into the agent's configuration (a tenant per EIP
//! with SNAT rules, its port forwards, floating IPs) and has the agent
//! serve it: `init` starts the agent (detached, it outlives the exec), the
//! other verbs send it SIGHUP and wait until `applied.json` says the new
//! file serves, or print why it does not and fail. A replayed rule changes
//! nothing and returns at once. An agent that died is started again by the
//! next verb; its dataplane kept serving meanwhile (pins in the
//! container's bpffs, `--keep-dataplane`).
//!
//! Where Kube-OVN's iptables and this dataplane differ, the verb fails
//! with the reason rather than doing something else: SNAT sources of two
//! EIPs may not overlap, a DNAT target must leave through the same EIP
//! (or through none, and then it does), QoS verbs are not served.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{applied, instance::Instance};

/// Where the rule set, the generated configuration, the agent's log and
/// pid live (`EGRESS_NAT_GATEWAY_DIR` overrides it).
pub const DEFAULT_DIR: &str = "/etc/egress/nat-gateway";
/// How long a verb waits for the agent to serve what it wrote; the first
/// start loads and verifies the programs.
const APPLY_TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);

/// The rule set: everything the controller told this pod since `init`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    pub vpc_interface: String,
    pub external_interface: String,
    /// EIPs with their prefix length, as `eip-add` gave them.
    pub eips: BTreeMap<Ipv4Addr, u8>,
    pub subnet_routes: BTreeMap<Ipv4Net, Ipv4Addr>,
    pub snats: BTreeSet<(Ipv4Addr, Ipv4Net)>,
    pub dnats: BTreeSet<Dnat>,
    /// EIP -> internal host.
    pub floating: BTreeMap<Ipv4Addr, Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dnat {
    pub eip: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
    pub host: Ipv4Addr,
    pub host_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One invocation of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    Init(Option<(String, String)>),
    SubnetRouteAdd(Vec<(Ipv4Net, Ipv4Addr)>),
    SubnetRouteDel(Vec<Ipv4Net>),
    EipAdd(Vec<(Ipv4Addr, u8)>),
    EipDel(Vec<Ipv4Addr>),
    SnatAdd(Vec<(Ipv4Addr, Ipv4Net)>),
    SnatDel(Vec<(Ipv4Addr, Ipv4Net)>),
    DnatAdd(Vec<Dnat>),
    /// (eip, port, protocol): the target is not needed to find the rule.
    DnatDel(Vec<(Ipv4Addr, u16, Protocol)>),
    FloatingAdd(Vec<(Ipv4Addr, Ipv4Addr)>),
    FloatingDel(Vec<Ipv4Addr>),
    GetIptablesVersion,
}

/// The QoS verbs Kube-OVN's script has: refused, with the reason.
const QOS_VERBS: [&str; 6] = [
    "eip-ingress-qos-add",
    "eip-egress-qos-add",
    "eip-ingress-qos-del",
    "eip-egress-qos-del",
    "qos-add",
    "qos-del",
];

fn addr(text: &str) -> Result<Ipv4Addr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 address"))
}

/// `a.b.c.d` or `a.b.c.d/len`: the address and its prefix (32 without).
fn addr_with_prefix(text: &str) -> Result<(Ipv4Addr, u8), String> {
    match text.split_once('/') {
        None => Ok((addr(text)?, 32)),
        Some((a, len)) => {
            let len: u8 = len
                .parse()
                .ok()
                .filter(|len| *len <= 32)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to 32"))?;
            Ok((addr(a)?, len))
        }
    }
}

fn cidr(text: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = text
        .trim()
        .parse()
        .or_else(|_| addr(text).map(Ipv4Net::from))
        .map_err(|_| format!("{text:?} is not an IPv4 CIDR"))?;
    Ok(net.trunc())
}

fn port(text: &str) -> Result<u16, String> {
    text.trim()
        .parse()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("{text:?} is not a port (1 to 65535)"))
}

fn protocol(text: &str) -> Result<Protocol, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(format!("protocol {text:?} is neither tcp nor udp")),
    }
}

/// Splits a rule into its comma-separated fields, checking their count.
fn fields<'a>(rule: &'a str, counts: &[usize], format: &str) -> Result<Vec<&'a str>, String> {
    let fields: Vec<&str> = rule.split(',').map(str::trim).collect();
    if counts.contains(&fields.len()) {
        Ok(fields)
    } else {
        Err(format!("rule {rule:?}: expected {format}"))
    }
}

fn each<T>(rules: &[String], parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    if rules.is_empty() {
        return Err("no rule given".to_owned());
    }
    rules.iter().map(|rule| parse(rule)).collect()
}

impl Verb {
    /// The verb and its rules as the controller passes them.
    pub fn parse(verb: &str, rules: &[String]) -> Result<Self, String> {
        Ok(match verb {
            "init" => {
                // Kube-OVN accepts "net1,net2" and "net1, net2".
                let joined = rules.concat();
                if joined.trim().is_empty() {
                    Self::Init(None)
                } else {
                    let parts: Vec<&str> = joined.split(',').map(str::trim).collect();
                    match parts.as_slice() {
                        [vpc, ext] if !vpc.is_empty() && !ext.is_empty() => {
                            Self::Init(Some(((*vpc).to_owned(), (*ext).to_owned())))
                        }
                        _ => {
                            return Err(format!(
                                "expected two interfaces separated by a comma (vpcIf,extIf), \
                                 got {joined:?}"
                            ));
                        }
                    }
                }
            }
            "subnet-route-add" => Self::SubnetRouteAdd(each(rules, |rule| {
                let f = fields(rule, &[2], "cidr,nextHop")?;
                Ok((cidr(f[0])?, addr(f[1])?))
            })?),
            "subnet-route-del" => Self::SubnetRouteDel(each(rules, |rule| {
                let f = fields(rule, &[1, 2], "cidr")?;
                cidr(f[0])
            })?),
            "eip-add" => Self::EipAdd(each(rules, addr_with_prefix)?),
            "eip-del" => Self::EipDel(each(rules, |rule| {
                let f = fields(rule, &[1, 2], "eip")?;
                Ok(addr_with_prefix(f[0])?.0)
            })?),
            "snat-add" | "snat-del" => {
                let parsed = each(rules, |rule| {
                    let f = fields(rule, &[2, 3], "eip,internalCIDR[,--random-fully]")?;
                    if let Some(option) = f.get(2).filter(|o| !o.is_empty()) {
                        // Ports are always handed out at random here.
                        if *option != "--random-fully" {
                            return Err(format!("rule {rule:?}: unknown option {option:?}"));
                        }
                    }
                    Ok((addr_with_prefix(f[0])?.0, cidr(f[1])?))
                })?;
                if verb == "snat-add" {
                    Self::SnatAdd(parsed)
                } else {
                    Self::SnatDel(parsed)
                }
            }
            "dnat-add" => Self::DnatAdd(each(rules, |rule| {
                let f = fields(
                    rule,
                    &[5],
                    "eip,externalPort,protocol,internalIp,internalPort",
                )?;
                Ok(Dnat {
                    eip: addr_with_prefix(f[0])?.0,
                    port: port(f[1])?,
                    protocol: protocol(f[2])?,
                    host: addr(f[3])?,
                    host_port: port(f[4])?,
                })
            })?),
            "dnat-del" => Self::DnatDel(each(rules, |rule| {
                let f = fields(
                    rule,
                    &[3, 4, 5],
                    "eip,externalPort,protocol[,internalIp,internalPort]",
                )?;
                Ok((addr_with_prefix(f[0])?.0, port(f[1])?, protocol(f[2])?))
            })?),
            "floating-ip-add" => Self::FloatingAdd(each(rules, |rule| {
                let f = fields(rule, &[2], "eip,internalIp")?;
                Ok((addr_with_prefix(f[0])?.0, addr(f[1])?))
            })?),
            "floating-ip-del" => Self::FloatingDel(each(rules, |rule| {
                let f = fields(rule, &[1, 2], "eip")?;
                Ok(addr_with_prefix(f[0])?.0)
            })?),
            "get-iptables-version" => Self::GetIptablesVersion,
            qos if QOS_VERBS.contains(&qos) => {
                return Err(format!(
                    "{qos}: QoS is not served by the egress image (Kube-OVN shapes EIP \
                     bandwidth with tc on the pod's interfaces); remove the QoS policy from \
                     this gateway's EIPs, or use Kube-OVN's own image for QoS"
                ));
            }
            other => return Err(format!("unknown verb {other:?}")),
        })
    }

    /// Applies the verb to the rule set. An error leaves it unchanged.
    pub fn apply(&self, rules: &mut Rules) -> Result<(), String> {
        match self {
            Self::Init(interfaces) => {
                if let Some((vpc, ext)) = interfaces {
                    rules.vpc_interface.clone_from(vpc);
                    rules.external_interface.clone_from(ext);
                }
            }
            Self::SubnetRouteAdd(routes) => rules.subnet_routes.extend(routes.iter().copied()),
            Self::SubnetRouteDel(routes) => {
                for net in routes {
                    rules.subnet_routes.remove(net);
                }
            }
            Self::EipAdd(eips) => rules.eips.extend(eips.iter().copied()),
            Self::EipDel(eips) => {
                for eip in eips {
                    rules.eips.remove(eip);
                }
            }
            Self::SnatAdd(snats) => rules.snats.extend(snats.iter().copied()),
            Self::SnatDel(snats) => {
                for snat in snats {
                    rules.snats.remove(snat);
                }
            }
            Self::DnatAdd(dnats) => {
                for dnat in dnats {
                    let same_port = rules.dnats.iter().find(|d| {
                        (d.eip, d.port, d.protocol) == (dnat.eip, dnat.port, dnat.protocol)
                    });
                    if let Some(existing) = same_port.filter(|d| *d != dnat) {
                        return Err(format!(
                            "dnat ({}, {}, {}) already forwards to {}:{}, not {}:{}",
                            dnat.eip,
                            dnat.port,
                            dnat.protocol.as_str(),
                            existing.host,
                            existing.host_port,
                            dnat.host,
                            dnat.host_port
                        ));
                    }
                    rules.dnats.insert(*dnat);
                }
            }
            Self::DnatDel(keys) => {
                rules
                    .dnats
                    .retain(|d| !keys.contains(&(d.eip, d.port, d.protocol)));
            }
            Self::FloatingAdd(pairs) => {
                for (eip, host) in pairs {
                    match rules.floating.get(eip) {
                        Some(bound) if bound != host => {
                            return Err(format!(
                                "eip {eip} is already the floating IP of {bound}, not {host}"
                            ));
                        }
                        _ => {
                            rules.floating.insert(*eip, *host);
                        }
                    }
                }
            }
            Self::FloatingDel(eips) => {
                for eip in eips {
                    rules.floating.remove(eip);
                }
            }
            Self::GetIptablesVersion => {}
        }
        Ok(())
    }
}

/// A tenant of the generated configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    pub name: String,
    pub sources: Vec<String>,
    #[serde(rename = "egressIPs")]
    pub egress_ips: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<ForwardSpec>,
    #[serde(rename = "floatingIPs", skip_serializing_if = "Vec::is_empty")]
    pub floating_ips: Vec<FloatingSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForwardSpec {
    #[serde(rename = "egressIP")]
    pub egress_ip: String,
    pub protocol: String,
    pub port: u16,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FloatingSpec {
    pub address: String,
    pub host: String,
}

fn dashed(addr: Ipv4Addr) -> String {
    addr.to_string().replace('.', "-")
}

/// Which tenant's sources hold `host`, by index.
fn owner(tenants: &[(Ipv4Addr, Vec<Ipv4Net>)], host: Ipv4Addr) -> Option<usize> {
    tenants
        .iter()
        .position(|(_, sources)| sources.iter().any(|net| net.contains(&host)))
}

/// The tenants the rule set means: one per EIP that SNATs or forwards,
/// with the hosts its DNAT rules reach and leave through it; floating IPs
/// with the tenant that holds their host, or alone.
pub fn tenants(rules: &Rules) -> Result<Vec<TenantSpec>, String> {
    let floating_eips: BTreeSet<Ipv4Addr> = rules.floating.keys().copied().collect();
    let mut by_eip: Vec<(Ipv4Addr, Vec<Ipv4Net>)> = Vec::new();
    for (eip, net) in &rules.snats {
        if floating_eips.contains(eip) {
            return Err(format!(
                "eip {eip} is a floating IP; it cannot also SNAT {net}"
            ));
        }
        match by_eip.iter_mut().find(|(e, _)| e == eip) {
            Some((_, sources)) => sources.push(*net),
            None => by_eip.push((*eip, vec![*net])),
        }
    }
    let mut forwards: BTreeMap<Ipv4Addr, Vec<&Dnat>> = BTreeMap::new();
    for dnat in &rules.dnats {
        if floating_eips.contains(&dnat.eip) {
            return Err(format!(
                "eip {} is a floating IP; it already forwards every port to {}",
                dnat.eip, rules.floating[&dnat.eip]
            ));
        }
        match owner(&by_eip, dnat.host) {
            Some(index) if by_eip[index].0 == dnat.eip => {}
            Some(index) => {
                return Err(format!(
                    "{} leaves through eip {} (its SNAT rule); a DNAT to it must use that eip, \
                     not {}: replies leave through the address the host's traffic does",
                    dnat.host, by_eip[index].0, dnat.eip
                ));
            }
            None => {
                // Kube-OVN would let the host's own traffic out untranslated;
                // here a host reachable through an EIP also leaves through it.
                let host = Ipv4Net::from(dnat.host);
                match by_eip.iter_mut().find(|(e, _)| *e == dnat.eip) {
                    Some((_, sources)) => sources.push(host),
                    None => by_eip.push((dnat.eip, vec![host])),
                }
            }
        }
        forwards.entry(dnat.eip).or_default().push(dnat);
    }
    let mut tenants: Vec<TenantSpec> = by_eip
        .iter()
        .map(|(eip, sources)| TenantSpec {
            name: format!("eip-{}", dashed(*eip)),
            sources: sources.iter().map(ToString::to_string).collect(),
            egress_ips: vec![eip.to_string()],
            port_forwards: forwards
                .get(eip)
                .into_iter()
                .flatten()
                .map(|d| ForwardSpec {
                    egress_ip: d.eip.to_string(),
                    protocol: d.protocol.as_str().to_owned(),
                    port: d.port,
                    to: format!("{}:{}", d.host, d.host_port),
                })
                .collect(),
            floating_ips: Vec::new(),
        })
        .collect();
    for (eip, host) in &rules.floating {
        let floating = FloatingSpec {
            address: eip.to_string(),
            host: host.to_string(),
        };
        match owner(&by_eip, *host) {
            Some(index) => tenants[index].floating_ips.push(floating),
            None => tenants.push(TenantSpec {
                name: format!("fip-{}", dashed(*eip)),
                sources: vec![Ipv4Net::from(*host).to_string()],
                egress_ips: Vec::new(),
                port_forwards: Vec::new(),
                floating_ips: vec![floating],
            }),
        }
    }
    Ok(tenants)
}

/// The agent's configuration file for the rule set (JSON, which YAML
/// parsers read as YAML).
pub fn configuration(rules: &Rules) -> Result<String, String> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct File<'a> {
        interfaces: Interfaces<'a>,
        tenants: Vec<TenantSpec>,
        return_routes: Vec<Route>,
    }
    #[derive(Serialize)]
    struct Interfaces<'a> {
        internal: [&'a str; 1],
        external: &'a str,
    }
    #[derive(Serialize)]
    struct Route {
        destination: String,
        via: String,
        interface: String,
    }
    let file = File {
        interfaces: Interfaces {
            internal: [&rules.vpc_interface],
            external: &rules.external_interface,
        },
        tenants: tenants(rules)?,
        return_routes: rules
            .subnet_routes
            .iter()
            .map(|(net, via)| Route {
                destination: net.to_string(),
                via: via.to_string(),
                interface: rules.vpc_interface.clone(),
            })
            .collect(),
    };
    let mut text = serde_json::to_string_pretty(&file).map_err(|err| err.to_string())?;
    text.push('\n');
    Ok(text)
}

/// The files of one NAT gateway.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn from_env() -> Self {
        let dir = std::env::var_os("EGRESS_NAT_GATEWAY_DIR")
            .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from);
        Self { dir }
    }

    fn rules(&self) -> PathBuf {
        self.dir.join("rules.json")
    }

    fn config(&self) -> PathBuf {
        self.dir.join("egress.yaml")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    fn pid(&self) -> PathBuf {
        self.dir.join("agent.pid")
    }

    fn read_rules(&self) -> anyhow::Result<Option<Rules>> {
        match std::fs::read(self.rules()) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is damaged", self.rules().display())
                })?))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("reading {}", self.rules().display())),
        }
    }
}

/// Writes `bytes` to `path` through a rename, so a reader never sees half.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Runs the script's verb; the process exit code. Nothing reaches stderr
/// unless the verb failed.
pub async fn run(instance: &Instance, verb: &str, rules: &[String]) -> i32 {
    match execute(instance, verb, rules).await {
        Ok(()) => 0,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "nat-gateway.sh {verb}: {err:#}");
            1
        }
    }
}

async fn execute(instance: &Instance, verb: &str, args: &[String]) -> anyhow::Result<()> {
    let verb_parsed = Verb::parse(verb, args).map_err(anyhow::Error::msg)?;
    if verb_parsed == Verb::GetIptablesVersion {
        // The controller reads `v<digits>(.<digits>)+` and sends
        // --random-fully above 1.6.2; ports are random here either way.
        println!(
            "egress-agent v{} (no iptables: NAT by the eBPF dataplane)",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    let files = Files::from_env();
    std::fs::create_dir_all(&files.dir)
        .with_context(|| format!("creating {}", files.dir.display()))?;
    let _lock = lock(&files.dir)?;
    let mut rules = match (files.read_rules()?, &verb_parsed) {
        (Some(rules), _) => rules,
        (None, Verb::Init(_)) => Rules {
            vpc_interface: env_or("VPC_INTERFACE", "eth0"),
            external_interface: env_or("EXTERNAL_INTERFACE", "net1"),
            ..Rules::default()
        },
        (None, _) => bail!("nat gateway not initialized"),
    };
    verb_parsed.apply(&mut rules).map_err(anyhow::Error::msg)?;
    for name in [&rules.vpc_interface, &rules.external_interface] {
        if interface_index(name).is_none() {
            bail!("interface {name:?} not found");
        }
    }
    if let Verb::EipAdd(_) = verb_parsed {
        default_route(&rules.external_interface).await?;
    }
    let config = configuration(&rules).map_err(anyhow::Error::msg)?;
    let config_path = files.config();
    let unchanged = std::fs::read(&config_path).is_ok_and(|old| old == config.as_bytes());
    let agent = running_agent(&files);
    if unchanged && agent.is_some() {
        files_save(&files, &rules)?;
        return Ok(());
    }
    // Check before the running agent sees it: a refused file changes
    // nothing, and the controller hears why.
    let candidate = files.dir.join("egress.yaml.candidate");
    std::fs::write(&candidate, &config)
        .with_context(|| format!("writing {}", candidate.display()))?;
    let checked = crate::agent::validate(instance, &candidate).await;
    let _ = std::fs::remove_file(&candidate);
    if let Err(err) = checked {
        bail!("{err}");
    }
    write_atomically(&config_path, config.as_bytes())?;
    let digest = applied::digest(config.as_bytes());
    match agent {
        Some(pid) => {
            // SAFETY: plain kill(2) on a pid read from our own file and
            // checked to be this agent.
            if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
                bail!(
                    "signalling the agent (pid {pid}): {}",
                    std::io::Error::last_os_error()
                );
            }
            wait_applied(instance, &digest, pid, &files)?;
        }
        None => {
            wait_for_lock(instance)?;
            let pid = start_agent(instance, &files)?;
            wait_applied(instance, &digest, pid, &files)?;
        }
    }
    files_save(&files, &rules)
}

fn files_save(files: &Files, rules: &Rules) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(rules)?;
    bytes.push(b'\n');
    write_atomically(&files.rules(), &bytes)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Serializes verbs: the controller may run several at once.
fn lock(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
        bail!(
            "locking {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(file)
}

/// `eip-add`'s route, as Kube-OVN sets it: the default route out of the
/// external interface via the external subnet's gateway, on-link.
async fn default_route(external: &str) -> anyhow::Result<()> {
    let Some(gateway) = std::env::var("GATEWAY_V4").ok().filter(|g| !g.is_empty()) else {
        return Ok(());
    };
    let gateway: Ipv4Addr = gateway
        .parse()
        .with_context(|| format!("GATEWAY_V4 {gateway:?} is not an IPv4 address"))?;
    let index = interface_index(external).context("external interface vanished")?;
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);
    let mut message = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(index)
        .build();
    message.header.flags |= rtnetlink::packet_route::route::RouteFlags::Onlink;
    handle
        .route()
        .add(message)
        .replace()
        .execute()
        .await
        .with_context(|| format!("default route via {gateway} dev {external} onlink"))
}

/// The agent this gateway started, if it still runs.
fn running_agent(files: &Files) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(files.pid())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = files.config();
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == config.as_os_str().as_encoded_bytes());
    ours.then_some(pid)
}

/// An agent that was just killed holds the instance's lock until its last
/// thread is gone (its main thread is a zombie before that): give it a
/// moment rather than fail the verb.
fn wait_for_lock(instance: &Instance) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while instance.is_running() {
        if Instant::now() >= deadline {
            bail!(
                "another egress-agent holds instance {} and is not the one this gateway \
                 started; stop it first",
                instance.name
            );
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Starts the agent in its own session, detached from the exec that runs
/// this verb (whose streams must close when the verb ends), its log in a
/// file.
fn start_agent(instance: &Instance, files: &Files) -> anyhow::Result<i32> {
    let _ = std::fs::remove_file(applied::path(instance));
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(files.log())
        .with_context(|| format!("opening {}", files.log().display()))?;
    let exe = std::env::current_exe().context("finding this program")?;
    let mut command = Command::new(exe);
    command
        .args(["--instance", &instance.name, "run", "--config"])
        .arg(files.config())
        .arg("--keep-dataplane");
    if let Ok(listen) = std::env::var("EGRESS_LISTEN") {
        command.args(["--listen", &listen]);
    }
    command
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid(2) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = command.spawn().context("starting egress-agent")?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // Not waited for: it outlives this verb (the container's init reaps it).
    std::mem::forget(child);
    write_atomically(&files.pid(), format!("{pid}\n").as_bytes())?;
    Ok(pid)
}

/// Waits until the agent serves the file with `digest`, or says why not.
fn wait_applied(instance: &Instance, digest: &str, pid: i32, files: &Files) -> anyhow::Result<()> {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        if let Some(record) = applied::read(instance).filter(|r| r.digest == digest) {
            return match record.error {
                None => Ok(()),
                Some(error) => Err(anyhow::anyhow!("the agent refused the rules: {error}")),
            };
        }
        if !alive(pid) {
            bail!(
                "egress-agent (pid {pid}) exited; its last words:\n{}",
                tail(&files.log(), 40)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "egress-agent (pid {pid}) did not apply the rules within {}s; its log:\n{}",
                APPLY_TIMEOUT.as_secs(),
                tail(&files.log(), 12)
            );
        }
        std::thread::sleep(POLL);
    }
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped by the container's init) is gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for line in &all[all.len().saturating_sub(lines)..] {
        let _ = writeln!(out, "  {line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb(line: &str) -> Result<Verb, String> {
        let mut words = line.split(' ');
        let name = words.next().unwrap_or_default();
        let rules: Vec<String> = words.map(str::to_owned).collect();
        Verb::parse(name, &rules)
    }

    fn rules_after(lines: &[&str]) -> Rules {
        let mut rules = Rules {
            vpc_interface: "net1".into(),
            external_interface: "net2".into(),
            ..Rules::default()
        };
        for line in lines {
            verb(line).unwrap().apply(&mut rules).unwrap();
        }
        rules
    }

    #[test]
    fn seed_rules_become_one_tenant_with_its_forward_and_a_floating_host() {
        let rules = rules_after(&[
            "eip-add 10.115.55.200/21 10.115.55.201/21",
            "snat-add 10.115.55.200,172.20.10.0/24,--random-fully",
            "dnat-add 10.115.55.200,8888,tcp,172.20.10.2,80",
            "floating-ip-add 10.115.55.201,172.20.10.3",
        ]);
        assert_eq!(rules.eips[&Ipv4Addr::new(10, 115, 55, 200)], 21);
        let tenants = tenants(&rules).unwrap();
        assert_eq!(tenants.len(), 1);
        let tenant = &tenants[0];
        assert_eq!(tenant.name, "eip-10-115-55-200");
        assert_eq!(tenant.sources, ["172.20.10.0/24"]);
        assert_eq!(tenant.egress_ips, ["10.115.55.200"]);
        assert_eq!(
            tenant.port_forwards,
            [ForwardSpec {
                egress_ip: "10.115.55.200".into(),
                protocol: "tcp".into(),
                port: 8888,
                to: "172.20.10.2:80".into()
            }]
        );
        assert_eq!(
            tenant.floating_ips,
            [FloatingSpec {
                address: "10.115.55.201".into(),
                host: "172.20.10.3".into()
            }]
        );
    }

    #[test]
    fn replays_change_nothing_and_deletes_undo_exactly() {
        let once = rules_after(&[
            "snat-add 10.115.55.200,172.20.10.0/24",
            "dnat-add 10.115.55.200,8888,tcp,172.20.10.2,80",
            "floating-ip-add 10.115.55.201,172.20.10.3",
        ]);
        let twice = rules_after(&[
            "snat-add 10.115.55.200,172.20.10.0/24",
            "dnat-add 10.115.55.200,8888,tcp,172.20.10.2,80",
            "floating-ip-add 10.115.55.201,172.20.10.3",
            "snat-add 10.115.55.200,172.20.10.0/24,--random-fully",
            "dnat-add 10.115.55.200,8888,tcp,172.20.10.2,80",
            "floating-ip-add 10.115.55.201,172.20.10.3",
        ]);
        assert_eq!(once, twice);
        let mut undone = twice.clone();
        for line in [
            "floating-ip-del 10.115.55.201",
            "dnat-del 10.115.55.200,8888,tcp,172.20.10.2,80",
            "snat-del 10.115.55.200,172.20.10.0/24",
        ] {
            verb(line).unwrap().apply(&mut undone).unwrap();
        }
        assert_eq!(undone, rules_after(&[]));
    }

    #[test]
    fn a_dnat_host_outside_every_snat_leaves_through_its_eip() {
        let rules = rules_after(&["dnat-add 10.115.55.202,53,udp,172.20.30.5,5353"]);
        let tenants = tenants(&rules).unwrap();
        assert_eq!(tenants[0].sources, ["172.20.30.5/32"]);
        assert_eq!(tenants[0].egress_ips, ["10.115.55.202"]);
        assert_eq!(tenants[0].port_forwards[0].protocol, "udp");
    }

    #[test]
    fn a_floating_host_in_no_snat_is_a_tenant_of_its_own() {
        let rules = rules_after(&["floating-ip-add 10.115.55.201,172.20.40.9"]);
        let tenants = tenants(&rules).unwrap();
        assert_eq!(tenants[0].name, "fip-10-115-55-201");
        assert!(tenants[0].egress_ips.is_empty());
        assert_eq!(tenants[0].floating_ips[0].host, "172.20.40.9");
    }

    #[test]
    fn conflicts_are_refused_with_the_reason() {
        let mut rules = rules_after(&["dnat-add 10.115.55.200,8888,tcp,172.20.10.2,80"]);
        let err = verb("dnat-add 10.115.55.200,8888,tcp,172.20.10.9,80")
            .unwrap()
            .apply(&mut rules)
            .unwrap_err();
        assert!(err.contains("already forwards to 172.20.10.2:80"), "{err}");

        let rules = rules_after(&[
            "snat-add 10.115.55.200,172.20.10.0/24",
            "dnat-add 10.115.55.201,80,tcp,172.20.10.2,80",
        ]);
        let err = tenants(&rules).unwrap_err();
        assert!(err.contains("leaves through eip 10.115.55.200"), "{err}");

        let rules = rules_after(&[
            "floating-ip-add 10.115.55.201,172.20.10.3",
            "dnat-add 10.115.55.201,80,tcp,172.20.10.3,80",
        ]);
        assert!(tenants(&rules).unwrap_err().contains("is a floating IP"));
    }

    #[test]
    fn malformed_rules_and_unserved_verbs_say_what_is_wrong() {
        for (line, expected) in [
            (
                "dnat-add 10.115.55.200,8888,tcp,172.20.10.2",
                "expected eip,externalPort",
            ),
            (
                "dnat-add 10.115.55.200,0,tcp,172.20.10.2,80",
                "is not a port",
            ),
            (
                "dnat-add 10.115.55.200,80,sctp,172.20.10.2,80",
                "neither tcp nor udp",
            ),
            ("snat-add 10.115.55.200,172.20.10.0/33", "not an IPv4 CIDR"),
            (
                "snat-add 10.115.55.200,172.20.10.0/24,--persistent",
                "unknown option",
            ),
            ("eip-add 10.115.55.300/21", "not an IPv4 address"),
            ("eip-add", "no rule given"),
            ("init net1", "two interfaces"),
            ("qos-add 1,2", "QoS is not served"),
            ("frobnicate x", "unknown verb"),
        ] {
            let err = verb(line).unwrap_err();
            assert!(err.contains(expected), "{line}: {err}");
        }
        assert_eq!(
            verb("init net1, net2").unwrap(),
            Verb::Init(Some(("net1".into(), "net2".into())))
        );
    }

    #[test]
    fn the_configuration_names_interfaces_and_subnet_routes() {
        let rules = rules_after(&[
            "subnet-route-add 10.55.0.0/16,172.20.10.1",
            "snat-add 10.115.55.200,172.20.10.0/24",
        ]);
        let text = configuration(&rules).unwrap();
        let parsed = crate::config::Config::parse(&text).expect("the agent reads it");
        assert_eq!(parsed.interfaces.internal, ["net1"]);
        assert_eq!(parsed.interfaces.external, "net2");
        assert_eq!(parsed.tenants.len(), 1);
        assert_eq!(parsed.return_routes[0].destination, "10.55.0.0/16");
        assert_eq!(parsed.return_routes[0].interface.as_deref(), Some("net1"));
    }
}
