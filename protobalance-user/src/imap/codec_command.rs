//! Client commands the edge answers itself before login (RFC 9051 §6.1–6.2, RFC 2595
//! STARTTLS, RFC 2971 ID, RFC 4959 SASL-IR). Everything else is `Unknown` and still
//! consumed whole, literals included, so its bytes can never be read as a command.

use super::frame::{Frame, frame_command};
use super::parse::{Parser, Stop};
use super::{CodecError, Decoded};
use crate::base64;
use crate::secret::Secret;

/// RFC 2971 §3.3 limits on what a client may send in ID.
pub(super) const ID_MAX_PAIRS: usize = 30;
pub(super) const ID_MAX_FIELD: usize = 30;
pub(super) const ID_MAX_VALUE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub tag: String,
    pub kind: CommandKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    Capability,
    Noop,
    Logout,
    /// The driver must drop whatever the client pipelined after this command.
    StartTls,
    /// `None` for `ID NIL`; field names as sent (they are case-insensitive).
    Id(Option<Vec<(String, Option<String>)>>),
    Login {
        user: String,
        password: Secret<String>,
    },
    Authenticate {
        /// Upper-cased, e.g. `PLAIN`.
        mechanism: String,
        /// SASL-IR (RFC 4959); `None` when the client waits for our `+`.
        initial: Option<InitialResponse>,
    },
    /// Any other command, name as sent. Its arguments are skipped unparsed; when it ends
    /// in a synchronizing literal it is returned at once, so our tagged reply stands in
    /// for the `+` and the client never sends the literal.
    Unknown {
        name: String,
    },
}

/// A SASL initial response (RFC 4959).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialResponse {
    /// `=`: present but zero-length.
    Empty,
    /// Syntactically valid base64 text, still encoded (see `parse_plain`).
    Base64(Secret<String>),
}

/// Decodes the client command at the start of `buf`. Stateless: call again with the
/// same buffer plus more bytes after `Incomplete` or `NeedContinuation`.
pub fn decode_command(buf: &[u8]) -> Result<Decoded<Command>, CodecError> {
    match frame_command(buf)? {
        Frame::Incomplete => Ok(Decoded::Incomplete),
        Frame::Complete { end } => complete(buf, end),
        Frame::AwaitingLiteral { end, len } => awaiting_literal(buf, end, len),
    }
}

fn complete(buf: &[u8], end: usize) -> Result<Decoded<Command>, CodecError> {
    match parse_command(buf.get(..end).unwrap_or_default()) {
        Ok(value) => Ok(Decoded::Complete {
            value,
            consumed: end,
        }),
        Err((tag, stop)) => Err(syntax(tag, stop, end)),
    }
}

/// The buffer stops where the client waits for `+`: continue only if what came before
/// is a valid start of a command that takes a literal there.
fn awaiting_literal(buf: &[u8], end: usize, len: usize) -> Result<Decoded<Command>, CodecError> {
    match parse_command(buf.get(..end).unwrap_or_default()) {
        Ok(
            value @ Command {
                kind: CommandKind::Unknown { .. },
                ..
            },
        ) => Ok(Decoded::Complete {
            value,
            consumed: end,
        }),
        Ok(value) => Err(syntax(
            Some(value.tag),
            Stop::Syntax("unexpected literal"),
            end,
        )),
        Err((Some(tag), Stop::AwaitLiteral)) => Ok(Decoded::NeedContinuation {
            tag,
            literal_len: len,
        }),
        Err((tag, stop)) => Err(syntax(tag, stop, end)),
    }
}

fn syntax(tag: Option<String>, stop: Stop, skip: usize) -> CodecError {
    let reason = match stop {
        Stop::Syntax(reason) => reason,
        Stop::AwaitLiteral => "truncated literal",
    };
    CodecError::Syntax { tag, reason, skip }
}

fn parse_command(frame: &[u8]) -> Result<Command, (Option<String>, Stop)> {
    let mut parser = Parser::new(frame);
    let tag = parser
        .tag()
        .ok_or((None, Stop::Syntax("missing or invalid tag")))?;
    match parse_kind(&mut parser) {
        Ok(kind) => Ok(Command { tag, kind }),
        Err(stop) => Err((Some(tag), stop)),
    }
}

fn parse_kind(parser: &mut Parser<'_>) -> Result<CommandKind, Stop> {
    let name = match parser.sp().and_then(|()| parser.atom()) {
        Ok(name) => name,
        Err(_) => return Err(Stop::Syntax("missing command")),
    };
    let kind = match name.to_ascii_uppercase().as_str() {
        "CAPABILITY" => CommandKind::Capability,
        "NOOP" => CommandKind::Noop,
        "LOGOUT" => CommandKind::Logout,
        "STARTTLS" => CommandKind::StartTls,
        "ID" => parse_id(parser)?,
        "LOGIN" => parse_login(parser)?,
        "AUTHENTICATE" => parse_authenticate(parser)?,
        _ => return Ok(CommandKind::Unknown { name: name.into() }),
    };
    parser.eol()?;
    Ok(kind)
}

/// `LOGIN SP userid SP password`, both astrings.
fn parse_login(parser: &mut Parser<'_>) -> Result<CommandKind, Stop> {
    parser.sp()?;
    let user = parser.astring()?;
    parser.sp()?;
    let password = Secret::new(parser.astring()?);
    Ok(CommandKind::Login { user, password })
}

/// `AUTHENTICATE SP auth-type [SP (base64 / "=")]`.
fn parse_authenticate(parser: &mut Parser<'_>) -> Result<CommandKind, Stop> {
    parser.sp()?;
    let mechanism = parser.atom()?.to_ascii_uppercase();
    let initial = if parser.at_eol() {
        None
    } else {
        parser.sp()?;
        Some(initial_response(parser)?)
    };
    Ok(CommandKind::Authenticate { mechanism, initial })
}

fn initial_response(parser: &mut Parser<'_>) -> Result<InitialResponse, Stop> {
    let raw = parser.take_while(|byte| !matches!(byte, b'\r' | b'\n'));
    if raw == b"=" {
        return Ok(InitialResponse::Empty);
    }
    match std::str::from_utf8(raw) {
        Ok(text) if !text.is_empty() && base64::is_valid(text) => {
            Ok(InitialResponse::Base64(Secret::new(text.to_owned())))
        }
        _ => Err(Stop::Syntax("invalid base64 initial response")),
    }
}

/// `ID SP ("(" [string SP nstring *(SP string SP nstring)] ")" / NIL)`. `ID ()` is
/// accepted as an empty list (RFC 2971 writes `#(...)`, which allows it).
fn parse_id(parser: &mut Parser<'_>) -> Result<CommandKind, Stop> {
    parser.sp()?;
    if parser.peek() != Some(b'(') {
        parser.nil()?;
        return Ok(CommandKind::Id(None));
    }
    parser.expect(b'(', "expected (")?;
    let mut pairs = Vec::new();
    while parser.peek() != Some(b')') {
        if pairs.len() == ID_MAX_PAIRS {
            return Err(Stop::Syntax("more than 30 ID pairs"));
        }
        pairs.push(id_pair(parser)?);
        if parser.peek() != Some(b')') {
            parser.sp()?;
            if parser.peek() == Some(b')') {
                return Err(Stop::Syntax("expected an ID field"));
            }
        }
    }
    parser.expect(b')', "expected )")?;
    Ok(CommandKind::Id(Some(pairs)))
}

fn id_pair(parser: &mut Parser<'_>) -> Result<(String, Option<String>), Stop> {
    let field = parser.string()?;
    parser.sp()?;
    let value = parser.nstring()?;
    if field.len() > ID_MAX_FIELD || value.as_ref().is_some_and(|v| v.len() > ID_MAX_VALUE) {
        return Err(Stop::Syntax("ID field or value too long"));
    }
    Ok((field, value))
}

#[cfg(test)]
#[path = "codec_command_tests.rs"]
mod tests;
