//! The kernel side: loads mycel's eBPF programs, attaches them, pins them and their maps
//! under bpffs, and writes the state model's output into the maps.
//!
//! Pinning is what makes agent restarts invisible to traffic: links and maps outlive the
//! process, so programs keep balancing from the last programmed state while the agent is
//! down, and a new agent takes the maps over (reading back what they hold) instead of
//! flushing and refilling them.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use mycel_common::{
    flow::DEFAULT_FLOW_ENTRIES,
    policy::{DEFAULT_IPCACHE_ENTRIES, DEFAULT_POLICY_ENTRIES},
    service::{DEFAULT_BACKEND_SLOTS, MAX_SERVICES, REVNAT_ENTRIES},
};

mod flows;
mod mesh;
mod policy;
mod programs;
mod services;
mod tc;
mod uninstall;

pub use flows::{
    FlowReader, dump_flows, flow_events_from_pin, parse as parse_flow_event, spawn_flow_reader,
};
pub use mesh::{
    MESH_F_ENROLLED, MESH_F_STRICT, MeshContent, MeshDest, MeshMaps, MeshSource, MeshStats,
    OrigDst, OrigDstError, OrigDstTable, decode_orig_dst, mesh_addr, pinned_lease_remaining,
};
pub use policy::{IpPrefix, PolicyApplyStats, PolicyContent, PolicyMaps, addr_words, ipcache_key};
pub use programs::{AttachedProgram, KernelFeature, PROGRAMS, ProgramStatus, SOCK_OPS};
pub use services::{ApplyStats, MapBackend, MapService, ServiceMaps, dump_pinned};
pub use tc::{TC_PROGRAMS, TCX_FEATURE, TcAttachment, TcMode, ifindex_of, interface_name};
pub use uninstall::{Removal, remove_clsact_filters, remove_pins};

/// The compiled kernel programs, built by `build.rs` from `ebpf/mycel-ebpf`.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mycel"));

/// Errors of the datapath. Messages say what failed and what to try.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0} is not a bpffs mount: mount one with `mount -t bpf bpf /sys/fs/bpf` (or run `cargo xtask setup`)"
    )]
    NoBpffs(PathBuf),
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("cannot open cgroup {path}: {source} (set --cgroup to a cgroup v2 directory)")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("program {name}: pinning or taking over its link at {path}: {detail}")]
    Link {
        name: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "map {map} is full while programming {what}; nothing of it was written (raise the map size or remove services)"
    )]
    MapFull { map: &'static str, what: String },
    #[error("no free service id (all {0} in use)")]
    NoServiceId(u32),
    #[error("removing pins under {path}: {detail}")]
    Unpin { path: PathBuf, detail: String },
    #[error("interface {interface}: {source}")]
    Interface {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("ipcache prefix {addr}/{len}: the prefix length is too long for the address")]
    InvalidPrefix { addr: IpAddr, len: u8 },
    #[error("flow events (map FLOW_EVENTS): {detail}")]
    FlowEvents { detail: String },
    #[error(
        "original destination of the redirected connection from {peer} (map MESH_ORIG_DST): {source}"
    )]
    OrigDst {
        peer: SocketAddr,
        #[source]
        source: OrigDstError,
    },
}

/// Times a program load is tried when the verifier was interrupted, as libbpf does.
const LOAD_ATTEMPTS: usize = 5;

/// Loads a program with `load`, again when the kernel answers EAGAIN: the verifier gives
/// up when a signal is pending for the loading thread (the larger a program, the likelier
/// during a long verification), which says nothing about the program.
pub(crate) fn load_retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

pub(crate) fn programs_err(name: &'static str, e: aya::programs::ProgramError) -> Error {
    Error::Program {
        name,
        source: Box::new(e),
    }
}

impl Error {
    pub(crate) fn map(map: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            map,
            source: Box::new(source),
        }
    }
}

/// Sizes of the maps the agent creates. Maps already pinned keep the size they were
/// created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapSizes {
    /// Service frontends (`SERVICES`), at most [`MAX_SERVICES`].
    pub services: u32,
    /// Backend slots across all services (`BACKENDS`).
    pub backends: u32,
    /// Sockets remembered for getpeername()/recvmsg() (`REVNAT`, an LRU).
    pub revnat: u32,
    /// Flows counted at once (`FLOWS`, an LRU: the least recently seen make room).
    pub flows: u32,
    /// Compiled policy entries of every local endpoint (`POLICY`).
    pub policy: u32,
    /// Addresses and CIDRs with a known identity (`IPCACHE`).
    pub ipcache: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: DEFAULT_BACKEND_SLOTS,
            revnat: REVNAT_ENTRIES,
            flows: DEFAULT_FLOW_ENTRIES,
            policy: DEFAULT_POLICY_ENTRIES,
            ipcache: DEFAULT_IPCACHE_ENTRIES,
        }
    }
}

/// Holds the ring buffer until it is handed out (aya's `RingBuf` has no `Debug`).
struct FlowEventsSlot(Option<aya::maps::RingBuf<aya::maps::MapData>>);

impl std::fmt::Debug for FlowEventsSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "FlowEvents"
        } else {
            "FlowEvents(taken)"
        })
    }
}

/// The loaded, attached and pinned datapath.
#[derive(Debug)]
pub struct Datapath {
    pin_dir: PathBuf,
    programs: Vec<AttachedProgram>,
    features: Vec<KernelFeature>,
    pub services: ServiceMaps,
    /// IPCACHE, ENDPOINTS and POLICY.
    pub policy: PolicyMaps,
    /// MESH_DESTS, MESH_SOURCES, MESH_CONFIG and the reader of MESH_ORIG_DST.
    pub mesh: MeshMaps,
    /// How TC programs attach on this kernel, once the first attach found out.
    tc_mode: Option<TcMode>,
    /// Interfaces this process attached the TC programs to, by ifindex.
    tc: BTreeMap<u32, TcAttachment>,
    /// The FLOW_EVENTS ring buffer until [`Datapath::take_flow_events`] hands it out.
    flow_events: FlowEventsSlot,
    // Keeps the loaded object (and its program fds) alive.
    ebpf: aya::Ebpf,
}

impl Datapath {
    /// Loads the programs, takes over (or creates, with default sizes) the pinned maps
    /// under `pin_dir`, and attaches the socket programs to `cgroup`.
    pub fn load(cgroup: &std::path::Path, pin_dir: &std::path::Path) -> Result<Self, Error> {
        Self::load_with(cgroup, pin_dir, MapSizes::default())
    }

    /// [`Datapath::load`] with the sizes of maps it creates.
    pub fn load_with(
        cgroup: &std::path::Path,
        pin_dir: &std::path::Path,
        sizes: MapSizes,
    ) -> Result<Self, Error> {
        programs::prepare_pin_dir(pin_dir)?;
        let mut ebpf = programs::load(pin_dir, sizes)?;
        let services = ServiceMaps::take(&mut ebpf)?;
        let policy = PolicyMaps::take(&mut ebpf)?;
        let mesh = MeshMaps::take(&mut ebpf)?;
        let flow_events = ebpf
            .take_map("FLOW_EVENTS")
            .ok_or(Error::MissingMap { map: "FLOW_EVENTS" })?;
        let flow_events =
            aya::maps::RingBuf::try_from(flow_events).map_err(|e| Error::map("FLOW_EVENTS", e))?;
        tc::load(&mut ebpf)?;
        let (programs, features) = programs::attach_all(&mut ebpf, cgroup, pin_dir)?;
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            programs,
            features,
            services,
            policy,
            mesh,
            tc_mode: None,
            tc: BTreeMap::new(),
            flow_events: FlowEventsSlot(Some(flow_events)),
            ebpf,
        })
    }

    /// Attaches the TC programs (policy and flow accounting) to a workload's host-side
    /// interface, by name, in the calling thread's network namespace. Replaces an earlier
    /// agent's attachment in place.
    pub fn attach_tc(&mut self, interface: &str) -> Result<TcAttachment, Error> {
        // Already attached by this agent to the interface that has this name now (a
        // recreated interface has a new ifindex and is attached again).
        let ifindex = ifindex_of(interface)?;
        if let Some(a) = self.tc.get(&ifindex)
            && a.interface == interface
        {
            return Ok(a.clone());
        }
        let a = tc::attach(
            &mut self.ebpf,
            &self.pin_dir,
            interface,
            &mut self.tc_mode,
            &mut self.features,
        )?;
        self.tc.insert(a.ifindex, a.clone());
        Ok(a)
    }

    /// [`Datapath::attach_tc`] by ifindex.
    pub fn attach_tc_ifindex(&mut self, ifindex: u32) -> Result<TcAttachment, Error> {
        let name = interface_name(ifindex)?;
        self.attach_tc(&name)
    }

    /// Detaches the TC programs from interface `ifindex` (a removed workload). Interfaces
    /// attached by an earlier agent are found by their pins (tcx) or by name (clsact, when
    /// the interface still exists).
    pub fn detach_tc(&mut self, ifindex: u32) -> Result<(), Error> {
        let known = self.tc.remove(&ifindex);
        let name = known
            .as_ref()
            .map(|a| a.interface.clone())
            .or_else(|| interface_name(ifindex).ok());
        let mode = known
            .map(|a| a.mode)
            .or(self.tc_mode)
            .unwrap_or(TcMode::Tcx);
        tc::detach(&self.pin_dir, ifindex, name.as_deref(), mode)
    }

    /// Interfaces this process attached the TC programs to.
    pub fn tc_attachments(&self) -> impl Iterator<Item = &TcAttachment> {
        self.tc.values()
    }

    /// Forces how the TC programs attach from now on, e.g. clsact on a kernel with tcx (for
    /// tools that only look at clsact filters). Forcing tcx on a kernel without it makes
    /// attaching fail.
    pub fn set_tc_mode(&mut self, mode: TcMode) {
        self.tc_mode = Some(mode);
    }

    /// How TC programs attach on this kernel, once known (after the first attach).
    pub fn tc_mode(&self) -> Option<TcMode> {
        self.tc_mode
    }

    /// Runs TC program `program` (one of [`TC_PROGRAMS`]) once on `packet` (an Ethernet
    /// frame) with `BPF_PROG_TEST_RUN`, as if the loopback device of the caller's network
    /// namespace carried it, and returns the program's verdict (`u32::MAX` pass, 2 drop).
    /// For tests and diagnostics: the maps are the live ones.
    pub fn tc_test_run(&self, program: &'static str, packet: &[u8]) -> Result<u32, Error> {
        self.tc_test_run_repeated(program, packet, 1)
            .map(|(verdict, _)| verdict)
    }

    /// [`Datapath::tc_test_run`] `repeat` times in the kernel; also returns the kernel's
    /// average time per run (what benchmarks report as ns per packet).
    pub fn tc_test_run_repeated(
        &self,
        program: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), Error> {
        use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or_else(|| Error::Link {
                name: program,
                path: PathBuf::from(program),
                detail: "program missing from the eBPF object".into(),
            })?
            .try_into()
            .map_err(|e| programs_err(program, e))?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.repeat = repeat.max(1);
        let result = prog.test_run(opts).map_err(|e| programs_err(program, e))?;
        Ok((result.return_value, result.duration))
    }

    /// Hands out the FLOW_EVENTS ring buffer (once) for [`spawn_flow_reader`].
    pub fn take_flow_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.flow_events.0.take()
    }

    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// Kernel features probed while loading, and what their absence costs.
    pub fn kernel_features(&self) -> &[KernelFeature] {
        &self.features
    }

    pub fn programs(&self) -> Vec<programs::ProgramStatus> {
        self.programs.iter().map(AttachedProgram::status).collect()
    }

    /// Detaches the programs and removes every pin: the kernel forgets mycel once this
    /// process exits. Ends the mesh lease first, so that no connection is redirected to a
    /// proxy that is going away. Beyond what this process attached, it removes what
    /// `mycel uninstall` does: every pin under the directory (an earlier agent's tcx links
    /// included) and mycel's clsact filters on every interface of the calling thread's
    /// network namespace. Returns what it removed; an error names what it could not.
    pub fn detach_and_unpin(self) -> Result<Removal, Error> {
        let Self {
            pin_dir,
            programs,
            tc: attached_tc,
            mut mesh,
            ..
        } = self;
        mesh.end_lease()?;
        programs::detach_all(programs)?;
        for a in attached_tc.values() {
            tc::detach(&pin_dir, a.ifindex, Some(&a.interface), a.mode)?;
        }
        let mut removal = remove_pins(&pin_dir);
        removal.extend(remove_clsact_filters());
        if removal.failed.is_empty() {
            Ok(removal)
        } else {
            Err(Error::Unpin {
                path: pin_dir,
                detail: removal.failed.join("; "),
            })
        }
    }
}

/// A removal that found nothing removed is not an error.
pub(crate) fn remove_ok(
    r: Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<(), Error> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(Error::map(map, e)),
    }
}

/// A map that is full gets an error saying so and naming `what` did not fit.
pub(crate) fn full_or(
    map: &'static str,
    e: aya::maps::MapError,
    what: impl FnOnce() -> String,
) -> Error {
    let full = matches!(&e, aya::maps::MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)));
    if full {
        Error::MapFull { map, what: what() }
    } else {
        Error::map(map, e)
    }
}
