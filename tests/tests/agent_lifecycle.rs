//! The agent's lifecycle around a working datapath: restarts that keep connections and
//! routing, bad input that keeps the last good state, detaching on exit, and the CLI.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use mycel_tests::scenario::{BACKEND_PORT, Backends, backend_addr, web_ipv4, web_vip4};
use mycel_tests::testpod::{ClientReport, HoldEvent};
use mycel_tests::{Agent, AgentOptions, EndpointSliceYaml, Node, Pod, ServiceYaml, require_root};

/// Asserts every attempt succeeded through `vip` and only `backends` answered.
fn expect_routed(report: &ClientReport, vip: SocketAddr, backends: &[String], what: &str) {
    let answers = report.answers_without_errors(what);
    assert!(
        report.peers().iter().all(|p| *p == vip.to_string()),
        "{what}: every socket should report {vip} as its peer; {}",
        report.summary()
    );
    let unexpected: Vec<&String> = answers.keys().filter(|a| !backends.contains(a)).collect();
    assert!(
        unexpected.is_empty(),
        "{what}: answers from {unexpected:?}, expected only {backends:?}"
    );
}

/// Every file below the bpffs directory with its inode: a pin that was re-created has a
/// new inode.
fn pins(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if let Ok(meta) = entry.metadata() {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                out.insert(rel, meta.ino());
            }
        }
    }
    out
}

fn hold_events(hold: &mycel_tests::Proc) -> Vec<HoldEvent> {
    hold.stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A held connection keeps answering: waits for `more` new answers and checks there was
/// no error.
fn expect_hold_alive(hold: &mycel_tests::Proc, more: usize, what: &str) {
    let before = hold.stdout_lines().len();
    let now = hold.wait_for_lines(before + more - 1, Duration::from_secs(3));
    let events = hold_events(hold);
    let errors: Vec<&HoldEvent> = events
        .iter()
        .filter(|e| e.event != "answer" && e.event != "connected")
        .collect();
    assert!(
        errors.is_empty() && now >= before + more,
        "{what}: the held connection broke or stalled ({before} → {now} lines); events \
         other than answers: {errors:?}; stderr: {}",
        hold.stderr()
    );
}

fn restart_keeps_the_datapath(kill: bool) {
    let node = Node::new();
    let backends = Backends::start(&node, "web", 2);
    let pods: Vec<&Pod> = backends.pods.iter().collect();
    node.resources().write("web.yaml", &web_ipv4(&pods));
    let mut agent = node.start_agent();
    let client = node.pod("client");
    let vip = web_vip4();
    let names = backends.names();
    expect_routed(
        &client.tcp_client(vip, 10),
        vip,
        &names,
        "before the restart",
    );
    let programmed = agent
        .metric_value("mycel_backends_programmed", &[])
        .expect("mycel_backends_programmed in /metrics");
    let pins_before = pins(&node.bpffs);
    assert!(
        !pins_before.is_empty(),
        "nothing pinned under {}",
        node.bpffs.display()
    );

    let (hold, connected) = client.tcp_hold(vip);
    assert_eq!(
        connected.peer,
        Some(vip.to_string()),
        "held connection's peer"
    );
    expect_hold_alive(&hold, 2, "before stopping the agent");

    let how = if kill { "SIGKILL" } else { "SIGTERM" };
    if kill {
        agent.kill();
    } else {
        let status = agent.stop();
        assert!(
            status.success(),
            "the agent exited with {status} on SIGTERM, expected 0"
        );
    }
    expect_routed(
        &client.tcp_client(vip, 20),
        vip,
        &names,
        &format!("new connections while the agent is down after {how}"),
    );
    expect_hold_alive(&hold, 2, &format!("while the agent is down after {how}"));

    agent.start();
    let after = agent.metric_value("mycel_backends_programmed", &[]);
    assert_eq!(
        after,
        Some(programmed),
        "mycel_backends_programmed right after the restart: the state should be taken over"
    );
    // Maps are taken over (same pinned objects); links may be replaced make-before-break
    // (a new program attached before the old link is released), but all must be there.
    let pins_after = pins(&node.bpffs);
    let recreated: Vec<&String> = pins_before
        .iter()
        .filter(|(path, ino)| !path.starts_with("links/") && pins_after.get(*path) != Some(ino))
        .map(|(path, _)| path)
        .collect();
    let names_before: Vec<&String> = pins_before.keys().collect();
    let names_after: Vec<&String> = pins_after.keys().collect();
    assert!(
        recreated.is_empty() && names_before == names_after,
        "the restart should take over the pinned maps: re-created or removed {recreated:?}; \
         before {pins_before:?}, after {pins_after:?}"
    );
    let want: Vec<String> = backends
        .pods
        .iter()
        .map(|p| backend_addr(p.ipv4, BACKEND_PORT))
        .collect();
    agent.wait_for_backends("default/web", 80, &want);
    expect_routed(
        &client.tcp_client(vip, 20),
        vip,
        &names,
        &format!("after {how} and restart"),
    );
    expect_hold_alive(&hold, 2, &format!("after {how} and restart"));
}

#[test]
fn agent_sigkill_keeps_connections_and_routing() {
    require_root!();
    restart_keeps_the_datapath(true);
}

#[test]
fn agent_sigterm_keeps_connections_and_routing() {
    require_root!();
    restart_keeps_the_datapath(false);
}

/// Writes a bad version of `file`, then checks the error is counted and logged (naming
/// the file and `mentions`), and the last good state still routes.
#[expect(
    clippy::too_many_arguments,
    reason = "a test step with its expectations"
)]
fn expect_rejected(
    node: &Node,
    agent: &Agent<'_>,
    client: &Pod,
    names: &[String],
    file: &str,
    content: &str,
    case: &str,
    mentions: &[&str],
) {
    let errors_before = agent.metric_sum("mycel_source_errors_total");
    let log_before = agent.log().len();
    node.resources().write_raw(file, content);
    agent.wait_for(
        &format!("mycel_source_errors_total to grow past {errors_before} after {case}"),
        Duration::from_secs(3),
        |a| a.metric_sum("mycel_source_errors_total") > errors_before,
    );
    let log = agent.log();
    let new_log = log.get(log_before..).unwrap_or_default();
    for needle in std::iter::once(file).chain(mentions.iter().copied()) {
        assert!(
            new_log.contains(needle),
            "after {case}, the agent's log should name {needle:?}; it logged:\n{new_log}"
        );
    }
    let vip = web_vip4();
    expect_routed(
        &client.tcp_client(vip, 10),
        vip,
        names,
        &format!("the last good state after {case}"),
    );
    let services = agent.services();
    assert!(
        services
            .iter()
            .any(|s| s.name == "web" && s.backends.len() == names.len()),
        "after {case}, /debug/services should still show web with {} backends: {services:?}",
        names.len()
    );
}

#[test]
fn malformed_input_keeps_the_last_good_state() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 2);
    let pods: Vec<&Pod> = backends.pods.iter().collect();
    let good = web_ipv4(&pods).join("\n---\n");
    node.resources().write_raw("web.yaml", &good);
    let agent = node.start_agent();
    let client = node.pod("client");
    let names = backends.names();
    expect_routed(
        &client.tcp_client(web_vip4(), 10),
        web_vip4(),
        &names,
        "the good state",
    );

    let web = |port: u32, ip: &str| {
        ServiceYaml::new("web", ip)
            .port("http", port, "TCP", BACKEND_PORT.into())
            .to_yaml()
    };
    let slice = web_ipv4(&pods)[1].clone();
    let cases: [(&str, String, &str, &[&str]); 5] = [
        (
            "web.yaml",
            format!("{good}\n---\nkind: Service\nmetadata: {{name: [unclosed\n"),
            "(a) broken YAML syntax in web.yaml",
            &[],
        ),
        (
            "extra.yaml",
            "apiVersion: example.com/v1\nkind: Gizmo\nmetadata: {name: g, namespace: default}\n"
                .to_owned(),
            "(b) an unknown kind in extra.yaml",
            &["Gizmo"],
        ),
        (
            "web.yaml",
            format!("{}\n---\n{slice}", web(70_000, "10.96.0.10")),
            "(c) a Service port of 70000 in web.yaml",
            &["port", "70000"],
        ),
        (
            "web.yaml",
            format!("{}\n---\n{slice}", web(80, "10.96.0.999")),
            "(d) clusterIP 10.96.0.999 in web.yaml",
            &["clusterIP", "10.96.0.999"],
        ),
        (
            "extra.yaml",
            EndpointSliceYaml::ipv4("ghost-v4", "ghost")
                .endpoint(backends.pods[0].ipv4)
                .port("http", BACKEND_PORT.into(), "TCP")
                .to_yaml(),
            "(e) an EndpointSlice for a missing Service in extra.yaml",
            &["ghost"],
        ),
    ];
    for (file, content, case, mentions) in &cases {
        expect_rejected(
            &node, &agent, &client, &names, file, content, case, mentions,
        );
        agent.wait_for(
            &format!("mycel_source_errors_current to count the problem of {case}"),
            Duration::from_secs(3),
            |a| a.metric_sum("mycel_source_errors_current") >= 1.0,
        );
    }

    // Fixing the files is applied: web.yaml good again with one backend, extra.yaml a new
    // service.
    node.resources().write("web.yaml", &web_ipv4(&pods[..1]));
    node.resources().write(
        "extra.yaml",
        &[
            ServiceYaml::new("fixed", "10.96.0.20")
                .port("http", 80, "TCP", BACKEND_PORT.into())
                .to_yaml(),
            EndpointSliceYaml::ipv4("fixed-v4", "fixed")
                .endpoint(backends.pods[1].ipv4)
                .port("http", BACKEND_PORT.into(), "TCP")
                .to_yaml(),
        ],
    );
    agent.wait_for_backends(
        "default/fixed",
        80,
        &[backend_addr(backends.pods[1].ipv4, BACKEND_PORT)],
    );
    agent.wait_for_backends(
        "default/web",
        80,
        &[backend_addr(backends.pods[0].ipv4, BACKEND_PORT)],
    );
    let fixed: SocketAddr = "10.96.0.20:80".parse().expect("address");
    expect_routed(
        &client.tcp_client(fixed, 10),
        fixed,
        &names[1..],
        "the fixed service",
    );
    expect_routed(
        &client.tcp_client(web_vip4(), 10),
        web_vip4(),
        &names[..1],
        "web after the fix",
    );
    // Nothing is rejected any more: the standing-problems gauge is back to zero.
    agent.wait_for(
        "mycel_source_errors_current to return to 0",
        Duration::from_secs(3),
        |a| a.metric_sum("mycel_source_errors_current") == 0.0,
    );
}

#[test]
fn detach_on_exit_removes_programs_and_pins() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 1);
    let pods: Vec<&Pod> = backends.pods.iter().collect();
    node.resources().write("web.yaml", &web_ipv4(&pods));
    let mut agent = AgentOptions::default().arg("--detach-on-exit").start(&node);
    let client = node.pod("client");
    let vip = web_vip4();
    expect_routed(
        &client.tcp_client(vip, 5),
        vip,
        &backends.names(),
        "with the agent running",
    );

    let status = agent.stop();
    assert!(
        status.success(),
        "the agent exited with {status} on SIGTERM, expected 0"
    );
    let left = pins(&node.bpffs);
    assert!(
        left.is_empty(),
        "pins left under {} after --detach-on-exit: {left:?}",
        node.bpffs.display()
    );
    let report = client.tcp_client_with(vip, 3, &["--timeout-ms", "300"]);
    for r in &report.results {
        assert!(
            r.error.is_some() && r.answer.is_none(),
            "after --detach-on-exit, connects to {vip} must no longer be translated; {}",
            report.summary()
        );
        assert!(r.connect_us < 1_000_000, "{}", report.summary());
    }
}

#[test]
fn cli_lists_services_and_status() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 2);
    let pods: Vec<&Pod> = backends.pods.iter().collect();
    node.resources().write("web.yaml", &web_ipv4(&pods));
    let agent = node.start_agent();

    let (status, stdout, stderr) = agent.cli(&["services", "--output", "json"]);
    assert!(
        status.success(),
        "`mycel services --output json` failed ({status}): {stderr}"
    );
    let list: Vec<mycel_tests::ServiceInfo> = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("`mycel services --output json` is not a service list ({e}): {stdout}")
    });
    let mut want: Vec<String> = backends
        .pods
        .iter()
        .map(|p| backend_addr(p.ipv4, BACKEND_PORT))
        .collect();
    want.sort();
    assert!(
        list.iter().any(|s| s.namespace == "default"
            && s.name == "web"
            && s.address == "10.96.0.10"
            && s.port == 80
            && s.sorted_backends() == want),
        "`mycel services --output json` should list default/web 10.96.0.10:80 with backends \
         {want:?}: {stdout}"
    );

    let (status, stdout, stderr) = agent.cli(&["services"]);
    assert!(
        status.success(),
        "`mycel services` failed ({status}): {stderr}"
    );
    for needle in ["web", "10.96.0.10"] {
        assert!(
            stdout.contains(needle),
            "`mycel services` should show {needle:?}: {stdout}"
        );
    }

    let (status, stdout, stderr) = agent.cli(&["status"]);
    assert!(
        status.success(),
        "`mycel status` failed ({status}): {stderr}"
    );
    let text = stdout.to_lowercase();
    assert!(
        text.contains("connect4") && text.contains("connect6"),
        "`mycel status` should mention the attached programs (connect4, connect6): {stdout}"
    );
}
