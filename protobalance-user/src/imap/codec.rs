//! IMAP pre-login codec, sans-IO: what the edge hears and says before a login is handed
//! to the owning backend. It decodes client commands (CAPABILITY, NOOP, LOGOUT, STARTTLS,
//! ID, LOGIN, AUTHENTICATE, anything else as `Unknown`), SASL continuation lines and the
//! backend's responses, and encodes server responses and the commands replayed to the
//! backend (ID with the client's address, LOGIN, AUTHENTICATE PLAIN).
//!
//! Grammar: RFC 9051 / RFC 3501 (commands, astrings, literals, responses), RFC 7888
//! (LITERAL+ / LITERAL-), RFC 4959 (SASL-IR), RFC 4616 (PLAIN), RFC 4648 (base64),
//! RFC 2595 (STARTTLS), RFC 2971 (ID), RFC 5530 (response codes).
//!
//! Written by hand rather than with imap-codec (2.0 is alpha): we need a small subset,
//! with our own bounds, and no state beyond the buffer. Every decoder re-parses its
//! buffer from the start, which the bounds below keep cheap; "need more data" is a
//! normal result, never an error. Files: `codec_frame` cuts commands out of the stream
//! (lines, literals, bounds), `codec_parse` reads tokens, `codec_command` the client
//! commands, `codec_response` the backend's lines, `codec_encode` everything we send,
//! `codec_sasl` the SASL parts (base64 is `crate::base64`).

use thiserror::Error;

#[path = "codec_command.rs"]
mod command;
#[path = "codec_encode.rs"]
mod encode;
#[path = "codec_frame.rs"]
mod frame;
#[path = "codec_parse.rs"]
mod parse;
/// Property checks shared by `cargo test` and the cargo-fuzz target.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
#[path = "codec_props.rs"]
pub mod props;
#[path = "codec_response.rs"]
mod response;
#[path = "codec_sasl.rs"]
mod sasl;

pub use command::{Command, CommandKind, InitialResponse, decode_command};
pub use encode::{
    EncodeError, EncodedCommand, LiteralMode, bye, capability_line, continuation,
    encode_authenticate_plain, encode_capability, encode_id, encode_login, encode_logout, greeting,
    tagged, tagged_bad, tagged_no, tagged_ok, untagged,
};
pub use response::{Response, Status, capabilities, decode_response};
pub use sasl::{
    PlainCredentials, SaslError, SaslResponse, decode_sasl_line, encode_plain, parse_plain,
};

/// Octets one command line may take, terminators included and literal data excluded
/// (summed over the pieces of a line that literals split).
pub const MAX_LINE: usize = 8192;
/// Octets one literal may hold; also the RFC 7888 LITERAL- limit.
pub const MAX_LITERAL: usize = 4096;
/// Octets one whole command may take: room for a LOGIN with two maximal literals.
pub const MAX_COMMAND: usize = 2 * MAX_LINE + 2 * MAX_LITERAL;

/// The result of decoding from the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// Read more, then call again with the same buffer plus the new bytes.
    Incomplete,
    /// The buffer ends right after a synchronizing literal announcement `{n}`: send
    /// `+ Ready\r\n` once, read more, then call again with the grown buffer.
    NeedContinuation { tag: String, literal_len: usize },
    /// A whole item, taking the first `consumed` octets of the buffer.
    Complete { value: T, consumed: usize },
}

/// Why a buffer cannot be decoded. Reasons are fixed strings: input (which may hold a
/// password) never ends up in an error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// Malformed input. Answer `tag BAD` (`* BAD` without a tag), drop `skip` octets
    /// (the whole command, literals included) and carry on.
    #[error("syntax error: {reason}")]
    Syntax {
        tag: Option<String>,
        reason: &'static str,
        skip: usize,
    },
    /// A literal over [`MAX_LITERAL`] (or over what is left of [`MAX_COMMAND`]) was
    /// announced. Answer `tag BAD [TOOBIG]`. A synchronizing literal's data is never sent
    /// without our `+`: drop `skip` octets and carry on. A non-synchronizing literal's
    /// data follows and cannot be told from commands: close the connection.
    #[error("literal larger than {} octets", MAX_LITERAL)]
    LiteralTooLarge {
        tag: Option<String>,
        skip: usize,
        synchronizing: bool,
    },
    /// No line end within [`MAX_LINE`] octets, or the command outgrew [`MAX_COMMAND`]:
    /// there is no safe point to resume. Answer `* BAD` and close.
    #[error("line longer than {} octets", MAX_LINE)]
    LineTooLong,
}

impl CodecError {
    /// The tag of the offending command, when it had a valid one.
    pub fn tag(&self) -> Option<&str> {
        match self {
            Self::Syntax { tag, .. } | Self::LiteralTooLarge { tag, .. } => tag.as_deref(),
            Self::LineTooLong => None,
        }
    }

    /// Octets to drop before decoding the next command, or `None` when the stream cannot
    /// be resynchronized and the connection should be closed after the reply.
    pub fn resume_at(&self) -> Option<usize> {
        match self {
            Self::Syntax { skip, .. } => Some(*skip),
            Self::LiteralTooLarge {
                skip,
                synchronizing: true,
                ..
            } => Some(*skip),
            Self::LiteralTooLarge { .. } | Self::LineTooLong => None,
        }
    }
}

/// Whether `tag` is a valid IMAP tag: `1*<any ASTRING-CHAR except "+">`.
pub fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.bytes().all(is_tag_char)
}

/// ATOM-CHAR: any CHAR except atom-specials (`(){ %*"\]`, SP, CTL; 8-bit excluded).
fn is_atom_char(byte: u8) -> bool {
    matches!(byte, 0x21..=0x7e)
        && !matches!(byte, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// ASTRING-CHAR: ATOM-CHAR or `]`.
fn is_astring_char(byte: u8) -> bool {
    is_atom_char(byte) || byte == b']'
}

fn is_tag_char(byte: u8) -> bool {
    is_astring_char(byte) && byte != b'+'
}

/// The end (just past the LF) of the line starting at `start`, if the buffer holds it.
/// The line may take at most `budget` octets including its terminator. A bare LF ends a
/// line too, as Dovecot accepts it; nothing we decode is forwarded verbatim, so this
/// cannot desynchronize us from a backend.
fn line_end(buf: &[u8], start: usize, budget: usize) -> Result<Option<usize>, CodecError> {
    let rest = buf.get(start..).unwrap_or_default();
    let window = rest.get(..budget).unwrap_or(rest);
    match window.iter().position(|&byte| byte == b'\n') {
        Some(at) => Ok(Some(start + at + 1)),
        None if rest.len() >= budget => Err(CodecError::LineTooLong),
        None => Ok(None),
    }
}

/// A line without its LF and the CR before it.
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_grammar() {
        for tag in ["a1", "A001", "x]y", "1", "tag.with-punct!#$&'"] {
            assert!(is_valid_tag(tag), "{tag}");
        }
        for tag in [
            "", "a+1", "*", "a b", "(a", "a{", "a%", "a\"", "a\\", "\u{e9}", "a\r",
        ] {
            assert!(!is_valid_tag(tag), "{tag:?}");
        }
    }

    #[test]
    fn line_end_honours_the_budget_exactly() {
        assert_eq!(line_end(b"abc\r\n", 0, 5), Ok(Some(5)));
        assert_eq!(line_end(b"abc\r\n", 0, 4), Err(CodecError::LineTooLong));
        assert_eq!(line_end(b"abc\r", 0, 5), Ok(None));
        assert_eq!(line_end(b"abcd\r", 0, 5), Err(CodecError::LineTooLong));
        assert_eq!(line_end(b"xxabc\n", 2, 4), Ok(Some(6)));
        assert_eq!(line_end(b"", 3, 4), Ok(None));
    }

    #[test]
    fn errors_say_how_to_resume() {
        let syntax = CodecError::Syntax {
            tag: Some("a".into()),
            reason: "x",
            skip: 7,
        };
        assert_eq!((syntax.tag(), syntax.resume_at()), (Some("a"), Some(7)));
        let sync = CodecError::LiteralTooLarge {
            tag: None,
            skip: 9,
            synchronizing: true,
        };
        assert_eq!((sync.tag(), sync.resume_at()), (None, Some(9)));
        let plus = CodecError::LiteralTooLarge {
            tag: Some("b".into()),
            skip: 9,
            synchronizing: false,
        };
        assert_eq!(plus.resume_at(), None);
        assert_eq!(CodecError::LineTooLong.resume_at(), None);
    }
}
