//! The mesh: enrolled workloads talk over HBONE (mutual TLS) through the node proxy.
//!
//! For every enrolled workload of this node the agent
//! - issues a certificate for its identity (`spiffe://<td>/ns/<ns>/sa/<sa>`),
//! - prepares its network namespace and listens there on its own address: port 15001
//!   takes the connections the kernel redirects to enrolled destinations, port 15008 takes
//!   HBONE tunnels from other proxies ([`podnet`]),
//! - tells the kernel its namespace (by cookie) is an enrolled source.
//!
//! Every enrolled workload of the cluster, local or not, is an enrolled destination in the
//! kernel, with its mutual TLS mode. The flow of one connection from A (node 1) to B
//! (node 2):
//!
//! 1. A connects to B (or to a Service backed by B). The connect hook sees an enrolled
//!    source and destination, records B's address under the socket and points the socket
//!    at `A:15001`, inside A's namespace, where the proxy listens.
//! 2. The proxy accepts, looks the original destination up by the client's address and
//!    port, and opens (or reuses) a mutual TLS connection from A's namespace to `B:15008`,
//!    presenting A's certificate and expecting B's identity; the tunnel is an HTTP/2
//!    CONNECT stream to `B:port`.
//! 3. Node 2's proxy, listening on `B:15008` inside B's namespace, presents B's
//!    certificate, authenticates A by its certificate, asks the AuthorizationPolicies of B
//!    with A's principal, and connects to `B:port` from inside B's namespace with A's
//!    address as source (a transparent socket), so B sees A's address.
//!
//! Nothing here is on the path of traffic that is not between enrolled workloads.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use mycel_common::{
    mesh::{
        MESH_F_ENROLLED, MESH_F_STRICT, MESH_HBONE_PORT, MESH_OUTBOUND_PORT, MeshDest, MeshSource,
    },
    policy::VERDICT_ALLOW,
};
use rustls::pki_types::CertificateDer;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    datapath::{MeshContent, OrigDstTable, mesh_addr},
    identity::{self, CertInfo, CertManager, SpiffeId},
    podnet::PodNet,
    proxy::{
        self, Authorizer, Connector, Inbound, InboundContext, LocalWorkloads, Outbound,
        OutboundRequest, ProxyMetrics, SocketFuture, Tls,
    },
    state::{
        AuthorizationPolicy, ObjectRef, State, Workload,
        mesh::MtlsMode,
        policy::{self, Peer, PeerKind},
    },
};

/// How long a redirected connection's original destination may take to show up in the
/// kernel's table (the `sock_ops` program writes it before the SYN is sent, so it is there
/// by the time the proxy accepts; the wait covers a slow CPU only).
const ORIG_DST_WAIT: Duration = Duration::from_millis(50);

/// What the proxy's callbacks read: who is enrolled, and the policies. Replaced as a whole
/// on every change, so a connection sees one consistent version.
#[derive(Debug, Default)]
struct View {
    root_namespace: String,
    /// Enrolled workloads of the cluster by address: their identity.
    identities: HashMap<IpAddr, SpiffeId>,
    /// Enrolled workloads of this node by address.
    local: HashMap<IpAddr, Arc<Workload>>,
    policies: Vec<AuthorizationPolicy>,
}

type SharedView = Arc<RwLock<Arc<View>>>;

fn read(view: &SharedView) -> Arc<View> {
    view.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// An enrolled workload of this node being served.
#[derive(Debug)]
struct PodProxy {
    ip: IpAddr,
    net: PodNet,
    cookie: u64,
    inbound: Inbound,
    outbound: JoinHandle<()>,
}

/// The node's part of the mesh.
#[derive(Debug)]
pub struct Mesh {
    certs: CertManager,
    view: SharedView,
    pods_by_ip: Arc<RwLock<HashMap<IpAddr, PodNet>>>,
    outbound: Arc<Outbound>,
    inbound: Arc<InboundContext>,
    orig: OrigDstTable,
    metrics: Arc<ProxyMetrics>,
    access_log: bool,
    pods: BTreeMap<ObjectRef, PodProxy>,
    /// Local enrolled workloads that could not be set up yet (no namespace, no address);
    /// retried by [`Mesh::retry`]. Each problem is logged once.
    pending: BTreeMap<ObjectRef, String>,
    /// Workloads that left, by address: their tunnels draining, then their namespace's
    /// set-up undone. The flag cancels the undoing when the workload comes back first.
    leaving: HashMap<IpAddr, (Arc<std::sync::atomic::AtomicBool>, JoinHandle<()>)>,
    _renewal: JoinHandle<()>,
}

/// Settings of [`Mesh::new`].
#[derive(Debug)]
pub struct MeshConfig {
    pub proxy: proxy::Config,
    pub access_log: bool,
}

impl Mesh {
    /// The mesh of a node whose certificates come from `certs` and whose redirected
    /// connections' destinations are in `orig`.
    pub fn new(
        cfg: MeshConfig,
        certs: CertManager,
        orig: OrigDstTable,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        let view: SharedView = Default::default();
        let pods_by_ip: Arc<RwLock<HashMap<IpAddr, PodNet>>> = Default::default();
        let tls: Arc<dyn Tls> = Arc::new(MeshTls {
            certs: certs.clone(),
            view: view.clone(),
        });
        let connector: Arc<dyn Connector> = Arc::new(PodConnector(pods_by_ip.clone()));
        let outbound = Arc::new(Outbound::with_connector(
            cfg.proxy.clone(),
            tls.clone(),
            connector.clone(),
            metrics.clone(),
        ));
        let mut inbound = InboundContext::new(
            cfg.proxy,
            tls,
            Arc::new(MeshAuthz(view.clone())),
            Arc::new(MeshLocal(view.clone())),
            connector,
            metrics.clone(),
        );
        inbound.proxy_ports = vec![MESH_OUTBOUND_PORT, MESH_HBONE_PORT];
        let inbound = Arc::new(inbound);
        let renewal = certs.spawn_renewal();
        Mesh {
            certs,
            view,
            pods_by_ip,
            outbound,
            inbound,
            orig,
            metrics,
            access_log: cfg.access_log,
            pods: BTreeMap::new(),
            pending: BTreeMap::new(),
            leaving: HashMap::new(),
            _renewal: renewal,
        }
    }

    /// The certificates of local workloads, for `mycel status`.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.certs.certificates()
    }

    /// The CAs peers' certificates may chain to.
    pub fn bundle(&self) -> identity::TrustBundle {
        self.certs.bundle()
    }

    /// Number of local workloads served.
    pub fn local_workloads(&self) -> usize {
        self.pods.len()
    }

    /// Local enrolled workloads not served yet, with the reason.
    pub fn pending(&self) -> Vec<(String, String)> {
        self.pending
            .iter()
            .map(|(id, why)| (id.to_string(), why.clone()))
            .collect()
    }

    /// Follows the model: enrolled workloads, their certificates, the local workloads'
    /// listeners, and the policies tunnels are authorized by. Returns what the kernel's
    /// mesh maps should hold.
    ///
    /// `unenforced`: local workloads whose TC programs are not attached. One of those in
    /// mode STRICT is not served until they are: the proxy would otherwise take its
    /// tunnels while plaintext still reaches it, and it would look STRICT without being so.
    pub async fn sync(&mut self, state: &State, unenforced: &BTreeSet<ObjectRef>) -> MeshContent {
        let trust_domain = &state.policy_settings().trust_domain;
        let mut identities = HashMap::new();
        let mut local = HashMap::new();
        let mut modes = BTreeMap::new();
        let mut content = MeshContent::default();
        for w in state.workloads() {
            let Some(mode) = state.mesh_mode(w) else {
                continue;
            };
            let id = match SpiffeId::new(trust_domain, &w.meta.id.namespace, &w.service_account) {
                Ok(id) => id,
                Err(e) => {
                    warn!(workload = %w.meta.id, "cannot enroll in the mesh: {e}");
                    continue;
                }
            };
            modes.insert(w.meta.id.clone(), mode);
            let mut flags = MESH_F_ENROLLED;
            if mode == MtlsMode::Strict {
                flags |= MESH_F_STRICT;
            }
            for ip in &w.addresses {
                identities.insert(*ip, id.clone());
                // Redirection is IPv4 for now: the kernel records IPv4 destinations only.
                if ip.is_ipv4() {
                    content.dests.insert(*ip, MeshDest { flags, _pad: 0 });
                }
            }
            if policy::is_local(w) {
                let w = Arc::new(w.clone());
                for ip in &w.addresses {
                    local.insert(*ip, w.clone());
                }
            }
        }
        let local_ids: BTreeSet<SpiffeId> = local
            .keys()
            .filter_map(|ip| identities.get(ip).cloned())
            .collect();
        if let Err(e) = self
            .certs
            .set_identities(&local_ids.into_iter().collect::<Vec<_>>())
        {
            warn!("issuing workload certificates: {e}");
        }
        let view = Arc::new(View {
            root_namespace: state.policy_settings().root_namespace.clone(),
            identities,
            local,
            policies: state.policies().cloned().collect(),
        });
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = view.clone();
        // Open tunnels were authorized by the previous view: judge them by this one.
        let closed = self.inbound.rejudge();
        if closed > 0 {
            info!(closed, "closed open tunnels that policy no longer allows");
        }
        let held: BTreeMap<ObjectRef, String> = modes
            .iter()
            .filter(|(id, mode)| **mode == MtlsMode::Strict && unenforced.contains(*id))
            .map(|(id, _)| {
                let why = "mode STRICT is not enforced yet: its TC programs are not attached";
                (id.clone(), why.to_owned())
            })
            .collect();
        self.reconcile_pods(&view, &held).await;
        for pod in self.pods.values() {
            content.sources.insert(
                pod.cookie,
                MeshSource {
                    addr_be: mesh_addr(pod.ip),
                    port_be: MESH_OUTBOUND_PORT.to_be(),
                    _pad: [0; 6],
                },
            );
        }
        content
    }

    /// Whether some local workload waits to be set up.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Starts serving new local workloads and stops serving those that left, or that are
    /// `held` back (with the reason).
    async fn reconcile_pods(&mut self, view: &View, held: &BTreeMap<ObjectRef, String>) {
        // One entry per workload: its first IPv4 address is where the proxy listens.
        let mut wanted: BTreeMap<ObjectRef, (Arc<Workload>, IpAddr)> = BTreeMap::new();
        for w in view.local.values() {
            if held.contains_key(&w.meta.id) {
                continue;
            }
            if let Some(ip) = w.addresses.iter().find(|a| a.is_ipv4()) {
                wanted.insert(w.meta.id.clone(), (w.clone(), *ip));
            }
        }
        let gone: Vec<ObjectRef> = self
            .pods
            .iter()
            .filter(|(id, pod)| wanted.get(*id).is_none_or(|(_, ip)| *ip != pod.ip))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(pod) = self.pods.remove(&id) {
                self.stop_pod(&id, pod);
            }
        }
        self.pending.retain(|id, _| wanted.contains_key(id));
        for (id, why) in held {
            if self.pending.get(id) != Some(why) {
                warn!(workload = %id, "not serving the workload in the mesh yet: {why}");
            }
            self.pending.insert(id.clone(), why.clone());
        }
        self.leaving.retain(|_, (_, task)| !task.is_finished());
        for (id, (w, ip)) in wanted {
            if self.pods.contains_key(&id) {
                continue;
            }
            // Back before its namespace was cleaned up: keep the set-up (and wait for a
            // clean-up already under way, so it cannot undo what is prepared next).
            if let Some((cancel, task)) = self.leaving.remove(&ip) {
                cancel.store(true, std::sync::atomic::Ordering::Release);
                let _ = task.await;
            }
            match self.start_pod(&w, ip).await {
                Ok(pod) => {
                    info!(workload = %id, address = %ip, "serving the workload in the mesh");
                    self.pending.remove(&id);
                    self.pods.insert(id, pod);
                }
                Err(e) => {
                    if self.pending.get(&id) != Some(&e) {
                        warn!(workload = %id, "cannot serve the workload in the mesh yet: {e}; retrying");
                    }
                    self.pending.insert(id, e);
                }
            }
        }
    }

    async fn start_pod(&self, w: &Workload, ip: IpAddr) -> Result<PodProxy, String> {
        let path = netns_of(w, ip)?;
        let net = PodNet::open(&path, ip).map_err(|e| e.to_string())?;
        net.prepare().await.map_err(|e| e.to_string())?;
        let cookie = net.netns_cookie().await.map_err(|e| e.to_string())?;
        let hbone = net
            .listen(MESH_HBONE_PORT)
            .await
            .map_err(|e| e.to_string())?;
        let capture = net
            .listen(MESH_OUTBOUND_PORT)
            .await
            .map_err(|e| e.to_string())?;
        let inbound = Inbound::spawn(hbone, self.inbound.clone())
            .map_err(|e| format!("serving HBONE on {ip}:{MESH_HBONE_PORT}: {e}"))?;
        let outbound = tokio::spawn(outbound_loop(
            capture,
            ip,
            OutboundShared {
                outbound: self.outbound.clone(),
                orig: self.orig.clone(),
                view: self.view.clone(),
                metrics: self.metrics.clone(),
                access_log: self.access_log,
            },
        ));
        self.pods_by_ip
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ip, net.clone());
        Ok(PodProxy {
            ip,
            net,
            cookie,
            inbound,
            outbound,
        })
    }

    /// Stops serving a workload: no new connections; open tunnels get the drain grace.
    fn stop_pod(&mut self, id: &ObjectRef, pod: PodProxy) {
        info!(workload = %id, address = %pod.ip, "no longer serving the workload in the mesh");
        pod.outbound.abort();
        self.pods_by_ip
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pod.ip);
        let id = id.clone();
        let ip = pod.ip;
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cancelled = cancel.clone();
        let task = tokio::spawn(async move {
            pod.inbound.drain(Duration::from_secs(1)).await;
            if cancelled.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            // The namespace may be gone with the workload; then there is nothing to undo.
            if let Err(e) = pod.net.cleanup().await {
                debug!(workload = %id, "undoing the namespace set-up: {e}");
            }
        });
        self.leaving.insert(ip, (cancel, task));
    }

    /// On shutdown: stops accepting, lets open tunnels finish for up to `grace`.
    pub async fn drain(&mut self, grace: Duration) {
        if self.pods.is_empty() {
            return;
        }
        let started = Instant::now();
        for pod in self.pods.values() {
            pod.outbound.abort();
        }
        let inbound = futures::future::join_all(self.pods.values().map(|p| p.inbound.drain(grace)));
        let (outcomes, outbound) = tokio::join!(inbound, self.outbound.drain(grace));
        info!(
            workloads = self.pods.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            inbound = ?outcomes,
            ?outbound,
            "mesh proxy drained"
        );
    }
}

/// The network namespace of a local workload: the one it names, or that of one of its
/// processes (pods found through the Kubernetes API name a cgroup).
fn netns_of(w: &Workload, ip: IpAddr) -> Result<PathBuf, String> {
    if let Some(path) = &w.netns {
        return Ok(path.clone());
    }
    let Some(cgroup) = &w.cgroup else {
        return Err("neither its network namespace nor its cgroup is known".to_owned());
    };
    crate::discovery::pod_netns_path(ip, cgroup)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no process in {} yet", cgroup.display()))
}

/// What the accept loops of the outbound listeners share.
#[derive(Clone)]
struct OutboundShared {
    outbound: Arc<Outbound>,
    orig: OrigDstTable,
    view: SharedView,
    metrics: Arc<ProxyMetrics>,
    access_log: bool,
}

async fn outbound_loop(listener: TcpListener, pod_ip: IpAddr, shared: OutboundShared) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or memory: wait rather than spin.
                warn!(workload = %pod_ip, "accepting a redirected connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move { shared.one(stream, peer, pod_ip).await });
    }
}

impl OutboundShared {
    async fn one(&self, stream: tokio::net::TcpStream, peer: SocketAddr, pod_ip: IpAddr) {
        // The listener is on the workload's address, so it can be reached from outside
        // the namespace too: only the workload's own redirected connections are served.
        if peer.ip() != pod_ip {
            info!(src = %peer, workload = %pod_ip, "outbound connection refused: not from the workload itself");
            self.metrics.failed(proxy::OUTBOUND, "not_from_workload");
            return;
        }
        let Some(dst) = self.original_destination(peer).await else {
            return;
        };
        let view = read(&self.view);
        let Some(expected) = view.identities.get(&dst.ip()) else {
            info!(src = %peer, %dst, "outbound connection refused: the destination left the mesh");
            self.metrics
                .failed(proxy::OUTBOUND, "destination_not_enrolled");
            return;
        };
        let _ = stream.set_nodelay(true);
        let req = OutboundRequest {
            src_ip: pod_ip,
            dst,
            hbone: SocketAddr::new(dst.ip(), MESH_HBONE_PORT),
            expected_identity: Some(expected.to_string()),
        };
        let started = Instant::now();
        let result = self.outbound.proxy(stream, req).await;
        if self.access_log
            && let Ok(stats) = result
        {
            info!(
                src = %peer,
                %dst,
                destination_principal = %expected,
                sent = stats.a_to_b,
                received = stats.b_to_a,
                duration_ms = started.elapsed().as_millis() as u64,
                "access"
            );
        }
    }

    /// The destination the client asked for, from the kernel's table.
    async fn original_destination(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let deadline = Instant::now() + ORIG_DST_WAIT;
        loop {
            match self.orig.take(peer) {
                Ok(Some(dst)) => return Some(dst),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(None) => {
                    info!(src = %peer, "outbound connection refused: no original destination recorded (not redirected by mycel?)");
                    self.metrics
                        .failed(proxy::OUTBOUND, "no_original_destination");
                    return None;
                }
                Err(e) => {
                    warn!(src = %peer, "outbound connection refused: {e}");
                    self.metrics
                        .failed(proxy::OUTBOUND, "bad_original_destination");
                    return None;
                }
            }
        }
    }
}

/// Certificates by workload address.
struct MeshTls {
    certs: CertManager,
    view: SharedView,
}

impl MeshTls {
    fn local_identity(&self, ip: IpAddr) -> Option<SpiffeId> {
        let view = read(&self.view);
        view.local
            .contains_key(&ip)
            .then(|| view.identities.get(&ip).cloned())?
    }
}

impl Tls for MeshTls {
    fn server_config(&self, local_ip: IpAddr) -> Option<Arc<rustls::ServerConfig>> {
        self.certs.server_config(&self.local_identity(local_ip)?)
    }

    fn client_config(
        &self,
        src_ip: IpAddr,
        expected_peer: Option<&str>,
    ) -> Option<Arc<rustls::ClientConfig>> {
        let local = self.local_identity(src_ip)?;
        let expected = match expected_peer {
            Some(text) => Some(SpiffeId::parse(text).ok()?),
            None => None,
        };
        self.certs.client_config(&local, expected.as_ref())
    }

    fn peer_identity(&self, certs: &[CertificateDer<'_>]) -> Result<String, String> {
        identity::peer_identity(certs)
            .map(|id| id.to_string())
            .map_err(|e| e.to_string())
    }

    fn workload_identity(&self, ip: IpAddr) -> Option<String> {
        read(&self.view)
            .identities
            .get(&ip)
            .map(|id| id.to_string())
    }
}

/// AuthorizationPolicies, evaluated with the peer's proven identity.
struct MeshAuthz(SharedView);

impl Authorizer for MeshAuthz {
    fn allow(&self, peer: &str, peer_ip: IpAddr, dst: SocketAddr) -> Result<(), String> {
        let view = read(&self.0);
        let workload = view
            .local
            .get(&dst.ip())
            .ok_or_else(|| format!("{} is not an enrolled workload of this node", dst.ip()))?;
        let id = SpiffeId::parse(peer).map_err(|e| e.to_string())?;
        let addresses = [peer_ip];
        let peer = Peer {
            identity: 0,
            kind: PeerKind::Workload {
                namespace: id.namespace(),
                service_account: id.service_account(),
                principal: id.principal(),
                addresses: &addresses,
            },
        };
        let (verdict, by) = policy::evaluate(
            view.policies.iter(),
            &view.root_namespace,
            workload,
            &peer,
            dst.port(),
        );
        match (verdict == VERDICT_ALLOW, by) {
            (true, _) => Ok(()),
            (false, Some(policy)) => Err(format!("denied by AuthorizationPolicy {policy}")),
            (false, None) => Err(format!(
                "no ALLOW AuthorizationPolicy of workload {} matches",
                workload.meta.id
            )),
        }
    }
}

/// Tunnels may end only at enrolled workloads of this node.
struct MeshLocal(SharedView);

impl LocalWorkloads for MeshLocal {
    fn is_local(&self, ip: IpAddr) -> bool {
        read(&self.0).local.contains_key(&ip)
    }

    fn same_workload(&self, a: IpAddr, b: IpAddr) -> bool {
        let view = read(&self.0);
        match (view.local.get(&a), view.local.get(&b)) {
            (Some(x), Some(y)) => x.meta.id == y.meta.id,
            _ => false,
        }
    }
}

/// Sockets in the namespaces of local workloads.
struct PodConnector(Arc<RwLock<HashMap<IpAddr, PodNet>>>);

impl PodConnector {
    fn pod(&self, ip: IpAddr) -> std::io::Result<PodNet> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .cloned()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{ip} is not a workload the mesh serves on this node"),
                )
            })
    }
}

impl Connector for PodConnector {
    fn hbone_socket(&self, src: IpAddr, server: SocketAddr) -> SocketFuture<'_> {
        Box::pin(async move {
            let pod = self.pod(src)?;
            pod.socket(server.ip()).await.map_err(std::io::Error::other)
        })
    }

    fn workload_socket(&self, client: IpAddr, dst: SocketAddr) -> SocketFuture<'_> {
        Box::pin(async move {
            let pod = self.pod(dst.ip())?;
            pod.transparent_socket(client)
                .await
                .map_err(std::io::Error::other)
        })
    }
}
