//! Whole tunnels over loopback: a client stream → [`Outbound`] → [`Inbound`] → an echo
//! server, with a test CA issuing SPIFFE certificates. Loopback addresses stand in for
//! workloads: 127.0.0.2 is the client pod, 127.0.0.3 the server pod (the inbound listener
//! and the echo server both listen there), 127.0.0.4 a client the policy denies, 127.0.0.6
//! another workload of the server's node, 127.0.0.7 an attacker's address.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{Method, Request, StatusCode};
use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::*;
use crate::identity::{SpiffeId, SpiffeServerVerifier};

const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const SERVER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const DENIED_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
const ATTACKER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
/// The trust domain of every test identity.
const TRUST_DOMAIN: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/client/sa/app";
const SERVER_ID: &str = "spiffe://cluster.local/ns/server/sa/echo";
const DENIED_ID: &str = "spiffe://cluster.local/ns/evil/sa/mallory";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
}

struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let der = params
            .self_signed(&key)
            .expect("CA certificate")
            .der()
            .clone();
        Self { params, key, der }
    }

    fn leaf(&self, spiffe: &str, expired: bool) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = vec![SanType::URI(
            spiffe.to_string().try_into().expect("SPIFFE ID is IA5"),
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).expect("CA into root store");
        Arc::new(roots)
    }
}

/// The identity module's own server verifier: chain to the test CA, SPIFFE ID of the
/// trust domain, and the expected one when given.
fn server_verifier(
    roots: Arc<RootCertStore>,
    expected: Option<&str>,
) -> Option<Arc<SpiffeServerVerifier>> {
    let expected = expected.map(SpiffeId::parse).transpose().ok()?;
    Some(Arc::new(SpiffeServerVerifier::new(
        roots,
        &provider(),
        TRUST_DOMAIN,
        expected,
    )))
}

fn client_config(roots: Arc<RootCertStore>, leaf: Option<&Leaf>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(server_verifier(roots, None).expect("verifier"));
    let mut config = match leaf {
        Some(l) => builder
            .with_client_auth_cert(l.chain.clone(), l.key.clone_key())
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

struct TestTls {
    roots: Arc<RootCertStore>,
    workloads: HashMap<IpAddr, (String, Leaf)>,
}

impl Tls for TestTls {
    fn server_config(&self, local_ip: IpAddr) -> Option<Arc<ServerConfig>> {
        let (_, leaf) = self.workloads.get(&local_ip)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .expect("client verifier");
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())
            .expect("server certificate");
        // No ALPN on purpose: the proxy must add `h2` itself.
        Some(Arc::new(config))
    }

    fn client_config(&self, src_ip: IpAddr, expected: Option<&str>) -> Option<Arc<ClientConfig>> {
        let (_, leaf) = self.workloads.get(&src_ip)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(server_verifier(self.roots.clone(), expected)?)
            .with_client_auth_cert(leaf.chain.clone(), leaf.key.clone_key())
            .expect("client certificate");
        Some(Arc::new(config))
    }

    fn peer_identity(&self, certs: &[CertificateDer<'_>]) -> Result<String, String> {
        crate::identity::peer_identity(certs)
            .map(|id| id.to_string())
            .map_err(|e| e.to_string())
    }

    fn workload_identity(&self, ip: IpAddr) -> Option<String> {
        self.workloads.get(&ip).map(|(id, _)| id.clone())
    }
}

/// Denies the identities it lists; the list changes as a policy would.
#[derive(Default)]
struct Denied(Mutex<HashSet<String>>);

impl Denied {
    fn deny(&self, id: &str) {
        self.0.lock().expect("lock").insert(id.to_owned());
    }
}

impl Authorizer for Denied {
    fn allow(&self, peer: &str, _peer_ip: IpAddr, _dst: SocketAddr) -> Result<(), String> {
        if self.0.lock().expect("lock").contains(peer) {
            return Err(format!("{peer} is denied by policy"));
        }
        Ok(())
    }
}

/// Local workloads: their addresses and a name per workload.
struct Local(HashMap<IpAddr, &'static str>);

impl LocalWorkloads for Local {
    fn is_local(&self, ip: IpAddr) -> bool {
        self.0.contains_key(&ip)
    }

    fn same_workload(&self, a: IpAddr, b: IpAddr) -> bool {
        matches!((self.0.get(&a), self.0.get(&b)), (Some(x), Some(y)) if x == y)
    }
}

/// Echoes every byte, then after the client's EOF sends `BYE` and closes: the answer
/// after the half-close proves the other direction stayed open.
async fn echo_server(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(b"BYE").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// The client and server workloads by address, as the app keeps them for metrics.
fn workload_names() -> Arc<crate::flows::Directory> {
    let names = crate::flows::Directory::new();
    for (ip, id, namespace, name) in [
        (CLIENT_IP, CLIENT_ID, "client", "app"),
        (SERVER_IP, SERVER_ID, "server", "echo"),
    ] {
        names.upsert_workload(
            ip,
            crate::flows::WorkloadInfo {
                namespace: namespace.into(),
                name: name.into(),
                service_account: name.into(),
                principal: id.into(),
                app: Some(name.into()),
            },
        );
    }
    Arc::new(names)
}

/// The value of the one series of `name` whose labels contain every `needle`.
fn series_value(registry: &Registry, name: &str, needles: &[&str]) -> Option<u64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode metrics");
    let found: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect();
    assert!(found.len() <= 1, "several series match: {found:?}");
    found
        .first()
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().expect("a counter value"))
}

struct Env {
    ca: Ca,
    /// Where the proxy's metrics are registered, with the flow metrics' `istio_tcp_*`.
    registry: Registry,
    metrics: Arc<ProxyMetrics>,
    inbound: Inbound,
    context: Arc<InboundContext>,
    authz: Arc<Denied>,
    outbound: Arc<Outbound>,
    echo: SocketAddr,
    client_leaf: Leaf,
}

async fn env(cfg: Config) -> Env {
    env_with(cfg.clone(), cfg).await
}

/// Separate settings for the two proxies, as on two nodes.
async fn env_with(inbound_cfg: Config, outbound_cfg: Config) -> Env {
    let ca = Ca::new("mycel test CA");
    let workloads = HashMap::from([
        (
            CLIENT_IP,
            (CLIENT_ID.to_string(), ca.leaf(CLIENT_ID, false)),
        ),
        (
            SERVER_IP,
            (SERVER_ID.to_string(), ca.leaf(SERVER_ID, false)),
        ),
        (
            DENIED_IP,
            (DENIED_ID.to_string(), ca.leaf(DENIED_ID, false)),
        ),
    ]);
    let tls: Arc<dyn Tls> = Arc::new(TestTls {
        roots: ca.roots(),
        workloads,
    });
    let mut registry = Registry::default();
    let tcp = crate::flows::metrics::Metrics::new(&mut registry).istio_tcp();
    let metrics = Arc::new(ProxyMetrics::new(&mut registry, tcp, workload_names()));
    let listener = TcpListener::bind((SERVER_IP, 0))
        .await
        .expect("bind inbound");
    let authz = Arc::new(Denied::default());
    authz.deny(DENIED_ID);
    let context = Arc::new(InboundContext::new(
        inbound_cfg,
        tls.clone(),
        authz.clone(),
        Arc::new(Local(HashMap::from([
            (SERVER_IP, "server"),
            (OTHER_IP, "other"),
        ]))),
        Arc::new(HostConnector),
        metrics.clone(),
    ));
    let inbound = Inbound::spawn(listener, context.clone()).expect("inbound");
    let outbound = Arc::new(Outbound::new(outbound_cfg, tls, metrics.clone()));
    let client_leaf = ca.leaf(CLIENT_ID, false);
    Env {
        ca,
        registry,
        metrics,
        inbound,
        context,
        authz,
        outbound,
        echo: echo_server(SERVER_IP).await,
        client_leaf,
    }
}

impl Env {
    fn request(&self, src_ip: IpAddr) -> OutboundRequest {
        OutboundRequest {
            src_ip,
            dst: self.echo,
            hbone: self.inbound.local_addr(),
            expected_identity: Some(SERVER_ID.to_string()),
        }
    }

    /// A client connection handed to the outbound proxy; returns the client's end.
    fn open(&self, req: OutboundRequest) -> (DuplexStream, JoinHandle<Result<CopyStats, Error>>) {
        let (client, proxy_side) = tokio::io::duplex(64 * 1024);
        let outbound = self.outbound.clone();
        let task = tokio::spawn(async move { outbound.proxy(proxy_side, req).await });
        (client, task)
    }

    /// Sends an arbitrary request over a fresh HBONE connection made with `config`.
    async fn raw_request(
        &self,
        config: Arc<ClientConfig>,
        req: Request<()>,
    ) -> Result<StatusCode, String> {
        let tcp = TcpStream::connect(self.inbound.local_addr())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(SERVER_IP.into()), tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = send.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
        let (resp, _stream) = send
            .send_request(req, false)
            .map_err(|e| format!("h2 request: {e}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .map_err(|_| "no response in 10 s".to_string())?
            .map_err(|e| format!("h2 response: {e}"))?;
        Ok(resp.status())
    }

    /// Waits (bounded) until the failure counter reaches `n`.
    async fn wait_failures(&self, direction: &'static str, reason: &'static str, n: u64) {
        for _ in 0..250 {
            if self.metrics.failures_with(direction, reason) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "{direction} failures for {reason}: {} after 5 s, expected {n}",
            self.metrics.failures_with(direction, reason)
        );
    }
}

fn connect_request(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .expect("request")
}

/// Writes `msg` and reads back the same number of bytes.
async fn roundtrip(client: &mut DuplexStream, msg: &[u8]) {
    client.write_all(msg).await.expect("write to tunnel");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .expect("read echo");
    assert_eq!(back, msg);
}

/// Half-closes and expects `BYE` from the echo server, then the end of the stream.
async fn finish(mut client: DuplexStream, task: JoinHandle<Result<CopyStats, Error>>) -> CopyStats {
    client.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("end within 10 s")
        .expect("read to end");
    assert_eq!(rest, b"BYE");
    task.await.expect("proxy task").expect("tunnel ok")
}

fn payload(len: usize) -> Vec<u8> {
    let marker = b"PLAINTEXT-MARKER-";
    (0..len).map(|i| marker[i % marker.len()]).collect()
}

#[tokio::test]
async fn large_transfer_and_half_close() {
    let env = env(Config::default()).await;
    let (client, task) = env.open(env.request(CLIENT_IP));
    let data = payload(3 * 1024 * 1024 + 7);
    let (mut r, mut w) = tokio::io::split(client);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write payload");
        w.shutdown().await.expect("half-close");
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got))
        .await
        .expect("transfer within 30 s")
        .expect("read back");
    writer.await.expect("writer");
    assert_eq!(got.len(), data.len() + 3);
    assert!(got[..data.len()] == data[..], "payload corrupted");
    assert_eq!(&got[data.len()..], b"BYE", "answer after half-close lost");
    let stats = task.await.expect("proxy task").expect("tunnel ok");
    assert_eq!(stats.a_to_b, data.len() as u64);
    assert_eq!(stats.b_to_a, data.len() as u64 + 3);
    // Both proxies count the tunnel in Istio's families, as mutual TLS between the
    // certificates' identities and the workloads the addresses belong to. The server
    // side's peer is the client node's address here (the test connector does not keep the
    // client's), so its source is named by the certificate alone.
    let client_id = format!("source_principal=\"{CLIENT_ID}\"");
    let server_id = format!("destination_principal=\"{SERVER_ID}\"");
    let at_server = [
        "reporter=\"destination\"",
        "connection_security_policy=\"mutual_tls\"",
        &client_id,
        "source_workload_namespace=\"client\"",
        &server_id,
        "destination_workload=\"echo\"",
        "destination_workload_namespace=\"server\"",
        "destination_app=\"echo\"",
    ];
    let at_client = [
        "reporter=\"source\"",
        "connection_security_policy=\"mutual_tls\"",
        &client_id,
        "source_workload=\"app\"",
        "source_workload_namespace=\"client\"",
        &server_id,
        "destination_workload=\"echo\"",
    ];
    let value = |name, needles: &[&str]| series_value(&env.registry, name, needles);
    // The server side counts the close just after its last write reached the client.
    for _ in 0..250 {
        if value("istio_tcp_connections_closed_total", &at_server) == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for side in [&at_server[..], &at_client[..]] {
        assert_eq!(value("istio_tcp_connections_opened_total", side), Some(1));
        assert_eq!(value("istio_tcp_connections_closed_total", side), Some(1));
        // Istio's `received` is what the destination received: the client's request.
        assert_eq!(
            value("istio_tcp_received_bytes_total", side),
            Some(data.len() as u64)
        );
        assert_eq!(
            value("istio_tcp_sent_bytes_total", side),
            Some(data.len() as u64 + 3)
        );
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &env.registry).expect("encode");
    let opened = text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .count();
    assert_eq!(opened, 2, "one series per reporter and no other:\n{text}");
}

#[tokio::test]
async fn tunnels_share_one_connection() {
    let env = env(Config {
        max_connections_per_destination: 1,
        ..Config::default()
    })
    .await;
    let (mut a, task_a) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut a, b"first").await;
    let (mut b, task_b) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut b, b"second").await;
    roundtrip(&mut a, b"first again").await;
    assert_eq!(env.metrics.handshakes_with(metrics::OUTBOUND, "ok"), 1);
    assert_eq!(env.metrics.handshakes_with(metrics::INBOUND, "ok"), 1);
    assert_eq!(env.outbound.pooled_connections(), 1);
    finish(a, task_a).await;
    finish(b, task_b).await;
    // Another client workload has its own certificate, hence its own connection.
    let denied = env.open(env.request(DENIED_IP));
    let _ = denied.1.await;
    assert_eq!(env.metrics.handshakes_with(metrics::OUTBOUND, "ok"), 2);
}

#[tokio::test]
async fn concurrent_tunnels_spread_over_a_few_connections_and_sequential_ones_reuse() {
    let env = env(Config {
        max_connections_per_destination: 2,
        ..Config::default()
    })
    .await;
    let mut open = Vec::new();
    for i in 0..3u8 {
        let (mut c, t) = env.open(env.request(CLIENT_IP));
        roundtrip(&mut c, &[b'a' + i; 10]).await;
        open.push((c, t));
    }
    // Two busy connections at most; the third tunnel shares the less busy one.
    assert_eq!(env.metrics.handshakes_with(metrics::OUTBOUND, "ok"), 2);
    assert_eq!(env.outbound.pooled_connections(), 2);
    for (c, t) in open {
        finish(c, t).await;
    }
    // One tunnel at a time: an idle pooled connection is reused, none is opened.
    for i in 0..3u8 {
        let (mut c, t) = env.open(env.request(CLIENT_IP));
        roundtrip(&mut c, &[b'x' + i; 10]).await;
        finish(c, t).await;
    }
    assert_eq!(env.metrics.handshakes_with(metrics::OUTBOUND, "ok"), 2);
}

#[tokio::test]
async fn streams_beyond_the_server_limit_open_another_connection() {
    let cfg = Config {
        max_streams_per_connection: 2,
        max_connections_per_destination: 1,
        ..Config::default()
    };
    let env = env(cfg).await;
    let mut open = Vec::new();
    for i in 0..3u8 {
        let (mut c, t) = env.open(env.request(CLIENT_IP));
        roundtrip(&mut c, &[b'a' + i; 10]).await;
        open.push((c, t));
    }
    assert_eq!(env.metrics.handshakes_with(metrics::OUTBOUND, "ok"), 2);
    for (c, t) in open {
        finish(c, t).await;
    }
}

#[tokio::test]
async fn wrong_server_identity_is_refused() {
    let env = env(Config::default()).await;
    let mut req = env.request(CLIENT_IP);
    req.expected_identity = Some("spiffe://cluster.local/ns/other/sa/db".to_string());
    let (_client, task) = env.open(req);
    let err = task
        .await
        .expect("proxy task")
        .expect_err("tunnel must fail");
    assert!(matches!(err, Error::Tls { .. }), "{err}");
    assert_eq!(
        env.metrics
            .failures_with(metrics::OUTBOUND, "tls_handshake"),
        1
    );
}

#[tokio::test]
async fn bad_inputs_are_refused_without_harming_a_good_tunnel() {
    let env = env(Config::default()).await;
    let (mut good, good_task) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut good, b"hello").await;
    let roots = env.ca.roots();

    // TLS-level refusals: TLS 1.3 clients learn of a rejected certificate only when they
    // use the connection, so each must fail somewhere before a response arrives.
    let no_cert = client_config(roots.clone(), None);
    let stranger = Ca::new("unknown CA").leaf(CLIENT_ID, false);
    let unknown_ca = client_config(roots.clone(), Some(&stranger));
    let expired = client_config(roots.clone(), Some(&env.ca.leaf(CLIENT_ID, true)));
    for (i, config) in [no_cert, unknown_ca, expired].into_iter().enumerate() {
        let r = env
            .raw_request(config, connect_request(&env.echo.to_string()))
            .await;
        assert!(r.is_err(), "case {i}: bad client certificate got {r:?}");
        env.wait_failures(metrics::INBOUND, "tls_handshake", i as u64 + 1)
            .await;
    }

    // Garbage instead of a ClientHello.
    let mut raw = TcpStream::connect(env.inbound.local_addr())
        .await
        .expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x16\x03")
        .await
        .expect("write garbage");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink))
        .await
        .expect("server closes a garbage connection");
    env.wait_failures(metrics::INBOUND, "tls_handshake", 4)
        .await;

    // Authenticated but not allowed.
    let (_denied, denied_task) = env.open(env.request(DENIED_IP));
    let err = denied_task
        .await
        .expect("proxy task")
        .expect_err("denied peer");
    assert!(matches!(err, Error::Refused { status: 403, .. }), "{err}");
    env.wait_failures(metrics::INBOUND, "denied", 1).await;

    // Well-formed HBONE, bad requests.
    let good_cfg = client_config(roots.clone(), Some(&env.client_leaf));
    let not_local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), env.echo.port());
    let cases = [
        (connect_request(&not_local.to_string()), 400, "not_local"),
        (connect_request("example.com:80"), 400, "bad_authority"),
        (
            Request::builder()
                .method(Method::GET)
                .uri(format!("https://{}/", env.echo))
                .body(())
                .expect("request"),
            405,
            "method_not_allowed",
        ),
    ];
    for (req, status, reason) in cases {
        let got = env.raw_request(good_cfg.clone(), req).await;
        assert_eq!(
            got,
            Ok(StatusCode::from_u16(status).expect("status")),
            "{reason}"
        );
        env.wait_failures(metrics::INBOUND, reason, 1).await;
    }

    roundtrip(&mut good, b"still here").await;
    finish(good, good_task).await;
}

/// Time from TCP connect to the `200` of a CONNECT over a new HBONE connection.
async fn new_tunnel_time(env: &Env, config: Arc<ClientConfig>) -> Duration {
    let started = std::time::Instant::now();
    let status = env
        .raw_request(config, connect_request(&env.echo.to_string()))
        .await
        .expect("a new tunnel");
    assert_eq!(status, StatusCode::OK);
    started.elapsed()
}

#[tokio::test]
async fn a_slowloris_from_one_source_does_not_delay_other_clients() {
    // Default settings: the defaults must hold up.
    let env = env(Config::default()).await;
    let good = client_config(env.ca.roots(), Some(&env.client_leaf));
    let baseline = new_tunnel_time(&env, good.clone()).await;

    // 1,000 connections from one address that never send a byte, and more all the time
    // while the good client measures (at most 3,000, for at most 20 s). The attacker runs on
    // a thread and runtime of its own, as it would on a machine of its own: what is measured
    // is the proxy's treatment of the good client, not the attacker's use of the test's
    // only thread.
    let target = env.inbound.local_addr();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let attacker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("attacker runtime");
        rt.block_on(async move {
            let mut idle = Vec::new();
            let open_one = || async {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket
                    .bind(SocketAddr::new(ATTACKER_IP, 0))
                    .expect("bind attacker");
                // Bounded: once the measurement is over, the server may stop accepting.
                match tokio::time::timeout(Duration::from_millis(500), socket.connect(target)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                }
            };
            for _ in 0..1000 {
                if let Ok(s) = open_one().await {
                    idle.push(s);
                }
            }
            let ready = idle.len();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while idle.len() < 3000
                && tokio::time::Instant::now() < deadline
                && !stopped.load(std::sync::atomic::Ordering::Relaxed)
            {
                if let Ok(s) = open_one().await {
                    idle.push(s);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ready, idle.len())
        })
    });
    // Let the first wave land.
    for _ in 0..500 {
        if env
            .metrics
            .failures_with(metrics::INBOUND, "handshake_limit")
            >= 900
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut times = Vec::new();
    for _ in 0..40 {
        times.push(new_tunnel_time(&env, good.clone()).await);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Joined off the runtime, which must keep serving the attacker's last connects.
    let (ready, total) = tokio::task::spawn_blocking(move || attacker.join())
        .await
        .expect("join task")
        .expect("attacker thread");
    times.sort();
    let p99 = times[times.len() * 99 / 100];
    assert!(
        ready >= 990,
        "the attacker opened {ready} of 1000 connections"
    );
    assert!(
        p99 < Duration::from_millis(50),
        "new tunnel p99 {p99:?} under a slowloris (alone: {baseline:?}; all: {times:?})"
    );
    let limited = env
        .metrics
        .failures_with(metrics::INBOUND, "handshake_limit");
    assert!(
        limited >= 900,
        "connections beyond the per-source bound closed: {limited} of {total}"
    );
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_first_byte_timeout() {
    let cfg = Config {
        first_byte_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let env = env(cfg).await;
    let mut silent = TcpStream::connect(env.inbound.local_addr())
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut sink))
        .await
        .expect("the server closes a silent connection")
        .expect("read");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    env.wait_failures(metrics::INBOUND, "first_byte_timeout", 1)
        .await;
}

#[tokio::test]
async fn tunnels_end_only_at_the_workload_whose_certificate_answered() {
    let env = env(Config::default()).await;
    let other_echo = echo_server(OTHER_IP).await;
    let good = client_config(env.ca.roots(), Some(&env.client_leaf));
    let cases = [
        // Another enrolled workload of the same node, through the server's listener.
        (other_echo.to_string(), "wrong_workload"),
        // The proxy's own listener, in the workload's namespace.
        (env.inbound.local_addr().to_string(), "proxy_port"),
        // The node's loopback.
        (format!("127.0.0.1:{}", env.echo.port()), "not_local"),
    ];
    for (authority, reason) in cases {
        let got = env
            .raw_request(good.clone(), connect_request(&authority))
            .await;
        assert_eq!(got, Ok(StatusCode::BAD_REQUEST), "CONNECT {authority}");
        env.wait_failures(metrics::INBOUND, reason, 1).await;
    }
    // The workload that answered is still reachable.
    let got = env
        .raw_request(good, connect_request(&env.echo.to_string()))
        .await;
    assert_eq!(got, Ok(StatusCode::OK));
}

#[tokio::test]
async fn a_policy_change_closes_the_open_tunnels_it_no_longer_allows() {
    let env = env(Config::default()).await;
    let (mut a, task) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut a, b"allowed").await;
    assert_eq!(env.context.rejudge(), 0, "nothing changed: nothing closed");
    roundtrip(&mut a, b"still allowed").await;
    assert_eq!(env.context.tunnels.len(), 1);

    env.authz.deny(CLIENT_ID);
    let started = std::time::Instant::now();
    assert_eq!(env.context.rejudge(), 1);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), a.read_to_end(&mut rest))
        .await
        .expect("the denied tunnel ends within 1 s");
    let _ = tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("its outbound side ends too");
    assert!(started.elapsed() < Duration::from_secs(1));
    env.wait_failures(metrics::INBOUND, "revoked", 1).await;
    for _ in 0..50 {
        if env.context.tunnels.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        env.context.tunnels.is_empty(),
        "the closed tunnel unregistered"
    );

    // New tunnels of that peer are refused as well.
    let (_b, task_b) = env.open(env.request(CLIENT_IP));
    let err = task_b.await.expect("proxy task").expect_err("denied peer");
    assert!(matches!(err, Error::Refused { status: 403, .. }), "{err}");
}

#[tokio::test]
async fn drain_finishes_tunnels_in_flight_and_refuses_new_ones() {
    let env = env(Config::default()).await;
    let (mut a, task) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut a, b"before drain").await;

    let drain = {
        let addr = env.inbound.local_addr();
        let env = Arc::new(env);
        let e = env.clone();
        let drain = tokio::spawn(async move { e.inbound.drain(Duration::from_secs(10)).await });
        // The listener closes: new connections are refused.
        let mut refused = false;
        for _ in 0..250 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "listener still accepting during drain");
        // A new stream on the pooled connection is refused too (GOAWAY).
        let (_b, task_b) = env.open(env.request(CLIENT_IP));
        let r = tokio::time::timeout(Duration::from_secs(10), task_b)
            .await
            .expect("refusal within 10 s")
            .expect("proxy task");
        assert!(r.is_err(), "new tunnel opened during drain");

        roundtrip(&mut a, b"during drain").await;
        finish(a, task).await;
        drain
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("drain ends once the tunnel is done")
        .expect("drain task");
    assert_eq!(outcome, DrainOutcome::Finished);
}

#[tokio::test]
async fn a_draining_outbound_opens_no_tunnels() {
    let env = env(Config::default()).await;
    let (mut a, task) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut a, b"open").await;
    let outbound = env.outbound.clone();
    let drain = tokio::spawn(async move { outbound.drain(Duration::from_secs(10)).await });
    let mut refused = false;
    for _ in 0..250 {
        let (_c, t) = env.open(env.request(CLIENT_IP));
        if matches!(t.await.expect("proxy task"), Err(Error::Draining)) {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "outbound opened tunnels while draining");
    roundtrip(&mut a, b"still open").await;
    finish(a, task).await;
    let outcome = drain.await.expect("drain task");
    assert_eq!(outcome, DrainOutcome::Finished);
    assert!(env.metrics.failures_with(metrics::OUTBOUND, "draining") >= 1);
}

#[tokio::test]
async fn drain_closes_what_outlives_the_grace_period() {
    let env = env(Config::default()).await;
    let (mut a, task) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut a, b"stays open").await;
    let outcome = env.inbound.drain(Duration::from_millis(200)).await;
    assert_eq!(outcome, DrainOutcome::Forced);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), a.read_to_end(&mut rest))
        .await
        .expect("client sees the end after a forced drain");
    let _ = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("outbound tunnel ends after a forced drain");
}

#[tokio::test]
async fn no_plaintext_between_the_proxies() {
    let env = env(Config::default()).await;
    // A relay between the two proxies that records every byte it forwards.
    let relay = TcpListener::bind((RELAY_IP, 0)).await.expect("bind relay");
    let relay_addr = relay.local_addr().expect("relay address");
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let upstream = env.inbound.local_addr();
    let record = seen.clone();
    tokio::spawn(async move {
        let Ok((down, _)) = relay.accept().await else {
            return;
        };
        let Ok(up) = TcpStream::connect(upstream).await else {
            return;
        };
        let (mut dr, mut dw) = down.into_split();
        let (mut ur, mut uw) = up.into_split();
        let r1 = record.clone();
        let one = async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = dr.read(&mut buf).await {
                if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                r1.lock().expect("record").extend_from_slice(&buf[..n]);
            }
            let _ = uw.shutdown().await;
        };
        let other = async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = ur.read(&mut buf).await {
                if n == 0 || dw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                record.lock().expect("record").extend_from_slice(&buf[..n]);
            }
            let _ = dw.shutdown().await;
        };
        tokio::join!(one, other);
    });
    let mut req = env.request(CLIENT_IP);
    req.hbone = relay_addr;
    let (mut client, task) = env.open(req);
    let data = payload(64 * 1024);
    roundtrip(&mut client, &data).await;
    finish(client, task).await;
    let seen = seen.lock().expect("record").clone();
    assert!(
        seen.len() > data.len() * 2,
        "relay saw only {} bytes",
        seen.len()
    );
    let marker = b"PLAINTEXT-MARKER";
    assert!(
        !seen.windows(marker.len()).any(|w| w == marker),
        "plaintext crossed the wire"
    );
    // Sanity: the marker is what the payload is made of.
    assert!(data.windows(marker.len()).any(|w| w == marker));
}

#[tokio::test]
async fn idle_pooled_connections_close() {
    let cfg = Config {
        pool_idle_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let env = env(cfg).await;
    let (mut a, task) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut a, b"one").await;
    // Busy connections stay, however long the tunnel lives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.outbound.pooled_connections(), 1);
    roundtrip(&mut a, b"two").await;
    finish(a, task).await;
    let mut closed = false;
    for _ in 0..100 {
        if env.outbound.pooled_connections() == 0 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "idle pooled connection still open after 2 s");
    // The next tunnel opens a fresh connection.
    let (mut b, task) = env.open(env.request(CLIENT_IP));
    roundtrip(&mut b, b"three").await;
    finish(b, task).await;
    assert_eq!(env.metrics.handshakes_with(metrics::OUTBOUND, "ok"), 2);
}
