//! Commands the edge sends to a backend to replay a client's login: USER/PASS (RFC 1939),
//! AUTH PLAIN (RFC 5034, RFC 4616), CAPA, STLS, QUIT, and Dovecot's XCLIENT.
//!
//! XCLIENT, as Dovecot's pop3-login parses it: `XCLIENT` then space-separated `KEY=value`
//! pairs, keys case-insensitive: `ADDR` (IPv4 or bare IPv6), `PORT` (1–65535), `SESSION`
//! (at most 64 octets), `TTL` and `FORWARD` (base64). It is honoured only from
//! `login_trusted_networks`; Dovecot's banner then starts `+OK [XCLIENT]`. Untrusted
//! peers get `-ERR` or, from newer versions, `+OK ... ignoring`, so a `+OK` alone does not
//! prove the address was taken: check the banner. A wrong value fails the whole command.
//!
//! Every encoder refuses (rather than sends) an argument that would end the line early or
//! smuggle a second command: control characters, empty values, lines over [`MAX_LINE`].

use std::net::IpAddr;

use super::{CodecError, MAX_LINE, is_plain_text};
use crate::secret::Secret;

/// RFC 2449 §4 command length limit, CRLF included. The edge accepts more from clients
/// (see [`MAX_LINE`]); a driver replaying a long PLAIN response to a backend that enforces
/// this limit should use `encode_auth_plain(None)` and then [`encode_sasl_response`].
pub const RFC2449_MAX_COMMAND: usize = 255;

/// Longest session id Dovecot keeps (`LOGIN_MAX_SESSION_ID_LEN`); longer ones it ignores.
const MAX_SESSION_ID: usize = 64;

/// `USER name\r\n`. Trailing spaces are refused: the receiving side trims them.
pub fn encode_user(name: &str) -> Result<Vec<u8>, CodecError> {
    if name.is_empty() || name.ends_with(' ') {
        return Err(CodecError::CannotEncode("USER"));
    }
    command_line("USER", Some(name))
}

/// `PASS password\r\n`, still a secret: expose it only to write it to the backend.
pub fn encode_pass(password: &Secret<String>) -> Result<Secret<Vec<u8>>, CodecError> {
    if password.expose().is_empty() {
        return Err(CodecError::CannotEncode("PASS"));
    }
    command_line("PASS", Some(password.expose())).map(Secret::new)
}

/// `AUTH PLAIN initial\r\n` (`AUTH PLAIN =` for an empty one), or with `None` the bare
/// `AUTH PLAIN\r\n` that makes the server ask with `+ ` for [`encode_sasl_response`].
pub fn encode_auth_plain(
    initial_b64: Option<&Secret<String>>,
) -> Result<Secret<Vec<u8>>, CodecError> {
    let initial = match initial_b64.map(|b64| b64.expose().as_str()) {
        None => return Ok(Secret::new(b"AUTH PLAIN\r\n".to_vec())),
        Some("") => "=",
        Some(b64) if is_base64_text(b64) => b64,
        Some(_) => return Err(CodecError::CannotEncode("AUTH")),
    };
    let mut args = String::from("PLAIN ");
    args.push_str(initial);
    command_line("AUTH", Some(&args)).map(Secret::new)
}

/// A SASL response line (`payload\r\n`, base64, possibly empty) answering a `+` challenge.
pub fn encode_sasl_response(payload_b64: &Secret<String>) -> Result<Secret<Vec<u8>>, CodecError> {
    let payload = payload_b64.expose();
    if !payload.is_empty() && !is_base64_text(payload) {
        return Err(CodecError::CannotEncode("SASL response"));
    }
    finish_line(payload.clone().into_bytes(), "SASL response").map(Secret::new)
}

/// `XCLIENT ADDR=<ip> PORT=<port>[ SESSION=<id>]\r\n`: hands Dovecot the real client
/// address. IPv4-mapped IPv6 addresses are sent as IPv4, as the client really used IPv4.
pub fn encode_xclient(
    addr: IpAddr,
    port: u16,
    session: Option<&str>,
) -> Result<Vec<u8>, CodecError> {
    // Dovecot's net_str2port() rejects port 0 and then fails the whole command.
    if port == 0 {
        return Err(CodecError::CannotEncode("XCLIENT"));
    }
    let mut args = format!("ADDR={} PORT={port}", addr.to_canonical());
    if let Some(id) = session {
        let valid_id = id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=-_.".contains(&b));
        if id.is_empty() || id.len() > MAX_SESSION_ID || !valid_id {
            return Err(CodecError::CannotEncode("XCLIENT"));
        }
        args.push_str(" SESSION=");
        args.push_str(id);
    }
    command_line("XCLIENT", Some(&args))
}

pub fn encode_capa() -> &'static [u8] {
    b"CAPA\r\n"
}

pub fn encode_stls() -> &'static [u8] {
    b"STLS\r\n"
}

pub fn encode_quit() -> &'static [u8] {
    b"QUIT\r\n"
}

fn is_base64_text(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

fn command_line(verb: &'static str, args: Option<&str>) -> Result<Vec<u8>, CodecError> {
    let mut line = verb.as_bytes().to_vec();
    if let Some(args) = args {
        if !is_plain_text(args) {
            return Err(CodecError::CannotEncode(verb));
        }
        line.push(b' ');
        line.extend_from_slice(args.as_bytes());
    }
    finish_line(line, verb)
}

fn finish_line(mut line: Vec<u8>, what: &'static str) -> Result<Vec<u8>, CodecError> {
    line.extend_from_slice(b"\r\n");
    if line.len() > MAX_LINE {
        return Err(CodecError::CannotEncode(what));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::super::{Command, Decoded, InitialResponse, decode_command, encode_plain};
    use super::*;

    fn secret(text: &str) -> Secret<String> {
        Secret::new(text.to_owned())
    }

    fn decodes_to(line: &[u8], expected: Command) {
        let consumed = line.len();
        let value = expected;
        assert_eq!(
            decode_command(line),
            Ok(Decoded::Complete { value, consumed })
        );
    }

    #[test]
    fn user_round_trips() {
        let line = encode_user("bob@example.org");
        assert_eq!(line.as_deref(), Ok(&b"USER bob@example.org\r\n"[..]));
        decodes_to(
            b"USER bob@example.org\r\n",
            Command::User("bob@example.org".into()),
        );
        let refused = Err(CodecError::CannotEncode("USER"));
        for bad in ["", "bob ", "bob\r\nDELE 1", "b\0b"] {
            assert_eq!(encode_user(bad), refused, "{bad:?}");
        }
        let too_long = "u".repeat(MAX_LINE);
        assert_eq!(encode_user(&too_long), refused);
    }

    #[test]
    fn pass_round_trips_and_stays_secret() {
        let password = secret(" two words ");
        let Ok(line) = encode_pass(&password) else {
            panic!("PASS did not encode");
        };
        assert_eq!(format!("{line:?}"), "<redacted>");
        assert_eq!(line.expose().as_slice(), b"PASS  two words \r\n");
        decodes_to(line.expose(), Command::Pass(password));
        let refused = Err(CodecError::CannotEncode("PASS"));
        assert_eq!(encode_pass(&secret("")), refused);
        assert_eq!(encode_pass(&secret("pw\r\nQUIT")), refused);
    }

    #[test]
    fn auth_plain_round_trips() {
        let Ok(initial) = encode_plain(None, "bob", &secret("pw")) else {
            panic!("PLAIN did not encode");
        };
        let Ok(line) = encode_auth_plain(Some(&initial)) else {
            panic!("AUTH did not encode");
        };
        let auth = Command::Auth {
            mechanism: "PLAIN".into(),
            initial: Some(InitialResponse::Base64(initial)),
        };
        decodes_to(line.expose(), auth);
        let empty = encode_auth_plain(Some(&secret(""))).map(Secret::into_inner);
        assert_eq!(empty, Ok(b"AUTH PLAIN =\r\n".to_vec()));
        let bare = encode_auth_plain(None).map(Secret::into_inner);
        assert_eq!(bare, Ok(b"AUTH PLAIN\r\n".to_vec()));
        let bad = encode_auth_plain(Some(&secret("AG J")));
        assert_eq!(bad, Err(CodecError::CannotEncode("AUTH")));
    }

    #[test]
    fn sasl_responses() {
        let line = encode_sasl_response(&secret("Ym9i")).map(Secret::into_inner);
        assert_eq!(line, Ok(b"Ym9i\r\n".to_vec()));
        let empty = encode_sasl_response(&secret("")).map(Secret::into_inner);
        assert_eq!(empty, Ok(b"\r\n".to_vec()));
        let refused = Err(CodecError::CannotEncode("SASL response"));
        assert_eq!(encode_sasl_response(&secret("*")), refused);
        assert_eq!(
            encode_sasl_response(&secret(&"A".repeat(MAX_LINE))),
            refused
        );
    }

    #[test]
    fn xclient_lines() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let line = encode_xclient(v4, 50123, None);
        assert_eq!(
            line.as_deref(),
            Ok(&b"XCLIENT ADDR=192.0.2.7 PORT=50123\r\n"[..])
        );
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let line = encode_xclient(v6, 1, Some("k5Yf+Gz/AQA"));
        let expected = b"XCLIENT ADDR=2001:db8::1 PORT=1 SESSION=k5Yf+Gz/AQA\r\n";
        assert_eq!(line.as_deref(), Ok(&expected[..]));
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 51, 100, 1).to_ipv6_mapped());
        let line = encode_xclient(mapped, 110, None);
        assert_eq!(
            line.as_deref(),
            Ok(&b"XCLIENT ADDR=198.51.100.1 PORT=110\r\n"[..])
        );
        let verb = "XCLIENT".to_owned();
        decodes_to(
            b"XCLIENT ADDR=192.0.2.7 PORT=50123\r\n",
            Command::Unknown { verb },
        );
    }

    #[test]
    fn xclient_refuses_what_dovecot_would_reject() {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let refused = Err(CodecError::CannotEncode("XCLIENT"));
        assert_eq!(encode_xclient(v4, 0, None), refused);
        for session in ["", "a b", "a\r\nQUIT", &"s".repeat(MAX_SESSION_ID + 1)] {
            assert_eq!(encode_xclient(v4, 1, Some(session)), refused, "{session:?}");
        }
        assert!(encode_xclient(v4, 1, Some(&"s".repeat(MAX_SESSION_ID))).is_ok());
    }

    #[test]
    fn fixed_commands_decode_back() {
        decodes_to(encode_capa(), Command::Capa);
        decodes_to(encode_stls(), Command::Stls);
        decodes_to(encode_quit(), Command::Quit);
    }
}
