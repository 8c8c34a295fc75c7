//! The identity server (`mycel identity-server`): in Kubernetes, the only holder of the CA
//! key. Node agents ask it for the certificates of their node's workloads, so that a
//! compromised node can obtain only the identities of the pods that run on it.
//!
//! An agent sends `POST /v1/certificates` over TLS (the server presents an SVID of its
//! own identity, issued by the CA it holds) with a PKCS#10 request and the SPIFFE ID it
//! wants, authenticated by its projected ServiceAccount token (audience [`AUDIENCE`]). The
//! server, as istiod does for ztunnel:
//! 1. asks the API server to review the token (TokenReview, with the audience): it must
//!    be the ServiceAccount of the agents, bound to a pod (the token's pod name and uid);
//! 2. reads that pod: the same uid (not a later pod of the same name), the same
//!    ServiceAccount; its `spec.nodeName` is the asking node;
//! 3. signs only if a pod of the requested namespace and ServiceAccount runs on that node
//!    (`spec.nodeName`), and only the requested SPIFFE ID (the request's own names and
//!    extensions are ignored).
//!
//! Every refusal is answered with a status and a reason, logged, and counted in
//! `mycel_identity_requests_total{result="refused",reason}`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{Ca, SpiffeId};

/// The audience agents' projected tokens are bound to.
pub const AUDIENCE: &str = "mycel-identity";
/// Where agents send certificate requests.
pub const PATH: &str = "/v1/certificates";
/// Largest request body (a PKCS#10 request is well under 2 KiB).
const MAX_BODY: usize = 16 * 1024;
/// The pod-binding claims of a projected token, as TokenReview reports them.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// What an agent sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The SPIFFE ID wanted.
    pub identity: String,
    /// A PKCS#10 request in PEM, signed with the key the certificate is for.
    pub csr: String,
}

/// What the server answers on success.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// The chain in PEM, leaf first.
    pub chain: String,
    /// The CA certificates to trust, in PEM.
    pub trust_bundle: String,
}

/// Why a request was refused; `reason()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token")]
    NoToken,
    #[error("the token was not accepted: {0}")]
    Unauthenticated(String),
    #[error("{0} is not the agents' service account")]
    NotAnAgent(String),
    #[error("the token is not bound to a pod (use a projected service account token)")]
    NotBound,
    #[error("the token's pod {0}: {1}")]
    CallerPod(String, String),
    #[error("no pod with the service account of {identity} runs on node {node}")]
    NotOnNode { identity: String, node: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the API server: {0}")]
    Api(String),
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken | Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::NotAnAgent(_) => "not_an_agent",
            Refusal::NotBound => "token_not_bound",
            Refusal::CallerPod(..) => "caller_pod",
            Refusal::NotOnNode { .. } => "not_on_node",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Api(_) => "api_error",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Refusal::NoToken | Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Api(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `issued` or `refused`.
    result: &'static str,
    /// Why refused; empty when issued.
    reason: &'static str,
}

/// Metrics of the identity server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `mycel_identity_requests_total{result,reason}`.
    requests: Family<RequestLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "mycel_identity_requests",
            "Certificate requests of node agents, issued or refused (and why)",
            m.requests.clone(),
        );
        m
    }
}

/// How the server decides and signs.
#[derive(Debug)]
pub struct Settings {
    pub trust_domain: String,
    /// The agents' ServiceAccount, `namespace/name`.
    pub agent_service_account: (String, String),
    /// Lifetime of the certificates it signs.
    pub lifetime: std::time::Duration,
}

/// The server's state: the CA, the API client, settings and metrics.
pub struct IdentityServer {
    ca: Arc<Ca>,
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for IdentityServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityServer")
            .field("ca", &self.ca)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Who asks: the agent's pod, as the API server says.
#[derive(Debug)]
struct Caller {
    pod: String,
    node: String,
}

impl IdentityServer {
    pub fn new(ca: Arc<Ca>, client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        IdentityServer {
            ca,
            client,
            settings,
            metrics,
        }
    }

    /// Serves certificate requests on `listener` with TLS from `tls` until the task is
    /// dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let server = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if req.method() != Method::POST || req.uri().path() != PATH {
            return text(StatusCode::NOT_FOUND, format!("POST {PATH} only"));
        }
        match self.issue(req).await {
            Ok(resp) => {
                self.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        result: "issued",
                        reason: "",
                    })
                    .inc();
                let body = serde_json::to_vec(&resp).unwrap_or_default();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default()
            }
            Err(refusal) => {
                self.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        result: "refused",
                        reason: refusal.reason(),
                    })
                    .inc();
                tracing::warn!(%peer, reason = refusal.reason(), error = %refusal, "refused a certificate request");
                text(refusal.status(), refusal.to_string())
            }
        }
    }

    async fn issue(&self, req: Request<Incoming>) -> Result<CertificateResponse, Refusal> {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .ok_or(Refusal::NoToken)?;
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| Refusal::BadRequest(format!("reading the body: {e}")))?
            .to_bytes();
        let request: CertificateRequest = serde_json::from_slice(&body)
            .map_err(|e| Refusal::BadRequest(format!("not a certificate request: {e}")))?;
        let id =
            SpiffeId::parse(&request.identity).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        if id.trust_domain() != self.settings.trust_domain {
            return Err(Refusal::BadRequest(format!(
                "{id} is not in the trust domain {:?}",
                self.settings.trust_domain
            )));
        }
        let caller = self.review(&token).await?;
        self.authorize(&caller, &id).await?;
        let chain = self
            .ca
            .sign_request(&id, &request.csr, self.settings.lifetime, SystemTime::now())
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        tracing::info!(pod = %caller.pod, node = %caller.node, %id, "issued a certificate");
        let trust_bundle = self
            .ca
            .bundle()
            .certificates()
            .iter()
            .map(super::ca::to_pem)
            .collect();
        Ok(CertificateResponse {
            chain,
            trust_bundle,
        })
    }

    /// Steps 1 and 2: the token's pod, and the node it runs on.
    async fn review(&self, token: &str) -> Result<Caller, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Api(format!("reviewing the token: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Unauthenticated(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            ));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
        {
            return Err(Refusal::Unauthenticated(format!(
                "the token is not for the audience {AUDIENCE:?}"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (ns, sa) = &self.settings.agent_service_account;
        if username != format!("system:serviceaccount:{ns}:{sa}") {
            return Err(Refusal::NotAnAgent(username));
        }
        let extra = user.extra.unwrap_or_default();
        let claim = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let (Some(pod_name), Some(pod_uid)) = (claim(POD_NAME_EXTRA), claim(POD_UID_EXTRA)) else {
            return Err(Refusal::NotBound);
        };
        let who = format!("{ns}/{pod_name}");
        let pod = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(&pod_name)
            .await
            .map_err(|e| Refusal::Api(format!("reading the pod {who}: {e}")))?
            .ok_or_else(|| Refusal::CallerPod(who.clone(), "no such pod".to_owned()))?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(Refusal::CallerPod(
                who,
                "another pod of that name (the token's pod is gone)".to_owned(),
            ));
        }
        let spec = pod.spec.unwrap_or_default();
        if spec.service_account_name.as_deref() != Some(sa.as_str()) {
            return Err(Refusal::CallerPod(
                who,
                format!("does not run as the service account {sa}"),
            ));
        }
        let node = spec
            .node_name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Refusal::CallerPod(who.clone(), "not scheduled on a node".to_owned()))?;
        Ok(Caller { pod: who, node })
    }

    /// Step 3: a pod of the identity on the caller's node.
    async fn authorize(&self, caller: &Caller, id: &SpiffeId) -> Result<(), Refusal> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), id.namespace())
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", caller.node)))
            .await
            .map_err(|e| Refusal::Api(format!("listing the pods of {}: {e}", id.namespace())))?;
        let runs_here = pods.items.iter().any(|pod| {
            let spec = pod.spec.as_ref();
            let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(caller.node.as_str());
            let sa = spec
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .unwrap_or("default");
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed");
            on_node && sa == id.service_account() && !finished
        });
        if runs_here {
            Ok(())
        } else {
            Err(Refusal::NotOnNode {
                identity: id.to_string(),
                node: caller.node.clone(),
            })
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// The server's own certificate: an SVID of `id` from the CA it holds, reissued at half
/// its lifetime. Agents check it against the trust bundle and expect `id`.
#[derive(Debug)]
pub struct OwnCertificate {
    ca: Arc<Ca>,
    id: SpiffeId,
    lifetime: std::time::Duration,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: std::sync::Mutex<Option<(std::time::Instant, Arc<rustls::sign::CertifiedKey>)>>,
}

impl OwnCertificate {
    pub fn new(ca: Arc<Ca>, id: SpiffeId, lifetime: std::time::Duration) -> Self {
        OwnCertificate {
            ca,
            id,
            lifetime,
            provider: Arc::new(super::crypto::provider(super::KeyExchange::default())),
            current: std::sync::Mutex::new(None),
        }
    }

    fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, super::Error> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((renew_at, key)) = current.as_ref()
            && std::time::Instant::now() < *renew_at
        {
            return Ok(key.clone());
        }
        let svid = self.ca.issue(&self.id, self.lifetime, SystemTime::now())?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(svid.key().clone_key())
            .map_err(|source| super::Error::Tls {
                id: self.id.to_string(),
                source,
            })?;
        let key = Arc::new(rustls::sign::CertifiedKey::new(
            svid.chain().to_vec(),
            signing,
        ));
        *current = Some((std::time::Instant::now() + self.lifetime / 2, key.clone()));
        Ok(key)
    }

    /// A TLS 1.3 server configuration presenting this certificate, without client
    /// certificates (agents authenticate with their token). Issues the first
    /// certificate now, so that a CA that cannot sign fails at start-up.
    pub fn server_config(self: Arc<Self>) -> Result<Arc<rustls::ServerConfig>, super::Error> {
        self.certified_key()?;
        let provider = self.provider.clone();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| super::Error::Tls {
                id: self.id.to_string(),
                source,
            })?
            .with_no_client_auth()
            .with_cert_resolver(self);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for OwnCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match self.certified_key() {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::error!(error = %e, "cannot issue the identity server's certificate");
                None
            }
        }
    }
}

/// The TLS configuration an agent talks to the identity server with: TLS 1.3, the
/// server's chain must end at `bundle` and name `server_id`; no client certificate (the
/// agent authenticates with its token).
pub fn client_config(
    bundle: &super::TrustBundle,
    server_id: &SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, super::Error> {
    let provider = Arc::new(super::crypto::provider(super::KeyExchange::default()));
    let verifier = super::verify::SpiffeServerVerifier::new(
        Arc::new(bundle.root_store()?),
        &provider,
        server_id.trust_domain(),
        Some(server_id.clone()),
    );
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| super::Error::Tls {
            id: server_id.to_string(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why an agent did not get a certificate from the identity server.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("connecting to the identity server {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the identity server {addr}: {message}")]
    Http { addr: SocketAddr, message: String },
    /// The server answered with a refusal.
    #[error("the identity server refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error(transparent)]
    Identity(#[from] super::Error),
}

/// Asks the identity server at `addr` for a certificate of `id`: a new key, a PKCS#10
/// request signed with it, the agent's `token`. The answer is checked: its leaf must name
/// `id` alone and hold the new key.
pub async fn request_svid(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: &str,
    id: &SpiffeId,
) -> Result<super::Svid, RequestError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
        super::Error::Sign {
            what: format!("a key for {id}"),
            source,
        }
    })?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|source| super::Error::Sign {
            what: format!("a certificate request for {id}"),
            source,
        })?;
    let body = serde_json::to_vec(&CertificateRequest {
        identity: id.to_string(),
        csr,
    })
    .unwrap_or_default();
    let (status, answer) = post(addr, tls, token, body).await?;
    if status != StatusCode::OK {
        return Err(RequestError::Refused {
            status: status.as_u16(),
            message: String::from_utf8_lossy(&answer).into_owned(),
        });
    }
    let answer: CertificateResponse =
        serde_json::from_slice(&answer).map_err(|e| RequestError::Http {
            addr,
            message: format!("not a certificate response: {e}"),
        })?;
    Ok(super::Svid::from_issued(
        id,
        answer.chain.as_bytes(),
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        key.public_key_raw(),
    )?)
}

async fn post(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), RequestError> {
    let http = |message: String| RequestError::Http { addr, message };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| RequestError::Connect { addr, source })?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|source| RequestError::Connect { addr, source })?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::POST)
        .uri(PATH)
        .header(header::HOST, addr.to_string())
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| http(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| http(e.to_string()))?
        .to_bytes();
    Ok((status, bytes))
}
