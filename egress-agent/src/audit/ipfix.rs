//! The IPFIX exporter: translation events sent to a collector over UDP as
//! RFC 8158 NAT44 session create (natEvent 4) and delete (natEvent 5)
//! records, in RFC 7011 messages. Collectors that know RFC 8158 (nfdump,
//! vendor CGN log servers) then answer "who held this egress address and
//! port" without our JSON log.
//!
//! Templates (ids 256 and up, one for creations and one for ends) are sent
//! before the first records and again every `template_interval`, as RFC 7011
//! §8.4 asks of UDP exporters so a restarted collector learns them again.
//! Each message stays within 1400 bytes (no record is split) so it crosses
//! any path without fragmenting.
//!
//! Elements (IANA IPFIX registry ids):
//!
//! | element | id | bytes | from |
//! | --- | --- | --- | --- |
//! | observationTimeMilliseconds | 323 | 8 | `time` |
//! | natEvent | 230 | 1 | 4 create, 5 end |
//! | protocolIdentifier | 4 | 1 | `protocol` |
//! | sourceIPv4Address | 8 | 4 | `inside` |
//! | sourceTransportPort | 7 | 2 | `inside` |
//! | postNATSourceIPv4Address | 225 | 4 | `outside` |
//! | postNAPTSourceTransportPort | 227 | 2 | `outside` |
//! | destinationIPv4Address | 12 | 4 | `destination` (if recorded) |
//! | destinationTransportPort | 11 | 2 | `destination` (if recorded) |
//! | ingressVRFID | 234 | 4 | `tenant_id` |
//!
//! and on ends only: flowStartMilliseconds (152) and flowEndMilliseconds
//! (153) from `start` and `time`, flowEndReason (136), initiatorPackets
//! (298), responderPackets (299), initiatorOctets (231) and responderOctets
//! (232) from `outbound` and `inbound` (the tenant host always initiates).
//!
//! The tenant id stands in for the VRF: RFC 8158 tells overlapping NAT
//! realms apart by ingressVRFID, and our tenants are exactly that (their
//! inside addresses may overlap). ICMP echo flows carry the echo identifier
//! in the transport port elements, as the translation does.
//!
//! IPv6 events (NAT66) are not exported: the IANA "NAT Event Type"
//! registry that RFC 8158 collectors key on has NAT44 and NAT64 session
//! events and none for NAT66, so an IPv6 record would be mislabelled or
//! ignored. They are skipped and counted (the [`ExportReport`], and the
//! sink's `take_skipped`, which the pipeline shows in `status` and as
//! `egress_audit_events_skipped_total{sink="ipfix",reason="ipv6"}`), never
//! dropped silently; the JSON log records them.
//!
//! How nfdump 1.7.1 (Debian 12's; `tests/tests/ipfix.rs` runs it) shows
//! these records, checked there and read from its `ipfix.c`: natEvent (as
//! "NAT44 session create/delete"), ingressVRFID, the post-NAT address and
//! port, the pre-NAT source, the destination, the protocol, flowStart/End
//! and flowEndReason are all decoded (its JSON leaves the end reason out,
//! its `%end` format field shows it). It skips the initiator/responder
//! counters it does not know (1.7.2 maps the packet counts, no release the
//! octet counts). Creations carry no flowStart (RFC 8158's create event
//! has none), so nfdump shows their "first" as 1970 and their time as
//! `t_event`. For ICMP it applies a fix meant for Cisco exporters: a
//! non-zero source port is moved, bytes swapped, into the destination port
//! and shown as ICMP type and code; the post-NAT identifier stays as sent.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use jiff::Timestamp;

use super::event::{EndReason, EventKind, TranslationEvent};
use crate::config::audit::IpfixPlan;

/// Largest message sent: fits a 1500-byte path with room for IP, UDP and
/// tunnel headers, so no message is fragmented.
pub const MAX_MESSAGE: usize = 1400;
const VERSION: u16 = 10;
const HEADER_LEN: usize = 16;
const SET_HEADER_LEN: usize = 4;
const TEMPLATE_SET_ID: u16 = 2;

/// NAT event types of RFC 8158 §4.1 (IANA "NAT Event Type" registry).
const NAT44_SESSION_CREATE: u8 = 4;
const NAT44_SESSION_DELETE: u8 = 5;

// IANA IPFIX information element ids.
const PROTOCOL_IDENTIFIER: u16 = 4;
const SOURCE_TRANSPORT_PORT: u16 = 7;
const SOURCE_IPV4_ADDRESS: u16 = 8;
const DESTINATION_TRANSPORT_PORT: u16 = 11;
const DESTINATION_IPV4_ADDRESS: u16 = 12;
const FLOW_END_REASON: u16 = 136;
const FLOW_START_MILLISECONDS: u16 = 152;
const FLOW_END_MILLISECONDS: u16 = 153;
const POST_NAT_SOURCE_IPV4_ADDRESS: u16 = 225;
const POST_NAPT_SOURCE_TRANSPORT_PORT: u16 = 227;
const NAT_EVENT: u16 = 230;
const INITIATOR_OCTETS: u16 = 231;
const RESPONDER_OCTETS: u16 = 232;
const INGRESS_VRFID: u16 = 234;
const INITIATOR_PACKETS: u16 = 298;
const RESPONDER_PACKETS: u16 = 299;
const OBSERVATION_TIME_MILLISECONDS: u16 = 323;

/// Template ids: distinct with and without destinations, so a collector
/// that sees both (two gateways configured differently, one observation
/// domain) cannot mistake one layout for the other.
const CREATE_TEMPLATE: u16 = 256;
const END_TEMPLATE: u16 = 257;
const CREATE_TEMPLATE_NO_DESTINATION: u16 = 258;
const END_TEMPLATE_NO_DESTINATION: u16 = 259;

/// What one `export` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Data records sent.
    pub records: usize,
    /// Messages (datagrams) sent.
    pub messages: usize,
    /// Events that cannot be expressed in these templates (IPv6), not sent.
    pub skipped: usize,
}

/// Sends translation events to one IPFIX collector.
pub struct IpfixExporter {
    socket: UdpSocket,
    collector: SocketAddr,
    encoder: Encoder,
    /// IPv6 events left out since `take_skipped` last asked.
    skipped: u64,
}

impl IpfixExporter {
    /// An exporter for `plan`'s collector, recording each flow's remote end
    /// when `record_destinations`.
    pub fn new(plan: &IpfixPlan, record_destinations: bool) -> io::Result<Self> {
        // Unconnected: on a connected socket an ICMP port unreachable (the
        // collector restarting) fails the next send; unconnected, Linux
        // drops it and the records sent meanwhile are merely lost.
        let bind: SocketAddr = match plan.collector {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(bind)?;
        Ok(Self {
            socket,
            collector: plan.collector,
            encoder: Encoder::new(
                plan.observation_domain,
                plan.template_interval,
                record_destinations,
            ),
            skipped: 0,
        })
    }

    /// Encodes `events` and sends them, templates first when due.
    pub fn export(&mut self, events: &[TranslationEvent]) -> io::Result<ExportReport> {
        self.export_at(events, Instant::now(), Timestamp::now())
    }

    /// `export` with the clocks given: `now` decides template refreshes,
    /// `wall` is the messages' export time.
    pub fn export_at(
        &mut self,
        events: &[TranslationEvent],
        now: Instant,
        wall: Timestamp,
    ) -> io::Result<ExportReport> {
        let encoded = self.encoder.encode(events, now, wall);
        self.skipped += encoded.skipped as u64;
        let mut report = ExportReport {
            skipped: encoded.skipped,
            ..ExportReport::default()
        };
        for message in &encoded.messages {
            if let Err(err) = self.socket.send_to(&message.bytes, self.collector) {
                // The templates may not have arrived: send them with the
                // next export. The sequence numbers already count the lost
                // records, which is how the collector learns of the loss.
                if encoded.templates {
                    self.encoder.templates_sent = None;
                }
                return Err(err);
            }
            report.records += message.records;
            report.messages += 1;
        }
        Ok(report)
    }
}

/// One encoded message.
struct Message {
    bytes: Vec<u8>,
    records: usize,
}

struct Encoded {
    messages: Vec<Message>,
    skipped: usize,
    /// Whether the first message carries the templates.
    templates: bool,
}

/// Builds messages; keeps the sequence number and the template schedule.
struct Encoder {
    observation_domain: u32,
    template_interval: Duration,
    record_destinations: bool,
    /// Data records encoded so far (mod 2^32): the next message's sequence
    /// number (RFC 7011 §3.1).
    sequence: u32,
    templates_sent: Option<Instant>,
}

impl Encoder {
    fn new(
        observation_domain: u32,
        template_interval: Duration,
        record_destinations: bool,
    ) -> Self {
        Self {
            observation_domain,
            template_interval,
            record_destinations,
            sequence: 0,
            templates_sent: None,
        }
    }

    fn templates_due(&self, now: Instant) -> bool {
        self.templates_sent
            .is_none_or(|sent| now.saturating_duration_since(sent) >= self.template_interval)
    }

    fn template_ids(&self) -> (u16, u16) {
        if self.record_destinations {
            (CREATE_TEMPLATE, END_TEMPLATE)
        } else {
            (CREATE_TEMPLATE_NO_DESTINATION, END_TEMPLATE_NO_DESTINATION)
        }
    }

    /// The (element id, length) list of the creation or end template.
    fn fields(&self, kind: EventKind) -> Vec<(u16, u16)> {
        let mut fields = vec![
            (OBSERVATION_TIME_MILLISECONDS, 8),
            (NAT_EVENT, 1),
            (PROTOCOL_IDENTIFIER, 1),
            (SOURCE_IPV4_ADDRESS, 4),
            (SOURCE_TRANSPORT_PORT, 2),
            (POST_NAT_SOURCE_IPV4_ADDRESS, 4),
            (POST_NAPT_SOURCE_TRANSPORT_PORT, 2),
        ];
        if self.record_destinations {
            fields.push((DESTINATION_IPV4_ADDRESS, 4));
            fields.push((DESTINATION_TRANSPORT_PORT, 2));
        }
        fields.push((INGRESS_VRFID, 4));
        if kind == EventKind::End {
            fields.extend([
                (FLOW_START_MILLISECONDS, 8),
                (FLOW_END_MILLISECONDS, 8),
                (FLOW_END_REASON, 1),
                (INITIATOR_PACKETS, 8),
                (RESPONDER_PACKETS, 8),
                (INITIATOR_OCTETS, 8),
                (RESPONDER_OCTETS, 8),
            ]);
        }
        fields
    }

    /// The template set announcing both templates.
    fn template_set(&self) -> Vec<u8> {
        let (create, end) = self.template_ids();
        let mut set = Vec::with_capacity(128);
        put_u16(&mut set, TEMPLATE_SET_ID);
        put_u16(&mut set, 0); // length, filled in below
        for (id, kind) in [(create, EventKind::Create), (end, EventKind::End)] {
            let fields = self.fields(kind);
            put_u16(&mut set, id);
            put_u16(&mut set, fields.len() as u16);
            for (element, length) in fields {
                put_u16(&mut set, element);
                put_u16(&mut set, length);
            }
        }
        let len = set.len() as u16;
        set[2..4].copy_from_slice(&len.to_be_bytes());
        set
    }

    /// One data record in the layout of `fields(event.event)`, or `None`
    /// when an address is not IPv4.
    fn record(&self, event: &TranslationEvent) -> Option<Vec<u8>> {
        let inside = ipv4(event.inside.ip())?;
        let outside = ipv4(event.outside.ip())?;
        let destination = match event.destination {
            Some(destination) => Some((ipv4(destination.ip())?, destination.port())),
            None => None,
        };
        let mut record = Vec::with_capacity(96);
        put_u64(&mut record, millis(event.time));
        record.push(match event.event {
            EventKind::Create => NAT44_SESSION_CREATE,
            EventKind::End => NAT44_SESSION_DELETE,
        });
        record.push(event.protocol_number());
        record.extend_from_slice(&inside.octets());
        put_u16(&mut record, event.inside.port());
        record.extend_from_slice(&outside.octets());
        put_u16(&mut record, event.outside.port());
        if self.record_destinations {
            // A missing destination reads as 0.0.0.0 port 0, "not known".
            let (address, port) = destination.unwrap_or((Ipv4Addr::UNSPECIFIED, 0));
            record.extend_from_slice(&address.octets());
            put_u16(&mut record, port);
        }
        put_u32(&mut record, u32::from(event.tenant_id));
        if event.event == EventKind::End {
            let outbound = event.outbound.unwrap_or_default();
            let inbound = event.inbound.unwrap_or_default();
            put_u64(&mut record, millis(event.start));
            put_u64(&mut record, millis(event.time));
            record.push(event.reason.map_or(0, flow_end_reason));
            put_u64(&mut record, outbound.packets);
            put_u64(&mut record, inbound.packets);
            put_u64(&mut record, outbound.bytes);
            put_u64(&mut record, inbound.bytes);
        }
        Some(record)
    }

    fn header(&self, wall: Timestamp) -> Vec<u8> {
        let mut header = Vec::with_capacity(MAX_MESSAGE);
        put_u16(&mut header, VERSION);
        put_u16(&mut header, 0); // length, filled in when the message is done
        // Export time in seconds (RFC 7011 §3.1); u32 lasts until 2106.
        put_u32(
            &mut header,
            wall.as_second().clamp(0, i64::from(u32::MAX)) as u32,
        );
        put_u32(&mut header, self.sequence);
        put_u32(&mut header, self.observation_domain);
        header
    }

    fn encode(&mut self, events: &[TranslationEvent], now: Instant, wall: Timestamp) -> Encoded {
        let (create_id, end_id) = self.template_ids();
        let mut encoded = Encoded {
            messages: Vec::new(),
            skipped: 0,
            templates: false,
        };
        let mut message = self.header(wall);
        let mut records = 0;
        // Offset of the open data set's header in `message`, and its id.
        let mut open_set: Option<(usize, u16)> = None;
        let templates_due = self.templates_due(now);
        if templates_due && !events.is_empty() {
            message.extend_from_slice(&self.template_set());
            encoded.templates = true;
            self.templates_sent = Some(now);
        }
        for event in events {
            let Some(record) = self.record(event) else {
                encoded.skipped += 1;
                continue;
            };
            let set_id = match event.event {
                EventKind::Create => create_id,
                EventKind::End => end_id,
            };
            let same_set = open_set.is_some_and(|(_, id)| id == set_id);
            let needed = record.len() + if same_set { 0 } else { SET_HEADER_LEN };
            if message.len() + needed > MAX_MESSAGE {
                close_set(&mut message, open_set.take());
                encoded.messages.push(self.finish(message, records));
                message = self.header(wall);
                records = 0;
            }
            if open_set.is_none_or(|(_, id)| id != set_id) {
                close_set(&mut message, open_set.take());
                open_set = Some((message.len(), set_id));
                put_u16(&mut message, set_id);
                put_u16(&mut message, 0);
            }
            message.extend_from_slice(&record);
            records += 1;
            // The next message's sequence number counts this record.
            self.sequence = self.sequence.wrapping_add(1);
        }
        close_set(&mut message, open_set.take());
        if message.len() > HEADER_LEN {
            encoded.messages.push(self.finish(message, records));
        }
        encoded
    }

    /// Fills in the header's length. The sequence number was the count
    /// before this message's records; `self.sequence` has moved past them.
    fn finish(&self, mut bytes: Vec<u8>, records: usize) -> Message {
        let len = bytes.len() as u16;
        bytes[2..4].copy_from_slice(&len.to_be_bytes());
        Message { bytes, records }
    }
}

impl super::pipeline::Sink for IpfixExporter {
    fn name(&self) -> &'static str {
        "ipfix"
    }

    fn write(&mut self, events: &[TranslationEvent]) -> anyhow::Result<()> {
        self.export(events)
            .with_context(|| format!("sending IPFIX to {}", self.collector))?;
        Ok(())
    }

    fn take_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.skipped)
    }
}

/// Fills in the length of the data set opened at `open`.
fn close_set(message: &mut [u8], open: Option<(usize, u16)>) {
    if let Some((start, _)) = open {
        let len = (message.len() - start) as u16;
        message[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

/// flowEndReason values (IANA registry, from RFC 5102): 1 idle timeout,
/// 3 end of flow detected, 4 forced end, 5 lack of resources.
fn flow_end_reason(reason: EndReason) -> u8 {
    match reason {
        EndReason::Expired => 1,
        EndReason::Closed => 3,
        EndReason::Config | EndReason::Shutdown => 4,
        EndReason::Orphaned => 5,
    }
}

fn ipv4(address: IpAddr) -> Option<Ipv4Addr> {
    match address {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

/// dateTimeMilliseconds: milliseconds since the Unix epoch.
fn millis(time: Timestamp) -> u64 {
    time.as_millisecond().max(0) as u64
}

fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::Traffic;

    const CREATE_LEN: usize = 8 + 1 + 1 + 4 + 2 + 4 + 2 + 4 + 2 + 4;
    const END_LEN: usize = CREATE_LEN + 8 + 8 + 1 + 8 * 4;

    fn event(kind: EventKind, n: u16) -> TranslationEvent {
        let end = kind == EventKind::End;
        TranslationEvent {
            event: kind,
            time: "2026-12-02T14:05:00.250Z".parse().expect("time"),
            start: "2026-12-02T14:03:22.125Z".parse().expect("time"),
            tenant: "tenant-a".into(),
            tenant_id: 3,
            protocol: "tcp".into(),
            inside: format!("10.0.1.5:{}", 41000 + n).parse().expect("addr"),
            outside: format!("192.168.31.101:{}", 40000 + n)
                .parse()
                .expect("addr"),
            destination: Some("203.0.113.7:443".parse().expect("addr")),
            reason: end.then_some(EndReason::Closed),
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

    fn encoder(record_destinations: bool) -> Encoder {
        Encoder::new(77, Duration::from_secs(60), record_destinations)
    }

    fn wall() -> Timestamp {
        "2026-12-02T14:05:01Z".parse().expect("time")
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_be_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Checks the header and splits a message into (set id, set body).
    fn sets(message: &[u8]) -> Vec<(u16, Vec<u8>)> {
        assert_eq!(u16_at(message, 0), 10, "version");
        assert_eq!(usize::from(u16_at(message, 2)), message.len(), "length");
        assert_eq!(u32_at(message, 12), 77, "observation domain");
        let mut sets = Vec::new();
        let mut at = HEADER_LEN;
        while at < message.len() {
            let id = u16_at(message, at);
            let len = usize::from(u16_at(message, at + 2));
            assert!(
                len >= SET_HEADER_LEN && at + len <= message.len(),
                "set length {len}"
            );
            sets.push((id, message[at + SET_HEADER_LEN..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, message.len(), "sets fill the message exactly");
        sets
    }

    /// Template set body -> (template id, [(element, length)]).
    fn templates(body: &[u8]) -> Vec<(u16, Vec<(u16, u16)>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let id = u16_at(body, at);
            let count = usize::from(u16_at(body, at + 2));
            at += 4;
            let fields = (0..count)
                .map(|i| (u16_at(body, at + 4 * i), u16_at(body, at + 4 * i + 2)))
                .collect();
            at += 4 * count;
            out.push((id, fields));
        }
        out
    }

    #[test]
    fn a_create_and_an_end_are_laid_out_as_the_templates_say() {
        let mut encoder = encoder(true);
        let events = [event(EventKind::Create, 1), event(EventKind::End, 1)];
        let encoded = encoder.encode(&events, Instant::now(), wall());
        assert!(encoded.templates);
        assert_eq!(encoded.skipped, 0);
        assert_eq!(encoded.messages.len(), 1);
        let message = &encoded.messages[0];
        assert_eq!(message.records, 2);
        let bytes = &message.bytes;
        assert_eq!(u32_at(bytes, 4), wall().as_second() as u32, "export time");
        assert_eq!(u32_at(bytes, 8), 0, "first sequence number");

        let sets = sets(bytes);
        assert_eq!(sets.len(), 3, "templates, creations, ends");
        assert_eq!(sets[0].0, TEMPLATE_SET_ID);
        let templates = templates(&sets[0].1);
        let ids: Vec<u16> = templates.iter().map(|t| t.0).collect();
        assert_eq!(ids, [CREATE_TEMPLATE, END_TEMPLATE]);
        let create: Vec<u16> = templates[0].1.iter().map(|f| f.0).collect();
        assert_eq!(create, [323, 230, 4, 8, 7, 225, 227, 12, 11, 234]);
        let end: Vec<u16> = templates[1].1.iter().map(|f| f.0).collect();
        assert_eq!(
            end,
            [
                323, 230, 4, 8, 7, 225, 227, 12, 11, 234, 152, 153, 136, 298, 299, 231, 232
            ]
        );
        let lengths =
            |t: &(u16, Vec<(u16, u16)>)| t.1.iter().map(|f| usize::from(f.1)).sum::<usize>();
        assert_eq!(lengths(&templates[0]), CREATE_LEN);
        assert_eq!(lengths(&templates[1]), END_LEN);

        let (id, create) = &sets[1];
        assert_eq!(*id, CREATE_TEMPLATE);
        assert_eq!(create.len(), CREATE_LEN);
        assert_eq!(u64_at(create, 0), 1_796_220_300_250, "observation time");
        assert_eq!(create[8], 4, "NAT44 session create");
        assert_eq!(create[9], 6, "tcp");
        assert_eq!(create[10..14], [10, 0, 1, 5]);
        assert_eq!(u16_at(create, 14), 41001);
        assert_eq!(create[16..20], [192, 168, 31, 101]);
        assert_eq!(u16_at(create, 20), 40001);
        assert_eq!(create[22..26], [203, 0, 113, 7]);
        assert_eq!(u16_at(create, 26), 443);
        assert_eq!(u32_at(create, 28), 3, "tenant id as ingressVRFID");

        let (id, end) = &sets[2];
        assert_eq!(*id, END_TEMPLATE);
        assert_eq!(end.len(), END_LEN);
        assert_eq!(end[8], 5, "NAT44 session delete");
        assert_eq!(end[..8], create[..8], "same observation time");
        assert_eq!(end[9..CREATE_LEN], create[9..CREATE_LEN], "same flow");
        assert_eq!(u64_at(end, 32), 1_796_220_202_125, "flow start");
        assert_eq!(u64_at(end, 40), 1_796_220_300_250, "flow end");
        assert_eq!(end[48], 3, "closed: end of flow detected");
        assert_eq!(u64_at(end, 49), 10, "initiator packets");
        assert_eq!(u64_at(end, 57), 8, "responder packets");
        assert_eq!(u64_at(end, 65), 1200, "initiator octets");
        assert_eq!(u64_at(end, 73), 9000, "responder octets");
    }

    #[test]
    fn without_destinations_the_templates_leave_them_out() {
        let mut encoder = encoder(false);
        let events = [event(EventKind::Create, 1), event(EventKind::End, 1)];
        let encoded = encoder.encode(&events, Instant::now(), wall());
        let sets = sets(&encoded.messages[0].bytes);
        let templates = templates(&sets[0].1);
        assert_eq!(templates[0].0, CREATE_TEMPLATE_NO_DESTINATION);
        assert_eq!(templates[1].0, END_TEMPLATE_NO_DESTINATION);
        for (_, fields) in &templates {
            assert!(fields.iter().all(|f| f.0 != 12 && f.0 != 11), "{fields:?}");
        }
        assert_eq!(sets[1].0, CREATE_TEMPLATE_NO_DESTINATION);
        assert_eq!(sets[1].1.len(), CREATE_LEN - 6);
        assert_eq!(sets[2].1.len(), END_LEN - 6);
        assert_eq!(u32_at(&sets[1].1, 22), 3, "ingressVRFID follows the ports");
    }

    #[test]
    fn end_reasons_map_to_flow_end_reasons() {
        assert_eq!(flow_end_reason(EndReason::Expired), 1);
        assert_eq!(flow_end_reason(EndReason::Closed), 3);
        assert_eq!(flow_end_reason(EndReason::Config), 4);
        assert_eq!(flow_end_reason(EndReason::Shutdown), 4);
        assert_eq!(flow_end_reason(EndReason::Orphaned), 5);
    }

    #[test]
    fn many_events_fill_messages_of_at_most_1400_bytes_numbered_by_records() {
        let mut encoder = encoder(true);
        let events: Vec<TranslationEvent> = (0..500)
            .map(|n| {
                let kind = if n % 3 == 0 {
                    EventKind::End
                } else {
                    EventKind::Create
                };
                event(kind, n)
            })
            .collect();
        let now = Instant::now();
        let first = encoder.encode(&events, now, wall());
        assert!(first.messages.len() > 1);
        let mut before = 0u32;
        let mut total = 0;
        for (i, message) in first.messages.iter().enumerate() {
            assert!(
                message.bytes.len() <= MAX_MESSAGE,
                "{}",
                message.bytes.len()
            );
            assert_eq!(u32_at(&message.bytes, 8), before, "sequence of message {i}");
            let mut counted = 0;
            for (id, body) in sets(&message.bytes) {
                match id {
                    TEMPLATE_SET_ID => assert_eq!(i, 0, "templates in the first message only"),
                    CREATE_TEMPLATE => {
                        assert_eq!(body.len() % CREATE_LEN, 0);
                        counted += body.len() / CREATE_LEN;
                    }
                    END_TEMPLATE => {
                        assert_eq!(body.len() % END_LEN, 0);
                        counted += body.len() / END_LEN;
                    }
                    other => panic!("unexpected set {other}"),
                }
            }
            assert_eq!(counted, message.records);
            // Full: less room left than the largest record takes with a
            // set header of its own.
            if i + 1 < first.messages.len() {
                assert!(message.bytes.len() + SET_HEADER_LEN + END_LEN > MAX_MESSAGE);
            }
            before += message.records as u32;
            total += message.records;
        }
        assert_eq!(total, 500);
        // The next export continues the count.
        let second = encoder.encode(&events[..2], now, wall());
        assert_eq!(u32_at(&second.messages[0].bytes, 8), 500);
    }

    #[test]
    fn the_sequence_number_wraps_at_2_pow_32() {
        let mut encoder = encoder(true);
        encoder.sequence = u32::MAX;
        let events = [event(EventKind::Create, 1), event(EventKind::Create, 2)];
        let now = Instant::now();
        let first = encoder.encode(&events, now, wall());
        assert_eq!(u32_at(&first.messages[0].bytes, 8), u32::MAX);
        let second = encoder.encode(&events, now, wall());
        assert_eq!(u32_at(&second.messages[0].bytes, 8), 1);
    }

    #[test]
    fn templates_are_sent_again_after_the_interval() {
        let mut encoder = encoder(true);
        let events = [event(EventKind::Create, 1)];
        let has_templates = |encoded: &Encoded| {
            sets(&encoded.messages[0].bytes)
                .iter()
                .any(|(id, _)| *id == TEMPLATE_SET_ID)
        };
        let start = Instant::now();
        let first = encoder.encode(&events, start, wall());
        assert!(has_templates(&first) && first.templates);
        let within = encoder.encode(&events, start + Duration::from_secs(59), wall());
        assert!(!has_templates(&within) && !within.templates);
        let after = encoder.encode(&events, start + Duration::from_secs(60), wall());
        assert!(has_templates(&after) && after.templates);
        let again = encoder.encode(&events, start + Duration::from_secs(61), wall());
        assert!(!has_templates(&again));
        // Nothing to send: no message at all, templates stay due.
        let empty = encoder.encode(&[], start + Duration::from_secs(200), wall());
        assert!(empty.messages.is_empty());
        let later = encoder.encode(&events, start + Duration::from_secs(201), wall());
        assert!(has_templates(&later));
    }

    #[test]
    fn ipv6_events_are_skipped_and_counted() {
        let mut encoder = encoder(true);
        let mut v6 = event(EventKind::Create, 2);
        v6.inside = "[fd00::5]:41000".parse().expect("addr");
        let mut v6_destination = event(EventKind::End, 3);
        v6_destination.destination = Some("[2001:db8::7]:443".parse().expect("addr"));
        let events = [event(EventKind::Create, 1), v6, v6_destination];
        let encoded = encoder.encode(&events, Instant::now(), wall());
        assert_eq!(encoded.skipped, 2);
        assert_eq!(encoded.messages.len(), 1);
        assert_eq!(encoded.messages[0].records, 1);
        assert_eq!(
            encoder.sequence, 1,
            "skipped events are not counted as sent"
        );
    }

    #[test]
    fn the_exporter_sends_datagrams_to_the_collector_and_reports_them() {
        let collector = UdpSocket::bind("127.0.0.1:0").expect("collector socket");
        collector
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let plan = IpfixPlan {
            collector: collector.local_addr().expect("collector address"),
            observation_domain: 77,
            template_interval: Duration::from_secs(600),
        };
        let mut exporter = IpfixExporter::new(&plan, true).expect("exporter");
        let mut events: Vec<TranslationEvent> =
            (0..60).map(|n| event(EventKind::Create, n)).collect();
        let mut v6 = event(EventKind::End, 99);
        v6.outside = "[2001:db8::1]:40000".parse().expect("addr");
        events.push(v6);
        let report = exporter.export(&events).expect("export");
        assert_eq!(report.records, 60);
        assert_eq!(report.skipped, 1);
        // Counted for the pipeline once, not as an error.
        use crate::audit::Sink as _;
        assert_eq!(exporter.take_skipped(), 1);
        assert_eq!(exporter.take_skipped(), 0);
        assert!(report.messages >= 2, "{report:?}");
        let mut received = 0;
        let mut buf = [0u8; 2048];
        for _ in 0..report.messages {
            let (len, _) = collector.recv_from(&mut buf).expect("a datagram");
            assert!(len <= MAX_MESSAGE);
            for (id, body) in sets(&buf[..len]) {
                if id == CREATE_TEMPLATE {
                    received += body.len() / CREATE_LEN;
                }
            }
        }
        assert_eq!(received, 60);
    }
}
