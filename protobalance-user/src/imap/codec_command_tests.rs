//! Tests for `codec_command`: each command, literals and continuations, bounds, bad
//! input, and a seeded random sweep standing in for the fuzzer.

use super::*;
use crate::imap::codec::{MAX_COMMAND, MAX_LINE, MAX_LITERAL};

fn command(tag: &str, kind: CommandKind) -> Command {
    Command {
        tag: tag.into(),
        kind,
    }
}

fn login(user: &str, password: &str) -> CommandKind {
    CommandKind::Login {
        user: user.into(),
        password: Secret::new(password.into()),
    }
}

/// The one command `input` holds, all of it consumed.
fn decode(input: &[u8]) -> Command {
    match decode_command(input) {
        Ok(Decoded::Complete { value, consumed }) if consumed == input.len() => value,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
    }
}

/// The syntax error `input` gets, checking it skips the whole input.
fn syntax_error(input: &[u8]) -> (Option<String>, &'static str) {
    match decode_command(input) {
        Err(CodecError::Syntax { tag, reason, skip }) if skip == input.len() => (tag, reason),
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
    }
}

#[test]
fn simple_commands_in_any_case() {
    let cases = [
        ("a1 CAPABILITY\r\n", CommandKind::Capability),
        ("a2 capability\r\n", CommandKind::Capability),
        ("A3 NoOp\r\n", CommandKind::Noop),
        ("a4 LOGOUT\n", CommandKind::Logout),
        ("x]y starttls\r\n", CommandKind::StartTls),
    ];
    for (input, kind) in cases {
        let tag = input.split(' ').next().unwrap_or_default();
        assert_eq!(decode(input.as_bytes()), command(tag, kind));
    }
}

#[test]
fn starttls_consumes_only_its_own_line() {
    let input = b"t STARTTLS\r\nt2 LOGIN injected pw\r\n";
    let decoded = decode_command(input);
    let expected = command("t", CommandKind::StartTls);
    assert_eq!(
        decoded,
        Ok(Decoded::Complete {
            value: expected,
            consumed: 12
        })
    );
}

#[test]
fn login_with_atoms_quoted_strings_and_escapes() {
    assert_eq!(
        decode(b"a1 LOGIN bob hunter2\r\n").kind,
        login("bob", "hunter2")
    );
    assert_eq!(
        decode(b"a1 login \"bob\" \"a b\"\r\n").kind,
        login("bob", "a b")
    );
    let escaped = decode(br#"a1 LOGIN "b\\o\"b" "\"\\""#.iter().chain(b"\r\n").copied().collect::<Vec<_>>().as_slice());
    assert_eq!(escaped.kind, login(r#"b\o"b"#, r#""\"#));
    let utf8 = decode("a1 LOGIN \"j\u{f6}rg\" \"p\u{e4}ss\"\r\n".as_bytes());
    assert_eq!(utf8.kind, login("j\u{f6}rg", "p\u{e4}ss"));
    assert_eq!(decode(b"a1 LOGIN \"\" \"\"\r\n").kind, login("", ""));
    assert_eq!(decode(b"a1 LOGIN b]ob pw]\r\n").kind, login("b]ob", "pw]"));
}

#[test]
fn login_with_a_synchronizing_literal_waits_for_our_continuation() {
    let stream = b"a1 LOGIN {3}\r\nbob {6}\r\np\"w d\\\r\nnext";
    let need = |literal_len| {
        Ok(Decoded::NeedContinuation {
            tag: "a1".into(),
            literal_len,
        })
    };
    assert_eq!(decode_command(&stream[..14]), need(3));
    assert_eq!(decode_command(&stream[..15]), Ok(Decoded::Incomplete));
    assert_eq!(decode_command(&stream[..23]), need(6));
    assert_eq!(decode_command(&stream[..30]), Ok(Decoded::Incomplete));
    let expected = command("a1", login("bob", "p\"w d\\"));
    assert_eq!(
        decode_command(stream),
        Ok(Decoded::Complete {
            value: expected,
            consumed: 31
        })
    );
}

#[test]
fn login_with_non_synchronizing_literals() {
    let stream = b"a1 LOGIN {3+}\r\nbob {4+}\n\xc3\xa4 x\r\n";
    for end in 0..stream.len() {
        assert_eq!(
            decode_command(&stream[..end]),
            Ok(Decoded::Incomplete),
            "{end}"
        );
    }
    assert_eq!(decode(stream).kind, login("bob", "\u{e4} x"));
    assert_eq!(
        decode(b"a1 LOGIN {0+}\r\n {0+}\r\n\r\n").kind,
        login("", "")
    );
}

#[test]
fn an_empty_synchronizing_literal_still_waits() {
    let need = Ok(Decoded::NeedContinuation {
        tag: "a1".into(),
        literal_len: 0,
    });
    assert_eq!(decode_command(b"a1 LOGIN bob {0}\r\n"), need);
    assert_eq!(decode(b"a1 LOGIN bob {0}\r\n\r\n").kind, login("bob", ""));
}

/// A pipelined stream and the offset just past each command.
fn pipeline() -> (Vec<u8>, Vec<(usize, Command)>) {
    let pieces: [(&[u8], Command); 5] = [
        (b"a1 CAPABILITY\r\n", command("a1", CommandKind::Capability)),
        (
            b"a2 ID (\"name\" {3+}\r\nfoo)\r\n",
            command(
                "a2",
                CommandKind::Id(Some(vec![("name".into(), Some("foo".into()))])),
            ),
        ),
        (
            b"a3 LOGIN {3}\r\nbob {4+}\r\np\"w \r\n",
            command("a3", login("bob", "p\"w ")),
        ),
        (
            b"a4 SELECT {5+}\r\nINBOX\r\n",
            command(
                "a4",
                CommandKind::Unknown {
                    name: "SELECT".into(),
                },
            ),
        ),
        (b"a5 logout\r\n", command("a5", CommandKind::Logout)),
    ];
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for (bytes, command) in pieces {
        stream.extend_from_slice(bytes);
        ends.push((stream.len(), command));
    }
    (stream, ends)
}

#[test]
fn every_split_of_a_pipeline_decodes_the_same() {
    let (stream, ends) = pipeline();
    let awaiting_plus = ends
        .get(1)
        .map_or(0, |(end, _)| end + b"a3 LOGIN {3}\r\n".len());
    for split in 0..=stream.len() {
        let buf = &stream[..split];
        let (mut offset, mut decoded) = (0, Vec::new());
        let last = loop {
            match decode_command(&buf[offset..]) {
                Ok(Decoded::Complete { value, consumed }) => {
                    offset += consumed;
                    decoded.push((offset, value));
                }
                other => break other,
            }
        };
        let expected: Vec<_> = ends
            .iter()
            .filter(|(end, _)| *end <= split)
            .cloned()
            .collect();
        assert_eq!(decoded, expected, "split at {split}");
        if split == awaiting_plus {
            let need = Decoded::NeedContinuation {
                tag: "a3".into(),
                literal_len: 3,
            };
            assert_eq!(last, Ok(need));
        } else {
            assert_eq!(last, Ok(Decoded::Incomplete), "split at {split}");
        }
    }
}

#[test]
fn line_length_bound_is_exact() {
    let line = |len: usize| {
        let mut line = b"a1 LOGIN bob \"".to_vec();
        line.resize(len - 3, b'x');
        line.extend_from_slice(b"\"\r\n");
        line
    };
    let fits = line(MAX_LINE);
    assert!(matches!(decode(&fits).kind, CommandKind::Login { .. }));
    assert_eq!(
        decode_command(&line(MAX_LINE + 1)),
        Err(CodecError::LineTooLong)
    );
    assert_eq!(
        decode_command(&fits[..MAX_LINE - 1]),
        Ok(Decoded::Incomplete)
    );
    let unterminated = vec![b'a'; MAX_LINE];
    assert_eq!(decode_command(&unterminated), Err(CodecError::LineTooLong));
}

#[test]
fn literal_size_bound_is_exact() {
    let head = format!("a1 LOGIN bob {{{MAX_LITERAL}}}\r\n");
    let need = Ok(Decoded::NeedContinuation {
        tag: "a1".into(),
        literal_len: MAX_LITERAL,
    });
    assert_eq!(decode_command(head.as_bytes()), need);
    let mut full = head.into_bytes();
    full.extend(std::iter::repeat_n(b'p', MAX_LITERAL));
    full.extend_from_slice(b"\r\n");
    assert!(
        matches!(decode(&full).kind, CommandKind::Login { password, .. } if password.expose().len() == MAX_LITERAL)
    );
    for (announcement, synchronizing) in [
        ("4097", true),
        ("4097+", false),
        ("99999999999999999999999", true),
    ] {
        let input = format!("a1 LOGIN bob {{{announcement}}}\r\n");
        let expected = CodecError::LiteralTooLarge {
            tag: Some("a1".into()),
            skip: input.len(),
            synchronizing,
        };
        assert_eq!(decode_command(input.as_bytes()), Err(expected));
    }
    let untagged = decode_command(b"+a LOGIN bob {5000}\r\n");
    assert!(matches!(
        untagged,
        Err(CodecError::LiteralTooLarge { tag: None, .. })
    ));
}

#[test]
fn two_maximal_literals_fit_the_command_bound() {
    let mut input = format!("a1 LOGIN {{{MAX_LITERAL}+}}\r\n").into_bytes();
    input.extend(std::iter::repeat_n(b'u', MAX_LITERAL));
    input.extend_from_slice(format!(" {{{MAX_LITERAL}+}}\r\n").as_bytes());
    input.extend(std::iter::repeat_n(b'p', MAX_LITERAL));
    input.extend_from_slice(b"\r\n");
    assert!(input.len() < MAX_COMMAND);
    assert!(matches!(decode(&input).kind, CommandKind::Login { .. }));
}

#[test]
fn bad_tags_and_missing_commands() {
    for input in [
        "+a NOOP\r\n",
        "* NOOP\r\n",
        " NOOP\r\n",
        "a(b NOOP\r\n",
        "\"a\" NOOP\r\n",
        "\r\n",
        "\u{e9} NOOP\r\n",
    ] {
        assert_eq!(
            syntax_error(input.as_bytes()),
            (None, "missing or invalid tag"),
            "{input:?}"
        );
    }
    for input in ["a1\r\n", "a1 \r\n", "a1  NOOP\r\n", "a1 (NOOP)\r\n"] {
        assert_eq!(
            syntax_error(input.as_bytes()),
            (Some("a1".into()), "missing command"),
            "{input:?}"
        );
    }
}

#[test]
fn malformed_arguments() {
    for input in [
        &b"a1 NOOP extra\r\n"[..],
        b"a1 NOOP \r\n",
        b"a1 CAPABILITY(\r\n",
        b"a1 LOGIN bob\r\n",
        b"a1 LOGIN bob pw extra\r\n",
        b"a1 LOGIN bob \"unterminated\r\n",
        b"a1 LOGIN bob \"bad\\escape\"\r\n",
        b"a1 LOGIN bob \"nul\0\"\r\n",
        b"a1 LOGIN bob \"cr\rx\"\r\n",
        b"a1 LOGIN bob \"latin1 \xe9\"\r\n",
        b"a1 LOGIN b\xc3\xb6b pw\r\n",
        b"a1 LOGIN bob {3+}\r\nn\0l\r\n",
        b"a1 LOGIN bob {1+}\r\n\xff\r\n",
        b"a1 LOGIN {3} bob\r\n",
        b"a1 LOGIN bob pw\rx\r\n",
    ] {
        assert!(syntax_error(input).0.is_some(), "{input:?}");
    }
}

#[test]
fn errors_never_echo_the_password() {
    let Err(error) = decode_command(b"a1 LOGIN bob \"hunter2\0\"\r\n") else {
        panic!("NUL accepted");
    };
    assert!(!format!("{error} {error:?}").contains("hunter2"));
}

#[test]
fn syntax_errors_skip_non_synchronizing_literals() {
    let input = b"a1 NOOP {11+}\r\nb2 LOGOUT\r\n\r\nc3 NOOP\r\n";
    let skip = input.len() - b"c3 NOOP\r\n".len();
    let expected = CodecError::Syntax {
        tag: Some("a1".into()),
        reason: "expected end of line",
        skip,
    };
    assert_eq!(decode_command(input), Err(expected));
}

#[test]
fn a_bad_command_before_a_synchronizing_literal_is_refused_at_once() {
    let input = b"a1 LOGIN \"open {3}\r\n";
    assert!(matches!(
        decode_command(input),
        Err(CodecError::Syntax { skip: 20, .. })
    ));
    assert!(matches!(
        decode_command(b"a1 NOOP {3}\r\n"),
        Err(CodecError::Syntax { .. })
    ));
}

#[test]
fn unknown_commands_are_consumed_whole() {
    let select = CommandKind::Unknown {
        name: "select".into(),
    };
    assert_eq!(decode(b"a1 select INBOX\r\n").kind, select);
    let input = b"a1 select {5+}\r\nINBOX\r\nnext";
    assert_eq!(
        decode_command(input),
        Ok(Decoded::Complete {
            value: command("a1", select.clone()),
            consumed: 23
        })
    );
    // A synchronizing literal is not asked for: our tagged reply stands in for the `+`.
    let input = b"a1 select {5}\r\n";
    assert_eq!(
        decode_command(input),
        Ok(Decoded::Complete {
            value: command("a1", select),
            consumed: 15
        })
    );
}

#[test]
fn authenticate_with_and_without_initial_response() {
    let auth = |initial| CommandKind::Authenticate {
        mechanism: "PLAIN".into(),
        initial,
    };
    assert_eq!(decode(b"a1 AUTHENTICATE PLAIN\r\n").kind, auth(None));
    assert_eq!(
        decode(b"a1 authenticate plain =\r\n").kind,
        auth(Some(InitialResponse::Empty))
    );
    let ir = InitialResponse::Base64(Secret::new("AGJvYgBwdw==".into()));
    assert_eq!(
        decode(b"a1 AUTHENTICATE PLAIN AGJvYgBwdw==\r\n").kind,
        auth(Some(ir))
    );
    let other = decode(b"a1 AUTHENTICATE x-oauth2\r\n").kind;
    assert_eq!(
        other,
        CommandKind::Authenticate {
            mechanism: "X-OAUTH2".into(),
            initial: None
        }
    );
    for bad in [
        "a1 AUTHENTICATE PLAIN AGJvYgBwdw=\r\n",
        "a1 AUTHENTICATE PLAIN \r\n",
        "a1 AUTHENTICATE PLAIN ==\r\n",
        "a1 AUTHENTICATE\r\n",
        "a1 AUTHENTICATE PLAIN AGJv YgBw\r\n",
    ] {
        assert_eq!(
            syntax_error(bad.as_bytes()).0.as_deref(),
            Some("a1"),
            "{bad:?}"
        );
    }
}

#[test]
fn id_with_nil_pairs_and_literals() {
    assert_eq!(decode(b"a1 ID NIL\r\n").kind, CommandKind::Id(None));
    assert_eq!(decode(b"a1 id nil\r\n").kind, CommandKind::Id(None));
    assert_eq!(decode(b"a1 ID ()\r\n").kind, CommandKind::Id(Some(vec![])));
    let input = b"a1 ID (\"name\" \"Thunderbird\" \"version\" NIL \"x\" {2}\r\nab)\r\n";
    let pairs = vec![
        ("name".into(), Some("Thunderbird".into())),
        ("version".into(), None),
        ("x".into(), Some("ab".into())),
    ];
    let need = Ok(Decoded::NeedContinuation {
        tag: "a1".into(),
        literal_len: 2,
    });
    assert_eq!(decode_command(&input[..input.len() - 5]), need);
    assert_eq!(decode(input).kind, CommandKind::Id(Some(pairs)));
}

#[test]
fn malformed_or_oversized_id() {
    let thirty = "\"f\" NIL ".repeat(30);
    let ok = format!("a1 ID ({})\r\n", thirty.trim_end());
    assert!(
        matches!(decode(ok.as_bytes()).kind, CommandKind::Id(Some(pairs)) if pairs.len() == 30)
    );
    let long_value = "v".repeat(1025);
    for bad in [
        format!("a1 ID ({thirty}\"f\" NIL)\r\n"),
        format!("a1 ID (\"{}\" NIL)\r\n", "f".repeat(31)),
        format!("a1 ID (\"f\" \"{long_value}\")\r\n"),
        "a1 ID (name \"x\")\r\n".into(),
        "a1 ID (\"name\")\r\n".into(),
        "a1 ID (\"a\" NIL \"b\")\r\n".into(),
        "a1 ID (\"a\" NIL\r\n".into(),
        "a1 ID (\"a\" NIL )\r\n".into(),
        "a1 ID NILL\r\n".into(),
        "a1 ID\r\n".into(),
    ] {
        assert_eq!(
            syntax_error(bad.as_bytes()).0.as_deref(),
            Some("a1"),
            "{bad:?}"
        );
    }
}

#[test]
fn debug_output_never_shows_secrets() {
    let login = decode(b"a1 LOGIN bob hunter2\r\n");
    assert!(!format!("{login:?}").contains("hunter2"));
    let auth = decode(b"a1 AUTHENTICATE PLAIN AGJvYgBodW50ZXIy\r\n");
    assert!(!format!("{auth:?}").contains("AGJvYgBodW50ZXIy"));
}

#[test]
fn random_input_never_panics_and_keeps_invariants() {
    const TOKENS: [&[u8]; 24] = [
        b"a1",
        b" ",
        b"LOGIN",
        b"login",
        b"{3}",
        b"{3+}",
        b"{0}",
        b"{4097}",
        b"\r\n",
        b"\n",
        b"\r",
        b"\"",
        b"\\",
        b"\0",
        b"\xff",
        b"\xc3\xa4",
        b"ID",
        b"(",
        b")",
        b"NIL",
        b"AUTHENTICATE PLAIN",
        b"=",
        b"*",
        b"+",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % 1024).unwrap_or_default()
    };
    for _ in 0..20_000 {
        let mut data = Vec::new();
        for _ in 0..next() % 24 {
            data.extend_from_slice(
                TOKENS
                    .get(next() % TOKENS.len())
                    .copied()
                    .unwrap_or_default(),
            );
        }
        crate::imap::codec::props::check_invariants(&data);
    }
    let (stream, _) = pipeline();
    for split in 0..=stream.len() {
        crate::imap::codec::props::check_invariants(&stream[..split]);
    }
}
