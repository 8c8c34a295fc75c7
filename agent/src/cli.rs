//! The command line: `mycel agent` and the user-facing subcommands that talk to a running
//! agent's admin endpoint.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

mod uninstall;
pub use uninstall::{UninstallArgs, uninstall, uninstall_to};

use crate::{
    admin::Status,
    config,
    datapath::MapService,
    flows::{
        Flow,
        record::{Kind, rfc3339},
    },
    identity::{self, Ca},
};

/// mycel: a sidecar-less service mesh built on eBPF.
#[derive(Debug, clap::Parser)]
#[command(name = "mycel", version, about)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `mycel_agent=debug`.
    #[arg(long, env = "MYCEL_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing the agent's settings would buy nothing"
)]
pub enum Command {
    /// Run the node agent.
    Agent(config::Args),
    /// Show what the agent is doing: programs, services and backends programmed, errors.
    Status(ClientArgs),
    /// List the services in the kernel maps with their backends.
    Services(ClientArgs),
    /// Show recent flows, or follow them as they happen (like `hubble observe`).
    Flows(FlowsArgs),
    /// Manage the mesh's certificate authority.
    Ca(CaArgs),
    /// Run the identity server: in Kubernetes, the only holder of the CA key; it signs
    /// node agents' certificate requests for the pods of their own node.
    IdentityServer(IdentityServerArgs),
    /// Remove what mycel agents left on this node once none runs: programs and pins, clsact
    /// filters, and the set-up inside workloads' network namespaces.
    Uninstall(UninstallArgs),
}

/// `mycel identity-server`.
#[derive(Debug, clap::Args)]
pub struct IdentityServerArgs {
    /// Where agents send certificate requests (TLS).
    #[arg(long, env = "MYCEL_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Prometheus metrics (plain HTTP, /metrics).
    #[arg(long, env = "MYCEL_METRICS_ADDR", default_value = config::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Directory of the CA (ca.pem, ca-key.pem), mounted from the Secret mycel-ca.
    #[arg(long, env = "MYCEL_CA_DIR")]
    pub ca_dir: PathBuf,
    /// The trust domain of the identities it signs.
    #[arg(long, env = "MYCEL_TRUST_DOMAIN", default_value = config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The node agents' ServiceAccount, NAMESPACE/NAME: only its pod-bound tokens are
    /// served.
    #[arg(
        long,
        env = "MYCEL_AGENT_SERVICE_ACCOUNT",
        default_value = "mycel-system/mycel"
    )]
    pub agent_service_account: String,
    /// The server's own SPIFFE ID, which agents expect [default:
    /// spiffe://TRUST_DOMAIN/ns/mycel-system/sa/mycel-identity].
    #[arg(long, env = "MYCEL_IDENTITY")]
    pub identity: Option<String>,
    /// Lifetime of the certificates it signs.
    #[arg(long, env = "MYCEL_CERT_LIFETIME", default_value = "24h")]
    pub cert_lifetime: String,
    /// Kubeconfig file [default: the in-cluster service account].
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// `mycel identity-server`: serves until SIGTERM or SIGINT.
pub async fn identity_server(args: &IdentityServerArgs) -> anyhow::Result<()> {
    use crate::identity::server::{IdentityServer, Metrics, OwnCertificate, Settings};
    use anyhow::Context as _;
    fn usage<T>(e: config::Error) -> T {
        eprintln!("mycel: {e}");
        std::process::exit(config::EXIT_USAGE);
    }
    let lifetime =
        config::duration("--cert-lifetime", &args.cert_lifetime, 2).unwrap_or_else(usage);
    let agent_service_account = match args.agent_service_account.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            (ns.to_owned(), sa.to_owned())
        }
        _ => usage(config::Error {
            setting: "--agent-service-account",
            value: args.agent_service_account.clone(),
            why: "expected NAMESPACE/NAME".to_owned(),
        }),
    };
    let own_id = match &args.identity {
        Some(id) => identity::SpiffeId::parse(id),
        None => identity::SpiffeId::new(&args.trust_domain, "mycel-system", "mycel-identity"),
    }
    .context("--identity")?;
    let read = |name: &str| {
        let path = args.ca_dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let ca = Arc::new(Ca::from_pem_paths(
        &read(identity::CA_CERT_FILE)?,
        &args.ca_dir.join(identity::CA_CERT_FILE),
        &read(identity::CA_KEY_FILE)?,
        &args.ca_dir.join(identity::CA_KEY_FILE),
    )?);
    let client = crate::source::k8s::client(args.kubeconfig.as_deref()).await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let tls =
        Arc::new(OwnCertificate::new(ca.clone(), own_id.clone(), lifetime)).server_config()?;
    let server = Arc::new(IdentityServer::new(
        ca,
        client,
        Settings {
            trust_domain: args.trust_domain.clone(),
            agent_service_account,
            lifetime,
        },
        metrics,
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("listening on {}", args.metrics_addr))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        metrics = %metrics_listener.local_addr()?,
        identity = %own_id,
        "identity server listening"
    );
    let registry = Arc::new(registry);
    tokio::spawn(serve_metrics(metrics_listener, registry));
    tokio::select! {
        () = server.serve(listener, tls) => {}
        r = tokio::signal::ctrl_c() => { r?; }
        () = sigterm() => {}
    }
    Ok(())
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Prometheus text on `GET /metrics`.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Arc<prometheus_client::registry::Registry>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(text)),
                    ))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// `mycel ca`: the mesh's certificate authority.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Create a new CA for the agents to issue workload certificates with: DIR/ca.pem (the
    /// CA certificate, mode 0644) and DIR/ca-key.pem (its private key, mode 0600). In
    /// Kubernetes, store both in the Secret `mycel-ca` that the DaemonSet mounts.
    Create(CaCreateArgs),
}

/// `mycel ca create`.
#[derive(Debug, clap::Args)]
pub struct CaCreateArgs {
    /// The directory to write the CA into (created with mode 0700 if missing). A CA file
    /// already there is never overwritten.
    #[arg(long)]
    pub dir: PathBuf,
    /// The trust domain of the SPIFFE IDs the CA signs; the agents' --trust-domain must
    /// be the same.
    #[arg(long, default_value = config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// How to reach the agent.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The agent's admin address.
    #[arg(long, env = "MYCEL_ADMIN_ADDR", default_value = config::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Flows shown without `--follow` when `--limit` is not given (as `hubble observe`).
pub const DEFAULT_FLOWS_LIMIT: usize = 20;

/// `mycel flows`: recent flows, like `hubble observe`.
#[derive(Debug, clap::Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Keep printing flows as they happen.
    #[arg(long, short)]
    pub follow: bool,
    /// Only flows from this source: a workload (`namespace/name` or name) or an IP.
    #[arg(long)]
    pub from: Option<String>,
    /// Only flows to this destination: a workload (`namespace/name` or name) or an IP.
    #[arg(long)]
    pub to: Option<String>,
    /// Only forwarded or only dropped flows.
    #[arg(long, value_enum)]
    pub verdict: Option<VerdictArg>,
    /// Only flows with a source or destination in this namespace.
    #[arg(long, short)]
    pub namespace: Option<String>,
    /// How many recent flows to show [default: 20; with --follow, 0: only new flows].
    #[arg(long)]
    pub limit: Option<usize>,
}

/// `--verdict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictArg {
    Forwarded,
    Dropped,
}

impl FlowsArgs {
    /// The `/debug/flows` request for these arguments.
    pub fn path(&self) -> String {
        let mut q: Vec<String> = Vec::new();
        for (k, v) in [
            ("from", self.from.as_deref()),
            ("to", self.to.as_deref()),
            ("namespace", self.namespace.as_deref()),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", percent_encode(v)));
            }
        }
        if let Some(v) = self.verdict {
            q.push(format!(
                "verdict={}",
                match v {
                    VerdictArg::Forwarded => "forwarded",
                    VerdictArg::Dropped => "dropped",
                }
            ));
        }
        let limit = match (self.limit, self.follow) {
            (Some(n), _) => Some(n),
            (None, false) => Some(DEFAULT_FLOWS_LIMIT),
            (None, true) => None,
        };
        if let Some(n) = limit {
            q.push(format!("limit={n}"));
        }
        if self.follow {
            q.push("follow=1".into());
        }
        if q.is_empty() {
            "/debug/flows".into()
        } else {
            format!("/debug/flows?{}", q.join("&"))
        }
    }
}

fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const FLOW_HEADER: [&str; 6] = ["TIME", "SOURCE", "DESTINATION", "PROTO", "VERDICT", "BYTES"];

fn flow_row(f: &Flow) -> [String; 6] {
    let side = |e: &crate::flows::record::Endpoint| format!("{} ({})", e.display_name(), e.address);
    let time = f.time.get(11..23).unwrap_or(&f.time).to_string();
    let proto = if f.tcp_flags.is_empty() {
        f.protocol.to_string()
    } else {
        format!("{} [{}]", f.protocol, f.tcp_flags.join(","))
    };
    let mut verdict = f.verdict.as_str().to_string();
    if let Some(r) = &f.drop_reason {
        verdict.push_str(&format!(" ({r})"));
    }
    if let Some(p) = &f.policy {
        verdict.push_str(&format!(" by {p}"));
    }
    if f.kind == Kind::Closed {
        verdict.push_str(" closed");
    }
    [
        time,
        side(&f.source),
        side(&f.destination),
        proto,
        verdict,
        format!("{}/{}", f.forward.bytes, f.reply.bytes),
    ]
}

/// Column widths of the streaming table (rows cannot be measured in advance).
const FOLLOW_WIDTHS: [usize; 5] = [12, 36, 36, 16, 32];

fn follow_line(cells: &[&str; 6]) -> String {
    let mut l = String::new();
    for (c, w) in cells.iter().zip(FOLLOW_WIDTHS) {
        l.push_str(&format!("{c:<w$}  "));
    }
    l.push_str(cells[5]);
    l.trim_end().to_string() + "\n"
}

/// Writes `s` to `out`; `false` when the reader went away (e.g. `| head`).
fn emit(out: &mut impl std::io::Write, s: &str) -> anyhow::Result<bool> {
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `mycel flows`.
pub async fn flows(args: &FlowsArgs) -> anyhow::Result<()> {
    flows_to(args, &mut std::io::stdout()).await
}

/// `mycel flows`, printing to `out`. Returns when the output is closed (with `--follow`)
/// or every flow is printed.
pub async fn flows_to(args: &FlowsArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let addr = args.client.admin_addr;
    let path = args.path();
    let json = args.client.output == Output::Json;
    if !args.follow {
        let body = get(addr, &path).await?;
        let list: Vec<Flow> =
            serde_json::from_str(&body).context("the agent's flow list is not valid JSON")?;
        let text = if json {
            let mut text = String::new();
            for f in &list {
                text.push_str(&serde_json::to_string(f)?);
                text.push('\n');
            }
            text
        } else {
            let rows: Vec<[String; 6]> = list.iter().map(flow_row).collect();
            table(&FLOW_HEADER, &rows)
        };
        emit(out, &text)?;
        return Ok(());
    }

    let resp = request(addr, &path).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body.collect().await?.to_bytes();
        bail!(
            "GET {path} from {addr}: {status}: {}",
            String::from_utf8_lossy(&text).trim()
        );
    }
    if !json && !emit(out, &follow_line(&FLOW_HEADER))? {
        return Ok(());
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("reading flows from {addr}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..i]);
            let value: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("the agent sent a line that is not JSON: {line}"))?;
            if let Some(n) = value.get("lost") {
                eprintln!("mycel: {n} flows lost: this reader fell behind the agent");
                continue;
            }
            let text = if json {
                format!("{line}\n")
            } else {
                let f: Flow = serde_json::from_value(value).with_context(|| {
                    format!("the agent sent a flow this CLI cannot read: {line}")
                })?;
                let row = flow_row(&f);
                follow_line(&row.each_ref().map(String::as_str))
            };
            if !emit(out, &text)? {
                return Ok(());
            }
        }
    }
    bail!("the agent at {addr} ended the flow stream (did it stop?)")
}

/// `mycel status`.
pub async fn status(args: &ClientArgs) -> anyhow::Result<()> {
    status_to(args, &mut std::io::stdout()).await
}

/// `mycel status`, printing to `out`.
pub async fn status_to(args: &ClientArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let body = get(args.admin_addr, "/debug/status").await?;
    if args.output == Output::Json {
        emit(out, &format!("{}\n", body.trim_end()))?;
        return Ok(());
    }
    let s: Status = serde_json::from_str(&body).context("the agent's status is not valid JSON")?;
    emit(out, &status_text(&s, SystemTime::now()))?;
    Ok(())
}

/// The table form of `mycel status`; `now` is when certificates' remaining time counts
/// from.
fn status_text(s: &Status, now: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mycel agent {}  ready: {}",
        s.version,
        if s.ready { "yes" } else { "no" }
    );
    let _ = writeln!(out, "source:   {}", s.source);
    let _ = writeln!(out, "cgroup:   {}", s.cgroup.display());
    let _ = writeln!(out, "bpffs:    {}", s.bpffs.display());
    let attached = s.programs.iter().filter(|p| p.attached).count();
    let _ = writeln!(
        out,
        "programs: {attached}/{} attached ({})",
        s.programs.len(),
        s.programs
            .iter()
            .map(|p| if p.attached {
                p.name.clone()
            } else {
                format!("{} (detached)", p.name)
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    for f in &s.kernel_features {
        let _ = writeln!(
            out,
            "kernel:   {}: {}",
            f.feature,
            if f.available {
                "yes".to_string()
            } else {
                format!("no ({})", f.impact)
            }
        );
    }
    let _ = writeln!(
        out,
        "policy:   {} AuthorizationPolicies; programs on {} workload interfaces{}",
        s.policies,
        s.tc_attachments.len(),
        if s.tc_attachments.is_empty() {
            String::new()
        } else {
            format!(": {}", s.tc_attachments.join(", "))
        }
    );
    let _ = writeln!(
        out,
        "services: {} frontends, {} backends programmed",
        s.services, s.backends
    );
    if s.taken_over > 0 {
        let _ = writeln!(
            out,
            "          {} frontends taken over from pinned maps at start",
            s.taken_over
        );
    }
    let _ = writeln!(out, "input problems standing: {}", s.errors_current);
    let _ = writeln!(
        out,
        "last error: {}",
        s.last_error.as_deref().unwrap_or("none")
    );
    if !s.kernel_counters.is_empty() {
        let _ = writeln!(
            out,
            "counters: {}",
            s.kernel_counters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = writeln!(out, "mesh workloads served: {}", s.mesh_workloads);
    for (workload, why) in &s.mesh_pending {
        let _ = writeln!(out, "  not served yet: {workload}: {why}");
    }
    out.push_str(&certificates_text(s, now));
    out
}

/// The "certificates" and "trust bundle" sections of `mycel status`.
fn certificates_text(s: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    if s.certificates.is_empty() {
        out.push_str("certificates: none (no workload identity on this node)\n");
    } else {
        out.push_str("certificates:\n");
        let rows: Vec<[String; 4]> = s
            .certificates
            .iter()
            .map(|c| {
                [
                    c.id.to_string(),
                    expires_in(c.not_after, now),
                    rfc3339_seconds(c.not_after),
                    c.serial.clone(),
                ]
            })
            .collect();
        let t = table(&["IDENTITY", "EXPIRES IN", "NOT AFTER", "SERIAL"], &rows);
        out.push_str(&indent(&t));
    }
    if !s.trust_bundle.is_empty() {
        out.push_str("trust bundle:\n");
        let rows: Vec<[String; 3]> = s
            .trust_bundle
            .iter()
            .map(|a| {
                [
                    expires_in(a.not_after, now),
                    rfc3339_seconds(a.not_after),
                    a.subject.clone(),
                ]
            })
            .collect();
        let t = table(&["EXPIRES IN", "NOT AFTER", "CA"], &rows);
        out.push_str(&indent(&t));
    }
    if !s.signing_ca.is_empty() {
        out.push_str(&format!("signing CA: {}\n", s.signing_ca));
    }
    if let Some(e) = &s.ca_reload.error {
        out.push_str(&format!(
            "CA directory NOT APPLIED (the last good CA and trust bundle are in force): {e}\n"
        ));
    }
    for (id, e) in &s.certificate_errors {
        out.push_str(&format!(
            "NO CERTIFICATE for {id} from the identity server (retrying): {e}\n"
        ));
    }
    if !s.key_exchange.is_empty() {
        out.push_str(&format!(
            "key exchange: {} (preferred first)\n",
            s.key_exchange.join(", ")
        ));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `t` as RFC 3339 in UTC to the second (certificate times have no fractions).
fn rfc3339_seconds(t: SystemTime) -> String {
    let full = rfc3339(t);
    match full.split_once('.') {
        Some((secs, _)) => format!("{secs}Z"),
        None => full,
    }
}

/// How long from `now` until `t`, for people: `23h 59m`, `364d 23h`, or `expired 5m
/// ago`.
fn expires_in(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(left) => human(left),
        Err(e) => format!("expired {} ago", human(e.duration())),
    }
}

/// A duration in its two largest units.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, h, m) = (s / 86_400, s / 3_600 % 24, s / 60 % 60);
    match (days / 365, days) {
        (y, _) if y > 0 => format!("{y}y {}d", days % 365),
        (_, d) if d > 0 => format!("{d}d {h}h"),
        _ if h > 0 => format!("{h}h {m}m"),
        _ if m > 0 => format!("{m}m {}s", s % 60),
        _ => format!("{s}s"),
    }
}

/// `mycel ca`.
pub fn ca(args: &CaArgs) -> anyhow::Result<()> {
    match &args.command {
        CaCommand::Create(create) => ca_create(create, &mut std::io::stdout()),
    }
}

/// `mycel ca create`: writes a new CA and says how to hand it to the agents.
pub fn ca_create(args: &CaCreateArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    // The error names the file and says what to do; its source repeats the reason, so it
    // is not chained again.
    let ca = Ca::create(&args.dir, &args.trust_domain)
        .map_err(|e| anyhow::anyhow!("cannot create a CA in {}: {e}", args.dir.display()))?;
    let dir = args.dir.display();
    let text = format!(
        "created a CA for the trust domain {td}, valid until {until}:\n  \
         {dir}/{cert}  the CA certificate\n  \
         {dir}/{key}  its private key: keep it secret\n\
         In Kubernetes, give it to the agents as the Secret mycel-ca:\n  \
         kubectl -n mycel-system create secret generic mycel-ca --from-file={dir}/\n",
        td = args.trust_domain,
        until = rfc3339_seconds(ca.not_after()),
        cert = identity::CA_CERT_FILE,
        key = identity::CA_KEY_FILE,
    );
    emit(out, &text)?;
    Ok(())
}

/// `mycel services`.
pub async fn services(args: &ClientArgs) -> anyhow::Result<()> {
    let body = get(args.admin_addr, "/debug/services").await?;
    let list: Vec<MapService> =
        serde_json::from_str(&body).context("the agent's service list is not valid JSON")?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|s| {
            let name = match (&s.namespace, &s.name) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                _ => "(unknown)".into(),
            };
            let backends = if s.backends.is_empty() {
                "(none: connections refused)".into()
            } else {
                s.backends
                    .iter()
                    .map(|b| b.address.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            [
                name,
                SocketAddr::new(s.address, s.port).to_string(),
                s.protocol.clone(),
                s.affinity.clone(),
                backends,
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["SERVICE", "FRONTEND", "PROTO", "AFFINITY", "BACKENDS"],
            &rows
        )
    );
    Ok(())
}

fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == N {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Sends `GET path` to the agent's admin endpoint; the body is left to the caller.
async fn request(
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!("cannot reach the agent's admin endpoint at {addr}: is `mycel agent` running? (set --admin-addr)")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path} from {addr}"))
}

/// GETs `path` from the agent's admin endpoint.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let resp = request(addr, path).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("GET {path} from {addr}: {status}: {}", body.trim());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// `mycel flows ARGS` (through a wrapper, until `Command` has the subcommand).
    #[derive(Debug, clap::Parser)]
    struct FlowsCli {
        #[command(flatten)]
        args: FlowsArgs,
    }

    fn flows_args(argv: &[&str]) -> FlowsArgs {
        FlowsCli::try_parse_from(std::iter::once("flows").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn flows_arguments_become_a_query() {
        assert_eq!(flows_args(&[]).path(), "/debug/flows?limit=20");
        assert_eq!(flows_args(&["--follow"]).path(), "/debug/flows?follow=1");
        assert_eq!(
            flows_args(&[
                "--from",
                "shop/a",
                "--to",
                "fd00::1",
                "--verdict",
                "dropped",
                "-n",
                "my shop",
                "--limit",
                "5",
                "-o",
                "json"
            ])
            .path(),
            "/debug/flows?from=shop%2Fa&to=fd00::1&namespace=my%20shop&verdict=dropped&limit=5"
        );
        assert!(FlowsCli::try_parse_from(["flows", "--verdict", "maybe"]).is_err());
    }

    #[test]
    fn flow_rows_show_names_verdicts_and_bytes() {
        use mycel_common::flow::{FLOW_EVENT_CLOSED, FLOW_EVENT_DROP};

        use crate::flows::record::tests::{directory, event};
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let mut ev = event(FLOW_EVENT_CLOSED, "10.0.0.1:40000", "192.0.2.1:443", 6);
        ev.value.bytes_rev = 900;
        let row = flow_row(&Flow::from_event(&ev, &directory(), at));
        assert_eq!(
            row,
            [
                "22:13:20.123",
                "shop/a (10.0.0.1:40000)",
                "world (192.0.2.1:443)",
                "TCP [SYN]",
                "FORWARDED closed",
                "60/900",
            ]
        );
        let ev = event(FLOW_EVENT_DROP, "10.0.0.2:1", "10.0.0.1:9090", 17);
        let row = flow_row(&Flow::from_event(&ev, &directory(), at));
        assert_eq!(row[3], "UDP");
        assert_eq!(row[4], "DROPPED (POLICY_DENIED)");
        let line = follow_line(&row.each_ref().map(String::as_str));
        assert!(
            line.starts_with("22:13:20.123  shop/b (10.0.0.2:1)"),
            "{line}"
        );
    }

    /// Takes `max` lines, then reports a closed pipe (as `| head -n max` would).
    struct Head {
        text: String,
        max: usize,
    }

    impl std::io::Write for Head {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.text.lines().count() >= self.max {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.text.push_str(std::str::from_utf8(b).unwrap());
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn mycel_flows_lists_and_follows_a_running_agent() {
        use mycel_common::flow::FLOW_EVENT_NEW;

        use crate::flows::record::tests::{admin_with_two_flows, event, source_ports};

        let (task, addr, mut flows, names, _shared, _dir) = admin_with_two_flows().await;
        let admin = addr.to_string();

        let args = flows_args(&["--admin-addr", &admin, "--verdict", "dropped"]);
        let mut out = Head {
            text: String::new(),
            max: 100,
        };
        flows_to(&args, &mut out).await.unwrap();
        let lines: Vec<&str> = out.text.lines().collect();
        assert_eq!(lines.len(), 2, "{}", out.text);
        assert!(lines[0].starts_with("TIME"), "{}", out.text);
        assert!(
            lines[1].contains("shop/b (10.0.0.2:40001)")
                && lines[1].contains("DROPPED (POLICY_DENIED)"),
            "{}",
            out.text
        );

        // Follow as JSON lines: one from the backlog, then live ones, until the reader
        // stops reading.
        let args = flows_args(&[
            "--admin-addr",
            &admin,
            "--follow",
            "--limit",
            "1",
            "-o",
            "json",
            "--from",
            "shop/a",
        ]);
        let mut out = Head {
            text: String::new(),
            max: 3,
        };
        let pusher = async {
            for port in 1..250u16 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                flows.handle(
                    &event(
                        FLOW_EVENT_NEW,
                        &format!("10.0.0.1:{port}"),
                        "10.0.0.2:80",
                        6,
                    ),
                    &names,
                );
            }
        };
        tokio::select! {
            r = flows_to(&args, &mut out) => r.unwrap(),
            () = pusher => panic!("follow printed only {:?}", out.text),
        }
        let ports = source_ports(out.text.lines());
        assert_eq!(ports.len(), 3);
        assert_eq!(ports[0], 40000, "the backlog first");
        assert!(ports[1] < ports[2], "{ports:?}");
        task.abort();
    }

    /// A status with two certificates and a trust bundle of one real CA.
    fn status_with_certificates(now: SystemTime) -> Status {
        use crate::{
            admin::TrustAnchor,
            identity::{CertInfo, SpiffeId, TrustBundle},
        };
        let ca = Ca::generate(
            "cluster.local",
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )
        .unwrap();
        let bundle = TrustBundle::from_pem(ca.cert_pem().as_bytes(), "test CA").unwrap();
        let cert = |sa: &str, not_after: SystemTime, serial: &str| CertInfo {
            id: SpiffeId::new("cluster.local", "shop", sa).unwrap(),
            not_before: now - Duration::from_secs(300),
            not_after,
            serial: serial.into(),
            issuer: String::new(),
        };
        Status {
            version: "0.1.0".into(),
            certificates: vec![
                cert(
                    "a",
                    now + Duration::from_secs(23 * 3600 + 59 * 60 + 30),
                    "0a1b2c",
                ),
                cert("b", now - Duration::from_secs(125), "ff00"),
            ],
            trust_bundle: TrustAnchor::from_bundle(&bundle),
            key_exchange: vec!["X25519MLKEM768".into(), "X25519".into()],
            ..Status::default()
        }
    }

    use std::time::UNIX_EPOCH;

    #[test]
    fn status_shows_identities_the_identity_server_did_not_sign() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut status = status_with_certificates(now);
        status.certificate_errors.insert(
            "spiffe://cluster.local/ns/shop/sa/db".into(),
            "the identity server refused (403): no pod".into(),
        );
        let text = status_text(&status, now);
        assert!(
            text.contains(
                "NO CERTIFICATE for spiffe://cluster.local/ns/shop/sa/db from the identity \
                 server (retrying): the identity server refused (403): no pod"
            ),
            "{text}"
        );
    }

    #[test]
    fn status_shows_certificates_and_the_trust_bundle() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let text = status_text(&status_with_certificates(now), now);
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| *l == "certificates:")
            .unwrap_or_else(|| panic!("no certificates section in\n{text}"));
        assert_eq!(
            lines[at + 1].split_whitespace().collect::<Vec<_>>(),
            ["IDENTITY", "EXPIRES", "IN", "NOT", "AFTER", "SERIAL"]
        );
        assert_eq!(
            lines[at + 2]
                .split("  ")
                .filter(|c| !c.is_empty())
                .map(str::trim)
                .collect::<Vec<_>>(),
            [
                "spiffe://cluster.local/ns/shop/sa/a",
                "23h 59m",
                "2027-01-16T07:59:30Z",
                "0a1b2c"
            ],
            "{text}"
        );
        assert!(
            lines[at + 3].contains("expired 2m 5s ago") && lines[at + 3].contains("ff00"),
            "{text}"
        );
        let ca = lines
            .iter()
            .position(|l| *l == "trust bundle:")
            .unwrap_or_else(|| panic!("no trust bundle in\n{text}"));
        // The CA generated at `now` lives ten years and three leap days (years of 365).
        assert!(
            lines[ca + 2].contains("10y 3d")
                && lines[ca + 2].contains("2037-01-15T08:00:00Z")
                && lines[ca + 2].contains("CN=mycel CA for cluster.local"),
            "{text}"
        );
        assert!(
            lines.contains(&"key exchange: X25519MLKEM768, X25519 (preferred first)"),
            "{text}"
        );
        let empty = status_text(&Status::default(), now);
        assert!(empty.contains("certificates: none"), "{empty}");
        assert!(!empty.contains("trust bundle"), "{empty}");
    }

    #[test]
    fn remaining_times_read_as_people_say_them() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |s: u64| now + Duration::from_secs(s);
        assert_eq!(expires_in(at(0), now), "0s");
        assert_eq!(expires_in(at(59), now), "59s");
        assert_eq!(expires_in(at(61), now), "1m 1s");
        assert_eq!(expires_in(at(3 * 3600 + 120), now), "3h 2m");
        assert_eq!(expires_in(at(86_400 * 2 + 3600), now), "2d 1h");
        assert_eq!(expires_in(at(86_400 * 400), now), "1y 35d");
        assert_eq!(
            expires_in(now - Duration::from_secs(90_000), now),
            "expired 1d 1h ago"
        );
        assert_eq!(rfc3339_seconds(at(0)), "1970-01-12T13:46:40Z");
    }

    #[tokio::test]
    async fn mycel_status_reads_certificates_from_a_running_agent() {
        use crate::flows::record::tests::admin_with_two_flows;

        let (task, addr, _flows, _names, shared, _dir) = admin_with_two_flows().await;
        let now = SystemTime::now();
        let want = status_with_certificates(now);
        {
            let mut status = shared.status.write().unwrap();
            status.certificates = want.certificates.clone();
            status.trust_bundle = want.trust_bundle.clone();
        }
        let args = |output| ClientArgs {
            admin_addr: addr,
            output,
        };
        let mut out = Vec::new();
        status_to(&args(Output::Table), &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("spiffe://cluster.local/ns/shop/sa/a")
                && text.contains("0a1b2c")
                && text.contains("CN=mycel CA for cluster.local"),
            "{text}"
        );
        let mut out = Vec::new();
        status_to(&args(Output::Json), &mut out).await.unwrap();
        let back: Status = serde_json::from_slice(&out).unwrap();
        assert_eq!(back.trust_bundle, want.trust_bundle);
        // Times travel as whole seconds.
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(back.certificates.len(), 2);
        for (got, sent) in back.certificates.iter().zip(&want.certificates) {
            assert_eq!(got.id, sent.id);
            assert_eq!(got.serial, sent.serial);
            assert_eq!(secs(got.not_after), secs(sent.not_after));
            assert_eq!(secs(got.not_before), secs(sent.not_before));
        }
        task.abort();
    }

    /// `mycel ca ARGS` (through a wrapper, so it parses on its own).
    #[derive(Debug, clap::Parser)]
    struct CaCli {
        #[command(subcommand)]
        command: CaCommand,
    }

    #[test]
    fn ca_create_writes_a_ca_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let dir_arg = dir.to_str().unwrap();
        let parse = |argv: &[&str]| {
            let cli =
                CaCli::try_parse_from(std::iter::once("ca").chain(argv.iter().copied())).unwrap();
            match cli.command {
                CaCommand::Create(args) => args,
            }
        };
        let args = parse(&["create", "--dir", dir_arg]);
        assert_eq!(args.trust_domain, config::DEFAULT_TRUST_DOMAIN);
        let args = parse(&["create", "--dir", dir_arg, "--trust-domain", "mesh.example"]);
        let mut out = Vec::new();
        ca_create(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(&format!(
                "kubectl -n mycel-system create secret generic mycel-ca --from-file={dir_arg}/"
            )) && text.contains("mesh.example"),
            "{text}"
        );
        let cert = std::fs::read(dir.join(identity::CA_CERT_FILE)).unwrap();
        let key = std::fs::read(dir.join(identity::CA_KEY_FILE)).unwrap();
        let ca = Ca::from_pem(&cert, &key, "the new CA").unwrap();
        assert!(text.contains(&rfc3339_seconds(ca.not_after())), "{text}");

        let e = ca_create(&args, &mut Vec::new()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("refusing to overwrite"), "{msg}");
        assert_eq!(msg.matches("already there").count(), 1, "said once: {msg}");
        assert_eq!(
            std::fs::read(dir.join(identity::CA_CERT_FILE)).unwrap(),
            cert,
            "the first CA stays"
        );
        assert!(
            CaCli::try_parse_from(["ca", "create"]).is_err(),
            "--dir is required"
        );
        let cli = Cli::try_parse_from(["mycel", "ca", "create", "--dir", "ca"]).unwrap();
        assert!(
            matches!(&cli.command, Command::Ca(CaArgs { command: CaCommand::Create(a) }) if a.dir == std::path::Path::new("ca")),
            "{cli:?}"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[["xxx".into(), "y".into()], ["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }
}
