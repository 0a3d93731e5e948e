//! An instance: one dataplane and the files that describe it.
//!
//! Maps are pinned in `/sys/fs/bpf/<name>/`; the running agent keeps a lock
//! and a state file (what it attached, added and changed) in `/run/<name>/`.
//! Several instances can share a machine (the tests run many at once), and
//! `status`, `flows` and `cleanup` find an instance by name alone.

use std::{
    fs::File,
    io::{self, Write as _},
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    config::{IngressPort, PortRange},
    dataplane::Attachment,
    macvlans, sysctl,
};

pub const DEFAULT_INSTANCE: &str = "egress";

#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Instance {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            bail!("instance name {name:?} must be 1 to 64 of [A-Za-z0-9_-]");
        }
        Ok(Self {
            name: name.to_owned(),
            pin_dir: Path::new(crate::bpffs::ROOT).join(name),
            run_dir: Path::new("/run").join(name),
        })
    }

    pub fn state_path(&self) -> PathBuf {
        self.run_dir.join("state.json")
    }

    /// Takes the instance's lock for as long as the returned file lives.
    pub fn lock(&self) -> anyhow::Result<File> {
        std::fs::create_dir_all(&self.run_dir)
            .with_context(|| format!("creating {}", self.run_dir.display()))?;
        let path = self.run_dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = self.read_state().ok().flatten().map(|s| s.pid);
            bail!(
                "another agent already runs instance {}{}",
                self.name,
                holder
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default()
            );
        }
        Ok(file)
    }

    /// Whether some process holds the instance's lock right now.
    pub fn is_running(&self) -> bool {
        let Ok(file) = File::open(self.run_dir.join("lock")) else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; released when `file` drops.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
    }

    pub fn read_state(&self) -> anyhow::Result<Option<RunState>> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("parsing {}", path.display())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Replaces the state file atomically, so a reader never sees half.
    pub fn write_state(&self, state: &RunState) -> anyhow::Result<()> {
        let path = self.state_path();
        let temporary = self.run_dir.join("state.json.tmp");
        let mut file = File::create(&temporary)
            .with_context(|| format!("creating {}", temporary.display()))?;
        file.write_all(&serde_json::to_vec_pretty(state)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Removes the state files (the live view too: nothing serves any more).
    pub fn remove_state(&self) {
        for name in [
            "state.json",
            "live.json",
            "live.json.new",
            "applied.json",
            "applied.json.partial",
            "events.sock",
            "lock",
        ] {
            let _ = std::fs::remove_file(self.run_dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.run_dir);
    }
}

/// Whether a process with this id exists (in this PID namespace).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// What a running agent set up; enough for `status` to describe it and
/// for `cleanup` to undo it after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub config: PathBuf,
    pub attachments: Vec<Attachment>,
    pub tenants: Vec<TenantRecord>,
    pub external_ifindex: u32,
    /// Egress addresses the agent added (and will remove).
    /// Both families (written as strings, so older files read the same).
    pub added_addresses: Vec<IpAddr>,
    pub sysctls: Vec<sysctl::Changed>,
    /// Macvlan next hops the agent created (and will remove); absent from
    /// the files of agents before `ingress[].create`.
    #[serde(default)]
    pub macvlans: Vec<macvlans::Created>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: u16,
    pub name: String,
    pub sources: Vec<String>,
    /// Both families (written as strings, so older files read the same).
    pub egress: Vec<IpAddr>,
    pub ports: PortRange,
    pub ingress: Vec<IngressPort>,
}
