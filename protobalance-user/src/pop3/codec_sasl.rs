//! SASL during a POP3 AUTH exchange (RFC 5034): client response lines, PLAIN payloads
//! (RFC 4616) and base64 (RFC 4648 §4).
//!
//! Base64 is written here rather than taken from the `base64` crate: codecs depend on
//! `bytes` only (ARCHITECTURE.md), and the job is small — one alphabet, padding required,
//! canonical input only (§3.5: non-zero pad bits are rejected), inputs bounded by MAX_LINE.

use super::{CodecError, Decoded, is_plain_text, take_line};
use crate::secret::Secret;

/// One client line while an AUTH exchange waits for a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslLine {
    /// `*`: the client aborts the exchange (RFC 5034 §4); answer `-ERR`.
    Cancel,
    /// Base64 text, not yet decoded; an empty line is an empty response.
    Payload(Secret<String>),
}

/// Decoded `authzid NUL authcid NUL passwd` (RFC 4616 §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    /// `None` when the client sent an empty authorization identity.
    pub authzid: Option<String>,
    pub authcid: String,
    pub password: Secret<String>,
}

/// Decodes the first SASL response line in `buf`.
pub fn decode_sasl_line(buf: &[u8]) -> Result<Decoded<SaslLine>, CodecError> {
    let Some((line, consumed)) = take_line(buf)? else {
        return Ok(Decoded::Incomplete);
    };
    let end = line
        .iter()
        .rposition(|&b| b != b' ')
        .map_or(0, |last| last + 1);
    let line = line.get(..end).unwrap_or_default();
    let value = match line {
        b"*" => SaslLine::Cancel,
        _ if line.iter().all(u8::is_ascii_graphic) => {
            let text = line.iter().map(|&b| char::from(b)).collect();
            SaslLine::Payload(Secret::new(text))
        }
        _ => return Err(CodecError::BadBase64),
    };
    Ok(Decoded::Complete { value, consumed })
}

/// Decodes a PLAIN response. Every field must be UTF-8 without control characters (so it
/// can be replayed as USER/PASS), and authcid and password must not be empty.
pub fn parse_plain(payload_b64: &str) -> Result<PlainCredentials, CodecError> {
    let raw = decode_base64(payload_b64)?;
    let text = String::from_utf8(raw).map_err(|_| CodecError::BadSaslPayload)?;
    let mut fields = text.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(CodecError::BadSaslPayload);
    };
    let all_plain = [authzid, authcid, password].into_iter().all(is_plain_text);
    if !all_plain || authcid.is_empty() || password.is_empty() {
        return Err(CodecError::BadSaslPayload);
    }
    Ok(PlainCredentials {
        authzid: Some(authzid).filter(|id| !id.is_empty()).map(str::to_owned),
        authcid: authcid.to_owned(),
        password: Secret::new(password.to_owned()),
    })
}

/// Base64 PLAIN response for replaying a login to the backend. A NUL or control character
/// in any field would change its meaning, and RFC 4616 needs a non-empty authcid and
/// password, so such input is refused rather than sent.
pub fn encode_plain(
    authzid: Option<&str>,
    authcid: &str,
    password: &Secret<String>,
) -> Result<Secret<String>, CodecError> {
    let authzid = authzid.unwrap_or_default();
    let fields = [authzid, authcid, password.expose().as_str()];
    let empty = authcid.is_empty() || password.expose().is_empty();
    if empty || !fields.into_iter().all(is_plain_text) {
        return Err(CodecError::CannotEncode("PLAIN"));
    }
    let raw = fields.join("\0");
    Ok(Secret::new(encode_base64(raw.as_bytes())))
}

/// Decodes one AUTH LOGIN response (user name or password) to text without control
/// characters. Wrap a password in `Secret` at once.
pub fn decode_sasl_text(payload_b64: &str) -> Result<String, CodecError> {
    let raw = decode_base64(payload_b64)?;
    match String::from_utf8(raw) {
        Ok(text) if is_plain_text(&text) => Ok(text),
        _ => Err(CodecError::BadSaslPayload),
    }
}

/// Standard base64 with padding (RFC 4648 §4), shared with IMAP (`crate::base64`).
pub fn encode_base64(data: &[u8]) -> String {
    crate::base64::encode(data)
}

/// Base64 as `crate::base64` decodes it: padding required, no whitespace.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, CodecError> {
    crate::base64::decode(text).ok_or(CodecError::BadBase64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret<String> {
        Secret::new(text.to_owned())
    }

    fn payload(text: &str, consumed: usize) -> Result<Decoded<SaslLine>, CodecError> {
        let value = SaslLine::Payload(secret(text));
        Ok(Decoded::Complete { value, consumed })
    }

    /// The wrappers only map the shared codec's errors (its own tests cover RFC 4648).
    #[test]
    fn base64_wrappers_map_errors() {
        assert_eq!(
            decode_base64(&encode_base64(b"foobar")),
            Ok(b"foobar".to_vec())
        );
        assert_eq!(decode_base64("Zg="), Err(CodecError::BadBase64));
    }

    #[test]
    fn sasl_lines() {
        let cancel = Ok(Decoded::Complete {
            value: SaslLine::Cancel,
            consumed: 3,
        });
        assert_eq!(decode_sasl_line(b"*\r\n"), cancel);
        assert_eq!(decode_sasl_line(b"Ym9i\r\nQUIT\r\n"), payload("Ym9i", 6));
        assert_eq!(decode_sasl_line(b"Ym9i  \n"), payload("Ym9i", 7));
        assert_eq!(decode_sasl_line(b"\r\n"), payload("", 2));
        assert_eq!(decode_sasl_line(b"Ym9i\r"), Ok(Decoded::Incomplete));
        assert_eq!(decode_sasl_line(b"Ym 9i\r\n"), Err(CodecError::BadBase64));
        assert_eq!(decode_sasl_line(b"Ym\xff\r\n"), Err(CodecError::BadBase64));
        let long = vec![b'A'; super::super::MAX_LINE];
        assert_eq!(decode_sasl_line(&long), Err(CodecError::LineTooLong));
    }

    #[test]
    fn plain_without_authzid() {
        let creds = parse_plain(&encode_base64(b"\0bob@example.org\0pass word"));
        let expected = PlainCredentials {
            authzid: None,
            authcid: "bob@example.org".into(),
            password: secret("pass word"),
        };
        assert_eq!(creds, Ok(expected));
    }

    #[test]
    fn plain_with_authzid() {
        let creds = parse_plain(&encode_base64(b"alice\0admin\0pw"));
        let expected = PlainCredentials {
            authzid: Some("alice".into()),
            authcid: "admin".into(),
            password: secret("pw"),
        };
        assert_eq!(creds, Ok(expected));
    }

    #[test]
    fn malformed_plain() {
        assert_eq!(parse_plain("not base64!"), Err(CodecError::BadBase64));
        let bad: [&[u8]; 7] = [
            b"",
            b"bob\0pw",
            b"\0bob\0pw\0extra",
            b"\0\0pw",
            b"\0bob\0",
            b"\0bob\0p\r\nw",
            b"\0b\xffb\0pw",
        ];
        for raw in bad {
            let result = parse_plain(&encode_base64(raw));
            assert_eq!(result, Err(CodecError::BadSaslPayload), "{raw:?}");
        }
    }

    #[test]
    fn encode_plain_round_trips() {
        let password = secret("s3cret pw");
        let encoded = encode_plain(Some("alice"), "admin", &password);
        let decoded = encoded.and_then(|b64| parse_plain(b64.expose()));
        let expected = PlainCredentials {
            authzid: Some("alice".into()),
            authcid: "admin".into(),
            password,
        };
        assert_eq!(decoded, Ok(expected));
        let dovecot_example = encode_plain(None, "tim", &secret("tanstaaftanstaaf"));
        let expected = "AHRpbQB0YW5zdGFhZnRhbnN0YWFm";
        assert_eq!(
            dovecot_example.map(Secret::into_inner),
            Ok(expected.to_owned())
        );
    }

    #[test]
    fn encode_plain_refuses_field_separators() {
        let refused = Err(CodecError::CannotEncode("PLAIN"));
        assert_eq!(encode_plain(None, "b\0b", &secret("pw")), refused);
        assert_eq!(encode_plain(Some("a\0"), "bob", &secret("pw")), refused);
        assert_eq!(encode_plain(None, "bob", &secret("p\nw")), refused);
        assert_eq!(encode_plain(None, "", &secret("pw")), refused);
        assert_eq!(encode_plain(None, "bob", &secret("")), refused);
    }

    #[test]
    fn login_fields() {
        assert_eq!(decode_sasl_text("Ym9i"), Ok("bob".to_owned()));
        assert_eq!(decode_sasl_text(""), Ok(String::new()));
        assert_eq!(decode_sasl_text("Ym9\n"), Err(CodecError::BadBase64));
        let control = encode_base64(b"bo\rb");
        assert_eq!(decode_sasl_text(&control), Err(CodecError::BadSaslPayload));
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let creds = parse_plain(&encode_base64(b"\0bob\0hunter2"));
        let line = decode_sasl_line(b"aHVudGVyMg==\r\n");
        let shown = format!("{creds:?} {line:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("aHVudGVyMg"),
            "{shown}"
        );
        assert!(shown.contains("bob"));
    }
}
