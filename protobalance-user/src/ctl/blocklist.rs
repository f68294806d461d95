//! `protobalance ctl block …`: named blocklists in the kernel filter
//! (`/api/v1/blocklist`). This module owns the subcommands, the `<entry>` bodies, and
//! `block replace`, which streams a file of CIDRs as one `<list>` document while it reads
//! it (as `mailbox import` streams mailboxes). A server without a loaded filter answers
//! `409 filter_not_loaded` (exit 3).

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use clap::Subcommand;
use hyper::Method;
use tokio::{
    io::{AsyncRead, BufReader},
    sync::{mpsc, oneshot},
};

use super::{
    CtlError,
    client::{BodyStream, OutBody, encode},
    commands::Ctl,
    doc::DocReader,
    import::{CHUNK, Line, MAX_LINE, open, push, read_line, reader_failed},
    render,
};
use crate::api::xml::{MAX_VALUE, NS, Writer};

#[derive(Subcommand, Debug)]
pub enum BlockCommand {
    /// List the blocklists (name, managed by, entries), or with LIST that list's entries.
    Ls { list: Option<String> },
    /// Add CIDR to LIST (a new name makes a new list): the kernel drops it at once.
    Add {
        list: String,
        cidr: String,
        /// Why, kept with the entry and shown by `block ls LIST`.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Remove the entry after this long (default: never).
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
    },
    /// Remove CIDR from LIST; without CIDR, remove the whole LIST.
    Rm { list: String, cidr: Option<String> },
    /// Make LIST exactly the CIDRs of FILE, streamed as it is read.
    ///
    /// FILE (`-`: stdin) has one CIDR per line; blank lines and whole-line `#` comments
    /// are skipped. The server changes the list only once the whole file is in: a line
    /// that cannot be sent (or a CIDR the server refuses) leaves the list as it was.
    Replace { list: String, file: PathBuf },
}

/// What a failed `block replace` leaves behind, for its error message.
const UNCHANGED: &str =
    "the list is unchanged (the server replaces it only once the whole file is in)";
/// Largest answer to a change read.
const ANSWER_LIMIT: u64 = 1024 * 1024;

fn list_path(list: &str) -> String {
    format!("blocklist/{}", encode(list))
}

/// `blocklist/LIST/CIDR`, the CIDR's `/` as `%2F` (a path segment cannot hold it).
fn entry_path(list: &str, cidr: &str) -> String {
    format!("blocklist/{}/{}", encode(list), encode(cidr))
}

/// `<entry cidr [reason] [ttl-seconds]/>` for `POST blocklist/LIST`.
fn entry_body(cidr: &str, reason: Option<&str>, ttl: Option<u64>) -> String {
    let ttl = ttl.map(|t| t.to_string());
    let mut attributes = vec![("cidr", cidr)];
    if let Some(reason) = reason {
        attributes.push(("reason", reason));
    }
    if let Some(ttl) = ttl.as_deref() {
        attributes.push(("ttl-seconds", ttl));
    }
    Writer::document("entry", &attributes).finish()
}

/// One line of a list file as an `<entry cidr/>`: `Ok(None)` for a blank or comment line,
/// `Err` with the reason when it cannot travel in the document.
fn entry_xml(line: &[u8]) -> Result<Option<String>, String> {
    let line = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    if line.chars().any(char::is_control) {
        return Err("holds control characters".into());
    }
    let escaped = quick_xml::escape::escape(line);
    if escaped.len() > MAX_VALUE {
        return Err(format!("longer than the API's {MAX_VALUE}-byte bound"));
    }
    Ok(Some(format!("<entry cidr=\"{escaped}\"/>\n")))
}

/// Ends the body with an error, so the server never takes what was sent for a whole list.
async fn abort(tx: &mpsc::Sender<io::Result<Bytes>>, error: CtlError) -> CtlError {
    let _ = tx.send(Err(io::Error::other(error.to_string()))).await;
    error
}

/// Reads `source` and feeds the `<list>` document into `tx` as it goes; returns the
/// number of entries sent. `file` names the source in messages.
async fn produce(
    source: impl AsyncRead + Unpin,
    tx: mpsc::Sender<io::Result<Bytes>>,
    idle: Duration,
    file: &str,
) -> Result<u64, CtlError> {
    let mut reader = BufReader::with_capacity(64 * 1024, source);
    let mut chunk = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<list xmlns=\"{NS}\">\n");
    let (mut lines, mut entries) = (0u64, 0u64);
    let mut line = Vec::with_capacity(128);
    loop {
        let read = match read_line(&mut reader, &mut line).await {
            Ok(read) => read,
            Err(e) => {
                let error = CtlError::Io(format!("reading {file} line {}: {e}", lines + 1));
                return Err(abort(&tx, error).await);
            }
        };
        let refused = match read {
            Line::Eof => break,
            Line::TooLong => Err(format!("longer than {MAX_LINE} bytes")),
            Line::Read => entry_xml(&line),
        };
        lines += 1;
        match refused {
            Ok(Some(xml)) => {
                entries += 1;
                chunk.push_str(&xml);
            }
            Ok(None) => {}
            Err(why) => {
                let error = CtlError::Usage(format!("{file} line {lines}: {why}; {UNCHANGED}"));
                return Err(abort(&tx, error).await);
            }
        }
        // A pipe may pause: send what is ready rather than wait for a full chunk.
        let drained = reader.buffer().is_empty();
        if (chunk.len() >= CHUNK || drained)
            && !chunk.is_empty()
            && !push(&tx, &mut chunk, idle).await?
        {
            // The server answered early (an error): its answer says why.
            return Ok(entries);
        }
    }
    chunk.push_str("</list>\n");
    push(&tx, &mut chunk, idle).await?;
    Ok(entries)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Ctl {
    pub async fn block(
        &self,
        out: &mut impl io::Write,
        command: BlockCommand,
    ) -> Result<(), CtlError> {
        match command {
            BlockCommand::Ls { list: None } => {
                let doc = self.fetch(Method::GET, "blocklist", None).await?;
                self.human(|| render::blocklists(out, &doc))
            }
            BlockCommand::Ls { list: Some(list) } => {
                let doc = self.fetch(Method::GET, &list_path(&list), None).await?;
                self.human(|| render::block_entries(out, &doc, unix_now()))
            }
            BlockCommand::Add {
                list,
                cidr,
                reason,
                ttl,
            } => {
                let body = entry_body(&cidr, reason.as_deref(), ttl);
                let doc = self
                    .fetch(Method::POST, &list_path(&list), Some(body))
                    .await?;
                self.human(|| render::block_added(out, &doc, unix_now()))
            }
            BlockCommand::Rm { list, cidr: None } => {
                self.call(Method::DELETE, &list_path(&list), None).await?;
                self.human(|| writeln!(out, "removed blocklist {list}"))
            }
            BlockCommand::Rm {
                list,
                cidr: Some(cidr),
            } => {
                self.call(Method::DELETE, &entry_path(&list, &cidr), None)
                    .await?;
                self.human(|| writeln!(out, "removed {cidr} from blocklist {list}"))
            }
            BlockCommand::Replace { list, file } => self.replace(out, &list, &file).await,
        }
    }

    /// `block replace`: streams FILE as the `<list>` of a `PUT`, then reads the answer.
    async fn replace(
        &self,
        out: &mut impl io::Write,
        list: &str,
        file: &Path,
    ) -> Result<(), CtlError> {
        let source = open(file).await?;
        let (tx, body) = OutBody::channel(4);
        let (done_tx, mut done) = oneshot::channel();
        let idle = self.client.timeout;
        let shown = file.display().to_string();
        tokio::spawn(async move {
            let _ = done_tx.send(produce(source, tx, idle, &shown).await);
        });
        let path = list_path(list);
        let (response, sent) = self
            .send_streamed(Method::PUT, &path, body, &mut done, UNCHANGED)
            .await?;
        if !response.status().is_success() {
            return Err(self.failure(response).await);
        }
        // A success comes only after the whole document, so the reader is done (or about to).
        let sent = match sent {
            Some(sent) => sent,
            None => done.await.map_err(|_| reader_failed())??,
        };
        let stream = BodyStream::new(response, idle, ANSWER_LIMIT, self.xml);
        let doc = DocReader::new(stream).tree().await?;
        self.human(|| {
            writeln!(
                out,
                "blocklist {}: replaced with {} entries ({sent} sent)",
                doc.show("name"),
                doc.show("entries")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_escaped_and_cidrs_keep_their_slash_in_one_segment() {
        assert_eq!(
            entry_body("198.51.100.0/24", Some("spam <run> & \"co\""), Some(3600)),
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<entry xmlns=\"{NS}\" \
                 cidr=\"198.51.100.0/24\" reason=\"spam &lt;run&gt; &amp; &quot;co&quot;\" \
                 ttl-seconds=\"3600\"></entry>\n"
            )
        );
        assert!(
            entry_body("2001:db8::/32", None, None).ends_with(" cidr=\"2001:db8::/32\"></entry>\n")
        );
        assert_eq!(
            entry_path("edge-list", "198.51.100.0/24"),
            "blocklist/edge-list/198.51.100.0%2F24"
        );
        assert_eq!(
            entry_path("x", "2001:db8::/32"),
            "blocklist/x/2001%3Adb8%3A%3A%2F32"
        );
        assert_eq!(list_path("a b/c"), "blocklist/a%20b%2Fc");
    }

    async fn produced(input: &[u8]) -> (String, Result<u64, CtlError>) {
        let (tx, mut rx) = mpsc::channel(1024);
        let result = produce(input, tx, Duration::from_secs(5), "list.txt").await;
        let mut body = String::new();
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Ok(data) => body.push_str(std::str::from_utf8(&data).expect("utf-8")),
                Err(e) => body.push_str(&format!("[aborted: {e}]")),
            }
        }
        (body, result)
    }

    #[tokio::test]
    async fn list_files_stream_as_one_list_document() {
        let input = b"# office\n198.51.100.0/24\r\n\n  2001:db8::/32  \n203.0.113.7/32&<x>";
        let (body, sent) = produced(input).await;
        assert_eq!(sent.expect("sent"), 3);
        assert_eq!(
            body,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<list xmlns=\"{NS}\">\n\
                 <entry cidr=\"198.51.100.0/24\"/>\n<entry cidr=\"2001:db8::/32\"/>\n\
                 <entry cidr=\"203.0.113.7/32&amp;&lt;x&gt;\"/>\n</list>\n"
            )
        );
    }

    #[tokio::test]
    async fn a_line_that_cannot_travel_aborts_the_whole_list() {
        let (body, sent) = produced(b"198.51.100.0/24\n10.0.0.0/8\x01\n192.0.2.0/24\n").await;
        let error = sent.expect_err("aborted");
        assert_eq!(error.exit() as i32, 1);
        assert!(
            error.to_string().contains("list.txt line 2: holds control"),
            "{error}"
        );
        assert!(body.ends_with("[aborted: usage: list.txt line 2: holds control characters; the list is unchanged (the server replaces it only once the whole file is in)]"), "{body}");
        assert!(!body.contains("</list>"), "{body}");
        assert!(!body.contains("192.0.2.0"), "{body}");
        let (_, sent) = produced(b"\xff\n").await;
        assert!(
            sent.expect_err("not UTF-8")
                .to_string()
                .contains("line 1: not UTF-8")
        );
    }
}
