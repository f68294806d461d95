//! The POP3 session driver: greets with the cluster's banner, answers CAPA/QUIT/…, collects
//! the login (USER/PASS, AUTH PLAIN, AUTH LOGIN), hands it to `login` (directory lookup,
//! backend connect, XCLIENT, replay) and, once the backend says `+OK`, splices.
//!
//! Generic over the stream so tests can drive it in memory and STLS can swap it later.
//! Every read is bounded by the codec's MAX_LINE and by the pre-auth timeout.

use std::time::Instant;

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use super::{
    codec::{self, CodecError, Command, Decoded, InitialResponse, SaslLine},
    login::{self, Login, LoginResult},
};
use crate::{
    proxy::{
        Conn, LoginJudge, Outcome, ProxyContext,
        client_io::{self, ReadStop},
        splice::PlainTcp,
    },
    secret::Secret,
    tls::{ClientStream, TlsAcceptor},
};

const CAPABILITIES: &[&str] = &[
    "USER",
    "SASL PLAIN LOGIN",
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "TOP",
    "UIDL",
    "PIPELINING",
];

/// Why reading the next client line stopped.
enum ReadEnd {
    Closed,
    TimedOut,
    TooLong,
}

struct Client<S> {
    stream: ClientStream<S>,
    buf: BytesMut,
    deadline: Instant,
    /// `limits.max_line_octets`: a first line longer than this ends the session.
    max_line: usize,
    /// Offered as STLS while the stream is still plaintext.
    starttls: Option<TlsAcceptor>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn offers_stls(&self) -> bool {
        self.starttls.is_some() && !self.stream.is_tls()
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Runs `decode` on the buffer, reading more until it yields a value, skipping (and
    /// answering) malformed lines.
    async fn next<T>(
        &mut self,
        decode: fn(&[u8]) -> Result<Decoded<T>, CodecError>,
    ) -> Result<T, ReadEnd> {
        loop {
            match decode(&self.buf) {
                Ok(Decoded::Complete { value, consumed }) => {
                    self.buf.advance(consumed);
                    return Ok(value);
                }
                Ok(Decoded::Incomplete) if self.line_too_long() => return Err(ReadEnd::TooLong),
                Ok(Decoded::Incomplete) => self.fill().await?,
                Err(CodecError::LineTooLong) => return Err(ReadEnd::TooLong),
                Err(error) => {
                    let line_end = self
                        .buf
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(self.buf.len(), |i| i + 1);
                    self.buf.advance(line_end);
                    if !self
                        .send(&codec::err(
                            None,
                            &format!("Invalid command ({})", error.kind()),
                        ))
                        .await
                    {
                        return Err(ReadEnd::Closed);
                    }
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

pub async fn run<S: AsyncRead + AsyncWrite + Unpin + PlainTcp>(
    stream: ClientStream<S>,
    conn: &Conn,
    ctx: &ProxyContext,
) -> Outcome {
    let mut client = Client {
        stream,
        buf: BytesMut::with_capacity(codec::MAX_LINE),
        deadline: Instant::now() + ctx.limits().pre_auth_timeout(),
        starttls: conn.starttls.clone(),
        max_line: ctx.limits().max_line_octets,
    };
    if !client.send(&codec::ok(&ctx.banner)).await {
        return Outcome::ClientQuit;
    }
    let mut user: Option<String> = None;
    let mut failures = 0;
    // A command read while a USER's backend session was being prepared, not yet handled.
    let mut carried: Option<Command> = None;
    loop {
        let command = match carried.take() {
            Some(command) => command,
            None => match client.next(codec::decode_command).await {
                Ok(command) => command,
                Err(end) => return close(&mut client, end).await,
            },
        };
        let result = match collect_login(&mut client, command, &mut user).await {
            Step::Continue => continue,
            Step::End(outcome) => return outcome,
            Step::Login(login) => {
                let j = LoginJudge::new(ctx, &login.name, conn.peer.ip(), failures);
                let result =
                    login::attempt(&mut client.stream, &mut client.buf, login, conn, ctx, &j).await;
                (result, j)
            }
            Step::User(name) => {
                if !client.send(&codec::ok("Send PASS")).await {
                    return Outcome::ClientQuit;
                }
                // Open the backend session while the client sends its password.
                // Boxed, like every short-lived step with much state on the way to the
                // splice: the session future carries its largest state for as long as
                // the session lives.
                let (next, prepared) = tokio::join!(
                    client.next(codec::decode_command),
                    Box::pin(login::prepare(&name, conn, ctx))
                );
                match next {
                    Ok(Command::Pass(password)) => {
                        let j = LoginJudge::new(ctx, &name, conn.peer.ip(), failures);
                        let result = login::finish(
                            &mut client.stream,
                            &mut client.buf,
                            prepared,
                            &password,
                            ctx,
                            &j,
                        )
                        .await;
                        (result, j)
                    }
                    Ok(other) => {
                        // Not the password: the prepared session is dropped (closed).
                        user = Some(name);
                        carried = Some(other);
                        continue;
                    }
                    Err(end) => return close(&mut client, end).await,
                }
            }
        };
        let (result, judge) = result;
        match result {
            LoginResult::Proxied => return Outcome::Proxied,
            LoginResult::TempFail => return Outcome::BackendUnavailable,
            LoginResult::Refused => failures += 1,
        }
        if judge.failed(ctx).refuses() {
            let text = "Too many errors from your address, try again later";
            client.send(&codec::err(Some("SYS/TEMP"), text)).await;
            return Outcome::AuthFailed;
        }
        if failures >= ctx.limits().max_auth_failures {
            client
                .send(&codec::err(Some("AUTH"), "Too many failed logins; closing"))
                .await;
            return Outcome::AuthFailed;
        }
    }
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(client: &mut Client<S>, end: ReadEnd) -> Outcome {
    match end {
        ReadEnd::Closed => Outcome::ClientQuit,
        ReadEnd::TimedOut => {
            client
                .send(&codec::err(None, "Timed out waiting for login; closing"))
                .await;
            Outcome::ClientError
        }
        ReadEnd::TooLong => {
            client
                .send(&codec::err(None, "Line too long; closing"))
                .await;
            Outcome::ClientError
        }
    }
}

enum Step {
    Continue,
    End(Outcome),
    Login(Login),
    /// USER: answered by the driver, which prepares the backend session meanwhile.
    User(String),
}

async fn collect_login<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    command: Command,
    user: &mut Option<String>,
) -> Step {
    let reply = match command {
        Command::Capa if client.offers_stls() => codec::capa(&[CAPABILITIES, &["STLS"]].concat()),
        Command::Capa => codec::capa(CAPABILITIES),
        Command::User(name) => return Step::User(name),
        Command::Pass(password) => match user.take() {
            Some(name) => return Step::Login(Login { name, password }),
            None => codec::err(None, "Send USER first"),
        },
        Command::Auth { mechanism, initial } => return auth(client, &mechanism, initial).await,
        Command::AuthList => codec::multiline("", &["PLAIN", "LOGIN"]),
        Command::Quit => {
            client.send(&codec::ok("Bye")).await;
            return Step::End(Outcome::ClientQuit);
        }
        Command::Stls if client.offers_stls() => {
            *user = None;
            return stls(client).await;
        }
        Command::Stls if client.stream.is_tls() => codec::err(None, "TLS is already active"),
        Command::Stls => codec::err(None, "STLS is not available on this port"),
        Command::Apop => codec::err(None, "APOP is not supported; use USER/PASS or AUTH PLAIN"),
        Command::Noop | Command::Empty | Command::Unknown { .. } => {
            codec::err(None, "Log in first (USER/PASS or AUTH)")
        }
    };
    if client.send(&reply).await {
        Step::Continue
    } else {
        Step::End(Outcome::ClientQuit)
    }
}

/// RFC 2595 §4: answer, drop whatever the client pipelined in plaintext (it must not be
/// read as commands after the handshake), then negotiate TLS within the pre-auth deadline.
async fn stls<S: AsyncRead + AsyncWrite + Unpin>(client: &mut Client<S>) -> Step {
    let Some(acceptor) = client.starttls.clone() else {
        return Step::Continue;
    };
    if !client.send(&codec::ok("Begin TLS negotiation")).await {
        return Step::End(Outcome::ClientQuit);
    }
    client.buf.clear();
    let handshake =
        tokio::time::timeout_at(client.deadline.into(), client.stream.start_tls(&acceptor));
    match handshake.await {
        Ok(Ok(())) => Step::Continue,
        Ok(Err(_)) | Err(_) => Step::End(Outcome::ClientError),
    }
}

async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    mechanism: &str,
    initial: Option<InitialResponse>,
) -> Step {
    let login = match mechanism {
        "PLAIN" => auth_plain(client, initial).await,
        "LOGIN" => auth_login(client, initial).await,
        _ => Err(codec::err(
            None,
            "Unsupported mechanism; use PLAIN or LOGIN",
        )),
    };
    match login {
        Ok(Some(login)) => Step::Login(login),
        Ok(None) => Step::End(Outcome::ClientQuit),
        Err(reply) if client.send(&reply).await => Step::Continue,
        Err(_) => Step::End(Outcome::ClientQuit),
    }
}

/// `Ok(None)`: the client went away; `Err(reply)`: answer and carry on.
type AuthStep = Result<Option<Login>, Vec<u8>>;

async fn sasl_response<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    prompt: &[u8],
) -> Result<Option<Secret<String>>, Vec<u8>> {
    if !client.send(prompt).await {
        return Ok(None);
    }
    match client.next(codec::decode_sasl_line).await {
        Ok(SaslLine::Payload(payload)) => Ok(Some(payload)),
        Ok(SaslLine::Cancel) => Err(codec::err(None, "Authentication cancelled")),
        Err(_) => Ok(None),
    }
}

async fn auth_plain<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    initial: Option<InitialResponse>,
) -> AuthStep {
    let payload = match initial {
        Some(InitialResponse::Base64(payload)) => payload,
        Some(InitialResponse::Empty) | None => match sasl_response(client, b"+ \r\n").await? {
            Some(payload) => payload,
            None => return Ok(None),
        },
    };
    let credentials = codec::parse_plain(payload.expose())
        .map_err(|_| codec::err(None, "Invalid AUTH PLAIN response"))?;
    if credentials
        .authzid
        .as_ref()
        .is_some_and(|z| z != &credentials.authcid)
    {
        return Err(codec::err(
            Some("AUTH"),
            "Authorization identities are not supported",
        ));
    }
    Ok(Some(Login {
        name: credentials.authcid,
        password: credentials.password,
    }))
}

async fn auth_login<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    initial: Option<InitialResponse>,
) -> AuthStep {
    let user_b64 = match initial {
        Some(InitialResponse::Base64(user)) => user,
        _ => match sasl_response(client, codec::LOGIN_PROMPT_USERNAME).await? {
            Some(user) => user,
            None => return Ok(None),
        },
    };
    let bad = |_| codec::err(None, "Invalid AUTH LOGIN response");
    let name = codec::decode_sasl_text(user_b64.expose()).map_err(bad)?;
    let Some(password) = sasl_response(client, codec::LOGIN_PROMPT_PASSWORD).await? else {
        return Ok(None);
    };
    let password = Secret::new(codec::decode_sasl_text(password.expose()).map_err(bad)?);
    Ok(Some(Login { name, password }))
}
