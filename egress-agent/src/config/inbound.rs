//! `tenants[].portForwards` and `tenants[].floatingIPs`: inbound NAT on a
//! tenant's addresses, as the file writes them and as checked.
//!
//! A port forward sends (one of the tenant's egress IPs, protocol, port)
//! to one of the tenant's hosts; a floating IP (an address of its own, not
//! an egress IP) maps one host 1:1, every port, both ways, and the host's
//! own flows leave from it. Rules are per tenant: the host's flows are the
//! tenant's, counted against its quota. Either family, each rule within
//! one: an IPv6 egress IP forwards to an IPv6 host, `[fd00::2]:80`.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::{PlannedTenant, Problems, TenantField, unusable_v6_egress};

/// A port forward as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortForward {
    /// One of the tenant's `egressIPs`.
    #[serde(rename = "egressIP")]
    pub egress_ip: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The port outside.
    pub port: u16,
    /// The host and port inside, `172.20.10.2:80` or `[fd00:10::2]:80`.
    pub to: String,
}

/// A floating IP as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIp {
    /// The address outside (not an egress IP).
    pub address: String,
    /// The host inside.
    pub host: String,
}

/// A port forward, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedForward {
    pub egress: IpAddr,
    pub proto: u8,
    pub port: u16,
    /// Of `egress`'s family.
    pub host: IpAddr,
    pub host_port: u16,
}

/// A floating IP, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedFloating {
    pub address: IpAddr,
    /// Of `address`'s family.
    pub host: IpAddr,
}

/// The protocol number of a forward's `protocol`.
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "tcp" | "TCP" => Some(6),
        "udp" | "UDP" => Some(17),
        _ => None,
    }
}

/// Whether `host` is one of the tenant's sources of its family (any is,
/// for a tenant chosen by ingress port, which has none).
fn inside((v4, v6): (&[Ipv4Net], &[Ipv6Net]), host: IpAddr) -> bool {
    if v4.is_empty() && v6.is_empty() {
        return true;
    }
    match host {
        IpAddr::V4(host) => v4.iter().any(|net| net.contains(&host)),
        IpAddr::V6(host) => v6.iter().any(|net| net.contains(&host)),
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.trim()
        .parse::<IpAddr>()
        .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 address"))
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// One tenant's rules, each checked on its own.
pub(super) fn plan(
    problems: &mut Problems,
    at: &TenantField<'_>,
    (forwards, floating): (&[PortForward], &[FloatingIp]),
    egress: &[IpAddr],
    sources: (&[Ipv4Net], &[Ipv6Net]),
) -> (Vec<PlannedForward>, Vec<PlannedFloating>) {
    let mut planned = Vec::with_capacity(forwards.len());
    for (i, forward) in forwards.iter().enumerate() {
        let here = at.field(&format!("portForwards[{i}]"));
        let egress_ip = parse_ip(&forward.egress_ip);
        match &egress_ip {
            Ok(addr) if !egress.contains(addr) => problems.add(
                format!("{here}.egressIP"),
                format!("{addr} is not one of this tenant's egressIPs"),
            ),
            Ok(_) => {}
            Err(message) => problems.add(format!("{here}.egressIP"), message),
        }
        let proto = protocol_number(&forward.protocol);
        if proto.is_none() {
            problems.add(
                format!("{here}.protocol"),
                format!("{:?}: a port forward is tcp or udp", forward.protocol),
            );
        }
        if forward.port == 0 {
            problems.add(format!("{here}.port"), "port 0 cannot be forwarded");
        }
        let to = forward.to.trim().parse::<SocketAddr>();
        match (&to, &egress_ip) {
            (Ok(to), _) if to.port() == 0 => {
                problems.add(format!("{here}.to"), "the inside port cannot be 0");
            }
            (Ok(to), Ok(egress)) if to.is_ipv4() != egress.is_ipv4() => problems.add(
                format!("{here}.to"),
                format!(
                    "{} is {} and egressIP {egress} {}: a forward stays within its family",
                    to.ip(),
                    family(to.ip()),
                    family(*egress)
                ),
            ),
            (Ok(to), _) if !inside(sources, to.ip()) => problems.add(
                format!("{here}.to"),
                format!("{} is not in this tenant's sources", to.ip()),
            ),
            (Ok(_), _) => {}
            (Err(_), _) => problems.add(
                format!("{here}.to"),
                format!(
                    "{:?} is not host:port like 172.20.10.2:80 or [fd00:10::2]:80",
                    forward.to
                ),
            ),
        }
        if let (Ok(egress), Some(proto), Ok(to)) = (egress_ip, proto, to)
            && egress.is_ipv4() == to.is_ipv4()
        {
            planned.push(PlannedForward {
                egress,
                proto,
                port: forward.port,
                host: to.ip(),
                host_port: to.port(),
            });
        }
    }
    let mut hosts: HashMap<IpAddr, usize> = HashMap::new();
    let mut floats = Vec::with_capacity(floating.len());
    for (i, float) in floating.iter().enumerate() {
        let here = at.field(&format!("floatingIPs[{i}]"));
        let address = parse_ip(&float.address).and_then(|address| match address {
            IpAddr::V6(v6) => match unusable_v6_egress(v6) {
                Some(why) => Err(format!("{v6} {why}")),
                None => Ok(address),
            },
            IpAddr::V4(_) => Ok(address),
        });
        if let Err(message) = &address {
            problems.add(format!("{here}.address"), message);
        }
        let host = parse_ip(&float.host);
        match (&host, &address) {
            (Ok(host), Ok(address)) if host.is_ipv4() != address.is_ipv4() => problems.add(
                format!("{here}.host"),
                format!(
                    "{host} is {} and the address {address} {}: a floating IP stays within its family",
                    family(*host),
                    family(*address)
                ),
            ),
            _ => {}
        }
        match &host {
            Ok(host) if !inside(sources, *host) => problems.add(
                format!("{here}.host"),
                format!("{host} is not in this tenant's sources"),
            ),
            Ok(host) => {
                if let Some(first) = hosts.insert(*host, i) {
                    problems.add(
                        format!("{here}.host"),
                        format!("{host} already has floatingIPs[{first}]"),
                    );
                }
            }
            Err(message) => problems.add(format!("{here}.host"), message),
        }
        if let (Ok(address), Ok(host)) = (address, host)
            && address.is_ipv4() == host.is_ipv4()
        {
            floats.push(PlannedFloating { address, host });
        }
    }
    (planned, floats)
}

/// Rules of different tenants may not collide: one (address, protocol,
/// port) goes to one host; a floating IP belongs to one host and is no
/// tenant's egress IP.
pub(super) fn check_across(problems: &mut Problems, tenants: &[PlannedTenant]) {
    let egress: BTreeMap<IpAddr, &str> = tenants
        .iter()
        .flat_map(|t| {
            let v4 = t.egress.iter().copied().map(IpAddr::V4);
            let v6 = t.egress_v6.iter().copied().map(IpAddr::V6);
            v4.chain(v6).map(move |a| (a, t.name.as_str()))
        })
        .collect();
    let mut forwards: BTreeMap<(IpAddr, u8, u16), String> = BTreeMap::new();
    let mut floating: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (index, tenant) in tenants.iter().enumerate() {
        let at = TenantField::new(index, &tenant.name);
        for (i, forward) in tenant.forwards.iter().enumerate() {
            let here = at.field(&format!("portForwards[{i}]"));
            let key = (forward.egress, forward.proto, forward.port);
            if let Some(first) = forwards.insert(key, here.clone()) {
                problems.add(
                    here,
                    format!(
                        "{} is already forwarded by {first}",
                        SocketAddr::new(forward.egress, forward.port)
                    ),
                );
            }
        }
        for (i, float) in tenant.floating.iter().enumerate() {
            let here = at.field(&format!("floatingIPs[{i}].address"));
            if let Some(owner) = egress.get(&float.address) {
                problems.add(
                    here,
                    format!(
                        "{} is an egress IP of {owner}; a floating IP is an address of its own",
                        float.address
                    ),
                );
            } else if let Some(first) = floating.insert(float.address, here.clone()) {
                problems.add(here, format!("{} is already {first}", float.address));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn fields(text: &str) -> Vec<String> {
        match Config::parse(text).expect("valid YAML").plan() {
            Ok(_) => Vec::new(),
            Err(problems) => problems.into_iter().map(|p| p.field).collect(),
        }
    }

    const HEAD: &str = "interfaces: {internal: [eth0], external: eth1}\ntenants:\n";

    #[test]
    fn rules_are_planned_with_their_tenant() {
        let text = format!(
            "{HEAD}  - name: a\n    sources: [172.20.10.0/24]\n    egressIPs: [10.115.55.200]\n    \
             portForwards: [{{egressIP: 10.115.55.200, protocol: tcp, port: 8888, to: '172.20.10.2:80'}}]\n    \
             floatingIPs: [{{address: 10.115.55.201, host: 172.20.10.3}}]\n"
        );
        let plan = Config::parse(&text).expect("YAML").plan().expect("valid");
        let tenant = &plan.tenants[0];
        assert_eq!(tenant.forwards.len(), 1);
        assert_eq!(tenant.forwards[0].host_port, 80);
        assert_eq!(tenant.forwards[0].proto, 6);
        assert_eq!(tenant.floating[0].address.to_string(), "10.115.55.201");
    }

    #[test]
    fn bad_rules_are_named_by_field() {
        let text = format!(
            "{HEAD}  - name: a\n    sources: [172.20.10.0/24]\n    egressIPs: [10.115.55.200]\n    \
             portForwards:\n      - {{egressIP: 10.115.55.9, protocol: sctp, port: 0, to: '10.9.9.9:80'}}\n      \
             - {{egressIP: 10.115.55.200, protocol: udp, port: 53, to: 'nowhere'}}\n    \
             floatingIPs:\n      - {{address: 10.115.55.200, host: 172.20.10.3}}\n      \
             - {{address: 10.115.55.202, host: 172.20.10.3}}\n"
        );
        assert_eq!(
            fields(&text),
            [
                "tenants[0] (a).portForwards[0].egressIP",
                "tenants[0] (a).portForwards[0].protocol",
                "tenants[0] (a).portForwards[0].port",
                "tenants[0] (a).portForwards[0].to",
                "tenants[0] (a).portForwards[1].to",
                "tenants[0] (a).floatingIPs[1].host",
                "tenants[0] (a).floatingIPs[0].address",
            ]
        );
    }

    #[test]
    fn two_tenants_cannot_forward_the_same_port() {
        let text = format!(
            "{HEAD}  - name: a\n    sources: [172.20.10.0/24]\n    egressIPs: [10.115.55.200]\n    \
             portForwards: [{{egressIP: 10.115.55.200, protocol: tcp, port: 80, to: '172.20.10.2:80'}},\n      \
             {{egressIP: 10.115.55.200, protocol: tcp, port: 80, to: '172.20.10.3:80'}}]\n"
        );
        assert_eq!(fields(&text), ["tenants[0] (a).portForwards[1]"]);
    }
}
