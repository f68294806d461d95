//! Tests for `codec_encode`, including encode → decode round trips through
//! `decode_command`.

use super::*;
use crate::imap::codec::{Command, CommandKind, Decoded, InitialResponse, decode_command};

fn secret(text: &str) -> Secret<String> {
    Secret::new(text.to_owned())
}

fn joined(command: &EncodedCommand) -> Vec<u8> {
    command
        .fragments()
        .iter()
        .flat_map(|fragment| fragment.expose().clone())
        .collect()
}

fn login(user: &str, password: &str, mode: LiteralMode) -> EncodedCommand {
    match encode_login("a1", user, &secret(password), mode) {
        Ok(command) => command,
        Err(error) => panic!("encode_login({user:?}): {error}"),
    }
}

/// Decodes `bytes` as one whole command, answering every `NeedContinuation` the way a
/// driver would: by reading on.
fn decode_whole(bytes: &[u8]) -> Command {
    match decode_command(bytes) {
        Ok(Decoded::Complete { value, consumed }) if consumed == bytes.len() => value,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
    }
}

#[test]
fn server_responses() {
    assert_eq!(untagged("OK ready"), b"* OK ready\r\n");
    assert_eq!(tagged_ok("a1", None, "done"), b"a1 OK done\r\n");
    let failed = tagged_no("a1", Some("AUTHENTICATIONFAILED"), "Authentication failed.");
    assert_eq!(
        failed,
        b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    );
    assert_eq!(
        tagged_bad("x]", Some("TOOBIG"), "Literal"),
        b"x] BAD [TOOBIG] Literal\r\n"
    );
    assert_eq!(continuation(""), b"+ \r\n");
    assert_eq!(continuation("Ready"), b"+ Ready\r\n");
    assert_eq!(bye("Logging out"), b"* BYE Logging out\r\n");
    let caps = ["IMAP4rev1", "ID", "AUTH=PLAIN"];
    assert_eq!(
        capability_line(&caps),
        b"* CAPABILITY IMAP4rev1 ID AUTH=PLAIN\r\n"
    );
    let greeting = greeting(&caps, "ready.");
    assert_eq!(
        greeting,
        b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] ready.\r\n"
    );
}

#[test]
fn server_text_cannot_inject_lines() {
    let evil = tagged_no("a1\r\n* BYE", Some("X\r\n"), "no\r\na2 OK\0yes");
    assert_eq!(evil, b"a1  * BYE NO [X  ] no  a2 OK yes\r\n");
    assert_eq!(
        untagged("a\nb")
            .iter()
            .filter(|&&byte| byte == b'\n')
            .count(),
        1
    );
}

#[test]
fn client_commands() {
    assert_eq!(encode_capability("a0"), Ok(b"a0 CAPABILITY\r\n".to_vec()));
    assert_eq!(encode_logout("a9"), Ok(b"a9 LOGOUT\r\n".to_vec()));
    assert_eq!(encode_logout("a 9"), Err(EncodeError::InvalidTag));
    assert_eq!(encode_capability(""), Err(EncodeError::InvalidTag));
}

#[test]
fn login_is_quoted_when_it_can_be() {
    let command = login("bob", r#"p "w\d x"#, LiteralMode::Synchronizing);
    assert!(!command.needs_continuation());
    assert_eq!(
        joined(&command),
        br#"a1 LOGIN "bob" "p \"w\\d x""#.iter().chain(b"\r\n").copied().collect::<Vec<_>>()
    );
    assert!(matches!(
        decode_whole(&joined(&command)).kind,
        CommandKind::Login { user, password } if user == "bob" && password.expose() == r#"p "w\d x"#
    ));
}

#[test]
fn login_uses_literals_for_non_ascii() {
    let sync = login("j\u{f6}rg", "p\u{e4}ss", LiteralMode::Synchronizing);
    let fragments: Vec<&[u8]> = sync
        .fragments()
        .iter()
        .map(|f| f.expose().as_slice())
        .collect();
    let expected: [&[u8]; 3] = [
        b"a1 LOGIN {5}\r\n",
        b"j\xc3\xb6rg {5}\r\n",
        b"p\xc3\xa4ss\r\n",
    ];
    assert_eq!(fragments, expected);
    assert!(sync.needs_continuation());
    let plus = login("j\u{f6}rg", "tab\there", LiteralMode::NonSynchronizing);
    assert_eq!(plus.fragments().len(), 1);
    assert_eq!(
        joined(&plus),
        b"a1 LOGIN {5+}\r\nj\xc3\xb6rg {8+}\r\ntab\there\r\n"
    );
}

#[test]
fn login_round_trips() {
    let cases = [
        ("bob@example.com", "hunter2"),
        ("bob", r#"quote" back\slash\\ "#),
        ("j\u{f6}rg", "p\u{e4}ss w\u{f6}rd \u{1f512}"),
        ("u", "line\r\nbreak"),
        ("", ""),
        ("]", "{3}"),
    ];
    for (user, password) in cases {
        for mode in [LiteralMode::Synchronizing, LiteralMode::NonSynchronizing] {
            let command = decode_whole(&joined(&login(user, password, mode)));
            assert_eq!(command.tag, "a1");
            let CommandKind::Login {
                user: got_user,
                password: got_password,
            } = command.kind
            else {
                panic!("not a LOGIN");
            };
            assert_eq!(
                (got_user.as_str(), got_password.expose().as_str()),
                (user, password)
            );
        }
    }
}

#[test]
fn login_refuses_what_imap_cannot_carry() {
    let nul = encode_login("a1", "bob", &secret("a\0b"), LiteralMode::NonSynchronizing);
    assert_eq!(nul, Err(EncodeError::Nul));
    let tag = encode_login("a+", "bob", &secret("pw"), LiteralMode::NonSynchronizing);
    assert_eq!(tag, Err(EncodeError::InvalidTag));
}

#[test]
fn encoded_logins_never_show_the_password() {
    let command = login("bob", "hunter2", LiteralMode::Synchronizing);
    assert!(!format!("{command:?}").contains("hunter2"));
}

#[test]
fn authenticate_plain_with_and_without_sasl_ir() {
    let b64 = secret("AGJvYgBwdw==");
    let Ok(with_ir) = encode_authenticate_plain("a2", &b64, true) else {
        panic!("SASL-IR encoding failed");
    };
    assert_eq!(joined(&with_ir), b"a2 AUTHENTICATE PLAIN AGJvYgBwdw==\r\n");
    let CommandKind::Authenticate { mechanism, initial } = decode_whole(&joined(&with_ir)).kind
    else {
        panic!("not AUTHENTICATE");
    };
    assert_eq!(mechanism, "PLAIN");
    assert_eq!(initial, Some(InitialResponse::Base64(b64.clone())));

    let Ok(without_ir) = encode_authenticate_plain("a2", &b64, false) else {
        panic!("two-step encoding failed");
    };
    let fragments: Vec<&[u8]> = without_ir
        .fragments()
        .iter()
        .map(|f| f.expose().as_slice())
        .collect();
    let expected: [&[u8]; 2] = [b"a2 AUTHENTICATE PLAIN\r\n", b"AGJvYgBwdw==\r\n"];
    assert_eq!(fragments, expected);

    let Ok(empty) = encode_authenticate_plain("a2", &secret(""), true) else {
        panic!("empty initial response failed");
    };
    assert_eq!(joined(&empty), b"a2 AUTHENTICATE PLAIN =\r\n");
    let bad = encode_authenticate_plain("a2", &secret("AGJv\r\na3 LOGOUT"), true);
    assert_eq!(bad, Err(EncodeError::InvalidBase64));
}

#[test]
fn id_with_pairs_round_trips() {
    let pairs = [
        ("x-originating-ip", Some("192.0.2.1")),
        ("x-originating-port", Some("1234")),
        ("x-session-id", None),
        ("name", Some("a \"quoted\" \\ name")),
    ];
    let Ok(bytes) = encode_id("a0", &pairs) else {
        panic!("encode_id failed");
    };
    assert!(bytes.starts_with(b"a0 ID (\"x-originating-ip\" \"192.0.2.1\" \"x-originating-port\""));
    let CommandKind::Id(Some(decoded)) = decode_whole(&bytes).kind else {
        panic!("not ID with pairs");
    };
    let decoded: Vec<(&str, Option<&str>)> = decoded
        .iter()
        .map(|(field, value)| (field.as_str(), value.as_deref()))
        .collect();
    assert_eq!(decoded, pairs);
    assert_eq!(encode_id("a0", &[]), Ok(b"a0 ID NIL\r\n".to_vec()));
}

#[test]
fn id_refuses_what_it_cannot_quote_or_the_backend_would_refuse() {
    assert_eq!(
        encode_id("a0", &[("name", Some("caf\u{e9}"))]),
        Err(EncodeError::UnquotableIdString)
    );
    assert_eq!(
        encode_id("a0", &[("x\r\n", None)]),
        Err(EncodeError::UnquotableIdString)
    );
    let long_field = "f".repeat(31);
    assert_eq!(
        encode_id("a0", &[(&long_field, None)]),
        Err(EncodeError::IdTooLarge)
    );
    let long_value = "v".repeat(1025);
    assert_eq!(
        encode_id("a0", &[("f", Some(&long_value))]),
        Err(EncodeError::IdTooLarge)
    );
    let many = vec![("f", None); 31];
    assert_eq!(encode_id("a0", &many), Err(EncodeError::IdTooLarge));
    assert!(encode_id("a0", &many[..30]).is_ok());
    assert_eq!(encode_id("*", &[]), Err(EncodeError::InvalidTag));
}
