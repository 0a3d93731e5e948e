//! The dataplane programs' own cost per packet, from BPF_PROG_TEST_RUN.
//!
//! The kernel reruns a program `repeat` times on the same buffer without
//! restoring it, so a translating program would time its own output after
//! the first run (an egress address, which takes another path). The hit
//! paths are therefore timed on a flow whose translation is the identity:
//! an egress address and port that map to themselves, with a host route
//! sending that address inside for the reply path. TTL still drops by one
//! per run, so each call repeats 250 times and many calls are averaged. A
//! new flow cannot repeat at all (the second run finds it): it is timed as
//! single runs on distinct frames, and reported as the hit cost plus what
//! a single new-flow run costs over a single hit run.
//!
//! Both compilations of the packet path are timed the same way: XDP
//! (`snat_outbound`, `snat_reply` on an xdp_md) and TC (`tc_outbound`,
//! `tc_reply` on a socket buffer the kernel builds once per call).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use anyhow::Context as _;
use aya::maps::lpm_trie::Key;
use egress_common::{
    flow::{
        DIR_OUTBOUND, DIR_REPLY, FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6, PROTO_UDP,
        REPLY_ZONE,
    },
    tenant::{ANY_PORT, PORT_PREFIX_BITS, SourceKeyV4, SourceKeyV6},
};
use egress_tests::{
    frames, frames6,
    harness::{CONFIG_DUAL_STACK, Harness, PacketHook},
};
use serde::Serialize;

use crate::{
    profile::{self, Profile},
    topology::{egress_ip, tenant_prefix},
};

#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    /// `xdp` or `tc`: which compilation of the packet path.
    pub hook: &'static str,
    pub path: String,
    pub ns_per_packet: f64,
    pub method: String,
}

const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The identity flow's address and port: an egress address routed inside.
const LOOP_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 201);
/// The link-layer address pinned for the identity flow's next hop.
const LOOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const LOOP_PORT: u16 = 40000;
const REPEAT: u32 = 250;
/// Each timed call with a repeat count flips a kernel static key on entry
/// and exit (several milliseconds of wall time), so calls stay few.
const CALLS: u32 = 400;

/// Flows the measured (last) tenant may hold: every new flow the
/// measurements and the profile create, so that none of them is refused by
/// its quota (an equal share of the table with 10,000 tenants is 26 flows,
/// and a refused flow costs less than a created one).
const MEASURED_TENANT_FLOWS: u32 = 200_000;

fn config(tenants: u32) -> String {
    let mut yaml = String::from(
        "interfaces: {internal: [int0], external: ext0}\nconntrack: {maxFlows: 262144}\ntenants:\n",
    );
    for t in 0..tenants {
        let quota = if t + 1 == tenants {
            format!(", maxFlows: {MEASURED_TENANT_FLOWS}")
        } else {
            String::new()
        };
        let _ = writeln!(
            yaml,
            "  - {{name: t{t}, sources: [{}/24], egressIPs: [{}]{quota}}}",
            tenant_prefix(t),
            egress_ip(t)
        );
    }
    yaml
}

/// Adds the identity flow of the last tenant; returns its frames.
fn identity_flow(h: &mut Harness, tenants: u32) -> (Vec<u8>, Vec<u8>) {
    let ns = h.netns();
    ns.ip(&["route", "add", &format!("{LOOP_ADDR}/32"), "dev", "int0"]);
    ns.static_neighbour(LOOP_ADDR, LOOP_MAC, "int0");
    let ids = h.maps.tenant_ids().expect("tenant ids");
    let tenant = ids[&format!("t{}", tenants - 1)];
    let source = Key::new(
        PORT_PREFIX_BITS + 32,
        SourceKeyV4 {
            port_be: ANY_PORT.to_be(),
            addr: LOOP_ADDR.octets(),
        },
    );
    h.maps
        .sources
        .insert(&source, u32::from(tenant), 0)
        .expect("source");
    h.maps
        .egress
        .insert(LOOP_ADDR.octets(), u32::from(tenant), 0)
        .expect("egress");
    let outbound = FlowKeyV4 {
        src: LOOP_ADDR.octets(),
        dst: REMOTE.octets(),
        src_port: LOOP_PORT.to_be(),
        dst_port: 53u16.to_be(),
        proto: PROTO_UDP,
        direction: DIR_OUTBOUND,
        zone: ANY_PORT as u16,
    };
    let entry = FlowEntryV4 {
        nat_addr: LOOP_ADDR.octets(),
        nat_port: LOOP_PORT.to_be(),
        tenant,
        ..FlowEntryV4::default()
    };
    h.maps
        .conntrack
        .insert(outbound, entry, 0)
        .expect("outbound half");
    let reply = FlowKeyV4 {
        src: REMOTE.octets(),
        dst: LOOP_ADDR.octets(),
        src_port: 53u16.to_be(),
        dst_port: LOOP_PORT.to_be(),
        proto: PROTO_UDP,
        direction: DIR_REPLY,
        zone: REPLY_ZONE,
    };
    h.maps
        .conntrack
        .insert(reply, entry, 0)
        .expect("reply half");
    let sock = |ip: Ipv4Addr, port: u16| SocketAddrV4::new(ip, port);
    let ttl = |frame: Vec<u8>| frames::edit_ipv4(&frame, |ip| ip.time_to_live = 255);
    (
        ttl(frames::udp(
            sock(LOOP_ADDR, LOOP_PORT),
            sock(REMOTE, 53),
            &[0; 18],
        )),
        ttl(frames::udp(
            sock(REMOTE, 53),
            sock(LOOP_ADDR, LOOP_PORT),
            &[0; 18],
        )),
    )
}

fn tenant_count(tenants: u32) -> String {
    format!("{tenants} tenant{}", if tenants == 1 { "" } else { "s" })
}

fn mean(calls: u32, mut run: impl FnMut() -> std::time::Duration) -> f64 {
    (0..calls).map(|_| run().as_nanos() as f64).sum::<f64>() / f64::from(calls)
}

fn hook_name(hook: PacketHook) -> &'static str {
    match hook {
        PacketHook::Xdp => "xdp",
        PacketHook::Tc => "tc",
    }
}

/// Costs with `tenants` tenants configured, at XDP and at TC, each path's
/// TC figure after its XDP one; `singles` distinct frames for the
/// single-run figures.
pub fn measure(tenants: u32, singles: u16) -> Vec<Cost> {
    let xdp = measure_hook(tenants, singles, PacketHook::Xdp);
    let tc = measure_hook(tenants, singles, PacketHook::Tc);
    xdp.into_iter().zip(tc).flat_map(|(x, t)| [x, t]).collect()
}

/// Costs of one hook's programs, in a harness of their own.
fn measure_hook(tenants: u32, singles: u16, hook: PacketHook) -> Vec<Cost> {
    let mut h = Harness::with_config(&config(tenants));
    h.hook = hook;
    let (outbound, reply) = identity_flow(&mut h, tenants);
    let out = h.outbound(&outbound);
    assert_eq!(
        out.action,
        egress_tests::harness::XDP_REDIRECT,
        "the identity flow must be a hit"
    );
    assert_eq!(
        out.frame[26..30],
        LOOP_ADDR.octets(),
        "and translate to itself"
    );
    assert_eq!(h.reply(&reply).action, egress_tests::harness::XDP_REDIRECT);
    let hit = mean(CALLS, || h.time_outbound(&outbound, REPEAT));
    let back = mean(CALLS, || h.time_reply(&reply, REPEAT));

    let host = Ipv4Addr::from(u32::from(tenant_prefix(tenants - 1)) + 1);
    let sock = |ip: Ipv4Addr, port: u16| SocketAddrV4::new(ip, port);
    let hit_single = mean(u32::from(singles), || h.time_outbound(&outbound, 1));
    let mut port = 2000u16;
    let new_single = mean(u32::from(singles), || {
        port += 1;
        h.time_outbound(
            &frames::udp(sock(host, port), sock(REMOTE, 53), &[0; 18]),
            1,
        )
    });
    // The same with the translation log on: each new flow also reports
    // itself through the ring, which a reader drains meanwhile as the
    // agent's pipeline does.
    let logged_single = with_flow_events(&h, || {
        mean(u32::from(singles), || {
            port += 1;
            h.time_outbound(
                &frames::udp(sock(host, port), sock(REMOTE, 53), &[0; 18]),
                1,
            )
        })
    });
    let logged_hit = with_flow_events(&h, || mean(CALLS, || h.time_outbound(&outbound, REPEAT)));
    assert_eq!(
        h.counter(egress_common::counters::Counter::OutDropTenantQuota),
        0,
        "every timed new flow must be created, not refused"
    );
    assert_eq!(
        h.counter(egress_common::counters::Counter::EventsLost),
        0,
        "every timed new flow's event must reach the reader"
    );
    let label = |path: &str| format!("{path}, {}", tenant_count(tenants));
    let repeated = format!("mean of {CALLS} calls x {REPEAT} repeats");
    let hook = hook_name(hook);
    vec![
        Cost {
            hook,
            path: label("outbound, conntrack hit"),
            ns_per_packet: hit,
            method: repeated.clone(),
        },
        Cost {
            hook,
            path: label("reply, conntrack hit"),
            ns_per_packet: back,
            method: repeated,
        },
        Cost {
            hook,
            path: label("outbound, new flow"),
            ns_per_packet: hit + (new_single - hit_single),
            method: format!(
                "hit + (single new-flow run {new_single:.0} - single hit run {hit_single:.0}), {singles} runs each"
            ),
        },
        Cost {
            hook,
            path: label("outbound, conntrack hit, translation log on"),
            ns_per_packet: logged_hit,
            method: format!("mean of {CALLS} calls x {REPEAT} repeats"),
        },
        Cost {
            hook,
            path: label("outbound, new flow, translation log on"),
            ns_per_packet: hit + (logged_single - hit_single),
            method: format!(
                "hit + (single new-flow run with its event {logged_single:.0} - single hit run {hit_single:.0}), {singles} runs each"
            ),
        },
    ]
}

const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);
/// The IPv6 identity flow's address: an egress address routed inside.
const LOOP_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x31, 0, 0, 0, 0, 0x201);
/// A host of tenant-a in `CONFIG_DUAL_STACK`.
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);

/// Adds an IPv6 identity flow to tenant-a of `CONFIG_DUAL_STACK`, as
/// `identity_flow` does for IPv4; returns its frames (hop limit 255, so
/// 250 repeats never reach the limit).
fn identity_flow_v6(h: &mut Harness) -> (Vec<u8>, Vec<u8>) {
    let ns = h.netns();
    ns.ip(&[
        "-6",
        "route",
        "add",
        &format!("{LOOP_ADDR_V6}/128"),
        "dev",
        "int0",
    ]);
    ns.static_neighbour(LOOP_ADDR_V6, LOOP_MAC, "int0");
    let tenant = h.maps.tenant_ids().expect("tenant ids")["tenant-a"];
    let source = Key::new(
        PORT_PREFIX_BITS + 128,
        SourceKeyV6 {
            port_be: ANY_PORT.to_be(),
            addr: LOOP_ADDR_V6.octets(),
        },
    );
    h.maps
        .sources_v6
        .insert(&source, u32::from(tenant), 0)
        .expect("source");
    h.maps
        .egress_v6
        .insert(LOOP_ADDR_V6.octets(), u32::from(tenant), 0)
        .expect("egress");
    let outbound = FlowKeyV6 {
        src: LOOP_ADDR_V6.octets(),
        dst: REMOTE_V6.octets(),
        src_port: LOOP_PORT.to_be(),
        dst_port: 53u16.to_be(),
        proto: PROTO_UDP,
        direction: DIR_OUTBOUND,
        zone: ANY_PORT as u16,
    };
    let entry = FlowEntryV6 {
        nat_addr: LOOP_ADDR_V6.octets(),
        nat_port: LOOP_PORT.to_be(),
        tenant,
        ..FlowEntryV6::default()
    };
    h.maps
        .conntrack_v6
        .insert(outbound, entry, 0)
        .expect("outbound half");
    let reply = FlowKeyV6 {
        src: REMOTE_V6.octets(),
        dst: LOOP_ADDR_V6.octets(),
        src_port: 53u16.to_be(),
        dst_port: LOOP_PORT.to_be(),
        proto: PROTO_UDP,
        direction: DIR_REPLY,
        zone: REPLY_ZONE,
    };
    h.maps
        .conntrack_v6
        .insert(reply, entry, 0)
        .expect("reply half");
    let sock = |ip: Ipv6Addr, port: u16| SocketAddrV6::new(ip, port, 0, 0);
    let limit = |frame: Vec<u8>| frames6::with_hop_limit(&frame, 255);
    (
        limit(frames6::udp(
            sock(LOOP_ADDR_V6, LOOP_PORT),
            sock(REMOTE_V6, 53),
            &[0; 18],
        )),
        limit(frames6::udp(
            sock(REMOTE_V6, 53),
            sock(LOOP_ADDR_V6, LOOP_PORT),
            &[0; 18],
        )),
    )
}

/// IPv6's costs beside IPv4's: hit both ways and a new flow, on each hook,
/// with the dual-stack seed tenants. Each IPv6 packet pays the IPv4
/// program's EtherType test and a tail call into the IPv6 program (a new
/// flow a second one), which these figures include.
pub fn measure_v6(singles: u16) -> Vec<Cost> {
    let mut costs = Vec::new();
    for hook in [PacketHook::Xdp, PacketHook::Tc] {
        // Room for every timed new flow: the seed's 4096 flows, shared by
        // its two tenants, are fewer than a full run's singles.
        let config = CONFIG_DUAL_STACK.replace("maxFlows: 4096", "maxFlows: 262144");
        assert_ne!(config, CONFIG_DUAL_STACK, "the seed's table size moved");
        let mut h = Harness::with_config(&config);
        h.hook = hook;
        let (outbound, reply) = identity_flow_v6(&mut h);
        let out = h.outbound(&outbound);
        assert_eq!(
            out.action,
            egress_tests::harness::XDP_REDIRECT,
            "the IPv6 identity flow must be a hit"
        );
        assert_eq!(frames6::View6::new(&out.frame).src(), LOOP_ADDR_V6);
        assert_eq!(h.reply(&reply).action, egress_tests::harness::XDP_REDIRECT);
        let hit = mean(CALLS, || h.time_outbound(&outbound, REPEAT));
        let back = mean(CALLS, || h.time_reply(&reply, REPEAT));
        let hit_single = mean(u32::from(singles), || h.time_outbound(&outbound, 1));
        let mut port = 2000u16;
        let new_single = mean(u32::from(singles), || {
            port += 1;
            h.time_outbound(
                &frames6::udp(
                    SocketAddrV6::new(HOST_V6, port, 0, 0),
                    SocketAddrV6::new(REMOTE_V6, 53, 0, 0),
                    &[0; 18],
                ),
                1,
            )
        });
        assert!(
            h.counter(egress_common::counters::Counter::OutNewFlow) >= u64::from(singles),
            "every timed IPv6 new flow must be created"
        );
        let hook = hook_name(hook);
        let repeated = format!("mean of {CALLS} calls x {REPEAT} repeats");
        costs.extend([
            Cost {
                hook,
                path: "IPv6 outbound, conntrack hit, 2 tenants".into(),
                ns_per_packet: hit,
                method: repeated.clone(),
            },
            Cost {
                hook,
                path: "IPv6 reply, conntrack hit, 2 tenants".into(),
                ns_per_packet: back,
                method: repeated,
            },
            Cost {
                hook,
                path: "IPv6 outbound, new flow, 2 tenants".into(),
                ns_per_packet: hit + (new_single - hit_single),
                method: format!(
                    "hit + (single new-flow run {new_single:.0} - single hit run {hit_single:.0}), {singles} runs each"
                ),
            },
        ]);
    }
    costs
}

/// Runs `measure` with the programs reporting new flows, and a thread
/// draining the ring as the agent does; turns reporting off again.
fn with_flow_events<T>(h: &Harness, measure: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};

    use egress_agent::{audit::ring::RingReader, dataplane::maps::Maps};
    use egress_common::config::CONFIG_F_FLOW_EVENTS;

    let mut maps = Maps::open(h.pin_dir()).expect("maps");
    let set = |maps: &mut Maps, on: bool| {
        let mut config = maps.config.get(&0, 0).expect("DP_CONFIG");
        config.flags = if on {
            config.flags | CONFIG_F_FLOW_EVENTS
        } else {
            config.flags & !CONFIG_F_FLOW_EVENTS
        };
        maps.config.set(0, config, 0).expect("DP_CONFIG");
    };
    let mut ring = RingReader::open(h.pin_dir()).expect("ring");
    let stop = AtomicBool::new(false);
    set(&mut maps, true);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut events = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                events.clear();
                ring.drain(8192, &mut events);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        let result = measure();
        stop.store(true, Ordering::Relaxed);
        result
    });
    set(&mut maps, false);
    result
}

/// Profiles of the XDP outbound program with `tenants` tenants, scaled to
/// the costs `measure` found for them: `hit_calls` calls of the hit path as
/// timed there, and `new_flows` new flows as single runs.
pub fn profile(
    tenants: u32,
    hit_calls: u32,
    new_flows: u32,
    costs: &[Cost],
) -> anyhow::Result<Vec<Profile>> {
    let cost = |path: &str| {
        costs
            .iter()
            .find(|c| c.hook == "xdp" && c.path == format!("{path}, {}", tenant_count(tenants)))
            .map(|c| c.ns_per_packet)
            .context("profiling needs the costs measured first")
    };
    let (hit_ns, new_ns) = (
        cost("outbound, conntrack hit")?,
        cost("outbound, new flow")?,
    );
    let mut h = Harness::with_config(&config(tenants));
    h.hook = PacketHook::Xdp;
    let (outbound, _) = identity_flow(&mut h, tenants);
    let host = Ipv4Addr::from(u32::from(tenant_prefix(tenants - 1)) + 2);
    // Built before sampling starts; every frame a distinct 5-tuple towards
    // the routed "internet".
    let fresh: Vec<Vec<u8>> = (0..new_flows)
        .map(|i| {
            let port = 1024 + (i % 60_000) as u16;
            let remote = Ipv4Addr::new(198, 51, 100, 1 + (i / 60_000) as u8);
            frames::udp(
                SocketAddrV4::new(host, port),
                SocketAddrV4::new(remote, 53),
                &[0; 18],
            )
        })
        .collect();
    let label = |path: &str| format!("{path}, {}", tenant_count(tenants));
    let records = vec![
        profile::record(
            &label("outbound, conntrack hit"),
            hit_ns,
            u64::from(hit_calls),
            u64::from(REPEAT),
            |_| {
                h.time_outbound(&outbound, REPEAT);
            },
        )?,
        profile::record(
            &label("outbound, new flow"),
            new_ns,
            u64::from(new_flows),
            1,
            |call| {
                h.time_outbound(&fresh[call as usize], 1);
            },
        )?,
    ];
    anyhow::ensure!(
        h.counter(egress_common::counters::Counter::OutDropTenantQuota) == 0,
        "the profiled new flows must be created, not refused by the quota"
    );
    Ok(records)
}

/// Flows in the table while a walk of `conntrack_sweep` is timed.
const SWEEP_FLOWS: u32 = 100_000;
const SWEEP_WALKS: u32 = 20;

/// What the dataplane's own flow expiry (`conntrack_sweep`, Kube-OVN egress
/// gateway pods) costs: every packet while no walk is due, and one walk of
/// the whole table (262,144 flows' room, `SWEEP_FLOWS` held, none expired,
/// so each walk sees the same table).
pub fn measure_sweep() -> Vec<Cost> {
    use egress_agent::{config::Timeouts, conntrack};
    use egress_common::names::PROG_CONNTRACK_SWEEP;

    let mut h = Harness::with_config(&config(1));
    h.hook = PacketHook::Tc;
    let frame = frames::udp(
        SocketAddrV4::new(Ipv4Addr::new(172, 20, 0, 10), 9),
        SocketAddrV4::new(REMOTE, 9),
        &[0; 18],
    );
    let hour = std::time::Duration::from_secs(3600);
    let timeouts = Timeouts {
        tcp_syn_sent: hour,
        tcp_established: hour,
        tcp_fin_wait: hour,
        tcp_time_wait: hour,
        tcp_close: hour,
        udp: hour,
        udp_replied: hour,
        icmp: hour,
    };
    let mut idle = conntrack::self_sweep(hour, &timeouts);
    idle.last_ns = conntrack::now_ns();
    h.maps.self_sweep.set(0, idle, 0).expect("SELF_SWEEP");
    let not_due = mean(CALLS, || {
        h.time_internal_tc(PROG_CONNTRACK_SWEEP, &frame, REPEAT)
    });

    // Flows seen just now are passed over without looking at their other
    // half; flows idle longer than the shortest timeout (TCP close, 10 s
    // here) but not their own (UDP, an hour) cost a second lookup each.
    let timeouts = Timeouts {
        tcp_close: std::time::Duration::from_secs(10),
        ..timeouts
    };
    let slots = h.maps.conntrack_capacity;
    let now = conntrack::now_ns();
    let mut walks = Vec::new();
    for (label, last_seen_ns) in [
        ("all seen just now", now),
        ("all idle 2 min", now - 120_000_000_000),
    ] {
        fill_table(&mut h, SWEEP_FLOWS, last_seen_ns);
        // Due at every run: each timed run walks the whole table.
        let mut due = conntrack::self_sweep(std::time::Duration::from_nanos(1), &timeouts);
        due.last_ns = 0;
        h.maps.self_sweep.set(0, due, 0).expect("SELF_SWEEP");
        let walk = mean(SWEEP_WALKS, || {
            h.time_internal_tc(PROG_CONNTRACK_SWEEP, &frame, 1)
        });
        let after = h.maps.self_sweep.get(&0, 0).expect("SELF_SWEEP");
        assert_eq!(after.ended, 0, "a timed walk must end nothing");
        assert_eq!(
            u64::from(SWEEP_WALKS),
            after.walks,
            "every timed run walked"
        );
        walks.push(Cost {
            hook: "tc",
            path: format!(
                "conntrack_sweep, one walk: {slots} slots, {SWEEP_FLOWS} flows {label} ({:.0} ns per flow)",
                walk / f64::from(SWEEP_FLOWS)
            ),
            ns_per_packet: walk,
            method: format!("mean of {SWEEP_WALKS} single runs, each a whole walk"),
        });
    }
    let mut costs = vec![Cost {
        hook: "tc",
        path: "conntrack_sweep, no walk due (every packet, egress gateway pods)".into(),
        ns_per_packet: not_due,
        method: format!("mean of {CALLS} calls x {REPEAT} repeats"),
    }];
    costs.extend(walks);
    costs
}

/// Puts (or refreshes) `flows` UDP flows, both halves, last seen at
/// `now`, into the table.
fn fill_table(h: &mut Harness, flows: u32, now: u64) {
    for i in 0..flows {
        let host = Ipv4Addr::from(0x0a00_0000 + i);
        let port = (1024 + (i % 60_000)) as u16;
        let outbound = FlowKeyV4 {
            src: host.octets(),
            dst: REMOTE.octets(),
            src_port: 5353u16.to_be(),
            dst_port: 53u16.to_be(),
            proto: PROTO_UDP,
            direction: DIR_OUTBOUND,
            zone: 0,
        };
        let nat = Ipv4Addr::from(0xc0a8_1f00 + (i / 60_000));
        let entry = FlowEntryV4 {
            last_seen_ns: now,
            nat_addr: nat.octets(),
            nat_port: port.to_be(),
            ..FlowEntryV4::default()
        };
        let reply = outbound.peer_key(&entry);
        let back = FlowEntryV4 {
            last_seen_ns: now,
            nat_addr: host.octets(),
            nat_port: 5353u16.to_be(),
            ..FlowEntryV4::default()
        };
        h.maps
            .conntrack
            .insert(outbound, entry, 0)
            .expect("outbound half");
        h.maps.conntrack.insert(reply, back, 0).expect("reply half");
    }
}
