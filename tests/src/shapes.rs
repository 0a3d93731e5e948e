//! The deployment shapes of the seeds that the plain two-NIC gateway of
//! `topology` does not cover, built from network namespaces:
//!
//! - [`KubeOvnPod`] (seeds 001 and 003): the gateway is a pod whose `eth0`
//!   is a veth to the node's switch, shared with the tenant pods, and whose
//!   `net1` is a macvlan (mode bridge) on the node's external NIC. With
//!   [`KubeOvnPod::with_internal_mtu`] the pod network runs jumbo frames
//!   while `net1` stays at 1500.
//! - [`GatewayVm`] (seed 002): a VM outside the cluster with one NIC on the
//!   cluster LAN and one macvlan per tenant on it; the node steers each
//!   tenant's pods, which share one pod CIDR, to that tenant's macvlan
//!   address by policy routing.
//!
//! Every interface keeps the kernel's defaults (no ethtool anywhere): the
//! tenant pods are co-located senders whose TSO super-packets with partial
//! checksums reach the gateway as they would on a real node.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{netns::Netns, topology::Host};

/// Creates a veth pair (`name` in `a`, `peer_name` in `b`), both up, both
/// at `mtu`.
fn veth_with_mtu(a: &Netns, name: &str, b: &Netns, peer_name: &str, mtu: u16) {
    a.veth(name, b, peer_name);
    let mtu = mtu.to_string();
    a.ip(&["link", "set", name, "mtu", &mtu]);
    b.ip(&["link", "set", peer_name, "mtu", &mtu]);
}

/// A namespace holding one Linux bridge `br0`, up, at `mtu`.
fn switch(role: &str, mtu: u16) -> Netns {
    let ns = Netns::new(role);
    ns.ip(&[
        "link",
        "add",
        "br0",
        "mtu",
        &mtu.to_string(),
        "type",
        "bridge",
    ]);
    ns.ip(&["link", "set", "br0", "up"]);
    ns
}

/// Reads `net.ipv4.conf.<interface>.<key>` inside `ns`.
pub fn ipv4_conf(ns: &Netns, interface: &str, key: &str) -> u32 {
    let out = ns.run(
        "sysctl",
        &["-n", &format!("net.ipv4.conf.{interface}.{key}")],
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|err| panic!("net.ipv4.conf.{interface}.{key}: {err}"))
}

/// The value the kernel acts on for `arp_ignore` and `arp_announce`: the
/// larger of `all` and the interface's own (`IN_DEV_MAXCONF`).
pub fn effective_ipv4_conf(ns: &Netns, interface: &str, key: &str) -> u32 {
    ipv4_conf(ns, "all", key).max(ipv4_conf(ns, interface, key))
}

/// Kube-OVN's VPC egress gateway pod (seed 003; seed 001's NAT gateway pod
/// is the same shape):
///
/// ```text
///  node ns: br0 (the OVN switch)                       extlan ns: br0
///   ├─ pod a 10.16.1.10 ─┐                              ├─ server 172.17.0.1
///   ├─ pod b 10.16.2.10 ─┼─ br0 ── eth0 10.16.0.12 [gw pod] net1 172.17.0.11
///   └─ pod x 10.16.3.10 ─┘                                 │ (macvlan bridge)
///                           node eth1 (macvlan parent) ────┴── extlan br0
/// ```
///
/// The pods route everything to the gateway pod's `eth0` address, as
/// OVN's reroute policy does; the pod subnet is one /16, so every pod and
/// the gateway are neighbours. `net1` is created on the node's `eth1` and
/// moved into the pod, as the macvlan CNI plugin does.
pub struct KubeOvnPod {
    /// Tenant A's pod, tenant B's pod, and a pod in no tenant, in that order.
    pub pods: Vec<Host>,
    pub node: Netns,
    pub gateway: Netns,
    pub extlan: Netns,
    /// The partner's server on the external LAN (its interface is `eth0`).
    pub server: Netns,
}

impl KubeOvnPod {
    pub const GATEWAY_INTERNAL: Ipv4Addr = Ipv4Addr::new(10, 16, 0, 12);
    pub const GATEWAY_EXTERNAL: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 11);
    pub const SERVER: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
    pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 16, 1, 10);
    pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 16, 2, 10);
    /// A pod of the VPC that no tenant owns.
    pub const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 16, 3, 10);
    pub const EGRESS_A: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 101);
    pub const EGRESS_B: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 150);
    /// The VPC's pod subnet: everything internal.
    pub const POD_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 16, 0, 0), 16);
    /// The IPv6 side of a dual-stack VPC (`add_ipv6`): the pod subnet is
    /// fd00:10:16::/48, the external LAN fd00:172:17::/64.
    pub const OVN_ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x16, 0, 0, 0, 0, 1);
    pub const GATEWAY_INTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x16, 0, 0, 0, 0, 0x12);
    pub const GATEWAY_EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x17, 0, 0, 0, 0, 0x11);
    pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x17, 0, 0, 0, 0, 1);

    /// Everything at MTU 1500.
    pub fn new() -> Self {
        Self::with_internal_mtu(1500)
    }

    /// The pod network (pods, the node's switch, the gateway's `eth0`) at
    /// `mtu`; the external side (`net1`, the node's `eth1`, the server)
    /// stays at 1500.
    pub fn with_internal_mtu(mtu: u16) -> Self {
        let node = switch("node", mtu);
        let gateway = Netns::new("gwpod");
        let extlan = switch("extlan", 1500);
        let server = Netns::new("server");

        // The gateway pod's eth0 on the pod network.
        veth_with_mtu(&gateway, "eth0", &node, "gw-eth0", mtu);
        node.ip(&["link", "set", "gw-eth0", "master", "br0"]);
        gateway.ip(&[
            "addr",
            "add",
            &format!("{}/16", Self::GATEWAY_INTERNAL),
            "dev",
            "eth0",
        ]);

        // The node's external NIC, cabled to the external LAN, and the
        // macvlan the CNI plugin makes on it for the gateway pod.
        node.veth("eth1", &extlan, "node");
        extlan.ip(&["link", "set", "node", "master", "br0"]);
        node.ip(&[
            "link", "add", "net1", "link", "eth1", "type", "macvlan", "mode", "bridge",
        ]);
        node.ip(&["link", "set", "net1", "netns", gateway.name()]);
        gateway.ip(&["link", "set", "net1", "up"]);
        gateway.ip(&[
            "addr",
            "add",
            &format!("{}/16", Self::GATEWAY_EXTERNAL),
            "dev",
            "net1",
        ]);
        gateway.ip(&[
            "route",
            "add",
            "default",
            "via",
            &Self::SERVER.to_string(),
            "dev",
            "net1",
        ]);

        server.veth("eth0", &extlan, "server");
        extlan.ip(&["link", "set", "server", "master", "br0"]);
        server.ip(&[
            "addr",
            "add",
            &format!("{}/16", Self::SERVER),
            "dev",
            "eth0",
        ]);

        let pods = [
            ("poda", Self::POD_A),
            ("podb", Self::POD_B),
            ("podx", Self::STRANGER),
        ]
        .iter()
        .enumerate()
        .map(|(i, (role, addr))| {
            let ns = Netns::new(role);
            let port = format!("pod{i}");
            veth_with_mtu(&ns, "eth0", &node, &port, mtu);
            node.ip(&["link", "set", &port, "master", "br0"]);
            ns.ip(&["addr", "add", &format!("{addr}/16"), "dev", "eth0"]);
            // OVN's `ip4.src == <pods> reroute <gateway pod>`.
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &Self::GATEWAY_INTERNAL.to_string(),
            ]);
            Host { ns, addr: *addr }
        })
        .collect();

        Self {
            pods,
            node,
            gateway,
            extlan,
            server,
        }
    }

    /// The agent's configuration for this pod, both hooks left to `auto`.
    pub fn config(&self) -> String {
        format!(
            "\
interfaces:
  internal: [eth0]
  external: net1
  hook: auto
tenants:
  - name: tenant-a
    sources: [10.16.1.0/24]
    egressIPs: [{}]
  - name: tenant-b
    sources: [10.16.2.0/24]
    egressIPs: [{}]
conntrack:
  maxFlows: 4096
",
            Self::EGRESS_A,
            Self::EGRESS_B
        )
    }

    pub fn pod(&self, addr: Ipv4Addr) -> &Host {
        self.pods
            .iter()
            .find(|p| p.addr == addr)
            .unwrap_or_else(|| panic!("no pod {addr} in this topology"))
    }

    /// A pod's IPv6 address in a dual-stack VPC: 10.16.x.y is
    /// fd00:10:16:x::y (hex digits of the decimal ones).
    pub fn ipv6_of(addr: Ipv4Addr) -> Ipv6Addr {
        let [_, _, x, y] = addr.octets();
        Ipv6Addr::new(0xfd00, 0x10, 0x16, x.into(), 0, 0, 0, y.into())
    }

    /// Makes the VPC dual-stack, as Kube-OVN's dual-stack subnets are: the
    /// node's switch routes like OVN's router, pods route IPv6 to the
    /// gateway pod, the gateway pod's `net1` and the server get addresses
    /// on the external LAN. Duplicate address detection stays on; this
    /// waits for it.
    pub fn add_ipv6(&self) {
        self.node
            .run("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        self.node.ip(&[
            "addr",
            "add",
            &format!("{}/48", Self::OVN_ROUTER_V6),
            "dev",
            "br0",
        ]);
        self.gateway.ip(&[
            "addr",
            "add",
            &format!("{}/48", Self::GATEWAY_INTERNAL_V6),
            "dev",
            "eth0",
        ]);
        self.gateway.ip(&[
            "addr",
            "add",
            &format!("{}/64", Self::GATEWAY_EXTERNAL_V6),
            "dev",
            "net1",
        ]);
        self.gateway.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &Self::SERVER_V6.to_string(),
            "dev",
            "net1",
        ]);
        self.server.ip(&[
            "addr",
            "add",
            &format!("{}/64", Self::SERVER_V6),
            "dev",
            "eth0",
        ]);
        for pod in &self.pods {
            let addr = Self::ipv6_of(pod.addr);
            pod.ns
                .ip(&["addr", "add", &format!("{addr}/48"), "dev", "eth0"]);
            pod.ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &Self::GATEWAY_INTERNAL_V6.to_string(),
            ]);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for ns in [&self.node, &self.gateway, &self.server]
            .into_iter()
            .chain(self.pods.iter().map(|p| &p.ns))
        {
            ns.wait_ipv6_settled(deadline);
        }
    }
}

impl Default for KubeOvnPod {
    fn default() -> Self {
        Self::new()
    }
}

/// The gateway VM of seed 002, outside the cluster:
///
/// ```text
///  pods (one pod CIDR)        node ns                lan ns      vm ns
///   a 10.128.0.10 ─┐  cni0 10.128.0.1/24            ┌ br0 ┐  enp1s0 192.168.99.12/24
///   b 10.128.0.20 ─┼─ eth0 192.168.99.21/24 ────────┘     └─  macvlan-a 192.168.99.13/32
///   x 10.128.0.30 ─┘   from a: via .13 (table 100)            macvlan-b 192.168.99.14/32
///                      from b: via .14 (table 200)           enp7s0 192.168.55.12/24 ── server
///                      others: via .12 (main)                               192.168.55.1
/// ```
///
/// Tenants A and B share the pod CIDR and are told apart only by the next
/// hop the node routes them to (seed 002's AdminPolicyBasedExternalRoute),
/// hence by the macvlan MAC their frames are addressed to. Pod x is routed
/// to the VM's own address, as a stale ARP entry or a missing policy would:
/// it belongs to no tenant. `enp1s0` is a veth standing for the virtio NIC.
/// The VM's ARP sysctls are left at the kernel's defaults: keeping each
/// macvlan address answered by its own macvlan is the agent's job.
///
/// [`GatewayVm::new`] makes the macvlans as seed 002's script does;
/// [`GatewayVm::without_next_hops`] leaves them to the agent
/// ([`GatewayVm::config_creating_next_hops`]).
pub struct GatewayVm {
    /// Tenant A's pod, tenant B's pod, and a pod in no tenant, in that order.
    pub pods: Vec<Host>,
    pub node: Netns,
    pub lan: Netns,
    pub vm: Netns,
    /// The partner's server (its interface is `eth0`).
    pub server: Netns,
}

impl GatewayVm {
    pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 21);
    pub const VM: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 12);
    pub const NEXT_HOP_A: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 13);
    pub const NEXT_HOP_B: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 14);
    pub const VM_EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 168, 55, 12);
    pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 55, 1);
    pub const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 55, 113);
    pub const EGRESS_B: Ipv4Addr = Ipv4Addr::new(192, 168, 55, 114);
    pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 10);
    pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 20);
    /// A pod the node routes to the VM's own address: in no tenant.
    pub const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 30);
    /// The cluster network both tenants' sources name (seed 002's
    /// `--pod-cidr`), and the node's share of it.
    pub const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 128, 0, 0), 14);
    pub const NODE_POD_CIDR: &str = "10.128.0.0/24";
    /// The MAC tenant A's next hop is created with when the agent makes it
    /// (tenant B's is the agent's default, derived from the names).
    pub const NEXT_HOP_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
    /// Each tenant's next-hop macvlan and its address.
    pub const NEXT_HOPS: [(&str, Ipv4Addr); 2] = [
        ("macvlan-a", Self::NEXT_HOP_A),
        ("macvlan-b", Self::NEXT_HOP_B),
    ];

    /// The VM with its next hops made by hand, as seed 002's script does.
    pub fn new() -> Self {
        let vm = Self::without_next_hops();
        // One macvlan per tenant with a /32 from the LAN, as the seed's
        // `add-tenant` makes them.
        for (name, addr) in Self::NEXT_HOPS {
            vm.vm.ip(&[
                "link", "add", name, "link", "enp1s0", "type", "macvlan", "mode", "bridge",
            ]);
            vm.vm.ip(&["link", "set", name, "up"]);
            vm.vm
                .ip(&["addr", "add", &format!("{addr}/32"), "dev", name]);
        }
        vm
    }

    /// The VM without macvlans: the node already routes each tenant to its
    /// next hop, which nothing answers until the agent creates it.
    pub fn without_next_hops() -> Self {
        let lan = switch("lan", 1500);
        let node = Netns::new("node");
        let vm = Netns::new("vm");
        let server = Netns::new("server");

        // The VM's NICs: enp1s0 on the cluster LAN, enp7s0 towards the
        // partner.
        vm.veth("enp1s0", &lan, "vm");
        lan.ip(&["link", "set", "vm", "master", "br0"]);
        vm.ip(&["addr", "add", &format!("{}/24", Self::VM), "dev", "enp1s0"]);
        vm.veth("enp7s0", &server, "eth0");
        vm.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::VM_EXTERNAL),
            "dev",
            "enp7s0",
        ]);
        vm.ip(&["route", "add", "default", "via", &Self::SERVER.to_string()]);
        server.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::SERVER),
            "dev",
            "eth0",
        ]);

        // The node: its LAN NIC, the pods' bridge, and the policy routes.
        node.veth("eth0", &lan, "node");
        lan.ip(&["link", "set", "node", "master", "br0"]);
        node.ip(&["addr", "add", &format!("{}/24", Self::NODE), "dev", "eth0"]);
        node.ip(&["link", "add", "cni0", "type", "bridge"]);
        node.ip(&["link", "set", "cni0", "up"]);
        node.ip(&["addr", "add", "10.128.0.1/24", "dev", "cni0"]);
        node.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        node.ip(&["route", "add", "default", "via", &Self::VM.to_string()]);
        for (pod, table, next_hop) in [
            (Self::POD_A, "100", Self::NEXT_HOP_A),
            (Self::POD_B, "200", Self::NEXT_HOP_B),
        ] {
            node.ip(&[
                "route",
                "add",
                "default",
                "via",
                &next_hop.to_string(),
                "dev",
                "eth0",
                "table",
                table,
            ]);
            // The pod CIDR stays reachable from the policy table.
            node.ip(&[
                "route",
                "add",
                Self::NODE_POD_CIDR,
                "dev",
                "cni0",
                "table",
                table,
            ]);
            node.ip(&["rule", "add", "from", &pod.to_string(), "lookup", table]);
        }

        let pods = [
            ("poda", Self::POD_A),
            ("podb", Self::POD_B),
            ("podx", Self::STRANGER),
        ]
        .iter()
        .enumerate()
        .map(|(i, (role, addr))| {
            let ns = Netns::new(role);
            let port = format!("pod{i}");
            ns.veth("eth0", &node, &port);
            node.ip(&["link", "set", &port, "master", "cni0"]);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.ip(&["route", "add", "default", "via", "10.128.0.1"]);
            Host { ns, addr: *addr }
        })
        .collect();

        Self {
            pods,
            node,
            lan,
            vm,
            server,
        }
    }

    /// Seed 002's two tenants: one cluster CIDR, told apart by ingress
    /// macvlan; the return route to the node's pod CIDR is the agent's.
    pub fn config(&self) -> String {
        Self::config_with_ingress(["- interface: macvlan-a", "- interface: macvlan-b"])
    }

    /// [`GatewayVm::config`] asking the agent to create the next hops:
    /// tenant A's with [`GatewayVm::NEXT_HOP_A_MAC`], tenant B's with the
    /// agent's default MAC.
    pub fn config_creating_next_hops(&self) -> String {
        let [(a, addr_a), (b, addr_b)] = Self::NEXT_HOPS;
        let mac_a = Self::NEXT_HOP_A_MAC.map(|b| format!("{b:02x}")).join(":");
        Self::config_with_ingress([
            &format!(
                "\
- interface: {a}
        create:
          parent: enp1s0
          address: {addr_a}/32
          mac: \"{mac_a}\""
            ),
            &format!(
                "\
- interface: {b}
        create: {{parent: enp1s0, address: {addr_b}/32}}"
            ),
        ])
    }

    /// The configuration with each tenant's `ingress` list (YAML, at the
    /// list's indentation) given.
    fn config_with_ingress([a, b]: [&str; 2]) -> String {
        let (cidr, len) = Self::CLUSTER_CIDR;
        format!(
            "\
interfaces:
  internal: [enp1s0]
  external: enp7s0
  hook: auto
tenants:
  - name: tenant-a
    sources: [{cidr}/{len}]
    egressIPs: [{}]
    ingress:
      {a}
  - name: tenant-b
    sources: [{cidr}/{len}]
    egressIPs: [{}]
    ingress:
      {b}
returnRoutes:
  - destination: {}
    via: {}
    interface: enp1s0
conntrack:
  maxFlows: 4096
",
            Self::EGRESS_A,
            Self::EGRESS_B,
            Self::NODE_POD_CIDR,
            Self::NODE,
        )
    }

    pub fn pod(&self, addr: Ipv4Addr) -> &Host {
        self.pods
            .iter()
            .find(|p| p.addr == addr)
            .unwrap_or_else(|| panic!("no pod {addr} in this topology"))
    }
}

impl Default for GatewayVm {
    fn default() -> Self {
        Self::new()
    }
}

/// Seed 001's VpcNatGateway pod (Harvester, Kube-OVN as secondary CNI):
///
/// ```text
///  vpc ns: br0 (subnet1 172.20.10.0/24)        extlan ns: br0 (10.115.48.0/21)
///   ├─ host 172.20.10.2 ─┐                      ├─ router/client 10.115.55.254
///   └─ host 172.20.10.3 ─┴─ br0 ── net1 172.20.10.254 [nat gw pod] net2 10.115.48.1/21
///                                                                    │ (macvlan bridge)
///                                   node eth1 (macvlan parent) ──────┴─ extlan br0
/// ```
///
/// `net1` joins the VPC subnet, `net2` the external subnet with the pod's
/// own address; EIPs come from the controller's `eip-add`. The external
/// subnet's gateway (`GATEWAY_V4`) is also the client and server outside.
pub struct NatGatewayPod {
    pub hosts: Vec<Host>,
    pub node: Netns,
    pub gateway: Netns,
    pub vpc: Netns,
    pub extlan: Netns,
    /// The external subnet's gateway, client and server outside.
    pub outside: Netns,
}

impl NatGatewayPod {
    pub const INTERNAL: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 254);
    pub const EXTERNAL: Ipv4Addr = Ipv4Addr::new(10, 115, 48, 1);
    pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 115, 55, 254);
    pub const WEB: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 2);
    pub const FLOATING_HOST: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 3);

    pub fn new() -> Self {
        let vpc = switch("vpc", 1500);
        let extlan = switch("extlan", 1500);
        let node = Netns::new("node");
        let gateway = Netns::new("natgw");
        let outside = Netns::new("outside");

        vpc.veth("gw", &gateway, "net1");
        vpc.ip(&["link", "set", "gw", "master", "br0"]);
        gateway.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::INTERNAL),
            "dev",
            "net1",
        ]);

        node.veth("eth1", &extlan, "node");
        extlan.ip(&["link", "set", "node", "master", "br0"]);
        node.ip(&[
            "link", "add", "net2", "link", "eth1", "type", "macvlan", "mode", "bridge",
        ]);
        node.ip(&["link", "set", "net2", "netns", gateway.name()]);
        gateway.ip(&["link", "set", "net2", "up"]);
        gateway.ip(&[
            "addr",
            "add",
            &format!("{}/21", Self::EXTERNAL),
            "dev",
            "net2",
        ]);

        outside.veth("eth0", &extlan, "outside");
        extlan.ip(&["link", "set", "outside", "master", "br0"]);
        outside.ip(&[
            "addr",
            "add",
            &format!("{}/21", Self::GATEWAY_V4),
            "dev",
            "eth0",
        ]);

        let hosts = [("web", Self::WEB), ("fip", Self::FLOATING_HOST)]
            .iter()
            .enumerate()
            .map(|(i, (role, addr))| {
                let ns = Netns::new(role);
                let port = format!("h{i}");
                ns.veth("eth0", &vpc, &port);
                vpc.ip(&["link", "set", &port, "master", "br0"]);
                ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
                ns.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &Self::INTERNAL.to_string(),
                ]);
                Host { ns, addr: *addr }
            })
            .collect();
        Self {
            hosts,
            node,
            gateway,
            vpc,
            extlan,
            outside,
        }
    }

    pub fn host(&self, addr: Ipv4Addr) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.addr == addr)
            .unwrap_or_else(|| panic!("no host {addr} in this topology"))
    }
}

impl Default for NatGatewayPod {
    fn default() -> Self {
        Self::new()
    }
}
