//! Isolation between tenants, on the real programs (BPF_PROG_TEST_RUN) with
//! the agent's own sweeper: a tenant at its flow quota or above its rate gets
//! its own verdict while others go on; a full table refuses new flows and
//! evicts nothing; a flow is in the table with both halves or not at all;
//! from outside, nothing reaches an internal network unless it is a reply.
//! Run for both hooks (`EGRESS_TEST_HOOK=tc`). Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};

use egress_agent::{config::Timeouts, conntrack};
use egress_common::{
    counters::Counter,
    flow::{DIR_REPLY, FlowEntryV4, FlowKeyV4, PROTO_UDP, REPLY_ZONE},
};
use egress_tests::{
    frames::{self, View},
    harness::{Harness, XDP_DROP, XDP_PASS, XDP_REDIRECT},
    require_root,
};

const HOST_A: Ipv4Addr = Ipv4Addr::new(172, 20, 10, 10);
const HOST_B: Ipv4Addr = Ipv4Addr::new(172, 20, 20, 10);
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 101);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 31, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn harness(yaml: &str) -> Option<Harness> {
    require_root().then(|| Harness::with_config(yaml))
}

fn config(tenant_a_extra: &str, max_flows: u32) -> String {
    format!(
        "\
interfaces: {{internal: [int0], external: ext0}}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
{tenant_a_extra}
  - name: tenant-b
    sources: [172.20.20.0/24]
    egressIPs: [192.168.31.150]
conntrack: {{maxFlows: {max_flows}}}
"
    )
}

/// A new UDP flow from `host`'s port `port` to the remote's port 53.
fn new_flow(host: Ipv4Addr, port: u16) -> Vec<u8> {
    frames::udp(sock(host, port), sock(REMOTE, 53), b"q")
}

/// Per tenant name: (flows held, quota drops, rate drops), from the maps.
fn usage(h: &Harness, tenant: &str) -> (u64, u64, u64) {
    let ids = h.maps.tenant_ids().expect("ids");
    let id = ids[tenant];
    let (usage, ended) = h.maps.tenant_usage().expect("usage")[usize::from(id)];
    (usage.live(ended), usage.quota_drops, usage.rate_drops)
}

#[test]
fn a_tenant_at_its_quota_gets_its_own_verdict_and_the_others_go_on() {
    let Some(mut h) = harness(&config("    maxFlows: 8", 64)) else {
        return;
    };
    for port in 0..8 {
        assert_eq!(
            h.outbound(&new_flow(HOST_A, 1000 + port)).action,
            XDP_REDIRECT
        );
    }
    assert_eq!(usage(&h, "tenant-a"), (8, 0, 0));

    // The ninth is refused with the quota's own verdict...
    assert_eq!(h.outbound(&new_flow(HOST_A, 2000)).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropTenantQuota), 1);
    assert_eq!(usage(&h, "tenant-a"), (8, 1, 0));
    // ...while its established flows go on, and the other tenant, whose
    // share is what tenant-a's own figure leaves (56), opens flows.
    assert_eq!(h.outbound(&new_flow(HOST_A, 1003)).action, XDP_REDIRECT);
    for port in 0..20 {
        assert_eq!(
            h.outbound(&new_flow(HOST_B, 1000 + port)).action,
            XDP_REDIRECT
        );
    }
    assert_eq!(usage(&h, "tenant-b"), (20, 0, 0));
    assert_eq!(h.counter(Counter::OutDropTenantQuota), 1);
    h.assert_no_half_entries();

    // The sweeper ending tenant-a's flows gives the room back.
    let report = h.sweep(
        conntrack::now_ns() + 3_600 * 1_000_000_000,
        &Timeouts::default(),
    );
    assert_eq!(report.flows_expired, 28);
    assert_eq!(usage(&h, "tenant-a").0, 0);
    assert_eq!(h.outbound(&new_flow(HOST_A, 2000)).action, XDP_REDIRECT);
    assert_eq!(usage(&h, "tenant-a"), (1, 1, 0));
}

#[test]
fn default_quotas_share_the_table_so_one_tenant_cannot_fill_it() {
    // Two tenants, no figures of their own: 16 flows each of 32.
    let Some(h) = harness(&config("", 32)) else {
        return;
    };
    let mut refused = 0;
    for port in 0..40 {
        if h.outbound(&new_flow(HOST_A, 1000 + port)).action == XDP_DROP {
            refused += 1;
        }
    }
    assert_eq!(refused, 24);
    assert_eq!(h.counter(Counter::OutDropTenantQuota), 24);
    assert_eq!(h.counter(Counter::OutDropConntrackFull), 0);
    for port in 0..16 {
        assert_eq!(
            h.outbound(&new_flow(HOST_B, 1000 + port)).action,
            XDP_REDIRECT
        );
    }
    assert_eq!(h.flow_count(), 32);
    h.assert_no_half_entries();
}

#[test]
fn a_full_table_refuses_new_flows_evicts_nothing_and_never_keeps_half_a_flow() {
    // Overcommitted on purpose: each tenant may take the whole table.
    let yaml = "\
interfaces: {internal: [int0], external: ext0}
tenants:
  - name: tenant-a
    sources: [172.20.10.0/24]
    egressIPs: [192.168.31.101]
    maxFlows: 16
  - name: tenant-b
    sources: [172.20.20.0/24]
    egressIPs: [192.168.31.150]
    maxFlows: 16
conntrack: {maxFlows: 16}
";
    let Some(mut h) = harness(yaml) else { return };
    // One stray entry takes a slot, so the table has room for one more
    // half but not for a whole flow.
    let stray = FlowKeyV4 {
        src: REMOTE.octets(),
        dst: EGRESS_A.octets(),
        src_port: 9u16.to_be(),
        dst_port: 9u16.to_be(),
        proto: PROTO_UDP,
        direction: DIR_REPLY,
        zone: REPLY_ZONE,
    };
    h.maps
        .conntrack
        .insert(stray, FlowEntryV4::default(), 0)
        .expect("stray entry");
    let mut opened = Vec::new();
    for port in 0..15 {
        let frame = new_flow(HOST_A, 1000 + port);
        assert_eq!(h.outbound(&frame).action, XDP_REDIRECT);
        opened.push(frame);
    }
    let before: Vec<_> = h.flows().iter().map(|f| f.outbound_key).collect();
    assert_eq!(before.len(), 15);

    // The last free slot takes a reply half, the outbound half finds no
    // room: the claimed half is given back and the flow does not exist.
    assert_eq!(h.outbound(&new_flow(HOST_B, 1000)).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropConntrackFull), 1);
    assert_eq!(h.counter(Counter::OutDropTenantQuota), 0);
    h.maps
        .conntrack
        .remove(&stray)
        .expect("removing the stray entry");
    h.assert_no_half_entries();
    // Nothing was evicted: every flow of the other tenant is there and
    // goes on.
    let after: Vec<_> = h.flows().iter().map(|f| f.outbound_key).collect();
    assert_eq!(after, before);
    for frame in &opened {
        assert_eq!(h.outbound(frame).action, XDP_REDIRECT);
    }
    assert_eq!(usage(&h, "tenant-b"), (0, 0, 0));

    // Room comes back when flows end, not by pushing others out.
    h.sweep(
        conntrack::now_ns() + 3_600 * 1_000_000_000,
        &Timeouts::default(),
    );
    assert_eq!(h.outbound(&new_flow(HOST_B, 1000)).action, XDP_REDIRECT);
    h.assert_no_half_entries();
}

#[test]
fn a_tenant_above_its_new_flow_rate_gets_its_own_verdict() {
    let Some(h) = harness(&config("    newFlowsPerSecond: 1\n    newFlowBurst: 3", 64)) else {
        return;
    };
    for port in 0..3 {
        assert_eq!(
            h.outbound(&new_flow(HOST_A, 1000 + port)).action,
            XDP_REDIRECT
        );
    }
    assert_eq!(h.outbound(&new_flow(HOST_A, 2000)).action, XDP_DROP);
    assert_eq!(h.counter(Counter::OutDropTenantRate), 1);
    assert_eq!(usage(&h, "tenant-a"), (3, 0, 1));
    // Established flows are not new flows; the other tenant has no limit.
    assert_eq!(h.outbound(&new_flow(HOST_A, 1001)).action, XDP_REDIRECT);
    for port in 0..10 {
        assert_eq!(
            h.outbound(&new_flow(HOST_B, 1000 + port)).action,
            XDP_REDIRECT
        );
    }
    assert_eq!(h.counter(Counter::OutDropTenantRate), 1);
}

#[test]
fn from_outside_only_replies_reach_inside() {
    let Some(h) = harness(&config("", 64)) else {
        return;
    };
    // Straight to a tenant host, to another internal network, and a SYN:
    // dropped at the external hook, no flow made.
    for frame in [
        frames::udp(sock(REMOTE, 5000), sock(HOST_A, 53), b"in"),
        frames::udp(
            sock(REMOTE, 5000),
            sock(Ipv4Addr::new(10, 128, 0, 10), 53),
            b"in",
        ),
        frames::tcp(sock(REMOTE, 5000), sock(HOST_B, 22), frames::Tcp::Syn, b""),
    ] {
        assert_eq!(h.reply(&frame).action, XDP_DROP);
    }
    assert_eq!(h.counter(Counter::InDropToInternal), 3);
    assert_eq!(h.flow_count(), 0);

    // The gateway's own address, and routes elsewhere, stay the kernel's.
    let to_gateway = frames::tcp(sock(REMOTE, 5000), sock(GATEWAY, 22), frames::Tcp::Syn, b"");
    assert_eq!(h.reply(&to_gateway).action, XDP_PASS);
    let elsewhere = frames::udp(
        sock(REMOTE, 5000),
        sock(Ipv4Addr::new(203, 0, 113, 9), 53),
        b"",
    );
    assert_eq!(h.reply(&elsewhere).action, XDP_PASS);
    assert_eq!(h.counter(Counter::InPassNotEgress), 2);

    // A reply of a flow a tenant opened still comes in.
    let out = h.outbound(&new_flow(HOST_A, 4000));
    assert_eq!(out.action, XDP_REDIRECT);
    let port = View::new(&out.frame).src_port();
    let reply = frames::udp(sock(REMOTE, 53), sock(EGRESS_A, port), b"a");
    assert_eq!(h.reply(&reply).action, XDP_REDIRECT);
    assert_eq!(h.counter(Counter::InDropToInternal), 3);
}

#[test]
fn adopted_maps_count_what_the_table_holds() {
    let Some(mut h) = harness(&config("    maxFlows: 4", 64)) else {
        return;
    };
    for port in 0..4 {
        assert_eq!(
            h.outbound(&new_flow(HOST_A, 1000 + port)).action,
            XDP_REDIRECT
        );
    }
    // An agent killed after removing two flows but before counting them:
    // the quota still thinks they are held.
    let flows = h.flows();
    for flow in &flows[..2] {
        let reply = flow.outbound_key.peer_key(&flow.outbound);
        h.maps.conntrack.remove(&flow.outbound_key).expect("remove");
        h.maps.conntrack.remove(&reply).expect("remove");
    }
    assert_eq!(h.outbound(&new_flow(HOST_A, 2000)).action, XDP_DROP);
    // The next agent adopts the maps and counts again.
    conntrack::reconcile_usage(&mut h.maps).expect("reconcile");
    assert_eq!(usage(&h, "tenant-a").0, 2);
    assert_eq!(h.outbound(&new_flow(HOST_A, 2000)).action, XDP_REDIRECT);
    assert_eq!(h.outbound(&new_flow(HOST_A, 2001)).action, XDP_REDIRECT);
    assert_eq!(h.outbound(&new_flow(HOST_A, 2002)).action, XDP_DROP);
}
