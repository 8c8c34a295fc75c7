//! The one system call the agent makes without a safe wrapper.
//!
//! `getsockopt(SOL_SOCKET, SO_NETNS_COOKIE)` (Linux 5.14) tells which network namespace a
//! socket belongs to, as the 64-bit cookie that kernel programs read with
//! `bpf_get_netns_cookie()`. Neither nix nor socket2 offers it. Everything else goes
//! through safe crates; keep this module this small.

#![expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE) has no safe wrapper in nix or socket2"
)]

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

/// The cookie of the network namespace `socket` belongs to (stable for the namespace's
/// lifetime, never reused while the machine runs). Fails with `ENOPROTOOPT` before Linux
/// 5.14.
pub(crate) fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `socket` is a borrowed, therefore open, descriptor for the whole call; the
    // kernel writes at most `len` (8) bytes to `cookie`, a live, aligned, writable u64 that
    // nothing else references during the call, and writes the length it used to `len`,
    // also a live local. `getsockopt` keeps no pointer after it returns.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<u64>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_NETNS_COOKIE answered {len} bytes instead of 8"),
        ));
    }
    Ok(cookie)
}
