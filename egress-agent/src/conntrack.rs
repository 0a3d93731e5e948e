//! The conntrack table as flows: each outbound entry paired with its reply
//! entry, and the protocol state the two halves' flags add up to.
//!
//! The dataplane records only what each direction saw; the state machine
//! lives here, where it costs nothing per packet.

use std::{collections::HashMap, net::Ipv4Addr};

use egress_common::flow::{
    DIR_OUTBOUND, FlowEntryV4, FlowKeyV4, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN,
    TCP_RST, TCP_SYN,
};
use serde::Serialize;

/// Protocol state of a flow, close to Linux conntrack's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlowState {
    /// TCP: SYN sent, nothing back yet.
    SynSent,
    /// TCP: the peer answered the handshake.
    Established,
    /// TCP: one side sent FIN.
    FinWait,
    /// TCP: both sides sent FIN, or either sent RST.
    Closed,
    /// UDP/ICMP: packets out, none back yet.
    Unreplied,
    /// UDP/ICMP: replies seen.
    Replied,
}

impl FlowState {
    pub fn of(proto: u8, outbound: &FlowEntryV4, reply: Option<&FlowEntryV4>) -> Self {
        let back = reply.map_or(0, |r| r.tcp_flags);
        let replied = reply.is_some_and(|r| r.packets > 0);
        if proto != PROTO_TCP {
            return if replied {
                Self::Replied
            } else {
                Self::Unreplied
            };
        }
        let out = outbound.tcp_flags;
        if (out | back) & TCP_RST != 0 || (out & TCP_FIN != 0 && back & TCP_FIN != 0) {
            Self::Closed
        } else if (out | back) & TCP_FIN != 0 {
            Self::FinWait
        } else if back & (TCP_SYN | TCP_ACK) != 0 {
            Self::Established
        } else {
            Self::SynSent
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SynSent => "SYN_SENT",
            Self::Established => "ESTABLISHED",
            Self::FinWait => "FIN_WAIT",
            Self::Closed => "CLOSED",
            Self::Unreplied => "UNREPLIED",
            Self::Replied => "REPLIED",
        }
    }
}

/// One flow: both halves, as far as they exist.
#[derive(Debug, Clone)]
pub struct Flow {
    pub outbound_key: FlowKeyV4,
    pub outbound: FlowEntryV4,
    pub reply: Option<FlowEntryV4>,
}

impl Flow {
    pub fn state(&self) -> FlowState {
        FlowState::of(self.outbound_key.proto, &self.outbound, self.reply.as_ref())
    }

    pub fn tenant(&self) -> u16 {
        self.outbound_key.zone
    }

    /// Most recent packet in either direction.
    pub fn last_seen_ns(&self) -> u64 {
        self.reply.map_or(self.outbound.last_seen_ns, |r| {
            r.last_seen_ns.max(self.outbound.last_seen_ns)
        })
    }
}

/// Pairs entries into flows. Reply entries whose outbound half is gone
/// (evicted by LRU) are returned apart: they are what a sweeper removes.
pub fn pair(entries: Vec<(FlowKeyV4, FlowEntryV4)>) -> (Vec<Flow>, Vec<FlowKeyV4>) {
    let mut replies: HashMap<FlowKeyV4, FlowEntryV4> = HashMap::new();
    let mut outbound = Vec::new();
    for (key, entry) in entries {
        if key.direction == DIR_OUTBOUND {
            outbound.push((key, entry));
        } else {
            replies.insert(key, entry);
        }
    }
    let flows = outbound
        .into_iter()
        .map(|(key, entry)| Flow {
            reply: replies.remove(&key.peer_key(&entry)),
            outbound_key: key,
            outbound: entry,
        })
        .collect();
    (flows, replies.into_keys().collect())
}

pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".to_owned(),
        PROTO_UDP => "udp".to_owned(),
        PROTO_ICMP => "icmp".to_owned(),
        other => other.to_string(),
    }
}

/// `addr:port` with the port in host order, or `addr id N` for ICMP.
pub fn endpoint(proto: u8, addr: [u8; 4], port_be: u16) -> String {
    let addr = Ipv4Addr::from(addr);
    if proto == PROTO_ICMP {
        format!("{addr}")
    } else {
        format!("{addr}:{}", u16::from_be(port_be))
    }
}

/// CLOCK_MONOTONIC_COARSE, the dataplane's clock.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use egress_common::flow::{DIR_REPLY, REPLY_ZONE};

    use super::*;

    fn entry(flags: u8, packets: u64) -> FlowEntryV4 {
        FlowEntryV4 {
            tcp_flags: flags,
            packets,
            ..FlowEntryV4::default()
        }
    }

    #[test]
    fn tcp_states_follow_the_flags_of_both_directions() {
        let tcp = |out, back: Option<u8>| {
            FlowState::of(
                PROTO_TCP,
                &entry(out, 1),
                back.map(|b| entry(b, 1)).as_ref(),
            )
        };
        assert_eq!(tcp(TCP_SYN, None), FlowState::SynSent);
        assert_eq!(tcp(TCP_SYN, Some(0)), FlowState::SynSent);
        assert_eq!(
            tcp(TCP_SYN | TCP_ACK, Some(TCP_SYN | TCP_ACK)),
            FlowState::Established
        );
        assert_eq!(
            tcp(TCP_SYN | TCP_ACK | TCP_FIN, Some(TCP_SYN | TCP_ACK)),
            FlowState::FinWait
        );
        assert_eq!(
            tcp(TCP_ACK | TCP_FIN, Some(TCP_ACK | TCP_FIN)),
            FlowState::Closed
        );
        assert_eq!(tcp(TCP_SYN, Some(TCP_RST)), FlowState::Closed);
    }

    #[test]
    fn datagram_flows_are_replied_once_a_reply_was_counted() {
        assert_eq!(
            FlowState::of(PROTO_UDP, &entry(0, 3), None),
            FlowState::Unreplied
        );
        assert_eq!(
            FlowState::of(PROTO_UDP, &entry(0, 3), Some(&entry(0, 0))),
            FlowState::Unreplied
        );
        assert_eq!(
            FlowState::of(PROTO_ICMP, &entry(0, 3), Some(&entry(0, 1))),
            FlowState::Replied
        );
    }

    #[test]
    fn halves_are_paired_and_orphans_reported() {
        let out_key = FlowKeyV4 {
            src: [10, 0, 0, 1],
            dst: [192, 0, 2, 1],
            src_port: 1000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: PROTO_TCP,
            direction: DIR_OUTBOUND,
            zone: 3,
        };
        let out = FlowEntryV4 {
            nat_addr: [198, 51, 100, 1],
            nat_port: 40000u16.to_be(),
            tenant: 3,
            ..FlowEntryV4::default()
        };
        let reply_key = out_key.peer_key(&out);
        assert_eq!(reply_key.direction, DIR_REPLY);
        assert_eq!(reply_key.zone, REPLY_ZONE);
        assert_eq!(
            reply_key.peer_key(&FlowEntryV4 {
                nat_addr: out_key.src,
                nat_port: out_key.src_port,
                tenant: 3,
                ..FlowEntryV4::default()
            }),
            out_key
        );
        let orphan_key = FlowKeyV4 {
            dst_port: 40001u16.to_be(),
            ..reply_key
        };
        let (flows, orphans) = pair(vec![
            (reply_key, entry(TCP_SYN | TCP_ACK, 1)),
            (out_key, out),
            (orphan_key, entry(0, 1)),
        ]);
        assert_eq!(flows.len(), 1);
        assert!(flows[0].reply.is_some());
        assert_eq!(orphans, [orphan_key]);
    }
}
