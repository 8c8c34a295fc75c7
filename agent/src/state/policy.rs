//! AuthorizationPolicy: the model of a policy, and its compilation into per-endpoint
//! entries of the kernel's `POLICY` map.
//!
//! # Semantics (Istio's)
//!
//! A policy selects workloads: those in its namespace whose labels include
//! `spec.selector.matchLabels` (all of them when the selector is absent or empty); a policy
//! in the root namespace ([`ROOT_NAMESPACE`] by default) selects in every namespace. For
//! traffic to a selected workload: if any DENY policy matches, it is denied; otherwise, if
//! any ALLOW policy selects the workload, it is allowed only if one of them matches;
//! a workload no ALLOW policy selects allows what no DENY matches. A policy matches if any
//! of its rules does; a rule matches if any of its `from` and any of its `to` match (an
//! empty or absent list matches everything); a `source` or `operation` matches if every
//! field it sets matches (a value list matches if any value does; a `not*` list if none
//! does). So `rules` absent or empty matches nothing (an ALLOW policy then denies every
//! connection to the workloads it selects) and `rules: [{}]` matches everything.
//!
//! Only L3/L4 can be enforced in the kernel. As ztunnel does, a rule of an ALLOW policy with
//! any HTTP-level attribute (`methods`, `paths`, `hosts`, `requestPrincipals`, `when`, ...)
//! never matches, and in a DENY policy those attributes are ignored, so the rule matches
//! more connections: both err on the side of denying.
//!
//! Peers are known by their numeric identity only (see [`identity`](super::identity)):
//! principals, namespaces and service accounts match a workload identity's (namespace,
//! service account) — for destinations outside the mesh only. Such an identity is derived
//! from the source address (Cilium's model, which the TC programs' anti-spoofing backs).
//! For a destination enrolled in the mesh, those three fields match only the identity a
//! peer proved with its certificate, as Istio's do: the node proxy checks them per tunnel,
//! and the kernel, which sees only plaintext there, judges every peer as one without an
//! identity (ipBlocks still match by address). A plaintext connection has no principal.
//! Peers without a workload identity (CIDR, world) have none, so the
//! positive lists never match them and the `not*` lists never exclude them (as Envoy
//! treats a peer without a certificate). An ipBlock matches a CIDR identity whose prefix
//! lies inside it, and a workload identity all of whose workloads' addresses lie inside
//! it. When a workload identity's addresses straddle an ipBlock (some inside, some not), the
//! identity cannot be split, and the answer is the one that denies: such a peer matches
//! the `ipBlocks` of a DENY policy but not of an ALLOW policy, and is excluded by the
//! `notIpBlocks` of an ALLOW policy but not of a DENY policy.
//!
//! The node itself ([`IDENTITY_HOST`]: every address of the node, which the ipcache maps
//! to it whatever workload or CIDR also names it) is judged by [`NodeTraffic`]. Under
//! `probes` (the default) and `none` it is a peer like any other, known by its addresses:
//! an ipBlock holding all of them matches it, principals, namespaces and service accounts
//! never do; so a DENY whose ipBlock holds the node's addresses denies node traffic and,
//! when an ALLOW selects a workload, node traffic that no ALLOW matches is denied. The
//! kernel then lets kubelet probes through under `probes` unless a DENY decided (see the
//! TC programs). Under `all` the node is always allowed, whatever the policies, as it was
//! before the setting existed.
//! Policies govern traffic *to* a workload (ingress); there are no egress entries.
//!
//! # Compilation: constant per-packet cost
//!
//! The kernel's lookup for a new flow to endpoint `E` from a peer of identity `P` to port
//! `port` over `proto` is at most three exact hash lookups, whatever the number of policies
//! and rules: `(E, P, port, proto)`, then `(E, P, 0, proto)`, then the endpoint's default
//! `(E, 0, 0, 0)`; the first hit is the verdict. The compiler makes that true by expanding
//! every policy that selects `E` over the finite set of peers (every workload and CIDR
//! identity, and [`IDENTITY_WORLD`]) and over the ports those policies name, plus one class
//! for every other port. For each peer it computes the final verdict (DENY before ALLOW,
//! default deny if an ALLOW selects `E`) for the "other port" class and for each named
//! port, and emits only what the fallback would get wrong: `(E, P, 0, proto)` when the
//! other-port verdict differs from the default, `(E, P, port, proto)` when a named port's
//! verdict differs from the other-port one. Entries are emitted for TCP and UDP alike
//! (Istio's ports do not name a protocol); other protocols get the endpoint's default.
//! Endpoints selected by the same policies share one computation.
//!
//! Each entry names the policy that decided it (`policy_id`, see
//! [`PolicyState::policy_name`]); 0 is "no policy": the endpoint's default.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    rc::Rc,
};

use mycel_common::policy::{
    DIR_INGRESS, IDENTITY_HOST, IDENTITY_WORLD, PolicyKey, PolicyValue, VERDICT_ALLOW, VERDICT_DENY,
};
use serde::Serialize;

use super::{
    Meta, ObjectRef, Workload,
    identity::{self, Allocator, DEFAULT_TRUST_DOMAIN, Identities, IdentityInfo},
};

/// The namespace whose policies without a selector apply to every workload, as Istio's
/// root namespace.
pub const ROOT_NAMESPACE: &str = "mycel-system";
/// IP protocol numbers the compiled entries are written for.
pub const PROTO_TCP: u8 = 6;
/// See [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;

/// Which traffic from the node's own addresses is exempt from policy and mode STRICT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeTraffic {
    /// Only kubelet probes: TCP connections opened by a node process outside the pods'
    /// cgroup. Other node traffic (hostNetwork pods, anything SNAT'd to a node address)
    /// is judged like any peer's. A DENY naming the node applies to probes too.
    #[default]
    Probes,
    /// Everything from a node address is allowed and exempt from STRICT.
    All,
    /// Nothing: the node is a peer like any other.
    None,
}

impl NodeTraffic {
    /// `probes`, `all` or `none`.
    pub fn parse(text: &str) -> Option<NodeTraffic> {
        match text {
            "probes" => Some(NodeTraffic::Probes),
            "all" => Some(NodeTraffic::All),
            "none" => Some(NodeTraffic::None),
            _ => None,
        }
    }
}

/// Settings of the policy model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicySettings {
    /// Trust domain of SPIFFE IDs (and of the principals policies name).
    pub trust_domain: String,
    /// Namespace whose policies apply in every namespace.
    pub root_namespace: String,
    /// What node traffic is exempt.
    pub node_traffic: NodeTraffic,
    /// The node's own addresses: the host identity's, which policies' ipBlocks judge.
    pub host_addresses: Vec<IpAddr>,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            root_namespace: ROOT_NAMESPACE.to_owned(),
            node_traffic: NodeTraffic::default(),
            host_addresses: Vec::new(),
        }
    }
}

/// `spec.action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// A `mycel.dev/v1alpha1` AuthorizationPolicy, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub meta: Meta,
    /// `spec.selector.matchLabels`; empty selects every workload of the namespace.
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// Paths of the HTTP-level fields set (such as `spec.rules[0].to[0].operation.methods`),
    /// which the kernel cannot enforce.
    pub l7_fields: Vec<String>,
}

/// One of `spec.rules`, with its L4 parts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Empty matches every peer.
    pub from: Vec<Source>,
    /// Empty matches every port.
    pub to: Vec<Operation>,
    /// The rule sets an HTTP-level attribute (in `from`, `to` or `when`).
    pub has_l7: bool,
}

/// `from[].source`, with its L4 fields. An empty list is an unset field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// (namespace, name).
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
}

/// `to[].operation`, with its L4 fields. An empty list is an unset field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// A string pattern as Istio writes them: `*` (any non-empty value), `prefix*`, `*suffix`
/// or an exact value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    /// Parses a pattern; `*` may only be the whole value, its first or its last character.
    pub fn parse(text: &str) -> Result<StringMatch, &'static str> {
        if text.is_empty() {
            return Err("must not be empty");
        }
        if text == "*" {
            return Ok(StringMatch::Any);
        }
        let inner = text.strip_prefix('*').unwrap_or(text);
        let inner = inner.strip_suffix('*').unwrap_or(inner);
        if inner.contains('*') || inner.len() + 1 < text.len() {
            return Err("`*` may only be the whole value, a prefix or a suffix");
        }
        Ok(if let Some(suffix) = text.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = text.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(text.to_owned())
        })
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Any => !value.is_empty(),
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// An address prefix, with the host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `addr/prefix`, host bits cleared; `None` if the prefix is too long for the family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let bits = bits(addr);
        if prefix > bits {
            return None;
        }
        let masked = match addr {
            IpAddr::V4(a) => IpAddr::from(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::from(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        Some(Cidr {
            addr: masked,
            prefix,
        })
    }

    /// Parses `10.0.0.0/8`, `fd00::/64`, or a bare address (a /32 or /128), as Istio's
    /// `ipBlocks`. Host bits are cleared.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR"))?;
        let prefix = match prefix {
            None => bits(addr),
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits(addr))
                .ok_or_else(|| {
                    format!(
                        "{text:?}: prefix length {p:?} is not a number in 0-{}",
                        bits(addr)
                    )
                })?,
        };
        Cidr::new(addr, prefix).ok_or_else(|| format!("{text:?} is not a CIDR"))
    }

    /// The first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Cidr::new(ip, self.prefix).is_some_and(|c| c == *self)
    }

    /// Whether every address of `other` is inside.
    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn bits(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Whether `workload` is on this node, so gets an endpoint and kernel policy. Standalone,
/// that is a Workload naming its host-side interface.
pub fn is_local(workload: &Workload) -> bool {
    workload.interface.is_some()
}

/// Whether `policy` applies to `workload`.
pub fn selects(policy: &AuthorizationPolicy, workload: &Workload, root_namespace: &str) -> bool {
    let namespace = &policy.meta.id.namespace;
    (namespace == root_namespace || *namespace == workload.meta.id.namespace)
        && policy
            .selector
            .iter()
            .all(|(k, v)| workload.meta.labels.get(k) == Some(v))
}

/// The compiled policy of one local workload: its `ENDPOINTS` value and `POLICY` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub workload: ObjectRef,
    /// Names the endpoint's `POLICY` entries; stable while the workload is local.
    pub endpoint_id: u32,
    /// The workload's own identity.
    pub identity: u32,
    /// The host side of its interface.
    pub interface: String,
    /// Some ALLOW policy selects it: what no ALLOW matches is denied
    /// ([`ENDPOINT_F_ENFORCE`](mycel_common::policy::ENDPOINT_F_ENFORCE)).
    pub enforce: bool,
    /// Every `POLICY` entry of this endpoint, the default `(E, 0, 0, 0)` included (ALLOW
    /// when not `enforce`, DENY when it is).
    pub entries: BTreeMap<PolicyKey, PolicyValue>,
}

/// What the kernel's policy maps should hold, and the names behind their numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    identities: BTreeMap<u32, IdentityInfo>,
    ipcache: BTreeMap<(IpAddr, u8), u32>,
    endpoints: BTreeMap<ObjectRef, EndpointPolicy>,
    policies: BTreeMap<u32, ObjectRef>,
}

impl PolicyState {
    /// Every workload and CIDR identity, by number.
    pub fn identities(&self) -> &BTreeMap<u32, IdentityInfo> {
        &self.identities
    }

    /// The identity of a (namespace, service account), if a workload has it.
    pub fn workload_identity(&self, namespace: &str, service_account: &str) -> Option<u32> {
        self.identities.iter().find_map(|(id, info)| match info {
            IdentityInfo::Workload {
                namespace: ns,
                service_account: sa,
                ..
            } if ns == namespace && sa == service_account => Some(*id),
            _ => None,
        })
    }

    /// `IPCACHE`: (address, prefix length) to identity. Every workload address as a /32 or
    /// /128, every CIDR a policy names; an address in none of them is [`IDENTITY_WORLD`].
    /// When two workloads claim one address, the lower namespace/name has it.
    pub fn ipcache(&self) -> &BTreeMap<(IpAddr, u8), u32> {
        &self.ipcache
    }

    /// Compiled policy of every local workload.
    pub fn endpoints(&self) -> &BTreeMap<ObjectRef, EndpointPolicy> {
        &self.endpoints
    }

    /// The policy a `policy_id` names (0 and unknown numbers name none).
    pub fn policy_name(&self, id: u32) -> Option<&ObjectRef> {
        self.policies.get(&id)
    }

    /// Every policy in force by its `policy_id`, as `namespace/name`.
    pub fn policies_by_id(&self) -> Vec<(u32, String)> {
        self.policies
            .iter()
            .map(|(id, name)| (*id, name.to_string()))
            .collect()
    }

    /// Number of policies in force (for `mycel_policy_loaded`).
    pub fn policies_loaded(&self) -> usize {
        self.policies.len()
    }

    /// Number of `POLICY` entries over all endpoints (for `mycel_policy_entries`).
    pub fn policy_entries(&self) -> usize {
        self.endpoints.values().map(|e| e.entries.len()).sum()
    }
}

/// A peer as policies see it: one identity of the universe.
#[derive(Clone, Debug)]
pub(crate) struct Peer<'a> {
    pub(crate) identity: u32,
    pub(crate) kind: PeerKind<'a>,
}

#[derive(Clone, Debug)]
pub(crate) enum PeerKind<'a> {
    World,
    Workload {
        namespace: &'a str,
        service_account: &'a str,
        /// `<trust-domain>/ns/<ns>/sa/<sa>`.
        principal: String,
        addresses: &'a [IpAddr],
    },
    Cidr(Cidr),
    /// The node, by its addresses.
    Host {
        addresses: &'a [IpAddr],
    },
    /// A workload's address seen in plaintext by an enrolled destination: no principal,
    /// namespace or service account can be claimed without a certificate.
    Unverified {
        addresses: &'a [IpAddr],
    },
}

/// `peer` as an enrolled destination sees it in plaintext ([`PeerKind::Unverified`]).
pub(crate) fn unverified<'a>(peer: &Peer<'a>) -> Peer<'a> {
    let kind = match &peer.kind {
        PeerKind::Workload { addresses, .. } => PeerKind::Unverified { addresses },
        other => other.clone(),
    };
    Peer {
        identity: peer.identity,
        kind,
    }
}

/// Every peer policies judge: [`universe`], and the node unless [`NodeTraffic::All`]
/// exempts it.
pub(crate) fn peers<'a>(
    identities: &'a BTreeMap<u32, IdentityInfo>,
    settings: &'a PolicySettings,
) -> Vec<Peer<'a>> {
    let mut peers = universe(identities, &settings.trust_domain);
    if settings.node_traffic != NodeTraffic::All {
        peers.push(Peer {
            identity: IDENTITY_HOST,
            kind: PeerKind::Host {
                addresses: &settings.host_addresses,
            },
        });
    }
    peers
}

/// The peers the kernel can tell apart (besides the host): world, then every identity.
pub(crate) fn universe<'a>(
    identities: &'a BTreeMap<u32, IdentityInfo>,
    trust_domain: &str,
) -> Vec<Peer<'a>> {
    let mut peers = vec![Peer {
        identity: IDENTITY_WORLD,
        kind: PeerKind::World,
    }];
    peers.extend(identities.iter().map(|(&identity, info)| {
        let kind = match info {
            IdentityInfo::Workload {
                namespace,
                service_account,
                addresses,
                ..
            } => PeerKind::Workload {
                namespace,
                service_account,
                principal: identity::principal(trust_domain, namespace, service_account),
                addresses,
            },
            IdentityInfo::Cidr(cidr) => PeerKind::Cidr(*cidr),
        };
        Peer { identity, kind }
    }));
    peers
}

/// How many of a peer's addresses lie inside some prefix.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inside {
    All,
    Some,
    None,
}

fn inside(peer: &Peer<'_>, blocks: &[Cidr]) -> Inside {
    match &peer.kind {
        PeerKind::World => Inside::None,
        // A CIDR identity's addresses lie outside every longer prefix in the ipcache, and
        // every block is in the ipcache: it is inside a block or disjoint from it.
        PeerKind::Cidr(c) => {
            if blocks.iter().any(|b| b.contains_cidr(c)) {
                Inside::All
            } else {
                Inside::None
            }
        }
        PeerKind::Workload { addresses, .. }
        | PeerKind::Host { addresses }
        | PeerKind::Unverified { addresses } => {
            let count = addresses
                .iter()
                .filter(|a| blocks.iter().any(|b| b.contains(**a)))
                .count();
            match count {
                0 => Inside::None,
                n if n == addresses.len() => Inside::All,
                _ => Inside::Some,
            }
        }
    }
}

/// Whether `source` matches `peer`, in a policy of `action` (which settles the straddling
/// ipBlock case towards denying).
pub(crate) fn source_matches(source: &Source, action: Action, peer: &Peer<'_>) -> bool {
    let deny = action == Action::Deny;
    let workload = match &peer.kind {
        PeerKind::Workload {
            namespace,
            service_account,
            principal,
            ..
        } => Some((*namespace, *service_account, principal.as_str())),
        _ => None,
    };
    // A set positive list matches only a peer with that attribute; a set `not*` list
    // excludes only a peer with that attribute.
    let positive =
        |set: bool, hit: &dyn Fn((&str, &str, &str)) -> bool| !set || workload.is_some_and(hit);
    let negative =
        |set: bool, hit: &dyn Fn((&str, &str, &str)) -> bool| !set || !workload.is_some_and(hit);
    let any = |list: &[StringMatch], value: &str| list.iter().any(|m| m.matches(value));
    let sa = |list: &[(String, String)], ns: &str, name: &str| {
        list.iter().any(|(n, s)| n == ns && s == name)
    };
    let blocks_ok = source.ip_blocks.is_empty()
        || match inside(peer, &source.ip_blocks) {
            Inside::All => true,
            Inside::Some => deny,
            Inside::None => false,
        };
    let not_blocks_ok = source.not_ip_blocks.is_empty()
        || match inside(peer, &source.not_ip_blocks) {
            Inside::None => true,
            Inside::Some => deny,
            Inside::All => false,
        };
    blocks_ok
        && not_blocks_ok
        && positive(!source.principals.is_empty(), &|(_, _, p)| {
            any(&source.principals, p)
        })
        && negative(!source.not_principals.is_empty(), &|(_, _, p)| {
            any(&source.not_principals, p)
        })
        && positive(!source.namespaces.is_empty(), &|(ns, _, _)| {
            any(&source.namespaces, ns)
        })
        && negative(!source.not_namespaces.is_empty(), &|(ns, _, _)| {
            any(&source.not_namespaces, ns)
        })
        && positive(!source.service_accounts.is_empty(), &|(ns, s, _)| {
            sa(&source.service_accounts, ns, s)
        })
        && negative(!source.not_service_accounts.is_empty(), &|(ns, s, _)| {
            sa(&source.not_service_accounts, ns, s)
        })
}

/// Whether `rule`'s `from` matches `peer`.
pub(crate) fn from_matches(rule: &Rule, action: Action, peer: &Peer<'_>) -> bool {
    rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, action, peer))
}

/// Whether `rule`'s `to` matches `port` (`None`: a port no rule of the endpoint names).
pub(crate) fn to_matches(rule: &Rule, port: Option<u16>) -> bool {
    rule.to.is_empty()
        || rule.to.iter().any(|op| {
            (op.ports.is_empty() || port.is_some_and(|p| op.ports.contains(&p)))
                && !port.is_some_and(|p| op.not_ports.contains(&p))
        })
}

/// Whether the rule can ever match in a policy of `action` (ALLOW rules with HTTP-level
/// attributes never do).
pub(crate) fn rule_active(rule: &Rule, action: Action) -> bool {
    action == Action::Deny || !rule.has_l7
}

/// Istio's evaluation, policy by policy, of one connection from `peer` to `port` of
/// `workload`: the verdict and the policy that decided it (`None`: no policy matched, the
/// default). The node proxy uses it for tunnels, whose peer it knows by certificate; the
/// compiled kernel entries give the same answers (the tests check both agree).
pub(crate) fn evaluate<'p>(
    policies: impl Iterator<Item = &'p AuthorizationPolicy>,
    root_namespace: &str,
    workload: &Workload,
    peer: &Peer<'_>,
    port: u16,
) -> (u8, Option<&'p ObjectRef>) {
    let matches = |p: &AuthorizationPolicy| {
        p.rules.iter().any(|r| {
            rule_active(r, p.action) && from_matches(r, p.action, peer) && to_matches(r, Some(port))
        })
    };
    let mut allows = false;
    let mut allowed_by = None;
    for p in policies.filter(|p| selects(p, workload, root_namespace)) {
        match p.action {
            Action::Deny if matches(p) => return (VERDICT_DENY, Some(&p.meta.id)),
            Action::Deny => {}
            Action::Allow => {
                allows = true;
                if allowed_by.is_none() && matches(p) {
                    allowed_by = Some(&p.meta.id);
                }
            }
        }
    }
    match (allows, allowed_by) {
        (false, _) => (VERDICT_ALLOW, None),
        (true, Some(id)) => (VERDICT_ALLOW, Some(id)),
        (true, None) => (VERDICT_DENY, None),
    }
}

/// A set of peers, by index in the universe.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize, all: bool) -> Bits {
        let mut words = vec![if all { u64::MAX } else { 0 }; n.div_ceil(64)];
        if all
            && !n.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last = (1u64 << (n % 64)) - 1;
        }
        Bits(words)
    }

    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn or(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
}

/// A policy's active rules, each with the peers its `from` matches.
struct CompiledPolicy<'a> {
    action: Action,
    policy_id: u32,
    rules: Vec<(Bits, &'a Rule)>,
}

impl CompiledPolicy<'_> {
    /// The peers it matches on `port`.
    fn matching(&self, port: Option<u16>, n: usize) -> Bits {
        let mut bits = Bits::new(n, false);
        for (from, rule) in &self.rules {
            if to_matches(rule, port) {
                bits.or(from);
            }
        }
        bits
    }
}

/// One endpoint's entries, without its endpoint id: (peer identity, port or 0, value).
struct GroupEntries {
    enforce: bool,
    entries: Vec<(u32, u16, PolicyValue)>,
}

fn value(verdict: u8, policy_id: u32) -> PolicyValue {
    PolicyValue {
        verdict,
        _pad: [0; 3],
        policy_id,
    }
}

/// The numbers the compiler keeps from one compile to the next.
#[derive(Debug)]
pub(crate) struct Compiler {
    identities: Identities,
    endpoints: Allocator<ObjectRef>,
    policies: Allocator<ObjectRef>,
}

impl Default for Compiler {
    fn default() -> Self {
        Compiler {
            identities: Identities::default(),
            endpoints: Allocator::new(1, u32::MAX),
            policies: Allocator::new(1, u32::MAX),
        }
    }
}

impl Compiler {
    /// Compiles everything from scratch (the numbers are kept).
    pub(crate) fn compile(
        &mut self,
        settings: &PolicySettings,
        workloads: &BTreeMap<ObjectRef, Workload>,
        policies: &BTreeMap<ObjectRef, AuthorizationPolicy>,
        enrolled: &BTreeSet<ObjectRef>,
    ) -> PolicyState {
        let mut addresses: BTreeMap<(String, String), BTreeSet<IpAddr>> = BTreeMap::new();
        for w in workloads.values() {
            addresses
                .entry((w.meta.id.namespace.clone(), w.service_account.clone()))
                .or_default()
                .extend(w.addresses.iter().copied());
        }
        let cidrs: BTreeSet<Cidr> = policies
            .values()
            .flat_map(|p| &p.rules)
            .flat_map(|r| &r.from)
            .flat_map(|s| s.ip_blocks.iter().chain(&s.not_ip_blocks))
            .copied()
            .collect();
        self.identities.workloads.sync(addresses.keys());
        self.identities.cidrs.sync(&cidrs);
        self.policies.sync(policies.keys());
        let local: Vec<&Workload> = workloads.values().filter(|w| is_local(w)).collect();
        self.endpoints.sync(local.iter().map(|w| &w.meta.id));

        let mut state = PolicyState::default();
        for ((namespace, service_account), id) in self.identities.workloads.iter() {
            let spiffe_id = identity::spiffe_id(&settings.trust_domain, namespace, service_account);
            let addresses = addresses
                .get(&(namespace.clone(), service_account.clone()))
                .map(|a| a.iter().copied().collect())
                .unwrap_or_default();
            state.identities.insert(
                id,
                IdentityInfo::Workload {
                    namespace: namespace.clone(),
                    service_account: service_account.clone(),
                    spiffe_id,
                    addresses,
                },
            );
        }
        for (cidr, id) in self.identities.cidrs.iter() {
            state.identities.insert(id, IdentityInfo::Cidr(*cidr));
        }
        // Workloads first (the lower name keeps a shared address), then CIDRs, which do not
        // replace a workload's own address.
        for w in workloads.values() {
            let key = (w.meta.id.namespace.clone(), w.service_account.clone());
            let Some(id) = self.identities.workloads.get(&key) else {
                continue;
            };
            for &a in &w.addresses {
                state.ipcache.entry((a, bits(a))).or_insert(id);
            }
        }
        for (cidr, id) in self.identities.cidrs.iter() {
            state
                .ipcache
                .entry((cidr.addr(), cidr.prefix()))
                .or_insert(id);
        }
        // The node's addresses are the host, whatever else names them (a hostNetwork pod
        // has the node's address; a /32 ipBlock may name it): policies judge the host by
        // them.
        for &a in &settings.host_addresses {
            state.ipcache.insert((a, bits(a)), IDENTITY_HOST);
        }
        for (policy, id) in self.policies.iter() {
            state.policies.insert(id, policy.clone());
        }

        let peers = peers(&state.identities, settings);
        // What an enrolled destination's plaintext can tell of the same peers.
        let plain: Vec<Peer<'_>> = peers.iter().map(unverified).collect();
        let host_allowed = settings.node_traffic == NodeTraffic::All;
        let compile_for = |peers: &[Peer<'_>]| -> Vec<CompiledPolicy<'_>> {
            policies
                .iter()
                .map(|(id, p)| CompiledPolicy {
                    action: p.action,
                    policy_id: self.policies.get(id).unwrap_or(0),
                    rules: p
                        .rules
                        .iter()
                        .filter(|r| rule_active(r, p.action))
                        .map(|r| {
                            let mut bits = Bits::new(peers.len(), r.from.is_empty());
                            if !r.from.is_empty() {
                                for (i, peer) in peers.iter().enumerate() {
                                    if from_matches(r, p.action, peer) {
                                        bits.set(i);
                                    }
                                }
                            }
                            (bits, r)
                        })
                        .collect(),
                })
                .collect()
        };
        let compiled = compile_for(&peers);
        let compiled_plain = compile_for(&plain);
        let all: Vec<&AuthorizationPolicy> = policies.values().collect();

        let mut groups: HashMap<(Vec<usize>, bool), Rc<GroupEntries>> = HashMap::new();
        for w in local {
            let selecting: Vec<usize> = all
                .iter()
                .enumerate()
                .filter(|(_, p)| selects(p, w, &settings.root_namespace))
                .map(|(i, _)| i)
                .collect();
            let in_mesh = enrolled.contains(&w.meta.id);
            let group = groups
                .entry((selecting, in_mesh))
                .or_insert_with_key(|(selecting, in_mesh)| {
                    let (compiled, peers) = if *in_mesh {
                        (&compiled_plain, &plain)
                    } else {
                        (&compiled, &peers)
                    };
                    Rc::new(compile_group(compiled, selecting, peers, host_allowed))
                })
                .clone();
            let (Some(endpoint_id), Some(interface)) =
                (self.endpoints.get(&w.meta.id), w.interface.clone())
            else {
                continue;
            };
            let identity = self
                .identities
                .workloads
                .get(&(w.meta.id.namespace.clone(), w.service_account.clone()))
                .unwrap_or(IDENTITY_WORLD);
            let key = |peer_identity, port: u16, proto| PolicyKey {
                endpoint_id,
                peer_identity,
                dport_be: port.to_be(),
                proto,
                direction: DIR_INGRESS,
            };
            let mut entries = BTreeMap::new();
            let default = if group.enforce {
                value(VERDICT_DENY, 0)
            } else {
                value(VERDICT_ALLOW, 0)
            };
            entries.insert(key(0, 0, 0), default);
            for &(peer, port, v) in &group.entries {
                for proto in [PROTO_TCP, PROTO_UDP] {
                    entries.insert(key(peer, port, proto), v);
                }
            }
            state.endpoints.insert(
                w.meta.id.clone(),
                EndpointPolicy {
                    workload: w.meta.id.clone(),
                    endpoint_id,
                    identity,
                    interface,
                    enforce: group.enforce,
                    entries,
                },
            );
        }
        state
    }
}

/// The entries of an endpoint selected by the policies `selecting` (indexes in `compiled`).
/// `host_allowed`: the node is always allowed ([`NodeTraffic::All`]; it is then not among
/// `peers`).
fn compile_group(
    compiled: &[CompiledPolicy<'_>],
    selecting: &[usize],
    peers: &[Peer<'_>],
    host_allowed: bool,
) -> GroupEntries {
    let n = peers.len();
    let policies: Vec<&CompiledPolicy<'_>> =
        selecting.iter().filter_map(|&i| compiled.get(i)).collect();
    let enforce = policies.iter().any(|p| p.action == Action::Allow);
    let default = if enforce {
        value(VERDICT_DENY, 0)
    } else {
        value(VERDICT_ALLOW, 0)
    };
    let mut entries = Vec::new();
    if enforce && host_allowed {
        entries.push((IDENTITY_HOST, 0, value(VERDICT_ALLOW, 0)));
    }
    if policies.iter().all(|p| p.rules.is_empty()) {
        return GroupEntries { enforce, entries };
    }

    // The port classes: every other port first, then each port a rule names.
    let ports: BTreeSet<u16> = policies
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|(_, r)| &r.to)
        .flat_map(|op| op.ports.iter().chain(&op.not_ports))
        .copied()
        .collect();
    let classes: Vec<Option<u16>> = std::iter::once(None)
        .chain(ports.iter().map(|p| Some(*p)))
        .collect();
    // matching[class][policy]: the peers each policy matches on that port class.
    let matching: Vec<Vec<Bits>> = classes
        .iter()
        .map(|&c| policies.iter().map(|p| p.matching(c, n)).collect())
        .collect();
    let union = |class: usize, action: Action| {
        let mut bits = Bits::new(n, false);
        for (p, m) in policies.iter().zip(&matching[class]) {
            if p.action == action {
                bits.or(m);
            }
        }
        bits
    };
    let denied: Vec<Bits> = (0..classes.len()).map(|c| union(c, Action::Deny)).collect();
    let allowed: Vec<Bits> = (0..classes.len())
        .map(|c| union(c, Action::Allow))
        .collect();

    // The verdict for peer `i` on class `c`; the deciding policy is the first in name order,
    // or `prefer` if it decides too (so a port entry is needed only when the verdict does
    // not match the fallback's).
    let verdict = |i: usize, c: usize, prefer: u32| -> PolicyValue {
        let decider = |action: Action| {
            let hits = || {
                policies
                    .iter()
                    .zip(&matching[c])
                    .filter(move |(p, m)| p.action == action && m.get(i))
                    .map(|(p, _)| p.policy_id)
            };
            if hits().any(|id| id == prefer) {
                prefer
            } else {
                hits().next().unwrap_or(0)
            }
        };
        if denied[c].get(i) {
            value(VERDICT_DENY, decider(Action::Deny))
        } else if !enforce {
            value(VERDICT_ALLOW, 0)
        } else if allowed[c].get(i) {
            value(VERDICT_ALLOW, decider(Action::Allow))
        } else {
            value(VERDICT_DENY, 0)
        }
    };
    for (i, peer) in peers.iter().enumerate() {
        let other = verdict(i, 0, 0);
        if other != default {
            entries.push((peer.identity, 0, other));
        }
        for (c, class) in classes.iter().enumerate().skip(1) {
            let Some(port) = class else { continue };
            let v = verdict(i, c, other.policy_id);
            if v != other {
                entries.push((peer.identity, *port, v));
            }
        }
    }
    GroupEntries { enforce, entries }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use mycel_common::policy::{IDENTITY_FIRST_CIDR, IDENTITY_FIRST_WORKLOAD};

    use super::*;
    use crate::{
        source::{Location, translate},
        state::{Kind, Origin, Resource, ResourceKey, State, Update, Warning},
    };

    fn workload(
        ns: &str,
        name: &str,
        sa: &str,
        app: &str,
        addrs: &[&str],
        local: bool,
    ) -> Workload {
        Workload {
            meta: Meta {
                id: ObjectRef {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                },
                labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
                origin: Origin::from("workloads.yaml"),
            },
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            service_account: sa.to_owned(),
            netns: None,
            interface: local.then(|| format!("veth-{name}")),
            cgroup: None,
        }
    }

    /// A policy from YAML (the spec only), through the real translation.
    fn policy(ns: &str, name: &str, spec: &str) -> AuthorizationPolicy {
        let yaml = format!(
            "apiVersion: mycel.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
        );
        let p: translate::AuthorizationPolicy = serde_yaml_ng::from_str(&yaml).unwrap();
        translate::authorization_policy(&p, &Location::new(Origin::from("policies.yaml")))
            .unwrap_or_else(|e| panic!("{spec}: {e:?}"))
    }

    /// The test world: three namespaces' worth of workloads, all local unless said.
    struct World {
        settings: PolicySettings,
        workloads: BTreeMap<ObjectRef, Workload>,
        policies: BTreeMap<ObjectRef, AuthorizationPolicy>,
        /// Local workloads enrolled in the mesh.
        enrolled: BTreeSet<ObjectRef>,
        compiler: Compiler,
        state: PolicyState,
    }

    impl World {
        fn new(workloads: Vec<Workload>) -> World {
            let mut w = World {
                settings: PolicySettings::default(),
                workloads: workloads
                    .into_iter()
                    .map(|w| (w.meta.id.clone(), w))
                    .collect(),
                policies: BTreeMap::new(),
                enrolled: BTreeSet::new(),
                compiler: Compiler::default(),
                state: PolicyState::default(),
            };
            w.compile();
            w
        }

        fn standard() -> World {
            World::new(vec![
                workload("a", "a-0", "x", "web", &["10.0.1.1", "fd00::1:1"], true),
                workload("a", "a-1", "y", "db", &["10.0.1.2"], true),
                workload("b", "b-0", "x", "web", &["10.0.2.1"], true),
                workload("b", "b-1", "z", "cache", &["10.0.2.2"], false),
                workload("c", "c-0", "w", "web", &["10.0.3.1"], true),
            ])
        }

        fn with(mut self, policies: Vec<AuthorizationPolicy>) -> World {
            for p in policies {
                self.policies.insert(p.meta.id.clone(), p);
            }
            self.compile();
            self
        }

        fn compile(&mut self) {
            self.state = self.compiler.compile(
                &self.settings,
                &self.workloads,
                &self.policies,
                &self.enrolled,
            );
            self.check();
        }

        fn identity(&self, ns: &str, sa: &str) -> u32 {
            self.state.workload_identity(ns, sa).unwrap()
        }

        fn endpoint(&self, ns: &str, name: &str) -> &EndpointPolicy {
            &self.state.endpoints[&ObjectRef {
                namespace: ns.to_owned(),
                name: name.to_owned(),
            }]
        }

        /// The kernel's verdict for traffic to `ns/name` from `peer` on `port`/TCP.
        fn verdict(&self, ns: &str, name: &str, peer: u32, port: u16) -> u8 {
            kernel(self.endpoint(ns, name), peer, port, PROTO_TCP).verdict
        }

        /// Checks every endpoint × peer × port × protocol against the reference evaluator,
        /// that each entry is needed, and that each named policy decides.
        fn check(&self) {
            let peers = peers(&self.state.identities, &self.settings);
            let mut ports: BTreeSet<u16> = self
                .policies
                .values()
                .flat_map(|p| &p.rules)
                .flat_map(|r| &r.to)
                .flat_map(|o| o.ports.iter().chain(&o.not_ports))
                .copied()
                .collect();
            ports.extend([1, 81, 65535]);
            let plain: Vec<Peer<'_>> = peers.iter().map(unverified).collect();
            for ep in self.state.endpoints.values() {
                let w = &self.workloads[&ep.workload];
                // An enrolled destination judges plaintext peers as unverified.
                let peers = if self.enrolled.contains(&ep.workload) {
                    &plain
                } else {
                    &peers
                };
                let default = ep.entries[&key(ep, 0, 0, 0)];
                for (k, v) in &ep.entries {
                    if k.peer_identity == 0 {
                        continue;
                    }
                    if k.dport_be == 0 {
                        assert_ne!(*v, default, "{k:?} repeats the default");
                    } else {
                        let fallback = kernel(ep, k.peer_identity, 0, k.proto);
                        assert_ne!(*v, fallback, "{k:?} repeats its any-port entry");
                    }
                }
                for peer in peers {
                    for &port in &ports {
                        let want = reference(&self.policies, &self.settings, w, Some(peer), port);
                        for proto in [PROTO_TCP, PROTO_UDP] {
                            let got = kernel(ep, peer.identity, port, proto);
                            assert_eq!(
                                got.verdict, want,
                                "{} from {} ({:?}) port {port}/{proto}",
                                ep.workload, peer.identity, peer.kind
                            );
                            if got.policy_id != 0 {
                                let name = self.state.policy_name(got.policy_id).unwrap();
                                let p = &self.policies[name];
                                assert_eq!(
                                    p.action == Action::Deny,
                                    got.verdict == VERDICT_DENY,
                                    "{name} decided {got:?}"
                                );
                                assert!(selects(p, w, &self.settings.root_namespace));
                                assert!(
                                    p.rules.iter().any(|r| rule_active(r, p.action)
                                        && from_matches(r, p.action, peer)
                                        && to_matches(r, Some(port))),
                                    "{name} does not match {peer:?} on {port}"
                                );
                            }
                        }
                    }
                    // Other protocols get the endpoint's default.
                    assert_eq!(kernel(ep, peer.identity, 0, 1), default);
                }
                if self.settings.node_traffic == NodeTraffic::All {
                    for &port in &ports {
                        let want = reference(&self.policies, &self.settings, w, None, port);
                        assert_eq!(kernel(ep, IDENTITY_HOST, port, PROTO_TCP).verdict, want);
                    }
                }
            }
        }
    }

    fn key(ep: &EndpointPolicy, peer: u32, port: u16, proto: u8) -> PolicyKey {
        PolicyKey {
            endpoint_id: ep.endpoint_id,
            peer_identity: peer,
            dport_be: port.to_be(),
            proto,
            direction: DIR_INGRESS,
        }
    }

    /// The kernel's lookup order; a miss everywhere allows.
    fn kernel(ep: &EndpointPolicy, peer: u32, port: u16, proto: u8) -> PolicyValue {
        [
            key(ep, peer, port, proto),
            key(ep, peer, 0, proto),
            key(ep, 0, 0, 0),
        ]
        .iter()
        .find_map(|k| ep.entries.get(k).copied())
        .unwrap_or(value(VERDICT_ALLOW, 0))
    }

    /// The slow path: Istio's evaluation, policy by policy, for one connection. `None` is
    /// the host under [`NodeTraffic::All`].
    fn reference(
        policies: &BTreeMap<ObjectRef, AuthorizationPolicy>,
        settings: &PolicySettings,
        w: &Workload,
        peer: Option<&Peer<'_>>,
        port: u16,
    ) -> u8 {
        match peer {
            None => VERDICT_ALLOW,
            Some(peer) => evaluate(policies.values(), &settings.root_namespace, w, peer, port).0,
        }
    }

    const ALLOW: u8 = VERDICT_ALLOW;
    const DENY: u8 = VERDICT_DENY;

    #[test]
    fn identities_and_ipcache() {
        let mut w = World::standard();
        let ax = w.identity("a", "x");
        let bx = w.identity("b", "x");
        assert!((IDENTITY_FIRST_WORKLOAD..IDENTITY_FIRST_CIDR).contains(&ax));
        assert_ne!(ax, bx, "the namespace is part of the identity");
        assert_eq!(w.state.identities.len(), 5);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(w.state.ipcache[&(ip("10.0.1.1"), 32)], ax);
        assert_eq!(w.state.ipcache[&(ip("fd00::1:1"), 128)], ax);
        assert_eq!(w.state.ipcache[&(ip("10.0.2.2"), 32)], w.identity("b", "z"));
        match &w.state.identities[&ax] {
            IdentityInfo::Workload { spiffe_id, .. } => {
                assert_eq!(spiffe_id, "spiffe://cluster.local/ns/a/sa/x");
            }
            other => panic!("{other:?}"),
        }
        // Only local workloads are endpoints.
        assert_eq!(w.state.endpoints.len(), 4);
        let ep = w.endpoint("a", "a-0").endpoint_id;

        // A second workload of a/x shares the identity; nothing else moves.
        let before = w.state.identities.keys().copied().collect::<Vec<_>>();
        let extra = workload("a", "a-2", "x", "web", &["10.0.1.3"], true);
        w.workloads.insert(extra.meta.id.clone(), extra);
        w.compile();
        assert_eq!(w.identity("a", "x"), ax);
        assert_eq!(
            w.state.identities.keys().copied().collect::<Vec<_>>(),
            before
        );
        assert_eq!(w.endpoint("a", "a-0").endpoint_id, ep);
        assert_eq!(w.state.ipcache[&(ip("10.0.1.3"), 32)], ax);

        // b/x goes; its number is not handed out again.
        w.workloads
            .retain(|id, _| id.namespace != "b" || id.name != "b-0");
        w.compile();
        assert_eq!(w.state.workload_identity("b", "x"), None);
        let back = workload("b", "b-0", "x", "web", &["10.0.2.1"], true);
        w.workloads.insert(back.meta.id.clone(), back);
        w.compile();
        assert_ne!(w.identity("b", "x"), bx);
        assert_eq!(w.identity("a", "x"), ax);

        // CIDRs named by policies get identities of their own, in the ipcache.
        let w = w.with(vec![policy(
            "a",
            "p",
            "{action: DENY, rules: [{from: [{source: {ipBlocks: [192.168.0.0/16], notIpBlocks: ['192.168.1.0/24']}}]}]}",
        )]);
        let cidrs: Vec<u32> = w
            .state
            .identities
            .iter()
            .filter(|(_, i)| matches!(i, IdentityInfo::Cidr(_)))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(cidrs.len(), 2);
        assert!(cidrs.iter().all(|id| *id >= IDENTITY_FIRST_CIDR));
        assert_eq!(
            w.state.ipcache[&(ip("192.168.1.0"), 24)],
            cidrs[1],
            "in CIDR order"
        );
    }

    #[test]
    fn no_policy_allows_everything() {
        let w = World::standard();
        for ep in w.state.endpoints.values() {
            assert!(!ep.enforce);
            assert_eq!(ep.entries.len(), 1, "just the default");
            assert_eq!(ep.entries[&key(ep, 0, 0, 0)], value(ALLOW, 0));
        }
    }

    #[test]
    fn allow_selects_means_default_deny() {
        let w = World::standard().with(vec![policy(
            "a",
            "allow-x",
            "{selector: {matchLabels: {app: db}}, rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}], to: [{operation: {ports: ['8080']}}]}]}",
        )]);
        let (ax, bx) = (w.identity("a", "x"), w.identity("b", "x"));
        assert!(w.endpoint("a", "a-1").enforce);
        assert_eq!(w.verdict("a", "a-1", ax, 8080), ALLOW);
        assert_eq!(w.verdict("a", "a-1", ax, 9090), DENY);
        assert_eq!(w.verdict("a", "a-1", bx, 8080), DENY);
        assert_eq!(w.verdict("a", "a-1", IDENTITY_WORLD, 8080), DENY);
        // The node is a peer like any other (under `probes`, the kernel lets its probes by).
        assert_eq!(w.verdict("a", "a-1", IDENTITY_HOST, 9090), DENY, "host");
        let allowed = kernel(w.endpoint("a", "a-1"), ax, 8080, PROTO_UDP);
        assert_eq!(allowed.verdict, ALLOW, "UDP too");
        assert_eq!(
            w.state.policy_name(allowed.policy_id).unwrap().to_string(),
            "a/allow-x"
        );
        // Default deny has no policy; the unselected workloads are untouched.
        assert_eq!(
            kernel(w.endpoint("a", "a-1"), bx, 8080, PROTO_TCP).policy_id,
            0
        );
        assert!(!w.endpoint("a", "a-0").enforce);
        assert_eq!(w.verdict("a", "a-0", bx, 9090), ALLOW);
        // Minimal: default, a/x:8080 ×2.
        assert_eq!(w.endpoint("a", "a-1").entries.len(), 3);
    }

    #[test]
    fn deny_wins_over_allow() {
        let w = World::standard().with(vec![
            policy("a", "allow-ns", "{rules: [{from: [{source: {namespaces: [a, b]}}]}]}"),
            policy(
                "a",
                "deny-bx",
                "{action: DENY, rules: [{from: [{source: {serviceAccounts: [b/x]}}], to: [{operation: {ports: [80]}}]}]}",
            ),
        ]);
        let bx = w.identity("b", "x");
        assert_eq!(w.verdict("a", "a-0", bx, 80), DENY);
        assert_eq!(w.verdict("a", "a-0", bx, 81), ALLOW);
        assert_eq!(w.verdict("a", "a-0", w.identity("a", "y"), 80), ALLOW);
        assert_eq!(w.verdict("a", "a-0", w.identity("c", "w"), 80), DENY);
        let denied = kernel(w.endpoint("a", "a-0"), bx, 80, PROTO_TCP);
        assert_eq!(
            w.state.policy_name(denied.policy_id).unwrap().to_string(),
            "a/deny-bx"
        );
    }

    #[test]
    fn deny_only_keeps_default_allow() {
        let w = World::standard().with(vec![policy(
            "b",
            "deny-a",
            "{action: DENY, rules: [{from: [{source: {namespaces: [a]}}]}]}",
        )]);
        let ep = w.endpoint("b", "b-0");
        assert!(!ep.enforce);
        assert_eq!(w.verdict("b", "b-0", w.identity("a", "x"), 1), DENY);
        assert_eq!(w.verdict("b", "b-0", w.identity("c", "w"), 1), ALLOW);
        assert_eq!(w.verdict("b", "b-0", IDENTITY_WORLD, 1), ALLOW);
        // Default + a/x and a/y, TCP and UDP.
        assert_eq!(ep.entries.len(), 5);
    }

    #[test]
    fn namespace_wide_and_root_namespace_policies() {
        let w =
            World::standard().with(vec![policy("b", "deny-all", "{action: DENY, rules: [{}]}")]);
        assert_eq!(w.verdict("b", "b-0", w.identity("a", "x"), 80), DENY);
        assert_eq!(
            w.verdict("a", "a-0", w.identity("b", "x"), 80),
            ALLOW,
            "other namespace"
        );

        let w = World::standard().with(vec![policy(ROOT_NAMESPACE, "mesh-allow-nothing", "{}")]);
        for ep in w.state.endpoints.values() {
            assert!(ep.enforce, "{}", ep.workload);
        }
        let w = World::standard().with(vec![policy(
            ROOT_NAMESPACE,
            "web-only-from-a",
            "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [a]}}]}]}",
        )]);
        assert!(
            w.endpoint("c", "c-0").enforce,
            "selector applies in every namespace"
        );
        assert!(!w.endpoint("a", "a-1").enforce, "db is not selected");
        assert_eq!(w.verdict("c", "c-0", w.identity("b", "x"), 80), DENY);
        assert_eq!(w.verdict("c", "c-0", w.identity("a", "y"), 80), ALLOW);
    }

    #[test]
    fn principals_and_patterns() {
        let w = World::standard();
        let cases = [
            ("[spiffe://cluster.local/ns/a/sa/x]", vec![("a", "x")]),
            ("['cluster.local/ns/a/*']", vec![("a", "x"), ("a", "y")]),
            ("['*/sa/x']", vec![("a", "x"), ("b", "x")]),
            (
                "['*']",
                vec![("a", "x"), ("a", "y"), ("b", "x"), ("b", "z"), ("c", "w")],
            ),
            ("[other.domain/ns/a/sa/x]", vec![]),
        ];
        for (principals, allowed) in cases {
            let w = World::new(w.workloads.values().cloned().collect()).with(vec![policy(
                "c",
                "p",
                &format!("{{rules: [{{from: [{{source: {{principals: {principals}}}}}]}}]}}"),
            )]);
            for (ns, sa) in [("a", "x"), ("a", "y"), ("b", "x"), ("b", "z"), ("c", "w")] {
                let want = if allowed.contains(&(ns, sa)) {
                    ALLOW
                } else {
                    DENY
                };
                assert_eq!(
                    w.verdict("c", "c-0", w.identity(ns, sa), 80),
                    want,
                    "{principals} {ns}/{sa}"
                );
            }
            assert_eq!(
                w.verdict("c", "c-0", IDENTITY_WORLD, 80),
                DENY,
                "no identity"
            );
        }
        // notPrincipals: identity-less peers are not excluded.
        let w = World::standard().with(vec![policy(
            "c",
            "p",
            "{rules: [{from: [{source: {notPrincipals: ['cluster.local/ns/a/*']}}]}]}",
        )]);
        assert_eq!(w.verdict("c", "c-0", w.identity("a", "x"), 80), DENY);
        assert_eq!(w.verdict("c", "c-0", w.identity("b", "x"), 80), ALLOW);
        assert_eq!(w.verdict("c", "c-0", IDENTITY_WORLD, 80), ALLOW);
    }

    /// For an enrolled destination, principals, namespaces and service accounts match no
    /// plaintext peer (only the proxy's verified certificates); ipBlocks still match by
    /// address. A destination outside the mesh keeps matching them by address identity.
    #[test]
    fn principals_are_cryptographic_for_enrolled_destinations() {
        let specs = [
            "{rules: [{from: [{source: {principals: ['cluster.local/ns/a/sa/x']}}]}]}",
            "{rules: [{from: [{source: {namespaces: [a]}}]}]}",
            "{rules: [{from: [{source: {serviceAccounts: ['a/x']}}]}]}",
        ];
        for spec in specs {
            let mut w = World::standard().with(vec![policy("c", "p", spec)]);
            let ax = w.identity("a", "x");
            assert_eq!(
                w.verdict("c", "c-0", ax, 80),
                ALLOW,
                "outside the mesh: {spec}"
            );
            w.enrolled.insert(ObjectRef {
                namespace: "c".into(),
                name: "c-0".into(),
            });
            w.compile();
            assert_eq!(
                w.verdict("c", "c-0", ax, 80),
                DENY,
                "plaintext to an enrolled destination has no principal: {spec}"
            );
        }
        // A DENY by principal does not match plaintext either (as Istio's); notPrincipals
        // then covers every plaintext peer, which is how a policy refuses plaintext.
        let mut w = World::standard().with(vec![
            policy(
                "c",
                "deny-x",
                "{action: DENY, rules: [{from: [{source: {principals: ['cluster.local/ns/a/sa/x']}}]}]}",
            ),
            policy(
                "c",
                "deny-plain",
                "{action: DENY, rules: [{from: [{source: {notPrincipals: ['cluster.local/ns/b/*']}}]}]}",
            ),
        ]);
        let (ax, bx) = (w.identity("a", "x"), w.identity("b", "x"));
        assert_eq!(
            w.verdict("c", "c-0", bx, 80),
            ALLOW,
            "b/x by address identity"
        );
        w.enrolled.insert(ObjectRef {
            namespace: "c".into(),
            name: "c-0".into(),
        });
        w.compile();
        assert_eq!(w.verdict("c", "c-0", ax, 80), DENY);
        assert_eq!(
            w.verdict("c", "c-0", bx, 80),
            DENY,
            "b/x's plaintext cannot claim its principal"
        );
        // ipBlocks match by address for enrolled destinations too.
        let mut w = World::standard().with(vec![policy(
            "c",
            "p",
            "{rules: [{from: [{source: {ipBlocks: [10.0.1.2/32]}}]}]}",
        )]);
        w.enrolled.insert(ObjectRef {
            namespace: "c".into(),
            name: "c-0".into(),
        });
        w.compile();
        assert_eq!(w.verdict("c", "c-0", w.identity("a", "y"), 80), ALLOW);
        assert_eq!(w.verdict("c", "c-0", w.identity("a", "x"), 80), DENY);
    }

    #[test]
    fn trust_domain_setting() {
        let mut w = World::standard();
        w.settings.trust_domain = "example.org".to_owned();
        let w = w.with(vec![policy(
            "c",
            "p",
            "{rules: [{from: [{source: {principals: [example.org/ns/a/sa/x, cluster.local/ns/b/sa/x]}}]}]}",
        )]);
        assert_eq!(w.verdict("c", "c-0", w.identity("a", "x"), 80), ALLOW);
        assert_eq!(
            w.verdict("c", "c-0", w.identity("b", "x"), 80),
            DENY,
            "no aliases"
        );
        let state = State::with_policy_settings(w.settings.clone());
        assert_eq!(state.principal("a", "x"), "spiffe://example.org/ns/a/sa/x");
    }

    #[test]
    fn namespaces_and_service_accounts() {
        let w = World::standard().with(vec![
            policy("a", "p", "{rules: [{from: [{source: {namespaces: ['b*'], notServiceAccounts: [b/z]}}, {source: {serviceAccounts: [y]}}]}]}"),
            policy("a", "deny", "{action: DENY, rules: [{from: [{source: {notNamespaces: [a, b]}}]}]}"),
        ]);
        assert_eq!(w.verdict("a", "a-0", w.identity("b", "x"), 80), ALLOW);
        assert_eq!(
            w.verdict("a", "a-0", w.identity("b", "z"), 80),
            DENY,
            "notServiceAccounts"
        );
        assert_eq!(
            w.verdict("a", "a-0", w.identity("a", "y"), 80),
            ALLOW,
            "y is a/y"
        );
        assert_eq!(w.verdict("a", "a-0", w.identity("a", "x"), 80), DENY);
        assert_eq!(w.verdict("a", "a-0", w.identity("c", "w"), 80), DENY);
        // notNamespaces in a DENY matches identity-less peers.
        assert_eq!(
            kernel(w.endpoint("a", "a-0"), IDENTITY_WORLD, 80, PROTO_TCP).policy_id,
            w.state
                .policies
                .iter()
                .find(|(_, n)| n.name == "deny")
                .map(|(id, _)| *id)
                .unwrap()
        );
    }

    #[test]
    fn ip_blocks() {
        let w = World::standard().with(vec![policy(
            "c",
            "p",
            "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/16, 192.168.0.0/16], notIpBlocks: [10.0.2.0/24, 192.168.7.7]}}]}]}",
        )]);
        let cidr = |text: &str| {
            let c = Cidr::parse(text).unwrap();
            *w.state
                .identities
                .iter()
                .find(|(_, i)| **i == IdentityInfo::Cidr(c))
                .unwrap()
                .0
        };
        // a/y's only address is inside; a/x straddles (v6 outside): an ALLOW does not match.
        assert_eq!(w.verdict("c", "c-0", w.identity("a", "y"), 80), ALLOW);
        assert_eq!(w.verdict("c", "c-0", w.identity("a", "x"), 80), DENY);
        assert_eq!(
            w.verdict("c", "c-0", w.identity("b", "x"), 80),
            DENY,
            "notIpBlocks"
        );
        assert_eq!(w.verdict("c", "c-0", cidr("192.168.0.0/16"), 80), ALLOW);
        assert_eq!(w.verdict("c", "c-0", cidr("192.168.7.7/32"), 80), DENY);
        assert_eq!(w.verdict("c", "c-0", IDENTITY_WORLD, 80), DENY);

        // In a DENY, a straddling identity matches.
        let w = World::standard().with(vec![policy(
            "c",
            "p",
            "{action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}",
        )]);
        assert_eq!(w.verdict("c", "c-0", w.identity("a", "x"), 80), DENY);
        assert_eq!(w.verdict("c", "c-0", IDENTITY_WORLD, 80), ALLOW);
    }

    #[test]
    fn ports_and_not_ports() {
        let w = World::standard().with(vec![policy(
            "a",
            "p",
            "{rules: [{to: [{operation: {ports: ['80', 443]}}, {operation: {notPorts: ['22', 80]}}]}]}",
        )]);
        let bx = w.identity("b", "x");
        assert_eq!(w.verdict("a", "a-0", bx, 80), ALLOW, "first operation");
        assert_eq!(w.verdict("a", "a-0", bx, 443), ALLOW);
        assert_eq!(w.verdict("a", "a-0", bx, 22), DENY);
        assert_eq!(w.verdict("a", "a-0", bx, 8080), ALLOW, "not in notPorts");
        // Per peer: the any-port entry allows, one port entry denies.
        let ep = w.endpoint("a", "a-0");
        let per_peer: Vec<_> = ep
            .entries
            .keys()
            .filter(|k| k.peer_identity == bx && k.proto == PROTO_TCP)
            .collect();
        assert_eq!(per_peer.len(), 2, "{per_peer:?}");
    }

    #[test]
    fn empty_rules() {
        let bx = |w: &World| w.identity("b", "x");
        let w = World::standard().with(vec![policy("a", "allow-nothing", "{action: ALLOW}")]);
        assert_eq!(w.verdict("a", "a-0", bx(&w), 80), DENY);
        assert_eq!(w.endpoint("a", "a-0").entries.len(), 1, "the default only");
        let w = World::standard().with(vec![policy("a", "allow-nothing", "{rules: []}")]);
        assert_eq!(w.verdict("a", "a-0", bx(&w), 80), DENY);
        let w = World::standard().with(vec![policy("a", "deny-nothing", "{action: DENY}")]);
        assert_eq!(w.verdict("a", "a-0", bx(&w), 80), ALLOW);
        let w = World::standard().with(vec![policy("a", "allow-all", "{rules: [{}]}")]);
        assert_eq!(w.verdict("a", "a-0", bx(&w), 80), ALLOW);
        assert_eq!(w.verdict("a", "a-0", IDENTITY_WORLD, 80), ALLOW);
        let w =
            World::standard().with(vec![policy("a", "deny-all", "{action: DENY, rules: [{}]}")]);
        assert_eq!(w.verdict("a", "a-0", bx(&w), 80), DENY);
        assert_eq!(w.verdict("a", "a-0", IDENTITY_HOST, 80), DENY, "host");
    }

    /// The node is judged by its addresses, unless `--node-traffic all` exempts it.
    #[test]
    fn node_addresses_are_judged_like_any_peer() {
        let node = |traffic: NodeTraffic, policies: Vec<AuthorizationPolicy>| {
            let mut w = World::standard();
            w.settings.node_traffic = traffic;
            w.settings.host_addresses = vec![
                "192.168.5.10".parse().unwrap(),
                "fd00:5::10".parse().unwrap(),
            ];
            w.compile();
            w.with(policies)
        };
        let deny16 = || {
            policy(
                "a",
                "deny-node-net",
                "{action: DENY, rules: [{from: [{source: {ipBlocks: [192.168.0.0/16, 'fd00:5::/32']}}]}]}",
            )
        };
        let allow_sa = || {
            policy(
                "a",
                "allow-x",
                "{rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}]}",
            )
        };
        let allow_block = || {
            policy(
                "a",
                "allow-node",
                "{rules: [{from: [{source: {ipBlocks: [192.168.5.0/24, 'fd00:5::/64']}}]}]}",
            )
        };
        for traffic in [NodeTraffic::Probes, NodeTraffic::None] {
            // The ipcache names the node's addresses, also inside a wider block.
            let w = node(traffic, vec![deny16()]);
            assert_eq!(
                w.state.ipcache[&("192.168.5.10".parse().unwrap(), 32)],
                IDENTITY_HOST
            );
            // A DENY whose block holds the node's addresses denies it.
            assert_eq!(
                w.verdict("a", "a-0", IDENTITY_HOST, 80),
                DENY,
                "{traffic:?}"
            );
            let deny = kernel(w.endpoint("a", "a-0"), IDENTITY_HOST, 80, PROTO_TCP);
            assert_ne!(deny.policy_id, 0, "a DENY policy decided");
            // An ALLOW by principal does not name the node: default deny.
            let w = node(traffic, vec![allow_sa()]);
            let v = kernel(w.endpoint("a", "a-0"), IDENTITY_HOST, 80, PROTO_TCP);
            assert_eq!((v.verdict, v.policy_id), (DENY, 0), "{traffic:?}");
            // An ALLOW whose block holds the node's addresses allows it.
            let w = node(traffic, vec![allow_sa(), allow_block()]);
            assert_eq!(
                w.verdict("a", "a-0", IDENTITY_HOST, 80),
                ALLOW,
                "{traffic:?}"
            );
        }
        // `all`: as before the setting, the node passes whatever the policies say.
        let w = node(NodeTraffic::All, vec![deny16(), allow_sa()]);
        assert_eq!(w.verdict("a", "a-0", IDENTITY_HOST, 80), ALLOW);
    }

    #[test]
    fn l7_fields() {
        let p = policy(
            "a",
            "get-only",
            "{rules: [{from: [{source: {namespaces: [b]}}], to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: ['81']}}]}]}",
        );
        assert_eq!(p.l7_fields, ["spec.rules[0].to[0].operation.methods"]);
        let w = World::standard().with(vec![p]);
        let bx = w.identity("b", "x");
        assert_eq!(
            w.verdict("a", "a-0", bx, 80),
            DENY,
            "an ALLOW rule with L7 never matches"
        );
        assert_eq!(
            w.verdict("a", "a-0", bx, 81),
            ALLOW,
            "the other rule still does"
        );

        let p = policy(
            "a",
            "deny-post",
            "{action: DENY, rules: [{from: [{source: {namespaces: [b], requestPrincipals: ['*']}}], to: [{operation: {methods: [POST], ports: ['80']}}], when: [{key: 'request.headers[x]', values: [y]}]}]}",
        );
        assert_eq!(p.l7_fields.len(), 3, "{:?}", p.l7_fields);
        let w = World::standard().with(vec![p]);
        assert_eq!(w.verdict("a", "a-0", bx, 80), DENY, "L7 ignored in a DENY");
        assert_eq!(
            w.verdict("a", "a-0", bx, 81),
            ALLOW,
            "the port still counts"
        );
        assert_eq!(w.verdict("a", "a-0", w.identity("c", "w"), 80), ALLOW);
    }

    /// A small deterministic generator for the random-ish cases.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.next(items.len())]
        }

        fn some<T: Clone>(&mut self, items: &[T]) -> Vec<T> {
            if self.next(3) != 0 {
                return Vec::new();
            }
            (0..1 + self.next(2))
                .map(|_| self.pick(items).clone())
                .collect()
        }
    }

    fn random_policy(rng: &mut Lcg, i: usize) -> AuthorizationPolicy {
        let pat = |s: &str| StringMatch::parse(s).unwrap();
        let principals = [
            pat("cluster.local/ns/a/sa/x"),
            pat("cluster.local/ns/b/*"),
            pat("*/sa/x"),
            pat("*"),
        ];
        let namespaces = [pat("a"), pat("b"), pat("c*")];
        let sas = [
            ("a".to_owned(), "x".to_owned()),
            ("b".to_owned(), "z".to_owned()),
        ];
        let cidrs = [
            "10.0.0.0/8",
            "10.0.1.0/24",
            "10.0.2.2",
            "fd00::/16",
            "0.0.0.0/0",
            "192.168.0.0/16",
        ]
        .map(|c| Cidr::parse(c).unwrap());
        let ports = [80u16, 443, 8080];
        let rules = (0..rng.next(4))
            .map(|_| Rule {
                from: (0..rng.next(3))
                    .map(|_| Source {
                        principals: rng.some(&principals),
                        not_principals: rng.some(&principals),
                        namespaces: rng.some(&namespaces),
                        not_namespaces: rng.some(&namespaces),
                        service_accounts: rng.some(&sas),
                        not_service_accounts: rng.some(&sas),
                        ip_blocks: rng.some(&cidrs),
                        not_ip_blocks: rng.some(&cidrs),
                    })
                    .collect(),
                to: (0..rng.next(3))
                    .map(|_| Operation {
                        ports: rng.some(&ports),
                        not_ports: rng.some(&ports),
                    })
                    .collect(),
                has_l7: rng.next(6) == 0,
            })
            .collect();
        let ns = *rng.pick(&["a", "b", "c", ROOT_NAMESPACE]);
        let selector = match rng.next(3) {
            0 => BTreeMap::new(),
            _ => BTreeMap::from([("app".to_owned(), (*rng.pick(&["web", "db"])).to_owned())]),
        };
        AuthorizationPolicy {
            meta: Meta {
                id: ObjectRef {
                    namespace: ns.to_owned(),
                    name: format!("p{i}"),
                },
                labels: BTreeMap::new(),
                origin: Origin::from("random"),
            },
            selector,
            action: if rng.next(2) == 0 {
                Action::Allow
            } else {
                Action::Deny
            },
            rules,
            l7_fields: Vec::new(),
        }
    }

    #[test]
    fn random_policies_match_the_reference_evaluator() {
        let mut rng = Lcg(42);
        for _ in 0..300 {
            let policies = (0..1 + rng.next(4))
                .map(|i| random_policy(&mut rng, i))
                .collect();
            // `with` compiles and checks every endpoint × peer × port × protocol.
            World::standard().with(policies);
        }
    }

    #[test]
    fn state_reports_policy_changes_and_warnings_once() {
        let mut state = State::default();
        let upsert = |r: Vec<Resource>| Update {
            seen: std::time::Instant::now(),
            full: false,
            upserts: r,
            deletes: Vec::new(),
        };
        let applied = state.apply(upsert(vec![Resource::Workload(workload(
            "a",
            "a-0",
            "x",
            "web",
            &["10.0.0.1"],
            true,
        ))]));
        assert!(applied.policy_changed, "identity and endpoint");
        let l7 = policy("a", "p", "{rules: [{to: [{operation: {paths: [/x]}}]}]}");
        let applied = state.apply(upsert(vec![Resource::AuthorizationPolicy(l7.clone())]));
        assert!(applied.policy_changed);
        let [Warning::L7Ignored { fields, .. }] = applied.warnings.as_slice() else {
            panic!("{:?}", applied.warnings)
        };
        assert_eq!(fields, &["spec.rules[0].to[0].operation.paths"]);
        assert!(
            applied.warnings[0].to_string().contains("never match"),
            "{}",
            applied.warnings[0]
        );
        assert!(state.policy().endpoints().values().all(|e| e.enforce));
        assert_eq!(state.policy().policies_loaded(), 1);
        // Same again: nothing.
        let applied = state.apply(upsert(vec![Resource::AuthorizationPolicy(l7.clone())]));
        assert!(!applied.policy_changed && applied.warnings.is_empty());
        // Another change of the same policy keeps the same L7 fields: no new warning.
        let mut changed = l7.clone();
        changed.selector.insert("app".to_owned(), "db".to_owned());
        let applied = state.apply(upsert(vec![Resource::AuthorizationPolicy(changed)]));
        assert!(applied.policy_changed && applied.warnings.is_empty());
        assert_eq!(
            state.policy().policy_entries(),
            1,
            "a-0 is no longer selected"
        );
        let applied = state.apply(Update {
            deletes: vec![ResourceKey {
                kind: Kind::AuthorizationPolicy,
                id: l7.meta.id.clone(),
            }],
            ..upsert(Vec::new())
        });
        assert!(applied.policy_changed, "the policy's name is gone");
        assert_eq!(state.policy().policies_loaded(), 0);
        assert!(state.policy().endpoints().values().all(|e| !e.enforce));
    }

    /// 1,000 workloads (100 apps in 10 namespaces, 200 service accounts) × 100 policies.
    #[test]
    fn compile_time_at_scale() {
        let workloads: Vec<Workload> = (0..1000)
            .map(|i| {
                let ns = format!("ns{}", i % 10);
                workload(
                    &ns,
                    &format!("w{i}"),
                    &format!("sa{}", i % 200),
                    &format!("app{}", i % 100),
                    &[&format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)],
                    true,
                )
            })
            .collect();
        let policies: Vec<AuthorizationPolicy> = (0..100)
            .map(|i| {
                let ns = format!("ns{}", i % 10);
                let spec = match i % 4 {
                    0 => format!("{{selector: {{matchLabels: {{app: app{i}}}}}, rules: [{{from: [{{source: {{namespaces: [ns{}]}}}}], to: [{{operation: {{ports: ['8080']}}}}]}}]}}", (i + 1) % 10),
                    1 => format!("{{action: DENY, selector: {{matchLabels: {{app: app{i}}}}}, rules: [{{from: [{{source: {{principals: ['cluster.local/ns/ns{}/sa/sa{}']}}}}]}}]}}", i % 10, i % 200),
                    2 => format!("{{selector: {{matchLabels: {{app: app{}}}}}, rules: [{{from: [{{source: {{ipBlocks: [10.0.{}.0/24]}}}}], to: [{{operation: {{ports: ['80', '443']}}}}]}}]}}", (i + 2) % 100, i % 4),
                    _ => "{action: DENY, rules: [{from: [{source: {notNamespaces: [ns1, ns2, ns3, ns4, ns5, ns6, ns7, ns8, ns9, ns0]}}]}]}".to_owned(),
                };
                policy(&ns, &format!("p{i}"), &spec)
            })
            .collect();
        let mut state = State::default();
        let start = Instant::now();
        let applied = state.apply(Update {
            seen: start,
            full: true,
            upserts: workloads
                .into_iter()
                .map(Resource::Workload)
                .chain(policies.into_iter().map(Resource::AuthorizationPolicy))
                .collect(),
            deletes: Vec::new(),
        });
        let first = start.elapsed();
        assert!(applied.policy_changed);
        let start = Instant::now();
        let applied = state.apply(Update {
            seen: start,
            full: false,
            upserts: vec![Resource::AuthorizationPolicy(policy(
                "ns0",
                "p0",
                "{rules: [{}]}",
            ))],
            deletes: Vec::new(),
        });
        let again = start.elapsed();
        assert!(applied.policy_changed);
        let entries = state.policy().policy_entries();
        // The worst case: every endpoint enforces and allows every peer.
        let start = Instant::now();
        state.apply(Update {
            seen: start,
            full: false,
            upserts: vec![Resource::AuthorizationPolicy(policy(
                ROOT_NAMESPACE,
                "all",
                "{rules: [{}]}",
            ))],
            deletes: Vec::new(),
        });
        let worst = start.elapsed();
        eprintln!(
            "compile: 1000 workloads x 100 policies: first {first:?}, one policy changed \
             {again:?} ({entries} entries), allow-all mesh-wide {worst:?} ({} entries)",
            state.policy().policy_entries()
        );
    }
}
