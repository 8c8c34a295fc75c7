//! Every map of mycel's kernel programs. Types are in `mycel_common`, one module per map.
//!
//! Maps are pinned by name under the agent's bpffs directory: a restarted agent takes them
//! over (and with them the service table that keeps routing while it is down).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use mycel_common::{
    service::{
        Backend, BackendKey, DEFAULT_BACKEND_SLOTS, MAX_AFFINITY_SERVICES, MAX_SERVICES,
        MaglevTable, REVNAT_ENTRIES, RevNatKey, RevNatValue, ServiceKey, ServiceValue,
    },
    stats::STAT_MAX,
};

// Sizes here are defaults: the agent sets SERVICES, BACKENDS and REVNAT from its
// configuration when it creates them.

/// Service frontends: (address, port, protocol) → id, backend count, flags.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

/// Backends: (service id, slot) → address and port.
#[map]
pub static BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(DEFAULT_BACKEND_SLOTS, 0);

/// Maglev lookup tables of services with session affinity, by service id. Not
/// preallocated: each value is 8 KiB and few services ask for affinity.
#[map]
pub static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::pinned(MAX_AFFINITY_SERVICES, BPF_F_NO_PREALLOC);

/// Reverse translation for getpeername()/recvmsg(): (socket cookie, backend) → service.
#[map]
pub static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(REVNAT_ENTRIES, 0);

/// Per-CPU counters, indexed by `mycel_common::stats::STAT_*`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_MAX, 0);

/// Adds one to counter `index` on this CPU.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(v) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs on one CPU do not run concurrently with each other.
        unsafe { *v += 1 };
    }
}
