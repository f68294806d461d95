//! POP3 pre-login codec, sans-IO: bytes in, values out, no sockets.
//!
//! Owns the line framing shared by both directions, the client commands the edge answers
//! before login (RFC 1939 USER/PASS/QUIT/NOOP/APOP, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034
//! AUTH), SASL PLAIN/LOGIN payloads and base64 (`codec_sasl.rs`), the replies the edge sends
//! and the backend replies it parses, with RFC 3206 response codes (`codec_reply.rs`), and
//! the commands that replay a login to the backend, Dovecot's XCLIENT included
//! (`codec_replay.rs`). Nothing here decides what to answer; the session driver does.
//!
//! Framing: a line ends in CRLF or a bare LF; a bare CR never ends a line. A line,
//! terminator included, is at most [`MAX_LINE`] octets. RFC 2449 caps commands at 255
//! octets, but AUTH initial responses and SASL lines are longer in practice (RFC 5034), so
//! the edge accepts 1024, like Dovecot's login processes, and never buffers more.

#[path = "codec_replay.rs"]
mod replay;
#[path = "codec_reply.rs"]
mod reply;
#[path = "codec_sasl.rs"]
mod sasl;

/// Property checks shared by `cargo test` and the cargo-fuzz target.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
#[path = "codec_props.rs"]
pub mod props;

pub use replay::{
    RFC2449_MAX_COMMAND, encode_auth_plain, encode_capa, encode_pass, encode_quit,
    encode_sasl_response, encode_stls, encode_user, encode_xclient,
};
pub use reply::{
    LOGIN_PROMPT_PASSWORD, LOGIN_PROMPT_USERNAME, MAX_MULTILINE_LINES, Reply, capa, continuation,
    decode_multiline, decode_reply, err, multiline, ok, split_response_code,
};
pub use sasl::{
    PlainCredentials, SaslLine, decode_base64, decode_sasl_line, decode_sasl_text, encode_base64,
    encode_plain, parse_plain,
};

use crate::secret::Secret;

/// Longest line, terminator included, that any decoder here accepts.
pub const MAX_LINE: usize = 1024;

/// Longest command keyword accepted; longer "verbs" are noise, not commands.
const MAX_VERB: usize = 32;

/// Longest SASL mechanism name (RFC 4422 §3.1).
const MAX_MECHANISM: usize = 20;

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

/// Why bytes could not be decoded or a value could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("line longer than {} octets", MAX_LINE)]
    LineTooLong,
    #[error(
        "command keyword is not printable ASCII of at most {} octets",
        MAX_VERB
    )]
    BadCommand,
    #[error("argument is not UTF-8 text without control characters")]
    BadArgument,
    #[error("{0} needs an argument")]
    MissingArgument(&'static str),
    #[error("invalid base64")]
    BadBase64,
    #[error("malformed SASL response")]
    BadSaslPayload,
    #[error("malformed reply")]
    BadReply,
    #[error("multi-line response longer than {} lines", MAX_MULTILINE_LINES)]
    TooManyLines,
    #[error("cannot encode {0} as one safe protocol line")]
    CannotEncode(&'static str),
}

impl CodecError {
    /// A short, fixed name for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LineTooLong => "line_too_long",
            Self::BadCommand => "bad_command",
            Self::BadArgument => "bad_argument",
            Self::MissingArgument(_) => "missing_argument",
            Self::BadBase64 => "bad_base64",
            Self::BadSaslPayload => "bad_sasl_payload",
            Self::BadReply => "bad_reply",
            Self::TooManyLines => "too_many_lines",
            Self::CannotEncode(_) => "cannot_encode",
        }
    }
}

/// A client command before login. Anything the edge does not handle is `Unknown`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    User(String),
    Pass(Secret<String>),
    /// `mechanism` is upper-cased; it is not checked against what the edge offers.
    Auth {
        mechanism: String,
        initial: Option<InitialResponse>,
    },
    /// `AUTH` without a mechanism: old clients (and Dovecot) expect the mechanism list as a
    /// multi-line `+OK` reply.
    AuthList,
    Capa,
    Stls,
    Quit,
    Noop,
    /// Never supported; its arguments are dropped unread.
    Apop,
    /// Upper-cased keyword, printable ASCII, at most 32 octets: safe to log.
    Unknown {
        verb: String,
    },
    Empty,
}

/// The optional initial response of `AUTH mechanism initial` (RFC 5034 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialResponse {
    /// `=`: an initial response of zero length.
    Empty,
    /// Base64 text, not yet decoded; it may hold a password.
    Base64(Secret<String>),
}

impl InitialResponse {
    /// The base64 text to decode (empty for `=`).
    pub fn payload(&self) -> &str {
        match self {
            Self::Empty => "",
            Self::Base64(text) => text.expose(),
        }
    }
}

/// Decodes the first client command in `buf`.
pub fn decode_command(buf: &[u8]) -> Result<Decoded<Command>, CodecError> {
    let Some((line, consumed)) = take_line(buf)? else {
        return Ok(Decoded::Incomplete);
    };
    let value = parse_command(line)?;
    Ok(Decoded::Complete { value, consumed })
}

/// The first line of `buf` without its terminator, and the octets it occupies.
/// `None` means no line end yet; past [`MAX_LINE`] octets that is an error, never growth.
fn take_line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, CodecError> {
    let window = buf.get(..MAX_LINE).unwrap_or(buf);
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) => {
            let line = window.get(..lf).unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Ok(Some((line, lf + 1)))
        }
        None if buf.len() >= MAX_LINE => Err(CodecError::LineTooLong),
        None => Ok(None),
    }
}

/// UTF-8 without control characters: what may be logged, replayed or put on one line.
fn is_plain_text(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

fn text_argument(bytes: &[u8]) -> Result<&str, CodecError> {
    match std::str::from_utf8(bytes) {
        Ok(text) if is_plain_text(text) => Ok(text),
        _ => Err(CodecError::BadArgument),
    }
}

fn parse_command(line: &[u8]) -> Result<Command, CodecError> {
    if line.iter().all(|&b| b == b' ') {
        return Ok(Command::Empty);
    }
    let (verb, args) = match line.iter().position(|&b| b == b' ') {
        Some(space) => (line.get(..space), line.get(space + 1..)),
        None => (Some(line), None),
    };
    let verb = parse_verb(verb.unwrap_or_default())?;
    let args = args.map(text_argument).transpose()?;
    Ok(match verb.as_str() {
        "USER" => parse_user(args)?,
        "PASS" => parse_pass(args)?,
        "AUTH" => parse_auth(args)?,
        // RFC 1939 gives these no arguments; like Dovecot, ignore any that come along.
        "CAPA" => Command::Capa,
        "STLS" => Command::Stls,
        "QUIT" => Command::Quit,
        "NOOP" => Command::Noop,
        "APOP" => Command::Apop,
        _ => Command::Unknown { verb },
    })
}

fn parse_verb(verb: &[u8]) -> Result<String, CodecError> {
    let printable = verb.iter().all(u8::is_ascii_graphic);
    if verb.is_empty() || verb.len() > MAX_VERB || !printable {
        return Err(CodecError::BadCommand);
    }
    Ok(verb
        .iter()
        .map(|&b| char::from(b.to_ascii_uppercase()))
        .collect())
}

fn parse_user(args: Option<&str>) -> Result<Command, CodecError> {
    match args.map(|name| name.trim_end_matches(' ')) {
        Some(name) if !name.is_empty() => Ok(Command::User(name.to_owned())),
        _ => Err(CodecError::MissingArgument("USER")),
    }
}

/// The rest of the line, verbatim: passwords may hold (and begin or end with) spaces.
fn parse_pass(args: Option<&str>) -> Result<Command, CodecError> {
    match args {
        Some(password) if !password.is_empty() => {
            Ok(Command::Pass(Secret::new(password.to_owned())))
        }
        _ => Err(CodecError::MissingArgument("PASS")),
    }
}

fn parse_auth(args: Option<&str>) -> Result<Command, CodecError> {
    let args = args.unwrap_or_default().trim_end_matches(' ');
    if args.is_empty() {
        return Ok(Command::AuthList);
    }
    let (mechanism, initial) = match args.split_once(' ') {
        Some((mechanism, initial)) => (mechanism, Some(initial)),
        None => (args, None),
    };
    let valid_name = mechanism
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if mechanism.len() > MAX_MECHANISM || !valid_name {
        return Err(CodecError::BadArgument);
    }
    let initial = match initial {
        None => None,
        Some("=") => Some(InitialResponse::Empty),
        Some(text) if !text.is_empty() && !text.contains(' ') => {
            Some(InitialResponse::Base64(Secret::new(text.to_owned())))
        }
        Some(_) => return Err(CodecError::BadArgument),
    };
    let mechanism = mechanism.to_ascii_uppercase();
    Ok(Command::Auth { mechanism, initial })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(value: Command, consumed: usize) -> Result<Decoded<Command>, CodecError> {
        Ok(Decoded::Complete { value, consumed })
    }

    fn decode(line: &str) -> Result<Decoded<Command>, CodecError> {
        decode_command(line.as_bytes())
    }

    fn secret(text: &str) -> Secret<String> {
        Secret::new(text.to_owned())
    }

    #[test]
    fn every_command() {
        let user = Command::User("bob@example.org".into());
        assert_eq!(decode("USER bob@example.org\r\n"), complete(user, 22));
        let pass = Command::Pass(secret("pw"));
        assert_eq!(decode("PASS pw\r\n"), complete(pass, 9));
        assert_eq!(decode("CAPA\r\n"), complete(Command::Capa, 6));
        assert_eq!(decode("STLS\r\n"), complete(Command::Stls, 6));
        assert_eq!(decode("QUIT\r\n"), complete(Command::Quit, 6));
        assert_eq!(decode("NOOP\r\n"), complete(Command::Noop, 6));
        let apop = "APOP bob c4c9334bac560ecc979e58001b3e22fb\r\n";
        assert_eq!(decode(apop), complete(Command::Apop, apop.len()));
        assert_eq!(decode("AUTH\r\n"), complete(Command::AuthList, 6));
        assert_eq!(decode("\r\n"), complete(Command::Empty, 2));
        assert_eq!(decode("   \n"), complete(Command::Empty, 4));
        let list = Command::Unknown {
            verb: "LIST".into(),
        };
        assert_eq!(decode("list 1\r\n"), complete(list, 8));
    }

    #[test]
    fn verbs_are_case_insensitive() {
        for verb in ["capa", "CAPA", "Capa", "cApA"] {
            let line = format!("{verb}\r\n");
            assert_eq!(decode(&line), complete(Command::Capa, 6));
        }
        let user = Command::User("Bob".into());
        assert_eq!(
            decode("uSeR Bob\r\n"),
            complete(user, 10),
            "argument keeps its case"
        );
        let auth = Command::Auth {
            mechanism: "PLAIN".into(),
            initial: None,
        };
        assert_eq!(decode("auth plain\r\n"), complete(auth, 12));
    }

    #[test]
    fn user_trims_trailing_spaces_and_needs_a_name() {
        let user = Command::User("bob".into());
        assert_eq!(decode("USER bob   \r\n"), complete(user, 13));
        assert_eq!(decode("USER\r\n"), Err(CodecError::MissingArgument("USER")));
        assert_eq!(
            decode("USER   \r\n"),
            Err(CodecError::MissingArgument("USER"))
        );
    }

    #[test]
    fn pass_keeps_the_rest_of_the_line_verbatim() {
        let pass = Command::Pass(secret(" two words "));
        assert_eq!(decode("PASS  two words \r\n"), complete(pass, 18));
        assert_eq!(decode("PASS\r\n"), Err(CodecError::MissingArgument("PASS")));
        assert_eq!(
            decode("PASS \r\n"),
            Err(CodecError::MissingArgument("PASS"))
        );
        let utf8 = Command::Pass(secret("pässwörd"));
        assert_eq!(decode("PASS pässwörd\n"), complete(utf8, 16));
    }

    #[test]
    fn auth_initial_responses() {
        let auth = |mechanism: &str, initial| Command::Auth {
            mechanism: mechanism.into(),
            initial,
        };
        let plain = Some(InitialResponse::Base64(secret("AGJvYgBwdw==")));
        assert_eq!(
            decode("AUTH PLAIN AGJvYgBwdw==\r\n"),
            complete(auth("PLAIN", plain), 25)
        );
        let empty = Some(InitialResponse::Empty);
        assert_eq!(
            decode("AUTH PLAIN =\r\n"),
            complete(auth("PLAIN", empty), 14)
        );
        let login = Some(InitialResponse::Base64(secret("Ym9i")));
        assert_eq!(
            decode("AUTH login Ym9i\r\n"),
            complete(auth("LOGIN", login), 17)
        );
        let cram = auth("CRAM-MD5", None);
        assert_eq!(decode("AUTH CRAM-MD5 \r\n"), complete(cram, 16));
    }

    #[test]
    fn auth_rejects_malformed_arguments() {
        assert_eq!(decode("AUTH PL@IN\r\n"), Err(CodecError::BadArgument));
        assert_eq!(decode("AUTH PLAIN a b\r\n"), Err(CodecError::BadArgument));
        assert_eq!(decode("AUTH PLAIN  a\r\n"), Err(CodecError::BadArgument));
        let long = format!("AUTH {}\r\n", "X".repeat(MAX_MECHANISM + 1));
        assert_eq!(decode(&long), Err(CodecError::BadArgument));
    }

    #[test]
    fn initial_response_payload() {
        assert_eq!(InitialResponse::Empty.payload(), "");
        assert_eq!(InitialResponse::Base64(secret("QQ==")).payload(), "QQ==");
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let lines = ["PASS hunter2\r\n", "AUTH PLAIN AGJvYgBodW50ZXIy\r\n"];
        for line in lines {
            let decoded = decode(line);
            let shown = format!("{decoded:?}");
            assert!(shown.contains("<redacted>"), "{shown}");
            assert!(!shown.contains("hunter2") && !shown.contains("AGJvYgBodW50ZXIy"));
        }
    }

    #[test]
    fn incomplete_at_every_split_point() {
        let stream = b"USER bob\r\nPASS s3cret word\r\nAUTH PLAIN =\nQUIT\r\n";
        let expected = [
            (Command::User("bob".into()), 10),
            (Command::Pass(secret("s3cret word")), 18),
            (
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some(InitialResponse::Empty),
                },
                13,
            ),
            (Command::Quit, 6),
        ];
        let mut start = 0;
        for (value, consumed) in expected {
            for end in start..start + consumed {
                let prefix = stream.get(start..end).unwrap_or_default();
                assert_eq!(decode_command(prefix), Ok(Decoded::Incomplete), "{end}");
            }
            let rest = stream.get(start..).unwrap_or_default();
            assert_eq!(decode_command(rest), complete(value, consumed));
            start += consumed;
        }
        assert_eq!(start, stream.len());
    }

    #[test]
    fn pipelined_commands_decode_one_at_a_time() {
        let buf = b"CAPA\r\nUSER bob\r\nPASS x\r\n";
        assert_eq!(decode_command(buf), complete(Command::Capa, 6));
        let rest = buf.get(6..).unwrap_or_default();
        assert_eq!(
            decode_command(rest),
            complete(Command::User("bob".into()), 10)
        );
    }

    #[test]
    fn line_too_long_exactly_at_the_bound() {
        let longest = format!("USER {}\r\n", "a".repeat(MAX_LINE - 7));
        assert_eq!(longest.len(), MAX_LINE);
        assert!(matches!(
            decode(&longest),
            Ok(Decoded::Complete {
                consumed: MAX_LINE,
                ..
            })
        ));
        let over = format!("USER {}\r\n", "a".repeat(MAX_LINE - 6));
        assert_eq!(decode(&over), Err(CodecError::LineTooLong));
        let unterminated = "a".repeat(MAX_LINE - 1);
        assert_eq!(decode(&unterminated), Ok(Decoded::Incomplete));
        let full = "a".repeat(MAX_LINE);
        assert_eq!(decode(&full), Err(CodecError::LineTooLong));
        let huge = "a".repeat(MAX_LINE * 4);
        assert_eq!(decode(&huge), Err(CodecError::LineTooLong));
    }

    #[test]
    fn bare_cr_never_ends_a_line() {
        assert_eq!(decode("QUIT\r"), Ok(Decoded::Incomplete));
        assert_eq!(decode("USER bob\rQUIT"), Ok(Decoded::Incomplete));
        assert_eq!(decode("USER bob\rQUIT\r\n"), Err(CodecError::BadArgument));
        assert_eq!(decode("QUIT\r\r\n"), Err(CodecError::BadCommand));
        let cr_flood = "\r".repeat(MAX_LINE);
        assert_eq!(decode(&cr_flood), Err(CodecError::LineTooLong));
    }

    #[test]
    fn bare_lf_ends_a_line() {
        assert_eq!(decode("QUIT\nCAPA\n"), complete(Command::Quit, 5));
    }

    #[test]
    fn rejects_non_utf8_and_control_characters() {
        assert_eq!(
            decode_command(b"USER b\xffb\r\n"),
            Err(CodecError::BadArgument)
        );
        assert_eq!(
            decode_command(b"PASS \xc3\r\n"),
            Err(CodecError::BadArgument)
        );
        assert_eq!(
            decode_command(b"PASS a\tb\r\n"),
            Err(CodecError::BadArgument)
        );
        assert_eq!(
            decode_command(b"USER a\x00\r\n"),
            Err(CodecError::BadArgument)
        );
        assert_eq!(
            decode_command(b"USER a\xc2\x85\r\n"),
            Err(CodecError::BadArgument)
        );
        assert_eq!(
            decode_command(b"\xffUSER a\r\n"),
            Err(CodecError::BadCommand)
        );
        assert_eq!(
            decode_command(b"\x16\x03\x01\n"),
            Err(CodecError::BadCommand)
        );
    }

    #[test]
    fn bad_keywords() {
        assert_eq!(decode(" USER bob\r\n"), Err(CodecError::BadCommand));
        assert_eq!(decode("QUIT\t\r\n"), Err(CodecError::BadCommand));
        let long = format!("{}\r\n", "X".repeat(MAX_VERB + 1));
        assert_eq!(decode(&long), Err(CodecError::BadCommand));
        let longest = format!("{}\r\n", "x".repeat(MAX_VERB));
        let verb = "X".repeat(MAX_VERB);
        assert_eq!(
            decode(&longest),
            complete(Command::Unknown { verb }, MAX_VERB + 2)
        );
    }

    #[test]
    fn arguments_of_argumentless_commands_are_ignored() {
        assert_eq!(decode("CAPA now\r\n"), complete(Command::Capa, 10));
        assert_eq!(decode("QUIT \r\n"), complete(Command::Quit, 7));
    }

    #[test]
    fn client_xclient_is_just_unknown() {
        let xclient = "XCLIENT ADDR=10.0.0.1\r\n";
        let verb = "XCLIENT".to_owned();
        assert_eq!(
            decode(xclient),
            complete(Command::Unknown { verb }, xclient.len())
        );
    }

    #[test]
    fn error_kinds_are_distinct() {
        let errors = [
            CodecError::LineTooLong,
            CodecError::BadCommand,
            CodecError::BadArgument,
            CodecError::MissingArgument("USER"),
            CodecError::BadBase64,
            CodecError::BadSaslPayload,
            CodecError::BadReply,
            CodecError::TooManyLines,
            CodecError::CannotEncode("USER"),
        ];
        let mut kinds: Vec<_> = errors.iter().map(CodecError::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), errors.len());
        assert_eq!(
            CodecError::LineTooLong.to_string(),
            "line longer than 1024 octets"
        );
    }
}
