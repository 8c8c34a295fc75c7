//! The node proxy's sockets inside an enrolled workload's network namespace.
//!
//! The proxy runs in the node's network namespace but serves each enrolled local workload
//! from inside the workload's own namespace (as Istio ambient's ztunnel does in its
//! "in-pod" mode):
//! - it listens on the workload's address there: port 15001, where the kernel sends the
//!   workload's outgoing mesh connections, and port 15008, where other proxies open HBONE
//!   tunnels to it ([`PodNet::listen`]);
//! - it opens the workload's outgoing HBONE connections from there, so they leave with the
//!   workload's address as source ([`PodNet::socket`]);
//! - it connects to the workload's application from there with the *client's* address as
//!   source, so the application sees who really called ([`PodNet::transparent_socket`],
//!   which needs [`PodNet::prepare`] once per namespace).
//!
//! A socket belongs to the network namespace it was created in, whichever thread uses it
//! later. `setns()` moves only the calling thread, and a tokio worker must never be left in
//! another namespace (every socket its tasks open afterwards would land there). So sockets
//! are made on a helper thread that enters the namespace for each of them and then returns
//! to the agent's (one long-lived thread: starting one per socket would cost far more than
//! making the socket); the socket comes back to the runtime as an ordinary
//! tokio socket. [`PodNet::prepare`] and [`PodNet::cleanup`], which wait on netlink, run on
//! a thread of their own that enters the namespace and ends. Every method is `async` and
//! never blocks the runtime.
//!
//! # Marks
//!
//! The proxy's sockets inside workload namespaces carry `SO_MARK` values from the
//! [`MARK_MASK`] bits: [`PROXY_MARK`] on every socket that connects ([`PodNet::socket`]),
//! so kernel programs can tell the proxy's own connections from the workload's (they share
//! the namespace and its cookie), and [`TRANSPARENT_MARK`] on the ones that borrow a
//! client's address. The bits stay clear of what other software on a node uses: Istio's
//! in-pod rules use the low 12 bits (`0xfff`), Cilium `0x0f00` and the upper 16 bits,
//! kube-proxy `0x4000` and `0x8000`, Calico the upper 16 bits. Marks do not survive a trip
//! through a veth into another namespace, so they only matter inside the workload's.
//!
//! # Replies to transparent sockets
//!
//! A transparent socket sends from the client's address (say 10.0.1.5) to the workload's
//! (10.0.2.7), which is local: the packets loop through `lo` to the application. Its
//! replies, from 10.0.2.7 to 10.0.1.5, would follow the namespace's default route out of
//! the pod to the real client, which knows nothing of the connection. [`PodNet::prepare`]
//! sends them back to the proxy's socket instead, touching nothing else:
//! - `net.ipv4.tcp_fwmark_accept=1` (it covers IPv6 too): a socket accepted from a marked
//!   SYN inherits the mark, so the application's side of such a connection marks
//!   everything it sends; connections from anywhere else arrive unmarked and are
//!   unaffected;
//! - `ip rule add fwmark TRANSPARENT_MARK/MARK_MASK lookup TRANSPARENT_TABLE`, and
//!   in that table `local 0.0.0.0/0 dev lo` (and `::/0` for IPv6): marked packets are
//!   delivered locally, where the transparent socket receives them.
//!
//! Reverse-path filtering (`rp_filter`), `accept_local` and `route_localnet` do not get in
//! the way, so `prepare` leaves them alone: packets looped through `lo` keep the route
//! they were sent with, and the kernel checks neither their source nor their input route
//! again (`ip_rcv_finish_core()` only routes packets without one); no address involved is
//! in 127.0.0.0/8. The tests run with strict reverse-path filtering to keep this true.

use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use socket2::{Domain, Protocol, Socket, Type};

mod helper;
mod rules;
#[cfg(test)]
mod tests;
mod undo;

pub use undo::{NETNS_DIRS, Scope, UndoError, Undone, scan, undo_namespaces};

/// Bits of `SO_MARK` the proxy owns inside workload namespaces.
pub const MARK_MASK: u32 = 0x3000;
/// `SO_MARK` of every socket the proxy connects from inside a workload's namespace, so
/// kernel programs there can let the proxy's own connections through.
pub const PROXY_MARK: u32 = 0x1000;
/// `SO_MARK` of the proxy's transparent sockets (those using a client's address as
/// source). It includes [`PROXY_MARK`]. The policy rule of [`PodNet::prepare`] compares
/// only the [`MARK_MASK`] bits, so [`PROXY_MARK`] alone does not match it and the other
/// bits of the mark stay free for others.
pub const TRANSPARENT_MARK: u32 = 0x3000;
/// Routing table of [`PodNet::prepare`] in each workload namespace, holding only "every
/// address is local, through `lo`". Named after the HBONE port; CNIs number their tables
/// far below it (Cilium 200-2005, AWS VPC CNI one per interface, Istio in-pod 100).
pub const TRANSPARENT_TABLE: u32 = 15008;
/// Priority of the policy rule of [`PodNet::prepare`]: after the `local` table's rule (0),
/// before the `main` table's (32766), whose default route would send the replies out of
/// the pod.
pub const TRANSPARENT_RULE_PRIORITY: u32 = 15008;

/// Backlog of the listeners, as tokio's own default.
const LISTEN_BACKLOG: i32 = 1024;
/// The sysctl [`PodNet::prepare`] turns on (a per-namespace setting).
const FWMARK_ACCEPT_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// Ports the kernel must not pick as the source port of the workload's own connections
/// (a per-namespace setting, covering IPv6 too).
const RESERVED_PORTS_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// The proxy's ports inside the namespace. A workload whose ephemeral port range includes
/// them (some widen it to 1024-65535 for many connections) could otherwise hold one as the
/// source port of a connection, and the proxy could not listen there.
pub const PROXY_PORTS: [u16; 2] = [
    mycel_common::mesh::MESH_OUTBOUND_PORT,
    mycel_common::mesh::MESH_HBONE_PORT,
];
/// Name of the threads of [`PodNet::prepare`] and [`PodNet::cleanup`], as `ps -T` and
/// `top -H` show them.
const NETLINK_THREAD_NAME: &str = "mycel-podnet-nl";

/// Where a job inside a namespace runs.
#[derive(Clone, Copy, Debug)]
enum Runner {
    /// On the shared helper thread: quick, non-blocking system calls only.
    Helper,
    /// On a thread of its own, which ends with the job: work that waits (netlink).
    OwnThread,
}

/// What went wrong in a workload's network namespace. Every error names the namespace's
/// path, and once it is open the workload's address.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file opened is not a namespace at all.
    #[error(
        "{path} is not a namespace file: give /proc/<pid>/ns/net of a process in the \
         workload, or a handle like /run/netns/<name>"
    )]
    NotNamespace { path: PathBuf },
    /// `setns()` refused to enter the namespace.
    #[error(
        "pod {pod_ip}: cannot enter network namespace {path}: {source} (EPERM: the agent \
         needs CAP_SYS_ADMIN; EINVAL: the file is a namespace of another kind)"
    )]
    Enter {
        pod_ip: IpAddr,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// A socket operation or a sysctl failed inside the namespace.
    #[error("pod {pod_ip} (network namespace {path}): cannot {action}: {source}")]
    Io {
        pod_ip: IpAddr,
        path: PathBuf,
        action: String,
        #[source]
        source: io::Error,
    },
    /// A netlink request (policy rule or route) failed inside the namespace.
    #[error("pod {pod_ip} (network namespace {path}): cannot {action}: {source}")]
    Netlink {
        pod_ip: IpAddr,
        path: PathBuf,
        action: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// A transparent socket was asked for a client of the other address family.
    #[error(
        "pod {pod_ip} (network namespace {path}): client address {client_ip} is not of the \
         pod address's family; connect to the pod's address of the client's family"
    )]
    Family {
        pod_ip: IpAddr,
        path: PathBuf,
        client_ip: IpAddr,
    },
    /// Undoing [`PodNet::prepare`] failed part-way.
    #[error("pod {pod_ip} (network namespace {path}): {source}")]
    Undo {
        pod_ip: IpAddr,
        path: PathBuf,
        #[source]
        source: UndoError,
    },
    /// The helper thread could not start or ended without answering.
    #[error("pod {pod_ip} (network namespace {path}): {reason}")]
    Thread {
        pod_ip: IpAddr,
        path: PathBuf,
        reason: String,
    },
}

/// An enrolled workload's network namespace, held open, and its address.
///
/// Cheap to clone (the namespace is opened once and shared). Holding it open keeps the
/// namespace from being freed even if the workload is gone; drop it when the workload
/// leaves.
#[derive(Clone, Debug)]
pub struct PodNet {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    pod_ip: IpAddr,
    netns: File,
    /// Unconfigured TCP sockets of the workload's family made in the namespace ahead of
    /// need: a socket keeps the namespace it was made in, and everything else
    /// (`IP_TRANSPARENT`, the mark, `bind`) can be done from any thread. So a new tunnel
    /// does not wait for the helper thread; it refills the spares in the background.
    spare: std::sync::Mutex<Vec<Socket>>,
    /// A refill is queued on the helper thread.
    refilling: std::sync::atomic::AtomicBool,
}

/// Below this many spare sockets, a refill is queued.
const SPARE_LOW: usize = 4;
/// Sockets a refill makes.
const SPARE_BATCH: usize = 16;

impl PodNet {
    /// Opens the namespace at `netns` (`/proc/<pid>/ns/net` or `/run/netns/<name>`) for the
    /// workload with address `pod_ip`. Fails, naming the path, when the file is missing or
    /// is not a namespace. Does not enter it; it cannot block for long.
    pub fn open(netns: &Path, pod_ip: IpAddr) -> Result<PodNet, Error> {
        let file = File::open(netns).map_err(|source| Error::Open {
            path: netns.to_path_buf(),
            source,
        })?;
        let fs = fstatfs(&file).map_err(|errno| Error::Open {
            path: netns.to_path_buf(),
            source: io::Error::from(errno),
        })?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(Error::NotNamespace {
                path: netns.to_path_buf(),
            });
        }
        Ok(PodNet {
            inner: Arc::new(Inner {
                path: netns.to_path_buf(),
                pod_ip,
                netns: file,
                spare: std::sync::Mutex::new(Vec::new()),
                refilling: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The path the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The workload's address.
    pub fn pod_ip(&self) -> IpAddr {
        self.inner.pod_ip
    }

    /// The namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14), which kernel programs get
    /// from `bpf_get_netns_cookie()` and key enrolled workloads by. Stable for the
    /// namespace's lifetime and unique on the machine.
    pub async fn netns_cookie(&self) -> Result<u64, Error> {
        self.in_netns(Runner::Helper, |inner| {
            // Any socket will do; a Unix one exists whatever the namespace's IP set-up.
            let socket = Socket::new(Domain::UNIX, Type::DGRAM, None)
                .map_err(inner.io("create a socket to read the namespace cookie"))?;
            crate::sys::netns_cookie(std::os::fd::AsFd::as_fd(&socket))
                .map_err(inner.io("read SO_NETNS_COOKIE (needs Linux 5.14 or later)"))
        })
        .await
    }

    /// A listener on the workload's address and `port`, inside the namespace, with
    /// `SO_REUSEADDR` (an agent restarting binds again at once). Fails with `EADDRNOTAVAIL`
    /// while the address is not on an interface of the namespace yet.
    ///
    /// Being on the workload's address, the listener is reachable from outside the pod
    /// too, through its interface: whoever serves the outbound port must accept only
    /// peers that are the workload itself (peer address = the workload's, and a
    /// redirection record for the peer's port).
    pub async fn listen(&self, port: u16) -> Result<tokio::net::TcpListener, Error> {
        let std_listener = self
            .in_netns(Runner::Helper, move |inner| {
                let addr = SocketAddr::new(inner.pod_ip, port);
                let socket = inner.tcp_socket(addr.ip())?;
                socket
                    .set_reuse_address(true)
                    .map_err(inner.io(format!("set SO_REUSEADDR for {addr}")))?;
                socket
                    .bind(&addr.into())
                    .map_err(inner.io(format!("bind {addr}")))?;
                socket
                    .listen(LISTEN_BACKLOG)
                    .map_err(inner.io(format!("listen on {addr}")))?;
                Ok(std::net::TcpListener::from(socket))
            })
            .await?;
        tokio::net::TcpListener::from_std(std_listener).map_err(self.inner.io(format!(
            "register the listener on port {port} with the runtime"
        )))
    }

    /// An unconnected socket inside the namespace for one of the workload's outgoing
    /// connections (the outer HBONE connections), marked [`PROXY_MARK`]. When `family_of`
    /// is of the workload address's family the socket is bound to that address (port
    /// chosen at `connect()`), so the connection leaves with it as source whatever the
    /// namespace's routes prefer; otherwise it is left unbound.
    pub async fn socket(&self, family_of: IpAddr) -> Result<tokio::net::TcpSocket, Error> {
        let std_socket = self
            .in_netns(Runner::Helper, move |inner| {
                let socket = inner.tcp_socket(family_of)?;
                socket
                    .set_mark(PROXY_MARK)
                    .map_err(inner.io("set SO_MARK (needs CAP_NET_ADMIN)"))?;
                if family_of.is_ipv4() == inner.pod_ip.is_ipv4() {
                    inner.bind_no_port(&socket, inner.pod_ip)?;
                }
                Ok(std::net::TcpStream::from(socket))
            })
            .await?;
        Ok(tokio::net::TcpSocket::from_std_stream(std_socket))
    }

    /// An unconnected socket inside the namespace bound to `client_ip` (port chosen at
    /// `connect()`), with `IP_TRANSPARENT` (or `IPV6_TRANSPARENT`) and `SO_MARK` =
    /// [`TRANSPARENT_MARK`]: connected to the workload's application, the application sees
    /// `client_ip` as its peer. Replies reach it only after [`PodNet::prepare`].
    /// `client_ip` must be of the workload address's family.
    pub async fn transparent_socket(
        &self,
        client_ip: IpAddr,
    ) -> Result<tokio::net::TcpSocket, Error> {
        if client_ip.is_ipv4() != self.inner.pod_ip.is_ipv4() {
            return Err(Error::Family {
                pod_ip: self.inner.pod_ip,
                path: self.inner.path.clone(),
                client_ip,
            });
        }
        let spare = self
            .inner
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        self.refill_spares();
        let socket = match spare {
            Some(socket) => socket,
            None => {
                self.in_netns(Runner::Helper, move |inner| inner.tcp_socket(client_ip))
                    .await?
            }
        };
        let inner = &self.inner;
        let transparent = match client_ip {
            IpAddr::V4(_) => socket.set_ip_transparent_v4(true),
            IpAddr::V6(_) => socket.set_ip_transparent_v6(true),
        };
        transparent.map_err(inner.io("set IP_TRANSPARENT (needs CAP_NET_ADMIN)"))?;
        socket
            .set_mark(TRANSPARENT_MARK)
            .map_err(inner.io("set SO_MARK (needs CAP_NET_ADMIN)"))?;
        inner.bind_no_port(&socket, client_ip)?;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(socket),
        ))
    }

    /// Queues the making of [`SPARE_BATCH`] spare sockets on the helper thread when fewer
    /// than [`SPARE_LOW`] are left; returns at once. A failure only means the next
    /// tunnel makes its own socket (and reports the error then).
    fn refill_spares(&self) {
        use std::sync::atomic::Ordering;
        let inner = &self.inner;
        let low = inner
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            < SPARE_LOW;
        if !low || inner.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(inner);
        let job = move || {
            if setns(&inner.netns, CloneFlags::CLONE_NEWNET).is_ok() {
                let made: Vec<Socket> = (0..SPARE_BATCH)
                    .map_while(|_| inner.tcp_socket(inner.pod_ip).ok())
                    .collect();
                inner
                    .spare
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(made);
            }
            inner.refilling.store(false, Ordering::Release);
        };
        if helper::run(Box::new(job)).is_err() {
            self.inner.refilling.store(false, Ordering::Release);
        }
    }

    /// Sets the namespace up so that replies to [`PodNet::transparent_socket`]s come back
    /// to them (see the module's documentation): `net.ipv4.tcp_fwmark_accept=1`, the
    /// policy rule for [`TRANSPARENT_MARK`] and the `local` default routes of
    /// [`TRANSPARENT_TABLE`], for IPv4 and IPv6. Changes nothing for the workload's other
    /// traffic. Idempotent: an agent that restarts calls it again. The IPv6 part is
    /// skipped for an IPv4 workload whose namespace has IPv6 disabled.
    pub async fn prepare(&self) -> Result<(), Error> {
        self.in_netns(Runner::OwnThread, |inner| {
            // The rule first: it is how the undoing recognises a namespace mycel set up
            // (and so resets `tcp_fwmark_accept`), even if what follows fails.
            inner.with_netlink(rules::install)?;
            inner.write_sysctl(FWMARK_ACCEPT_SYSCTL, "1")?;
            inner.edit_sysctl(RESERVED_PORTS_SYSCTL, |list| reserve(list, &PROXY_PORTS))
        })
        .await
    }

    /// Removes what [`PodNet::prepare`] added, when the workload leaves the mesh: the
    /// reserved ports, `tcp_fwmark_accept` back to the kernel's default (0), the routes and
    /// the rules. The same code as `mycel uninstall`'s. Idempotent; removing what is not
    /// there is not an error.
    pub async fn cleanup(&self) -> Result<(), Error> {
        self.in_netns(Runner::OwnThread, |inner| {
            undo::undo_here(&mut Vec::new()).map_err(|source| Error::Undo {
                pod_ip: inner.pod_ip,
                path: inner.path.clone(),
                source,
            })
        })
        .await
    }

    /// Runs `work` inside the namespace on a thread chosen by `runner`, and awaits its
    /// answer.
    async fn in_netns<T, F>(&self, runner: Runner, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    {
        let (answer, result) = tokio::sync::oneshot::channel();
        let inner = Arc::clone(&self.inner);
        let job = move || {
            let outcome = setns(&inner.netns, CloneFlags::CLONE_NEWNET)
                .map_err(|source| Error::Enter {
                    pod_ip: inner.pod_ip,
                    path: inner.path.clone(),
                    source,
                })
                .and_then(|()| work(&inner));
            // The caller may have gone (cancelled): what was made is dropped here.
            let _ = answer.send(outcome);
        };
        match runner {
            Runner::Helper => helper::run(Box::new(job)),
            Runner::OwnThread => std::thread::Builder::new()
                .name(NETLINK_THREAD_NAME.to_owned())
                .spawn(job)
                .map(drop),
        }
        .map_err(|e| self.inner.thread(format!("cannot start a thread: {e}")))?;
        result.await.map_err(|_| {
            self.inner
                .thread("the namespace's thread ended without an answer".to_owned())
        })?
    }
}

impl Inner {
    /// Maps an I/O error of `action` to an [`Error::Io`] naming this namespace.
    fn io(&self, action: impl Into<String>) -> impl FnOnce(io::Error) -> Error + '_ {
        let action = action.into();
        move |source| Error::Io {
            pod_ip: self.pod_ip,
            path: self.path.clone(),
            action,
            source,
        }
    }

    fn thread(&self, reason: String) -> Error {
        Error::Thread {
            pod_ip: self.pod_ip,
            path: self.path.clone(),
            reason,
        }
    }

    /// A nonblocking TCP socket of `family_of`'s family (close-on-exec, as socket2 makes
    /// every socket).
    fn tcp_socket(&self, family_of: IpAddr) -> Result<Socket, Error> {
        let domain = match family_of {
            IpAddr::V4(_) => Domain::IPV4,
            IpAddr::V6(_) => Domain::IPV6,
        };
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
            .map_err(self.io(format!("create a TCP socket for {family_of}")))?;
        socket
            .set_nonblocking(true)
            .map_err(self.io("make a socket nonblocking"))?;
        Ok(socket)
    }

    /// Binds `socket` to `ip` with port 0 and `IP_BIND_ADDRESS_NO_PORT`: the port is
    /// chosen at `connect()`, where only the whole address pair must be unique, instead of
    /// reserving one of the namespace's ephemeral ports per socket at `bind()`.
    fn bind_no_port(&self, socket: &Socket, ip: IpAddr) -> Result<(), Error> {
        setsockopt(socket, sockopt::IpBindAddressNoPort, &true)
            .map_err(|errno| self.io("set IP_BIND_ADDRESS_NO_PORT")(io::Error::from(errno)))?;
        socket
            .bind(&SocketAddr::new(ip, 0).into())
            .map_err(self.io(format!("bind {ip}")))
    }

    /// Rewrites the sysctl file `path` of this namespace with `edit` of its current
    /// value; `None` leaves it alone. Must run on a thread inside the namespace, as
    /// [`Inner::write_sysctl`].
    fn edit_sysctl(
        &self,
        path: &str,
        edit: impl FnOnce(&str) -> Option<String>,
    ) -> Result<(), Error> {
        let current = fs::read_to_string(path).map_err(self.io(format!("read {path}")))?;
        match edit(current.trim()) {
            Some(value) => {
                fs::write(path, &value).map_err(self.io(format!("write {value} to {path}")))
            }
            None => Ok(()),
        }
    }

    /// Writes `value` to the sysctl file `path` of this namespace, unless it holds it
    /// already. Must run on a thread inside the namespace: `/proc/sys/net` shows the
    /// namespace of the thread that opens it.
    fn write_sysctl(&self, path: &str, value: &str) -> Result<(), Error> {
        let current = fs::read_to_string(path).map_err(self.io(format!("read {path}")))?;
        if current.trim() == value {
            return Ok(());
        }
        fs::write(path, value).map_err(self.io(format!("write {value} to {path}")))
    }

    /// Runs `work` with an rtnetlink connection of this namespace, on a runtime of this
    /// thread (the connection's socket is made here, so it belongs to this namespace).
    fn with_netlink<W, Fut>(&self, work: W) -> Result<(), Error>
    where
        W: FnOnce(rtnetlink::Handle, IpAddr) -> Fut,
        Fut: Future<Output = Result<(), rules::Failure>>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(self.io("build a runtime for netlink"))?;
        runtime.block_on(async {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(self.io("open a netlink socket"))?;
            let connection = tokio::spawn(connection);
            let outcome = work(handle, self.pod_ip).await;
            connection.abort();
            outcome.map_err(|failure| Error::Netlink {
                pod_ip: self.pod_ip,
                path: self.path.clone(),
                action: failure.action,
                source: failure.source,
            })
        })
    }
}

/// `ip_local_reserved_ports` (`8080,15000-15010`) with `ports` added; `None` when every
/// one is already covered.
fn reserve(list: &str, ports: &[u16]) -> Option<String> {
    let covered = |port: u16| {
        list.split(',')
            .any(|item| match item.trim().split_once('-') {
                Some((lo, hi)) => {
                    lo.parse::<u16>().is_ok_and(|lo| lo <= port)
                        && hi.parse::<u16>().is_ok_and(|hi| port <= hi)
                }
                None => item.trim().parse::<u16>() == Ok(port),
            })
    };
    let missing: Vec<String> = ports
        .iter()
        .filter(|p| !covered(**p))
        .map(u16::to_string)
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut items: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .collect();
    items.extend(missing.iter().map(String::as_str));
    Some(items.join(","))
}

/// `ip_local_reserved_ports` without the single-port entries `ports` (ranges someone else
/// wrote are left alone); `None` when there is nothing to remove.
fn unreserve(list: &str, ports: &[u16]) -> Option<String> {
    let items: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .collect();
    let kept: Vec<&str> = items
        .iter()
        .copied()
        .filter(|i| !i.parse::<u16>().is_ok_and(|p| ports.contains(&p)))
        .collect();
    (kept.len() != items.len()).then(|| kept.join(","))
}

#[cfg(test)]
mod reserved_ports_tests {
    use super::{reserve, unreserve};

    #[test]
    fn proxy_ports_are_added_once_and_removed_alone() {
        assert_eq!(reserve("", &[15001, 15008]).as_deref(), Some("15001,15008"));
        assert_eq!(
            reserve("8080", &[15001, 15008]).as_deref(),
            Some("8080,15001,15008")
        );
        assert_eq!(reserve("15000-15010", &[15001, 15008]), None);
        assert_eq!(reserve("15001,15008", &[15001, 15008]), None);
        assert_eq!(
            reserve("15008", &[15001, 15008]).as_deref(),
            Some("15008,15001")
        );
        assert_eq!(
            unreserve("8080,15001,15008", &[15001, 15008]).as_deref(),
            Some("8080")
        );
        assert_eq!(unreserve("15000-15010", &[15001, 15008]), None);
        assert_eq!(unreserve("", &[15001, 15008]), None);
    }
}
