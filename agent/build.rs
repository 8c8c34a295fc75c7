//! Builds the kernel programs (ebpf/mycel-ebpf) for the BPF target with aya-build and
//! leaves the object in OUT_DIR, where the agent embeds it.
//!
//! Before handing over to aya-build it checks what the eBPF build needs, so a missing tool
//! fails with one line naming the fix instead of pages of linker errors.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// The toolchain that builds the kernel crate (it needs `-Z build-std=core`).
const EBPF_TOOLCHAIN: &str = "nightly";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        preflight()?;
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .join("..")
        .join("ebpf")
        .join("mycel-ebpf");
    let root = root.to_str().context("non-UTF-8 path to ebpf/mycel-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mycel-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}

fn preflight() -> anyhow::Result<()> {
    let fix = "run `cargo xtask setup` (it installs the eBPF toolchain)";
    if which("bpf-linker").is_none() {
        bail!("bpf-linker is not on PATH: {fix}");
    }
    let sysroot = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        bail!("the `{EBPF_TOOLCHAIN}` Rust toolchain is not installed: {fix}");
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!("rust-src is missing from the `{EBPF_TOOLCHAIN}` toolchain: {fix}");
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}
