//! The control socket's protocol and the replies it gives, free of I/O.
//!
//! One request line per connection, one JSON reply. `live`, `ready` and
//! `status` are Kube-OVN's supervisor requests and get its reply,
//! `{"status": {...}, "error": "..."}` with Go's field names, so Kube-OVN's
//! own probe client works against this socket too. `bfdd-control ARGS...`
//! carries the subset of OpenBFDD's `bfdd-control` that Kube-OVN's scripts
//! use and answers with OpenBFDD's text, which those scripts match on.

use std::{fmt::Write as _, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::config::Sessions;
use crate::bfd::{PeerStatus, State};

/// Prefix of a `bfdd-control` request line.
pub const BFDD_CONTROL: &str = "bfdd-control";
/// Go's zero `time.Time`, as Kube-OVN's status shows an unset retry time.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Live,
    Ready,
    Status,
    BfddControl(Vec<String>),
    Unknown(String),
}

impl Request {
    pub fn parse(line: &str) -> Self {
        let line = line.trim();
        match line {
            "live" => Self::Live,
            "ready" => Self::Ready,
            "status" => Self::Status,
            _ => match line.strip_prefix(BFDD_CONTROL) {
                Some(rest) if rest.is_empty() || rest.starts_with(' ') => {
                    Self::BfddControl(rest.split_whitespace().map(str::to_owned).collect())
                }
                _ => Self::Unknown(line.to_owned()),
            },
        }
    }

    /// The line a client sends.
    pub fn line(&self) -> String {
        match self {
            Self::Live => "live".to_owned(),
            Self::Ready => "ready".to_owned(),
            Self::Status => "status".to_owned(),
            Self::BfddControl(args) => {
                let mut line = BFDD_CONTROL.to_owned();
                for arg in args {
                    line.push(' ');
                    line.push_str(arg);
                }
                line
            }
            Self::Unknown(line) => line.clone(),
        }
    }
}

/// Kube-OVN's `SupervisorStatus`, field for field, plus the dataplane.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SupervisorStatus {
    /// The responder runs: its sockets are open and its task alive.
    pub live: bool,
    /// Every expected session is Up. Kube-OVN's controller does not gate
    /// readiness on it (its readiness probe asks `live`).
    pub ready: bool,
    pub sessions: Vec<SessionStatus>,
    pub control_failures: u32,
    pub last_control_error: String,
    pub child_restarts: u32,
    pub child_recovery_attempts: u32,
    pub child_next_retry: &'static str,
    pub child_circuit_open: bool,
    pub dataplane: DataplaneStatus,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SessionStatus {
    pub pair: Pair,
    /// Up, Down, Init or AdminDown; empty until the peer was heard (Kube-OVN
    /// shows a session OpenBFDD does not list yet that way).
    pub state: String,
    /// Kube-OVN's recovery phase: Up, or Grace while not Up (there is no
    /// child process to restart, so no other phase).
    pub phase: &'static str,
    pub attempts: u32,
    pub last_action: &'static str,
    pub last_result: String,
    pub next_retry: &'static str,
    /// Why the session is not Up, RFC 5880 diag (e.g. concatenated_path_down
    /// while the dataplane is detached).
    pub diag: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Pair {
    pub local: String,
    pub remote: String,
}

/// What the dataplane check last saw.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DataplaneStatus {
    pub interface: Option<String>,
    pub attached: bool,
    /// The program found, or why none counts.
    pub detail: String,
}

/// The reply to `live`, `ready`, `status` (and an unknown request).
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReply {
    pub status: SupervisorStatus,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The reply to `bfdd-control ...`: its text, and whether it succeeded
/// (the exit code of the `bfdd-control` command).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    pub output: String,
    pub ok: bool,
}

impl ControlReply {
    fn ok(output: String) -> Self {
        Self { output, ok: true }
    }

    fn failed(output: String) -> Self {
        Self { output, ok: false }
    }
}

/// Builds the status from the sessions: one per expected peer.
pub fn supervisor_status(
    live: bool,
    local: &[IpAddr],
    sessions: &[PeerStatus],
    dataplane: DataplaneStatus,
) -> SupervisorStatus {
    let sessions: Vec<SessionStatus> = sessions
        .iter()
        .map(|session| {
            let up = session.local_state == State::Up;
            SessionStatus {
                pair: Pair {
                    local: local_for(local, session.address),
                    remote: session.address.to_string(),
                },
                state: if heard(session) {
                    session.local_state.to_string()
                } else {
                    String::new()
                },
                phase: if up { "Up" } else { "Grace" },
                attempts: 0,
                last_action: "None",
                last_result: String::new(),
                next_retry: GO_ZERO_TIME,
                diag: serde_json::to_value(session.local_diag)
                    .ok()
                    .and_then(|value| value.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            }
        })
        .collect();
    let ready = !sessions.is_empty() && sessions.iter().all(|s| s.phase == "Up");
    SupervisorStatus {
        live,
        ready,
        sessions,
        control_failures: 0,
        last_control_error: String::new(),
        child_restarts: 0,
        child_recovery_attempts: 0,
        child_next_retry: GO_ZERO_TIME,
        child_circuit_open: false,
        dataplane,
    }
}

/// Kube-OVN's answers to its probe requests.
pub fn probe_reply(request: &Request, status: SupervisorStatus) -> ProbeReply {
    let error = match request {
        Request::Live if !status.live => "BFD supervisor is not live".to_owned(),
        Request::Ready if !status.ready => "expected BFD sessions are not ready".to_owned(),
        Request::Live | Request::Ready | Request::Status => String::new(),
        Request::BfddControl(_) => format!("unknown supervisor request {:?}", request.line()),
        Request::Unknown(line) => format!("unknown supervisor request {line:?}"),
    };
    ProbeReply { status, error }
}

/// One `bfdd-control` command of the subset Kube-OVN uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Status,
    Allow(IpAddr),
    SetMinTx {
        ms: u32,
    },
    SetMinRx {
        ms: u32,
    },
    SetMulti(u8),
    /// `log type <type> yes|no`: accepted, logging is the tracing filter's.
    LogType {
        kind: String,
        on: bool,
    },
}

impl Command {
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        match words.as_slice() {
            ["status"] => Ok(Self::Status),
            ["allow", address] => address
                .parse()
                .map(Self::Allow)
                .map_err(|_| format!("Must specify a valid IP address, not {address:?}.")),
            ["session", "new", "set", "mintx", value, unit @ ..] => {
                interval_ms(value, unit).map(|ms| Self::SetMinTx { ms })
            }
            ["session", "new", "set", "minrx", value, unit @ ..] => {
                interval_ms(value, unit).map(|ms| Self::SetMinRx { ms })
            }
            ["session", "new", "set", "multi", value] => match value.parse::<u8>() {
                Ok(multiplier) if multiplier > 0 => Ok(Self::SetMulti(multiplier)),
                _ => Err(format!(
                    "Must specify a multiplier of 1 to 255, not {value:?}."
                )),
            },
            ["log", "type", kind, on @ ("yes" | "no")] => Ok(Self::LogType {
                kind: (*kind).to_owned(),
                on: *on == "yes",
            }),
            _ => Err(format!(
                "Unknown command {:?}: this responder supports status, allow <ip>, \
                 session new set mintx|minrx <n> ms, session new set multi <n>, \
                 log type <type> yes|no.",
                words.join(" ")
            )),
        }
    }
}

/// OpenBFDD's intervals: a number and an optional unit (ms by default).
fn interval_ms(value: &str, unit: &[&str]) -> Result<u32, String> {
    let number: u64 = value
        .parse()
        .map_err(|_| format!("Must specify a whole number interval, not {value:?}."))?;
    let ms = match unit {
        [] | ["ms"] => Some(number),
        ["s"] => number.checked_mul(1000),
        ["us"] => Some(number.div_ceil(1000)),
        _ => None,
    };
    match ms.and_then(|ms| u32::try_from(ms).ok()) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => Err(format!(
            "Must specify a positive interval in ms, s or us, not {value} {}.",
            unit.join(" ")
        )),
    }
}

/// Applies a setting command to the session settings; `status` is
/// answered by [`render_status`] instead.
pub fn apply(command: &Command, sessions: &mut Sessions) -> ControlReply {
    match command {
        Command::Status => ControlReply::failed("Unable to complete status here.".to_owned()),
        Command::Allow(address) => {
            if !sessions.allowed.contains(address) {
                sessions.allowed.push(*address);
            }
            ControlReply::ok(format!("Allowing connections from {address}"))
        }
        Command::SetMinTx { ms } => {
            sessions.min_tx_ms = *ms;
            ControlReply::ok(format!(
                "Attempting to set mintx to {} us.",
                thousands(u64::from(*ms) * 1000)
            ))
        }
        Command::SetMinRx { ms } => {
            sessions.min_rx_ms = *ms;
            ControlReply::ok(format!(
                "Attempting to set minrx to {} us.",
                thousands(u64::from(*ms) * 1000)
            ))
        }
        Command::SetMulti(multiplier) => {
            sessions.multiplier = *multiplier;
            ControlReply::ok(format!("Attempting to set multi to {multiplier}."))
        }
        Command::LogType { kind, on } => ControlReply::ok(format!(
            "Log type {kind} set to {}",
            if *on { "yes" } else { "no" }
        )),
    }
}

/// OpenBFDD's `status`: the sessions a peer has opened (OpenBFDD creates
/// a session when an allowed peer's first packet arrives, so one never
/// heard is not listed, and "There are 0 sessions:" is what Kube-OVN's
/// liveness script restarts on). `(p)` marks the passive role.
pub fn render_status(local: &[IpAddr], sessions: &[PeerStatus]) -> String {
    let listed: Vec<&PeerStatus> = sessions.iter().filter(|s| heard(s)).collect();
    let mut out = format!("There are {} sessions:\n", listed.len());
    for (index, session) in listed.iter().enumerate() {
        let id = index + 1;
        let _ = writeln!(out, "Session {id}");
        let _ = writeln!(
            out,
            " id={id} local={} (p) remote={} state={}",
            local_for(local, session.address),
            session.address,
            session.local_state
        );
    }
    out
}

/// The pod's address a session with `peer` runs from: the one of its
/// family.
fn local_for(local: &[IpAddr], peer: IpAddr) -> String {
    local
        .iter()
        .find(|l| l.is_ipv4() == peer.is_ipv4())
        .map(IpAddr::to_string)
        .unwrap_or_default()
}

fn heard(session: &PeerStatus) -> bool {
    session.packets_in > 0
}

/// 100000 as OpenBFDD prints it: 100,000.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bfd::{Diag, DropCounts};
    use std::net::Ipv4Addr;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn sessions() -> Sessions {
        Sessions {
            min_tx_ms: 1000,
            min_rx_ms: 1000,
            multiplier: 3,
            allowed: vec!["10.0.1.254".parse().unwrap()],
        }
    }

    fn peer(state: State, packets_in: u64) -> PeerStatus {
        PeerStatus {
            address: Ipv4Addr::new(10, 0, 1, 254).into(),
            interface: None,
            local_state: state,
            remote_state: State::Down,
            local_discriminator: 1,
            remote_discriminator: 2,
            local_diag: Diag::ConcatenatedPathDown,
            remote_diag: Diag::None,
            tx_interval_ms: None,
            detection_time_ms: None,
            remote_multiplier: 3,
            transitions: 0,
            last_transition_unix_ms: None,
            packets_in,
            packets_out: 0,
            dropped: DropCounts::default(),
        }
    }

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5));

    #[test]
    fn parses_requests() {
        assert_eq!(Request::parse("live\n"), Request::Live);
        assert_eq!(Request::parse("ready"), Request::Ready);
        assert_eq!(Request::parse(" status "), Request::Status);
        assert_eq!(
            Request::parse("bfdd-control allow 10.0.0.1"),
            Request::BfddControl(args("allow 10.0.0.1"))
        );
        assert_eq!(Request::parse("bfdd-control"), Request::BfddControl(vec![]));
        assert_eq!(
            Request::parse("bfdd-controlx"),
            Request::Unknown("bfdd-controlx".into())
        );
        let request = Request::BfddControl(args("session new set mintx 100 ms"));
        assert_eq!(Request::parse(&request.line()), request);
    }

    #[test]
    fn parses_the_commands_kube_ovns_scripts_send() {
        let cases = [
            ("status", Command::Status),
            (
                "allow 10.0.1.254",
                Command::Allow("10.0.1.254".parse().unwrap()),
            ),
            ("allow ::", Command::Allow("::".parse().unwrap())),
            (
                "session new set mintx 100 ms",
                Command::SetMinTx { ms: 100 },
            ),
            ("session new set minrx 2 s", Command::SetMinRx { ms: 2000 }),
            ("session new set minrx 1500 us", Command::SetMinRx { ms: 2 }),
            ("session new set multi 5", Command::SetMulti(5)),
            (
                "log type command no",
                Command::LogType {
                    kind: "command".into(),
                    on: false,
                },
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(Command::parse(&args(line)), Ok(expected), "{line}");
        }
        for line in [
            "",
            "allow nope",
            "session new set mintx 0 ms",
            "session new set mintx 10 min",
            "session new set multi 0",
            "session new set multi 300",
            "stop",
        ] {
            assert!(Command::parse(&args(line)).is_err(), "{line} was accepted");
        }
    }

    #[test]
    fn answers_as_openbfdd_does() {
        let mut settings = sessions();
        let reply = apply(&Command::SetMinTx { ms: 100 }, &mut settings);
        assert_eq!(reply.output, "Attempting to set mintx to 100,000 us.");
        let reply = apply(&Command::SetMinRx { ms: 1000 }, &mut settings);
        assert_eq!(reply.output, "Attempting to set minrx to 1,000,000 us.");
        let reply = apply(&Command::SetMulti(3), &mut settings);
        assert_eq!(reply.output, "Attempting to set multi to 3.");
        let reply = apply(
            &Command::Allow("10.0.1.253".parse().unwrap()),
            &mut settings,
        );
        assert_eq!(reply.output, "Allowing connections from 10.0.1.253");
        assert!(reply.ok);
        assert_eq!(settings.min_tx_ms, 100);
        assert_eq!(settings.allowed.len(), 2);
        // Allowing a peer twice keeps one session.
        apply(
            &Command::Allow("10.0.1.253".parse().unwrap()),
            &mut settings,
        );
        assert_eq!(settings.allowed.len(), 2);
    }

    #[test]
    fn status_lists_sessions_once_the_peer_was_heard() {
        assert_eq!(
            render_status(&[LOCAL], &[peer(State::AdminDown, 0)]),
            "There are 0 sessions:\n"
        );
        assert_eq!(
            render_status(&[LOCAL], &[peer(State::Up, 4)]),
            "There are 1 sessions:\nSession 1\n id=1 local=10.0.1.5 (p) remote=10.0.1.254 state=Up\n"
        );
    }

    #[test]
    fn probes_answer_as_kube_ovns_supervisor() {
        let up = supervisor_status(
            true,
            &[LOCAL],
            &[peer(State::Up, 1)],
            DataplaneStatus::default(),
        );
        assert!(up.ready);
        assert!(probe_reply(&Request::Ready, up.clone()).error.is_empty());
        let down = supervisor_status(
            true,
            &[LOCAL],
            &[peer(State::AdminDown, 1)],
            DataplaneStatus::default(),
        );
        assert!(!down.ready);
        // Live does not depend on the sessions: Kube-OVN restarts a
        // container that is not live, which would not bring the dataplane back.
        assert!(probe_reply(&Request::Live, down.clone()).error.is_empty());
        assert_eq!(
            probe_reply(&Request::Ready, down.clone()).error,
            "expected BFD sessions are not ready"
        );
        let json = serde_json::to_value(probe_reply(&Request::Status, down)).unwrap();
        assert_eq!(json["status"]["Live"], true);
        assert_eq!(
            json["status"]["Sessions"][0]["Pair"]["Remote"],
            "10.0.1.254"
        );
        assert_eq!(json["status"]["Sessions"][0]["State"], "AdminDown");
        assert_eq!(
            json["status"]["Sessions"][0]["Diag"],
            "concatenated_path_down"
        );
        assert!(json.get("error").is_none());
        let not_live = supervisor_status(false, &[LOCAL], &[], DataplaneStatus::default());
        assert_eq!(
            probe_reply(&Request::Live, not_live.clone()).error,
            "BFD supervisor is not live"
        );
        assert!(!not_live.ready, "no expected session is not ready");
        assert_eq!(
            probe_reply(&Request::Unknown("x".into()), not_live).error,
            "unknown supervisor request \"x\""
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
