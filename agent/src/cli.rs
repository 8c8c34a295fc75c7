//! The command line: `mycel agent` and the user-facing subcommands that talk to a running
//! agent's admin endpoint.

use std::{io::Write as _, net::SocketAddr};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::{
    admin::Status,
    config,
    datapath::MapService,
    flows::{Flow, record::Kind},
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
    let body = get(args.admin_addr, "/debug/status").await?;
    if args.output == Output::Json {
        println!("{body}");
        return Ok(());
    }
    let s: Status = serde_json::from_str(&body).context("the agent's status is not valid JSON")?;
    let mut out = String::new();
    use std::fmt::Write as _;
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
    std::io::stdout().write_all(out.as_bytes())?;
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

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[["xxx".into(), "y".into()], ["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }
}
