//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (the parsers of what peers and
//! pinned maps hand the agent), each for a bounded time, starting from the checked-in
//! corpus `fuzz/corpus/<target>/`. `cargo xtask test` runs each for a few seconds; this
//! command runs them longer.
//!
//! New inputs libFuzzer finds go to `target/fuzz-corpus/<target>/`, not into the checked-in
//! corpus, so a test run leaves the tree clean; a crash leaves its input under
//! `fuzz/artifacts/<target>/` and fails the run.

use anyhow::{Context as _, bail};

use crate::{cmd::Cmd, setup, workspace::Ctx};

/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 10;

/// How the targets are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// Optimized, with AddressSanitizer: for long runs.
    Thorough,
    /// Unoptimized and without a sanitizer, which builds in a fraction of the time: the
    /// targets are safe Rust, where a bug shows as a panic or a failed assertion, which
    /// libFuzzer catches either way. For the short runs of `cargo xtask test`.
    Quick,
}

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Seconds per target.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Only this target (default: every target in fuzz/fuzz_targets/).
    target: Option<String>,
}

/// `cargo xtask fuzz`.
pub fn run(ctx: &Ctx, opts: &Options) -> anyhow::Result<()> {
    setup::run(ctx, setup::Options::default())?;
    let all = targets(ctx)?;
    let chosen: Vec<String> = match &opts.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target {t:?}; the targets are {}", all.join(", ")),
        None => all,
    };
    run_targets(ctx, &chosen, opts.seconds, Build::Thorough)
}

/// The targets: the files of `fuzz/fuzz_targets/`.
pub fn targets(ctx: &Ctx) -> anyhow::Result<Vec<String>> {
    let dir = ctx.root.join("fuzz").join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Runs each of `targets` for `seconds`; fails at the first that finds a crash.
pub fn run_targets(
    ctx: &Ctx,
    targets: &[String],
    seconds: u64,
    build: Build,
) -> anyhow::Result<()> {
    for target in targets {
        let seeds = ctx.root.join("fuzz").join("corpus").join(target);
        if !seeds.is_dir() {
            bail!(
                "{} is missing: every fuzz target has a checked-in corpus",
                seeds.display()
            );
        }
        let found = ctx.target_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
        println!("==> fuzzing {target} for {seconds} s");
        let ok = Cmd::new("rustup")
            .args(["run", setup::EBPF_TOOLCHAIN, "cargo", "fuzz", "run"])
            .args(match build {
                Build::Thorough => &[][..],
                Build::Quick => &["--dev", "--sanitizer", "none"][..],
            })
            .arg(target)
            .arg(&found)
            .arg(&seeds)
            .args([
                "--".to_owned(),
                format!("-max_total_time={seconds}"),
                "-rss_limit_mb=4096".to_owned(),
                "-print_final_stats=1".to_owned(),
            ])
            .dir(ctx.root.join("fuzz"))
            .status()?
            .success();
        if !ok {
            bail!(
                "fuzz target {target} failed (its input is under fuzz/artifacts/{target}/): \
                 reproduce with `cargo +nightly fuzz run {target} fuzz/artifacts/{target}/<file>` in fuzz/"
            );
        }
    }
    Ok(())
}
