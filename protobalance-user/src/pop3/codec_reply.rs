//! POP3 replies: the ones the edge writes to clients (RFC 1939 status lines and multi-line
//! responses, RFC 2449 CAPA, RFC 3206 response codes, RFC 5034 `+` continuations) and the
//! ones it reads from a backend while replaying a login.
//!
//! Encoders take text from the driver and cannot fail: control characters become spaces and
//! multi-line bodies are dot-stuffed, so the output is always well-framed. Decoders are
//! strict (UTF-8, no control characters but TAB) and bounded:
//! [`MAX_LINE`](super::MAX_LINE) per line, [`MAX_MULTILINE_LINES`] per multi-line body.

use super::{CodecError, Decoded, take_line};

/// Most lines accepted in one multi-line body (a backend's CAPA has about a dozen).
pub const MAX_MULTILINE_LINES: usize = 64;

/// AUTH LOGIN prompts: base64 of `Username:` and `Password:`, as every client expects.
pub const LOGIN_PROMPT_USERNAME: &[u8] = b"+ VXNlcm5hbWU6\r\n";
pub const LOGIN_PROMPT_PASSWORD: &[u8] = b"+ UGFzc3dvcmQ6\r\n";

/// One reply line from a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK text`. A leading `[CODE]` (Dovecot's banner says `[XCLIENT]` to trusted peers)
    /// stays in `text`; [`split_response_code`] takes it apart.
    Ok { text: String },
    /// `-ERR [CODE] text`, e.g. `code: Some("SYS/TEMP")` (RFC 3206), `Some("AUTH")`.
    Err { code: Option<String>, text: String },
    /// `+ payload`: a base64 SASL challenge, possibly empty.
    Continue { payload: String },
}

/// `+OK text\r\n`.
pub fn ok(text: &str) -> Vec<u8> {
    status_line("+OK", None, text)
}

/// `-ERR [code] text\r\n`, e.g. `err(Some("SYS/TEMP"), "Try again later")`. Characters a
/// response code may not hold (RFC 2449 §8: no space, `[` or `]`) are dropped from `code`.
pub fn err(code: Option<&str>, text: &str) -> Vec<u8> {
    status_line("-ERR", code, text)
}

/// `+OK text`, then `lines` dot-stuffed (RFC 1939 §3), then `.`.
pub fn multiline(text: &str, lines: &[&str]) -> Vec<u8> {
    let mut out = ok(text);
    for line in lines {
        if line.starts_with('.') {
            out.push(b'.');
        }
        push_sanitized(&mut out, line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The reply to CAPA (RFC 2449 §5): one capability per line.
pub fn capa(lines: &[&str]) -> Vec<u8> {
    multiline("Capability list follows", lines)
}

/// `+ payload\r\n`: a SASL challenge (RFC 5034 §4). `payload` is base64; an empty one is
/// the empty challenge that asks for a PLAIN response.
pub fn continuation(payload_b64: &str) -> Vec<u8> {
    let mut out = b"+ ".to_vec();
    push_sanitized(&mut out, payload_b64);
    out.extend_from_slice(b"\r\n");
    out
}

fn status_line(status: &str, code: Option<&str>, text: &str) -> Vec<u8> {
    let mut out = status.as_bytes().to_vec();
    let code: String = code
        .unwrap_or_default()
        .chars()
        .filter(|&c| is_code_char(c))
        .collect();
    if !code.is_empty() {
        out.extend_from_slice(b" [");
        out.extend_from_slice(code.as_bytes());
        out.push(b']');
    }
    if !text.is_empty() {
        out.push(b' ');
        push_sanitized(&mut out, text);
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn push_sanitized(out: &mut Vec<u8>, text: &str) {
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        let mut utf8 = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
}

fn is_code_char(c: char) -> bool {
    c.is_ascii_graphic() && c != '[' && c != ']'
}

/// Splits a leading RFC 2449 response code off status text:
/// `"[SYS/TEMP] Try later"` gives `(Some("SYS/TEMP"), "Try later")`. Codes compare
/// case-insensitively; text without a well-formed code comes back whole.
pub fn split_response_code(text: &str) -> (Option<&str>, &str) {
    let Some((code, rest)) = text.strip_prefix('[').and_then(|t| t.split_once(']')) else {
        return (None, text);
    };
    if code.is_empty() || !code.chars().all(is_code_char) {
        return (None, text);
    }
    (Some(code), rest.strip_prefix(' ').unwrap_or(rest))
}

/// Decodes the first backend reply line in `buf`.
pub fn decode_reply(buf: &[u8]) -> Result<Decoded<Reply>, CodecError> {
    let Some((line, consumed)) = take_line(buf)? else {
        return Ok(Decoded::Incomplete);
    };
    let value = parse_reply(reply_text(line)?)?;
    Ok(Decoded::Complete { value, consumed })
}

/// Decodes the body of a multi-line response, after its `+OK` line, up to and including the
/// terminating `.`; lines come back dot-unstuffed.
pub fn decode_multiline(buf: &[u8]) -> Result<Decoded<Vec<String>>, CodecError> {
    let mut lines = Vec::new();
    let mut offset = 0;
    loop {
        let rest = buf.get(offset..).unwrap_or_default();
        let Some((line, used)) = take_line(rest)? else {
            return Ok(Decoded::Incomplete);
        };
        offset += used;
        if line == b"." {
            return Ok(Decoded::Complete {
                value: lines,
                consumed: offset,
            });
        }
        if lines.len() == MAX_MULTILINE_LINES {
            return Err(CodecError::TooManyLines);
        }
        let unstuffed = line.strip_prefix(b".").unwrap_or(line);
        lines.push(reply_text(unstuffed)?.to_owned());
    }
}

fn reply_text(line: &[u8]) -> Result<&str, CodecError> {
    match std::str::from_utf8(line) {
        Ok(text) if !text.chars().any(|c| c.is_control() && c != '\t') => Ok(text),
        _ => Err(CodecError::BadReply),
    }
}

fn parse_reply(line: &str) -> Result<Reply, CodecError> {
    if let Some(text) = after_status(line, "+OK") {
        return Ok(Reply::Ok {
            text: text.to_owned(),
        });
    }
    if let Some(text) = after_status(line, "-ERR") {
        let (code, text) = split_response_code(text);
        return Ok(Reply::Err {
            code: code.map(str::to_owned),
            text: text.to_owned(),
        });
    }
    match after_status(line, "+") {
        Some(payload) => Ok(Reply::Continue {
            payload: payload.to_owned(),
        }),
        None => Err(CodecError::BadReply),
    }
}

/// The text after `status` and one space; servers must send status in upper case
/// (RFC 1939 §3), clients may accept any case.
fn after_status<'a>(line: &'a str, status: &str) -> Option<&'a str> {
    let head = line.get(..status.len())?;
    let rest = line.get(status.len()..)?;
    if !head.eq_ignore_ascii_case(status) {
        return None;
    }
    if rest.is_empty() {
        Some(rest)
    } else {
        rest.strip_prefix(' ')
    }
}

#[cfg(test)]
mod tests {
    use super::super::MAX_LINE;
    use super::*;

    fn reply(value: Reply, consumed: usize) -> Result<Decoded<Reply>, CodecError> {
        Ok(Decoded::Complete { value, consumed })
    }

    fn ok_reply(text: &str) -> Reply {
        Reply::Ok { text: text.into() }
    }

    fn err_reply(code: Option<&str>, text: &str) -> Reply {
        let code = code.map(str::to_owned);
        Reply::Err {
            code,
            text: text.into(),
        }
    }

    #[test]
    fn encodes_status_lines() {
        assert_eq!(ok("Logging out"), b"+OK Logging out\r\n");
        assert_eq!(ok(""), b"+OK\r\n");
        assert_eq!(err(None, "Unknown command."), b"-ERR Unknown command.\r\n");
        let temp = err(Some("SYS/TEMP"), "Backend unavailable");
        assert_eq!(temp, b"-ERR [SYS/TEMP] Backend unavailable\r\n");
        assert_eq!(err(Some("AUTH"), ""), b"-ERR [AUTH]\r\n");
        assert_eq!(err(Some(" ]["), "x"), b"-ERR x\r\n");
        assert_eq!(err(None, "a\r\nQUIT"), b"-ERR a  QUIT\r\n");
    }

    #[test]
    fn encodes_multiline_with_dot_stuffing() {
        let out = capa(&["USER", ".hidden", "SASL PLAIN LOGIN"]);
        let expected =
            "+OK Capability list follows\r\nUSER\r\n..hidden\r\nSASL PLAIN LOGIN\r\n.\r\n";
        assert_eq!(out, expected.as_bytes());
        assert_eq!(multiline("", &["."]), b"+OK\r\n..\r\n.\r\n");
        assert_eq!(multiline("x", &["a\nb"]), b"+OK x\r\na b\r\n.\r\n");
    }

    #[test]
    fn encodes_continuations() {
        assert_eq!(continuation(""), b"+ \r\n");
        assert_eq!(
            LOGIN_PROMPT_USERNAME,
            continuation("VXNlcm5hbWU6").as_slice()
        );
        assert_eq!(
            LOGIN_PROMPT_PASSWORD,
            continuation("UGFzc3dvcmQ6").as_slice()
        );
    }

    #[test]
    fn decodes_backend_replies() {
        let banner = "+OK [XCLIENT] Dovecot ready.\r\n";
        let expected = ok_reply("[XCLIENT] Dovecot ready.");
        assert_eq!(
            decode_reply(banner.as_bytes()),
            reply(expected, banner.len())
        );
        assert_eq!(decode_reply(b"+OK\r\n"), reply(ok_reply(""), 5));
        assert_eq!(
            decode_reply(b"+ok Logged in.\n"),
            reply(ok_reply("Logged in."), 15)
        );
        let auth = "-ERR [AUTH] Authentication failed.\r\n";
        let expected = err_reply(Some("AUTH"), "Authentication failed.");
        assert_eq!(decode_reply(auth.as_bytes()), reply(expected, auth.len()));
        let temp = b"-ERR [SYS/TEMP] Try later\r\n";
        let expected = err_reply(Some("SYS/TEMP"), "Try later");
        assert_eq!(decode_reply(temp), reply(expected, temp.len()));
        assert_eq!(decode_reply(b"-ERR\r\n"), reply(err_reply(None, ""), 6));
        let odd = b"-ERR [no code here\r\n";
        let expected = err_reply(None, "[no code here");
        assert_eq!(decode_reply(odd), reply(expected, odd.len()));
    }

    #[test]
    fn decodes_continuations() {
        let challenge = Reply::Continue {
            payload: "VXNlcm5hbWU6".into(),
        };
        assert_eq!(decode_reply(LOGIN_PROMPT_USERNAME), reply(challenge, 16));
        let empty = Reply::Continue { payload: "".into() };
        assert_eq!(decode_reply(b"+ \r\n"), reply(empty.clone(), 4));
        assert_eq!(decode_reply(b"+\r\n"), reply(empty, 3));
    }

    #[test]
    fn rejects_malformed_replies() {
        let bad: [&[u8]; 7] = [
            b"+OKAY\r\n",
            b"-ERROR\r\n",
            b"OK\r\n",
            b"\r\n",
            b"+OK caf\xe9\r\n",
            b"+OK a\rb\r\n",
            b"* OK imap?\r\n",
        ];
        for line in bad {
            assert_eq!(decode_reply(line), Err(CodecError::BadReply), "{line:?}");
        }
        let long = vec![b'+'; MAX_LINE];
        assert_eq!(decode_reply(&long), Err(CodecError::LineTooLong));
        assert_eq!(decode_reply(b"+OK\r"), Ok(Decoded::Incomplete));
    }

    #[test]
    fn split_codes() {
        assert_eq!(
            split_response_code("[IN-USE] busy"),
            (Some("IN-USE"), "busy")
        );
        assert_eq!(split_response_code("[AUTH]"), (Some("AUTH"), ""));
        assert_eq!(split_response_code("[] x"), (None, "[] x"));
        assert_eq!(split_response_code("[A B] x"), (None, "[A B] x"));
        assert_eq!(split_response_code("plain"), (None, "plain"));
    }

    #[test]
    fn decodes_multiline_bodies() {
        let body = b"TOP\r\nUSER\r\n..dotted\r\nSASL PLAIN\n.\r\n+OK next";
        let lines = vec![
            "TOP".into(),
            "USER".into(),
            ".dotted".into(),
            "SASL PLAIN".into(),
        ];
        let expected = Ok(Decoded::Complete {
            value: lines,
            consumed: body.len() - 8,
        });
        assert_eq!(decode_multiline(body), expected);
        for end in 0..body.len() - 8 {
            let prefix = body.get(..end).unwrap_or_default();
            assert_eq!(decode_multiline(prefix), Ok(Decoded::Incomplete), "{end}");
        }
        let empty = Ok(Decoded::Complete {
            value: Vec::new(),
            consumed: 3,
        });
        assert_eq!(decode_multiline(b".\r\n"), empty);
    }

    #[test]
    fn multiline_is_bounded() {
        let mut body = "X\r\n".repeat(MAX_MULTILINE_LINES);
        body.push_str(".\r\n");
        let at_bound = decode_multiline(body.as_bytes());
        assert!(matches!(at_bound, Ok(Decoded::Complete { value, .. }) if value.len() == 64));
        let over = "X\r\n".repeat(MAX_MULTILINE_LINES + 1);
        assert_eq!(
            decode_multiline(over.as_bytes()),
            Err(CodecError::TooManyLines)
        );
        let long_line = format!("{}\r\n.\r\n", "X".repeat(MAX_LINE));
        assert_eq!(
            decode_multiline(long_line.as_bytes()),
            Err(CodecError::LineTooLong)
        );
        assert_eq!(
            decode_multiline(b"ok\r\nb\xffd\r\n"),
            Err(CodecError::BadReply)
        );
    }

    #[test]
    fn encoded_replies_decode_back() {
        let lines = ["USER", ".odd", "SASL PLAIN LOGIN", "RESP-CODES"];
        let encoded = capa(&lines);
        let Ok(Decoded::Complete { value, consumed }) = decode_reply(&encoded) else {
            panic!("status line did not decode");
        };
        assert_eq!(value, ok_reply("Capability list follows"));
        let body = encoded.get(consumed..).unwrap_or_default();
        let decoded = decode_multiline(body);
        let expected: Vec<String> = lines.iter().map(|&l| l.to_owned()).collect();
        let len = body.len();
        assert_eq!(
            decoded,
            Ok(Decoded::Complete {
                value: expected,
                consumed: len
            })
        );
        let temp = err(Some("SYS/TEMP"), "down");
        let expected = err_reply(Some("SYS/TEMP"), "down");
        assert_eq!(decode_reply(&temp), reply(expected, temp.len()));
    }
}
