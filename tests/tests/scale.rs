//! Ten thousand tenants, each with its own egress IP on the external
//! interface: how long `run` takes to serve them and a reload from 2 to
//! 10,000 tenants takes to apply (printed, not asserted: the bound is in the
//! README), that every address is there and the dataplane serves, that the
//! log stays a handful of lines, that SIGTERM or SIGINT during such a
//! start or reload stops the agent at once with everything removed, and
//! that addresses of an agent killed halfway are the next one's. Needs
//! root.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use egress_agent::system::SystemView;
use egress_tests::{
    agent::{Agent, assert_no_dataplane_left, wait_until},
    netns::Netns,
    require_root,
    topology::{EGRESS_A, EGRESS_B, GATEWAY_EXTERNAL, HOST_A, HOST_B, SERVER, Topology},
    traffic::{udp_echo_server, udp_request},
};

const TENANTS: u32 = 10_000;

/// One of these tests at a time: each adds ten thousand addresses, and a
/// duration measured while another test does the same would be theirs.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The seed's two tenants (whose hosts exist in the topology, and which
/// get a quota of their own for the traffic the tests send), then
/// `tenants - 2` more, each with a /24 of its own, one egress IP from
/// 100.64.0.0/10 and an equal share of the rest of the table.
fn scale_config(tenants: u32) -> String {
    let mut yaml = format!(
        "\
interfaces: {{internal: [eth0], external: eth1}}
conntrack: {{maxFlows: 65536}}
tenants:
  - {{name: tenant-a, sources: [172.20.10.0/24], egressIPs: [{EGRESS_A}], maxFlows: 1000}}
  - {{name: tenant-b, sources: [172.20.20.0/24], egressIPs: [{EGRESS_B}], maxFlows: 1000}}
"
    );
    for i in 0..tenants.saturating_sub(2) {
        yaml.push_str(&format!(
            "  - {{name: t{i}, sources: [10.{}.{}.0/24], egressIPs: [{}]}}\n",
            i / 256,
            i % 256,
            extra_egress(i)
        ));
    }
    yaml
}

fn extra_egress(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i + 1)
}

fn all_egress(tenants: u32) -> Vec<Ipv4Addr> {
    let mut all = vec![EGRESS_A, EGRESS_B];
    all.extend((0..tenants.saturating_sub(2)).map(extra_egress));
    all.sort_unstable();
    all
}

/// The /32 addresses on the gateway's external interface, sorted.
fn egress_on_eth1(gateway: &Netns) -> Vec<Ipv4Addr> {
    let out = gateway.run("ip", &["-4", "-o", "addr", "show", "dev", "eth1"]);
    let mut found: Vec<Ipv4Addr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (addr, len) = line.split_whitespace().nth(3)?.split_once('/')?;
            (len == "32").then(|| addr.parse().ok()).flatten()
        })
        .collect();
    found.sort_unstable();
    found
}

/// Both seed tenants get out, each from its own address.
#[track_caller]
fn assert_serving(net: &Topology) {
    let echo = SocketAddrV4::new(SERVER, 5300);
    let server = udp_echo_server(&net.external, echo);
    for host in [HOST_A, HOST_B] {
        assert!(
            udp_request(&net.host(host).ns, 0, echo, b"x").is_some(),
            "{host} gets no answer"
        );
    }
    let peers = server.peer_ips();
    assert!(
        peers.contains(&EGRESS_A) && peers.contains(&EGRESS_B),
        "{peers:?}"
    );
}

/// What a stop must leave: the gateway's own address and nothing else.
#[track_caller]
fn assert_everything_removed(net: &Topology, agent: &Agent) {
    assert_eq!(
        egress_on_eth1(&net.gateway),
        Vec::<Ipv4Addr>::new(),
        "egress addresses left"
    );
    let out = net
        .gateway
        .run("ip", &["-4", "-o", "addr", "show", "dev", "eth1"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{GATEWAY_EXTERNAL}/24")),
        "the gateway's own address stays"
    );
    assert_no_dataplane_left(&net.gateway);
    let pins = format!("/sys/fs/bpf/{}", agent.instance);
    assert!(!Path::new(&pins).exists(), "pins left in {pins}");
    let run = format!("/run/{}", agent.instance);
    assert!(!Path::new(&run).exists(), "state left in {run}");
}

/// Sends `signal` and returns how long the agent took to exit.
fn stop_timed(agent: &mut Agent, signal: i32) -> Duration {
    let stopping = Instant::now();
    let status = agent.stop_with(signal);
    let took = stopping.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", agent.log());
    took
}

/// Lines the agent logged after the first `skip`.
fn log_lines(agent: &Agent, skip: usize) -> Vec<String> {
    agent.log().lines().skip(skip).map(str::to_owned).collect()
}

#[track_caller]
fn assert_short(what: &str, lines: &[String]) {
    assert!(
        lines.len() <= 30,
        "{what} logged {} lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        !lines.iter().any(|l| l.contains("leaving it to its owner")),
        "the agent's own addresses are not someone else's:\n{}",
        lines.join("\n")
    );
}

#[test]
fn ten_thousand_tenants_start_and_reload() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let net = Topology::seed();
    let config = scale_config(TENANTS);

    let starting = Instant::now();
    let mut agent = Agent::start(&net.gateway, &config);
    let start = starting.elapsed();
    assert_eq!(egress_on_eth1(&net.gateway), all_egress(TENANTS));
    assert_serving(&net);
    let started_log = log_lines(&agent, 0);
    assert_short("a 10,000-tenant start", &started_log);
    let stop = stop_timed(&mut agent, libc::SIGTERM);
    assert_everything_removed(&net, &agent);
    drop(agent);

    let mut agent = Agent::start(&net.gateway, &scale_config(2));
    let before = agent.log().lines().count();
    let reloading = Instant::now();
    agent.reload(&config);
    wait_until(
        "the reload to 10,000 tenants",
        Duration::from_secs(600),
        || agent.log().contains("configuration reloaded"),
    );
    let reload = reloading.elapsed();
    assert_eq!(egress_on_eth1(&net.gateway), all_egress(TENANTS));
    assert_serving(&net);
    let reload_log = log_lines(&agent, before);
    assert_short("a reload from 2 to 10,000 tenants", &reload_log);

    // Once more with the same tenants: nothing to add, nothing to say
    // about the agent's own addresses.
    let before = agent.log().lines().count();
    agent.reload(&config.replace("maxFlows: 65536}", "maxFlows: 65536, sweepInterval: 5s}"));
    wait_until("the second reload", Duration::from_secs(600), || {
        agent.log().matches("configuration reloaded").count() == 2
    });
    assert_short("a reload of 10,000 tenants", &log_lines(&agent, before));
    let stop_after_reload = stop_timed(&mut agent, libc::SIGTERM);
    assert_everything_removed(&net, &agent);

    eprintln!(
        "{TENANTS} tenants: `run` serving after {start:.2?}, stopped in {stop:.2?}; \
         reload from 2 to {TENANTS} tenants in {reload:.2?}, stopped in {stop_after_reload:.2?}"
    );
    eprintln!("start log:\n  {}", started_log.join("\n  "));
    eprintln!("reload log:\n  {}", reload_log.join("\n  "));
}

#[test]
fn sigterm_during_a_reload_to_ten_thousand_tenants_stops_at_once() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let net = Topology::seed();
    let mut agent = Agent::start(&net.gateway, &scale_config(2));
    agent.reload(&scale_config(TENANTS));
    // Halfway: some of the new addresses are there.
    wait_for_addresses(&net.gateway, 3);
    let took = stop_timed(&mut agent, libc::SIGTERM);
    eprintln!("SIGTERM during a reload to {TENANTS} tenants: exited after {took:.2?}");
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM took {took:.2?}:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("reload abandoned halfway"),
        "the signal came while the reload added addresses:\n{}",
        agent.log()
    );
    assert_everything_removed(&net, &agent);
}

#[test]
fn sigint_during_a_ten_thousand_tenant_start_stops_at_once() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let net = Topology::seed();
    let mut agent = Agent::launch(&net.gateway, &scale_config(TENANTS));
    wait_for_addresses(&net.gateway, 1);
    let took = stop_timed(&mut agent, libc::SIGINT);
    eprintln!("SIGINT during a {TENANTS}-tenant start: exited after {took:.2?}");
    assert!(
        took < Duration::from_secs(5),
        "SIGINT took {took:.2?}:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("stopped while starting"),
        "the signal came while the start added addresses:\n{}",
        agent.log()
    );
    assert_everything_removed(&net, &agent);
}

/// The kernel remembers which addresses the agent added (IFA_PROTO), so
/// an agent killed before it wrote its state file leaves addresses the
/// next one takes for its own: not refused as the gateway's, and removed
/// by its stop.
#[test]
fn addresses_of_an_agent_killed_while_starting_are_adopted() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let net = Topology::seed();
    let config = scale_config(TENANTS);
    let mut agent = Agent::launch(&net.gateway, &config);
    wait_for_addresses(&net.gateway, 100);
    agent.kill();
    let left = egress_on_eth1(&net.gateway).len();
    assert!(
        left > 0 && left < TENANTS as usize,
        "{left} addresses left by the killed start"
    );
    assert_eq!(marked_on_eth1(&net.gateway), left, "each carries the mark");
    let before = agent.log().lines().count();
    agent.respawn();
    assert_eq!(egress_on_eth1(&net.gateway), all_egress(TENANTS));
    assert_serving(&net);
    let log = log_lines(&agent, before);
    assert_short("a start over a killed one", &log);
    assert!(
        !log.iter().any(|l| l.contains("someone else")),
        "{}",
        log.join("\n")
    );
    stop_timed(&mut agent, libc::SIGTERM);
    assert_everything_removed(&net, &agent);
}

/// How many addresses on the gateway's eth1 the kernel knows an egress
/// agent added (IFA_PROTO 234; iproute2 before 6.2 does not show it).
fn marked_on_eth1(gateway: &Netns) -> usize {
    gateway.within(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().expect("rtnetlink");
            tokio::spawn(connection);
            let system = SystemView::read(&handle).await.expect("reading addresses");
            let eth1 = system.link_by_name("eth1").expect("eth1").index;
            system.owned_on(eth1).len()
        })
    })
}

/// Waits (polling often: the moment matters) until the external interface
/// has at least `count` egress addresses.
fn wait_for_addresses(gateway: &Netns, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while egress_on_eth1(gateway).len() < count {
        assert!(
            Instant::now() < deadline,
            "fewer than {count} egress addresses after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
