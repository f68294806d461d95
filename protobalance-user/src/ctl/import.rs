//! `protobalance ctl mailbox import FILE`: the file format of `protobalance directory
//! import` (one `address[,backend]` per line, whole-line `#` comments, blank lines) turned
//! into an `<import>` document while the file is read, and streamed to
//! `POST /api/v1/mailboxes/import` as a chunked body: memory stays flat whatever the file's
//! size, and the server writes batches while the rest is still being read.
//!
//! Lines the server would refuse the whole document for (not UTF-8, characters XML cannot
//! carry, values over the server's attribute bound, absurdly long lines) are skipped here
//! and reported with their line numbers; everything else, bad addresses included, goes to
//! the server, whose report says what happened to each mailbox.

use std::{io, path::Path, time::Duration};

use bytes::Bytes;
use hyper::{Method, Response, body::Incoming};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, BufReader},
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{
    CtlError,
    client::{BodyStream, OutBody},
    commands::Ctl,
    doc::{DocReader, Item},
};
use crate::api::xml::{MAX_VALUE, NS};

/// Bytes of XML gathered before a chunk is sent (sooner when the input has no more ready).
pub(super) const CHUNK: usize = 32 * 1024;
/// Longest input line read; longer ones are skipped (no address is near this).
pub(super) const MAX_LINE: usize = 8 * 1024;
/// Skipped lines kept for the report (all are counted).
const SKIPPED_SHOWN: usize = 1000;

/// What the reading side did.
#[derive(Debug, Default)]
pub struct Sent {
    pub lines: u64,
    pub mailboxes: u64,
    /// Lines skipped here, with the reason; only the first [`SKIPPED_SHOWN`] are kept.
    pub skipped: Vec<(u64, String)>,
    pub skipped_count: u64,
    /// The request ended before the file did (the server answered early or went away).
    pub cut_short: bool,
}

impl Sent {
    fn skip(&mut self, line: u64, why: impl Into<String>) {
        self.skipped_count += 1;
        if self.skipped.len() < SKIPPED_SHOWN {
            self.skipped.push((line, why.into()));
        }
    }
}

pub struct Options<'a> {
    pub file: &'a Path,
    pub errors_only: bool,
    /// Print progress on stderr every this many lines.
    pub progress: Option<u64>,
}

/// One line as an `<import>` child: `Ok(None)` for a blank or comment line, `Err` with
/// the reason when it cannot travel in the document.
pub fn mailbox_xml(line: &[u8]) -> Result<Option<String>, String> {
    let line = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
    // As `directory import`: `#` is legal inside a local part, so only whole-line comments.
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    if line
        .chars()
        .any(|c| c.is_control() && c != '\t' && u32::from(c) < 0x20)
    {
        return Err("holds control characters, which XML cannot carry".into());
    }
    let (address, backend) = match line.split_once(',') {
        Some((a, b)) => (a.trim(), Some(b.trim()).filter(|b| !b.is_empty())),
        None => (line, None),
    };
    let value = |what: &str, text: &str| {
        let escaped = quick_xml::escape::escape(text);
        if escaped.len() > MAX_VALUE {
            return Err(format!(
                "the {what} is longer than the API's {MAX_VALUE}-byte bound"
            ));
        }
        Ok(escaped.into_owned())
    };
    let mut xml = format!("<mailbox address=\"{}\"", value("address", address)?);
    if let Some(backend) = backend {
        xml.push_str(&format!(" backend=\"{}\"", value("backend", backend)?));
    }
    xml.push_str("/>\n");
    Ok(Some(xml))
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Line {
    Eof,
    Read,
    /// Longer than [`MAX_LINE`]: skipped to its end, not kept.
    TooLong,
}

/// One line (without its `\n`) into `line`, holding at most [`MAX_LINE`] bytes.
pub(super) async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> io::Result<Line> {
    line.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Line::Eof,
                (true, true) => Line::TooLong,
                (true, false) => Line::Read,
            });
        }
        any = true;
        let (used, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, Some(i)),
            None => (buf.len(), None),
        };
        let content = &buf[..end.unwrap_or(used)];
        if !too_long && line.len() + content.len() <= MAX_LINE {
            line.extend_from_slice(content);
        } else {
            too_long = true;
            line.clear();
        }
        reader.consume(used);
        if end.is_some() {
            return Ok(if too_long { Line::TooLong } else { Line::Read });
        }
    }
}

/// Sends `chunk` (emptying it); `Ok(false)` when the request is gone.
pub(super) async fn push(
    tx: &mpsc::Sender<io::Result<Bytes>>,
    chunk: &mut String,
    idle: Duration,
) -> Result<bool, CtlError> {
    let bytes = Bytes::from(std::mem::take(chunk));
    match tokio::time::timeout(idle, tx.send(Ok(bytes))).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(_)) => Ok(false),
        Err(_) => Err(CtlError::Timeout(format!(
            "the server read nothing of the upload for {} s",
            idle.as_secs()
        ))),
    }
}

/// Reads `source` and feeds the `<import>` document into `tx` as it goes.
pub async fn produce(
    source: impl AsyncRead + Unpin,
    tx: mpsc::Sender<io::Result<Bytes>>,
    progress: Option<u64>,
    idle: Duration,
) -> Result<Sent, CtlError> {
    let mut reader = BufReader::with_capacity(64 * 1024, source);
    let mut chunk =
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<import xmlns=\"{NS}\">\n");
    let mut sent = Sent::default();
    let mut line = Vec::with_capacity(256);
    let started = Instant::now();
    loop {
        let read = match read_line(&mut reader, &mut line).await {
            Ok(read) => read,
            Err(error) => {
                let message = format!("reading line {}: {error}", sent.lines + 1);
                // Abort the body: a clean end would look like a complete document.
                let _ = tx.send(Err(io::Error::other(message.clone()))).await;
                return Err(CtlError::Io(message));
            }
        };
        match read {
            Line::Eof => break,
            Line::TooLong => {
                sent.lines += 1;
                sent.skip(sent.lines, format!("longer than {MAX_LINE} bytes"));
            }
            Line::Read => {
                sent.lines += 1;
                match mailbox_xml(&line) {
                    Ok(Some(xml)) => {
                        sent.mailboxes += 1;
                        chunk.push_str(&xml);
                    }
                    Ok(None) => {}
                    Err(why) => sent.skip(sent.lines, why),
                }
            }
        }
        if progress.is_some_and(|every| sent.lines.is_multiple_of(every)) {
            let rate = sent.lines as f64 / started.elapsed().as_secs_f64().max(1e-3);
            eprintln!("  {} lines sent ({rate:.0}/s)", sent.lines);
        }
        // A pipe may pause: send what is ready rather than wait for a full chunk.
        let drained = reader.buffer().is_empty();
        if (chunk.len() >= CHUNK || drained)
            && !chunk.is_empty()
            && !push(&tx, &mut chunk, idle).await?
        {
            sent.cut_short = true;
            return Ok(sent);
        }
    }
    chunk.push_str("</import>\n");
    if !push(&tx, &mut chunk, idle).await? {
        sent.cut_short = true;
    }
    Ok(sent)
}

/// Opens FILE (`-`: stdin, through /dev/stdin as tokio's `io-std` is not enabled).
pub(super) async fn open(file: &Path) -> Result<tokio::fs::File, CtlError> {
    let path = if file.as_os_str() == "-" {
        Path::new("/dev/stdin")
    } else {
        file
    };
    tokio::fs::File::open(path)
        .await
        .map_err(|e| CtlError::Io(format!("opening {}: {e}", file.display())))
}

impl Ctl {
    /// Streams the file, then reads the report. `Err(ImportIncomplete)` when any mailbox
    /// was not imported (skipped here or failed on the server).
    pub async fn import(&self, options: &Options<'_>) -> Result<(), CtlError> {
        let source = open(options.file).await?;
        let started = Instant::now();
        let (tx, body) = OutBody::channel(4);
        let (done_tx, mut done) = oneshot::channel();
        let idle = self.client.timeout;
        let progress = options.progress;
        tokio::spawn(async move {
            let _ = done_tx.send(produce(source, tx, progress, idle).await);
        });
        // The human report lists failures only, so it asks the server for just those.
        let path = if options.errors_only || !self.xml {
            "mailboxes/import?report=errors"
        } else {
            "mailboxes/import"
        };
        let (response, sent) = self
            .send_streamed(Method::POST, path, body, &mut done, IMPORT_PARTIAL)
            .await?;
        if !response.status().is_success() {
            return Err(self.failure(response).await);
        }
        // A success comes only after the whole document, so the reader is done (or about to).
        let sent = match sent {
            Some(sent) => sent,
            None => done.await.map_err(|_| reader_failed())??,
        };
        let stream = BodyStream::new(response, idle, u64::MAX, self.xml);
        let failed = self.report(stream, &sent, started).await?;
        match failed + sent.skipped_count {
            0 => Ok(()),
            failed => Err(CtlError::ImportIncomplete { failed }),
        }
    }

    /// Sends the streamed body and returns the answer's head, and what the reader did if it
    /// has finished. The answer comes once the whole body is in, so only the wait after
    /// the end is bounded here (by `--timeout`); the reader bounds each chunk's wait.
    /// `partial` says what a failure leaves behind on the server.
    pub(super) async fn send_streamed<T>(
        &self,
        method: Method,
        path: &str,
        body: OutBody,
        done: &mut oneshot::Receiver<Result<T, CtlError>>,
        partial: &str,
    ) -> Result<(Response<Incoming>, Option<T>), CtlError> {
        let idle = self.client.timeout;
        let response = self.client.send(method, path, body);
        tokio::pin!(response);
        let wait = tokio::time::sleep(Duration::from_secs(365 * 86_400));
        tokio::pin!(wait);
        let mut sent = None;
        loop {
            tokio::select! {
                response = &mut response => return match response {
                    Ok(response) => Ok((response, sent)),
                    // A failure of the reader also breaks the request: name the cause.
                    Err(error) => {
                        // `done` may already have completed (then `sent` holds it): poll it
                        // only while it has not.
                        let local = match sent {
                            Some(_) => None,
                            None => match tokio::time::timeout(Duration::from_secs(1), done).await {
                                Ok(Ok(Err(local))) => Some(local),
                                _ => None,
                            },
                        };
                        Err(local.unwrap_or(error).with_note(partial))
                    }
                },
                produced = &mut *done, if sent.is_none() => {
                    let produced = produced.map_err(|_| reader_failed())?;
                    sent = Some(produced.map_err(|e| e.with_note(partial))?);
                    wait.as_mut().reset(Instant::now() + idle);
                }
                () = &mut wait, if sent.is_some() => {
                    return Err(CtlError::Timeout(format!(
                        "no answer {} s after the end of the upload; {partial}",
                        idle.as_secs()
                    )));
                }
            }
        }
    }

    /// Reads the `<import-report>` as it streams; in human mode prints the summary and
    /// each failure. Returns the server's `failed` count.
    async fn report(
        &self,
        stream: BodyStream,
        sent: &Sent,
        started: Instant,
    ) -> Result<u64, CtlError> {
        let mut reader = DocReader::new(stream);
        let root = loop {
            match reader.next().await? {
                Item::Start { element, .. } if element.name == "import-report" => break element,
                Item::Text(_) => {}
                other => {
                    return Err(CtlError::BadResponse(format!(
                        "expected <import-report>, got {other:?}"
                    )));
                }
            }
        };
        let count = |name: &str| {
            root.attr(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (added, existing, failed) = (count("added"), count("existing"), count("failed"));
        let mut out = std::io::stdout();
        if self.xml {
            for (line, why) in &sent.skipped {
                eprintln!("protobalance ctl: skipped line {line}: {why}");
            }
        } else {
            use std::io::Write as _;
            let secs = started.elapsed().as_secs_f64();
            let detail = match failed + sent.skipped_count {
                0 => String::new(),
                _ => format!(
                    " ({failed} refused by the server, {} skipped here)",
                    sent.skipped_count
                ),
            };
            writeln!(
                out,
                "{} lines read in {secs:.1} s: {added} added, {existing} already there, {} failed{detail}",
                sent.lines,
                failed + sent.skipped_count,
            )
            .map_err(CtlError::Output)?;
            for (line, why) in &sent.skipped {
                writeln!(out, "  line {line}: skipped: {why}").map_err(CtlError::Output)?;
            }
            if sent.skipped_count > sent.skipped.len() as u64 {
                writeln!(
                    out,
                    "  … and {} more skipped lines",
                    sent.skipped_count - sent.skipped.len() as u64
                )
                .map_err(CtlError::Output)?;
            }
        }
        loop {
            match reader.next().await? {
                Item::Start { element, .. } if !self.xml => {
                    let result = element.show("result");
                    if matches!(result, "added" | "exists") {
                        continue;
                    }
                    use std::io::Write as _;
                    let message = element
                        .attr("message")
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default();
                    writeln!(out, "  {}  {result}{message}", element.show("address"))
                        .map_err(CtlError::Output)?;
                }
                Item::Eof => return Ok(failed),
                _ => {}
            }
        }
    }
}

pub(super) fn reader_failed() -> CtlError {
    CtlError::Io("the file reader stopped unexpectedly".into())
}

/// What a failed import leaves behind, for its error message.
const IMPORT_PARTIAL: &str = "batches the server had already written stay; run the import again when fixed (mailboxes already there are reported as `exists`)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_escaped_mailbox_elements() {
        let xml = |line: &str| mailbox_xml(line.as_bytes());
        assert_eq!(xml("# comment").expect("ok"), None);
        assert_eq!(xml("   ").expect("ok"), None);
        assert_eq!(
            xml(" a@example.com \r").expect("ok").as_deref(),
            Some("<mailbox address=\"a@example.com\"/>\n")
        );
        assert_eq!(
            xml("a\"<&>'@example.com , b2").expect("ok").as_deref(),
            Some("<mailbox address=\"a&quot;&lt;&amp;&gt;&apos;@example.com\" backend=\"b2\"/>\n")
        );
        assert_eq!(
            xml("a#b@example.com,").expect("ok").as_deref(),
            Some("<mailbox address=\"a#b@example.com\"/>\n"),
            "an empty backend means apportioned, `#` inside is part of the address"
        );
        assert!(mailbox_xml(b"j\xf6rg@example.com").is_err());
        assert!(xml("a\u{1}b@example.com").is_err());
        let long = format!("{}@example.com", "&".repeat(250));
        assert!(
            xml(&long)
                .expect_err("escaped past the bound")
                .contains("1024")
        );
    }

    async fn produced(input: &[u8]) -> (String, Sent) {
        let (tx, mut rx) = mpsc::channel(1024);
        let sent = produce(input, tx, None, Duration::from_secs(5))
            .await
            .expect("produce");
        let mut body = String::new();
        while let Some(chunk) = rx.recv().await {
            body.push_str(std::str::from_utf8(&chunk.expect("data")).expect("utf-8"));
        }
        (body, sent)
    }

    #[tokio::test]
    async fn files_stream_as_one_import_document_with_bad_lines_skipped() {
        let mut input = b"# batch\nuser1@example.com\n\nuser2@example.com,backend2\n".to_vec();
        input.extend_from_slice(b"bad\xffline@example.com\n");
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\nlast@example.com");
        let (body, sent) = produced(&input).await;
        assert_eq!(
            body,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<import xmlns=\"{NS}\">\n\
                 <mailbox address=\"user1@example.com\"/>\n\
                 <mailbox address=\"user2@example.com\" backend=\"backend2\"/>\n\
                 <mailbox address=\"last@example.com\"/>\n</import>\n"
            )
        );
        assert_eq!((sent.lines, sent.mailboxes, sent.skipped_count), (7, 3, 2));
        assert_eq!(sent.skipped[0], (5, "not UTF-8".to_owned()));
        assert_eq!(sent.skipped[1].0, 6);
    }

    #[tokio::test]
    async fn big_files_go_in_bounded_chunks() {
        let input: String = (0..20_000)
            .map(|i| format!("user{i}@example.com\n"))
            .collect();
        let (tx, mut rx) = mpsc::channel(1024);
        let sent = produce(input.as_bytes(), tx, None, Duration::from_secs(5))
            .await
            .expect("ok");
        assert_eq!(sent.mailboxes, 20_000);
        let mut chunks = 0;
        while let Some(chunk) = rx.recv().await {
            assert!(chunk.expect("data").len() < CHUNK + 1024);
            chunks += 1;
        }
        assert!(chunks > 10, "{chunks} chunks");
    }

    #[tokio::test]
    async fn a_gone_request_stops_the_reader() {
        let input: String = (0..50_000)
            .map(|i| format!("user{i}@example.com\n"))
            .collect();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let sent = produce(input.as_bytes(), tx, None, Duration::from_secs(5))
            .await
            .expect("ok");
        assert!(sent.cut_short);
        assert!(sent.lines < 50_000);
    }
}
