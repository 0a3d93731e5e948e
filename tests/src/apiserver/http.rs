//! The HTTP side: paths to resources, verbs to store operations, discovery
//! documents, and watch streams (chunked newline-delimited JSON events).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Shared;
use super::patch::{json_patch, merge_patch};
use super::select::Filter;
use super::store::{
    ApiError, Deleted, Event, EventType, Key, ListQuery, Part, ResourceType, Store, WriteOptions,
};

pub type ResponseBody = Either<Full<Bytes>, WatchBody>;

/// Answers one request; every failure is a `Status` response.
pub async fn serve(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    let response = match request.into_body().collect().await {
        Ok(body) => {
            let call = Call {
                method: &method,
                path: uri.path(),
                query: &Query::parse(uri.query().unwrap_or("")),
                content_type: &content_type,
                body: &body.to_bytes(),
            };
            route(&shared, &call).unwrap_or_else(|error| failure(&error))
        }
        Err(error) => failure(&ApiError::bad_request(format!(
            "reading the request body: {error}"
        ))),
    };
    shared.log(format!("{method} {uri} {}", response.status().as_u16()));
    Ok(response)
}

struct Call<'a> {
    method: &'a Method,
    path: &'a str,
    query: &'a Query,
    content_type: &'a str,
    body: &'a [u8],
}

impl Call<'_> {
    fn json(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(self.body)
            .map_err(|error| ApiError::bad_request(format!("the body is not valid JSON: {error}")))
    }

    fn options(&self) -> WriteOptions {
        WriteOptions {
            dry_run: self.query.get("dryRun") == Some("All"),
            keep_status: false,
        }
    }

    fn filter(&self, namespace: Option<String>) -> Result<Filter, ApiError> {
        Filter::new(
            namespace,
            self.query.get("labelSelector"),
            self.query.get("fieldSelector"),
        )
    }
}

enum Target {
    Discovery,
    Collection {
        rt: ResourceType,
        namespace: Option<String>,
    },
    Object {
        rt: ResourceType,
        key: Key,
        part: Part,
    },
}

fn route(shared: &Arc<Shared>, call: &Call) -> Result<Response<ResponseBody>, ApiError> {
    let segments: Vec<&str> = call.path.split('/').filter(|s| !s.is_empty()).collect();
    let document = |value: Option<Value>| match (call.method, value) {
        (&Method::GET, Some(value)) => Ok(reply(StatusCode::OK, &value)),
        (&Method::GET, None) => Err(ApiError::path_not_found()),
        _ => Err(ApiError::method_not_allowed()),
    };
    match segments.as_slice() {
        ["version"] => document(Some(version_info())),
        ["api"] => document(Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.address.to_string()}
            ],
        }))),
        ["apis"] => document(Some(shared.read(group_list))),
        ["apis", group] => document(shared.read(|store| api_group(store, group))),
        ["api", version, rest @ ..] => resource_call(shared, call, "", version, rest),
        ["apis", group, version, rest @ ..] => resource_call(shared, call, group, version, rest),
        _ => Err(ApiError::path_not_found()),
    }
}

fn resource_call(
    shared: &Arc<Shared>,
    call: &Call,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Response<ResponseBody>, ApiError> {
    match shared.read(|store| resolve(store, group, version, rest))? {
        Target::Discovery if call.method == Method::GET => Ok(reply(
            StatusCode::OK,
            &shared.read(|store| resource_list(store, group, version)),
        )),
        Target::Discovery => Err(ApiError::method_not_allowed()),
        Target::Collection { rt, namespace } => collection(shared, call, &rt, namespace),
        Target::Object { rt, key, part } => object(shared, call, &rt, &key, part),
    }
}

/// `[namespaces/{ns}/]{plural}[/{name}[/status]]` within a group version.
fn resolve(store: &Store, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    if !store.serves(group, version) {
        return Err(ApiError::path_not_found());
    }
    let found = |plural: &str| store.resource(group, version, plural).cloned();
    // `namespaces/x/...` is a namespaced resource in namespace x unless the
    // next segment is not one, as in `/api/v1/namespaces/x/status`.
    let (rt, namespace, tail) = match rest {
        [] => return Ok(Target::Discovery),
        ["namespaces", namespace, plural, tail @ ..]
            if found(plural).is_some_and(|rt| rt.namespaced) =>
        {
            (found(plural), Some(namespace.to_string()), tail)
        }
        [plural, tail @ ..] => (found(plural), None, tail),
    };
    let rt = rt.ok_or_else(ApiError::path_not_found)?;
    // A namespaced object can only be addressed within its namespace.
    let addressable = !rt.namespaced || namespace.is_some();
    let object = |name: &str, part| {
        let key = Key::new(&rt, namespace.as_deref().unwrap_or(""), name);
        Ok(Target::Object {
            rt: rt.clone(),
            key,
            part,
        })
    };
    match tail {
        [] => Ok(Target::Collection {
            rt: rt.clone(),
            namespace,
        }),
        [name] if addressable => object(name, Part::Main),
        [name, "status"] if addressable && rt.status => object(name, Part::Status),
        _ => Err(ApiError::path_not_found()),
    }
}

fn collection(
    shared: &Arc<Shared>,
    call: &Call,
    rt: &ResourceType,
    namespace: Option<String>,
) -> Result<Response<ResponseBody>, ApiError> {
    match *call.method {
        Method::GET if call.query.flag("watch") => watch(shared, call, rt, namespace),
        Method::GET => {
            let filter = call.filter(namespace)?;
            let query = ListQuery {
                resource_version: call.query.get("resourceVersion").map(str::to_string),
                resource_version_match: call.query.get("resourceVersionMatch").map(str::to_string),
                limit: call.query.get("limit").and_then(|limit| limit.parse().ok()),
                continue_token: call
                    .query
                    .get("continue")
                    .filter(|token| !token.is_empty())
                    .map(str::to_string),
            };
            let list = shared.read(|store| store.list(rt, &filter, &query))?;
            Ok(reply(StatusCode::OK, &list))
        }
        // Creating and deleting namespaced objects needs their namespace.
        _ if rt.namespaced && namespace.is_none() => Err(ApiError::method_not_allowed()),
        Method::POST => {
            let object = call.json()?;
            let options = call.options();
            let created =
                shared.write(|store| store.create(rt, namespace.as_deref(), object, options))?;
            Ok(reply(StatusCode::CREATED, &created))
        }
        Method::DELETE => {
            let filter = call.filter(namespace)?;
            let options = call.options();
            let items = shared.write(|store| {
                let names: Vec<Key> = store
                    .select(rt, &filter)
                    .iter()
                    .map(|object| {
                        let text = |pointer| object.pointer(pointer).and_then(Value::as_str);
                        Key::new(
                            rt,
                            text("/metadata/namespace").unwrap_or(""),
                            text("/metadata/name").unwrap_or(""),
                        )
                    })
                    .collect();
                names
                    .iter()
                    .filter_map(|key| match store.delete(rt, key, &Value::Null, options) {
                        Ok(Deleted::Gone(object) | Deleted::Pending(object)) => Some(object),
                        Err(_) => None,
                    })
                    .collect::<Vec<_>>()
            });
            let list = json!({
                "kind": format!("{}List", rt.kind),
                "apiVersion": rt.api_version(),
                "metadata": {"resourceVersion": shared.read(Store::rv).to_string()},
                "items": items,
            });
            Ok(reply(StatusCode::OK, &list))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn object(
    shared: &Arc<Shared>,
    call: &Call,
    rt: &ResourceType,
    key: &Key,
    part: Part,
) -> Result<Response<ResponseBody>, ApiError> {
    let options = call.options();
    match (call.method, part) {
        (&Method::GET, _) => {
            let object = shared
                .read(|store| store.get(key).cloned())
                .ok_or_else(|| ApiError::not_found(rt, &key.name))?;
            Ok(reply(StatusCode::OK, &object))
        }
        (&Method::PUT, _) => {
            let object = call.json()?;
            let updated = shared.write(|store| store.update(rt, key, object, part, options))?;
            Ok(reply(StatusCode::OK, &updated))
        }
        (&Method::PATCH, _) => patch(shared, call, rt, key, part),
        (&Method::DELETE, Part::Main) => {
            // DeleteOptions are optional; only their preconditions matter
            // here (deletion is immediate, without grace periods).
            let options_body: Value = serde_json::from_slice(call.body).unwrap_or(Value::Null);
            let preconditions = options_body
                .get("preconditions")
                .cloned()
                .unwrap_or(Value::Null);
            match shared.write(|store| store.delete(rt, key, &preconditions, options))? {
                Deleted::Gone(object) => Ok(reply(
                    StatusCode::OK,
                    &json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {
                            "name": key.name,
                            "group": rt.group,
                            "kind": rt.plural,
                            "uid": object.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
                        },
                    }),
                )),
                Deleted::Pending(object) => Ok(reply(StatusCode::ACCEPTED, &object)),
            }
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// Merge, strategic merge and server-side apply patches are all applied
/// as JSON merge patches (so apply does not remove fields a manager stopped
/// setting, and strategic merge replaces lists instead of merging them by
/// key); JSON patches as RFC 6902. Apply creates a missing object.
fn patch(
    shared: &Arc<Shared>,
    call: &Call,
    rt: &ResourceType,
    key: &Key,
    part: Part,
) -> Result<Response<ResponseBody>, ApiError> {
    let media_type = call
        .content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let apply = media_type == "application/apply-patch+yaml";
    let merge = apply
        || media_type == "application/merge-patch+json"
        || media_type == "application/strategic-merge-patch+json";
    if !merge && media_type != "application/json-patch+json" {
        return Err(ApiError::unsupported_media_type(call.content_type));
    }
    // kube-rs sends apply patches as JSON, which is also YAML; YAML proper
    // is not parsed.
    let patch = call.json()?;
    let options = call.options();
    let (code, object) = shared.write(|store| {
        let Some(mut object) = store.get(key).cloned() else {
            if !(apply && part == Part::Main) {
                return Err(ApiError::not_found(rt, &key.name));
            }
            let mut object = patch;
            if object.pointer("/metadata/name").is_none() && object.is_object() {
                object["metadata"]["name"] = json!(key.name);
            }
            let namespace = rt.namespaced.then_some(key.namespace.as_str());
            return Ok((
                StatusCode::CREATED,
                store.create(rt, namespace, object, options)?,
            ));
        };
        if merge {
            merge_patch(&mut object, &patch);
        } else {
            json_patch(&mut object, &patch).map_err(|why| ApiError::invalid(rt, &key.name, why))?;
        }
        Ok((
            StatusCode::OK,
            store.update(rt, key, object, part, options)?,
        ))
    })?;
    Ok(reply(code, &object))
}

/// Parameters of one watch request.
struct WatchRequest {
    rt: ResourceType,
    filter: Filter,
    /// Replay the changes after this resourceVersion; `None` (unset or "0")
    /// starts with the current objects as ADDED events.
    after: Option<u64>,
    /// `sendInitialEvents`: the current objects, then a bookmark marking
    /// their end (the streaming-list protocol).
    initial_events: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
}

fn watch(
    shared: &Arc<Shared>,
    call: &Call,
    rt: &ResourceType,
    namespace: Option<String>,
) -> Result<Response<ResponseBody>, ApiError> {
    let after = match call.query.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {text:?}")))?,
        ),
    };
    let timeout = match call.query.get("timeoutSeconds") {
        None => None,
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {text:?}")))?,
        ),
    };
    let request = WatchRequest {
        rt: rt.clone(),
        filter: call.filter(namespace)?,
        after,
        initial_events: call.query.flag("sendInitialEvents"),
        bookmarks: call.query.flag("allowWatchBookmarks"),
        timeout: timeout.filter(|t| *t > 0).map(Duration::from_secs),
    };
    // The starting point is fixed before the response goes out, as a real
    // server's is: whatever a client writes after seeing the 200 reaches it
    // as an event.
    let changes = shared.changes.subscribe();
    let opening = shared.read(|store| opening(store, &request));
    let (sender, receiver) = mpsc::channel(256);
    tokio::spawn(stream_events(
        Arc::clone(shared),
        request,
        changes,
        opening,
        sender,
    ));
    let mut response = Response::new(Either::Right(WatchBody(receiver)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Where a watch starts: the resourceVersion after which changes are
/// streamed, and the events sent before them.
fn opening(store: &Store, request: &WatchRequest) -> Result<(u64, Vec<Value>), ApiError> {
    match request.after {
        Some(rv) if !request.initial_events => {
            if rv < store.oldest() {
                Err(too_old(rv, store.oldest()))
            } else {
                Ok((rv, Vec::new()))
            }
        }
        _ => Ok((
            store.rv(),
            store
                .select(&request.rt, &request.filter)
                .into_iter()
                .map(|object| json!({"type": "ADDED", "object": object}))
                .collect(),
        )),
    }
}

/// Feeds one watch stream until its timeout, its client leaves, or it
/// falls behind the history (410 Gone, as an ERROR event: a watch that
/// cannot resume is answered with 200 and then the error, which is what
/// makes clients relist rather than retry the same watch).
async fn stream_events(
    shared: Arc<Shared>,
    request: WatchRequest,
    mut changes: tokio::sync::watch::Receiver<u64>,
    opening: Result<(u64, Vec<Value>), ApiError>,
    sender: mpsc::Sender<Bytes>,
) {
    let rt = &request.rt;
    let (mut cursor, mut opening) = match opening {
        Ok(opening) => opening,
        Err(error) => {
            send(&sender, &json!({"type": "ERROR", "object": error.status()})).await;
            return;
        }
    };
    if request.initial_events {
        opening.push(bookmark(rt, cursor, true));
    }
    for event in &opening {
        if !send(&sender, event).await {
            return;
        }
    }
    // The newest resourceVersion the client has been told of.
    let mut told = cursor;
    let deadline = request.timeout.map(|timeout| Instant::now() + timeout);
    let every = shared.bookmark_interval;
    let mut bookmarks = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        changes.borrow_and_update();
        let batch = shared.read(|store| {
            if cursor < store.oldest() {
                return Err(too_old(cursor, store.oldest()));
            }
            let events: Vec<(u64, Value)> = store
                .events_after(cursor)
                .filter_map(|event| translate(rt, &request.filter, event))
                .collect();
            Ok((store.rv(), events))
        });
        match batch {
            Ok((rv, events)) => {
                cursor = rv;
                for (rv, event) in events {
                    if !send(&sender, &event).await {
                        return;
                    }
                    told = rv;
                }
            }
            Err(error) => {
                send(&sender, &json!({"type": "ERROR", "object": error.status()})).await;
                return;
            }
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = bookmarks.tick(), if request.bookmarks => {
                // Tells a client whose selector matched nothing lately how
                // far it is, so that it resumes from there.
                if cursor > told {
                    if !send(&sender, &bookmark(rt, cursor, false)).await {
                        return;
                    }
                    told = cursor;
                }
            }
            () = until(deadline) => return,
            () = sender.closed() => return,
        }
    }
}

/// The event a filtered watch sees for a change: objects entering or
/// leaving the selection are ADDED or DELETED, as in Kubernetes.
fn translate(rt: &ResourceType, filter: &Filter, event: &Event) -> Option<(u64, Value)> {
    if event.key.group != rt.group
        || event.key.version != rt.version
        || event.key.plural != rt.plural
    {
        return None;
    }
    let now = filter.matches(&event.object);
    let before = event
        .previous
        .as_ref()
        .is_some_and(|previous| filter.matches(previous));
    let kind = match (event.kind, before, now) {
        (EventType::Added, _, true) => "ADDED",
        (EventType::Modified, true, true) => "MODIFIED",
        (EventType::Modified, false, true) => "ADDED",
        (EventType::Modified, true, false) => "DELETED",
        (EventType::Deleted, true, _) | (EventType::Deleted, _, true) => "DELETED",
        _ => return None,
    };
    Some((event.rv, json!({"type": kind, "object": event.object})))
}

/// A BOOKMARK carries only kind, apiVersion and metadata.resourceVersion.
fn bookmark(rt: &ResourceType, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({
        "type": "BOOKMARK",
        "object": {"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata},
    })
}

fn too_old(rv: u64, oldest: u64) -> ApiError {
    ApiError::expired(format!("too old resource version: {rv} ({oldest})"))
}

async fn send(sender: &mpsc::Sender<Bytes>, event: &Value) -> bool {
    let mut line = event.to_string();
    line.push('\n');
    sender.send(Bytes::from(line)).await.is_ok()
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A watch response body: lines as the watch task sends them; it ends when
/// the task drops its sender.
pub struct WatchBody(mpsc::Receiver<Bytes>);

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|line| Ok(Frame::data(line))))
    }
}

fn reply(code: StatusCode, value: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(value.to_string()))));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn failure(error: &ApiError) -> Response<ResponseBody> {
    reply(
        StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &error.status(),
    )
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "37",
        "gitVersion": "v1.37.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "none",
        "compiler": "none",
        "platform": "linux/amd64",
    })
}

/// Each named group with its versions, in registration order (the first is
/// the preferred one).
fn groups(store: &Store) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for rt in store.types().iter().filter(|rt| !rt.group.is_empty()) {
        match groups.iter_mut().find(|(name, _)| *name == rt.group) {
            Some((_, versions)) if versions.contains(&rt.version) => {}
            Some((_, versions)) => versions.push(rt.version.clone()),
            None => groups.push((rt.group.clone(), vec![rt.version.clone()])),
        }
    }
    groups
}

fn group_document(name: &str, versions: &[String]) -> Value {
    let version = |v: &String| json!({"groupVersion": format!("{name}/{v}"), "version": v});
    json!({
        "name": name,
        "versions": versions.iter().map(version).collect::<Vec<_>>(),
        "preferredVersion": versions.first().map(version),
    })
}

fn group_list(store: &Store) -> Value {
    let groups: Vec<Value> = groups(store)
        .iter()
        .map(|(name, versions)| group_document(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn api_group(store: &Store, group: &str) -> Option<Value> {
    let (name, versions) = groups(store).into_iter().find(|(name, _)| name == group)?;
    let mut document = group_document(&name, &versions);
    document["kind"] = json!("APIGroup");
    document["apiVersion"] = json!("v1");
    Some(document)
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for rt in store
        .types()
        .iter()
        .filter(|rt| rt.group == group && rt.version == version)
    {
        resources.push(json!({
            "name": rt.plural,
            "singularName": rt.kind.to_lowercase(),
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        }));
        if rt.status {
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

/// A decoded query string.
pub struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Self(
            raw.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// `application/x-www-form-urlencoded` decoding, as Go's url.ParseQuery.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || {
            text.get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        };
        match (bytes[i], hex()) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        let query = Query::parse("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1&x");
        assert_eq!(query.get("labelSelector"), Some("app=web,tier in (a)"));
        assert!(query.flag("watch"));
        assert_eq!(query.get("x"), Some(""));
        assert_eq!(query.get("y"), None);
    }

    #[test]
    fn paths_resolve_to_resources() {
        let store = Store::new(10);
        let kind = |path: &str| {
            let rest: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            match resolve(&store, "", "v1", &rest) {
                Ok(Target::Discovery) => "discovery".to_string(),
                Ok(Target::Collection { rt, namespace }) => {
                    format!("{} in {namespace:?}", rt.plural)
                }
                Ok(Target::Object { rt, key, part }) => {
                    format!("{} {}/{} {part:?}", rt.plural, key.namespace, key.name)
                }
                Err(error) => error.code.to_string(),
            }
        };
        assert_eq!(kind(""), "discovery");
        assert_eq!(kind("pods"), "pods in None");
        assert_eq!(kind("namespaces/a/pods"), "pods in Some(\"a\")");
        assert_eq!(kind("namespaces/a/pods/p/status"), "pods a/p Status");
        assert_eq!(kind("namespaces/a"), "namespaces /a Main");
        assert_eq!(kind("namespaces/a/status"), "namespaces /a Status");
        assert_eq!(kind("pods/p"), "404");
        assert_eq!(kind("namespaces/a/configmaps/c/status"), "404");
        assert_eq!(kind("widgets"), "404");
    }
}
