//! The open inbound tunnels, so that a policy change can judge them again.
//!
//! A tunnel is authorized when its CONNECT arrives; policy can change while it is open
//! (a new DENY, an ALLOW removed, the destination leaving the mesh). The kernel re-judges
//! plaintext flows on their next packet; tunnels are invisible to it, so the proxy keeps
//! each open tunnel's facts here and, after every change of the inputs, asks the
//! [`Authorizer`](super::Authorizer) again and closes the tunnels it now refuses.
//!
//! A tunnel registers *before* its first authorization: a change that lands between the
//! check and the registration would otherwise be missed by both.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

/// What a tunnel was authorized on.
#[derive(Clone, Debug)]
struct Open {
    /// The peer's proven identity (SPIFFE URI).
    peer: Arc<str>,
    peer_ip: IpAddr,
    dst: SocketAddr,
    /// Notified (once, the permit is kept) when the tunnel must close.
    close: Arc<Notify>,
}

/// The open tunnels of every inbound listener of the node.
#[derive(Debug, Default)]
pub struct Tunnels {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

/// A registered tunnel; unregisters when dropped.
#[derive(Debug)]
pub(crate) struct Registration<'a> {
    tunnels: &'a Tunnels,
    id: u64,
    close: Arc<Notify>,
}

impl Registration<'_> {
    /// Completes when a re-judgement refused the tunnel.
    pub(crate) async fn revoked(&self) {
        self.close.notified().await;
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.tunnels.lock().remove(&self.id);
    }
}

impl Tunnels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a tunnel of `peer` (from `peer_ip`) to `dst`.
    pub(crate) fn register(
        &self,
        peer: Arc<str>,
        peer_ip: IpAddr,
        dst: SocketAddr,
    ) -> Registration<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.lock().insert(
            id,
            Open {
                peer,
                peer_ip,
                dst,
                close: close.clone(),
            },
        );
        Registration {
            tunnels: self,
            id,
            close,
        }
    }

    /// Number of open tunnels.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no tunnel is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks `judge` about every open tunnel and closes those it refuses; returns the
    /// refused ones with the reason, for the log.
    pub(crate) fn rejudge(
        &self,
        judge: impl Fn(&str, IpAddr, SocketAddr) -> Result<(), String>,
    ) -> Vec<Revoked> {
        // Judge on a copy: the judge takes the inputs' lock, and tunnels must be able to
        // register and leave meanwhile.
        let open: Vec<Open> = self.lock().values().cloned().collect();
        let mut revoked = Vec::new();
        for o in open {
            if let Err(reason) = judge(&o.peer, o.peer_ip, o.dst) {
                o.close.notify_one();
                revoked.push(Revoked {
                    peer: o.peer,
                    peer_ip: o.peer_ip,
                    dst: o.dst,
                    reason,
                });
            }
        }
        revoked
    }
}

/// A tunnel a re-judgement closed.
#[derive(Debug)]
pub(crate) struct Revoked {
    pub peer: Arc<str>,
    pub peer_ip: IpAddr,
    pub dst: SocketAddr,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn dst() -> SocketAddr {
        "10.0.0.2:80".parse().expect("address")
    }

    #[tokio::test]
    async fn refused_tunnels_are_told_and_allowed_ones_are_not() {
        let tunnels = Tunnels::default();
        let ip: IpAddr = "10.0.0.1".parse().expect("address");
        let good = tunnels.register("spiffe://td/ns/a/sa/good".into(), ip, dst());
        let bad = tunnels.register("spiffe://td/ns/a/sa/bad".into(), ip, dst());
        assert_eq!(tunnels.len(), 2);
        let revoked = tunnels.rejudge(|peer, _, _| {
            if peer.ends_with("/bad") {
                Err("denied".into())
            } else {
                Ok(())
            }
        });
        assert_eq!(revoked.len(), 1);
        assert_eq!(&*revoked[0].peer, "spiffe://td/ns/a/sa/bad");
        // The notification is kept until the tunnel looks: no lost wake-up.
        tokio::time::timeout(Duration::from_secs(1), bad.revoked())
            .await
            .expect("the refused tunnel is told");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), good.revoked())
                .await
                .is_err(),
            "the allowed tunnel is left alone"
        );
        drop(bad);
        assert_eq!(tunnels.len(), 1, "a closed tunnel unregisters");
        drop(good);
        assert!(tunnels.is_empty());
    }
}
