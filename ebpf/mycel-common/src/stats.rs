//! STATS: per-CPU counters of what the kernel programs did, read by the agent for
//! `mycel_datapath_*` metrics. The index is the counter; the value is a `u64` per CPU.

/// connect()/sendmsg() to a service address rewritten to a backend.
pub const STAT_LB_TRANSLATED: u32 = 0;
/// connect()/sendmsg() to a service address refused: the service has no ready backend.
pub const STAT_LB_NO_BACKEND: u32 = 1;
/// A backend slot was missing although the service said it existed (a torn update).
pub const STAT_LB_SLOT_MISSING: u32 = 2;
/// getpeername()/recvmsg() answered with the service address.
pub const STAT_LB_REVERSED: u32 = 3;
/// The reverse translation entry could not be stored (LRU map update failed).
pub const STAT_LB_REVNAT_UPDATE_FAILED: u32 = 4;
/// A flow event could not be put on the FLOW_EVENTS ring buffer (it was full).
pub const STAT_FLOW_EVENTS_LOST: u32 = 5;
/// The FLOWS map could not take a new flow.
pub const STAT_FLOW_UPDATE_FAILED: u32 = 6;
/// connect() between enrolled workloads pointed at the node proxy's outbound listener.
pub const STAT_MESH_REDIRECTED: u32 = 7;
/// connect() that should have gone to the proxy went straight to its destination: its
/// original destination could not be stored (`MESH_BY_COOKIE` update failed).
pub const STAT_MESH_RECORD_FAILED: u32 = 8;
/// A redirected connection's original destination moved from its socket cookie to its
/// source address and port (`sock_ops`), where the proxy finds it.
pub const STAT_MESH_ORIG_DST_RECORDED: u32 = 9;
/// The `MESH_ORIG_DST` update failed: the proxy cannot learn that connection's destination.
pub const STAT_MESH_ORIG_DST_UPDATE_FAILED: u32 = 10;
/// A new plaintext flow (any protocol) to a workload in mTLS mode STRICT was dropped in TC.
pub const STAT_MESH_STRICT_DROPPED: u32 = 11;
/// A packet the TC programs could not judge (truncated or invalid headers, an IPv6
/// extension header chain past the bound, an overlapping TCP fragment) was dropped.
pub const STAT_TC_INVALID_DROPPED: u32 = 12;
/// A packet a workload sent with a source address that is not its own was dropped.
pub const STAT_TC_SPOOFED_DROPPED: u32 = 13;
/// Every packet the TC programs dropped, whatever the reason (one per DROP verdict).
pub const STAT_TC_DROPPED: u32 = 14;
/// A TCP connection from the node was let through as a kubelet probe (counted once per
/// connection, when its flow is created).
pub const STAT_TC_PROBE_EXEMPTED: u32 = 15;
/// connect() between enrolled workloads that went straight to its destination because the
/// agent's lease (`MESH_LEASE`) had run out: no proxy listens for it.
pub const STAT_MESH_LEASE_EXPIRED: u32 = 16;
/// Number of counters; the size of the STATS array. Room is left for more: a pinned STATS
/// map keeps the size it was created with, so counters past it read as zero until the
/// pins are removed.
pub const STAT_MAX: u32 = 32;

/// Counter names, index by index, as the agent exports them.
pub const STAT_NAMES: [&str; 17] = [
    "lb_translated",
    "lb_no_backend",
    "lb_slot_missing",
    "lb_reversed",
    "lb_revnat_update_failed",
    "flow_events_lost",
    "flow_update_failed",
    "mesh_redirected",
    "mesh_record_failed",
    "mesh_orig_dst_recorded",
    "mesh_orig_dst_update_failed",
    "mesh_strict_dropped",
    "tc_invalid_dropped",
    "tc_spoofed_dropped",
    "tc_dropped",
    "tc_probe_exempted",
    "mesh_lease_expired",
];
