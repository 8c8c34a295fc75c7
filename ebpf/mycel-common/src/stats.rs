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
/// Number of counters; the size of the STATS array.
pub const STAT_MAX: u32 = 8;

/// Counter names, index by index, as the agent exports them.
pub const STAT_NAMES: [&str; 7] = [
    "lb_translated",
    "lb_no_backend",
    "lb_slot_missing",
    "lb_reversed",
    "lb_revnat_update_failed",
    "flow_events_lost",
    "flow_update_failed",
];
