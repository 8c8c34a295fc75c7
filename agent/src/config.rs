//! The agent's configuration: built from the command line and environment, validated
//! once, logged at start-up.
//!
//! Every setting has a flag and an environment variable (`MYCEL_*`); defaults are the
//! named constants below. An invalid value is a [`Error`] naming the setting, the value and
//! why; the binary exits with status 64 (`EX_USAGE`) on it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use mycel_common::service::MAX_SERVICES;
use serde::Serialize;

use crate::datapath::MapSizes;

/// Where pinned maps and links live by default.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/mycel";
/// Default resource directory of the file source.
pub const DEFAULT_SOURCE: &str = "file:/etc/mycel/resources";
/// Admin endpoints (health, readiness, metrics, debug); localhost only by default.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Prometheus metrics.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
/// Readiness for the kubelet.
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// Exit status for invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_USAGE: i32 = 64;

/// Where desired state comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceConfig {
    /// A directory of Kubernetes-format YAML files, watched for changes.
    File(PathBuf),
}

/// The agent's settings.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// `--source` / `MYCEL_SOURCE`: `file:DIR`.
    pub source: SourceConfig,
    /// `--cgroup` / `MYCEL_CGROUP`: the cgroup v2 directory the socket programs attach to;
    /// every process below it is load-balanced. Default: the root of the cgroup2 mount.
    pub cgroup: PathBuf,
    /// `--bpffs` / `MYCEL_BPFFS`: directory on bpffs for pinned maps and links.
    pub bpffs: PathBuf,
    /// `--admin-addr` / `MYCEL_ADMIN_ADDR`.
    pub admin_addr: SocketAddr,
    /// `--metrics-addr` / `MYCEL_METRICS_ADDR`.
    pub metrics_addr: SocketAddr,
    /// `--readiness-addr` / `MYCEL_READINESS_ADDR`.
    pub readiness_addr: SocketAddr,
    /// `--detach-on-exit` / `MYCEL_DETACH_ON_EXIT`: on shutdown, detach the programs and
    /// remove the pins. Off by default, so traffic keeps flowing across agent restarts.
    pub detach_on_exit: bool,
    /// `--max-services`, `--max-backends` / `MYCEL_MAX_SERVICES`, `MYCEL_MAX_BACKENDS`:
    /// sizes of the service maps when the agent creates them.
    pub map_sizes: MapSizes,
}

/// The raw settings as given, before validation.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Args {
    /// Where resources come from: `file:DIR` (a directory of Kubernetes YAML).
    #[arg(long, env = "MYCEL_SOURCE", default_value = DEFAULT_SOURCE)]
    pub source: String,
    /// cgroup v2 directory to attach the socket programs to [default: the cgroup2 root].
    #[arg(long, env = "MYCEL_CGROUP")]
    pub cgroup: Option<String>,
    /// Directory on bpffs for pinned maps and links.
    #[arg(long, env = "MYCEL_BPFFS", default_value = DEFAULT_BPFFS)]
    pub bpffs: String,
    /// Address of the admin endpoints (/healthz, /readyz, /metrics, /debug/*).
    #[arg(long, env = "MYCEL_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: String,
    /// Address of the Prometheus endpoint (/metrics).
    #[arg(long, env = "MYCEL_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,
    /// Address of the readiness endpoint (/healthz/ready).
    #[arg(long, env = "MYCEL_READINESS_ADDR", default_value = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: String,
    /// On shutdown, detach the programs and remove the pins (default: keep them, so
    /// traffic keeps flowing while the agent is down).
    #[arg(long, env = "MYCEL_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,
    /// Service frontends the kernel map holds (at most 65536); used when the map is created.
    #[arg(long, env = "MYCEL_MAX_SERVICES", default_value_t = MapSizes::default().services.to_string())]
    pub max_services: String,
    /// Backend slots across all services the kernel map holds; used when the map is created.
    #[arg(long, env = "MYCEL_MAX_BACKENDS", default_value_t = MapSizes::default().backends.to_string())]
    pub max_backends: String,
}

/// An invalid setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {setting} {value:?}: {why}")]
pub struct Error {
    pub setting: &'static str,
    pub value: String,
    pub why: String,
}

fn invalid(setting: &'static str, value: &str, why: impl Into<String>) -> Error {
    Error {
        setting,
        value: value.to_string(),
        why: why.into(),
    }
}

impl Config {
    /// Validates `args`. `mounts` is the text of /proc/self/mounts (for the cgroup2 root).
    pub fn from_args(args: &Args, mounts: &str) -> Result<Self, Error> {
        let source = parse_source(&args.source)?;
        let cgroup = match &args.cgroup {
            Some(c) => {
                let p = PathBuf::from(c);
                if !p.join("cgroup.procs").exists() {
                    return Err(invalid(
                        "--cgroup",
                        c,
                        "not a cgroup v2 directory (no cgroup.procs in it)",
                    ));
                }
                p
            }
            None => cgroup2_root(mounts).ok_or_else(|| {
                invalid(
                    "--cgroup",
                    "",
                    "no cgroup2 filesystem is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or name a directory",
                )
            })?,
        };
        let bpffs = PathBuf::from(&args.bpffs);
        if !bpffs.is_absolute() {
            return Err(invalid("--bpffs", &args.bpffs, "must be an absolute path"));
        }
        let addr = |setting, v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| invalid(setting, v, format!("{e} (expected IP:PORT)")))
        };
        Ok(Self {
            source,
            cgroup,
            bpffs,
            admin_addr: addr("--admin-addr", &args.admin_addr)?,
            metrics_addr: addr("--metrics-addr", &args.metrics_addr)?,
            readiness_addr: addr("--readiness-addr", &args.readiness_addr)?,
            detach_on_exit: args.detach_on_exit,
            map_sizes: MapSizes {
                services: count("--max-services", &args.max_services, 1, MAX_SERVICES)?,
                backends: count("--max-backends", &args.max_backends, 1, 1 << 24)?,
                ..MapSizes::default()
            },
        })
    }
}

fn count(setting: &'static str, v: &str, min: u32, max: u32) -> Result<u32, Error> {
    match v.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(invalid(
            setting,
            v,
            format!("expected a whole number from {min} to {max}"),
        )),
    }
}

fn parse_source(v: &str) -> Result<SourceConfig, Error> {
    if v == "kubernetes" {
        return Err(invalid(
            "--source",
            v,
            "the Kubernetes source is not available in this build; use file:DIR",
        ));
    }
    match v.split_once(':') {
        Some(("file", dir)) if !dir.is_empty() => {
            let dir = Path::new(dir);
            if !dir.is_dir() {
                return Err(invalid("--source", v, "the directory does not exist"));
            }
            Ok(SourceConfig::File(dir.to_path_buf()))
        }
        _ => Err(invalid("--source", v, "expected file:DIR")),
    }
}

/// The mount point of the (first) cgroup2 filesystem in a mounts table.
pub fn cgroup2_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            source: format!("file:{}", std::env::temp_dir().display()),
            cgroup: None,
            bpffs: DEFAULT_BPFFS.into(),
            admin_addr: DEFAULT_ADMIN_ADDR.into(),
            metrics_addr: DEFAULT_METRICS_ADDR.into(),
            readiness_addr: DEFAULT_READINESS_ADDR.into(),
            detach_on_exit: false,
            max_services: "65536".into(),
            max_backends: "1000".into(),
        }
    }

    const MOUNTS: &str = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n\
                          cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";

    #[test]
    fn finds_the_cgroup2_root() {
        assert_eq!(
            cgroup2_root(MOUNTS),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_root("proc /proc proc rw 0 0\n"), None);
        let cfg = Config::from_args(&args(), MOUNTS).unwrap();
        assert_eq!(cfg.cgroup, PathBuf::from("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let mut a = args();
        a.admin_addr = "localhost".into();
        let e = Config::from_args(&a, MOUNTS).unwrap_err();
        assert_eq!(e.setting, "--admin-addr");
        assert!(e.to_string().contains("\"localhost\""), "{e}");

        let mut a = args();
        a.source = "git:somewhere".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--source"
        );

        let mut a = args();
        a.source = "file:/does/not/exist".into();
        let e = Config::from_args(&a, MOUNTS).unwrap_err();
        assert!(e.why.contains("does not exist"), "{e}");

        let mut a = args();
        a.cgroup = Some("/tmp".into());
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--cgroup"
        );

        let mut a = args();
        a.bpffs = "relative/dir".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--bpffs"
        );

        assert_eq!(
            Config::from_args(&args(), "").unwrap_err().setting,
            "--cgroup"
        );

        let mut a = args();
        a.max_services = "70000".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--max-services"
        );
        let mut a = args();
        a.max_backends = "lots".into();
        assert_eq!(
            Config::from_args(&a, MOUNTS).unwrap_err().setting,
            "--max-backends"
        );
    }
}
