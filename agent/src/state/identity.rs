//! Numeric identities: one per (namespace, service account) of a workload, one per CIDR a
//! policy names, and the small numbers that name endpoints and policies.
//!
//! # Allocation rule
//!
//! Every kind of number comes from an [`Allocator`] over a range. A key keeps its number for
//! as long as it is wanted (from one compile to the next). New keys get numbers in the order
//! of the keys (sorted), each the next number after the highest ever given out, so a number
//! is not given to another key after its key goes; only when the range is exhausted are the
//! freed numbers handed out again, lowest first, and never one still in use. The same input,
//! applied in the same order, always gives the same numbers; numbers are not kept across
//! agent restarts (the agent rewrites the maps at start).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use mycel_common::policy::{IDENTITY_FIRST_CIDR, IDENTITY_FIRST_WORKLOAD};
use serde::Serialize;

use super::policy::Cidr;

/// The trust domain of SPIFFE IDs when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!(
        "spiffe://{}",
        principal(trust_domain, namespace, service_account)
    )
}

/// The principal as Istio writes it in policies: the SPIFFE ID without `spiffe://`.
pub fn principal(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// What a numeric identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum IdentityInfo {
    /// The workloads of one service account.
    Workload {
        namespace: String,
        service_account: String,
        /// `spiffe://...`.
        spiffe_id: String,
        /// Every address of every workload with this identity, sorted.
        addresses: Vec<IpAddr>,
    },
    /// Addresses in a CIDR some policy names, outside every longer prefix and workload
    /// address the ipcache holds.
    Cidr(Cidr),
}

/// Hands out numbers from `first..=last` to keys, following the module's rule.
#[derive(Clone, Debug)]
pub(crate) struct Allocator<K> {
    first: u32,
    last: u32,
    /// The next never-used number; `None` once the range has been used up once.
    next: Option<u32>,
    ids: BTreeMap<K, u32>,
    used: BTreeSet<u32>,
}

impl<K: Ord + Clone> Allocator<K> {
    pub(crate) fn new(first: u32, last: u32) -> Self {
        Allocator {
            first,
            last,
            next: Some(first),
            ids: BTreeMap::new(),
            used: BTreeSet::new(),
        }
    }

    /// The number of `key`, if it has one.
    pub(crate) fn get(&self, key: &K) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// Keeps the numbers of the keys in `wanted`, frees the others, and gives numbers to the
    /// new keys (in key order). A key gets none only if every number of the range is in use.
    pub(crate) fn sync<'a>(&mut self, wanted: impl IntoIterator<Item = &'a K>)
    where
        K: 'a,
    {
        let wanted: BTreeSet<&K> = wanted.into_iter().collect();
        let stale: Vec<K> = self
            .ids
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        for key in stale {
            if let Some(id) = self.ids.remove(&key) {
                self.used.remove(&id);
            }
        }
        for key in wanted {
            if self.ids.contains_key(key) {
                continue;
            }
            if let Some(id) = self.take() {
                self.ids.insert(key.clone(), id);
                self.used.insert(id);
            }
        }
    }

    /// A number nobody has, preferring one never given out.
    fn take(&mut self) -> Option<u32> {
        if let Some(next) = self.next {
            self.next = next.checked_add(1).filter(|n| *n <= self.last);
            return Some(next);
        }
        // The range was used up once: the lowest free number.
        let mut candidate = self.first;
        for &id in self.used.range(self.first..=self.last) {
            if id != candidate {
                break;
            }
            candidate = candidate.checked_add(1)?;
        }
        (candidate <= self.last).then_some(candidate)
    }

    /// Every key with its number.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, u32)> {
        self.ids.iter().map(|(k, id)| (k, *id))
    }
}

/// The identities of workloads and CIDRs.
#[derive(Clone, Debug)]
pub(crate) struct Identities {
    /// By (namespace, service account).
    pub(crate) workloads: Allocator<(String, String)>,
    pub(crate) cidrs: Allocator<Cidr>,
}

impl Default for Identities {
    fn default() -> Self {
        Identities {
            workloads: Allocator::new(IDENTITY_FIRST_WORKLOAD, IDENTITY_FIRST_CIDR - 1),
            cidrs: Allocator::new(IDENTITY_FIRST_CIDR, u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn numbers_are_stable_and_not_reused_while_the_range_lasts() {
        let mut a: Allocator<String> = Allocator::new(10, 1000);
        a.sync(&keys(&["b", "a"]));
        assert_eq!(
            a.get(&"a".to_owned()),
            Some(10),
            "key order, not input order"
        );
        assert_eq!(a.get(&"b".to_owned()), Some(11));
        a.sync(&keys(&["b", "c"]));
        assert_eq!(a.get(&"a".to_owned()), None);
        assert_eq!(a.get(&"b".to_owned()), Some(11), "kept");
        assert_eq!(a.get(&"c".to_owned()), Some(12), "a's 10 is not reused");
        a.sync(&keys(&["a", "b", "c"]));
        assert_eq!(
            a.get(&"a".to_owned()),
            Some(13),
            "a comes back with a new number"
        );
    }

    #[test]
    fn exhausted_range_reuses_the_lowest_free_number_only() {
        let mut a: Allocator<String> = Allocator::new(1, 3);
        a.sync(&keys(&["a", "b", "c"]));
        a.sync(&keys(&["a", "c"]));
        a.sync(&keys(&["a", "c", "d"]));
        assert_eq!(a.get(&"d".to_owned()), Some(2));
        a.sync(&keys(&["a", "c", "d", "e"]));
        assert_eq!(a.get(&"e".to_owned()), None, "every number in use");
        assert_eq!(a.iter().count(), 3);
    }

    #[test]
    fn spiffe_ids() {
        assert_eq!(
            spiffe_id(DEFAULT_TRUST_DOMAIN, "default", "sleep"),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(principal("example.org", "a", "b"), "example.org/ns/a/sa/b");
    }
}
