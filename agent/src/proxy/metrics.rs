//! The proxy's metrics: Istio's TCP connection and byte counters for tunnels, and the
//! proxy's own handshake and failure counters.
//!
//! The TCP families carry Istio's label names so dashboards built for Istio can read them,
//! but for now they are registered as `mycel_proxy_tcp_*`: the kernel flow metrics already
//! own the `istio_tcp_*` names in the agent's registry, and one name may not be registered
//! twice. Labels are identities, never addresses, so series stay bounded.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

/// `mutual_tls`: every tunnel is authenticated both ways.
pub(crate) const MUTUAL_TLS: &str = "mutual_tls";
/// Label value when an identity is not known.
pub(crate) const UNKNOWN: &str = "unknown";

/// Istio's labels for TCP metrics that the proxy knows.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` on the client's node, `destination` on the server's.
    pub reporter: &'static str,
    pub source_principal: String,
    pub destination_principal: String,
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    pub(crate) fn new(
        reporter: &'static str,
        source: Option<&str>,
        destination: Option<&str>,
    ) -> Self {
        Self {
            reporter,
            source_principal: source.unwrap_or(UNKNOWN).to_string(),
            destination_principal: destination.unwrap_or(UNKNOWN).to_string(),
            connection_security_policy: MUTUAL_TLS,
        }
    }
}

/// Labels of `mycel_proxy_handshakes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `ok`, `error` or `timeout`.
    pub result: &'static str,
}

/// Labels of `mycel_proxy_connections_failed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: &'static str,
    /// A fixed word, e.g. `tls_handshake`, `denied`, `not_local`, `connect_timeout`.
    pub reason: &'static str,
}

pub(crate) const INBOUND: &str = "inbound";
pub(crate) const OUTBOUND: &str = "outbound";

/// All metrics of the proxy, shared by [`super::Inbound`] and [`super::Outbound`].
#[derive(Debug)]
pub struct ProxyMetrics {
    pub(crate) opened: Family<TcpLabels, Counter>,
    pub(crate) closed: Family<TcpLabels, Counter>,
    pub(crate) sent: Family<TcpLabels, Counter>,
    pub(crate) received: Family<TcpLabels, Counter>,
    pub(crate) handshakes: Family<HandshakeLabels, Counter>,
    pub(crate) handshake_seconds: Histogram,
    pub(crate) failed: Family<FailureLabels, Counter>,
}

impl ProxyMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            handshakes: Family::default(),
            // 1 ms to about 8 s.
            handshake_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 14),
            ),
            failed: Family::default(),
        };
        registry.register(
            "mycel_proxy_tcp_connections_opened",
            "Tunnelled TCP connections opened (Istio's istio_tcp_connections_opened_total)",
            m.opened.clone(),
        );
        registry.register(
            "mycel_proxy_tcp_connections_closed",
            "Tunnelled TCP connections closed (Istio's istio_tcp_connections_closed_total)",
            m.closed.clone(),
        );
        registry.register(
            "mycel_proxy_tcp_sent_bytes",
            "Bytes sent by the client of tunnelled connections (Istio's istio_tcp_sent_bytes_total)",
            m.sent.clone(),
        );
        registry.register(
            "mycel_proxy_tcp_received_bytes",
            "Bytes received by the client of tunnelled connections (Istio's istio_tcp_received_bytes_total)",
            m.received.clone(),
        );
        registry.register(
            "mycel_proxy_handshakes",
            "TLS and HTTP/2 handshakes of HBONE connections, by result",
            m.handshakes.clone(),
        );
        registry.register_with_unit(
            "mycel_proxy_handshake_duration",
            "Duration of successful HBONE handshakes",
            Unit::Seconds,
            m.handshake_seconds.clone(),
        );
        registry.register(
            "mycel_proxy_connections_failed",
            "Connections and tunnels refused or failed, by direction and reason",
            m.failed.clone(),
        );
        m
    }

    pub(crate) fn handshake(&self, direction: &'static str, result: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    pub(crate) fn failed(&self, direction: &'static str, reason: &'static str) {
        self.failed
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    /// Count of handshakes with this direction and result (for tests and debugging).
    pub fn handshakes_with(&self, direction: &'static str, result: &'static str) -> u64 {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .get()
    }

    /// Count of failures with this direction and reason (for tests and debugging).
    pub fn failures_with(&self, direction: &'static str, reason: &'static str) -> u64 {
        self.failed
            .get_or_create(&FailureLabels { direction, reason })
            .get()
    }
}
