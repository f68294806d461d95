//! The small IMAP client a mailbox move needs (RFC 9051 / 3501 subset): LOGIN, LIST,
//! CREATE, EXAMINE/SELECT, UID FETCH of flags, date and body, APPEND with flags and date,
//! UID STORE and EXPUNGE. Responses are read with their literals; every read and write
//! has a deadline; a line or literal past the size limits is an error, not a buffer that
//! grows without bound.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use crate::backend::BackendStream;

/// Longest response line we accept (without literals).
const MAX_LINE: usize = 64 * 1024;
/// Largest literal (one message) we accept.
pub const MAX_LITERAL: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("IMAP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("IMAP server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("IMAP `{command}` refused: {answer}")]
    Refused { command: String, answer: String },
    #[error("IMAP protocol: {0}")]
    Protocol(String),
}

/// One untagged response: its text, with each literal replaced by `{}` and kept in
/// `literals` in order.
#[derive(Debug, Default)]
pub struct Untagged {
    pub text: String,
    pub literals: Vec<Vec<u8>>,
}

pub struct ImapClient {
    stream: BufReader<BackendStream>,
    tag: u32,
    timeout: Duration,
}

/// `"…"` with `\` and `"` escaped (names and passwords without CR/LF).
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

impl ImapClient {
    /// Reads the greeting of a connected IMAP server.
    pub async fn start(stream: BackendStream, timeout: Duration) -> Result<Self, ImapError> {
        let mut client = Self {
            stream: BufReader::new(stream),
            tag: 0,
            timeout,
        };
        let mut line = Vec::new();
        client.read_line(&mut line).await?;
        if !line.starts_with(b"* OK") && !line.starts_with(b"* PREAUTH") {
            return Err(ImapError::Protocol(format!(
                "greeting: {}",
                String::from_utf8_lossy(&line).trim_end()
            )));
        }
        Ok(client)
    }

    async fn read_line(&mut self, line: &mut Vec<u8>) -> Result<(), ImapError> {
        line.clear();
        let read = tokio::time::timeout(self.timeout, async {
            let mut limited = (&mut self.stream).take(MAX_LINE as u64 + 2);
            limited.read_until(b'\n', line).await
        })
        .await
        .map_err(|_| ImapError::Timeout(self.timeout))??;
        if read == 0 {
            return Err(ImapError::Protocol(
                "the server closed the connection".into(),
            ));
        }
        if !line.ends_with(b"\n") {
            return Err(ImapError::Protocol("response line too long".into()));
        }
        Ok(())
    }

    /// Sends `command` (and then each of `literals` when the server asks for it: `+`) and
    /// reads to its tagged completion. `Ok` holds the untagged responses; a NO or BAD is
    /// [`ImapError::Refused`].
    pub async fn run(
        &mut self,
        command: &str,
        literals: &[&[u8]],
    ) -> Result<Vec<Untagged>, ImapError> {
        self.run_tagged(command, literals)
            .await
            .map(|(untagged, _)| untagged)
    }

    /// [`run`](Self::run), also returning the text of the tagged OK (its response code,
    /// e.g. `[APPENDUID 7 42]`).
    pub async fn run_tagged(
        &mut self,
        command: &str,
        literals: &[&[u8]],
    ) -> Result<(Vec<Untagged>, String), ImapError> {
        self.tag += 1;
        let tag = format!("m{}", self.tag);
        let shown = command
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        self.write(format!("{tag} {command}").as_bytes()).await?;
        let mut pending = literals.iter();
        let mut untagged = Vec::new();
        let mut line = Vec::new();
        loop {
            self.read_line(&mut line).await?;
            if line.starts_with(b"+") {
                let Some(literal) = pending.next() else {
                    return Err(ImapError::Protocol(format!(
                        "`{shown}`: a continuation request nothing was sent for"
                    )));
                };
                let mut data = literal.to_vec();
                let rest: Vec<&&[u8]> = pending.clone().collect();
                if rest.is_empty() {
                    data.extend_from_slice(b"\r\n");
                }
                self.write_raw(&data).await?;
                continue;
            }
            if let Some(rest) = line.strip_prefix(tag.as_bytes()) {
                let answer = String::from_utf8_lossy(rest).trim().to_owned();
                if answer.starts_with("OK") {
                    return Ok((untagged, answer));
                }
                return Err(ImapError::Refused {
                    command: shown,
                    answer,
                });
            }
            if line.starts_with(b"* ") {
                let mut response = Untagged::default();
                self.collect(&mut line, &mut response).await?;
                untagged.push(response);
                continue;
            }
            return Err(ImapError::Protocol(format!(
                "unexpected line: {}",
                String::from_utf8_lossy(&line).trim_end()
            )));
        }
    }

    /// Completes an untagged response whose first line is `line`, reading its literals.
    async fn collect(
        &mut self,
        line: &mut Vec<u8>,
        response: &mut Untagged,
    ) -> Result<(), ImapError> {
        loop {
            let text = String::from_utf8_lossy(line).into_owned();
            let trimmed = text.trim_end_matches(['\r', '\n']);
            match literal_size(trimmed) {
                Some((before, size)) => {
                    if size > MAX_LITERAL {
                        return Err(ImapError::Protocol(format!(
                            "a literal of {size} bytes is larger than {MAX_LITERAL}"
                        )));
                    }
                    response.text.push_str(before);
                    response.text.push_str("{}");
                    let mut data = vec![0; size];
                    tokio::time::timeout(self.timeout, self.stream.read_exact(&mut data))
                        .await
                        .map_err(|_| ImapError::Timeout(self.timeout))??;
                    response.literals.push(data);
                    self.read_line(line).await?;
                }
                None => {
                    response.text.push_str(trimmed);
                    return Ok(());
                }
            }
        }
    }

    async fn write(&mut self, command: &[u8]) -> Result<(), ImapError> {
        let mut data = command.to_vec();
        // A command with a synchronizing literal ends at `{n}`; the rest follows on `+`.
        data.extend_from_slice(b"\r\n");
        self.write_raw(&data).await
    }

    async fn write_raw(&mut self, data: &[u8]) -> Result<(), ImapError> {
        tokio::time::timeout(self.timeout, async {
            let stream = self.stream.get_mut();
            stream.write_all(data).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| ImapError::Timeout(self.timeout))??;
        Ok(())
    }

    /// `LOGOUT`, best effort.
    pub async fn logout(mut self) {
        let _ = self.run("LOGOUT", &[]).await;
    }
}

/// `(text before the literal, size)` when `line` ends with `{size}` (or `{size+}`).
fn literal_size(line: &str) -> Option<(&str, usize)> {
    let inner = line.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    let digits = inner[open + 1..].trim_end_matches('+');
    let size = digits.parse().ok()?;
    Some((&line[..open], size))
}

/// A mailbox name from a LIST response: `* LIST (\HasNoChildren) "." "INBOX.Sent"` or
/// with the name as a literal (`{}` in the text). `None` for `\Noselect` entries.
pub fn list_entry(response: &Untagged) -> Option<(String, Option<char>)> {
    let text = response.text.strip_prefix("* LIST ")?;
    let close = text.find(')')?;
    let flags = text.get(1..close)?;
    if flags
        .split_whitespace()
        .any(|f| f.eq_ignore_ascii_case("\\Noselect") || f.eq_ignore_ascii_case("\\NonExistent"))
    {
        return None;
    }
    let rest = text[close + 1..].trim_start();
    let (delimiter, rest) = if let Some(r) = rest.strip_prefix("NIL") {
        (None, r)
    } else {
        let r = rest.strip_prefix('"')?;
        let (d, r) = if let Some(r) = r.strip_prefix('\\') {
            let d = r.chars().next()?;
            (d, &r[d.len_utf8()..])
        } else {
            (r.chars().next()?, &r[r.chars().next()?.len_utf8()..])
        };
        (Some(d), r.strip_prefix('"')?)
    };
    let name = rest.trim();
    let name = if name == "{}" {
        String::from_utf8(response.literals.first()?.clone()).ok()?
    } else if let Some(quoted) = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        quoted.replace("\\\"", "\"").replace("\\\\", "\\")
    } else {
        name.to_owned()
    };
    Some((name, delimiter))
}

/// One message as a `UID FETCH (UID FLAGS INTERNALDATE BODY.PEEK[])` response has it.
#[derive(Debug)]
pub struct Fetched {
    pub uid: u32,
    /// Flags to keep on the copy (`\Recent` is the server's own).
    pub flags: Vec<String>,
    pub internal_date: Option<String>,
    pub body: Option<Vec<u8>>,
}

/// Reads a FETCH response; `None` for other untagged responses.
pub fn fetched(response: &Untagged) -> Option<Fetched> {
    let text = &response.text;
    let start = text.find(" FETCH (")?;
    let items = &text[start + 8..];
    let uid = after(items, "UID ")?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let flags = after(items, "FLAGS (")
        .and_then(|f| f.split(')').next())
        .map(|f| {
            f.split_whitespace()
                .filter(|flag| !flag.eq_ignore_ascii_case("\\Recent"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let internal_date = after(items, "INTERNALDATE \"")
        .and_then(|d| d.split('"').next())
        .map(str::to_owned);
    let body = items
        .contains("BODY[] {}")
        .then(|| response.literals.first().cloned())
        .flatten();
    Some(Fetched {
        uid,
        flags,
        internal_date,
        body,
    })
}

fn after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.find(key).map(|i| &text[i + key.len()..])
}

/// `RFC822.SIZE` of a FETCH response.
pub fn message_size(response: &Untagged) -> Option<u64> {
    after(&response.text, "RFC822.SIZE ")?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The new message's UID from an APPEND's `OK [APPENDUID <validity> <uid>]` (UIDPLUS).
pub fn append_uid(tagged: &str) -> Option<u32> {
    after(tagged, "[APPENDUID ")?
        .split(']')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `UIDVALIDITY` from the untagged responses of SELECT/EXAMINE.
pub fn uid_validity(responses: &[Untagged]) -> Option<u32> {
    responses.iter().find_map(|r| {
        after(&r.text, "[UIDVALIDITY ")?
            .split(']')
            .next()?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untagged(text: &str, literals: &[&[u8]]) -> Untagged {
        Untagged {
            text: text.into(),
            literals: literals.iter().map(|l| l.to_vec()).collect(),
        }
    }

    #[test]
    fn literals_are_found_at_line_ends() {
        assert_eq!(
            literal_size("* 1 FETCH (UID 7 BODY[] {42}"),
            Some(("* 1 FETCH (UID 7 BODY[] ", 42))
        );
        assert_eq!(
            literal_size("* LIST () \".\" {5+}"),
            Some(("* LIST () \".\" ", 5))
        );
        assert_eq!(literal_size("* OK [UIDVALIDITY 3] {not}"), None);
        assert_eq!(literal_size("* OK done"), None);
    }

    #[test]
    fn list_entries_give_name_and_delimiter() {
        assert_eq!(
            list_entry(&untagged("* LIST (\\HasNoChildren) \".\" INBOX", &[])),
            Some(("INBOX".into(), Some('.')))
        );
        assert_eq!(
            list_entry(&untagged(
                "* LIST (\\HasNoChildren \\Sent) \"/\" \"Sent Items\"",
                &[]
            )),
            Some(("Sent Items".into(), Some('/')))
        );
        assert_eq!(
            list_entry(&untagged("* LIST () \".\" {}", &[b"We\"ird"])),
            Some(("We\"ird".into(), Some('.')))
        );
        assert_eq!(
            list_entry(&untagged("* LIST (\\Noselect) \".\" Parent", &[])),
            None
        );
        assert_eq!(
            list_entry(&untagged("* LIST () NIL Flat", &[])),
            Some(("Flat".into(), None))
        );
        assert_eq!(list_entry(&untagged("* 3 EXISTS", &[])), None);
        // Malformed: no panic, just not a folder.
        assert_eq!(list_entry(&untagged("* LIST )(", &[])), None);
        assert_eq!(list_entry(&untagged("* LIST (", &[])), None);
        // An escaped multi-byte "delimiter" (not what IMAP allows) is read, not a panic.
        assert_eq!(
            list_entry(&untagged("* LIST () \"\\é\" INBOX", &[])),
            Some(("INBOX".to_owned(), Some('é')))
        );
    }

    #[test]
    fn fetch_responses_give_uid_flags_date_and_body() {
        let f = fetched(&untagged(
            "* 2 FETCH (UID 17 FLAGS (\\Seen \\Recent $Label1) INTERNALDATE \"01-Jan-2026 10:00:00 +0000\" BODY[] {})",
            &[b"Subject: x\r\n\r\nhi\r\n"],
        ))
        .expect("fetch");
        assert_eq!(f.uid, 17);
        assert_eq!(f.flags, vec!["\\Seen", "$Label1"]);
        assert_eq!(
            f.internal_date.as_deref(),
            Some("01-Jan-2026 10:00:00 +0000")
        );
        assert_eq!(f.body.as_deref(), Some(&b"Subject: x\r\n\r\nhi\r\n"[..]));
        let flags_only = fetched(&untagged("* 1 FETCH (UID 3 FLAGS ())", &[])).expect("fetch");
        assert!(flags_only.flags.is_empty() && flags_only.body.is_none());
        assert!(fetched(&untagged("* 4 EXISTS", &[])).is_none());
    }

    #[test]
    fn appended_uids_are_read_from_appenduid() {
        assert_eq!(
            append_uid("OK [APPENDUID 1700000000 42] Append completed."),
            Some(42)
        );
        assert_eq!(append_uid("OK Append completed."), None);
    }

    #[test]
    fn quoting_escapes_quotes_and_backslashes() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn uid_validity_is_read_from_select() {
        let responses = [
            untagged("* 3 EXISTS", &[]),
            untagged("* OK [UIDVALIDITY 1700000000] UIDs valid", &[]),
        ];
        assert_eq!(uid_validity(&responses), Some(1_700_000_000));
    }
}
