//! `mtls`: what the mesh costs between two nodes, side by side in one run.
//!
//! Two nodes on one machine ([`TwoNodes`]), a client pod on node 1 and a server pod on
//! node 2, and three variants of the same traffic:
//!
//! - `direct`: no agent running (the agents start with `--detach-on-exit`, so when they
//!   stop no program stays attached);
//! - `l4`: both agents running, nothing enrolled: the kernel programs count and police
//!   the flows, no proxy;
//! - `mtls`: both pods enrolled (`mycel.dev/mode: mesh`, `mycel.dev/mtls-mode: STRICT`):
//!   node 1's proxy captures the client's connections and tunnels them as HBONE over
//!   mutual TLS to node 2's proxy, which connects to the server.
//!
//! Each round measures every variant (in alternating order, so none always runs on a
//! warmer machine): iperf3 throughput with one and four streams, 64-byte round trips over
//! one connection, HTTP/1.1 keep-alive requests with wrk, and new connections per second;
//! the agents' CPU time is read over the iperf3 runs. After the rounds, the agents' memory
//! is read idle and with 1,000 idle connections open through them. Tables report the
//! median of the rounds and the ratio to `direct`; targets are printed next to the
//! numbers, the bench does not fail on them.
//!
//! When enrolling the pods does not send their traffic through the proxy (the agent's
//! proxy counts no mutual-TLS connection), the `mtls` variant is reported as not
//! available, with the reason, and the other two still run.

use std::{
    fmt::Write as _,
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use mycel_tests::{
    Agent, AgentOptions, Pod, Proc, WorkloadYaml, agent::parse_metric, netns, twonode::TwoNodes,
};
use serde::{Deserialize, Serialize};

use super::{markdown, median_f, percentile};

/// The size of every request and response of the round-trip and connection tests.
const MESSAGE: usize = 64;
/// Server ports in the server pod.
const RR_PORT: u16 = 7000;
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
/// Round trips before the timed ones, to warm the path (and the proxy's tunnel) up.
const WARMUP_ROUND_TRIPS: u32 = 200;
/// wrk's connections (keep-alive) and threads.
const WRK_CONNECTIONS: u32 = 16;
const WRK_THREADS: u32 = 1;
/// Connections the availability probe of the `mtls` variant needs answered, and how long
/// it keeps connecting (the first connection also sets the tunnel up).
const PROBE_CONNECTIONS: u32 = 5;
const PROBE_MS: u64 = 500;
/// How long the agents may take to apply a changed resource file.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to start listening.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of a client's own running time before it counts as hung.
const CLIENT_SLACK: Duration = Duration::from_secs(20);
/// How long the agents' memory may settle after connections open or close.
const SETTLE: Duration = Duration::from_millis(500);
/// Workload labels that enroll a pod in the mesh and select its mTLS mode.
const MODE_LABEL: &str = "mycel.dev/mode";
const MTLS_MODE_LABEL: &str = "mycel.dev/mtls-mode";

/// Targets, printed next to the results of the `mtls` variant.
const TARGET_SINGLE_STREAM: f64 = 0.5;
const TARGET_PARALLEL_GAIN: f64 = 1.5;
const TARGET_ADDED_P50_US: f64 = 30.0;
const TARGET_CONNECTION_RATE: f64 = 0.5;
const TARGET_RSS_IDLE_MIB: f64 = 20.0;
const TARGET_RSS_CONNECTIONS_MIB: f64 = 40.0;

/// Options of `mycel-bench mtls`.
#[derive(Debug, clap::Args)]
pub struct MtlsArgs {
    /// Rounds; each measures every variant once.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of each iperf3 and wrk run.
    #[arg(long, default_value_t = 2)]
    seconds: u32,
    /// Timed 64-byte round trips per variant and round.
    #[arg(long, default_value_t = 2_000)]
    round_trips: u32,
    /// Milliseconds of new connections per variant and round.
    #[arg(long, default_value_t = 1_000)]
    connect_ms: u64,
    /// Idle connections held open for the memory measurement.
    #[arg(long, default_value_t = 1_000)]
    idle_connections: u32,
    /// Also write the tables (Markdown) to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

impl MtlsArgs {
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("--rounds", u64::from(self.rounds)),
            ("--seconds", u64::from(self.seconds)),
            ("--round-trips", u64::from(self.round_trips)),
            ("--connect-ms", self.connect_ms),
            ("--idle-connections", u64::from(self.idle_connections)),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if self.seconds > 60 {
            return Err(format!(
                "--seconds {} is more than a round should take (at most 60)",
                self.seconds
            ));
        }
        if self.idle_connections > 20_000 {
            return Err(format!(
                "--idle-connections {} is more than one client port range holds (at most \
                 20000)",
                self.idle_connections
            ));
        }
        Ok(())
    }
}

/// The programs the bench runs inside the pods (`mycel-bench mtls-pod …`).
#[derive(Debug, clap::Subcommand)]
pub enum PodCommand {
    /// Echoes every 64-byte message of every connection. Prints `ready` once listening.
    RrServer {
        /// Port to listen on, IPv4 and IPv6.
        #[arg(long)]
        port: u16,
    },
    /// Answers every HTTP/1.1 request with a short body, keeping connections alive.
    /// Prints `ready` once listening.
    HttpServer {
        /// Port to listen on, IPv4 and IPv6.
        #[arg(long)]
        port: u16,
    },
    /// 64-byte round trips over one connection; prints [`RoundTrips`].
    RrClient {
        /// The server.
        #[arg(long)]
        addr: SocketAddr,
        /// Timed round trips.
        #[arg(long)]
        count: u32,
    },
    /// Connect, one 64-byte request/response, close, for `--millis`; prints
    /// [`Connections`].
    ConnClient {
        /// The server.
        #[arg(long)]
        addr: SocketAddr,
        /// How long to keep connecting.
        #[arg(long)]
        millis: u64,
    },
    /// Opens `--count` connections, each with one round trip, prints [`Held`] and keeps
    /// them open until stdin closes.
    Hold {
        /// The server.
        #[arg(long)]
        addr: SocketAddr,
        /// Connections to open.
        #[arg(long)]
        count: u32,
    },
}

/// What `rr-client` prints.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RoundTrips {
    p50_ns: u64,
    p99_ns: u64,
    count: usize,
}

/// What `conn-client` prints.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Connections {
    completed: u64,
    failed: u64,
    elapsed_us: u64,
    first_error: Option<String>,
}

impl Connections {
    fn rate(&self) -> f64 {
        self.completed as f64 / (self.elapsed_us.max(1) as f64 / 1e6)
    }
}

/// What `hold` prints once its connections are open.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Held {
    opened: u32,
    failed: u32,
    first_error: Option<String>,
}

/// Runs a pod program; prints its result as one JSON line.
pub fn pod_main(cmd: PodCommand) -> ExitCode {
    raise_open_files_limit();
    let result = match cmd {
        PodCommand::RrServer { port } => rr_server(port),
        PodCommand::HttpServer { port } => http_server(port),
        PodCommand::RrClient { addr, count } => print_json(&rr_client(addr, count)),
        PodCommand::ConnClient { addr, millis } => print_json(&conn_client(addr, millis)),
        PodCommand::Hold { addr, count } => hold(addr, count),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mycel-bench mtls-pod: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: Serialize>(value: &io::Result<T>) -> io::Result<()> {
    let value = value
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)
}

/// Raises the soft limit of open files to the hard limit: 1,000 connections held open
/// need more than the common default of 1,024 descriptors, in the client, the server and
/// the agents (which inherit it from the bench).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Exits the process when stdin reaches end of file: the bench that started it is gone.
fn exit_on_stdin_eof() {
    thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

fn rr_server(port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
    println!("ready");
    exit_on_stdin_eof();
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors, most likely: wait for some to close.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Small stacks: the memory test holds a thousand of these threads.
        let _ = thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || echo(conn));
    }
    Ok(())
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; MESSAGE];
    while conn.read_exact(&mut buf).is_ok() {
        if conn.write_all(&buf).is_err() {
            return;
        }
    }
}

fn http_server(port: u16) -> io::Result<()> {
    use http_body_util::Full;
    use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;

    // One thread, as a small service would run: the machine's two cores are shared with
    // wrk, the proxies and the kernel's network work.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await?;
        println!("ready");
        exit_on_stdin_eof();
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"mycel bench: ok\n",
                    ))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// One round trip on `conn`: 64 bytes out, 64 back.
fn round_trip(conn: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0x5au8; MESSAGE];
    conn.write_all(&buf)?;
    conn.read_exact(&mut buf)
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}

fn rr_client(addr: SocketAddr, count: u32) -> io::Result<RoundTrips> {
    let mut conn = connect(addr)?;
    for _ in 0..WARMUP_ROUND_TRIPS {
        round_trip(&mut conn)?;
    }
    let mut ns = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        round_trip(&mut conn)?;
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    ns.sort_unstable();
    Ok(RoundTrips {
        p50_ns: percentile(&ns, 50.0),
        p99_ns: percentile(&ns, 99.0),
        count: ns.len(),
    })
}

fn conn_client(addr: SocketAddr, millis: u64) -> io::Result<Connections> {
    let mut r = Connections::default();
    let budget = Duration::from_millis(millis);
    let start = Instant::now();
    while start.elapsed() < budget {
        match connect(addr).and_then(|mut c| round_trip(&mut c)) {
            Ok(()) => r.completed += 1,
            Err(e) => {
                r.failed += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    r.elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok(r)
}

fn hold(addr: SocketAddr, count: u32) -> io::Result<()> {
    let mut held = Held::default();
    let mut conns = Vec::with_capacity(count as usize);
    for _ in 0..count {
        match connect(addr).and_then(|mut c| round_trip(&mut c).map(|()| c)) {
            Ok(c) => {
                conns.push(c);
                held.opened += 1;
            }
            Err(e) => {
                held.failed += 1;
                held.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    print_json(&Ok(held))?;
    // Keep the connections until the bench closes stdin (or kills us).
    let mut buf = [0u8; 64];
    let mut stdin = io::stdin();
    while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
    drop(conns);
    Ok(())
}

/// The variants, in the order of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Direct,
    L4,
    Mtls,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Direct, Variant::L4, Variant::Mtls];

    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::L4 => "l4",
            Variant::Mtls => "mtls",
        }
    }

    fn index(self) -> usize {
        match self {
            Variant::Direct => 0,
            Variant::L4 => 1,
            Variant::Mtls => 2,
        }
    }
}

/// The two agents and what the resource files say, switched between the variants.
struct Mesh<'t> {
    two: &'t TwoNodes,
    client: &'t Pod,
    server: &'t Pod,
    agents: Option<(Agent<'t>, Agent<'t>)>,
    /// Whether the workload files enroll the pods; `None` before the first write.
    enrolled: Option<bool>,
}

impl<'t> Mesh<'t> {
    fn set(&mut self, variant: Variant) {
        match variant {
            Variant::Direct => self.stop_agents(),
            Variant::L4 => {
                self.enroll(false);
                self.start_agents();
            }
            Variant::Mtls => {
                self.enroll(true);
                self.start_agents();
            }
        }
    }

    fn start_agents(&mut self) {
        if self.agents.is_none() {
            // Without `--detach-on-exit` the programs would stay attached (and keep
            // redirecting) after the agents stop, and `direct` would not be direct.
            self.agents = Some(
                self.two
                    .start_agents(AgentOptions::default().arg("--detach-on-exit")),
            );
        }
    }

    fn stop_agents(&mut self) {
        if let Some((mut a, mut b)) = self.agents.take() {
            for (agent, node) in [(&mut a, "node 1"), (&mut b, "node 2")] {
                let status = agent.stop();
                assert!(
                    status.success(),
                    "{node}'s agent exited with {status} on SIGTERM\nagent log tail:\n{}",
                    agent.log_tail(40)
                );
            }
        }
    }

    fn agents(&self) -> [&Agent<'t>; 2] {
        let (a, b) = self
            .agents
            .as_ref()
            .unwrap_or_else(|| panic!("the agents are not running"));
        [a, b]
    }

    /// Rewrites the workloads (enrolled in STRICT mTLS, or not) on both nodes and, if the
    /// agents run, waits until both applied the change.
    fn enroll(&mut self, on: bool) {
        if self.enrolled == Some(on) {
            return;
        }
        let before: Vec<f64> = self
            .agents
            .iter()
            .flat_map(|(a, b)| [applied(a), applied(b)])
            .collect();
        let workload = |pod: &Pod, app: &str| {
            let w = WorkloadYaml::for_pod(pod, app);
            if on {
                w.label(MODE_LABEL, "mesh").label(MTLS_MODE_LABEL, "STRICT")
            } else {
                w
            }
        };
        self.two.write_workloads(
            "workloads.yaml",
            &[
                (self.client, workload(self.client, "client")),
                (self.server, workload(self.server, "server")),
            ],
        );
        self.enrolled = Some(on);
        if self.agents.is_some() {
            for (agent, before) in self.agents().into_iter().zip(before) {
                agent.wait_for(
                    "the agent to apply the changed workloads",
                    APPLY_TIMEOUT,
                    |a| applied(a) > before,
                );
                // One file change can reach the agent as more than one update: wait for
                // the mesh itself (a certificate per served workload, none when left).
                agent.wait_for(
                    "the agent's proxy to serve the enrolled pod",
                    APPLY_TIMEOUT,
                    |a| serves_mesh(a) == on,
                );
            }
        }
    }

    /// User + system CPU seconds of both agents so far.
    fn cpu_seconds(&self) -> f64 {
        self.agents()
            .into_iter()
            .map(|a| cpu_seconds(agent_pid(a)))
            .sum()
    }

    /// VmRSS of each agent, in MiB.
    fn rss_mib(&self) -> [f64; 2] {
        self.agents().map(|a| rss_mib(agent_pid(a)))
    }

    /// Connections the agents' proxies opened with mutual TLS, summed over both.
    fn mtls_connections(&self) -> f64 {
        self.agents().into_iter().map(mtls_connections).sum()
    }
}

fn agent_pid(agent: &Agent<'_>) -> i32 {
    agent
        .pid()
        .unwrap_or_else(|| panic!("the agent is not running"))
}

/// Whether the agent's proxy serves a local workload (holds a certificate for it).
fn serves_mesh(agent: &Agent<'_>) -> bool {
    let (_, body) = agent.get("/debug/status");
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["certificates"].as_array().map(|c| !c.is_empty()))
        .unwrap_or(false)
}

/// How many source events the agent applied (the count of its update-latency histogram).
fn applied(agent: &Agent<'_>) -> f64 {
    agent.metric_sum("mycel_update_latency_seconds_count")
}

/// Connections that went through the agent's proxy with mutual TLS: Istio's connection
/// counter with `connection_security_policy="mutual_tls"`, or the proxy's own.
fn mtls_connections(agent: &Agent<'_>) -> f64 {
    let metrics = agent.metrics();
    let istio: f64 = parse_metric(&metrics, "istio_tcp_connections_opened_total")
        .into_iter()
        .filter(|(labels, _)| {
            labels.get("connection_security_policy").map(String::as_str) == Some("mutual_tls")
        })
        .map(|(_, v)| v)
        .sum();
    let proxy: f64 = parse_metric(&metrics, "mycel_proxy_tcp_connections_opened_total")
        .into_iter()
        .map(|(_, v)| v)
        .sum();
    istio.max(proxy)
}

/// utime + stime of a process, in seconds, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: i32) -> f64 {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    parse_cpu_ticks(&text).unwrap_or_else(|| panic!("{path}: no utime and stime in {text:?}"))
        as f64
        / clock_ticks_per_second()
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in clock ticks. The
/// command name (field 2) may hold spaces and parentheses: fields are counted after its
/// last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        other => panic!("sysconf(_SC_CLK_TCK) answered {other:?}"),
    }
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: i32) -> f64 {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    parse_vm_rss_mib(&text).unwrap_or_else(|| panic!("{path} has no VmRSS"))
}

fn parse_vm_rss_mib(status: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// Starts `program args` in `pod` and waits for a line saying it listens.
fn start_server(pod: &Pod, program: &Path, args: &[String], ready: fn(&str) -> bool) -> Proc {
    let mut proc = pod.spawn(program, args);
    if proc.wait_for_line(SERVER_START_TIMEOUT, ready).is_none() {
        let status = proc.try_status();
        panic!(
            "{} did not start listening within {SERVER_START_TIMEOUT:?} (exit status \
             {status:?}); stdout: {}; stderr: {}",
            proc.desc(),
            proc.stdout(),
            proc.stderr()
        );
    }
    proc
}

/// Runs a pod program of this bench to completion and parses the JSON line it prints.
fn pod_client<T: for<'de> Deserialize<'de>>(
    pod: &Pod,
    me: &Path,
    args: &[String],
    runs_for: Duration,
) -> Result<T, String> {
    let mut all = vec!["mtls-pod".to_owned()];
    all.extend(args.iter().cloned());
    let mut proc = pod.spawn(me, &all);
    proc.close_stdin();
    let (status, stdout, stderr) = proc.wait_output(runs_for + CLIENT_SLACK);
    if !status.success() {
        return Err(format!(
            "{} failed ({status}): {}",
            proc.desc(),
            stderr.trim()
        ));
    }
    serde_json::from_str(stdout.trim())
        .map_err(|e| format!("{}: cannot parse {stdout:?}: {e}", proc.desc()))
}

/// iperf3's JSON report, the parts the bench reads.
#[derive(Debug, Deserialize)]
struct IperfReport {
    #[serde(default)]
    error: Option<String>,
    end: Option<IperfEnd>,
}

#[derive(Debug, Deserialize)]
struct IperfEnd {
    sum_received: IperfSum,
}

#[derive(Debug, Deserialize)]
struct IperfSum {
    bytes: f64,
    bits_per_second: f64,
}

/// One iperf3 run from `pod` to `server`: (Gbit/s received, bytes received).
fn iperf(pod: &Pod, server: IpAddr, seconds: u32, streams: u32) -> Result<(f64, f64), String> {
    let args = [
        "-c".to_owned(),
        server.to_string(),
        "-p".to_owned(),
        IPERF_PORT.to_string(),
        "-t".to_owned(),
        seconds.to_string(),
        "-P".to_owned(),
        streams.to_string(),
        "-J".to_owned(),
    ];
    let mut proc = pod.spawn("iperf3", &args);
    proc.close_stdin();
    let (status, stdout, stderr) =
        proc.wait_output(Duration::from_secs(u64::from(seconds)) + CLIENT_SLACK);
    let report: IperfReport = serde_json::from_str(&stdout).map_err(|e| {
        format!(
            "{} ({status}): cannot parse its JSON ({e}); stderr: {}",
            proc.desc(),
            stderr.trim()
        )
    })?;
    match (report.error, report.end) {
        (Some(e), _) => Err(format!("{}: {e}", proc.desc())),
        (None, Some(end)) if status.success() => Ok((
            end.sum_received.bits_per_second / 1e9,
            end.sum_received.bytes,
        )),
        _ => Err(format!(
            "{} failed ({status}): {}",
            proc.desc(),
            stderr.trim()
        )),
    }
}

/// What wrk reports: requests per second and failed requests (socket errors and non-2xx
/// answers).
#[derive(Debug, PartialEq)]
struct WrkResult {
    requests_per_second: f64,
    errors: u64,
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())?;
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "Socket errors: connect 0, read 1, write 0, timeout 2"
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Some(WrkResult {
        requests_per_second: rate,
        errors,
    })
}

fn wrk(pod: &Pod, server: IpAddr, seconds: u32) -> Result<WrkResult, String> {
    let url = format!("http://{}/", SocketAddr::new(server, HTTP_PORT));
    let args = [
        "-t".to_owned(),
        WRK_THREADS.to_string(),
        "-c".to_owned(),
        WRK_CONNECTIONS.to_string(),
        "-d".to_owned(),
        format!("{seconds}s"),
        url,
    ];
    let mut proc = pod.spawn("wrk", &args);
    proc.close_stdin();
    let (status, stdout, stderr) =
        proc.wait_output(Duration::from_secs(u64::from(seconds)) + CLIENT_SLACK);
    if !status.success() {
        return Err(format!(
            "{} failed ({status}): {}",
            proc.desc(),
            stderr.trim()
        ));
    }
    parse_wrk(&stdout).ok_or_else(|| format!("{}: no Requests/sec in {stdout:?}", proc.desc()))
}

/// Per-variant results, one entry per round.
#[derive(Debug, Default)]
struct Results {
    single_gbps: Vec<f64>,
    parallel_gbps: Vec<f64>,
    rr_p50_us: Vec<f64>,
    rr_p99_us: Vec<f64>,
    http_rps: Vec<f64>,
    conn_rate: Vec<f64>,
    cpu_seconds: f64,
    bytes: f64,
    failed_connections: u64,
    http_errors: u64,
    /// VmRSS of the two agents idle, and with the idle connections open.
    rss_idle: Option<[f64; 2]>,
    rss_connections: Option<Result<[f64; 2], String>>,
}

/// Everything one round measures for the current variant.
struct Run<'a> {
    args: &'a MtlsArgs,
    me: &'a Path,
    client: &'a Pod,
    server: IpAddr,
}

impl Run<'_> {
    fn measure(&self, mesh: &Mesh<'_>, variant: Variant, r: &mut Results) -> Result<(), String> {
        let seconds = self.args.seconds;
        let cpu_before = (variant != Variant::Direct).then(|| mesh.cpu_seconds());
        let (single, bytes1) = iperf(self.client, self.server, seconds, 1)?;
        let (parallel, bytes4) = iperf(self.client, self.server, seconds, 4)?;
        if let Some(before) = cpu_before {
            r.cpu_seconds += mesh.cpu_seconds() - before;
        }
        r.bytes += bytes1 + bytes4;
        r.single_gbps.push(single);
        r.parallel_gbps.push(parallel);

        let rr_addr = SocketAddr::new(self.server, RR_PORT);
        let trips: RoundTrips = pod_client(
            self.client,
            self.me,
            &[
                "rr-client".to_owned(),
                "--addr".to_owned(),
                rr_addr.to_string(),
                "--count".to_owned(),
                self.args.round_trips.to_string(),
            ],
            Duration::from_millis(u64::from(self.args.round_trips)),
        )?;
        r.rr_p50_us.push(trips.p50_ns as f64 / 1e3);
        r.rr_p99_us.push(trips.p99_ns as f64 / 1e3);

        let http = wrk(self.client, self.server, seconds)?;
        r.http_rps.push(http.requests_per_second);
        r.http_errors += http.errors;

        let conns: Connections = pod_client(
            self.client,
            self.me,
            &[
                "conn-client".to_owned(),
                "--addr".to_owned(),
                rr_addr.to_string(),
                "--millis".to_owned(),
                self.args.connect_ms.to_string(),
            ],
            Duration::from_millis(self.args.connect_ms),
        )?;
        r.conn_rate.push(conns.rate());
        r.failed_connections += conns.failed;
        if let Some(e) = &conns.first_error {
            eprintln!(
                "mtls: {}: {} of {} new connections failed, first: {e}",
                variant.name(),
                conns.failed,
                conns.failed + conns.completed
            );
        }
        Ok(())
    }

    /// Agent memory idle, then with `--idle-connections` connections open through them.
    fn memory(&self, mesh: &Mesh<'_>, r: &mut Results) {
        thread::sleep(SETTLE);
        r.rss_idle = Some(mesh.rss_mib());
        let rr_addr = SocketAddr::new(self.server, RR_PORT);
        let args = [
            "mtls-pod".to_owned(),
            "hold".to_owned(),
            "--addr".to_owned(),
            rr_addr.to_string(),
            "--count".to_owned(),
            self.args.idle_connections.to_string(),
        ];
        let proc = self.client.spawn(self.me, &args);
        let budget =
            Duration::from_millis(u64::from(self.args.idle_connections) * 5) + CLIENT_SLACK;
        let line = proc.wait_for_line(budget, |l| l.starts_with('{'));
        let held: Option<Held> = line.as_deref().and_then(|l| serde_json::from_str(l).ok());
        r.rss_connections = Some(match held {
            Some(h) if h.failed == 0 => {
                thread::sleep(SETTLE);
                Ok(mesh.rss_mib())
            }
            Some(h) => Err(format!(
                "{} of {} connections failed, first: {}",
                h.failed,
                self.args.idle_connections,
                h.first_error.unwrap_or_default()
            )),
            None => Err(format!(
                "{} did not report its connections: {}",
                proc.desc(),
                proc.stderr()
            )),
        });
        drop(proc);
    }
}

/// Checks that enrolling sends the pods' traffic through the proxies with mutual TLS.
/// `Err` says why not.
fn probe_mtls(mesh: &Mesh<'_>, run: &Run<'_>) -> Result<(), String> {
    let before = mesh.mtls_connections();
    let conns: Connections = pod_client(
        run.client,
        run.me,
        &[
            "conn-client".to_owned(),
            "--addr".to_owned(),
            SocketAddr::new(run.server, RR_PORT).to_string(),
            "--millis".to_owned(),
            PROBE_MS.to_string(),
        ],
        Duration::from_millis(PROBE_MS),
    )
    .map_err(|e| format!("the probe client failed: {e}"))?;
    if conns.completed < u64::from(PROBE_CONNECTIONS) {
        return Err(format!(
            "with both pods enrolled (STRICT), {} of {} connections failed (first error: {})",
            conns.failed,
            conns.failed + conns.completed,
            conns.first_error.unwrap_or_else(|| "none".to_owned())
        ));
    }
    // The proxies count a connection when it opens or closes; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if mesh.mtls_connections() > before {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "enrolling both pods (STRICT) did not send their traffic through the proxy: \
                 {} connections answered, and neither agent counted a connection in \
                 istio_tcp_connections_opened_total{{connection_security_policy=\
                 \"mutual_tls\"}} or mycel_proxy_tcp_connections_opened_total",
                conns.completed
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Fails early, naming the package, when a tool the bench runs is missing.
fn check_tools() -> Result<(), String> {
    for (tool, arg) in [("iperf3", "--version"), ("wrk", "--version")] {
        let found = Command::new(tool)
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(format!(
                "`{tool}` is not on PATH: install the Debian package {tool} (`cargo xtask \
                 setup` does)"
            ));
        }
    }
    Ok(())
}

/// Runs the bench; returns the report.
pub fn run(args: &MtlsArgs) -> Result<String, String> {
    args.check()?;
    check_tools()?;
    raise_open_files_limit();
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let two = TwoNodes::new();
    let client = two.node1.pod("client");
    let server = two.node2.pod("server");
    // Every new connection leaves the client a TIME_WAIT socket for a minute, all to the
    // same address and port: widen the ephemeral range and let new connections reuse them.
    // The widened range includes the proxy's ports, which the agent reserves when the pod
    // is enrolled; reserve them from the start, or the `direct` and `l4` rounds could leave
    // one in TIME_WAIT as a source port and keep the proxy from listening for a minute.
    netns::run_in(&client.netns, || {
        for (knob, value) in [
            ("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535"),
            ("/proc/sys/net/ipv4/ip_local_reserved_ports", "15001,15008"),
            ("/proc/sys/net/ipv4/tcp_tw_reuse", "1"),
        ] {
            fs::write(knob, value).unwrap_or_else(|e| panic!("setting {knob} to {value}: {e}"));
        }
    });
    let pod_server = |cmd: &str, port: u16| {
        vec![
            "mtls-pod".to_owned(),
            cmd.to_owned(),
            "--port".to_owned(),
            port.to_string(),
        ]
    };
    let _rr = start_server(&server, &me, &pod_server("rr-server", RR_PORT), |l| {
        l == "ready"
    });
    let _http = start_server(&server, &me, &pod_server("http-server", HTTP_PORT), |l| {
        l == "ready"
    });
    let _iperf = start_server(
        &server,
        Path::new("iperf3"),
        &[
            "-s".to_owned(),
            "-p".to_owned(),
            IPERF_PORT.to_string(),
            "--forceflush".to_owned(),
        ],
        |l| l.contains("Server listening"),
    );

    let mut mesh = Mesh {
        two: &two,
        client: &client,
        server: &server,
        agents: None,
        enrolled: None,
    };
    let run = Run {
        args,
        me: &me,
        client: &client,
        server: IpAddr::V4(server.ipv4),
    };
    let mut results: [Results; 3] = Default::default();
    let mut mtls_missing: Option<String> = None;
    let started = Instant::now();
    for round in 0..args.rounds {
        let mut order = Variant::ALL.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for variant in order {
            if variant == Variant::Mtls && mtls_missing.is_some() {
                continue;
            }
            mesh.set(variant);
            if variant == Variant::Mtls
                && round == 0
                && let Err(reason) = probe_mtls(&mesh, &run)
            {
                eprintln!("mtls: not available: {reason}");
                mtls_missing = Some(reason);
                continue;
            }
            eprintln!(
                "round {}/{}: {} ({:.0} s in)",
                round + 1,
                args.rounds,
                variant.name(),
                started.elapsed().as_secs_f64()
            );
            run.measure(&mesh, variant, &mut results[variant.index()])
                .map_err(|e| format!("round {}, {}: {e}", round + 1, variant.name()))?;
        }
    }
    for variant in [Variant::L4, Variant::Mtls] {
        if variant == Variant::Mtls && mtls_missing.is_some() {
            continue;
        }
        mesh.set(variant);
        eprintln!(
            "memory: {} idle and with {} idle connections",
            variant.name(),
            args.idle_connections
        );
        run.memory(&mesh, &mut results[variant.index()]);
    }
    mesh.stop_agents();
    let load = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    Ok(report(
        args,
        &results,
        mtls_missing.as_deref(),
        started.elapsed(),
        cores,
        &load,
    ))
}

/// Medians of one variant's rounds.
struct Summary {
    single: f64,
    parallel: f64,
    p50: f64,
    p99: f64,
    http: f64,
    conn: f64,
}

impl Summary {
    fn of(r: &Results) -> Option<Summary> {
        if r.single_gbps.is_empty() {
            return None;
        }
        Some(Summary {
            single: median_f(r.single_gbps.clone()),
            parallel: median_f(r.parallel_gbps.clone()),
            p50: median_f(r.rr_p50_us.clone()),
            p99: median_f(r.rr_p99_us.clone()),
            http: median_f(r.http_rps.clone()),
            conn: median_f(r.conn_rate.clone()),
        })
    }
}

fn met(ok: bool) -> String {
    if ok { "✅" } else { "❌" }.to_owned()
}

fn report(
    args: &MtlsArgs,
    results: &[Results; 3],
    mtls_missing: Option<&str>,
    took: Duration,
    cores: usize,
    load: &str,
) -> String {
    let [direct, l4, mtls] = [0, 1, 2].map(|i| Summary::of(&results[i]));
    let dash = || "—".to_owned();
    // (value text, ratio text) of one variant for one measurement.
    let cell =
        |s: &Option<Summary>, f: &dyn Fn(&Summary) -> f64, unit: &dyn Fn(f64) -> String| match (
            s, &direct,
        ) {
            (Some(s), Some(d)) => (unit(f(s)), format!("{:.2}", f(s) / f(d).max(1e-9))),
            (Some(s), None) => (unit(f(s)), dash()),
            _ => (dash(), dash()),
        };
    let gbps = |v: f64| format!("{v:.2} Gbit/s");
    let us = |v: f64| format!("{v:.0} µs");
    let per_s = |v: f64| format!("{v:.0}/s");
    let times = |v: f64| format!("{v:.2}×");
    let mut rows: Vec<[String; 8]> = Vec::new();
    let mut row = |name: &str,
                   f: &dyn Fn(&Summary) -> f64,
                   unit: &dyn Fn(f64) -> String,
                   ratios: bool,
                   target: &str,
                   ok: Option<bool>| {
        let d = cell(&direct, f, unit).0;
        let (l, lr) = cell(&l4, f, unit);
        let (m, mr) = cell(&mtls, f, unit);
        rows.push([
            name.to_owned(),
            d,
            l,
            if ratios { lr } else { String::new() },
            m,
            if ratios { mr } else { String::new() },
            target.to_owned(),
            ok.map_or_else(dash, met),
        ]);
    };
    let both = |f: &dyn Fn(&Summary, &Summary) -> bool| match (&mtls, &direct) {
        (Some(m), Some(d)) => Some(f(m, d)),
        _ => None,
    };
    row(
        "single-stream throughput (iperf3)",
        &|s| s.single,
        &gbps,
        true,
        "mtls ≥ 0.5 × direct",
        both(&|m, d| m.single >= TARGET_SINGLE_STREAM * d.single),
    );
    row(
        "4 parallel streams (iperf3 -P 4)",
        &|s| s.parallel,
        &gbps,
        true,
        "",
        None,
    );
    row(
        "4 streams / single stream",
        &|s| s.parallel / s.single.max(1e-9),
        &times,
        false,
        "mtls ≥ 1.5×",
        mtls.as_ref()
            .map(|m| m.parallel >= TARGET_PARALLEL_GAIN * m.single),
    );
    row(
        "64 B request/response round trip p50 (one connection)",
        &|s| s.p50,
        &us,
        true,
        "mtls ≤ direct + 30 µs",
        both(&|m, d| m.p50 - d.p50 <= TARGET_ADDED_P50_US),
    );
    row(
        "64 B request/response round trip p99",
        &|s| s.p99,
        &us,
        true,
        "",
        None,
    );
    row(
        &format!("HTTP/1.1 keep-alive requests (wrk, {WRK_CONNECTIONS} connections)"),
        &|s| s.http,
        &per_s,
        true,
        "",
        None,
    );
    row(
        "new connection per request (connect, 64 B request/response, close)",
        &|s| s.conn,
        &per_s,
        true,
        "mtls ≥ 0.5 × direct",
        both(&|m, d| m.conn >= TARGET_CONNECTION_RATE * d.conn),
    );
    // Proxy CPU and memory: only where agents run.
    let cpu = |r: &Results| {
        if r.bytes > 0.0 && !r.single_gbps.is_empty() {
            format!("{:.2} s/GB", r.cpu_seconds / (r.bytes / 1e9))
        } else {
            dash()
        }
    };
    rows.push([
        "agent CPU (user + system, both agents) per GB moved by iperf3".to_owned(),
        dash(),
        cpu(&results[1]),
        String::new(),
        cpu(&results[2]),
        String::new(),
        String::new(),
        dash(),
    ]);
    let rss_text =
        |r: Option<&[f64; 2]>| r.map_or_else(dash, |[a, b]| format!("{a:.1} / {b:.1} MiB"));
    let rss_ok = |r: Option<&[f64; 2]>, limit: f64| r.map(|[a, b]| a.max(*b) <= limit);
    let idle = |i: usize| results[i].rss_idle.as_ref();
    let held = |i: usize| {
        results[i]
            .rss_connections
            .as_ref()
            .and_then(|r| r.as_ref().ok())
    };
    let held_text = |i: usize| match &results[i].rss_connections {
        Some(Err(e)) => format!("failed: {e}"),
        other => rss_text(other.as_ref().and_then(|r| r.as_ref().ok())),
    };
    rows.push([
        "agent RSS idle, node 1 / node 2 (VmRSS)".to_owned(),
        dash(),
        rss_text(idle(1)),
        String::new(),
        rss_text(idle(2)),
        String::new(),
        format!("mtls ≤ {TARGET_RSS_IDLE_MIB:.0} MiB"),
        rss_ok(idle(2), TARGET_RSS_IDLE_MIB).map_or_else(dash, met),
    ]);
    rows.push([
        format!(
            "agent RSS with {} idle connections open, node 1 / node 2",
            args.idle_connections
        ),
        dash(),
        held_text(1),
        String::new(),
        held_text(2),
        String::new(),
        format!("mtls ≤ {TARGET_RSS_CONNECTIONS_MIB:.0} MiB"),
        rss_ok(held(2), TARGET_RSS_CONNECTIONS_MIB).map_or_else(dash, met),
    ]);
    let failures = |r: &Results| {
        if r.single_gbps.is_empty() {
            dash()
        } else {
            format!("{} / {}", r.failed_connections, r.http_errors)
        }
    };
    rows.push([
        "failed new connections / failed HTTP requests".to_owned(),
        failures(&results[0]),
        failures(&results[1]),
        String::new(),
        failures(&results[2]),
        String::new(),
        "0 / 0".to_owned(),
        dash(),
    ]);
    if let Some(reason) = mtls_missing {
        rows.push([
            format!("mtls: not available: {reason}"),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nTwo nodes on one machine (network namespaces linked by a veth pair), a client pod \
         on node 1 and a server pod on node 2; {} rounds, each measuring every variant \
         (alternating order); values are medians of the rounds, ratios are to `direct`\n",
        args.rounds
    );
    out.push_str(&markdown(
        &[
            "measurement",
            "direct",
            "l4",
            "l4 / direct",
            "mtls",
            "mtls / direct",
            "target",
            "met",
        ],
        &rows,
    ));
    let _ = writeln!(
        out,
        "\n`direct`: no agent running. `l4`: both agents running, nothing enrolled (the \
         kernel programs count and police every flow). `mtls`: both pods labelled \
         `mycel.dev/mode: mesh` and `mycel.dev/mtls-mode: STRICT`, so node 1's proxy \
         tunnels their connections as HBONE (HTTP/2 CONNECT over mutual TLS) to node 2's. \
         iperf3 runs {s} s per round with 1 and 4 streams; the round trip is {rt} timed \
         64-byte exchanges (after {WARMUP_ROUND_TRIPS} untimed) on one connection; wrk runs \
         {s} s with {WRK_THREADS} thread against a one-thread hyper HTTP/1.1 server in the \
         server pod; new connections are counted for {cm} ms. Agent CPU is utime + stime \
         from `/proc/<pid>/stat` of both agents over the iperf3 runs. Memory is read after \
         the rounds, idle and with {idle} connections held open (each after one round \
         trip). Machine: {cores} CPU cores shared by both nodes, the pods and the bench; \
         load average {load} at the end; the run took {took:.0} s.",
        s = args.seconds,
        rt = args.round_trips,
        cm = args.connect_ms,
        idle = args.idle_connections,
        took = took.as_secs_f64(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime …; the name may hold spaces and parentheses.
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 1000000 500";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tmycel\nVmHWM:\t   30720 kB\nVmRSS:\t   20480 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss_mib(status), Some(20.0));
        assert_eq!(parse_vm_rss_mib("Name:\tmycel\n"), None);
    }

    #[test]
    fn reads_wrk_reports() {
        let clean = "Running 2s test @ http://10.0.2.2:8080/\n  1 threads and 16 connections\n\
                     \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                     \x20 40000 requests in 2.00s, 3.51MB read\n\
                     Requests/sec:  19999.50\nTransfer/sec:      1.75MB\n";
        assert_eq!(
            parse_wrk(clean),
            Some(WrkResult {
                requests_per_second: 19999.5,
                errors: 0
            })
        );
        let failing = "  Socket errors: connect 0, read 3, write 0, timeout 2\n\
                       \x20 Non-2xx or 3xx responses: 4\nRequests/sec:    100.00\n";
        assert_eq!(parse_wrk(failing).map(|r| r.errors), Some(9));
        assert_eq!(parse_wrk("unable to connect to 10.0.2.2:8080"), None);
    }

    #[test]
    fn iperf_json_gives_received_rate_and_bytes() {
        let json = r#"{"start":{},"intervals":[],"end":{"sum_sent":{"bytes":2e9,
            "bits_per_second":8e9},"sum_received":{"bytes":1.5e9,"bits_per_second":6e9}}}"#;
        let r: IperfReport = serde_json::from_str(json).expect("iperf3 report");
        let end = r.end.expect("end");
        assert_eq!(end.sum_received.bytes, 1.5e9);
        assert_eq!(end.sum_received.bits_per_second, 6e9);
        let failed: IperfReport =
            serde_json::from_str(r#"{"start":{},"error":"unable to connect to server"}"#)
                .expect("iperf3 error report");
        assert_eq!(failed.error.as_deref(), Some("unable to connect to server"));
    }

    #[test]
    fn bad_options_are_refused_with_the_flag_named() {
        let args = |rounds, seconds, idle| MtlsArgs {
            rounds,
            seconds,
            round_trips: 10,
            connect_ms: 10,
            idle_connections: idle,
            output: None,
        };
        assert!(args(1, 1, 1).check().is_ok());
        assert!(args(0, 1, 1).check().unwrap_err().contains("--rounds"));
        assert!(args(1, 61, 1).check().unwrap_err().contains("--seconds"));
        assert!(
            args(1, 1, 30_000)
                .check()
                .unwrap_err()
                .contains("--idle-connections")
        );
    }

    #[test]
    fn report_marks_mtls_not_available() {
        let mut direct = Results::default();
        let mut l4 = Results::default();
        for r in [&mut direct, &mut l4] {
            r.single_gbps = vec![10.0, 12.0, 11.0];
            r.parallel_gbps = vec![20.0; 3];
            r.rr_p50_us = vec![40.0; 3];
            r.rr_p99_us = vec![90.0; 3];
            r.http_rps = vec![30_000.0; 3];
            r.conn_rate = vec![5_000.0; 3];
            r.bytes = 6e9;
        }
        l4.single_gbps = vec![5.0, 5.5, 6.0];
        l4.cpu_seconds = 0.6;
        l4.rss_idle = Some([12.0, 13.0]);
        l4.rss_connections = Some(Ok([12.5, 13.5]));
        let out = report(
            &MtlsArgs {
                rounds: 3,
                seconds: 2,
                round_trips: 10,
                connect_ms: 10,
                idle_connections: 1000,
                output: None,
            },
            &[direct, l4, Results::default()],
            Some("no proxy"),
            Duration::from_secs(100),
            2,
            "1.0",
        );
        assert!(out.contains("| mtls: not available: no proxy |"), "{out}");
        // Single stream: l4 median 5.5 against direct's 11 → 0.50.
        assert!(
            out.contains(
                "| single-stream throughput (iperf3) | 11.00 Gbit/s | 5.50 Gbit/s | 0.50 | — | — |"
            ),
            "{out}"
        );
        assert!(out.contains("| 0.10 s/GB |"), "{out}");
        assert!(out.contains("| 12.0 / 13.0 MiB |"), "{out}");
    }
}
