//! Identity-aware L3/L4 policy and flow accounting, end to end: Workloads and
//! AuthorizationPolicies in the agent's YAML directory, TC programs on the pods' host-side
//! interfaces, real TCP between pods, and what the agent reports (metrics, flows).

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use mycel_tests::{
    Agent, Node, Pod, Proc, require_root,
    testpod::{HoldEvent, now_us},
};

const OPEN: u16 = 8080;
const OTHER_PORT: u16 = 9090;

/// A node with a `web` server pod (TCP servers on 8080 and 9090) and two clients with their
/// own service accounts, `client` and `other`, all enrolled as Workloads.
struct Scene {
    node: Node,
    web: Pod,
    client: Pod,
    other: Pod,
    _servers: Vec<Proc>,
}

impl Scene {
    fn new() -> Scene {
        let node = Node::new();
        let web = node.pod("web");
        let client = node.pod("client");
        let other = node.pod("other");
        let servers = vec![web.tcp_server(OPEN), web.tcp_server(OTHER_PORT)];
        node.resources()
            .write_workloads(&[(&web, "web"), (&client, "client"), (&other, "other")]);
        Scene {
            node,
            web,
            client,
            other,
            _servers: servers,
        }
    }

    fn web(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.web.ipv4, port))
    }

    fn web6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.web.ipv6, port))
    }

    fn policy(&self, file: &str, yaml: &str) {
        self.node.resources().write_raw(file, yaml);
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

/// Polls until `pod` → `addr` is answered (`want`) or not, for at most `within`. Returns
/// when the first attempt with that outcome started (a refused attempt itself lasts until
/// its timeout).
fn wait_reachability(pod: &Pod, addr: SocketAddr, want: bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let attempt = start.elapsed();
        let ok = answered(pod, addr, 1) == 1;
        if ok == want {
            return attempt;
        }
        assert!(
            start.elapsed() < within,
            "{} → {addr} should be {} within {within:?}",
            pod.name,
            if want {
                "answered"
            } else {
                "refused by policy"
            }
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn allow_from(name: &str, principal: &str, port: u16) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [\"{principal}\"]}}}}]
    to: [{{operation: {{ports: [\"{port}\"]}}}}]
"
    )
}

fn deny_from(name: &str, principal: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - from: [{{source: {{principals: [\"{principal}\"]}}}}]
"
    )
}

const CLIENT: &str = "cluster.local/ns/default/sa/client";
const OTHER: &str = "cluster.local/ns/default/sa/other";

fn metric(agent: &Agent<'_>, name: &str, labels: &[(&str, &str)]) -> f64 {
    agent.metric_value(name, labels).unwrap_or(0.0)
}

#[test]
fn without_policy_traffic_flows_and_is_accounted() {
    require_root!();
    let scene = Scene::new();
    let agent = scene.node.start_agent();
    assert_eq!(answered(&scene.client, scene.web(OPEN), 10), 10);
    assert_eq!(answered(&scene.other, scene.web(OTHER_PORT), 5), 5);

    agent.wait_for(
        "istio_tcp_connections_opened_total for client → web",
        Duration::from_secs(5),
        |a| {
            metric(
                a,
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "destination"),
                    ("source_workload", "client"),
                    ("destination_workload", "web"),
                ],
            ) >= 10.0
        },
    );
    agent.wait_for("bytes sent by client to web", Duration::from_secs(5), |a| {
        metric(
            a,
            "istio_tcp_sent_bytes_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "client"),
                ("destination_workload", "web"),
            ],
        ) > 0.0
    });
    assert!(agent.metric_sum("hubble_flows_processed_total") > 0.0);
    assert_eq!(agent.metric_sum("hubble_drop_total"), 0.0);

    // The flow log CLI shows them, with workload names.
    let (status, stdout, stderr) = agent.cli(&["flows", "--output", "json", "--from", "client"]);
    assert!(status.success(), "mycel flows failed: {stderr}");
    assert!(
        stdout.contains("\"web\"") && stdout.contains("FORWARDED"),
        "mycel flows --from client should list forwarded flows to web: {stdout}"
    );
}

#[test]
fn allow_policy_admits_only_the_named_principal_and_port() {
    require_root!();
    let scene = Scene::new();
    scene.policy("allow.yaml", &allow_from("web-allow", CLIENT, OPEN));
    let agent = scene.node.start_agent();

    assert_eq!(answered(&scene.client, scene.web(OPEN), 5), 5);
    assert_eq!(
        answered(&scene.other, scene.web(OPEN), 3),
        0,
        "other's principal is not allowed"
    );
    assert_eq!(
        answered(&scene.client, scene.web(OTHER_PORT), 3),
        0,
        "port {OTHER_PORT} is not allowed"
    );
    // The same over IPv6: identities come from the workloads' IPv6 addresses too.
    assert_eq!(answered(&scene.client, scene.web6(OPEN), 3), 3);
    assert_eq!(
        answered(&scene.other, scene.web6(OPEN), 3),
        0,
        "other's principal is not allowed over IPv6 either"
    );
    agent.wait_for("policy drops to be counted", Duration::from_secs(5), |a| {
        metric(a, "hubble_drop_total", &[("reason", "POLICY_DENIED")]) > 0.0
    });
    let (status, stdout, _) = agent.cli(&["flows", "--output", "json", "--verdict", "dropped"]);
    assert!(status.success());
    assert!(
        stdout.contains("\"other\"") && stdout.contains("POLICY_DENIED"),
        "dropped flows should name the source workload and the reason: {stdout}"
    );
}

#[test]
fn deny_wins_and_cuts_established_connections_within_a_second() {
    require_root!();
    let scene = Scene::new();
    scene.policy(
        "allow.yaml",
        "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{}]
",
    );
    let _agent = scene.node.start_agent();
    let (hold, _) = scene.client.tcp_hold(scene.web(OPEN));
    assert_eq!(answered(&scene.other, scene.web(OPEN), 3), 3);

    let written_us = now_us();
    scene.policy("deny.yaml", &deny_from("no-client", CLIENT));
    let took = wait_reachability(
        &scene.client,
        scene.web(OPEN),
        false,
        Duration::from_secs(2),
    );
    eprintln!(
        "new connections denied {} ms after the write",
        took.as_millis()
    );
    // DENY wins over the ALLOW that matches everything, for client only.
    assert_eq!(answered(&scene.other, scene.web(OPEN), 3), 3);

    // The established connection stops being answered within a second of the write.
    thread::sleep(Duration::from_millis(1500));
    let answers_after: Vec<HoldEvent> = hold
        .stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<HoldEvent>(l).ok())
        .filter(|e| e.event == "answer" && e.at_us > written_us + 1_000_000)
        .collect();
    assert!(
        answers_after.is_empty(),
        "the held connection was still answered more than 1 s after the DENY: {answers_after:?}"
    );
}

#[test]
fn an_invalid_policy_is_rejected_and_the_previous_one_stays() {
    require_root!();
    let scene = Scene::new();
    scene.policy("deny.yaml", &deny_from("no-other", OTHER));
    let mut agent = scene.node.start_agent();
    assert_eq!(answered(&scene.other, scene.web(OPEN), 3), 0);
    assert_eq!(answered(&scene.client, scene.web(OPEN), 3), 3);

    let errors_before = agent.metric_sum("mycel_source_errors_total");
    let log_before = agent.log().len();
    scene.policy(
        "deny.yaml",
        "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-other, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]
",
    );
    agent.wait_for(
        "the invalid policy to be counted",
        Duration::from_secs(3),
        |a| a.metric_sum("mycel_source_errors_total") > errors_before,
    );
    let log = agent.log();
    let new = log.get(log_before..).unwrap_or_default();
    assert!(
        new.contains("deny.yaml") && new.contains("ipBlocks"),
        "the log should name the file and the field: {new}"
    );
    // The previous version of the policy is still in force.
    assert_eq!(answered(&scene.other, scene.web(OPEN), 3), 0);
    assert_eq!(answered(&scene.client, scene.web(OPEN), 3), 3);

    // Restarted with the file still broken: the DENY stays in force (its saved last good
    // version), and the agent says the file is rejected.
    agent.restart();
    assert_eq!(
        answered(&scene.other, scene.web(OPEN), 3),
        0,
        "the DENY fell out of force at the restart\n{}",
        agent.log_tail(20)
    );
    assert_eq!(answered(&scene.client, scene.web(OPEN), 3), 3);
    assert!(
        agent.metric_sum("mycel_source_errors_current") >= 1.0,
        "the rejected file is still reported: {}",
        agent.metrics()
    );
    assert!(
        agent.log().contains("keeping its last good version"),
        "{}",
        agent.log_tail(20)
    );
}
