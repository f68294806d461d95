//! Property checks over generated inputs: the same invariants as the cargo-fuzz target
//! (decoders never panic or over-consume, `Incomplete` only below the bound, and what the
//! encoders accept decodes back to itself), run deterministically in `cargo test`.

use super::*;

/// The fuzz target's body: every invariant that must hold for arbitrary `data`.
pub fn check_invariants(data: &[u8]) {
    check_decoders(data);
    assert_eq!(decode_base64(&encode_base64(data)).as_deref(), Ok(data));
    if let Ok(text) = std::str::from_utf8(data) {
        check_text_round_trips(text);
    }
}

fn consumed<T>(result: Result<Decoded<T>, CodecError>) -> Result<Option<usize>, CodecError> {
    result.map(|decoded| match decoded {
        Decoded::Incomplete => None,
        Decoded::Complete { consumed, .. } => Some(consumed),
    })
}

fn check_decoders(data: &[u8]) {
    let single_line = [
        consumed(decode_command(data)),
        consumed(decode_reply(data)),
        consumed(decode_sasl_line(data)),
    ];
    let no_line_yet = data.len() < MAX_LINE && !data.contains(&b'\n');
    for result in single_line {
        match result {
            Ok(Some(used)) => assert!(used > 0 && used <= data.len() && used <= MAX_LINE),
            Ok(None) => assert!(no_line_yet),
            Err(_) => {}
        }
    }
    let bound = (MAX_MULTILINE_LINES + 1) * MAX_LINE;
    match consumed(decode_multiline(data)) {
        Ok(Some(used)) => assert!(used > 0 && used <= data.len() && used <= bound),
        Ok(None) => assert!(data.len() < bound),
        Err(_) => {}
    }
}

fn check_text_round_trips(text: &str) {
    if let Ok(raw) = decode_base64(text) {
        // Non-zero pad bits are tolerated (like Dovecot), so compare the octets, not the text.
        assert_eq!(
            decode_base64(&encode_base64(&raw)),
            Ok(raw),
            "re-encoding is lossless"
        );
    }
    if let Ok(line) = encode_user(text) {
        let value = Command::User(text.to_owned());
        let consumed = line.len();
        assert_eq!(
            decode_command(&line),
            Ok(Decoded::Complete { value, consumed })
        );
    }
    let password = Secret::new(text.to_owned());
    if let Ok(line) = encode_pass(&password) {
        let value = Command::Pass(password);
        let consumed = line.expose().len();
        let decoded = decode_command(line.expose());
        assert_eq!(decoded, Ok(Decoded::Complete { value, consumed }));
    }
    let mut fields = text.splitn(3, '|');
    let (authzid, authcid) = (fields.next(), fields.next().unwrap_or_default());
    let password = Secret::new(fields.next().unwrap_or_default().to_owned());
    if let Ok(b64) = encode_plain(authzid, authcid, &password) {
        let authzid = authzid.filter(|id| !id.is_empty()).map(str::to_owned);
        let expected = PlainCredentials {
            authzid,
            authcid: authcid.to_owned(),
            password,
        };
        assert_eq!(parse_plain(b64.expose()), Ok(expected));
    }
    if text.len() <= MAX_LINE / 2 {
        check_replies(text);
    }
}

/// Replies the edge writes decode back to the sanitized text (controls become spaces).
fn check_replies(text: &str) {
    let sanitized: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let encoded = err(Some("SYS/TEMP"), text);
    let code = Some("SYS/TEMP".to_owned());
    let value = Reply::Err {
        code,
        text: sanitized.clone(),
    };
    let consumed = encoded.len();
    assert_eq!(
        decode_reply(&encoded),
        Ok(Decoded::Complete { value, consumed })
    );
    let encoded = ok(text);
    let value = Reply::Ok { text: sanitized };
    let consumed = encoded.len();
    assert_eq!(
        decode_reply(&encoded),
        Ok(Decoded::Complete { value, consumed })
    );

    let lines: Vec<&str> = text.split('\n').take(MAX_MULTILINE_LINES).collect();
    let encoded = multiline("", &lines);
    let body = encoded.get(5..).unwrap_or_default(); // after "+OK\r\n"
    let value: Vec<String> = lines
        .iter()
        .map(|line| line.replace(|c: char| c.is_control(), " "))
        .collect();
    let consumed = body.len();
    assert_eq!(
        decode_multiline(body),
        Ok(Decoded::Complete { value, consumed })
    );
}

/// Inputs built from protocol fragments, so the generator reaches deep paths quickly.
#[cfg(test)]
const FRAGMENTS: [&[u8]; 24] = [
    b"USER ",
    b"PASS ",
    b"AUTH ",
    b"PLAIN ",
    b"LOGIN",
    b"CAPA",
    b"+OK ",
    b"-ERR ",
    b"[",
    b"]",
    b"SYS/TEMP",
    b"+ ",
    b".",
    b"\r",
    b"\n",
    b"\r\n",
    b"=",
    b"*",
    b" ",
    b"\0",
    b"|",
    b"Zm9v",
    b"\xc2\x85",
    b"\xff",
];

#[cfg(test)]
struct XorShift(u64);

#[cfg(test)]
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % bound as u64).unwrap_or(0)
    }
}

#[cfg(test)]
fn generated_input(rng: &mut XorShift) -> Vec<u8> {
    let mut data = Vec::new();
    for _ in 0..rng.below(48) {
        match FRAGMENTS.get(rng.below(FRAGMENTS.len() + 4)) {
            Some(fragment) => data.extend_from_slice(fragment),
            None => data.push(rng.next().to_le_bytes().first().copied().unwrap_or(0)),
        }
    }
    data
}

#[test]
fn invariants_hold_on_seeds_and_their_prefixes() {
    let seeds: [&[u8]; 6] = [
        b"USER bob\r\nPASS pw\r\nQUIT\r\n",
        b"AUTH PLAIN AGJvYgBwdw==\r\n",
        b"+OK [XCLIENT] ready\r\n-ERR [SYS/TEMP] later\r\n",
        b"TOP\r\n..dot\r\nUSER\r\n.\r\n",
        b"*\r\nZm9v\r\n",
        b"a|bob|pw",
    ];
    for seed in seeds {
        for end in 0..=seed.len() {
            check_invariants(seed.get(..end).unwrap_or_default());
        }
    }
}

#[test]
fn invariants_hold_on_generated_inputs() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        check_invariants(&generated_input(&mut rng));
    }
}

#[test]
fn invariants_hold_at_the_bounds() {
    check_invariants(&[b'A'; MAX_LINE]);
    check_invariants("X\r\n".repeat(MAX_MULTILINE_LINES + 1).as_bytes());
    check_invariants("\r".repeat(MAX_LINE * 2).as_bytes());
}
