//! SERVICES, BACKENDS, MAGLEV and REVNAT: socket-level service load balancing.
//!
//! Addresses are 16 bytes in network order. IPv4 addresses are stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one map serves `connect4` and `connect6` alike, and a dual-stack
//! socket connecting to a mapped service address finds the same entry.

use crate::pod;

/// Maximum number of service frontends (address, port, protocol): the size of the service
/// id space, and the default size of `SERVICES` (the agent may create it smaller).
pub const MAX_SERVICES: u32 = 65_536;
/// Default number of backend slots across all services (`BACKENDS`; the agent may size it
/// otherwise).
pub const DEFAULT_BACKEND_SLOTS: u32 = 262_144;
/// Maximum number of backends one service frontend may have.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 1_024;
/// Number of entries in a service's Maglev lookup table. A prime, as Maglev requires; large
/// enough that with up to ~40 backends every backend's share is within 1% of even.
pub const MAGLEV_TABLE_SIZE: u32 = 4_093;
/// Maximum number of services with session affinity (each holds one Maglev table).
pub const MAX_AFFINITY_SERVICES: u32 = 4_096;
/// Entries of the reverse translation LRU (socket cookie, backend → service address).
pub const REVNAT_ENTRIES: u32 = 262_144;

/// IP protocol numbers as used in [`ServiceKey::proto`].
pub const PROTO_TCP: u8 = 6;
/// See [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;

/// [`ServiceValue::flags`]: choose the backend with Maglev on the client's network
/// namespace instead of at random (Kubernetes `sessionAffinity: ClientIP`).
pub const SVC_FLAG_AFFINITY: u16 = 1 << 0;

/// Key of `SERVICES`: one service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Service address, network order, IPv4 stored IPv4-mapped.
    pub addr_be: [u32; 4],
    /// Service port, network order.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Identifies this frontend's backends in `BACKENDS` and its table in `MAGLEV`.
    pub id: u32,
    /// Number of backend slots in use: `0..count`. Zero means connect() is refused.
    pub count: u16,
    /// `SVC_FLAG_*`.
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);

/// Key of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    /// [`ServiceValue::id`].
    pub service_id: u32,
    /// Slot in `0..ServiceValue::count`.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

/// Value of `BACKENDS`: where a connection to the service goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Backend address, network order, IPv4 stored IPv4-mapped.
    pub addr_be: [u32; 4],
    /// Backend port, network order.
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 20);

/// Value of `MAGLEV` (keyed by [`ServiceValue::id`]): the Maglev lookup table, each entry a
/// backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MaglevTable {
    pub slots: [u16; MAGLEV_TABLE_SIZE as usize],
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<MaglevTable>() == 2 * 4_094);

/// Key of `REVNAT`: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// `bpf_get_socket_cookie` of the client socket.
    pub cookie: u64,
    /// Backend address, network order, IPv4 stored IPv4-mapped.
    pub addr_be: [u32; 4],
    /// Backend port, network order.
    pub port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<RevNatKey>() == 32);

/// Value of `REVNAT`: the service address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    /// Service address, network order, IPv4 stored IPv4-mapped.
    pub addr_be: [u32; 4],
    /// Service port, network order.
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 20);

pod!(
    ServiceKey,
    ServiceValue,
    BackendKey,
    Backend,
    MaglevTable,
    RevNatKey,
    RevNatValue
);

/// The first three words of an IPv4-mapped IPv6 address in network order (`::ffff:0:0/96`).
pub const V4_MAPPED_PREFIX_BE: [u32; 3] = [0, 0, u32::from_be(0x0000_ffff)];

/// Stores an IPv4 address (network order) as IPv4-mapped IPv6.
#[inline(always)]
pub const fn v4_mapped(addr_be: u32) -> [u32; 4] {
    [
        V4_MAPPED_PREFIX_BE[0],
        V4_MAPPED_PREFIX_BE[1],
        V4_MAPPED_PREFIX_BE[2],
        addr_be,
    ]
}

/// True when `addr_be` is IPv4-mapped.
#[inline(always)]
pub const fn is_v4_mapped(addr_be: &[u32; 4]) -> bool {
    addr_be[0] == V4_MAPPED_PREFIX_BE[0]
        && addr_be[1] == V4_MAPPED_PREFIX_BE[1]
        && addr_be[2] == V4_MAPPED_PREFIX_BE[2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_round_trip() {
        let a = u32::from_ne_bytes([10, 96, 0, 10]);
        let m = v4_mapped(a);
        assert!(is_v4_mapped(&m));
        let bytes: [u8; 16] = unsafe { core::mem::transmute(m) };
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
    }
}
