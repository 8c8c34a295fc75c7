//! The certificate authority, trust bundles and the certificates (SVIDs) the CA issues.
//!
//! Standalone, the agent creates its CA on first start and keeps it in a directory; in
//! Kubernetes the CA certificate and key come from a Secret mounted as files. Either way
//! the CA signs short-lived X.509 SVIDs: one URI SAN holding the SPIFFE ID and nothing
//! else, as the X.509-SVID specification and Istio's ztunnel expect.

use std::{
    fmt,
    fs::{self, DirBuilder, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, string::Ia5String,
};
use rustls::{
    RootCertStore,
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer,
        pem::{self, PemObject},
    },
};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{Error, SpiffeId, spiffe::check_trust_domain};

/// The CA certificate's file name in the standalone CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in the standalone CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How far back `notBefore` is set, so that a peer whose clock is a little behind ours
/// accepts a certificate issued a moment ago.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a CA the agent creates: ten years (and three leap days).
const CA_LIFETIME: Duration = Duration::from_secs((10 * 365 + 3) * 24 * 60 * 60);

/// A certificate authority: its certificate and the key that signs SVIDs.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate.
    cert: CertificateDer<'static>,
    /// What an SVID's chain carries after the leaf: nothing when the CA is a root (peers
    /// hold it as a trust anchor), the CA and the intermediates above it (not the root)
    /// when it is an intermediate.
    chain: Vec<CertificateDer<'static>>,
    /// The roots the file names: the top of the CA's own chain and every other CA
    /// certificate in it (the other roots of a CA rotation).
    bundle: TrustBundle,
    not_after: SystemTime,
    /// Where the CA came from, for messages.
    origin: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Ca")
            .field("origin", &self.origin)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA for `trust_domain`: ECDSA P-256, `CA:true` with path length 0
    /// (it signs workload certificates only), valid for ten years from `now`.
    pub fn generate(trust_domain: &str, now: SystemTime) -> Result<Ca, Error> {
        Ca::generate_named(trust_domain, now, None)
    }

    /// [`Ca::generate`] with the given common name instead of a name of its own: tests
    /// make two CAs of one name, as every CA had before names were made distinct.
    pub(super) fn generate_named(
        trust_domain: &str,
        now: SystemTime,
        common_name: Option<&str>,
    ) -> Result<Ca, Error> {
        check_trust_domain(trust_domain)?;
        let sign_err = |source| Error::Sign {
            what: format!("creating a CA for the trust domain {trust_domain:?}"),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        // Each CA its own name: the creation date and a random tag. With one name for
        // every CA, a certificate of an untrusted CA would find a trusted CA of that name
        // and fail as a bad signature instead of an unknown issuer.
        let secs = i64::try_from(since_epoch(now, "now")?.as_secs()).unwrap_or(i64::MAX);
        let date = x509_parser::time::ASN1Time::from_timestamp(secs)
            .map(|t| t.to_datetime().date().to_string())
            .unwrap_or_default();
        let tag = random_bytes::<4>(trust_domain)?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        name.push(
            DnType::CommonName,
            common_name.map_or_else(
                || format!("mycel CA for {trust_domain} {date} {tag}"),
                str::to_owned,
            ),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial(trust_domain)?);
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(now, "now")?;
        params.not_after =
            rcgen::date_time_ymd(1970, 1, 1) + since_epoch(now, "now")? + CA_LIFETIME;
        let cert = params.self_signed(&key).map_err(sign_err)?;
        let cert = cert.der().clone();
        let origin = format!("new CA for {trust_domain}");
        let not_after = validity(&cert, &origin)?.1;
        let mut bundle = TrustBundle::default();
        bundle.add(cert.clone(), &origin)?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert,
            chain: Vec::new(),
            bundle,
            not_after,
            origin,
        })
    }

    /// The standalone CA kept in `dir`: loads [`CA_CERT_FILE`] and [`CA_KEY_FILE`], or
    /// creates both (directory 0700, key 0600) when neither exists. A file that exists but
    /// cannot be used, or one file without the other, is an error naming the file; nothing
    /// is overwritten, since a new CA would invalidate every certificate issued so far.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, Error> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {
                let cert_pem = read(&cert_path)?;
                let key_pem = read(&key_path)?;
                warn_if_readable_by_others(&key_path);
                Ca::from_pem_files(
                    &cert_pem,
                    &cert_path.display().to_string(),
                    &key_pem,
                    &key_path.display().to_string(),
                )
            }
            (true, false) => Err(Error::HalfWritten {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(Error::HalfWritten {
                present: key_path,
                missing: cert_path,
            }),
            (false, false) => Ca::create(dir, trust_domain),
        }
    }

    /// Creates a new CA for `trust_domain` in `dir` (created with mode 0700 if missing):
    /// [`CA_KEY_FILE`] (0600), then [`CA_CERT_FILE`] (0644), each written whole or not at
    /// all. Refuses when either file exists, since a new CA would invalidate every
    /// certificate the old one issued. What [`Ca::load_or_create`] does on a first start,
    /// and `mycel ca create` for the Secret the agents read in Kubernetes.
    pub fn create(dir: &Path, trust_domain: &str) -> Result<Ca, Error> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for path in [&key_path, &cert_path] {
            if exists(path)? {
                return Err(Error::Io {
                    action: "refusing to overwrite",
                    path: path.clone(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "a CA file is already there (a new CA would invalidate every \
                         certificate the old one issued): choose another directory, or \
                         remove both files first",
                    ),
                });
            }
        }
        // Before touching the disk, so that a bad trust domain leaves nothing behind.
        let mut ca = Ca::generate(trust_domain, SystemTime::now())?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io {
                action: "creating the CA directory",
                path: dir.to_owned(),
                source,
            })?;
        // The key first: if the process stops between the two writes, the next start finds
        // a key without a certificate and says so, instead of a certificate whose key is
        // lost.
        write_atomically(&key_path, ca.issuer.key().serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&cert_path, ca.cert_pem().as_bytes(), 0o644)?;
        ca.origin = cert_path.display().to_string();
        tracing::info!(dir = %dir.display(), %trust_domain, "created a new CA");
        Ok(ca)
    }

    /// A CA from PEM text (in Kubernetes, the files of a mounted Secret). `cert_pem` holds
    /// the CA certificate first, then optionally the certificates above it; `key_pem` its
    /// private key (PKCS#8, SEC1 or PKCS#1). `origin` names the source in errors.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<Ca, Error> {
        Ca::from_pem_files(
            cert_pem,
            &format!("{origin} (certificate)"),
            key_pem,
            &format!("{origin} (key)"),
        )
    }

    /// [`Ca::from_pem`] with errors naming the two files.
    pub fn from_pem_paths(
        cert_pem: &[u8],
        cert_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
    ) -> Result<Ca, Error> {
        Ca::from_pem_files(
            cert_pem,
            &cert_path.display().to_string(),
            key_pem,
            &key_path.display().to_string(),
        )
    }

    /// The signing CA is the certificate whose public key is the key's, wherever it is in
    /// `cert_pem`; the certificates that issued it (found by name and signature) form its
    /// chain; every other certificate is one more root of the bundle (a CA rotation lists
    /// the old and the new CA in one file).
    fn from_pem_files(
        cert_pem: &[u8],
        cert_origin: &str,
        key_pem: &[u8],
        key_origin: &str,
    ) -> Result<Ca, Error> {
        let certs = parse_certificates(cert_pem, cert_origin)?;
        if certs.is_empty() {
            return Err(Error::Pem {
                origin: cert_origin.to_owned(),
                reason: "no certificate in the file".to_owned(),
            });
        }
        let key_text = std::str::from_utf8(key_pem).map_err(|_| Error::Pem {
            origin: key_origin.to_owned(),
            reason: "not PEM text (not UTF-8)".to_owned(),
        })?;
        let key = KeyPair::from_pem(key_text).map_err(|e| Error::Pem {
            origin: key_origin.to_owned(),
            reason: format!("not a usable private key: {e}"),
        })?;
        let parsed = certs
            .iter()
            .map(|c| parse_ca_candidate(c, cert_origin))
            .collect::<Result<Vec<_>, _>>()?;
        let signing = parsed
            .iter()
            .position(|(p, _)| {
                p.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
            })
            .ok_or_else(|| Error::Certificate {
                origin: cert_origin.to_owned(),
                reason: format!(
                    "the key in {key_origin} does not belong to this certificate{}",
                    if certs.len() > 1 {
                        format!(" (nor to any of the {} in the file)", certs.len())
                    } else {
                        String::new()
                    }
                ),
            })?;
        for (n, (p, is_ca)) in parsed.iter().enumerate() {
            if !is_ca {
                let what = if n == signing {
                    "not a CA certificate (basic constraints without CA:true)".to_owned()
                } else {
                    format!(
                        "certificate {} ({}) is not a CA certificate (basic constraints \
                         without CA:true) and cannot be a trust anchor",
                        n + 1,
                        p.subject()
                    )
                };
                return Err(Error::Certificate {
                    origin: cert_origin.to_owned(),
                    reason: what,
                });
            }
        }

        // Up from the signing CA: each step the certificate that issued the previous one.
        let mut path = vec![signing];
        let mut root = None;
        loop {
            let current = path.last().copied().unwrap_or(signing);
            if issued_by(&parsed[current].0, &parsed[current].0) {
                root = Some(current);
                break;
            }
            match (0..parsed.len())
                .find(|&j| !path.contains(&j) && issued_by(&parsed[current].0, &parsed[j].0))
            {
                Some(j) => path.push(j),
                None => break,
            }
        }
        let top = path.last().copied().unwrap_or(signing);
        let mut bundle = TrustBundle::default();
        bundle.add(certs[top].clone(), cert_origin)?;
        for (n, cert) in certs.iter().enumerate() {
            if !path.contains(&n) {
                bundle.add(cert.clone(), cert_origin)?;
            }
        }
        // The chain: the CA and its intermediates, never the root (peers hold it).
        let chain: Vec<CertificateDer<'static>> = path
            .iter()
            .filter(|&&n| Some(n) != root)
            .map(|&n| certs[n].clone())
            .collect();
        drop(parsed);
        let cert = certs[signing].clone();
        let not_after = validity(&cert, cert_origin)?.1;
        if not_after < SystemTime::now() {
            tracing::warn!(origin = cert_origin, "the CA certificate has expired");
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| Error::Certificate {
            origin: cert_origin.to_owned(),
            reason: format!("cannot sign with this CA: {e}"),
        })?;
        Ok(Ca {
            issuer,
            cert,
            chain,
            bundle,
            not_after,
            origin: cert_origin.to_owned(),
        })
    }

    /// The roots named with the CA: the top of its chain and the other CA certificates of
    /// its file.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The CA certificate's subject, e.g. `O=cluster.local, CN=mycel CA for cluster.local
    /// 2026-12-04 1a2b3c4d`.
    pub fn subject(&self) -> String {
        X509Certificate::from_der(&self.cert)
            .map(|(_, c)| c.subject().to_string())
            .unwrap_or_default()
    }

    /// The CA's own certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        to_pem(&self.cert)
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issues an SVID for `id`: a new ECDSA P-256 key; the SPIFFE ID as the only SAN;
    /// usable for TLS servers and clients; valid from `now` minus [`CLOCK_SKEW`] to
    /// `now + lifetime`, but never after the CA itself expires.
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration, now: SystemTime) -> Result<Svid, Error> {
        self.issue_adjusted(id, lifetime, now, |_| {})
    }

    /// [`Ca::issue`] with the parameters changed by `adjust` before signing: tests make
    /// certificates a correct CA would not (no URI SAN, another trust domain).
    pub(super) fn issue_adjusted(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Result<Svid, Error> {
        let sign_err = |source| Error::Sign {
            what: format!("issuing a certificate for {id}"),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let mut params = self.leaf_params(id, lifetime, now)?;
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        let (chain, not_before, not_after, serial) = self.chain_of(id, cert.der().clone())?;
        Ok(Svid {
            id: id.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            not_before,
            not_after,
            serial,
        })
    }

    /// Signs a certificate for `id` with the public key of a PKCS#10 request (PEM), as the
    /// identity server does for agents: the request's signature must verify (its sender
    /// holds the key), and nothing else of it is used: names, extensions and validity are
    /// those of [`Ca::issue`]. Returns the chain (leaf first) in PEM.
    pub fn sign_request(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<String, Error> {
        let csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| Error::Pem {
                origin: format!("the certificate request for {id}"),
                reason: format!("not a valid PKCS#10 request: {e}"),
            })?;
        let params = self.leaf_params(id, lifetime, now)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| Error::Sign {
                what: format!("issuing a certificate for {id}"),
                source,
            })?;
        let (chain, ..) = self.chain_of(id, cert.der().clone())?;
        Ok(chain.iter().map(to_pem).collect())
    }

    /// The parameters of an SVID for `id`, valid from `now` for `lifetime`.
    fn leaf_params(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<CertificateParams, Error> {
        let sign_err = |source| Error::Sign {
            what: format!("issuing a certificate for {id}"),
            source,
        };
        let uri = Ia5String::try_from(id.to_string()).map_err(sign_err)?;
        let mut params = CertificateParams::default();
        // An empty subject: the identity is the URI SAN alone (rcgen then marks the SAN
        // extension critical, as RFC 5280 requires).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial(&id.to_string())?);
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH);
        // Rounded up to a whole second (certificates carry no fractions), so that the
        // certificate is valid for at least `lifetime`.
        let not_after = now
            .checked_add(lifetime)
            .and_then(round_up_to_second)
            .map_or(self.not_after, |t| t.min(self.not_after));
        params.not_before =
            rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_before, "notBefore")?;
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_after, "notAfter")?;
        Ok(params)
    }

    /// The chain of a signed leaf, and its validity and serial.
    fn chain_of(
        &self,
        id: &SpiffeId,
        leaf: CertificateDer<'static>,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime, SystemTime, String), Error> {
        let origin = format!("certificate for {id}");
        let (not_before, not_after) = validity(&leaf, &origin)?;
        let serial = serial_hex(&leaf, &origin)?;
        let mut chain = vec![leaf];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, not_before, not_after, serial))
    }
}

/// The CA certificates a peer's chain may end at. During a CA rotation it holds the old
/// and the new CA, so that certificates of both verify until the old ones have expired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle of the CA certificates in `pem` (one or more); `origin` names the source.
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<TrustBundle, Error> {
        let certs = parse_certificates(pem, origin)?;
        if certs.is_empty() {
            return Err(Error::Pem {
                origin: origin.to_owned(),
                reason: "no certificate in the trust bundle".to_owned(),
            });
        }
        let mut bundle = TrustBundle::default();
        for cert in certs {
            bundle.add(cert, origin)?;
        }
        Ok(bundle)
    }

    /// The bundle in the PEM file at `path`.
    pub fn from_file(path: &Path) -> Result<TrustBundle, Error> {
        TrustBundle::from_pem(&read(path)?, &path.display().to_string())
    }

    /// Adds a CA certificate (once: a certificate already present is not added again).
    pub fn add(&mut self, cert: CertificateDer<'static>, origin: &str) -> Result<(), Error> {
        let (parsed, is_ca) = parse_ca_candidate(&cert, origin)?;
        if !is_ca {
            return Err(Error::Certificate {
                origin: origin.to_owned(),
                reason: format!(
                    "{} is not a CA certificate and cannot be a trust anchor",
                    parsed.subject()
                ),
            });
        }
        if !self.contains(&cert) {
            self.certs.push(cert);
        }
        Ok(())
    }

    /// Adds every CA of `other` that is not there yet.
    pub fn extend(&mut self, other: &TrustBundle) -> Result<(), Error> {
        for cert in &other.certs {
            self.add(cert.clone(), "the trust bundle")?;
        }
        Ok(())
    }

    /// Whether `cert` is one of the bundle's CAs.
    pub fn contains(&self, cert: &CertificateDer<'_>) -> bool {
        self.certs.iter().any(|c| c.as_ref() == cert.as_ref())
    }

    /// The CA certificates.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The bundle as rustls trust anchors.
    pub(crate) fn root_store(&self) -> Result<RootCertStore, Error> {
        let mut roots = RootCertStore::empty();
        for cert in &self.certs {
            roots.add(cert.clone()).map_err(|source| Error::Tls {
                id: "the trust bundle".to_owned(),
                source,
            })?;
        }
        Ok(roots)
    }
}

/// An X.509 SVID: the certificate chain (the leaf, then the CA only when it is an
/// intermediate) and its private key.
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
            serial: self.serial.clone(),
        }
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// An SVID issued elsewhere (by the identity server): `chain_pem` leaf first, for the
    /// key `key` whose public key is `public_key`. The leaf must name exactly `id` and
    /// hold that key.
    pub fn from_issued(
        id: &SpiffeId,
        chain_pem: &[u8],
        key: PrivateKeyDer<'static>,
        public_key: &[u8],
    ) -> Result<Svid, Error> {
        let origin = format!("the certificate issued for {id}");
        let chain = parse_certificates(chain_pem, &origin)?;
        let leaf = chain.first().ok_or_else(|| Error::Pem {
            origin: origin.clone(),
            reason: "no certificate".to_owned(),
        })?;
        let named = super::peer_identity(std::slice::from_ref(leaf))?;
        let (_, parsed) = X509Certificate::from_der(leaf).map_err(|e| Error::Certificate {
            origin: origin.clone(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
        if named != *id || parsed.public_key().subject_public_key.data.as_ref() != public_key {
            return Err(Error::Certificate {
                origin,
                reason: format!("names {named} or holds another key"),
            });
        }
        let (not_before, not_after) = validity(leaf, &origin)?;
        let serial = serial_hex(leaf, &origin)?;
        Ok(Svid {
            id: id.clone(),
            chain,
            key,
            not_before,
            not_after,
            serial,
        })
    }

    /// The subject of the CA that signed the certificate (empty if it cannot be read).
    pub fn issuer(&self) -> String {
        X509Certificate::from_der(self.leaf())
            .map(|(_, c)| c.issuer().to_string())
            .unwrap_or_default()
    }

    /// The identity the certificate names.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The chain to send to peers: the leaf, then the CA and the intermediates above it
    /// when the CA is not a root (never a root: peers hold those).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `issue` always builds the chain with the leaf first.
        &self.chain[0]
    }

    /// The private key of the leaf certificate.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The start of the validity period (already moved back by [`CLOCK_SKEW`]).
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The end of the validity period.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The serial number, in lowercase hexadecimal.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The chain in PEM, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(to_pem).collect()
    }
}

pub(super) fn to_pem(cert: &CertificateDer<'_>) -> String {
    // Lines of 64 characters, as RFC 7468 asks.
    let mut out = String::new();
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    let b64 = base64_encode(cert.as_ref());
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Standard base64 with padding (RFC 4648), for PEM output.
fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every certificate in `pem`, with errors naming `origin`. Other sections (keys,
/// parameters) are skipped, so a combined file works.
fn parse_certificates(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| Error::Pem {
            origin: origin.to_owned(),
            reason: format!("malformed PEM: {e}"),
        })
}

/// (notBefore, notAfter) of a DER certificate.
fn validity(cert: &CertificateDer<'_>, origin: &str) -> Result<(SystemTime, SystemTime), Error> {
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| Error::Certificate {
        origin: origin.to_owned(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    let time = |t: i64| {
        u64::try_from(t)
            .ok()
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
            .ok_or_else(|| Error::Certificate {
                origin: origin.to_owned(),
                reason: "validity before 1970".to_owned(),
            })
    };
    Ok((
        time(parsed.validity().not_before.timestamp())?,
        time(parsed.validity().not_after.timestamp())?,
    ))
}

fn serial_hex(cert: &CertificateDer<'_>, origin: &str) -> Result<String, Error> {
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| Error::Certificate {
        origin: origin.to_owned(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    Ok(parsed
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Whether `parent` issued `child`: its subject is the child's issuer and its key verifies
/// the child's signature.
fn issued_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

/// `N` bytes from the system's random number generator.
fn random_bytes<const N: usize>(what: &str) -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| Error::Certificate {
            origin: what.to_owned(),
            reason: "the system random number generator failed".to_owned(),
        })?;
    Ok(bytes)
}

/// A random positive 128-bit serial number (RFC 5280 asks for unique serials; random ones
/// need no state across restarts).
fn random_serial(what: &str) -> Result<SerialNumber, Error> {
    let mut bytes = random_bytes::<16>(what)?;
    // Positive, and at least 1 in the top byte so the DER length is always 16.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn round_up_to_second(t: SystemTime) -> Option<SystemTime> {
    let nanos = t.duration_since(UNIX_EPOCH).ok()?.subsec_nanos();
    if nanos == 0 {
        Some(t)
    } else {
        t.checked_add(Duration::from_nanos(u64::from(1_000_000_000 - nanos)))
    }
}

fn since_epoch(t: SystemTime, what: &str) -> Result<Duration, Error> {
    t.duration_since(UNIX_EPOCH)
        .map_err(|_| Error::Certificate {
            origin: what.to_owned(),
            reason: "time before 1970".to_owned(),
        })
}

fn exists(path: &Path) -> Result<bool, Error> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io {
            action: "checking",
            path: path.to_owned(),
            source,
        }),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| Error::Io {
        action: "reading",
        path: path.to_owned(),
        source,
    })
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the CA key is readable by other users: chmod 600 it"
        );
    }
}

/// Writes `contents` to a temporary file next to `path`, flushes it to disk and renames it
/// over `path`, so that `path` holds either nothing or the whole file, never a part.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let io_err = |action, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp: PathBuf = path.with_file_name(format!(".{}.tmp", file_name.unwrap_or_default()));
    // A temporary file left by an interrupted start may have another mode; `mode` below
    // only applies to a file being created.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing", &tmp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(contents).map_err(io_err("writing", &tmp))?;
    file.sync_all().map_err(io_err("flushing", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    if let Some(dir) = path.parent() {
        // The rename itself reaches the disk only when the directory is flushed.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("flushing", dir))?;
    }
    Ok(())
}

/// Parses a certificate that should be a CA; also says whether its basic constraints
/// make it one. `origin` names where it came from in errors.
fn parse_ca_candidate<'a>(
    cert: &'a CertificateDer<'_>,
    origin: &str,
) -> Result<(X509Certificate<'a>, bool), Error> {
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| Error::Certificate {
        origin: origin.to_owned(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    let is_ca = parsed
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok((parsed, is_ca))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).expect("valid id")
    }

    #[test]
    fn load_or_create_creates_private_files_and_loads_them_again() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("ca");
        let first = Ca::load_or_create(&dir, "cluster.local").expect("creates");
        let key_mode = fs::metadata(dir.join(CA_KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600, "key mode {key_mode:o}");
        let dir_mode = fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700, "dir mode {dir_mode:o}");
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

        let second = Ca::load_or_create(&dir, "cluster.local").expect("loads");
        assert_eq!(first.certificate(), second.certificate(), "same CA");
        // The loaded key signs certificates that chain to the stored certificate.
        let svid = second
            .issue(&id("a", "b"), Duration::from_secs(60), SystemTime::now())
            .expect("issues");
        assert_signed_by(&svid, first.certificate());

        let parsed = X509Certificate::from_der(first.certificate())
            .expect("parses")
            .1;
        let subject = parsed.subject().to_string();
        assert!(
            subject.contains("mycel") && subject.contains("cluster.local"),
            "{subject}"
        );
        let bc = parsed
            .basic_constraints()
            .expect("one")
            .expect("present")
            .value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = parsed.key_usage().expect("one").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        let (nb, na) = validity(first.certificate(), "ca").expect("validity");
        let years = na.duration_since(nb).expect("ordered").as_secs() / (365 * 24 * 3600);
        assert_eq!(years, 10);
    }

    #[test]
    fn corrupt_or_half_written_files_are_reported_and_kept() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        Ca::load_or_create(dir, "cluster.local").expect("creates");
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);

        let garbage = b"-----BEGIN CERTIFICATE-----\nnot base64!\n";
        fs::write(&cert_path, garbage).expect("write");
        let e = Ca::load_or_create(dir, "cluster.local").expect_err("corrupt certificate");
        assert!(e.to_string().contains(CA_CERT_FILE), "{e}");
        assert_eq!(
            fs::read(&cert_path).expect("read"),
            garbage,
            "left as it was"
        );

        let key_before = fs::read(&key_path).expect("read");
        fs::write(&key_path, b"").expect("truncate");
        fs::remove_file(&cert_path).expect("remove");
        let e = Ca::load_or_create(dir, "cluster.local").expect_err("half written");
        assert!(matches!(e, Error::HalfWritten { .. }), "{e}");
        assert!(e.to_string().contains(CA_KEY_FILE), "{e}");
        assert!(!cert_path.exists(), "no certificate was created");
        assert!(!key_before.is_empty());

        // A key that does not belong to the certificate.
        let other = Ca::generate("cluster.local", SystemTime::now()).expect("ca");
        fs::write(&cert_path, other.cert_pem()).expect("write");
        fs::write(&key_path, &key_before).expect("write");
        let e = Ca::load_or_create(dir, "cluster.local").expect_err("mismatch");
        assert!(e.to_string().contains("does not belong"), "{e}");
        assert_eq!(
            fs::read(&cert_path).expect("read"),
            other.cert_pem().as_bytes()
        );
    }

    #[test]
    fn create_writes_a_new_ca_and_never_overwrites_one() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("new");
        let e = Ca::create(&dir, "Not A Domain").expect_err("bad trust domain");
        assert!(!dir.exists(), "nothing written for a bad trust domain: {e}");

        let ca = Ca::create(&dir, "mesh.example").expect("creates");
        let mode = |name: &str| {
            fs::metadata(dir.join(name))
                .expect("written")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        // 0644 less what the umask takes away.
        let cert = mode(CA_CERT_FILE);
        assert!(cert & 0o600 == 0o600 && cert & !0o644 == 0, "{cert:o}");
        // The files are what the agent loads from a mounted Secret.
        let loaded = Ca::from_pem(
            &fs::read(dir.join(CA_CERT_FILE)).expect("cert"),
            &fs::read(dir.join(CA_KEY_FILE)).expect("key"),
            "secret mycel-ca",
        )
        .expect("loads");
        assert_eq!(loaded.certificate(), ca.certificate());

        let cert_before = fs::read(dir.join(CA_CERT_FILE)).expect("cert");
        let e = Ca::create(&dir, "mesh.example").expect_err("refuses");
        assert!(
            e.to_string().contains("refusing to overwrite") && e.to_string().contains(CA_KEY_FILE),
            "{e}"
        );
        // Either file alone is enough to refuse.
        fs::remove_file(dir.join(CA_KEY_FILE)).expect("remove key");
        let e = Ca::create(&dir, "mesh.example").expect_err("refuses");
        assert!(e.to_string().contains(CA_CERT_FILE), "{e}");
        assert_eq!(fs::read(dir.join(CA_CERT_FILE)).expect("cert"), cert_before);
        assert!(!dir.join(CA_KEY_FILE).exists());
    }

    #[test]
    fn from_pem_rejects_a_leaf_as_ca() {
        let ca = Ca::generate("cluster.local", SystemTime::now()).expect("ca");
        let svid = ca
            .issue(&id("a", "b"), Duration::from_secs(60), SystemTime::now())
            .expect("svid");
        let key_pem = pem_of_key(svid.key());
        let e = Ca::from_pem(
            svid.chain_pem().as_bytes(),
            key_pem.as_bytes(),
            "secret mycel-ca",
        )
        .expect_err("a leaf is not a CA");
        assert!(
            e.to_string().contains("secret mycel-ca") && e.to_string().contains("not a CA"),
            "{e}"
        );
        let bundle = TrustBundle::from_pem(svid.chain_pem().as_bytes(), "bundle.pem");
        assert!(bundle.is_err(), "a leaf is not a trust anchor");
    }

    #[test]
    fn svid_has_the_expected_shape() {
        let ca = Ca::generate("cluster.local", SystemTime::now()).expect("ca");
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let svid = ca
            .issue(&id("ns1", "sa1"), Duration::from_secs(3600), now)
            .expect("svid");
        assert_eq!(svid.not_before(), now - CLOCK_SKEW);
        assert_eq!(svid.not_after(), now + Duration::from_secs(3600));
        assert_eq!(svid.serial().len(), 32);
        let cert = X509Certificate::from_der(svid.leaf()).expect("parses").1;
        let san = cert
            .subject_alternative_name()
            .expect("one")
            .expect("present");
        assert!(san.critical, "empty subject, so the SAN is critical");
        assert_eq!(san.value.general_names.len(), 1);
        assert_eq!(
            san.value.general_names[0],
            x509_parser::extensions::GeneralName::URI("spiffe://cluster.local/ns/ns1/sa/sa1")
        );
        let eku = cert
            .extended_key_usage()
            .expect("one")
            .expect("present")
            .value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = cert.key_usage().expect("one").expect("present").value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        assert!(!cert.is_ca());
        // A second certificate for the same identity has another serial and key.
        let again = ca
            .issue(&id("ns1", "sa1"), Duration::from_secs(3600), now)
            .expect("svid");
        assert_ne!(again.serial(), svid.serial());

        // A PEM round trip through the bundle parser.
        let bundle = TrustBundle::from_pem(
            format!("{}{}", ca.cert_pem(), ca.cert_pem()).as_bytes(),
            "bundle",
        )
        .expect("bundle");
        assert_eq!(
            bundle.certificates(),
            &[ca.certificate().clone()],
            "deduplicated"
        );
    }

    /// The SVID's chain is its leaf alone (a root signs it) and the leaf verifies with
    /// `ca`'s key.
    fn assert_signed_by(svid: &Svid, ca: &CertificateDer<'_>) {
        assert_eq!(svid.chain().len(), 1, "a root CA is not sent with the leaf");
        let leaf = X509Certificate::from_der(svid.leaf()).expect("leaf").1;
        let ca = X509Certificate::from_der(ca).expect("ca").1;
        assert!(issued_by(&leaf, &ca), "the leaf is not signed by the CA");
    }

    fn key_pem(ca: &Ca) -> String {
        ca.issuer.key().serialize_pem()
    }

    #[test]
    fn every_ca_gets_a_name_of_its_own() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = Ca::generate("cluster.local", now).expect("ca");
        let b = Ca::generate("cluster.local", now).expect("ca");
        assert_ne!(a.subject(), b.subject());
        assert!(
            a.subject()
                .contains("mycel CA for cluster.local 2027-01-15 "),
            "{}",
            a.subject()
        );
    }

    #[test]
    fn a_ca_file_with_several_roots_trusts_each_and_signs_with_the_one_of_the_key() {
        let now = SystemTime::now();
        let (old, new) = (
            Ca::generate("cluster.local", now).expect("ca"),
            Ca::generate("cluster.local", now).expect("ca"),
        );
        let both = format!("{}{}", old.cert_pem(), new.cert_pem());
        for (signer, other) in [(&old, &new), (&new, &old)] {
            let ca =
                Ca::from_pem(both.as_bytes(), key_pem(signer).as_bytes(), "ca dir").expect("loads");
            assert_eq!(
                ca.certificate(),
                signer.certificate(),
                "the key picks the CA"
            );
            assert!(ca.bundle().contains(old.certificate()));
            assert!(ca.bundle().contains(new.certificate()));
            assert_eq!(ca.bundle().certificates().len(), 2);
            let svid = ca
                .issue(&id("a", "b"), Duration::from_secs(60), now)
                .expect("issues");
            // Only the leaf: neither the signing root nor the unrelated one.
            assert_signed_by(&svid, signer.certificate());
            assert!(!svid.chain().contains(other.certificate()));
        }
        // A key of neither CA.
        let third = Ca::generate("cluster.local", now).expect("ca");
        let e = Ca::from_pem(both.as_bytes(), key_pem(&third).as_bytes(), "ca dir")
            .expect_err("no certificate of the key");
        assert!(e.to_string().contains("nor to any of the 2"), "{e}");
    }

    #[test]
    fn an_intermediate_ca_sends_itself_and_trusts_its_root() {
        let now = SystemTime::now();
        let root = Ca::generate("cluster.local", now).expect("root");
        let other_root = Ca::generate("cluster.local", now).expect("root");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "intermediate");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let inter = params.signed_by(&key, &root.issuer).expect("signs");
        let inter_der = inter.der().clone();
        // The file in any order: the root first, then another root, then the intermediate.
        let file = format!(
            "{}{}{}",
            root.cert_pem(),
            other_root.cert_pem(),
            to_pem(&inter_der)
        );
        let ca =
            Ca::from_pem(file.as_bytes(), key.serialize_pem().as_bytes(), "ca dir").expect("loads");
        assert_eq!(*ca.certificate(), inter_der);
        assert_eq!(
            ca.bundle().certificates(),
            &[root.certificate().clone(), other_root.certificate().clone()],
            "the roots, not the intermediate"
        );
        let svid = ca
            .issue(&id("a", "b"), Duration::from_secs(60), now)
            .expect("issues");
        assert_eq!(svid.chain(), &[svid.leaf().clone(), inter_der.clone()]);
        // webpki accepts the chain against the root alone.
        let roots = Arc::new(ca.bundle().root_store().expect("roots"));
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .expect("verifier");
        verifier
            .verify_client_cert(
                svid.leaf(),
                &svid.chain()[1..],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("chains to the root");
    }

    fn pem_of_key(key: &PrivateKeyDer<'_>) -> String {
        let der = match key {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der(),
            _ => panic!("issue() returns PKCS#8 keys"),
        };
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64_encode(der)
        )
    }
}
