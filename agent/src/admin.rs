//! Admin, Prometheus and readiness endpoints, served away from the data path.
//!
//! - admin (localhost): `/healthz`, `/readyz`, `/metrics`, `/debug/status`, `/debug/services`
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
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use mycel_common::service::ServiceKey;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{
    datapath::{self, KernelFeature, MapService, ProgramStatus},
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
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
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
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(route(role, &shared, req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(error = %e, %peer, "admin connection ended with an error");
                }
            });
        }
    }))
}

fn route(role: Role, shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match (role, req.uri().path()) {
        (Role::Admin, "/healthz") => text(StatusCode::OK, "ok\n"),
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
