//! The fake API server driven by real kube-rs clients, watchers and
//! reflectors (no root needed).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_tests::apiserver::{FakeApiServer, Options};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, VersionMatch, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

const SECS_5: Duration = Duration::from_secs(5);

fn config_map(name: &str, labels: Value, data: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": data,
    }))
    .expect("a valid ConfigMap")
}

fn api_status(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv<K: Resource>(object: &K) -> u64 {
    object
        .meta()
        .resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .expect("a numeric resourceVersion")
}

/// Retries quickly, so that reconnects take milliseconds.
struct Quick;

impl Iterator for Quick {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }
}

impl kube::runtime::utils::Backoff for Quick {
    fn reset(&mut self) {}
}

#[tokio::test]
async fn config_maps_crud() {
    let server = FakeApiServer::start();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();

    let created = api
        .create(&pp, &config_map("a", json!({}), json!({"k": "1"})))
        .await
        .expect("created");
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    let duplicate = api
        .create(&pp, &config_map("a", json!({}), json!({})))
        .await
        .expect_err("a second create");
    assert_eq!(api_status(duplicate), (409, "AlreadyExists".into()));

    let got = api.get("a").await.expect("get");
    assert_eq!(got.data, created.data);
    let mut changed = got.clone();
    changed.data = Some([("k".to_string(), "2".to_string())].into());
    let replaced = api.replace("a", &pp, &changed).await.expect("replaced");
    assert!(rv(&replaced) > rv(&got));
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    let stale = api.replace("a", &pp, &got).await.expect_err("stale");
    assert_eq!(api_status(stale), (409, "Conflict".into()));

    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"extra": "x"}})),
        )
        .await
        .expect("merge patch");
    let data = patched.data.clone().unwrap_or_default();
    assert_eq!((data["k"].as_str(), data["extra"].as_str()), ("2", "x"));
    let conflicting = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"k": "3"}})),
        )
        .await
        .expect_err("a patch for an old version");
    assert_eq!(api_status(conflicting).0, 409);
    // A write that changes nothing makes no new version.
    let same = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"extra": "x"}})),
        )
        .await
        .expect("no-op patch");
    assert_eq!(rv(&same), rv(&patched));

    // Server-side apply creates a missing object.
    let applied = api
        .patch(
            "b",
            &PatchParams::apply("test").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"z": "1"}})),
        )
        .await
        .expect("apply");
    assert_eq!(applied.name_any(), "b");
    // JSON patch (RFC 6902), as kube-runtime's finalizer helper sends it.
    let json_patch = |operations: Value| {
        hyper::Request::patch("/api/v1/namespaces/default/configmaps/b")
            .header("content-type", "application/json-patch+json")
            .body(operations.to_string().into_bytes())
            .expect("a request")
    };
    let json_patched: ConfigMap = server
        .client()
        .request(json_patch(json!([
            {"op": "test", "path": "/data/z", "value": "1"},
            {"op": "replace", "path": "/data/z", "value": "2"},
        ])))
        .await
        .expect("JSON patch");
    assert_eq!(json_patched.data.unwrap_or_default()["z"], "2");
    let failed_test = server
        .client()
        .request::<ConfigMap>(json_patch(
            json!([{"op": "test", "path": "/data/z", "value": "1"}]),
        ))
        .await
        .expect_err("the test operation fails");
    assert_eq!(api_status(failed_test), (422, "Invalid".into()));
    // A dry run answers without storing.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    api.create(&dry, &config_map("dry", json!({}), json!({})))
        .await
        .expect("dry run");
    assert!(api.get_opt("dry").await.expect("get_opt").is_none());

    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(names, ["a", "b"]);

    let deleted = api
        .delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(deleted.is_right(), "deleted at once: a Status");
    assert!(api.get_opt("a").await.expect("get_opt").is_none());
    assert_eq!(
        api_status(api.get("a").await.expect_err("gone")),
        (404, "NotFound".into())
    );
    assert!(
        server
            .get("v1", "ConfigMap", Some("default"), "a")
            .is_none()
    );
    assert!(
        server
            .get("v1", "ConfigMap", Some("default"), "b")
            .is_some()
    );
}

#[tokio::test]
async fn pods_and_selectors() {
    let server = FakeApiServer::start();
    let client = server.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "tenant-a"}})).expect("namespace"),
        )
        .await
        .expect("namespace created");
    let pod = |name: &str, app: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": "node-1"},
            "status": {"podIP": "10.0.0.1"},
        }))
        .expect("a pod")
    };
    let tenant: Api<Pod> = Api::namespaced(client.clone(), "tenant-a");
    let pp = PostParams::default();
    let web = tenant.create(&pp, &pod("web", "web")).await.expect("web");
    assert!(
        web.status.is_none(),
        "status is written through /status only"
    );
    tenant.create(&pp, &pod("db", "db")).await.expect("db");
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&pp, &pod("web", "web"))
        .await
        .expect("web in default");
    let missing = Api::<Pod>::namespaced(client.clone(), "nowhere")
        .create(&pp, &pod("x", "web"))
        .await
        .expect_err("no such namespace");
    assert_eq!(api_status(missing), (404, "NotFound".into()));

    let names = |list: kube::core::ObjectList<Pod>| -> Vec<String> {
        list.iter()
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect()
    };
    let selected = |lp: ListParams| {
        let tenant = tenant.clone();
        async move { names(tenant.list(&lp).await.expect("list")) }
    };
    assert_eq!(
        selected(ListParams::default().labels("app=web")).await,
        ["tenant-a/web"]
    );
    assert_eq!(
        selected(ListParams::default().labels("app in (web,db)")).await,
        ["tenant-a/db", "tenant-a/web"]
    );
    assert_eq!(
        selected(ListParams::default().labels("app!=web")).await,
        ["tenant-a/db"]
    );
    assert_eq!(
        selected(ListParams::default().fields("metadata.name=db")).await,
        ["tenant-a/db"]
    );
    let everywhere: Api<Pod> = Api::all(client.clone());
    let all_web = everywhere
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list all namespaces");
    assert_eq!(names(all_web), ["default/web", "tenant-a/web"]);

    let scheduled = tenant
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"podIP": "10.0.0.7", "phase": "Running"}})),
        )
        .await
        .expect("status");
    assert_eq!(
        scheduled.status.and_then(|s| s.pod_ip).as_deref(),
        Some("10.0.0.7")
    );

    // Deleting a namespace deletes what is in it.
    namespaces
        .delete("tenant-a", &DeleteParams::default())
        .await
        .expect("namespace deleted");
    assert_eq!(
        names(everywhere.list(&ListParams::default()).await.expect("list")),
        ["default/web"]
    );
}

#[tokio::test]
async fn raw_watch_streams_events_in_order() {
    let server = FakeApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(100),
        ..Options::default()
    });
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let listed = api.list(&ListParams::default()).await.expect("list");
    let from = listed.metadata.resource_version.expect("a list version");
    let mut events = api
        .watch(&WatchParams::default().timeout(10), &from)
        .await
        .expect("watch")
        .boxed();
    let pp = PostParams::default();
    api.create(&pp, &config_map("a", json!({}), json!({"k": "1"})))
        .await
        .expect("create");
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .expect("patch");
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete");

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(SECS_5, events.try_next())
            .await
            .expect("an event in time")
            .expect("a good event")
            .expect("the stream goes on");
        match event {
            WatchEvent::Added(cm) => seen.push(("ADDED", rv(&cm), cm.data)),
            WatchEvent::Modified(cm) => seen.push(("MODIFIED", rv(&cm), cm.data)),
            WatchEvent::Deleted(cm) => seen.push(("DELETED", rv(&cm), cm.data)),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(status) => panic!("watch error {status:?}"),
        }
    }
    let kinds: Vec<&str> = seen.iter().map(|(kind, _, _)| *kind).collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    assert!(seen[0].1 < seen[1].1 && seen[1].1 < seen[2].1);
    assert_eq!(seen[2].1, server.resource_version());
    assert_eq!(seen[1].2, seen[2].2, "a deletion carries the last state");

    // A change this watch does not select still moves it on, by bookmark.
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "kube-system"}}));
    let bookmark = match tokio::time::timeout(SECS_5, events.try_next()).await {
        Ok(Ok(Some(WatchEvent::Bookmark(bookmark)))) => bookmark,
        other => panic!("expected a bookmark, got {other:?}"),
    };
    assert_eq!(bookmark.types.kind, "ConfigMap");
    assert_eq!(
        bookmark.metadata.resource_version,
        server.resource_version().to_string()
    );
}

#[tokio::test]
async fn label_selected_watches_see_objects_enter_and_leave() {
    let server = FakeApiServer::start();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut events = api
        .watch(&WatchParams::default().labels("app=web"), "0")
        .await
        .expect("watch")
        .boxed();
    for app in ["db", "web", "db"] {
        server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "labels": {"app": app}}}));
    }
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match tokio::time::timeout(SECS_5, events.try_next()).await {
            Ok(Ok(Some(WatchEvent::Added(_)))) => kinds.push("ADDED"),
            Ok(Ok(Some(WatchEvent::Deleted(_)))) => kinds.push("DELETED"),
            Ok(Ok(Some(WatchEvent::Bookmark(_)))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, ["ADDED", "DELETED"]);
}

#[tokio::test]
async fn watches_end_at_their_timeout() {
    let server = FakeApiServer::start();
    let api: Api<Namespace> = Api::all(server.client());
    let started = Instant::now();
    let events: Vec<_> = api
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .expect("watch")
        .collect()
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let added = events
        .iter()
        .filter(|e| matches!(e, Ok(WatchEvent::Added(_))))
        .count();
    assert_eq!(added, 4, "the namespaces a new cluster has: {events:?}");
}

#[tokio::test]
async fn watcher_and_reflector_follow_changes() {
    let server = FakeApiServer::start();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = Arc::clone(&seen);
    let task = tokio::spawn(
        reflector(
            writer,
            watcher(api.clone(), watcher::Config::default()).backoff(Quick),
        )
        .for_each(move |event| {
            let line = match event {
                Ok(watcher::Event::Apply(cm)) => format!(
                    "apply {} {:?}",
                    cm.name_any(),
                    cm.data.unwrap_or_default().get("k")
                ),
                Ok(watcher::Event::Delete(cm)) => format!("delete {}", cm.name_any()),
                Ok(watcher::Event::InitDone) => "listed".to_string(),
                Ok(_) => return futures::future::ready(()),
                Err(error) => format!("error {error}"),
            };
            record.lock().expect("lock").push(line);
            futures::future::ready(())
        }),
    );
    reader.wait_until_ready().await.expect("listed");

    api.create(
        &PostParams::default(),
        &config_map("a", json!({}), json!({"k": "1"})),
    )
    .await
    .expect("create");
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .expect("patch");
    let cached = server
        .wait_for(
            |_| reader.get(&reflector::ObjectRef::new("a").within("default")),
            SECS_5,
        )
        .await
        .expect("the reflector has it");
    assert!(rv(cached.as_ref()) >= 1);
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete");

    let expected = [
        "listed",
        "apply a Some(\"1\")",
        "apply a Some(\"2\")",
        "delete a",
    ];
    let got = server
        .wait_for(
            |_| {
                let seen = seen.lock().expect("lock").clone();
                (seen.len() >= expected.len()).then_some(seen)
            },
            SECS_5,
        )
        .await
        .expect("all events seen");
    assert_eq!(got, expected);
    assert!(reader.state().is_empty());
    task.abort();
}

/// The (namespace, name, resourceVersion) of every object.
fn identities<'a>(
    objects: impl IntoIterator<Item = &'a Value>,
) -> BTreeSet<(String, String, String)> {
    objects
        .into_iter()
        .map(|object| {
            let text = |pointer| {
                object
                    .pointer(pointer)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            (
                text("/metadata/namespace"),
                text("/metadata/name"),
                text("/metadata/resourceVersion"),
            )
        })
        .collect()
}

#[tokio::test]
async fn compaction_during_an_outage_forces_a_relist() {
    let server = FakeApiServer::start();
    for name in ["a", "b", "c"] {
        server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": "1"}}));
    }
    let api: Api<ConfigMap> = Api::all(server.client());
    let (reader, writer) = reflector::store::<ConfigMap>();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = Arc::clone(&log);
    let task = tokio::spawn(
        reflector(
            writer,
            watcher(api.clone(), watcher::Config::default()).backoff(Quick),
        )
        .for_each(move |event| {
            let line = match event {
                Ok(watcher::Event::Init) => "init".to_string(),
                Err(watcher::Error::WatchError(status)) => format!("watch error {}", status.code),
                Err(error) => format!("error {error}"),
                Ok(_) => return futures::future::ready(()),
            };
            record.lock().expect("lock").push(line);
            futures::future::ready(())
        }),
    );
    reader.wait_until_ready().await.expect("listed");
    let cached = || -> BTreeSet<(String, String, String)> {
        let objects: Vec<Value> = reader
            .state()
            .iter()
            .map(|cm| serde_json::to_value(cm.as_ref()).expect("JSON"))
            .collect();
        identities(&objects)
    };
    let stored = || identities(&server.list("v1", "ConfigMap", None));
    assert_eq!(cached(), stored());

    server.set_outage(true);
    assert!(api.list(&ListParams::default()).await.is_err(), "refused");
    assert!(server.delete("v1", "ConfigMap", Some("default"), "b"));
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"v": "2"}}));
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "d", "namespace": "kube-system"}}));
    server.compact();
    // Let the watcher find the server gone before it comes back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.set_outage(false);

    let synced = server
        .wait_for(|_| (cached() == stored()).then_some(()), SECS_5)
        .await;
    assert!(
        synced.is_some(),
        "cached {:?} != stored {:?}",
        cached(),
        stored()
    );
    let names: BTreeSet<String> = cached().into_iter().map(|(_, name, _)| name).collect();
    assert_eq!(names, ["a", "c", "d"].map(String::from).into());
    let log = log.lock().expect("lock").clone();
    assert!(
        log.iter().any(|line| line == "watch error 410"),
        "the resumed watch was told 410 Gone: {log:?}"
    );
    assert_eq!(
        log.iter().filter(|line| *line == "init").count(),
        2,
        "listed again after the 410: {log:?}"
    );
    task.abort();
}

#[tokio::test]
async fn status_is_a_subresource() {
    let server = FakeApiServer::start();
    server.register("example.com", "v1", "Widget", "widgets", true);
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let api: Api<DynamicObject> = Api::namespaced_with(server.client(), "default", &resource);
    let pp = PostParams::default();

    let widget = DynamicObject::new("w", &resource)
        .data(json!({"spec": {"size": 1}, "status": {"ready": true}}));
    let created = api.create(&pp, &widget).await.expect("created");
    assert_eq!(created.data["spec"]["size"], 1);
    assert!(created.data.get("status").is_none(), "create drops status");
    assert_eq!(created.metadata.generation, Some(1));

    let patched = api
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 99}, "status": {"ready": true, "egressIPs": ["192.0.2.1"]}})),
        )
        .await
        .expect("status patched");
    assert_eq!(patched.data["spec"]["size"], 1, "status writes ignore spec");
    assert_eq!(patched.data["status"]["ready"], true);
    assert_eq!(patched.metadata.generation, Some(1));
    assert!(rv(&patched) > rv(&created));

    let mut replacement = patched.clone();
    replacement.data["spec"]["size"] = json!(2);
    replacement.data["status"] = json!({"ready": false});
    let replaced = api.replace("w", &pp, &replacement).await.expect("replaced");
    assert_eq!(replaced.data["spec"]["size"], 2);
    assert_eq!(
        replaced.data["status"], patched.data["status"],
        "main writes ignore status"
    );
    assert_eq!(replaced.metadata.generation, Some(2), "spec changed");

    let merged = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}, "status": {"ready": false}})),
        )
        .await
        .expect("patched");
    assert_eq!(merged.data["status"]["ready"], true);
    assert_eq!(merged.metadata.generation, Some(2), "metadata only");

    let mut status_only = merged.clone();
    status_only.data["status"] = json!({"ready": false});
    status_only.data["spec"]["size"] = json!(7);
    let replaced_status = api
        .replace_status("w", &pp, &status_only)
        .await
        .expect("status replaced");
    assert_eq!(replaced_status.data["status"], json!({"ready": false}));
    assert_eq!(replaced_status.data["spec"]["size"], 2);
    let got = api.get_status("w").await.expect("get status");
    assert_eq!(got.data, replaced_status.data);
    assert_eq!(
        server
            .get("example.com/v1", "Widget", Some("default"), "w")
            .expect("stored")["status"],
        json!({"ready": false})
    );
}

#[tokio::test]
async fn lists_page_through_a_consistent_snapshot() {
    let server = FakeApiServer::start();
    for i in 0..5 {
        server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("c{i}")}, "data": {"v": "old"}}));
    }
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let first = api
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    let at = first.metadata.resource_version.clone().expect("a version");
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().expect("more to come");

    // Changes after the first page do not show in the later ones.
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c3"}, "data": {"v": "new"}}));
    assert!(server.delete("v1", "ConfigMap", Some("default"), "c4"));
    let mut items = first.items;
    let mut token = Some(token);
    while let Some(next) = token {
        let page = api
            .list(&ListParams::default().limit(2).continue_token(&next))
            .await
            .expect("next page");
        assert_eq!(page.metadata.resource_version.as_deref(), Some(at.as_str()));
        items.extend(page.items);
        token = page.metadata.continue_.filter(|t| !t.is_empty());
    }
    let seen: Vec<(String, String)> = items
        .iter()
        .map(|cm| {
            (
                cm.name_any(),
                cm.data.clone().unwrap_or_default()["v"].clone(),
            )
        })
        .collect();
    let old = |name: &str| (name.to_string(), "old".to_string());
    assert_eq!(
        seen,
        [old("c0"), old("c1"), old("c2"), old("c3"), old("c4")]
    );

    let exact = api
        .list(&ListParams::default().at(&at).matching(VersionMatch::Exact))
        .await
        .expect("list at a version");
    assert_eq!(exact.items.len(), 5);
    let now = api.list(&ListParams::default()).await.expect("list now");
    assert_eq!(now.items.len(), 4);

    server.compact();
    let expired = api
        .list(&ListParams::default().at(&at).matching(VersionMatch::Exact))
        .await
        .expect_err("compacted");
    assert_eq!(api_status(expired), (410, "Expired".into()));
}

#[tokio::test]
async fn finalizers_hold_deletion() {
    let server = FakeApiServer::start();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut held = config_map("held", json!({}), json!({}));
    held.metadata.finalizers = Some(vec!["example.com/cleanup".into()]);
    api.create(&PostParams::default(), &held)
        .await
        .expect("created");
    let pending = api
        .delete("held", &DeleteParams::default())
        .await
        .expect("delete");
    let terminating = pending.left().expect("still there");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("finalizer removed");
    assert!(api.get_opt("held").await.expect("get").is_none());
}

#[tokio::test]
async fn discovery_version_and_crds() {
    let server = FakeApiServer::start();
    let client = server.client();
    let version = client.apiserver_version().await.expect("version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "37")
    );

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Gadget", "plural": "gadgets", "singular": "gadget", "listKind": "GadgetList"},
            "scope": "Cluster",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}},
            }],
        },
    }))
    .expect("a CRD");
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("CRD created");
    tokio::time::timeout(
        SECS_5,
        kube::runtime::wait::await_condition(
            crds.clone(),
            "gadgets.example.com",
            kube::runtime::conditions::is_crd_established(),
        ),
    )
    .await
    .expect("in time")
    .expect("established");

    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Gadget");
    let (resource, capabilities) = discovery.resolve_gvk(&gvk).expect("Gadget is served");
    assert_eq!(resource.plural, "gadgets");
    assert_eq!(capabilities.scope, kube::discovery::Scope::Cluster);
    assert!(
        capabilities
            .subresources
            .iter()
            .any(|(sub, _)| sub.plural == "status")
    );
    let pods = GroupVersionKind::gvk("", "v1", "Pod");
    let (_, pod_capabilities) = discovery.resolve_gvk(&pods).expect("pods are served");
    assert_eq!(pod_capabilities.scope, kube::discovery::Scope::Namespaced);

    let gadgets: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    gadgets
        .create(
            &PostParams::default(),
            &DynamicObject::new("g", &resource).data(json!({"spec": {}})),
        )
        .await
        .expect("a gadget");
    assert_eq!(
        gadgets
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    crds.delete("gadgets.example.com", &DeleteParams::default())
        .await
        .expect("CRD deleted");
    let gone = gadgets
        .list(&ListParams::default())
        .await
        .expect_err("no longer served");
    assert_eq!(api_status(gone).0, 404);
}

#[tokio::test]
async fn kubeconfig_and_streaming_lists() {
    let server = FakeApiServer::start();
    let dir = std::env::temp_dir().join(format!("fake-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path);
    // Loaded as egress-agent loads `--kubeconfig`.
    let file = kube::config::Kubeconfig::read_from(&path).expect("readable");
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .expect("loadable");
    let _ = std::fs::remove_dir_all(&dir);
    let client = kube::Client::try_from(config).expect("client");

    let api: Api<Namespace> = Api::all(client);
    let (reader, writer) = reflector::store::<Namespace>();
    let task = tokio::spawn(
        reflector(
            writer,
            watcher(api, watcher::Config::default().streaming_lists()).backoff(Quick),
        )
        .for_each(|_| futures::future::ready(())),
    );
    tokio::time::timeout(SECS_5, reader.wait_until_ready())
        .await
        .expect("in time")
        .expect("listed by a streaming list");
    let mut names: Vec<String> = reader.state().iter().map(|ns| ns.name_any()).collect();
    names.sort();
    assert_eq!(
        names,
        ["default", "kube-node-lease", "kube-public", "kube-system"]
    );
    task.abort();
}

#[tokio::test]
async fn wait_for_sees_what_a_client_writes() {
    let server = FakeApiServer::start();
    server.register("example.com", "v1", "Widget", "widgets", true);
    server.apply(json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}));
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(server.client(), "default", &resource);
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        api.patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}})),
        )
        .await
        .expect("status written");
    });
    let ready = server
        .wait_for(
            |s| {
                s.get("example.com/v1", "Widget", Some("default"), "w")?
                    .pointer("/status/ready")?
                    .as_bool()
                    .filter(|ready| *ready)
            },
            SECS_5,
        )
        .await;
    assert_eq!(ready, Some(true));
    writer.await.expect("writer finished");
    assert!(
        server.requests().iter().any(
            |r| r.starts_with("PATCH /apis/example.com/v1/namespaces/default/widgets/w/status")
        ),
        "{:?}",
        server.requests()
    );
}

#[test]
fn usable_without_a_runtime() {
    fn shareable<T: Send + Sync>(_: &T) {}
    let server = FakeApiServer::start();
    shareable(&server);
    server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"zone": "a"}}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}));
    let node = server
        .wait_for_blocking(|s| s.get("v1", "Node", None, "n1"), SECS_5)
        .expect("stored");
    assert_eq!(
        node["status"]["addresses"][0]["address"], "192.0.2.10",
        "test-side writes keep status"
    );
    assert_eq!(server.list("v1", "Node", None).len(), 1);

    server.set_outage(true);
    assert!(
        std::net::TcpStream::connect(server.address()).is_err(),
        "refused"
    );
    server.set_outage(false);
    assert!(std::net::TcpStream::connect(server.address()).is_ok());
    assert!(server.delete("v1", "Node", None, "n1"));
    assert!(!server.delete("v1", "Node", None, "n1"));
    assert!(server.list("v1", "Node", None).is_empty());
}
