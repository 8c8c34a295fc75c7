//! The TC programs: identity-based policy and per-flow accounting, first with
//! `BPF_PROG_TEST_RUN` on crafted packets, then on a real veth between two pods.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use mycel_agent::datapath::{
    Datapath, MapSizes, PolicyContent, TcMode, dump_flows, parse_flow_event, spawn_flow_reader,
};
use mycel_common::{
    flow::{FLOW_EVENT_DROP, FLOW_EVENT_NEW, FLOW_F_MIDSTREAM, FlowEvent, FlowKey, FlowValue},
    policy::{
        DIR_EGRESS, DIR_INGRESS, DROP_REASON_INVALID_IPV6_EXTENSION_HEADER,
        DROP_REASON_INVALID_L4_HEADER, DROP_REASON_INVALID_PACKET, DROP_REASON_INVALID_SOURCE_IP,
        DROP_REASON_MTLS_STRICT, DROP_REASON_NONE, DROP_REASON_POLICY_DEFAULT_DENY,
        DROP_REASON_POLICY_DENY, ENDPOINT_F_ENFORCE, ENDPOINT_F_MESH, ENDPOINT_F_MESH_STRICT,
        ENDPOINT_F_NODE_ALL, ENDPOINT_F_NODE_PROBES, EndpointInfo, IDENTITY_FIRST_CIDR,
        IDENTITY_HOST, IDENTITY_WORLD, NodeConfig, PolicyKey, PolicyValue, VERDICT_ALLOW,
        VERDICT_DENY,
    },
    service::{PROTO_TCP, PROTO_UDP, v4_mapped},
};
use mycel_tests::{Node, netns, require_root};

/// What the programs return to let a packet go on (`TCX_NEXT` / `TC_ACT_UNSPEC`).
const PASS: u32 = u32::MAX;
const DROP: u32 = 2;

fn endpoint(id: u32, identity: u32) -> EndpointInfo {
    EndpointInfo {
        endpoint_id: id,
        identity,
        flags: ENDPOINT_F_ENFORCE,
        policy_revision: 0,
    }
}

fn rule(endpoint_id: u32, peer: u32, port: u16, verdict: u8) -> (PolicyKey, PolicyValue) {
    entry(endpoint_id, peer, port, PROTO_TCP, verdict, 42)
}

/// A `POLICY` entry: `peer` 0 = any peer, `port` 0 = any port, `proto` 0 = any protocol.
fn entry(
    endpoint_id: u32,
    peer: u32,
    port: u16,
    proto: u8,
    verdict: u8,
    policy_id: u32,
) -> (PolicyKey, PolicyValue) {
    (
        PolicyKey {
            endpoint_id,
            peer_identity: peer,
            dport_be: port.to_be(),
            proto,
            direction: DIR_INGRESS,
        },
        PolicyValue {
            verdict,
            _pad: [0; 3],
            policy_id,
        },
    )
}

/// Ethernet + IPv4 + TCP SYN.
fn syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    frame(
        IpAddr::from(src),
        IpAddr::from(dst),
        L4::Tcp {
            sport,
            dport,
            flags: TCP_SYN,
        },
    )
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// The transport part of a crafted packet.
#[derive(Clone, Copy, Debug)]
enum L4 {
    /// A 20-byte TCP header with these flags.
    Tcp { sport: u16, dport: u16, flags: u8 },
    /// An 8-byte UDP header and 4 bytes of payload.
    Udp { sport: u16, dport: u16 },
    /// An ICMP (over IPv4) or ICMPv6 (over IPv6) message of this type, 8 bytes.
    Icmp { ty: u8 },
}

impl L4 {
    fn proto(self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Icmp { .. } if v6 => PROTO_ICMPV6,
            L4::Icmp { .. } => PROTO_ICMP,
        }
    }

    fn ports(self) -> (u16, u16) {
        match self {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            L4::Icmp { .. } => (0, 0),
        }
    }

    fn bytes(self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
            }
            L4::Udp { sport, dport } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&[0, 12, 0, 0, b'p', b'i', b'n', b'g']);
            }
            L4::Icmp { ty } => b.extend_from_slice(&[ty, 0, 0, 0, 0, 1, 0, 1]),
        }
        b
    }
}

/// ICMP echo request and reply types.
const ICMP_ECHO: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

fn echo(v6: bool) -> L4 {
    L4::Icmp {
        ty: if v6 { ICMPV6_ECHO } else { ICMP_ECHO },
    }
}

fn echo_reply(v6: bool) -> L4 {
    L4::Icmp {
        ty: if v6 {
            ICMPV6_ECHO_REPLY
        } else {
            ICMP_ECHO_REPLY
        },
    }
}

/// An Ethernet frame carrying `l4` from `src` to `dst` (both IPv4 or both IPv6). The
/// programs read no checksums, so they are left zero.
fn frame(src: IpAddr, dst: IpAddr, l4: L4) -> Vec<u8> {
    let payload = l4.bytes();
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&[0x08, 0x00]);
            let total = u16::try_from(20 + payload.len()).expect("small packet");
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0, 1, 0x40, 0, 64, l4.proto(false), 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x86, 0xdd]);
            let len = u16::try_from(payload.len()).expect("small packet");
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&[l4.proto(true), 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("{src} and {dst} are of different families"),
    }
    p.extend_from_slice(&payload);
    p
}

/// An address as `FlowKey` and `IPCACHE` hold it: network order, IPv4 mapped.
fn addr_be(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(a) => v4_mapped(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => {
            let o = a.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

/// The `FLOWS` key of a flow whose first packet went `src` → `dst` with `l4`, seen from
/// the endpoint in `direction`.
fn flow_key(src: IpAddr, dst: IpAddr, l4: L4, direction: u8) -> FlowKey {
    let (sport, dport) = l4.ports();
    FlowKey {
        saddr_be: addr_be(src),
        daddr_be: addr_be(dst),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto: l4.proto(src.is_ipv6()),
        direction,
        _pad: [0; 2],
    }
}

/// A node, and a datapath loaded for it with `content` in its policy maps.
fn loaded(content: &PolicyContent) -> (Node, Datapath) {
    let node = Node::new();
    let mut dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    dp.policy.apply(content).expect("apply policy");
    (node, dp)
}

/// Test runs see the loopback device of the caller's namespace.
const TEST_RUN_IFINDEX: u32 = 1;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP address")
}

#[test]
fn test_run_allows_and_denies_by_policy() {
    require_root!();
    let node = Node::new();
    let mut dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    // Test runs see the loopback device of the caller's namespace: ifindex 1.
    let content = PolicyContent {
        ipcache: BTreeMap::from([(("10.1.0.1".parse().expect("ip"), 32), 300)]),
        endpoints: BTreeMap::from([(1, endpoint(7, 400))]),
        policy: BTreeMap::from([rule(7, 300, 8080, VERDICT_ALLOW)]),
        sources: BTreeMap::from([(ip("10.1.0.2"), 1)]),
        ..PolicyContent::default()
    };
    let stats = dp.policy.apply(&content).expect("apply policy");
    assert_eq!(stats.policy_writes, 1);
    assert_eq!(dp.policy.endpoints()[&1].policy_revision, 1);

    let allowed = dp
        .tc_test_run("tc_to_pod", &syn([10, 1, 0, 1], [10, 1, 0, 2], 40000, 8080))
        .expect("test run");
    assert_eq!(allowed, PASS);
    let denied = dp
        .tc_test_run("tc_to_pod", &syn([10, 1, 0, 1], [10, 1, 0, 2], 40001, 9090))
        .expect("test run");
    assert_eq!(denied, DROP);
    // An unknown peer (WORLD) is denied by default, too.
    let world = dp
        .tc_test_run("tc_to_pod", &syn([10, 9, 0, 1], [10, 1, 0, 2], 40002, 8080))
        .expect("test run");
    assert_eq!(world, DROP);
    // Traffic the endpoint starts is allowed.
    let egress = dp
        .tc_test_run(
            "tc_from_pod",
            &syn([10, 1, 0, 2], [10, 9, 0, 1], 40003, 9090),
        )
        .expect("test run");
    assert_eq!(egress, PASS);
    // A second SYN of the allowed flow hits the cached verdict and is counted.
    dp.tc_test_run("tc_to_pod", &syn([10, 1, 0, 1], [10, 1, 0, 2], 40000, 8080))
        .expect("test run");

    let flows = dump_flows(&node.bpffs).expect("dump flows");
    let find = |sport: u16| {
        flows
            .iter()
            .find(|(k, _)| k.sport_be == sport.to_be())
            .unwrap_or_else(|| panic!("no flow from port {sport}: {flows:?}"))
            .1
    };
    let a = find(40000);
    assert_eq!(
        (a.verdict, a.packets_fwd, a.src_identity, a.dst_identity),
        (VERDICT_ALLOW, 2, 300, 400)
    );
    assert_eq!(a.policy_id, 42);
    let d = find(40001);
    assert_eq!((d.verdict, d.packets_fwd), (VERDICT_DENY, 1));
    assert_eq!(d.drop_reason, DROP_REASON_POLICY_DEFAULT_DENY);
    assert_eq!(find(40002).src_identity, IDENTITY_WORLD);
    assert_eq!(find(40003).verdict, VERDICT_ALLOW);
    let key = flows
        .iter()
        .find(|(k, _)| k.sport_be == 40000u16.to_be())
        .map(|(k, _)| *k)
        .expect("flow");
    assert_eq!(key.saddr_be, v4_mapped(u32::from_ne_bytes([10, 1, 0, 1])));
    assert_eq!(key.direction, DIR_INGRESS);
    dp.detach_and_unpin().expect("detach");
}

/// Endpoint and peers of the test-run scenarios: the endpoint (identity [`EP_IDENTITY`],
/// `POLICY` id [`EP`]) at 10.1.0.2 / fd00:1::2; peers with identities [`ALLOWED`],
/// [`DENIED`] and [`OTHER`] at .1, .3 and .4.
const EP: u32 = 7;
const EP_IDENTITY: u32 = 400;
const ALLOWED: u32 = 300;
const DENIED: u32 = 301;
const OTHER: u32 = 302;
/// `policy_id`s of the ALLOW and the DENY entries.
const ALLOW_ID: u32 = 11;
const DENY_ID: u32 = 12;

/// (endpoint, allowed peer, denied peer, other peer) addresses of one family.
fn scenario_addrs(v6: bool) -> [IpAddr; 4] {
    if v6 {
        ["fd00:1::2", "fd00:1::1", "fd00:1::3", "fd00:1::4"].map(ip)
    } else {
        ["10.1.0.2", "10.1.0.1", "10.1.0.3", "10.1.0.4"].map(ip)
    }
}

/// The endpoint enforces: ALLOWED may reach TCP and UDP port 8080 and send ICMP; DENIED is
/// denied by a DENY policy (any port, every protocol listed); everything else falls to the
/// endpoint's default DENY (E, 0, 0, 0) with policy id 0, as the agent writes it.
fn scenario() -> PolicyContent {
    let mut ipcache = BTreeMap::new();
    for v6 in [false, true] {
        let [ep, allowed, denied, other] = scenario_addrs(v6);
        let len = if v6 { 128 } else { 32 };
        ipcache.insert((ep, len), EP_IDENTITY);
        ipcache.insert((allowed, len), ALLOWED);
        ipcache.insert((denied, len), DENIED);
        ipcache.insert((other, len), OTHER);
    }
    let mut policy = BTreeMap::from([entry(EP, 0, 0, 0, VERDICT_DENY, 0)]);
    for proto in [PROTO_TCP, PROTO_UDP] {
        policy.extend([
            entry(EP, ALLOWED, 8080, proto, VERDICT_ALLOW, ALLOW_ID),
            entry(EP, DENIED, 0, proto, VERDICT_DENY, DENY_ID),
        ]);
    }
    for proto in [PROTO_ICMP, PROTO_ICMPV6] {
        policy.extend([
            entry(EP, ALLOWED, 0, proto, VERDICT_ALLOW, ALLOW_ID),
            entry(EP, DENIED, 0, proto, VERDICT_DENY, DENY_ID),
        ]);
    }
    PolicyContent {
        ipcache,
        endpoints: BTreeMap::from([(TEST_RUN_IFINDEX, endpoint(EP, EP_IDENTITY))]),
        policy,
        sources: BTreeMap::from([
            (scenario_addrs(false)[0], TEST_RUN_IFINDEX),
            (scenario_addrs(true)[0], TEST_RUN_IFINDEX),
        ]),
        ..PolicyContent::default()
    }
}

fn flow_of(flows: &[(FlowKey, FlowValue)], key: &FlowKey) -> FlowValue {
    flows
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no flow {key:?} in {flows:#?}"))
}

#[test]
fn test_run_ipv4_ipv6_tcp_udp_icmp_allowed_denied_and_default_denied() {
    require_root!();
    let (node, dp) = loaded(&scenario());
    /// A packet from `scenario_addrs()[peer]` to the endpoint and what must become of it.
    struct Case {
        what: &'static str,
        peer: usize,
        l4: L4,
        want: u32,
        verdict: u8,
        reason: u8,
        policy_id: u32,
        identity: u32,
    }
    let mut runs = Vec::new();
    for v6 in [false, true] {
        let addrs = scenario_addrs(v6);
        let tcp = |sport, dport| L4::Tcp {
            sport,
            dport,
            flags: TCP_SYN,
        };
        let udp = |sport, dport| L4::Udp { sport, dport };
        let allow = |what, l4| Case {
            what,
            peer: 1,
            l4,
            want: PASS,
            verdict: VERDICT_ALLOW,
            reason: DROP_REASON_NONE,
            policy_id: ALLOW_ID,
            identity: ALLOWED,
        };
        let deny = |what, l4| Case {
            what,
            peer: 2,
            l4,
            want: DROP,
            verdict: VERDICT_DENY,
            reason: DROP_REASON_POLICY_DENY,
            policy_id: DENY_ID,
            identity: DENIED,
        };
        let default_deny = |what, peer, l4, identity| Case {
            what,
            peer,
            l4,
            want: DROP,
            verdict: VERDICT_DENY,
            reason: DROP_REASON_POLICY_DEFAULT_DENY,
            policy_id: 0,
            identity,
        };
        let cases = [
            allow("TCP to an allowed port", tcp(41000, 8080)),
            allow("UDP to an allowed port", udp(41001, 8080)),
            allow("ICMP echo from an allowed peer", echo(v6)),
            deny("TCP from a denied peer", tcp(41002, 8080)),
            deny("UDP from a denied peer", udp(41003, 8080)),
            deny("ICMP echo from a denied peer", echo(v6)),
            default_deny("TCP to a port no ALLOW names", 1, tcp(41004, 9090), ALLOWED),
            default_deny("UDP to a port no ALLOW names", 1, udp(41005, 9090), ALLOWED),
            default_deny("TCP from a peer no ALLOW names", 3, tcp(41006, 8080), OTHER),
            default_deny("UDP from a peer no ALLOW names", 3, udp(41007, 8080), OTHER),
            default_deny("ICMP echo from a peer no ALLOW names", 3, echo(v6), OTHER),
        ];
        for c in cases {
            let (src, dst) = (addrs[c.peer], addrs[0]);
            let got = dp
                .tc_test_run("tc_to_pod", &frame(src, dst, c.l4))
                .expect("test run");
            assert_eq!(got, c.want, "{} over IPv{}", c.what, if v6 { 6 } else { 4 });
            runs.push((flow_key(src, dst, c.l4, DIR_INGRESS), c, v6));
        }
    }
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    assert_eq!(flows.len(), runs.len(), "one flow per packet: {flows:#?}");
    for (key, c, v6) in &runs {
        let v = flow_of(&flows, key);
        assert_eq!(
            (
                v.verdict,
                v.drop_reason,
                v.policy_id,
                v.src_identity,
                v.dst_identity
            ),
            (c.verdict, c.reason, c.policy_id, c.identity, EP_IDENTITY),
            "flow of {} over IPv{}",
            c.what,
            if *v6 { 6 } else { 4 }
        );
        assert_eq!((v.packets_fwd, v.packets_rev), (1, 0));
    }
}

#[test]
fn test_run_return_traffic_is_allowed_under_enforcement() {
    require_root!();
    let (node, dp) = loaded(&scenario());
    let mut checked = Vec::new();
    for v6 in [false, true] {
        let [ep, allowed, _, other] = scenario_addrs(v6);
        // The endpoint starts connections to a peer no ALLOW names; the replies come back
        // through the other program and pass, although a connection the peer started
        // would be denied.
        for (out, back) in [
            (
                L4::Tcp {
                    sport: 42000,
                    dport: 9090,
                    flags: TCP_SYN,
                },
                L4::Tcp {
                    sport: 9090,
                    dport: 42000,
                    flags: TCP_SYN | TCP_ACK,
                },
            ),
            (
                L4::Udp {
                    sport: 42001,
                    dport: 53,
                },
                L4::Udp {
                    sport: 53,
                    dport: 42001,
                },
            ),
            (echo(v6), echo_reply(v6)),
        ] {
            let what = format!("{out:?} over IPv{}", if v6 { 6 } else { 4 });
            let sent = dp
                .tc_test_run("tc_from_pod", &frame(ep, other, out))
                .expect("test run");
            assert_eq!(sent, PASS, "{what} from the endpoint");
            for _ in 0..2 {
                let reply = dp
                    .tc_test_run("tc_to_pod", &frame(other, ep, back))
                    .expect("test run");
                assert_eq!(reply, PASS, "reply to {what}");
            }
            checked.push((flow_key(ep, other, out, DIR_EGRESS), 1, 2, OTHER, what));
        }
        // Not a reply: the same peer from another port is a new connection, denied.
        let stray = L4::Tcp {
            sport: 9091,
            dport: 42000,
            flags: TCP_SYN | TCP_ACK,
        };
        assert_eq!(
            dp.tc_test_run("tc_to_pod", &frame(other, ep, stray))
                .expect("test run"),
            DROP
        );
        // The endpoint's replies to an allowed connection pass and count on its flow.
        let syn = L4::Tcp {
            sport: 42002,
            dport: 8080,
            flags: TCP_SYN,
        };
        let syn_ack = L4::Tcp {
            sport: 8080,
            dport: 42002,
            flags: TCP_SYN | TCP_ACK,
        };
        assert_eq!(
            dp.tc_test_run("tc_to_pod", &frame(allowed, ep, syn))
                .expect("test run"),
            PASS
        );
        assert_eq!(
            dp.tc_test_run("tc_from_pod", &frame(ep, allowed, syn_ack))
                .expect("test run"),
            PASS
        );
        checked.push((
            flow_key(allowed, ep, syn, DIR_INGRESS),
            1,
            1,
            ALLOWED,
            format!("allowed connection over IPv{}", if v6 { 6 } else { 4 }),
        ));
    }
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    for (key, fwd, rev, peer, what) in &checked {
        let v = flow_of(&flows, key);
        assert_eq!(
            (v.verdict, v.packets_fwd, v.packets_rev),
            (VERDICT_ALLOW, *fwd, *rev),
            "{what}: {v:?}"
        );
        let ids = if key.direction == DIR_EGRESS {
            (EP_IDENTITY, *peer)
        } else {
            (*peer, EP_IDENTITY)
        };
        assert_eq!((v.src_identity, v.dst_identity), ids, "{what}");
    }
    // Replies joined their flows: no flow was keyed the reply's way round, except the
    // stray packet's two (one per IP family).
    let ingress_from_other = flows
        .iter()
        .filter(|(k, _)| k.direction == DIR_INGRESS && k.dport_be == 42000u16.to_be())
        .count();
    assert_eq!(ingress_from_other, 2, "{flows:#?}");
    assert_eq!(flows.len(), checked.len() + 2, "{flows:#?}");
}

#[test]
fn test_run_ip_block_identities_match_peers_inside_their_prefix() {
    require_root!();
    let cidr4 = IDENTITY_FIRST_CIDR;
    let cidr6 = IDENTITY_FIRST_CIDR + 1;
    let content = PolicyContent {
        ipcache: BTreeMap::from([
            ((ip("10.2.0.0"), 16), cidr4),
            ((ip("fd00:2::"), 32), cidr6),
            // A workload inside the block keeps its own identity (longest prefix).
            ((ip("10.2.0.9"), 32), OTHER),
        ]),
        endpoints: BTreeMap::from([(TEST_RUN_IFINDEX, endpoint(EP, EP_IDENTITY))]),
        policy: BTreeMap::from([
            entry(EP, 0, 0, 0, VERDICT_DENY, 0),
            entry(EP, cidr4, 8080, PROTO_TCP, VERDICT_ALLOW, ALLOW_ID),
            entry(EP, cidr6, 8080, PROTO_TCP, VERDICT_ALLOW, ALLOW_ID),
        ]),
        ..PolicyContent::default()
    };
    let (node, dp) = loaded(&content);
    let syn = L4::Tcp {
        sport: 43000,
        dport: 8080,
        flags: TCP_SYN,
    };
    let cases = [
        ("10.2.3.4", "10.1.0.2", PASS, cidr4),
        ("10.2.255.255", "10.1.0.2", PASS, cidr4),
        ("10.3.0.1", "10.1.0.2", DROP, IDENTITY_WORLD),
        ("10.2.0.9", "10.1.0.2", DROP, OTHER),
        ("fd00:2:ffff::5", "fd00:1::2", PASS, cidr6),
        ("fd00:3::5", "fd00:1::2", DROP, IDENTITY_WORLD),
    ];
    for (peer, ep, want, _) in cases {
        let got = dp
            .tc_test_run("tc_to_pod", &frame(ip(peer), ip(ep), syn))
            .expect("test run");
        assert_eq!(got, want, "SYN from {peer}");
    }
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    for (peer, ep, want, identity) in cases {
        let v = flow_of(&flows, &flow_key(ip(peer), ip(ep), syn, DIR_INGRESS));
        assert_eq!(v.src_identity, identity, "identity of {peer}");
        let (verdict, reason) = if want == PASS {
            (VERDICT_ALLOW, DROP_REASON_NONE)
        } else {
            (VERDICT_DENY, DROP_REASON_POLICY_DEFAULT_DENY)
        };
        assert_eq!((v.verdict, v.drop_reason), (verdict, reason), "{peer}");
    }
}

/// `frame` cut to `len` bytes with its IP length field (IPv4 total length, IPv6 payload
/// length) saying so: a packet whose transport header is short, not a torn frame.
fn cut(p: &[u8], len: usize) -> Vec<u8> {
    let mut p = p[..len].to_vec();
    if p[12..14] == [0x08, 0x00] {
        let total = u16::try_from(len - 14).expect("small");
        p[16..18].copy_from_slice(&total.to_be_bytes());
    } else {
        let payload = u16::try_from(len - 54).expect("small");
        p[18..20].copy_from_slice(&payload.to_be_bytes());
    }
    p
}

/// An IPv6 `frame` with extension headers between the fixed and the transport header:
/// each `(next-header value of the extension, its bytes)`; the bytes' first octet (its own
/// next header) is filled in.
fn with_ext_headers(p: &[u8], headers: &[ExtHeader]) -> Vec<u8> {
    let mut out = p[..54].to_vec();
    let transport = p[20];
    let mut ext = Vec::new();
    for (i, (_, bytes)) in headers.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = headers.get(i + 1).map_or(transport, |(nh, _)| *nh);
        ext.extend_from_slice(&h);
    }
    if let Some((first, _)) = headers.first() {
        out[20] = *first;
    }
    let len = u16::from_be_bytes([out[18], out[19]]) + u16::try_from(ext.len()).expect("small");
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&ext);
    out.extend_from_slice(&p[54..]);
    out
}

/// Hop-by-hop, destination options or routing header of `8 * (units + 1)` bytes.
fn ext_opts(units: u8) -> Vec<u8> {
    let mut h = vec![0u8; 8 * (usize::from(units) + 1)];
    h[1] = units;
    // PadN over the rest, so that the options are well formed.
    h[2] = 1;
    h[3] = u8::try_from(h.len() - 4).expect("small");
    h
}

/// A fragment header (offset in bytes, more fragments to come).
fn ext_fragment(offset: u16) -> Vec<u8> {
    let mut h = vec![0, 0];
    h.extend_from_slice(&(offset | 1).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 9]);
    h
}

/// An authentication header of `(len + 2) * 4` bytes.
fn ext_auth(len: u8) -> Vec<u8> {
    let mut h = vec![0u8; (usize::from(len) + 2) * 4];
    h[1] = len;
    h
}

/// An extension header: its next-header value and its bytes.
type ExtHeader = (u8, Vec<u8>);

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// The flow events the programs have put on the ring buffer since the last call.
struct Events(aya::maps::RingBuf<aya::maps::MapData>);

impl Events {
    fn take(dp: &mut Datapath) -> Events {
        Events(dp.take_flow_events().expect("ring buffer"))
    }

    fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.0.next() {
            out.push(parse_flow_event(&item).expect("a flow event"));
        }
        out
    }
}

fn counter(node: &Node, name: &str) -> u64 {
    node.kernel_counter(name)
}

/// Packets the programs cannot judge are dropped, counted and reported with a reason;
/// they leave no flow behind. Non-IP frames, neighbour discovery, link-local multicast and
/// non-first fragments pass untracked. (Before, every unparsable frame passed.)
#[test]
fn test_run_packets_that_cannot_be_judged_are_dropped_with_a_reason() {
    require_root!();
    // No policy at all: whatever passed before passes unless the parser refuses it.
    let content = PolicyContent {
        endpoints: BTreeMap::from([(TEST_RUN_IFINDEX, endpoint(EP, EP_IDENTITY))]),
        policy: BTreeMap::from([entry(EP, 0, 0, 0, VERDICT_ALLOW, 0)]),
        ..PolicyContent::default()
    };
    let (node, mut dp) = loaded(&content);
    let mut events = Events::take(&mut dp);
    let (v4a, v4b) = (ip("10.1.0.1"), ip("10.1.0.2"));
    let (v6a, v6b) = (ip("fd00:1::1"), ip("fd00:1::2"));
    let tcp = L4::Tcp {
        sport: 44000,
        dport: 8080,
        flags: TCP_SYN,
    };
    let udp = L4::Udp {
        sport: 44001,
        dport: 8080,
    };
    let tcp4 = frame(v4a, v4b, tcp);
    let tcp6 = frame(v6a, v6b, tcp);
    let udp4 = frame(v4a, v4b, udp);
    let icmp6 = frame(v6a, v6b, echo(true));
    let with = |p: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = p.to_vec();
        f(&mut p);
        p
    };
    let ihl4 = with(&tcp4, &|p| p[14] = 0x44);
    let version5 = with(&tcp4, &|p| p[14] = 0x55);
    let short_total = with(&tcp4, &|p| p[16..18].copy_from_slice(&10u16.to_be_bytes()));
    let long_total = with(&tcp4, &|p| p[16..18].copy_from_slice(&100u16.to_be_bytes()));
    let doff4 = with(&tcp4, &|p| p[14 + 20 + 12] = 0x40);
    let version7 = with(&tcp6, &|p| p[14] = 0x70);
    let long_payload = with(&tcp6, &|p| p[18..20].copy_from_slice(&100u16.to_be_bytes()));
    // The tiny-fragment attack: a first fragment with only the ports of the TCP header.
    let tiny_first4 = fragment_v4(cut(&tcp4, 14 + 20 + 8), 0);
    // RFC 1858: a second fragment at offset 8 that would rewrite the flags.
    let overlap4 = fragment_v4(tcp4.clone(), 8);
    let tiny_first6 = cut(&fragment_v6(tcp6.clone(), 0), 14 + 40 + 8 + 8);
    let five_headers = with_ext_headers(
        &tcp6,
        &[
            (NEXTHDR_HOP, ext_opts(0)),
            (NEXTHDR_DEST, ext_opts(0)),
            (NEXTHDR_ROUTING, ext_opts(0)),
            (NEXTHDR_DEST, ext_opts(0)),
            (NEXTHDR_DEST, ext_opts(0)),
        ],
    );
    // A hop-by-hop header that claims 64 bytes in a packet with 8 after it.
    let long_ext = with(
        &with_ext_headers(&icmp6, &[(NEXTHDR_HOP, ext_opts(0))]),
        &|p| p[14 + 40 + 1] = 7,
    );
    let no_next = with(
        &with_ext_headers(&tcp6, &[(NEXTHDR_DEST, ext_opts(0))]),
        &|p| p[14 + 40] = 59,
    );
    let reason_invalid = DROP_REASON_INVALID_PACKET;
    let reason_l4 = DROP_REASON_INVALID_L4_HEADER;
    let reason_ext = DROP_REASON_INVALID_IPV6_EXTENSION_HEADER;
    let dropped: Vec<(&str, Vec<u8>, u8)> = vec![
        ("IPv4 with IHL 4", ihl4, reason_invalid),
        ("IPv4 with version 5", version5, reason_invalid),
        (
            "IPv4 total length shorter than its header",
            short_total,
            reason_invalid,
        ),
        (
            "IPv4 total length past the frame",
            long_total,
            reason_invalid,
        ),
        (
            "IPv4 frame cut inside TCP",
            tcp4[..47].to_vec(),
            reason_invalid,
        ),
        ("IPv4 TCP with 2 bytes of header", cut(&tcp4, 36), reason_l4),
        ("IPv4 TCP cut before the flags", cut(&tcp4, 47), reason_l4),
        (
            "IPv4 TCP with 19 bytes of header",
            cut(&tcp4, 53),
            reason_l4,
        ),
        ("IPv4 TCP with data offset 4", doff4, reason_l4),
        ("IPv4 UDP with 3 bytes of header", cut(&udp4, 37), reason_l4),
        (
            "IPv4 first fragment with 8 bytes of TCP",
            tiny_first4,
            reason_l4,
        ),
        ("IPv4 TCP fragment at offset 8", overlap4, reason_invalid),
        ("IPv6 with version 7", version7, reason_invalid),
        (
            "IPv6 payload length past the frame",
            long_payload,
            reason_invalid,
        ),
        ("IPv6 TCP cut before the flags", cut(&tcp6, 67), reason_l4),
        ("IPv6 ICMPv6 without its type", cut(&icmp6, 54), reason_l4),
        (
            "IPv6 first fragment with 8 bytes of TCP",
            tiny_first6,
            reason_l4,
        ),
        ("IPv6 with five extension headers", five_headers, reason_ext),
        (
            "IPv6 extension header past the packet",
            long_ext,
            reason_ext,
        ),
        ("IPv6 with no next header", no_next, reason_ext),
    ];
    for (what, f, reason) in &dropped {
        events.drain();
        let got = dp
            .tc_test_run("tc_to_pod", f)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, DROP, "{what} ({} bytes), to the endpoint", f.len());
        let evs = events.drain();
        assert!(
            matches!(evs.as_slice(), [e] if e.kind == FLOW_EVENT_DROP && e.value.drop_reason == *reason),
            "{what}: one drop event with reason {reason}: {evs:?}"
        );
        let got = dp.tc_test_run("tc_from_pod", f).expect("test run");
        assert_eq!(got, DROP, "{what} ({} bytes), from the endpoint", f.len());
    }
    events.drain();
    assert_eq!(
        counter(&node, "tc_invalid_dropped"),
        dropped.len() as u64,
        "to the endpoint (from it, the forged source is caught first)"
    );

    let mut arp = tcp4.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut vlan = tcp4.clone();
    vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    let nd = frame(v6a, v6b, L4::Icmp { ty: 135 });
    // An MLD report: to ff02::16, with a hop-by-hop router alert.
    let mld = with_ext_headers(
        &frame(v6a, ip("ff02::16"), L4::Icmp { ty: 143 }),
        &[(NEXTHDR_HOP, ext_opts(0))],
    );
    let passed: Vec<(&str, Vec<u8>)> = vec![
        ("ARP", arp),
        ("802.1Q tag in the frame", vlan),
        ("IPv6 neighbour solicitation", nd),
        ("MLD report with a hop-by-hop header", mld),
        (
            "IPv4 UDP fragment at offset 24",
            fragment_v4(udp4.clone(), 24),
        ),
        (
            "IPv4 TCP fragment at offset 16",
            fragment_v4(tcp4.clone(), 16),
        ),
        (
            "IPv6 TCP fragment at offset 8",
            fragment_v6(tcp6.clone(), 8),
        ),
        (
            "IPv6 UDP fragment after a hop-by-hop header",
            with_ext_headers(
                &frame(v6a, v6b, udp),
                &[
                    (NEXTHDR_HOP, ext_opts(0)),
                    (NEXTHDR_FRAGMENT, ext_fragment(16)),
                ],
            ),
        ),
    ];
    for (what, f) in &passed {
        let got = dp
            .tc_test_run("tc_to_pod", f)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, PASS, "{what} ({} bytes), to the endpoint", f.len());
    }
    // Frames the kernel may refuse to test-run (too short for Ethernet or the IP header);
    // where one runs, an IP one is dropped.
    for (what, f) in [
        ("Ethernet header only, IPv4 ethertype", &tcp4[..14]),
        ("Ethernet header only, IPv6 ethertype", &tcp6[..14]),
        ("IPv4 header cut after 10 bytes", &tcp4[..24]),
        ("IPv6 header cut before the destination's end", &tcp6[..53]),
    ] {
        if let Ok(got) = dp.tc_test_run("tc_to_pod", f) {
            assert_eq!(got, DROP, "{what}");
        }
    }
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    assert!(
        flows.is_empty(),
        "refused or untracked frames made flows: {flows:#?}"
    );
    // The same packets whole are judged and tracked.
    for f in [&tcp4, &tcp6, &udp4, &icmp6] {
        assert_eq!(dp.tc_test_run("tc_to_pod", f).expect("test run"), PASS);
    }
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    assert_eq!(flows.len(), 4, "{flows:#?}");
}

/// IPv6 extension headers are walked: TCP behind hop-by-hop, destination options,
/// routing, AH and a first-fragment header is judged as TCP with its ports. (Before, it
/// was "protocol 0, ports 0", which no DENY for TCP covers.)
#[test]
fn test_run_ipv6_extension_headers_are_walked_to_the_transport_header() {
    require_root!();
    let mut content = scenario();
    // The endpoint's default allows: DENIED is denied by its entries for TCP and UDP only,
    // so a packet taken for any other protocol (as extension headers made TCP look
    // before) walks around the DENY.
    let (default_key, _) = entry(EP, 0, 0, 0, VERDICT_DENY, 0);
    content
        .policy
        .insert(default_key, entry(EP, 0, 0, 0, VERDICT_ALLOW, 0).1);
    let (node, dp) = loaded(&content);
    let [ep, allowed, denied, _] = scenario_addrs(true);
    let chains: Vec<(&str, Vec<ExtHeader>)> = vec![
        ("hop-by-hop", vec![(NEXTHDR_HOP, ext_opts(0))]),
        (
            "destination options of 16 bytes",
            vec![(NEXTHDR_DEST, ext_opts(1))],
        ),
        ("routing", vec![(NEXTHDR_ROUTING, ext_opts(0))]),
        ("AH", vec![(NEXTHDR_AUTH, ext_auth(4))]),
        (
            "hop-by-hop, then a first fragment",
            vec![
                (NEXTHDR_HOP, ext_opts(0)),
                (NEXTHDR_FRAGMENT, ext_fragment(0)),
            ],
        ),
        (
            "four headers",
            vec![
                (NEXTHDR_HOP, ext_opts(0)),
                (NEXTHDR_DEST, ext_opts(0)),
                (NEXTHDR_ROUTING, ext_opts(0)),
                (NEXTHDR_FRAGMENT, ext_fragment(0)),
            ],
        ),
    ];
    for (i, (what, chain)) in chains.iter().enumerate() {
        let sport = 46_000 + u16::try_from(i).expect("few") * 2;
        let syn = |sport| L4::Tcp {
            sport,
            dport: 8080,
            flags: TCP_SYN,
        };
        let run = |src, l4| {
            dp.tc_test_run("tc_to_pod", &with_ext_headers(&frame(src, ep, l4), chain))
                .expect("test run")
        };
        assert_eq!(
            run(allowed, syn(sport)),
            PASS,
            "{what}: allowed peer to 8080"
        );
        assert_eq!(run(denied, syn(sport + 1)), DROP, "{what}: denied peer");
        let flows = dump_flows(&node.bpffs).expect("dump flows");
        let a = flow_of(&flows, &flow_key(allowed, ep, syn(sport), DIR_INGRESS));
        assert_eq!(
            (a.verdict, a.policy_id),
            (VERDICT_ALLOW, ALLOW_ID),
            "{what}"
        );
        let d = flow_of(&flows, &flow_key(denied, ep, syn(sport + 1), DIR_INGRESS));
        assert_eq!(
            (d.verdict, d.drop_reason, d.policy_id),
            (VERDICT_DENY, DROP_REASON_POLICY_DENY, DENY_ID),
            "{what}: the DENY for TCP decided"
        );
    }
}

/// A STRICT, mesh endpoint, with policy that allows everything.
fn strict_endpoint(flags: u32) -> PolicyContent {
    let mut content = scenario();
    content.policy = BTreeMap::from([entry(EP, 0, 0, 0, VERDICT_ALLOW, 0)]);
    content.endpoints = BTreeMap::from([(
        TEST_RUN_IFINDEX,
        EndpointInfo {
            endpoint_id: EP,
            identity: EP_IDENTITY,
            flags,
            policy_revision: 0,
        },
    )]);
    content
}

/// A TCP packet without SYN opens no flow a later SYN could join: it is judged as an
/// opening (STRICT drops it), and a SYN on its tuple, either way round, is judged afresh.
/// (Before, a flagless or ACK packet was cached as allowed with STRICT skipped, and the SYN
/// after it passed.)
#[test]
fn test_run_tcp_without_syn_opens_no_flow_a_syn_can_reuse() {
    require_root!();
    let (node, dp) = loaded(&strict_endpoint(ENDPOINT_F_MESH | ENDPOINT_F_MESH_STRICT));
    for v6 in [false, true] {
        let [ep, _, _, peer] = scenario_addrs(v6);
        for (i, flags) in [0u8, TCP_ACK, 0x01, 0x04, 0x11, TCP_SYN | TCP_ACK]
            .into_iter()
            .enumerate()
        {
            let sport = 47_000 + u16::try_from(i).expect("few");
            let pkt = |flags| L4::Tcp {
                sport,
                dport: 8080,
                flags,
            };
            let what = format!("flags {flags:#04x} over IPv{}", if v6 { 6 } else { 4 });
            let run = |l4| {
                dp.tc_test_run("tc_to_pod", &frame(peer, ep, l4))
                    .expect("run")
            };
            assert_eq!(
                run(pkt(flags)),
                DROP,
                "{what}: STRICT judges it as an opening"
            );
            assert_eq!(run(pkt(TCP_SYN)), DROP, "{what}, then a SYN");
            let flows = dump_flows(&node.bpffs).expect("dump flows");
            let v = flow_of(&flows, &flow_key(peer, ep, pkt(TCP_SYN), DIR_INGRESS));
            assert_eq!(v.drop_reason, DROP_REASON_MTLS_STRICT, "{what}");
        }
        // The endpoint's own flagless packet out, then the peer's SYN the other way round:
        // not a reply to anything the endpoint opened.
        let out = L4::Tcp {
            sport: 48_000,
            dport: 80,
            flags: 0,
        };
        assert_eq!(
            dp.tc_test_run("tc_from_pod", &frame(ep, peer, out))
                .expect("run"),
            PASS
        );
        let syn_back = L4::Tcp {
            sport: 80,
            dport: 48_000,
            flags: TCP_SYN,
        };
        assert_eq!(
            dp.tc_test_run("tc_to_pod", &frame(peer, ep, syn_back))
                .expect("run"),
            DROP,
            "a SYN against a flow first seen mid-stream is judged afresh"
        );
    }
    // Without STRICT, a mid-stream packet is tracked but flagged; the SYN after it starts
    // a fresh flow.
    let (node, dp) = loaded(&strict_endpoint(ENDPOINT_F_MESH));
    let [ep, _, _, peer] = scenario_addrs(false);
    let pkt = |flags| L4::Tcp {
        sport: 47_100,
        dport: 8080,
        flags,
    };
    let run = |l4| {
        dp.tc_test_run("tc_to_pod", &frame(peer, ep, l4))
            .expect("run")
    };
    assert_eq!(run(pkt(TCP_ACK)), PASS);
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    let v = flow_of(&flows, &flow_key(peer, ep, pkt(TCP_ACK), DIR_INGRESS));
    assert_eq!(v.flags & FLOW_F_MIDSTREAM, FLOW_F_MIDSTREAM);
    assert_eq!(run(pkt(TCP_SYN)), PASS);
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    let v = flow_of(&flows, &flow_key(peer, ep, pkt(TCP_SYN), DIR_INGRESS));
    assert_eq!((v.flags, v.packets_fwd), (0, 1), "a fresh flow: {v:?}");
}

/// STRICT lets only HBONE open a flow, whatever the protocol; replies to the endpoint's own
/// flows, ICMP errors and neighbour discovery still pass. (Before, UDP, ICMP and other
/// protocols reached STRICT workloads in plaintext.)
#[test]
fn test_run_strict_refuses_every_plaintext_protocol() {
    require_root!();
    let (node, dp) = loaded(&strict_endpoint(ENDPOINT_F_MESH | ENDPOINT_F_MESH_STRICT));
    for v6 in [false, true] {
        let [ep, _, _, peer] = scenario_addrs(v6);
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let to = |l4| {
            dp.tc_test_run("tc_to_pod", &frame(peer, ep, l4))
                .expect("run")
        };
        let udp = L4::Udp {
            sport: 49_000,
            dport: 53,
        };
        assert_eq!(to(udp), DROP, "{fam}: UDP");
        assert_eq!(to(echo(v6)), DROP, "{fam}: ICMP echo");
        let mut sctp = frame(peer, ep, udp);
        sctp[if v6 { 20 } else { 23 }] = 132;
        assert_eq!(
            dp.tc_test_run("tc_to_pod", &sctp).expect("run"),
            DROP,
            "{fam}: SCTP"
        );
        let hbone = L4::Tcp {
            sport: 49_001,
            dport: 15008,
            flags: TCP_SYN,
        };
        assert_eq!(to(hbone), PASS, "{fam}: HBONE");
        // ICMP errors: destination unreachable / packet too big; they open no flow, so an
        // echo request after one is still refused.
        let error = L4::Icmp {
            ty: if v6 { 2 } else { 3 },
        };
        assert_eq!(to(error), PASS, "{fam}: ICMP error");
        assert_eq!(to(echo(v6)), DROP, "{fam}: echo after an error");
        let flows = dump_flows(&node.bpffs).expect("dump flows");
        let v = flow_of(&flows, &flow_key(peer, ep, udp, DIR_INGRESS));
        assert_eq!(v.drop_reason, DROP_REASON_MTLS_STRICT, "{fam}");
        // Replies to the endpoint's own UDP flow pass.
        let out = L4::Udp {
            sport: 49_002,
            dport: 53,
        };
        let back = L4::Udp {
            sport: 53,
            dport: 49_002,
        };
        assert_eq!(
            dp.tc_test_run("tc_from_pod", &frame(ep, peer, out))
                .expect("run"),
            PASS
        );
        assert_eq!(to(back), PASS, "{fam}: reply to the endpoint's UDP");
    }
    let nd = frame(ip("fd00:1::4"), ip("fd00:1::2"), L4::Icmp { ty: 135 });
    assert_eq!(dp.tc_test_run("tc_to_pod", &nd).expect("run"), PASS, "ND");
    // PERMISSIVE: the same UDP passes.
    let (_node, dp) = loaded(&strict_endpoint(ENDPOINT_F_MESH));
    let [ep, _, _, peer] = scenario_addrs(false);
    let udp = L4::Udp {
        sport: 49_000,
        dport: 53,
    };
    assert_eq!(
        dp.tc_test_run("tc_to_pod", &frame(peer, ep, udp))
            .expect("run"),
        PASS
    );
}

/// A workload may send only from its own addresses (and `::`, `fe80::/10`). (Before, any
/// source passed and was judged as the workload it named.)
#[test]
fn test_run_sources_other_than_the_workloads_are_dropped() {
    require_root!();
    let mut content = scenario();
    // Another workload's address, on another interface.
    content.sources.insert(ip("10.1.0.3"), 99);
    let (node, mut dp) = loaded(&content);
    let mut events = Events::take(&mut dp);
    let udp = L4::Udp {
        sport: 50_000,
        dport: 53,
    };
    let cases = [
        ("its own IPv4 address", "10.1.0.2", "10.9.0.1", PASS),
        ("its own IPv6 address", "fd00:1::2", "fd00:9::1", PASS),
        ("another workload's address", "10.1.0.3", "10.9.0.1", DROP),
        ("an unknown IPv4 address", "10.1.0.77", "10.9.0.1", DROP),
        ("an unknown IPv6 address", "fd00:1::77", "fd00:9::1", DROP),
        ("the unspecified address", "::", "fd00:9::1", PASS),
        ("a link-local address", "fe80::1234", "fe80::1", PASS),
    ];
    for (what, src, dst, want) in cases {
        events.drain();
        let got = dp
            .tc_test_run("tc_from_pod", &frame(ip(src), ip(dst), udp))
            .expect("run");
        assert_eq!(got, want, "from {what}");
        if want == DROP {
            let evs = events.drain();
            assert!(
                matches!(evs.as_slice(), [e] if e.value.drop_reason == DROP_REASON_INVALID_SOURCE_IP),
                "{what}: {evs:?}"
            );
        }
    }
    // Non-first fragments and neighbour advertisements are checked too.
    let frag = fragment_v4(frame(ip("10.1.0.77"), ip("10.9.0.1"), udp), 24);
    assert_eq!(dp.tc_test_run("tc_from_pod", &frag).expect("run"), DROP);
    let na = frame(ip("fd00:1::77"), ip("fd00:1::1"), L4::Icmp { ty: 136 });
    assert_eq!(dp.tc_test_run("tc_from_pod", &na).expect("run"), DROP);
    assert_eq!(counter(&node, "tc_spoofed_dropped"), 5);
    // Addresses written ahead (before an interface's programs are replaced) count at once;
    // the next full write removes what the content no longer names.
    let late = frame(ip("10.1.0.78"), ip("10.9.0.1"), udp);
    assert_eq!(
        dp.policy
            .add_sources(&BTreeMap::from([(ip("10.1.0.78"), TEST_RUN_IFINDEX)]))
            .expect("add"),
        1
    );
    assert_eq!(dp.tc_test_run("tc_from_pod", &late).expect("run"), PASS);
    let stats = dp.policy.apply(&content).expect("apply");
    assert_eq!(stats.source_deletes, 1);
    assert_eq!(dp.tc_test_run("tc_from_pod", &late).expect("run"), DROP);
    assert_eq!(counter(&node, "tc_spoofed_dropped"), 6);
    // The spoofed packets opened no flow.
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    assert!(
        flows
            .iter()
            .all(|(k, _)| k.saddr_be == addr_be(ip("10.1.0.2"))
                || k.saddr_be == addr_be(ip("fd00:1::2"))
                || k.saddr_be == addr_be(ip("::"))
                || k.saddr_be == addr_be(ip("fe80::1234"))
                || k.saddr_be == addr_be(ip("10.1.0.78"))),
        "{flows:#?}"
    );
}

/// The cgroup v2 id of a cgroup directory: its inode number.
fn cgroup_id(dir: &std::path::Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())),
    )
}

/// Node traffic to a STRICT endpoint. A test run's packet carries a socket of the test
/// process, like a packet a node process sends: with the pods' cgroup elsewhere it is a
/// kubelet probe; with the pods' cgroup above the test process (the root) it is a
/// hostNetwork pod's. (Before, every packet from a node address passed STRICT.)
#[test]
fn test_run_node_traffic_probes_all_and_none() {
    require_root!();
    let host = ip("10.1.0.9");
    let syn = L4::Tcp {
        sport: 51_000,
        dport: 8080,
        flags: TCP_SYN,
    };
    let udp = L4::Udp {
        sport: 51_001,
        dport: 53,
    };
    let ep = ip("10.1.0.2");
    let setup = |flags: u32,
                 pods_cgroup: Option<&std::path::Path>,
                 policy: Vec<(PolicyKey, PolicyValue)>| {
        let mut content = strict_endpoint(ENDPOINT_F_MESH | ENDPOINT_F_MESH_STRICT | flags);
        content.ipcache.insert((host, 32), IDENTITY_HOST);
        content.node = NodeConfig {
            pods_cgroup_id: pods_cgroup.map_or(1, cgroup_id),
        };
        if !policy.is_empty() {
            content.policy = policy.into_iter().collect();
        }
        loaded(&content)
    };
    let run = |dp: &Datapath, l4| {
        dp.tc_test_run("tc_to_pod", &frame(host, ep, l4))
            .expect("run")
    };
    // `probes`, the test process outside the pods' cgroup: a kubelet probe.
    let outside = Node::new();
    let (node, dp) = setup(ENDPOINT_F_NODE_PROBES, Some(&outside.cgroup), vec![]);
    assert_eq!(run(&dp, syn), PASS, "probe under STRICT");
    assert_eq!(counter(&node, "tc_probe_exempted"), 1);
    assert_eq!(run(&dp, udp), DROP, "probes are TCP");
    // A probe passes an endpoint's default deny, not a DENY naming the node.
    let (_node, mut dp) = setup(
        ENDPOINT_F_NODE_PROBES | ENDPOINT_F_ENFORCE,
        Some(&outside.cgroup),
        vec![entry(EP, 0, 0, 0, VERDICT_DENY, 0)],
    );
    assert_eq!(run(&dp, syn), PASS, "probe under default deny");
    // A policy change judges the probe's connection again as a probe: it stays, until a
    // DENY names the node.
    let ack = L4::Tcp {
        sport: 51_000,
        dport: 8080,
        flags: TCP_ACK,
    };
    let mut content = strict_endpoint(
        ENDPOINT_F_MESH | ENDPOINT_F_MESH_STRICT | ENDPOINT_F_NODE_PROBES | ENDPOINT_F_ENFORCE,
    );
    content.ipcache.insert((host, 32), IDENTITY_HOST);
    content.node = NodeConfig {
        pods_cgroup_id: cgroup_id(&outside.cgroup),
    };
    content.policy = BTreeMap::from([
        entry(EP, 0, 0, 0, VERDICT_DENY, 0),
        entry(EP, ALLOWED, 0, PROTO_TCP, VERDICT_ALLOW, ALLOW_ID),
    ]);
    let stats = dp.policy.apply(&content).expect("apply");
    assert_eq!(stats.revisions_bumped, 1);
    assert_eq!(
        run(&dp, ack),
        PASS,
        "the probe's connection after a policy change"
    );
    content.policy.extend([entry(
        EP,
        IDENTITY_HOST,
        0,
        PROTO_TCP,
        VERDICT_DENY,
        DENY_ID,
    )]);
    dp.policy.apply(&content).expect("apply");
    assert_eq!(
        run(&dp, ack),
        DROP,
        "the probe's connection after a DENY of the node"
    );
    let (_node, dp) = setup(
        ENDPOINT_F_NODE_PROBES,
        Some(&outside.cgroup),
        vec![
            entry(EP, 0, 0, 0, VERDICT_ALLOW, 0),
            entry(EP, IDENTITY_HOST, 0, PROTO_TCP, VERDICT_DENY, DENY_ID),
        ],
    );
    assert_eq!(run(&dp, syn), DROP, "probe against a DENY of the node");
    // `probes`, the process inside the pods' cgroup (a hostNetwork pod): refused.
    let (_node, dp) = setup(ENDPOINT_F_NODE_PROBES, None, vec![]);
    assert_eq!(run(&dp, syn), DROP, "hostNetwork pod under STRICT");
    // `none`: refused.
    let (_node, dp) = setup(0, Some(&outside.cgroup), vec![]);
    assert_eq!(run(&dp, syn), DROP, "none");
    // `all`: every protocol from the node passes STRICT.
    let (_node, dp) = setup(ENDPOINT_F_NODE_ALL, None, vec![]);
    assert_eq!(run(&dp, syn), PASS, "all: TCP");
    assert_eq!(run(&dp, udp), PASS, "all: UDP");
}

/// Many random and mutated frames through both programs: every answer is PASS or DROP,
/// no run fails (but for frames too short for the kernel's own checks), and the counters
/// agree with the verdicts. Stands in for a fuzz target of the parser.
#[test]
fn test_run_random_and_mutated_frames_get_consistent_verdicts() {
    require_root!();
    let mut content = scenario();
    content
        .endpoints
        .get_mut(&TEST_RUN_IFINDEX)
        .expect("ep")
        .flags |= ENDPOINT_F_MESH | ENDPOINT_F_MESH_STRICT;
    let (node, mut dp) = loaded(&content);
    let mut events = Events::take(&mut dp);
    let mut seed: u64 = 0x6d79_6365_6c21;
    let mut next = move || {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut bases = Vec::new();
    for v6 in [false, true] {
        let [ep, allowed, denied, other] = scenario_addrs(v6);
        for peer in [allowed, denied, other] {
            for l4 in [
                L4::Tcp {
                    sport: 52_000,
                    dport: 8080,
                    flags: TCP_SYN,
                },
                L4::Tcp {
                    sport: 52_001,
                    dport: 15008,
                    flags: TCP_ACK,
                },
                L4::Udp {
                    sport: 52_002,
                    dport: 8080,
                },
                echo(v6),
                L4::Icmp { ty: 3 },
            ] {
                bases.push(frame(peer, ep, l4));
                bases.push(frame(ep, peer, l4));
            }
        }
        if !v6 {
            continue;
        }
        bases.push(with_ext_headers(
            &frame(
                allowed,
                ep,
                L4::Udp {
                    sport: 1,
                    dport: 8080,
                },
            ),
            &[
                (NEXTHDR_HOP, ext_opts(1)),
                (NEXTHDR_FRAGMENT, ext_fragment(0)),
            ],
        ));
    }
    let (mut passes, mut drops, mut refused) = (0u64, 0u64, 0u64);
    let mut drop_events = 0u64;
    for i in 0..4_000u32 {
        let base = &bases[(next() % bases.len() as u64) as usize];
        let mut f = base.clone();
        match next() % 4 {
            // Flip a few bytes after the MAC addresses.
            0 | 1 => {
                for _ in 0..1 + next() % 4 {
                    let at = 12 + (next() % (f.len() as u64 - 12)) as usize;
                    f[at] = next() as u8;
                }
            }
            // Cut it short.
            2 => f.truncate(14 + (next() % (f.len() as u64 - 14)) as usize),
            // Random bytes behind a real Ethernet + IP header start.
            _ => {
                let keep = 14 + (next() % 30) as usize;
                f.truncate(keep.min(f.len()));
                for _ in 0..next() % 80 {
                    f.push(next() as u8);
                }
            }
        }
        let program = if i % 2 == 0 {
            "tc_to_pod"
        } else {
            "tc_from_pod"
        };
        match dp.tc_test_run(program, &f) {
            Ok(PASS) => passes += 1,
            Ok(DROP) => drops += 1,
            Ok(other) => panic!("{program} answered {other} for {f:02x?}"),
            Err(e) => {
                assert!(
                    f.len() < 54,
                    "{program} failed on {} bytes: {e}: {f:02x?}",
                    f.len()
                );
                refused += 1;
            }
        }
        drop_events += events
            .drain()
            .iter()
            .filter(|e| {
                assert!(
                    e.kind != FLOW_EVENT_DROP || e.value.drop_reason != DROP_REASON_NONE,
                    "a drop without a reason: {e:?}"
                );
                e.kind == FLOW_EVENT_DROP
            })
            .count() as u64;
    }
    assert!(
        passes > 100 && drops > 100,
        "passes {passes}, drops {drops}, refused {refused}"
    );
    assert_eq!(
        counter(&node, "tc_dropped"),
        drops,
        "one count per DROP verdict"
    );
    assert_eq!(counter(&node, "flow_events_lost"), 0);
    // Every drop is either reported by an event or hits a flow already denied.
    let denied_flows = dump_flows(&node.bpffs)
        .expect("dump flows")
        .iter()
        .filter(|(_, v)| v.verdict == VERDICT_DENY)
        .count() as u64;
    assert!(
        drop_events <= drops && drop_events >= denied_flows,
        "{drop_events} events, {drops} drops, {denied_flows} denied flows"
    );
    assert!(counter(&node, "tc_invalid_dropped") + counter(&node, "tc_spoofed_dropped") <= drops);
}

fn answers(proc: &mycel_tests::Proc) -> usize {
    proc.stdout_lines()
        .iter()
        .filter(|l| l.contains("\"answer\"") && !l.contains("\"answer\":null"))
        .count()
}

#[test]
fn policy_on_a_veth_allows_denies_counts_and_cuts() {
    require_root!();
    let node = Node::new();
    let server = node.pod("server");
    let client = node.pod("client");
    let _s1 = server.tcp_server(8080);
    let _s2 = server.tcp_server(9090);

    let dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    let host_if = server.host_if.clone();
    let (mut dp, attachment) = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        let a = dp.attach_tc(&host_if).expect("attach TC programs");
        (dp, a)
    });
    let ifindex = attachment.ifindex;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let ring = dp.take_flow_events().expect("ring buffer");
    let (_reader, mut events) = {
        let _guard = rt.enter();
        spawn_flow_reader(ring, 1024).expect("flow reader")
    };

    let mut content = PolicyContent {
        ipcache: BTreeMap::from([
            ((client.ipv4.into(), 32), 300),
            ((server.ipv4.into(), 32), 400),
        ]),
        endpoints: BTreeMap::from([(ifindex, endpoint(1, 400))]),
        policy: BTreeMap::from([rule(1, 300, 8080, VERDICT_ALLOW)]),
        sources: BTreeMap::from([(server.ipv4.into(), ifindex)]),
        ..PolicyContent::default()
    };
    dp.policy.apply(&content).expect("apply policy");

    let allowed = SocketAddr::from((server.ipv4, 8080));
    let denied = SocketAddr::from((server.ipv4, 9090));
    let ok = client.tcp_client_with(allowed, 3, &["--timeout-ms", "1000"]);
    assert_eq!(
        ok.answers_without_errors("server").get("server"),
        Some(&3),
        "{}",
        ok.summary()
    );
    let no = client.tcp_client_with(denied, 1, &["--timeout-ms", "500"]);
    assert!(
        no.results
            .iter()
            .all(|r| r.answer.is_none() && r.error.is_some()),
        "9090 should be denied: {}",
        no.summary()
    );

    // Flows counted both ways, from the server endpoint's side.
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    let to_8080: Vec<_> = flows
        .iter()
        .filter(|(k, _)| k.dport_be == 8080u16.to_be() && k.direction == DIR_INGRESS)
        .collect();
    assert_eq!(to_8080.len(), 3, "{flows:?}");
    for (_, v) in &to_8080 {
        assert!(v.packets_fwd >= 3 && v.packets_rev >= 2, "{v:?}");
        assert!(v.bytes_fwd > 0 && v.bytes_rev > 0, "{v:?}");
        assert_eq!((v.src_identity, v.dst_identity), (300, 400));
    }
    let to_9090 = flows
        .iter()
        .find(|(k, _)| k.dport_be == 9090u16.to_be())
        .expect("denied flow recorded");
    assert_eq!(to_9090.1.verdict, VERDICT_DENY);

    // Events: one NEW per allowed connection, one DROP for the denied one (not one per
    // retransmitted SYN).
    thread::sleep(Duration::from_millis(200));
    let mut got: Vec<FlowEvent> = Vec::new();
    while let Ok(e) = events.try_recv() {
        got.push(e);
    }
    let new_8080 = got
        .iter()
        .filter(|e| e.kind == FLOW_EVENT_NEW && e.key.dport_be == 8080u16.to_be())
        .count();
    let drop_9090 = got
        .iter()
        .filter(|e| e.kind == FLOW_EVENT_DROP && e.key.dport_be == 9090u16.to_be())
        .count();
    assert_eq!((new_8080, drop_9090), (3, 1), "{got:?}");
    assert!(got.iter().all(|e| e.ifindex == ifindex));

    // An established connection that policy now denies is cut within a second.
    let (hold, _) = client.tcp_hold(allowed);
    thread::sleep(Duration::from_millis(500));
    assert!(answers(&hold) > 0, "hold: {:?}", hold.stdout_lines());
    content.policy = BTreeMap::from([rule(1, 300, 8080, VERDICT_DENY)]);
    let stats = dp.policy.apply(&content).expect("apply deny");
    assert_eq!(stats.revisions_bumped, 1);
    thread::sleep(Duration::from_secs(1));
    let after_1s = answers(&hold);
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        answers(&hold),
        after_1s,
        "answers kept coming after the deny: {:?}",
        hold.stdout_lines()
    );

    let dp = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        dp.detach_tc(ifindex).expect("detach TC programs");
        dp
    });
    // Without the programs the denied port answers.
    let open = client.tcp_client_with(denied, 1, &["--timeout-ms", "1000"]);
    assert_eq!(
        open.answers_without_errors("server").get("server"),
        Some(&1)
    );
    drop(rt);
    dp.detach_and_unpin().expect("detach");
}

/// Filters on `dev`'s `hook` (ingress/egress) as `tc filter show` lists them in `netns`.
fn clsact_filters(netns: &str, dev: &str, hook: &str) -> usize {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "tc", "filter", "show", "dev", dev, hook,
        ])
        .output()
        .expect("run tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("bpf") && l.contains("direct-action"))
        .count()
}

fn takeover(mode: TcMode) {
    let node = Node::new();
    let server = node.pod("server");
    let client = node.pod("client");
    let _s = server.tcp_server(9090);
    let host_if = server.host_if.clone();
    let attach = move |dp: Datapath, host_if: String, netns: &str| {
        netns::run_in(netns, move || {
            let mut dp = dp;
            dp.set_tc_mode(mode);
            let a = dp.attach_tc(&host_if).expect("attach TC programs");
            (dp, a)
        })
    };
    let dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    let (mut dp, first) = attach(dp, host_if.clone(), &node.netns);
    assert_eq!((first.mode, first.took_over), (mode, false));
    // Default deny for the server endpoint: nothing is allowed.
    let content = PolicyContent {
        ipcache: BTreeMap::new(),
        endpoints: BTreeMap::from([(first.ifindex, endpoint(1, 400))]),
        policy: BTreeMap::new(),
        ..PolicyContent::default()
    };
    dp.policy.apply(&content).expect("apply policy");
    // The agent goes away without detaching: the programs stay.
    drop(dp);
    let denied = SocketAddr::from((server.ipv4, 9090));
    let report = client.tcp_client_with(denied, 1, &["--timeout-ms", "500"]);
    assert!(
        report.results.iter().all(|r| r.answer.is_none()),
        "denied while no agent runs: {}",
        report.summary()
    );
    // A new agent takes the attachment over instead of adding a second one.
    let dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("reload");
    let (dp, second) = attach(dp, host_if.clone(), &node.netns);
    assert_eq!((second.mode, second.took_over), (mode, true));
    match mode {
        TcMode::Clsact => {
            assert_eq!(clsact_filters(&node.netns, &host_if, "ingress"), 1);
            assert_eq!(clsact_filters(&node.netns, &host_if, "egress"), 1);
        }
        TcMode::Tcx => {
            for dir in ["ingress", "egress"] {
                let pin = node
                    .bpffs
                    .join("links/tc")
                    .join(format!("{}-{dir}", second.ifindex));
                assert!(pin.exists(), "{}", pin.display());
            }
        }
    }
    let report = client.tcp_client_with(denied, 1, &["--timeout-ms", "500"]);
    assert!(report.results.iter().all(|r| r.answer.is_none()));
    // Detaching removes them.
    let ifindex = second.ifindex;
    let dp = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        dp.detach_tc(ifindex).expect("detach");
        dp
    });
    if mode == TcMode::Clsact {
        assert_eq!(clsact_filters(&node.netns, &host_if, "ingress"), 0);
    }
    let report = client.tcp_client_with(denied, 1, &["--timeout-ms", "1000"]);
    assert_eq!(
        report.answers_without_errors("server").get("server"),
        Some(&1)
    );
    dp.detach_and_unpin().expect("detach");
}

#[test]
fn tcx_attachment_survives_the_agent_and_is_taken_over() {
    require_root!();
    takeover(TcMode::Tcx);
}

#[test]
fn clsact_attachment_survives_the_agent_and_is_taken_over() {
    require_root!();
    takeover(TcMode::Clsact);
}

/// `frame` as an IPv4 fragment at `offset` (bytes, a multiple of 8) with more to come.
fn fragment_v4(mut p: Vec<u8>, offset: u16) -> Vec<u8> {
    let field = 0x2000 | (offset / 8);
    p[20..22].copy_from_slice(&field.to_be_bytes());
    p
}

/// `frame` over IPv6 with a fragment header (offset in bytes, more to come) between the
/// fixed header and the transport header.
fn fragment_v6(p: Vec<u8>, offset: u16) -> Vec<u8> {
    let next = p[20];
    let mut out = p[..54].to_vec();
    out[20] = 44;
    let len = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[next, 0]);
    out.extend_from_slice(&(offset | 1).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 7]);
    out.extend_from_slice(&p[54..]);
    out
}

#[test]
fn test_run_fragments_of_allowed_datagrams_pass() {
    require_root!();
    let (node, dp) = loaded(&scenario());
    for v6 in [false, true] {
        let [ep, allowed, _, other] = scenario_addrs(v6);
        let udp = L4::Udp {
            sport: 45_000,
            dport: 8080,
        };
        let (first, later) = if v6 {
            (
                fragment_v6(frame(allowed, ep, udp), 0),
                fragment_v6(frame(allowed, ep, udp), 24),
            )
        } else {
            (
                fragment_v4(frame(allowed, ep, udp), 0),
                fragment_v4(frame(allowed, ep, udp), 24),
            )
        };
        let run = |p: &[u8]| dp.tc_test_run("tc_to_pod", p).expect("test run");
        assert_eq!(
            run(&first),
            PASS,
            "v6={v6}: the first fragment of an allowed datagram"
        );
        assert_eq!(
            run(&later),
            PASS,
            "v6={v6}: a later fragment has no ports; it passes"
        );
        // The first fragment is judged by its transport header: from a peer no rule admits,
        // it is dropped (and with it the datagram, which cannot be reassembled).
        let denied_first = if v6 {
            fragment_v6(frame(other, ep, udp), 0)
        } else {
            fragment_v4(frame(other, ep, udp), 0)
        };
        assert_eq!(
            run(&denied_first),
            DROP,
            "v6={v6}: first fragment from a denied peer"
        );
    }
    let flows = mycel_agent::datapath::dump_flows(&node.bpffs).expect("dump flows");
    assert!(
        flows
            .iter()
            .all(|(k, _)| k.proto == PROTO_UDP && k.dport_be == 8080u16.to_be()),
        "fragments are tracked by their first fragment's ports only: {flows:#?}"
    );
}
