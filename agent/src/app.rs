//! Wiring and lifecycle: start the endpoints, load the datapath, follow the source, shut
//! down cleanly.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock, atomic::Ordering},
    time::Duration,
};

use mycel_common::policy::{
    ENDPOINT_F_ENFORCE, ENDPOINT_F_MESH, ENDPOINT_F_MESH_STRICT, ENDPOINT_F_NODE_ALL,
    ENDPOINT_F_NODE_PROBES, EndpointInfo, IDENTITY_HOST, NodeConfig,
};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    admin::{self, Role, Shared, Status},
    config::{Config, SourceConfig},
    datapath::{self, ApplyStats, Datapath, PolicyContent},
    flows::{Directory, Flows, WorkloadInfo},
    identity::{Ca, CertManager, TrustBundle},
    mesh::{Mesh, MeshConfig},
    metrics::{KernelCounters, MapOpLabels, Metrics},
    proxy::{self, ProxyMetrics},
    source::{
        SourceEvent,
        file::FileSource,
        k8s::{self, KubeConfig, KubeSource},
    },
    state::{
        EndpointPolicy, ObjectRef, PolicySettings, State, Update, mesh::MtlsMode,
        policy::NodeTraffic,
    },
};

/// The source in use; dropping it stops it.
#[derive(Debug)]
enum RunningSource {
    File(#[expect(dead_code, reason = "held to keep the source running")] FileSource),
    Kubernetes(#[expect(dead_code, reason = "held to keep the source running")] KubeSource),
}

/// How often what failed for want of an interface is tried again, and counters of
/// background tasks are brought into the metrics.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Flow events queued between the ring buffer reader and the flow pipeline.
const FLOW_EVENT_QUEUE: usize = 8_192;

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    info!(config = %serde_json::to_string(&cfg)?, version = env!("CARGO_PKG_VERSION"), "starting mycel agent");

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (flows, flows_handle) =
        Flows::new(&cfg.flows, &mut registry).context("starting flow observability")?;
    let directory = Arc::new(Directory::new());
    let proxy_metrics = Arc::new(ProxyMetrics::new(
        &mut registry,
        flows.istio_tcp(),
        directory.clone(),
    ));
    let ca_metrics = Arc::new(crate::identity::reload::Metrics::new(&mut registry));
    registry.register(
        "mycel_tls_key_exchanges",
        "Key exchanges of mesh TLS handshakes, by the group negotiated",
        crate::identity::crypto::key_exchanges(),
    );
    registry.register(
        "mycel_certificate_issuances",
        "Workload certificates obtained or not, by signer (local CA or identity server)",
        crate::identity::issuances(),
    );
    let kernel = Arc::new(KernelCounters::new(&cfg.bpffs));
    registry.register_collector(Box::new(kernel.clone()));

    let shared = Arc::new(Shared {
        ready: Default::default(),
        status: RwLock::new(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            source: cfg.source.to_string(),
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
        let (task, _) =
            admin::serve_with_flows(addr, role, shared.clone(), Some(flows_handle.clone()))
                .await
                .with_context(|| format!("cannot listen on {addr} for the {role:?} endpoints"))?;
        servers.push(task);
    }

    let mut datapath =
        tokio::task::block_in_place(|| Datapath::load_with(&cfg.cgroup, &cfg.bpffs, cfg.map_sizes))
            .context("loading the datapath")?;
    // The proxy's own connections are never redirected back to it.
    datapath
        .mesh
        .set_proxy_tgid(std::process::id())
        .context("telling the kernel programs the proxy's process")?;
    // The kernel redirects to the proxy only while this agent renews its lease: renew it
    // before the mesh maps are written, then on every housekeeping tick.
    datapath
        .mesh
        .renew_lease(cfg.redirect_grace)
        .context("renewing the mesh redirect lease")?;
    let (mesh, certs) = start_mesh(&cfg, &datapath, proxy_metrics)?;
    // The CA directory is read again while the agent runs: a CA rotation needs no restart.
    // With the identity server it holds only the trust bundle.
    if certs.is_remote() {
        crate::identity::CaDir::bundle_only(&cfg.ca_dir, ca_metrics)
    } else {
        crate::identity::CaDir::new(&cfg.ca_dir, ca_metrics)
    }
    .context("watching the CA directory")?
    .spawn(certs.clone(), cfg.ca_reload_interval);
    // Flow events from the kernel feed metrics, the recent-flows ring and the flow log; the
    // FLOWS table is read every few seconds so long connections count bytes while open.
    let ring = match datapath.take_flow_events() {
        Some(ring) => ring,
        None => datapath::flow_events_from_pin(&cfg.bpffs)?,
    };
    let (flow_reader, flow_events) =
        datapath::spawn_flow_reader(ring, FLOW_EVENT_QUEUE).context("reading flow events")?;
    let pin_dir = cfg.bpffs.clone();
    tokio::spawn(
        flows.run_with_table(flow_events, directory.clone(), move || {
            datapath::dump_flows(&pin_dir)
        }),
    );
    let (taken_services, taken_backends) = datapath.services.counts();
    if taken_services > 0 {
        info!(
            services = taken_services,
            backends = taken_backends,
            "took over pinned maps from a previous agent; they keep routing until the first sync"
        );
    }
    // Policies judge the node by the addresses it has at start; addresses it gains later
    // are the host identity in the kernel too (see `sync_policy`), judged by the policies'
    // entries for the host.
    let policy_settings = PolicySettings {
        trust_domain: cfg.trust_domain.clone(),
        node_traffic: cfg.node_traffic,
        host_addresses: host_addresses().into_iter().collect(),
        ..PolicySettings::default()
    };
    // The pods' cgroup: a locally sent packet whose socket is outside it is a kubelet probe.
    let pods_cgroup = pods_cgroup(&cfg.cgroup);
    let pods_cgroup_id = match std::fs::metadata(&pods_cgroup) {
        Ok(m) => {
            info!(cgroup = %pods_cgroup.display(), node_traffic = ?cfg.node_traffic, "the pods' cgroup: node processes outside it may send kubelet probes");
            std::os::unix::fs::MetadataExt::ino(&m)
        }
        Err(e) => {
            warn!(cgroup = %pods_cgroup.display(), "cannot read the pods' cgroup id: {e}; no traffic is taken for a kubelet probe");
            0
        }
    };
    let (_source, mut events) = match &cfg.source {
        SourceConfig::File(dir) => {
            let saved = cfg.state_dir.join("last-good").join("files");
            let (source, events) = FileSource::start(dir.clone(), Some(saved))
                .with_context(|| format!("starting the file source on {}", dir.display()))?;
            (RunningSource::File(source), events)
        }
        SourceConfig::Kubernetes {
            node_name,
            kubeconfig,
        } => {
            let client = k8s::client(kubeconfig.as_deref())
                .await
                .context("connecting to the Kubernetes API")?;
            let (source, events) = KubeSource::start(
                client,
                KubeConfig {
                    node_name: node_name.clone(),
                    cgroup_root: cfg.cgroup_root.clone(),
                    root_namespace: policy_settings.root_namespace.clone(),
                    saved_policies: Some(
                        cfg.state_dir
                            .join("last-good")
                            .join("authorizationpolicies"),
                    ),
                },
            );
            info!(node = %node_name, "watching the Kubernetes API; ready once every kind is listed");
            (RunningSource::Kubernetes(source), events)
        }
    };

    let mut agent = Agent {
        state: State::with_policy_settings(policy_settings),
        datapath,
        metrics,
        shared: shared.clone(),
        synced: false,
        rejected_inputs: 0,
        state_problems: 0,
        taken_over: taken_services,
        last_error: None,
        directory,
        tc_pending: BTreeSet::new(),
        flow_reader,
        flow_events_dropped: 0,
        owners_published: Default::default(),
        mesh,
        node_traffic: cfg.node_traffic,
        pods_cgroup_id,
        certs,
        redirect_grace: cfg.redirect_grace,
    };
    agent.publish();

    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = housekeeping.tick() => agent.housekeeping(),
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }

    if cfg.detach_on_exit {
        // New connections go direct from now on rather than to listeners about to close.
        if let Err(e) = agent.datapath.mesh.end_lease() {
            warn!("ending the mesh redirect lease: {e}");
        }
    }
    agent.mesh.drain(cfg.drain_grace).await;
    for s in servers {
        s.abort();
    }
    if cfg.detach_on_exit {
        // What `mycel uninstall` does, for this agent's own workloads' namespaces.
        let own = crate::podnet::Scope {
            cgroup: None,
            netns_dirs: crate::podnet::NETNS_DIRS
                .map(std::path::PathBuf::from)
                .to_vec(),
            only_cookies: Some(agent.datapath.mesh.source_cookies()),
        };
        let (removal, namespaces) = tokio::task::block_in_place(|| {
            (
                agent.datapath.detach_and_unpin(),
                crate::podnet::undo_namespaces(&own),
            )
        });
        let removal = removal.context("detaching programs and removing pins")?;
        let namespaces = namespaces
            .map_err(anyhow::Error::msg)
            .context("finding the workloads' network namespaces")?;
        let mut failed = Vec::new();
        for ns in &namespaces {
            info!(netns = %ns.netns.display(), removed = ?ns.removed, "undid the mesh set-up of a workload's namespace");
            if let Some(e) = &ns.error {
                failed.push(format!("{}: {e}", ns.netns.display()));
            }
        }
        anyhow::ensure!(
            failed.is_empty(),
            "undoing the mesh set-up of workload namespaces: {}",
            failed.join("; ")
        );
        info!(
            removed = removal.removed.len(),
            namespaces = namespaces.len(),
            "programs detached, pins removed, workload namespaces restored"
        );
    } else {
        info!(bpffs = %cfg.bpffs.display(), "programs stay attached and maps pinned");
    }
    Ok(())
}

/// The CA (loaded, or created standalone on first start), the certificate manager and the
/// proxy. With Kubernetes the CA must be there: every node must share it.
fn start_mesh(
    cfg: &Config,
    datapath: &Datapath,
    metrics: Arc<ProxyMetrics>,
) -> anyhow::Result<(Mesh, CertManager)> {
    let certs = match &cfg.identity_server {
        Some(remote) => remote_certs(cfg, remote)?,
        None => local_certs(cfg)?,
    };
    let mesh = Mesh::new(
        MeshConfig {
            proxy: proxy::Config::default(),
            access_log: cfg.access_log,
        },
        certs.clone(),
        datapath.mesh.orig_dst_table(),
        metrics,
    );
    Ok((mesh, certs))
}

/// Certificates from the identity server: the CA directory holds only the trust bundle.
fn remote_certs(
    cfg: &Config,
    remote: &crate::identity::RemoteSigner,
) -> anyhow::Result<CertManager> {
    let key = cfg.ca_dir.join(crate::identity::CA_KEY_FILE);
    if key.exists() {
        warn!(
            key = %key.display(),
            "a CA key is in the CA directory although certificates come from the identity \
             server: it is not used; mount only ca.pem (see manifests/README.md)"
        );
    }
    let bundle = TrustBundle::from_file(&cfg.ca_dir.join(crate::identity::CA_CERT_FILE))
        .context("the trust bundle of the identity server's CA")?;
    info!(server = %remote.server, server_id = %remote.server_id, "workload certificates come from the identity server");
    CertManager::remote(remote.clone(), bundle, &cfg.trust_domain, cfg.post_quantum)
        .context("starting the certificate manager")
}

/// Certificates signed by the agent's own CA.
fn local_certs(cfg: &Config) -> anyhow::Result<CertManager> {
    let ca = match &cfg.source {
        SourceConfig::Kubernetes { .. } => {
            let cert = cfg.ca_dir.join(crate::identity::CA_CERT_FILE);
            let key = cfg.ca_dir.join(crate::identity::CA_KEY_FILE);
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| {
                    format!(
                        "reading {} (mount the Secret mycel-ca there; see manifests/README.md)",
                        p.display()
                    )
                })
            };
            Ca::from_pem(
                &read(&cert)?,
                &read(&key)?,
                &cfg.ca_dir.display().to_string(),
            )?
        }
        SourceConfig::File(_) => Ca::load_or_create(&cfg.ca_dir, &cfg.trust_domain)
            .with_context(|| format!("the CA in {}", cfg.ca_dir.display()))?,
    };
    // The roots are those the CA's file names (the manager adds them).
    let bundle = TrustBundle::default();
    CertManager::with_key_exchange(
        ca,
        bundle,
        &cfg.trust_domain,
        cfg.cert_lifetime,
        cfg.post_quantum,
    )
    .context("starting the certificate manager")
}

struct Agent {
    /// Enrolled workloads and the node proxy.
    mesh: Mesh,
    /// The workload certificates and the trust bundle (shared with the mesh), for status.
    certs: CertManager,
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
    /// Who is who, for flow records and metrics.
    directory: Arc<Directory>,
    /// Local workloads whose interface could not be attached yet.
    tc_pending: BTreeSet<ObjectRef>,
    /// Reads the kernel's flow events; stops when dropped.
    flow_reader: datapath::FlowReader,
    /// `flow_reader.dropped()` already counted in the metrics.
    flow_events_dropped: u64,
    /// The owners version last published for `/debug/services`.
    owners_published: std::cell::Cell<Option<u64>>,
    /// `--node-traffic`.
    node_traffic: NodeTraffic,
    /// cgroup id of `--cgroup`, for the TC programs' kubelet probe test (0: unknown).
    pods_cgroup_id: u64,
    /// How long the kernel keeps redirecting after a lease renewal.
    redirect_grace: Duration,
}

/// ifindexes with pinned TC links under the agent's bpffs directory (an earlier agent's
/// attachments included).
fn pinned_tc_ifindexes(datapath: &Datapath) -> BTreeSet<u32> {
    let dir = datapath.pin_dir().join("links").join("tc");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.split_once('-')?.0.parse().ok()
        })
        .collect()
}

/// Addresses of this network namespace's interfaces (the node's own).
fn host_addresses() -> BTreeSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return BTreeSet::new();
    };
    addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Where the pods live: kubelet's `kubepods.slice` (systemd cgroup driver) or `kubepods`
/// (cgroupfs driver) below `--cgroup` when there is one (the manifests give the agent the
/// cgroup2 root, so that host processes are load-balanced too), else `--cgroup` itself.
/// A cgroup v2 id is the directory's inode number.
fn pods_cgroup(cgroup: &Path) -> PathBuf {
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|name| cgroup.join(name))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| cgroup.to_path_buf())
}

/// `ENDPOINTS` flags of a local workload.
fn endpoint_flags(enforce: bool, mesh: Option<MtlsMode>, node: NodeTraffic) -> u32 {
    let mut flags = if enforce { ENDPOINT_F_ENFORCE } else { 0 };
    flags |= match node {
        NodeTraffic::All => ENDPOINT_F_NODE_ALL,
        NodeTraffic::Probes => ENDPOINT_F_NODE_PROBES,
        NodeTraffic::None => 0,
    };
    match mesh {
        Some(MtlsMode::Strict) => flags |= ENDPOINT_F_MESH | ENDPOINT_F_MESH_STRICT,
        Some(MtlsMode::Permissive) => flags |= ENDPOINT_F_MESH,
        None => {}
    }
    flags
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
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
        for w in &applied.warnings {
            warn!("{w}");
        }
        if first || applied.workloads_changed {
            self.publish_workloads();
        }
        // Policy first: the mesh serves a STRICT workload only once TC enforces it.
        if first || applied.policy_changed || applied.workloads_changed || applied.mesh_changed {
            tokio::task::block_in_place(|| self.sync_policy(first));
        }
        if first || applied.mesh_changed {
            self.sync_mesh();
        }
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

    /// Attaches the TC programs to every local workload's interface (and detaches them from
    /// workloads that left), then writes identities, endpoints and compiled policy into the
    /// maps. An interface that cannot be attached yet (the workload's veth may appear after
    /// its Workload) is retried on the next sync and by [`Agent::retry`].
    fn sync_policy(&mut self, first: bool) {
        let policy = self.state.policy();
        let wanted: BTreeMap<&str, &EndpointPolicy> = policy
            .endpoints()
            .values()
            .map(|e| (e.interface.as_str(), e))
            .collect();

        // Detach what no local workload wants any more; after a restart, also what an
        // earlier agent attached (found by its pins).
        let mut attached: BTreeMap<u32, String> = self
            .datapath
            .tc_attachments()
            .map(|a| (a.ifindex, a.interface.clone()))
            .collect();
        if first {
            for ifindex in pinned_tc_ifindexes(&self.datapath) {
                attached.entry(ifindex).or_default();
            }
        }
        for (ifindex, name) in &attached {
            let still = !name.is_empty() && wanted.contains_key(name.as_str());
            if !still && let Err(e) = self.datapath.detach_tc(*ifindex) {
                warn!(ifindex, interface = %name, "detaching TC programs failed: {e}");
            }
        }

        let addresses: BTreeMap<&ObjectRef, &[IpAddr]> = self
            .state
            .workloads()
            .map(|w| (&w.meta.id, w.addresses.as_slice()))
            .collect();
        // Programs check a workload's source addresses as soon as they are attached (an
        // upgrade replaces programs without the check interface by interface): write the
        // addresses of the interfaces that exist first.
        let early: BTreeMap<IpAddr, u32> = wanted
            .iter()
            .filter_map(|(interface, ep)| {
                let ifindex = nix::net::if_::if_nametoindex(*interface).ok()?;
                let addrs = addresses.get(&ep.workload).copied().unwrap_or_default();
                Some(addrs.iter().map(move |a| (*a, ifindex)))
            })
            .flatten()
            .collect();
        if let Err(e) = self.datapath.policy.add_sources(&early) {
            warn!("writing workload source addresses: {e}");
        }
        let mut content = PolicyContent::default();
        let mut pending = BTreeSet::new();
        for (interface, ep) in &wanted {
            let ifindex = match self.datapath.attach_tc(interface) {
                Ok(a) => a.ifindex,
                Err(e) => {
                    if !self.tc_pending.contains(&ep.workload) {
                        error!(
                            workload = %ep.workload,
                            interface,
                            "cannot attach policy and flow programs: {e}; retrying"
                        );
                        self.metrics.datapath_errors.inc();
                        self.last_error = Some(format!(
                            "workload {}: interface {interface}: {e}",
                            ep.workload
                        ));
                    }
                    pending.insert(ep.workload.clone());
                    continue;
                }
            };
            content.endpoints.insert(
                ifindex,
                EndpointInfo {
                    endpoint_id: ep.endpoint_id,
                    identity: ep.identity,
                    flags: endpoint_flags(
                        ep.enforce,
                        self.state.mesh_mode_of(&ep.workload),
                        self.node_traffic,
                    ),
                    policy_revision: 0,
                },
            );
            // What the workload may send from (anti-spoofing).
            for &a in addresses.get(&ep.workload).copied().unwrap_or_default() {
                content.sources.insert(a, ifindex);
            }
            content
                .policy
                .extend(ep.entries.iter().map(|(k, v)| (*k, *v)));
        }
        self.tc_pending = pending;
        content.node = NodeConfig {
            pods_cgroup_id: self.pods_cgroup_id,
        };
        content.ipcache = policy.ipcache().clone();
        // The node's own addresses are the host identity; the model has those it had at
        // start, this adds any it gained since.
        for ip in host_addresses() {
            content
                .ipcache
                .entry((ip, host_prefix(ip)))
                .or_insert(IDENTITY_HOST);
        }
        match self.datapath.policy.apply(&content) {
            Ok(stats) => {
                debug!(?stats, "policy maps written");
            }
            Err(e) => {
                error!("writing policy maps: {e}");
                self.metrics.datapath_errors.inc();
                self.last_error = Some(e.to_string());
            }
        }
        self.metrics
            .policy_loaded
            .set(policy.policies_loaded() as i64);
        self.metrics
            .policy_entries
            .set(policy.policy_entries() as i64);
        self.metrics
            .policy_endpoints
            .set(content.endpoints.len() as i64);
        self.metrics
            .ipcache_entries
            .set(content.ipcache.len() as i64);
        let names = policy.policies_by_id();
        self.directory.set_policies(names);
    }

    /// Enrollment, certificates and the proxy's listeners follow the model; then the
    /// kernel's mesh maps.
    fn sync_mesh(&mut self) {
        let content = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(self.mesh.sync(&self.state, &self.tc_pending))
        });
        match self.datapath.mesh.apply(&content) {
            Ok(stats) => debug!(?stats, "mesh maps written"),
            Err(e) => {
                error!("writing mesh maps: {e}");
                self.metrics.datapath_errors.inc();
                self.last_error = Some(e.to_string());
            }
        }
    }

    /// Retries what failed for want of an interface; counts what background tasks lost.
    fn housekeeping(&mut self) {
        if let Err(e) = self.datapath.mesh.renew_lease(self.redirect_grace) {
            error!("renewing the mesh redirect lease: {e}");
            self.metrics.datapath_errors.inc();
            self.last_error = Some(e.to_string());
        }
        // Certificates renew, and the CA directory is reloaded, in the background: show
        // the current ones.
        if let Ok(mut s) = self.shared.status.write() {
            s.certificates = self.mesh.certificates();
            s.mesh_workloads = self.mesh.local_workloads();
            s.mesh_pending = self.mesh.pending();
            s.trust_bundle = admin::TrustAnchor::from_bundle(&self.certs.bundle());
            s.signing_ca = self.certs.signing_ca();
            s.ca_reload = self.certs.reload_status();
            s.certificate_errors = self.certs.issue_errors();
        }
        if !self.tc_pending.is_empty() {
            tokio::task::block_in_place(|| self.sync_policy(false));
            self.publish();
        }
        if self.mesh.has_pending() {
            self.sync_mesh();
            tokio::task::block_in_place(|| self.sync_policy(false));
            self.publish();
        }
        let dropped = self.flow_reader.dropped();
        if dropped > self.flow_events_dropped {
            self.metrics
                .flow_events_dropped
                .inc_by(dropped - self.flow_events_dropped);
            self.flow_events_dropped = dropped;
        }
    }

    /// Tells the flow pipeline which workload each address belongs to.
    fn publish_workloads(&self) {
        let mut entries = Vec::new();
        for w in self.state.workloads() {
            let info = WorkloadInfo {
                namespace: w.meta.id.namespace.clone(),
                name: w.meta.id.name.clone(),
                service_account: w.service_account.clone(),
                principal: self
                    .state
                    .principal(&w.meta.id.namespace, &w.service_account),
                app: w
                    .meta
                    .labels
                    .get("app")
                    .or_else(|| w.meta.labels.get("app.kubernetes.io/name"))
                    .cloned(),
            };
            for ip in &w.addresses {
                entries.push((*ip, info.clone()));
            }
        }
        self.directory.set_workloads(entries);
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
            s.tc_attachments = self
                .datapath
                .tc_attachments()
                .map(|a| {
                    let mode = match a.mode {
                        datapath::TcMode::Tcx => "tcx",
                        datapath::TcMode::Clsact => "clsact",
                    };
                    format!("{} ({mode})", a.interface)
                })
                .collect();
            s.policies = self.state.policy().policies_loaded();
            s.services = services;
            s.backends = backends;
            s.taken_over = self.taken_over;
            s.errors_current = standing;
            s.last_error = self.last_error.clone();
            s.certificates = self.mesh.certificates();
            s.mesh_workloads = self.mesh.local_workloads();
            s.mesh_pending = self.mesh.pending();
            s.trust_bundle = admin::TrustAnchor::from_bundle(&self.certs.bundle());
            s.key_exchange = self.certs.key_exchange_groups();
            s.signing_ca = self.certs.signing_ca();
            s.ca_reload = self.certs.reload_status();
            s.certificate_errors = self.certs.issue_errors();
        }
        // Rebuilding the owners costs a copy of every service's name: only when they change.
        let version = self.datapath.services.owners_version();
        if self.owners_published.get() != Some(version)
            && let Ok(mut o) = self.shared.owners.write()
        {
            *o = self.datapath.services.owners();
            self.owners_published.set(Some(version));
        }
    }
}
