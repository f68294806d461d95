//! IMAP through protobalance against three real Dovecot backends, driven by Python's
//! imaplib and by raw sockets: logins (LOGIN, literals, AUTHENTICATE PLAIN and LOGIN)
//! reach the mailbox's owner and read back, byte for byte, what LMTP delivered there; the
//! backend sees the real client address; credential failures and temporary failures keep
//! their meaning; bad input gets a protocol answer.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use protobalance::{imap::codec::encode_plain, secret::Secret};
use protobalance_tests::{DovecotCluster, password_for, python};

mod support;

use support::{
    CLIENT_IP, Edge, Listen, USERS, backend_index, deliver, metric_line, owner, start_edge,
};

fn start(cluster: &DovecotCluster) -> Edge {
    start_edge(cluster, &[Listen("imap", None)], "")
}

/// The one message in `user`'s maildir on `backend`, with CRLF line ends as IMAP sends it.
fn stored_message(cluster: &DovecotCluster, backend: &str, user: &str) -> String {
    let maildir = cluster
        .backend(backend_index(backend))
        .and_then(|b| b.maildir(user))
        .expect("maildir");
    let files: Vec<_> = ["new", "cur"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(maildir.join(sub)).ok())
        .flatten()
        .filter_map(Result::ok)
        .collect();
    assert_eq!(files.len(), 1, "{user}: one stored message");
    let text = std::fs::read_to_string(files[0].path()).expect("message file");
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// An imaplib session through the edge from CLIENT_IP; `login` is Python code using `m`.
fn imap_script(edge: &Edge, login: &str, then: &str) -> anyhow::Result<String> {
    python(&format!(
        "{}import imaplib, sys\n\
         m = imaplib.IMAP4('{}', {}, timeout=10)\n{login}\n{then}\n",
        support::python_from_client_ip(),
        edge.listeners[0].ip(),
        edge.listeners[0].port()
    ))
}

fn login(user: &str) -> String {
    let pass = password_for(user).expect("test user");
    format!("m.login('{user}', '{pass}')")
}

fn auth_plain(user: &str) -> String {
    let pass = password_for(user).expect("test user");
    format!("m.authenticate('PLAIN', lambda _: b'\\0{user}\\0{pass}')")
}

fn auth_login(user: &str) -> String {
    let pass = password_for(user).expect("test user");
    format!("m.authenticate('LOGIN', lambda c: b'{user}' if c == b'Username:' else b'{pass}')")
}

const READ_FIRST: &str = "typ, d = m.select('INBOX'); print('EXISTS', d[0].decode())\n\
     typ, d = m.fetch('1', '(RFC822)'); sys.stdout.write(d[0][1].decode()); m.logout()";

/// A raw client: write, then read lines with a timeout.
struct Raw {
    reader: BufReader<TcpStream>,
}

impl Raw {
    fn connect(edge: &Edge) -> Self {
        let stream = TcpStream::connect(edge.listeners[0]).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut raw = Self {
            reader: BufReader::new(stream),
        };
        assert!(raw.line().starts_with("* OK [CAPABILITY IMAP4rev1 "));
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).expect("send");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read");
        line
    }

    /// Lines up to and including the one tagged `tag`.
    fn until(&mut self, tag: &str) -> String {
        let mut out = String::new();
        while !out.lines().any(|l| l.starts_with(&format!("{tag} "))) {
            let line = self.line();
            assert!(!line.is_empty(), "closed before {tag}: {out}");
            out.push_str(&line);
        }
        out
    }
}

/// Writes `send` at once and reads until the edge closes.
fn session(edge: &Edge, send: &[u8]) -> String {
    let mut s = TcpStream::connect(edge.listeners[0]).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(send);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn sasl_plain(user: &str, pass: &str) -> String {
    let encoded = encode_plain(None, user, &Secret::new(pass.to_owned())).expect("plain");
    encoded.expose().clone()
}

fn skip() -> bool {
    support::skip("imap_proxy")
}

#[test]
fn logins_reach_the_owner_and_read_what_was_delivered_there() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start(&cluster);
    let logins: [fn(&str) -> String; 3] = [login, auth_plain, auth_login];
    for (i, n) in [1, 42, 100, 150, 201, 299].into_iter().enumerate() {
        let user = format!("user{n}@example.com");
        let backend = owner(&edge, &user);
        let token = format!("token-{n}-{}", std::process::id());
        deliver(&cluster, &backend, &user, &token);
        let out = imap_script(&edge, &logins[i % 3](&user), READ_FIRST)
            .unwrap_or_else(|e| panic!("{user} through the edge: {e}"));
        let message = out.strip_prefix("EXISTS 1\n").expect("one message");
        assert!(message.ends_with(&format!(
            "Subject: {token}\r\n\r\nbody {token}\r\nline two\r\n"
        )));
        assert_eq!(message, stored_message(&cluster, &backend, &user));
        let log_path = cluster
            .backend(backend_index(&backend))
            .expect("b")
            .log_path();
        let log = std::fs::read_to_string(log_path).expect("dovecot log");
        assert!(
            log.lines().any(|l| l.contains("imap-login: Info: Login")
                && l.contains(&format!("<{user}>"))
                && l.contains(&format!("rip={CLIENT_IP}"))
                && l.contains("lip=127.0.0.1")),
            "Dovecot logged the real client and edge addresses for {user}"
        );
    }
    // Normalized logins reach the same mailbox.
    let out = imap_script(
        &edge,
        "m.login('User42+list@EXAMPLE.com', 'pass42')",
        READ_FIRST,
    )
    .expect("normalized login");
    assert!(out.starts_with("EXISTS 1\n"), "{out}");
}

#[test]
fn literals_sasl_ir_and_pipelining() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start(&cluster);
    // Synchronizing literals: the edge asks for each with `+`.
    let mut raw = Raw::connect(&edge);
    raw.send(b"a1 LOGIN {17}\r\n");
    assert_eq!(raw.line(), "+ Ready for literal data\r\n");
    raw.send(b"user1@example.com {5}\r\n");
    assert_eq!(raw.line(), "+ Ready for literal data\r\n");
    raw.send(b"pass1\r\n");
    let ok = raw.until("a1");
    assert!(ok.starts_with("a1 OK [CAPABILITY IMAP4rev1"), "{ok}");
    raw.send(b"a2 SELECT INBOX\r\n");
    assert!(raw.until("a2").contains("a2 OK [READ-WRITE]"));
    // LITERAL+ and commands pipelined behind the login go to the backend.
    let out = session(
        &edge,
        b"a1 LOGIN {17+}\r\nuser2@example.com \"pass2\"\r\na2 SELECT INBOX\r\na3 LOGOUT\r\n",
    );
    for tagged in ["a1 OK [CAPABILITY", "a2 OK [READ-WRITE]", "a3 OK"] {
        assert!(out.contains(tagged), "{tagged}: {out}");
    }
    // SASL-IR, and a cancelled AUTHENTICATE first.
    let plain = sasl_plain("user3@example.com", "pass3");
    let out = session(
        &edge,
        format!("a1 AUTHENTICATE PLAIN\r\n*\r\na2 AUTHENTICATE PLAIN {plain}\r\na3 LOGOUT\r\n")
            .as_bytes(),
    );
    assert!(
        out.contains("\r\n+ \r\na1 BAD Authentication cancelled\r\n"),
        "{out}"
    );
    assert!(
        out.contains("a2 OK [CAPABILITY") && out.contains("a3 OK"),
        "{out}"
    );
}

#[test]
fn failures_keep_their_meaning() {
    if skip() {
        return;
    }
    let mut cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start(&cluster);
    let wrong = imap_script(&edge, "m.login('user7@example.com', 'wrong')", "")
        .expect_err("wrong password");
    assert!(
        wrong.to_string().contains("[AUTHENTICATIONFAILED]"),
        "{wrong}"
    );
    let backend = owner(&edge, "user7@example.com");
    let refused = [
        &*format!("backend=\"{backend}\""),
        "protocol=\"imap\"",
        "result=\"refused\"",
    ];
    assert!(
        metric_line(&edge, &refused).ends_with(" 1"),
        "the backend's own NO"
    );
    for name in [
        "nobody@example.com",
        "user1@elsewhere.example",
        "not-an-address",
    ] {
        let unknown =
            imap_script(&edge, &format!("m.login('{name}', 'x')"), "").expect_err("unknown");
        assert!(
            unknown
                .to_string()
                .contains("[AUTHENTICATIONFAILED] Authentication failed."),
            "{name}: {unknown}"
        );
    }
    // Stop the owner of user5: its logins fail temporarily and fast, others still work.
    let victim = owner(&edge, "user5@example.com");
    let survivor = (1..=USERS)
        .map(|n| format!("user{n}@example.com"))
        .find(|u| owner(&edge, u) != victim)
        .expect("a user on another backend");
    cluster
        .backend_mut(backend_index(&victim))
        .expect("backend")
        .stop();
    let down = imap_script(&edge, &support::timed(&login("user5@example.com")), "")
        .expect_err("owner down");
    assert!(
        down.to_string()
            .contains("[UNAVAILABLE] Mailbox server temporarily unavailable"),
        "temporary failure, not a credential error: {down}"
    );
    let secs = support::elapsed(&down.to_string());
    assert!(
        secs < 1.0,
        "temporary failure within 1 s (breaker open): {secs} s"
    );
    metric_line(
        &edge,
        &["sessions_total", "protocol=\"imap\"", "backend_unavailable"],
    );
    let ok = imap_script(&edge, &auth_plain(&survivor), "print(m.select('INBOX')[0])")
        .expect("other backend fine");
    assert_eq!(ok, "OK\n");
}

/// Raw-socket bad input: each gets its documented reply or a close, never a hang.
#[test]
fn bad_input_gets_protocol_answers() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start(&cluster);
    let long = session(&edge, &vec![b'A'; 100 * 1024]);
    assert!(long.ends_with("* BYE Line too long\r\n"), "{long}");
    let garbage = session(
        &edge,
        b"\x16\x03\x01\x02\x00\x01\x00\xfc\x03\x03\r\na LOGOUT\r\n",
    );
    assert!(
        garbage.contains("\r\n* BAD Invalid command")
            && garbage.ends_with("a OK Logout completed.\r\n"),
        "{garbage}"
    );
    let plain = sasl_plain("user1@example.com", "nope");
    let attempts: String = (0..1000)
        .map(|i| format!("a{i} AUTHENTICATE PLAIN {plain}\r\n"))
        .collect();
    let brute = session(&edge, attempts.as_bytes());
    assert_eq!(
        brute.matches(" NO [AUTHENTICATIONFAILED]").count(),
        3,
        "3 refusals then the closing line: {brute}"
    );
    assert!(
        brute.ends_with("* BYE Too many failed logins\r\n"),
        "{brute}"
    );
    let started = Instant::now();
    let silent = session(&edge, b"");
    assert!(
        silent.ends_with("* BYE Timed out waiting for login\r\n"),
        "{silent}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "pre-auth timeout (2 s) enforced"
    );
    let starttls = session(&edge, b"a1 STARTTLS\r\na2 CAPABILITY\r\na3 LOGOUT\r\n");
    assert!(
        starttls.contains("a1 NO STARTTLS is not available on this port\r\n")
            && starttls.contains("a2 OK")
            && starttls
                .lines()
                .any(|l| l.starts_with("* CAPABILITY ") && !l.contains("STARTTLS")),
        "{starttls}"
    );
    let big = session(&edge, b"a1 LOGIN {5000}\r\na2 NOOP\r\na3 LOGOUT\r\n");
    assert!(
        big.contains("a1 BAD [TOOBIG]") && big.contains("a2 OK"),
        "{big}"
    );
    let mut unsyncable = b"a1 LOGIN {5000+}\r\n".to_vec();
    unsyncable.extend_from_slice(&[b'x'; 5000]);
    let big = session(&edge, &unsyncable);
    assert!(
        big.contains("a1 BAD [TOOBIG]") && big.ends_with("* BYE Literal too large\r\n"),
        "{big}"
    );
    let other = session(
        &edge,
        b"a1 SELECT INBOX\r\na2 XYZZY\r\na3 ID NIL\r\na4 LOGOUT\r\n",
    );
    for line in [
        "a1 BAD Log in first",
        "a2 BAD Unknown command",
        "* ID NIL\r\na3 OK",
        "* BYE Logging out\r\na4 OK",
    ] {
        assert!(other.contains(line), "{line}: {other}");
    }
}
