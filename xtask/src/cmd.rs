//! External commands: one type that can both be shown to a person as a shell line and run.
//!
//! Every command runs with the `PATH` chosen at start-up (see [`set_path`]), so tools that
//! `cargo install` puts in `$CARGO_HOME/bin` are found even when that directory is not on
//! the caller's `PATH`.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::OnceLock,
};

use anyhow::{Context as _, bail};

static PATH: OnceLock<OsString> = OnceLock::new();

/// Sets the `PATH` every command runs with. Called once, before any command runs.
pub fn set_path(path: OsString) {
    // A second call would be a bug in main; keeping the first value is harmless.
    let _ = PATH.set(path);
}

/// The `PATH` commands run with.
pub fn path() -> OsString {
    PATH.get()
        .cloned()
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default()
}

/// Finds an executable named `tool` on the commands' `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&path())
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A command line: program, arguments, extra environment and working directory.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    /// How the program is shown (`cargo` rather than the toolchain's full path).
    shown: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    dir: Option<PathBuf>,
    privileged: bool,
}

impl Cmd {
    /// A command running `program`, shown under the same name.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref().to_owned();
        let shown = program.to_string_lossy().into_owned();
        Self {
            program,
            shown,
            args: Vec::new(),
            envs: Vec::new(),
            dir: None,
            privileged: false,
        }
    }

    /// A command running `program` but shown to people as `shown`.
    pub fn shown_as(program: impl AsRef<OsStr>, shown: &str) -> Self {
        Self {
            shown: shown.to_owned(),
            ..Self::new(program)
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the command (shown as `KEY=value` before it).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the command in `dir`.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Marks the command as needing root (shown with `sudo` to people who are not).
    pub fn privileged(mut self) -> Self {
        self.privileged = true;
        self
    }

    /// Whether the command needs root.
    pub fn is_privileged(&self) -> bool {
        self.privileged
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).env("PATH", path());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        cmd
    }

    /// Runs the command with inherited stdin/stdout/stderr and returns how it ended.
    pub fn status(&self) -> anyhow::Result<ExitStatus> {
        self.command()
            .status()
            .with_context(|| format!("could not start `{}`", self.shown))
    }

    /// Runs the command with inherited output; fails unless it exits 0.
    pub fn run(&self) -> anyhow::Result<()> {
        let status = self.status()?;
        if !status.success() {
            bail!("`{self}` failed ({status})");
        }
        Ok(())
    }

    /// Runs the command quietly and returns its stdout; fails unless it exits 0.
    pub fn read(&self) -> anyhow::Result<String> {
        let out = self
            .command()
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `{}`", self.shown))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("`{self}` failed ({}): {}", out.status, stderr.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the command quietly and returns its stdout whatever its exit status, or `None`
    /// if it could not start.
    pub fn stdout_any_status(&self) -> Option<String> {
        let out = self
            .command()
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the command quietly and returns its stdout, or `None` if it could not start or
    /// did not exit 0. For checks, where failure means "not there".
    pub fn probe(&self) -> Option<String> {
        let out = self
            .command()
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl fmt::Display for Cmd {
    /// The command as a line a person can paste into a shell.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.envs {
            write!(f, "{}={} ", k.to_string_lossy(), quote(v))?;
        }
        f.write_str(&self.shown)?;
        for a in &self.args {
            write!(f, " {}", quote(a))?;
        }
        Ok(())
    }
}

/// Quotes a word for a POSIX shell, only when it needs it.
fn quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_a_pasteable_line() {
        let cmd = Cmd::shown_as("/opt/toolchain/bin/cargo", "cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--version", "^0.13"])
            .arg("it's");
        assert_eq!(
            cmd.to_string(),
            r"LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version ^0.13 'it'\''s'"
        );
    }
}
