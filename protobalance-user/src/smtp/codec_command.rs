//! Client commands (RFC 5321 §4.1.1; BDAT from RFC 3030, AUTH from RFC 4954, STARTTLS
//! from RFC 3207) and the SASL response lines a client sends during AUTH (RFC 4954 §4).
//! Verbs are case-insensitive; arguments keep their case. Commands the edge does not know
//! are `Unknown` with a log-safe verb, their arguments unread; HTTP request lines are
//! `NonSmtp`, for the reputation engine (the driver closes).

use std::net::IpAddr;

use super::path::{address_literal, is_domain, parse_mail, parse_rcpt};
use super::{
    CodecError, Decoded, ForwardPath, Line, MAX_COMMAND_LINE, MailParameters, Parameter, Problem,
    ReversePath, http_method, take_line,
};
use crate::base64;
use crate::secret::Secret;

/// Longest command keyword accepted; longer "verbs" are noise, not commands.
const MAX_VERB: usize = 32;
/// Longest SASL mechanism name (RFC 4422 §3.1).
const MAX_MECHANISM: usize = 20;
/// RFC 3030 `chunk-size = 1*DIGIT`; more than 20 digits cannot fit a u64 anyway.
const MAX_CHUNK_DIGITS: usize = 20;

/// Verbs whose arguments are parsed; any other verb is `Unknown`.
const KNOWN_VERBS: [&str; 14] = [
    "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
    "STARTTLS", "AUTH",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo {
        host: Host,
    },
    Helo {
        host: Host,
    },
    Mail {
        from: ReversePath,
        params: MailParameters,
    },
    /// Parameters as sent (RFC 3461 NOTIFY and ORCPT among them), keywords upper-cased.
    Rcpt {
        to: ForwardPath,
        params: Vec<Parameter>,
    },
    /// Answer 354, then read the message with a `DataReader`.
    Data,
    /// RFC 3030: exactly `size` octets of message data follow this line; the driver must
    /// read (or skip) them before decoding the next command, even when it refuses BDAT.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    /// Its optional argument is ignored (RFC 5321 §4.1.1.9).
    Noop,
    Quit,
    Vrfy {
        argument: String,
    },
    Expn {
        argument: String,
    },
    Help {
        topic: Option<String>,
    },
    /// The driver must drop whatever the client pipelined after this (RFC 3207 §6).
    StartTls,
    Auth {
        /// Upper-cased, e.g. `PLAIN`; not checked against what the edge offers.
        mechanism: String,
        initial: Option<InitialResponse>,
    },
    /// Upper-cased keyword, printable ASCII, at most 32 octets: safe to log.
    Unknown {
        verb: String,
    },
    /// An HTTP request line (`method` is e.g. `GET`, `CONNECT`): not an SMTP client.
    NonSmtp {
        method: String,
    },
}

/// The EHLO/HELO argument (RFC 5321 §4.1.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A syntactically valid domain, as sent.
    Domain(String),
    /// An address literal, `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
    Address(IpAddr),
    /// Any other printable text (`my_pc`, `foo bar`, `[junk]`): many real clients send
    /// such names, so it is kept for the driver and reputation to judge, not refused.
    Other(String),
}

/// The host as the client named it: the domain or text as sent, an address literal in
/// RFC 5321 §4.1.3 form.
impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Domain(name) | Self::Other(name) => f.write_str(name),
            Self::Address(IpAddr::V4(ip)) => write!(f, "[{ip}]"),
            Self::Address(IpAddr::V6(ip)) => write!(f, "[IPv6:{ip}]"),
        }
    }
}

/// The optional initial response of `AUTH mechanism initial` (RFC 4954 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialResponse {
    /// `=`: an initial response of zero length.
    Empty,
    /// Syntactically valid base64, not yet decoded; it may hold a password.
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

/// A client line answering a SASL challenge (RFC 4954 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslResponse {
    /// `*`: the client cancels; answer `501 5.7.0`.
    Cancel,
    /// Syntactically valid base64 (possibly empty), not yet decoded.
    Base64(Secret<String>),
}

/// Decodes the first client command in `buf`.
pub fn decode_command(buf: &[u8]) -> Result<Decoded<Command>, CodecError> {
    let Some((line, consumed)) = take_line(buf, MAX_COMMAND_LINE)? else {
        return Ok(Decoded::Incomplete);
    };
    let (Line::Crlf(text) | Line::BareLf(text)) = line;
    if let Some(method) = http_method(text) {
        let value = Command::NonSmtp {
            method: method.to_owned(),
        };
        return Ok(Decoded::Complete { value, consumed });
    }
    if let Line::BareLf(_) = line {
        return Err(CodecError::BareLineFeed { skip: consumed });
    }
    let value = parse_command(text).map_err(|problem| CodecError::Syntax {
        problem,
        skip: consumed,
    })?;
    Ok(Decoded::Complete { value, consumed })
}

/// Decodes one SASL response line in `buf`, framed like a command line.
pub fn decode_sasl_response(buf: &[u8]) -> Result<Decoded<SaslResponse>, CodecError> {
    let Some((line, consumed)) = take_line(buf, MAX_COMMAND_LINE)? else {
        return Ok(Decoded::Incomplete);
    };
    let Line::Crlf(text) = line else {
        return Err(CodecError::BareLineFeed { skip: consumed });
    };
    let syntax = CodecError::Syntax {
        problem: Problem::Argument,
        skip: consumed,
    };
    let text = std::str::from_utf8(text).map_err(|_| syntax)?;
    let value = match text {
        "*" => SaslResponse::Cancel,
        text if base64::is_valid(text) => SaslResponse::Base64(Secret::new(text.to_owned())),
        _ => return Err(syntax),
    };
    Ok(Decoded::Complete { value, consumed })
}

fn parse_command(line: &[u8]) -> Result<Command, Problem> {
    let (verb, args) = match line.iter().position(|&b| b == b' ') {
        Some(space) => (line.get(..space), line.get(space + 1..)),
        None => (Some(line), None),
    };
    let verb = parse_verb(verb.unwrap_or_default())?;
    if !KNOWN_VERBS.contains(&verb.as_str()) {
        return Ok(Command::Unknown { verb });
    }
    let args = argument_text(args.unwrap_or_default())?.trim_matches(' ');
    match verb.as_str() {
        "EHLO" => parse_host(args).map(|host| Command::Ehlo { host }),
        "HELO" => parse_host(args).map(|host| Command::Helo { host }),
        "MAIL" => parse_mail(args).map(|(from, params)| Command::Mail { from, params }),
        "RCPT" => parse_rcpt(args).map(|(to, params)| Command::Rcpt { to, params }),
        "BDAT" => parse_bdat(args),
        "AUTH" => parse_auth(args),
        "VRFY" => required(args).map(|argument| Command::Vrfy { argument }),
        "EXPN" => required(args).map(|argument| Command::Expn { argument }),
        "HELP" => Ok(Command::Help {
            topic: (!args.is_empty()).then(|| args.to_owned()),
        }),
        "NOOP" => Ok(Command::Noop),
        "DATA" => without_arguments(args, Command::Data),
        "RSET" => without_arguments(args, Command::Rset),
        "QUIT" => without_arguments(args, Command::Quit),
        "STARTTLS" => without_arguments(args, Command::StartTls),
        _ => Ok(Command::Unknown { verb: verb.clone() }),
    }
}

fn parse_verb(verb: &[u8]) -> Result<String, Problem> {
    let printable = verb.iter().all(u8::is_ascii_graphic);
    if verb.is_empty() || verb.len() > MAX_VERB || !printable {
        return Err(Problem::Verb);
    }
    Ok(verb
        .iter()
        .map(|&b| char::from(b.to_ascii_uppercase()))
        .collect())
}

/// UTF-8 without control characters (a bare CR or a TAB lands here).
fn argument_text(bytes: &[u8]) -> Result<&str, Problem> {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => Ok(text),
        _ => Err(Problem::Argument),
    }
}

fn required(args: &str) -> Result<String, Problem> {
    match args {
        "" => Err(Problem::Argument),
        args => Ok(args.to_owned()),
    }
}

/// RFC 5321 gives DATA, RSET and QUIT no arguments, RFC 3207 none to STARTTLS: a `501`.
fn without_arguments(args: &str, command: Command) -> Result<Command, Problem> {
    match args {
        "" => Ok(command),
        _ => Err(Problem::Argument),
    }
}

fn parse_host(args: &str) -> Result<Host, Problem> {
    if args.is_empty() {
        return Err(Problem::Argument);
    }
    if let Some(address) = address_literal(args) {
        return Ok(Host::Address(address));
    }
    Ok(match is_domain(args) {
        true => Host::Domain(args.to_owned()),
        false => Host::Other(args.to_owned()),
    })
}

/// `chunk-size [SP "LAST"]` (RFC 3030 §2).
fn parse_bdat(args: &str) -> Result<Command, Problem> {
    let mut words = args.split(' ').filter(|word| !word.is_empty());
    let size = words.next().ok_or(Problem::Argument)?;
    let digits = size.len() <= MAX_CHUNK_DIGITS && size.bytes().all(|b| b.is_ascii_digit());
    let size = match digits {
        true => size.parse().map_err(|_| Problem::Argument)?,
        false => return Err(Problem::Argument),
    };
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(Problem::Argument),
    };
    match words.next() {
        None => Ok(Command::Bdat { size, last }),
        Some(_) => Err(Problem::Argument),
    }
}

/// `mechanism [SP initial-response]` (RFC 4954 §4).
fn parse_auth(args: &str) -> Result<Command, Problem> {
    let (mechanism, initial) = match args.split_once(' ') {
        Some((mechanism, initial)) => (mechanism, Some(initial)),
        None => (args, None),
    };
    let valid_name = mechanism
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if mechanism.is_empty() || mechanism.len() > MAX_MECHANISM || !valid_name {
        return Err(Problem::Argument);
    }
    let initial = match initial {
        None => None,
        Some("=") => Some(InitialResponse::Empty),
        Some(text) if !text.is_empty() && base64::is_valid(text) => {
            Some(InitialResponse::Base64(Secret::new(text.to_owned())))
        }
        Some(_) => return Err(Problem::Argument),
    };
    let mechanism = mechanism.to_ascii_uppercase();
    Ok(Command::Auth { mechanism, initial })
}

#[cfg(test)]
#[path = "codec_command_tests.rs"]
mod tests;
