//! End to end through network namespaces: tenant hosts, the gateway running
//! the real `egress-agent`, and a server on the external side that records
//! who it sees. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use egress_tests::{
    agent::{Agent, ConfigFile, assert_no_dataplane_left, run_to_exit, wait_until},
    netns::unique_name,
    require_root,
    topology::{
        EGRESS_A, EGRESS_B, GATEWAY_EXTERNAL, HOST_A, HOST_B, SERVER, STRANGER, Topology,
        seed_config,
    },
    traffic::{Capture, Seen, curl, http_server, ping, udp_echo_server, udp_request},
};

const TENANT_NETS: [(Ipv4Addr, u8); 3] = [
    (Ipv4Addr::new(172, 20, 10, 0), 24),
    (Ipv4Addr::new(172, 20, 20, 0), 24),
    (Ipv4Addr::new(172, 20, 30, 0), 24),
];

fn is_internal(addr: Ipv4Addr) -> bool {
    TENANT_NETS.iter().any(|(net, len)| {
        let mask = u32::MAX << (32 - len);
        u32::from(addr) & mask == u32::from(*net)
    })
}

/// No packet the external side received carries an internal address.
#[track_caller]
fn assert_no_internal_source(seen: &[Seen]) {
    let leaked: Vec<_> = seen
        .iter()
        .filter(|s| !s.outgoing && is_internal(s.src))
        .collect();
    assert!(
        leaked.is_empty(),
        "internal addresses reached the external side: {leaked:#?}"
    );
}

fn start() -> Option<(Topology, Agent)> {
    if !require_root() {
        return None;
    }
    let topology = Topology::seed();
    let agent = Agent::start(&topology.gateway, &seed_config(4096));
    Some((topology, agent))
}

#[test]
fn http_get_from_each_tenant_arrives_from_its_egress_ip() {
    let Some((net, agent)) = start() else { return };
    let capture = Capture::start(&net.external, "eth0");
    let server = http_server(&net.external, SocketAddrV4::new(SERVER, 8080));
    let url = format!("http://{SERVER}:8080/");

    let body_a = curl(&net.host(HOST_A).ns, &url).expect("tenant-a GET");
    let body_b = curl(&net.host(HOST_B).ns, &url).expect("tenant-b GET");

    assert_eq!(body_a, format!("you are {EGRESS_A}\n"));
    assert_eq!(body_b, format!("you are {EGRESS_B}\n"));
    assert_eq!(server.peer_ips(), [EGRESS_A, EGRESS_B], "the server's log");
    let seen = capture.finish();
    assert!(
        seen.iter().any(|s| s.src == EGRESS_A && s.proto == 6),
        "{seen:#?}"
    );
    assert_no_internal_source(&seen);
    assert!(agent.counter("out_translated") > 0);
    assert!(agent.counter("in_translated") > 0);
}

#[test]
fn udp_and_ping_are_translated_both_ways() {
    let Some((net, agent)) = start() else { return };
    let capture = Capture::start(&net.external, "eth0");
    let server = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    let to = SocketAddrV4::new(SERVER, 9999);

    assert_eq!(
        udp_request(&net.host(HOST_A).ns, 0, to, b"from a").as_deref(),
        Some(&b"from a"[..])
    );
    assert_eq!(
        udp_request(&net.host(HOST_B).ns, 0, to, b"from b").as_deref(),
        Some(&b"from b"[..])
    );
    assert_eq!(server.peer_ips(), [EGRESS_A, EGRESS_B]);

    assert!(ping(&net.host(HOST_A).ns, SERVER, 3), "tenant-a ping");
    assert!(ping(&net.host(HOST_B).ns, SERVER, 3), "tenant-b ping");
    let seen = capture.finish();
    let echo_sources: Vec<Ipv4Addr> = seen
        .iter()
        .filter(|s| !s.outgoing && s.proto == 1)
        .map(|s| s.src)
        .collect();
    assert!(
        echo_sources.contains(&EGRESS_A) && echo_sources.contains(&EGRESS_B),
        "{seen:#?}"
    );
    assert_no_internal_source(&seen);

    let flows = agent.flows();
    let states: Vec<(&str, &str, &str)> = flows
        .iter()
        .map(|f| {
            (
                f["tenant"].as_str().unwrap(),
                f["proto"].as_str().unwrap(),
                f["state"].as_str().unwrap(),
            )
        })
        .collect();
    for tenant in ["tenant-a", "tenant-b"] {
        assert!(states.contains(&(tenant, "udp", "REPLIED")), "{flows:#?}");
        assert!(states.contains(&(tenant, "icmp", "REPLIED")), "{flows:#?}");
    }
}

#[test]
fn the_same_source_port_from_two_tenants_gets_two_translations() {
    let Some((net, agent)) = start() else { return };
    let udp = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    let http = http_server(&net.external, SocketAddrV4::new(SERVER, 8080));
    let to = SocketAddrV4::new(SERVER, 9999);

    // UDP from port 40000 on both hosts; each must get its own answer back.
    assert_eq!(
        udp_request(&net.host(HOST_A).ns, 40000, to, b"A").as_deref(),
        Some(&b"A"[..])
    );
    assert_eq!(
        udp_request(&net.host(HOST_B).ns, 40000, to, b"B").as_deref(),
        Some(&b"B"[..])
    );
    let peers = udp.peers();
    assert_eq!(peers.len(), 2);
    assert_ne!(
        peers[0], peers[1],
        "two tenants must not share a translation"
    );
    assert_eq!(udp.peer_ips(), [EGRESS_A, EGRESS_B]);

    // TCP likewise, through curl's --local-port.
    let url = format!("http://{SERVER}:8080/");
    for host in [HOST_A, HOST_B] {
        let out = net.host(host).ns.try_run(
            "curl",
            &["-sS", "--max-time", "5", "--local-port", "40001", &url],
        );
        assert!(
            out.status.success(),
            "curl from {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(http.peer_ips(), [EGRESS_A, EGRESS_B]);

    let flows = agent.flows();
    let udp_translations: Vec<&str> = flows
        .iter()
        .filter(|f| f["proto"] == "udp" && f["original"].as_str().unwrap().contains(":40000 "))
        .map(|f| f["translated"].as_str().unwrap())
        .collect();
    assert_eq!(udp_translations.len(), 2, "{flows:#?}");
    assert_ne!(udp_translations[0], udp_translations[1]);
}

#[test]
fn a_host_outside_every_tenant_gets_nothing_out() {
    let Some((net, agent)) = start() else { return };
    let capture = Capture::start(&net.external, "eth0");
    let _http = http_server(&net.external, SocketAddrV4::new(SERVER, 8080));
    let _udp = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    let stranger = &net.host(STRANGER).ns;

    assert!(
        curl(stranger, &format!("http://{SERVER}:8080/")).is_err(),
        "TCP must fail"
    );
    assert_eq!(
        udp_request(stranger, 0, SocketAddrV4::new(SERVER, 9999), b"x"),
        None,
        "UDP must fail"
    );
    assert!(!ping(stranger, SERVER, 2), "ping must fail");
    // The gateway itself is still reachable: fail-closed is about leaving.
    assert!(
        ping(stranger, Ipv4Addr::new(172, 20, 30, 1), 1),
        "the gateway answers locally"
    );

    let seen = capture.finish();
    assert!(
        !seen.iter().any(|s| s.src == STRANGER),
        "the stranger's address left: {seen:#?}"
    );
    assert_no_internal_source(&seen);
    assert!(agent.counter("out_drop_unclassified") > 0);
}

#[test]
fn unsolicited_packets_to_an_egress_ip_reach_no_tenant_host() {
    let Some((net, agent)) = start() else { return };
    // A real flow first, so an egress port is open towards one endpoint.
    let _udp = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    assert!(
        udp_request(
            &net.host(HOST_A).ns,
            41000,
            SocketAddrV4::new(SERVER, 9999),
            b"hi"
        )
        .is_some()
    );
    let flows = agent.flows();
    let translated = flows[0]["translated"].as_str().unwrap().to_owned();
    let nat_port: u16 = translated
        .split(" -> ")
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let captures: Vec<Capture> = [HOST_A, HOST_B]
        .iter()
        .map(|h| Capture::start(&net.host(*h).ns, "eth0"))
        .collect();
    let external = &net.external;
    // From a port the flow never talked to, to the flow's own egress port.
    assert_eq!(
        udp_request(
            external,
            12345,
            SocketAddrV4::new(EGRESS_A, nat_port),
            b"in?"
        ),
        None
    );
    // To ports nobody uses, by TCP and UDP, and ping.
    assert!(
        external
            .try_run(
                "curl",
                &["-sS", "--max-time", "2", &format!("http://{EGRESS_A}:80/")]
            )
            .status
            .code()
            != Some(0)
    );
    assert_eq!(
        udp_request(external, 0, SocketAddrV4::new(EGRESS_B, 53), b"in?"),
        None
    );
    assert!(!ping(external, EGRESS_A, 2));

    for (host, capture) in [HOST_A, HOST_B].iter().zip(captures) {
        let arrived: Vec<Seen> = capture
            .finish()
            .into_iter()
            .filter(|s| !s.outgoing && s.src == SERVER)
            .collect();
        assert!(
            arrived.is_empty(),
            "unsolicited traffic reached {host}: {arrived:#?}"
        );
    }
    assert!(agent.counter("in_drop_no_flow") >= 4);
}

#[test]
fn status_and_flows_describe_the_running_agent() {
    let Some((net, agent)) = start() else { return };
    assert!(ping(&net.host(HOST_A).ns, SERVER, 1));
    let status = agent.status();
    assert_eq!(status["running"], true);
    let tenants = status["tenants"].as_array().unwrap();
    assert_eq!(tenants.len(), 2);
    assert_eq!(tenants[0]["name"], "tenant-a");
    assert_eq!(tenants[0]["egress"][0], EGRESS_A.to_string());
    assert_eq!(tenants[0]["flows"], 1);
    let attachments = status["attachments"].as_array().unwrap();
    let hooks: Vec<(String, String)> = attachments
        .iter()
        .map(|a| {
            (
                a["program"].as_str().unwrap().to_owned(),
                a["hook"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // Veths at kernel defaults: `auto` keeps the packet path at TC.
    assert!(
        hooks.contains(&("tc_outbound".into(), "tc/ingress".into())),
        "{hooks:?}"
    );
    assert!(
        hooks.contains(&("tc_reply".into(), "tc/ingress".into())),
        "{hooks:?}"
    );
    assert!(
        !hooks.iter().any(|(_, hook)| hook.starts_with("xdp")),
        "{hooks:?}"
    );
    let outbound = attachments
        .iter()
        .find(|a| a["program"] == "tc_outbound")
        .unwrap();
    assert!(
        outbound["reason"].as_str().unwrap().contains("veth"),
        "the reason names what ruled XDP out: {outbound}"
    );
    assert!(
        hooks.contains(&("leak_guard".into(), "tc/egress".into())),
        "{hooks:?}"
    );

    let table = agent.cli(&["flows"]);
    assert!(table.status.success());
    assert!(table.stdout.contains("tenant-a"), "{}", table.stdout);
    assert!(
        table.stdout.contains(&format!("{HOST_A} -> {SERVER}")),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains(&format!("{EGRESS_A} -> {SERVER}")),
        "{}",
        table.stdout
    );
    let text = agent.cli(&["status"]);
    assert!(text.stdout.contains("running (pid"), "{}", text.stdout);
    assert!(text.stdout.contains("WHY THIS HOOK"), "{}", text.stdout);
}

/// What a refused configuration must leave: nothing.
#[track_caller]
fn assert_gateway_untouched(net: &Topology, instance: &str) {
    assert_no_dataplane_left(&net.gateway);
    let addrs = net.gateway.ip(&["-4", "-o", "addr", "show", "dev", "eth1"]);
    let text = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        !text.contains(&EGRESS_A.to_string()),
        "egress address added: {text}"
    );
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/{instance}")).exists(),
        "pins left"
    );
    assert!(
        !std::path::Path::new(&format!("/run/{instance}")).exists(),
        "state or lock left in /run/{instance}"
    );
}

#[test]
fn bad_configurations_are_refused_before_anything_changes() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let good = seed_config(4096);
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("external: eth1", "external: eth9"),
            "interfaces.external: no interface named eth9",
        ),
        (
            good.replace("172.20.20.0/24", "172.20.10.0/25"),
            "tenants[1] (tenant-b).sources[0]: 172.20.10.0/25 overlaps",
        ),
        (
            good.replace(&EGRESS_B.to_string(), &EGRESS_A.to_string()),
            "tenants[1] (tenant-b).egressIPs[0]: 192.168.31.101 is already claimed",
        ),
        (
            good.replace("172.20.10.0/24", "172.20.10.0/240"),
            "tenants[0] (tenant-a).sources[0]",
        ),
        (
            good.replace("egressIPs: [192.168.31.150]", "egressIP: [192.168.31.150]"),
            "unknown field `egressIP`",
        ),
        // XDP forced onto veths whose peers have no NAPI (kernel defaults):
        // its redirects would be dropped, so the agent refuses, naming the
        // interface and the way out.
        (
            good.replace("external: eth1", "external: eth1\n  hook: xdp"),
            "interfaces.hook: eth1 cannot receive XDP redirects",
        ),
        (
            good.replace("external: eth1", "external: eth1\n  hooks: {eth0: xdp}"),
            "interfaces.hooks.eth0: eth1 cannot receive XDP redirects",
        ),
    ];
    for (yaml, expected) in cases {
        let instance = unique_name("bad");
        let config = ConfigFile::new(&yaml);
        let out = run_to_exit(
            &net.gateway,
            &instance,
            &["run", "--config", config.path.to_str().unwrap()],
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "exit code for {expected:?}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(expected),
            "expected {expected:?} in:\n{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("nothing was changed")
                || out.stderr.contains("not a valid configuration"),
            "{}",
            out.stderr
        );
        assert_gateway_untouched(&net, &instance);
    }
}

/// The addresses the gateway itself uses on its external interface: its
/// own, its next hop's (the default route's gateway, the server here), and
/// the subnet's network and broadcast addresses.
const GATEWAYS_OWN: [(&str, &str); 4] = [
    (
        "192.168.31.2",
        "192.168.31.2 is the gateway's own address on eth1 (192.168.31.2/24, not added by this agent)",
    ),
    (
        "192.168.31.1",
        "192.168.31.1 is the gateway's next hop on eth1 (route default via 192.168.31.1)",
    ),
    (
        "192.168.31.0",
        "192.168.31.0 is the network address of eth1's subnet 192.168.31.0/24",
    ),
    (
        "192.168.31.255",
        "192.168.31.255 is the broadcast address of eth1's subnet 192.168.31.0/24",
    ),
];

#[test]
fn the_gateways_own_addresses_are_refused_as_egress_ips() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let good = seed_config(4096);
    assert_eq!(GATEWAY_EXTERNAL.to_string(), GATEWAYS_OWN[0].0);
    assert_eq!(SERVER.to_string(), GATEWAYS_OWN[1].0);
    for (addr, expected) in GATEWAYS_OWN {
        let config = ConfigFile::new(&good.replace(&EGRESS_B.to_string(), addr));
        let instance = unique_name("check");
        let out = run_to_exit(
            &net.gateway,
            &instance,
            &["check", "--config", config.path.to_str().unwrap()],
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "check of {addr}: {}",
            out.stderr
        );
        let named = format!("tenants[1] (tenant-b).egressIPs[0]: {expected}");
        assert!(
            out.stderr.contains(&named),
            "expected {named:?} in:\n{}",
            out.stderr
        );
        assert_gateway_untouched(&net, &instance);
    }

    let agent = Agent::start(&net.gateway, &good);
    // The agent's own addresses are not the gateway's: the file it serves
    // checks fine on the serving gateway.
    let out = agent.cli(&["check", "--config", agent.config.path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let addresses = || {
        net.gateway
            .ip(&["-4", "-o", "addr", "show", "dev", "eth1"])
            .stdout
    };
    let before = addresses();
    for (i, (addr, expected)) in GATEWAYS_OWN.iter().enumerate() {
        agent.reload(&good.replace(&EGRESS_B.to_string(), addr));
        wait_until("the refusal", std::time::Duration::from_secs(10), || {
            agent.log().matches("reload refused").count() == i + 1
        });
        assert!(agent.log().contains(expected), "{}", agent.log());
    }
    assert_eq!(addresses(), before, "a refused reload changes nothing");
    // Still serving, and the gateway still reachable at its own address.
    let echo = SocketAddrV4::new(SERVER, 5300);
    let server = udp_echo_server(&net.external, echo);
    assert!(udp_request(&net.host(HOST_B).ns, 0, echo, b"x").is_some());
    assert_eq!(server.peer_ips(), [EGRESS_B]);
    assert!(ping(&net.external, GATEWAY_EXTERNAL, 1));
}

#[test]
fn sigterm_removes_everything_the_agent_added() {
    let Some((net, mut agent)) = start() else {
        return;
    };
    assert!(ping(&net.host(HOST_A).ns, SERVER, 1));
    let addrs = net.gateway.ip(&["-4", "-o", "addr", "show", "dev", "eth1"]);
    assert!(String::from_utf8_lossy(&addrs.stdout).contains("192.168.31.101/32"));
    // Other holders of the links (a monitoring tool, a stale descriptor)
    // must not keep the programs attached after the agent says it is gone.
    let links_dir = std::path::Path::new("/sys/fs/bpf")
        .join(&agent.instance)
        .join("links");
    let held: Vec<_> = std::fs::read_dir(&links_dir)
        .expect("the agent pins its links")
        .map(|entry| {
            aya::programs::links::PinnedLink::from_pin(entry.expect("pin").path())
                .expect("opening a pinned link")
        })
        .collect();
    assert!(!held.is_empty(), "no link pins in {}", links_dir.display());
    let status = agent.stop();
    assert!(status.success(), "exit status {status}:\n{}", agent.log());
    assert_gateway_untouched(&net, &agent.instance);
    // And the tenant is cut off rather than leaking: nothing translates now.
    let capture = Capture::start(&net.external, "eth0");
    assert!(!ping(&net.host(HOST_A).ns, SERVER, 1));
    assert_no_internal_source(&capture.finish());
}

#[test]
fn the_agent_sweeps_expired_flows() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let config = format!(
        "{}  sweepInterval: 1s\n  timeouts:\n    udp: 2s\n    udpReplied: 2s\n",
        seed_config(4096)
    );
    let agent = Agent::start(&net.gateway, &config);
    let _udp = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    assert!(
        udp_request(
            &net.host(HOST_A).ns,
            0,
            SocketAddrV4::new(SERVER, 9999),
            b"x"
        )
        .is_some()
    );
    assert_eq!(agent.flows().len(), 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agent.flows().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the flow outlived its 2s timeout by 8s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        agent.status()["conntrack_entries"],
        0,
        "both halves are gone"
    );
}
