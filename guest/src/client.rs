//! `mycel-guest client CGROUP tcp|udp ADDR`: a client process inside the test cgroup.
//!
//! It moves itself into `CGROUP` as its very first act, while it still has a single thread
//! and no socket, so every socket it opens afterwards is subject to the cgroup's programs.
//! It then sends one line to `ADDR` and prints one line describing what happened:
//!
//! ```text
//! ok us=<µs> peer=<address getpeername/recvfrom reported> reply=<the line the server sent>
//! error us=<µs> errno=<n> op=<connect|send|recv|...> <message>
//! ```
//!
//! `us` is the time from the first socket call to the outcome, without the process's own
//! start-up, which is slow and variable under emulation.
//!
//! The parent (`checks`) decides whether that is a pass; the client only reports.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

/// How long the client waits for any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// The line the client sends; servers echo it back after their own tag.
pub const PING: &str = "mycel-ping";

/// Entry point of the subcommand; `args` are the words after `client`.
pub fn main(args: &[String]) -> ExitCode {
    let [cgroup, proto, addr] = args else {
        eprintln!("usage: mycel-guest client CGROUP tcp|udp ADDR");
        return ExitCode::from(64);
    };
    let procs = std::path::Path::new(cgroup).join("cgroup.procs");
    if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
        println!(
            "error errno={} op=join-cgroup {}: {e}",
            errno(&e),
            procs.display()
        );
        return ExitCode::SUCCESS;
    }
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad address {addr:?}: {e}");
            return ExitCode::from(64);
        }
    };
    let started = Instant::now();
    let outcome = match proto.as_str() {
        "tcp" => tcp(addr),
        "udp" => udp(addr),
        other => {
            eprintln!("unknown protocol {other:?}");
            return ExitCode::from(64);
        }
    };
    let us = started.elapsed().as_micros();
    match outcome {
        Ok((peer, reply)) => println!("ok us={us} peer={peer} reply={reply}"),
        Err((op, e)) => println!("error us={us} errno={} op={op} {e}", errno(&e)),
    }
    ExitCode::SUCCESS
}

type Step<T> = Result<T, (&'static str, std::io::Error)>;

fn tcp(addr: SocketAddr) -> Step<(SocketAddr, String)> {
    let stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT).map_err(|e| ("connect", e))?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| ("setsockopt", e))?;
    // getpeername(): the getpeername hooks should give back the service address.
    let peer = stream.peer_addr().map_err(|e| ("getpeername", e))?;
    (&stream)
        .write_all(format!("{PING}\n").as_bytes())
        .map_err(|e| ("send", e))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| ("recv", e))?;
    Ok((peer, reply.trim().to_string()))
}

fn udp(addr: SocketAddr) -> Step<(SocketAddr, String)> {
    let any = if addr.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    let socket = UdpSocket::bind(any).map_err(|e| ("bind", e))?;
    socket
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| ("setsockopt", e))?;
    // An unconnected socket: sendmsg() and recvmsg() hooks do the translation.
    socket
        .send_to(PING.as_bytes(), addr)
        .map_err(|e| ("sendto", e))?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf).map_err(|e| ("recvfrom", e))?;
    Ok((from, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}
