//! The command line: `mycel agent` and the user-facing subcommands that talk to a running
//! agent's admin endpoint.

use std::{io::Write as _, net::SocketAddr};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::{admin::Status, config, datapath::MapService};

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
pub enum Command {
    /// Run the node agent.
    Agent(config::Args),
    /// Show what the agent is doing: programs, services and backends programmed, errors.
    Status(ClientArgs),
    /// List the services in the kernel maps with their backends.
    Services(ClientArgs),
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

/// GETs `path` from the agent's admin endpoint.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
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
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path} from {addr}"))?;
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
    #[test]
    fn table_aligns_columns() {
        let t = super::table(
            &["A", "BB"],
            &[["xxx".into(), "y".into()], ["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }
}
