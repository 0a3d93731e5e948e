//! The egress demo: two dual-stack tenants and a stranger behind one
//! gateway, a partner's server outside. Shows that the server sees
//! tenant-a as 192.168.31.101 and tenant-b as 192.168.31.150 for TCP, UDP
//! and ping, and as 2001:db8:31::101 and ::150 over IPv6, that the
//! stranger gets nothing out in either family, and cleans up (also on
//! Ctrl-C or failure). Run it with `cargo xtask demo`, as root.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    process::ExitCode,
};

use egress_tests::{
    agent::Agent,
    cleanup,
    netns::Netns,
    topology::{
        EGRESS_A, EGRESS_A_V6, EGRESS_B, EGRESS_B_V6, HOST_A, HOST_B, SERVER, SERVER_V6, STRANGER,
        Topology, dual_stack_config, ipv6_of,
    },
    traffic::{Capture, Seen, Server, curl, http_server, ping, udp_echo_server, udp_request},
};

struct Check {
    failures: u32,
}

impl Check {
    fn report<A: Into<IpAddr>>(&mut self, what: &str, saw: Option<A>, want: Option<A>) {
        let (saw, want): (Option<IpAddr>, Option<IpAddr>) =
            (saw.map(Into::into), want.map(Into::into));
        let ok = saw == want;
        let saw_text = saw.map_or("nothing (blocked at the gateway)".to_owned(), |ip| {
            format!("server saw {ip}")
        });
        println!(
            "  {what:<44} {saw_text:<36} {}",
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            self.failures += 1;
            if let Some(want) = want {
                println!("    expected the server to see {want}");
            }
        }
    }
}

fn last_new_peer(server: &Server, before: usize) -> Option<Ipv4Addr> {
    server.peer_ips().get(before).copied()
}

fn echo_source(capture: &Capture, from: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    capture
        .snapshot()
        .iter()
        .rev()
        .find(|s: &&Seen| !s.outgoing && s.proto == 1 && s.dst == SERVER && !from.contains(&s.src))
        .map(|s| s.src)
}

fn exercise(
    check: &mut Check,
    label: &str,
    host: &Netns,
    want: Option<Ipv4Addr>,
    servers: (&Server, &Server),
    capture: &Capture,
) {
    let (http, udp) = servers;
    println!("{label}");
    let before = http.peers().len();
    let _ = curl(host, &format!("http://{SERVER}:8080/"));
    check.report(
        &format!("TCP  HTTP GET http://{SERVER}:8080/"),
        last_new_peer(http, before),
        want,
    );
    let before = udp.peers().len();
    let _ = udp_request(host, 0, SocketAddrV4::new(SERVER, 9999), b"hello");
    check.report(
        &format!("UDP  datagram to {SERVER}:9999"),
        last_new_peer(udp, before),
        want,
    );
    let seen_before: BTreeSet<Ipv4Addr> = capture
        .snapshot()
        .iter()
        .filter(|s| s.proto == 1 && !s.outgoing)
        .map(|s| s.src)
        .collect();
    let replied = ping(host, SERVER, 2);
    let saw = echo_source(capture, &seen_before);
    check.report(
        &format!(
            "ICMP ping {SERVER}{}",
            if replied { " (replied)" } else { "" }
        ),
        saw,
        want,
    );
}

/// The same over IPv6: HTTP and UDP as the server sees them, ping6 by
/// whether it is answered.
fn exercise_v6(
    check: &mut Check,
    label: &str,
    host: &Netns,
    want: Option<Ipv6Addr>,
    servers: (&Server, &Server),
) {
    let (http, udp) = servers;
    println!("{label}");
    let new_peer = |server: &Server, before: usize| server.peer_ips_v6().get(before).copied();
    let before = http.peer_ips_v6().len();
    let _ = curl(host, &format!("http://[{SERVER_V6}]:8080/"));
    check.report(
        &format!("TCP  HTTP GET http://[{SERVER_V6}]:8080/"),
        new_peer(http, before),
        want,
    );
    let before = udp.peer_ips_v6().len();
    let to = SocketAddr::V6(SocketAddrV6::new(SERVER_V6, 9999, 0, 0));
    let _ = udp_request(host, 0, to, b"hello");
    check.report(
        &format!("UDP  datagram to [{SERVER_V6}]:9999"),
        new_peer(udp, before),
        want,
    );
    let replied = ping(host, SERVER_V6, 2);
    let ok = replied == want.is_some();
    println!(
        "  {:<44} {:<36} {}",
        format!("ICMP ping {SERVER_V6}"),
        if replied { "answered" } else { "no answer" },
        if ok { "ok" } else { "FAILED" }
    );
    if !ok {
        check.failures += 1;
    }
}

fn main() -> ExitCode {
    cleanup::on_signal();
    if !egress_tests::require_root() {
        return ExitCode::FAILURE;
    }
    println!(
        "egress demo: per-tenant egress IPs on an eBPF SNAT gateway, in network namespaces\n\
         (every interface at the kernel's defaults: the agent picks XDP or TC per interface)\n"
    );
    println!("  tenant-a host {HOST_A}  ─┐");
    println!(
        "  tenant-b host {HOST_B}  ─┼─ lan ── eth0 [gateway: egress-agent] eth1 ── server {SERVER}"
    );
    println!("  stranger      {STRANGER}  ─┘      (no tenant)");
    println!();
    let net = Topology::seed();
    net.add_ipv6();
    let config = dual_stack_config(65536);
    println!(
        "configuration:\n{}",
        config
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    let agent = Agent::start(&net.gateway, &config);
    let status = agent.status();
    for attachment in status["attachments"].as_array().into_iter().flatten() {
        println!(
            "attached {:<15} on {} ({})",
            attachment["program"].as_str().unwrap_or("?"),
            attachment["interface"].as_str().unwrap_or("?"),
            attachment["hook"].as_str().unwrap_or("?")
        );
        if let Some(reason) = attachment["reason"].as_str().filter(|r| !r.is_empty()) {
            println!("  why: {reason}");
        }
    }
    println!();

    let capture = Capture::start(&net.external, "eth0");
    let http = http_server(&net.external, SocketAddrV4::new(SERVER, 8080));
    let udp = udp_echo_server(&net.external, SocketAddrV4::new(SERVER, 9999));
    let mut check = Check { failures: 0 };
    exercise(
        &mut check,
        &format!("tenant-a ({HOST_A}):"),
        &net.host(HOST_A).ns,
        Some(EGRESS_A),
        (&http, &udp),
        &capture,
    );
    exercise(
        &mut check,
        &format!("tenant-b ({HOST_B}):"),
        &net.host(HOST_B).ns,
        Some(EGRESS_B),
        (&http, &udp),
        &capture,
    );
    exercise(
        &mut check,
        &format!("stranger ({STRANGER}, in no tenant):"),
        &net.host(STRANGER).ns,
        None,
        (&http, &udp),
        &capture,
    );

    let http6 = http_server(
        &net.external,
        SocketAddr::V6(SocketAddrV6::new(SERVER_V6, 8080, 0, 0)),
    );
    let udp6 = udp_echo_server(
        &net.external,
        SocketAddr::V6(SocketAddrV6::new(SERVER_V6, 9999, 0, 0)),
    );
    println!("\nover IPv6 (each family leaves from its own egress address):");
    for (name, host, want) in [
        ("tenant-a", HOST_A, Some(EGRESS_A_V6)),
        ("tenant-b", HOST_B, Some(EGRESS_B_V6)),
        ("stranger", STRANGER, None),
    ] {
        exercise_v6(
            &mut check,
            &format!("{name} ({}):", ipv6_of(host)),
            &net.host(host).ns,
            want,
            (&http6, &udp6),
        );
    }

    println!("\nthe server's HTTP log:");
    for peer in http.peers().into_iter().chain(http6.peers()) {
        println!("  {peer} \"GET / HTTP/1.1\" 200");
    }
    let seen = capture.finish();
    let sources: BTreeSet<Ipv4Addr> = seen.iter().filter(|s| !s.outgoing).map(|s| s.src).collect();
    let internal: Vec<&Ipv4Addr> = sources
        .iter()
        .filter(|ip| ip.octets()[..2] == [172, 20])
        .collect();
    println!(
        "\ncapture on the server's interface: {} packets received, from {}",
        seen.iter().filter(|s| !s.outgoing).count(),
        sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !internal.is_empty() {
        println!("  FAILED: tenant addresses reached the outside: {internal:?}");
        check.failures += 1;
    }

    println!("\n$ egress-agent flows");
    print!("{}", agent.cli(&["flows"]).stdout);
    println!("\n$ egress-agent status");
    print!("{}", agent.cli(&["status"]).stdout);

    drop(agent);
    drop(net);
    println!(
        "\ncleaned up: agent stopped (programs detached, egress addresses removed), namespaces deleted"
    );
    if check.failures == 0 {
        println!("demo passed");
        ExitCode::SUCCESS
    } else {
        println!("demo FAILED: {} check(s)", check.failures);
        ExitCode::FAILURE
    }
}
