//! Pods as workloads: the one translation of a Kubernetes Pod into the model.
//!
//! Every pod of the cluster with an address of its own becomes a [`state::Workload`]: its
//! addresses map to its identity (namespace, service account) in the ipcache, wherever it
//! runs. Pods of this node also get their host-side interface and cgroup, found on the
//! node by [`discovery`](crate::discovery); until then they count as remote.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use super::super::{Error, Location, Problem, translate};
use crate::state::{self, Kind, Meta, ObjectRef};

/// The service account of pods that name none, as Kubernetes assigns it.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The labels kept of pods of other nodes: policies select only local workloads, so a
/// remote pod's labels serve only to name it in flow metrics (as Istio's do). With tens of
/// thousands of pods this is most of what a pod costs in memory.
/// The mesh labels are kept too: a client's node needs to know whether the destination
/// is enrolled.
const REMOTE_LABELS: [&str; 6] = [
    "app",
    "app.kubernetes.io/name",
    "version",
    "app.kubernetes.io/version",
    state::mesh::MODE_LABEL,
    state::mesh::MTLS_MODE_LABEL,
];

/// What the model needs of a pod, and what discovery needs to find it on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodWorkload {
    /// The workload, without interface and cgroup (discovery adds them for local pods).
    pub workload: state::Workload,
    /// `metadata.uid`, which names the pod's cgroup on the node.
    pub uid: String,
    /// True when `spec.nodeName` is this node.
    pub local: bool,
}

/// Translates a pod. `Ok(None)` for pods that are not workloads of their own: pods on the
/// host's network (their address is the node's), pods without an address yet, and pods
/// that have finished (their address may already belong to another pod).
pub fn pod(
    pod: &Pod,
    node_name: &str,
    location: &Location,
) -> Result<Option<PodWorkload>, Vec<Error>> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Ok(None);
    }
    let Some(status) = pod.status.as_ref() else {
        return Ok(None);
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let object = translate::object_name(&pod.metadata);
    let mut errors = Vec::new();
    let mut invalid = |field: String, problem: Problem| {
        errors.push(Error::Invalid {
            location: location.clone(),
            kind: Kind::Workload,
            object: object.clone(),
            field,
            problem: Box::new(problem),
        })
    };
    // `podIPs` lists every address (dual stack); `podIP` is its first, for old servers.
    let texts: Vec<(String, &str)> = match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("status.podIPs[{i}].ip"), ip.ip.as_str()))
            .collect(),
        _ => status
            .pod_ip
            .as_deref()
            .map(|ip| vec![("status.podIP".to_owned(), ip)])
            .unwrap_or_default(),
    };
    if texts.is_empty() {
        return Ok(None);
    }
    let mut addresses: Vec<IpAddr> = Vec::with_capacity(texts.len());
    for (field, text) in texts {
        match text.parse::<IpAddr>() {
            Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
            Ok(_) => {}
            Err(_) => invalid(field, Problem::NotAnIp(text.to_owned())),
        }
    }
    let Some(name) = pod.metadata.name.clone().filter(|n| !n.is_empty()) else {
        invalid("metadata.name".into(), Problem::Missing);
        return Err(errors);
    };
    let labels = pod.metadata.labels.as_ref();
    if let Some(Err(problems)) = labels.map(state::mesh::MeshLabels::parse) {
        for (label, problem) in problems {
            invalid(
                format!("metadata.labels[{label:?}]"),
                Problem::BadLabel(problem),
            );
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| translate::DEFAULT_NAMESPACE.to_owned());
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
    let local = spec.and_then(|s| s.node_name.as_deref()) == Some(node_name);
    let mut labels = pod.metadata.labels.clone().unwrap_or_default();
    if !local {
        labels.retain(|k, _| REMOTE_LABELS.contains(&k.as_str()));
    }
    Ok(Some(PodWorkload {
        workload: state::Workload {
            meta: Meta {
                id: ObjectRef { namespace, name },
                labels,
                origin: location.origin.clone(),
            },
            addresses,
            service_account,
            netns: None,
            interface: None,
            cgroup: None,
        },
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        local,
    }))
}

/// Drops what the agent never reads from a pod before it is kept or translated, so that
/// tens of thousands of pods cost little memory: managed fields, annotations, owner
/// references, containers and volumes, and status but for phase and addresses.
pub fn strip(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location() -> Location {
        Location::new("kubernetes".into())
    }

    fn pod_json(extra: serde_json::Value) -> Pod {
        let mut base = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "1234-5678",
                         "labels": {"app": "web"},
                         "managedFields": [{"manager": "kubelet"}],
                         "annotations": {"big": "x"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web",
                     "containers": [{"name": "c", "image": "web:1"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.5",
                       "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}],
                       "hostIP": "192.168.0.1"}
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        if let (Some(b), serde_json::Value::Object(p)) = (base.as_object_mut(), &patch) {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) if v.is_object() => merge(existing, v.clone()),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }

    #[test]
    fn a_running_pod_is_a_workload_with_all_its_addresses() {
        let w = pod(&pod_json(serde_json::json!({})), "node-1", &location())
            .unwrap()
            .unwrap();
        assert!(w.local);
        assert_eq!(w.uid, "1234-5678");
        assert_eq!(w.workload.service_account, "web");
        assert_eq!(
            w.workload.addresses,
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(w.workload.meta.id.to_string(), "shop/web-0");
        assert_eq!(
            w.workload.meta.labels.get("app").map(String::as_str),
            Some("web")
        );

        let remote = pod(&pod_json(serde_json::json!({})), "node-2", &location())
            .unwrap()
            .unwrap();
        assert!(!remote.local, "a pod of another node is remote");
        let mut p =
            pod_json(serde_json::json!({"metadata": {"labels": {"pod-template-hash": "abc"}}}));
        let local = pod(&p, "node-1", &location()).unwrap().unwrap();
        assert!(local.workload.meta.labels.contains_key("pod-template-hash"));
        p.spec.as_mut().unwrap().node_name = Some("node-2".into());
        let remote = pod(&p, "node-1", &location()).unwrap().unwrap();
        assert_eq!(
            remote.workload.meta.labels.keys().collect::<Vec<_>>(),
            ["app"],
            "a remote pod keeps only the labels metrics name it by"
        );
    }

    #[test]
    fn pods_without_an_address_of_their_own_are_not_workloads() {
        for extra in [
            serde_json::json!({"spec": {"hostNetwork": true}}),
            serde_json::json!({"status": {"phase": "Succeeded"}}),
            serde_json::json!({"status": {"phase": "Failed"}}),
            serde_json::json!({"status": {"podIP": null, "podIPs": null}}),
        ] {
            let p = pod_json(extra.clone());
            assert_eq!(pod(&p, "node-1", &location()).unwrap(), None, "{extra}");
        }
    }

    #[test]
    fn the_default_service_account_and_namespace_apply() {
        let mut p = pod_json(serde_json::json!({}));
        p.spec.as_mut().unwrap().service_account_name = None;
        p.metadata.namespace = None;
        let w = pod(&p, "node-1", &location()).unwrap().unwrap();
        assert_eq!(w.workload.service_account, "default");
        assert_eq!(w.workload.meta.id.namespace, "default");
    }

    #[test]
    fn a_bad_address_names_the_field() {
        let p = pod_json(
            serde_json::json!({"status": {"podIPs": [{"ip": "10.1.0.5"}, {"ip": "nope"}]}}),
        );
        let errors = pod(&p, "node-1", &location()).unwrap_err();
        let text = errors[0].to_string();
        assert!(text.contains("status.podIPs[1].ip"), "{text}");
        assert!(text.contains("shop/web-0"), "{text}");
    }

    #[test]
    fn strip_keeps_what_translation_reads() {
        let p = pod_json(serde_json::json!({}));
        let mut stripped = p.clone();
        strip(&mut stripped);
        assert!(stripped.metadata.managed_fields.is_none());
        assert!(stripped.metadata.annotations.is_none());
        assert!(stripped.spec.as_ref().unwrap().containers.is_empty());
        assert!(stripped.status.as_ref().unwrap().host_ip.is_none());
        assert_eq!(
            pod(&stripped, "node-1", &location()).unwrap(),
            pod(&p, "node-1", &location()).unwrap()
        );
    }
}
