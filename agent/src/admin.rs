//! Admin, Prometheus and readiness endpoints, served away from the data path.
//!
//! - admin (localhost): `/healthz`, `/readyz`, `/metrics`, `/debug/status`, `/debug/services`,
//!   `/debug/flows` (recent flows as JSON; `?follow=1` streams JSON lines; filters `from`,
//!   `to`, `verdict`, `namespace`, `limit`)
//! - metrics: `/metrics`
//! - readiness: `/healthz/ready`, `/readyz`

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use mycel_common::service::ServiceKey;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::{debug, warn};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::{
    datapath::{self, KernelFeature, MapService, ProgramStatus},
    flows::{Filter, FlowsHandle, FollowBody, Verdict},
    identity::{CertInfo, TrustBundle},
    metrics::KernelCounters,
    state::ObjectRef,
};

/// What `/debug/status` reports and `mycel status` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub ready: bool,
    pub source: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub programs: Vec<ProgramStatus>,
    /// Kernel features probed at start-up and what is degraded without them.
    pub kernel_features: Vec<KernelFeature>,
    /// Local workloads' interfaces with the policy and flow programs, as `name (mode)`.
    pub tc_attachments: Vec<String>,
    /// AuthorizationPolicies in force.
    pub policies: usize,
    /// Service frontends and backend slots programmed.
    pub services: usize,
    pub backends: usize,
    /// Frontends found in pinned maps at start-up (taken over from a previous agent).
    pub taken_over: usize,
    /// Problems currently standing in the input.
    pub errors_current: usize,
    /// The most recent problem (input or datapath), if any.
    pub last_error: Option<String>,
    /// Counters of the kernel programs, by name.
    pub kernel_counters: Vec<(String, u64)>,
    /// Local workloads the mesh proxy serves (listening in their namespaces).
    #[serde(default)]
    pub mesh_workloads: usize,
    /// Local enrolled workloads the proxy does not serve yet, with the reason (such as
    /// STRICT not enforced yet: their TC programs are not attached).
    #[serde(default)]
    pub mesh_pending: Vec<(String, String)>,
    /// The certificates of the local workloads' identities, sorted by identity.
    #[serde(default)]
    pub certificates: Vec<CertInfo>,
    /// The CA certificates peers' chains may end at (two during a CA rotation).
    #[serde(default)]
    pub trust_bundle: Vec<TrustAnchor>,
    /// The TLS key exchange groups mesh connections offer, most preferred first.
    #[serde(default)]
    pub key_exchange: Vec<String>,
    /// The subject of the CA that signs this node's workload certificates.
    #[serde(default)]
    pub signing_ca: String,
    /// Reloads of the CA directory, and why the files on disk are not in force while they
    /// are not.
    #[serde(default)]
    pub ca_reload: crate::identity::ReloadStatus,
    /// Local identities without a (renewed) certificate because the last request to the
    /// identity server failed, and why.
    #[serde(default)]
    pub certificate_errors: std::collections::BTreeMap<String, String>,
}

/// One CA certificate of the trust bundle, as `mycel status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustAnchor {
    /// The certificate's subject, e.g. `O=cluster.local, CN=mycel CA for cluster.local`.
    pub subject: String,
    /// Seconds since the Unix epoch.
    #[serde(with = "unix_seconds")]
    pub not_after: SystemTime,
}

/// A time as whole seconds since the Unix epoch, as [`CertInfo`] has its times.
mod unix_seconds {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let secs = u64::deserialize(d)?;
        UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .ok_or_else(|| serde::de::Error::custom(format!("{secs} s after 1970 is out of range")))
    }
}

impl TrustAnchor {
    /// The CAs of `bundle`, in its order. A certificate that does not parse (the bundle
    /// checked each when it was built, so this does not happen) is shown by its error.
    pub fn from_bundle(bundle: &TrustBundle) -> Vec<TrustAnchor> {
        bundle
            .certificates()
            .iter()
            .map(|der| match X509Certificate::from_der(der) {
                Ok((_, cert)) => TrustAnchor {
                    subject: cert.subject().to_string(),
                    not_after: UNIX_EPOCH
                        + Duration::from_secs(
                            u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
                        ),
                },
                Err(e) => TrustAnchor {
                    subject: format!("(unreadable certificate: {e})"),
                    not_after: UNIX_EPOCH,
                },
            })
            .collect()
    }
}

/// State the endpoints read; written by the agent's main loop.
#[derive(Debug)]
pub struct Shared {
    pub ready: AtomicBool,
    pub status: RwLock<Status>,
    /// Names of the frontends this agent programmed, to annotate map dumps.
    pub owners: RwLock<HashMap<ServiceKey, (ObjectRef, Option<String>)>>,
    pub registry: Registry,
    pub kernel: Arc<KernelCounters>,
    pub pin_dir: PathBuf,
}

impl Shared {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn status(&self) -> Status {
        let mut s = self.status.read().map(|s| s.clone()).unwrap_or_default();
        s.ready = self.is_ready();
        s.kernel_counters = self
            .kernel
            .read()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        s
    }

    fn services(&self) -> Result<Vec<MapService>, datapath::Error> {
        let owners = self.owners.read().map(|o| o.clone()).unwrap_or_default();
        datapath::dump_pinned(&self.pin_dir, &owners)
    }

    fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Metrics,
    Readiness,
}

/// Binds `addr` and serves `role`'s endpoints until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    serve_with_flows(addr, role, shared, None)
        .await
        .map(|(task, _)| task)
}

/// Like [`serve`], with `/debug/flows` answered from `flows` (without it, that endpoint
/// says flow observability is off). Also returns the bound address (for port 0).
pub async fn serve_with_flows(
    addr: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
    flows: Option<FlowsHandle>,
) -> std::io::Result<(tokio::task::JoinHandle<()>, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, ?role, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let shared = shared.clone();
            let flows = flows.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let shared = shared.clone();
                    let flows = flows.clone();
                    async move {
                        let resp = if role == Role::Admin && req.uri().path() == "/debug/flows" {
                            flows_route(flows.as_ref(), &req)
                        } else {
                            route(role, &shared, req).map(Either::Left)
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(error = %e, %peer, "admin connection ended with an error");
                }
            });
        }
    });
    Ok((task, bound))
}

/// Largest `limit` `/debug/flows` accepts (without one it returns the whole ring).
const FLOWS_LIMIT_MAX: usize = 1 << 20;

/// What `/debug/flows` was asked for.
#[derive(Debug, Default, PartialEq, Eq)]
struct FlowsQuery {
    filter: Filter,
    limit: Option<usize>,
    follow: bool,
}

fn parse_flows_query(query: &str) -> Result<FlowsQuery, String> {
    let mut q = FlowsQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| format!("{k}: invalid percent-encoding"))?;
        let some = |v: String| (!v.is_empty()).then_some(v);
        match k {
            "from" => q.filter.from = some(v),
            "to" => q.filter.to = some(v),
            "namespace" => q.filter.namespace = some(v),
            "verdict" => {
                q.filter.verdict = match v.to_ascii_lowercase().as_str() {
                    "" => None,
                    "forwarded" => Some(Verdict::Forwarded),
                    "dropped" => Some(Verdict::Dropped),
                    _ => return Err(format!("verdict {v:?}: expected forwarded or dropped")),
                }
            }
            "limit" => {
                q.limit = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| *n <= FLOWS_LIMIT_MAX)
                        .ok_or_else(|| {
                            format!("limit {v:?}: expected a whole number up to {FLOWS_LIMIT_MAX}")
                        })?,
                )
            }
            "follow" => {
                q.follow = match v.as_str() {
                    "" | "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err(format!("follow {v:?}: expected 1 or 0")),
                }
            }
            _ => {
                return Err(format!(
                    "unknown parameter {k:?} (known: from, to, verdict, namespace, limit, follow)"
                ));
            }
        }
    }
    Ok(q)
}

/// Decodes `%XX` and `+` in a query value.
fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

type FlowsBody = Either<Full<Bytes>, FollowBody>;

fn flows_route(flows: Option<&FlowsHandle>, req: &Request<Incoming>) -> Response<FlowsBody> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n").map(Either::Left);
    }
    let Some(flows) = flows else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "flow observability is not running in this agent\n",
        )
        .map(Either::Left);
    };
    let q = match parse_flows_query(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => {
            return text(StatusCode::BAD_REQUEST, &format!("invalid query: {e}\n"))
                .map(Either::Left);
        }
    };
    if q.follow {
        let body = flows.follow(q.filter, q.limit.unwrap_or(0));
        let mut r = Response::new(Either::Right(body));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-ndjson"),
        );
        return r;
    }
    let list = flows.query(&q.filter, q.limit);
    let list: Vec<&crate::flows::Flow> = list.iter().map(|f| &**f).collect();
    match serde_json::to_vec(&list) {
        Ok(body) => {
            let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")).map(Either::Left),
    }
}

fn route(role: Role, shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match (role, req.uri().path()) {
        (Role::Admin | Role::Readiness, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Role::Admin | Role::Readiness, "/readyz") | (Role::Readiness, "/healthz/ready") => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: initial state not programmed yet\n",
                )
            }
        }
        (Role::Admin | Role::Metrics, "/metrics") => match shared.metrics_text() {
            Ok(body) => Response::builder()
                .header(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            ),
        },
        (Role::Admin, "/debug/status") => json(&shared.status()),
        (Role::Admin, "/debug/services") => match shared.services() {
            Ok(list) => json(&list),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

fn json<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::rt::TokioIo;
    use mycel_common::flow::FLOW_EVENT_NEW;

    use super::*;
    use crate::flows::{
        Flow,
        record::tests::{admin_with_two_flows, event, source_ports},
    };

    #[test]
    fn flows_queries_parse_and_name_bad_parameters() {
        let q = parse_flows_query(
            "from=shop%2Fa&to=10.0.0.2&verdict=DROPPED&namespace=shop&limit=5&follow=1",
        )
        .unwrap();
        assert_eq!(q.filter.from.as_deref(), Some("shop/a"));
        assert_eq!(q.filter.to.as_deref(), Some("10.0.0.2"));
        assert_eq!(q.filter.verdict, Some(Verdict::Dropped));
        assert_eq!(q.filter.namespace.as_deref(), Some("shop"));
        assert_eq!(q.limit, Some(5));
        assert!(q.follow);
        assert_eq!(parse_flows_query("").unwrap(), FlowsQuery::default());
        for (bad, word) in [
            ("verdict=maybe", "verdict"),
            ("limit=-1", "limit"),
            ("colour=red", "colour"),
            ("from=%zz", "from"),
            ("follow=yes", "follow"),
        ] {
            let e = parse_flows_query(bad).unwrap_err();
            assert!(e.contains(word), "{bad}: {e}");
        }
    }

    async fn request(addr: SocketAddr, path: &str) -> Response<Incoming> {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.send_request(req).await.unwrap()
    }

    async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
        let resp = request(addr, path).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Reads from `body` until it holds `n` whole lines.
    async fn lines(body: &mut Incoming, buf: &mut String, n: usize) -> Vec<String> {
        while buf.matches('\n').count() < n {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("follow lines within 5 s")
                .expect("the stream goes on")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                buf.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let i = buf.find('\n').unwrap();
            out.push(buf[..i].to_string());
            buf.replace_range(..=i, "");
        }
        out
    }

    #[tokio::test]
    async fn debug_flows_lists_filters_and_follows() {
        let (task, addr, mut flows, names, shared, _dir) = admin_with_two_flows().await;

        let (status, body) = get(addr, "/debug/flows").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let list: Vec<Flow> = serde_json::from_str(&body).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].verdict, Verdict::Dropped, "newest last");

        let (_, body) = get(addr, "/debug/flows?verdict=forwarded&from=shop%2Fa").await;
        let list: Vec<Flow> = serde_json::from_str(&body).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].destination.address.port(), 8080);

        let (status, body) = get(addr, "/debug/flows?verdict=sideways").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("verdict"), "{body}");

        // The metrics endpoint carries the flow series.
        let (_, metrics) = get(addr, "/metrics").await;
        assert!(
            metrics.contains("hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"TCP\"} 1"),
            "{metrics}"
        );

        // Follow: the backlog asked for, then live flows as they come.
        let resp = request(addr, "/debug/flows?follow=1&limit=1").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut buf = String::new();
        let first = lines(&mut body, &mut buf, 1).await;
        let f: Flow = serde_json::from_str(&first[0]).unwrap();
        assert_eq!(f.verdict, Verdict::Dropped);
        for port in [1, 2] {
            flows.handle(
                &event(
                    FLOW_EVENT_NEW,
                    &format!("10.0.0.1:{port}"),
                    "10.0.0.2:80",
                    6,
                ),
                &names,
            );
        }
        let live = lines(&mut body, &mut buf, 2).await;
        let ports = source_ports(live.iter().map(String::as_str));
        assert_eq!(ports, [1, 2]);

        // Without the flow pipeline the endpoint says so.
        let (_, bare) = serve_with_flows("127.0.0.1:0".parse().unwrap(), Role::Admin, shared, None)
            .await
            .unwrap();
        let (status, _) = get(bare, "/debug/flows").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        task.abort();
    }
}
