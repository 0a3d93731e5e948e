//! The gateways compared, set up in the gateway namespace one after the
//! other on the same topology:
//!
//! - `ceiling`: plain XDP forwarding, no NAT: what the topology can carry.
//! - `iptables`: one SNAT rule per tenant, as the seeds' gateways write it
//!   (`-s <cidr> -j SNAT --to-source <egress> --random-fully`).
//! - `nftables`: the same rules in nft.
//! - `nft-flowtable`: the same, plus a flowtable fast path for established
//!   flows.
//! - `xdp`: this project's agent with one tenant per prefix.

use std::{fmt::Write as _, io::Write as _, process::Stdio};

use anyhow::{Context as _, bail};
use egress_tests::{agent::Agent, netns::Netns};
use serde::Serialize;

use crate::{
    programs::Programs,
    topology::{Topology, egress_ip, tenant_prefix},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Ceiling,
    Iptables,
    Nftables,
    NftFlowtable,
    Xdp,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Ceiling,
        Kind::Iptables,
        Kind::Nftables,
        Kind::NftFlowtable,
        Kind::Xdp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ceiling => "ceiling",
            Kind::Iptables => "iptables",
            Kind::Nftables => "nftables",
            Kind::NftFlowtable => "nft-flowtable",
            Kind::Xdp => "xdp",
        }
    }

    /// Whether replies can come back through it (the ceiling forwards one way).
    pub fn translates(self) -> bool {
        self != Kind::Ceiling
    }
}

/// A gateway while it is set up.
pub enum Active {
    Ceiling,
    Netfilter,
    Xdp(Box<Agent>),
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
    let active = match kind {
        Kind::Ceiling => {
            programs.start_forwarding(topology)?;
            Active::Ceiling
        }
        Kind::Iptables => {
            enable_gro(gw)?;
            feed(gw, "iptables-restore", &iptables_rules(tenants))?;
            Active::Netfilter
        }
        Kind::Nftables | Kind::NftFlowtable => {
            enable_gro(gw)?;
            feed(gw, "nft", &nft_rules(tenants, kind == Kind::NftFlowtable))?;
            Active::Netfilter
        }
        Kind::Xdp => Active::Xdp(Box::new(Agent::start(
            gw,
            &agent_config(tenants, max_flows),
        ))),
    };
    topology.set_napi_thread(gw, "g0", Some(topology.gateway_cpu))?;
    Ok(active)
}

pub fn stop(active: Active, topology: &Topology, programs: &mut Programs) -> anyhow::Result<()> {
    let gw = &topology.gw;
    topology.set_napi_thread(gw, "g0", None)?;
    match active {
        Active::Ceiling => programs.stop_forwarding(),
        Active::Netfilter => {
            gw.try_run("iptables", &["-t", "nat", "-F"]);
            gw.try_run("nft", &["flush", "ruleset"]);
            gw.try_run("conntrack", &["-F"]);
            gw.ethtool("g0", "gro", false);
        }
        Active::Xdp(mut agent) => {
            let status = agent.stop();
            if !status.success() {
                bail!("egress-agent exited with {status}:\n{}", agent.log());
            }
        }
    }
    Ok(())
}

/// Receiving XDP_TX'd frames needs NAPI on the gateway's veth: without an
/// XDP program there, GRO turns it on.
fn enable_gro(gw: &Netns) -> anyhow::Result<()> {
    gw.ethtool("g0", "gro", true);
    Ok(())
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

fn iptables_rules(tenants: u32) -> String {
    let mut rules = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    for tenant in 0..tenants {
        let _ = writeln!(
            rules,
            "-A POSTROUTING -s {}/24 -o g1 -j SNAT --to-source {} --random-fully",
            tenant_prefix(tenant),
            egress_ip(tenant)
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
    rules.push_str("  }\n}\n");
    if flowtable {
        rules.push_str(
            "table ip fast {\n  flowtable ft {\n    hook ingress priority 0; devices = { g0, g1 };\n  }\n  \
             chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
             meta l4proto { tcp, udp } flow add @ft\n  }\n}\n",
        );
    }
    rules
}

fn agent_config(tenants: u32, max_flows: u32) -> String {
    let mut config = format!(
        "interfaces: {{internal: [g0], external: g1}}\nconntrack: {{maxFlows: {max_flows}}}\ntenants:\n"
    );
    for tenant in 0..tenants {
        let _ = writeln!(
            config,
            "  - {{name: t{tenant}, sources: [{}/24], egressIPs: [{}]}}",
            tenant_prefix(tenant),
            egress_ip(tenant)
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
