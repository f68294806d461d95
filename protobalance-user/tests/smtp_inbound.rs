//! Inbound SMTP (MX) through protobalance to three real Dovecot LMTP backends, driven by
//! Python's smtplib and by raw sockets: mail lands in the owner's maildir and nowhere
//! else, a transaction stays on one backend (the others' recipients get 452 4.5.3 and
//! arrive in a second transaction), the edge is no relay, smuggled transactions and
//! oversized messages are refused without anything stored, and a stopped owner is a
//! temporary failure at RCPT.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use protobalance_tests::{DovecotCluster, python};

mod support;

use support::{Edge, Listen, USERS, backend_index, owner, start_edge};

fn skip() -> bool {
    support::skip("smtp_inbound")
}

/// Runs smtplib code with `s` connected (and EHLO'd) to the edge's first listener, from
/// 127.0.0.9 (so the backend can tell the client's address from the edge's).
fn smtplib(edge: &Edge, code: &str) -> String {
    let addr = edge.listeners[0];
    python(&format!(
        "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=10, source_address=('127.0.0.9', 0))\n\
         s.ehlo('client.example.net')\n{code}\n",
        addr.ip(),
        addr.port()
    ))
    .expect("smtplib script")
}

fn message(token: &str) -> String {
    format!("Subject: {token}\\r\\n\\r\\nbody {token}\\r\\nline two\\r\\n")
}

/// Every stored message of `user` on `backend`, line endings as LF.
fn stored(cluster: &DovecotCluster, backend: &str, user: &str) -> Vec<String> {
    let b = cluster.backend(backend_index(backend)).expect("backend");
    let maildir = b.maildir(user).expect("maildir");
    let mut messages = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let text = std::fs::read(entry.path()).expect("message file");
            messages.push(String::from_utf8_lossy(&text).replace("\r\n", "\n"));
        }
    }
    messages
}

/// Asserts `user` has exactly `count` messages on its owner and none anywhere else.
fn assert_only_on_owner(cluster: &DovecotCluster, edge: &Edge, user: &str, count: usize) {
    let home = owner(edge, user);
    for b in cluster.backends() {
        let expected = if b.name() == home { count } else { 0 };
        assert_eq!(
            b.message_count(user).expect("count"),
            expected,
            "{user} on {}",
            b.name()
        );
    }
}

/// `n` users, the first two on one backend, the third on another.
fn spread_users(edge: &Edge) -> [String; 3] {
    let users: Vec<String> = (1..=USERS)
        .map(|n| format!("user{n}@example.com"))
        .collect();
    let first = &users[0];
    let home = owner(edge, first);
    let same = users[1..]
        .iter()
        .find(|u| owner(edge, u) == home)
        .expect("same backend");
    let other = users[1..]
        .iter()
        .find(|u| owner(edge, u) != home)
        .expect("other backend");
    [first.clone(), same.clone(), other.clone()]
}

#[test]
fn mail_lands_on_the_owner_and_transactions_stay_on_one_backend() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("smtp", None)], "");

    // One recipient: stored byte for byte on its owner only.
    let user = "user250@example.com";
    let token = format!("single-{}", std::process::id());
    let out = smtplib(
        &edge,
        &format!(
            "print(s.esmtp_features)\nprint(s.sendmail('a@sender.example.net', ['{user}'], '{}'))\ns.quit()",
            message(&token)
        ),
    );
    assert!(out.contains("'size': '26214400'"), "EHLO: {out}");
    assert!(out.contains("'pipelining'") && out.contains("'enhancedstatuscodes'"));
    assert!(out.trim_end().ends_with("{}"), "all accepted: {out}");
    assert_only_on_owner(&cluster, &edge, user, 1);
    let text = stored(&cluster, &owner(&edge, user), user).join("");
    assert!(
        text.contains(&format!("Subject: {token}\n\nbody {token}\nline two\n")),
        "{text}"
    );
    // XCLIENT handed the client's HELO name and address (not the edge's) to Dovecot.
    assert!(
        text.contains("Received: from client.example.net ([127.0.0.9])"),
        "{text}"
    );

    // swaks, a second real client, with PIPELINING.
    let user = "user251@example.com";
    let addr = edge.listeners[0];
    let out = std::process::Command::new("swaks")
        .args([
            "--server",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args(["--to", user, "--from", "b@sender.example.net", "--pipeline"])
        .args(["--header", "Subject: swaks-token", "--body", "swaks body"])
        .args(["--timeout", "10", "--helo", "client.example.net"])
        .output()
        .expect("run swaks");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks: {transcript}");
    assert!(
        transcript.contains("<-  250 2.0.0 Message accepted"),
        "{transcript}"
    );
    assert_only_on_owner(&cluster, &edge, user, 1);
    let text = stored(&cluster, &owner(&edge, user), user).join("");
    assert!(
        text.contains("Subject: swaks-token") && text.contains("swaks body"),
        "{text}"
    );

    // Three recipients on two backends: the third is deferred, then sent on its own.
    let [a, b, c] = spread_users(&edge);
    let body = message("multi");
    let out = smtplib(
        &edge,
        &format!(
            "print(s.sendmail('a@sender.example.net', ['{a}', '{c}', '{b}'], '{body}'))\n\
             print(s.sendmail('a@sender.example.net', ['{c}'], '{body}'))\ns.quit()"
        ),
    );
    assert!(
        out.contains(&format!("'{c}': (452, b'4.5.3 Too many recipients"))
            && out.trim_end().ends_with("{}"),
        "{out}"
    );
    for user in [&a, &b, &c] {
        assert_only_on_owner(&cluster, &edge, user, 1);
    }

    // Unknown mailboxes and every relay form are refused at RCPT.
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    smtp.command("EHLO client.example.net", "250 ");
    smtp.command("MAIL FROM:<a@sender.example.net>", "250 2.1.0");
    smtp.command("RCPT TO:<nobody@example.com>", "550 5.1.1");
    for relay in [
        "<user1@elsewhere.example>",
        "<x%elsewhere.example@example.com>",
        "<\"x@elsewhere.example\"@example.com>",
        "<@a.example:x@elsewhere.example>",
        "<x!y@example.com>",
    ] {
        smtp.command(&format!("RCPT TO:{relay}"), "554 5.7.1 Relay access denied");
    }
    smtp.command("DATA", "503 5.5.1");
    smtp.command("QUIT", "221");
}

#[test]
fn smuggling_and_oversized_messages_store_nothing() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let limits = "[limits]\npre_auth_timeout_seconds = 5\nmax_message_octets = 10000\n";
    let edge = start_edge(&cluster, &[Listen("smtp", None)], limits);
    let user = "user7@example.com";
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    smtp.command("EHLO client.example.net", "250 ");
    for end in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r"] {
        smtp.command("MAIL FROM:<a@sender.example.net>", "250");
        smtp.command(&format!("RCPT TO:<{user}>"), "250 2.1.5");
        smtp.command("DATA", "354");
        let smuggled = format!(
            "Subject: cover\r\n\r\nhello{end}MAIL FROM:<evil@x.example>\r\nRCPT TO:<{user}>\r\n\
             DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
        );
        smtp.send(smuggled.as_bytes());
        smtp.expect("550 5.6.0 Bare CR or LF");
    }
    // The session is still in step: a clean message goes through after all that.
    smtp.command("MAIL FROM:<a@sender.example.net>", "250");
    smtp.command(&format!("RCPT TO:<{user}>"), "250");
    smtp.command("DATA", "354");
    smtp.send(b"Subject: clean\r\n\r\n.. a stuffed dot line\r\n.\r\n");
    smtp.expect("250 2.0.0");
    assert_only_on_owner(&cluster, &edge, user, 1);
    let text = stored(&cluster, &owner(&edge, user), user).join("");
    assert!(
        text.contains("Subject: clean\n\n. a stuffed dot line\n"),
        "{text}"
    );
    assert!(
        !text.contains("smuggled") && !text.contains("evil"),
        "{text}"
    );

    // Over the limit in DATA (no SIZE announced): 552 after the end, nothing stored.
    let big = "x".repeat(70);
    let other = "user8@example.com";
    smtp.command("MAIL FROM:<a@sender.example.net>", "250");
    smtp.command(&format!("RCPT TO:<{other}>"), "250");
    smtp.command("DATA", "354");
    for _ in 0..300 {
        smtp.send(format!("{big}\r\n").as_bytes());
    }
    smtp.send(b".\r\n");
    smtp.expect("552 5.3.4");
    smtp.command("NOOP", "250");
    smtp.command("QUIT", "221");
    // Announced with SIZE (smtplib does so when the server offers it): 552 at MAIL.
    let out = smtplib(
        &edge,
        &format!(
            "try:\n    s.sendmail('a@x.example', ['{other}'], 'Subject: big\\r\\n\\r\\n' + 'y' * 20000)\n\
             except smtplib.SMTPSenderRefused as e:\n    print('refused', e.smtp_code)"
        ),
    );
    assert!(out.contains("refused 552"), "{out}");
    assert_only_on_owner(&cluster, &edge, other, 0);

    // Bad input gets a protocol answer; what cannot be resynchronised is closed.
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    smtp.command("MAIL FROM:<a@sender.example.net>", "503 5.5.1");
    smtp.command("FOO bar", "500 5.5.2");
    smtp.command("EHLO client.example.net", "250 ");
    smtp.command("MAIL FROM:<a@sender.example.net> SIZE=20000", "552 5.3.4");
    smtp.command("RCPT TO:<user7@example.com>", "503 5.5.1");
    smtp.command(&"NOOP ".repeat(1000), "500 5.5.2 Line too long");
    smtp.expect_closed();
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    smtp.send(b"GET / HTTP/1.1\r\n");
    smtp.expect_closed();
}

#[test]
fn a_stopped_owner_is_a_temporary_failure_at_rcpt() {
    if skip() {
        return;
    }
    let mut cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("smtp", None)], "");
    let [victim, _, survivor] = spread_users(&edge);
    let index = backend_index(&owner(&edge, &victim));
    cluster.backend_mut(index).expect("backend").stop();
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    smtp.command("EHLO client.example.net", "250 ");
    smtp.command("MAIL FROM:<a@sender.example.net>", "250");
    smtp.command(&format!("RCPT TO:<{victim}>"), "451 4.4.1");
    smtp.command(&format!("RCPT TO:<{survivor}>"), "250 2.1.5");
    smtp.command("DATA", "354");
    smtp.send(b"Subject: survivor\r\n\r\nstill delivered\r\n.\r\n");
    smtp.expect("250 2.0.0");
    assert_only_on_owner(&cluster, &edge, &survivor, 1);

    // The owner dies while the message streams: a 4xx, never a 250, nothing stored.
    let third = (1..=USERS)
        .map(|n| format!("user{n}@example.com"))
        .find(|u| {
            ![&victim, &survivor]
                .iter()
                .any(|v| owner(&edge, v) == owner(&edge, u))
        })
        .expect("a user on the third backend");
    smtp.command("MAIL FROM:<a@sender.example.net>", "250");
    smtp.command(&format!("RCPT TO:<{third}>"), "250 2.1.5");
    smtp.command("DATA", "354");
    smtp.send(b"Subject: interrupted\r\n\r\nfirst part\r\n");
    let index = backend_index(&owner(&edge, &third));
    cluster.backend_mut(index).expect("backend").stop();
    smtp.send(b"second part\r\n.\r\n");
    // 4.4.2 when the connection is gone, 4.3.0 when the dying backend still answered
    // the end of data with its own temporary failure.
    smtp.expect("451 4.");
    smtp.command("QUIT", "221");
    assert_only_on_owner(&cluster, &edge, &third, 0);
}

/// Hostile volume and pace: a 10 MB command line, 10 000 pipelined RCPTs, a client that
/// trickles a command a byte at a time — each gets its proper reply, memory stays bounded,
/// and what was accepted is delivered exactly once. `<Postmaster>` reaches its mailbox.
#[test]
fn hostile_volume_and_pace_get_bounded_answers() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let extra =
        "[limits]\npre_auth_timeout_seconds = 2\n[server]\npostmaster = \"user5@example.com\"\n";
    let edge = start_edge(&cluster, &[Listen("smtp", None)], extra);
    let before = edge.rss_kib();

    // 10 MB without a line end: refused and closed once the line limit is passed.
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    let mut writer = smtp.writer.try_clone().expect("clone");
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'A'; 1024 * 1024];
        // The edge closes early; later writes fail, which is the point.
        (0..10).all(|_| writer.write_all(&chunk).is_ok())
    });
    smtp.expect("500 5.5.2 Line too long");
    let _ = flood.join();

    // 10 000 RCPTs in one pipelined burst (written by a thread while replies are read).
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    smtp.command("EHLO client.example.net", "250 ");
    smtp.command("MAIL FROM:<a@sender.example.net>", "250");
    let mut writer = smtp.writer.try_clone().expect("clone");
    let burst = std::thread::spawn(move || {
        let mut lines = String::new();
        for i in 0..10_000 {
            lines.push_str(&format!("RCPT TO:<user{}@example.com>\r\n", i % USERS + 1));
        }
        writer.write_all(lines.as_bytes()).expect("write RCPTs");
    });
    let mut accepted = std::collections::BTreeSet::new();
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..10_000 {
        let reply = smtp.reply();
        *codes.entry(reply[..3].to_owned()).or_insert(0) += 1;
        if reply.starts_with("250 2.1.5 OK\r") {
            accepted.insert(i % USERS + 1);
        }
    }
    burst.join().expect("burst writer");
    assert_eq!(codes.values().sum::<usize>(), 10_000, "{codes:?}");
    assert!(
        codes.keys().all(|c| c == "250" || c == "452"),
        "only accepted or 452 4.5.3: {codes:?}"
    );
    assert!(
        (1..=100).contains(&accepted.len()),
        "at most 100 distinct recipients: {}",
        accepted.len()
    );
    smtp.command("DATA", "354");
    smtp.send(b"Subject: many\r\n\r\nto many\r\n.\r\n");
    smtp.expect("250 2.0.0");
    for n in accepted.iter().take(5) {
        assert_only_on_owner(&cluster, &edge, &format!("user{n}@example.com"), 1);
    }

    // <Postmaster> (no domain) goes to server.postmaster.
    smtp.command("MAIL FROM:<a@sender.example.net>", "250");
    smtp.command("RCPT TO:<Postmaster>", "250 2.1.5");
    smtp.command("DATA", "354");
    smtp.send(b"Subject: to the postmaster\r\n\r\nhello\r\n.\r\n");
    smtp.expect("250 2.0.0");
    smtp.command("QUIT", "221");
    let postmaster = "user5@example.com";
    let expected = usize::from(accepted.contains(&5)) + 1;
    assert_only_on_owner(&cluster, &edge, postmaster, expected);

    // A command trickled a byte every 300 ms: the whole line has the 2 s command timeout.
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    let started = std::time::Instant::now();
    let mut writer = smtp.writer.try_clone().expect("clone");
    let trickle = std::thread::spawn(move || {
        for byte in b"EHLO slow.example.net".iter().cycle().take(60) {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    smtp.expect("421 4.4.2");
    let waited = started.elapsed();
    trickle.join().expect("trickle");
    assert!(
        waited < Duration::from_secs(8),
        "closed after the command timeout, not after the trickle ended: {waited:?}"
    );

    // 50 MB of DATA over the 25 MiB default limit: streamed and counted, never held; 552.
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    smtp.command("EHLO client.example.net", "250 ");
    smtp.command("MAIL FROM:<a@sender.example.net>", "250");
    smtp.command("RCPT TO:<user11@example.com>", "250");
    smtp.command("DATA", "354");
    let mut writer = smtp.writer.try_clone().expect("clone");
    let big = std::thread::spawn(move || {
        let line = format!("{}\r\n", "y".repeat(998));
        let chunk = line.repeat(1024); // ~1 MB
        for _ in 0..50 {
            writer.write_all(chunk.as_bytes()).expect("DATA chunk");
        }
        writer.write_all(b".\r\n").expect("end of data");
    });
    smtp.expect("552 5.3.4");
    big.join().expect("writer");
    smtp.command("QUIT", "221");
    assert_only_on_owner(&cluster, &edge, "user11@example.com", 0);

    let grown = edge.rss_kib().saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "hostile sessions grew protobalance by {grown} KiB"
    );
}

/// SMTPUTF8 is offered, but Dovecot 2.3's LMTP does not take it: such a transaction gets
/// `553 5.6.7` at RCPT (no downgrade), and a non-ASCII address needs the parameter.
#[test]
fn smtputf8_goes_only_where_the_backend_offers_it() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("smtp", None)], "");
    let mut smtp = RawSmtp::connect(edge.listeners[0]);
    smtp.send(b"EHLO client.example.net\r\n");
    let mut ehlo = String::new();
    loop {
        let mut line = String::new();
        smtp.reader.read_line(&mut line).expect("EHLO line");
        ehlo.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    }
    assert!(ehlo.contains("SMTPUTF8\r\n"), "{ehlo}");
    smtp.command("MAIL FROM:<pelé@far.example>", "553 5.6.7");
    smtp.command("MAIL FROM:<a@far.example>", "250");
    smtp.command("RCPT TO:<jörg@example.com>", "553 5.6.7");
    smtp.command("RSET", "250");
    smtp.command("MAIL FROM:<pelé@far.example> SMTPUTF8", "250");
    smtp.command(
        "RCPT TO:<user9@example.com>",
        "553 5.6.7 Mailbox server does not support SMTPUTF8",
    );
    smtp.command("DATA", "503");
    smtp.command("QUIT", "221");
    assert_only_on_owner(&cluster, &edge, "user9@example.com", 0);
}

/// A plain SMTP client on a socket, for input smtplib would not send.
struct RawSmtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawSmtp {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut smtp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        smtp.expect("220 ");
        smtp
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Sends `line` and checks that the reply starts with `expected`.
    fn command(&mut self, line: &str, expected: &str) {
        self.send(format!("{line}\r\n").as_bytes());
        let reply = self.reply();
        assert!(reply.starts_with(expected), "{line} → {reply}");
    }

    fn expect(&mut self, expected: &str) {
        let reply = self.reply();
        assert!(reply.starts_with(expected), "expected {expected}: {reply}");
    }

    fn expect_closed(&mut self) {
        let mut rest = String::new();
        let read = self.reader.read_line(&mut rest).expect("read until close");
        assert_eq!(read, 0, "expected the edge to close, got {rest}");
    }

    /// The last line of the next (possibly multi-line) reply.
    fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("reply line");
            assert!(!line.is_empty(), "connection closed");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    }
}

/// Backend delivery sessions are reused (`limits.backend_idle_sessions`): one connection
/// to the owner serves messages from three clients in turn, and each message carries its
/// own client's HELO and address (XCLIENT again on the reused session), never the
/// previous client's; a fourth message from the third client's address and name needs no
/// new XCLIENT and still names it.
#[test]
fn reused_backend_sessions_carry_each_clients_identity() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("smtp", None)], "");
    let user = "user42@example.com";
    let addr = edge.listeners[0];
    let clients = [
        (0, "127.0.0.9"),
        (1, "127.0.0.10"),
        (2, "127.0.0.11"),
        (2, "127.0.0.11"),
    ];
    for (i, (who, client)) in clients.iter().enumerate() {
        let out = python(&format!(
            "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=10, source_address=('{client}', 0))\n\
             s.ehlo('client{who}.example.net')\n\
             print(s.sendmail('a@sender.example.net', ['{user}'], 'Subject: reuse-{i}\\r\\n\\r\\nx\\r\\n'))\n\
             s.quit()\n",
            addr.ip(),
            addr.port()
        ))
        .expect("smtplib");
        assert!(out.trim_end().ends_with("{}"), "{out}");
    }
    assert_only_on_owner(&cluster, &edge, user, 4);
    let home = owner(&edge, user);
    for message in stored(&cluster, &home, user) {
        let i: usize = message
            .split("Subject: reuse-")
            .nth(1)
            .and_then(|rest| rest.get(..1))
            .and_then(|d| d.parse().ok())
            .expect("subject");
        let (who, client) = clients[i];
        let expected = format!("Received: from client{who}.example.net ([{client}])");
        assert!(message.contains(&expected), "message {i}: {message}");
    }
    let sample = |result: &str| support::backend_sessions(&edge, &home, result);
    assert_eq!(sample("fresh"), 1, "one connection …");
    assert_eq!(sample("reused"), 3, "… reused three times");
}

/// A reused session checks the backend is still there with a RSET sent in the same write
/// as its MAIL FROM and first RCPT (the backend offers PIPELINING). When the backend
/// dropped the idle session meanwhile (here: it restarted), that write's answer is the
/// closed connection; the edge opens a fresh session and the client notices nothing.
#[test]
fn a_pooled_session_the_backend_dropped_is_replaced_unnoticed() {
    if skip() {
        return;
    }
    let mut cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("smtp", None)], "");
    let user = "user42@example.com";
    let home = owner(&edge, user);
    let send = |i: usize| {
        let out = smtplib(
            &edge,
            &format!(
                "print(s.sendmail('a@sender.example.net', ['{user}'], 'Subject: pooled-{i}\\r\\n\\r\\nx\\r\\n'))\n"
            ),
        );
        assert!(out.trim_end().ends_with("{}"), "message {i}: {out}");
    };
    let sample = |result: &str| support::backend_sessions(&edge, &home, result);
    send(0);
    send(1);
    assert_eq!(
        (sample("fresh"), sample("reused"), sample("stale")),
        (1, 1, 0),
        "the second message reused the first one's session"
    );
    let backend = cluster.backend_mut(backend_index(&home)).expect("backend");
    backend.stop();
    backend.restart().expect("restart");
    // A health check may have seen it down meanwhile: until one sees it up again, its
    // mailboxes get 451 (that is the breaker's job, not what this test is about).
    let up = format!("protobalance_backend_up{{backend=\"{home}\",service=\"lmtp\"}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while support::sample(&edge, &up) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{home} never came back up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    send(2);
    assert_eq!(
        (sample("fresh"), sample("reused"), sample("stale")),
        (2, 2, 1),
        "the pooled session was found gone at its first command and replaced"
    );
    assert_only_on_owner(&cluster, &edge, user, 3);
}
