//! Property checks shared by `cargo test` and the cargo-fuzz target
//! (`fuzz/fuzz_targets/imap_codec.rs`): decoders never panic or over-consume, a decoded
//! command re-decodes from its own bytes, and encode_login output decodes to the same login.

use super::{
    CodecError, Command, CommandKind, Decoded, LiteralMode, decode_command, decode_response,
    decode_sasl_line, encode_login,
};
use crate::secret::Secret;

/// Every invariant that must hold for arbitrary `data`: the cargo-fuzz target's body, also
/// run by the command tests on seeded random input.
pub fn check_invariants(data: &[u8]) {
    match decode_command(data) {
        Ok(Decoded::Complete { value, consumed }) => {
            assert!(consumed > 0 && consumed <= data.len());
            let prefix = data.get(..consumed).unwrap_or_default();
            assert_eq!(
                decode_command(prefix),
                Ok(Decoded::Complete { value, consumed })
            );
        }
        Ok(Decoded::NeedContinuation { .. }) => {
            assert!(data.ends_with(b"}\n") || data.ends_with(b"}\r\n"))
        }
        Err(CodecError::Syntax { skip, .. }) => assert!(skip > 0 && skip <= data.len()),
        Err(CodecError::LiteralTooLarge { skip, .. }) => assert!(skip <= data.len()),
        Ok(Decoded::Incomplete) | Err(CodecError::LineTooLong) => {}
    }
    if let Ok(Decoded::Complete { consumed, .. }) = decode_response(data) {
        assert!(consumed > 0 && consumed <= data.len());
    }
    if let Ok(Decoded::Complete { consumed, .. }) = decode_sasl_line(data) {
        assert!(consumed > 0 && consumed <= data.len());
    }
    let text = String::from_utf8_lossy(data).replace('\0', "");
    let middle = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(text.len(), |(at, _)| at);
    let (user, password) = text.split_at(middle);
    for mode in [LiteralMode::Synchronizing, LiteralMode::NonSynchronizing] {
        let Ok(encoded) = encode_login("f1", user, &Secret::new(password.to_owned()), mode) else {
            panic!("encode_login refused NUL-free text");
        };
        let bytes: Vec<u8> = encoded
            .fragments()
            .iter()
            .flat_map(|f| f.expose().iter().copied())
            .collect();
        match decode_command(&bytes) {
            Ok(Decoded::Complete { value, consumed }) => {
                assert_eq!(consumed, bytes.len());
                assert_eq!(
                    value,
                    Command {
                        tag: "f1".into(),
                        kind: CommandKind::Login {
                            user: user.to_owned(),
                            password: Secret::new(password.to_owned()),
                        }
                    }
                );
            }
            other => assert!(text.len() > 2048, "{other:?}"),
        }
    }
}
