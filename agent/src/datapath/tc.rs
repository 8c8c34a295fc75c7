//! Attaching the TC programs (policy and flow accounting) to workload interfaces.
//!
//! Each local workload's host-side interface gets two programs: `tc_from_pod` on its
//! ingress (packets the workload sends) and `tc_to_pod` on its egress (packets delivered to
//! it). On kernels with tcx (Linux 6.6) they are attached as bpf links pinned under
//! `<pin dir>/links/tc/<ifindex>-{ingress,egress}`, so they outlive the agent like the
//! socket programs; a restarted agent swaps its program into the pinned link atomically.
//! Older kernels get netlink `clsact` filters at a fixed priority and handle: the kernel
//! keeps them without the agent, and a restarted agent replaces them in place.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle, qdisc_add_clsact},
    },
};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::{Error, KernelFeature};

/// The programs and where they go: packets the workload sends arrive on the host side's
/// ingress, packets to it leave through the host side's egress.
pub const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("tc_from_pod", TcAttachType::Ingress, "ingress"),
    ("tc_to_pod", TcAttachType::Egress, "egress"),
];

/// Priority of mycel's clsact filters (lower runs first).
const CLSACT_PRIORITY: u16 = 1;
/// Handle of mycel's clsact filters at [`CLSACT_PRIORITY`] ("mc").
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x6d63);

/// The kernel feature recorded in [`KernelFeature`]s once the first attach found out.
pub const TCX_FEATURE: &str = "tcx links for TC programs (Linux 6.6)";
const TCX_IMPACT: &str = "TC programs are attached as netlink clsact filters: they run after \
    tcx programs of other tools and are not visible as bpf links";

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// bpf links (Linux ≥ 6.6), pinned.
    Tcx,
    /// netlink filters on a `clsact` qdisc.
    Clsact,
}

/// Both programs attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcAttachment {
    pub ifindex: u32,
    pub interface: String,
    pub mode: TcMode,
    /// True when an earlier agent's attachment was found and replaced.
    pub took_over: bool,
}

/// Loads both programs into the kernel (they are attached per interface later).
pub(super) fn load(ebpf: &mut Ebpf) -> Result<(), Error> {
    for (name, _, _) in TC_PROGRAMS {
        let program = program(ebpf, name)?;
        super::load_retrying(|| program.load()).map_err(|e| super::programs_err(name, e))?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, Error> {
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Link {
            name,
            path: PathBuf::from(name),
            detail: "program missing from the eBPF object".into(),
        })?
        .try_into()
        .map_err(|e| super::programs_err(name, e))
}

/// The directory of pinned tcx links.
fn pin_dir_tc(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links").join("tc")
}

fn pin_path(pin_dir: &Path, ifindex: u32, dir: &str) -> PathBuf {
    pin_dir_tc(pin_dir).join(format!("{ifindex}-{dir}"))
}

/// Interfaces of the calling thread's network namespace as (ifindex, name), from
fn lookup_error(interface: String, e: nix::Error) -> Error {
    Error::Interface {
        interface,
        source: io::Error::from(e),
    }
}

/// The ifindex of `name` in the calling thread's network namespace.
pub fn ifindex_of(name: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(name).map_err(|e| lookup_error(name.to_string(), e))
}

/// The name of interface `ifindex` in the calling thread's network namespace.
pub fn interface_name(ifindex: u32) -> Result<String, Error> {
    nix::net::if_::if_indextoname(ifindex)
        .map_err(|e| lookup_error(format!("ifindex {ifindex}"), e))
        .map(|c| c.to_string_lossy().into_owned())
}

/// Attaches both programs to `interface`. `mode` is what an earlier attach found the kernel
/// supports (`None`: not known yet, try tcx first); it is set, and `features` noted, when
/// this call finds out.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    interface: &str,
    mode: &mut Option<TcMode>,
    features: &mut Vec<KernelFeature>,
) -> Result<TcAttachment, Error> {
    let ifindex = ifindex_of(interface)?;
    let mut took_over = false;
    if *mode != Some(TcMode::Clsact) {
        let dir = pin_dir_tc(pin_dir);
        fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir, source })?;
        match attach_tcx(ebpf, pin_dir, interface, ifindex) {
            Ok(t) => {
                if mode.is_none() {
                    note(features, true);
                }
                *mode = Some(TcMode::Tcx);
                return Ok(TcAttachment {
                    ifindex,
                    interface: interface.to_string(),
                    mode: TcMode::Tcx,
                    took_over: t,
                });
            }
            Err(e) if mode.is_none() && tcx_unsupported(&e) => {
                warn!("kernel lacks {TCX_FEATURE}: {TCX_IMPACT} ({e})");
                note(features, false);
                *mode = Some(TcMode::Clsact);
            }
            Err(e) => return Err(e),
        }
    }
    for (name, attach_type, _) in TC_PROGRAMS {
        took_over |= attach_clsact(ebpf, name, interface, attach_type)?;
    }
    info!(
        interface,
        ifindex, took_over, "TC programs attached (clsact)"
    );
    Ok(TcAttachment {
        ifindex,
        interface: interface.to_string(),
        mode: TcMode::Clsact,
        took_over,
    })
}

fn note(features: &mut Vec<KernelFeature>, available: bool) {
    if !features.iter().any(|f| f.feature == TCX_FEATURE) {
        features.push(KernelFeature {
            feature: TCX_FEATURE.to_string(),
            available,
            impact: TCX_IMPACT.to_string(),
        });
    }
}

/// Whether attaching with tcx failed because the kernel does not know tcx (before 6.6 the
/// attach type is unknown: `EINVAL`).
fn tcx_unsupported(e: &Error) -> bool {
    let Error::Program { source, .. } = e else {
        return false;
    };
    let aya::programs::ProgramError::SyscallError(s) = source.as_ref() else {
        return false;
    };
    matches!(
        s.io_error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524 /* ENOTSUPP */)
    )
}

/// Attaches both programs with tcx and pins the links; returns whether an earlier agent's
/// links were taken over.
fn attach_tcx(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    interface: &str,
    ifindex: u32,
) -> Result<bool, Error> {
    let mut took_over = false;
    for (name, attach_type, dir) in TC_PROGRAMS {
        let pin = pin_path(pin_dir, ifindex, dir);
        let link_err = |detail: String| Error::Link {
            name,
            path: pin.clone(),
            detail,
        };
        let prog = program(ebpf, name)?;
        let old = match PinnedLink::from_pin(&pin) {
            Ok(old) => Some(old.unpin().map_err(|e| link_err(e.to_string()))?),
            Err(LinkError::SyscallError(s)) if s.io_error.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(link_err(e.to_string())),
        };
        // Swap the program into an earlier agent's link atomically; a link whose interface
        // went away (a reused ifindex) cannot be updated: attach afresh.
        let swapped = match old {
            Some(old) => match SchedClassifierLink::try_from(old)
                .map_err(|e| e.to_string())
                .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()))
            {
                Ok(id) => Some(id),
                Err(e) => {
                    debug!(interface, hook = name, "pinned link not reusable: {e}");
                    None
                }
            },
            None => None,
        };
        took_over |= swapped.is_some();
        let id = match swapped {
            Some(id) => id,
            None => prog
                .attach_with_options(
                    interface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| super::programs_err(name, e))?,
        };
        let link = prog
            .take_link(id)
            .map_err(|e| super::programs_err(name, e))?;
        let fd_link = FdLink::try_from(link).map_err(|e| link_err(e.to_string()))?;
        fd_link.pin(&pin).map_err(|e| link_err(e.to_string()))?;
    }
    info!(interface, ifindex, took_over, "TC programs attached (tcx)");
    Ok(took_over)
}

/// Attaches one program as a clsact filter at mycel's priority and handle, replacing the
/// filter an earlier agent left there. Returns whether one was replaced.
fn attach_clsact(
    ebpf: &mut Ebpf,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<bool, Error> {
    if let Err(e) = qdisc_add_clsact(interface) {
        // Already there (from an earlier agent or another tool) is fine.
        let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n)
            if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(super::programs_err(name, e.into()));
        }
    }
    let prog = program(ebpf, name)?;
    let created = prog.attach_with_options(
        interface,
        attach_type,
        TcAttachOptions::Netlink(NlOptions {
            priority: CLSACT_PRIORITY,
            handle: CLSACT_HANDLE,
            classid: None,
        }),
    );
    let (id, replaced) = match created {
        Ok(id) => (id, false),
        Err(_) => {
            let existing = clsact_filter(interface, attach_type)?;
            let id = prog
                .attach_to_link(existing)
                .map_err(|e| super::programs_err(name, e))?;
            (id, true)
        }
    };
    let link = prog
        .take_link(id)
        .map_err(|e| super::programs_err(name, e))?;
    // The filter stays in the kernel by itself; dropping the link would remove it. It holds
    // no file descriptor, so forgetting it leaks nothing.
    std::mem::forget(link);
    Ok(replaced)
}

/// Detaches both programs from interface `ifindex` (whose name is `interface`, when it
/// still exists). An interface that is gone has lost its programs with it.
pub(super) fn detach(
    pin_dir: &Path,
    ifindex: u32,
    interface: Option<&str>,
    mode: TcMode,
) -> Result<(), Error> {
    for (name, attach_type, dir) in TC_PROGRAMS {
        match mode {
            TcMode::Tcx => {
                let pin = pin_path(pin_dir, ifindex, dir);
                match PinnedLink::from_pin(&pin) {
                    Ok(link) => {
                        let link = link.unpin().map_err(|e| Error::Link {
                            name,
                            path: pin.clone(),
                            detail: e.to_string(),
                        })?;
                        // Detaches (no pin and no other fd holds it any more).
                        drop(link);
                    }
                    Err(LinkError::SyscallError(s))
                        if s.io_error.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::Link {
                            name,
                            path: pin,
                            detail: e.to_string(),
                        });
                    }
                }
            }
            TcMode::Clsact => {
                let Some(interface) = interface else { continue };
                let link = clsact_filter(interface, attach_type)?;
                if let Err(e) = aya::programs::Link::detach(link) {
                    debug!(interface, hook = name, "clsact filter already gone: {e}");
                }
            }
        }
    }
    Ok(())
}

/// mycel's clsact filter on `interface`'s `attach_type` hook, as the kernel holds it.
fn clsact_filter(interface: &str, attach_type: TcAttachType) -> Result<SchedClassifierLink, Error> {
    SchedClassifierLink::attached(interface, attach_type, CLSACT_PRIORITY, CLSACT_HANDLE, None)
        .map_err(|e| Error::Interface {
            interface: interface.to_string(),
            source: e,
        })
}
