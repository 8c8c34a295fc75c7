//! `mycel-testpod`: the servers and clients integration tests run inside test pods.
//!
//! Servers answer with their `--name`, so a client learns which backend it reached. Clients
//! record what the socket API reports (`getpeername()`, `recvfrom()`'s source) and print
//! one JSON [`ClientReport`] at the end. Long-running modes exit when their stdin closes, so
//! they never outlive the test that started them.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mycel_tests::testpod::{
    ClientReport, ConnectResult, HoldEvent, RawReport, RawTcpReply, now_us,
};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recv, sendto,
    setsockopt, socket, sockopt::ReceiveTimeout,
};
use nix::sys::time::TimeVal;

/// Servers and clients for mycel's integration tests.
#[derive(Debug, Parser)]
#[command(name = "mycel-testpod")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answers each line of each connection with `NAME` (or `NAME <rest>` for
    /// `echo <rest>`, for ping-pong benchmarks). Prints `ready` once listening.
    TcpServer {
        /// Port to listen on, IPv4 and IPv6.
        #[arg(long)]
        port: u16,
        /// What to answer.
        #[arg(long)]
        name: String,
    },
    /// Answers each line of each connection with the client's address as the accepted
    /// socket sees it (`getpeername()`), so a test learns which source address reached
    /// the server. Prints `ready` once listening.
    TcpPeerServer {
        /// Port to listen on, IPv4 and IPv6.
        #[arg(long)]
        port: u16,
    },
    /// Answers each datagram with `NAME`. Prints `ready` once bound.
    UdpServer {
        /// Port to bind, IPv4 and IPv6.
        #[arg(long)]
        port: u16,
        /// What to answer.
        #[arg(long)]
        name: String,
    },
    /// Sequential TCP connections: connect, ask, read the answer, close.
    TcpClient {
        #[command(flatten)]
        common: ClientArgs,
        /// Keep each connection open this long after the answer.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// UDP requests, one socket per request.
    UdpClient {
        #[command(flatten)]
        common: ClientArgs,
        /// connect() the socket and use send/recv instead of sendto/recvfrom.
        #[arg(long)]
        connected: bool,
    },
    /// One long-lived connection asking every `--interval-ms` and printing each answer as
    /// a JSON line, until `--wait-ms` passed, an error, or stdin closes.
    TcpHold {
        /// Where to connect.
        #[arg(long)]
        addr: SocketAddr,
        /// Time between requests.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Give up after this long.
        #[arg(long, default_value_t = 60_000)]
        wait_ms: u64,
        /// Connect and read timeout.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Sends hand-built IPv4 packets (header included, any source address) through a raw
    /// socket (needs only CAP_NET_RAW), then, with `--watch-port`, reports the TCP packets
    /// that arrive for that local port within `--wait-ms`. Prints one JSON [`RawReport`].
    RawSend {
        /// Where the packets go (the kernel routes them; their own header says the rest).
        #[arg(long)]
        dst: Ipv4Addr,
        /// The packets, IPv4 header first, in hex; sent in this order.
        #[arg(long = "packet", required = true)]
        packets: Vec<String>,
        /// Pause between packets.
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Report TCP packets to this local port.
        #[arg(long)]
        watch_port: Option<u16>,
        /// How long to watch after the last packet.
        #[arg(long, default_value_t = 500)]
        wait_ms: u64,
    },
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Where to connect (or send).
    #[arg(long)]
    addr: SocketAddr,
    /// Number of attempts.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Connect and read timeout of each attempt.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Pause between attempts.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Stop early once `--consecutive` attempts in a row were answered by one of these
    /// names (comma-separated).
    #[arg(long, value_delimiter = ',')]
    until_answer: Vec<String>,
    /// See `--until-answer`.
    #[arg(long, default_value_t = 1)]
    consecutive: u32,
    /// The request line each TCP attempt sends (servers answer any line), e.g. a marker a
    /// packet capture looks for.
    #[arg(long, default_value = "?")]
    message: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::TcpServer { port, name } => tcp_server(port, &name),
        Command::TcpPeerServer { port } => tcp_peer_server(port),
        Command::UdpServer { port, name } => udp_server(port, &name),
        Command::TcpClient { common, hold_ms } => {
            run_client(&common, |a| tcp_attempt(a, &common, hold_ms))
        }
        Command::UdpClient { common, connected } => {
            run_client(&common, |a| udp_attempt(a, &common, connected))
        }
        Command::TcpHold {
            addr,
            interval_ms,
            wait_ms,
            timeout_ms,
        } => tcp_hold(addr, interval_ms, wait_ms, timeout_ms),
        Command::RawSend {
            dst,
            packets,
            interval_ms,
            watch_port,
            wait_ms,
        } => raw_send(dst, &packets, interval_ms, watch_port, wait_ms),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mycel-testpod: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exits the process when stdin reaches end of file (the test that started us is gone).
fn exit_on_stdin_eof() {
    thread::spawn(|| {
        let mut buf = [0u8; 256];
        let mut stdin = io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

fn tcp_server(port: u16, name: &str) -> io::Result<ExitCode> {
    // On Linux a `[::]` socket also accepts IPv4 (net.ipv6.bindv6only is 0 by default).
    let listener = TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
    println!("ready");
    exit_on_stdin_eof();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let name = name.to_owned();
        thread::spawn(move || {
            let _ = serve_tcp(conn, &name);
        });
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_tcp(conn: TcpStream, name: &str) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request = line.trim_end();
        let answer = match request.strip_prefix("echo ") {
            Some(rest) => format!("{name} {rest}\n"),
            None => format!("{name}\n"),
        };
        writer.write_all(answer.as_bytes())?;
    }
}

fn tcp_peer_server(port: u16) -> io::Result<ExitCode> {
    let listener = TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?;
    println!("ready");
    exit_on_stdin_eof();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        thread::spawn(move || {
            // A `[::]` socket reports IPv4 clients as `::ffff:a.b.c.d`: answer the plain
            // IPv4 form, as the client knows its own address.
            let peer = conn.peer_addr().map(|a| match a {
                SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                    Some(v4) => SocketAddr::from((v4, v6.port())),
                    None => a,
                },
                v4 => v4,
            });
            if let Ok(peer) = peer {
                let _ = serve_tcp(conn, &peer.to_string());
            }
        });
    }
    Ok(ExitCode::SUCCESS)
}

fn udp_server(port: u16, name: &str) -> io::Result<ExitCode> {
    let socket = UdpSocket::bind(SocketAddr::from(([0u16; 8], port)))?;
    println!("ready");
    exit_on_stdin_eof();
    let mut buf = [0u8; 2048];
    loop {
        let Ok((_, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let _ = socket.send_to(name.as_bytes(), from);
    }
}

/// Runs the attempts, stops early if `--until-answer` is met, prints the report.
fn run_client(
    args: &ClientArgs,
    mut attempt: impl FnMut(SocketAddr) -> ConnectResult,
) -> io::Result<ExitCode> {
    let until: BTreeSet<&str> = args.until_answer.iter().map(String::as_str).collect();
    let mut report = ClientReport::default();
    let mut streak = 0;
    for i in 0..args.count {
        if i > 0 && args.interval_ms > 0 {
            thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let result = attempt(args.addr);
        if !until.is_empty() {
            let hit = result.error.is_none()
                && result.answer.as_deref().is_some_and(|a| until.contains(a));
            streak = if hit { streak + 1 } else { 0 };
        }
        report.results.push(result);
        if !until.is_empty() && streak >= args.consecutive {
            break;
        }
    }
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, &report)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// The error's kind as its name (`ConnectionRefused`, `TimedOut`, …); a read timeout
/// (`WouldBlock` on Linux) counts as `TimedOut`.
fn error_name(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock => "TimedOut".to_owned(),
        io::ErrorKind::Other => format!("{:?}: {e}", e.kind()),
        kind => format!("{kind:?}"),
    }
}

fn tcp_attempt(addr: SocketAddr, args: &ClientArgs, hold_ms: u64) -> ConnectResult {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut result = ConnectResult {
        at_us: now_us(),
        ..ConnectResult::default()
    };
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, timeout);
    result.connect_us = elapsed_us(start);
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            result.error = Some(error_name(&e));
            return result;
        }
    };
    result.peer = stream.peer_addr().ok().map(|a| a.to_string());
    result.local = stream.local_addr().ok().map(|a| a.to_string());
    match ask_tcp_with(&stream, timeout, &args.message) {
        Ok(answer) => result.answer = Some(answer),
        Err(e) => result.error = Some(error_name(&e)),
    }
    if hold_ms > 0 {
        thread::sleep(Duration::from_millis(hold_ms));
    }
    result
}

/// Sends one request line and reads the answer line.
fn ask_tcp(stream: &TcpStream, timeout: Duration) -> io::Result<String> {
    ask_tcp_with(stream, timeout, "?")
}

/// Sends `request` as one line and reads the answer line.
fn ask_tcp_with(stream: &TcpStream, timeout: Duration, request: &str) -> io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut writer = stream;
    writer.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    let mut reader = BufReader::new(stream);
    if reader.read_line(&mut answer)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without an answer",
        ));
    }
    Ok(answer.trim_end().to_owned())
}

fn udp_attempt(addr: SocketAddr, args: &ClientArgs, connected: bool) -> ConnectResult {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut result = ConnectResult {
        at_us: now_us(),
        ..ConnectResult::default()
    };
    let start = Instant::now();
    let outcome = (|| -> io::Result<(String, Option<SocketAddr>, Option<SocketAddr>)> {
        let any: SocketAddr = if addr.is_ipv4() {
            SocketAddr::from(([0u8; 4], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let socket = UdpSocket::bind(any)?;
        socket.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 2048];
        if connected {
            socket.connect(addr)?;
            socket.send(b"?\n")?;
            let n = socket.recv(&mut buf)?;
            let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            Ok((answer, socket.peer_addr().ok(), socket.local_addr().ok()))
        } else {
            socket.send_to(b"?\n", addr)?;
            let (n, from) = socket.recv_from(&mut buf)?;
            let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            Ok((answer, Some(from), socket.local_addr().ok()))
        }
    })();
    result.connect_us = elapsed_us(start);
    match outcome {
        Ok((answer, peer, local)) => {
            result.answer = Some(answer);
            result.peer = peer.map(|a| a.to_string());
            result.local = local.map(|a| a.to_string());
        }
        Err(e) => result.error = Some(error_name(&e)),
    }
    result
}

fn tcp_hold(
    addr: SocketAddr,
    interval_ms: u64,
    wait_ms: u64,
    timeout_ms: u64,
) -> io::Result<ExitCode> {
    exit_on_stdin_eof();
    let timeout = Duration::from_millis(timeout_ms.max(1));
    let print = |event: HoldEvent| {
        if let Ok(line) = serde_json::to_string(&event) {
            println!("{line}");
        }
    };
    let stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            print(HoldEvent {
                event: "error".into(),
                error: Some(error_name(&e)),
                at_us: now_us(),
                ..HoldEvent::default()
            });
            return Ok(ExitCode::FAILURE);
        }
    };
    print(HoldEvent {
        event: "connected".into(),
        peer: stream.peer_addr().ok().map(|a| a.to_string()),
        at_us: now_us(),
        ..HoldEvent::default()
    });
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    while Instant::now() < deadline {
        match ask_tcp(&stream, timeout) {
            Ok(answer) => print(HoldEvent {
                event: "answer".into(),
                answer: Some(answer),
                at_us: now_us(),
                ..HoldEvent::default()
            }),
            Err(e) => {
                print(HoldEvent {
                    event: "error".into(),
                    error: Some(error_name(&e)),
                    at_us: now_us(),
                    ..HoldEvent::default()
                });
                return Ok(ExitCode::FAILURE);
            }
        }
        thread::sleep(Duration::from_millis(interval_ms));
    }
    print(HoldEvent {
        event: "done".into(),
        at_us: now_us(),
        ..HoldEvent::default()
    });
    Ok(ExitCode::SUCCESS)
}

fn elapsed_us(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn parse_hex(text: &str) -> io::Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return Err(io::Error::other(format!(
            "odd number of hex digits: {text}"
        )));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .map_err(|e| io::Error::other(format!("bad hex {text:?}: {e}")))
        })
        .collect()
}

fn raw_send(
    dst: Ipv4Addr,
    packets: &[String],
    interval_ms: u64,
    watch_port: Option<u16>,
    wait_ms: u64,
) -> io::Result<ExitCode> {
    let packets = packets
        .iter()
        .map(|p| parse_hex(p))
        .collect::<io::Result<Vec<_>>>()?;
    // Opened first, so that no reply can come before it listens.
    let watch = match watch_port {
        Some(_) => {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::empty(),
                SockProtocol::Tcp,
            )?;
            setsockopt(&fd, ReceiveTimeout, &TimeVal::new(0, 50_000))?;
            Some(fd)
        }
        None => None,
    };
    // IPPROTO_RAW: the packet carries its own IPv4 header (IP_HDRINCL).
    let out = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Raw,
    )?;
    let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
    let mut report = RawReport::default();
    for (i, p) in packets.iter().enumerate() {
        if i > 0 {
            thread::sleep(Duration::from_millis(interval_ms));
        }
        sendto(
            std::os::fd::AsRawFd::as_raw_fd(&out),
            p,
            &to,
            MsgFlags::empty(),
        )?;
        report.sent += 1;
    }
    if let (Some(fd), Some(port)) = (watch, watch_port) {
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let n = match recv(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &mut buf,
                MsgFlags::empty(),
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let b = &buf[..n];
            let ihl = usize::from(b.first().copied().unwrap_or(0) & 0x0f) * 4;
            let (Some(src), Some(tcp)) = (b.get(12..16), b.get(ihl..ihl + 14)) else {
                continue;
            };
            if u16::from_be_bytes([tcp[2], tcp[3]]) != port {
                continue;
            }
            report.tcp_replies.push(RawTcpReply {
                from: SocketAddrV4::new(
                    Ipv4Addr::new(src[0], src[1], src[2], src[3]),
                    u16::from_be_bytes([tcp[0], tcp[1]]),
                )
                .to_string(),
                flags: tcp[13],
            });
        }
    }
    println!(
        "{}",
        serde_json::to_string(&report).map_err(io::Error::other)?
    );
    Ok(ExitCode::SUCCESS)
}
