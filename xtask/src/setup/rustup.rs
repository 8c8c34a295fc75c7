//! Rust toolchains and components, through rustup.
//!
//! The kernel crate builds with the `nightly` toolchain (`-Z build-std=core` needs its
//! `rust-src`); the rest of the workspace builds with the toolchain that runs xtask, which
//! needs `clippy` and `rustfmt` for `cargo xtask test`.

use anyhow::{Context as _, bail};

use super::{Check, Step};
use crate::cmd::{self, Cmd};

/// The toolchain that builds the kernel crate (the same name `agent/build.rs` uses).
pub const EBPF_TOOLCHAIN: &str = "nightly";

/// Checks rustup, the nightly toolchain and the components; what is missing is a [`Step`]
/// for the caller to run (these are per-user installs and need no root).
pub fn check_all() -> anyhow::Result<Vec<Check>> {
    if cmd::which("rustup").is_none() {
        bail!(
            "rustup is not on PATH: mycel needs it to manage the `{EBPF_TOOLCHAIN}` toolchain \
             that builds the kernel programs; install it from https://rustup.rs"
        );
    }
    let mut checks = Vec::new();
    if has_nightly()? {
        checks.push(Check::present(format!("{EBPF_TOOLCHAIN} toolchain"), ""));
        checks.push(component_check(Some(EBPF_TOOLCHAIN), &["rust-src"])?);
    } else {
        let install = Cmd::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "-c",
            "rust-src",
        ]);
        checks.push(Check::missing(
            format!("{EBPF_TOOLCHAIN} toolchain"),
            Step::new(
                format!("installing the {EBPF_TOOLCHAIN} toolchain with rust-src"),
                vec![install],
            ),
        ));
    }
    checks.push(component_check(None, &["clippy", "rustfmt"])?);
    Ok(checks)
}

/// Whether a `nightly-<host>` toolchain (not a dated one) is installed.
fn has_nightly() -> anyhow::Result<bool> {
    let list = Cmd::new("rustup").args(["toolchain", "list"]).read()?;
    Ok(list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or_default();
        name.strip_prefix(EBPF_TOOLCHAIN)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
            || name == EBPF_TOOLCHAIN
    }))
}

/// Checks `components` of `toolchain` (`None`: the toolchain running xtask, which is the
/// one rustup's proxies pick for this directory).
fn component_check(toolchain: Option<&str>, components: &[&str]) -> anyhow::Result<Check> {
    let host = host_triple()?;
    let for_what = match toolchain {
        Some(t) => t.to_owned(),
        // rustup tells the processes it starts which toolchain it picked.
        None => std::env::var("RUSTUP_TOOLCHAIN")
            .ok()
            .map(|t| t.trim_end_matches(&format!("-{host}")).to_owned())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "default toolchain".to_owned()),
    };
    let what = format!("{} ({for_what})", components.join(", "));
    let toolchain_args = toolchain.map(|t| ["--toolchain", t]);
    let installed = Cmd::new("rustup")
        .args(["component", "list", "--installed"])
        .args(toolchain_args.iter().flatten())
        .read()
        .with_context(|| format!("could not list the components of {for_what}"))?;
    let missing: Vec<&str> = components
        .iter()
        .copied()
        .filter(|c| !has_component(&installed, c, &host))
        .collect();
    if missing.is_empty() {
        return Ok(Check::present(what, ""));
    }
    let add = Cmd::new("rustup")
        .args(["component", "add"])
        .args(&missing)
        .args(toolchain_args.iter().flatten());
    Ok(Check::missing(
        what,
        Step::new(
            format!("adding {} to {for_what}", missing.join(", ")),
            vec![add],
        ),
    ))
}

/// Whether `rustup component list --installed` output lists `component`, bare (as
/// `rust-src`) or for the host (as `clippy-x86_64-unknown-linux-gnu`).
fn has_component(installed: &str, component: &str, host: &str) -> bool {
    let with_host = format!("{component}-{host}");
    installed
        .lines()
        .map(str::trim)
        .any(|line| line == component || line == with_host)
}

/// The host's target triple, from `rustc -vV`.
fn host_triple() -> anyhow::Result<String> {
    let vv = Cmd::new("rustc").arg("-vV").read()?;
    vv.lines()
        .find_map(|l| l.strip_prefix("host:"))
        .map(|h| h.trim().to_owned())
        .context("`rustc -vV` printed no `host:` line")
}

/// The LLVM major version of the nightly toolchain (`LLVM version: 22.1.2` → 22), which
/// the system LLVM and bpf-linker must match.
pub fn nightly_llvm_major() -> anyhow::Result<u32> {
    let vv = Cmd::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "-vV"])
        .read()?;
    parse_llvm_major(&vv).with_context(|| {
        format!(
            "`rustup run {EBPF_TOOLCHAIN} rustc -vV` printed no `LLVM version: N.x` line:\n{vv}"
        )
    })
}

fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major_version() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  host: x86_64-unknown-linux-gnu\nLLVM version: 22.1.2\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn finds_components_with_and_without_target() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\n\
                    rust-std-x86_64-unknown-linux-gnu\n";
        let host = "x86_64-unknown-linux-gnu";
        assert!(has_component(list, "clippy", host));
        assert!(has_component(list, "rust-src", host));
        assert!(!has_component(list, "rustfmt", host));
        assert!(!has_component(list, "rust", host));
    }
}
