//! Booting one kernel under qemu and reading what the guest reports.
//!
//! qemu runs with software emulation (`-accel tcg`), one CPU, no default devices and no
//! network card; the serial console is qemu's stdout. Every console line goes to a log
//! file; lines carrying a `MYCEL-` tag are parsed wherever they appear in the line, so
//! kernel messages printed in between do no harm. A wall-clock deadline kills qemu (by
//! its PID) if the guest hangs.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::Stdio,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use super::{
    KernelSpec,
    assets::{KernelImage, Qemu},
    report::{CheckResult, Ended, KernelRun, Status},
};

/// Guest memory: the initramfs (a few tens of MiB) lives in it.
const MEMORY: &str = "512M";

/// Kernel command line. `panic=-1` with `-no-reboot` ends qemu on a panic; `quiet` keeps
/// the slow emulated serial console short; `mitigations=off` and `edd=off` save boot time
/// under emulation and change nothing the checks look at.
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet mitigations=off edd=off";

/// Console lines kept to explain a run that ended without `MYCEL-DONE`.
const TAIL_LINES: usize = 12;

/// Boots `image` with `initrd`, writes the console to `log`, and returns what the guest
/// reported.
pub fn boot(
    spec: &KernelSpec,
    image: &KernelImage,
    initrd: &Path,
    qemu: &Qemu,
    log: &Path,
    timeout: Duration,
    verbose: bool,
) -> KernelRun {
    let started = Instant::now();
    let mut run = KernelRun::new(spec, image, log);
    let mut cmd = qemu.command();
    cmd.args(["-accel", "tcg", "-m", MEMORY, "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            run.ended = Ended::NotRun(format!("could not start {}: {e}", qemu.binary.display()));
            return run;
        }
    };
    let mut console = fs::File::create(log).ok();

    // A reader thread turns stdout into lines; the loop below enforces the deadline.
    let (tx, rx) = mpsc::channel::<String>();
    if let Some(stdout) = child.stdout.take() {
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    let mut stderr = child.stderr.take();

    let mut parser = Parser::default();
    let deadline = started + timeout;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                if let Some(f) = console.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                let tagged = line.contains("MYCEL-");
                if tagged && run.boot_seconds.is_none() {
                    run.boot_seconds = Some(started.elapsed().as_secs_f64());
                }
                if let Some(shown) = parser.line(&line)
                    && verbose
                {
                    let at = started.elapsed().as_secs_f64();
                    println!("[{} +{at:.1}s] {shown}", spec.series);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    timed_out = true;
                    let _ = child.kill();
                    break;
                }
            }
        }
    }
    let status = child.wait();
    let mut qemu_err = String::new();
    if let Some(mut s) = stderr.take() {
        let _ = std::io::Read::read_to_string(&mut s, &mut qemu_err);
    }
    run.seconds = started.elapsed().as_secs_f64();
    parser.finish(&mut run);
    run.ended = if parser.done {
        Ended::Done
    } else if timed_out {
        Ended::TimedOut(format!(
            "no MYCEL-DONE within {} s; last console lines: {}",
            timeout.as_secs(),
            parser.tail.join(" ⏎ ")
        ))
    } else {
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        Ended::CutShort(format!(
            "qemu ended ({status}) before MYCEL-DONE; qemu said: {}; last console lines: {}",
            qemu_err.trim(),
            parser.tail.join(" ⏎ ")
        ))
    };
    run
}

/// Collects results from console lines.
#[derive(Debug, Default)]
struct Parser {
    checks: Vec<CheckResult>,
    logs: BTreeMap<String, Vec<String>>,
    features: Vec<(String, String)>,
    info: BTreeMap<String, String>,
    done: bool,
    /// The last console lines that were not results.
    tail: Vec<String>,
}

impl Parser {
    /// Takes one console line; returns a short form of it when it carried a result.
    fn line(&mut self, line: &str) -> Option<String> {
        let Some(at) = line.find("MYCEL-") else {
            if !line.trim().is_empty() {
                self.tail.push(line.trim().to_string());
                if self.tail.len() > TAIL_LINES {
                    self.tail.remove(0);
                }
            }
            return None;
        };
        let tagged = &line[at..];
        let (tag, rest) = tagged.split_once(' ').unwrap_or((tagged, ""));
        match tag {
            "MYCEL-RESULT" => {
                let mut words = rest.splitn(3, ' ');
                let name = words.next().unwrap_or_default().to_string();
                let status = match words.next() {
                    Some("pass") => Status::Pass,
                    Some("skip") => Status::Skip,
                    _ => Status::Fail,
                };
                let reason = words.next().unwrap_or_default().to_string();
                self.checks.retain(|c| c.name != name);
                self.checks.push(CheckResult {
                    name: name.clone(),
                    status,
                    reason: reason.clone(),
                    log: Vec::new(),
                });
                Some(format!("{name}: {status} {reason}"))
            }
            "MYCEL-LOG" => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                self.logs
                    .entry(name.to_string())
                    .or_default()
                    .push(text.to_string());
                None
            }
            "MYCEL-FEATURE" => {
                let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                self.features.push((name.to_string(), value.to_string()));
                None
            }
            "MYCEL-INFO" => {
                let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
                self.info.insert(key.to_string(), value.to_string());
                None
            }
            "MYCEL-DONE" => {
                self.done = true;
                None
            }
            _ => None,
        }
    }

    fn finish(&mut self, run: &mut KernelRun) {
        for check in &mut self.checks {
            if let Some(log) = self.logs.remove(&check.name) {
                check.log = log;
            }
        }
        run.checks = std::mem::take(&mut self.checks);
        run.features = std::mem::take(&mut self.features);
        if let Some(release) = self.info.get("kernel") {
            run.release = release.clone();
        }
        run.info = std::mem::take(&mut self.info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_results_among_kernel_noise() {
        let mut p = Parser::default();
        p.line("[    1.234] random: crng init done");
        p.line("MYCEL-INFO kernel 6.1.0-50-cloud-amd64");
        p.line("MYCEL-RESULT modules pass loaded: veth sch_ingress cls_bpf");
        p.line("[    2.0] veth: somethingMYCEL-RESULT load-attach fail BPF_PROG_LOAD: Invalid argument");
        p.line("MYCEL-LOG load-attach 12: (85) call bpf_set_retval#187");
        p.line("MYCEL-FEATURE helper:cgroup_sock_addr:set_retval no");
        p.line("MYCEL-DONE");
        assert!(p.done);
        assert_eq!(p.checks.len(), 2);
        assert_eq!(p.checks[1].status, Status::Fail);
        assert_eq!(p.checks[1].reason, "BPF_PROG_LOAD: Invalid argument");
        assert_eq!(
            p.tail,
            vec!["[    1.234] random: crng init done".to_string()]
        );
        assert_eq!(p.logs["load-attach"].len(), 1);
        assert_eq!(p.info["kernel"], "6.1.0-50-cloud-amd64");
    }
}
