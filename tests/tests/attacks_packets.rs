//! Attacks on the TC programs with crafted packets, end to end: real pods on real veths.
//! Where a packet must be forged, the attacker is a process that holds only CAP_NET_RAW
//! (an unprivileged user with no other capability) sending hand-built IPv4 packets
//! through a raw socket (`mycel-testpod raw-send`); ordinary clients do the rest.
//!
//! - a pod sending with another pod's source address (anti-spoofing);
//! - a TCP packet without SYN, then a SYN on the same tuple, to a STRICT workload;
//! - UDP to a STRICT workload;
//! - node traffic: a "kubelet" (a node process outside the pods' cgroup) and a
//!   "hostNetwork pod" (a node process inside it) under `--node-traffic probes|all|none`,
//!   and a DENY whose ipBlock holds the node's address.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use mycel_agent::datapath::{Datapath, MapSizes, PolicyContent};
use mycel_common::policy::{
    ENDPOINT_F_MESH, ENDPOINT_F_MESH_STRICT, ENDPOINT_F_NODE_PROBES, EndpointInfo, IDENTITY_HOST,
    NodeConfig, PolicyKey, PolicyValue,
};
use mycel_tests::{
    Agent, AgentOptions, ClientReport, Node, Pod, Proc, env, netns, require_root, sniff::Sniffer,
    testpod::RawReport,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// An IPv4 header for `payload` (the kernel fills in the checksum and the id).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("small packet");
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// The Internet checksum of the pseudo header and `segment`.
fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&src.octets());
    bytes.extend_from_slice(&dst.octets());
    bytes.extend_from_slice(&[0, proto]);
    bytes.extend_from_slice(&u16::try_from(segment.len()).expect("small").to_be_bytes());
    bytes.extend_from_slice(segment);
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment with these flags (sequence 1, no options), as an IPv4 packet.
fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 only");
    };
    let mut seg = Vec::new();
    seg.extend_from_slice(&s.port().to_be_bytes());
    seg.extend_from_slice(&d.port().to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let sum = l4_checksum(*s.ip(), *d.ip(), PROTO_TCP, &seg);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4(*s.ip(), *d.ip(), PROTO_TCP, &seg)
}

/// A UDP datagram carrying `data`, as an IPv4 packet.
fn udp(src: SocketAddr, dst: SocketAddr, data: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 only");
    };
    let mut seg = Vec::new();
    seg.extend_from_slice(&s.port().to_be_bytes());
    seg.extend_from_slice(&d.port().to_be_bytes());
    seg.extend_from_slice(&u16::try_from(8 + data.len()).expect("small").to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(data);
    let sum = l4_checksum(*s.ip(), *d.ip(), PROTO_UDP, &seg);
    seg[6..8].copy_from_slice(&sum.to_be_bytes());
    ipv4(*s.ip(), *d.ip(), PROTO_UDP, &seg)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `packets` from `pod` as an unprivileged user holding only CAP_NET_RAW, watching
/// for TCP packets to `watch_port`.
fn raw_send(pod: &Pod, dst: Ipv4Addr, packets: &[Vec<u8>], watch_port: Option<u16>) -> RawReport {
    let mut args: Vec<OsString> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+net_raw",
        "--ambient-caps=-all,+net_raw",
        "--bounding-set=-all,+net_raw",
    ]
    .map(OsString::from)
    .to_vec();
    args.push(env::testpod_bin().into_os_string());
    args.extend(["raw-send", "--dst"].map(OsString::from));
    args.push(dst.to_string().into());
    for p in packets {
        args.push("--packet".into());
        args.push(hex(p).into());
    }
    if let Some(port) = watch_port {
        args.push("--watch-port".into());
        args.push(port.to_string().into());
        args.push("--wait-ms".into());
        args.push("700".into());
    }
    let mut proc = pod.spawn("setpriv", &args);
    let (status, stdout, stderr) = proc.wait_output(Duration::from_secs(10));
    assert!(
        status.success(),
        "raw-send in {} failed: {stderr}",
        pod.name
    );
    let report: RawReport =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("report ({e}): {stdout}"));
    assert_eq!(report.sent as usize, packets.len());
    report
}

fn syn_acks(report: &RawReport, from: SocketAddr) -> usize {
    report
        .tcp_replies
        .iter()
        .filter(|r| {
            r.from == from.to_string() && r.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        })
        .count()
}

fn counter(node: &Node, name: &str) -> u64 {
    node.kernel_counter(name)
}

/// A pod may send only from its own addresses: a packet from the attacker with the
/// allowed client's source address never reaches the workload that allows the client, and
/// is counted as `INVALID_SOURCE_IP`. (Before, it was judged as the client and delivered.)
#[test]
fn a_pod_cannot_send_with_another_pods_address() {
    require_root!();
    let node = Node::new();
    let web = node.pod("web");
    let client = node.pod("client");
    let attacker = node.pod("attacker");
    let _udp = web.udp_server(5353);
    node.resources().write_workloads(&[
        (&web, "web"),
        (&client, "client"),
        (&attacker, "attacker"),
    ]);
    node.resources().write_raw(
        "allow.yaml",
        "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]
",
    );
    let agent = node.start_agent();
    let to_web = SocketAddr::from((web.ipv4, 5353));
    // The policy: the client is answered, the attacker with its own address is not.
    let ok = client.udp_client(to_web, 2, false);
    assert_eq!(
        ok.answers_without_errors("client → web").get("web"),
        Some(&2)
    );
    let no = attacker.udp_client(to_web, 1, false);
    assert!(
        no.results.iter().all(|r| r.answer.is_none()),
        "{}",
        no.summary()
    );

    let marker = b"mycel-spoofed-source-7f3a";
    let sniff = Sniffer::start(&web.netns, marker);
    let spoofed = udp(SocketAddr::from((client.ipv4, 40_000)), to_web, marker);
    raw_send(
        &attacker,
        web.ipv4,
        &[spoofed.clone(), spoofed.clone(), spoofed],
        None,
    );
    thread::sleep(Duration::from_millis(300));
    let seen = sniff.stop();
    assert_eq!(
        seen.with_marker, 0,
        "a packet with the client's source address sent by the attacker reached web: {seen:?}"
    );
    // The same packet from the client itself arrives: the capture would have seen it.
    let sniff = Sniffer::start(&web.netns, marker);
    let own = udp(SocketAddr::from((client.ipv4, 40_001)), to_web, marker);
    raw_send(&client, web.ipv4, &[own], None);
    thread::sleep(Duration::from_millis(300));
    assert!(
        sniff.stop().with_marker >= 1,
        "the client's own packet did not arrive"
    );

    agent.wait_for(
        "spoofed packets counted as INVALID_SOURCE_IP",
        Duration::from_secs(5),
        |a| {
            a.metric_value("hubble_drop_total", &[("reason", "INVALID_SOURCE_IP")])
                .unwrap_or(0.0)
                >= 3.0
        },
    );
    assert!(counter(&node, "tc_spoofed_dropped") >= 3);
}

/// A node with pods `b` (the STRICT workload: TCP servers on 8080 and 15008, a UDP server
/// on 5353) and `a` (the attacker), TC programs on both, `b` in mode STRICT.
struct Strict {
    node: Node,
    dp: Datapath,
    a: Pod,
    b: Pod,
    content: PolicyContent,
    b_ifindex: u32,
    _servers: Vec<Proc>,
}

const APP_PORT: u16 = 8080;
const HBONE_PORT: u16 = 15008;
const UDP_PORT: u16 = 5353;

impl Strict {
    fn new() -> Strict {
        let node = Node::new();
        let a = node.pod("a");
        let b = node.pod("b");
        let servers = vec![
            b.tcp_server(APP_PORT),
            b.tcp_server(HBONE_PORT),
            b.udp_server(UDP_PORT),
        ];
        let dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
        let (a_if, b_if) = (a.host_if.clone(), b.host_if.clone());
        let (dp, a_ifindex, b_ifindex) = netns::run_in(&node.netns, move || {
            let mut dp = dp;
            let a = dp.attach_tc(&a_if).expect("attach a").ifindex;
            let b = dp.attach_tc(&b_if).expect("attach b").ifindex;
            (dp, a, b)
        });
        let endpoint = |id, identity, flags| EndpointInfo {
            endpoint_id: id,
            identity,
            flags,
            policy_revision: 0,
        };
        let content = PolicyContent {
            ipcache: BTreeMap::from([
                ((a.ipv4.into(), 32), 300),
                ((b.ipv4.into(), 32), 400),
                ((node.ipv4().into(), 32), IDENTITY_HOST),
            ]),
            endpoints: BTreeMap::from([
                (a_ifindex, endpoint(1, 300, 0)),
                (
                    b_ifindex,
                    endpoint(
                        2,
                        400,
                        ENDPOINT_F_MESH | ENDPOINT_F_MESH_STRICT | ENDPOINT_F_NODE_PROBES,
                    ),
                ),
            ]),
            policy: BTreeMap::<PolicyKey, PolicyValue>::new(),
            sources: BTreeMap::from([(a.ipv4.into(), a_ifindex), (b.ipv4.into(), b_ifindex)]),
            node: NodeConfig {
                pods_cgroup_id: std::os::unix::fs::MetadataExt::ino(
                    &fs::metadata(&node.cgroup).expect("node cgroup"),
                ),
            },
        };
        let mut s = Strict {
            node,
            dp,
            a,
            b,
            content,
            b_ifindex,
            _servers: servers,
        };
        s.apply();
        s
    }

    fn apply(&mut self) {
        self.dp.policy.apply(&self.content).expect("apply policy");
    }

    fn set_b_flags(&mut self, flags: u32) {
        self.content
            .endpoints
            .get_mut(&self.b_ifindex)
            .expect("b")
            .flags = flags;
        self.apply();
    }
}

impl Drop for Strict {
    fn drop(&mut self) {
        let _ = self.dp.policy.apply(&PolicyContent::default());
    }
}

/// A TCP packet without SYN cannot make a later SYN on its tuple skip STRICT: after a
/// flagless, ACK, FIN, RST or SYN|ACK packet, the attacker's SYN to the app port gets no
/// SYN|ACK. (Before, the first packet was cached as allowed and the SYN answered.)
#[test]
fn a_packet_without_syn_does_not_open_a_strict_workload() {
    require_root!();
    let s = Strict::new();
    let app = SocketAddr::from((s.b.ipv4, APP_PORT));
    let hbone = SocketAddr::from((s.b.ipv4, HBONE_PORT));
    // The observation works: a SYN to HBONE (allowed in STRICT) is answered.
    let from = SocketAddr::from((s.a.ipv4, 41_000));
    let report = raw_send(&s.a, s.b.ipv4, &[tcp(from, hbone, TCP_SYN)], Some(41_000));
    assert!(
        syn_acks(&report, hbone) >= 1,
        "no SYN|ACK from HBONE: {report:?}"
    );

    for (i, first) in [
        0,
        TCP_ACK,
        TCP_FIN,
        TCP_RST,
        TCP_SYN | TCP_ACK,
        TCP_FIN | TCP_ACK,
    ]
    .into_iter()
    .enumerate()
    {
        let port = 41_100 + u16::try_from(i).expect("few");
        let from = SocketAddr::from((s.a.ipv4, port));
        let report = raw_send(
            &s.a,
            s.b.ipv4,
            &[
                tcp(from, app, first),
                tcp(from, app, TCP_SYN),
                tcp(from, app, TCP_SYN),
            ],
            Some(port),
        );
        assert_eq!(
            syn_acks(&report, app),
            0,
            "flags {first:#04x}, then SYN: the STRICT workload answered {report:?}"
        );
    }
    assert!(counter(&s.node, "mesh_strict_dropped") >= 6);
}

/// STRICT refuses plaintext of every protocol: UDP from another pod gets no answer, and
/// does once the workload is PERMISSIVE. (Before, UDP reached STRICT workloads.)
#[test]
fn udp_to_a_strict_workload_is_dropped() {
    require_root!();
    let mut s = Strict::new();
    let to_b = SocketAddr::from((s.b.ipv4, UDP_PORT));
    let report = s.a.udp_client(to_b, 2, false);
    assert!(
        report.results.iter().all(|r| r.answer.is_none()),
        "UDP reached a STRICT workload: {}",
        report.summary()
    );
    assert!(counter(&s.node, "mesh_strict_dropped") >= 1);
    s.set_b_flags(ENDPOINT_F_MESH);
    let report = s.a.udp_client(to_b, 2, false);
    assert_eq!(
        report.answers_without_errors("a → b, PERMISSIVE").get("b"),
        Some(&2)
    );
}

/// A TCP client run in the node's network namespace, in `cgroup` (None: outside every
/// test cgroup, where the kubelet runs): how many of `n` connections were answered.
fn from_node(node: &Node, cgroup: Option<&PathBuf>, addr: SocketAddr, n: u32) -> usize {
    let args = [
        "tcp-client".to_owned(),
        "--addr".to_owned(),
        addr.to_string(),
        "--count".to_owned(),
        n.to_string(),
        "--timeout-ms".to_owned(),
        "300".to_owned(),
    ];
    let mut proc = Proc::spawn(
        Some(&node.netns),
        cgroup.map(|c| c.as_path()),
        env::testpod_bin(),
        &args,
    );
    let (status, stdout, stderr) = proc.wait_output(Duration::from_secs(10));
    assert!(status.success(), "client on the node failed: {stderr}");
    let report: ClientReport =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("report ({e}): {stdout}"));
    report
        .results
        .iter()
        .filter(|r| r.answer.is_some() && r.error.is_none())
        .count()
}

/// A node whose `web` pod is selected by an ALLOW naming only the `client` service
/// account, and a cgroup for a hostNetwork pod below the pods' cgroup.
struct NodeScene {
    node: Node,
    web: Pod,
    host_pod: PathBuf,
    _server: Proc,
}

impl NodeScene {
    fn new() -> NodeScene {
        let node = Node::new();
        let web = node.pod("web");
        let client = node.pod("client");
        let server = web.tcp_server(APP_PORT);
        node.resources()
            .write_workloads(&[(&web, "web"), (&client, "client")]);
        node.resources().write_raw(
            "allow.yaml",
            "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-allow-client, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]
",
        );
        let host_pod = node.cgroup.join("hostnetwork-pod");
        fs::create_dir(&host_pod).expect("hostNetwork pod cgroup");
        NodeScene {
            node,
            web,
            host_pod,
            _server: server,
        }
    }

    fn web(&self) -> SocketAddr {
        SocketAddr::from((self.web.ipv4, APP_PORT))
    }

    fn start(&self, node_traffic: Option<&str>) -> Agent<'_> {
        let mut options = AgentOptions::default();
        if let Some(v) = node_traffic {
            options = options.arg("--node-traffic").arg(v);
        }
        options.start(&self.node)
    }
}

/// Polls until `check()` is `want`, for at most 3 s.
fn eventually(what: &str, want: usize, check: impl Fn() -> usize) {
    let start = Instant::now();
    loop {
        let got = check();
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{what}: {got}, want {want}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `--node-traffic probes` (the default): the kubelet's connections pass an ALLOW that
/// does not name the node; a hostNetwork pod's (a node process inside the pods' cgroup)
/// do not, and neither do the kubelet's once a DENY's ipBlock holds the node's address.
/// (Before, every node process passed, whatever DENY said.)
#[test]
fn only_kubelet_probes_are_exempt_and_a_deny_of_the_node_holds() {
    require_root!();
    let scene = NodeScene::new();
    let agent = scene.start(None);
    assert_eq!(
        from_node(&scene.node, None, scene.web(), 2),
        2,
        "kubelet probe"
    );
    assert_eq!(
        from_node(&scene.node, Some(&scene.host_pod), scene.web(), 2),
        0,
        "hostNetwork pod"
    );
    scene.node.resources().write_raw(
        "deny.yaml",
        "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-deny-node-net, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [\"10.0.0.0/16\"]}}]
",
    );
    eventually("kubelet probe under a DENY of 10.0.0.0/16", 0, || {
        from_node(&scene.node, None, scene.web(), 1)
    });
    agent.wait_for(
        "the denied node traffic counted",
        Duration::from_secs(5),
        |a| {
            a.metric_value("hubble_drop_total", &[("reason", "POLICY_DENY")])
                .unwrap_or(0.0)
                >= 1.0
        },
    );
}

/// `--node-traffic none`: the kubelet is refused like any peer the ALLOW does not name;
/// `all`: even the hostNetwork pod passes (the behaviour before the setting).
#[test]
fn node_traffic_none_and_all() {
    require_root!();
    let scene = NodeScene::new();
    let agent = scene.start(Some("none"));
    assert_eq!(
        from_node(&scene.node, None, scene.web(), 2),
        0,
        "none: kubelet"
    );
    drop(agent);
    let scene = NodeScene::new();
    let _agent = scene.start(Some("all"));
    assert_eq!(
        from_node(&scene.node, Some(&scene.host_pod), scene.web(), 2),
        2,
        "all: hostNetwork pod"
    );
}
