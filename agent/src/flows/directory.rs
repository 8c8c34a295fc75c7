//! Who an address and a policy id are: the names flow records and metrics carry.
//!
//! The app owns the truth (the `state` model); it pushes what flows need into a
//! [`Directory`] whenever workloads or policies change. Lookups take a read lock for a
//! hash lookup, so the flow loop never waits long on an update.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};

/// What flow records and metrics say about one workload address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub namespace: String,
    /// The workload's name (Istio's `*_workload` label).
    pub name: String,
    pub service_account: String,
    /// SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub principal: String,
    /// The `app` (or `app.kubernetes.io/name`) label, Istio's `*_app`; `None` if unset.
    pub app: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    workloads: HashMap<IpAddr, Arc<WorkloadInfo>>,
    policies: HashMap<u32, Arc<str>>,
}

/// Address → workload and policy id → `namespace/name`, shared between the app (writer)
/// and the flow loop (reader). Share it as `Arc<Directory>`.
#[derive(Debug, Default)]
pub struct Directory {
    inner: RwLock<Inner>,
}

/// IPv4-mapped IPv6 addresses and plain IPv4 are the same workload address.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Directory {
    /// An empty directory: every address is `world` until the app fills it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces every workload address (local and remote) with `workloads`.
    pub fn set_workloads(&self, workloads: impl IntoIterator<Item = (IpAddr, WorkloadInfo)>) {
        let map = workloads
            .into_iter()
            .map(|(ip, w)| (canonical(ip), Arc::new(w)))
            .collect();
        if let Ok(mut inner) = self.inner.write() {
            inner.workloads = map;
        }
    }

    /// Adds or replaces one workload address.
    pub fn upsert_workload(&self, ip: IpAddr, info: WorkloadInfo) {
        if let Ok(mut inner) = self.inner.write() {
            inner.workloads.insert(canonical(ip), Arc::new(info));
        }
    }

    /// Forgets one workload address.
    pub fn remove_workload(&self, ip: IpAddr) {
        if let Ok(mut inner) = self.inner.write() {
            inner.workloads.remove(&canonical(ip));
        }
    }

    /// Replaces the policy names: the `policy_id` the kernel reports → `namespace/name`.
    pub fn set_policies(&self, policies: impl IntoIterator<Item = (u32, String)>) {
        let map = policies
            .into_iter()
            .map(|(id, name)| (id, Arc::from(name)))
            .collect();
        if let Ok(mut inner) = self.inner.write() {
            inner.policies = map;
        }
    }

    /// The workload holding `ip`, if any.
    pub fn workload(&self, ip: IpAddr) -> Option<Arc<WorkloadInfo>> {
        self.inner
            .read()
            .ok()
            .and_then(|i| i.workloads.get(&canonical(ip)).cloned())
    }

    /// `namespace/name` of the policy the kernel reports as `id`, if known.
    pub fn policy(&self, id: u32) -> Option<Arc<str>> {
        self.inner
            .read()
            .ok()
            .and_then(|i| i.policies.get(&id).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_plain_v4_are_the_same_address() {
        let d = Directory::new();
        let w = WorkloadInfo {
            namespace: "ns".into(),
            name: "a".into(),
            ..Default::default()
        };
        d.upsert_workload("::ffff:10.0.0.1".parse().unwrap(), w.clone());
        assert_eq!(d.workload("10.0.0.1".parse().unwrap()).as_deref(), Some(&w));
        d.remove_workload("10.0.0.1".parse().unwrap());
        assert!(d.workload("::ffff:10.0.0.1".parse().unwrap()).is_none());
        d.set_policies([(7, "ns/deny-all".to_string())]);
        assert_eq!(d.policy(7).as_deref(), Some("ns/deny-all"));
        assert_eq!(d.policy(8), None);
    }
}
