//! Base64 (RFC 4648 §4, standard alphabet, padded), as SASL uses it in POP3 (RFC 5034)
//! and IMAP (RFC 9051 `base64` rule). Small enough to own rather than add a crate; both
//! codecs share it. Decoding is strict about alphabet, padding and length, lenient about
//! non-zero bits in the last symbol (RFC 4648 §3.5 allows either; Dovecot accepts them).

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let byte = |at: usize| u32::from(chunk.get(at).copied().unwrap_or(0));
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for symbol in 0..4 {
            if symbol <= chunk.len() {
                let index = (group >> (18 - 6 * symbol)) & 0x3f;
                out.push(char::from(ALPHABET[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The decoded octets, or `None` if `text` is not padded base64.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let groups = bytes.len() / 4;
    let mut out = Vec::with_capacity(groups * 3);
    for (index, chunk) in bytes.chunks_exact(4).enumerate() {
        let padding = chunk.iter().rev().take_while(|&&byte| byte == b'=').count();
        if padding > 2 || (padding > 0 && index + 1 != groups) {
            return None;
        }
        let mut group = 0u32;
        for (at, &byte) in chunk.iter().enumerate() {
            let value = if at >= 4 - padding { 0 } else { value(byte)? };
            group = (group << 6) | u32::from(value);
        }
        let [_, first, second, third] = group.to_be_bytes();
        out.extend_from_slice([first, second, third].get(..3 - padding)?);
    }
    Some(out)
}

/// Decodes to UTF-8 text without control characters: SASL LOGIN user names and
/// passwords (wrap a password in `Secret` at once).
pub fn decode_text(text: &str) -> Option<String> {
    let raw = decode(text)?;
    String::from_utf8(raw)
        .ok()
        .filter(|t| !t.chars().any(char::is_control))
}

pub fn is_valid(text: &str) -> bool {
    decode(text).is_some()
}

fn value(symbol: u8) -> Option<u8> {
    match symbol {
        b'A'..=b'Z' => Some(symbol - b'A'),
        b'a'..=b'z' => Some(symbol - b'a' + 26),
        b'0'..=b'9' => Some(symbol - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(encode(plain.as_bytes()), encoded);
            assert_eq!(decode(encoded), Some(plain.as_bytes().to_vec()));
        }
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        for len in 0..all.len() {
            let input = all.get(..len).unwrap_or_default();
            assert_eq!(decode(&encode(input)).as_deref(), Some(input));
        }
        assert_eq!(encode(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "Zg", "Zg=", "Z===", "Zg==Zg==", "Zm9v\r\n", "Zm 9", "Zm9-", "Zg=a", "====",
        ] {
            assert_eq!(decode(bad), None, "{bad}");
        }
        assert!(
            decode("Zh==").is_some(),
            "non-zero trailing bits are tolerated"
        );
    }
}
