//! The pipeline: creation events from the ring and ends from the agent,
//! made into records and handed to the sinks (on a thread of their own, so
//! a slow disk or collector never holds up the sweeper or the ring) and to
//! live followers.
//!
//! Nothing is lost silently: an event the ring had no room for is counted
//! by the dataplane (`events_lost`), one the sinks' queue could not take by
//! `sink_lost`, a write a sink failed by its error count; all of them are in
//! `status` and `/metrics`.
//!
//! Per-tenant figures for the metrics are kept here too, whether or not a
//! log is configured: ends by reason and the traffic of ended flows.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData};
use egress_common::{
    config::{CONFIG_F_FLOW_EVENTS, DataplaneConfig},
    names,
};
use serde::Serialize;

use super::{
    event::{EndReason, Traffic, TranslationEvent},
    follow::{Followers, Server},
    ring::{self, RingReader, WallClock},
};
use crate::conntrack::EndedFlow;

/// How often the ring is drained: the dataplane does not wake the agent
/// per event (see egress-ebpf's `events`).
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// Events taken from the ring per batch.
const DRAIN_BATCH: usize = 8192;
/// Events the sinks may have waiting (about 50 MB) before new ones are
/// counted as lost rather than held.
const SINK_QUEUE_EVENTS: usize = 262_144;

/// Where events go.
pub trait Sink: Send {
    /// `log` or `ipfix`: the label of its errors.
    fn name(&self) -> &'static str;
    fn write(&mut self, events: &[TranslationEvent]) -> anyhow::Result<()>;
    /// Events this sink cannot express and left out since the last call
    /// (IPFIX: IPv6 flows), counted apart from its errors.
    fn take_skipped(&mut self) -> u64 {
        0
    }
}

/// What the pipeline counted, for `status` and `/metrics`.
#[derive(Debug, Default)]
pub struct AuditStats {
    pub created: AtomicU64,
    pub ended: AtomicU64,
    /// Events the sinks' queue had no room for.
    pub sink_lost: AtomicU64,
    /// Events the dataplane's ring had no room for (its `events_lost`
    /// counter, as last read).
    pub ring_lost: AtomicU64,
    pub log_errors: AtomicU64,
    pub ipfix_errors: AtomicU64,
    /// Events the IPFIX exporter cannot express (IPv6) and left out.
    pub ipfix_skipped: AtomicU64,
}

/// A snapshot of the counts, as `status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    pub sinks: Vec<String>,
    pub followers: usize,
    pub created: u64,
    pub ended: u64,
    #[serde(default)]
    pub ring_lost: u64,
    pub sink_lost: u64,
    pub follower_lost: u64,
    pub log_errors: u64,
    pub ipfix_errors: u64,
    /// IPv6 events the IPFIX exporter left out (no NAT66 session event
    /// exists to send them as).
    #[serde(default)]
    pub ipfix_skipped: u64,
}

/// Per tenant: what its ended flows add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantEnds {
    pub by_reason: [u64; EndReason::ALL.len()],
    pub outbound: Traffic,
    pub inbound: Traffic,
}

struct Shared {
    names: RwLock<HashMap<u16, String>>,
    record_destinations: bool,
    /// Taken away by `Audit::stop`, which ends the writer once its queue
    /// is written, whoever still holds a handle.
    sinks: Mutex<Option<SyncSender<Vec<TranslationEvent>>>>,
    sink_names: Vec<String>,
    queued: Arc<AtomicUsize>,
    followers: Arc<Followers>,
    stats: Arc<AuditStats>,
    tenant_ends: Mutex<BTreeMap<u16, TenantEnds>>,
}

/// What the sweeper and the configuration code report ends through.
#[derive(Clone)]
pub struct AuditHandle {
    shared: Arc<Shared>,
}

impl AuditHandle {
    /// The tenants' names, by id, as the maps have them now.
    pub fn set_tenants<'a>(&self, tenants: impl IntoIterator<Item = (u16, &'a str)>) {
        let mut names = self
            .shared
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (id, name) in tenants {
            names.insert(id, name.to_owned());
        }
    }

    fn name_of(&self, id: u16) -> String {
        self.shared
            .names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    }

    /// Whether anyone wants records now.
    pub fn wants_events(&self) -> bool {
        !self.shared.sink_names.is_empty() || self.shared.followers.count() > 0
    }

    /// Counts flows the agent ended and, if anyone listens, records them.
    pub fn ended(&self, flows: &[EndedFlow]) {
        if flows.is_empty() {
            return;
        }
        {
            let mut per_tenant = self
                .shared
                .tenant_ends
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ended in flows {
                let entry = per_tenant.entry(ended.flow.tenant()).or_default();
                let reason = EndReason::ALL
                    .iter()
                    .position(|r| *r == ended.reason)
                    .unwrap_or(0);
                entry.by_reason[reason] += 1;
                let (outbound, inbound) = ended.flow.traffic();
                add(&mut entry.outbound, outbound);
                add(&mut entry.inbound, inbound);
            }
        }
        self.shared
            .stats
            .ended
            .fetch_add(flows.len() as u64, Ordering::Relaxed);
        if !self.wants_events() {
            return;
        }
        let clock = WallClock::now();
        let events = flows
            .iter()
            .map(|flow| {
                let name = self.name_of(flow.flow.tenant());
                ring::ended(flow, &name, &clock, self.shared.record_destinations)
            })
            .collect();
        self.deliver(events);
    }

    /// Every tenant's ends so far.
    pub fn tenant_ends(&self) -> BTreeMap<u16, TenantEnds> {
        self.shared
            .tenant_ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn view(&self) -> AuditView {
        let stats = &self.shared.stats;
        AuditView {
            sinks: self.shared.sink_names.clone(),
            followers: self.shared.followers.count(),
            created: stats.created.load(Ordering::Relaxed),
            ended: stats.ended.load(Ordering::Relaxed),
            ring_lost: stats.ring_lost.load(Ordering::Relaxed),
            sink_lost: stats.sink_lost.load(Ordering::Relaxed),
            follower_lost: self.shared.followers.lost.load(Ordering::Relaxed),
            log_errors: stats.log_errors.load(Ordering::Relaxed),
            ipfix_errors: stats.ipfix_errors.load(Ordering::Relaxed),
            ipfix_skipped: stats.ipfix_skipped.load(Ordering::Relaxed),
        }
    }

    fn deliver(&self, events: Vec<TranslationEvent>) {
        if events.is_empty() {
            return;
        }
        let shared = &self.shared;
        if shared.followers.count() > 0 {
            shared.followers.publish(&Arc::new(events.clone()));
        }
        let sinks = shared
            .sinks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(sinks) = sinks.as_ref() else {
            return;
        };
        let count = events.len();
        if shared.queued.load(Ordering::Relaxed) + count > SINK_QUEUE_EVENTS {
            shared
                .stats
                .sink_lost
                .fetch_add(count as u64, Ordering::Relaxed);
            return;
        }
        shared.queued.fetch_add(count, Ordering::Relaxed);
        match sinks.try_send(events) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                shared.queued.fetch_sub(count, Ordering::Relaxed);
                shared
                    .stats
                    .sink_lost
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
        }
    }
}

fn add(total: &mut Traffic, more: Traffic) {
    total.packets += more.packets;
    total.bytes += more.bytes;
}

/// The running pipeline: the ring's reader, the sinks' writer, the follow
/// socket.
pub struct Audit {
    handle: AuditHandle,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    _server: Server,
}

impl Audit {
    /// Starts reading the ring of the dataplane pinned in `pin_dir` and
    /// serving followers in `run_dir`.
    pub fn start(
        pin_dir: &Path,
        run_dir: &Path,
        record_destinations: bool,
        sinks: Vec<Box<dyn Sink>>,
    ) -> anyhow::Result<Self> {
        let stats = Arc::new(AuditStats::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let sink_names = sinks.iter().map(|s| s.name().to_owned()).collect();
        let (sender, writer) = if sinks.is_empty() {
            (None, None)
        } else {
            let (sender, batches) = sync_channel(4096);
            let writer = spawn_writer(sinks, batches, queued.clone(), stats.clone())?;
            (Some(sender), Some(writer))
        };
        let followers = Arc::new(Followers::default());
        let server = Server::start(run_dir, followers.clone())?;
        let handle = AuditHandle {
            shared: Arc::new(Shared {
                names: RwLock::new(HashMap::new()),
                record_destinations,
                sinks: Mutex::new(sender),
                sink_names,
                queued,
                followers,
                stats,
                tenant_ends: Mutex::new(BTreeMap::new()),
            }),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let reader = spawn_reader(pin_dir, handle.clone(), stop.clone())?;
        Ok(Self {
            handle,
            stop,
            reader: Some(reader),
            writer,
            _server: server,
        })
    }

    pub fn handle(&self) -> AuditHandle {
        self.handle.clone()
    }

    /// Drains the ring a last time, lets the sinks write what they hold
    /// (for at most `grace`) and stops. The dataplane keeps reporting if it
    /// stays serving: the next agent reads what the ring holds by then.
    pub fn stop(mut self, grace: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let writer = self.writer.take();
        // Without its sender the writer ends once its queue is written.
        self.handle
            .shared
            .sinks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let deadline = Instant::now() + grace;
            while !writer.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                tracing::warn!("the translation log's sinks did not finish writing in time");
            }
        }
    }
}

fn spawn_writer(
    mut sinks: Vec<Box<dyn Sink>>,
    batches: Receiver<Vec<TranslationEvent>>,
    queued: Arc<AtomicUsize>,
    stats: Arc<AuditStats>,
) -> anyhow::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("audit-sinks".into())
        .spawn(move || {
            let mut warned: HashMap<&'static str, Instant> = HashMap::new();
            while let Ok(batch) = batches.recv() {
                for sink in &mut sinks {
                    let result = sink.write(&batch);
                    stats
                        .ipfix_skipped
                        .fetch_add(sink.take_skipped(), Ordering::Relaxed);
                    if let Err(err) = result {
                        let name = sink.name();
                        let counter = if name == "ipfix" {
                            &stats.ipfix_errors
                        } else {
                            &stats.log_errors
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        // One warning a minute per sink: a full disk must
                        // not also fill the journal.
                        let due = warned
                            .get(name)
                            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
                        if due {
                            warned.insert(name, Instant::now());
                            tracing::warn!(sink = name, error = %format!("{err:#}"), "writing translation events");
                        }
                    }
                }
                queued.fetch_sub(batch.len(), Ordering::Relaxed);
            }
        })
        .context("starting the translation log's writer")
}

/// The DP_CONFIG flag that makes the programs report, set while anyone
/// wants records.
struct FlowEventsFlag {
    config: Array<MapData, DataplaneConfig>,
    on: Option<bool>,
}

impl FlowEventsFlag {
    fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join(names::CONFIG);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        Ok(Self {
            config: Array::try_from(Map::from_map_data(data)?)?,
            on: None,
        })
    }

    fn set(&mut self, on: bool) -> anyhow::Result<()> {
        if self.on == Some(on) {
            return Ok(());
        }
        let mut config = self.config.get(&0, 0).context("reading DP_CONFIG")?;
        if on {
            config.flags |= CONFIG_F_FLOW_EVENTS;
        } else {
            config.flags &= !CONFIG_F_FLOW_EVENTS;
        }
        self.config.set(0, config, 0).context("writing DP_CONFIG")?;
        self.on = Some(on);
        Ok(())
    }
}

fn spawn_reader(
    pin_dir: &Path,
    handle: AuditHandle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut ring = RingReader::open(pin_dir)?;
    let mut flag = FlowEventsFlag::open(pin_dir)?;
    let counters = crate::dataplane::maps::Maps::open(pin_dir)?;
    std::thread::Builder::new()
        .name("audit-ring".into())
        .spawn(move || {
            let mut raw = Vec::with_capacity(DRAIN_BATCH);
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                let wanted = handle.wants_events();
                if let Err(err) = flag.set(wanted) {
                    tracing::warn!(error = %format!("{err:#}"), "switching flow events");
                }
                loop {
                    raw.clear();
                    ring.drain(DRAIN_BATCH, &mut raw);
                    if raw.is_empty() {
                        break;
                    }
                    handle
                        .shared
                        .stats
                        .created
                        .fetch_add(raw.len() as u64, Ordering::Relaxed);
                    if handle.wants_events() {
                        let clock = WallClock::now();
                        let destinations = handle.shared.record_destinations;
                        let events = raw
                            .iter()
                            .map(|event| {
                                ring::created(
                                    event,
                                    &handle.name_of(event.tenant()),
                                    &clock,
                                    destinations,
                                )
                            })
                            .collect();
                        handle.deliver(events);
                    }
                }
                if let Ok(counts) = counters.counters()
                    && let Some((_, lost)) = counts
                        .into_iter()
                        .find(|(c, _)| *c == egress_common::counters::Counter::EventsLost)
                {
                    handle.shared.stats.ring_lost.store(lost, Ordering::Relaxed);
                }
                if stopping {
                    break;
                }
                std::thread::sleep(DRAIN_INTERVAL);
            }
        })
        .context("starting the ring reader")
}
