//! Tests for `codec_data`: end of data at every chunk split, dot-stuffing forwarded as is,
//! the size bound, and the four SMTP smuggling sequences under both policies.

use super::*;

const POLICIES: [BareLineEndings; 2] = [BareLineEndings::Reject, BareLineEndings::Normalize];
const SMUGGLING: [&str; 4] = ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r"];
const SMUGGLED: &str = "MAIL FROM:<evil@x>\r\nRCPT TO:<victim@ours.example>\r\nDATA\r\n";
const NEXT_COMMAND: &str = "QUIT\r\n";

/// What one message's reading produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    consumed: usize,
    events: Vec<DataState>,
    verdict: DataVerdict,
}

/// Feeds `input` cut at `cuts` (offsets, ascending), as a driver would: every piece until
/// it is used up or the data ended.
fn read(policy: BareLineEndings, max_size: u64, input: &[u8], cuts: &[usize]) -> Outcome {
    let mut reader = DataReader::new(max_size, policy);
    let (mut out, mut events, mut consumed) = (Vec::new(), Vec::new(), 0);
    let ends = cuts.iter().copied().chain([input.len()]);
    'pieces: for end in ends {
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
    let verdict = reader.verdict();
    Outcome {
        out,
        consumed,
        events,
        verdict,
    }
}

fn read_whole(policy: BareLineEndings, input: &str) -> Outcome {
    read(policy, u64::MAX, input.as_bytes(), &[])
}

fn ok(size: usize) -> DataVerdict {
    DataVerdict::Ok {
        size: u64::try_from(size).unwrap_or(u64::MAX),
    }
}

/// Whether a backend reading `out` then [`END_OF_DATA`] finds the end only at the end.
fn ends_only_at_the_end(out: &[u8]) -> bool {
    let mut stream = b"\r\n".to_vec();
    stream.extend_from_slice(out);
    stream.extend_from_slice(END_OF_DATA);
    let first = stream.windows(5).position(|w| w == b"\r\n.\r\n");
    first == Some(stream.len() - 5)
}

#[test]
fn message_ends_at_crlf_dot_crlf_and_the_next_command_is_left() {
    let input = "Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n";
    for policy in POLICIES {
        let outcome = read_whole(policy, input);
        assert_eq!(outcome.out, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(outcome.consumed, input.len() - NEXT_COMMAND.len());
        assert_eq!(outcome.events, vec![DataState::End]);
        assert_eq!(outcome.verdict, ok(outcome.out.len()));
        assert!(ends_only_at_the_end(&outcome.out));
    }
}

#[test]
fn dot_as_the_first_line_is_an_empty_message() {
    let outcome = read_whole(BareLineEndings::Reject, ".\r\nQUIT\r\n");
    assert_eq!((outcome.out.len(), outcome.consumed), (0, 3));
    assert_eq!(outcome.verdict, ok(0));
    let stuffed = read_whole(BareLineEndings::Reject, "..\r\n.\r\n");
    assert_eq!(stuffed.out, b"..\r\n");
    assert_eq!(stuffed.verdict, ok(3));
}

#[test]
fn dot_stuffed_lines_are_forwarded_unchanged() {
    let body = "..hidden\r\n...\r\n.x\r\nplain.\r\n. \r\n";
    let input = format!("{body}.\r\n");
    for policy in POLICIES {
        let outcome = read_whole(policy, &input);
        assert_eq!(outcome.out, body.as_bytes());
        assert_eq!(
            outcome.verdict,
            ok(body.len() - 4),
            "four stuffing dots are not counted"
        );
    }
}

#[test]
fn not_an_end_of_data() {
    for body in [
        "a\r\n.a\r\n",
        "a\r\n. \r\n",
        "a.\r\n",
        "a\r\n\r\n",
        "a\r\n..\r\n",
    ] {
        let input = format!("{body}MORE");
        let outcome = read_whole(BareLineEndings::Reject, &input);
        assert_eq!(outcome.events, Vec::<DataState>::new(), "{body:?}");
        assert_eq!(outcome.consumed, input.len());
    }
}

#[test]
fn feeding_after_the_end_consumes_nothing() {
    let mut reader = DataReader::new(100, BareLineEndings::Reject);
    let mut out = Vec::new();
    let first = reader.feed(b"x\r\n.\r\nQUIT\r\n", &mut out);
    assert_eq!((first.consumed, first.state), (6, DataState::End));
    assert!(reader.is_done());
    let again = reader.feed(b"QUIT\r\n", &mut out);
    assert_eq!((again.consumed, again.state), (0, DataState::End));
    assert_eq!(out, b"x\r\n");
    assert_eq!(reader.feed(b"", &mut out).state, DataState::End);
}

#[test]
fn end_of_data_at_every_chunk_split() {
    let input = b"From: a@b\r\n\r\n..stuffed\r\nline\r\n\r\n.\r\nMAIL FROM:<x@y>\r\n";
    for policy in POLICIES {
        let whole = read(policy, u64::MAX, input, &[]);
        assert_eq!(whole.consumed, input.len() - 17);
        for first in 0..=input.len() {
            assert_eq!(read(policy, u64::MAX, input, &[first]), whole, "{first}");
            for second in first..=input.len() {
                assert_eq!(read(policy, u64::MAX, input, &[first, second]), whole);
            }
        }
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(read(policy, u64::MAX, input, &bytewise), whole);
    }
}

#[test]
fn size_limit_is_exact_at_the_bound() {
    let body = "12345678\r\n..x\r\n";
    let size = body.len() - 1;
    let input = format!("{body}.\r\nQUIT\r\n");
    for policy in POLICIES {
        let fits = read(policy, size as u64, input.as_bytes(), &[]);
        assert_eq!(
            (fits.verdict, fits.events.clone()),
            (ok(size), vec![DataState::End])
        );
        assert_eq!(fits.out, body.as_bytes());
        let over = read(policy, size as u64 - 1, input.as_bytes(), &[]);
        let too_big = DataVerdict::TooBig { size: size as u64 };
        assert_eq!(over.verdict, too_big);
        assert_eq!(over.events, vec![DataState::Exceeded, DataState::End]);
        assert_eq!(over.consumed, input.len() - NEXT_COMMAND.len());
        assert!(over.out.len() < body.len());
    }
}

#[test]
fn an_oversized_message_is_read_to_its_end_without_forwarding() {
    let line = "x".repeat(78) + "\r\n";
    let body = line.repeat(1000);
    let input = format!("{body}.\r\nQUIT\r\n");
    let cuts: Vec<usize> = (1..input.len() / 100).map(|n| n * 100).collect();
    for policy in POLICIES {
        let outcome = read(policy, 1000, input.as_bytes(), &cuts);
        assert_eq!(outcome.events, vec![DataState::Exceeded, DataState::End]);
        assert_eq!(
            outcome.verdict,
            DataVerdict::TooBig {
                size: body.len() as u64
            }
        );
        assert_eq!(outcome.out, body.as_bytes().get(..1000).unwrap_or_default());
        assert_eq!(outcome.consumed, input.len() - NEXT_COMMAND.len());
    }
}

fn smuggling_input(sequence: &str) -> String {
    format!("Subject: hi\r\n\r\nhello{sequence}{SMUGGLED}smuggled body\r\n.\r\n{NEXT_COMMAND}")
}

#[test]
fn smuggling_sequences_are_refused_under_reject() {
    for sequence in SMUGGLING {
        let input = smuggling_input(sequence);
        let outcome = read_whole(BareLineEndings::Reject, &input);
        assert_eq!(
            outcome.events,
            vec![DataState::BareLineEnding, DataState::End],
            "{sequence:?}"
        );
        assert_eq!(outcome.verdict, DataVerdict::BareLineEnding);
        assert_eq!(
            outcome.consumed,
            input.len() - NEXT_COMMAND.len(),
            "{sequence:?}"
        );
        let forwarded = String::from_utf8_lossy(&outcome.out);
        assert!(
            !forwarded.contains("MAIL FROM"),
            "{sequence:?}: {forwarded:?}"
        );
        assert!(forwarded.starts_with("Subject: hi\r\n\r\nhello"));
    }
}

#[test]
fn smuggling_sequences_stay_in_the_body_under_normalize() {
    let expected = format!("Subject: hi\r\n\r\nhello\r\n..\r\n{SMUGGLED}smuggled body\r\n");
    for sequence in SMUGGLING {
        let input = smuggling_input(sequence);
        let outcome = read_whole(BareLineEndings::Normalize, &input);
        assert_eq!(outcome.events, vec![DataState::End], "{sequence:?}");
        assert_eq!(
            outcome.consumed,
            input.len() - NEXT_COMMAND.len(),
            "{sequence:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&outcome.out),
            expected,
            "{sequence:?}"
        );
        assert!(ends_only_at_the_end(&outcome.out));
    }
}

#[test]
fn smuggling_sequences_at_every_chunk_split() {
    for sequence in SMUGGLING {
        let input = smuggling_input(sequence);
        let bytes = input.as_bytes();
        for policy in POLICIES {
            let whole = read(policy, u64::MAX, bytes, &[]);
            for cut in 0..=bytes.len() {
                assert_eq!(
                    read(policy, u64::MAX, bytes, &[cut]),
                    whole,
                    "{sequence:?} {cut}"
                );
            }
        }
    }
}

#[test]
fn smuggling_sequences_on_the_first_line() {
    for (input, normalized) in [
        (".\nX\r\n.\r\n", "..\r\nX\r\n"),
        (".\rX\r\n.\r\n", "..\r\nX\r\n"),
    ] {
        let outcome = read_whole(BareLineEndings::Normalize, input);
        assert_eq!(outcome.out, normalized.as_bytes());
        assert_eq!(outcome.consumed, input.len());
        let refused = read_whole(BareLineEndings::Reject, input);
        assert_eq!(refused.verdict, DataVerdict::BareLineEnding);
        assert_eq!(refused.consumed, input.len());
    }
}

#[test]
fn every_bare_ending_becomes_crlf_under_normalize() {
    let input = "a\rb\nc\r\r\nd\n\n.\r\n.x\n\r\n.\r\n";
    let outcome = read_whole(BareLineEndings::Normalize, input);
    let expected = "a\r\nb\r\nc\r\n\r\nd\r\n\r\n..\r\n.x\r\n\r\n";
    assert_eq!(String::from_utf8_lossy(&outcome.out), expected);
    assert_eq!(outcome.verdict, ok(expected.len() - 2));
    assert_eq!(outcome.consumed, input.len());
}

#[test]
fn reject_forwards_up_to_the_first_bare_ending() {
    let input = "ok line\r\nbad\nmore\r\n.\r\n";
    let outcome = read_whole(BareLineEndings::Reject, input);
    assert_eq!(outcome.out, b"ok line\r\nbad");
    assert_eq!(
        outcome.events,
        vec![DataState::BareLineEnding, DataState::End]
    );
    assert_eq!(outcome.consumed, input.len());
    let cr = read_whole(BareLineEndings::Reject, "a\rb\r\n.\r\n");
    assert_eq!(
        (cr.out, cr.verdict),
        (b"a".to_vec(), DataVerdict::BareLineEnding)
    );
}

#[test]
fn binary_content_passes_unchanged() {
    let body: Vec<u8> = (0..=255u8)
        .filter(|&b| b != b'\r' && b != b'\n')
        .chain(*b"\r\n")
        .collect();
    let mut input = body.clone();
    input.extend_from_slice(b".\r\n");
    let outcome = read(BareLineEndings::Reject, u64::MAX, &input, &[]);
    assert_eq!(outcome.out, body);
    assert_eq!(outcome.verdict, ok(body.len()));
}

#[test]
fn the_first_refusal_wins() {
    let input = "a\nbbbbbbbbbb\r\n.\r\n";
    let outcome = read(BareLineEndings::Reject, 4, input.as_bytes(), &[]);
    assert_eq!(
        outcome.events,
        vec![DataState::BareLineEnding, DataState::End]
    );
    assert_eq!(outcome.verdict, DataVerdict::BareLineEnding);
}
