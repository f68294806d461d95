//! Backend responses seen before and during the login replay (RFC 9051 §7): untagged
//! lines (greeting, CAPABILITY, ID), tagged status lines with an optional response code
//! (RFC 5530), continuation requests. Only as much structure as the edge acts on: the
//! rest stays text. A `{n}` in a backend line is text too: no pre-login response we
//! read carries literals.

use super::{CodecError, Decoded, MAX_LINE, is_valid_tag, line_end, strip_eol};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::No => "NO",
            Self::Bad => "BAD",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `* <text>`, e.g. text `OK [CAPABILITY ...] Dovecot ready.` or `CAPABILITY ...`.
    Untagged { text: String },
    /// `<tag> OK|NO|BAD [<code>] <text>`; `code` without its brackets.
    Tagged {
        tag: String,
        status: Status,
        code: Option<String>,
        text: String,
    },
    /// `+ <text>`.
    Continuation { text: String },
}

/// Decodes the backend line at the start of `buf`. Text that is not UTF-8 is kept with
/// replacement characters rather than refused: we relay it, we do not judge it.
pub fn decode_response(buf: &[u8]) -> Result<Decoded<Response>, CodecError> {
    let Some(end) = line_end(buf, 0, MAX_LINE)? else {
        return Ok(Decoded::Incomplete);
    };
    let line = String::from_utf8_lossy(strip_eol(buf.get(..end).unwrap_or_default()));
    match parse_response(&line) {
        Ok(value) => Ok(Decoded::Complete {
            value,
            consumed: end,
        }),
        Err((tag, reason)) => Err(CodecError::Syntax {
            tag,
            reason,
            skip: end,
        }),
    }
}

fn parse_response(line: &str) -> Result<Response, (Option<String>, &'static str)> {
    if let Some(text) = after_marker(line, '+') {
        return Ok(Response::Continuation { text: text.into() });
    }
    if let Some(text) = after_marker(line, '*') {
        return Ok(Response::Untagged { text: text.into() });
    }
    let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
    if !is_valid_tag(tag) {
        return Err((None, "invalid tag in response"));
    }
    let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = match word.to_ascii_uppercase().as_str() {
        "OK" => Status::Ok,
        "NO" => Status::No,
        "BAD" => Status::Bad,
        _ => return Err((Some(tag.into()), "tagged response without OK, NO or BAD")),
    };
    let (code, text) = split_code(rest);
    Ok(Response::Tagged {
        tag: tag.into(),
        status,
        code: code.map(str::to_owned),
        text: text.into(),
    })
}

/// The text after `marker` and one space, if the line is `marker` or `marker SP ...`.
fn after_marker(line: &str, marker: char) -> Option<&str> {
    let rest = line.strip_prefix(marker)?;
    if rest.is_empty() {
        return Some(rest);
    }
    rest.strip_prefix(' ')
}

/// `[code] text` into its parts; text without a well-formed `[...]` is all text.
fn split_code(text: &str) -> (Option<&str>, &str) {
    let Some((code, rest)) = text
        .strip_prefix('[')
        .and_then(|inner| inner.split_once(']'))
    else {
        return (None, text);
    };
    (Some(code), rest.strip_prefix(' ').unwrap_or(rest))
}

/// The capabilities listed in `text`, which may be an untagged `CAPABILITY a b`, a
/// status text `OK [CAPABILITY a b] ...`, a code `CAPABILITY a b` (from
/// [`Response::Tagged`]) or `[CAPABILITY a b] ...`. Empty when there is no list.
/// Names are as sent; compare them case-insensitively.
pub fn capabilities(text: &str) -> Vec<String> {
    let list = capability_list(text)
        .or_else(|| capability_list(split_code(text).0?))
        .or_else(|| capability_list(split_code(text.split_once(' ')?.1).0?));
    list.map(|list| list.split_ascii_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn capability_list(text: &str) -> Option<&str> {
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    word.eq_ignore_ascii_case("CAPABILITY").then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(line: &str) -> Response {
        match decode_response(line.as_bytes()) {
            Ok(Decoded::Complete { value, consumed }) if consumed == line.len() => value,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    fn tagged(tag: &str, status: Status, code: Option<&str>, text: &str) -> Response {
        let (tag, code, text) = (tag.into(), code.map(Into::into), text.into());
        Response::Tagged {
            tag,
            status,
            code,
            text,
        }
    }

    const GREETING: &str = "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot (Debian) ready.\r\n";

    #[test]
    fn dovecot_greeting() {
        let Response::Untagged { text } = decode(GREETING) else {
            panic!("greeting is untagged");
        };
        assert!(text.starts_with("OK [CAPABILITY IMAP4rev1 "));
        let caps = capabilities(&text);
        assert_eq!(caps.len(), 8);
        assert_eq!(caps.first().map(String::as_str), Some("IMAP4rev1"));
        assert!(caps.iter().any(|cap| cap == "LITERAL+"));
        assert!(caps.iter().any(|cap| cap == "AUTH=PLAIN"));
    }

    #[test]
    fn dovecot_tagged_answers() {
        let ok = "a1 OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE SORT MOVE] Logged in\r\n";
        let code = "CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE SORT MOVE";
        assert_eq!(
            decode(ok),
            tagged("a1", Status::Ok, Some(code), "Logged in")
        );
        assert_eq!(capabilities(code).len(), 7);
        let failed = "a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n";
        let expected = tagged(
            "a1",
            Status::No,
            Some("AUTHENTICATIONFAILED"),
            "Authentication failed.",
        );
        assert_eq!(decode(failed), expected);
        let unavailable = "a2 NO [UNAVAILABLE] Account is temporarily unavailable.\n";
        let expected = tagged(
            "a2",
            Status::No,
            Some("UNAVAILABLE"),
            "Account is temporarily unavailable.",
        );
        assert_eq!(decode(unavailable), expected);
        let bad = "x bad Error in IMAP command: Unknown command.\r\n";
        let expected = tagged(
            "x",
            Status::Bad,
            None,
            "Error in IMAP command: Unknown command.",
        );
        assert_eq!(decode(bad), expected);
        assert_eq!(decode("a1 OK\r\n"), tagged("a1", Status::Ok, None, ""));
        assert_eq!(
            decode("a1 NO [x text\r\n"),
            tagged("a1", Status::No, None, "[x text")
        );
    }

    #[test]
    fn untagged_and_continuations() {
        let id = "* ID (\"name\" \"Dovecot\")\r\n";
        assert_eq!(
            decode(id),
            Response::Untagged {
                text: "ID (\"name\" \"Dovecot\")".into()
            }
        );
        let caps = decode("* CAPABILITY IMAP4rev1 LITERAL+ {5}\r\n");
        let Response::Untagged { text } = caps else {
            panic!("untagged");
        };
        assert_eq!(capabilities(&text), ["IMAP4rev1", "LITERAL+", "{5}"]);
        assert_eq!(
            decode("+ \r\n"),
            Response::Continuation {
                text: String::new()
            }
        );
        assert_eq!(
            decode("+\r\n"),
            Response::Continuation {
                text: String::new()
            }
        );
        assert_eq!(
            decode("+ Ready\r\n"),
            Response::Continuation {
                text: "Ready".into()
            }
        );
        let lossy = decode_response(b"* OK caf\xe9\r\n");
        assert!(
            matches!(lossy, Ok(Decoded::Complete { value: Response::Untagged { text }, .. }) if text == "OK caf\u{fffd}")
        );
    }

    #[test]
    fn malformed_and_partial_responses() {
        assert_eq!(
            decode_response(b"* OK [CAPABILITY IMAP4rev1"),
            Ok(Decoded::Incomplete)
        );
        for bad in [
            "a+1 OK x\r\n",
            "*x\r\n",
            "a1 PREAUTH x\r\n",
            "\r\n",
            "a1\r\n",
        ] {
            assert!(
                matches!(decode_response(bad.as_bytes()), Err(CodecError::Syntax { skip, .. }) if skip == bad.len()),
                "{bad:?}"
            );
        }
        let long = vec![b'*'; MAX_LINE];
        assert_eq!(decode_response(&long), Err(CodecError::LineTooLong));
        let mut fits = vec![b'x'; MAX_LINE - 2];
        fits.splice(..2, *b"* ");
        fits.extend_from_slice(b"\r\n");
        assert!(matches!(
            decode_response(&fits),
            Ok(Decoded::Complete {
                consumed: MAX_LINE,
                ..
            })
        ));
    }

    #[test]
    fn capability_extraction() {
        assert_eq!(capabilities("capability A B"), ["A", "B"]);
        assert_eq!(capabilities("[CAPABILITY A] text"), ["A"]);
        assert_eq!(capabilities("OK [CAPABILITY A B] text"), ["A", "B"]);
        assert!(capabilities("OK Dovecot ready.").is_empty());
        assert!(capabilities("OK [ALERT] CAPABILITY A").is_empty());
        assert!(capabilities("").is_empty());
    }
}
