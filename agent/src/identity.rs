//! Workload identity: SPIFFE IDs, the certificate authority, X.509 SVIDs, their renewal,
//! and the rustls configurations the node proxy uses for mutual TLS.
//!
//! Every workload identity is a SPIFFE ID `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`
//! ([`SpiffeId`]). The agent's [`Ca`] issues short-lived certificates ([`Svid`]) for the
//! identities of the workloads on its node; the [`CertManager`] keeps them, renews each at
//! half its lifetime and hands the proxy TLS configurations that present them. Peers are
//! trusted when their chain ends at a CA of the [`TrustBundle`] (several CAs during a CA
//! rotation) and their certificate carries exactly one SPIFFE ID of our trust domain. This
//! is what Istio's ztunnel expects on the HBONE port, so the two interoperate.

mod ca;
pub mod crypto;
mod manager;
pub mod reload;
pub mod server;
mod spiffe;
mod verify;

#[cfg(test)]
mod tests;

use std::{io, path::PathBuf};

pub use ca::{CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW, Ca, Svid, TrustBundle};
pub use crypto::KeyExchange;
pub use manager::{
    CertInfo, CertManager, DEFAULT_SVID_LIFETIME, IssuanceLabels, RemoteSigner, WeakCertManager,
    issuances,
};
pub use reload::{CaDir, ReloadStatus};
pub use spiffe::SpiffeId;
#[cfg(test)]
pub(crate) use verify::SpiffeServerVerifier;
pub use verify::peer_identity;

/// What can go wrong with identities, certificates and their files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A SPIFFE ID that does not follow the specification or the Kubernetes form.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId {
        /// The input, shortened when long.
        input: String,
        reason: &'static str,
    },
    /// Reading or writing a file of the CA.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// One file of the CA exists and the other does not: a write was interrupted or a file
    /// was removed. Nothing is overwritten, so that a CA is never replaced by mistake.
    #[error(
        "{} exists but {} does not: restore the missing file, or remove both to create a new CA (workloads will then need new certificates)",
        present.display(),
        missing.display()
    )]
    HalfWritten { present: PathBuf, missing: PathBuf },
    /// A PEM file or value that cannot be used.
    #[error("{origin}: {reason}")]
    Pem { origin: String, reason: String },
    /// A certificate that cannot be used for what it was given for.
    #[error("{origin}: {reason}")]
    Certificate { origin: String, reason: String },
    /// Generating a key or signing a certificate failed.
    #[error("{what}: {source}")]
    Sign { what: String, source: rcgen::Error },
    /// Building a TLS configuration failed.
    #[error("building the TLS configuration for {id}: {source}")]
    Tls { id: String, source: rustls::Error },
    /// A peer presented no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// A peer's certificate has no SPIFFE ID (no URI SAN).
    #[error("the peer certificate has no SPIFFE ID (no URI subject alternative name)")]
    NoSpiffeId,
    /// A peer's certificate has more than one URI SAN; an X.509 SVID has exactly one.
    #[error("the peer certificate has {0} URI subject alternative names; an SVID has exactly one")]
    SeveralUris(usize),
    /// An identity of another trust domain.
    #[error("{id} is not in the trust domain {expected:?}")]
    WrongTrustDomain { id: SpiffeId, expected: String },
    /// The peer is authenticated but is not who the caller expected.
    #[error("the peer is {actual}, expected {expected}")]
    UnexpectedIdentity {
        // Boxed to keep the error small on the common paths.
        expected: Box<SpiffeId>,
        actual: Box<SpiffeId>,
    },
}
