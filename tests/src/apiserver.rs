//! An in-process Kubernetes API server for tests, speaking the real HTTP
//! protocol to kube-rs clients, watchers and reflectors: it stores objects
//! as JSON, keeps one resourceVersion counter and a bounded history that
//! watches replay, answers errors as `Status` objects, and can be made
//! unreachable or forgetful ([`FakeApiServer::set_outage`],
//! [`FakeApiServer::compact`]) to exercise reconnects and 410 relists.
//!
//! It is plain HTTP on 127.0.0.1 and runs on its own thread, so sync
//! tests, async tests and child processes (through
//! [`FakeApiServer::write_kubeconfig`]) can all use it.
//!
//! Simplifications, where they differ from a real cluster:
//! - no admission, validation, defaulting, authentication or managedFields;
//!   namespaced objects do need an existing namespace, and `default`,
//!   `kube-node-lease`, `kube-public`, `kube-system` exist from the start;
//! - built-in kinds follow the CRD rules (`.status` is dropped on create and
//!   only written through `/status` when the kind has the subresource);
//!   `metadata.generation` starts at 1 and is bumped when anything but
//!   metadata (and status, for kinds with the subresource) changes;
//! - strategic merge and server-side apply patches are applied as JSON
//!   merge patches (see `http::patch`); deletion is immediate unless
//!   finalizers hold it; deleting a namespace deletes its objects at once;
//! - field selectors accept any dotted path;
//! - a CustomResourceDefinition written to the server makes its kinds
//!   served and is marked Established at once.

mod http;
mod patch;
mod select;
mod store;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

pub use store::ResourceType;
use store::{Key, Part, Store, WriteOptions};

/// Tunables; the defaults suit tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many changes are kept for watches to resume from; an older
    /// resourceVersion gets 410 Gone.
    pub history_limit: usize,
    /// How often a watch that asked for bookmarks gets one (when the
    /// resourceVersion moved on since it was last told).
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// State shared by the HTTP side and the test-side helpers.
struct Shared {
    store: Mutex<Store>,
    /// The store's resourceVersion; watches and `wait_for` wake on it.
    changes: watch::Sender<u64>,
    bookmark_interval: Duration,
    address: SocketAddr,
    requests: Mutex<Vec<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A test that panicked while holding the lock leaves a consistent
        // enough store behind; the other tests should not fail for it.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&self.lock())
    }

    /// Runs a write, then wakes the watches if it changed anything.
    fn write<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let (out, rv, oldest) = {
            let mut store = self.lock();
            let out = f(&mut store);
            (out, store.rv(), store.oldest())
        };
        self.changes.send_if_modified(|current| {
            // A compaction changes no resourceVersion but must wake lagging
            // watches, which then find themselves expired.
            let changed = *current != rv || oldest == rv;
            *current = rv;
            changed
        });
        out
    }

    fn log(&self, line: String) {
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if requests.len() < 100_000 {
            requests.push(line);
        }
    }
}

/// The open sockets (listener and connections), so that an outage can wait
/// until all of them are closed.
#[derive(Default)]
struct Live {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Live {
    fn enter(self: &Arc<Self>) -> LiveGuard {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        LiveGuard(Arc::clone(self))
    }

    fn wait_idle(&self, timeout: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, _) = self
            .idle
            .wait_timeout_while(count, timeout, |count| *count > 0)
            .unwrap_or_else(PoisonError::into_inner);
        *count == 0
    }
}

/// Dropped after the socket it stands for.
struct LiveGuard(Arc<Live>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(PoisonError::into_inner);
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A running fake API server; dropping it stops it.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    runtime: tokio::runtime::Handle,
    /// `false` closes the listener and every connection.
    serving: watch::Sender<bool>,
    live: Arc<Live>,
    out: Mutex<bool>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 with a free port.
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let address = listener.local_addr().expect("the listener's address");
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the fake API server");
                let _ = handle_tx.send(runtime.handle().clone());
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime drops every task, closing all sockets.
            })
            .expect("starting the fake API server's thread");
        let runtime = handle_rx
            .recv()
            .expect("the fake API server's runtime started");
        let store = Store::new(options.history_limit);
        let (changes, _) = watch::channel(store.rv());
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changes,
            bookmark_interval: options.bookmark_interval,
            address,
            requests: Mutex::new(Vec::new()),
        });
        let server = Self {
            shared,
            address,
            runtime,
            serving: watch::channel(false).0,
            live: Arc::default(),
            out: Mutex::new(false),
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        self.serving.send_replace(true);
        let guard = self.live.enter();
        self.runtime.spawn(accept(
            listener,
            Arc::clone(&self.shared),
            self.serving.subscribe(),
            Arc::clone(&self.live),
            guard,
        ));
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A client configuration for this server (namespace `default`).
    pub fn kube_config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("the server's URL is a URI"))
    }

    /// A client for this server. Call it within a tokio runtime: the client
    /// spawns its connection tasks there.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).expect("a client for the fake API server")
    }

    /// Writes a kubeconfig (context `fake`, namespace `default`, no
    /// credentials) for programs run with `--kubeconfig`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
",
            self.url()
        );
        std::fs::write(path, text)
            .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
    }

    /// Serves a kind, with a status subresource as most CRDs have.
    pub fn register(&self, group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) {
        self.register_type(ResourceType::new(
            group, version, kind, plural, namespaced, true,
        ));
    }

    /// Serves a kind as described (e.g. without a status subresource).
    pub fn register_type(&self, resource: ResourceType) {
        self.shared.write(|store| store.register(resource));
    }

    fn resource(&self, api_version: &str, kind: &str) -> ResourceType {
        self.shared
            .read(|store| store.resource_for_kind(api_version, kind).cloned())
            .unwrap_or_else(|| panic!("{kind} ({api_version}) is not served: register it first"))
    }

    /// Creates or replaces an object as given, status included (standing in
    /// for whatever controller would write it), as `kubectl apply` would
    /// with `--force-conflicts`; namespaced objects default to `default`.
    /// Returns the stored object. Panics on what the server refuses (e.g. a
    /// missing namespace).
    pub fn apply(&self, object: Value) -> Value {
        let text = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let (api_version, kind, name) =
            (text("/apiVersion"), text("/kind"), text("/metadata/name"));
        let rt = self.resource(&api_version, &kind);
        let namespace = match text("/metadata/namespace") {
            ns if !rt.namespaced => ns,
            ns if ns.is_empty() => "default".to_string(),
            ns => ns,
        };
        let key = Key::new(&rt, &namespace, &name);
        let options = WriteOptions {
            keep_status: true,
            dry_run: false,
        };
        let mut object = object;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            // Unconditional, whatever version the test's object came from.
            meta.remove("resourceVersion");
        }
        self.shared
            .write(|store| {
                if store.get(&key).is_some() {
                    store.update(&rt, &key, object, Part::Main, options)
                } else {
                    let namespace = rt.namespaced.then_some(namespace.as_str());
                    store.create(&rt, namespace, object, options)
                }
            })
            .unwrap_or_else(|error| panic!("apply {kind} {namespace}/{name}: {error}"))
    }

    /// The object, if it exists (`namespace` is ignored for cluster-scoped
    /// kinds).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let rt = self.resource(api_version, kind);
        let key = Key::new(&rt, namespace.unwrap_or(""), name);
        self.shared.read(|store| store.get(&key).cloned())
    }

    /// The objects of a kind, in one namespace or (`None`) all of them.
    pub fn list(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let rt = self.resource(api_version, kind);
        let filter = select::Filter {
            namespace: namespace.filter(|_| rt.namespaced).map(str::to_string),
            ..select::Filter::default()
        };
        self.shared.read(|store| store.select(&rt, &filter))
    }

    /// Deletes an object as a client would (finalizers hold it, with a
    /// deletionTimestamp); false if it did not exist.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let rt = self.resource(api_version, kind);
        let key = Key::new(&rt, namespace.unwrap_or(""), name);
        self.shared
            .write(|store| store.delete(&rt, &key, &Value::Null, WriteOptions::default()))
            .is_ok()
    }

    /// The current resourceVersion (of the last change).
    pub fn resource_version(&self) -> u64 {
        self.shared.read(Store::rv)
    }

    /// Drops the change history: any watch or paginated list that has to
    /// resume from before now gets 410 Gone. Open watches that are up to
    /// date carry on, as with an etcd compaction.
    pub fn compact(&self) {
        self.shared.write(Store::compact);
    }

    /// `true` closes the listening socket and every open connection (watch
    /// streams end mid-stream, new connections are refused); `false` listens
    /// again on the same port, with the same objects.
    pub fn set_outage(&self, out: bool) {
        let mut current = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        if *current == out {
            return;
        }
        if out {
            self.serving.send_replace(false);
            assert!(
                self.live.wait_idle(Duration::from_secs(5)),
                "the fake API server's sockets did not close within 5 s"
            );
        } else {
            self.serve(rebind(self.address));
        }
        *current = out;
    }

    /// Every request so far, as `METHOD /path?query STATUS`.
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `check` finds something (checking after every change,
    /// and every 100 ms for conditions outside the store); `None` on
    /// timeout.
    pub async fn wait_for<T>(
        &self,
        mut check: impl FnMut(&Self) -> Option<T>,
        timeout: Duration,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(found) = check(self) {
                return Some(found);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            let wake = deadline.min(now + Duration::from_millis(100));
            let _ = tokio::time::timeout_at(wake, changes.changed()).await;
        }
    }

    /// [`Self::wait_for`] for tests without a runtime (polls every 10 ms).
    pub fn wait_for_blocking<T>(
        &self,
        mut check: impl FnMut(&Self) -> Option<T>,
        timeout: Duration,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds the port again after an outage (retrying briefly: the old socket
/// may take a moment to go).
fn rebind(address: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(address) {
            Ok(listener) => return listener,
            Err(error) if Instant::now() >= deadline => {
                panic!("binding {address} again after the outage: {error}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

async fn accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut serving: watch::Receiver<bool>,
    live: Arc<Live>,
    _guard: LiveGuard,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let for_connections = serving.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // Errors here are per connection (e.g. reset before accept).
                let Ok((stream, _)) = accepted else { continue };
                let guard = live.enter();
                tokio::spawn(connection(
                    stream,
                    Arc::clone(&shared),
                    for_connections.clone(),
                    guard,
                ));
            }
            _ = serving.wait_for(|serving| !*serving) => return,
        }
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    mut serving: watch::Receiver<bool>,
    _guard: LiveGuard,
) {
    let service = service_fn(move |request| http::serve(Arc::clone(&shared), request));
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        _ = serving.wait_for(|serving| !*serving) => {}
    }
}
