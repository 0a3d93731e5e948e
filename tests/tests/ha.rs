//! The agent's BFD as routers see it: FRR's bfdd and BIRD 2 (not ours) in
//! the external namespace run a session with the real `egress-agent`. The
//! session comes Up; a program detached behind the agent's back, a killed
//! agent and a stopped agent each make the router see Down, within bounds
//! printed and asserted; the agent started again brings it back Up.
//! Needs root, FRR and BIRD.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use egress_tests::{
    agent::Agent,
    netns::Netns,
    peers::{BfdRouter, Bird, Frr, PeerState, RouterTimers},
    require_root,
    topology::{GATEWAY_EXTERNAL, SERVER, Topology, seed_config},
};

const INTERVAL_MS: u32 = 100;
const MULTIPLIER: u8 = 3;
/// The router's detection time: our packets stop, it waits this long.
const DETECTION: Duration = Duration::from_millis(INTERVAL_MS as u64 * MULTIPLIER as u64);
/// How often the agent checks that its programs are attached.
const HEALTH_CHECK: Duration = Duration::from_millis(250);
/// Polling the router (a vtysh or birdc run) and scheduling noise.
const MARGIN: Duration = Duration::from_millis(400);
const COME_UP: Duration = Duration::from_secs(20);

fn config() -> String {
    format!(
        "{}bfd:\n  peers:\n    - {{address: {SERVER}, interface: eth1, minTxMs: {INTERVAL_MS}, minRxMs: {INTERVAL_MS}, multiplier: {MULTIPLIER}}}\n",
        seed_config(1024)
    )
}

fn wait_for(
    router: &dyn BfdRouter,
    what: &str,
    timeout: Duration,
    done: fn(&PeerState) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let state = router.state();
        if done(&state) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{}: no {what} within {timeout:?}; it reports {state:?}\n{}",
            router.name(),
            router.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn up(state: &PeerState) -> bool {
    *state == PeerState::Up
}

fn down(state: &PeerState) -> bool {
    matches!(
        state,
        PeerState::Down | PeerState::Init | PeerState::AdminDown
    )
}

/// Detaches the agent's reply program with bpftool, as an operator (or a
/// bug) might.
fn detach_reply_program(gateway: &Netns, agent: &Agent) {
    let status = agent.status();
    let program_id = status["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .find(|a| a["program"] == "tc_reply")
        .expect("tc_reply attached")["program_id"]
        .clone();
    let links = gateway.run("bpftool", &["-j", "link", "show"]);
    let links: serde_json::Value = serde_json::from_slice(&links.stdout).expect("bpftool JSON");
    let id = links
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["prog_id"] == program_id)
        .and_then(|l| l["id"].as_u64())
        .expect("the reply program's link");
    gateway.run("bpftool", &["link", "detach", "id", &id.to_string()]);
}

fn scenario(net: &Topology, router: &dyn BfdRouter) {
    let mut agent = Agent::start(&net.gateway, &config());
    let took = wait_for(router, "Up", COME_UP, up);
    eprintln!("{}: Up after {took:?}", router.name());
    // `status` shows the session (published once a second).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = agent.status();
        if status["live"]["bfd"][0]["local_state"] == "up" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status shows no Up session: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    detach_reply_program(&net.gateway, &agent);
    let took = wait_for(
        router,
        "Down after a detach",
        HEALTH_CHECK + DETECTION + MARGIN,
        down,
    );
    eprintln!(
        "{}: Down {took:?} after the reply program was detached",
        router.name()
    );
    assert!(agent.log().contains("the dataplane stopped serving"));

    // A new agent repairs the dataplane (it re-attaches what is missing).
    agent.restart(false);
    let took = wait_for(router, "Up after a restart", COME_UP, up);
    eprintln!(
        "{}: Up again {took:?} after the agent restarted",
        router.name()
    );

    agent.kill();
    let took = wait_for(router, "Down after SIGKILL", DETECTION + MARGIN, down);
    eprintln!(
        "{}: Down {took:?} after the agent was killed (detection time {DETECTION:?})",
        router.name()
    );
    agent.respawn();
    wait_for(router, "Up after the kill", COME_UP, up);

    let stopped = Instant::now();
    assert!(agent.stop().success());
    let took = wait_for(router, "Down after SIGTERM", DETECTION + MARGIN, down) + stopped.elapsed();
    eprintln!(
        "{}: Down within {took:?} of SIGTERM (AdminDown)",
        router.name()
    );
}

fn timers() -> RouterTimers {
    RouterTimers {
        interval_ms: INTERVAL_MS,
        multiplier: MULTIPLIER,
    }
}

#[test]
fn frr_sees_the_gateway_fail_and_return() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let frr = Frr::start(&net.external, GATEWAY_EXTERNAL, "eth0", timers());
    scenario(&net, &frr);
}

#[test]
fn bird_sees_the_gateway_fail_and_return() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let bird = Bird::start(
        &net.external,
        Ipv4Addr::new(192, 168, 31, 1),
        GATEWAY_EXTERNAL,
        "eth0",
        timers(),
    );
    scenario(&net, &bird);
}
