//! `cargo xtask test-kernels`: boots Debian's own kernels under qemu and runs mycel's
//! kernel-level checks inside each one.
//!
//! Users run mycel on the kernels their distributions ship, and a verifier that accepts a
//! program on one kernel can reject it on an older one. This task proves the programs on
//! each kernel of [`KERNELS`]:
//!
//! 1. It fetches what it needs from Debian's archive through a private apt configuration
//!    (the system's sources and package state are never touched): the `-cloud-amd64`
//!    kernel images (they boot fastest under emulation), `busybox-static` for the guest's
//!    init, and qemu from bookworm-backports when the machine has no recent enough qemu.
//!    Everything is cached under `${XDG_CACHE_HOME:-$HOME/.cache}/mycel/kernels`, so a
//!    second run downloads nothing.
//! 2. It builds `mycel-guest` (the `guest/` crate) statically, so it runs on any kernel
//!    with nothing else installed, and packs it with busybox, the kernel's `veth`,
//!    `sch_ingress` and `cls_bpf` modules and the eBPF object into an initramfs.
//! 3. It boots each kernel under qemu with software emulation (`-accel tcg`, which works
//!    everywhere, including hosts whose `/dev/kvm` cannot run stock guest kernels), with no
//!    network card, a wall-clock deadline, and the serial console as the only output. The guest prints one
//!    `MYCEL-RESULT` line per check; the host reads those and ignores everything else.
//! 4. It prints a table kernel × check and returns a [`Report`]; the caller exits non-zero
//!    when [`Report::passed`] is false.
//!
//! Nothing here needs root: qemu runs unprivileged, and the checks run as root inside the
//! virtual machines.

mod assets;
mod debian;
mod guest;
mod initramfs;
mod report;
mod vm;

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    thread,
    time::Instant,
};

use anyhow::{Context as _, bail};

use report::KernelRun;
pub use report::Report;

/// A kernel of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    /// The upstream series, `5.10`; also how `--kernel` names it.
    pub series: &'static str,
    /// The Debian release whose archive carries it.
    pub dist: debian::Dist,
    /// Where it comes from, for people.
    pub origin: &'static str,
}

/// The kernels mycel supports: the long-term kernels of Debian 11, 12 and 13 (the last
/// through bookworm-backports, which carries the same 6.12 as trixie).
pub const KERNELS: [KernelSpec; 3] = [
    KernelSpec {
        series: "5.10",
        dist: debian::Dist::Bullseye,
        origin: "Debian 11 (bullseye)",
    },
    KernelSpec {
        series: "6.1",
        dist: debian::Dist::Bookworm,
        origin: "Debian 12 (bookworm)",
    },
    KernelSpec {
        series: "6.12",
        dist: debian::Dist::Bookworm,
        origin: "Debian 13 (trixie), from bookworm-backports",
    },
];

/// The kernel modules the guest loads: what TC programs on a veth pair need. Their
/// dependencies are found in the modules' own `.modinfo` and loaded first.
pub const MODULES: [&str; 3] = ["veth", "sch_ingress", "cls_bpf"];

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "MYCEL_KERNEL_CACHE";

/// Wall-clock limit of one virtual machine, in seconds: a guest needs 5–20 s under
/// emulation on two busy cores, so this only catches hangs.
pub const DEFAULT_TIMEOUT_SECS: u64 = 180;

/// Options of `cargo xtask test-kernels`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Only these kernels (repeatable): 5.10, 6.1, 6.12. Default: all.
    #[arg(long = "kernel", value_name = "SERIES")]
    pub kernels: Vec<String>,
    /// Look for newer kernel, qemu and busybox packages instead of using the cached ones.
    #[arg(long)]
    pub refresh: bool,
    /// Where downloads are cached [default: ${XDG_CACHE_HOME:-$HOME/.cache}/mycel/kernels].
    #[arg(long, env = CACHE_ENV, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Use this prebuilt (statically linked) `mycel-guest` instead of building it; needs
    /// `--object` too.
    #[arg(long, value_name = "PATH", requires = "object")]
    pub guest: Option<PathBuf>,
    /// The eBPF object whose programs are checked one by one (default: the one the agent
    /// embeds, found in the guest's build).
    #[arg(long, value_name = "PATH", requires = "guest")]
    pub object: Option<PathBuf>,
    /// Build the guest with `--release`.
    #[arg(long)]
    pub release: bool,
    /// Use this qemu-system-x86_64 instead of the machine's or a cached one.
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// How many virtual machines run at once [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Wall-clock limit for one virtual machine, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Print every result line as it arrives.
    #[arg(long, short)]
    pub verbose: bool,
    /// Write the result table into README.md's "Kernel requirements" section.
    #[arg(long)]
    pub update_readme: bool,
}

impl Default for Options {
    /// What `cargo xtask test-kernels` does without flags (for callers such as `test`).
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            refresh: false,
            cache_dir: std::env::var_os(CACHE_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            guest: None,
            object: None,
            release: false,
            qemu: None,
            jobs: None,
            timeout: DEFAULT_TIMEOUT_SECS,
            verbose: false,
            update_readme: false,
        }
    }
}

/// Fetches, builds and boots what `opts` asks for; prints progress and the result table.
///
/// Errors are problems of the harness (a download or build failed); what the kernels say
/// is in the [`Report`].
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let kernels = selected(&opts.kernels)?;
    let root = workspace_root()?;
    let cache = match &opts.cache_dir {
        Some(dir) => dir.clone(),
        None => default_cache_dir()?,
    };
    let work = target_dir(&root).join("kernel-tests");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    println!(
        "test-kernels: cache {}, logs {}",
        cache.display(),
        work.display()
    );

    let archive = debian::Archive::new(cache.join("apt"), opts.refresh);
    let store = assets::Store::new(&cache, &archive, opts.refresh)?;

    // Downloads run while the guest builds.
    let (guest, qemu, busybox, images) = thread::scope(|s| {
        let qemu = s.spawn(|| match &opts.qemu {
            Some(path) => assets::Qemu::at(path),
            None => store.qemu(),
        });
        let busybox = s.spawn(|| store.busybox());
        let images: Vec<_> = kernels
            .iter()
            .map(|k| {
                let store = &store;
                (*k, s.spawn(move || store.kernel(k)))
            })
            .collect();
        let guest = match (&opts.guest, &opts.object) {
            (Some(binary), Some(object)) => Ok(guest::Guest {
                binary: binary.clone(),
                object: object.clone(),
            }),
            _ => guest::build(&root, opts.release),
        };
        let images: Vec<_> = images
            .into_iter()
            .map(|(k, h)| (k, join(h.join())))
            .collect();
        (guest, join(qemu.join()), join(busybox.join()), images)
    });
    let guest = guest.context("building mycel-guest")?;
    let qemu = qemu.context("getting qemu")?;
    let busybox = busybox.context("getting busybox")?;
    println!(
        "test-kernels: prepared in {:.1} s; {}",
        started.elapsed().as_secs_f64(),
        qemu.describe()
    );

    let queue: Mutex<Vec<(KernelSpec, anyhow::Result<assets::KernelImage>)>> =
        Mutex::new(images.into_iter().rev().collect());
    let runs: Mutex<Vec<KernelRun>> = Mutex::new(Vec::new());
    let jobs = opts
        .jobs
        .or_else(|| thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
        .max(1);
    thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let next = queue.lock().map(|mut q| q.pop()).ok().flatten();
                    let Some((spec, image)) = next else { break };
                    let run = match image {
                        Ok(image) => boot(&spec, &image, &guest, &busybox, &qemu, &work, opts),
                        Err(e) => KernelRun::not_run(&spec, format!("{e:#}")),
                    };
                    if let Ok(mut runs) = runs.lock() {
                        runs.push(run);
                    }
                }
            });
        }
    });
    let mut runs = runs.into_inner().unwrap_or_default();
    runs.sort_by_key(|r| KERNELS.iter().position(|k| k.series == r.series));
    let report = Report {
        kernels: runs,
        seconds: started.elapsed().as_secs_f64(),
    };
    println!();
    print!("{}", report.table());
    let markdown = work.join("report.md");
    if let Err(e) = std::fs::write(&markdown, report.markdown()) {
        eprintln!("test-kernels: could not write {}: {e}", markdown.display());
    } else {
        println!("test-kernels: markdown table in {}", markdown.display());
    }
    if opts.update_readme {
        if report.kernels.len() != KERNELS.len() {
            bail!("--update-readme needs a run over every kernel");
        }
        crate::readme::update_section(
            &root.join("README.md"),
            "kernel-matrix",
            &report.markdown(),
        )?;
    }
    Ok(report)
}

/// The result of a preparation thread; a panic becomes an error.
fn join<T>(r: thread::Result<anyhow::Result<T>>) -> anyhow::Result<T> {
    r.unwrap_or_else(|_| bail!("a download thread panicked"))
}

/// Builds the initramfs for one kernel, boots it and reads the results.
fn boot(
    spec: &KernelSpec,
    image: &assets::KernelImage,
    guest: &guest::Guest,
    busybox: &Path,
    qemu: &assets::Qemu,
    work: &Path,
    opts: &Options,
) -> KernelRun {
    let dir = work.join(spec.series);
    let initrd = dir.join("initramfs.cpio");
    let built = std::fs::create_dir_all(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| initramfs::write(&initrd, image, guest, busybox));
    if let Err(e) = built {
        return KernelRun::not_run(spec, format!("building the initramfs: {e:#}"));
    }
    println!(
        "[{}] booting {} ({})",
        spec.series, image.package, image.version
    );
    let run = vm::boot(
        spec,
        image,
        &initrd,
        qemu,
        &dir.join("console.log"),
        std::time::Duration::from_secs(opts.timeout),
        opts.verbose,
    );
    println!("[{}] {}", spec.series, run.summary());
    run
}

fn selected(names: &[String]) -> anyhow::Result<Vec<KernelSpec>> {
    if names.is_empty() {
        return Ok(KERNELS.to_vec());
    }
    for n in names {
        if !KERNELS.iter().any(|k| k.series == n.as_str()) {
            let known: Vec<&str> = KERNELS.iter().map(|k| k.series).collect();
            bail!("unknown kernel {n:?}: choose from {}", known.join(", "));
        }
    }
    // In the matrix's order, each once.
    Ok(KERNELS
        .iter()
        .filter(|k| names.iter().any(|n| n == k.series))
        .copied()
        .collect())
}

/// The workspace root: xtask's parent directory.
fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

/// `$CARGO_TARGET_DIR` (relative to the workspace root) or `target/`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/mycel/kernels`.
fn default_cache_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::home_dir().map(|h| h.join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set: pass --cache-dir")?;
    Ok(base.join("mycel").join("kernels"))
}
