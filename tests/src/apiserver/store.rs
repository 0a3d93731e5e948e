//! The object store: every object as JSON, one global resourceVersion
//! counter (etcd's revision), and the bounded history of changes that
//! watches replay and old snapshots are rebuilt from.

use std::collections::{BTreeMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::select::Filter;

/// A kind the server serves: what discovery lists and paths resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// "" for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    pub kind: String,
    /// The lowercase plural in paths, e.g. "configmaps".
    pub plural: String,
    pub namespaced: bool,
    /// Whether `.status` is a subresource: then only `/status` writes it,
    /// and ordinary writes keep the stored status.
    pub status: bool,
}

impl ResourceType {
    pub fn new(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            status,
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn is_crd(&self) -> bool {
        self.group == "apiextensions.k8s.io" && self.plural == "customresourcedefinitions"
    }

    fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }

    fn same(&self, key: &Key) -> bool {
        self.group == key.group && self.version == key.version && self.plural == key.plural
    }
}

/// Where an object lives; cluster-scoped objects have namespace "".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(rt: &ResourceType, namespace: &str, name: &str) -> Self {
        Self {
            group: rt.group.clone(),
            version: rt.version.clone(),
            plural: rt.plural.clone(),
            namespace: if rt.namespaced {
                namespace.into()
            } else {
                String::new()
            },
            name: name.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as watches stream it.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub key: Key,
    pub kind: EventType,
    /// The object after the change; for a deletion its last state, carrying
    /// the deletion's resourceVersion as a real API server's does.
    pub object: Value,
    /// The object before the change (`None` for an addition): what a
    /// selector-filtered watch compares against, and how old snapshots are
    /// rebuilt.
    pub previous: Option<Value>,
}

/// A failure, answered as a Kubernetes `Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, rt: &ResourceType, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        self
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", rt.plural),
        )
        .about(rt, name)
    }

    pub fn path_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", rt.plural),
        )
        .about(rt, name)
    }

    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                rt.plural
            ),
        )
        .about(rt, name)
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn invalid(rt: &ResourceType, name: &str, message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message).about(rt, name)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {content_type}"),
        )
    }

    pub fn too_large_resource_version(rv: u64, current: u64) -> Self {
        Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {rv}, current: {current}"),
        )
    }

    /// The `Status` object a real API server sends for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

/// How a write is done.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// `dryRun=All`: everything is checked and answered, nothing stored.
    pub dry_run: bool,
    /// Test-side writes store `.status` as given, also for kinds with a
    /// status subresource, standing in for the controllers that own it.
    pub keep_status: bool,
}

/// What a delete did.
pub enum Deleted {
    /// The object is gone; this was its last state.
    Gone(Value),
    /// Finalizers hold it: it now has a deletionTimestamp.
    Pending(Value),
}

/// A page of a list, as asked for by the query.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

pub struct Store {
    types: Vec<ResourceType>,
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Event>,
    history_limit: usize,
    /// Watches and snapshots can start from any resourceVersion at or after
    /// this one: the history holds every change after it.
    oldest: u64,
    next_uid: u64,
}

impl Store {
    /// A store with the built-in kinds and the namespaces a new cluster has.
    pub fn new(history_limit: usize) -> Self {
        let mut store = Self {
            types: Vec::new(),
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            oldest: 0,
            next_uid: 0,
        };
        for rt in [
            ResourceType::new("", "v1", "Namespace", "namespaces", false, true),
            ResourceType::new("", "v1", "Node", "nodes", false, true),
            ResourceType::new("", "v1", "Pod", "pods", true, true),
            ResourceType::new("", "v1", "ConfigMap", "configmaps", true, false),
            ResourceType::new(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                false,
                true,
            ),
        ] {
            store.register(rt);
        }
        let namespaces = store.types[0].clone();
        for name in ["default", "kube-node-lease", "kube-public", "kube-system"] {
            let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}, "status": {"phase": "Active"}});
            let keep = WriteOptions {
                keep_status: true,
                ..WriteOptions::default()
            };
            // A fresh store has no namespaces that could clash.
            let _ = store.create(&namespaces, None, namespace, keep);
        }
        store
    }

    /// Adds a kind, or replaces the one with the same group, version and
    /// plural.
    pub fn register(&mut self, rt: ResourceType) {
        match self
            .types
            .iter_mut()
            .find(|t| t.group == rt.group && t.version == rt.version && t.plural == rt.plural)
        {
            Some(existing) => *existing = rt,
            None => self.types.push(rt),
        }
    }

    pub fn types(&self) -> &[ResourceType] {
        &self.types
    }

    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    }

    pub fn resource_for_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.api_version() == api_version && t.kind == kind)
    }

    pub fn serves(&self, group: &str, version: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.group == group && t.version == version)
    }

    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// Forgets the history, as an etcd compaction does: a watch or list that
    /// needs anything older than now gets 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.rv;
    }

    /// The changes after `rv` (all of them, if `rv >= oldest`).
    pub fn events_after(&self, rv: u64) -> impl Iterator<Item = &Event> {
        let start = self.history.partition_point(|event| event.rv <= rv);
        self.history.range(start..)
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The current objects of a kind that the filter selects, in
    /// (namespace, name) order.
    pub fn select(&self, rt: &ResourceType, filter: &Filter) -> Vec<Value> {
        self.current(rt)
            .filter(|(_, object)| filter.matches(object))
            .map(|(_, object)| object.clone())
            .collect()
    }

    fn current(&self, rt: &ResourceType) -> impl Iterator<Item = (&Key, &Value)> {
        let start = Key::new(rt, "", "");
        self.objects
            .range(start..)
            .take_while(move |(key, _)| rt.same(key))
    }

    /// The objects of a kind as they were at `rv`: the current ones with the
    /// later changes undone.
    fn snapshot(&self, rt: &ResourceType, rv: u64) -> Result<BTreeMap<Key, Value>, ApiError> {
        if rv > self.rv {
            return Err(ApiError::too_large_resource_version(rv, self.rv));
        }
        if rv < self.oldest {
            return Err(ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                self.oldest
            )));
        }
        let mut objects: BTreeMap<Key, Value> = self
            .current(rt)
            .map(|(key, object)| (key.clone(), object.clone()))
            .collect();
        for event in self.events_after(rv).collect::<Vec<_>>().into_iter().rev() {
            if !rt.same(&event.key) {
                continue;
            }
            match &event.previous {
                Some(previous) => objects.insert(event.key.clone(), previous.clone()),
                None => objects.remove(&event.key),
            };
        }
        Ok(objects)
    }

    /// A list response: `{kind: FooList, metadata: {resourceVersion,
    /// continue}, items}`.
    pub fn list(
        &self,
        rt: &ResourceType,
        filter: &Filter,
        query: &ListQuery,
    ) -> Result<Value, ApiError> {
        let (at, after) = match &query.continue_token {
            Some(token) => {
                let (at, namespace, name) = decode_continue(token)?;
                if at < self.oldest {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (at, Some(Key::new(rt, &namespace, &name)))
            }
            None => (self.list_version(query)?, None),
        };
        let objects = if at == self.rv {
            self.current(rt)
                .map(|(key, object)| (key.clone(), object.clone()))
                .collect()
        } else {
            self.snapshot(rt, at)?
        };
        let mut selected = objects.into_iter().filter(|(key, object)| {
            after.as_ref().is_none_or(|after| key > after) && filter.matches(object)
        });
        let limit = query.limit.filter(|limit| *limit > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last = None;
        for (key, object) in selected.by_ref().take(limit) {
            items.push(object);
            last = Some(key);
        }
        let remaining = selected.count();
        let mut metadata = json!({"resourceVersion": at.to_string()});
        if remaining > 0
            && let Some(last) = last
        {
            metadata["continue"] = json!(encode_continue(at, &last.namespace, &last.name));
            metadata["remainingItemCount"] = json!(remaining);
        }
        Ok(json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// The resourceVersion a list without a continue token is served at.
    fn list_version(&self, query: &ListQuery) -> Result<u64, ApiError> {
        let requested = match query.resource_version.as_deref() {
            None | Some("") | Some("0") => return Ok(self.rv),
            Some(text) => text
                .parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {text:?}")))?,
        };
        if requested > self.rv {
            return Err(ApiError::too_large_resource_version(requested, self.rv));
        }
        match query.resource_version_match.as_deref() {
            Some("Exact") => Ok(requested),
            // NotOlderThan, or unset: anything at least that new; the newest.
            _ => Ok(self.rv),
        }
    }

    pub fn create(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        mut object: Value,
        options: WriteOptions,
    ) -> Result<Value, ApiError> {
        let fields = object_fields(&mut object)?;
        check_type(rt, fields)?;
        let meta = metadata(fields);
        let namespace = if rt.namespaced {
            let own = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|ns| !ns.is_empty())
                .map(str::to_string);
            match (namespace, own) {
                (Some(path), Some(own)) if path != own => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (Some(path), _) => path.to_string(),
                (None, Some(own)) => own,
                (None, None) => return Err(ApiError::bad_request("a namespace is required")),
            }
        } else {
            String::new()
        };
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", random_suffix()),
                _ => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if rt.namespaced && !self.namespace_exists(&namespace) {
            return Err(ApiError::not_found(&self.types[0], &namespace));
        }
        let key = Key::new(rt, &namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }

        self.next_uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
        let now = now_rfc3339();
        for server_set in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            meta.remove(server_set);
        }
        meta.insert("name".into(), json!(name));
        if rt.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(now));
        meta.insert("generation".into(), json!(1));
        if rt.status && !options.keep_status {
            fields.remove("status");
        }
        if rt.is_crd() {
            crd_established(fields);
        }
        if options.dry_run {
            return Ok(object);
        }
        let stored = self.commit(key, object);
        if rt.is_crd() {
            self.register_crd(&stored);
        }
        Ok(stored)
    }

    /// A replace (PUT), or the result of a patch.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        key: &Key,
        mut object: Value,
        part: Part,
        options: WriteOptions,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.objects.get(key).cloned() else {
            return Err(ApiError::not_found(rt, &key.name));
        };
        let fields = object_fields(&mut object)?;
        check_type(rt, fields)?;
        let meta = metadata(fields);
        if let Some(name) = meta.get("name").and_then(Value::as_str)
            && name != key.name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                key.name
            )));
        }
        if rt.namespaced
            && let Some(namespace) = meta.get("namespace").and_then(Value::as_str)
            && !namespace.is_empty()
            && namespace != key.namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        // Optimistic concurrency: an update that names a resourceVersion
        // applies only to that version; one without applies to any.
        let old_rv = old.pointer("/metadata/resourceVersion").cloned();
        if let Some(rv) = meta.get("resourceVersion").and_then(Value::as_str)
            && !rv.is_empty()
            && Some(rv) != old_rv.as_ref().and_then(Value::as_str)
        {
            return Err(ApiError::conflict(
                rt,
                &key.name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }

        let new = match part {
            Part::Status => {
                let mut new = old.clone();
                match fields.remove("status") {
                    Some(status) => new["status"] = status,
                    None => {
                        object_fields(&mut new)?.remove("status");
                    }
                }
                new
            }
            Part::Main => {
                if rt.status && !options.keep_status {
                    match old.get("status") {
                        Some(status) => {
                            fields.insert("status".into(), status.clone());
                        }
                        None => {
                            fields.remove("status");
                        }
                    }
                }
                let meta = metadata(fields);
                for immutable in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                ] {
                    match old.pointer(&format!("/metadata/{immutable}")) {
                        Some(value) => meta.insert(immutable.into(), value.clone()),
                        None => meta.remove(immutable),
                    };
                }
                meta.remove("managedFields");
                meta.insert("name".into(), json!(key.name));
                if rt.namespaced {
                    meta.insert("namespace".into(), json!(key.namespace));
                }
                if spec_changed(rt, &old, &object) {
                    let generation = old
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    object["metadata"]["generation"] = json!(generation + 1);
                }
                object
            }
        };
        let mut new = new;
        new["metadata"]["resourceVersion"] = old_rv.unwrap_or(Value::Null);
        new["kind"] = json!(rt.kind);
        new["apiVersion"] = json!(rt.api_version());
        // A write that changes nothing is no change: no new
        // resourceVersion, no watch event (controllers rely on this to
        // settle).
        if new == old || options.dry_run {
            return Ok(new);
        }
        // Removing the last finalizer of an object being deleted deletes
        // it.
        let finalized =
            new.pointer("/metadata/deletionTimestamp").is_some() && finalizers(&new).is_empty();
        if finalized {
            return Ok(self.remove(rt, key, new));
        }
        let stored = self.commit(key.clone(), new);
        if rt.is_crd() {
            self.register_crd(&stored);
        }
        Ok(stored)
    }

    pub fn delete(
        &mut self,
        rt: &ResourceType,
        key: &Key,
        preconditions: &Value,
        options: WriteOptions,
    ) -> Result<Deleted, ApiError> {
        let Some(object) = self.objects.get(key).cloned() else {
            return Err(ApiError::not_found(rt, &key.name));
        };
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            let expected = preconditions.get(field).and_then(Value::as_str);
            let actual = object
                .pointer(&format!("/metadata/{field}"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if let Some(expected) = expected
                && expected != actual
            {
                return Err(ApiError::conflict(
                    rt,
                    &key.name,
                    &format!(
                        "Precondition failed: {what} in precondition: {expected}, {what} in object meta: {actual}"
                    ),
                ));
            }
        }
        if options.dry_run {
            return Ok(Deleted::Gone(object));
        }
        if !finalizers(&object).is_empty() {
            if object.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(Deleted::Pending(object));
            }
            let mut terminating = object;
            terminating["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            terminating["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            return Ok(Deleted::Pending(self.commit(key.clone(), terminating)));
        }
        Ok(Deleted::Gone(self.remove(rt, key, object)))
    }

    /// Deletes an object for good, with what depends on it: a namespace's
    /// objects, a CRD's kinds and objects. A real cluster's controllers do
    /// that over a while (respecting finalizers); here it is immediate.
    fn remove(&mut self, rt: &ResourceType, key: &Key, last: Value) -> Value {
        let dependents: Vec<Key> = if rt.is_namespace() {
            self.objects
                .keys()
                .filter(|k| !k.namespace.is_empty() && k.namespace == key.name)
                .cloned()
                .collect()
        } else if rt.is_crd() {
            let (group, plural) = crd_group_plural(&last);
            self.types
                .retain(|t| !(t.group == group && t.plural == plural));
            self.objects
                .keys()
                .filter(|k| k.group == group && k.plural == plural)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for dependent in dependents {
            if let Some(object) = self.objects.get(&dependent).cloned() {
                self.commit_delete(dependent, object);
            }
        }
        self.commit_delete(key.clone(), last)
    }

    fn namespace_exists(&self, namespace: &str) -> bool {
        self.objects
            .contains_key(&Key::new(&self.types[0], "", namespace))
    }

    /// Stores an object under the next resourceVersion and records the
    /// event.
    fn commit(&mut self, key: Key, object: Value) -> Value {
        self.record(key, object, false)
    }

    fn commit_delete(&mut self, key: Key, last: Value) -> Value {
        self.record(key, last, true)
    }

    fn record(&mut self, key: Key, mut object: Value, delete: bool) -> Value {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = if delete {
            self.objects.remove(&key)
        } else {
            self.objects.insert(key.clone(), object.clone())
        };
        let kind = match (delete, &previous) {
            (true, _) => EventType::Deleted,
            (false, Some(_)) => EventType::Modified,
            (false, None) => EventType::Added,
        };
        self.history.push_back(Event {
            rv,
            key,
            kind,
            object: object.clone(),
            previous,
        });
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest = dropped.rv;
            }
        }
        object
    }

    /// Serves the kinds a CRD defines, as the apiextensions server does.
    fn register_crd(&mut self, crd: &Value) {
        let (group, plural) = crd_group_plural(crd);
        let kind = crd
            .pointer("/spec/names/kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let namespaced = crd.pointer("/spec/scope").and_then(Value::as_str) != Some("Cluster");
        self.types
            .retain(|t| !(t.group == group && t.plural == plural));
        let versions = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for version in versions {
            if version.get("served").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let Some(name) = version.get("name").and_then(Value::as_str) else {
                continue;
            };
            let status = version.pointer("/subresources/status").is_some();
            self.register(ResourceType::new(
                &group, name, kind, &plural, namespaced, status,
            ));
        }
    }
}

fn object_fields(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))
}

/// The object's metadata map, created if missing.
fn metadata(fields: &mut Map<String, Value>) -> &mut Map<String, Value> {
    let meta = fields
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    match meta {
        Value::Object(map) => map,
        _ => unreachable!("made an object above"),
    }
}

/// The body must be of the path's kind (when it says); it is then stamped
/// with it.
fn check_type(rt: &ResourceType, fields: &mut Map<String, Value>) -> Result<(), ApiError> {
    let api_version = rt.api_version();
    for (field, expected) in [
        ("apiVersion", api_version.as_str()),
        ("kind", rt.kind.as_str()),
    ] {
        match fields.get(field).and_then(Value::as_str) {
            Some(given) if !given.is_empty() && given != expected => {
                return Err(ApiError::bad_request(format!(
                    "the {field} of the object ({given}) does not match the request ({expected})"
                )));
            }
            _ => {
                fields.insert(field.into(), json!(expected));
            }
        }
    }
    Ok(())
}

/// Whether anything besides metadata (and status, when it is a
/// subresource) changed: what bumps metadata.generation.
fn spec_changed(rt: &ResourceType, old: &Value, new: &Value) -> bool {
    let spec = |object: &Value| -> Map<String, Value> {
        object
            .as_object()
            .map(|fields| {
                fields
                    .iter()
                    .filter(|(k, _)| match k.as_str() {
                        "metadata" | "kind" | "apiVersion" => false,
                        "status" => !rt.status,
                        _ => true,
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    spec(old) != spec(new)
}

fn finalizers(object: &Value) -> Vec<Value> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn crd_group_plural(crd: &Value) -> (String, String) {
    let text = |pointer: &str| {
        crd.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (text("/spec/group"), text("/spec/names/plural"))
}

/// The status the apiextensions controller gives an accepted CRD (a real
/// one does so a moment after the create; here it is at once).
fn crd_established(fields: &mut Map<String, Value>) {
    let names = fields
        .get("spec")
        .and_then(|spec| spec.get("names"))
        .cloned()
        .unwrap_or(Value::Null);
    let stored: Vec<Value> = fields
        .get("spec")
        .and_then(|spec| spec.get("versions"))
        .and_then(Value::as_array)
        .map(|versions| {
            versions
                .iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let now = now_rfc3339();
    let condition = |kind: &str, reason: &str| json!({"type": kind, "status": "True", "reason": reason, "message": "", "lastTransitionTime": now});
    fields.insert(
        "status".into(),
        json!({
            "acceptedNames": names,
            "conditions": [condition("NamesAccepted", "NoConflicts"), condition("Established", "InitialNamesAccepted")],
            "storedVersions": stored,
        }),
    );
}

fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    json!([rv, namespace, name])
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Result<(u64, String, String), ApiError> {
    let invalid = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(invalid)?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let text = |i: usize| value.get(i).and_then(Value::as_str).map(str::to_string);
    match (value.get(0).and_then(Value::as_u64), text(1), text(2)) {
        (Some(rv), Some(namespace), Some(name)) => Ok((rv, namespace, name)),
        _ => Err(invalid()),
    }
}

/// Five characters from the alphabet Kubernetes uses for generateName.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}

/// Now as RFC 3339 in UTC with second precision, as Kubernetes writes
/// timestamps.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, "ns", "name:with:colons");
        assert_eq!(
            decode_continue(&token).expect("valid token"),
            (42, "ns".into(), "name:with:colons".into())
        );
        assert!(decode_continue("zz").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
    }

    #[test]
    fn snapshots_undo_later_changes() {
        let mut store = Store::new(100);
        let rt = store
            .resource("", "v1", "configmaps")
            .expect("built in")
            .clone();
        let cm = |data: &str| json!({"metadata": {"name": "a", "namespace": "default"}, "data": {"k": data}});
        let options = WriteOptions::default();
        store.create(&rt, None, cm("1"), options).expect("created");
        let at = store.rv();
        let key = Key::new(&rt, "default", "a");
        store
            .update(&rt, &key, cm("2"), Part::Main, options)
            .expect("updated");
        let then = store.snapshot(&rt, at).expect("in history");
        assert_eq!(then[&key]["data"]["k"], "1");
        assert_eq!(then[&key]["metadata"]["resourceVersion"], at.to_string());
        store.compact();
        assert_eq!(store.snapshot(&rt, at).map(|_| ()).unwrap_err().code, 410);
    }
}
