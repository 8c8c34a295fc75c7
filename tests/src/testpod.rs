//! What the `mycel-testpod` clients print, shared by the binary (which writes it) and the
//! tests (which read it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch: the clock the test-pod binary stamps results with,
/// so a test can compare them with when it changed something.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One connection attempt (TCP) or request (UDP) of a client.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectResult {
    /// The peer address the socket reports (`getpeername()`, or for an unconnected UDP
    /// socket the source of the answer as `recvfrom()` reports it).
    pub peer: Option<String>,
    /// The socket's local address.
    pub local: Option<String>,
    /// The server's answer: its name.
    pub answer: Option<String>,
    /// What failed, as the `std::io::ErrorKind` name (`ConnectionRefused`, `TimedOut`, …),
    /// or a short description for a protocol problem.
    pub error: Option<String>,
    /// How long `connect()` took (TCP), or the whole request (UDP), in microseconds.
    pub connect_us: u64,
    /// When the attempt started, in microseconds since the Unix epoch.
    pub at_us: u64,
}

impl ConnectResult {
    /// The answer, or `error: <kind>`, for counting and messages.
    pub fn outcome(&self) -> String {
        match (&self.answer, &self.error) {
            (_, Some(e)) => format!("error: {e}"),
            (Some(a), None) => a.clone(),
            (None, None) => "no answer".to_owned(),
        }
    }
}

/// Everything a client printed: one JSON document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    /// One entry per attempt, in order.
    pub results: Vec<ConnectResult>,
}

impl ClientReport {
    /// How often each outcome ([`ConnectResult::outcome`]) occurred.
    pub fn outcomes(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in &self.results {
            *counts.entry(r.outcome()).or_insert(0) += 1;
        }
        counts
    }

    /// How often each server answered; panics, with a summary, if any attempt failed.
    pub fn answers_without_errors(&self, what: &str) -> BTreeMap<String, usize> {
        let failed: Vec<&ConnectResult> =
            self.results.iter().filter(|r| r.error.is_some()).collect();
        assert!(
            failed.is_empty() && !self.results.is_empty(),
            "{what}: expected {} successful attempts, {} failed; {}",
            self.results.len(),
            failed.len(),
            self.summary()
        );
        self.outcomes()
    }

    /// The distinct peer addresses the sockets reported.
    pub fn peers(&self) -> BTreeSet<String> {
        self.results.iter().filter_map(|r| r.peer.clone()).collect()
    }

    /// A one-paragraph summary for failure messages: outcomes, peers, first error, timing.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} attempts, outcomes {:?}, peers {:?}",
            self.results.len(),
            self.outcomes(),
            self.peers()
        );
        if let Some(first) = self.results.iter().find(|r| r.error.is_some()) {
            let _ = write!(s, ", first failure: {first:?}");
        }
        if let Some(max) = self.results.iter().map(|r| r.connect_us).max() {
            let _ = write!(s, ", slowest connect {max} µs");
        }
        s
    }
}

/// One line printed by `mycel-testpod tcp-hold`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldEvent {
    /// `connected`, `answer`, `error` or `done`.
    pub event: String,
    /// For `connected`: the peer address (`getpeername()`).
    pub peer: Option<String>,
    /// For `answer`: what the server answered.
    pub answer: Option<String>,
    /// For `error`: what failed.
    pub error: Option<String>,
    /// When, in microseconds since the Unix epoch.
    pub at_us: u64,
}

/// What `mycel-testpod raw-send` printed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawReport {
    /// Packets sent.
    pub sent: u32,
    /// TCP packets that arrived for the watched port, in order.
    pub tcp_replies: Vec<RawTcpReply>,
}

/// One TCP packet `raw-send` saw arrive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawTcpReply {
    /// Its source, `ip:port`.
    pub from: String,
    /// Its TCP flags byte.
    pub flags: u8,
}
