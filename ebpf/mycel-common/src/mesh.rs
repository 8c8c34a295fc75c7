//! MESH_DESTS, MESH_SOURCES, MESH_BY_COOKIE, MESH_ORIG_DST, MESH_CONFIG and MESH_LEASE:
//! redirection of connections between enrolled workloads to the node proxy.
//!
//! The proxy listens inside the network namespace of every enrolled local workload, on the
//! workload's own address and [`MESH_OUTBOUND_PORT`]. When a process of an enrolled
//! workload (found by its network namespace's cookie in `MESH_SOURCES`) connects to an
//! enrolled destination (in `MESH_DESTS`, looked up after service load balancing), the
//! connect hook points the socket at that listener and records the real destination under
//! the socket's cookie (`MESH_BY_COOKIE`). Once the kernel has chosen the socket's source
//! port, a `sock_ops` program moves the record to the client's (address, port)
//! (`MESH_ORIG_DST`), which is what the proxy sees as the peer of the accepted connection.
//!
//! The listeners live in the agent, so redirection is only worth doing while the agent
//! runs: it renews a lease (`MESH_LEASE`) every second, and the connect hooks redirect
//! only until the lease runs out. An agent that is gone for longer than the lease's grace
//! (killed, or its DaemonSet deleted) no longer breaks enrolled workloads: their
//! connections go direct, in plaintext, where the destination accepts that (PERMISSIVE);
//! STRICT destinations stay closed to plaintext, since TC enforces STRICT by itself.
//!
//! Addresses are 16 bytes in network order, IPv4 stored IPv4-mapped, as in `service`.

use crate::pod;

/// Port of the proxy's outbound listener inside each enrolled workload's namespace.
pub const MESH_OUTBOUND_PORT: u16 = 15001;
/// Port HBONE servers listen on (Istio ambient's convention).
pub const MESH_HBONE_PORT: u16 = 15008;

/// Default sizes of the mesh maps.
pub const MESH_DEST_ENTRIES: u32 = 65_536;
pub const MESH_SOURCE_ENTRIES: u32 = 4_096;
/// Connections between connect() and the proxy's accept(), per node.
pub const MESH_ORIG_ENTRIES: u32 = 65_536;

/// [`MeshDest::flags`]: the destination is enrolled; connections to it from enrolled
/// workloads go through the proxy.
pub const MESH_F_ENROLLED: u32 = 1 << 0;
/// [`MeshDest::flags`]: the destination accepts only mutual TLS (mode STRICT); plaintext
/// from outside the proxy is dropped in TC.
pub const MESH_F_STRICT: u32 = 1 << 1;

/// Value of `MESH_DESTS`, keyed by the workload's address (`[u32; 4]`, v4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MeshDest {
    /// `MESH_F_*`.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MeshDest>() == 8);

/// Value of `MESH_SOURCES`, keyed by the network namespace cookie (`u64`) of an enrolled
/// local workload: where the proxy's outbound listener of that namespace is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MeshSource {
    /// The workload's IPv4 address, network order, v4-mapped.
    pub addr_be: [u32; 4],
    /// The listener's port, network order.
    pub port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<MeshSource>() == 24);

/// Value of `MESH_BY_COOKIE` (keyed by socket cookie, `u64`) and of `MESH_ORIG_DST`: the
/// destination the application asked for (after service load balancing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub _pad: [u8; 2],
    /// `MESH_F_*` of the destination when the connection was redirected.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// Key of `MESH_ORIG_DST`: the redirected client socket's own address and port, which the
/// proxy sees as the peer of the connection it accepted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<OrigDstKey>() == 24);

/// Value of `MESH_CONFIG`, an array of one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshConfig {
    /// Process id (thread group) of the agent: its own connections are never redirected,
    /// whichever namespace or cgroup they are made from. 0 until the agent sets it.
    pub proxy_tgid: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MeshConfig>() == 8);

/// Value of `MESH_LEASE`, an array of one: until when the agent vouches for its proxy
/// listeners.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshLease {
    /// `CLOCK_MONOTONIC` time in nanoseconds (the clock of `bpf_ktime_get_ns()`) until
    /// which the connect hooks redirect mesh traffic to the proxy. 0 (never written, or
    /// ended by an agent that detached): no redirection.
    pub alive_until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<MeshLease>() == 8);

pod!(
    MeshDest, MeshSource, OrigDst, OrigDstKey, MeshConfig, MeshLease
);
