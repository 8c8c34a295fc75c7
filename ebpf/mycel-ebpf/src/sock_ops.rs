//! cgroup sock_ops hook: hands the original destination of a redirected connection over
//! from its socket cookie to its source address and port.
//!
//! The connect hook records the destination under the socket's cookie, because at that
//! point the socket has no source port yet. The proxy, which accepts the connection,
//! knows only the peer's address and port. `BPF_SOCK_OPS_TCP_CONNECT_CB` runs once the
//! kernel has chosen both and before the SYN is sent, so the proxy can never accept a
//! connection whose record is not in place yet.

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, helpers::bpf_get_socket_cookie, macros::sock_ops,
    programs::SockOpsContext,
};
use mycel_common::{
    mesh::OrigDstKey,
    service::v4_mapped,
    stats::{STAT_MESH_ORIG_DST_RECORDED, STAT_MESH_ORIG_DST_UPDATE_FAILED},
};

use crate::maps::{MESH_BY_COOKIE, MESH_ORIG_DST, count};

/// What a sock_ops program returns when it has no reply to give.
const OK: u32 = 1;

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        move_orig_dst(&ctx);
    }
    OK
}

#[inline(always)]
fn move_orig_dst(ctx: &SockOpsContext) {
    // SAFETY: helper call with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the map value is copied out.
    let Some(orig) = (unsafe { MESH_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    // A redirected socket is always connected to an IPv4 listener, also when it is an IPv6
    // socket given a v4-mapped address: its IPv4 source address is set by now (for such a
    // socket the kernel copies it into the IPv6 field only after the connect completes).
    // `local_ip4` is in network order; `local_port` in host order.
    let key = OrigDstKey {
        addr_be: v4_mapped(ctx.local_ip4()),
        port_be: (ctx.local_port() as u16).to_be(),
        _pad: [0; 6],
    };
    if MESH_ORIG_DST.insert(&key, &orig, 0).is_err() {
        count(STAT_MESH_ORIG_DST_UPDATE_FAILED);
        return;
    }
    count(STAT_MESH_ORIG_DST_RECORDED);
    // The cookie entry has done its job; removing it leaves room in the LRU.
    let _ = MESH_BY_COOKIE.remove(&cookie);
}
