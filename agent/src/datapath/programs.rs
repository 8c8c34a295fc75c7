//! Loading, attaching and pinning the socket programs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use nix::sys::statfs::BPF_FS_MAGIC;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::{EBPF_OBJECT, Error};

/// The cgroup sock_addr programs: the hook, its program, and the variant for kernels that
/// reject it (loaded instead, with the reason recorded as a missing kernel feature).
pub const PROGRAMS: [(&str, Option<Fallback>); 8] = [
    ("connect4", Some(SET_RETVAL)),
    ("connect6", Some(SET_RETVAL)),
    ("sendmsg4", Some(SET_RETVAL)),
    ("sendmsg6", Some(SET_RETVAL)),
    ("recvmsg4", None),
    ("recvmsg6", None),
    ("getpeername4", None),
    ("getpeername6", None),
];

/// The cgroup sock_ops program, attached to the same cgroup: it hands a redirected
/// connection's original destination over to the proxy (see `mycel_common::mesh`).
pub const SOCK_OPS: &str = "sock_ops";

/// A program variant for kernels lacking a feature.
#[derive(Clone, Copy, Debug)]
pub struct Fallback {
    /// Suffix of the variant's name (`connect4` → `connect4_eperm`).
    pub suffix: &'static str,
    /// The kernel feature whose absence the variant works around.
    pub feature: &'static str,
    /// What users lose with the variant.
    pub impact: &'static str,
}

const SET_RETVAL: Fallback = Fallback {
    suffix: "_eperm",
    feature: "bpf_set_retval in cgroup sock_addr programs (Linux 5.18)",
    impact: "connect()/sendmsg() to a service without backends fails with EPERM instead of ECONNREFUSED",
};

/// A kernel feature mycel probed for by loading a program that uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KernelFeature {
    pub feature: String,
    pub available: bool,
    /// What is disabled or degraded without it.
    pub impact: String,
}

/// A program attached to the cgroup through a pinned link.
#[derive(Debug)]
pub struct AttachedProgram {
    /// The hook, e.g. `connect4`.
    pub name: &'static str,
    /// The program attached to it: the hook's name or a fallback variant.
    pub program: String,
    pub pin: PathBuf,
    /// Holds the link open; the pin keeps it attached after the agent exits.
    _link: PinnedLink,
    /// True when an earlier agent's link was found and replaced.
    pub took_over: bool,
}

/// What `mycel status` shows of a program.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ProgramStatus {
    pub name: String,
    pub program: String,
    pub attached: bool,
    pub pin: PathBuf,
}

impl AttachedProgram {
    pub fn status(&self) -> ProgramStatus {
        ProgramStatus {
            name: self.name.to_string(),
            program: self.program.clone(),
            attached: self.pin.exists(),
            pin: self.pin.clone(),
        }
    }
}

/// Checks that `dir`'s filesystem (or its nearest existing ancestor's) is bpffs, then creates
/// `dir` and `dir/links`.
pub(super) fn prepare_pin_dir(dir: &Path) -> Result<(), Error> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if !is_bpffs(probe) {
        return Err(Error::NoBpffs(probe.to_path_buf()));
    }
    for d in [dir.to_path_buf(), dir.join("links")] {
        fs::create_dir_all(&d).map_err(|source| Error::PinDir { path: d, source })?;
    }
    Ok(())
}

pub(super) fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

/// Loads the object with its maps pinned under `pin_dir`, reusing maps already pinned there
/// and creating the others with `sizes`.
pub(super) fn load(pin_dir: &Path, sizes: super::MapSizes) -> Result<Ebpf, Error> {
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .map_max_entries("SERVICES", sizes.services)
        .map_max_entries("BACKENDS", sizes.backends)
        .map_max_entries("REVNAT", sizes.revnat)
        .map_max_entries("FLOWS", sizes.flows)
        .map_max_entries("POLICY", sizes.policy)
        .map_max_entries("IPCACHE", sizes.ipcache)
        .load(EBPF_OBJECT)
        .map_err(|e| Error::Load(Box::new(e)))
}

/// Attaches every program to `cgroup` and pins its link as `pin_dir/links/<name>`.
///
/// An earlier agent's pinned link is replaced make-before-break: the new program is attached
/// next to the old one (running both is harmless: the second sees an address the first
/// already translated), and only then is the old link unpinned and released. No connect()
/// ever runs without a program.
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    pin_dir: &Path,
) -> Result<(Vec<AttachedProgram>, Vec<KernelFeature>), Error> {
    let cgroup_file = fs::File::open(cgroup).map_err(|source| Error::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let mut attached = Vec::with_capacity(PROGRAMS.len());
    let mut features: Vec<KernelFeature> = Vec::new();
    for (name, fallback) in PROGRAMS {
        let (program_name, link_id) = match load_and_attach(ebpf, name, &cgroup_file) {
            Ok(link_id) => {
                if let Some(f) = fallback {
                    note_feature(&mut features, f, true);
                }
                (name.to_string(), link_id)
            }
            Err(primary) => {
                let Some(f) = fallback else {
                    return Err(primary);
                };
                let variant = format!("{name}{}", f.suffix);
                match load_and_attach(ebpf, &variant, &cgroup_file) {
                    Ok(link_id) => {
                        if !features.iter().any(|k| k.feature == f.feature) {
                            warn!(
                                "kernel lacks {}: {}; loaded the variant ({primary})",
                                f.feature, f.impact
                            );
                        }
                        note_feature(&mut features, f, false);
                        (variant, link_id)
                    }
                    // The variant failing too means something else is wrong: report the
                    // primary program's error, which names the real cause.
                    Err(_) => return Err(primary),
                }
            }
        };
        let pin = pin_dir.join("links").join(name);
        attached.push(pin_link(name, program_name, link_id, pin)?);
    }
    let pin = pin_dir.join("links").join(SOCK_OPS);
    let link = load_and_attach_sock_ops(ebpf, &cgroup_file)?;
    attached.push(pin_link(SOCK_OPS, SOCK_OPS.to_string(), link, pin)?);
    info!(
        cgroup = %cgroup.display(),
        programs = attached.len(),
        took_over = attached.iter().any(|a| a.took_over),
        "socket programs attached"
    );
    Ok((attached, features))
}

/// Pins `link` at `pin`, replacing an earlier agent's link there: the old link's fd stays
/// open until the new one is pinned in its place.
fn pin_link(
    name: &'static str,
    program_name: String,
    link: FdLink,
    pin: PathBuf,
) -> Result<AttachedProgram, Error> {
    let link_err = |detail: String| Error::Link {
        name,
        path: pin.clone(),
        detail,
    };
    let old = if pin.exists() {
        let old = PinnedLink::from_pin(&pin).map_err(|e| link_err(e.to_string()))?;
        Some(old.unpin().map_err(|e| link_err(e.to_string()))?)
    } else {
        None
    };
    let took_over = old.is_some();
    let pinned = link.pin(&pin).map_err(|e| link_err(e.to_string()))?;
    drop(old);
    debug!(hook = name, program = %program_name, pin = %pin.display(), took_over, "attached");
    Ok(AttachedProgram {
        name,
        program: program_name,
        pin,
        _link: pinned,
        took_over,
    })
}

fn note_feature(features: &mut Vec<KernelFeature>, f: Fallback, available: bool) {
    if !features.iter().any(|k| k.feature == f.feature) {
        features.push(KernelFeature {
            feature: f.feature.to_string(),
            available,
            impact: f.impact.to_string(),
        });
    }
}

/// Loads program `name` and attaches it to the cgroup, returning its link.
fn load_and_attach(ebpf: &mut Ebpf, name: &str, cgroup: &fs::File) -> Result<FdLink, Error> {
    let hook: &'static str = PROGRAMS
        .iter()
        .map(|(h, _)| *h)
        .find(|h| name.starts_with(h))
        .unwrap_or("unknown");
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Link {
            name: hook,
            path: PathBuf::from(name),
            detail: "program missing from the eBPF object".into(),
        })?
        .try_into()
        .map_err(|e| prog_err(hook, e))?;
    super::load_retrying(|| program.load()).map_err(|e| prog_err(hook, e))?;
    // On kernels with bpf_link (≥ 5.7, which pinning needs) cgroup links always coexist
    // with other programs; aya passes the mode as link_create flags, which must be 0,
    // hence `Single`.
    let link_id = program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|e| prog_err(hook, e))?;
    let link = program.take_link(link_id).map_err(|e| prog_err(hook, e))?;
    FdLink::try_from(link).map_err(|e| Error::Link {
        name: hook,
        path: PathBuf::from(name),
        detail: format!("the kernel did not give a bpf_link (needs Linux ≥ 5.7): {e}"),
    })
}

/// Loads the sock_ops program and attaches it to the cgroup, returning its link.
fn load_and_attach_sock_ops(ebpf: &mut Ebpf, cgroup: &fs::File) -> Result<FdLink, Error> {
    let program: &mut SockOps = ebpf
        .program_mut(SOCK_OPS)
        .ok_or_else(|| Error::Link {
            name: SOCK_OPS,
            path: PathBuf::from(SOCK_OPS),
            detail: "program missing from the eBPF object".into(),
        })?
        .try_into()
        .map_err(|e| prog_err(SOCK_OPS, e))?;
    super::load_retrying(|| program.load()).map_err(|e| prog_err(SOCK_OPS, e))?;
    // As for the sock_addr programs: a bpf_link, which coexists with other programs.
    let link_id = program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|e| prog_err(SOCK_OPS, e))?;
    let link = program
        .take_link(link_id)
        .map_err(|e| prog_err(SOCK_OPS, e))?;
    FdLink::try_from(link).map_err(|e| Error::Link {
        name: SOCK_OPS,
        path: PathBuf::from(SOCK_OPS),
        detail: format!("the kernel did not give a bpf_link (needs Linux ≥ 5.7): {e}"),
    })
}

/// Unpins every link (detaching the programs once this process lets go of them).
pub(super) fn detach_all(attached: Vec<AttachedProgram>) -> Result<(), Error> {
    for a in attached {
        let AttachedProgram {
            name, pin, _link, ..
        } = a;
        let link = _link.unpin().map_err(|e| Error::Link {
            name,
            path: pin.clone(),
            detail: e.to_string(),
        })?;
        drop(link);
    }
    Ok(())
}

fn prog_err(name: &'static str, e: aya::programs::ProgramError) -> Error {
    Error::Program {
        name,
        source: Box::new(e),
    }
}
