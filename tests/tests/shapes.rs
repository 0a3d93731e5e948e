//! The seeds' other deployment shapes end to end, each with the real
//! `egress-agent` and `interfaces.hook: auto`:
//!
//! - a Kube-OVN gateway pod whose `eth0` is a veth on the node's switch and
//!   whose `net1` is a macvlan on the node's external NIC (seeds 001/003);
//! - a gateway VM that tells tenants sharing one pod CIDR apart by the
//!   macvlan the node routed them to (seed 002), with the macvlans made by
//!   hand or by the agent (`ingress[].create`);
//! - the gateway pod on a 9000-byte pod network with its external side at
//!   1500: TSO super-packets from the tenant, and path-MTU discovery.
//!
//! Each checks that HTTP, UDP and ping from every tenant leave with that
//! tenant's egress IP (the server's log, a capture on the server's NIC and
//! the flow table), that a host in no tenant gets nothing out, and that
//! 256 MiB cross intact both ways. Every interface keeps the kernel's
//! defaults: nothing is tuned with ethtool. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use egress_tests::{
    agent::{Agent, ConfigFile, run_to_exit},
    netns::{Netns, unique_name},
    require_root,
    shapes::{GatewayVm, KubeOvnPod, effective_ipv4_conf},
    topology::Host,
    traffic::{
        Capture, Received, Seen, bulk_transfer, curl, http_server, ping, udp_echo_server,
        udp_request, udp_send_df,
    },
};

/// What the common checks need to know about a shape.
struct Shape<'a> {
    /// Each tenant's name (as configured), a host of it, and the egress IP
    /// it must leave with.
    tenants: [(&'static str, &'a Host, Ipv4Addr); 2],
    /// A host in no tenant.
    stranger: &'a Host,
    server: &'a Netns,
    server_addr: Ipv4Addr,
    /// The gateway's own external address: the only source besides the
    /// egress IPs the server may ever see.
    gateway_external: Ipv4Addr,
}

impl Shape<'_> {
    fn egress_ips(&self) -> Vec<Ipv4Addr> {
        self.tenants.iter().map(|(_, _, egress)| *egress).collect()
    }
}

fn kube_ovn_shape(pod: &KubeOvnPod) -> Shape<'_> {
    Shape {
        tenants: [
            ("tenant-a", pod.pod(KubeOvnPod::POD_A), KubeOvnPod::EGRESS_A),
            ("tenant-b", pod.pod(KubeOvnPod::POD_B), KubeOvnPod::EGRESS_B),
        ],
        stranger: pod.pod(KubeOvnPod::STRANGER),
        server: &pod.server,
        server_addr: KubeOvnPod::SERVER,
        gateway_external: KubeOvnPod::GATEWAY_EXTERNAL,
    }
}

fn gateway_vm_shape(vm: &GatewayVm) -> Shape<'_> {
    Shape {
        tenants: [
            ("tenant-a", vm.pod(GatewayVm::POD_A), GatewayVm::EGRESS_A),
            ("tenant-b", vm.pod(GatewayVm::POD_B), GatewayVm::EGRESS_B),
        ],
        stranger: vm.pod(GatewayVm::STRANGER),
        server: &vm.server,
        server_addr: GatewayVm::SERVER,
        gateway_external: GatewayVm::VM_EXTERNAL,
    }
}

/// `egress-agent status` as text (programs, hooks and why, every counter),
/// for failure messages.
fn status_text(agent: &Agent) -> String {
    let out = agent.cli(&["status"]);
    format!("egress-agent status:\n{}{}", out.stdout, out.stderr)
}

/// The source address of a flow's `original` or `translated` column
/// (`10.0.0.1:4000 -> ...` or `10.0.0.1 -> ... id 7`).
fn flow_source(column: &serde_json::Value) -> String {
    column
        .as_str()
        .unwrap_or_default()
        .split([':', ' '])
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// HTTP, UDP and ping from each tenant leave with its egress IP and get
/// their answers; the host in no tenant gets nothing out; the server never
/// sees any other source.
fn tenants_leave_with_their_egress_ips(shape: &Shape, agent: &Agent) {
    let capture = Capture::start(shape.server, "eth0");
    let http = http_server(shape.server, SocketAddrV4::new(shape.server_addr, 8080));
    let udp = udp_echo_server(shape.server, SocketAddrV4::new(shape.server_addr, 9999));
    let url = format!("http://{}:8080/", shape.server_addr);
    let to = SocketAddrV4::new(shape.server_addr, 9999);

    for (name, host, egress) in &shape.tenants {
        let body = curl(&host.ns, &url)
            .unwrap_or_else(|err| panic!("{name} HTTP GET: {err}\n{}", status_text(agent)));
        assert_eq!(body, format!("you are {egress}\n"), "{name}'s HTTP GET");
        let payload = format!("from {name}");
        assert_eq!(
            udp_request(&host.ns, 0, to, payload.as_bytes()).as_deref(),
            Some(payload.as_bytes()),
            "{name}'s UDP request got no echo\n{}",
            status_text(agent)
        );
        assert!(
            ping(&host.ns, shape.server_addr, 3),
            "{name}'s ping got no reply\n{}",
            status_text(agent)
        );
    }
    assert_eq!(http.peer_ips(), shape.egress_ips(), "the server's HTTP log");
    assert_eq!(udp.peer_ips(), shape.egress_ips(), "the UDP server's log");

    let stranger = &shape.stranger.ns;
    assert!(
        curl(stranger, &url).is_err(),
        "the stranger's TCP must fail"
    );
    assert_eq!(
        udp_request(stranger, 0, to, b"x"),
        None,
        "the stranger's UDP must fail"
    );
    assert!(
        !ping(stranger, shape.server_addr, 2),
        "the stranger's ping must fail"
    );

    let seen = capture.finish();
    let echo_sources: Vec<Ipv4Addr> = seen
        .iter()
        .filter(|s| !s.outgoing && s.proto == 1)
        .map(|s| s.src)
        .collect();
    for egress in shape.egress_ips() {
        assert!(
            echo_sources.contains(&egress),
            "no ICMP from {egress} at the server: {seen:#?}"
        );
    }
    // Unicast to the server comes from an egress IP or the gateway itself
    // (link-local multicast, such as an IGMP report from an address-less
    // NIC on the external LAN, is nobody's egress), and no pod's own
    // address appears on the external side at all.
    let foreign: Vec<&Seen> = seen
        .iter()
        .filter(|s| {
            !s.outgoing
                && s.dst == shape.server_addr
                && !shape.egress_ips().contains(&s.src)
                && s.src != shape.gateway_external
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "the server received packets from neither an egress IP nor the gateway: {foreign:#?}"
    );
    let pods: Vec<Ipv4Addr> = shape
        .tenants
        .iter()
        .map(|(_, host, _)| host.addr)
        .chain([shape.stranger.addr])
        .collect();
    let leaked: Vec<&Seen> = seen.iter().filter(|s| pods.contains(&s.src)).collect();
    assert!(
        leaked.is_empty(),
        "pod addresses reached the external side: {leaked:#?}"
    );
    assert_eq!(http.peer_ips(), shape.egress_ips(), "the stranger got in");

    // The flow table agrees: each tenant's flows come from its own host and
    // leave from its own egress IP, for every protocol.
    let flows = agent.flows();
    for (name, host, egress) in &shape.tenants {
        let own: Vec<&serde_json::Value> = flows.iter().filter(|f| f["tenant"] == *name).collect();
        for proto in ["tcp", "udp", "icmp"] {
            assert!(
                own.iter().any(|f| f["proto"] == proto),
                "no {proto} flow of {name}: {flows:#?}"
            );
        }
        for flow in &own {
            assert_eq!(
                flow_source(&flow["original"]),
                host.addr.to_string(),
                "{flow}"
            );
            assert_eq!(
                flow_source(&flow["translated"]),
                egress.to_string(),
                "{flow}"
            );
        }
    }
    assert!(
        !flows
            .iter()
            .any(|f| flow_source(&f["original"]) == shape.stranger.addr.to_string()),
        "a flow of the stranger: {flows:#?}"
    );
    assert!(
        agent.counter("out_drop_unclassified") > 0,
        "the stranger's packets were not dropped as unclassified\n{}",
        status_text(agent)
    );
}

const BULK: u64 = 256 << 20;

/// One 256 MiB TCP transfer between `host` and the server, every byte
/// checked by the receiver and confirmed to the sender.
fn transfer(host: &Host, server: &Netns, server_addr: Ipv4Addr, download: bool, agent: &Agent) {
    let direction = if download { "download" } else { "upload" };
    let started = Instant::now();
    let received = bulk_transfer(
        &host.ns,
        server,
        SocketAddrV4::new(server_addr, 7000 + u16::from(download)),
        BULK,
        download,
    )
    .unwrap_or_else(|err| panic!("256 MiB {direction} failed: {err}\n{}", status_text(agent)));
    assert_eq!(
        received,
        Received {
            bytes: BULK,
            intact: true
        },
        "256 MiB {direction}\n{}",
        status_text(agent)
    );
    eprintln!(
        "256 MiB {direction} from {}: {:.1?}",
        host.addr,
        started.elapsed()
    );
}

/// After transfers: no reply refused, nothing malformed, nothing too big.
fn assert_clean_counters(agent: &Agent) {
    for counter in [
        "in_drop_no_flow",
        "out_drop_malformed",
        "in_drop_malformed",
        "out_drop_too_big",
        "in_drop_too_big",
    ] {
        assert_eq!(
            agent.counter(counter),
            0,
            "{counter}\n{}",
            status_text(agent)
        );
    }
}

/// Lowercase `aa:bb:...`, as `ip neigh` prints a MAC.
fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[test]
fn kube_ovn_gateway_pod_runs_tc_on_its_veth_and_macvlan_and_gives_each_tenant_its_ip() {
    if !require_root() {
        return;
    }
    let pod = KubeOvnPod::new();
    let agent = Agent::start(&pod.gateway, &pod.config());

    // `auto` must keep both sides at TC, and say why: eth0 is a veth and
    // net1 a macvlan, both software devices fed by co-located senders.
    let status = agent.status();
    let attachments = status["attachments"].as_array().expect("attachments");
    for (interface, program, kind) in [
        ("eth0", "tc_outbound", "veth"),
        ("net1", "tc_reply", "macvlan"),
    ] {
        let attachment = attachments
            .iter()
            .find(|a| a["interface"] == interface && a["program"] == program)
            .unwrap_or_else(|| panic!("no {program} on {interface}: {attachments:#?}"));
        assert_eq!(attachment["hook"], "tc/ingress", "{attachment}");
        let reason = attachment["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(interface) && reason.contains(kind),
            "the reason for {interface} names it a {kind}: {attachment}"
        );
    }
    assert!(
        !attachments
            .iter()
            .any(|a| a["hook"].as_str().unwrap_or_default().starts_with("xdp")),
        "XDP on a veth or macvlan under auto: {attachments:#?}"
    );
    let text = status_text(&agent);
    assert!(text.contains("WHY THIS HOOK"), "{text}");
    assert!(text.contains("net1 is a macvlan"), "{text}");

    tenants_leave_with_their_egress_ips(&kube_ovn_shape(&pod), &agent);
}

#[test]
fn kube_ovn_gateway_pod_carries_256_mib_both_ways() {
    if !require_root() {
        return;
    }
    let pod = KubeOvnPod::new();
    let agent = Agent::start(&pod.gateway, &pod.config());
    let host = pod.pod(KubeOvnPod::POD_A);
    for download in [false, true] {
        transfer(host, &pod.server, KubeOvnPod::SERVER, download, &agent);
    }
    assert_clean_counters(&agent);
}

/// Starts the agent on the gateway VM and checks it isolated ARP as seed 002
/// does by hand (`arp_ignore=1`, `arp_announce=2` on the parent and every
/// macvlan, directly or through `all`): otherwise enp1s0 answers the node's
/// ARP for a tenant's next hop with its own MAC (the parent handles a
/// broadcast before the macvlans do), or the other tenant's macvlan does,
/// and the tenant's traffic reaches no tenant port or the wrong one.
fn start_gateway_vm(vm: &GatewayVm) -> Agent {
    start_gateway_vm_with(vm, &vm.config(), &[])
}

/// [`start_gateway_vm`] with another configuration and `run` arguments.
fn start_gateway_vm_with(vm: &GatewayVm, yaml: &str, run_args: &[&str]) -> Agent {
    let agent = Agent::start_with(&vm.vm, yaml, run_args);
    let mut missing = Vec::new();
    for interface in ["enp1s0", "macvlan-a", "macvlan-b"] {
        for (key, wanted) in [("arp_ignore", 1), ("arp_announce", 2)] {
            let effective = effective_ipv4_conf(&vm.vm, interface, key);
            if effective != wanted {
                missing.push(format!("{interface}.{key} is {effective}, not {wanted}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the agent did not isolate ARP on the macvlans and their parent (seed 002): {}",
        missing.join("; ")
    );
    // What that isolation is for: the node's ARP for each tenant's next
    // hop is answered by that tenant's macvlan, and only by it.
    for (macvlan, next_hop) in GatewayVm::NEXT_HOPS {
        let out = vm.node.try_run(
            "arping",
            &["-c", "3", "-w", "3", "-I", "eth0", &next_hop.to_string()],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        let mut answered: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("reply from"))
            .filter_map(|l| l.split(['[', ']']).nth(1))
            .collect();
        answered.sort_unstable();
        answered.dedup();
        assert_eq!(
            answered,
            [mac_text(vm.vm.mac(macvlan))],
            "MACs answering ARP for {next_hop} ({macvlan}'s address):\n{text}"
        );
    }
    agent
}

#[test]
fn gateway_vm_tells_tenants_of_one_pod_cidr_apart_by_their_next_hop() {
    if !require_root() {
        return;
    }
    let vm = GatewayVm::new();
    let agent = start_gateway_vm(&vm);
    tenants_leave_with_their_egress_ips(&gateway_vm_shape(&vm), &agent);
    // The node's neighbour table kept each next hop on its own macvlan.
    for (macvlan, next_hop) in GatewayVm::NEXT_HOPS {
        let neigh = vm
            .node
            .ip(&["neigh", "show", &next_hop.to_string(), "dev", "eth0"]);
        let neigh = String::from_utf8_lossy(&neigh.stdout);
        assert!(
            neigh.contains(&mac_text(vm.vm.mac(macvlan))),
            "the node resolved {next_hop} to another MAC than {macvlan}'s: {neigh}"
        );
    }
}

#[test]
fn gateway_vm_carries_256_mib_both_ways() {
    if !require_root() {
        return;
    }
    let vm = GatewayVm::new();
    let agent = start_gateway_vm(&vm);
    let host = vm.pod(GatewayVm::POD_A);
    for download in [false, true] {
        transfer(host, &vm.server, GatewayVm::SERVER, download, &agent);
    }
    assert_clean_counters(&agent);
    let flows = agent.flows();
    assert!(
        flows.iter().all(|f| f["tenant"] == "tenant-a"),
        "{flows:#?}"
    );
}

/// `ip -d -o link show dev <name>` in `ns`, or `None` if there is no such link.
fn link_details(ns: &Netns, name: &str) -> Option<String> {
    let out = ns.try_run("ip", &["-d", "-o", "link", "show", "dev", name]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The MAC `ip link` shows for a link, if it exists.
fn link_mac(ns: &Netns, name: &str) -> Option<String> {
    link_details(ns, name)?
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
}

/// Polls `done` for up to 10 s (a SIGHUP is applied asynchronously).
#[track_caller]
fn wait_for(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 10 s:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each next hop is what the configuration asked the agent to create: a
/// macvlan in mode bridge on enp1s0 with its /32 (tenant A's with the
/// configured MAC, tenant B's with a locally administered unicast one).
#[track_caller]
fn assert_next_hops_created(vm: &GatewayVm) {
    for (macvlan, next_hop) in GatewayVm::NEXT_HOPS {
        let details = link_details(&vm.vm, macvlan)
            .unwrap_or_else(|| panic!("the agent did not create {macvlan}"));
        assert!(
            details.contains(&format!("{macvlan}@enp1s0:"))
                && details.contains("macvlan mode bridge")
                && details.contains(",UP,"),
            "{details}"
        );
        let addrs = vm.vm.ip(&["-4", "-o", "addr", "show", "dev", macvlan]);
        let addrs = String::from_utf8_lossy(&addrs.stdout);
        assert!(addrs.contains(&format!("inet {next_hop}/32 ")), "{addrs}");
    }
    assert_eq!(vm.vm.mac("macvlan-a"), GatewayVm::NEXT_HOP_A_MAC);
    let derived = vm.vm.mac("macvlan-b");
    assert_eq!(
        derived[0] & 0x03,
        0x02,
        "macvlan-b's default MAC is locally administered unicast: {}",
        mac_text(derived)
    );
}

#[track_caller]
fn assert_no_next_hops(vm: &GatewayVm, why: &str) {
    for (macvlan, _) in GatewayVm::NEXT_HOPS {
        assert_eq!(link_details(&vm.vm, macvlan), None, "{why}");
    }
}

/// `yaml` with tenant B's MAC set (it had the default).
fn with_next_hop_b_mac(yaml: &str, mac: &str) -> String {
    let from = format!("address: {}/32}}", GatewayVm::NEXT_HOP_B);
    assert!(yaml.contains(&from), "{yaml}");
    yaml.replace(
        &from,
        &format!("address: {}/32, mac: \"{mac}\"}}", GatewayVm::NEXT_HOP_B),
    )
}

#[test]
fn gateway_vm_next_hops_created_by_the_agent_serve_follow_reloads_and_go_with_it() {
    if !require_root() {
        return;
    }
    let vm = GatewayVm::without_next_hops();
    let yaml = vm.config_creating_next_hops();
    let mut agent = start_gateway_vm_with(&vm, &yaml, &[]);
    assert_next_hops_created(&vm);
    tenants_leave_with_their_egress_ips(&gateway_vm_shape(&vm), &agent);

    // A changed MAC recreates tenant B's next hop; tenant A's is untouched.
    let index_a = vm.vm.ifindex("macvlan-a");
    let index_b = vm.vm.ifindex("macvlan-b");
    let mac_b = "02:00:00:00:0b:02";
    agent.reload(&with_next_hop_b_mac(&yaml, mac_b));
    wait_for("macvlan-b recreated with its new MAC", &agent, || {
        link_mac(&vm.vm, "macvlan-b").as_deref() == Some(mac_b)
    });
    assert_next_hops_created(&vm);
    assert_ne!(vm.vm.ifindex("macvlan-b"), index_b, "recreated");
    assert_eq!(vm.vm.ifindex("macvlan-a"), index_a, "left alone");
    // Tenant B leaves through its new next hop (the node asks afresh).
    vm.node.ip(&["neigh", "flush", "dev", "eth0"]);
    let http = http_server(&vm.server, SocketAddrV4::new(GatewayVm::SERVER, 8080));
    let url = format!("http://{}:8080/", GatewayVm::SERVER);
    let body = curl(&vm.pod(GatewayVm::POD_B).ns, &url)
        .unwrap_or_else(|err| panic!("tenant B after the reload: {err}\n{}", agent.log()));
    assert_eq!(body, format!("you are {}\n", GatewayVm::EGRESS_B));
    drop(http);

    // Without tenant B, its next hop goes, and only it.
    let start = yaml.find("  - name: tenant-b").expect("tenant-b");
    let end = yaml.find("returnRoutes:").expect("returnRoutes");
    let mut without_b = yaml.clone();
    without_b.replace_range(start..end, "");
    agent.reload(&without_b);
    wait_for("macvlan-b removed", &agent, || {
        link_details(&vm.vm, "macvlan-b").is_none()
    });
    assert_eq!(vm.vm.ifindex("macvlan-a"), index_a);

    // Back again: created anew.
    agent.reload(&yaml);
    wait_for("macvlan-b created again", &agent, || {
        link_details(&vm.vm, "macvlan-b").is_some_and(|d| d.contains(",UP,"))
    });
    assert_next_hops_created(&vm);

    assert!(agent.stop().success(), "{}", agent.log());
    assert_no_next_hops(&vm, "SIGTERM removes the macvlans the agent created");
    for key in ["arp_ignore", "arp_announce"] {
        assert_eq!(
            effective_ipv4_conf(&vm.vm, "enp1s0", key),
            0,
            "enp1s0's {key} restored"
        );
    }
}

#[test]
fn gateway_vm_next_hops_created_by_the_agent_stay_with_a_kept_dataplane_until_cleanup() {
    if !require_root() {
        return;
    }
    let vm = GatewayVm::without_next_hops();
    let yaml = vm.config_creating_next_hops();
    let mut agent = start_gateway_vm_with(&vm, &yaml, &["--keep-dataplane"]);
    let index_b = vm.vm.ifindex("macvlan-b");
    assert!(agent.stop().success(), "{}", agent.log());
    assert_next_hops_created(&vm);

    // The next agent finds them in the state file: its own, kept as they
    // are...
    agent.respawn();
    assert_eq!(
        vm.vm.ifindex("macvlan-b"),
        index_b,
        "kept across the restart"
    );
    // ...and its to recreate (a macvlan someone else made with another
    // MAC would be refused instead).
    let mac_b = "02:00:00:00:0b:03";
    agent.reload(&with_next_hop_b_mac(&yaml, mac_b));
    wait_for("macvlan-b recreated by the restarted agent", &agent, || {
        link_mac(&vm.vm, "macvlan-b").as_deref() == Some(mac_b)
    });
    assert_next_hops_created(&vm);

    assert!(agent.stop().success(), "{}", agent.log());
    assert_next_hops_created(&vm);
    let out = agent.cli(&["cleanup"]);
    assert!(out.status.success(), "{out:?}");
    assert_no_next_hops(&vm, "cleanup removes the macvlans the agent created");
}

#[test]
fn gateway_vm_refuses_to_create_a_next_hop_over_a_link_it_did_not_make() {
    if !require_root() {
        return;
    }
    let vm = GatewayVm::without_next_hops();
    // Someone else's link, with tenant A's next hop's name.
    vm.vm.ip(&[
        "link",
        "add",
        "macvlan-a",
        "type",
        "veth",
        "peer",
        "name",
        "stray",
    ]);
    let config = ConfigFile::new(&vm.config_creating_next_hops());
    let path = config.path.to_str().expect("utf-8 path");
    let instance = unique_name("agent");
    for command in ["check", "run"] {
        let out = run_to_exit(&vm.vm, &instance, &[command, "--config", path]);
        assert_eq!(out.status.code(), Some(2), "{command}: {out:?}");
        for expected in [
            "tenants[0] (tenant-a).ingress[0].interface: macvlan-a already exists as a veth, \
             not as a macvlan on enp1s0",
            "nothing was changed",
        ] {
            assert!(
                out.stderr.contains(expected),
                "{command}: expected {expected:?} in:\n{}",
                out.stderr
            );
        }
    }
    // `run` took the instance's lock before it read the file.
    run_to_exit(&vm.vm, &instance, &["cleanup"]);
    let stray = link_details(&vm.vm, "macvlan-a").expect("the veth stays");
    assert!(stray.contains("veth"), "{stray}");
    assert_eq!(link_details(&vm.vm, "macvlan-b"), None, "nothing created");
    assert_eq!(effective_ipv4_conf(&vm.vm, "enp1s0", "arp_ignore"), 0);
}

/// The gateway pod on a jumbo pod network, its external side at 1500.
fn jumbo_pod() -> (KubeOvnPod, Agent) {
    let pod = KubeOvnPod::with_internal_mtu(9000);
    let agent = Agent::start(&pod.gateway, &pod.config());
    for (ns, interface, mtu) in [
        (&pod.gateway, "eth0", "mtu 9000"),
        (&pod.pod(KubeOvnPod::POD_A).ns, "eth0", "mtu 9000"),
        (&pod.gateway, "net1", "mtu 1500"),
    ] {
        let link = ns.ip(&["link", "show", interface]);
        let link = String::from_utf8_lossy(&link.stdout);
        assert!(link.contains(mtu), "{interface}: {link}");
    }
    (pod, agent)
}

/// Polls `ip route get <to>` in `ns` until it shows a learned MTU of
/// `mtu`; the route on failure.
fn learned_mtu(ns: &Netns, to: Ipv4Addr, mtu: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let route = ns.ip(&["route", "get", &to.to_string()]);
        let route = String::from_utf8_lossy(&route.stdout).into_owned();
        if route.contains(&format!("mtu {mtu}")) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(route);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn jumbo_pod_network_gets_frag_needed_for_the_1500_byte_external_side() {
    if !require_root() {
        return;
    }
    let (pod, agent) = jumbo_pod();
    tenants_leave_with_their_egress_ips(&kube_ovn_shape(&pod), &agent);

    // A 3000-byte UDP datagram with DF from tenant A: its own link allows
    // it, the gateway's way out does not. The gateway must answer
    // fragmentation-needed, and the host learn the path MTU.
    let host_a = pod.pod(KubeOvnPod::POD_A);
    let to = SocketAddrV4::new(KubeOvnPod::SERVER, 9999);
    let verdicts = ["out_pass_frag_needed", "out_pass_not_egress"];
    let before = verdicts.map(|v| agent.counter(v));
    let capture = Capture::start(&host_a.ns, "eth0");
    let sent = udp_send_df(&host_a.ns, to, 3000).expect("the host's own MTU allows 3000 bytes");
    assert_eq!(sent, 3000);
    if let Err(route) = learned_mtu(&host_a.ns, KubeOvnPod::SERVER, 1500) {
        panic!(
            "tenant A did not learn the path MTU after a 3000-byte DF datagram: {route}\n{}",
            status_text(&agent)
        );
    }
    let refused = udp_send_df(&host_a.ns, to, 3000).expect_err("the path MTU is known now");
    assert_eq!(refused.raw_os_error(), Some(libc::EMSGSIZE), "{refused}");
    let seen = capture.finish();
    assert!(
        seen.iter().any(|s| !s.outgoing
            && s.proto == 1
            && s.src == KubeOvnPod::GATEWAY_INTERNAL
            && s.dst == KubeOvnPod::POD_A),
        "no ICMP error from the gateway reached tenant A: {seen:#?}"
    );

    // ping with DF from tenant B, which knows nothing yet: the kernel
    // reports the gateway's frag-needed, then refuses locally.
    let host_b = pod.pod(KubeOvnPod::POD_B);
    let out = host_b.ns.try_run(
        "ping",
        &[
            "-M",
            "do",
            "-s",
            "2000",
            "-c",
            "2",
            "-i",
            "0.5",
            "-W",
            "2",
            "-n",
            &KubeOvnPod::SERVER.to_string(),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_lowercase();
    assert!(
        !out.status.success()
            && (text.contains("frag needed") || text.contains("message too long"))
            && text.contains("1500"),
        "ping -M do -s 2000 from tenant B:\n{text}\n{}",
        status_text(&agent)
    );
    if let Err(route) = learned_mtu(&host_b.ns, KubeOvnPod::SERVER, 1500) {
        panic!("tenant B did not learn the path MTU: {route}");
    }

    // Each of the two packets (A's datagram, B's first echo) was handed to
    // the kernel under its own verdict, not as traffic that does not leave.
    let after = verdicts.map(|v| agent.counter(v));
    assert!(
        after[0] >= before[0] + 2,
        "too-big DF packets counted as out_pass_frag_needed: {} (before {}); \
         out_pass_not_egress went from {} to {}\n{}",
        after[0],
        before[0],
        before[1],
        after[1],
        status_text(&agent)
    );
}

#[test]
fn jumbo_pod_network_carries_256_mib_both_ways() {
    if !require_root() {
        return;
    }
    let (pod, agent) = jumbo_pod();
    let host = pod.pod(KubeOvnPod::POD_A);
    // The upload reaches the gateway as TSO super-packets far above the
    // external MTU (the premise), which the gateway must send out in
    // 1500-byte segments.
    let arriving = Capture::start(&pod.gateway, "eth0");
    transfer(host, &pod.server, KubeOvnPod::SERVER, false, &agent);
    let seen = arriving.finish();
    let largest = seen
        .iter()
        .filter(|s| !s.outgoing && s.src == KubeOvnPod::POD_A && s.proto == 6)
        .map(|s| s.len)
        .max()
        .unwrap_or(0);
    assert!(
        largest > 1500,
        "the tenant's TCP reached the gateway in packets of at most {largest} bytes"
    );
    transfer(host, &pod.server, KubeOvnPod::SERVER, true, &agent);
    assert_clean_counters(&agent);
}
