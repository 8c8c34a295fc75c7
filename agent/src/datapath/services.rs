//! Typed writers for the load-balancing maps, applying only differences.
//!
//! Write order keeps every intermediate state valid for a concurrent connect(): backends
//! are written before the service entry that makes them reachable, and removed after it
//! stops pointing at them. Backends keep their slot while they stay (so a Maglev table and
//! in-flight lookups see stable slots). Every write is recorded in an undo log; when a map
//! is full, the log is replayed backwards, so a frontend is either fully programmed or left
//! exactly as it was.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use mycel_common::service::{
    Backend, BackendKey, MAGLEV_TABLE_SIZE, MAX_SERVICES, MaglevTable, PROTO_TCP, PROTO_UDP,
    SVC_FLAG_AFFINITY, ServiceKey, ServiceValue, is_v4_mapped, v4_mapped,
};
use serde::Serialize;
use tracing::{debug, warn};

use super::Error;
use crate::state::{
    Affinity, Frontend, FrontendChanges, FrontendSpec, ObjectRef, Protocol, maglev,
};

const SERVICES: &str = "SERVICES";
const BACKENDS: &str = "BACKENDS";
const MAGLEV: &str = "MAGLEV";

/// What one frontend holds in the maps, as this agent last wrote (or read back) it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    id: u32,
    flags: u16,
    /// Backends by slot.
    slots: Vec<Backend>,
    /// The Service it belongs to; unknown for entries read back from pinned maps until the
    /// first sync names them.
    owner: Option<(ObjectRef, Option<String>)>,
}

/// Counts of one [`ServiceMaps::apply`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplyStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub map_writes: usize,
    pub map_deletes: usize,
}

/// The load-balancing maps and what they hold.
#[derive(Debug)]
pub struct ServiceMaps {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, BackendKey, Backend>,
    maglev: BpfHashMap<MapData, u32, MaglevTable>,
    programmed: HashMap<ServiceKey, Programmed>,
    used_ids: BTreeSet<u32>,
    next_id: u32,
    /// Bumped whenever a frontend appears, goes, or changes owner: [`ServiceMaps::owners`]
    /// is rebuilt only then (backend changes, by far the most frequent, leave it alone).
    owners_version: u64,
}

/// One undoable write.
enum Undo {
    Service(ServiceKey, Option<ServiceValue>),
    Backend(BackendKey, Option<Backend>),
    Maglev(u32, Option<Box<MaglevTable>>),
}

impl ServiceMaps {
    /// Takes the maps out of a loaded object and reads back what they already hold (a
    /// previous agent's state, when the maps were pinned).
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, Error> {
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(Error::MissingMap { map: name });
        let services =
            BpfHashMap::try_from(take(SERVICES)?).map_err(|e| Error::map(SERVICES, e))?;
        let backends =
            BpfHashMap::try_from(take(BACKENDS)?).map_err(|e| Error::map(BACKENDS, e))?;
        let maglev = BpfHashMap::try_from(take(MAGLEV)?).map_err(|e| Error::map(MAGLEV, e))?;
        let mut maps = Self {
            services,
            backends,
            maglev,
            programmed: HashMap::new(),
            used_ids: BTreeSet::new(),
            next_id: 1,
            owners_version: 0,
        };
        maps.read_back()?;
        Ok(maps)
    }

    /// Rebuilds `programmed` from the maps' contents.
    fn read_back(&mut self) -> Result<(), Error> {
        let mut programmed = HashMap::new();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(|e| Error::map(SERVICES, e))?;
            let mut slots = Vec::with_capacity(value.count as usize);
            for slot in 0..u32::from(value.count) {
                let bk = BackendKey {
                    service_id: value.id,
                    slot,
                };
                match self.backends.get(&bk, 0) {
                    Ok(b) => slots.push(b),
                    Err(MapError::KeyNotFound) => break,
                    Err(e) => return Err(Error::map(BACKENDS, e)),
                }
            }
            programmed.insert(
                key,
                Programmed {
                    id: value.id,
                    flags: value.flags,
                    // A short read (torn by a crash mid-write) is rewritten by the first sync.
                    slots,
                    owner: None,
                },
            );
        }
        self.used_ids = programmed.values().map(|p| p.id).collect();
        self.programmed = programmed;
        self.owners_version += 1;
        debug!(
            frontends = self.programmed.len(),
            "read back pinned service maps"
        );
        Ok(())
    }

    /// Number of frontends and backend slots programmed.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.programmed.len(),
            self.programmed.values().map(|p| p.slots.len()).sum(),
        )
    }

    /// Number of frontends found in pinned maps when the agent started.
    pub fn taken_over(&self) -> usize {
        self.programmed
            .values()
            .filter(|p| p.owner.is_none())
            .count()
    }

    /// Makes the maps hold exactly `desired`: writes what differs and removes every frontend
    /// (and stray backend slot) not in it. Used once after start-up, when the maps may hold
    /// a previous agent's state.
    pub fn sync(&mut self, desired: &BTreeMap<Frontend, FrontendSpec>) -> (ApplyStats, Vec<Error>) {
        let mut changes: FrontendChanges =
            desired.iter().map(|(f, s)| (*f, Some(s.clone()))).collect();
        let wanted: BTreeSet<ServiceKey> = desired.keys().map(frontend_key).collect();
        let stale: Vec<ServiceKey> = self
            .programmed
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        let mut stats = ApplyStats::default();
        let mut errors = Vec::new();
        for key in stale {
            if let Err(e) = self.remove_key(&key, &mut stats) {
                errors.push(e);
            }
        }
        let (s, e) = self.apply(&std::mem::take(&mut changes));
        stats.frontends_written += s.frontends_written;
        stats.frontends_removed += s.frontends_removed;
        stats.map_writes += s.map_writes;
        stats.map_deletes += s.map_deletes;
        errors.extend(e);
        stats.map_deletes += self.remove_stray_backends(&mut errors);
        (stats, errors)
    }

    /// Applies a batch of frontend changes. Frontends are independent: one that fails (map
    /// full) is left as it was and reported, the others are applied.
    pub fn apply(&mut self, changes: &FrontendChanges) -> (ApplyStats, Vec<Error>) {
        let mut stats = ApplyStats::default();
        let mut errors = Vec::new();
        for (frontend, spec) in changes {
            let key = frontend_key(frontend);
            let result = match spec {
                Some(spec) => self.write(frontend, key, spec, &mut stats),
                None => self.remove_key(&key, &mut stats),
            };
            if let Err(e) = result {
                errors.push(e);
            }
        }
        (stats, errors)
    }

    fn write(
        &mut self,
        frontend: &Frontend,
        key: ServiceKey,
        spec: &FrontendSpec,
        stats: &mut ApplyStats,
    ) -> Result<(), Error> {
        let wanted: Vec<Backend> = spec.backends.iter().map(backend_value).collect();
        let flags = match spec.affinity {
            Affinity::None => 0,
            Affinity::ClientIp => SVC_FLAG_AFFINITY,
        };
        let owner = Some((spec.service.clone(), spec.port_name.clone()));
        let previous = self.programmed.get(&key).cloned();
        let (id, old_slots, old_flags) = match &previous {
            Some(p) => (p.id, p.slots.clone(), p.flags),
            None => (self.allocate_id()?, Vec::new(), 0),
        };
        let slots = assign_slots(&old_slots, &wanted);
        if previous
            .as_ref()
            .is_some_and(|p| p.slots == slots && p.flags == flags)
        {
            if let Some(p) = self.programmed.get_mut(&key)
                && p.owner != owner
            {
                p.owner = owner;
                self.owners_version += 1;
            }
            return Ok(());
        }

        let mut undo = Vec::new();
        let what = || format!("{} {}", spec.service, display_frontend(frontend));
        let result = self.write_frontend(
            key, id, flags, &old_slots, &slots, old_flags, &mut undo, stats,
        );
        match result {
            Ok(()) => {
                self.used_ids.insert(id);
                if previous.as_ref().is_none_or(|p| p.owner != owner) {
                    self.owners_version += 1;
                }
                self.programmed.insert(
                    key,
                    Programmed {
                        id,
                        flags,
                        slots,
                        owner,
                    },
                );
                stats.frontends_written += 1;
                Ok(())
            }
            Err(e) => {
                self.rollback(undo);
                if previous.is_none() {
                    self.used_ids.remove(&id);
                }
                Err(match e {
                    Error::Map { map, source } if is_full(&source) => {
                        Error::MapFull { map, what: what() }
                    }
                    e => e,
                })
            }
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; the pieces of one write"
    )]
    fn write_frontend(
        &mut self,
        key: ServiceKey,
        id: u32,
        flags: u16,
        old_slots: &[Backend],
        slots: &[Backend],
        old_flags: u16,
        undo: &mut Vec<Undo>,
        stats: &mut ApplyStats,
    ) -> Result<(), Error> {
        // 1. Backends first: nothing points at a new slot until the service entry says so.
        for (i, b) in slots.iter().enumerate() {
            let old = old_slots.get(i).copied();
            if old == Some(*b) {
                continue;
            }
            let bk = BackendKey {
                service_id: id,
                slot: i as u32,
            };
            self.backends
                .insert(bk, *b, 0)
                .map_err(|e| Error::map(BACKENDS, e))?;
            undo.push(Undo::Backend(bk, old));
            stats.map_writes += 1;
        }
        // 2. The Maglev table, before the service entry turns affinity on.
        let table_changed = flags & SVC_FLAG_AFFINITY != 0
            && (old_flags & SVC_FLAG_AFFINITY == 0 || old_slots != slots);
        if table_changed {
            let table = maglev_table(slots);
            let old = self.maglev.get(&id, 0).ok().map(Box::new);
            self.maglev
                .insert(id, *table, 0)
                .map_err(|e| Error::map(MAGLEV, e))?;
            undo.push(Undo::Maglev(id, old));
            stats.map_writes += 1;
        }
        // 3. The service entry: from here on the new backends are in use.
        let value = ServiceValue {
            id,
            count: slots.len() as u16,
            flags,
        };
        // A frontend this agent has not programmed (nor read back) has no entry to restore.
        let old_value = if self.programmed.contains_key(&key) {
            self.services.get(&key, 0).ok()
        } else {
            None
        };
        self.services
            .insert(key, value, 0)
            .map_err(|e| Error::map(SERVICES, e))?;
        undo.push(Undo::Service(key, old_value));
        stats.map_writes += 1;
        // 4. What nothing points at any more. Failures here leave unreachable leftovers, never
        //    wrong routing; they are logged and cleaned by the next sync.
        for slot in slots.len()..old_slots.len() {
            let bk = BackendKey {
                service_id: id,
                slot: slot as u32,
            };
            match self.backends.remove(&bk) {
                Ok(()) | Err(MapError::KeyNotFound) => stats.map_deletes += 1,
                Err(e) => {
                    warn!(error = %e, slot, service_id = id, "removing an unused backend slot failed")
                }
            }
        }
        if flags & SVC_FLAG_AFFINITY == 0 && old_flags & SVC_FLAG_AFFINITY != 0 {
            match self.maglev.remove(&id) {
                Ok(()) | Err(MapError::KeyNotFound) => stats.map_deletes += 1,
                Err(e) => {
                    warn!(error = %e, service_id = id, "removing an unused Maglev table failed")
                }
            }
        }
        Ok(())
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            let r = match u {
                Undo::Service(k, Some(v)) => self.services.insert(k, v, 0),
                Undo::Service(k, None) => self.services.remove(&k),
                Undo::Backend(k, Some(v)) => self.backends.insert(k, v, 0),
                Undo::Backend(k, None) => self.backends.remove(&k),
                Undo::Maglev(k, Some(v)) => self.maglev.insert(k, *v, 0),
                Undo::Maglev(k, None) => self.maglev.remove(&k),
            };
            if let Err(e) = r {
                warn!(error = %e, "rolling back a partial map update failed");
            }
        }
    }

    fn remove_key(&mut self, key: &ServiceKey, stats: &mut ApplyStats) -> Result<(), Error> {
        let Some(p) = self.programmed.get(key).cloned() else {
            return Ok(());
        };
        // The service entry goes first: from then on no connect() can reach the backends.
        match self.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map(SERVICES, e)),
        }
        stats.map_deletes += 1;
        self.programmed.remove(key);
        self.owners_version += 1;
        self.used_ids.remove(&p.id);
        if p.flags & SVC_FLAG_AFFINITY != 0 {
            let _ = self.maglev.remove(&p.id);
            stats.map_deletes += 1;
        }
        for slot in 0..p.slots.len() {
            let bk = BackendKey {
                service_id: p.id,
                slot: slot as u32,
            };
            match self.backends.remove(&bk) {
                Ok(()) | Err(MapError::KeyNotFound) => stats.map_deletes += 1,
                Err(e) => warn!(error = %e, "removing a backend slot failed"),
            }
        }
        stats.frontends_removed += 1;
        Ok(())
    }

    /// Deletes backend slots that no service entry reaches (left by a crash mid-update).
    fn remove_stray_backends(&mut self, errors: &mut Vec<Error>) -> usize {
        let by_id: HashMap<u32, usize> = self
            .programmed
            .values()
            .map(|p| (p.id, p.slots.len()))
            .collect();
        let stray: Vec<BackendKey> = self
            .backends
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                by_id
                    .get(&k.service_id)
                    .is_none_or(|n| k.slot as usize >= *n)
            })
            .collect();
        let mut removed = 0;
        for k in stray {
            match self.backends.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                Err(e) => {
                    errors.push(Error::map(BACKENDS, e));
                    break;
                }
            }
        }
        let stray_tables: Vec<u32> = self
            .maglev
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !by_id.contains_key(id))
            .collect();
        for id in stray_tables {
            if self.maglev.remove(&id).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    fn allocate_id(&mut self) -> Result<u32, Error> {
        // Ids are reused only after wrapping around, so a just-freed id (whose slots an
        // in-flight lookup might still read) is not handed out again at once.
        for _ in 0..MAX_SERVICES {
            let id = self.next_id;
            self.next_id = if self.next_id >= MAX_SERVICES {
                1
            } else {
                self.next_id + 1
            };
            if !self.used_ids.contains(&id) {
                return Ok(id);
            }
        }
        Err(Error::NoServiceId(MAX_SERVICES))
    }

    /// The names this agent knows for frontends, for [`dump_pinned`].
    /// Changes whenever [`ServiceMaps::owners`] would return something else.
    pub fn owners_version(&self) -> u64 {
        self.owners_version
    }

    pub fn owners(&self) -> HashMap<ServiceKey, (ObjectRef, Option<String>)> {
        self.programmed
            .iter()
            .filter_map(|(k, p)| p.owner.clone().map(|o| (*k, o)))
            .collect()
    }
}

fn is_full(e: &MapError) -> bool {
    match e {
        MapError::SyscallError(s) => matches!(
            s.io_error.raw_os_error(),
            Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
        ),
        _ => false,
    }
}

/// Keeps every backend that stays in its slot, puts new backends into freed slots, and
/// compacts so that slots are `0..n`.
fn assign_slots(old: &[Backend], wanted: &[Backend]) -> Vec<Backend> {
    let wanted_set: BTreeSet<Backend> = wanted.iter().copied().collect();
    let mut slots: Vec<Option<Backend>> = old
        .iter()
        .map(|b| wanted_set.contains(b).then_some(*b))
        .collect();
    let kept: BTreeSet<Backend> = slots.iter().flatten().copied().collect();
    let mut new = wanted.iter().filter(|b| !kept.contains(b));
    for s in slots.iter_mut() {
        if s.is_none() {
            *s = new.next().copied();
        }
    }
    slots.extend(new.map(|b| Some(*b)));
    // Fill holes left in the first n slots with backends from beyond n.
    let n = wanted_set.len();
    let mut tail: Vec<Backend> = slots.iter().skip(n).flatten().copied().collect();
    slots.truncate(n);
    for s in slots.iter_mut() {
        if s.is_none() {
            *s = tail.pop();
        }
    }
    slots.into_iter().flatten().collect()
}

fn maglev_table(slots: &[Backend]) -> Box<MaglevTable> {
    let addrs: Vec<SocketAddr> = slots.iter().map(backend_addr).collect();
    let entries = maglev::table(&addrs, MAGLEV_TABLE_SIZE as usize);
    let mut table = Box::new(MaglevTable {
        slots: [0; MAGLEV_TABLE_SIZE as usize],
        _pad: 0,
    });
    for (dst, src) in table.slots.iter_mut().zip(entries) {
        *dst = src;
    }
    table
}

/// The map key of a frontend.
pub(crate) fn frontend_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr_be: ip_words(f.ip),
        port_be: f.port.to_be(),
        proto: match f.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        _pad: 0,
    }
}

fn backend_value(a: &SocketAddr) -> Backend {
    Backend {
        addr_be: ip_words(a.ip()),
        port_be: a.port().to_be(),
        _pad: 0,
    }
}

fn ip_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

fn words_ip(w: &[u32; 4]) -> IpAddr {
    if is_v4_mapped(w) {
        IpAddr::V4(Ipv4Addr::from(w[3].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(words_ip(&b.addr_be), u16::from_be(b.port_be))
}

fn display_frontend(f: &Frontend) -> String {
    format!("{}/{:?}", SocketAddr::new(f.ip, f.port), f.protocol)
}

/// A service frontend as found in the maps.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MapService {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub port_name: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub affinity: String,
    pub id: u32,
    pub backends: Vec<MapBackend>,
}

/// One backend slot as found in the maps.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MapBackend {
    pub slot: u32,
    pub address: SocketAddr,
}

/// Reads the pinned service maps under `pin_dir` — what the kernel really holds, whatever
/// any agent believes — naming frontends from `owners` where known.
pub fn dump_pinned(
    pin_dir: &Path,
    owners: &HashMap<ServiceKey, (ObjectRef, Option<String>)>,
) -> Result<Vec<MapService>, Error> {
    let open = |name: &'static str| -> Result<Map, Error> {
        let data = MapData::from_pin(pin_dir.join(name)).map_err(|e| Error::map(name, e))?;
        Ok(Map::HashMap(data))
    };
    let services: BpfHashMap<MapData, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(open(SERVICES)?).map_err(|e| Error::map(SERVICES, e))?;
    let backends: BpfHashMap<MapData, BackendKey, Backend> =
        BpfHashMap::try_from(open(BACKENDS)?).map_err(|e| Error::map(BACKENDS, e))?;
    let mut out = Vec::new();
    for entry in services.iter() {
        let (key, value) = entry.map_err(|e| Error::map(SERVICES, e))?;
        let mut list = Vec::new();
        for slot in 0..u32::from(value.count) {
            if let Ok(b) = backends.get(
                &BackendKey {
                    service_id: value.id,
                    slot,
                },
                0,
            ) {
                list.push(MapBackend {
                    slot,
                    address: backend_addr(&b),
                });
            }
        }
        let owner = owners.get(&key);
        out.push(MapService {
            namespace: owner.map(|o| o.0.namespace.clone()),
            name: owner.map(|o| o.0.name.clone()),
            port_name: owner.and_then(|o| o.1.clone()),
            address: words_ip(&key.addr_be),
            port: u16::from_be(key.port_be),
            protocol: match key.proto {
                PROTO_TCP => "TCP".into(),
                PROTO_UDP => "UDP".into(),
                p => format!("{p}"),
            },
            affinity: if value.flags & SVC_FLAG_AFFINITY != 0 {
                "ClientIP".into()
            } else {
                "None".into()
            },
            id: value.id,
            backends: list,
        });
    }
    out.sort_by(|a, b| {
        (&a.namespace, &a.name, a.address, a.port, &a.protocol).cmp(&(
            &b.namespace,
            &b.name,
            b.address,
            b.port,
            &b.protocol,
        ))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u8) -> Backend {
        backend_value(&SocketAddr::from(([10, 0, 0, n], 8080)))
    }

    #[test]
    fn slots_stay_put_when_backends_stay() {
        let old = vec![b(1), b(2), b(3)];
        assert_eq!(
            assign_slots(&old, &[b(1), b(2), b(3), b(4)]),
            vec![b(1), b(2), b(3), b(4)]
        );
        // Removing the middle one moves only the last into its place.
        assert_eq!(assign_slots(&old, &[b(1), b(3)]), vec![b(1), b(3)]);
        assert_eq!(
            assign_slots(&old, &[b(1), b(3), b(5)]),
            vec![b(1), b(5), b(3)]
        );
        assert_eq!(assign_slots(&old, &[b(2), b(3)]), vec![b(3), b(2)]);
        assert_eq!(assign_slots(&old, &[]), Vec::<Backend>::new());
        assert_eq!(assign_slots(&[], &[b(7), b(8)]), vec![b(7), b(8)]);
    }

    #[test]
    fn addresses_round_trip() {
        for ip in ["10.96.0.10", "fd00:96::10", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(words_ip(&ip_words(ip)), ip);
        }
        let f = Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let k = frontend_key(&f);
        assert_eq!(u16::from_be(k.port_be), 80);
        assert!(is_v4_mapped(&k.addr_be));
    }
}
