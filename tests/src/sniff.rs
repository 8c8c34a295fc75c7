//! A packet capture on every interface of a test's network namespace, looking for a marker
//! in the bytes on the wire: proves what crosses a link is (or is not) plaintext.

use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, setsockopt, socket,
    sockopt::ReceiveTimeout,
};
use nix::sys::time::TimeVal;

use crate::netns;

/// What a capture saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    /// Packets read (every interface, both directions).
    pub packets: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Packets that contained the marker.
    pub with_marker: u64,
}

/// A running capture; [`Sniffer::stop`] ends it.
#[derive(Debug)]
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Capture>>,
}

impl Sniffer {
    /// Captures every packet of every interface of network namespace `netns` (an
    /// `AF_PACKET` socket: needs CAP_NET_RAW) and counts those containing `marker`.
    pub fn start(netns: &str, marker: &[u8]) -> Sniffer {
        assert!(!marker.is_empty(), "an empty marker is in every packet");
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = netns.to_owned();
        let marker = marker.to_vec();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let inner = name.clone();
            netns::run_in(&name, move || {
                let name = inner;
                let fd = socket(
                    AddressFamily::Packet,
                    SockType::Raw,
                    SockFlag::SOCK_CLOEXEC,
                    SockProtocol::EthAll,
                )
                .unwrap_or_else(|e| panic!("packet socket in {name}: {e}"));
                setsockopt(&fd, ReceiveTimeout, &TimeVal::new(0, 50_000))
                    .unwrap_or_else(|e| panic!("SO_RCVTIMEO on the packet socket: {e}"));
                let _ = ready_tx.send(());
                let mut capture = Capture::default();
                let mut buf = vec![0u8; 65_536];
                while !stopped.load(Ordering::Acquire) {
                    match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        Ok(n) => {
                            capture.packets += 1;
                            capture.bytes += n as u64;
                            if buf[..n]
                                .windows(marker.len())
                                .any(|w| w == marker.as_slice())
                            {
                                capture.with_marker += 1;
                            }
                        }
                        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                        Err(e) => panic!("reading the packet socket: {e}"),
                    }
                }
                capture
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the capture did not start");
        Sniffer {
            stop,
            thread: Some(thread),
        }
    }

    /// Ends the capture and returns what it saw.
    pub fn stop(mut self) -> Capture {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(c)) => c,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Capture::default(),
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
