//! Looking inside a pod's network namespace.
//!
//! `setns()` moves only the calling thread, and a tokio worker thread must never be left
//! in another namespace: every socket a task opens afterwards would land there. So the
//! lookup runs on a dedicated OS thread that enters the pod's namespace, opens its own
//! netlink socket there (a socket belongs to the namespace it was created in), answers and
//! ends; the caller awaits its answer without blocking the runtime.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

use super::netlink::{self, Link};
use super::{Error, cgroup};

/// At most this many of a pod's processes are tried: one is enough when it is alive, and
/// a pod whose first processes all exited meanwhile is being torn down or restarted.
const MAX_PIDS_TRIED: usize = 16;

/// What the pod's side of its veth says about the other end.
#[derive(Debug)]
pub(crate) struct PodSide {
    /// The pod's interface holding its address.
    pub link: Link,
    /// Its peer's ifindex, in this (the caller's) namespace.
    pub peer_index: u32,
}

/// Opens the network namespace of a process in `cgroup` (or its sub-cgroups). `None` when
/// the pod has no process (yet) or only processes in the caller's own namespace
/// `own_netns` (a host-network pod has no interface of its own).
pub(crate) fn open_pod_netns(
    ip: IpAddr,
    cgroup: &Path,
    own_netns: &File,
) -> Result<Option<(PathBuf, File)>, Error> {
    let pids = cgroup::pids(cgroup).map_err(|(path, source)| Error::Cgroup { ip, path, source })?;
    let own = own_netns.metadata().map_err(|source| Error::Namespace {
        path: PathBuf::from(super::OWN_NETNS),
        source,
    })?;
    for pid in pids.into_iter().take(MAX_PIDS_TRIED) {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let file = match File::open(&path) {
            Ok(file) => file,
            // The process exited between reading the cgroup and opening its namespace.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue;
            }
            Err(source) => return Err(Error::Namespace { path, source }),
        };
        let meta = file.metadata().map_err(|source| Error::Namespace {
            path: path.clone(),
            source,
        })?;
        if meta.dev() == own.dev() && meta.ino() == own.ino() {
            continue;
        }
        return Ok(Some((path, file)));
    }
    Ok(None)
}

/// Inside the pod's namespace `pod_netns` (opened from `path`): the veth (or netkit)
/// interface holding `ip`, if its peer is in the caller's namespace `own_netns`.
pub(crate) async fn look_inside(
    ip: IpAddr,
    path: PathBuf,
    pod_netns: File,
    own_netns: File,
) -> Result<Option<PodSide>, Error> {
    let (answer, result) = tokio::sync::oneshot::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("mycel-podns".to_owned())
        .spawn(move || {
            // The receiver may be gone (the caller was cancelled); nothing to do then.
            let _ = answer.send(in_pod_namespace(ip, &thread_path, &pod_netns, &own_netns));
        })
        .map_err(|e| Error::PodThread {
            ip,
            path: path.clone(),
            reason: format!("cannot start a thread: {e}"),
        })?;
    result.await.map_err(|_| Error::PodThread {
        ip,
        path,
        reason: "its thread ended without an answer".to_owned(),
    })?
}

/// Runs on the dedicated thread: enters the namespace (for good: the thread ends after)
/// and asks it over a netlink socket of its own.
fn in_pod_namespace(
    ip: IpAddr,
    path: &Path,
    pod_netns: &File,
    own_netns: &File,
) -> Result<Option<PodSide>, Error> {
    setns(pod_netns, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
        ip,
        path: path.to_path_buf(),
        source,
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| Error::PodThread {
            ip,
            path: path.to_path_buf(),
            reason: format!("cannot build a runtime: {e}"),
        })?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        let connection = tokio::spawn(connection);
        let answer = pod_side(ip, path, &handle, own_netns).await;
        connection.abort();
        answer
    })
}

async fn pod_side(
    ip: IpAddr,
    path: &Path,
    handle: &rtnetlink::Handle,
    own_netns: &File,
) -> Result<Option<PodSide>, Error> {
    let netlink = |context: String| {
        let path = path.display().to_string();
        move |source| Error::Netlink {
            ip,
            context: format!("in namespace {path}: {context}"),
            source,
        }
    };
    let Some(index) = netlink::interface_with_address(handle, ip)
        .await
        .map_err(netlink("reading addresses".to_owned()))?
    else {
        return Ok(None);
    };
    let Some(link) = netlink::link_by_index(handle, index)
        .await
        .map_err(netlink(format!("reading ifindex {index}")))?
    else {
        return Ok(None);
    };
    // A veth without IFLA_LINK_NETNSID has its peer in the pod's own namespace: not a
    // link to the node.
    let (Some(peer_index), Some(peer_netnsid)) = (link.peer_index, link.peer_netnsid) else {
        return Ok(None);
    };
    if !link.is_pod_pair() {
        return Ok(None);
    }
    // The peer's namespace must be ours: compare the id the pod's namespace gives it with
    // the id it gives ours.
    let own_id = netlink::netnsid_of(handle, own_netns)
        .await
        .map_err(netlink(format!(
            "reading the id of the node's namespace for the peer of {}",
            link.describe()
        )))?;
    if own_id != Some(peer_netnsid) {
        return Ok(None);
    }
    Ok(Some(PodSide { link, peer_index }))
}
