//! The inbound SMTP session driver (MX, RFC 5321): banner, EHLO/HELO, MAIL, RCPT, DATA,
//! RSET, NOOP, QUIT, VRFY, HELP, with PIPELINING (RFC 2920: commands are taken from the
//! buffer one by one, so pipelined input is answered in order), SIZE (RFC 1870), 8BITMIME
//! (RFC 6152) and ENHANCEDSTATUSCODES (RFC 2034). One banner and one capability list for
//! the whole cluster.
//!
//! Routing (`transaction`): the first accepted recipient binds the transaction to its
//! owner's LMTP service (`deliver`); recipients of other backends get `452 4.5.3`, and
//! the edge is never a relay (`554 5.7.1`).
//!
//! DATA streams through a `DataReader` (bounded, strict `CRLF.CRLF`): bare CR/LF are
//! refused with `550 5.6.0`, so no smuggled transaction reaches a backend. Every read has
//! the command timeout (`limits.pre_auth_timeout` for now) and every buffer a bound.
//! STARTTLS (RFC 3207) is offered on plaintext listeners with a certificate: plaintext
//! pipelined after the command is discarded, and the session starts over (EHLO again).
//! Submission listeners (`submission`) run the same driver with AUTH ([`submission`]):
//! mail is accepted only from authenticated users and forwarded to their own backend.
//! SMTPUTF8 (RFC 6531) is offered; such a transaction goes only to a backend that offers
//! it too (else `553 5.6.7`: no downgrading). Not here: CHUNKING.

mod submission;

use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use super::{
    codec::{
        self, BareLineEndings, CodecError, Command, DataReader, DataState, DataVerdict, Decoded,
        ForwardPath, Host, MailParameters, ReversePath, SaslResponse, reply,
    },
    deliver::{self, BackendSession, ClientInfo, Verdict},
    transaction::{Binding, Transaction, backend_lost},
};
use crate::{
    filter::reputation::{Event, Verdict as Judgement},
    proxy::{
        Conn, Outcome, ProxyContext,
        client_io::{self, ReadStop},
    },
    tls::{ClientStream, TlsAcceptor},
};
use submission::Account;

/// Refused commands per session before it is closed.
const MAX_ERRORS: u32 = 10;
/// Bare CR/LF in DATA are refused (configurable normalization is for later).
const BARE_LINE_ENDINGS: BareLineEndings = BareLineEndings::Reject;
/// Pipelined RCPTs taken together (the transaction accepts at most 100 recipients).
const RCPT_BATCH: usize = 100;
/// Client read size; the buffer never holds more than a command line plus one read.
const READ_CHUNK: usize = 16 * 1024;

/// Why reading from the client stopped.
enum ReadEnd {
    Closed,
    TimedOut,
    /// A SASL answer longer than a command line.
    TooLong,
}

struct Client<S> {
    stream: ClientStream<S>,
    buf: BytesMut,
    timeout: Duration,
    /// Offered as STARTTLS while the stream is still plaintext.
    starttls: Option<TlsAcceptor>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn offers_starttls(&self) -> bool {
        self.starttls.is_some() && !self.stream.is_tls()
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// One read within the command timeout (DATA: each read gets the whole timeout, as
    /// RFC 5321 §4.5.3.2 times data blocks).
    async fn fill(&mut self) -> Result<(), ReadEnd> {
        let deadline = std::time::Instant::now() + self.timeout;
        self.fill_by(deadline).await
    }

    async fn fill_by(&mut self, deadline: std::time::Instant) -> Result<(), ReadEnd> {
        client_io::fill(&mut self.stream, &mut self.buf, READ_CHUNK, deadline)
            .await
            .map_err(|stop| match stop {
                ReadStop::Closed => ReadEnd::Closed,
                ReadStop::TimedOut => ReadEnd::TimedOut,
            })
    }

    /// The next command, or the codec's complaint about the next line (already skipped
    /// when the codec says where the line ends).
    /// The whole line must arrive within the command timeout, so a client trickling a
    /// byte at a time cannot hold the session open.
    async fn next_command(&mut self) -> Result<Result<Command, CodecError>, ReadEnd> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            match codec::decode_command(&self.buf) {
                Ok(Decoded::Complete { value, consumed }) => {
                    self.buf.advance(consumed);
                    return Ok(Ok(value));
                }
                Ok(Decoded::Incomplete) => self.fill_by(deadline).await?,
                Err(error) => {
                    self.buf.advance(error.resume_at().unwrap_or(0));
                    return Ok(Err(error));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// The client's answer to a `334` challenge, or the codec's complaint about it.
    async fn next_sasl_line(&mut self) -> Result<Result<SaslResponse, CodecError>, ReadEnd> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            match codec::decode_sasl_response(&self.buf) {
                Ok(Decoded::Complete { value, consumed }) => {
                    self.buf.advance(consumed);
                    return Ok(Ok(value));
                }
                Ok(Decoded::Incomplete) => self.fill_by(deadline).await?,
                Err(CodecError::LineTooLong) => return Err(ReadEnd::TooLong),
                Err(error) => {
                    self.buf.advance(error.resume_at().unwrap_or(0));
                    return Ok(Err(error));
                }
            }
        }
    }
}

/// Which service a listener offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// MX: anyone may send to our mailboxes.
    Inbound,
    /// Submission: authenticated users may send anywhere.
    Submission,
}

/// Where the session stands.
enum Phase {
    /// Before EHLO/HELO.
    Connected,
    /// Greeted, no transaction.
    Idle,
    /// Boxed: it holds a backend connection, far larger than the other phases.
    Mail(Box<Transaction>),
}

enum Step {
    Continue,
    End(Outcome),
}

struct Session<'a, S> {
    client: Client<S>,
    conn: &'a Conn,
    ctx: &'a ProxyContext,
    mode: Mode,
    phase: Phase,
    /// Submission: the authenticated user.
    account: Option<Account>,
    auth_failures: u32,
    /// The client's last EHLO/HELO, passed on to backends by XCLIENT.
    client_info: ClientInfo,
    errors: u32,
    delivered: u32,
    /// Replies are slowed (`reputation.tarpit_delay_ms`).
    tarpit: bool,
    /// Events held against the client in this session.
    offences: u32,
    /// Pipelining without permission is scored once per session.
    pipelining_seen: bool,
    /// Listed by DNSBLs past the threshold: mail is refused with this text.
    blocked: Option<String>,
}

/// Serves one inbound SMTP connection. The outcome is `Proxied` when at least one message
/// was delivered, else `ClientQuit` (or `ClientError` for a timeout or protocol abuse).
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: ClientStream<S>,
    conn: &Conn,
    ctx: &ProxyContext,
    mode: Mode,
) -> Outcome {
    let client = Client {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        timeout: ctx.limits().pre_auth_timeout(),
        starttls: conn.starttls.clone(),
    };
    let mut session = Session {
        client,
        conn,
        ctx,
        mode,
        phase: Phase::Connected,
        account: None,
        auth_failures: 0,
        client_info: ClientInfo::default(),
        errors: 0,
        delivered: 0,
        tarpit: conn.admitted == Judgement::Tarpit,
        offences: 0,
        pipelining_seen: false,
        blocked: None,
    };
    if let Step::End(outcome) = session.greet_client().await {
        return outcome;
    }
    loop {
        let step = match session.client.next_command().await {
            Ok(Ok(command)) => match session.check_pipelining(&command).await {
                Some(end) => end,
                None => session.handle(command).await,
            },
            Ok(Err(error)) => session.refuse_line(error).await,
            Err(end) => return session.close(end).await,
        };
        if let Step::End(outcome) = step {
            return outcome;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// The banner. With `reputation.greeting_delay_ms` (inbound, for clients that have not
    /// passed before) it comes in two parts: `220-` at once, the final `220 ` after the
    /// delay. A client must wait for the final line (RFC 5321 §4.2.1); one that talks
    /// earlier is a pregreeter, scored, and served on (or refused, per its verdict).
    async fn greet_client(&mut self) -> Step {
        let ctx = self.ctx;
        let greeting = format!("{} ESMTP {}", ctx.hostname, ctx.banner);
        let ip = self.conn.peer.ip();
        let lists = ctx.dnsbl();
        let (delay, dnsbl) = match (self.mode, &lists) {
            (Mode::Inbound, dnsbl) => (
                ctx.reputation.greeting_delay(ip),
                // Asked now, answered while the greeting delay runs.
                dnsbl
                    .as_ref()
                    .map(|d| tokio::spawn(std::sync::Arc::clone(d).check(ip))),
            ),
            (Mode::Submission, _) => (None, None),
        };
        if let Some(delay) = delay {
            let first = format!("220-{} ESMTP\r\n", ctx.hostname);
            if !self.client.send(first.as_bytes()).await {
                return Step::End(Outcome::ClientQuit);
            }
            match self.client.fill_by(std::time::Instant::now() + delay).await {
                Err(ReadEnd::TimedOut) => {}
                Err(_) => return Step::End(Outcome::ClientQuit),
                Ok(()) => {
                    tracing::info!(peer = %self.conn.peer, "pregreet: client talked before the banner ended");
                    if let Some(end) = self.judge(Event::Pregreet).await {
                        return end;
                    }
                }
            }
        }
        if let Some(lookup) = dnsbl
            && let Ok(listing) = lookup.await
            && let Some(lists) = &lists
            && let Some(end) = self.judge_listing(lists, &listing).await
        {
            return end;
        }
        match &self.blocked {
            // RFC 5321 §3.1: 554 instead of 220; the client should QUIT.
            Some(text) if delay.is_none() => {
                let text = text.clone();
                self.answer(&reply(554, Some("5.7.1"), &text)).await
            }
            _ => self.answer(&reply(220, None, &greeting)).await,
        }
    }

    /// Scores what the DNS lists say (negative for allowlists); past the threshold, mail
    /// from the client is refused for this session.
    async fn judge_listing(
        &mut self,
        dnsbl: &crate::filter::dnsbl::Dnsbl,
        listing: &crate::filter::dnsbl::Listing,
    ) -> Option<Step> {
        if listing.listed_by.is_empty() {
            return None;
        }
        let ip = self.conn.peer.ip();
        let zones: Vec<&str> = listing.listed_by.iter().map(|(z, _)| z.as_str()).collect();
        tracing::info!(client = %ip, score = listing.score, lists = ?zones, "DNS lists name the client");
        if dnsbl.refuses(listing) {
            self.blocked = Some(format!(
                "Service unavailable; client [{ip}] blocked using {}",
                listing.blocklists(dnsbl.sites()).join(", ")
            ));
        }
        // A blocklisting is held against the session (no clean-session credit).
        self.offences += u32::from(listing.score > 0.0);
        let verdict = self
            .ctx
            .reputation
            .report_weighted(ip, Event::Dnsbl, listing.score);
        self.apply(verdict).await
    }

    /// Scores `event`; ends the session (`421`) when the verdict refuses the client.
    async fn judge(&mut self, event: Event) -> Option<Step> {
        let verdict = self.ctx.reputation.report(self.conn.peer.ip(), event);
        self.offences += u32::from(event != Event::CleanSession);
        self.apply(verdict).await
    }

    async fn apply(&mut self, verdict: Judgement) -> Option<Step> {
        match verdict {
            Judgement::Accept => None,
            Judgement::Tarpit => {
                self.tarpit = true;
                None
            }
            Judgement::TempFail | Judgement::Ban => {
                tracing::info!(peer = %self.conn.peer, verdict = verdict.as_str(), "session ended by reputation");
                let text = "Too many errors from your address; try again later";
                self.client.send(&reply(421, Some("4.7.0"), text)).await;
                Some(Step::End(Outcome::ClientError))
            }
        }
    }

    /// Commands sent ahead of the reply to EHLO/HELO/DATA/STARTTLS (which must end a
    /// pipelined group, RFC 2920 §3.1), or ahead of any reply by a HELO client (which was
    /// never offered PIPELINING).
    async fn check_pipelining(&mut self, command: &Command) -> Option<Step> {
        if self.pipelining_seen || self.client.buf.is_empty() {
            return None;
        }
        let must_be_last = matches!(
            command,
            Command::Ehlo { .. } | Command::Helo { .. } | Command::Data | Command::StartTls
        );
        let allowed = self.client_info.esmtp && !matches!(self.phase, Phase::Connected);
        if matches!(command, Command::Quit) || (!must_be_last && allowed) {
            return None;
        }
        self.pipelining_seen = true;
        tracing::info!(peer = %self.conn.peer, "client pipelined without permission");
        self.judge(Event::Pipelining).await
    }

    /// Scores what RCPT answers say about the client: unknown mailboxes (550 5.1.1) and
    /// relay attempts (554 5.7.1), one event per refused recipient.
    async fn judge_rcpt(&mut self, answers: &[u8]) -> Option<Step> {
        let mut worst = Judgement::Accept;
        for line in answers.split(|b| *b == b'\n') {
            let event = if line.starts_with(b"550 5.1.1") {
                Event::UnknownRecipient
            } else if line.starts_with(b"554 5.7.1") {
                Event::RelayAttempt
            } else {
                continue;
            };
            self.offences += 1;
            worst = worst.max(self.ctx.reputation.report(self.conn.peer.ip(), event));
        }
        self.apply(worst).await
    }

    async fn handle(&mut self, command: Command) -> Step {
        if let Some(text) = &self.blocked
            && matches!(
                command,
                Command::Mail { .. }
                    | Command::Rcpt { .. }
                    | Command::Data
                    | Command::Bdat { .. }
                    | Command::Vrfy { .. }
                    | Command::Auth { .. }
            )
        {
            let text = text.clone();
            return self.error(554, "5.7.1", &text).await;
        }
        let answer = match command {
            Command::Ehlo { host } => self.greet(&host, true),
            Command::Helo { host } => self.greet(&host, false),
            Command::Mail { from, params } => self.mail(&from, &params).await,
            Command::Rcpt { to, params } => {
                let answer = self.rcpt(&to, params.is_empty()).await;
                if let Step::End(outcome) = self.answer(&answer).await {
                    return Step::End(outcome);
                }
                return self.judge_rcpt(&answer).await.unwrap_or(Step::Continue);
            }
            Command::Data => return self.data().await,
            Command::Rset => {
                if matches!(self.phase, Phase::Mail(_)) {
                    self.reset_backend().await;
                }
                if !matches!(self.phase, Phase::Connected) {
                    self.phase = Phase::Idle;
                }
                reply(250, Some("2.0.0"), "OK")
            }
            Command::Noop => reply(250, Some("2.0.0"), "OK"),
            Command::Quit => {
                self.client.send(&reply(221, Some("2.0.0"), "Bye")).await;
                return Step::End(self.finished());
            }
            Command::Vrfy { .. } => reply(252, Some("2.5.2"), "Cannot VRFY; send mail to it"),
            Command::Help { .. } => reply(214, Some("2.0.0"), "See RFC 5321"),
            Command::StartTls => return self.starttls().await,
            Command::Auth { mechanism, initial } => return self.auth(&mechanism, initial).await,
            Command::Expn { .. } => reply(502, Some("5.5.1"), "Command not implemented"),
            Command::Bdat { .. } => {
                // Its chunk follows unannounced; without CHUNKING there is no resync.
                let text = "BDAT not supported; closing";
                self.client.send(&reply(502, Some("5.5.1"), text)).await;
                return Step::End(Outcome::ClientError);
            }
            Command::Unknown { .. } => {
                if let Some(end) = self.judge(Event::ProtocolError).await {
                    return end;
                }
                return self.error(500, "5.5.2", "Command unrecognized").await;
            }
            Command::NonSmtp { .. } => {
                tracing::info!(peer = %self.conn.peer, "not SMTP (HTTP or proxy request); closing");
                let _ = self.judge(Event::NonSmtp).await;
                return Step::End(Outcome::ClientError);
            }
        };
        self.answer(&answer).await
    }

    /// RFC 3207: answer 220, drop whatever the client pipelined in plaintext (it must not be
    /// read as commands after the handshake), negotiate TLS within the command timeout,
    /// and forget the EHLO: the client greets again over TLS.
    async fn starttls(&mut self) -> Step {
        if self.client.stream.is_tls() {
            return self.error(503, "5.5.1", "TLS already active").await;
        }
        let Some(acceptor) = self.client.starttls.clone() else {
            return self.error(502, "5.5.1", "STARTTLS not offered here").await;
        };
        if matches!(self.phase, Phase::Mail(_)) {
            return self
                .error(503, "5.5.1", "Mail transaction in progress")
                .await;
        }
        if !self
            .client
            .send(&reply(220, Some("2.0.0"), "Ready to start TLS"))
            .await
        {
            return Step::End(self.finished());
        }
        self.client.buf.clear();
        let handshake =
            tokio::time::timeout(self.client.timeout, self.client.stream.start_tls(&acceptor));
        match handshake.await {
            Ok(Ok(())) => {
                self.phase = Phase::Connected;
                Step::Continue
            }
            Ok(Err(error)) => {
                tracing::debug!(peer = %self.conn.peer, %error, "STARTTLS handshake failed");
                Step::End(Outcome::ClientError)
            }
            Err(_) => Step::End(Outcome::ClientError),
        }
    }

    async fn answer(&mut self, bytes: &[u8]) -> Step {
        if self.tarpit {
            tokio::time::sleep(self.ctx.reputation.tarpit_delay()).await;
        }
        if self.client.send(bytes).await {
            Step::Continue
        } else {
            Step::End(self.finished())
        }
    }

    /// Answers a refused command; too many end the session.
    async fn error(&mut self, code: u16, enhanced: &str, text: &str) -> Step {
        self.errors += 1;
        if self.errors > MAX_ERRORS {
            let bye = reply(421, Some("4.7.0"), "Too many errors; closing");
            self.client.send(&bye).await;
            return Step::End(Outcome::ClientError);
        }
        self.answer(&reply(code, Some(enhanced), text)).await
    }

    async fn refuse_line(&mut self, error: CodecError) -> Step {
        let event = match error {
            CodecError::LineTooLong | CodecError::Syntax { .. } => Event::ProtocolError,
            _ => Event::BareLineEnding,
        };
        if let Some(end) = self.judge(event).await {
            return end;
        }
        match error {
            CodecError::LineTooLong => {
                let text = "Line too long; closing";
                self.client.send(&reply(500, Some("5.5.2"), text)).await;
                Step::End(Outcome::ClientError)
            }
            CodecError::Syntax { problem, .. } => {
                let (code, enhanced) = problem.reply_code();
                self.error(code, enhanced, &problem.to_string()).await
            }
            _ => {
                self.error(500, "5.5.2", "Bare LF in command; use CRLF")
                    .await
            }
        }
    }

    fn submission(&self) -> bool {
        self.mode == Mode::Submission
    }

    /// Submission: abandons the transaction on the account's backend too.
    async fn reset_backend(&mut self) {
        let Some(account) = self.account.as_mut() else {
            return;
        };
        if let Some(backend) = account.backend.as_mut()
            && let Err(error) = backend.reset().await
        {
            tracing::debug!(%error, "submission backend lost at RSET");
            account.backend = None;
        }
    }

    async fn close(&mut self, end: ReadEnd) -> Outcome {
        match end {
            ReadEnd::TooLong => {
                let text = "Line too long; closing";
                self.client.send(&reply(500, Some("5.5.2"), text)).await;
                Outcome::ClientError
            }
            ReadEnd::Closed => self.finished(),
            ReadEnd::TimedOut => {
                let bye = reply(
                    421,
                    Some("4.4.2"),
                    "Timed out waiting for a command; closing",
                );
                self.client.send(&bye).await;
                Outcome::ClientError
            }
        }
    }

    /// The outcome of a session that ended normally; one that delivered mail with nothing
    /// held against it counts as clean for its client's reputation.
    fn finished(&self) -> Outcome {
        match self.delivered {
            0 => Outcome::ClientQuit,
            _ => {
                if self.offences == 0 {
                    self.ctx
                        .reputation
                        .report(self.conn.peer.ip(), Event::CleanSession);
                }
                Outcome::Proxied
            }
        }
    }

    /// EHLO/HELO reset any transaction (RFC 5321 §4.1.4).
    fn greet(&mut self, host: &Host, extended: bool) -> Vec<u8> {
        self.phase = Phase::Idle;
        self.client_info.helo = Some(host.to_string());
        self.client_info.helo_domain = match host {
            Host::Domain(_) | Host::Address(_) => Some(host.to_string()),
            Host::Other(_) => None,
        };
        self.client_info.esmtp = extended;
        if !extended {
            return reply(250, None, &self.ctx.hostname);
        }
        let size = format!("SIZE {}", self.ctx.limits().max_message_octets);
        let mut extensions = vec![
            "PIPELINING",
            &size,
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ];
        if self.client.offers_starttls() {
            extensions.push("STARTTLS");
        }
        // RFC 4954 §4 with RFC 8314: credentials only over TLS.
        if self.submission() && self.client.stream.is_tls() && self.account.is_none() {
            extensions.push("AUTH PLAIN LOGIN");
        }
        codec::ehlo_reply(&self.ctx.hostname, &extensions)
    }

    async fn mail(&mut self, from: &ReversePath, params: &MailParameters) -> Vec<u8> {
        match self.phase {
            Phase::Connected => return reply(503, Some("5.5.1"), "Send EHLO or HELO first"),
            Phase::Mail(_) => return reply(503, Some("5.5.1"), "Nested MAIL command"),
            Phase::Idle => {}
        }
        if self.submission() && self.account.is_none() {
            return reply(530, Some("5.7.0"), "Authentication required");
        }
        let client = self.client_info.clone();
        let tx =
            match Transaction::begin(from, params, self.ctx.limits().max_message_octets, client) {
                Ok(tx) => tx,
                Err(refusal) => return refusal,
            };
        if self.submission() {
            return self.submit_mail(tx).await;
        }
        self.phase = Phase::Mail(Box::new(tx));
        reply(250, Some("2.1.0"), "OK")
    }

    async fn rcpt(&mut self, to: &ForwardPath, no_params: bool) -> Vec<u8> {
        if self.submission() {
            return self.submit_rcpt(to, no_params).await;
        }
        let Phase::Mail(tx) = &mut self.phase else {
            return reply(503, Some("5.5.1"), "Send MAIL first");
        };
        // Further RCPTs the client pipelined behind this one are taken now, so those for
        // the bound backend reach it together (one round trip, not one each).
        let mut more = Vec::new();
        while more.len() < RCPT_BATCH {
            match codec::decode_command(&self.client.buf) {
                Ok(Decoded::Complete {
                    value: Command::Rcpt { to, params },
                    consumed,
                }) => {
                    self.client.buf.advance(consumed);
                    more.push((to, params.is_empty()));
                }
                _ => break,
            }
        }
        if more.is_empty() {
            return tx.rcpt(self.ctx, self.conn, to, no_params).await;
        }
        let mut items = vec![(to, no_params)];
        items.extend(more.iter().map(|(to, no_params)| (to, *no_params)));
        tx.rcpt_batch(self.ctx, self.conn, &items).await.concat()
    }

    async fn data(&mut self) -> Step {
        let (binding, sender) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Mail(tx) => {
                let sender = tx.sender().to_owned();
                (tx.into_binding(), sender)
            }
            other => {
                self.phase = other;
                return self
                    .answer(&reply(503, Some("5.5.1"), "Send MAIL first"))
                    .await;
            }
        };
        let mut backend = match binding {
            Binding::Bound(backend) => *backend,
            Binding::Unbound => return self.answer(&no_recipients()).await,
            Binding::Lost => return self.answer(&backend_lost()).await,
            Binding::Account { accepted } => return self.submit_data(accepted, sender).await,
        };
        if let Some(scanner) = self.ctx.scanner.clone() {
            return self.scanned_data(&scanner, backend, sender).await;
        }
        // The client hears 354 while the backend's answer to DATA is on its way (one
        // round trip less); the message waits in the socket until the backend said 354
        // too. Should it refuse, the message is read to its end and the refusal relayed.
        if let Err(error) = backend.send_data_command().await {
            tracing::warn!(%error, "backend DATA failed");
            return self.answer(&backend_lost()).await;
        }
        let go_on = reply(354, None, "End data with <CR><LF>.<CR><LF>");
        if !self.client.send(&go_on).await {
            return Step::End(self.finished());
        }
        let (mut slot, refusal) = match backend.data_go_ahead().await {
            Ok(None) => (Some(backend), None),
            Ok(Some(refusal)) => {
                let backend = backend.backend();
                tracing::warn!(%backend, code = refusal.code, "backend refused DATA");
                (None, Some(refusal))
            }
            Err(error) => {
                tracing::warn!(%error, "backend DATA failed");
                (None, None)
            }
        };
        match self.stream_data(&mut slot).await {
            Ok(verdict) => {
                let answer = match refusal {
                    Some(refusal) if matches!(verdict, DataVerdict::Ok { .. }) => {
                        deliver::relay(&refusal)
                    }
                    _ => self.end_of_data(verdict, slot).await,
                };
                self.answer(&answer).await
            }
            Err(end) => Step::End(self.close(end).await),
        }
    }

    /// DATA with content scanning (see `crate::scan`): the message is spooled and streamed
    /// to the scanners as it arrives; the backend gets it, with the scan headers in front,
    /// only once the verdicts allow it.
    async fn scanned_data(
        &mut self,
        scanner: &crate::scan::Scanner,
        mut backend: BackendSession,
        sender: String,
    ) -> Step {
        use crate::scan::{Decision, Offence};
        let envelope = self.scan_envelope(sender, &backend, None);
        let (mut spool, outcome) =
            match self.receive_scanned(scanner, &envelope, &mut backend).await {
                Scanned::Message(held) => *held,
                Scanned::Refused(verdict) => {
                    backend.quit().await;
                    let answer = self.end_of_data(verdict, None).await;
                    return self.answer(&answer).await;
                }
                Scanned::Failed(answer) => {
                    backend.quit().await;
                    return self.answer(&answer).await;
                }
                Scanned::Ended(step) => return step,
            };
        let decision = scanner.decide(&outcome, backend.recipients().iter().map(String::as_str));
        log_scan(&envelope, &spool, &outcome, &decision);
        match decision {
            Decision::Refuse { reply, event } => {
                backend.quit().await;
                if let Some(offence) = event {
                    let event = match offence {
                        Offence::Malware => Event::Malware,
                        Offence::Spam => Event::Spam,
                    };
                    self.offences += 1;
                    let verdict = self.ctx.reputation.report(self.conn.peer.ip(), event);
                    self.tarpit |= verdict == Judgement::Tarpit;
                }
                self.answer(&reply).await
            }
            Decision::Defer { reply } => {
                backend.quit().await;
                self.answer(&reply).await
            }
            Decision::Deliver { headers } => {
                if let Err(error) = send_spooled(&mut backend, &headers, &mut spool).await {
                    tracing::warn!(%error, "backend lost while sending a scanned message");
                    return self.answer(&backend_lost()).await;
                }
                let answer = self.deliver(backend).await;
                self.answer(&answer).await
            }
        }
    }

    /// What rspamd is told about the message (and our log line says).
    fn scan_envelope(
        &self,
        sender: String,
        backend: &BackendSession,
        user: Option<String>,
    ) -> crate::scan::Envelope {
        crate::scan::Envelope {
            client_ip: Some(self.conn.peer.ip()),
            helo: self.client_info.helo.clone(),
            mail_from: sender,
            recipients: backend.recipients().to_vec(),
            user,
            queue_id: crate::scan::queue_id(),
        }
    }

    /// Answers 354 and reads the message into a spool while the scanners read it too, then
    /// waits for their verdicts.
    async fn receive_scanned(
        &mut self,
        scanner: &crate::scan::Scanner,
        envelope: &crate::scan::Envelope,
        backend: &mut BackendSession,
    ) -> Scanned {
        let go_on = reply(354, None, "End data with <CR><LF>.<CR><LF>");
        if !self.client.send(&go_on).await {
            return Scanned::Ended(Step::End(self.finished()));
        }
        let mut job = scanner.start(envelope);
        let mut spool = crate::scan::spool::Spool::new(scanner.settings.memory_bytes);
        let mut spool_error = None;
        let mut reader = DataReader::new(self.ctx.limits().max_message_octets, BARE_LINE_ENDINGS);
        let mut out = Vec::with_capacity(2 * READ_CHUNK);
        // Scan headers the sender wrote itself are dropped: only ours may say "clean".
        let mut headers = crate::scan::spool::HeaderFilter::default();
        let mut filtered = Vec::with_capacity(2 * READ_CHUNK);
        let mut refused = false;
        let mut backend_seen = std::time::Instant::now();
        let mut backend_ok = true;
        let verdict = loop {
            if self.client.buf.is_empty()
                && let Err(end) = self.client.fill().await
            {
                return Scanned::Ended(Step::End(self.close(end).await));
            }
            // The backend waits with an open transaction while the message arrives: keep
            // it from its idle timeout (Postfix and Dovecot: 5 minutes).
            if backend_ok && backend_seen.elapsed() >= BACKEND_KEEPALIVE {
                backend_seen = std::time::Instant::now();
                if let Err(error) = backend.noop().await {
                    tracing::warn!(%error, "backend lost while a scanned message arrived");
                    backend_ok = false;
                }
            }
            out.clear();
            let feed = reader.feed(&self.client.buf, &mut out);
            self.client.buf.advance(feed.consumed);
            if !refused && !out.is_empty() {
                filtered.clear();
                headers.feed(&out, &mut filtered);
                if spool_error.is_none()
                    && let Err(error) = spool.write(&filtered, &scanner.settings.spool_dir).await
                {
                    spool_error = Some(error);
                }
                job.feed(&filtered).await;
            }
            match feed.state {
                DataState::End => break reader.verdict(),
                DataState::Exceeded | DataState::BareLineEnding => refused = true,
                DataState::More => {}
            }
        };
        if !matches!(verdict, DataVerdict::Ok { .. }) {
            return Scanned::Refused(verdict);
        }
        if let Some(error) = spool_error {
            tracing::error!(
                %error, dir = %scanner.settings.spool_dir.display(),
                "cannot hold a message for scanning (scan.spool_dir); deferred"
            );
            return Scanned::Failed(reply(
                451,
                Some("4.3.0"),
                "Local error in processing; try again later",
            ));
        }
        Scanned::Message(Box::new((spool, job.finish().await)))
    }

    /// Forwards the message as it arrives until its end; the backend is dropped from
    /// `backend` (closed without the end of data, so it discards the message) when the
    /// message is refused or the backend fails.
    async fn stream_data(
        &mut self,
        backend: &mut Option<BackendSession>,
    ) -> Result<DataVerdict, ReadEnd> {
        let mut reader = DataReader::new(self.ctx.limits().max_message_octets, BARE_LINE_ENDINGS);
        let mut out = Vec::with_capacity(2 * READ_CHUNK);
        loop {
            if self.client.buf.is_empty() {
                self.client.fill().await?;
            }
            out.clear();
            let feed = reader.feed(&self.client.buf, &mut out);
            self.client.buf.advance(feed.consumed);
            if let Some(session) = backend.as_mut()
                && feed.state == DataState::End
            {
                // Goes out with the end of data, in one write.
                session.write_last(&out);
            } else if let Some(session) = backend.as_mut()
                && !out.is_empty()
                && let Err(error) = session.write(&out).await
            {
                tracing::warn!(%error, "backend lost during DATA");
                *backend = None;
            }
            match feed.state {
                DataState::End => return Ok(reader.verdict()),
                DataState::Exceeded | DataState::BareLineEnding => *backend = None,
                DataState::More => {}
            }
        }
    }

    async fn end_of_data(
        &mut self,
        verdict: DataVerdict,
        backend: Option<BackendSession>,
    ) -> Vec<u8> {
        match (verdict, backend) {
            (DataVerdict::Ok { .. }, Some(session)) => self.deliver(session).await,
            (DataVerdict::Ok { .. }, None) => backend_lost(),
            (refused, _) => {
                if refused == DataVerdict::BareLineEnding {
                    self.offences += 1;
                    let verdict = self
                        .ctx
                        .reputation
                        .report(self.conn.peer.ip(), Event::BareLineEnding);
                    self.tarpit |= verdict == Judgement::Tarpit;
                }
                refused_data(&refused)
            }
        }
    }

    async fn deliver(&mut self, mut session: BackendSession) -> Vec<u8> {
        let backend = session.backend().to_owned();
        let replies = match session.end_data().await {
            Ok(replies) => replies,
            Err(error) => {
                tracing::warn!(%error, "backend lost at the end of DATA");
                return backend_lost();
            }
        };
        // Every reply came in: the backend is ready for the next transaction.
        if session.reusable() {
            let service = session.service();
            self.ctx.sessions.put(session, service);
        } else {
            session.quit().await;
        }
        for (mailbox, refusal) in replies.iter().filter(|(_, r)| !r.is_positive()) {
            tracing::warn!(%mailbox, %backend, code = refusal.code, "backend refused a recipient after DATA");
        }
        let replies: Vec<_> = replies.into_iter().map(|(_, r)| r).collect();
        match deliver::verdict(&replies) {
            Verdict::Delivered | Verdict::PartlyRefused => {
                self.delivered += 1;
                reply(250, Some("2.0.0"), "Message accepted for delivery")
            }
            Verdict::TryAgain => reply(451, Some("4.3.0"), "Delivery failed; try again later"),
            Verdict::Refused(refusal) => deliver::relay(&refusal),
        }
    }
}

/// How often a backend waiting for a held (scanned) message hears a NOOP.
const BACKEND_KEEPALIVE: Duration = Duration::from_secs(60);

/// What [`Session::receive_scanned`] got.
enum Scanned {
    /// The whole message, held, and the scanners' verdicts (boxed: the other variants
    /// are small).
    Message(Box<(crate::scan::spool::Spool, crate::scan::Outcome)>),
    /// Too big, or a bare line ending: refused whatever the scanners say.
    Refused(DataVerdict),
    /// The message could not be held: this answer.
    Failed(Vec<u8>),
    /// The client went away.
    Ended(Step),
}

/// DATA to `backend`: the scan headers, then the held message (the caller ends the data).
async fn send_spooled(
    backend: &mut BackendSession,
    headers: &[u8],
    spool: &mut crate::scan::spool::Spool,
) -> Result<(), deliver::DeliverError> {
    let name = backend.backend().to_owned();
    let spool_error = |e| deliver::DeliverError::Io(name.clone(), e);
    backend.start_data().await?;
    backend.write(headers).await?;
    spool.rewind().await.map_err(spool_error)?;
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let n = spool.read(&mut chunk).await.map_err(spool_error)?;
        if n == 0 {
            return Ok(());
        }
        backend.write(&chunk[..n]).await?;
    }
}

/// One line per scanned message; a warning when a scanner failed.
fn log_scan(
    envelope: &crate::scan::Envelope,
    spool: &crate::scan::spool::Spool,
    outcome: &crate::scan::Outcome,
    decision: &crate::scan::Decision,
) {
    let failed = matches!(outcome.rspamd, Some(Err(_))) || matches!(outcome.clamd, Some(Err(_)));
    macro_rules! scanned {
        ($level:ident, $what:literal) => {
            tracing::$level!(
                client = ?envelope.client_ip, user = ?envelope.user, from = %envelope.mail_from,
                recipients = envelope.recipients.len(), queue_id = %envelope.queue_id,
                size = spool.len(), spilled = spool.spilled(), rspamd = ?outcome.rspamd,
                clamd = ?outcome.clamd, decision = decision.label(), $what
            )
        };
    }
    if failed {
        scanned!(
            warn,
            "message scanned, but a scanner failed (scan.on_failure applied)"
        );
    } else {
        scanned!(info, "message scanned");
    }
}

/// The answer to a message the DATA reader refused (`Ok` is not a refusal).
fn refused_data(verdict: &DataVerdict) -> Vec<u8> {
    match verdict {
        DataVerdict::TooBig { .. } => reply(552, Some("5.3.4"), "Message size exceeds fixed limit"),
        DataVerdict::BareLineEnding => {
            reply(550, Some("5.6.0"), "Bare CR or LF in message; use CRLF")
        }
        DataVerdict::Ok { .. } => backend_lost(),
    }
}

fn no_recipients() -> Vec<u8> {
    reply(503, Some("5.5.1"), "No valid recipients")
}
