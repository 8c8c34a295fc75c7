//! What the kernel offers, and what its verifier says about each of mycel's programs.
//!
//! The datapath stops at the first program the kernel rejects; loading every program of the
//! object on its own here shows all of them, each with the verifier's own words.

use std::{error::Error as StdError, fs, path::Path};

use aya::{
    EbpfLoader,
    programs::{Program, ProgramError, ProgramType},
    sys::{BpfHelper, is_helper_supported, is_program_supported},
};

use crate::report::{self, Status};

/// Where the object's maps are pinned while its programs are tried, apart from the
/// datapath's own pin directory.
const PROBE_PIN_DIR: &str = "/sys/fs/bpf/mycel-probe";

/// Reports program types and helpers mycel uses or will use, as `MYCEL-FEATURE` lines.
pub fn features() {
    report::info("aya-features", &format!("{:?}", aya::features()));
    let program_types = [
        ("program-type:cgroup_sock_addr", ProgramType::CgroupSockAddr),
        ("program-type:cgroup_sock", ProgramType::CgroupSock),
        ("program-type:sock_ops", ProgramType::SockOps),
        ("program-type:sk_msg", ProgramType::SkMsg),
        ("program-type:sched_cls", ProgramType::SchedClassifier),
    ];
    for (name, ty) in program_types {
        report::feature(name, &yes_no(is_program_supported(ty)));
    }
    let helpers = [
        (
            "helper:cgroup_sock_addr:set_retval",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_set_retval,
        ),
        (
            "helper:cgroup_sock_addr:get_socket_cookie",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
        (
            "helper:cgroup_sock_addr:get_netns_cookie",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
        (
            "helper:cgroup_sock_addr:get_current_pid_tgid",
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_current_pid_tgid,
        ),
        (
            "helper:sock_ops:get_socket_cookie",
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
        (
            "helper:sock_ops:sock_hash_update",
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_sock_hash_update,
        ),
        (
            "helper:sk_msg:msg_redirect_hash",
            ProgramType::SkMsg,
            BpfHelper::BPF_FUNC_msg_redirect_hash,
        ),
        (
            "helper:sched_cls:ringbuf_output",
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_ringbuf_output,
        ),
    ];
    for (name, ty, helper) in helpers {
        report::feature(name, &yes_no(is_helper_supported(ty, helper)));
    }
}

/// Whether the kernel has `bpf_set_retval` for cgroup sock_addr programs (Linux ≥ 5.18).
pub fn has_set_retval() -> bool {
    is_helper_supported(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval)
        .unwrap_or(false)
}

fn yes_no(r: Result<bool, ProgramError>) -> String {
    match r {
        Ok(true) => "yes".into(),
        Ok(false) => "no".into(),
        Err(e) => format!("probe-failed({})", report::chain(&e)),
    }
}

/// Loads the object at `object` and then each of its programs on its own, reporting
/// `object` and one `verifier:<program>` result per program.
pub fn programs(object: Option<&Path>) {
    let Some(object) = object else {
        report::result(
            "object",
            Status::Skip,
            "no eBPF object was given (--object)",
        );
        return;
    };
    let data = match fs::read(object) {
        Ok(d) => d,
        Err(e) => {
            report::result(
                "object",
                Status::Fail,
                &format!("reading {}: {e}", object.display()),
            );
            return;
        }
    };
    let pin_dir = Path::new(PROBE_PIN_DIR);
    if let Err(e) = fs::create_dir_all(pin_dir) {
        report::result(
            "object",
            Status::Fail,
            &format!("creating {PROBE_PIN_DIR}: {e}"),
        );
        return;
    }
    let mut ebpf = match EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(&data)
    {
        Ok(e) => e,
        Err(e) => {
            let d = describe(&e);
            report::result("object", Status::Fail, &d.summary);
            if let Some(log) = &d.log {
                report::log("object", log);
            }
            let _ = fs::remove_dir_all(pin_dir);
            return;
        }
    };
    let mut names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    names.sort();
    report::result(
        "object",
        Status::Pass,
        &format!(
            "{} maps created; programs: {}",
            ebpf.maps().count(),
            names.join(", ")
        ),
    );
    for name in &names {
        let check = format!("verifier:{name}");
        let Some(program) = ebpf.program_mut(name) else {
            continue;
        };
        let loaded = match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::CgroupSkb(p) => p.load(),
            Program::CgroupSockopt(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::SkMsg(p) => p.load(),
            Program::SkSkb(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            Program::SocketFilter(p) => p.load(),
            Program::Xdp(p) => p.load(),
            other => {
                report::result(
                    &check,
                    Status::Skip,
                    &format!("no loader here for {:?} programs", other.prog_type()),
                );
                continue;
            }
        };
        match loaded {
            Ok(()) => report::result(&check, Status::Pass, "accepted by the verifier"),
            Err(e) => {
                let d = describe(&e);
                // A helper the kernel lacks is a kernel limit, not a program bug: the agent
                // must load a fallback there, which load-attach checks. Any other rejection
                // is a failure.
                match d.log.as_deref().and_then(missing_helper) {
                    Some(helper) => report::result(
                        &check,
                        Status::Skip,
                        &format!(
                            "calls {helper}, which this kernel lacks (the agent needs a fallback here; see load-attach)"
                        ),
                    ),
                    None => report::result(&check, Status::Fail, &d.summary),
                }
                if let Some(log) = &d.log {
                    report::log(&check, log);
                }
            }
        }
    }
    drop(ebpf);
    let _ = fs::remove_dir_all(pin_dir);
}

/// An error told in one line, plus the verifier's log when there is one.
#[derive(Debug)]
pub struct Described {
    pub summary: String,
    pub log: Option<String>,
}

/// Describes `e`: its chain of messages, where a program load failure is cut down to the
/// errno and the verifier's verdict (the whole log goes to [`Described::log`]).
pub fn describe(e: &(dyn StdError + 'static)) -> Described {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some((io_error, log)) = load_error(err) {
            parts.push(format!("BPF_PROG_LOAD: {io_error}"));
            let verdict = verdict(&log);
            if !verdict.is_empty() {
                parts.push(format!("verifier: {verdict}"));
            }
            return Described {
                summary: parts.join("; "),
                log: Some(log),
            };
        }
        let text = err.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    Described {
        summary: parts.join(": "),
        log: None,
    }
}

/// aya's program error behind `err`, however it was wrapped (the datapath boxes it).
fn program_error<'e>(err: &'e (dyn StdError + 'static)) -> Option<&'e ProgramError> {
    err.downcast_ref::<ProgramError>()
        .or_else(|| err.downcast_ref::<Box<ProgramError>>().map(AsRef::as_ref))
        .or_else(|| match err.downcast_ref::<aya::EbpfError>() {
            Some(aya::EbpfError::ProgramError(p)) => Some(p),
            _ => None,
        })
}

/// The errno and log of a `BPF_PROG_LOAD` failure.
fn load_error(err: &(dyn StdError + 'static)) -> Option<(String, String)> {
    match program_error(err)? {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => Some((io_error.to_string(), verifier_log.to_string())),
        _ => None,
    }
}

/// The helper a verifier log rejects as unknown to the kernel or to the program type:
/// `invalid func unknown#187` (5.10), `unknown func bpf_set_retval#187`, `program of this
/// type cannot use helper bpf_set_retval#187`.
fn missing_helper(log: &str) -> Option<String> {
    const MARKERS: [&str; 3] = ["invalid func ", "unknown func ", "cannot use helper "];
    let line = log
        .lines()
        .rev()
        .find(|l| MARKERS.iter().any(|m| l.contains(m)))?;
    let at = MARKERS
        .iter()
        .find_map(|m| line.find(m).map(|i| i + m.len()))?;
    let token = line[at..].split_whitespace().next()?;
    let (name, id) = token.split_once('#')?;
    let id: u32 = id
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()?;
    let name = match (name, id) {
        ("unknown", 186) => "bpf_get_retval",
        ("unknown", 187) => "bpf_set_retval",
        ("unknown", _) => "an unknown helper",
        (known, _) => known,
    };
    Some(format!("{name} (helper #{id})"))
}

/// The verifier's verdict: the last lines of its log that are not statistics.
fn verdict(log: &str) -> String {
    const STATS: [&str; 5] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
        "peak_states",
    ];
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !STATS.iter().any(|s| l.starts_with(s)))
        .collect();
    let start = lines.len().saturating_sub(2);
    lines[start..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_missing_helpers() {
        let log = "109: (85) call unknown#187\ninvalid func unknown#187\nprocessed 99 insns";
        assert_eq!(
            missing_helper(log).as_deref(),
            Some("bpf_set_retval (helper #187)")
        );
        let log = "program of this type cannot use helper bpf_sk_storage_get#107";
        assert_eq!(
            missing_helper(log).as_deref(),
            Some("bpf_sk_storage_get (helper #107)")
        );
        assert_eq!(missing_helper("R1 invalid mem access 'scalar'"), None);
    }

    #[test]
    fn finds_program_errors_inside_datapath_errors() {
        let err = mycel_agent::datapath::Error::Program {
            name: "connect4",
            source: Box::new(ProgramError::NotLoaded),
        };
        let mut found = false;
        let mut current: Option<&(dyn StdError + 'static)> = Some(&err);
        while let Some(e) = current {
            found |= matches!(program_error(e), Some(ProgramError::NotLoaded));
            current = e.source();
        }
        assert!(found, "no ProgramError in the chain of {err}");
    }

    #[test]
    fn verdict_skips_statistics() {
        let log = "0: (b7) r0 = 1\ninvalid func unknown#187\nverification time 8077 usec\nstack depth 84+0\nprocessed 99 insns";
        assert_eq!(verdict(log), "0: (b7) r0 = 1 | invalid func unknown#187");
    }
}
