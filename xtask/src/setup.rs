//! `cargo xtask setup`: installs what building and testing mycel needs, and only that.
//!
//! Every prerequisite is a small check that either finds it present or proposes a [`Step`]
//! (commands that put it in place). Setup first checks everything, then runs the proposed
//! steps, then checks again. It is cheap when everything is there, so `test`, `demo` and
//! `bench` run it first.
//!
//! Rust toolchains and components are per-user and are installed straight away: the LLVM
//! version the rest depends on is only known once the nightly toolchain exists. For the
//! system-wide steps (apt packages, mounts) and what depends on them (bpf-linker), setup
//! either can do all of them or does none: it prints the commands and fails.

mod apt;
mod bpf_linker;
mod cargo_fuzz;
mod mounts;
mod os;
mod rustup;

pub use rustup::EBPF_TOOLCHAIN;

use std::time::Instant;

use anyhow::bail;

use crate::{cmd::Cmd, workspace::Ctx};

/// Commands that put one missing prerequisite in place.
#[derive(Debug)]
pub struct Step {
    /// What the step does, in a few words ("installing bpf-linker 0.13 for LLVM 22").
    what: String,
    /// The commands, run in order.
    cmds: Vec<Cmd>,
    /// Run instead of the last command if that one fails.
    fallback: Option<Cmd>,
    /// Why the step cannot run here, if it cannot (not root, no apt).
    blocked: Option<String>,
}

impl Step {
    fn new(what: impl Into<String>, cmds: Vec<Cmd>) -> Self {
        Self {
            what: what.into(),
            cmds,
            fallback: None,
            blocked: None,
        }
    }

    fn with_fallback(mut self, cmd: Cmd) -> Self {
        self.fallback = Some(cmd);
        self
    }

    fn blocked(mut self, why: impl Into<String>) -> Self {
        self.blocked = Some(why.into());
        self
    }

    fn run(&self) -> anyhow::Result<()> {
        println!("==> {}", self.what);
        let Some((last, first)) = self.cmds.split_last() else {
            return Ok(());
        };
        for cmd in first {
            println!("    $ {cmd}");
            cmd.run()?;
        }
        println!("    $ {last}");
        match (last.run(), &self.fallback) {
            (Ok(()), _) => Ok(()),
            (Err(e), Some(fallback)) => {
                println!("    ({e:#}; trying again without it)");
                println!("    $ {fallback}");
                fallback.run()
            }
            (Err(e), None) => Err(e),
        }
    }

    fn print_commands(&self, is_root: bool) {
        println!("    # {}", self.what);
        for cmd in &self.cmds {
            let sudo = if cmd.is_privileged() && !is_root {
                "sudo "
            } else {
                ""
            };
            println!("    {sudo}{cmd}");
        }
    }
}

/// The outcome of one check.
#[derive(Debug)]
enum Status {
    /// Present; the string says where or which, if that helps.
    Present(String),
    /// Missing, and these commands install it.
    Missing(Step),
    /// Missing but not needed for what this user can do (the note says what follows).
    Skipped(String),
}

/// One checked prerequisite.
#[derive(Debug)]
struct Check {
    what: String,
    status: Status,
}

impl Check {
    fn present(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            status: Status::Present(detail.into()),
        }
    }

    fn missing(what: impl Into<String>, step: Step) -> Self {
        Self {
            what: what.into(),
            status: Status::Missing(step),
        }
    }

    fn skipped(what: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            status: Status::Skipped(note.into()),
        }
    }

    fn print(&self) {
        let state = match &self.status {
            Status::Present(d) if d.is_empty() => "already present".to_owned(),
            Status::Present(d) => format!("already present ({d})"),
            Status::Missing(step) => format!("missing: {}", step.what),
            Status::Skipped(note) => format!("skipped: {note}"),
        };
        println!("    {:<36} {state}", self.what);
    }
}

/// Options of `cargo xtask setup`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Options {
    /// Only report what is missing; exit non-zero if anything is.
    pub check_only: bool,
}

/// Checks every prerequisite and installs what is missing.
pub fn run(ctx: &Ctx, opts: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("==> setup: checking build and test prerequisites");

    let toolchain = rustup::check_all()?;
    let pending = toolchain
        .iter()
        .filter(|c| matches!(c.status, Status::Missing(_)))
        .count();
    if pending > 0 && opts.check_only {
        toolchain.iter().for_each(Check::print);
        bail!("setup: {pending} Rust toolchain prerequisite(s) missing: run `cargo xtask setup`");
    }
    run_checks(toolchain)?;
    let llvm = rustup::nightly_llvm_major()?;

    let system = system_checks(ctx, llvm)?;
    system.iter().for_each(Check::print);
    let steps: Vec<&Step> = system
        .iter()
        .filter_map(|c| match &c.status {
            Status::Missing(step) => Some(step),
            _ => None,
        })
        .collect();
    if steps.is_empty() {
        println!(
            "==> setup: done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    if opts.check_only {
        println!("    to install what is missing, run `cargo xtask setup`, which runs:");
        steps.iter().for_each(|s| s.print_commands(ctx.is_root));
        bail!("setup: {} prerequisite(s) missing", steps.len());
    }
    if let Some(why) = steps.iter().find_map(|s| s.blocked.as_deref()) {
        println!("setup cannot install what is missing here: {why}.");
        println!("Run these commands, then `cargo xtask setup` again:");
        steps.iter().for_each(|s| s.print_commands(ctx.is_root));
        bail!("setup: missing prerequisites ({why})");
    }
    for step in steps {
        step.run()?;
    }

    // Check again: a step that "succeeded" without putting its thing in place is a failure.
    let still: Vec<String> = system_checks(ctx, llvm)?
        .into_iter()
        .filter(|c| matches!(c.status, Status::Missing(_)))
        .map(|c| c.what)
        .collect();
    if !still.is_empty() {
        bail!(
            "setup: still missing after installing: {}",
            still.join(", ")
        );
    }
    if ctx.cargo_bin_added_to_path {
        println!(
            "    note: {} is not on your PATH; xtask adds it for what it runs",
            ctx.cargo_home.join("bin").display()
        );
    }
    println!(
        "==> setup: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints the checks and runs the steps of those that are missing.
fn run_checks(checks: Vec<Check>) -> anyhow::Result<()> {
    for check in checks {
        check.print();
        if let Status::Missing(step) = check.status {
            step.run()?;
        }
    }
    Ok(())
}

/// The system-wide prerequisites and bpf-linker, for nightly's LLVM major version `llvm`.
fn system_checks(ctx: &Ctx, llvm: u32) -> anyhow::Result<Vec<Check>> {
    let os = os::OsRelease::read();
    let linker = bpf_linker::check(ctx, llvm);
    let linker_ok = matches!(linker.status, Status::Present(_));
    let mut checks = apt::check(ctx, &os, llvm, linker_ok)?;
    checks.push(linker);
    checks.push(cargo_fuzz::check(ctx));
    checks.extend(mounts::check(ctx));
    Ok(checks)
}
