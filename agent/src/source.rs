//! Where desired state comes from.
//!
//! A source turns objects in the Kubernetes format into [`state`](crate::state) resources
//! and hands them over as batches ([`SourceEvent::Update`]): a directory of YAML files
//! ([`file`]) or the Kubernetes API ([`k8s`]). Both use [`translate`], the one place each
//! kind is translated and validated, so they behave alike.
//!
//! A source never stops on bad input: it reports the problem ([`SourceEvent::Error`]) and
//! keeps what it last accepted.

use std::{fmt, io, path::PathBuf};

use crate::state::{self, Kind, Origin, ResourceKey};

pub mod file;
pub mod k8s;
mod saved;
pub mod translate;

/// What a source sends to the agent.
#[derive(Debug)]
pub enum SourceEvent {
    /// A batch of changes to apply to the model.
    Update(state::Update),
    /// A problem in the input, reported once; the source keeps what it last accepted.
    Error(Error),
    /// How many inputs (files) are rejected now, their last good contents in force; sent
    /// when the number changes.
    Rejected(usize),
}

/// Where in a source an object or a problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file, or `kubernetes`.
    pub origin: Origin,
    /// 1-based index of the YAML document in a multi-document file.
    pub document: Option<u32>,
    /// 1-based line and column, when known.
    pub line: Option<(u32, u32)>,
}

impl Location {
    /// A location that is just an origin.
    pub fn new(origin: Origin) -> Self {
        Location {
            origin,
            document: None,
            line: None,
        }
    }
}

/// `services.yaml:12:7 (document 2)`.
impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some((line, column)) = self.line {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(document) = self.document {
            write!(f, " (document {document})")?;
        }
        Ok(())
    }
}

/// The kinds a source understands, for error messages.
pub const SUPPORTED_KINDS: &str = "v1 Service, discovery.k8s.io/v1 EndpointSlice, \
                                   mycel.dev/v1alpha1 Workload, \
                                   mycel.dev/v1alpha1 AuthorizationPolicy";

/// A problem with a source or its input.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// The source directory does not exist.
    #[error("source directory {0} does not exist: create it or configure another")]
    NoDirectory(PathBuf),
    /// The source path exists but is not a directory.
    #[error("source path {0} is not a directory")]
    NotADirectory(PathBuf),
    /// A file or directory could not be read; what was accepted from it before is kept.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Watching the directory failed.
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    /// The Kubernetes API could not be used (configuration, connection, a watch); the
    /// source keeps what it has and retries.
    #[error("Kubernetes API ({what}): {message}")]
    Api { what: &'static str, message: String },
    /// The source's worker thread could not be started.
    #[error("cannot start the file source's thread: {0}")]
    Thread(#[source] io::Error),
    /// The file is not valid YAML (or JSON); nothing from it is accepted.
    #[error("{location}: {message}")]
    Syntax { location: Location, message: String },
    /// A document is not an object with `apiVersion` and `kind`.
    #[error("{location}: expected an object with apiVersion and kind, found {found}")]
    NotAnObject {
        location: Location,
        found: &'static str,
    },
    /// A document's `apiVersion` and `kind` are not a kind this source reads.
    #[error(
        "{location}: unknown kind {} {} (supported: {SUPPORTED_KINDS})",
        quoted(api_version),
        quoted(kind)
    )]
    UnknownKind {
        location: Location,
        api_version: Option<String>,
        kind: Option<String>,
    },
    /// A field has the wrong type or shape for its kind.
    #[error("{location}: {kind} {object}: {field}: {message}")]
    Decode {
        location: Location,
        kind: Kind,
        /// `namespace/name`, or `(unnamed)`.
        object: String,
        /// Path of the field, such as `spec.ports[0].port`.
        field: String,
        message: String,
    },
    /// A field has a value mycel cannot use.
    #[error("{location}: {kind} {object}: {field}: {problem}")]
    Invalid {
        location: Location,
        kind: Kind,
        /// `namespace/name`, or `(unnamed)`.
        object: String,
        /// Path of the field, such as `spec.ports[0].port`.
        field: String,
        /// Boxed to keep [`Error`] small.
        problem: Box<Problem>,
    },
    /// The same object appears twice in one file.
    #[error("{location}: {key} is also defined in document {first} of this file; remove one")]
    DuplicateInFile {
        location: Location,
        key: ResourceKey,
        first: usize,
    },
    /// The same object is defined in two files; the one seen first is used.
    #[error(
        "{location}: {key} is already defined in {owner}; this definition is ignored while \
         that one exists"
    )]
    Duplicate {
        location: Location,
        key: ResourceKey,
        owner: Origin,
    },
}

// Errors travel in `Result`s: keep them small (clippy's `result_large_err`).
const _: () = assert!(std::mem::size_of::<Error>() <= 128);

/// What is wrong with a field's value.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    #[error("missing")]
    Missing,
    #[error("must not be empty")]
    Empty,
    #[error("{0} is out of range 1-65535")]
    PortOutOfRange(i64),
    #[error("{0:?} is not an IP address")]
    NotAnIp(String),
    #[error("{address:?} is not an {family} address, as addressType says")]
    WrongFamily {
        address: String,
        family: &'static str,
    },
    #[error("{cluster_ips:?} does not start with spec.clusterIP {cluster_ip:?}")]
    ClusterIpMismatch {
        cluster_ip: String,
        cluster_ips: Vec<String>,
    },
    #[error("{0:?}: expected one address, or one IPv4 and one IPv6 address")]
    ClusterIpFamilies(Vec<String>),
    #[error("protocol {0} is not supported (only TCP and UDP are)")]
    UnsupportedProtocol(String),
    #[error("{0} is not supported (only IPv4 and IPv6 are)")]
    UnsupportedAddressType(String),
    #[error("{0:?} is not supported (only None and ClientIP are)")]
    UnsupportedSessionAffinity(String),
    #[error("required when there is more than one port")]
    NameRequired,
    #[error("same as {0}")]
    Duplicate(String),
    #[error("{0:?} is longer than {1} characters")]
    TooLong(String, usize),
    #[error("{0:?} is not a port number (1-65535)")]
    NotAPort(String),
    /// The message names the value.
    #[error("{0}")]
    BadCidr(String),
    /// The message names the value and what is allowed.
    #[error("{0}")]
    BadLabel(String),
    #[error("{0} is not supported (only ALLOW and DENY are)")]
    UnsupportedAction(String),
    #[error("{0:?} is not an action (ALLOW or DENY)")]
    UnknownAction(String),
    #[error("{value:?}: {reason}")]
    BadPattern { value: String, reason: &'static str },
}

fn quoted(value: &Option<String>) -> String {
    match value {
        Some(value) => format!("{value:?}"),
        None => "(none)".to_owned(),
    }
}
