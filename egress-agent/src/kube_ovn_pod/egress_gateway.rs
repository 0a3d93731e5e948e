//! Kube-OVN's VpcEgressGateway pod, served by this dataplane.
//!
//! The controller runs `init-vpc-egress-gateway.sh` in a privileged init
//! container and then only an unprivileged process (`sleep infinity`, or
//! the BFD responder, UID 65534 without CAP_BPF). Kube-OVN's script ends in
//! one `MASQUERADE --random-fully` for everything that enters from the
//! internal interface, except the no-SNAT sources. Here the script ends in
//! `egress-agent kube-ovn attach-egress-gateway`, which loads the programs
//! with that translation and attaches them through netlink filters
//! (cls_bpf): those stay attached when the init container exits, with no
//! pin and no process (a pin would die with the init container's bpffs
//! mount, and nothing later may call bpf()). Flows expire in the dataplane
//! itself (`conntrack_sweep`, walking the table every sweep interval with
//! the agent's timeouts); the pod never changes afterwards, since
//! Kube-OVN rolls the pods on any change.
//!
//! The translation as a configuration: one tenant whose sources are every
//! IPv4 address but the no-SNAT sources (routed untranslated,
//! `routedSources`) and the pod's external address, which is the tenant's
//! egress IP (MASQUERADE's: the interface's own address, answered by the
//! kernel, so the agent adds none).

use std::{fmt::Write as _, net::Ipv4Addr};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::{
    bpffs,
    config::{Config, Resolved},
    conntrack,
    dataplane::{
        Dataplane,
        maps::{DesiredState, Maps},
    },
    instance::Instance,
    system::SystemView,
};

/// How often the dataplane walks its table in a gateway pod.
pub const POD_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// The tenant every internal source but the no-SNAT ones belongs to.
pub const TENANT: &str = "vpc-egress-gateway";

/// What the script found and passes on.
#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// The interface the tenants' traffic arrives on (`eth0`).
    #[arg(long)]
    pub internal: String,
    /// The interface it leaves through (`net1`).
    #[arg(long)]
    pub external: String,
    /// The pod's address on the external interface: what traffic leaves with.
    #[arg(long)]
    pub egress_ip: Ipv4Addr,
    /// Sources routed out untranslated, comma-separated
    /// (`NO_SNAT_SOURCES_IPV4`); empty for none.
    #[arg(long, default_value = "")]
    pub no_snat: String,
}

/// Every IPv4 prefix outside `excluded`: the smallest set of CIDRs that
/// covers the rest of the address space (at most 32 per excluded prefix).
pub fn complement(excluded: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut remaining = vec![Ipv4Net::default()];
    for hole in excluded.iter().map(Ipv4Net::trunc) {
        let mut next = Vec::with_capacity(remaining.len() + 32);
        for net in remaining {
            if hole.contains(&net) {
                continue;
            }
            if !net.contains(&hole) {
                next.push(net);
                continue;
            }
            // Walk down from `net` to `hole`, keeping each half it is not in.
            let mut at = net;
            while at != hole {
                let halves: Vec<Ipv4Net> = at
                    .subnets(at.prefix_len() + 1)
                    .expect("a prefix longer than the hole's parent")
                    .collect();
                let (inside, outside) = if halves[0].contains(&hole) {
                    (halves[0], halves[1])
                } else {
                    (halves[1], halves[0])
                };
                next.push(outside);
                at = inside;
            }
        }
        remaining = next;
    }
    remaining.sort();
    remaining
}

/// Parses `NO_SNAT_SOURCES_IPV4`: comma-separated CIDRs or addresses.
pub fn parse_no_snat(text: &str) -> anyhow::Result<Vec<Ipv4Net>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            crate::config::parse_cidr(s)
                .or_else(|_| {
                    s.parse::<Ipv4Addr>()
                        .map(Ipv4Net::from)
                        .map_err(|e| e.to_string())
                })
                .map_err(|_| anyhow::anyhow!("NO_SNAT_SOURCES_IPV4: {s:?} is not an IPv4 CIDR"))
        })
        .collect()
}

/// The configuration the pod's translation amounts to.
pub fn configuration(args: &AttachArgs) -> anyhow::Result<String> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct File<'a> {
        interfaces: Interfaces<'a>,
        tenants: [Tenant; 1],
        routed_sources: Vec<String>,
        conntrack: Conntrack,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Conntrack {
        sweep_interval: String,
    }
    #[derive(Serialize)]
    struct Interfaces<'a> {
        internal: [&'a str; 1],
        external: &'a str,
        // Netlink filters stay attached without a process; XDP's would not.
        hook: &'static str,
    }
    #[derive(Serialize)]
    struct Tenant {
        name: &'static str,
        sources: Vec<String>,
        #[serde(rename = "egressIPs")]
        egress_ips: [String; 1],
    }
    let routed = parse_no_snat(&args.no_snat)?;
    let mut excluded = routed.clone();
    excluded.push(Ipv4Net::from(args.egress_ip));
    let file = File {
        interfaces: Interfaces {
            internal: [&args.internal],
            external: &args.external,
            hook: "tc",
        },
        tenants: [Tenant {
            name: TENANT,
            sources: complement(&excluded)
                .iter()
                .map(ToString::to_string)
                .collect(),
            egress_ips: [args.egress_ip.to_string()],
        }],
        routed_sources: routed.iter().map(ToString::to_string).collect(),
        // A walk of the table holds one CPU's softirq for about half a
        // microsecond per flow (see the README's benchmark): less often
        // than the agent's sweeper, flows ending up to 30 s past their
        // timeout, as Linux conntrack's own collector allows.
        conntrack: Conntrack {
            sweep_interval: format!("{}s", POD_SWEEP_INTERVAL.as_secs()),
        },
    };
    Ok(serde_json::to_string_pretty(&file)?)
}

/// Loads, fills and attaches the dataplane, then returns: it keeps serving.
pub async fn attach(instance: &Instance, args: &AttachArgs) -> anyhow::Result<()> {
    let text = configuration(args)?;
    let plan = Config::parse(&text)
        .map_err(anyhow::Error::msg)?
        .plan()
        .map_err(|problems| anyhow::anyhow!("{}", render(&problems)))?;
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);
    let mut system = SystemView::read(&handle).await?;
    let external = system
        .link_by_name(&args.external)
        .with_context(|| format!("no interface {}", args.external))?
        .index;
    let present = system
        .addresses
        .iter()
        .any(|a| a.index == external && a.addr == std::net::IpAddr::V4(args.egress_ip));
    if !present {
        bail!(
            "{} is not an address of {}: the pod's external address is what traffic leaves with",
            args.egress_ip,
            args.external
        );
    }
    // MASQUERADE's address is the interface's own: take it as the egress
    // IP rather than refuse it as the gateway's.
    system.claim(external, &[args.egress_ip]);
    let resolved = plan
        .resolve(&system)
        .map_err(|problems| anyhow::anyhow!("{}", render(&problems)))?;
    bpffs::ensure_mounted()?;
    let mut dataplane = Dataplane::load(
        &instance.pin_dir,
        resolved.max_flows,
        resolved.audit.ring_bytes,
    )?;
    let mut maps = Maps::open(&instance.pin_dir)?;
    let desired = DesiredState::build(&resolved, &maps.tenant_ids()?, &maps.port_ids())?;
    maps.sync(&desired)?;
    maps.self_sweep
        .set(
            0,
            conntrack::self_sweep(resolved.sweep_interval, &resolved.timeouts),
            0,
        )
        .context("writing SELF_SWEEP")?;
    // Forwarding stays off on the internal interfaces while filters are
    // (re)attached: filters of an earlier run (a restarted init container)
    // go before the new ones come, and in between nothing may be forwarded
    // untranslated. On failure it stays off: the pod must not serve.
    set_forwarding(&resolved, false)?;
    let replaced = dataplane.attach_through_netlink(&resolved)?;
    set_forwarding(&resolved, true)?;
    report(&resolved, replaced);
    Ok(())
}

fn set_forwarding(resolved: &Resolved, on: bool) -> anyhow::Result<()> {
    for link in &resolved.internal {
        let path = format!("/proc/sys/net/ipv4/conf/{}/forwarding", link.name);
        std::fs::write(&path, if on { "1" } else { "0" })
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

fn report(resolved: &Resolved, replaced: bool) {
    let tenant = &resolved.tenants[0];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "egress dataplane attached{}: {} -> {} leaves with {} ({} source prefixes), \
         flows expire in the dataplane every {}s",
        if replaced {
            " (replacing an earlier run's)"
        } else {
            ""
        },
        resolved
            .internal
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
        resolved.external.name,
        tenant
            .egress
            .first()
            .map_or_else(String::new, ToString::to_string),
        tenant.sources.len(),
        resolved.sweep_interval.as_secs()
    );
    if !resolved.routed_sources.is_empty() {
        let routed: Vec<String> = resolved
            .routed_sources
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(out, "routed untranslated: {}", routed.join(", "));
    }
    print!("{out}");
}

fn render(problems: &[crate::config::Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_complement_covers_everything_but_the_holes_exactly_once() {
        let holes = nets(&["10.16.2.0/24", "172.17.0.11/32", "10.16.2.128/25"]);
        let rest = complement(&holes);
        let probe = [
            "0.0.0.0",
            "10.16.1.10",
            "10.16.2.10",
            "10.16.2.200",
            "10.16.3.0",
            "172.17.0.10",
            "172.17.0.11",
            "172.17.0.12",
            "255.255.255.255",
        ];
        for addr in probe {
            let addr: Ipv4Addr = addr.parse().unwrap();
            let in_hole = holes.iter().any(|h| h.contains(&addr));
            let covering = rest.iter().filter(|n| n.contains(&addr)).count();
            assert_eq!(covering, usize::from(!in_hole), "{addr}");
        }
        let size: u64 = rest.iter().map(|n| 1u64 << (32 - n.prefix_len())).sum();
        assert_eq!(size, (1u64 << 32) - 256 - 1);
        assert!(rest.len() <= 64);
        assert_eq!(complement(&[]), nets(&["0.0.0.0/0"]));
    }

    #[test]
    fn the_configuration_is_one_tenant_leaving_with_the_pod_address() {
        let args = AttachArgs {
            internal: "eth0".into(),
            external: "net1".into(),
            egress_ip: Ipv4Addr::new(172, 17, 0, 11),
            no_snat: "10.16.2.0/24, 10.16.9.9".into(),
        };
        let text = configuration(&args).unwrap();
        let config = Config::parse(&text).unwrap();
        let plan = config.plan().unwrap();
        assert_eq!(plan.tenants.len(), 1);
        assert_eq!(plan.sweep_interval, POD_SWEEP_INTERVAL);
        assert_eq!(plan.tenants[0].egress, [Ipv4Addr::new(172, 17, 0, 11)]);
        assert_eq!(plan.routed_sources, nets(&["10.16.2.0/24", "10.16.9.9/32"]));
        assert!(
            plan.tenants[0]
                .sources
                .iter()
                .all(|s| !s.contains(&Ipv4Addr::new(10, 16, 2, 1))
                    && !s.contains(&Ipv4Addr::new(172, 17, 0, 11)))
        );
        let bad = AttachArgs {
            no_snat: "10.16.2.0/33".into(),
            ..args
        };
        assert!(
            configuration(&bad)
                .unwrap_err()
                .to_string()
                .contains("NO_SNAT_SOURCES_IPV4")
        );
    }
}
