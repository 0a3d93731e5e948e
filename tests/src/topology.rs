//! The gateway topology of the seeds, built from network namespaces:
//!
//! ```text
//!  tenant hosts ──┐
//!  (one ns each)  ├─ lan (bridge) ── gw eth0 │ gw │ eth1 ── ext eth0 (server)
//!  stranger ──────┘     internal: 172.20.x.1/24    192.168.31.2/24   192.168.31.1/24
//! ```
//!
//! The gateway is the router of every host subnet; its external side shares
//! 192.168.31.0/24 with the server, so the server reaches the egress
//! addresses by ARP, as a partner's firewall on the same segment would.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use crate::netns::Netns;

pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 1);
pub const GATEWAY_EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 2);
pub const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);
pub const EGRESS_B: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 150);
pub const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
pub const HOST_B: Ipv4Addr = Ipv4Addr::new(172, 20, 20, 10);
/// A host in a subnet the gateway routes but no tenant owns.
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(172, 20, 30, 10);

/// The IPv6 side of the topology (`Topology::add_ipv6`): each host's /24
/// has a /64 beside it, 2001:db8:<third octet>::/64, the host at ::10
/// and the gateway at ::1; the external link is 2001:db8:31::/64.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 1);
pub const GATEWAY_EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 2);
pub const EGRESS_A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x101);
pub const EGRESS_B_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x150);

/// The far server's IPv6 address (`add_far_server`, then `add_ipv6`).
pub const FAR_SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 2);

/// A host's IPv6 address beside its IPv4 one (`add_ipv6`).
pub fn ipv6_of(addr: Ipv4Addr) -> Ipv6Addr {
    // 172.20.10.10 -> 2001:db8:10::10: the octet's decimal digits, read as
    // hexadecimal, so the two addresses look alike.
    let subnet = u16::from_str_radix(&addr.octets()[2].to_string(), 16).expect("digits");
    Ipv6Addr::new(0x2001, 0xdb8, subnet, 0, 0, 0, 0, 0x10)
}

/// The seed's tenants dual-stack: each family leaves from its own address.
pub fn dual_stack_config(max_flows: u32) -> String {
    format!(
        "\
interfaces:
  internal: [eth0]
  external: eth1
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24, 2001:db8:10::/64]
    egressIPs: [{EGRESS_A}, {EGRESS_A_V6}]
  - name: tenant-b
    sources: [172.20.20.0/24, 2001:db8:20::/64]
    egressIPs: [{EGRESS_B}, {EGRESS_B_V6}]
conntrack:
  maxFlows: {max_flows}
"
    )
}

/// The seed's two tenants, as the YAML configuration names them.
pub fn seed_config(max_flows: u32) -> String {
    format!(
        "\
interfaces:
  internal: [eth0]
  external: eth1
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [{EGRESS_A}]
  - name: tenant-b
    sources: [172.20.20.0/24]
    egressIPs: [{EGRESS_B}]
conntrack:
  maxFlows: {max_flows}
"
    )
}

/// A host on the tenant LAN.
pub struct Host {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

pub struct Topology {
    pub hosts: Vec<Host>,
    pub lan: Netns,
    pub gateway: Netns,
    pub external: Netns,
    /// A server one router further out, when `add_far_server` made one.
    pub far: Option<Netns>,
}

/// The far server's address, behind the external namespace acting as a router.
pub const FAR_SERVER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

impl Topology {
    /// Tenant A's host, tenant B's host, and a stranger, in that order.
    pub fn seed() -> Self {
        Self::new(&[("a", HOST_A), ("b", HOST_B), ("x", STRANGER)])
    }

    /// One host per `(role, address)`, each in its own /24 behind the gateway.
    pub fn new(hosts: &[(&str, Ipv4Addr)]) -> Self {
        let lan = Netns::new("lan");
        let gateway = Netns::new("gw");
        let external = Netns::new("ext");
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);

        gateway.veth("eth0", &lan, "gw");
        lan.ip(&["link", "set", "gw", "master", "br0"]);
        gateway.veth("eth1", &external, "eth0");
        gateway.ip(&[
            "addr",
            "add",
            &format!("{GATEWAY_EXTERNAL}/24"),
            "dev",
            "eth1",
        ]);
        gateway.ip(&["route", "add", "default", "via", &SERVER.to_string()]);
        external.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "eth0"]);

        let mut built = Vec::new();
        let mut routers: Vec<Ipv4Addr> = Vec::new();
        for (i, (role, addr)) in hosts.iter().enumerate() {
            let ns = Netns::new(&format!("host{role}"));
            let port = format!("h{i}");
            ns.veth("eth0", &lan, &port);
            lan.ip(&["link", "set", &port, "master", "br0"]);
            let router = router_of(*addr);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.ip(&["route", "add", "default", "via", &router.to_string()]);
            if !routers.contains(&router) {
                gateway.ip(&["addr", "add", &format!("{router}/24"), "dev", "eth0"]);
                routers.push(router);
            }
            built.push(Host { ns, addr: *addr });
        }
        // Every interface keeps the kernel's defaults (veth GRO off, TX
        // checksum offload and TSO on): the agent must cope, as it must on
        // a real gateway pod whose peers nobody here owns.
        Self {
            hosts: built,
            lan,
            gateway,
            external,
            far: None,
        }
    }

    /// Makes the external namespace a router towards a far server whose
    /// link out of that router has MTU `mtu` (the server's own side stays at
    /// 1500, so TCP's MSS does not hide the narrow hop: only path-MTU
    /// discovery finds it).
    pub fn add_far_server(&mut self, mtu: u16) -> Ipv4Addr {
        let far = Netns::new("far");
        self.external.veth("far0", &far, "eth0");
        self.external
            .ip(&["addr", "add", "10.99.0.1/24", "dev", "far0"]);
        self.external
            .ip(&["link", "set", "far0", "mtu", &mtu.to_string()]);
        self.external
            .run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        far.ip(&["addr", "add", &format!("{FAR_SERVER}/24"), "dev", "eth0"]);
        far.ip(&["route", "add", "default", "via", "10.99.0.1"]);
        self.far = Some(far);
        FAR_SERVER
    }

    /// Gives every host, the gateway and the server IPv6 addresses beside
    /// their IPv4 ones (see `SERVER_V6`), with the gateway routing between
    /// them, and waits until duplicate address detection let every address
    /// serve. Interfaces keep their defaults otherwise.
    pub fn add_ipv6(&self) {
        // IPv6 forwarding on the gateway is left off, the kernel's default:
        // the agent switches it on for IPv6 tenants.
        self.gateway.ip(&[
            "addr",
            "add",
            &format!("{GATEWAY_EXTERNAL_V6}/64"),
            "dev",
            "eth1",
        ]);
        self.gateway.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &SERVER_V6.to_string(),
        ]);
        self.external
            .ip(&["addr", "add", &format!("{SERVER_V6}/64"), "dev", "eth0"]);
        let mut routers: Vec<Ipv6Addr> = Vec::new();
        for host in &self.hosts {
            let addr = ipv6_of(host.addr);
            let router = Ipv6Addr::from(u128::from(addr) & !0xffff_u128 | 1);
            host.ns
                .ip(&["addr", "add", &format!("{addr}/64"), "dev", "eth0"]);
            host.ns
                .ip(&["-6", "route", "add", "default", "via", &router.to_string()]);
            if !routers.contains(&router) {
                self.gateway
                    .ip(&["addr", "add", &format!("{router}/64"), "dev", "eth0"]);
                routers.push(router);
            }
        }
        if let Some(far) = &self.far {
            // The external namespace routes on to the far server, its link
            // keeping the MTU `add_far_server` gave it.
            self.external
                .run("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
            self.external
                .ip(&["addr", "add", "2001:db8:99::1/64", "dev", "far0"]);
            far.ip(&["addr", "add", &format!("{FAR_SERVER_V6}/64"), "dev", "eth0"]);
            far.ip(&["-6", "route", "add", "default", "via", "2001:db8:99::1"]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for ns in [&self.gateway, &self.external]
            .into_iter()
            .chain(self.far.iter())
            .chain(self.hosts.iter().map(|h| &h.ns))
        {
            ns.wait_ipv6_settled(deadline);
        }
    }

    pub fn host(&self, addr: Ipv4Addr) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.addr == addr)
            .unwrap_or_else(|| panic!("no host {addr} in this topology"))
    }
}

/// The .1 of a host's /24: where the gateway answers for that subnet.
pub fn router_of(addr: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = addr.octets();
    Ipv4Addr::new(a, b, c, 1)
}
