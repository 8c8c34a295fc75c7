//! The node proxy's HBONE tunnels: TCP carried in HTTP/2 CONNECT streams over mutual TLS.
//!
//! The wire format is the one Istio ambient's ztunnel speaks, so mycel nodes and ztunnel
//! nodes can reach each other: the outer connection is TLS 1.3 with ALPN `h2`, addressed to
//! the destination pod's IP on port 15008; each tunnelled TCP connection is one HTTP/2
//! stream whose method is `CONNECT` and whose `:authority` is the destination `ip:port`;
//! the server answers `200` and from then on the stream carries the raw bytes both ways.
//! Ending the stream is a TCP half-close.
//!
//! - [`Inbound`] terminates tunnels: it presents the certificate of the destination
//!   workload (chosen by the local address the connection arrived on), authenticates the
//!   peer by its certificate, asks the [`Authorizer`] and connects to the local workload.
//! - [`Outbound`] originates them: it presents the certificate of the client workload,
//!   checks the server's identity and multiplexes many tunnels over pooled connections.
//!
//! Certificates and policy come from outside through the [`Tls`], [`Authorizer`] and
//! [`LocalWorkloads`] traits, so this module knows nothing about how identities are issued
//! or how policy is compiled.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::CertificateDer;
use serde::Serialize;
use tokio::net::TcpSocket;

mod authority;
mod copy;
mod drain;
mod h2stream;
mod inbound;
mod limit;
mod metrics;
mod outbound;
#[cfg(test)]
mod tests;
mod tunnels;

pub use authority::{AuthorityError, HeadError, connect_target, parse_authority};
pub use copy::CopyStats;
pub use drain::DrainOutcome;
pub use inbound::{Inbound, InboundContext};
pub use limit::HandshakeLimiter;
pub(crate) use metrics::OUTBOUND;
pub use metrics::ProxyMetrics;
pub use outbound::{Outbound, OutboundRequest};
pub use tunnels::Tunnels;

/// The ALPN protocol both ends of an HBONE connection must agree on.
pub const ALPN_H2: &[u8] = b"h2";
/// The port HBONE servers listen on, by convention of Istio ambient.
pub const HBONE_PORT: u16 = 15008;

/// Default for [`Config::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`Config::handshake_timeout`]: a TLS 1.3 handshake is one round trip.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`Config::first_byte_timeout`]: every TLS client sends its ClientHello as
/// soon as TCP is connected.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default for [`Config::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Default for [`Config::max_handshakes_per_source`]: far more than one client opens at
/// once (the pool opens a few connections per destination), far less than
/// [`DEFAULT_MAX_HANDSHAKES`].
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Default for [`Config::max_streams_per_connection`].
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Default for [`Config::max_connections_per_destination`]: a few, so that parallel
/// transfers between two workloads are not bound to one core.
pub const DEFAULT_MAX_CONNECTIONS_PER_DESTINATION: usize = 4;
/// Default for [`Config::pool_idle_timeout`].
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Certificates of the local workloads and the verification of peers' certificates.
///
/// The identity manager implements it. The configs it returns carry the verifiers: a
/// server config must require and verify a client certificate, a client config must verify
/// the server's chain and, when `expected_peer` is given, that its SPIFFE identity is that
/// one. The proxy sets ALPN `h2` itself when a config lacks it.
pub trait Tls: Send + Sync + 'static {
    /// Config presenting the certificate of the workload at `local_ip` and requiring a
    /// client certificate; `None` when no workload with a certificate has that address.
    fn server_config(&self, local_ip: IpAddr) -> Option<Arc<rustls::ServerConfig>>;
    /// Config presenting the certificate of the workload at `src_ip`, expecting the server
    /// to prove `expected_peer` (a SPIFFE URI) when given.
    fn client_config(
        &self,
        src_ip: IpAddr,
        expected_peer: Option<&str>,
    ) -> Option<Arc<rustls::ClientConfig>>;
    /// The authenticated identity (SPIFFE URI) of a verified peer certificate chain.
    fn peer_identity(&self, certs: &[CertificateDer<'_>]) -> Result<String, String>;
    /// The identity of the local workload at `ip`, used to label metrics.
    fn workload_identity(&self, ip: IpAddr) -> Option<String>;
}

/// Decides whether an authenticated peer may reach a destination.
pub trait Authorizer: Send + Sync + 'static {
    /// `peer` is the identity the peer proved (a SPIFFE URI), `peer_ip` the address its
    /// connection came from (for `ipBlocks`). `Err` carries the reason, which is logged.
    fn allow(&self, peer: &str, peer_ip: IpAddr, dst: SocketAddr) -> Result<(), String>;
}

/// Makes the sockets the proxy connects with, so the agent can open them where they
/// must live (a workload's network namespace) and how (transparently).
pub trait Connector: Send + Sync + 'static {
    /// A socket for the outer HBONE connection of the local workload at `src` to `server`.
    fn hbone_socket(&self, src: IpAddr, server: SocketAddr) -> SocketFuture<'_>;
    /// A socket to reach the local workload at `dst` for a tunnel from `client`.
    fn workload_socket(&self, client: IpAddr, dst: SocketAddr) -> SocketFuture<'_>;
}

/// What [`Connector`]s return: making a socket may need another thread.
pub type SocketFuture<'a> = futures::future::BoxFuture<'a, std::io::Result<TcpSocket>>;

impl fmt::Debug for dyn Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connector")
    }
}

/// Plain sockets of the agent's own network namespace: the source address is the node's.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostConnector;

impl Connector for HostConnector {
    fn hbone_socket(&self, _src: IpAddr, server: SocketAddr) -> SocketFuture<'_> {
        Box::pin(std::future::ready(socket_for(server)))
    }

    fn workload_socket(&self, _client: IpAddr, dst: SocketAddr) -> SocketFuture<'_> {
        Box::pin(std::future::ready(socket_for(dst)))
    }
}

/// An unconnected socket of `addr`'s family.
pub fn socket_for(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Tells which addresses belong to workloads on this node: tunnels may only end there,
/// so the proxy cannot be used to reach arbitrary addresses with the node's network access.
pub trait LocalWorkloads: Send + Sync + 'static {
    /// Whether `ip` is the address of a workload running on this node.
    fn is_local(&self, ip: IpAddr) -> bool;
    /// Whether `a` and `b` are addresses of the same local workload: a tunnel that
    /// reached one workload's listener (and certificate) may only end at that workload.
    fn same_workload(&self, a: IpAddr, b: IpAddr) -> bool;
}

/// HTTP/2 flow-control window of one tunnel. h2's default (64 KiB, the protocol's) lets
/// one round trip move 64 KiB, which caps a tunnel far below what TCP does on a fast
/// network; the windows are credits, not buffers: memory is only used when a receiver
/// falls behind. ztunnel uses the same sizes.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window of one connection, shared by its tunnels.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame accepted: fewer frame headers and wakeups for bulk transfers.
pub const MAX_FRAME: u32 = 256 * 1024;

pub(crate) fn tune_h2_client(b: &mut h2::client::Builder) {
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
}

pub(crate) fn tune_h2_server(b: &mut h2::server::Builder) {
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
}

/// Limits and timeouts of the proxy.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Time allowed to open a TCP connection (to a workload or a remote HBONE server).
    pub connect_timeout: Duration,
    /// Time allowed for the TLS and HTTP/2 handshakes of one connection.
    pub handshake_timeout: Duration,
    /// Time an inbound connection may stay silent before its first byte (the TLS
    /// ClientHello); silent connections are closed after it.
    pub first_byte_timeout: Duration,
    /// Inbound connections whose handshakes run at once; more wait in the listen queue,
    /// so clients that never finish a handshake cannot exhaust memory.
    pub max_handshakes: usize,
    /// Inbound handshakes one source address may have in progress at once, over all
    /// local workloads; its connections beyond are closed at once, so one client cannot
    /// hold the slots of [`Config::max_handshakes`] that everybody else needs.
    pub max_handshakes_per_source: usize,
    /// Concurrent CONNECT streams per HTTP/2 connection, announced to clients.
    pub max_streams_per_connection: u32,
    /// A pooled outbound connection without tunnels closes after this long.
    pub pool_idle_timeout: Duration,
    /// Connections the pool opens to one destination (per source workload) before it
    /// multiplexes concurrent tunnels on the busy ones.
    pub max_connections_per_destination: usize,
    /// A tunnel that carries no byte in either direction for this long is closed; `None`
    /// keeps idle tunnels open, as plain TCP would.
    pub tunnel_idle_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            max_connections_per_destination: DEFAULT_MAX_CONNECTIONS_PER_DESTINATION,
            tunnel_idle_timeout: None,
        }
    }
}

/// Errors of one tunnel or connection; each names the peer or destination involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {0} failed: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("connecting to {0} timed out; is the address reachable?")]
    ConnectTimeout(SocketAddr),
    #[error("no certificate for the local workload at {0}; is it enrolled in the mesh?")]
    NoCertificate(IpAddr),
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake with {0} timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("{0} did not negotiate ALPN h2; is it an HBONE server?")]
    Alpn(SocketAddr),
    #[error("identity of {peer} not accepted: {reason}")]
    PeerIdentity { peer: SocketAddr, reason: String },
    #[error("{peer} proved identity {actual}, expected {expected}")]
    UnexpectedPeer {
        peer: SocketAddr,
        expected: String,
        actual: String,
    },
    #[error("HTTP/2 with {peer} failed: {source}")]
    H2 {
        peer: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{peer} refused the tunnel to {dst} with status {status}")]
    Refused {
        peer: SocketAddr,
        dst: SocketAddr,
        status: u16,
    },
    #[error("tunnel to {dst} via {peer} failed: {source}")]
    Tunnel {
        peer: SocketAddr,
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy is draining and opens no new tunnels")]
    Draining,
}

/// What a peer is known as in logs: its address and, once authenticated, its identity.
#[derive(Clone, Debug)]
pub(crate) struct PeerName<'a> {
    pub addr: SocketAddr,
    pub identity: Option<&'a str>,
}

impl fmt::Display for PeerName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.identity {
            Some(id) => write!(f, "{} ({id})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}
