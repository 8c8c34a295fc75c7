//! Finding a pod's host-side interface and cgroup on a node.
//!
//! In Kubernetes mode the API tells the agent which pods run on its node and their IPs,
//! but not where they are on the node: the TC programs attach to the host side of each
//! pod's interface, and the socket programs to each pod's cgroup. This module finds both,
//! alongside whatever CNI wired the pod, as long as it gives each pod a veth (or netkit)
//! pair:
//!
//! 1. **Route** — point-to-point routed CNIs (Calico, kindnet, Cilium-like) install a /32
//!    (or /128) route to the pod's IP through its host-side veth, so `ip route get` names
//!    it.
//! 2. **Bridge forwarding table** — bridge CNIs (flannel's `cni0`, the `bridge` plugin)
//!    route the pod's subnet to a bridge; the neighbour table gives the pod's MAC and
//!    the bridge's forwarding table the port that MAC was learned on.
//! 3. **Pod namespace** — when neither knows the pod yet (the node never talked to it),
//!    enter the pod's own network namespace through a process in its cgroup, find the
//!    interface holding the pod's IP and follow its veth peer back to this namespace.
//!
//! [`pod_cgroup`] finds the pod's cgroup directory from its UID.

mod cgroup;
mod netlink;
mod podns;

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rtnetlink::Handle;
use rtnetlink::packet_route::link::InfoKind;
use tokio::task::JoinHandle;

pub use self::cgroup::pod_cgroup;
use self::netlink::Link;

/// This thread's network namespace. A thread's own (`thread-self`), not the process's
/// (`self`): the two differ when the runtime runs on a thread that entered another
/// namespace, as tests do.
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// The network namespace of a pod known only by its cgroup: `/proc/<pid>/ns/net` of one of
/// its processes (not in the agent's own namespace). `None` while it has none.
pub fn pod_netns_path(ip: IpAddr, cgroup: &Path) -> Result<Option<PathBuf>, Error> {
    let own = File::open(OWN_NETNS).map_err(|source| Error::Namespace {
        path: PathBuf::from(OWN_NETNS),
        source,
    })?;
    Ok(podns::open_pod_netns(ip, cgroup, &own)?.map(|(path, _)| path))
}

/// How a pod's host-side interface was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// The route to the pod's IP leaves through it (routed CNIs).
    Route,
    /// The route leads to a bridge, and the bridge learned the pod's MAC on it.
    BridgeFdb,
    /// Found from inside the pod's network namespace, through its veth's peer.
    PodNamespace,
}

/// A pod's host-side network interface, in the namespace the [`Discovery`] was made in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    /// Its ifindex (what TC programs attach by).
    pub ifindex: u32,
    /// Its name, for logs and status.
    pub name: String,
    /// How it was found.
    pub method: Method,
}

/// Errors of discovery. A pod that is not (yet) on the node is not an error: the lookups
/// answer `Ok(None)` for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// [`Discovery::new`] was called outside a tokio runtime.
    #[error("pod discovery must be created inside a tokio runtime")]
    NoRuntime,
    /// The rtnetlink socket could not be opened.
    #[error("cannot open a netlink route socket: {0}")]
    Connect(#[source] io::Error),
    /// A network namespace file could not be opened or read.
    #[error("cannot open network namespace {path}: {source}")]
    Namespace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A netlink request failed (not merely "not found").
    #[error("pod {ip}: {context}: {source}")]
    Netlink {
        ip: IpAddr,
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// The pod's cgroup exists but could not be read.
    #[error("pod {ip}: cannot read {path} to find one of its processes: {source}")]
    Cgroup {
        ip: IpAddr,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `setns()` into the pod's network namespace was refused.
    #[error(
        "pod {ip}: cannot enter its network namespace {path}: {source} (the agent needs \
         CAP_SYS_ADMIN and the host's PID namespace)"
    )]
    Enter {
        ip: IpAddr,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The thread that looks inside the pod's namespace could not run or answer.
    #[error("pod {ip}: looking inside its network namespace {path} failed: {reason}")]
    PodThread {
        ip: IpAddr,
        path: PathBuf,
        reason: String,
    },
}

/// Finds pods' host-side interfaces in the network namespace it was created in.
///
/// It owns one rtnetlink connection (a task on the runtime it was created in, stopped
/// when the `Discovery` is dropped); lookups may run concurrently.
#[derive(Debug)]
pub struct Discovery {
    handle: Handle,
    connection: JoinHandle<()>,
    /// This namespace, to recognise it from inside a pod's (netlink namespace ids are
    /// relative to the namespace asking).
    own_netns: File,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Discovery {
    /// Opens a netlink connection in the calling thread's network namespace. Must be
    /// called inside a tokio runtime, which then drives the connection.
    pub fn new() -> Result<Discovery, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let own_netns = File::open(OWN_NETNS).map_err(|source| Error::Namespace {
            path: PathBuf::from(OWN_NETNS),
            source,
        })?;
        // The socket belongs to the namespace of the thread creating it, whichever thread
        // later drives it.
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        let connection = runtime.spawn(connection);
        Ok(Discovery {
            handle,
            connection,
            own_netns,
        })
    }

    /// The host-side interface of the pod with address `ip`, or `None` when the pod is not
    /// (yet) wired up on this node. `pod_cgroup` (see [`pod_cgroup`]) lets it look inside
    /// the pod when routes and bridge tables do not know the pod yet; without it such a
    /// pod is `None` until they do.
    pub async fn host_interface(
        &self,
        ip: IpAddr,
        pod_cgroup: Option<&Path>,
    ) -> Result<Option<PodInterface>, Error> {
        if let Some(found) = self.by_route(ip).await? {
            return Ok(Some(found));
        }
        match pod_cgroup {
            Some(cgroup) => self.by_pod_namespace(ip, cgroup).await,
            None => Ok(None),
        }
    }

    /// Steps 1 and 2: the route to `ip`, and the bridge port behind it if it is a bridge.
    async fn by_route(&self, ip: IpAddr) -> Result<Option<PodInterface>, Error> {
        let netlink = |context: String| {
            move |source| Error::Netlink {
                ip,
                context,
                source,
            }
        };
        let Some(route) = netlink::route_get(&self.handle, ip)
            .await
            .map_err(netlink("route lookup".to_owned()))?
        else {
            return Ok(None);
        };
        if route.via_gateway {
            return Ok(None);
        }
        let Some(oif) = netlink::link_by_index(&self.handle, route.oif)
            .await
            .map_err(netlink(format!(
                "reading route interface ifindex {}",
                route.oif
            )))?
        else {
            return Ok(None);
        };
        if oif.is_pod_pair() {
            return Ok(Some(found(oif, Method::Route)));
        }
        if oif.kind != Some(InfoKind::Bridge) {
            // The route leaves through something else (a tunnel, an uplink, the CNI's own
            // gateway device): not a pod's interface, but the pod may still be local.
            return Ok(None);
        }
        let Some(mac) = netlink::neighbour_mac(&self.handle, oif.index, ip)
            .await
            .map_err(netlink(format!(
                "reading the neighbour table of bridge {}",
                oif.describe()
            )))?
        else {
            return Ok(None);
        };
        let ports = netlink::fdb_ports(&self.handle, oif.index, &mac)
            .await
            .map_err(netlink(format!(
                "reading the forwarding table of bridge {}",
                oif.describe()
            )))?;
        for port in ports {
            let Some(link) = netlink::link_by_index(&self.handle, port)
                .await
                .map_err(netlink(format!(
                    "reading port ifindex {port} of bridge {}",
                    oif.describe()
                )))?
            else {
                continue;
            };
            // The MAC may also be learned on an uplink (the address is on another host
            // of the same segment): only a pod pair is the pod's.
            if link.is_pod_pair() {
                return Ok(Some(found(link, Method::BridgeFdb)));
            }
        }
        Ok(None)
    }

    /// Step 3: through a process of the pod into its network namespace, and back along its
    /// veth to this one.
    async fn by_pod_namespace(
        &self,
        ip: IpAddr,
        cgroup: &Path,
    ) -> Result<Option<PodInterface>, Error> {
        let Some((ns_path, pod_netns)) = podns::open_pod_netns(ip, cgroup, &self.own_netns)? else {
            return Ok(None);
        };
        let own = self
            .own_netns
            .try_clone()
            .map_err(|source| Error::Namespace {
                path: PathBuf::from(OWN_NETNS),
                source,
            })?;
        let pod_netns_copy = pod_netns.try_clone().map_err(|source| Error::Namespace {
            path: ns_path.clone(),
            source,
        })?;
        let Some(pod_side) = podns::look_inside(ip, ns_path.clone(), pod_netns_copy, own).await?
        else {
            return Ok(None);
        };
        let netlink = |context: String| {
            move |source| Error::Netlink {
                ip,
                context,
                source,
            }
        };
        let Some(peer) = netlink::link_by_index(&self.handle, pod_side.peer_index)
            .await
            .map_err(netlink(format!(
                "reading ifindex {}, the peer of the pod's {}",
                pod_side.peer_index,
                pod_side.link.describe()
            )))?
        else {
            return Ok(None);
        };
        // Ifindexes are per namespace: confirm that this really is the other end, seen
        // from here (it points back to the pod's interface, in the pod's namespace).
        let pod_nsid = netlink::netnsid_of(&self.handle, &pod_netns)
            .await
            .map_err(netlink(format!(
                "reading the id of namespace {}",
                ns_path.display()
            )))?;
        let points_back = peer.is_pod_pair()
            && peer.peer_index == Some(pod_side.link.index)
            && pod_nsid.is_some()
            && peer.peer_netnsid == pod_nsid;
        Ok(points_back.then(|| found(peer, Method::PodNamespace)))
    }
}

fn found(link: Link, method: Method) -> PodInterface {
    PodInterface {
        ifindex: link.index,
        name: link.name,
        method,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn needs_a_runtime() {
        assert!(matches!(Discovery::new(), Err(Error::NoRuntime)));
    }

    /// Lookups run as tasks of a multi-threaded runtime (their futures are `Send`), and an
    /// address of this namespace itself is no pod's. Needs no privilege: reading routes
    /// and links is open to everyone.
    #[test]
    fn own_loopback_address_is_no_pod() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let answer = runtime.block_on(async {
            let discovery = Arc::new(Discovery::new().expect("discovery"));
            let task = tokio::spawn(async move {
                discovery
                    .host_interface(IpAddr::V4(Ipv4Addr::LOCALHOST), None)
                    .await
            });
            task.await.expect("lookup task")
        });
        assert_eq!(answer.expect("lookup"), None);
    }
}
