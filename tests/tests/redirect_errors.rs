//! Never a silent black hole: XDP redirects the kernel drops after the
//! program returned make the dataplane not serving, with a reason naming
//! the interfaces, on `/readyz`, in `status` and on `/metrics`; and the
//! same traffic through a target that takes XDP frames leaves it serving.
//!
//! The failing target is a veth whose peer has GRO off, the kernel's
//! default. Since Linux 6.3 such a veth does not advertise XDP transmit,
//! and every redirect into it is refused with -EOPNOTSUPP
//! (`xdp:xdp_redirect_err`); older kernels queue the frames and
//! `veth_xdp_xmit()` drops them with -ENXIO (`xdp:xdp_devmap_xmit`).
//! Either way the agent must name the interfaces. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use egress_agent::redirects::QUIET;
use egress_tests::{
    agent::{Agent, http_get, wait_until},
    netns::Netns,
    require_root,
    topology::{HOST_A, SERVER, Topology, seed_config},
    traffic::{Server, udp_echo_server, udp_request},
};

const LISTEN: &str = "127.0.0.1:9477";

/// The tracepoints see every namespace, and the programs tell the
/// dataplane's interfaces by ifindex alone, which namespaces reuse: two
/// topologies built side by side have the same indexes, so one test's
/// failures would show in the other's agent. These tests take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn config() -> String {
    // Native XDP, where redirects go through the driver's ndo_xdp_xmit:
    // generic XDP would hand the frame to the target's ordinary transmit.
    format!("{}xdp:\n  mode: native\n", seed_config(1024))
}

/// These tests are about the XDP accelerator and the setting that decides
/// whether a veth takes XDP frames: GRO on its peer. The topology keeps
/// kernel defaults (GRO off), where the agent refuses native XDP outright;
/// GRO on at both peers the gateway redirects into lets it start, and TX
/// checksum offload off at the senders gives XDP the complete checksums it
/// needs (the tuning a real NIC's traffic does not need).
fn seed_tuned_for_xdp() -> Topology {
    let net = Topology::seed();
    net.lan.ethtool("gw", "gro", true);
    net.external.ethtool("eth0", "gro", true);
    net.external.ethtool("eth0", "tx", false);
    for host in &net.hosts {
        host.ns.ethtool("eth0", "tx", false);
    }
    net
}

/// Where the echo server listens, behind the gateway.
const ECHO: SocketAddrV4 = SocketAddrV4::new(SERVER, 5300);

/// The tests' common start, one test at a time: the tuned topology
/// (`prepare` may change it first), the agent on native XDP serving, and
/// a UDP echo server behind it. Bound in this order, they drop in reverse:
/// the server, the agent, the namespaces, then the turn.
fn serving_xdp_gateway(
    prepare: impl FnOnce(&Topology),
) -> (MutexGuard<'static, ()>, Topology, Agent, Server) {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let net = seed_tuned_for_xdp();
    prepare(&net);
    let agent = Agent::start_with(&net.gateway, &config(), &["--listen", LISTEN]);
    let server = udp_echo_server(&net.external, ECHO);
    wait_until("readiness", Duration::from_secs(5), || {
        get(&net.gateway, "/readyz").0 == 200
    });
    (turn, net, agent, server)
}

/// GET on the agent's endpoint from inside the gateway namespace.
fn get(gateway: &Netns, path: &str) -> (u16, String) {
    http_get(gateway, LISTEN, path)
}

/// `count` datagrams from a tenant host to the server, 50 ms apart (the
/// first ones may take the TC fallback while the gateway resolves the
/// server's MAC; the rest are XDP redirects).
fn send_datagrams(host: &Netns, to: SocketAddrV4, count: usize) {
    host.within(move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        for i in 0..count {
            socket
                .send_to(format!("datagram {i}").as_bytes(), to)
                .expect("send");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// The value of `egress_redirect_drops_total` for a pair and cause, if exported.
fn redirect_drops(metrics: &str, from: &str, to: &str, cause: &str) -> Option<u64> {
    let series =
        format!("egress_redirect_drops_total{{from=\"{from}\",to=\"{to}\",cause=\"{cause}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(|value| value.trim().parse().expect("a counter value"))
}

#[test]
fn redirects_into_a_veth_without_napi_make_the_dataplane_not_serving() {
    if !require_root() {
        return;
    }
    let (_turn, net, agent, server) = serving_xdp_gateway(|_| {});
    let (_, metrics) = get(&net.gateway, "/metrics");
    assert!(
        metrics.contains("egress_redirect_drops_watched 1"),
        "the tracepoints are attached: {metrics}\n{}",
        agent.log()
    );
    assert_eq!(redirect_drops(&metrics, "eth0", "eth1", "error"), None);

    // GRO off again at the server's end of the gateway's external veth
    // (the kernel's default for a new veth) leaves it without NAPI, so the
    // gateway's eth1 refuses XDP frames from now on.
    net.external.ethtool("eth0", "gro", false);
    send_datagrams(&net.host(HOST_A).ns, ECHO, 20);

    wait_until("unreadiness", Duration::from_secs(5), || {
        get(&net.gateway, "/readyz").0 == 503
    });
    let (_, body) = get(&net.gateway, "/readyz");
    assert!(
        body.contains("XDP redirects from eth0 to eth1 are being dropped by the kernel ("),
        "{body}"
    );
    assert!(
        body.contains("eth1 is a veth whose peer has neither GRO nor an XDP program"),
        "{body}"
    );

    let (_, metrics) = get(&net.gateway, "/metrics");
    let dropped = redirect_drops(&metrics, "eth0", "eth1", "error").unwrap_or(0);
    assert!(dropped > 0, "egress_redirect_drops_total grew: {metrics}");
    assert!(metrics.contains("egress_dataplane_serving 0"), "{metrics}");
    // What made the failure silent before: the verdicts say translated.
    assert!(agent.counter("out_translated") > 0);

    // `status` says it too (its live view is published once a second).
    wait_until("status to say why", Duration::from_secs(5), || {
        agent.status()["live"]["health"]["state"] == "not_serving"
    });
    let status = agent.status();
    let reason = status["live"]["health"]["reason"]
        .as_str()
        .expect("a reason");
    assert!(reason.contains("from eth0 to eth1"), "{reason}");
    let rows = status["redirect_drops"].as_array().expect("redirect_drops");
    let row = rows
        .iter()
        .find(|r| r["from"] == "eth0" && r["to"] == "eth1")
        .unwrap_or_else(|| panic!("a row for eth0 -> eth1: {rows:?}"));
    assert!(row["failed"].as_u64().unwrap_or(0) > 0, "{row}");
    let error = row["last_error"].as_str().unwrap_or_default();
    assert!(["EOPNOTSUPP", "ENXIO"].contains(&error), "{row}");
    let text = agent.cli(&["status"]);
    assert!(text.status.success(), "{}", text.stderr);
    assert!(
        text.stdout
            .contains("dataplane: not_serving (XDP redirects from eth0 to eth1"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("XDP redirects the kernel dropped:"),
        "{}",
        text.stdout
    );
    let arrived = server.peers().len();
    assert!(
        arrived < 20,
        "the redirected datagrams were lost ({arrived} of 20 arrived)"
    );

    // Fixed: GRO on at the peer. Traffic passes again, and after a quiet
    // period the dataplane serves again.
    net.external.ethtool("eth0", "gro", true);
    assert_eq!(
        udp_request(&net.host(HOST_A).ns, 32100, ECHO, b"again").as_deref(),
        Some(&b"again"[..]),
        "traffic passes once the peer has NAPI"
    );
    wait_until("readiness after the quiet period", QUIET * 2, || {
        get(&net.gateway, "/readyz").0 == 200
    });
    let (_, metrics) = get(&net.gateway, "/metrics");
    assert_eq!(
        redirect_drops(&metrics, "eth0", "eth1", "error"),
        Some(dropped),
        "no frame lost since: {metrics}"
    );
}

#[test]
fn the_same_traffic_through_a_veth_with_gro_leaves_the_dataplane_serving() {
    if !require_root() {
        return;
    }
    // The tuned topology: GRO on at the peers of both gateway veths.
    let (_turn, net, agent, server) = serving_xdp_gateway(|_| {});

    send_datagrams(&net.host(HOST_A).ns, ECHO, 20);
    assert_eq!(
        udp_request(&net.host(HOST_A).ns, 32100, ECHO, b"echo").as_deref(),
        Some(&b"echo"[..])
    );
    wait_until("every datagram", Duration::from_secs(5), || {
        server.peers().len() >= 21
    });
    assert!(agent.counter("out_translated") > 0);

    // Several health checks later, still serving, nothing dropped.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let (code, body) = get(&net.gateway, "/readyz");
        assert_eq!(code, 200, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, metrics) = get(&net.gateway, "/metrics");
    assert!(
        metrics.contains("egress_redirect_drops_watched 1"),
        "{metrics}"
    );
    assert!(metrics.contains("egress_dataplane_serving 1"), "{metrics}");
    assert_eq!(
        redirect_drops(&metrics, "eth0", "eth1", "error").unwrap_or(0),
        0,
        "{metrics}"
    );
    let status = agent.status();
    assert!(
        status["redirect_drops"]
            .as_array()
            .expect("redirect_drops")
            .iter()
            .all(|r| r["failed"] == 0),
        "{status:#}"
    );
}

#[test]
fn frames_a_target_leaves_out_of_a_batch_are_counted_without_withdrawing() {
    if !require_root() {
        return;
    }
    // The tuned topology, but the server's end of the external veth takes
    // shorter frames than the gateway's end sends: `veth_xdp_xmit()` leaves
    // such frames out of the batch and reports them through
    // `xdp:xdp_devmap_xmit` with no error, as it does when its queue is
    // full. That is congestion's signature, so it is counted (the
    // `redirect_xmit` program at work) but does not make the gateway
    // withdraw.
    let (_turn, net, agent, server) = serving_xdp_gateway(|net| {
        net.external.ip(&["link", "set", "eth0", "mtu", "1000"]);
    });
    // Small datagrams resolve the server's MAC and pass.
    assert!(udp_request(&net.host(HOST_A).ns, 32100, ECHO, b"small").is_some());
    let host = net.host(HOST_A).ns.enter(move || {
        let socket =
            UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 32100)).expect("bind");
        for _ in 0..10 {
            socket.send_to(&[0x55; 1200], ECHO).expect("send");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    host.join().expect("sender");

    let partial =
        || redirect_drops(&get(&net.gateway, "/metrics").1, "eth0", "eth1", "partial").unwrap_or(0);
    wait_until(
        "the partial drops to be counted",
        Duration::from_secs(5),
        || partial() >= 10,
    );
    assert_eq!(server.peers().len(), 1, "only the small datagram arrived");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let (code, body) = get(&net.gateway, "/readyz");
        assert_eq!(code, 200, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, metrics) = get(&net.gateway, "/metrics");
    assert_eq!(
        redirect_drops(&metrics, "eth0", "eth1", "error"),
        Some(0),
        "{metrics}"
    );
    let status = agent.status();
    let rows = status["redirect_drops"].as_array().expect("redirect_drops");
    assert!(
        rows.iter()
            .any(|r| r["from"] == "eth0" && r["to"] == "eth1" && r["partial"].as_u64() >= Some(10)),
        "{rows:?}"
    );
}
