//! Typed writers for the mesh maps (`MESH_DESTS`, `MESH_SOURCES`, `MESH_CONFIG`,
//! `MESH_LEASE`) and the proxy's reader of `MESH_ORIG_DST`.
//!
//! The kernel side (see `mycel_common::mesh`) redirects a connection between enrolled
//! workloads to the proxy's outbound listener in the client's network namespace and
//! records where it was going under the client's (address, port). The proxy, having
//! accepted such a connection, asks [`OrigDstTable::take`] with the peer address
//! `accept()` gave it.
//!
//! The kernel redirects only while the agent's lease in `MESH_LEASE` holds
//! ([`MeshMaps::renew_lease`]): a `CLOCK_MONOTONIC` deadline, the clock of the kernel's
//! `bpf_ktime_get_ns()`.
//!
//! Like the policy writer, [`MeshMaps::apply`] writes only what differs from what the maps
//! hold (read back from the pins at start-up), and removes what is gone.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError};
pub use mycel_common::mesh::{
    MESH_F_ENROLLED, MESH_F_STRICT, MESH_OUTBOUND_PORT, MeshConfig, MeshDest, MeshLease,
    MeshSource, OrigDst, OrigDstKey,
};
use serde::Serialize;
use tracing::debug;

use super::{Error, full_or, remove_ok};

const MESH_DESTS: &str = "MESH_DESTS";
const MESH_SOURCES: &str = "MESH_SOURCES";
const MESH_CONFIG: &str = "MESH_CONFIG";
const MESH_ORIG_DST: &str = "MESH_ORIG_DST";
pub(super) const MESH_LEASE: &str = "MESH_LEASE";

/// Everything the mesh maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshContent {
    /// Enrolled destinations (workload addresses) and their `MESH_F_*` flags.
    pub dests: BTreeMap<IpAddr, MeshDest>,
    /// Enrolled local workloads by network namespace cookie, with their proxy listener.
    pub sources: BTreeMap<u64, MeshSource>,
}

/// Counts of one [`MeshMaps::apply`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshStats {
    pub dest_writes: usize,
    pub dest_deletes: usize,
    pub source_writes: usize,
    pub source_deletes: usize,
}

/// The mesh maps and what they hold.
pub struct MeshMaps {
    dests: BpfHashMap<MapData, [u32; 4], MeshDest>,
    sources: BpfHashMap<MapData, u64, MeshSource>,
    config: Array<MapData, MeshConfig>,
    lease: Array<MapData, MeshLease>,
    orig_dst: OrigDstTable,
    held_dests: BTreeMap<[u32; 4], MeshDest>,
    held_sources: BTreeMap<u64, MeshSource>,
}

impl std::fmt::Debug for MeshMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshMaps")
            .field("dests", &self.held_dests.len())
            .field("sources", &self.held_sources.len())
            .finish_non_exhaustive()
    }
}

/// An address as the mesh maps key it: 16 bytes in network order, IPv4 v4-mapped.
pub fn mesh_addr(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// The address a mesh map key names (IPv4 for v4-mapped keys).
fn key_addr(words: &[u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl MeshMaps {
    /// Takes the maps out of a loaded object and reads back what they hold.
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, Error> {
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(Error::MissingMap { map: name });
        let dests =
            BpfHashMap::try_from(take(MESH_DESTS)?).map_err(|e| Error::map(MESH_DESTS, e))?;
        let sources =
            BpfHashMap::try_from(take(MESH_SOURCES)?).map_err(|e| Error::map(MESH_SOURCES, e))?;
        let config = Array::try_from(take(MESH_CONFIG)?).map_err(|e| Error::map(MESH_CONFIG, e))?;
        let lease = Array::try_from(take(MESH_LEASE)?).map_err(|e| Error::map(MESH_LEASE, e))?;
        let orig =
            BpfHashMap::try_from(take(MESH_ORIG_DST)?).map_err(|e| Error::map(MESH_ORIG_DST, e))?;
        let mut maps = Self {
            dests,
            sources,
            config,
            lease,
            orig_dst: OrigDstTable(Arc::new(Mutex::new(orig))),
            held_dests: BTreeMap::new(),
            held_sources: BTreeMap::new(),
        };
        for entry in maps.dests.iter() {
            let (k, v) = entry.map_err(|e| Error::map(MESH_DESTS, e))?;
            maps.held_dests.insert(k, v);
        }
        for entry in maps.sources.iter() {
            let (k, v) = entry.map_err(|e| Error::map(MESH_SOURCES, e))?;
            maps.held_sources.insert(k, v);
        }
        debug!(
            dests = maps.held_dests.len(),
            sources = maps.held_sources.len(),
            "read back pinned mesh maps"
        );
        Ok(maps)
    }

    /// Makes the maps hold `desired`, writing only what differs. Destinations are written
    /// before sources and removed after them, so a newly enrolled workload's connections
    /// are redirected only once the destinations they may go to are known. On an error (a
    /// full map) the maps are left partly updated; the next call writes what is missing.
    pub fn apply(&mut self, desired: &MeshContent) -> Result<MeshStats, Error> {
        let mut stats = MeshStats::default();
        let want_dests: BTreeMap<[u32; 4], MeshDest> = desired
            .dests
            .iter()
            .map(|(ip, d)| (mesh_addr(*ip), *d))
            .collect();
        for (key, value) in &want_dests {
            if self.held_dests.get(key) == Some(value) {
                continue;
            }
            self.dests
                .insert(key, value, 0)
                .map_err(|e| full_or(MESH_DESTS, e, || format!("destination {}", key_addr(key))))?;
            self.held_dests.insert(*key, *value);
            stats.dest_writes += 1;
        }
        for (cookie, value) in &desired.sources {
            if self.held_sources.get(cookie) == Some(value) {
                continue;
            }
            self.sources.insert(cookie, value, 0).map_err(|e| {
                full_or(MESH_SOURCES, e, || {
                    format!("network namespace cookie {cookie}")
                })
            })?;
            self.held_sources.insert(*cookie, *value);
            stats.source_writes += 1;
        }
        let stale: Vec<u64> = self
            .held_sources
            .keys()
            .filter(|k| !desired.sources.contains_key(k))
            .copied()
            .collect();
        for cookie in stale {
            remove_ok(self.sources.remove(&cookie), MESH_SOURCES)?;
            self.held_sources.remove(&cookie);
            stats.source_deletes += 1;
        }
        let stale: Vec<[u32; 4]> = self
            .held_dests
            .keys()
            .filter(|k| !want_dests.contains_key(*k))
            .copied()
            .collect();
        for key in stale {
            remove_ok(self.dests.remove(&key), MESH_DESTS)?;
            self.held_dests.remove(&key);
            stats.dest_deletes += 1;
        }
        Ok(stats)
    }

    /// Tells the kernel the proxy's process id: connections the process makes are never
    /// redirected (0: none is exempt).
    pub fn set_proxy_tgid(&mut self, tgid: u32) -> Result<(), Error> {
        let value = MeshConfig {
            proxy_tgid: tgid,
            _pad: 0,
        };
        self.config
            .set(0, value, 0)
            .map_err(|e| Error::map(MESH_CONFIG, e))
    }

    /// The proxy's process id as the kernel knows it.
    pub fn proxy_tgid(&self) -> Result<u32, Error> {
        self.config
            .get(&0, 0)
            .map(|c| c.proxy_tgid)
            .map_err(|e| Error::map(MESH_CONFIG, e))
    }

    /// Lets the kernel redirect mesh traffic for `grace` from now: the agent calls it at
    /// start-up, before it writes the mesh maps, and then every second. When it stops
    /// (killed, removed), connections go direct once `grace` has passed.
    pub fn renew_lease(&mut self, grace: Duration) -> Result<(), Error> {
        let grace_ns = u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX);
        let value = MeshLease {
            alive_until_ns: monotonic_ns().saturating_add(grace_ns),
        };
        self.lease
            .set(0, value, 0)
            .map_err(|e| Error::map(MESH_LEASE, e))
    }

    /// Ends the lease at once: from now on the kernel redirects nothing (an agent that
    /// detaches on shutdown, before its listeners close).
    pub fn end_lease(&mut self) -> Result<(), Error> {
        self.lease
            .set(0, MeshLease::default(), 0)
            .map_err(|e| Error::map(MESH_LEASE, e))
    }

    /// How long the lease still holds (zero once it has run out).
    pub fn lease_remaining(&self) -> Result<Duration, Error> {
        self.lease
            .get(&0, 0)
            .map(|l| remaining(&l))
            .map_err(|e| Error::map(MESH_LEASE, e))
    }

    /// The reader of original destinations, for the proxy.
    pub fn orig_dst_table(&self) -> OrigDstTable {
        self.orig_dst.clone()
    }

    /// Network namespace cookies of the enrolled local workloads the maps hold: the
    /// namespaces this agent set up.
    pub fn source_cookies(&self) -> std::collections::BTreeSet<u64> {
        self.held_sources.keys().copied().collect()
    }

    /// Number of destinations and sources held.
    pub fn counts(&self) -> (usize, usize) {
        (self.held_dests.len(), self.held_sources.len())
    }
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds: the clock of `bpf_ktime_get_ns()`, which the
/// kernel compares the lease with. (A process in a time namespace with a monotonic offset
/// would see another clock; container runtimes do not set one up.)
fn monotonic_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make the lease look expired.
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
        .unwrap_or(0)
}

fn remaining(lease: &MeshLease) -> Duration {
    Duration::from_nanos(lease.alive_until_ns.saturating_sub(monotonic_ns()))
}

/// How long the lease in the pinned `MESH_LEASE` map under `pin_dir` still holds: zero once
/// it has run out, `None` when no agent ever pinned one there. For tools that run without
/// the agent (`mycel uninstall` waits for a stopping agent's lease to run out).
pub fn pinned_lease_remaining(pin_dir: &Path) -> Result<Option<Duration>, Error> {
    let pin = pin_dir.join(MESH_LEASE);
    let data = match MapData::from_pin(&pin) {
        Ok(d) => d,
        Err(MapError::SyscallError(s)) if s.io_error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(Error::map(MESH_LEASE, e)),
    };
    let lease: Array<MapData, MeshLease> =
        Array::try_from(Map::Array(data)).map_err(|e| Error::map(MESH_LEASE, e))?;
    lease
        .get(&0, 0)
        .map(|l| Some(remaining(&l)))
        .map_err(|e| Error::map(MESH_LEASE, e))
}

/// The original destinations of redirected connections (`MESH_ORIG_DST`), shared by the
/// proxy's accept loops.
#[derive(Clone, Debug)]
pub struct OrigDstTable(Arc<Mutex<BpfHashMap<MapData, OrigDstKey, OrigDst>>>);

impl OrigDstTable {
    /// The destination the client at `peer` (as `accept()` reports it: IPv4, or v4-mapped
    /// on an IPv6 listener) asked for, removed from the table: each record is read once.
    /// `None` when there is none (a connection that was not redirected, or whose record
    /// the LRU map already dropped).
    pub fn take(&self, peer: SocketAddr) -> Result<Option<SocketAddr>, Error> {
        let ip = match peer.ip() {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(a) => a,
                // Redirected connections only ever reach IPv4 listeners.
                None => return Ok(None),
            },
        };
        let key = OrigDstKey {
            addr_be: mesh_addr(IpAddr::V4(ip)),
            port_be: peer.port().to_be(),
            _pad: [0; 6],
        };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let orig = match map.get(&key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(Error::map(MESH_ORIG_DST, e)),
        };
        remove_ok(map.remove(&key), MESH_ORIG_DST)?;
        drop(map);
        decode_orig_dst(&orig)
            .map(Some)
            .map_err(|source| Error::OrigDst { peer, source })
    }
}

/// Why a `MESH_ORIG_DST` value cannot be a connection's destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrigDstError {
    #[error("the recorded destination port is 0")]
    PortZero,
    #[error("the recorded destination {0} is the unspecified address")]
    Unspecified(IpAddr),
    #[error("the recorded destination {0} is not a unicast address")]
    NotUnicast(IpAddr),
    #[error(
        "the recorded destination {0} is the proxy's own outbound port (the connection would loop)"
    )]
    Loop(SocketAddr),
    #[error("the record's flags {0:#x} do not say the destination is enrolled")]
    NotEnrolled(u32),
}

/// The destination an `OrigDst` record names (IPv4 for v4-mapped addresses), checked for
/// what the kernel never records: port 0, the unspecified, a multicast or broadcast
/// address, the proxy's own outbound port, a destination that is not enrolled.
pub fn decode_orig_dst(orig: &OrigDst) -> Result<SocketAddr, OrigDstError> {
    if orig.flags & MESH_F_ENROLLED == 0 {
        return Err(OrigDstError::NotEnrolled(orig.flags));
    }
    let port = u16::from_be(orig.port_be);
    if port == 0 {
        return Err(OrigDstError::PortZero);
    }
    let ip = key_addr(&orig.addr_be);
    if ip.is_unspecified() {
        return Err(OrigDstError::Unspecified(ip));
    }
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(OrigDstError::NotUnicast(ip));
    }
    let addr = SocketAddr::new(ip, port);
    if port == MESH_OUTBOUND_PORT {
        return Err(OrigDstError::Loop(addr));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orig(addr: &str, port: u16, flags: u32) -> OrigDst {
        OrigDst {
            addr_be: mesh_addr(addr.parse().expect("address")),
            port_be: port.to_be(),
            _pad: [0; 2],
            flags,
        }
    }

    #[test]
    fn decodes_ipv4_and_ipv6_destinations() {
        assert_eq!(
            decode_orig_dst(&orig("10.0.0.3", 8080, MESH_F_ENROLLED)),
            Ok("10.0.0.3:8080".parse().expect("addr"))
        );
        assert_eq!(
            decode_orig_dst(&orig("fd00::3", 443, MESH_F_ENROLLED | MESH_F_STRICT)),
            Ok("[fd00::3]:443".parse().expect("addr"))
        );
    }

    #[test]
    fn rejects_what_the_kernel_never_records() {
        let e = MESH_F_ENROLLED;
        assert_eq!(
            decode_orig_dst(&orig("10.0.0.3", 0, e)),
            Err(OrigDstError::PortZero)
        );
        assert!(matches!(
            decode_orig_dst(&orig("0.0.0.0", 80, e)),
            Err(OrigDstError::Unspecified(_))
        ));
        assert!(matches!(
            decode_orig_dst(&orig("::", 80, e)),
            Err(OrigDstError::Unspecified(_))
        ));
        assert!(matches!(
            decode_orig_dst(&orig("224.0.0.1", 80, e)),
            Err(OrigDstError::NotUnicast(_))
        ));
        assert!(matches!(
            decode_orig_dst(&orig("255.255.255.255", 80, e)),
            Err(OrigDstError::NotUnicast(_))
        ));
        let looped = decode_orig_dst(&orig("10.0.0.3", MESH_OUTBOUND_PORT, e));
        assert!(matches!(looped, Err(OrigDstError::Loop(_))), "{looped:?}");
        assert_eq!(
            decode_orig_dst(&orig("10.0.0.3", 80, 0)),
            Err(OrigDstError::NotEnrolled(0))
        );
    }

    #[test]
    fn map_keys_are_v4_mapped_in_network_order() {
        let key = mesh_addr("10.0.0.3".parse().expect("ip"));
        assert_eq!(
            key,
            mycel_common::service::v4_mapped(u32::from_ne_bytes([10, 0, 0, 3]))
        );
        assert_eq!(key_addr(&key), "10.0.0.3".parse::<IpAddr>().expect("ip"));
        let v6: IpAddr = "fd00::1:2".parse().expect("ip");
        assert_eq!(key_addr(&mesh_addr(v6)), v6);
    }
}
