//! `mycel-guest`: the program `cargo xtask test-kernels` runs inside each virtual machine.
//!
//! It checks mycel's kernel side against the kernel it runs on, through the agent's own
//! datapath code (`mycel_agent::datapath`), and prints one machine-readable line per check
//! on the console, which the host parses out of the kernel's noise:
//!
//! ```text
//! MYCEL-RESULT <check> pass|fail|skip <reason>
//! MYCEL-LOG <check> <detail line>
//! MYCEL-FEATURE <feature> <value>
//! MYCEL-INFO <key> <value>
//! MYCEL-DONE
//! ```
//!
//! Subcommands:
//! - `mycel-guest run [--object PATH]` (the default) runs every check; with `--object`, it
//!   also loads each program of that eBPF object on its own, so one rejected program does
//!   not hide the verdict on the others.
//! - `mycel-guest client CGROUP tcp|udp ADDR` joins `CGROUP` first (before it has any
//!   thread or socket), then talks to `ADDR`; `run` starts it as the client of the
//!   service checks, so only the client's sockets go through the cgroup's programs.

#![forbid(unsafe_code)]

mod checks;
mod client;
mod probe;
mod report;

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("client") => client::main(&args[1..]),
        None | Some("run") => {
            let object = match args.get(1..).unwrap_or_default() {
                [] => None,
                [flag, path] if flag == "--object" => Some(PathBuf::from(path)),
                other => return usage(&format!("unexpected arguments {other:?}")),
            };
            checks::run_all(object.as_deref());
            ExitCode::SUCCESS
        }
        Some(other) => usage(&format!("unknown subcommand {other:?}")),
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "mycel-guest: {problem}\nusage: mycel-guest [run [--object PATH]] | client CGROUP tcp|udp ADDR"
    );
    ExitCode::from(64)
}
