//! A CA rotation across two nodes while traffic flows, following the README's procedure:
//! add the new root to every node, switch signing to the new CA, remove the old root. Each
//! node has its own CA directory (as each reads its own copy of the Secret), the agents
//! read them again at run time, and no agent restarts. Throughout, a long-lived tunnel
//! keeps answering and a stream of new connections keeps being answered; after each change
//! on each node, a client that has no pooled connection yet proves that new handshakes
//! succeed in that state (the pool would otherwise keep using the first handshake).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mycel_agent::identity::{CA_CERT_FILE, CA_KEY_FILE, Ca};
use mycel_tests::twonode::TwoNodes;
use mycel_tests::{Agent, AgentOptions, ClientReport, Pod, Proc, WorkloadYaml, require_root};

const PORT: u16 = 8080;
/// Fresh clients: one before the rotation, then one after each of the six changes (three
/// steps on two nodes).
const FRESH_CLIENTS: usize = 7;
/// Bound on waiting for an agent to apply a change of its CA directory.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn peer_server(pod: &Pod) -> Proc {
    pod.peer_server(PORT)
}

fn enrolled(pod: &Pod, app: &str) -> WorkloadYaml {
    WorkloadYaml::in_mesh(pod, app, "STRICT")
}

fn status(agent: &Agent<'_>) -> serde_json::Value {
    agent.status_json()
}

/// Waits until `agent`'s status satisfies `done`.
fn wait_status(agent: &Agent<'_>, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let s = status(agent);
        if done(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {APPLY_TIMEOUT:?}; status {s}\n{}",
            agent.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn subjects(s: &serde_json::Value) -> Vec<String> {
    s["trust_bundle"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["subject"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every certificate of the agent was issued by `issuer`.
fn all_issued_by(s: &serde_json::Value, issuer: &str, n: usize) -> bool {
    s["certificates"].as_array().is_some_and(|certs| {
        certs.len() >= n && certs.iter().all(|c| c["issuer"].as_str() == Some(issuer))
    })
}

/// Writes a CA directory: `certs` in `ca.pem` (in that order) and `key` as `ca-key.pem`.
fn write_ca_dir(dir: &Path, certs: &[&Ca], key: &[u8]) {
    let pem: String = certs.iter().map(|c| c.cert_pem()).collect();
    // The key first, then the certificate, each replaced whole: a reader may see the
    // new key with the old certificate for a moment, which it must refuse and then
    // take once both are there.
    let put = |name: &str, data: &[u8]| {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, data).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    };
    put(CA_KEY_FILE, key);
    put(CA_CERT_FILE, pem.as_bytes());
}

fn mtls_handshake_failures(agent: &Agent<'_>) -> f64 {
    agent.metric_sum("mycel_proxy_handshakes_total")
        - agent.metric_sum_where("mycel_proxy_handshakes_total", &[("result", "ok")])
}

#[test]
fn ca_rotation_across_two_nodes_without_a_failed_connection_or_a_restart() {
    require_root!();
    let two = TwoNodes::new();
    let steady = two.node1.pod("steady");
    let holder = two.node1.pod("holder");
    let fresh: Vec<Pod> = (0..FRESH_CLIENTS)
        .map(|i| two.node1.pod(&format!("fresh{i}")))
        .collect();
    let server = two.node2.pod("server");
    let _server = peer_server(&server);
    let mut workloads = vec![
        (&steady, enrolled(&steady, "steady")),
        (&holder, enrolled(&holder, "holder")),
        (&server, enrolled(&server, "server")),
    ];
    for (i, pod) in fresh.iter().enumerate() {
        workloads.push((pod, enrolled(pod, &format!("fresh{i}"))));
    }
    two.write_workloads("workloads.yaml", &workloads);

    // The old CA in both nodes' directories; the new one made aside.
    let dirs = tempfile::tempdir().expect("temp dir");
    let (dir1, dir2, aside) = (
        dirs.path().join("node1"),
        dirs.path().join("node2"),
        dirs.path().join("new"),
    );
    let old = Ca::create(&dir1, "cluster.local").expect("old CA");
    let old_key = std::fs::read(dir1.join(CA_KEY_FILE)).expect("key");
    std::fs::create_dir_all(&dir2).expect("dir");
    write_ca_dir(&dir2, &[&old], &old_key);
    let new = Ca::create(&aside, "cluster.local").expect("new CA");
    let new_key = std::fs::read(aside.join(CA_KEY_FILE)).expect("key");
    assert_ne!(
        old.subject(),
        new.subject(),
        "each CA has a name of its own"
    );

    let opts = |dir: &Path| {
        AgentOptions::default()
            .ca_dir(dir)
            .arg("--ca-reload-interval")
            .arg("200ms")
    };
    let a1 = opts(&dir1).start(&two.node1);
    let a2 = opts(&dir2).start(&two.node2);
    let local1 = FRESH_CLIENTS + 2;
    wait_status(&a1, "node 1 serves its workloads", |s| {
        all_issued_by(s, &old.subject(), local1)
            && s["mesh_workloads"].as_u64() >= Some(local1 as u64)
    });
    wait_status(&a2, "node 2 serves its workload", |s| {
        all_issued_by(s, &old.subject(), 1) && s["mesh_workloads"].as_u64() >= Some(1)
    });
    let pids = (a1.pid(), a2.pid());

    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), PORT);
    let fresh_connections = |k: usize, what: &str| {
        fresh[k]
            .tcp_client(dst, 3)
            .answers_without_errors(&format!("a new client after {what}"));
    };
    fresh_connections(0, "the start");
    let (hold, _) = holder.tcp_hold(dst);

    let stop = AtomicBool::new(false);
    let reports: Vec<ClientReport> = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut reports = Vec::new();
            // Bounded: the rotation below takes well under a minute.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                reports.push(steady.tcp_client_with(dst, 10, &["--interval-ms", "20"]));
            }
            reports
        });

        // Stops the traffic also when a step fails, so the failure shows at once.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stopping = StopOnDrop(&stop);
        let mut k = 1;
        let mut step = |agent: &Agent<'_>, dir: &Path, certs: &[&Ca], key: &[u8], what: &str| {
            write_ca_dir(dir, certs, key);
            let want: Vec<String> = certs.iter().map(|c| c.subject()).collect();
            let signer = if key == new_key.as_slice() {
                &new
            } else {
                &old
            };
            let local = if std::ptr::eq(agent, &a1) { local1 } else { 1 };
            wait_status(agent, what, |s| {
                let mut have = subjects(s);
                let mut want = want.clone();
                have.sort();
                want.sort();
                have == want
                    && s["signing_ca"].as_str() == Some(signer.subject().as_str())
                    && all_issued_by(s, &signer.subject(), local)
                    && s["ca_reload"]["error"].is_null()
            });
            fresh_connections(k, what);
            k += 1;
        };
        // 1. The new root on every node, signing still with the old CA.
        step(
            &a1,
            &dir1,
            &[&old, &new],
            &old_key,
            "node 1 trusts the new root",
        );
        step(
            &a2,
            &dir2,
            &[&old, &new],
            &old_key,
            "node 2 trusts the new root",
        );
        // 2. Signing with the new CA, the old root still trusted.
        step(
            &a1,
            &dir1,
            &[&new, &old],
            &new_key,
            "node 1 signs with the new CA",
        );
        step(
            &a2,
            &dir2,
            &[&new, &old],
            &new_key,
            "node 2 signs with the new CA",
        );
        // 3. The old root removed.
        step(&a1, &dir1, &[&new], &new_key, "node 1 dropped the old root");
        step(&a2, &dir2, &[&new], &new_key, "node 2 dropped the old root");

        drop(stopping);
        traffic.join().expect("the traffic thread panicked")
    });

    // Not one failed connection, and the long-lived tunnel kept answering.
    assert!(
        reports.len() >= 3,
        "traffic ran through the rotation: {}",
        reports.len()
    );
    for (i, r) in reports.iter().enumerate() {
        r.answers_without_errors(&format!("steady traffic, run {i}"));
    }
    let lines = hold.stdout_lines();
    assert!(
        !lines.iter().any(|l| l.contains("\"event\":\"error\"")),
        "the long-lived connection broke during the rotation: {lines:?}"
    );
    let answers = lines.iter().filter(|l| l.contains("\"answer\"")).count();
    assert!(
        answers >= 10,
        "the long-lived connection kept answering: {lines:?}"
    );
    // Every tunnel between the agents agreed on the post-quantum hybrid group.
    for agent in [&a1, &a2] {
        let kx = |group: &str| {
            agent
                .metric_value("mycel_tls_key_exchanges_total", &[("group", group)])
                .unwrap_or(0.0)
        };
        assert!(kx("X25519MLKEM768") >= 8.0, "{}", agent.metrics());
        assert_eq!(kx("X25519"), 0.0, "{}", agent.metrics());
    }
    assert_eq!(mtls_handshake_failures(&a1), 0.0, "{}", a1.metrics());
    assert_eq!(mtls_handshake_failures(&a2), 0.0, "{}", a2.metrics());
    // No restart: the same processes all along, and the changes counted as applied.
    assert_eq!((a1.pid(), a2.pid()), pids);
    // At least the three steps (a poll between the two files of a step may apply a
    // consistent state on the way), and nothing refused.
    for agent in [&a1, &a2] {
        let applied = agent
            .metric_value("mycel_ca_reloads_total", &[("result", "applied")])
            .unwrap_or(0.0);
        assert!(applied >= 3.0, "{}", agent.metrics());
        assert_eq!(
            agent.metric_value("mycel_ca_reload_failing", &[]),
            Some(0.0),
            "{}",
            agent.metrics()
        );
    }

    drop(hold);
}
