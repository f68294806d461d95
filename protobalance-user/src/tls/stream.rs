//! A connection that is plaintext or TLS: the client side of a session (plaintext until
//! STLS/STARTTLS, or TLS from the first byte on implicit-TLS listeners) and the backend
//! side (TLS when the backend is configured with `tls = true`). Generic over the transport
//! so tests can use in-memory streams.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, TlsStream};

pub enum MaybeTls<S> {
    Plain(S),
    /// Server side (towards clients) or client side (towards backends).
    Tls(Box<TlsStream<S>>),
    /// Only while a handshake is in progress; IO on it fails.
    Upgrading,
}

/// What a session holds for its client.
pub type ClientStream<S> = MaybeTls<S>;

impl<S: AsyncRead + AsyncWrite + Unpin> MaybeTls<S> {
    pub const fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// Replaces a plaintext stream with its TLS form (the handshake happens here). The
    /// caller must have dropped any plaintext it buffered: bytes pipelined after
    /// STLS/STARTTLS are an injection attempt, never commands (CVE-2011-0411 class).
    pub async fn start_tls(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        let Self::Plain(plain) = std::mem::replace(self, Self::Upgrading) else {
            return Err(io::Error::other("TLS is already active"));
        };
        // Boxed: a handshake's state is kilobytes, and the session future that awaits it
        // would otherwise carry that size for its whole life.
        let tls = Box::pin(acceptor.accept(plain)).await?;
        *self = Self::Tls(Box::new(TlsStream::Server(tls)));
        Ok(())
    }

    /// The SNI name the client asked for, once TLS is up.
    pub fn sni(&self) -> Option<&str> {
        match self {
            Self::Tls(tls) => match tls.as_ref() {
                TlsStream::Server(server) => server.get_ref().1.server_name(),
                TlsStream::Client(_) => None,
            },
            _ => None,
        }
    }
}

fn upgrading() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "TLS handshake in progress")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, data),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
            Self::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}
