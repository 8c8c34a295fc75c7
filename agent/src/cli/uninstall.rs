//! `mycel uninstall`: removes what mycel agents left on a node once no agent runs there
//! (after the DaemonSet is deleted, or the standalone agent stopped): every pin under the
//! bpffs directory (which detaches the programs), mycel's clsact filters on the node's
//! interfaces, and the set-up inside every workload's network namespace. Idempotent: a
//! second run finds nothing and succeeds.
//!
//! The code is the agent's own (`--detach-on-exit` runs the same functions for its
//! workloads): [`crate::datapath::remove_pins`], [`crate::datapath::remove_clsact_filters`],
//! [`crate::podnet::undo_namespaces`].

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{config, datapath, podnet};

/// Default `--wait`: a stopping agent's last lease (10 s by default) runs out well within it.
pub const DEFAULT_UNINSTALL_WAIT: &str = "30s";

/// `mycel uninstall`.
#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The agents' bpffs directory: every pin below it is removed.
    #[arg(long, env = "MYCEL_BPFFS", default_value = config::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Only the network namespaces of processes below this cgroup v2 directory [default:
    /// the namespaces of every process].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// A directory of bind-mounted network namespaces to restore too; repeatable [default:
    /// /run/netns and /var/run/netns].
    #[arg(long = "netns-dir")]
    pub netns_dirs: Vec<PathBuf>,
    /// How long to wait for a stopping agent's redirect lease to run out before giving up
    /// (while it holds, an agent may still be running).
    #[arg(long, default_value = DEFAULT_UNINSTALL_WAIT)]
    pub wait: String,
    /// Remove everything even while an agent's lease holds. A running agent keeps its
    /// programs attached through the links it holds open, but only until it exits; its
    /// maps and pins are gone.
    #[arg(long)]
    pub force: bool,
}

/// `mycel uninstall`, reporting on stdout.
pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    uninstall_to(args, &mut std::io::stdout())
}

/// `mycel uninstall`, reporting to `out`: one line per thing removed, then a summary. Fails,
/// after doing all it can, naming every thing it could not remove.
pub fn uninstall_to(args: &UninstallArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let wait = config::duration("--wait", &args.wait, 0)?;
    if !args.force {
        wait_for_lease(args, wait, out)?;
    }
    let mut removal = datapath::remove_pins(&args.bpffs);
    removal.extend(datapath::remove_clsact_filters());
    for line in &removal.removed {
        writeln!(out, "removed {line}")?;
    }
    let scope = podnet::Scope {
        cgroup: args.cgroup.clone(),
        netns_dirs: if args.netns_dirs.is_empty() {
            podnet::NETNS_DIRS.map(PathBuf::from).to_vec()
        } else {
            args.netns_dirs.clone()
        },
        only_cookies: None,
    };
    let mut failed = removal.failed;
    let mut removed = removal.removed.len();
    match podnet::undo_namespaces(&scope) {
        Ok(namespaces) => {
            for ns in namespaces {
                for line in &ns.removed {
                    writeln!(
                        out,
                        "removed in network namespace {}: {line}",
                        ns.netns.display()
                    )?;
                }
                removed += ns.removed.len();
                if let Some(e) = ns.error {
                    failed.push(format!("network namespace {}: {e}", ns.netns.display()));
                }
            }
        }
        Err(e) => failed.push(format!("cannot find the network namespaces: {e}")),
    }
    if !failed.is_empty() {
        bail!(
            "removed {removed} items, but could not remove these (run it again once fixed):\n  {}",
            failed.join("\n  ")
        );
    }
    if removed == 0 {
        writeln!(out, "nothing of mycel was left on this node")?;
    } else {
        writeln!(
            out,
            "removed {removed} items; nothing of mycel is left on this node"
        )?;
    }
    Ok(())
}

/// Waits while the pinned redirect lease holds (a stopping agent's runs out after its
/// `--redirect-grace`); fails if it still holds after `wait`.
fn wait_for_lease(
    args: &UninstallArgs,
    wait: Duration,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        let remaining = match datapath::pinned_lease_remaining(&args.bpffs) {
            Ok(Some(r)) => r,
            // No lease pinned: no agent of this version ran here, or its pins are gone.
            Ok(None) => return Ok(()),
            Err(e) => bail!(
                "cannot read the agents' redirect lease under {}: {e} (pass --force to remove \
                 everything without checking that no agent runs)",
                args.bpffs.display()
            ),
        };
        if remaining.is_zero() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "an agent's redirect lease under {} still holds for {:.1}s after waiting {:.1}s, \
                 so the agent is probably still running: stop it first (delete the DaemonSet, \
                 or stop the service), or pass --force",
                args.bpffs.display(),
                remaining.as_secs_f64(),
                wait.as_secs_f64(),
            );
        }
        if !told {
            writeln!(
                out,
                "an agent's redirect lease holds for another {:.1}s: waiting for it to run out",
                remaining.as_secs_f64()
            )?;
            told = true;
        }
        std::thread::sleep(
            remaining
                .min(deadline - now)
                .min(Duration::from_millis(250)),
        );
    }
}
