//! Child processes of a test: started inside a network namespace and a cgroup, their
//! output captured line by line, and killed by PID when dropped.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns;

/// Lines read so far from one output stream, and whether it has ended.
#[derive(Debug, Default)]
struct Captured {
    state: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

impl Captured {
    fn lock(&self) -> MutexGuard<'_, (Vec<String>, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the stream ended or `deadline` passed.
    fn wait_eof(&self, deadline: Instant) {
        let mut state = self.lock();
        while !state.1 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn reader(self: Arc<Self>, stream: impl Read + Send + 'static) {
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        self.lock()
                            .0
                            .push(text.trim_end_matches(['\n', '\r']).to_owned());
                        self.changed.notify_all();
                    }
                }
            }
            self.lock().1 = true;
            self.changed.notify_all();
        });
    }
}

/// A running child process. Dropping it SIGKILLs it (by PID) if it is still running.
#[derive(Debug)]
pub struct Proc {
    desc: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `program args…` inside the network namespace `netns` (if given) and the
    /// cgroup directory `cgroup` (if given), with stdin, stdout and stderr piped.
    ///
    /// The child moves itself into the cgroup (`sh -c 'echo $$ > …/cgroup.procs && exec …'`)
    /// before it execs the program, so every socket the program opens belongs to it.
    pub fn spawn<S: AsRef<OsStr>>(
        netns: Option<&str>,
        cgroup: Option<&Path>,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Proc {
        Self::spawn_inner(netns, cgroup, program.as_ref(), args, None)
    }

    /// Starts `program args…` inside the network namespace `netns` (if given) with stdout
    /// and stderr appended to the file `log` (which survives the process, also a killed one).
    pub fn spawn_logged<S: AsRef<OsStr>>(
        netns: Option<&str>,
        program: impl AsRef<OsStr>,
        args: &[S],
        log: &Path,
    ) -> Proc {
        Self::spawn_inner(netns, None, program.as_ref(), args, Some(log))
    }

    fn spawn_inner<S: AsRef<OsStr>>(
        netns: Option<&str>,
        cgroup: Option<&Path>,
        program: &OsStr,
        args: &[S],
        log: Option<&Path>,
    ) -> Proc {
        let program = program.to_os_string();
        let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
        let desc = describe(netns, &program, &args);
        let mut cmd = match cgroup {
            Some(cg) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(r#"echo $$ > "$0" && exec "$@""#)
                    .arg(cg.join("cgroup.procs"))
                    .arg(&program)
                    .args(&args);
                cmd
            }
            None => {
                let mut cmd = Command::new(&program);
                cmd.args(&args);
                cmd
            }
        };
        cmd.stdin(Stdio::piped());
        match log {
            Some(path) => {
                let open = || {
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .unwrap_or_else(|e| panic!("cannot open log {}: {e}", path.display()))
                };
                cmd.stdout(open()).stderr(open());
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        let spawn_desc = desc.clone();
        let spawn = move || {
            let mut cmd = cmd;
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {spawn_desc}: {e}"))
        };
        let mut child = match netns {
            Some(ns) => netns::run_in(ns, spawn),
            None => spawn(),
        };
        let stdout = Arc::new(Captured::default());
        let stderr = Arc::new(Captured::default());
        if let Some(out) = child.stdout.take() {
            Arc::clone(&stdout).reader(out);
        }
        if let Some(err) = child.stderr.take() {
            Arc::clone(&stderr).reader(err);
        }
        Proc {
            desc,
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    /// What was started, for messages.
    pub fn desc(&self) -> &str {
        &self.desc
    }

    /// The child's PID.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    /// Lines the child wrote to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().0.clone()
    }

    /// What the child wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout_lines().join("\n")
    }

    /// What the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().0.join("\n")
    }

    /// Waits up to `timeout` for a stdout line (any line so far counts) matching `pred`.
    /// Returns `None` on timeout or when stdout ended without one.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.stdout.lock();
        loop {
            if let Some(line) = state.0.iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            let now = Instant::now();
            if state.1 || now >= deadline {
                return None;
            }
            state = self
                .stdout
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` until stdout has more than `n` lines; returns how many it has.
    pub fn wait_for_lines(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut state = self.stdout.lock();
        loop {
            let now = Instant::now();
            if state.0.len() > n || state.1 || now >= deadline {
                return state.0.len();
            }
            state = self
                .stdout
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Writes to the child's stdin.
    pub fn write_stdin(&mut self, data: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(data.as_bytes());
        }
    }

    /// Closes the child's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The exit status if the child has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the child to exit and for its output to be read; panics
    /// (after killing it) if it does not. Returns the status, stdout and stderr.
    pub fn wait_output(&mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let Some(status) = self.wait_timeout(timeout) else {
            self.kill();
            panic!(
                "{} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
                self.desc,
                crate::env::tail(&self.stdout(), 20),
                crate::env::tail(&self.stderr(), 20)
            );
        };
        // The output ends when the last holder of the pipes exits; bounded in case the
        // child left a grandchild holding them.
        let deadline = Instant::now() + Duration::from_secs(2);
        for captured in [&self.stdout, &self.stderr] {
            captured.wait_eof(deadline);
        }
        (status, self.stdout(), self.stderr())
    }

    /// Sends `signal` to the child (by PID) unless it has exited.
    pub fn signal(&mut self, signal: Signal) {
        if self.try_status().is_none() {
            let _ = kill(Pid::from_raw(self.pid()), signal);
        }
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.wait_timeout(Duration::from_secs(5));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe(netns: Option<&str>, program: &OsStr, args: &[OsString]) -> String {
    let mut desc = String::new();
    if let Some(ns) = netns {
        desc.push_str(&format!("[netns {ns}] "));
    }
    let name = Path::new(program)
        .file_name()
        .unwrap_or(program)
        .to_string_lossy();
    desc.push_str(&name);
    for arg in args {
        desc.push(' ');
        desc.push_str(&arg.to_string_lossy());
    }
    desc
}
