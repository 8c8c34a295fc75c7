//! The HBONE client: carries local clients' TCP connections to remote HBONE servers.
//!
//! Connections are pooled by (client workload, server address, expected server identity):
//! one mutual-TLS connection carries many CONNECT streams, up to the number of concurrent
//! streams the server allows; when all pooled connections for a key are full another one
//! is opened. A pooled connection without streams closes after the pool idle timeout.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use hyper::{Method, Request, StatusCode, Version};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::{
    ALPN_H2, Config, Connector, CopyStats, Error, HostConnector, PeerName, ProxyMetrics, Tls,
    copy::copy_bidirectional,
    drain::{Drain, DrainOutcome},
    h2stream::H2Stream,
    inbound::with_alpn,
    metrics::{OUTBOUND, TcpLabels},
};

/// Largest read of the client's first bytes, sent while the CONNECT is answered.
const EARLY_CHUNK: usize = 16 * 1024;
/// At most this much of the client's data is sent before the CONNECT is answered.
const EARLY_LIMIT: u64 = 64 * 1024;

/// Where a local client's connection should go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OutboundRequest {
    /// The client workload's address: its certificate is presented.
    pub src_ip: IpAddr,
    /// The original destination, sent as the CONNECT authority.
    pub dst: SocketAddr,
    /// The HBONE server to connect to (for ztunnel the destination pod's IP, port 15008).
    pub hbone: SocketAddr,
    /// The SPIFFE identity the server must prove, when known.
    pub expected_identity: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src_ip: IpAddr,
    hbone: SocketAddr,
    expected_identity: Option<String>,
}

#[derive(Debug)]
struct ConnState {
    active: usize,
    last_used: Instant,
    closed: bool,
}

#[derive(Debug)]
struct Pooled {
    send: SendRequest<Bytes>,
    state: Arc<Mutex<ConnState>>,
}

/// Gives a stream slot back to its connection when the tunnel ends.
struct Slot(Arc<Mutex<ConnState>>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = lock(&self.0);
        s.active = s.active.saturating_sub(1);
        s.last_used = Instant::now();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves counters that are still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Connections = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

/// The HBONE client with its connection pool.
#[derive(Debug)]
pub struct Outbound {
    cfg: Config,
    tls: Arc<dyn Tls>,
    connector: Arc<dyn Connector>,
    metrics: Arc<ProxyMetrics>,
    pool: Mutex<HashMap<PoolKey, Connections>>,
    drain: Drain,
}

impl std::fmt::Debug for dyn Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Outbound {
    /// A client presenting certificates from `tls`; connections open on first use.
    pub fn new(cfg: Config, tls: Arc<dyn Tls>, metrics: Arc<ProxyMetrics>) -> Self {
        Self::with_connector(cfg, tls, Arc::new(HostConnector), metrics)
    }

    /// As [`Outbound::new`], opening the outer connections with sockets from `connector`
    /// (in the client workload's network namespace, so they carry its address).
    pub fn with_connector(
        cfg: Config,
        tls: Arc<dyn Tls>,
        connector: Arc<dyn Connector>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        // The first watch is not needed: each tunnel takes its own.
        let (drain, _) = Drain::new();
        Self {
            cfg,
            tls,
            connector,
            metrics,
            pool: Mutex::new(HashMap::new()),
            drain,
        }
    }

    /// Open pooled connections (for tests and debugging).
    pub fn pooled_connections(&self) -> usize {
        let pool = lock(&self.pool);
        pool.values()
            .filter_map(|c| c.try_lock().ok())
            .flat_map(|c| c.iter().map(|p| !lock(&p.state).closed).collect::<Vec<_>>())
            .filter(|open| *open)
            .count()
    }

    /// Refuses new tunnels, lets open ones finish for up to `grace`, then closes them.
    pub async fn drain(&self, grace: Duration) -> DrainOutcome {
        self.drain.drain(grace).await
    }

    /// Carries `client` through an HBONE tunnel to `req.dst`, returning when the tunnel
    /// ends. On a refusal or failure the client connection is closed and the error says why
    /// (it is also logged and counted).
    pub async fn proxy<S>(&self, client: S, req: OutboundRequest) -> Result<CopyStats, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let result = self.tunnel(client, &req).await;
        if let Err(e) = &result {
            info!(src = %req.src_ip, dst = %req.dst, hbone = %req.hbone, error = %e,
                  "outbound tunnel failed");
            self.metrics.failed(OUTBOUND, reason_of(e));
        }
        result
    }

    async fn tunnel<S>(&self, mut client: S, req: &OutboundRequest) -> Result<CopyStats, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let watch = self.drain.watch().ok_or(Error::Draining)?;
        let (mut send, slot) = self.checkout(req).await?;
        // A connection that cannot take a stream (GOAWAY, broken) leaves the pool.
        let h2_err = |source| {
            lock(&slot.0).closed = true;
            Error::H2 {
                peer: req.hbone,
                source,
            }
        };
        let authority = req.dst.to_string();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.as_str())
            .version(Version::HTTP_2)
            .body(())
            .map_err(|e| Error::Tunnel {
                peer: req.hbone,
                dst: req.dst,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
        send = send.ready().await.map_err(h2_err)?;
        let (response, mut stream) = send.send_request(request, false).map_err(h2_err)?;
        // Client-first protocols (HTTP, TLS) write before the server says anything: what
        // the client sends while the CONNECT is being answered goes along at once, instead
        // of one tunnel round trip later. Bounded, so that a slow answer cannot make the
        // stream buffer without limit; a refusal discards it, as a closed port would.
        let mut early = 0u64;
        let response = {
            let deadline = tokio::time::sleep(self.cfg.connect_timeout * 2);
            tokio::pin!(deadline);
            tokio::pin!(response);
            let mut buf = vec![0u8; EARLY_CHUNK];
            let mut reading = true;
            loop {
                tokio::select! {
                    biased;
                    r = &mut response => break r.map_err(h2_err)?,
                    () = &mut deadline => return Err(Error::ConnectTimeout(req.dst)),
                    n = client.read(&mut buf), if reading => match n {
                        // End of the client's writes: the copy below sees it again and
                        // ends the stream.
                        Ok(0) => reading = false,
                        Ok(n) => {
                            stream
                                .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                                .map_err(h2_err)?;
                            early += n as u64;
                            reading = early < EARLY_LIMIT;
                        }
                        Err(source) => {
                            return Err(Error::Tunnel {
                                peer: req.hbone,
                                dst: req.dst,
                                source,
                            });
                        }
                    },
                }
            }
        };
        if response.status() != StatusCode::OK {
            return Err(Error::Refused {
                peer: req.hbone,
                dst: req.dst,
                status: response.status().as_u16(),
            });
        }
        let tunnel = H2Stream::new(stream, response.into_body());
        let m = &self.metrics;
        let src_id = self.tls.workload_identity(req.src_ip);
        let labels = TcpLabels::tunnel(
            m.directory(),
            "source",
            (req.src_ip, src_id.as_deref()),
            (req.dst.ip(), req.expected_identity.as_deref()),
        );
        m.opened.get_or_create(&labels).inc();
        let sent = m.sent.get_or_create(&labels).clone();
        let received = m.received.get_or_create(&labels).clone();
        sent.inc_by(early);
        let result = copy_bidirectional(
            client,
            tunnel,
            self.cfg.tunnel_idle_timeout,
            watch.closed(),
            |n| {
                sent.inc_by(n);
            },
            |n| {
                received.inc_by(n);
            },
        )
        .await;
        m.closed.get_or_create(&labels).inc();
        drop(slot);
        result
            .map(|stats| CopyStats {
                a_to_b: stats.a_to_b + early,
                ..stats
            })
            .map_err(|source| Error::Tunnel {
                peer: req.hbone,
                dst: req.dst,
                source,
            })
    }

    /// A connection with a free stream slot for `req`, opening one if needed.
    async fn checkout(&self, req: &OutboundRequest) -> Result<(SendRequest<Bytes>, Slot), Error> {
        let key = PoolKey {
            src_ip: req.src_ip,
            hbone: req.hbone,
            expected_identity: req.expected_identity.clone(),
        };
        let conns = lock(&self.pool).entry(key).or_default().clone();
        // Held while opening, so concurrent tunnels to one key share the new connection
        // instead of each opening their own.
        let mut conns = conns.lock().await;
        conns.retain(|p| !lock(&p.state).closed);
        // The least busy connection that can take a stream. One TLS connection is served
        // by one task, so one CPU: while every connection already carries a tunnel and
        // the pool is below its bound, a new connection lets concurrent tunnels use more
        // cores (sequential tunnels keep reusing the first one).
        let least = conns
            .iter()
            .filter(|p| {
                let s = lock(&p.state);
                !s.closed && s.active < p.send.current_max_send_streams()
            })
            .min_by_key(|p| lock(&p.state).active);
        if let Some(p) = least {
            let mut s = lock(&p.state);
            if s.active == 0 || conns.len() >= self.cfg.max_connections_per_destination {
                s.active += 1;
                return Ok((p.send.clone(), Slot(p.state.clone())));
            }
        }
        let send = self.connect(req).await?;
        let state = Arc::new(Mutex::new(ConnState {
            active: 1,
            last_used: Instant::now(),
            closed: false,
        }));
        conns.push(Pooled {
            send: send.0.clone(),
            state: state.clone(),
        });
        let idle = self.cfg.pool_idle_timeout;
        tokio::spawn(drive(send.1, state.clone(), idle, req.hbone));
        Ok((send.0, Slot(state)))
    }

    async fn connect(
        &self,
        req: &OutboundRequest,
    ) -> Result<(SendRequest<Bytes>, h2::client::Connection<ClientTls, Bytes>), Error> {
        let m = &self.metrics;
        let config = self
            .tls
            .client_config(req.src_ip, req.expected_identity.as_deref())
            .ok_or(Error::NoCertificate(req.src_ip))?;
        let config = with_alpn(config);
        let connect = async {
            self.connector
                .hbone_socket(req.src_ip, req.hbone)
                .await?
                .connect(req.hbone)
                .await
        };
        let tcp = tokio::time::timeout(self.cfg.connect_timeout, connect)
            .await
            .map_err(|_| Error::ConnectTimeout(req.hbone))?
            .map_err(|e| Error::Connect(req.hbone, e))?;
        // Many small DATA frames: do not let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
        let start = Instant::now();
        let handshake = async {
            let tls = TlsConnector::from(config)
                .connect(ServerName::IpAddress(req.hbone.ip().into()), tcp)
                .await
                .map_err(|source| Error::Tls {
                    peer: req.hbone,
                    source,
                })?;
            let (_, conn) = tls.get_ref();
            if conn.alpn_protocol() != Some(ALPN_H2) {
                return Err(Error::Alpn(req.hbone));
            }
            // The verifier in the config already checked the identity; checking again
            // here keeps a misconfigured verifier from silently accepting anyone.
            if let Some(expected) = &req.expected_identity {
                let actual = conn
                    .peer_certificates()
                    .ok_or_else(|| "no server certificate".to_string())
                    .and_then(|c| self.tls.peer_identity(c))
                    .map_err(|reason| Error::PeerIdentity {
                        peer: req.hbone,
                        reason,
                    })?;
                if &actual != expected {
                    return Err(Error::UnexpectedPeer {
                        peer: req.hbone,
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            let mut builder = h2::client::Builder::new();
            super::tune_h2_client(&mut builder);
            builder.initial_max_send_streams(self.cfg.max_streams_per_connection as usize);
            builder.handshake(tls).await.map_err(|source| Error::H2 {
                peer: req.hbone,
                source,
            })
        };
        match tokio::time::timeout(self.cfg.handshake_timeout, handshake).await {
            Ok(Ok(c)) => {
                m.handshake(OUTBOUND, "ok");
                m.handshake_seconds.observe(start.elapsed().as_secs_f64());
                let name = PeerName {
                    addr: req.hbone,
                    identity: req.expected_identity.as_deref(),
                };
                debug!(peer = %name, "outbound HBONE connection opened");
                Ok(c)
            }
            Ok(Err(e)) => {
                m.handshake(OUTBOUND, "error");
                Err(e)
            }
            Err(_) => {
                m.handshake(OUTBOUND, "timeout");
                Err(Error::HandshakeTimeout(req.hbone))
            }
        }
    }
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Drives one pooled connection until it fails, the server closes it, or it has been
/// without streams for `idle`.
async fn drive(
    mut conn: h2::client::Connection<ClientTls, Bytes>,
    state: Arc<Mutex<ConnState>>,
    idle: Duration,
    peer: SocketAddr,
) {
    loop {
        // While tunnels are open the connection is not idle: look again later.
        let deadline = {
            let s = lock(&state);
            if s.active > 0 {
                Instant::now() + idle
            } else {
                s.last_used + idle
            }
        };
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "pooled HBONE connection ended");
                }
                break;
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                let mut s = lock(&state);
                if s.active == 0 && s.last_used.elapsed() >= idle {
                    s.closed = true;
                    debug!(%peer, "pooled HBONE connection idle, closing");
                    return;
                }
            }
        }
    }
    lock(&state).closed = true;
}

fn reason_of(e: &Error) -> &'static str {
    match e {
        Error::Connect(..) => "connect_failed",
        Error::ConnectTimeout(_) => "connect_timeout",
        Error::NoCertificate(_) => "no_certificate",
        Error::Tls { .. } => "tls_handshake",
        Error::HandshakeTimeout(_) => "handshake_timeout",
        Error::Alpn(_) => "alpn",
        Error::PeerIdentity { .. } | Error::UnexpectedPeer { .. } => "peer_identity",
        Error::H2 { .. } => "h2",
        Error::Refused { .. } => "refused",
        Error::Tunnel { .. } => "tunnel",
        Error::Draining => "draining",
    }
}
