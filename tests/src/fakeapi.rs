//! An in-process fake Kubernetes API server that speaks real HTTP/1.1 and JSON, so that
//! the agent's real kube-rs client code (list, watch, reflectors, `patch_status`) runs
//! against it in tests and benchmarks.
//!
//! ```no_run
//! use k8s_openapi::api::core::v1::Service;
//! use mycel_tests::fakeapi::FakeApiServer;
//!
//! let api = FakeApiServer::start();
//! api.write_kubeconfig("kubeconfig");
//! let mut svc = Service::default();
//! svc.metadata.name = Some("web".into());
//! svc.metadata.namespace = Some("default".into());
//! api.apply(&svc);
//! // … start the agent with KUBECONFIG=kubeconfig, then inject faults:
//! api.compact();
//! api.disconnect_watches();
//! ```
//!
//! What is real:
//! - HTTP/1.1 with keep-alive; watches are chunked streams of JSON lines
//!   (`{"type":"ADDED","object":{…}}`), as the API server sends them.
//! - Paths for Services, Pods, Namespaces (`/api/v1`), EndpointSlices
//!   (`/apis/discovery.k8s.io/v1`) and AuthorizationPolicies
//!   (`/apis/mycel.dev/v1alpha1`), across all namespaces and per namespace; GET of one
//!   object; errors as `Status` objects with the API server's codes and reasons (400, 401,
//!   404, 405, 410, 415, 422).
//! - A bearer token is required (the one written into the kubeconfig), so a client that
//!   does not use the kubeconfig fails.
//! - One global resourceVersion counter, as etcd's revision; `uid`, `generation` (bumped
//!   when anything but metadata and status changes), `creationTimestamp`; a write that
//!   changes nothing is a no-op without an event.
//! - Lists in key order with `limit`/`continue` pagination (every page reports the first
//!   page's resourceVersion, so a watch from it replays changes made while paging; a
//!   token older than the kept history is answered 410), label selectors (equality, set
//!   and existence forms) and field selectors (`=`, `==`, `!=` on the fields the API
//!   server supports for the kind, e.g. `spec.nodeName` for pods). A selector it does not
//!   understand is answered 400, never ignored.
//! - Watches from a resourceVersion replay the kept history; from "0" or none they start
//!   with the current objects as ADDED. With a selector, an object that starts or stops
//!   matching arrives as ADDED or DELETED. BOOKMARKs at a configurable interval when
//!   `allowWatchBookmarks=true`; `timeoutSeconds` ends the stream; `sendInitialEvents`
//!   (kube's streaming-list watcher) ends the initial objects with the
//!   `k8s.io/initial-events-end` bookmark.
//! - A watch from a version older than the kept history gets what the API server's watch
//!   cache sends: HTTP 200 and one ERROR event with a 410 `Expired` Status. kube's
//!   watcher relists on exactly that event; it treats an HTTP 410 answer to the watch
//!   request as a failed start and retries the same version.
//! - `PATCH …/{name}/status` with `application/merge-patch+json` (RFC 7386; only
//!   `status` is kept, as for a status subresource) or `application/apply-patch+yaml`
//!   (needs `fieldManager`).
//!
//! What is simplified:
//! - Lists are served from the current state whatever `resourceVersion` asks for, except
//!   that `resourceVersionMatch=Exact` for another version than the current is 410.
//! - Server-side apply of a status replaces the whole status; there is no field
//!   ownership or `managedFields`.
//! - No create/update/delete over HTTP (tests change objects through the methods here),
//!   no discovery endpoints (only `/version`), no admission, validation or defaulting
//!   beyond a missing namespace becoming `default`.
//! - History is kept per collection up to a limit ([`FakeApiServer::set_history_limit`]),
//!   and only for as long as the server runs.

mod http;
mod select;
mod store;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use self::store::{KINDS, Store, index_by_plural};

/// How often watches with `allowWatchBookmarks=true` get a BOOKMARK, unless changed with
/// [`FakeApiServer::set_bookmark_interval`]. Much shorter than the API server's minute,
/// so that tests see bookmarks without waiting.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// The bearer token the server requires and the kubeconfig carries.
const TOKEN: &str = "mycel-fake-api-token";

/// What a fake API server was asked to do, per collection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectionStats {
    /// Lists started (requests without a `continue` token): each is a (re)list.
    pub lists: u64,
    /// List requests including every further page.
    pub list_pages: u64,
    /// GETs of one object.
    pub gets: u64,
    /// Watch requests started.
    pub watches: u64,
    /// Watch streams open now.
    pub open_watches: u64,
    /// PATCH requests received (also those rejected or changing nothing).
    pub patches: u64,
}

/// One PATCH request as received.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchRecord {
    /// The collection, e.g. `authorizationpolicies`.
    pub collection: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// The request's media type, e.g. `application/merge-patch+json`.
    pub content_type: String,
    /// The `fieldManager` query parameter, if given.
    pub field_manager: Option<String>,
    /// The patch, parsed.
    pub body: Value,
}

/// Why an object could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    /// The object is not a JSON object.
    #[error("the object is not a JSON object")]
    NotAnObject,
    /// A required field is missing or has the wrong type.
    #[error("{object}: missing or invalid {field}")]
    MissingField {
        /// The field, e.g. `metadata.name`.
        field: &'static str,
        /// `Kind namespace/name`, as far as known.
        object: String,
    },
    /// The server does not serve this apiVersion and kind.
    #[error(
        "this fake API server does not serve {api_version} {kind} (it serves v1 Service, Pod, \
         Namespace, discovery.k8s.io/v1 EndpointSlice and mycel.dev/v1alpha1 AuthorizationPolicy)"
    )]
    UnknownKind {
        /// The object's apiVersion.
        api_version: String,
        /// The object's kind.
        kind: String,
    },
    /// The typed object could not be turned into JSON.
    #[error("cannot serialize the object: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// State shared by the server's tasks and the handle.
#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    token: String,
    /// Bumped after every write and compaction: wakes the watches.
    changes: watch::Sender<u64>,
    /// Bumped by `disconnect_watches`.
    disconnects: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    /// Collections whose lists answer 404, as for a resource whose CRD is not installed.
    missing: Mutex<std::collections::BTreeSet<String>>,
    bookmark_interval_ms: AtomicU64,
    stats: Mutex<Vec<CollectionStats>>,
    patch_log: Mutex<Vec<PatchRecord>>,
    /// Service account tokens TokenReview accepts: token → (audiences, user info).
    tokens: Mutex<std::collections::HashMap<String, (Vec<String>, Value)>>,
}

impl Shared {
    fn notify_change(&self) {
        let rv = lock(&self.store).rv;
        self.changes.send_replace(rv);
    }
}

/// Locks a mutex; a panic elsewhere while it was held does not stop the server (the
/// state is still consistent: every update is done before the guard drops).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fake Kubernetes API server on 127.0.0.1, running on its own thread and tokio
/// runtime, so that synchronous tests can use it. Stopped on drop: every connection and
/// watch ends and the port closes.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 and a free port. Panics if it cannot bind or start
    /// its runtime.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("fake API server: cannot bind 127.0.0.1:0: {e}"));
        Self::with_listener(listener, "the host")
    }

    /// Starts a server whose listening socket lives in the named network namespace
    /// (`/run/netns/<name>`), so that processes in that namespace reach it on
    /// `127.0.0.1:PORT`. The namespace must have `lo` up (as [`crate::netns::add`]
    /// leaves it).
    pub fn start_in_netns(name: &str) -> Self {
        // A socket belongs to the namespace it was created in, whichever thread uses it
        // later.
        let listener = crate::netns::run_in(name, || {
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        })
        .unwrap_or_else(|e| {
            panic!("fake API server: cannot bind 127.0.0.1:0 in netns {name}: {e}")
        });
        Self::with_listener(listener, &format!("netns {name}"))
    }

    fn with_listener(listener: std::net::TcpListener, place: &str) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake API server in {place}: no local address: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("fake API server in {place}: set_nonblocking: {e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-api")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("fake API server in {place}: cannot start a runtime: {e}"));
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .unwrap_or_else(|e| panic!("fake API server in {place}: {addr}: {e}"))
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            token: TOKEN.to_string(),
            changes: watch::Sender::new(0),
            disconnects: watch::Sender::new(0),
            paused: watch::Sender::new(false),
            missing: Mutex::new(Default::default()),
            bookmark_interval_ms: AtomicU64::new(millis(DEFAULT_BOOKMARK_INTERVAL)),
            stats: Mutex::new(vec![CollectionStats::default(); KINDS.len()]),
            patch_log: Mutex::new(Vec::new()),
            tokens: Mutex::default(),
        });
        let (stop, stopped) = oneshot::channel();
        let server_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("fake-api".into())
            .spawn(move || {
                runtime.block_on(http::serve(listener, server_shared, stopped));
                // Dropping the runtime cancels every connection and watch task, which
                // closes their sockets.
                runtime.shutdown_timeout(Duration::from_secs(5));
            })
            .unwrap_or_else(|e| panic!("fake API server in {place}: cannot spawn its thread: {e}"));
        Self {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The address it listens on (127.0.0.1:PORT).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bearer token clients must send.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// A kubeconfig (YAML) for this server: cluster, user with the token, context, and
    /// current-context.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: mycel-fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: mycel-fake\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: mycel-fake\n  context:\n    cluster: mycel-fake\n    user: mycel-fake\n    namespace: default\n\
             current-context: mycel-fake\n",
            url = self.url(),
            token = self.token(),
        )
    }

    /// Makes `TokenReview` (`POST /apis/authentication.k8s.io/v1/tokenreviews`) accept
    /// `token` for any of `audiences`, as the token of `user` (TokenReview's `status.user`:
    /// `username`, `uid`, `groups`, `extra`). Any other token, or one reviewed for another
    /// audience, is answered as not authenticated, as the API server does.
    pub fn add_token(&self, token: &str, audiences: &[&str], user: Value) {
        lock(&self.shared.tokens).insert(
            token.to_owned(),
            (audiences.iter().map(|a| (*a).to_owned()).collect(), user),
        );
    }

    /// A projected service account token's user as TokenReview reports it: the service
    /// account's username and the pod it is bound to (name and uid).
    pub fn service_account_user(namespace: &str, name: &str, pod: &str, pod_uid: &str) -> Value {
        serde_json::json!({
            "username": format!("system:serviceaccount:{namespace}:{name}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [pod_uid],
            },
        })
    }

    /// Writes [`Self::kubeconfig`] to `path`; panics naming the path if it cannot.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig())
            .unwrap_or_else(|e| panic!("cannot write kubeconfig {}: {e}", path.display()));
    }

    /// Creates or replaces a typed object (a k8s-openapi type or a kube custom resource)
    /// and returns its resourceVersion. Panics if the server does not serve its kind or
    /// it has no name.
    pub fn apply<K>(&self, object: &K) -> u64
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        self.try_apply(object)
            .unwrap_or_else(|e| panic!("fake API server: cannot apply: {e}"))
    }

    /// [`Self::apply`], returning the error instead of panicking.
    pub fn try_apply<K>(&self, object: &K) -> Result<u64, FakeApiError>
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        self.try_apply_json(typed_json(object)?)
    }

    /// Creates or replaces many typed objects with one lock and one wake-up of the
    /// watches; returns the last resourceVersion. Panics as [`Self::apply`].
    pub fn apply_many<K>(&self, objects: &[K]) -> u64
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        let values = objects.iter().map(|o| {
            typed_json(o).unwrap_or_else(|e| panic!("fake API server: cannot apply: {e}"))
        });
        self.apply_many_json(values)
    }

    /// Creates or replaces an object given as JSON; the collection comes from its
    /// `apiVersion` and `kind`. Panics if the object is not servable (see
    /// [`FakeApiError`]).
    pub fn apply_json(&self, object: Value) -> u64 {
        self.try_apply_json(object)
            .unwrap_or_else(|e| panic!("fake API server: cannot apply: {e}"))
    }

    /// [`Self::apply_json`], returning the error instead of panicking.
    pub fn try_apply_json(&self, object: Value) -> Result<u64, FakeApiError> {
        let rv = lock(&self.shared.store).apply(object)?;
        self.shared.notify_change();
        Ok(rv)
    }

    /// Creates or replaces many JSON objects with one lock and one wake-up of the
    /// watches; returns the last resourceVersion. Panics on the first unservable object
    /// (those before it are stored).
    pub fn apply_many_json(&self, objects: impl IntoIterator<Item = Value>) -> u64 {
        let result = {
            let mut store = lock(&self.shared.store);
            objects
                .into_iter()
                .try_fold(store.rv, |_, object| store.apply(object))
        };
        self.shared.notify_change();
        result.unwrap_or_else(|e| panic!("fake API server: cannot apply: {e}"))
    }

    /// Deletes a typed object; `namespace` is ignored for cluster-scoped kinds. Returns
    /// whether it existed.
    pub fn delete<K>(&self, namespace: &str, name: &str) -> bool
    where
        K: kube::Resource<DynamicType = ()>,
    {
        self.delete_json(&collection_of::<K>(), namespace, name)
    }

    /// Deletes an object from a collection (`services`, `pods`, `namespaces`,
    /// `endpointslices`, `authorizationpolicies`). Returns whether it existed.
    pub fn delete_json(&self, collection: &str, namespace: &str, name: &str) -> bool {
        let idx = collection_index(collection);
        let key = key_for(idx, namespace, name);
        let deleted = lock(&self.shared.store).delete(idx, &key).is_some();
        if deleted {
            self.shared.notify_change();
        }
        deleted
    }

    /// The stored object as JSON, with the server-set metadata.
    pub fn get_json(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let idx = collection_index(collection);
        let key = key_for(idx, namespace, name);
        lock(&self.shared.store).collections[idx]
            .objects
            .get(&key)
            .map(|o| (**o).clone())
    }

    /// The stored object, typed. Panics if it does not deserialize as `K`.
    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let collection = collection_of::<K>();
        self.get_json(&collection, namespace, name).map(|v| {
            serde_json::from_value(v).unwrap_or_else(|e| {
                panic!("fake API server: {collection} {namespace}/{name} does not deserialize: {e}")
            })
        })
    }

    /// How many objects a collection holds.
    pub fn len(&self, collection: &str) -> usize {
        let idx = collection_index(collection);
        lock(&self.shared.store).collections[idx].objects.len()
    }

    /// Whether a collection is empty.
    pub fn is_empty(&self, collection: &str) -> bool {
        self.len(collection) == 0
    }

    /// The last resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }

    /// Cuts every open watch stream abruptly: the connection closes without the final
    /// chunk, as when an API server restarts or a load balancer drops the connection.
    pub fn disconnect_watches(&self) {
        self.shared.disconnects.send_modify(|n| *n += 1);
    }

    /// Forgets the change history of every collection: any watch from an earlier
    /// resourceVersion (new, or open and not yet caught up) gets a 410 Expired error and
    /// must relist. Open watches that are caught up continue.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
        self.shared.notify_change();
    }

    /// Sets how many changes each collection keeps for watches (at least 1); older ones
    /// expire as with [`Self::compact`].
    pub fn set_history_limit(&self, limit: usize) {
        lock(&self.shared.store).set_history_limit(limit);
        self.shared.notify_change();
    }

    /// Sets the BOOKMARK interval; open watches use it from their next bookmark on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared
            .bookmark_interval_ms
            .store(millis(interval), Ordering::Relaxed);
    }

    /// While `missing`, lists of `collection` answer 404, as the API server does for a
    /// resource whose CRD is not installed (watches already open go on).
    pub fn set_missing(&self, collection: &str, missing: bool) {
        let mut set = lock(&self.shared.missing);
        if missing {
            set.insert(collection.to_owned());
        } else {
            set.remove(collection);
        }
    }

    /// While paused, open watches send nothing (no events, no bookmarks) but stay open;
    /// changes made meanwhile arrive when unpaused. Lists still answer, so this shows a
    /// slow or stuck watch stream.
    pub fn pause_watches(&self, paused: bool) {
        self.shared.paused.send_replace(paused);
    }

    /// Counters for a collection.
    pub fn stats(&self, collection: &str) -> CollectionStats {
        lock(&self.shared.stats)[collection_index(collection)]
    }

    /// Every PATCH request received so far, in order.
    pub fn patch_log(&self) -> Vec<PatchRecord> {
        lock(&self.shared.patch_log).clone()
    }

    /// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether
    /// it held.
    pub fn wait_until(&self, timeout: Duration, mut condition: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn typed_json<K>(object: &K) -> Result<Value, FakeApiError>
where
    K: kube::Resource<DynamicType = ()> + Serialize,
{
    let mut value = serde_json::to_value(object)?;
    // k8s-openapi types write apiVersion and kind themselves; make sure either way.
    if let Some(o) = value.as_object_mut() {
        o.entry("apiVersion")
            .or_insert_with(|| Value::String(K::api_version(&()).into_owned()));
        o.entry("kind")
            .or_insert_with(|| Value::String(K::kind(&()).into_owned()));
    }
    Ok(value)
}

fn collection_of<K: kube::Resource<DynamicType = ()>>() -> String {
    K::plural(&()).into_owned()
}

fn collection_index(collection: &str) -> usize {
    index_by_plural(collection).unwrap_or_else(|| {
        panic!(
            "fake API server: no collection {collection:?} (it has {})",
            KINDS
                .iter()
                .map(|k| k.plural)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn key_for(idx: usize, namespace: &str, name: &str) -> store::Key {
    let namespace = if KINDS[idx].namespaced { namespace } else { "" };
    (namespace.to_string(), name.to_string())
}
