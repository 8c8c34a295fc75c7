//! The checks, in order: kernel facts, per-program verifier verdicts, then the agent's
//! datapath end to end on loopback — load and attach, TCP, UDP and IPv6 through a service
//! address, a service without backends, and detaching.
//!
//! Each check is bounded in time: clients get a deadline and are killed past it, sockets
//! have timeouts. The virtual machine has no network card, so nothing here can leave it.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mycel_agent::{
    datapath::Datapath,
    state::{Affinity, Frontend, FrontendChanges, FrontendSpec, ObjectRef, Protocol},
};

use crate::{
    client::PING,
    probe,
    report::{self, Status},
};

/// The cgroup the client processes join; the datapath attaches its programs here.
const CGROUP: &str = "/sys/fs/cgroup/mycel-guest";
/// The datapath's pin directory.
const PIN_DIR: &str = "/sys/fs/bpf/mycel-guest";
/// The service addresses. They exist only in the service map: the guest has no route to
/// them, so a connect that is not translated fails with ENETUNREACH.
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP4_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const SERVICE_PORT: u16 = 80;
const DNS_PORT: u16 = 53;
/// How long a client process may take before it is killed and the check fails.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);
/// A connect to a service without backends must fail faster than this.
const FAST_REFUSAL: Duration = Duration::from_secs(1);
/// The tag servers put before the line they echo, so a reply proves which server answered.
const SERVER_TAG: &str = "mycel-backend";

const LOAD_ATTACH: &str = "load-attach";
const FUNCTIONAL: [&str; 5] = ["tcp-vip", "udp-vip", "tcp-vip6", "no-backend", "detach"];

/// Runs every check and ends with `MYCEL-DONE`.
pub fn run_all(object: Option<&Path>) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    report::info("kernel", release.trim());
    probe::features();
    probe::programs(object);
    clsact();
    datapath_checks();
    report::done();
}

/// Adds a clsact qdisc through netlink, as aya does for TC programs, on the veth pair the
/// init script made (`mycel0`).
fn clsact() {
    const CHECK: &str = "clsact";
    if !Path::new("/sys/class/net/mycel0").exists() {
        report::result(CHECK, Status::Skip, "no veth mycel0 (see the veth check)");
        return;
    }
    match aya::programs::tc::qdisc_add_clsact("mycel0") {
        Ok(()) => report::result(
            CHECK,
            Status::Pass,
            "clsact qdisc added to mycel0 over netlink",
        ),
        Err(e) => report::result(CHECK, Status::Fail, &report::chain(&e)),
    }
}

fn datapath_checks() {
    let cgroup = Path::new(CGROUP);
    if let Err(e) = fs::create_dir_all(cgroup) {
        report::result(
            LOAD_ATTACH,
            Status::Fail,
            &format!("creating cgroup {CGROUP}: {e}"),
        );
        skip_functional("no cgroup");
        return;
    }
    let started = Instant::now();
    let datapath = match Datapath::load(cgroup, Path::new(PIN_DIR)) {
        Ok(d) => d,
        Err(e) => {
            let d = probe::describe(&e);
            report::result(LOAD_ATTACH, Status::Fail, &d.summary);
            if let Some(log) = &d.log {
                report::log(LOAD_ATTACH, log);
            }
            skip_functional("load-attach failed");
            return;
        }
    };
    let programs = datapath.programs();
    let attached: Vec<String> = programs
        .iter()
        .map(|p| {
            if p.program == p.name {
                p.name.clone()
            } else {
                format!("{}={}", p.name, p.program)
            }
        })
        .collect();
    let lacking: Vec<String> = datapath
        .kernel_features()
        .iter()
        .filter(|f| !f.available)
        .map(|f| format!("no {} ({})", f.feature, f.impact))
        .collect();
    let mut reason = format!(
        "{} programs attached in {} ms: {}",
        programs.len(),
        started.elapsed().as_millis(),
        attached.join(", ")
    );
    if !lacking.is_empty() {
        reason.push_str(&format!("; degraded: {}", lacking.join("; ")));
    }
    report::result(LOAD_ATTACH, Status::Pass, &reason);
    // What the datapath found about bpf_set_retval decides which errno no-backend expects.
    let agent_set_retval = datapath
        .kernel_features()
        .iter()
        .find(|f| f.feature.contains("bpf_set_retval"))
        .map(|f| f.available);
    let mut datapath = datapath;
    tc_attach(&mut datapath);

    let servers = match Servers::start() {
        Ok(s) => s,
        Err(e) => {
            skip_functional(&format!("could not start loopback servers: {e}"));
            let _ = datapath.detach_and_unpin();
            return;
        }
    };
    let changes = servers.frontends();
    let (_, errors) = datapath.services.apply(&changes);
    if !errors.is_empty() {
        let text: Vec<String> = errors.iter().map(|e| report::chain(e)).collect();
        for check in FUNCTIONAL {
            report::result(
                check,
                Status::Fail,
                &format!("programming the maps: {}", text.join("; ")),
            );
        }
        let _ = datapath.detach_and_unpin();
        return;
    }

    tcp_vip(
        &servers,
        "tcp-vip",
        SocketAddr::from((VIP4, SERVICE_PORT)),
        servers.tcp4,
    );
    udp_vip(&servers);
    tcp_vip(
        &servers,
        "tcp-vip6",
        SocketAddr::from((VIP6, SERVICE_PORT)),
        servers.tcp6,
    );
    no_backend(agent_set_retval);
    detach(datapath, &servers);
}

/// Attaches the policy and flow programs to the guest's veth the way the agent does for a
/// workload — tcx where the kernel has it, netlink clsact otherwise — and detaches them.
fn tc_attach(datapath: &mut Datapath) {
    const CHECK: &str = "tc-attach";
    if !Path::new("/sys/class/net/mycel0").exists() {
        report::result(CHECK, Status::Skip, "no veth mycel0 (see the veth check)");
        return;
    }
    match datapath.attach_tc("mycel0") {
        Ok(a) => {
            let mode = match a.mode {
                mycel_agent::datapath::TcMode::Tcx => "tcx",
                mycel_agent::datapath::TcMode::Clsact => "netlink clsact",
            };
            match datapath.detach_tc(a.ifindex) {
                Ok(()) => report::result(
                    CHECK,
                    Status::Pass,
                    &format!(
                        "tc_from_pod and tc_to_pod attached to mycel0 with {mode}, then detached"
                    ),
                ),
                Err(e) => report::result(
                    CHECK,
                    Status::Fail,
                    &format!(
                        "attached with {mode}, detaching failed: {}",
                        report::chain(&e)
                    ),
                ),
            }
        }
        Err(e) => report::result(CHECK, Status::Fail, &report::chain(&e)),
    }
}

fn skip_functional(why: &str) {
    for check in FUNCTIONAL {
        report::result(check, Status::Skip, why);
    }
}

/// Loopback servers standing in for a service's backends, each in its own thread.
struct Servers {
    tcp4: SocketAddr,
    tcp6: SocketAddr,
    udp4: SocketAddr,
    /// Connections and datagrams the servers answered.
    answered: Arc<AtomicUsize>,
}

impl Servers {
    fn start() -> std::io::Result<Self> {
        let answered = Arc::new(AtomicUsize::new(0));
        let tcp4 = spawn_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), answered.clone())?;
        let tcp6 = spawn_tcp(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)), answered.clone())?;
        let udp4 = spawn_udp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), answered.clone())?;
        Ok(Self {
            tcp4,
            tcp6,
            udp4,
            answered,
        })
    }

    /// The frontends the checks use: three with one loopback backend each, one with none.
    fn frontends(&self) -> FrontendChanges {
        let spec = |name: &str, backends: Vec<SocketAddr>| FrontendSpec {
            service: ObjectRef {
                namespace: "kernel-test".into(),
                name: name.into(),
            },
            port_name: None,
            backends,
            affinity: Affinity::None,
        };
        let frontend = |ip: IpAddr, port: u16, protocol: Protocol| Frontend { ip, port, protocol };
        [
            (
                frontend(VIP4.into(), SERVICE_PORT, Protocol::Tcp),
                spec("web", vec![self.tcp4]),
            ),
            (
                frontend(VIP4.into(), DNS_PORT, Protocol::Udp),
                spec("dns", vec![self.udp4]),
            ),
            (
                frontend(VIP6.into(), SERVICE_PORT, Protocol::Tcp),
                spec("web6", vec![self.tcp6]),
            ),
            (
                frontend(VIP4_EMPTY.into(), SERVICE_PORT, Protocol::Tcp),
                spec("empty", Vec::new()),
            ),
        ]
        .into_iter()
        .map(|(f, s)| (f, Some(s)))
        .collect()
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

fn spawn_tcp(addr: SocketAddr, answered: Arc<AtomicUsize>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_ok() {
                answered.fetch_add(1, Ordering::SeqCst);
                let _ = (&stream)
                    .write_all(format!("{SERVER_TAG} {local} {}\n", line.trim()).as_bytes());
            }
        }
    });
    Ok(local)
}

fn spawn_udp(addr: SocketAddr, answered: Arc<AtomicUsize>) -> std::io::Result<SocketAddr> {
    let socket = UdpSocket::bind(addr)?;
    let local = socket.local_addr()?;
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            answered.fetch_add(1, Ordering::SeqCst);
            let text = String::from_utf8_lossy(&buf[..n]);
            let _ = socket.send_to(
                format!("{SERVER_TAG} {local} {}", text.trim()).as_bytes(),
                from,
            );
        }
    });
    Ok(local)
}

/// What a client process reported.
#[derive(Debug)]
enum Outcome {
    Ok { peer: String, reply: String },
    Error { errno: i32, text: String },
}

/// Runs `mycel-guest client` against `target`; returns its outcome and how long its socket
/// calls took.
fn run_client(proto: &str, target: SocketAddr) -> Result<(Outcome, Duration), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding own executable: {e}"))?;
    let started = Instant::now();
    let mut child = Command::new(exe)
        .args(["client", CGROUP, proto, &target.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the client: {e}"))?;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > CLIENT_DEADLINE => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("client did not finish within {CLIENT_DEADLINE:?}"));
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for the client: {e}")),
        }
    }
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let line = out.lines().next().unwrap_or_default();
    parse_outcome(line).ok_or_else(|| format!("client printed {line:?} (stderr: {})", err.trim()))
}

/// Parses the client's line (see `client`): the outcome and the time its socket calls took.
fn parse_outcome(line: &str) -> Option<(Outcome, Duration)> {
    let (kind, rest) = line.split_once(" us=")?;
    let (us, rest) = rest.split_once(' ')?;
    let took = Duration::from_micros(us.parse().ok()?);
    let outcome = match kind {
        "ok" => {
            let (peer, reply) = rest.strip_prefix("peer=")?.split_once(" reply=")?;
            Outcome::Ok {
                peer: peer.to_string(),
                reply: reply.to_string(),
            }
        }
        "error" => {
            let (errno, text) = rest.strip_prefix("errno=")?.split_once(' ')?;
            Outcome::Error {
                errno: errno.parse().ok()?,
                text: text.to_string(),
            }
        }
        _ => return None,
    };
    Some((outcome, took))
}

/// Milliseconds with one decimal: refusals take well under one.
fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// A TCP client connects to `vip`; the connection must reach `backend`, and getpeername()
/// must answer `vip`.
fn tcp_vip(servers: &Servers, check: &str, vip: SocketAddr, backend: SocketAddr) {
    let expected_reply = format!("{SERVER_TAG} {backend} {PING}");
    match run_client("tcp", vip) {
        Ok((Outcome::Ok { peer, reply }, took)) => {
            if reply != expected_reply {
                report::result(
                    check,
                    Status::Fail,
                    &format!("reply {reply:?}, expected {expected_reply:?}"),
                );
            } else if peer != vip.to_string() {
                report::result(
                    check,
                    Status::Fail,
                    &format!(
                        "reached {backend} but getpeername() returned {peer}, not the service address {vip}"
                    ),
                );
            } else {
                report::result(
                    check,
                    Status::Pass,
                    &format!(
                        "{vip} reached {backend}, getpeername() = {peer}, {} ms",
                        millis(took)
                    ),
                );
            }
        }
        Ok((Outcome::Error { errno, text }, _)) => report::result(
            check,
            Status::Fail,
            &format!(
                "{vip}: errno {errno} {text} (servers answered {} so far)",
                servers.answered()
            ),
        ),
        Err(e) => report::result(check, Status::Fail, &e),
    }
}

/// A UDP client sends to the service address; the answer must come back from it.
fn udp_vip(servers: &Servers) {
    const CHECK: &str = "udp-vip";
    let vip = SocketAddr::from((VIP4, DNS_PORT));
    let expected_reply = format!("{SERVER_TAG} {} {PING}", servers.udp4);
    match run_client("udp", vip) {
        Ok((Outcome::Ok { peer, reply }, took)) => {
            if reply != expected_reply {
                report::result(
                    CHECK,
                    Status::Fail,
                    &format!("reply {reply:?}, expected {expected_reply:?}"),
                );
            } else if peer != vip.to_string() {
                report::result(
                    CHECK,
                    Status::Fail,
                    &format!(
                        "reached {} but recvfrom() named {peer} as the sender, not {vip}",
                        servers.udp4
                    ),
                );
            } else {
                report::result(
                    CHECK,
                    Status::Pass,
                    &format!(
                        "{vip} reached {}, reply from {peer}, {} ms",
                        servers.udp4,
                        millis(took)
                    ),
                );
            }
        }
        Ok((Outcome::Error { errno, text }, _)) => {
            report::result(CHECK, Status::Fail, &format!("{vip}: errno {errno} {text}"));
        }
        Err(e) => report::result(CHECK, Status::Fail, &e),
    }
}

/// A connect to a service without backends fails at once: ECONNREFUSED where the kernel
/// has `bpf_set_retval`, EPERM where the datapath found it missing (`agent_set_retval`:
/// what the datapath reported, cross-checked with aya's own probe).
fn no_backend(agent_set_retval: Option<bool>) {
    const CHECK: &str = "no-backend";
    const ECONNREFUSED: i32 = 111;
    const EPERM: i32 = 1;
    let vip = SocketAddr::from((VIP4_EMPTY, SERVICE_PORT));
    let probed = probe::has_set_retval();
    let set_retval = agent_set_retval.unwrap_or(probed);
    let disagree = if agent_set_retval.is_some_and(|a| a != probed) {
        format!(
            "; note: the datapath says bpf_set_retval is {}, aya's probe says {}",
            if set_retval { "available" } else { "missing" },
            if probed { "available" } else { "missing" }
        )
    } else {
        String::new()
    };
    match run_client("tcp", vip) {
        Ok((Outcome::Error { errno, text }, took)) => {
            let fast = took < FAST_REFUSAL;
            let ms = millis(took);
            let (status, why) = match (errno, set_retval) {
                (ECONNREFUSED, _) if fast => (Status::Pass, format!("ECONNREFUSED in {ms} ms")),
                (EPERM, false) if fast => (
                    Status::Pass,
                    format!(
                        "EPERM in {ms} ms (no bpf_set_retval on this kernel, so not ECONNREFUSED)"
                    ),
                ),
                (EPERM, true) => (
                    Status::Fail,
                    format!(
                        "EPERM in {ms} ms although bpf_set_retval is available (expected ECONNREFUSED)"
                    ),
                ),
                _ if !fast => (
                    Status::Fail,
                    format!("refused only after {ms} ms: errno {errno} {text}"),
                ),
                _ => (Status::Fail, format!("errno {errno} {text} in {ms} ms")),
            };
            report::result(CHECK, status, &format!("{why}{disagree}"));
        }
        Ok((Outcome::Ok { peer, reply }, _)) => report::result(
            CHECK,
            Status::Fail,
            &format!(
                "connected to {peer} and got {reply:?}: a service without backends must refuse"
            ),
        ),
        Err(e) => report::result(CHECK, Status::Fail, &e),
    }
}

/// After `detach_and_unpin`, nothing translates: a connect to the service address goes to
/// the address itself (which has no route here), and the pins are gone.
fn detach(datapath: Datapath, servers: &Servers) {
    const CHECK: &str = "detach";
    const ENETUNREACH: i32 = 101;
    let pin_dir = PathBuf::from(PIN_DIR);
    if let Err(e) = datapath.detach_and_unpin() {
        report::result(
            CHECK,
            Status::Fail,
            &format!("detach_and_unpin: {}", report::chain(&e)),
        );
        return;
    }
    if pin_dir.exists() {
        report::result(
            CHECK,
            Status::Fail,
            &format!("{} still exists after unpinning", pin_dir.display()),
        );
        return;
    }
    let vip = SocketAddr::from((VIP4, SERVICE_PORT));
    let before = servers.answered();
    // Releasing a pinned link is not always done by the time unlink() returns: on 5.10
    // the last reference can go with the bpffs inode, after an RCU grace period. Give the
    // kernel a moment (bounded) before calling a still-translated VIP a failure.
    let mut before = before;
    let mut outcome = run_client("tcp", vip);
    for _ in 0..DETACH_RETRIES {
        if !matches!(outcome, Ok((Outcome::Ok { .. }, _))) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        // What the next attempt must not reach.
        before = servers.answered();
        outcome = run_client("tcp", vip);
    }
    match outcome {
        Ok((
            Outcome::Error {
                errno: ENETUNREACH, ..
            },
            _,
        )) => report::result(
            CHECK,
            Status::Pass,
            &format!("pins removed; {vip} no longer translated (ENETUNREACH, as without mycel)"),
        ),
        Ok((Outcome::Error { errno, text }, _)) if servers.answered() == before => report::result(
            CHECK,
            Status::Pass,
            &format!("pins removed; {vip} no longer translated (errno {errno} {text})"),
        ),
        Ok((outcome, _)) => report::result(
            CHECK,
            Status::Fail,
            &format!("{vip} still reaches a backend after detaching: {outcome:?}"),
        ),
        Err(e) => report::result(CHECK, Status::Fail, &e),
    }
}

/// Attempts of the detach check while the VIP is still translated (50 ms apart).
const DETACH_RETRIES: u32 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_lines() {
        let (o, took) = parse_outcome(
            "ok us=1500 peer=10.96.0.10:80 reply=mycel-backend 127.0.0.1:1 mycel-ping",
        )
        .expect("ok line");
        assert_eq!(took, Duration::from_micros(1500));
        assert!(
            matches!(o, Outcome::Ok { ref peer, ref reply } if peer == "10.96.0.10:80" && reply.ends_with("mycel-ping"))
        );
        let (o, _) =
            parse_outcome("error us=20 errno=111 op=connect Connection refused (os error 111)")
                .expect("error line");
        assert!(
            matches!(o, Outcome::Error { errno: 111, ref text } if text.starts_with("op=connect"))
        );
        assert!(parse_outcome("garbage").is_none());
    }
}
