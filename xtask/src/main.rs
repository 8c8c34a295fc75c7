//! mycel's project automation, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`).
//!
//! - `setup` installs what building and testing needs (toolchains, LLVM, bpf-linker,
//!   mounts), and only what is missing.
//! - `test` runs what CI runs: setup, rustfmt, clippy, every test.
//! - `test-kernels` boots the kernels mycel supports under qemu and runs its kernel checks
//!   in each (also part of `test`).
//! - `demo` and `bench <name>` build the release binaries and run the demo or a benchmark.
//! - `fuzz` runs the cargo-fuzz targets longer than `test` does.
//! - `codegen` regenerates the files made from Rust types: the CRDs in `manifests/crds/`.

#![forbid(unsafe_code)]

mod cmd;
mod codegen;
mod fuzz;
mod kernels;
mod readme;
mod run;
mod setup;
mod test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mycel's project automation.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about, disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing mycel needs (only what is missing).
    Setup {
        /// Only report what is missing, and fail if anything is.
        #[arg(long)]
        check: bool,
    },
    /// Run setup, `cargo fmt --check`, `cargo clippy` and every test, as CI does.
    Test(test::Options),
    /// Build mycel and run the demo (needs root).
    Demo,
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under qemu and run mycel's kernel checks in
    /// each.
    TestKernels(kernels::Options),
    /// Build mycel and run a benchmark: `cargo xtask bench lb [args]`.
    Bench {
        /// The benchmark (without one, lists them).
        name: Option<String>,
        /// Passed to the benchmark.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets in fuzz/ (each for --seconds, 300 by default).
    Fuzz(fuzz::Options),
    /// Regenerate the CRDs in manifests/crds/ from the Rust types in api/ (a test fails
    /// when they are stale).
    Codegen,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; returns the exit code to end with.
fn run(cli: Cli) -> anyhow::Result<i32> {
    let ctx = workspace::Ctx::detect()?;
    match cli.command {
        Command::Setup { check } => {
            setup::run(&ctx, setup::Options { check_only: check })?;
            Ok(0)
        }
        Command::Test(opts) => {
            test::run(&ctx, &opts)?;
            Ok(0)
        }
        Command::Demo => run::demo(&ctx),
        Command::TestKernels(opts) => Ok(if kernels::run(&opts)?.passed() { 0 } else { 1 }),
        Command::Bench { name: None, .. } => {
            println!("benchmarks (run one with `cargo xtask bench <name> [args]`):");
            for (name, what) in run::BENCHES {
                println!("  {name:<8} {what}");
            }
            Ok(0)
        }
        Command::Bench {
            name: Some(name),
            args,
        } => run::bench(&ctx, &name, &args),
        Command::Fuzz(opts) => {
            fuzz::run(&ctx, &opts)?;
            Ok(0)
        }
        Command::Codegen => {
            codegen::run(&ctx)?;
            Ok(0)
        }
    }
}
