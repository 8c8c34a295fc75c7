//! The certificates of the node's workloads, renewed in the background, and the TLS
//! configurations that present them.
//!
//! A renewal swaps the certificate and the configurations built from it; connections
//! established before keep their TLS session (rustls never re-reads a configuration after
//! the handshake), so certificates rotate without dropping connections.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::PathBuf,
    sync::{Arc, LazyLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt as _;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig, client::Resumption, crypto::CryptoProvider,
    server::NoServerSessionStorage, version::TLS13,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::{
    Ca, Error, KeyExchange, SpiffeId, Svid, TrustBundle, crypto,
    reload::ReloadStatus,
    spiffe::check_trust_domain,
    verify::{SpiffeClientVerifier, SpiffeServerVerifier},
};

/// How long an SVID is valid when nothing else is configured.
pub const DEFAULT_SVID_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// ALPN of HBONE: HTTP/2 over TLS.
const ALPN_H2: &[u8] = b"h2";
/// Wait before retrying a failed renewal (bounded by half the remaining validity).
const RENEWAL_RETRY: Duration = Duration::from_secs(5);
/// First wait before asking the identity server again for a certificate it did not give;
/// doubled after every failure up to [`MAX_REQUEST_BACKOFF`].
const REQUEST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_REQUEST_BACKOFF: Duration = Duration::from_secs(30);
/// How long one request to the identity server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests to the identity server in flight at once.
const REQUEST_CONCURRENCY: usize = 8;
/// Client configurations cached per local identity (one per expected peer); the cache is
/// emptied when it reaches this size, so a stream of distinct peers cannot grow it forever.
const MAX_CLIENT_CONFIGS: usize = 1024;

/// What `mycel status` shows about one certificate. The agent serves it as JSON and the
/// CLI reads it back, so it deserializes too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    #[serde(deserialize_with = "spiffe_id")]
    pub id: SpiffeId,
    /// Seconds since the Unix epoch.
    #[serde(
        serialize_with = "unix_seconds",
        deserialize_with = "from_unix_seconds"
    )]
    pub not_before: SystemTime,
    /// Seconds since the Unix epoch.
    #[serde(
        serialize_with = "unix_seconds",
        deserialize_with = "from_unix_seconds"
    )]
    pub not_after: SystemTime,
    /// Lowercase hexadecimal.
    pub serial: String,
    /// The subject of the CA that signed it (which CA a node signs with during a rotation).
    #[serde(default)]
    pub issuer: String,
}

/// A time as whole seconds since the Unix epoch (certificates carry no fractions).
fn unix_seconds<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// The reverse of [`unix_seconds`].
fn from_unix_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let secs = u64::deserialize(d)?;
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .ok_or_else(|| serde::de::Error::custom(format!("{secs} s after 1970 is out of range")))
}

fn spiffe_id<'de, D: Deserializer<'de>>(d: D) -> Result<SpiffeId, D::Error> {
    let text = String::deserialize(d)?;
    SpiffeId::parse(&text).map_err(serde::de::Error::custom)
}

/// Where the agent gets certificates when it holds no CA key: the identity server
/// (`mycel identity-server`), asked with the agent's projected ServiceAccount token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemoteSigner {
    /// `HOST:PORT` of the identity server (resolved at every request).
    pub server: String,
    /// The projected token file, read again at every request (the kubelet rotates it).
    pub token: PathBuf,
    /// The SPIFFE ID the identity server's certificate must name.
    #[serde(serialize_with = "spiffe_string")]
    pub server_id: SpiffeId,
}

fn spiffe_string<S: Serializer>(id: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_string())
}

/// Labels of `mycel_certificate_issuances_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuanceLabels {
    /// `local` (the agent's CA) or `server` (the identity server).
    signer: &'static str,
    /// `issued` or `failed`.
    result: &'static str,
}

static ISSUANCES: LazyLock<Family<IssuanceLabels, Counter>> = LazyLock::new(Family::default);

/// `mycel_certificate_issuances_total{signer,result}`: workload certificates obtained or
/// not, by where they come from (register it once per process).
pub fn issuances() -> Family<IssuanceLabels, Counter> {
    ISSUANCES.clone()
}

fn count_issuance(signer: &'static str, ok: bool) {
    ISSUANCES
        .get_or_create(&IssuanceLabels {
            signer,
            result: if ok { "issued" } else { "failed" },
        })
        .inc();
}

/// What signs the certificates of local workloads.
#[derive(Clone)]
enum Signer {
    /// The agent's own CA (standalone, or Kubernetes with the CA key mounted).
    Local(Arc<Ca>),
    /// The identity server, reached with a TLS configuration built from the bundle.
    Remote(Arc<Remote>),
}

struct Remote {
    settings: RemoteSigner,
    tls: Arc<ClientConfig>,
}

impl Signer {
    fn same(&self, other: &Signer) -> bool {
        match (self, other) {
            (Signer::Local(a), Signer::Local(b)) => Arc::ptr_eq(a, b),
            (Signer::Remote(a), Signer::Remote(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Signer::Local(_) => "local",
            Signer::Remote(_) => "server",
        }
    }

    fn subject(&self) -> String {
        match self {
            Signer::Local(ca) => ca.subject(),
            Signer::Remote(r) => format!(
                "identity server {} ({})",
                r.settings.server, r.settings.server_id
            ),
        }
    }

    fn remote(settings: RemoteSigner, bundle: &TrustBundle) -> Result<Signer, Error> {
        let tls = super::server::client_config(bundle, &settings.server_id)?;
        Ok(Signer::Remote(Arc::new(Remote { settings, tls })))
    }
}

/// One round's result for an identity: the SVID it replaces (none for a new identity) and
/// the new one, or why there is none.
type Obtained = (SpiffeId, Option<Arc<Svid>>, Result<Svid, String>);

/// A certificate the identity server has not given yet (or could not renew): when to
/// ask again, and why the last request failed.
#[derive(Clone, Debug)]
struct Failure {
    next: Instant,
    backoff: Duration,
    error: String,
}

/// The CA, the trust bundle and the SVIDs of the identities of local workloads. Cheap to
/// clone: clones share everything.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    trust_domain: String,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    /// Held only for short, synchronous updates; certificates are signed outside it.
    state: RwLock<State>,
    /// Wakes the renewal task when the set of certificates changes.
    changed: Arc<Notify>,
    /// What the last reloads of the CA directory did.
    reload: RwLock<ReloadStatus>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the renewal task see that the manager is gone and end.
        self.changed.notify_waiters();
    }
}

struct State {
    signer: Signer,
    /// The subject of the signing CA (or the identity server's address), for status.
    ca_subject: String,
    bundle: TrustBundle,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<SpiffeClientVerifier>,
    /// The identities the last `set_identities` asked for.
    wanted: BTreeSet<SpiffeId>,
    entries: BTreeMap<SpiffeId, Entry>,
    /// Identities whose last request to the identity server failed.
    failures: BTreeMap<SpiffeId, Failure>,
}

struct Entry {
    svid: Arc<Svid>,
    /// The subject of the CA that signed it.
    issuer: String,
    renew_at: Instant,
    server: Arc<ServerConfig>,
    clients: HashMap<Option<SpiffeId>, Arc<ClientConfig>>,
}

/// A [`CertManager`] that does not keep it alive.
#[derive(Clone)]
pub struct WeakCertManager(Weak<Inner>);

impl fmt::Debug for WeakCertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WeakCertManager")
    }
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("trust_domain", &self.inner.trust_domain)
            .field("lifetime", &self.inner.lifetime)
            .field("certificates", &self.certificates())
            .finish()
    }
}

impl CertManager {
    /// A manager that issues SVIDs valid for `svid_lifetime` from `ca`, for identities of
    /// `trust_domain`, and trusts peers whose chain ends at a CA of `bundle` (to which the
    /// roots named with the CA are added, so that the node's workloads trust each other).
    /// Connections offer the default key exchange groups ([`KeyExchange::default`]).
    pub fn new(
        ca: Ca,
        bundle: TrustBundle,
        trust_domain: &str,
        svid_lifetime: Duration,
    ) -> Result<Self, Error> {
        Self::with_key_exchange(
            ca,
            bundle,
            trust_domain,
            svid_lifetime,
            KeyExchange::default(),
        )
    }

    /// [`CertManager::new`] whose TLS configurations offer and accept the key exchange
    /// groups of `kx`.
    pub fn with_key_exchange(
        ca: Ca,
        mut bundle: TrustBundle,
        trust_domain: &str,
        svid_lifetime: Duration,
        kx: KeyExchange,
    ) -> Result<Self, Error> {
        check_trust_domain(trust_domain)?;
        if svid_lifetime < Duration::from_secs(1) {
            return Err(Error::Certificate {
                origin: "the SVID lifetime".to_owned(),
                reason: format!("{svid_lifetime:?} is shorter than one second"),
            });
        }
        // An explicit provider: the key exchange groups are the mesh's own setting, not
        // whatever default another part of the process installed.
        let provider = Arc::new(crypto::provider(kx));
        bundle.extend(ca.bundle())?;
        let state = State::new(Signer::Local(Arc::new(ca)), bundle, &provider, trust_domain)?;
        Ok(CertManager {
            inner: Arc::new(Inner {
                trust_domain: trust_domain.to_owned(),
                lifetime: svid_lifetime,
                provider,
                state: RwLock::new(state),
                changed: Arc::new(Notify::new()),
                reload: RwLock::default(),
            }),
        })
    }

    /// A manager that holds no CA key: certificates come from the identity server of
    /// `remote` (by a PKCS#10 request from the background renewal task, so that nothing
    /// waits on the network), peers are trusted when their chain ends at a CA of `bundle`.
    /// A new identity is served once its certificate has arrived; failed requests are
    /// retried with a growing delay, logged, counted and shown in [`Self::issue_errors`].
    pub fn remote(
        remote: RemoteSigner,
        bundle: TrustBundle,
        trust_domain: &str,
        kx: KeyExchange,
    ) -> Result<Self, Error> {
        check_trust_domain(trust_domain)?;
        if bundle.certificates().is_empty() {
            return Err(Error::Certificate {
                origin: "the trust bundle".to_owned(),
                reason: "holds no CA certificate".to_owned(),
            });
        }
        let provider = Arc::new(crypto::provider(kx));
        let signer = Signer::remote(remote, &bundle)?;
        let state = State::new(signer, bundle, &provider, trust_domain)?;
        Ok(CertManager {
            inner: Arc::new(Inner {
                trust_domain: trust_domain.to_owned(),
                // The identity server decides the lifetime.
                lifetime: DEFAULT_SVID_LIFETIME,
                provider,
                state: RwLock::new(state),
                changed: Arc::new(Notify::new()),
                reload: RwLock::default(),
            }),
        })
    }

    /// True when certificates come from the identity server (the agent holds no CA key).
    pub fn is_remote(&self) -> bool {
        matches!(self.read().signer, Signer::Remote(_))
    }

    /// Identities without a (renewed) certificate because the last request for it
    /// failed, and why.
    pub fn issue_errors(&self) -> BTreeMap<String, String> {
        self.read()
            .failures
            .iter()
            .map(|(id, f)| (id.to_string(), f.error.clone()))
            .collect()
    }

    /// The key exchange groups the TLS configurations offer, most preferred first.
    pub fn key_exchange_groups(&self) -> Vec<String> {
        self.inner
            .provider
            .kx_groups
            .iter()
            .map(|g| crypto::group_name(g.name()))
            .collect()
    }

    /// The trust domain of the identities this manager issues and accepts.
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// The trust bundle peers are verified against.
    pub fn bundle(&self) -> TrustBundle {
        self.read().bundle.clone()
    }

    /// Keeps SVIDs for exactly `ids`: issues one for each new identity and drops those no
    /// longer listed. Every identity must be in the manager's trust domain. When issuing
    /// fails for some identity the others are still handled, and the first error is
    /// returned.
    pub fn set_identities(&self, ids: &[SpiffeId]) -> Result<(), Error> {
        for id in ids {
            self.check_domain(id)?;
        }
        let (signer, missing) = {
            let mut state = self.write();
            state.wanted = ids.iter().cloned().collect();
            state.entries.retain(|id, _| ids.contains(id));
            state.failures.retain(|id, _| ids.contains(id));
            let missing: Vec<SpiffeId> = ids
                .iter()
                .filter(|id| !state.entries.contains_key(id))
                .cloned()
                .collect();
            (state.signer.clone(), missing)
        };
        let Signer::Local(ca) = signer else {
            // The renewal task asks the identity server for the missing ones.
            self.inner.changed.notify_waiters();
            return Ok(());
        };
        let signer = Signer::Local(ca.clone());
        let mut first_error = None;
        for id in missing {
            match self.issue(&ca, &id) {
                Ok(svid) => self.install(&signer, svid, None),
                Err(e) => {
                    tracing::error!(%id, error = %e, "cannot issue a certificate");
                    first_error.get_or_insert(e);
                }
            }
        }
        self.inner.changed.notify_waiters();
        first_error.map_or(Ok(()), Err)
    }

    /// Replaces the CA and the trust bundle (a step of a CA rotation); the roots named with
    /// the CA are added to `bundle`. The new bundle is in force for new handshakes at once
    /// (the configurations of every SVID are rebuilt); when the signing CA changed, every
    /// SVID is also reissued from the new one right away, not at its half-life. Keep the
    /// old CA in `bundle` until certificates it issued have been replaced everywhere, so
    /// that peers not yet rotated are still accepted.
    pub fn set_trust(&self, ca: Ca, mut bundle: TrustBundle) -> Result<(), Error> {
        bundle.extend(ca.bundle())?;
        let (ca, reissue): (Arc<Ca>, Vec<SpiffeId>) = {
            let mut state = self.write();
            let (ca, same_ca) = match &state.signer {
                Signer::Local(current) if current.certificate() == ca.certificate() => {
                    (current.clone(), true)
                }
                _ => (Arc::new(ca), false),
            };
            let next = State::new(
                Signer::Local(ca.clone()),
                bundle,
                &self.inner.provider,
                &self.inner.trust_domain,
            )?;
            self.carry_over(&mut state, next);
            let reissue = if same_ca {
                Vec::new()
            } else {
                state.entries.keys().cloned().collect()
            };
            (ca, reissue)
        };
        let signer = Signer::Local(ca.clone());
        let mut first_error = None;
        for id in reissue {
            match self.issue(&ca, &id) {
                // Replaces the old entry even though its serial is unknown here.
                Ok(svid) => self.install(&signer, svid, None),
                Err(e) => {
                    tracing::error!(%id, error = %e, "cannot issue a certificate from the new CA");
                    first_error.get_or_insert(e);
                }
            }
        }
        self.inner.changed.notify_waiters();
        first_error.map_or(Ok(()), Err)
    }

    /// Replaces the trust bundle of a manager whose certificates come from the identity
    /// server (the CA directory holds only `ca.pem`). The new bundle is in force for new
    /// handshakes at once, the identity server is verified against it from now on, and
    /// every certificate is asked for again right away (in the background), so that after
    /// a CA rotation none chains to a root about to be removed.
    pub fn set_bundle(&self, bundle: TrustBundle) -> Result<(), Error> {
        if bundle.certificates().is_empty() {
            return Err(Error::Certificate {
                origin: "the trust bundle".to_owned(),
                reason: "holds no CA certificate".to_owned(),
            });
        }
        {
            let mut state = self.write();
            let Signer::Remote(remote) = &state.signer else {
                return Err(Error::Certificate {
                    origin: "the trust bundle".to_owned(),
                    reason: "this agent signs with its own CA: the CA directory needs the key too"
                        .to_owned(),
                });
            };
            let signer = Signer::remote(remote.settings.clone(), &bundle)?;
            let next = State::new(
                signer,
                bundle,
                &self.inner.provider,
                &self.inner.trust_domain,
            )?;
            self.carry_over(&mut state, next);
            let now = Instant::now();
            for entry in state.entries.values_mut() {
                entry.renew_at = now;
            }
            state.failures.clear();
        }
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Makes `next` the state, with the identities wanted and the current SVIDs of
    /// `state`, their configurations verifying peers against the new bundle until their
    /// replacements (if any) are issued.
    fn carry_over(&self, state: &mut State, mut next: State) {
        next.wanted = std::mem::take(&mut state.wanted);
        next.failures = std::mem::take(&mut state.failures);
        for (id, entry) in std::mem::take(&mut state.entries) {
            match server_config(
                &self.inner.provider,
                next.client_verifier.clone(),
                &entry.svid,
            ) {
                Ok(server) => {
                    next.entries.insert(
                        id,
                        Entry {
                            server,
                            clients: HashMap::new(),
                            ..entry
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(%id, error = %e, "cannot build a TLS server configuration");
                    next.entries.insert(id, entry);
                }
            }
        }
        *state = next;
    }

    /// Records a reload of the CA directory: applied (`None`) or refused, and why.
    pub(super) fn record_reload(&self, error: Option<String>) {
        let mut r = self
            .inner
            .reload
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if error.is_none() {
            r.applied += 1;
        }
        r.error = error;
    }

    /// What the reloads of the CA directory did: how many were applied, and why the files
    /// on disk are not in force while they are not.
    pub fn reload_status(&self) -> ReloadStatus {
        self.inner
            .reload
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A handle that does not keep the manager alive (for background tasks).
    pub fn downgrade(&self) -> WeakCertManager {
        WeakCertManager(Arc::downgrade(&self.inner))
    }

    /// The manager behind `weak`, if any clone of it is still there.
    pub fn upgrade(weak: &WeakCertManager) -> Option<CertManager> {
        weak.0.upgrade().map(|inner| CertManager { inner })
    }

    /// The subject of the CA that signs new certificates.
    pub fn signing_ca(&self) -> String {
        self.read().ca_subject.clone()
    }

    /// The current SVID of `id`, if a local workload has that identity.
    pub fn svid(&self, id: &SpiffeId) -> Option<Arc<Svid>> {
        self.read().entries.get(id).map(|e| e.svid.clone())
    }

    /// The TLS server configuration for connections to workloads of `local`: TLS 1.3,
    /// ALPN `h2`, presents `local`'s SVID and requires a client certificate that chains to
    /// the bundle and names a SPIFFE ID of our trust domain. `None` if no local workload
    /// has that identity.
    pub fn server_config(&self, local: &SpiffeId) -> Option<Arc<ServerConfig>> {
        self.read().entries.get(local).map(|e| e.server.clone())
    }

    /// The TLS client configuration for connections from workloads of `local`: TLS 1.3,
    /// ALPN `h2`, presents `local`'s SVID, and accepts a server whose chain ends at the
    /// bundle and whose SPIFFE ID is `expected_peer` (any of our trust domain when
    /// `None`). The server name given to the connector is not checked. `None` if no local
    /// workload has the identity `local`, or the configuration cannot be built (logged).
    pub fn client_config(
        &self,
        local: &SpiffeId,
        expected_peer: Option<&SpiffeId>,
    ) -> Option<Arc<ClientConfig>> {
        let key = expected_peer.cloned();
        let (svid, roots) = {
            let state = self.read();
            let entry = state.entries.get(local)?;
            if let Some(config) = entry.clients.get(&key) {
                return Some(config.clone());
            }
            (entry.svid.clone(), state.roots.clone())
        };
        let config = match client_config(
            &self.inner.provider,
            roots,
            &self.inner.trust_domain,
            key.clone(),
            &svid,
        ) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(id = %local, error = %e, "cannot build a TLS client configuration");
                return None;
            }
        };
        let mut state = self.write();
        // Cache it only if the certificate was not renewed meanwhile.
        if let Some(entry) = state.entries.get_mut(local)
            && Arc::ptr_eq(&entry.svid, &svid)
        {
            if entry.clients.len() >= MAX_CLIENT_CONFIGS {
                entry.clients.clear();
            }
            entry.clients.insert(key, config.clone());
        }
        Some(config)
    }

    /// Every certificate the manager holds, sorted by identity.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.read()
            .entries
            .values()
            .map(|e| CertInfo {
                id: e.svid.id().clone(),
                not_before: e.svid.not_before(),
                not_after: e.svid.not_after(),
                serial: e.svid.serial().to_owned(),
                issuer: e.issuer.clone(),
            })
            .collect()
    }

    /// Starts the task that renews each SVID at half its lifetime. It ends when every
    /// clone of the manager has been dropped (or when the handle is aborted).
    pub fn spawn_renewal(&self) -> JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let changed = self.inner.changed.clone();
        tokio::spawn(async move {
            loop {
                // Registered before looking at the state, so a change made while this
                // round runs wakes the next wait instead of being missed.
                let notified = changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let next = match weak.upgrade() {
                    Some(inner) => {
                        let manager = CertManager { inner };
                        manager.renew_due().await;
                        manager.next_renewal()
                    }
                    None => return,
                };
                match next {
                    Some(at) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            () = &mut notified => {}
                        }
                    }
                    None => notified.await,
                }
            }
        })
    }

    /// Renews every SVID whose renewal time has come; with the identity server, also asks
    /// for the certificates of new identities (and those whose last request failed, once
    /// their delay has passed).
    async fn renew_due(&self) {
        let now = Instant::now();
        let (signer, due, missing) = {
            let state = self.read();
            let due: Vec<(SpiffeId, Arc<Svid>)> = state
                .entries
                .iter()
                .filter(|(_, e)| e.renew_at <= now)
                .map(|(id, e)| (id.clone(), e.svid.clone()))
                .collect();
            let missing: Vec<SpiffeId> = match state.signer {
                Signer::Local(_) => Vec::new(),
                Signer::Remote(_) => state
                    .wanted
                    .iter()
                    .filter(|id| !state.entries.contains_key(*id))
                    .filter(|id| state.failures.get(*id).is_none_or(|f| f.next <= now))
                    .cloned()
                    .collect(),
            };
            (state.signer.clone(), due, missing)
        };
        let work: Vec<(SpiffeId, Option<Arc<Svid>>)> = missing
            .into_iter()
            .map(|id| (id, None))
            .chain(due.into_iter().map(|(id, old)| (id, Some(old))))
            .collect();
        if work.is_empty() {
            return;
        }
        let results: Vec<Obtained> = futures::stream::iter(work)
            .map(|(id, old)| {
                let signer = signer.clone();
                async move {
                    let result = self.obtain(&signer, &id).await;
                    (id, old, result)
                }
            })
            .buffer_unordered(REQUEST_CONCURRENCY)
            .collect()
            .await;
        for (id, old, result) in results {
            count_issuance(signer.label(), result.is_ok());
            match (result, old) {
                (Ok(svid), old) => {
                    tracing::debug!(%id, serial = svid.serial(), "obtained the certificate");
                    self.install(&signer, svid, old.as_ref());
                }
                (Err(e), Some(old)) => {
                    let left = old
                        .not_after()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let retry = RENEWAL_RETRY.min(left / 2).max(Duration::from_millis(100));
                    tracing::error!(%id, error = %e, ?retry, "cannot renew the certificate");
                    let mut state = self.write();
                    if let Some(entry) = state.entries.get_mut(&id) {
                        entry.renew_at = Instant::now() + retry;
                    }
                    if matches!(signer, Signer::Remote(_)) && state.wanted.contains(&id) {
                        state.failures.insert(
                            id,
                            Failure {
                                next: Instant::now() + retry,
                                backoff: retry,
                                error: e,
                            },
                        );
                    }
                }
                (Err(e), None) => {
                    let mut state = self.write();
                    if !state.wanted.contains(&id) || !state.signer.same(&signer) {
                        continue;
                    }
                    let backoff = state.failures.get(&id).map_or(REQUEST_BACKOFF, |f| {
                        (f.backoff * 2).min(MAX_REQUEST_BACKOFF)
                    });
                    tracing::error!(%id, error = %e, retry = ?backoff, "cannot obtain a certificate");
                    state.failures.insert(
                        id,
                        Failure {
                            next: Instant::now() + backoff,
                            backoff,
                            error: e,
                        },
                    );
                }
            }
        }
    }

    /// A certificate of `id` from `signer`: signed here, or asked of the identity server.
    async fn obtain(&self, signer: &Signer, id: &SpiffeId) -> Result<Svid, String> {
        match signer {
            Signer::Local(ca) => self.issue(ca, id).map_err(|e| e.to_string()),
            Signer::Remote(remote) => {
                match tokio::time::timeout(REQUEST_TIMEOUT, request(remote, id)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!(
                        "the identity server {} did not answer within {REQUEST_TIMEOUT:?}",
                        remote.settings.server
                    )),
                }
            }
        }
    }

    fn next_renewal(&self) -> Option<Instant> {
        let state = self.read();
        let renewals = state.entries.values().map(|e| e.renew_at);
        let retries = state
            .failures
            .iter()
            .filter(|(id, _)| !state.entries.contains_key(*id))
            .map(|(_, f)| f.next);
        renewals.chain(retries).min()
    }

    fn issue(&self, ca: &Ca, id: &SpiffeId) -> Result<Svid, Error> {
        ca.issue(id, self.inner.lifetime, SystemTime::now())
    }

    /// Puts `svid` in place with fresh configurations. With `replaces`, only if the current
    /// SVID is still that one (the identity may have been dropped or reissued meanwhile);
    /// without, only if the identity is still wanted and the signer still current.
    fn install(&self, signer: &Signer, svid: Svid, replaces: Option<&Arc<Svid>>) {
        let issued = SystemTime::now();
        // Half of what is left of the lifetime: `notAfter` may have been capped by the
        // CA's own expiry.
        let half = svid.not_after().duration_since(issued).unwrap_or_default() / 2;
        let id = svid.id().clone();
        let mut state = self.write();
        if !state.signer.same(signer) {
            return;
        }
        let server = match server_config(&self.inner.provider, state.client_verifier.clone(), &svid)
        {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(%id, error = %e, "cannot build a TLS server configuration");
                return;
            }
        };
        let issuer = match signer {
            Signer::Local(_) => state.ca_subject.clone(),
            Signer::Remote(_) => svid.issuer(),
        };
        let entry = Entry {
            issuer,
            svid: Arc::new(svid),
            renew_at: Instant::now() + half,
            server,
            clients: HashMap::new(),
        };
        let installed = match (state.entries.get_mut(&id), replaces) {
            (Some(current), Some(old)) => {
                if Arc::ptr_eq(&current.svid, old) {
                    *current = entry;
                    true
                } else {
                    false
                }
            }
            (Some(current), None) => {
                *current = entry;
                true
            }
            (None, None) => {
                // A later `set_identities` may have dropped the identity meanwhile.
                if state.wanted.contains(&id) {
                    state.entries.insert(id.clone(), entry);
                    true
                } else {
                    false
                }
            }
            (None, Some(_)) => false,
        };
        if installed {
            state.failures.remove(&id);
        }
    }

    fn check_domain(&self, id: &SpiffeId) -> Result<(), Error> {
        if id.trust_domain() != self.inner.trust_domain {
            return Err(Error::WrongTrustDomain {
                id: id.clone(),
                expected: self.inner.trust_domain.clone(),
            });
        }
        Ok(())
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while the lock was held leaves consistent data (every update replaces
        // whole entries), so a poisoned lock is used as it is.
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    fn new(
        signer: Signer,
        bundle: TrustBundle,
        provider: &Arc<CryptoProvider>,
        trust_domain: &str,
    ) -> Result<State, Error> {
        let roots = Arc::new(bundle.root_store()?);
        let client_verifier = Arc::new(SpiffeClientVerifier::new(
            roots.clone(),
            provider.clone(),
            trust_domain,
        )?);
        Ok(State {
            ca_subject: signer.subject(),
            signer,
            bundle,
            roots,
            client_verifier,
            wanted: BTreeSet::new(),
            entries: BTreeMap::new(),
            failures: BTreeMap::new(),
        })
    }
}

pub(super) fn server_config(
    provider: &Arc<CryptoProvider>,
    verifier: Arc<SpiffeClientVerifier>,
    svid: &Svid,
) -> Result<Arc<ServerConfig>, Error> {
    let tls_err = |source| Error::Tls {
        id: svid.id().to_string(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain().to_vec(), svid.key().clone_key())
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: a resumed session skips the certificate checks, so the peer's
    // identity would rest on an earlier handshake, perhaps with a certificate since
    // expired or from a CA since removed from the bundle.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

pub(super) fn client_config(
    provider: &Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    expected: Option<SpiffeId>,
    svid: &Svid,
) -> Result<Arc<ClientConfig>, Error> {
    let tls_err = |source| Error::Tls {
        id: svid.id().to_string(),
        source,
    };
    let verifier = SpiffeServerVerifier::new(roots, provider, trust_domain, expected);
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain().to_vec(), svid.key().clone_key())
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // See `server_config`: every connection verifies the peer afresh.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Asks the identity server of `remote` for a certificate of `id`, with the token as it is
/// on disk now, trying each address the server's name resolves to until one answers.
async fn request(remote: &Remote, id: &SpiffeId) -> Result<Svid, String> {
    let path = &remote.settings.token;
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("reading the token {}: {e}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("the token {} is empty", path.display()));
    }
    let server = &remote.settings.server;
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(server.as_str())
        .await
        .map_err(|e| format!("resolving the identity server {server}: {e}"))?
        .collect();
    let mut last = format!("the identity server {server} resolves to no address");
    for addr in addrs {
        match super::server::request_svid(addr, remote.tls.clone(), token, id).await {
            Ok(svid) => return Ok(svid),
            // Another replica would decide the same.
            Err(e @ super::server::RequestError::Refused { .. }) => return Err(e.to_string()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}
