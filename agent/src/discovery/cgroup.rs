//! Finding a pod's cgroup v2 directory, and a process inside it.
//!
//! kubelet names a pod's cgroup after the pod's UID, in one of two layouts depending on
//! its cgroup driver:
//!
//! ```text
//! cgroupfs: kubepods/pod<uid>                  (Guaranteed QoS)
//!           kubepods/burstable/pod<uid>
//!           kubepods/besteffort/pod<uid>
//! systemd:  kubepods.slice/kubepods-pod<uid_>.slice
//!           kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice
//!           kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice
//! ```
//!
//! where `<uid_>` is the UID with `-` replaced by `_` (systemd reserves `-` for nesting).
//! Nodes that run inside containers (kind, k3d) add levels above `kubepods`
//! (`kubelet.slice/kubelet-kubepods.slice/…`, or the node container's own cgroup), so the
//! well-known paths are tried first and then a search of bounded depth.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// How many levels below the cgroup root the search looks for a pod's directory. kind's
/// systemd layout puts it at level 4 (`kubelet.slice/kubelet-kubepods.slice/
/// kubelet-kubepods-besteffort.slice/…-pod<uid_>.slice`); a node container's own cgroup
/// adds one more.
const MAX_POD_DEPTH: usize = 5;
/// At most this many directories are read per search, so that an unusual hierarchy
/// cannot make one lookup expensive.
const MAX_DIRS_VISITED: usize = 4096;
/// How many levels below a pod's cgroup hold its processes: containers are one level
/// down, and some runtimes nest one more (the container's init and its payload).
const MAX_PROCS_DEPTH: usize = 3;

/// The cgroup v2 directory of the pod with UID `pod_uid` under `cgroup_root`, in any of
/// the layouts kubelet uses (see the module docs). `None` when there is none (yet), or
/// when `pod_uid` is not a UID (only hex digits and `-`; anything else could name a path
/// elsewhere).
pub fn pod_cgroup(cgroup_root: &Path, pod_uid: &str) -> Option<PathBuf> {
    if pod_uid.is_empty() || !pod_uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return None;
    }
    let names = PodNames::new(pod_uid);
    let known = [
        PathBuf::from("kubepods").join(&names.cgroupfs),
        PathBuf::from("kubepods/burstable").join(&names.cgroupfs),
        PathBuf::from("kubepods/besteffort").join(&names.cgroupfs),
        PathBuf::from("kubepods.slice").join(format!("kubepods-{}", names.systemd_suffix)),
        PathBuf::from("kubepods.slice/kubepods-burstable.slice")
            .join(format!("kubepods-burstable-{}", names.systemd_suffix)),
        PathBuf::from("kubepods.slice/kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-{}", names.systemd_suffix)),
    ];
    if let Some(dir) = known
        .iter()
        .map(|relative| cgroup_root.join(relative))
        .find(|dir| dir.is_dir())
    {
        return Some(dir);
    }
    search(cgroup_root, &names)
}

/// The directory names a pod's cgroup can have.
struct PodNames {
    /// `pod<uid>` (cgroupfs driver).
    cgroupfs: String,
    /// `-pod<uid_>.slice`, the end of the systemd driver's name.
    systemd_suffix: String,
}

impl PodNames {
    fn new(uid: &str) -> PodNames {
        PodNames {
            cgroupfs: format!("pod{uid}"),
            systemd_suffix: format!("pod{}.slice", uid.replace('-', "_")),
        }
    }

    fn matches(&self, name: &str) -> bool {
        name == self.cgroupfs
            || name
                .strip_suffix(&self.systemd_suffix)
                .is_some_and(|prefix| prefix.ends_with('-'))
    }
}

/// Whether a directory is some pod's cgroup: below it are only that pod's containers, so
/// the search need not look inside.
fn is_any_pod(name: &str) -> bool {
    let cgroupfs = name.strip_prefix("pod").is_some_and(|uid| {
        !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
    });
    cgroupfs || (name.contains("-pod") && name.ends_with(".slice"))
}

/// Breadth-first search of `root` down to [`MAX_POD_DEPTH`] levels for a directory named
/// like the pod's. Unreadable directories are skipped: the cgroup tree changes while it is
/// read (containers come and go), and one vanished directory says nothing about the pod.
fn search(root: &Path, names: &PodNames) -> Option<PathBuf> {
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    let mut visited = 0usize;
    while let Some((dir, depth)) = queue.pop_front() {
        visited += 1;
        if visited > MAX_DIRS_VISITED {
            return None;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if names.matches(name) {
                return Some(entry.path());
            }
            if depth + 1 < MAX_POD_DEPTH && !is_any_pod(name) {
                queue.push_back((entry.path(), depth + 1));
            }
        }
    }
    None
}

/// The PIDs of the processes in `cgroup` and its descendants (containers are
/// sub-cgroups of the pod's), in the order found, the cgroup's own first. `Ok` with an
/// empty list when the cgroup is gone or empty; an error for any other failure to read,
/// naming the file.
pub(crate) fn pids(cgroup: &Path) -> Result<Vec<i32>, (PathBuf, io::Error)> {
    let mut found = Vec::new();
    let mut queue = VecDeque::from([(cgroup.to_path_buf(), 0usize)]);
    while let Some((dir, depth)) = queue.pop_front() {
        let procs = dir.join("cgroup.procs");
        match fs::read_to_string(&procs) {
            Ok(text) => found.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
            // Gone: the pod (or this container) was removed meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err((procs, e)),
        }
        if depth + 1 >= MAX_PROCS_DEPTH {
            continue;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err((dir, e)),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back((entry.path(), depth + 1));
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f4c2b9e-3d1a-4c5b-9e8f-7a6b5c4d3e2f";
    const UID_: &str = "0f4c2b9e_3d1a_4c5b_9e8f_7a6b5c4d3e2f";
    const OTHER: &str = "11111111-2222-3333-4444-555555555555";

    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("temporary directory");
        for dir in dirs {
            fs::create_dir_all(root.path().join(dir)).expect("create directory");
        }
        root
    }

    fn found(root: &tempfile::TempDir, uid: &str) -> Option<String> {
        pod_cgroup(root.path(), uid).map(|p| {
            p.strip_prefix(root.path())
                .expect("below the root")
                .to_string_lossy()
                .into_owned()
        })
    }

    #[test]
    fn cgroupfs_layouts() {
        for parent in ["kubepods", "kubepods/burstable", "kubepods/besteffort"] {
            let pod = format!("{parent}/pod{UID}");
            let root = tree(&[&format!("{parent}/pod{OTHER}"), &format!("{pod}/abc123")]);
            assert_eq!(found(&root, UID), Some(pod), "under {parent}");
        }
    }

    #[test]
    fn systemd_layouts() {
        for pod in [
            format!("kubepods.slice/kubepods-pod{UID_}.slice"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
        ] {
            let root = tree(&[&format!("{pod}/cri-containerd-abc.scope")]);
            assert_eq!(found(&root, UID), Some(pod.clone()));
        }
    }

    #[test]
    fn nested_layouts_are_searched() {
        // kind: kubelet runs in a node container with its own systemd.
        let kind = format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_}.slice"
        );
        let root = tree(&[
            &format!("{kind}/cri-containerd-1.scope"),
            "system.slice/x.service",
        ]);
        assert_eq!(found(&root, UID), Some(kind));

        // The whole kubepods tree below the node container's cgroup.
        let nested = format!("system.slice/docker-abc.scope/kubepods/burstable/pod{UID}");
        let root = tree(&[&nested]);
        assert_eq!(found(&root, UID), Some(nested));
    }

    #[test]
    fn too_deep_or_absent_is_none() {
        let deep = format!("a/b/c/d/e/f/pod{UID}");
        let root = tree(&[&deep, &format!("kubepods/pod{OTHER}")]);
        assert_eq!(found(&root, UID), None);
        // Another pod's directory is not searched: a pod's cgroup never holds a pod.
        let root = tree(&[&format!("kubepods/pod{OTHER}/pod{UID}")]);
        assert_eq!(found(&root, UID), None);
    }

    #[test]
    fn names_must_match_exactly() {
        // A UID that is a prefix of another, and a slice whose name merely contains it.
        let root = tree(&[
            &format!("kubepods/pod{UID}0"),
            &format!("kubepods.slice/kubepods-pod{UID_}0.slice"),
            &format!("kubepods.slice/xpod{UID_}.slice"),
        ]);
        assert_eq!(found(&root, UID), None);
    }

    #[test]
    fn uids_that_are_not_uids_are_refused() {
        let root = tree(&["kubepods/pod..", "kubepods/pod"]);
        assert_eq!(found(&root, ".."), None);
        assert_eq!(found(&root, ""), None);
        assert_eq!(found(&root, "../../etc"), None);
    }

    #[test]
    fn pids_come_from_the_pod_and_its_containers() {
        let root = tree(&["pod/c1", "pod/c2/inner"]);
        let pod = root.path().join("pod");
        fs::write(pod.join("cgroup.procs"), "").expect("write");
        fs::write(pod.join("c1/cgroup.procs"), "11\n12\n").expect("write");
        fs::write(pod.join("c2/cgroup.procs"), "").expect("write");
        fs::write(pod.join("c2/inner/cgroup.procs"), "21\n").expect("write");
        let mut found = pids(&pod).expect("pids");
        found.sort_unstable();
        assert_eq!(found, vec![11, 12, 21]);
        assert_eq!(
            pids(&root.path().join("gone")).expect("gone"),
            Vec::<i32>::new()
        );
    }
}
