//! Turning a collected POP3 login into a proxied session: directory lookup, connect to the
//! owner, hand over the client's address (Dovecot XCLIENT, when the backend's greeting
//! offers it), replay USER/PASS, relay the verdict, splice on success.
//!
//! Failures keep their meaning for the client: an unknown mailbox or a wrong password is a
//! credential failure (`-ERR [AUTH]`), an unreachable owner or directory is temporary
//! (`-ERR [SYS/TEMP]`, RFC 3206) — and a mailbox is never sent to a backend that does not
//! own it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::codec::{self, Decoded, Reply};
use crate::{
    backend::{BackendStream, Service},
    config::Protocol,
    proxy::{
        Conn, LoginJudge, ProxyContext,
        splice::{self, PlainTcp},
        target,
    },
    secret::Secret,
};

/// Time the backend gets for each reply during the login replay.
const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Login {
    pub name: String,
    pub password: Secret<String>,
}

pub enum LoginResult {
    Proxied,
    /// The credentials were refused; the session may try again.
    Refused,
    /// Owner or directory unavailable; the client was told to retry later.
    TempFail,
}

/// A backend session made ready for a login up to the point where the password is
/// needed: routed, connected, the client's address handed over, USER accepted.
pub struct Prepared {
    target: target::Target,
    upstream: Upstream,
}

/// Why a login could not be prepared; each keeps its meaning for the client.
pub enum NotPrepared {
    /// Not a mailbox of ours: a credential failure.
    Unknown,
    Directory,
    Unavailable(String),
    /// The backend refused USER (relayed as it said it).
    Refused {
        backend: String,
        code: Option<String>,
        text: String,
    },
    Broken(String),
}

/// Routes `name` and opens its backend session up to USER. The session driver starts this
/// as soon as USER arrives, while the client is still sending PASS, so the backend's
/// connect, greeting and USER overlap the client's own round trip.
pub async fn prepare(name: &str, conn: &Conn, ctx: &ProxyContext) -> Result<Prepared, NotPrepared> {
    let target = match target::login_target(ctx, name).await {
        Ok(Some(target)) => target,
        Ok(None) => return Err(NotPrepared::Unknown),
        Err(error) => {
            tracing::error!(%error, "directory lookup failed");
            return Err(NotPrepared::Directory);
        }
    };
    let backend = target.backend.clone();
    let mut upstream = match connect(ctx, &backend, conn).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::warn!(%backend, %error, "backend unavailable for a login");
            return Err(NotPrepared::Unavailable(backend));
        }
    };
    match upstream.open(&target.login_name, conn.peer).await {
        Ok(Reply::Ok { .. }) => Ok(Prepared { target, upstream }),
        Ok(Reply::Err { code, text }) => Err(NotPrepared::Refused {
            backend,
            code,
            text,
        }),
        Ok(Reply::Continue { .. }) | Err(_) => {
            tracing::warn!(%backend, "backend broke the login exchange");
            Err(NotPrepared::Broken(backend))
        }
    }
}

/// A login collected in one go (AUTH PLAIN/LOGIN): prepare, then finish.
pub async fn attempt<S: AsyncRead + AsyncWrite + Unpin + PlainTcp>(
    client: &mut S,
    pending: &mut BytesMut,
    login: Login,
    conn: &Conn,
    ctx: &ProxyContext,
    judge: &LoginJudge,
) -> LoginResult {
    let prepared = prepare(&login.name, conn, ctx).await;
    finish(client, pending, prepared, &login.password, ctx, judge).await
}

/// Sends the password on a prepared session and acts on the verdict: splice on success,
/// relay a refusal, or a temporary failure.
pub async fn finish<S: AsyncRead + AsyncWrite + Unpin + PlainTcp>(
    client: &mut S,
    pending: &mut BytesMut,
    prepared: Result<Prepared, NotPrepared>,
    password: &Secret<String>,
    ctx: &ProxyContext,
    judge: &LoginJudge,
) -> LoginResult {
    let started = Instant::now();
    let record = |backend: &str, result: &str| {
        ctx.metrics.login(
            Protocol::Pop3,
            backend,
            result,
            started.elapsed().as_secs_f64(),
        );
    };
    let unavailable = "Mailbox server temporarily unavailable, try again later";
    if !judge.allowed(ctx) {
        record("none", "account_locked");
        judge.refused().await;
        let text = "Too many failed logins for this account, try again later";
        let _ = client.write_all(&codec::err(Some("SYS/TEMP"), text)).await;
        return LoginResult::Refused;
    }
    let Prepared {
        target,
        mut upstream,
    } = match prepared {
        Ok(prepared) => prepared,
        Err(NotPrepared::Unknown) => {
            record("none", "unknown_mailbox");
            judge.refused().await;
            let _ = client
                .write_all(&codec::err(Some("AUTH"), "Authentication failed."))
                .await;
            return LoginResult::Refused;
        }
        Err(NotPrepared::Directory) => {
            record("none", "directory_error");
            return temp_fail(client, "Directory temporarily unavailable, try again later").await;
        }
        Err(NotPrepared::Unavailable(backend)) => {
            record(&backend, "backend_unavailable");
            return temp_fail(client, unavailable).await;
        }
        Err(NotPrepared::Refused {
            backend,
            code,
            text,
        }) => {
            record(&backend, "refused");
            judge.refused().await;
            let _ = client.write_all(&codec::err(code.as_deref(), &text)).await;
            return LoginResult::Refused;
        }
        Err(NotPrepared::Broken(backend)) => {
            record(&backend, "backend_error");
            return temp_fail(client, unavailable).await;
        }
    };
    let backend = target.backend.as_str();
    match upstream.pass(password).await {
        Ok(Reply::Ok { text }) if target::confirm(ctx, &target).await => {
            record(backend, "ok");
            judge.succeeded(ctx);
            proxy(client, pending, upstream, &text, &target, ctx).await
        }
        Ok(Reply::Ok { .. }) => {
            record(backend, "directory_error");
            let _ = upstream.stream.write_all(codec::encode_quit()).await;
            temp_fail(client, "Mailbox is being set up, try again later").await
        }
        Ok(Reply::Err { code, text }) => {
            record(backend, "refused");
            let _ = upstream.stream.write_all(codec::encode_quit()).await;
            judge.refused().await;
            let _ = client.write_all(&codec::err(code.as_deref(), &text)).await;
            LoginResult::Refused
        }
        Ok(Reply::Continue { .. }) | Err(_) => {
            tracing::warn!(%backend, "backend broke the login exchange");
            record(backend, "backend_error");
            temp_fail(client, unavailable).await
        }
    }
}

async fn temp_fail<S: AsyncWrite + Unpin>(client: &mut S, text: &str) -> LoginResult {
    let _ = client.write_all(&codec::err(Some("SYS/TEMP"), text)).await;
    LoginResult::TempFail
}

async fn connect(
    ctx: &ProxyContext,
    backend: &str,
    conn: &Conn,
) -> Result<Upstream, crate::backend::ConnectError> {
    let stream = ctx
        .pool
        .connect(backend, Service::Pop3, conn.peer, conn.local)
        .await?;
    Ok(Upstream {
        stream,
        buf: BytesMut::with_capacity(codec::MAX_LINE),
    })
}

async fn proxy<S: AsyncRead + AsyncWrite + Unpin + PlainTcp>(
    client: &mut S,
    pending: &mut BytesMut,
    mut upstream: Upstream,
    text: &str,
    target: &target::Target,
    ctx: &ProxyContext,
) -> LoginResult {
    let Upstream { stream, buf } = &mut upstream;
    let verdict = &codec::ok(text);
    splice::hand_over(
        ctx,
        Protocol::Pop3,
        target,
        client,
        pending,
        stream,
        buf,
        verdict,
    )
    .await;
    LoginResult::Proxied
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("backend closed the connection")]
    Closed,
    #[error("backend did not answer within {BACKEND_REPLY_TIMEOUT:?}")]
    Timeout,
    #[error("backend sent an invalid reply: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("backend greeting was -ERR")]
    Greeting,
}

struct Upstream {
    stream: BackendStream,
    buf: BytesMut,
}

impl Upstream {
    /// Greeting, then XCLIENT (when offered) and USER; returns the USER reply.
    async fn open(&mut self, name: &str, peer: SocketAddr) -> Result<Reply, UpstreamError> {
        let Reply::Ok { text: greeting } = self.reply().await? else {
            return Err(UpstreamError::Greeting);
        };
        // A Dovecot that trusts us offers XCLIENT in its greeting: hand over the client's
        // address in the same write as USER (a round trip saved). PASS always goes on its
        // own: Dovecot's pop3-login answers a PASS that arrives in the same read as USER
        // only ~40 ms later (measured: 42 ms pipelined vs 4 ms stepwise).
        let xclient = codec::split_response_code(&greeting).0 == Some("XCLIENT");
        let mut first = Vec::new();
        if xclient {
            first = codec::encode_xclient(peer.ip(), peer.port(), None)?;
        }
        first.extend(codec::encode_user(name)?);
        self.send(&first).await?;
        if xclient && let Reply::Err { text, .. } = self.reply().await? {
            tracing::warn!(%text, "backend refused XCLIENT; is this edge in its login_trusted_networks?");
        }
        self.reply().await
    }

    async fn pass(&mut self, password: &Secret<String>) -> Result<Reply, UpstreamError> {
        self.send(codec::encode_pass(password)?.expose()).await?;
        self.reply().await
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|_| UpstreamError::Closed)
    }

    async fn reply(&mut self) -> Result<Reply, UpstreamError> {
        loop {
            if let Decoded::Complete { value, consumed } = codec::decode_reply(&self.buf)? {
                self.buf.advance(consumed);
                return Ok(value);
            }
            self.buf.reserve(codec::MAX_LINE);
            match tokio::time::timeout(BACKEND_REPLY_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
            {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(0) | Err(_)) => return Err(UpstreamError::Closed),
                Ok(Ok(_)) => {}
            }
        }
    }
}
