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
//! The translation as a configuration: one tenant whose sources are, in
//! each family the pod has an external address of, every address but the
//! no-SNAT sources (routed untranslated, `routedSources`) and the pod's
//! external address, which is the tenant's egress IP (MASQUERADE's: the
//! interface's own address, answered by the kernel, so the agent adds
//! none). A dual-stack gateway is one tenant with an egress IP per family,
//! as Kube-OVN's script is one MASQUERADE per family.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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
    /// The pod's address on the external interface: what traffic leaves
    /// with. Once per family the pod serves (IPv4, IPv6 or both).
    #[arg(long = "egress-ip", required = true)]
    pub egress_ips: Vec<IpAddr>,
    /// Sources routed out untranslated, comma-separated
    /// (`NO_SNAT_SOURCES_IPV4`, `NO_SNAT_SOURCES_IPV6`); may be repeated,
    /// empty for none.
    #[arg(long)]
    pub no_snat: Vec<String>,
}

impl AttachArgs {
    fn egress_v4(&self) -> Option<Ipv4Addr> {
        self.egress_ips.iter().find_map(|ip| match ip {
            IpAddr::V4(ip) => Some(*ip),
            IpAddr::V6(_) => None,
        })
    }

    fn egress_v6(&self) -> Option<Ipv6Addr> {
        self.egress_ips.iter().find_map(|ip| match ip {
            IpAddr::V6(ip) => Some(*ip),
            IpAddr::V4(_) => None,
        })
    }
}

/// Every prefix of `whole`'s family outside `excluded` (those of the other
/// family are ignored): the smallest set of CIDRs that covers the rest of
/// the address space (at most one per bit of each excluded prefix).
pub fn complement(whole: IpNet, excluded: &[IpNet]) -> Vec<IpNet> {
    let mut remaining = vec![whole];
    let holes = excluded
        .iter()
        .map(IpNet::trunc)
        .filter(|hole| whole.contains(hole));
    for hole in holes {
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
                let halves: Vec<IpNet> = at
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

/// Parses `NO_SNAT_SOURCES_IPV4`/`_IPV6`: comma-separated CIDRs or
/// addresses of either family.
pub fn parse_no_snat(lists: &[String]) -> anyhow::Result<Vec<IpNet>> {
    lists
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    anyhow::anyhow!("NO_SNAT_SOURCES_IPV4/IPV6: {s:?} is not a CIDR or an address")
                })
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
        egress_ips: Vec<String>,
    }
    let routed = parse_no_snat(&args.no_snat)?;
    if args.egress_v4().is_none() && args.egress_v6().is_none() {
        bail!("no --egress-ip: the pod's external address is what traffic leaves with");
    }
    let mut excluded = routed.clone();
    excluded.extend(args.egress_ips.iter().copied().map(IpNet::from));
    let mut sources = Vec::new();
    if args.egress_v4().is_some() {
        sources.extend(complement(IpNet::V4(Ipv4Net::default()), &excluded));
    }
    if args.egress_v6().is_some() {
        sources.extend(complement(IpNet::V6(Ipv6Net::default()), &excluded));
    }
    let file = File {
        interfaces: Interfaces {
            internal: [&args.internal],
            external: &args.external,
            hook: "tc",
        },
        tenants: [Tenant {
            name: TENANT,
            sources: sources.iter().map(ToString::to_string).collect(),
            egress_ips: args.egress_ips.iter().map(ToString::to_string).collect(),
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
    for egress_ip in &args.egress_ips {
        let present = system
            .addresses
            .iter()
            .any(|a| a.index == external && a.addr == *egress_ip);
        if !present {
            bail!(
                "{egress_ip} is not an address of {}: the pod's external address is what \
                 traffic leaves with",
                args.external
            );
        }
    }
    // MASQUERADE's address is the interface's own: take it as the egress
    // IP rather than refuse it as the gateway's.
    system.claim(external, &args.egress_ips);
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
    let ipv6 = args.egress_v6().is_some();
    set_forwarding(&resolved, ipv6, false)?;
    let replaced = dataplane.attach_through_netlink(&resolved)?;
    set_forwarding(&resolved, ipv6, true)?;
    report(&resolved, replaced);
    Ok(())
}

/// IPv4 forwarding per internal interface; IPv6's only as a whole (Linux
/// forwards IPv6 by `all.forwarding` alone), which in a gateway pod is the
/// same: it forwards nothing else.
fn set_forwarding(resolved: &Resolved, ipv6: bool, on: bool) -> anyhow::Result<()> {
    let mut paths: Vec<String> = resolved
        .internal
        .iter()
        .map(|link| format!("/proc/sys/net/ipv4/conf/{}/forwarding", link.name))
        .collect();
    if ipv6 {
        paths.push("/proc/sys/net/ipv6/conf/all/forwarding".into());
    }
    for path in paths {
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
            .iter()
            .map(ToString::to_string)
            .chain(tenant.egress_v6.iter().map(ToString::to_string))
            .collect::<Vec<_>>()
            .join(" and "),
        tenant.sources.len() + tenant.sources_v6.len(),
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

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn covered_once(rest: &[IpNet], holes: &[IpNet], probe: &[&str]) {
        for addr in probe {
            let addr: IpAddr = addr.parse().unwrap();
            let in_hole = holes.iter().any(|h| h.contains(&addr));
            let covering = rest.iter().filter(|n| n.contains(&addr)).count();
            assert_eq!(covering, usize::from(!in_hole), "{addr}");
        }
    }

    #[test]
    fn the_complement_covers_everything_but_the_holes_exactly_once() {
        let holes = nets(&["10.16.2.0/24", "172.17.0.11/32", "10.16.2.128/25"]);
        let rest = complement(IpNet::V4(Ipv4Net::default()), &holes);
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
        covered_once(&rest, &holes, &probe);
        let size: u64 = rest.iter().map(|n| 1u64 << (32 - n.prefix_len())).sum();
        assert_eq!(size, (1u64 << 32) - 256 - 1);
        assert!(rest.len() <= 64);
        assert_eq!(
            complement(IpNet::V4(Ipv4Net::default()), &[]),
            nets(&["0.0.0.0/0"])
        );
    }

    #[test]
    fn the_ipv6_complement_ignores_the_other_family() {
        let holes = nets(&["fd00:10:16:2::/64", "fd00:172:17::11/128", "10.16.2.0/24"]);
        let rest = complement(IpNet::V6(Ipv6Net::default()), &holes);
        assert!(rest.iter().all(|n| matches!(n, IpNet::V6(_))));
        // Everything but a /64 and a /128: 2^128 - 2^64 - 1 addresses.
        let size: u128 = rest.iter().map(|n| 1u128 << (128 - n.prefix_len())).sum();
        assert_eq!(size, u128::MAX - (1u128 << 64));
        covered_once(
            &rest,
            &holes,
            &[
                "::",
                "fd00:10:16:1::10",
                "fd00:10:16:2::10",
                "fd00:172:17::10",
                "fd00:172:17::11",
                "fd00:172:17::12",
                "2001:db8::1",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ],
        );
    }

    fn args(egress: &[&str], no_snat: &[&str]) -> AttachArgs {
        AttachArgs {
            internal: "eth0".into(),
            external: "net1".into(),
            egress_ips: egress.iter().map(|s| s.parse().unwrap()).collect(),
            no_snat: no_snat.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_configuration_is_one_tenant_leaving_with_the_pod_address() {
        let text = configuration(&args(&["172.17.0.11"], &["10.16.2.0/24, 10.16.9.9"])).unwrap();
        let config = Config::parse(&text).unwrap();
        let plan = config.plan().unwrap();
        assert_eq!(plan.tenants.len(), 1);
        assert_eq!(plan.sweep_interval, POD_SWEEP_INTERVAL);
        assert_eq!(plan.tenants[0].egress, [Ipv4Addr::new(172, 17, 0, 11)]);
        assert!(
            plan.tenants[0].sources_v6.is_empty(),
            "IPv4 only: no IPv6 tenant"
        );
        assert_eq!(plan.routed_sources, nets(&["10.16.2.0/24", "10.16.9.9/32"]));
        assert!(
            plan.tenants[0]
                .sources
                .iter()
                .all(|s| !s.contains(&Ipv4Addr::new(10, 16, 2, 1))
                    && !s.contains(&Ipv4Addr::new(172, 17, 0, 11)))
        );
        let refused = configuration(&args(&["172.17.0.11"], &["10.16.2.0/33"])).unwrap_err();
        assert!(
            refused.to_string().contains("NO_SNAT_SOURCES_IPV4"),
            "{refused}"
        );
    }

    #[test]
    fn a_dual_stack_gateway_is_one_tenant_with_an_egress_ip_per_family() {
        let text = configuration(&args(
            &["172.17.0.11", "fd00:172:17::11"],
            &["10.16.2.0/24", "fd00:10:16:2::/64"],
        ))
        .unwrap();
        let plan = Config::parse(&text).unwrap().plan().unwrap();
        let tenant = &plan.tenants[0];
        assert_eq!(tenant.egress, [Ipv4Addr::new(172, 17, 0, 11)]);
        assert_eq!(
            tenant.egress_v6,
            ["fd00:172:17::11".parse::<Ipv6Addr>().unwrap()]
        );
        assert_eq!(
            plan.routed_sources,
            nets(&["10.16.2.0/24", "fd00:10:16:2::/64"])
        );
        let no_snat_pod: Ipv6Addr = "fd00:10:16:2::10".parse().unwrap();
        let egress: Ipv6Addr = "fd00:172:17::11".parse().unwrap();
        assert!(
            tenant
                .sources_v6
                .iter()
                .all(|s| !s.contains(&no_snat_pod) && !s.contains(&egress))
        );
        assert!(
            tenant
                .sources_v6
                .iter()
                .any(|s| s.contains(&"fd00:10:16:1::10".parse::<Ipv6Addr>().unwrap()))
        );
        assert!(configuration(&args(&[], &[])).is_err());
    }
}
