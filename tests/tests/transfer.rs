//! Long TCP transfers through the gateway and path-MTU discovery across a
//! narrower link beyond it. A Rust sender and receiver check every byte and
//! confirm delivery end to end; iperf3 (not ours) drives the same paths as
//! an independent peer. Needs root.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use std::net::SocketAddrV4;

use egress_tests::{
    agent::Agent,
    netns::Netns,
    require_root,
    topology::{FAR_SERVER, HOST_A, SERVER, Topology, seed_config},
    traffic::{Received, bulk_transfer},
};

/// An iperf3 server for one test, stopped on drop.
struct Iperf {
    child: Child,
}

impl Iperf {
    fn start(ns: &Netns, bind: &str) -> Self {
        let child = ns
            .command("iperf3")
            .args(["-s", "-B", bind, "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting iperf3 -s");
        // Ready once it listens; connecting to find out would be taken
        // for a client by iperf3.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let listening = ns.try_run("ss", &["-Hltn", "sport = :5201"]);
            if !listening.stdout.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child }
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an iperf3 client; returns (bytes sent, bytes received, retransmits).
fn iperf(ns: &Netns, server: &str, args: &[&str]) -> (u64, u64, u64) {
    let mut all = vec!["-c", server, "-p", "5201", "-J"];
    all.extend_from_slice(args);
    let out = ns.try_run("iperf3", &all);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "iperf3 output: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && report.get("error").is_none(),
        "iperf3 failed: {report}"
    );
    let end = &report["end"];
    (
        end["sum_sent"]["bytes"].as_u64().expect("bytes sent"),
        end["sum_received"]["bytes"]
            .as_u64()
            .expect("bytes received"),
        end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    )
}

const BULK: u64 = 256 << 20;

#[test]
fn a_long_tcp_transfer_completes_both_ways() {
    if !require_root() {
        return;
    }
    let net = Topology::seed();
    let agent = Agent::start(&net.gateway, &seed_config(4096));
    let host = &net.host(HOST_A).ns;
    for download in [false, true] {
        let received = bulk_transfer(
            host,
            &net.external,
            SocketAddrV4::new(SERVER, 7000 + u16::from(download)),
            BULK,
            download,
        )
        .unwrap_or_else(|err| panic!("transfer (download: {download}) failed: {err}"));
        assert_eq!(
            received,
            Received {
                bytes: BULK,
                intact: true
            },
            "download: {download}"
        );
    }
    // iperf3 through the same gateway, both ways, for 2 seconds each.
    let _server = Iperf::start(&net.external, &SERVER.to_string());
    let (sent, _, _) = iperf(host, &SERVER.to_string(), &["-t", "2"]);
    assert!(sent > 0);
    let (_, received, _) = iperf(host, &SERVER.to_string(), &["-t", "2", "-R"]);
    assert!(received > 0);
    assert_eq!(agent.counter("in_drop_no_flow"), 0, "no reply was refused");
    assert_eq!(
        agent.counter("out_drop_malformed") + agent.counter("in_drop_malformed"),
        0
    );
    let flows = agent.flows();
    assert!(
        flows.iter().all(|f| f["tenant"] == "tenant-a"),
        "{flows:#?}"
    );
}

#[test]
fn path_mtu_discovery_works_through_the_gateway() {
    if !require_root() {
        return;
    }
    let mut net = Topology::seed();
    let server = net.add_far_server(1280).to_string();
    let agent = Agent::start(&net.gateway, &seed_config(4096));
    let _iperf = Iperf::start(net.far.as_ref().expect("far server"), &server);
    let host = &net.host(HOST_A).ns;
    // Full-size segments from the tenant hit the 1280-byte hop: the router
    // answers frag-needed to the egress address, the gateway must hand it
    // to the tenant host, or the upload stalls.
    let far = net.far.as_ref().expect("far server");
    let received = bulk_transfer(
        host,
        far,
        SocketAddrV4::new(FAR_SERVER, 7002),
        32 << 20,
        false,
    )
    .expect("upload across the narrow hop");
    assert_eq!(
        received,
        Received {
            bytes: 32 << 20,
            intact: true
        }
    );
    let (sent, _, _) = iperf(host, &server, &["-n", "8M"]);
    assert!(sent >= 8 << 20);
    assert!(
        agent.counter("in_icmp_error_translated") > 0,
        "the router's frag-needed came back translated"
    );
    let route = host.ip(&["route", "get", &server]);
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains("mtu 1280"),
        "the tenant host learned the path MTU: {route}"
    );
}
