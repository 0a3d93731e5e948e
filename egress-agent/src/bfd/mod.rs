//! BFD towards the routers that steer tenant traffic to this gateway: RFC
//! 5880 asynchronous mode over RFC 5881 single hop, IPv4 and IPv6, without echo,
//! demand mode or authentication. Routers withdraw the gateway as soon as
//! its sessions go down, so the sessions follow the dataplane: with
//! `Health::NotServing` they are held in AdminDown (diag 6, concatenated
//! path down) and come up only while the dataplane serves.
//!
//! `packet` is the wire format, `session` the state machine (no I/O, time
//! passed in), `runtime` the sockets and timers behind [`Bfd`].

pub mod packet;
mod runtime;
pub mod session;

use std::{net::IpAddr, time::Duration};

use serde::Serialize;

pub use packet::{Diag, DropCounts, State};
pub use runtime::Bfd;

/// One BFD peer: a router on a directly connected link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// IPv4 or IPv6; an IPv6 link-local address needs `interface`.
    pub address: IpAddr,
    /// Send through (and accept only from) this interface.
    pub interface: Option<String>,
    /// Desired minimum transmit interval once the session is Up.
    pub min_tx: Duration,
    /// Required minimum receive interval: how often the peer may send.
    pub min_rx: Duration,
    /// Detection multiplier: packets the peer may miss before we declare it
    /// down is this times the negotiated interval.
    pub multiplier: u8,
    /// RFC 5880 §6.1 passive role: send nothing until the peer has been
    /// heard (and again after it went silent), as a gateway pod that only
    /// answers the router's sessions does.
    pub passive: bool,
}

impl PeerConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(1000);
    pub const DEFAULT_MULTIPLIER: u8 = 3;

    /// A peer with the default timers: 1 s intervals, multiplier 3.
    pub fn new(address: impl Into<IpAddr>) -> Self {
        let address = address.into();
        Self {
            address,
            interface: None,
            min_tx: Self::DEFAULT_INTERVAL,
            min_rx: Self::DEFAULT_INTERVAL,
            multiplier: Self::DEFAULT_MULTIPLIER,
            passive: false,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        // The wire carries intervals as 32-bit microseconds.
        let limit = Duration::from_micros(u64::from(u32::MAX));
        for (name, interval) in [("min_tx", self.min_tx), ("min_rx", self.min_rx)] {
            if interval < Duration::from_millis(1) || interval > limit {
                anyhow::bail!(
                    "BFD peer {}: {name} {interval:?} is outside 1ms..={limit:?}",
                    self.address
                );
            }
        }
        if self.multiplier == 0 {
            anyhow::bail!("BFD peer {}: multiplier must be at least 1", self.address);
        }
        Ok(())
    }
}

/// Whether the gateway's dataplane serves traffic. Sessions may come up
/// only while it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Serving,
    /// The dataplane is detached or cannot be read: sessions go AdminDown
    /// with diag 6, so the routers stop sending traffic here.
    NotServing,
}

/// One session as `Bfd::snapshot` sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    pub address: IpAddr,
    pub interface: Option<String>,
    pub local_state: State,
    pub remote_state: State,
    pub local_discriminator: u32,
    /// 0 until the peer is heard, and again after a detection time of silence.
    pub remote_discriminator: u32,
    pub local_diag: Diag,
    pub remote_diag: Diag,
    /// Periodic transmit interval before jitter; None while the peer asked
    /// for no periodic packets.
    pub tx_interval_ms: Option<u64>,
    /// None until the peer is heard.
    pub detection_time_ms: Option<u64>,
    /// 0 until the peer is heard.
    pub remote_multiplier: u8,
    pub transitions: u64,
    pub last_transition_unix_ms: Option<u64>,
    pub packets_in: u64,
    pub packets_out: u64,
    /// Datagrams from this peer's address that were dropped, by reason.
    pub dropped: DropCounts,
}

/// The sessions as Prometheus text: `egress_bfd_session_up`,
/// `egress_bfd_transitions_total`, `egress_bfd_packets_total` per peer (the
/// agent's `/metrics` and the Kube-OVN BFD responder's).
pub fn write_metrics(out: &mut String, sessions: &[PeerStatus]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP egress_bfd_session_up 1 while the BFD session with the peer is Up.\n\
         # TYPE egress_bfd_session_up gauge"
    );
    for s in sessions {
        let up = u8::from(s.local_state == State::Up);
        let _ = writeln!(out, "egress_bfd_session_up{{peer=\"{}\"}} {up}", s.address);
    }
    let _ = writeln!(
        out,
        "# HELP egress_bfd_transitions_total Session state changes.\n\
         # TYPE egress_bfd_transitions_total counter"
    );
    for s in sessions {
        let _ = writeln!(
            out,
            "egress_bfd_transitions_total{{peer=\"{}\"}} {}",
            s.address, s.transitions
        );
    }
    let _ = writeln!(
        out,
        "# HELP egress_bfd_packets_total BFD control packets by direction.\n\
         # TYPE egress_bfd_packets_total counter"
    );
    for s in sessions {
        let _ = writeln!(
            out,
            "egress_bfd_packets_total{{peer=\"{}\",direction=\"in\"}} {}\n\
             egress_bfd_packets_total{{peer=\"{}\",direction=\"out\"}} {}",
            s.address, s.packets_in, s.address, s.packets_out
        );
    }
}
