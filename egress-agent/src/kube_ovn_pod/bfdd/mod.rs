//! The BFD responder of a Kube-OVN gateway pod, in place of Kube-OVN's
//! bfdd supervisor and OpenBFDD.
//!
//! OVN's BFD port opens a session to every gateway pod and routes tenant
//! traffic only through pods whose session is Up. The pod answers (the
//! passive role, RFC 5880 §6.1, to the peers of `BFD_PEER_IPS` only) and
//! holds its sessions AdminDown (diag 6) whenever the dataplane is not
//! attached, so OVN drains the pod as soon as it could not translate
//! traffic, instead of when the pod dies. It runs unprivileged (UID 65534,
//! NET_BIND_SERVICE for port 3784, no bpf()): the dataplane is read from the
//! TC filter dump, which anyone may read.
//!
//! `config` is the environment, `dataplane` the attachment check,
//! `control` the control socket's protocol, `http` `/livez` and
//! `/metrics`; this module runs them and holds the client side.

pub mod config;
pub mod control;
pub mod dataplane;
mod http;

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use self::{
    config::{Config, Sessions},
    control::{Command, ControlReply, DataplaneStatus, Request, SupervisorStatus},
    dataplane::Internal,
};
use crate::bfd::{self, Bfd, PeerConfig};

/// How often the dataplane is checked. OVN's fastest detection time is
/// tens of milliseconds above this; Kube-OVN's default is 3 s.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How long a probe waits for the responder (Kube-OVN's probe I/O timeout).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the control socket and `/livez` read.
struct Shared {
    /// The pod's addresses, at most one per family: sessions of each
    /// family answer from its own.
    local: Vec<IpAddr>,
    sessions: Sessions,
    bfd: Option<Bfd>,
    dataplane: DataplaneStatus,
}

type SharedState = Arc<Mutex<Shared>>;

fn lock(shared: &SharedState) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn status(shared: &SharedState) -> SupervisorStatus {
    let state = lock(shared);
    let (live, sessions) = match &state.bfd {
        Some(bfd) => (true, bfd.snapshot()),
        None => (false, Vec::new()),
    };
    control::supervisor_status(live, &state.local, &sessions, state.dataplane.clone())
}

/// `bfdd-supervisor run`: serves until SIGTERM or SIGINT, then tells the
/// peers AdminDown (diag 7) so they drain the pod at once.
pub async fn run() -> anyhow::Result<()> {
    let config = Config::from_env(|name| std::env::var(name).ok())?;
    let local: Vec<IpAddr> = [
        config.pod_ips.iter().find(|ip| ip.is_ipv4()),
        config.pod_ips.iter().find(|ip| ip.is_ipv6()),
    ]
    .into_iter()
    .flatten()
    .copied()
    .collect();
    let listening: Vec<String> = local.iter().map(|ip| format!("{ip}")).collect();
    let internal = match &config.interface {
        Some(name) => Internal::Named(name.clone()),
        // Kube-OVN's first pod IP is the one on the internal subnet.
        None => Internal::Holding(config.pod_ips[0]),
    };
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);

    let first = dataplane::check(&handle, &internal).await;
    let (health_tx, health) = watch::channel(health_of(&first));
    log_dataplane(None, &first);
    let shared: SharedState = Arc::new(Mutex::new(Shared {
        local: local.clone(),
        sessions: config.sessions.clone(),
        bfd: None,
        dataplane: first,
    }));
    let bfd = Bfd::start_on(&local, peer_configs(&config.sessions), health.clone()).await?;
    tracing::info!(
        local = ?listening,
        peers = ?config.sessions.allowed,
        min_tx_ms = config.sessions.min_tx_ms,
        min_rx_ms = config.sessions.min_rx_ms,
        multiplier = config.sessions.multiplier,
        "BFD responder listening on port 3784 of {}",
        listening.join(" and ")
    );
    lock(&shared).bfd = Some(bfd);

    let (changed_tx, mut changed) = watch::channel(());
    let listener = bind_control(&config.socket)?;
    tokio::spawn(serve_control(listener, Arc::clone(&shared), changed_tx));
    // `:PORT` tries IPv6 (which takes IPv4 too) first; a kernel without
    // IPv6 gets IPv4. Without the endpoint the HTTP liveness probe fails,
    // so failing here says why sooner, as Kube-OVN's supervisor does.
    let mut serving = Err(anyhow::anyhow!("no metrics address"));
    for address in config::metrics_addresses(&config.metrics)? {
        serving = http::serve(address, Arc::clone(&shared)).await;
        if serving.is_ok() {
            break;
        }
    }
    serving?;
    tokio::spawn(watch_dataplane(
        handle,
        internal,
        Arc::clone(&shared),
        health_tx,
    ));

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Ok(()) = changed.changed() => restart(&shared, &health).await?,
        }
    }
    let bfd = lock(&shared).bfd.take();
    if let Some(bfd) = bfd {
        bfd.shutdown().await;
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// Sessions with the allowed peers of either family, answering only.
fn peer_configs(sessions: &Sessions) -> Vec<PeerConfig> {
    sessions
        .allowed
        .iter()
        .map(|peer| PeerConfig {
            min_tx: sessions.min_tx(),
            min_rx: sessions.min_rx(),
            multiplier: sessions.multiplier,
            passive: true,
            ..PeerConfig::new(*peer)
        })
        .collect()
}

/// `bfdd-control` changed the settings: the sessions are made anew with
/// them (OpenBFDD applies `session new` settings to new sessions only;
/// here every session is one of those). Kube-OVN's scripts set what the
/// environment already said, which changes nothing and restarts nothing.
async fn restart(
    shared: &SharedState,
    health: &watch::Receiver<bfd::Health>,
) -> anyhow::Result<()> {
    let (old, sessions, local) = {
        let mut state = lock(shared);
        (
            state.bfd.take(),
            state.sessions.clone(),
            state.local.clone(),
        )
    };
    if let Some(old) = old {
        old.shutdown().await;
    }
    tracing::info!(?sessions, "BFD settings changed: sessions restart");
    let bfd = Bfd::start_on(&local, peer_configs(&sessions), health.clone()).await?;
    lock(shared).bfd = Some(bfd);
    Ok(())
}

fn health_of(dataplane: &DataplaneStatus) -> bfd::Health {
    if dataplane.attached {
        bfd::Health::Serving
    } else {
        bfd::Health::NotServing
    }
}

fn log_dataplane(before: Option<&DataplaneStatus>, now: &DataplaneStatus) {
    if before.is_some_and(|b| b.attached == now.attached && b.detail == now.detail) {
        return;
    }
    if now.attached {
        tracing::info!(interface = ?now.interface, program = %now.detail, "dataplane attached: BFD sessions may come up");
    } else {
        tracing::warn!(interface = ?now.interface, reason = %now.detail, "dataplane not attached: BFD sessions held AdminDown");
    }
}

async fn watch_dataplane(
    handle: rtnetlink::Handle,
    internal: Internal,
    shared: SharedState,
    health: watch::Sender<bfd::Health>,
) {
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = dataplane::check(&handle, &internal).await;
        let next = health_of(&now);
        health.send_if_modified(|current| std::mem::replace(current, next) != next);
        let mut state = lock(&shared);
        log_dataplane(Some(&state.dataplane), &now);
        state.dataplane = now;
    }
}

/// The control socket, replacing a stale one; readable by this user only,
/// as Kube-OVN's is (the probes run as the container's user).
fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the control socket directory {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

async fn serve_control(listener: UnixListener, shared: SharedState, changed: watch::Sender<()>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        let changed = changed.clone();
        tokio::spawn(async move {
            let answered =
                tokio::time::timeout(PROBE_TIMEOUT, answer(stream, &shared, &changed)).await;
            if let Ok(Err(err)) = answered {
                tracing::debug!("control request: {err:#}");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    shared: &SharedState,
    changed: &watch::Sender<()>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let request = Request::parse(&line);
    let mut reply = match &request {
        Request::BfddControl(args) => serde_json::to_vec(&bfdd_control(args, shared, changed))?,
        _ => serde_json::to_vec(&control::probe_reply(&request, status(shared)))?,
    };
    reply.push(b'\n');
    write.write_all(&reply).await?;
    write.shutdown().await?;
    Ok(())
}

fn bfdd_control(
    args: &[String],
    shared: &SharedState,
    changed: &watch::Sender<()>,
) -> ControlReply {
    let command = match Command::parse(args) {
        Ok(command) => command,
        Err(message) => {
            return ControlReply {
                output: message,
                ok: false,
            };
        }
    };
    let mut state = lock(shared);
    if command == Command::Status {
        let sessions = state.bfd.as_ref().map(Bfd::snapshot).unwrap_or_default();
        return ControlReply {
            output: control::render_status(&state.local, &sessions),
            ok: true,
        };
    }
    let before = state.sessions.clone();
    let reply = control::apply(&command, &mut state.sessions);
    if state.sessions != before {
        changed.send_replace(());
    }
    reply
}

/// Sends one request and returns the reply line.
async fn ask(socket: &Path, request: &Request) -> anyhow::Result<String> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.with_context(|| {
            format!(
                "failed to connect to BFD supervisor at {}",
                socket.display()
            )
        })?;
        stream
            .write_all(format!("{}\n", request.line()).as_bytes())
            .await?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).await?;
        anyhow::Ok(reply)
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .context("the BFD supervisor did not answer in time")?
}

/// `bfdd-supervisor live|ready|status`, as Kube-OVN's: exit 0 when the
/// answer is good (`status` prints the status as one JSON line), else a
/// message on stderr and exit 1.
pub async fn probe(request: Request) -> i32 {
    let socket = config::socket_path(|name| std::env::var(name).ok());
    let outcome = async {
        let reply: serde_json::Value = serde_json::from_str(&ask(&socket, &request).await?)
            .context("failed to decode BFD supervisor response")?;
        if let Some(error) = reply["error"].as_str().filter(|e| !e.is_empty()) {
            bail!("{error}");
        }
        if request == Request::Status {
            println!("{}", serde_json::to_string(&reply["status"])?);
        }
        Ok(())
    };
    match outcome.await {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("BFD supervisor failed: {err:#}");
            1
        }
    }
}

/// `bfdd-control ARGS...`: OpenBFDD's reply text on stdout; exit 1 when
/// the command failed or the responder did not answer.
pub async fn bfdd_control_client(args: Vec<String>) -> i32 {
    let socket = config::socket_path(|name| std::env::var(name).ok());
    let outcome = async {
        let reply: ControlReply =
            serde_json::from_str(&ask(&socket, &Request::BfddControl(args)).await?)
                .context("failed to decode the responder's reply")?;
        anyhow::Ok(reply)
    };
    match outcome.await {
        Ok(reply) => {
            print!("{}", reply.output);
            if !reply.output.ends_with('\n') {
                println!();
            }
            if reply.ok { 0 } else { 1 }
        }
        Err(err) => {
            eprintln!("Unable to connect to the BFD responder: {err:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_answer_the_peers_of_both_families_with_the_configured_timers() {
        let sessions = Sessions {
            min_tx_ms: 100,
            min_rx_ms: 200,
            multiplier: 5,
            allowed: vec!["10.0.1.254".parse().unwrap(), "fd00::1".parse().unwrap()],
        };
        let peers = peer_configs(&sessions);
        let answering = |address: &str| PeerConfig {
            address: address.parse().unwrap(),
            interface: None,
            min_tx: Duration::from_millis(100),
            min_rx: Duration::from_millis(200),
            multiplier: 5,
            passive: true,
        };
        assert_eq!(peers, vec![answering("10.0.1.254"), answering("fd00::1")]);
    }

    #[test]
    fn health_follows_the_attachment() {
        let attached = DataplaneStatus {
            attached: true,
            ..DataplaneStatus::default()
        };
        assert_eq!(health_of(&attached), bfd::Health::Serving);
        assert_eq!(
            health_of(&DataplaneStatus::default()),
            bfd::Health::NotServing
        );
    }
}
