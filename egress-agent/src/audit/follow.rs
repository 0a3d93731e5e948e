//! `flows --follow`: the running agent streams every translation event, as
//! JSON lines, to whoever connects to its socket (`/run/NAME/events.sock`,
//! root only: the records name tenant hosts and their destinations).
//!
//! Each follower has a queue of its own, so a slow terminal never holds up
//! the log or another follower; what its queue cannot take is counted and
//! told to it in a `{"lost":N}` line, never dropped silently.

use std::{
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::event::{EventKind, TranslationEvent};

/// Batches a follower may have waiting before it loses events.
const FOLLOWER_QUEUE: usize = 256;

/// The socket a running agent of `run_dir` listens on.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("events.sock")
}

type Batch = Arc<Vec<TranslationEvent>>;

struct Follower {
    queue: SyncSender<Batch>,
    lost: Arc<AtomicU64>,
}

/// Everyone following, shared with whoever publishes events.
#[derive(Default)]
pub struct Followers {
    list: Mutex<Vec<Follower>>,
    /// Events followers' queues could not take, all followers together.
    pub lost: AtomicU64,
}

impl Followers {
    pub fn count(&self) -> usize {
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Hands a batch to every follower; drops followers that went away.
    pub fn publish(&self, batch: &Batch) {
        let mut list = self
            .list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        list.retain(|follower| match follower.queue.try_send(batch.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                let lost = batch.len() as u64;
                follower.lost.fetch_add(lost, Ordering::Relaxed);
                self.lost.fetch_add(lost, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    fn add(&self, stream: UnixStream) -> anyhow::Result<()> {
        let (queue, batches) = sync_channel(FOLLOWER_QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let writer_lost = lost.clone();
        std::thread::Builder::new()
            .name("follower".into())
            .spawn(move || write_to(stream, &batches, &writer_lost))
            .context("starting a follower's writer")?;
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Follower { queue, lost });
        Ok(())
    }
}

/// Writes a follower's batches until it hangs up or the agent stops.
fn write_to(stream: UnixStream, batches: &Receiver<Batch>, lost: &AtomicU64) {
    let mut out = BufWriter::new(stream);
    let mut told = 0;
    while let Ok(batch) = batches.recv() {
        let now_lost = lost.load(Ordering::Relaxed);
        if now_lost != told {
            told = now_lost;
            if writeln!(out, "{{\"lost\":{now_lost}}}").is_err() {
                return;
            }
        }
        for event in batch.iter() {
            let Ok(line) = serde_json::to_string(event) else {
                continue;
            };
            if writeln!(out, "{line}").is_err() {
                return;
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
}

/// The listening socket and the thread accepting on it.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(run_dir: &Path, followers: Arc<Followers>) -> anyhow::Result<Self> {
        let path = socket_path(run_dir);
        // A socket left by a killed agent: the instance lock says it is ours.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("making the follow socket non-blocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("follow-accept".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let added = stream
                                .set_nonblocking(false)
                                .map_err(anyhow::Error::from)
                                .and_then(|()| followers.add(stream));
                            if let Err(err) = added {
                                tracing::warn!(error = %format!("{err:#}"), "accepting a follower");
                            }
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "accepting a follower");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .context("starting the follow socket")?;
        Ok(Self {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `flows --follow`: prints the running agent's events until it stops.
pub fn follow(run_dir: &Path, json: bool, tenant: Option<&str>) -> anyhow::Result<()> {
    let path = socket_path(run_dir);
    let stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "no agent of this instance is running ({} does not exist): there is nothing to follow",
            path.display()
        ),
        Err(err) => return Err(err).with_context(|| format!("connecting to {}", path.display())),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in BufReader::new(stream).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        let event: TranslationEvent = match serde_json::from_str(&line) {
            Ok(event) => event,
            Err(_) => {
                // `{"lost":N}`: said on stderr, so piped JSON stays records.
                eprintln!("egress-agent: events lost to this follower so far: {line}");
                continue;
            }
        };
        if tenant.is_some_and(|t| t != event.tenant) {
            continue;
        }
        let written = if json {
            writeln!(out, "{line}")
        } else {
            writeln!(out, "{}", render(&event))
        };
        if written.and_then(|()| out.flush()).is_err() {
            // The reader of our output went away (`| head`).
            return Ok(());
        }
    }
    eprintln!("egress-agent: the agent stopped; no more events");
    Ok(())
}

/// One event as a line for people.
pub fn render(event: &TranslationEvent) -> String {
    let destination = event
        .destination
        .map_or_else(|| "-".to_owned(), |d| d.to_string());
    let mut line = format!(
        "{} {:<6} {} {} {} -> {} -> {}",
        event.time,
        match event.event {
            EventKind::Create => "create",
            EventKind::End => "end",
        },
        event.tenant,
        event.protocol,
        event.inside,
        event.outside,
        destination
    );
    if let (Some(reason), Some(out), Some(back)) = (event.reason, event.outbound, event.inbound) {
        line.push_str(&format!(
            " {} since {} out {}p/{}B in {}p/{}B",
            reason.as_str(),
            event.start,
            out.packets,
            out.bytes,
            back.packets,
            back.bytes
        ));
    }
    line
}
