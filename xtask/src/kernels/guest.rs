//! Building `mycel-guest` for the virtual machines.
//!
//! The guest must run on a bare initramfs, so it is linked statically. Only its own final
//! link gets `+crt-static` (`cargo rustc … -- -C target-feature=+crt-static`): every
//! dependency is shared with the workspace's ordinary debug build, so building the guest
//! after the workspace costs one crate. The eBPF object is the one the agent embeds,
//! found through cargo's build-script report for `mycel-agent`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The guest's binary and the eBPF object it checks.
#[derive(Clone, Debug)]
pub struct Guest {
    pub binary: PathBuf,
    pub object: PathBuf,
}

/// The file aya-build leaves in the agent's `OUT_DIR` (`agent/build.rs`).
const OBJECT_NAME: &str = "mycel";

/// Builds the guest in the workspace at `root`.
pub fn build(root: &Path, release: bool) -> anyhow::Result<Guest> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root).args([
        "rustc",
        "--package",
        "mycel-guest",
        "--bin",
        "mycel-guest",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd.args([
        "--",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "strip=debuginfo",
    ]);
    println!("test-kernels: building mycel-guest (statically linked)");
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("could not run cargo")?;
    if !out.status.success() {
        bail!(
            "building mycel-guest failed ({}); is `guest` a member of the workspace?",
            out.status
        );
    }
    let messages = String::from_utf8_lossy(&out.stdout);
    let mut binary = None;
    let mut object = None;
    for line in messages.lines() {
        let Some(package) = json_string(line, "package_id") else {
            continue;
        };
        match json_string(line, "reason").as_deref() {
            Some("compiler-artifact") if package.contains("mycel-guest") => {
                if let Some(exe) = json_string(line, "executable") {
                    binary = Some(PathBuf::from(exe));
                }
            }
            Some("build-script-executed") if package.contains("mycel-agent") => {
                if let Some(dir) = json_string(line, "out_dir") {
                    object = Some(PathBuf::from(dir).join(OBJECT_NAME));
                }
            }
            _ => {}
        }
    }
    let binary = binary.context("cargo reported no mycel-guest executable")?;
    let object = object.context("cargo reported no build script run for mycel-agent")?;
    if !object.is_file() {
        bail!("the agent's eBPF object is not at {}", object.display());
    }
    Ok(Guest { binary, object })
}

/// The string value of `"key":"…"` in one line of cargo's JSON messages (top-level keys
/// of cargo's messages come before nested ones, so the first match is the right one).
fn json_string(line: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":\"");
    let start = line.find(&needle)? + needle.len();
    let mut out = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cargo_messages() {
        let line = r#"{"reason":"build-script-executed","package_id":"path+file:///w/agent#mycel-agent@0.1.0","linked_libs":[],"out_dir":"/w/target/debug/build/mycel-agent-1/out"}"#;
        assert_eq!(
            json_string(line, "reason").as_deref(),
            Some("build-script-executed")
        );
        assert_eq!(
            json_string(line, "out_dir").as_deref(),
            Some("/w/target/debug/build/mycel-agent-1/out")
        );
        let escaped = r#"{"executable":"/a \"b\"\\c"}"#;
        assert_eq!(
            json_string(escaped, "executable").as_deref(),
            Some("/a \"b\"\\c")
        );
        assert_eq!(json_string(line, "missing"), None);
    }
}
