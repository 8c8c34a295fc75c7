//! Flow observability: what the kernel's flow events become for users.
//!
//! The datapath delivers [`FlowEvent`]s (new flow, closed flow, policy drop) on a channel.
//! [`Flows::run`] turns each into a [`Flow`] record — addresses resolved to workloads,
//! principals and policies through the app's [`Directory`] — and then:
//!
//! - counts it in Istio's and Hubble's metrics ([`metrics`]),
//! - keeps it in a bounded ring of recent flows and hands it to followers ([`store`]),
//!   which the admin endpoint `/debug/flows` and `mycel flows` read,
//! - appends it to the flow log file, if configured ([`log`]).
//!
//! None of these waits for a reader: slow followers and a slow disk lose records, and
//! say how many.
//!
//! Flow events arrive when a connection opens and closes; [`Flows::run_with_table`] also
//! reads the kernel's flow table every [`DEFAULT_TABLE_INTERVAL`] so that the byte counters
//! of connections that stay open for hours keep growing in the metrics.
//!
//! `app` wires it: [`Flows::new`] registers the metrics and opens the flow log, the
//! datapath's ring-buffer reader feeds [`Flows::run_with_table`], and the app keeps the
//! [`Directory`] current as workloads and policies change.

pub mod directory;
pub mod log;
pub mod metrics;
pub mod record;
pub mod store;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mycel_common::flow::{FlowEvent, FlowKey, FlowValue};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

pub use directory::{Directory, WorkloadInfo};
pub use log::LogConfig;
pub use metrics::Metrics;
pub use record::{Flow, Verdict};
pub use store::{Filter, FollowBody};

use self::{log::LogSender, metrics::Tracker, store::Store};

/// How often [`Flows::run_with_table`] reads the kernel's flow table by default.
pub const DEFAULT_TABLE_INTERVAL: Duration = Duration::from_secs(10);
/// Default number of recent flows kept in memory.
pub const DEFAULT_BUFFER: usize = 4_096;
/// Default number of flows whose last counters are remembered for byte deltas: as many as
/// the kernel's `FLOWS` map holds by default.
pub const DEFAULT_TRACKED: usize = mycel_common::flow::DEFAULT_FLOW_ENTRIES as usize;

/// Settings of the flow pipeline (part of the agent's `Config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Recent flows kept for `/debug/flows`.
    pub buffer: usize,
    /// Flows tracked for byte deltas; beyond this the least recently seen is forgotten.
    pub tracked: usize,
    /// How often [`Flows::run_with_table`] reads the kernel's flow table.
    pub table_interval: Duration,
    /// The flow log file, if any.
    pub log: Option<LogConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            buffer: DEFAULT_BUFFER,
            tracked: DEFAULT_TRACKED,
            table_interval: DEFAULT_TABLE_INTERVAL,
            log: None,
        }
    }
}

/// Errors starting the flow pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot open the flow log {path}: {source} (check that the directory exists and is writable, or change --flow-log)"
    )]
    LogOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the flow log writer thread: {0}")]
    LogThread(#[source] std::io::Error),
}

/// The flow pipeline, before it runs. Built by [`Flows::new`], consumed by [`Flows::run`].
#[derive(Debug)]
pub struct Flows {
    metrics: Metrics,
    tracker: Tracker,
    table_interval: Duration,
    /// The flow table was read once: later reads count bytes.
    table_baseline: bool,
    store: Arc<Store>,
    log: Option<(LogSender, std::thread::JoinHandle<()>)>,
}

/// Read access to recent flows and followers, for the admin endpoint. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FlowsHandle {
    store: Arc<Store>,
}

impl FlowsHandle {
    /// The newest `limit` flows matching `filter`, oldest first.
    pub fn query(&self, filter: &Filter, limit: Option<usize>) -> Vec<Arc<Flow>> {
        self.store.query(filter, limit)
    }

    /// A stream of JSON lines: the newest `backlog` matching flows, then new ones as they
    /// come, with `{"lost": n}` lines when the reader falls behind. Needs a Tokio runtime.
    pub fn follow(&self, filter: Filter, backlog: usize) -> FollowBody {
        self.store.follow(filter, backlog)
    }
}

impl Flows {
    /// Registers the flow metrics in `registry` and opens the flow log (if configured).
    pub fn new(config: &Config, registry: &mut Registry) -> Result<(Self, FlowsHandle), Error> {
        let metrics = Metrics::new(registry);
        let log = match &config.log {
            Some(cfg) => Some(log::start(cfg.clone(), metrics.clone())?),
            None => None,
        };
        let store = Arc::new(Store::new(config.buffer));
        Ok((
            Self {
                metrics,
                tracker: Tracker::new(config.tracked),
                table_interval: config.table_interval,
                table_baseline: false,
                store: store.clone(),
                log,
            },
            FlowsHandle { store },
        ))
    }

    /// Handles one event; what [`Flows::run`] does for each.
    pub fn handle(&mut self, ev: &FlowEvent, directory: &Directory) {
        let flow = Arc::new(Flow::from_event(ev, directory, SystemTime::now()));
        self.metrics.record(ev, &flow, &mut self.tracker);
        if let Some((log, _)) = &self.log {
            log.send(flow.clone());
        }
        self.store.push(flow);
    }

    /// Counts what the open TCP connections in `entries` (the kernel's flow table) moved
    /// since they were last reported; what [`Flows::run_with_table`] does after each read.
    /// The first call only takes note of the counters (see
    /// [`Metrics::record_table_entry`]).
    pub fn handle_table(&mut self, entries: &[(FlowKey, FlowValue)], directory: &Directory) {
        let now = SystemTime::now();
        let count = std::mem::replace(&mut self.table_baseline, true);
        for (key, value) in entries {
            let ev = FlowEvent {
                key: *key,
                value: *value,
                kind: 0,
                direction: key.direction,
                _pad: [0; 2],
                ifindex: 0,
            };
            self.metrics.record_table_entry(
                &ev,
                || Flow::from_event(&ev, directory, now),
                &mut self.tracker,
                count,
            );
        }
    }

    /// Processes events until `rx` closes (the datapath stopped), then flushes the log.
    pub async fn run(mut self, mut rx: mpsc::Receiver<FlowEvent>, directory: Arc<Directory>) {
        while let Some(ev) = rx.recv().await {
            self.handle(&ev, &directory);
        }
        self.finish().await;
    }

    /// Like [`Flows::run`], and reads the kernel's flow table with `read_table` (on a
    /// blocking thread) every `table_interval` of the config, to count the bytes of
    /// connections still open. A failed read is logged once and retried at the next tick.
    pub async fn run_with_table<F, E>(
        mut self,
        mut rx: mpsc::Receiver<FlowEvent>,
        directory: Arc<Directory>,
        read_table: F,
    ) where
        F: Fn() -> Result<Vec<(FlowKey, FlowValue)>, E> + Send + Sync + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let read_table = Arc::new(read_table);
        let mut tick = tokio::time::interval(self.table_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reading: Option<tokio::task::JoinHandle<Result<Vec<_>, E>>> = None;
        let mut warned = false;
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(&ev, &directory),
                    None => break,
                },
                _ = tick.tick(), if reading.is_none() => {
                    let read = read_table.clone();
                    reading = Some(tokio::task::spawn_blocking(move || read()));
                }
                done = async {
                    match reading.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                }, if reading.is_some() => {
                    reading = None;
                    match done {
                        Ok(Ok(entries)) => self.handle_table(&entries, &directory),
                        Ok(Err(e)) if !warned => {
                            warned = true;
                            warn!(error = %e, "cannot read the kernel's flow table; the bytes of open connections are counted when they close (logged once)");
                        }
                        Ok(Err(e)) => debug!(error = %e, "cannot read the kernel's flow table"),
                        Err(e) => warn!(error = %e, "the flow table reader failed"),
                    }
                }
            }
        }
        self.finish().await;
    }

    async fn finish(mut self) {
        info!("flow events ended");
        if let Some((log, thread)) = self.log.take() {
            drop(log);
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(())) => {}
                _ => warn!("the flow log writer ended abnormally"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mycel_common::flow::{FLOW_EVENT_CLOSED, FLOW_EVENT_NEW};

    use super::*;
    use crate::flows::record::tests::{directory, event};

    #[test]
    fn the_datapath_flow_table_reader_fits_run_with_table() {
        fn fits<F, E>(_: &F)
        where
            F: Fn() -> Result<Vec<(FlowKey, FlowValue)>, E> + Send + Sync + 'static,
            E: std::fmt::Display + Send + 'static,
        {
        }
        let dir = tempfile::tempdir().unwrap();
        let pin_dir = dir.path().to_path_buf();
        let read = move || crate::datapath::dump_flows(&pin_dir);
        fits(&read);
        assert!(read().is_err(), "no pinned FLOWS map here");
    }

    fn text(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[tokio::test]
    async fn table_reads_count_bytes_of_open_connections_after_the_first() {
        let mut registry = Registry::default();
        let (flows, _handle) = Flows::new(
            &Config {
                table_interval: Duration::from_millis(10),
                ..Config::default()
            },
            &mut registry,
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6);
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = reads.clone();
        let task = tokio::spawn(flows.run_with_table(rx, Arc::new(directory()), move || {
            // 1 000 bytes more at every read up to 4 000; the third read fails.
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n == 2 {
                return Err("map gone");
            }
            let mut v = ev.value;
            v.bytes_fwd = 1_000 * (n + 1).min(4);
            Ok(vec![(ev.key, v)])
        }));
        let received = |registry: &Registry| {
            text(registry)
                .lines()
                .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        };
        // The first read is the baseline (1 000 not counted), the failed one is skipped,
        // the fourth counts 3 000 more.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while received(&registry).as_deref() != Some("3000") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?} after {reads:?} reads",
                received(&registry)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(tx);
        task.await.unwrap();
        assert_eq!(received(&registry).as_deref(), Some("3000"));
        assert!(reads.load(std::sync::atomic::Ordering::SeqCst) >= 4);
    }

    #[tokio::test]
    async fn run_feeds_metrics_ring_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.log");
        let mut registry = Registry::default();
        let (flows, handle) = Flows::new(
            &Config {
                log: Some(LogConfig {
                    path: path.clone(),
                    max_bytes: log::DEFAULT_MAX_BYTES,
                    files: 1,
                }),
                ..Config::default()
            },
            &mut registry,
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(flows.run(rx, Arc::new(directory())));
        let mut ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6);
        tx.send(ev).await.unwrap();
        ev.kind = FLOW_EVENT_CLOSED;
        ev.value.bytes_fwd = 500;
        tx.send(ev).await.unwrap();
        drop(tx);
        task.await.unwrap();

        let recent = handle.query(&Filter::default(), None);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[1].kind, record::Kind::Closed);
        let logged = std::fs::read_to_string(&path).unwrap();
        assert_eq!(logged.lines().count(), 2, "{logged}");
        let text = text(&registry);
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_received_bytes_total{") && l.ends_with(" 500")),
            "{text}"
        );
    }
}
