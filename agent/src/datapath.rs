//! The kernel side: loads mycel's eBPF programs, attaches them, pins them and their maps
//! under bpffs, and writes the state model's output into the maps.
//!
//! Pinning is what makes agent restarts invisible to traffic: links and maps outlive the
//! process, so programs keep balancing from the last programmed state while the agent is
//! down, and a new agent takes the maps over (reading back what they hold) instead of
//! flushing and refilling them.

use std::{io, path::PathBuf};

use mycel_common::service::{DEFAULT_BACKEND_SLOTS, MAX_SERVICES, REVNAT_ENTRIES};

mod programs;
mod services;

pub use programs::{AttachedProgram, KernelFeature, PROGRAMS, ProgramStatus};
pub use services::{ApplyStats, MapBackend, MapService, ServiceMaps, dump_pinned};

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
    #[error("removing pins under {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
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
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: DEFAULT_BACKEND_SLOTS,
            revnat: REVNAT_ENTRIES,
        }
    }
}

/// The loaded, attached and pinned datapath.
#[derive(Debug)]
pub struct Datapath {
    pin_dir: PathBuf,
    programs: Vec<AttachedProgram>,
    features: Vec<KernelFeature>,
    pub services: ServiceMaps,
    // Keeps the loaded object (and its program fds) alive.
    _ebpf: aya::Ebpf,
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
        let (programs, features) = programs::attach_all(&mut ebpf, cgroup, pin_dir)?;
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            programs,
            features,
            services,
            _ebpf: ebpf,
        })
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
    /// process exits.
    pub fn detach_and_unpin(self) -> Result<(), Error> {
        let Self {
            pin_dir, programs, ..
        } = self;
        programs::detach_all(programs)?;
        let unpin = |path: PathBuf| -> Result<(), Error> {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(Error::Unpin { path, source }),
            }
        };
        unpin(pin_dir)
    }
}
