//! The scripts of the gateway image (`deploy/kube-ovn/image/`) run the way
//! Kube-OVN's controller runs them in its pods: by path, with the pod's
//! environment, `egress-agent` found on PATH, inside the pod's namespace.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    agent::{Finished, agent_binary, finish, run_cli},
    netns::{Netns, command_in, unique_name},
};

/// A script of the image, in the repository.
pub fn image_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kube-ovn/image")
        .join(name)
}

/// One pod's scripts: its namespace, its environment, the instance and
/// state directory its agent uses. On drop the agent the scripts started
/// is stopped and everything it left is removed.
pub struct PodScripts {
    ns_path: String,
    pub instance: String,
    pub dir: PathBuf,
    env: Vec<(String, String)>,
}

impl PodScripts {
    pub fn new(ns: &Netns, env: &[(&str, &str)]) -> Self {
        let instance = unique_name("pod");
        let dir = std::env::temp_dir().join(&instance);
        Self {
            ns_path: ns.path(),
            instance,
            dir,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// `bash <script> <args>` as the controller's exec runs it.
    pub fn run(&self, script: &str, args: &[&str]) -> Finished {
        let bin_dir = agent_binary().parent().expect("bin dir").to_path_buf();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = command_in(&self.ns_path, "bash");
        command
            .arg(image_script(script))
            .args(args)
            .env("PATH", path)
            .env("EGRESS_INSTANCE", &self.instance)
            .env("EGRESS_NAT_GATEWAY_DIR", &self.dir)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        finish(command)
    }

    /// Runs a verb and insists on the controller's idea of success.
    pub fn ok(&self, script: &str, args: &[&str]) -> Finished {
        let finished = self.run(script, args);
        assert!(
            finished.succeeded(),
            "{script} {args:?}: {:?}\nstdout: {}\nstderr: {}",
            finished.status,
            finished.stdout,
            finished.stderr
        );
        finished
    }

    /// The agent process the scripts started, if any runs.
    pub fn agent_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.dir.join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        std::path::Path::new(&format!("/proc/{pid}"))
            .exists()
            .then_some(pid)
    }

    /// `egress-agent status --json` of the pod's instance.
    pub fn status(&self) -> serde_json::Value {
        let finished = run_cli(&self.ns_path, &self.instance, &["status", "--json"]);
        serde_json::from_str(&finished.stdout)
            .unwrap_or_else(|err| panic!("status: {err}: {}{}", finished.stdout, finished.stderr))
    }

    /// `egress-agent flows --json` of the pod's instance.
    pub fn flows(&self) -> Vec<serde_json::Value> {
        let finished = run_cli(&self.ns_path, &self.instance, &["flows", "--json"]);
        serde_json::from_str(&finished.stdout)
            .unwrap_or_else(|err| panic!("flows: {err}: {}{}", finished.stdout, finished.stderr))
    }

    /// The agent's log, for failure messages.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for PodScripts {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid() {
            // SAFETY: kill(2) on the agent our scripts started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while std::path::Path::new(&format!("/proc/{pid}")).exists()
                && !is_zombie(pid)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = run_cli(&self.ns_path, &self.instance, &["cleanup"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}
