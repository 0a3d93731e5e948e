//! The translation log as JSON lines: one `TranslationEvent` a line, to
//! standard output or to a file rotated by size (`path`, `path.1` the
//! newest rotated one, up to `path.KEEP`), so the disk it takes stays near
//! (keep + 1) * max_size. `lookup` reads the same files back.
//!
//! Writes are buffered; the caller flushes once per batch of events.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Stdout, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::event::TranslationEvent;
use crate::config::audit::LogTarget;

/// Audit data names who was behind which address: not for every local user.
const FILE_MODE: u32 = 0o640;
const DIR_MODE: u32 = 0o750;

/// A translation log being written.
pub struct JsonLog {
    sink: Sink,
    /// Reused for every event, so a line costs no allocation once warm.
    line: Vec<u8>,
}

enum Sink {
    Stdout(BufWriter<Stdout>),
    File(RotatingFile),
}

struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    keep: u32,
    file: BufWriter<File>,
    /// Bytes in the current file, written or buffered.
    size: u64,
}

impl JsonLog {
    /// Opens the target. An existing file is appended to, so a restarted
    /// agent continues the log it left.
    pub fn open(target: &LogTarget) -> anyhow::Result<Self> {
        let sink = match target {
            LogTarget::Stdout => Sink::Stdout(BufWriter::new(io::stdout())),
            LogTarget::File {
                path,
                max_size,
                keep,
            } => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(DIR_MODE)
                        .create(parent)
                        .with_context(|| {
                            format!(
                                "creating the translation log's directory {}",
                                parent.display()
                            )
                        })?;
                }
                let (file, size) = open_append(path)
                    .with_context(|| format!("opening the translation log {}", path.display()))?;
                Sink::File(RotatingFile {
                    path: path.clone(),
                    max_size: *max_size,
                    keep: *keep,
                    file,
                    size,
                })
            }
        };
        Ok(Self {
            sink,
            line: Vec::with_capacity(512),
        })
    }

    /// Appends one event as one line (buffered: see `flush`).
    pub fn write(&mut self, event: &TranslationEvent) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, event)?;
        self.line.push(b'\n');
        match &mut self.sink {
            Sink::Stdout(out) => out.write_all(&self.line),
            Sink::File(file) => file.write_line(&self.line),
        }
    }

    /// Hands what is buffered to the file or stdout.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stdout(out) => out.flush(),
            Sink::File(file) => file
                .file
                .flush()
                .map_err(|err| named(err, "writing", &file.path)),
        }
    }
}

impl super::pipeline::Sink for JsonLog {
    fn name(&self) -> &'static str {
        "log"
    }

    /// A batch, then one flush: a line is on disk (or stdout) within a
    /// drain interval, without a write per event.
    fn write(&mut self, events: &[TranslationEvent]) -> anyhow::Result<()> {
        for event in events {
            JsonLog::write(self, event)?;
        }
        self.flush()?;
        Ok(())
    }
}

impl RotatingFile {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        // A line longer than max_size alone still goes whole into a fresh
        // file: lines are never split, and an empty file gains nothing
        // from rotating.
        if self.size > 0 && self.size + len > self.max_size {
            self.rotate()?;
        }
        self.file
            .write_all(line)
            .map_err(|err| named(err, "writing", &self.path))?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file
            .flush()
            .map_err(|err| named(err, "writing", &self.path))?;
        // Once per max_size: cheap, and a rename never lands on the disk
        // ahead of the data it names after a power cut.
        self.file
            .get_ref()
            .sync_data()
            .map_err(|err| named(err, "syncing", &self.path))?;
        let existing = rotated_files(&self.path)?;
        for (from, to) in rotation_renames(&self.path, self.keep, &existing) {
            fs::rename(&from, &to).map_err(|err| named(err, "rotating", &from))?;
        }
        // A smaller `keep` than a previous agent ran with leaves files
        // beyond it; past the retention they are this rotation's to drop.
        for (index, path) in existing {
            if index > u64::from(self.keep) {
                match fs::remove_file(&path) {
                    Err(err) if err.kind() != io::ErrorKind::NotFound => {
                        return Err(named(err, "removing", &path));
                    }
                    _ => {}
                }
            }
        }
        let (file, size) =
            open_append(&self.path).map_err(|err| named(err, "opening", &self.path))?;
        self.file = file;
        self.size = size;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<(BufWriter<File>, u64)> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((BufWriter::with_capacity(64 << 10, file), size))
}

fn named(err: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{doing} {}: {err}", path.display()))
}

/// `path.N` beside `path` for every N that exists, newest (lowest N) first.
/// Gaps are possible: an agent killed mid-rotation leaves one.
pub fn rotated_files(path: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|err| named(err, "listing", dir))? {
        let entry = entry.map_err(|err| named(err, "listing", dir))?;
        let file_name = entry.file_name();
        let Some(suffix) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        // Digits only: `path.1.gz` or `path.bak` are someone else's.
        if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(index) = suffix.parse::<u64>()
            && index > 0
        {
            found.push((index, dir.join(&file_name)));
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// The renames of one rotation, in the order they must run.
///
/// Files shift up by one only as far as the first missing name (or the
/// last kept one, which the shift replaces: rename drops the oldest in
/// the same step). Each rename moves a name onto a free or expired slot,
/// so a process killed between two renames leaves one name missing and
/// every line still in some file; the next rotation fills that gap
/// instead of pushing the files beyond it out.
fn rotation_renames(
    path: &Path,
    keep: u32,
    existing: &[(u64, PathBuf)],
) -> Vec<(PathBuf, PathBuf)> {
    let keep = u64::from(keep.max(1));
    let gap = (1..=keep)
        .find(|n| !existing.iter().any(|(index, _)| index == n))
        .unwrap_or(keep);
    let mut renames: Vec<_> = (1..gap)
        .rev()
        .map(|n| (numbered(path, n), numbered(path, n + 1)))
        .collect();
    renames.push((path.to_path_buf(), numbered(path, 1)));
    renames
}

fn numbered(path: &Path, n: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        net::SocketAddr,
        os::unix::fs::PermissionsExt,
        sync::atomic::{AtomicU32, Ordering},
    };

    use jiff::Timestamp;

    use super::*;
    use crate::audit::event::{EndReason, EventKind, Traffic};

    /// A directory removed when the test ends.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(label: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "egress-{label}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
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

    /// Flow `n` of tenant-a: outside port 40000 + n, started n seconds
    /// after 14:00.
    pub(crate) fn event(kind: EventKind, n: u16) -> TranslationEvent {
        let start = Timestamp::from_second(1_796_220_000 + i64::from(n)).expect("time");
        let end = kind == EventKind::End;
        TranslationEvent {
            event: kind,
            time: if end {
                start + jiff::SignedDuration::from_secs(60)
            } else {
                start
            },
            start,
            tenant: "tenant-a".into(),
            tenant_id: 1,
            protocol: "tcp".into(),
            inside: SocketAddr::new([10, 0, 1, 5].into(), 30000 + n),
            outside: SocketAddr::new([192, 168, 31, 101].into(), 40000 + n),
            destination: Some("203.0.113.7:443".parse().expect("addr")),
            reason: end.then_some(EndReason::Expired),
            outbound: end.then_some(Traffic {
                packets: 3,
                bytes: 180,
            }),
            inbound: end.then_some(Traffic {
                packets: 2,
                bytes: 120,
            }),
        }
    }

    fn target(path: &Path, max_size: u64, keep: u32) -> LogTarget {
        LogTarget::File {
            path: path.to_path_buf(),
            max_size,
            keep,
        }
    }

    /// Every line of `path` and its rotated files, oldest file first.
    fn all_lines(path: &Path) -> Vec<TranslationEvent> {
        let mut files: Vec<_> = rotated_files(path)
            .expect("listing")
            .into_iter()
            .rev()
            .map(|(_, p)| p)
            .collect();
        if path.exists() {
            files.push(path.to_path_buf());
        }
        files
            .iter()
            .flat_map(|file| {
                fs::read_to_string(file)
                    .expect("reading a log file")
                    .lines()
                    .map(|line| serde_json::from_str(line).expect("a whole JSON line"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn line_len(event: &TranslationEvent) -> u64 {
        serde_json::to_string(event).expect("json").len() as u64 + 1
    }

    #[test]
    fn rotation_bounds_each_file_and_the_number_kept() {
        let dir = TempDir::new("jsonlog-rotate");
        let path = dir.0.join("log/translations.jsonl");
        let max_size = 4096;
        let mut log = JsonLog::open(&target(&path, max_size, 3)).expect("open");
        let events: Vec<_> = (0..200).map(|n| event(EventKind::Create, n)).collect();
        for event in &events {
            log.write(event).expect("write");
        }
        log.flush().expect("flush");

        let rotated = rotated_files(&path).expect("listing");
        let indices: Vec<_> = rotated.iter().map(|(n, _)| *n).collect();
        assert_eq!(indices, [1, 2, 3], "keep 3 rotated files, no more");
        let mut files: Vec<_> = rotated.iter().map(|(_, p)| p.clone()).collect();
        files.push(path.clone());
        for file in &files {
            let size = fs::metadata(file).expect("metadata").len();
            assert!(size <= max_size, "{} is {size} bytes", file.display());
            // Rotated files were cut only when the next line did not fit.
            if file != &path {
                assert!(
                    size + line_len(&events[0]) > max_size,
                    "{} cut early",
                    file.display()
                );
            }
        }
        // What is left is the newest events, in order, none split or lost
        // between the files kept.
        let kept = all_lines(&path);
        assert!(kept.len() > 3 * (max_size / line_len(&events[0])) as usize);
        assert_eq!(kept[..], events[events.len() - kept.len()..]);
    }

    #[test]
    fn files_are_created_private_and_reopening_appends() {
        let dir = TempDir::new("jsonlog-reopen");
        let path = dir.0.join("egress/translations.jsonl");
        let mut log = JsonLog::open(&target(&path, 1 << 20, 2)).expect("open");
        log.write(&event(EventKind::Create, 1)).expect("write");
        log.flush().expect("flush");
        drop(log);

        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&path) & !0o640, 0, "the log is not world-readable");
        assert_eq!(mode(path.parent().expect("dir")) & !0o750, 0);

        let mut log = JsonLog::open(&target(&path, 1 << 20, 2)).expect("reopen");
        log.write(&event(EventKind::End, 1)).expect("write");
        log.flush().expect("flush");
        assert_eq!(
            all_lines(&path),
            [event(EventKind::Create, 1), event(EventKind::End, 1)]
        );
    }

    #[test]
    fn a_reopened_file_counts_its_size_towards_rotation() {
        let dir = TempDir::new("jsonlog-resize");
        let path = dir.0.join("translations.jsonl");
        let first = event(EventKind::Create, 1);
        let len = line_len(&first);
        // Room for exactly two lines.
        let target = target(&path, 2 * len, 1);
        let mut log = JsonLog::open(&target).expect("open");
        log.write(&first).expect("write");
        log.flush().expect("flush");
        drop(log);
        let mut log = JsonLog::open(&target).expect("reopen");
        log.write(&event(EventKind::Create, 2)).expect("write");
        log.write(&event(EventKind::Create, 3)).expect("write");
        log.flush().expect("flush");
        // Without the reopened file's size the third line would still fit.
        assert_eq!(fs::metadata(&path).expect("metadata").len(), len);
        let rotated = fs::read_to_string(numbered(&path, 1)).expect("path.1");
        assert_eq!(rotated.lines().count(), 2);
    }

    #[test]
    fn an_agent_killed_between_renames_loses_no_line() {
        // Every point a rotation can stop at: after each of its renames.
        let keep = 4;
        let steps = keep as usize; // keep - 1 shifts, then path -> path.1
        for done in 0..=steps {
            let dir = TempDir::new("jsonlog-kill");
            let path = dir.0.join("translations.jsonl");
            let len = line_len(&event(EventKind::Create, 0));
            let target = target(&path, 2 * len, keep);
            // Fill path and path.1 ..= path.(keep-1): room left for one
            // more rotation without dropping anything.
            let mut log = JsonLog::open(&target).expect("open");
            let mut written = Vec::new();
            for n in 0..(2 * keep as u16) {
                written.push(event(EventKind::Create, n));
                log.write(&written[written.len() - 1]).expect("write");
            }
            log.flush().expect("flush");
            drop(log);
            assert_eq!(
                rotated_files(&path).expect("listing").len(),
                keep as usize - 1
            );

            let existing = rotated_files(&path).expect("listing");
            let renames = rotation_renames(&path, keep, &existing);
            assert_eq!(renames.len(), steps);
            for (from, to) in &renames[..done] {
                fs::rename(from, to).expect("rename");
            }
            let mut seen: Vec<_> = all_lines(&path);
            seen.sort_by_key(|e| e.outside.port());
            assert_eq!(seen, written, "killed after {done} renames");

            // The restarted agent writes on and rotates (twice) over it.
            let mut log = JsonLog::open(&target).expect("reopen");
            for n in 100..104 {
                written.push(event(EventKind::Create, n));
                log.write(&written[written.len() - 1]).expect("write");
            }
            log.flush().expect("flush");
            let kept = all_lines(&path);
            let rotated = rotated_files(&path).expect("listing");
            assert!(rotated.iter().all(|(n, _)| *n <= u64::from(keep)));
            // Exactly what an uninterrupted run keeps: only the oldest
            // file (lines 0 and 1) aged out, wherever the kill happened.
            let mut expect = written[2..].to_vec();
            expect.sort_by_key(|e| e.outside.port());
            let mut got = kept.clone();
            got.sort_by_key(|e| e.outside.port());
            assert_eq!(got, expect, "killed after {done} renames, then rotated");
        }
    }

    #[test]
    fn a_smaller_keep_drops_the_files_beyond_it() {
        let dir = TempDir::new("jsonlog-shrink");
        let path = dir.0.join("translations.jsonl");
        for n in 1..=5 {
            fs::write(numbered(&path, n), "old\n").expect("write");
        }
        fs::write(dir.0.join("translations.jsonl.bak"), "mine\n").expect("write");
        let line = line_len(&event(EventKind::Create, 0));
        let mut log = JsonLog::open(&target(&path, line, 2)).expect("open");
        log.write(&event(EventKind::Create, 1)).expect("write");
        log.write(&event(EventKind::Create, 2)).expect("write");
        log.flush().expect("flush");
        let indices: Vec<_> = rotated_files(&path)
            .expect("listing")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(indices, [1, 2]);
        assert!(dir.0.join("translations.jsonl.bak").exists());
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let dir = TempDir::new("jsonlog-error");
        let blocker = dir.0.join("not-a-dir");
        fs::write(&blocker, "").expect("write");
        let path = blocker.join("translations.jsonl");
        let err = JsonLog::open(&target(&path, 4096, 1))
            .err()
            .expect("a file is in the way");
        assert!(
            format!("{err:#}").contains(&blocker.display().to_string()),
            "{err:#}"
        );
    }
}
