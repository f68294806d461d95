//! POP3 codec: decoders never panic, never over-consume, report Incomplete only below the
//! line bound; whatever an encoder accepts decodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobalance::{pop3::codec::*, secret::Secret};

fn consumed<T>(r: Result<Decoded<T>, CodecError>) -> Result<Option<usize>, CodecError> {
    r.map(|d| match d {
        Decoded::Incomplete => None,
        Decoded::Complete { consumed, .. } => Some(consumed),
    })
}

fuzz_target!(|data: &[u8]| {
    let no_line_yet = data.len() < MAX_LINE && !data.contains(&b'\n');
    for r in [consumed(decode_command(data)), consumed(decode_reply(data)), consumed(decode_sasl_line(data))] {
        match r {
            Ok(Some(n)) => assert!(n > 0 && n <= data.len() && n <= MAX_LINE),
            Ok(None) => assert!(no_line_yet),
            Err(_) => {}
        }
    }
    let bound = (MAX_MULTILINE_LINES + 1) * MAX_LINE;
    match consumed(decode_multiline(data)) {
        Ok(Some(n)) => assert!(n > 0 && n <= data.len() && n <= bound),
        Ok(None) => assert!(data.len() < bound),
        Err(_) => {}
    }
    assert_eq!(decode_base64(&encode_base64(data)).as_deref(), Ok(data));
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(line) = encode_user(text) {
        let want = Decoded::Complete { value: Command::User(text.to_owned()), consumed: line.len() };
        assert_eq!(decode_command(&line), Ok(want));
    }
    let password = Secret::new(text.to_owned());
    if let Ok(line) = encode_pass(&password) {
        let consumed = line.expose().len();
        assert_eq!(decode_command(line.expose()), Ok(Decoded::Complete { value: Command::Pass(password), consumed }));
    }
    let mut fields = text.splitn(3, '|');
    let (authzid, authcid) = (fields.next(), fields.next().unwrap_or_default());
    let password = Secret::new(fields.next().unwrap_or_default().to_owned());
    if let Ok(b64) = encode_plain(authzid, authcid, &password) {
        let expected = PlainCredentials {
            authzid: authzid.filter(|s| !s.is_empty()).map(str::to_owned),
            authcid: authcid.to_owned(),
            password,
        };
        assert_eq!(parse_plain(b64.expose()), Ok(expected));
    }
});
