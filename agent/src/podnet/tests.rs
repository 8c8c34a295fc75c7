//! Privileged tests: two network namespaces joined by a veth pair, "client" (10.77.0.1,
//! fd77::1) and "pod" (10.77.0.2, fd77::2), the proxy's sockets made in them through
//! [`PodNet`]. They need root and iproute2; without them they say so and pass, unless
//! `MYCEL_REQUIRE_PRIVILEGED=1` (as CI sets), which makes them fail instead.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;

use super::*;

/// Set to `1` to turn a skipped privileged test into a failure.
const REQUIRE_PRIVILEGED_ENV: &str = "MYCEL_REQUIRE_PRIVILEGED";
/// Prefix of the namespaces these tests create: `mycel-podnet-<pid>-<n>-<role>`.
const NETNS_PREFIX: &str = "mycel-podnet-";
/// Where `ip netns` keeps its namespace handles.
const NETNS_RUN_DIR: &str = "/run/netns";

const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));
const POD_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2));
const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1));
const POD_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2));
/// The application's port in the pod.
const APP_PORT: u16 = 8080;
/// Connections that should work get this long (on a veth or `lo`, they take microseconds).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections that should not work are given up after this long: the first SYN
/// retransmission comes after 1 s, so a connection that could work would have.
const FAIL_TIMEOUT: Duration = Duration::from_secs(2);
/// Enough data to take many segments each way.
const PAYLOAD_LEN: usize = 256 * 1024;

/// Whether privileged tests can run; prints why not, or panics with
/// `MYCEL_REQUIRE_PRIVILEGED=1`.
fn privileged_or_skip(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("needs root (network namespaces, IP_TRANSPARENT)".to_owned())
    } else {
        match Command::new("ip").arg("-V").output() {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!("`ip -V` failed: {}", out.status)),
            Err(e) => Some(format!("needs iproute2's `ip` on PATH: {e}")),
        }
    };
    let Some(reason) = reason else {
        return true;
    };
    if std::env::var(REQUIRE_PRIVILEGED_ENV).as_deref() == Ok("1") {
        panic!("privileged test {test} cannot run: {reason} ({REQUIRE_PRIVILEGED_ENV}=1)");
    }
    // Straight to the stderr handle: the harness captures `eprintln!`, and a skip must be
    // visible in a passing run.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
    false
}

macro_rules! require_privileged {
    ($test:literal) => {
        if !privileged_or_skip($test) {
            return;
        }
    };
}

/// Runs `program args`, panicking with its output if it fails; returns its stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made with `ip netns add`, deleted (with its end of the veth) when
/// dropped, also when the test panics.
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{}-{n}-{role}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// `ip -n <name> <args>`.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `<args>` run inside the namespace.
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn sysctl(&self, key: &str) -> String {
        self.exec(&["sysctl", "-n", key]).trim().to_owned()
    }

    fn set_sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Deletes namespaces left by earlier runs of these tests that died before their `Drop`.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return;
    };
    for entry in entries.flatten().take(1000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// "client" and "pod" joined by a veth (`eth0` on both sides), both address families.
/// The pod's namespace filters reverse paths strictly, so the tests show that
/// `rp_filter` does not get in the way.
struct Pair {
    client: Netns,
    pod: Netns,
}

impl Pair {
    fn new() -> Pair {
        remove_leftovers();
        let pair = Pair {
            client: Netns::new("client"),
            pod: Netns::new("pod"),
        };
        pair.client.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pair.pod.name,
        ]);
        for (ns, v4, v6) in [
            (&pair.client, "10.77.0.1/24", "fd77::1/64"),
            (&pair.pod, "10.77.0.2/24", "fd77::2/64"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", "eth0"]);
            ns.ip(&["addr", "add", v6, "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            "net.ipv4.conf.lo.rp_filter",
            "net.ipv4.conf.eth0.rp_filter",
        ] {
            pair.pod.set_sysctl(key, "1");
        }
        pair
    }

    fn pod_net(&self, ip: IpAddr) -> PodNet {
        PodNet::open(&self.pod.path(), ip).expect("open the pod's namespace")
    }

    fn client_net(&self, ip: IpAddr) -> PodNet {
        PodNet::open(&self.client.path(), ip).expect("open the client's namespace")
    }
}

fn payload() -> Vec<u8> {
    (0..PAYLOAD_LEN).map(|i| (i % 251) as u8).collect()
}

/// Serves one connection: reads until the peer half-closes, answers with what it read
/// reversed, closes. Returns the peer's address and what it read.
async fn serve_one(listener: TcpListener) -> (SocketAddr, Vec<u8>) {
    let (mut stream, peer) = listener.accept().await.expect("accept");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.expect("server read");
    let answer: Vec<u8> = got.iter().rev().copied().collect();
    stream.write_all(&answer).await.expect("server write");
    stream.shutdown().await.expect("server shutdown");
    (peer, got)
}

/// Sends the payload, half-closes, reads the answer to its end; checks both directions.
async fn exchange(mut stream: TcpStream) {
    let data = payload();
    stream.write_all(&data).await.expect("client write");
    // Half-close: the server sees EOF, and can still answer.
    stream.shutdown().await.expect("client half-close");
    let mut answer = Vec::new();
    timeout(CONNECT_TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .expect("client read");
    let expected: Vec<u8> = data.iter().rev().copied().collect();
    assert_eq!(answer.len(), expected.len(), "length of the answer");
    assert!(answer == expected, "the answer is not the payload reversed");
}

async fn connect(socket: TcpSocket, to: SocketAddr) -> TcpStream {
    timeout(CONNECT_TIMEOUT, socket.connect(to))
        .await
        .unwrap_or_else(|_| panic!("connecting to {to} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"))
}

/// A transparent connection from `client_ip` to the application on `pod_ip` in the pod's
/// namespace: the application sees `client_ip`, data flows both ways, half-close works.
async fn transparent_round_trip(pod: &PodNet, client_ip: IpAddr) {
    let app = pod.listen(APP_PORT).await.expect("application listener");
    let server = tokio::spawn(serve_one(app));
    let socket = pod
        .transparent_socket(client_ip)
        .await
        .expect("transparent socket");
    assert_eq!(
        SockRef::from(&socket).mark().expect("read SO_MARK"),
        TRANSPARENT_MARK
    );
    let stream = connect(socket, SocketAddr::new(pod.pod_ip(), APP_PORT)).await;
    assert_eq!(stream.local_addr().expect("local address").ip(), client_ip);
    exchange(stream).await;
    let (peer, got) = timeout(CONNECT_TIMEOUT, server)
        .await
        .expect("server done in time")
        .expect("server task");
    assert_eq!(
        peer.ip(),
        client_ip,
        "the application must see the client's address"
    );
    assert_eq!(got, payload(), "what the application read");
}

#[tokio::test]
async fn transparent_connection_shows_the_client_address() {
    require_privileged!("transparent_connection_shows_the_client_address");
    let pair = Pair::new();
    let pod = pair.pod_net(POD_V4);
    pod.prepare().await.expect("prepare");
    transparent_round_trip(&pod, CLIENT_V4).await;
    // The replies stayed in the pod: the real 10.77.0.1 received no TCP segment at all.
    assert_eq!(
        tcp_in_segments(&pair.client),
        0,
        "TCP segments reached the client"
    );
}

/// `Tcp: InSegs` of the namespace's `/proc/net/snmp`: TCP segments it received.
fn tcp_in_segments(ns: &Netns) -> u64 {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        panic!("no Tcp lines in /proc/net/snmp:\n{snmp}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "InSegs")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or_else(|| panic!("no Tcp InSegs in /proc/net/snmp:\n{snmp}"))
}

#[tokio::test]
async fn transparent_connection_over_ipv6() {
    require_privileged!("transparent_connection_over_ipv6");
    let pair = Pair::new();
    let pod = pair.pod_net(POD_V6);
    pod.prepare().await.expect("prepare");
    transparent_round_trip(&pod, CLIENT_V6).await;
}

#[tokio::test]
async fn transparent_connection_needs_prepare() {
    require_privileged!("transparent_connection_needs_prepare");
    let pair = Pair::new();
    let pod = pair.pod_net(POD_V4);
    let app = pod.listen(APP_PORT).await.expect("application listener");
    let socket = pod
        .transparent_socket(CLIENT_V4)
        .await
        .expect("transparent socket");
    // The application's SYN-ACK follows the default route to the real 10.77.0.1, which
    // knows nothing of it: the connection never completes.
    let attempt = timeout(
        FAIL_TIMEOUT,
        socket.connect(SocketAddr::new(POD_V4, APP_PORT)),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "a transparent connection must not work before prepare"
    );
    assert!(
        timeout(Duration::from_millis(100), app.accept())
            .await
            .is_err(),
        "the application must not have accepted a connection"
    );
    drop(app);
    // The same, prepared, works.
    pod.prepare().await.expect("prepare");
    transparent_round_trip(&pod, CLIENT_V4).await;
}

#[tokio::test]
async fn listener_lives_in_the_pod_namespace() {
    require_privileged!("listener_lives_in_the_pod_namespace");
    let pair = Pair::new();
    let pod = pair.pod_net(POD_V4);
    let listener = pod.listen(15001).await.expect("listen on 15001");
    assert_eq!(
        listener.local_addr().expect("listener address"),
        SocketAddr::new(POD_V4, 15001)
    );
    // The kernel lists it in the pod's namespace, and neither in the client's nor in the
    // namespace this test runs in.
    let filter = ["ss", "-Hltn", "src", "10.77.0.2:15001"];
    assert!(
        pair.pod.exec(&filter).contains("10.77.0.2:15001"),
        "no listener on 10.77.0.2:15001 in the pod's namespace"
    );
    assert_eq!(pair.client.exec(&filter).trim(), "");
    assert_eq!(run(filter[0], &filter[1..]).trim(), "");

    // A process of the pod reaches it.
    let server = tokio::spawn(serve_one(listener));
    let socket = pod.socket(POD_V4).await.expect("socket in the pod");
    exchange(connect(socket, SocketAddr::new(POD_V4, 15001)).await).await;
    let (peer, _) = server.await.expect("server task");
    assert_eq!(peer.ip(), POD_V4);

    // Being on the pod's address, it is also reachable through the pod's interface: the
    // caller of the outbound listener must check that peers are the pod itself.
    let listener = pod.listen(15001).await.expect("listen on 15001 again");
    let server = tokio::spawn(serve_one(listener));
    let outside = pair.client_net(CLIENT_V4);
    let socket = outside.socket(POD_V4).await.expect("socket in the client");
    exchange(connect(socket, SocketAddr::new(POD_V4, 15001)).await).await;
    let (peer, _) = server.await.expect("server task");
    assert_eq!(peer.ip(), CLIENT_V4);
}

#[tokio::test]
async fn socket_leaves_with_the_pod_address() {
    require_privileged!("socket_leaves_with_the_pod_address");
    let pair = Pair::new();
    let pod = pair.pod_net(POD_V4);
    // Prepared, so this also shows that prepare leaves the pod's ordinary traffic alone.
    pod.prepare().await.expect("prepare");
    let remote = pair
        .client_net(CLIENT_V4)
        .listen(9000)
        .await
        .expect("listener in the client's namespace");
    let server = tokio::spawn(serve_one(remote));
    let socket = pod.socket(CLIENT_V4).await.expect("socket in the pod");
    assert_eq!(
        SockRef::from(&socket).mark().expect("read SO_MARK"),
        PROXY_MARK
    );
    let stream = connect(socket, SocketAddr::new(CLIENT_V4, 9000)).await;
    assert_eq!(stream.local_addr().expect("local address").ip(), POD_V4);
    exchange(stream).await;
    let (peer, got) = server.await.expect("server task");
    assert_eq!(
        peer.ip(),
        POD_V4,
        "the remote end must see the pod's address"
    );
    assert_eq!(got, payload());
}

#[tokio::test]
async fn netns_cookies_tell_namespaces_apart() {
    require_privileged!("netns_cookies_tell_namespaces_apart");
    let pair = Pair::new();
    let pod = pair.pod_net(POD_V4);
    let first = pod.netns_cookie().await.expect("pod cookie");
    assert_eq!(pod.netns_cookie().await.expect("pod cookie again"), first);
    let reopened = pair.pod_net(POD_V4);
    assert_eq!(
        reopened
            .netns_cookie()
            .await
            .expect("cookie of the reopened pod namespace"),
        first
    );
    let client = pair
        .client_net(CLIENT_V4)
        .netns_cookie()
        .await
        .expect("client cookie");
    assert_ne!(client, first);
    let own = PodNet::open(Path::new("/proc/thread-self/ns/net"), POD_V4)
        .expect("open this thread's namespace")
        .netns_cookie()
        .await
        .expect("own cookie");
    assert_ne!(own, first);
    assert_ne!(own, client);
}

/// The network namespace links (`net:[inode]`) of this process's helper threads.
fn helper_namespaces() -> Vec<PathBuf> {
    let tasks = std::fs::read_dir("/proc/self/task").expect("read /proc/self/task");
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == helper::HELPER_THREAD_NAME)
        })
        .filter_map(|task| std::fs::read_link(task.path().join("ns/net")).ok())
        .collect()
}

#[tokio::test]
async fn helper_thread_returns_to_the_agents_namespace() {
    require_privileged!("helper_thread_returns_to_the_agents_namespace");
    let pair = Pair::new();
    let pod = pair.pod_net(POD_V4);
    let _listener = pod.listen(APP_PORT).await.expect("listener");
    let _socket = pod
        .transparent_socket(CLIENT_V4)
        .await
        .expect("transparent socket");
    let own = std::fs::read_link("/proc/thread-self/ns/net").expect("own namespace");
    // Other tests may be using the helper right now: look a few times.
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = helper_namespaces();
        assert!(!seen.is_empty(), "no {} thread", helper::HELPER_THREAD_NAME);
        if seen.iter().all(|ns| *ns == own) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the helper thread stays in {seen:?}, not in the agent's {own:?}");
}

/// Lines of `text` that are the rule `prepare` adds.
fn our_rules(text: &str) -> usize {
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{TRANSPARENT_RULE_PRIORITY}:"))
                && l.contains(&format!(
                    "fwmark {TRANSPARENT_MARK:#x}/{MARK_MASK:#x} lookup {TRANSPARENT_TABLE}"
                ))
        })
        .count()
}

/// Everything but the rule `prepare` adds.
fn other_rules(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| our_rules(l) == 0)
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn prepare_is_idempotent_and_cleanup_undoes_it() {
    require_privileged!("prepare_is_idempotent_and_cleanup_undoes_it");
    let pair = Pair::new();
    let ns = &pair.pod;
    let table = TRANSPARENT_TABLE.to_string();
    let rules_before = (
        ns.ip(&["-4", "rule", "show"]),
        ns.ip(&["-6", "rule", "show"]),
    );
    let main_before = (
        ns.ip(&["-4", "route", "show"]),
        ns.ip(&["-6", "route", "show"]),
    );
    assert_eq!(ns.sysctl("net.ipv4.tcp_fwmark_accept"), "0");
    let ports_before = ns.sysctl("net.ipv4.ip_local_reserved_ports");

    let pod = pair.pod_net(POD_V4);
    pod.prepare().await.expect("prepare");
    pod.prepare().await.expect("prepare again");
    let ports = ns.sysctl("net.ipv4.ip_local_reserved_ports");
    for port in PROXY_PORTS {
        assert!(
            ports.split(',').any(|p| p == port.to_string()),
            "{port} reserved: {ports:?}"
        );
    }

    for (family, before) in [("-4", &rules_before.0), ("-6", &rules_before.1)] {
        let rules = ns.ip(&[family, "rule", "show"]);
        assert_eq!(our_rules(&rules), 1, "ip {family} rule show:\n{rules}");
        assert_eq!(
            other_rules(&rules),
            other_rules(before),
            "other {family} rules changed"
        );
        let routes = ns.ip(&[family, "route", "show", "table", &table]);
        let lines: Vec<&str> = routes.lines().map(str::trim).collect();
        assert_eq!(
            lines.len(),
            1,
            "ip {family} route show table {table}:\n{routes}"
        );
        assert!(
            lines[0].starts_with("local default dev lo"),
            "ip {family} route show table {table}:\n{routes}"
        );
    }
    assert_eq!(
        ns.ip(&["-4", "route", "show"]),
        main_before.0,
        "main IPv4 table changed"
    );
    assert_eq!(
        ns.ip(&["-6", "route", "show"]),
        main_before.1,
        "main IPv6 table changed"
    );
    assert_eq!(ns.sysctl("net.ipv4.tcp_fwmark_accept"), "1");
    // The sysctl is the namespace's own: this test's namespace keeps its value.
    let own = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept")
        .expect("read this namespace's tcp_fwmark_accept");
    assert_eq!(own.trim(), "0", "prepare changed the caller's namespace");

    pod.cleanup().await.expect("cleanup");
    pod.cleanup().await.expect("cleanup again");
    assert_eq!(ns.ip(&["-4", "rule", "show"]), rules_before.0);
    assert_eq!(ns.ip(&["-6", "rule", "show"]), rules_before.1);
    for family in ["-4", "-6"] {
        let routes = ns.ip(&[family, "route", "show", "table", &table]);
        assert_eq!(
            routes.trim(),
            "",
            "ip {family} route show table {table} after cleanup"
        );
    }
    assert_eq!(ns.sysctl("net.ipv4.tcp_fwmark_accept"), "0");
    // Down to no reserved port at all (an empty write would change nothing).
    assert_eq!(ns.sysctl("net.ipv4.ip_local_reserved_ports"), ports_before);
}

#[tokio::test]
async fn cleanup_leaves_what_is_not_mycels() {
    require_privileged!("cleanup_leaves_what_is_not_mycels");
    let pair = Pair::new();
    let ns = &pair.pod;
    // Someone else's settings in a namespace mycel never set up: no rule of mycel's, so
    // `tcp_fwmark_accept` is not mycel's to reset; a range of reserved ports stays.
    ns.set_sysctl("net.ipv4.tcp_fwmark_accept", "1");
    ns.set_sysctl("net.ipv4.ip_local_reserved_ports", "15000-15010");
    let pod = pair.pod_net(POD_V4);
    pod.cleanup().await.expect("cleanup");
    assert_eq!(ns.sysctl("net.ipv4.tcp_fwmark_accept"), "1");
    assert_eq!(ns.sysctl("net.ipv4.ip_local_reserved_ports"), "15000-15010");
    // Once set up and cleaned up, the reset happens and the range is still left alone.
    pod.prepare().await.expect("prepare");
    pod.cleanup().await.expect("cleanup");
    assert_eq!(ns.sysctl("net.ipv4.tcp_fwmark_accept"), "0");
    assert_eq!(ns.sysctl("net.ipv4.ip_local_reserved_ports"), "15000-15010");
}

#[tokio::test]
async fn prepare_without_ipv6_in_an_ipv4_pod() {
    require_privileged!("prepare_without_ipv6_in_an_ipv4_pod");
    let pair = Pair::new();
    pair.pod.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    pair.pod.set_sysctl("net.ipv6.conf.lo.disable_ipv6", "1");
    let pod = pair.pod_net(POD_V4);
    pod.prepare().await.expect("prepare with IPv6 disabled");
    transparent_round_trip(&pod, CLIENT_V4).await;
    pod.cleanup().await.expect("cleanup with IPv6 disabled");
}

/// Needs no privileges: opening and entering fail before any of them matter.
#[tokio::test]
async fn errors_name_the_path() {
    let missing = PathBuf::from(format!(
        "{NETNS_RUN_DIR}/{NETNS_PREFIX}missing-{}",
        std::process::id()
    ));
    let error = PodNet::open(&missing, POD_V4).expect_err("a missing namespace");
    assert!(matches!(error, Error::Open { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&missing.display().to_string()),
        "{error}"
    );

    let file = tempfile::NamedTempFile::new().expect("temporary file");
    let error = PodNet::open(file.path(), POD_V4).expect_err("a plain file");
    assert!(matches!(error, Error::NotNamespace { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains(&file.path().display().to_string()),
        "{error}"
    );

    // A namespace, but not a network one: setns() says EINVAL.
    let uts = Path::new("/proc/self/ns/uts");
    let pod = PodNet::open(uts, POD_V4).expect("a UTS namespace opens");
    let error = pod
        .listen(APP_PORT)
        .await
        .expect_err("not a network namespace");
    assert!(matches!(error, Error::Enter { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("/proc/self/ns/uts") && text.contains("10.77.0.2"),
        "{text}"
    );

    let error = pod
        .transparent_socket(CLIENT_V6)
        .await
        .expect_err("a client of the other family");
    assert!(matches!(error, Error::Family { .. }), "{error:?}");
    assert!(error.to_string().contains("/proc/self/ns/uts"), "{error}");
}
