//! `egress-agent log lookup` as an operator runs it, against a log the
//! agent's own writer rotated: the answer for a flow long swept (its end
//! line in a rotated file, its create line rotated out for good), and the
//! exit codes scripts rely on. Needs no root.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use egress_agent::{
    audit::{
        event::{EndReason, EventKind, Traffic, TranslationEvent},
        jsonlog::JsonLog,
    },
    config::audit::LogTarget,
};
use jiff::{SignedDuration, Timestamp};

struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("egress-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("creating a temporary directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const SWEPT_START: &str = "2026-12-02T14:03:20.125Z";
const SWEPT_END: &str = "2026-12-02T14:05:00.250Z";

fn time(text: &str) -> Timestamp {
    text.parse().expect("an RFC 3339 time")
}

fn flow(
    kind: EventKind,
    start: Timestamp,
    end: Timestamp,
    tenant: &str,
    inside: &str,
    outside: &str,
) -> TranslationEvent {
    let ended = kind == EventKind::End;
    TranslationEvent {
        event: kind,
        time: if ended { end } else { start },
        start,
        tenant: tenant.into(),
        tenant_id: if tenant == "tenant-a" { 1 } else { 2 },
        protocol: "tcp".into(),
        inside: inside.parse().expect("inside"),
        outside: outside.parse().expect("outside"),
        destination: Some("203.0.113.7:443".parse().expect("destination")),
        reason: ended.then_some(EndReason::Closed),
        outbound: ended.then_some(Traffic {
            packets: 10,
            bytes: 1200,
        }),
        inbound: ended.then_some(Traffic {
            packets: 8,
            bytes: 9000,
        }),
    }
}

/// `count` one-second flows of tenant-b from `from` on, 10 ms apart: the
/// first on the swept flow's address (the next port), the rest on the
/// other egress address. About 8 of them fill a 4 KiB file.
fn filler(log: &mut JsonLog, from: Timestamp, count: u16) {
    for n in 0..count {
        let start = from + SignedDuration::from_millis(i64::from(n) * 10);
        let outside = if n == 0 {
            "192.168.31.101:40313".to_owned()
        } else {
            format!("192.168.31.102:{}", 20000 + n)
        };
        let inside = format!("10.0.2.9:{}", 30000 + n);
        for kind in [EventKind::Create, EventKind::End] {
            let event = flow(
                kind,
                start,
                start + SignedDuration::from_secs(1),
                "tenant-b",
                &inside,
                &outside,
            );
            log.write(&event).expect("writing the log");
        }
    }
    log.flush().expect("flushing the log");
}

/// The log: the swept flow's create, filler that rotates it away, its
/// end, filler that rotates the end out of the current file (but not out
/// of the three kept), and a flow on the same port still open.
fn write_log(path: &Path) -> (TranslationEvent, TranslationEvent) {
    let target = LogTarget::File {
        path: path.to_path_buf(),
        max_size: 4096,
        keep: 3,
    };
    let mut log = JsonLog::open(&target).expect("opening the log");
    let (start, end) = (time(SWEPT_START), time(SWEPT_END));
    let create = flow(
        EventKind::Create,
        start,
        end,
        "tenant-a",
        "10.0.1.5:41234",
        "192.168.31.101:40312",
    );
    log.write(&create).expect("write");
    filler(&mut log, start, 100);
    let ended = flow(
        EventKind::End,
        start,
        end,
        "tenant-a",
        "10.0.1.5:41234",
        "192.168.31.101:40312",
    );
    log.write(&ended).expect("write");
    filler(&mut log, end, 10);
    let open_start = end + SignedDuration::from_secs(30);
    let open = flow(
        EventKind::Create,
        open_start,
        open_start,
        "tenant-c",
        "10.0.3.3:5000",
        "192.168.31.101:40312",
    );
    log.write(&open).expect("write");
    log.flush().expect("flush");
    (ended, open)
}

fn lookup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egress-agent"))
        .args(["log", "lookup"])
        .args(args)
        .env_remove("EGRESS_INSTANCE")
        .output()
        .expect("running egress-agent")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lines_of(file: &Path) -> Vec<TranslationEvent> {
    fs::read_to_string(file)
        .expect("reading a log file")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a whole line"))
        .collect()
}

#[test]
fn lookup_answers_from_rotated_files_with_script_friendly_exit_codes() {
    let dir = TempDir::new("log-lookup");
    let path = dir.0.join("translations.jsonl");
    let (ended, open) = write_log(&path);
    let file = path.to_str().expect("a UTF-8 path");

    // The premise: the swept flow's end is only in a rotated file, and its
    // create is in no file any more.
    let rotated: Vec<_> = (1..=3)
        .map(|n| PathBuf::from(format!("{file}.{n}")))
        .collect();
    assert!(rotated.iter().all(|f| f.exists()), "three rotated files");
    assert!(!PathBuf::from(format!("{file}.4")).exists(), "keep is 3");
    let all: Vec<_> = rotated
        .iter()
        .chain([&path])
        .flat_map(|f| lines_of(f))
        .collect();
    assert!(!lines_of(&path).contains(&ended));
    assert!(all.contains(&ended));
    assert!(
        !all.iter()
            .any(|e| e.event == EventKind::Create && e.tenant == "tenant-a")
    );

    // Inside the flow's lifetime, with the report's own offset.
    let out = lookup(&[
        "--address",
        "192.168.31.101",
        "--port",
        "40312",
        "--at",
        "2026-12-02T15:03:22+01:00",
        "--file",
        file,
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout,
        "2026-12-02T14:03:20.125Z 2026-12-02T14:05:00.250Z tenant-a tcp \
         10.0.1.5:41234 -> 192.168.31.101:40312 -> 203.0.113.7:443 closed\n"
    );

    // Without --port, at the swept flow's last instant (ends count):
    // it and tenant-b's flow starting that instant on the next port.
    let out = lookup(&[
        "--address",
        "192.168.31.101",
        "--at",
        SWEPT_END,
        "--protocol",
        "tcp",
        "--json",
        "--file",
        file,
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    let tenants: Vec<_> = rows.iter().map(|r| r["tenant"].as_str()).collect();
    assert_eq!(tenants, [Some("tenant-a"), Some("tenant-b")], "{rows:?}");
    assert_eq!(rows[0]["inside"], "10.0.1.5:41234");
    assert_eq!(rows[0]["end"], "2026-12-02T14:05:00.25Z");

    // The same port later: the flow still open, end shown as `-`.
    let later = (open.start + SignedDuration::from_secs(3600)).to_string();
    let out = lookup(&[
        "--address",
        "192.168.31.101",
        "--port",
        "40312",
        "--at",
        &later,
        "--file",
        file,
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(" - tenant-c tcp 10.0.3.3:5000 -> "),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");

    // Between the two: nothing held it. Exit 1, nothing on stdout; a
    // window reaching back to the end finds it again.
    let gap = (ended.time + SignedDuration::from_secs(10)).to_string();
    let args = [
        "--address",
        "192.168.31.101",
        "--port",
        "40312",
        "--at",
        &gap,
        "--file",
        file,
    ];
    let out = lookup(&args);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("no flow held"),
        "{}",
        text(&out.stderr)
    );
    let out = lookup(&[&args[..], &["--window", "10"]].concat());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("tenant-a"));

    // A torn line is reported, not fatal.
    let mut current = fs::read(&path).expect("read");
    current.extend_from_slice(b"{\"event\":\"cre\n");
    fs::write(&path, current).expect("write");
    let out = lookup(
        &args[..6]
            .iter()
            .copied()
            .chain(["--window", "10", "--file", file])
            .collect::<Vec<_>>(),
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("1 lines could not be read"),
        "{}",
        text(&out.stderr)
    );

    // No log there: exit 2 naming the path.
    let missing = dir.0.join("elsewhere/translations.jsonl");
    let missing = missing.to_str().expect("a UTF-8 path");
    let out = lookup(&[
        "--address",
        "192.168.31.101",
        "--at",
        &gap,
        "--file",
        missing,
    ]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains(missing), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());

    // A time that is not RFC 3339 is a usage error (clap's exit 2).
    let out = lookup(&[
        "--address",
        "192.168.31.101",
        "--at",
        "yesterday",
        "--file",
        file,
    ]);
    assert_eq!(out.status.code(), Some(2));
}
