//! SASL inside IMAP AUTHENTICATE (RFC 9051 §6.2.2, RFC 4959): the client's
//! continuation lines (base64, or `*` to cancel), and the PLAIN message (RFC 4616)
//! `[authzid] NUL authcid NUL passwd`.

use thiserror::Error;

use super::{CodecError, Decoded, MAX_LINE, line_end, strip_eol};
use crate::base64;
use crate::secret::Secret;

/// One client line answering our `+` during AUTHENTICATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslResponse {
    /// `*`: the client gives up; answer `tag BAD`.
    Cancel,
    /// Valid base64 text, still encoded; empty for an empty line.
    Base64(Secret<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    /// `None` when empty: act as `authcid`.
    pub authzid: Option<String>,
    pub authcid: String,
    pub password: Secret<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SaslError {
    /// Not base64: RFC 4959 wants `tag BAD`.
    #[error("invalid base64")]
    InvalidBase64,
    /// Base64, but not a PLAIN message (or a field we cannot put in one): `tag NO`.
    #[error("malformed PLAIN message: {0}")]
    MalformedPlain(&'static str),
}

/// Decodes one SASL response line from the start of `buf`. Never returns
/// `NeedContinuation`.
pub fn decode_sasl_line(buf: &[u8]) -> Result<Decoded<SaslResponse>, CodecError> {
    let Some(end) = line_end(buf, 0, MAX_LINE)? else {
        return Ok(Decoded::Incomplete);
    };
    let line = strip_eol(buf.get(..end).unwrap_or_default());
    let value = match std::str::from_utf8(line) {
        Ok("*") => SaslResponse::Cancel,
        Ok(text) if base64::is_valid(text) => SaslResponse::Base64(Secret::new(text.to_owned())),
        _ => {
            return Err(CodecError::Syntax {
                tag: None,
                reason: "invalid base64 in SASL response",
                skip: end,
            });
        }
    };
    Ok(Decoded::Complete {
        value,
        consumed: end,
    })
}

/// Decodes a base64 PLAIN message. Each field must be UTF-8 without NUL (RFC 4616
/// `1*SAFE`), `authcid` and `passwd` non-empty.
pub fn parse_plain(b64: &str) -> Result<PlainCredentials, SaslError> {
    let message = Secret::new(base64::decode(b64).ok_or(SaslError::InvalidBase64)?);
    let mut fields = message.expose().split(|&byte| byte == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslError::MalformedPlain("expected exactly two NULs"));
    };
    if authcid.is_empty() || password.is_empty() {
        return Err(SaslError::MalformedPlain("empty authcid or password"));
    }
    let utf8 = |field: &[u8]| {
        String::from_utf8(field.to_vec()).map_err(|_| SaslError::MalformedPlain("not UTF-8"))
    };
    Ok(PlainCredentials {
        authzid: Some(utf8(authzid)?).filter(|authzid| !authzid.is_empty()),
        authcid: utf8(authcid)?,
        password: Secret::new(utf8(password)?),
    })
}

/// The base64 PLAIN message for these credentials (for a backend AUTHENTICATE).
pub fn encode_plain(
    authzid: Option<&str>,
    authcid: &str,
    password: &Secret<String>,
) -> Result<Secret<String>, SaslError> {
    let password = password.expose();
    let authzid = authzid.unwrap_or_default();
    if [authzid, authcid, password.as_str()]
        .iter()
        .any(|field| field.contains('\0'))
    {
        return Err(SaslError::MalformedPlain("NUL in a field"));
    }
    if authcid.is_empty() || password.is_empty() {
        return Err(SaslError::MalformedPlain("empty authcid or password"));
    }
    let mut message = Vec::with_capacity(authzid.len() + authcid.len() + password.len() + 2);
    message.extend_from_slice(authzid.as_bytes());
    message.push(0);
    message.extend_from_slice(authcid.as_bytes());
    message.push(0);
    message.extend_from_slice(password.as_bytes());
    Ok(Secret::new(base64::encode(&message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret<String> {
        Secret::new(text.to_owned())
    }

    #[test]
    fn sasl_lines() {
        let complete = |value, consumed| Ok(Decoded::Complete { value, consumed });
        assert_eq!(
            decode_sasl_line(b"*\r\n"),
            complete(SaslResponse::Cancel, 3)
        );
        let data = SaslResponse::Base64(secret("AGJvYgBwdw=="));
        assert_eq!(decode_sasl_line(b"AGJvYgBwdw==\r\nx"), complete(data, 14));
        let empty = SaslResponse::Base64(secret(""));
        assert_eq!(decode_sasl_line(b"\r\n"), complete(empty, 2));
        assert_eq!(decode_sasl_line(b"AGJvYgBw"), Ok(Decoded::Incomplete));
        for bad in [
            &b"AGJvYgBwdw=\r\n"[..],
            b"** \r\n",
            b"AGJv YgBw\r\n",
            b"\xff\r\n",
        ] {
            assert!(
                matches!(decode_sasl_line(bad), Err(CodecError::Syntax { tag: None, skip, .. }) if skip == bad.len()),
                "{bad:?}"
            );
        }
        let long = vec![b'A'; MAX_LINE];
        assert_eq!(decode_sasl_line(&long), Err(CodecError::LineTooLong));
    }

    #[test]
    fn plain_messages() {
        let Ok(creds) = parse_plain("AGJvYgBwIGFcInNz") else {
            panic!("valid PLAIN rejected");
        };
        assert_eq!(creds.authzid, None);
        assert_eq!(creds.authcid, "bob");
        assert_eq!(creds.password.expose(), "p a\\\"ss");
        let Ok(creds) = parse_plain("YWRtaW4AYm9iAHB3") else {
            panic!("valid PLAIN with authzid rejected");
        };
        assert_eq!(creds.authzid.as_deref(), Some("admin"));
        assert!(!format!("{creds:?}").contains("pw"));
    }

    #[test]
    fn bad_plain_messages() {
        let malformed = |plain: &[u8]| parse_plain(&base64::encode(plain));
        assert_eq!(parse_plain("AGJvYgBw!"), Err(SaslError::InvalidBase64));
        for bad in [
            &b"bob\0pw"[..],
            b"\0bob\0pw\0",
            b"\0\0pw",
            b"\0bob\0",
            b"\0b\xffb\0pw",
            b"",
        ] {
            assert!(
                matches!(malformed(bad), Err(SaslError::MalformedPlain(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plain_round_trips() {
        for (authzid, authcid, password) in [
            (None, "bob@example.com", "s3cret"),
            (Some("admin"), "j\u{f6}rg", "p\u{e4}ss \"w\\rd\""),
        ] {
            let Ok(encoded) = encode_plain(authzid, authcid, &secret(password)) else {
                panic!("encode_plain failed");
            };
            let Ok(creds) = parse_plain(encoded.expose()) else {
                panic!("round trip failed");
            };
            assert_eq!(creds.authzid.as_deref(), authzid);
            assert_eq!(creds.authcid, authcid);
            assert_eq!(creds.password.expose(), password);
        }
        assert!(encode_plain(None, "bob", &secret("a\0b")).is_err());
        assert!(encode_plain(None, "", &secret("pw")).is_err());
    }
}
