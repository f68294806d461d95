//! Property checks over generated inputs: the same invariants as the cargo-fuzz target
//! `fuzz/fuzz_targets/smtp_codec.rs` (the fuzz target calls `check_invariants` here), run deterministically in
//! `cargo test` from a seeded PRNG. Only the public API is used, as the fuzz target must.

use crate::smtp::codec::{
    BareLineEndings, CodecError, DataReader, DataState, DataVerdict, Decoded, END_OF_DATA,
    MAX_COMMAND_LINE, MAX_ENCODED_REPLY_LINE, MAX_REPLY_LINE, MAX_REPLY_LINES, decode_command,
    decode_reply, decode_sasl_response, reply,
};

/// The fuzz target's body. The first byte picks the policy, size limit and chunk split.
pub fn check_invariants(data: &[u8]) {
    check_command(data);
    check_replies(data);
    let (control, input) = data.split_first().map_or((0, data), |(&c, rest)| (c, rest));
    let policy = match control & 1 {
        0 => BareLineEndings::Reject,
        _ => BareLineEndings::Normalize,
    };
    let max_size = match control & 2 {
        0 => u64::MAX,
        _ => u64::try_from(input.len() / 2).unwrap_or(u64::MAX),
    };
    let cut = usize::from(control >> 2) * input.len() / 63;
    check_data(policy, max_size, input, cut);
}

fn check_command(data: &[u8]) {
    let window = data.get(..MAX_COMMAND_LINE).unwrap_or(data);
    let has_lf = window.contains(&b'\n');
    match decode_command(data) {
        Ok(Decoded::Complete { value, consumed }) => {
            assert!(consumed > 0 && consumed <= window.len());
            let line = data.get(..consumed).unwrap_or_default();
            assert!(line.ends_with(b"\n"));
            let again = decode_command(line);
            assert_eq!(again, Ok(Decoded::Complete { value, consumed }));
        }
        Ok(Decoded::Incomplete) => assert!(!has_lf && data.len() < MAX_COMMAND_LINE),
        Err(CodecError::LineTooLong) => assert!(!has_lf && data.len() >= MAX_COMMAND_LINE),
        Err(error) => {
            let skip = error.resume_at().unwrap_or_default();
            assert!(skip > 0 && skip <= window.len(), "{error:?}");
        }
    }
    if let Ok(Decoded::Complete { consumed, .. }) = decode_sasl_response(data) {
        assert!(consumed > 0 && consumed <= window.len());
    }
}

fn check_replies(data: &[u8]) {
    if let Ok(Decoded::Complete { value, consumed }) = decode_reply(data) {
        assert!(consumed > 0 && consumed <= data.len());
        assert!(consumed <= MAX_REPLY_LINE * MAX_REPLY_LINES);
        assert!(!value.lines.is_empty() && value.lines.len() <= MAX_REPLY_LINES);
        assert!((200..600).contains(&value.code));
        let prefix = data.get(..consumed).unwrap_or_default();
        assert_eq!(
            decode_reply(prefix),
            Ok(Decoded::Complete { value, consumed })
        );
    }
    let text = String::from_utf8_lossy(data);
    let encoded = reply(550, Some("5.7.1"), &text);
    assert!(encoded.len() <= MAX_ENCODED_REPLY_LINE);
    match decode_reply(&encoded) {
        Ok(Decoded::Complete { value, consumed }) => {
            assert_eq!((value.code, value.enhanced), (550, Some((5, 7, 1))));
            assert_eq!((value.lines.len(), consumed), (1, encoded.len()));
        }
        other => panic!("{other:?}"),
    }
}

/// Everything one reading of a message produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    consumed: usize,
    events: Vec<DataState>,
    verdict: DataVerdict,
}

/// Feeds `input` in two pieces, split at `cut`, as a driver would.
fn read(policy: BareLineEndings, max_size: u64, input: &[u8], cut: usize) -> Outcome {
    let mut reader = DataReader::new(max_size, policy);
    let (mut out, mut events, mut consumed) = (Vec::new(), Vec::new(), 0);
    'pieces: for end in [cut.min(input.len()), input.len()] {
        while consumed < end {
            let piece = input.get(consumed..end).unwrap_or_default();
            let feed = reader.feed(piece, &mut out);
            assert!(feed.consumed <= piece.len());
            consumed += feed.consumed;
            match feed.state {
                DataState::More => assert_eq!(consumed, end),
                DataState::End => {
                    events.push(DataState::End);
                    break 'pieces;
                }
                event => events.push(event),
            }
        }
    }
    assert!(events.len() <= 2, "at most one refusal, then the end");
    let verdict = reader.verdict();
    Outcome {
        out,
        consumed,
        events,
        verdict,
    }
}

/// Where the end of data is by the RFC 5321 rule: just past the first `CRLF.CRLF`, the
/// data being read as if right after a CRLF (so `.CRLF` first ends it too).
fn reference_end(input: &[u8]) -> Option<usize> {
    let mut stream = b"\r\n".to_vec();
    stream.extend_from_slice(input);
    let at = stream.windows(5).position(|w| w == b"\r\n.\r\n")?;
    Some(at + 3)
}

/// Line-opening dots in forwarded output: the ones the backend removes.
fn stuffing_dots(out: &[u8]) -> usize {
    let first = usize::from(out.first() == Some(&b'.'));
    first + out.windows(3).filter(|w| *w == b"\r\n.").count()
}

fn check_data(policy: BareLineEndings, max_size: u64, input: &[u8], cut: usize) {
    let whole = read(policy, max_size, input, 0);
    assert_eq!(
        read(policy, max_size, input, cut),
        whole,
        "chunking changes nothing"
    );
    let ended = whole.events.last() == Some(&DataState::End);
    match reference_end(input) {
        Some(end) => assert!(ended && whole.consumed == end),
        None => assert!(!ended && whole.consumed == input.len()),
    }
    let mut stream = b"\r\n".to_vec();
    stream.extend_from_slice(&whole.out);
    assert!(
        !stream.windows(5).any(|w| w == b"\r\n.\r\n"),
        "no end of data forwarded"
    );
    if policy == BareLineEndings::Normalize {
        assert!(only_crlf_line_ends(&whole.out));
    }
    if let DataVerdict::Ok { size } = whole.verdict {
        assert!(size <= max_size);
        check_accepted(policy, input, &whole.out, size, ended);
    }
}

/// A message still acceptable: its size is what the backend will count, Reject forwards
/// it unchanged, and after the end our terminator is where the backend sees the end.
fn check_accepted(policy: BareLineEndings, input: &[u8], out: &[u8], size: u64, ended: bool) {
    let expected = out.len() - stuffing_dots(out);
    assert_eq!(usize::try_from(size).ok(), Some(expected));
    if policy == BareLineEndings::Reject {
        assert!(input.starts_with(out), "forwarded unchanged");
    }
    if ended {
        assert!(out.is_empty() || out.ends_with(b"\r\n"));
        let mut terminated = out.to_vec();
        terminated.extend_from_slice(END_OF_DATA);
        let read_back = reference_end(&terminated);
        assert_eq!(
            read_back,
            Some(terminated.len()),
            "the backend ends where we end"
        );
    }
}

fn only_crlf_line_ends(out: &[u8]) -> bool {
    out.iter().enumerate().all(|(at, &byte)| match byte {
        b'\r' => out.get(at + 1) == Some(&b'\n'),
        b'\n' => at > 0 && out.get(at - 1) == Some(&b'\r'),
        _ => true,
    })
}

/// xorshift64*: deterministic, no crate needed (the generated-input test only; the fuzz
/// target brings its own inputs).
#[cfg(test)]
struct Rng(u64);

#[cfg(test)]
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(bound.max(1)).unwrap_or(1)).unwrap_or(0)
    }
}

/// Pieces that make interesting SMTP: line ends of every kind, dots, paths, verbs, replies.
#[cfg(test)]
const FRAGMENTS: [&[u8]; 28] = [
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"\r\n.\r\n",
    b"a",
    b" ",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"<",
    b">",
    b"@",
    b"\"",
    b"x.example",
    b" SIZE=12",
    b"EHLO ",
    b"[192.0.2.1]",
    b"GET ",
    b"BDAT 5 LAST",
    b"AUTH PLAIN =",
    b"250",
    b"-",
    b"2.1.0",
    b"\xc3\xa9",
    b"\xff",
    b"\0",
    b"DATA",
];

#[cfg(test)]
fn generate(rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![u8::try_from(rng.below(256)).unwrap_or(0)];
    for _ in 0..rng.below(40) {
        let fragment = FRAGMENTS
            .get(rng.below(FRAGMENTS.len()))
            .copied()
            .unwrap_or_default();
        data.extend_from_slice(fragment);
    }
    data
}

#[test]
fn invariants_hold_for_generated_inputs() {
    let mut rng = Rng(0x5eed_5374_7010_0001);
    for _ in 0..20_000 {
        check_invariants(&generate(&mut rng));
    }
}

#[test]
fn invariants_hold_for_known_edge_cases() {
    let cases: [&[u8]; 10] = [
        b"",
        b"\x01.\r\n",
        b"\x03hello\n.\nMAIL FROM:<evil@x>\r\n\r\n.\r\n",
        b"\x00hello\r.\rMAIL FROM:<evil@x>\r\n.\r\n",
        b"\x7f\r\n.\n\n.\r\n\r\n.\r\n",
        b"\x02aaaaaaaaaaaaaaaaaaaa\r\n.\r\n",
        b"\xffRCPT TO:<\"x@ext\"@ours> NOTIFY=NEVER\r\n",
        b"\x05250-a\r\n250 b\r\n",
        b"\x04GET / HTTP/1.1\r\n",
        b"\x06.\r",
    ];
    for case in cases {
        check_invariants(case);
    }
    check_invariants(&vec![b'x'; MAX_COMMAND_LINE + 1]);
}
