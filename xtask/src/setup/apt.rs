//! System packages: LLVM's development files (to build bpf-linker) and the tools tests use.
//!
//! On Debian and Ubuntu they are apt packages, checked with `dpkg-query` and installed with
//! `apt-get`. Elsewhere setup checks for what the packages provide and says what to install.

use std::path::Path;

use super::{Check, Step, os::OsRelease};
use crate::{
    cmd::{self, Cmd},
    workspace::Ctx,
};

/// The apt packages mycel needs, for LLVM major version `llvm`.
pub fn packages(llvm: u32) -> Vec<String> {
    vec![
        // bpf-linker links against the system's LLVM; Polly, zstd and zlib are LLVM's own
        // link dependencies (llvm-config --system-libs).
        format!("llvm-{llvm}-dev"),
        format!("libpolly-{llvm}-dev"),
        "libzstd-dev".to_owned(),
        "zlib1g-dev".to_owned(),
        // aws-lc-sys (the crypto of rustls' aws-lc-rs provider) compiles C with the cc
        // crate; on x86_64 and aarch64 Linux it needs neither cmake nor clang.
        "gcc".to_owned(),
        // Tests create network namespaces and veth pairs with `ip`.
        "iproute2".to_owned(),
        // `ps`, `pkill` and `sysctl`, which tests use.
        "procps".to_owned(),
        // Traffic generators of `cargo xtask bench mtls`: TCP throughput and HTTP
        // keep-alive request rate.
        "iperf3".to_owned(),
        "wrk".to_owned(),
        // The kernel matrix: `xz` unpacks kernel modules, the keyring verifies the Debian
        // archive it downloads kernels and qemu from, `dpkg-deb` unpacks them.
        "xz-utils".to_owned(),
        "debian-archive-keyring".to_owned(),
        "dpkg".to_owned(),
    ]
}

/// Where bpf-linker's build looks for LLVM `llvm` (`LLVM_PREFIX`).
pub fn llvm_prefix(llvm: u32) -> String {
    format!("/usr/lib/llvm-{llvm}")
}

/// Checks the system packages; `linker_ok` says bpf-linker is already there (then LLVM's
/// development files are not needed on distributions setup cannot install them on).
pub fn check(ctx: &Ctx, os: &OsRelease, llvm: u32, linker_ok: bool) -> anyhow::Result<Vec<Check>> {
    if os.is_debian_like() && cmd::which("dpkg-query").is_some() {
        Ok(vec![check_debian(ctx, llvm)])
    } else {
        Ok(check_elsewhere(os, llvm, linker_ok))
    }
}

fn check_debian(ctx: &Ctx, llvm: u32) -> Check {
    let wanted = packages(llvm);
    let missing = missing_packages(&wanted);
    if missing.is_empty() {
        return Check::present("apt packages", wanted.join(" "));
    }
    let update = Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["update", "-q"])
        .privileged();
    let install = Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .privileged();
    let mut step = Step::new(
        format!("installing apt packages: {}", missing.join(" ")),
        vec![update, install],
    );
    if !ctx.is_root {
        step = step.blocked("installing apt packages needs root");
    } else if cmd::which("apt-get").is_none() {
        step = step.blocked("apt-get is not on PATH");
    }
    Check::missing("apt packages", step)
}

/// The packages of `wanted` that dpkg does not list as installed.
fn missing_packages(wanted: &[String]) -> Vec<String> {
    let out = Cmd::new("dpkg-query")
        .args(["-W", "-f", "${Package}\t${Status}\n"])
        .args(wanted)
        .stdout_any_status()
        .unwrap_or_default();
    let installed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| status.ends_with(" installed"))
        // Multi-arch packages may be listed as `name:arch`.
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect();
    wanted
        .iter()
        .filter(|p| !installed.contains(&p.as_str()))
        .cloned()
        .collect()
}

fn check_elsewhere(os: &OsRelease, llvm: u32, linker_ok: bool) -> Vec<Check> {
    let not_debian = format!("{} is not Debian or Ubuntu", os.name());
    let llvm_what = format!("LLVM {llvm} development files");
    let llvm_config = Path::new(&llvm_prefix(llvm)).join("bin/llvm-config");
    let llvm_check = if linker_ok {
        Check::present(llvm_what, "not needed: bpf-linker is installed")
    } else if llvm_config.is_file() {
        Check::present(llvm_what, llvm_prefix(llvm))
    } else {
        let step = Step::new(
            format!(
                "install LLVM {llvm}'s development files with Polly, and zstd and zlib headers, \
                 with your package manager, so that {} exists",
                llvm_config.display()
            ),
            Vec::new(),
        )
        .blocked(&not_debian);
        Check::missing(llvm_what, step)
    };
    let tool = |bin: &str, package: &str| {
        let what = format!("`{bin}` ({package})");
        match cmd::which(bin) {
            Some(path) => Check::present(what, path.display().to_string()),
            None => Check::missing(
                what,
                Step::new(
                    format!("install {package} with your package manager"),
                    Vec::new(),
                )
                .blocked(&not_debian),
            ),
        }
    };
    vec![
        llvm_check,
        tool("ip", "iproute2"),
        tool("ps", "procps"),
        tool("iperf3", "iperf3"),
        tool("wrk", "wrk"),
        tool("xz", "xz-utils"),
    ]
}
