//! IPCACHE, ENDPOINTS and POLICY: identity-based L3/L4 policy in the TC programs on each
//! local workload's host-side interface.
//!
//! Addresses are 16 bytes in network order, IPv4 stored IPv4-mapped, as in `service`.

use crate::pod;

/// Default size of `IPCACHE` (the agent may create it otherwise): addresses and CIDRs.
pub const DEFAULT_IPCACHE_ENTRIES: u32 = 65_536;
/// Default size of `POLICY` (the agent may create it otherwise): compiled entries of every
/// local endpoint.
pub const DEFAULT_POLICY_ENTRIES: u32 = 65_536;

/// Numeric identities. Workload identities (one per namespace and service account) start
/// at [`IDENTITY_FIRST_WORKLOAD`]; CIDR identities (one per ipBlock a policy names) at
/// [`IDENTITY_FIRST_CIDR`]; below that, reserved ones.
pub const IDENTITY_UNKNOWN: u32 = 0;
/// The node itself.
pub const IDENTITY_HOST: u32 = 1;
/// Any address outside every workload and CIDR the agent knows.
pub const IDENTITY_WORLD: u32 = 2;
/// First identity given to a (namespace, service account).
pub const IDENTITY_FIRST_WORKLOAD: u32 = 256;
/// First identity given to an ipBlock CIDR.
pub const IDENTITY_FIRST_CIDR: u32 = 1 << 24;

/// Key of `IPCACHE`, an LPM trie: the longest prefix containing the peer's address gives
/// its identity (workload addresses as /128, ipBlocks as their prefix, v4 as ::ffff:0:0/96+n).
/// aya wraps it as `lpm_trie::Key<IpcacheAddr>`; this is the data part.
pub type IpcacheAddr = [u32; 4];

/// Value of `IPCACHE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 8);

/// [`EndpointInfo::flags`]: some ALLOW policy selects this endpoint, so traffic to it that
/// no ALLOW matches is denied (without it, only DENY entries apply).
pub const ENDPOINT_F_ENFORCE: u32 = 1 << 0;
/// [`EndpointInfo::flags`]: the endpoint is enrolled in the mesh. HBONE (TCP port 15008)
/// to and from it skips L3/L4 policy here: the node proxy authorizes each tunnel by the
/// peer's certificate, which the kernel cannot see.
pub const ENDPOINT_F_MESH: u32 = 1 << 1;
/// [`EndpointInfo::flags`]: mode STRICT. Only HBONE (TCP to port 15008) may open a flow to
/// the endpoint: new plaintext flows of every protocol are dropped. Replies to flows the
/// endpoint opened, ICMP errors and IPv6 neighbour discovery still pass, and so does node
/// traffic as [`ENDPOINT_F_NODE_ALL`] or [`ENDPOINT_F_NODE_PROBES`] exempt it.
pub const ENDPOINT_F_MESH_STRICT: u32 = 1 << 2;
/// [`EndpointInfo::flags`]: node traffic (`--node-traffic all`): a peer of identity
/// [`IDENTITY_HOST`] is exempt from mode STRICT (the agent also compiles an ALLOW for it).
pub const ENDPOINT_F_NODE_ALL: u32 = 1 << 3;
/// [`EndpointInfo::flags`]: kubelet probes (`--node-traffic probes`): a TCP connection from
/// a node address, opened by a socket of the node itself (the packet carries a local
/// socket) whose cgroup is not below the pods' cgroup ([`NodeConfig::pods_cgroup_id`]), is
/// exempt from mode STRICT and from ALLOW policies; only a DENY policy naming it refuses it.
pub const ENDPOINT_F_NODE_PROBES: u32 = 1 << 4;

/// Value of `ENDPOINTS`, keyed by the ifindex of the workload's host-side interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// Names this endpoint's entries in `POLICY`.
    pub endpoint_id: u32,
    /// The workload's own identity.
    pub identity: u32,
    /// `ENDPOINT_F_*`.
    pub flags: u32,
    /// Bumped by the agent whenever this endpoint's policy changes; a flow whose cached
    /// verdict has an older revision is evaluated again.
    pub policy_revision: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 16);

/// Key of `POLICY`. Lookups are exact and at most three per new flow, whatever the number
/// of rules: (endpoint, peer, proto, port), then (endpoint, peer, proto, port 0 = any
/// port), then (endpoint, 0 = any peer, 0, 0) as the endpoint's default. The agent compiles
/// DENY-before-ALLOW precedence into the entries, so the first hit is the answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    /// Identity of the peer (the traffic's source for ingress); 0 = any.
    pub peer_identity: u32,
    /// Destination port, network order; 0 = any.
    pub dport_be: u16,
    /// IP protocol; 0 = any.
    pub proto: u8,
    /// [`DIR_INGRESS`] (traffic to the endpoint) or [`DIR_EGRESS`].
    pub direction: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

/// Traffic to the endpoint.
pub const DIR_INGRESS: u8 = 0;
/// Traffic from the endpoint.
pub const DIR_EGRESS: u8 = 1;

/// Value of `POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
    pub verdict: u8,
    pub _pad: [u8; 3],
    /// Which policy decided (an index the agent keeps), for flow records.
    pub policy_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// Drop reasons (Hubble's names in the agent's metrics).
pub const DROP_REASON_NONE: u8 = 0;
/// A DENY policy matched.
pub const DROP_REASON_POLICY_DENY: u8 = 1;
/// An ALLOW policy selects the endpoint and none matched.
pub const DROP_REASON_POLICY_DEFAULT_DENY: u8 = 2;
/// Plaintext to an endpoint whose mesh mode is STRICT.
pub const DROP_REASON_MTLS_STRICT: u8 = 3;
/// A workload sent with a source address that is not one of its own (anti-spoofing).
pub const DROP_REASON_INVALID_SOURCE_IP: u8 = 4;
/// An IPv4/IPv6 header that is truncated or invalid (version, header or total length), or
/// a TCP fragment that overlaps the TCP header (RFC 1858).
pub const DROP_REASON_INVALID_PACKET: u8 = 5;
/// A TCP, UDP or ICMP header that is truncated or invalid, also in a first fragment too
/// short to hold it (RFC 7112).
pub const DROP_REASON_INVALID_L4_HEADER: u8 = 6;
/// An IPv6 extension header chain that is truncated, longer than the programs walk, or
/// ends in "no next header".
pub const DROP_REASON_INVALID_IPV6_EXTENSION_HEADER: u8 = 7;

/// Key of `SOURCES`: a local workload's address (v4-mapped, network order); the value is
/// the ifindex of the workload's host-side interface. A packet a workload sends (the
/// `tc_from_pod` program) whose source address is not there under that workload's ifindex
/// is dropped ([`DROP_REASON_INVALID_SOURCE_IP`]), except from `::` (duplicate address
/// detection) and `fe80::/10` (link-local, which the stack never forwards).
pub type SourceAddr = [u32; 4];

/// Entries of `SOURCES`: addresses of local workloads.
pub const SOURCE_ENTRIES: u32 = 16_384;

/// The single value of `NODE_CONFIG`: node-wide settings of the TC programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// cgroup v2 id (the directory's inode number) of the cgroup every pod, hostNetwork
    /// pods included, lives under (the agent's `--cgroup`); 0 = unknown, then no packet is
    /// taken for a kubelet probe.
    pub pods_cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 8);

pod!(
    IpcacheValue,
    EndpointInfo,
    PolicyKey,
    PolicyValue,
    NodeConfig
);
