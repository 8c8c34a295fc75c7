//! The proxy's metrics: the connections it carries, counted in Istio's `istio_tcp_*`
//! families, and its own handshake and failure counters (Istio has no equivalent).
//!
//! The `istio_tcp_*` families are the ones the kernel flow metrics registered
//! ([`crate::flows::metrics::IstioTcp`]): one family per name holds plaintext connections
//! as the kernel saw them and tunnels as the proxy carried them, told apart by
//! `connection_security_policy` (`none` or `mutual_tls`). Labels are workloads and
//! identities, never addresses, so series stay bounded.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::flows::{
    Directory,
    metrics::{IstioTcp, IstioTcpLabels},
};

/// Istio's labels of a tunnelled connection, as the proxy counts it.
pub type TcpLabels = IstioTcpLabels;

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
    /// Names the workloads at the ends of a tunnel for its labels.
    directory: Arc<Directory>,
    pub(crate) opened: Family<TcpLabels, Counter>,
    pub(crate) closed: Family<TcpLabels, Counter>,
    /// Bytes the client sent: what the destination received, Istio's
    /// `istio_tcp_received_bytes_total`.
    pub(crate) sent: Family<TcpLabels, Counter>,
    /// Bytes the client received: what the destination sent, Istio's
    /// `istio_tcp_sent_bytes_total`.
    pub(crate) received: Family<TcpLabels, Counter>,
    pub(crate) handshakes: Family<HandshakeLabels, Counter>,
    pub(crate) handshake_seconds: Histogram,
    pub(crate) failed: Family<FailureLabels, Counter>,
}

impl ProxyMetrics {
    /// Creates the proxy's metrics: tunnels count in `tcp` (the `istio_tcp_*` families
    /// the flow metrics registered, see [`crate::flows::Flows::istio_tcp`]), with the
    /// workloads at their ends looked up in `directory`; the handshake and failure
    /// counters are registered in `registry`.
    pub fn new(registry: &mut Registry, tcp: IstioTcp, directory: Arc<Directory>) -> Self {
        let m = Self {
            directory,
            opened: tcp.connections_opened,
            closed: tcp.connections_closed,
            sent: tcp.received_bytes,
            received: tcp.sent_bytes,
            handshakes: Family::default(),
            // 1 ms to about 8 s.
            handshake_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 14),
            ),
            failed: Family::default(),
        };
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

    /// Where tunnel labels look up the workloads at the ends ([`TcpLabels::tunnel`]).
    pub(crate) fn directory(&self) -> &Directory {
        &self.directory
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
