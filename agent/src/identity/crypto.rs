//! The TLS crypto provider: aws-lc-rs, with the key exchange groups mesh connections offer.
//!
//! Mesh connections offer the post-quantum hybrid group X25519MLKEM768 first and prefer
//! it, and keep classical X25519 (then P-256, P-384) for peers without it. Istio's ztunnel
//! with `COMPLIANCE_POLICY=pqc` offers X25519MLKEM768 alone, and Linkerd offers it too.
//! [`KeyExchange::RequirePostQuantum`] offers and accepts only the hybrid group, so that no
//! connection falls back to a key exchange a quantum computer could break later ("harvest
//! now, decrypt later").
//!
//! One provider serves the whole process: [`install_process_default`] installs it for the
//! parts that do not pass one explicitly (the Kubernetes client); the mesh's TLS
//! configurations pass theirs, built by [`provider`].

use std::{fmt, str::FromStr, sync::LazyLock};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use rustls::{
    NamedGroup, ProtocolVersion, SupportedProtocolVersion,
    crypto::{
        ActiveKeyExchange, CompletedKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup,
        aws_lc_rs,
    },
    ffdhe_groups::FfdheGroup,
};
use serde::{Deserialize, Serialize};

/// Which key exchange groups mesh connections offer and accept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyExchange {
    /// X25519MLKEM768 first, then X25519, P-256 and P-384 for peers without it.
    #[default]
    #[serde(rename = "prefer")]
    PreferPostQuantum,
    /// X25519MLKEM768 only: a peer that cannot do it fails the handshake.
    #[serde(rename = "require")]
    RequirePostQuantum,
}

impl KeyExchange {
    /// The groups, most preferred first; each counts the key exchanges it completes in
    /// [`key_exchanges`].
    pub fn groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        let counted = &*COUNTED;
        let all: Vec<&'static dyn SupportedKxGroup> = counted
            .iter()
            .map(|c| c as &'static dyn SupportedKxGroup)
            .collect();
        match self {
            KeyExchange::PreferPostQuantum => all,
            KeyExchange::RequirePostQuantum => all[..1].to_vec(),
        }
    }

    /// The setting's value as `--post-quantum` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyExchange::PreferPostQuantum => "prefer",
            KeyExchange::RequirePostQuantum => "require",
        }
    }
}

impl fmt::Display for KeyExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyExchange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prefer" => Ok(KeyExchange::PreferPostQuantum),
            "require" => Ok(KeyExchange::RequirePostQuantum),
            _ => Err(
                "expected `prefer` (X25519MLKEM768 first, X25519 for peers without it) or \
                 `require` (X25519MLKEM768 only)"
                    .to_owned(),
            ),
        }
    }
}

/// The aws-lc-rs provider with the groups of `kx`.
pub fn provider(kx: KeyExchange) -> CryptoProvider {
    CryptoProvider {
        kx_groups: kx.groups(),
        ..aws_lc_rs::default_provider()
    }
}

/// Installs the provider with the default groups as the process default, for rustls
/// configurations built without an explicit provider (the Kubernetes client's). Call once
/// at start-up; a later call, or one after another part of the process installed a
/// provider, changes nothing.
pub fn install_process_default() {
    // An error only says a provider is installed already: the first one stays.
    let _ = provider(KeyExchange::default()).install_default();
}

/// The name of a key exchange group as IANA's TLS registry spells it (`X25519MLKEM768`,
/// `X25519`, `secp256r1`), for logs, metrics and status.
pub fn group_name(group: NamedGroup) -> String {
    match group {
        NamedGroup::X25519MLKEM768 => "X25519MLKEM768".to_owned(),
        NamedGroup::X25519 => "X25519".to_owned(),
        NamedGroup::secp256r1 => "secp256r1".to_owned(),
        NamedGroup::secp384r1 => "secp384r1".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Labels of `mycel_tls_key_exchanges_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyExchangeLabels {
    /// The group as [`group_name`] spells it.
    pub group: String,
}

static KEY_EXCHANGES: LazyLock<Family<KeyExchangeLabels, Counter>> = LazyLock::new(Family::default);

/// `mycel_tls_key_exchanges_total{group}`: the key exchanges mesh connections completed,
/// by the group negotiated, on either end (register it once per process).
pub fn key_exchanges() -> Family<KeyExchangeLabels, Counter> {
    KEY_EXCHANGES.clone()
}

fn count(group: NamedGroup) {
    KEY_EXCHANGES
        .get_or_create(&KeyExchangeLabels {
            group: group_name(group),
        })
        .inc();
}

/// The groups mesh connections may offer, most preferred first, each counting what it
/// completes. `'static`, as rustls wants its groups.
static COUNTED: LazyLock<[Counted; 4]> = LazyLock::new(|| {
    [
        Counted(aws_lc_rs::kx_group::X25519MLKEM768),
        Counted(aws_lc_rs::kx_group::X25519),
        Counted(aws_lc_rs::kx_group::SECP256R1),
        Counted(aws_lc_rs::kx_group::SECP384R1),
    ]
});

/// A group of the provider that counts the key exchanges it completes: on the server,
/// the group it chose ([`SupportedKxGroup::start_and_complete`]); on the client, the share
/// the server took (its classical half, when the server chose X25519 from a hybrid
/// share). Everything else is the provider's.
#[derive(Debug)]
struct Counted(&'static dyn SupportedKxGroup);

impl SupportedKxGroup for Counted {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(CountedActive(self.0.start()?)))
    }

    fn start_and_complete(
        &self,
        peer_pub_key: &[u8],
    ) -> Result<CompletedKeyExchange, rustls::Error> {
        let done = self.0.start_and_complete(peer_pub_key)?;
        count(done.group);
        Ok(done)
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        self.0.ffdhe_group()
    }

    fn name(&self) -> NamedGroup {
        self.0.name()
    }

    fn fips(&self) -> bool {
        self.0.fips()
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        self.0.usable_for_version(version)
    }
}

struct CountedActive(Box<dyn ActiveKeyExchange>);

impl ActiveKeyExchange for CountedActive {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let group = self.0.group();
        let secret = self.0.complete(peer_pub_key)?;
        count(group);
        Ok(secret)
    }

    fn complete_for_tls_version(
        self: Box<Self>,
        peer_pub_key: &[u8],
        tls_version: &SupportedProtocolVersion,
    ) -> Result<SharedSecret, rustls::Error> {
        let group = self.0.group();
        let secret = self.0.complete_for_tls_version(peer_pub_key, tls_version)?;
        count(group);
        Ok(secret)
    }

    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        self.0.hybrid_component()
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        peer_pub_key: &[u8],
    ) -> Result<SharedSecret, rustls::Error> {
        let group = self.0.hybrid_component().map(|(g, _)| g);
        let secret = self.0.complete_hybrid_component(peer_pub_key)?;
        if let Some(group) = group {
            count(group);
        }
        Ok(secret)
    }

    fn pub_key(&self) -> &[u8] {
        self.0.pub_key()
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        self.0.ffdhe_group()
    }

    fn group(&self) -> NamedGroup {
        self.0.group()
    }
}
