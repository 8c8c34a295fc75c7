//! Per-source bounds on unauthenticated work: TLS handshakes of inbound HBONE connections.
//!
//! A handshake is the expensive part a client can start without proving anything. The
//! node-wide bound ([`Config::max_handshakes`](super::Config::max_handshakes)) keeps memory
//! bounded; on its own it lets one client hold every slot with connections that never
//! speak (a slowloris of handshakes) and so delay everybody else's tunnels. This bound is
//! per source address and shared by the listeners of every workload of the node: one
//! source holds at most [`Config::max_handshakes_per_source`](super::Config) slots, and the
//! connections beyond are closed at once.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Handshakes in progress by source address.
#[derive(Debug)]
pub struct HandshakeLimiter {
    per_source: usize,
    in_progress: Mutex<HashMap<IpAddr, usize>>,
}

/// A handshake slot of one source; released when dropped.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    limiter: Arc<HandshakeLimiter>,
    source: IpAddr,
}

impl HandshakeLimiter {
    /// At most `per_source` handshakes at once from one address (at least one).
    pub fn new(per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            per_source: per_source.max(1),
            in_progress: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.in_progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a handshake from `source`; `None` when that source is at its bound.
    pub(crate) fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<SourceSlot> {
        let mut map = self.lock();
        let n = map.entry(source).or_insert(0);
        if *n >= self.per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            limiter: self.clone(),
            source,
        })
    }

    /// Handshakes in progress from `source`.
    pub fn in_progress(&self, source: IpAddr) -> usize {
        self.lock().get(&source).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.limiter.lock();
        if let Some(n) = map.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Entries exist only for sources with a handshake in progress: the map
                // cannot grow with the number of addresses that ever connected.
                map.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_cannot_take_more_than_its_share() {
        let limiter = HandshakeLimiter::new(2);
        let a: IpAddr = "10.0.0.1".parse().expect("address");
        let b: IpAddr = "10.0.0.2".parse().expect("address");
        let first = limiter.try_acquire(a).expect("first");
        let second = limiter.try_acquire(a).expect("second");
        assert!(
            limiter.try_acquire(a).is_none(),
            "third from the same source"
        );
        let other = limiter
            .try_acquire(b)
            .expect("another source is unaffected");
        drop(first);
        let again = limiter.try_acquire(a).expect("a released slot is reusable");
        drop((second, again, other));
        assert_eq!(limiter.in_progress(a), 0);
        assert!(
            limiter.lock().is_empty(),
            "no entry is kept for idle sources"
        );
    }
}
