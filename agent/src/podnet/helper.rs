//! The long-lived thread that makes sockets inside workload namespaces.
//!
//! The inbound path makes a transparent socket for every tunnelled connection. Starting
//! an OS thread for each costs about 100 µs on a busy node, entering a namespace with
//! `setns()` about 2 µs. So one thread, started on first use, serves those jobs in turn:
//! each job enters the namespace it needs and makes its socket (a few non-blocking system
//! calls), then the thread returns to the agent's own namespace, so that it never keeps a
//! departed workload's namespace alive. Jobs that block (netlink, sysctl files) do not
//! come here: they get a thread of their own.
//!
//! If the thread ends (a job panicked, or it could not return home), the next job starts
//! a new one.

use std::fs::File;
use std::io;
use std::sync::mpsc::{self, SendError, Sender};
use std::sync::{Mutex, PoisonError};
use std::thread;

use nix::sched::{CloneFlags, setns};

/// A job: enters a namespace, does its work and sends its answer.
pub(super) type Job = Box<dyn FnOnce() + Send>;

/// Name of the helper thread, as `ps -T` and `top -H` show it.
pub(super) const HELPER_THREAD_NAME: &str = "mycel-podnet";
/// The calling thread's network namespace.
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// The way to the helper thread, once started.
static HELPER: Mutex<Option<Sender<Job>>> = Mutex::new(None);

/// Hands `job` to the helper thread, starting it if needed. Fails only if no thread can be
/// started.
pub(super) fn run(job: Job) -> io::Result<()> {
    let mut helper = HELPER.lock().unwrap_or_else(PoisonError::into_inner);
    let job = match helper.as_ref() {
        Some(jobs) => match jobs.send(job) {
            Ok(()) => return Ok(()),
            // The thread has ended: start another for this job.
            Err(SendError(job)) => job,
        },
        None => job,
    };
    let (jobs, queue) = mpsc::channel();
    // The new thread starts in the namespace of the thread starting it: the agent's own,
    // as callers are runtime threads, which never leave it.
    thread::Builder::new()
        .name(HELPER_THREAD_NAME.to_owned())
        .spawn(move || serve(queue))?;
    // The thread holds the receiving end until it ends, so this reaches it; if it ends
    // right away, the job is dropped with its answer channel and its caller is told.
    let _ = jobs.send(job);
    *helper = Some(jobs);
    Ok(())
}

fn serve(queue: mpsc::Receiver<Job>) {
    let home = match File::open(OWN_NETNS) {
        Ok(home) => home,
        Err(error) => {
            tracing::warn!(%error, "cannot open {OWN_NETNS}; socket helper thread stops");
            return;
        }
    };
    for job in queue {
        job();
        if let Err(error) = setns(&home, CloneFlags::CLONE_NEWNET) {
            // Each job enters its own namespace, so staying here would only keep this
            // workload's namespace alive: stop, and let the next job start a new thread.
            tracing::warn!(%error, "cannot return to the agent's namespace; socket helper thread stops");
            return;
        }
    }
}
