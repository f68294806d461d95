//! The backend side of SMTP: one LMTP (RFC 2033) or SMTP (RFC 5321) session to the backend
//! that owns a transaction's recipients (inbound, `delivery = "lmtp" | "smtp"`) or a
//! submitting user's mailbox (submission). It is opened with the greeting and LHLO/EHLO;
//! when the backend offers XCLIENT (and takes no PROXY header) the client's address and
//! HELO name are passed on that way and the backend is greeted again. Then it takes MAIL
//! FROM, each RCPT, the dot-stuffed DATA stream as the client sends it, and after the end
//! of data returns one reply per accepted recipient (LMTP: one each, RFC 2033 §4.2; SMTP:
//! the one reply, for all of them).
//!
//! Nothing is spooled here: the client hears `250` only after the backend stored the
//! message. A refused message (too big, bare line ending) is abandoned by dropping the
//! connection without the end-of-data sequence, so the backend discards it. After a
//! completed transaction an inbound session goes back to the idle pool (`reuse`) for the
//! next message, which `open` tries before connecting.

use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::codec::{self, CodecError, Decoded, END_OF_DATA, Reply};
use crate::{
    backend::{BackendStream, ConnectError, Service},
    proxy::{Conn, ProxyContext},
};

/// Time the backend gets for each reply and each write before the end of data.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the backend gets, per recipient, to store the message after the end of data.
const FINAL_REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Read size for backend replies (they are small; the codec bounds each one).
const READ_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("backend `{0}`: {1}")]
    Io(String, std::io::Error),
    #[error("backend `{0}` did not answer in time")]
    Timeout(String),
    #[error("backend `{0}` closed the connection")]
    Closed(String),
    #[error("backend `{0}` sent a malformed reply ({1})")]
    BadReply(String, &'static str),
    /// A pooled session failed the RSET sent ahead of its first command: it went away
    /// while idle. Nothing it was sent can have taken effect; try another session.
    #[error("pooled session to backend `{0}` was stale")]
    Stale(String),
    #[error("backend `{backend}` refused {step} with {code}")]
    Refused {
        backend: String,
        step: &'static str,
        code: u16,
    },
}

/// The sender side of a transaction, passed on in the backend's MAIL FROM.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `<path>`, or `<>` for a bounce.
    pub reverse_path: String,
    /// The client declared `BODY=8BITMIME` (RFC 6152).
    pub eight_bit: bool,
    /// The client's RFC 1870 `SIZE=` declaration.
    pub size: Option<u64>,
    /// `SMTPUTF8` (RFC 6531): only passed to a backend that offers it.
    pub smtputf8: bool,
}

impl Envelope {
    /// `MAIL FROM` with the parameters the backend's LHLO/EHLO reply offers; the others are
    /// dropped (Dovecot refuses `SIZE=` with `555` unless it advertises SIZE). The edge
    /// checked the size itself, and an 8-bit body passes through LMTP either way.
    fn mail_from(&self, lhlo: &Reply) -> String {
        let mut line = format!("MAIL FROM:{}", self.reverse_path);
        if self.eight_bit && lhlo.extension("8BITMIME").is_some() {
            line.push_str(" BODY=8BITMIME");
        }
        if let Some(size) = self.size.filter(|_| lhlo.extension("SIZE").is_some()) {
            line.push_str(&format!(" SIZE={size}"));
        }
        if self.smtputf8 && lhlo.extension("SMTPUTF8").is_some() {
            line.push_str(" SMTPUTF8");
        }
        line.push_str("\r\n");
        line
    }
}

/// Who is on the other side of the edge, passed on by XCLIENT.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// The client's EHLO/HELO argument, as sent.
    pub helo: Option<String>,
    /// The same when it is a valid domain or address literal: after XCLIENT the backend is
    /// greeted with it, so its Received header names the client's HELO, not ours.
    pub helo_domain: Option<String>,
    /// `ESMTP` after EHLO, `SMTP` after HELO.
    pub esmtp: bool,
}

/// The backend's dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Lmtp,
    Smtp,
}

/// An open LMTP or SMTP session on one backend.
pub struct BackendSession {
    backend: String,
    dialect: Dialect,
    stream: BackendStream,
    buf: BytesMut,
    /// The last LHLO/EHLO reply: the extensions on offer.
    hello: Reply,
    /// Recipients the backend accepted in this transaction, in order.
    accepted: Vec<String>,
    service: Service,
    /// The XCLIENT attributes the backend offered before any XCLIENT (`None`: it takes
    /// no XCLIENT, or the client's identity went in a PROXY header instead).
    xclient_offer: Option<String>,
    /// The identity of this connection's client can be replaced: it may be reused
    /// (see `reuse`).
    reusable: bool,
    /// The client identity the backend holds (after XCLIENT): address, HELO, ESMTP.
    identity: Option<Identity>,
    /// The RSET that checks a reused session still stands goes in front of the next
    /// command, in the same write (the backend offers PIPELINING): no round trip of its
    /// own.
    rset: Rset,
    /// Bytes of the message held back to go out with the end-of-data sequence.
    held: Vec<u8>,
}

/// Where the RSET checking a reused session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rset {
    None,
    /// To be sent in front of the next command.
    Due,
    /// Sent: the next reply read is its answer.
    Sent,
}

/// What XCLIENT told the backend about the client, minus its source port: a reused session
/// whose backend already holds the same identity needs no new XCLIENT (a sender's many
/// connections from one address and name), only a check that it is still there.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Identity {
    addr: std::net::IpAddr,
    helo: Option<String>,
    esmtp: bool,
}

impl Identity {
    fn of(conn: &Conn, client: &ClientInfo) -> Self {
        Self {
            addr: conn.peer.ip(),
            helo: client.helo.clone(),
            esmtp: client.esmtp,
        }
    }
}

impl BackendSession {
    /// Connects to `service` on `backend` (the pool's breaker fails fast while it is
    /// down), greets it, and hands over the client's identity by XCLIENT when offered.
    pub async fn open(
        ctx: &ProxyContext,
        conn: &Conn,
        backend: &str,
        service: Service,
        client: &ClientInfo,
    ) -> Result<Self, DeliverError> {
        let proxied = ctx.pool.uses_proxy_protocol(backend, service);
        // A backend taken down gets no pooled session either: the connect below refuses.
        if !proxied && service != Service::Submission && !ctx.pool.is_admin_down(backend) {
            while let Some(mut session) = ctx.sessions.take(backend, service) {
                ctx.sessions.count(backend, "reused");
                match session.adopt(ctx, conn, client).await {
                    Ok(()) => return Ok(session),
                    Err(DeliverError::Refused {
                        step: "XCLIENT",
                        code: 500..=599,
                        ..
                    }) => {
                        ctx.sessions.count(backend, "stale");
                        ctx.sessions.refuse_reuse(backend, service);
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(%backend, %error, "pooled backend session was stale");
                        ctx.sessions.count(backend, "stale");
                    }
                }
            }
        }
        let session = Self::connect(ctx, conn, backend, service, client, proxied).await?;
        ctx.sessions.count(backend, "fresh");
        Ok(session)
    }

    /// Takes over a pooled session for the client of `conn`: its identity by XCLIENT
    /// (which resets the session; greeted again), or a RSET to check it is still there —
    /// sent with the first command when the backend offers PIPELINING, and then a session
    /// found gone answers that command with [`DeliverError::Stale`].
    async fn adopt(
        &mut self,
        ctx: &ProxyContext,
        conn: &Conn,
        client: &ClientInfo,
    ) -> Result<(), DeliverError> {
        self.accepted.clear();
        let identity = Identity::of(conn, client);
        match self.xclient_offer.clone() {
            Some(offer) if self.identity.as_ref() != Some(&identity) => {
                self.send(xclient(&offer, conn, client).as_bytes()).await?;
                self.expect("XCLIENT", 220).await?;
                let client_name = client.helo_domain.as_deref().unwrap_or(&ctx.hostname);
                self.greet(client_name).await?;
                self.identity = Some(identity);
                Ok(())
            }
            // The same client identity, or none passed: check the session is alive,
            // with the next command when the backend takes pipelined commands.
            _ if self.offers("PIPELINING") => {
                self.rset = Rset::Due;
                Ok(())
            }
            _ => {
                self.send(b"RSET\r\n").await?;
                self.expect("RSET", 250).await
            }
        }
    }

    /// Whether this session may go back to the pool after a completed transaction: its
    /// identity can be replaced and the backend sent nothing beyond its replies.
    pub fn reusable(&self) -> bool {
        self.reusable && self.buf.is_empty()
    }

    pub const fn service(&self) -> Service {
        self.service
    }

    async fn connect(
        ctx: &ProxyContext,
        conn: &Conn,
        backend: &str,
        service: Service,
        client: &ClientInfo,
        proxied: bool,
    ) -> Result<Self, DeliverError> {
        let stream = ctx
            .pool
            .connect(backend, service, conn.peer, conn.local)
            .await?;
        let dialect = match service {
            Service::Lmtp => Dialect::Lmtp,
            _ => Dialect::Smtp,
        };
        let mut session = Self {
            backend: backend.to_owned(),
            dialect,
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            hello: Reply {
                code: 0,
                enhanced: None,
                lines: Vec::new(),
            },
            accepted: Vec::new(),
            service,
            xclient_offer: None,
            reusable: false,
            identity: None,
            rset: Rset::None,
            held: Vec::new(),
        };
        session.expect("greeting", 220).await?;
        // Behind a PROXY header the backend already sees the client's address; greeting
        // with the client's HELO name too makes its Received header the client's own.
        let client_name = client.helo_domain.as_deref().unwrap_or(&ctx.hostname);
        session
            .greet(if proxied { client_name } else { &ctx.hostname })
            .await?;
        let offer = session
            .hello
            .extension("XCLIENT")
            .filter(|_| !proxied)
            .map(str::to_owned);
        if let Some(offered) = &offer {
            let command = xclient(offered, conn, client);
            session.send(command.as_bytes()).await?;
            session.expect("XCLIENT", 220).await?;
            session.greet(client_name).await?;
            session.identity = Some(Identity::of(conn, client));
            tracing::debug!(%backend, peer = %conn.peer, "client identity passed by XCLIENT");
        }
        session.xclient_offer = offer;
        session.reusable = !proxied && service != Service::Submission;
        Ok(session)
    }

    /// LHLO or EHLO with our host name; the reply's extensions are kept.
    async fn greet(&mut self, hostname: &str) -> Result<(), DeliverError> {
        let verb = match self.dialect {
            Dialect::Lmtp => "LHLO",
            Dialect::Smtp => "EHLO",
        };
        self.send(format!("{verb} {hostname}\r\n").as_bytes())
            .await?;
        let reply = self.read_reply(REPLY_TIMEOUT).await?;
        if reply.code != 250 {
            return Err(self.refused(verb, &reply));
        }
        self.hello = reply;
        Ok(())
    }

    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Whether the backend offers `keyword` (an EHLO/LHLO extension).
    pub fn offers(&self, keyword: &str) -> bool {
        self.hello.extension(keyword).is_some()
    }

    /// `AUTH PLAIN` (RFC 4954) with the client's credentials: the backend checks them.
    /// `Ok` carries the backend's answer (`235` or a refusal to relay).
    pub async fn authenticate(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<Reply, DeliverError> {
        let plain = format!("\0{user}\0{password}");
        let command = format!("AUTH PLAIN {}\r\n", crate::base64::encode(plain.as_bytes()));
        self.send(command.as_bytes()).await?;
        self.read_reply(REPLY_TIMEOUT).await
    }

    /// Starts a transaction; `Ok` carries the backend's answer to MAIL FROM.
    pub async fn mail(&mut self, envelope: &Envelope) -> Result<Reply, DeliverError> {
        self.accepted.clear();
        self.send(envelope.mail_from(&self.hello).as_bytes())
            .await?;
        self.read_reply(REPLY_TIMEOUT).await
    }

    /// MAIL FROM and the first RCPT in one write when the backend offers PIPELINING (RFC
    /// 2920: one round trip instead of two), else one after the other. The RCPT reply is
    /// `None` when MAIL was refused (a pipelined RCPT's answer is then read and dropped).
    pub async fn mail_and_rcpt(
        &mut self,
        envelope: &Envelope,
        mailbox: &str,
    ) -> Result<(Reply, Option<Reply>), DeliverError> {
        if !self.offers("PIPELINING") {
            let mail = self.mail(envelope).await?;
            if !mail.is_positive() {
                return Ok((mail, None));
            }
            let rcpt = self.rcpt(mailbox).await?;
            return Ok((mail, Some(rcpt)));
        }
        self.accepted.clear();
        let mut lines = envelope.mail_from(&self.hello);
        lines.push_str(&format!("RCPT TO:<{mailbox}>\r\n"));
        self.send(lines.as_bytes()).await?;
        let mail = self.read_reply(REPLY_TIMEOUT).await?;
        let rcpt = self.read_reply(REPLY_TIMEOUT).await?;
        if !mail.is_positive() {
            return Ok((mail, None));
        }
        if rcpt.is_positive() {
            self.accepted.push(mailbox.to_owned());
        }
        Ok((mail, Some(rcpt)))
    }

    /// The recipients the backend accepted in this transaction.
    pub fn recipients(&self) -> &[String] {
        &self.accepted
    }

    /// Recipients the backend accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.len()
    }

    /// Whether the backend already accepted `mailbox` in this transaction.
    pub fn has_accepted(&self, mailbox: &str) -> bool {
        self.accepted.iter().any(|m| m == mailbox)
    }

    /// Offers `mailbox` (an address) and returns the backend's answer.
    pub async fn rcpt(&mut self, mailbox: &str) -> Result<Reply, DeliverError> {
        self.send(format!("RCPT TO:<{mailbox}>\r\n").as_bytes())
            .await?;
        let reply = self.read_reply(REPLY_TIMEOUT).await?;
        if reply.is_positive() {
            self.accepted.push(mailbox.to_owned());
        }
        Ok(reply)
    }

    /// Offers several mailboxes: in one write when the backend offers PIPELINING (RFC
    /// 2920), then its replies in order; one by one otherwise.
    pub async fn rcpt_many(&mut self, mailboxes: &[&str]) -> Result<Vec<Reply>, DeliverError> {
        if !self.offers("PIPELINING") {
            let mut replies = Vec::with_capacity(mailboxes.len());
            for mailbox in mailboxes {
                replies.push(self.rcpt(mailbox).await?);
            }
            return Ok(replies);
        }
        let mut lines = String::new();
        for mailbox in mailboxes {
            lines.push_str(&format!("RCPT TO:<{mailbox}>\r\n"));
        }
        self.send(lines.as_bytes()).await?;
        let mut replies = Vec::with_capacity(mailboxes.len());
        for mailbox in mailboxes {
            let reply = self.read_reply(REPLY_TIMEOUT).await?;
            if reply.is_positive() {
                self.accepted.push((*mailbox).to_owned());
            }
            replies.push(reply);
        }
        Ok(replies)
    }

    /// Sends DATA and waits for the backend's `354`; its refusal is an error, so nothing
    /// of the message is ever written to a backend that did not ask for it.
    pub async fn start_data(&mut self) -> Result<(), DeliverError> {
        self.send_data_command().await?;
        match self.data_go_ahead().await? {
            None => Ok(()),
            Some(refusal) => Err(self.refused("DATA", &refusal)),
        }
    }

    /// Sends DATA without waiting for the answer, so the client can be told to go on
    /// meanwhile; nothing of the message may follow before [`Self::data_go_ahead`].
    pub async fn send_data_command(&mut self) -> Result<(), DeliverError> {
        self.send(b"DATA\r\n").await
    }

    /// The backend's answer to DATA: `Ok(None)` for `354`, `Ok(Some(refusal))` for a
    /// refusal to relay (4xx, 5xx). Anything else, and `421` (the backend is closing the
    /// connection, not refusing this message), is an error: the session is lost.
    pub async fn data_go_ahead(&mut self) -> Result<Option<Reply>, DeliverError> {
        let reply = self.read_reply(REPLY_TIMEOUT).await?;
        match reply.code {
            354 => Ok(None),
            400..=599 if reply.code != 421 => Ok(Some(reply)),
            _ => Err(self.refused("DATA", &reply)),
        }
    }

    /// Forwards a piece of the (still dot-stuffed) message.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), DeliverError> {
        self.send(bytes).await
    }

    /// Holds the last piece of the message back to go out in one write with the end of
    /// data.
    pub fn write_last(&mut self, bytes: &[u8]) {
        self.held.extend_from_slice(bytes);
    }

    /// Ends the data and collects the outcome for each accepted recipient: LMTP answers
    /// once per recipient, SMTP once for all of them.
    pub async fn end_data(&mut self) -> Result<Vec<(String, Reply)>, DeliverError> {
        let mut last = std::mem::take(&mut self.held);
        last.extend_from_slice(END_OF_DATA);
        self.send(&last).await?;
        let accepted = std::mem::take(&mut self.accepted);
        let mut replies = Vec::with_capacity(accepted.len());
        match self.dialect {
            Dialect::Lmtp => {
                for mailbox in accepted {
                    let reply = self.read_reply(FINAL_REPLY_TIMEOUT).await?;
                    replies.push((mailbox, reply));
                }
            }
            Dialect::Smtp => {
                let reply = self.read_reply(FINAL_REPLY_TIMEOUT).await?;
                replies.extend(accepted.into_iter().map(|m| (m, reply.clone())));
            }
        }
        Ok(replies)
    }

    /// RSET: abandons the transaction (the session stays usable).
    pub async fn reset(&mut self) -> Result<(), DeliverError> {
        self.accepted.clear();
        self.send(b"RSET\r\n").await?;
        self.expect("RSET", 250).await
    }

    /// NOOP: keeps an open transaction from the backend's idle timeout (a held message can
    /// take minutes to arrive).
    pub async fn noop(&mut self) -> Result<(), DeliverError> {
        self.send(b"NOOP\r\n").await?;
        self.expect("NOOP", 250).await
    }

    /// QUIT, without waiting long for the answer.
    pub async fn quit(&mut self) {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.stream.write_all(b"QUIT\r\n")).await;
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), DeliverError> {
        let with_rset;
        let carries_rset = self.rset == Rset::Due;
        let bytes = if carries_rset {
            self.rset = Rset::Sent;
            with_rset = [b"RSET\r\n".as_slice(), bytes].concat();
            &with_rset
        } else {
            bytes
        };
        match tokio::time::timeout(REPLY_TIMEOUT, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            // The write that carried the check failed: the idle session had gone away.
            Ok(Err(_)) | Err(_) if carries_rset => Err(DeliverError::Stale(self.backend.clone())),
            Ok(Err(error)) => Err(DeliverError::Io(self.backend.clone(), error)),
            Err(_) => Err(DeliverError::Timeout(self.backend.clone())),
        }
    }

    async fn expect(&mut self, step: &'static str, code: u16) -> Result<(), DeliverError> {
        let reply = self.read_reply(REPLY_TIMEOUT).await?;
        if reply.code == code {
            return Ok(());
        }
        Err(self.refused(step, &reply))
    }

    fn refused(&self, step: &'static str, reply: &Reply) -> DeliverError {
        DeliverError::Refused {
            backend: self.backend.clone(),
            step,
            code: reply.code,
        }
    }

    async fn read_reply(&mut self, timeout: Duration) -> Result<Reply, DeliverError> {
        if self.rset == Rset::Sent {
            self.rset = Rset::None;
            match self.next_reply(REPLY_TIMEOUT).await {
                Ok(reply) if reply.code == 250 => {}
                Ok(_) | Err(_) => return Err(DeliverError::Stale(self.backend.clone())),
            }
        }
        self.next_reply(timeout).await
    }

    async fn next_reply(&mut self, timeout: Duration) -> Result<Reply, DeliverError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match codec::decode_reply(&self.buf) {
                Ok(Decoded::Complete { value, consumed }) => {
                    self.buf.advance(consumed);
                    return Ok(value);
                }
                Ok(Decoded::Incomplete) => self.fill(deadline).await?,
                Err(error) => return Err(self.bad_reply(error)),
            }
        }
    }

    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<(), DeliverError> {
        self.buf.reserve(READ_CHUNK);
        let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf));
        match read.await {
            Err(_) => Err(DeliverError::Timeout(self.backend.clone())),
            Ok(Ok(0)) => Err(DeliverError::Closed(self.backend.clone())),
            Ok(Err(error)) => Err(DeliverError::Io(self.backend.clone(), error)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    fn bad_reply(&self, error: CodecError) -> DeliverError {
        DeliverError::BadReply(self.backend.clone(), error.kind())
    }
}

/// `XCLIENT` (Postfix XCLIENT_README; Dovecot's LMTP/submission take the same) with the
/// attributes the backend `offered` that we know: the client's address and port, our
/// address and port, no reverse name, its HELO and the protocol. Never `LOGIN=`: that
/// would make the backend treat the session as authenticated without the password, so
/// submission authenticates with `AUTH` instead.
fn xclient(offered: &str, conn: &Conn, client: &ClientInfo) -> String {
    let offered: Vec<&str> = offered.split_ascii_whitespace().collect();
    let has = |name: &str| offered.iter().any(|o| o.eq_ignore_ascii_case(name));
    let address = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("IPV6:{v6}"),
    };
    let mut attributes = Vec::new();
    if has("ADDR") {
        attributes.push(format!("ADDR={}", address(conn.peer.ip())));
    }
    if has("PORT") {
        attributes.push(format!("PORT={}", conn.peer.port()));
    }
    if has("NAME") {
        attributes.push("NAME=[UNAVAILABLE]".to_owned());
    }
    if has("HELO") {
        let helo = client
            .helo
            .as_deref()
            .map_or_else(|| "[UNAVAILABLE]".to_owned(), xtext);
        attributes.push(format!("HELO={helo}"));
    }
    if has("PROTO") {
        attributes.push(format!(
            "PROTO={}",
            if client.esmtp { "ESMTP" } else { "SMTP" }
        ));
    }
    if has("DESTADDR") {
        attributes.push(format!("DESTADDR={}", address(conn.local.ip())));
    }
    if has("DESTPORT") {
        attributes.push(format!("DESTPORT={}", conn.local.port()));
    }
    format!("XCLIENT {}\r\n", attributes.join(" "))
}

/// RFC 3461 §4 xtext: `+`, `=`, controls, space and non-ASCII as `+HH`.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

/// What the client hears after the end of data, from the backend's per-recipient replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every recipient got the message: `250`.
    Delivered,
    /// Some got it, the others were refused permanently: `250` (the refusals are logged).
    /// No spool means no bounce can be sent for them; retrying could not help them, and
    /// a `5xx` would tell the sender that the ones who got it did not.
    PartlyRefused,
    /// At least one recipient failed temporarily: `451 4.3.0`, so the sender retries the
    /// whole message. Recipients that did get it may get it twice: RFC 5321 §6.1 prefers
    /// a duplicate to a loss, and without a spool there is no third option.
    TryAgain,
    /// Nobody got it and every refusal was permanent: the first refusal, relayed.
    Refused(Reply),
}

pub fn verdict(replies: &[Reply]) -> Verdict {
    let delivered = replies.iter().filter(|r| r.is_positive()).count();
    if replies.is_empty() {
        return Verdict::TryAgain;
    }
    if delivered == replies.len() {
        return Verdict::Delivered;
    }
    if replies
        .iter()
        .any(|r| !r.is_positive() && !r.is_permanent())
    {
        return Verdict::TryAgain;
    }
    match replies.iter().find(|r| r.is_permanent()) {
        Some(refusal) if delivered == 0 => Verdict::Refused(refusal.clone()),
        _ => Verdict::PartlyRefused,
    }
}

/// A backend reply re-encoded for the client: code, enhanced code and text kept. A `421`
/// closes the backend's connection, not the client's: the client hears that its mailbox
/// server was lost (`451 4.4.2`) and its session goes on.
pub fn relay(reply: &Reply) -> Vec<u8> {
    if reply.code == 421 {
        return super::transaction::backend_lost();
    }
    let enhanced = reply
        .enhanced
        .map(|(class, subject, detail)| format!("{class}.{subject}.{detail}"));
    let lines: Vec<&str> = reply.lines.iter().map(String::as_str).collect();
    codec::multiline_reply(reply.code, enhanced.as_deref(), &lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16) -> Reply {
        Reply {
            code,
            enhanced: None,
            lines: vec!["text".into()],
        }
    }

    #[test]
    fn a_backends_421_reaches_the_client_as_a_451() {
        assert!(relay(&reply(421)).starts_with(b"451 4.4.2 "));
        assert_eq!(relay(&reply(450)), b"450 text\r\n");
    }

    #[test]
    fn a_250_needs_a_backend_acceptance() {
        assert_eq!(verdict(&[]), Verdict::TryAgain);
        assert_eq!(verdict(&[reply(250), reply(250)]), Verdict::Delivered);
        assert_eq!(verdict(&[reply(250), reply(452)]), Verdict::TryAgain);
        assert_eq!(verdict(&[reply(552), reply(451)]), Verdict::TryAgain);
        assert_eq!(verdict(&[reply(250), reply(552)]), Verdict::PartlyRefused);
        assert_eq!(
            verdict(&[reply(552), reply(550)]),
            Verdict::Refused(reply(552))
        );
        // Anything that is neither 2xx nor 5xx (a 3xx here would be a backend bug).
        assert_eq!(verdict(&[reply(354)]), Verdict::TryAgain);
    }

    #[test]
    fn xtext_encodes_plus_equals_space_and_controls() {
        assert_eq!(xtext("mx.example.net"), "mx.example.net");
        assert_eq!(xtext("a+b=c d\u{1}é"), "a+2Bb+3Dc+20d+01+C3+A9");
    }

    #[test]
    fn xclient_sends_only_offered_attributes() {
        let conn = Conn {
            peer: "[2001:db8::7]:40000".parse().expect("addr"),
            local: "127.0.0.1:25".parse().expect("addr"),
            starttls: None,
            admitted: crate::filter::reputation::Verdict::Accept,
        };
        let client = ClientInfo {
            helo: Some("client example".into()),
            helo_domain: None,
            esmtp: true,
        };
        assert_eq!(
            xclient("ADDR HELO", &conn, &client),
            "XCLIENT ADDR=IPV6:2001:db8::7 HELO=client+20example\r\n"
        );
        assert_eq!(
            xclient(
                "NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT",
                &conn,
                &client
            ),
            "XCLIENT ADDR=IPV6:2001:db8::7 PORT=40000 NAME=[UNAVAILABLE] HELO=client+20example \
             PROTO=ESMTP DESTADDR=127.0.0.1 DESTPORT=25\r\n"
        );
        let anonymous = ClientInfo::default();
        assert_eq!(
            xclient("HELO PROTO LOGIN", &conn, &anonymous),
            "XCLIENT HELO=[UNAVAILABLE] PROTO=SMTP\r\n"
        );
    }

    #[test]
    fn relayed_replies_keep_code_and_enhanced_code() {
        let refusal = Reply {
            code: 552,
            enhanced: Some((5, 2, 2)),
            lines: vec!["Quota exceeded".into()],
        };
        assert_eq!(relay(&refusal), b"552 5.2.2 Quota exceeded\r\n");
    }
}
