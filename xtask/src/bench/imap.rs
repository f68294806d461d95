//! The IMAP session script: greeting, `a LOGIN`, `b SELECT INBOX`, `c FETCH 1 (RFC822)`
//! (the message literal read to the size its `{n}` announces), `d LOGOUT`. Every tagged
//! reply must be OK, the mailbox must hold a message and the literal must be the seeded
//! message's size, so a session that "finishes" really read mail.

use anyhow::{Context as _, Result, bail, ensure};

use super::{protocol::Login, wire::LineConn};

/// Bound on one literal; the seeded message is ~10 KB.
const MAX_LITERAL: u64 = 1024 * 1024;
/// Less than this means the seeded message was not what came back.
const MIN_BODY: u64 = 1024;
/// Bound on untagged lines before a tagged reply (SELECT sends about ten).
const MAX_UNTAGGED: usize = 1000;

pub fn session(conn: &mut LineConn, login: &Login) -> Result<()> {
    conn.expect("* OK", "connect (greeting)")?;
    let command = format!(
        "a LOGIN {} {}\r\n",
        quoted(&login.user),
        quoted(&login.password)
    );
    tagged(conn, "a", command.as_bytes(), "LOGIN")?;
    let select = tagged(conn, "b", b"b SELECT INBOX\r\n", "SELECT INBOX")?;
    ensure!(
        select.exists.unwrap_or(0) >= 1,
        "{}: empty mailbox (was the seed message delivered?)",
        login.user
    );
    let fetch = tagged(conn, "c", b"c FETCH 1 (RFC822)\r\n", "FETCH 1 (RFC822)")?;
    ensure!(
        fetch.literal_bytes >= MIN_BODY,
        "FETCH 1 returned only {} literal bytes",
        fetch.literal_bytes
    );
    tagged(conn, "d", b"d LOGOUT\r\n", "LOGOUT")?;
    Ok(())
}

/// What the untagged part of one response carried that the script checks.
#[derive(Debug, Default)]
struct Untagged {
    exists: Option<u64>,
    literal_bytes: u64,
}

/// Sends `command` and reads untagged lines (and their literals) up to the line tagged
/// `tag`, which must be OK.
fn tagged(conn: &mut LineConn, tag: &str, command: &[u8], what: &str) -> Result<Untagged> {
    conn.send(command)
        .with_context(|| format!("sending {what}"))?;
    let done = format!("{tag} ");
    let mut seen = Untagged::default();
    for _ in 0..MAX_UNTAGGED {
        let line = conn.read_line().with_context(|| format!("after {what}"))?;
        if let Some(status) = line.strip_prefix(done.as_bytes()) {
            ensure!(
                status.starts_with(b"OK"),
                "after {what}: {:?}",
                String::from_utf8_lossy(line).trim_end()
            );
            return Ok(seen);
        }
        seen.exists = exists(line).or(seen.exists);
        if let Some(size) = literal_size(line) {
            ensure!(size <= MAX_LITERAL, "a {size}-byte literal after {what}");
            conn.skip_bytes(size)
                .with_context(|| format!("after {what}"))?;
            seen.literal_bytes += size;
        }
    }
    bail!("after {what}: no tagged reply within {MAX_UNTAGGED} lines")
}

/// An IMAP quoted string (test credentials are plain ASCII).
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `* 1 EXISTS` → 1.
fn exists(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?.strip_prefix("* ")?;
    let mut words = text.split_ascii_whitespace();
    let count = words.next()?.parse().ok()?;
    words
        .next()?
        .eq_ignore_ascii_case("EXISTS")
        .then_some(count)
}

/// A line announcing a literal ends in `{n}` + CRLF: `* 1 FETCH (RFC822 {10403}` → 10403.
fn literal_size(line: &[u8]) -> Option<u64> {
    let body = line.strip_suffix(b"}\r\n")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    std::str::from_utf8(&body[open + 1..]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exists_and_literals() {
        assert_eq!(exists(b"* 3 EXISTS\r\n"), Some(3));
        assert_eq!(exists(b"* 0 RECENT\r\n"), None);
        assert_eq!(exists(b"* OK [UIDVALIDITY 1] UIDs valid\r\n"), None);
        assert_eq!(
            literal_size(b"* 1 FETCH (FLAGS (\\Seen) RFC822 {10403}\r\n"),
            Some(10403)
        );
        assert_eq!(literal_size(b"* 1 FETCH (FLAGS (\\Seen))\r\n"), None);
        assert_eq!(literal_size(b"* OK {x}\r\n"), None);
    }

    #[test]
    fn quotes_credentials() {
        assert_eq!(quoted("user1@example.com"), "\"user1@example.com\"");
        assert_eq!(quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
