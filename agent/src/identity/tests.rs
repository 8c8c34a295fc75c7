//! Mutual TLS over loopback with the configurations the manager builds: what is accepted,
//! what is refused and why, CA rotation, and renewal under a live connection.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{SanType, string::Ia5String};
use rustls::{ClientConfig, ServerConfig, pki_types::ServerName, version::TLS13};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::{
    Ca, CertManager, KeyExchange, SpiffeId, Svid, TrustBundle, manager, peer_identity,
    verify::{SpiffeClientVerifier, SpiffeServerVerifier},
};

const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);
/// Bound on every network step, so a broken handshake fails the test instead of hanging.
const STEP: Duration = Duration::from_secs(10);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).expect("valid id")
}

fn ca() -> Ca {
    Ca::generate(TD, SystemTime::now()).expect("CA")
}

fn bundle(cas: &[&Ca]) -> TrustBundle {
    let mut b = TrustBundle::default();
    for ca in cas {
        b.add(ca.certificate().clone(), "test CA").expect("a CA");
    }
    b
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server configuration as the manager builds it, presenting any certificate.
fn server_with(svid: &Svid, trust: &TrustBundle) -> Arc<ServerConfig> {
    let provider = provider();
    let roots = Arc::new(trust.root_store().expect("roots"));
    let verifier =
        Arc::new(SpiffeClientVerifier::new(roots, provider.clone(), TD).expect("verifier"));
    manager::server_config(&provider, verifier, svid).expect("server config")
}

/// A client configuration as the manager builds it, presenting any certificate.
fn client_with(svid: &Svid, trust: &TrustBundle, expected: Option<&SpiffeId>) -> Arc<ClientConfig> {
    let roots = Arc::new(trust.root_store().expect("roots"));
    manager::client_config(&provider(), roots, TD, expected.cloned(), svid).expect("client config")
}

struct Outcome {
    server: std::io::Result<server::TlsStream<TcpStream>>,
    client: std::io::Result<client::TlsStream<TcpStream>>,
}

impl Outcome {
    /// Both sides finished the handshake and one message went each way, so a rejection
    /// the client only learns after its handshake (TLS 1.3 client authentication) shows.
    async fn established(self) -> (server::TlsStream<TcpStream>, client::TlsStream<TcpStream>) {
        let mut server = self.server.expect("server handshake");
        let mut client = self.client.expect("client handshake");
        exchange(&mut client, &mut server, b"ping").await;
        (server, client)
    }

    fn client_error(self) -> String {
        refusal(self.client, "the client accepted the server")
    }
}

/// A chain that does not end at a trusted CA, reported as such (also when a trusted CA
/// has the same name).
fn unknown_ca(e: &str) -> bool {
    e.contains("UnknownIssuer")
}

/// The text of an error the test expects.
fn refusal<T>(result: std::io::Result<T>, otherwise: &str) -> String {
    match result {
        Ok(_) => panic!("{otherwise}"),
        Err(e) => e.to_string(),
    }
}

async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    let accept = async {
        let (tcp, _) = listener.accept().await?;
        TlsAcceptor::from(server).accept(tcp).await
    };
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        // An IP address as the server name, as the proxy dials pod IPs; it is not checked.
        TlsConnector::from(client)
            .connect(
                ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into()),
                tcp,
            )
            .await
    };
    let (server, client) = tokio::time::timeout(STEP, async { tokio::join!(accept, connect) })
        .await
        .expect("handshake timed out");
    Outcome { server, client }
}

async fn exchange(
    client: &mut client::TlsStream<TcpStream>,
    server: &mut server::TlsStream<TcpStream>,
    message: &[u8],
) {
    tokio::time::timeout(STEP, async {
        client.write_all(message).await.expect("client write");
        client.flush().await.expect("client flush");
        let mut buf = vec![0; message.len()];
        server.read_exact(&mut buf).await.expect("server read");
        assert_eq!(buf, message);
        server.write_all(&buf).await.expect("server write");
        server.flush().await.expect("server flush");
        let mut back = vec![0; message.len()];
        client.read_exact(&mut back).await.expect("client read");
        assert_eq!(back, message);
    })
    .await
    .expect("exchange timed out");
}

/// A client whose handshake the server refused: the refusal reaches it as an error at the
/// latest on its first read.
async fn assert_client_cut_off(client: std::io::Result<client::TlsStream<TcpStream>>) {
    if let Ok(mut client) = client {
        let outcome = tokio::time::timeout(STEP, async {
            let _ = client.write_all(b"hello").await;
            let mut buf = [0u8; 1];
            client.read(&mut buf).await
        })
        .await
        .expect("read timed out");
        assert!(
            !matches!(outcome, Ok(n) if n > 0),
            "the refused client received data"
        );
    }
}

#[tokio::test]
async fn mutual_handshake_and_both_sides_read_the_peer_identity() {
    let manager = CertManager::new(ca(), TrustBundle::default(), TD, HOUR).expect("manager");
    let (a, b) = (id("default", "server"), id("other", "client"));
    manager
        .set_identities(&[a.clone(), b.clone()])
        .expect("issues");
    let server = manager.server_config(&a).expect("a is local");
    let client = manager.client_config(&b, Some(&a)).expect("b is local");
    assert!(Arc::ptr_eq(
        &client,
        &manager.client_config(&b, Some(&a)).expect("cached")
    ));

    let (server, client) = handshake(server, client).await.established().await;
    let (_, server_conn) = server.get_ref();
    let (_, client_conn) = client.get_ref();
    assert_eq!(server_conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        client_conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let seen_by_server =
        peer_identity(server_conn.peer_certificates().expect("client certificate"))
            .expect("client SPIFFE ID");
    let seen_by_client =
        peer_identity(client_conn.peer_certificates().expect("server certificate"))
            .expect("server SPIFFE ID");
    assert_eq!(seen_by_server, b);
    assert_eq!(seen_by_client, a);

    // Any identity of the trust domain when none is expected.
    let any = manager.client_config(&b, None).expect("b is local");
    handshake(manager.server_config(&a).expect("a"), any)
        .await
        .established()
        .await;

    let infos = manager.certificates();
    assert_eq!(
        infos.iter().map(|c| &c.id).collect::<Vec<_>>(),
        vec![&a, &b]
    );
    manager
        .set_identities(std::slice::from_ref(&b))
        .expect("drops a");
    assert!(
        manager.server_config(&a).is_none(),
        "a's certificate was dropped"
    );
    assert_eq!(manager.certificates().len(), 1);
    let other_domain = SpiffeId::new("example.org", "x", "y").expect("valid");
    let e = manager
        .set_identities(&[other_domain])
        .expect_err("other trust domain");
    assert!(e.to_string().contains("example.org"), "{e}");
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() {
    let ca = ca();
    let trust = bundle(&[&ca]);
    let server_svid = ca
        .issue(&id("a", "server"), HOUR, SystemTime::now())
        .expect("svid");
    let roots = Arc::new(trust.root_store().expect("roots"));
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            roots,
            &provider(),
            TD,
            None,
        )))
        .with_no_client_auth();
    let outcome = handshake(server_with(&server_svid, &trust), Arc::new(client)).await;
    assert_client_cut_off(outcome.client).await;
    let e = refusal(
        outcome.server,
        "the server accepted a client without a certificate",
    );
    assert!(e.contains("no certificates"), "{e}");
}

/// The server's refusal of a client presenting `client_svid`, as text.
async fn refused_client(ca: &Ca, client_svid: &Svid) -> String {
    let trust = bundle(&[ca]);
    let server_svid = ca
        .issue(&id("a", "server"), HOUR, SystemTime::now())
        .expect("svid");
    let outcome = handshake(
        server_with(&server_svid, &trust),
        client_with(client_svid, &trust, None),
    )
    .await;
    assert_client_cut_off(outcome.client).await;
    refusal(outcome.server, "the server accepted the client")
}

/// The client's refusal of a server presenting `server_svid`, as text.
async fn refused_server(ca: &Ca, server_svid: &Svid, expected: Option<&SpiffeId>) -> String {
    let trust = bundle(&[ca]);
    let client_svid = ca
        .issue(&id("b", "client"), HOUR, SystemTime::now())
        .expect("svid");
    handshake(
        server_with(server_svid, &trust),
        client_with(&client_svid, &trust, expected),
    )
    .await
    .client_error()
}

#[tokio::test]
async fn server_refuses_bad_client_certificates() {
    let ca = ca();
    let now = SystemTime::now();
    let client = id("b", "client");

    let foreign = Ca::generate(TD, now).expect("another CA");
    let e = refused_client(&ca, &foreign.issue(&client, HOUR, now).expect("svid")).await;
    assert!(unknown_ca(&e), "{e}");

    let expired = ca.issue(&client, HOUR, now - 3 * HOUR).expect("svid");
    let e = refused_client(&ca, &expired).await;
    assert!(e.contains("expired"), "{e}");

    let future = ca.issue(&client, HOUR, now + HOUR).expect("svid");
    let e = refused_client(&ca, &future).await;
    assert!(e.contains("not valid yet"), "{e}");

    let dns_only = ca
        .issue_adjusted(&client, HOUR, now, |p| {
            p.subject_alt_names = vec![SanType::DnsName(
                Ia5String::try_from("client.example").expect("ascii"),
            )];
        })
        .expect("svid");
    let e = refused_client(&ca, &dns_only).await;
    assert!(e.contains("no SPIFFE ID"), "{e}");

    let elsewhere = SpiffeId::new("example.org", "b", "client").expect("valid");
    let e = refused_client(&ca, &ca.issue(&elsewhere, HOUR, now).expect("svid")).await;
    assert!(e.contains("not in the trust domain"), "{e}");
}

#[tokio::test]
async fn client_refuses_bad_server_certificates() {
    let ca = ca();
    let now = SystemTime::now();
    let server = id("a", "server");
    let good = ca.issue(&server, HOUR, now).expect("svid");

    let e = refused_server(&ca, &good, Some(&id("a", "someone-else"))).await;
    assert!(
        e.contains("expected spiffe://cluster.local/ns/a/sa/someone-else"),
        "{e}"
    );
    assert!(
        e.contains("the peer is spiffe://cluster.local/ns/a/sa/server"),
        "{e}"
    );

    let foreign = Ca::generate(TD, now).expect("another CA");
    let e = refused_server(&ca, &foreign.issue(&server, HOUR, now).expect("svid"), None).await;
    assert!(unknown_ca(&e), "{e}");

    let e = refused_server(
        &ca,
        &ca.issue(&server, HOUR, now - 3 * HOUR).expect("svid"),
        None,
    )
    .await;
    assert!(e.contains("expired"), "{e}");

    let no_uri = ca
        .issue_adjusted(&server, HOUR, now, |p| p.subject_alt_names.clear())
        .expect("svid");
    let e = refused_server(&ca, &no_uri, None).await;
    assert!(e.contains("no SPIFFE ID"), "{e}");

    let elsewhere = SpiffeId::new("example.org", "a", "server").expect("valid");
    let e = refused_server(&ca, &ca.issue(&elsewhere, HOUR, now).expect("svid"), None).await;
    assert!(e.contains("not in the trust domain"), "{e}");

    // The same certificate is accepted when it is the expected one.
    let trust = bundle(&[&ca]);
    let client_svid = ca.issue(&id("b", "client"), HOUR, now).expect("svid");
    handshake(
        server_with(&good, &trust),
        client_with(&client_svid, &trust, Some(&server)),
    )
    .await
    .established()
    .await;
}

#[tokio::test]
async fn ca_rotation_trusts_both_cas_during_the_overlap() {
    let now = SystemTime::now();
    let old = ca();
    let old_client = old.issue(&id("b", "client"), HOUR, now).expect("svid");
    let server = id("a", "server");

    // The node moved to the new CA and still trusts the old one.
    let rotated = CertManager::new(ca(), bundle(&[&old]), TD, HOUR).expect("manager");
    rotated
        .set_identities(std::slice::from_ref(&server))
        .expect("issues");
    let both = rotated.bundle();
    assert_eq!(both.certificates().len(), 2, "old and new CA");
    handshake(
        rotated.server_config(&server).expect("local"),
        client_with(&old_client, &both, Some(&server)),
    )
    .await
    .established()
    .await;

    // A node that trusts only the new CA refuses certificates of the old one.
    let new_only = CertManager::new(ca(), TrustBundle::default(), TD, HOUR).expect("manager");
    new_only
        .set_identities(std::slice::from_ref(&server))
        .expect("issues");
    let outcome = handshake(
        new_only.server_config(&server).expect("local"),
        // The client trusts both, so that the refusal is the server's.
        client_with(
            &old_client,
            &{
                let mut b = new_only.bundle();
                b.add(old.certificate().clone(), "old CA").expect("a CA");
                b
            },
            None,
        ),
    )
    .await;
    assert_client_cut_off(outcome.client).await;
    let e = refusal(
        outcome.server,
        "a node trusting only the new CA accepted the old one",
    );
    assert!(unknown_ca(&e), "{e}");

    // `set_trust` moves a manager from the old CA to the new one and reissues; peers
    // still on the first CA stay trusted through the bundle.
    let first = ca();
    let first_client = first.issue(&id("b", "client"), HOUR, now).expect("svid");
    let mut first_only = TrustBundle::default();
    first_only
        .add(first.certificate().clone(), "first CA")
        .expect("a CA");
    let manager = CertManager::new(first, TrustBundle::default(), TD, HOUR).expect("manager");
    manager
        .set_identities(std::slice::from_ref(&server))
        .expect("issues");
    let before = manager.svid(&server).expect("svid");
    let next = ca();
    let next_subject = next.subject();
    manager.set_trust(next, first_only).expect("rotates");
    let after = manager.svid(&server).expect("svid");
    assert_ne!(before.serial(), after.serial());
    assert_eq!(
        manager.certificates()[0].issuer,
        next_subject,
        "issued by the new CA"
    );
    handshake(
        manager.server_config(&server).expect("local"),
        client_with(&first_client, &manager.bundle(), Some(&server)),
    )
    .await
    .established()
    .await;
}

#[tokio::test]
async fn renewal_swaps_the_certificate_and_keeps_open_connections() {
    let lifetime = Duration::from_secs(2);
    let manager = CertManager::new(ca(), TrustBundle::default(), TD, lifetime).expect("manager");
    let (a, b) = (id("a", "server"), id("b", "client"));
    let started = tokio::time::Instant::now();
    manager
        .set_identities(&[a.clone(), b.clone()])
        .expect("issues");
    let renewal = manager.spawn_renewal();

    let first = manager.svid(&a).expect("svid");
    let first_server = manager.server_config(&a).expect("local");
    let (mut server, mut client) = handshake(
        first_server.clone(),
        manager.client_config(&b, Some(&a)).expect("local"),
    )
    .await
    .established()
    .await;

    // Bounded wait: the renewal is due after one second.
    let mut renewed = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let current = manager.svid(&a).expect("svid");
        if current.serial() != first.serial() {
            renewed = Some((current, started.elapsed()));
            break;
        }
    }
    let (second, after) = renewed.expect("the certificate was not renewed within 5 s");
    assert!(
        after >= Duration::from_millis(950),
        "renewed too early: {after:?}"
    );
    assert!(
        after <= Duration::from_secs(2),
        "renewed too late: {after:?}"
    );
    assert!(second.not_after() > first.not_after());
    assert!(
        !Arc::ptr_eq(&first_server, &manager.server_config(&a).expect("local")),
        "configuration rebuilt"
    );

    // The connection made with the first certificate keeps working, also once that
    // certificate has expired.
    exchange(&mut client, &mut server, b"after renewal").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    exchange(&mut client, &mut server, b"after expiry").await;

    // New handshakes present the new certificate.
    let (new_server, _new_client) = handshake(
        manager.server_config(&a).expect("local"),
        manager.client_config(&b, Some(&a)).expect("local"),
    )
    .await
    .established()
    .await;
    drop(new_server);
    let current = manager.svid(&a).expect("svid");
    assert_ne!(current.serial(), first.serial());

    // The task ends once the manager is gone.
    drop(manager);
    tokio::time::timeout(STEP, renewal)
        .await
        .expect("renewal task ended")
        .expect("no panic");
}

#[test]
fn server_configs_do_not_resume_sessions() {
    let manager = CertManager::new(ca(), TrustBundle::default(), TD, HOUR).expect("manager");
    let a = id("a", "server");
    manager
        .set_identities(std::slice::from_ref(&a))
        .expect("issues");
    let server = manager.server_config(&a).expect("local");
    assert_eq!(server.send_tls13_tickets, 0);
    assert!(!server.session_storage.can_cache());
    assert!(peer_identity(&[]).is_err());
}

/// A TLS peer built with rustls alone (not with the manager's code) that offers and
/// accepts only `groups`, as Istio's ztunnel does with `COMPLIANCE_POLICY=pqc`
/// (X25519MLKEM768 alone) or an older peer does (X25519 alone).
fn peer_provider(
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: groups.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

fn peer_server(
    svid: &Svid,
    trust: &TrustBundle,
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> Arc<ServerConfig> {
    let provider = peer_provider(groups);
    let roots = Arc::new(trust.root_store().expect("roots"));
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .expect("verifier");
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .expect("TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain().to_vec(), svid.key().clone_key())
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

fn peer_client(
    svid: &Svid,
    trust: &TrustBundle,
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> Arc<ClientConfig> {
    let provider = peer_provider(groups);
    let roots = Arc::new(trust.root_store().expect("roots"));
    // SVIDs carry no DNS name, so the name check of webpki's own verifier cannot pass.
    let verifier = SpiffeServerVerifier::new(roots, &provider, TD, None);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain().to_vec(), svid.key().clone_key())
        .expect("client config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The key exchange group both ends of an established connection agreed on.
fn negotiated(
    server: &server::TlsStream<TcpStream>,
    client: &client::TlsStream<TcpStream>,
) -> rustls::NamedGroup {
    let on_server = server
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .expect("server: a group")
        .name();
    let on_client = client
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .expect("client: a group")
        .name();
    assert_eq!(on_server, on_client, "both ends name the same group");
    on_server
}

/// A node's manager with one server and one client identity, and a peer's SVIDs from the
/// same CA.
struct PqSetup {
    manager: CertManager,
    server: SpiffeId,
    client: SpiffeId,
    peer: Svid,
    trust: TrustBundle,
}

fn pq_setup(kx: KeyExchange) -> PqSetup {
    let ca = ca();
    let peer = ca
        .issue(&id("istio", "ztunnel-peer"), HOUR, SystemTime::now())
        .expect("svid");
    let trust = bundle(&[&ca]);
    let manager =
        CertManager::with_key_exchange(ca, TrustBundle::default(), TD, HOUR, kx).expect("manager");
    let (server, client) = (id("a", "server"), id("b", "client"));
    manager
        .set_identities(&[server.clone(), client.clone()])
        .expect("issues");
    PqSetup {
        manager,
        server,
        client,
        peer,
        trust,
    }
}

#[tokio::test]
async fn a_peer_offering_only_the_hybrid_post_quantum_group_handshakes_both_ways() {
    use rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768;
    for kx in [
        KeyExchange::PreferPostQuantum,
        KeyExchange::RequirePostQuantum,
    ] {
        let s = pq_setup(kx);
        // The peer dials the node.
        let (server, client) = handshake(
            s.manager.server_config(&s.server).expect("local"),
            peer_client(&s.peer, &s.trust, &[X25519MLKEM768]),
        )
        .await
        .established()
        .await;
        assert_eq!(
            negotiated(&server, &client),
            rustls::NamedGroup::X25519MLKEM768,
            "{kx}"
        );
        // The node dials the peer.
        let (server, client) = handshake(
            peer_server(&s.peer, &s.trust, &[X25519MLKEM768]),
            s.manager.client_config(&s.client, None).expect("local"),
        )
        .await
        .established()
        .await;
        assert_eq!(
            negotiated(&server, &client),
            rustls::NamedGroup::X25519MLKEM768,
            "{kx}"
        );
    }
}

#[tokio::test]
async fn mesh_connections_prefer_the_hybrid_post_quantum_group() {
    let s = pq_setup(KeyExchange::default());
    let hybrid = || {
        super::crypto::key_exchanges()
            .get_or_create(&super::crypto::KeyExchangeLabels {
                group: "X25519MLKEM768".to_owned(),
            })
            .get()
    };
    let before = hybrid();
    let (server, client) = handshake(
        s.manager.server_config(&s.server).expect("local"),
        s.manager
            .client_config(&s.client, Some(&s.server))
            .expect("local"),
    )
    .await
    .established()
    .await;
    assert_eq!(
        negotiated(&server, &client),
        rustls::NamedGroup::X25519MLKEM768
    );
    // Both ends are the node's: each counted it.
    assert!(hybrid() >= before + 2, "the key exchanges were not counted");
    assert_eq!(
        s.manager.key_exchange_groups(),
        ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"]
    );
}

#[tokio::test]
async fn a_classical_only_peer_is_accepted_by_default_and_refused_when_post_quantum_is_required() {
    use rustls::crypto::aws_lc_rs::kx_group::X25519;
    let s = pq_setup(KeyExchange::PreferPostQuantum);
    let classical = || {
        super::crypto::key_exchanges()
            .get_or_create(&super::crypto::KeyExchangeLabels {
                group: "X25519".to_owned(),
            })
            .get()
    };
    let before = classical();
    let (server, client) = handshake(
        s.manager.server_config(&s.server).expect("local"),
        peer_client(&s.peer, &s.trust, &[X25519]),
    )
    .await
    .established()
    .await;
    assert_eq!(negotiated(&server, &client), rustls::NamedGroup::X25519);
    // The node's end counted the classical key exchange (tests running alongside may
    // count more).
    assert!(classical() > before, "the key exchange was not counted");
    let (server, client) = handshake(
        peer_server(&s.peer, &s.trust, &[X25519]),
        s.manager.client_config(&s.client, None).expect("local"),
    )
    .await
    .established()
    .await;
    assert_eq!(negotiated(&server, &client), rustls::NamedGroup::X25519);

    let s = pq_setup(KeyExchange::RequirePostQuantum);
    assert_eq!(s.manager.key_exchange_groups(), ["X25519MLKEM768"]);
    // The peer dials a node that requires post-quantum: the node refuses.
    let outcome = handshake(
        s.manager.server_config(&s.server).expect("local"),
        peer_client(&s.peer, &s.trust, &[X25519]),
    )
    .await;
    let e = refusal(outcome.server, "the node accepted a classical key exchange");
    assert!(e.contains("NoKxGroupsInCommon"), "{e}");
    assert_client_cut_off(outcome.client).await;
    // The node dials a classical-only peer: it offers nothing the peer takes.
    let outcome = handshake(
        peer_server(&s.peer, &s.trust, &[X25519]),
        s.manager.client_config(&s.client, None).expect("local"),
    )
    .await;
    let e = refusal(outcome.server, "the peer found a group the node offered");
    assert!(e.contains("NoKxGroupsInCommon"), "{e}");
    refusal(
        outcome.client,
        "the node completed a classical key exchange",
    );
}

#[tokio::test]
async fn a_certificate_of_an_untrusted_ca_with_a_trusted_name_is_an_unknown_issuer() {
    let now = SystemTime::now();
    let name = Some("mycel CA for cluster.local");
    let trusted = Ca::generate_named(TD, now, name).expect("CA");
    let impostor = Ca::generate_named(TD, now, name).expect("CA");
    assert_eq!(trusted.subject(), impostor.subject());
    let trust = bundle(&[&trusted]);
    let good = trusted.issue(&id("a", "good"), HOUR, now).expect("svid");
    let forged = impostor.issue(&id("a", "forged"), HOUR, now).expect("svid");

    // The node's server refuses the impostor's client.
    let outcome = handshake(
        server_with(&good, &trust),
        client_with(&forged, &bundle(&[&trusted, &impostor]), None),
    )
    .await;
    let e = refusal(
        outcome.server,
        "the server accepted a certificate of an untrusted CA",
    );
    assert!(unknown_ca(&e), "{e}");
    assert_client_cut_off(outcome.client).await;
    // The node's client refuses the impostor's server.
    let outcome = handshake(
        server_with(&forged, &bundle(&[&trusted, &impostor])),
        client_with(&good, &trust, None),
    )
    .await;
    let e = outcome.client_error();
    assert!(unknown_ca(&e), "{e}");
}

#[test]
fn the_ca_directory_is_reloaded_and_a_bad_file_keeps_the_last_good_ca() {
    use super::{CA_CERT_FILE, CA_KEY_FILE, CaDir, reload};
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let old = Ca::create(dir, TD).expect("creates");
    let old_key = std::fs::read(dir.join(CA_KEY_FILE)).expect("key");
    let new_dir = tmp.path().join("new");
    let new = Ca::create(&new_dir, TD).expect("creates");
    let new_key = std::fs::read(new_dir.join(CA_KEY_FILE)).expect("key");
    let write = |cert: String, key: &[u8]| {
        std::fs::write(dir.join(CA_CERT_FILE), cert).expect("cert");
        std::fs::write(dir.join(CA_KEY_FILE), key).expect("key");
    };

    let loaded = Ca::load_or_create(dir, TD).expect("loads");
    let manager = CertManager::new(loaded, TrustBundle::default(), TD, HOUR).expect("manager");
    let server = id("a", "server");
    manager
        .set_identities(std::slice::from_ref(&server))
        .expect("issues");
    let metrics = Arc::new(reload::Metrics::default());
    let mut watched = CaDir::new(dir, metrics).expect("watches");
    assert!(matches!(watched.poll(&manager), reload::Reload::Unchanged));
    let first = manager.svid(&server).expect("svid");

    // 1. The new root is added: both trusted, still signed by the old CA, no reissue.
    write(format!("{}{}", old.cert_pem(), new.cert_pem()), &old_key);
    assert!(matches!(watched.poll(&manager), reload::Reload::Applied));
    assert!(manager.bundle().contains(new.certificate()));
    assert!(manager.bundle().contains(old.certificate()));
    assert_eq!(
        manager.svid(&server).expect("svid").serial(),
        first.serial()
    );
    // Peers of the new CA are accepted at once.
    let new_peer = new
        .issue(&id("b", "client"), HOUR, SystemTime::now())
        .expect("svid");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        handshake(
            manager.server_config(&server).expect("local"),
            client_with(&new_peer, &bundle(&[&old, &new]), None),
        )
        .await
        .established()
        .await;
    });

    // 2. Signing switches to the new CA: reissued at once, both still trusted.
    write(format!("{}{}", new.cert_pem(), old.cert_pem()), &new_key);
    assert!(matches!(watched.poll(&manager), reload::Reload::Applied));
    let second = manager.svid(&server).expect("svid");
    assert_ne!(second.serial(), first.serial());
    assert_eq!(manager.signing_ca(), new.subject());
    assert_eq!(manager.certificates()[0].issuer, new.subject());
    assert_eq!(manager.bundle().certificates().len(), 2);

    // A bad file: refused, reported once, the last good CA and bundle stay.
    std::fs::write(
        dir.join(CA_CERT_FILE),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .expect("write");
    let e = match watched.poll(&manager) {
        reload::Reload::Refused(e) => e.to_string(),
        other => panic!("a bad file was not refused: {other:?}"),
    };
    assert!(e.contains(CA_CERT_FILE), "{e}");
    assert!(matches!(watched.poll(&manager), reload::Reload::Unchanged));
    assert!(
        manager
            .reload_status()
            .error
            .is_some_and(|s| s.contains(CA_CERT_FILE))
    );
    assert_eq!(manager.bundle().certificates().len(), 2);
    assert_eq!(
        manager.svid(&server).expect("svid").serial(),
        second.serial()
    );
    // A key that belongs to no certificate of the file is refused too.
    write(new.cert_pem(), &old_key);
    assert!(matches!(watched.poll(&manager), reload::Reload::Refused(_)));
    assert_eq!(manager.signing_ca(), new.subject());

    // 3. The old root is removed: only the new one is trusted.
    write(new.cert_pem(), &new_key);
    assert!(matches!(watched.poll(&manager), reload::Reload::Applied));
    assert_eq!(
        manager.bundle().certificates(),
        &[new.certificate().clone()]
    );
    assert_eq!(manager.reload_status().error, None);
    assert_eq!(manager.reload_status().applied, 3);
    assert_eq!(
        manager.svid(&server).expect("svid").serial(),
        second.serial()
    );
    let old_peer = old
        .issue(&id("b", "client"), HOUR, SystemTime::now())
        .expect("svid");
    rt.block_on(async {
        let outcome = handshake(
            manager.server_config(&server).expect("local"),
            client_with(&old_peer, &bundle(&[&old, &new]), None),
        )
        .await;
        let e = refusal(outcome.server, "the removed root is still trusted");
        assert!(unknown_ca(&e), "{e}");
    });
}
