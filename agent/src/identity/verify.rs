//! Certificate verification for SPIFFE peers.
//!
//! Both sides check the same things: the chain ends at a CA of the trust bundle and every
//! certificate is valid now (webpki, through rustls), and the leaf carries exactly one URI
//! SAN, a SPIFFE ID of our trust domain. Server names are not checked: SVIDs carry no DNS
//! names, and the client instead compares the server's SPIFFE ID with the identity it
//! expects for the destination, as Istio's ztunnel does.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::{Error, SpiffeId};

/// The SPIFFE ID in a peer's certificate chain (leaf first), as the proxy reads it after a
/// handshake (`peer_certificates()`). The chain itself was verified during the handshake;
/// this only extracts the identity and fails if there is not exactly one SPIFFE ID.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, Error> {
    let leaf = certs.first().ok_or(Error::NoPeerCertificate)?;
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| Error::Certificate {
        origin: "the peer certificate".to_owned(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::Certificate {
            origin: "the peer certificate".to_owned(),
            reason: format!("malformed subject alternative names: {e}"),
        })?
        .ok_or(Error::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(Error::NoSpiffeId),
        [uri] => SpiffeId::parse(uri),
        _ => Err(Error::SeveralUris(uris.len())),
    }
}

/// The peer's SPIFFE ID, which must be in `trust_domain`.
fn peer_in_trust_domain(
    certs: &[CertificateDer<'_>],
    trust_domain: &str,
) -> Result<SpiffeId, Error> {
    let id = peer_identity(certs)?;
    if id.trust_domain() != trust_domain {
        return Err(Error::WrongTrustDomain {
            id,
            expected: trust_domain.to_owned(),
        });
    }
    Ok(id)
}

/// webpki reports a chain whose issuer has the name of a trust anchor but not its key as
/// a bad signature, which reads as a forged or corrupted certificate. To the operator it
/// is a certificate of a CA the bundle does not hold (a CA of another cluster, one removed
/// by a rotation), so it is reported, and alerted, as an unknown issuer. Signatures of the
/// handshake itself are checked elsewhere and keep their error.
fn chain_error(e: rustls::Error) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        }
        other => other,
    }
}

/// Our error inside a rustls certificate error, so that the handshake failure says why
/// and the peer receives a `bad_certificate` alert.
fn rejected(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(e)))))
}

/// rustls prints a `CertificateError::Other` with `Debug`; this wrapper makes that the
/// readable message.
struct Rejected(Error);

impl std::fmt::Debug for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Rejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Server side: requires a client certificate that chains to the bundle and names a
/// SPIFFE ID of our trust domain.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    /// webpki's chain, validity and clientAuth checks.
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
    ) -> Result<Self, Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| Error::Tls {
                id: "the client certificate verifier".to_owned(),
                source: rustls::Error::General(e.to_string()),
            })?;
        Ok(SpiffeClientVerifier {
            inner,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(chain_error)?;
        peer_in_trust_domain(std::slice::from_ref(end_entity), &self.trust_domain)
            .map_err(rejected)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server's chain must end at the bundle, and its SPIFFE ID must be the
/// expected one, or any of our trust domain when none is expected. The server name the
/// connection was opened with is ignored (see the module documentation).
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
    expected: Option<SpiffeId>,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        provider: &CryptoProvider,
        trust_domain: &str,
        expected: Option<SpiffeId>,
    ) -> Self {
        SpiffeServerVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
            trust_domain: trust_domain.to_owned(),
            expected,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        // Chain to a trust anchor, validity periods, serverAuth usage, signatures along the
        // chain: everything webpki checks for a server except the name.
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(chain_error)?;
        let actual = peer_in_trust_domain(std::slice::from_ref(end_entity), &self.trust_domain)
            .map_err(rejected)?;
        if let Some(expected) = &self.expected
            && *expected != actual
        {
            return Err(rejected(Error::UnexpectedIdentity {
                expected: Box::new(expected.clone()),
                actual: Box::new(actual),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
