//! Debian's package archive through a private apt configuration.
//!
//! Each [`Dist`] gets its own apt root under the cache: its own sources list, package
//! lists, caches and logs, with the system's archive keyring. The system's sources and
//! package state are never written; the system's dpkg status is only *read*, so that the
//! dependency closure of qemu leaves out what the machine already has. Packages are
//! fetched with `apt-get download` (which verifies them against the signed index) and
//! unpacked with `dpkg-deb`, never installed.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use anyhow::{Context as _, bail};

/// The archive every suite comes from.
const MIRROR: &str = "http://deb.debian.org/debian";
/// The keyring that signs it (package `debian-archive-keyring`).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The system's dpkg status, read (never written) to resolve what qemu needs beyond it.
const SYSTEM_STATUS: &str = "/var/lib/dpkg/status";

/// A Debian release whose archive the task reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dist {
    /// Debian 11: Linux 5.10.
    Bullseye,
    /// Debian 12 and its backports: Linux 6.1 and 6.12, qemu 10, busybox-static.
    Bookworm,
}

impl Dist {
    const ALL: [Dist; 2] = [Dist::Bullseye, Dist::Bookworm];

    fn name(self) -> &'static str {
        match self {
            Dist::Bullseye => "bullseye",
            Dist::Bookworm => "bookworm",
        }
    }

    fn suites(self) -> &'static [&'static str] {
        match self {
            Dist::Bullseye => &["bullseye"],
            Dist::Bookworm => &["bookworm", "bookworm-backports"],
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A package at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
}

impl fmt::Display for Package {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

/// Whether this root's package lists were brought up to date by this process.
#[derive(Debug, Default)]
struct RootState {
    updated: bool,
}

/// The private apt roots, one per [`Dist`], under one directory.
#[derive(Debug)]
pub struct Archive {
    dir: PathBuf,
    refresh: bool,
    /// One lock per root: apt runs one at a time on a root.
    roots: [Mutex<RootState>; 2],
}

impl Archive {
    /// Apt roots under `dir`. With `refresh`, package lists are updated once per run even
    /// when present.
    pub fn new(dir: PathBuf, refresh: bool) -> Self {
        Self {
            dir,
            refresh,
            roots: Default::default(),
        }
    }

    fn root(&self, dist: Dist) -> PathBuf {
        self.dir.join(dist.name())
    }

    fn lock(&self, dist: Dist) -> std::sync::MutexGuard<'_, RootState> {
        let i = Dist::ALL.iter().position(|d| *d == dist).unwrap_or(0);
        // A panicked holder leaves nothing half-done that matters here.
        self.roots[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Package names matching the POSIX regular expression `pattern`.
    pub fn search(&self, dist: Dist, pattern: &str) -> anyhow::Result<Vec<String>> {
        let mut state = self.lock(dist);
        self.ensure_lists(dist, &mut state)?;
        let out = self.run(dist, "apt-cache", &["search", "--names-only", pattern])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect())
    }

    /// The version of `name` apt would choose.
    pub fn candidate(&self, dist: Dist, name: &str) -> anyhow::Result<Package> {
        let mut state = self.lock(dist);
        self.ensure_lists(dist, &mut state)?;
        let out = self.run(dist, "apt-cache", &["policy", name])?;
        let version = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(str::trim)
            .filter(|v| *v != "(none)")
            .with_context(|| format!("{name} is not in {}", dist.suites().join(", ")))?;
        Ok(Package {
            name: name.to_string(),
            version: version.to_string(),
        })
    }

    /// What installing `name` (from `release`) would add to *this* machine: the package and
    /// every dependency the machine lacks, at the versions apt would choose.
    pub fn closure(&self, dist: Dist, name: &str, release: &str) -> anyhow::Result<Vec<Package>> {
        let mut state = self.lock(dist);
        self.ensure_lists(dist, &mut state)?;
        let status = Path::new(SYSTEM_STATUS);
        if !status.is_file() {
            bail!("{SYSTEM_STATUS} is missing: this is not a Debian system");
        }
        let out = self.run_with_status(
            dist,
            "apt-get",
            &[
                "install",
                "-s",
                "-qq",
                "--no-install-recommends",
                "-t",
                release,
                name,
            ],
            status,
        )?;
        let packages = parse_simulation(&out);
        if packages.is_empty() {
            bail!("apt resolved nothing to fetch for {name} from {release}:\n{out}");
        }
        Ok(packages)
    }

    /// Downloads `pkg` into `debs` unless a valid copy is there; returns its path.
    ///
    /// The download lands in a temporary directory and is renamed into place only after
    /// `dpkg-deb --info` accepts it, so an interrupted download never poisons the cache.
    pub fn download(&self, dist: Dist, pkg: &Package, debs: &Path) -> anyhow::Result<PathBuf> {
        if let Some(path) = cached_deb(debs, pkg) {
            return Ok(path);
        }
        fs::create_dir_all(debs).with_context(|| format!("creating {}", debs.display()))?;
        let tmp = debs.join(format!(".download-{}-{}", std::process::id(), pkg.name));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let result = self.download_into(dist, pkg, &tmp).and_then(|file| {
            verify_deb(&file)?;
            let name = file.file_name().context("downloaded file has no name")?;
            let dest = debs.join(name);
            fs::rename(&file, &dest)
                .with_context(|| format!("moving {} to {}", file.display(), dest.display()))?;
            Ok(dest)
        });
        let _ = fs::remove_dir_all(&tmp);
        result
    }

    fn download_into(&self, dist: Dist, pkg: &Package, dir: &Path) -> anyhow::Result<PathBuf> {
        let spec = format!("{}={}", pkg.name, pkg.version);
        let mut state = self.lock(dist);
        self.ensure_lists(dist, &mut state)?;
        let first = self.run_in(dist, "apt-get", &["download", "-qq", &spec], dir);
        if let Err(e) = first {
            // The archive may have moved on since the lists were fetched: update, retry.
            if state.updated {
                return Err(e);
            }
            self.update(dist, &mut state)?;
            self.run_in(dist, "apt-get", &["download", "-qq", &spec], dir)?;
        }
        drop(state);
        let mut debs = fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "deb"));
        debs.next()
            .with_context(|| format!("apt-get download {spec} left no .deb"))
    }

    /// Makes sure the root exists and has package lists (fetching them when missing, or once
    /// per run with `refresh`).
    fn ensure_lists(&self, dist: Dist, state: &mut RootState) -> anyhow::Result<()> {
        self.write_config(dist)?;
        let lists = self.root(dist).join("lists");
        let have_lists = fs::read_dir(&lists).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        });
        if (!have_lists || self.refresh) && !state.updated {
            self.update(dist, state)?;
        }
        Ok(())
    }

    fn update(&self, dist: Dist, state: &mut RootState) -> anyhow::Result<()> {
        println!(
            "test-kernels: fetching the package lists of {}",
            dist.suites().join(", ")
        );
        self.write_config(dist)?;
        self.run(dist, "apt-get", &["update", "-qq"])?;
        state.updated = true;
        Ok(())
    }

    /// Writes the root's sources list and apt configuration (cheap; done on every use so a
    /// changed layout takes effect).
    fn write_config(&self, dist: Dist) -> anyhow::Result<()> {
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing: install the debian-archive-keyring package");
        }
        let root = self.root(dist);
        for sub in [
            "lists/partial",
            "archives/partial",
            "sources.list.d",
            "apt.conf.d",
            "preferences.d",
            "log",
        ] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        let sources: String = dist
            .suites()
            .iter()
            .map(|s| format!("deb [arch=amd64 signed-by={KEYRING}] {MIRROR} {s} main\n"))
            .collect();
        write_if_changed(&root.join("sources.list"), &sources)?;
        let r = root.display();
        let mut conf = format!(
            "// Private apt configuration of `cargo xtask test-kernels` ({dist}).\n\
             Dir::Etc::SourceList \"{r}/sources.list\";\n\
             Dir::Etc::SourceParts \"{r}/sources.list.d\";\n\
             Dir::Etc::Parts \"{r}/apt.conf.d\";\n\
             Dir::Etc::Main \"{r}/apt.conf.main\";\n\
             Dir::Etc::Preferences \"{r}/preferences\";\n\
             Dir::Etc::PreferencesParts \"{r}/preferences.d\";\n\
             Dir::State \"{r}/\";\n\
             Dir::State::Lists \"{r}/lists/\";\n\
             Dir::State::status \"{r}/status\";\n\
             Dir::Cache \"{r}/\";\n\
             Dir::Cache::Archives \"{r}/archives/\";\n\
             Dir::Log \"{r}/log/\";\n\
             Dir::Cache::srcpkgcache \"\";\n\
             Acquire::Languages \"none\";\n\
             Acquire::GzipIndexes \"true\";\n\
             Acquire::Retries \"3\";\n\
             APT::Install-Recommends \"false\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\n"
        );
        if is_root() {
            // apt's download sandbox user cannot write into a private directory of root's.
            conf.push_str("APT::Sandbox::User \"root\";\n");
        }
        write_if_changed(&root.join("apt.conf"), &conf)?;
        let status = root.join("status");
        if !status.exists() {
            fs::write(&status, "").with_context(|| format!("creating {}", status.display()))?;
        }
        Ok(())
    }

    fn command(&self, dist: Dist, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", self.root(dist).join("apt.conf"))
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn run(&self, dist: Dist, program: &str, args: &[&str]) -> anyhow::Result<String> {
        output(self.command(dist, program).args(args), program, args)
    }

    fn run_in(
        &self,
        dist: Dist,
        program: &str,
        args: &[&str],
        dir: &Path,
    ) -> anyhow::Result<String> {
        output(
            self.command(dist, program).args(args).current_dir(dir),
            program,
            args,
        )
    }

    fn run_with_status(
        &self,
        dist: Dist,
        program: &str,
        args: &[&str],
        status: &Path,
    ) -> anyhow::Result<String> {
        let status = format!("Dir::State::status={}", status.display());
        let mut full = vec!["-o", &status];
        full.extend_from_slice(args);
        output(self.command(dist, program).args(&full), program, &full)
    }
}

/// Runs a command quietly; its stdout, or an error carrying its stderr.
fn output(cmd: &mut Command, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let shown = format!("{program} {}", args.join(" "));
    let out = cmd.output().with_context(|| {
        format!("could not run `{shown}`: test-kernels needs Debian's apt-get and dpkg-deb")
    })?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_if_changed(path: &Path, content: &str) -> anyhow::Result<()> {
    if fs::read_to_string(path).is_ok_and(|c| c == content) {
        return Ok(());
    }
    fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

/// Packages a simulated install would unpack: `Inst name [old] (version suite [arch])`.
fn parse_simulation(out: &str) -> Vec<Package> {
    out.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("Inst ")?;
            let (name, rest) = rest.split_once(' ')?;
            let open = rest.find('(')?;
            let version = rest[open + 1..].split_whitespace().next()?;
            Some(Package {
                name: name.split(':').next().unwrap_or(name).to_string(),
                version: version.to_string(),
            })
        })
        .collect()
}

/// The file name apt gives a package: `name_version_arch.deb`, the epoch's `:` as `%3a`.
fn deb_file_names(pkg: &Package) -> [String; 2] {
    let version = pkg.version.replace(':', "%3a");
    ["amd64", "all"].map(|arch| format!("{}_{version}_{arch}.deb", pkg.name))
}

/// A cached, valid `.deb` of `pkg`, if there is one.
fn cached_deb(debs: &Path, pkg: &Package) -> Option<PathBuf> {
    deb_file_names(pkg)
        .into_iter()
        .map(|n| debs.join(n))
        .find(|p| p.is_file() && verify_deb(p).is_ok())
}

/// Checks that `path` is a whole Debian package (`dpkg-deb --info` reads it).
pub fn verify_deb(path: &Path) -> anyhow::Result<()> {
    output(
        Command::new("dpkg-deb").arg("--info").arg(path),
        "dpkg-deb --info",
        &[&path.display().to_string()],
    )
    .map(drop)
}

/// Unpacks the files of the package at `deb` under `dir`.
pub fn extract(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    output(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir),
        "dpkg-deb -x",
        &[&deb.display().to_string(), &dir.display().to_string()],
    )
    .map(drop)
}

/// Whether this process runs as root (effective uid 0, from `/proc/self/status`).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_simulated_installs() {
        let out = "Inst libfdt1 (1.6.1-4+b1 Debian:12.11/stable [amd64])\n\
                   Inst qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:bookworm-backports [amd64])\n\
                   Inst libusb-1.0-0:amd64 [2:1.0.25-1] (2:1.0.26-1 Debian:12.11/stable [amd64])\n\
                   Conf libfdt1 (1.6.1-4+b1 Debian:12.11/stable [amd64])\n";
        let pkgs = parse_simulation(out);
        assert_eq!(pkgs.len(), 3, "{pkgs:?}");
        assert_eq!(pkgs[1].name, "qemu-system-x86");
        assert_eq!(pkgs[1].version, "1:10.0.2+ds-2+deb13u1~bpo12+1");
        assert_eq!(pkgs[2].name, "libusb-1.0-0");
        assert_eq!(pkgs[2].version, "2:1.0.26-1");
    }

    #[test]
    fn names_debs_as_apt_does() {
        let pkg = Package {
            name: "busybox-static".into(),
            version: "1:1.35.0-4+deb12u1+b1".into(),
        };
        assert_eq!(
            deb_file_names(&pkg)[0],
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
    }
}
