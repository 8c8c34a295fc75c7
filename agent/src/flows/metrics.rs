//! Flow metrics under the names existing dashboards query: Istio's TCP metrics and
//! Hubble's flow and drop counters, plus the flow pipeline's own `mycel_flow_*`.
//!
//! Labels are workload names, namespaces, principals, verdicts, reasons and protocols —
//! never addresses, ports or connections — so the number of series is bounded by the
//! number of workloads.
//!
//! The kernel reports cumulative counters per flow; the byte counters here grow by the
//! difference to the previous report of the same flow, kept in a bounded [`Tracker`].
//! Reports are flow events and, for connections that stay open, periodic reads of the
//! kernel's flow table ([`Metrics::record_table_entry`]).
//!
//! The `istio_tcp_*` families ([`IstioTcp`]) are shared with the node proxy, so that one
//! family holds every TCP connection: plaintext ones as the kernel saw them
//! (`connection_security_policy="none"`) and mutual-TLS tunnels as the proxy carried them
//! (`"mutual_tls"`). The kernel's view of a tunnel itself — the outer connection to the
//! HBONE port — is left out of them (it stays in `hubble_flows_processed_total`): the
//! proxy reports the same connection with the real workloads at both ends.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use mycel_common::{
    flow::{FLOW_EVENT_CLOSED, FLOW_EVENT_DROP, FLOW_EVENT_NEW, FlowEvent, FlowKey, FlowValue},
    policy::DIR_INGRESS,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{
    directory::{Directory, WorkloadInfo},
    record::{Endpoint, Flow, Verdict, verdict_of},
};
use crate::proxy::HBONE_PORT;

/// Istio's label set for TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioTcpLabels {
    /// `destination` when the reporting endpoint is the flow's destination, else `source`.
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    /// Service resolution needs the original destination, which L4 flows do not carry.
    pub destination_service: &'static str,
    pub destination_service_name: &'static str,
    pub destination_service_namespace: &'static str,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    /// `none` for what the kernel saw (it carries no TLS), `mutual_tls` for what the node
    /// proxy carried in HBONE tunnels.
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";
/// Istio's `connection_security_policy` of plaintext connections.
pub const PLAINTEXT: &str = "none";
/// Istio's `connection_security_policy` of connections carried over mutual TLS.
pub const MUTUAL_TLS: &str = "mutual_tls";

fn or_unknown(v: Option<&String>) -> String {
    v.cloned().unwrap_or_else(|| UNKNOWN.to_string())
}

impl IstioTcpLabels {
    fn new(flow: &Flow, reporter: &'static str) -> Self {
        let ns = |e: &Endpoint| or_unknown(e.namespace.as_ref());
        Self {
            reporter,
            source_workload: flow.source.workload.clone(),
            source_workload_namespace: ns(&flow.source),
            source_principal: or_unknown(flow.source.principal.as_ref()),
            source_app: or_unknown(flow.source.app.as_ref()),
            destination_workload: flow.destination.workload.clone(),
            destination_workload_namespace: ns(&flow.destination),
            destination_principal: or_unknown(flow.destination.principal.as_ref()),
            destination_app: or_unknown(flow.destination.app.as_ref()),
            destination_service: UNKNOWN,
            destination_service_name: UNKNOWN,
            destination_service_namespace: UNKNOWN,
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: PLAINTEXT,
        }
    }

    /// Labels of a connection the node proxy carried in a mutual-TLS tunnel. `reporter` is
    /// `source` on the client's node and `destination` on the server's; each end is its
    /// address and, when known, its authenticated SPIFFE ID (from the certificates).
    ///
    /// Workload names come from `directory` by address, but only when the workload found
    /// there has the identity the certificate proved: an address that is not the
    /// workload's own (a node address, a reused pod IP) must not lend its name to the
    /// connection. Without a match the namespace still comes from the SPIFFE ID.
    pub fn tunnel(
        directory: &Directory,
        reporter: &'static str,
        source: (IpAddr, Option<&str>),
        destination: (IpAddr, Option<&str>),
    ) -> Self {
        let src = TunnelEnd::resolve(directory, source.0, source.1);
        let dst = TunnelEnd::resolve(directory, destination.0, destination.1);
        Self {
            reporter,
            source_workload: src.workload,
            source_workload_namespace: src.namespace,
            source_principal: src.principal,
            source_app: src.app,
            destination_workload: dst.workload,
            destination_workload_namespace: dst.namespace,
            destination_principal: dst.principal,
            destination_app: dst.app,
            destination_service: UNKNOWN,
            destination_service_name: UNKNOWN,
            destination_service_namespace: UNKNOWN,
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: MUTUAL_TLS,
        }
    }
}

/// One end of a tunnelled connection, as label values.
struct TunnelEnd {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
}

impl TunnelEnd {
    fn resolve(directory: &Directory, ip: IpAddr, principal: Option<&str>) -> Self {
        let found = directory.workload(ip);
        let workload: Option<&WorkloadInfo> = found
            .as_deref()
            .filter(|w| principal.is_none_or(|p| p == w.principal));
        match (workload, principal) {
            (Some(w), _) => Self {
                workload: w.name.clone(),
                namespace: w.namespace.clone(),
                principal: principal.unwrap_or(&w.principal).to_string(),
                app: w.app.clone().unwrap_or_else(|| UNKNOWN.to_string()),
            },
            (None, Some(p)) => Self {
                workload: UNKNOWN.to_string(),
                namespace: spiffe_namespace(p).unwrap_or(UNKNOWN).to_string(),
                principal: p.to_string(),
                app: UNKNOWN.to_string(),
            },
            (None, None) => Self {
                workload: UNKNOWN.to_string(),
                namespace: UNKNOWN.to_string(),
                principal: UNKNOWN.to_string(),
                app: UNKNOWN.to_string(),
            },
        }
    }
}

/// The namespace of a Kubernetes-form SPIFFE ID, `spiffe://<td>/ns/<ns>/sa/<sa>`.
fn spiffe_namespace(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["ns", ns, "sa", _] if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

/// The `istio_tcp_*` families: one set per registry, shared by the kernel flows and the
/// node proxy (one name may be registered only once). Cheap to clone: clones count into
/// the same series.
#[derive(Clone, Debug, Default)]
pub struct IstioTcp {
    /// `istio_tcp_sent_bytes_total`: bytes the destination sent (responses).
    pub sent_bytes: Family<IstioTcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total`: bytes the destination received (requests).
    pub received_bytes: Family<IstioTcpLabels, Counter>,
    /// `istio_tcp_connections_opened_total`.
    pub connections_opened: Family<IstioTcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub connections_closed: Family<IstioTcpLabels, Counter>,
}

impl IstioTcp {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent by the destination of TCP connections (responses)",
            self.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received by the destination of TCP connections (requests)",
            self.received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.connections_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.connections_closed.clone(),
        );
    }
}

/// Whether the kernel flow `key` is an HBONE tunnel: a TCP connection to the HBONE port.
/// The port is Istio ambient's fixed 15008, which peers dial whatever a node configures.
fn is_tunnel(key: &FlowKey) -> bool {
    key.proto == 6 && u16::from_be(key.dport_be) == HBONE_PORT
}

/// `hubble_flows_processed_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HubbleFlowLabels {
    /// Hubble's event type: `Trace` for a forwarded flow, `Drop` for a dropped one (what
    /// Hubble's own dashboards filter on).
    pub r#type: &'static str,
    /// `to-endpoint` (ingress) or `from-endpoint` (egress).
    pub subtype: &'static str,
    /// `FORWARDED` or `DROPPED`.
    pub verdict: &'static str,
}

/// `hubble_drop_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HubbleDropLabels {
    pub reason: String,
    pub protocol: String,
}

/// `mycel_flow_log_dropped_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogDropLabels {
    /// `queue_full` (the writer fell behind) or `write_error`.
    pub reason: &'static str,
}

/// Metrics of the flow pipeline.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `istio_tcp_*`, shared with the node proxy ([`Metrics::istio_tcp`]).
    pub tcp: IstioTcp,
    /// `hubble_flows_processed_total{type,subtype,verdict}`: flow events processed.
    pub flows_processed: Family<HubbleFlowLabels, Counter>,
    /// `hubble_drop_total{reason,protocol}`.
    pub drops: Family<HubbleDropLabels, Counter>,
    /// `mycel_flow_log_dropped_total{reason}`: flow records the log file did not get.
    pub log_dropped: Family<LogDropLabels, Counter>,
    /// `mycel_flow_tracked`: flows whose last counters are remembered for deltas.
    pub tracked: Gauge,
    /// `mycel_flow_tracker_evictions_total`: flows forgotten because the tracker was full
    /// (their next event counts its bytes from zero again).
    pub tracker_evictions: Counter,
}

impl Metrics {
    /// Registers every flow metric in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            tcp: IstioTcp::default(),
            flows_processed: Family::default(),
            drops: Family::default(),
            log_dropped: Family::default(),
            tracked: Gauge::default(),
            tracker_evictions: Counter::default(),
        };
        // Present from the start, at zero, so alerts on their rate see them.
        for reason in ["queue_full", "write_error"] {
            drop(m.log_dropped.get_or_create(&LogDropLabels { reason }));
        }
        m.tcp.register(registry);
        registry.register(
            "hubble_flows_processed",
            "Flow events processed",
            m.flows_processed.clone(),
        );
        registry.register("hubble_drop", "Packets dropped", m.drops.clone());
        let r = registry.sub_registry_with_prefix("mycel");
        r.register(
            "flow_log_dropped",
            "Flow records not written to the flow log file",
            m.log_dropped.clone(),
        );
        r.register(
            "flow_tracked",
            "Flows whose counters the agent remembers to compute byte deltas",
            m.tracked.clone(),
        );
        r.register(
            "flow_tracker_evictions",
            "Flows forgotten because the flow tracker was full",
            m.tracker_evictions.clone(),
        );
        m
    }

    /// The `istio_tcp_*` families, for the node proxy to count its tunnels in.
    pub fn istio_tcp(&self) -> IstioTcp {
        self.tcp.clone()
    }

    /// Counts one event (already resolved to `flow`), using `tracker` for byte deltas.
    pub fn record(&self, ev: &FlowEvent, flow: &Flow, tracker: &mut Tracker) {
        let ingress = ev.key.direction == DIR_INGRESS;
        self.flows_processed
            .get_or_create(&HubbleFlowLabels {
                r#type: if flow.verdict == Verdict::Dropped {
                    "Drop"
                } else {
                    "Trace"
                },
                subtype: if ingress {
                    "to-endpoint"
                } else {
                    "from-endpoint"
                },
                verdict: flow.verdict.as_str(),
            })
            .inc();
        if flow.verdict == Verdict::Dropped {
            self.drops
                .get_or_create(&HubbleDropLabels {
                    reason: flow
                        .drop_reason
                        .as_deref()
                        .unwrap_or("POLICY_DENIED")
                        .to_string(),
                    protocol: flow.protocol.to_string(),
                })
                .inc();
        }

        // Istio's TCP metrics cover TCP connections that went through, less the tunnels,
        // which the proxy counts.
        if ev.key.proto != 6 || is_tunnel(&ev.key) {
            return;
        }
        let id = ev.key;
        let labels = || IstioTcpLabels::new(flow, reporter(&ev.key));
        if flow.verdict == Verdict::Dropped || ev.kind == FLOW_EVENT_DROP {
            // A connection cut by a policy change ends here.
            if tracker.remove(&id).is_some_and(|t| t.opened) {
                self.tcp.connections_closed.get_or_create(&labels()).inc();
            }
            self.tracked.set(tracker.len() as i64);
            return;
        }
        let (fwd, rev, opened_before) = tracker.update(&id, &ev.value);
        let labels = labels();
        self.add_bytes(&labels, fwd, rev);
        if ev.kind == FLOW_EVENT_NEW && !opened_before {
            self.tcp.connections_opened.get_or_create(&labels).inc();
            tracker.mark_opened(&id);
        }
        if ev.kind == FLOW_EVENT_CLOSED {
            self.tcp.connections_closed.get_or_create(&labels).inc();
            tracker.remove(&id);
        }
        self.tracker_gauges(tracker);
    }

    /// Counts the bytes an open TCP connection moved since its last report, from an entry
    /// of the kernel's flow table (`resolve` names it, called only when it moved bytes).
    /// Closed and denied flows are left to their events. With `count` false the entry
    /// only sets the baseline: the agent's first read after a restart must not count again
    /// what the previous process already did.
    pub fn record_table_entry(
        &self,
        ev: &FlowEvent,
        resolve: impl FnOnce() -> Flow,
        tracker: &mut Tracker,
        count: bool,
    ) {
        if ev.key.proto != 6
            || is_tunnel(&ev.key)
            || ev.value.closed != 0
            || verdict_of(ev) == Verdict::Dropped
        {
            return;
        }
        let (fwd, rev, _) = tracker.update(&ev.key, &ev.value);
        if count && (fwd > 0 || rev > 0) {
            self.add_bytes(
                &IstioTcpLabels::new(&resolve(), reporter(&ev.key)),
                fwd,
                rev,
            );
        }
        self.tracker_gauges(tracker);
    }

    fn add_bytes(&self, labels: &IstioTcpLabels, fwd: u64, rev: u64) {
        if fwd > 0 {
            self.tcp.received_bytes.get_or_create(labels).inc_by(fwd);
        }
        if rev > 0 {
            self.tcp.sent_bytes.get_or_create(labels).inc_by(rev);
        }
    }

    fn tracker_gauges(&self, tracker: &mut Tracker) {
        let evicted = tracker.take_evicted();
        if evicted > 0 {
            self.tracker_evictions.inc_by(evicted);
        }
        self.tracked.set(tracker.len() as i64);
    }
}

// Here rather than in `flows.rs` because it only hands out what this module registered.
impl super::Flows {
    /// The `istio_tcp_*` families this pipeline registered, for the node proxy
    /// ([`crate::proxy::ProxyMetrics::new`]) to count its tunnels in the same series.
    pub fn istio_tcp(&self) -> IstioTcp {
        self.metrics.istio_tcp()
    }
}

/// Istio's `reporter`: the flow's destination is the endpoint that reported it when the
/// peer initiated.
fn reporter(key: &FlowKey) -> &'static str {
    if key.direction == DIR_INGRESS {
        "destination"
    } else {
        "source"
    }
}

/// A flow as the kernel keys it: its key includes the direction seen from the endpoint,
/// so a connection between two workloads of this node is two flows, one per endpoint,
/// each with its own counters.
pub type FlowId = FlowKey;

/// What the tracker remembers of a flow.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    pub bytes_fwd: u64,
    pub bytes_rev: u64,
    /// The flow's first packet: a different value under the same key is a new connection
    /// on the same addresses and ports.
    pub first_ns: u64,
    /// A `new` event was counted in `istio_tcp_connections_opened_total`.
    pub opened: bool,
    stamp: u64,
}

/// Last counters per flow, bounded: when full, the flow seen least recently is forgotten.
#[derive(Debug)]
pub struct Tracker {
    flows: HashMap<FlowId, Seen>,
    by_age: BTreeMap<u64, FlowId>,
    next: u64,
    capacity: usize,
    evicted: u64,
}

impl Tracker {
    /// A tracker holding at most `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            flows: HashMap::new(),
            by_age: BTreeMap::new(),
            next: 0,
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    /// Flows remembered.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is remembered.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Records the cumulative counters of `id` and returns the growth since the last report
    /// (`(forward, reverse, opened)`). A report older than one already seen (lower counters
    /// for the same connection: an event that was queued while the table was read) adds
    /// nothing; a new connection under the same key (another `first_ns`) starts from zero.
    pub fn update(&mut self, id: &FlowId, v: &FlowValue) -> (u64, u64, bool) {
        let (bytes_fwd, bytes_rev) = (v.bytes_fwd, v.bytes_rev);
        let stamp = self.next;
        self.next += 1;
        let prev = match self.flows.get_mut(id) {
            Some(seen) => {
                self.by_age.remove(&seen.stamp);
                let prev = if seen.first_ns == v.first_ns {
                    *seen
                } else {
                    Seen::default()
                };
                seen.bytes_fwd = bytes_fwd.max(prev.bytes_fwd);
                seen.bytes_rev = bytes_rev.max(prev.bytes_rev);
                seen.first_ns = v.first_ns;
                seen.opened = prev.opened;
                seen.stamp = stamp;
                prev
            }
            None => {
                while self.flows.len() >= self.capacity {
                    let Some((_, oldest)) = self.by_age.pop_first() else {
                        break;
                    };
                    self.flows.remove(&oldest);
                    self.evicted += 1;
                }
                self.flows.insert(
                    *id,
                    Seen {
                        bytes_fwd,
                        bytes_rev,
                        first_ns: v.first_ns,
                        opened: false,
                        stamp,
                    },
                );
                Seen::default()
            }
        };
        self.by_age.insert(stamp, *id);
        (
            bytes_fwd.saturating_sub(prev.bytes_fwd),
            bytes_rev.saturating_sub(prev.bytes_rev),
            prev.opened,
        )
    }

    fn mark_opened(&mut self, id: &FlowId) {
        if let Some(seen) = self.flows.get_mut(id) {
            seen.opened = true;
        }
    }

    /// Forgets `id` (the flow closed).
    pub fn remove(&mut self, id: &FlowId) -> Option<Seen> {
        let seen = self.flows.remove(id)?;
        self.by_age.remove(&seen.stamp);
        Some(seen)
    }

    /// Evictions since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use mycel_common::{
        flow::{FLOW_EVENT_CLOSED, FLOW_EVENT_DROP, FLOW_EVENT_NEW},
        policy::{DIR_EGRESS, DROP_REASON_POLICY_DENY},
    };

    use super::*;
    use crate::flows::record::tests::{directory, event};

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    /// The value of the one series of `name` whose labels contain every `needle`.
    fn value(text: &str, name: &str, needles: &[&str]) -> Option<f64> {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .collect();
        assert!(lines.len() <= 1, "several series match: {lines:?}");
        lines
            .first()
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
    }

    fn series(text: &str, name: &str) -> usize {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .count()
    }

    struct Harness {
        registry: Registry,
        metrics: Metrics,
        tracker: Tracker,
        dir: crate::flows::directory::Directory,
    }

    impl Harness {
        fn new(capacity: usize) -> Self {
            let mut registry = Registry::default();
            let metrics = Metrics::new(&mut registry);
            Self {
                registry,
                metrics,
                tracker: Tracker::new(capacity),
                dir: directory(),
            }
        }

        fn feed(&mut self, ev: &FlowEvent) {
            let flow = Flow::from_event(ev, &self.dir, SystemTime::now());
            self.metrics.record(ev, &flow, &mut self.tracker);
        }

        fn text(&self) -> String {
            text(&self.registry)
        }
    }

    #[test]
    fn istio_series_carry_workload_labels_and_delta_bytes() {
        let mut h = Harness::new(16);
        let mut ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6);
        ev.value.bytes_fwd = 100;
        h.feed(&ev);
        // A duplicate `new` (e.g. a retransmitted SYN) opens nothing more.
        h.feed(&ev);
        ev.kind = FLOW_EVENT_CLOSED;
        ev.value.bytes_fwd = 1_100;
        ev.value.bytes_rev = 5_000;
        h.feed(&ev);
        let t = h.text();
        let want = [
            "reporter=\"destination\"",
            "source_workload=\"a\"",
            "source_workload_namespace=\"shop\"",
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/a\"",
            "source_app=\"a\"",
            "destination_workload=\"b\"",
            "destination_workload_namespace=\"shop\"",
            "destination_service=\"unknown\"",
            "request_protocol=\"tcp\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"none\"",
        ];
        assert_eq!(
            value(&t, "istio_tcp_received_bytes_total", &want),
            Some(1_100.0),
            "{t}"
        );
        assert_eq!(
            value(&t, "istio_tcp_sent_bytes_total", &want),
            Some(5_000.0)
        );
        assert_eq!(
            value(&t, "istio_tcp_connections_opened_total", &want),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "istio_tcp_connections_closed_total", &want),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "hubble_flows_processed_total",
                &[
                    "type=\"Trace\"",
                    "subtype=\"to-endpoint\"",
                    "verdict=\"FORWARDED\""
                ]
            ),
            Some(3.0)
        );
        assert!(h.tracker.is_empty(), "a closed flow is forgotten");
        assert!(t.lines().any(|l| l == "mycel_flow_tracked 0"), "{t}");
    }

    #[test]
    fn egress_reports_as_source() {
        let mut h = Harness::new(16);
        let mut ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "192.0.2.1:443", 6);
        ev.key.direction = DIR_EGRESS;
        ev.direction = DIR_EGRESS;
        ev.value.dst_identity = 2;
        h.feed(&ev);
        let t = h.text();
        assert_eq!(
            value(
                &t,
                "istio_tcp_connections_opened_total",
                &[
                    "reporter=\"source\"",
                    "destination_workload=\"world\"",
                    "destination_workload_namespace=\"unknown\"",
                    "destination_principal=\"unknown\""
                ]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "hubble_flows_processed_total",
                &["subtype=\"from-endpoint\""]
            ),
            Some(1.0)
        );
    }

    #[test]
    fn hbone_tunnels_are_left_to_the_proxy() {
        let mut h = Harness::new(16);
        let mut ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:15008", 6);
        ev.value.bytes_fwd = 700;
        h.feed(&ev);
        let mut entry = ev;
        entry.value.bytes_fwd = 5_000;
        let flow = Flow::from_event(&entry, &h.dir, SystemTime::now());
        h.metrics
            .record_table_entry(&entry, || flow.clone(), &mut h.tracker, true);
        ev.kind = FLOW_EVENT_CLOSED;
        ev.value.bytes_fwd = 9_000;
        h.feed(&ev);
        // The same addresses on another port are an ordinary connection.
        h.feed(&event(
            FLOW_EVENT_NEW,
            "10.0.0.1:40001",
            "10.0.0.2:15009",
            6,
        ));
        let t = h.text();
        assert_eq!(
            value(&t, "istio_tcp_connections_opened_total", &[]),
            Some(1.0),
            "{t}"
        );
        assert_eq!(series(&t, "istio_tcp_connections_closed_total"), 0, "{t}");
        assert_eq!(series(&t, "istio_tcp_received_bytes_total"), 1, "{t}");
        assert_eq!(
            value(&t, "istio_tcp_received_bytes_total", &[]),
            Some(60.0),
            "only the other connection's first packet: {t}"
        );
        assert_eq!(
            value(
                &t,
                "hubble_flows_processed_total",
                &["verdict=\"FORWARDED\""]
            ),
            Some(3.0),
            "tunnels still count as flows: {t}"
        );
        assert!(h.tracker.len() <= 1, "tunnels are not tracked");
    }

    #[test]
    fn tunnel_labels_come_from_certificates_and_the_directory() {
        let dir = directory();
        let a = "spiffe://cluster.local/ns/shop/sa/a";
        let b = "spiffe://cluster.local/ns/shop/sa/b";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let l = IstioTcpLabels::tunnel(
            &dir,
            "destination",
            (ip("10.0.0.1"), Some(a)),
            (ip("10.0.0.2"), Some(b)),
        );
        assert_eq!(l.reporter, "destination");
        assert_eq!(l.connection_security_policy, MUTUAL_TLS);
        assert_eq!(
            (
                l.source_workload.as_str(),
                l.source_workload_namespace.as_str(),
                l.source_principal.as_str(),
                l.source_app.as_str()
            ),
            ("a", "shop", a, "a")
        );
        assert_eq!(
            (
                l.destination_workload.as_str(),
                l.destination_workload_namespace.as_str(),
                l.destination_principal.as_str()
            ),
            ("b", "shop", b)
        );
        assert_eq!(
            (l.request_protocol, l.response_flags, l.destination_service),
            ("tcp", "-", "unknown")
        );

        // An address whose workload is not the one the certificate proved (here a's
        // address with someone else's certificate) does not lend its name; the namespace
        // still comes from the SPIFFE ID.
        let other = "spiffe://cluster.local/ns/tools/sa/curl";
        let l = IstioTcpLabels::tunnel(
            &dir,
            "destination",
            (ip("10.0.0.1"), Some(other)),
            (ip("192.0.2.1"), None),
        );
        assert_eq!(l.source_workload, "unknown");
        assert_eq!(l.source_workload_namespace, "tools");
        assert_eq!(l.source_principal, other);
        assert_eq!(l.source_app, "unknown");
        assert_eq!(
            (
                l.destination_workload.as_str(),
                l.destination_workload_namespace.as_str(),
                l.destination_principal.as_str()
            ),
            ("unknown", "unknown", "unknown")
        );
        // No certificate identity: the directory names the workload and its principal.
        let l = IstioTcpLabels::tunnel(
            &dir,
            "source",
            (ip("::ffff:10.0.0.1"), None),
            (ip("10.0.0.2"), Some(b)),
        );
        assert_eq!(l.source_workload, "a");
        assert_eq!(l.source_principal, a);
    }

    #[test]
    fn spiffe_namespaces_are_read_from_kubernetes_ids_only() {
        assert_eq!(
            spiffe_namespace("spiffe://cluster.local/ns/shop/sa/a"),
            Some("shop")
        );
        for not in [
            "spiffe://cluster.local/ns//sa/a",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/a/extra",
            "spiffe://cluster.local",
            "https://cluster.local/ns/shop/sa/a",
        ] {
            assert_eq!(spiffe_namespace(not), None, "{not}");
        }
    }

    #[test]
    fn the_proxy_and_the_kernel_count_into_one_family() {
        let mut h = Harness::new(16);
        h.feed(&event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6));
        let shared = h.metrics.istio_tcp();
        let labels = IstioTcpLabels::tunnel(
            &h.dir,
            "destination",
            (
                "10.0.0.1".parse().unwrap(),
                Some("spiffe://cluster.local/ns/shop/sa/a"),
            ),
            (
                "10.0.0.2".parse().unwrap(),
                Some("spiffe://cluster.local/ns/shop/sa/b"),
            ),
        );
        shared.connections_opened.get_or_create(&labels).inc();
        let t = h.text();
        assert_eq!(series(&t, "istio_tcp_connections_opened_total"), 2, "{t}");
        for policy in ["none", "mutual_tls"] {
            assert_eq!(
                value(
                    &t,
                    "istio_tcp_connections_opened_total",
                    &[
                        "source_workload=\"a\"",
                        "destination_workload=\"b\"",
                        &format!("connection_security_policy=\"{policy}\"")
                    ]
                ),
                Some(1.0),
                "{t}"
            );
        }
        assert_eq!(
            t.matches("# TYPE istio_tcp_connections_opened counter")
                .count(),
            1,
            "{t}"
        );
    }

    #[test]
    fn drops_count_by_hubble_reason_and_protocol() {
        let mut h = Harness::new(16);
        h.feed(&event(FLOW_EVENT_DROP, "10.0.0.2:1234", "10.0.0.1:9090", 6));
        h.feed(&event(FLOW_EVENT_DROP, "10.0.0.2:1235", "10.0.0.1:9090", 6));
        let mut ev = event(FLOW_EVENT_DROP, "10.0.0.2:53", "10.0.0.1:53", 17);
        ev.value.drop_reason = DROP_REASON_POLICY_DENY;
        h.feed(&ev);
        h.feed(&event(FLOW_EVENT_DROP, "10.0.0.2:0", "10.0.0.1:0", 1));
        let t = h.text();
        assert_eq!(
            value(
                &t,
                "hubble_drop_total",
                &["reason=\"POLICY_DENIED\"", "protocol=\"TCP\""]
            ),
            Some(2.0),
            "{t}"
        );
        assert_eq!(
            value(
                &t,
                "hubble_drop_total",
                &["reason=\"POLICY_DENY\"", "protocol=\"UDP\""]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "hubble_drop_total", &["protocol=\"ICMPv4\""]),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "hubble_flows_processed_total", &["verdict=\"DROPPED\""]),
            Some(4.0)
        );
        assert_eq!(series(&t, "istio_tcp_connections_opened_total"), 0);
    }

    #[test]
    fn a_flow_cut_by_policy_counts_as_closed() {
        let mut h = Harness::new(16);
        let ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6);
        h.feed(&ev);
        let mut cut = ev;
        cut.kind = FLOW_EVENT_DROP;
        cut.value.verdict = mycel_common::policy::VERDICT_DENY;
        h.feed(&cut);
        let t = h.text();
        assert_eq!(
            value(&t, "istio_tcp_connections_closed_total", &[]),
            Some(1.0)
        );
        assert!(h.tracker.is_empty());
    }

    #[test]
    fn thousand_ports_between_two_workloads_make_one_series() {
        let mut h = Harness::new(4_096);
        for port in 0..1_000u16 {
            let mut ev = event(
                FLOW_EVENT_NEW,
                &format!("10.0.0.1:{}", 30_000 + port),
                &format!("10.0.0.2:{}", 1_000 + port),
                6,
            );
            ev.value.bytes_fwd = 10;
            h.feed(&ev);
            ev.kind = FLOW_EVENT_CLOSED;
            ev.value.bytes_fwd = 30;
            h.feed(&ev);
        }
        let t = h.text();
        for name in [
            "istio_tcp_received_bytes_total",
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "hubble_flows_processed_total",
        ] {
            assert_eq!(series(&t, name), 1, "{name} in\n{t}");
        }
        assert_eq!(
            value(&t, "istio_tcp_received_bytes_total", &[]),
            Some(30_000.0)
        );
        assert_eq!(
            value(&t, "istio_tcp_connections_opened_total", &[]),
            Some(1_000.0)
        );
    }

    #[test]
    fn deltas_stay_monotonic_across_reorders_restarts_and_evictions() {
        let mut t = Tracker::new(2);
        let ev = event(FLOW_EVENT_NEW, "10.0.0.1:1", "10.0.0.2:2", 6);
        let key = ev.key;
        let mut at_b = key;
        at_b.direction = DIR_EGRESS;
        let other = event(FLOW_EVENT_NEW, "10.0.0.1:3", "10.0.0.2:4", 6).key;
        let third = event(FLOW_EVENT_NEW, "10.0.0.1:5", "10.0.0.2:6", 6).key;
        let v = |first_ns, fwd, rev| FlowValue {
            first_ns,
            bytes_fwd: fwd,
            bytes_rev: rev,
            ..ev.value
        };
        assert_eq!(t.update(&key, &v(1, 10, 0)), (10, 0, false));
        assert_eq!(t.update(&key, &v(1, 25, 7)), (15, 7, false));
        // An older report of the same connection arriving late adds nothing.
        assert_eq!(t.update(&key, &v(1, 20, 7)), (0, 0, false));
        assert_eq!(t.update(&key, &v(1, 26, 7)), (1, 0, false));
        // The same connection seen from the other endpoint: its own counters.
        assert_eq!(t.update(&at_b, &v(1, 25, 7)), (25, 7, false));
        // A new connection on the same key: counters restart.
        assert_eq!(t.update(&key, &v(2, 4, 0)), (4, 0, false));
        assert_eq!(t.take_evicted(), 0);
        // Full: the least recently seen flow (at_b) goes.
        t.update(&other, &v(1, 1, 1));
        assert_eq!(t.len(), 2);
        assert_eq!(t.take_evicted(), 1);
        assert!(t.remove(&at_b).is_none());
        t.update(&third, &v(1, 1, 1));
        assert_eq!(t.take_evicted(), 1);
        assert!(t.remove(&key).is_none(), "key was the oldest");
    }

    #[test]
    fn table_reads_count_open_connections_without_double_counting() {
        let mut h = Harness::new(16);
        let mut ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6);
        let received = |h: &Harness| value(&h.text(), "istio_tcp_received_bytes_total", &[]);
        // The table read sees the connection before its `new` event is processed.
        let mut entry = ev;
        entry.value.bytes_fwd = 1_000;
        let flow = Flow::from_event(&entry, &h.dir, SystemTime::now());
        h.metrics
            .record_table_entry(&entry, || flow.clone(), &mut h.tracker, true);
        assert_eq!(received(&h), Some(1_000.0));
        h.feed(&ev);
        assert_eq!(received(&h), Some(1_000.0), "the late event adds nothing");
        assert_eq!(
            value(&h.text(), "istio_tcp_connections_opened_total", &[]),
            Some(1.0)
        );
        entry.value.bytes_fwd = 3_000;
        h.metrics
            .record_table_entry(&entry, || flow.clone(), &mut h.tracker, true);
        assert_eq!(received(&h), Some(3_000.0));
        ev.kind = FLOW_EVENT_CLOSED;
        ev.value.bytes_fwd = 3_500;
        ev.value.closed = 1;
        h.feed(&ev);
        assert_eq!(received(&h), Some(3_500.0));
        // Closed entries left in the table are not counted again.
        h.metrics
            .record_table_entry(&ev, || flow.clone(), &mut h.tracker, true);
        assert_eq!(received(&h), Some(3_500.0));
        assert!(h.tracker.is_empty());
    }
}
