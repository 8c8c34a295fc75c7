//! `mycel identity-server` against the fake API server: it signs a node agent's request
//! only for a pod that runs on the agent's own node, as the API server says (the node of
//! the pod the agent's token is bound to, against the target pod's `spec.nodeName` and
//! ServiceAccount), and refuses and counts everything else.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mycel_agent::identity::{
    CA_CERT_FILE, Ca, SpiffeId, TrustBundle,
    server::{self, RequestError},
};
use mycel_tests::Proc;
use mycel_tests::agent::parse_metric;
use mycel_tests::fakeapi::FakeApiServer;
use serde_json::{Value, json};

const AGENT_NS: &str = "mycel-system";
const AGENT_SA: &str = "mycel";

fn pod(ns: &str, name: &str, uid: &str, node: &str, sa: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {
            "nodeName": node,
            "serviceAccountName": sa,
            "containers": [{"name": "c", "image": "example"}],
        },
        "status": {"phase": phase, "podIP": "10.0.0.1"},
    })
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("id")
}

struct Setup {
    _api: FakeApiServer,
    _dir: tempfile::TempDir,
    server: Proc,
    addr: SocketAddr,
    metrics: SocketAddr,
    trust: TrustBundle,
}

/// Ports that are free now, for the server to bind.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start() -> Setup {
    let api = FakeApiServer::start();
    api.apply_many_json([
        // The agents of node 1 and node 2.
        pod(
            AGENT_NS,
            "mycel-n1",
            "uid-agent-1",
            "node-1",
            AGENT_SA,
            "Running",
        ),
        pod(
            AGENT_NS,
            "mycel-n2",
            "uid-agent-2",
            "node-2",
            AGENT_SA,
            "Running",
        ),
        // Workloads: web on node 1, db on node 2, a finished job of web on node 2.
        pod("shop", "web-1", "uid-web-1", "node-1", "web", "Running"),
        pod("shop", "db-1", "uid-db-1", "node-2", "db", "Running"),
        pod(
            "shop",
            "web-job",
            "uid-web-job",
            "node-2",
            "web",
            "Succeeded",
        ),
        // A pod of the agents' namespace that is not an agent.
        pod(
            AGENT_NS,
            "other",
            "uid-other",
            "node-1",
            "default",
            "Running",
        ),
    ]);
    let user =
        |pod: &str, uid: &str| FakeApiServer::service_account_user(AGENT_NS, AGENT_SA, pod, uid);
    api.add_token(
        "token-node-1",
        &[server::AUDIENCE],
        user("mycel-n1", "uid-agent-1"),
    );
    api.add_token(
        "token-node-2",
        &[server::AUDIENCE],
        user("mycel-n2", "uid-agent-2"),
    );
    // The agent's token for the API server, not for the identity server.
    api.add_token(
        "token-api-audience",
        &["https://kubernetes.default.svc"],
        user("mycel-n1", "uid-agent-1"),
    );
    // A token whose pod was replaced by another of the same name.
    api.add_token(
        "token-old-pod",
        &[server::AUDIENCE],
        user("mycel-n1", "uid-agent-gone"),
    );
    // A legacy token of the agents' account, bound to no pod.
    api.add_token(
        "token-unbound",
        &[server::AUDIENCE],
        json!({"username": format!("system:serviceaccount:{AGENT_NS}:{AGENT_SA}")}),
    );
    // A workload's own token.
    api.add_token(
        "token-web",
        &[server::AUDIENCE],
        FakeApiServer::service_account_user("shop", "web", "web-1", "uid-web-1"),
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let ca_dir = dir.path().join("ca");
    Ca::create(&ca_dir, "cluster.local").expect("CA");
    let trust = TrustBundle::from_file(&ca_dir.join(CA_CERT_FILE)).expect("bundle");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let args = [
        "identity-server".to_owned(),
        "--listen".to_owned(),
        addr.to_string(),
        "--metrics-addr".to_owned(),
        metrics.to_string(),
        "--ca-dir".to_owned(),
        ca_dir.display().to_string(),
        "--kubeconfig".to_owned(),
        kubeconfig.display().to_string(),
    ];
    let server = Proc::spawn(None, None, mycel_tests::env::mycel_bin(), &args);
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the identity server did not listen on {addr}: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Setup {
        _api: api,
        _dir: dir,
        server,
        addr,
        metrics,
        trust,
    }
}

impl Setup {
    fn ask(&self, token: &str, id: &SpiffeId) -> Result<mycel_agent::identity::Svid, RequestError> {
        let tls = server::client_config(&self.trust, &id_of_server()).expect("client config");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                server::request_svid(self.addr, tls, token, id),
            )
            .await
            .expect("the request timed out")
        })
    }

    fn refused(&self, token: &str, id: &SpiffeId, status: u16, why: &str) {
        match self.ask(token, id) {
            Err(RequestError::Refused { status: s, message }) => {
                assert_eq!(s, status, "{message}");
                assert!(message.contains(why), "{message}");
            }
            other => panic!(
                "{token} for {id} was not refused: {other:?}\n{}",
                self.server.stderr()
            ),
        }
    }

    fn counted(&self, result: &str, reason: &str) -> f64 {
        let mut tcp = std::net::TcpStream::connect(self.metrics).expect("metrics");
        use std::io::{Read, Write};
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut text = String::new();
        tcp.read_to_string(&mut text).expect("read");
        parse_metric(&text, "mycel_identity_requests_total")
            .into_iter()
            .filter(|(l, _)| {
                l.get("result").map(String::as_str) == Some(result)
                    && l.get("reason").map(String::as_str) == Some(reason)
            })
            .map(|(_, v)| v)
            .sum()
    }
}

fn id_of_server() -> SpiffeId {
    id("mycel-system", "mycel-identity")
}

#[test]
fn a_node_gets_identities_of_its_own_pods_only() {
    let s = start();

    // Node 1's agent, for the pod that runs on node 1.
    let web = id("shop", "web");
    let svid = s
        .ask("token-node-1", &web)
        .expect("node 1 gets web's identity");
    assert_eq!(svid.id(), &web);
    assert!(svid.not_after() > std::time::SystemTime::now());
    assert_eq!(s.counted("issued", ""), 1.0);

    // Node 1's agent asks for db, whose only pod runs on node 2: refused and counted.
    s.refused(
        "token-node-1",
        &id("shop", "db"),
        403,
        "no pod with the service account",
    );
    assert_eq!(s.counted("refused", "not_on_node"), 1.0);
    // ... which node 2's agent gets.
    s.ask("token-node-2", &id("shop", "db"))
        .expect("node 2 gets db's identity");
    // A finished pod on node 2 does not make web an identity of node 2.
    s.refused("token-node-2", &web, 403, "node-2");
    assert_eq!(s.counted("refused", "not_on_node"), 2.0);
    // An identity nobody runs as, and one of the agents' own namespace.
    s.refused("token-node-1", &id("shop", "nobody"), 403, "no pod");
    s.refused("token-node-1", &id_of_server(), 403, "no pod");

    // Tokens that do not make a caller an agent of a node.
    s.refused("token-api-audience", &web, 401, "audience");
    s.refused("no-such-token", &web, 401, "invalid bearer token");
    s.refused("token-old-pod", &web, 403, "another pod of that name");
    s.refused("token-unbound", &web, 403, "not bound to a pod");
    s.refused("token-web", &web, 403, "not the agents' service account");
    assert_eq!(s.counted("refused", "unauthenticated"), 2.0);
    assert_eq!(s.counted("refused", "caller_pod"), 1.0);
    assert_eq!(s.counted("refused", "token_not_bound"), 1.0);
    assert_eq!(s.counted("refused", "not_an_agent"), 1.0);

    // Another trust domain is never signed.
    let elsewhere = SpiffeId::new("other.example", "shop", "web").expect("id");
    s.refused("token-node-1", &elsewhere, 400, "trust domain");
    assert_eq!(s.counted("issued", ""), 2.0);
}

/// The agent's status as JSON.
fn agent_status(agent: &mycel_tests::Agent<'_>) -> Value {
    let (_, body) = agent.get("/debug/status");
    serde_json::from_str(&body).unwrap_or_default()
}

/// The SPIFFE IDs the agent holds certificates for, and their issuers.
fn agent_certificates(agent: &mycel_tests::Agent<'_>) -> Vec<(String, String)> {
    agent_status(agent)["certificates"]
        .as_array()
        .map(|certs| {
            certs
                .iter()
                .map(|c| {
                    (
                        c["id"].as_str().unwrap_or_default().to_owned(),
                        c["issuer"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "timed out waiting for {what}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node agent holding only the trust bundle gets the certificates of its node's mesh
/// workloads from a running identity server (with a token read again after a refusal),
/// none for another node's, and the server refuses that agent another node's identity.
#[test]
fn an_agent_without_the_ca_key_gets_its_pods_certificates_from_the_identity_server() {
    mycel_tests::require_root!();
    use mycel_tests::cluster::{Cluster, pod_object};
    let node = mycel_tests::Node::new();
    let cluster = Cluster::start(&node);

    // The CA key is only in the identity server's directory; the agent's holds ca.pem.
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_dir = dir.path().join("ca");
    let ca = Ca::create(&ca_dir, "cluster.local").expect("CA");
    let bundle_dir = dir.path().join("bundle");
    std::fs::create_dir(&bundle_dir).expect("bundle dir");
    std::fs::copy(ca_dir.join(CA_CERT_FILE), bundle_dir.join(CA_CERT_FILE)).expect("ca.pem");

    // The agent's pod on this node; web runs here and db on another node, both enrolled.
    let web = node.pod_with_cgroup("web-0", "pod2222cccc-0000-4000-8000-000000000003");
    // A process in the pod: the agent finds a pod's network namespace through them.
    let _web_server = web.tcp_server(8080);
    let mut web_obj = pod_object(&web, &cluster.node_name, "default", "web");
    web_obj["metadata"]["labels"]["mycel.dev/mode"] = json!("mesh");
    let mut db_obj = pod(
        "default",
        "db-1",
        "uid-db-1",
        "node-elsewhere",
        "db",
        "Running",
    );
    db_obj["metadata"]["labels"] = json!({"app": "db", "mycel.dev/mode": "mesh"});
    db_obj["status"]["podIP"] = json!("10.244.99.9");
    db_obj["status"]["podIPs"] = json!([{"ip": "10.244.99.9"}]);
    cluster.api.apply_many_json([
        mycel_tests::cluster::namespace_object("default", &[]),
        mycel_tests::cluster::namespace_object(AGENT_NS, &[]),
        pod(
            AGENT_NS,
            "mycel-agent",
            "uid-agent",
            &cluster.node_name,
            AGENT_SA,
            "Running",
        ),
        web_obj,
        db_obj,
    ]);
    cluster.api.add_token(
        "agent-token",
        &[server::AUDIENCE],
        FakeApiServer::service_account_user(AGENT_NS, AGENT_SA, "mycel-agent", "uid-agent"),
    );
    // The kubelet has not written the right token yet: the first requests are refused.
    let token = dir.path().join("token");
    std::fs::write(&token, "not-the-token\n").expect("token");

    let listen = "127.0.0.1:15012";
    let server = Proc::spawn(
        Some(&node.netns),
        None,
        mycel_tests::env::mycel_bin(),
        &[
            "identity-server",
            "--listen",
            listen,
            "--metrics-addr",
            "127.0.0.1:15092",
            "--ca-dir",
            &ca_dir.display().to_string(),
            "--kubeconfig",
            &node.dir().join("kubeconfig").display().to_string(),
        ],
    );
    let agent = cluster
        .agent_options()
        .identity_server(listen, &token, &id_of_server().to_string(), &bundle_dir)
        .start(&node);
    let log = || {
        format!(
            "{}\nstatus: {}\nidentity server:\n{}",
            agent.log_tail(40),
            agent_status(&agent),
            server.stderr()
        )
    };

    // Refused while the token is wrong: retried, counted, shown in status; no certificate.
    let web_id = id("default", "web").to_string();
    wait_for(
        "the refusal in status",
        Duration::from_secs(20),
        || {
            agent_status(&agent)["certificate_errors"][&web_id]
                .as_str()
                .is_some_and(|e| e.contains("refused"))
        },
        log,
    );
    assert!(
        agent.metric_sum_where(
            "mycel_certificate_issuances_total",
            &[("signer", "server"), ("result", "failed")]
        ) >= 1.0
    );
    assert!(agent_certificates(&agent).is_empty(), "{}", log());

    // The kubelet rotates the token: the next attempt reads it and gets web's certificate.
    std::fs::write(&token, "agent-token").expect("token");
    wait_for(
        "web's certificate",
        Duration::from_secs(20),
        || !agent_certificates(&agent).is_empty(),
        log,
    );
    let certs = agent_certificates(&agent);
    assert_eq!(
        certs,
        vec![(web_id.clone(), ca.subject())],
        "only the local pod's identity, signed by the server's CA"
    );
    assert!(
        agent_status(&agent)["certificate_errors"]
            .as_object()
            .is_none_or(|e| e.is_empty())
    );
    assert!(
        agent.metric_sum_where(
            "mycel_certificate_issuances_total",
            &[("signer", "server"), ("result", "issued")]
        ) >= 1.0
    );
    // The agent never held the key.
    assert!(!bundle_dir.join(mycel_agent::identity::CA_KEY_FILE).exists());

    // With the agent's own token, db (another node's pod) is refused.
    let trust = TrustBundle::from_file(&bundle_dir.join(CA_CERT_FILE)).expect("bundle");
    let result = mycel_tests::netns::run_in(&node.netns, move || {
        let tls = server::client_config(&trust, &id_of_server()).expect("client config");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                server::request_svid(
                    listen.parse().expect("addr"),
                    tls,
                    "agent-token",
                    &id("default", "db"),
                ),
            )
            .await
            .expect("the request timed out")
        })
    });
    match result {
        Err(RequestError::Refused { status, message }) => {
            assert_eq!(status, 403, "{message}");
            assert!(
                message.contains("node-elsewhere") || message.contains(&cluster.node_name),
                "{message}"
            );
        }
        other => panic!("db's identity was not refused: {other:?}\n{}", log()),
    }
    // Still only web.
    assert_eq!(agent_certificates(&agent), vec![(web_id, ca.subject())]);
}
