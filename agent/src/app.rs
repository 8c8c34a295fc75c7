//! Wiring and lifecycle: start the endpoints, load the datapath, follow the source, shut
//! down cleanly.

use std::sync::{Arc, RwLock, atomic::Ordering};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    admin::{self, Role, Shared, Status},
    config::{Config, SourceConfig},
    datapath::{ApplyStats, Datapath},
    metrics::{KernelCounters, MapOpLabels, Metrics},
    source::{SourceEvent, file::FileSource},
    state::{State, Update},
};

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    info!(config = %serde_json::to_string(&cfg)?, version = env!("CARGO_PKG_VERSION"), "starting mycel agent");

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let kernel = Arc::new(KernelCounters::new(&cfg.bpffs));
    registry.register_collector(Box::new(kernel.clone()));
    let SourceConfig::File(dir) = &cfg.source;
    let shared = Arc::new(Shared {
        ready: Default::default(),
        status: RwLock::new(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            source: format!("file:{}", dir.display()),
            cgroup: cfg.cgroup.clone(),
            bpffs: cfg.bpffs.clone(),
            ..Default::default()
        }),
        owners: Default::default(),
        registry,
        kernel,
        pin_dir: cfg.bpffs.clone(),
    });

    let mut servers = Vec::new();
    for (addr, role) in [
        (cfg.admin_addr, Role::Admin),
        (cfg.metrics_addr, Role::Metrics),
        (cfg.readiness_addr, Role::Readiness),
    ] {
        let task = admin::serve(addr, role, shared.clone())
            .await
            .with_context(|| format!("cannot listen on {addr} for the {role:?} endpoints"))?;
        servers.push(task);
    }

    let datapath =
        tokio::task::block_in_place(|| Datapath::load_with(&cfg.cgroup, &cfg.bpffs, cfg.map_sizes))
            .context("loading the datapath")?;
    let (taken_services, taken_backends) = datapath.services.counts();
    if taken_services > 0 {
        info!(
            services = taken_services,
            backends = taken_backends,
            "took over pinned maps from a previous agent; they keep routing until the first sync"
        );
    }
    let (_source, mut events) = FileSource::start(dir.clone())
        .with_context(|| format!("starting the file source on {}", dir.display()))?;

    let mut agent = Agent {
        state: State::default(),
        datapath,
        metrics,
        shared: shared.clone(),
        synced: false,
        rejected_inputs: 0,
        state_problems: 0,
        taken_over: taken_services,
        last_error: None,
    };
    agent.publish();

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(SourceEvent::Update(u)) => agent.update(u),
                Some(SourceEvent::Error(e)) => agent.source_error(&e),
                Some(SourceEvent::Rejected(n)) => agent.rejected_inputs(n),
                None => {
                    error!("the source stopped; exiting");
                    break;
                }
            },
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }

    for s in servers {
        s.abort();
    }
    if cfg.detach_on_exit {
        agent
            .datapath
            .detach_and_unpin()
            .context("detaching programs and removing pins")?;
        info!("programs detached and pins removed");
    } else {
        info!(bpffs = %cfg.bpffs.display(), "programs stay attached and maps pinned");
    }
    Ok(())
}

struct Agent {
    state: State,
    datapath: Datapath,
    metrics: Metrics,
    shared: Arc<Shared>,
    /// True once a full update has been synced into the maps.
    synced: bool,
    /// Inputs the source rejects now (their last good contents in force).
    rejected_inputs: usize,
    /// Cross-object problems the model has now.
    state_problems: usize,
    taken_over: usize,
    last_error: Option<String>,
}

impl Agent {
    fn source_error(&mut self, e: &dyn std::error::Error) {
        warn!("rejected input: {e}");
        self.metrics.source_errors.inc();
        self.last_error = Some(e.to_string());
        self.publish();
    }

    fn rejected_inputs(&mut self, n: usize) {
        self.rejected_inputs = n;
        self.publish();
    }

    fn update(&mut self, update: Update) {
        let seen = update.seen;
        let full = update.full;
        let applied = self.state.apply(update);
        for e in &applied.errors {
            warn!("rejected input: {e}");
            self.metrics.source_errors.inc();
            self.last_error = Some(e.to_string());
        }
        self.state_problems = applied.error_count;

        let (stats, errors) = tokio::task::block_in_place(|| {
            if full || !self.synced {
                self.datapath.services.sync(self.state.frontends())
            } else {
                self.datapath.services.apply(&applied.changes)
            }
        });
        for e in &errors {
            error!("datapath: {e}");
            self.metrics.datapath_errors.inc();
            self.last_error = Some(e.to_string());
        }
        self.record(&stats);
        let first = !self.synced;
        self.synced = true;
        self.metrics
            .update_latency
            .observe(seen.elapsed().as_secs_f64());
        if first {
            self.shared.ready.store(true, Ordering::Release);
            self.metrics.ready.set(1);
            let (services, backends) = self.datapath.services.counts();
            info!(
                services,
                backends,
                written = stats.frontends_written,
                removed = stats.frontends_removed,
                elapsed_ms = seen.elapsed().as_millis() as u64,
                "initial state programmed; ready"
            );
        }
        self.publish();
    }

    fn record(&self, stats: &ApplyStats) {
        self.metrics
            .map_operations
            .get_or_create(&MapOpLabels { op: "write" })
            .inc_by(stats.map_writes as u64);
        self.metrics
            .map_operations
            .get_or_create(&MapOpLabels { op: "delete" })
            .inc_by(stats.map_deletes as u64);
    }

    /// Publishes gauges and the status snapshot the endpoints serve.
    fn publish(&self) {
        let (services, backends) = self.datapath.services.counts();
        self.metrics.services_programmed.set(services as i64);
        self.metrics.backends_programmed.set(backends as i64);
        let standing = self.rejected_inputs + self.state_problems;
        self.metrics.source_errors_current.set(standing as i64);
        if let Ok(mut s) = self.shared.status.write() {
            s.programs = self.datapath.programs();
            s.kernel_features = self.datapath.kernel_features().to_vec();
            s.services = services;
            s.backends = backends;
            s.taken_over = self.taken_over;
            s.errors_current = standing;
            s.last_error = self.last_error.clone();
        }
        if let Ok(mut o) = self.shared.owners.write() {
            *o = self.datapath.services.owners();
        }
    }
}
