//! Removal is clean: an agent that is gone stops costing enrolled workloads their
//! connections, and `mycel uninstall` (or `--detach-on-exit`) leaves nothing of mycel on
//! the node.
//!
//! - A killed agent's redirect lease runs out after `--redirect-grace`: until then the
//!   kernel still redirects enrolled connections to the proxy listeners that died with it
//!   (they fail), afterwards they go direct (the server sees the client's own address),
//!   while a STRICT destination stays closed to plaintext (TC enforces it alone).
//! - `mycel uninstall` after a killed agent removes every pin, the TC programs on the pods'
//!   interfaces and the set-up in the pods' namespaces (rules, routes, sysctls, reserved
//!   ports); running it twice is fine; it refuses while an agent runs.
//! - `--detach-on-exit` on SIGTERM leaves the same clean state.
//! - In the kernel alone: a lease never written, ended or run out means no redirection.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, tc::TcAttachType};
use mycel_agent::datapath::{
    Datapath, MESH_F_ENROLLED, MapSizes, MeshContent, MeshDest, MeshSource, TcMode, mesh_addr,
};
use mycel_tests::{
    Agent, AgentOptions, ClientReport, Node, Pod, Proc, WorkloadYaml, env, netns, require_root,
};

const PORT: u16 = 8080;
/// The proxy's ports inside enrolled namespaces, which the agent reserves there.
const PROXY_PORTS: [u16; 2] = [15001, 15008];
/// The routing table and rule priority the agent adds in enrolled namespaces.
const TABLE: &str = "15008";

/// Starts `mycel-testpod tcp-peer-server` in `pod` (answers with the client's address).
fn peer_server(pod: &Pod) -> Proc {
    pod.peer_server(PORT)
}

fn enrolled(pod: &Pod, app: &str, mode: &str) -> WorkloadYaml {
    WorkloadYaml::in_mesh(pod, app, mode)
}

/// A node with an enrolled client, a PERMISSIVE server and a STRICT server (both answer
/// with the address they see the client at), and an agent started with `args`.
struct Mesh {
    node: Node,
    client: Pod,
    server: Pod,
    strict: Pod,
    _servers: Vec<Proc>,
}

impl Mesh {
    fn new() -> Mesh {
        let node = Node::new();
        let client = node.pod("client");
        let server = node.pod("server");
        let strict = node.pod("strict");
        let servers = vec![peer_server(&server), peer_server(&strict)];
        let docs = [
            enrolled(&client, "client", "PERMISSIVE").to_yaml(),
            enrolled(&server, "server", "PERMISSIVE").to_yaml(),
            enrolled(&strict, "strict", "STRICT").to_yaml(),
        ];
        node.resources().write("workloads.yaml", &docs);
        Mesh {
            node,
            client,
            server,
            strict,
            _servers: servers,
        }
    }

    fn start_agent(&self, args: &[&str]) -> Agent<'_> {
        let mut opts = AgentOptions::default();
        for a in args {
            opts = opts.arg(a);
        }
        let agent = opts.start(&self.node);
        wait_serving(&agent, 3);
        agent
    }

    fn pods(&self) -> [&Pod; 3] {
        [&self.client, &self.server, &self.strict]
    }

    /// One connection from the client to `to`'s application port.
    fn connect(&self, to: &Pod, timeout_ms: u64) -> ClientReport {
        self.client.tcp_client_with(
            SocketAddr::new(IpAddr::V4(to.ipv4), PORT),
            1,
            &["--timeout-ms", &timeout_ms.to_string()],
        )
    }

    fn counter(&self, name: &str) -> u64 {
        self.node.kernel_counter(name)
    }
}

/// Waits until `agent` serves `n` local workloads in the mesh (listening in their
/// namespaces, the kernel's mesh maps written).
fn wait_serving(agent: &Agent<'_>, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, status) = agent.get("/debug/status");
        let served = serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| v["mesh_workloads"].as_u64())
            .unwrap_or(0);
        if served >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent serves {served} of {n} workloads\n{}",
            agent.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The address the peer server saw the one connection of `report` come from.
fn seen_source(report: &ClientReport, what: &str) -> IpAddr {
    let [r] = report.results.as_slice() else {
        panic!("{what}: expected one result: {}", report.summary());
    };
    r.answer
        .as_deref()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .unwrap_or_else(|| panic!("{what}: no answer: {}", report.summary()))
}

fn failed(report: &ClientReport) -> bool {
    report.results.iter().all(|r| r.answer.is_none())
}

/// `ip <args>` inside `netns`: its stdout.
fn ip_in(netns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", netns])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {netns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sysctl of `netns` (`/proc/sys/net/...` read from a thread inside it).
fn sysctl_in(netns: &str, path: &'static str) -> String {
    netns::run_in(netns, move || {
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {path}: {e}"))
            .trim()
            .to_owned()
    })
}

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Whether `netns` holds the agent's set-up: (rule, route, fwmark_accept, reserved ports),
/// each as found.
fn setup_in(netns: &str) -> (bool, bool, bool, bool) {
    let rule = ["-4", "-6"]
        .iter()
        .any(|f| ip_in(netns, &[f, "rule", "show"]).contains(&format!("lookup {TABLE}")));
    let route = ["-4", "-6"].iter().any(|f| {
        !ip_in(netns, &[f, "route", "show", "table", TABLE])
            .trim()
            .is_empty()
    });
    let fwmark = sysctl_in(netns, FWMARK_ACCEPT) == "1";
    let reserved = sysctl_in(netns, RESERVED_PORTS);
    let ports = PROXY_PORTS
        .iter()
        .any(|p| reserved.split(',').any(|item| item.trim() == p.to_string()));
    (rule, route, fwmark, ports)
}

/// Programs attached with tcx to `dev` in `netns`, both hooks.
fn tcx_programs(netns: &str, dev: &str) -> usize {
    let dev = dev.to_owned();
    netns::run_in(netns, move || {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .map(|hook| match SchedClassifier::query_tcx(&dev, hook) {
                Ok((_, programs)) => programs.len(),
                // Kernels without tcx have nothing attached that way.
                Err(_) => 0,
            })
            .sum()
    })
}

/// BPF filters (clsact) on `dev` in `netns`, both hooks, as `tc filter show` lists them.
fn clsact_filters(netns: &str, dev: &str) -> usize {
    ["ingress", "egress"]
        .iter()
        .map(|hook| {
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
        })
        .sum()
}

/// Everything a pin or program of mycel could still be found by.
fn leftovers(m: &Mesh) -> Vec<String> {
    let mut left = Vec::new();
    if m.node.bpffs.exists() {
        let pins: Vec<PathBuf> = walk(&m.node.bpffs);
        if !pins.is_empty() {
            left.push(format!("pins: {pins:?}"));
        }
    }
    for pod in m.pods() {
        let tc =
            tcx_programs(&m.node.netns, &pod.host_if) + clsact_filters(&m.node.netns, &pod.host_if);
        if tc > 0 {
            left.push(format!("{} TC programs on {}", tc, pod.host_if));
        }
        let (rule, route, fwmark, ports) = setup_in(&pod.netns);
        for (what, there) in [
            ("rule", rule),
            ("route", route),
            ("tcp_fwmark_accept=1", fwmark),
            ("reserved ports", ports),
        ] {
            if there {
                left.push(format!("{what} in {}", pod.name));
            }
        }
    }
    left
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Runs `mycel uninstall` in the node's namespace for this node only: its bpffs
/// directory, the namespaces of processes in its cgroup, and a directory of namespace
/// handles holding the client's (which has no process). (status, stdout, stderr)
fn uninstall(m: &Mesh, extra: &[&str]) -> (std::process::ExitStatus, String, String) {
    run_uninstall(&m.node, Some(&m.client), extra)
}

/// `mycel uninstall` for `node` only, with `handle`'s namespace (if any) in the handle
/// directory.
fn run_uninstall(
    node: &Node,
    handle: Option<&Pod>,
    extra: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let handles = node.dir().join("netns");
    if !handles.exists() {
        std::fs::create_dir(&handles).expect("netns handle directory");
        if let Some(pod) = handle {
            std::os::unix::fs::symlink(netns::path(&pod.netns), handles.join(&pod.name))
                .expect("namespace handle");
        }
    }
    let bpffs = node.bpffs.display().to_string();
    let cgroup = node.cgroup.display().to_string();
    let handles = handles.display().to_string();
    let mut args = vec![
        "uninstall",
        "--bpffs",
        &bpffs,
        "--cgroup",
        &cgroup,
        "--netns-dir",
        &handles,
    ];
    args.extend(extra);
    let mut proc = node.spawn(env::mycel_bin(), &args);
    proc.close_stdin();
    proc.wait_output(Duration::from_secs(40))
}

#[test]
fn a_killed_agent_stops_redirecting_after_the_grace() {
    require_root!();
    let m = Mesh::new();
    let grace = Duration::from_secs(4);
    let mut agent = m.start_agent(&["--redirect-grace", "4s"]);

    // Through the mesh: the server sees the client's address, STRICT answers too.
    let report = m.connect(&m.server, 2000);
    assert_eq!(
        seen_source(&report, "client → server over the mesh"),
        IpAddr::V4(m.client.ipv4)
    );
    seen_source(&m.connect(&m.strict, 2000), "client → strict over the mesh");
    let expired_before = m.counter("mesh_lease_expired");

    agent.kill();
    let killed = Instant::now();
    // Within the grace the kernel still redirects, to listeners that died with the agent.
    let report = m.connect(&m.server, 500);
    assert!(
        failed(&report),
        "redirected to a dead listener within the grace: {}",
        report.summary()
    );
    assert!(
        killed.elapsed() < grace - Duration::from_secs(2),
        "the check within the grace took too long: {:?}",
        killed.elapsed()
    );

    // Once the lease has run out, connections go direct.
    let deadline = killed + grace + Duration::from_secs(5);
    let first_success = loop {
        let report = m.connect(&m.server, 300);
        if !failed(&report) {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "enrolled connections still fail {:?} after the agent was killed (grace {grace:?}): {}",
            killed.elapsed(),
            report.summary()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The last renewal was about a second before the kill at most (a busy machine may
    // delay a tick).
    assert!(
        first_success + Duration::from_secs(2) >= grace,
        "connections went direct after {first_success:?}, before the grace ({grace:?}) ran out"
    );
    for _ in 0..3 {
        assert_eq!(
            seen_source(&m.connect(&m.server, 2000), "client → server direct"),
            IpAddr::V4(m.client.ipv4),
            "the server sees the client's own address"
        );
    }
    // STRICT stays closed to plaintext without the agent.
    let report = m.connect(&m.strict, 1000);
    assert!(
        failed(&report),
        "plaintext reached a STRICT workload: {}",
        report.summary()
    );
    assert!(
        m.counter("mesh_lease_expired") > expired_before,
        "expired-lease decisions are counted"
    );
    assert!(m.counter("mesh_strict_dropped") > 0);
}

#[test]
fn uninstall_removes_what_a_killed_agent_left() {
    require_root!();
    let m = Mesh::new();
    let mut agent = m.start_agent(&["--redirect-grace", "2s"]);
    for pod in m.pods() {
        assert_eq!(
            setup_in(&pod.netns),
            (true, true, true, true),
            "{} is set up",
            pod.name
        );
        assert!(
            tcx_programs(&m.node.netns, &pod.host_if) + clsact_filters(&m.node.netns, &pod.host_if)
                >= 2,
            "TC programs on {}",
            pod.host_if
        );
    }

    // While the agent runs (and renews its lease), uninstall refuses and removes nothing.
    let (status, out, err) = uninstall(&m, &["--wait", "1s"]);
    assert!(
        !status.success(),
        "uninstall with an agent running: {out}{err}"
    );
    assert!(err.contains("still running"), "{err}");
    assert!(m.node.bpffs.join("MESH_LEASE").exists());
    seen_source(&m.connect(&m.server, 2000), "the mesh still works");

    agent.kill();
    let (status, out, err) = uninstall(&m, &[]);
    assert!(status.success(), "uninstall failed: {status}\n{out}\n{err}");
    for expected in [
        "removed link",
        "removed map",
        "MESH_LEASE",
        "rule `fwmark 0x3000/0x3000 lookup 15008`",
        "route `local default dev lo table 15008`",
        "tcp_fwmark_accept",
        "reserved ports 15001, 15008",
        "nothing of mycel is left",
    ] {
        assert!(out.contains(expected), "`{expected}` in:\n{out}");
    }
    let left = leftovers(&m);
    assert!(left.is_empty(), "left after uninstall: {left:?}\n{out}");

    // The pods talk directly again: the server sees the client, STRICT is plain TCP now.
    assert_eq!(
        seen_source(
            &m.connect(&m.server, 2000),
            "client → server after uninstall"
        ),
        IpAddr::V4(m.client.ipv4)
    );
    seen_source(
        &m.connect(&m.strict, 2000),
        "client → strict after uninstall",
    );

    // Again: nothing to do, and that is success.
    let (status, out, err) = uninstall(&m, &[]);
    assert!(status.success(), "second uninstall: {status}\n{out}\n{err}");
    assert!(out.contains("nothing of mycel was left"), "{out}");
}

#[test]
fn detach_on_exit_leaves_the_node_clean() {
    require_root!();
    let m = Mesh::new();
    let mut agent = m.start_agent(&["--detach-on-exit"]);
    seen_source(&m.connect(&m.server, 2000), "client → server over the mesh");
    assert_eq!(setup_in(&m.server.netns), (true, true, true, true));

    let status = agent.stop();
    assert!(
        status.success(),
        "the agent exited with {status}\n{}",
        agent.log_tail(40)
    );
    let left = leftovers(&m);
    assert!(
        left.is_empty(),
        "left after --detach-on-exit: {left:?}\n{}",
        agent.log_tail(40)
    );
    assert_eq!(
        seen_source(
            &m.connect(&m.server, 2000),
            "client → server after detaching"
        ),
        IpAddr::V4(m.client.ipv4)
    );
    seen_source(
        &m.connect(&m.strict, 2000),
        "client → strict after detaching",
    );
    let (status, out, err) = uninstall(&m, &[]);
    assert!(
        status.success(),
        "uninstall after detaching: {status}\n{out}\n{err}"
    );
    assert!(out.contains("nothing of mycel was left"), "{out}");
}

#[test]
fn uninstall_finds_clsact_filters_by_name() {
    require_root!();
    let node = Node::new();
    let pod = node.pod("server");
    let _server = pod.tcp_server(PORT);
    // An agent on a kernel without tcx: netlink clsact filters, which no pin holds.
    let dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    let host_if = pod.host_if.clone();
    let dp = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        dp.set_tc_mode(TcMode::Clsact);
        dp.attach_tc(&host_if).expect("attach TC programs");
        dp
    });
    // It goes away without detaching: the filters stay.
    drop(dp);
    assert_eq!(clsact_filters(&node.netns, &pod.host_if), 2);

    let (status, out, err) = run_uninstall(&node, None, &[]);
    assert!(status.success(), "uninstall failed: {status}\n{out}\n{err}");
    for program in ["tc_from_pod", "tc_to_pod"] {
        let line = format!("removed clsact filter {program} on {}", pod.host_if);
        assert!(out.contains(&line), "`{line}` in:\n{out}");
    }
    assert_eq!(clsact_filters(&node.netns, &pod.host_if), 0, "{out}");
    assert!(walk(&node.bpffs).is_empty(), "{out}");
    let (status, out, err) = run_uninstall(&node, None, &[]);
    assert!(status.success(), "second uninstall: {status}\n{out}\n{err}");
    assert!(out.contains("nothing of mycel was left"), "{out}");
}

/// The network namespace cookie of `pod` (what the kernel programs key sources by).
fn netns_cookie(pod: &Pod) -> u64 {
    let net = mycel_agent::podnet::PodNet::open(&netns::path(&pod.netns), IpAddr::V4(pod.ipv4))
        .expect("open the pod's namespace");
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(net.netns_cookie())
        .expect("netns cookie")
}

#[test]
fn the_kernel_redirects_only_while_the_lease_holds() {
    require_root!();
    let node = Node::new();
    let a = node.pod("a");
    let b = node.pod("b");
    // `a`'s "proxy listener" answers "a"; `b`'s application answers "b".
    let _listener = a.tcp_server(15001);
    let _app = b.tcp_server(PORT);
    let mut dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    let content = MeshContent {
        dests: [(
            IpAddr::V4(b.ipv4),
            MeshDest {
                flags: MESH_F_ENROLLED,
                _pad: 0,
            },
        )]
        .into(),
        sources: [(
            netns_cookie(&a),
            MeshSource {
                addr_be: mesh_addr(IpAddr::V4(a.ipv4)),
                port_be: 15001u16.to_be(),
                _pad: [0; 6],
            },
        )]
        .into(),
    };
    dp.mesh.apply(&content).expect("enroll a and b");
    let to_b = SocketAddr::new(IpAddr::V4(b.ipv4), PORT);
    let answer = |what: &str| {
        let report = a.tcp_client_with(to_b, 1, &["--timeout-ms", "2000"]);
        report
            .answers_without_errors(what)
            .into_keys()
            .next()
            .expect("an answer")
    };
    let expired = || node.kernel_counter("mesh_lease_expired");

    // A lease never written: enrolled, yet direct.
    assert_eq!(answer("no lease yet"), "b");
    assert_eq!(expired(), 1);
    // While it holds: redirected to the listener.
    dp.mesh
        .renew_lease(Duration::from_secs(60))
        .expect("renew the lease");
    assert!(dp.mesh.lease_remaining().expect("lease") > Duration::from_secs(50));
    assert_eq!(answer("lease holds"), "a");
    assert_eq!(expired(), 1);
    // Ended (as a detaching agent does): direct again at once.
    dp.mesh.end_lease().expect("end the lease");
    assert_eq!(dp.mesh.lease_remaining().expect("lease"), Duration::ZERO);
    assert_eq!(answer("lease ended"), "b");
    assert_eq!(expired(), 2);
    // Run out (a grace shorter than the renewal interval, for the test's sake).
    let renewed = Instant::now();
    dp.mesh
        .renew_lease(Duration::from_secs(1))
        .expect("renew the lease");
    assert_eq!(answer("short lease holds"), "a");
    std::thread::sleep(
        (renewed + Duration::from_millis(1100)).saturating_duration_since(Instant::now()),
    );
    assert_eq!(answer("short lease ran out"), "b");
    assert_eq!(
        mycel_agent::datapath::pinned_lease_remaining(&node.bpffs).expect("pinned lease"),
        Some(Duration::ZERO)
    );
    dp.detach_and_unpin().expect("detach");
}
