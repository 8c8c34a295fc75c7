//! The `mycel agent` under test: started in a node's network namespace with that node's
//! cgroup, bpffs directory and resource directory, and driven through its admin endpoint.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Deserialize;

use crate::env::{self, tail};
use crate::netns;
use crate::node::Node;
use crate::process::Proc;

/// Where the agent serves its admin endpoint inside the node's namespace.
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// How long the agent may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Set to `1` to print the agent's log tail after every test, not only failing ones.
pub const SHOW_LOG_ENV: &str = "MYCEL_TEST_SHOW_LOG";
/// Lines of the agent's log shown when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// How to start an agent.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    extra_args: Vec<String>,
    /// `--source kubernetes` with this kubeconfig and node name, instead of the node's
    /// resource directory.
    kubernetes: Option<(PathBuf, String)>,
    /// Do not wait for readiness after starting.
    no_wait: bool,
    /// `--ca-dir`; default: `ca` in the node's directory.
    ca_dir: Option<PathBuf>,
    /// The CA directory holds only the trust bundle (the identity server signs): the
    /// harness creates no CA there.
    bundle_only: bool,
}

impl AgentOptions {
    /// Adds a command-line argument after the ones the harness passes.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_owned());
        self
    }

    /// Reads the Kubernetes API described by `kubeconfig` as node `node_name`, instead of
    /// the node's resource directory.
    pub fn kubernetes(mut self, kubeconfig: &std::path::Path, node_name: &str) -> Self {
        self.kubernetes = Some((kubeconfig.to_path_buf(), node_name.to_owned()));
        self
    }

    /// Uses the CA in `dir` (agents of several nodes must share one). With the Kubernetes
    /// source the CA must exist: the harness creates it, as an operator would the Secret.
    pub fn ca_dir(mut self, dir: &std::path::Path) -> Self {
        self.ca_dir = Some(dir.to_path_buf());
        self
    }

    /// Gets certificates from the identity server at `server` (`HOST:PORT`, as seen from
    /// the node's namespace) with the token in `token`, expecting the server to present
    /// `server_id`; `bundle_dir` holds only `ca.pem`, and no CA is created there.
    pub fn identity_server(
        mut self,
        server: &str,
        token: &std::path::Path,
        server_id: &str,
        bundle_dir: &std::path::Path,
    ) -> Self {
        self.ca_dir = Some(bundle_dir.to_path_buf());
        self.bundle_only = true;
        self.extra_args.extend([
            "--identity-server".to_owned(),
            server.to_owned(),
            "--identity-token".to_owned(),
            token.display().to_string(),
            "--identity-server-id".to_owned(),
            server_id.to_owned(),
        ]);
        self
    }

    /// Starts without waiting for readiness (the test checks it).
    pub fn no_wait(mut self) -> Self {
        self.no_wait = true;
        self
    }

    /// Starts the agent on `node` and waits until `/readyz` answers 200.
    pub fn start(self, node: &Node) -> Agent<'_> {
        let mut agent = Agent {
            node,
            opts: self,
            bin: env::mycel_bin(),
            log: node.dir().join("agent.log"),
            proc: None,
            starts: 0,
        };
        agent.start();
        agent
    }
}

/// A running (or stopped) agent. Dropping it kills it; if the test is failing, the tail of
/// the agent's log is printed first.
#[derive(Debug)]
pub struct Agent<'n> {
    node: &'n Node,
    opts: AgentOptions,
    bin: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    starts: u32,
}

impl Agent<'_> {
    /// Starts the agent (again) and waits until it is ready. Panics if it is running.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "the agent is already running");
        self.starts += 1;
        self.append_log(&format!(
            "---- harness: agent start #{} ----\n",
            self.starts
        ));
        let source = match &self.opts.kubernetes {
            Some((kubeconfig, node_name)) => vec![
                "--source".into(),
                "kubernetes".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--node-name".into(),
                node_name.clone(),
            ],
            None => vec![
                "--source".into(),
                format!("file:{}", self.node.resources().path().display()),
            ],
        };
        let mut args: Vec<String> = vec!["agent".into()];
        args.extend(source);
        args.extend([
            "--cgroup".into(),
            self.node.cgroup.display().to_string(),
            "--bpffs".into(),
            self.node.bpffs.display().to_string(),
            "--admin-addr".into(),
            ADMIN_ADDR.into(),
        ]);
        let ca_dir = self
            .opts
            .ca_dir
            .clone()
            .unwrap_or_else(|| self.node.dir().join("ca"));
        if self.opts.kubernetes.is_some() && !self.opts.bundle_only {
            mycel_agent::identity::Ca::load_or_create(&ca_dir, "cluster.local")
                .unwrap_or_else(|e| panic!("creating the test CA in {}: {e}", ca_dir.display()));
        }
        args.extend(["--ca-dir".into(), ca_dir.display().to_string()]);
        // Kept across restarts of this agent, like the node's own disk.
        args.extend([
            "--state-dir".into(),
            self.node.dir().join("state").display().to_string(),
        ]);
        args.extend(self.opts.extra_args.iter().cloned());
        self.proc = Some(Proc::spawn_logged(
            Some(&self.node.netns),
            &self.bin,
            &args,
            &self.log,
        ));
        if !self.opts.no_wait {
            self.wait_ready(READY_TIMEOUT);
        }
    }

    /// Waits until `/readyz` answers 200; panics with the log tail if the agent exits or
    /// does not get ready in time.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self.proc.as_mut().and_then(Proc::try_status) {
                panic!(
                    "the agent exited ({status}) before it was ready; last /readyz: {last}\n\
                     agent log tail:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            match self.try_get("/readyz") {
                Ok((200, _)) => return,
                Ok((status, body)) => last = format!("{status} {}", body.trim()),
                Err(e) => last = e.to_string(),
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not get ready within {timeout:?}; last /readyz: {last}\n\
                 agent log tail:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's PID, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Sends SIGTERM and waits for the agent to exit; returns its exit status. Panics if it
    /// does not exit within [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> ExitStatus {
        let mut proc = self.proc.take().expect("the agent is not running");
        proc.signal(Signal::SIGTERM);
        let status = proc.wait_timeout(STOP_TIMEOUT);
        let Some(status) = status else {
            proc.kill();
            panic!(
                "the agent did not exit within {STOP_TIMEOUT:?} after SIGTERM\n\
                 agent log tail:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            );
        };
        status
    }

    /// SIGKILLs the agent and reaps it.
    pub fn kill(&mut self) {
        let mut proc = self.proc.take().expect("the agent is not running");
        proc.kill();
    }

    /// [`Agent::stop`] (SIGTERM) and [`Agent::start`] again.
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "the agent exited with {status} on SIGTERM, expected 0\nagent log tail:\n{}",
            self.log_tail(LOG_TAIL_LINES)
        );
        self.start();
    }

    /// Everything the agent (all its starts) logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }

    fn append_log(&self, text: &str) {
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            let _ = f.write_all(text.as_bytes());
        }
    }

    /// `GET path` on the admin endpoint: (status, body).
    pub fn try_get(&self, path: &str) -> io::Result<(u16, String)> {
        let addr: SocketAddr = ADMIN_ADDR
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
        let path = path.to_owned();
        netns::run_in(&self.node.netns, move || http_get(addr, &path))
    }

    /// `/debug/status` as JSON (`null` when it cannot be read).
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/debug/status").1).unwrap_or_default()
    }

    /// `GET path` on the admin endpoint; panics (with the log tail) if it cannot be reached.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path).unwrap_or_else(|e| {
            panic!(
                "GET {path} on the agent's admin endpoint failed: {e}\nagent log tail:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            )
        })
    }

    /// `GET /metrics`; panics unless it answers 200.
    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "GET /metrics answered {status}: {body}");
        body
    }

    /// The value of the first series of metric `name` whose labels include `labels`.
    pub fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse_metric(&self.metrics(), name)
            .into_iter()
            .find(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
    }

    /// The sum over the series of metric `name` whose labels include `labels` (0 if there
    /// are none): one per peer workload, for example.
    pub fn metric_sum_where(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        parse_metric(&self.metrics(), name)
            .into_iter()
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The sum over all series of metric `name` (0 if there are none).
    pub fn metric_sum(&self, name: &str) -> f64 {
        parse_metric(&self.metrics(), name)
            .into_iter()
            .map(|(_, v)| v)
            .sum()
    }

    /// `GET /debug/services`, parsed.
    pub fn services(&self) -> Vec<ServiceInfo> {
        let (status, body) = self.get("/debug/services");
        assert_eq!(status, 200, "GET /debug/services answered {status}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("cannot parse /debug/services ({e}): {body}"))
    }

    /// Polls `cond` every 20 ms until it holds; panics with `what` and the log tail after
    /// `timeout`. Returns how long it took.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            if cond(self) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\nagent log tail:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/debug/services` shows `service` (`namespace/name`) on `port` with
    /// exactly these backends (`ip:port`, any order).
    pub fn wait_for_backends(&self, service: &str, port: u16, backends: &[String]) -> Duration {
        let mut want: Vec<String> = backends.to_vec();
        want.sort();
        self.wait_for(
            &format!("{service} port {port} to have backends {want:?}"),
            Duration::from_secs(5),
            |a| {
                a.services().iter().any(|s| {
                    format!("{}/{}", s.namespace, s.name) == service
                        && s.port == port
                        && s.sorted_backends() == want
                })
            },
        )
    }

    /// Runs `mycel <args…> --admin-addr <admin>` in the node's namespace, bounded to 10 s:
    /// (status, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--admin-addr", ADMIN_ADDR]);
        let mut proc = self.node.spawn(&self.bin, &all);
        proc.close_stdin();
        proc.wait_output(Duration::from_secs(10))
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var(SHOW_LOG_ENV).as_deref() == Ok("1") {
            eprintln!(
                "---- agent log tail ({}) ----\n{}\n---- end of agent log ----",
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }
}

/// One entry of `/debug/services`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServiceInfo {
    /// The service's namespace; empty for a frontend whose owner the agent has not
    /// published yet (the table of owners follows the maps by a moment).
    #[serde(deserialize_with = "null_as_empty")]
    pub namespace: String,
    /// The service's name; empty as `namespace` is.
    #[serde(deserialize_with = "null_as_empty")]
    pub name: String,
    /// The port's name.
    pub port_name: Option<String>,
    /// The service address (cluster IP).
    pub address: String,
    /// The service port.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The session affinity, as the agent reports it.
    pub affinity: serde_json::Value,
    /// Backends as `ip:port` (IPv6 as `[ip]:port`).
    #[serde(deserialize_with = "backend_addresses")]
    pub backends: Vec<String>,
}

/// A backend as `/debug/services` lists it: `"ip:port"`, or an object with an `address`
/// (and further fields, such as its slot).
#[derive(Deserialize)]
#[serde(untagged)]
enum BackendEntry {
    Address(String),
    Object { address: String },
}

fn backend_addresses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let entries = Vec::<BackendEntry>::deserialize(d)?;
    Ok(entries
        .into_iter()
        .map(|e| match e {
            BackendEntry::Address(a) | BackendEntry::Object { address: a } => a,
        })
        .collect())
}

impl ServiceInfo {
    /// The backends, sorted.
    pub fn sorted_backends(&self) -> Vec<String> {
        let mut b = self.backends.clone();
        b.sort();
        b
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`; handles `Content-Length`, chunked and
/// read-to-end bodies.
fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers in the response"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    } else if let Some(len) = length {
        body.truncate(len);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Every series of metric `name` in Prometheus text: (labels, value).
pub fn parse_metric(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, rest) = if let Some(inner) = rest.strip_prefix('{') {
                let (labels, after) = parse_labels(inner)?;
                (labels, after)
            } else if rest.starts_with([' ', '\t']) {
                (BTreeMap::new(), rest)
            } else {
                return None;
            };
            let value = rest.split_whitespace().next()?;
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().ok()?,
            };
            Some((labels, value))
        })
        .collect()
}

/// Parses `k="v",k2="v2"}` (after the `{`); returns the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, rest) = s.split_once('=')?;
        let mut chars = rest.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        s = &rest[1 + end + 1..];
    }
}

/// A string that may be `null`, as the empty string.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metrics() {
        let text = "# HELP x y\n# TYPE mycel_services_programmed gauge\n\
                    mycel_services_programmed 3\n\
                    mycel_services_programmed_extra 9\n\
                    mycel_source_errors_total{kind=\"parse\",file=\"a \\\"b\\\"\"} 2\n\
                    mycel_source_errors_total{kind=\"kind\"} 1.5\n\
                    mycel_update_latency_seconds_bucket{le=\"+Inf\"} 4\n";
        assert_eq!(
            parse_metric(text, "mycel_services_programmed"),
            vec![(BTreeMap::new(), 3.0)]
        );
        let errors = parse_metric(text, "mycel_source_errors_total");
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].0["file"], "a \"b\"");
        assert_eq!(errors[1].1, 1.5);
        let buckets = parse_metric(text, "mycel_update_latency_seconds_bucket");
        assert_eq!(buckets[0].0["le"], "+Inf");
    }

    #[test]
    fn parses_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(
            parse_response(plain).expect("plain response"),
            (200, "ok".to_owned())
        );
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).expect("chunked response"),
            (503, "not ready".to_owned())
        );
    }

    #[test]
    fn parses_service_entries() {
        let list: Vec<ServiceInfo> = serde_json::from_str(
            r#"[{"namespace":"default","name":"a","address":"10.96.0.10","port":80,
                 "backends":["10.0.0.2:8080"]},
                {"namespace":"default","name":"b","address":"fd00:96::10","port":80,
                 "backends":[{"slot":0,"address":"[fd00::2]:8080"}]}]"#,
        )
        .expect("service list");
        assert_eq!(list[0].backends, ["10.0.0.2:8080"]);
        assert_eq!(list[1].backends, ["[fd00::2]:8080"]);
    }
}
