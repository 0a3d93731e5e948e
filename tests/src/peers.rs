//! Routers to run BFD against: FRR's bfdd and BIRD 2, each started in a
//! namespace with its sockets, pid files and logs in a private temporary
//! directory. Dropping one kills its processes and removes the directory,
//! also when a test fails.
//!
//! bfdd learns interfaces from zebra, so `Frr` runs a zebra of its own as
//! well: without it a peer configured on an interface never starts.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, unique_name};

pub const BFDD: &str = "/usr/lib/frr/bfdd";
pub const ZEBRA: &str = "/usr/lib/frr/zebra";
pub const VTYSH: &str = "vtysh";
pub const BIRD: &str = "bird";
pub const BIRDC: &str = "birdc";

/// A peer's view of its session with us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerState {
    Up,
    Down,
    Init,
    AdminDown,
    /// The peer lists no session for the address.
    Missing,
    Other(String),
}

/// What the interop tests need from a router.
pub trait BfdRouter {
    fn name(&self) -> &'static str;
    /// The command lines that started it, for the test's log.
    fn command_lines(&self) -> Vec<String>;
    fn state(&self) -> PeerState;
    /// The diagnostic our side last sent, as the router shows it, if it does.
    fn remote_diag(&self) -> Option<String>;
    /// Why the router's own side last went down, if it shows it.
    fn local_diag(&self) -> Option<String>;
    /// Its log files, for a failing test's output.
    fn logs(&self) -> String;
}

/// How often `wait_for_peer` asks the router.
const PEER_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Polls the router until `done` holds; returns how long that took. Fails
/// with the router's state and logs after `timeout`.
pub fn wait_for_peer(
    router: &dyn BfdRouter,
    what: &str,
    timeout: std::time::Duration,
    done: impl Fn(&PeerState) -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    loop {
        let state = router.state();
        if done(&state) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{}: no {what} within {timeout:?}; it reports {state:?}\n{}",
            router.name(),
            router.logs()
        );
        std::thread::sleep(PEER_POLL);
    }
}

/// Fails with a clear message when a program a test needs is missing.
pub fn require_program(program: &str, package: &str) {
    let found = if program.contains('/') {
        Path::new(program).exists()
    } else {
        which_in_path(program)
    };
    assert!(
        found,
        "{program} is not installed: install the {package} package (scripts/install-deps.sh does)"
    );
}

fn which_in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// A directory removed on drop, open to the unprivileged users FRR runs as.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(role: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(role));
        std::fs::create_dir(&path).expect("creating a temporary directory");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
            .expect("opening the temporary directory to frr");
        Self { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn join_str(&self, name: &str) -> String {
        self.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Starts `command` with its output in `log`; it gets SIGTERM when the
/// spawning thread ends, so an interrupted test run leaves no daemon
/// behind (best effort: a daemon that drops privileges, as FRR's do,
/// clears the setting). Returns the child and its command line.
pub fn spawn_tied(mut command: Command, log: &Path) -> (Child, String) {
    let command_line = format!("{command:?}");
    let out = std::fs::File::create(log).expect("daemon output file");
    let err = out.try_clone().expect("daemon output file");
    // SAFETY: prctl(2) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|err| panic!("starting {command_line}: {err}"));
    (child, command_line)
}

/// A daemon run in the foreground as our child; SIGTERM, then SIGKILL, on drop.
struct Daemon {
    child: Child,
    command_line: String,
}

impl Daemon {
    fn spawn(command: Command, log: &Path) -> Self {
        let (child, command_line) = spawn_tied(command, log);
        Self {
            child,
            command_line,
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_logs(dir: &TempDir, names: &[&str]) -> String {
    let mut all = String::new();
    for name in names {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        all.push_str(&format!("--- {name} ---\n{text}\n"));
    }
    all
}

/// BFD timers to configure on a router.
#[derive(Clone, Copy, Debug)]
pub struct RouterTimers {
    pub interval_ms: u32,
    pub multiplier: u8,
}

/// FRR: zebra and bfdd, configured through vtysh.
pub struct Frr {
    // Field order is drop order: the daemons stop before their directory goes.
    bfdd: Daemon,
    zebra: Daemon,
    ns_path: String,
    peer: IpAddr,
    configure: Vec<String>,
    dir: TempDir,
}

impl Frr {
    /// Starts zebra and bfdd in `ns` and configures a single-hop session
    /// with `peer` (either family) on `interface`.
    pub fn start(
        ns: &Netns,
        peer: impl Into<IpAddr>,
        interface: &str,
        timers: RouterTimers,
    ) -> Self {
        let peer = peer.into();
        require_program(BFDD, "frr");
        require_program(ZEBRA, "frr");
        require_program(VTYSH, "frr");
        let dir = TempDir::new("frr");
        let common = |daemon: &str| -> Vec<String> {
            vec![
                "-f".into(),
                "/dev/null".into(),
                "--vty_socket".into(),
                dir.join_str(""),
                "-i".into(),
                dir.join_str(&format!("{daemon}.pid")),
                "-z".into(),
                dir.join_str("zserv.api"),
                // No TCP vty: the namespace's loopback is not ours to use.
                "-P".into(),
                "0".into(),
                "--log".into(),
                format!("file:{}", dir.join_str(&format!("{daemon}.log"))),
            ]
        };
        let mut zebra_command = ns.command(ZEBRA);
        zebra_command.args(common("zebra"));
        let mut zebra = Daemon::spawn(zebra_command, &dir.join("zebra.out"));
        wait_for("zebra's API socket", Duration::from_secs(10), || {
            assert!(
                zebra.exited().is_none(),
                "zebra exited: {}",
                read_logs(&dir, &["zebra.out", "zebra.log"])
            );
            dir.join("zserv.api").exists()
        });
        let mut bfdd_command = ns.command(BFDD);
        bfdd_command
            .args(common("bfdd"))
            .args(["--bfdctl", &dir.join_str("bfdd.sock")]);
        let mut bfdd = Daemon::spawn(bfdd_command, &dir.join("bfdd.out"));
        wait_for("bfdd's vty socket", Duration::from_secs(10), || {
            assert!(
                bfdd.exited().is_none(),
                "bfdd exited: {}",
                read_logs(&dir, &["bfdd.out", "bfdd.log"])
            );
            dir.join("bfdd.vty").exists()
        });
        let configure = vec![
            "configure terminal".to_owned(),
            "bfd".to_owned(),
            format!("peer {peer} interface {interface}"),
            format!("receive-interval {}", timers.interval_ms),
            format!("transmit-interval {}", timers.interval_ms),
            format!("detect-multiplier {}", timers.multiplier),
            "end".to_owned(),
        ];
        let frr = Self {
            bfdd,
            zebra,
            ns_path: ns.path(),
            peer,
            configure,
            dir,
        };
        let configured = frr.vtysh(&frr.configure.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            configured.status.success() && configured.stdout.is_empty(),
            "configuring bfdd: {}{}",
            String::from_utf8_lossy(&configured.stdout),
            String::from_utf8_lossy(&configured.stderr)
        );
        frr
    }

    fn vtysh(&self, commands: &[&str]) -> Output {
        let mut command = crate::netns::command_in(&self.ns_path, VTYSH);
        command.args(["--vty_socket", &self.dir.join_str(""), "-d", "bfdd"]);
        for line in commands {
            command.args(["-c", line]);
        }
        command
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("running vtysh: {err}"))
    }

    /// The peer's entry in `show bfd peers json`.
    fn peer_json(&self) -> Option<serde_json::Value> {
        let output = self.vtysh(&["show bfd peers json"]);
        let peers: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        let peer = self.peer.to_string();
        peers
            .as_array()?
            .iter()
            .find(|entry| entry["peer"].as_str() == Some(peer.as_str()))
            .cloned()
    }
}

impl BfdRouter for Frr {
    fn name(&self) -> &'static str {
        "FRR bfdd"
    }

    fn command_lines(&self) -> Vec<String> {
        let mut lines = vec![
            self.zebra.command_line.clone(),
            self.bfdd.command_line.clone(),
        ];
        let mut vtysh = format!("vtysh --vty_socket {} -d bfdd", self.dir.join_str(""));
        for line in &self.configure {
            vtysh.push_str(&format!(" -c '{line}'"));
        }
        lines.push(vtysh);
        lines
    }

    fn state(&self) -> PeerState {
        let Some(entry) = self.peer_json() else {
            return PeerState::Missing;
        };
        match entry["status"].as_str() {
            Some("up") => PeerState::Up,
            Some("down") => PeerState::Down,
            Some("init") => PeerState::Init,
            Some("shutdown") => PeerState::AdminDown,
            other => PeerState::Other(format!("{other:?}")),
        }
    }

    fn remote_diag(&self) -> Option<String> {
        self.peer_json()?["remote-diagnostic"]
            .as_str()
            .map(str::to_owned)
    }

    fn local_diag(&self) -> Option<String> {
        self.peer_json()?["diagnostic"].as_str().map(str::to_owned)
    }

    fn logs(&self) -> String {
        read_logs(
            &self.dir,
            &["zebra.out", "zebra.log", "bfdd.out", "bfdd.log"],
        )
    }
}

/// BIRD 2 with a `protocol bfd` holding a static `neighbor` session: BIRD
/// runs BFD sessions only for a protocol's request or a `neighbor` line.
pub struct Bird {
    bird: Daemon,
    ns_path: String,
    peer: IpAddr,
    dir: TempDir,
}

impl Bird {
    pub fn start(
        ns: &Netns,
        router_id: Ipv4Addr,
        peer: impl Into<IpAddr>,
        interface: &str,
        timers: RouterTimers,
    ) -> Self {
        let peer = peer.into();
        require_program(BIRD, "bird2");
        require_program(BIRDC, "bird2");
        let dir = TempDir::new("bird");
        let config = format!(
            "router id {router_id};\n\
             log \"{log}\" all;\n\
             protocol device {{}}\n\
             protocol bfd {{\n\
             \x20 interface \"{interface}\" {{\n\
             \x20   min rx interval {interval} ms;\n\
             \x20   min tx interval {interval} ms;\n\
             \x20   multiplier {multiplier};\n\
             \x20 }};\n\
             \x20 neighbor {peer} dev \"{interface}\";\n\
             }}\n",
            log = dir.join_str("bird.log"),
            interval = timers.interval_ms,
            multiplier = timers.multiplier,
        );
        std::fs::write(dir.join("bird.conf"), config).expect("writing bird.conf");
        let mut command = ns.command(BIRD);
        command.args([
            "-f",
            "-c",
            &dir.join_str("bird.conf"),
            "-s",
            &dir.join_str("bird.ctl"),
            "-P",
            &dir.join_str("bird.pid"),
        ]);
        let mut bird = Daemon::spawn(command, &dir.join("bird.out"));
        let ns_path = ns.path();
        wait_for("BIRD's control socket", Duration::from_secs(10), || {
            assert!(
                bird.exited().is_none(),
                "bird exited: {}",
                read_logs(&dir, &["bird.out", "bird.log"])
            );
            dir.join("bird.ctl").exists()
        });
        Self {
            bird,
            ns_path,
            peer,
            dir,
        }
    }

    fn birdc(&self, args: &[&str]) -> Output {
        crate::netns::command_in(&self.ns_path, BIRDC)
            .args(["-s", &self.dir.join_str("bird.ctl")])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("running birdc: {err}"))
    }
}

impl BfdRouter for Bird {
    fn name(&self) -> &'static str {
        "BIRD"
    }

    fn command_lines(&self) -> Vec<String> {
        vec![
            self.bird.command_line.clone(),
            format!(
                "birdc -s {} show bfd sessions",
                self.dir.join_str("bird.ctl")
            ),
            format!(
                "bird.conf:\n{}",
                std::fs::read_to_string(self.dir.join("bird.conf")).unwrap_or_default()
            ),
        ]
    }

    /// From `show bfd sessions`: a line per session, "address interface
    /// state since interval timeout".
    fn state(&self) -> PeerState {
        let output = self.birdc(&["show", "bfd", "sessions"]);
        let text = String::from_utf8_lossy(&output.stdout);
        let peer = self.peer.to_string();
        let Some(line) = text
            .lines()
            .find(|line| line.split_whitespace().next() == Some(peer.as_str()))
        else {
            return PeerState::Missing;
        };
        match line.split_whitespace().nth(2) {
            Some("Up") => PeerState::Up,
            Some("Down") => PeerState::Down,
            Some("Init") => PeerState::Init,
            Some("AdminDown") => PeerState::AdminDown,
            other => PeerState::Other(format!("{other:?}")),
        }
    }

    /// `show bfd sessions` has no diagnostics.
    fn remote_diag(&self) -> Option<String> {
        None
    }

    fn local_diag(&self) -> Option<String> {
        None
    }

    fn logs(&self) -> String {
        read_logs(&self.dir, &["bird.out", "bird.log"])
    }
}
