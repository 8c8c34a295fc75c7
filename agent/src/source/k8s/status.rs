//! AuthorizationPolicies from the API, and their `Accepted` status condition.
//!
//! Policies are read as dynamic objects and decoded here, one at a time, so that one
//! policy the agent cannot read is reported (with the field's path, in its status) instead
//! of failing the whole watch.
//!
//! Every node's agent judges every policy the same way, so each writes the condition only
//! for policies that select a workload of its node, and only when what the object holds
//! differs from its verdict: once one node has written it, the others find it already
//! there. A write in flight is not repeated; a failed write is retried a second later.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{super::Error, Item, Location};
use crate::{
    source::translate,
    state::{self, Kind, ObjectRef},
};

/// The condition type the agent sets.
pub const ACCEPTED: &str = "Accepted";
/// Reason of `Accepted=True`.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Reason of `Accepted=False`.
pub const REASON_INVALID: &str = "Invalid";
/// Status writes queued at most.
const WRITE_QUEUE: usize = 1_024;

/// `mycel.dev/v1alpha1` `authorizationpolicies`.
pub fn policy_api_resource() -> ApiResource {
    ApiResource {
        group: "mycel.dev".into(),
        version: "v1alpha1".into(),
        api_version: translate::POLICY_API_VERSION.into(),
        kind: translate::POLICY_KIND.into(),
        plural: "authorizationpolicies".into(),
    }
}

/// The parts of an `Accepted` condition the agent compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedCondition {
    pub accepted: bool,
    pub reason: String,
    pub message: String,
    pub observed_generation: Option<i64>,
}

/// One policy as its watcher saw it.
#[derive(Debug)]
pub struct PolicyItem {
    pub result: Result<state::AuthorizationPolicy, Vec<Error>>,
    /// What was translated (kind, name, labels and spec), to save as the last good
    /// version when accepted.
    pub document: serde_json::Value,
    pub generation: Option<i64>,
    /// The `Accepted` condition the object holds now.
    pub current: Option<AcceptedCondition>,
    /// When the current condition last changed status (kept when only its message does).
    pub current_since: Option<Time>,
}

/// Decodes and translates a policy.
pub fn translate_policy(obj: DynamicObject, location: &Location) -> Item {
    let generation = obj.metadata.generation;
    let object = translate::object_name(&obj.metadata);
    let (current, current_since) = accepted_in(&obj.data);
    let mut value = serde_json::json!({
        "apiVersion": translate::POLICY_API_VERSION,
        "kind": translate::POLICY_KIND,
        "metadata": {
            "name": obj.metadata.name,
            "namespace": obj.metadata.namespace,
            "labels": obj.metadata.labels,
        },
    });
    if let (Some(out), Some(spec)) = (value.as_object_mut(), obj.data.get("spec")) {
        out.insert("spec".into(), spec.clone());
    }
    Item::Policy(PolicyItem {
        result: translate_policy_document(value.clone(), location, object),
        document: value,
        generation,
        current,
        current_since,
    })
}

/// Translates a policy document (as [`PolicyItem::document`] holds it) into the model.
pub fn translate_policy_document(
    value: serde_json::Value,
    location: &Location,
    object: String,
) -> Result<state::AuthorizationPolicy, Vec<Error>> {
    decode::<translate::AuthorizationPolicy>(value, location, object)
        .and_then(|p| translate::authorization_policy(&p, location))
}

/// Deserializes an object; a failure names the field's path.
fn decode<T: DeserializeOwned>(
    value: serde_json::Value,
    location: &Location,
    object: String,
) -> Result<T, Vec<Error>> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        vec![Error::Decode {
            location: location.clone(),
            kind: Kind::AuthorizationPolicy,
            object,
            field: e.path().to_string(),
            message: e.inner().to_string(),
        }]
    })
}

/// The `Accepted` condition in an object's `status`, if any.
fn accepted_in(data: &serde_json::Value) -> (Option<AcceptedCondition>, Option<Time>) {
    let conditions = data
        .pointer("/status/conditions")
        .cloned()
        .and_then(|c| serde_json::from_value::<Vec<Condition>>(c).ok())
        .unwrap_or_default();
    match conditions.into_iter().find(|c| c.type_ == ACCEPTED) {
        Some(c) => (
            Some(AcceptedCondition {
                accepted: c.status == "True",
                reason: c.reason,
                message: c.message,
                observed_generation: c.observed_generation,
            }),
            Some(c.last_transition_time),
        ),
        None => (None, None),
    }
}

/// What the agent's verdict on a policy is.
fn verdict(item: &PolicyItem) -> AcceptedCondition {
    match &item.result {
        Ok(policy) => AcceptedCondition {
            accepted: true,
            reason: REASON_ACCEPTED.into(),
            message: if policy.l7_fields.is_empty() {
                "the policy is enforced".into()
            } else {
                format!(
                    "the policy is enforced at L4; HTTP-level fields ({}) make their rules \
                     match no connection in ALLOW policies and every connection in DENY \
                     policies",
                    policy.l7_fields.join(", ")
                )
            },
            observed_generation: item.generation,
        },
        Err(errors) => AcceptedCondition {
            accepted: false,
            reason: REASON_INVALID.into(),
            message: errors
                .iter()
                .map(field_message)
                .collect::<Vec<_>>()
                .join("; "),
            observed_generation: item.generation,
        },
    }
}

/// A problem without its location (the object is the one the status is on).
fn field_message(e: &Error) -> String {
    match e {
        Error::Invalid { field, problem, .. } => format!("{field}: {problem}"),
        Error::Decode { field, message, .. } => format!("{field}: {message}"),
        other => other.to_string(),
    }
}

/// What the source knows of one policy's status.
#[derive(Debug)]
struct PolicyStatus {
    desired: AcceptedCondition,
    current: Option<AcceptedCondition>,
    current_since: Option<Time>,
    /// `spec.selector.matchLabels` when the policy is valid; `None`: decide by namespace.
    selector: Option<BTreeMap<String, String>>,
    in_flight: bool,
    failed: bool,
}

/// The status of every policy, and which need writing.
#[derive(Debug, Default)]
pub struct Policies {
    all: HashMap<ObjectRef, PolicyStatus>,
}

impl Policies {
    /// Records a policy as watched.
    pub fn observe(&mut self, id: &ObjectRef, item: &PolicyItem) {
        let desired = verdict(item);
        let selector = item.result.as_ref().ok().map(|p| p.selector.clone());
        let (in_flight, failed) = match self.all.get(id) {
            Some(s) => (s.in_flight, s.failed),
            None => (false, false),
        };
        self.all.insert(
            id.clone(),
            PolicyStatus {
                desired,
                current: item.current.clone(),
                current_since: item.current_since.clone(),
                selector,
                in_flight,
                failed,
            },
        );
    }

    pub fn forget(&mut self, id: &ObjectRef) {
        self.all.remove(id);
    }

    /// A write finished.
    pub fn written(&mut self, result: WriteResult) {
        if let Some(s) = self.all.get_mut(&result.id) {
            s.in_flight = false;
            match result.written {
                Some(condition) => {
                    s.current = Some(condition);
                    s.failed = false;
                }
                None => s.failed = true,
            }
        }
    }

    /// Lets failed writes be tried again.
    pub fn retry_failed(&mut self) {
        for s in self.all.values_mut() {
            s.failed = false;
        }
    }

    /// Queues a write for every policy that selects a local workload and whose condition
    /// differs from the agent's verdict.
    pub fn reconcile(&mut self, local: &[&state::Workload], root_namespace: &str, writer: &Writer) {
        for (id, s) in &mut self.all {
            if s.in_flight || s.failed || s.current.as_ref() == Some(&s.desired) {
                continue;
            }
            let selects = local.iter().any(|w| {
                (id.namespace == root_namespace || w.meta.id.namespace == id.namespace)
                    && s.selector
                        .as_ref()
                        .is_none_or(|sel| sel.iter().all(|(k, v)| w.meta.labels.get(k) == Some(v)))
            });
            if !selects {
                continue;
            }
            let since = match (&s.current, &s.current_since) {
                (Some(c), Some(t)) if c.accepted == s.desired.accepted => t.clone(),
                _ => Time(Timestamp::now()),
            };
            let job = WriteJob {
                id: id.clone(),
                condition: s.desired.clone(),
                since,
            };
            match writer.jobs.try_send(job) {
                Ok(()) => s.in_flight = true,
                Err(_) => s.failed = true,
            }
        }
    }
}

/// A status write to make.
#[derive(Debug)]
pub struct WriteJob {
    id: ObjectRef,
    condition: AcceptedCondition,
    since: Time,
}

/// How a write ended: the condition written, or `None` when it failed.
#[derive(Debug)]
pub struct WriteResult {
    id: ObjectRef,
    written: Option<AcceptedCondition>,
}

/// Writes policy status, one write at a time, off the merger's task.
#[derive(Debug)]
pub struct Writer {
    jobs: mpsc::Sender<WriteJob>,
}

impl Writer {
    pub fn start(client: Client) -> (Writer, mpsc::Receiver<WriteResult>) {
        let (jobs, mut rx) = mpsc::channel::<WriteJob>(WRITE_QUEUE);
        let (results_tx, results) = mpsc::channel(WRITE_QUEUE);
        let resource = policy_api_resource();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &job.id.namespace, &resource);
                let c = &job.condition;
                let condition = Condition {
                    type_: ACCEPTED.into(),
                    status: if c.accepted { "True" } else { "False" }.into(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                    observed_generation: c.observed_generation,
                    last_transition_time: job.since.clone(),
                };
                let patch = serde_json::json!({"status": {"conditions": [condition]}});
                let written = match api
                    .patch_status(&job.id.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        debug!(policy = %job.id, accepted = c.accepted, "policy status written");
                        Some(job.condition)
                    }
                    Err(e) => {
                        warn!(policy = %job.id, "cannot write the policy's status: {e}; retrying");
                        None
                    }
                };
                let result = WriteResult {
                    id: job.id,
                    written,
                };
                if results_tx.send(result).await.is_err() {
                    return;
                }
            }
        });
        (Writer { jobs }, results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location() -> Location {
        Location::new(super::super::ORIGIN.into())
    }

    fn policy(spec: serde_json::Value, status: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mycel.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop", "generation": 3},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    fn item(obj: DynamicObject) -> PolicyItem {
        match translate_policy(obj, &location()) {
            Item::Policy(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_invalid_policy_is_judged_invalid_with_the_field_named() {
        let p = item(policy(
            serde_json::json!({"action": "ALLOW", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
            serde_json::json!({}),
        ));
        let v = verdict(&p);
        assert!(!v.accepted);
        assert_eq!(v.reason, REASON_INVALID);
        assert!(
            v.message
                .contains("spec.rules[0].from[0].source.ipBlocks[0]"),
            "{}",
            v.message
        );
        assert_eq!(v.observed_generation, Some(3));

        let p = item(policy(
            serde_json::json!({"acton": "ALLOW"}),
            serde_json::json!({}),
        ));
        let v = verdict(&p);
        assert!(!v.accepted);
        assert!(v.message.contains("acton"), "{}", v.message);
    }

    #[test]
    fn the_condition_held_is_read_back() {
        let p = item(policy(
            serde_json::json!({"action": "DENY", "rules": [{}]}),
            serde_json::json!({"conditions": [{"type": "Accepted", "status": "True",
                "reason": "Accepted", "message": "the policy is enforced",
                "observedGeneration": 3, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        ));
        assert!(p.result.is_ok());
        assert_eq!(p.current.as_ref(), Some(&verdict(&p)), "nothing to write");
    }
}
