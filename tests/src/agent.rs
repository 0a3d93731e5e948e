//! The real `egress-agent` binary, run inside a namespace as a test needs it.

use std::{
    io::Read as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use egress_common::names;

use crate::netns::{Netns, command_in, unique_name};

/// Agent processes alive in this process, for `cleanup::on_signal`.
pub(crate) static LIVE: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Where the agent binary is: `EGRESS_AGENT_BIN`, or next to the test
/// binary's directory (`target/<profile>/egress-agent`).
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EGRESS_AGENT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("egress-agent");
    assert!(
        path.exists(),
        "{} does not exist: build it first with `cargo build -p egress-agent` (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A config file that is removed on drop.
pub struct ConfigFile {
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(yaml: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.yaml", unique_name("config")));
        std::fs::write(&path, yaml).expect("writing config");
        Self { path }
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a finished agent run said.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// What Kube-OVN's controller counts as success of a command it execs:
    /// exit 0 and nothing on stderr.
    pub fn succeeded(&self) -> bool {
        self.status.success() && self.stderr.is_empty()
    }
}

/// A running agent; stopped with SIGTERM (and its leftovers cleaned) on drop.
pub struct Agent {
    pub instance: String,
    pub config: ConfigFile,
    ns_path: String,
    /// Started through `ip netns exec <this namespace>`, as operators do,
    /// instead of entering the namespace directly.
    netns_exec: Option<String>,
    /// Extra arguments of `run`, kept for restarts.
    run_args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    /// Starts `egress-agent run` in `ns` and waits until it serves.
    pub fn start(ns: &Netns, yaml: &str) -> Self {
        Self::start_with(ns, yaml, &[])
    }

    /// Like [`Agent::start`], with more arguments for `run`.
    pub fn start_with(ns: &Netns, yaml: &str, run_args: &[&str]) -> Self {
        Self::start_as(ns, yaml, run_args, false)
    }

    /// Like [`Agent::start_with`], through `ip netns exec`, which gives the
    /// agent a mount namespace of its own with a fresh /sys (so no bpffs at
    /// /sys/fs/bpf).
    pub fn start_with_ip_netns_exec(ns: &Netns, yaml: &str, run_args: &[&str]) -> Self {
        Self::start_as(ns, yaml, run_args, true)
    }

    /// Starts `egress-agent run` in `ns` without waiting for it to serve
    /// (to signal it while it starts); [`Agent::wait_serving`] waits.
    pub fn launch(ns: &Netns, yaml: &str) -> Self {
        let mut agent = Self::new(ns, yaml, &[], false);
        agent.spawn_child();
        agent
    }

    fn start_as(ns: &Netns, yaml: &str, run_args: &[&str], ip_netns_exec: bool) -> Self {
        let mut agent = Self::new(ns, yaml, run_args, ip_netns_exec);
        agent.spawn();
        agent
    }

    fn new(ns: &Netns, yaml: &str, run_args: &[&str], ip_netns_exec: bool) -> Self {
        let instance = unique_name("agent");
        let log = std::env::temp_dir().join(format!("{instance}.log"));
        Self {
            instance,
            config: ConfigFile::new(yaml),
            ns_path: ns.path(),
            netns_exec: ip_netns_exec.then(|| ns.name().to_owned()),
            run_args: run_args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            log,
        }
    }

    fn spawn(&mut self) {
        self.spawn_child();
        // Generous: the benchmark's largest case adds ten thousand egress
        // addresses, and a debug build on a busy machine is slow.
        self.wait_serving(Duration::from_secs(300));
    }

    fn spawn_child(&mut self) {
        let log_file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut command = match &self.netns_exec {
            Some(name) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", name]).arg(agent_binary());
                crate::cleanup::signals_unblocked(&mut command);
                command
            }
            None => crate::netns::command_in(&self.ns_path, agent_binary()),
        };
        let child = command
            .args(["--instance", &self.instance, "run", "--config"])
            .arg(&self.config.path)
            .args(&self.run_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("spawning egress-agent");
        LIVE.lock().expect("registry").push(child.id());
        self.child = Some(child);
    }

    /// Stops the agent (SIGKILL when `kill`, else SIGTERM) and starts it
    /// again on the same instance and configuration.
    pub fn restart(&mut self, kill: bool) {
        if kill {
            self.kill();
        } else {
            let status = self.stop();
            assert!(status.success(), "graceful stop: {status}\n{}", self.log());
        }
        self.respawn();
    }

    /// SIGKILL, as the OOM killer or a node failure would.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("a running agent");
        LIVE.lock()
            .expect("registry")
            .retain(|pid| *pid != child.id());
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping the agent");
    }

    /// The arguments of `run` the next `respawn` uses.
    pub fn set_run_args(&mut self, run_args: &[&str]) {
        self.run_args = run_args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Starts a stopped agent again on the same instance and configuration.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "the agent is still running");
        self.spawn();
    }

    /// Replaces the configuration file and sends SIGHUP.
    pub fn reload(&self, yaml: &str) {
        std::fs::write(&self.config.path, yaml).expect("rewriting the configuration");
        let pid = self.child.as_ref().expect("a running agent").id();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    }

    /// Waits until this process wrote the state file (a killed predecessor
    /// leaves its own behind).
    pub fn wait_serving(&mut self, timeout: Duration) {
        let state = PathBuf::from(format!("/run/{}/state.json", self.instance));
        let pid = self.child.as_ref().map(Child::id);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let written_by = std::fs::read(&state)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .and_then(|v| v["pid"].as_u64());
            if written_by.is_some() && written_by == pid.map(u64::from) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "egress-agent exited with {status} before serving:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "egress-agent did not serve within {timeout:?}:\n{}",
            self.log()
        );
    }

    /// The running agent's process id (`ip netns exec` execs the agent).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs another agent subcommand (`status`, `flows`...) on this instance.
    pub fn cli(&self, args: &[&str]) -> Finished {
        run_cli(&self.ns_path, &self.instance, args)
    }

    /// Starts another agent subcommand on this instance without waiting
    /// for it (`flows --follow`), its output piped.
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        let mut command = command_in(&self.ns_path, agent_binary());
        command
            .args(["--instance", &self.instance])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning egress-agent")
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).expect("status JSON")
    }

    /// A counter of the dataplane, by its name.
    pub fn counter(&self, name: &str) -> u64 {
        self.status()["counters"][name].as_u64().unwrap_or(0)
    }

    /// `flows --json`, parsed.
    pub fn flows(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["flows", "--json"]);
        assert!(out.status.success(), "flows failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).expect("flows JSON")
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal` (SIGTERM or SIGINT) and waits; returns the exit status.
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        match self.terminate(signal) {
            Ok(status) => status,
            Err(err) => panic!("{err}:\n{}", self.log()),
        }
    }

    /// `signal`, then SIGKILL if the agent has not exited after 15 s.
    fn terminate(&mut self, signal: i32) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err("agent already stopped".to_owned());
        };
        LIVE.lock()
            .expect("registry")
            .retain(|pid| *pid != child.id());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "egress-agent ignored signal {signal} for 15 s and was killed"
                    ));
                }
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(err) = self.terminate(libc::SIGTERM)
        {
            eprintln!("{err}:\n{}", self.log());
        }
        // Whatever the agent left (it may have been killed), remove it.
        let _ = run_cli(&self.ns_path, &self.instance, &["cleanup"]);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs `egress-agent --instance <instance> <args>` inside a namespace.
pub fn run_cli(ns_path: &str, instance: &str, args: &[&str]) -> Finished {
    let mut command = command_in(ns_path, agent_binary());
    command.args(["--instance", instance]).args(args);
    finish(command)
}

/// Runs the agent once to completion (for configurations it must refuse).
pub fn run_to_exit(ns: &Netns, instance: &str, args: &[&str]) -> Finished {
    run_cli(&ns.path(), instance, args)
}

/// Runs `command` to its end, both streams read at once (a child that
/// fills one pipe while the other is read to its end would never finish).
/// Both must close: a daemon the command started that kept them open
/// would hang it, as it would hang a controller's exec.
pub fn finish(mut command: Command) -> Finished {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err_pipe.read_to_string(&mut text);
        text
    });
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("stdout");
    let stderr = reader.join().expect("stderr reader");
    let status = child.wait().expect("waiting");
    Finished {
        status,
        stdout,
        stderr,
    }
}

/// Fails unless no program of the dataplane is attached in `ns`: neither
/// XDP (`ip -d link`) nor TC (`bpftool net show`, which lists tcx links).
#[track_caller]
pub fn assert_no_dataplane_left(ns: &Netns) {
    let links = ns.run("ip", &["-d", "link", "show"]);
    let text = String::from_utf8_lossy(&links.stdout);
    assert!(!text.contains("prog/xdp"), "no XDP program left: {text}");
    let tc = ns.run("bpftool", &["net", "show"]);
    let text = String::from_utf8_lossy(&tc.stdout);
    for program in [
        names::PROG_TC_OUTBOUND,
        names::PROG_TC_REPLY,
        names::PROG_NEIGH_FALLBACK,
        names::PROG_LEAK_GUARD,
    ] {
        assert!(!text.contains(program), "no TC program left: {text}");
    }
}

/// GET on an agent's HTTP endpoint at `listen`, from inside `ns`:
/// (HTTP status, body); status 0 when nothing answered.
pub fn http_get(ns: &Netns, listen: &str, path: &str) -> (u16, String) {
    let out = ns.try_run(
        "curl",
        &[
            "-s",
            "-m",
            "2",
            "-w",
            "\n%{http_code}",
            &format!("http://{listen}{path}"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Polls `done` every 100 ms; fails the test after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
