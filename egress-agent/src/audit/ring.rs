//! The dataplane's half of the log: flows the programs created, read from
//! the pinned `FLOW_EVENTS` ring buffer and turned into records; and the
//! agent's half, flows it ended, turned into records the same way.
//!
//! The dataplane stamps events with CLOCK_MONOTONIC_COARSE; a record needs
//! the wall clock. `WallClock` pairs both clocks at one moment and places
//! earlier monotonic times relative to it, so a record is as exact as the
//! coarse clock (one jiffy) however late the agent reads it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};
use egress_common::{
    events::{
        EVENT_FLOW_CREATED, EVENT_FLOW_CREATED_V6, EVENT_KIND_OFFSET, FlowEventV4, FlowEventV6,
    },
    names,
};
use jiff::{SignedDuration, Timestamp};

use super::event::{EventKind, TranslationEvent, protocol_name};
use crate::conntrack::{self, EndedFlow};

/// The pinned ring, opened for reading.
pub struct RingReader {
    ring: RingBuf<MapData>,
}

impl RingReader {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join(names::FLOW_EVENTS);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let ring = RingBuf::try_from(Map::from_map_data(data)?)
            .with_context(|| format!("{} is not a ring buffer", path.display()))?;
        Ok(Self { ring })
    }

    /// Takes up to `max` events out of the ring. Records of a kind this
    /// agent does not know, or too short for their kind, are left out.
    pub fn drain(&mut self, max: usize, out: &mut Vec<RawEvent>) {
        while out.len() < max {
            let Some(item) = self.ring.next() else {
                break;
            };
            if let Some(event) = RawEvent::decode(&item) {
                out.push(event);
            }
        }
    }
}

/// One record of the ring, as the dataplane wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawEvent {
    V4(FlowEventV4),
    V6(FlowEventV6),
}

impl RawEvent {
    /// The record in `bytes`, told apart by its `kind` (at the same offset
    /// in every record; see egress-common's `events`).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let kind = bytes.get(EVENT_KIND_OFFSET..EVENT_KIND_OFFSET + 4)?;
        let kind = u32::from_ne_bytes(kind.try_into().ok()?);
        match kind {
            EVENT_FLOW_CREATED => Some(Self::V4(bytemuck::pod_read_unaligned(
                bytes.get(..size_of::<FlowEventV4>())?,
            ))),
            EVENT_FLOW_CREATED_V6 => Some(Self::V6(bytemuck::pod_read_unaligned(
                bytes.get(..size_of::<FlowEventV6>())?,
            ))),
            _ => None,
        }
    }

    pub fn tenant(&self) -> u16 {
        match self {
            Self::V4(event) => event.tenant,
            Self::V6(event) => event.tenant,
        }
    }
}

/// The wall clock and the dataplane's clock read at one moment.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    mono_ns: u64,
    wall: Timestamp,
}

impl WallClock {
    pub fn now() -> Self {
        Self {
            mono_ns: conntrack::now_ns(),
            wall: Timestamp::now(),
        }
    }

    /// Wall-clock time of a dataplane timestamp, to the millisecond.
    pub fn at(&self, mono_ns: u64) -> Timestamp {
        let ago = SignedDuration::from_nanos(
            i64::try_from(self.mono_ns.saturating_sub(mono_ns)).unwrap_or(i64::MAX),
        );
        let wall = self.wall.checked_sub(ago).unwrap_or(self.wall);
        Timestamp::from_millisecond(wall.as_millisecond()).unwrap_or(wall)
    }

    /// The wall clock of this moment, to the millisecond.
    pub fn wall(&self) -> Timestamp {
        self.at(self.mono_ns)
    }
}

fn endpoint(addr: [u8; 4], port_be: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(addr)), u16::from_be(port_be))
}

fn endpoint_v6(addr: [u8; 16], port_be: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(addr)), u16::from_be(port_be))
}

/// The part of a record both creations and ends share: the protocol and
/// the (inside, outside, destination) ends.
fn record(
    (proto, (inside, outside, destination)): (u8, (SocketAddr, SocketAddr, SocketAddr)),
    tenant: (u16, &str),
    start: Timestamp,
    record_destinations: bool,
) -> TranslationEvent {
    TranslationEvent {
        event: EventKind::Create,
        time: start,
        start,
        tenant: tenant.1.to_owned(),
        tenant_id: tenant.0,
        protocol: protocol_name(proto),
        inside,
        outside,
        destination: record_destinations.then_some(destination),
        reason: None,
        outbound: None,
        inbound: None,
    }
}

/// The record of a flow the dataplane created.
pub fn created(
    event: &RawEvent,
    tenant_name: &str,
    clock: &WallClock,
    record_destinations: bool,
) -> TranslationEvent {
    let (time_ns, proto, ends) = match event {
        RawEvent::V4(event) => {
            let key = &event.key;
            let ends = (
                endpoint(key.src, key.src_port),
                endpoint(event.nat_addr, event.nat_port),
                endpoint(key.dst, key.dst_port),
            );
            (event.time_ns, key.proto, ends)
        }
        RawEvent::V6(event) => {
            let key = &event.key;
            let ends = (
                endpoint_v6(key.src, key.src_port),
                endpoint_v6(event.nat_addr, event.nat_port),
                endpoint_v6(key.dst, key.dst_port),
            );
            (event.time_ns, key.proto, ends)
        }
    };
    record(
        (proto, ends),
        (event.tenant(), tenant_name),
        clock.at(time_ns),
        record_destinations,
    )
}

/// The record of a flow the agent ended just now.
pub fn ended(
    ended: &EndedFlow,
    tenant_name: &str,
    clock: &WallClock,
    record_destinations: bool,
) -> TranslationEvent {
    let flow = &ended.flow;
    let mut event = record(
        (flow.proto(), flow.endpoints()),
        (flow.tenant(), tenant_name),
        clock.at(flow.created_ns()),
        record_destinations,
    );
    event.event = EventKind::End;
    event.time = clock.wall();
    event.reason = Some(ended.reason);
    let (outbound, inbound) = flow.traffic();
    event.outbound = Some(outbound);
    event.inbound = Some(inbound);
    event
}

#[cfg(test)]
mod tests {
    use egress_common::flow::{
        DIR_OUTBOUND, FlowEntryV4, FlowEntryV6, FlowKeyV4, FlowKeyV6, PROTO_ICMPV6, PROTO_TCP,
    };

    use super::*;
    use crate::audit::event::EndReason;

    #[test]
    fn dataplane_times_are_placed_on_the_wall_clock() {
        let clock = WallClock {
            mono_ns: 10_000_000_000,
            wall: "2026-12-02T14:03:22.500Z".parse().expect("time"),
        };
        assert_eq!(
            clock.at(9_000_000_000).to_string(),
            "2026-12-02T14:03:21.5Z"
        );
        assert_eq!(clock.wall(), clock.at(10_000_000_000));
    }

    #[test]
    fn ring_records_are_told_apart_by_their_kind() {
        let v4 = FlowEventV4 {
            time_ns: 9_000_000_000,
            kind: EVENT_FLOW_CREATED,
            tenant: 3,
            nat_port: 40312u16.to_be(),
            key: FlowKeyV4 {
                src: [10, 0, 1, 5],
                dst: [203, 0, 113, 7],
                src_port: 41234u16.to_be(),
                dst_port: 443u16.to_be(),
                proto: PROTO_TCP,
                direction: DIR_OUTBOUND,
                zone: 0,
            },
            nat_addr: [192, 168, 31, 101],
            _pad: 0,
        };
        let v6 = FlowEventV6 {
            time_ns: 9_000_000_000,
            kind: EVENT_FLOW_CREATED_V6,
            tenant: 4,
            nat_port: 40313u16.to_be(),
            key: FlowKeyV6 {
                src: "fd00:10::5".parse::<Ipv6Addr>().unwrap().octets(),
                dst: "2001:db8:113::7".parse::<Ipv6Addr>().unwrap().octets(),
                src_port: 41235u16.to_be(),
                dst_port: 443u16.to_be(),
                proto: PROTO_TCP,
                direction: DIR_OUTBOUND,
                zone: 0,
            },
            nat_addr: "2001:db8:31::101".parse::<Ipv6Addr>().unwrap().octets(),
        };
        let v4_bytes = bytemuck::bytes_of(&v4);
        let v6_bytes = bytemuck::bytes_of(&v6);
        assert_eq!(RawEvent::decode(v4_bytes), Some(RawEvent::V4(v4)));
        assert_eq!(RawEvent::decode(v6_bytes), Some(RawEvent::V6(v6)));
        // Too short for its kind, or a kind not known: left out.
        assert_eq!(RawEvent::decode(&v6_bytes[..40]), None);
        let mut unknown = v4_bytes.to_vec();
        unknown[8] = 99;
        assert_eq!(RawEvent::decode(&unknown), None);

        let clock = WallClock {
            mono_ns: 10_000_000_000,
            wall: "2026-12-02T14:03:22.500Z".parse().expect("time"),
        };
        let event = created(&RawEvent::V6(v6), "tenant-b", &clock, true);
        assert_eq!(event.event, EventKind::Create);
        assert_eq!(event.tenant_id, 4);
        assert_eq!(event.protocol, "tcp");
        assert_eq!(event.time.to_string(), "2026-12-02T14:03:21.5Z");
        assert_eq!(event.inside, "[fd00:10::5]:41235".parse().expect("addr"));
        assert_eq!(
            event.outside,
            "[2001:db8:31::101]:40313".parse().expect("addr")
        );
        assert_eq!(
            event.destination,
            Some("[2001:db8:113::7]:443".parse().expect("addr"))
        );
        let event = created(&RawEvent::V4(v4), "tenant-a", &clock, false);
        assert_eq!(event.outside, "192.168.31.101:40312".parse().expect("addr"));
        assert_eq!(event.destination, None);
    }

    #[test]
    fn an_ended_flow_keeps_its_tuple_start_and_traffic() {
        let key = FlowKeyV4 {
            src: [10, 0, 1, 5],
            dst: [203, 0, 113, 7],
            src_port: 41234u16.to_be(),
            dst_port: 443u16.to_be(),
            proto: PROTO_TCP,
            direction: DIR_OUTBOUND,
            zone: 0,
        };
        let outbound = FlowEntryV4 {
            created_s: 5,
            nat_addr: [192, 168, 31, 101],
            nat_port: 40312u16.to_be(),
            tenant: 3,
            packets: 4,
            bytes: 400,
            ..FlowEntryV4::default()
        };
        let flow = EndedFlow {
            flow: conntrack::Flow {
                outbound_key: key,
                outbound,
                reply: Some(FlowEntryV4 {
                    packets: 2,
                    bytes: 3000,
                    ..FlowEntryV4::default()
                }),
            }
            .into(),
            reason: EndReason::Expired,
        };
        let clock = WallClock {
            mono_ns: 65_000_000_000,
            wall: "2026-12-02T14:04:00Z".parse().expect("time"),
        };
        let event = ended(&flow, "tenant-a", &clock, false);
        assert_eq!(event.event, EventKind::End);
        assert_eq!(event.start.to_string(), "2026-12-02T14:03:00Z");
        assert_eq!(event.time.to_string(), "2026-12-02T14:04:00Z");
        assert_eq!(event.inside, "10.0.1.5:41234".parse().expect("addr"));
        assert_eq!(event.outside, "192.168.31.101:40312".parse().expect("addr"));
        assert_eq!(event.destination, None);
        assert_eq!(event.inbound.map(|t| t.bytes), Some(3000));
        assert_eq!(event.outbound.map(|t| t.packets), Some(4));
    }

    #[test]
    fn an_ended_ipv6_flow_is_recorded_with_ipv6_ends() {
        let key = FlowKeyV6 {
            src: "fd00:10::5".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            dst: "2001:db8:113::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            src_port: 7u16.to_be(),
            dst_port: 0,
            proto: PROTO_ICMPV6,
            direction: DIR_OUTBOUND,
            zone: 0,
        };
        let outbound = FlowEntryV6 {
            created_s: 5,
            nat_addr: "2001:db8:31::101"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            nat_port: 40312u16.to_be(),
            tenant: 3,
            packets: 1,
            bytes: 104,
            ..FlowEntryV6::default()
        };
        let flow = EndedFlow {
            flow: conntrack::Flow {
                outbound_key: key,
                outbound,
                reply: None,
            }
            .into(),
            reason: EndReason::Expired,
        };
        let clock = WallClock {
            mono_ns: 65_000_000_000,
            wall: "2026-12-02T14:04:00Z".parse().expect("time"),
        };
        let event = ended(&flow, "tenant-a", &clock, true);
        assert_eq!(event.protocol, "icmpv6");
        assert_eq!(event.inside, "[fd00:10::5]:7".parse().expect("addr"));
        assert_eq!(
            event.outside,
            "[2001:db8:31::101]:40312".parse().expect("addr")
        );
        assert_eq!(
            event.destination,
            Some("[2001:db8:113::7]:0".parse().expect("addr"))
        );
        assert_eq!(event.outbound.map(|t| t.bytes), Some(104));
        assert_eq!(event.inbound.map(|t| t.packets), Some(0));
    }
}
