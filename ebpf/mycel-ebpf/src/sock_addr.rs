//! cgroup sock_addr hooks: service load balancing at connect()/sendmsg() time, mesh
//! redirection to the node proxy at connect() time, and the reverse translation at
//! getpeername()/recvmsg() so applications see the address they asked for (the service
//! address, or the pod a redirected connection was meant for).
//!
//! Nothing is NATed: the socket is pointed at the backend (or the proxy) before any packet
//! exists.

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::generated::bpf_set_retval, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mycel_common::{
    service::{Backend, ServiceKey, is_v4_mapped, v4_mapped},
    stats::{STAT_LB_NO_BACKEND, STAT_LB_REVERSED, STAT_LB_TRANSLATED},
};

use crate::{
    lb::{recall, remember, select},
    maps::{SERVICES, count},
    mesh::{Mesh, redirect},
};

/// Let the call go on.
const PROCEED: i32 = 1;
/// Fail the call; the errno is `EPERM` unless `bpf_set_retval` chose another.
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    translate4(&ctx, Refusal::ConnRefused, Mesh::On)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    translate4(&ctx, Refusal::ConnRefused, Mesh::Off)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx, Refusal::ConnRefused, Mesh::On)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx, Refusal::ConnRefused, Mesh::Off)
}

// Variants for kernels without `bpf_set_retval` (before Linux 5.18): a service without
// backends still fails fast, but with EPERM. The agent loads these when the ones above are
// rejected.

#[cgroup_sock_addr(connect4)]
pub fn connect4_eperm(ctx: SockAddrContext) -> i32 {
    translate4(&ctx, Refusal::Eperm, Mesh::On)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4_eperm(ctx: SockAddrContext) -> i32 {
    translate4(&ctx, Refusal::Eperm, Mesh::Off)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6_eperm(ctx: SockAddrContext) -> i32 {
    translate6(&ctx, Refusal::Eperm, Mesh::On)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6_eperm(ctx: SockAddrContext) -> i32 {
    translate6(&ctx, Refusal::Eperm, Mesh::Off)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx)
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel hands every sock_addr program a valid context for its whole run.
    unsafe { &mut *ctx.sock_addr }
}

/// Reads `user_ip6` one 32-bit word at a time, each at a constant offset from the context:
/// the verifier rejects loads through a context pointer the program has moved.
#[inline(always)]
fn user_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    // SAFETY: reads of the kernel-provided context, each a single aligned 4-byte load.
    unsafe {
        [
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
            core::ptr::read_volatile(&sa.user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` word by word, for the same reason as [`user_ip6`].
#[inline(always)]
fn set_user_ip6(sa: &mut bpf_sock_addr, addr: [u32; 4]) {
    // SAFETY: writes to the kernel-provided context, each a single aligned 4-byte store.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], addr[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], addr[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], addr[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], addr[3]);
    }
}

/// The service a destination address names, if any.
#[inline(always)]
fn service_key(addr_be: [u32; 4], user_port: u32, protocol: u32) -> ServiceKey {
    ServiceKey {
        addr_be,
        // `user_port` holds the port in network order in its low 16 bits.
        port_be: user_port as u16,
        proto: protocol as u8,
        _pad: 0,
    }
}

/// How a call to a service without backends fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// ECONNREFUSED, as a real closed port would answer (needs `bpf_set_retval`).
    ConnRefused,
    /// EPERM, the default errno of a rejecting cgroup program.
    Eperm,
}

/// Refuses the call: a service without ready backends fails fast instead of sending SYNs to
/// an address nobody answers.
#[inline(always)]
fn refuse(how: Refusal) -> i32 {
    count(STAT_LB_NO_BACKEND);
    if how == Refusal::ConnRefused {
        // SAFETY: helper call; sets the errno the syscall returns when we answer REJECT.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    REJECT
}

/// Load balancing: the backend chosen when `key` is a service frontend, `Ok(None)` for
/// any other destination, `Err(verdict)` when the call is refused (no ready backend, or
/// an IPv6 backend for an IPv4 socket, which the agent never programs).
#[inline(always)]
fn choose(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    how: Refusal,
    v4_socket: bool,
) -> Result<Option<Backend>, i32> {
    // SAFETY: the map value is copied out.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return Ok(None);
    };
    let Some(backend) = select(ctx, &svc) else {
        return Err(refuse(how));
    };
    if v4_socket && !is_v4_mapped(&backend.addr_be) {
        return Err(refuse(how));
    }
    count(STAT_LB_TRANSLATED);
    Ok(Some(backend))
}

/// Load balancing, then mesh redirection, of one connect()/sendmsg() on an IPv4 socket.
#[inline(always)]
fn translate4(ctx: &SockAddrContext, how: Refusal, mesh: Mesh) -> i32 {
    let sa = sock_addr(ctx);
    let key = service_key(v4_mapped(sa.user_ip4), sa.user_port, sa.protocol);
    let chosen = match choose(ctx, &key, how, true) {
        Ok(chosen) => chosen,
        Err(verdict) => return verdict,
    };
    let (dst_be, port_be) = match &chosen {
        Some(b) => (b.addr_be, b.port_be),
        None => (key.addr_be, key.port_be),
    };
    if let Some(listener) = redirect(ctx, mesh, dst_be, port_be, sa.protocol) {
        // getpeername() maps the listener back to what the application asked for.
        remember(
            ctx,
            &key,
            &listener_backend(listener.addr_be, listener.port_be),
        );
        sa.user_ip4 = listener.addr_be[3];
        sa.user_port = u32::from(listener.port_be);
        return PROCEED;
    }
    if let Some(backend) = chosen {
        remember(ctx, &key, &backend);
        sa.user_ip4 = backend.addr_be[3];
        sa.user_port = u32::from(backend.port_be);
    }
    PROCEED
}

/// Load balancing, then mesh redirection, of one connect()/sendmsg() on an IPv6 socket.
/// Only v4-mapped destinations are redirected: the proxy's listeners are IPv4, and an
/// IPv6-only socket could not reach them.
#[inline(always)]
fn translate6(ctx: &SockAddrContext, how: Refusal, mesh: Mesh) -> i32 {
    let sa = sock_addr(ctx);
    let key = service_key(user_ip6(sa), sa.user_port, sa.protocol);
    let chosen = match choose(ctx, &key, how, false) {
        Ok(chosen) => chosen,
        Err(verdict) => return verdict,
    };
    let (dst_be, port_be) = match &chosen {
        Some(b) => (b.addr_be, b.port_be),
        None => (key.addr_be, key.port_be),
    };
    if is_v4_mapped(&dst_be)
        && let Some(listener) = redirect(ctx, mesh, dst_be, port_be, sa.protocol)
    {
        remember(
            ctx,
            &key,
            &listener_backend(listener.addr_be, listener.port_be),
        );
        set_user_ip6(sa, listener.addr_be);
        sa.user_port = u32::from(listener.port_be);
        return PROCEED;
    }
    if let Some(backend) = chosen {
        remember(ctx, &key, &backend);
        set_user_ip6(sa, backend.addr_be);
        sa.user_port = u32::from(backend.port_be);
    }
    PROCEED
}

/// The proxy listener as a REVNAT "backend", so that getpeername() on a redirected socket
/// answers with the original destination.
#[inline(always)]
fn listener_backend(addr_be: [u32; 4], port_be: u16) -> Backend {
    Backend {
        addr_be,
        port_be,
        _pad: 0,
    }
}

#[inline(always)]
fn reverse4(ctx: &SockAddrContext) -> i32 {
    let sa = sock_addr(ctx);
    if let Some(svc) = recall(ctx, v4_mapped(sa.user_ip4), sa.user_port as u16) {
        sa.user_ip4 = svc.addr_be[3];
        sa.user_port = svc.port_be as u32;
        count(STAT_LB_REVERSED);
    }
    PROCEED
}

#[inline(always)]
fn reverse6(ctx: &SockAddrContext) -> i32 {
    let sa = sock_addr(ctx);
    if let Some(svc) = recall(ctx, user_ip6(sa), sa.user_port as u16) {
        set_user_ip6(sa, svc.addr_be);
        sa.user_port = svc.port_be as u32;
        count(STAT_LB_REVERSED);
    }
    PROCEED
}
