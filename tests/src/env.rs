//! The machine the tests run on: privileges, the cgroup v2 and bpffs mounts, the binaries
//! under test, and leftovers of earlier runs that crashed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;
use std::{fs, thread};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, geteuid};

/// Set to `1` to turn a skipped privileged test into a failure (CI runs as root and must
/// not pass by skipping).
pub const REQUIRE_PRIVILEGED_ENV: &str = "MYCEL_REQUIRE_PRIVILEGED";
/// Path of the `mycel` binary to test; default: built next to the test executable.
pub const MYCEL_BIN_ENV: &str = "MYCEL_BIN";
/// Path of the `mycel-testpod` binary; default: the one Cargo built for this package.
pub const TESTPOD_BIN_ENV: &str = "MYCEL_TESTPOD_BIN";

/// Prefix of every network namespace the harness creates (`myc-<pid>-<n>[-<pod>]`).
pub const NETNS_PREFIX: &str = "myc-";
/// Prefix of every cgroup and bpffs directory the harness creates (`mycel-test-<pid>-<n>`).
pub const DIR_PREFIX: &str = "mycel-test-";
/// Where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// Where bpffs is mounted when it is not mounted yet.
const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

/// Checks that privileged tests can run here. Returns `true` if they can; otherwise prints
/// `SKIPPED <test>: <reason>` and returns `false`, or panics if
/// [`REQUIRE_PRIVILEGED_ENV`] is `1`. Used by [`crate::require_root!`].
pub fn privileged_or_skip(fallback_name: &str) -> bool {
    let Err(reason) = check_privileged() else {
        return true;
    };
    let current = thread::current();
    let name = current
        .name()
        .filter(|n| *n != "main")
        .unwrap_or(fallback_name);
    if std::env::var(REQUIRE_PRIVILEGED_ENV).as_deref() == Ok("1") {
        panic!("privileged test {name} cannot run: {reason} ({REQUIRE_PRIVILEGED_ENV}=1)");
    }
    // Straight to the stderr handle: the test harness captures `eprintln!`, and a skip must
    // be visible in a passing run.
    let _ = writeln!(std::io::stderr(), "SKIPPED {name}: {reason}");
    false
}

fn check_privileged() -> Result<(), String> {
    if !geteuid().is_root() {
        return Err("needs root (network namespaces, cgroups, eBPF)".to_owned());
    }
    cgroup2_root()?;
    bpffs_root()?;
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("`ip -V` failed: {}", out.status)),
        Err(e) => Err(format!("needs iproute2's `ip` on PATH: {e}")),
    }
}

/// One line of `/proc/mounts`: (mount point, file system type).
fn mounts() -> Vec<(PathBuf, String)> {
    let text = fs::read_to_string("/proc/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let point = unescape_mount_field(fields.next()?);
            let fstype = fields.next()?.to_owned();
            Some((PathBuf::from(point), fstype))
        })
        .collect()
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(digits) = std::str::from_utf8(&bytes[i + 1..i + 4])
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the cgroup v2 hierarchy (found in `/proc/mounts`: on hybrid layouts
/// it is not `/sys/fs/cgroup`).
pub fn cgroup2_root() -> Result<PathBuf, String> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        mounts()
            .into_iter()
            .find(|(_, fstype)| fstype == "cgroup2")
            .map(|(point, _)| point)
            .ok_or_else(|| "no cgroup v2 hierarchy is mounted (see /proc/mounts)".to_owned())
    })
    .clone()
}

/// The bpffs mount the tests pin under. Mounts it at `/sys/fs/bpf` when no bpffs is mounted
/// (as `mount -t bpf bpf /sys/fs/bpf` would).
pub fn bpffs_root() -> Result<PathBuf, String> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let find = || {
            let all: Vec<PathBuf> = mounts()
                .into_iter()
                .filter(|(_, fstype)| fstype == "bpf")
                .map(|(point, _)| point)
                .collect();
            all.iter()
                .find(|p| p.as_path() == Path::new(BPFFS_DEFAULT))
                .or(all.first())
                .cloned()
        };
        if let Some(root) = find() {
            return Ok(root);
        }
        if !geteuid().is_root() {
            return Err("no bpffs is mounted".to_owned());
        }
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS_DEFAULT])
            .output()
            .map_err(|e| format!("no bpffs is mounted and `mount` failed to run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "no bpffs is mounted and `mount -t bpf bpf {BPFFS_DEFAULT}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        find().ok_or_else(|| format!("bpffs still not mounted after mounting {BPFFS_DEFAULT}"))
    })
    .clone()
}

static TESTPOD_BIN: OnceLock<PathBuf> = OnceLock::new();

/// Records where Cargo built `mycel-testpod` (integration tests know it at compile time).
pub fn set_testpod_bin(path: &str) {
    let _ = TESTPOD_BIN.set(PathBuf::from(path));
}

/// The directory of the running test executable's profile (`target/debug`): the parent of
/// `deps/` for integration tests.
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// The `mycel-testpod` binary: [`TESTPOD_BIN_ENV`], else the one Cargo built for this
/// package's integration tests, else the one next to the test executable.
pub fn testpod_bin() -> PathBuf {
    if let Some(path) = std::env::var_os(TESTPOD_BIN_ENV) {
        return PathBuf::from(path);
    }
    if let Some(path) = TESTPOD_BIN.get() {
        return path.clone();
    }
    let path = profile_dir()
        .map(|d| d.join("mycel-testpod"))
        .filter(|p| p.exists());
    path.unwrap_or_else(|| {
        panic!(
            "mycel-testpod not found: set {TESTPOD_BIN_ENV} or build it with \
             `cargo build -p mycel-tests --bin mycel-testpod`"
        )
    })
}

/// The `mycel` binary under test: [`MYCEL_BIN_ENV`] if set; otherwise `mycel` in the
/// test executable's profile directory, built (once per process) with
/// `cargo build -p mycel-agent --bin mycel` when it is missing or older than the sources of
/// the agent and the kernel programs.
pub fn mycel_bin() -> PathBuf {
    if let Some(path) = std::env::var_os(MYCEL_BIN_ENV) {
        return PathBuf::from(path);
    }
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build_mycel) {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn build_mycel() -> Result<PathBuf, String> {
    let Some(profile) = profile_dir() else {
        return Err("cannot locate the target directory: set MYCEL_BIN".to_owned());
    };
    let bin = profile.join("mycel");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources = [
        workspace.join("agent"),
        workspace.join("ebpf"),
        workspace.join("Cargo.lock"),
    ];
    let built = fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let newest_source = sources.iter().filter_map(|p| newest_mtime(p)).max();
    let fresh = match (built, newest_source) {
        (Some(b), Some(s)) => b >= s,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if fresh {
        return Ok(bin);
    }
    if !workspace.join("Cargo.toml").exists() {
        return Err(format!(
            "{} not found and no workspace to build it from: set {MYCEL_BIN_ENV} or build it \
             with `cargo build -p mycel-agent`",
            bin.display()
        ));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = profile.parent().unwrap_or(&profile).to_path_buf();
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["-p", "mycel-agent", "--bin", "mycel"])
        .env("CARGO_TARGET_DIR", &target_dir);
    match profile.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "building the agent: cargo build -p mycel-agent --bin mycel (target dir {})",
        target_dir.display()
    );
    let out = cmd
        .output()
        .map_err(|e| format!("running {cargo:?} build failed: {e}"))?;
    if !out.status.success() || !bin.exists() {
        return Err(format!(
            "{} is missing or stale and building it failed ({}): build it with \
             `cargo build -p mycel-agent`\n{}",
            bin.display(),
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 40)
        ));
    }
    Ok(bin)
}

/// Newest modification time of a file or of the files below a directory (skipping
/// `target` directories).
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = fs::symlink_metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    let mut newest = meta.modified().ok();
    for entry in fs::read_dir(path).ok()?.flatten() {
        if entry.file_name() == "target" {
            continue;
        }
        newest = newest.max(newest_mtime(&entry.path()));
    }
    newest
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether a process with this PID exists.
fn pid_alive(pid: i32) -> bool {
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

/// The PID embedded in a name `<prefix><pid>-...` the harness gave a resource.
fn owner_pid(name: &str, prefix: &str) -> Option<i32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Once per process: removes network namespaces, cgroups, temporary and bpffs directories
/// that this harness created in earlier runs whose process is gone (crashed or killed).
pub fn cleanup_stale() {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    *done = true;
    let me = std::process::id() as i32;
    let stale = |pid: i32| pid != me && !pid_alive(pid);

    if let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name, NETNS_PREFIX).is_some_and(stale) {
                crate::netns::kill_netns_processes(&name);
                crate::netns::delete(&name);
            }
        }
    }
    if let Ok(root) = cgroup2_root()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name, DIR_PREFIX).is_some_and(stale) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name, DIR_PREFIX).is_some_and(stale) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(root) = bpffs_root()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name, DIR_PREFIX).is_some_and(stale) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Kills (by PID, SIGKILL) every process in a cgroup and its descendants, then removes the
/// cgroups, children first. Bounded: gives up after about two seconds.
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                if std::time::Instant::now() > deadline {
                    let _ = writeln!(
                        std::io::stderr(),
                        "warning: cannot remove cgroup {}: {e}",
                        dir.display()
                    );
                    return;
                }
                thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mount_field("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_field("/sys/fs/bpf"), "/sys/fs/bpf");
        assert_eq!(unescape_mount_field("/x\\"), "/x\\");
    }

    #[test]
    fn parses_owner_pids() {
        assert_eq!(owner_pid("myc-123-4", NETNS_PREFIX), Some(123));
        assert_eq!(owner_pid("myc-123-4-web-1", NETNS_PREFIX), Some(123));
        assert_eq!(owner_pid("mycel-test-77-0", DIR_PREFIX), Some(77));
        assert_eq!(owner_pid("other", NETNS_PREFIX), None);
        assert_eq!(owner_pid("myc-x-1", NETNS_PREFIX), None);
    }

    #[test]
    fn tails_text() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
