//! `egress-agent log lookup`: which tenant and inside endpoint held an
//! egress address (and port) at a given moment, answered from the JSON
//! lines log and its rotated files, for abuse reports and partner
//! firewalls that only know the address the traffic came from.
//!
//! A flow holds its outside endpoint from its `start` to its end event's
//! `time`; a flow with no end event yet is still held. Files are streamed
//! oldest first, and only the flows of the address asked about are kept.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::{
    event::{EndReason, EventKind, Traffic, TranslationEvent},
    jsonlog::rotated_files,
};

/// Where the packaged configuration writes the log.
pub const DEFAULT_LOG_PATH: &str = "/var/log/egress/translations.jsonl";

/// `log lookup`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LookupArgs {
    /// The egress address the report names.
    #[arg(long)]
    pub address: IpAddr,
    /// Its port (the echo identifier for ICMP); any port when left out.
    #[arg(long)]
    pub port: Option<u16>,
    /// The moment, RFC 3339 with Z or an offset: 2026-12-02T14:03:22Z.
    #[arg(long)]
    pub at: Timestamp,
    /// Also match flows held up to this many seconds either side of --at,
    /// for reports whose clocks are not exact.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub window: u32,
    /// Only flows of this protocol.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// The translation log; its rotated files (FILE.1, FILE.2, ...) are
    /// read too. (`--log` is the global log filter.)
    #[arg(long, value_name = "FILE", default_value = DEFAULT_LOG_PATH)]
    pub file: PathBuf,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    /// ICMPv6 echo (IPv6 flows).
    Icmpv6,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Icmpv6 => "icmpv6",
        }
    }
}

/// What is asked: flows holding `address` (and `port`) at some moment in
/// `from..=until`.
#[derive(Debug, Clone)]
pub struct Query {
    pub address: IpAddr,
    pub port: Option<u16>,
    pub protocol: Option<String>,
    pub from: Timestamp,
    pub until: Timestamp,
}

impl Query {
    fn from_args(args: &LookupArgs) -> Self {
        let window = SignedDuration::from_secs(i64::from(args.window));
        Self {
            address: args.address,
            port: args.port,
            protocol: args.protocol.map(|p| p.as_str().to_owned()),
            from: args.at.checked_sub(window).unwrap_or(Timestamp::MIN),
            until: args.at.checked_add(window).unwrap_or(Timestamp::MAX),
        }
    }

    fn wants(&self, event: &TranslationEvent) -> bool {
        event.holds(self.address, self.port)
            && self.protocol.as_ref().is_none_or(|p| *p == event.protocol)
            && event.start <= self.until
    }
}

/// A flow that held the endpoint asked about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    pub start: Timestamp,
    /// None while the flow is still held (no end event logged).
    pub end: Option<Timestamp>,
    pub tenant: String,
    pub tenant_id: u16,
    pub protocol: String,
    pub inside: SocketAddr,
    pub outside: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<Traffic>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Traffic>,
}

impl Held {
    fn new(event: TranslationEvent) -> Self {
        let end = (event.event == EventKind::End).then_some(event.time);
        Self {
            start: event.start,
            end,
            tenant: event.tenant,
            tenant_id: event.tenant_id,
            protocol: event.protocol,
            inside: event.inside,
            outside: event.outside,
            destination: event.destination,
            reason: event.reason,
            outbound: event.outbound,
            inbound: event.inbound,
        }
    }

    /// `start end tenant protocol inside -> outside -> destination reason`,
    /// `-` for what is not known (an open flow's end and reason, a
    /// destination not recorded).
    pub fn line(&self) -> String {
        let end = self
            .end
            .map_or_else(|| "-".to_owned(), |t| format!("{t:.3}"));
        let destination = self
            .destination
            .map_or_else(|| "-".to_owned(), |d| d.to_string());
        let reason = self.reason.map_or("-", EndReason::as_str);
        format!(
            "{:.3} {end} {} {} {} -> {} -> {destination} {reason}",
            self.start, self.tenant, self.protocol, self.inside, self.outside
        )
    }
}

/// A flow's identity: what its create and end events share. The same
/// identity is never held by two flows at once (it contains the
/// conntrack key), but it comes back when a tenant host reuses a tuple.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlowKey {
    tenant_id: u16,
    protocol: String,
    inside: SocketAddr,
    outside: SocketAddr,
    destination: Option<SocketAddr>,
}

impl FlowKey {
    fn of(event: &TranslationEvent) -> Self {
        Self {
            tenant_id: event.tenant_id,
            protocol: event.protocol.clone(),
            inside: event.inside,
            outside: event.outside,
            destination: event.destination,
        }
    }
}

/// How far an end's `start` may be from its creation's: the conntrack
/// table keeps creation times in whole seconds, and the two records place
/// the dataplane's clock on the wall clock at different moments.
const SAME_START: SignedDuration = SignedDuration::from_secs(2);

fn same_flow(a: Timestamp, b: Timestamp) -> bool {
    a.duration_since(b).abs() < SAME_START
}

/// What a lookup found.
#[derive(Debug, Default)]
pub struct Found {
    /// Oldest start first.
    pub held: Vec<Held>,
    /// Lines that were not translation events (a line cut by a killed
    /// agent, a corrupted file).
    pub unreadable: u64,
}

/// Pairs events as they stream past, keeping only the flows that can
/// still match: those of the asked endpoint that began by `until`.
struct Scan<'q> {
    query: &'q Query,
    /// Created, end not seen yet; oldest first.
    open: HashMap<FlowKey, Vec<TranslationEvent>>,
    /// Starts of flows whose end came before their creation (an end logged
    /// by the agent while the creation still sat in the dataplane's ring):
    /// their creation must not reopen them.
    ended_early: HashMap<FlowKey, Vec<Timestamp>>,
    matched: Vec<Held>,
    unreadable: u64,
}

impl<'q> Scan<'q> {
    fn new(query: &'q Query) -> Self {
        Self {
            query,
            open: HashMap::new(),
            ended_early: HashMap::new(),
            matched: Vec::new(),
            unreadable: 0,
        }
    }

    fn line(&mut self, line: &[u8]) {
        if line.trim_ascii().is_empty() {
            return;
        }
        let Ok(event) = serde_json::from_slice::<TranslationEvent>(line) else {
            self.unreadable += 1;
            return;
        };
        if !self.query.wants(&event) {
            return;
        }
        let key = FlowKey::of(&event);
        match event.event {
            EventKind::Create => {
                if self
                    .ended_early
                    .get(&key)
                    .is_some_and(|starts| starts.iter().any(|s| same_flow(*s, event.start)))
                {
                    return;
                }
                self.open.entry(key).or_default().push(event);
            }
            EventKind::End => {
                // Its creation may be in a file rotated away: the end
                // carries everything the creation did, its start to the
                // second.
                let created = self.open.get_mut(&key).and_then(|open| {
                    let i = open.iter().position(|c| same_flow(c.start, event.start))?;
                    Some(open.remove(i))
                });
                let mut held = Held::new(event);
                match created {
                    Some(created) => held.start = created.start,
                    None => self.ended_early.entry(key).or_default().push(held.start),
                }
                if held.end.is_some_and(|end| end >= self.query.from) {
                    self.matched.push(held);
                }
            }
        }
    }

    /// Every line of `reader`; only I/O errors stop it.
    fn read(&mut self, mut reader: impl BufRead) -> io::Result<()> {
        let mut line = Vec::with_capacity(1024);
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            self.line(&line);
        }
    }

    fn finish(self) -> Found {
        // Still open: held from its start on, so at any moment after it.
        let mut held: Vec<Held> = self
            .matched
            .into_iter()
            .chain(self.open.into_values().flatten().map(Held::new))
            .collect();
        held.sort_by(|a, b| {
            (a.start, &a.tenant, a.inside, a.outside)
                .cmp(&(b.start, &b.tenant, b.inside, b.outside))
        });
        Found {
            held,
            unreadable: self.unreadable,
        }
    }
}

/// `path`'s rotated files oldest first, then `path`: the order events
/// were written in. Gaps in the numbering are skipped; a missing `path`
/// (an agent killed mid-rotation) is not an error while rotated files exist.
pub fn log_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_files(path)
        .with_context(|| format!("reading the translation log {}", path.display()))?
        .into_iter()
        .rev()
        .map(|(_, file)| file)
        .collect();
    if path.exists() || files.is_empty() {
        // Opening it reports why it cannot be read (missing, permissions).
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// Reads the log at `path` and its rotated files for the flows `query` asks about.
pub fn lookup(path: &Path, query: &Query) -> anyhow::Result<Found> {
    let mut scan = Scan::new(query);
    for file in log_files(path)? {
        let reader = File::open(&file)
            .map(|f| BufReader::with_capacity(256 << 10, f))
            .with_context(|| format!("reading the translation log {}", file.display()))?;
        scan.read(reader)
            .with_context(|| format!("reading the translation log {}", file.display()))?;
    }
    Ok(scan.finish())
}

/// Runs `log lookup`; returns the exit code: 0 when some flow matched,
/// 1 when none did, 2 when the log could not be read.
pub fn run(args: &LookupArgs) -> i32 {
    let query = Query::from_args(args);
    let found = match lookup(&args.file, &query) {
        Ok(found) => found,
        Err(err) => {
            eprintln!("egress-agent: {err:#}");
            return 2;
        }
    };
    if found.unreadable > 0 {
        eprintln!(
            "egress-agent: {} lines could not be read (not translation events)",
            found.unreadable
        );
    }
    if found.held.is_empty() {
        let port = args.port.map_or_else(String::new, |p| format!(" port {p}"));
        let window = if args.window > 0 {
            format!(" (±{}s)", args.window)
        } else {
            String::new()
        };
        eprintln!(
            "egress-agent: no flow held {}{port} at {}{window} in {} or its rotated files",
            args.address,
            args.at,
            args.file.display()
        );
        return 1;
    }
    match print(&found.held, args.json) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("egress-agent: writing the result: {err}");
            2
        }
    }
}

fn print(held: &[Held], json: bool) -> io::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    for flow in held {
        if json {
            serde_json::to_writer(&mut out, flow)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", flow.line())?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::audit::jsonlog::tests::{TempDir, event};

    fn at(text: &str) -> Timestamp {
        text.parse().expect("an RFC 3339 time")
    }

    fn query(port: Option<u16>, from: Timestamp, until: Timestamp) -> Query {
        Query {
            address: "192.168.31.101".parse().expect("ip"),
            port,
            protocol: None,
            from,
            until,
        }
    }

    fn lines(events: &[TranslationEvent]) -> String {
        events
            .iter()
            .map(|e| serde_json::to_string(e).expect("json") + "\n")
            .collect()
    }

    fn scan(text: &str, query: &Query) -> Found {
        let mut scan = Scan::new(query);
        scan.read(text.as_bytes()).expect("reading memory");
        scan.finish()
    }

    /// Flow n: started at `event`'s start, ended 60 s later.
    fn times(n: u16) -> (Timestamp, Timestamp) {
        let end = event(EventKind::End, n);
        (end.start, end.time)
    }

    #[test]
    fn a_create_and_its_end_are_one_flow_held_inclusively() {
        let text = lines(&[
            event(EventKind::Create, 1),
            event(EventKind::Create, 2),
            event(EventKind::End, 1),
            event(EventKind::End, 2),
        ]);
        let (start, end) = times(1);
        for moment in [start, end, start + SignedDuration::from_secs(30)] {
            let found = scan(&text, &query(Some(40001), moment, moment));
            assert_eq!(
                found.held,
                [Held::new(event(EventKind::End, 1))],
                "{moment}"
            );
            assert_eq!(found.unreadable, 0);
        }
        let just = SignedDuration::from_millis(1);
        for moment in [start - just, end + just] {
            let found = scan(&text, &query(Some(40001), moment, moment));
            assert!(found.held.is_empty(), "{moment}: {:?}", found.held);
        }
    }

    #[test]
    fn an_ipv6_flow_is_found_by_its_ipv6_egress_address() {
        let v6 = |kind| {
            let mut e = event(kind, 1);
            e.inside = "[2001:db8:10::10]:30001".parse().expect("addr");
            e.outside = "[2001:db8:31::101]:40001".parse().expect("addr");
            e.destination = Some("[2001:db8:100::7]:443".parse().expect("addr"));
            e
        };
        // The IPv4 flow of the same port beside it is not the answer.
        let text = lines(&[
            event(EventKind::Create, 1),
            v6(EventKind::Create),
            event(EventKind::End, 1),
            v6(EventKind::End),
        ]);
        let (start, _) = times(1);
        let mut q = query(Some(40001), start, start);
        q.address = "2001:db8:31::101".parse().expect("ip");
        let found = scan(&text, &q);
        assert_eq!(found.held, [Held::new(v6(EventKind::End))]);
        assert!(found.held[0].line().contains("[2001:db8:10::10]:30001"));
    }

    #[test]
    fn the_port_and_protocol_filters_narrow_the_address() {
        let text = lines(&[
            event(EventKind::Create, 1),
            event(EventKind::Create, 2),
            event(EventKind::End, 1),
        ]);
        let (_, end) = times(1);
        // Both flows span `end` of flow 1 (flow 2 is still open).
        let found = scan(&text, &query(None, end, end));
        let ports: Vec<_> = found.held.iter().map(|h| h.outside.port()).collect();
        assert_eq!(ports, [40001, 40002]);
        let found = scan(&text, &query(Some(40002), end, end));
        assert_eq!(found.held.len(), 1);
        assert_eq!(found.held[0].inside.port(), 30002);

        let mut other = query(None, end, end);
        other.protocol = Some("udp".into());
        assert!(scan(&text, &other).held.is_empty());
        other.protocol = Some("tcp".into());
        assert_eq!(scan(&text, &other).held.len(), 2);
        other.address = "192.168.31.102".parse().expect("ip");
        assert!(scan(&text, &other).held.is_empty());
    }

    #[test]
    fn an_end_whose_create_was_rotated_away_still_answers() {
        let text = lines(&[event(EventKind::End, 7)]);
        let (start, _) = times(7);
        let found = scan(&text, &query(Some(40007), start, start));
        assert_eq!(found.held.len(), 1);
        let held = &found.held[0];
        assert_eq!(held.tenant, "tenant-a");
        assert_eq!(held.inside, "10.0.1.5:30007".parse().expect("addr"));
        assert_eq!(held.reason, Some(EndReason::Expired));
    }

    #[test]
    fn a_flow_without_an_end_is_held_from_its_start_on() {
        let text = lines(&[event(EventKind::Create, 3)]);
        let (start, _) = times(3);
        let later = at("2030-01-01T00:00:00Z");
        let found = scan(&text, &query(Some(40003), later, later));
        assert_eq!(found.held.len(), 1);
        assert_eq!(found.held[0].end, None);
        assert!(
            found.held[0]
                .line()
                .contains(" - tenant-a tcp 10.0.1.5:30003 -> ")
        );
        let before = start - SignedDuration::from_secs(1);
        assert!(
            scan(&text, &query(Some(40003), before, before))
                .held
                .is_empty()
        );
    }

    #[test]
    fn a_flow_ended_before_the_moment_is_not_reported_open() {
        // Its create stays in the open set until the end arrives: the end
        // must close it even though the end itself is not a match.
        let text = lines(&[event(EventKind::Create, 4), event(EventKind::End, 4)]);
        let after = times(4).1 + SignedDuration::from_secs(5);
        assert!(
            scan(&text, &query(Some(40004), after, after))
                .held
                .is_empty()
        );
        // ... unless the window reaches back to it.
        let found = scan(
            &text,
            &query(Some(40004), after - SignedDuration::from_secs(5), after),
        );
        assert_eq!(found.held.len(), 1);
    }

    #[test]
    fn a_create_logged_after_its_end_does_not_reopen_it() {
        let text = lines(&[
            event(EventKind::End, 5),
            event(EventKind::Create, 5),
            event(EventKind::Create, 5),
        ]);
        let (start, _) = times(5);
        let found = scan(&text, &query(Some(40005), start, start));
        assert_eq!(found.held, [Held::new(event(EventKind::End, 5))]);
    }

    #[test]
    fn an_end_pairs_with_its_creation_despite_the_tables_whole_seconds() {
        // The creation's start comes from the dataplane's event to the
        // millisecond; the end's from the conntrack table, to the second.
        let mut created = event(EventKind::Create, 8);
        created.start += SignedDuration::from_millis(734);
        created.time = created.start;
        let ended = event(EventKind::End, 8);
        let text = lines(&[created.clone(), ended.clone()]);
        let found = scan(&text, &query(Some(40008), created.start, created.start));
        let mut expected = Held::new(ended);
        expected.start = created.start;
        assert_eq!(
            found.held,
            [expected],
            "one flow, ended, with the exact start"
        );
    }

    #[test]
    fn a_port_reused_later_by_another_host_is_told_apart() {
        let mut second = event(EventKind::Create, 6);
        second.start = times(6).1 + SignedDuration::from_secs(10);
        second.time = second.start;
        second.inside = "10.0.9.9:5555".parse().expect("addr");
        second.tenant = "tenant-b".into();
        second.tenant_id = 2;
        let text = lines(&[
            event(EventKind::Create, 6),
            event(EventKind::End, 6),
            second.clone(),
        ]);
        let first_moment = times(6).0;
        let found = scan(&text, &query(Some(40006), first_moment, first_moment));
        assert_eq!(found.held.len(), 1);
        assert_eq!(found.held[0].tenant, "tenant-a");
        let found = scan(&text, &query(Some(40006), second.start, second.start));
        assert_eq!(found.held.len(), 1);
        assert_eq!(found.held[0].tenant, "tenant-b");
    }

    #[test]
    fn unparsable_lines_are_counted_not_fatal() {
        let mut text = lines(&[event(EventKind::Create, 1)]);
        text.push_str("not json\n\n{\"event\":\"create\"}\n");
        // A line cut short by a killed agent, with no newline.
        let cut = lines(&[event(EventKind::End, 1)]);
        text.push_str(&cut[..cut.len() / 2]);
        let (start, _) = times(1);
        let found = scan(&text, &query(Some(40001), start, start));
        assert_eq!(found.unreadable, 3);
        assert_eq!(found.held.len(), 1);
        assert_eq!(found.held[0].end, None);
    }

    #[test]
    fn files_are_read_oldest_first_across_gaps() {
        let dir = TempDir::new("lookup-files");
        let path = dir.0.join("translations.jsonl");
        // Create in the oldest file, end in path.1; path.2 is missing (an
        // agent killed mid-rotation), the current file too.
        fs::write(
            format!("{}.3", path.display()),
            lines(&[event(EventKind::Create, 8)]),
        )
        .expect("write");
        fs::write(
            format!("{}.1", path.display()),
            lines(&[event(EventKind::End, 8)]),
        )
        .expect("write");
        let files = log_files(&path).expect("files");
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["translations.jsonl.3", "translations.jsonl.1"]);
        let after = times(8).1 + SignedDuration::from_secs(1);
        // Read in the wrong order the create would look still open.
        let found = lookup(&path, &query(Some(40008), after, after)).expect("lookup");
        assert!(found.held.is_empty(), "{:?}", found.held);
    }

    #[test]
    fn a_missing_log_is_an_error_naming_it() {
        let dir = TempDir::new("lookup-missing");
        let path = dir.0.join("translations.jsonl");
        let moment = at("2026-12-02T14:03:22Z");
        let err = lookup(&path, &query(None, moment, moment)).expect_err("no log");
        assert!(
            format!("{err:#}").contains(&path.display().to_string()),
            "{err:#}"
        );
    }

    #[test]
    fn the_window_widens_the_moment_both_ways() {
        let args = LookupArgs {
            address: "192.168.31.101".parse().expect("ip"),
            port: None,
            at: at("2026-12-02T15:03:22+01:00"),
            window: 30,
            protocol: Some(Protocol::Udp),
            file: DEFAULT_LOG_PATH.into(),
            json: false,
        };
        let query = Query::from_args(&args);
        assert_eq!(query.from, at("2026-12-02T14:02:52Z"));
        assert_eq!(query.until, at("2026-12-02T14:03:52Z"));
        assert_eq!(query.protocol.as_deref(), Some("udp"));
    }
}
