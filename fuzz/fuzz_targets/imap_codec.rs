//! IMAP codec: decoders never panic or over-consume; a decoded command re-decodes from its
//! own bytes; encode_login output decodes to the same login. The checks live in the codec
//! (`protobalance-user/src/imap/codec_props.rs`), shared with `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| protobalance::imap::codec::props::check_invariants(data));
