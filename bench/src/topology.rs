//! The benchmark topology: a sender, the gateway, a sink, each a network
//! namespace joined by veths.
//!
//! ```text
//!  src  s0 10.255.0.2 ──── g0 10.255.0.1  gw  g1 10.200.0.1 ──── k0 10.200.0.2  sink
//!       (pktgen, probes)        (gateway under test)              (counting XDP_DROP, echo)
//! ```
//!
//! Tenant t's hosts are 10.64.0.0 + 256·t + 1.. (a /24 each), its egress IP
//! 10.201.0.0 + t + 1; the sink routes 10.201.0.0/16 back to the gateway.
//! IPv6 beside it, for the IPv6 rows: s0 fd55::2, g0 fd55::1, g1 fd20::1,
//! k0 fd20::2; tenant t's hosts in fd64:0:t::/48, its egress IP
//! fd20:0:0:1::(t + 1), the sink routing fd20:0:0:1::/64 back.
//! The gateway's receive side runs as a threaded NAPI kthread pinned to the
//! gateway core and the sender on the other core, so a figure is what one
//! core of gateway forwards. The sink's XDP_DROP runs inline wherever its
//! veth is fed from (the gateway core): a few tens of nanoseconds charged to
//! every gateway alike, where a sink thread on the sender's busy core would
//! starve and lose packets the gateway did forward.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use egress_tests::netns::Netns;

pub const TENANT_BASE: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 0);
pub const TENANT_STRIDE: u32 = 256;
pub const EGRESS_BASE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 0);
pub const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const GW_EXTERNAL: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const GW_INTERNAL: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
pub const SRC_ADDR: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);
/// Latency probes come from a host of tenant 0 the generator never uses.
pub const PROBE_HOST: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 254);
pub const PROBE_PORT: u16 = 7777;
/// The generator's destination port.
pub const BLAST_PORT: u16 = 9;
/// Generator hosts per tenant prefix.
pub const HOSTS: u32 = 250;

pub const TENANT_BASE_V6: Ipv6Addr = Ipv6Addr::new(0xfd64, 0, 0, 0, 0, 0, 0, 0);
pub const EGRESS_BASE_V6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0, 0, 1, 0, 0, 0, 0);
pub const SINK_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0, 0, 0, 0, 0, 0, 2);
pub const GW_EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0, 0, 0, 0, 0, 0, 1);
pub const GW_INTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd55, 0, 0, 0, 0, 0, 0, 1);
pub const SRC_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0xfd55, 0, 0, 0, 0, 0, 0, 2);

/// Tenant `tenant`'s IPv6 hosts: a /48 each.
pub fn tenant_prefix_v6(tenant: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(TENANT_BASE_V6) + (u128::from(tenant) << 80))
}

pub fn egress_ip_v6(tenant: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(EGRESS_BASE_V6) + u128::from(tenant) + 1)
}

pub fn tenant_prefix(tenant: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(TENANT_BASE) + tenant * TENANT_STRIDE)
}

pub fn egress_ip(tenant: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(EGRESS_BASE) + tenant + 1)
}

pub struct Topology {
    pub src: Netns,
    pub gw: Netns,
    pub sink: Netns,
    pub s0_mac: [u8; 6],
    pub g0_mac: [u8; 6],
    pub g1_mac: [u8; 6],
    pub k0_mac: [u8; 6],
    pub s0: u32,
    pub g0: u32,
    pub g1: u32,
    pub k0: u32,
    /// Where the gateway's work runs, and where everything else does.
    pub gateway_cpu: usize,
    pub other_cpu: usize,
}

impl Topology {
    pub fn build() -> anyhow::Result<Self> {
        let src = Netns::new("bsrc");
        let gw = Netns::new("bgw");
        let sink = Netns::new("bsink");
        src.veth("s0", &gw, "g0");
        gw.veth("g1", &sink, "k0");
        src.ip(&["addr", "add", &format!("{SRC_ADDR}/24"), "dev", "s0"]);
        src.ip(&["addr", "add", &format!("{PROBE_HOST}/32"), "dev", "s0"]);
        src.ip(&[
            "route",
            "add",
            "10.200.0.0/16",
            "via",
            &GW_INTERNAL.to_string(),
            "src",
            &PROBE_HOST.to_string(),
        ]);
        gw.ip(&["addr", "add", &format!("{GW_INTERNAL}/24"), "dev", "g0"]);
        gw.ip(&["addr", "add", &format!("{GW_EXTERNAL}/16"), "dev", "g1"]);
        gw.ip(&["route", "add", "10.64.0.0/10", "via", &SRC_ADDR.to_string()]);
        gw.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        sink.ip(&["addr", "add", &format!("{SINK_ADDR}/16"), "dev", "k0"]);
        sink.ip(&[
            "route",
            "add",
            "10.201.0.0/16",
            "via",
            &GW_EXTERNAL.to_string(),
        ]);
        // IPv6 beside it, without duplicate address detection, which
        // would hold the addresses back for a second and more.
        gw.run("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        for (ns, addr, dev) in [
            (&src, format!("{SRC_ADDR_V6}/64"), "s0"),
            (&gw, format!("{GW_INTERNAL_V6}/64"), "g0"),
            (&gw, format!("{GW_EXTERNAL_V6}/64"), "g1"),
            (&sink, format!("{SINK_ADDR_V6}/64"), "k0"),
        ] {
            ns.ip(&["addr", "add", &addr, "dev", dev, "nodad"]);
        }
        src.ip(&[
            "-6",
            "route",
            "add",
            "fd20::/16",
            "via",
            &GW_INTERNAL_V6.to_string(),
        ]);
        gw.ip(&[
            "-6",
            "route",
            "add",
            "fd64::/16",
            "via",
            &SRC_ADDR_V6.to_string(),
        ]);
        sink.ip(&[
            "-6",
            "route",
            "add",
            "fd20:0:0:1::/64",
            "via",
            &GW_EXTERNAL_V6.to_string(),
        ]);
        // Offloads stay the kernel's defaults here: only the xdp gateway
        // turns TX checksum offload off, for its own run (gateways.rs).
        let topology = Self {
            s0_mac: src.mac("s0"),
            g0_mac: gw.mac("g0"),
            g1_mac: gw.mac("g1"),
            k0_mac: sink.mac("k0"),
            s0: src.ifindex("s0"),
            g0: gw.ifindex("g0"),
            g1: gw.ifindex("g1"),
            k0: sink.ifindex("k0"),
            gateway_cpu: 1.min(cpus() - 1),
            other_cpu: 0,
            src,
            gw,
            sink,
        };
        // Static neighbours: ARP and neighbour discovery have no place in
        // a throughput figure.
        let neighbours = [
            (&topology.gw, IpAddr::from(SINK_ADDR), topology.k0_mac, "g1"),
            (&topology.gw, IpAddr::from(SRC_ADDR), topology.s0_mac, "g0"),
            (
                &topology.src,
                IpAddr::from(GW_INTERNAL),
                topology.g0_mac,
                "s0",
            ),
            (
                &topology.sink,
                IpAddr::from(GW_EXTERNAL),
                topology.g1_mac,
                "k0",
            ),
            (
                &topology.gw,
                IpAddr::from(SINK_ADDR_V6),
                topology.k0_mac,
                "g1",
            ),
            (
                &topology.gw,
                IpAddr::from(SRC_ADDR_V6),
                topology.s0_mac,
                "g0",
            ),
            (
                &topology.src,
                IpAddr::from(GW_INTERNAL_V6),
                topology.g0_mac,
                "s0",
            ),
            (
                &topology.sink,
                IpAddr::from(GW_EXTERNAL_V6),
                topology.g1_mac,
                "k0",
            ),
        ];
        for (ns, addr, lladdr, dev) in neighbours {
            ns.static_neighbour(addr, lladdr, dev);
        }
        Ok(topology)
    }

    /// Moves a veth's receive processing to a kthread on `cpu` (or back
    /// inline with `None`). The veth must have NAPI (an XDP program or GRO).
    pub fn set_napi_thread(&self, ns: &Netns, dev: &str, cpu: Option<usize>) -> anyhow::Result<()> {
        let before = napi_threads();
        // /sys/class/net shows the namespace of its mounter: `ip netns exec`
        // mounts one for the namespace.
        let value = if cpu.is_some() { 1 } else { 0 };
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "sh",
                "-c",
                &format!("echo {value} > /sys/class/net/{dev}/threaded"),
            ])
            .output()
            .context("ip netns exec")?;
        if !out.status.success() {
            bail!(
                "threaded NAPI on {dev}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let Some(cpu) = cpu else { return Ok(()) };
        std::thread::sleep(Duration::from_millis(50));
        let fresh: Vec<i32> = napi_threads().difference(&before).copied().collect();
        if fresh.is_empty() {
            bail!("no NAPI thread appeared for {dev}");
        }
        for pid in fresh {
            pin(pid, cpu)?;
        }
        Ok(())
    }
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn napi_threads() -> BTreeSet<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("napi/"))
        })
        .collect()
}

/// Pins a thread (0: the calling one) to one CPU.
pub fn pin(pid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, passed by pointer.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            bail!(
                "pinning {pid} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Busy time of one CPU so far, from /proc/stat (user to steal), in ns.
pub fn cpu_busy_ns(cpu: usize) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .with_context(|| format!("no cpu{cpu} in /proc/stat"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(busy * 1_000_000_000 / hz)
}
