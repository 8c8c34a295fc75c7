//! Mesh redirection shared by the connect hooks: whether a connection between enrolled
//! workloads goes to the node proxy's outbound listener instead of its destination.
//!
//! See `mycel_common::mesh` for the design. The connect hook decides after service load
//! balancing, so the destination checked (and recorded for the proxy) is the backend pod,
//! never a service address the proxy would have to balance again.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
};
use mycel_common::{
    mesh::{MESH_F_ENROLLED, MESH_HBONE_PORT, MESH_OUTBOUND_PORT, MeshSource, OrigDst},
    service::PROTO_TCP,
    stats::{STAT_MESH_LEASE_EXPIRED, STAT_MESH_RECORD_FAILED, STAT_MESH_REDIRECTED},
};

use crate::maps::{MESH_BY_COOKIE, MESH_CONFIG, MESH_DESTS, MESH_LEASE, MESH_SOURCES, count};

/// Whether a connect hook redirects mesh traffic.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mesh {
    /// Redirect, except connections of the proxy itself (found by its process id).
    On,
    /// Never redirect: the sendmsg hooks (UDP, which the mesh does not carry).
    Off,
}

/// The proxy listener a `connect()` to `dst_be`:`port_be` (the destination after load
/// balancing, v4-mapped) must go to instead, when this is mesh traffic; the original
/// destination is then recorded under the socket's cookie.
///
/// Mesh traffic: TCP, from a process of an enrolled workload's network namespace other
/// than the proxy, to an enrolled destination, on any port but the proxy's own two (HBONE
/// connections and connections to the listener itself are what the proxy makes and
/// receives), while the agent's lease holds: once it has run out (the agent is gone, or
/// never started), the connection goes to its destination as if nothing were enrolled.
#[inline(always)]
pub fn redirect<C: EbpfContext>(
    ctx: &C,
    mesh: Mesh,
    dst_be: [u32; 4],
    port_be: u16,
    protocol: u32,
) -> Option<MeshSource> {
    if mesh == Mesh::Off || protocol != u32::from(PROTO_TCP) {
        return None;
    }
    let port = u16::from_be(port_be);
    if port == MESH_HBONE_PORT || port == MESH_OUTBOUND_PORT {
        return None;
    }
    // SAFETY: the map value is copied out.
    let dest = (unsafe { MESH_DESTS.get(&dst_be) }).copied()?;
    if dest.flags & MESH_F_ENROLLED == 0 {
        return None;
    }
    // SAFETY: helper call with the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the map value is copied out.
    let source = (unsafe { MESH_SOURCES.get(&netns) }).copied()?;
    if let Some(config) = MESH_CONFIG.get(0) {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if config.proxy_tgid != 0 && tgid == config.proxy_tgid {
            return None;
        }
    }
    // No listener answers once the agent is gone: direct is better than refused. A lease
    // never written reads as 0, which has always run out.
    let alive_until = MESH_LEASE.get(0).map_or(0, |l| l.alive_until_ns);
    // SAFETY: helper call without arguments.
    if unsafe { bpf_ktime_get_ns() } >= alive_until {
        count(STAT_MESH_LEASE_EXPIRED);
        return None;
    }
    let orig = OrigDst {
        addr_be: dst_be,
        port_be,
        _pad: [0; 2],
        flags: dest.flags,
    };
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if MESH_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        // Without the record the proxy could not tell where the connection was going:
        // better unencrypted than broken.
        count(STAT_MESH_RECORD_FAILED);
        return None;
    }
    count(STAT_MESH_REDIRECTED);
    Some(source)
}
