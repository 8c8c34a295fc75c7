//! A node of a (fake) Kubernetes cluster: the fake API server started inside the node's
//! network namespace, a kubeconfig for the agent, pods as `Pod` objects, and the same
//! [`Resources`] interface the file-source tests write through, so one scenario can run
//! against either source.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::agent::{Agent, AgentOptions};
use crate::fakeapi::FakeApiServer;
use crate::node::{Node, Pod};
use crate::resources::Resources;

/// Where an object is: (collection, namespace, name).
type ObjectAt = (String, String, String);

/// The fake API server of one test node, and the objects written through it.
#[derive(Debug)]
pub struct Cluster {
    /// The API server, listening on loopback inside the node's namespace.
    pub api: FakeApiServer,
    /// This node's name, as pods' `spec.nodeName` says.
    pub node_name: String,
    kubeconfig: PathBuf,
    /// Objects written per group name.
    groups: Mutex<BTreeMap<String, BTreeSet<ObjectAt>>>,
}

impl Cluster {
    /// Starts the API server in `node`'s namespace and writes its kubeconfig.
    pub fn start(node: &Node) -> Cluster {
        let api = FakeApiServer::start_in_netns(&node.netns);
        let kubeconfig = node.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        Cluster {
            api,
            node_name: format!("node-{}", node.netns),
            kubeconfig,
            groups: Mutex::new(BTreeMap::new()),
        }
    }

    /// Options that make an agent read this cluster as this node.
    pub fn agent_options(&self) -> AgentOptions {
        AgentOptions::default().kubernetes(&self.kubeconfig, &self.node_name)
    }

    /// Starts an agent reading this cluster and waits until it is ready.
    pub fn start_agent<'n>(&self, node: &'n Node) -> Agent<'n> {
        self.agent_options().start(node)
    }

    /// Writes `pods` as Pod objects of this node (labelled `app: <app>`, service account
    /// `<app>`, uid from the pod's cgroup name when it is `pod<uid>`), in group `pods`.
    pub fn write_pods(&self, pods: &[(&Pod, &str)]) {
        let docs: Vec<Value> = pods
            .iter()
            .map(|(pod, app)| pod_object(pod, &self.node_name, "default", app))
            .collect();
        self.write_values("pods", docs);
    }

    fn write_values(&self, group: &str, docs: Vec<Value>) {
        let mut written = BTreeSet::new();
        for doc in docs {
            let collection = collection(&doc);
            let namespace = match doc["metadata"]["namespace"].as_str() {
                _ if collection == "namespaces" => String::new(),
                Some(ns) => ns.to_owned(),
                None => "default".to_owned(),
            };
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            self.api.try_apply_json(doc).unwrap_or_else(|e| {
                panic!("the fake API server refused {collection} {namespace}/{name}: {e}")
            });
            written.insert((collection, namespace, name));
        }
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let before = groups.insert(group.to_owned(), written.clone());
        for (collection, namespace, name) in before.unwrap_or_default().difference(&written) {
            self.api.delete_json(collection, namespace, name);
        }
    }
}

impl Resources for Cluster {
    fn write(&self, name: &str, docs: &[String]) {
        let values = docs
            .iter()
            .map(|d| {
                serde_yaml_ng::from_str::<Value>(d)
                    .unwrap_or_else(|e| panic!("test document of {name} is not YAML: {e}\n{d}"))
            })
            .collect();
        self.write_values(name, values);
    }

    fn remove(&self, name: &str) {
        self.write_values(name, Vec::new());
    }
}

/// The API collection of an object, from its kind.
fn collection(doc: &Value) -> String {
    match doc["kind"].as_str() {
        Some("Service") => "services",
        Some("EndpointSlice") => "endpointslices",
        Some("Pod") => "pods",
        Some("Namespace") => "namespaces",
        Some("AuthorizationPolicy") => "authorizationpolicies",
        other => panic!("no collection for kind {other:?}"),
    }
    .to_owned()
}

/// A harness pod as the API server would describe it, running on `node_name`.
pub fn pod_object(pod: &Pod, node_name: &str, namespace: &str, app: &str) -> Value {
    let cgroup = pod
        .cgroup
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let uid = cgroup
        .strip_prefix("pod")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("uid-{}", pod.name));
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": namespace,
            "uid": uid,
            "labels": {"app": app},
        },
        "spec": {
            "nodeName": node_name,
            "serviceAccountName": app,
            "containers": [{"name": "main", "image": "mycel-testpod"}],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ipv4.to_string(),
            "podIPs": [{"ip": pod.ipv4.to_string()}, {"ip": pod.ipv6.to_string()}],
        },
    })
}

/// A namespace object with these labels.
pub fn namespace_object(name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    })
}
