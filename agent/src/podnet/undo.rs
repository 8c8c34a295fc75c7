//! Undoing [`super::PodNet::prepare`] in network namespaces, without knowing which ones it
//! set up: `mycel uninstall` (no agent left, no state needed) and `--detach-on-exit` (the
//! agent's own workloads) both come here, and so does [`super::PodNet::cleanup`].
//!
//! The namespaces are found by scanning: every distinct network namespace of a running
//! process (`/proc/<pid>/ns/net`, or only the processes below a cgroup), plus those bind
//! mounted in `/run/netns` and `/var/run/netns` (how `ip netns` and some CNIs keep a
//! namespace that has no process). Duplicates (many processes share one namespace) are
//! dropped by the namespace's inode. The scanning process's own namespace (the node's) is
//! skipped: `prepare` never touches it.
//!
//! In each namespace, what mycel changed is undone where it is found:
//! - the reserved ports [`super::PROXY_PORTS`] in `net.ipv4.ip_local_reserved_ports`
//!   (entries of those single ports; ranges someone else wrote stay);
//! - `net.ipv4.tcp_fwmark_accept` back to 0, only where mycel's rule is found (otherwise
//!   the setting is someone else's);
//! - the `local default dev lo` routes of table [`super::TRANSPARENT_TABLE`], then the
//!   `fwmark` rules (IPv4 and IPv6). The rule goes last: it is the mark that the namespace
//!   was set up, so a removal cut short is finished by the next one.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use socket2::{Domain, Socket, Type};

use super::{FWMARK_ACCEPT_SYSCTL, PROXY_PORTS, RESERVED_PORTS_SYSCTL, rules, unreserve};

/// Where `ip netns` (and CNIs that keep namespaces of their own) bind mount namespaces.
pub const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Which namespaces [`undo_namespaces`] looks at.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only the namespaces of processes below this cgroup v2 directory; `None`: of every
    /// process (`/proc`).
    pub cgroup: Option<PathBuf>,
    /// Directories of bind-mounted namespace files (usually [`NETNS_DIRS`]).
    pub netns_dirs: Vec<PathBuf>,
    /// Only namespaces with one of these cookies (`SO_NETNS_COOKIE`): an agent undoing what
    /// it did for its own workloads. `None`: every namespace found.
    pub only_cookies: Option<BTreeSet<u64>>,
}

/// What was undone in one namespace, and what could not be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undone {
    /// One path of the namespace (a process's `/proc/<pid>/ns/net`, or a bind mount).
    pub netns: PathBuf,
    /// What was removed, in words (`IPv4 rule ...`, `net.ipv4.tcp_fwmark_accept=1`).
    pub removed: Vec<String>,
    /// Why the rest could not be removed.
    pub error: Option<String>,
}

/// A step of the undoing that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action}: {source}")]
pub struct UndoError {
    pub action: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn undo_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> UndoError {
    let action = action.into();
    move |e| UndoError {
        action,
        source: Box::new(e),
    }
}

/// Undoes mycel's changes in the calling thread's network namespace, adding what it removed
/// to `removed` (nothing when the namespace holds none of them). Blocks: run it on a thread
/// of its own that has entered the namespace (`/proc/sys/net` and netlink sockets belong
/// to the namespace of the thread that opens them).
pub(crate) fn undo_here(removed: &mut Vec<String>) -> Result<(), UndoError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(undo_error("build a runtime for netlink"))?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(undo_error("open a netlink socket"))?;
        let connection = tokio::spawn(connection);
        let outcome = async {
            let ours = rules::present(&handle).await.map_err(netlink_error)?;
            let list = fs::read_to_string(RESERVED_PORTS_SYSCTL)
                .map_err(undo_error(format!("read {RESERVED_PORTS_SYSCTL}")))?;
            if let Some(kept) = unreserve(list.trim(), &PROXY_PORTS) {
                // With a newline: the kernel ignores an empty write, which would leave the
                // last ports reserved.
                fs::write(RESERVED_PORTS_SYSCTL, format!("{kept}\n")).map_err(undo_error(
                    format!("write {kept:?} to {RESERVED_PORTS_SYSCTL}"),
                ))?;
                removed.push(format!(
                    "reserved ports {} (net.ipv4.ip_local_reserved_ports)",
                    PROXY_PORTS.map(|p| p.to_string()).join(", ")
                ));
            }
            if ours {
                let current = fs::read_to_string(FWMARK_ACCEPT_SYSCTL)
                    .map_err(undo_error(format!("read {FWMARK_ACCEPT_SYSCTL}")))?;
                if current.trim() != "0" {
                    fs::write(FWMARK_ACCEPT_SYSCTL, "0")
                        .map_err(undo_error(format!("write 0 to {FWMARK_ACCEPT_SYSCTL}")))?;
                    removed.push(format!(
                        "net.ipv4.tcp_fwmark_accept={} (now 0)",
                        current.trim()
                    ));
                }
            }
            rules::remove(&handle, removed).await.map_err(netlink_error)
        }
        .await;
        connection.abort();
        outcome
    })
}

fn netlink_error(failure: rules::Failure) -> UndoError {
    UndoError {
        action: failure.action,
        source: failure.source,
    }
}

/// The network namespaces of `scope` other than the caller's own, one path each, by
/// (device, inode). Fails only when the cgroup cannot be read; processes that exit while
/// the scan runs are skipped.
pub fn scan(scope: &Scope) -> Result<Vec<PathBuf>, String> {
    let own = fs::metadata("/proc/thread-self/ns/net")
        .map(|m| (m.dev(), m.ino()))
        .ok();
    let mut found: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut add = |path: PathBuf| {
        if let Ok(m) = fs::metadata(&path) {
            let id = (m.dev(), m.ino());
            if Some(id) != own {
                found.entry(id).or_insert(path);
            }
        }
    };
    let pids = match &scope.cgroup {
        Some(cgroup) => cgroup_pids(cgroup)?,
        None => fs::read_dir("/proc")
            .map_err(|e| format!("cannot list /proc: {e}"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .collect(),
    };
    for pid in pids {
        add(PathBuf::from(format!("/proc/{pid}/ns/net")));
    }
    for dir in &scope.netns_dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths {
            add(path);
        }
    }
    Ok(found.into_values().collect())
}

/// Process ids in `cgroup` and every cgroup below it.
fn cgroup_pids(cgroup: &Path) -> Result<BTreeSet<u32>, String> {
    let mut pids = BTreeSet::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = dir.join("cgroup.procs");
        match fs::read_to_string(&procs) {
            Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
            // A cgroup removed while the scan runs.
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != cgroup => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", procs.display())),
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(pids)
}

/// Undoes mycel's changes in every namespace of `scope` (see the module's documentation).
/// Returns the namespaces where something was removed or could not be; a namespace that
/// held nothing of mycel's is not listed. Blocks (one short-lived thread per namespace).
pub fn undo_namespaces(scope: &Scope) -> Result<Vec<Undone>, String> {
    let mut out = Vec::new();
    for path in scan(scope)? {
        let file = match File::open(&path) {
            Ok(f) => f,
            // The process exited since the scan: its namespace is gone, or held (and
            // found) by another path.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.push(Undone {
                    netns: path.clone(),
                    removed: Vec::new(),
                    error: Some(format!("cannot open the namespace: {e}")),
                });
                continue;
            }
        };
        if fstatfs(&file).map(|fs| fs.filesystem_type() != NSFS_MAGIC) != Ok(false) {
            // Not a namespace (a stray file in a netns directory).
            continue;
        }
        let only = scope.only_cookies.clone();
        let job = std::thread::Builder::new()
            .name("mycel-undo".to_owned())
            .spawn(move || -> Option<(Vec<String>, Option<String>)> {
                if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    return Some((
                        Vec::new(),
                        Some(format!(
                            "cannot enter the namespace: {e} (needs CAP_SYS_ADMIN)"
                        )),
                    ));
                }
                if let Some(only) = only {
                    let cookie = Socket::new(Domain::UNIX, Type::DGRAM, None)
                        .and_then(|s| crate::sys::netns_cookie(std::os::fd::AsFd::as_fd(&s)));
                    match cookie {
                        Ok(c) if only.contains(&c) => {}
                        _ => return None,
                    }
                }
                let mut removed = Vec::new();
                let error = undo_here(&mut removed).err().map(|e| e.to_string());
                Some((removed, error))
            });
        let outcome = match job {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Some((Vec::new(), Some("the undoing thread panicked".into())))),
            Err(e) => Some((Vec::new(), Some(format!("cannot start a thread: {e}")))),
        };
        if let Some((removed, error)) = outcome
            && (!removed.is_empty() || error.is_some())
        {
            out.push(Undone {
                netns: path,
                removed,
                error,
            });
        }
    }
    Ok(out)
}
