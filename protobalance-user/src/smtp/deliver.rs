//! The backend side of an inbound SMTP transaction: one LMTP session (RFC 2033) to the
//! backend that owns the transaction's recipients. It is opened when the first recipient
//! routes to that backend (greeting, LHLO, MAIL FROM), takes each further RCPT, then the
//! dot-stuffed DATA stream as the client sends it, and after the end of data returns one
//! reply per accepted recipient (RFC 2033 §4.2).
//!
//! Nothing is spooled here: the client hears `250` only after the backend stored the
//! message. A refused message (too big, bare line ending) is abandoned by dropping the
//! connection without the end-of-data sequence, so the backend discards it.

use std::{net::SocketAddr, time::Duration};

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
}

impl Envelope {
    /// `MAIL FROM` with the parameters the backend's LHLO reply offers; the others are
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
        line.push_str("\r\n");
        line
    }
}

/// An open LMTP transaction on one backend.
pub struct Lmtp {
    backend: String,
    stream: BackendStream,
    buf: BytesMut,
    /// Recipients the backend accepted, in order: one reply each follows the data.
    accepted: Vec<String>,
}

impl Lmtp {
    /// Connects to `backend`'s LMTP service (the pool's breaker fails fast while it is
    /// down) and starts a transaction for `envelope`.
    pub async fn open(
        ctx: &ProxyContext,
        conn: &Conn,
        backend: &str,
        envelope: &Envelope,
    ) -> Result<Self, DeliverError> {
        let stream = ctx
            .pool
            .connect(backend, Service::Lmtp, conn.peer, conn.local)
            .await?;
        let mut lmtp = Self {
            backend: backend.to_owned(),
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            accepted: Vec::new(),
        };
        lmtp.expect("greeting", 220).await?;
        lmtp.send(lhlo(conn.local).as_bytes()).await?;
        let lhlo = lmtp.read_reply(REPLY_TIMEOUT).await?;
        if lhlo.code != 250 {
            return Err(lmtp.refused("LHLO", &lhlo));
        }
        lmtp.send(envelope.mail_from(&lhlo).as_bytes()).await?;
        lmtp.expect("MAIL FROM", 250).await?;
        Ok(lmtp)
    }

    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Recipients the backend accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.len()
    }

    /// Offers `mailbox` (a normalized address) and returns the backend's answer.
    pub async fn rcpt(&mut self, mailbox: &str) -> Result<Reply, DeliverError> {
        self.send(format!("RCPT TO:<{mailbox}>\r\n").as_bytes())
            .await?;
        let reply = self.read_reply(REPLY_TIMEOUT).await?;
        if reply.is_positive() {
            self.accepted.push(mailbox.to_owned());
        }
        Ok(reply)
    }

    /// Sends DATA; the backend must answer `354` before the client is told to go on.
    pub async fn start_data(&mut self) -> Result<(), DeliverError> {
        self.send(b"DATA\r\n").await?;
        self.expect("DATA", 354).await
    }

    /// Forwards a piece of the (still dot-stuffed) message.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), DeliverError> {
        self.send(bytes).await
    }

    /// Ends the data and collects one reply per accepted recipient, then says QUIT
    /// without waiting for the answer.
    pub async fn finish(mut self) -> Result<Vec<(String, Reply)>, DeliverError> {
        self.send(END_OF_DATA).await?;
        let mut replies = Vec::with_capacity(self.accepted.len());
        for mailbox in std::mem::take(&mut self.accepted) {
            let reply = self.read_reply(FINAL_REPLY_TIMEOUT).await?;
            replies.push((mailbox, reply));
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.stream.write_all(b"QUIT\r\n")).await;
        Ok(replies)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), DeliverError> {
        match tokio::time::timeout(REPLY_TIMEOUT, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
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

/// `LHLO` with our own address as an address literal (RFC 5321 §4.1.3): the edge has no
/// configured host name yet.
fn lhlo(local: SocketAddr) -> String {
    match local.ip() {
        std::net::IpAddr::V4(ip) => format!("LHLO [{ip}]\r\n"),
        std::net::IpAddr::V6(ip) => format!("LHLO [IPv6:{ip}]\r\n"),
    }
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

/// A backend reply re-encoded for the client: code, enhanced code and text kept.
pub fn relay(reply: &Reply) -> Vec<u8> {
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
    fn relayed_replies_keep_code_and_enhanced_code() {
        let refusal = Reply {
            code: 552,
            enhanced: Some((5, 2, 2)),
            lines: vec!["Quota exceeded".into()],
        };
        assert_eq!(relay(&refusal), b"552 5.2.2 Quota exceeded\r\n");
    }
}
