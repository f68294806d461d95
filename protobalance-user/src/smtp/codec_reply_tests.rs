//! Tests for `codec_reply`: encoders, the backend reply decoder (SMTP and LMTP), bounds.

use super::*;

fn decode(buf: &str) -> Reply {
    match decode_reply(buf.as_bytes()) {
        Ok(Decoded::Complete { value, consumed }) if consumed == buf.len() => value,
        other => panic!("{buf:?}: {other:?}"),
    }
}

fn lines(reply: &Reply) -> Vec<&str> {
    reply.lines.iter().map(String::as_str).collect()
}

#[test]
fn encodes_single_line_replies() {
    assert_eq!(reply(250, Some("2.1.0"), "OK"), b"250 2.1.0 OK\r\n");
    assert_eq!(reply(221, None, "Bye"), b"221 Bye\r\n");
    assert_eq!(reply(221, None, ""), b"221\r\n");
    assert_eq!(reply(250, Some("2.0.0"), ""), b"250 2.0.0\r\n");
    assert_eq!(
        reply(552, Some("5.3.4"), "Too big"),
        b"552 5.3.4 Too big\r\n"
    );
    assert_eq!(reply(451, Some("4.4.1"), "x"), b"451 4.4.1 x\r\n");
}

#[test]
fn bad_enhanced_codes_are_left_out() {
    for enhanced in [
        "5.1.1", "2.1", "2.1.0.0", "2.1000.0", "2..0", "3.0.0", "2.a.0", " 2.1.0",
    ] {
        assert_eq!(
            reply(250, Some(enhanced), "OK"),
            b"250 OK\r\n",
            "{enhanced:?}"
        );
    }
    assert_eq!(reply(354, Some("2.0.0"), "Go"), b"354 Go\r\n");
}

#[test]
fn encoders_cannot_be_made_to_inject_lines() {
    assert_eq!(reply(250, None, "a\r\n250 b"), b"250 a  250 b\r\n");
    assert_eq!(reply(99, Some("2.0.0"), "x"), b"451 x\r\n");
    assert_eq!(reply(600, None, "x"), b"451 x\r\n");
    let long = reply(554, Some("5.7.1"), &"x".repeat(1000));
    assert_eq!(long.len(), MAX_ENCODED_REPLY_LINE);
    assert!(long.ends_with(b"x\r\n"));
    let wide = reply(250, None, &"é".repeat(600));
    assert!(wide.len() <= MAX_ENCODED_REPLY_LINE && wide.ends_with(b"\r\n"));
    assert!(std::str::from_utf8(&wide).is_ok());
}

#[test]
fn encodes_multi_line_replies() {
    let out = multiline_reply(550, Some("5.1.1"), &["first", "second"]);
    assert_eq!(out, b"550-5.1.1 first\r\n550 5.1.1 second\r\n");
    assert_eq!(multiline_reply(250, None, &[]), b"250\r\n");
    assert_eq!(multiline_reply(250, None, &["", ""]), b"250-\r\n250\r\n");
    let ehlo = ehlo_reply(
        "mx.example.org",
        &["PIPELINING", "SIZE 10240000", "ENHANCEDSTATUSCODES"],
    );
    let expected =
        "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 ENHANCEDSTATUSCODES\r\n";
    assert_eq!(ehlo, expected.as_bytes());
    assert_eq!(ehlo_reply("mx", &[]), b"250 mx\r\n");
}

#[test]
fn decodes_single_line_replies() {
    let ok = decode("250 2.1.0 Ok\r\n");
    assert_eq!(
        (ok.code, ok.enhanced, lines(&ok)),
        (250, Some((2, 1, 0)), vec!["Ok"])
    );
    let banner = decode("220 mx.example.org ESMTP Postfix\r\n");
    assert_eq!(
        (banner.enhanced, lines(&banner)),
        (None, vec!["mx.example.org ESMTP Postfix"])
    );
    assert_eq!(lines(&decode("250\r\n")), vec![""]);
    assert_eq!(lines(&decode("250 \r\n")), vec![""]);
    let only_code = decode("250 2.0.0\r\n");
    assert_eq!(
        (only_code.enhanced, lines(&only_code)),
        (Some((2, 0, 0)), vec![""])
    );
    let go = decode("354 End data with <CR><LF>.<CR><LF>\r\n");
    assert!(go.is_intermediate() && go.enhanced.is_none());
    let mismatch = decode("250 5.1.1 text\r\n");
    assert_eq!(
        (mismatch.enhanced, lines(&mismatch)),
        (None, vec!["5.1.1 text"])
    );
    let wide = decode("550 5.7.1 Relaying denied\r\n");
    assert_eq!(wide.enhanced, Some((5, 7, 1)));
    assert_eq!(decode("452 4.5.3 Too many\r\n").enhanced, Some((4, 5, 3)));
    assert_eq!(decode("550 5.100.999 x\r\n").enhanced, Some((5, 100, 999)));
}

#[test]
fn reply_classes() {
    let class = |line: &str| {
        let r = decode(line);
        [
            r.is_positive(),
            r.is_intermediate(),
            r.is_transient(),
            r.is_permanent(),
        ]
    };
    assert_eq!(class("250 x\r\n"), [true, false, false, false]);
    assert_eq!(class("334 \r\n"), [false, true, false, false]);
    assert_eq!(class("421 x\r\n"), [false, false, true, false]);
    assert_eq!(class("554 x\r\n"), [false, false, false, true]);
}

#[test]
fn decodes_ehlo_and_its_extensions() {
    let buf = "250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-XCLIENT NAME ADDR\r\n250 8BITMIME\r\n";
    let ehlo = decode(buf);
    assert_eq!(ehlo.lines.len(), 5);
    assert_eq!(ehlo.extension("size"), Some("10240000"));
    assert_eq!(ehlo.extension("PIPELINING"), Some(""));
    assert_eq!(ehlo.extension("xclient"), Some("NAME ADDR"));
    assert_eq!(ehlo.extension("8BITMIME"), Some(""));
    assert_eq!(
        ehlo.extension("mx.example.org"),
        None,
        "the greeting is no extension"
    );
    assert_eq!(ehlo.extension("STARTTLS"), None);
}

#[test]
fn enhanced_codes_are_stripped_from_every_line() {
    let reply = decode("550-5.1.1 first\r\n550-5.1.1\r\n550 5.1.1 last\r\n");
    assert_eq!(reply.enhanced, Some((5, 1, 1)));
    assert_eq!(lines(&reply), vec!["first", "", "last"]);
    let mixed = decode("550-5.1.1 first\r\n550 5.7.1 other\r\n");
    assert_eq!(lines(&mixed), vec!["first", "5.7.1 other"]);
}

#[test]
fn lmtp_replies_after_data_decode_one_after_another() {
    let buf = b"250 2.1.5 <a@x> Saved\r\n452 4.2.2 <b@x> Mailbox full\r\n550-5.1.1 <c@x>\r\n550 5.1.1 unknown\r\n";
    let mut at = 0;
    let mut replies = Vec::new();
    while at < buf.len() {
        let rest = buf.get(at..).unwrap_or_default();
        let Ok(Decoded::Complete { value, consumed }) = decode_reply(rest) else {
            panic!("at {at}");
        };
        replies.push((value.code, value.enhanced));
        at += consumed;
    }
    let expected = vec![
        (250, Some((2, 1, 5))),
        (452, Some((4, 2, 2))),
        (550, Some((5, 1, 1))),
    ];
    assert_eq!(replies, expected);
}

#[test]
fn incomplete_at_every_split_point() {
    let buf = b"250-mx\r\n250-SIZE 100\r\n250 OK\r\n";
    for end in 0..buf.len() {
        let prefix = buf.get(..end).unwrap_or_default();
        assert_eq!(decode_reply(prefix), Ok(Decoded::Incomplete), "{end}");
    }
    let next = b"250-mx\r\n250 OK\r\n220 next\r\n";
    assert!(matches!(
        decode_reply(next),
        Ok(Decoded::Complete { consumed: 16, .. })
    ));
}

#[test]
fn malformed_replies() {
    let bad = [
        "25\r\n",
        "abc x\r\n",
        "650 x\r\n",
        "150 x\r\n",
        "250x\r\n",
        "2a0 x\r\n",
        "250-a\r\n251 b\r\n",
        "\r\n",
    ];
    for buf in bad {
        assert_eq!(
            decode_reply(buf.as_bytes()),
            Err(CodecError::BadReply),
            "{buf:?}"
        );
    }
}

#[test]
fn lenient_about_line_ends_and_text() {
    let lf = decode("250-a\n250 b\n");
    assert_eq!(lines(&lf), vec!["a", "b"]);
    let messy = decode_reply(b"250 caf\xe9\tok\r\n");
    let Ok(Decoded::Complete { value, .. }) = messy else {
        panic!("{messy:?}")
    };
    assert_eq!(lines(&value), vec!["caf\u{fffd} ok"]);
}

#[test]
fn bounds_on_line_length_and_line_count() {
    let longest = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE - 6));
    assert_eq!(decode(&longest).code, 250);
    let over = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE - 5));
    assert_eq!(decode_reply(over.as_bytes()), Err(CodecError::LineTooLong));
    let endless = "2".repeat(MAX_REPLY_LINE);
    assert_eq!(
        decode_reply(endless.as_bytes()),
        Err(CodecError::LineTooLong)
    );
    let most = format!("{}250 end\r\n", "250-x\r\n".repeat(MAX_REPLY_LINES - 1));
    assert_eq!(decode(&most).lines.len(), MAX_REPLY_LINES);
    let too_many = format!("{}250 end\r\n", "250-x\r\n".repeat(MAX_REPLY_LINES));
    assert_eq!(
        decode_reply(too_many.as_bytes()),
        Err(CodecError::TooManyLines)
    );
    let unfinished = "250-x\r\n".repeat(MAX_REPLY_LINES);
    assert_eq!(
        decode_reply(unfinished.as_bytes()),
        Err(CodecError::TooManyLines)
    );
}

#[test]
fn encoded_replies_decode_back() {
    let cases: [(u16, Option<&str>, &[&str]); 4] = [
        (250, Some("2.1.5"), &["Recipient ok"]),
        (550, Some("5.1.1"), &["No such user", "here"]),
        (220, None, &["mx.example.org ESMTP"]),
        (421, Some("4.3.2"), &[]),
    ];
    for (code, enhanced, text) in cases {
        let reply = decode_reply(&multiline_reply(code, enhanced, text));
        let Ok(Decoded::Complete { value, .. }) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(value.code, code);
        let expected = enhanced.and_then(|e| parse_enhanced(e, code));
        assert_eq!(value.enhanced, expected);
        let want: Vec<&str> = if text.is_empty() {
            vec![""]
        } else {
            text.to_vec()
        };
        assert_eq!(lines(&value), want);
    }
}
