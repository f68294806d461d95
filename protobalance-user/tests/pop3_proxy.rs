//! POP3 through protobalance against three real Dovecot backends, driven by Python's
//! poplib: logins reach the mailbox's owner (mail delivered there by LMTP comes back
//! byte for byte), the backend sees the real client address, credential failures and
//! temporary failures keep their meaning, and bad input gets a protocol answer.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use protobalance_tests::{DovecotCluster, password_for, python};

mod support;

use support::{CLIENT_IP, Edge, Listen, USERS, deliver, metrics, owner, start_edge};

fn start(cluster: &DovecotCluster) -> Edge {
    start_edge(cluster, &[Listen("pop3", None)], "")
}

/// A poplib session through the edge from CLIENT_IP; `login` is Python code using `p`.
fn pop3_script(edge: &Edge, login: &str, then: &str) -> anyhow::Result<String> {
    python(&format!(
        "{}import poplib, base64\n\
         p = poplib.POP3('{}', {}, timeout=10)\n{login}\n{then}\n",
        support::python_from_client_ip(),
        edge.listeners[0].ip(),
        edge.listeners[0].port()
    ))
}

fn user_pass(user: &str) -> String {
    let pass = password_for(user).expect("test user");
    format!("p.user('{user}')\np.pass_('{pass}')")
}

fn auth_plain(user: &str) -> String {
    let pass = password_for(user).expect("test user");
    format!("p._shortcmd('AUTH PLAIN ' + base64.b64encode(b'\\0{user}\\0{pass}').decode())")
}

fn skip() -> bool {
    support::skip("pop3_proxy")
}

#[test]
fn logins_reach_the_owner_and_read_what_was_delivered_there() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start(&cluster);
    for (i, n) in [1, 42, 100, 150, 201, 299].into_iter().enumerate() {
        let user = format!("user{n}@example.com");
        let backend = owner(&edge, &user);
        let token = format!("token-{n}-{}", std::process::id());
        deliver(&cluster, &backend, &user, &token);
        let login = if i % 2 == 0 {
            user_pass(&user)
        } else {
            auth_plain(&user)
        };
        let out = pop3_script(
            &edge,
            &login,
            "print(p.stat()); print(b'\\n'.join(p.retr(1)[1]).decode()); p.quit()",
        )
        .expect("pop3 through the edge");
        assert!(out.starts_with("(1, "), "{user}: one message: {out}");
        assert!(
            out.contains(&format!("Subject: {token}"))
                && out.contains(&format!("body {token}\nline two")),
            "{out}"
        );
        for other in cluster.backends().iter().filter(|b| b.name() != backend) {
            assert_eq!(
                other.message_count(&user).expect("count"),
                0,
                "{user} only on {backend}"
            );
        }
        let log = std::fs::read_to_string(
            cluster
                .backends()
                .iter()
                .find(|b| b.name() == backend)
                .expect("b")
                .log_path(),
        )
        .expect("dovecot log");
        assert!(
            log.lines().any(|l| l.contains("pop3-login: Info: Login")
                && l.contains(&format!("<{user}>"))
                && l.contains(&format!("rip={CLIENT_IP}"))),
            "Dovecot logged the real client address for {user}"
        );
    }
    // Normalized logins reach the same mailbox.
    let out = pop3_script(
        &edge,
        &user_pass("user42@example.com").replace(
            "p.user('user42@example.com')",
            "p.user('User42+list@EXAMPLE.com')",
        ),
        "print(p.stat()); p.quit()",
    )
    .expect("normalized login");
    assert!(out.starts_with("(1, "), "{out}");
    // Per-backend session metrics: every login above was spliced and has ended.
    let owner42 = owner(&edge, "user42@example.com");
    let total = support::metric_line(
        &edge,
        &[
            "protobalance_proxied_sessions_total",
            &format!("backend=\"{owner42}\""),
        ],
    );
    let count: u64 = total
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("count");
    assert!(count >= 2, "{total}");
    let active = support::metric_line(
        &edge,
        &[
            "protobalance_proxied_sessions_active",
            &format!("backend=\"{owner42}\""),
        ],
    );
    assert!(active.ends_with(" 0"), "all sessions ended: {active}");
}

#[test]
fn failures_keep_their_meaning() {
    if skip() {
        return;
    }
    let mut cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start(&cluster);
    let wrong = pop3_script(&edge, "p.user('user7@example.com')\np.pass_('wrong')", "")
        .expect_err("wrong password");
    assert!(
        wrong.to_string().contains("-ERR [AUTH]"),
        "backend's refusal relayed: {wrong}"
    );
    let unknown =
        pop3_script(&edge, "p.user('nobody@example.com')\np.pass_('x')", "").expect_err("unknown");
    assert!(
        unknown
            .to_string()
            .contains("-ERR [AUTH] Authentication failed."),
        "{unknown}"
    );
    let foreign = pop3_script(&edge, "p.user('user1@elsewhere.example')\np.pass_('x')", "")
        .expect_err("foreign");
    assert!(foreign.to_string().contains("-ERR [AUTH]"), "{foreign}");

    // Stop the owner of user5: its logins fail temporarily and fast, others still work.
    let victim = owner(&edge, "user5@example.com");
    let survivor = (1..=USERS)
        .map(|n| format!("user{n}@example.com"))
        .find(|u| owner(&edge, u) != victim)
        .expect("a user on another backend");
    let index: usize = victim
        .trim_start_matches("backend")
        .parse()
        .expect("backendN");
    cluster.backend_mut(index).expect("backend").stop();
    let down = pop3_script(&edge, &support::timed(&user_pass("user5@example.com")), "")
        .expect_err("owner down");
    assert!(
        down.to_string().contains("-ERR [SYS/TEMP]"),
        "temporary failure, not a credential error: {down}"
    );
    let secs = support::elapsed(&down.to_string());
    assert!(
        secs < 1.0,
        "temporary failure within 1 s (breaker open): {secs} s"
    );
    let ok = pop3_script(&edge, &user_pass(&survivor), "print(p.stat()); p.quit()")
        .expect("other backend fine");
    assert!(ok.starts_with('('), "{ok}");
    let up_line = format!("protobalance_backend_up{{backend=\"{victim}\",service=\"pop3\"}}");
    assert!(
        metrics(&edge).contains(&format!("{up_line} 0")),
        "breaker open on /metrics"
    );

    // The owner comes back: the health check closes the breaker and logins work again.
    cluster
        .backend_mut(index)
        .expect("backend")
        .restart()
        .expect("restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pop3_script(
            &edge,
            &user_pass("user5@example.com"),
            "print(p.stat()); p.quit()",
        ) {
            Ok(out) if out.starts_with('(') => break,
            other => assert!(
                Instant::now() < deadline,
                "logins never recovered: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        metrics(&edge).contains(&format!("{up_line} 1")),
        "breaker closed again"
    );
}

/// Raw-socket bad input: each gets its documented reply or a close, never a hang.
#[test]
fn bad_input_gets_protocol_answers() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start(&cluster);
    let session = |send: &[u8]| -> String {
        let mut s = TcpStream::connect(edge.listeners[0]).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(send);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    // Memory stays bounded under a barrage of over-long lines from parallel clients.
    let before = edge.rss_kib();
    std::thread::scope(|scope| {
        for _ in 0..20 {
            scope.spawn(|| {
                let out = session(&vec![b'B'; 1024 * 1024]);
                assert!(out.contains("-ERR Line too long; closing"), "{out}");
            });
        }
    });
    let grown = edge.rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "20 MiB of junk grew protobalance by {grown} KiB"
    );
    let long = session(&vec![b'A'; 100 * 1024]);
    assert!(long.contains("-ERR Line too long; closing"), "{long}");
    let garbage = session(b"\x16\x03\x01\x02\x00\x01\x00\xfc\x03\x03\r\nQUIT\r\n");
    assert!(
        garbage.contains("-ERR Invalid command") && garbage.ends_with("+OK Bye\r\n"),
        "{garbage}"
    );
    let mut attempts = Vec::new();
    for _ in 0..1000 {
        attempts.extend_from_slice(b"AUTH PLAIN AHVzZXIxQGV4YW1wbGUuY29tAG5vcGU=\r\n");
    }
    let brute = session(&attempts);
    assert_eq!(
        brute.matches("-ERR").count(),
        4,
        "3 refusals then the closing line: {brute}"
    );
    assert!(brute.contains("Too many failed logins; closing"), "{brute}");
    let started = Instant::now();
    let silent = session(b"");
    assert!(
        silent.contains("-ERR Timed out waiting for login"),
        "{silent}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "pre-auth timeout (2 s) enforced"
    );
    let stls = session(b"STLS\r\nCAPA\r\nQUIT\r\n");
    assert!(stls.contains("-ERR STLS is not available"), "{stls}");
}

/// Per-address admission and the idle timeout of proxied sessions.
#[test]
fn sessions_per_address_and_idle_sessions_are_limited() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let limits = "[limits]\nmax_sessions_per_ip = 2\nidle_timeout_seconds = 1\npre_auth_timeout_seconds = 10\nmax_line_octets = 300\n";
    let edge = support::start_edge(&cluster, &[support::Listen("pop3", None)], limits);
    let addr = edge.listeners[0];
    let greet = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut first = TcpStream::connect(addr).expect("connect");
    let mut second = TcpStream::connect(addr).expect("connect");
    assert!(greet(&mut first).starts_with("+OK"));
    assert!(greet(&mut second).starts_with("+OK"));
    let mut third = TcpStream::connect(addr).expect("connect");
    let refused = greet(&mut third);
    assert!(
        refused.starts_with("-ERR [SYS/TEMP] Too many connections"),
        "{refused}"
    );
    drop(first);
    // The configured line limit (300) is tighter than the codec's 1024.
    second.write_all(&[b'x'; 400]).expect("write");
    let mut rest = String::new();
    let _ = second.read_to_string(&mut rest);
    assert!(rest.contains("-ERR Line too long; closing"), "{rest}");
    std::thread::sleep(Duration::from_millis(200));
    let mut again = TcpStream::connect(addr).expect("connect");
    assert!(greet(&mut again).starts_with("+OK"), "a slot is free again");

    // A logged-in session that stays silent is closed after the idle timeout (1 s).
    let user = "user3@example.com";
    let pass = password_for(user).expect("test user");
    drop(again);
    std::thread::sleep(Duration::from_millis(200));
    let mut s = TcpStream::connect(addr).expect("connect");
    greet(&mut s);
    s.write_all(format!("USER {user}\r\nPASS {pass}\r\n").as_bytes())
        .expect("login");
    let started = Instant::now();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    assert!(text.contains("+OK Logged in"), "{text}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed when idle: {waited:?}"
    );
}

/// In an auto-provisioning domain a login to an unassigned mailbox goes to the candidate
/// backend and is recorded only if that backend accepts it: failed logins leave no trace.
#[test]
fn auto_provisioning_logins_assign_only_on_success() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(3, 400).expect("cluster");
    let domain = "[[domain]]\nname = \"example.com\"\nunknown_mailbox = \"auto-provision\"\n";
    let edge = support::start_edge(&cluster, &[support::Listen("pop3", None)], domain);
    let lookup = |user: &str| {
        let out = std::process::Command::new(support::BIN)
            .args(["directory", "lookup", "--config"])
            .arg(edge.dir.path().join("pb.toml"))
            .arg(user)
            .output()
            .expect("lookup");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // user350 exists on the Dovecot side but not in the directory (300 were imported).
    let wrong = pop3_script(&edge, "p.user('user350@example.com')\np.pass_('wrong')", "")
        .expect_err("refused");
    assert!(wrong.to_string().contains("-ERR [AUTH]"), "{wrong}");
    let junk = pop3_script(
        &edge,
        "p.user('nobody-at-all@example.com')\np.pass_('x')",
        "",
    )
    .expect_err("refused");
    assert!(junk.to_string().contains("-ERR [AUTH]"), "{junk}");
    assert!(
        lookup("user350@example.com").contains("not in the directory"),
        "failed login assigned nothing"
    );
    assert!(lookup("nobody-at-all@example.com").contains("not in the directory"));
    let ok = pop3_script(
        &edge,
        &user_pass("user350@example.com"),
        "print(p.stat()); p.quit()",
    )
    .expect("login");
    assert!(ok.starts_with("(0, 0)"), "{ok}");
    assert!(
        lookup("user350@example.com").contains("user350@example.com -> backend"),
        "assigned on success"
    );
}
