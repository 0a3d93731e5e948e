//! BFD interop: our sessions (`egress_agent::bfd`, run in-process on a
//! thread inside namespace "gw") against FRR's bfdd and BIRD 2 in namespace
//! "router", across a veth. For each router: the session comes up;
//! NotServing takes it down at once (AdminDown, diag 6); an abort without
//! goodbye takes it down after the router's detection time; a fresh start
//! brings it back; a shutdown takes it down again with diag 7. A third test
//! checks what we send and the RFC 5881 TTL rule and drop counters through
//! the real sockets. IPv6 single hop (RFC 5881 covers it) goes through the
//! same scenario and checks, with the hop limit in place of the TTL.
//! Needs root, FRR and BIRD 2.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
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
const GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 2);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 1);
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

/// `link` with an IPv6 /64 beside the IPv4 /30, once duplicate address
/// detection lets both addresses serve.
fn link_v6() -> (Netns, Netns) {
    let (gw, router) = link();
    gw.ip(&["addr", "add", &format!("{GW_V6}/64"), "dev", GW_LINK]);
    router.ip(&[
        "addr",
        "add",
        &format!("{ROUTER_V6}/64"),
        "dev",
        ROUTER_LINK,
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    gw.wait_ipv6_settled(deadline);
    router.wait_ipv6_settled(deadline);
    (gw, router)
}

fn router_timers() -> RouterTimers {
    RouterTimers {
        interval_ms: u32::try_from(INTERVAL.as_millis()).expect("small interval"),
        multiplier: MULTIPLIER,
    }
}

fn our_peer(router: impl Into<IpAddr>) -> PeerConfig {
    PeerConfig {
        interface: Some(GW_LINK.to_owned()),
        min_tx: INTERVAL,
        min_rx: INTERVAL,
        multiplier: MULTIPLIER,
        ..PeerConfig::new(router)
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
fn start_ours(
    gw: &Netns,
    runtime: &Runtime,
    peer: &PeerConfig,
    health: watch::Receiver<Health>,
) -> Bfd {
    let handle = runtime.handle().clone();
    let peer = peer.clone();
    gw.within(move || handle.block_on(Bfd::start(vec![peer], health)))
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

/// The scenario every router goes through, with our session to `peer`.
fn interop(gw: &Netns, router: &dyn BfdRouter, peer: &PeerConfig) {
    let _logs = LogsOnFailure(router);
    let name = router.name();
    println!("{name} started with:");
    for line in router.command_lines() {
        println!("  {line}");
    }
    let runtime = runtime();
    let (health, health_rx) = watch::channel(Health::Serving);

    let bfd = start_ours(gw, &runtime, peer, health_rx);
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

    let bfd = start_ours(gw, &runtime, peer, health.subscribe());
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
    interop(&gw, &frr, &our_peer(ROUTER));
}

#[test]
fn frr_bfdd_over_ipv6_follows_health_abort_and_restart() {
    if !require_root() {
        return;
    }
    let (gw, router) = link_v6();
    let frr = Frr::start(&router, GW_V6, ROUTER_LINK, router_timers());
    interop(&gw, &frr, &our_peer(ROUTER_V6));
}

/// The address the kernel gave `link` in `ns` for its link.
fn link_local(ns: &Netns, link: &str) -> Ipv6Addr {
    let out = ns.run(
        "ip",
        &["-6", "-o", "addr", "show", "dev", link, "scope", "link"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|word| *word != "inet6")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address on {link}: {text}"))
}

/// Routers often peer on link-local addresses: the session is reached
/// through its interface (the scope), as `interface` names it.
#[test]
fn frr_bfdd_over_ipv6_link_local_follows_health_abort_and_restart() {
    if !require_root() {
        return;
    }
    let (gw, router) = link_v6();
    let frr = Frr::start(
        &router,
        link_local(&gw, GW_LINK),
        ROUTER_LINK,
        router_timers(),
    );
    interop(&gw, &frr, &our_peer(link_local(&router, ROUTER_LINK)));
}

#[test]
fn bird_follows_health_abort_and_restart() {
    if !require_root() {
        return;
    }
    let (gw, router) = link();
    let bird = Bird::start(&router, ROUTER, GW, ROUTER_LINK, router_timers());
    interop(&gw, &bird, &our_peer(ROUTER));
}

#[test]
fn bird_over_ipv6_follows_health_abort_and_restart() {
    if !require_root() {
        return;
    }
    let (gw, router) = link_v6();
    let bird = Bird::start(&router, ROUTER, GW_V6, ROUTER_LINK, router_timers());
    interop(&gw, &bird, &our_peer(ROUTER_V6));
}

/// Sends one datagram from `from` in `router` to our control port at `to`,
/// with the given TTL or hop limit.
fn send_from_router(router: &Netns, from: IpAddr, to: IpAddr, payload: Vec<u8>, hops: u32) {
    router.within(move || {
        let socket = UdpSocket::bind(SocketAddr::new(from, 0)).expect("binding in router");
        match from {
            IpAddr::V4(_) => socket.set_ttl(hops).expect("setting the TTL"),
            IpAddr::V6(_) => set_unicast_hops(&socket, hops),
        }
        socket
            .send_to(&payload, SocketAddr::new(to, 3784))
            .expect("sending to our control port");
    });
}

/// std has no stable setter for IPV6_UNICAST_HOPS.
fn set_unicast_hops(socket: &UdpSocket, hops: u32) {
    let value = libc::c_int::try_from(hops).expect("a hop limit");
    // SAFETY: a live socket and a c_int option value of its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "IPV6_UNICAST_HOPS: {}",
        std::io::Error::last_os_error()
    );
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
    rfc_5881_on_the_wire(&gw, &router, GW.into(), ROUTER.into());
}

#[test]
fn the_real_ipv6_sockets_use_rfc_5881_ports_and_enforce_hop_limit_255() {
    if !require_root() {
        return;
    }
    let (gw, router) = link_v6();
    rfc_5881_on_the_wire(&gw, &router, GW_V6.into(), ROUTER_V6.into());
}

/// What we send (from a port of the RFC 5881 range, slow until Up), and
/// what we refuse: a TTL or hop limit below 255, a version other than 1.
fn rfc_5881_on_the_wire(gw: &Netns, router: &Netns, gw_addr: IpAddr, router_addr: IpAddr) {
    // Stands in for the router's control port, to see what we send.
    let listener = router.within(move || {
        let socket =
            UdpSocket::bind(SocketAddr::new(router_addr, 3784)).expect("binding in router");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("read timeout");
        socket
    });
    let runtime = runtime();
    let (_health, health_rx) = watch::channel(Health::Serving);
    let bfd = start_ours(gw, &runtime, &our_peer(router_addr), health_rx);

    let mut buffer = [0u8; 64];
    let (length, from) = listener.recv_from(&mut buffer).expect("our first packet");
    let first = ControlPacket::decode(&buffer[..length]).expect("a valid control packet");
    assert_eq!(from.ip(), gw_addr);
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

    let send = |payload: Vec<u8>, hops: u32| {
        send_from_router(router, router_addr, gw_addr, payload, hops);
    };
    send(hello.encode().to_vec(), 254);
    let status = wait_for_status(&bfd, "a TTL 254 packet counted", |s| s.dropped.bad_ttl == 1);
    assert_eq!(status.local_state, State::Down);
    assert_eq!(status.packets_in, 0);

    let mut version_2 = hello.encode().to_vec();
    version_2[0] = (version_2[0] & 0x1f) | 0x40;
    send(version_2, 255);
    wait_for_status(&bfd, "a version 2 packet counted", |s| {
        s.dropped.bad_version == 1
    });

    send(hello.encode().to_vec(), 255);
    let status = wait_for_status(&bfd, "a valid packet accepted", |s| s.packets_in == 1);
    assert_eq!(status.local_state, State::Init);
    assert_eq!(status.remote_discriminator, 0x1234_5678);
    assert_eq!(status.dropped.total(), 2);
    assert_eq!(bfd.unmatched_drops(), DropCounts::default());
    bfd.abort();
}
