//! The IMAP session driver: greets with the cluster's banner and capability list, answers
//! CAPABILITY, NOOP, ID, LOGOUT and STARTTLS itself, collects a login (LOGIN in any
//! astring form, AUTHENTICATE PLAIN or LOGIN with or without SASL-IR), hands it to
//! `login` (directory lookup, backend connect, ID with the client's address, LOGIN replay
//! under the client's tag) and, once the backend says OK, splices.
//!
//! Generic over the stream so tests can drive it in memory and STARTTLS can swap it later.
//! Every read is bounded by the codec (MAX_LINE, MAX_LITERAL, MAX_COMMAND) and by the
//! pre-auth timeout.

use std::time::Instant;

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

mod sasl;

use super::{
    codec::{self, CodecError, Command, CommandKind, Decoded, SaslResponse},
    login::{self, Endpoints, Login, LoginResult},
};
use crate::{
    proxy::{
        Conn, LoginJudge, Outcome, ProxyContext,
        client_io::{self, ReadStop},
        splice::PlainTcp,
    },
    tls::{ClientStream, TlsAcceptor},
};
use sasl::authenticate;

/// What the edge implements before login, for the whole cluster; STARTTLS is added on
/// plaintext listeners that offer it. LITERAL+ because the codec accepts `{n+}`.
const CAPABILITIES: &[&str] = &[
    "IMAP4rev1",
    "SASL-IR",
    "LITERAL+",
    "ID",
    "AUTH=PLAIN",
    "AUTH=LOGIN",
];

/// Commands of the authenticated and selected states (RFC 9051 and common extensions):
/// before login they get "Log in first" rather than "Unknown command".
const AFTER_LOGIN: &str = "ENABLE SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE \
    LIST LSUB NAMESPACE STATUS APPEND IDLE CHECK CLOSE UNSELECT EXPUNGE SEARCH FETCH STORE COPY \
    MOVE UID SORT THREAD GETQUOTA GETQUOTAROOT SETQUOTA GETACL SETACL DELETEACL LISTRIGHTS \
    MYRIGHTS GETMETADATA SETMETADATA COMPRESS NOTIFY";

/// Why reading the next client input stopped.
enum ReadEnd {
    Closed,
    TimedOut,
    TooLong,
    /// A non-synchronizing literal over the limit: its data cannot be told from commands.
    UnsyncableLiteral,
}

struct Client<S> {
    stream: ClientStream<S>,
    /// Offered as STARTTLS while the stream is still plaintext.
    starttls: Option<TlsAcceptor>,
    buf: BytesMut,
    deadline: Instant,
    /// `limits.max_line_octets`: a first line longer than this ends the session.
    max_line: usize,
    /// Buffer length when we last sent `+` for a literal, so each gets exactly one.
    continued_at: Option<usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn offers_starttls(&self) -> bool {
        self.starttls.is_some() && !self.stream.is_tls()
    }

    /// The capability list for the current state of the connection.
    fn capabilities(&self) -> Vec<&'static str> {
        let mut caps = CAPABILITIES.to_vec();
        if self.offers_starttls() {
            caps.push("STARTTLS");
        }
        caps
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    fn consume(&mut self, octets: usize) {
        self.buf.advance(octets.min(self.buf.len()));
        self.continued_at = None;
    }

    /// The next command. Literal continuations and malformed commands are answered here.
    async fn command(&mut self) -> Result<Command, ReadEnd> {
        loop {
            match codec::decode_command(&self.buf) {
                Ok(Decoded::Complete { value, consumed }) => {
                    self.consume(consumed);
                    return Ok(value);
                }
                Ok(Decoded::Incomplete) if self.line_too_long() => return Err(ReadEnd::TooLong),
                Ok(Decoded::Incomplete) => self.fill().await?,
                Ok(Decoded::NeedContinuation { .. }) => {
                    if self.continued_at != Some(self.buf.len()) {
                        self.continued_at = Some(self.buf.len());
                        if !self
                            .send(&codec::continuation("Ready for literal data"))
                            .await
                        {
                            return Err(ReadEnd::Closed);
                        }
                    }
                    self.fill().await?;
                }
                Err(error) => self.reject(&error).await?,
            }
        }
    }

    /// Answers a malformed command and skips it, or says why the session cannot go on.
    async fn reject(&mut self, error: &CodecError) -> Result<(), ReadEnd> {
        let Some(reply) = error_reply(error) else {
            return Err(ReadEnd::TooLong);
        };
        if !self.send(&reply).await {
            return Err(ReadEnd::Closed);
        }
        let skip = error.resume_at().ok_or(ReadEnd::UnsyncableLiteral)?;
        self.consume(skip);
        Ok(())
    }

    /// One SASL response line; `None` when it was not base64 (the line is skipped).
    async fn sasl_line(&mut self) -> Result<Option<SaslResponse>, ReadEnd> {
        loop {
            match codec::decode_sasl_line(&self.buf) {
                Ok(Decoded::Complete { value, consumed }) => {
                    self.consume(consumed);
                    return Ok(Some(value));
                }
                Ok(_) => self.fill().await?,
                Err(error) => {
                    let skip = error.resume_at().ok_or(ReadEnd::TooLong)?;
                    self.consume(skip);
                    return Ok(None);
                }
            }
        }
    }

    fn line_too_long(&self) -> bool {
        client_io::line_too_long(&self.buf, self.max_line)
    }

    async fn fill(&mut self) -> Result<(), ReadEnd> {
        client_io::fill(
            &mut self.stream,
            &mut self.buf,
            codec::MAX_LINE,
            self.deadline,
        )
        .await
        .map_err(|stop| match stop {
            ReadStop::Closed => ReadEnd::Closed,
            ReadStop::TimedOut => ReadEnd::TimedOut,
        })
    }
}

/// The answer to a malformed command; `None` when the line is too long to answer.
fn error_reply(error: &CodecError) -> Option<Vec<u8>> {
    let (code, text) = match error {
        CodecError::Syntax { reason, .. } => (None, format!("Invalid command: {reason}")),
        CodecError::LiteralTooLarge { .. } => (
            Some("TOOBIG"),
            format!("Literals may hold at most {} octets", codec::MAX_LITERAL),
        ),
        CodecError::LineTooLong => return None,
    };
    Some(match error.tag() {
        Some(tag) => codec::tagged_bad(tag, code, &text),
        None => codec::untagged(&match code {
            Some(code) => format!("BAD [{code}] {text}"),
            None => format!("BAD {text}"),
        }),
    })
}

pub async fn run<S: AsyncRead + AsyncWrite + Unpin + PlainTcp>(
    stream: ClientStream<S>,
    conn: &Conn,
    ctx: &ProxyContext,
) -> Outcome {
    let (peer, local) = (conn.peer, conn.local);
    let mut client = Client {
        stream,
        starttls: conn.starttls.clone(),
        max_line: ctx.limits().max_line_octets,
        buf: BytesMut::with_capacity(codec::MAX_LINE),
        deadline: Instant::now() + ctx.limits().pre_auth_timeout(),
        continued_at: None,
    };
    if !client
        .send(&codec::greeting(&client.capabilities(), &ctx.banner))
        .await
    {
        return Outcome::ClientQuit;
    }
    let endpoints = Endpoints {
        client: peer,
        local,
    };
    let mut attempts = Attempts::default();
    loop {
        let step = match client.command().await {
            Ok(command) => answer(&mut client, command).await,
            Err(end) => Step::Read(end),
        };
        let login = match step {
            Step::Continue => continue,
            Step::Login(login) => login,
            Step::End(outcome) => return attempts.ended(outcome),
            Step::Read(end) => return attempts.ended(close(&mut client, end).await),
        };
        let judge = LoginJudge::new(ctx, &login.name, peer.ip(), attempts.failures);
        let stream = &mut client.stream;
        match login::attempt(stream, &mut client.buf, login, endpoints, ctx, &judge).await {
            LoginResult::Proxied => return Outcome::Proxied,
            LoginResult::TempFail => attempts.unavailable = true,
            LoginResult::Refused => {
                attempts.failures += 1;
                if judge.failed(ctx).refuses() {
                    let text = "[UNAVAILABLE] Too many errors from your address, try again later";
                    client.send(&codec::bye(text)).await;
                    return Outcome::AuthFailed;
                }
            }
        }
        if attempts.failures >= ctx.limits().max_auth_failures {
            client.send(&codec::bye("Too many failed logins")).await;
            return Outcome::AuthFailed;
        }
    }
}

/// What the not-authenticated state remembers across logins.
#[derive(Default)]
struct Attempts {
    failures: u32,
    /// A login found its backend unavailable. The session stays open (a tagged NO leaves
    /// the state as it was), but if it then ends without a login, that is the backend's
    /// doing, not the client's.
    unavailable: bool,
}

impl Attempts {
    fn ended(&self, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::ClientQuit if self.unavailable => Outcome::BackendUnavailable,
            outcome => outcome,
        }
    }
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(client: &mut Client<S>, end: ReadEnd) -> Outcome {
    let text = match end {
        ReadEnd::Closed => return Outcome::ClientQuit,
        ReadEnd::TimedOut => "Timed out waiting for login",
        ReadEnd::TooLong => "Line too long",
        ReadEnd::UnsyncableLiteral => "Literal too large",
    };
    client.send(&codec::bye(text)).await;
    Outcome::ClientError
}

enum Step {
    Continue,
    Login(Login),
    End(Outcome),
    Read(ReadEnd),
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    command: Command,
) -> Step {
    let Command { tag, kind } = command;
    let reply = match kind {
        CommandKind::Login { user, password } => {
            return Step::Login(Login {
                tag,
                name: user,
                password,
            });
        }
        CommandKind::Authenticate { mechanism, initial } => {
            return authenticate(client, tag, &mechanism, initial).await;
        }
        CommandKind::Logout => {
            let ok = codec::tagged_ok(&tag, None, "Logout completed.");
            client.send(&[codec::bye("Logging out"), ok].concat()).await;
            return Step::End(Outcome::ClientQuit);
        }
        CommandKind::Capability => [
            codec::capability_line(&client.capabilities()),
            codec::tagged_ok(&tag, None, "Capability completed."),
        ]
        .concat(),
        CommandKind::Noop => codec::tagged_ok(&tag, None, "NOOP completed."),
        // The client's own ID is not passed on: the backend hears ours, with its address.
        CommandKind::Id(_) => [
            codec::untagged("ID NIL"),
            codec::tagged_ok(&tag, None, "ID completed."),
        ]
        .concat(),
        CommandKind::StartTls if client.offers_starttls() => return starttls(client, &tag).await,
        CommandKind::StartTls if client.stream.is_tls() => {
            codec::tagged_bad(&tag, None, "TLS is already active")
        }
        CommandKind::StartTls => {
            codec::tagged_no(&tag, None, "STARTTLS is not available on this port")
        }
        CommandKind::Unknown { name } if requires_login(&name) => {
            codec::tagged_bad(&tag, None, "Log in first")
        }
        CommandKind::Unknown { .. } => codec::tagged_bad(&tag, None, "Unknown command"),
    };
    if client.send(&reply).await {
        Step::Continue
    } else {
        Step::End(Outcome::ClientQuit)
    }
}

/// RFC 9051 §6.2.1: answer, drop whatever the client pipelined in plaintext (it must not
/// be read as commands after the handshake), then negotiate TLS within the pre-auth
/// deadline.
async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(client: &mut Client<S>, tag: &str) -> Step {
    let Some(acceptor) = client.starttls.clone() else {
        return Step::Continue;
    };
    if !client
        .send(&codec::tagged_ok(tag, None, "Begin TLS negotiation now"))
        .await
    {
        return Step::End(Outcome::ClientQuit);
    }
    client.buf.clear();
    client.continued_at = None;
    let handshake =
        tokio::time::timeout_at(client.deadline.into(), client.stream.start_tls(&acceptor));
    match handshake.await {
        Ok(Ok(())) => Step::Continue,
        Ok(Err(_)) | Err(_) => Step::End(Outcome::ClientError),
    }
}

fn requires_login(name: &str) -> bool {
    AFTER_LOGIN
        .split_ascii_whitespace()
        .any(|known| known.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(error: &CodecError) -> String {
        String::from_utf8(error_reply(error).unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn malformed_commands_get_tagged_or_untagged_bad() {
        let syntax = |tag: Option<&str>| CodecError::Syntax {
            tag: tag.map(Into::into),
            reason: "expected a space",
            skip: 3,
        };
        assert_eq!(
            reply(&syntax(Some("a1"))),
            "a1 BAD Invalid command: expected a space\r\n"
        );
        assert_eq!(
            reply(&syntax(None)),
            "* BAD Invalid command: expected a space\r\n"
        );
        let big = |tag: Option<&str>| CodecError::LiteralTooLarge {
            tag: tag.map(Into::into),
            skip: 9,
            synchronizing: true,
        };
        assert_eq!(
            reply(&big(Some("x"))),
            "x BAD [TOOBIG] Literals may hold at most 4096 octets\r\n"
        );
        assert!(reply(&big(None)).starts_with("* BAD [TOOBIG] "));
        assert_eq!(error_reply(&CodecError::LineTooLong), None);
    }

    #[test]
    fn state_commands_need_a_login_others_are_unknown() {
        for name in ["select", "UID", "Fetch", "IDLE", "enable"] {
            assert!(requires_login(name), "{name}");
        }
        for name in ["XYZZY", "SELECTX", "", "STARTTLS"] {
            assert!(!requires_login(name), "{name}");
        }
    }

    #[test]
    fn the_greeting_advertises_what_the_edge_implements() {
        let greeting = codec::greeting(CAPABILITIES, "protobalance ready");
        assert_eq!(
            greeting,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] protobalance ready\r\n"
        );
        assert!(!CAPABILITIES.contains(&"STARTTLS"));
    }
}
