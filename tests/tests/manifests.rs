//! The Kubernetes manifests, the Helm chart and the Dockerfile, checked without a cluster.
//!
//! - Every document of `manifests/*.yaml`, of `manifests/crds/` and of the rendered chart
//!   deserializes into its k8s-openapi type, and serializing it back gives the same
//!   document: a field the type does not know (a typo such as `imagePullPolcy`, which
//!   k8s-openapi would otherwise drop silently) fails.
//! - The chart, rendered with its default values, gives the same objects as the plain
//!   manifests (less the Namespace, which `helm install --create-namespace` or the operator
//!   creates); its `crds/` holds the same files as `manifests/crds/`.
//! - The agent runs with the capabilities it needs and no more, its RBAC is read-only but
//!   for policy status, its probes name endpoints the agent serves (checked against the
//!   real readiness server), and every setting the manifests give it is one of `mycel
//!   agent`'s flags.
//! - The agent reads the mesh's CA from a Secret mounted read-only, readable by it alone,
//!   at the directory `MYCEL_CA_DIR` names, holding the files `mycel ca create` writes.
//!
//! The helm binary is not needed: [`chart`] renders the subset of Helm's template language
//! the chart uses (listed in the chart's `templates/_helpers.tpl`) and fails on anything
//! else, so the chart cannot drift into syntax this test does not check.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use mycel_agent::identity::{CA_CERT_FILE, CA_KEY_FILE};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

/// The namespace the plain manifests install into; the chart is rendered into it too.
const NAMESPACE: &str = "mycel-system";
/// The capabilities the agent's container adds, and why each is there, is in the DaemonSet.
const CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// One YAML document and where it came from (`file#index`).
#[derive(Clone, Debug)]
struct Doc {
    source: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// The documents of a YAML stream, without empty ones.
fn yaml_docs(source: &str, text: &str) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(de)
            .map_err(|e| format!("{source}: document {i} is not valid YAML: {e}"))?;
        if !value.is_null() {
            docs.push(Doc {
                source: format!("{source}#{i}"),
                value,
            });
        }
    }
    Ok(docs)
}

/// The YAML files directly in `dir`, sorted by name.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

fn file_docs(files: &[PathBuf]) -> Vec<Doc> {
    let root = repo();
    files
        .iter()
        .flat_map(|f| {
            let shown = f.strip_prefix(&root).unwrap_or(f).display().to_string();
            yaml_docs(&shown, &read(f)).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// `manifests/*.yaml`: what `kubectl apply -f manifests/` installs (besides the CRDs).
fn plain_docs() -> Vec<Doc> {
    file_docs(&yaml_files(&repo().join("manifests")))
}

fn crd_docs() -> Vec<Doc> {
    file_docs(&yaml_files(&repo().join("manifests/crds")))
}

fn chart_dir() -> PathBuf {
    repo().join("manifests/helm/mycel")
}

/// The chart rendered as `helm template mycel manifests/helm/mycel -n mycel-system` would,
/// with `overrides` merged into its values.
fn chart_docs(overrides: &Value) -> Vec<Doc> {
    let rendered = chart::render(&chart_dir(), overrides, "mycel", NAMESPACE)
        .unwrap_or_else(|e| panic!("rendering the chart: {e}"));
    rendered
        .iter()
        .flat_map(|(file, text)| {
            yaml_docs(&format!("rendered {file}"), text).unwrap_or_else(|e| panic!("{e}\n{text}"))
        })
        .collect()
}

// ---- strict typing ------------------------------------------------------------------------

/// Deserializes `doc` into its k8s-openapi type and back; every difference between the two
/// is a field the type does not know or a value it does not keep.
fn typed(doc: &Doc) -> Result<(), String> {
    let api = doc.value["apiVersion"].as_str().unwrap_or_default();
    match (api, doc.kind()) {
        ("v1", "Namespace") => roundtrip::<Namespace>(doc),
        ("v1", "ServiceAccount") => roundtrip::<ServiceAccount>(doc),
        ("v1", "ConfigMap") => roundtrip::<ConfigMap>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => roundtrip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            roundtrip::<ClusterRoleBinding>(doc)
        }
        ("apps/v1", "DaemonSet") => roundtrip::<DaemonSet>(doc),
        ("apps/v1", "Deployment") => roundtrip::<Deployment>(doc),
        ("v1", "Service") => roundtrip::<Service>(doc),
        ("policy/v1", "PodDisruptionBudget") => roundtrip::<PodDisruptionBudget>(doc),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            roundtrip::<CustomResourceDefinition>(doc)
        }
        (api, kind) => Err(format!(
            "{}: no known type for apiVersion {api:?} kind {kind:?} (add it to this test)",
            doc.source
        )),
    }
}

fn roundtrip<T: DeserializeOwned + Serialize>(doc: &Doc) -> Result<(), String> {
    let typed: T = serde_path_to_error::deserialize(&doc.value).map_err(|e| {
        format!(
            "{} ({} {}): at {}: {}",
            doc.source,
            doc.kind(),
            doc.name(),
            e.path(),
            e.inner()
        )
    })?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{}: {e}", doc.source))?;
    let mut diffs = Vec::new();
    diff("", &doc.value, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} ({} {}): {}",
            doc.source,
            doc.kind(),
            doc.name(),
            diffs.join("; ")
        ))
    }
}

fn diff(path: &str, written: &Value, kept: &Value, out: &mut Vec<String>) {
    match (written, kept) {
        (Value::Object(w), Value::Object(k)) => {
            for (key, wv) in w {
                let p = format!("{path}.{key}");
                match k.get(key) {
                    Some(kv) => diff(&p, wv, kv, out),
                    None => out.push(format!("{p}: not a field of this kind (a typo?)")),
                }
            }
            for key in k.keys().filter(|key| !w.contains_key(*key)) {
                out.push(format!("{path}.{key}: added by the type"));
            }
        }
        (Value::Array(w), Value::Array(k)) if w.len() == k.len() => {
            for (i, (wv, kv)) in w.iter().zip(k).enumerate() {
                diff(&format!("{path}[{i}]"), wv, kv, out);
            }
        }
        (w, k) if w == k => {}
        (w, k) => out.push(format!("{path}: written {w}, read as {k}")),
    }
}

fn assert_all_typed(docs: &[Doc]) {
    let errors: Vec<String> = docs.iter().filter_map(|d| typed(d).err()).collect();
    assert!(
        errors.is_empty(),
        "documents that do not type-check:\n{}",
        errors.join("\n")
    );
}

// ---- the objects and what must hold for them ----------------------------------------------

/// The objects the agent's install consists of.
#[derive(Debug)]
struct Install {
    daemonset: DaemonSet,
    config: ConfigMap,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    account: ServiceAccount,
    identity: Identity,
}

/// The identity server's objects.
#[derive(Debug)]
struct Identity {
    deployment: Deployment,
    pdb: PodDisruptionBudget,
    service: Service,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    account: ServiceAccount,
}

/// The one object of `kind` named `name`.
fn one_named<T: DeserializeOwned>(docs: &[Doc], kind: &str, name: &str) -> T {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {:?}",
        found.iter().map(|d| &d.source).collect::<Vec<_>>()
    );
    serde_json::from_value(found[0].value.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", found[0].source))
}

fn one<T: DeserializeOwned>(docs: &[Doc], kind: &str) -> T {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind}, found {:?}",
        found.iter().map(|d| &d.source).collect::<Vec<_>>()
    );
    serde_json::from_value(found[0].value.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", found[0].source))
}

impl Install {
    fn from_docs(docs: &[Doc]) -> Self {
        Self {
            daemonset: one(docs, "DaemonSet"),
            config: one(docs, "ConfigMap"),
            role: one_named(docs, "ClusterRole", "mycel"),
            binding: one_named(docs, "ClusterRoleBinding", "mycel"),
            account: one_named(docs, "ServiceAccount", "mycel"),
            identity: Identity {
                deployment: one(docs, "Deployment"),
                pdb: one(docs, "PodDisruptionBudget"),
                service: one(docs, "Service"),
                role: one_named(docs, "ClusterRole", IDENTITY_NAME),
                binding: one_named(docs, "ClusterRoleBinding", IDENTITY_NAME),
                account: one_named(docs, "ServiceAccount", IDENTITY_NAME),
            },
        }
    }

    fn agent(&self) -> &Container {
        let pod = self.pod_spec();
        assert_eq!(pod.containers.len(), 1, "the agent's pod has one container");
        &pod.containers[0]
    }

    fn pod_spec(&self) -> &k8s_openapi::api::core::v1::PodSpec {
        self.daemonset
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("the DaemonSet has a pod spec")
    }

    /// The agent's settings: the ConfigMap's data, then the container's own env values.
    fn settings(&self) -> BTreeMap<String, String> {
        let mut all = self.config.data.clone().unwrap_or_default();
        for e in self.agent().env.iter().flatten() {
            if let Some(v) = &e.value {
                all.insert(e.name.clone(), v.clone());
            }
        }
        all
    }

    /// Every rule this install breaks, as sentences; empty when all hold.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        self.security_problems(&mut p);
        self.rbac_problems(&mut p);
        self.wiring_problems(&mut p);
        self.ca_problems(&mut p);
        self.identity_problems(&mut p);
        p
    }

    /// The Secret volume of the mesh's CA, if the agent mounts one where it should.
    fn ca_volume(&self) -> Option<&k8s_openapi::api::core::v1::Volume> {
        let mount = self
            .agent()
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == CA_DIR)?;
        self.pod_spec()
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
    }

    /// The agent reads the mesh's CA from a Secret mounted read-only, only by itself, at
    /// the directory `MYCEL_CA_DIR` names, with both files the agent loads.
    fn ca_problems(&self, p: &mut Vec<String>) {
        let c = self.agent();
        let Some(mount) = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == CA_DIR)
        else {
            p.push(format!("the CA Secret must be mounted at {CA_DIR}"));
            return;
        };
        if mount.read_only != Some(true) {
            p.push(format!("the CA mount {} must be read-only", mount.name));
        }
        let dir = self.settings().get("MYCEL_CA_DIR").cloned();
        if dir.as_deref() != Some(CA_DIR) {
            p.push(format!("MYCEL_CA_DIR must be {CA_DIR}, is {dir:?}"));
        }
        let Some(secret) = self.ca_volume().and_then(|v| v.secret.as_ref()) else {
            p.push(format!(
                "the volume {} mounted at {CA_DIR} must be a Secret",
                mount.name
            ));
            return;
        };
        if secret.secret_name.as_deref().is_none_or(str::is_empty) {
            p.push("the CA volume names no Secret".into());
        }
        if secret.optional == Some(true) {
            p.push("the CA Secret must not be optional: the agent cannot run without it".into());
        }
        // Without `items` every key of the Secret becomes a file of its name, the CA key
        // included.
        let Some(items) = &secret.items else {
            p.push(format!(
                "the CA volume must list its items: without, the agent would get {CA_KEY_FILE}"
            ));
            return;
        };
        if !items
            .iter()
            .any(|i| i.key == CA_CERT_FILE && i.path == CA_CERT_FILE)
        {
            p.push(format!(
                "the CA Secret's key {CA_CERT_FILE} must be the file {CA_CERT_FILE} in {CA_DIR}"
            ));
        }
        if let Some(i) = items.iter().find(|i| i.key != CA_CERT_FILE) {
            p.push(format!(
                "the agent must not mount the CA key: its CA volume has the item {} \
                 (only the identity server holds {CA_KEY_FILE})",
                i.key
            ));
        }
    }

    /// The agent's settings that point it at the identity server, and the token it proves
    /// its pod with; the identity server itself: its own account and narrow RBAC, two
    /// replicas kept by a PodDisruptionBudget, a Service, readiness, the CA Secret (key
    /// included) mounted only there.
    fn identity_problems(&self, p: &mut Vec<String>) {
        let id = &self.identity;
        let ns = self
            .daemonset
            .metadata
            .namespace
            .clone()
            .unwrap_or_default();
        let settings = self.settings();
        let deploy_spec = id.deployment.spec.clone().unwrap_or_default();
        let pod = deploy_spec.template.spec.clone().unwrap_or_default();
        let template_labels = deploy_spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let selects = |sel: &BTreeMap<String, String>| {
            !sel.is_empty() && sel.iter().all(|(k, v)| template_labels.get(k) == Some(v))
        };

        // The agent's side.
        let service_name = id.service.metadata.name.clone().unwrap_or_default();
        let service_port = id
            .service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|ports| ports.first())
            .map(|port| port.port);
        let want_server = format!(
            "{service_name}.{ns}.svc:{}",
            service_port.unwrap_or_default()
        );
        if settings.get("MYCEL_IDENTITY_SERVER") != Some(&want_server) {
            p.push(format!(
                "MYCEL_IDENTITY_SERVER must be the identity server's Service {want_server}, is {:?}",
                settings.get("MYCEL_IDENTITY_SERVER")
            ));
        }
        let sa = pod.service_account_name.clone().unwrap_or_default();
        let td = settings
            .get("MYCEL_TRUST_DOMAIN")
            .cloned()
            .unwrap_or_default();
        let want_id = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        if settings.get("MYCEL_IDENTITY_SERVER_ID") != Some(&want_id) {
            p.push(format!(
                "MYCEL_IDENTITY_SERVER_ID must be the identity server's SPIFFE ID {want_id}, is {:?}",
                settings.get("MYCEL_IDENTITY_SERVER_ID")
            ));
        }
        let token = settings
            .get("MYCEL_IDENTITY_TOKEN")
            .cloned()
            .unwrap_or_default();
        let (token_dir, token_file) = token.rsplit_once('/').unwrap_or_default();
        let agent_pod = self.pod_spec();
        let token_volume = self
            .agent()
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == token_dir)
            .and_then(|m| {
                agent_pod
                    .volumes
                    .iter()
                    .flatten()
                    .find(|v| v.name == m.name)
            });
        let projected = token_volume
            .and_then(|v| v.projected.as_ref())
            .and_then(|pr| pr.sources.as_ref())
            .and_then(|s| s.iter().find_map(|s| s.service_account_token.clone()));
        match projected {
            Some(t)
                if t.audience.as_deref() == Some("mycel-identity")
                    && t.path == token_file
                    && t.expiration_seconds.is_some_and(|e| e <= 3600) => {}
            other => p.push(format!(
                "MYCEL_IDENTITY_TOKEN {token:?} must be a projected ServiceAccount token \
                 (audience mycel-identity, expirationSeconds at most 3600), is {other:?}"
            )),
        }

        // The server's side.
        if deploy_spec.replicas != Some(2) {
            p.push(format!(
                "the identity server must run 2 replicas, has {:?}",
                deploy_spec.replicas
            ));
        }
        if !selects(
            &deploy_spec
                .selector
                .match_labels
                .clone()
                .unwrap_or_default(),
        ) {
            p.push("the identity server's selector does not select its pods".into());
        }
        let pdb = id.pdb.spec.clone().unwrap_or_default();
        if pdb.min_available != Some(IntOrString::Int(1)) {
            p.push("the identity server's PodDisruptionBudget must keep minAvailable 1".into());
        }
        if !selects(
            &pdb.selector
                .and_then(|s| s.match_labels)
                .unwrap_or_default(),
        ) {
            p.push("the PodDisruptionBudget does not select the identity server's pods".into());
        }
        let svc = id.service.spec.clone().unwrap_or_default();
        if !selects(&svc.selector.unwrap_or_default()) {
            p.push("the Service does not select the identity server's pods".into());
        }
        let account = id.account.metadata.name.clone().unwrap_or_default();
        if sa != account || sa == self.account.metadata.name.clone().unwrap_or_default() {
            p.push(format!(
                "the identity server must run as its own ServiceAccount {account}, runs as {sa:?}"
            ));
        }
        let subjects: Vec<String> = id
            .binding
            .subjects
            .iter()
            .flatten()
            .map(|s| format!("{}/{}", s.namespace.clone().unwrap_or_default(), s.name))
            .collect();
        if subjects != [format!("{ns}/{account}")]
            || id.binding.role_ref.name != id.role.metadata.name.clone().unwrap_or_default()
        {
            p.push(format!(
                "the identity server's ClusterRoleBinding must bind its role to {ns}/{account}, binds {subjects:?}"
            ));
        }
        let mut granted: BTreeSet<String> = BTreeSet::new();
        for rule in id.role.rules.iter().flatten() {
            for g in rule.api_groups.iter().flatten() {
                for r in rule.resources.iter().flatten() {
                    for v in &rule.verbs {
                        granted.insert(format!("{g}/{r}:{v}"));
                    }
                }
            }
        }
        let wanted = BTreeSet::from([
            "authentication.k8s.io/tokenreviews:create".to_owned(),
            "/pods:get".to_owned(),
            "/pods:list".to_owned(),
        ]);
        if granted != wanted {
            p.push(format!(
                "the identity server's ClusterRole grants {granted:?}, expected exactly {wanted:?}"
            ));
        }
        let Some(c) = pod.containers.first() else {
            p.push("the identity server has no container".into());
            return;
        };
        if c.args.as_deref() != Some(&["identity-server".to_owned()][..]) {
            p.push(format!(
                "the identity server must run `mycel identity-server`, args are {:?}",
                c.args
            ));
        }
        if c.readiness_probe.is_none() {
            p.push("the identity server needs a readinessProbe".into());
        }
        let env = |name: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        if env("MYCEL_TRUST_DOMAIN") != Some(td.clone()) {
            p.push("the identity server's MYCEL_TRUST_DOMAIN differs from the agents'".into());
        }
        let agents = format!(
            "{ns}/{}",
            self.account.metadata.name.clone().unwrap_or_default()
        );
        if env("MYCEL_AGENT_SERVICE_ACCOUNT") != Some(agents.clone()) {
            p.push(format!(
                "the identity server's MYCEL_AGENT_SERVICE_ACCOUNT must be {agents}"
            ));
        }
        let listen_port = env("MYCEL_LISTEN")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| i32::from(a.port()));
        let https = c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some("https"))
            .map(|cp| cp.container_port);
        let target = svc
            .ports
            .iter()
            .flatten()
            .next()
            .and_then(|pt| pt.target_port.clone());
        if listen_port.is_none()
            || https != listen_port
            || target != Some(IntOrString::String("https".into()))
        {
            p.push(format!(
                "the Service must reach the port the identity server listens on: MYCEL_LISTEN \
                 port {listen_port:?}, container port https {https:?}, targetPort {target:?}"
            ));
        }
        // The CA key: mounted here, from the same Secret the agents take ca.pem from.
        let agent_secret = self
            .ca_volume()
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone());
        let ca_dir = env("MYCEL_CA_DIR").unwrap_or_default();
        let secret = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == ca_dir && m.read_only == Some(true))
            .and_then(|m| pod.volumes.iter().flatten().find(|v| v.name == m.name))
            .and_then(|v| v.secret.clone());
        match secret {
            Some(s) if s.secret_name == agent_secret && agent_secret.is_some() => {
                let items = s.items.clone().unwrap_or_default();
                for file in [CA_CERT_FILE, CA_KEY_FILE] {
                    if !items.iter().any(|i| i.key == file && i.path == file) {
                        p.push(format!(
                            "the identity server's CA volume lacks the item {file}"
                        ));
                    }
                }
                let modes = std::iter::once(s.default_mode.unwrap_or(0o644))
                    .chain(items.iter().filter_map(|i| i.mode));
                for mode in modes {
                    if mode & 0o007 != 0 {
                        p.push(format!(
                            "the CA key would be readable by others than the identity server (mode {mode:o})"
                        ));
                    }
                }
            }
            other => p.push(format!(
                "the identity server must mount the CA Secret {agent_secret:?} read-only at its \
                 MYCEL_CA_DIR {ca_dir:?}, has {other:?}"
            )),
        }
    }

    fn security_problems(&self, p: &mut Vec<String>) {
        let pod = self.pod_spec();
        if pod.host_network != Some(true) {
            p.push("the agent must run with hostNetwork: it attaches to host interfaces".into());
        }
        if pod.host_pid != Some(true) {
            p.push(
                "the agent must run with hostPID: it enters enrolled pods' network namespaces \
                 through /proc/<pid>/ns/net of their processes"
                    .into(),
            );
        }
        if pod.host_ipc == Some(true) {
            p.push("hostIPC is not needed".into());
        }
        if pod
            .security_context
            .as_ref()
            .is_some_and(|psc| psc.run_as_non_root == Some(true))
        {
            p.push("the agent must run as root to hold its capabilities".into());
        }
        let containers = pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten());
        for c in containers {
            let name = &c.name;
            let Some(sc) = &c.security_context else {
                p.push(format!("container {name}: no securityContext"));
                continue;
            };
            if sc.privileged == Some(true) {
                p.push(format!("container {name}: privileged: true"));
            }
            if sc.allow_privilege_escalation != Some(false) {
                p.push(format!(
                    "container {name}: allowPrivilegeEscalation must be false"
                ));
            }
            let caps = sc.capabilities.clone().unwrap_or_default();
            let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
            if add != BTreeSet::from(CAPABILITIES) {
                p.push(format!(
                    "container {name}: capabilities.add is {add:?}, expected {CAPABILITIES:?}"
                ));
            }
            if caps.drop.as_deref() != Some(&["ALL".to_owned()][..]) {
                p.push(format!("container {name}: capabilities.drop must be [ALL]"));
            }
            for m in c.volume_mounts.iter().flatten() {
                // The API server accepts Bidirectional only for privileged containers.
                if m.mount_propagation.as_deref() == Some("Bidirectional") {
                    p.push(format!(
                        "container {name}: mount {} is Bidirectional, which needs privileged",
                        m.name
                    ));
                }
            }
        }
        let settings = self.settings();
        match settings
            .get("MYCEL_ADMIN_ADDR")
            .map(|a| a.parse::<SocketAddr>())
        {
            Some(Ok(a)) if a.ip().is_loopback() => {}
            other => p.push(format!(
                "MYCEL_ADMIN_ADDR must be a loopback address (debug endpoints), got {other:?}"
            )),
        }
    }

    fn rbac_problems(&self, p: &mut Vec<String>) {
        let read = ["get", "list", "watch"];
        // (group, resource) → the verbs the agent needs, and nothing more.
        let wanted: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::from([
            (("", "services"), BTreeSet::from(read)),
            (("", "pods"), BTreeSet::from(read)),
            (("", "namespaces"), BTreeSet::from(read)),
            (("discovery.k8s.io", "endpointslices"), BTreeSet::from(read)),
            (("mycel.dev", "authorizationpolicies"), BTreeSet::from(read)),
            (
                ("mycel.dev", "authorizationpolicies/status"),
                BTreeSet::from(["patch"]),
            ),
        ]);
        let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for (i, rule) in self.role.rules.iter().flatten().enumerate() {
            if rule.resource_names.is_some() || rule.non_resource_urls.is_some() {
                p.push(format!(
                    "ClusterRole rule {i}: resourceNames/nonResourceURLs are unexpected"
                ));
            }
            for g in rule.api_groups.iter().flatten() {
                for r in rule.resources.iter().flatten() {
                    granted
                        .entry((g.clone(), r.clone()))
                        .or_default()
                        .extend(rule.verbs.iter().cloned());
                }
            }
        }
        for ((g, r), verbs) in &granted {
            if g.contains('*') || r.contains('*') || verbs.iter().any(|v| v.contains('*')) {
                p.push(format!(
                    "ClusterRole grants a wildcard: {g:?} {r:?} {verbs:?}"
                ));
            }
            if r == "secrets" {
                p.push("ClusterRole grants access to Secrets".into());
            }
            match wanted.get(&(g.as_str(), r.as_str())) {
                Some(w) if verbs.iter().all(|v| w.contains(v.as_str())) => {}
                Some(w) => p.push(format!(
                    "ClusterRole grants {verbs:?} on {g:?}/{r}, more than {w:?}"
                )),
                None => p.push(format!(
                    "ClusterRole grants {verbs:?} on {g:?}/{r}, not needed"
                )),
            }
        }
        for ((g, r), w) in &wanted {
            let have = granted.get(&(g.to_string(), r.to_string()));
            if have.is_none_or(|v| w.iter().any(|x| !v.contains(*x))) {
                p.push(format!("ClusterRole lacks {w:?} on {g:?}/{r}"));
            }
        }

        let role_name = self.role.metadata.name.as_deref().unwrap_or_default();
        if self.binding.role_ref.kind != "ClusterRole" || self.binding.role_ref.name != role_name {
            p.push(format!(
                "ClusterRoleBinding refers to {} {}, not ClusterRole {role_name}",
                self.binding.role_ref.kind, self.binding.role_ref.name
            ));
        }
        let account = (
            self.account.metadata.name.clone().unwrap_or_default(),
            self.account.metadata.namespace.clone().unwrap_or_default(),
        );
        let subjects: Vec<(String, String)> = self
            .binding
            .subjects
            .iter()
            .flatten()
            .map(|s| (s.name.clone(), s.namespace.clone().unwrap_or_default()))
            .collect();
        if subjects != [account.clone()] {
            p.push(format!(
                "ClusterRoleBinding subjects {subjects:?} are not just the agent's account {account:?}"
            ));
        }
        let pod_account = self
            .pod_spec()
            .service_account_name
            .clone()
            .unwrap_or_default();
        let ds_ns = self
            .daemonset
            .metadata
            .namespace
            .clone()
            .unwrap_or_default();
        if (pod_account.clone(), ds_ns.clone()) != account {
            p.push(format!(
                "the agent runs as {ds_ns}/{pod_account}, not as the bound account {account:?}"
            ));
        }
    }

    fn wiring_problems(&self, p: &mut Vec<String>) {
        let pod = self.pod_spec();
        let ds = self.daemonset.spec.as_ref().expect("DaemonSet spec");
        let c = self.agent();

        let tolerates_all = pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
        if !tolerates_all {
            p.push("the agent must tolerate every taint (operator: Exists)".into());
        }
        if pod.priority_class_name.as_deref() != Some("system-node-critical") {
            p.push("priorityClassName must be system-node-critical".into());
        }
        let rolling = ds
            .update_strategy
            .as_ref()
            .and_then(|u| u.rolling_update.as_ref());
        if rolling.and_then(|r| r.max_unavailable.clone()) != Some(IntOrString::Int(1)) {
            p.push("updateStrategy.rollingUpdate.maxUnavailable must be 1".into());
        }
        let template_labels = ds.template.metadata.as_ref().and_then(|m| m.labels.clone());
        for (k, v) in ds.selector.match_labels.iter().flatten() {
            if template_labels.as_ref().and_then(|l| l.get(k)) != Some(v) {
                p.push(format!(
                    "the pod template lacks the selector's label {k}={v}"
                ));
            }
        }
        if c.args.as_deref() != Some(&["agent".to_owned()][..]) {
            p.push(format!(
                "the container must run `mycel agent`, args are {:?}",
                c.args
            ));
        }

        // Settings reach the agent from the ConfigMap (envFrom) and the env list.
        let config_name = self.config.metadata.name.clone().unwrap_or_default();
        let from: Vec<String> = c
            .env_from
            .iter()
            .flatten()
            .filter_map(|e| e.config_map_ref.as_ref().map(|r| r.name.clone()))
            .collect();
        if from != [config_name.clone()] {
            p.push(format!(
                "envFrom must name ConfigMap {config_name}, names {from:?}"
            ));
        }
        if self.config.metadata.namespace != self.daemonset.metadata.namespace {
            p.push("the ConfigMap and the DaemonSet are in different namespaces".into());
        }
        let node_name = c.env.iter().flatten().find(|e| e.name == "NODE_NAME");
        let field = node_name
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        if field != Some("spec.nodeName") {
            p.push("NODE_NAME must come from the downward API's spec.nodeName".into());
        }
        let config_keys: BTreeSet<&String> =
            self.config.data.iter().flatten().map(|(k, _)| k).collect();
        for e in c.env.iter().flatten() {
            if config_keys.contains(&e.name) {
                p.push(format!(
                    "{} is set both in the ConfigMap and in env",
                    e.name
                ));
            }
        }

        // Ports: the container's named ports are the ports the agent listens on.
        let settings = self.settings();
        let port_of = |key: &str| {
            settings
                .get(key)
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map(|a| i32::from(a.port()))
        };
        let named = |name: &str| {
            c.ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name))
                .map(|cp| cp.container_port)
        };
        for (port, key) in [
            ("metrics", "MYCEL_METRICS_ADDR"),
            ("readiness", "MYCEL_READINESS_ADDR"),
        ] {
            match (named(port), port_of(key)) {
                (Some(a), Some(b)) if a == b => {}
                (a, b) => p.push(format!(
                    "container port {port} is {a:?} but {key} listens on {b:?}"
                )),
            }
        }
        let annotations = ds
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        let scrape_port = annotations
            .get("prometheus.io/port")
            .and_then(|v| v.parse::<i32>().ok());
        if annotations.get("prometheus.io/scrape").map(String::as_str) != Some("true")
            || scrape_port != named("metrics")
        {
            p.push(format!(
                "the prometheus.io annotations must scrape the metrics port, have {annotations:?}"
            ));
        }
        for (what, probe, path) in [
            ("livenessProbe", &c.liveness_probe, LIVENESS_PATH),
            ("readinessProbe", &c.readiness_probe, READINESS_PATH),
        ] {
            let get = probe.as_ref().and_then(|pr| pr.http_get.as_ref());
            match get {
                Some(g)
                    if g.path.as_deref() == Some(path)
                        && g.port == IntOrString::String("readiness".into())
                        && g.host.is_none() => {}
                _ => p.push(format!(
                    "{what} must GET {path} on the named port readiness, is {get:?}"
                )),
            }
        }
    }
}

/// Where the agent finds the mesh's CA in its container, and the files it reads there.
const CA_DIR: &str = "/var/run/secrets/mycel/ca";
/// The identity server's objects (ServiceAccount, ClusterRole, binding) are named so.
const IDENTITY_NAME: &str = "mycel-identity";

/// The paths the probes use; [`probes_reach_the_agents_endpoints`] checks that the
/// agent's readiness listener answers them as a kubelet needs.
const LIVENESS_PATH: &str = "/healthz";
const READINESS_PATH: &str = "/readyz";

// ---- the agent's own definition of its settings --------------------------------------------

/// `mycel agent`'s settings: environment variable → (long flag, whether it takes a value).
fn agent_env_settings() -> BTreeMap<String, (String, bool)> {
    use clap::CommandFactory as _;
    let mut cli = mycel_agent::cli::Cli::command();
    cli.build();
    let agent = cli
        .find_subcommand("agent")
        .expect("`mycel agent` exists")
        .clone();
    cli.get_arguments()
        .chain(agent.get_arguments())
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_owned();
            let long = a.get_long()?.to_owned();
            Some((env, (long, a.get_action().takes_values())))
        })
        .collect()
}

/// Checks that every setting is a `mycel agent` flag and that the command line parses.
fn settings_problems(install: &Install) -> Vec<String> {
    let known = agent_env_settings();
    let mut p = Vec::new();
    let mut argv: Vec<String> = vec!["mycel".into(), "agent".into()];
    let c = install.agent();
    let names = install
        .config
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .chain(
            c.env
                .iter()
                .flatten()
                .map(|e| (e.name.clone(), e.value.clone())),
        );
    for (name, value) in names {
        let Some((long, takes_value)) = known.get(&name) else {
            p.push(format!(
                "{name} is not a setting of `mycel agent` (see `mycel agent --help`)"
            ));
            continue;
        };
        // Values from the downward API are only known on the node; any node name will do.
        let value = value.unwrap_or_else(|| "node-a".into());
        match (takes_value, value.as_str()) {
            (true, v) => argv.extend([format!("--{long}"), v.to_owned()]),
            (false, "true") => argv.push(format!("--{long}")),
            (false, "false") => {}
            (false, v) => p.push(format!("{name}={v:?}: expected true or false")),
        }
    }
    if let Err(e) = <mycel_agent::cli::Cli as clap::Parser>::try_parse_from(&argv) {
        p.push(format!("`{}` does not parse: {e}", argv.join(" ")));
    }
    p
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn plain_manifests_are_strictly_typed() {
    let docs = plain_docs();
    let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Deployment",
            "Namespace",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount"
        ])
    );
    assert_all_typed(&docs);
    for d in docs
        .iter()
        .filter(|d| d.kind() != "ClusterRole" && d.kind() != "ClusterRoleBinding")
    {
        assert_eq!(
            d.value["metadata"]["namespace"]
                .as_str()
                .or(d.value["metadata"]["name"].as_str()),
            Some(NAMESPACE),
            "{}: every namespaced object belongs in {NAMESPACE}",
            d.source
        );
    }
}

#[test]
fn crds_are_strictly_typed_and_match_the_rbac() {
    let crds = crd_docs();
    assert!(
        !crds.is_empty(),
        "manifests/crds/ holds no CRD (cargo xtask codegen writes them)"
    );
    assert_all_typed(&crds);
    let install = Install::from_docs(&plain_docs());
    let rules: Vec<_> = install.role.rules.iter().flatten().collect();
    for doc in &crds {
        let crd: CustomResourceDefinition =
            serde_json::from_value(doc.value.clone()).expect("type-checked above");
        let (group, plural) = (&crd.spec.group, &crd.spec.names.plural);
        let grants = |resource: &str, verb: &str| {
            rules.iter().any(|r| {
                r.api_groups.iter().flatten().any(|g| g == group)
                    && r.resources.iter().flatten().any(|x| x == resource)
                    && r.verbs.iter().any(|v| v == verb)
            })
        };
        for verb in ["get", "list", "watch"] {
            assert!(
                grants(plural, verb),
                "the agent cannot {verb} {plural}.{group}"
            );
        }
        let has_status = crd
            .spec
            .versions
            .iter()
            .any(|v| v.subresources.as_ref().is_some_and(|s| s.status.is_some()));
        if has_status {
            assert!(
                grants(&format!("{plural}/status"), "patch"),
                "the agent cannot patch {plural}/status.{group}"
            );
        }
    }
}

#[test]
fn plain_manifests_hold_the_rules() {
    let install = Install::from_docs(&plain_docs());
    let mut problems = install.problems();
    problems.extend(settings_problems(&install));
    assert!(
        problems.is_empty(),
        "manifests/*.yaml:\n{}",
        problems.join("\n")
    );
}

/// The rules catch what they are for: each mutation of the good manifests breaks one.
#[test]
fn the_rules_catch_mistakes() {
    let good = plain_docs();
    let mutate = |kind: &str, f: &dyn Fn(&mut Value)| -> Vec<Doc> {
        let mut docs = good.clone();
        let d = docs
            .iter_mut()
            .find(|d| d.kind() == kind)
            .expect("kind present");
        f(&mut d.value);
        docs
    };
    let typo = mutate("DaemonSet", &|v: &mut Value| {
        let c = &mut v["spec"]["template"]["spec"]["containers"][0];
        c["imagePullPolcy"] = json!("Always");
    });
    let err = typo
        .iter()
        .find_map(|d| typed(d).err())
        .expect("a typo is caught");
    assert!(err.contains("imagePullPolcy"), "{err}");

    /// What the report must mention, the kind changed, and the change.
    type Mutation = (&'static str, &'static str, Box<dyn Fn(&mut Value)>);
    let cases: Vec<Mutation> = vec![
        (
            "hostPID",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]
                    .as_object_mut()
                    .expect("pod spec")
                    .remove("hostPID");
            }),
        ),
        (
            "privileged",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] =
                    json!(true)
            }),
        ),
        (
            "capabilities.add",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
                .as_array_mut().expect("add").push(json!("SYS_PTRACE"))
            }),
        ),
        (
            "allowPrivilegeEscalation",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] =
                    json!(true)
            }),
        ),
        (
            "Bidirectional",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][1]["mountPropagation"] =
                    json!("Bidirectional")
            }),
        ),
        (
            "more than",
            "ClusterRole",
            Box::new(|v: &mut Value| {
                v["rules"][0]["verbs"]
                    .as_array_mut()
                    .expect("verbs")
                    .push(json!("delete"))
            }),
        ),
        (
            "wildcard",
            "ClusterRole",
            Box::new(|v: &mut Value| v["rules"][1]["resources"] = json!(["*"])),
        ),
        (
            "Secrets",
            "ClusterRole",
            Box::new(|v: &mut Value| {
                v["rules"][0]["resources"]
                    .as_array_mut()
                    .expect("resources")
                    .push(json!("secrets"))
            }),
        ),
        (
            "lacks",
            "ClusterRole",
            Box::new(|v: &mut Value| {
                v["rules"].as_array_mut().expect("rules").pop();
            }),
        ),
        (
            "NODE_NAME",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["fieldRef"]
                    ["fieldPath"] = json!("metadata.name")
            }),
        ),
        (
            "livenessProbe",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] =
                    json!(15020)
            }),
        ),
        (
            "readinessProbe",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] =
                    json!("/ready")
            }),
        ),
        (
            "listens on",
            "ConfigMap",
            Box::new(|v: &mut Value| v["data"]["MYCEL_READINESS_ADDR"] = json!("0.0.0.0:9999")),
        ),
        (
            "loopback",
            "ConfigMap",
            Box::new(|v: &mut Value| v["data"]["MYCEL_ADMIN_ADDR"] = json!("0.0.0.0:15000")),
        ),
        (
            "maxUnavailable",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                v["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = json!("100%")
            }),
        ),
        (
            "tolerate",
            "DaemonSet",
            Box::new(|v: &mut Value| v["spec"]["template"]["spec"]["tolerations"] = json!([])),
        ),
        (
            "not a setting",
            "ConfigMap",
            Box::new(|v: &mut Value| v["data"]["MYCEL_FLOW_LOGS"] = json!("/var/log/f")),
        ),
        (
            "expected true or false",
            "ConfigMap",
            Box::new(|v: &mut Value| v["data"]["MYCEL_DETACH_ON_EXIT"] = json!("yes")),
        ),
        (
            "read-only",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                ca_mount(v)["readOnly"] = json!(false);
            }),
        ),
        (
            "MYCEL_CA_DIR",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                let env = v["spec"]["template"]["spec"]["containers"][0]["env"]
                    .as_array_mut()
                    .expect("env");
                let ca = env
                    .iter_mut()
                    .find(|e| e["name"] == "MYCEL_CA_DIR")
                    .expect("MYCEL_CA_DIR in env");
                ca["value"] = json!("/etc/mycel/ca");
            }),
        ),
        (
            "readable by others",
            "Deployment",
            Box::new(|v: &mut Value| {
                ca_secret(v)["defaultMode"] = json!(0o644);
            }),
        ),
        (
            "lacks the item ca-key.pem",
            "Deployment",
            Box::new(|v: &mut Value| {
                ca_secret(v)["items"]
                    .as_array_mut()
                    .expect("items")
                    .retain(|i| i["key"] != "ca-key.pem");
            }),
        ),
        (
            "must not mount the CA key",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                ca_secret(v)["items"]
                    .as_array_mut()
                    .expect("items")
                    .push(json!({"key": "ca-key.pem", "path": "ca-key.pem"}));
            }),
        ),
        (
            "must list its items",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                ca_secret(v)
                    .as_object_mut()
                    .expect("secret")
                    .remove("items");
            }),
        ),
        (
            "2 replicas",
            "Deployment",
            Box::new(|v: &mut Value| v["spec"]["replicas"] = json!(1)),
        ),
        (
            "minAvailable 1",
            "PodDisruptionBudget",
            Box::new(|v: &mut Value| v["spec"]["minAvailable"] = json!(0)),
        ),
        (
            "its own ServiceAccount",
            "Deployment",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["serviceAccountName"] = json!("mycel");
            }),
        ),
        (
            "readinessProbe",
            "Deployment",
            Box::new(|v: &mut Value| {
                v["spec"]["template"]["spec"]["containers"][0]
                    .as_object_mut()
                    .expect("container")
                    .remove("readinessProbe");
            }),
        ),
        (
            "projected ServiceAccount token",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                let volumes = v["spec"]["template"]["spec"]["volumes"]
                    .as_array_mut()
                    .expect("volumes");
                let token = volumes
                    .iter_mut()
                    .find(|vol| vol.get("projected").is_some())
                    .expect("the token volume");
                token["projected"]["sources"][0]["serviceAccountToken"]["audience"] =
                    json!("https://kubernetes.default.svc");
            }),
        ),
        (
            "MYCEL_IDENTITY_SERVER must",
            "ConfigMap",
            Box::new(|v: &mut Value| {
                v["data"]["MYCEL_IDENTITY_SERVER"] = json!("mycel-identity.elsewhere.svc:15012");
            }),
        ),
        (
            "must not be optional",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                ca_secret(v)["optional"] = json!(true);
            }),
        ),
        (
            "must be mounted",
            "DaemonSet",
            Box::new(|v: &mut Value| {
                ca_mount(v)["mountPath"] = json!("/ca");
            }),
        ),
    ];
    for (expected, kind, f) in cases {
        let docs = mutate(kind, &*f);
        assert_all_typed(&docs);
        let install = Install::from_docs(&docs);
        let mut problems = install.problems();
        problems.extend(settings_problems(&install));
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "a mutation of the {kind} that should be reported as {expected:?} gave {problems:?}"
        );
    }
}

/// The agent's mount of the CA Secret in a DaemonSet document.
fn ca_mount(ds: &mut Value) -> &mut Value {
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .expect("volumeMounts")
        .iter_mut()
        .find(|m| m["mountPath"] == CA_DIR)
        .expect("a mount at the CA directory")
}

/// The `secret` of the CA volume in a DaemonSet document.
fn ca_secret(ds: &mut Value) -> &mut Value {
    let volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
        .iter_mut()
        .find(|v| v.get("secret").is_some())
        .expect("a Secret volume");
    &mut volume["secret"]
}

#[test]
fn the_agent_gets_the_ca_secret_that_mycel_ca_create_writes() {
    let install = Install::from_docs(&plain_docs());
    let secret = install
        .ca_volume()
        .and_then(|v| v.secret.clone())
        .expect("the CA volume is a Secret");
    assert_eq!(secret.secret_name.as_deref(), Some("mycel-ca"));
    let readme = read(&repo().join("manifests/README.md"));
    let create = "mycel ca create --dir ca && kubectl -n mycel-system create secret generic mycel-ca --from-file=ca/";
    assert!(
        readme.contains(create),
        "manifests/README.md must say how to create the CA Secret: {create}"
    );
    // What `mycel ca create` writes is what the Secret volume shows the agent.
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path().join("ca");
    mycel_agent::identity::Ca::create(&dir, "cluster.local").expect("a new CA");
    let written: BTreeSet<String> = fs::read_dir(&dir)
        .expect("the CA directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    // The identity server gets both files; the agents the certificate alone.
    let server_secret = install
        .identity
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.volumes.as_ref())
        .and_then(|v| v.iter().find_map(|v| v.secret.clone()))
        .expect("the identity server's CA volume is a Secret");
    assert_eq!(server_secret.secret_name, secret.secret_name);
    let mounted: BTreeSet<String> = server_secret
        .items
        .iter()
        .flatten()
        .map(|i| i.path.clone())
        .collect();
    assert_eq!(
        written, mounted,
        "`kubectl create secret --from-file=ca/` makes a key of each file in ca/"
    );
    let agent_mounted: BTreeSet<String> = secret
        .items
        .iter()
        .flatten()
        .map(|i| i.path.clone())
        .collect();
    assert_eq!(
        agent_mounted,
        BTreeSet::from([CA_CERT_FILE.to_owned()]),
        "the agents mount the trust bundle only, never the CA key"
    );
}

/// `manifests/uninstall/` (not applied with `manifests/`: it must run only once the agents
/// are gone): a DaemonSet whose init container runs `mycel uninstall` with what it needs to
/// reach every pin, interface and pod namespace the agents changed.
#[test]
fn uninstall_manifest_is_strictly_typed_and_reaches_what_the_agents_left() {
    let docs = file_docs(&yaml_files(&repo().join("manifests/uninstall")));
    assert_all_typed(&docs);
    let ds = &docs
        .iter()
        .find(|d| d.kind() == "DaemonSet")
        .expect("a DaemonSet in manifests/uninstall/")
        .value;
    assert_eq!(ds["metadata"]["namespace"], NAMESPACE);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"], true,
        "clsact filters are on host interfaces"
    );
    assert_eq!(
        pod["hostPID"], true,
        "pod namespaces are found through /proc"
    );
    let init = &pod["initContainers"][0];
    assert_eq!(init["args"][0], "uninstall");
    let caps: BTreeSet<&str> = init["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for cap in ["NET_ADMIN", "SYS_ADMIN"] {
        assert!(caps.contains(cap), "{cap} in {caps:?}");
    }
    assert_ne!(init["securityContext"]["privileged"], true);
    let mounts: BTreeSet<&str> = init["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains("/sys/fs/bpf"), "{mounts:?}");
    assert!(mounts.contains("/run/netns"), "{mounts:?}");
}

#[test]
fn chart_with_default_values_renders_the_plain_manifests() {
    let rendered = chart_docs(&json!({}));
    assert_all_typed(&rendered);
    let key = |d: &Doc| {
        (
            d.kind().to_owned(),
            d.value["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            d.name().to_owned(),
        )
    };
    let chart: BTreeMap<_, &Doc> = rendered.iter().map(|d| (key(d), d)).collect();
    assert_eq!(
        chart.len(),
        rendered.len(),
        "the chart renders an object twice"
    );
    let plain = plain_docs();
    // Helm needs the release's namespace before it installs anything, so the chart does
    // not create it (manifests/README.md says how).
    let plain: BTreeMap<_, &Doc> = plain
        .iter()
        .filter(|d| d.kind() != "Namespace")
        .map(|d| (key(d), d))
        .collect();
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>(),
        "the chart and manifests/*.yaml hold different objects"
    );
    for (k, doc) in &chart {
        let mut diffs = Vec::new();
        diff("", &plain[k].value, &doc.value, &mut diffs);
        assert!(
            diffs.is_empty(),
            "{} and {} differ ({} is the plain manifest): {}",
            plain[k].source,
            doc.source,
            plain[k].source,
            diffs.join("; ")
        );
    }
}

#[test]
fn chart_with_other_values_still_holds_the_rules() {
    let overrides = json!({
        "image": {"repository": "registry.example/mycel", "tag": "9.9.9", "pullPolicy": "Always"},
        "trustDomain": "mesh.example",
        "logLevel": "mycel_agent=debug",
        "ports": {"admin": 16000, "metrics": 16020, "readiness": 16021},
        "nodeSelector": null,
        "extraEnv": [{"name": "MYCEL_FLOW_LOG", "value": "/var/log/mycel/flows.log"}],
        "resources": {"requests": {"cpu": "50m"}},
        "ca": {"secretName": "mesh-root-ca"},
    });
    let docs = chart_docs(&overrides);
    assert_all_typed(&docs);
    let install = Install::from_docs(&docs);
    let mut problems = install.problems();
    problems.extend(settings_problems(&install));
    assert!(
        problems.is_empty(),
        "the chart with {overrides}:\n{}",
        problems.join("\n")
    );

    let c = install.agent();
    assert_eq!(c.image.as_deref(), Some("registry.example/mycel:9.9.9"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert!(
        install.pod_spec().node_selector.is_none(),
        "an empty nodeSelector is left out"
    );
    let settings = install.settings();
    assert_eq!(settings["MYCEL_TRUST_DOMAIN"], "mesh.example");
    assert_eq!(settings["MYCEL_LOG"], "mycel_agent=debug");
    assert_eq!(settings["MYCEL_ADMIN_ADDR"], "127.0.0.1:16000");
    assert_eq!(settings["MYCEL_FLOW_LOG"], "/var/log/mycel/flows.log");
    let secret = install.ca_volume().and_then(|v| v.secret.clone());
    assert_eq!(
        secret.and_then(|s| s.secret_name).as_deref(),
        Some("mesh-root-ca"),
        "ca.secretName names the Secret"
    );
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("50m"));
}

#[test]
fn chart_metadata_and_crds_match_the_workspace() {
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    #[expect(dead_code, reason = "read to reject fields Helm does not know")]
    struct ChartYaml {
        api_version: String,
        name: String,
        description: String,
        #[serde(rename = "type")]
        chart_type: String,
        version: String,
        app_version: String,
        kube_version: String,
        home: String,
        sources: Vec<String>,
    }
    let dir = chart_dir();
    let meta: ChartYaml = serde_yaml_ng::from_str(&read(&dir.join("Chart.yaml")))
        .unwrap_or_else(|e| panic!("manifests/helm/mycel/Chart.yaml: {e}"));
    assert_eq!(meta.api_version, "v2");
    assert_eq!(meta.chart_type, "application");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        meta.version, version,
        "Chart.yaml version follows the workspace's"
    );
    assert_eq!(
        meta.app_version, version,
        "Chart.yaml appVersion follows the workspace's"
    );
    let install = Install::from_docs(&plain_docs());
    let image = install.agent().image.clone().unwrap_or_default();
    assert!(
        image.ends_with(&format!(":{version}")),
        "the plain DaemonSet's image {image} is not the workspace's version {version}"
    );

    // The chart's crds/ is a copy of manifests/crds/ (Helm installs crds/ before the
    // templates); a stale copy fails here.
    let plain: BTreeMap<String, String> = yaml_files(&repo().join("manifests/crds"))
        .iter()
        .map(|f| {
            (
                f.file_name().expect("file").to_string_lossy().into_owned(),
                read(f),
            )
        })
        .collect();
    let copy: BTreeMap<String, String> = yaml_files(&dir.join("crds"))
        .iter()
        .map(|f| {
            (
                f.file_name().expect("file").to_string_lossy().into_owned(),
                read(f),
            )
        })
        .collect();
    assert!(
        plain.contains_key("authorizationpolicies.mycel.dev.yaml"),
        "manifests/crds/authorizationpolicies.mycel.dev.yaml is missing"
    );
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        copy.keys().collect::<Vec<_>>(),
        "manifests/helm/mycel/crds/ must hold the files of manifests/crds/"
    );
    for (name, text) in &plain {
        assert!(
            copy[name] == *text,
            "manifests/helm/mycel/crds/{name} differs from manifests/crds/{name}: copy it over"
        );
    }
}

/// The probes' paths, asked of the agent's real readiness listener: liveness answers
/// 200 whether or not the agent is ready (a kubelet restarts a container whose liveness
/// fails), readiness follows the agent's state.
#[tokio::test]
async fn probes_reach_the_agents_endpoints() {
    use mycel_agent::{
        admin::{Role, Shared, serve_with_flows},
        metrics::KernelCounters,
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let shared = Arc::new(Shared {
        ready: Default::default(),
        status: Default::default(),
        owners: Default::default(),
        registry: prometheus_client::registry::Registry::default(),
        kernel: Arc::new(KernelCounters::new(dir.path())),
        pin_dir: dir.path().to_path_buf(),
    });
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let (task, addr) = serve_with_flows(loopback, Role::Readiness, shared.clone(), None)
        .await
        .expect("the readiness listener binds on loopback");

    let not_ready = (
        get(addr, LIVENESS_PATH).await,
        get(addr, READINESS_PATH).await,
    );
    shared.ready.store(true, Ordering::Release);
    let ready = (
        get(addr, LIVENESS_PATH).await,
        get(addr, READINESS_PATH).await,
    );
    task.abort();
    assert_eq!(
        (not_ready, ready),
        ((200, 503), (200, 200)),
        "(liveness {LIVENESS_PATH}, readiness {READINESS_PATH}) status codes on the \
         readiness port, before and after the agent is ready"
    );
}

/// The status code of `GET path` on `addr` (HTTP/1.1, bounded in time).
async fn get(addr: SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut response = Vec::new();
        s.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} on {addr} timed out"))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("GET {path} on {addr}: not an HTTP response: {response:?}"))
}

#[test]
fn dockerfile_builds_with_the_setup_of_the_workspace() {
    let dockerfile = read(&repo().join("Dockerfile"));
    let instructions: Vec<String> = dockerfile
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    let rust = env!("CARGO_PKG_RUST_VERSION");
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    assert!(
        froms[0].starts_with(&format!("FROM rust:{rust}-bookworm ")),
        "the build stage uses the workspace's rust-version {rust}: {}",
        froms[0]
    );
    let build_stage = instructions
        .iter()
        .take_while(|l| !std::ptr::eq(*l, froms[1]))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    // Setup is the same code development machines run: the packages and bpf-linker's
    // version cannot drift from xtask/src/setup.
    assert!(
        build_stage.contains("cargo xtask setup"),
        "the build stage runs cargo xtask setup"
    );
    assert!(
        build_stage.contains("cargo build --release --locked -p mycel-agent --bin mycel"),
        "the build stage builds the mycel binary"
    );
    let runtime = instructions
        .iter()
        .skip_while(|l| !std::ptr::eq(*l, froms[1]))
        .cloned()
        .collect::<Vec<_>>();
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("COPY --from=build ") && l.ends_with(" /usr/local/bin/mycel")),
        "the runtime stage holds /usr/local/bin/mycel: {runtime:?}"
    );
    assert!(
        runtime.iter().any(|l| l == "USER 0:0"),
        "the agent runs as root: {runtime:?}"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l == r#"ENTRYPOINT ["/usr/local/bin/mycel"]"#),
        "the entrypoint is the mycel binary: {runtime:?}"
    );

    let ignore = read(&repo().join(".dockerignore"));
    let ignored: BTreeSet<&str> = ignore.lines().map(str::trim).collect();
    for entry in ["target", "target-*", ".git"] {
        assert!(
            ignored.contains(entry),
            ".dockerignore must exclude {entry}"
        );
    }
}

// ---- the renderer's own guard --------------------------------------------------------------

#[test]
fn renderer_rejects_what_it_does_not_understand() {
    let values = json!({"a": {"b": "x", "n": 3, "empty": []}, "list": [1, 2]});
    let ok = |src: &str| chart::render_one(src, &values).unwrap_or_else(|e| panic!("{src}: {e}"));
    assert_eq!(ok("v: {{ .Values.a.b }}"), "v: x");
    assert_eq!(ok("v: {{ .Values.a.n | quote }}"), "v: \"3\"");
    assert_eq!(
        ok("a:\n  {{- if .Values.a.empty }} yes{{ end }}\nb"),
        "a:\nb"
    );
    assert_eq!(
        ok("l:{{ toYaml .Values.list | nindent 2 }}"),
        "l:\n  - 1\n  - 2"
    );
    assert_eq!(ok("{{- with .Values.a }}{{ .b }}{{ end -}}\n"), "x");

    for (src, why) in [
        ("{{ .Values.a.missing }}", "missing"),
        ("{{ .Values.a }}", "toYaml"),
        ("{{ range .Values.list }}{{ end }}", "range"),
        ("{{ tpl .Values.a.b . }}", "tpl"),
        ("{{ default \"x\" .Values.a.b }}", "default"),
        ("{{ if .Values.a.b }}x{{ else }}y{{ end }}", "else"),
        ("{{ $x := .Values.a.b }}", "$x"),
        ("{{ .Values.a.b", "closed"),
        ("{{ if .Values.a.b }}", "end"),
        ("{{ (quote .Values.a.b) }}", "("),
        ("{{ include \"nope\" . }}", "nope"),
    ] {
        let err = chart::render_one(src, &values).expect_err(src);
        assert!(
            err.contains(why),
            "{src}: expected an error about {why:?}, got {err}"
        );
    }
}

/// A renderer for the subset of Helm's template language the chart uses (the list is in
/// the chart's `templates/_helpers.tpl`). Anything else is an error, never a guess.
mod chart {
    use std::{collections::BTreeMap, fs, path::Path};

    use serde_json::{Value, json};

    /// `templates/*.yaml` of the chart in `dir`, rendered with its values.yaml and
    /// `overrides` merged in: (file name, text) by file name.
    pub fn render(
        dir: &Path,
        overrides: &Value,
        release: &str,
        namespace: &str,
    ) -> Result<Vec<(String, String)>, String> {
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let values_path = dir.join("values.yaml");
        let mut values: Value = serde_yaml_ng::from_str(&read(&values_path)?)
            .map_err(|e| format!("{}: {e}", values_path.display()))?;
        merge(&mut values, overrides);
        let chart_path = dir.join("Chart.yaml");
        let meta: Value = serde_yaml_ng::from_str(&read(&chart_path)?)
            .map_err(|e| format!("{}: {e}", chart_path.display()))?;
        let field = |k: &str| {
            meta.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("{}: no {k}", chart_path.display()))
        };
        let root = json!({
            "Values": values,
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
            "Chart": {"Name": field("name")?, "Version": field("version")?, "AppVersion": field("appVersion")?},
        });

        let mut files: Vec<_> = fs::read_dir(dir.join("templates"))
            .map_err(|e| format!("cannot list the chart's templates: {e}"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot list the chart's templates: {e}"))?;
        files.sort();
        let mut defines = BTreeMap::new();
        let mut manifests = Vec::new();
        for path in files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let nodes = parse(&name, &read(&path)?)?;
            if name.starts_with('_') && name.ends_with(".tpl") {
                for node in nodes {
                    match node {
                        Node::Define(n, body) => {
                            defines.insert(n, body);
                        }
                        Node::Text(t) if t.trim().is_empty() => {}
                        _ => return Err(format!("{name}: only defines belong in a helper file")),
                    }
                }
            } else if name.ends_with(".yaml") {
                manifests.push((name, nodes));
            } else {
                return Err(format!(
                    "templates/{name}: not a .yaml template or a _*.tpl helper"
                ));
            }
        }
        let ctx = Ctx {
            root: &root,
            defines: &defines,
        };
        manifests
            .into_iter()
            .map(|(name, nodes)| {
                let mut out = String::new();
                ctx.nodes(&nodes, &root, &mut out, 0)
                    .map_err(|e| format!("templates/{name}: {e}"))?;
                Ok((name, out))
            })
            .collect()
    }

    /// Renders one template text with `values` as `.Values` (for the renderer's own test).
    pub fn render_one(src: &str, values: &Value) -> Result<String, String> {
        let nodes = parse("inline", src)?;
        let root = json!({"Values": values, "Release": {}, "Chart": {}});
        let defines = BTreeMap::new();
        let mut out = String::new();
        Ctx {
            root: &root,
            defines: &defines,
        }
        .nodes(&nodes, &root, &mut out, 0)?;
        Ok(out)
    }

    /// Helm's value merge: maps merge key by key, anything else replaces; null removes a
    /// default (kept here as null, which `if` and `with` treat as Helm treats a removed key).
    fn merge(base: &mut Value, over: &Value) {
        match (base, over) {
            (Value::Object(b), Value::Object(o)) => {
                for (k, v) in o {
                    match b.get_mut(k) {
                        Some(bv) if bv.is_object() && v.is_object() => merge(bv, v),
                        _ => {
                            b.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            (b, o) => *b = o.clone(),
        }
    }

    #[derive(Debug)]
    enum Node {
        Text(String),
        Print(Pipeline),
        If(Pipeline, Vec<Node>),
        With(Pipeline, Vec<Node>),
        Define(String, Vec<Node>),
    }

    /// A pipeline and where it was written (`file:line`), for errors.
    #[derive(Debug)]
    struct Pipeline {
        at: String,
        cmds: Vec<Cmd>,
    }

    #[derive(Debug)]
    enum Cmd {
        Func(Func, Vec<Arg>),
        Arg(Arg),
    }

    #[derive(Debug, Clone, Copy)]
    enum Func {
        Quote,
        ToYaml,
        Indent,
        Nindent,
        Include,
    }

    #[derive(Debug)]
    enum Arg {
        /// `.a.b` (from the current value) or `$.a.b` (from the top).
        Field {
            from_root: bool,
            path: Vec<String>,
        },
        Str(String),
        Int(i64),
    }

    /// One `{{ … }}` with its text, or the text between them.
    enum Token {
        Text(String),
        Action { body: String, at: String },
    }

    fn is_space(c: char) -> bool {
        matches!(c, ' ' | '\t' | '\r' | '\n')
    }

    fn lex(file: &str, src: &str) -> Result<Vec<Token>, String> {
        let mut tokens = Vec::new();
        let mut rest = src;
        let mut line = 1;
        let mut trim_next = false;
        while !rest.is_empty() {
            let Some(open) = rest.find("{{") else {
                let text = if trim_next {
                    rest.trim_start_matches(is_space)
                } else {
                    rest
                };
                tokens.push(Token::Text(text.to_owned()));
                break;
            };
            let mut text = &rest[..open];
            line += text.matches('\n').count();
            if trim_next {
                text = text.trim_start_matches(is_space);
            }
            let at = format!("{file}:{line}");
            let mut inner = &rest[open + 2..];
            if inner.starts_with('-') && inner[1..].starts_with(is_space) {
                text = text.trim_end_matches(is_space);
                inner = &inner[1..];
            }
            tokens.push(Token::Text(text.to_owned()));
            let trimmed = inner.trim_start_matches(is_space);
            let (body, after) = if trimmed.starts_with("/*") {
                // A comment ends at the first `*/`, which the closing braces must follow.
                let end = trimmed
                    .find("*/")
                    .ok_or_else(|| format!("{at}: comment not closed"))?;
                let after = &trimmed[end + 2..];
                let close = after
                    .find("}}")
                    .filter(|&c| {
                        after[..c]
                            .trim_matches(is_space)
                            .trim_end_matches('-')
                            .is_empty()
                    })
                    .ok_or_else(|| format!("{at}: a comment must end right before }}}}"))?;
                (&after[..close], &after[close + 2..])
            } else {
                let close = inner
                    .find("}}")
                    .ok_or_else(|| format!("{at}: action not closed with }}}}"))?;
                (&inner[..close], &inner[close + 2..])
            };
            trim_next = body.ends_with('-') && body[..body.len() - 1].ends_with(is_space);
            let body = if trim_next {
                &body[..body.len() - 1]
            } else {
                body
            };
            line += rest[open..rest.len() - after.len()].matches('\n').count();
            if !trimmed.starts_with("/*") {
                tokens.push(Token::Action {
                    body: body.trim_matches(is_space).to_owned(),
                    at,
                });
            }
            rest = after;
        }
        Ok(tokens)
    }

    fn parse(file: &str, src: &str) -> Result<Vec<Node>, String> {
        // Open blocks: (keyword, pipeline or define name, where, the nodes so far).
        enum Open {
            If(Pipeline),
            With(Pipeline),
            Define(String),
        }
        let mut stack: Vec<(Open, String, Vec<Node>)> = Vec::new();
        let mut nodes = Vec::new();
        for token in lex(file, src)? {
            let (body, at) = match token {
                Token::Text(t) => {
                    if !t.is_empty() {
                        nodes.push(Node::Text(t));
                    }
                    continue;
                }
                Token::Action { body, at } => (body, at),
            };
            let (word, rest) = body.split_once(is_space).unwrap_or((body.as_str(), ""));
            match word {
                "if" | "with" => {
                    let p = pipeline(rest, &at)?;
                    let open = if word == "if" {
                        Open::If(p)
                    } else {
                        Open::With(p)
                    };
                    stack.push((open, at, std::mem::take(&mut nodes)));
                }
                "define" => {
                    if !stack.is_empty() {
                        return Err(format!("{at}: define inside a block"));
                    }
                    let name = rest
                        .trim()
                        .strip_prefix('"')
                        .and_then(|r| r.strip_suffix('"'))
                        .ok_or_else(|| format!("{at}: define needs a quoted name"))?;
                    stack.push((
                        Open::Define(name.to_owned()),
                        at,
                        std::mem::take(&mut nodes),
                    ));
                }
                "end" if rest.is_empty() => {
                    let (open, _, outer) = stack
                        .pop()
                        .ok_or_else(|| format!("{at}: end without if, with or define"))?;
                    let body = std::mem::replace(&mut nodes, outer);
                    nodes.push(match open {
                        Open::If(p) => Node::If(p, body),
                        Open::With(p) => Node::With(p, body),
                        Open::Define(n) => Node::Define(n, body),
                    });
                }
                _ if [
                    "else", "range", "template", "block", "break", "continue", "end",
                ]
                .contains(&word) =>
                {
                    return Err(format!(
                        "{at}: `{word}` is outside the chart's template subset"
                    ));
                }
                _ => nodes.push(Node::Print(pipeline(&body, &at)?)),
            }
        }
        match stack.pop() {
            Some((_, at, _)) => Err(format!("{at}: block has no end")),
            None => Ok(nodes),
        }
    }

    fn pipeline(src: &str, at: &str) -> Result<Pipeline, String> {
        let mut words: Vec<Vec<String>> = vec![Vec::new()];
        let mut chars = src.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                c if is_space(c) => {}
                '|' => words.push(Vec::new()),
                '"' => {
                    let mut s = String::new();
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => {
                                return Err(format!("{at}: escapes in strings are not supported"));
                            }
                            Some(c) => s.push(c),
                            None => return Err(format!("{at}: string not closed")),
                        }
                    }
                    words
                        .last_mut()
                        .expect("one command")
                        .push(format!("\"{s}"));
                }
                '(' | ')' => {
                    return Err(format!("{at}: ( ) are outside the chart's template subset"));
                }
                c => {
                    let mut w = String::from(c);
                    while let Some(&n) = chars.peek() {
                        if is_space(n) || n == '|' || n == '"' || n == '(' || n == ')' {
                            break;
                        }
                        w.push(n);
                        chars.next();
                    }
                    words.last_mut().expect("one command").push(w);
                }
            }
        }
        let cmds = words
            .into_iter()
            .map(|cmd| {
                let (first, args) = cmd
                    .split_first()
                    .ok_or_else(|| format!("{at}: empty command in a pipeline"))?;
                let func = match first.as_str() {
                    "quote" => Some(Func::Quote),
                    "toYaml" => Some(Func::ToYaml),
                    "indent" => Some(Func::Indent),
                    "nindent" => Some(Func::Nindent),
                    "include" => Some(Func::Include),
                    _ => None,
                };
                match func {
                    Some(f) => Ok(Cmd::Func(
                        f,
                        args.iter().map(|a| arg(a, at)).collect::<Result<_, _>>()?,
                    )),
                    None if args.is_empty() => Ok(Cmd::Arg(arg(first, at)?)),
                    None => Err(format!(
                        "{at}: `{first}` is outside the chart's template subset"
                    )),
                }
            })
            .collect::<Result<_, String>>()?;
        Ok(Pipeline {
            at: at.to_owned(),
            cmds,
        })
    }

    fn arg(word: &str, at: &str) -> Result<Arg, String> {
        let field = |from_root, path: &str| Arg::Field {
            from_root,
            path: path
                .split('.')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        if let Some(s) = word.strip_prefix('"') {
            Ok(Arg::Str(s.to_owned()))
        } else if word == "." || word.starts_with('.') {
            Ok(field(false, word))
        } else if word == "$" || word.starts_with("$.") {
            Ok(field(true, &word[1..]))
        } else if let Ok(n) = word.parse() {
            Ok(Arg::Int(n))
        } else {
            Err(format!(
                "{at}: `{word}` is outside the chart's template subset"
            ))
        }
    }

    struct Ctx<'a> {
        root: &'a Value,
        defines: &'a BTreeMap<String, Vec<Node>>,
    }

    impl Ctx<'_> {
        fn nodes(
            &self,
            nodes: &[Node],
            dot: &Value,
            out: &mut String,
            depth: usize,
        ) -> Result<(), String> {
            for node in nodes {
                match node {
                    Node::Text(t) => out.push_str(t),
                    Node::Print(p) => out.push_str(&print(&self.eval(p, dot, depth)?, &p.at)?),
                    Node::If(p, body) => {
                        if truthy(&self.eval(p, dot, depth)?) {
                            self.nodes(body, dot, out, depth)?;
                        }
                    }
                    Node::With(p, body) => {
                        let v = self.eval(p, dot, depth)?;
                        if truthy(&v) {
                            self.nodes(body, &v, out, depth)?;
                        }
                    }
                    Node::Define(name, _) => {
                        return Err(format!("define {name:?} outside a helper file"));
                    }
                }
            }
            Ok(())
        }

        fn eval(&self, p: &Pipeline, dot: &Value, depth: usize) -> Result<Value, String> {
            let at = &p.at;
            let mut piped: Option<Value> = None;
            for cmd in &p.cmds {
                let value = match cmd {
                    Cmd::Arg(a) if piped.is_none() => self.arg(a, dot, at)?,
                    Cmd::Arg(_) => return Err(format!("{at}: only a function can follow |")),
                    Cmd::Func(f, args) => {
                        let mut vals =
                            args.iter()
                                .map(|a| self.arg(a, dot, at))
                                .collect::<Result<Vec<_>, _>>()?;
                        vals.extend(piped.take());
                        self.call(*f, &vals, at, depth)?
                    }
                };
                piped = Some(value);
            }
            piped.ok_or_else(|| format!("{at}: empty action"))
        }

        fn arg(&self, a: &Arg, dot: &Value, at: &str) -> Result<Value, String> {
            match a {
                Arg::Str(s) => Ok(Value::String(s.clone())),
                Arg::Int(n) => Ok(json!(n)),
                Arg::Field { from_root, path } => {
                    let mut v = if *from_root { self.root } else { dot };
                    for (i, key) in path.iter().enumerate() {
                        v = v.get(key).ok_or_else(|| {
                            format!(
                                "{at}: .{} is missing (declare it in values.yaml)",
                                path[..=i].join(".")
                            )
                        })?;
                    }
                    Ok(v.clone())
                }
            }
        }

        fn call(&self, f: Func, args: &[Value], at: &str, depth: usize) -> Result<Value, String> {
            let text = |v: &Value| print(v, at);
            match (f, args) {
                (Func::Quote, [v]) => {
                    let s = text(v)?;
                    if s.contains(['"', '\\']) || s.contains(char::is_control) {
                        return Err(format!("{at}: quote of {s:?} would need escapes"));
                    }
                    Ok(Value::String(format!("\"{s}\"")))
                }
                (Func::ToYaml, [v]) => serde_yaml_ng::to_string(v)
                    .map(|s| Value::String(s.trim_end_matches('\n').to_owned()))
                    .map_err(|e| format!("{at}: toYaml: {e}")),
                (Func::Indent | Func::Nindent, [Value::Number(n), v]) => {
                    let n = n
                        .as_u64()
                        .ok_or_else(|| format!("{at}: indent needs a count"))?
                        as usize;
                    let pad = " ".repeat(n);
                    let body = format!("{pad}{}", text(v)?.replace('\n', &format!("\n{pad}")));
                    Ok(Value::String(match f {
                        Func::Nindent => format!("\n{body}"),
                        _ => body,
                    }))
                }
                (Func::Include, [Value::String(name), dot]) => {
                    let body = self
                        .defines
                        .get(name)
                        .ok_or_else(|| format!("{at}: no define {name:?}"))?;
                    if depth > 16 {
                        return Err(format!("{at}: include nested too deep"));
                    }
                    let mut out = String::new();
                    self.nodes(body, dot, &mut out, depth + 1)?;
                    Ok(Value::String(out))
                }
                (f, args) => Err(format!(
                    "{at}: {f:?} does not take {} argument(s) like these",
                    args.len()
                )),
            }
        }
    }

    /// Go templates print scalars; maps and lists need toYaml.
    fn print(v: &Value, at: &str) -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            Value::Null => Err(format!("{at}: prints null")),
            Value::Array(_) | Value::Object(_) => {
                Err(format!("{at}: prints a list or map: use toYaml"))
            }
        }
    }

    fn truthy(v: &Value) -> bool {
        match v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }
    }
}
