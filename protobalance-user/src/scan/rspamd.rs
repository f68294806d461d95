//! rspamd's `/checkv2` HTTP protocol (rspamd docs, "Protocol"): the message is the request
//! body, the envelope goes in headers (`IP`, `Helo`, `From`, one `Rcpt` per recipient,
//! `User` for an authenticated sender, `Queue-Id`), and the answer is JSON with `score`,
//! `required_score`, `action` and the symbols that fired. The body is streamed (chunked
//! transfer encoding) as the client sends the message, so scanning overlaps the transfer.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

/// The envelope rspamd is told about.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub client_ip: Option<std::net::IpAddr>,
    pub helo: Option<String>,
    pub mail_from: String,
    pub recipients: Vec<String>,
    pub user: Option<String>,
    pub queue_id: String,
}

/// What rspamd said.
#[derive(Debug, Clone, PartialEq)]
pub struct RspamdVerdict {
    pub score: f64,
    pub required_score: f64,
    /// `no action`, `greylist`, `add header`, `rewrite subject`, `soft reject`, `reject`.
    pub action: String,
    /// The symbols that fired, highest score first (at most 8), for logs.
    pub symbols: Vec<(String, f64)>,
}

#[derive(serde::Deserialize)]
struct Answer {
    score: f64,
    #[serde(default)]
    required_score: f64,
    action: String,
    #[serde(default)]
    symbols: std::collections::HashMap<String, Symbol>,
}

#[derive(serde::Deserialize)]
struct Symbol {
    #[serde(default)]
    score: f64,
}

/// A request body fed from a channel (each message chunk, as it arrives).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// Largest answer read (a verdict with all its symbols is a few KiB).
const MAX_ANSWER: usize = 1 << 20;

/// Scans the message whose chunks arrive on `body`; ends when the sender side is dropped.
pub async fn check(
    addr: SocketAddr,
    envelope: &Envelope,
    body: mpsc::Receiver<Bytes>,
) -> Result<RspamdVerdict, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut request = hyper::Request::post("/checkv2")
        .header(hyper::header::HOST, addr.to_string())
        .header("From", &envelope.mail_from)
        .header("Queue-Id", &envelope.queue_id);
    if let Some(ip) = envelope.client_ip {
        request = request.header("IP", ip.to_string());
    }
    if let Some(helo) = &envelope.helo {
        request = request.header("Helo", helo);
    }
    if let Some(user) = &envelope.user {
        request = request.header("User", user);
    }
    for rcpt in &envelope.recipients {
        request = request.header("Rcpt", rcpt);
    }
    let request = request
        .body(ChannelBody(body))
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let limited = http_body_util::Limited::new(response.into_body(), MAX_ANSWER);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    conn.abort();
    if !status.is_success() {
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    parse(&bytes)
}

fn parse(bytes: &[u8]) -> Result<RspamdVerdict, String> {
    let answer: Answer =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable answer: {e}"))?;
    let mut symbols: Vec<(String, f64)> = answer
        .symbols
        .into_iter()
        .map(|(name, s)| (name, s.score))
        .filter(|(_, score)| *score != 0.0)
        .collect();
    symbols.sort_by(|a, b| b.1.total_cmp(&a.1));
    symbols.truncate(8);
    Ok(RspamdVerdict {
        score: answer.score,
        required_score: answer.required_score,
        action: answer.action,
        symbols,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_verdict_and_the_top_symbols() {
        let json = br#"{"is_skipped":false,"score":1000.5,"required_score":15.0,
            "action":"reject","symbols":{"GTUBE":{"name":"GTUBE","score":1000.0},
            "MIME_GOOD":{"name":"MIME_GOOD","score":-0.1},"ZERO":{"score":0}},
            "message-id":"x"}"#;
        let v = parse(json).expect("parse");
        assert_eq!(v.action, "reject");
        assert!(v.score > 1000.0 && v.required_score == 15.0);
        assert_eq!(v.symbols[0].0, "GTUBE");
        assert_eq!(v.symbols.len(), 2, "zero-score symbols left out");
        assert!(parse(b"<html>").is_err());
        assert!(parse(br#"{"score":1}"#).is_err(), "no action");
    }
}
