//! `cargo xtask demo` and `cargo xtask bench <name>`: build the release binaries and run
//! one of the programs of the `mycel-tests` crate against them.

use std::path::PathBuf;

use anyhow::{Context as _, bail, ensure};

use crate::{cmd::Cmd, setup, workspace::Ctx};

/// The benchmarks `mycel-bench` knows.
pub const BENCHES: &[(&str, &str)] = &[
    (
        "lb",
        "socket-level load balancing: ClusterIP vs direct connections, and map programming time",
    ),
    (
        "datapath",
        "TC policy and flow programs: ns per packet by number of rules, connection cost, policy propagation",
    ),
    (
        "controlplane",
        "the Kubernetes source at scale: time to ready, memory, EndpointSlice change → map latency",
    ),
    (
        "mtls",
        "the mesh between two nodes: direct vs L4 vs mTLS throughput, latency, connection rate, proxy CPU and memory",
    ),
];

/// Runs the demo; needs root.
pub fn demo(ctx: &Ctx) -> anyhow::Result<i32> {
    require_root(ctx, "demo")?;
    setup::run(ctx, setup::Options::default())?;
    let bins = build(ctx)?;
    run_bin(ctx, &bins, "mycel-demo", &[])
}

/// Runs benchmark `name` with `args`.
pub fn bench(ctx: &Ctx, name: &str, args: &[String]) -> anyhow::Result<i32> {
    if !BENCHES.iter().any(|(known, _)| *known == name) {
        let known: Vec<String> = BENCHES
            .iter()
            .map(|(n, what)| format!("  {n:<8} {what}"))
            .collect();
        bail!(
            "no benchmark named {name:?}; the benchmarks are:\n{}",
            known.join("\n")
        );
    }
    require_root(ctx, "bench")?;
    setup::run(ctx, setup::Options::default())?;
    let bins = build(ctx)?;
    let mut bench_args = vec![name.to_owned()];
    // `--update-readme` is ours: the benchmark writes its tables to a file, which goes into
    // README.md's `bench-<name>` section when the run succeeds.
    let update_readme = args.iter().any(|a| a == "--update-readme");
    bench_args.extend(args.iter().filter(|a| *a != "--update-readme").cloned());
    let tables = ctx.target_dir().join(format!("bench-{name}.md"));
    bench_args.extend(["--output".to_owned(), tables.display().to_string()]);
    let code = run_bin(ctx, &bins, "mycel-bench", &bench_args)?;
    if code == 0 && update_readme {
        let body = std::fs::read_to_string(&tables)
            .with_context(|| format!("reading {}", tables.display()))?;
        crate::readme::update_section(
            &ctx.root.join("README.md"),
            &format!("bench-{name}"),
            &body,
        )?;
    }
    Ok(code)
}

fn require_root(ctx: &Ctx, task: &str) -> anyhow::Result<()> {
    ensure!(
        ctx.is_root,
        "`cargo xtask {task}` needs root: it creates network namespaces and cgroups and loads \
         eBPF programs. Run it again as root"
    );
    Ok(())
}

/// Builds the agent and the test programs in release mode; returns their directory.
fn build(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    let build = ctx.cargo().args([
        "build",
        "--release",
        "-p",
        "mycel-agent",
        "-p",
        "mycel-tests",
        "--bins",
    ]);
    println!("==> {build}");
    build.run()?;
    Ok(ctx.target_dir().join("release"))
}

/// Runs `bins/name` with the paths of the agent and the test pod; returns its exit code.
fn run_bin(ctx: &Ctx, bins: &std::path::Path, name: &str, args: &[String]) -> anyhow::Result<i32> {
    let program = bins.join(name);
    ensure!(
        program.is_file(),
        "{} was not built: `cargo build --release -p mycel-tests --bins` should have built it \
         from tests/src/bin/{name}.rs",
        program.display()
    );
    let cmd = Cmd::new(&program)
        .args(args)
        .env("MYCEL_BIN", bins.join("mycel"))
        .env("MYCEL_TESTPOD_BIN", bins.join("mycel-testpod"))
        .dir(&ctx.root);
    println!("==> {cmd}");
    let status = cmd.status()?;
    Ok(exit_code(status))
}

/// The exit code to pass on: the program's own, or 128 + the signal that ended it, as a
/// shell reports it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
