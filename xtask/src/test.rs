//! `cargo xtask test`: what CI runs. Setup, formatting, lints, every test, the fuzz targets
//! for a few seconds each, then the kernel matrix (the kernel-level checks on each supported
//! kernel, under qemu).

use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::{setup, workspace::Ctx};

/// How many tests run at once unless `MYCEL_TEST_THREADS` says otherwise: the
/// network-namespace tests share the host's kernel state and slow each other down.
const DEFAULT_TEST_THREADS: &str = "2";

/// Options of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check`.
    #[arg(long)]
    no_fmt: bool,
    /// Skip `cargo clippy`.
    #[arg(long)]
    no_clippy: bool,
    /// Skip the kernel matrix (`cargo xtask test-kernels`).
    #[arg(long)]
    no_kernels: bool,
    /// Skip the fuzz targets (each runs for a few seconds otherwise).
    #[arg(long)]
    no_fuzz: bool,
    /// Passed to `cargo test` after `--workspace` (a test name filter, or `-- --nocapture`).
    #[arg(last = true)]
    args: Vec<String>,
}

/// Runs the steps in order and stops at the first that fails.
pub fn run(ctx: &Ctx, opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let steps = 2
        + usize::from(!opts.no_fmt)
        + usize::from(!opts.no_clippy)
        + usize::from(!opts.no_fuzz)
        + usize::from(!opts.no_kernels);
    let mut n = 0;
    let mut announce = |what: &str| {
        n += 1;
        println!("==> [{n}/{steps}] {what}");
    };

    announce("setup");
    setup::run(ctx, setup::Options::default())?;

    if !opts.no_fmt {
        announce("cargo fmt --all --check");
        let ok = ctx
            .cargo()
            .args(["fmt", "--all", "--check"])
            .status()?
            .success();
        if !ok {
            bail!("formatting differs from rustfmt's (diff above): run `cargo fmt --all`");
        }
    }

    if !opts.no_clippy {
        announce("cargo clippy --workspace --all-targets -- -D warnings");
        let ok = ctx
            .cargo()
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .status()?
            .success();
        if !ok {
            bail!("clippy found problems (above): fix them, or run with --no-clippy meanwhile");
        }
    }

    let threads = std::env::var("MYCEL_TEST_THREADS")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_THREADS.to_owned());
    threads
        .parse::<u32>()
        .ok()
        .filter(|&t| t > 0)
        .with_context(|| format!("MYCEL_TEST_THREADS={threads:?} is not a positive number"))?;
    let require_privileged = ctx.ci || ctx.is_root;
    let mut test = ctx
        .cargo()
        .args(["test", "--workspace"])
        .args(&opts.args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_TEST_THREADS", &threads);
    if require_privileged {
        // Privileged tests fail instead of skipping when they cannot run.
        test = test.env("MYCEL_REQUIRE_PRIVILEGED", "1");
    }
    announce(&test.to_string());
    let ok = test.status()?.success();
    if !ok {
        let secs = started.elapsed().as_secs_f64();
        bail!("tests failed (above) after {secs:.0} s");
    }

    if !opts.no_fuzz {
        let targets = crate::fuzz::targets(ctx)?;
        announce(&format!(
            "fuzz targets, {} s each: {}",
            crate::fuzz::TEST_SECONDS,
            targets.join(", ")
        ));
        crate::fuzz::run_targets(
            ctx,
            &targets,
            crate::fuzz::TEST_SECONDS,
            crate::fuzz::Build::Quick,
        )?;
    }

    if !opts.no_kernels {
        announce("kernel matrix (cargo xtask test-kernels)");
        if !crate::kernels::run(&crate::kernels::Options::default())?.passed() {
            bail!("the kernel matrix failed (table above)");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("==> all checks passed in {secs:.0} s");
    Ok(())
}
