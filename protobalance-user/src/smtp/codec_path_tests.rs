//! Tests for `codec_path`, through `decode_command`: null, plain, UTF-8, source-routed
//! and quoted paths, and every MAIL/RCPT parameter form.

use crate::smtp::codec::{
    Body, CodecError, Command, Decoded, ForwardPath, MailAuth, MailParameters, Parameter, Path,
    Problem, ReversePath, decode_command,
};

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

fn param(keyword: &str, value: Option<&str>) -> Parameter {
    Parameter {
        keyword: keyword.into(),
        value: value.map(str::to_owned),
    }
}

fn mail(line: &str) -> (ReversePath, MailParameters) {
    match decode(line) {
        Command::Mail { from, params } => (from, params),
        other => panic!("{line:?}: {other:?}"),
    }
}

fn rcpt_path(raw: &str) -> Path {
    match decode(&format!("RCPT TO:<{raw}>\r\n")) {
        Command::Rcpt {
            to: ForwardPath::Path(path),
            ..
        } => path,
        other => panic!("{raw:?}: {other:?}"),
    }
}

#[test]
fn null_and_plain_paths() {
    assert_eq!(
        mail("MAIL FROM:<>\r\n"),
        (ReversePath::Null, MailParameters::default())
    );
    assert_eq!(mail("MAIL FROM: <>\r\n").0, ReversePath::Null);
    let path = rcpt_path("user@example.org");
    assert_eq!(
        (path.local.as_str(), path.domain.as_str()),
        ("user", "example.org")
    );
    assert!(!path.source_route && !path.quoted_local && path.is_ascii());
    assert_eq!(path.raw(), "user@example.org");
    let tagged = rcpt_path("first.last+tag@sub.example.org");
    assert_eq!(tagged.local, "first.last+tag");
    let literal = rcpt_path("user@[192.0.2.7]");
    assert_eq!(literal.domain, "[192.0.2.7]");
    let percent = rcpt_path("x%ext@ours.example");
    assert_eq!(
        percent.local, "x%ext",
        "the relay check, not the parser, refuses %"
    );
}

#[test]
fn utf8_paths() {
    let path = rcpt_path("用户@例子.广告");
    assert_eq!(
        (path.local.as_str(), path.domain.as_str()),
        ("用户", "例子.广告")
    );
    assert!(!path.is_ascii());
    let (from, params) = mail("MAIL FROM:<jösé@bücher.example> SMTPUTF8\r\n");
    assert!(matches!(from, ReversePath::Path(ref p) if p.local == "jösé"));
    assert!(params.smtputf8);
}

#[test]
fn source_routes_are_parsed_and_flagged() {
    let path = rcpt_path("@a.example,@b.example:user@c.example");
    assert!(path.source_route);
    assert_eq!(
        (path.local.as_str(), path.domain.as_str()),
        ("user", "c.example")
    );
    assert_eq!(path.raw(), "@a.example,@b.example:user@c.example");
    let routed_to_ext = rcpt_path("@ours.example:x@ext.example");
    assert!(routed_to_ext.source_route);
    assert_eq!(routed_to_ext.domain, "ext.example");
    assert_eq!(syntax("RCPT TO:<@a,b:user@c>\r\n"), Problem::Path);
    assert_eq!(syntax("RCPT TO:<@:user@c>\r\n"), Problem::Path);
    assert_eq!(syntax("RCPT TO:<@a.example>\r\n"), Problem::Path);
}

#[test]
fn quoted_local_parts_are_unquoted_and_flagged() {
    let path = rcpt_path("\"x@ext.example\"@ours.example");
    assert!(path.quoted_local);
    assert_eq!(
        (path.local.as_str(), path.domain.as_str()),
        ("x@ext.example", "ours.example")
    );
    let tricky = rcpt_path(r#""a>b \"c\\"@ours.example"#);
    assert_eq!(tricky.local, r#"a>b "c\"#);
    assert_eq!(tricky.raw(), r#""a>b \"c\\"@ours.example"#);
    let empty = rcpt_path("\"\"@ours.example");
    assert!(empty.quoted_local && empty.local.is_empty());
    assert_eq!(syntax("RCPT TO:<\"open@x>\r\n"), Problem::Path);
    assert_eq!(syntax("RCPT TO:<\"a\"b@x>\r\n"), Problem::Path);
}

#[test]
fn malformed_paths() {
    let bad = [
        "RCPT TO:user@example.org\r\n",
        "RCPT TO:<user@example.org\r\n",
        "RCPT TO:<>\r\n",
        "RCPT TO:<user>\r\n",
        "RCPT TO:<user@>\r\n",
        "RCPT TO:<@example.org>\r\n",
        "RCPT TO:<a..b@example.org>\r\n",
        "RCPT TO:<.a@example.org>\r\n",
        "RCPT TO:<a b@example.org>\r\n",
        "RCPT TO:<a@b@example.org>\r\n",
        "RCPT TO:<a@example..org>\r\n",
        "RCPT TO:<a@-x.org>\r\n",
        "RCPT TO:<a@[999.0.0.1]>\r\n",
        "RCPT TO:<a@x.org>junk\r\n",
        "MAIL FROM:<<>>\r\n",
    ];
    for line in bad {
        assert_eq!(syntax(line), Problem::Path, "{line:?}");
    }
    let long_label = format!("RCPT TO:<a@{}.org>\r\n", "x".repeat(64));
    assert_eq!(syntax(&long_label), Problem::Path);
    for line in [
        "MAIL\r\n",
        "MAIL TO:<>\r\n",
        "RCPT FROM:<a@b>\r\n",
        "RCPT <a@b>\r\n",
    ] {
        assert_eq!(syntax(line), Problem::Argument, "{line:?}");
    }
}

#[test]
fn mail_parameters() {
    let line = "MAIL FROM:<a@b.example> SIZE=1048576 BODY=8BITMIME SMTPUTF8 AUTH=<> RET=HDRS ENVID=x+2By\r\n";
    let (_, params) = mail(line);
    let expected = MailParameters {
        size: Some(1_048_576),
        body: Some(Body::EightBitMime),
        smtputf8: true,
        auth: Some(MailAuth::Unknown),
        other: vec![param("RET", Some("HDRS")), param("ENVID", Some("x+2By"))],
    };
    assert_eq!(params, expected);
    assert_eq!(
        mail("MAIL FROM:<> BODY=7bit\r\n").1.body,
        Some(Body::SevenBit)
    );
    assert_eq!(
        mail("MAIL FROM:<> body=BinaryMIME\r\n").1.body,
        Some(Body::BinaryMime)
    );
    let auth = mail("MAIL FROM:<> AUTH=bob+40example.org\r\n").1.auth;
    assert_eq!(auth, Some(MailAuth::Identity("bob+40example.org".into())));
    let max = mail("MAIL FROM:<>  SIZE=18446744073709551615  \r\n").1;
    assert_eq!(max.size, Some(u64::MAX));
    let flag = mail("MAIL FROM:<> X-FLAG XVAL=ü\r\n").1.other;
    assert_eq!(flag, vec![param("X-FLAG", None), param("XVAL", Some("ü"))]);
}

#[test]
fn malformed_mail_parameters() {
    let bad = [
        "SIZE",
        "SIZE=",
        "SIZE=12a",
        "SIZE=-1",
        "SIZE=18446744073709551616",
        "BODY=9BIT",
        "BODY",
        "SMTPUTF8=yes",
        "AUTH",
        "SIZE=1 SIZE=2",
        "size=1 SIZE=1",
        "X=1 x=2",
        "-X=1",
        "X=a=b",
        "=1",
        "X_Y=1",
    ];
    for params in bad {
        let line = format!("MAIL FROM:<a@b.example> {params}\r\n");
        assert_eq!(syntax(&line), Problem::Parameter, "{params:?}");
    }
    let many: String = (0..33).map(|n| format!(" X{n}")).collect();
    assert_eq!(
        syntax(&format!("MAIL FROM:<>{many}\r\n")),
        Problem::Parameter
    );
    let enough: String = (0..32).map(|n| format!(" X{n}")).collect();
    assert_eq!(mail(&format!("MAIL FROM:<>{enough}\r\n")).1.other.len(), 32);
}

#[test]
fn rcpt_parameters_are_kept() {
    let line = "RCPT TO:<u@ours.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@ours.example\r\n";
    let Command::Rcpt { to, params } = decode(line) else {
        panic!("not RCPT")
    };
    assert!(matches!(to, ForwardPath::Path(ref p) if p.local == "u"));
    let orcpt = param("ORCPT", Some("rfc822;u@ours.example"));
    assert_eq!(
        params,
        vec![param("NOTIFY", Some("SUCCESS,FAILURE")), orcpt]
    );
    assert_eq!(
        syntax("RCPT TO:<u@x> NOTIFY=A NOTIFY=B\r\n"),
        Problem::Parameter
    );
}
