//! Runs the real dataplane programs on crafted frames with
//! BPF_PROG_TEST_RUN, without sending anything anywhere.
//!
//! The calling thread enters a private namespace (and returns to its own
//! when the harness drops) holding veths whose addresses, routes and static
//! neighbours give `bpf_fib_lookup` fixed answers:
//!
//! | destination | route |
//! | --- | --- |
//! | 198.51.100.0/24 | via 192.168.31.1 on ext0, neighbour known: the "internet" |
//! | 198.18.0.0/24 | via 192.168.31.1, route MTU 576: a narrow path |
//! | 203.0.113.0/24 | via 192.168.31.254, neighbour unknown |
//! | 100.64.0.0/10 | unreachable |
//! | 172.20.10.0/24, 172.20.20.0/24, 10.128.0.0/14 | connected on int0; hosts .10 known |
//!
//! The object is loaded through the agent's own `Dataplane::load` and the
//! maps filled by its own `DesiredState`, from a YAML configuration.

use std::{fs::File, os::fd::AsRawFd as _, path::PathBuf};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use egress_agent::{
    config::{Config, Timeouts},
    conntrack::{self, SweepReport},
    dataplane::{
        Dataplane,
        maps::{DesiredState, Maps},
    },
    system::SystemView,
};
use egress_common::{
    counters::Counter,
    flow::{FlowEntryV4, FlowKeyV4, FlowKeyV6},
    names,
};

use crate::netns::{Netns, unique_name};

pub const INTERNAL: &str = "int0";
pub const EXTERNAL: &str = "ext0";
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x31, 0x01];
pub const HOST_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x10];
pub const HOST_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x20, 0x10];

/// The seed tenants plus one chosen by ingress MAC sharing a pod CIDR.
pub const CONFIG: &str = "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
  - name: tenant-b
    sources: [172.20.20.0/24]
    egressIPs: [192.168.31.150]
conntrack: {maxFlows: 4096}
";

/// Both seed tenants dual-stack: each family leaves from its own egress
/// address.
pub const CONFIG_DUAL_STACK: &str = "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24, 2001:db8:10::/64]
    egressIPs: [192.168.31.101, 2001:db8:31::101]
  - name: tenant-b
    sources: [172.20.20.0/24, 2001:db8:20::/64]
    egressIPs: [192.168.31.150, 2001:db8:31::150]
conntrack: {maxFlows: 4096}
";

/// The IPv6 side of the harness's routes, as the IPv4 table above:
///
/// | destination | route |
/// | --- | --- |
/// | 2001:db8:100::/48 | via 2001:db8:31::1 on ext0, neighbour known |
/// | 2001:db8:200::/48 | via 2001:db8:31::1, route MTU 1280 |
/// | 2001:db8:10::/64, 2001:db8:20::/64 | connected on int0; hosts ::10 known |
fn ipv6_routes(ns: &Netns) {
    // Forwarding on, as on a gateway (the FIB helper refuses otherwise);
    // addresses without duplicate detection so they serve at once.
    ns.run("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    for cidr in ["2001:db8:10::1/64", "2001:db8:20::1/64"] {
        ns.ip(&["addr", "add", cidr, "dev", INTERNAL, "nodad"]);
    }
    ns.ip(&["addr", "add", "2001:db8:31::2/64", "dev", EXTERNAL, "nodad"]);
    ns.ip(&[
        "route",
        "add",
        "2001:db8:100::/48",
        "via",
        "2001:db8:31::1",
        "dev",
        EXTERNAL,
    ]);
    ns.ip(&[
        "route",
        "add",
        "2001:db8:200::/48",
        "via",
        "2001:db8:31::1",
        "dev",
        EXTERNAL,
        "mtu",
        "lock",
        "1280",
    ]);
    for (addr, lladdr, dev) in [
        ("2001:db8:31::1", ROUTER_MAC, EXTERNAL),
        ("2001:db8:10::10", HOST_A_MAC, INTERNAL),
        ("2001:db8:20::10", HOST_B_MAC, INTERNAL),
    ] {
        ns.static_neighbour(addr, lladdr, dev);
    }
}

/// Which compilation of the packet path a harness runs: XDP (`snat_*`) or
/// TC (`tc_*`). `EGRESS_TEST_HOOK=tc` selects TC for a whole test run, so
/// every packet test proves both hooks with the same frames and the same
/// expected bytes (`cargo xtask test` runs them both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketHook {
    Xdp,
    Tc,
}

impl PacketHook {
    pub fn from_env() -> Self {
        match std::env::var("EGRESS_TEST_HOOK").as_deref() {
            Ok("tc") => Self::Tc,
            Ok("xdp") | Err(_) => Self::Xdp,
            Ok(other) => panic!("EGRESS_TEST_HOOK={other}: expected xdp or tc"),
        }
    }
}

/// TC return codes.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// XDP return codes; a TC program's actions are reported as their XDP
/// equivalents, so expectations read the same for both hooks.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// A TC action as the XDP action that means the same.
fn xdp_equivalent(program: &str, action: i32) -> u32 {
    match action {
        TC_ACT_OK => XDP_PASS,
        TC_ACT_SHOT => XDP_DROP,
        TC_ACT_REDIRECT => XDP_REDIRECT,
        other => panic!("{program} returned TC action {other}"),
    }
}

/// What a program did with a frame.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

/// The `xdp_md` a test run starts from: which interface the frame "arrived" on.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

pub struct Harness {
    pub hook: PacketHook,
    pub maps: Maps,
    pub internal: u32,
    pub external: u32,
    dataplane: Option<Dataplane>,
    pin_dir: PathBuf,
    home: File,
    _ns: Netns,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_config(CONFIG)
    }

    /// The namespace the programs' interfaces and routes live in, for a
    /// test that needs one more route.
    pub fn ns(&self) -> &Netns {
        &self._ns
    }

    pub fn with_config(yaml: &str) -> Self {
        let ns = Netns::new("pkt");
        for (a, b) in [(INTERNAL, "int0p"), (EXTERNAL, "ext0p")] {
            ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
            ns.ip(&["link", "set", a, "up"]);
            ns.ip(&["link", "set", b, "up"]);
        }
        for cidr in ["172.20.10.1/24", "172.20.20.1/24", "10.128.0.1/14"] {
            ns.ip(&["addr", "add", cidr, "dev", INTERNAL]);
        }
        ns.ip(&["addr", "add", "192.168.31.2/24", "dev", EXTERNAL]);
        for (dst, via) in [
            ("198.51.100.0/24", "192.168.31.1"),
            ("203.0.113.0/24", "192.168.31.254"),
        ] {
            ns.ip(&["route", "add", dst, "via", via, "dev", EXTERNAL]);
        }
        ns.ip(&[
            "route",
            "add",
            "198.18.0.0/24",
            "via",
            "192.168.31.1",
            "dev",
            EXTERNAL,
            "mtu",
            "lock",
            "576",
        ]);
        ns.ip(&["route", "add", "unreachable", "100.64.0.0/10"]);
        let neighbours = [
            ("192.168.31.1", ROUTER_MAC, EXTERNAL),
            ("172.20.10.10", HOST_A_MAC, INTERNAL),
            ("172.20.20.10", HOST_B_MAC, INTERNAL),
            ("10.128.0.10", HOST_A_MAC, INTERNAL),
        ];
        for (addr, lladdr, dev) in neighbours {
            ns.static_neighbour(addr, lladdr, dev);
        }
        for interface in [INTERNAL, EXTERNAL] {
            ns.run(
                "sysctl",
                &["-qw", &format!("net.ipv4.conf.{interface}.forwarding=1")],
            );
        }
        ipv6_routes(&ns);

        // The test thread itself enters the namespace: test runs resolve the
        // ingress ifindex, and the FIB, in the caller's namespace.
        let home = File::open("/proc/thread-self/ns/net").expect("own namespace");
        let target = File::open(ns.path()).expect("namespace");
        // SAFETY: setns(2) on this thread; undone in Drop.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let system = runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().expect("rtnetlink");
            tokio::spawn(connection);
            SystemView::read(&handle).await.expect("reading links")
        });
        let plan = Config::parse(yaml)
            .expect("test config parses")
            .plan()
            .expect("test config is valid");
        let resolved = plan.resolve(&system).expect("test config resolves");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("pkt"));
        let dataplane = Dataplane::load(&pin_dir, resolved.max_flows, resolved.audit.ring_bytes)
            .expect("loading the dataplane");
        let mut maps = Maps::open(&pin_dir).expect("opening maps");
        let desired = DesiredState::build(
            &resolved,
            &maps.tenant_ids().expect("ids"),
            &maps.port_ids(),
        )
        .expect("state");
        maps.sync(&desired).expect("filling maps");
        Self {
            hook: PacketHook::from_env(),
            maps,
            internal: system.link_by_name(INTERNAL).expect("int0").index,
            external: system.link_by_name(EXTERNAL).expect("ext0").index,
            dataplane: Some(dataplane),
            pin_dir,
            home,
            _ns: ns,
        }
    }

    /// Where the dataplane's maps are pinned.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// The namespace the harness runs in (to add routes or neighbours).
    pub fn netns(&self) -> &Netns {
        &self._ns
    }

    fn dataplane(&self) -> &Dataplane {
        self.dataplane.as_ref().expect("dataplane")
    }

    fn run_xdp(&self, program: &str, ingress: u32, frame: &[u8]) -> Outcome {
        let xdp: &Xdp = self
            .dataplane()
            .program(program)
            .expect("program")
            .try_into()
            .expect("XDP program");
        let md = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ingress,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        // SAFETY: XdpMd is plain old data.
        let ctx =
            unsafe { std::slice::from_raw_parts((&raw const md).cast::<u8>(), size_of::<XdpMd>()) };
        let mut out = vec![0u8; frame.len() + 256];
        let result = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(ctx),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|err| panic!("BPF_PROG_TEST_RUN {program}: {err}"));
        out.truncate(result.data_size_out as usize);
        Outcome {
            action: result.return_value,
            frame: out,
        }
    }

    /// The outbound path (`snat_outbound` or `tc_outbound`) on a frame
    /// arriving on the internal interface.
    pub fn outbound(&self, frame: &[u8]) -> Outcome {
        match self.hook {
            PacketHook::Xdp => self.run_xdp(names::PROG_SNAT_OUTBOUND, self.internal, frame),
            PacketHook::Tc => self.run_tc(names::PROG_TC_OUTBOUND, self.internal, frame),
        }
    }

    /// The reply path (`snat_reply` or `tc_reply`) on a frame arriving on
    /// the external interface.
    pub fn reply(&self, frame: &[u8]) -> Outcome {
        match self.hook {
            PacketHook::Xdp => self.run_xdp(names::PROG_SNAT_REPLY, self.external, frame),
            PacketHook::Tc => self.run_tc(names::PROG_TC_REPLY, self.external, frame),
        }
    }

    /// `outbound`, or `None` when the kernel refuses to make a socket buffer
    /// of the frame for a TC run (an IPv4 ethertype with less than an IPv4
    /// header, for one): such a frame never reaches a TC program.
    pub fn try_outbound(&self, frame: &[u8]) -> Option<Outcome> {
        match self.hook {
            PacketHook::Xdp => Some(self.outbound(frame)),
            PacketHook::Tc => self.try_run_tc(names::PROG_TC_OUTBOUND, self.internal, frame),
        }
    }

    /// `reply`, or `None` as for `try_outbound`.
    pub fn try_reply(&self, frame: &[u8]) -> Option<Outcome> {
        match self.hook {
            PacketHook::Xdp => Some(self.reply(frame)),
            PacketHook::Tc => self.try_run_tc(names::PROG_TC_REPLY, self.external, frame),
        }
    }

    /// A TC ingress program on a frame arriving on `ingress`, its action
    /// given as the XDP equivalent.
    fn run_tc(&self, program: &str, ingress: u32, frame: &[u8]) -> Outcome {
        self.try_run_tc(program, ingress, frame)
            .unwrap_or_else(|| panic!("BPF_PROG_TEST_RUN {program}: no skb for {frame:02x?}"))
    }

    fn try_run_tc(&self, program: &str, ingress: u32, frame: &[u8]) -> Option<Outcome> {
        let (action, frame) = self.try_tc_frame(program, frame, ingress).ok()?;
        Some(Outcome {
            action: xdp_equivalent(program, action),
            frame,
        })
    }

    /// Runs the outbound path (`snat_outbound` or `tc_outbound`, as `hook`
    /// says) `repeat` times on one frame; the kernel's mean time per run.
    pub fn time_outbound(&self, frame: &[u8], repeat: u32) -> std::time::Duration {
        match self.hook {
            PacketHook::Xdp => {
                self.time_xdp(names::PROG_SNAT_OUTBOUND, self.internal, frame, repeat)
            }
            PacketHook::Tc => self.time_tc(names::PROG_TC_OUTBOUND, self.internal, frame, repeat),
        }
    }

    /// `time_outbound` for the reply path (`snat_reply` or `tc_reply`).
    pub fn time_reply(&self, frame: &[u8], repeat: u32) -> std::time::Duration {
        match self.hook {
            PacketHook::Xdp => self.time_xdp(names::PROG_SNAT_REPLY, self.external, frame, repeat),
            PacketHook::Tc => self.time_tc(names::PROG_TC_REPLY, self.external, frame, repeat),
        }
    }

    /// Any TC ingress program on the internal interface, `repeat` times on
    /// one frame; the kernel's mean time per run (see `time_tc`).
    pub fn time_internal_tc(
        &self,
        program: &str,
        frame: &[u8],
        repeat: u32,
    ) -> std::time::Duration {
        self.time_tc(program, self.internal, frame, repeat)
    }

    /// A TC ingress program `repeat` times on one socket buffer built from
    /// `frame` (built once, outside the timed loop, as the kernel does for
    /// every skb test run); the kernel's mean time per run.
    fn time_tc(
        &self,
        program: &str,
        ingress: u32,
        frame: &[u8],
        repeat: u32,
    ) -> std::time::Duration {
        let classifier: &SchedClassifier = self
            .dataplane()
            .program(program)
            .expect("program")
            .try_into()
            .expect("TC program");
        let skb = self.skb_ctx(ingress, (0, 0));
        // SAFETY: plain u32 array viewed as bytes.
        let ctx =
            unsafe { std::slice::from_raw_parts(skb.as_ptr().cast::<u8>(), size_of_val(&skb)) };
        classifier
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(ctx),
                repeat,
                ..TestRunOptions::default()
            })
            .expect("timed test run")
            .duration
    }

    fn time_xdp(
        &self,
        program: &str,
        ingress: u32,
        frame: &[u8],
        repeat: u32,
    ) -> std::time::Duration {
        let xdp: &Xdp = self
            .dataplane()
            .program(program)
            .expect("program")
            .try_into()
            .expect("XDP program");
        let md = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ingress,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        // SAFETY: XdpMd is plain old data.
        let ctx =
            unsafe { std::slice::from_raw_parts((&raw const md).cast::<u8>(), size_of::<XdpMd>()) };
        xdp.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(ctx),
            repeat,
            ..TestRunOptions::default()
        })
        .expect("timed test run")
        .duration
    }

    /// A TC program on a frame; `ingress` is the skb's ingress ifindex (0
    /// for locally generated traffic). Returns the TC action.
    pub fn tc(&self, program: &str, frame: &[u8], ingress: u32) -> i32 {
        self.try_tc(program, frame, ingress)
            .unwrap_or_else(|err| panic!("BPF_PROG_TEST_RUN {program}: {err}"))
    }

    /// `tc`, or the kernel's refusal to build an skb from the frame (an
    /// IPv4 ethertype with less than an IPv4 header, for one): such a frame
    /// never reaches a TC hook.
    pub fn try_tc(&self, program: &str, frame: &[u8], ingress: u32) -> Result<i32, String> {
        self.try_tc_frame(program, frame, ingress)
            .map(|(action, _)| action)
    }

    /// `tc_outbound` on a GSO super-packet from a co-located sender: the
    /// frame holds every segment's payload, `gso_size` bytes each.
    pub fn outbound_gso(&self, frame: &[u8], gso_size: u32) -> Outcome {
        let segments = (frame.len() as u32).div_ceil(gso_size);
        let (action, frame) = self
            .run_tc_skb(
                names::PROG_TC_OUTBOUND,
                frame,
                self.internal,
                (segments, gso_size),
            )
            .unwrap_or_else(|err| panic!("BPF_PROG_TEST_RUN tc_outbound: {err}"));
        Outcome {
            action: xdp_equivalent(names::PROG_TC_OUTBOUND, action),
            frame,
        }
    }

    /// `try_tc`, with the frame as the program left it.
    fn try_tc_frame(
        &self,
        program: &str,
        frame: &[u8],
        ingress: u32,
    ) -> Result<(i32, Vec<u8>), String> {
        self.run_tc_skb(program, frame, ingress, (0, 0))
    }

    /// The head of struct __sk_buff (include/uapi/linux/bpf.h) as u32s:
    /// ingress_ifindex (9), ifindex (10), gso_segs (41, at byte 164),
    /// gso_size (44, at byte 176). The kernel accepts a prefix.
    fn skb_ctx(&self, ingress: u32, (gso_segs, gso_size): (u32, u32)) -> [u32; 45] {
        let mut skb = [0u32; 45];
        skb[9] = ingress;
        skb[10] = if ingress == 0 { self.external } else { ingress };
        skb[41] = gso_segs;
        skb[44] = gso_size;
        skb
    }

    /// A TC program on a frame whose skb has `(gso_segs, gso_size)`.
    fn run_tc_skb(
        &self,
        program: &str,
        frame: &[u8],
        ingress: u32,
        (gso_segs, gso_size): (u32, u32),
    ) -> Result<(i32, Vec<u8>), String> {
        let classifier: &SchedClassifier = self
            .dataplane()
            .program(program)
            .expect("program")
            .try_into()
            .expect("TC program");
        let skb = self.skb_ctx(ingress, (gso_segs, gso_size));
        // SAFETY: plain u32 array viewed as bytes.
        let ctx =
            unsafe { std::slice::from_raw_parts(skb.as_ptr().cast::<u8>(), size_of_val(&skb)) };
        let mut out = vec![0u8; frame.len() + 256];
        let result = classifier
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(ctx),
                ..TestRunOptions::default()
            })
            .map_err(|err| format!("{err:?}"))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.maps
            .counters()
            .expect("counters")
            .into_iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, v)| v)
    }

    /// Every conntrack entry has its other half: the invariant no packet
    /// may break, whatever it contains.
    #[track_caller]
    /// Both families' tables hold whole flows only.
    pub fn assert_no_half_entries(&self) {
        let entries = self.maps.flows();
        let keys: std::collections::HashSet<FlowKeyV4> = entries.iter().map(|(k, _)| *k).collect();
        for (key, entry) in &entries {
            assert!(
                keys.contains(&key.peer_key(entry)),
                "half a flow in conntrack: {key:?} -> {entry:?}"
            );
        }
        let entries = self.maps.flows_v6();
        let keys: std::collections::HashSet<FlowKeyV6> = entries.iter().map(|(k, _)| *k).collect();
        for (key, entry) in &entries {
            assert!(
                keys.contains(&key.peer_key(entry)),
                "half an IPv6 flow in conntrack: {key:?} -> {entry:?}"
            );
        }
    }

    /// IPv6 flows in the table.
    pub fn flow_count_v6(&self) -> usize {
        self.maps.flows_v6().len() / 2
    }

    pub fn flow_count(&self) -> usize {
        self.maps.flows().len() / 2
    }

    /// Runs the agent's sweeper as if the clock read `now_ns`.
    pub fn sweep(&mut self, now_ns: u64, timeouts: &Timeouts) -> SweepReport {
        conntrack::sweep(&mut self.maps, now_ns, timeouts).expect("sweep")
    }

    /// The sweeper judging an earlier snapshot of the table.
    pub fn sweep_snapshot(
        &mut self,
        snapshot: Vec<(FlowKeyV4, FlowEntryV4)>,
        now_ns: u64,
        timeouts: &Timeouts,
    ) -> SweepReport {
        conntrack::sweep_snapshot(&mut self.maps, snapshot, now_ns, timeouts).expect("sweep")
    }

    /// Flows as the agent pairs them, with their protocol states.
    pub fn flows(&self) -> Vec<conntrack::Flow> {
        conntrack::pair(self.maps.flows()).0
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(dataplane) = self.dataplane.take() {
            let _ = dataplane.shutdown();
        }
        let _ = egress_agent::dataplane::remove_pins(&self.pin_dir);
        // SAFETY: back to the namespace this thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}
