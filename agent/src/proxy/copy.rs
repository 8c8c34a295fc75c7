//! Copying a tunnel's bytes both ways, with half-close and an optional idle timeout.
//!
//! Each direction starts with a small buffer and doubles it only when a read fills it, up
//! to [`MAX_BUF`]: most tunnels sit idle or carry little, and thousands of them should not
//! each pin 2 × 64 KiB. When one side ends its writing (EOF on read), the other side's
//! writing is shut down and the opposite direction goes on until it ends too.

use std::{
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

/// Initial buffer per direction.
pub(crate) const MIN_BUF: usize = 1024;
/// Largest buffer per direction.
pub(crate) const MAX_BUF: usize = 64 * 1024;

/// Bytes carried by a finished tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// From the first stream to the second.
    pub a_to_b: u64,
    /// From the second stream to the first.
    pub b_to_a: u64,
}

/// Copies between `a` and `b` until both directions have ended, either side failed, the
/// tunnel was idle for `idle`, or `cancel` completed. `on_a_to_b`/`on_b_to_a` see every
/// chunk's length as it is written (for live byte counters).
pub(crate) async fn copy_bidirectional<A, B>(
    a: A,
    b: B,
    idle: Option<Duration>,
    cancel: impl Future<Output = ()>,
    on_a_to_b: impl Fn(u64),
    on_b_to_a: impl Fn(u64),
) -> io::Result<CopyStats>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved in either direction.
    let last = Arc::new(AtomicU64::new(0));
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let both = async {
        tokio::try_join!(
            copy_one(ar, bw, &last, start, &on_a_to_b),
            copy_one(br, aw, &last, start, &on_b_to_a),
        )
    };
    let idle_watch = async {
        let Some(idle) = idle else {
            return std::future::pending::<io::Error>().await;
        };
        loop {
            let at = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= at {
                return io::Error::new(io::ErrorKind::TimedOut, "tunnel idle timeout");
            }
            tokio::time::sleep_until(at).await;
        }
    };
    tokio::select! {
        r = both => r.map(|(a_to_b, b_to_a)| CopyStats { a_to_b, b_to_a }),
        e = idle_watch => Err(e),
        () = cancel => Err(io::Error::new(io::ErrorKind::Interrupted, "tunnel closed by drain")),
    }
}

async fn copy_one<R, W>(
    mut r: R,
    mut w: W,
    last: &AtomicU64,
    start: Instant,
    count: &impl Fn(u64),
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; MIN_BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the end on, keep the other direction open.
            match w.shutdown().await {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                _ => return Ok(total),
            }
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        total += n as u64;
        count(n as u64);
        let millis = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(millis, Ordering::Relaxed);
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize((buf.len() * 2).min(MAX_BUF), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn half_close_and_growth() {
        let (client, a) = tokio::io::duplex(256 * 1024);
        let (b, mut server) = tokio::io::duplex(256 * 1024);
        let task = tokio::spawn(copy_bidirectional(
            a,
            b,
            None,
            std::future::pending(),
            |_| {},
            |_| {},
        ));
        let (mut cr, mut cw) = tokio::io::split(client);
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&sent).await.expect("client write");
            cw.shutdown().await.expect("client shutdown");
        });
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to the end");
        assert_eq!(got, payload);
        server
            .write_all(b"late answer")
            .await
            .expect("server answers after half-close");
        server.shutdown().await.expect("server shutdown");
        let mut answer = Vec::new();
        cr.read_to_end(&mut answer)
            .await
            .expect("client reads answer");
        assert_eq!(answer, b"late answer");
        writer.await.expect("writer task");
        let stats = task.await.expect("copy task").expect("copy ok");
        assert_eq!(
            stats,
            CopyStats {
                a_to_b: 200_000,
                b_to_a: 11
            }
        );
    }

    #[tokio::test]
    async fn idle_timeout_closes() {
        let (_client, a) = tokio::io::duplex(1024);
        let (b, _server) = tokio::io::duplex(1024);
        let r = copy_bidirectional(
            a,
            b,
            Some(Duration::from_millis(200)),
            std::future::pending(),
            |_| {},
            |_| {},
        )
        .await;
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::TimedOut));
    }
}
