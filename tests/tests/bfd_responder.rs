//! The Kube-OVN BFD responder (`egress-agent kube-ovn bfdd-supervisor`)
//! as a gateway pod runs it: started the way Kube-OVN's controller starts
//! the bfdd container (its environment, UID 65534 with only NET_ADMIN,
//! NET_RAW and NET_BIND_SERVICE), in namespace "pod", against FRR's bfdd in
//! namespace "ovn" in the role of OVN's BFD port (it opens the session;
//! the pod only answers). The dataplane is attached as the egress
//! gateway's init container attaches it (netlink cls_bpf, no process).
//!
//! - With the dataplane attached the session comes up; deleting the filter
//!   takes it down (AdminDown, diag 6) within FRR's detection time plus the
//!   responder's check interval; attaching again brings it back.
//! - Kube-OVN's probes (`kube-ovn-bfdd-supervisor live|ready|status`,
//!   `/livez`, `bfdd-control status`, `bfdd-prestart.sh`,
//!   `bfdd-healthcheck.sh`) give the answers its controller expects,
//!   before a peer called and after.
//!
//! Needs root and FRR.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

use egress_agent::kube_ovn_pod::bfdd::CHECK_INTERVAL;
use egress_common::names;
use egress_tests::{
    agent::{agent_binary, http_get, run_cli},
    netns::{Netns, command_in, unique_name},
    peers::{BfdRouter, Frr, PeerState, RouterTimers, TempDir, spawn_tied, wait_for_peer},
    require_root,
};

const POD: Ipv4Addr = Ipv4Addr::new(10, 255, 254, 2);
const OVN: Ipv4Addr = Ipv4Addr::new(10, 255, 254, 1);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x254, 0, 0, 0, 0, 0, 2);
const OVN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x254, 0, 0, 0, 0, 0, 1);
const POD_LINK: &str = "rsp-pod";
const OVN_LINK: &str = "rsp-ovn";
const INTERVAL_MS: u32 = 100;
const MULTIPLIER: u8 = 3;
/// FRR's detection time: its required interval times our multiplier.
const DETECTION: Duration = Duration::from_millis(300);
/// Polling FRR (a vtysh run every 20 ms) and scheduling.
const MARGIN: Duration = Duration::from_millis(300);
const POLL: Duration = Duration::from_millis(20);
const COME_UP: Duration = Duration::from_secs(15);
/// The capabilities Kube-OVN leaves the bfdd container.
const CAPS: &str = "-all,+net_admin,+net_raw,+net_bind_service";

/// Kube-OVN's scripts, as the image installs them under /kube-ovn.
fn image_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kube-ovn/image")
}

fn link() -> (Netns, Netns) {
    let pod = Netns::new("pod");
    let ovn = Netns::new("ovn");
    pod.veth(POD_LINK, &ovn, OVN_LINK);
    pod.ip(&["addr", "add", &format!("{POD}/24"), "dev", POD_LINK]);
    ovn.ip(&["addr", "add", &format!("{OVN}/24"), "dev", OVN_LINK]);
    pod.run("tc", &["qdisc", "add", "dev", POD_LINK, "clsact"]);
    // The pod's external interface, for the dataplane's external side.
    pod.veth("net1", &ovn, "pod-ext");
    pod.ip(&["addr", "add", "172.17.0.11/24", "dev", "net1"]);
    (pod, ovn)
}

/// The dataplane as the egress gateway's init container attaches it
/// (`egress-agent kube-ovn attach-egress-gateway`, what
/// `init-vpc-egress-gateway.sh` runs): netlink filters that stay without a
/// process, on the pod's `net1` (`link`). Dropping the guard removes the
/// instance's pins.
fn attach_dataplane(pod: &Netns) -> AttachedDataplane {
    let instance = unique_name("rsp");
    let attached = run_cli(
        &pod.path(),
        &instance,
        &[
            "kube-ovn",
            "attach-egress-gateway",
            "--internal",
            POD_LINK,
            "--external",
            "net1",
            "--egress-ip",
            "172.17.0.11",
        ],
    );
    assert!(
        attached.status.success(),
        "attach-egress-gateway: {}{}",
        attached.stdout,
        attached.stderr
    );
    let shown = String::from_utf8_lossy(
        &pod.run("tc", &["filter", "show", "dev", POD_LINK, "ingress"])
            .stdout,
    )
    .into_owned();
    // What the responder reads: `filter protocol all pref 2 bpf chain 0
    // handle 0x1 tc_outbound direct-action ...`.
    assert!(
        shown.contains(&format!(
            "bpf chain 0 handle 0x1 {}",
            names::PROG_TC_OUTBOUND
        )),
        "tc does not show a cls_bpf tc_outbound: {shown}"
    );
    AttachedDataplane {
        ns_path: pod.path(),
        instance,
    }
}

struct AttachedDataplane {
    ns_path: String,
    instance: String,
}

impl Drop for AttachedDataplane {
    fn drop(&mut self) {
        let _ = run_cli(&self.ns_path, &self.instance, &["cleanup"]);
    }
}

fn detach_dataplane(pod: &Netns) {
    pod.run("tc", &["filter", "del", "dev", POD_LINK, "ingress"]);
}

/// Kube-OVN's `POD_IPS` and `BFD_PEER_IPS` for an IPv4 pod.
fn ipv4_pod() -> Vec<(&'static str, String)> {
    vec![
        ("POD_IPS", POD.to_string()),
        ("BFD_PEER_IPS", OVN.to_string()),
    ]
}

/// A command as the bfdd container runs it: inside `pod`, UID/GID 65534,
/// only Kube-OVN's capabilities, Kube-OVN's environment (`addresses` its
/// `POD_IPS` and `BFD_PEER_IPS`).
fn as_container(
    pod: &Netns,
    dir: &TempDir,
    addresses: &[(&str, String)],
    program: &str,
    args: &[&str],
) -> Command {
    let mut command = command_in(&pod.path(), "setpriv");
    let agent_dir = agent_binary()
        .parent()
        .expect("agent directory")
        .to_path_buf();
    let path = format!(
        "{}:{}:/usr/sbin:/usr/bin:/sbin:/bin",
        image_dir().display(),
        agent_dir.display()
    );
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &format!("--inh-caps={CAPS}"),
            &format!("--ambient-caps={CAPS}"),
            &format!("--bounding-set={CAPS}"),
            "--",
            program,
        ])
        .args(args)
        .env_clear()
        .env("PATH", path)
        .envs(addresses.iter().map(|(name, value)| (name, value)))
        .env("BFD_MIN_TX", INTERVAL_MS.to_string())
        .env("BFD_MIN_RX", INTERVAL_MS.to_string())
        .env("BFD_MULTI", MULTIPLIER.to_string())
        .env("BFDD_SUPERVISOR_SOCKET", dir.join("control.sock"))
        .env("EGRESS_LOG", "debug");
    command
}

fn run_in_container(
    pod: &Netns,
    dir: &TempDir,
    addresses: &[(&str, String)],
    program: &str,
    args: &[&str],
) -> Output {
    as_container(pod, dir, addresses, program, args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("running {program}: {err}"))
}

fn text(output: &Output) -> String {
    format!(
        "exit {}; stdout: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The responder process; SIGTERM on drop (a process that changed its
/// credentials loses PR_SET_PDEATHSIG, so the drop is what stops it).
struct Responder {
    child: Child,
    dir: TempDir,
    addresses: Vec<(&'static str, String)>,
}

impl Responder {
    /// Starts it as the container command `command` (Kube-OVN's
    /// supervisor or its older start script) and waits for the socket.
    fn start(pod: &Netns, command: &[&str]) -> Self {
        Self::start_with(pod, command, ipv4_pod())
    }

    /// `start` with the pod's and peers' addresses given.
    fn start_with(pod: &Netns, command: &[&str], addresses: Vec<(&'static str, String)>) -> Self {
        let dir = TempDir::new("bfdr");
        let image = image_dir();
        let program = image.join(command[0]);
        let program = program.to_str().expect("utf-8 path");
        let (child, _) = spawn_tied(
            as_container(pod, &dir, &addresses, program, &command[1..]),
            &dir.join("responder.log"),
        );
        let mut responder = Self {
            child,
            dir,
            addresses,
        };
        let started = Instant::now();
        while !responder.dir.join("control.sock").exists() {
            assert!(
                responder.child.try_wait().expect("wait").is_none(),
                "the responder exited: {}",
                responder.log()
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no control socket: {}",
                responder.log()
            );
            std::thread::sleep(POLL);
        }
        // The socket is there, so setpriv has exec'd the agent.
        responder.assert_unprivileged();
        responder
    }

    /// What Kube-OVN's container has: UID 65534 and NET_BIND_SERVICE,
    /// NET_ADMIN, NET_RAW (bits 10, 12, 13), nothing that reaches bpf().
    fn assert_unprivileged(&self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the responder's /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(field("Uid:"), vec!["65534"; 4], "{status}");
        assert_eq!(field("CapEff:"), vec!["0000000000003400"], "{status}");
        assert_eq!(field("CapBnd:"), vec!["0000000000003400"], "{status}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("responder.log")).unwrap_or_default()
    }

    fn probe(&self, pod: &Netns, program: &str, args: &[&str]) -> Output {
        let image = image_dir();
        let path = image.join(program);
        let program = if path.exists() {
            path.to_str().expect("utf-8 path").to_owned()
        } else {
            program.to_owned()
        };
        run_in_container(pod, &self.dir, &self.addresses, &program, args)
    }

    /// `kube-ovn-bfdd-supervisor status`, parsed.
    fn status(&self, pod: &Netns) -> serde_json::Value {
        let output = self.probe(pod, "kube-ovn-bfdd-supervisor", &["status"]);
        assert!(output.status.success(), "status: {}", text(&output));
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|err| panic!("status is not JSON ({err}): {}", text(&output)))
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("responder log:\n{}", self.log());
        }
    }
}

fn start_ovn(ovn: &Netns) -> Frr {
    start_ovn_towards(ovn, POD.into())
}

fn start_ovn_towards(ovn: &Netns, pod: std::net::IpAddr) -> Frr {
    Frr::start(
        ovn,
        pod,
        OVN_LINK,
        RouterTimers {
            interval_ms: INTERVAL_MS,
            multiplier: MULTIPLIER,
        },
    )
}

fn assert_exit(output: &Output, success: bool, what: &str) {
    assert_eq!(output.status.success(), success, "{what}: {}", text(output));
}

#[test]
fn sessions_follow_the_dataplane_and_probes_answer_as_kube_ovn_expects() {
    if !require_root() {
        return;
    }
    let (pod, ovn) = link();
    let dataplane = attach_dataplane(&pod);
    let responder = Responder::start(&pod, &["kube-ovn-bfdd-supervisor", "run"]);
    let frr = start_ovn(&ovn);

    wait_for_peer(&frr, "session Up", COME_UP, |s| *s == PeerState::Up);
    let status = responder.status(&pod);
    assert_eq!(status["Live"], true, "{status}");
    assert_eq!(status["Ready"], true, "{status}");
    assert_eq!(status["Sessions"][0]["Pair"]["Local"], POD.to_string());
    assert_eq!(status["Sessions"][0]["Pair"]["Remote"], OVN.to_string());
    assert_eq!(status["Sessions"][0]["State"], "Up");
    assert_eq!(status["Dataplane"]["Attached"], true, "{status}");
    for probe in ["live", "ready"] {
        let output = responder.probe(&pod, "kube-ovn-bfdd-supervisor", &[probe]);
        assert_exit(&output, true, probe);
        assert!(
            output.stdout.is_empty(),
            "{probe} prints nothing: {}",
            text(&output)
        );
    }
    assert_eq!(
        http_get(&pod, &format!("{POD}:10669"), "/livez"),
        (200, String::new())
    );
    let (code, metrics) = http_get(&pod, &format!("{POD}:10669"), "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("kube_ovn_bfdd_up_sessions 1"), "{metrics}");
    assert!(metrics.contains("egress_dataplane_attached 1"), "{metrics}");
    // The older probes: prestart sets what the environment said (no
    // restart, the session stays Up), healthcheck and readiness pass.
    let output = responder.probe(
        &pod,
        "bash",
        &[image_dir()
            .join("bfdd-prestart.sh")
            .to_str()
            .expect("utf-8")],
    );
    assert_exit(&output, true, "bfdd-prestart.sh");
    let output = responder.probe(
        &pod,
        "bash",
        &[image_dir()
            .join("bfdd-healthcheck.sh")
            .to_str()
            .expect("utf-8")],
    );
    assert_exit(&output, true, "bfdd-healthcheck.sh");
    let output = responder.probe(&pod, "bfdd-control", &["status"]);
    assert_exit(&output, true, "bfdd-control status");
    let listing = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(listing.starts_with("There are 1 sessions:\n"), "{listing}");
    assert!(
        listing.contains(&format!(" id=1 local={POD} (p) remote={OVN} state=Up")),
        "{listing}"
    );
    assert_eq!(
        frr.state(),
        PeerState::Up,
        "prestart must not flap the session"
    );

    // The dataplane goes: OVN must see the session down within its
    // detection time (we say AdminDown at the next check; the detection
    // time is the bound should that packet be lost).
    detach_dataplane(&pod);
    let took = wait_for_peer(
        &frr,
        "session down",
        DETECTION + MARGIN + CHECK_INTERVAL,
        |s| *s != PeerState::Up,
    );
    eprintln!("FRR saw the session leave Up {took:?} after the filter was deleted");
    if let Some(diag) = frr.remote_diag() {
        assert_eq!(diag, "concatenated path down", "the diag FRR saw");
    }
    let status = responder.status(&pod);
    assert_eq!(status["Sessions"][0]["State"], "AdminDown", "{status}");
    assert_eq!(status["Dataplane"]["Attached"], false, "{status}");
    assert_exit(
        &responder.probe(&pod, "kube-ovn-bfdd-supervisor", &["live"]),
        true,
        "live while detached",
    );
    let output = responder.probe(&pod, "kube-ovn-bfdd-supervisor", &["ready"]);
    assert_exit(&output, false, "ready while detached");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("expected BFD sessions are not ready"),
        "{}",
        text(&output)
    );
    // FRR stays down while the dataplane is away, beyond a detection time.
    std::thread::sleep(DETECTION * 3);
    assert_ne!(frr.state(), PeerState::Up);
    drop(dataplane);

    let _dataplane = attach_dataplane(&pod);
    wait_for_peer(&frr, "session Up again", COME_UP, |s| *s == PeerState::Up);
    assert_eq!(responder.status(&pod)["Sessions"][0]["State"], "Up");
}

/// A dual-stack pod (Kube-OVN's `POD_IPS` and `BFD_PEER_IPS` then hold
/// both families): OVN's IPv6 BFD port gets its session, answered from
/// the pod's IPv6 address, and it follows the dataplane as IPv4's does.
#[test]
fn a_dual_stack_pod_answers_ovn_over_ipv6() {
    if !require_root() {
        return;
    }
    let (pod, ovn) = link();
    pod.ip(&["addr", "add", &format!("{POD_V6}/64"), "dev", POD_LINK]);
    ovn.ip(&["addr", "add", &format!("{OVN_V6}/64"), "dev", OVN_LINK]);
    let deadline = Instant::now() + Duration::from_secs(10);
    pod.wait_ipv6_settled(deadline);
    ovn.wait_ipv6_settled(deadline);
    let _dataplane = attach_dataplane(&pod);
    let responder = Responder::start_with(
        &pod,
        &["kube-ovn-bfdd-supervisor", "run"],
        vec![
            ("POD_IPS", format!("{POD},{POD_V6}")),
            ("BFD_PEER_IPS", format!("{OVN},{OVN_V6}")),
        ],
    );
    let frr = start_ovn_towards(&ovn, POD_V6.into());
    wait_for_peer(&frr, "IPv6 session Up", COME_UP, |s| *s == PeerState::Up);
    let status = responder.status(&pod);
    let sessions = status["Sessions"].as_array().expect("sessions");
    let ipv6 = sessions
        .iter()
        .find(|s| s["Pair"]["Remote"] == OVN_V6.to_string())
        .unwrap_or_else(|| panic!("no session with {OVN_V6}: {status}"));
    assert_eq!(ipv6["Pair"]["Local"], POD_V6.to_string(), "{status}");
    assert_eq!(ipv6["State"], "Up", "{status}");
    let listing =
        String::from_utf8_lossy(&responder.probe(&pod, "bfdd-control", &["status"]).stdout)
            .into_owned();
    assert!(
        listing.contains(&format!("local={POD_V6} (p) remote={OVN_V6} state=Up")),
        "{listing}"
    );
    detach_dataplane(&pod);
    wait_for_peer(
        &frr,
        "IPv6 session down",
        DETECTION + MARGIN + CHECK_INTERVAL,
        |s| *s != PeerState::Up,
    );
    if let Some(diag) = frr.remote_diag() {
        assert_eq!(diag, "concatenated path down", "the diag FRR saw");
    }
}

#[test]
fn before_ovn_calls_the_pod_stays_silent_and_the_old_probes_say_so() {
    if !require_root() {
        return;
    }
    let (pod, ovn) = link();
    let _dataplane = attach_dataplane(&pod);
    // The older container command.
    let responder = Responder::start(&pod, &["start-bfdd.sh"]);
    let output = responder.probe(
        &pod,
        "bash",
        &[image_dir()
            .join("bfdd-prestart.sh")
            .to_str()
            .expect("utf-8")],
    );
    assert_exit(&output, true, "bfdd-prestart.sh");
    // Passive: nothing leaves the pod towards OVN until OVN calls.
    let capture = ovn
        .command("timeout")
        .args([
            "1", "tcpdump", "-c", "1", "-n", "-i", OVN_LINK, "udp", "port", "3784",
        ])
        .output()
        .expect("tcpdump");
    assert!(
        String::from_utf8_lossy(&capture.stderr).contains("listening on"),
        "tcpdump did not run: {}",
        text(&capture)
    );
    assert!(
        !String::from_utf8_lossy(&capture.stdout).contains("3784"),
        "the pod sent BFD before being called: {}",
        text(&capture)
    );
    // No session yet: "There are 0 sessions:" (healthcheck fails, as
    // Kube-OVN's does), readiness `bfdd-control status` passes, the
    // supervisor is live but not ready.
    let output = responder.probe(&pod, "bfdd-control", &["status"]);
    assert_exit(&output, true, "bfdd-control status");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "There are 0 sessions:\n"
    );
    let output = responder.probe(
        &pod,
        "bash",
        &[image_dir()
            .join("bfdd-healthcheck.sh")
            .to_str()
            .expect("utf-8")],
    );
    assert_exit(&output, false, "bfdd-healthcheck.sh without sessions");
    assert_exit(
        &responder.probe(&pod, "kube-ovn-bfdd-supervisor", &["live"]),
        true,
        "live",
    );
    assert_exit(
        &responder.probe(&pod, "kube-ovn-bfdd-supervisor", &["ready"]),
        false,
        "ready",
    );
    assert_eq!(http_get(&pod, &format!("{POD}:10669"), "/livez").0, 200);
    // Unknown bfdd-control commands fail.
    assert_exit(
        &responder.probe(&pod, "bfdd-control", &["stop"]),
        false,
        "bfdd-control stop",
    );

    let frr = start_ovn(&ovn);
    wait_for_peer(&frr, "session Up", COME_UP, |s| *s == PeerState::Up);
    let output = responder.probe(
        &pod,
        "bash",
        &[image_dir()
            .join("bfdd-healthcheck.sh")
            .to_str()
            .expect("utf-8")],
    );
    assert_exit(&output, true, "bfdd-healthcheck.sh with a session");
}
