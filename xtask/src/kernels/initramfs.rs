//! The guest's root filesystem: an uncompressed `newc` cpio archive (the initramfs format
//! the kernel unpacks itself), written here without any external tool.
//!
//! It holds busybox, an `/init` shell script, the kernel modules to load, `mycel-guest` and
//! the eBPF object. `/init` mounts what the checks need (proc, sysfs, devtmpfs, bpffs,
//! cgroup2), loads the modules, brings loopback up, makes a veth pair, runs `mycel-guest`
//! and powers the machine off.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{assets::KernelImage, guest::Guest};

/// Where things live inside the guest.
const GUEST_BINARY: &str = "bin/mycel-guest";
const GUEST_OBJECT: &str = "mycel.o";
const MODULE_DIR: &str = "lib/modules";

/// Writes the initramfs for `image` to `path`.
pub fn write(
    path: &Path,
    image: &KernelImage,
    guest: &Guest,
    busybox: &Path,
) -> anyhow::Result<()> {
    let mut cpio = Cpio::new(BufWriter::new(
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    ));
    for dir in [
        "bin", "dev", "proc", "sys", "tmp", "run", "lib", MODULE_DIR, "root",
    ] {
        cpio.dir(dir)?;
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    cpio.char_device("dev/console", 5, 1)?;
    cpio.file("bin/busybox", 0o755, &read(busybox)?)?;
    cpio.symlink("bin/sh", "busybox")?;
    let mut names = Vec::new();
    for module in &image.modules {
        let name = module
            .file_name()
            .context("module without a file name")?
            .to_string_lossy()
            .into_owned();
        cpio.file(&format!("{MODULE_DIR}/{name}"), 0o644, &read(module)?)?;
        names.push(name.trim_end_matches(".ko").to_string());
    }
    cpio.file(GUEST_BINARY, 0o755, &read(&guest.binary)?)?;
    cpio.file(GUEST_OBJECT, 0o644, &read(&guest.object)?)?;
    cpio.file(
        "init",
        0o755,
        init_script(&names, &image.builtin).as_bytes(),
    )?;
    cpio.finish()
        .and_then(|mut w| w.flush())
        .with_context(|| format!("writing {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The guest's `/init`. Its module and veth results use the same `MYCEL-RESULT` lines as
/// `mycel-guest`.
fn init_script(modules: &[String], builtin: &[String]) -> String {
    let modules = modules.join(" ");
    let builtin = if builtin.is_empty() {
        String::new()
    } else {
        format!(" (built in: {})", builtin.join(" "))
    };
    format!(
        r#"#!/bin/sh
# /init of a `cargo xtask test-kernels` guest.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf || echo "MYCEL-INFO mount bpffs failed"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "MYCEL-INFO mount cgroup2 failed"
echo "MYCEL-INFO init started"

failed=""
for m in {modules}; do
    if ! insmod /{MODULE_DIR}/$m.ko 2>/tmp/insmod.err; then
        failed="$failed $m ($(cat /tmp/insmod.err))"
    fi
done
if [ -z "$failed" ]; then
    echo "MYCEL-RESULT modules pass loaded: {modules}{builtin}"
else
    echo "MYCEL-RESULT modules fail could not load:$failed"
fi

ip link set lo up
# busybox's ip cannot name the peer; it becomes vethN.
if ip link add mycel0 type veth 2>/tmp/veth.err && [ -e /sys/class/net/mycel0 ]; then
    ip link set mycel0 up
    echo "MYCEL-RESULT veth pass veth pair created: $(ls /sys/class/net | tr '\n' ' ')"
else
    echo "MYCEL-RESULT veth fail ip link add ... type veth: $(cat /tmp/veth.err)"
fi

/{GUEST_BINARY} run --object /{GUEST_OBJECT}
echo "MYCEL-INFO guest-exit $?"
poweroff -f
"#
    )
}

/// A module's uncompressed bytes.
#[derive(Debug)]
pub struct Module {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// The modules to load, dependencies first, and the wanted ones built into the kernel.
#[derive(Debug)]
pub struct Resolved {
    pub load_order: Vec<Module>,
    pub builtin: Vec<String>,
}

/// Finds `wanted` and their dependencies (from each module's `.modinfo`) under `moddir`
/// (`/lib/modules/<release>`), decompressing `.ko.xz`/`.ko.gz`/`.ko.zst` on the host.
pub fn resolve_modules(moddir: &Path, wanted: &[&str]) -> anyhow::Result<Resolved> {
    let mut files = BTreeMap::new();
    index_modules(&moddir.join("kernel"), &mut files)?;
    let builtin_list = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let builtin_all: BTreeSet<String> = builtin_list
        .lines()
        .filter_map(|l| Path::new(l.trim()).file_name())
        .map(|n| module_name(&n.to_string_lossy()))
        .collect();

    let mut resolved = Resolved {
        load_order: Vec::new(),
        builtin: Vec::new(),
    };
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit(
            &module_name(name),
            &files,
            &builtin_all,
            &mut seen,
            &mut resolved,
            0,
        )?;
    }
    Ok(resolved)
}

fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    out: &mut Resolved,
    depth: usize,
) -> anyhow::Result<()> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    if depth > 32 {
        bail!("module dependencies nest too deep at {name}");
    }
    let Some(path) = files.get(name) else {
        if builtin.contains(name) {
            out.builtin.push(name.to_string());
            return Ok(());
        }
        bail!("module {name} is neither in the package nor built into the kernel");
    };
    let bytes = decompress(path)?;
    for dep in modinfo(&bytes, "depends")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        visit(&module_name(dep), files, builtin, seen, out, depth + 1)?;
    }
    out.load_order.push(Module {
        name: name.to_string(),
        bytes,
    });
    Ok(())
}

/// Maps module names to files under `dir`, recursively.
fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, out)?;
        } else if let Some(file) = path.file_name().map(|n| n.to_string_lossy().into_owned())
            && [".ko", ".ko.xz", ".ko.gz", ".ko.zst"]
                .iter()
                .any(|s| file.ends_with(s))
        {
            out.insert(module_name(&file), path);
        }
    }
    Ok(())
}

/// `sch-ingress.ko.xz` → `sch_ingress`: the kernel treats `-` and `_` alike in names.
fn module_name(file: &str) -> String {
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The module file's bytes, decompressed with the matching tool.
fn decompress(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".gz") {
        "gzip"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| {
            format!(
                "running {tool} to decompress {} (install it)",
                path.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The value of `key` in a module's `.modinfo` (NUL-separated `key=value` strings).
fn modinfo(module: &[u8], key: &str) -> String {
    let needle = format!("\0{key}=");
    let needle = needle.as_bytes();
    module
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| {
            let value = &module[at + needle.len()..];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            String::from_utf8_lossy(&value[..end]).into_owned()
        })
        .unwrap_or_default()
}

/// A writer of `newc` cpio archives (see the kernel's
/// Documentation/driver-api/early-userspace/buffer-format.rst).
struct Cpio<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self { out, next_ino: 1 }
    }

    fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, 0o040_755, &[], (0, 0))
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100_000 | perm, data, (0, 0))
    }

    fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, 0o120_777, target.as_bytes(), (0, 0))
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, 0o020_600, &[], (major, minor))
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        self.header(ino, mode, nlink, size, rdev, name)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
        name: &str,
    ) -> io::Result<()> {
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(namesize).unwrap_or(u32::MAX),
            0,
        ];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        // Header (110 bytes) plus name are padded to a multiple of 4.
        self.pad(110 + namesize)
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let padding = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..padding])
    }

    fn finish(mut self) -> io::Result<W> {
        self.header(0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.dir("bin").expect("dir");
        cpio.file("bin/x", 0o755, b"hello").expect("file");
        cpio.symlink("bin/sh", "busybox").expect("symlink");
        let out = cpio.finish().expect("finish");
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
        // The file entry: header (110) + "bin/x\0" (6) padded to 116, then data.
        let file_at = text
            .find("070701")
            .and_then(|first| text[first + 1..].find("070701"))
            .expect("second header")
            + 1;
        assert_eq!(file_at % 4, 0);
    }

    #[test]
    fn reads_modinfo_dependencies() {
        let blob = b"\x7fELF....\0license=GPL\0depends=libcrc32c,nf_conntrack\0vermagic=6.1.0\0";
        assert_eq!(modinfo(blob, "depends"), "libcrc32c,nf_conntrack");
        assert_eq!(modinfo(blob, "vermagic"), "6.1.0");
        assert_eq!(modinfo(blob, "alias"), "");
    }

    #[test]
    fn names_modules_like_the_kernel() {
        assert_eq!(module_name("sch_ingress.ko.xz"), "sch_ingress");
        assert_eq!(module_name("cls-bpf.ko"), "cls_bpf");
        assert_eq!(module_name("veth"), "veth");
    }
}
