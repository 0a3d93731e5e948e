//! Network namespaces that are always removed, and ways to act inside them.
//!
//! Names carry the process id and a counter, so tests running in parallel,
//! or two test runs on one machine, never collide. Code runs inside a
//! namespace either on a thread that entered it (sockets opened there stay
//! in it) or as a child process that enters it before exec. Neither
//! remounts /sys, so bpffs at /sys/fs/bpf stays visible.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Namespaces alive in this process, for `cleanup::on_signal`.
pub(crate) static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A unique name with the given role, e.g. `egt1234x7-gw`.
pub fn unique_name(role: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("egt{}x{n}-{role}", std::process::id())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(role: &str) -> Self {
        let name = unique_name(role);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        LIVE.lock().expect("registry").push(name.clone());
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that will run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.path(), program)
    }

    /// Runs a command inside, panicking with its output if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        run_ok(self.command(program).args(args))
    }

    /// Runs a command inside and returns its output whatever the status.
    pub fn try_run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("spawning {program} in {}: {err}", self.name))
    }

    pub fn ip(&self, args: &[&str]) -> Output {
        self.run("ip", args)
    }

    /// Pins `addr`'s link-layer address on `dev` (either family: `ip`
    /// infers it from the address), so no ARP or neighbour discovery
    /// stands between a test or a measurement and its packets.
    pub fn static_neighbour(&self, addr: impl std::fmt::Display, mac: [u8; 6], dev: &str) {
        self.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &egress_agent::config::format_mac(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let file = File::open(self.path()).expect("namespace file");
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                // SAFETY: setns(2) on this thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!("entering {name}: {}", std::io::Error::last_os_error());
                }
                drop(file);
                f()
            })
            .expect("spawning a thread")
    }

    /// Like `enter`, but waits for the result.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.enter(f).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Creates a veth pair: `name` here, `peer_name` in `peer`.
    pub fn veth(&self, name: &str, peer: &Netns, peer_name: &str) {
        run_ok(Command::new("ip").args([
            "link", "add", name, "netns", &self.name, "type", "veth", "peer", "name", peer_name,
            "netns", &peer.name,
        ]));
        self.ip(&["link", "set", name, "up"]);
        peer.ip(&["link", "set", peer_name, "up"]);
    }

    /// Waits until duplicate address detection has passed for every IPv6
    /// address here (left on, as the kernel defaults): a tentative address
    /// can be neither a source nor a destination.
    pub fn wait_ipv6_settled(&self, deadline: std::time::Instant) {
        loop {
            let out = self.try_run("ip", &["-6", "addr", "show", "tentative"]);
            if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "IPv6 addresses still tentative in {}",
                self.name()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn ifindex(&self, interface: &str) -> u32 {
        let name = std::ffi::CString::new(interface).expect("interface name");
        let index = self.within(move || {
            // SAFETY: a valid C string; the call only reads it.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        });
        assert!(index != 0, "no interface {interface} in {}", self.name);
        index
    }

    pub fn mac(&self, interface: &str) -> [u8; 6] {
        let interface = interface.to_owned();
        self.within(move || mac_of(&interface))
    }

    /// Turns a veth's offloads into what a rewriting dataplane needs: full
    /// checksums from the sender, and NAPI on receivers of XDP redirects.
    pub fn ethtool(&self, interface: &str, feature: &str, on: bool) {
        self.run(
            "ethtool",
            &["-K", interface, feature, if on { "on" } else { "off" }],
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
        LIVE.lock().expect("registry").retain(|n| *n != self.name);
    }
}

pub(crate) fn delete(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// A command that enters the namespace at `ns_path` before it execs.
pub fn command_in(ns_path: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    let file = File::open(ns_path).unwrap_or_else(|err| panic!("opening {ns_path}: {err}"));
    // SAFETY: setns(2) and sigprocmask(2) are async-signal-safe; `file`
    // stays open until exec. The child must not inherit signals a program
    // blocked for its cleanup thread.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut());
            Ok(())
        });
    }
    command
}

/// MAC address of an interface in the calling thread's namespace.
pub fn mac_of(interface: &str) -> [u8; 6] {
    // SAFETY: plain socket/ioctl calls with a zeroed, correctly sized ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(interface.bytes()) {
            *dst = src as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut request);
        libc::close(fd);
        assert!(
            rc == 0,
            "SIOCGIFHWADDR {interface}: {}",
            std::io::Error::last_os_error()
        );
        let data = request.ifr_ifru.ifru_hwaddr.sa_data;
        [data[0], data[1], data[2], data[3], data[4], data[5]].map(|b| b as u8)
    }
}

pub fn run_ok(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("spawning {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
