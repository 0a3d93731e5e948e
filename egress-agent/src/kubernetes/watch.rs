//! Watchers that keep a [`Snapshot`] of the cluster current.
//!
//! One kube-runtime watcher per kind (Kube-OVN's only when asked for: a
//! cluster without Kube-OVN has no such resources) feeds a store of the
//! reduced views resolution reads. The watcher lists, then watches, and
//! relists on its own when the server has forgotten its resource version
//! (410 Gone): during a relist the previous contents stay in force and are
//! swapped for the new list at once when it completes, so no snapshot is
//! ever built from half a list. Changes are gathered for a short quiet time
//! (200 ms by default) and published on a `tokio::sync::watch` channel only
//! when the snapshot differs.
//!
//! While the API server cannot be reached the watchers retry with backoff
//! and the last snapshot stays in force: the dataplane keeps serving what
//! it served. [`Connectivity`] says whether that is the case and since when.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{Notify, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use super::{
    crd::EgressGateway,
    kubeovn::{Subnet, VpcEgressGateway},
    selector::Labels,
    snapshot::{LocalNode, NamespaceView, NodeView, PodView, Snapshot, agent_pod_node},
};

/// Labels of the agent's own pods in `deploy/daemonset.yaml`.
pub const AGENT_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "egress-agent");

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// This node's name (`NODE_NAME` from the downward API, or the gateway's
    /// host name outside the cluster).
    pub node_name: String,
    /// Labels node selectors are matched against when `node_name` is not a
    /// Node of the cluster.
    pub node_labels: Labels,
    /// Also watch Kube-OVN's VpcEgressGateways and Subnets.
    pub kube_ovn: bool,
    /// How to recognise the other agents, so a gateway is only given to a
    /// node that runs one; `None` outside the cluster.
    pub agent_pods: Option<AgentPods>,
    /// Quiet time before a change is published.
    pub debounce: Duration,
    /// Longest a change waits while others keep arriving.
    pub max_delay: Duration,
    /// How long [`start`] waits for the first complete lists.
    pub initial_sync_timeout: Duration,
}

impl WatchOptions {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            node_labels: Labels::new(),
            kube_ovn: false,
            agent_pods: None,
            debounce: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            initial_sync_timeout: Duration::from_secs(60),
        }
    }
}

/// The agent's pods: in `namespace`, carrying all of `labels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPods {
    pub namespace: String,
    pub labels: Labels,
}

impl AgentPods {
    /// The DaemonSet's pods in `namespace` (`POD_NAMESPACE`).
    pub fn in_namespace(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            labels: [(AGENT_POD_LABEL.0.to_owned(), AGENT_POD_LABEL.1.to_owned())].into(),
        }
    }
}

/// How current the snapshot is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connectivity {
    /// The last request to the API server succeeded.
    pub reachable: bool,
    /// When a snapshot was last built from complete lists.
    pub last_sync: Option<SystemTime>,
    /// The most recent error, kept after recovery for diagnosis.
    pub last_error: Option<String>,
    /// Kinds whose watch is failing right now, with their error.
    pub failing: BTreeMap<&'static str, String>,
}

/// Running watchers; dropping this stops them.
pub struct KubeWatch {
    /// The current snapshot; `changed()` fires when a different one is
    /// published. Its first value is already complete.
    pub snapshots: watch::Receiver<Snapshot>,
    pub connectivity: watch::Receiver<Connectivity>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A client from a kubeconfig file, or else from the environment: the
/// in-cluster service account in a pod, `KUBECONFIG` or `~/.kube/config`
/// elsewhere.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no kubeconfig given, and neither in-cluster nor default configuration found",
        )?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Starts the watchers and returns once every kind has been listed, with
/// that first snapshot; fails if that takes longer than
/// `options.initial_sync_timeout` (the error names what failed).
pub async fn start(client: Client, options: WatchOptions) -> anyhow::Result<KubeWatch> {
    let (connectivity_tx, connectivity) = watch::channel(Connectivity::default());
    let shared = Arc::new(Shared {
        stores: Mutex::new(Stores::new(options.kube_ovn)),
        dirty: Notify::new(),
        connectivity: connectivity_tx,
    });
    let mut tasks = vec![
        spawn_kind::<EgressGateway, _, _>(
            Api::all(client.clone()),
            "EgressGateway",
            &shared,
            |s| &mut s.egress_gateways,
            |object| Some(without_managed_fields(object)),
        ),
        spawn_kind::<Namespace, _, _>(
            Api::all(client.clone()),
            "Namespace",
            &shared,
            |s| &mut s.namespaces,
            NamespaceView::from_namespace,
        ),
        spawn_kind::<Node, _, _>(
            Api::all(client.clone()),
            "Node",
            &shared,
            |s| &mut s.nodes,
            NodeView::from_node,
        ),
        {
            let agents = options.agent_pods.clone();
            spawn_kind::<Pod, _, _>(
                Api::all(client.clone()),
                "Pod",
                &shared,
                |s| &mut s.pods,
                move |pod| PodFacts::from_pod(pod, agents.as_ref()),
            )
        },
    ];
    if options.kube_ovn {
        tasks.push(spawn_kind::<VpcEgressGateway, _, _>(
            Api::all(client.clone()),
            "VpcEgressGateway",
            &shared,
            |s| &mut s.vpc_egress_gateways,
            |object| Some(without_managed_fields(object)),
        ));
        tasks.push(spawn_kind::<Subnet, _, _>(
            Api::all(client.clone()),
            "Subnet",
            &shared,
            |s| &mut s.subnets,
            |object| Some(without_managed_fields(object)),
        ));
    }
    tasks.push(tokio::spawn(probe_while_unreachable(
        client,
        Arc::clone(&shared),
    )));

    let (snapshot_tx, snapshots) = watch::channel(Snapshot::default());
    let (first_tx, first_rx) = oneshot::channel();
    tasks.push(tokio::spawn(publish(
        Arc::clone(&shared),
        options.clone(),
        snapshot_tx,
        first_tx,
    )));
    // Dropped on failure, which stops the tasks.
    let mut watch = KubeWatch {
        snapshots,
        connectivity,
        tasks,
    };
    if let Ok(Ok(())) = tokio::time::timeout(options.initial_sync_timeout, first_rx).await {
        watch.snapshots.borrow_and_update();
        return Ok(watch);
    }
    let failing: Vec<String> = watch
        .connectivity
        .borrow()
        .failing
        .iter()
        .map(|(kind, error)| format!("{kind}: {error}"))
        .collect();
    let pending = shared.lock().pending_kinds();
    anyhow::bail!(
        "the cluster's objects were not all listed within {:?} (waiting for {}){}",
        options.initial_sync_timeout,
        pending.join(", "),
        if failing.is_empty() {
            String::new()
        } else {
            format!("; {}", failing.join("; "))
        }
    )
}

struct Shared {
    stores: Mutex<Stores>,
    dirty: Notify,
    connectivity: watch::Sender<Connectivity>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Stores> {
        // A panic while holding the lock leaves plain maps behind; they are
        // still the best knowledge there is.
        self.stores.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn succeeded(&self, kind: &'static str) {
        self.connectivity.send_if_modified(|state| {
            let changed = !state.reachable || state.failing.contains_key(kind);
            state.reachable = true;
            state.failing.remove(kind);
            changed
        });
    }

    fn failed(&self, kind: &'static str, error: String) {
        tracing::warn!(kind, error = %error, "Kubernetes watch failed; keeping the last snapshot");
        self.connectivity.send_modify(|state| {
            state.reachable = false;
            state.last_error = Some(format!("{kind}: {error}"));
            state.failing.insert(kind, error);
        });
    }
}

/// Everything the watchers know, as reduced views.
struct Stores {
    egress_gateways: Store<EgressGateway>,
    vpc_egress_gateways: Store<VpcEgressGateway>,
    subnets: Store<Subnet>,
    namespaces: Store<NamespaceView>,
    pods: Store<PodFacts>,
    nodes: Store<NodeView>,
    kube_ovn: bool,
}

impl Stores {
    fn new(kube_ovn: bool) -> Self {
        Self {
            egress_gateways: Store::default(),
            vpc_egress_gateways: Store::default(),
            subnets: Store::default(),
            namespaces: Store::default(),
            pods: Store::default(),
            nodes: Store::default(),
            kube_ovn,
        }
    }

    fn pending_kinds(&self) -> Vec<&'static str> {
        let mut pending = Vec::new();
        let mut check = |listed: bool, kind| {
            if !listed {
                pending.push(kind);
            }
        };
        check(self.egress_gateways.listed, "EgressGateway");
        check(self.namespaces.listed, "Namespace");
        check(self.pods.listed, "Pod");
        check(self.nodes.listed, "Node");
        if self.kube_ovn {
            check(self.vpc_egress_gateways.listed, "VpcEgressGateway");
            check(self.subnets.listed, "Subnet");
        }
        pending
    }

    fn snapshot(&self, options: &WatchOptions) -> Snapshot {
        let local_labels = self
            .nodes
            .items
            .values()
            .find(|node| node.name == options.node_name)
            .map_or_else(|| options.node_labels.clone(), |node| node.labels.clone());
        let mut snapshot = Snapshot {
            local: LocalNode {
                name: options.node_name.clone(),
                labels: local_labels,
            },
            egress_gateways: self.egress_gateways.values(),
            vpc_egress_gateways: self.vpc_egress_gateways.values(),
            subnets: self.subnets.values(),
            namespaces: self.namespaces.values(),
            pods: self
                .pods
                .items
                .values()
                .filter_map(|facts| facts.source.clone())
                .collect(),
            nodes: self.nodes.values(),
            agent_nodes: options.agent_pods.as_ref().map(|_| {
                self.pods
                    .items
                    .values()
                    .filter_map(|facts| facts.agent_node.clone())
                    .collect::<BTreeSet<String>>()
            }),
        };
        snapshot.normalize();
        snapshot
    }
}

/// What one pod contributes: a source address, or being a Ready agent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodFacts {
    source: Option<PodView>,
    agent_node: Option<String>,
}

impl PodFacts {
    fn from_pod(pod: &Pod, agents: Option<&AgentPods>) -> Option<Self> {
        let agent_node = agents
            .filter(|a| pod.metadata.namespace.as_deref() == Some(a.namespace.as_str()))
            .and_then(|a| agent_pod_node(pod, &a.labels));
        let source = PodView::from_pod(pod);
        (source.is_some() || agent_node.is_some()).then_some(Self { source, agent_node })
    }
}

/// `(namespace, name)`; the namespace is empty for cluster-scoped kinds.
type ObjectName = (String, String);

/// Views of one kind, as a kube-runtime reflector keeps objects.
#[derive(Debug)]
struct Store<V> {
    items: BTreeMap<ObjectName, V>,
    /// The list in progress after `Init`; replaces `items` at `InitDone`.
    relist: Option<BTreeMap<ObjectName, V>>,
    /// A first list has completed.
    listed: bool,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<V: Clone + PartialEq> Store<V> {
    /// Applies one watcher event; returns whether the visible contents
    /// changed. `view` returns `None` for objects that do not matter, which
    /// then also leave the store when they change into one.
    fn apply<K: Resource>(
        &mut self,
        event: watcher::Event<K>,
        view: impl Fn(&K) -> Option<V>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                if let Some(value) = view(&object) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(name_of(&object), value);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let first = !self.listed;
                self.listed = true;
                let changed = listed != self.items;
                self.items = listed;
                first || changed
            }
            watcher::Event::Apply(object) => match view(&object) {
                Some(value) => self.items.insert(name_of(&object), value.clone()) != Some(value),
                None => self.items.remove(&name_of(&object)).is_some(),
            },
            watcher::Event::Delete(object) => self.items.remove(&name_of(&object)).is_some(),
        }
    }

    fn values(&self) -> Vec<V> {
        self.items.values().cloned().collect()
    }
}

fn name_of<K: Resource>(object: &K) -> ObjectName {
    let meta = object.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Managed fields change with every write and say nothing resolution reads.
fn without_managed_fields<K: Resource + Clone>(object: &K) -> K {
    let mut object = object.clone();
    object.meta_mut().managed_fields = None;
    object
}

fn spawn_kind<K, V, F>(
    api: Api<K>,
    kind: &'static str,
    shared: &Arc<Shared>,
    store: fn(&mut Stores) -> &mut Store<V>,
    view: F,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    V: Clone + PartialEq + Send + 'static,
    F: Fn(&K) -> Option<V> + Send + 'static,
{
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        // The default backoff (0.8 s doubling to 30 s, as client-go's
        // reflector) keeps a failing API server from being hammered.
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(item) = events.next().await {
            match item {
                Ok(event) => {
                    let changed = store(&mut shared.lock()).apply(event, &view);
                    shared.succeeded(kind);
                    if changed {
                        shared.dirty.notify_one();
                    }
                }
                Err(error) => shared.failed(kind, error.to_string()),
            }
        }
    })
}

/// Watches can sit silent after an error while the server is back; a cheap
/// request says so without waiting for the next change.
async fn probe_while_unreachable(client: Client, shared: Arc<Shared>) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if shared.connectivity.borrow().reachable {
            continue;
        }
        if client.apiserver_version().await.is_ok() {
            shared.connectivity.send_if_modified(|state| {
                let changed = !state.reachable;
                state.reachable = true;
                changed
            });
        }
    }
}

/// Gathers changes for `debounce` of quiet (at most `max_delay`), then
/// publishes the snapshot if every kind is listed and something changed.
async fn publish(
    shared: Arc<Shared>,
    options: WatchOptions,
    snapshots: watch::Sender<Snapshot>,
    first: oneshot::Sender<()>,
) {
    let mut first = Some(first);
    loop {
        shared.dirty.notified().await;
        let deadline = Instant::now() + options.max_delay;
        loop {
            let quiet = Instant::now() + options.debounce;
            tokio::select! {
                () = shared.dirty.notified() => {
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                () = tokio::time::sleep_until(quiet.min(deadline)) => break,
            }
        }
        let snapshot = {
            let stores = shared.lock();
            if !stores.pending_kinds().is_empty() {
                continue;
            }
            stores.snapshot(&options)
        };
        let changed = snapshots.send_if_modified(|current| {
            if *current == snapshot {
                return false;
            }
            *current = snapshot;
            true
        });
        if changed {
            tracing::debug!("cluster snapshot changed");
        }
        shared
            .connectivity
            .send_modify(|state| state.last_sync = Some(SystemTime::now()));
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, ip: &str, app: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some([("app".to_owned(), app.to_owned())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                ..Default::default()
            }),
        }
    }

    fn view(pod: &Pod) -> Option<PodView> {
        PodView::from_pod(pod)
    }

    fn names(store: &Store<PodView>) -> Vec<String> {
        store.items.values().map(|p| p.name.clone()).collect()
    }

    #[test]
    fn first_list_is_a_change_even_when_empty() {
        let mut store: Store<PodView> = Store::default();
        assert!(!store.apply::<Pod>(watcher::Event::Init, view));
        assert!(!store.listed);
        assert!(store.apply::<Pod>(watcher::Event::InitDone, view));
        assert!(store.listed);
        assert!(store.items.is_empty());
    }

    #[test]
    fn relist_keeps_old_contents_until_done_then_swaps() {
        let mut store: Store<PodView> = Store::default();
        store.apply(watcher::Event::Init, view);
        store.apply(watcher::Event::InitApply(pod("a", "10.0.0.1", "web")), view);
        store.apply(watcher::Event::InitApply(pod("b", "10.0.0.2", "web")), view);
        store.apply::<Pod>(watcher::Event::InitDone, view);
        assert_eq!(names(&store), ["a", "b"]);

        // 410 Gone: the watcher starts over with a fresh list in which
        // b has gone and c has come.
        assert!(!store.apply::<Pod>(watcher::Event::Init, view));
        assert!(!store.apply(watcher::Event::InitApply(pod("a", "10.0.0.1", "web")), view));
        assert!(!store.apply(watcher::Event::InitApply(pod("c", "10.0.0.3", "web")), view));
        assert_eq!(
            names(&store),
            ["a", "b"],
            "the old list stays in force meanwhile"
        );
        assert!(store.apply::<Pod>(watcher::Event::InitDone, view));
        assert_eq!(names(&store), ["a", "c"]);
    }

    #[test]
    fn an_identical_relist_is_not_a_change() {
        let mut store: Store<PodView> = Store::default();
        for _ in 0..2 {
            store.apply::<Pod>(watcher::Event::Init, view);
            store.apply(watcher::Event::InitApply(pod("a", "10.0.0.1", "web")), view);
        }
        store.apply::<Pod>(watcher::Event::InitDone, view);
        store.apply::<Pod>(watcher::Event::Init, view);
        store.apply(watcher::Event::InitApply(pod("a", "10.0.0.1", "web")), view);
        assert!(!store.apply::<Pod>(watcher::Event::InitDone, view));
    }

    #[test]
    fn apply_and_delete_report_only_visible_changes() {
        let mut store: Store<PodView> = Store::default();
        store.apply::<Pod>(watcher::Event::Init, view);
        store.apply::<Pod>(watcher::Event::InitDone, view);
        assert!(store.apply(watcher::Event::Apply(pod("a", "10.0.0.1", "web")), view));
        // A status update that changes nothing resolution reads.
        let mut same = pod("a", "10.0.0.1", "web");
        if let Some(status) = same.status.as_mut() {
            status.conditions = Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]);
        }
        assert!(!store.apply(watcher::Event::Apply(same), view));
        assert!(store.apply(watcher::Event::Apply(pod("a", "10.0.0.1", "db")), view));
        // The pod finishes: it stops being a source and leaves the store.
        let mut finished = pod("a", "10.0.0.1", "db");
        if let Some(status) = finished.status.as_mut() {
            status.phase = Some("Succeeded".into());
        }
        assert!(store.apply(watcher::Event::Apply(finished.clone()), view));
        assert!(store.items.is_empty());
        assert!(!store.apply(watcher::Event::Delete(finished), view));
    }

    #[test]
    fn snapshot_waits_for_every_kind_and_takes_local_labels_from_the_node() {
        let mut stores = Stores::new(true);
        let options = WatchOptions {
            node_labels: [("site".to_owned(), "vm".to_owned())].into(),
            agent_pods: Some(AgentPods::in_namespace("egress-system")),
            ..WatchOptions::new("gw-1")
        };
        assert_eq!(
            stores.pending_kinds(),
            [
                "EgressGateway",
                "Namespace",
                "Pod",
                "Node",
                "VpcEgressGateway",
                "Subnet"
            ]
        );
        stores
            .egress_gateways
            .apply::<EgressGateway>(watcher::Event::InitDone, |_| None);
        stores
            .namespaces
            .apply::<Namespace>(watcher::Event::InitDone, |_| None);
        stores.pods.apply::<Pod>(watcher::Event::InitDone, |_| None);
        stores
            .nodes
            .apply::<Node>(watcher::Event::InitDone, |_| None);
        stores
            .vpc_egress_gateways
            .apply::<VpcEgressGateway>(watcher::Event::InitDone, |_| None);
        stores
            .subnets
            .apply::<Subnet>(watcher::Event::InitDone, |_| None);
        assert!(stores.pending_kinds().is_empty());
        let outside = stores.snapshot(&options);
        assert_eq!(outside.local.labels["site"], "vm");
        assert_eq!(outside.agent_nodes, Some(BTreeSet::new()));

        let node = NodeView {
            name: "gw-1".into(),
            labels: [("site".to_owned(), "rack-3".to_owned())].into(),
            ..Default::default()
        };
        stores
            .nodes
            .items
            .insert((String::new(), "gw-1".into()), node);
        assert_eq!(stores.snapshot(&options).local.labels["site"], "rack-3");
    }

    #[test]
    fn agent_pods_are_recognised_only_in_their_namespace() {
        let agents = AgentPods::in_namespace("egress-system");
        let mut agent = pod("egress-agent-x", "192.168.99.21", "other");
        agent.metadata.namespace = Some("egress-system".into());
        agent.metadata.labels =
            Some([(AGENT_POD_LABEL.0.to_owned(), AGENT_POD_LABEL.1.to_owned())].into());
        if let Some(spec) = agent.spec.as_mut() {
            spec.host_network = Some(true);
            spec.node_name = Some("worker-1".into());
        }
        if let Some(status) = agent.status.as_mut() {
            status.conditions = Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]);
        }
        let facts = PodFacts::from_pod(&agent, Some(&agents)).expect("an agent");
        assert_eq!(facts.agent_node.as_deref(), Some("worker-1"));
        assert_eq!(facts.source, None, "host-network pods are never sources");
        agent.metadata.namespace = Some("elsewhere".into());
        assert_eq!(PodFacts::from_pod(&agent, Some(&agents)), None);
        assert_eq!(PodFacts::from_pod(&agent, None), None);
    }

    #[tokio::test(start_paused = true)]
    async fn publish_debounces_and_skips_unchanged_snapshots() {
        let (connectivity, _connectivity_rx) = watch::channel(Connectivity::default());
        let shared = Arc::new(Shared {
            stores: Mutex::new(Stores::new(false)),
            dirty: Notify::new(),
            connectivity,
        });
        {
            let mut stores = shared.lock();
            stores
                .egress_gateways
                .apply::<EgressGateway>(watcher::Event::InitDone, |_| None);
            stores
                .namespaces
                .apply::<Namespace>(watcher::Event::InitDone, |_| None);
            stores.pods.apply::<Pod>(watcher::Event::InitDone, |_| None);
            stores
                .nodes
                .apply::<Node>(watcher::Event::InitDone, |_| None);
        }
        let (tx, mut rx) = watch::channel(Snapshot::default());
        let (first_tx, first_rx) = oneshot::channel();
        let task = tokio::spawn(publish(
            Arc::clone(&shared),
            WatchOptions::new("gw-1"),
            tx,
            first_tx,
        ));
        shared.dirty.notify_one();
        first_rx.await.expect("first snapshot");
        assert_eq!(rx.borrow_and_update().local.name, "gw-1");

        // A burst of changes within the quiet time is one publication.
        let start = Instant::now();
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let ip = format!("10.0.0.{}", i + 1);
            let changed = shared
                .lock()
                .pods
                .apply(watcher::Event::Apply(pod(name, &ip, "web")), |p| {
                    PodFacts::from_pod(p, None)
                });
            assert!(changed);
            shared.dirty.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rx.changed().await.expect("published");
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert_eq!(rx.borrow_and_update().pods.len(), 3);

        // A wake-up without a visible change publishes nothing new.
        shared.dirty.notify_one();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!rx.has_changed().expect("open"));
        assert!(shared.connectivity.borrow().last_sync.is_some());
        task.abort();
    }

    #[tokio::test]
    async fn start_reports_what_it_waited_for_when_the_server_is_unreachable() {
        // Nothing listens on port 1 of the loopback: every request is refused.
        let path = std::env::temp_dir().join(format!("egress-kubeconfig-{}", std::process::id()));
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'http://127.0.0.1:1'}\n\
             users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
             current-context: x\n",
        )
        .expect("kubeconfig written");
        let client = client(Some(&path)).await.expect("client from kubeconfig");
        let _ = std::fs::remove_file(&path);
        let options = WatchOptions {
            kube_ovn: true,
            initial_sync_timeout: Duration::from_secs(2),
            ..WatchOptions::new("gw-1")
        };
        let Err(error) = start(client, options).await else {
            panic!("nothing can have been listed");
        };
        let text = error.to_string();
        assert!(
            text.contains("EgressGateway") && text.contains("Subnet"),
            "{text}"
        );
        assert!(
            text.contains("failed"),
            "the watchers' errors are named: {text}"
        );
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named() {
        let Err(error) = client(Some(Path::new("/nonexistent/kubeconfig"))).await else {
            panic!("no such file");
        };
        assert!(format!("{error:#}").contains("/nonexistent/kubeconfig"));
    }
}
