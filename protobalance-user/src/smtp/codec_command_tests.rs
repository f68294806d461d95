//! Tests for `codec_command`: every command, EHLO hosts, BDAT, AUTH and SASL lines, bounds,
//! framing, pipelining at every split point, and non-SMTP input (paths: `codec_path_tests`).

use std::net::IpAddr;

use super::*;

/// The one command `line` holds, all of it consumed.
fn decode(line: &str) -> Command {
    match decode_command(line.as_bytes()) {
        Ok(Decoded::Complete { value, consumed }) if consumed == line.len() => value,
        other => panic!("{line:?}: {other:?}"),
    }
}

fn syntax(line: &str) -> Problem {
    match decode_command(line.as_bytes()) {
        Err(CodecError::Syntax { problem, skip }) if skip == line.len() => problem,
        other => panic!("{line:?}: {other:?}"),
    }
}

fn mail(line: &str) -> (ReversePath, MailParameters) {
    match decode(line) {
        Command::Mail { from, params } => (from, params),
        other => panic!("{line:?}: {other:?}"),
    }
}

#[test]
fn every_command() {
    let ehlo = Command::Ehlo {
        host: Host::Domain("mx.example.org".into()),
    };
    assert_eq!(decode("EHLO mx.example.org\r\n"), ehlo);
    let helo = Command::Helo {
        host: Host::Domain("a".into()),
    };
    assert_eq!(decode("HELO a\r\n"), helo);
    assert_eq!(decode("DATA\r\n"), Command::Data);
    assert_eq!(decode("RSET\r\n"), Command::Rset);
    assert_eq!(decode("NOOP\r\n"), Command::Noop);
    assert_eq!(decode("QUIT\r\n"), Command::Quit);
    assert_eq!(decode("STARTTLS\r\n"), Command::StartTls);
    let vrfy = Command::Vrfy {
        argument: "Smith".into(),
    };
    assert_eq!(decode("VRFY Smith\r\n"), vrfy);
    let expn = Command::Expn {
        argument: "staff list".into(),
    };
    assert_eq!(decode("EXPN staff list\r\n"), expn);
    assert_eq!(decode("HELP\r\n"), Command::Help { topic: None });
    let topic = Some("MAIL".to_owned());
    assert_eq!(decode("HELP MAIL\r\n"), Command::Help { topic });
    let unknown = Command::Unknown {
        verb: "XCLIENT".into(),
    };
    assert_eq!(decode("XCLIENT ADDR=192.0.2.1\r\n"), unknown);
    let turn = Command::Unknown {
        verb: "TURN".into(),
    };
    assert_eq!(decode("turn\r\n"), turn);
}

#[test]
fn verbs_are_case_insensitive_and_arguments_keep_their_case() {
    for verb in ["quit", "QUIT", "Quit", "qUiT"] {
        assert_eq!(decode(&format!("{verb}\r\n")), Command::Quit);
    }
    let (from, _) = mail("mail from:<Bob@Example.ORG> size=10 body=8bitmime\r\n");
    let ReversePath::Path(path) = from else {
        panic!("{from:?}")
    };
    assert_eq!(
        (path.local.as_str(), path.domain.as_str()),
        ("Bob", "Example.ORG")
    );
    let (_, params) = mail("MaIl FrOm:<> SmtpUtf8\r\n");
    assert!(params.smtputf8);
    let rcpt = decode("rcpt to:<postmaster>\r\n");
    assert!(matches!(
        rcpt,
        Command::Rcpt {
            to: ForwardPath::Postmaster,
            ..
        }
    ));
}

#[test]
fn ehlo_hosts() {
    let host = |line: &str| match decode(line) {
        Command::Ehlo { host } | Command::Helo { host } => host,
        other => panic!("{other:?}"),
    };
    let v4: IpAddr = [192, 0, 2, 1].into();
    assert_eq!(host("EHLO [192.0.2.1]\r\n"), Host::Address(v4));
    let v6: IpAddr = "2001:db8::1".parse().unwrap_or(v4);
    assert_eq!(host("EHLO [IPv6:2001:db8::1]\r\n"), Host::Address(v6));
    assert_eq!(host("EHLO [ipv6:2001:db8::1]\r\n"), Host::Address(v6));
    assert_eq!(
        host("HELO bücher.example\r\n"),
        Host::Domain("bücher.example".into())
    );
    assert_eq!(
        host("EHLO  spaced.example \r\n"),
        Host::Domain("spaced.example".into())
    );
    for other in [
        "my_pc",
        "[300.1.1.1]",
        "[tag:x]",
        "foo bar",
        "-x.org",
        "a..b",
    ] {
        assert_eq!(
            host(&format!("EHLO {other}\r\n")),
            Host::Other(other.into())
        );
    }
    assert_eq!(syntax("EHLO\r\n"), Problem::Argument);
    assert_eq!(syntax("HELO   \r\n"), Problem::Argument);
}

#[test]
fn bdat() {
    let bdat = |size, last| Command::Bdat { size, last };
    assert_eq!(decode("BDAT 1000\r\n"), bdat(1000, false));
    assert_eq!(decode("bdat 0 last\r\n"), bdat(0, true));
    assert_eq!(decode("BDAT 86 LAST\r\n"), bdat(86, true));
    for bad in [
        "BDAT\r\n",
        "BDAT x\r\n",
        "BDAT 1 FIRST\r\n",
        "BDAT 1 LAST x\r\n",
        "BDAT -1\r\n",
    ] {
        assert_eq!(syntax(bad), Problem::Argument, "{bad:?}");
    }
    assert_eq!(syntax("BDAT 18446744073709551616\r\n"), Problem::Argument);
    // The chunk's data is never read as part of the command.
    let pipelined = b"BDAT 6 LAST\r\nQUIT\r\nQUIT\r\n";
    let decoded = decode_command(pipelined);
    assert_eq!(
        decoded,
        Ok(Decoded::Complete {
            value: bdat(6, true),
            consumed: 13
        })
    );
}

#[test]
fn auth_and_initial_responses() {
    let auth = |mechanism: &str, initial| Command::Auth {
        mechanism: mechanism.into(),
        initial,
    };
    let plain = Some(InitialResponse::Base64(Secret::new("AGJvYgBwdw==".into())));
    assert_eq!(decode("AUTH PLAIN AGJvYgBwdw==\r\n"), auth("PLAIN", plain));
    assert_eq!(
        decode("auth plain =\r\n"),
        auth("PLAIN", Some(InitialResponse::Empty))
    );
    assert_eq!(decode("AUTH LOGIN\r\n"), auth("LOGIN", None));
    assert_eq!(InitialResponse::Empty.payload(), "");
    for bad in [
        "AUTH\r\n",
        "AUTH PL@IN\r\n",
        "AUTH PLAIN a b\r\n",
        "AUTH PLAIN abc\r\n",
    ] {
        assert_eq!(syntax(bad), Problem::Argument, "{bad:?}");
    }
    let long = format!("AUTH {}\r\n", "X".repeat(21));
    assert_eq!(syntax(&long), Problem::Argument);
    let shown = format!("{:?}", decode_command(b"AUTH PLAIN AGJvYgBodW50ZXIy\r\n"));
    assert!(
        shown.contains("<redacted>") && !shown.contains("AGJvYgBodW50ZXIy"),
        "{shown}"
    );
}

#[test]
fn sasl_response_lines() {
    let complete = |value, consumed| Ok(Decoded::Complete { value, consumed });
    assert_eq!(
        decode_sasl_response(b"*\r\n"),
        complete(SaslResponse::Cancel, 3)
    );
    let user = SaslResponse::Base64(Secret::new("Ym9i".into()));
    assert_eq!(decode_sasl_response(b"Ym9i\r\nQUIT\r\n"), complete(user, 6));
    let empty = SaslResponse::Base64(Secret::new(String::new()));
    assert_eq!(decode_sasl_response(b"\r\n"), complete(empty, 2));
    assert_eq!(decode_sasl_response(b"Ym9"), Ok(Decoded::Incomplete));
    let bad = CodecError::Syntax {
        problem: Problem::Argument,
        skip: 6,
    };
    assert_eq!(decode_sasl_response(b"Ym9\xff\r\n"), Err(bad));
    assert_eq!(
        decode_sasl_response(b"Ym9i\n"),
        Err(CodecError::BareLineFeed { skip: 5 })
    );
}

#[test]
fn argument_rules() {
    for line in [
        "DATA x\r\n",
        "RSET all\r\n",
        "QUIT now\r\n",
        "STARTTLS x\r\n",
        "VRFY\r\n",
        "EXPN \r\n",
    ] {
        assert_eq!(syntax(line), Problem::Argument, "{line:?}");
    }
    assert_eq!(decode("QUIT  \r\n"), Command::Quit);
    assert_eq!(decode("DATA \r\n"), Command::Data);
    assert_eq!(decode("NOOP anything at all\r\n"), Command::Noop);
    assert_eq!(syntax("VRFY a\tb\r\n"), Problem::Argument);
    assert_eq!(
        syntax("MAIL FROM:<a@b.example>\rRCPT TO:<c@d>\r\n"),
        Problem::Argument
    );
    assert_eq!(syntax("VRFY \u{85}\r\n"), Problem::Argument);
    assert!(matches!(
        decode_command(b"EHLO \xff\r\n"),
        Err(CodecError::Syntax {
            problem: Problem::Argument,
            ..
        })
    ));
    let unknown = decode_command(b"XFOO \xff\x00\r\n");
    let verb = "XFOO".to_owned();
    assert_eq!(
        unknown,
        Ok(Decoded::Complete {
            value: Command::Unknown { verb },
            consumed: 9
        })
    );
}

#[test]
fn bad_verbs() {
    for line in [
        "\r\n",
        " QUIT\r\n",
        "QUIT\t\r\n",
        "QUIT\r\r\n",
        "\u{e9}HLO x\r\n",
    ] {
        assert_eq!(syntax(line), Problem::Verb, "{line:?}");
    }
    assert_eq!(syntax(&format!("{}\r\n", "X".repeat(33))), Problem::Verb);
    let verb = "X".repeat(32);
    assert_eq!(decode(&format!("{verb}\r\n")), Command::Unknown { verb });
    assert_eq!(syntax("\x16\x03\x01\x02\r\n"), Problem::Verb);
}

#[test]
fn line_too_long_exactly_at_the_bound() {
    let head = "MAIL FROM:<> X=";
    let longest = format!(
        "{head}{}\r\n",
        "v".repeat(MAX_COMMAND_LINE - head.len() - 2)
    );
    assert_eq!(longest.len(), MAX_COMMAND_LINE);
    assert!(matches!(decode(&longest), Command::Mail { .. }));
    let over = format!(
        "{head}{}\r\n",
        "v".repeat(MAX_COMMAND_LINE - head.len() - 1)
    );
    assert_eq!(
        decode_command(over.as_bytes()),
        Err(CodecError::LineTooLong)
    );
    let unterminated = "v".repeat(MAX_COMMAND_LINE - 1);
    assert_eq!(
        decode_command(unterminated.as_bytes()),
        Ok(Decoded::Incomplete)
    );
    let full = "v".repeat(MAX_COMMAND_LINE);
    assert_eq!(
        decode_command(full.as_bytes()),
        Err(CodecError::LineTooLong)
    );
    let huge = vec![b'v'; 10 * 1024 * 1024];
    assert_eq!(decode_command(&huge), Err(CodecError::LineTooLong));
    assert_eq!(decode_sasl_response(&huge), Err(CodecError::LineTooLong));
}

#[test]
fn bare_line_feed_is_refused_and_resumable() {
    let buf = b"MAIL FROM:<a@b.example>\nQUIT\r\n";
    let error = decode_command(buf);
    assert_eq!(error, Err(CodecError::BareLineFeed { skip: 24 }));
    let resume = error.err().and_then(|e| e.resume_at()).unwrap_or_default();
    let rest = buf.get(resume..).unwrap_or_default();
    assert_eq!(
        decode_command(rest),
        Ok(Decoded::Complete {
            value: Command::Quit,
            consumed: 6
        })
    );
    assert_eq!(decode_command(b"QUIT\r"), Ok(Decoded::Incomplete));
    assert_eq!(
        decode_command(b"\n"),
        Err(CodecError::BareLineFeed { skip: 1 })
    );
}

#[test]
fn http_requests_are_not_smtp() {
    let non_smtp = |method: &str| Command::NonSmtp {
        method: method.into(),
    };
    assert_eq!(decode("GET / HTTP/1.1\r\n"), non_smtp("GET"));
    assert_eq!(decode("POST /wp-login.php HTTP/1.0\r\n"), non_smtp("POST"));
    assert_eq!(
        decode("CONNECT mx.example.org:25 HTTP/1.1\r\n"),
        non_smtp("CONNECT")
    );
    assert_eq!(decode("HEAD / HTTP/1.1\r\n"), non_smtp("HEAD"));
    assert_eq!(decode("PRI * HTTP/2.0\r\n"), non_smtp("PRI"));
    let lf_only = decode_command(b"GET / HTTP/1.0\nHost: x\n\n");
    assert_eq!(
        lf_only,
        Ok(Decoded::Complete {
            value: non_smtp("GET"),
            consumed: 15
        })
    );
    assert_eq!(
        decode("get / HTTP/1.1\r\n"),
        Command::Unknown { verb: "GET".into() }
    );
}

#[test]
fn pipelined_stream_at_every_split_point() {
    let stream = "EHLO client.example\r\nMAIL FROM:<a@b.example> SIZE=99\r\n\
                  RCPT TO:<c@d.example>\r\nRCPT TO:<postmaster>\r\nDATA\r\n";
    let mut whole = Vec::new();
    let mut start = 0;
    while start < stream.len() {
        let rest = stream.get(start..).unwrap_or_default();
        let Ok(Decoded::Complete { value, consumed }) = decode_command(rest.as_bytes()) else {
            panic!("at {start}");
        };
        for end in start..start + consumed {
            let prefix = stream.get(start..end).unwrap_or_default().as_bytes();
            assert_eq!(
                decode_command(prefix),
                Ok(Decoded::Incomplete),
                "{start}..{end}"
            );
        }
        whole.push(value);
        start += consumed;
    }
    assert_eq!(whole.len(), 5);
    assert_eq!(whole.last(), Some(&Command::Data));
    assert!(matches!(
        whole.get(3),
        Some(Command::Rcpt {
            to: ForwardPath::Postmaster,
            ..
        })
    ));
}
