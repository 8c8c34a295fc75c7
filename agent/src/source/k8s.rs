//! The Kubernetes API as a source.
//!
//! One kube-runtime watcher per kind (Services, EndpointSlices, Pods, Namespaces and
//! mycel's AuthorizationPolicies, across namespaces) lists and then watches; on a watch
//! error it backs off and resumes from the last resourceVersion, and when that is too old
//! (410 Gone) it lists again. Each object goes through the same translation as the file
//! source ([`translate`](super::translate)); this module only keeps, per object, what it
//! last accepted, so that:
//!
//! - nothing reaches the agent until every kind has been listed once: the first
//!   [`Update`](state::Update) is complete (`full`), and the agent becomes ready only after
//!   applying it;
//! - a relist of one kind ends with the differences only (objects gone from the list are
//!   deleted; objects equal to those held change nothing), so maps do not flap;
//! - an invalid object is reported (and, for a policy, marked `Accepted=False` in its
//!   status) while its last good version stays in force.
//!
//! The node's own pods also get their host-side interface and cgroup, found on the node
//! ([`discovery`](crate::discovery)); until found (a pod's veth may appear after the pod
//! object) they are retried every second and count as remote workloads.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::DynamicObject,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{Error, Location, SourceEvent, saved::Saved, translate};
use crate::{
    discovery::{self, Discovery},
    state::{self, ObjectRef, Origin, Resource, ResourceKey},
};

mod pod;
mod status;

pub use pod::PodWorkload;
pub use status::{ACCEPTED, AcceptedCondition, policy_api_resource};

/// How often local pods whose interface was not found yet are looked for again, and failed
/// status writes retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Changes queued between the watchers and the one task that merges them.
const CHANGE_QUEUE: usize = 4_096;
/// Changes merged into one update at most; more wait for the next.
const MAX_BATCH: usize = 20_000;
/// The origin of every object this source reads, in messages.
pub const ORIGIN: &str = "kubernetes";

/// Settings of the Kubernetes source.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node's name: pods with this `spec.nodeName` are local.
    pub node_name: String,
    /// The cgroup v2 root, below which kubelet puts pods' cgroups.
    pub cgroup_root: PathBuf,
    /// Namespace whose policies apply in every namespace.
    pub root_namespace: String,
    /// Where the last accepted version of each AuthorizationPolicy is saved, so that one
    /// found invalid when the agent starts keeps that version in force; `None` saves
    /// nothing.
    pub saved_policies: Option<PathBuf>,
}

/// The running source; dropping it stops every watcher.
#[derive(Debug)]
pub struct KubeSource {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeSource {
    /// Starts watching with `client`. Events arrive on the returned channel; the first
    /// [`SourceEvent::Update`] comes once every kind has been listed.
    pub fn start(client: Client, cfg: KubeConfig) -> (KubeSource, mpsc::Receiver<SourceEvent>) {
        let (changes_tx, changes) = mpsc::channel(CHANGE_QUEUE);
        let (events_tx, events) = mpsc::channel(64);
        let location = Location::new(Origin::from(ORIGIN));
        let node = cfg.node_name.clone();
        let mut tasks = Vec::new();

        let loc = location.clone();
        tasks.push(spawn_watch(
            watcher(Api::<Service>::all(client.clone())),
            Watched::Service,
            changes_tx.clone(),
            move |svc: Service| {
                Item::Resource(translate::service(&svc, &loc).map(Resource::Service))
            },
        ));
        let loc = location.clone();
        tasks.push(spawn_watch(
            watcher(Api::<EndpointSlice>::all(client.clone())),
            Watched::EndpointSlice,
            changes_tx.clone(),
            move |slice: EndpointSlice| {
                Item::Resource(translate::endpoint_slice(&slice, &loc).map(Resource::EndpointSlice))
            },
        ));
        let loc = location.clone();
        tasks.push(spawn_watch(
            watcher(Api::<Pod>::all(client.clone())).modify(pod::strip),
            Watched::Pod,
            changes_tx.clone(),
            move |p: Pod| Item::Pod(pod::pod(&p, &node, &loc)),
        ));
        tasks.push(spawn_watch(
            watcher(Api::<Namespace>::all(client.clone())),
            Watched::Namespace,
            changes_tx.clone(),
            {
                let loc = location.clone();
                move |ns: Namespace| Item::Namespace(translate::namespace_object(&ns, &loc))
            },
        ));
        let policies = Api::<DynamicObject>::all_with(client.clone(), &policy_api_resource());
        let loc = location.clone();
        tasks.push(spawn_watch(
            watcher(policies),
            Watched::Policy,
            changes_tx.clone(),
            move |obj: DynamicObject| status::translate_policy(obj, &loc),
        ));

        let (status_writer, status_results) = status::Writer::start(client.clone());
        let merger = Merger::new(cfg, events_tx, status_writer);
        tasks.push(tokio::spawn(merger.run(changes, status_results)));
        (KubeSource { tasks }, events)
    }
}

fn watcher<K>(api: Api<K>) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default()).default_backoff()
}

/// The kinds watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Watched {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    Policy,
}

impl Watched {
    const ALL: [Watched; 5] = [
        Watched::Service,
        Watched::EndpointSlice,
        Watched::Pod,
        Watched::Namespace,
        Watched::Policy,
    ];

    /// The model's kind of the objects.
    fn kind(self) -> Option<state::Kind> {
        match self {
            Watched::Service => Some(state::Kind::Service),
            Watched::EndpointSlice => Some(state::Kind::EndpointSlice),
            Watched::Pod => Some(state::Kind::Workload),
            Watched::Policy => Some(state::Kind::AuthorizationPolicy),
            Watched::Namespace => Some(state::Kind::Namespace),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Watched::Service => "services",
            Watched::EndpointSlice => "endpointslices",
            Watched::Pod => "pods",
            Watched::Namespace => "namespaces",
            Watched::Policy => "authorizationpolicies.mycel.dev",
        }
    }
}

/// One object, translated by its watcher.
#[derive(Debug)]
pub(crate) enum Item {
    Resource(Result<Resource, Vec<Error>>),
    Pod(Result<Option<PodWorkload>, Vec<Error>>),
    Policy(status::PolicyItem),
    Namespace(Result<state::Namespace, Vec<Error>>),
}

/// What a watcher tells the merger.
#[derive(Debug)]
enum Change {
    /// A (re)list starts: objects not listed before [`Change::Listed`] are gone.
    Listing(Watched),
    /// Boxed: a translated object is large, the other changes small.
    Upsert(Watched, ObjectRef, Box<Item>),
    Delete(Watched, ObjectRef),
    /// The (re)list is complete.
    Listed(Watched),
    /// The watch failed; the watcher backs off and resumes. `expired`: the API server has
    /// no history from the watcher's resourceVersion (410 Gone); it lists again.
    Failed {
        what: Watched,
        message: String,
        expired: bool,
    },
}

fn object_ref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef {
        namespace: meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Runs one watcher, translating its objects on its own task (so kinds translate in
/// parallel), and forwards them to the merger.
fn spawn_watch<K, S, F>(
    stream: S,
    what: Watched,
    tx: mpsc::Sender<Change>,
    translate: F,
) -> JoinHandle<()>
where
    K: kube::Resource + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    F: Fn(K) -> Item + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(Event::Init) => Change::Listing(what),
                Ok(Event::InitApply(obj) | Event::Apply(obj)) => {
                    let id = object_ref(obj.meta());
                    Change::Upsert(what, id, Box::new(translate(obj)))
                }
                Ok(Event::Delete(obj)) => Change::Delete(what, object_ref(obj.meta())),
                Ok(Event::InitDone) => Change::Listed(what),
                Err(e) => Change::Failed {
                    what,
                    expired: matches!(&e, watcher::Error::WatchError(s) if s.code == 410),
                    message: e.to_string(),
                },
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    })
}

/// What the merger holds of one object.
#[derive(Debug, Default)]
struct Entry {
    /// A version was accepted (and is in force in the model). The source keeps no copy of
    /// the object itself: the model holds it, and ignores an upsert equal to what it
    /// holds, so a relist or a status write changes nothing downstream.
    accepted: bool,
    /// The current version was rejected.
    rejected: bool,
    /// What was last reported about it, so that events that do not change it (its own
    /// status written back, a relist) do not report it again.
    reported: Vec<String>,
}

/// A local pod and what discovery found of it.
#[derive(Debug)]
struct LocalPod {
    pod: PodWorkload,
    interface: Option<String>,
    cgroup: Option<PathBuf>,
}

/// Merges the watchers' changes into updates for the agent.
struct Merger {
    cfg: KubeConfig,
    events: mpsc::Sender<SourceEvent>,
    entries: HashMap<(Watched, ObjectRef), Entry>,
    /// Kinds being (re)listed, with the objects listed so far.
    listing: HashMap<Watched, HashSet<ObjectRef>>,
    /// Kinds not listed yet since the start.
    unlisted: HashSet<Watched>,
    /// Watchers whose last attempt failed (reported once until they recover).
    failing: HashMap<Watched, String>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    local: BTreeMap<ObjectRef, LocalPod>,
    discovery: Option<Discovery>,
    policies: status::Policies,
    status: status::Writer,
    upserts: Vec<Resource>,
    deletes: Vec<ResourceKey>,
    seen: Option<Instant>,
    /// The first complete state has been sent.
    synced: bool,
    /// Before the first complete state: what it will hold.
    initial: HashMap<ResourceKey, Resource>,
    /// Objects whose current version is rejected.
    rejected: usize,
    rejected_reported: usize,
    /// Last good versions of AuthorizationPolicies.
    saved: Option<Saved>,
}

/// The name an AuthorizationPolicy's last good version is saved under (`_` occurs in no
/// Kubernetes name, so the two parts cannot be confused).
fn saved_name(id: &ObjectRef) -> String {
    format!("{}_{}.json", id.namespace, id.name)
}

impl Merger {
    fn new(cfg: KubeConfig, events: mpsc::Sender<SourceEvent>, status: status::Writer) -> Self {
        let discovery = match Discovery::new() {
            Ok(d) => Some(d),
            Err(e) => {
                warn!(
                    "pod interface discovery is unavailable: {e}; local pods get no policy programs"
                );
                None
            }
        };
        let saved = cfg.saved_policies.clone().and_then(|dir| {
            Saved::open(dir.clone())
                .map_err(|e| warn!(dir = %dir.display(), "policies' last good versions will not be saved: {e}"))
                .ok()
        });
        Merger {
            saved,
            cfg,
            events,
            entries: HashMap::new(),
            listing: HashMap::new(),
            unlisted: Watched::ALL.into_iter().collect(),
            failing: HashMap::new(),
            namespaces: HashMap::new(),
            local: BTreeMap::new(),
            discovery,
            policies: status::Policies::default(),
            status,
            upserts: Vec::new(),
            deletes: Vec::new(),
            seen: None,
            synced: false,
            initial: HashMap::new(),
            rejected: 0,
            rejected_reported: 0,
        }
    }

    async fn run(
        mut self,
        mut changes: mpsc::Receiver<Change>,
        mut status_results: mpsc::Receiver<status::WriteResult>,
    ) {
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                change = changes.recv() => {
                    let Some(change) = change else { return };
                    self.seen.get_or_insert_with(Instant::now);
                    self.change(change).await;
                    // Take what else is queued now into the same update.
                    let mut n = 1;
                    while n < MAX_BATCH {
                        match changes.try_recv() {
                            Ok(change) => self.change(change).await,
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                result = status_results.recv() => {
                    if let Some(result) = result {
                        self.policies.written(result);
                    }
                }
                _ = retry.tick() => {
                    self.seen.get_or_insert_with(Instant::now);
                    self.discover_pending().await;
                    self.policies.retry_failed();
                }
            }
            if !self.flush().await {
                return;
            }
        }
    }

    async fn change(&mut self, change: Change) {
        match change {
            Change::Listing(what) => {
                self.listing.insert(what, HashSet::new());
            }
            Change::Upsert(what, id, item) => {
                if let Some(listed) = self.listing.get_mut(&what) {
                    listed.insert(id.clone());
                }
                self.recovered(what);
                self.upsert(what, id, *item).await;
            }
            Change::Delete(what, id) => {
                self.recovered(what);
                self.delete(what, &id);
            }
            Change::Listed(what) => {
                self.recovered(what);
                if let Some(listed) = self.listing.remove(&what) {
                    let gone: Vec<ObjectRef> = self
                        .entries
                        .keys()
                        .filter(|(w, id)| *w == what && !listed.contains(id))
                        .map(|(_, id)| id.clone())
                        .collect();
                    if what == Watched::Namespace {
                        self.namespaces.retain(|ns, _| {
                            listed.contains(&ObjectRef {
                                namespace: String::new(),
                                name: ns.clone(),
                            })
                        });
                    }
                    for id in gone {
                        self.delete(what, &id);
                    }
                }
                if self.unlisted.remove(&what) {
                    debug!(kind = what.name(), "initial list complete");
                }
            }
            Change::Failed {
                what,
                expired: true,
                ..
            } => {
                // The API server no longer has history from our resourceVersion: the
                // watcher lists again, and the relist ends with the differences only.
                info!(
                    kind = what.name(),
                    "resourceVersion expired (410); listing again"
                );
            }
            Change::Failed { what, message, .. } => {
                if self.failing.get(&what) != Some(&message) {
                    warn!(
                        kind = what.name(),
                        "watching the Kubernetes API failed: {message}; retrying with backoff"
                    );
                    let _ = self
                        .events
                        .send(SourceEvent::Error(Error::Api {
                            what: what.name(),
                            message: message.clone(),
                        }))
                        .await;
                    self.failing.insert(what, message);
                }
            }
        }
    }

    fn recovered(&mut self, what: Watched) {
        if self.failing.remove(&what).is_some() {
            info!(kind = what.name(), "watching the Kubernetes API again");
        }
    }

    async fn upsert(&mut self, what: Watched, id: ObjectRef, item: Item) {
        let result = match item {
            Item::Namespace(result) => {
                if let Ok(ns) = &result {
                    self.namespaces
                        .insert(id.name.clone(), ns.meta.labels.clone());
                }
                result.map(Resource::Namespace)
            }
            Item::Resource(result) => result,
            Item::Policy(policy) => {
                self.policies.observe(&id, &policy);
                let name = saved_name(&id);
                match (&policy.result, &self.saved) {
                    (Ok(_), Some(saved)) => {
                        let text = serde_json::to_vec(&policy.document).unwrap_or_default();
                        saved.save(&name, &text);
                    }
                    (Err(_), Some(saved)) if !self.entries.contains_key(&(what, id.clone())) => {
                        // Rejected when first seen (at start-up): its saved last good
                        // version stands in, while the object is reported as rejected.
                        if let Some(kept) = self.saved_policy(saved, &name) {
                            warn!(policy = %id, saved = %saved.dir().display(), "the policy is rejected: keeping its last good version, saved earlier");
                            self.push(Resource::AuthorizationPolicy(kept));
                            let entry = self.entries.entry((what, id.clone())).or_default();
                            entry.accepted = true;
                        }
                    }
                    _ => {}
                }
                policy.result.map(Resource::AuthorizationPolicy)
            }
            Item::Pod(Ok(None)) => {
                // Not a workload (finished, or on the host's network): as if deleted.
                self.delete(what, &id);
                self.entries.entry((what, id)).or_default();
                return;
            }
            Item::Pod(Ok(Some(pod))) => Ok(Resource::Workload(self.local_pod(&id, pod).await)),
            Item::Pod(Err(errors)) => Err(errors),
        };
        let entry = self.entries.entry((what, id)).or_default();
        match result {
            Ok(resource) => {
                if entry.rejected {
                    self.rejected -= 1;
                }
                entry.rejected = false;
                entry.reported.clear();
                entry.accepted = true;
                self.push(resource);
            }
            Err(errors) => {
                if !entry.rejected {
                    self.rejected += 1;
                }
                entry.rejected = true;
                let texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
                if texts != entry.reported {
                    entry.reported = texts;
                    for e in errors {
                        let _ = self.events.send(SourceEvent::Error(e)).await;
                    }
                }
            }
        }
    }

    /// The saved last good version `name` of a policy, if it is still valid.
    fn saved_policy(&self, saved: &Saved, name: &str) -> Option<state::AuthorizationPolicy> {
        let value: serde_json::Value = serde_json::from_slice(&saved.load(name)?).ok()?;
        let location = Location {
            origin: state::Origin::from(saved.dir().join(name).display().to_string()),
            document: None,
            line: None,
        };
        status::translate_policy_document(value, &location, name.to_owned()).ok()
    }

    /// Queues an accepted object for the model.
    fn push(&mut self, resource: Resource) {
        if self.synced {
            self.upserts.push(resource);
        } else {
            self.initial.insert(resource.key(), resource);
        }
    }

    fn delete(&mut self, what: Watched, id: &ObjectRef) {
        if let Some(entry) = self.entries.remove(&(what, id.clone())) {
            if entry.rejected {
                self.rejected -= 1;
            }
            if entry.accepted
                && let Some(kind) = what.kind()
            {
                let key = ResourceKey {
                    kind,
                    id: id.clone(),
                };
                if self.synced {
                    self.deletes.push(key);
                } else {
                    self.initial.remove(&key);
                }
            }
        }
        match what {
            Watched::Pod => {
                self.local.remove(id);
            }
            Watched::Namespace => {
                self.namespaces.remove(&id.name);
            }
            Watched::Policy => {
                self.policies.forget(id);
                if let Some(saved) = &self.saved {
                    saved.forget(&saved_name(id));
                }
            }
            _ => {}
        }
    }

    /// The workload of a pod, with what discovery found for a local one.
    async fn local_pod(&mut self, id: &ObjectRef, pod: PodWorkload) -> state::Workload {
        if !pod.local {
            self.local.remove(id);
            return pod.workload.clone();
        }
        let known = self.local.get(id);
        let same_pod = known.is_some_and(|l| {
            l.pod.uid == pod.uid && l.pod.workload.addresses == pod.workload.addresses
        });
        let (interface, cgroup) = match known {
            Some(l) if same_pod => (l.interface.clone(), l.cgroup.clone()),
            _ => (None, None),
        };
        let mut local = LocalPod {
            pod,
            interface,
            cgroup,
        };
        if local.interface.is_none() {
            self.discover(&mut local).await;
        }
        let workload = local.workload();
        self.local.insert(id.clone(), local);
        workload
    }

    /// Looks for a local pod's cgroup and host-side interface.
    async fn discover(&self, local: &mut LocalPod) {
        if local.cgroup.is_none() && !local.pod.uid.is_empty() {
            local.cgroup = discovery::pod_cgroup(&self.cfg.cgroup_root, &local.pod.uid);
        }
        let Some(discovery) = &self.discovery else {
            return;
        };
        for ip in &local.pod.workload.addresses {
            match discovery.host_interface(*ip, local.cgroup.as_deref()).await {
                Ok(Some(found)) => {
                    debug!(pod = %local.pod.workload.meta.id, interface = %found.name, method = ?found.method, "found the pod's interface");
                    local.interface = Some(found.name);
                    return;
                }
                Ok(None) => {
                    debug!(pod = %local.pod.workload.meta.id, %ip, cgroup = ?local.cgroup, "the pod's interface is not there yet");
                }
                Err(e) => {
                    debug!(pod = %local.pod.workload.meta.id, %ip, "looking for the pod's interface: {e}");
                }
            }
        }
    }

    /// Retries discovery for local pods whose interface is not known yet.
    async fn discover_pending(&mut self) {
        let pending: Vec<ObjectRef> = self
            .local
            .iter()
            .filter(|(_, l)| l.interface.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in pending {
            let Some(mut local) = self.local.remove(&id) else {
                continue;
            };
            self.discover(&mut local).await;
            if local.interface.is_some() {
                let workload = Resource::Workload(local.workload());
                if self
                    .entries
                    .get(&(Watched::Pod, id.clone()))
                    .is_some_and(|e| !e.rejected && e.accepted)
                {
                    self.push(workload);
                }
            }
            self.local.insert(id, local);
        }
    }

    /// Sends what changed; returns false when the agent is gone.
    async fn flush(&mut self) -> bool {
        if !self.unlisted.is_empty() {
            // Nothing reaches the agent before the first complete state.
            self.upserts.clear();
            self.deletes.clear();
            return true;
        }
        let first = !self.synced;
        let update = if first {
            self.synced = true;
            // Policies deleted while no agent ran were deleted on purpose.
            if let Some(saved) = &self.saved {
                for name in saved.names() {
                    let listed = self
                        .entries
                        .keys()
                        .any(|(w, id)| *w == Watched::Policy && saved_name(id) == name);
                    if !listed {
                        saved.forget(&name);
                    }
                }
            }
            self.upserts.clear();
            self.deletes.clear();
            Some(state::Update {
                seen: self.seen.take().unwrap_or_else(Instant::now),
                full: true,
                upserts: std::mem::take(&mut self.initial).into_values().collect(),
                deletes: Vec::new(),
            })
        } else if self.upserts.is_empty() && self.deletes.is_empty() {
            self.seen = None;
            None
        } else {
            Some(state::Update {
                seen: self.seen.take().unwrap_or_else(Instant::now),
                full: false,
                upserts: std::mem::take(&mut self.upserts),
                deletes: std::mem::take(&mut self.deletes),
            })
        };
        if let Some(update) = update {
            if first {
                info!(
                    objects = update.upserts.len(),
                    local_pods = self.local.len(),
                    "initial lists complete"
                );
            }
            if self.events.send(SourceEvent::Update(update)).await.is_err() {
                return false;
            }
        }
        let rejected = self.rejected;
        if rejected != self.rejected_reported {
            self.rejected_reported = rejected;
            if self
                .events
                .send(SourceEvent::Rejected(rejected))
                .await
                .is_err()
            {
                return false;
            }
        }
        let local: Vec<&state::Workload> = self.local.values().map(|l| &l.pod.workload).collect();
        self.policies
            .reconcile(&local, &self.cfg.root_namespace, &self.status);
        true
    }
}

impl LocalPod {
    fn workload(&self) -> state::Workload {
        state::Workload {
            interface: self.interface.clone(),
            cgroup: self.cgroup.clone(),
            ..self.pod.workload.clone()
        }
    }
}

/// A client for the API server: from `kubeconfig` if given, else in-cluster
/// configuration, else `~/.kube/config`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| Error::Api {
                what: "kubeconfig",
                message: format!("{}: {e}", path.display()),
            })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| Error::Api {
                    what: "kubeconfig",
                    message: format!("{}: {e}", path.display()),
                })?
        }
        None => kube::Config::infer().await.map_err(|e| Error::Api {
            what: "configuration",
            message: format!(
                "{e} (in a pod, the service account's token is used; elsewhere pass --kubeconfig)"
            ),
        })?,
    };
    Client::try_from(config).map_err(|e| Error::Api {
        what: "client",
        message: e.to_string(),
    })
}
