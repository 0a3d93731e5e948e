//! The VpcNatGateway contract: seed 001's objects replayed through
//! `nat-gateway.sh` as Kube-OVN's controller does (init with the
//! interfaces, eip-add, snat-add, dnat-add, a floating IP), in a pod shaped
//! like seed 001's (`net1` on the VPC subnet, `net2` a macvlan with its own
//! address, default interface settings). Every verb exits 0 with nothing on
//! stderr; traffic goes where the rules say and nowhere else; a replay
//! changes nothing; the `-del` verbs undo exactly. Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use egress_tests::{
    kube_ovn::PodScripts,
    require_root,
    shapes::NatGatewayPod,
    traffic::{curl, http_server, udp_echo_server, udp_request},
};

const SCRIPT: &str = "nat-gateway.sh";
const EIP: Ipv4Addr = Ipv4Addr::new(10, 115, 55, 200);
const FLOATING: Ipv4Addr = Ipv4Addr::new(10, 115, 55, 201);

/// The controller's calls for seed 001's EIPs, SNAT, DNAT and a FIP.
const SEED_RULES: [(&str, &str); 5] = [
    ("eip-add", "10.115.55.200/21"),
    ("eip-add", "10.115.55.201/21"),
    ("snat-add", "10.115.55.200,172.20.10.0/24,--random-fully"),
    ("dnat-add", "10.115.55.200,8888,tcp,172.20.10.2,80"),
    ("floating-ip-add", "10.115.55.201,172.20.10.3"),
];

fn pod_scripts(pod: &NatGatewayPod) -> PodScripts {
    let gateway = NatGatewayPod::GATEWAY_V4.to_string();
    PodScripts::new(&pod.gateway, &[("GATEWAY_V4", gateway.as_str())])
}

fn rules_file(scripts: &PodScripts) -> String {
    std::fs::read_to_string(scripts.dir.join("rules.json")).expect("rules.json")
}

#[test]
fn seed_rules_translate_both_ways_replay_idempotently_and_delete_exactly() {
    if !require_root() {
        return;
    }
    let pod = NatGatewayPod::new();
    let scripts = pod_scripts(&pod);

    // Before init every other verb fails, as Kube-OVN's does.
    let early = scripts.run(SCRIPT, &["eip-add", "10.115.55.200/21"]);
    assert!(!early.status.success());
    assert!(early.stderr.contains("not initialized"), "{}", early.stderr);

    let version = scripts.ok(SCRIPT, &["get-iptables-version"]);
    assert!(
        version
            .stdout
            .split_whitespace()
            .any(|word| word
                .strip_prefix('v')
                .is_some_and(|v| v.split('.').count() >= 2
                    && v.split('.')
                        .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))),
        "the controller's regex v([0-9]+(\\.[0-9]+)+) finds no version in {:?}",
        version.stdout
    );

    scripts.ok(SCRIPT, &["init", "net1,net2"]);
    let initialized = rules_file(&scripts);
    for (verb, rule) in SEED_RULES {
        scripts.ok(SCRIPT, &[verb, rule]);
    }
    let agent = scripts.agent_pid().expect("the agent runs after init");

    let web = http_server(
        &pod.host(NatGatewayPod::WEB).ns,
        SocketAddrV4::new(NatGatewayPod::WEB, 80),
    );
    let outside = http_server(
        &pod.outside,
        SocketAddrV4::new(NatGatewayPod::GATEWAY_V4, 8080),
    );
    let _echo = udp_echo_server(
        &pod.host(NatGatewayPod::FLOATING_HOST).ns,
        SocketAddrV4::new(NatGatewayPod::FLOATING_HOST, 7777),
    );

    // DNAT: the forwarded port reaches the internal server, which sees
    // the real client.
    let body = curl(&pod.outside, &format!("http://{EIP}:8888/"))
        .unwrap_or_else(|err| panic!("DNAT: {err}\n{}", scripts.agent_log()));
    assert_eq!(body, format!("you are {}\n", NatGatewayPod::GATEWAY_V4));
    assert_eq!(web.peer_ips(), [NatGatewayPod::GATEWAY_V4]);
    // SNAT: the subnet leaves from the EIP.
    let out_url = format!("http://{}:8080/", NatGatewayPod::GATEWAY_V4);
    let body = curl(&pod.host(NatGatewayPod::WEB).ns, &out_url).expect("SNAT");
    assert_eq!(body, format!("you are {EIP}\n"));
    // The floating IP, both ways: in on any port, out from it.
    let echoed = udp_request(&pod.outside, 0, SocketAddrV4::new(FLOATING, 7777), b"fip");
    assert_eq!(echoed.as_deref(), Some(&b"fip"[..]));
    let body = curl(&pod.host(NatGatewayPod::FLOATING_HOST).ns, &out_url).expect("FIP out");
    assert_eq!(body, format!("you are {FLOATING}\n"));
    // Unsolicited traffic to other ports reaches nothing.
    assert!(curl(&pod.outside, &format!("http://{EIP}:8889/")).is_err());
    assert!(curl(&pod.outside, &format!("http://{EIP}:80/")).is_err());
    assert_eq!(web.peer_ips(), [NatGatewayPod::GATEWAY_V4]);

    let status = scripts.status();
    let tenants = status["tenants"].as_array().expect("tenants");
    assert_eq!(tenants.len(), 1, "{status}");

    // A pod restart's replay (init, then every rule) changes nothing: the
    // same rules, the same agent, the flows still served.
    let served = rules_file(&scripts);
    scripts.ok(SCRIPT, &["init", "net1,net2"]);
    for (verb, rule) in SEED_RULES {
        scripts.ok(SCRIPT, &[verb, rule]);
    }
    assert_eq!(rules_file(&scripts), served);
    assert_eq!(scripts.agent_pid(), Some(agent));
    assert!(curl(&pod.outside, &format!("http://{EIP}:8888/")).is_ok());

    // Refused verbs fail with the reason and change nothing.
    let qos = scripts.run(SCRIPT, &["qos-add", "10.115.55.200,1000"]);
    assert!(
        !qos.status.success() && qos.stderr.contains("QoS"),
        "{qos:?}"
    );
    let clash = scripts.run(
        SCRIPT,
        &["dnat-add", "10.115.55.200,8888,tcp,172.20.10.9,80"],
    );
    assert!(
        !clash.status.success() && clash.stderr.contains("already forwards"),
        "{clash:?}"
    );
    assert_eq!(rules_file(&scripts), served);

    // The -del verbs undo exactly, in the controller's order.
    scripts.ok(SCRIPT, &["floating-ip-del", "10.115.55.201"]);
    assert_eq!(
        udp_request(&pod.outside, 0, SocketAddrV4::new(FLOATING, 7777), b"gone"),
        None
    );
    scripts.ok(
        SCRIPT,
        &["dnat-del", "10.115.55.200,8888,tcp,172.20.10.2,80"],
    );
    assert!(curl(&pod.outside, &format!("http://{EIP}:8888/")).is_err());
    scripts.ok(SCRIPT, &["snat-del", "10.115.55.200,172.20.10.0/24"]);
    assert!(
        curl(&pod.host(NatGatewayPod::WEB).ns, &out_url).is_err(),
        "a host in no SNAT rule gets nothing out"
    );
    scripts.ok(SCRIPT, &["eip-del", "10.115.55.201/21"]);
    scripts.ok(SCRIPT, &["eip-del", "10.115.55.200/21"]);
    assert_eq!(rules_file(&scripts), initialized);
    assert_eq!(outside.peer_ips(), [EIP, FLOATING]);
}

#[test]
fn flows_outlive_a_killed_agent_and_the_next_verb_brings_it_back() {
    if !require_root() {
        return;
    }
    let pod = NatGatewayPod::new();
    let scripts = pod_scripts(&pod);
    scripts.ok(SCRIPT, &["init", "net1,net2"]);
    for (verb, rule) in SEED_RULES {
        scripts.ok(SCRIPT, &[verb, rule]);
    }
    let _echo = udp_echo_server(
        &pod.outside,
        SocketAddrV4::new(NatGatewayPod::GATEWAY_V4, 5353),
    );
    let web = &pod.host(NatGatewayPod::WEB).ns;
    let server = SocketAddrV4::new(NatGatewayPod::GATEWAY_V4, 5353);
    assert!(udp_request(web, 40000, server, b"before").is_some());
    let flows = scripts.flows();
    assert_eq!(flows.len(), 1, "{flows:#?}");
    let translated = flows[0]["translated"].clone();

    // The agent dies without a word; the dataplane keeps translating.
    let killed = scripts.agent_pid().expect("agent");
    // SAFETY: kill(2) on the agent the scripts started.
    unsafe { libc::kill(killed, libc::SIGKILL) };
    while std::fs::read_to_string(format!("/proc/{killed}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z"))
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(udp_request(web, 40000, server, b"meanwhile").is_some());

    // The controller's next verb (a replay here) starts it again; it adopts
    // the pinned table: the same flow, the same translation.
    let (verb, rule) = SEED_RULES[2];
    scripts.ok(SCRIPT, &[verb, rule]);
    let restarted = scripts.agent_pid().expect("agent again");
    assert_ne!(restarted, killed);
    assert!(udp_request(web, 40000, server, b"after").is_some());
    let flows = scripts.flows();
    assert_eq!(flows.len(), 1, "{flows:#?}");
    assert_eq!(flows[0]["translated"], translated);
    assert_eq!(flows[0]["packets_out"], 3);
}
