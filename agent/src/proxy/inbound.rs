//! The HBONE server: terminates tunnels addressed to local workloads.
//!
//! Per connection: a bounded wait for the first byte and a handshake slot of the source
//! address ([`HandshakeLimiter`]), TLS with the certificate of the workload whose address
//! the connection arrived on, the peer's identity from its verified certificate (never from
//! its address), then an HTTP/2 server. Per CONNECT stream: the authority must name the
//! workload whose certificate answered (not another workload of the node, not the proxy's
//! own ports), the [`Authorizer`] must allow the peer, the workload must accept a TCP
//! connection; then `200` and bytes both ways. The tunnel stays registered in [`Tunnels`]
//! while open, and is closed when a change of policy refuses it
//! ([`InboundContext::rejudge`]). Every refusal is logged and counted.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::server::SendResponse;
use hyper::{Request, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    ALPN_H2, Authorizer, Config, Connector, HandshakeLimiter, LocalWorkloads, PeerName,
    ProxyMetrics, Tls, Tunnels,
    authority::connect_target,
    copy::copy_bidirectional,
    drain::{Drain, DrainOutcome, Watch},
    h2stream::H2Stream,
    metrics::{INBOUND, TcpLabels},
};

/// What every inbound connection needs; one is shared by the servers of all local
/// workloads.
pub struct InboundContext {
    pub cfg: Config,
    pub tls: Arc<dyn Tls>,
    pub authz: Arc<dyn Authorizer>,
    pub local: Arc<dyn LocalWorkloads>,
    pub connector: Arc<dyn Connector>,
    pub metrics: Arc<ProxyMetrics>,
    /// Handshakes in progress per source address, over every local workload's listener.
    pub limiter: Arc<HandshakeLimiter>,
    /// The open tunnels, judged again on every change of policy.
    pub tunnels: Tunnels,
    /// Ports of the proxy's own listeners in the workloads' namespaces, which no tunnel
    /// may target (the port a tunnel arrived on is refused in any case).
    pub proxy_ports: Vec<u16>,
}

impl InboundContext {
    /// A context whose handshake bounds come from `cfg`.
    pub fn new(
        cfg: Config,
        tls: Arc<dyn Tls>,
        authz: Arc<dyn Authorizer>,
        local: Arc<dyn LocalWorkloads>,
        connector: Arc<dyn Connector>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            limiter: HandshakeLimiter::new(cfg.max_handshakes_per_source),
            cfg,
            tls,
            authz,
            local,
            connector,
            metrics,
            tunnels: Tunnels::default(),
            proxy_ports: Vec::new(),
        }
    }

    /// Judges every open tunnel again, as a new one would be judged now, and closes those
    /// refused (a new DENY, an ALLOW removed, the destination gone). Call it after every
    /// change of what the [`Authorizer`] and [`LocalWorkloads`] answer; returns how many
    /// tunnels it closed.
    pub fn rejudge(&self) -> usize {
        let revoked = self.tunnels.rejudge(|peer, peer_ip, dst| {
            if !self.local.is_local(dst.ip()) {
                return Err(format!("{} is no longer a workload on this node", dst.ip()));
            }
            self.authz.allow(peer, peer_ip, dst)
        });
        for r in &revoked {
            let name = PeerName {
                addr: SocketAddr::new(r.peer_ip, 0),
                identity: Some(&r.peer),
            };
            info!(peer = %name, dst = %r.dst, reason = %r.reason, "open tunnel closed: no longer allowed");
            self.metrics.failed(INBOUND, "revoked");
        }
        revoked.len()
    }
}

type Shared = InboundContext;

impl std::fmt::Debug for InboundContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundContext")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A running HBONE server.
#[derive(Debug)]
pub struct Inbound {
    addr: SocketAddr,
    drain: Drain,
    accept: JoinHandle<()>,
}

impl Inbound {
    /// Serves HBONE on `listener` until [`Inbound::drain`].
    pub fn spawn(listener: TcpListener, shared: Arc<InboundContext>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (drain, watch) = Drain::new();
        let accept = tokio::spawn(accept_loop(listener, shared, watch));
        Ok(Self {
            addr,
            drain,
            accept,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections (the listener closes, so new ones are refused), tells
    /// clients to open no new streams (GOAWAY), lets open tunnels finish for up to `grace`,
    /// then closes the rest.
    pub async fn drain(&self, grace: Duration) -> DrainOutcome {
        let outcome = self.drain.drain(grace).await;
        self.accept.abort();
        outcome
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, watch: Watch) {
    // Handshakes are the expensive, unauthenticated part: bound them, node-wide per source
    // address and per listener. Connections beyond the listener's bound wait in the
    // kernel's listen queue until a handshake finishes or times out; a source beyond its
    // own bound is closed at once, so it cannot fill that queue's slots for others.
    let handshakes = Arc::new(Semaphore::new(shared.cfg.max_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            () = watch.draining() => break,
            p = handshakes.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = watch.draining() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE or ECONNABORTED: transient, but do not spin.
                warn!(error = %e, "inbound HBONE accept failed");
                shared.metrics.failed(INBOUND, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = shared.limiter.try_acquire(peer.ip()) else {
            // Logged at debug only: a flood would otherwise flood the log too.
            debug!(%peer, "inbound HBONE connection refused: too many handshakes from this address");
            shared.metrics.failed(INBOUND, "handshake_limit");
            continue;
        };
        // Small frames (WINDOW_UPDATE, short writes) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let watch = watch.clone();
        tokio::spawn(async move {
            let conn = handshake(&shared, stream, peer);
            let conn = tokio::select! {
                c = conn => c,
                () = watch.closed() => return,
            };
            drop(slot);
            drop(permit);
            if let Some((tls, identity)) = conn {
                serve_connection(shared, tls, peer, identity, watch).await;
            }
        });
    }
    debug!("inbound HBONE listener closed");
}

type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// TLS handshake and peer authentication; `None` when refused (already logged and counted).
async fn handshake(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(ServerTls, String)> {
    let m = &shared.metrics;
    let refuse = |reason: &'static str, detail: &dyn std::fmt::Display| {
        info!(%peer, reason, %detail, "inbound HBONE connection refused");
        m.failed(INBOUND, reason);
    };
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            refuse("socket", &e);
            return None;
        }
    };
    let Some(config) = shared.tls.server_config(local.ip()) else {
        refuse(
            "no_certificate",
            &format!("no workload certificate for {}", local.ip()),
        );
        return None;
    };
    let config = with_alpn(config);
    let start = Instant::now();
    // A connection that says nothing holds a handshake slot: not for long.
    // (`peek` waits for data; readiness alone may be reported early.)
    let mut first = [0u8; 1];
    if tokio::time::timeout(shared.cfg.first_byte_timeout, stream.peek(&mut first))
        .await
        .is_err()
    {
        m.handshake(INBOUND, "timeout");
        refuse("first_byte_timeout", &"no TLS ClientHello in time");
        return None;
    }
    let accepted = tokio::time::timeout(
        shared.cfg.handshake_timeout,
        TlsAcceptor::from(config).accept(stream),
    )
    .await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            m.handshake(INBOUND, "error");
            refuse("tls_handshake", &e);
            return None;
        }
        Err(_) => {
            m.handshake(INBOUND, "timeout");
            refuse("handshake_timeout", &"no TLS handshake in time");
            return None;
        }
    };
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(ALPN_H2) {
        m.handshake(INBOUND, "error");
        refuse("alpn", &"client did not negotiate h2");
        return None;
    }
    let identity = match conn.peer_certificates() {
        Some(certs) => shared.tls.peer_identity(certs),
        None => Err("no client certificate".to_string()),
    };
    match identity {
        Ok(id) => {
            m.handshake(INBOUND, "ok");
            m.handshake_seconds.observe(start.elapsed().as_secs_f64());
            Some((tls, id))
        }
        Err(reason) => {
            m.handshake(INBOUND, "error");
            refuse("peer_identity", &reason);
            None
        }
    }
}

/// Sets ALPN `h2` on a config that lacks it.
pub(crate) fn with_alpn<T: Clone + AlpnConfig>(config: Arc<T>) -> Arc<T> {
    if config.alpn().iter().any(|p| p == ALPN_H2) {
        return config;
    }
    let mut c = (*config).clone();
    c.set_alpn(vec![ALPN_H2.to_vec()]);
    Arc::new(c)
}

/// The ALPN list of client and server configs alike.
pub(crate) trait AlpnConfig {
    fn alpn(&self) -> &[Vec<u8>];
    fn set_alpn(&mut self, alpn: Vec<Vec<u8>>);
}

impl AlpnConfig for rustls::ServerConfig {
    fn alpn(&self) -> &[Vec<u8>] {
        &self.alpn_protocols
    }
    fn set_alpn(&mut self, alpn: Vec<Vec<u8>>) {
        self.alpn_protocols = alpn;
    }
}

impl AlpnConfig for rustls::ClientConfig {
    fn alpn(&self) -> &[Vec<u8>] {
        &self.alpn_protocols
    }
    fn set_alpn(&mut self, alpn: Vec<Vec<u8>>) {
        self.alpn_protocols = alpn;
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    tls: ServerTls,
    peer: SocketAddr,
    identity: String,
    watch: Watch,
) {
    // The address the connection reached: the workload whose certificate answered.
    let Ok(local) = tls.get_ref().0.local_addr() else {
        shared.metrics.failed(INBOUND, "socket");
        return;
    };
    let mut builder = h2::server::Builder::new();
    builder.max_concurrent_streams(shared.cfg.max_streams_per_connection);
    super::tune_h2_server(&mut builder);
    let name = PeerName {
        addr: peer,
        identity: Some(&identity),
    };
    let handshake = tokio::time::timeout(shared.cfg.handshake_timeout, builder.handshake(tls));
    let mut conn = match handshake.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            info!(peer = %name, error = %e, "inbound HTTP/2 handshake failed");
            shared.metrics.failed(INBOUND, "h2_handshake");
            return;
        }
        Err(_) => {
            info!(peer = %name, "inbound HTTP/2 handshake timed out");
            shared.metrics.failed(INBOUND, "handshake_timeout");
            return;
        }
    };
    let identity: Arc<str> = identity.into();
    let dst_identity: Option<Arc<str>> = shared.tls.workload_identity(local.ip()).map(Into::into);
    let mut goaway_sent = false;
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            () = watch.draining(), if !goaway_sent => {
                // Streams already open go on; the client opens new ones elsewhere.
                conn.graceful_shutdown();
                goaway_sent = true;
                continue;
            }
            () = watch.closed() => break,
        };
        match next {
            Some(Ok((_, mut respond))) if watch.is_draining() => {
                // Streams that crossed our GOAWAY on the wire: the client retries elsewhere.
                let name = PeerName {
                    addr: peer,
                    identity: Some(&identity),
                };
                info!(peer = %name, reason = "draining", "inbound tunnel refused");
                shared.metrics.failed(INBOUND, "draining");
                let mut resp = Response::new(());
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                let _ = respond.send_response(resp, true);
            }
            Some(Ok((req, respond))) => {
                let shared = shared.clone();
                let identity = identity.clone();
                let dst_identity = dst_identity.clone();
                let watch = watch.clone();
                tokio::spawn(async move {
                    let stream = Stream {
                        shared: &shared,
                        peer,
                        local,
                        identity: &identity,
                        dst_identity: dst_identity.as_deref(),
                        watch: &watch,
                    };
                    stream.serve(req, respond).await;
                });
            }
            Some(Err(e)) => {
                // Broken or abusive connections (too many resets, bad frames) end here.
                let name = PeerName {
                    addr: peer,
                    identity: Some(&identity),
                };
                info!(peer = %name, error = %e, "inbound HTTP/2 connection failed");
                shared.metrics.failed(INBOUND, "h2_connection");
                break;
            }
            None => break,
        }
    }
}

/// One CONNECT stream.
struct Stream<'a> {
    shared: &'a Shared,
    peer: SocketAddr,
    /// Where the connection arrived: the workload's address and the HBONE port.
    local: SocketAddr,
    identity: &'a Arc<str>,
    dst_identity: Option<&'a str>,
    watch: &'a Watch,
}

impl Stream<'_> {
    fn refuse(
        &self,
        respond: &mut SendResponse<Bytes>,
        status: StatusCode,
        reason: &'static str,
        detail: &dyn std::fmt::Display,
    ) {
        let name = PeerName {
            addr: self.peer,
            identity: Some(self.identity.as_ref()),
        };
        info!(peer = %name, status = status.as_u16(), reason, %detail, "inbound tunnel refused");
        self.shared.metrics.failed(INBOUND, reason);
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        // The peer may have reset the stream already; nothing more to tell it then.
        let _ = respond.send_response(resp, true);
    }

    async fn serve(self, req: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
        let dst = match connect_target(
            req.method().as_str(),
            req.uri().authority().map(|a| a.as_str()),
        ) {
            Ok(dst) => dst,
            Err(e) => {
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
                return self.refuse(&mut respond, status, e.reason(), &e);
            }
        };
        if !self.shared.local.is_local(dst.ip()) {
            let detail = format!("{dst} is not a workload on this node");
            return self.refuse(&mut respond, StatusCode::BAD_REQUEST, "not_local", &detail);
        }
        // The certificate that answered is the one of the workload at the address the
        // connection reached: the tunnel may only end there, or a peer that may reach
        // one workload could reach every other one of the node through it.
        if !self.shared.local.same_workload(self.local.ip(), dst.ip()) {
            let detail = format!("{dst} is not the workload reached at {}", self.local);
            return self.refuse(
                &mut respond,
                StatusCode::BAD_REQUEST,
                "wrong_workload",
                &detail,
            );
        }
        if dst.port() == self.local.port() || self.shared.proxy_ports.contains(&dst.port()) {
            let detail = format!("{dst} is a port of the proxy itself");
            return self.refuse(&mut respond, StatusCode::BAD_REQUEST, "proxy_port", &detail);
        }
        // Registered before it is authorized: a policy change from now on judges it again.
        let registration = self
            .shared
            .tunnels
            .register(self.identity.clone(), self.peer.ip(), dst);
        if let Err(why) = self.shared.authz.allow(self.identity, self.peer.ip(), dst) {
            let detail = format!("to {dst}: {why}");
            return self.refuse(&mut respond, StatusCode::FORBIDDEN, "denied", &detail);
        }
        // The client workload's address is the source the workload sees, when the connector
        // can preserve it (the peer of an HBONE connection is the client pod itself).
        let connect = async {
            self.shared
                .connector
                .workload_socket(self.peer.ip(), dst)
                .await?
                .connect(dst)
                .await
        };
        let upstream = tokio::time::timeout(self.shared.cfg.connect_timeout, connect).await;
        let upstream = match upstream {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                s
            }
            Ok(Err(e)) => {
                let detail = format!("connecting to {dst}: {e}");
                let status = StatusCode::SERVICE_UNAVAILABLE;
                return self.refuse(&mut respond, status, "connect_failed", &detail);
            }
            Err(_) => {
                let detail = format!("connecting to {dst} timed out");
                let status = StatusCode::GATEWAY_TIMEOUT;
                return self.refuse(&mut respond, status, "connect_timeout", &detail);
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "client left before the tunnel opened");
                return;
            }
        };
        let tunnel = H2Stream::new(send, req.into_body());
        let m = &self.shared.metrics;
        let labels = TcpLabels::tunnel(
            m.directory(),
            "destination",
            (self.peer.ip(), Some(self.identity.as_ref())),
            (dst.ip(), self.dst_identity),
        );
        m.opened.get_or_create(&labels).inc();
        let sent = m.sent.get_or_create(&labels).clone();
        let received = m.received.get_or_create(&labels).clone();
        let result = copy_bidirectional(
            tunnel,
            upstream,
            self.shared.cfg.tunnel_idle_timeout,
            async {
                tokio::select! {
                    () = self.watch.closed() => {}
                    () = registration.revoked() => {}
                }
            },
            |n| {
                sent.inc_by(n);
            },
            |n| {
                received.inc_by(n);
            },
        )
        .await;
        m.closed.get_or_create(&labels).inc();
        if let Err(e) = result {
            let name = PeerName {
                addr: self.peer,
                identity: Some(self.identity.as_ref()),
            };
            debug!(peer = %name, %dst, error = %e, "inbound tunnel ended with an error");
        }
    }
}
