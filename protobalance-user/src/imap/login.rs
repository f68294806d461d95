//! Turning a collected IMAP login into a proxied session: directory lookup, connect to the
//! owner, hand over the client's address (RFC 2971 ID with `x-originating-ip` & co., which
//! Dovecot honours from its `login_trusted_networks`), replay LOGIN under the client's tag,
//! relay the backend's answer verbatim, splice on success.
//!
//! Failures keep their meaning for the client: an unknown mailbox is a credential failure
//! (`NO [AUTHENTICATIONFAILED]`), a wrong password gets the backend's own NO, an
//! unreachable owner or directory is temporary (`NO [UNAVAILABLE]`, RFC 5530) — and a
//! mailbox is never sent to a backend that does not own it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::codec::{self, Decoded, EncodedCommand, LiteralMode, Response, Status};
use crate::{
    backend::{BackendStream, Service},
    config::Protocol,
    proxy::{
        LoginJudge, ProxyContext,
        splice::{self, PlainTcp},
        target,
    },
    secret::Secret,
};

/// Time the backend gets for each response during the login replay.
const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Our own tags; LOGIN goes under the client's.
const ID_TAG: &str = "pb0";
const LOGOUT_TAG: &str = "pb1";
/// Untagged lines the backend may send during LOGIN, relayed with its answer.
const MAX_RELAY: usize = 64 * 1024;
const UNAVAILABLE: &str = "Mailbox server temporarily unavailable, try again later";

pub struct Login {
    /// The client's tag: the backend answers under it, so its line is relayed as-is.
    pub tag: String,
    pub name: String,
    pub password: Secret<String>,
}

/// Both ends of the client's connection, for the backend's logs.
#[derive(Clone, Copy)]
pub struct Endpoints {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

pub enum LoginResult {
    Proxied,
    /// The credentials were refused; the session may try again.
    Refused,
    /// Owner or directory unavailable; the client was told to retry later.
    TempFail,
}

pub async fn attempt<S: AsyncRead + AsyncWrite + Unpin + PlainTcp>(
    client: &mut S,
    pending: &mut BytesMut,
    login: Login,
    endpoints: Endpoints,
    ctx: &ProxyContext,
    judge: &LoginJudge,
) -> LoginResult {
    let started = Instant::now();
    let record = |backend: &str, result: &str| {
        let seconds = started.elapsed().as_secs_f64();
        ctx.metrics.login(Protocol::Imap, backend, result, seconds);
    };
    if !judge.allowed(ctx) {
        record("none", "account_locked");
        judge.refused().await;
        let text = "Too many failed logins for this account, try again later";
        let _ = client
            .write_all(&codec::tagged_no(&login.tag, Some("UNAVAILABLE"), text))
            .await;
        return LoginResult::Refused;
    }
    // The short-lived steps are boxed: the session future carries its largest state for as
    // long as the session lives.
    let target = match Box::pin(target::login_target(ctx, &login.name)).await {
        Ok(Some(target)) => target,
        Ok(None) => {
            record("none", "unknown_mailbox");
            judge.refused().await;
            return refuse(client, &login.tag).await;
        }
        Err(error) => {
            tracing::error!(%error, "directory lookup failed");
            record("none", "directory_error");
            return temp_fail(client, &login.tag).await;
        }
    };
    let backend = target.backend.as_str();
    let mut upstream =
        match Box::pin(
            ctx.pool
                .connect(backend, Service::Imap, endpoints.client, endpoints.local),
        )
        .await
        {
            Ok(stream) => Upstream::new(stream),
            Err(error) => {
                tracing::warn!(%backend, %error, "backend unavailable for a login");
                record(backend, "backend_unavailable");
                return temp_fail(client, &login.tag).await;
            }
        };
    match Box::pin(upstream.replay(&login, &target.login_name, endpoints)).await {
        Ok(Verdict {
            status: Status::Ok,
            lines,
        }) if target::confirm(ctx, &target).await => {
            record(backend, "ok");
            judge.succeeded(ctx);
            proxy(client, pending, upstream, &lines, &target, ctx).await
        }
        Ok(Verdict {
            status: Status::Ok, ..
        }) => {
            record(backend, "directory_error");
            upstream.logout().await;
            temp_fail(client, &login.tag).await
        }
        Ok(Verdict { lines, .. }) => {
            record(backend, "refused");
            upstream.logout().await;
            judge.refused().await;
            let _ = client.write_all(&lines).await;
            LoginResult::Refused
        }
        Err(error) => {
            tracing::warn!(%backend, %error, "backend broke the login exchange");
            record(backend, "backend_error");
            temp_fail(client, &login.tag).await
        }
    }
}

/// The same answer Dovecot gives a wrong password, so unknown and known mailboxes look
/// alike to a client probing for names.
async fn refuse<S: AsyncWrite + Unpin>(client: &mut S, tag: &str) -> LoginResult {
    let reply = codec::tagged_no(tag, Some("AUTHENTICATIONFAILED"), "Authentication failed.");
    let _ = client.write_all(&reply).await;
    LoginResult::Refused
}

async fn temp_fail<S: AsyncWrite + Unpin>(client: &mut S, tag: &str) -> LoginResult {
    let reply = codec::tagged_no(tag, Some("UNAVAILABLE"), UNAVAILABLE);
    let _ = client.write_all(&reply).await;
    LoginResult::TempFail
}

async fn proxy<S: AsyncRead + AsyncWrite + Unpin + PlainTcp>(
    client: &mut S,
    pending: &mut BytesMut,
    mut upstream: Upstream,
    lines: &[u8],
    target: &target::Target,
    ctx: &ProxyContext,
) -> LoginResult {
    let Upstream { stream, buf } = &mut upstream;
    let verdict = lines;
    splice::hand_over(
        ctx,
        Protocol::Imap,
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

/// `x-originating-*` is the client as the edge sees it, `x-connected-*` the edge address
/// the client connected to. IPv4-mapped addresses are written as IPv4.
fn id_command(endpoints: Endpoints) -> Result<Vec<u8>, codec::EncodeError> {
    let Endpoints { client, local } = endpoints;
    let (client_ip, client_port) = (client.ip().to_canonical().to_string(), client.port());
    let (local_ip, local_port) = (local.ip().to_canonical().to_string(), local.port());
    let (client_port, local_port) = (client_port.to_string(), local_port.to_string());
    codec::encode_id(
        ID_TAG,
        &[
            ("x-originating-ip", Some(&client_ip)),
            ("x-originating-port", Some(&client_port)),
            ("x-connected-ip", Some(&local_ip)),
            ("x-connected-port", Some(&local_port)),
        ],
    )
}

fn has_capability(caps: &[String], name: &str) -> bool {
    caps.iter().any(|cap| cap.eq_ignore_ascii_case(name))
}

/// Non-synchronizing literals save a round trip per literal where the backend allows
/// them: always with LITERAL+, up to 4096 octets with LITERAL- (RFC 7888).
fn literal_mode(caps: &[String], longest: usize) -> LiteralMode {
    let plus = has_capability(caps, "LITERAL+");
    let minus = has_capability(caps, "LITERAL-") && longest <= codec::MAX_LITERAL;
    if plus || minus {
        LiteralMode::NonSynchronizing
    } else {
        LiteralMode::Synchronizing
    }
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("backend closed the connection")]
    Closed,
    #[error("backend did not answer within {BACKEND_REPLY_TIMEOUT:?}")]
    Timeout,
    #[error("backend sent an invalid response: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("cannot encode the command: {0}")]
    Encode(#[from] codec::EncodeError),
    #[error("backend greeting was not OK")]
    Greeting,
    #[error("backend sent an unexpected response during login")]
    Unexpected,
    #[error("backend sent more than {MAX_RELAY} octets of untagged responses")]
    TooMuch,
}

/// The backend's answer to LOGIN: its status and the lines to relay verbatim (untagged
/// ones first, then the tagged line).
struct Verdict {
    status: Status,
    lines: Vec<u8>,
}

/// What one backend response means to a command in flight.
enum Next {
    /// `+`: send the next fragment.
    Continue,
    /// The command's tagged answer.
    Done(Status),
}

struct Upstream {
    stream: BackendStream,
    buf: BytesMut,
}

impl Upstream {
    fn new(stream: BackendStream) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(codec::MAX_LINE),
        }
    }

    async fn replay(
        &mut self,
        login: &Login,
        name: &str,
        endpoints: Endpoints,
    ) -> Result<Verdict, UpstreamError> {
        let caps = self.greeting().await?;
        let longest = name.len().max(login.password.expose().len());
        let mode = literal_mode(&caps, longest);
        let command = codec::encode_login(&login.tag, name, &login.password, mode)?;
        if !has_capability(&caps, "ID") {
            return self.login(&command, &login.tag).await;
        }
        let id = id_command(endpoints)?;
        match command.fragments() {
            // One write for ID and a LOGIN that needs no continuation: a round trip fewer.
            [only] if !command.needs_continuation() => {
                let batch = Secret::new([id.as_slice(), only.expose()].concat());
                self.send(batch.expose()).await?;
                self.id_answer().await?;
                self.verdict(&login.tag, Vec::new()).await
            }
            _ => {
                self.send(&id).await?;
                self.id_answer().await?;
                self.login(&command, &login.tag).await
            }
        }
    }

    /// The capabilities from the greeting (Dovecot lists them there; without a list we
    /// assume none and use what every IMAP server supports).
    async fn greeting(&mut self) -> Result<Vec<String>, UpstreamError> {
        match self.response().await?.0 {
            Response::Untagged { text } if starts_with_ok(&text) => Ok(codec::capabilities(&text)),
            _ => Err(UpstreamError::Greeting),
        }
    }

    /// Reads the answer to our ID; a refusal is only worth a warning.
    async fn id_answer(&mut self) -> Result<(), UpstreamError> {
        let mut discard = Vec::new();
        match self.next_for(ID_TAG, &mut discard).await? {
            Next::Done(Status::Ok) => Ok(()),
            Next::Done(_) => {
                tracing::warn!("backend refused ID; is this edge in its login_trusted_networks?");
                Ok(())
            }
            Next::Continue => Err(UpstreamError::Unexpected),
        }
    }

    /// Reads up to the tagged answer for `tag`; `lines` collects what is relayed.
    async fn verdict(&mut self, tag: &str, mut lines: Vec<u8>) -> Result<Verdict, UpstreamError> {
        match self.next_for(tag, &mut lines).await? {
            Next::Done(status) => Ok(Verdict { status, lines }),
            Next::Continue => Err(UpstreamError::Unexpected),
        }
    }

    async fn login(
        &mut self,
        command: &EncodedCommand,
        tag: &str,
    ) -> Result<Verdict, UpstreamError> {
        let mut lines = Vec::new();
        for (index, fragment) in command.fragments().iter().enumerate() {
            // A NO before a literal's `+` (e.g. a refused user name) ends the command.
            if index > 0
                && let Next::Done(status) = self.next_for(tag, &mut lines).await?
            {
                return Ok(Verdict { status, lines });
            }
            self.send(fragment.expose()).await?;
        }
        self.verdict(tag, lines).await
    }

    /// Reads up to a continuation or the tagged answer for `tag`, appending untagged lines
    /// and that answer to `lines`.
    async fn next_for(&mut self, tag: &str, lines: &mut Vec<u8>) -> Result<Next, UpstreamError> {
        loop {
            let (response, raw) = self.response().await?;
            match response {
                Response::Continuation { .. } => return Ok(Next::Continue),
                Response::Tagged { tag: answered, .. } if answered != tag => {
                    return Err(UpstreamError::Unexpected);
                }
                Response::Tagged { status, .. } => {
                    lines.extend_from_slice(&raw);
                    return Ok(Next::Done(status));
                }
                Response::Untagged { .. } if lines.len() + raw.len() > MAX_RELAY => {
                    return Err(UpstreamError::TooMuch);
                }
                Response::Untagged { .. } => lines.extend_from_slice(&raw),
            }
        }
    }

    /// Polite goodbye after a refused login; the answer does not matter.
    async fn logout(&mut self) {
        if let Ok(logout) = codec::encode_logout(LOGOUT_TAG) {
            let _ = self.stream.write_all(&logout).await;
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|_| UpstreamError::Closed)
    }

    /// The next response and its raw line.
    async fn response(&mut self) -> Result<(Response, BytesMut), UpstreamError> {
        loop {
            if let Decoded::Complete { value, consumed } = codec::decode_response(&self.buf)? {
                return Ok((value, self.buf.split_to(consumed)));
            }
            self.buf.reserve(codec::MAX_LINE);
            let read = self.stream.read_buf(&mut self.buf);
            match tokio::time::timeout(BACKEND_REPLY_TIMEOUT, read).await {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(0) | Err(_)) => return Err(UpstreamError::Closed),
                Ok(Ok(_)) => {}
            }
        }
    }
}

fn starts_with_ok(text: &str) -> bool {
    let word = text.split(' ').next().unwrap_or_default();
    word.eq_ignore_ascii_case("OK")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[&str]) -> Vec<String> {
        list.iter().map(|cap| (*cap).to_owned()).collect()
    }

    #[test]
    fn literal_mode_follows_the_backend() {
        let sync = LiteralMode::Synchronizing;
        let plus = LiteralMode::NonSynchronizing;
        assert_eq!(literal_mode(&caps(&["IMAP4rev1", "literal+"]), 9000), plus);
        assert_eq!(literal_mode(&caps(&["LITERAL-"]), codec::MAX_LITERAL), plus);
        assert_eq!(
            literal_mode(&caps(&["LITERAL-"]), codec::MAX_LITERAL + 1),
            sync
        );
        assert_eq!(literal_mode(&caps(&["IMAP4rev1"]), 1), sync);
        assert_eq!(literal_mode(&[], 1), sync);
    }

    #[test]
    fn id_carries_both_ends_of_the_client_connection() {
        let endpoints = Endpoints {
            client: "[::ffff:192.0.2.7]:50123".parse().expect("addr"),
            local: "[2001:db8::1]:143".parse().expect("addr"),
        };
        let id = String::from_utf8(id_command(endpoints).expect("encodes")).expect("ascii");
        assert_eq!(
            id,
            "pb0 ID (\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"50123\" \
             \"x-connected-ip\" \"2001:db8::1\" \"x-connected-port\" \"143\")\r\n"
        );
    }

    #[test]
    fn greetings_must_be_ok() {
        assert!(starts_with_ok("OK [CAPABILITY IMAP4rev1] ready"));
        assert!(starts_with_ok("ok"));
        assert!(!starts_with_ok("PREAUTH ready"));
        assert!(!starts_with_ok("BYE go away"));
        assert!(!starts_with_ok("OKAY"));
    }
}
