//! The agent's own metrics (`mycel_*`), on the admin and Prometheus endpoints.
//!
//! Each subsystem's metrics live in one struct registered once; the kernel programs'
//! counters are read from their pinned per-CPU map at scrape time.

use std::{path::PathBuf, sync::Mutex};

use aya::maps::{Map, MapData, PerCpuArray};
use mycel_common::stats::STAT_NAMES;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of the map operation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapOpLabels {
    pub op: &'static str,
}

/// Metrics of the load-balancing datapath and its inputs.
#[derive(Debug)]
pub struct Metrics {
    /// `mycel_services_programmed`: service frontends in the maps.
    pub services_programmed: Gauge,
    /// `mycel_backends_programmed`: backend slots in the maps.
    pub backends_programmed: Gauge,
    /// `mycel_source_errors_total`: invalid input rejected (each problem counted once).
    pub source_errors: Counter,
    /// `mycel_source_errors_current`: problems standing in the input right now (rejected
    /// files and cross-object problems such as a slice without its Service).
    pub source_errors_current: Gauge,
    /// `mycel_update_latency_seconds`: from the source seeing a change to the maps holding it.
    pub update_latency: Histogram,
    /// `mycel_map_operations_total{op}`: map writes and deletes.
    pub map_operations: Family<MapOpLabels, Counter>,
    /// `mycel_datapath_errors_total`: map updates that failed (e.g. a full map).
    pub datapath_errors: Counter,
    /// `mycel_ready`: 1 once the initial state is programmed.
    pub ready: Gauge,
    /// `mycel_policy_loaded`: AuthorizationPolicies in force.
    pub policy_loaded: Gauge,
    /// `mycel_policy_entries`: compiled policy entries in the kernel map.
    pub policy_entries: Gauge,
    /// `mycel_policy_endpoints`: local workloads with policy and flow programs attached.
    pub policy_endpoints: Gauge,
    /// `mycel_ipcache_entries`: addresses and CIDRs with a known identity.
    pub ipcache_entries: Gauge,
    /// `mycel_flow_events_dropped_total`: flow events read from the kernel that the agent's
    /// pipeline could not take in time (the kernel's own losses are
    /// `mycel_datapath_events_total{event="flow_events_lost"}`).
    pub flow_events_dropped: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            services_programmed: Gauge::default(),
            backends_programmed: Gauge::default(),
            source_errors: Counter::default(),
            source_errors_current: Gauge::default(),
            update_latency: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            map_operations: Family::default(),
            datapath_errors: Counter::default(),
            ready: Gauge::default(),
            policy_loaded: Gauge::default(),
            policy_entries: Gauge::default(),
            policy_endpoints: Gauge::default(),
            ipcache_entries: Gauge::default(),
            flow_events_dropped: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("mycel");
        r.register(
            "services_programmed",
            "Service frontends (address, port, protocol) in the kernel maps",
            m.services_programmed.clone(),
        );
        r.register(
            "backends_programmed",
            "Backend slots in the kernel maps",
            m.backends_programmed.clone(),
        );
        r.register(
            "source_errors",
            "Invalid resources rejected by the agent, each problem counted once",
            m.source_errors.clone(),
        );
        r.register(
            "source_errors_current",
            "Problems currently standing in the agent's input",
            m.source_errors_current.clone(),
        );
        r.register(
            "update_latency_seconds",
            "Time from a source event to the kernel maps holding its result",
            m.update_latency.clone(),
        );
        r.register(
            "map_operations",
            "Writes and deletes of kernel map entries",
            m.map_operations.clone(),
        );
        r.register(
            "datapath_errors",
            "Kernel map updates that failed",
            m.datapath_errors.clone(),
        );
        r.register(
            "ready",
            "1 once the initial state is programmed",
            m.ready.clone(),
        );
        for (name, help, gauge) in [
            (
                "policy_loaded",
                "AuthorizationPolicies in force",
                &m.policy_loaded,
            ),
            (
                "policy_entries",
                "Compiled policy entries in the kernel map",
                &m.policy_entries,
            ),
            (
                "policy_endpoints",
                "Local workloads with policy and flow programs attached",
                &m.policy_endpoints,
            ),
            (
                "ipcache_entries",
                "Addresses and CIDRs with a known identity in the kernel map",
                &m.ipcache_entries,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "flow_events_dropped",
            "Flow events from the kernel the agent's pipeline could not take in time",
            m.flow_events_dropped.clone(),
        );
        m
    }
}

/// Reads the kernel programs' per-CPU counters from the pinned `STATS` map at scrape time:
/// `mycel_datapath_events_total{event}`.
pub struct KernelCounters {
    stats: Mutex<Option<PerCpuArray<MapData, u64>>>,
    pin: PathBuf,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCounters")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

impl KernelCounters {
    pub fn new(pin_dir: &std::path::Path) -> Self {
        Self {
            stats: Mutex::new(None),
            pin: pin_dir.join("STATS"),
        }
    }

    /// Current values, by counter name (zero when the map cannot be read).
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        let Ok(mut guard) = self.stats.lock() else {
            return Vec::new();
        };
        if guard.is_none() {
            *guard = MapData::from_pin(&self.pin)
                .ok()
                .and_then(|d| PerCpuArray::try_from(Map::PerCpuArray(d)).ok());
        }
        let Some(stats) = guard.as_ref() else {
            return Vec::new();
        };
        STAT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let v = stats
                    .get(&(i as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (*name, v)
            })
            .collect()
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let values = self.read();
        if values.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "mycel_datapath_events",
            "Events counted by the kernel programs",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, v) in values {
            let labels = EventLabels { event };
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(v).encode(metric)?;
        }
        Ok(())
    }
}
