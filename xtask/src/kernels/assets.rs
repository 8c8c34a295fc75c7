//! What the virtual machines are made of, fetched once and kept in the cache: kernel images
//! with the modules the guest loads, busybox, and qemu when the machine has none recent
//! enough.
//!
//! Each asset is a directory `<cache>/<name>/` holding its files and a `manifest` (written
//! last). It is assembled in `<cache>/tmp/` and renamed into place whole, so an interrupted
//! run leaves either the old asset or the new one, never half of one. Downloaded packages
//! stay in `<cache>/debs/`.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context as _, bail};

use super::{
    KernelSpec, MODULES,
    debian::{self, Archive, Dist, Package},
};

/// The oldest qemu trusted to boot the matrix: Debian 12's qemu 7.2 crashed 6.12 guests in
/// about a third of boots, bookworm-backports' 10.0 never did.
const MIN_QEMU_MAJOR: u32 = 10;
/// Where a qemu recent enough comes from when the machine lacks one.
const QEMU_RELEASE: &str = "bookworm-backports";
const QEMU_PACKAGE: &str = "qemu-system-x86";

/// The asset store under the cache directory.
#[derive(Debug)]
pub struct Store<'a> {
    dir: PathBuf,
    archive: &'a Archive,
    refresh: bool,
}

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct KernelImage {
    /// The Debian package it came from, and its version.
    pub package: String,
    pub version: String,
    /// The kernel release (`uname -r`).
    pub release: String,
    /// The compressed kernel image.
    pub vmlinuz: PathBuf,
    /// Uncompressed modules, in the order they must be loaded (dependencies first).
    pub modules: Vec<PathBuf>,
    /// Modules of [`MODULES`] built into this kernel (nothing to load).
    pub builtin: Vec<String>,
}

/// A qemu to run, and how.
#[derive(Clone, Debug)]
pub struct Qemu {
    pub binary: PathBuf,
    /// Environment it needs (libraries and modules of an unpacked qemu).
    pub env: Vec<(OsString, OsString)>,
    /// Firmware directories (`-L`), for an unpacked qemu.
    pub firmware: Vec<PathBuf>,
    pub version: String,
    /// Where it came from, for people.
    pub origin: String,
}

impl Qemu {
    /// The qemu at `path`, as given by the user (no version check).
    pub fn at(path: &Path) -> anyhow::Result<Self> {
        let version =
            qemu_version(path, &[]).with_context(|| format!("{} does not run", path.display()))?;
        Ok(Self {
            binary: path.to_path_buf(),
            env: Vec::new(),
            firmware: Vec::new(),
            version,
            origin: format!("given as {}", path.display()),
        })
    }

    /// One line saying which qemu runs.
    pub fn describe(&self) -> String {
        format!("qemu {} ({})", self.version, self.origin)
    }

    /// A command running this qemu with its environment and firmware directories.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        for dir in &self.firmware {
            cmd.arg("-L").arg(dir);
        }
        cmd
    }
}

impl<'a> Store<'a> {
    /// The store under `cache`, fetching through `archive`. With `refresh`, assets are
    /// checked against the archive's newest packages instead of used as cached.
    pub fn new(cache: &Path, archive: &'a Archive, refresh: bool) -> anyhow::Result<Self> {
        fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
        Ok(Self {
            dir: cache.to_path_buf(),
            archive,
            refresh,
        })
    }

    fn debs(&self) -> PathBuf {
        self.dir.join("debs")
    }

    /// The kernel of `spec`, with its modules; the newest `-cloud-amd64` image of that
    /// series in the archive when not cached.
    pub fn kernel(&self, spec: &KernelSpec) -> anyhow::Result<KernelImage> {
        let name = format!("linux-{}", spec.series);
        let cached = read_manifest(&self.dir.join(&name))
            .and_then(|m| kernel_from_manifest(&self.dir.join(&name), &m));
        if let Some(image) = &cached
            && !self.refresh
        {
            return Ok(image.clone());
        }
        let pkg = self.newest_kernel(spec)?;
        if let Some(image) = cached
            && image.package == pkg.name
            && image.version == pkg.version
        {
            return Ok(image);
        }
        println!("[{}] downloading {pkg}", spec.series);
        let started = std::time::Instant::now();
        let deb = self.archive.download(spec.dist, &pkg, &self.debs())?;
        let dir = self.assemble(&name, |tmp| {
            let unpacked = tmp.join("unpacked");
            debian::extract(&deb, &unpacked)?;
            let manifest = collect_kernel(&unpacked, tmp, &pkg)?;
            fs::remove_dir_all(&unpacked)
                .with_context(|| format!("removing {}", unpacked.display()))?;
            Ok(manifest)
        })?;
        println!(
            "[{}] {} downloaded and unpacked in {:.1} s",
            spec.series,
            pkg.name,
            started.elapsed().as_secs_f64()
        );
        read_manifest(&dir)
            .and_then(|m| kernel_from_manifest(&dir, &m))
            .with_context(|| format!("{} is incomplete right after assembling it", dir.display()))
    }

    /// The newest `linux-image-<series>.*-cloud-amd64` of the spec's archive.
    fn newest_kernel(&self, spec: &KernelSpec) -> anyhow::Result<Package> {
        let pattern = format!(
            "^linux-image-{}\\.[0-9].*-cloud-amd64$",
            spec.series.replace('.', "\\.")
        );
        let names = self.archive.search(spec.dist, &pattern)?;
        let newest = names
            .iter()
            .max_by(|a, b| numeric_key(a).cmp(&numeric_key(b)))
            .with_context(|| format!("no {pattern} package in {}", spec.dist))?;
        self.archive.candidate(spec.dist, newest)
    }

    /// busybox (statically linked) for the guest's init.
    pub fn busybox(&self) -> anyhow::Result<PathBuf> {
        let name = "busybox";
        let dir = self.dir.join(name);
        let binary = dir.join("busybox");
        if read_manifest(&dir).is_some() && binary.is_file() && !self.refresh {
            return Ok(binary);
        }
        let pkg = self.archive.candidate(Dist::Bookworm, "busybox-static")?;
        if read_manifest(&dir).is_some_and(|m| m.get("version") == Some(&pkg.version))
            && binary.is_file()
        {
            return Ok(binary);
        }
        println!("test-kernels: downloading {pkg}");
        let deb = self.archive.download(Dist::Bookworm, &pkg, &self.debs())?;
        self.assemble(name, |tmp| {
            let unpacked = tmp.join("unpacked");
            debian::extract(&deb, &unpacked)?;
            copy(&unpacked.join("bin/busybox"), &tmp.join("busybox"))?;
            fs::remove_dir_all(&unpacked)?;
            Ok(manifest_of(&pkg))
        })?;
        Ok(binary)
    }

    /// A qemu recent enough: the machine's own, or bookworm-backports' unpacked into the
    /// cache (run with its libraries through `LD_LIBRARY_PATH`; nothing is installed).
    pub fn qemu(&self) -> anyhow::Result<Qemu> {
        if let Some(q) = system_qemu() {
            return Ok(q);
        }
        let name = "qemu";
        let dir = self.dir.join(name);
        if read_manifest(&dir).is_some()
            && !self.refresh
            && let Ok(q) = unpacked_qemu(&dir)
        {
            return Ok(q);
        }
        if os_codename().as_deref() != Some("bookworm") {
            bail!(
                "no qemu-system-x86_64 ≥ {MIN_QEMU_MAJOR} on PATH: install one (`apt-get install qemu-system-x86`) or pass --qemu PATH"
            );
        }
        let packages = self
            .archive
            .closure(Dist::Bookworm, QEMU_PACKAGE, QEMU_RELEASE)?;
        let main = packages
            .iter()
            .find(|p| p.name == QEMU_PACKAGE)
            .cloned()
            .with_context(|| format!("{QEMU_PACKAGE} missing from its own closure"))?;
        if read_manifest(&dir).is_some_and(|m| m.get("version") == Some(&main.version))
            && let Ok(q) = unpacked_qemu(&dir)
        {
            return Ok(q);
        }
        println!(
            "test-kernels: downloading qemu {} from {QEMU_RELEASE} ({} packages, unpacked into the cache)",
            main.version,
            packages.len()
        );
        let started = std::time::Instant::now();
        let debs: Vec<PathBuf> = packages
            .iter()
            .map(|p| self.archive.download(Dist::Bookworm, p, &self.debs()))
            .collect::<anyhow::Result<_>>()?;
        self.assemble(name, |tmp| {
            for deb in &debs {
                debian::extract(deb, &tmp.join("root"))?;
            }
            let mut manifest = manifest_of(&main);
            let list: Vec<String> = packages.iter().map(ToString::to_string).collect();
            manifest.insert("packages".into(), list.join(", "));
            Ok(manifest)
        })?;
        println!(
            "test-kernels: qemu downloaded and unpacked in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        unpacked_qemu(&dir)
    }

    /// Builds asset `name` in a fresh temporary directory with `build` (which returns the
    /// manifest), then swaps it into place.
    fn assemble(
        &self,
        name: &str,
        build: impl FnOnce(&Path) -> anyhow::Result<BTreeMap<String, String>>,
    ) -> anyhow::Result<PathBuf> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let scratch = self.dir.join("tmp");
        fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let unique = format!(
            "{name}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = scratch.join(&unique);
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let built = build(&tmp).and_then(|manifest| write_manifest(&tmp, &manifest));
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dest = self.dir.join(name);
        let old = scratch.join(format!("{unique}.old"));
        if dest.exists() {
            fs::rename(&dest, &old).with_context(|| format!("moving {} aside", dest.display()))?;
        }
        fs::rename(&tmp, &dest)
            .with_context(|| format!("moving {} to {}", tmp.display(), dest.display()))?;
        let _ = fs::remove_dir_all(&old);
        Ok(dest)
    }
}

/// Picks the image and the needed modules out of an unpacked kernel package into `out`.
fn collect_kernel(
    unpacked: &Path,
    out: &Path,
    pkg: &Package,
) -> anyhow::Result<BTreeMap<String, String>> {
    let vmlinuz = fs::read_dir(unpacked.join("boot"))
        .with_context(|| format!("{pkg} has no /boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{pkg} has no /boot/vmlinuz-*"))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    copy(&vmlinuz, &out.join("vmlinuz"))?;

    // Merged-/usr packages (Debian 13 and its backports) ship modules under /usr/lib.
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d).join(&release))
        .find(|d| d.is_dir())
        .with_context(|| format!("{pkg} has no modules directory for {release}"))?;
    let resolved = super::initramfs::resolve_modules(&moddir, &MODULES)?;
    let mods = out.join("modules");
    fs::create_dir_all(&mods)?;
    let mut order = Vec::new();
    for module in &resolved.load_order {
        let dest = mods.join(format!("{}.ko", module.name));
        fs::write(&dest, &module.bytes).with_context(|| format!("writing {}", dest.display()))?;
        order.push(module.name.clone());
    }
    let mut manifest = manifest_of(pkg);
    manifest.insert("release".into(), release);
    manifest.insert("modules".into(), order.join(" "));
    manifest.insert("builtin".into(), resolved.builtin.join(" "));
    Ok(manifest)
}

fn kernel_from_manifest(dir: &Path, m: &BTreeMap<String, String>) -> Option<KernelImage> {
    let words = |key: &str| -> Vec<String> {
        m.get(key)
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let image = KernelImage {
        package: m.get("package")?.clone(),
        version: m.get("version")?.clone(),
        release: m.get("release")?.clone(),
        vmlinuz: dir.join("vmlinuz"),
        modules: words("modules")
            .iter()
            .map(|n| dir.join("modules").join(format!("{n}.ko")))
            .collect(),
        builtin: words("builtin"),
    };
    (image.vmlinuz.is_file() && image.modules.iter().all(|m| m.is_file())).then_some(image)
}

fn manifest_of(pkg: &Package) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("package".to_string(), pkg.name.clone()),
        ("version".to_string(), pkg.version.clone()),
    ])
}

fn write_manifest(dir: &Path, manifest: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let text: String = manifest.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let path = dir.join("manifest");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The asset's manifest, when the asset is complete (the manifest is written last).
fn read_manifest(dir: &Path) -> Option<BTreeMap<String, String>> {
    let text = fs::read_to_string(dir.join("manifest")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Orders package names by the numbers in them: `6.12.90+deb12.1` < `6.12.95+deb12`.
fn numeric_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The machine's qemu-system-x86_64, if it is recent enough.
fn system_qemu() -> Option<Qemu> {
    let path = std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())?;
    let version = qemu_version(&path, &[]).ok()?;
    let major: u32 = version.split('.').next()?.parse().ok()?;
    (major >= MIN_QEMU_MAJOR).then(|| Qemu {
        binary: path.clone(),
        env: Vec::new(),
        firmware: Vec::new(),
        version,
        origin: format!("the machine's {}", path.display()),
    })
}

/// The qemu unpacked under `dir/root`, checked by running it.
fn unpacked_qemu(dir: &Path) -> anyhow::Result<Qemu> {
    let root = dir.join("root");
    let libs = std::env::join_paths([
        root.join("lib/x86_64-linux-gnu"),
        root.join("usr/lib/x86_64-linux-gnu"),
    ])?;
    let env = vec![
        (OsString::from("LD_LIBRARY_PATH"), libs),
        (
            OsString::from("QEMU_MODULE_DIR"),
            root.join("usr/lib/x86_64-linux-gnu/qemu").into_os_string(),
        ),
    ];
    let binary = root.join("usr/bin/qemu-system-x86_64");
    let version = qemu_version(&binary, &env)?;
    Ok(Qemu {
        binary,
        env,
        firmware: vec![
            root.join("usr/share/qemu"),
            root.join("usr/share/seabios"),
            root.join("usr/lib/ipxe/qemu"),
        ],
        version,
        origin: format!("{QEMU_RELEASE}, unpacked in {}", dir.display()),
    })
}

/// `10.0.2` from `QEMU emulator version 10.0.2 (Debian …)`.
fn qemu_version(binary: &Path, env: &[(OsString, OsString)]) -> anyhow::Result<String> {
    let out = Command::new(binary)
        .arg("--version")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    if !out.status.success() {
        bail!(
            "{} --version failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no version in {text:?}"))
}

/// `VERSION_CODENAME` of `/etc/os-release`.
fn os_codename() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_kernel_packages_numerically() {
        let mut names = [
            "linux-image-6.12.90+deb12.1-cloud-amd64",
            "linux-image-6.12.95+deb12-cloud-amd64",
            "linux-image-6.12.9+deb12-cloud-amd64",
        ];
        names.sort_by_key(|n| numeric_key(n));
        assert_eq!(names.last(), Some(&"linux-image-6.12.95+deb12-cloud-amd64"));
        assert_eq!(names[0], "linux-image-6.12.9+deb12-cloud-amd64");
    }
}
