//! Graceful drain: stop taking new work, let work in flight finish for a grace period, then
//! close what is left.
//!
//! Every listener, connection and tunnel holds a [`Watch`]. Each clone keeps a sender of a
//! channel alive, so the drainer knows all work has ended when that channel reports every
//! sender gone — no counter to keep in step by hand.

use std::time::Duration;

use tokio::sync::{Mutex, mpsc, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Closed,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Everything in flight finished within the grace period.
    Finished,
    /// The grace period ran out; the remaining tunnels were closed.
    Forced,
}

/// Held by each piece of work; tells it when to stop.
#[derive(Clone, Debug)]
pub(crate) struct Watch {
    phase: watch::Receiver<Phase>,
    _alive: mpsc::Sender<()>,
}

impl Watch {
    /// Completes once a drain has begun: stop taking new work.
    pub(crate) async fn draining(&self) {
        let mut rx = self.phase.clone();
        // An error means the drainer is gone, which also means stop.
        let _ = rx.wait_for(|p| *p >= Phase::Draining).await;
    }

    /// Completes when the grace period is over: abandon the work.
    pub(crate) async fn closed(&self) {
        let mut rx = self.phase.clone();
        let _ = rx.wait_for(|p| *p >= Phase::Closed).await;
    }

    pub(crate) fn is_draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }
}

#[derive(Debug)]
pub(crate) struct Drain {
    phase: watch::Sender<Phase>,
    /// Taken away when draining starts, so no new work can begin.
    alive_tx: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    /// Reports `None` once every [`Watch`] is gone.
    alive_rx: Mutex<mpsc::Receiver<()>>,
}

/// After forcing, time given to tasks to notice and let go.
const FORCE_WAIT: Duration = Duration::from_secs(5);

impl Drain {
    pub(crate) fn new() -> (Self, Watch) {
        let (phase, rx) = watch::channel(Phase::Running);
        let (tx, alive_rx) = mpsc::channel(1);
        let watch = Watch {
            phase: rx,
            _alive: tx.clone(),
        };
        let drain = Self {
            phase,
            alive_tx: std::sync::Mutex::new(Some(tx)),
            alive_rx: Mutex::new(alive_rx),
        };
        (drain, watch)
    }

    /// A watch for new work, or `None` once draining started.
    pub(crate) fn watch(&self) -> Option<Watch> {
        let alive = self.alive_tx.lock().unwrap_or_else(|e| e.into_inner());
        alive.as_ref().map(|tx| Watch {
            phase: self.phase.subscribe(),
            _alive: tx.clone(),
        })
    }

    /// Drains; a second call returns as soon as the first one's work is done.
    pub(crate) async fn drain(&self, grace: Duration) -> DrainOutcome {
        drop(
            self.alive_tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        self.phase.send_if_modified(|p| {
            let changed = *p < Phase::Draining;
            *p = (*p).max(Phase::Draining);
            changed
        });
        let mut alive = self.alive_rx.lock().await;
        if tokio::time::timeout(grace, alive.recv()).await.is_ok() {
            return DrainOutcome::Finished;
        }
        self.phase.send_replace(Phase::Closed);
        let _ = tokio::time::timeout(FORCE_WAIT, alive.recv()).await;
        DrainOutcome::Forced
    }
}
