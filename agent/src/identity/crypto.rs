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

use std::{fmt, str::FromStr};

use rustls::{
    NamedGroup,
    crypto::{CryptoProvider, SupportedKxGroup, aws_lc_rs},
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
    /// The groups, most preferred first.
    pub fn groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        match self {
            KeyExchange::PreferPostQuantum => vec![
                aws_lc_rs::kx_group::X25519MLKEM768,
                aws_lc_rs::kx_group::X25519,
                aws_lc_rs::kx_group::SECP256R1,
                aws_lc_rs::kx_group::SECP384R1,
            ],
            KeyExchange::RequirePostQuantum => vec![aws_lc_rs::kx_group::X25519MLKEM768],
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
