//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The parser follows the SPIFFE ID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>) and then requires
//! the Kubernetes form Istio uses. Its input comes from peers' certificates, so it never
//! panics and rejects anything the specification does not allow instead of normalising it.

use std::{fmt, str::FromStr};

use serde::{Serialize, Serializer};

use super::Error;
use crate::state::identity::{principal, spiffe_id};

/// The scheme, always lowercase (the specification does not allow `SPIFFE://`).
const SCHEME: &str = "spiffe://";
/// Longest SPIFFE ID the specification allows, in bytes.
const MAX_ID_LEN: usize = 2048;
/// Longest trust domain the specification allows, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The identity of the workloads of one Kubernetes service account.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// The identity of `service_account` in `namespace`, checked as [`SpiffeId::parse`]
    /// checks a URI.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        let id = SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        // One code path for validation: whatever `new` accepts, `parse` of its URI accepts.
        SpiffeId::parse(&id.to_string())
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(input: &str) -> Result<Self, Error> {
        let invalid = |reason: &'static str| Error::InvalidSpiffeId {
            input: shorten(input),
            reason,
        };
        if input.len() > MAX_ID_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("the scheme must be `spiffe://`"))?;
        if rest.contains('?') {
            return Err(invalid("a query is not allowed"));
        }
        if rest.contains('#') {
            return Err(invalid("a fragment is not allowed"));
        }
        if rest.contains('%') {
            return Err(invalid("percent-encoding is not allowed"));
        }
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if trust_domain.is_empty() {
            return Err(invalid("the trust domain is empty"));
        }
        if trust_domain.contains('@') {
            return Err(invalid("user info is not allowed"));
        }
        if trust_domain.contains(':') {
            return Err(invalid("a port is not allowed"));
        }
        if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(invalid("the trust domain is longer than 255 bytes"));
        }
        if !trust_domain.bytes().all(is_trust_domain_byte) {
            return Err(invalid(
                "the trust domain may hold only lowercase letters, digits, `.`, `-` and `_`",
            ));
        }
        if path.is_empty() {
            return Err(invalid(
                "the path is empty (expected /ns/<namespace>/sa/<service-account>)",
            ));
        }
        let segments: Vec<&str> = path.split('/').collect();
        for segment in &segments {
            if segment.is_empty() {
                return Err(invalid("a path segment is empty"));
            }
            if *segment == "." || *segment == ".." {
                return Err(invalid("`.` and `..` are not allowed as path segments"));
            }
            if !segment.bytes().all(is_path_byte) {
                return Err(invalid(
                    "path segments may hold only letters, digits, `.`, `-` and `_`",
                ));
            }
        }
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => Ok(SpiffeId {
                trust_domain: trust_domain.to_owned(),
                namespace: (*namespace).to_owned(),
                service_account: (*service_account).to_owned(),
            }),
            _ => Err(invalid(
                "the path must be /ns/<namespace>/sa/<service-account>",
            )),
        }
    }

    /// The trust domain, such as `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The ID without `spiffe://`, as policies name peers (`cluster.local/ns/x/sa/y`).
    pub fn principal(&self) -> String {
        principal(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&spiffe_id(
            &self.trust_domain,
            &self.namespace,
            &self.service_account,
        ))
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Checks a trust domain name on its own (configuration, not a peer's ID).
pub(crate) fn check_trust_domain(trust_domain: &str) -> Result<(), Error> {
    SpiffeId::parse(&format!("{SCHEME}{trust_domain}/ns/n/sa/s")).map(|_| ())
}

fn is_trust_domain_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// At most 256 characters of a rejected input, so that a hostile peer cannot fill the log.
fn shorten(input: &str) -> String {
    const KEEP: usize = 256;
    if input.chars().count() <= KEEP {
        input.to_owned()
    } else {
        let mut s: String = input.chars().take(KEEP).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_kubernetes_form() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/sleep")
            .expect("a valid ID parses");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(
            SpiffeId::new("cluster.local", "default", "sleep").expect("valid parts"),
            id
        );
        assert_eq!(
            serde_json::to_string(&id).expect("serialises"),
            "\"spiffe://cluster.local/ns/default/sa/sleep\""
        );
    }

    #[test]
    fn accepts_and_rejects_a_table_of_inputs() {
        let accepted = [
            "spiffe://cluster.local/ns/default/sa/sleep",
            "spiffe://example.org/ns/a-b/sa/c_d",
            "spiffe://td/ns/N.1/sa/S-2",
            "spiffe://my_domain-1.example/ns/x/sa/Y",
        ];
        for input in accepted {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.to_string(), input, "round trip of {input}");
        }
        let long_segment = "a".repeat(MAX_ID_LEN);
        let long_domain = format!("spiffe://{}/ns/a/sa/b", "d".repeat(256));
        let too_long = format!("spiffe://td/ns/{long_segment}/sa/b");
        let rejected: Vec<(&str, &str)> = vec![
            ("", "scheme"),
            ("cluster.local/ns/a/sa/b", "scheme"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "scheme"),
            ("https://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe:/cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://", "trust domain is empty"),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            ("spiffe://Cluster.local/ns/a/sa/b", "trust domain may hold"),
            ("spiffe://cluster.local:8080/ns/a/sa/b", "port"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "user info"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
            ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
            ("spiffe://cluster.local/ns/a%20b/sa/b", "percent"),
            ("spiffe://cluster.local", "path is empty"),
            ("spiffe://cluster.local/", "path is empty"),
            ("spiffe://cluster.local/ns//sa/b", "segment is empty"),
            ("spiffe://cluster.local/ns/a/sa/b/", "segment is empty"),
            ("spiffe://cluster.local/ns/a/sa/", "segment is empty"),
            ("spiffe://cluster.local/ns/../sa/b", "`.` and `..`"),
            ("spiffe://cluster.local/ns/./sa/b", "`.` and `..`"),
            (
                "spiffe://cluster.local/ns/a b/sa/b",
                "path segments may hold",
            ),
            ("spiffe://cluster.local/ns/ä/sa/b", "path segments may hold"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "/ns/<namespace>"),
            ("spiffe://cluster.local/sa/b/ns/a", "/ns/<namespace>"),
            ("spiffe://cluster.local/workload", "/ns/<namespace>"),
            ("spiffe://cluster.ločal/ns/a/sa/b", "trust domain may hold"),
            (&long_domain, "longer than 255"),
            (&too_long, "longer than 2048"),
        ];
        for (input, why) in rejected {
            match SpiffeId::parse(input) {
                Ok(id) => panic!("{input:?} was accepted as {id}"),
                Err(e) => assert!(
                    e.to_string().contains(why),
                    "{input:?} was rejected for the wrong reason: {e}"
                ),
            }
        }
    }

    #[test]
    fn error_messages_stay_short_for_long_input() {
        let input = format!("spiffe://td/ns/{}", "é".repeat(1000));
        let e = SpiffeId::parse(&input).expect_err("invalid");
        assert!(e.to_string().chars().count() < 600, "{e}");
    }

    #[test]
    fn trust_domain_check() {
        check_trust_domain("cluster.local").expect("valid");
        check_trust_domain("bad/domain").expect_err("slash");
        check_trust_domain("").expect_err("empty");
    }
}
