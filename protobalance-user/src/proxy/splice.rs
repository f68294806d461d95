//! After login: copy both directions until either side closes or nothing moves for the
//! idle timeout. Buffers are tokio's fixed-size copy buffers: memory per session is bounded.

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
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::ProxyContext;
use crate::config::Protocol;

/// The hand-over after a successful login, shared by POP3 and IMAP: the backend's verdict
/// to the client, the commands the client pipelined behind its login to the backend, any
/// bytes the backend sent past its verdict to the client, then [`splice`] until either
/// side closes. Counted per backend while it lasts.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per protocol, all distinct"
)]
pub async fn hand_over<C, B>(
    ctx: &ProxyContext,
    protocol: Protocol,
    backend: &str,
    client: &mut C,
    pending: &mut BytesMut,
    upstream: &mut B,
    upstream_extra: &[u8],
    verdict: &[u8],
) where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if client.write_all(verdict).await.is_err() {
        return;
    }
    if !pending.is_empty() && upstream.write_all(pending).await.is_err() {
        return;
    }
    pending.clear();
    if !upstream_extra.is_empty() && client.write_all(upstream_extra).await.is_err() {
        return;
    }
    ctx.metrics.proxied(protocol, backend, true);
    splice(client, upstream, ctx.limits.idle_timeout()).await;
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
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
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
