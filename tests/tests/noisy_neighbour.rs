//! One tenant cannot hurt another, end to end through network namespaces
//! with the real agent, on interfaces at the kernel's defaults: a victim
//! tenant's flows (answered UDP flows, idle TCP connections, a one-way
//! stream) keep their translation and work through an aggressor's flood of
//! new flows far larger than the table, the victim opens new flows during
//! the flood, and the aggressor's excess is refused as its own quota drops.
//! And the gateway is a wall: an outsider routing to the tenant networks
//! through it reaches nothing. Needs root.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use egress_tests::{
    agent::Agent,
    netns::Netns,
    require_root,
    topology::{EGRESS_B, GATEWAY_EXTERNAL, HOST_A, HOST_B, SERVER, Topology, seed_config},
    traffic::{ping, udp_echo_server},
};

/// Answers every datagram with the address it came from, as the partner's
/// firewall would see it.
const WHO_UDP: u16 = 7000;
/// Records (sender, sequence number) of every datagram.
const SINK_UDP: u16 = 7001;
/// Answers every read on a connection with the connection's peer address.
const WHO_TCP: u16 = 7002;
/// The table: each tenant's default share is half of it.
const MAX_FLOWS: u32 = 4096;
const FLOOD_FOR: Duration = Duration::from_secs(5);

struct Servers {
    stop: Arc<AtomicBool>,
    sink: Arc<Mutex<Vec<(SocketAddr, u64)>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn servers(ns: &Netns) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let sink = Arc::new(Mutex::new(Vec::new()));
    let who = ns.within(|| UdpSocket::bind(SocketAddrV4::new(SERVER, WHO_UDP)).expect("who"));
    let sink_socket =
        ns.within(|| UdpSocket::bind(SocketAddrV4::new(SERVER, SINK_UDP)).expect("sink"));
    let listener =
        ns.within(|| TcpListener::bind(SocketAddrV4::new(SERVER, WHO_TCP)).expect("tcp"));
    let mut threads = Vec::new();
    {
        let stop = stop.clone();
        who.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = who.recv_from(&mut buf) {
                    let _ = who.send_to(peer.to_string().as_bytes(), peer);
                }
            }
        }));
    }
    {
        let (stop, sink) = (stop.clone(), sink.clone());
        sink_socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sink_socket.recv_from(&mut buf)
                    && n >= 8
                {
                    let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                    sink.lock().expect("sink").push((peer, seq));
                }
            }
        }));
    }
    {
        let stop = stop.clone();
        listener.set_nonblocking(true).expect("nonblocking");
        threads.push(thread::spawn(move || {
            let mut connections = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((stream, peer)) = listener.accept() {
                    stream.set_nonblocking(false).expect("blocking");
                    let stop = stop.clone();
                    connections.push(thread::spawn(move || who_tcp(stream, peer, &stop)));
                }
                thread::sleep(Duration::from_millis(10));
            }
            for connection in connections {
                let _ = connection.join();
            }
        }));
    }
    Servers {
        stop,
        sink,
        threads,
    }
}

fn who_tcp(mut stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {
                if stream.write_all(peer.to_string().as_bytes()).is_err() {
                    return;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

/// Asks the UDP "who" server through `socket`, a few times if the flood
/// costs a datagram; the address the server saw.
fn who_am_i(socket: &UdpSocket) -> Option<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    for _ in 0..4 {
        socket
            .send_to(b"who", SocketAddrV4::new(SERVER, WHO_UDP))
            .expect("send");
        if let Ok(n) = socket.recv(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}

fn tcp_who(stream: &mut TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(b"who").ok()?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn tenant<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no tenant {name} in {status}"))
}

#[test]
fn a_flood_of_new_flows_from_one_tenant_leaves_the_others_flows_intact() {
    if !require_root() {
        return;
    }
    let topo = Topology::seed();
    let agent = Agent::start(&topo.gateway, &seed_config(MAX_FLOWS));
    let servers = servers(&topo.external);
    let victim = &topo.host(HOST_B).ns;
    let aggressor = &topo.host(HOST_A).ns;

    // The victim's flows before the flood: 45 answered UDP flows, 5 idle
    // TCP connections, and a one-way stream that keeps sending.
    let udp: Vec<UdpSocket> = (0..45)
        .map(|i| {
            victim.within(move || {
                UdpSocket::bind(SocketAddrV4::new(HOST_B, 20_000 + i)).expect("victim socket")
            })
        })
        .collect();
    let udp_seen: Vec<String> = udp
        .iter()
        .map(|s| who_am_i(s).expect("victim UDP flow answered before the flood"))
        .collect();
    let mut tcp: Vec<TcpStream> = (0..5)
        .map(|_| {
            victim.within(|| {
                TcpStream::connect_timeout(
                    &SocketAddrV4::new(SERVER, WHO_TCP).into(),
                    Duration::from_secs(5),
                )
                .expect("victim TCP connection")
            })
        })
        .collect();
    let tcp_seen: Vec<String> = tcp
        .iter_mut()
        .map(|s| tcp_who(s).expect("victim TCP answered before the flood"))
        .collect();
    for seen in udp_seen.iter().chain(&tcp_seen) {
        assert!(seen.starts_with(&format!("{EGRESS_B}:")), "{seen}");
    }
    let streaming = Arc::new(AtomicBool::new(true));
    let stream_sent = Arc::new(AtomicU64::new(0));
    let stream = {
        let (streaming, sent) = (streaming.clone(), stream_sent.clone());
        let socket = victim
            .within(|| UdpSocket::bind(SocketAddrV4::new(HOST_B, 21_000)).expect("stream socket"));
        thread::spawn(move || {
            let mut seq = 0u64;
            while streaming.load(Ordering::Relaxed) {
                let _ = socket.send_to(&seq.to_be_bytes(), SocketAddrV4::new(SERVER, SINK_UDP));
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    thread::sleep(Duration::from_millis(300));

    // The flood: every datagram a new 5-tuple, for seconds.
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = {
        let flooding = flooding.clone();
        let socket = aggressor
            .within(|| UdpSocket::bind(SocketAddrV4::new(HOST_A, 0)).expect("aggressor socket"));
        thread::spawn(move || {
            let mut sent = 0u64;
            let mut port = 10_000u16;
            while flooding.load(Ordering::Relaxed) {
                if socket
                    .send_to(b"x", SocketAddrV4::new(SERVER, port))
                    .is_ok()
                {
                    sent += 1;
                }
                port = if port == 60_000 { 10_000 } else { port + 1 };
            }
            sent
        })
    };
    let flood_started = Instant::now();

    // New flows of the victim during the flood.
    thread::sleep(Duration::from_secs(1));
    let mut fresh_answered = 0;
    for i in 0..10 {
        let socket = victim.within(move || {
            UdpSocket::bind(SocketAddrV4::new(HOST_B, 22_000 + i)).expect("fresh socket")
        });
        if who_am_i(&socket).is_some_and(|seen| seen.starts_with(&format!("{EGRESS_B}:"))) {
            fresh_answered += 1;
        }
    }
    let status_during = agent.status();
    thread::sleep(FLOOD_FOR.saturating_sub(flood_started.elapsed()));
    flooding.store(false, Ordering::Relaxed);
    let flood_sent = flood.join().expect("flood");
    thread::sleep(Duration::from_millis(500));
    streaming.store(false, Ordering::Relaxed);
    stream.join().expect("stream");
    thread::sleep(Duration::from_millis(300));

    let status = agent.status();
    let aggressor_row = tenant(&status, "tenant-a");
    let victim_row = tenant(&status, "tenant-b");
    eprintln!(
        "flood: {flood_sent} new-flow datagrams in {FLOOD_FOR:?}; tenant-a {aggressor_row}; \
         tenant-b {victim_row}; during the flood: {}",
        tenant(&status_during, "tenant-a")
    );
    assert!(
        flood_sent > u64::from(MAX_FLOWS) * 10,
        "the flood must be far larger than the table: {flood_sent} datagrams"
    );
    assert_eq!(
        fresh_answered, 10,
        "the victim's new flows during the flood"
    );

    // Every victim flow kept its translation and works.
    for (socket, before) in udp.iter().zip(&udp_seen) {
        assert_eq!(who_am_i(socket).as_ref(), Some(before), "a victim UDP flow");
    }
    for (stream, before) in tcp.iter_mut().zip(&tcp_seen) {
        assert_eq!(
            tcp_who(stream).as_ref(),
            Some(before),
            "a victim TCP connection"
        );
    }
    let received = servers.sink.lock().expect("sink").clone();
    let senders: std::collections::BTreeSet<_> = received.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        senders.len(),
        1,
        "the stream kept one translation: {senders:?}"
    );
    let sent = stream_sent.load(Ordering::Relaxed);
    assert!(
        received.len() as u64 * 10 >= sent * 9,
        "the victim's stream lost more than 10%: {} of {sent}",
        received.len()
    );

    // The aggressor held its share and no more; its excess is its own.
    let quota = aggressor_row["max_flows"].as_u64().expect("quota");
    assert_eq!(quota, u64::from(MAX_FLOWS / 2));
    assert!(aggressor_row["flows"].as_u64().expect("flows") <= quota + 2);
    let refused = aggressor_row["quota_drops"].as_u64().expect("drops");
    assert!(refused > 0, "{aggressor_row}");
    assert_eq!(victim_row["quota_drops"], 0);
    assert_eq!(
        status["counters"]["out_drop_tenant_quota"].as_u64(),
        Some(refused)
    );
    assert_eq!(
        status["counters"]["out_drop_conntrack_full"].as_u64(),
        Some(0)
    );
    drop(servers);
}

#[test]
fn an_outsider_routing_through_the_gateway_reaches_nothing_inside() {
    if !require_root() {
        return;
    }
    let topo = Topology::seed();
    let agent = Agent::start(&topo.gateway, &seed_config(MAX_FLOWS));
    let victim = &topo.host(HOST_B).ns;
    let inside = udp_echo_server(victim, SocketAddrV4::new(HOST_B, 7100));
    // The outsider knows the tenant networks and routes them to the
    // gateway's external address.
    topo.external.ip(&[
        "route",
        "add",
        "172.20.0.0/16",
        "via",
        &GATEWAY_EXTERNAL.to_string(),
    ]);

    let outsider = topo.external.within(|| {
        let socket = UdpSocket::bind(SocketAddrV4::new(SERVER, 0)).expect("outsider socket");
        for _ in 0..20 {
            socket
                .send_to(b"knock", SocketAddrV4::new(HOST_B, 7100))
                .expect("send");
        }
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        socket.recv(&mut buf).is_ok()
    });
    assert!(!outsider, "an outsider got an answer from inside");
    assert!(
        !ping(&topo.external, HOST_B, 2),
        "an outsider's ping reached a tenant host"
    );
    let tcp = topo.external.within(|| {
        TcpStream::connect_timeout(
            &SocketAddrV4::new(HOST_B, 22).into(),
            Duration::from_millis(500),
        )
        .map(|_| ())
        .map_err(|e| e.kind())
    });
    assert_eq!(tcp, Err(std::io::ErrorKind::TimedOut), "a SYN from outside");
    assert!(
        inside.peers().is_empty(),
        "delivered inside: {:?}",
        inside.peers()
    );
    assert!(agent.counter("in_drop_to_internal") >= 23);
    assert!(agent.flows().is_empty());

    // The gateway itself stays reachable, and the tenants still get out.
    assert!(ping(&topo.external, GATEWAY_EXTERNAL, 1));
    let out = victim.within(|| {
        let socket = UdpSocket::bind(SocketAddrV4::new(HOST_B, 0)).expect("socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ = socket.connect(SocketAddrV4::new(Ipv4Addr::new(192, 168, 31, 1), 7101));
        socket
    });
    let echo = udp_echo_server(&topo.external, SocketAddrV4::new(SERVER, 7101));
    out.send(b"out").expect("send");
    let mut buf = [0u8; 16];
    assert_eq!(out.recv(&mut buf).ok(), Some(3));
    assert_eq!(echo.peer_ips(), [EGRESS_B]);
}
