//! BFD interop: our sessions (`egress_agent::bfd`, run in-process on a
//! thread inside namespace "gw") against FRR's bfdd and BIRD 2 in namespace
//! "router", across a veth. For each router: the session comes up;
//! NotServing takes it down at once (AdminDown, diag 6); an abort without
//! goodbye takes it down after the router's detection time; a fresh start
//! brings it back; a shutdown takes it down again with diag 7. A third test
//! checks what we send and the RFC 5881 TTL rule and drop counters through
//! the real sockets.
//! Needs root, FRR and BIRD 2.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use egress_agent::bfd::{
    Bfd, Diag, Health, PeerConfig, PeerStatus, State,
    packet::{ControlPacket, DropCounts},
};
use egress_tests::{
    netns::Netns,
    peers::{BfdRouter, Bird, Frr, PeerState, RouterTimers, wait_for_peer},
    require_root,
};
use tokio::{runtime::Runtime, sync::watch};

const GW: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 1);
const GW_LINK: &str = "bfd-gw";
const ROUTER_LINK: &str = "bfd-rt";
const INTERVAL: Duration = Duration::from_millis(100);
const MULTIPLIER: u8 = 3;
/// Both sides use the same timers, so either side's detection time is this.
const DETECTION: Duration = Duration::from_millis(300);
/// Polling the router (a vtysh or birdc run every 20 ms) and scheduling.
const MARGIN: Duration = Duration::from_millis(300);
const POLL: Duration = Duration::from_millis(20);
const COME_UP: Duration = Duration::from_secs(15);

fn link() -> (Netns, Netns) {
    let gw = Netns::new("gw");
    let router = Netns::new("router");
    gw.veth(GW_LINK, &router, ROUTER_LINK);
    gw.ip(&["addr", "add", &format!("{GW}/30"), "dev", GW_LINK]);
    router.ip(&["addr", "add", &format!("{ROUTER}/30"), "dev", ROUTER_LINK]);
    (gw, router)
}

fn router_timers() -> RouterTimers {
    RouterTimers {
        interval_ms: u32::try_from(INTERVAL.as_millis()).expect("small interval"),
        multiplier: MULTIPLIER,
    }
}

fn our_peer() -> PeerConfig {
    PeerConfig {
        interface: Some(GW_LINK.to_owned()),
        min_tx: INTERVAL,
        min_rx: INTERVAL,
        multiplier: MULTIPLIER,
        ..PeerConfig::new(ROUTER)
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Starts our side: `start` runs on a thread inside `gw`, so the sockets
/// are made there; the runtime's workers then drive them from anywhere.
fn start_ours(gw: &Netns, runtime: &Runtime, health: watch::Receiver<Health>) -> Bfd {
    let handle = runtime.handle().clone();
    gw.within(move || handle.block_on(Bfd::start(vec![our_peer()], health)))
        .expect("starting our BFD")
}

fn ours(bfd: &Bfd) -> PeerStatus {
    bfd.snapshot().into_iter().next().expect("one session")
}

fn wait_for_ours(bfd: &Bfd, state: State, timeout: Duration) {
    let start = Instant::now();
    while ours(bfd).local_state != state {
        assert!(
            start.elapsed() < timeout,
            "our session did not reach {state}: {:?}",
            ours(bfd)
        );
        std::thread::sleep(POLL);
    }
}

fn is_up(state: &PeerState) -> bool {
    *state == PeerState::Up
}

fn is_down(state: &PeerState) -> bool {
    matches!(state, PeerState::Down | PeerState::Init)
}

/// Prints the router's logs when a test fails while it runs.
struct LogsOnFailure<'a>(&'a dyn BfdRouter);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{} logs:\n{}", self.0.name(), self.0.logs());
        }
    }
}

/// The scenario every router goes through.
fn interop(gw: &Netns, router: &dyn BfdRouter) {
    let _logs = LogsOnFailure(router);
    let name = router.name();
    println!("{name} started with:");
    for line in router.command_lines() {
        println!("  {line}");
    }
    let runtime = runtime();
    let (health, health_rx) = watch::channel(Health::Serving);

    let bfd = start_ours(gw, &runtime, health_rx);
    let took = wait_for_peer(router, "Up", COME_UP, is_up);
    wait_for_ours(&bfd, State::Up, Duration::from_secs(2));
    println!("{name}: session Up {took:?} after our start");
    let status = ours(&bfd);
    assert_eq!(status.remote_state, State::Up);
    assert_eq!(
        status.tx_interval_ms,
        Some(100),
        "the fast rate after the Poll sequence"
    );
    assert_eq!(status.detection_time_ms, Some(300));
    assert_eq!(status.remote_multiplier, MULTIPLIER);
    assert_eq!(status.dropped, DropCounts::default());

    health.send_replace(Health::NotServing);
    let took = wait_for_peer(router, "Down after NotServing", DETECTION + MARGIN, is_down);
    println!("{name}: Down {took:?} after NotServing (detection time {DETECTION:?})");
    let status = ours(&bfd);
    assert_eq!(status.local_state, State::AdminDown);
    assert_eq!(status.local_diag, Diag::ConcatenatedPathDown);
    if let Some(diag) = router.remote_diag() {
        assert_eq!(diag, "concatenated path down", "the diag {name} saw");
    }

    health.send_replace(Health::Serving);
    let took = wait_for_peer(router, "Up after Serving", COME_UP, is_up);
    println!("{name}: Up again {took:?} after Serving");

    // Let a few packets pass at the fast rate, so that the abort is timed
    // from a session in steady state.
    std::thread::sleep(5 * INTERVAL);
    bfd.abort();
    let took = wait_for_peer(router, "Down after abort", DETECTION + MARGIN, is_down);
    println!("{name}: Down {took:?} after abort (detection time {DETECTION:?})");
    // Without a goodbye the router can only time out: our last packet left
    // at most one interval before the abort, so that takes at least 200 ms
    // (less only if the loaded machine delayed our last packets), where a
    // goodbye shows at the first poll.
    assert!(
        took >= DETECTION / 2,
        "{name} went down after {took:?}, sooner than its detection timer could fire"
    );
    if let Some(diag) = router.local_diag() {
        assert_eq!(
            diag, "control detection time expired",
            "why {name} went down"
        );
    }

    let bfd = start_ours(gw, &runtime, health.subscribe());
    let took = wait_for_peer(router, "Up after our restart", COME_UP, is_up);
    wait_for_ours(&bfd, State::Up, Duration::from_secs(2));
    println!("{name}: Up {took:?} after a fresh start");

    let shutdown = Instant::now();
    runtime.block_on(bfd.shutdown());
    let stopped = shutdown.elapsed();
    wait_for_peer(router, "Down after shutdown", DETECTION + MARGIN, is_down);
    let took = shutdown.elapsed();
    println!("{name}: Down {took:?} after shutdown began (shutdown took {stopped:?})");
    if let Some(diag) = router.remote_diag() {
        assert_eq!(diag, "administratively down", "the diag {name} saw");
    }
}

#[test]
fn frr_bfdd_follows_health_abort_and_restart() {
    if !require_root() {
        return;
    }
    let (gw, router) = link();
    let frr = Frr::start(&router, GW, ROUTER_LINK, router_timers());
    interop(&gw, &frr);
}

#[test]
fn bird_follows_health_abort_and_restart() {
    if !require_root() {
        return;
    }
    let (gw, router) = link();
    let bird = Bird::start(&router, ROUTER, GW, ROUTER_LINK, router_timers());
    interop(&gw, &bird);
}

/// Sends one datagram to our control port from `router` with the given TTL.
fn send_from_router(router: &Netns, payload: Vec<u8>, ttl: u32) {
    router.within(move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(ROUTER, 0)).expect("binding in router");
        socket.set_ttl(ttl).expect("setting the TTL");
        socket
            .send_to(&payload, SocketAddrV4::new(GW, 3784))
            .expect("sending to our control port");
    });
}

fn wait_for_status(bfd: &Bfd, what: &str, done: impl Fn(&PeerStatus) -> bool) -> PeerStatus {
    let start = Instant::now();
    loop {
        let status = ours(bfd);
        if done(&status) {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{what}: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_real_sockets_use_rfc_5881_ports_and_enforce_ttl_255() {
    if !require_root() {
        return;
    }
    let (gw, router) = link();
    // Stands in for the router's control port, to see what we send.
    let listener = router.within(|| {
        let socket = UdpSocket::bind(SocketAddrV4::new(ROUTER, 3784)).expect("binding in router");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("read timeout");
        socket
    });
    let runtime = runtime();
    let (_health, health_rx) = watch::channel(Health::Serving);
    let bfd = start_ours(&gw, &runtime, health_rx);

    let mut buffer = [0u8; 64];
    let (length, from) = listener.recv_from(&mut buffer).expect("our first packet");
    let first = ControlPacket::decode(&buffer[..length]).expect("a valid control packet");
    assert_eq!(from.ip(), std::net::IpAddr::V4(GW));
    assert!(
        from.port() >= 49152,
        "RFC 5881 §4 source port, got {}",
        from.port()
    );
    assert_eq!(first.state, State::Down);
    assert_eq!(first.your_discriminator, 0);
    assert_eq!(first.desired_min_tx_us, 1_000_000, "slow until Up");
    assert_eq!(first.required_min_rx_us, 100_000);
    let hello = ControlPacket {
        diag: Diag::None,
        state: State::Down,
        poll: false,
        final_: false,
        control_plane_independent: false,
        demand: false,
        detect_mult: 3,
        my_discriminator: 0x1234_5678,
        your_discriminator: 0,
        desired_min_tx_us: 1_000_000,
        required_min_rx_us: 100_000,
        required_min_echo_rx_us: 0,
    };

    send_from_router(&router, hello.encode().to_vec(), 254);
    let status = wait_for_status(&bfd, "a TTL 254 packet counted", |s| s.dropped.bad_ttl == 1);
    assert_eq!(status.local_state, State::Down);
    assert_eq!(status.packets_in, 0);

    let mut version_2 = hello.encode().to_vec();
    version_2[0] = (version_2[0] & 0x1f) | 0x40;
    send_from_router(&router, version_2, 255);
    wait_for_status(&bfd, "a version 2 packet counted", |s| {
        s.dropped.bad_version == 1
    });

    send_from_router(&router, hello.encode().to_vec(), 255);
    let status = wait_for_status(&bfd, "a valid packet accepted", |s| s.packets_in == 1);
    assert_eq!(status.local_state, State::Init);
    assert_eq!(status.remote_discriminator, 0x1234_5678);
    assert_eq!(status.dropped.total(), 2);
    assert_eq!(bfd.unmatched_drops(), DropCounts::default());
    bfd.abort();
}
