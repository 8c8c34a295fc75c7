//! FLOWS and FLOW_EVENTS: per-flow accounting in the TC programs, and the events the agent
//! turns into metrics and the flow log.

use crate::pod;

/// Default size of `FLOWS` (the agent may create it with another).
pub const DEFAULT_FLOW_ENTRIES: u32 = 65_536;

/// Key of `FLOWS` (LRU): the connection as its first packet saw it (the initiator is the
/// source), seen from one endpoint. A connection between two workloads of the same node has
/// two entries, one per endpoint ([`DIR_EGRESS`] at the initiator, [`DIR_INGRESS`] at the
/// responder).
///
/// [`DIR_EGRESS`]: crate::policy::DIR_EGRESS
/// [`DIR_INGRESS`]: crate::policy::DIR_INGRESS
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `DIR_INGRESS` (the peer initiated) or `DIR_EGRESS` (the endpoint initiated).
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of `FLOWS`: counters of one connection, both directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowValue {
    /// Packets and bytes from the initiator.
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    /// Packets and bytes from the responder.
    pub packets_rev: u64,
    pub bytes_rev: u64,
    /// `bpf_ktime_get_ns` of the first and last packet.
    pub first_ns: u64,
    pub last_ns: u64,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// `ENDPOINTS.policy_revision` the verdict was computed under.
    pub policy_revision: u32,
    /// TCP flags seen (OR of every packet's flags byte).
    pub tcp_flags: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `DROP_REASON_*`.
    pub drop_reason: u8,
    /// Non-zero once a FLOW_EVENT_CLOSED was sent.
    pub closed: u8,
    pub policy_id: u32,
    /// TCP FIN seen: bit 0 from the initiator, bit 1 from the responder.
    pub fin_seen: u8,
    /// `FLOW_F_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 72);

/// [`FlowValue::flags`]: the flow was first seen by a TCP packet that cannot open a
/// connection (no SYN, or SYN with ACK: a connection older than the programs, or a crafted
/// packet). Its verdict was computed as for an opening packet; a later SYN without ACK on
/// the tuple (either way round) is judged afresh as a new flow instead of joining it.
pub const FLOW_F_MIDSTREAM: u8 = 1 << 0;
/// [`FlowValue::flags`]: a kubelet probe (`--node-traffic probes`) opened the flow; when
/// the endpoint's policy changes it is judged again as a probe (only a DENY cuts it).
pub const FLOW_F_PROBE: u8 = 1 << 1;

/// [`FlowEvent::kind`].
pub const FLOW_EVENT_NEW: u8 = 1;
pub const FLOW_EVENT_CLOSED: u8 = 2;
pub const FLOW_EVENT_DROP: u8 = 3;

/// A record on the `FLOW_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub value: FlowValue,
    /// `FLOW_EVENT_*`.
    pub kind: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`], seen from the endpoint.
    pub direction: u8,
    pub _pad: [u8; 2],
    /// ifindex of the interface the program ran on.
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 120);

pod!(FlowKey, FlowValue, FlowEvent);
