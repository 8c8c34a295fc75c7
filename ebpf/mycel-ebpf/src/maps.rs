//! Every map of mycel's kernel programs. Types are in `mycel_common`, one module per map.
//!
//! Maps are pinned by name under the agent's bpffs directory: a restarted agent takes them
//! over (and with them the service table that keeps routing while it is down).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use mycel_common::{
    flow::{DEFAULT_FLOW_ENTRIES, FlowKey, FlowValue},
    mesh::{
        MESH_DEST_ENTRIES, MESH_ORIG_ENTRIES, MESH_SOURCE_ENTRIES, MeshConfig, MeshDest, MeshLease,
        MeshSource, OrigDst, OrigDstKey,
    },
    policy::{
        DEFAULT_IPCACHE_ENTRIES, DEFAULT_POLICY_ENTRIES, EndpointInfo, IpcacheAddr, IpcacheValue,
        NodeConfig, PolicyKey, PolicyValue, SOURCE_ENTRIES, SourceAddr,
    },
    service::{
        Backend, BackendKey, DEFAULT_BACKEND_SLOTS, MAX_AFFINITY_SERVICES, MAX_SERVICES,
        MaglevTable, REVNAT_ENTRIES, RevNatKey, RevNatValue, ServiceKey, ServiceValue,
    },
    stats::STAT_MAX,
};

// Sizes here are defaults: the agent sets SERVICES, BACKENDS, REVNAT, FLOWS, POLICY and
// IPCACHE from its configuration when it creates them.

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

/// Entries of `IPCACHE`: workload addresses and policy CIDRs the node knows.
const IPCACHE_ENTRIES: u32 = DEFAULT_IPCACHE_ENTRIES;
/// Entries of `ENDPOINTS`: local workload interfaces.
const ENDPOINT_ENTRIES: u32 = 4_096;
/// Entries of `POLICY`: compiled rules of every local endpoint.
const POLICY_ENTRIES: u32 = DEFAULT_POLICY_ENTRIES;
/// Size of `FLOW_EVENTS` in bytes (a power of two multiple of the page size).
const FLOW_EVENTS_BYTES: u32 = 1 << 20;
/// Unread bytes in `FLOW_EVENTS` past which a new event wakes the agent at once (below
/// it, the agent's periodic drain picks events up).
pub const FLOW_EVENTS_WAKEUP_BYTES: u64 = FLOW_EVENTS_BYTES as u64 / 4;

/// Identity of every known address: longest prefix of the v4-mapped address → identity.
/// (LPM tries are never preallocated; aya adds `BPF_F_NO_PREALLOC` itself.)
#[map]
pub static IPCACHE: LpmTrie<IpcacheAddr, IpcacheValue> = LpmTrie::pinned(IPCACHE_ENTRIES, 0);

/// Local workloads by the ifindex of their host-side interface.
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(ENDPOINT_ENTRIES, 0);

/// Compiled policy: (endpoint, peer identity, port, protocol, direction) → verdict.
#[map]
pub static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(POLICY_ENTRIES, 0);

/// Addresses of local workloads → ifindex of the workload's host-side interface: what a
/// workload may send from (anti-spoofing in `tc_from_pod`).
#[map]
pub static SOURCES: HashMap<SourceAddr, u32> = HashMap::pinned(SOURCE_ENTRIES, 0);

/// Node-wide settings of the TC programs, an array of one.
#[map]
pub static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// Per-flow counters and cached verdicts (an LRU: the oldest flows make room).
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(DEFAULT_FLOW_ENTRIES, 0);

/// Flow events for the agent: new, closed and denied flows.
#[map]
pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(FLOW_EVENTS_BYTES, 0);

/// Enrolled mesh destinations (workload addresses, v4-mapped) and their `MESH_F_*` flags.
#[map]
pub static MESH_DESTS: HashMap<[u32; 4], MeshDest> = HashMap::pinned(MESH_DEST_ENTRIES, 0);

/// Enrolled local workloads by network namespace cookie: where the proxy's outbound
/// listener of that namespace is.
#[map]
pub static MESH_SOURCES: HashMap<u64, MeshSource> = HashMap::pinned(MESH_SOURCE_ENTRIES, 0);

/// Original destinations of redirected connections by socket cookie, from connect() until
/// the `sock_ops` program knows the socket's source port (an LRU: a connect() that failed
/// before that leaves an entry nobody removes).
#[map]
pub static MESH_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MESH_ORIG_ENTRIES, 0);

/// Original destinations of redirected connections by the client's (address, port), which
/// the proxy reads (and deletes) when it accepts the connection. An LRU for the same reason.
#[map]
pub static MESH_ORIG_DST: LruHashMap<OrigDstKey, OrigDst> =
    LruHashMap::pinned(MESH_ORIG_ENTRIES, 0);

/// The mesh settings, an array of one: the proxy's process id.
#[map]
pub static MESH_CONFIG: Array<MeshConfig> = Array::pinned(1, 0);

/// The agent's lease on mesh redirection, an array of one: the connect hooks redirect only
/// while it runs (see `mycel_common::mesh::MeshLease`).
#[map]
pub static MESH_LEASE: Array<MeshLease> = Array::pinned(1, 0);
