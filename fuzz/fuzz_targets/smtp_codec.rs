//! SMTP codec: command, SASL and reply decoders never panic or over-consume; the DATA
//! reader ends exactly at the first CRLF.CRLF, never forwards one, and gives the same
//! result however the input is cut. The checks live in the codec
//! (`protobalance-user/src/smtp/codec_props.rs`), shared with `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| protobalance::smtp::codec::props::check_invariants(data));
