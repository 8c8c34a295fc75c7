//! Kernel filesystems the agent and the privileged tests use: bpffs at `/sys/fs/bpf` (for
//! pinned maps and links) and a cgroup v2 hierarchy (for the socket programs).
//!
//! Mounting needs root. Without root the privileged tests skip and the demo refuses to
//! start anyway, so a missing mount is only reported.

use super::{Check, Step};
use crate::{cmd::Cmd, workspace::Ctx};

const BPFFS: &str = "/sys/fs/bpf";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Where the cgroup v2 hierarchy goes when `/sys/fs/cgroup` holds the v1 controllers
/// (the "hybrid" layout systemd uses).
const CGROUP2_HYBRID: &str = "/sys/fs/cgroup/unified";

/// One line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    mount_point: String,
    fs_type: String,
}

fn mounts() -> Vec<Mount> {
    parse_mounts(&std::fs::read_to_string("/proc/mounts").unwrap_or_default())
}

fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            Some(Mount {
                mount_point: fields.next()?.to_owned(),
                fs_type: fields.next()?.to_owned(),
            })
        })
        .collect()
}

fn find_cgroup2(mounts: &[Mount]) -> Option<String> {
    mounts
        .iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point.clone())
}

/// Checks bpffs and cgroup v2.
pub fn check(ctx: &Ctx) -> Vec<Check> {
    let mounts = mounts();
    let mut checks = Vec::new();

    let what = format!("bpffs at {BPFFS}");
    if mounts
        .iter()
        .any(|m| m.fs_type == "bpf" && m.mount_point == BPFFS)
    {
        checks.push(Check::present(what, ""));
    } else {
        let mount = Cmd::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS])
            .privileged();
        checks.push(missing(
            ctx,
            what,
            format!("mounting bpffs at {BPFFS}"),
            vec![mount],
        ));
    }

    let what = "cgroup v2".to_owned();
    if let Some(at) = find_cgroup2(&mounts) {
        checks.push(Check::present(what, at));
    } else {
        // On a hybrid layout /sys/fs/cgroup is a tmpfs holding v1 hierarchies: put v2 in a
        // directory of its own there. Otherwise nothing is at /sys/fs/cgroup: use it.
        let hybrid = mounts.iter().any(|m| m.mount_point == CGROUP_ROOT);
        let at = if hybrid { CGROUP2_HYBRID } else { CGROUP_ROOT };
        let mkdir = Cmd::new("mkdir").args(["-p", at]).privileged();
        let mount = Cmd::new("mount")
            .args(["-t", "cgroup2", "none", at])
            .privileged();
        checks.push(missing(
            ctx,
            what,
            format!("mounting cgroup v2 at {at}"),
            vec![mkdir, mount],
        ));
    }
    checks
}

fn missing(ctx: &Ctx, what: String, step_what: String, cmds: Vec<Cmd>) -> Check {
    if ctx.is_root {
        Check::missing(what, Step::new(step_what, cmds))
    } else {
        let shown: Vec<String> = cmds.iter().map(|c| format!("sudo {c}")).collect();
        Check::skipped(
            what,
            format!(
                "not root; privileged tests will skip (to mount it: {})",
                shown.join(" && ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mounts = parse_mounts(
            "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
             cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
             cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n",
        );
        assert_eq!(
            find_cgroup2(&mounts).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(find_cgroup2(&mounts[..2]), None);
    }
}
