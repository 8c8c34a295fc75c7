//! The CA directory, reloaded while the agent runs, so that a CA rotation needs no restart.
//!
//! The directory holds [`CA_CERT_FILE`] and [`CA_KEY_FILE`] (in Kubernetes, the Secret
//! `mycel-ca` mounted as files; the kubelet swaps both at once when the Secret changes).
//! It is read every [`DEFAULT_RELOAD_INTERVAL`]; when either file changed, the pair is
//! parsed again ([`Ca::from_pem`]: the signing CA is the certificate whose key is in the
//! key file, every other CA certificate of the file is one more trusted root) and handed
//! to [`CertManager::set_trust`], which puts the new bundle in force for new handshakes
//! and, when the signing CA changed, reissues every workload certificate at once. A pair
//! that cannot be used leaves the last good CA and bundle in force; the error is logged
//! once, shown by `mycel status`, and counted in `mycel_ca_reloads_total{result="failed"}`
//! with `mycel_ca_reload_failing` at 1 until the files are fixed.
//!
//! An agent whose certificates come from the identity server holds no CA key: its
//! directory holds only [`CA_CERT_FILE`], the trust bundle ([`CaDir::bundle_only`]),
//! handed to [`CertManager::set_bundle`] when it changes.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{CA_CERT_FILE, CA_KEY_FILE, Ca, CertManager, Error, TrustBundle};

/// How often the CA directory is read for changes.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Labels of `mycel_ca_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    /// `applied` or `failed`.
    result: &'static str,
}

/// Metrics of the CA directory's reloads.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `mycel_ca_reloads_total{result}`: changes of the CA directory applied or refused.
    reloads: Family<ReloadLabels, Counter>,
    /// `mycel_ca_reload_failing`: 1 while the files on disk cannot be applied (the last
    /// good CA and bundle are in force).
    failing: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "mycel_ca_reloads",
            "Changes of the CA directory applied or refused",
            m.reloads.clone(),
        );
        registry.register(
            "mycel_ca_reload_failing",
            "1 while the CA directory cannot be applied (the last good CA stays in force)",
            m.failing.clone(),
        );
        m
    }
}

/// What `mycel status` shows about the CA directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// Changes applied since start.
    pub applied: u64,
    /// Why the files on disk are not in force, while they are not.
    pub error: Option<String>,
}

/// The CA directory and what was last read from it.
#[derive(Debug)]
pub struct CaDir {
    dir: PathBuf,
    /// The contents in force.
    applied: (Vec<u8>, Vec<u8>),
    /// Contents refused last, so that a bad pair is reported once, not at every read.
    refused: Option<(Vec<u8>, Vec<u8>)>,
    /// Only the trust bundle (no key): certificates come from the identity server.
    bundle_only: bool,
    metrics: Arc<Metrics>,
}

/// What one read of the directory did.
#[derive(Debug)]
pub enum Reload {
    /// Nothing changed (or the same bad pair as before).
    Unchanged,
    /// A new CA or bundle is in force.
    Applied,
    /// The files changed but cannot be used; the last good CA stays.
    Refused(Error),
}

impl CaDir {
    /// Watches `dir`, whose current files the manager was built from.
    pub fn new(dir: &Path, metrics: Arc<Metrics>) -> Result<CaDir, Error> {
        Ok(CaDir {
            dir: dir.to_owned(),
            applied: read_pair(dir, false)?,
            refused: None,
            bundle_only: false,
            metrics,
        })
    }

    /// Watches the trust bundle of `dir` (its [`CA_CERT_FILE`] alone), whose current
    /// contents the manager was built from.
    pub fn bundle_only(dir: &Path, metrics: Arc<Metrics>) -> Result<CaDir, Error> {
        Ok(CaDir {
            dir: dir.to_owned(),
            applied: read_pair(dir, true)?,
            refused: None,
            bundle_only: true,
            metrics,
        })
    }

    /// Reads the directory and applies a change to `manager`.
    pub fn poll(&mut self, manager: &CertManager) -> Reload {
        let outcome = match read_pair(&self.dir, self.bundle_only) {
            Ok(pair) if pair == self.applied => {
                self.refused = None;
                Reload::Unchanged
            }
            Ok(pair) if self.refused.as_ref() == Some(&pair) => Reload::Unchanged,
            Ok(pair) => match self.apply(&pair, manager) {
                Ok(()) => {
                    self.applied = pair;
                    self.refused = None;
                    Reload::Applied
                }
                Err(e) => {
                    self.refused = Some(pair);
                    Reload::Refused(e)
                }
            },
            // An unreadable file (e.g. removed): reported while it lasts, once.
            Err(e) => {
                let marker = (Vec::new(), e.to_string().into_bytes());
                if self.refused.as_ref() == Some(&marker) {
                    Reload::Unchanged
                } else {
                    self.refused = Some(marker);
                    Reload::Refused(e)
                }
            }
        };
        match &outcome {
            Reload::Unchanged => {}
            Reload::Applied => {
                manager.record_reload(None);
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels { result: "applied" })
                    .inc();
                self.metrics.failing.set(0);
                tracing::info!(
                    dir = %self.dir.display(),
                    signing_ca = %manager.signing_ca(),
                    trusted = manager.bundle().certificates().len(),
                    "applied the changed CA directory"
                );
            }
            Reload::Refused(e) => {
                manager.record_reload(Some(e.to_string()));
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels { result: "failed" })
                    .inc();
                self.metrics.failing.set(1);
                tracing::error!(
                    dir = %self.dir.display(),
                    error = %e,
                    "the changed CA directory cannot be used; the last good CA and trust bundle stay in force"
                );
            }
        }
        outcome
    }

    fn apply(&self, (cert, key): &(Vec<u8>, Vec<u8>), manager: &CertManager) -> Result<(), Error> {
        if self.bundle_only {
            let path = self.dir.join(CA_CERT_FILE);
            return manager.set_bundle(TrustBundle::from_pem(cert, &path.display().to_string())?);
        }
        let ca = Ca::from_pem_paths(
            cert,
            &self.dir.join(CA_CERT_FILE),
            key,
            &self.dir.join(CA_KEY_FILE),
        )?;
        manager.set_trust(ca, TrustBundle::default())
    }

    /// Polls every `interval` until the manager is gone.
    pub fn spawn(mut self, manager: CertManager, interval: Duration) -> JoinHandle<()> {
        let weak = manager.downgrade();
        drop(manager);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(manager) = CertManager::upgrade(&weak) else {
                    return;
                };
                // File reads and signing are short; they run on a blocking thread so the
                // runtime's workers keep serving connections meanwhile.
                let (back, _) = match tokio::task::spawn_blocking(move || {
                    let outcome = self.poll(&manager);
                    (self, outcome)
                })
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "the CA reload task failed");
                        return;
                    }
                };
                self = back;
            }
        })
    }
}

fn read_pair(dir: &Path, bundle_only: bool) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| Error::Io {
            action: "reading",
            path,
            source,
        })
    };
    if bundle_only {
        return Ok((read(CA_CERT_FILE)?, Vec::new()));
    }
    Ok((read(CA_CERT_FILE)?, read(CA_KEY_FILE)?))
}
