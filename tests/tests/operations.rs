//! The agent where and as operators run it: under `ip netns exec` (no
//! bpffs at /sys/fs/bpf), state files that never claim `serving` for a
//! dataplane nobody serves, and ARP isolation for tenants selected by
//! their macvlan next hop (the seeds' gateway VM). Real agent binary,
//! namespaces of their own, no offload tuning. Needs root.

use std::{
    fs::File, net::Ipv4Addr, os::fd::AsRawFd as _, path::PathBuf, process::Command, time::Duration,
};

use egress_tests::{
    agent::{Agent, assert_no_dataplane_left, wait_until},
    netns::{Netns, run_ok},
    require_root,
    traffic::{Capture, ping},
};

const HOST: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 1);
const EGRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);

/// Veths at kernel defaults: `auto` runs the packet path at TC.
const CONFIG: &str = "\
interfaces: {internal: [eth0], external: eth1}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
conntrack: {maxFlows: 1024}
";

/// host (172.20.10.10) ── eth0 [gateway] eth1 ── server (192.168.31.1);
/// the server has no route back to the host's network.
struct Small {
    host: Netns,
    gateway: Netns,
    server: Netns,
}

fn small() -> Small {
    let host = Netns::new("host");
    let gateway = Netns::new("gw");
    let server = Netns::new("srv");
    host.veth("eth0", &gateway, "eth0");
    gateway.veth("eth1", &server, "eth0");
    host.ip(&["addr", "add", &format!("{HOST}/24"), "dev", "eth0"]);
    host.ip(&["route", "add", "default", "via", "172.20.10.1"]);
    gateway.ip(&["addr", "add", "172.20.10.1/24", "dev", "eth0"]);
    gateway.ip(&["addr", "add", "192.168.31.2/24", "dev", "eth1"]);
    gateway.ip(&["route", "add", "default", "via", &SERVER.to_string()]);
    server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "eth0"]);
    Small {
        host,
        gateway,
        server,
    }
}

fn run_dir(agent: &Agent) -> PathBuf {
    PathBuf::from(format!("/run/{}", agent.instance))
}

fn live_json(agent: &Agent) -> Option<serde_json::Value> {
    let bytes = std::fs::read(run_dir(agent).join("live.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Waits until the agent's live view says it serves, written by it.
fn wait_live_serving(agent: &Agent) {
    let pid = agent.pid().map(u64::from);
    wait_until("live.json saying serving", Duration::from_secs(15), || {
        live_json(agent)
            .is_some_and(|live| live["health"]["state"] == "serving" && live["pid"].as_u64() == pid)
    });
}

/// `stat -f` of /sys/fs/bpf as a command run through `ip netns exec` sees it.
fn fs_type_under_ip_netns_exec(ns: &Netns) -> String {
    let out = run_ok(Command::new("ip").args([
        "netns",
        "exec",
        ns.name(),
        "stat",
        "-f",
        "-c",
        "%t",
        "/sys/fs/bpf",
    ]));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn under_ip_netns_exec_the_agent_mounts_bpffs_and_serves() {
    if !require_root() {
        return;
    }
    let net = small();
    assert_ne!(
        fs_type_under_ip_netns_exec(&net.gateway),
        "cafe4a11",
        "premise: `ip netns exec` leaves no bpffs at /sys/fs/bpf"
    );
    let mut agent = Agent::start_with_ip_netns_exec(&net.gateway, CONFIG, &[]);
    assert!(
        agent.log().contains("mounted bpffs"),
        "the agent says it mounted bpffs:\n{}",
        agent.log()
    );
    assert!(
        !PathBuf::from(format!("/sys/fs/bpf/{}", agent.instance)).exists(),
        "the pins are in the agent's own bpffs, not the host's"
    );

    // It serves: the host's echo requests leave from the egress address,
    // and the replies (the server has no route to the host) come back.
    let capture = Capture::start(&net.server, "eth0");
    assert!(ping(&net.host, SERVER, 3), "ping through the gateway");
    let seen = capture.finish();
    assert!(
        seen.iter()
            .any(|s| !s.outgoing && s.proto == 1 && s.src == EGRESS),
        "the server saw the egress address: {seen:#?}"
    );
    assert!(
        seen.iter().all(|s| s.src != HOST),
        "the host's address never left: {seen:#?}"
    );

    // `status` finds the pins through the agent, from the host's mount
    // namespace and from another `ip netns exec`.
    wait_live_serving(&agent);
    let status = agent.status();
    assert_eq!(status["running"], true, "{status:#}");
    assert_eq!(status["live"]["health"]["state"], "serving", "{status:#}");
    assert!(status["counters"]["out_translated"].as_u64() > Some(0));
    let out = run_ok(
        Command::new("ip")
            .args(["netns", "exec", net.gateway.name()])
            .arg(egress_tests::agent::agent_binary())
            .args(["--instance", &agent.instance, "status", "--json"]),
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["live"]["health"]["state"], "serving", "{status:#}");

    assert!(agent.stop().success(), "{}", agent.log());
    assert_no_dataplane_left(&net.gateway);
}

#[test]
fn under_ip_netns_exec_keep_dataplane_cannot_keep_it_and_a_stop_removes_everything() {
    if !require_root() {
        return;
    }
    let net = small();
    let mut agent = Agent::start_with_ip_netns_exec(&net.gateway, CONFIG, &["--keep-dataplane"]);
    assert!(
        agent
            .log()
            .contains("--keep-dataplane cannot keep this dataplane"),
        "{}",
        agent.log()
    );
    wait_live_serving(&agent);
    assert!(agent.stop().success(), "{}", agent.log());
    // The pins went with the agent's mount namespace, and the programs with
    // them: nothing may stay that would forward tenant traffic untranslated.
    assert_no_dataplane_left(&net.gateway);
    let addrs = net.gateway.ip(&["-4", "-o", "addr", "show", "dev", "eth1"]);
    let text = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        !text.contains(&EGRESS.to_string()),
        "egress address left: {text}"
    );
    let forwarding = net
        .gateway
        .run("cat", &["/proc/sys/net/ipv4/conf/eth0/forwarding"]);
    assert_eq!(String::from_utf8_lossy(&forwarding.stdout).trim(), "0");
    assert_eq!(live_json(&agent), None, "no live view claims anything");
}

#[test]
fn sigterm_removes_the_live_view_with_the_dataplane() {
    if !require_root() {
        return;
    }
    let net = small();
    let mut agent = Agent::start(&net.gateway, CONFIG);
    wait_live_serving(&agent);
    assert!(agent.stop().success(), "{}", agent.log());
    assert_eq!(
        live_json(&agent),
        None,
        "no live view is left for a dataplane that is gone"
    );
    assert!(
        !run_dir(&agent).exists(),
        "the run directory is removed: {:?}",
        std::fs::read_dir(run_dir(&agent))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
}

#[test]
fn sigterm_with_keep_dataplane_says_the_agent_stopped() {
    if !require_root() {
        return;
    }
    let net = small();
    let mut agent = Agent::start_with(&net.gateway, CONFIG, &["--keep-dataplane"]);
    wait_live_serving(&agent);
    let pid = agent.pid().map(u64::from);
    assert!(agent.stop().success(), "{}", agent.log());

    let live = live_json(&agent).expect("live.json stays, saying what happened");
    assert_eq!(live["health"]["state"], "agent_stopped", "{live:#}");
    assert_eq!(live["pid"].as_u64(), pid, "{live:#}");
    let status = agent.status();
    assert_eq!(status["running"], false, "{status:#}");
    assert_eq!(
        status["live"]["health"]["state"], "agent_stopped",
        "{status:#}"
    );
    let text = agent.cli(&["status"]);
    assert!(text.status.success(), "{}", text.stderr);
    assert!(
        text.stdout.contains("NOT RUNNING") && text.stdout.contains("dataplane: agent_stopped"),
        "{}",
        text.stdout
    );
    assert!(
        !text.stdout.contains("dataplane: serving"),
        "{}",
        text.stdout
    );
    // The dataplane itself was left serving, as asked.
    assert!(
        ping(&net.host, SERVER, 2),
        "the unattended dataplane serves"
    );
}

#[test]
fn status_does_not_believe_the_live_view_of_a_dead_agent() {
    if !require_root() {
        return;
    }
    let net = small();
    let mut agent = Agent::start(&net.gateway, CONFIG);
    wait_live_serving(&agent);
    agent.kill();
    // A killed agent cannot correct its file: it still says `serving`.
    let stale = live_json(&agent).expect("the killed agent's live.json");
    assert_eq!(stale["health"]["state"], "serving", "premise: {stale:#}");

    let status = agent.status();
    assert_eq!(status["running"], false, "{status:#}");
    assert!(status.get("live").is_none(), "{status:#}");

    // A new agent that holds the lock but has not published yet (it is
    // still loading) must not lend the dead one's file credibility.
    let lock = File::open(run_dir(&agent).join("lock")).expect("the lock file");
    // SAFETY: flock on a descriptor we own; released when `lock` drops.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(locked, 0, "taking the instance lock");
    let status = agent.status();
    assert_eq!(status["running"], true, "the lock is held: {status:#}");
    assert!(
        status.get("live").is_none(),
        "the dead writer's `serving` is not reported: {status:#}"
    );
    let text = agent.cli(&["status"]);
    assert!(
        !text.stdout.contains("dataplane: serving"),
        "{}",
        text.stdout
    );
    drop(lock);
}

/// The seeds' gateway VM: the router reaches each tenant's next hop, a
/// macvlan with a /32 in the parent NIC's subnet, by ARP.
const MACVLAN_CONFIG: &str = "\
interfaces: {internal: [eth0], external: eth1}
tenants:
  - name: blue
    sources: [10.128.0.0/14]
    egressIPs: [192.168.31.101]
    ingress: [{interface: mv-a}]
  - name: red
    sources: [10.128.0.0/14]
    egressIPs: [192.168.31.102]
    ingress: [{interface: mv-b}]
conntrack: {maxFlows: 1024}
";

const NEXT_HOPS: [(&str, &str); 2] = [("mv-a", "10.70.0.11"), ("mv-b", "10.70.0.12")];

fn read_sysctl(ns: &Netns, interface: &str, name: &str) -> String {
    let out = ns.run(
        "cat",
        &[&format!("/proc/sys/net/ipv4/conf/{interface}/{name}")],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Every MAC that answers the router's ARP request for `addr`.
fn arp_answers(router: &Netns, addr: &str) -> Vec<String> {
    let out = router.try_run("arping", &["-c", "1", "-I", "eth0", addr]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut macs: Vec<String> = text
        .lines()
        .filter(|line| line.contains("reply from"))
        .filter_map(|line| {
            let start = line.find('[')?;
            let end = line.find(']')?;
            Some(line.get(start + 1..end)?.to_ascii_lowercase())
        })
        .collect();
    macs.sort();
    macs.dedup();
    macs
}

/// The MAC the router's kernel resolved `addr` to, after a ping.
fn resolved_by_router(router: &Netns, addr: &str) -> String {
    router.ip(&["neigh", "flush", "dev", "eth0"]);
    router.try_run("ping", &["-c", "1", "-W", "1", "-n", addr]);
    let out = router.ip(&["neigh", "show", addr, "dev", "eth0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|word| *word != "lladdr")
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn macvlan_next_hops_answer_arp_with_their_own_mac_while_the_agent_runs() {
    if !require_root() {
        return;
    }
    let gateway = Netns::new("gw");
    let router = Netns::new("rtr");
    let external = Netns::new("ext");
    router.veth("eth0", &gateway, "eth0");
    gateway.veth("eth1", &external, "eth0");
    router.ip(&["addr", "add", "10.70.0.254/24", "dev", "eth0"]);
    gateway.ip(&["addr", "add", "10.70.0.1/24", "dev", "eth0"]);
    gateway.ip(&["addr", "add", "192.168.31.2/24", "dev", "eth1"]);
    external.ip(&["addr", "add", "192.168.31.1/24", "dev", "eth0"]);
    for (macvlan, addr) in NEXT_HOPS {
        gateway.ip(&[
            "link", "add", macvlan, "link", "eth0", "type", "macvlan", "mode", "bridge",
        ]);
        gateway.ip(&["addr", "add", &format!("{addr}/32"), "dev", macvlan]);
        gateway.ip(&["link", "set", macvlan, "up"]);
    }
    // A value the agent must put back as it found it, not as the default.
    gateway.run("sysctl", &["-qw", "net.ipv4.conf.mv-b.arp_announce=1"]);
    let parent_mac = format_mac(gateway.mac("eth0"));
    let own_mac = |macvlan: &str| format_mac(gateway.mac(macvlan));

    // Premise: with the defaults the parent answers for the macvlans'
    // addresses with its own MAC, and the router believes it.
    for (_, addr) in NEXT_HOPS {
        assert!(
            arp_answers(&router, addr).contains(&parent_mac),
            "premise: the parent answers for {addr} by default"
        );
    }
    assert_eq!(
        resolved_by_router(&router, NEXT_HOPS[0].1),
        parent_mac,
        "premise: the router sends the tenant to the parent's MAC by default"
    );

    let mut agent = Agent::start(&gateway, MACVLAN_CONFIG);
    for interface in ["eth0", "mv-a", "mv-b"] {
        assert_eq!(
            read_sysctl(&gateway, interface, "arp_ignore"),
            "1",
            "{interface}"
        );
        assert_eq!(
            read_sysctl(&gateway, interface, "arp_announce"),
            "2",
            "{interface}"
        );
    }
    assert_eq!(
        read_sysctl(&gateway, "eth1", "arp_ignore"),
        "0",
        "the external interface carries no ingress port"
    );
    assert!(
        agent.log().contains("net.ipv4.conf.mv-a.arp_ignore"),
        "the agent logs what it set:\n{}",
        agent.log()
    );
    for (macvlan, addr) in NEXT_HOPS {
        assert_eq!(
            arp_answers(&router, addr),
            [own_mac(macvlan)],
            "only {macvlan} answers for {addr}"
        );
        assert_eq!(
            resolved_by_router(&router, addr),
            own_mac(macvlan),
            "the router resolves {addr} to {macvlan}"
        );
    }

    assert!(agent.stop().success(), "{}", agent.log());
    for interface in ["eth0", "mv-a", "mv-b"] {
        assert_eq!(
            read_sysctl(&gateway, interface, "arp_ignore"),
            "0",
            "{interface}"
        );
    }
    assert_eq!(read_sysctl(&gateway, "eth0", "arp_announce"), "0");
    assert_eq!(read_sysctl(&gateway, "mv-a", "arp_announce"), "0");
    assert_eq!(
        read_sysctl(&gateway, "mv-b", "arp_announce"),
        "1",
        "restored to what it was before the agent"
    );
}

#[test]
fn an_ingress_macvlan_without_an_address_is_refused_by_name() {
    if !require_root() {
        return;
    }
    let gateway = Netns::new("gw");
    let peer = Netns::new("peer");
    peer.veth("eth0", &gateway, "eth0");
    gateway.veth("eth1", &peer, "eth1");
    gateway.ip(&[
        "link", "add", "mv-a", "link", "eth0", "type", "macvlan", "mode", "bridge",
    ]);
    gateway.ip(&[
        "link", "add", "mv-b", "link", "eth0", "type", "macvlan", "mode", "bridge",
    ]);
    gateway.ip(&["addr", "add", "10.70.0.12/32", "dev", "mv-b"]);
    let config = egress_tests::agent::ConfigFile::new(MACVLAN_CONFIG);
    let path = config.path.to_str().expect("utf-8 path");
    let instance = egress_tests::netns::unique_name("agent");
    for command in ["check", "run"] {
        let out =
            egress_tests::agent::run_to_exit(&gateway, &instance, &[command, "--config", path]);
        assert_eq!(out.status.code(), Some(2), "{command}: {out:?}");
        assert!(
            out.stderr
                .contains("tenants[0] (blue).ingress[0].interface: mv-a has no IPv4 address"),
            "{command}: {}",
            out.stderr
        );
    }
    // `run` took the instance's lock before it read the file.
    egress_tests::agent::run_to_exit(&gateway, &instance, &["cleanup"]);
    assert_eq!(
        read_sysctl(&gateway, "eth0", "arp_ignore"),
        "0",
        "a refused configuration changes nothing"
    );
}
