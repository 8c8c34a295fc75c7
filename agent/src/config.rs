//! The agent's configuration: built from the command line and environment, validated
//! once, logged at start-up.
//!
//! Every setting has a flag and an environment variable (`MYCEL_*`); defaults are the
//! named constants below. An invalid value is a [`Error`] naming the setting, the value and
//! why; the binary exits with status 64 (`EX_USAGE`) on it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use mycel_common::service::MAX_SERVICES;
use serde::Serialize;

use crate::{datapath::MapSizes, flows, state::policy::NodeTraffic};

/// Where pinned maps and links live by default.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/mycel";
/// Default resource directory of the file source.
pub const DEFAULT_SOURCE: &str = "file:/etc/mycel/resources";
/// Admin endpoints (health, readiness, metrics, debug); localhost only by default.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Prometheus metrics.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
/// Readiness for the kubelet.
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// Exit status for invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_USAGE: i32 = 64;
/// Where the standalone agent keeps the CA it creates on first start.
pub const DEFAULT_CA_DIR: &str = "/var/lib/mycel/ca";
/// Where the agent keeps what must outlive it (the last good version of its inputs).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mycel/state";
/// How long the proxy lets open connections finish on SIGTERM, as Istio's default
/// termination drain duration.
pub const DEFAULT_DRAIN_GRACE: &str = "5s";
/// How long the kernel keeps redirecting enrolled workloads' connections to the proxy after
/// the agent last renewed its lease (every second). Long enough for a restart (a rolling
/// update, a crash and the kubelet starting the container again) to take over without
/// enrolled connections going out in plaintext meanwhile; short enough that an agent that
/// is gone for good (killed, DaemonSet deleted) breaks enrolled workloads' connections
/// only for seconds: after it they go direct (STRICT destinations stay closed to
/// plaintext, TC enforces that without the agent).
pub const DEFAULT_REDIRECT_GRACE: &str = "10s";
/// Shortest `--redirect-grace`: more than the renewal interval (1 s), with room for a busy
/// moment of the agent.
pub const MIN_REDIRECT_GRACE_SECS: u64 = 2;
/// Default trust domain, as Kubernetes' default cluster domain and Istio's.
pub const DEFAULT_TRUST_DOMAIN: &str = crate::state::identity::DEFAULT_TRUST_DOMAIN;

/// Where desired state comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceConfig {
    /// A directory of Kubernetes-format YAML files, watched for changes.
    File(PathBuf),
    /// The Kubernetes API (in-cluster configuration, or `KUBECONFIG`), watched for the
    /// objects of every namespace and the pods of this node.
    Kubernetes {
        /// This node's name (`--node-name` / `NODE_NAME`): its pods are the local ones.
        node_name: String,
        /// `--kubeconfig` / `KUBECONFIG`; none: in-cluster configuration.
        kubeconfig: Option<PathBuf>,
    },
}

impl std::fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceConfig::File(dir) => write!(f, "file:{}", dir.display()),
            SourceConfig::Kubernetes { node_name, .. } => {
                write!(f, "kubernetes (node {node_name})")
            }
        }
    }
}

/// The agent's settings.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// `--source` / `MYCEL_SOURCE`: `file:DIR` or `kubernetes`.
    pub source: SourceConfig,
    /// `--trust-domain` / `MYCEL_TRUST_DOMAIN`: the trust domain of SPIFFE IDs and of the
    /// principals policies name.
    pub trust_domain: String,
    /// `--cgroup` / `MYCEL_CGROUP`: the cgroup v2 directory the socket programs attach to;
    /// every process below it is load-balanced. Default: the root of the cgroup2 mount.
    pub cgroup: PathBuf,
    /// The cgroup2 mount that holds `cgroup`; kubelet puts pods' cgroups below it.
    pub cgroup_root: PathBuf,
    /// `--bpffs` / `MYCEL_BPFFS`: directory on bpffs for pinned maps and links.
    pub bpffs: PathBuf,
    /// `--admin-addr` / `MYCEL_ADMIN_ADDR`.
    pub admin_addr: SocketAddr,
    /// `--metrics-addr` / `MYCEL_METRICS_ADDR`.
    pub metrics_addr: SocketAddr,
    /// `--readiness-addr` / `MYCEL_READINESS_ADDR`.
    pub readiness_addr: SocketAddr,
    /// `--detach-on-exit` / `MYCEL_DETACH_ON_EXIT`: on shutdown, detach the programs and
    /// remove the pins. Off by default, so traffic keeps flowing across agent restarts.
    pub detach_on_exit: bool,
    /// `--max-services`, `--max-backends` / `MYCEL_MAX_SERVICES`, `MYCEL_MAX_BACKENDS`:
    /// sizes of the service maps when the agent creates them.
    pub map_sizes: MapSizes,
    /// `--flow-buffer`, `--flow-log`, `--flow-log-max-bytes`, `--flow-log-files`
    /// (`MYCEL_FLOW_*`): recent flows kept in memory and the optional flow log file.
    pub flows: flows::Config,
    /// `--ca-dir` / `MYCEL_CA_DIR`: directory of the CA that signs workload certificates
    /// (`ca.pem`, `ca-key.pem`). Standalone, created there on first start; with Kubernetes
    /// it must exist (the manifests mount it from the Secret `mycel-ca`), since every node
    /// must share one CA.
    pub ca_dir: PathBuf,
    /// `--state-dir` / `MYCEL_STATE_DIR`: what must survive restarts, such as the last
    /// accepted version of each resource file, so that a file broken while the agent was
    /// down does not take its policies out of force at the next start.
    pub state_dir: PathBuf,
    /// `--cert-lifetime` / `MYCEL_CERT_LIFETIME`: lifetime of workload certificates; they
    /// are renewed at half of it.
    pub cert_lifetime: std::time::Duration,
    /// `--ca-reload-interval` / `MYCEL_CA_RELOAD_INTERVAL`: how often the CA directory is
    /// read for changes (a CA rotation applies without a restart).
    pub ca_reload_interval: std::time::Duration,
    /// `--post-quantum` / `MYCEL_POST_QUANTUM`: `prefer` (default) offers the hybrid
    /// post-quantum key exchange X25519MLKEM768 first and keeps X25519 for peers without
    /// it; `require` offers and accepts X25519MLKEM768 only.
    pub post_quantum: crate::identity::KeyExchange,
    /// `--identity-server`, `--identity-token`, `--identity-server-id`
    /// (`MYCEL_IDENTITY_*`): where workload certificates come from when the agent holds no
    /// CA key. With them, `--ca-dir` holds only `ca.pem` (the trust bundle) and every
    /// certificate is asked of the identity server, which signs only identities of pods on
    /// this node. Without them the agent signs with the CA key of `--ca-dir`.
    pub identity_server: Option<crate::identity::RemoteSigner>,
    /// `--drain-grace` / `MYCEL_DRAIN_GRACE`: on SIGTERM, how long open proxied connections
    /// may take to finish before they are closed.
    pub drain_grace: std::time::Duration,
    /// `--access-log` / `MYCEL_ACCESS_LOG`: log one line per proxied connection.
    pub access_log: bool,
    /// `--node-traffic` / `MYCEL_NODE_TRAFFIC`: what traffic from the node's own
    /// addresses is exempt from policy and mode STRICT. `probes` (the default): kubelet
    /// probes only (TCP from a node process outside the pods' cgroup `--cgroup`); `all`:
    /// everything from a node address, hostNetwork pods and SNAT'd traffic included (the
    /// behaviour of earlier versions); `none`: nothing, the node is a peer like any other.
    /// Under `probes` and `none`, policies judge the node by its addresses (ipBlocks), and
    /// under every setting an explicit DENY naming a node address applies (also to
    /// probes under `probes`; under `all` it does not).
    pub node_traffic: NodeTraffic,
    /// `--redirect-grace` / `MYCEL_REDIRECT_GRACE`: how long after the agent's last lease
    /// renewal the kernel still redirects mesh traffic to the proxy (see
    /// [`DEFAULT_REDIRECT_GRACE`]).
    pub redirect_grace: std::time::Duration,
}

/// Most recent flows `--flow-buffer` may keep.
pub const MAX_FLOW_BUFFER: u32 = 1 << 20;
/// Smallest `--flow-log-max-bytes`: room for a few records.
pub const MIN_FLOW_LOG_BYTES: u64 = 4 << 10;
/// Most rotated files `--flow-log-files` may keep.
pub const MAX_FLOW_LOG_FILES: u32 = 1_000;

/// The raw settings as given, before validation.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Args {
    /// Where resources come from: `kubernetes` (the API server: in-cluster configuration
    /// or KUBECONFIG) or `file:DIR` (a directory of Kubernetes YAML).
    #[arg(long, env = "MYCEL_SOURCE", default_value = DEFAULT_SOURCE)]
    pub source: String,
    /// Kubeconfig file for `--source kubernetes` [default: the in-cluster service account,
    /// then ~/.kube/config].
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<String>,
    /// This node's name (required with `--source kubernetes`; in a DaemonSet, set NODE_NAME
    /// from the downward API's `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Trust domain of workload identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "MYCEL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// cgroup v2 directory to attach the socket programs to [default: the cgroup2 root].
    #[arg(long, env = "MYCEL_CGROUP")]
    pub cgroup: Option<String>,
    /// Directory on bpffs for pinned maps and links.
    #[arg(long, env = "MYCEL_BPFFS", default_value = DEFAULT_BPFFS)]
    pub bpffs: String,
    /// Address of the admin endpoints (/healthz, /readyz, /metrics, /debug/*).
    #[arg(long, env = "MYCEL_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: String,
    /// Address of the Prometheus endpoint (/metrics).
    #[arg(long, env = "MYCEL_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,
    /// Address of the readiness endpoint (/healthz/ready).
    #[arg(long, env = "MYCEL_READINESS_ADDR", default_value = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: String,
    /// On shutdown, detach the programs and remove the pins (default: keep them, so
    /// traffic keeps flowing while the agent is down).
    #[arg(long, env = "MYCEL_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,
    /// Service frontends the kernel map holds (at most 65536); used when the map is created.
    #[arg(long, env = "MYCEL_MAX_SERVICES", default_value_t = MapSizes::default().services.to_string())]
    pub max_services: String,
    /// Backend slots across all services the kernel map holds; used when the map is created.
    #[arg(long, env = "MYCEL_MAX_BACKENDS", default_value_t = MapSizes::default().backends.to_string())]
    pub max_backends: String,
    /// Flows the kernel counts at once (an LRU: the least recently seen make room); used
    /// when the map is created.
    #[arg(long, env = "MYCEL_MAX_FLOWS", default_value_t = MapSizes::default().flows.to_string())]
    pub max_flows: String,
    /// Compiled policy entries the kernel map holds across local workloads (a workload
    /// with many rules and peers needs more); used when the map is created.
    #[arg(long, env = "MYCEL_MAX_POLICY_ENTRIES", default_value_t = MapSizes::default().policy.to_string())]
    pub max_policy_entries: String,
    /// Addresses and CIDRs with an identity the kernel map holds; used when the map is
    /// created.
    #[arg(long, env = "MYCEL_MAX_IPCACHE_ENTRIES", default_value_t = MapSizes::default().ipcache.to_string())]
    pub max_ipcache_entries: String,
    /// Recent flows kept in memory for `mycel flows` and /debug/flows.
    #[arg(long, env = "MYCEL_FLOW_BUFFER", default_value_t = flows::DEFAULT_BUFFER.to_string())]
    pub flow_buffer: String,
    /// Append every flow event to this file as JSON lines (default: no file).
    #[arg(long, env = "MYCEL_FLOW_LOG")]
    pub flow_log: Option<String>,
    /// Rotate the flow log before it grows past this many bytes.
    #[arg(long, env = "MYCEL_FLOW_LOG_MAX_BYTES", default_value_t = flows::log::DEFAULT_MAX_BYTES.to_string())]
    pub flow_log_max_bytes: String,
    /// Rotated flow log files kept (PATH.1 … PATH.N; the oldest is deleted).
    #[arg(long, env = "MYCEL_FLOW_LOG_FILES", default_value_t = flows::log::DEFAULT_FILES.to_string())]
    pub flow_log_files: String,
    /// Directory of the CA that signs workload certificates (ca.pem, ca-key.pem); created
    /// on first start standalone, mounted from the Secret mycel-ca in Kubernetes.
    #[arg(long, env = "MYCEL_CA_DIR")]
    pub ca_dir: Option<String>,
    /// Directory for what must survive restarts (the last good version of each input).
    #[arg(long, env = "MYCEL_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: String,
    /// Lifetime of workload certificates (renewed at half of it), e.g. 24h, 90m.
    #[arg(long, env = "MYCEL_CERT_LIFETIME", default_value = "24h")]
    pub cert_lifetime: String,
    /// How often the CA directory is read for changes (e.g. 5s, 500ms).
    #[arg(long, env = "MYCEL_CA_RELOAD_INTERVAL", default_value = "5s")]
    pub ca_reload_interval: String,
    /// Post-quantum key exchange of mesh connections: `prefer` (X25519MLKEM768 first,
    /// X25519 for peers without it) or `require` (X25519MLKEM768 only).
    #[arg(long, env = "MYCEL_POST_QUANTUM", default_value = "prefer")]
    pub post_quantum: String,
    /// The identity server that signs workload certificates, HOST:PORT (or
    /// https://HOST:PORT); the agent then holds no CA key (--ca-dir has only ca.pem).
    #[arg(long, env = "MYCEL_IDENTITY_SERVER")]
    pub identity_server: Option<String>,
    /// The projected ServiceAccount token (audience mycel-identity) sent to the identity
    /// server, read again at every request.
    #[arg(long, env = "MYCEL_IDENTITY_TOKEN")]
    pub identity_token: Option<String>,
    /// The SPIFFE ID the identity server's certificate must name.
    #[arg(long, env = "MYCEL_IDENTITY_SERVER_ID")]
    pub identity_server_id: Option<String>,
    /// On SIGTERM, how long open proxied connections may take to finish.
    #[arg(long, env = "MYCEL_DRAIN_GRACE", default_value = DEFAULT_DRAIN_GRACE)]
    pub drain_grace: String,
    /// Log one line per proxied connection (source, destination, identities, bytes).
    #[arg(long, env = "MYCEL_ACCESS_LOG")]
    pub access_log: bool,
    /// Traffic from the node exempt from policy and mTLS STRICT: `probes` (kubelet probes:
    /// TCP from node processes outside the pods' cgroup), `all` (everything from a node
    /// address), `none`.
    #[arg(long, env = "MYCEL_NODE_TRAFFIC", default_value = DEFAULT_NODE_TRAFFIC)]
    pub node_traffic: String,
    /// How long the kernel keeps redirecting enrolled workloads to the proxy after the
    /// agent stops renewing its lease (every second): long enough for a restart, short
    /// enough that a removed agent breaks enrolled connections only briefly; afterwards
    /// they go direct (STRICT destinations stay closed to plaintext).
    #[arg(long, env = "MYCEL_REDIRECT_GRACE", default_value = DEFAULT_REDIRECT_GRACE)]
    pub redirect_grace: String,
}

/// Default of `--node-traffic`.
pub const DEFAULT_NODE_TRAFFIC: &str = "probes";

/// An invalid setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {setting} {value:?}: {why}")]
pub struct Error {
    pub setting: &'static str,
    pub value: String,
    pub why: String,
}

fn invalid(setting: &'static str, value: &str, why: impl Into<String>) -> Error {
    Error {
        setting,
        value: value.to_string(),
        why: why.into(),
    }
}

impl Config {
    /// Validates `args`. `mounts` is the text of /proc/self/mounts (for the cgroup2 root).
    pub fn from_args(args: &Args, mounts: &str) -> Result<Self, Error> {
        let source = parse_source(
            &args.source,
            args.node_name.as_deref(),
            args.kubeconfig.as_deref(),
        )?;
        let trust_domain = parse_trust_domain(&args.trust_domain)?;
        let cgroup = match &args.cgroup {
            Some(c) => {
                let p = PathBuf::from(c);
                if !p.join("cgroup.procs").exists() {
                    return Err(invalid(
                        "--cgroup",
                        c,
                        "not a cgroup v2 directory (no cgroup.procs in it)",
                    ));
                }
                p
            }
            None => cgroup2_root(mounts).ok_or_else(|| {
                invalid(
                    "--cgroup",
                    "",
                    "no cgroup2 filesystem is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or name a directory",
                )
            })?,
        };
        let bpffs = PathBuf::from(&args.bpffs);
        if !bpffs.is_absolute() {
            return Err(invalid("--bpffs", &args.bpffs, "must be an absolute path"));
        }
        let addr = |setting, v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| invalid(setting, v, format!("{e} (expected IP:PORT)")))
        };
        let cgroup_root = cgroup2_mount_of(mounts, &cgroup).unwrap_or_else(|| cgroup.clone());
        Ok(Self {
            source,
            trust_domain,
            cgroup,
            cgroup_root,
            bpffs,
            admin_addr: addr("--admin-addr", &args.admin_addr)?,
            metrics_addr: addr("--metrics-addr", &args.metrics_addr)?,
            readiness_addr: addr("--readiness-addr", &args.readiness_addr)?,
            detach_on_exit: args.detach_on_exit,
            map_sizes: MapSizes {
                services: count("--max-services", &args.max_services, 1, MAX_SERVICES)?,
                backends: count("--max-backends", &args.max_backends, 1, 1 << 24)?,
                flows: count("--max-flows", &args.max_flows, 16, 1 << 24)?,
                policy: count(
                    "--max-policy-entries",
                    &args.max_policy_entries,
                    16,
                    1 << 24,
                )?,
                ipcache: count(
                    "--max-ipcache-entries",
                    &args.max_ipcache_entries,
                    16,
                    1 << 24,
                )?,
                ..MapSizes::default()
            },
            flows: flow_config(args)?,
            ca_dir: parse_ca_dir(args.ca_dir.as_deref(), &args.source)?,
            state_dir: absolute("--state-dir", &args.state_dir)?,
            cert_lifetime: duration("--cert-lifetime", &args.cert_lifetime, 2)?,
            ca_reload_interval: match duration("--ca-reload-interval", &args.ca_reload_interval, 0)?
            {
                d if d < std::time::Duration::from_millis(50) => {
                    return Err(invalid(
                        "--ca-reload-interval",
                        &args.ca_reload_interval,
                        "must be at least 50ms",
                    ));
                }
                d => d,
            },
            post_quantum: args
                .post_quantum
                .parse()
                .map_err(|why: String| invalid("--post-quantum", &args.post_quantum, why))?,
            identity_server: identity_server(args)?,
            drain_grace: duration("--drain-grace", &args.drain_grace, 0)?,
            access_log: args.access_log,
            node_traffic: NodeTraffic::parse(&args.node_traffic).ok_or_else(|| {
                invalid(
                    "--node-traffic",
                    &args.node_traffic,
                    "expected probes, all or none",
                )
            })?,
            redirect_grace: duration(
                "--redirect-grace",
                &args.redirect_grace,
                MIN_REDIRECT_GRACE_SECS,
            )?,
        })
    }
}

fn flow_config(args: &Args) -> Result<flows::Config, Error> {
    let log = match &args.flow_log {
        None => None,
        Some(p) if p.is_empty() => None,
        Some(p) => {
            let path = PathBuf::from(p);
            if path.file_name().is_none() {
                return Err(invalid("--flow-log", p, "must name a file"));
            }
            let max_bytes = match args.flow_log_max_bytes.parse::<u64>() {
                Ok(n) if n >= MIN_FLOW_LOG_BYTES => n,
                _ => {
                    return Err(invalid(
                        "--flow-log-max-bytes",
                        &args.flow_log_max_bytes,
                        format!("expected a whole number of bytes, at least {MIN_FLOW_LOG_BYTES}"),
                    ));
                }
            };
            Some(flows::LogConfig {
                path,
                max_bytes,
                files: count(
                    "--flow-log-files",
                    &args.flow_log_files,
                    0,
                    MAX_FLOW_LOG_FILES,
                )?,
            })
        }
    };
    Ok(flows::Config {
        buffer: count("--flow-buffer", &args.flow_buffer, 1, MAX_FLOW_BUFFER)? as usize,
        log,
        // Byte deltas are tracked for as many flows as the kernel counts.
        tracked: count("--max-flows", &args.max_flows, 16, 1 << 24)? as usize,
        ..flows::Config::default()
    })
}

/// A setting that must be an absolute path.
fn absolute(setting: &'static str, v: &str) -> Result<PathBuf, Error> {
    if !Path::new(v).is_absolute() {
        return Err(invalid(setting, v, "must be an absolute path"));
    }
    Ok(PathBuf::from(v))
}

/// `--identity-server`, `--identity-token`, `--identity-server-id`: all three or none.
fn identity_server(args: &Args) -> Result<Option<crate::identity::RemoteSigner>, Error> {
    fn set(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|v| !v.is_empty())
    }
    let (server, token, id) = match (
        set(&args.identity_server),
        set(&args.identity_token),
        set(&args.identity_server_id),
    ) {
        (None, None, None) => return Ok(None),
        (Some(s), Some(t), Some(i)) => (s, t, i),
        (server, token, _) => {
            let missing = if server.is_none() {
                "--identity-server"
            } else if token.is_none() {
                "--identity-token"
            } else {
                "--identity-server-id"
            };
            return Err(invalid(
                missing,
                "",
                "--identity-server, --identity-token and --identity-server-id go together",
            ));
        }
    };
    let hostport = server
        .strip_prefix("https://")
        .unwrap_or(server)
        .trim_end_matches('/');
    let port_ok = hostport
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || hostport.contains('/') {
        return Err(invalid(
            "--identity-server",
            server,
            "expected HOST:PORT or https://HOST:PORT",
        ));
    }
    let server_id = crate::identity::SpiffeId::parse(id)
        .map_err(|e| invalid("--identity-server-id", id, e.to_string()))?;
    Ok(Some(crate::identity::RemoteSigner {
        server: hostport.to_owned(),
        token: absolute("--identity-token", token)?,
        server_id,
    }))
}

/// `--ca-dir`: required with Kubernetes (one CA for every node), defaulted standalone.
fn parse_ca_dir(v: Option<&str>, source: &str) -> Result<PathBuf, Error> {
    match v.filter(|v| !v.is_empty()) {
        Some(v) => absolute("--ca-dir", v),
        None if source == "kubernetes" => Err(invalid(
            "--ca-dir",
            "",
            "required with --source kubernetes: every node must share one CA; mount the \
             Secret mycel-ca (see manifests/README.md) and set MYCEL_CA_DIR",
        )),
        None => Ok(PathBuf::from(DEFAULT_CA_DIR)),
    }
}

/// A duration such as `24h`, `90m`, `5s`, `250ms`, at least `min_secs`; the error names
/// `setting`.
pub(crate) fn duration(
    setting: &'static str,
    v: &str,
    min_secs: u64,
) -> Result<std::time::Duration, Error> {
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(digits);
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => 0,
    };
    let d = number
        .parse::<u64>()
        .ok()
        .filter(|_| millis > 0)
        .and_then(|n| n.checked_mul(millis))
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| {
            invalid(
                setting,
                v,
                "expected a whole number with a unit: ms, s, m or h (e.g. 24h, 5s)",
            )
        })?;
    if d.as_secs() < min_secs {
        return Err(invalid(setting, v, format!("must be at least {min_secs}s")));
    }
    Ok(d)
}

fn count(setting: &'static str, v: &str, min: u32, max: u32) -> Result<u32, Error> {
    match v.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(invalid(
            setting,
            v,
            format!("expected a whole number from {min} to {max}"),
        )),
    }
}

fn parse_source(
    v: &str,
    node_name: Option<&str>,
    kubeconfig: Option<&str>,
) -> Result<SourceConfig, Error> {
    if v == "kubernetes" {
        let node_name = node_name.unwrap_or_default().trim();
        if node_name.is_empty() {
            return Err(invalid(
                "--node-name",
                node_name,
                "required with --source kubernetes: set NODE_NAME from the downward API \
                 (fieldRef spec.nodeName) or pass --node-name",
            ));
        }
        let kubeconfig = match kubeconfig.filter(|k| !k.is_empty()) {
            Some(k) if !Path::new(k).is_file() => {
                return Err(invalid("--kubeconfig", k, "the file does not exist"));
            }
            k => k.map(PathBuf::from),
        };
        return Ok(SourceConfig::Kubernetes {
            node_name: node_name.to_owned(),
            kubeconfig,
        });
    }
    match v.split_once(':') {
        Some(("file", dir)) if !dir.is_empty() => {
            let dir = Path::new(dir);
            if !dir.is_dir() {
                return Err(invalid("--source", v, "the directory does not exist"));
            }
            Ok(SourceConfig::File(dir.to_path_buf()))
        }
        _ => Err(invalid("--source", v, "expected kubernetes or file:DIR")),
    }
}

/// A trust domain is a DNS-like name: lowercase letters, digits, `.`, `-` and `_` (the
/// SPIFFE ID specification's characters for the trust domain).
fn parse_trust_domain(v: &str) -> Result<String, Error> {
    let ok = !v.is_empty()
        && v.len() <= 255
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(invalid(
            "--trust-domain",
            v,
            "expected lowercase letters, digits, '.', '-' and '_' (such as cluster.local)",
        ))
    }
}

/// The mount point of the (first) cgroup2 filesystem in a mounts table.
pub fn cgroup2_root(mounts: &str) -> Option<PathBuf> {
    cgroup2_mounts(mounts).next()
}

/// The cgroup2 mount that holds `dir` (the deepest, if mounts nest).
pub fn cgroup2_mount_of(mounts: &str, dir: &Path) -> Option<PathBuf> {
    cgroup2_mounts(mounts)
        .filter(|mount| dir.starts_with(mount))
        .max_by_key(|mount| mount.as_os_str().len())
}

/// Mount points of cgroup2 filesystems in a mounts table, in its order.
fn cgroup2_mounts(mounts: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mounts.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            source: format!("file:{}", std::env::temp_dir().display()),
            node_name: None,
            kubeconfig: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            cgroup: None,
            bpffs: DEFAULT_BPFFS.into(),
            admin_addr: DEFAULT_ADMIN_ADDR.into(),
            metrics_addr: DEFAULT_METRICS_ADDR.into(),
            readiness_addr: DEFAULT_READINESS_ADDR.into(),
            detach_on_exit: false,
            max_services: "65536".into(),
            max_backends: "1000".into(),
            max_flows: "65536".into(),
            max_policy_entries: "65536".into(),
            max_ipcache_entries: "65536".into(),
            flow_buffer: "4096".into(),
            flow_log: None,
            flow_log_max_bytes: flows::log::DEFAULT_MAX_BYTES.to_string(),
            flow_log_files: flows::log::DEFAULT_FILES.to_string(),
            ca_dir: None,
            state_dir: DEFAULT_STATE_DIR.into(),
            cert_lifetime: "24h".into(),
            post_quantum: "prefer".into(),
            identity_server: None,
            identity_token: None,
            identity_server_id: None,
            ca_reload_interval: "5s".into(),
            drain_grace: DEFAULT_DRAIN_GRACE.into(),
            access_log: false,
            node_traffic: DEFAULT_NODE_TRAFFIC.into(),
            redirect_grace: DEFAULT_REDIRECT_GRACE.into(),
        }
    }

    #[test]
    fn redirect_grace_outlasts_the_renewal_interval() {
        let cfg = Config::from_args(&args(), MOUNTS).unwrap();
        assert_eq!(cfg.redirect_grace, std::time::Duration::from_secs(10));
        let mut a = args();
        a.redirect_grace = "3s".into();
        let cfg = Config::from_args(&a, MOUNTS).unwrap();
        assert_eq!(cfg.redirect_grace, std::time::Duration::from_secs(3));
        for bad in ["1s", "500ms", "", "10"] {
            a.redirect_grace = bad.into();
            let e = Config::from_args(&a, MOUNTS).unwrap_err();
            assert_eq!(e.setting, "--redirect-grace", "{bad:?}");
        }
    }

    #[test]
    fn identity_server_settings_go_together() {
        let with = |server: Option<&str>, token: Option<&str>, id: Option<&str>| {
            let mut a = args();
            a.identity_server = server.map(Into::into);
            a.identity_token = token.map(Into::into);
            a.identity_server_id = id.map(Into::into);
            Config::from_args(&a, MOUNTS)
        };
        let id = "spiffe://cluster.local/ns/mycel-system/sa/mycel-identity";
        assert_eq!(with(None, None, None).unwrap().identity_server, None);
        let remote = with(
            Some("https://mycel-identity.mycel-system.svc:15012/"),
            Some("/var/run/secrets/mycel/identity/token"),
            Some(id),
        )
        .unwrap()
        .identity_server
        .expect("remote signer");
        assert_eq!(remote.server, "mycel-identity.mycel-system.svc:15012");
        assert_eq!(remote.server_id.to_string(), id);
        // One without the others would silently fall back to a local CA: refused.
        let e = with(Some("h:15012"), None, Some(id)).unwrap_err();
        assert_eq!(e.setting, "--identity-token");
        let e = with(None, Some("/t"), Some(id)).unwrap_err();
        assert_eq!(e.setting, "--identity-server");
        let e = with(Some("h:15012"), Some("/t"), None).unwrap_err();
        assert_eq!(e.setting, "--identity-server-id");
        for bad in ["h", "h:0", ":15012", "h:port", "https://h:1/x"] {
            let e = with(Some(bad), Some("/t"), Some(id)).unwrap_err();
            assert_eq!(e.setting, "--identity-server", "{bad}");
        }
        let e = with(Some("h:1"), Some("token"), Some(id)).unwrap_err();
        assert_eq!(e.setting, "--identity-token");
        let e = with(Some("h:1"), Some("/t"), Some("spiffe://x/other")).unwrap_err();
        assert_eq!(e.setting, "--identity-server-id");
    }

    #[test]
    fn node_traffic_setting() {
        let with = |v: &str| {
            let mut a = args();
            a.node_traffic = v.into();
            Config::from_args(&a, MOUNTS)
        };
        assert_eq!(
            Config::from_args(&args(), MOUNTS).unwrap().node_traffic,
            NodeTraffic::Probes
        );
        assert_eq!(with("all").unwrap().node_traffic, NodeTraffic::All);
        assert_eq!(with("none").unwrap().node_traffic, NodeTraffic::None);
        let e = with("kubelet").unwrap_err();
        assert_eq!(e.setting, "--node-traffic");
        assert!(e.to_string().contains("probes, all or none"), "{e}");
    }

    #[test]
    fn mesh_settings() {
        let cfg = Config::from_args(&args(), MOUNTS).unwrap();
        assert_eq!(cfg.ca_dir, PathBuf::from(DEFAULT_CA_DIR));
        assert_eq!(cfg.cert_lifetime, std::time::Duration::from_secs(24 * 3600));
        assert_eq!(cfg.drain_grace, std::time::Duration::from_secs(5));
        let with = |f: &dyn Fn(&mut Args)| {
            let mut a = args();
            f(&mut a);
            Config::from_args(&a, MOUNTS)
        };
        assert_eq!(
            with(&|a| a.cert_lifetime = "90m".into())
                .unwrap()
                .cert_lifetime,
            std::time::Duration::from_secs(90 * 60)
        );
        assert_eq!(
            with(&|a| a.drain_grace = "250ms".into())
                .unwrap()
                .drain_grace,
            std::time::Duration::from_millis(250)
        );
        for bad in ["", "10", "h", "1d", "-1s", "1s"] {
            let e = with(&|a| a.cert_lifetime = bad.into()).unwrap_err();
            assert_eq!(e.setting, "--cert-lifetime", "{bad:?}");
        }
        let e = with(&|a| a.ca_dir = Some("relative".into())).unwrap_err();
        assert_eq!(e.setting, "--ca-dir");
        assert_eq!(
            cfg.post_quantum,
            crate::identity::KeyExchange::PreferPostQuantum
        );
        assert_eq!(
            with(&|a| a.post_quantum = "require".into())
                .unwrap()
                .post_quantum,
            crate::identity::KeyExchange::RequirePostQuantum
        );
        let e = with(&|a| a.post_quantum = "yes".into()).unwrap_err();
        assert_eq!(e.setting, "--post-quantum");
        assert!(e.why.contains("X25519MLKEM768"), "{e}");
        // Kubernetes needs the shared CA named.
        let e = with(&|a| {
            a.source = "kubernetes".into();
            a.node_name = Some("n1".into());
        })
        .unwrap_err();
        assert_eq!(e.setting, "--ca-dir");
        assert!(e.why.contains("mycel-ca"), "{e}");
    }

    #[test]
    fn flow_settings() {
        let cfg = Config::from_args(&args(), MOUNTS).unwrap();
        assert_eq!(cfg.flows.buffer, flows::DEFAULT_BUFFER);
        assert_eq!(cfg.flows.log, None);

        let mut a = args();
        a.flow_log = Some("/var/log/mycel/flows.log".into());
        let cfg = Config::from_args(&a, MOUNTS).unwrap();
        assert_eq!(
            cfg.flows.log,
            Some(flows::LogConfig {
                path: "/var/log/mycel/flows.log".into(),
                max_bytes: 64 << 20,
                files: 5,
            })
        );

        for (setting, set) in [
            (
                "--flow-buffer",
                (|a: &mut Args| a.flow_buffer = "0".into()) as fn(&mut Args),
            ),
            ("--flow-log-max-bytes", |a| {
                a.flow_log_max_bytes = "10".into()
            }),
            ("--flow-log-files", |a| a.flow_log_files = "many".into()),
            ("--flow-log", |a| a.flow_log = Some("/".into())),
        ] {
            let mut a = args();
            a.flow_log = Some("/tmp/flows.log".into());
            set(&mut a);
            assert_eq!(Config::from_args(&a, MOUNTS).unwrap_err().setting, setting);
        }
    }

    const MOUNTS: &str = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                          cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";

    #[test]
    fn finds_the_cgroup2_root() {
        assert_eq!(
            cgroup2_root(MOUNTS),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_root("proc /proc proc rw 0 0\n"), None);
        let nested = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_of(nested, Path::new("/sys/fs/cgroup/unified/kubepods")),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount_of(nested, Path::new("/elsewhere")), None);
        let cfg = Config::from_args(&args(), MOUNTS).unwrap();
        assert_eq!(cfg.cgroup, PathBuf::from("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let mut a = args();
        a.admin_addr = "localhost".into();
        let e = Config::from_args(&a, MOUNTS).unwrap_err();
        assert_eq!(e.setting, "--admin-addr");
        assert!(e.to_string().contains("\"localhost\""), "{e}");

        let mut a = args();
        a.source = "kubernetes".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--node-name",
            "the Kubernetes source needs the node's name"
        );
        a.node_name = Some("node-1".into());
        a.ca_dir = Some("/var/run/secrets/mycel/ca".into());
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap().source,
            SourceConfig::Kubernetes {
                node_name: "node-1".into(),
                kubeconfig: None,
            }
        );
        a.trust_domain = "Cluster Local".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--trust-domain"
        );
        a.trust_domain = "example.org".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap().trust_domain,
            "example.org"
        );
        a.source = "git:somewhere".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--source"
        );

        let mut a = args();
        a.source = "file:/does/not/exist".into();
        let e = Config::from_args(&a, MOUNTS).unwrap_err();
        assert!(e.why.contains("does not exist"), "{e}");

        let mut a = args();
        a.cgroup = Some("/tmp".into());
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--cgroup"
        );

        let mut a = args();
        a.bpffs = "relative/dir".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--bpffs"
        );

        assert_eq!(
            Config::from_args(&args(), "").unwrap_err().setting,
            "--cgroup"
        );

        let mut a = args();
        a.max_services = "70000".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--max-services"
        );
        let mut a = args();
        a.max_policy_entries = "none".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--max-policy-entries"
        );
        let mut a = args();
        a.max_flows = "0".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--max-flows"
        );
        let mut a = args();
        a.max_backends = "lots".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--max-backends"
        );
    }
}
