//! A test's "node": a network namespace with a bridge, the pods attached to it, the cgroup
//! and bpffs directories the agent uses, and the resource directory it reads.
//!
//! ```text
//!  node netns myc-<pid>-<n>              pod netns myc-<pid>-<n>-<pod>
//!  ┌───────────────────────────────┐      ┌──────────────────────────────┐
//!  │ br0 10.0.0.1/24, fd00::1/64   │      │ eth0 10.0.0.N/24, fd00::N/64 │
//!  │  └─ vethN ────────────────────┼──────┼─ eth0   default via br0      │
//!  │ agent (admin 127.0.0.1:15000) │      │ processes in cgroup …/<pod>  │
//!  └───────────────────────────────┘      └──────────────────────────────┘
//! ```
//!
//! [`Node::with_subnet`] builds node number k with pod subnets 10.0.k.0/24 and
//! fd00:0:0:k::/64 instead, so that several nodes can be linked (see [`crate::twonode`]).

use std::ffi::OsStr;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use crate::agent::{Agent, AgentOptions};
use crate::env::{self, DIR_PREFIX, NETNS_PREFIX};
use crate::netns;
use crate::process::Proc;
use crate::resources::ResourceDir;
use crate::testpod::{ClientReport, HoldEvent};

/// The address on the bridge of the node [`Node::new`] builds (the pods' IPv4 gateway).
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The IPv6 address on the bridge of the node [`Node::new`] builds (the pods' IPv6
/// gateway).
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// How long a new pod's interfaces may take to become operational.
const LINK_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a test-pod server may take to start listening.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(5);

static NODE_SEQ: AtomicU32 = AtomicU32::new(0);

/// One test's isolated node. Everything it created is removed when it is dropped, also
/// when the test panics.
#[derive(Debug)]
pub struct Node {
    /// The node's network namespace.
    pub netns: String,
    /// The cgroup the agent attaches its programs to; pods' cgroups are below it.
    pub cgroup: PathBuf,
    /// The bpffs directory the agent pins under.
    pub bpffs: PathBuf,
    /// The node's number k: its pods get 10.0.k.N/24 and fd00:0:0:k::N/64.
    pub subnet: u8,
    dir: TempDir,
    resources: ResourceDir,
    pods: Mutex<Vec<Pod>>,
    next_host: AtomicU32,
    netns_created: bool,
}

impl Node {
    /// The kernel programs' counter `name` in this node's pinned maps, whatever any agent
    /// believes.
    pub fn kernel_counter(&self, name: &str) -> u64 {
        mycel_agent::metrics::KernelCounters::new(&self.bpffs)
            .read()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no kernel counter {name}"))
    }

    /// Builds a node: network namespace with `lo` and bridge `br0` up, a cgroup, a bpffs
    /// directory and an empty resource directory. Its pods get 10.0.0.N/24 and fd00::N/64.
    /// Panics if the machine cannot (call [`crate::require_root!`] first).
    #[expect(
        clippy::new_without_default,
        reason = "building a node creates namespaces and cgroups; `Default` would hide that"
    )]
    pub fn new() -> Node {
        Node::with_subnet(0)
    }

    /// Builds node number `k` as [`Node::new`] does, with pod subnets 10.0.k.0/24 and
    /// fd00:0:0:k::/64 (the bridge holds `.1` and `::1` of them), so that the pods of
    /// several nodes have distinct addresses.
    pub fn with_subnet(k: u8) -> Node {
        env::cleanup_stale();
        let id = format!(
            "{}-{}",
            std::process::id(),
            NODE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup_root = env::cgroup2_root().unwrap_or_else(|e| panic!("{e}"));
        let bpffs_root = env::bpffs_root().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{id}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let resources =
            ResourceDir::create(dir.path().join("resources"), dir.path().join("staging"));
        let mut node = Node {
            netns: format!("{NETNS_PREFIX}{id}"),
            cgroup: cgroup_root.join(format!("{DIR_PREFIX}{id}")),
            bpffs: bpffs_root.join(format!("{DIR_PREFIX}{id}")),
            subnet: k,
            dir,
            resources,
            pods: Mutex::new(Vec::new()),
            next_host: AtomicU32::new(2),
            netns_created: false,
        };
        // From here on, a panic drops `node`, which removes what was created so far.
        fs::create_dir(&node.cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", node.cgroup.display()));
        fs::create_dir(&node.bpffs)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", node.bpffs.display()));
        netns::add(&node.netns);
        node.netns_created = true;
        netns::ip_batch(
            Some(&node.netns),
            &[
                "link add br0 type bridge".to_owned(),
                format!("addr add {}/24 dev br0", node.ipv4()),
                format!("addr add {}/64 dev br0 nodad", node.ipv6()),
                "link set br0 up".to_owned(),
            ],
        );
        node
    }

    /// The node's address on its bridge: the pods' IPv4 gateway (10.0.k.1).
    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, self.subnet, 1)
    }

    /// The node's IPv6 address on its bridge: the pods' IPv6 gateway (fd00:0:0:k::1).
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0, 0, u16::from(self.subnet), 0, 0, 0, 1)
    }

    /// The test's temporary directory (agent logs, resources).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of resource YAML the agent reads.
    pub fn resources(&self) -> &ResourceDir {
        &self.resources
    }

    /// Adds a pod: network namespace `<node>-<name>` with `eth0` on the node's bridge (the
    /// next free 10.0.k.N/24 and fd00:0:0:k::N/64, default routes via the node), and cgroup
    /// `<node cgroup>/<name>`.
    pub fn pod(&self, name: &str) -> Pod {
        self.pod_with_cgroup(name, name)
    }

    /// Adds a pod as [`Node::pod`] does, with cgroup `<node cgroup>/<cgroup>` (kubelet names
    /// a pod's cgroup `pod<uid>`).
    pub fn pod_with_cgroup(&self, name: &str, cgroup: &str) -> Pod {
        let n = self.next_host.fetch_add(1, Ordering::Relaxed);
        let host = u8::try_from(n)
            .ok()
            .filter(|h| *h < 255)
            .unwrap_or_else(|| panic!("too many pods on node {}", self.netns));
        let pod = Pod {
            name: name.to_owned(),
            netns: format!("{}-{name}", self.netns),
            ipv4: Ipv4Addr::new(10, 0, self.subnet, host),
            ipv6: Ipv6Addr::new(
                0xfd00,
                0,
                0,
                u16::from(self.subnet),
                0,
                0,
                0,
                u16::from(host),
            ),
            host_if: format!("veth{host}"),
            cgroup: self.cgroup.join(cgroup),
        };
        // Record it first, so that a failure below still cleans it up.
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pod.clone());
        fs::create_dir(&pod.cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", pod.cgroup.display()));
        netns::add(&pod.netns);
        netns::ip_batch(
            Some(&self.netns),
            &[
                format!(
                    "link add {} type veth peer name eth0 netns {}",
                    pod.host_if, pod.netns
                ),
                format!("link set {} master br0", pod.host_if),
                format!("link set {} up", pod.host_if),
            ],
        );
        netns::ip_batch(
            Some(&pod.netns),
            &[
                format!("addr add {}/24 dev eth0", pod.ipv4),
                format!("addr add {}/64 dev eth0 nodad", pod.ipv6),
                "link set eth0 up".to_owned(),
                format!("route add default via {}", self.ipv4()),
                format!("route add default via {}", self.ipv6()),
            ],
        );
        for (ns, dev) in [
            (pod.netns.as_str(), "eth0"),
            (self.netns.as_str(), pod.host_if.as_str()),
            (self.netns.as_str(), "br0"),
        ] {
            netns::wait_link_ready(ns, dev, LINK_READY_TIMEOUT);
        }
        pod
    }

    /// Starts the agent with default options and waits until it is ready.
    pub fn start_agent(&self) -> Agent<'_> {
        AgentOptions::default().start(self)
    }

    /// Starts `program args…` in the node's network namespace (not in any test cgroup).
    pub fn spawn<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Proc {
        Proc::spawn(Some(&self.netns), None, program, args)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|e| e.into_inner()));
        // Processes first (by PID, from the cgroups), then the cgroups, children first.
        env::remove_cgroup_tree(&self.cgroup);
        if self.netns_created {
            netns::kill_netns_processes(&self.netns);
        }
        for pod in &pods {
            netns::kill_netns_processes(&pod.netns);
            netns::delete(&pod.netns);
        }
        if self.netns_created {
            netns::delete(&self.netns);
        }
        if let Err(e) = fs::remove_dir_all(&self.bpffs)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: cannot remove {}: {e}", self.bpffs.display());
        }
    }
}

/// A pod on a test node. Plain data: the node owns (and removes) what it names.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The pod's name (also what its test-pod servers answer).
    pub name: String,
    /// The pod's network namespace.
    pub netns: String,
    /// The pod's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// The pod's IPv6 address.
    pub ipv6: Ipv6Addr,
    /// The host side of the pod's veth, in the node's namespace.
    pub host_if: String,
    /// The pod's cgroup.
    pub cgroup: PathBuf,
}

impl Pod {
    /// Starts `program args…` in the pod's network namespace and cgroup.
    pub fn spawn<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Proc {
        Proc::spawn(Some(&self.netns), Some(&self.cgroup), program, args)
    }

    /// Starts `mycel-testpod args…` in the pod.
    pub fn testpod<S: AsRef<OsStr>>(&self, args: &[S]) -> Proc {
        self.spawn(env::testpod_bin(), args)
    }

    /// Starts a TCP server answering the pod's name on `port` (IPv4 and IPv6) and waits
    /// until it listens.
    pub fn tcp_server(&self, port: u16) -> Proc {
        self.server("tcp-server", port)
    }

    /// Starts a UDP server answering the pod's name on `port` (IPv4 and IPv6) and waits
    /// until it is bound.
    pub fn udp_server(&self, port: u16) -> Proc {
        self.server("udp-server", port)
    }

    /// Starts a TCP server that answers each line with the address it sees the client at
    /// (`getpeername()`), on `port` (IPv4 and IPv6), and waits until it listens.
    pub fn peer_server(&self, port: u16) -> Proc {
        self.started(&["tcp-peer-server", "--port", &port.to_string()])
    }

    fn server(&self, kind: &str, port: u16) -> Proc {
        self.started(&[kind, "--port", &port.to_string(), "--name", &self.name])
    }

    /// Starts a test-pod server with `args` and waits for its `ready`.
    fn started(&self, args: &[&str]) -> Proc {
        let mut proc = self.testpod(args);
        if proc
            .wait_for_line(SERVER_START_TIMEOUT, |l| l == "ready")
            .is_none()
        {
            let status = proc.try_status();
            panic!(
                "{} did not get ready within {SERVER_START_TIMEOUT:?} (exit status {status:?}); \
                 stderr: {}",
                proc.desc(),
                proc.stderr()
            );
        }
        proc
    }

    /// Runs a test-pod client to completion (bounded by `timeout`) and parses its report.
    /// Panics with the client's output if it fails.
    pub fn run_client<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> ClientReport {
        let mut proc = self.testpod(args);
        let (status, stdout, stderr) = proc.wait_output(timeout);
        assert!(
            status.success(),
            "{} failed ({status}); stderr: {stderr}",
            proc.desc()
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "{}: cannot parse its report ({e}); stdout: {stdout}; stderr: {stderr}",
                proc.desc()
            )
        })
    }

    /// `count` sequential TCP connections to `addr`, each asking the server's name.
    pub fn tcp_client(&self, addr: SocketAddr, count: u32) -> ClientReport {
        self.tcp_client_with(addr, count, &[])
    }

    /// Like [`Pod::tcp_client`] with extra client options (`--timeout-ms`, `--interval-ms`,
    /// `--until-answer`, …). The run is bounded by the count, timeout and interval.
    pub fn tcp_client_with(&self, addr: SocketAddr, count: u32, extra: &[&str]) -> ClientReport {
        let mut args = vec![
            "tcp-client".to_owned(),
            "--addr".to_owned(),
            addr.to_string(),
            "--count".to_owned(),
            count.to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        self.run_client(&args, client_budget(count, extra))
    }

    /// `count` UDP requests to `addr`, from an unconnected socket (`sendto`/`recvfrom`) or,
    /// with `connected`, a connected one.
    pub fn udp_client(&self, addr: SocketAddr, count: u32, connected: bool) -> ClientReport {
        let mut args = vec![
            "udp-client".to_owned(),
            "--addr".to_owned(),
            addr.to_string(),
            "--count".to_owned(),
            count.to_string(),
        ];
        if connected {
            args.push("--connected".to_owned());
        }
        self.run_client(&args, client_budget(count, &[]))
    }

    /// Starts a long-lived connection to `addr` that asks for the server's name every
    /// 100 ms and prints each answer; waits until it is connected. Panics if it cannot
    /// connect.
    pub fn tcp_hold(&self, addr: SocketAddr) -> (Proc, HoldEvent) {
        let proc = self.testpod(&["tcp-hold", "--addr", &addr.to_string()]);
        let line = proc.wait_for_line(Duration::from_secs(5), |l| !l.is_empty());
        let event: Option<HoldEvent> = line.as_deref().and_then(|l| serde_json::from_str(l).ok());
        match event {
            Some(e) if e.event == "connected" => (proc, e),
            other => panic!(
                "{} did not connect: first event {other:?}; stderr: {}",
                proc.desc(),
                proc.stderr()
            ),
        }
    }
}

/// Time a client run may take: per attempt its timeout and interval, plus a second for
/// starting up.
fn client_budget(count: u32, extra: &[&str]) -> Duration {
    let opt = |name: &str, default: u64| {
        extra
            .iter()
            .position(|a| *a == name)
            .and_then(|i| extra.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let per_attempt = opt("--timeout-ms", 1000) * 2 + opt("--interval-ms", 0) + opt("--hold-ms", 0);
    Duration::from_millis(1000 + u64::from(count) * per_attempt)
}
