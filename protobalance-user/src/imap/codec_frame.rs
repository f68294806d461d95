//! Cuts whole commands out of the client's byte stream without understanding them, the
//! way imap-codec's fragmentizer does: a command is a line, or a line ending in a literal
//! announcement `{n}` / `{n+}` (RFC 9051 §4.3, RFC 7888) followed by `n` octets and the
//! rest of the command. This is where the bounds are enforced, so the parser only ever
//! sees a bounded, complete command, or one that stops at a synchronizing literal.

use super::{CodecError, MAX_COMMAND, MAX_LINE, MAX_LITERAL, is_tag_char, line_end, strip_eol};

/// How much of a command the buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Frame {
    Incomplete,
    /// The whole command is `buf[..end]`.
    Complete {
        end: usize,
    },
    /// `buf[..end]` ends with a synchronizing literal announcement of `len` octets and
    /// nothing of the literal has arrived: the client waits for our `+`.
    AwaitingLiteral {
        end: usize,
        len: usize,
    },
}

/// A parsed `number ["+"]` from between a literal's braces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LiteralHeader {
    /// Saturating: an absurd announcement is just "too large".
    pub(super) len: usize,
    pub(super) synchronizing: bool,
}

pub(super) fn frame_command(buf: &[u8]) -> Result<Frame, CodecError> {
    let mut start = 0;
    let mut line_budget = MAX_LINE;
    loop {
        let Some(end) = line_end(buf, start, line_budget)? else {
            return Ok(Frame::Incomplete);
        };
        if end > MAX_COMMAND {
            return Err(CodecError::LineTooLong);
        }
        line_budget = line_budget.saturating_sub(end - start);
        let line = buf.get(start..end).unwrap_or_default();
        let Some(header) = literal_at_end(line) else {
            return Ok(Frame::Complete { end });
        };
        let data_end = end.saturating_add(header.len);
        if header.len > MAX_LITERAL || data_end > MAX_COMMAND {
            return Err(CodecError::LiteralTooLarge {
                tag: leading_tag(buf),
                skip: end,
                synchronizing: header.synchronizing,
            });
        }
        // Even `{0}` waits: the client sends the rest of its line only after our `+`.
        if header.synchronizing && buf.len() == end {
            return Ok(Frame::AwaitingLiteral {
                end,
                len: header.len,
            });
        }
        if buf.len() < data_end {
            return Ok(Frame::Incomplete);
        }
        start = data_end;
    }
}

/// The literal announced at the end of `line`, if it ends in `{digits}` or `{digits+}`.
fn literal_at_end(line: &[u8]) -> Option<LiteralHeader> {
    let body = strip_eol(line).strip_suffix(b"}")?;
    let open = body.iter().rposition(|&byte| byte == b'{')?;
    parse_literal_header(body.get(open + 1..)?)
}

/// `1*DIGIT ["+"]`, the inside of a literal announcement.
pub(super) fn parse_literal_header(inner: &[u8]) -> Option<LiteralHeader> {
    let (digits, synchronizing) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, false),
        None => (inner, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len = digits.iter().fold(0usize, |len, digit| {
        len.saturating_mul(10)
            .saturating_add(usize::from(digit - b'0'))
    });
    Some(LiteralHeader { len, synchronizing })
}

/// The command's tag, if the buffer starts with a valid one (for error replies).
fn leading_tag(buf: &[u8]) -> Option<String> {
    let end = buf
        .iter()
        .position(|&byte| matches!(byte, b' ' | b'\r' | b'\n'))
        .unwrap_or(buf.len());
    let tag = buf.get(..end)?;
    let valid = !tag.is_empty() && tag.iter().all(|&byte| is_tag_char(byte));
    valid.then(|| String::from_utf8_lossy(tag).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_are_whole_commands() {
        assert_eq!(
            frame_command(b"a NOOP\r\nb"),
            Ok(Frame::Complete { end: 8 })
        );
        assert_eq!(frame_command(b"a NOOP\n"), Ok(Frame::Complete { end: 7 }));
        assert_eq!(frame_command(b"a NOOP\r"), Ok(Frame::Incomplete));
        assert_eq!(frame_command(b""), Ok(Frame::Incomplete));
    }

    #[test]
    fn literals_are_followed() {
        let buf = b"a LOGIN {3}\r\nbob {4+}\r\npass\r\nnext";
        assert_eq!(
            frame_command(&buf[..13]),
            Ok(Frame::AwaitingLiteral { end: 13, len: 3 })
        );
        assert_eq!(frame_command(&buf[..14]), Ok(Frame::Incomplete));
        assert_eq!(frame_command(&buf[..27]), Ok(Frame::Incomplete));
        assert_eq!(frame_command(buf), Ok(Frame::Complete { end: 29 }));
        assert_eq!(
            frame_command(b"a X {0}\r\n"),
            Ok(Frame::AwaitingLiteral { end: 9, len: 0 })
        );
        assert_eq!(frame_command(b"a X {0+}\r\n"), Ok(Frame::Incomplete));
        assert_eq!(
            frame_command(b"a X {0+}\r\n\r\n"),
            Ok(Frame::Complete { end: 12 })
        );
    }

    #[test]
    fn not_quite_literals_are_text() {
        for line in [
            &b"a X {}\r\n"[..],
            b"a X {+}\r\n",
            b"a X {1a}\r\n",
            b"a X }\r\n",
        ] {
            assert_eq!(frame_command(line), Ok(Frame::Complete { end: line.len() }));
        }
    }

    #[test]
    fn literal_headers() {
        let header = |len, synchronizing| Some(LiteralHeader { len, synchronizing });
        assert_eq!(parse_literal_header(b"12"), header(12, true));
        assert_eq!(parse_literal_header(b"007+"), header(7, false));
        assert_eq!(
            parse_literal_header(b"99999999999999999999999999"),
            header(usize::MAX, true)
        );
        assert_eq!(parse_literal_header(b"1++"), None);
        assert_eq!(parse_literal_header(b"-1"), None);
    }

    #[test]
    fn the_line_budget_spans_literals() {
        // 9 + 8183 = MAX_LINE octets of line around a 3-octet literal: fits.
        let mut buf = b"a X {3}\r\n".to_vec();
        buf.extend_from_slice(b"abc");
        buf.extend(std::iter::repeat_n(b'x', MAX_LINE - 9 - 2));
        buf.extend_from_slice(b"\r\n");
        assert_eq!(frame_command(&buf), Ok(Frame::Complete { end: buf.len() }));
        buf.insert(12, b'x');
        assert_eq!(frame_command(&buf), Err(CodecError::LineTooLong));
    }

    #[test]
    fn the_command_budget_bounds_literal_chains() {
        let mut buf = Vec::new();
        buf.extend_from_slice(b"t X");
        while buf.len() < MAX_COMMAND - MAX_LITERAL {
            buf.extend_from_slice(b" {4096+}\r\n");
            buf.extend(std::iter::repeat_n(b'a', MAX_LITERAL));
        }
        buf.extend_from_slice(b" {4096+}\r\n");
        assert_eq!(
            frame_command(&buf),
            Err(CodecError::LiteralTooLarge {
                tag: Some("t".into()),
                skip: buf.len(),
                synchronizing: false
            })
        );
    }

    #[test]
    fn leading_tags() {
        assert_eq!(leading_tag(b"a1 LOGIN"), Some("a1".into()));
        assert_eq!(leading_tag(b"a1\r\n"), Some("a1".into()));
        assert_eq!(leading_tag(b"a+1 LOGIN"), None);
        assert_eq!(leading_tag(b" LOGIN"), None);
    }
}
