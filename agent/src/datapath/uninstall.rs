//! Removing what agents left in the kernel, with no agent running (`mycel uninstall`) or
//! from an agent that detaches on shutdown (`--detach-on-exit`): the same code for both.
//!
//! - Every pin under the agent's bpffs directory. A link's pin is the last reference to it
//!   once no agent holds it open, so removing the pin detaches the program (the cgroup
//!   socket programs, `sock_ops`, the tcx links on workload interfaces); a map's pin is
//!   removed with it. Links go first, so nothing runs against half-removed maps.
//! - mycel's netlink `clsact` filters (kernels without tcx), which the kernel keeps without
//!   any pin: found on every interface of the caller's network namespace by their program
//!   names ([`TC_PROGRAMS`]). The `clsact` qdiscs stay: other tools may have filters there.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::tc::{TcError, qdisc_detach_program};

use super::TC_PROGRAMS;

/// What a removal did, in words, and what it could not do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// One line per thing removed (`link .../links/connect4`, `clsact filter ...`).
    pub removed: Vec<String>,
    /// One line per thing that could not be removed, naming it and why.
    pub failed: Vec<String>,
}

impl Removal {
    /// Adds `other`'s lines to these.
    pub fn extend(&mut self, other: Removal) {
        self.removed.extend(other.removed);
        self.failed.extend(other.failed);
    }
}

/// Removes every pin under `pin_dir` and the directories that held them (links first,
/// then maps). A directory that does not exist holds nothing; one that is not on bpffs is
/// left alone (an error: these are not pins).
pub fn remove_pins(pin_dir: &Path) -> Removal {
    let mut out = Removal::default();
    match fs::symlink_metadata(pin_dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return out,
        Err(e) => {
            out.failed
                .push(format!("cannot read {}: {e}", pin_dir.display()));
            return out;
        }
    }
    if !super::programs::is_bpffs(pin_dir) {
        out.failed.push(format!(
            "{} is not on a bpffs mount: it holds no pins, so nothing there was removed \
             (check --bpffs)",
            pin_dir.display()
        ));
        return out;
    }
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    walk(pin_dir, &mut files, &mut dirs, &mut out);
    let links = pin_dir.join("links");
    // Links before maps; deeper directories before the ones holding them.
    files.sort_by_key(|p| (!p.starts_with(&links), p.clone()));
    dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for file in files {
        let kind = if file.starts_with(&links) {
            "link"
        } else {
            "map"
        };
        match fs::remove_file(&file) {
            Ok(()) => out.removed.push(format!("{kind} {}", file.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => out
                .failed
                .push(format!("cannot remove {kind} {}: {e}", file.display())),
        }
    }
    for dir in dirs {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => out
                .failed
                .push(format!("cannot remove directory {}: {e}", dir.display())),
        }
    }
    out
}

/// Files and directories below (and including) `dir`.
fn walk(dir: &Path, files: &mut Vec<PathBuf>, dirs: &mut Vec<PathBuf>, out: &mut Removal) {
    dirs.push(dir.to_path_buf());
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            out.failed
                .push(format!("cannot list {}: {e}", dir.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(&path, files, dirs, out),
            _ => files.push(path),
        }
    }
}

/// Detaches mycel's clsact filters from every interface of the calling thread's network
/// namespace.
pub fn remove_clsact_filters() -> Removal {
    let mut out = Removal::default();
    let interfaces = match nix::net::if_::if_nameindex() {
        Ok(list) => list
            .iter()
            .map(|i| i.name().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        Err(e) => {
            out.failed
                .push(format!("cannot list the network interfaces: {e}"));
            return out;
        }
    };
    for interface in interfaces {
        for (program, attach_type, hook) in TC_PROGRAMS {
            match qdisc_detach_program(&interface, attach_type, program) {
                Ok(()) => out
                    .removed
                    .push(format!("clsact filter {program} on {interface} ({hook})")),
                Err(e) if nothing_there(&e) => {}
                Err(e) => out.failed.push(format!(
                    "cannot remove clsact filter {program} from {interface} ({hook}): {e}"
                )),
            }
        }
    }
    out
}

/// The answers of an interface without mycel's filter: none by that name, no clsact
/// qdisc (`EINVAL`/`ENOENT`), the interface gone since it was listed (`ENODEV`).
fn nothing_there(e: &TcError) -> bool {
    let errno = match e {
        TcError::IoError(io) if io.kind() == io::ErrorKind::NotFound => return true,
        TcError::IoError(io) => io.raw_os_error(),
        TcError::NetlinkError(n) => n.raw_os_error(),
        _ => None,
    };
    matches!(
        errno,
        Some(libc::EINVAL | libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_off_bpffs_is_left_alone() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("SERVICES");
        fs::write(&file, "not a pin").expect("write");
        let removal = remove_pins(dir.path());
        assert!(removal.removed.is_empty(), "{removal:?}");
        let [failure] = removal.failed.as_slice() else {
            panic!("one failure expected: {removal:?}");
        };
        assert!(
            failure.contains("not on a bpffs mount")
                && failure.contains(&dir.path().display().to_string()),
            "{failure}"
        );
        assert!(file.exists(), "a file off bpffs was removed");
    }

    #[test]
    fn a_missing_directory_holds_nothing() {
        let dir = tempfile::tempdir().expect("temporary directory");
        assert_eq!(remove_pins(&dir.path().join("gone")), Removal::default());
    }
}
