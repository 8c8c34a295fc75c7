//! Backend selection shared by the connect and sendmsg hooks.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
};
use mycel_common::{
    service::{
        Backend, BackendKey, MAGLEV_TABLE_SIZE, RevNatKey, RevNatValue, SVC_FLAG_AFFINITY,
        ServiceKey, ServiceValue,
    },
    stats::{STAT_LB_REVNAT_UPDATE_FAILED, STAT_LB_SLOT_MISSING},
};

use crate::maps::{BACKENDS, MAGLEV, REVNAT, count};

/// Picks a backend for `svc`: Maglev on the client's network namespace for services with
/// session affinity (one pod is one network namespace, so this is per-client affinity that
/// works before the socket has a source address), uniformly at random otherwise.
///
/// `None` when the service has no backend.
#[inline(always)]
pub fn select<C: EbpfContext>(ctx: &C, svc: &ServiceValue) -> Option<Backend> {
    let count_ = svc.count as u32;
    if count_ == 0 {
        return None;
    }
    let mut slot = u32::MAX;
    if svc.flags & SVC_FLAG_AFFINITY != 0 {
        // SAFETY: the map value is only read.
        if let Some(table) = unsafe { MAGLEV.get(&svc.id) } {
            // SAFETY: helper call with the program's own context.
            let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let i = mix64(cookie) % MAGLEV_TABLE_SIZE;
            // LLVM lowers the modulo to a multiply-shift the verifier cannot bound, and
            // would drop a plain bounds check it can prove redundant; reading the index back
            // through a volatile load keeps the check, which gives the verifier its bound.
            // SAFETY: reads a local.
            let i = unsafe { core::ptr::read_volatile(&i) };
            if i < MAGLEV_TABLE_SIZE {
                if let Some(s) = table.slots.get(i as usize) {
                    slot = *s as u32;
                }
            }
        }
    }
    if slot >= count_ {
        // SAFETY: helper call without arguments.
        slot = unsafe { bpf_get_prandom_u32() } % count_;
    }
    let key = BackendKey {
        service_id: svc.id,
        slot,
    };
    // SAFETY: the map value is copied out.
    match unsafe { BACKENDS.get(&key) } {
        Some(b) => Some(*b),
        None => {
            count(STAT_LB_SLOT_MISSING);
            None
        }
    }
}

/// Remembers that this socket's traffic to `backend` belongs to service `svc`, for
/// getpeername() and recvmsg().
#[inline(always)]
pub fn remember<C: EbpfContext>(ctx: &C, svc: &ServiceKey, backend: &Backend) {
    let key = RevNatKey {
        // SAFETY: helper call with the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        _pad: [0; 6],
    };
    let value = RevNatValue {
        addr_be: svc.addr_be,
        port_be: svc.port_be,
        _pad: 0,
    };
    if REVNAT.insert(&key, &value, 0).is_err() {
        count(STAT_LB_REVNAT_UPDATE_FAILED);
    }
}

/// The service address this socket asked for, when `addr_be`:`port_be` is a backend it
/// was sent to.
#[inline(always)]
pub fn recall<C: EbpfContext>(ctx: &C, addr_be: [u32; 4], port_be: u16) -> Option<RevNatValue> {
    let key = RevNatKey {
        // SAFETY: helper call with the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr_be,
        port_be,
        _pad: [0; 6],
    };
    // SAFETY: the map value is copied out.
    unsafe { REVNAT.get(&key) }.copied()
}

/// A 64 → 32 bit mixer (the MurmurHash3 finalizer): spreads netns cookies, which are small
/// sequential numbers, over the Maglev table.
#[inline(always)]
fn mix64(mut x: u64) -> u32 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x as u32
}
