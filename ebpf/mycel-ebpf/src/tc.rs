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
//! a new plaintext connection (a SYN without ACK to any other port) is dropped unless it
//! comes from the node itself (kubelet probes, and the proxy when it delivers from the
//! host); connections that were established before the mode changed are left alone.
//!
//! Parsing: Ethernet, then IPv4 (options skipped by IHL) or IPv6 (the fixed header and a
//! fragment header right after it; with other extension headers the next-header value is
//! taken as the protocol and the ports as 0), then TCP or UDP ports. Other protocols
//! (ICMP, …) have ports 0. Non-first fragments (v4 and v6), non-IP frames (ARP), IPv6
//! neighbour discovery and link-local multicast (ff02::/16) pass untouched.
//!
//! Return codes work with both tcx and clsact: `-1` is `TCX_NEXT` and `TC_ACT_UNSPEC`
//! (let the next program, or the default action, decide: pass), `2` is `TCX_DROP` and
//! `TC_ACT_SHOT`.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    maps::lpm_trie::Key as LpmKey,
    programs::TcContext,
};
use mycel_common::{
    flow::{FLOW_EVENT_CLOSED, FLOW_EVENT_DROP, FLOW_EVENT_NEW, FlowEvent, FlowKey, FlowValue},
    mesh::MESH_HBONE_PORT,
    policy::{
        DIR_EGRESS, DIR_INGRESS, DROP_REASON_MTLS_STRICT, DROP_REASON_NONE,
        DROP_REASON_POLICY_DEFAULT_DENY, DROP_REASON_POLICY_DENY, ENDPOINT_F_ENFORCE,
        ENDPOINT_F_MESH, ENDPOINT_F_MESH_STRICT, EndpointInfo, IDENTITY_HOST, IDENTITY_WORLD,
        PolicyKey, VERDICT_ALLOW, VERDICT_DENY,
    },
    service::{PROTO_TCP, PROTO_UDP, v4_mapped},
    stats::{STAT_FLOW_EVENTS_LOST, STAT_FLOW_UPDATE_FAILED, STAT_MESH_STRICT_DROPPED},
};

use crate::maps::{
    ENDPOINTS, FLOW_EVENTS, FLOW_EVENTS_WAKEUP_BYTES, FLOWS, IPCACHE, POLICY, count,
};

/// `TCX_NEXT` / `TC_ACT_UNSPEC`: no objection, the packet goes on.
const PASS: i32 = -1;
/// `TCX_DROP` / `TC_ACT_SHOT`.
const DROP: i32 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const PROTO_ICMPV6: u8 = 58;
/// IPv6 fragment header (next-header value).
const IPPROTO_FRAGMENT: u8 = 44;

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
    len: u64,
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
    let Some(pkt) = parse(ctx) else {
        return PASS;
    };
    track(ifindex, &ep, &pkt, pkt_dir)
}

/// Reads a `T` at `off` bytes into the packet: straight from the linear packet data when
/// it holds those bytes (a bounds check against `data_end`, which the verifier tracks),
/// else through `bpf_skb_load_bytes`. Headers of veth traffic are linear, so the helper
/// call — which dominated the per-packet cost when every read used it — is the rare path.
#[inline(always)]
fn ld<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
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

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(ld::<u16>(ctx, 12)?);
    let mut tuple = FlowKey {
        saddr_be: [0; 4],
        daddr_be: [0; 4],
        sport_be: 0,
        dport_be: 0,
        proto: 0,
        direction: 0,
        _pad: [0; 2],
    };
    let l4: usize;
    if ethertype == ETH_P_IP {
        let vihl: u8 = ld(ctx, ETH_HLEN)?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        let frag: u16 = u16::from_be(ld(ctx, ETH_HLEN + 6)?);
        // A non-first fragment has no L4 header to judge. It passes untracked: the first
        // fragment carries the ports and gets the verdict, and the receiving stack only
        // reassembles datagrams whose first fragment arrived.
        if frag & 0x1fff != 0 {
            return None;
        }
        tuple.proto = ld(ctx, ETH_HLEN + 9)?;
        tuple.saddr_be = v4_mapped(ld(ctx, ETH_HLEN + 12)?);
        tuple.daddr_be = v4_mapped(ld(ctx, ETH_HLEN + 16)?);
        l4 = ETH_HLEN + ihl;
    } else if ethertype == ETH_P_IPV6 {
        tuple.proto = ld(ctx, ETH_HLEN + 6)?;
        tuple.saddr_be = ld(ctx, ETH_HLEN + 8)?;
        tuple.daddr_be = ld(ctx, ETH_HLEN + 24)?;
        // Link-local multicast (ff02::/16: MLD reports, router and neighbour discovery) is
        // the link's own control traffic: never a workload's flow, never subject to policy.
        if u32::from_be(tuple.daddr_be[0]) >> 16 == 0xff02 {
            return None;
        }
        let mut at = ETH_HLEN + IPV6_HLEN;
        if tuple.proto == IPPROTO_FRAGMENT {
            // A fragment header right after the fixed header: as for IPv4, a non-first
            // fragment passes untracked and the first is judged by what follows it.
            let offset = u16::from_be(ld(ctx, at + 2)?) & 0xfff8;
            if offset != 0 {
                return None;
            }
            tuple.proto = ld(ctx, at)?;
            at += 8;
        }
        l4 = at;
        if tuple.proto == PROTO_ICMPV6 {
            // Router/neighbour solicitation and advertisement, redirect (133..=137):
            // the link must work whatever the policy.
            let icmp_type: u8 = ld(ctx, l4)?;
            if (133..=137).contains(&icmp_type) {
                return None;
            }
        }
    } else {
        return None;
    }
    let mut tcp_flags = 0;
    if tuple.proto == PROTO_TCP || tuple.proto == PROTO_UDP {
        tuple.sport_be = ld(ctx, l4)?;
        tuple.dport_be = ld(ctx, l4 + 2)?;
        if tuple.proto == PROTO_TCP {
            tcp_flags = ld(ctx, l4 + 13)?;
        }
    }
    Some(Packet {
        tuple,
        tcp_flags,
        len: u64::from(ctx.len()),
    })
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
fn track(ifindex: u32, ep: &EndpointInfo, pkt: &Packet, pkt_dir: u8) -> i32 {
    let now = unsafe { bpf_ktime_get_ns() };
    // The packet as a flow's first packet: this packet's sender initiated, so the flow's
    // direction is the packet's.
    let mut fwd = pkt.tuple;
    fwd.direction = pkt_dir;
    // A reply: the endpoint's peer is the other way round and so is the flow's direction.
    let rev = reversed(&pkt.tuple, other(pkt_dir));

    let (key, value, is_fwd) = if let Some(v) = FLOWS.get_ptr_mut(&fwd) {
        (fwd, v, true)
    } else if let Some(v) = FLOWS.get_ptr_mut(&rev) {
        (rev, v, false)
    } else {
        return new_flow(ifindex, ep, &fwd, pkt, now);
    };
    // SAFETY: a map value pointer from the lookup above, valid for this program run.
    let v = unsafe { &mut *value };

    // A new connection on a tuple whose earlier connection closed: start over.
    let syn_only = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if is_fwd && syn_only && v.closed != 0 {
        return new_flow(ifindex, ep, &fwd, pkt, now);
    }

    if v.policy_revision != ep.policy_revision {
        let (verdict, reason, policy_id, peer) = evaluate(ep, &key, is_fwd && syn_only);
        let newly_denied = verdict == VERDICT_DENY && v.verdict != VERDICT_DENY;
        v.verdict = verdict;
        v.drop_reason = reason;
        v.policy_id = policy_id;
        v.policy_revision = ep.policy_revision;
        set_identities(v, ep, &key, peer);
        if newly_denied {
            account(v, pkt, is_fwd, now);
            emit(&key, v, FLOW_EVENT_DROP, ifindex);
            return DROP;
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
        DROP
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

/// Evaluates policy for a flow with key `key` at endpoint `ep`: (verdict, drop reason,
/// policy id, the peer's identity). `opening`: the packet is the initiator's SYN without
/// ACK, which mode STRICT refuses.
#[inline(always)]
fn evaluate(ep: &EndpointInfo, key: &FlowKey, opening: bool) -> (u8, u8, u32, u32) {
    // The peer: the initiator for ingress flows, the responder for egress ones.
    let peer_addr = if key.direction == DIR_INGRESS {
        key.saddr_be
    } else {
        key.daddr_be
    };
    let peer = match IPCACHE.get(LpmKey::new(128, peer_addr)) {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    };
    if key.direction != DIR_INGRESS {
        return (VERDICT_ALLOW, DROP_REASON_NONE, 0, peer);
    }
    if key.proto == PROTO_TCP {
        if key.dport_be == MESH_HBONE_PORT.to_be() {
            if ep.flags & ENDPOINT_F_MESH != 0 {
                return (VERDICT_ALLOW, DROP_REASON_NONE, 0, peer);
            }
        } else if opening && ep.flags & ENDPOINT_F_MESH_STRICT != 0 && peer != IDENTITY_HOST {
            // Counted once per refused connection: its retransmitted SYNs hit the flow's
            // cached verdict.
            count(STAT_MESH_STRICT_DROPPED);
            return (VERDICT_DENY, DROP_REASON_MTLS_STRICT, 0, peer);
        }
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
    match hit {
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
                (VERDICT_DENY, reason, p.policy_id, peer)
            } else {
                (VERDICT_ALLOW, DROP_REASON_NONE, p.policy_id, peer)
            }
        }
        None if ep.flags & ENDPOINT_F_ENFORCE != 0 => {
            (VERDICT_DENY, DROP_REASON_POLICY_DEFAULT_DENY, 0, peer)
        }
        None => (VERDICT_ALLOW, DROP_REASON_NONE, 0, peer),
    }
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

/// First packet of a flow (`key`: this packet's tuple and direction).
#[inline(always)]
fn new_flow(ifindex: u32, ep: &EndpointInfo, key: &FlowKey, pkt: &Packet, now: u64) -> i32 {
    let opening = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let (verdict, drop_reason, policy_id, peer) = evaluate(ep, key, opening);
    let mut v = FlowValue {
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
        _pad: [0; 3],
    };
    set_identities(&mut v, ep, key, peer);
    if key.proto == PROTO_TCP && pkt.tcp_flags & TCP_RST != 0 {
        v.closed = 1;
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
    if verdict == VERDICT_DENY { DROP } else { PASS }
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
