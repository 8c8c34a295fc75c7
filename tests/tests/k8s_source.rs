//! The Kubernetes source against a fake API server that speaks real HTTP list/watch: the
//! agent's kube-rs watchers list, watch, resume, relist and write policy status exactly as
//! they would against a cluster.

use std::time::{Duration, Instant};

use mycel_tests::cluster::{Cluster, namespace_object, pod_object};
use mycel_tests::scenario::{self, BACKEND_PORT, Backends, WEB_PORT, backend_addr, web_ipv4};
use mycel_tests::{Agent, Node, Resources, require_root};
use serde_json::{Value, json};

/// Map writes and deletes the agent has made so far.
fn map_operations(agent: &Agent<'_>) -> f64 {
    agent.metric_sum("mycel_map_operations_total")
}

fn web_backends(pods: &[&mycel_tests::Pod]) -> Vec<String> {
    pods.iter()
        .map(|p| backend_addr(p.ipv4, BACKEND_PORT))
        .collect()
}

/// The same scenario as the file source's scaling test, driven through the API server:
/// both sources behave alike.
#[test]
fn kubernetes_source_scales_a_service_like_the_file_source() {
    require_root!();
    let node = Node::new();
    let cluster = Cluster::start(&node);
    scenario::scale_up_and_down(&node, &cluster, || cluster.start_agent(&node));
}

#[test]
fn not_ready_until_every_kind_is_listed() {
    require_root!();
    let node = Node::new();
    let cluster = Cluster::start(&node);
    let backends = Backends::start(&node, "web", 1);
    cluster.write("web.yaml", &web_ipv4(&[&backends.pods[0]]));
    // As if the CRD were not installed: policies cannot be listed.
    cluster.api.set_missing("authorizationpolicies", true);
    let mut agent = cluster.agent_options().no_wait().start(&node);

    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let (status, body) = agent.try_get("/readyz").unwrap_or((0, "no answer".into()));
        assert_ne!(status, 200, "ready before policies could be listed: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        agent.log().contains("authorizationpolicies.mycel.dev"),
        "the failing list is not reported by name:\n{}",
        agent.log_tail(20)
    );
    cluster.api.set_missing("authorizationpolicies", false);
    agent.wait_ready(Duration::from_secs(15));
    agent.wait_for_backends("default/web", WEB_PORT, &web_backends(&[&backends.pods[0]]));
    assert_eq!(
        agent.metric_value("mycel_services_programmed", &[]),
        Some(1.0)
    );
}

/// A watch that breaks resumes without a list; one whose resourceVersion expired (410)
/// lists again. Neither loses a change or writes a map entry that did not change.
#[test]
fn watch_disconnects_and_relists_lose_nothing_and_write_nothing_spurious() {
    require_root!();
    let node = Node::new();
    let cluster = Cluster::start(&node);
    let backends = Backends::start(&node, "web", 3);
    let [a, b, c] = [0, 1, 2].map(|i| &backends.pods[i]);
    cluster.write("web.yaml", &web_ipv4(&[a, b]));
    cluster.write_pods(&[(a, "web"), (b, "web"), (c, "web")]);
    let agent = cluster.start_agent(&node);
    agent.wait_for_backends("default/web", WEB_PORT, &web_backends(&[a, b]));
    let lists_before = cluster.api.stats("endpointslices").lists;
    let ops = map_operations(&agent);

    // 1. Connections drop: every watcher resumes from its resourceVersion.
    let watches = cluster.api.stats("endpointslices").watches;
    cluster.api.disconnect_watches();
    assert!(
        cluster.api.wait_until(Duration::from_secs(10), |api| {
            api.stats("endpointslices").watches > watches
        }),
        "the endpointslices watch was not resumed"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cluster.api.stats("endpointslices").lists,
        lists_before,
        "a dropped watch must resume, not list again"
    );
    assert_eq!(
        map_operations(&agent),
        ops,
        "a resumed watch wrote to the maps"
    );

    // 2. While the history is compacted and watches are cut, the service scales to c and
    //    another service is deleted: the resumed watch gets 410 and lists again.
    cluster.write(
        "other.yaml",
        &[mycel_tests::ServiceYaml::new("other", "10.96.0.20")
            .port("http", 80, "TCP", 8080)
            .to_yaml()],
    );
    agent.wait_for("the other service", Duration::from_secs(5), |a| {
        a.services().iter().any(|s| s.name == "other")
    });
    let ops = map_operations(&agent);
    cluster.api.pause_watches(true);
    cluster.write("web.yaml", &web_ipv4(&[c]));
    cluster.remove("other.yaml");
    cluster.api.compact();
    cluster.api.disconnect_watches();
    cluster.api.pause_watches(false);
    agent.wait_for_backends("default/web", WEB_PORT, &web_backends(&[c]));
    agent.wait_for("the deleted service to go", Duration::from_secs(5), |a| {
        !a.services().iter().any(|s| s.name == "other")
    });
    assert!(
        cluster.api.stats("endpointslices").lists > lists_before,
        "an expired resourceVersion must make the watcher list again"
    );
    let written = map_operations(&agent) - ops;
    assert!(written > 0.0, "the changes were not written");

    // 3. A relist of unchanged objects writes nothing.
    // Bookmarks keep a watcher's resourceVersion current: pause them, move the version on
    // elsewhere, and compact, so the services watcher's version is expired.
    let ops = map_operations(&agent);
    let lists = cluster.api.stats("services").lists;
    cluster.api.pause_watches(true);
    cluster.api.apply_json(namespace_object("bump", &[]));
    cluster.api.compact();
    cluster.api.disconnect_watches();
    cluster.api.pause_watches(false);
    assert!(
        cluster.api.wait_until(Duration::from_secs(10), |api| {
            api.stats("services").lists > lists
        }),
        "no relist after compaction"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        map_operations(&agent),
        ops,
        "a relist of unchanged objects wrote to the maps"
    );
    // Traffic still flows to c.
    let client = node.pod("client");
    let report = client.tcp_client(scenario::web_vip4(), 10);
    let answers = scenario::expect_all_via(&report, scenario::web_vip4(), "after the relists");
    assert_eq!(answers.keys().collect::<Vec<_>>(), [&c.name]);
}

fn policy(name: &str, ip_block: &str) -> Value {
    json!({
        "apiVersion": "mycel.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"ipBlocks": [ip_block]}}]}],
        },
    })
}

/// `(status, reason, message, observedGeneration)` of a policy's `Accepted` condition.
fn accepted(cluster: &Cluster, name: &str) -> Option<(String, String, String, i64)> {
    let obj = cluster
        .api
        .get_json("authorizationpolicies", "default", name)?;
    let conditions = obj.pointer("/status/conditions")?.as_array()?.clone();
    let c = conditions.iter().find(|c| c["type"] == "Accepted")?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
        c["observedGeneration"].as_i64().unwrap_or(-1),
    ))
}

fn patches_of(cluster: &Cluster, name: &str) -> usize {
    cluster
        .api
        .patch_log()
        .iter()
        .filter(|p| p.name == name)
        .count()
}

#[test]
fn policy_status_says_accepted_or_names_the_invalid_field() {
    require_root!();
    let node = Node::new();
    let cluster = Cluster::start(&node);
    let web = node.pod_with_cgroup("web-0", "pod0000aaaa-0000-4000-8000-000000000001");
    let _server = web.tcp_server(BACKEND_PORT);
    cluster.api.apply_json(namespace_object("default", &[]));
    cluster.write_pods(&[(&web, "web")]);
    cluster.api.apply_json(policy("good", "10.0.0.0/24"));
    cluster.api.apply_json(policy("bad", "10.0.0.0/33"));
    // A policy of a namespace with no workload on this node is not this node's to judge.
    cluster.api.apply_json(json!({
        "apiVersion": "mycel.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "elsewhere", "namespace": "other"},
        "spec": {"action": "DENY", "rules": [{}]},
    }));
    let mut agent = cluster.start_agent(&node);

    agent.wait_for(
        "both policies to have a status",
        Duration::from_secs(5),
        |_| accepted(&cluster, "good").is_some() && accepted(&cluster, "bad").is_some(),
    );
    let (status, reason, _, generation) = accepted(&cluster, "good").unwrap_or_default();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"));
    assert_eq!(generation, 1, "observedGeneration");
    let (status, reason, message, _) = accepted(&cluster, "bad").unwrap_or_default();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
    assert!(
        message.contains("spec.rules[0].from[0].source.ipBlocks[0]")
            && message.contains("10.0.0.0/33"),
        "the message must name the field and value: {message}"
    );
    assert!(
        agent
            .log()
            .contains("spec.rules[0].from[0].source.ipBlocks[0]"),
        "the agent's log must name the field"
    );
    // good and elsewhere; bad is not loaded.
    assert_eq!(agent.metric_value("mycel_policy_loaded", &[]), Some(2.0));

    // Written once each, not again and again (the watch brings the agent's own write back).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        patches_of(&cluster, "good"),
        1,
        "status writes of an unchanged policy"
    );
    assert_eq!(
        patches_of(&cluster, "bad"),
        1,
        "status writes of an unchanged policy"
    );
    assert_eq!(
        patches_of(&cluster, "elsewhere"),
        0,
        "a policy selecting no local workload"
    );

    // The good policy breaks: its last good version stays in force, its status says why.
    cluster.api.apply_json(policy("good", "not-an-address"));
    agent.wait_for("the broken policy's status", Duration::from_secs(5), |_| {
        accepted(&cluster, "good").is_some_and(|(s, _, _, g)| s == "False" && g == 2)
    });
    assert_eq!(
        agent.metric_value("mycel_policy_loaded", &[]),
        Some(2.0),
        "the last good version stays in force"
    );
    // And across a restart of the agent, which finds it broken: its saved last good
    // version (not the never-accepted `bad`) is in force, and it is still reported.
    agent.restart();
    assert_eq!(
        agent.metric_value("mycel_policy_loaded", &[]),
        Some(2.0),
        "the last good version survives a restart\n{}",
        agent.log_tail(20)
    );
    assert!(
        agent.log().contains("keeping its last good version"),
        "{}",
        agent.log_tail(20)
    );
    assert!(agent.metric_sum("mycel_source_errors_current") >= 2.0);
    // Fixed: accepted again.
    cluster.api.apply_json(policy("bad", "10.0.0.0/16"));
    agent.wait_for("the fixed policy's status", Duration::from_secs(5), |_| {
        accepted(&cluster, "bad").is_some_and(|(s, _, _, g)| s == "True" && g == 2)
    });
    assert_eq!(agent.metric_value("mycel_policy_loaded", &[]), Some(3.0));
}

#[test]
fn local_pods_get_policy_programs_on_their_interface() {
    require_root!();
    let node = Node::new();
    let cluster = Cluster::start(&node);
    let web = node.pod_with_cgroup("web-0", "pod1111bbbb-0000-4000-8000-000000000002");
    let _server = web.tcp_server(BACKEND_PORT);
    let client = node.pod("client");
    cluster.write_pods(&[(&web, "web")]);
    // A pod of another node: its addresses get its identity, nothing is attached for it.
    let mut remote = pod_object(&client, "some-other-node", "default", "client");
    remote["metadata"]["name"] = json!("remote-0");
    remote["status"]["podIPs"] = json!([{"ip": "10.244.9.9"}]);
    remote["status"]["podIP"] = json!("10.244.9.9");
    cluster.api.apply_json(remote);
    let agent = cluster
        .agent_options()
        .arg("--log")
        .arg("info,mycel_agent::source=debug")
        .start(&node);
    agent.wait_for(
        "TC programs on the web pod's interface",
        Duration::from_secs(5),
        |a| {
            let (_, body) = a.get("/debug/status");
            body.contains(&web.host_if)
        },
    );
    let (_, status) = agent.get("/debug/status");
    assert!(
        !status.contains(&client.host_if),
        "only local pods the API lists get programs: {status}"
    );

    // The pod goes away: its programs are detached.
    cluster.write_pods(&[]);
    agent.wait_for("detach from the deleted pod", Duration::from_secs(5), |a| {
        let (_, body) = a.get("/debug/status");
        !body.contains(&web.host_if)
    });
}
