//! `egress-agent run`: validate, apply, serve, and undo on the way out.
//!
//! The whole configuration is validated against the machine before anything
//! changes. Then the steps run in the order that never exposes a half state:
//! maps first (programs see complete tenants), programs next, egress
//! addresses last (no reply can arrive before the dataplane is ready).
//! Whatever a later step fails on, the earlier ones are undone.
//!
//! SIGTERM and SIGINT are listened for from the first moment and honoured
//! within a fraction of a second whatever the agent is doing: validation
//! (which changes nothing) is dropped, a start or a reload stops between
//! two steps (or two batches of address updates) and everything the agent
//! added is removed as on any stop. A SIGHUP during a start is applied
//! once it serves.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    addresses, applied,
    audit::{self, Audit, AuditHandle},
    bfd::Bfd,
    config::{Config, ConfigError, LinkRef, Resolved, Timeouts},
    conntrack::{self, EndedFlow},
    dataplane::{
        Dataplane,
        maps::{DesiredState, Maps},
    },
    health::Health,
    instance::{Instance, RunState, TenantRecord},
    kubernetes::sync::{KubeOptions, KubeSource},
    live, macvlans,
    metrics::{self, Exporter},
    routes,
    stop::{Stop, is_interrupted},
    sysctl,
    system::SystemView,
};

/// Why `run` (or `check`) stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration was refused; nothing was changed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl RunError {
    /// 2 for a refused configuration, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) => 2,
            RunError::Failed(_) => 1,
        }
    }
}

/// Reads, checks and resolves a configuration file without changing
/// anything, as `instance` would take it (macvlans its agent created are
/// its to recreate).
pub async fn validate(
    instance: &Instance,
    config_path: &Path,
) -> Result<(Resolved, SystemView, rtnetlink::Handle), RunError> {
    let previous = instance.read_state().ok().flatten();
    let owned = Owned::from_state(previous.as_ref());
    validate_config(Config::load(config_path)?, config_path, &owned).await
}

/// What this instance made (or its predecessor did, as its state file
/// says): macvlans it may recreate, and egress addresses that are its own
/// rather than the gateway's.
#[derive(Debug, Clone, Default)]
struct Owned {
    links: BTreeSet<u32>,
    external_ifindex: u32,
    addresses: Vec<IpAddr>,
}

impl Owned {
    fn from_state(state: Option<&RunState>) -> Self {
        Self {
            links: owned_links(state.iter().flat_map(|p| &p.macvlans)),
            external_ifindex: state.map_or(0, |p| p.external_ifindex),
            addresses: state.map(|p| p.added_addresses.clone()).unwrap_or_default(),
        }
    }

    fn of(applied: &Applied) -> Self {
        Self {
            links: owned_links(&applied.macvlans),
            external_ifindex: applied.external.index,
            addresses: applied.addresses.clone(),
        }
    }
}

/// The ifindexes of macvlans an agent created.
fn owned_links<'a>(created: impl IntoIterator<Item = &'a macvlans::Created>) -> BTreeSet<u32> {
    created.into_iter().map(|m| m.ifindex).collect()
}

/// The file's configuration, with what the cluster adds in Kubernetes mode.
fn effective_config(config_path: &Path, kube: Option<&KubeSource>) -> Result<Config, RunError> {
    let mut config = Config::load(config_path)?;
    if let Some(kube) = kube {
        kube.merge_into(&mut config);
    }
    Ok(config)
}

/// Checks a configuration against the machine. The checks of a large file
/// run off the runtime's threads, so a signal is not kept waiting.
async fn validate_config(
    config: Config,
    config_path: &Path,
    owned: &Owned,
) -> Result<(Resolved, SystemView, rtnetlink::Handle), RunError> {
    let planned = tokio::task::spawn_blocking(move || config.plan())
        .await
        .context("validating")?;
    let plan = planned.map_err(|problems| ConfigError::Invalid {
        path: config_path.to_owned(),
        problems,
    })?;
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);
    let mut system = SystemView::read(&handle).await?;
    system.claim(owned.external_ifindex, &owned.addresses);
    let links = owned.links.clone();
    let (resolved, system) = tokio::task::spawn_blocking(move || {
        let resolved = plan.resolve_owning(&system, &links);
        (resolved, system)
    })
    .await
    .context("validating")?;
    let resolved = resolved.map_err(|problems| ConfigError::Invalid {
        path: config_path.to_owned(),
        problems,
    })?;
    Ok((resolved, system, handle))
}

/// What has been applied so far, so it can be undone in reverse.
struct Applied {
    handle: rtnetlink::Handle,
    dataplane: Option<Dataplane>,
    pins_existed: bool,
    external: LinkRef,
    /// Egress addresses this agent added (or adopted from a predecessor).
    addresses: Vec<IpAddr>,
    sysctls: Vec<sysctl::Changed>,
    /// Macvlan next hops this agent (or its predecessor) created.
    macvlans: Vec<macvlans::Created>,
    /// What a predecessor that left its dataplane serving had added: ours
    /// to remove on the way out, but not if this agent fails to take over.
    inherited_addresses: Vec<IpAddr>,
    inherited_sysctls: usize,
    /// Ifindexes of the predecessor's macvlans.
    inherited_macvlans: BTreeSet<u32>,
}

impl Applied {
    async fn undo(self, instance: &Instance) {
        if let Err(err) = routes::remove_all(&self.handle).await {
            tracing::warn!(error = %format!("{err:#}"), "removing return routes");
        }
        addresses::remove(&self.handle, &self.external, &self.addresses).await;
        // Before the sysctls: their parent stays isolated while they exist.
        macvlans::remove(&self.handle, &self.macvlans).await;
        sysctl::restore(&self.sysctls);
        match self.dataplane {
            Some(dataplane) => {
                if let Err(err) = dataplane.shutdown() {
                    tracing::warn!(error = %format!("{err:#}"), "removing pins");
                }
            }
            // Load failed: remove pins only if this attempt created them.
            None if !self.pins_existed => {
                let _ = crate::dataplane::remove_pins(&instance.pin_dir);
            }
            None => {}
        }
        instance.remove_state();
    }

    /// A start that failed: undoes what this attempt did, except that a
    /// dataplane it found serving (pinned by a predecessor) goes on serving
    /// with the predecessor's addresses, forwarding and return routes, so a
    /// bad restart costs no traffic.
    async fn abandon(mut self, instance: &Instance) {
        if !self.pins_existed {
            return self.undo(instance).await;
        }
        tracing::warn!(
            pins = %instance.pin_dir.display(),
            "leaving the dataplane found at startup serving as it was"
        );
        let inherited: HashSet<IpAddr> = self.inherited_addresses.iter().copied().collect();
        let own: Vec<IpAddr> = self
            .addresses
            .iter()
            .copied()
            .filter(|addr| !inherited.contains(addr))
            .collect();
        addresses::remove(&self.handle, &self.external, &own).await;
        let own: Vec<macvlans::Created> = self
            .macvlans
            .iter()
            .filter(|m| !self.inherited_macvlans.contains(&m.ifindex))
            .cloned()
            .collect();
        macvlans::remove(&self.handle, &own).await;
        sysctl::restore(
            &self
                .sysctls
                .split_off(self.inherited_sysctls.min(self.sysctls.len())),
        );
        // Our descriptors close; the pinned links and maps stay.
        drop(self.dataplane.take());
        live::publish_stopped(
            instance,
            "a new agent failed to start; the dataplane it found serves on unattended",
        );
    }
}

/// How `run` serves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Leave the dataplane serving on exit, for the next agent to adopt.
    pub keep_dataplane: bool,
    /// Where to serve /healthz, /readyz and /metrics.
    pub listen: Option<std::net::SocketAddr>,
    /// Take tenants from Kubernetes too.
    pub kubernetes: Option<KubeOptions>,
}

pub async fn run(instance: &Instance, options: &RunOptions) -> Result<(), RunError> {
    // From the first moment: a signal that arrives before its handler is
    // installed would end the process with everything half done.
    let (mut signals, stop) = Signals::install()?;
    let config_path = options.config.as_path();
    let _lock = instance.lock()?;
    // A predecessor's state says which macvlans are ours to recreate, and
    // which addresses ours to keep.
    let previous = instance.read_state().ok().flatten();
    let started_digest = applied::digest_of(config_path);
    let Some(prepared) = until_stopped(&stop, async {
        let mut kube = match &options.kubernetes {
            Some(kube_options) => {
                tracing::info!(node = %kube_options.node_name, "reading the cluster");
                Some(KubeSource::start(kube_options).await?)
            }
            None => None,
        };
        let owned = Owned::from_state(previous.as_ref());
        let validated = match effective_config(config_path, kube.as_ref()) {
            Ok(config) => validate_config(config, config_path, &owned).await,
            Err(err) => Err(err),
        };
        match validated {
            Ok(valid) => Ok((valid, kube)),
            Err(err) => {
                if let Some(kube) = &mut kube {
                    kube.refuse(Some(err.to_string()));
                    kube.publish(&BTreeMap::new()).await;
                }
                Err(err)
            }
        }
    })
    .await
    else {
        tracing::info!("stopped before changing anything");
        leave_nothing(instance, previous.as_ref());
        return Ok(());
    };
    let ((resolved, system, handle), mut kube) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            // A refused file leaves nothing behind, not even the lock,
            // unless a predecessor's state is there to keep.
            leave_nothing(instance, previous.as_ref());
            return Err(err);
        }
    };
    // Once the file is valid, before anything looks at the pins: `ip netns
    // exec` and some pods have no bpffs at /sys/fs/bpf.
    let own_bpffs = crate::bpffs::ensure_mounted()?;
    // Pins in a bpffs this agent mounted go with its mount namespace, and
    // the programs with them: what it leaves (addresses, forwarding)
    // would then serve untranslated.
    let keep_dataplane = options.keep_dataplane && !own_bpffs;
    if options.keep_dataplane && own_bpffs {
        tracing::warn!(
            "--keep-dataplane cannot keep this dataplane: its pins are in the bpffs this agent \
             mounted, which goes with this mount namespace; a stop removes everything"
        );
    }
    if let Some(previous) = &previous {
        tracing::warn!(
            pid = previous.pid,
            "the previous agent of this instance left its dataplane serving; adopting it"
        );
    }
    let mut applied = Applied {
        handle: handle.clone(),
        dataplane: None,
        pins_existed: instance.pin_dir.exists(),
        external: resolved.external.clone(),
        addresses: Vec::new(),
        sysctls: Vec::new(),
        macvlans: Vec::new(),
        inherited_addresses: Vec::new(),
        inherited_sysctls: 0,
        inherited_macvlans: BTreeSet::new(),
    };
    // So are the macvlans it created that are still there.
    if let Some(previous) = &previous {
        applied.macvlans.extend(
            previous
                .macvlans
                .iter()
                .filter(|m| m.exists(&system))
                .cloned(),
        );
        applied.inherited_macvlans = owned_links(&applied.macvlans);
    }
    if let Some(previous) = &previous
        && previous.external_ifindex == resolved.external.index
    {
        applied.sysctls.extend(previous.sysctls.iter().cloned());
        applied.inherited_sysctls = applied.sysctls.len();
    }
    // Addresses a predecessor added are still ours to remove: those its
    // state lists, and those the kernel knows by their mark (one killed
    // before it wrote its state).
    applied.addresses = system.owned_on(resolved.external.index);
    applied.inherited_addresses.clone_from(&applied.addresses);

    let (health_tx, health_rx) = watch::channel(Health::Starting);
    let started = async {
        let state = apply(
            instance,
            config_path,
            &resolved,
            &system,
            &mut applied,
            previous.as_ref(),
            &stop,
        )
        .await?;
        let exporter = Exporter::new(health_rx.clone(), Maps::open(&instance.pin_dir)?);
        if let Some(address) = options.listen {
            metrics::serve(address, exporter.clone()).await?;
        }
        // Last: nothing after it can fail and leave its threads running.
        let audit = Audit::start(
            &instance.pin_dir,
            &instance.run_dir,
            resolved.audit.record_destinations,
            audit::open_sinks(&resolved.audit)?,
        )?;
        anyhow::Ok((state, exporter, audit))
    };
    let ((mut state, predecessors_ended), exporter, audit) = match started.await {
        Ok(started) => started,
        Err(err) if is_interrupted(&err) => {
            if keep_dataplane {
                tracing::info!("stopped while starting: undoing what this start added");
                applied.abandon(instance).await;
            } else {
                tracing::info!("stopped while starting: removing everything");
                applied.undo(instance).await;
            }
            return Ok(());
        }
        Err(err) => {
            applied.abandon(instance).await;
            return Err(err.into());
        }
    };
    tracing::info!(
        tenants = state.tenants.len(),
        egress = resolved.egress_addresses().count(),
        pins = %instance.pin_dir.display(),
        "serving"
    );
    warn_if_overcommitted(&resolved);
    applied::record(instance, started_digest, None);
    metrics::export_attachments(&exporter, state.attachments.clone());
    let audit_handle = audit.handle();
    audit_handle.set_tenants(state.tenants.iter().map(|t| (t.id, t.name.as_str())));
    audit_handle.ended(&predecessors_ended);
    audit::export(&exporter, &audit_handle);
    *exporter
        .audit
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(audit_handle.clone());

    let sweeper = Sweeper::start(
        &instance.pin_dir,
        resolved.sweep_interval,
        resolved.timeouts,
        exporter.clone(),
        audit_handle.clone(),
    )?;
    let monitor = tokio::spawn(monitor_health(
        handle.clone(),
        state.attachments.clone(),
        instance.pin_dir.clone(),
        health_tx.clone(),
    ));
    let bfd_health = live::follow_health(health_rx.clone());
    let published = live::Published::default();
    published.export(&exporter);
    crate::redirects::export(
        &exporter,
        &instance.pin_dir,
        applied
            .dataplane
            .as_ref()
            .is_some_and(Dataplane::redirect_errors_watched),
    );
    let mut bfd = start_bfd(&resolved, &bfd_health).await;
    let mut current = resolved;
    let result = async {
        let mut stopping = stop.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        if let Some(kube) = &mut kube {
            kube.publish(&flows_by_tenant(&instance.pin_dir)).await;
        }
        loop {
            tokio::select! {
                biased;
                () = stopping.requested_now() => break,
                Some(()) = signals.reloads.recv() => {
                    // SIGHUPs that came meanwhile (during a start or a
                    // long reload) are answered by this one reading.
                    while signals.reloads.try_recv().is_ok() {}
                }
                changed = cluster_changed(kube.as_mut()) => {
                    if let Err(err) = changed {
                        anyhow::bail!("the Kubernetes watchers stopped: {err:#}");
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    let view = live::Live {
                        pid: std::process::id(),
                        health: health_rx.borrow().clone(),
                        bfd: bfd.as_ref().map(Bfd::snapshot).unwrap_or_default(),
                        kubernetes: kube.as_ref().map(KubeSource::view),
                        audit: Some(audit_handle.view()),
                    };
                    if let Err(err) = published.publish(instance, view) {
                        tracing::warn!(error = %format!("{err:#}"), "publishing status");
                    }
                    if let Some(kube) = kube.as_mut().filter(|_| ticks.is_multiple_of(10)) {
                        kube.publish(&flows_by_tenant(&instance.pin_dir)).await;
                    }
                    continue;
                }
            }
            // Read the file (and the cluster) again; only what can change
            // live is applied. Reading and checking change nothing, so a
            // stop simply drops them.
            let reading = applied::digest_of(config_path);
            let Some(outcome) = until_stopped(
                &stop,
                reload(config_path, kube.as_ref(), &current, &Owned::of(&applied)),
            )
            .await
            else {
                tracing::info!("reload abandoned before it changed anything: stopping");
                break;
            };
            if let Some(kube) = &mut kube {
                kube.refuse(outcome.as_ref().err().map(ToString::to_string));
            }
            match outcome {
                Ok(Some(next)) => {
                    match reconcile(instance, &next, &mut applied, &state, &stop, &audit_handle)
                        .await
                    {
                        Ok(next_state) => {
                            audit_handle.set_tenants(
                                next_state.tenants.iter().map(|t| (t.id, t.name.as_str())),
                            );
                            tracing::info!(
                                tenants = next_state.tenants.len(),
                                "configuration reloaded"
                            );
                            if next.bfd_peers != current.bfd_peers {
                                if let Some(old) = bfd.take() {
                                    old.shutdown().await;
                                }
                                bfd = start_bfd(&next, &bfd_health).await;
                            }
                            state = next_state;
                            current = next;
                            applied::record(instance, reading, None);
                        }
                        Err(err) if is_interrupted(&err) => {
                            tracing::info!("reload abandoned halfway: stopping");
                            // What the next agent adopts if this one keeps the
                            // dataplane: the addresses added so far included.
                            record(instance, &applied, state.clone());
                            break;
                        }
                        Err(err) => {
                            tracing::error!(
                                error = %format!("{err:#}"),
                                "applying the reloaded configuration"
                            );
                            applied::record(instance, reading, Some(format!("{err:#}")));
                        }
                    }
                }
                Ok(None) => {
                    tracing::info!("configuration unchanged");
                    applied::record(instance, reading, None);
                }
                Err(err) => {
                    tracing::error!(
                        error = %err,
                        "reload refused; still serving the previous configuration"
                    );
                    applied::record(instance, reading, Some(err.to_string()));
                }
            }
            if let Some(kube) = &mut kube {
                kube.publish(&flows_by_tenant(&instance.pin_dir)).await;
            }
        }
        anyhow::Ok(())
    }
    .await;
    monitor.abort();
    let _ = health_tx.send(Health::ShuttingDown);
    let stopping = live::Live {
        pid: std::process::id(),
        health: Health::ShuttingDown,
        bfd: Vec::new(),
        kubernetes: None,
        audit: Some(audit_handle.view()),
    };
    if let Err(err) = published.publish(instance, stopping) {
        tracing::warn!(error = %format!("{err:#}"), "publishing status");
    }
    sweeper.stop();
    if !keep_dataplane {
        // The flows go with the maps: the log's last word on each.
        match Maps::open(&instance.pin_dir) {
            Ok(maps) => audit_handle.ended(&conntrack::all_flows_ending(&maps)),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "reading the flows ending with the agent")
            }
        }
    }
    drop(audit_handle);
    audit.stop(AUDIT_GRACE);
    if let Some(bfd) = bfd {
        if keep_dataplane {
            // The dataplane goes on serving: say nothing, so a restart
            // within the peers' detection time is not taken for a failure.
            bfd.abort();
        } else {
            // Routers withdraw this gateway before it stops translating.
            bfd.shutdown().await;
        }
    }
    if keep_dataplane {
        tracing::info!(
            "exiting with the dataplane left serving for the next agent \
             (`egress-agent cleanup` removes it)"
        );
        // Our descriptors close; the pinned links and maps stay.
        drop(applied.dataplane.take());
        live::publish_stopped(
            instance,
            "the agent stopped with --keep-dataplane; the dataplane serves on unattended \
             until the next agent adopts it (`egress-agent cleanup` removes it)",
        );
    } else {
        tracing::info!("shutting down: detaching programs and removing what this agent added");
        applied.undo(instance).await;
    }
    result.map_err(Into::into)
}

/// Runs `work` unless a stop comes first (`None`); for work that changes
/// nothing, which a stop can simply drop.
async fn until_stopped<T>(stop: &Stop, work: impl Future<Output = T>) -> Option<T> {
    let mut stop = stop.clone();
    tokio::select! {
        biased;
        () = stop.requested_now() => None,
        done = work => Some(done),
    }
}

/// What a start that changed nothing leaves: nothing, not even the lock,
/// unless a predecessor's state is there to keep.
fn leave_nothing(instance: &Instance, previous: Option<&RunState>) {
    if previous.is_none() && !instance.pin_dir.exists() {
        instance.remove_state();
    }
}

/// Writes what `applied` holds into the state file, so the next agent (or
/// `cleanup`) knows every address, sysctl and macvlan this one added.
fn record(instance: &Instance, applied: &Applied, mut state: RunState) {
    state.added_addresses.clone_from(&applied.addresses);
    state.sysctls.clone_from(&applied.sysctls);
    state.macvlans.clone_from(&applied.macvlans);
    if let Err(err) = instance.write_state(&state) {
        tracing::warn!(error = %format!("{err:#}"), "writing the state file");
    }
}

/// Waits for the cluster to change what this gateway serves; never
/// returns outside Kubernetes mode.
async fn cluster_changed(kube: Option<&mut KubeSource>) -> anyhow::Result<()> {
    match kube {
        Some(kube) => kube.changed().await,
        None => std::future::pending().await,
    }
}

/// Quotas beyond the table are the operator's choice, but it gives up the
/// guarantee that one tenant cannot keep another from new flows: say so.
fn warn_if_overcommitted(resolved: &Resolved) {
    let over = resolved.overcommitted_flows();
    if over > 0 {
        tracing::warn!(
            beyond_table = over,
            table = resolved.max_flows,
            "the tenants' maxFlows add up to more than conntrack.maxFlows: together they can \
             fill the table, and then every tenant's new flows are refused until flows end"
        );
    }
}

/// Flows per tenant name, for the objects' status.
fn flows_by_tenant(pin_dir: &Path) -> BTreeMap<String, u64> {
    let Ok(maps) = Maps::open(pin_dir) else {
        return BTreeMap::new();
    };
    let names: BTreeMap<u16, String> = maps
        .tenant_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|(name, id)| (id, name))
        .collect();
    let (flows, _) = conntrack::pair(maps.flows());
    let mut counts = BTreeMap::new();
    for flow in flows {
        if let Some(name) = names.get(&flow.tenant()) {
            *counts.entry(name.clone()).or_insert(0) += 1;
        }
    }
    counts
}

/// Starts BFD with the configured peers. A failure (the control port taken
/// by another daemon, say) is logged, not fatal: the dataplane serves
/// without it, and readiness says so through the missing sessions.
async fn start_bfd(
    resolved: &Resolved,
    health: &watch::Receiver<crate::bfd::Health>,
) -> Option<Bfd> {
    if resolved.bfd_peers.is_empty() {
        return None;
    }
    match Bfd::start(live::peer_configs(resolved), health.clone()).await {
        Ok(bfd) => {
            tracing::info!(peers = resolved.bfd_peers.len(), "BFD started");
            Some(bfd)
        }
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "BFD could not start");
            None
        }
    }
}

/// Reads the configuration again. `None` when nothing changed; an error
/// when it is invalid or changes what only a restart can (interfaces, the
/// conntrack size, the XDP mode).
async fn reload(
    config_path: &Path,
    kube: Option<&KubeSource>,
    current: &Resolved,
    owned: &Owned,
) -> Result<Option<Resolved>, RunError> {
    let (next, _, _) =
        validate_config(effective_config(config_path, kube)?, config_path, owned).await?;
    if next == *current {
        return Ok(None);
    }
    if next.internal != current.internal
        || next.external != current.external
        || next.max_flows != current.max_flows
        || next.xdp_mode != current.xdp_mode
        || next.hooks != current.hooks
        || next.audit != current.audit
    {
        return Err(anyhow::anyhow!(
            "interfaces, their hooks, conntrack.maxFlows, xdp.mode and audit only change with \
             a restart"
        )
        .into());
    }
    Ok(Some(next))
}

/// How often the dataplane's health is checked: one netlink query per XDP
/// attachment and one map read, cheap enough to bound BFD's reaction.
const HEALTH_INTERVAL: Duration = Duration::from_millis(250);

/// Follows the dataplane's health; logs every change.
async fn monitor_health(
    handle: rtnetlink::Handle,
    attachments: Vec<crate::dataplane::Attachment>,
    pin_dir: PathBuf,
    health: watch::Sender<Health>,
) {
    let mut maps = None;
    let mut redirects = crate::redirects::Watch::new(&pin_dir);
    loop {
        if maps.is_none() {
            maps = Maps::open(&pin_dir).ok();
        }
        let verdict = match &maps {
            Some(maps) => {
                crate::health::check_with_redirects(&handle, &attachments, maps, &mut redirects)
                    .await
            }
            None => Health::NotServing("the pinned maps are gone".to_owned()),
        };
        health.send_if_modified(|current| {
            if *current == verdict {
                return false;
            }
            match (&verdict, &*current) {
                // The same cause with new numbers (frames lost so far):
                // published, but not logged four times a second.
                (Health::NotServing(reason), Health::NotServing(before))
                    if same_but_numbers(reason, before) => {}
                (Health::NotServing(reason), _) => {
                    tracing::error!(%reason, "the dataplane stopped serving")
                }
                _ => tracing::info!(health = ?verdict, "dataplane health"),
            }
            *current = verdict;
            true
        });
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

fn same_but_numbers(a: &str, b: &str) -> bool {
    let words = |s: &str| {
        s.chars()
            .filter(|c| !c.is_ascii_digit())
            .collect::<String>()
    };
    words(a) == words(b)
}

/// Loads, attaches and applies the first configuration.
async fn apply(
    instance: &Instance,
    config_path: &Path,
    resolved: &Resolved,
    system: &SystemView,
    applied: &mut Applied,
    previous: Option<&RunState>,
    stop: &Stop,
) -> anyhow::Result<(RunState, Vec<EndedFlow>)> {
    let dataplane = applied.dataplane.insert(Dataplane::load(
        &instance.pin_dir,
        resolved.max_flows,
        resolved.audit.ring_bytes,
    )?);
    let mut maps = Maps::open(dataplane.pin_dir())?;
    let desired = DesiredState::build(resolved, &maps.tenant_ids()?, &maps.port_ids())?;
    stop.check()?;
    maps.sync(&desired)?;
    // Pinned maps of an agent that died may count flows it removed but
    // never recorded as ended; quotas start from what the table holds.
    conntrack::reconcile_usage(&mut maps)?;
    stop.check()?;
    dataplane.attach(resolved)?;
    stop.check()?;
    let mut attachments = dataplane.attachments().to_vec();
    // An adopted link keeps the hook it was attached with.
    for attachment in attachments.iter_mut().filter(|a| a.adopted) {
        if let Some(before) = previous
            .into_iter()
            .flat_map(|p| &p.attachments)
            .find(|b| b.program == attachment.program && b.ifindex == attachment.ifindex)
        {
            attachment.hook.clone_from(&before.hook);
        }
    }

    let interfaces = resolved
        .internal
        .iter()
        .chain([&resolved.external])
        .map(|link| link.name.as_str());
    applied
        .sysctls
        .extend(sysctl::enable_forwarding(interfaces)?);
    let forwards_ipv6 = resolved.tenants.iter().any(|t| !t.egress_v6.is_empty())
        || resolved.routed_sources.iter().any(|n| n.addr().is_ipv6());
    if forwards_ipv6 {
        applied.sysctls.extend(sysctl::enable_ipv6_forwarding()?);
    }
    // With the programs attached and the maps filled, so a created next
    // hop's first frame is classified.
    sync_macvlans(applied, resolved, system).await?;
    stop.check()?;
    // Flows a predecessor translated for a configuration that changed since.
    let ended = end_disallowed_flows(&mut maps, resolved, &desired)?;
    routes::sync(&applied.handle, &resolved.return_routes).await?;
    stop.check()?;

    let state = RunState {
        pid: std::process::id(),
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        config: absolute(config_path),
        attachments,
        tenants: Vec::new(),
        external_ifindex: resolved.external.index,
        added_addresses: Vec::new(),
        sysctls: Vec::new(),
        macvlans: Vec::new(),
    };
    let state = sync_addresses_and_state(
        instance,
        resolved,
        system,
        applied,
        &desired.ids,
        state,
        stop,
    )
    .await?;
    Ok((state, ended))
}

/// Applies a changed configuration to a serving dataplane: new tenants and
/// addresses first, then what went away; flows of unchanged tenants are
/// not touched.
async fn reconcile(
    instance: &Instance,
    resolved: &Resolved,
    applied: &mut Applied,
    state: &RunState,
    stop: &Stop,
    audit: &AuditHandle,
) -> anyhow::Result<RunState> {
    let system = SystemView::read(&applied.handle).await?;
    let mut maps = Maps::open(&instance.pin_dir)?;
    let desired = DesiredState::build(resolved, &maps.tenant_ids()?, &maps.port_ids())?;
    stop.check()?;
    maps.sync(&desired)?;
    stop.check()?;
    let ended = end_disallowed_flows(&mut maps, resolved, &desired)?;
    routes::sync(&applied.handle, &resolved.return_routes).await?;
    stop.check()?;
    // After the maps: a new next hop's port is known before it answers
    // ARP, and one that went no longer has a port. New ingress ports get
    // ARP isolation; ones that went keep the setting until exit.
    sync_macvlans(applied, resolved, &system).await?;
    stop.check()?;
    if !ended.is_empty() {
        tracing::info!(
            flows = ended.len(),
            "ended flows the new configuration no longer allows"
        );
    }
    audit.ended(&ended);
    sync_addresses_and_state(
        instance,
        resolved,
        &system,
        applied,
        &desired.ids,
        state.clone(),
        stop,
    )
    .await
}

/// Makes the macvlans this agent created what `resolved` asks, and
/// isolates ARP on every ingress interface. Ones no longer wanted, or
/// wanted otherwise (parent, address, MAC), go first, so an address can
/// move between them; missing ones are created down, isolated, and only
/// then brought up with their address, so none answers ARP unisolated.
async fn sync_macvlans(
    applied: &mut Applied,
    resolved: &Resolved,
    system: &SystemView,
) -> anyhow::Result<()> {
    // Ours that someone removed meanwhile are forgotten.
    applied.macvlans.retain(|m| m.exists(system));
    let (kept, stale): (Vec<_>, Vec<_>) = applied
        .macvlans
        .drain(..)
        .partition(|m| resolved.macvlans.iter().any(|spec| m.is(spec, system)));
    applied.macvlans = kept;
    macvlans::remove(&applied.handle, &stale).await;
    for gone in &stale {
        forget_sysctls_of(applied, &gone.name);
    }
    let mut new = Vec::new();
    for spec in &resolved.macvlans {
        if applied.macvlans.iter().any(|m| m.name == spec.name) {
            continue;
        }
        let replaced = |index: u32| stale.iter().any(|s| s.ifindex == index);
        if system
            .link_by_name(&spec.name)
            .is_some_and(|l| !replaced(l.index))
        {
            // Made by someone else, exactly as asked (the resolver checked).
            tracing::info!(
                macvlan = %spec.name,
                "using the existing macvlan as it is (this agent did not create it and \
                 never removes it)"
            );
            continue;
        }
        let created = macvlans::create(&applied.handle, spec).await?;
        applied.macvlans.push(created.clone());
        new.push(created);
    }
    applied.sysctls.extend(sysctl::isolate_arp(
        resolved.arp_isolated.iter().map(String::as_str),
    )?);
    for macvlan in &applied.macvlans {
        if new.contains(macvlan) {
            macvlans::activate(&applied.handle, macvlan).await?;
        } else {
            macvlans::set_up(&applied.handle, macvlan).await?;
        }
    }
    Ok(())
}

/// Drops the sysctl records of an interface this agent removed: nothing
/// to restore, and the name may be someone else's next.
fn forget_sysctls_of(applied: &mut Applied, interface: &str) {
    let inherited = applied.inherited_sysctls.min(applied.sysctls.len());
    let dropped_inherited = applied.sysctls[..inherited]
        .iter()
        .filter(|c| sysctl::concerns(c, interface))
        .count();
    applied.inherited_sysctls = inherited - dropped_inherited;
    applied.sysctls.retain(|c| !sysctl::concerns(c, interface));
}

fn end_disallowed_flows(
    maps: &mut Maps,
    resolved: &Resolved,
    desired: &DesiredState,
) -> anyhow::Result<Vec<EndedFlow>> {
    let allowed = resolved
        .tenants
        .iter()
        .zip(desired.ids.iter().zip(&desired.zones))
        .map(|(tenant, (id, zones))| {
            let by_source = tenant.ingress.is_empty();
            // Empty sources allow any source: a tenant chosen by source
            // with none of a family keeps no flow of that family.
            let keeps_v4 = !(by_source && tenant.sources.is_empty());
            let keeps_v6 = !(by_source && tenant.sources_v6.is_empty());
            let allowed = conntrack::Allowed {
                egress: only_if(keeps_v4, &tenant.egress),
                egress_v6: only_if(keeps_v6, &tenant.egress_v6),
                sources: only_if(by_source, &tenant.sources),
                sources_v6: only_if(by_source, &tenant.sources_v6),
                zones: zones.clone(),
                forwards: tenant.forwards.clone(),
                floating: tenant.floating.clone(),
            };
            (*id, allowed)
        })
        .collect();
    conntrack::end_flows_not_allowed(maps, &allowed)
}

/// `list`, or nothing when `keep` is false.
fn only_if<T: Clone>(keep: bool, list: &[T]) -> Vec<T> {
    if keep { list.to_vec() } else { Vec::new() }
}

async fn sync_addresses_and_state(
    instance: &Instance,
    resolved: &Resolved,
    system: &SystemView,
    applied: &mut Applied,
    ids: &[u16],
    mut state: RunState,
    stop: &Stop,
) -> anyhow::Result<RunState> {
    let wanted: Vec<IpAddr> = resolved.egress_addresses().collect();
    let external_mac = system
        .link_by_index(resolved.external.index)
        .and_then(|l| l.mac);
    // Present addresses are skipped: ours (already in `applied`) silently,
    // someone else's with a word; neither is touched.
    addresses::add_missing(
        &applied.handle,
        &resolved.external,
        external_mac,
        &wanted,
        &mut applied.addresses,
        system,
        stop,
    )
    .await?;
    stop.check()?;
    // Owned addresses that are no longer wanted go now.
    let wanted: HashSet<IpAddr> = wanted.into_iter().collect();
    let unwanted: Vec<IpAddr> = applied
        .addresses
        .iter()
        .copied()
        .filter(|a| !wanted.contains(a))
        .collect();
    addresses::remove(&applied.handle, &resolved.external, &unwanted).await;
    applied.addresses.retain(|a| wanted.contains(a));

    state.tenants = resolved
        .tenants
        .iter()
        .zip(ids)
        .map(|(tenant, id)| TenantRecord {
            id: *id,
            name: tenant.name.clone(),
            sources: (tenant.sources.iter().map(ToString::to_string))
                .chain(tenant.sources_v6.iter().map(ToString::to_string))
                .collect(),
            egress: (tenant.egress.iter().copied().map(IpAddr::V4))
                .chain(tenant.egress_v6.iter().copied().map(IpAddr::V6))
                .collect(),
            ports: tenant.ports,
            ingress: tenant.ingress.clone(),
        })
        .collect();
    state.added_addresses.clone_from(&applied.addresses);
    state.sysctls.clone_from(&applied.sysctls);
    state.macvlans.clone_from(&applied.macvlans);
    instance.write_state(&state)?;
    Ok(state)
}

/// How long a stopping agent lets the translation log's sinks write what
/// they hold.
const AUDIT_GRACE: Duration = Duration::from_secs(3);

/// Removes expired flows every `interval`, on a thread of its own: a sweep
/// of a large table is a few seconds of syscalls that should not hold up
/// signals or netlink.
struct Sweeper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Sweeper {
    fn start(
        pin_dir: &Path,
        interval: Duration,
        timeouts: Timeouts,
        exporter: Arc<Exporter>,
        audit: AuditHandle,
    ) -> anyhow::Result<Self> {
        let mut maps = Maps::open(pin_dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || {
                let tick = Duration::from_millis(100).min(interval);
                let mut waited = Duration::ZERO;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    waited += tick;
                    if waited < interval {
                        continue;
                    }
                    waited = Duration::ZERO;
                    let swept = conntrack::sweep(&mut maps, conntrack::now_ns(), &timeouts);
                    if let Ok(report) = &swept {
                        exporter
                            .flows_tracked
                            .store(report.flows_kept as u64, Ordering::Relaxed);
                        audit.ended(&report.ended);
                        *exporter
                            .held
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) =
                            report.held.clone();
                    }
                    match swept {
                        Ok(report)
                            if report.flows_expired
                                + report.halves_orphaned
                                + report.fragments_expired
                                > 0 =>
                        {
                            tracing::debug!(
                                expired = report.flows_expired,
                                orphaned = report.halves_orphaned,
                                fragments = report.fragments_expired,
                                kept = report.flows_kept,
                                "swept"
                            );
                        }
                        Ok(_) => {}
                        Err(err) => {
                            tracing::warn!(error = %format!("{err:#}"), "sweeping conntrack")
                        }
                    }
                }
            })
            .context("starting the sweeper")?;
        Ok(Self { stop, thread })
    }

    /// Asks the sweeper to stop and waits a moment for it; a sweep of a
    /// large table still under way is left to end with the process rather
    /// than delay the stop.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_millis(300);
        while !self.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// SIGTERM and SIGINT raise the stop flag, SIGHUP asks for a reload, from
/// a task of their own: a signal is seen whatever the run loop is doing.
struct Signals {
    reloads: mpsc::UnboundedReceiver<()>,
}

impl Signals {
    fn install() -> anyhow::Result<(Self, Stop)> {
        // A parent may have blocked these (and the mask is inherited): a
        // gateway that cannot be stopped cleanly would leave addresses
        // behind.
        // SAFETY: adjusting this thread's signal mask with a local set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            libc::sigaddset(&raw mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut());
        }
        let mut terminate =
            signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let (stop_tx, stop) = Stop::channel();
        let (reload_tx, reloads) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = terminate.recv() => {
                        tracing::info!("SIGTERM");
                        stop_tx.send_replace(true);
                    }
                    _ = interrupt.recv() => {
                        tracing::info!("SIGINT");
                        stop_tx.send_replace(true);
                    }
                    _ = hangup.recv() => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        let _ = reload_tx.send(());
                    }
                }
            }
        });
        Ok((Self { reloads }, stop))
    }
}

/// `egress-agent cleanup`: removes what an agent that died left behind.
pub async fn cleanup(instance: &Instance) -> anyhow::Result<()> {
    let _lock = instance.lock()?;
    let state = instance.read_state()?;
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);
    routes::remove_all(&handle).await?;
    if let Some(state) = &state {
        // Those the state lists, and those the kernel knows for ours.
        let system = SystemView::read(&handle).await?;
        let external = LinkRef {
            name: system.link_by_index(state.external_ifindex).map_or_else(
                || format!("ifindex {}", state.external_ifindex),
                |l| l.name.clone(),
            ),
            index: state.external_ifindex,
        };
        let mut ours: BTreeSet<IpAddr> = state.added_addresses.iter().copied().collect();
        ours.extend(system.owned_on(state.external_ifindex));
        let ours: Vec<IpAddr> = ours.into_iter().collect();
        addresses::remove(&handle, &external, &ours).await;
        macvlans::remove(&handle, &state.macvlans).await;
        sysctl::restore(&state.sysctls);
    }
    crate::dataplane::remove_pins(&instance.pin_dir)?;
    instance.remove_state();
    tracing::info!(instance = %instance.name, "cleaned up");
    Ok(())
}
