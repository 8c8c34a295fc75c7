//! `mycel-bench`: mycel's benchmarks, run by `cargo xtask bench <name>`.
//!
//! `lb` measures socket-level load balancing side by side in one run and prints tables:
//!
//! - data path: sequential TCP connect + one request/response + close from a client pod,
//!   to the backend directly and through the service's ClusterIP, interleaved in rounds so
//!   that both see the same machine noise; rate and latency percentiles, and their ratio.
//! - control plane: programming 10,000 services × 10 backends from cold (YAML files → maps,
//!   with the parse, model and map-write parts), and one service update, measured from the
//!   model to the maps and from the file write to the maps.
//!
//! Needs root (network namespaces, cgroups, eBPF), like the integration tests.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use mycel_agent::{
    datapath::Datapath,
    source::{SourceEvent, file::FileSource},
    state::{
        Endpoint, EndpointPort, EndpointSlice, Meta, ObjectRef, Protocol, Resource, State, Update,
    },
};
use mycel_tests::{EndpointSliceYaml, Node, ServiceYaml, env};
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(name = "mycel-bench", about = "mycel's benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Socket-level service load balancing: data path and control plane.
    Lb(LbArgs),
    /// (internal) The data-path client, run inside a client pod.
    Client {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u32,
    },
}

#[derive(Debug, clap::Args)]
struct LbArgs {
    /// Connections per variant and round.
    #[arg(long, default_value_t = 500)]
    connects: u32,
    /// Rounds; the variants alternate within each round.
    #[arg(long, default_value_t = 12)]
    rounds: u32,
    /// Services for the control-plane measurement.
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Backends per service.
    #[arg(long, default_value_t = 10)]
    backends: u32,
    /// Single-service updates to time.
    #[arg(long, default_value_t = 200)]
    updates: u32,
    /// Skip the data-path part.
    #[arg(long)]
    no_datapath: bool,
    /// Skip the control-plane part.
    #[arg(long)]
    no_control_plane: bool,
    /// Also write the tables (Markdown) to this file.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Client { addr, count } => client(addr, count),
        Command::Lb(args) => {
            if !env::privileged_or_skip("mycel-bench lb") {
                return ExitCode::FAILURE;
            }
            let mut out = String::new();
            if !args.no_datapath {
                out.push_str(&datapath_bench(&args));
            }
            if !args.no_control_plane {
                out.push_str(&control_plane_bench(&args));
            }
            print!("{out}");
            if let Some(path) = &args.output
                && let Err(e) = fs::write(path, &out)
            {
                eprintln!("cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
    }
}

/// What the client reports: per-connection latency (connect, request, response, close).
#[derive(Debug, Default, Serialize, Deserialize)]
struct ClientResult {
    latencies_us: Vec<u64>,
    elapsed_us: u64,
    errors: u32,
}

fn client(addr: SocketAddr, count: u32) -> ExitCode {
    let mut r = ClientResult::default();
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        match one_request(addr) {
            Ok(()) => r.latencies_us.push(t.elapsed().as_micros() as u64),
            Err(_) => r.errors += 1,
        }
    }
    r.elapsed_us = start.elapsed().as_micros() as u64;
    match serde_json::to_string(&r) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn one_request(addr: SocketAddr) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    (&stream).write_all(b"ping\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Percentile `p` (0–100) of sorted values, nearest rank.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median_f(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn datapath_bench(args: &LbArgs) -> String {
    let node = Node::new();
    let backend = node.pod("backend");
    let _server = backend.tcp_server(8080);
    node.resources().write(
        "web.yaml",
        &[
            ServiceYaml::new("web", "10.96.0.10")
                .port("http", 80, "TCP", 8080)
                .to_yaml(),
            EndpointSliceYaml::ipv4("web-1", "web")
                .endpoint(backend.ipv4)
                .port("http", 8080, "TCP")
                .to_yaml(),
        ],
    );
    let _agent = node.start_agent();
    let client_pod = node.pod("client");
    let me = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));

    let variants: [(&str, SocketAddr); 2] = [
        (
            "direct to backend",
            SocketAddr::new(IpAddr::V4(backend.ipv4), 8080),
        ),
        (
            "via ClusterIP",
            "10.96.0.10:80".parse().unwrap_or_else(|e| panic!("{e}")),
        ),
    ];
    let mut lat: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<&str, u32> = BTreeMap::new();
    eprintln!(
        "data path: {} rounds × {} connects per variant",
        args.rounds, args.connects
    );
    for round in 0..args.rounds {
        // Alternate which variant goes first, so neither always runs on a warmer machine.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for i in order {
            let (name, addr) = variants[i];
            let mut proc = client_pod.spawn(
                &me,
                &[
                    "client".to_string(),
                    "--addr".into(),
                    addr.to_string(),
                    "--count".into(),
                    args.connects.to_string(),
                ],
            );
            let (status, stdout, stderr) = proc.wait_output(Duration::from_secs(120));
            assert!(status.success(), "bench client failed: {stderr}");
            let r: ClientResult = serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("bench client output {stdout:?}: {e}"));
            rates
                .entry(name)
                .or_default()
                .push(r.latencies_us.len() as f64 / (r.elapsed_us as f64 / 1e6));
            lat.entry(name).or_default().extend(r.latencies_us);
            *errors.entry(name).or_default() += r.errors;
        }
    }
    let mut rows = Vec::new();
    let stat = |name: &str| {
        let mut l = lat.get(name).cloned().unwrap_or_default();
        l.sort_unstable();
        (
            median_f(rates.get(name).cloned().unwrap_or_default()),
            percentile(&l, 50.0),
            percentile(&l, 99.0),
            errors.get(name).copied().unwrap_or(0),
        )
    };
    let d = stat(variants[0].0);
    let v = stat(variants[1].0);
    // The ratio of each round's pair (run back to back) is less exposed to the machine's
    // noise than the ratio of the medians.
    let pair_ratios: Vec<f64> = rates
        .get(variants[1].0)
        .into_iter()
        .flatten()
        .zip(rates.get(variants[0].0).into_iter().flatten())
        .map(|(v, d)| v / d)
        .collect();
    rows.push([
        "connect + request/response rate (median of rounds)".to_string(),
        format!("{:.0}/s", d.0),
        format!("{:.0}/s", v.0),
        format!("{:.3}", median_f(pair_ratios)),
    ]);
    rows.push([
        "latency p50".to_string(),
        format!("{} µs", d.1),
        format!("{} µs", v.1),
        format!("{:.3}", v.1 as f64 / d.1.max(1) as f64),
    ]);
    rows.push([
        "latency p99".to_string(),
        format!("{} µs", d.2),
        format!("{} µs", v.2),
        format!("{:.3}", v.2 as f64 / d.2.max(1) as f64),
    ]);
    rows.push([
        "failed connections".to_string(),
        d.3.to_string(),
        v.3.to_string(),
        String::new(),
    ]);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nData path: TCP connect + request/response + close, {} × {} per variant\n",
        args.rounds, args.connects
    );
    out.push_str(&markdown(
        &[
            "measurement",
            "direct",
            "via ClusterIP",
            "ClusterIP / direct",
        ],
        &rows,
    ));
    out.push_str(
        "\nThe rate ratio is the median of the rounds' ratios (each round runs both variants \
         back to back, in alternating order); latencies pool every connection.\n",
    );
    out
}

/// Scratch cgroup and bpffs directories for the control-plane run, removed on drop.
struct Scratch {
    cgroup: PathBuf,
    bpffs: PathBuf,
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let id = format!("mycel-bench-{}", std::process::id());
        let cgroup = env::cgroup2_root()
            .unwrap_or_else(|e| panic!("{e}"))
            .join(&id);
        let bpffs = env::bpffs_root()
            .unwrap_or_else(|e| panic!("{e}"))
            .join(&id);
        fs::create_dir_all(&cgroup).unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        Self { cgroup, bpffs, dir }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.bpffs);
        env::remove_cgroup_tree(&self.cgroup);
    }
}

fn service_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        96 + (i / 65_025) as u8,
        ((i / 255) % 255) as u8,
        (i % 255 + 1) as u8,
    )
}

fn backend_ip(i: u32, j: u32) -> Ipv4Addr {
    let n = i * 16 + j;
    Ipv4Addr::new(10, 128 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn service_docs(i: u32, backends: u32, shift: u32) -> String {
    let name = format!("svc-{i}");
    let mut slice = EndpointSliceYaml::ipv4(&format!("{name}-1"), &name);
    for j in 0..backends {
        slice = slice.endpoint(backend_ip(i, j + shift));
    }
    format!(
        "{}\n---\n{}\n---\n",
        ServiceYaml::new(&name, &service_ip(i).to_string())
            .port("http", 80, "TCP", 8080)
            .to_yaml(),
        slice.port("http", 8080, "TCP").to_yaml()
    )
}

/// `svc-0` alone in `svc-0.yaml` (the one the update measurement rewrites), the others one
/// file per 1,000 services, as an operator's repository might hold them.
fn write_services(dir: &Path, services: u32, backends: u32) {
    let write = |name: String, text: &str| {
        fs::write(dir.join(&name), text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    };
    write("svc-0.yaml".into(), &service_docs(0, backends, 0));
    let mut docs = String::new();
    let mut file = 0;
    for i in 1..services {
        docs.push_str(&service_docs(i, backends, 0));
        if i % 1000 == 0 || i + 1 == services {
            write(format!("services-{file:03}.yaml"), &docs);
            docs.clear();
            file += 1;
        }
    }
}

fn slice_of(i: u32, backends: u32, shift: u32) -> EndpointSlice {
    let origin: Arc<str> = Arc::from("bench");
    EndpointSlice {
        meta: Meta {
            id: ObjectRef {
                namespace: "default".into(),
                name: format!("svc-{i}-1"),
            },
            labels: BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                format!("svc-{i}"),
            )]),
            origin,
        },
        service: format!("svc-{i}"),
        endpoints: (0..backends)
            .map(|j| Endpoint {
                addresses: vec![IpAddr::V4(backend_ip(i, j + shift))],
                ready: true,
            })
            .collect(),
        ports: vec![EndpointPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
    }
}

fn control_plane_bench(args: &LbArgs) -> String {
    let scratch = Scratch::new();
    let resources = scratch.dir.path().join("resources");
    fs::create_dir_all(&resources).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "control plane: writing {} services × {} backends as YAML",
        args.services, args.backends
    );
    write_services(&resources, args.services, args.backends);

    // Cold: load, read every file, compile, write the maps.
    let t0 = Instant::now();
    let mut datapath = Datapath::load(&scratch.cgroup, &scratch.bpffs)
        .unwrap_or_else(|e| panic!("loading the datapath: {e}"));
    let t_load = t0.elapsed();
    let t1 = Instant::now();
    let (_source, mut events) =
        FileSource::start(resources.clone()).unwrap_or_else(|e| panic!("file source: {e}"));
    let full = match events.blocking_recv() {
        Some(SourceEvent::Update(u)) => u,
        Some(SourceEvent::Error(e)) => panic!("the generated YAML was rejected: {e}"),
        Some(SourceEvent::Rejected(n)) => panic!("{n} generated files were rejected"),
        None => panic!("the file source stopped"),
    };
    let t_parse = t1.elapsed();
    let mut state = State::default();
    let t2 = Instant::now();
    let applied = state.apply(full);
    let t_model = t2.elapsed();
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    let t3 = Instant::now();
    let (stats, errors) = datapath.services.sync(state.frontends());
    let t_maps = t3.elapsed();
    assert!(errors.is_empty(), "{errors:?}");
    let (services, backends) = datapath.services.counts();
    assert_eq!(services as u32, args.services);
    assert_eq!(backends as u32, args.services * args.backends);

    // One service update through the model and the maps.
    let mut model_us = Vec::new();
    for k in 0..args.updates {
        let i = k % args.services;
        let slice = slice_of(i, args.backends, 1 + k % 3);
        let t = Instant::now();
        let applied = state.apply(Update {
            seen: t,
            full: false,
            upserts: vec![Resource::EndpointSlice(slice)],
            deletes: vec![],
        });
        let (_, errors) = datapath.services.apply(&applied.changes);
        model_us.push(t.elapsed().as_micros() as u64);
        assert_eq!(applied.changes.len(), 1);
        assert!(errors.is_empty(), "{errors:?}");
    }
    model_us.sort_unstable();

    // One service update from the file write to the maps.
    let mut file_us = Vec::new();
    let staging = scratch.dir.path().join("staging.yaml");
    for k in 0..args.updates.min(100) {
        fs::write(&staging, service_docs(0, args.backends, 4 + k % 2))
            .unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        fs::rename(&staging, resources.join("svc-0.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let deadline = t + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = recv_timeout(&mut events, left);
            match ev {
                Some(SourceEvent::Update(u)) => {
                    let applied = state.apply(u);
                    let (_, errors) = datapath.services.apply(&applied.changes);
                    assert!(errors.is_empty(), "{errors:?}");
                    if !applied.changes.is_empty() {
                        file_us.push(t.elapsed().as_micros() as u64);
                        break;
                    }
                }
                Some(SourceEvent::Error(e)) => panic!("rejected: {e}"),
                Some(SourceEvent::Rejected(n)) => panic!("{n} files rejected"),
                None => panic!("no update within 5 s of a file write"),
            }
        }
    }
    file_us.sort_unstable();
    drop(datapath);

    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let us = |v: u64| {
        if v >= 10_000 {
            format!("{:.1} ms", v as f64 / 1e3)
        } else {
            format!("{v} µs")
        }
    };
    let rows = vec![
        ["load and attach the programs".to_string(), ms(t_load)],
        [
            format!(
                "program {} services × {} backends from cold (YAML → maps)",
                args.services, args.backends
            ),
            ms(t_parse + t_model + t_maps),
        ],
        [
            "  of which: read and parse the YAML".to_string(),
            ms(t_parse),
        ],
        ["  of which: compile the model".to_string(), ms(t_model)],
        [
            format!("  of which: write the maps ({} entries)", stats.map_writes),
            ms(t_maps),
        ],
        [
            "one service update, model → maps, p50 / p99".to_string(),
            format!(
                "{} / {}",
                us(percentile(&model_us, 50.0)),
                us(percentile(&model_us, 99.0))
            ),
        ],
        [
            "one service update, file write → maps, p50 / p99".to_string(),
            format!(
                "{} / {}",
                us(percentile(&file_us, 50.0)),
                us(percentile(&file_us, 99.0))
            ),
        ],
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nControl plane: {} services × {} backends, {} single-service updates ({} through files)\n",
        args.services,
        args.backends,
        args.updates,
        file_us.len()
    );
    out.push_str(&markdown(&["measurement", "time"], &rows));
    out
}

fn recv_timeout(
    events: &mut tokio::sync::mpsc::Receiver<SourceEvent>,
    timeout: Duration,
) -> Option<SourceEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        match events.try_recv() {
            Ok(ev) => return Some(ev),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return None,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

fn markdown<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        header.iter().map(|_| "---|").collect::<String>()
    );
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn generated_addresses_are_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..10_000 {
            assert!(seen.insert(service_ip(i)), "service {i}");
        }
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..10_000 {
            for j in 0..12 {
                assert!(seen.insert(backend_ip(i, j)), "backend {i}/{j}");
            }
        }
    }
}
