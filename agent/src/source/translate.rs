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

use super::{Error, Location, Problem};
use crate::state::{self, Affinity, Kind, Meta, ObjectRef, Protocol};

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

/// Translates a mycel [`Workload`].
pub fn workload(w: &Workload, location: &Location) -> Result<state::Workload, Vec<Error>> {
    let mut problems = Problems::new(location, Kind::Workload, &w.metadata);
    let meta = meta(&w.metadata, location, &mut problems);
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

    #[test]
    fn workload_spec_rejects_unknown_fields() {
        let err = serde_yaml_ng::from_str::<Workload>(
            "{apiVersion: mycel.dev/v1alpha1, kind: Workload, metadata: {name: w}, spec: {addresses: [10.0.0.1], serviceAccount: a, netNS: x}}",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `netNS`"), "{err}");
    }
}
