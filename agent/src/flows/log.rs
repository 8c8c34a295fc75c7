//! The flow log file: JSON lines appended by a thread of its own, with size-based
//! rotation (`PATH` → `PATH.1` → … → `PATH.N`, the oldest deleted).
//!
//! The flow loop hands records over through a bounded queue and never waits: when the
//! writer falls behind, records are dropped and counted in
//! `mycel_flow_log_dropped_total{reason="queue_full"}`. Write errors are counted too, and
//! logged once per kind of failure rather than once per line.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::{info, warn};

use super::{
    Error,
    metrics::{LogDropLabels, Metrics},
    record::Flow,
};

/// Default size at which the file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// Default number of rotated files kept.
pub const DEFAULT_FILES: u32 = 5;
/// Records waiting for the writer before new ones are dropped.
pub const QUEUE: usize = 8_192;
/// How long the writer waits before trying again to open the file after a failure.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// Where and how much to log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    pub path: PathBuf,
    /// The file is rotated before a line would make it larger than this.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` … `PATH.N`); 0 keeps none.
    pub files: u32,
}

/// The flow loop's end of the log: hands records to the writer thread.
#[derive(Debug)]
pub struct LogSender {
    tx: mpsc::SyncSender<Arc<Flow>>,
    metrics: Metrics,
}

impl LogSender {
    /// Queues `flow`; counts it as dropped if the writer is behind.
    pub fn send(&self, flow: Arc<Flow>) {
        let reason = match self.tx.try_send(flow) {
            Ok(()) => return,
            Err(mpsc::TrySendError::Full(_)) => "queue_full",
            Err(mpsc::TrySendError::Disconnected(_)) => "write_error",
        };
        self.metrics
            .log_dropped
            .get_or_create(&LogDropLabels { reason })
            .inc();
    }
}

/// Opens (creating) the log and starts its writer thread; the thread ends, flushing, once
/// the [`LogSender`] is dropped.
pub fn start(
    cfg: LogConfig,
    metrics: Metrics,
) -> Result<(LogSender, thread::JoinHandle<()>), Error> {
    let writer = Writer::open(cfg, metrics.clone())?;
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let handle = thread::Builder::new()
        .name("mycel-flow-log".into())
        .spawn(move || writer.run(rx))
        .map_err(Error::LogThread)?;
    Ok((LogSender { tx, metrics }, handle))
}

struct Writer {
    cfg: LogConfig,
    file: Option<BufWriter<File>>,
    size: u64,
    metrics: Metrics,
    /// Kinds of failure already logged: (operation, error kind).
    reported: HashSet<(&'static str, io::ErrorKind)>,
    last_open_attempt: Option<Instant>,
}

fn open_append(path: &Path) -> io::Result<(BufWriter<File>, u64)> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let size = f.metadata()?.len();
    Ok((BufWriter::new(f), size))
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl Writer {
    fn open(cfg: LogConfig, metrics: Metrics) -> Result<Self, Error> {
        let (file, size) = open_append(&cfg.path).map_err(|source| Error::LogOpen {
            path: cfg.path.clone(),
            source,
        })?;
        info!(path = %cfg.path.display(), max_bytes = cfg.max_bytes, files = cfg.files, "writing flows to a log file");
        Ok(Self {
            cfg,
            file: Some(file),
            size,
            metrics,
            reported: HashSet::new(),
            last_open_attempt: None,
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Arc<Flow>>) {
        let mut line = Vec::with_capacity(1024);
        while let Ok(flow) = rx.recv() {
            self.write(&flow, &mut line);
            while let Ok(flow) = rx.try_recv() {
                self.write(&flow, &mut line);
            }
            // Flush when the queue is empty: whole batches reach the file together, and a
            // quiet agent leaves nothing buffered.
            self.flush();
        }
        self.flush();
    }

    fn failed(&mut self, op: &'static str, e: &io::Error) {
        if self.reported.insert((op, e.kind())) {
            warn!(path = %self.cfg.path.display(), error = %e, "flow log: {op} failed; further failures of this kind are counted in mycel_flow_log_dropped_total, not logged");
        }
    }

    fn dropped(&self) {
        self.metrics
            .log_dropped
            .get_or_create(&LogDropLabels {
                reason: "write_error",
            })
            .inc();
    }

    fn write(&mut self, flow: &Flow, line: &mut Vec<u8>) {
        line.clear();
        if let Err(e) = serde_json::to_writer(&mut *line, flow) {
            self.failed("encoding a record", &io::Error::other(e));
            self.dropped();
            return;
        }
        line.push(b'\n');
        let len = line.len() as u64;
        if self.file.is_some() && self.size > 0 && self.size + len > self.cfg.max_bytes {
            self.rotate();
        }
        if self.file.is_none() {
            self.reopen();
        }
        let Some(file) = self.file.as_mut() else {
            self.dropped();
            return;
        };
        match file.write_all(line) {
            Ok(()) => self.size += len,
            Err(e) => {
                self.failed("writing", &e);
                self.dropped();
                // Start over with a fresh handle later (the file may have been removed or
                // the disk filled); what the buffer held is lost with it.
                self.file = None;
            }
        }
    }

    fn flush(&mut self) {
        if let Some(file) = self.file.as_mut()
            && let Err(e) = file.flush()
        {
            self.failed("writing", &e);
            self.dropped();
            self.file = None;
        }
    }

    fn reopen(&mut self) {
        if self
            .last_open_attempt
            .is_some_and(|t| t.elapsed() < REOPEN_AFTER)
        {
            return;
        }
        self.last_open_attempt = Some(Instant::now());
        match open_append(&self.cfg.path) {
            Ok((file, size)) => {
                self.file = Some(file);
                self.size = size;
            }
            Err(e) => self.failed("opening", &e),
        }
    }

    fn rotate(&mut self) {
        self.flush();
        self.file = None;
        let path = self.cfg.path.clone();
        let n = self.cfg.files;
        let result = (|| -> io::Result<()> {
            if n == 0 {
                return std::fs::remove_file(&path);
            }
            match std::fs::remove_file(numbered(&path, n)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            for i in (1..n).rev() {
                match std::fs::rename(numbered(&path, i), numbered(&path, i + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&path, numbered(&path, 1))
        })();
        if let Err(e) = result {
            self.failed("rotating", &e);
        }
        // Reopen at once, whatever happened: if the rename failed the file keeps growing
        // rather than losing records.
        self.last_open_attempt = None;
        self.reopen();
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use mycel_common::flow::FLOW_EVENT_NEW;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::flows::record::tests::{directory, event};

    fn flow(port: u16) -> Arc<Flow> {
        Arc::new(Flow::from_event(
            &event(
                FLOW_EVENT_NEW,
                &format!("10.0.0.1:{port}"),
                "10.0.0.2:80",
                6,
            ),
            &directory(),
            SystemTime::now(),
        ))
    }

    fn ports(path: &Path) -> Vec<u16> {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        crate::flows::record::tests::source_ports(text.lines())
    }

    #[test]
    fn rotation_keeps_n_files_with_the_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.log");
        let line_len = serde_json::to_vec(&*flow(10_000)).unwrap().len() as u64 + 1;
        let cfg = LogConfig {
            path: path.clone(),
            // Four lines per file.
            max_bytes: line_len * 4,
            files: 2,
        };
        let metrics = Metrics::new(&mut Registry::default());
        let (tx, handle) = start(cfg, metrics.clone()).unwrap();
        // 20 records: 5 files' worth; the oldest 2 files' worth are rotated away.
        for p in 10_000..10_020 {
            tx.send(flow(p));
        }
        drop(tx);
        handle.join().unwrap();
        assert_eq!(ports(&path), (10_016..10_020).collect::<Vec<_>>());
        assert_eq!(
            ports(&numbered(&path, 1)),
            (10_012..10_016).collect::<Vec<_>>()
        );
        assert_eq!(
            ports(&numbered(&path, 2)),
            (10_008..10_012).collect::<Vec<_>>()
        );
        assert!(!numbered(&path, 3).exists());
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["flows.log", "flows.log.1", "flows.log.2"]);
    }

    #[test]
    fn appends_to_an_existing_file_and_names_it_when_it_cannot_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.log");
        std::fs::write(&path, "").unwrap();
        let cfg = LogConfig {
            path: path.clone(),
            max_bytes: DEFAULT_MAX_BYTES,
            files: DEFAULT_FILES,
        };
        for round in 0..2u16 {
            let (tx, handle) = start(cfg.clone(), Metrics::new(&mut Registry::default())).unwrap();
            tx.send(flow(round));
            drop(tx);
            handle.join().unwrap();
        }
        assert_eq!(ports(&path), [0, 1]);

        let bad = LogConfig {
            path: dir.path().join("missing/flows.log"),
            ..cfg
        };
        let e = start(bad, Metrics::new(&mut Registry::default())).unwrap_err();
        assert!(e.to_string().contains("missing/flows.log"), "{e}");
    }

    #[test]
    fn a_full_queue_is_counted_not_silent() {
        let metrics = Metrics::new(&mut Registry::default());
        // A sender whose writer never reads.
        let (tx, _rx) = mpsc::sync_channel(1);
        let s = LogSender {
            tx,
            metrics: metrics.clone(),
        };
        s.send(flow(1));
        s.send(flow(2));
        s.send(flow(3));
        assert_eq!(
            metrics
                .log_dropped
                .get_or_create(&LogDropLabels {
                    reason: "queue_full"
                })
                .get(),
            2
        );
    }
}
