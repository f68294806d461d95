//! After login: copy both directions until both sides have closed, or nothing moves for
//! the idle timeout.
//!
//! Memory per idle session matters (an edge holds tens of thousands of logged-in IMAP
//! sessions): when both sides are plain TCP, each direction waits for readiness with no
//! buffer and borrows an 8 KiB buffer only for the read and write that follow, so an idle
//! session holds no copy buffers at all. Anything else (TLS on either side) uses tokio's
//! `copy_bidirectional`, which keeps one fixed-size buffer per direction.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{ProxyContext, kernel_splice::KernelSplice};
use crate::{config::Protocol, tls::MaybeTls};

/// Size of the buffer a busy direction borrows for one read and write.
const PUMP_BUFFER: usize = 8 * 1024;

/// The plain TCP socket under a stream, when there is one (not TLS, not in-memory).
pub trait PlainTcp {
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        None
    }
}

impl PlainTcp for TcpStream {
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        Some(self)
    }
}

impl<S: PlainTcp> PlainTcp for MaybeTls<S> {
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        match self {
            MaybeTls::Plain(stream) => stream.plain_tcp(),
            MaybeTls::Tls(_) | MaybeTls::Upgrading => None,
        }
    }
}

impl PlainTcp for tokio::io::DuplexStream {}

/// The hand-over after a successful login, shared by POP3 and IMAP: the backend's verdict
/// to the client, the commands the client pipelined behind its login to the backend, any
/// bytes the backend sent past its verdict to the client, then [`splice`] until either
/// side closes (in the kernel when `ctx.kernel_splice` is loaded and both sides are plain
/// TCP; see `kernel_splice`). Counted per backend while it lasts.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per protocol, all distinct"
)]
pub async fn hand_over<C, B>(
    ctx: &ProxyContext,
    protocol: Protocol,
    target: &super::target::Target,
    client: &mut C,
    pending: &mut BytesMut,
    upstream: &mut B,
    upstream_extra: &mut BytesMut,
    verdict: &[u8],
) where
    C: AsyncRead + AsyncWrite + Unpin + PlainTcp,
    B: AsyncRead + AsyncWrite + Unpin + PlainTcp,
{
    // The kernel takes only sessions with nothing to pass on by hand: no command pipelined
    // behind the login, nothing the backend sent past its verdict, nothing unread on either
    // socket (checked before the verdict goes out; see `kernel_splice`). They are joined
    // below, after the owner check: until then the client's commands wait on its socket.
    let kernel = ctx.kernel_splice.as_deref().filter(|_| {
        pending.is_empty()
            && upstream_extra.is_empty()
            && client.plain_tcp().is_some_and(|s| KernelSplice::quiet(s))
            && upstream.plain_tcp().is_some_and(|s| KernelSplice::quiet(s))
    });
    if client.write_all(verdict).await.is_err() {
        return;
    }
    if !pending.is_empty() && upstream.write_all(pending).await.is_err() {
        return;
    }
    // The login buffers are not needed while spliced: give their memory back.
    *pending = BytesMut::new();
    if !upstream_extra.is_empty() && client.write_all(upstream_extra).await.is_err() {
        return;
    }
    *upstream_extra = BytesMut::new();
    let backend = target.backend.as_str();
    // Registered while spliced: a move of the mailbox to another backend ends the session
    // (the client logs in again and lands on the new owner).
    let live = ctx
        .directory
        .live_sessions()
        .register(&target.mailbox, backend);
    // A move that switched the mailbox while this login was under way ended the sessions
    // registered then; one registered after that sees the new owner here.
    // Boxed: a short-lived step whose state this long-lived future would otherwise carry.
    if let Ok(Some(owner)) = Box::pin(ctx.directory.owner_now(&target.mailbox)).await
        && owner != backend
    {
        tracing::info!(mailbox = %target.mailbox, %backend, %owner, protocol = protocol.as_str(), "session closed: the mailbox moved during the login");
        return;
    }
    let mut joined = None;
    if let Some(kernel) = kernel
        && let (Some(client), Some(upstream)) = (client.plain_tcp(), upstream.plain_tcp())
    {
        joined = Some(kernel.join(client, upstream));
    }
    ctx.metrics.proxied(protocol, backend, true);
    let idle = ctx.limits().idle_timeout();
    ctx.metrics
        .spliced(protocol, joined.as_ref().is_some_and(|j| j.in_kernel()));
    let spliced = async {
        if let Some(joined) = joined
            && let (Some(client), Some(upstream)) = (client.plain_tcp(), upstream.plain_tcp())
        {
            return joined.splice(client, upstream, idle).await;
        }
        splice(client, upstream, idle).await
    };
    tokio::select! {
        _ = spliced => {}
        () = live.ended() => {
            tracing::info!(mailbox = %target.mailbox, %backend, protocol = protocol.as_str(), "session closed: the mailbox moved to another backend");
        }
    }
    ctx.metrics.proxied(protocol, backend, false);
}

/// Why a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SpliceEnd {
    Closed,
    Idle,
    Error,
}

pub async fn splice<C, B>(client: &mut C, backend: &mut B, idle: Duration) -> SpliceEnd
where
    C: AsyncRead + AsyncWrite + Unpin + PlainTcp,
    B: AsyncRead + AsyncWrite + Unpin + PlainTcp,
{
    if let (Some(client), Some(backend)) = (client.plain_tcp(), backend.plain_tcp()) {
        return splice_tcp(client, backend, idle).await;
    }
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Activity {
        inner: client,
        last: Arc::clone(&last),
        started,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, backend);
    tokio::pin!(copy);
    loop {
        let since = Duration::from_millis(last.load(Relaxed));
        let deadline = started + since + idle;
        tokio::select! {
            result = &mut copy => return if result.is_ok() { SpliceEnd::Closed } else { SpliceEnd::Error },
            () = tokio::time::sleep_until(deadline.into()) => {
                if Duration::from_millis(last.load(Relaxed)) == since {
                    return SpliceEnd::Idle;
                }
            }
        }
    }
}

/// Records the time of the last byte moved in either direction (reads on the client side
/// are client→backend traffic, writes are backend→client).
struct Activity<'a, S> {
    inner: &'a mut S,
    last: Arc<AtomicU64>,
    started: Instant,
}

impl<S> Activity<'_, S> {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Both sides plain TCP: no buffer is held while a direction waits.
pub(super) async fn splice_tcp(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    idle: Duration,
) -> SpliceEnd {
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let (client_read, mut client_write) = client.split();
    let (backend_read, mut backend_write) = backend.split();
    let up = pump(&client_read, &mut backend_write, &last, started);
    let down = pump(&backend_read, &mut client_write, &last, started);
    let both = async { tokio::try_join!(up, down) };
    tokio::pin!(both);
    loop {
        let since = Duration::from_millis(last.load(Relaxed));
        tokio::select! {
            result = &mut both => return if result.is_ok() { SpliceEnd::Closed } else { SpliceEnd::Error },
            () = tokio::time::sleep_until((started + since + idle).into()) => {
                if Duration::from_millis(last.load(Relaxed)) == since {
                    return SpliceEnd::Idle;
                }
            }
        }
    }
}

/// Copies `from` to `to` until end of file (then shuts `to` down for writing).
async fn pump(
    from: &ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    last: &AtomicU64,
    started: Instant,
) -> std::io::Result<()> {
    loop {
        from.as_ref().readable().await?;
        let mut buf = vec![0u8; PUMP_BUFFER];
        match from.as_ref().try_read(&mut buf) {
            Ok(0) => return to.shutdown().await,
            Ok(n) => {
                to.write_all(buf.get(..n).unwrap_or_default()).await?;
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                last.store(ms, Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
