//! The XDP features the kernel really reports for the software devices the
//! gateway meets, and the hook `choose` picks from them. Unit tests feed
//! `choose` by hand; this checks those hand-made facts match the kernel's.
//!
//! Needs root: it creates a network namespace with a veth pair and a
//! macvlan, and enters it on the test thread.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use egress_agent::hook_choice::{
    Hook, HookSetting, InterfaceFacts, XDP_ACT_BASIC, XDP_ACT_NDO_XMIT, XDP_ACT_REDIRECT, choose,
    read_facts, xdp_features,
};

/// Skips (saying why) without root; under `CI=true` fails instead, so a CI
/// run cannot pass by skipping.
fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but not root: the hook choice test cannot run"
        );
        eprintln!("SKIPPED: needs root (network namespaces); run `cargo xtask test` as root");
    }
    root
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("spawning {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A namespace named after this process, deleted on drop, panics included.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "egh{}x{}-hook",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        Self { name }
    }

    fn ip(&self, args: &[&str]) {
        run("ip", &[&["-n", self.name.as_str()], args].concat());
    }

    fn exec(&self, program: &str, args: &[&str]) {
        run(
            "ip",
            &[&["netns", "exec", self.name.as_str(), program], args].concat(),
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The test thread inside a namespace, back home on drop.
struct Entered {
    home: File,
}

impl Entered {
    fn new(ns: &Netns) -> Self {
        let home = File::open("/proc/thread-self/ns/net").expect("own namespace");
        let target = File::open(format!("/run/netns/{}", ns.name)).expect("namespace file");
        // SAFETY: setns(2) on this thread only; undone in Drop.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Self { home }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        // SAFETY: back to the namespace this thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

fn ifindex(name: &str) -> u32 {
    let c_name = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: a valid C string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    assert_ne!(index, 0, "{name}: {}", std::io::Error::last_os_error());
    index
}

fn features(name: &str) -> u64 {
    xdp_features(ifindex(name))
        .unwrap_or_else(|err| panic!("asking for the XDP features of {name}: {err}"))
        .unwrap_or_else(|| panic!("this kernel does not report XDP features ({name})"))
}

#[test]
fn kernel_reports_what_choose_expects_for_veth_and_macvlan() {
    if !require_root() {
        return;
    }
    // Dropped in reverse: the thread leaves the namespace, then it goes.
    let ns = Netns::new();
    ns.ip(&["link", "add", "ve0", "type", "veth", "peer", "name", "ve1"]);
    // A macvlan needs a lower device; a veth serves (kernels built without
    // the dummy driver exist).
    ns.ip(&[
        "link", "add", "lower0", "type", "veth", "peer", "name", "lower1",
    ]);
    ns.ip(&[
        "link", "add", "mv0", "link", "lower0", "type", "macvlan", "mode", "bridge",
    ]);
    for link in ["ve0", "ve1", "lower0", "lower1", "mv0"] {
        ns.ip(&["link", "set", link, "up"]);
    }
    let _entered = Entered::new(&ns);

    let macvlan = features("mv0");
    assert_eq!(
        macvlan & XDP_ACT_NDO_XMIT,
        0,
        "a macvlan has no ndo_xdp_xmit: {macvlan:#x}"
    );

    // Kernel defaults: the peer ve1 has GRO off and no XDP program.
    let veth_default = features("ve0");
    assert_ne!(
        veth_default & XDP_ACT_BASIC,
        0,
        "a veth runs native XDP: {veth_default:#x}"
    );
    assert_eq!(
        veth_default & XDP_ACT_NDO_XMIT,
        0,
        "ve0 must not take redirects while ve1 has neither GRO nor XDP: {veth_default:#x}"
    );

    // This test is about exactly this setting: GRO on the peer gives ve1 a
    // NAPI context, which is what lets ve0 accept XDP frames.
    ns.exec("ethtool", &["-K", "ve1", "gro", "on"]);
    let veth_gro = features("ve0");
    assert_ne!(
        veth_gro & XDP_ACT_NDO_XMIT,
        0,
        "ve0 must take redirects once ve1 has GRO on: {veth_gro:#x}"
    );

    eprintln!(
        "XDP features: mv0 {macvlan:#x}, ve0 {veth_default:#x} at defaults, {veth_gro:#x} with GRO on ve1"
    );

    let no_such_link = xdp_features(999_999).expect_err("ifindex 999999 does not exist");
    assert_eq!(
        no_such_link.raw_os_error(),
        Some(libc::ENODEV),
        "{no_such_link}"
    );

    // The runtime and its rtnetlink socket are made inside the namespace.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (ingress, target) = runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().expect("rtnetlink");
        tokio::spawn(connection);
        let ingress = read_facts(&handle, ifindex("ve0"))
            .await
            .expect("facts of ve0");
        let target = read_facts(&handle, ifindex("mv0"))
            .await
            .expect("facts of mv0");
        (ingress, target)
    });
    assert_eq!(ingress.name, "ve0");
    assert_eq!(ingress.kind.as_deref(), Some("veth"));
    assert_eq!(ingress.xdp_features, Some(veth_gro));
    assert_eq!(target.kind.as_deref(), Some("macvlan"));

    let choice = choose(HookSetting::Auto, &ingress, std::slice::from_ref(&ingress))
        .expect("auto never fails");
    assert_eq!(choice.hook, Hook::Tc, "{}", choice.reason);
    assert_eq!(
        choice.reason,
        "ve0 is a veth: co-located senders hand over partial checksums XDP cannot finish"
    );

    // A NIC (described by hand: the namespace has none) may redirect to the
    // veth now that its peer has GRO on, but not to the macvlan.
    let nic = InterfaceFacts {
        name: "eth0".to_owned(),
        ifindex: 1,
        kind: None,
        xdp_features: Some(XDP_ACT_BASIC | XDP_ACT_REDIRECT | XDP_ACT_NDO_XMIT),
    };
    let choice = choose(HookSetting::Auto, &nic, std::slice::from_ref(&ingress)).expect("auto");
    assert_eq!(choice.hook, Hook::Xdp, "{}", choice.reason);
    let choice = choose(HookSetting::Auto, &nic, std::slice::from_ref(&target)).expect("auto");
    assert_eq!(choice.hook, Hook::Tc, "{}", choice.reason);

    let refusal =
        choose(HookSetting::Xdp, &ingress, &[target]).expect_err("mv0 takes no redirects");
    assert!(
        refusal.starts_with("mv0 (macvlan) cannot receive XDP redirects"),
        "{refusal}"
    );
}
