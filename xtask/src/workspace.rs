//! What every task needs to know about where it runs: the workspace, cargo, the user.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::cmd::{self, Cmd};

/// The environment a task runs in, worked out once at start-up.
#[derive(Debug)]
pub struct Ctx {
    /// The workspace root (the directory holding the workspace `Cargo.toml`).
    pub root: PathBuf,
    /// The cargo binary that runs xtask (`$CARGO`), so nested builds use the same toolchain.
    pub cargo: PathBuf,
    /// `$CARGO_HOME`, where `cargo install` puts binaries (under `bin/`).
    pub cargo_home: PathBuf,
    /// Whether `$CARGO_HOME/bin` was missing from the caller's `PATH` (xtask adds it for
    /// the commands it runs).
    pub cargo_bin_added_to_path: bool,
    /// Whether this runs in CI (`CI` set to anything but `false`/`0`).
    pub ci: bool,
    /// Whether this runs as root (effective uid 0).
    pub is_root: bool,
}

impl Ctx {
    /// Works out the environment and sets the `PATH` commands run with.
    pub fn detect() -> anyhow::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_owned();
        let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
        let cargo_home = std::env::var_os("CARGO_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::home_dir().map(|h| h.join(".cargo")))
            .context("neither CARGO_HOME nor HOME is set")?;

        let caller_path = std::env::var_os("PATH").unwrap_or_default();
        let cargo_bin = cargo_home.join("bin");
        let on_path = std::env::split_paths(&caller_path).any(|p| p == cargo_bin);
        let path = if on_path {
            caller_path
        } else {
            let dirs = std::iter::once(cargo_bin).chain(std::env::split_paths(&caller_path));
            std::env::join_paths(dirs).context("PATH cannot hold $CARGO_HOME/bin")?
        };
        cmd::set_path(path);

        let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
        Ok(Self {
            root,
            cargo,
            cargo_home,
            cargo_bin_added_to_path: !on_path,
            ci,
            is_root: effective_uid() == Some(0),
        })
    }

    /// A `cargo` command for the workspace, run from its root.
    pub fn cargo(&self) -> Cmd {
        Cmd::shown_as(&self.cargo, "cargo").dir(&self.root)
    }

    /// The directory cargo builds into (`$CARGO_TARGET_DIR` or `target/`).
    pub fn target_dir(&self) -> PathBuf {
        match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        }
    }
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
