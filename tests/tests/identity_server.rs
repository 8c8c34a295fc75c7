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
