//! TLS to PostgreSQL (`[directory.postgres] ca_file`) with rustls: tokio-postgres's TLS
//! traits over [`crate::tls::connector`], the same verifier the backends' TLS uses. The
//! server's certificate must chain to a CA certificate in the file and name the host of
//! the connection string (a DNS name or an IP address). Without `ca_file` the connection
//! is plaintext (`sslmode` is forced to `disable`): the connector is never asked to
//! handshake. SCRAM channel binding is not offered (tokio-postgres then uses
//! SCRAM-SHA-256 without `-PLUS`).

use std::{
    future::Future,
    io,
    path::Path,
    pin::Pin,
    task::{Context, Poll},
};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::{TlsConnector, client::TlsStream as RustlsStream};

/// Makes a TLS connector per connection (tokio-postgres asks with the host name).
#[derive(Clone)]
pub struct PgTls {
    connector: Option<TlsConnector>,
}

impl PgTls {
    /// Verifies servers against the CA certificates (PEM) in `ca_file`.
    pub fn with_ca_file(ca_file: &Path) -> Result<Self, String> {
        crate::tls::connector(ca_file)
            .map(|connector| Self {
                connector: Some(connector),
            })
            .map_err(|e| format!("{}: {e}", ca_file.display()))
    }

    /// No TLS (the connection's `sslmode` is `disable`: it is never used).
    pub fn off() -> Self {
        Self { connector: None }
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<PgTlsConnect, io::Error> {
        // Asked for every connection, TLS or not (a Unix socket has no host): a name that
        // is not one fails only if a handshake is attempted.
        Ok(PgTlsConnect {
            connector: self.connector.clone(),
            name: ServerName::try_from(host.to_owned()).ok(),
            host: host.to_owned(),
        })
    }
}

pub struct PgTlsConnect {
    connector: Option<TlsConnector>,
    name: Option<ServerName<'static>>,
    host: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = self.connector.ok_or_else(|| {
                io::Error::other("TLS to PostgreSQL needs directory.postgres.ca_file")
            })?;
            let name = self.name.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "`{}` is not a host name or address to verify the certificate against",
                        self.host
                    ),
                )
            })?;
            Ok(PgTlsStream(connector.connect(name, stream).await?))
        })
    }
}

/// A TLS connection to the database.
pub struct PgTlsStream<S>(RustlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
