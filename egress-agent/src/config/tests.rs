use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use super::*;
use crate::system::{AddressFacts, LinkFacts, NextHopFacts, SystemView};

/// The tenants of the Harvester seed: two namespaces, one egress IP each.
const SEED: &str = "\
interfaces:
  internal: [eth0]
  external: eth1
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
  - name: tenant-b
    sources: [172.20.20.0/24]
    egressIPs: [192.168.31.150]
";

fn plan(text: &str) -> Result<Plan, Vec<Problem>> {
    Config::parse(text).expect("valid YAML").plan()
}

fn problems(text: &str) -> Vec<Problem> {
    plan(text).expect_err("the plan should be refused")
}

fn has_problem(problems: &[Problem], field: &str, needle: &str) -> bool {
    problems
        .iter()
        .any(|p| p.field == field && p.message.contains(needle))
}

#[track_caller]
fn assert_problem(problems: &[Problem], field: &str, needle: &str) {
    assert!(
        has_problem(problems, field, needle),
        "expected a problem at {field} mentioning {needle:?}, got {problems:#?}"
    );
}

fn link(index: u32, name: &str) -> LinkFacts {
    LinkFacts {
        index,
        name: name.to_owned(),
        mac: Some([2, 0, 0, 0, 0, index as u8]),
        kind: Some("veth".to_owned()),
        parent: None,
        // What a veth reports at kernel defaults: native XDP, but no
        // `ndo_xdp_xmit` while its peer has neither GRO nor XDP.
        xdp_features: Some(1 | 2),
    }
}

fn machine() -> SystemView {
    SystemView {
        links: vec![
            link(1, "lo"),
            link(2, "eth0"),
            link(3, "eth1"),
            link(4, "mgmt"),
        ],
        addresses: vec![
            AddressFacts {
                index: 3,
                addr: IpAddr::V4(Ipv4Addr::new(192, 168, 31, 2)),
                prefix_len: 24,
                egress_owned: false,
            },
            AddressFacts {
                index: 4,
                addr: IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)),
                prefix_len: 24,
                egress_owned: false,
            },
        ],
        // The default route, through the external interface.
        next_hops: vec![NextHopFacts {
            index: 3,
            via: Ipv4Addr::new(192, 168, 31, 1),
            destination: "default".into(),
        }],
    }
}

#[test]
fn seed_config_plans_with_defaults() {
    let plan = plan(SEED).expect("the seed config is valid");
    assert_eq!(plan.internal, ["eth0"]);
    assert_eq!(plan.external, "eth1");
    assert_eq!(plan.max_flows, DEFAULT_MAX_FLOWS);
    assert_eq!(plan.xdp_mode, XdpModeSetting::Auto);
    assert_eq!(plan.tenants.len(), 2);
    let b = &plan.tenants[1];
    assert_eq!(b.name, "tenant-b");
    assert_eq!(b.sources, ["172.20.20.0/24".parse::<Ipv4Net>().unwrap()]);
    assert_eq!(b.egress, [Ipv4Addr::new(192, 168, 31, 150)]);
    assert_eq!(b.ports, DEFAULT_PORTS);
}

#[test]
fn single_internal_interface_may_be_written_without_brackets() {
    let text = SEED.replace("internal: [eth0]", "internal: eth0");
    assert_eq!(plan(&text).expect("valid").internal, ["eth0"]);
}

#[test]
fn yaml_typos_are_refused_with_line_and_field() {
    let text = SEED.replace("egressIPs: [192.168.31.150]", "egressIP: [192.168.31.150]");
    let err = Config::parse(&text).expect_err("typo must be refused");
    assert!(err.contains("unknown field `egressIP`"), "{err}");
    assert!(err.contains("line 10"), "{err}");
}

#[test]
fn malformed_cidrs_name_their_field() {
    let text = SEED
        .replace("172.20.10.0/24", "172.20.10.0/33")
        .replace("172.20.20.0/24", "172.20.20.5/24");
    let problems = problems(&text);
    assert_problem(&problems, "tenants[0] (tenant-a).sources[0]", "not a CIDR");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).sources[0]",
        "host bits set; did you mean 172.20.20.0/24",
    );
}

#[test]
fn overlapping_sources_of_two_tenants_are_refused() {
    let text = SEED.replace("172.20.20.0/24", "172.20.10.128/25");
    let problems = problems(&text);
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).sources[0]",
        "overlaps 172.20.10.0/24 of tenants[0] (tenant-a)",
    );
}

#[test]
fn nested_overlap_is_found_behind_a_disjoint_neighbour() {
    // 10.0.0.0/8 covers both later prefixes; the scan must not forget it
    // after seeing the first.
    let text = "\
interfaces: {internal: [eth0], external: eth1}
tenants:
  - {name: wide, sources: [10.0.0.0/8], egressIPs: [192.0.2.1]}
  - {name: one, sources: [10.1.0.0/16], egressIPs: [192.0.2.2]}
  - {name: two, sources: [10.200.0.0/16], egressIPs: [192.0.2.3]}
";
    let problems = problems(text);
    assert_problem(
        &problems,
        "tenants[1] (one).sources[0]",
        "overlaps 10.0.0.0/8",
    );
    assert_problem(
        &problems,
        "tenants[2] (two).sources[0]",
        "overlaps 10.0.0.0/8",
    );
}

#[test]
fn an_egress_ip_claimed_twice_is_refused() {
    let text = SEED.replace("192.168.31.150", "192.168.31.101");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs[0]",
        "already claimed by tenants[0] (tenant-a)",
    );
}

#[test]
fn an_egress_ip_inside_tenant_sources_is_refused() {
    let text = SEED.replace("192.168.31.150", "172.20.10.7");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs[0]",
        "inside the sources of tenants[0] (tenant-a)",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = "\
interfaces:
  internal: [eth0, eth0]
  external: eth0
tenants:
  - name: dup
    sources: []
    egressIPs: [fe80::1, not-an-ip]
    ports: {min: 2000, max: 1000}
  - name: dup
    sources: [fd00::/64]
    egressIPs: [1.1.1.1, 1.1.1.2, 1.1.1.3, 1.1.1.4, 1.1.1.5, 1.1.1.6, 1.1.1.7, 1.1.1.8, 1.1.1.9]
conntrack:
  maxFlows: 1
";
    let problems = problems(text);
    assert_problem(&problems, "interfaces.internal[1]", "listed twice");
    assert_problem(
        &problems,
        "interfaces.external",
        "also an internal interface",
    );
    assert_problem(&problems, "tenants[0] (dup).sources", "at least one source");
    assert_problem(&problems, "tenants[0] (dup).egressIPs[0]", "link-local");
    assert_problem(
        &problems,
        "tenants[0] (dup).egressIPs[1]",
        "not an IPv4 or IPv6 address",
    );
    assert_problem(&problems, "tenants[0] (dup).ports", "need 1 <= min <= max");
    assert_problem(
        &problems,
        "tenants[1] (dup).name",
        "already the name of tenants[0]",
    );
    assert_problem(
        &problems,
        "tenants[1] (dup).egressIPs",
        "the IPv6 sources need at least one IPv6 egress address",
    );
    assert_problem(
        &problems,
        "tenants[1] (dup).egressIPs",
        "at most 8 per tenant",
    );
    assert_problem(&problems, "conntrack.maxFlows", "outside");
    assert!(problems.len() >= 10, "{problems:#?}");
}

#[test]
fn the_error_lists_problems_and_says_nothing_changed() {
    let err = ConfigError::Invalid {
        path: "/etc/egress.yaml".into(),
        problems: problems(&SEED.replace("192.168.31.150", "192.168.31.101")),
    };
    let text = err.to_string();
    assert!(
        text.starts_with("/etc/egress.yaml: 1 problem, nothing was changed:"),
        "{text}"
    );
    assert!(
        text.contains(
            "\n  - tenants[1] (tenant-b).egressIPs[0]: 192.168.31.101 is already claimed"
        ),
        "{text}"
    );
}

#[test]
fn resolving_the_seed_finds_its_interfaces() {
    let resolved = plan(SEED).unwrap().resolve(&machine()).expect("resolves");
    assert_eq!(
        resolved.internal,
        [LinkRef {
            name: "eth0".into(),
            index: 2
        }]
    );
    assert_eq!(
        resolved.external,
        LinkRef {
            name: "eth1".into(),
            index: 3
        }
    );
    assert_eq!(
        resolved.egress_addresses().collect::<Vec<_>>(),
        [
            Ipv4Addr::new(192, 168, 31, 101),
            Ipv4Addr::new(192, 168, 31, 150)
        ]
    );
}

#[test]
fn unknown_interfaces_are_refused() {
    let text = SEED
        .replace("[eth0]", "[eth7]")
        .replace("external: eth1", "external: eth9");
    let problems = plan(&text)
        .unwrap()
        .resolve(&machine())
        .expect_err("refused");
    assert_problem(
        &problems,
        "interfaces.internal[0]",
        "no interface named eth7",
    );
    assert_problem(&problems, "interfaces.external", "no interface named eth9");
}

#[test]
fn an_egress_ip_held_by_another_interface_is_refused() {
    let text = SEED.replace("192.168.31.150", "10.9.9.9");
    let problems = plan(&text)
        .unwrap()
        .resolve(&machine())
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "already configured on mgmt",
    );
}

/// Resolves the seed with tenant-b's egress IP replaced by `addr`.
fn resolve_with_egress(system: &SystemView, addr: &str) -> Result<Resolved, Vec<Problem>> {
    plan(&SEED.replace("192.168.31.150", addr))
        .unwrap()
        .resolve(system)
}

#[test]
fn the_gateways_own_external_address_is_refused() {
    let problems = resolve_with_egress(&machine(), "192.168.31.2").expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "192.168.31.2 is the gateway's own address on eth1 (192.168.31.2/24, not added by this agent)",
    );
    assert_eq!(problems.len(), 1, "{problems:#?}");
}

#[test]
fn any_external_address_the_agent_did_not_add_is_the_gateways() {
    // A /32 someone else put there (a VIP, a hand-made SNAT address).
    let mut system = machine();
    system.addresses.push(AddressFacts {
        index: 3,
        addr: IpAddr::V4(Ipv4Addr::new(192, 168, 31, 150)),
        prefix_len: 32,
        egress_owned: false,
    });
    let problems = resolve_with_egress(&system, "192.168.31.150").expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "192.168.31.150 is the gateway's own address on eth1",
    );
}

#[test]
fn an_external_address_the_agent_added_is_its_own() {
    // Marked by the kernel (IFA_PROTO)...
    let mut system = machine();
    system.addresses.push(AddressFacts {
        index: 3,
        addr: IpAddr::V4(Ipv4Addr::new(192, 168, 31, 150)),
        prefix_len: 32,
        egress_owned: true,
    });
    assert!(resolve_with_egress(&system, "192.168.31.150").is_ok());
    // ...or listed in the state file, on kernels without the mark.
    let mut system = machine();
    system.addresses.push(AddressFacts {
        index: 3,
        addr: IpAddr::V4(Ipv4Addr::new(192, 168, 31, 150)),
        prefix_len: 32,
        egress_owned: false,
    });
    system.claim(3, &[Ipv4Addr::new(192, 168, 31, 150)]);
    assert!(resolve_with_egress(&system, "192.168.31.150").is_ok());
    // A claim names the interface: the same address elsewhere is not ours.
    let mut system = machine();
    system.claim(4, &[Ipv4Addr::new(192, 168, 31, 2)]);
    assert!(resolve_with_egress(&system, "192.168.31.2").is_err());
}

#[test]
fn the_next_hop_of_the_external_interface_is_refused() {
    let problems = resolve_with_egress(&machine(), "192.168.31.1").expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "192.168.31.1 is the gateway's next hop on eth1 (route default via 192.168.31.1)",
    );
    // A multipath or policy route's gateway counts the same; one reached
    // through another interface is no business of eth1's.
    let mut system = machine();
    system.next_hops.push(NextHopFacts {
        index: 3,
        via: Ipv4Addr::new(192, 168, 31, 254),
        destination: "10.0.0.0/8".into(),
    });
    system.next_hops.push(NextHopFacts {
        index: 4,
        via: Ipv4Addr::new(192, 168, 31, 253),
        destination: "default".into(),
    });
    let problems = resolve_with_egress(&system, "192.168.31.254").expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "route 10.0.0.0/8 via 192.168.31.254",
    );
    assert!(resolve_with_egress(&system, "192.168.31.253").is_ok());
}

#[test]
fn the_subnets_network_and_broadcast_addresses_are_refused() {
    let problems = resolve_with_egress(&machine(), "192.168.31.0").expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "192.168.31.0 is the network address of eth1's subnet 192.168.31.0/24",
    );
    let problems = resolve_with_egress(&machine(), "192.168.31.255").expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "192.168.31.255 is the broadcast address of eth1's subnet 192.168.31.0/24",
    );
    // Hosts of the subnet, and addresses beyond it, are fine.
    assert!(resolve_with_egress(&machine(), "192.168.31.254").is_ok());
    assert!(resolve_with_egress(&machine(), "192.168.32.0").is_ok());
    // A point-to-point /31 or a /32 has no network or broadcast address.
    let mut system = machine();
    system.addresses[0].prefix_len = 31;
    system.addresses[0].addr = IpAddr::V4(Ipv4Addr::new(192, 168, 31, 2));
    system.next_hops.clear();
    assert!(resolve_with_egress(&system, "192.168.31.3").is_ok());
}

#[test]
fn every_egress_ip_that_is_the_gateways_is_named() {
    let text = SEED
        .replace("192.168.31.101", "192.168.31.2")
        .replace("192.168.31.150", "192.168.31.1");
    let problems = plan(&text)
        .unwrap()
        .resolve(&machine())
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[0] (tenant-a).egressIPs[0]",
        "own address",
    );
    assert_problem(&problems, "tenants[1] (tenant-b).egressIPs[0]", "next hop");
}

/// Seed 002: every tenant shares the pod CIDR; the router steers each to its
/// own macvlan next hop on the internal NIC.
const SHARED_POD_CIDR: &str = "\
interfaces: {internal: [eth0], external: eth1}
tenants:
  - name: ns-blue
    sources: [10.128.0.0/14]
    egressIPs: [192.168.55.113]
    ingress: [{interface: macvlan-blue}]
  - name: ns-red
    sources: [10.128.0.0/14]
    egressIPs: [192.168.55.114]
    ingress: [{interface: eth0, mac: '02:00:00:00:00:aa'}]
";

fn machine_with_macvlan() -> SystemView {
    let mut system = machine();
    system.links.push(LinkFacts {
        index: 9,
        name: "macvlan-blue".into(),
        mac: Some([2, 0, 0, 0, 0, 0xbb]),
        kind: Some("macvlan".into()),
        parent: Some(2),
        xdp_features: None,
    });
    // The next-hop address the router resolves by ARP.
    system.addresses.push(AddressFacts {
        index: 9,
        addr: IpAddr::V4(Ipv4Addr::new(10, 70, 0, 11)),
        prefix_len: 32,
        egress_owned: false,
    });
    system
}

#[test]
fn tenants_sharing_sources_are_told_apart_by_ingress_mac() {
    let plan = plan(SHARED_POD_CIDR).expect("shared sources behind ingress ports are fine");
    let resolved = plan.resolve(&machine_with_macvlan()).expect("resolves");
    assert_eq!(
        resolved.tenants[0].ingress,
        [IngressPort {
            ifindex: 2,
            mac: Some([2, 0, 0, 0, 0, 0xbb])
        }],
        "a macvlan resolves to its parent and its own MAC"
    );
    assert_eq!(
        resolved.tenants[1].ingress,
        [IngressPort {
            ifindex: 2,
            mac: Some([2, 0, 0, 0, 0, 0xaa])
        }]
    );
}

#[test]
fn ingress_ports_and_their_parents_get_arp_isolation() {
    let resolved = plan(SHARED_POD_CIDR)
        .unwrap()
        .resolve(&machine_with_macvlan())
        .expect("resolves");
    let names: Vec<&str> = resolved.arp_isolated.iter().map(String::as_str).collect();
    assert_eq!(names, ["eth0", "macvlan-blue"]);
    let plain = plan(SEED).unwrap().resolve(&machine()).expect("resolves");
    assert!(
        plain.arp_isolated.is_empty(),
        "no ingress ports, no ARP changes"
    );
}

#[test]
fn an_ingress_macvlan_without_an_ipv4_address_is_refused() {
    let mut system = machine_with_macvlan();
    system.addresses.retain(|a| a.index != 9);
    let problems = plan(SHARED_POD_CIDR)
        .unwrap()
        .resolve(&system)
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[0] (ns-blue).ingress[0].interface",
        "macvlan-blue has no IPv4 address",
    );
}

#[test]
fn an_ingress_macvlan_on_a_non_internal_interface_is_refused() {
    let mut system = machine_with_macvlan();
    if let Some(macvlan) = system.links.iter_mut().find(|l| l.index == 9) {
        macvlan.parent = Some(4);
    }
    let problems = plan(SHARED_POD_CIDR)
        .unwrap()
        .resolve(&system)
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[0] (ns-blue).ingress[0].interface",
        "macvlan-blue is a macvlan on mgmt, which is not an internal interface",
    );
}

#[test]
fn tenants_on_the_same_ingress_port_must_not_overlap() {
    let text = SHARED_POD_CIDR.replace("'02:00:00:00:00:aa'", "'02:00:00:00:00:bb'");
    let problems = plan(&text)
        .unwrap()
        .resolve(&machine_with_macvlan())
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (ns-red).sources[0]",
        "overlaps 10.128.0.0/14 of tenants[0] (ns-blue)",
    );
}

#[test]
fn ingress_on_an_unrelated_interface_is_refused() {
    let text = SHARED_POD_CIDR.replace("interface: macvlan-blue", "interface: mgmt");
    let problems = plan(&text)
        .unwrap()
        .resolve(&machine_with_macvlan())
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[0] (ns-blue).ingress[0].interface",
        "neither an internal interface nor a macvlan",
    );
}

#[test]
fn mac_parsing() {
    assert_eq!(
        parse_mac("02:00:5e:00:53:01"),
        Some([2, 0, 0x5e, 0, 0x53, 1])
    );
    assert_eq!(
        parse_mac("02-00-5E-00-53-01"),
        Some([2, 0, 0x5e, 0, 0x53, 1])
    );
    assert_eq!(parse_mac("02:00:5e:00:53"), None);
    assert_eq!(parse_mac("02:00:5e:00:53:01:07"), None);
    assert_eq!(parse_mac("2:0:5e:0:53:1"), None);
    assert_eq!(format_mac([2, 0, 0x5e, 0, 0x53, 1]), "02:00:5e:00:53:01");
}

#[test]
fn conntrack_timeouts_default_to_linux_and_take_units() {
    let defaults = plan(SEED).unwrap();
    assert_eq!(defaults.timeouts, Timeouts::default());
    assert_eq!(
        defaults.timeouts.tcp_established,
        Duration::from_secs(432_000)
    );
    assert_eq!(defaults.sweep_interval, Duration::from_secs(10));
    let text = format!(
        "{SEED}conntrack:\n  sweepInterval: 2s\n  timeouts:\n    udp: 45\n    tcpEstablished: 1d\n    tcpClose: 90s\n    icmp: 2m\n"
    );
    let set = plan(&text).expect("valid");
    assert_eq!(set.sweep_interval, Duration::from_secs(2));
    assert_eq!(set.timeouts.udp, Duration::from_secs(45));
    assert_eq!(set.timeouts.tcp_established, Duration::from_secs(86_400));
    assert_eq!(set.timeouts.tcp_close, Duration::from_secs(90));
    assert_eq!(set.timeouts.icmp, Duration::from_secs(120));
    assert_eq!(
        set.timeouts.tcp_syn_sent,
        Timeouts::default().tcp_syn_sent,
        "unnamed ones keep defaults"
    );
}

#[test]
fn bad_durations_are_refused() {
    let err = Config::parse(&format!(
        "{SEED}conntrack:\n  timeouts:\n    udp: 5 weeks\n"
    ))
    .expect_err("unit");
    assert!(err.contains("unknown unit"), "{err}");
    let err =
        Config::parse(&format!("{SEED}conntrack:\n  timeouts:\n    udpp: 5\n")).expect_err("typo");
    assert!(err.contains("unknown field `udpp`"), "{err}");
    let problems = problems(&format!(
        "{SEED}conntrack:\n  sweepInterval: 0\n  timeouts:\n    tcpClose: 0s\n"
    ));
    assert_problem(&problems, "conntrack.sweepInterval", "at least 1s");
    assert_problem(&problems, "conntrack.timeouts.tcpClose", "at least 1s");
}

#[test]
fn return_routes_and_bfd_peers_plan_and_resolve() {
    let text = format!(
        "{SEED}returnRoutes:
  - {{destination: 10.16.1.0/24, via: 172.20.10.2}}
  - {{destination: 10.16.2.0/24, via: 172.20.10.3, interface: eth1}}
bfd:
  peers:
    - address: 10.255.255.1
      interface: eth0
      minTxMs: 100
      minRxMs: 100
      multiplier: 3
    - address: 10.255.255.5
"
    );
    let resolved = plan(&text)
        .expect("valid")
        .resolve(&machine())
        .expect("resolves");
    assert_eq!(resolved.return_routes.len(), 2);
    assert_eq!(
        resolved.return_routes[0].ifindex, 2,
        "first internal by default"
    );
    assert_eq!(resolved.return_routes[1].ifindex, 3);
    let [fast, default] = &resolved.bfd_peers[..] else {
        panic!("two peers: {:?}", resolved.bfd_peers)
    };
    assert_eq!(fast.min_tx, Duration::from_millis(100));
    assert_eq!(fast.interface.as_ref().map(|l| l.index), Some(2));
    assert_eq!(
        (default.min_tx, default.min_rx, default.multiplier),
        (Duration::from_secs(1), Duration::from_secs(1), 3),
        "Kube-OVN's defaults"
    );
}

#[test]
fn return_routes_take_both_families_each_via_its_own() {
    let text = format!(
        "{SEED}returnRoutes:
  - {{destination: 10.16.1.0/24, via: 172.20.10.2}}
  - {{destination: 'fd00:16:1::/64', via: 'fd00:20::2'}}
  - {{destination: 'fd00:16:2::/64', via: 'fe80::2', interface: eth1}}
"
    );
    let resolved = plan(&text)
        .expect("valid")
        .resolve(&machine())
        .expect("resolves");
    let routes: Vec<String> = resolved
        .return_routes
        .iter()
        .map(|r| format!("{} via {} dev {}", r.destination, r.via, r.ifindex))
        .collect();
    assert_eq!(
        routes,
        [
            "10.16.1.0/24 via 172.20.10.2 dev 2",
            "fd00:16:1::/64 via fd00:20::2 dev 2",
            "fd00:16:2::/64 via fe80::2 dev 3"
        ]
    );
    let found = problems(&format!(
        "{SEED}returnRoutes:
  - {{destination: 'fd00:99::/64', via: 172.20.10.2}}
  - {{destination: 10.16.1.0/24, via: 'fd00:10::2'}}
  - {{destination: 'fd00:99::1/64', via: 'fd00:10::2'}}
"
    ));
    assert_problem(&found, "returnRoutes[0].via", "not of the same family");
    assert_problem(&found, "returnRoutes[1].via", "not of the same family");
    assert_problem(
        &found,
        "returnRoutes[2].destination",
        "did you mean fd00:99::/64",
    );
}

#[test]
fn bfd_peers_take_both_families_and_link_local_ones_name_their_interface() {
    let text = format!(
        "{SEED}bfd:
  peers:
    - {{address: 10.255.255.1}}
    - {{address: 'fd00:255::1'}}
    - {{address: 'fe80::1', interface: eth0}}
    - {{address: 'fe80::1', interface: eth1}}
"
    );
    let resolved = plan(&text)
        .expect("valid")
        .resolve(&machine())
        .expect("resolves");
    let peers: Vec<String> = resolved
        .bfd_peers
        .iter()
        .map(|p| match &p.interface {
            Some(link) => format!("{}%{}", p.address, link.name),
            None => p.address.to_string(),
        })
        .collect();
    assert_eq!(
        peers,
        [
            "10.255.255.1",
            "fd00:255::1",
            "fe80::1%eth0",
            "fe80::1%eth1"
        ]
    );
    let found = problems(&format!(
        "{SEED}bfd:\n  peers: [{{address: 'fe80::1'}}, {{address: 'fd00::1'}}, {{address: 'fd00::1'}}]\n"
    ));
    assert_problem(&found, "bfd.peers[0].interface", "fe80::1 is link-local");
    assert_problem(&found, "bfd.peers[2].address", "configured twice");
}

#[test]
fn bad_return_routes_and_bfd_peers_name_their_fields() {
    let text = format!(
        "{SEED}returnRoutes:
  - {{destination: 10.16.1.7/24, via: 172.20.10.2}}
  - {{destination: 10.16.3.0/24, via: nowhere}}
  - {{destination: 10.16.4.0/24, via: 172.20.10.2, interface: eth9}}
bfd:
  peers:
    - {{address: 10.255.255.1, minTxMs: 5, multiplier: 0}}
    - {{address: 10.255.255.1}}
    - {{address: router}}
"
    );
    let found = problems(&text);
    assert_problem(&found, "returnRoutes[0].destination", "host bits");
    assert_problem(&found, "returnRoutes[1].via", "not an IPv4 or IPv6 address");
    assert_problem(&found, "bfd.peers[0].minTxMs", "outside 10..=60000");
    assert_problem(&found, "bfd.peers[0].multiplier", "at least 1");
    assert_problem(&found, "bfd.peers[1].address", "configured twice");
    assert_problem(
        &found,
        "bfd.peers[2].address",
        "not an IPv4 or IPv6 address",
    );
    let resolved = plan(&format!(
        "{SEED}returnRoutes:\n  - {{destination: 10.16.4.0/24, via: 172.20.10.2, interface: eth9}}\n"
    ))
    .expect("plans")
    .resolve(&machine())
    .expect_err("eth9 does not exist");
    assert_problem(
        &resolved,
        "returnRoutes[0].interface",
        "no interface named eth9",
    );
}

/// XDP_ACT_BASIC | XDP_ACT_REDIRECT | XDP_ACT_NDO_XMIT: a NIC driver with
/// native XDP that takes redirected frames.
const XDP_NIC: u64 = 1 | 2 | 4;

fn nics() -> SystemView {
    let mut system = machine();
    for link in &mut system.links {
        link.kind = None;
        link.xdp_features = Some(XDP_NIC);
    }
    system
}

const TWO_INTERFACES: &str = "
interfaces: {internal: [eth0], external: eth1}
tenants:
  - {name: a, sources: [172.20.10.0/24], egressIPs: [192.168.31.101]}
";

fn resolve_with(yaml: &str, system: &SystemView) -> Result<Resolved, Vec<Problem>> {
    Config::parse(yaml)
        .expect("parses")
        .plan()
        .and_then(|plan| plan.resolve(system))
}

#[test]
fn auto_puts_veths_on_tc_and_says_why() {
    let resolved = resolve_with(TWO_INTERFACES, &machine()).expect("valid");
    assert_eq!(resolved.hooks.len(), 2);
    for choice in &resolved.hooks {
        assert_eq!(choice.hook, Hook::Tc, "{choice:?}");
        assert!(!choice.reason.is_empty(), "{choice:?}");
    }
    assert_eq!(resolved.hook_of(2), Hook::Tc);
}

#[test]
fn auto_puts_nics_that_take_redirects_on_xdp() {
    let resolved = resolve_with(TWO_INTERFACES, &nics()).expect("valid");
    assert!(
        resolved.hooks.iter().all(|h| h.hook == Hook::Xdp),
        "{:?}",
        resolved.hooks
    );
}

#[test]
fn forced_xdp_towards_a_target_without_xdp_is_refused_at_its_field() {
    let yaml = TWO_INTERFACES.replace("external: eth1}", "external: eth1, hook: xdp}");
    let problems = resolve_with(&yaml, &machine()).expect_err("refused");
    assert_problem(&problems, "interfaces.hook", "eth1");
    // Per interface: only the forced one is judged, and named by its key.
    let yaml = TWO_INTERFACES.replace("external: eth1}", "external: eth1, hooks: {eth0: xdp}}");
    let problems = resolve_with(&yaml, &machine()).expect_err("refused");
    assert_problem(&problems, "interfaces.hooks.eth0", "eth1");
    assert!(
        !has_problem(&problems, "interfaces.hook", ""),
        "{problems:#?}"
    );
}

#[test]
fn a_hook_for_an_unmanaged_interface_is_a_problem() {
    let yaml = TWO_INTERFACES.replace("external: eth1}", "external: eth1, hooks: {eth7: tc}}");
    let problems = Config::parse(&yaml)
        .expect("parses")
        .plan()
        .expect_err("refused");
    assert_problem(&problems, "interfaces.hooks.eth7", "neither");
}

#[test]
fn a_forced_xdp_mode_from_older_files_still_means_xdp() {
    let yaml = format!("{TWO_INTERFACES}xdp: {{mode: native}}\n");
    let plan = Config::parse(&yaml).expect("parses").plan().expect("valid");
    assert_eq!(plan.hooks.setting("eth0"), HookSetting::Xdp);
    let resolved = plan.resolve(&nics()).expect("valid on NICs");
    assert!(resolved.hooks.iter().all(|h| h.hook == Hook::Xdp));
    // `tc` on one interface overrides it there.
    let yaml = format!(
        "{}xdp: {{mode: native}}\n",
        TWO_INTERFACES.replace("external: eth1}", "external: eth1, hooks: {eth1: tc}}")
    );
    let resolved = resolve_with(&yaml, &nics()).expect("valid");
    assert_eq!(resolved.hook_of(3), Hook::Tc);
    assert_eq!(resolved.hook_of(2), Hook::Xdp);
}

/// What virtio_net reports before an XDP program runs on it (seen on this
/// project's build machine): native XDP and redirects, no ndo_xdp_xmit yet.
const VIRTIO_BEFORE_XDP: u64 = 0x2b;

#[test]
fn nics_that_gain_ndo_xdp_xmit_with_our_program_are_judged_as_they_will_be() {
    let mut system = nics();
    for link in &mut system.links {
        link.xdp_features = Some(VIRTIO_BEFORE_XDP);
    }
    let resolved = resolve_with(TWO_INTERFACES, &system).expect("valid");
    assert!(
        resolved.hooks.iter().all(|h| h.hook == Hook::Xdp),
        "{:?}",
        resolved.hooks
    );
    // A target kept on TC never runs our XDP program, so it never takes
    // redirects: whoever sends to it stays on TC too.
    let yaml = TWO_INTERFACES.replace("external: eth1}", "external: eth1, hooks: {eth1: tc}}");
    let resolved = resolve_with(&yaml, &system).expect("valid");
    assert_eq!(resolved.hook_of(2), Hook::Tc, "{:?}", resolved.hooks);
    assert_eq!(resolved.hook_of(3), Hook::Tc);
}

/// Seed 002's next hops, made by the agent: tenant-a's MAC written, tenant-b's
/// derived.
const CREATING: &str = "\
interfaces: {internal: [eth0], external: eth1}
tenants:
  - name: tenant-a
    sources: [10.128.0.0/14]
    egressIPs: [192.168.31.101]
    ingress:
      - interface: macvlan-a
        create: {parent: eth0, address: 10.70.0.11/32, mac: '02:00:00:00:0a:01'}
  - name: tenant-b
    sources: [10.128.0.0/14]
    egressIPs: [192.168.31.102]
    ingress:
      - interface: macvlan-b
        create: {parent: eth0, address: 10.70.0.12}
";

/// `machine()` with a link `name` (index 9) of `kind` on `parent`, MAC
/// `02:00:00:00:0a:01`, holding `address` if given.
fn machine_with(name: &str, kind: &str, parent: u32, address: Option<[u8; 4]>) -> SystemView {
    let mut system = machine();
    system.links.push(LinkFacts {
        index: 9,
        name: name.into(),
        mac: Some([2, 0, 0, 0, 0x0a, 1]),
        kind: Some(kind.into()),
        parent: Some(parent),
        xdp_features: None,
    });
    if let Some(address) = address {
        system.addresses.push(AddressFacts {
            index: 9,
            addr: IpAddr::V4(Ipv4Addr::from(address)),
            prefix_len: 32,
            egress_owned: false,
        });
    }
    system
}

#[test]
fn next_hops_to_create_resolve_before_they_exist() {
    let resolved = plan(CREATING)
        .unwrap()
        .resolve(&machine())
        .expect("resolves");
    let derived = derived_mac("tenant-b", "macvlan-b");
    let eth0 = LinkRef {
        name: "eth0".into(),
        index: 2,
    };
    assert_eq!(
        resolved.macvlans,
        [
            MacvlanSpec {
                name: "macvlan-a".into(),
                parent: eth0.clone(),
                address: Ipv4Addr::new(10, 70, 0, 11),
                mac: [2, 0, 0, 0, 0x0a, 1],
            },
            MacvlanSpec {
                name: "macvlan-b".into(),
                parent: eth0,
                address: Ipv4Addr::new(10, 70, 0, 12),
                mac: derived,
            },
        ]
    );
    // The port is the parent's ifindex and the macvlan's MAC, as for a
    // macvlan the operator made.
    assert_eq!(
        resolved.tenants[0].ingress,
        [IngressPort {
            ifindex: 2,
            mac: Some([2, 0, 0, 0, 0x0a, 1])
        }]
    );
    assert_eq!(
        resolved.tenants[1].ingress,
        [IngressPort {
            ifindex: 2,
            mac: Some(derived)
        }]
    );
    assert_eq!(resolved.arp_isolated, ["eth0", "macvlan-a", "macvlan-b"]);
}

#[test]
fn derived_macs_are_stable_local_unicast_and_differ() {
    let mac = derived_mac("tenant-b", "macvlan-b");
    assert_eq!(
        mac[0] & 0x03,
        0x02,
        "locally administered unicast: {mac:02x?}"
    );
    // Pinned (FNV-1a of "tenant-b\0macvlan-b", checked by hand): a changed
    // derivation would move every next hop's MAC on an upgrade, and routers
    // would keep sending to the old one.
    assert_eq!(format_mac(mac), "1e:36:d7:cd:4b:5b");
    for other in [
        derived_mac("tenant-a", "macvlan-b"),
        derived_mac("tenant-b", "macvlan-a"),
        derived_mac("tenant-bmacvlan", "-b"),
    ] {
        assert_ne!(mac, other);
        assert_eq!(other[0] & 0x03, 0x02);
    }
}

#[test]
fn create_blocks_are_checked_by_field() {
    let at = "tenants[0] (tenant-a).ingress[0]";
    for (from, to, field, needle) in [
        (
            "parent: eth0, address: 10.70.0.11/32",
            "parent: eth1, address: 10.70.0.11/32",
            "create.parent",
            "eth1 is not an internal interface",
        ),
        (
            "parent: eth0, address: 10.70.0.11/32",
            "parent: mgmt, address: 10.70.0.11/32",
            "create.parent",
            "mgmt is not an internal interface",
        ),
        (
            "10.70.0.11/32",
            "10.70.0.11/24",
            "create.address",
            "must be a /32",
        ),
        (
            "10.70.0.11/32",
            "10.70.0.0/33",
            "create.address",
            "is not an IPv4 address",
        ),
        (
            "10.70.0.11/32",
            "fd00::1/128",
            "create.address",
            "a next hop is an IPv4 address",
        ),
        (
            "10.70.0.11/32",
            "next-hop",
            "create.address",
            "is not an IPv4 address",
        ),
        (
            "10.70.0.11/32",
            "224.0.0.5/32",
            "create.address",
            "cannot be a next hop",
        ),
        (
            "'02:00:00:00:0a:01'",
            "'03:00:00:00:0a:01'",
            "create.mac",
            "multicast MAC",
        ),
        (
            "'02:00:00:00:0a:01'",
            "'02:00:00:00:0a'",
            "create.mac",
            "is not a MAC address",
        ),
        (
            "'02:00:00:00:0a:01'",
            "'00:00:00:00:00:00'",
            "create.mac",
            "not a usable MAC",
        ),
        (
            "interface: macvlan-a",
            "interface: macvlan-a-tenant-1",
            "interface",
            "is not an interface name",
        ),
        (
            "interface: macvlan-a",
            "interface: eth1",
            "interface",
            "eth1 is a managed interface",
        ),
        (
            "interface: macvlan-a\n",
            "interface: macvlan-a\n        mac: '02:00:00:00:0a:02'\n",
            "mac",
            "creates has MAC 02:00:00:00:0a:01",
        ),
        (
            "10.70.0.11/32",
            "192.168.31.102/32",
            "create.address",
            "192.168.31.102 is an egress IP of tenants[1] (tenant-b)",
        ),
    ] {
        let text = CREATING.replacen(from, to, 1);
        assert_ne!(text, CREATING, "{from}");
        assert_problem(&problems(&text), &format!("{at}.{field}"), needle);
    }
    // The ingress entry may repeat the MAC it creates.
    let text = CREATING.replacen(
        "interface: macvlan-a\n",
        "interface: macvlan-a\n        mac: '02:00:00:00:0a:01'\n",
        1,
    );
    assert!(plan(&text).is_ok());
}

#[test]
fn two_tenants_cannot_create_the_same_macvlan_address_or_mac() {
    let at = "tenants[1] (tenant-b).ingress[0]";
    let text = CREATING.replace("interface: macvlan-b", "interface: macvlan-a");
    assert_problem(
        &problems(&text),
        &format!("{at}.interface"),
        "macvlan-a is already created by tenants[0] (tenant-a).ingress[0]",
    );
    let text = CREATING.replace("10.70.0.12", "10.70.0.11");
    assert_problem(
        &problems(&text),
        &format!("{at}.create.address"),
        "10.70.0.11 is already the address of the macvlan tenants[0] (tenant-a).ingress[0] creates",
    );
    let text = CREATING.replace(
        "address: 10.70.0.12}",
        "address: 10.70.0.12, mac: '02-00-00-00-0A-01'}",
    );
    assert_problem(
        &problems(&text),
        &format!("{at}.create.mac"),
        "02:00:00:00:0a:01 is already the MAC of the macvlan tenants[0] (tenant-a).ingress[0] creates",
    );
}

#[test]
fn an_existing_link_that_is_not_the_macvlan_asked_for_is_refused() {
    let field = "tenants[0] (tenant-a).ingress[0].interface";
    for (kind, parent, needle) in [
        (
            "veth",
            0,
            "macvlan-a already exists as a veth, not as a macvlan on eth0",
        ),
        (
            "macvlan",
            4,
            "macvlan-a already exists as a macvlan on mgmt, not as a macvlan on eth0",
        ),
    ] {
        let system = machine_with("macvlan-a", kind, parent, Some([10, 70, 0, 11]));
        let problems = plan(CREATING)
            .unwrap()
            .resolve(&system)
            .expect_err("refused");
        assert_problem(&problems, field, needle);
        assert_problem(&problems, field, "never replaces a link it did not create");
        // The same link, made by this agent, is its own to recreate.
        let owned = BTreeSet::from([9]);
        assert!(
            plan(CREATING)
                .unwrap()
                .resolve_owning(&system, &owned)
                .is_ok(),
            "{kind} on {parent}"
        );
    }
}

#[test]
fn an_existing_macvlan_made_as_asked_is_used_as_it_is() {
    let system = machine_with("macvlan-a", "macvlan", 2, Some([10, 70, 0, 11]));
    let resolved = plan(CREATING).unwrap().resolve(&system).expect("adopted");
    assert_eq!(resolved.macvlans.len(), 2);

    // Someone else's macvlan is not changed: a MAC or an address that
    // differs is refused, naming the field and the way out.
    let at = "tenants[0] (tenant-a).ingress[0]";
    let text = CREATING.replace("'02:00:00:00:0a:01'", "'02:00:00:00:0a:09'");
    let problems = plan(&text).unwrap().resolve(&system).expect_err("refused");
    assert_problem(
        &problems,
        &format!("{at}.create.mac"),
        "with MAC 02:00:00:00:0a:01, not 02:00:00:00:0a:09",
    );
    let bare = machine_with("macvlan-a", "macvlan", 2, None);
    let problems = plan(CREATING).unwrap().resolve(&bare).expect_err("refused");
    assert_problem(
        &problems,
        &format!("{at}.create.address"),
        "macvlan-a already exists (not created by this agent) without 10.70.0.11",
    );
    // Made by this agent: it recreates it as asked.
    let owned = BTreeSet::from([9]);
    assert!(plan(&text).unwrap().resolve_owning(&bare, &owned).is_ok());
}

#[test]
fn a_next_hop_address_configured_elsewhere_is_refused() {
    let field = "tenants[1] (tenant-b).ingress[0].create.address";
    let text = CREATING.replace("10.70.0.12", "10.9.9.9");
    let problems = plan(&text)
        .unwrap()
        .resolve(&machine())
        .expect_err("refused");
    assert_problem(&problems, field, "10.9.9.9 is already configured on mgmt");
    // On another macvlan this agent made, it moves: that one is recreated
    // or removed first.
    let system = machine_with("macvlan-old", "macvlan", 2, Some([10, 70, 0, 12]));
    let problems = plan(CREATING)
        .unwrap()
        .resolve(&system)
        .expect_err("refused");
    assert_problem(
        &problems,
        field,
        "10.70.0.12 is already configured on macvlan-old",
    );
    let owned = BTreeSet::from([9]);
    assert!(
        plan(CREATING)
            .unwrap()
            .resolve_owning(&system, &owned)
            .is_ok()
    );
}

#[test]
fn other_tenants_may_name_a_created_macvlan_but_not_one_that_goes() {
    let text = format!(
        "{CREATING}  - name: tenant-c
    sources: [10.200.0.0/16]
    egressIPs: [192.168.31.103]
    ingress: [{{interface: macvlan-a}}]
"
    );
    let resolved = plan(&text).unwrap().resolve(&machine()).expect("resolves");
    assert_eq!(resolved.tenants[2].ingress, resolved.tenants[0].ingress);

    // A macvlan this agent created for a next hop the file no longer
    // creates is removed once the file applies: nobody may rely on it.
    let mut system = machine_with("macvlan-x", "macvlan", 2, Some([10, 70, 0, 13]));
    system.links[4].mac = Some([2, 0, 0, 0, 0x0a, 0x0c]);
    let text = text.replace("{interface: macvlan-a}", "{interface: macvlan-x}");
    assert!(
        plan(&text).unwrap().resolve(&system).is_ok(),
        "not ours: used"
    );
    let problems = plan(&text)
        .unwrap()
        .resolve_owning(&system, &BTreeSet::from([9]))
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[2] (tenant-c).ingress[0].interface",
        "macvlan-x was created by this agent",
    );
}

#[test]
fn a_mac_the_parent_or_a_sibling_has_is_refused() {
    let field = "tenants[0] (tenant-a).ingress[0].create.mac";
    // eth0's own MAC.
    let text = CREATING.replace("'02:00:00:00:0a:01'", "'02:00:00:00:00:02'");
    let problems = plan(&text)
        .unwrap()
        .resolve(&machine())
        .expect_err("refused");
    assert_problem(
        &problems,
        field,
        "02:00:00:00:00:02 is already the MAC of eth0, on eth0",
    );
    // Another macvlan on eth0, someone else's.
    let system = machine_with("macvlan-x", "macvlan", 2, None);
    let problems = plan(CREATING)
        .unwrap()
        .resolve(&system)
        .expect_err("refused");
    assert_problem(&problems, field, "is already the MAC of macvlan-x, on eth0");
    // This agent's: it is recreated or removed first.
    let owned = BTreeSet::from([9]);
    assert!(
        plan(CREATING)
            .unwrap()
            .resolve_owning(&system, &owned)
            .is_ok()
    );
    // On another parent the MAC is free.
    let system = machine_with("macvlan-x", "macvlan", 4, None);
    assert!(plan(CREATING).unwrap().resolve(&system).is_ok());
}

#[test]
fn tenants_without_a_quota_share_what_the_others_leave_of_the_table() {
    let text = SEED.replace(
        "    egressIPs: [192.168.31.101]\n",
        "    egressIPs: [192.168.31.101]\n    maxFlows: 1000\n",
    ) + "conntrack: {maxFlows: 5000}\n";
    let planned = plan(&text).expect("valid");
    let quotas: Vec<u32> = planned.tenants.iter().map(|t| t.limits.max_flows).collect();
    assert_eq!(quotas, [1000, 4000]);
    let even = plan(&format!("{SEED}conntrack: {{maxFlows: 5000}}\n")).expect("valid");
    let quotas: Vec<u32> = even.tenants.iter().map(|t| t.limits.max_flows).collect();
    assert_eq!(quotas, [2500, 2500]);
    assert_eq!(even.tenants[0].limits.new_flows_per_second, 0);
}

#[test]
fn quotas_and_rates_are_checked_field_by_field() {
    let with = |extra: &str| {
        SEED.replace(
            "    egressIPs: [192.168.31.101]\n",
            &format!("    egressIPs: [192.168.31.101]\n{extra}"),
        ) + "conntrack: {maxFlows: 100}\n"
    };
    assert_problem(
        &problems(&with("    maxFlows: 0\n")),
        "tenants[0] (tenant-a).maxFlows",
        "outside 1..=100",
    );
    assert_problem(
        &problems(&with("    maxFlows: 101\n")),
        "tenants[0] (tenant-a).maxFlows",
        "the whole table",
    );
    assert_problem(
        &problems(&with("    newFlowBurst: 5\n")),
        "tenants[0] (tenant-a).newFlowBurst",
        "needs newFlowsPerSecond",
    );
    assert_problem(
        &problems(&with("    newFlowsPerSecond: 0\n")),
        "tenants[0] (tenant-a).newFlowsPerSecond",
        "outside",
    );
    // A figure that leaves the other tenant nothing.
    assert_problem(
        &problems(&with("    maxFlows: 100\n")),
        "conntrack.maxFlows",
        "no share for the 1 tenants without maxFlows",
    );
    let limited = plan(&with("    newFlowsPerSecond: 50\n")).expect("valid");
    assert_eq!(
        (
            limited.tenants[0].limits.new_flows_per_second,
            limited.tenants[0].limits.new_flow_burst
        ),
        (50, 50)
    );
}

/// The seed with tenant-b dual-stack: its IPv6 source written between two
/// IPv4 ones, its IPv6 egress IP first, so written indices differ from
/// each family's own.
const DUAL_STACK: &str = "\
interfaces:
  internal: [eth0]
  external: eth1
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24, 'fd00:10::/64']
    egressIPs: [192.168.31.101, '2001:db8:31::101']
  - name: tenant-b
    sources: [172.20.20.0/24, 'fd00:20::/64', 172.20.21.0/24]
    egressIPs: ['2001:db8:31::150', 192.168.31.150]
";

#[test]
fn a_dual_stack_tenant_plans_each_family_apart() {
    let plan = plan(DUAL_STACK).expect("dual-stack tenants are valid");
    let b = &plan.tenants[1];
    assert_eq!(
        b.sources,
        [
            "172.20.20.0/24".parse::<Ipv4Net>().unwrap(),
            "172.20.21.0/24".parse().unwrap()
        ]
    );
    assert_eq!(b.sources_v6, ["fd00:20::/64".parse::<Ipv6Net>().unwrap()]);
    assert_eq!(b.egress, [Ipv4Addr::new(192, 168, 31, 150)]);
    assert_eq!(
        b.egress_v6,
        ["2001:db8:31::150".parse::<Ipv6Addr>().unwrap()]
    );
    assert_eq!(b.written.sources, [0, 2]);
    assert_eq!(b.written.sources_v6, [1]);
    assert_eq!(
        (&b.written.egress[..], &b.written.egress_v6[..]),
        (&[1][..], &[0][..])
    );
    let resolved = plan.resolve(&machine()).expect("resolves");
    assert_eq!(resolved.tenants[1].sources_v6, b.sources_v6);
    assert_eq!(resolved.tenants[1].egress_v6, b.egress_v6);
    let addresses: Vec<String> = resolved.egress_addresses().map(|a| a.to_string()).collect();
    assert_eq!(
        addresses,
        [
            "192.168.31.101",
            "2001:db8:31::101",
            "192.168.31.150",
            "2001:db8:31::150"
        ]
    );
}

#[test]
fn an_ipv6_only_tenant_needs_no_ipv4_egress_ip() {
    let text = "\
interfaces: {internal: [eth0], external: eth1}
tenants:
  - name: v6
    sources: ['fd00:30::/48', 'fd00:31::5']
    egressIPs: ['2001:db8:31::30']
";
    let plan = plan(text).expect("valid");
    assert!(plan.tenants[0].sources.is_empty() && plan.tenants[0].egress.is_empty());
    assert_eq!(
        plan.tenants[0].sources_v6[1],
        "fd00:31::5/128".parse::<Ipv6Net>().unwrap(),
        "a bare IPv6 address is a /128"
    );
}

#[test]
fn malformed_ipv6_sources_name_their_field() {
    let text = DUAL_STACK.replace("'fd00:20::/64'", "'fd00:20::1/64'");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).sources[1]",
        "host bits set; did you mean fd00:20::/64",
    );
    let text = DUAL_STACK.replace("'fd00:20::/64'", "'fd00:20::/129'");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).sources[1]",
        "not a CIDR",
    );
    let text = DUAL_STACK.replace("'fd00:20::/64'", "'fd00:20::/64', 'fd00:20::/64'");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).sources[2]",
        "fd00:20::/64 is listed twice",
    );
}

#[test]
fn overlapping_ipv6_sources_of_two_tenants_are_refused_at_the_written_index() {
    let text = DUAL_STACK.replace("'fd00:20::/64'", "'fd00:10::8000/113'");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).sources[1]",
        "overlaps fd00:10::/64 of tenants[0] (tenant-a)",
    );
}

#[test]
fn ipv4_and_ipv6_sources_never_overlap_each_other() {
    // ::ac14:a00/120 has the same numbers as 172.20.10.0/24.
    let text = DUAL_STACK.replace("'fd00:20::/64'", "'::ac14:a00/120'");
    plan(&text).expect("different families cannot overlap");
}

#[test]
fn an_ipv6_egress_ip_claimed_twice_is_refused() {
    let text = DUAL_STACK.replace("2001:db8:31::150", "2001:db8:31::101");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs[0]",
        "2001:db8:31::101 is already claimed by tenants[0] (tenant-a)",
    );
    let text = DUAL_STACK.replace("2001:db8:31::150'", "2001:db8:31::150', '2001:db8:31::150'");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs[1]",
        "listed twice",
    );
}

#[test]
fn an_ipv6_egress_ip_inside_tenant_sources_is_refused() {
    let text = DUAL_STACK.replace("2001:db8:31::150", "fd00:10::7");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs[0]",
        "fd00:10::7 lies inside the sources of tenants[0] (tenant-a)",
    );
    // Its own sources too, and not across families.
    let text = DUAL_STACK.replace("2001:db8:31::150", "fd00:20::1");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs[0]",
        "inside the sources of tenants[1] (tenant-b)",
    );
    let text = DUAL_STACK.replace("2001:db8:31::150", "::ac14:a07");
    plan(&text).expect("::ac14:a07 is not 172.20.10.7");
}

#[test]
fn unusable_ipv6_egress_ips_are_refused() {
    for (addr, needle) in [
        ("::", "cannot be a source address"),
        ("::1", "cannot be a source address"),
        ("ff02::1", "cannot be a source address"),
        ("fe80::5", "link-local"),
        ("::ffff:192.168.31.150", "IPv4-mapped"),
    ] {
        let text = DUAL_STACK.replace("2001:db8:31::150", addr);
        assert_problem(
            &problems(&text),
            "tenants[1] (tenant-b).egressIPs[0]",
            needle,
        );
    }
}

#[test]
fn at_most_eight_egress_ips_per_family() {
    let v4: Vec<String> = (1..=8).map(|i| format!("192.168.31.{}", 150 + i)).collect();
    let v6: Vec<String> = (1..=8)
        .map(|i| format!("'2001:db8:31::{:x}'", 0x150 + i))
        .collect();
    let both = format!("egressIPs: [{}, {}]", v4.join(", "), v6.join(", "));
    let text = DUAL_STACK.replace("egressIPs: ['2001:db8:31::150', 192.168.31.150]", &both);
    plan(&text).expect("eight of each family fit");
    let nine = format!(
        "egressIPs: [192.168.31.150, {}, '2001:db8:31::1ff']",
        v6.join(", ")
    );
    let text = DUAL_STACK.replace("egressIPs: ['2001:db8:31::150', 192.168.31.150]", &nine);
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs",
        "9 IPv6 addresses, at most 8 per tenant",
    );
}

#[test]
fn each_family_of_sources_needs_egress_ips_of_its_own_family() {
    let text = DUAL_STACK.replace("['2001:db8:31::150', 192.168.31.150]", "[192.168.31.150]");
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs",
        "the IPv6 sources need at least one IPv6 egress address",
    );
    let text = DUAL_STACK.replace(
        "['2001:db8:31::150', 192.168.31.150]",
        "['2001:db8:31::150']",
    );
    assert_problem(
        &problems(&text),
        "tenants[1] (tenant-b).egressIPs",
        "the IPv4 sources need at least one IPv4 egress address",
    );
}

#[test]
fn floating_ips_stand_in_for_egress_ips_of_their_family() {
    let floating_only = |sources: &str, floats: &str| {
        format!(
            "interfaces: {{internal: [eth0], external: eth1}}
tenants:
  - name: nat
    sources: {sources}
    floatingIPs: {floats}
"
        )
    };
    let v4 = "[{address: 192.168.31.160, host: 172.20.10.5}]";
    let both = "[{address: 192.168.31.160, host: 172.20.10.5}, \
                {address: '2001:db8:31::160', host: 'fd00:10::5'}]";
    plan(&floating_only("[172.20.10.0/24]", v4))
        .expect("an IPv4 tenant may have floating IPs only");
    plan(&floating_only("[172.20.10.0/24, 'fd00:10::/64']", both))
        .expect("so may a dual-stack one, with one of each family");
    assert_problem(
        &problems(&floating_only("[172.20.10.0/24, 'fd00:10::/64']", v4)),
        "tenants[0] (nat).egressIPs",
        "the IPv6 sources need at least one IPv6 egress address (or the tenant's floatingIPs)",
    );
}

fn with_v6_address(index: u32, addr: &str, egress_owned: bool) -> SystemView {
    let mut system = machine();
    system.addresses.push(AddressFacts {
        index,
        addr: addr.parse().unwrap(),
        prefix_len: 64,
        egress_owned,
    });
    system
}

#[test]
fn an_ipv6_egress_ip_held_by_another_interface_is_refused() {
    let problems = plan(DUAL_STACK)
        .unwrap()
        .resolve(&with_v6_address(4, "2001:db8:31::150", false))
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "2001:db8:31::150 is already configured on mgmt",
    );
}

#[test]
fn the_gateways_own_ipv6_address_is_refused_and_the_agents_is_its_own() {
    let problems = plan(DUAL_STACK)
        .unwrap()
        .resolve(&with_v6_address(3, "2001:db8:31::150", false))
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (tenant-b).egressIPs[0]",
        "the gateway's own address on eth1",
    );
    plan(DUAL_STACK)
        .unwrap()
        .resolve(&with_v6_address(3, "2001:db8:31::150", true))
        .expect("an address this agent added is its own");
}

#[test]
fn tenants_on_the_same_ingress_port_must_not_overlap_in_ipv6_either() {
    let dual = SHARED_POD_CIDR
        .replace(
            "sources: [10.128.0.0/14]\n    egressIPs: [192.168.55.113]",
            "sources: [10.128.0.0/14, 'fd00:128::/56']\n    egressIPs: [192.168.55.113, '2001:db8:55::113']",
        )
        .replace(
            "sources: [10.128.0.0/14]\n    egressIPs: [192.168.55.114]",
            "sources: ['fd00:128::/64', 10.128.0.0/14]\n    egressIPs: [192.168.55.114, '2001:db8:55::114']",
        );
    plan(&dual)
        .unwrap()
        .resolve(&machine_with_macvlan())
        .expect("different ingress ports may share IPv6 sources");
    let same_port = dual.replace("'02:00:00:00:00:aa'", "'02:00:00:00:00:bb'");
    let problems = plan(&same_port)
        .unwrap()
        .resolve(&machine_with_macvlan())
        .expect_err("refused");
    assert_problem(
        &problems,
        "tenants[1] (ns-red).sources[0]",
        "overlaps fd00:128::/56 of tenants[0] (ns-blue)",
    );
    assert_problem(
        &problems,
        "tenants[1] (ns-red).sources[1]",
        "overlaps 10.128.0.0/14 of tenants[0] (ns-blue)",
    );
}

#[test]
fn ipv6_port_forwards_and_floating_ips_stay_within_their_family() {
    let tenant_a = DUAL_STACK.split("  - name: tenant-b").next().unwrap();
    let text = format!(
        "{tenant_a}    portForwards:
      - {{egressIP: '2001:db8:31::101', protocol: tcp, port: 80, to: '[fd00:10::2]:80'}}
    floatingIPs: [{{address: '2001:db8:31::160', host: 'fd00:10::5'}}]
"
    );
    let plan = plan(&text).expect("IPv6 rules");
    let tenant = &plan.tenants[0];
    assert_eq!(
        tenant.forwards[0].host,
        "fd00:10::2".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        tenant.floating[0].address,
        "2001:db8:31::160".parse::<IpAddr>().unwrap()
    );
    let found = problems(&format!(
        "{tenant_a}    portForwards:
      - {{egressIP: '2001:db8:31::101', protocol: tcp, port: 80, to: '172.20.10.2:80'}}
      - {{egressIP: 192.168.31.101, protocol: tcp, port: 80, to: '[fd00:10::2]:80'}}
      - {{egressIP: '2001:db8:31::101', protocol: tcp, port: 81, to: '[fd00:99::2]:80'}}
    floatingIPs:
      - {{address: '2001:db8:31::160', host: 172.20.10.5}}
      - {{address: 'fe80::160', host: 'fd00:10::6'}}
"
    ));
    assert_problem(
        &found,
        "tenants[0] (tenant-a).portForwards[0].to",
        "172.20.10.2 is IPv4 and egressIP 2001:db8:31::101 IPv6",
    );
    assert_problem(
        &found,
        "tenants[0] (tenant-a).portForwards[1].to",
        "a forward stays within its family",
    );
    assert_problem(
        &found,
        "tenants[0] (tenant-a).portForwards[2].to",
        "fd00:99::2 is not in this tenant's sources",
    );
    assert_problem(
        &found,
        "tenants[0] (tenant-a).floatingIPs[0].host",
        "a floating IP stays within its family",
    );
    assert_problem(
        &found,
        "tenants[0] (tenant-a).floatingIPs[1].address",
        "link-local",
    );
}

#[test]
fn routed_sources_take_both_families_but_no_tenants_sources() {
    let text = format!("{DUAL_STACK}routedSources: ['fd00:77::/64', 10.16.2.0/24]\n");
    let plan = Config::parse(&text).unwrap().plan().expect("both families");
    assert_eq!(
        plan.routed_sources,
        [
            "fd00:77::/64".parse::<IpNet>().unwrap(),
            "10.16.2.0/24".parse().unwrap()
        ]
    );
    // Inside tenant-a's fd00:10::/64.
    let found = problems(&format!("{DUAL_STACK}routedSources: ['fd00:10::/112']\n"));
    assert_problem(
        &found,
        "routedSources[0]",
        "overlaps the sources of tenants[0]",
    );
}
