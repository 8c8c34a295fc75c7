//! Policy and flow accounting seen through the agent: three workloads `a`, `b` and `c`
//! (service accounts of the same names), a policy set that allows only `a` → `b` on port
//! 8080, the drops it causes in `mycel flows` and `hubble_drop_total`, Istio's byte
//! counters against what the clients sent, and traffic restored when the policy goes.
//!
//! # What the byte counters count
//!
//! The kernel adds `skb->len` of every packet to `FlowValue::bytes_fwd`/`bytes_rev` (the
//! TC programs' `ctx.len()`), on the host side of the workload's veth where TC sees the
//! whole Ethernet frame: 14 bytes of Ethernet header + the IP packet (header, TCP header
//! with options, payload), no FCS. Istio's `istio_tcp_received_bytes_total` and
//! `istio_tcp_sent_bytes_total` are those counters (requests and responses), so they are
//! payload plus every packet's headers, not payload alone as in Istio's proxies.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use mycel_agent::flows::{
    Flow, Verdict,
    record::{Direction, Kind},
};
use mycel_tests::{Agent, Node, Pod, Proc, require_root};

const OPEN: u16 = 8080;
const CLOSED: u16 = 9090;

/// What the test-pod client sends on each connection, and what `b`'s server answers.
const REQUEST: &[u8] = b"?\n";
const ANSWER_FROM_B: &[u8] = b"b\n";

/// Header bytes of one IPv4 TCP packet between Linux endpoints, as `skb->len` counts them:
/// Ethernet 14 + IPv4 20 + TCP 20 + the timestamp option Linux puts on every segment
/// (10, padded to 12).
const HEADERS: u64 = 14 + 20 + 20 + 12;
/// What a SYN or SYN-ACK carries beyond [`HEADERS`]: its options are MSS, SACK-permitted,
/// timestamps and window scale, 20 bytes instead of 12.
const SYN_EXTRA: u64 = 8;

/// Only `a` → `b`:8080: an ALLOW without rules selecting every workload of the namespace
/// (Istio's allow-nothing), and an ALLOW for `a`'s principal on 8080 selecting `b`.
const POLICY: &str = "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {action: ALLOW}
---
apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: b-from-a, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/default/sa/a\"]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

struct Scene {
    node: Node,
    a: Pod,
    b: Pod,
    c: Pod,
    _servers: Vec<Proc>,
}

impl Scene {
    fn new() -> Scene {
        let node = Node::new();
        let (a, b, c) = (node.pod("a"), node.pod("b"), node.pod("c"));
        let servers = vec![b.tcp_server(OPEN), b.tcp_server(CLOSED), a.tcp_server(OPEN)];
        node.resources()
            .write_workloads(&[(&a, "a"), (&b, "b"), (&c, "c")]);
        Scene {
            node,
            a,
            b,
            c,
            _servers: servers,
        }
    }
}

/// How many of `n` short connections from `pod` to `addr` were answered.
fn answered(pod: &Pod, addr: SocketAddr, n: u32) -> usize {
    pod.tcp_client_with(addr, n, &["--timeout-ms", "300"])
        .results
        .iter()
        .filter(|r| r.error.is_none() && r.answer.is_some())
        .count()
}

/// `mycel flows --output json` with `args`, parsed.
fn flows(agent: &Agent<'_>, args: &[&str]) -> Vec<Flow> {
    let mut all = vec!["flows", "--output", "json", "--limit", "1000"];
    all.extend_from_slice(args);
    let (status, stdout, stderr) = agent.cli(&all);
    assert!(status.success(), "mycel {all:?} failed: {stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn istio(agent: &Agent<'_>, name: &str) -> u64 {
    let v = agent
        .metric_value(
            name,
            &[
                ("reporter", "destination"),
                ("source_workload", "a"),
                ("destination_workload", "b"),
            ],
        )
        .unwrap_or(0.0);
    // Byte counters are integers well below 2^53.
    v as u64
}

#[test]
fn only_the_allowed_path_passes_drops_are_reported_bytes_add_up_and_removal_restores() {
    require_root!();
    let scene = Scene::new();
    scene.node.resources().write_raw("policy.yaml", POLICY);
    let agent = scene.node.start_agent();
    let b_open = SocketAddr::from((scene.b.ipv4, OPEN));
    let b_closed = SocketAddr::from((scene.b.ipv4, CLOSED));
    let a_open = SocketAddr::from((scene.a.ipv4, OPEN));

    // a → b:8080 is the one allowed path; its replies come back to a, which enforces too.
    const CONNECTIONS: u32 = 5;
    let report = scene.a.tcp_client(b_open, CONNECTIONS);
    assert_eq!(
        report.answers_without_errors("a → b:8080").get("b"),
        Some(&(CONNECTIONS as usize))
    );
    assert_eq!(answered(&scene.a, b_closed, 1), 0, "a → b:{CLOSED}");
    assert_eq!(answered(&scene.b, a_open, 1), 0, "b → a:{OPEN}");
    assert_eq!(answered(&scene.c, b_open, 1), 0, "c → b:{OPEN}");

    // The drops: one flow each, in `mycel flows` and in hubble_drop_total.
    agent.wait_for("three policy drops", Duration::from_secs(3), |a| {
        a.metric_value(
            "hubble_drop_total",
            &[("reason", "POLICY_DENIED"), ("protocol", "TCP")],
        )
        .unwrap_or(0.0)
            >= 3.0
    });
    let dropped = flows(&agent, &["--verdict", "dropped"]);
    for (from, to, port) in [("a", "b", CLOSED), ("b", "a", OPEN), ("c", "b", OPEN)] {
        let found = dropped.iter().any(|f| {
            f.source.workload == from
                && f.destination.workload == to
                && f.destination.address.port() == port
                && f.verdict == Verdict::Dropped
                && f.drop_reason.as_deref() == Some("POLICY_DENIED")
        });
        assert!(
            found,
            "{from} → {to}:{port} missing from `mycel flows --verdict dropped`: {dropped:#?}"
        );
    }
    assert!(
        dropped.iter().all(|f| f.verdict == Verdict::Dropped),
        "{dropped:#?}"
    );
    assert!(
        !dropped
            .iter()
            .any(|f| f.destination.address.port() == OPEN && f.source.workload == "a"),
        "the allowed path shows as dropped: {dropped:#?}"
    );

    // Bytes. Every connection closed (client and server both sent FIN) before the client
    // printed its report, so b's side reported it closed with its final counters; only the
    // client's last ACK (one packet of headers, a → b) comes after.
    agent.wait_for(
        "the allowed connections to close",
        Duration::from_secs(3),
        |a| {
            a.metric_value(
                "istio_tcp_connections_closed_total",
                &[
                    ("reporter", "destination"),
                    ("source_workload", "a"),
                    ("destination_workload", "b"),
                ],
            )
            .unwrap_or(0.0)
                >= f64::from(CONNECTIONS)
        },
    );
    let closed: Vec<Flow> = flows(&agent, &["--from", "a", "--to", "b"])
        .into_iter()
        .filter(|f| {
            f.kind == Kind::Closed
                && f.destination.address.port() == OPEN
                && f.destination.workload == "b"
                // Reported by b's interface: the destination's view.
                && f.direction == Direction::Ingress
        })
        .collect();
    assert_eq!(closed.len(), CONNECTIONS as usize, "{closed:#?}");
    // Each direction: the payload, plus the headers of the packets counted (SYN or SYN-ACK
    // with larger options), within one packet of headers.
    let expect =
        |payload: &[u8], packets: u64| payload.len() as u64 + packets * HEADERS + SYN_EXTRA;
    let (mut want_received, mut want_sent) = (0, 0);
    for f in &closed {
        let (req, resp) = (
            expect(REQUEST, f.forward.packets),
            expect(ANSWER_FROM_B, f.reply.packets),
        );
        assert!(
            f.forward.bytes.abs_diff(req) <= HEADERS && f.reply.bytes.abs_diff(resp) <= HEADERS,
            "a → b: {:?} (want {req} bytes ±{HEADERS}), b → a: {:?} (want {resp} ±{HEADERS})",
            f.forward,
            f.reply
        );
        want_received += req;
        want_sent += resp;
    }
    let n = u64::from(CONNECTIONS);
    let received = istio(&agent, "istio_tcp_received_bytes_total");
    let sent = istio(&agent, "istio_tcp_sent_bytes_total");
    assert!(
        received.abs_diff(want_received) <= n * HEADERS,
        "istio_tcp_received_bytes_total {received}, the clients sent {want_received} \
         ({n} requests of {} bytes with their packets' headers)",
        REQUEST.len()
    );
    assert!(
        sent.abs_diff(want_sent) <= n * HEADERS,
        "istio_tcp_sent_bytes_total {sent}, the server sent {want_sent}"
    );
    let opened = agent
        .metric_value(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "a"),
                ("destination_workload", "b"),
            ],
        )
        .unwrap_or(0.0);
    assert_eq!(opened, f64::from(CONNECTIONS));

    // Removing the policy restores what it denied, within a second.
    let removed = Instant::now();
    scene.node.resources().remove("policy.yaml");
    for (pod, addr) in [(&scene.a, b_closed), (&scene.b, a_open)] {
        loop {
            let attempt = removed.elapsed();
            if answered(pod, addr, 1) == 1 {
                assert!(
                    attempt < Duration::from_secs(1),
                    "{} → {addr} answered only {} ms after the policy was removed",
                    pod.name,
                    attempt.as_millis()
                );
                break;
            }
            assert!(
                removed.elapsed() < Duration::from_secs(2),
                "{} → {addr} still refused 2 s after the policy was removed",
                pod.name
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!(
        "traffic restored {} ms after the removal",
        removed.elapsed().as_millis()
    );
}
