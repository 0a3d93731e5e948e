//! The benchmark's own BPF programs: the generator, the sink and the plain
//! forwarder, loaded once and attached in their namespaces.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, links::FdLink},
};
use egress_common::bench::{
    ForwardConfig, PKTGEN_CYCLE, PKTGEN_SENT, PKTGEN_UNIQUE, PktgenConfig, SINK_RECEIVED,
    SINK_TRANSLATED, SinkConfig,
};
use egress_tests::netns::Netns;

use crate::topology::{
    BLAST_PORT, EGRESS_BASE, EGRESS_BASE_V6, HOSTS, PROBE_PORT, SINK_ADDR, SINK_ADDR_V6,
    TENANT_BASE, TENANT_STRIDE, Topology, pin, tenant_prefix_v6,
};

/// Runs `f` with the calling thread inside `ns`, then returns it home.
pub fn inside<T>(ns: &Netns, f: impl FnOnce() -> T) -> T {
    let home = File::open("/proc/thread-self/ns/net").expect("own namespace");
    let target = File::open(ns.path()).expect("namespace");
    // SAFETY: setns(2) on this thread, undone below.
    unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
    let value = f();
    // SAFETY: as above.
    unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) };
    value
}

/// Sink counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub received: u64,
    pub translated: u64,
    pub sent: u64,
}

pub struct Programs {
    ebpf: Ebpf,
    frame: Vec<u8>,
    frame_v6: Vec<u8>,
    /// The generator sends IPv6 (`set_ipv6`).
    ipv6: bool,
    s0: u32,
    /// The sink's and the sender's attachments, for the whole run.
    _links: Vec<FdLink>,
    forward_link: Option<FdLink>,
}

impl Programs {
    pub fn load(topology: &Topology) -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(crate::OBJECT).context("loading the benchmark's BPF object")?;
        for name in ["pktgen", "sink", "pass", "forward"] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        let mut sink: Array<_, SinkConfig> =
            Array::try_from(ebpf.map_mut("SINK_CONFIG").context("SINK_CONFIG")?)?;
        sink.set(
            0,
            SinkConfig {
                egress_net: u32::from(EGRESS_BASE),
                egress_mask: 0xffff_0000,
                probe_port: PROBE_PORT,
                _pad: 0,
                egress_v6_prefix: EGRESS_BASE_V6.octets()[..8]
                    .try_into()
                    .expect("eight bytes"),
            },
            0,
        )?;
        let mut forward: Array<_, ForwardConfig> =
            Array::try_from(ebpf.map_mut("FORWARD_CONFIG").context("FORWARD_CONFIG")?)?;
        forward.set(
            0,
            ForwardConfig {
                ifindex: topology.g1,
                smac: topology.g1_mac,
                dmac: topology.k0_mac,
            },
            0,
        )?;
        let mut programs = Self {
            ebpf,
            frame: template_frame(topology),
            frame_v6: template_frame_v6(topology),
            ipv6: false,
            s0: topology.s0,
            _links: Vec::new(),
            forward_link: None,
        };
        let sink = programs.attach(&topology.sink, "sink", topology.k0)?;
        // The sender's veth receives replies redirected by XDP: it needs NAPI.
        let pass = programs.attach(&topology.src, "pass", topology.s0)?;
        programs._links = vec![sink, pass];
        Ok(programs)
    }

    fn attach(&mut self, ns: &Netns, name: &str, ifindex: u32) -> anyhow::Result<FdLink> {
        let program: &mut Xdp = self.ebpf.program_mut(name).context("program")?.try_into()?;
        let id = inside(ns, || program.attach_to_if_index(ifindex, XdpMode::Driver))
            .with_context(|| format!("attaching {name}"))?;
        let link = program.take_link(id)?;
        link.try_into()
            .map_err(|_| anyhow!("{name}: attached without a bpf link"))
    }

    /// The ceiling: plain XDP forwarding g0 -> g1, no NAT.
    pub fn start_forwarding(&mut self, topology: &Topology) -> anyhow::Result<()> {
        let link = self.attach(&topology.gw, "forward", topology.g0)?;
        self.forward_link = Some(link);
        Ok(())
    }

    pub fn stop_forwarding(&mut self) {
        self.forward_link = None;
    }

    /// Whether the generator sends IPv6 (from the tenants' IPv6 prefixes to
    /// the sink's IPv6 address) or IPv4 from now on.
    pub fn set_ipv6(&mut self, on: bool) {
        self.ipv6 = on;
    }

    /// Established traffic: cycle through `flows` flows over `tenants`
    /// tenant prefixes.
    pub fn cycle(&mut self, topology: &Topology, tenants: u32, flows: u32) -> anyhow::Result<()> {
        self.configure(topology, PKTGEN_CYCLE, 0..tenants, flows, 0)
    }

    /// New flows: every packet a flow never seen, numbered from `start`.
    pub fn unique(&mut self, topology: &Topology, tenants: u32, start: u32) -> anyhow::Result<()> {
        self.configure(topology, PKTGEN_UNIQUE, 0..tenants, 0, start)
    }

    /// New flows of the tenant prefixes `tenants` only (0 is the first).
    pub fn unique_of(
        &mut self,
        topology: &Topology,
        tenants: std::ops::Range<u32>,
        start: u32,
    ) -> anyhow::Result<()> {
        self.configure(topology, PKTGEN_UNIQUE, tenants, 0, start)
    }

    fn configure(
        &mut self,
        topology: &Topology,
        mode: u32,
        tenants: std::ops::Range<u32>,
        flows: u32,
        start: u32,
    ) -> anyhow::Result<()> {
        let mut config: Array<_, PktgenConfig> = Array::try_from(
            self.ebpf
                .map_mut("PKTGEN_CONFIG")
                .context("PKTGEN_CONFIG")?,
        )?;
        config.set(
            0,
            PktgenConfig {
                mode,
                flows,
                tenants: tenants.end - tenants.start,
                hosts: HOSTS,
                start,
                tenant_stride: TENANT_STRIDE,
                src_base: u32::from(TENANT_BASE) + tenants.start * TENANT_STRIDE,
                port_base: 1024,
                dst_port: BLAST_PORT,
                dst_addr: u32::from(SINK_ADDR),
                eth_src: topology.s0_mac,
                eth_dst: topology.g0_mac,
                ipv6: u32::from(self.ipv6),
                src_base_v6: tenant_prefix_v6(tenants.start).octets(),
                dst_addr_v6: SINK_ADDR_V6.octets(),
            },
            0,
        )?;
        Ok(())
    }

    /// Sends `packets` frames from the sender's veth as fast as one CPU can
    /// (BPF_PROG_RUN, live frames, XDP_TX), on `cpu`. Returns how long it
    /// took.
    pub fn send(&self, topology: &Topology, packets: u32, cpu: usize) -> anyhow::Result<Duration> {
        let xdp: &Xdp = self.ebpf.program("pktgen").context("pktgen")?.try_into()?;
        let frame = if self.ipv6 {
            &self.frame_v6
        } else {
            &self.frame
        };
        let md = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: self.s0,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        // SAFETY: XdpMd is plain old data.
        let ctx =
            unsafe { std::slice::from_raw_parts((&raw const md).cast::<u8>(), size_of::<XdpMd>()) };
        pin(0, cpu)?;
        let started = Instant::now();
        // The kernel caps one call's repeat count; send in rounds.
        let mut left = packets;
        while left > 0 {
            let round = left.min(1 << 24);
            inside(&topology.src, || {
                xdp.test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(ctx),
                    repeat: round,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..TestRunOptions::default()
                })
            })
            .context("BPF_PROG_RUN live frames")?;
            left -= round;
        }
        Ok(started.elapsed())
    }

    pub fn counts(&self) -> anyhow::Result<Counts> {
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS")?)?;
        let sum = |index: u32| -> anyhow::Result<u64> { Ok(counters.get(&index, 0)?.iter().sum()) };
        Ok(Counts {
            received: sum(SINK_RECEIVED)?,
            translated: sum(SINK_TRANSLATED)?,
            sent: sum(PKTGEN_SENT)?,
        })
    }
}

#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// A minimum-size UDP frame (64 bytes on the wire with FCS).
fn template_frame(topology: &Topology) -> Vec<u8> {
    let mut frame = Vec::new();
    let src = Ipv4Addr::from(u32::from(TENANT_BASE) + 1);
    etherparse::PacketBuilder::ethernet2(topology.s0_mac, topology.g0_mac)
        .ipv4(src.octets(), SINK_ADDR.octets(), 64)
        .udp(1024, BLAST_PORT)
        .write(&mut frame, &[0u8; 18])
        .expect("template frame");
    frame
}

/// The IPv6 template: the same UDP datagram, from tenant 0's first host.
fn template_frame_v6(topology: &Topology) -> Vec<u8> {
    let mut frame = Vec::new();
    let src = std::net::Ipv6Addr::from(u128::from(tenant_prefix_v6(0)) + 1);
    etherparse::PacketBuilder::ethernet2(topology.s0_mac, topology.g0_mac)
        .ipv6(src.octets(), SINK_ADDR_V6.octets(), 64)
        .udp(1024, BLAST_PORT)
        .write(&mut frame, &[0u8; 4])
        .expect("template frame");
    frame
}
