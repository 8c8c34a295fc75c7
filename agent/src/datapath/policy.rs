//! Typed writers for IPCACHE, ENDPOINTS and POLICY, applying only differences.
//!
//! The TC programs cache a verdict per flow together with the endpoint's
//! `policy_revision`; a flow is evaluated again when the revision moves. Write order keeps
//! that sound: first IPCACHE and POLICY are brought to the desired content (new and changed
//! entries written, stale ones deleted), and only then are the revisions of the affected
//! endpoints bumped. A flow evaluated while entries were changing carries the old revision
//! and is evaluated again after the bump; no flow can cache a verdict from a half-written
//! policy under the new revision.
//!
//! The writer owns the revisions: [`EndpointInfo::policy_revision`] in the desired content
//! is ignored. An endpoint's revision is bumped when its info or any of its POLICY entries
//! changed, and every endpoint's when IPCACHE changed (a peer's identity may have moved).
//!
//! SOURCES (what each workload may send from) is written before ENDPOINTS and loses stale
//! entries after it: a workload's packets are checked only once its ENDPOINTS entry exists,
//! and by then its addresses are there. NODE_CONFIG is written first.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{
    Array, HashMap as BpfHashMap, IterableMap, MapData, lpm_trie::Key, lpm_trie::LpmTrie,
};
use mycel_common::{
    policy::{
        EndpointInfo, IpcacheAddr, IpcacheValue, NodeConfig, PolicyKey, PolicyValue, SourceAddr,
    },
    service::v4_mapped,
};
use serde::Serialize;
use tracing::{debug, warn};

use super::{Error, full_or, remove_ok};

const IPCACHE: &str = "IPCACHE";
const ENDPOINTS: &str = "ENDPOINTS";
const POLICY: &str = "POLICY";
const SOURCES: &str = "SOURCES";
const NODE_CONFIG: &str = "NODE_CONFIG";

/// An IPCACHE prefix: an address and its prefix length (≤ 32 for IPv4, ≤ 128 for IPv6).
pub type IpPrefix = (IpAddr, u8);

/// Everything the policy maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyContent {
    /// Identity of every known address or CIDR.
    pub ipcache: BTreeMap<IpPrefix, u32>,
    /// Local endpoints by the ifindex of their host-side interface (`policy_revision` is
    /// ignored: the writer sets it).
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// Compiled policy entries.
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// Every address of every local workload → the ifindex of its host-side interface:
    /// the only sources its packets may have (anti-spoofing).
    pub sources: BTreeMap<IpAddr, u32>,
    /// Node-wide settings.
    pub node: NodeConfig,
}

/// Counts of one [`PolicyMaps::apply`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicyApplyStats {
    pub ipcache_writes: usize,
    pub ipcache_deletes: usize,
    pub policy_writes: usize,
    pub policy_deletes: usize,
    pub endpoint_writes: usize,
    pub endpoint_deletes: usize,
    pub source_writes: usize,
    pub source_deletes: usize,
    /// Endpoints whose revision was bumped (their flows are evaluated again).
    pub revisions_bumped: usize,
}

/// The policy maps and what they hold.
#[derive(Debug)]
pub struct PolicyMaps {
    ipcache: LpmTrie<MapData, IpcacheAddr, IpcacheValue>,
    endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
    policy: BpfHashMap<MapData, PolicyKey, PolicyValue>,
    sources: BpfHashMap<MapData, SourceAddr, u32>,
    node: NodeConfigMap,
    /// What the maps hold, keyed as the kernel sees it (prefix length in bits over the
    /// v4-mapped address).
    held_ipcache: BTreeMap<(u32, IpcacheAddr), u32>,
    held_endpoints: BTreeMap<u32, EndpointInfo>,
    held_policy: BTreeMap<PolicyKey, PolicyValue>,
    held_sources: BTreeMap<SourceAddr, u32>,
    held_node: NodeConfig,
}

/// What [`PolicyMaps`] held before a change, to undo it.
struct Held {
    ipcache: BTreeMap<(u32, IpcacheAddr), u32>,
    endpoints: BTreeMap<u32, EndpointInfo>,
    policy: BTreeMap<PolicyKey, PolicyValue>,
    sources: BTreeMap<SourceAddr, u32>,
    node: NodeConfig,
}

/// The number of entries a map holds at most, as the kernel says (a pinned map keeps the
/// size it was created with); `None` if the kernel does not say.
fn capacity<K: aya::Pod, V, M: IterableMap<K, V>>(map: &M) -> Option<usize> {
    let info = map.map().info().ok()?;
    usize::try_from(info.max_entries()).ok()
}

/// NODE_CONFIG (aya's `Array` is not `Debug`).
struct NodeConfigMap(Array<MapData, NodeConfig>);

impl std::fmt::Debug for NodeConfigMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(NODE_CONFIG)
    }
}

/// An address as the kernel keys it: 16 bytes in network order, IPv4 mapped.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => v4_mapped(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => {
            let o = a.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

/// Converts a prefix to the IPCACHE key: v4-mapped, prefix length over 128 bits, host
/// bits cleared.
pub fn ipcache_key(prefix: IpPrefix) -> Result<Key<IpcacheAddr>, Error> {
    let (addr, len) = prefix;
    let (bits, bytes) = match addr {
        IpAddr::V4(a) if len <= 32 => {
            let mut m = v4_mapped(u32::from_ne_bytes(a.octets()));
            m[3] = u32::from_ne_bytes(
                (u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0))
                    .to_be_bytes(),
            );
            (96 + u32::from(len), m)
        }
        IpAddr::V6(a) if len <= 128 => {
            let masked = u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            let o = masked.to_be_bytes();
            let mut m = [0u32; 4];
            for (i, w) in m.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            (u32::from(len), m)
        }
        _ => return Err(Error::InvalidPrefix { addr, len }),
    };
    Ok(Key::new(bits, bytes))
}

impl PolicyMaps {
    /// Takes the maps out of a loaded object and reads back what they hold.
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, Error> {
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(Error::MissingMap { map: name });
        let ipcache = LpmTrie::try_from(take(IPCACHE)?).map_err(|e| Error::map(IPCACHE, e))?;
        let endpoints =
            BpfHashMap::try_from(take(ENDPOINTS)?).map_err(|e| Error::map(ENDPOINTS, e))?;
        let policy = BpfHashMap::try_from(take(POLICY)?).map_err(|e| Error::map(POLICY, e))?;
        let sources = BpfHashMap::try_from(take(SOURCES)?).map_err(|e| Error::map(SOURCES, e))?;
        let node = NodeConfigMap(
            Array::try_from(take(NODE_CONFIG)?).map_err(|e| Error::map(NODE_CONFIG, e))?,
        );
        let mut maps = Self {
            ipcache,
            endpoints,
            policy,
            sources,
            node,
            held_ipcache: BTreeMap::new(),
            held_endpoints: BTreeMap::new(),
            held_policy: BTreeMap::new(),
            held_sources: BTreeMap::new(),
            held_node: NodeConfig::default(),
        };
        maps.read_back()?;
        Ok(maps)
    }

    fn read_back(&mut self) -> Result<(), Error> {
        for entry in self.ipcache.iter() {
            let (k, v) = entry.map_err(|e| Error::map(IPCACHE, e))?;
            self.held_ipcache
                .insert((k.prefix_len(), k.data()), v.identity);
        }
        for entry in self.endpoints.iter() {
            let (k, v) = entry.map_err(|e| Error::map(ENDPOINTS, e))?;
            self.held_endpoints.insert(k, v);
        }
        for entry in self.policy.iter() {
            let (k, v) = entry.map_err(|e| Error::map(POLICY, e))?;
            self.held_policy.insert(k, v);
        }
        for entry in self.sources.iter() {
            let (k, v) = entry.map_err(|e| Error::map(SOURCES, e))?;
            self.held_sources.insert(k, v);
        }
        self.held_node = self
            .node
            .0
            .get(&0, 0)
            .map_err(|e| Error::map(NODE_CONFIG, e))?;
        debug!(
            ipcache = self.held_ipcache.len(),
            endpoints = self.held_endpoints.len(),
            policy = self.held_policy.len(),
            "read back pinned policy maps"
        );
        Ok(())
    }

    /// The endpoints as the maps hold them (with their current revisions).
    pub fn endpoints(&self) -> &BTreeMap<u32, EndpointInfo> {
        &self.held_endpoints
    }

    /// Number of IPCACHE and POLICY entries held.
    pub fn counts(&self) -> (usize, usize) {
        (self.held_ipcache.len(), self.held_policy.len())
    }

    /// Adds SOURCES entries (nothing is removed): a workload's addresses can be written
    /// before its interface gets programs that check them, e.g. when an upgrade brings
    /// the first programs with anti-spoofing and replaces the old ones interface by
    /// interface. [`PolicyMaps::apply`] later removes what is stale.
    pub fn add_sources(&mut self, sources: &BTreeMap<IpAddr, u32>) -> Result<usize, Error> {
        let mut written = 0;
        for (addr, &ifindex) in sources {
            let key = addr_words(*addr);
            if self.held_sources.get(&key) == Some(&ifindex) {
                continue;
            }
            self.sources
                .insert(key, ifindex, 0)
                .map_err(|e| full_or(SOURCES, e, || format!("ifindex {ifindex}")))?;
            self.held_sources.insert(key, ifindex);
            written += 1;
        }
        Ok(written)
    }

    /// Makes the maps hold `desired`, writing only what differs, in the order described in
    /// the module documentation — or nothing at all: a change that a map cannot hold is
    /// refused before anything is written (an error naming the map and the sizes), and one
    /// that fails midway is undone, so the maps keep the previous consistent state. (Half a
    /// change can be worse than none: a new pod's address missing from IPCACHE makes it
    /// `world`, which escapes a DENY by principal.)
    pub fn apply(&mut self, desired: &PolicyContent) -> Result<PolicyApplyStats, Error> {
        self.check_room(desired)?;
        let before = self.snapshot();
        match self.write(desired) {
            Ok(stats) => Ok(stats),
            Err(e) => {
                self.restore(before);
                Err(e)
            }
        }
    }

    /// Refuses a change one of the maps cannot hold: its entries, and during the write
    /// (new entries go in before stale ones go) those it has now too.
    fn check_room(&self, desired: &PolicyContent) -> Result<(), Error> {
        let ipcache: BTreeSet<(u32, IpcacheAddr)> = desired
            .ipcache
            .keys()
            .map(|p| ipcache_key(*p).map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<_, _>>()?;
        let sources: BTreeSet<SourceAddr> =
            desired.sources.keys().map(|a| addr_words(*a)).collect();
        let peak = |held: &mut dyn Iterator<Item = bool>, want: usize| {
            want + held.filter(|stays| !stays).count()
        };
        let checks = [
            (
                IPCACHE,
                capacity(&self.ipcache),
                ipcache.len(),
                peak(
                    &mut self.held_ipcache.keys().map(|k| ipcache.contains(k)),
                    ipcache.len(),
                ),
            ),
            (
                POLICY,
                capacity(&self.policy),
                desired.policy.len(),
                peak(
                    &mut self
                        .held_policy
                        .keys()
                        .map(|k| desired.policy.contains_key(k)),
                    desired.policy.len(),
                ),
            ),
            (
                SOURCES,
                capacity(&self.sources),
                sources.len(),
                peak(
                    &mut self.held_sources.keys().map(|k| sources.contains(k)),
                    sources.len(),
                ),
            ),
            (
                ENDPOINTS,
                capacity(&self.endpoints),
                desired.endpoints.len(),
                peak(
                    &mut self
                        .held_endpoints
                        .keys()
                        .map(|k| desired.endpoints.contains_key(k)),
                    desired.endpoints.len(),
                ),
            ),
        ];
        for (map, capacity, wanted, peak) in checks {
            let Some(capacity) = capacity else { continue };
            if wanted > capacity || peak > capacity {
                return Err(Error::MapFull {
                    map,
                    what: format!(
                        "a policy change that needs {peak} entries while it is written ({wanted} \
                         after it) where the map holds {capacity}"
                    ),
                });
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> Held {
        Held {
            ipcache: self.held_ipcache.clone(),
            endpoints: self.held_endpoints.clone(),
            policy: self.held_policy.clone(),
            sources: self.held_sources.clone(),
            node: self.held_node,
        }
    }

    /// Puts back what the maps held before a failed write: removals first (they make the
    /// room), then the old values. Errors are logged: there is nothing better to do.
    fn restore(&mut self, before: Held) {
        let log = |map: &'static str, r: Result<(), aya::maps::MapError>| {
            if let Err(e) = r {
                warn!(map, "undoing a failed policy change: {e}");
            }
        };
        for k in self
            .held_ipcache
            .keys()
            .filter(|k| !before.ipcache.contains_key(k))
        {
            log(IPCACHE, self.ipcache.remove(&Key::new(k.0, k.1)));
        }
        for k in self
            .held_policy
            .keys()
            .filter(|k| !before.policy.contains_key(k))
        {
            log(POLICY, self.policy.remove(k));
        }
        for k in self
            .held_sources
            .keys()
            .filter(|k| !before.sources.contains_key(*k))
        {
            log(SOURCES, self.sources.remove(k));
        }
        for k in self
            .held_endpoints
            .keys()
            .filter(|k| !before.endpoints.contains_key(k))
        {
            log(ENDPOINTS, self.endpoints.remove(k));
        }
        for (k, v) in &before.ipcache {
            if self.held_ipcache.get(k) != Some(v) {
                let value = IpcacheValue {
                    identity: *v,
                    _pad: 0,
                };
                log(IPCACHE, self.ipcache.insert(&Key::new(k.0, k.1), value, 0));
            }
        }
        for (k, v) in &before.policy {
            if self.held_policy.get(k) != Some(v) {
                log(POLICY, self.policy.insert(k, v, 0));
            }
        }
        for (k, v) in &before.sources {
            if self.held_sources.get(k) != Some(v) {
                log(SOURCES, self.sources.insert(k, v, 0));
            }
        }
        for (k, v) in &before.endpoints {
            if self.held_endpoints.get(k) != Some(v) {
                log(ENDPOINTS, self.endpoints.insert(k, v, 0));
            }
        }
        if self.held_node != before.node {
            log(NODE_CONFIG, self.node.0.set(0, before.node, 0));
        }
        self.held_ipcache = before.ipcache;
        self.held_policy = before.policy;
        self.held_sources = before.sources;
        self.held_endpoints = before.endpoints;
        self.held_node = before.node;
    }

    fn write(&mut self, desired: &PolicyContent) -> Result<PolicyApplyStats, Error> {
        let mut stats = PolicyApplyStats::default();

        if desired.node != self.held_node {
            self.node
                .0
                .set(0, desired.node, 0)
                .map_err(|e| Error::map(NODE_CONFIG, e))?;
            self.held_node = desired.node;
        }

        // SOURCES: new and moved addresses now; stale ones once ENDPOINTS is written.
        let want_sources: BTreeMap<SourceAddr, u32> = desired
            .sources
            .iter()
            .map(|(a, i)| (addr_words(*a), *i))
            .collect();
        for (addr, &ifindex) in &want_sources {
            if self.held_sources.get(addr) == Some(&ifindex) {
                continue;
            }
            self.sources
                .insert(addr, ifindex, 0)
                .map_err(|e| full_or(SOURCES, e, || format!("ifindex {ifindex}")))?;
            self.held_sources.insert(*addr, ifindex);
            stats.source_writes += 1;
        }

        // IPCACHE.
        let mut want_ipcache = BTreeMap::new();
        for (prefix, identity) in &desired.ipcache {
            let key = ipcache_key(*prefix)?;
            want_ipcache.insert((key.prefix_len(), key.data()), *identity);
        }
        for (&(len, data), &identity) in &want_ipcache {
            if self.held_ipcache.get(&(len, data)) == Some(&identity) {
                continue;
            }
            let value = IpcacheValue { identity, _pad: 0 };
            self.ipcache
                .insert(&Key::new(len, data), value, 0)
                .map_err(|e| full_or(IPCACHE, e, || format!("identity {identity}")))?;
            self.held_ipcache.insert((len, data), identity);
            stats.ipcache_writes += 1;
        }
        let stale: Vec<_> = self
            .held_ipcache
            .keys()
            .filter(|k| !want_ipcache.contains_key(k))
            .copied()
            .collect();
        for (len, data) in stale {
            remove_ok(self.ipcache.remove(&Key::new(len, data)), IPCACHE)?;
            self.held_ipcache.remove(&(len, data));
            stats.ipcache_deletes += 1;
        }
        let ipcache_changed = stats.ipcache_writes + stats.ipcache_deletes > 0;

        // POLICY: note which endpoints' entries change.
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        for (key, value) in &desired.policy {
            if self.held_policy.get(key) == Some(value) {
                continue;
            }
            self.policy
                .insert(key, value, 0)
                .map_err(|e| full_or(POLICY, e, || format!("endpoint {}", key.endpoint_id)))?;
            self.held_policy.insert(*key, *value);
            touched.insert(key.endpoint_id);
            stats.policy_writes += 1;
        }
        let stale: Vec<PolicyKey> = self
            .held_policy
            .keys()
            .filter(|k| !desired.policy.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            remove_ok(self.policy.remove(&key), POLICY)?;
            self.held_policy.remove(&key);
            touched.insert(key.endpoint_id);
            stats.policy_deletes += 1;
        }

        // ENDPOINTS, bumping revisions.
        for (&ifindex, info) in &desired.endpoints {
            let held = self.held_endpoints.get(&ifindex);
            let same_info = held.is_some_and(|h| {
                h.endpoint_id == info.endpoint_id
                    && h.identity == info.identity
                    && h.flags == info.flags
            });
            let bump = !same_info || ipcache_changed || touched.contains(&info.endpoint_id);
            if !bump {
                continue;
            }
            let revision = held.map_or(1, |h| h.policy_revision.wrapping_add(1).max(1));
            let value = EndpointInfo {
                policy_revision: revision,
                ..*info
            };
            self.endpoints
                .insert(ifindex, value, 0)
                .map_err(|e| full_or(ENDPOINTS, e, || format!("ifindex {ifindex}")))?;
            if held.is_some() {
                stats.revisions_bumped += 1;
            }
            self.held_endpoints.insert(ifindex, value);
            stats.endpoint_writes += 1;
        }
        let stale: Vec<u32> = self
            .held_endpoints
            .keys()
            .filter(|k| !desired.endpoints.contains_key(k))
            .copied()
            .collect();
        for ifindex in stale {
            remove_ok(self.endpoints.remove(&ifindex), ENDPOINTS)?;
            self.held_endpoints.remove(&ifindex);
            stats.endpoint_deletes += 1;
        }
        let stale: Vec<SourceAddr> = self
            .held_sources
            .keys()
            .filter(|k| !want_sources.contains_key(*k))
            .copied()
            .collect();
        for addr in stale {
            remove_ok(self.sources.remove(&addr), SOURCES)?;
            self.held_sources.remove(&addr);
            stats.source_deletes += 1;
        }
        Ok(stats)
    }
}
