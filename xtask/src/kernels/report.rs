//! The outcome of a matrix run: per kernel, per check, pass/fail/skip with the reason; as a
//! terminal table and as Markdown (for the README's kernel requirements).

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    path::{Path, PathBuf},
};

use super::{KernelSpec, assets::KernelImage};

/// How one check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        })
    }
}

/// One check on one kernel.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub name: String,
    pub status: Status,
    /// Why: for a failure, the error (a verifier rejection names the errno and the
    /// verifier's last words); for a pass, what was seen.
    pub reason: String,
    /// Detail lines the guest sent (the end of a verifier log).
    pub log: Vec<String>,
}

/// How a virtual machine's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The guest finished all its checks.
    Done,
    /// The deadline passed; qemu was killed.
    TimedOut(String),
    /// qemu ended (a kernel panic, a crash) before the guest finished.
    CutShort(String),
    /// The machine was never started (a download or the initramfs failed).
    NotRun(String),
}

/// Everything one kernel reported.
#[derive(Clone, Debug)]
pub struct KernelRun {
    /// The series, `6.1`.
    pub series: String,
    /// Where the kernel comes from, for people.
    pub origin: String,
    /// Debian package and version.
    pub package: String,
    pub version: String,
    /// `uname -r` inside the guest.
    pub release: String,
    pub checks: Vec<CheckResult>,
    /// Probed kernel features (`helper:…`, `program-type:…`) and their values.
    pub features: Vec<(String, String)>,
    /// Other facts the guest printed.
    pub info: BTreeMap<String, String>,
    pub ended: Ended,
    /// Wall-clock time from starting qemu to its end.
    pub seconds: f64,
    /// Wall-clock time from starting qemu to the guest's first line (boot time).
    pub boot_seconds: Option<f64>,
    /// The whole serial console.
    pub console_log: PathBuf,
}

impl KernelRun {
    pub(super) fn new(spec: &KernelSpec, image: &KernelImage, log: &Path) -> Self {
        Self {
            series: spec.series.to_string(),
            origin: spec.origin.to_string(),
            package: image.package.clone(),
            version: image.version.clone(),
            release: image.release.clone(),
            checks: Vec::new(),
            features: Vec::new(),
            info: BTreeMap::new(),
            ended: Ended::NotRun("not started".into()),
            seconds: 0.0,
            boot_seconds: None,
            console_log: log.to_path_buf(),
        }
    }

    pub(super) fn not_run(spec: &KernelSpec, why: String) -> Self {
        Self {
            series: spec.series.to_string(),
            origin: spec.origin.to_string(),
            package: String::new(),
            version: String::new(),
            release: String::new(),
            checks: Vec::new(),
            features: Vec::new(),
            info: BTreeMap::new(),
            ended: Ended::NotRun(why),
            seconds: 0.0,
            boot_seconds: None,
            console_log: PathBuf::new(),
        }
    }

    /// Whether the guest finished and no check failed.
    pub fn passed(&self) -> bool {
        self.ended == Ended::Done && self.checks.iter().all(|c| c.status != Status::Fail)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// One line: how it ended and the counts.
    pub fn summary(&self) -> String {
        let counts = format!(
            "{} pass, {} fail, {} skip",
            self.count(Status::Pass),
            self.count(Status::Fail),
            self.count(Status::Skip)
        );
        match &self.ended {
            Ended::Done => {
                let boot = self
                    .boot_seconds
                    .map(|b| format!(" (init reached after {b:.1} s)"))
                    .unwrap_or_default();
                format!(
                    "{} finished in {:.1} s{boot}: {counts}",
                    self.release, self.seconds
                )
            }
            Ended::TimedOut(why) => {
                format!("TIMED OUT after {:.1} s ({counts}): {why}", self.seconds)
            }
            Ended::CutShort(why) => {
                format!("CUT SHORT after {:.1} s ({counts}): {why}", self.seconds)
            }
            Ended::NotRun(why) => format!("NOT RUN: {why}"),
        }
    }

    fn check(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// The whole matrix.
#[derive(Clone, Debug)]
pub struct Report {
    pub kernels: Vec<KernelRun>,
    /// Wall-clock time of the whole task, downloads and build included.
    pub seconds: f64,
}

impl Report {
    /// Whether every kernel finished with no failed check (skips are allowed: each says why).
    pub fn passed(&self) -> bool {
        !self.kernels.is_empty() && self.kernels.iter().all(KernelRun::passed)
    }

    /// Check names in the order the guests reported them.
    fn check_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for run in &self.kernels {
            for c in &run.checks {
                if !names.contains(&c.name) {
                    names.push(c.name.clone());
                }
            }
        }
        names
    }

    fn feature_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for run in &self.kernels {
            for (f, _) in &run.features {
                if !names.contains(f) {
                    names.push(f.clone());
                }
            }
        }
        names
    }

    /// The terminal table: checks × kernels, then every failure and skip with its reason.
    pub fn table(&self) -> String {
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut header = vec!["check".to_string()];
        header.extend(self.kernels.iter().map(|k| k.series.clone()));
        rows.push(header);
        let mut release = vec!["kernel".to_string()];
        release.extend(self.kernels.iter().map(|k| short_release(&k.release)));
        rows.push(release);
        for name in self.check_names() {
            let mut row = vec![name.clone()];
            row.extend(self.kernels.iter().map(|k| {
                k.check(&name)
                    .map_or_else(|| "-".to_string(), |c| c.status.to_string())
            }));
            rows.push(row);
        }
        let mut end = vec!["(run)".to_string()];
        end.extend(self.kernels.iter().map(|k| match &k.ended {
            Ended::Done => format!("{:.0} s", k.seconds),
            Ended::TimedOut(_) => "TIMEOUT".into(),
            Ended::CutShort(_) => "CUT SHORT".into(),
            Ended::NotRun(_) => "NOT RUN".into(),
        }));
        rows.push(end);

        let mut out = render(&rows);
        let features = self.feature_names();
        if !features.is_empty() {
            let mut rows = vec![{
                let mut h = vec!["kernel feature".to_string()];
                h.extend(self.kernels.iter().map(|k| k.series.clone()));
                h
            }];
            for f in features {
                let mut row = vec![f.clone()];
                row.extend(self.kernels.iter().map(|k| {
                    k.features
                        .iter()
                        .find(|(n, _)| *n == f)
                        .map_or_else(|| "-".to_string(), |(_, v)| v.clone())
                }));
                rows.push(row);
            }
            out.push('\n');
            out.push_str(&render(&rows));
        }

        let mut details = String::new();
        for k in &self.kernels {
            if k.ended != Ended::Done {
                let _ = writeln!(details, "[{}] {}", k.series, k.summary());
            }
            for c in k.checks.iter().filter(|c| c.status != Status::Pass) {
                let _ = writeln!(
                    details,
                    "[{}] {} {}: {}",
                    k.series, c.name, c.status, c.reason
                );
                let skip = c.log.len().saturating_sub(6);
                for l in &c.log[skip..] {
                    let _ = writeln!(details, "        {l}");
                }
            }
        }
        if !details.is_empty() {
            out.push('\n');
            out.push_str(&details);
        }
        let logs: Vec<String> = self
            .kernels
            .iter()
            .filter(|k| !k.console_log.as_os_str().is_empty())
            .map(|k| format!("{}: {}", k.series, k.console_log.display()))
            .collect();
        let _ = writeln!(
            out,
            "\n{} in {:.1} s. Consoles: {}",
            if self.passed() { "PASSED" } else { "FAILED" },
            self.seconds,
            logs.join(", ")
        );
        out
    }

    /// The matrix as Markdown: a table of checks × kernels (✅ pass, ❌ fail, ➖ skip), the
    /// kernels' packages, and the reasons for everything that did not pass.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = write!(out, "| check |");
        for k in &self.kernels {
            let _ = write!(out, " {} |", k.series);
        }
        let _ = write!(out, "\n|---|");
        for _ in &self.kernels {
            let _ = write!(out, ":---:|");
        }
        out.push('\n');
        for name in self.check_names() {
            let _ = write!(out, "| `{name}` |");
            for k in &self.kernels {
                let cell = match k.check(&name).map(|c| c.status) {
                    Some(Status::Pass) => "✅",
                    Some(Status::Fail) => "❌",
                    Some(Status::Skip) => "➖",
                    None => " ",
                };
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
        out.push('\n');
        for k in &self.kernels {
            let _ = writeln!(
                out,
                "- **{}**: {} `{}` {} (`{}`)",
                k.series, k.origin, k.package, k.version, k.release
            );
        }
        let mut notes = String::new();
        for k in &self.kernels {
            if k.ended != Ended::Done {
                let _ = writeln!(notes, "- {}: {}", k.series, k.summary());
            }
            for c in k.checks.iter().filter(|c| c.status != Status::Pass) {
                let _ = writeln!(
                    notes,
                    "- {} `{}` ({}): {}",
                    k.series, c.name, c.status, c.reason
                );
            }
        }
        if !notes.is_empty() {
            out.push('\n');
            out.push_str(&notes);
        }
        out
    }
}

/// `5.10.0-35-cloud-amd64` → `5.10.0-35`: the flavour is the same in every column.
fn short_release(release: &str) -> String {
    release.trim_end_matches("-cloud-amd64").to_string()
}

fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            let _ = writeln!(out, "{}", rule.join("  "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(series: &str, checks: &[(&str, Status)]) -> KernelRun {
        KernelRun {
            series: series.into(),
            origin: "test".into(),
            package: "linux-image-test".into(),
            version: "1".into(),
            release: format!("{series}.0-1-cloud-amd64"),
            checks: checks
                .iter()
                .map(|(n, s)| CheckResult {
                    name: (*n).into(),
                    status: *s,
                    reason: format!("because {n}"),
                    log: Vec::new(),
                })
                .collect(),
            features: vec![("helper:x".into(), "yes".into())],
            info: BTreeMap::new(),
            ended: Ended::Done,
            seconds: 3.0,
            boot_seconds: Some(1.0),
            console_log: PathBuf::from("console.log"),
        }
    }

    #[test]
    fn fails_on_any_failed_check_but_not_on_skips() {
        let ok = Report {
            kernels: vec![run("6.1", &[("a", Status::Pass), ("b", Status::Skip)])],
            seconds: 1.0,
        };
        assert!(ok.passed());
        let bad = Report {
            kernels: vec![
                run("5.10", &[("a", Status::Fail)]),
                run("6.1", &[("a", Status::Pass)]),
            ],
            seconds: 1.0,
        };
        assert!(!bad.passed());
        let table = bad.table();
        assert!(table.contains("FAIL"), "{table}");
        assert!(table.contains("[5.10] a FAIL: because a"), "{table}");
        assert!(
            bad.markdown().contains("| `a` | ❌ | ✅ |"),
            "{}",
            bad.markdown()
        );
    }

    #[test]
    fn an_unfinished_guest_fails() {
        let mut r = run("6.12", &[("a", Status::Pass)]);
        r.ended = Ended::TimedOut("no MYCEL-DONE".into());
        let report = Report {
            kernels: vec![r],
            seconds: 1.0,
        };
        assert!(!report.passed());
        assert!(report.table().contains("TIMEOUT"));
    }
}
