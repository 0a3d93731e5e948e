//! Hitless restarts: an agent started with `--keep-dataplane` that is
//! killed (SIGKILL) or stopped (SIGTERM) leaves its pinned programs and maps
//! serving, and the next agent adopts them. A long TCP transfer crosses both
//! restarts without a reset, idle flows keep their translations and get
//! replies, and the conntrack table is the same before and after. Needs root.

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use egress_tests::{
    agent::{Agent, assert_no_dataplane_left},
    require_root,
    topology::{HOST_A, HOST_B, SERVER, Topology, seed_config},
    traffic::{Received, bulk_transfer, udp_echo_server, udp_request},
};

/// Paced so that it is still running after two restarts: about 11 s at `RATE`: longer than two agent restarts (each one loads
/// and verifies every program, the IPv6 ones included: 2.6-2.7 s measured
/// in CI), so the transfer is still running across both.
const BULK: u64 = 128 << 20;
const RATE: &str = "100mbit";
const IDLE_PORTS: [u16; 4] = [31001, 31002, 31003, 31004];

/// Original and translated tuples of every tracked flow, minus the ones
/// that change on their own (the transfer's state and counters do).
fn flow_tuples(agent: &Agent) -> BTreeSet<String> {
    agent
        .flows()
        .iter()
        .map(|f| {
            format!(
                "{} {} {} {}",
                f["tenant"], f["proto"], f["original"], f["translated"]
            )
        })
        .collect()
}

#[test]
fn flows_survive_a_killed_and_a_stopped_agent() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let mut agent = Agent::start_with(&net.gateway, &seed_config(4096), &["--keep-dataplane"]);
    let echo = SocketAddrV4::new(SERVER, 5300);
    let _echo = udp_echo_server(&net.external, echo);
    let hosts = [&net.host(HOST_A).ns, &net.host(HOST_B).ns];
    for host in hosts {
        for port in IDLE_PORTS {
            assert!(udp_request(host, port, echo, b"before").is_some());
        }
    }
    // Pace the tenant host so the transfer outlasts both restarts.
    hosts[0].run(
        "tc",
        &[
            "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", RATE, "burst", "64kb", "latency",
            "100ms",
        ],
    );
    let received = std::thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            bulk_transfer(
                hosts[0],
                &net.external,
                SocketAddrV4::new(SERVER, 7100),
                BULK,
                false,
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let before = flow_tuples(&agent);
        assert!(
            before.len() > IDLE_PORTS.len() * 2,
            "the idle flows and the transfer are tracked: {before:#?}"
        );
        for kill in [true, false] {
            let started = Instant::now();
            agent.restart(kill);
            eprintln!(
                "restart ({}) served again after {:?}",
                if kill { "SIGKILL" } else { "SIGTERM" },
                started.elapsed()
            );
            let status = agent.status();
            let attachments = status["attachments"].as_array().expect("attachments");
            assert!(
                !attachments.is_empty() && attachments.iter().all(|a| a["adopted"] == true),
                "every link adopted: {status:#}"
            );
            assert_eq!(
                flow_tuples(&agent),
                before,
                "the conntrack table is the same after the restart"
            );
        }
        assert!(
            !transfer.is_finished(),
            "the transfer must still be running after the restarts, or they proved nothing"
        );
        transfer.join().expect("transfer thread")
    })
    .unwrap_or_else(|err| {
        panic!(
            "the transfer broke across the restarts: {err}\n{}",
            agent.log()
        )
    });
    assert_eq!(
        received,
        Received {
            bytes: BULK,
            intact: true
        }
    );
    for host in hosts {
        for port in IDLE_PORTS {
            assert_eq!(
                udp_request(host, port, echo, b"after").as_deref(),
                Some(&b"after"[..]),
                "idle flow from port {port} still answered"
            );
        }
    }
    assert_eq!(agent.counter("in_drop_no_flow"), 0, "no reply was refused");
}

#[test]
fn without_keep_dataplane_sigterm_still_removes_everything() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let mut agent = Agent::start(&net.gateway, &seed_config(1024));
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", agent.instance));
    // tc_outbound, tc_reply and leak_guard: veths at defaults run TC.
    assert!(pins.join("links").read_dir().expect("pinned links").count() == 3);
    assert!(agent.stop().success());
    assert!(!pins.exists(), "no pin is left: {}", pins.display());
    assert_no_dataplane_left(&net.gateway);
}

#[test]
fn a_restart_that_needs_another_table_is_refused_and_the_old_dataplane_serves_on() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let mut agent = Agent::start_with(&net.gateway, &seed_config(4096), &["--keep-dataplane"]);
    let echo = SocketAddrV4::new(SERVER, 5301);
    let _echo = udp_echo_server(&net.external, echo);
    let host = &net.host(HOST_A).ns;
    assert!(udp_request(host, 31010, echo, b"before").is_some());
    let before = flow_tuples(&agent);
    agent.kill();

    // Twice the flows: the pinned table cannot hold them, and nothing may
    // replace it behind the operator's back.
    let bigger = egress_tests::agent::ConfigFile::new(&seed_config(8192));
    let refused = egress_tests::agent::run_to_exit(
        &net.gateway,
        &agent.instance,
        &["run", "--config", bigger.path.to_str().expect("utf-8 path")],
    );
    assert!(
        !refused.status.success(),
        "the agent must refuse: {refused:?}"
    );
    assert!(
        refused.stderr.contains("egress-agent cleanup") && refused.stderr.contains("8192"),
        "the refusal says why and what to do: {}",
        refused.stderr
    );
    assert_eq!(
        udp_request(host, 31010, echo, b"after").as_deref(),
        Some(&b"after"[..]),
        "the dataplane left behind still translates its flow"
    );
    agent.respawn();
    assert_eq!(flow_tuples(&agent), before, "and the table is intact");
}
