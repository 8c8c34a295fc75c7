//! Mesh redirection in the kernel, with the datapath loaded directly (no agent): connect()
//! between enrolled pods lands on the proxy's outbound listener inside the client pod's
//! network namespace, the listener learns the original destination from `MESH_ORIG_DST`,
//! and the client's getpeername() still shows what it asked for. Then mode STRICT in TC:
//! plaintext SYNs to a STRICT pod are dropped and counted, except HBONE (port 15008) and
//! connections from the node itself.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use mycel_agent::{
    datapath::{
        Datapath, MESH_F_ENROLLED, MESH_F_STRICT, MapSizes, MeshContent, MeshDest, MeshSource,
        OrigDstTable, PolicyContent, dump_flows,
    },
    flows::record::drop_reason_name,
    state::{Affinity, Frontend, FrontendSpec, ObjectRef, Protocol},
};
use mycel_common::{
    mesh::MESH_OUTBOUND_PORT,
    policy::{
        DIR_INGRESS, DROP_REASON_MTLS_STRICT, ENDPOINT_F_ENFORCE, ENDPOINT_F_MESH,
        ENDPOINT_F_MESH_STRICT, ENDPOINT_F_NODE_PROBES, EndpointInfo, IDENTITY_HOST, NodeConfig,
        VERDICT_DENY,
    },
    service::v4_mapped,
};
use mycel_tests::{ClientReport, Node, Pod, env, netns, node::NODE_IPV4, require_root};
use nix::libc;

/// The port the pods' plain servers listen on.
const APP_PORT: u16 = 8080;
/// HBONE's port, which STRICT lets through.
const HBONE_PORT: u16 = 15008;
/// How long a client waits for a connection that must not be dropped, and for one that is.
const CLIENT_TIMEOUT_MS: &str = "2000";
const DROPPED_TIMEOUT_MS: &str = "500";
/// How long the fake listener runs at most.
const LISTENER_LIFETIME: Duration = Duration::from_secs(120);

/// The network namespace cookie of `pod`, as `bpf_get_netns_cookie` reports it for the
/// pod's sockets.
fn netns_cookie(pod: &Pod) -> u64 {
    netns::run_in(&pod.netns, || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket in the pod");
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt on an open socket, writing at most `len` bytes into `cookie`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(
            rc,
            0,
            "getsockopt(SO_NETNS_COOKIE): {}",
            std::io::Error::last_os_error()
        );
        cookie
    })
}

/// What the fake proxy listener saw of one connection: the peer, and the two `take`s.
#[derive(Clone, Debug)]
struct Seen {
    peer: SocketAddr,
    first: Option<SocketAddr>,
    second: Option<SocketAddr>,
}

/// A plain TCP listener on `<pod ip>:15001` inside the pod's namespace standing in for the
/// proxy: it answers each request line with `orig <destination>` from the original
/// destination table (or `orig none`). Stops when dropped.
struct FakeProxy {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeProxy {
    fn start(pod: &Pod, table: OrigDstTable) -> FakeProxy {
        let addr = SocketAddr::from((pod.ipv4, MESH_OUTBOUND_PORT));
        // A socket keeps the namespace it was made in: bind inside, serve from anywhere.
        let listener = netns::run_in(&pod.netns, move || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in the pod: {e}"))
        });
        listener.set_nonblocking(true).expect("non-blocking");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            thread::spawn(move || serve(listener, table, seen, stop))
        };
        FakeProxy {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    listener: TcpListener,
    table: OrigDstTable,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
) {
    let deadline = Instant::now() + LISTENER_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let (conn, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => panic!("accept on the fake proxy: {e}"),
        };
        let first = table.take(peer).expect("take the original destination");
        let second = table.take(peer).expect("take it again");
        seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
            peer,
            first,
            second,
        });
        let answer = match first {
            Some(a) => format!("orig {a}\n"),
            None => "orig none\n".to_owned(),
        };
        // The client sends one line and reads one; errors only mean it gave up.
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let mut reader = BufReader::new(&conn);
        if reader.read_line(&mut line).is_ok() {
            let _ = (&conn).write_all(answer.as_bytes());
        }
    }
}

/// A node with pods `a` (enrolled source, with the fake proxy), `b` (enrolled destination)
/// and `c` (neither), each running a plain server on [`APP_PORT`], and the datapath loaded.
struct Mesh {
    node: Node,
    dp: Datapath,
    a: Pod,
    b: Pod,
    c: Pod,
    _servers: Vec<mycel_tests::Proc>,
}

impl Mesh {
    fn new() -> Mesh {
        let node = Node::new();
        let a = node.pod("a");
        let b = node.pod("b");
        let c = node.pod("c");
        let servers = vec![
            a.tcp_server(APP_PORT),
            b.tcp_server(APP_PORT),
            c.tcp_server(APP_PORT),
        ];
        let mut dp =
            Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
        // The kernel redirects only while the agent's lease holds; the agent renews it
        // every second, these tests stand in for it.
        dp.mesh
            .renew_lease(Duration::from_secs(600))
            .expect("renew the redirect lease");
        Mesh {
            node,
            dp,
            a,
            b,
            c,
            _servers: servers,
        }
    }

    /// Enrolls `a` as a source and `b` as a destination.
    fn enroll(&mut self) {
        let content = MeshContent {
            dests: BTreeMap::from([(IpAddr::V4(self.b.ipv4), dest(MESH_F_ENROLLED))]),
            sources: BTreeMap::from([(netns_cookie(&self.a), source(&self.a))]),
        };
        let stats = self.dp.mesh.apply(&content).expect("apply mesh content");
        assert_eq!((stats.dest_writes, stats.source_writes), (1, 1));
        // Applying it again writes nothing.
        let again = self.dp.mesh.apply(&content).expect("apply mesh content");
        assert_eq!(again, Default::default());
        assert_eq!(self.dp.mesh.counts(), (1, 1));
    }
}

fn dest(flags: u32) -> MeshDest {
    MeshDest { flags, _pad: 0 }
}

fn source(pod: &Pod) -> MeshSource {
    MeshSource {
        addr_be: v4_mapped(u32::from_ne_bytes(pod.ipv4.octets())),
        port_be: MESH_OUTBOUND_PORT.to_be(),
        _pad: [0; 6],
    }
}

/// The one result of a one-connection client run, checked to have an answer.
fn answered(report: &ClientReport, what: &str) -> (String, String, String) {
    let [r] = report.results.as_slice() else {
        panic!("{what}: expected one result: {}", report.summary());
    };
    match (&r.answer, &r.peer, &r.local) {
        (Some(answer), Some(peer), Some(local)) if r.error.is_none() => {
            (answer.clone(), peer.clone(), local.clone())
        }
        _ => panic!("{what}: no answer: {}", report.summary()),
    }
}

/// The cgroup v2 id of a cgroup directory: its inode number.
fn cgroup_id(dir: &std::path::Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())),
    )
}

fn counter(node: &Node, name: &str) -> u64 {
    node.kernel_counter(name)
}

fn client_args(addr: SocketAddr, timeout_ms: &str) -> Vec<String> {
    [
        "tcp-client",
        "--addr",
        &addr.to_string(),
        "--count",
        "1",
        "--timeout-ms",
        timeout_ms,
    ]
    .map(str::to_owned)
    .to_vec()
}

#[test]
fn enrolled_connections_reach_the_listener_with_their_original_destination() {
    require_root!();
    let mut m = Mesh::new();
    m.enroll();
    let proxy = FakeProxy::start(&m.a, m.dp.mesh.orig_dst_table());
    let to_b = SocketAddr::from((m.b.ipv4, APP_PORT));

    // A → B's pod IP: redirected; the listener learns B's address, the client still sees B.
    let report =
        m.a.tcp_client_with(to_b, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    let (answer, peer, local) = answered(&report, "a → b");
    assert_eq!(answer, format!("orig {to_b}"));
    assert_eq!(peer, to_b.to_string(), "getpeername() must show B");
    let seen = proxy.seen();
    let [s] = seen.as_slice() else {
        panic!("the listener saw {seen:?}");
    };
    assert_eq!(
        s.peer.to_string(),
        local,
        "the listener's peer is the client socket"
    );
    assert_eq!(s.first, Some(to_b));
    assert_eq!(s.second, None, "a record is read once");

    // A → a service address backed by B: balanced to B, then redirected.
    let vip = SocketAddr::from(([10, 96, 0, 10], 80));
    let frontend = Frontend {
        ip: vip.ip(),
        port: vip.port(),
        protocol: Protocol::Tcp,
    };
    let spec = FrontendSpec {
        service: ObjectRef {
            namespace: "default".into(),
            name: "b".into(),
        },
        port_name: Some("http".into()),
        backends: vec![to_b],
        affinity: Affinity::None,
    };
    let (_, errors) =
        m.dp.services
            .apply(&BTreeMap::from([(frontend, Some(spec))]));
    assert!(errors.is_empty(), "{errors:?}");
    let report =
        m.a.tcp_client_with(vip, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    let (answer, peer, _) = answered(&report, "a → service of b");
    assert_eq!(answer, format!("orig {to_b}"), "the backend, not the VIP");
    assert_eq!(peer, vip.to_string(), "getpeername() must show the VIP");

    // The same connection from an IPv6 socket to B's v4-mapped address.
    let mapped = SocketAddr::new(IpAddr::V6(m.b.ipv4.to_ipv6_mapped()), APP_PORT);
    let report =
        m.a.tcp_client_with(mapped, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    let (answer, peer, _) = answered(&report, "a → b over a v4-mapped address");
    assert_eq!(answer, format!("orig {to_b}"));
    assert_eq!(peer, mapped.to_string());

    assert_eq!(proxy.seen().len(), 3);
    assert!(counter(&m.node, "mesh_redirected") >= 3);
    assert!(counter(&m.node, "mesh_orig_dst_recorded") >= 3);
    drop(proxy);
    m.dp.detach_and_unpin().expect("detach");
}

#[test]
fn traffic_outside_the_mesh_and_the_proxy_itself_go_straight() {
    require_root!();
    let mut m = Mesh::new();
    m.enroll();
    let proxy = FakeProxy::start(&m.a, m.dp.mesh.orig_dst_table());
    let to_b = SocketAddr::from((m.b.ipv4, APP_PORT));
    let to_c = SocketAddr::from((m.c.ipv4, APP_PORT));

    // A destination that is not enrolled.
    let report =
        m.a.tcp_client_with(to_c, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "a → c").0, "c");
    // A source that is not enrolled.
    let report =
        m.c.tcp_client_with(to_b, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "c → b").0, "b");
    // HBONE's port and the listener's own are never redirected: B has nothing on 15008.
    let hbone = SocketAddr::from((m.b.ipv4, HBONE_PORT));
    let report =
        m.a.tcp_client_with(hbone, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(
        report
            .results
            .first()
            .and_then(|r| r.error.clone())
            .as_deref(),
        Some("ConnectionRefused"),
        "a → b:15008 must reach b: {}",
        report.summary()
    );

    // The proxy's own process: a client in A whose pid is the proxy's.
    let args = client_args(to_b, CLIENT_TIMEOUT_MS);
    let script = r#"read go && exec "$0" "$@""#;
    let mut sh_args = vec!["-c".to_owned(), script.to_owned()];
    sh_args.push(env::testpod_bin().display().to_string());
    sh_args.extend(args);
    let mut child = m.a.spawn("sh", &sh_args);
    let pid = u32::try_from(child.pid()).expect("pid");
    m.dp.mesh.set_proxy_tgid(pid).expect("set proxy tgid");
    assert_eq!(m.dp.mesh.proxy_tgid().expect("read proxy tgid"), pid);
    child.write_stdin("go\n");
    let (status, stdout, stderr) = child.wait_output(Duration::from_secs(10));
    assert!(status.success(), "proxy client failed: {stderr}");
    let report: ClientReport = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("proxy client report ({e}): {stdout}"));
    assert_eq!(
        answered(&report, "proxy → b").0,
        "b",
        "the proxy goes straight"
    );

    // Any other process of A is still redirected.
    let report =
        m.a.tcp_client_with(to_b, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "a → b").0, format!("orig {to_b}"));
    assert_eq!(proxy.seen().len(), 1, "{:?}", proxy.seen());

    // Unenrolling A stops the redirection.
    let stats =
        m.dp.mesh
            .apply(&MeshContent {
                dests: BTreeMap::from([(IpAddr::V4(m.b.ipv4), dest(MESH_F_ENROLLED))]),
                sources: BTreeMap::new(),
            })
            .expect("unenroll a");
    assert_eq!(stats.source_deletes, 1);
    let report =
        m.a.tcp_client_with(to_b, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "a → b after unenrolling").0, "b");
    drop(proxy);
    m.dp.detach_and_unpin().expect("detach");
}

#[test]
fn strict_drops_plaintext_but_not_hbone_or_kubelet_probes() {
    require_root!();
    let Mesh {
        node,
        dp,
        b,
        c,
        _servers,
        ..
    } = Mesh::new();
    let _hbone = b.tcp_server(HBONE_PORT);
    let host_if = b.host_if.clone();
    let (mut dp, attachment) = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        let a = dp.attach_tc(&host_if).expect("attach TC programs");
        (dp, a)
    });
    let endpoint = |flags: u32| EndpointInfo {
        endpoint_id: 1,
        identity: 400,
        flags,
        policy_revision: 0,
    };
    let mut content = PolicyContent {
        ipcache: BTreeMap::from([
            ((c.ipv4.into(), 32), 300),
            ((b.ipv4.into(), 32), 400),
            ((NODE_IPV4.into(), 32), IDENTITY_HOST),
        ]),
        endpoints: BTreeMap::from([(
            attachment.ifindex,
            endpoint(ENDPOINT_F_MESH | ENDPOINT_F_MESH_STRICT | ENDPOINT_F_NODE_PROBES),
        )]),
        policy: BTreeMap::new(),
        sources: BTreeMap::from([(b.ipv4.into(), attachment.ifindex)]),
        // Processes the test starts on the node run outside the node's pods' cgroup: the
        // kubelet's place.
        node: NodeConfig {
            pods_cgroup_id: cgroup_id(&node.cgroup),
        },
    };
    dp.policy.apply(&content).expect("apply policy");
    let to_app = SocketAddr::from((b.ipv4, APP_PORT));
    let to_hbone = SocketAddr::from((b.ipv4, HBONE_PORT));

    // Plaintext from another pod: no SYN-ACK ever comes back.
    let report = c.tcp_client_with(to_app, 1, &["--timeout-ms", DROPPED_TIMEOUT_MS]);
    assert!(
        report
            .results
            .iter()
            .all(|r| r.answer.is_none() && r.error.as_deref() == Some("TimedOut")),
        "plaintext to a STRICT pod must be dropped: {}",
        report.summary()
    );
    // At least once: packets of the link's own that reach the pod meanwhile may be
    // refused too; the flow below shows this connection's verdict and reason.
    let strict_first = counter(&node, "mesh_strict_dropped");
    assert!(strict_first >= 1);
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    let (_, dropped) = flows
        .iter()
        .find(|(k, _)| k.dport_be == APP_PORT.to_be() && k.direction == DIR_INGRESS)
        .unwrap_or_else(|| panic!("no flow to port {APP_PORT}: {flows:?}"));
    assert_eq!(dropped.verdict, VERDICT_DENY);
    assert_eq!(dropped.drop_reason, DROP_REASON_MTLS_STRICT);
    assert_eq!(dropped.src_identity, 300);
    assert_eq!(drop_reason_name(dropped.drop_reason), "AUTH_REQUIRED");

    // HBONE passes, and so does the node (kubelet probes).
    let report = c.tcp_client_with(to_hbone, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "c → b:15008").0, "b");
    let mut from_node = node.spawn(env::testpod_bin(), &client_args(to_app, CLIENT_TIMEOUT_MS));
    let (status, stdout, stderr) = from_node.wait_output(Duration::from_secs(10));
    assert!(status.success(), "client on the node failed: {stderr}");
    let report: ClientReport =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("report ({e}): {stdout}"));
    assert_eq!(answered(&report, "node → b").0, "b");
    let strict_probe = counter(&node, "mesh_strict_dropped");
    // A node process inside the pods' cgroup (a hostNetwork pod) is no probe.
    let host_pod = node.cgroup.join("hostnetwork-pod");
    std::fs::create_dir(&host_pod).expect("hostNetwork pod cgroup");
    let mut host_net = mycel_tests::Proc::spawn(
        Some(&node.netns),
        Some(&host_pod),
        env::testpod_bin(),
        &client_args(to_app, DROPPED_TIMEOUT_MS),
    );
    let (_, stdout, _) = host_net.wait_output(Duration::from_secs(10));
    let report: ClientReport =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("report ({e}): {stdout}"));
    assert!(
        report.results.iter().all(|r| r.answer.is_none()),
        "a hostNetwork pod passed STRICT: {}",
        report.summary()
    );
    assert!(counter(&node, "mesh_strict_dropped") > strict_probe);

    // HBONE skips L3/L4 policy: with a default deny and no rule, 15008 still passes.
    content.endpoints = BTreeMap::from([(
        attachment.ifindex,
        endpoint(ENDPOINT_F_MESH | ENDPOINT_F_ENFORCE),
    )]);
    dp.policy.apply(&content).expect("apply default deny");
    let report = c.tcp_client_with(to_hbone, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "c → b:15008 under default deny").0, "b");
    let report = c.tcp_client_with(to_app, 1, &["--timeout-ms", DROPPED_TIMEOUT_MS]);
    assert!(
        report.results.iter().all(|r| r.answer.is_none()),
        "the default deny still applies to other ports: {}",
        report.summary()
    );

    // PERMISSIVE (mesh without STRICT): plaintext passes.
    content.endpoints = BTreeMap::from([(attachment.ifindex, endpoint(ENDPOINT_F_MESH))]);
    dp.policy.apply(&content).expect("apply permissive");
    let report = c.tcp_client_with(to_app, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "c → b permissive").0, "b");

    // Without the mesh flag, 15008 is an ordinary port again: the default deny drops it.
    content.endpoints = BTreeMap::from([(attachment.ifindex, endpoint(ENDPOINT_F_ENFORCE))]);
    dp.policy.apply(&content).expect("apply non-mesh");
    let report = c.tcp_client_with(to_hbone, 1, &["--timeout-ms", DROPPED_TIMEOUT_MS]);
    assert!(
        report.results.iter().all(|r| r.answer.is_none()),
        "15008 of a non-mesh endpoint follows policy: {}",
        report.summary()
    );

    let ifindex = attachment.ifindex;
    let dp = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        dp.detach_tc(ifindex).expect("detach TC programs");
        dp
    });
    dp.detach_and_unpin().expect("detach");
}

#[test]
fn a_destination_leaving_the_mesh_is_no_longer_redirected() {
    require_root!();
    let mut m = Mesh::new();
    let content = MeshContent {
        dests: BTreeMap::from([(IpAddr::V4(m.b.ipv4), dest(MESH_F_ENROLLED | MESH_F_STRICT))]),
        sources: BTreeMap::from([(netns_cookie(&m.a), source(&m.a))]),
    };
    m.dp.mesh.apply(&content).expect("apply");
    let proxy = FakeProxy::start(&m.a, m.dp.mesh.orig_dst_table());
    let to_b = SocketAddr::from((m.b.ipv4, APP_PORT));
    let report =
        m.a.tcp_client_with(to_b, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "a → strict b").0, format!("orig {to_b}"));
    // A destination leaving the mesh is removed from the map, and no longer redirected.
    let stats =
        m.dp.mesh
            .apply(&MeshContent {
                dests: BTreeMap::new(),
                sources: content.sources.clone(),
            })
            .expect("apply");
    assert_eq!(stats.dest_deletes, 1);
    let report =
        m.a.tcp_client_with(to_b, 1, &["--timeout-ms", CLIENT_TIMEOUT_MS]);
    assert_eq!(answered(&report, "a → b outside the mesh").0, "b");
    assert_eq!(proxy.seen().len(), 1);
    drop(proxy);
    m.dp.detach_and_unpin().expect("detach");
}
