//! The commands of `protobalance ctl`: each builds its request, sends it through
//! [`Client`], and prints the answer (a table or one line; `--xml`: the body as is).
//! Failures become [`CtlError`]s carrying the server's code and message.

use std::io::{self, IsTerminal as _, Write as _};

use hyper::{Method, Response, StatusCode, body::Incoming};
use tokio::io::AsyncReadExt as _;

use super::{
    CtlCommand, CtlError, DomainCommand, MailboxCommand, SuspensionCommand,
    client::{BodyStream, Client, OutBody, encode},
    doc::{DocReader, Element},
    import,
    render::{self, Columns},
};
use crate::api::xml::Writer;

/// One `ctl` invocation: the client and the output mode.
pub struct Ctl {
    pub client: Client,
    /// `--xml`: answers are echoed to stdout as they arrive, nothing is rendered.
    pub xml: bool,
}

/// Largest small answer read (a page of 1000 mailboxes is ~80 KB; stats a few hundred).
const ANSWER_LIMIT: u64 = 64 * 1024 * 1024;
/// Largest error answer read.
const ERROR_LIMIT: u64 = 1024 * 1024;

impl Ctl {
    pub const fn new(client: Client, xml: bool) -> Self {
        Self { client, xml }
    }

    pub async fn dispatch(&self, command: CtlCommand) -> Result<(), CtlError> {
        let mut out = io::stdout();
        match command {
            CtlCommand::Mailbox(command) => self.mailbox(&mut out, command).await,
            CtlCommand::Domain(command) => self.domain(&mut out, command).await,
            CtlCommand::Backend(command) => self.backend(&mut out, command).await,
            CtlCommand::Ban(command) => self.ban(&mut out, command).await,
            CtlCommand::Block(command) => self.block(&mut out, command).await,
            CtlCommand::Explain { address } => {
                let path = format!("reputation/{}", super::client::encode(&address));
                let doc = self.fetch(Method::GET, &path, None).await?;
                self.human(|| render::reputation(&mut out, &doc))
            }
            CtlCommand::Forgive { address } => {
                let path = format!("reputation/{}", super::client::encode(&address));
                self.call(Method::DELETE, &path, None).await?;
                self.human(|| {
                    writeln!(
                        out,
                        "forgave {address}: score forgotten, kernel bans lifted"
                    )
                })
            }
            CtlCommand::Suspension(command) => self.suspension(&mut out, command).await,
            CtlCommand::Reload => {
                let doc = self.fetch(Method::POST, "reload", None).await?;
                self.human(|| match doc.show("restart-needed") {
                    "" => writeln!(out, "config reloaded"),
                    later => writeln!(
                        out,
                        "config reloaded; these sections changed and take effect at the next restart: {later}"
                    ),
                })
            }
            CtlCommand::Stats => {
                if let Some(doc) = self.call(Method::GET, "stats", None).await? {
                    self.human(|| render::stats(&mut out, &doc))?;
                }
                Ok(())
            }
        }
    }

    /// Runs `print` unless `--xml` (the body was echoed already).
    pub(super) fn human(&self, print: impl FnOnce() -> io::Result<()>) -> Result<(), CtlError> {
        if self.xml {
            return Ok(());
        }
        print().map_err(CtlError::Output)
    }

    /// One small request; the answer's document (`None` for `204`), echoed with `--xml`.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Option<Element>, CtlError> {
        let timeout = self.client.timeout;
        let exchange = async {
            let body = body.map_or_else(OutBody::empty, OutBody::document);
            let response = self.client.send(method, path, body).await?;
            if !response.status().is_success() {
                return Err(self.failure(response).await);
            }
            if response.status() == StatusCode::NO_CONTENT {
                return Ok(None);
            }
            let stream = BodyStream::new(response, timeout, ANSWER_LIMIT, self.xml);
            DocReader::new(stream).tree().await.map(Some)
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            CtlError::Timeout(format!(
                "no complete answer from {} within {} s (--timeout)",
                self.client.endpoint.shown,
                timeout.as_secs()
            ))
        })?
    }

    /// [`Self::call`] for an answer that is a document (an empty one for a `204`).
    pub(super) async fn fetch(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Element, CtlError> {
        Ok(self.call(method, path, body).await?.unwrap_or_default())
    }

    /// The error an unsuccessful answer carries (echoed with `--xml`).
    pub async fn failure(&self, response: Response<Incoming>) -> CtlError {
        let status = response.status();
        let mut stream = BodyStream::new(response, self.client.timeout, ERROR_LIMIT, self.xml);
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes).await;
        let error = DocReader::new(&bytes[..])
            .tree()
            .await
            .ok()
            .filter(|doc| doc.name == "error");
        let (code, mut message) = match error {
            Some(doc) => (
                doc.show("code").to_owned(),
                doc.children_named("message")
                    .next()
                    .map_or_else(String::new, |m| m.text.trim().to_owned()),
            ),
            None => {
                let text = String::from_utf8_lossy(&bytes);
                let first: String = text
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect();
                (
                    format!("http_{}", status.as_u16()),
                    format!(
                        "{} {first} (not an API error document: is --url the admin listener, with [api] tokens configured?)",
                        status.as_u16()
                    ),
                )
            }
        };
        match status.as_u16() {
            401 => message.push_str(
                "; set PROTOBALANCE_TOKEN or --token-file to a token from the server's [[api.token]]",
            ),
            403 => message
                .push_str("; set PROTOBALANCE_TOKEN or --token-file to a read-write token"),
            _ => {}
        }
        CtlError::Api {
            status: status.as_u16(),
            code,
            message,
        }
    }

    async fn mailbox(
        &self,
        out: &mut impl io::Write,
        command: MailboxCommand,
    ) -> Result<(), CtlError> {
        match command {
            MailboxCommand::Add { address, backend } => {
                let mut attributes = vec![("address", address.as_str())];
                if let Some(backend) = backend.as_deref() {
                    attributes.push(("backend", backend));
                }
                let body = Writer::document("mailbox", &attributes).finish();
                let doc = self.fetch(Method::POST, "mailboxes", Some(body)).await?;
                self.human(|| {
                    writeln!(
                        out,
                        "added {} on {}",
                        doc.show("address"),
                        doc.show("backend")
                    )
                })
            }
            MailboxCommand::Show { address } => {
                let path = format!("mailboxes/{}", encode(&address));
                let doc = self.fetch(Method::GET, &path, None).await?;
                self.human(|| render::mailbox(out, &doc))
            }
            MailboxCommand::Rm { address } => {
                let path = format!("mailboxes/{}", encode(&address));
                self.call(Method::DELETE, &path, None).await?;
                self.human(|| {
                    writeln!(
                        out,
                        "removed {address} from the directory (its mail stays on its backend)"
                    )
                })
            }
            MailboxCommand::Move { address, to } => {
                let doc = self.move_watched(&address, to.as_deref()).await?;
                self.human(|| render::moved(out, &doc))
            }
            MailboxCommand::Moves => {
                let doc = self.fetch(Method::GET, "moves", None).await?;
                self.human(|| render::recorded_moves(out, &doc))
            }
            MailboxCommand::AbandonMove { address, force } => {
                let query = if force { "?force=yes" } else { "" };
                let path = format!("moves/{}{query}", encode(&address));
                self.call(Method::DELETE, &path, None).await?;
                self.human(|| {
                    writeln!(
                        out,
                        "abandoned the move of {address}: nothing resumes it; what its old \
                         backend still holds stays there"
                    )
                })
            }
            MailboxCommand::Ls {
                domain,
                backend,
                limit,
                all,
            } => {
                let limit = limit.unwrap_or(if all { 1000 } else { 100 });
                let mut query = format!("limit={limit}");
                for (key, value) in [("domain", domain), ("backend", backend)] {
                    if let Some(value) = value {
                        query.push_str(&format!("&{key}={}", encode(&value)));
                    }
                }
                self.list(out, &query, all).await
            }
            MailboxCommand::Import {
                file,
                errors_only,
                progress,
                progress_every,
            } => {
                let progress = (progress || io::stderr().is_terminal()).then_some(progress_every);
                let options = import::Options {
                    file: &file,
                    errors_only,
                    progress,
                };
                self.import(&options).await
            }
        }
    }

    /// `POST mailboxes/{address}/move`: the move's report, or (`wait` false) its job.
    pub(super) async fn move_mailbox(
        &self,
        address: &str,
        to: Option<&str>,
        wait: bool,
    ) -> Result<super::doc::Element, CtlError> {
        let attributes: Vec<(&str, &str)> = to.map(|b| ("backend", b)).into_iter().collect();
        let body = Writer::document("move", &attributes).finish();
        let query = if wait { "" } else { "?wait=no" };
        let path = format!("mailboxes/{}/move{query}", encode(address));
        self.fetch(Method::POST, &path, Some(body)).await
    }

    /// `mailbox move`: starts the move as a job and follows it, with a progress line on a
    /// terminal, to its end; the finished job (its report), or the job's error.
    async fn move_watched(
        &self,
        address: &str,
        to: Option<&str>,
    ) -> Result<super::doc::Element, CtlError> {
        let job = self.move_mailbox(address, to, false).await?;
        let id = job.show("id").to_owned();
        let show = io::stderr().is_terminal();
        loop {
            let job = self.fetch(Method::GET, &format!("jobs/{id}"), None).await?;
            if show {
                let (copied, total) = (job.show("copied"), job.show("total"));
                let done: f64 = copied.parse().unwrap_or(0.0);
                let all: f64 = total.parse::<f64>().unwrap_or(0.0).max(done).max(1.0);
                let filled = ((done / all) * 30.0).round() as usize;
                eprint!(
                    "\r  [{}{}] {copied}/{total} messages, {:<10}",
                    "#".repeat(filled.min(30)),
                    ".".repeat(30 - filled.min(30)),
                    job.show("phase")
                );
            }
            match job.show("state") {
                "running" => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
                "failed" => {
                    if show {
                        eprintln!();
                    }
                    // The job's error is the one a waiting request would have had.
                    return Err(CtlError::Api {
                        status: job.show("status").parse().unwrap_or(502),
                        code: job.show("error").to_owned(),
                        message: job.show("message").to_owned(),
                    });
                }
                _ => {
                    if show {
                        eprintln!();
                    }
                    return Ok(job);
                }
            }
        }
    }

    /// `backend empty NAME`: moves NAME's mailboxes one by one until it has none.
    pub(super) async fn empty(&self, out: &mut impl io::Write, name: &str) -> Result<(), CtlError> {
        let query = format!("limit=100&backend={}", encode(name));
        let mut moved = 0u64;
        let show = io::stderr().is_terminal();
        loop {
            let page = self
                .fetch(Method::GET, &format!("mailboxes?{query}"), None)
                .await?;
            let addresses: Vec<String> = page
                .children_named("mailbox")
                .filter_map(|m| m.attr("address").map(str::to_owned))
                .collect();
            if addresses.is_empty() {
                break;
            }
            // Four at a time: a move mostly waits (its settle time, the backends).
            for batch in addresses.chunks(4) {
                let one = |i: usize| async move {
                    match batch.get(i) {
                        Some(address) => {
                            Some((address, self.move_mailbox(address, None, true).await))
                        }
                        None => None,
                    }
                };
                let (a, b, c, d) = tokio::join!(one(0), one(1), one(2), one(3));
                for (address, result) in [a, b, c, d].into_iter().flatten() {
                    let doc = result?;
                    moved += 1;
                    if show {
                        eprint!("\r  {moved} moved, last {address} -> {}   ", doc.show("to"));
                    }
                }
            }
        }
        if show {
            eprintln!();
        }
        self.human(|| writeln!(out, "moved {moved} mailboxes off {name}; it owns none now"))
    }

    /// `mailbox ls`: one page, or (`all`) every page by its `next`.
    async fn list(&self, out: &mut impl io::Write, query: &str, all: bool) -> Result<(), CtlError> {
        let mut columns = Columns::new(&["address", "backend"]);
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                None => format!("mailboxes?{query}"),
                Some(after) => format!("mailboxes?{query}&after={}", encode(after)),
            };
            let page = self.fetch(Method::GET, &path, None).await?;
            let rows = render::mailbox_rows(&page);
            let first = after.is_none();
            self.human(|| {
                columns.fit(&rows);
                if first {
                    columns.header(out)?;
                }
                rows.iter().try_for_each(|row| columns.row(out, row))
            })?;
            match page.attr("next") {
                Some(next) if all => after = Some(next.to_owned()),
                Some(_) if !self.xml => {
                    eprintln!("(more mailboxes follow: --all lists every page)");
                    return Ok(());
                }
                _ => return Ok(()),
            }
        }
    }

    async fn domain(
        &self,
        out: &mut impl io::Write,
        command: DomainCommand,
    ) -> Result<(), CtlError> {
        match command {
            DomainCommand::Ls => {
                let doc = self.fetch(Method::GET, "domains", None).await?;
                self.human(|| render::domains(out, &doc))
            }
            DomainCommand::Add {
                name,
                unknown_mailbox,
            } => {
                let mut attributes = vec![("name", name.as_str())];
                if let Some(policy) = unknown_mailbox {
                    attributes.push(("unknown-mailbox", policy.as_str()));
                }
                let body = Writer::document("domain", &attributes).finish();
                let doc = self.fetch(Method::POST, "domains", Some(body)).await?;
                self.human(|| {
                    writeln!(
                        out,
                        "added domain {} (unknown mailboxes: {})",
                        doc.show("name"),
                        doc.show("unknown-mailbox")
                    )
                })
            }
            DomainCommand::Set {
                name,
                unknown_mailbox,
            } => {
                let body =
                    Writer::document("domain", &[("unknown-mailbox", unknown_mailbox.as_str())])
                        .finish();
                let path = format!("domains/{}", encode(&name));
                let doc = self.fetch(Method::PUT, &path, Some(body)).await?;
                self.human(|| {
                    writeln!(
                        out,
                        "domain {}: unknown mailboxes {}",
                        doc.show("name"),
                        doc.show("unknown-mailbox")
                    )
                })
            }
            DomainCommand::Rm { name } => {
                self.call(Method::DELETE, &format!("domains/{}", encode(&name)), None)
                    .await?;
                self.human(|| writeln!(out, "removed domain {name}"))
            }
        }
    }
}

impl Ctl {
    async fn suspension(
        &self,
        out: &mut impl io::Write,
        command: SuspensionCommand,
    ) -> Result<(), CtlError> {
        match command {
            SuspensionCommand::Ls => {
                let doc = self.fetch(Method::GET, "suspensions", None).await?;
                self.human(|| render::suspensions(out, &doc))
            }
            SuspensionCommand::Add { account, seconds } => {
                let seconds = seconds.to_string();
                let body = Writer::document(
                    "suspension",
                    &[("account", &account), ("seconds", &seconds)],
                )
                .finish();
                let doc = self.fetch(Method::POST, "suspensions", Some(body)).await?;
                self.human(|| {
                    writeln!(
                        out,
                        "suspended {} from sending for {} s",
                        doc.show("account"),
                        doc.show("remaining-seconds")
                    )
                })
            }
            SuspensionCommand::Rm { account } => {
                let path = format!("suspensions/{}", encode(&account));
                self.call(Method::DELETE, &path, None).await?;
                self.human(|| writeln!(out, "lifted the suspension of {account}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        ctl::{Exit, client::Endpoint},
        secret::Secret,
    };

    /// A one-shot HTTP server: answers `response` to the first request and returns the
    /// request as it arrived, read until `until` was seen.
    async fn mock(
        status: &'static str,
        body: &'static str,
        until: &'static str,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&request).contains(until) {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(
                    n > 0,
                    "request ended early: {}",
                    String::from_utf8_lossy(&request)
                );
                request.extend_from_slice(&buf[..n]);
            }
            stream.write_all(response.as_bytes()).await.expect("answer");
            String::from_utf8_lossy(&request).into_owned()
        });
        (url, served)
    }

    fn ctl(url: &str) -> Ctl {
        Ctl {
            client: Client::new(
                Endpoint::parse(url).expect("url"),
                Secret::new("t0k3n".to_owned()),
                Duration::from_secs(5),
            ),
            xml: false,
        }
    }

    #[tokio::test]
    async fn server_errors_carry_code_message_and_exit_6() {
        let (url, served) = mock(
            "503 Service Unavailable",
            "<error xmlns=\"urn:protobalance:api:1\" code=\"directory_unavailable\" status=\"503\">\
             <message>the directory store failed; see the server log</message></error>",
            "\r\n\r\n",
        )
        .await;
        let error = ctl(&url)
            .call(Method::GET, "stats", None)
            .await
            .expect_err("503");
        assert_eq!(
            error.to_string(),
            "directory_unavailable: the directory store failed; see the server log"
        );
        assert_eq!(error.exit() as i32, 6);
        let request = served.await.expect("served");
        assert!(
            request.starts_with("GET /api/v1/stats HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("authorization: Bearer t0k3n\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn a_non_api_answer_is_named_as_such() {
        let (url, _served) =
            mock("404 Not Found", "the XML API is not enabled\n", "\r\n\r\n").await;
        let error = ctl(&url)
            .call(Method::GET, "stats", None)
            .await
            .expect_err("404");
        assert_eq!(error.exit(), Exit::NotFound);
        let text = error.to_string();
        assert!(
            text.starts_with("http_404: 404 the XML API is not enabled"),
            "{text}"
        );
        assert!(text.contains("is --url the admin listener"), "{text}");
    }

    #[tokio::test]
    async fn imports_are_sent_chunked_while_the_input_is_still_open() {
        let (url, served) = mock("200 OK", "", "first@example.com").await;
        let client = ctl(&url).client;
        let (tx, body) = OutBody::channel(4);
        // Only the first line is sent and the input stays open: the server must see it.
        tx.send(Ok(bytes::Bytes::from_static(
            b"<mailbox address=\"first@example.com\"/>",
        )))
        .await
        .expect("queued");
        let sending = tokio::spawn(async move {
            client
                .send(Method::POST, "mailboxes/import", body)
                .await
                .map(|r| r.status())
        });
        let request = served.await.expect("served");
        assert!(
            request.contains("transfer-encoding: chunked\r\n"),
            "{request}"
        );
        assert!(!request.contains("content-length"), "{request}");
        drop(tx);
        assert_eq!(
            sending.await.expect("task").expect("answer"),
            StatusCode::OK
        );
    }
}
