//! bpf-linker, which links the kernel crate into BPF bytecode, built against the system's
//! LLVM of the same major version as the nightly toolchain's.
//!
//! bpf-linker 0.13 defaults to LLVM 23; it is built with `--no-default-features --features
//! llvm-N` and pointed at `/usr/lib/llvm-N` through `LLVM_PREFIX` and llvm-sys's
//! `LLVM_SYS_<N>1_PREFIX` (llvm-sys numbers its releases `N * 10 + 1`: 221 for LLVM 22).

use std::path::Path;

use super::{Check, Step, apt::llvm_prefix};
use crate::{
    cmd::{self, Cmd},
    workspace::Ctx,
};

/// The bpf-linker releases that work with aya 0.14 (a cargo version requirement).
const VERSION_REQ: &str = "^0.13";
/// The same, as `bpf-linker --version` prints it.
const VERSION_PREFIX: &str = "bpf-linker 0.13.";

/// Checks that `bpf-linker` runs, is 0.13 and uses LLVM `llvm`.
pub fn check(ctx: &Ctx, llvm: u32) -> Check {
    let what = format!("bpf-linker 0.13 (LLVM {llvm})");
    let Some(path) = cmd::which("bpf-linker") else {
        return Check::missing(what, install_step(ctx, llvm, false, "installing"));
    };
    let problem = match Cmd::new(&path).arg("--version").probe() {
        None => Some("does not run".to_owned()),
        Some(v) if !v.trim().starts_with(VERSION_PREFIX) => Some(format!("is {}", v.trim())),
        Some(_) => match linked_llvm(&path) {
            Some(found) if found != llvm => Some(format!("uses LLVM {found}")),
            _ => None,
        },
    };
    match problem {
        None => Check::present(what, path.display().to_string()),
        Some(problem) => {
            let verb = format!("reinstalling ({} {problem})", path.display());
            Check::missing(what, install_step(ctx, llvm, true, &verb))
        }
    }
}

/// The major version of the LLVM shared library `bin` links against, if `ldd` shows one
/// (`libLLVM.so.22.1` or `libLLVM-22.so`); `None` for a static build, which cannot be told
/// cheaply and is trusted.
fn linked_llvm(bin: &Path) -> Option<u32> {
    parse_ldd(&Cmd::new("ldd").arg(bin).probe()?)
}

fn parse_ldd(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|line| {
        let lib = line.split_whitespace().next()?;
        let rest = lib
            .strip_prefix("libLLVM.so.")
            .or_else(|| lib.strip_prefix("libLLVM-"))?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

fn install_step(ctx: &Ctx, llvm: u32, force: bool, verb: &str) -> Step {
    let prefix = llvm_prefix(llvm);
    let install = |locked: bool| {
        Cmd::shown_as(&ctx.cargo, "cargo")
            .env("LLVM_PREFIX", &prefix)
            .env(format!("LLVM_SYS_{}_PREFIX", llvm * 10 + 1), &prefix)
            .args(["install", "bpf-linker", "--version", VERSION_REQ])
            .args(locked.then_some("--locked"))
            .args(force.then_some("--force"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm}"))
            // Away from the workspace, so its .cargo/config.toml does not apply.
            .dir(std::env::temp_dir())
    };
    Step::new(
        format!(
            "{verb} bpf-linker 0.13 for LLVM {llvm} into {} (about a minute)",
            ctx.cargo_home.join("bin").display()
        ),
        vec![install(true)],
    )
    // The release's lock file can stop building on a newer toolchain; the latest
    // compatible dependencies usually still do.
    .with_fallback(install(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007f22e0a2c000)\n\
                   \tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f22d7800000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f22d761e000)\n";
        assert_eq!(parse_ldd(ldd), Some(22));
        assert_eq!(parse_ldd("\tlibLLVM-19.so => not found\n"), Some(19));
        assert_eq!(parse_ldd("\tstatically linked\n"), None);
    }
}
