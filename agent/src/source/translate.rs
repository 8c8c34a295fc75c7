//! Translation of Kubernetes objects into the model's types, with validation.
//!
//! This is the one place each kind is translated, whatever the source: the file source
//! deserializes YAML into the `k8s-openapi` types (and mycel's own [`Workload`]) and calls
//! these functions, and the Kubernetes source will do the same with what the API server
//! sends. Every problem is reported with the field's path; a translation that finds any
//! problem returns all of them and no object.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Serialize};

// The AuthorizationPolicy types are mycel-api's, so that the file source, the Kubernetes
// source and the CRD the API server checks all read a policy the same way.
pub use mycel_api::{
    POLICY_API_VERSION, POLICY_KIND,
    policy::{
        AuthorizationPolicy, AuthorizationPolicySpec, Condition, OperationSpec, PortValue,
        RuleFrom, RuleSpec, RuleTo, SourceSpec, WorkloadSelector,
    },
};

use super::{Error, Location, Problem};
use crate::state::{
    self, Affinity, Kind, Meta, ObjectRef, Protocol,
    policy::{Action, Cidr, Operation, Rule, Source, StringMatch},
};

/// `apiVersion` of [`Workload`].
pub const WORKLOAD_API_VERSION: &str = "mycel.dev/v1alpha1";
/// `kind` of [`Workload`].
pub const WORKLOAD_KIND: &str = "Workload";
/// The label that names an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The namespace of objects that name none, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest network interface name Linux accepts (`IFNAMSIZ` minus the terminating NUL).
const MAX_INTERFACE_NAME: usize = 15;

/// mycel's `Workload` (`mycel.dev/v1alpha1`): a workload on this host, standing in for a Pod
/// in standalone mode.
///
/// ```yaml
/// apiVersion: mycel.dev/v1alpha1
/// kind: Workload
/// metadata: {name: web-0, namespace: shop, labels: {app: web}}
/// spec:
///   addresses: [10.0.1.5]
///   serviceAccount: web
///   netns: /run/netns/web-0
///   interface: veth-web0
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// [`WORKLOAD_API_VERSION`].
    pub api_version: String,
    /// [`WORKLOAD_KIND`].
    pub kind: String,
    /// Name, namespace (default `default`) and labels; other fields are ignored.
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: WorkloadSpec,
}

/// The `spec` of a [`Workload`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The workload's IP addresses (at least one).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The service account whose identity the workload has.
    #[serde(default)]
    pub service_account: String,
    /// The workload's network namespace (a path such as `/run/netns/web-0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The host side of the workload's network interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The workload's cgroup (v2) directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// Collects the problems of one object.
struct Problems<'a> {
    location: &'a Location,
    kind: Kind,
    object: String,
    errors: Vec<Error>,
}

impl<'a> Problems<'a> {
    fn new(location: &'a Location, kind: Kind, metadata: &ObjectMeta) -> Self {
        Problems {
            location,
            kind,
            object: object_name(metadata),
            errors: Vec::new(),
        }
    }

    fn add(&mut self, field: impl Into<String>, problem: Problem) {
        self.errors.push(Error::Invalid {
            location: self.location.clone(),
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            problem: Box::new(problem),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<Error>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

/// `namespace/name` as written (with the default namespace), or `(unnamed)`.
pub fn object_name(metadata: &ObjectMeta) -> String {
    match metadata.name.as_deref() {
        Some(name) if !name.is_empty() => format!("{}/{name}", namespace(metadata)),
        _ => "(unnamed)".to_owned(),
    }
}

fn namespace(metadata: &ObjectMeta) -> &str {
    match metadata.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE,
    }
}

fn meta(metadata: &ObjectMeta, location: &Location, problems: &mut Problems<'_>) -> Meta {
    let name = metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        problems.add("metadata.name", Problem::Missing);
    }
    Meta {
        id: ObjectRef {
            namespace: namespace(metadata).to_owned(),
            name,
        },
        labels: metadata.labels.clone().unwrap_or_default(),
        origin: location.origin.clone(),
    }
}

fn port(value: i64, field: String, problems: &mut Problems<'_>) -> u16 {
    match u16::try_from(value) {
        Ok(port) if port != 0 => port,
        _ => {
            problems.add(field, Problem::PortOutOfRange(value));
            0
        }
    }
}

fn protocol(value: Option<&str>, field: String, problems: &mut Problems<'_>) -> Protocol {
    match value {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some(other) => {
            problems.add(field, Problem::UnsupportedProtocol(other.to_owned()));
            Protocol::Tcp
        }
    }
}

/// An absent or empty port name is no name.
fn port_name(name: Option<&String>) -> Option<String> {
    name.filter(|n| !n.is_empty()).cloned()
}

/// Translates a Service.
///
/// Headless Services (`clusterIP: None`) and Services without an address (`clusterIP`
/// absent or empty, as there is no allocator outside Kubernetes; also `ExternalName`) get no
/// cluster IPs and so no frontend.
pub fn service(svc: &core::Service, location: &Location) -> Result<state::Service, Vec<Error>> {
    let mut problems = Problems::new(location, Kind::Service, &svc.metadata);
    let meta = meta(&svc.metadata, location, &mut problems);
    let Some(spec) = &svc.spec else {
        problems.add("spec", Problem::Missing);
        return Err(problems.errors);
    };

    let cluster_ips = cluster_ips(spec, &mut problems);

    let mut ports = Vec::new();
    let all = spec.ports.as_deref().unwrap_or_default();
    let mut seen: HashMap<(u16, Protocol), usize> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, p) in all.iter().enumerate() {
        let number = port(
            i64::from(p.port),
            format!("spec.ports[{i}].port"),
            &mut problems,
        );
        let protocol = protocol(
            p.protocol.as_deref(),
            format!("spec.ports[{i}].protocol"),
            &mut problems,
        );
        let name = port_name(p.name.as_ref());
        match &name {
            None if all.len() > 1 => {
                problems.add(format!("spec.ports[{i}].name"), Problem::NameRequired)
            }
            None => {}
            Some(name) => {
                if let Some(first) = names.insert(name.clone(), i) {
                    problems.add(
                        format!("spec.ports[{i}].name"),
                        Problem::Duplicate(format!("spec.ports[{first}].name")),
                    );
                }
            }
        }
        if number != 0
            && let Some(first) = seen.insert((number, protocol), i)
        {
            problems.add(
                format!("spec.ports[{i}]"),
                Problem::Duplicate(format!("spec.ports[{first}] ({number}/{protocol})")),
            );
        }
        ports.push(state::ServicePort {
            name,
            port: number,
            protocol,
        });
    }

    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => Affinity::None,
        Some("ClientIP") => Affinity::ClientIp,
        Some(other) => {
            problems.add(
                "spec.sessionAffinity",
                Problem::UnsupportedSessionAffinity(other.to_owned()),
            );
            Affinity::None
        }
    };

    problems.finish(state::Service {
        meta,
        cluster_ips,
        ports,
        affinity,
    })
}

/// The cluster IPs of a Service: `spec.clusterIPs` if given (its first entry must equal
/// `spec.clusterIP` when both are), else `spec.clusterIP`.
fn cluster_ips(spec: &core::ServiceSpec, problems: &mut Problems<'_>) -> Vec<IpAddr> {
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let single = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty());
    let list = spec.cluster_ips.as_deref().filter(|ips| !ips.is_empty());
    if let (Some(single), Some(list)) = (single, list)
        && list.first().map(String::as_str) != Some(single)
    {
        problems.add(
            "spec.clusterIPs",
            Problem::ClusterIpMismatch {
                cluster_ip: single.to_owned(),
                cluster_ips: list.to_vec(),
            },
        );
        return Vec::new();
    }
    let (field, raw): (&str, Vec<&str>) = match (list, single) {
        (Some(list), _) => ("spec.clusterIPs", list.iter().map(String::as_str).collect()),
        (None, Some(single)) => ("spec.clusterIP", vec![single]),
        (None, None) => return Vec::new(),
    };
    if raw == ["None"] {
        return Vec::new();
    }
    let mut ips = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        let field = if field == "spec.clusterIP" {
            field.to_owned()
        } else {
            format!("{field}[{i}]")
        };
        match text.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => problems.add(field, Problem::NotAnIp((*text).to_owned())),
        }
    }
    if raw.len() > 2 || (ips.len() == 2 && ips[0].is_ipv4() == ips[1].is_ipv4()) {
        problems.add(
            field,
            Problem::ClusterIpFamilies(raw.iter().map(|s| (*s).to_owned()).collect()),
        );
    }
    ips
}

/// Translates an EndpointSlice.
pub fn endpoint_slice(
    slice: &discovery::EndpointSlice,
    location: &Location,
) -> Result<state::EndpointSlice, Vec<Error>> {
    let mut problems = Problems::new(location, Kind::EndpointSlice, &slice.metadata);
    let meta = meta(&slice.metadata, location, &mut problems);
    let service = meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .filter(|s| !s.is_empty())
        .cloned();
    if service.is_none() {
        problems.add(
            format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
            Problem::Missing,
        );
    }

    let family = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        other => {
            problems.add(
                "addressType",
                Problem::UnsupportedAddressType(other.to_owned()),
            );
            None
        }
    };

    let mut endpoints = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let mut addresses = Vec::new();
        for (j, text) in endpoint.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match (text.parse::<IpAddr>(), family) {
                (Err(_), _) => problems.add(field, Problem::NotAnIp(text.clone())),
                (Ok(ip), Some(v4)) if ip.is_ipv4() != v4 => problems.add(
                    field,
                    Problem::WrongFamily {
                        address: text.clone(),
                        family: if v4 { "IPv4" } else { "IPv6" },
                    },
                ),
                (Ok(ip), _) => addresses.push(ip),
            }
        }
        let ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        endpoints.push(state::Endpoint { addresses, ready });
    }

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(number) = p.port else {
            problems.add(format!("ports[{i}].port"), Problem::Missing);
            continue;
        };
        let number = port(i64::from(number), format!("ports[{i}].port"), &mut problems);
        let protocol = protocol(
            p.protocol.as_deref(),
            format!("ports[{i}].protocol"),
            &mut problems,
        );
        ports.push(state::EndpointPort {
            name: port_name(p.name.as_ref()),
            port: number,
            protocol,
        });
    }

    problems.finish(state::EndpointSlice {
        meta,
        service: service.unwrap_or_default(),
        endpoints,
        ports,
    })
}

/// Checks the labels that enroll an object in the mesh (see [`state::mesh`]).
fn mesh_labels(labels: &BTreeMap<String, String>, problems: &mut Problems<'_>) {
    if let Err(errors) = state::mesh::MeshLabels::parse(labels) {
        for (label, problem) in errors {
            problems.add(
                format!("metadata.labels[{label:?}]"),
                Problem::BadLabel(problem),
            );
        }
    }
}

/// Translates a Namespace: only its name and labels matter (mesh enrollment).
pub fn namespace_object(
    ns: &core::Namespace,
    location: &Location,
) -> Result<state::Namespace, Vec<Error>> {
    let mut problems = Problems::new(location, Kind::Namespace, &ns.metadata);
    problems.object = ns
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "(unnamed)".to_owned());
    let mut meta = meta(&ns.metadata, location, &mut problems);
    // Namespaces are not namespaced.
    meta.id.namespace = String::new();
    mesh_labels(&meta.labels, &mut problems);
    problems.finish(state::Namespace { meta })
}

/// Translates a mycel [`Workload`].
pub fn workload(w: &Workload, location: &Location) -> Result<state::Workload, Vec<Error>> {
    let mut problems = Problems::new(location, Kind::Workload, &w.metadata);
    let meta = meta(&w.metadata, location, &mut problems);
    mesh_labels(&meta.labels, &mut problems);
    let spec = &w.spec;

    if spec.addresses.is_empty() {
        problems.add("spec.addresses", Problem::Empty);
    }
    let mut addresses = Vec::new();
    let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for (i, text) in spec.addresses.iter().enumerate() {
        let field = format!("spec.addresses[{i}]");
        match text.parse::<IpAddr>() {
            Ok(ip) => {
                if let Some(first) = seen.insert(ip, i) {
                    problems.add(
                        field,
                        Problem::Duplicate(format!("spec.addresses[{first}]")),
                    );
                } else {
                    addresses.push(ip);
                }
            }
            Err(_) => problems.add(field, Problem::NotAnIp(text.clone())),
        }
    }
    if spec.service_account.is_empty() {
        problems.add("spec.serviceAccount", Problem::Missing);
    }
    if spec
        .netns
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        problems.add("spec.netns", Problem::Empty);
    }
    if spec
        .cgroup
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        problems.add("spec.cgroup", Problem::Empty);
    }
    match spec.interface.as_deref() {
        Some("") => problems.add("spec.interface", Problem::Empty),
        Some(name) if name.len() > MAX_INTERFACE_NAME => problems.add(
            "spec.interface",
            Problem::TooLong(name.to_owned(), MAX_INTERFACE_NAME),
        ),
        _ => {}
    }

    problems.finish(state::Workload {
        meta,
        addresses,
        service_account: spec.service_account.clone(),
        netns: spec.netns.clone(),
        interface: spec.interface.clone(),
        cgroup: spec.cgroup.clone(),
    })
}

/// Translates a mycel [`AuthorizationPolicy`].
///
/// Rejects, naming the field: an action other than ALLOW and DENY, a port that is not a
/// number in 1-65535, an address or CIDR that does not parse, a principal or namespace
/// pattern with `*` inside, a malformed service account, and (as Istio does) a `source` or
/// `operation` that is absent or sets nothing. HTTP-level fields are accepted and listed in
/// [`state::AuthorizationPolicy::l7_fields`].
pub fn authorization_policy(
    p: &AuthorizationPolicy,
    location: &Location,
) -> Result<state::AuthorizationPolicy, Vec<Error>> {
    let mut problems = Problems::new(location, Kind::AuthorizationPolicy, &p.metadata);
    let meta = meta(&p.metadata, location, &mut problems);
    let spec = &p.spec;
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(other @ ("AUDIT" | "CUSTOM")) => {
            problems.add("spec.action", Problem::UnsupportedAction(other.to_owned()));
            Action::Allow
        }
        Some(other) => {
            problems.add("spec.action", Problem::UnknownAction(other.to_owned()));
            Action::Allow
        }
    };
    let mut l7_fields = Vec::new();
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        let mut rule = Rule::default();
        for (j, from) in r.from.iter().flatten().enumerate() {
            let at = format!("{at}.from[{j}].source");
            match &from.source {
                None => problems.add(at, Problem::Missing),
                Some(source) => {
                    let l7 = [
                        ("requestPrincipals", &source.request_principals),
                        ("notRequestPrincipals", &source.not_request_principals),
                        ("remoteIpBlocks", &source.remote_ip_blocks),
                        ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
                    ];
                    rule.has_l7 |= note_l7(&at, &l7, &mut l7_fields);
                    let translated = self::source(source, &at, &meta.id.namespace, &mut problems);
                    let l4 = [
                        &source.principals,
                        &source.not_principals,
                        &source.namespaces,
                        &source.not_namespaces,
                        &source.ip_blocks,
                        &source.not_ip_blocks,
                        &source.service_accounts,
                        &source.not_service_accounts,
                    ];
                    if !l4.into_iter().chain(l7.map(|(_, v)| v)).any(is_set) {
                        problems.add(at, Problem::Empty);
                    }
                    rule.from.push(translated);
                }
            }
        }
        for (j, to) in r.to.iter().flatten().enumerate() {
            let at = format!("{at}.to[{j}].operation");
            match &to.operation {
                None => problems.add(at, Problem::Missing),
                Some(op) => {
                    let l7 = [
                        ("hosts", &op.hosts),
                        ("notHosts", &op.not_hosts),
                        ("methods", &op.methods),
                        ("notMethods", &op.not_methods),
                        ("paths", &op.paths),
                        ("notPaths", &op.not_paths),
                    ];
                    rule.has_l7 |= note_l7(&at, &l7, &mut l7_fields);
                    let translated = Operation {
                        ports: ports(op.ports.as_deref(), &format!("{at}.ports"), &mut problems),
                        not_ports: ports(
                            op.not_ports.as_deref(),
                            &format!("{at}.notPorts"),
                            &mut problems,
                        ),
                    };
                    let ports_set =
                        |p: &Option<Vec<PortValue>>| p.as_ref().is_some_and(|p| !p.is_empty());
                    if !ports_set(&op.ports)
                        && !ports_set(&op.not_ports)
                        && !l7.iter().any(|(_, v)| is_set(v))
                    {
                        problems.add(at, Problem::Empty);
                    }
                    rule.to.push(translated);
                }
            }
        }
        if r.when.as_ref().is_some_and(|w| !w.is_empty()) {
            rule.has_l7 = true;
            l7_fields.push(format!("{at}.when"));
        }
        rules.push(rule);
    }
    problems.finish(state::AuthorizationPolicy {
        meta,
        selector: spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default(),
        action,
        rules,
        l7_fields,
    })
}

/// Whether a list field is set (an empty list is not, as in Istio).
fn is_set(value: &Option<Vec<String>>) -> bool {
    value.as_ref().is_some_and(|v| !v.is_empty())
}

/// Records the HTTP-level fields set; true if any is.
fn note_l7(at: &str, fields: &[(&str, &Option<Vec<String>>)], out: &mut Vec<String>) -> bool {
    let mut any = false;
    for (name, value) in fields {
        if is_set(value) {
            out.push(format!("{at}.{name}"));
            any = true;
        }
    }
    any
}

/// The L4 fields of a `source`.
fn source(s: &SourceSpec, at: &str, namespace: &str, problems: &mut Problems<'_>) -> Source {
    Source {
        principals: patterns(
            s.principals.as_deref(),
            &format!("{at}.principals"),
            true,
            problems,
        ),
        not_principals: patterns(
            s.not_principals.as_deref(),
            &format!("{at}.notPrincipals"),
            true,
            problems,
        ),
        namespaces: patterns(
            s.namespaces.as_deref(),
            &format!("{at}.namespaces"),
            false,
            problems,
        ),
        not_namespaces: patterns(
            s.not_namespaces.as_deref(),
            &format!("{at}.notNamespaces"),
            false,
            problems,
        ),
        service_accounts: service_accounts(
            s.service_accounts.as_deref(),
            &format!("{at}.serviceAccounts"),
            namespace,
            problems,
        ),
        not_service_accounts: service_accounts(
            s.not_service_accounts.as_deref(),
            &format!("{at}.notServiceAccounts"),
            namespace,
            problems,
        ),
        ip_blocks: cidrs(s.ip_blocks.as_deref(), &format!("{at}.ipBlocks"), problems),
        not_ip_blocks: cidrs(
            s.not_ip_blocks.as_deref(),
            &format!("{at}.notIpBlocks"),
            problems,
        ),
    }
}

/// Principal or namespace patterns; principals may start with `spiffe://`.
fn patterns(
    values: Option<&[String]>,
    at: &str,
    principal: bool,
    problems: &mut Problems<'_>,
) -> Vec<StringMatch> {
    let mut out = Vec::new();
    for (i, value) in values.unwrap_or_default().iter().enumerate() {
        let text = if principal {
            value.strip_prefix("spiffe://").unwrap_or(value)
        } else {
            value
        };
        match StringMatch::parse(text) {
            Ok(m) => out.push(m),
            Err(reason) => problems.add(
                format!("{at}[{i}]"),
                Problem::BadPattern {
                    value: value.clone(),
                    reason,
                },
            ),
        }
    }
    out
}

/// `namespace/name` or `name` (in the policy's namespace).
fn service_accounts(
    values: Option<&[String]>,
    at: &str,
    namespace: &str,
    problems: &mut Problems<'_>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, value) in values.unwrap_or_default().iter().enumerate() {
        let parsed = match value.split_once('/') {
            None => Some((namespace, value.as_str())),
            Some((ns, name)) if !name.contains('/') => Some((ns, name)),
            Some(_) => None,
        };
        match parsed {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !value.contains('*') => {
                out.push((ns.to_owned(), name.to_owned()));
            }
            _ => problems.add(
                format!("{at}[{i}]"),
                Problem::BadPattern {
                    value: value.clone(),
                    reason: "expected <namespace>/<name> or <name> (no wildcards)",
                },
            ),
        }
    }
    out
}

fn cidrs(values: Option<&[String]>, at: &str, problems: &mut Problems<'_>) -> Vec<Cidr> {
    let mut out = Vec::new();
    for (i, value) in values.unwrap_or_default().iter().enumerate() {
        match Cidr::parse(value) {
            Ok(cidr) => out.push(cidr),
            Err(message) => problems.add(format!("{at}[{i}]"), Problem::BadCidr(message)),
        }
    }
    out
}

fn ports(values: Option<&[PortValue]>, at: &str, problems: &mut Problems<'_>) -> Vec<u16> {
    let mut out = Vec::new();
    for (i, value) in values.unwrap_or_default().iter().enumerate() {
        let field = format!("{at}[{i}]");
        let number = match value {
            PortValue::Number(n) => *n,
            PortValue::Text(text) => match text.trim().parse::<i64>() {
                Ok(n) => n,
                Err(_) => {
                    problems.add(field, Problem::NotAPort(text.clone()));
                    continue;
                }
            },
        };
        let p = port(number, field, problems);
        if p != 0 && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location() -> Location {
        Location {
            origin: "test.yaml".into(),
            document: Some(2),
            line: None,
        }
    }

    fn svc(yaml: &str) -> Result<state::Service, Vec<Error>> {
        let svc: core::Service = serde_yaml_ng::from_str(yaml).expect("test YAML is a Service");
        service(&svc, &location())
    }

    fn eps(yaml: &str) -> Result<state::EndpointSlice, Vec<Error>> {
        let slice: discovery::EndpointSlice =
            serde_yaml_ng::from_str(yaml).expect("test YAML is an EndpointSlice");
        endpoint_slice(&slice, &location())
    }

    fn wl(yaml: &str) -> Result<state::Workload, Vec<Error>> {
        let w: Workload = serde_yaml_ng::from_str(yaml).expect("test YAML is a Workload");
        workload(&w, &location())
    }

    /// The messages of a failed translation.
    fn messages<T: std::fmt::Debug>(result: Result<T, Vec<Error>>) -> Vec<String> {
        result
            .expect_err("translation should fail")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
";

    #[test]
    fn service_translates() {
        let s = svc(SERVICE).unwrap();
        assert_eq!(s.meta.id.to_string(), "shop/web");
        assert_eq!(s.meta.labels["app"], "web");
        assert_eq!(&*s.meta.origin, "test.yaml");
        assert_eq!(s.cluster_ips, [IpAddr::from([10, 96, 0, 10])]);
        assert_eq!(
            s.ports,
            [
                state::ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Protocol::Tcp
                },
                state::ServicePort {
                    name: Some("dns".into()),
                    port: 53,
                    protocol: Protocol::Udp
                },
            ]
        );
        assert_eq!(s.affinity, Affinity::None);
    }

    #[test]
    fn namespace_defaults_and_name_is_required() {
        let s = svc("{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {}}").unwrap();
        assert_eq!(s.meta.id.namespace, "default");
        assert!(s.cluster_ips.is_empty());
        assert_eq!(
            messages(svc(
                "{apiVersion: v1, kind: Service, metadata: {}, spec: {}}"
            )),
            ["test.yaml (document 2): Service (unnamed): metadata.name: missing"]
        );
    }

    #[test]
    fn port_out_of_range() {
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 70000}]}}",
        ));
        assert_eq!(
            m,
            [
                "test.yaml (document 2): Service default/a: spec.ports[0].port: 70000 is out of range 1-65535"
            ]
        );
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 0}]}}",
        ));
        assert!(
            m[0].contains("spec.ports[0].port: 0 is out of range"),
            "{m:?}"
        );
    }

    #[test]
    fn bad_cluster_ip() {
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.999}}",
        ));
        assert_eq!(
            m,
            [
                r#"test.yaml (document 2): Service default/a: spec.clusterIP: "10.96.0.999" is not an IP address"#
            ]
        );
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIPs: [10.96.0.1, bad]}}",
        ));
        assert!(
            m[0].contains(r#"spec.clusterIPs[1]: "bad" is not an IP address"#),
            "{m:?}"
        );
    }

    #[test]
    fn headless_and_unallocated_services_have_no_ip() {
        for spec in [
            "{clusterIP: None}",
            "{clusterIP: ''}",
            "{clusterIPs: [None]}",
            "{type: ExternalName, externalName: example.com}",
        ] {
            let s = svc(&format!(
                "{{apiVersion: v1, kind: Service, metadata: {{name: a}}, spec: {spec}}}"
            ))
            .unwrap();
            assert!(s.cluster_ips.is_empty(), "{spec}");
        }
    }

    #[test]
    fn dual_stack_cluster_ips() {
        let s = svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1']}}",
        )
        .unwrap();
        assert_eq!(s.cluster_ips.len(), 2);
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.2, clusterIPs: [10.96.0.1]}}",
        ));
        assert!(
            m[0].contains(
                r#"spec.clusterIPs: ["10.96.0.1"] does not start with spec.clusterIP "10.96.0.2""#
            ),
            "{m:?}"
        );
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIPs: [10.96.0.1, 10.96.0.2]}}",
        ));
        assert!(m[0].contains("spec.clusterIPs: "), "{m:?}");
        assert!(m[0].contains("one IPv4 and one IPv6"), "{m:?}");
    }

    #[test]
    fn unsupported_protocol() {
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 80, protocol: SCTP}]}}",
        ));
        assert_eq!(
            m,
            [
                "test.yaml (document 2): Service default/a: spec.ports[0].protocol: protocol SCTP is not supported (only TCP and UDP are)"
            ]
        );
    }

    #[test]
    fn session_affinity() {
        let s = svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {sessionAffinity: ClientIP}}",
        )
        .unwrap();
        assert_eq!(s.affinity, Affinity::ClientIp);
        let s = svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {sessionAffinity: None}}",
        )
        .unwrap();
        assert_eq!(s.affinity, Affinity::None);
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {sessionAffinity: Sticky}}",
        ));
        assert!(
            m[0].contains(r#"spec.sessionAffinity: "Sticky" is not supported"#),
            "{m:?}"
        );
    }

    #[test]
    fn port_names_and_duplicates() {
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{name: a, port: 80}, {port: 81}]}}",
        ));
        assert!(
            m[0].contains("spec.ports[1].name: required when there is more than one port"),
            "{m:?}"
        );
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{name: a, port: 80}, {name: b, port: 80}]}}",
        ));
        assert!(
            m[0].contains("spec.ports[1]: same as spec.ports[0] (80/TCP)"),
            "{m:?}"
        );
        // The same number over UDP is another port.
        svc("{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP}]}}")
            .unwrap();
    }

    #[test]
    fn all_problems_are_reported() {
        let m = messages(svc(
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: x, ports: [{port: 70000, protocol: SCTP}]}}",
        ));
        assert_eq!(m.len(), 3, "{m:?}");
    }

    const SLICE: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
- addresses: [10.0.0.2]
  conditions: {ready: false}
- addresses: [10.0.0.3]
  conditions: {ready: true}
ports:
- {name: http, port: 8080}
- {port: 5353, protocol: UDP}
";

    #[test]
    fn endpoint_slice_translates() {
        let s = eps(SLICE).unwrap();
        assert_eq!(s.meta.id.to_string(), "shop/web-abc");
        assert_eq!(s.service, "web");
        let ready: Vec<bool> = s.endpoints.iter().map(|e| e.ready).collect();
        assert_eq!(ready, [true, false, true], "absent conditions mean ready");
        assert_eq!(
            s.ports,
            [
                state::EndpointPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp
                },
                state::EndpointPort {
                    name: None,
                    port: 5353,
                    protocol: Protocol::Udp
                },
            ]
        );
    }

    #[test]
    fn endpoint_slice_needs_the_service_label() {
        let m = messages(eps(
            "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: x}, addressType: IPv4, endpoints: []}",
        ));
        assert_eq!(
            m,
            [
                r#"test.yaml (document 2): EndpointSlice default/x: metadata.labels["kubernetes.io/service-name"]: missing"#
            ]
        );
    }

    #[test]
    fn fqdn_slices_are_not_supported() {
        let m = messages(eps(
            "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: x, labels: {kubernetes.io/service-name: a}}, addressType: FQDN, endpoints: []}",
        ));
        assert!(m[0].contains("addressType: FQDN is not supported"), "{m:?}");
    }

    #[test]
    fn endpoint_addresses_match_the_address_type() {
        let m = messages(eps(
            "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: x, labels: {kubernetes.io/service-name: a}}, addressType: IPv4, endpoints: [{addresses: [10.0.0.1, 'fd00::1', nope]}]}",
        ));
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m[0].contains(r#"endpoints[0].addresses[1]: "fd00::1" is not an IPv4 address"#),
            "{m:?}"
        );
        assert!(
            m[1].contains(r#"endpoints[0].addresses[2]: "nope" is not an IP address"#),
            "{m:?}"
        );
        let m = messages(eps(
            "{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: x, labels: {kubernetes.io/service-name: a}}, addressType: IPv4, endpoints: [], ports: [{port: 70000}, {protocol: TCP}]}",
        ));
        assert!(
            m[0].contains("ports[0].port: 70000 is out of range 1-65535"),
            "{m:?}"
        );
        assert!(m[1].contains("ports[1].port: missing"), "{m:?}");
    }

    #[test]
    fn workload_translates() {
        let w = wl("
apiVersion: mycel.dev/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec:
  addresses: [10.0.1.5, 'fd00::5']
  serviceAccount: web
  netns: /run/netns/web-0
  interface: veth-web0
  cgroup: /sys/fs/cgroup/web-0
")
        .unwrap();
        assert_eq!(w.meta.id.to_string(), "shop/web-0");
        assert_eq!(w.addresses.len(), 2);
        assert_eq!(w.service_account, "web");
        assert_eq!(
            w.netns.as_deref(),
            Some(std::path::Path::new("/run/netns/web-0"))
        );
        assert_eq!(w.interface.as_deref(), Some("veth-web0"));
    }

    #[test]
    fn workload_problems() {
        let m = messages(wl(
            "{apiVersion: mycel.dev/v1alpha1, kind: Workload, metadata: {name: w}, spec: {addresses: [10.0.0.1, 10.0.0.1, x], interface: a-very-long-interface-name}}",
        ));
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(
            m[0].contains("spec.addresses[1]: same as spec.addresses[0]"),
            "{m:?}"
        );
        assert!(
            m[1].contains(r#"spec.addresses[2]: "x" is not an IP address"#),
            "{m:?}"
        );
        assert!(m[2].contains("spec.serviceAccount: missing"), "{m:?}");
        assert!(m[3].contains("spec.interface: "), "{m:?}");
        assert!(m[3].contains("longer than 15"), "{m:?}");
    }

    fn ap(spec: &str) -> Result<state::AuthorizationPolicy, Vec<Error>> {
        let p: AuthorizationPolicy = serde_yaml_ng::from_str(&format!(
            "{{apiVersion: mycel.dev/v1alpha1, kind: AuthorizationPolicy, metadata: {{name: p, namespace: shop}}, spec: {spec}}}"
        ))
        .expect("test YAML is an AuthorizationPolicy");
        authorization_policy(&p, &location())
    }

    #[test]
    fn authorization_policy_translates() {
        let p = ap("{selector: {matchLabels: {app: web}}, action: DENY, rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b', 'cluster.local/ns/x/*'], namespaces: ['*'], serviceAccounts: [a/b, c], notIpBlocks: [10.1.2.3/8, 'fd00::1']}}], to: [{operation: {ports: ['80', 443], notPorts: [' 8080']}}]}]}")
            .unwrap();
        assert_eq!(p.meta.id.to_string(), "shop/p");
        assert_eq!(p.selector["app"], "web");
        assert_eq!(p.action, Action::Deny);
        let source = &p.rules[0].from[0];
        assert_eq!(
            source.principals,
            [
                StringMatch::Exact("cluster.local/ns/a/sa/b".into()),
                StringMatch::Prefix("cluster.local/ns/x/".into())
            ]
        );
        assert_eq!(source.namespaces, [StringMatch::Any]);
        assert_eq!(
            source.service_accounts,
            [("a".into(), "b".into()), ("shop".into(), "c".into())],
            "a bare name is in the policy's namespace"
        );
        assert_eq!(
            source.not_ip_blocks[0].to_string(),
            "10.0.0.0/8",
            "host bits cleared"
        );
        assert_eq!(source.not_ip_blocks[1].to_string(), "fd00::1/128");
        assert_eq!(p.rules[0].to[0].ports, [80, 443]);
        assert_eq!(p.rules[0].to[0].not_ports, [8080]);
        assert!(!p.rules[0].has_l7 && p.l7_fields.is_empty());

        let p = ap("{}").unwrap();
        assert_eq!(p.action, Action::Allow, "ALLOW by default");
        assert!(p.rules.is_empty() && p.selector.is_empty());
        assert_eq!(ap("{rules: [{}]}").unwrap().rules, [Rule::default()]);
    }

    #[test]
    fn authorization_policy_problems_name_the_field() {
        let cases = [
            (
                "{action: AUDIT}",
                "spec.action: AUDIT is not supported (only ALLOW and DENY are)",
            ),
            ("{action: CUSTOM}", "spec.action: CUSTOM is not supported"),
            (
                "{action: allow}",
                r#"spec.action: "allow" is not an action (ALLOW or DENY)"#,
            ),
            (
                "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}",
                r#"spec.rules[0].from[0].source.ipBlocks[0]: "10.0.0.0/33": prefix length "33" is not a number in 0-32"#,
            ),
            (
                "{rules: [{from: [{source: {notIpBlocks: [10.0.0.x]}}]}]}",
                r#"spec.rules[0].from[0].source.notIpBlocks[0]: "10.0.0.x" is not an address or CIDR"#,
            ),
            (
                "{rules: [{}, {to: [{operation: {ports: ['70000']}}]}]}",
                "spec.rules[1].to[0].operation.ports[0]: 70000 is out of range 1-65535",
            ),
            (
                "{rules: [{to: [{operation: {notPorts: [0]}}]}]}",
                "spec.rules[0].to[0].operation.notPorts[0]: 0 is out of range 1-65535",
            ),
            (
                "{rules: [{to: [{operation: {ports: [http]}}]}]}",
                r#"spec.rules[0].to[0].operation.ports[0]: "http" is not a port number (1-65535)"#,
            ),
            (
                "{rules: [{from: [{source: {principals: ['cluster.local/*/sa/x']}}]}]}",
                r#"spec.rules[0].from[0].source.principals[0]: "cluster.local/*/sa/x": `*` may only be the whole value, a prefix or a suffix"#,
            ),
            (
                "{rules: [{from: [{source: {notNamespaces: ['']}}]}]}",
                r#"spec.rules[0].from[0].source.notNamespaces[0]: "": must not be empty"#,
            ),
            (
                "{rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}",
                r#"spec.rules[0].from[0].source.serviceAccounts[0]: "a/b/c": expected <namespace>/<name>"#,
            ),
            (
                "{rules: [{from: [{}]}]}",
                "spec.rules[0].from[0].source: missing",
            ),
            (
                "{rules: [{from: [{source: {}}]}]}",
                "spec.rules[0].from[0].source: must not be empty",
            ),
            (
                "{rules: [{to: [{operation: {}}]}]}",
                "spec.rules[0].to[0].operation: must not be empty",
            ),
        ];
        for (spec, want) in cases {
            let m = messages(ap(spec));
            assert_eq!(m.len(), 1, "{spec}: {m:?}");
            assert!(
                m[0].starts_with("test.yaml (document 2): AuthorizationPolicy shop/p: "),
                "{m:?}"
            );
            assert!(m[0].contains(want), "{spec}: {m:?} lacks {want:?}");
        }
    }

    #[test]
    fn authorization_policy_rejects_unknown_fields() {
        for (yaml, field) in [
            (
                "{selector: {matchLabels: {}}, targetRefs: []}",
                "targetRefs",
            ),
            ("{selector: {matchExpressions: []}}", "matchExpressions"),
            (
                "{rules: [{from: [{source: {principal: [a]}}]}]}",
                "principal",
            ),
            ("{rules: [{to: [{operation: {port: ['80']}}]}]}", "port"),
            ("{rules: [{form: []}]}", "form"),
        ] {
            let err = serde_yaml_ng::from_str::<AuthorizationPolicy>(&format!(
                "{{apiVersion: mycel.dev/v1alpha1, kind: AuthorizationPolicy, metadata: {{name: p}}, spec: {yaml}}}"
            ))
            .unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("unknown field `{field}`")),
                "{yaml}: {err}"
            );
        }
    }

    #[test]
    fn authorization_policy_l7_fields_are_listed() {
        let p = ap("{rules: [{from: [{source: {notRequestPrincipals: ['*'], namespaces: [a]}}], to: [{operation: {hosts: [x], methods: []}}], when: [{key: source.ip, values: [10.0.0.1]}]}]}")
            .unwrap();
        assert_eq!(
            p.l7_fields,
            [
                "spec.rules[0].from[0].source.notRequestPrincipals",
                "spec.rules[0].to[0].operation.hosts",
                "spec.rules[0].when",
            ],
            "an empty list is not set"
        );
        assert!(p.rules[0].has_l7);
        // An operation with only HTTP-level fields is not empty.
        assert_eq!(
            ap("{rules: [{to: [{operation: {methods: [GET]}}]}]}")
                .unwrap()
                .rules[0]
                .to,
            [Operation::default()]
        );
    }

    #[test]
    fn workload_spec_rejects_unknown_fields() {
        let err = serde_yaml_ng::from_str::<Workload>(
            "{apiVersion: mycel.dev/v1alpha1, kind: Workload, metadata: {name: w}, spec: {addresses: [10.0.0.1], serviceAccount: a, netNS: x}}",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `netNS`"), "{err}");
    }
}
