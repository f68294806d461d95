//! SMTP codec, sans-IO: bytes in, values out, no sockets. Nothing here decides what to
//! answer; the session driver does.
//!
//! Owns the client command line (RFC 5321 §4.1, with RFC 1870 SIZE, RFC 6152 8BITMIME,
//! RFC 6531 SMTPUTF8, RFC 3030 BDAT/BINARYMIME, RFC 4954 AUTH and RFC 3207 STARTTLS) in
//! `codec_command.rs`, its paths and ESMTP parameters in `codec_path.rs`, replies in both
//! directions with RFC 3463 / RFC 2034 enhanced status codes — the backend's being SMTP or
//! RFC 2033 LMTP, whose per-recipient replies after DATA are decoded one after another —
//! in `codec_reply.rs`, and the DATA stream in `codec_data.rs`.
//!
//! Written by hand (smtp-proto was read for its edge cases): the edge needs its own bounds
//! and, for DATA, an end-of-data rule stricter than most servers had before the SMTP
//! smuggling advisories of December 2023 (SEC Consult; Postfix, Sendmail, Exim, Cisco):
//! only `CRLF.CRLF` ends a message, and bare CR or LF never reach a backend as such.
//!
//! Command framing: a command line ends in CRLF (RFC 5321 §2.3.8: no other sequence may be
//! recognised as a line terminator) and is at most [`MAX_COMMAND_LINE`] octets with its
//! CRLF. RFC 5321 §4.5.3.1.4 allows 512, but RFC 1870/3461/6531 parameter lists make real
//! commands longer, so the edge accepts 2048 and never buffers more. A bare LF is not a
//! line end: the line up to it is refused with [`CodecError::BareLineFeed`] (resumable, so
//! the driver can answer `500 5.5.2` or close). We refuse rather than accept because what
//! the edge accepts as a command it re-sends to a backend that may frame differently, bare
//! LF is what the smuggling attacks and many bots send, and a strict rule for commands
//! matches the strict rule DATA needs anyway (a lenient command reader next to a strict
//! DATA reader is itself a framing difference). A bare CR is just a control character in
//! the line, refused as a syntax error once the CRLF arrives.
//! PIPELINING (RFC 2920): every decoder reports how much it consumed; the rest is the next
//! command, and BDAT chunk data is never read by [`decode_command`].

use thiserror::Error;

#[path = "codec_command.rs"]
mod command;
#[path = "codec_data.rs"]
mod data;
#[path = "codec_path.rs"]
mod path;
#[path = "codec_reply.rs"]
mod reply;

/// Property checks shared by `cargo test` and the cargo-fuzz target.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
#[path = "codec_props.rs"]
pub mod props;

pub use command::{
    Command, Host, InitialResponse, SaslResponse, decode_command, decode_sasl_response,
};
pub use data::{BareLineEndings, DataReader, DataState, DataVerdict, END_OF_DATA, Feed};
pub use path::{Body, ForwardPath, MailAuth, MailParameters, Parameter, Path, ReversePath};
pub use reply::{
    MAX_ENCODED_REPLY_LINE, MAX_REPLY_LINE, MAX_REPLY_LINES, Reply, decode_reply, ehlo_reply,
    multiline_reply, reply,
};

/// Longest command line, CRLF included, that [`decode_command`] accepts.
pub const MAX_COMMAND_LINE: usize = 2048;

/// HTTP request methods (and the HTTP/2 preface) that open a line no SMTP client sends:
/// a browser, proxy scanner or CONNECT-tunnel probe on a mail port.
const HTTP_METHODS: [&str; 10] = [
    "GET ",
    "HEAD ",
    "POST ",
    "PUT ",
    "DELETE ",
    "OPTIONS ",
    "CONNECT ",
    "PATCH ",
    "TRACE ",
    "PRI * HTTP/2",
];

/// What a decoder made of the bytes so far. `Incomplete` is normal: read more and retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    Incomplete,
    /// `consumed` bytes, terminator included, belong to `value`; the rest is the next one.
    Complete {
        value: T,
        consumed: usize,
    },
}

/// What was wrong with a complete command line, with the reply RFC 5321 suggests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Problem {
    /// Empty line, or a keyword that is not printable ASCII of at most 32 octets.
    #[error("bad command keyword")]
    Verb,
    /// Missing, extra or malformed arguments (also non-UTF-8 or control characters).
    #[error("bad command arguments")]
    Argument,
    /// A MAIL/RCPT path that is not RFC 5321 (RFC 6531) syntax.
    #[error("bad address syntax")]
    Path,
    /// A malformed, duplicated or contradictory ESMTP parameter.
    #[error("bad ESMTP parameter")]
    Parameter,
}

impl Problem {
    /// The reply code and enhanced status code RFC 5321 §4.2.2 / RFC 3463 suggest. For a
    /// bad MAIL path, `5.1.7` (sender) fits better than the `5.1.3` given here.
    pub fn reply_code(self) -> (u16, &'static str) {
        match self {
            Self::Verb => (500, "5.5.2"),
            Self::Argument => (501, "5.5.4"),
            Self::Path => (501, "5.1.3"),
            Self::Parameter => (555, "5.5.4"),
        }
    }
}

/// Why bytes could not be decoded. Errors hold no input: it may hold a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CodecError {
    /// No line end within the decoder's bound. For commands: answer `500 5.5.2 Line too
    /// long`, then close or drop input with [`discard_line`] until the line ends.
    #[error("line over the length bound")]
    LineTooLong,
    /// A command line ended in a bare LF. Drop `skip` octets (the line) to resume.
    #[error("bare LF in a command line")]
    BareLineFeed { skip: usize },
    /// A complete but malformed command line. Drop `skip` octets (the line) to resume.
    #[error("syntax error: {problem}")]
    Syntax { problem: Problem, skip: usize },
    /// A backend reply line that is not `code [SP / -] text`, or whose code changes
    /// within a multi-line reply.
    #[error("malformed reply")]
    BadReply,
    #[error("reply longer than {} lines", MAX_REPLY_LINES)]
    TooManyLines,
}

impl CodecError {
    /// A short, fixed name for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LineTooLong => "line_too_long",
            Self::BareLineFeed { .. } => "bare_line_feed",
            Self::Syntax { .. } => "syntax",
            Self::BadReply => "bad_reply",
            Self::TooManyLines => "too_many_lines",
        }
    }

    /// Octets to drop before decoding the next command, or `None` when there is no line
    /// end to resume at (the driver closes, or discards with [`discard_line`]).
    pub fn resume_at(&self) -> Option<usize> {
        match self {
            Self::BareLineFeed { skip } | Self::Syntax { skip, .. } => Some(*skip),
            Self::LineTooLong | Self::BadReply | Self::TooManyLines => None,
        }
    }
}

/// How much of an over-long line [`discard_line`] dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discarded {
    /// Octets of `buf` to drop.
    pub consumed: usize,
    /// The line ended within them (at any LF, so a resync never waits on a client that
    /// sends bare LF); commands follow. Otherwise keep discarding what comes next.
    pub line_ended: bool,
}

/// Drops the rest of an over-long line after [`CodecError::LineTooLong`], in O(1) memory.
pub fn discard_line(buf: &[u8]) -> Discarded {
    match buf.iter().position(|&byte| byte == b'\n') {
        Some(lf) => Discarded {
            consumed: lf + 1,
            line_ended: true,
        },
        None => Discarded {
            consumed: buf.len(),
            line_ended: false,
        },
    }
}

/// One command line cut from the stream, without its terminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line<'a> {
    Crlf(&'a [u8]),
    BareLf(&'a [u8]),
}

/// The first line of `buf` and the octets it occupies; `None` means no LF yet. Past
/// `bound` octets without an LF that is an error, never growth.
fn take_line(buf: &[u8], bound: usize) -> Result<Option<(Line<'_>, usize)>, CodecError> {
    let window = buf.get(..bound).unwrap_or(buf);
    let Some(lf) = window.iter().position(|&byte| byte == b'\n') else {
        return match buf.len() >= bound {
            true => Err(CodecError::LineTooLong),
            false => Ok(None),
        };
    };
    let text = window.get(..lf).unwrap_or_default();
    let line = match text.strip_suffix(b"\r") {
        Some(text) => Line::Crlf(text),
        None => Line::BareLf(text),
    };
    Ok(Some((line, lf + 1)))
}

/// The HTTP method that opens `line`, if it is an HTTP request line. Case-sensitive, as
/// HTTP methods are; no SMTP command starts like this in any case.
fn http_method(line: &[u8]) -> Option<&'static str> {
    HTTP_METHODS
        .iter()
        .find(|method| line.starts_with(method.as_bytes()))
        .map(|method| method.split(' ').next().unwrap_or(method))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_line_honours_the_bound_exactly() {
        let line = |text: &'static [u8], used| Ok(Some((Line::Crlf(text), used)));
        assert_eq!(take_line(b"abc\r\n", 5), line(b"abc", 5));
        assert_eq!(take_line(b"abc\r\n", 4), Err(CodecError::LineTooLong));
        assert_eq!(take_line(b"abc\r", 5), Ok(None));
        assert_eq!(take_line(b"abcd\r", 5), Err(CodecError::LineTooLong));
        assert_eq!(
            take_line(b"ab\ncd\r\n", 9),
            Ok(Some((Line::BareLf(b"ab"), 3)))
        );
        assert_eq!(take_line(b"\r\n", 9), line(b"", 2));
        assert_eq!(take_line(b"", 9), Ok(None));
    }

    #[test]
    fn discard_line_stops_after_the_first_lf() {
        let ended = |consumed| Discarded {
            consumed,
            line_ended: true,
        };
        assert_eq!(discard_line(b"xxxx\r\nQUIT\r\n"), ended(6));
        assert_eq!(discard_line(b"xx\nQUIT\r\n"), ended(3));
        let open = Discarded {
            consumed: 5,
            line_ended: false,
        };
        assert_eq!(discard_line(b"xxxx\r"), open);
        assert_eq!(discard_line(b"").consumed, 0);
    }

    #[test]
    fn http_methods_are_recognised_case_sensitively() {
        assert_eq!(http_method(b"GET / HTTP/1.1"), Some("GET"));
        assert_eq!(http_method(b"CONNECT mx:25 HTTP/1.1"), Some("CONNECT"));
        assert_eq!(http_method(b"PRI * HTTP/2.0"), Some("PRI"));
        assert_eq!(http_method(b"get / HTTP/1.1"), None);
        assert_eq!(http_method(b"GETX"), None);
        assert_eq!(http_method(b"HELO GET"), None);
    }

    #[test]
    fn errors_say_how_to_resume() {
        let syntax = CodecError::Syntax {
            problem: Problem::Path,
            skip: 7,
        };
        assert_eq!(syntax.resume_at(), Some(7));
        assert_eq!(CodecError::BareLineFeed { skip: 3 }.resume_at(), Some(3));
        for fatal in [
            CodecError::LineTooLong,
            CodecError::BadReply,
            CodecError::TooManyLines,
        ] {
            assert_eq!(fatal.resume_at(), None);
        }
        assert_eq!(syntax.to_string(), "syntax error: bad address syntax");
    }

    #[test]
    fn error_kinds_and_reply_codes_are_distinct() {
        let errors = [
            CodecError::LineTooLong,
            CodecError::BareLineFeed { skip: 1 },
            CodecError::Syntax {
                problem: Problem::Verb,
                skip: 1,
            },
            CodecError::BadReply,
            CodecError::TooManyLines,
        ];
        let mut kinds: Vec<_> = errors.iter().map(CodecError::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), errors.len());
        let problems = [
            Problem::Verb,
            Problem::Argument,
            Problem::Path,
            Problem::Parameter,
        ];
        let mut codes: Vec<_> = problems.iter().map(|p| p.reply_code()).collect();
        codes.dedup();
        assert_eq!(codes.len(), problems.len());
    }
}
