//! HTTP for `protobalance ctl`: one HTTP/1.1 connection per request to the admin listener
//! (hyper's connection-level client over a tokio `TcpStream`; plain http, as the admin
//! listener serves), request bodies that are either a small document or a stream fed
//! through a channel (sent chunked), and response bodies read through a bounded,
//! idle-timed byte stream that can echo what it reads to stdout (`--xml`).

use std::{
    io::{self, Write as _},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    Method, Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    header,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, ReadBuf},
    net::TcpStream,
    sync::mpsc,
    time::Sleep,
};

use super::CtlError;
use crate::{api::PREFIX, secret::Secret};

/// Where the admin listener is: parsed from `--url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host to connect to (brackets removed from an IPv6 literal).
    host: String,
    port: u16,
    /// `Host:` header: the URL's authority as written.
    authority: String,
    /// A path before `/api/v1/` (behind a reverse proxy); empty or `/…` without a
    /// trailing slash.
    base: String,
    /// The URL as given, for messages.
    pub shown: String,
}

impl Endpoint {
    /// `http://HOST[:PORT][/PATH]`; the port defaults to 80 as in any http URL.
    pub fn parse(url: &str) -> Result<Self, CtlError> {
        let usage = |why: &str| CtlError::Usage(format!("--url `{url}`: {why}"));
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(usage(
                "the admin listener speaks plain http (TLS on it is not supported yet); \
                 use http:// and keep admin.listen on loopback or a private network",
            ));
        }
        if !lower.starts_with("http://") {
            return Err(usage("use http://HOST:PORT, e.g. http://127.0.0.1:9925"));
        }
        let rest = &url["http://".len()..];
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if authority.contains('@') || path.contains(['?', '#']) {
            return Err(usage(
                "no user, query or fragment: only http://HOST:PORT[/PATH]",
            ));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| usage("an IPv6 address needs its closing `]`"))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(usage("no host"));
        }
        let port = match port {
            None => 80,
            Some(text) => text
                .parse()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| usage(&format!("`{text}` is not a port number")))?,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            base: path.trim_end_matches('/').to_owned(),
            shown: url.trim_end_matches('/').to_owned(),
        })
    }

    /// The request target for `path` under the API prefix (`mailboxes?limit=5`).
    fn target(&self, path: &str) -> String {
        format!("{}{PREFIX}{path}", self.base)
    }
}

/// `%XX`-encodes everything but unreserved characters and `@`, for a path segment or a
/// query value (so `+` and `/` in an address arrive as themselves).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~@".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A request body: nothing, one document (sent with `Content-Length`), or chunks from a
/// channel (sent with `Transfer-Encoding: chunked` as they come).
pub enum OutBody {
    Full(Option<Bytes>),
    /// An `Err` aborts the request (no final chunk), so the server never takes a body
    /// cut short by a local failure for a complete one.
    Channel(mpsc::Receiver<io::Result<Bytes>>),
}

impl OutBody {
    pub fn empty() -> Self {
        Self::Full(None)
    }

    pub fn document(text: String) -> Self {
        Self::Full(Some(Bytes::from(text)))
    }

    /// A streamed body and the sender that feeds it; dropping the sender ends the body.
    pub fn channel(depth: usize) -> (mpsc::Sender<io::Result<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, Self::Channel(rx))
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| c.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Channel(_) => SizeHint::default(),
        }
    }
}

/// Talks to one admin listener with one token.
pub struct Client {
    pub endpoint: Endpoint,
    token: Secret<String>,
    pub timeout: Duration,
}

impl Client {
    pub const fn new(endpoint: Endpoint, token: Secret<String>, timeout: Duration) -> Self {
        Self {
            endpoint,
            token,
            timeout,
        }
    }

    /// Sends one request and returns the response head (its body still to be read).
    /// Nothing here bounds the time the answer takes: small requests wrap this in
    /// [`Self::timeout`]; a streamed import bounds each step itself.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: OutBody,
    ) -> Result<Response<Incoming>, CtlError> {
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http_error(&e))?;
        // Errors of the connection surface through `send_request` and the body.
        tokio::spawn(connection);
        let mut bearer = header::HeaderValue::from_str(&format!("Bearer {}", self.token.expose()))
            .map_err(|_| {
                CtlError::Usage("the API token holds characters an HTTP header cannot carry".into())
            })?;
        bearer.set_sensitive(true);
        let mut request = Request::builder()
            .method(method)
            .uri(self.endpoint.target(path))
            .header(header::HOST, &self.endpoint.authority)
            .header(header::AUTHORIZATION, bearer)
            .header(header::ACCEPT, "application/xml")
            .header(
                header::USER_AGENT,
                concat!("protobalance-ctl/", env!("CARGO_PKG_VERSION")),
            );
        if !matches!(body, OutBody::Full(None)) {
            request = request.header(header::CONTENT_TYPE, "application/xml; charset=utf-8");
        }
        let request = request
            .body(body)
            .map_err(|e| CtlError::Usage(format!("cannot build the request for {path}: {e}")))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| self.http_error(&e))
    }

    async fn connect(&self) -> Result<TcpStream, CtlError> {
        let Endpoint { host, port, .. } = &self.endpoint;
        let url = &self.endpoint.shown;
        let attempt =
            tokio::time::timeout(self.timeout, TcpStream::connect((host.as_str(), *port)));
        let stream = match attempt.await {
            Err(_) => {
                return Err(CtlError::Connect(format!(
                    "cannot connect to {url}: no answer within {} s; is --url right, and does a firewall drop it?",
                    self.timeout.as_secs()
                )));
            }
            Ok(Err(error)) => {
                let reason = match error.kind() {
                    io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                    _ => error.to_string(),
                };
                return Err(CtlError::Connect(format!(
                    "cannot connect to {url}: {reason}; is protobalance running, and is --url right?"
                )));
            }
            Ok(Ok(stream)) => stream,
        };
        // Small requests and answers: do not wait for more to fill a segment.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn http_error(&self, error: &hyper::Error) -> CtlError {
        let detail = std::error::Error::source(error)
            .map_or_else(|| error.to_string(), |s| format!("{error}: {s}"));
        let hint = if error.is_parse() {
            "; the answer is not HTTP/1.1: is --url the admin listener (admin.listen)?"
        } else if error.is_incomplete_message() || error.is_closed() {
            "; the connection closed before the answer: did protobalance stop or restart?"
        } else {
            ""
        };
        CtlError::Io(format!(
            "HTTP exchange with {} failed: {detail}{hint}",
            self.endpoint.shown
        ))
    }
}

/// Longest run of response bytes without a `>`: bounds any one tag the XML reader holds.
const MAX_TAG: usize = 64 * 1024;

/// A response body as a byte stream: at most `limit` bytes, no read waits longer than
/// `idle`, and with `echo` every byte is also written to stdout as it arrives.
pub struct BodyStream {
    body: Incoming,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    bound: crate::api::xml::StreamBound,
    echo: bool,
    pending: Bytes,
}

impl BodyStream {
    pub fn new(response: Response<Incoming>, idle: Duration, limit: u64, echo: bool) -> Self {
        Self {
            body: response.into_body(),
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            bound: crate::api::xml::StreamBound::new(limit, MAX_TAG),
            echo,
            pending: Bytes::new(),
        }
    }

    fn accept(&mut self, chunk: &[u8]) -> io::Result<()> {
        match self.bound.check(chunk) {
            Ok(()) => {}
            Err(crate::api::xml::Overrun::Total(limit)) => {
                return Err(io::Error::other(format!(
                    "the answer is larger than {limit} bytes"
                )));
            }
            Err(crate::api::xml::Overrun::Tag(max)) => {
                return Err(io::Error::other(format!(
                    "the answer has a tag or text over {max} bytes: not an API document"
                )));
            }
        }
        if self.echo {
            std::io::stdout().lock().write_all(chunk)?;
        }
        Ok(())
    }
}

impl AsyncRead for BodyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(out.remaining());
                let chunk = self.pending.split_to(n);
                out.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.body.is_end_stream() {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(io::Error::other(error))),
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + self.idle;
                    self.sleep.as_mut().reset(deadline);
                    if let Ok(data) = frame.into_data() {
                        self.accept(&data)?;
                        self.pending = data;
                    }
                }
                Poll::Pending => {
                    if self.sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the answer stalled for {} s", self.idle.as_secs()),
                        )));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_host_port_and_base() {
        let e = Endpoint::parse("http://127.0.0.1:9925").expect("default");
        assert_eq!(
            (e.host.as_str(), e.port, e.base.as_str()),
            ("127.0.0.1", 9925, "")
        );
        assert_eq!(e.target("mailboxes?limit=5"), "/api/v1/mailboxes?limit=5");
        let e = Endpoint::parse("http://[::1]:8080/edge/").expect("v6 with base");
        assert_eq!((e.host.as_str(), e.port), ("::1", 8080));
        assert_eq!(e.authority, "[::1]:8080");
        assert_eq!(e.target("stats"), "/edge/api/v1/stats");
        assert_eq!(
            Endpoint::parse("HTTP://admin.example").expect("80").port,
            80
        );
        for bad in [
            "https://127.0.0.1:9925",
            "127.0.0.1:9925",
            "http://:9925",
            "http://host:0",
            "http://host:99999",
            "http://u:p@host:1",
            "http://[::1:1",
            "http://host:1/?q",
        ] {
            let error = Endpoint::parse(bad).expect_err(bad);
            assert!(matches!(error, CtlError::Usage(_)), "{bad}: {error}");
        }
    }

    #[test]
    fn path_segments_and_query_values_are_encoded() {
        assert_eq!(encode("a+b@example.com"), "a%2Bb@example.com");
        assert_eq!(encode("x/y z?&#%"), "x%2Fy%20z%3F%26%23%25");
        assert_eq!(encode("jörg@ex.com"), "j%C3%B6rg@ex.com");
    }
}
