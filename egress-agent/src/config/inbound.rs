//! `tenants[].portForwards` and `tenants[].floatingIPs`: inbound NAT on a
//! tenant's addresses, as the file writes them and as checked.
//!
//! A port forward sends (one of the tenant's egress IPs, protocol, port)
//! to one of the tenant's hosts; a floating IP (an address of its own, not
//! an egress IP) maps one host 1:1, every port, both ways, and the host's
//! own flows leave from it. Rules are per tenant: the host's flows are the
//! tenant's, counted against its quota.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4, SocketAddrV6},
};

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::{PlannedTenant, Problems, TenantField, ipv6_not_here, parse_ipv4};

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
    /// The host and port inside, `172.20.10.2:80`.
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
    pub egress: Ipv4Addr,
    pub proto: u8,
    pub port: u16,
    pub host: Ipv4Addr,
    pub host_port: u16,
}

/// A floating IP, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedFloating {
    pub address: Ipv4Addr,
    pub host: Ipv4Addr,
}

/// The protocol number of a forward's `protocol`.
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "tcp" | "TCP" => Some(6),
        "udp" | "UDP" => Some(17),
        _ => None,
    }
}

fn inside(sources: &[Ipv4Net], host: Ipv4Addr) -> bool {
    sources.is_empty() || sources.iter().any(|net| net.contains(&host))
}

/// One tenant's rules, each checked on its own.
pub(super) fn plan(
    problems: &mut Problems,
    at: &TenantField<'_>,
    (forwards, floating): (&[PortForward], &[FloatingIp]),
    egress: &[Ipv4Addr],
    sources: &[Ipv4Net],
) -> (Vec<PlannedForward>, Vec<PlannedFloating>) {
    let mut planned = Vec::with_capacity(forwards.len());
    for (i, forward) in forwards.iter().enumerate() {
        let here = at.field(&format!("portForwards[{i}]"));
        let egress_ip = parse_ipv4(&forward.egress_ip);
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
        let to = forward.to.parse::<SocketAddrV4>();
        match &to {
            Ok(to) if to.port() == 0 => {
                problems.add(format!("{here}.to"), "the inside port cannot be 0");
            }
            Ok(to) if !inside(sources, *to.ip()) => problems.add(
                format!("{here}.to"),
                format!("{} is not in this tenant's sources", to.ip()),
            ),
            Ok(_) => {}
            Err(_) if forward.to.trim().parse::<SocketAddrV6>().is_ok() => {
                problems.add(format!("{here}.to"), ipv6_not_here(&forward.to));
            }
            Err(_) => problems.add(
                format!("{here}.to"),
                format!("{:?} is not host:port like 172.20.10.2:80", forward.to),
            ),
        }
        if let (Ok(egress), Some(proto), Ok(to)) = (egress_ip, proto, to) {
            planned.push(PlannedForward {
                egress,
                proto,
                port: forward.port,
                host: *to.ip(),
                host_port: to.port(),
            });
        }
    }
    let mut hosts: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut floats = Vec::with_capacity(floating.len());
    for (i, float) in floating.iter().enumerate() {
        let here = at.field(&format!("floatingIPs[{i}]"));
        let address = parse_ipv4(&float.address);
        if let Err(message) = &address {
            problems.add(format!("{here}.address"), message);
        }
        let host = parse_ipv4(&float.host);
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
        if let (Ok(address), Ok(host)) = (address, host) {
            floats.push(PlannedFloating { address, host });
        }
    }
    (planned, floats)
}

/// Rules of different tenants may not collide: one (address, protocol,
/// port) goes to one host; a floating IP belongs to one host and is no
/// tenant's egress IP.
pub(super) fn check_across(problems: &mut Problems, tenants: &[PlannedTenant]) {
    let egress: BTreeMap<Ipv4Addr, &str> = tenants
        .iter()
        .flat_map(|t| t.egress.iter().map(move |a| (*a, t.name.as_str())))
        .collect();
    let mut forwards: BTreeMap<(Ipv4Addr, u8, u16), String> = BTreeMap::new();
    let mut floating: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (index, tenant) in tenants.iter().enumerate() {
        let at = TenantField::new(index, &tenant.name);
        for (i, forward) in tenant.forwards.iter().enumerate() {
            let here = at.field(&format!("portForwards[{i}]"));
            let key = (forward.egress, forward.proto, forward.port);
            if let Some(first) = forwards.insert(key, here.clone()) {
                problems.add(
                    here,
                    format!(
                        "{}:{} is already forwarded by {first}",
                        forward.egress, forward.port
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
