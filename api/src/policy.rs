//! `AuthorizationPolicy` (`mycel.dev/v1alpha1`): the spec types, the custom resource
//! derived from them, its status and the `Accepted` condition.
//!
//! The fields are Istio's `security.istio.io/v1` AuthorizationPolicy fields (same names,
//! same meaning), so that operators can carry their policies over. The schema the API
//! server checks says, where it can, exactly what the agent's translation checks: the two
//! must never disagree about what a valid policy is. Every check is an OpenAPI `enum`,
//! `pattern`, `minimum`/`maximum` or `required`, not a CEL rule: a CEL rule below the
//! `rules` list would need `maxItems` on every enclosing list to pass the API server's
//! cost estimate, and the agent has no such limits.

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1 as meta, jiff::Timestamp};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// `apiVersion` of [`AuthorizationPolicy`].
pub const POLICY_API_VERSION: &str = "mycel.dev/v1alpha1";
/// `kind` of [`AuthorizationPolicy`].
pub const POLICY_KIND: &str = "AuthorizationPolicy";
/// The `type` of the condition that says whether the agent took the policy.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Reason of an `Accepted=True` condition: the policy is in force.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Reason of an `Accepted=False` condition: the policy has a problem the message names;
/// the previous version of the policy (if any) stays in force.
pub const REASON_INVALID: &str = "Invalid";
/// The longest condition message the API server accepts (`meta/v1` Condition).
pub const MAX_CONDITION_MESSAGE: usize = 32768;

/// A port as the agent reads it: optional blanks, an optional `+`, then a decimal number in
/// 1-65535 (leading zeros allowed). Mirrors `str::trim` + `i64::from_str` + the range check.
pub const PORT_PATTERN: &str = r"^[ \t\n\v\f\r]*\+?0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])[ \t\n\v\f\r]*$";
/// A namespace pattern: `*`, `exact`, `prefix*` or `*suffix` (one `*`, at an end).
pub const NAMESPACE_PATTERN: &str = r"^(\*|\*?[^*]+|[^*]+\*)$";
/// A principal pattern: a [`NAMESPACE_PATTERN`], optionally after `spiffe://`.
pub const PRINCIPAL_PATTERN: &str = r"^(spiffe://)?(\*|\*?[^*]+|[^*]+\*)$";
/// A service account: `<namespace>/<name>` or `<name>`, both non-empty, no wildcards.
pub const SERVICE_ACCOUNT_PATTERN: &str = r"^[^/*]+(/[^/*]+)?$";
/// The pattern of [`ip_block_pattern`], where `V4` stands for the IPv4 part and is
/// substituted by it.
const IP_BLOCK_TEMPLATE: &str = concat!(
    "^(",
    // IPv4, each octet without leading zeros (as Rust's and Go's parsers want).
    r"((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])",
    // The prefix length as `u8::from_str` reads it (`+`, leading zeros), at most 32.
    r"(/\+?0*([0-9]|[12][0-9]|3[0-2]))?",
    "|(",
    // IPv6 as RFC 4291 section 2.2 writes it (RFC 3986's `IPv6address`), the last 32 bits
    // optionally as IPv4.
    r"([0-9a-fA-F]{1,4}:){6}(([0-9a-fA-F]{1,4}:[0-9a-fA-F]{1,4})|V4)",
    r"|::([0-9a-fA-F]{1,4}:){5}(([0-9a-fA-F]{1,4}:[0-9a-fA-F]{1,4})|V4)",
    r"|([0-9a-fA-F]{1,4})?::([0-9a-fA-F]{1,4}:){4}(([0-9a-fA-F]{1,4}:[0-9a-fA-F]{1,4})|V4)",
    r"|(([0-9a-fA-F]{1,4}:){0,1}[0-9a-fA-F]{1,4})?::([0-9a-fA-F]{1,4}:){3}(([0-9a-fA-F]{1,4}:[0-9a-fA-F]{1,4})|V4)",
    r"|(([0-9a-fA-F]{1,4}:){0,2}[0-9a-fA-F]{1,4})?::([0-9a-fA-F]{1,4}:){2}(([0-9a-fA-F]{1,4}:[0-9a-fA-F]{1,4})|V4)",
    r"|(([0-9a-fA-F]{1,4}:){0,3}[0-9a-fA-F]{1,4})?::[0-9a-fA-F]{1,4}:(([0-9a-fA-F]{1,4}:[0-9a-fA-F]{1,4})|V4)",
    r"|(([0-9a-fA-F]{1,4}:){0,4}[0-9a-fA-F]{1,4})?::(([0-9a-fA-F]{1,4}:[0-9a-fA-F]{1,4})|V4)",
    r"|(([0-9a-fA-F]{1,4}:){0,5}[0-9a-fA-F]{1,4})?::[0-9a-fA-F]{1,4}",
    r"|(([0-9a-fA-F]{1,4}:){0,6}[0-9a-fA-F]{1,4})?::",
    ")",
    // At most 128.
    r"(/\+?0*([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))?",
    ")$",
);

/// An IPv4 or IPv6 address, optionally with a prefix length (`/n`, at most 32 or 128): what
/// the agent's CIDR parser (Rust's address parser, then `u8::from_str`) accepts.
///
/// A function rather than a constant so that the source stays readable: the IPv6
/// alternatives repeat the dotted-quad form eight times.
pub fn ip_block_pattern() -> String {
    const V4: &str = r"((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    IP_BLOCK_TEMPLATE.replace("V4", V4)
}

/// mycel's `AuthorizationPolicy` (`mycel.dev/v1alpha1`), with the fields of Istio's
/// `security.istio.io/v1` AuthorizationPolicy (same names, same meaning; the agent's
/// `state::policy` says what the kernel can enforce).
///
/// ```yaml
/// apiVersion: mycel.dev/v1alpha1
/// kind: AuthorizationPolicy
/// metadata: {name: web-from-frontend, namespace: shop}
/// spec:
///   selector: {matchLabels: {app: web}}
///   action: ALLOW
///   rules:
///   - from:
///     - source: {principals: [cluster.local/ns/shop/sa/frontend]}
///     to:
///     - operation: {ports: ["8080"]}
/// ```
#[expect(
    clippy::duplicated_attributes,
    reason = "the printer columns share `type_ = \"string\"`, which clippy takes for a repeat"
)]
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "mycel.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "myap",
    namespaced,
    status = "AuthorizationPolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Which peers may reach the selected workloads, by identity, namespace, address and port (Istio's AuthorizationPolicy fields and semantics)."
)]
#[kube(printcolumn(
    name = "Action",
    type_ = "string",
    description = "ALLOW (the default) or DENY",
    json_path = ".spec.action"
))]
#[kube(printcolumn(
    name = "Accepted",
    type_ = "string",
    description = "Whether the agent accepted the policy (see the Accepted condition's message when not)",
    json_path = r#".status.conditions[?(@.type=="Accepted")].status"#
))]
#[kube(printcolumn(
    name = "Age",
    type_ = "date",
    json_path = ".metadata.creationTimestamp"
))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The workloads of the namespace the policy applies to; absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (the default) or `DENY`.
    ///
    /// A string rather than an enum so that the agent can say why `AUDIT` and `CUSTOM`
    /// (Istio's other actions) are refused; the schema lets the API server refuse them
    /// first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["ALLOW", "DENY"]))]
    pub action: Option<String>,
    /// Absent or empty: the policy matches nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleSpec>>,
}

/// `spec.selector`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all have for the policy to apply to it.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `spec.rules[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// Who the peer is; absent: anyone. Any entry matching is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<RuleFrom>>,
    /// What the peer asks for; absent: anything. Any entry matching is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<RuleTo>>,
    /// Conditions; HTTP-level for mycel's purposes (see the agent's `state::policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

/// `spec.rules[].from[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// Required, as in Istio: a `from` entry without a source is a mistake, not "anyone".
    // No `serde(default)`: schemars would then leave it out of `required`. A missing
    // `Option` field still decodes as `None`, which the agent reports as missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(required)]
    pub source: Option<SourceSpec>,
}

/// `spec.rules[].to[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    /// Required, as in Istio: a `to` entry without an operation is a mistake.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(required)]
    pub operation: Option<OperationSpec>,
}

/// `spec.rules[].from[].source`.
///
/// At least one field must be set (the agent also refuses one whose lists are all empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("minProperties" = 1))]
pub struct SourceSpec {
    /// `cluster.local/ns/<ns>/sa/<sa>` (optionally with `spiffe://`); `*`, `prefix*`,
    /// `*suffix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(PRINCIPAL_PATTERN)))]
    pub principals: Option<Vec<String>>,
    /// Principals that must not match (same forms as `principals`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(PRINCIPAL_PATTERN)))]
    pub not_principals: Option<Vec<String>>,
    /// HTTP-level (JWT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_principals: Option<Vec<String>>,
    /// HTTP-level (JWT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_request_principals: Option<Vec<String>>,
    /// The peer's namespace: `*`, `exact`, `prefix*`, `*suffix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(NAMESPACE_PATTERN)))]
    pub namespaces: Option<Vec<String>>,
    /// Namespaces that must not match (same forms as `namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(NAMESPACE_PATTERN)))]
    pub not_namespaces: Option<Vec<String>>,
    /// Addresses or CIDRs of the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(ip_block_pattern())))]
    pub ip_blocks: Option<Vec<String>>,
    /// Addresses or CIDRs the peer must not be in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(ip_block_pattern())))]
    pub not_ip_blocks: Option<Vec<String>>,
    /// HTTP-level (`X-Forwarded-For`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip_blocks: Option<Vec<String>>,
    /// HTTP-level (`X-Forwarded-For`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_remote_ip_blocks: Option<Vec<String>>,
    /// `<namespace>/<name>`, or `<name>` in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(SERVICE_ACCOUNT_PATTERN)))]
    pub service_accounts: Option<Vec<String>>,
    /// Service accounts that must not match (same forms as `serviceAccounts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(SERVICE_ACCOUNT_PATTERN)))]
    pub not_service_accounts: Option<Vec<String>>,
}

/// `spec.rules[].to[].operation`.
///
/// At least one field must be set (the agent also refuses one whose lists are all empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("minProperties" = 1))]
pub struct OperationSpec {
    /// Destination ports, as strings (Istio) or numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortValue>>,
    /// Destination ports that must not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ports: Option<Vec<PortValue>>,
    /// HTTP-level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// HTTP-level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_hosts: Option<Vec<String>>,
    /// HTTP-level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// HTTP-level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_methods: Option<Vec<String>>,
    /// HTTP-level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// HTTP-level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_paths: Option<Vec<String>>,
}

/// `spec.rules[].when[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// The name of an Istio attribute (`source.ip`, `request.headers[...]`, ...).
    pub key: String,
    /// Values of which one must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// Values of which none may match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_values: Option<Vec<String>>,
}

/// A port as Istio writes it (a string of digits) or as a number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    /// `8080`.
    Number(i64),
    /// `"8080"`.
    Text(String),
}

impl JsonSchema for PortValue {
    fn schema_name() -> Cow<'static, str> {
        "PortValue".into()
    }

    fn inline_schema() -> bool {
        true
    }

    /// Kubernetes' int-or-string: `minimum`/`maximum` apply to numbers only and `pattern`
    /// to strings only, so together they say what the agent accepts in either form.
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "minimum": 1,
            "maximum": 65535,
            "pattern": PORT_PATTERN,
        })
    }
}

/// What the agent last made of an AuthorizationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicyStatus {
    /// The `Accepted` condition (one per type, as `meta/v1` conditions go).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<meta::Condition>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The agent's verdict on one generation of a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acceptance {
    /// The policy is in force.
    Accepted,
    /// The policy was refused; the text says why (every problem, with its field).
    Invalid(String),
}

/// The `Accepted` condition for `acceptance` of the policy's `generation`, stamped `now`.
///
/// The message is cut (at a character boundary) to what the API server accepts, so that a
/// policy with very many problems still gets a status.
pub fn accepted_condition(
    acceptance: &Acceptance,
    generation: Option<i64>,
    now: Timestamp,
) -> meta::Condition {
    let (status, reason, message) = match acceptance {
        Acceptance::Accepted => ("True", REASON_ACCEPTED, "the policy is in force".to_owned()),
        Acceptance::Invalid(why) => ("False", REASON_INVALID, truncate(why)),
    };
    meta::Condition {
        type_: CONDITION_ACCEPTED.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: meta::Time(now),
    }
}

/// Puts `condition` into `conditions`, replacing the one of the same type.
///
/// As apimachinery's `meta.SetStatusCondition`: `lastTransitionTime` moves only when the
/// status changes, so that it says since when the condition has held.
pub fn set_condition(conditions: &mut Vec<meta::Condition>, mut condition: meta::Condition) {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            if existing.status == condition.status {
                condition.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = condition;
        }
        None => conditions.push(condition),
    }
}

fn truncate(message: &str) -> String {
    if message.len() <= MAX_CONDITION_MESSAGE {
        return message.to_owned();
    }
    const MORE: &str = " …";
    let mut end = MAX_CONDITION_MESSAGE - MORE.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &message[..end])
}

#[cfg(test)]
mod tests {
    use kube::Resource as _;

    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("a valid test time")
    }

    #[test]
    fn constants_match_the_resource() {
        assert_eq!(AuthorizationPolicy::api_version(&()), POLICY_API_VERSION);
        assert_eq!(AuthorizationPolicy::kind(&()), POLICY_KIND);
    }

    #[test]
    fn accepted_condition_says_why() {
        let c = accepted_condition(&Acceptance::Accepted, Some(3), at(10));
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Accepted", "True", "Accepted")
        );
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(c.last_transition_time.0, at(10));

        let why = "spec.rules[0].to[0].operation.ports[0]: 70000 is out of range 1-65535";
        let c = accepted_condition(&Acceptance::Invalid(why.into()), Some(4), at(11));
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
        assert_eq!(c.message, why);
    }

    #[test]
    fn long_messages_are_cut_at_a_character() {
        let long = "é".repeat(MAX_CONDITION_MESSAGE);
        let c = accepted_condition(&Acceptance::Invalid(long), None, at(0));
        assert!(
            c.message.len() <= MAX_CONDITION_MESSAGE,
            "{}",
            c.message.len()
        );
        assert!(c.message.ends_with(" …"));
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            accepted_condition(&Acceptance::Accepted, Some(1), at(100)),
        );
        set_condition(
            &mut conditions,
            accepted_condition(&Acceptance::Accepted, Some(2), at(200)),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(conditions[0].last_transition_time.0, at(100));

        set_condition(
            &mut conditions,
            accepted_condition(&Acceptance::Invalid("bad".into()), Some(3), at(300)),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].status, "False");
        assert_eq!(conditions[0].last_transition_time.0, at(300));
    }

    #[test]
    fn serializes_with_api_version_and_kind() {
        let p = AuthorizationPolicy::new("p", AuthorizationPolicySpec::default());
        let v = serde_json::to_value(&p).expect("a policy serializes");
        assert_eq!(v["apiVersion"], POLICY_API_VERSION);
        assert_eq!(v["kind"], POLICY_KIND);
        assert!(v.get("status").is_none());
    }
}
