//! POP3 codec: decoders never panic, never over-consume, report Incomplete only below the
//! line bound; whatever an encoder accepts decodes back to itself. The checks live in the
//! codec (`protobalance-user/src/pop3/codec_props.rs`), shared with `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| protobalance::pop3::codec::props::check_invariants(data));
