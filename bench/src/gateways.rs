//! The gateways compared, set up in the gateway namespace one after the
//! other on the same topology:
//!
//! - `ceiling`: plain XDP forwarding, no NAT: what the topology can carry.
//! - `iptables`: one SNAT rule per tenant, as the seeds' gateways write it
//!   (`-s <cidr> -j SNAT --to-source <egress> --random-fully`), and the
//!   same in ip6tables for the tenant's IPv6 prefix.
//! - `nftables`: the same rules in nft (an `ip` and an `ip6` table).
//! - `nft-flowtable`: the same, plus a flowtable fast path for established
//!   flows.
//! - `xdp`: this project's agent with one dual-stack tenant per prefix pair, its packet path
//!   forced to XDP (`hook: xdp`), on a topology tuned for it.
//! - `tc`: the same agent and tenants with the packet path at TC ingress
//!   (`hook: tc`), on the kernel's default offloads.
//!
//! The `xdp` rows are the accelerator's figures on a topology tuned for it:
//! the veths it redirects into have NAPI from XDP programs on their peers
//! (the sink's counter on k0, `pass` on s0), and TX checksum offload is off
//! on s0, g0, g1 and k0 (set in its `start`, restored in its `stop`), so no
//! sender's partial checksum reaches its XDP programs. iptables, nftables
//! and tc are measured with the kernel's default offloads on the data path.
//! The one setting they share, GRO on g0 where g0 has no XDP program, is the
//! load generator's need, not the gateway's (see `generator_gro`).

use std::{fmt::Write as _, io::Write as _, process::Stdio};

use anyhow::{Context as _, bail};
use egress_tests::{agent::Agent, netns::Netns};
use serde::Serialize;

use crate::{
    programs::Programs,
    topology::{Topology, egress_ip, egress_ip_v6, tenant_prefix, tenant_prefix_v6},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Ceiling,
    Iptables,
    Nftables,
    NftFlowtable,
    Xdp,
    Tc,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Ceiling,
        Kind::Iptables,
        Kind::Nftables,
        Kind::NftFlowtable,
        Kind::Xdp,
        Kind::Tc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ceiling => "ceiling",
            Kind::Iptables => "iptables",
            Kind::Nftables => "nftables",
            Kind::NftFlowtable => "nft-flowtable",
            Kind::Xdp => "xdp",
            Kind::Tc => "tc",
        }
    }

    /// How the gateway is set up, for the report.
    pub fn setup(self) -> &'static str {
        match self {
            Kind::Ceiling => "plain XDP forwarding g0 -> g1, no NAT: what the topology can carry",
            Kind::Iptables => {
                "one `-j SNAT --random-fully` rule per tenant; the kernel's default offloads"
            }
            Kind::Nftables => "the same rules in nft; the kernel's default offloads",
            Kind::NftFlowtable => {
                "the nft rules plus a flowtable for established flows; the kernel's default offloads"
            }
            Kind::Xdp => {
                "the agent with `hook: xdp` (forced: `auto` picks TC on veths), on a topology tuned for \
                 the accelerator: the veths it redirects into have NAPI from XDP programs on their \
                 peers (the sink's counter on k0, a pass program on s0), and TX checksum offload is \
                 off on the senders (s0, k0) and on g0 and g1, so no partial checksum reaches XDP. \
                 These are the accelerator's figures, not what a default veth setup gives"
            }
            Kind::Tc => {
                "the agent with `hook: tc` (TC ingress on g0 and g1), on the kernel's default offloads"
            }
        }
    }

    /// Whether replies can come back through it (the ceiling forwards one way).
    pub fn translates(self) -> bool {
        self != Kind::Ceiling
    }

    /// This project's dataplane, which holds each tenant to a flow quota.
    pub fn has_quotas(self) -> bool {
        matches!(self, Kind::Xdp | Kind::Tc)
    }
}

/// A gateway while it is set up.
pub enum Active {
    Ceiling,
    Netfilter,
    /// The agent, at XDP (`Kind::Xdp`, tuned offloads) or TC.
    Agent(Kind, Box<Agent>),
}

/// Why a gateway cannot run on this kernel, if it cannot.
pub fn unavailable(kind: Kind, gw: &Netns) -> Option<String> {
    if kind != Kind::NftFlowtable {
        return None;
    }
    let probe = "table ip probe {\n  flowtable ft {\n    hook ingress priority 0; devices = { g0 };\n  }\n}\n";
    let result = feed(gw, "nft", probe);
    gw.try_run("nft", &["delete", "table", "ip", "probe"]);
    result.err().map(|err| {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        format!(
            "nft-flowtable not measured: this kernel ({}) refuses flowtables (built without CONFIG_NF_FLOW_TABLE?): {}",
            kernel.trim(),
            err.to_string().lines().next().unwrap_or_default()
        )
    })
}

pub fn start(
    kind: Kind,
    topology: &Topology,
    programs: &mut Programs,
    tenants: u32,
    max_flows: u32,
) -> anyhow::Result<Active> {
    let gw = &topology.gw;
    // What the gateway changes on the topology is undone by `stop`, or here
    // when it cannot be set up (a panic included): the next gateway must
    // find the kernel's defaults.
    prepare(kind, topology, true);
    let set_up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> anyhow::Result<Active> {
            let active = match kind {
                Kind::Ceiling => {
                    programs.start_forwarding(topology)?;
                    Active::Ceiling
                }
                Kind::Iptables => {
                    feed(gw, "iptables-restore", &iptables_rules(tenants, false))?;
                    feed(gw, "ip6tables-restore", &iptables_rules(tenants, true))?;
                    Active::Netfilter
                }
                Kind::Nftables | Kind::NftFlowtable => {
                    feed(gw, "nft", &nft_rules(tenants, kind == Kind::NftFlowtable))?;
                    Active::Netfilter
                }
                Kind::Xdp => Active::Agent(
                    kind,
                    Box::new(Agent::start(gw, &agent_config(tenants, max_flows, "xdp"))),
                ),
                Kind::Tc => Active::Agent(
                    kind,
                    Box::new(Agent::start(gw, &agent_config(tenants, max_flows, "tc"))),
                ),
            };
            topology.set_napi_thread(gw, "g0", Some(topology.gateway_cpu))?;
            Ok(active)
        },
    ));
    match set_up {
        Ok(Ok(active)) => Ok(active),
        Ok(Err(err)) => {
            prepare(kind, topology, false);
            Err(err)
        }
        Err(panic) => {
            prepare(kind, topology, false);
            std::panic::resume_unwind(panic)
        }
    }
}

pub fn stop(active: Active, topology: &Topology, programs: &mut Programs) -> anyhow::Result<()> {
    let gw = &topology.gw;
    topology.set_napi_thread(gw, "g0", None)?;
    match active {
        Active::Ceiling => programs.stop_forwarding(),
        Active::Netfilter => {
            gw.try_run("iptables", &["-t", "nat", "-F"]);
            gw.try_run("ip6tables", &["-t", "nat", "-F"]);
            gw.try_run("nft", &["flush", "ruleset"]);
            gw.try_run("conntrack", &["-F"]);
            // Any netfilter kind: they prepare the topology alike.
            prepare(Kind::Iptables, topology, false);
        }
        Active::Agent(kind, mut agent) => {
            let status = agent.stop();
            prepare(kind, topology, false);
            if !status.success() {
                bail!("egress-agent exited with {status}:\n{}", agent.log());
            }
        }
    }
    Ok(())
}

/// What a gateway needs of the topology besides itself (`set`), or the
/// kernel's defaults back (`!set`).
fn prepare(kind: Kind, topology: &Topology, set: bool) {
    match kind {
        // Its own XDP program on g0 gives g0 NAPI.
        Kind::Ceiling => {}
        // The accelerator's tuned topology: no partial checksums reach XDP.
        Kind::Xdp => checksum_offload(topology, !set),
        // No XDP program on g0: the generator's frames need GRO there.
        Kind::Iptables | Kind::Nftables | Kind::NftFlowtable | Kind::Tc => {
            generator_gro(&topology.gw, set);
        }
    }
}

/// GRO on g0, for the load generator rather than the gateway under test:
/// the generator is a BPF_PROG_RUN live-frames XDP program on s0 whose
/// XDP_TX frames can only land on g0 if g0 has NAPI, which a veth has with
/// an XDP program of its own (the ceiling, xdp) or with GRO on. Every
/// gateway without an XDP program on g0 (netfilter, tc) turns it on; the
/// threaded NAPI kthread that carries the gateway's work is g0's NAPI.
fn generator_gro(gw: &Netns, on: bool) {
    gw.ethtool("g0", "gro", on);
}

/// TX checksum offload on both veth pairs of the data path: off for the xdp
/// gateway only (a sender's partial checksum is one XDP cannot finish), back
/// on, the kernel's default, after it.
fn checksum_offload(topology: &Topology, on: bool) {
    for (ns, dev) in [
        (&topology.src, "s0"),
        (&topology.gw, "g0"),
        (&topology.gw, "g1"),
        (&topology.sink, "k0"),
    ] {
        ns.ethtool(dev, "tx", on);
    }
}

fn feed(ns: &Netns, program: &str, input: &str) -> anyhow::Result<()> {
    let args: &[&str] = if program == "nft" { &["-f", "-"] } else { &[] };
    let mut child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} refused the rules: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// iptables-restore's input, or ip6tables-restore's (`ipv6`).
fn iptables_rules(tenants: u32, ipv6: bool) -> String {
    let mut rules = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    for tenant in 0..tenants {
        let (source, egress) = if ipv6 {
            (
                format!("{}/48", tenant_prefix_v6(tenant)),
                egress_ip_v6(tenant).to_string(),
            )
        } else {
            (
                format!("{}/24", tenant_prefix(tenant)),
                egress_ip(tenant).to_string(),
            )
        };
        let _ = writeln!(
            rules,
            "-A POSTROUTING -s {source} -o g1 -j SNAT --to-source {egress} --random-fully"
        );
    }
    rules.push_str("COMMIT\n");
    rules
}

fn nft_rules(tenants: u32, flowtable: bool) -> String {
    let mut rules = String::from(
        "table ip nat {\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for tenant in 0..tenants {
        let _ = writeln!(
            rules,
            "    ip saddr {}/24 oifname \"g1\" snat to {} fully-random",
            tenant_prefix(tenant),
            egress_ip(tenant)
        );
    }
    rules.push_str(
        "  }\n}\ntable ip6 nat {\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for tenant in 0..tenants {
        let _ = writeln!(
            rules,
            "    ip6 saddr {}/48 oifname \"g1\" snat to {} fully-random",
            tenant_prefix_v6(tenant),
            egress_ip_v6(tenant)
        );
    }
    rules.push_str("  }\n}\n");
    if flowtable {
        rules.push_str(
            "table inet fast {\n  flowtable ft {\n    hook ingress priority 0; devices = { g0, g1 };\n  }\n  \
             chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
             meta l4proto { tcp, udp } flow add @ft\n  }\n}\n",
        );
    }
    rules
}

/// Restarts an agent gateway with its translation log on, written to a
/// JSON lines file in `dir`; false for gateways that have none.
pub fn log_translations(
    active: &mut Active,
    tenants: u32,
    max_flows: u32,
    dir: &std::path::Path,
) -> anyhow::Result<bool> {
    let Active::Agent(kind, agent) = active else {
        return Ok(false);
    };
    let hook = if *kind == Kind::Xdp { "xdp" } else { "tc" };
    let mut yaml = agent_config(tenants, max_flows, hook);
    let _ = writeln!(
        yaml,
        "audit: {{log: {}, maxLogSize: 256MiB, keep: 1}}",
        dir.join("translations.jsonl").display()
    );
    std::fs::write(&agent.config.path, yaml).context("rewriting the agent's configuration")?;
    let status = agent.stop();
    if !status.success() {
        bail!("egress-agent exited with {status}:\n{}", agent.log());
    }
    agent.respawn();
    Ok(true)
}

/// The agent's translation events the ring or the sinks' queue could not
/// take so far (0 for other gateways).
pub fn translation_events_lost(active: &Active) -> u64 {
    let Active::Agent(_, agent) = active else {
        return 0;
    };
    let status = agent.status();
    let ring = status["counters"]["events_lost"].as_u64().unwrap_or(0);
    let sinks = status["live"]["audit"]["sinkLost"].as_u64().unwrap_or(0);
    ring + sinks
}

fn agent_config(tenants: u32, max_flows: u32, hook: &str) -> String {
    let mut config = format!(
        "interfaces: {{internal: [g0], external: g1, hook: {hook}}}\nconntrack: {{maxFlows: {max_flows}}}\ntenants:\n"
    );
    for tenant in 0..tenants {
        let _ = writeln!(
            config,
            "  - {{name: t{tenant}, sources: [{}/24, '{}/48'], egressIPs: [{}, '{}']}}",
            tenant_prefix(tenant),
            tenant_prefix_v6(tenant),
            egress_ip(tenant),
            egress_ip_v6(tenant)
        );
    }
    config
}

/// Kernel conntrack's memory for its current entries: slab objects plus the
/// hash table, as /proc/slabinfo and the module parameters tell.
pub fn conntrack_memory(gw: &Netns) -> anyhow::Result<(u64, u64)> {
    let count: u64 = String::from_utf8_lossy(&gw.run("conntrack", &["-C"]).stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").context("/proc/slabinfo")?;
    let object_size: u64 = slabinfo
        .lines()
        .find(|l| l.starts_with("nf_conntrack "))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let buckets: u64 = std::fs::read_to_string("/sys/module/nf_conntrack/parameters/hashsize")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((count, count * object_size + buckets * 8))
}
