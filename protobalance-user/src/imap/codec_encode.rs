//! Everything the edge writes: server responses to the client (RFC 9051 §7) and the
//! commands it replays to the backend (ID per RFC 2971, LOGIN, AUTHENTICATE PLAIN with
//! or without SASL-IR per RFC 4959, literals per RFC 7888). Server text is made safe
//! (CR, LF, NUL become spaces) so no argument can inject a line; client commands refuse
//! what cannot be encoded instead.

use thiserror::Error;

use super::command::{ID_MAX_FIELD, ID_MAX_PAIRS, ID_MAX_VALUE};
use super::is_valid_tag;
use super::response::Status;
use crate::base64;
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("invalid tag")]
    InvalidTag,
    #[error("NUL cannot be sent in an IMAP string")]
    Nul,
    #[error("ID strings must be printable ASCII")]
    UnquotableIdString,
    #[error("ID exceeds RFC 2971 limits (30 pairs, 30-octet fields, 1024-octet values)")]
    IdTooLarge,
    #[error("initial response is not base64")]
    InvalidBase64,
}

/// How to send a string that must be a literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiteralMode {
    /// `{n}`: wait for the backend's `+` before the data. Always allowed.
    Synchronizing,
    /// `{n+}`: only if the backend advertised LITERAL+ (or LITERAL- and the literal is at
    /// most 4096 octets, which all strings `decode_command` yields are).
    NonSynchronizing,
}

/// A command for the backend, in fragments. Write the first; before each further one,
/// read the backend's `+` continuation (a tagged NO/BAD instead ends the command).
/// Fragments are `Secret`s: they may hold a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedCommand {
    fragments: Vec<Secret<Vec<u8>>>,
}

impl EncodedCommand {
    pub fn fragments(&self) -> &[Secret<Vec<u8>>] {
        &self.fragments
    }

    /// Whether the driver must wait for `+` between fragments.
    pub fn needs_continuation(&self) -> bool {
        self.fragments.len() > 1
    }
}

/// Builds an [`EncodedCommand`], cutting a fragment after each synchronizing literal.
struct Fragments {
    done: Vec<Secret<Vec<u8>>>,
    current: Vec<u8>,
}

impl Fragments {
    fn new(tag: &str, command: &str) -> Result<Self, EncodeError> {
        if !is_valid_tag(tag) {
            return Err(EncodeError::InvalidTag);
        }
        let current = format!("{tag} {command}").into_bytes();
        Ok(Self {
            done: Vec::new(),
            current,
        })
    }

    fn push(&mut self, bytes: &[u8]) {
        self.current.extend_from_slice(bytes);
    }

    /// A quoted string when every octet is printable ASCII (valid for IMAP4rev1 and
    /// IMAP4rev2 alike), otherwise a literal. NUL cannot be sent at all.
    fn astring(&mut self, text: &str, mode: LiteralMode) -> Result<(), EncodeError> {
        if text.contains('\0') {
            return Err(EncodeError::Nul);
        }
        if is_quotable(text) {
            push_quoted(&mut self.current, text);
            return Ok(());
        }
        let plus = if mode == LiteralMode::NonSynchronizing {
            "+"
        } else {
            ""
        };
        self.push(format!("{{{}{plus}}}\r\n", text.len()).as_bytes());
        if mode == LiteralMode::Synchronizing {
            self.cut();
        }
        self.push(text.as_bytes());
        Ok(())
    }

    fn cut(&mut self) {
        let fragment = std::mem::take(&mut self.current);
        self.done.push(Secret::new(fragment));
    }

    fn finish(mut self) -> EncodedCommand {
        self.push(b"\r\n");
        self.cut();
        EncodedCommand {
            fragments: self.done,
        }
    }
}

fn is_quotable(text: &str) -> bool {
    text.bytes().all(|byte| matches!(byte, 0x20..=0x7e))
}

fn push_quoted(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for byte in text.bytes() {
        if matches!(byte, b'"' | b'\\') {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out.push(b'"');
}

/// `tag LOGIN user password`, each quoted when possible, else a literal sent per `mode`.
pub fn encode_login(
    tag: &str,
    user: &str,
    password: &Secret<String>,
    mode: LiteralMode,
) -> Result<EncodedCommand, EncodeError> {
    let mut command = Fragments::new(tag, "LOGIN ")?;
    command.astring(user, mode)?;
    command.push(b" ");
    command.astring(password.expose(), mode)?;
    Ok(command.finish())
}

/// `tag AUTHENTICATE PLAIN <b64>` with SASL-IR (`=` when empty); without it, the command
/// and then, after the backend's `+`, the base64 line.
pub fn encode_authenticate_plain(
    tag: &str,
    initial_b64: &Secret<String>,
    sasl_ir: bool,
) -> Result<EncodedCommand, EncodeError> {
    let b64 = initial_b64.expose();
    if !base64::is_valid(b64) {
        return Err(EncodeError::InvalidBase64);
    }
    let mut command = Fragments::new(tag, "AUTHENTICATE PLAIN")?;
    if sasl_ir {
        command.push(b" ");
        command.push(if b64.is_empty() { b"=" } else { b64.as_bytes() });
    } else {
        command.push(b"\r\n");
        command.cut();
        command.push(b64.as_bytes());
    }
    Ok(command.finish())
}

/// `tag ID (...)`, or `tag ID NIL` for no pairs. Strings are quoted, so they must be
/// printable ASCII; RFC 2971 size limits are enforced so the backend will not refuse.
pub fn encode_id(tag: &str, pairs: &[(&str, Option<&str>)]) -> Result<Vec<u8>, EncodeError> {
    if !is_valid_tag(tag) {
        return Err(EncodeError::InvalidTag);
    }
    let too_large = pairs.len() > ID_MAX_PAIRS
        || pairs.iter().any(|(field, value)| {
            field.len() > ID_MAX_FIELD || value.is_some_and(|value| value.len() > ID_MAX_VALUE)
        });
    if too_large {
        return Err(EncodeError::IdTooLarge);
    }
    let mut out = format!("{tag} ID ").into_bytes();
    if pairs.is_empty() {
        out.extend_from_slice(b"NIL\r\n");
        return Ok(out);
    }
    out.push(b'(');
    for (index, (field, value)) in pairs.iter().enumerate() {
        if index > 0 {
            out.push(b' ');
        }
        push_id_string(&mut out, field)?;
        out.push(b' ');
        match value {
            Some(value) => push_id_string(&mut out, value)?,
            None => out.extend_from_slice(b"NIL"),
        }
    }
    out.extend_from_slice(b")\r\n");
    Ok(out)
}

fn push_id_string(out: &mut Vec<u8>, text: &str) -> Result<(), EncodeError> {
    if !is_quotable(text) {
        return Err(EncodeError::UnquotableIdString);
    }
    push_quoted(out, text);
    Ok(())
}

pub fn encode_capability(tag: &str) -> Result<Vec<u8>, EncodeError> {
    simple_command(tag, "CAPABILITY")
}

pub fn encode_logout(tag: &str) -> Result<Vec<u8>, EncodeError> {
    simple_command(tag, "LOGOUT")
}

fn simple_command(tag: &str, name: &str) -> Result<Vec<u8>, EncodeError> {
    if !is_valid_tag(tag) {
        return Err(EncodeError::InvalidTag);
    }
    Ok(format!("{tag} {name}\r\n").into_bytes())
}

/// `* <text>`.
pub fn untagged(text: &str) -> Vec<u8> {
    response("*", None, text)
}

/// `* OK [CAPABILITY ...] <text>`, the greeting.
pub fn greeting(caps: &[&str], text: &str) -> Vec<u8> {
    response(
        "* OK",
        Some(&format!("CAPABILITY {}", caps.join(" "))),
        text,
    )
}

/// `* CAPABILITY ...`, the answer to CAPABILITY before its tagged OK.
pub fn capability_line(caps: &[&str]) -> Vec<u8> {
    response("* CAPABILITY", None, &caps.join(" "))
}

/// `* BYE <text>`, before closing.
pub fn bye(text: &str) -> Vec<u8> {
    response("* BYE", None, text)
}

/// `+ <text>`, asking for a literal or the next SASL line.
pub fn continuation(text: &str) -> Vec<u8> {
    response("+", None, text)
}

/// `<tag> <status> [<code>] <text>`. `tag` should come from a decoded command; use
/// [`untagged`] with `BAD ...` when the command had no valid tag.
pub fn tagged(tag: &str, status: Status, code: Option<&str>, text: &str) -> Vec<u8> {
    response(&format!("{tag} {}", status.as_str()), code, text)
}

pub fn tagged_ok(tag: &str, code: Option<&str>, text: &str) -> Vec<u8> {
    tagged(tag, Status::Ok, code, text)
}

pub fn tagged_no(tag: &str, code: Option<&str>, text: &str) -> Vec<u8> {
    tagged(tag, Status::No, code, text)
}

pub fn tagged_bad(tag: &str, code: Option<&str>, text: &str) -> Vec<u8> {
    tagged(tag, Status::Bad, code, text)
}

/// `<head> [<code>] <text>\r\n`, with CR, LF and NUL turned into spaces.
fn response(head: &str, code: Option<&str>, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + text.len() + 32);
    push_safe(&mut out, head);
    out.push(b' ');
    if let Some(code) = code {
        out.push(b'[');
        push_safe(&mut out, code);
        out.extend_from_slice(b"] ");
    }
    push_safe(&mut out, text);
    out.extend_from_slice(b"\r\n");
    out
}

fn push_safe(out: &mut Vec<u8>, text: &str) {
    out.extend(text.bytes().map(|byte| match byte {
        b'\r' | b'\n' | 0 => b' ',
        other => other,
    }));
}

#[cfg(test)]
#[path = "codec_encode_tests.rs"]
mod tests;
