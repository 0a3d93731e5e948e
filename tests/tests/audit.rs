//! The translation log end to end: tenant traffic through the real agent
//! in network namespaces, recorded in the JSON log, exported over IPFIX to
//! Debian's nfcapd (an independent decoder) and streamed to `flows
//! --follow`; `log lookup` then answers for flows already swept, with the
//! address and port the server saw; IPv6 flows alike in the log, on
//! `--follow` and in `log lookup`, and left out of IPFIX, counted. Needs
//! root and nfdump.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use egress_agent::audit::event::{EndReason, EventKind, TranslationEvent};
use egress_tests::{
    agent::{Agent, wait_until},
    collector::Nfcapd,
    peers::TempDir,
    require_root,
    topology::{
        EGRESS_A, EGRESS_A_V6, EGRESS_B, HOST_A, HOST_B, SERVER, SERVER_V6, Topology,
        dual_stack_config, ipv6_of, seed_config,
    },
    traffic::{curl, http_server, udp_echo_server, udp_request},
};

/// The seed's tenants, short timeouts and sweeps (so flows end within the
/// test), and the translation log in `dir` plus IPFIX to `collector`.
fn config(dir: &TempDir, collector: SocketAddr) -> String {
    config_on(&seed_config(4096), dir, collector)
}

/// `config` on the tenants of `base` (which ends in its `conntrack`).
fn config_on(base: &str, dir: &TempDir, collector: SocketAddr) -> String {
    format!(
        "{}  sweepInterval: 1
  timeouts: {{tcpTimeWait: 2, tcpFinWait: 2, tcpClose: 2, udp: 2, udpReplied: 2, icmp: 2}}
audit:
  log: {}
  maxLogSize: 64KiB
  keep: 3
  ipfix: {collector}
  ipfixObservationDomain: 7
",
        base,
        dir.join("translations.jsonl").display()
    )
}

fn read_log(dir: &TempDir) -> Vec<TranslationEvent> {
    let text = std::fs::read_to_string(dir.join("translations.jsonl")).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str(line).expect("every log line is a record"))
        .collect()
}

fn one(events: &[TranslationEvent], kind: EventKind, outside: SocketAddr) -> &TranslationEvent {
    let matching: Vec<_> = events
        .iter()
        .filter(|e| e.event == kind && e.outside == outside)
        .collect();
    assert_eq!(matching.len(), 1, "one {kind:?} of {outside}: {events:#?}");
    matching[0]
}

#[test]
fn tenant_flows_are_logged_exported_followed_and_looked_up_after_they_end() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let mut nfcapd = Nfcapd::start_at(Some(&net.external), SERVER);
    let dir = TempDir::new("auditlog");
    let agent = Agent::start(&net.gateway, &config(&dir, nfcapd.address()));
    let mut follower = agent.spawn_cli(&["flows", "--follow", "--json"]);
    wait_until("the follower to connect", Duration::from_secs(5), || {
        agent.status()["live"]["audit"]["followers"] == 1
    });
    let web = http_server(&net.external, SocketAddrV4::new(SERVER, 8080));
    let echo = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));

    curl(&net.host(HOST_A).ns, &format!("http://{SERVER}:8080/")).expect("tenant-a GET");
    udp_request(
        &net.host(HOST_B).ns,
        5353,
        SocketAddrV4::new(SERVER, 9999),
        b"hello",
    )
    .expect("tenant-b's echo");
    let web_peer = web.peers()[0];
    let udp_peer = echo.peers()[0];
    assert_eq!(web_peer.ip(), EGRESS_A);
    assert_eq!(udp_peer.ip(), EGRESS_B);

    // Both flows end by the sweeper within a few seconds: then the log
    // holds a creation and an end for each.
    wait_until(
        "both flows to end in the log",
        Duration::from_secs(15),
        || {
            read_log(&dir)
                .iter()
                .filter(|e| e.event == EventKind::End)
                .count()
                >= 2
        },
    );
    let events = read_log(&dir);
    let created = one(&events, EventKind::Create, web_peer);
    assert_eq!(created.tenant, "tenant-a");
    assert_eq!(created.protocol, "tcp");
    assert_eq!(created.inside.ip(), HOST_A);
    assert_eq!(created.destination, Some(SocketAddr::from((SERVER, 8080))));
    let ended = one(&events, EventKind::End, web_peer);
    assert_eq!(ended.reason, Some(EndReason::Closed), "FIN both ways");
    assert_eq!(ended.inside, created.inside);
    assert!(ended.outbound.is_some_and(|t| t.packets >= 3));
    assert!(ended.inbound.is_some_and(|t| t.packets >= 2));
    let udp_end = one(&events, EventKind::End, udp_peer);
    assert_eq!(udp_end.reason, Some(EndReason::Expired));
    assert_eq!(udp_end.tenant, "tenant-b");
    assert_eq!(udp_end.inside, SocketAddr::from((HOST_B, 5353)));
    assert_eq!(
        udp_end.outbound.map(|t| (t.packets, t.bytes)),
        Some((1, 33))
    );

    // The audit question, for a flow already swept from the table.
    let log = dir.join("translations.jsonl");
    let port = web_peer.port().to_string();
    let lookup = |at: jiff::Timestamp| {
        agent.cli(&[
            "log",
            "lookup",
            "--file",
            &log.to_string_lossy(),
            "--address",
            &EGRESS_A.to_string(),
            "--port",
            &port,
            "--at",
            &at.to_string(),
        ])
    };
    let found = lookup(created.start + jiff::SignedDuration::from_millis(1));
    assert!(found.status.success(), "lookup: {}", found.stderr);
    let lines: Vec<&str> = found.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", found.stdout);
    assert!(lines[0].contains("tenant-a"), "{}", lines[0]);
    assert!(
        lines[0].contains(&created.inside.to_string()),
        "{}",
        lines[0]
    );
    let nothing = lookup(ended.time + jiff::SignedDuration::from_secs(3600));
    assert_eq!(nothing.status.code(), Some(1), "{}", nothing.stdout);
    assert!(nothing.stdout.is_empty());

    // The same four records at the collector, as nfdump decodes them.
    let records = nfcapd.records(4);
    let tenant_a = agent.status()["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .find(|t| t["name"] == "tenant-a")
        .and_then(|t| t["id"].as_u64())
        .expect("tenant-a's id");
    let web_records: Vec<_> = records
        .iter()
        .filter(|r| r.outside == SocketAddrV4::new(EGRESS_A, web_peer.port()))
        .collect();
    assert_eq!(web_records.len(), 2, "{records:#?}");
    for record in web_records {
        assert_eq!(SocketAddr::from(record.inside), created.inside);
        assert_eq!(record.destination, Some(SocketAddrV4::new(SERVER, 8080)));
        assert_eq!(u64::from(record.vrf), tenant_a);
        assert_eq!(record.protocol, 6);
    }

    // The follower saw the same records live.
    let status = agent.status();
    assert_eq!(status["live"]["audit"]["sinkLost"], 0);
    assert_eq!(status["counters"]["events_lost"].as_u64().unwrap_or(0), 0);
    drop(agent);
    let followed: Vec<TranslationEvent> = BufReader::new(follower.stdout.take().expect("stdout"))
        .lines()
        .map(|line| serde_json::from_str(&line.expect("line")).expect("record"))
        .collect();
    let _ = follower.wait();
    assert!(
        followed
            .iter()
            .any(|e| e.event == EventKind::Create && e.outside == web_peer),
        "{followed:#?}"
    );
    assert!(
        followed
            .iter()
            .any(|e| e.event == EventKind::End && e.outside == udp_peer),
        "{followed:#?}"
    );
}

/// `/metrics` of an agent in `ns` listening on `listen`.
fn scrape(ns: &egress_tests::netns::Netns, listen: &str) -> String {
    let (code, body) = egress_tests::agent::http_get(ns, listen, "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// A sample's value, by its name and labels as written.
fn sample(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn per_tenant_metrics_follow_the_traffic_and_pass_promtool() {
    if !require_root() {
        return;
    }
    egress_tests::peers::require_program("promtool", "prometheus");
    let net = Topology::seed();
    let listen = "127.0.0.1:9477";
    // No translation log: the per-tenant figures do not depend on one.
    let yaml = format!(
        "{}  sweepInterval: 1\n  timeouts: {{udp: 4, udpReplied: 4}}\n",
        seed_config(4096)
    );
    let agent = Agent::start_with(&net.gateway, &yaml, &["--listen", listen]);
    let _echo = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    for port in 6000..6005 {
        udp_request(
            &net.host(HOST_B).ns,
            port,
            SocketAddrV4::new(SERVER, 9999),
            b"hello",
        )
        .expect("echo");
    }
    let b = "tenant=\"tenant-b\"";
    let in_use = format!("egress_egress_ip_ports_in_use{{{b},address=\"{EGRESS_B}\"}}");
    wait_until(
        "a sweep to see tenant-b's flows",
        Duration::from_secs(10),
        || sample(&scrape(&net.gateway, listen), &in_use) == Some(5),
    );
    let ended = format!("egress_tenant_flows_ended_total{{{b},reason=\"expired\"}}");
    wait_until(
        "tenant-b's flows to expire",
        Duration::from_secs(15),
        || sample(&scrape(&net.gateway, listen), &ended) == Some(5),
    );
    let metrics = scrape(&net.gateway, listen);
    let value = |series: String| {
        sample(&metrics, &series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    assert_eq!(
        value(format!("egress_tenant_flows_created_total{{{b}}}")),
        5
    );
    assert_eq!(value(format!("egress_tenant_flows{{{b}}}")), 0);
    for direction in ["outbound", "inbound"] {
        let labels = format!("{b},direction=\"{direction}\"");
        assert_eq!(value(format!("egress_tenant_packets_total{{{labels}}}")), 5);
        // Five datagrams of 20 + 8 + 5 bytes each way.
        assert_eq!(value(format!("egress_tenant_bytes_total{{{labels}}}")), 165);
    }
    assert_eq!(value(in_use), 0);
    assert_eq!(
        value(format!(
            "egress_egress_ip_ports{{{b},address=\"{EGRESS_B}\"}}"
        )),
        64512
    );
    let a = "tenant=\"tenant-a\"";
    assert_eq!(
        value(format!("egress_tenant_flows_created_total{{{a}}}")),
        0
    );
    assert_eq!(
        value(format!(
            "egress_tenant_flows_refused_total{{{b},reason=\"ports_exhausted\"}}"
        )),
        0
    );

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(
        &mut promtool.stdin.take().expect("stdin"),
        metrics.as_bytes(),
    )
    .expect("feeding promtool");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    drop(agent);
}

#[test]
fn a_stop_records_the_flows_it_takes_down_and_a_kept_dataplane_ends_none() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let dir = TempDir::new("auditstop");
    let yaml = format!(
        "{}audit: {{log: {}}}\n",
        seed_config(4096),
        dir.join("translations.jsonl").display()
    );
    let _echo = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    let flow = |port: u16| {
        udp_request(
            &net.host(HOST_A).ns,
            port,
            SocketAddrV4::new(SERVER, 9999),
            b"hello",
        )
        .expect("echo")
    };
    let created = |log: &[TranslationEvent], port: u16| {
        log.iter()
            .any(|e| e.event == EventKind::Create && e.inside.port() == port)
    };

    // Kept: the flow lives on in the dataplane, so nothing ends it.
    let mut agent = Agent::start_with(&net.gateway, &yaml, &["--keep-dataplane"]);
    flow(7001);
    wait_until("the creation record", Duration::from_secs(15), || {
        created(&read_log(&dir), 7001)
    });
    assert!(agent.stop().success());
    assert!(
        !read_log(&dir).iter().any(|e| e.event == EventKind::End),
        "a kept dataplane's flows did not end: {:#?}",
        read_log(&dir)
    );

    // The next agent adopts it; a plain stop takes both flows down.
    agent.set_run_args(&[]);
    agent.respawn();
    flow(7002);
    wait_until(
        "the second creation record",
        Duration::from_secs(15),
        || created(&read_log(&dir), 7002),
    );
    assert!(agent.stop().success());
    let log = read_log(&dir);
    let ends: Vec<_> = log.iter().filter(|e| e.event == EventKind::End).collect();
    assert_eq!(ends.len(), 2, "{log:#?}");
    for end in ends {
        assert_eq!(end.reason, Some(EndReason::Shutdown));
        assert_eq!(end.outbound.map(|t| t.packets), Some(1));
        assert_eq!(end.inbound.map(|t| t.packets), Some(1));
    }
}

#[test]
fn an_ipv6_flow_is_logged_followed_and_looked_up_and_left_out_of_ipfix_counted() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    net.add_ipv6();
    let dir = TempDir::new("auditlog6");
    // Nobody listens at the collector: the exporter's sends still go out.
    let collector = SocketAddr::from((SERVER, 4739));
    let agent = Agent::start(
        &net.gateway,
        &config_on(&dual_stack_config(4096), &dir, collector),
    );
    let mut follower = agent.spawn_cli(&["flows", "--follow", "--json"]);
    wait_until("the follower to connect", Duration::from_secs(5), || {
        agent.status()["live"]["audit"]["followers"] == 1
    });
    let server = SocketAddr::V6(SocketAddrV6::new(SERVER_V6, 8080, 0, 0));
    let web = http_server(&net.external, server);
    curl(&net.host(HOST_A).ns, &format!("http://[{SERVER_V6}]:8080/")).expect("GET over IPv6");
    let peer = web.peers()[0];
    assert_eq!(peer.ip(), EGRESS_A_V6);

    wait_until(
        "the IPv6 flow to end in the log",
        Duration::from_secs(15),
        || {
            read_log(&dir)
                .iter()
                .any(|e| e.event == EventKind::End && e.outside == peer)
        },
    );
    let events = read_log(&dir);
    let created = one(&events, EventKind::Create, peer);
    assert_eq!(
        (created.tenant.as_str(), created.protocol.as_str()),
        ("tenant-a", "tcp")
    );
    assert_eq!(created.inside.ip(), ipv6_of(HOST_A));
    assert_eq!(created.destination, Some(server));
    let ended = one(&events, EventKind::End, peer);
    assert_eq!(ended.reason, Some(EndReason::Closed));
    assert_eq!(ended.inside, created.inside);

    let log = dir.join("translations.jsonl");
    let found = agent.cli(&[
        "log",
        "lookup",
        "--file",
        &log.to_string_lossy(),
        "--address",
        &EGRESS_A_V6.to_string(),
        "--port",
        &peer.port().to_string(),
        "--at",
        &(created.start + jiff::SignedDuration::from_millis(1)).to_string(),
    ]);
    assert!(found.status.success(), "lookup: {}", found.stderr);
    let lines: Vec<&str> = found.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", found.stdout);
    assert!(lines[0].contains("tenant-a"), "{}", lines[0]);
    assert!(
        lines[0].contains(&created.inside.to_string()),
        "{}",
        lines[0]
    );

    // IPFIX: both records left out and counted, not errors (the log is
    // written first, the exporter right after).
    wait_until("IPFIX to skip both records", Duration::from_secs(5), || {
        agent.status()["live"]["audit"]["ipfixSkipped"] == 2
    });
    let status = agent.status();
    assert_eq!(status["live"]["audit"]["ipfixErrors"], 0, "{status:#}");
    assert_eq!(status["counters"]["events_lost"].as_u64().unwrap_or(0), 0);
    drop(agent);
    let followed: Vec<TranslationEvent> = BufReader::new(follower.stdout.take().expect("stdout"))
        .lines()
        .map(|line| serde_json::from_str(&line.expect("line")).expect("record"))
        .collect();
    let _ = follower.wait();
    assert!(
        followed
            .iter()
            .any(|e| e.event == EventKind::Create && e.outside == peer),
        "{followed:#?}"
    );
}
