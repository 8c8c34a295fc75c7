//! `controlplane`: the agent's Kubernetes source at cluster scale.
//!
//! The real `mycel agent --source kubernetes` runs in a node's network namespace against
//! the in-process fake API server (real HTTP list and watch, on the namespace's loopback)
//! loaded with thousands of Services, EndpointSlices and Pods, and the bench measures:
//!
//! - time to ready: from starting the process until `/readyz` answers 200, with every
//!   service and backend in the kernel maps (checked in the metrics and in the pinned maps);
//! - memory: VmRSS and VmHWM of the agent after it is ready and after the update phase;
//! - event → map latency: EndpointSlice changes stored at a steady rate, each timed from
//!   the moment the fake server stores it until the pinned `SERVICES` map shows the
//!   frontend's new backend count. Events are paced by the clock, never by the previous
//!   one landing, so a slow agent shows as latency (or lost events), not as a lower rate.

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use mycel_common::service::{PROTO_TCP, ServiceKey, ServiceValue, v4_mapped};
use mycel_tests::{
    Node, Proc, agent::ADMIN_ADDR, agent::parse_metric, env, fakeapi::FakeApiServer, netns,
};
use serde_json::{Value, json};

use super::{markdown, percentile, service_ip};

/// This node's name; a few pods run here, the others on [`OTHER_NODES`] other nodes.
const NODE_NAME: &str = "bench-node";
/// Nodes the remote pods are spread over.
const OTHER_NODES: u32 = 50;
/// Pods scheduled on this node (the agent looks for their interfaces; there are none).
const LOCAL_PODS: u32 = 4;
/// Namespaces the services and pods are spread over (`bench-0` …).
const BENCH_NAMESPACES: u32 = 4;
/// Distinct `app` labels (and service accounts) among the pods.
const APPS: u32 = 100;
/// The service port and the endpoints' (target) port.
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// An event that has not reached the map after this long is counted as lost.
const LOST_AFTER: Duration = Duration::from_secs(5);
/// How often the poller looks at the pending events' map entries.
const POLL_INTERVAL: Duration = Duration::from_micros(100);
/// How often `/readyz` is asked while the agent starts.
const READY_POLL: Duration = Duration::from_millis(10);
/// How long the agent may take to get ready before the bench gives up.
const READY_LIMIT: Duration = Duration::from_secs(180);
/// The fake API server's collections, for its request counters.
const COLLECTIONS: [&str; 5] = [
    "services",
    "endpointslices",
    "pods",
    "namespaces",
    "authorizationpolicies",
];
/// Lines of the agent's log shown when something goes wrong.
const LOG_TAIL_LINES: usize = 80;

/// Targets the results are compared against.
const TARGET_READY: Duration = Duration::from_secs(5);
const TARGET_RSS_MIB: f64 = 150.0;
const TARGET_P99: Duration = Duration::from_millis(50);

/// Options of `mycel-bench controlplane`.
#[derive(Debug, clap::Args)]
pub struct ControlPlaneArgs {
    /// Services (one TCP port each) with one EndpointSlice each.
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Ready endpoints in each EndpointSlice (backends per service).
    #[arg(long, default_value_t = 10)]
    endpoints_per_service: u32,
    /// Pods (the endpoints' addresses are theirs).
    #[arg(long, default_value_t = 20_000)]
    pods: u32,
    /// EndpointSlice changes per second in the update phase.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Length of the update phase in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u32,
    /// The agent's log filter (`--log`), e.g. `debug` to see what its source does.
    #[arg(long, default_value = "info")]
    agent_log_level: String,
    /// Also copy the agent's log to this file (by default it goes with the node's
    /// temporary directory; its tail is printed when something fails).
    #[arg(long)]
    agent_log: Option<PathBuf>,
    /// Also write every change's timing to this file (CSV: milliseconds since the update
    /// phase started when it was stored, milliseconds until it was in the map, or `lost`),
    /// to see whether slow changes come in bursts or at intervals.
    #[arg(long)]
    latencies: Option<PathBuf>,
    /// Also write the tables (Markdown) to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

impl ControlPlaneArgs {
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("--services", self.services),
            ("--endpoints-per-service", self.endpoints_per_service),
            ("--pods", self.pods),
            ("--rate", self.rate),
            ("--seconds", self.seconds),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        // 10.96.0.0/16 and the next /16s hold 65,025 addresses each (see `service_ip`);
        // the kernel's service map holds at most 65,536 frontends anyway.
        if self.services > 65_536 {
            return Err(format!(
                "--services {} is more than the service map can hold (65536)",
                self.services
            ));
        }
        if self.endpoints_per_service > 1_024 {
            return Err(format!(
                "--endpoints-per-service {} is more than one service may have (1024)",
                self.endpoints_per_service
            ));
        }
        // Pod addresses come from 10.244.0.0/14.
        if self.pods >= 1 << 18 {
            return Err(format!(
                "--pods {} is more than 10.244.0.0/14 holds",
                self.pods
            ));
        }
        Ok(())
    }

    fn backends(&self) -> u64 {
        u64::from(self.services) * u64::from(self.endpoints_per_service)
    }
}

/// The address of pod `p`: 10.244.0.1 onwards.
fn pod_ip(p: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + p + 1)
}

fn bench_namespace(n: u32) -> String {
    format!("bench-{}", n % BENCH_NAMESPACES)
}

fn pod_node(p: u32) -> String {
    if p < LOCAL_PODS {
        NODE_NAME.to_owned()
    } else {
        format!("node-{}", p % OTHER_NODES)
    }
}

/// The pod behind endpoint `j` of service `i`: consecutive services share no pod until
/// the pods run out, then they wrap around (a pod behind several services, as is common).
fn endpoint_pod(args: &ControlPlaneArgs, i: u32, j: u32) -> u32 {
    let e = u64::from(i) * u64::from(args.endpoints_per_service) + u64::from(j);
    // With fewer pods than endpoints per service, addresses past the pods keep a
    // service's endpoints distinct.
    let pool = u64::from(args.pods.max(args.endpoints_per_service));
    (e % pool) as u32
}

fn service_json(i: u32) -> Value {
    let ip = service_ip(i).to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": format!("svc-{i}"),
            "namespace": bench_namespace(i),
            "labels": {"app": format!("app-{}", i % APPS)},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "selector": {"app": format!("app-{}", i % APPS)},
            "ports": [{
                "name": "http",
                "port": SERVICE_PORT,
                "targetPort": TARGET_PORT,
                "protocol": "TCP",
            }],
        },
    })
}

/// Service `i`'s EndpointSlice; with `last_ready` false its last endpoint is not ready
/// (the change the update phase makes and undoes).
fn endpoint_slice_json(args: &ControlPlaneArgs, i: u32, last_ready: bool) -> Value {
    let n = args.endpoints_per_service;
    let endpoints: Vec<Value> = (0..n)
        .map(|j| {
            let p = endpoint_pod(args, i, j);
            let ready = last_ready || j + 1 < n;
            json!({
                "addresses": [pod_ip(p).to_string()],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": pod_node(p),
                "targetRef": {"kind": "Pod", "name": format!("pod-{p}"), "namespace": bench_namespace(p)},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("svc-{i}-x7k2p"),
            "namespace": bench_namespace(i),
            "labels": {
                "kubernetes.io/service-name": format!("svc-{i}"),
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
    })
}

/// A pod about as large as a small Deployment's pods are (without managed fields): the
/// agent has to read it all, whatever it keeps.
fn pod_json(p: u32) -> Value {
    let app = format!("app-{}", p % APPS);
    let ip = pod_ip(p).to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("pod-{p}"),
            "namespace": bench_namespace(p),
            "labels": {"app": app, "pod-template-hash": "5d8f9c7b6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": format!("{app}-5d8f9c7b6"),
                "uid": format!("00000000-0000-4000-8000-{:012}", p % APPS),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "nodeName": pod_node(p),
            "serviceAccountName": app,
            "containers": [{
                "name": "app",
                "image": format!("registry.example/{app}:1.0.0"),
                "ports": [{"containerPort": TARGET_PORT, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                "resources": {
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"memory": "256Mi"},
                },
            }],
        },
        "status": {
            "phase": "Running",
            "hostIP": "192.168.0.1",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

fn namespace_json(name: &str, mesh: bool) -> Value {
    let labels = if mesh {
        json!({"kubernetes.io/metadata.name": name, "mycel.dev/mode": "mesh"})
    } else {
        json!({"kubernetes.io/metadata.name": name})
    };
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    })
}

/// An ALLOW for `app-0` from two service accounts on the target port, and a DENY for
/// `app-1` from an address range.
fn policies_json() -> Vec<Value> {
    let ns = bench_namespace(0);
    vec![
        json!({
            "apiVersion": "mycel.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "app-0-from-frontends", "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": "app-0"}},
                "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"principals": [
                        format!("cluster.local/ns/{ns}/sa/app-4"),
                        format!("cluster.local/ns/{ns}/sa/app-8"),
                    ]}}],
                    "to": [{"operation": {"ports": [TARGET_PORT.to_string()]}}],
                }],
            },
        }),
        json!({
            "apiVersion": "mycel.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "app-1-deny-range", "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": "app-1"}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"ipBlocks": ["10.245.0.0/16"]}}]}],
            },
        }),
    ]
}

/// Every object of the cluster: namespaces, policies, pods, services and their slices.
fn cluster_objects(args: &ControlPlaneArgs) -> Vec<Value> {
    let mut objects = vec![
        namespace_json("default", false),
        namespace_json("kube-system", false),
        namespace_json("mycel-system", false),
    ];
    for n in 0..BENCH_NAMESPACES {
        objects.push(namespace_json(&bench_namespace(n), n == 0));
    }
    objects.extend(policies_json());
    objects.extend((0..args.pods).map(pod_json));
    for i in 0..args.services {
        objects.push(service_json(i));
        objects.push(endpoint_slice_json(args, i, true));
    }
    objects
}

/// `SERVICES` key of service `i`'s port.
fn service_key(i: u32) -> ServiceKey {
    ServiceKey {
        addr_be: v4_mapped(u32::from_ne_bytes(service_ip(i).octets())),
        port_be: SERVICE_PORT.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    }
}

/// The agent's pinned `SERVICES` map, opened from its pin (only read).
fn open_services_map(bpffs: &Path) -> BpfHashMap<MapData, ServiceKey, ServiceValue> {
    let pin = bpffs.join("SERVICES");
    let data = MapData::from_pin(&pin).unwrap_or_else(|e| {
        panic!(
            "cannot open the agent's map pinned at {}: {e}",
            pin.display()
        )
    });
    BpfHashMap::try_from(Map::HashMap(data))
        .unwrap_or_else(|e| panic!("{} is not the service map: {e}", pin.display()))
}

/// Frontends in the pinned map and the sum of their backend counts.
fn map_totals(bpffs: &Path) -> (u64, u64) {
    let map = open_services_map(bpffs);
    let mut totals = (0, 0);
    for entry in map.iter() {
        let (_, value) = entry.unwrap_or_else(|e| panic!("reading the pinned SERVICES map: {e}"));
        totals.0 += 1;
        totals.1 += u64::from(value.count);
    }
    totals
}

/// `GET path` on the agent's admin endpoint inside the node's namespace: (status, body).
/// HTTP/1.0, so the body ends with the connection.
fn admin_get(netns_name: &str, path: &str) -> io::Result<(u16, String)> {
    let path = path.to_owned();
    netns::run_in(netns_name, move || {
        let addr: SocketAddr = ADMIN_ADDR.parse().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{ADMIN_ADDR}: {e}"))
        })?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("GET {path}: no end of headers"),
            )
        })?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("GET {path}: bad status line"),
                )
            })?;
        Ok((status, body.to_owned()))
    })
}

/// The running agent: its process, log and the node it runs on.
struct RunningAgent<'n> {
    node: &'n Node,
    proc: Proc,
    log: PathBuf,
}

impl RunningAgent<'_> {
    fn log_tail(&self) -> String {
        env::tail(
            &fs::read_to_string(&self.log).unwrap_or_default(),
            LOG_TAIL_LINES,
        )
    }

    /// Panics with `what` and the log tail.
    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\nagent log tail ({}):\n{}",
            self.log.display(),
            self.log_tail()
        )
    }

    fn metrics(&self) -> String {
        match admin_get(&self.node.netns, "/metrics") {
            Ok((200, body)) => body,
            Ok((status, body)) => self.fail(&format!("GET /metrics answered {status}: {body}")),
            Err(e) => self.fail(&format!("GET /metrics failed: {e}")),
        }
    }

    fn metric(&self, name: &str) -> f64 {
        parse_metric(&self.metrics(), name)
            .into_iter()
            .map(|(_, v)| v)
            .sum()
    }

    /// (VmRSS, VmHWM) in MiB from `/proc/<pid>/status`.
    fn memory(&mut self) -> (f64, f64) {
        if let Some(status) = self.proc.try_status() {
            self.fail(&format!("the agent exited ({status})"));
        }
        let path = format!("/proc/{}/status", self.proc.pid());
        let text = fs::read_to_string(&path).unwrap_or_else(|e| self.fail(&format!("{path}: {e}")));
        let field = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .unwrap_or_else(|| self.fail(&format!("{path} has no {name}")))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time the agent's threads ran, and how long they waited on a run queue for a
    /// CPU, from `/proc/<pid>/task/*/schedstat` (nanoseconds; threads that already
    /// exited are not counted). Waiting shows when the machine, not the agent, was slow.
    fn cpu(&self) -> Cpu {
        let tasks = format!("/proc/{}/task", self.proc.pid());
        let mut cpu = Cpu::default();
        let Ok(entries) = fs::read_dir(&tasks) else {
            return cpu;
        };
        for entry in entries.flatten() {
            let Ok(text) = fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            let mut fields = text
                .split_whitespace()
                .map(|f| f.parse::<u64>().unwrap_or(0));
            cpu.run += Duration::from_nanos(fields.next().unwrap_or(0));
            cpu.wait += Duration::from_nanos(fields.next().unwrap_or(0));
        }
        cpu
    }

    /// Polls `/readyz` every [`READY_POLL`] from `started`; returns when it answered 200.
    fn wait_ready(&mut self, started: Instant) -> Duration {
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self.proc.try_status() {
                self.fail(&format!(
                    "the agent exited ({status}) before it was ready; last /readyz: {last}"
                ));
            }
            match admin_get(&self.node.netns, "/readyz") {
                Ok((200, _)) => return started.elapsed(),
                Ok((status, body)) => last = format!("{status} {}", body.trim()),
                Err(e) => last = e.to_string(),
            }
            if started.elapsed() > READY_LIMIT {
                self.fail(&format!(
                    "the agent was not ready {READY_LIMIT:?} after it started; last /readyz: {last}"
                ));
            }
            thread::sleep(READY_POLL);
        }
    }
}

/// CPU time of a process's threads: running, and runnable but waiting for a CPU.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    run: Duration,
    wait: Duration,
}

impl Cpu {
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            run: self.run.saturating_sub(earlier.run),
            wait: self.wait.saturating_sub(earlier.wait),
        }
    }
}

/// One EndpointSlice change on its way to the map.
struct Pending {
    service: u32,
    key: ServiceKey,
    /// The backend count the frontend has once the change is programmed.
    expected: u16,
    /// Just before the fake server stored the change.
    stored: Instant,
}

/// What became of one change: its latency, or `None` if it never reached the map.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    service: u32,
    stored: Instant,
    latency: Option<Duration>,
}

/// Watches the pending changes' frontends in the pinned map until each shows its
/// expected backend count (or [`LOST_AFTER`] passes); tells the sender which services are
/// free again. Returns every outcome when the sender is done and nothing is pending.
fn poll_map(
    bpffs: PathBuf,
    incoming: mpsc::Receiver<Pending>,
    done: mpsc::Sender<Outcome>,
) -> Vec<Outcome> {
    let map = open_services_map(&bpffs);
    let mut pending: Vec<Pending> = Vec::new();
    let mut outcomes = Vec::new();
    let mut open = true;
    loop {
        // Nothing to watch: sleep until the next change arrives instead of spinning.
        if pending.is_empty() {
            match incoming.recv() {
                Ok(p) => pending.push(p),
                Err(_) => break,
            }
        }
        while open {
            match incoming.try_recv() {
                Ok(p) => pending.push(p),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        pending.retain(|p| {
            let count = map.get(&p.key, 0).ok().map(|v| v.count);
            let now = Instant::now();
            // A frontend left without backends may also be removed rather than kept with
            // a count of zero.
            let landed = count == Some(p.expected) || (count.is_none() && p.expected == 0);
            let latency = if landed {
                Some(now.duration_since(p.stored))
            } else if now.duration_since(p.stored) > LOST_AFTER {
                None
            } else {
                return true;
            };
            let outcome = Outcome {
                service: p.service,
                stored: p.stored,
                latency,
            };
            // The sender may have finished and gone; the outcome is kept here either way.
            let _ = done.send(outcome);
            outcomes.push(outcome);
            false
        });
        if !open && pending.is_empty() {
            break;
        }
        if !pending.is_empty() {
            thread::sleep(POLL_INTERVAL);
        }
    }
    outcomes
}

/// What the update phase measured.
struct Updates {
    /// Latencies of the changes that reached the map, sorted.
    latencies: Vec<Duration>,
    lost: usize,
    /// Changes not made because every service still had one in flight.
    skipped: u32,
    sent: u32,
    elapsed: Duration,
    /// Backends the maps should hold at the end, if no change was lost.
    expected_backends: Option<u64>,
}

/// Stores `rate × seconds` EndpointSlice changes, paced by the clock, each flipping the
/// last endpoint of the next service (round robin) between ready and not ready; times
/// each one to the map independently.
fn update_phase(api: &FakeApiServer, bpffs: &Path, args: &ControlPlaneArgs) -> Updates {
    let (pending_tx, pending_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<Outcome>();
    let poller = {
        let bpffs = bpffs.to_path_buf();
        thread::Builder::new()
            .name("map-poller".into())
            .spawn(move || poll_map(bpffs, pending_rx, done_tx))
            .unwrap_or_else(|e| panic!("cannot spawn the map poller: {e}"))
    };
    let services = args.services;
    let full = u16::try_from(args.endpoints_per_service).unwrap_or(u16::MAX);
    let mut last_ready = vec![true; services as usize];
    // A service with a change in flight is not changed again until it lands, so that each
    // change has one unambiguous expected count; one whose change was lost is left alone.
    let mut in_flight: HashSet<u32> = HashSet::new();
    let mut retired: HashSet<u32> = HashSet::new();
    let total = args.rate.saturating_mul(args.seconds);
    let interval = Duration::from_secs(1) / args.rate;
    let (mut cursor, mut skipped, mut sent) = (0u32, 0u32, 0u32);
    let start = Instant::now();
    for k in 0..total {
        let due = start + interval * k;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        while let Ok(o) = done_rx.try_recv() {
            in_flight.remove(&o.service);
            if o.latency.is_none() {
                retired.insert(o.service);
            }
        }
        let Some(i) = (0..services)
            .map(|d| (cursor + d) % services)
            .find(|i| !in_flight.contains(i) && !retired.contains(i))
        else {
            skipped += 1;
            continue;
        };
        cursor = (i + 1) % services;
        let ready = !last_ready[i as usize];
        last_ready[i as usize] = ready;
        let object = endpoint_slice_json(args, i, ready);
        in_flight.insert(i);
        let stored = Instant::now();
        api.apply_json(object);
        sent += 1;
        let pending = Pending {
            service: i,
            key: service_key(i),
            expected: if ready { full } else { full - 1 },
            stored,
        };
        if pending_tx.send(pending).is_err() {
            panic!("the map poller stopped");
        }
    }
    let elapsed = start.elapsed();
    drop(pending_tx);
    let outcomes = poller
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    if let Some(path) = &args.latencies {
        let mut csv = String::from("stored_ms,latency_ms\n");
        for o in &outcomes {
            let at = o.stored.saturating_duration_since(start).as_secs_f64() * 1e3;
            let _ = match o.latency {
                Some(l) => writeln!(csv, "{at:.3},{:.3}", l.as_secs_f64() * 1e3),
                None => writeln!(csv, "{at:.3},lost"),
            };
        }
        if let Err(e) = fs::write(path, csv) {
            eprintln!("cannot write the latencies to {}: {e}", path.display());
        }
    }
    let mut latencies: Vec<Duration> = outcomes.iter().filter_map(|o| o.latency).collect();
    latencies.sort_unstable();
    let lost = outcomes.len() - latencies.len();
    let expected_backends = (lost == 0).then(|| {
        last_ready
            .iter()
            .map(|r| u64::from(if *r { full } else { full - 1 }))
            .sum()
    });
    Updates {
        latencies,
        lost,
        skipped,
        sent,
        elapsed,
        expected_backends,
    }
}

/// Cumulative buckets of the agent's `mycel_update_latency_seconds` (source sees a change
/// → maps hold it): (upper bound in seconds, observations), by bound.
fn latency_buckets(metrics: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = parse_metric(metrics, "mycel_update_latency_seconds_bucket")
        .into_iter()
        .filter_map(|(labels, count)| Some((labels.get("le")?.parse::<f64>().ok()?, count)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The agent's own view of the updates between two snapshots of its histogram: how many
/// updates it applied, and the upper bounds (seconds) of the buckets holding their p50 and
/// p99. `None` if it applied none (or has no such histogram).
fn agent_view(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<(f64, f64, f64)> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, m)| *m);
            (*le, n - earlier)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let bound = |q: f64| {
        delta
            .iter()
            .find(|(_, n)| *n >= q * total)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    Some((total, bound(0.5), bound(0.99)))
}

/// Percentile `p` of sorted durations, nearest rank.
fn percentile_d(sorted: &[Duration], p: f64) -> Duration {
    let micros: Vec<u64> = sorted.iter().map(|d| d.as_micros() as u64).collect();
    Duration::from_micros(percentile(&micros, p))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}

fn verdict(ok: bool) -> String {
    if ok { "✅" } else { "❌" }.to_owned()
}

/// Runs the bench; returns the report and whether every check passed (the agent programmed
/// exactly the cluster's services and backends and no change was lost).
pub fn run(args: &ControlPlaneArgs) -> Result<(String, bool), String> {
    args.check()?;
    let node = Node::new();
    let api = FakeApiServer::start_in_netns(&node.netns);
    let kubeconfig = node.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);

    let t = Instant::now();
    let objects = cluster_objects(args);
    let count = objects.len();
    api.apply_many_json(objects);
    eprintln!(
        "controlplane: the fake API server holds {count} objects ({} services, {} endpoint \
         slices × {} endpoints, {} pods), stored in {:.1} s",
        args.services,
        args.services,
        args.endpoints_per_service,
        args.pods,
        t.elapsed().as_secs_f64()
    );

    // Room for every backend twice over: a changed service's new slots are written before
    // its old ones are freed.
    let max_backends = (2 * args.backends()).max(262_144);
    let max_ipcache = (2 * u64::from(args.pods)).max(65_536);
    let agent_args: Vec<String> = vec![
        "agent".into(),
        "--log".into(),
        args.agent_log_level.clone(),
        "--source".into(),
        "kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--node-name".into(),
        NODE_NAME.into(),
        "--cgroup".into(),
        node.cgroup.display().to_string(),
        "--bpffs".into(),
        node.bpffs.display().to_string(),
        "--admin-addr".into(),
        ADMIN_ADDR.into(),
        "--max-backends".into(),
        max_backends.to_string(),
        "--max-ipcache-entries".into(),
        max_ipcache.to_string(),
    ];
    let log = node.dir().join("agent.log");
    eprintln!("controlplane: starting the agent, polling /readyz every {READY_POLL:?}");
    let started = Instant::now();
    let proc = Proc::spawn_logged(Some(&node.netns), env::mycel_bin(), &agent_args, &log);
    let mut agent = RunningAgent {
        node: &node,
        proc,
        log,
    };
    let to_ready = agent.wait_ready(started);
    let cpu_ready = agent.cpu();
    let (rss_ready, _) = agent.memory();
    let services_metric = agent.metric("mycel_services_programmed");
    let backends_metric = agent.metric("mycel_backends_programmed");
    let (map_services, map_backends) = map_totals(&node.bpffs);
    eprintln!(
        "controlplane: ready after {}; metrics: {services_metric} services, {backends_metric} \
         backends; pinned maps: {map_services} frontends, {map_backends} backends",
        ms(to_ready)
    );
    let mut problems = Vec::new();
    let want = (u64::from(args.services), args.backends());
    if (services_metric as u64, backends_metric as u64) != want
        || (map_services, map_backends) != want
    {
        problems.push(format!(
            "at ready the agent reported {services_metric} services / {backends_metric} \
             backends and the maps held {map_services} / {map_backends}, expected {} / {}",
            want.0, want.1
        ));
    }

    eprintln!(
        "controlplane: {} EndpointSlice changes/s for {} s",
        args.rate, args.seconds
    );
    let buckets_before = latency_buckets(&agent.metrics());
    let cpu_before = agent.cpu();
    let updates = update_phase(&api, &node.bpffs, args);
    let cpu_updates = agent.cpu().since(cpu_before);
    // Other work on the machine shows in the tail latencies; say how busy it was.
    let load = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    let agent_updates = agent_view(&buckets_before, &latency_buckets(&agent.metrics()));
    let (rss_after, peak) = agent.memory();
    if updates.lost > 0 {
        problems.push(format!(
            "{} of {} changes never reached the map within {LOST_AFTER:?}",
            updates.lost, updates.sent
        ));
    }
    if let Some(expected) = updates.expected_backends {
        // Every change was seen in the map; the totals must agree too.
        let backends = agent.metric("mycel_backends_programmed") as u64;
        let (_, in_map) = map_totals(&node.bpffs);
        if backends != expected || in_map != expected {
            problems.push(format!(
                "after the updates the agent reported {backends} backends and the maps held \
                 {in_map}, expected {expected}"
            ));
        }
    }
    let source_errors = agent.metric("mycel_source_errors_total");
    if source_errors > 0.0 {
        problems.push(format!(
            "the agent counted {source_errors} source errors (mycel_source_errors_total)"
        ));
    }
    // A relist or a restarted watch would cost the agent a full list again; each kind
    // should be listed once and watched once.
    let requests = COLLECTIONS.iter().fold((0, 0, 0), |acc, c| {
        let s = api.stats(c);
        (acc.0 + s.lists, acc.1 + s.list_pages, acc.2 + s.watches)
    });
    if !problems.is_empty() {
        eprintln!("agent log tail:\n{}", agent.log_tail());
    }
    if let Some(copy) = &args.agent_log
        && let Err(e) = fs::copy(&agent.log, copy)
    {
        eprintln!("cannot copy the agent's log to {}: {e}", copy.display());
    }
    drop(agent);
    drop(api);
    drop(node);

    let l = &updates.latencies;
    let (p50, p90, p99, max) = (
        percentile_d(l, 50.0),
        percentile_d(l, 90.0),
        percentile_d(l, 99.0),
        percentile_d(l, 100.0),
    );
    let target_mib = format!("< {TARGET_RSS_MIB:.0} MiB");
    let rows = vec![
        [
            "time to ready (process start → /readyz 200)".to_owned(),
            ms(to_ready),
            format!("< {} s", TARGET_READY.as_secs()),
            verdict(to_ready < TARGET_READY),
        ],
        [
            "  agent CPU time until ready / waiting for a CPU".to_owned(),
            format!("{} / {}", ms(cpu_ready.run), ms(cpu_ready.wait)),
            String::new(),
            String::new(),
        ],
        [
            "services / backends in the maps at ready".to_owned(),
            format!("{map_services} / {map_backends}"),
            format!("{} / {}", want.0, want.1),
            verdict((map_services, map_backends) == want),
        ],
        [
            "RSS after ready (VmRSS)".to_owned(),
            mib(rss_ready),
            target_mib.clone(),
            verdict(rss_ready < TARGET_RSS_MIB),
        ],
        [
            "RSS after the updates (VmRSS)".to_owned(),
            mib(rss_after),
            target_mib.clone(),
            verdict(rss_after < TARGET_RSS_MIB),
        ],
        [
            "peak RSS (VmHWM)".to_owned(),
            mib(peak),
            target_mib,
            verdict(peak < TARGET_RSS_MIB),
        ],
        [
            "event → map p50".to_owned(),
            ms(p50),
            String::new(),
            String::new(),
        ],
        [
            "event → map p90".to_owned(),
            ms(p90),
            String::new(),
            String::new(),
        ],
        [
            "event → map p99".to_owned(),
            ms(p99),
            format!("< {} ms", TARGET_P99.as_millis()),
            verdict(!l.is_empty() && p99 < TARGET_P99),
        ],
        [
            "event → map max".to_owned(),
            ms(max),
            String::new(),
            String::new(),
        ],
        [
            "the agent's own update latency (its histogram, from its watch seeing a change \
             to the maps), p50 / p99"
                .to_owned(),
            match agent_updates {
                Some((n, p50, p99)) => format!(
                    "≤ {} / ≤ {} ({n:.0} updates)",
                    ms(Duration::from_secs_f64(p50.min(1e6))),
                    ms(Duration::from_secs_f64(p99.min(1e6)))
                ),
                None => "no updates recorded".to_owned(),
            },
            String::new(),
            String::new(),
        ],
        [
            "  agent CPU time during the updates / waiting for a CPU".to_owned(),
            format!(
                "{} / {} ({:.2} ms CPU per change)",
                ms(cpu_updates.run),
                ms(cpu_updates.wait),
                cpu_updates.run.as_secs_f64() * 1e3 / f64::from(updates.sent.max(1))
            ),
            String::new(),
            String::new(),
        ],
        [
            format!(
                "API requests of the agent: lists (pages) / watches, {} kinds",
                COLLECTIONS.len()
            ),
            format!("{} ({}) / {}", requests.0, requests.1, requests.2),
            String::new(),
            String::new(),
        ],
        [
            format!(
                "events stored / lost (not in the map within {} s)",
                LOST_AFTER.as_secs()
            ),
            format!("{} / {}", updates.sent, updates.lost),
            "0 lost".to_owned(),
            verdict(updates.lost == 0 && updates.sent > 0),
        ],
    ];
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nKubernetes source: {} Services with one EndpointSlice each ({} ready endpoints: {} \
         backends), {} Pods ({LOCAL_PODS} on this node), {} Namespaces, 2 AuthorizationPolicies; \
         the agent against an in-process fake API server (real HTTP list/watch) on the node's \
         loopback\n",
        args.services,
        args.endpoints_per_service,
        args.backends(),
        args.pods,
        3 + BENCH_NAMESPACES,
    );
    out.push_str(&markdown(
        &["measurement", "result", "target", "met"],
        &rows,
    ));
    let _ = writeln!(
        out,
        "\nUpdates: {} EndpointSlice changes in {:.1} s ({:.0}/s), each flipping one \
         endpoint's `ready` in the next service; latency from just before the API server \
         stores the change to the pinned `SERVICES` map showing the frontend's new backend \
         count (polled every {} µs), every change timed on its own while the next ones keep \
         coming.{} Time to ready is polled every {} ms. Machine: {cores} CPU cores, shared by \
         the agent, the fake API server and the bench; load average {load} at the end of \
         the updates.",
        updates.sent,
        updates.elapsed.as_secs_f64(),
        f64::from(updates.sent) / updates.elapsed.as_secs_f64().max(1e-9),
        POLL_INTERVAL.as_micros(),
        if updates.skipped > 0 {
            format!(
                " {} changes were skipped: every service had one in flight.",
                updates.skipped
            )
        } else {
            String::new()
        },
        READY_POLL.as_millis(),
    );
    for p in &problems {
        let _ = writeln!(out, "\n**Problem:** {p}");
    }
    Ok((out, problems.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(services: u32, endpoints: u32, pods: u32) -> ControlPlaneArgs {
        ControlPlaneArgs {
            services,
            endpoints_per_service: endpoints,
            pods,
            rate: 100,
            seconds: 1,
            agent_log_level: "info".into(),
            agent_log: None,
            latencies: None,
            output: None,
        }
    }

    #[test]
    fn endpoints_of_a_service_are_distinct_pods() {
        for a in [
            args(10_000, 10, 20_000),
            args(50, 10, 3),
            args(7, 1_024, 100),
        ] {
            for i in 0..a.services {
                let pods: HashSet<u32> = (0..a.endpoints_per_service)
                    .map(|j| endpoint_pod(&a, i, j))
                    .collect();
                assert_eq!(pods.len(), a.endpoints_per_service as usize, "service {i}");
            }
        }
    }

    #[test]
    fn pod_addresses_are_distinct_and_in_the_pod_range() {
        let mut seen = HashSet::new();
        for p in 0..(1 << 18) - 1 {
            let ip = pod_ip(p);
            assert!(seen.insert(ip), "pod {p}");
            assert_eq!(
                u32::from(ip) >> 18,
                u32::from(Ipv4Addr::new(10, 244, 0, 0)) >> 18
            );
        }
    }

    #[test]
    fn a_changed_slice_has_one_endpoint_less_ready() {
        let a = args(3, 10, 100);
        let ready = |v: &Value| {
            v["endpoints"].as_array().map(|e| {
                e.iter()
                    .filter(|e| e["conditions"]["ready"] == true)
                    .count()
            })
        };
        assert_eq!(ready(&endpoint_slice_json(&a, 1, true)), Some(10));
        assert_eq!(ready(&endpoint_slice_json(&a, 1, false)), Some(9));
        assert_eq!(
            endpoint_slice_json(&a, 1, false)["metadata"]["labels"]["kubernetes.io/service-name"],
            "svc-1"
        );
    }

    #[test]
    fn generated_objects_are_valid_kubernetes_objects() {
        use k8s_openapi::api::{
            core::v1::{Namespace, Pod, Service},
            discovery::v1::EndpointSlice,
        };
        let a = args(20, 10, 40);
        let pod: Pod = serde_json::from_value(pod_json(7)).expect("pod");
        let status = pod.status.expect("pod status");
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.8"));
        assert_eq!(
            pod.spec.and_then(|s| s.node_name).as_deref(),
            Some("node-7")
        );
        let svc: Service = serde_json::from_value(service_json(3)).expect("service");
        assert_eq!(
            svc.spec.and_then(|s| s.cluster_ip).as_deref(),
            Some("10.96.0.4")
        );
        let slice: EndpointSlice =
            serde_json::from_value(endpoint_slice_json(&a, 3, false)).expect("slice");
        assert_eq!(slice.endpoints.len(), 10);
        let _: Namespace = serde_json::from_value(namespace_json("bench-0", true)).expect("ns");
        for p in policies_json() {
            assert_eq!(p["kind"], "AuthorizationPolicy");
        }
        // Every object has what the fake API server needs to store it.
        let objects = cluster_objects(&a);
        assert_eq!(objects.len(), 3 + 4 + 2 + 40 + 2 * 20);
        assert!(objects.iter().all(|o| o["metadata"]["name"].is_string()));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_flag_named() {
        assert!(args(10, 10, 10).check().is_ok());
        let e = args(0, 10, 10).check().unwrap_err();
        assert!(e.contains("--services"), "{e}");
        let e = args(70_000, 10, 10).check().unwrap_err();
        assert!(e.contains("--services 70000"), "{e}");
        let e = args(10, 2_000, 10).check().unwrap_err();
        assert!(e.contains("--endpoints-per-service"), "{e}");
    }

    #[test]
    fn agent_view_reads_the_histogram_difference() {
        let text = |counts: [u32; 4]| {
            format!(
                "mycel_update_latency_seconds_bucket{{le=\"0.001\"}} {}\n\
                 mycel_update_latency_seconds_bucket{{le=\"0.002\"}} {}\n\
                 mycel_update_latency_seconds_bucket{{le=\"0.004\"}} {}\n\
                 mycel_update_latency_seconds_bucket{{le=\"+Inf\"}} {}\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        // One update before (the initial sync, slow); then 100: 60 within 1 ms, 39 more
        // within 2 ms, one slower than 4 ms.
        let before = latency_buckets(&text([0, 0, 0, 1]));
        let after = latency_buckets(&text([60, 99, 99, 101]));
        assert_eq!(before.last(), Some(&(f64::INFINITY, 1.0)));
        let (n, p50, p99) = agent_view(&before, &after).expect("updates");
        assert_eq!((n, p50, p99), (100.0, 0.001, 0.002));
        assert!(agent_view(&after, &after).is_none());
    }

    #[test]
    fn service_keys_match_the_map_layout() {
        let key = service_key(0);
        // IPv4-mapped ::ffff:10.96.0.1, port 80 in network order.
        let bytes: Vec<u8> = key.addr_be.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 1]
        );
        assert_eq!(key.port_be.to_ne_bytes(), [0, 80]);
        assert_eq!(key.proto, 6);
    }
}
