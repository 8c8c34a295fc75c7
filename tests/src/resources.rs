//! Resource documents for the agent's file source, and the directory it watches.
//!
//! The builders emit JSON, which is valid YAML, so no YAML serializer is needed. Values are
//! taken as given (a port of 70000, an address of `10.96.0.999`) so tests can also write
//! invalid resources.

use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::node::Pod;

/// The namespace resources are put in unless told otherwise.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A `v1` `Service` of type ClusterIP.
#[derive(Clone, Debug)]
pub struct ServiceYaml {
    name: String,
    namespace: String,
    cluster_ips: Vec<String>,
    ports: Vec<Value>,
    session_affinity: Option<String>,
}

impl ServiceYaml {
    /// A service `name` in the default namespace with one cluster IP.
    pub fn new(name: &str, cluster_ip: &str) -> Self {
        ServiceYaml {
            name: name.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            cluster_ips: vec![cluster_ip.to_owned()],
            ports: Vec::new(),
            session_affinity: None,
        }
    }

    /// Puts the service in `namespace`.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_owned();
        self
    }

    /// Adds a cluster IP (written as `clusterIPs`, the first one also as `clusterIP`).
    pub fn cluster_ip(mut self, ip: &str) -> Self {
        self.cluster_ips.push(ip.to_owned());
        self
    }

    /// Adds a port. `port` is not range-checked, so invalid services can be written.
    pub fn port(mut self, name: &str, port: u32, protocol: &str, target_port: u32) -> Self {
        self.ports.push(json!({
            "name": name,
            "port": port,
            "protocol": protocol,
            "targetPort": target_port,
        }));
        self
    }

    /// Sets `sessionAffinity: ClientIP`.
    pub fn session_affinity_client_ip(mut self) -> Self {
        self.session_affinity = Some("ClientIP".to_owned());
        self
    }

    /// The document as a JSON value.
    pub fn to_value(&self) -> Value {
        let mut spec = json!({
            "type": "ClusterIP",
            "clusterIP": self.cluster_ips.first(),
            "ports": self.ports,
        });
        if self.cluster_ips.len() > 1 {
            spec["clusterIPs"] = json!(self.cluster_ips);
        }
        if let Some(affinity) = &self.session_affinity {
            spec["sessionAffinity"] = json!(affinity);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        })
    }

    /// The document as YAML text.
    pub fn to_yaml(&self) -> String {
        to_yaml(&self.to_value())
    }
}

/// A `discovery.k8s.io/v1` `EndpointSlice` for one service.
#[derive(Clone, Debug)]
pub struct EndpointSliceYaml {
    name: String,
    namespace: String,
    service: String,
    address_type: String,
    endpoints: Vec<Value>,
    ports: Vec<Value>,
}

impl EndpointSliceYaml {
    fn new(name: &str, service: &str, address_type: &str) -> Self {
        EndpointSliceYaml {
            name: name.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            service: service.to_owned(),
            address_type: address_type.to_owned(),
            endpoints: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// An IPv4 slice `name` of service `service`.
    pub fn ipv4(name: &str, service: &str) -> Self {
        Self::new(name, service, "IPv4")
    }

    /// An IPv6 slice `name` of service `service`.
    pub fn ipv6(name: &str, service: &str) -> Self {
        Self::new(name, service, "IPv6")
    }

    /// Puts the slice in `namespace`.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_owned();
        self
    }

    /// Adds a ready endpoint.
    pub fn endpoint(self, address: impl Display) -> Self {
        self.endpoint_with_readiness(address, true)
    }

    /// Adds an endpoint that is not ready.
    pub fn endpoint_not_ready(self, address: impl Display) -> Self {
        self.endpoint_with_readiness(address, false)
    }

    fn endpoint_with_readiness(mut self, address: impl Display, ready: bool) -> Self {
        self.endpoints.push(json!({
            "addresses": [address.to_string()],
            "conditions": {"ready": ready},
        }));
        self
    }

    /// Adds a port.
    pub fn port(mut self, name: &str, port: u32, protocol: &str) -> Self {
        self.ports
            .push(json!({"name": name, "port": port, "protocol": protocol}));
        self
    }

    /// The document as a JSON value.
    pub fn to_value(&self) -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"kubernetes.io/service-name": self.service},
            },
            "addressType": self.address_type,
            "endpoints": self.endpoints,
            "ports": self.ports,
        })
    }

    /// The document as YAML text.
    pub fn to_yaml(&self) -> String {
        to_yaml(&self.to_value())
    }
}

/// A `mycel.dev/v1alpha1` `Workload`: what standalone mode has instead of a Pod.
#[derive(Clone, Debug)]
pub struct WorkloadYaml {
    value: Value,
}

impl WorkloadYaml {
    /// The workload for a test pod, labelled `app: <app>`, with service account `<app>`.
    pub fn for_pod(pod: &Pod, app: &str) -> Self {
        WorkloadYaml {
            value: json!({
                "apiVersion": "mycel.dev/v1alpha1",
                "kind": "Workload",
                "metadata": {
                    "name": pod.name,
                    "namespace": DEFAULT_NAMESPACE,
                    "labels": {"app": app},
                },
                "spec": {
                    "addresses": [pod.ipv4.to_string(), pod.ipv6.to_string()],
                    "serviceAccount": app,
                    "netns": crate::netns::path(&pod.netns),
                    "interface": pod.host_if,
                    "cgroup": pod.cgroup,
                },
            }),
        }
    }

    /// The workload for a test pod enrolled in the mesh with mutual TLS mode `mode`
    /// (`STRICT`, `PERMISSIVE`).
    pub fn in_mesh(pod: &Pod, app: &str, mode: &str) -> Self {
        Self::for_pod(pod, app)
            .label("mycel.dev/mode", "mesh")
            .label("mycel.dev/mtls-mode", mode)
    }

    /// The same workload as another node's agent sees it: without network namespace,
    /// interface and cgroup, which only exist on the pod's own node. The agent then knows
    /// the pod's addresses and identity but attaches nothing for it.
    pub fn remote(mut self) -> Self {
        if let Some(spec) = self.value["spec"].as_object_mut() {
            for field in ["netns", "interface", "cgroup"] {
                spec.remove(field);
            }
        }
        self
    }

    /// Names another host-side interface (one that may not exist).
    pub fn interface(mut self, name: &str) -> Self {
        self.value["spec"]["interface"] = json!(name);
        self
    }

    /// Adds (or replaces) the label `key: value`, e.g. `mycel.dev/mode: mesh` to enroll
    /// the workload in the mesh.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.value["metadata"]["labels"][key] = json!(value);
        self
    }

    /// The document as a JSON value.
    pub fn to_value(&self) -> Value {
        self.value.clone()
    }

    /// The document as YAML text.
    pub fn to_yaml(&self) -> String {
        to_yaml(&self.value)
    }
}

fn to_yaml(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| panic!("cannot encode {value}: {e}"))
}

/// The directory the agent's file source watches. Files are replaced atomically: written
/// under a staging directory next to it (same file system) and renamed into place.
#[derive(Debug)]
pub struct ResourceDir {
    dir: PathBuf,
    staging: PathBuf,
}

/// Where a test puts the objects the agent should see: files of a resource directory, or
/// objects of the (fake) Kubernetes API. A "file" is a named group of documents; writing it
/// again replaces the group (objects it no longer holds are removed), as for a file.
pub trait Resources {
    /// Replaces (or creates) the group `name` with these YAML documents.
    fn write(&self, name: &str, docs: &[String]);
    /// Removes the group `name` and its objects.
    fn remove(&self, name: &str);
}

impl Resources for ResourceDir {
    fn write(&self, name: &str, docs: &[String]) {
        ResourceDir::write(self, name, docs);
    }

    fn remove(&self, name: &str) {
        ResourceDir::remove(self, name);
    }
}

impl ResourceDir {
    /// Creates `dir` and its staging directory `staging` (outside `dir`).
    pub fn create(dir: PathBuf, staging: PathBuf) -> Self {
        for d in [&dir, &staging] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        ResourceDir { dir, staging }
    }

    /// The watched directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The path of a file in the watched directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Replaces (or creates) `name` with these documents, separated by `---`.
    pub fn write(&self, name: &str, docs: &[String]) {
        self.write_raw(name, &docs.join("\n---\n"));
    }

    /// Enrolls `pods` as Workloads (each labelled `app: <app>` with service account
    /// `<app>`, its interface named so the agent attaches its programs) in
    /// `workloads.yaml`, replacing what that file held.
    pub fn write_workloads(&self, pods: &[(&Pod, &str)]) {
        let docs: Vec<String> = pods
            .iter()
            .map(|(pod, app)| WorkloadYaml::for_pod(pod, app).to_yaml())
            .collect();
        self.write("workloads.yaml", &docs);
    }

    /// Replaces (or creates) `name` with this exact text.
    pub fn write_raw(&self, name: &str, text: &str) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.staging.join(format!(
            "{name}.{}.tmp",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        let dest = self.dir.join(name);
        fs::rename(&tmp, &dest).unwrap_or_else(|e| {
            panic!("cannot rename {} to {}: {e}", tmp.display(), dest.display())
        });
    }

    /// Removes `name` from the watched directory.
    pub fn remove(&self, name: &str) {
        let path = self.dir.join(name);
        fs::remove_file(&path).unwrap_or_else(|e| panic!("cannot remove {}: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_document() {
        let v = ServiceYaml::new("web", "10.96.0.10")
            .cluster_ip("fd00:96::10")
            .port("http", 80, "TCP", 8080)
            .session_affinity_client_ip()
            .to_value();
        assert_eq!(v["kind"], "Service");
        assert_eq!(v["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(v["spec"]["clusterIPs"][1], "fd00:96::10");
        assert_eq!(v["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(v["spec"]["sessionAffinity"], "ClientIP");
    }

    #[test]
    fn endpoint_slice_document() {
        let v = EndpointSliceYaml::ipv6("web-v6", "web")
            .endpoint("fd00::2")
            .endpoint_not_ready("fd00::3")
            .port("http", 8080, "TCP")
            .to_value();
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(v["addressType"], "IPv6");
        assert_eq!(v["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(v["ports"][0]["port"], 8080);
    }

    #[test]
    fn workload_document_local_and_remote() {
        let pod = Pod {
            name: "web-1".to_owned(),
            netns: "myc-1-0-web-1".to_owned(),
            ipv4: "10.0.2.2".parse().expect("address"),
            ipv6: "fd00:0:0:2::2".parse().expect("address"),
            host_if: "veth2".to_owned(),
            cgroup: PathBuf::from("cg/web-1"),
        };
        let local = WorkloadYaml::for_pod(&pod, "web")
            .label("mycel.dev/mode", "mesh")
            .label("mycel.dev/mtls-mode", "STRICT");
        let v = local.to_value();
        assert_eq!(v["metadata"]["labels"]["app"], "web");
        assert_eq!(v["metadata"]["labels"]["mycel.dev/mode"], "mesh");
        assert_eq!(v["metadata"]["labels"]["mycel.dev/mtls-mode"], "STRICT");
        assert_eq!(v["spec"]["interface"], "veth2");
        assert_eq!(v["spec"]["cgroup"], "cg/web-1");
        assert!(v["spec"]["netns"].is_string());

        let remote = local.remote().to_value();
        let spec = remote["spec"].as_object().expect("spec is an object");
        for field in ["netns", "interface", "cgroup"] {
            assert!(!spec.contains_key(field), "{field} is left in {remote}");
        }
        assert_eq!(remote["spec"]["addresses"][0], "10.0.2.2");
        assert_eq!(remote["spec"]["serviceAccount"], "web");
        assert_eq!(remote["metadata"]["labels"]["mycel.dev/mode"], "mesh");
    }
}
