//! The IPFIX exporter against an independent decoder: translation events
//! sent by `egress_agent::audit::ipfix::IpfixExporter` to Debian's nfcapd
//! on 127.0.0.1, read back with nfdump. Each event must come back as an
//! RFC 8158 NAT44 session create or delete with its pre- and post-NAT
//! source, destination, protocol, tenant (as the ingress VRF) and, for
//! ends, the flow end reason. Needs nfdump (no namespaces, no root).

use std::{net::SocketAddrV4, time::Duration};

use egress_agent::{
    audit::{
        event::{EndReason, EventKind, Traffic, TranslationEvent},
        ipfix::IpfixExporter,
    },
    config::audit::IpfixPlan,
};
use egress_tests::collector::{NatRecord, Nfcapd};

fn plan(nfcapd: &Nfcapd) -> IpfixPlan {
    IpfixPlan {
        collector: nfcapd.address(),
        observation_domain: 42,
        template_interval: Duration::from_secs(600),
    }
}

#[allow(clippy::too_many_arguments)]
fn event(
    kind: EventKind,
    tenant: (&str, u16),
    protocol: &str,
    inside: &str,
    outside: &str,
    destination: &str,
    reason: Option<EndReason>,
) -> TranslationEvent {
    let end = kind == EventKind::End;
    TranslationEvent {
        event: kind,
        time: if end {
            "2026-12-02T14:05:00.250Z"
        } else {
            "2026-12-02T14:03:22.125Z"
        }
        .parse()
        .expect("time"),
        start: "2026-12-02T14:03:22.125Z".parse().expect("time"),
        tenant: tenant.0.into(),
        tenant_id: tenant.1,
        protocol: protocol.into(),
        inside: inside.parse().expect("inside"),
        outside: outside.parse().expect("outside"),
        destination: Some(destination.parse().expect("destination")),
        reason,
        outbound: end.then_some(Traffic {
            packets: 10,
            bytes: 1200,
        }),
        inbound: end.then_some(Traffic {
            packets: 8,
            bytes: 9000,
        }),
    }
}

/// What a test expects nfdump to show for an event.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    nat_event: u8,
    protocol: u8,
    inside: SocketAddrV4,
    outside: SocketAddrV4,
    destination: Option<SocketAddrV4>,
    vrf: u32,
    end_reason: u8,
}

impl From<&NatRecord> for Seen {
    fn from(r: &NatRecord) -> Self {
        Self {
            nat_event: r.nat_event,
            protocol: r.protocol,
            inside: r.inside,
            outside: r.outside,
            destination: r.destination,
            vrf: r.vrf,
            end_reason: r.end_reason,
        }
    }
}

fn v4(text: &str) -> SocketAddrV4 {
    text.parse().expect("IPv4 socket address")
}

const TENANT_A: (&str, u16) = ("tenant-a", 3);
const TENANT_B: (&str, u16) = ("tenant-b", 7);

/// TCP, UDP and ICMP flows of two tenants whose inside addresses overlap,
/// each created and ended.
fn flows() -> Vec<TranslationEvent> {
    use EventKind::{Create, End};
    let tcp = |kind, reason| {
        event(
            kind,
            TENANT_A,
            "tcp",
            "10.0.1.5:41234",
            "192.168.31.101:40312",
            "203.0.113.7:443",
            reason,
        )
    };
    let udp = |kind, reason| {
        event(
            kind,
            TENANT_B,
            "udp",
            "10.0.1.5:5353",
            "192.168.31.102:40001",
            "198.51.100.9:53",
            reason,
        )
    };
    // ICMP echo: identifier 0x1234 inside, 0x0abc outside.
    let icmp = |kind, reason| {
        event(
            kind,
            TENANT_A,
            "icmp",
            "10.0.1.6:4660",
            "192.168.31.101:2748",
            "203.0.113.8:0",
            reason,
        )
    };
    vec![
        tcp(Create, None),
        udp(Create, None),
        icmp(Create, None),
        tcp(End, Some(EndReason::Closed)),
        udp(End, Some(EndReason::Expired)),
        icmp(End, Some(EndReason::Orphaned)),
    ]
}

#[test]
fn nfdump_reads_creates_and_deletes_with_both_sides_of_the_translation() {
    let mut nfcapd = Nfcapd::start();
    let mut exporter = IpfixExporter::new(&plan(&nfcapd), true).expect("exporter");
    let events = flows();
    let report = exporter.export(&events).expect("export");
    assert_eq!(report.records, events.len(), "{report:?}");
    assert_eq!(report.skipped, 0);

    let records = nfcapd.records(events.len());
    let seen: Vec<Seen> = records.iter().map(Seen::from).collect();
    let tcp = |nat_event, end_reason| Seen {
        nat_event,
        protocol: 6,
        inside: v4("10.0.1.5:41234"),
        outside: v4("192.168.31.101:40312"),
        destination: Some(v4("203.0.113.7:443")),
        vrf: 3,
        end_reason,
    };
    let udp = |nat_event, end_reason| Seen {
        nat_event,
        protocol: 17,
        inside: v4("10.0.1.5:5353"),
        outside: v4("192.168.31.102:40001"),
        destination: Some(v4("198.51.100.9:53")),
        vrf: 7,
        end_reason,
    };
    // nfdump shows no ports for ICMP: the inside identifier is rebuilt
    // from its type and code, the destination keeps port 0.
    let icmp = |nat_event, end_reason| Seen {
        nat_event,
        protocol: 1,
        inside: v4("10.0.1.6:4660"),
        outside: v4("192.168.31.101:2748"),
        destination: Some(v4("203.0.113.8:0")),
        vrf: 3,
        end_reason,
    };
    // Creations carry no end reason (0); ends: closed is "end of flow
    // detected" (3), expired "idle timeout" (1), orphaned "lack of
    // resources" (5).
    let expected = vec![
        tcp(4, 0),
        udp(4, 0),
        icmp(4, 0),
        tcp(5, 3),
        udp(5, 1),
        icmp(5, 5),
    ];
    assert_eq!(
        seen,
        expected,
        "nfdump's records:\n{:#?}",
        records.iter().map(|r| &r.json).collect::<Vec<_>>()
    );
    for record in &records {
        let name = if record.nat_event == 4 {
            "NAT44 session create"
        } else {
            "NAT44 session delete"
        };
        assert_eq!(record.nat_event_name, name, "{:#}", record.json);
    }
}

#[test]
fn without_recorded_destinations_nfdump_shows_none() {
    let mut nfcapd = Nfcapd::start();
    let mut exporter = IpfixExporter::new(&plan(&nfcapd), false).expect("exporter");
    let events: Vec<TranslationEvent> = flows().into_iter().take(2).collect();
    let report = exporter.export(&events).expect("export");
    assert_eq!(report.records, 2, "{report:?}");

    let records = nfcapd.records(2);
    assert_eq!(records.len(), 2);
    for (record, event) in records.iter().zip(&events) {
        assert_eq!(record.destination, None, "{:#}", record.json);
        assert_eq!(
            record.json["dst_port"], 0,
            "no destination port: {:#}",
            record.json
        );
        assert_eq!(
            std::net::SocketAddr::V4(record.inside),
            event.inside,
            "{:#}",
            record.json
        );
        assert_eq!(
            std::net::SocketAddr::V4(record.outside),
            event.outside,
            "{:#}",
            record.json
        );
        assert_eq!(record.vrf, u32::from(event.tenant_id));
    }
}
