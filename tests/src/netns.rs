//! Network namespaces: creating and deleting them with iproute2, and running code inside
//! one.
//!
//! Code runs inside a namespace on a fresh thread that `setns()`s into it; processes
//! spawned from that thread inherit the namespace. Unlike `ip netns exec`, this keeps the
//! caller's mount namespace, so `/sys/fs/cgroup/...` and `/sys/fs/bpf` stay visible to the
//! child (`ip netns exec` remounts `/sys`, which hides both).

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::env::NETNS_RUN_DIR;

/// The handle `ip netns` keeps for a named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(name)
}

/// Runs `f` on a new thread inside the named network namespace and returns its result.
/// Panics (with the namespace's name) if the namespace cannot be entered; a panic in `f`
/// is propagated.
pub fn run_in<T, F>(name: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns_path = path(name);
    let handle = thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            let file = File::open(&ns_path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", ns_path.display()));
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns({}) failed: {e}", ns_path.display()));
            f()
        })
        .unwrap_or_else(|e| panic!("cannot spawn a thread for netns {name}: {e}"));
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs `ip <args>` and panics with its stderr if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs several `ip` commands (one per line, without the leading `ip`) in one process,
/// inside the namespace `netns` if given. Panics with its stderr if any fails.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `ip -batch`: {e}"));
    let script = lines.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write to `ip -batch`: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("`ip -batch` failed: {e}"));
    assert!(
        out.status.success(),
        "`ip{} -batch` failed ({}):\n{script}{}",
        netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Creates a named network namespace with `lo` up.
pub fn add(name: &str) {
    ip(&["netns", "add", name]);
    ip(&["-n", name, "link", "set", "lo", "up"]);
}

/// Waits (up to `timeout`) until the device `dev` in namespace `netns` is operational: up
/// with carrier and its queueing discipline attached. Until the kernel's link watcher has
/// run (it batches events, up to a second later under load), a new device still has the
/// `noop` qdisc and drops what is sent through it, e.g. a first SYN.
pub fn wait_link_ready(netns: &str, dev: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let out = Command::new("ip")
            .args(["-n", netns, "-o", "link", "show", "dev", dev])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip link show`: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let ready = out.status.success()
            && text.contains("LOWER_UP")
            && !text.contains("qdisc noop")
            && !text.contains("state DOWN")
            && !text.contains("state LOWERLAYERDOWN");
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{dev} in netns {netns} not operational after {timeout:?}: {}",
            text.trim()
        );
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Deletes a named network namespace; errors (e.g. already gone) are ignored.
pub fn delete(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGKILLs, by PID, every process whose network namespace is the named one.
pub fn kill_netns_processes(name: &str) {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", name])
        .stdin(Stdio::null())
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
