//! One translation event: a flow created or ended. Serialized as one JSON
//! line in the translation log and on `flows --follow`; the IPFIX exporter
//! encodes the same fields.

use std::net::{IpAddr, SocketAddr};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Whether a flow began or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Create,
    End,
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// Idle past its state's timeout.
    Expired,
    /// TCP: closed by FIN or RST, removed after its closing timeout.
    Closed,
    /// The configuration changed: its tenant, egress address, source or
    /// ingress port is gone.
    Config,
    /// The agent stopped and took the dataplane down, or `cleanup` ran.
    Shutdown,
    /// Half of a flow whose creation never completed (an agent killed
    /// while removing it, or a lost race), cleared away.
    Orphaned,
}

impl EndReason {
    pub const ALL: [EndReason; 5] = [
        EndReason::Expired,
        EndReason::Closed,
        EndReason::Config,
        EndReason::Shutdown,
        EndReason::Orphaned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Closed => "closed",
            EndReason::Config => "config",
            EndReason::Shutdown => "shutdown",
            EndReason::Orphaned => "orphaned",
        }
    }
}

/// Packets and bytes (of IP packets) one direction of a flow carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// A flow created or ended, with everything an audit asks about it.
///
/// ICMP echo flows carry the echo identifier where the port would be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TranslationEvent {
    pub event: EventKind,
    /// When it happened: the flow's first packet for a creation, its removal
    /// for an end (wall clock, millisecond precision, UTC).
    pub time: Timestamp,
    /// When the flow began (same as `time` for a creation).
    pub start: Timestamp,
    pub tenant: String,
    pub tenant_id: u16,
    /// `tcp`, `udp`, `icmp` or the protocol number.
    pub protocol: String,
    /// The tenant host's address and port, before translation.
    pub inside: SocketAddr,
    /// The egress address and port it left with.
    pub outside: SocketAddr,
    /// The remote end; absent when `audit.recordDestinations` is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<SocketAddr>,
    /// Ends only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
    /// Ends only: what the flow carried from the tenant host outwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<Traffic>,
    /// Ends only: what the flow carried back to the tenant host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Traffic>,
}

impl TranslationEvent {
    /// Protocol number of `protocol`.
    pub fn protocol_number(&self) -> u8 {
        protocol_number(&self.protocol)
    }

    /// Whether the flow held `address` (and `port`, if given) as its
    /// outside endpoint.
    pub fn holds(&self, address: IpAddr, port: Option<u16>) -> bool {
        self.outside.ip() == address && port.is_none_or(|p| self.outside.port() == p)
    }
}

/// The name a protocol number is logged under.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        1 => "icmp".to_owned(),
        58 => "icmpv6".to_owned(),
        other => other.to_string(),
    }
}

/// The protocol number of a logged name (0 when unknown).
pub fn protocol_number(name: &str) -> u8 {
    match name {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        other => other.parse().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_event_is_one_json_line_and_reads_back() {
        let event = TranslationEvent {
            event: EventKind::End,
            time: "2026-12-02T14:05:00.250Z".parse().expect("time"),
            start: "2026-12-02T14:03:22.125Z".parse().expect("time"),
            tenant: "tenant-a".into(),
            tenant_id: 3,
            protocol: "tcp".into(),
            inside: "10.0.1.5:41234".parse().expect("addr"),
            outside: "192.168.31.101:40312".parse().expect("addr"),
            destination: Some("203.0.113.7:443".parse().expect("addr")),
            reason: Some(EndReason::Closed),
            outbound: Some(Traffic {
                packets: 10,
                bytes: 1200,
            }),
            inbound: Some(Traffic {
                packets: 8,
                bytes: 9000,
            }),
        };
        let line = serde_json::to_string(&event).expect("json");
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""event":"end""#), "{line}");
        assert!(
            line.contains(r#""time":"2026-12-02T14:05:00.25Z""#),
            "{line}"
        );
        assert!(
            line.contains(r#""outside":"192.168.31.101:40312""#),
            "{line}"
        );
        assert!(line.contains(r#""reason":"closed""#), "{line}");
        let back: TranslationEvent = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, event);
        assert!(back.holds("192.168.31.101".parse().expect("ip"), Some(40312)));
        assert!(!back.holds("192.168.31.101".parse().expect("ip"), Some(40313)));
        assert_eq!(back.protocol_number(), 6);
    }
}
