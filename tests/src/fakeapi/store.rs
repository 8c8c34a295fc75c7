//! The object store: one collection per resource kind, objects as JSON keyed by
//! (namespace, name), one global resourceVersion counter (as etcd's revision), and a
//! bounded history of changes per collection from which watches are served.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::FakeApiError;

/// A resource kind the server knows: where it lives in the URL space and how it looks.
#[derive(Debug)]
pub(crate) struct ResourceKind {
    /// The URL path segment and the collection's name in the public API (`services`).
    pub(crate) plural: &'static str,
    /// API group; empty for the core group (`/api/v1`).
    pub(crate) group: &'static str,
    pub(crate) version: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) namespaced: bool,
    /// Whether the kind has a `status` subresource that PATCH may target.
    pub(crate) has_status: bool,
    /// Field selector labels beyond `metadata.name` and `metadata.namespace`, as the API
    /// server registers them for the kind.
    pub(crate) field_labels: &'static [&'static str],
}

impl ResourceKind {
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Every kind the agent lists and watches.
pub(crate) const KINDS: &[ResourceKind] = &[
    ResourceKind {
        plural: "services",
        group: "",
        version: "v1",
        kind: "Service",
        namespaced: true,
        has_status: true,
        field_labels: &["spec.clusterIP", "spec.type"],
    },
    ResourceKind {
        plural: "pods",
        group: "",
        version: "v1",
        kind: "Pod",
        namespaced: true,
        has_status: true,
        field_labels: &[
            "spec.nodeName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
        ],
    },
    ResourceKind {
        plural: "namespaces",
        group: "",
        version: "v1",
        kind: "Namespace",
        namespaced: false,
        has_status: true,
        field_labels: &["status.phase"],
    },
    ResourceKind {
        plural: "endpointslices",
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        namespaced: true,
        has_status: false,
        field_labels: &[],
    },
    ResourceKind {
        plural: "authorizationpolicies",
        group: "mycel.dev",
        version: "v1alpha1",
        kind: "AuthorizationPolicy",
        namespaced: true,
        has_status: true,
        field_labels: &[],
    },
];

pub(crate) fn index_by_plural(plural: &str) -> Option<usize> {
    KINDS.iter().position(|k| k.plural == plural)
}

#[cfg(test)]
pub(crate) fn kind_by_plural(plural: &str) -> Option<&'static ResourceKind> {
    index_by_plural(plural).map(|i| &KINDS[i])
}

pub(crate) fn index_by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)
}

fn index_by_type(api_version: &str, kind: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| k.api_version() == api_version && k.kind == kind)
}

/// (namespace, name); the namespace is empty for cluster-scoped kinds. Ordered as etcd
/// orders its keys, so that lists come out in the API server's order.
pub(crate) type Key = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of a collection's history.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) kind: ChangeType,
    /// The object after the change (for a deletion: its last state, carrying the
    /// deletion's resourceVersion, as the API server sends it).
    pub(crate) object: Arc<Value>,
    /// The object before a modification: a watch with a selector turns a modification
    /// into ADDED or DELETED when the object starts or stops matching.
    pub(crate) previous: Option<Arc<Value>>,
}

#[derive(Debug, Default)]
pub(crate) struct Collection {
    pub(crate) objects: BTreeMap<Key, Arc<Value>>,
    /// Changes in resourceVersion order.
    pub(crate) history: VecDeque<Change>,
    /// Every change after this resourceVersion is in `history`; a watch from an older
    /// version has expired (410).
    pub(crate) oldest_rv: u64,
}

#[derive(Debug)]
pub(crate) struct Store {
    /// The last resourceVersion handed out, across all collections.
    pub(crate) rv: u64,
    uids: u64,
    pub(crate) collections: Vec<Collection>,
    pub(crate) history_limit: usize,
}

/// Changes kept per collection by default: enough for every object of the scale
/// benchmark to be created and then modified many times without a watch expiring.
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 50_000;

impl Store {
    pub(crate) fn new() -> Self {
        Self {
            // resourceVersion "0" means "any version" to the API, so real versions start
            // above it.
            rv: 1,
            uids: 0,
            collections: KINDS
                .iter()
                .map(|_| Collection {
                    oldest_rv: 1,
                    ..Collection::default()
                })
                .collect(),
            history_limit: DEFAULT_HISTORY_LIMIT,
        }
    }

    /// Creates or replaces the object. Returns its resourceVersion; an object equal to
    /// the stored one (ignoring server-set metadata) changes nothing and emits nothing,
    /// as an update without changes does in Kubernetes.
    pub(crate) fn apply(&mut self, mut value: Value) -> Result<u64, FakeApiError> {
        let (idx, key) = identify(&mut value)?;
        let now = timestamp();
        let old = self.collections[idx].objects.get(&key).cloned();
        let metadata = metadata_mut(&mut value)?;
        // A uid given on create is kept (tests name a pod's cgroup after it, as kubelet
        // does); the API server would assign its own.
        let given_uid = metadata
            .get("uid")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .map(str::to_owned);
        for server_set in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
            metadata.remove(server_set);
        }
        let (kind, generation) = match &old {
            None => {
                self.uids += 1;
                let uid = given_uid.unwrap_or_else(|| uid(self.uids));
                metadata.insert("uid".into(), Value::String(uid));
                metadata.insert("creationTimestamp".into(), Value::String(now));
                (ChangeType::Added, 1)
            }
            Some(old) => {
                let old_meta = old.get("metadata").and_then(Value::as_object);
                for kept in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
                    if let Some(v) = old_meta.and_then(|m| m.get(kept)) {
                        metadata.insert(kept.into(), v.clone());
                    }
                }
                if value == **old {
                    return Ok(resource_version_of(old));
                }
                let old_generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                // Kubernetes bumps metadata.generation when the desired state changes,
                // not for metadata or status updates.
                let generation = if without_meta_and_status(&value) != without_meta_and_status(old)
                {
                    old_generation + 1
                } else {
                    old_generation
                };
                (ChangeType::Modified, generation)
            }
        };
        self.rv += 1;
        let rv = self.rv;
        let metadata = metadata_mut(&mut value)?;
        metadata.insert("generation".into(), Value::from(generation));
        metadata.insert("resourceVersion".into(), Value::String(rv.to_string()));
        let object = Arc::new(value);
        self.collections[idx]
            .objects
            .insert(key, Arc::clone(&object));
        self.record(
            idx,
            Change {
                rv,
                kind,
                object,
                previous: old,
            },
        );
        Ok(rv)
    }

    /// Deletes the object; returns the deletion's resourceVersion, or None if it did not
    /// exist.
    pub(crate) fn delete(&mut self, idx: usize, key: &Key) -> Option<u64> {
        let old = self.collections[idx].objects.remove(key)?;
        self.rv += 1;
        let rv = self.rv;
        let mut last = (*old).clone();
        if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        self.record(
            idx,
            Change {
                rv,
                kind: ChangeType::Deleted,
                object: Arc::new(last),
                previous: Some(old),
            },
        );
        Some(rv)
    }

    /// Replaces the object's `status` (None removes it). Returns the object as stored
    /// afterwards, or None if there is no such object. An unchanged status is a no-op.
    pub(crate) fn set_status(
        &mut self,
        idx: usize,
        key: &Key,
        status: Option<Value>,
    ) -> Option<Arc<Value>> {
        let old = self.collections[idx].objects.get(key)?.clone();
        if old.get("status") == status.as_ref() {
            return Some(old);
        }
        let mut value = (*old).clone();
        let object = value.as_object_mut()?;
        match status {
            Some(s) => object.insert("status".into(), s),
            None => object.remove("status"),
        };
        self.rv += 1;
        let rv = self.rv;
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let object = Arc::new(value);
        self.collections[idx]
            .objects
            .insert(key.clone(), Arc::clone(&object));
        self.record(
            idx,
            Change {
                rv,
                kind: ChangeType::Modified,
                object: Arc::clone(&object),
                previous: Some(old),
            },
        );
        Some(object)
    }

    /// Forgets every collection's history: a watch from any version before now expires.
    pub(crate) fn compact(&mut self) {
        for c in &mut self.collections {
            c.history.clear();
            c.oldest_rv = self.rv;
        }
    }

    pub(crate) fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit.max(1);
        for idx in 0..self.collections.len() {
            self.trim(idx);
        }
    }

    fn record(&mut self, idx: usize, change: Change) {
        self.collections[idx].history.push_back(change);
        self.trim(idx);
    }

    fn trim(&mut self, idx: usize) {
        let limit = self.history_limit;
        let c = &mut self.collections[idx];
        while c.history.len() > limit {
            if let Some(dropped) = c.history.pop_front() {
                c.oldest_rv = dropped.rv;
            }
        }
    }
}

/// Finds the collection and key of an object, checking apiVersion, kind and name, and
/// defaulting the namespace of a namespaced object to `default` as kubectl does.
fn identify(value: &mut Value) -> Result<(usize, Key), FakeApiError> {
    let field = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).map(str::to_string);
    let api_version = field(value, "apiVersion").ok_or(FakeApiError::MissingField {
        field: "apiVersion",
        object: describe(value),
    })?;
    let kind = field(value, "kind").ok_or(FakeApiError::MissingField {
        field: "kind",
        object: describe(value),
    })?;
    let idx = index_by_type(&api_version, &kind).ok_or_else(|| FakeApiError::UnknownKind {
        api_version: api_version.clone(),
        kind: kind.clone(),
    })?;
    let object = describe(value);
    let metadata = metadata_mut(value)?;
    let name = metadata
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or(FakeApiError::MissingField {
            field: "metadata.name",
            object,
        })?
        .to_string();
    let namespace = if KINDS[idx].namespaced {
        let ns = metadata
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_string();
        metadata.insert("namespace".into(), Value::String(ns.clone()));
        ns
    } else {
        metadata.remove("namespace");
        String::new()
    };
    Ok((idx, (namespace, name)))
}

fn metadata_mut(value: &mut Value) -> Result<&mut Map<String, Value>, FakeApiError> {
    let object_name = describe(value);
    let object = value.as_object_mut().ok_or(FakeApiError::NotAnObject)?;
    let metadata = object
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    metadata.as_object_mut().ok_or(FakeApiError::MissingField {
        field: "metadata",
        object: object_name,
    })
}

/// `Kind namespace/name` for error messages, with whatever parts the object has.
fn describe(value: &Value) -> String {
    let s = |p: &str| value.pointer(p).and_then(Value::as_str).unwrap_or("?");
    format!(
        "{} {}/{}",
        s("/kind"),
        s("/metadata/namespace"),
        s("/metadata/name")
    )
}

fn without_meta_and_status(value: &Value) -> Value {
    let mut v = value.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    v
}

pub(crate) fn resource_version_of(value: &Value) -> u64 {
    value
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A UUID-shaped uid, unique within this server.
fn uid(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// Now, in the second-precision RFC 3339 form Kubernetes writes.
fn timestamp() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(name: &str, port: u16) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "labels": {"a": "b"}},
               "spec": {"ports": [{"port": port}]}})
    }

    #[test]
    fn apply_sets_server_metadata_and_bumps_generation_only_on_spec_change() {
        let mut store = Store::new();
        let idx = index_by_plural("services").expect("services");
        let key = ("default".to_string(), "web".to_string());
        let rv1 = store.apply(svc("web", 80)).expect("create");
        let obj = store.collections[idx].objects[&key].clone();
        assert_eq!(obj["metadata"]["generation"], json!(1));
        assert_eq!(obj["metadata"]["resourceVersion"], json!(rv1.to_string()));
        assert!(obj["metadata"]["uid"].is_string());
        assert!(obj["metadata"]["creationTimestamp"].is_string());

        // The same object again changes nothing.
        assert_eq!(store.apply(svc("web", 80)).expect("noop"), rv1);
        assert_eq!(store.collections[idx].history.len(), 1);

        // A label change is a new version but the same generation.
        let mut relabelled = svc("web", 80);
        relabelled["metadata"]["labels"]["a"] = json!("c");
        let rv2 = store.apply(relabelled).expect("relabel");
        assert!(rv2 > rv1);
        let obj = store.collections[idx].objects[&key].clone();
        assert_eq!(obj["metadata"]["generation"], json!(1));
        assert_eq!(obj["metadata"]["uid"], json!(uid(1)));

        store.apply(svc("web", 81)).expect("spec change");
        let obj = store.collections[idx].objects[&key].clone();
        assert_eq!(obj["metadata"]["generation"], json!(2));

        let rv_del = store.delete(idx, &key).expect("delete");
        let last = store.collections[idx].history.back().expect("history");
        assert_eq!(last.kind, ChangeType::Deleted);
        assert_eq!(resource_version_of(&last.object), rv_del);
        assert!(store.delete(idx, &key).is_none());
    }

    #[test]
    fn history_limit_moves_the_expiry_horizon() {
        let mut store = Store::new();
        store.set_history_limit(2);
        for i in 0..5 {
            store.apply(svc(&format!("s{i}"), 80)).expect("apply");
        }
        let c = &store.collections[index_by_plural("services").expect("services")];
        assert_eq!(c.history.len(), 2);
        assert_eq!(c.oldest_rv, c.history[0].rv - 1);
    }

    #[test]
    fn apply_rejects_unknown_kinds_and_missing_names() {
        let mut store = Store::new();
        let err = store
            .apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}))
            .expect_err("unknown kind");
        assert!(err.to_string().contains("ConfigMap"), "{err}");
        let err = store
            .apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {}}))
            .expect_err("no name");
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }
}
