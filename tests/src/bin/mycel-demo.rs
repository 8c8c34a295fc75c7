//! `mycel-demo`: what `cargo xtask demo` runs. Builds a small node on this host (network
//! namespaces for a client and two `web` backends), starts the agent standalone from a
//! directory of YAML, and shows service load balancing done in the kernel at connect()
//! time: connections spreading over the backends, the application seeing the service
//! address, scaling up and down, a broken file that changes nothing, an AuthorizationPolicy
//! that lets one client in and keeps another out with their flows, mutual TLS between the
//! enrolled client and web (the intruder's plaintext dropped), and the CLI. Everything
//! it created is removed at the end, also when a step fails.

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use mycel_tests::{
    Agent, Node, ResourceDir, WorkloadYaml, env,
    scenario::{BACKEND_PORT, Backends, WEB_PORT, WEB_VIP4, backend_addr, web_ipv4, web_vip4},
};

fn main() -> ExitCode {
    if !env::privileged_or_skip("mycel-demo") {
        eprintln!("the demo needs root: run `sudo cargo xtask demo`");
        return ExitCode::FAILURE;
    }
    // A failed step panics with its reason; the node's Drop cleans up on the way out.
    match std::panic::catch_unwind(demo) {
        Ok(()) => {
            println!("\n✔ demo finished; everything it created has been removed");
            ExitCode::SUCCESS
        }
        Err(_) => {
            eprintln!("\n✘ the demo failed (see above); everything it created has been removed");
            ExitCode::FAILURE
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n── {n}. {text}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

fn demo() {
    step(
        1,
        "a node with three pods, each a network namespace with its own cgroup",
    );
    let node = Node::new();
    let mut web = Backends::start(&node, "web", 2);
    let client = node.pod("client");
    println!("   node namespace {}", node.netns);
    for pod in web.pods.iter().chain([&client]) {
        println!(
            "   pod {:<8} {:<10} cgroup {}",
            pod.name,
            pod.ipv4,
            pod.cgroup.display()
        );
    }

    step(
        2,
        "the agent, standalone, reading Kubernetes YAML from a directory",
    );
    let resources: &ResourceDir = node.resources();
    let pods: Vec<_> = web.pods.iter().collect();
    resources.write("web.yaml", &web_ipv4(&pods));
    println!(
        "   {} holds Service web ({WEB_VIP4}:{WEB_PORT}) and its EndpointSlice",
        resources.file("web.yaml").display()
    );
    let agent = node.start_agent();
    println!("   agent ready; `mycel services`:");
    print!("{}", indent(&cli(&agent, &["services"])));

    step(3, "40 connections from the client to the ClusterIP");
    let counts = spread(&client, 40);
    print_counts(&counts);
    assert_eq!(counts.len(), 2, "both backends should answer: {counts:?}");
    let peers = client.tcp_client(web_vip4(), 1).peers();
    println!("   getpeername() in the client says {peers:?}: the application sees the service");
    assert_eq!(
        peers.into_iter().collect::<Vec<_>>(),
        vec![web_vip4().to_string()]
    );

    step(4, "scale up: add web-3 to the EndpointSlice");
    let web3 = web.add(&node, "web-3");
    let pods: Vec<_> = web.pods.iter().collect();
    resources.write("web.yaml", &web_ipv4(&pods));
    let took = wait_for_web(&agent, &pods);
    println!(
        "   the maps held three backends {} ms after the file was written",
        took.as_millis()
    );
    let counts = spread(&client, 60);
    print_counts(&counts);
    assert!(
        counts.contains_key(&web3.name),
        "web-3 should answer: {counts:?}"
    );

    step(5, "scale down: remove web-1");
    let pods: Vec<_> = web.pods.iter().filter(|p| p.name != "web-1").collect();
    resources.write("web.yaml", &web_ipv4(&pods));
    wait_for_web(&agent, &pods);
    let counts = spread(&client, 40);
    print_counts(&counts);
    assert!(
        !counts.contains_key("web-1"),
        "web-1 was removed: {counts:?}"
    );

    step(
        6,
        "a broken file: rejected with its name and line, nothing else changes",
    );
    resources.write_raw(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
    );
    agent.wait_for("the error to be counted", Duration::from_secs(5), |a| {
        a.metric_sum("mycel_source_errors_total") >= 1.0
    });
    if let Some(line) = agent.log().lines().find(|l| l.contains("broken.yaml")) {
        println!("   agent log: {}", line.trim());
    }
    let counts = spread(&client, 20);
    print_counts(&counts);
    resources.remove("broken.yaml");
    agent.wait_for("the problem to be gone", Duration::from_secs(5), |a| {
        a.metric_sum("mycel_source_errors_current") == 0.0
    });
    println!("   broken.yaml removed: no problem stands any more");

    step(
        7,
        "policy: only the client's identity may call web (an Istio-style AuthorizationPolicy)",
    );
    let intruder = node.pod("intruder");
    let mut workloads: Vec<(&mycel_tests::Pod, &str)> = web
        .pods
        .iter()
        .filter(|p| p.name != "web-1")
        .map(|p| (p, "web"))
        .collect();
    workloads.extend([(&client, "client"), (&intruder, "intruder")]);
    resources.write_workloads(&workloads);
    resources.write_raw("policy.yaml", POLICY);
    print!("{}", indent(POLICY));
    agent.wait_for("the policy to be in force", Duration::from_secs(5), |a| {
        a.metric_sum("mycel_policy_loaded") == 1.0 && a.metric_sum("mycel_policy_endpoints") >= 2.0
    });
    let allowed = client.tcp_client_with(web_vip4(), 10, &["--timeout-ms", "500"]);
    let denied = intruder.tcp_client_with(web_vip4(), 3, &["--timeout-ms", "300"]);
    let ok = |r: &mycel_tests::ClientReport| r.results.iter().filter(|r| r.error.is_none()).count();
    println!("   client   → web: {} of 10 answered", ok(&allowed));
    println!(
        "   intruder → web: {} of 3 answered (dropped by policy in the kernel)",
        ok(&denied)
    );
    assert_eq!(
        ok(&allowed),
        10,
        "the client is allowed: {}",
        allowed.summary()
    );
    assert_eq!(
        ok(&denied),
        0,
        "the intruder is denied: {}",
        denied.summary()
    );

    step(8, "`mycel flows`: the allowed and the denied flows");
    agent.wait_for("the drops to be counted", Duration::from_secs(5), |a| {
        a.metric_sum("hubble_drop_total") >= 1.0
    });
    for from in ["client", "intruder"] {
        print!(
            "{}",
            indent(&cli(&agent, &["flows", "--from", from, "--limit", "3"]))
        );
    }

    step(
        9,
        "mutual TLS: enroll client and web in the mesh (mycel.dev/mode: mesh, STRICT)",
    );
    let docs: Vec<String> = workloads
        .iter()
        .map(|(pod, app)| {
            let w = WorkloadYaml::for_pod(pod, app);
            if *app == "intruder" {
                w.to_yaml()
            } else {
                w.label("mycel.dev/mode", "mesh")
                    .label("mycel.dev/mtls-mode", "STRICT")
                    .to_yaml()
            }
        })
        .collect();
    resources.write("workloads.yaml", &docs);
    agent.wait_for(
        "the proxy to serve client and web",
        Duration::from_secs(10),
        |a| {
            // One certificate per identity: web's and the client's.
            serde_json::from_str::<serde_json::Value>(&a.get("/debug/status").1)
                .ok()
                .and_then(|v| v["certificates"].as_array().map(Vec::len))
                .is_some_and(|n| n >= 2)
        },
    );
    let mtls = |a: &Agent<'_>| {
        // One series per destination workload (web-2, web-3): their sum.
        a.metric_sum_where(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    let before = mtls(&agent);
    let allowed = client.tcp_client_with(web_vip4(), 10, &["--timeout-ms", "1000"]);
    let denied = intruder.tcp_client_with(web_vip4(), 3, &["--timeout-ms", "300"]);
    println!(
        "   client   → web: {} of 10 answered, through HBONE tunnels (HTTP/2 CONNECT over mutual TLS)",
        ok(&allowed)
    );
    println!(
        "   intruder → web: {} of 3 answered (plaintext to a STRICT workload is dropped)",
        ok(&denied)
    );
    let tunnels = mtls(&agent) - before;
    println!(
        "   istio_tcp_connections_opened_total{{connection_security_policy=\"mutual_tls\"}} +{tunnels}"
    );
    assert_eq!(
        ok(&allowed),
        10,
        "the client goes through the mesh: {}",
        allowed.summary()
    );
    assert_eq!(
        ok(&denied),
        0,
        "the intruder is dropped: {}",
        denied.summary()
    );
    assert!(tunnels >= 10.0, "the connections went through the proxy");

    step(
        10,
        "`mycel status`: programs, counters, and the workloads' certificates",
    );
    print!("{}", indent(&cli(&agent, &["status"])));

    step(11, "cleaning up: agent, namespaces, cgroups, pinned maps");
}

/// Waits until the agent's maps hold exactly `pods` as web's backends; returns how long.
fn wait_for_web(agent: &Agent<'_>, pods: &[&mycel_tests::Pod]) -> Duration {
    let backends: Vec<String> = pods
        .iter()
        .map(|p| backend_addr(p.ipv4, BACKEND_PORT))
        .collect();
    agent.wait_for_backends("default/web", WEB_PORT, &backends)
}

/// What step 7 applies: web may be called by the client's identity on port 8080 only.
const POLICY: &str = "apiVersion: mycel.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]
    to: [{operation: {ports: [\"8080\"]}}]
";

fn cli(agent: &Agent<'_>, args: &[&str]) -> String {
    let (status, stdout, stderr) = agent.cli(args);
    assert!(status.success(), "mycel {args:?} failed: {stderr}");
    stdout
}

fn spread(client: &mycel_tests::Pod, n: u32) -> BTreeMap<String, usize> {
    client
        .tcp_client(web_vip4(), n)
        .answers_without_errors("connections to the ClusterIP")
}

fn print_counts(counts: &BTreeMap<String, usize>) {
    let total: usize = counts.values().sum();
    for (name, n) in counts {
        println!(
            "   {name:<8} {n:>3} of {total}  {}",
            "█".repeat(*n * 40 / total.max(1))
        );
    }
}
