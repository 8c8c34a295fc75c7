//! TC programs on the host side of each local workload's interface: identity-based L3/L4
//! policy and per-flow accounting.
//!
//! The host side of a veth sees the workload's traffic mirrored: what arrives on its
//! ingress comes *from* the workload ([`tc_from_pod`]), what leaves on its egress goes *to*
//! the workload ([`tc_to_pod`]). Each packet belongs to a flow in `FLOWS`, keyed by the
//! 5-tuple as the flow's first packet saw it plus the flow's direction relative to the
//! endpoint; the flow caches the verdict together with the endpoint's policy revision, so
//! policy is evaluated once per flow, and again only when the endpoint's policy changes.
//!
//! Policy is ingress only (as Istio's: an AuthorizationPolicy selects the destination):
//! flows a workload initiates are allowed and accounted.
//!
//! Mesh endpoints (`ENDPOINT_F_MESH`): HBONE, TCP to the endpoint's port 15008, is allowed
//! whatever the L3/L4 policy says, because the node proxy authorizes each tunnel by the
//! peer's certificate, which is invisible here. In mode STRICT (`ENDPOINT_F_MESH_STRICT`)
//! nothing else may open a flow to the endpoint, whatever the protocol: new plaintext TCP,
//! UDP, ICMP and other flows are dropped. What still passes: replies to flows the endpoint
//! opened (they match its flow the other way round), ICMP and ICMPv6 errors (they carry no
//! application data, and path MTU discovery of the HBONE connections needs them; they are
//! judged by policy per packet and never open a flow), IPv6 neighbour discovery, and the
//! node's traffic as the endpoint's `ENDPOINT_F_NODE_*` flag exempts it (`all`: every
//! packet from a node address; `probes`: kubelet probes, see [`is_probe`]). Flows that were
//! established before the mode changed are left alone.
//!
//! A flow is opened only by a packet that may open it. A TCP packet without a flow entry
//! that is not a SYN without ACK (ACK, FIN, RST, flagless, SYN|ACK) is judged like an
//! opening packet (STRICT and policy), and its entry is flagged `FLOW_F_MIDSTREAM`: a
//! later SYN on that tuple, either way round, is judged afresh as a new flow.
//!
//! Parsing: every IPv4/IPv6 packet is either judged with its protocol and ports or dropped
//! with a counted reason (`DROP_REASON_*`, a drop event, `STAT_TC_*`):
//! - IPv4: version, IHL ≥ 5 and a total length that covers the header and lies inside the
//!   frame; a non-first fragment passes untracked (the first fragment carries the ports
//!   and gets the verdict, and the receiving stack reassembles nothing without it), except
//!   a TCP fragment at offset 8 bytes, which overlaps the TCP header (RFC 1858): dropped.
//! - IPv6: version and payload length; then the extension headers (hop-by-hop, routing,
//!   destination options, AH, fragment anywhere in the chain) are walked up to
//!   [`IPV6_MAX_HEADERS`], as Cilium's `ipv6_hdrlen` does. A chain longer than that,
//!   truncated, or ending in "no next header" is dropped; a non-first fragment passes
//!   untracked as for IPv4. Link-local multicast (ff02::/16) passes before the walk.
//! - L4: TCP needs its whole 20-byte header (and a data offset ≥ 5), UDP its 8 bytes, ICMP
//!   and ICMPv6 8 bytes, all inside the datagram; a (first) fragment that does not hold
//!   them is dropped (RFC 7112). Other protocols are judged with ports 0.
//! - Non-IP frames (ARP, 802.1Q-tagged frames, which the pod's interface does not accept)
//!   and IPv6 neighbour discovery (ICMPv6 133..=137) pass untouched.
//!
//! Anti-spoofing: a packet a workload sends must come from one of its own addresses
//! (`SOURCES`), from `::` (duplicate address detection) or from `fe80::/10` (link-local,
//! never forwarded by the stack); anything else is dropped (`DROP_REASON_INVALID_SOURCE_IP`),
//! non-first fragments included.
//!
//! Return codes work with both tcx and clsact: `-1` is `TCX_NEXT` and `TC_ACT_UNSPEC`
//! (let the next program, or the default action, decide: pass), `2` is `TCX_DROP` and
//! `TC_ACT_SHOT`.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::classifier,
    maps::lpm_trie::Key as LpmKey,
    programs::TcContext,
};
use mycel_common::{
    flow::{
        FLOW_EVENT_CLOSED, FLOW_EVENT_DROP, FLOW_EVENT_NEW, FLOW_F_MIDSTREAM, FLOW_F_PROBE,
        FlowEvent, FlowKey, FlowValue,
    },
    mesh::MESH_HBONE_PORT,
    policy::{
        DIR_EGRESS, DIR_INGRESS, DROP_REASON_INVALID_IPV6_EXTENSION_HEADER,
        DROP_REASON_INVALID_L4_HEADER, DROP_REASON_INVALID_PACKET, DROP_REASON_INVALID_SOURCE_IP,
        DROP_REASON_MTLS_STRICT, DROP_REASON_NONE, DROP_REASON_POLICY_DEFAULT_DENY,
        DROP_REASON_POLICY_DENY, ENDPOINT_F_ENFORCE, ENDPOINT_F_MESH, ENDPOINT_F_MESH_STRICT,
        ENDPOINT_F_NODE_ALL, ENDPOINT_F_NODE_PROBES, EndpointInfo, IDENTITY_HOST, IDENTITY_WORLD,
        PolicyKey, VERDICT_ALLOW, VERDICT_DENY,
    },
    service::{PROTO_TCP, PROTO_UDP, v4_mapped},
    stats::{
        STAT_FLOW_EVENTS_LOST, STAT_FLOW_UPDATE_FAILED, STAT_MESH_STRICT_DROPPED, STAT_TC_DROPPED,
        STAT_TC_INVALID_DROPPED, STAT_TC_PROBE_EXEMPTED, STAT_TC_SPOOFED_DROPPED,
    },
};

use crate::maps::{
    ENDPOINTS, FLOW_EVENTS, FLOW_EVENTS_WAKEUP_BYTES, FLOWS, IPCACHE, NODE_CONFIG, POLICY, SOURCES,
    count,
};

/// `TCX_NEXT` / `TC_ACT_UNSPEC`: no objection, the packet goes on.
const PASS: i32 = -1;
/// `TCX_DROP` / `TC_ACT_SHOT`.
const DROP: i32 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers (next-header values).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_NONE: u8 = 59;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before the transport header, as Cilium's `IPV6_MAX_HEADERS`;
/// a chain that goes on past them is dropped.
pub const IPV6_MAX_HEADERS: usize = 4;
/// Past this offset no header is read: with [`IPV6_MAX_HEADERS`] headers of at most
/// 2 KiB each the chain ends well before it, and the bound keeps offsets small for the
/// verifier.
const MAX_L4_OFFSET: usize = 9_000;
/// cgroup levels searched for the pods' cgroup (kubelet's are 3 to 5 deep).
const MAX_CGROUP_LEVELS: i32 = 16;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// `FlowValue::fin_seen` bits.
const FIN_FWD: u8 = 1 << 0;
const FIN_REV: u8 = 1 << 1;

/// Packets arriving on the host-side interface: sent by the workload.
#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    handle(&ctx, DIR_EGRESS)
}

/// Packets leaving through the host-side interface: delivered to the workload.
#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    handle(&ctx, DIR_INGRESS)
}

/// What one packet is, after parsing.
struct Packet {
    /// The packet's own 5-tuple (source = this packet's sender); `direction` unset.
    tuple: FlowKey,
    tcp_flags: u8,
    /// An ICMP or ICMPv6 error message (destination unreachable, packet too big, time
    /// exceeded, parameter problem).
    icmp_error: bool,
    len: u64,
}

/// What the parser made of a frame.
enum Parsed {
    /// Judge and track it.
    Track,
    /// Let it pass untracked (non-IP, neighbour discovery, link-local multicast, non-first
    /// fragments); the source address was read for IP packets (`has_source`).
    Pass { has_source: bool },
    /// Drop it for this `DROP_REASON_*`; `has_source`: the tuple's addresses were read.
    Drop { reason: u8, has_source: bool },
}

/// `pkt_dir`: the packet's direction seen from the endpoint ([`DIR_INGRESS`] = to it).
#[inline(always)]
fn handle(ctx: &TcContext, pkt_dir: u8) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel passed; `ifindex` is at a constant
    // offset.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(ep) = ENDPOINTS.get_ptr(ifindex) else {
        // Not (yet) a workload the agent programmed.
        return PASS;
    };
    // SAFETY: a map value pointer returned by the lookup, valid for this program run.
    let ep: EndpointInfo = unsafe { *ep };
    let mut pkt = Packet {
        tuple: FlowKey {
            saddr_be: [0; 4],
            daddr_be: [0; 4],
            sport_be: 0,
            dport_be: 0,
            proto: 0,
            direction: 0,
            _pad: [0; 2],
        },
        tcp_flags: 0,
        icmp_error: false,
        len: u64::from(ctx.len()),
    };
    let parsed = parse(ctx, &mut pkt);
    let has_source = match parsed {
        Parsed::Track => true,
        Parsed::Pass { has_source } | Parsed::Drop { has_source, .. } => has_source,
    };
    if pkt_dir == DIR_EGRESS && has_source && !source_ok(ifindex, &pkt.tuple.saddr_be) {
        count(STAT_TC_SPOOFED_DROPPED);
        return refuse(ifindex, &ep, &pkt, pkt_dir, DROP_REASON_INVALID_SOURCE_IP);
    }
    match parsed {
        Parsed::Track => track(ctx, ifindex, &ep, &pkt, pkt_dir),
        Parsed::Pass { .. } => PASS,
        Parsed::Drop { reason, .. } => {
            count(STAT_TC_INVALID_DROPPED);
            refuse(ifindex, &ep, &pkt, pkt_dir, reason)
        }
    }
}

/// Whether a workload at `ifindex` may send from `saddr`: one of its addresses, or `::`
/// or `fe80::/10`.
#[inline(always)]
fn source_ok(ifindex: u32, saddr: &[u32; 4]) -> bool {
    let first = u32::from_be(saddr[0]);
    if first >> 22 == 0xfe80 >> 6 {
        return true;
    }
    if saddr[0] == 0 && saddr[1] == 0 && saddr[2] == 0 && saddr[3] == 0 {
        return true;
    }
    // SAFETY: a map value pointer from the lookup, valid for this program run.
    matches!(SOURCES.get_ptr(saddr), Some(v) if unsafe { *v } == ifindex)
}

/// Drops a packet that is not judged by policy (it could not be parsed, or its source is
/// forged): counts it and reports it as a drop event keyed by what was read of it.
#[inline(always)]
fn refuse(ifindex: u32, ep: &EndpointInfo, pkt: &Packet, pkt_dir: u8, reason: u8) -> i32 {
    let mut key = pkt.tuple;
    key.direction = pkt_dir;
    let now = unsafe { bpf_ktime_get_ns() };
    let mut v = flow_value(ep, pkt, now, VERDICT_DENY, reason, 0);
    let peer_addr = if pkt_dir == DIR_INGRESS {
        key.saddr_be
    } else {
        key.daddr_be
    };
    set_identities(&mut v, ep, &key, peer_identity(&peer_addr));
    emit(&key, &v, FLOW_EVENT_DROP, ifindex);
    dropped()
}

/// Counts a DROP verdict and returns it.
#[inline(always)]
fn dropped() -> i32 {
    count(STAT_TC_DROPPED);
    DROP
}

/// Reads a `T` at `off` bytes into the packet: straight from the linear packet data when
/// it holds those bytes (a bounds check against `data_end`, which the verifier tracks),
/// else through `bpf_skb_load_bytes`. Headers of veth traffic are linear, so the helper
/// call — which dominated the per-packet cost when every read used it — is the rare path.
#[inline(always)]
fn ld<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    if off > MAX_L4_OFFSET + 64 {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    let p = start + off;
    // At least two bytes: for a one-byte read LLVM turns `p + 1 <= end` into `p < end`,
    // which gives the verifier no readable range. Every one-byte field read here has more
    // header after it, so asking for one more byte costs nothing.
    let need = if core::mem::size_of::<T>() < 2 {
        2
    } else {
        core::mem::size_of::<T>()
    };
    if p + need <= end {
        // SAFETY: `p .. p + size_of::<T>()` lies inside the packet's linear data, as just
        // checked; the read is unaligned-safe.
        Some(unsafe { core::ptr::read_unaligned(p as *const T) })
    } else {
        ctx.load(off).ok()
    }
}

/// The IPv4 header fields read: version and IHL, total length, fragment field, protocol,
/// source, destination (the multi-byte ones in network order).
#[inline(always)]
fn ipv4_header(ctx: &TcContext) -> Option<(u8, u16, u16, u8, u32, u32)> {
    let vihl = ld::<u8>(ctx, ETH_HLEN)?;
    let tot_len = ld::<u16>(ctx, ETH_HLEN + 2)?;
    let frag = ld::<u16>(ctx, ETH_HLEN + 6)?;
    let proto = ld::<u8>(ctx, ETH_HLEN + 9)?;
    let saddr = ld::<u32>(ctx, ETH_HLEN + 12)?;
    let daddr = ld::<u32>(ctx, ETH_HLEN + 16)?;
    Some((vihl, tot_len, frag, proto, saddr, daddr))
}

/// The IPv6 fixed header fields read: version and traffic class byte, payload length,
/// next header, source, destination.
#[inline(always)]
fn ipv6_header(ctx: &TcContext) -> Option<(u8, u16, u8, [u32; 4], [u32; 4])> {
    let vtc = ld::<u8>(ctx, ETH_HLEN)?;
    let plen = ld::<u16>(ctx, ETH_HLEN + 4)?;
    let next = ld::<u8>(ctx, ETH_HLEN + 6)?;
    let saddr = ld::<[u32; 4]>(ctx, ETH_HLEN + 8)?;
    let daddr = ld::<[u32; 4]>(ctx, ETH_HLEN + 24)?;
    Some((vtc, plen, next, saddr, daddr))
}

/// Fills `pkt` from the frame; see the module documentation for what is accepted.
#[inline(always)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> Parsed {
    let bad = |reason| Parsed::Drop {
        reason,
        has_source: false,
    };
    let Some(ethertype) = ld::<u16>(ctx, 12) else {
        return Parsed::Pass { has_source: false };
    };
    let ethertype = u16::from_be(ethertype);
    let frame_len = ctx.len() as usize;
    let l4: usize;
    let ip_end: usize;
    if ethertype == ETH_P_IP {
        let Some((vihl, tot_len, frag, proto, saddr, daddr)) = ipv4_header(ctx) else {
            return bad(DROP_REASON_INVALID_PACKET);
        };
        pkt.tuple.proto = proto;
        pkt.tuple.saddr_be = v4_mapped(saddr);
        pkt.tuple.daddr_be = v4_mapped(daddr);
        let bad = |reason| Parsed::Drop {
            reason,
            has_source: true,
        };
        let ihl = usize::from(vihl & 0x0f) * 4;
        let tot_len = usize::from(u16::from_be(tot_len));
        if vihl >> 4 != 4 || ihl < IPV4_HLEN {
            return bad(DROP_REASON_INVALID_PACKET);
        }
        // A total length of 0 is a GSO packet past 64 KiB ("BIG TCP"): the frame's length
        // stands for it.
        ip_end = if tot_len == 0 {
            frame_len
        } else {
            ETH_HLEN + tot_len
        };
        if (tot_len != 0 && tot_len < ihl) || ip_end > frame_len || ETH_HLEN + ihl > ip_end {
            return bad(DROP_REASON_INVALID_PACKET);
        }
        let offset = u16::from_be(frag) & 0x1fff;
        if offset != 0 {
            // RFC 1858: a TCP fragment at offset 1 (8 bytes) rewrites the TCP flags of
            // the first; no sender makes one.
            if proto == PROTO_TCP && offset == 1 {
                return bad(DROP_REASON_INVALID_PACKET);
            }
            // A non-first fragment has no L4 header to judge. It passes untracked: the
            // first fragment carries the ports and gets the verdict, and the receiving
            // stack only reassembles datagrams whose first fragment arrived.
            return Parsed::Pass { has_source: true };
        }
        l4 = ETH_HLEN + ihl;
    } else if ethertype == ETH_P_IPV6 {
        let Some((vtc, plen, next, saddr, daddr)) = ipv6_header(ctx) else {
            return bad(DROP_REASON_INVALID_PACKET);
        };
        pkt.tuple.saddr_be = saddr;
        pkt.tuple.daddr_be = daddr;
        pkt.tuple.proto = next;
        let bad = |reason| Parsed::Drop {
            reason,
            has_source: true,
        };
        let plen = usize::from(u16::from_be(plen));
        // Payload length 0: a jumbogram or a GSO packet past 64 KiB; the frame's length
        // stands for it.
        ip_end = if plen == 0 {
            frame_len
        } else {
            ETH_HLEN + IPV6_HLEN + plen
        };
        if vtc >> 4 != 6 || ip_end > frame_len {
            return bad(DROP_REASON_INVALID_PACKET);
        }
        // Link-local multicast (ff02::/16: MLD reports, router and neighbour discovery) is
        // the link's own control traffic: never a workload's flow, never subject to policy.
        if u32::from_be(daddr[0]) >> 16 == 0xff02 {
            return Parsed::Pass { has_source: true };
        }
        let mut at = ETH_HLEN + IPV6_HLEN;
        let mut nh = next;
        let mut i = 0;
        while i < IPV6_MAX_HEADERS {
            i += 1;
            if at > MAX_L4_OFFSET {
                return bad(DROP_REASON_INVALID_IPV6_EXTENSION_HEADER);
            }
            let len = match nh {
                NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => match ld::<u8>(ctx, at + 1) {
                    Some(l) => (usize::from(l) + 1) * 8,
                    None => return bad(DROP_REASON_INVALID_IPV6_EXTENSION_HEADER),
                },
                NEXTHDR_AUTH => match ld::<u8>(ctx, at + 1) {
                    Some(l) => (usize::from(l) + 2) * 4,
                    None => return bad(DROP_REASON_INVALID_IPV6_EXTENSION_HEADER),
                },
                NEXTHDR_FRAGMENT => {
                    let Some(off) = ld::<u16>(ctx, at + 2) else {
                        return bad(DROP_REASON_INVALID_IPV6_EXTENSION_HEADER);
                    };
                    if u16::from_be(off) & 0xfff8 != 0 {
                        // As for IPv4: a non-first fragment passes untracked.
                        return Parsed::Pass { has_source: true };
                    }
                    8
                }
                _ => break,
            };
            let Some(n) = ld::<u8>(ctx, at) else {
                return bad(DROP_REASON_INVALID_IPV6_EXTENSION_HEADER);
            };
            nh = n;
            at += len;
            if at > ip_end {
                return bad(DROP_REASON_INVALID_IPV6_EXTENSION_HEADER);
            }
        }
        if matches!(
            nh,
            NEXTHDR_HOP
                | NEXTHDR_ROUTING
                | NEXTHDR_DEST
                | NEXTHDR_AUTH
                | NEXTHDR_FRAGMENT
                | NEXTHDR_NONE
        ) {
            // More headers than walked, or nothing after them.
            return bad(DROP_REASON_INVALID_IPV6_EXTENSION_HEADER);
        }
        pkt.tuple.proto = nh;
        l4 = at;
    } else {
        return Parsed::Pass { has_source: false };
    }
    if l4 > MAX_L4_OFFSET {
        return Parsed::Drop {
            reason: DROP_REASON_INVALID_L4_HEADER,
            has_source: true,
        };
    }
    let proto = pkt.tuple.proto;
    // The transport header must lie whole inside the datagram: also a first fragment
    // must hold it (RFC 7112), so that no later fragment can change what was judged.
    let need = match proto {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        _ => 0,
    };
    let truncated = Parsed::Drop {
        reason: DROP_REASON_INVALID_L4_HEADER,
        has_source: true,
    };
    if l4 + need > ip_end {
        return truncated;
    }
    if proto == PROTO_TCP || proto == PROTO_UDP {
        let Some(sport) = ld::<u16>(ctx, l4) else {
            return truncated;
        };
        let Some(dport) = ld::<u16>(ctx, l4 + 2) else {
            return truncated;
        };
        pkt.tuple.sport_be = sport;
        pkt.tuple.dport_be = dport;
        if proto == PROTO_TCP {
            let (Some(doff), Some(flags)) = (ld::<u8>(ctx, l4 + 12), ld::<u8>(ctx, l4 + 13)) else {
                return truncated;
            };
            if doff >> 4 < 5 {
                return truncated;
            }
            pkt.tcp_flags = flags;
        }
    } else if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        let Some(ty) = ld::<u8>(ctx, l4) else {
            return truncated;
        };
        if proto == PROTO_ICMPV6 {
            // Router/neighbour solicitation and advertisement, redirect (133..=137):
            // the link must work whatever the policy.
            if (133..=137).contains(&ty) {
                return Parsed::Pass { has_source: true };
            }
            // Destination unreachable, packet too big, time exceeded, parameter problem.
            pkt.icmp_error = (1..=4).contains(&ty);
        } else {
            // Destination unreachable, time exceeded, parameter problem.
            pkt.icmp_error = ty == 3 || ty == 11 || ty == 12;
        }
    }
    Parsed::Track
}

#[inline(always)]
fn reversed(k: &FlowKey, direction: u8) -> FlowKey {
    FlowKey {
        saddr_be: k.daddr_be,
        daddr_be: k.saddr_be,
        sport_be: k.dport_be,
        dport_be: k.sport_be,
        proto: k.proto,
        direction,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn other(dir: u8) -> u8 {
    if dir == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    }
}

#[inline(always)]
fn track(ctx: &TcContext, ifindex: u32, ep: &EndpointInfo, pkt: &Packet, pkt_dir: u8) -> i32 {
    let now = unsafe { bpf_ktime_get_ns() };
    // The packet as a flow's first packet: this packet's sender initiated, so the flow's
    // direction is the packet's.
    let mut fwd = pkt.tuple;
    fwd.direction = pkt_dir;
    // A reply: the endpoint's peer is the other way round and so is the flow's direction.
    let rev = reversed(&pkt.tuple, other(pkt_dir));
    if pkt.icmp_error {
        // ICMP errors belong to no flow of their own (ICMP flows are keyed without ports,
        // so an error would join, and be judged as, the peer's echo flow): each is judged
        // by itself, and none opens a flow.
        return new_flow(ctx, ifindex, ep, &fwd, pkt, now);
    }

    let (key, value, is_fwd) = if let Some(v) = FLOWS.get_ptr_mut(&fwd) {
        (fwd, v, true)
    } else if let Some(v) = FLOWS.get_ptr_mut(&rev) {
        (rev, v, false)
    } else {
        return new_flow(ctx, ifindex, ep, &fwd, pkt, now);
    };
    // SAFETY: a map value pointer from the lookup above, valid for this program run.
    let v = unsafe { &mut *value };

    let syn_only = key.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // A new connection on a tuple whose earlier connection closed: start over. So does a
    // SYN on a tuple first seen mid-stream (either way round): what was judged then was
    // not this connection's opening.
    if syn_only && ((is_fwd && v.closed != 0) || v.flags & FLOW_F_MIDSTREAM != 0) {
        if !is_fwd {
            let _ = FLOWS.remove(&rev);
        }
        return new_flow(ctx, ifindex, ep, &fwd, pkt, now);
    }

    if v.policy_revision != ep.policy_revision {
        // A flow first seen mid-stream is judged again as it was then: as an opening.
        let opening = (is_fwd && syn_only) || v.flags & FLOW_F_MIDSTREAM != 0;
        let was_probe = v.flags & FLOW_F_PROBE != 0;
        let (verdict, reason, policy_id, peer, _) =
            evaluate(ctx, ep, &key, opening, false, was_probe);
        let newly_denied = verdict == VERDICT_DENY && v.verdict != VERDICT_DENY;
        v.verdict = verdict;
        v.drop_reason = reason;
        v.policy_id = policy_id;
        v.policy_revision = ep.policy_revision;
        set_identities(v, ep, &key, peer);
        if newly_denied {
            account(v, pkt, is_fwd, now);
            emit(&key, v, FLOW_EVENT_DROP, ifindex);
            return dropped();
        }
    }

    account(v, pkt, is_fwd, now);
    if key.proto == PROTO_TCP && v.closed == 0 {
        if pkt.tcp_flags & TCP_FIN != 0 {
            v.fin_seen |= if is_fwd { FIN_FWD } else { FIN_REV };
        }
        if pkt.tcp_flags & TCP_RST != 0 || v.fin_seen == FIN_FWD | FIN_REV {
            v.closed = 1;
            emit(&key, v, FLOW_EVENT_CLOSED, ifindex);
        }
    }
    if v.verdict == VERDICT_DENY {
        dropped()
    } else {
        PASS
    }
}

/// Adds the packet to the flow's counters.
#[inline(always)]
fn account(v: &mut FlowValue, pkt: &Packet, is_fwd: bool, now: u64) {
    if is_fwd {
        add(&mut v.packets_fwd, 1);
        add(&mut v.bytes_fwd, pkt.len);
    } else {
        add(&mut v.packets_rev, 1);
        add(&mut v.bytes_rev, pkt.len);
    }
    v.tcp_flags |= pkt.tcp_flags;
    v.last_ns = now;
}

/// Atomic add: programs on several CPUs may count packets of the same flow.
#[inline(always)]
fn add(counter: &mut u64, n: u64) {
    // SAFETY: `counter` points into a map value, valid and aligned; the result is unused,
    // so LLVM emits the plain `lock xadd` every supported kernel accepts.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        );
    }
}

/// The identity of an address: the longest IPCACHE prefix holding it, else world.
#[inline(always)]
fn peer_identity(addr: &[u32; 4]) -> u32 {
    match IPCACHE.get(LpmKey::new(128, *addr)) {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    }
}

/// Whether the packet was sent by a kubelet probe, as `--node-traffic probes` recognises
/// one: it carries a local socket (it was originated on this node, not forwarded: a
/// packet that crossed into the node's namespace from a pod or the network has none, or
/// one in a pod's cgroup) whose cgroup is not below the pods' cgroup (hostNetwork pods
/// are below it, as every pod is; the kubelet is not). The caller checks the source is a
/// node address (IPCACHE says [`IDENTITY_HOST`]) and the protocol TCP.
#[inline(always)]
fn is_probe(ctx: &TcContext) -> bool {
    // SAFETY: `skb` is the context pointer the kernel passed to this TC program.
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if cgroup == 0 {
        return false;
    }
    let Some(cfg) = NODE_CONFIG.get(0) else {
        return false;
    };
    let pods = cfg.pods_cgroup_id;
    if pods == 0 {
        return false;
    }
    let mut level = 0;
    while level < MAX_CGROUP_LEVELS {
        // SAFETY: as above; the level is a plain integer the helper bounds itself.
        let ancestor = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) };
        if ancestor == pods {
            return false;
        }
        if ancestor == 0 {
            break;
        }
        level += 1;
    }
    true
}

/// Evaluates policy for a flow with key `key` at endpoint `ep`: (verdict, drop reason,
/// policy id, the peer's identity, whether it passed as a kubelet probe). `opening`: the
/// packet opens the flow (a new flow of any protocol, or a TCP SYN without ACK), which
/// mode STRICT refuses; `icmp_error`: an ICMP error, which STRICT lets through;
/// `was_probe`: the flow is one a probe opened.
#[inline(always)]
fn evaluate(
    ctx: &TcContext,
    ep: &EndpointInfo,
    key: &FlowKey,
    opening: bool,
    icmp_error: bool,
    was_probe: bool,
) -> (u8, u8, u32, u32, bool) {
    // The peer: the initiator for ingress flows, the responder for egress ones.
    let peer_addr = if key.direction == DIR_INGRESS {
        key.saddr_be
    } else {
        key.daddr_be
    };
    let peer = peer_identity(&peer_addr);
    if key.direction != DIR_INGRESS {
        return (VERDICT_ALLOW, DROP_REASON_NONE, 0, peer, false);
    }
    let hbone = key.proto == PROTO_TCP && key.dport_be == MESH_HBONE_PORT.to_be();
    if hbone && ep.flags & ENDPOINT_F_MESH != 0 {
        return (VERDICT_ALLOW, DROP_REASON_NONE, 0, peer, false);
    }
    let probe = key.proto == PROTO_TCP
        && peer == IDENTITY_HOST
        && ep.flags & ENDPOINT_F_NODE_PROBES != 0
        && (was_probe || (opening && is_probe(ctx)));
    let node_exempt = peer == IDENTITY_HOST && ep.flags & ENDPOINT_F_NODE_ALL != 0;
    if opening && ep.flags & ENDPOINT_F_MESH_STRICT != 0 && !icmp_error && !probe && !node_exempt {
        // Counted once per refused flow: its retransmissions hit the flow's cached verdict.
        count(STAT_MESH_STRICT_DROPPED);
        return (VERDICT_DENY, DROP_REASON_MTLS_STRICT, 0, peer, false);
    }
    let mut pk = PolicyKey {
        endpoint_id: ep.endpoint_id,
        peer_identity: peer,
        dport_be: key.dport_be,
        proto: key.proto,
        direction: DIR_INGRESS,
    };
    let mut hit = POLICY.get_ptr(&pk);
    if hit.is_none() {
        pk.dport_be = 0;
        hit = POLICY.get_ptr(&pk);
    }
    if hit.is_none() {
        pk.peer_identity = 0;
        pk.proto = 0;
        hit = POLICY.get_ptr(&pk);
    }
    let (verdict, reason, policy_id) = match hit {
        Some(p) => {
            // SAFETY: a map value pointer from the lookup above.
            let p = unsafe { *p };
            if p.verdict == VERDICT_DENY {
                // The agent writes the endpoint's default DENY (some ALLOW selects it and
                // none matched) with policy id 0; a DENY policy's entries carry its id.
                let reason = if p.policy_id == 0 {
                    DROP_REASON_POLICY_DEFAULT_DENY
                } else {
                    DROP_REASON_POLICY_DENY
                };
                (VERDICT_DENY, reason, p.policy_id)
            } else {
                (VERDICT_ALLOW, DROP_REASON_NONE, p.policy_id)
            }
        }
        None if ep.flags & ENDPOINT_F_ENFORCE != 0 => {
            (VERDICT_DENY, DROP_REASON_POLICY_DEFAULT_DENY, 0)
        }
        None => (VERDICT_ALLOW, DROP_REASON_NONE, 0),
    };
    if probe && reason != DROP_REASON_POLICY_DENY {
        // A probe passes unless a DENY policy names the node.
        if !was_probe {
            count(STAT_TC_PROBE_EXEMPTED);
        }
        return (VERDICT_ALLOW, DROP_REASON_NONE, 0, peer, true);
    }
    (verdict, reason, policy_id, peer, false)
}

#[inline(always)]
fn set_identities(v: &mut FlowValue, ep: &EndpointInfo, key: &FlowKey, peer: u32) {
    if key.direction == DIR_INGRESS {
        v.src_identity = peer;
        v.dst_identity = ep.identity;
    } else {
        v.src_identity = ep.identity;
        v.dst_identity = peer;
    }
}

#[inline(always)]
fn flow_value(
    ep: &EndpointInfo,
    pkt: &Packet,
    now: u64,
    verdict: u8,
    drop_reason: u8,
    policy_id: u32,
) -> FlowValue {
    FlowValue {
        packets_fwd: 1,
        bytes_fwd: pkt.len,
        packets_rev: 0,
        bytes_rev: 0,
        first_ns: now,
        last_ns: now,
        src_identity: 0,
        dst_identity: 0,
        policy_revision: ep.policy_revision,
        tcp_flags: pkt.tcp_flags,
        verdict,
        drop_reason,
        closed: 0,
        policy_id,
        fin_seen: 0,
        flags: 0,
        _pad: [0; 2],
    }
}

/// First packet of a flow (`key`: this packet's tuple and direction).
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    ifindex: u32,
    ep: &EndpointInfo,
    key: &FlowKey,
    pkt: &Packet,
    now: u64,
) -> i32 {
    // Every packet without a flow is judged as an opening one, whatever its TCP flags.
    let (verdict, drop_reason, policy_id, peer, probe) =
        evaluate(ctx, ep, key, true, pkt.icmp_error, false);
    let mut v = flow_value(ep, pkt, now, verdict, drop_reason, policy_id);
    if probe {
        v.flags |= FLOW_F_PROBE;
    }
    set_identities(&mut v, ep, key, peer);
    if pkt.icmp_error {
        // An error opens no flow: caching its verdict under the ICMP tuple (ports 0)
        // would let later echo requests of that peer skip STRICT.
        if verdict == VERDICT_DENY {
            emit(key, &v, FLOW_EVENT_DROP, ifindex);
            return dropped();
        }
        return PASS;
    }
    if key.proto == PROTO_TCP {
        if pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
            v.flags |= FLOW_F_MIDSTREAM;
        }
        if pkt.tcp_flags & TCP_RST != 0 {
            v.closed = 1;
        }
    }
    if FLOWS.insert(key, &v, 0).is_err() {
        count(STAT_FLOW_UPDATE_FAILED);
    }
    let kind = if verdict == VERDICT_DENY {
        FLOW_EVENT_DROP
    } else {
        FLOW_EVENT_NEW
    };
    emit(key, &v, kind, ifindex);
    if verdict == VERDICT_DENY {
        dropped()
    } else {
        PASS
    }
}

/// Puts an event on `FLOW_EVENTS`, written in place in the ring buffer; counts it as lost
/// when the ring buffer is full.
#[inline(always)]
fn emit(key: &FlowKey, value: &FlowValue, kind: u8, ifindex: u32) {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        count(STAT_FLOW_EVENTS_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, 8-byte aligned record of `FlowEvent`'s size; every
    // field is written before it is submitted.
    unsafe {
        (*ev).key = *key;
        (*ev).value = *value;
        (*ev).kind = kind;
        (*ev).direction = key.direction;
        (*ev)._pad = [0; 2];
        (*ev).ifindex = ifindex;
    }
    // Waking the agent for every event costs a context switch per connection on a busy
    // node; the agent drains the ring on a short timer instead, and is woken early only
    // when the ring fills up.
    let flags = if FLOW_EVENTS.query(BPF_RB_AVAIL_DATA as u64) > FLOW_EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}
