//! The lines the host reads: results, details, features, facts.
//!
//! Every line starts with a `MYCEL-` tag so the host finds it among kernel messages, and
//! holds no newline, so a result is always one line.

use std::{fmt, io::Write as _};

/// How a check ended.
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
            Status::Fail => "fail",
            Status::Skip => "skip",
        })
    }
}

/// Most characters of a reason; details beyond go to `MYCEL-LOG` lines.
const MAX_REASON: usize = 600;
/// Most `MYCEL-LOG` lines per check: the serial console is slow under emulation.
const MAX_LOG_LINES: usize = 40;

/// Prints `MYCEL-RESULT <check> <status> <reason>`.
pub fn result(check: &str, status: Status, reason: &str) {
    let mut reason = one_line(reason);
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    emit(&format!("MYCEL-RESULT {check} {status} {reason}"));
}

/// Prints the last lines of `text` as `MYCEL-LOG <check> <line>`.
pub fn log(check: &str, text: &str) {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let skip = lines.len().saturating_sub(MAX_LOG_LINES);
    if skip > 0 {
        emit(&format!(
            "MYCEL-LOG {check} … {skip} earlier lines left out"
        ));
    }
    for line in &lines[skip..] {
        emit(&format!("MYCEL-LOG {check} {}", line.trim_end()));
    }
}

/// Prints `MYCEL-FEATURE <name> <value>`.
pub fn feature(name: &str, value: &str) {
    emit(&format!("MYCEL-FEATURE {name} {}", one_line(value)));
}

/// Prints `MYCEL-INFO <key> <value>`.
pub fn info(key: &str, value: &str) {
    emit(&format!("MYCEL-INFO {key} {}", one_line(value)));
}

/// Prints `MYCEL-DONE`: the host treats a run without it as cut short.
pub fn done() {
    emit("MYCEL-DONE");
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes one whole line at once, so concurrent kernel messages cannot split it.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    // Nothing useful can be done when the console is gone.
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

/// The chain of an error's messages, outermost first, joined by `: `.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // aya's errors often repeat their source's message; say it once.
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}
