//! Transparent mutual TLS between enrolled workloads on two nodes: the kernel redirects a
//! pod's connection to its node's proxy, which tunnels it over HBONE to the destination
//! node's proxy, which authorizes it by certificate and connects to the server with the
//! client's address.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mycel_tests::sniff::Sniffer;
use mycel_tests::twonode::TwoNodes;
use mycel_tests::{
    Agent, AgentOptions, ClientReport, EndpointSliceYaml, Pod, Proc, ServiceYaml, WorkloadYaml,
    require_root,
};

const PORT: u16 = 8080;
const SERVICE_IP: &str = "10.96.7.7";
const SERVICE_PORT: u16 = 80;

/// Starts `mycel-testpod tcp-peer-server` in `pod` (answers with the client's address).
fn peer_server(pod: &Pod) -> Proc {
    pod.peer_server(PORT)
}

/// The service both nodes know, backed by `server`.
fn write_service(two: &TwoNodes, server: &Pod) {
    let svc = ServiceYaml::new("server", SERVICE_IP)
        .port("http", u32::from(SERVICE_PORT), "TCP", u32::from(PORT))
        .to_yaml();
    let slice = EndpointSliceYaml::ipv4("server-1", "server")
        .endpoint(server.ipv4)
        .port("http", u32::from(PORT), "TCP")
        .to_yaml();
    for node in two.nodes() {
        node.resources()
            .write("service.yaml", &[svc.clone(), slice.clone()]);
    }
}

fn enrolled(pod: &Pod, app: &str, mode: &str) -> WorkloadYaml {
    WorkloadYaml::in_mesh(pod, app, mode)
}

/// A client pod on node 1 and a server pod on node 2, both enrolled STRICT.
fn strict_pair(two: &TwoNodes) -> (Pod, Pod) {
    let client = two.node1.pod("client");
    let server = two.node2.pod("server");
    two.write_workloads(
        "workloads.yaml",
        &[
            (&client, enrolled(&client, "client", "STRICT")),
            (&server, enrolled(&server, "server", "STRICT")),
        ],
    );
    (client, server)
}

/// Waits until `agent` serves `n` local workloads in the mesh: listening in their
/// namespaces, with their certificates (and, by then, the kernel's maps written).
fn wait_serving(agent: &Agent<'_>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = agent.get("/debug/status");
        let served = serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| v["mesh_workloads"].as_u64())
            .unwrap_or(0);
        let body = certificates(agent);
        let count = body.as_array().map_or(0, Vec::len);
        if count >= n && served as usize >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent issued {count} of {n} certificates: {body}\n{}",
            agent.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's certificates, as `mycel status` shows them.
fn certificates(agent: &Agent<'_>) -> serde_json::Value {
    let (_, body) = agent.get("/debug/status");
    serde_json::from_str::<serde_json::Value>(&body)
        .map(|v| v["certificates"].clone())
        .unwrap_or_default()
}

/// Each answer of the peer server: the address it saw the client at.
fn seen_sources(report: &ClientReport) -> Vec<IpAddr> {
    report
        .results
        .iter()
        .filter_map(|r| r.answer.as_deref()?.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .collect()
}

fn mtls_opened(agent: &Agent<'_>, reporter: &str) -> f64 {
    agent.metric_sum_where(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", reporter),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

#[test]
fn enrolled_pods_talk_over_mutual_tls_and_the_server_sees_the_client() {
    require_root!();
    let two = TwoNodes::new();
    let client = two.node1.pod("client");
    let plain = two.node1.pod("plain");
    let server = two.node2.pod("server");
    let _server = peer_server(&server);
    write_service(&two, &server);
    two.write_workloads(
        "workloads.yaml",
        &[
            (&client, enrolled(&client, "client", "STRICT")),
            (&plain, WorkloadYaml::for_pod(&plain, "plain")),
            (&server, enrolled(&server, "server", "PERMISSIVE")),
        ],
    );
    let (a1, a2) = two.start_agents(AgentOptions::default());
    wait_serving(&a1, 1);
    wait_serving(&a2, 1);

    let vip = SocketAddr::new(SERVICE_IP.parse().unwrap(), SERVICE_PORT);
    let marker = format!("plaintext-marker-{}", std::process::id());

    // Positive control: a client outside the mesh (the server is PERMISSIVE) sends the
    // marker in plaintext, and the capture on node 1 sees it.
    let sniff = Sniffer::start(&two.node1.netns, marker.as_bytes());
    let report = plain.tcp_client_with(vip, 3, &["--message", &marker]);
    report.answers_without_errors("plaintext client");
    let capture = sniff.stop();
    assert!(
        capture.with_marker > 0,
        "the capture must see plaintext: {capture:?}"
    );
    assert_eq!(mtls_opened(&a1, "source"), 0.0);

    // The enrolled client: through the service address, over HBONE. Nothing on node 1's
    // interfaces carries the marker; the server sees the client's own address.
    let sniff = Sniffer::start(&two.node1.netns, marker.as_bytes());
    let report = client.tcp_client_with(vip, 5, &["--message", &marker]);
    report.answers_without_errors("enrolled client via the service");
    let capture = sniff.stop();
    assert!(
        capture.packets > 20,
        "the capture saw the tunnel: {capture:?}"
    );
    assert_eq!(
        capture.with_marker, 0,
        "plaintext crossed node 1's interfaces: {capture:?}"
    );
    assert_eq!(
        seen_sources(&report),
        vec![IpAddr::V4(client.ipv4); 5],
        "{}",
        report.summary()
    );
    // The application still sees the address it asked for.
    assert_eq!(
        report.peers(),
        [vip.to_string()].into(),
        "{}",
        report.summary()
    );
    assert!(mtls_opened(&a1, "source") >= 5.0, "{}", a1.metrics());
    assert!(mtls_opened(&a2, "destination") >= 5.0, "{}", a2.metrics());

    // Straight to the pod's address works the same way.
    let direct = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);
    let report = client.tcp_client(direct, 3);
    report.answers_without_errors("enrolled client to the pod address");
    assert_eq!(seen_sources(&report), vec![IpAddr::V4(client.ipv4); 3]);
    assert!(mtls_opened(&a1, "source") >= 8.0);
}

#[test]
fn policy_by_principal_and_strict_mode() {
    require_root!();
    let two = TwoNodes::new();
    let good = two.node1.pod("good");
    let bad = two.node1.pod("bad");
    let outsider = two.node1.pod("outsider");
    let server = two.node2.pod("server");
    let _server = peer_server(&server);
    let workloads = |server_mode: &str| {
        vec![
            (&good, enrolled(&good, "good", "STRICT")),
            (&bad, enrolled(&bad, "bad", "STRICT")),
            (&outsider, WorkloadYaml::for_pod(&outsider, "outsider")),
            (&server, enrolled(&server, "server", server_mode)),
        ]
    };
    two.write_workloads("workloads.yaml", &workloads("STRICT"));
    // The principal `good`, the principal `outsider` (which plaintext cannot prove) and,
    // with `by_address`, the outsider's own address.
    let allow = |by_address: bool| {
        let extra = if by_address {
            // Both of its addresses: an identity whose addresses straddle a block is not
            // matched by an ALLOW.
            format!(
                "    - source: {{ipBlocks: [\"{}/32\", \"{}/128\"]}}\n",
                outsider.ipv4, outsider.ipv6
            )
        } else {
            String::new()
        };
        format!(
            r#"
apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: only-good, namespace: default}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["cluster.local/ns/default/sa/good", "cluster.local/ns/default/sa/outsider"]}}
{extra}"#
        )
    };
    // The policy lets the outsider's address in: only STRICT keeps its plaintext out.
    for node in two.nodes() {
        node.resources().write("policy.yaml", &[allow(true)]);
    }
    let (a1, a2) = two.start_agents(AgentOptions::default());
    wait_serving(&a1, 2);
    wait_serving(&a2, 1);
    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);

    // The principal the policy names is let through; another enrolled workload is not,
    // although the kernel could not tell them apart by address class.
    let report = good.tcp_client(dst, 3);
    report.answers_without_errors("allowed principal");
    assert_eq!(seen_sources(&report), vec![IpAddr::V4(good.ipv4); 3]);
    let report = bad.tcp_client(dst, 3);
    assert!(
        report.results.iter().all(|r| r.answer.is_none()),
        "a denied principal got through: {}",
        report.summary()
    );
    let denied = a2
        .metric_value(
            "mycel_proxy_connections_failed_total",
            &[("direction", "inbound"), ("reason", "denied")],
        )
        .unwrap_or(0.0);
    assert!(denied >= 3.0, "denials counted: {}", a2.metrics());
    assert!(
        a2.log().contains("cluster.local/ns/default/sa/bad"),
        "the denial is logged with the peer's identity"
    );

    // STRICT: plaintext from a workload outside the mesh is dropped in the kernel, although
    // the policy allows its address.
    let strict_before = two.node2.kernel_counter("mesh_strict_dropped");
    let report = outsider.tcp_client_with(dst, 2, &["--timeout-ms", "500"]);
    assert!(
        report.results.iter().all(|r| r.error.is_some()),
        "plaintext reached a STRICT workload: {}",
        report.summary()
    );
    let strict_after = two.node2.kernel_counter("mesh_strict_dropped");
    assert!(
        strict_after > strict_before,
        "STRICT dropped it ({strict_before} -> {strict_after})"
    );

    // PERMISSIVE: plaintext may reach the server, but a principal can only be proven with
    // a certificate: naming the outsider's principal lets nothing in (as in Istio), an
    // ipBlock with its address does.
    for node in two.nodes() {
        node.resources().write("policy.yaml", &[allow(false)]);
    }
    two.write_workloads("workloads.yaml", &workloads("PERMISSIVE"));
    // Enrolled clients still go through the mesh once the change is in.
    let deadline = Instant::now() + Duration::from_secs(10);
    while good
        .tcp_client(dst, 1)
        .results
        .iter()
        .any(|r| r.answer.is_none())
    {
        assert!(Instant::now() < deadline, "good refused after the change");
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = outsider.tcp_client_with(dst, 2, &["--timeout-ms", "500"]);
    assert!(
        report.results.iter().all(|r| r.answer.is_none()),
        "plaintext matched a principal it cannot prove: {}",
        report.summary()
    );
    for node in two.nodes() {
        node.resources().write("policy.yaml", &[allow(true)]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = outsider.tcp_client_with(dst, 1, &["--timeout-ms", "500"]);
        if report.results.iter().all(|r| r.answer.is_some()) {
            assert_eq!(seen_sources(&report), vec![IpAddr::V4(outsider.ipv4)]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PERMISSIVE never let plaintext in by address: {}\n{}",
            report.summary(),
            a2.log_tail(30)
        );
    }
    // Enrolled clients still go through the mesh.
    good.tcp_client(dst, 2)
        .answers_without_errors("allowed principal after the change");
    drop(a1);
}

#[test]
fn rotation_keeps_a_long_connection_and_sigterm_drains() {
    require_root!();
    let two = TwoNodes::new();
    let (client, server) = strict_pair(&two);
    let _server = server.tcp_server(PORT);
    // Certificates of 4 s are renewed every 2 s.
    let opts = AgentOptions::default()
        .arg("--cert-lifetime")
        .arg("4s")
        .arg("--drain-grace")
        .arg("3s");
    let (a1, mut a2) = two.start_agents(opts);
    wait_serving(&a1, 1);
    wait_serving(&a2, 1);
    let serials = |agent: &Agent<'_>| certificates(agent).to_string();
    let before = (serials(&a1), serials(&a2));

    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);
    let (hold, first) = client.tcp_hold(dst);
    assert_eq!(first.peer.as_deref(), Some(dst.to_string().as_str()));
    std::thread::sleep(Duration::from_secs(5));
    let lines = hold.stdout_lines();
    let answers = lines.iter().filter(|l| l.contains("\"answer\"")).count();
    assert!(
        !lines.iter().any(|l| l.contains("\"event\":\"error\"")),
        "the connection broke during rotation: {lines:?}"
    );
    assert!(answers >= 30, "answers kept coming: {answers} in {lines:?}");
    let after = (serials(&a1), serials(&a2));
    assert_ne!(before.0, after.0, "node 1 renewed its certificate");
    assert_ne!(before.1, after.1, "node 2 renewed its certificate");

    // SIGTERM on the server's node: the open tunnel gets the grace period, then the agent
    // exits; it does not exit at once, nor hang.
    let started = Instant::now();
    let status = a2.stop();
    let took = started.elapsed();
    assert!(status.success(), "agent exit status {status:?}");
    assert!(
        took >= Duration::from_millis(2_500) && took < Duration::from_secs(8),
        "draining took {took:?} with a grace of 3 s"
    );
    assert!(
        a2.log().contains("mesh proxy drained"),
        "{}",
        a2.log_tail(20)
    );
    drop(hold);
}

/// Enrolls both pods (STRICT), waits until both agents serve them, and makes `count`
/// connections from the first to the second, which must all be answered.
fn enroll_and_connect(
    two: &TwoNodes,
    [client, server]: [&Pod; 2],
    agents: [&Agent<'_>; 2],
    count: u32,
) {
    two.write_workloads(
        "workloads.yaml",
        &[
            (client, enrolled(client, "client", "STRICT")),
            (server, enrolled(server, "server", "STRICT")),
        ],
    );
    for agent in agents {
        wait_serving(agent, 1);
    }
    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);
    let report = client.tcp_client(dst, count);
    assert!(
        report.results.iter().all(|r| r.answer.is_some()),
        "{}\nnode 1:\n{}\nnode 2:\n{}",
        report.summary(),
        agents[0].log_tail(30),
        agents[1].log_tail(30)
    );
}

#[test]
fn enrolling_and_leaving_at_runtime() {
    require_root!();
    let two = TwoNodes::new();
    let client = two.node1.pod("client");
    let server = two.node2.pod("server");
    let _server = peer_server(&server);
    let plain = |p: &Pod, app: &str| WorkloadYaml::for_pod(p, app);
    two.write_workloads(
        "workloads.yaml",
        &[
            (&client, plain(&client, "client")),
            (&server, plain(&server, "server")),
        ],
    );
    let (a1, a2) = two.start_agents(AgentOptions::default());
    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);
    client
        .tcp_client(dst, 2)
        .answers_without_errors("before enrolling");
    assert_eq!(mtls_opened(&a1, "source"), 0.0);

    enroll_and_connect(&two, [&client, &server], [&a1, &a2], 3);
    assert!(mtls_opened(&a1, "source") >= 3.0, "{}", a1.metrics());

    // Leaving the mesh: plain TCP again, nothing redirected.
    two.write_workloads(
        "workloads.yaml",
        &[
            (&client, plain(&client, "client")),
            (&server, plain(&server, "server")),
        ],
    );
    wait_serving(&a1, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !certificates(&a1).as_array().is_some_and(Vec::is_empty) {
        assert!(Instant::now() < deadline, "node 1 still serves the client");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = mtls_opened(&a1, "source");
    client
        .tcp_client(dst, 2)
        .answers_without_errors("after leaving");
    assert_eq!(mtls_opened(&a1, "source"), before);

    // And back in: the same agents serve the same pods again.
    enroll_and_connect(&two, [&client, &server], [&a1, &a2], 2);
    assert!(mtls_opened(&a1, "source") >= before + 2.0);
}

#[test]
fn a_restarted_agent_serves_its_workloads_again() {
    require_root!();
    let two = TwoNodes::new();
    let (client, server) = strict_pair(&two);
    let _server = peer_server(&server);
    let (mut a1, mut a2) = two.start_agents(AgentOptions::default());
    wait_serving(&a1, 1);
    wait_serving(&a2, 1);
    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);
    client
        .tcp_client(dst, 2)
        .answers_without_errors("before the restarts");
    for (agent, name) in [(&mut a1, "client's node"), (&mut a2, "server's node")] {
        agent.restart();
        wait_serving(agent, 1);
        let report = client.tcp_client(dst, 2);
        assert!(
            report.results.iter().all(|r| r.answer.is_some()),
            "after restarting the {name}'s agent: {}\n{}",
            report.summary(),
            agent.log_tail(20)
        );
        assert!(
            !agent.log().contains("Address already in use"),
            "{}",
            agent.log_tail(20)
        );
    }
}

/// An AuthorizationPolicy edit alone (no workload changes) reaches the proxy: the DENY
/// refuses new tunnels at once and closes the tunnel that was already open.
#[test]
fn a_policy_change_alone_reaches_new_and_open_tunnels() {
    require_root!();
    let two = TwoNodes::new();
    let (client, server) = strict_pair(&two);
    let _server = server.tcp_server(PORT);
    let (a1, a2) = two.start_agents(AgentOptions::default());
    wait_serving(&a1, 1);
    wait_serving(&a2, 1);
    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);
    let (hold, _) = client.tcp_hold(dst);
    assert!(
        hold.wait_for_lines(3, Duration::from_secs(5)) >= 3,
        "the open connection is answered: {:?}",
        hold.stdout_lines()
    );

    let deny = r#"
apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/client"]}
"#;
    let written = mycel_tests::testpod::now_us();
    two.node2.resources().write("deny.yaml", &[deny.to_owned()]);

    // New tunnels are refused: the client's connection to its proxy closes unanswered.
    let refused_after = loop {
        let report = client.tcp_client_with(dst, 1, &["--timeout-ms", "300"]);
        if report.results.iter().all(|r| r.answer.is_none()) {
            break mycel_tests::testpod::now_us() - written;
        }
        assert!(
            mycel_tests::testpod::now_us() - written < 5_000_000,
            "new tunnels still allowed 5 s after the DENY: {}\n{}",
            report.summary(),
            a2.log_tail(30)
        );
    };
    assert!(
        refused_after < 1_000_000,
        "new tunnels refused after {refused_after} µs"
    );

    // The open one was closed within a second of the change.
    let ended = hold
        .wait_for_line(Duration::from_secs(5), |l| {
            l.contains("\"event\":\"error\"")
        })
        .unwrap_or_else(|| {
            panic!(
                "the open tunnel outlived the DENY: {:?}\n{}",
                hold.stdout_lines(),
                a2.log_tail(30)
            )
        });
    let event: mycel_tests::testpod::HoldEvent = serde_json::from_str(&ended).expect("hold event");
    let closed_after = event.at_us.saturating_sub(written);
    assert!(
        closed_after < 1_000_000,
        "the open tunnel was closed {closed_after} µs after the DENY was written"
    );
    eprintln!(
        "after the DENY was written: new tunnels refused within {refused_after} µs, the open \
         one closed after {closed_after} µs"
    );
    let revoked = a2
        .metric_value(
            "mycel_proxy_connections_failed_total",
            &[("direction", "inbound"), ("reason", "revoked")],
        )
        .unwrap_or(0.0);
    assert!(revoked >= 1.0, "closing is counted: {}", a2.metrics());
    assert!(
        a2.log().contains("open tunnel closed"),
        "{}",
        a2.log_tail(20)
    );
    drop(a1);
}

/// A STRICT workload whose TC programs cannot be attached yet is not served by the proxy
/// (and status says why) until they are: it must not look STRICT while plaintext still
/// reaches it.
#[test]
fn a_strict_workload_is_served_only_once_strict_is_enforced() {
    require_root!();
    let two = TwoNodes::new();
    let client = two.node1.pod("client");
    let server = two.node2.pod("server");
    let _server = peer_server(&server);
    let workloads = |server_if: Option<&str>| {
        let mut w = enrolled(&server, "server", "STRICT");
        if let Some(name) = server_if {
            w = w.interface(name);
        }
        vec![
            (&client, enrolled(&client, "client", "STRICT")),
            (&server, w),
        ]
    };
    two.write_workloads("workloads.yaml", &workloads(Some("mycel-nodev0")));
    let (a1, a2) = two.start_agents(AgentOptions::default());
    wait_serving(&a1, 1);
    let status = |agent: &Agent<'_>| -> serde_json::Value {
        serde_json::from_str(&agent.get("/debug/status").1).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&a2);
        let pending = s["mesh_pending"].to_string();
        if pending.contains("server") && pending.contains("STRICT is not enforced") {
            assert_eq!(s["mesh_workloads"], 0, "served while not enforced: {s}");
            break;
        }
        assert!(Instant::now() < deadline, "no pending reason in {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Held for a while, not just late.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status(&a2)["mesh_workloads"], 0);
    let (_, text, _) = a2.cli(&["status"]);
    assert!(text.contains("not served yet"), "{text}");

    // Its interface appears in the Workload: TC attaches, then the proxy serves it.
    two.write_workloads("workloads.yaml", &workloads(None));
    wait_serving(&a2, 1);
    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);
    client
        .tcp_client(dst, 2)
        .answers_without_errors("once STRICT is enforced");
    let s = status(&a2);
    assert_eq!(s["mesh_pending"], serde_json::json!([]), "{s}");
}
