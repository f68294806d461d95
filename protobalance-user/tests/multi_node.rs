//! Two protobalance nodes sharing one real PostgreSQL directory in front of three real
//! Dovecot backends: a mailbox provisioned through node A's API takes mail through node B
//! and is read through node A's POP3; a mailbox deleted on node A is refused by node B
//! within a second (its cached owner dropped by the change notification); a login under way
//! to the old owner when the owner changes does not stay there.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use protobalance_tests::{DovecotCluster, PostgresServer, password_for, python, require_postgres};
use support::{
    Edge, Listen, USERS, backend_section, cli, owner, sample, start_edge, start_edge_sections,
};

const TOKEN: &str = "multi-node-test-token-0123456789";

/// smtplib from 127.0.0.9 through `edge`'s SMTP listener (its first); prints what each
/// recipient got.
fn send(edge: &Edge, rcpt: &str, token: &str) -> String {
    let addr = edge.listeners[0];
    python(&format!(
        "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=10, source_address=('127.0.0.9', 0))\n\
         s.ehlo('client.example.net')\ns.mail('sender@example.net')\n\
         code, text = s.rcpt('{rcpt}')\nprint('rcpt', code, text.decode())\n\
         if code == 250:\n    print('data', s.data('Subject: {token}\\r\\n\\r\\nbody {token}\\r\\n')[0])\n\
         s.quit()\n",
        addr.ip(),
        addr.port()
    ))
    .expect("smtplib")
}

#[test]
fn two_nodes_on_one_postgres_agree_on_every_mailbox() {
    if support::skip("two_nodes_on_one_postgres_agree_on_every_mailbox")
        || !require_postgres("two_nodes_on_one_postgres_agree_on_every_mailbox")
    {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let cluster = DovecotCluster::start(3, USERS + 10).expect("cluster");
    let extra = format!(
        "[directory.postgres]\nurl = \"{}\"\n\
         [api]\n[[api.token]]\nname = \"crm\"\ntoken = \"{TOKEN}\"\naccess = \"read-write\"\n",
        pg.url()
    );
    let listeners = [Listen("smtp", None), Listen("pop3", None)];
    // Node A provisions user1..USERS into the shared directory; node B finds them there.
    let a = start_edge(&cluster, &listeners, &extra);
    let b = start_edge(&cluster, &listeners, &extra);
    assert_eq!(
        pg.psql("SELECT count(*) FROM mailboxes").expect("psql"),
        USERS.to_string()
    );

    // Provisioning on A (API), delivery through B, POP3 through A.
    let fresh = format!("user{}@example.com", USERS + 1);
    let (code, text) = cli(&a, TOKEN, &["ctl", "mailbox", "add", &fresh]);
    assert_eq!(code, 0, "{text}");
    let out = send(&b, &fresh, "via-node-b");
    assert!(
        out.contains("rcpt 250") && out.contains("data 250"),
        "{out}"
    );
    let home = owner(&a, &fresh);
    assert_eq!(owner(&b, &fresh), home, "both nodes read one directory");
    for backend in cluster.backends() {
        let want = usize::from(backend.name() == home);
        assert_eq!(
            backend.message_count(&fresh).expect("count"),
            want,
            "{fresh} on {}",
            backend.name()
        );
    }
    let pop3 = a.listeners[1];
    let pass = password_for(&fresh).expect("password");
    let read = python(&format!(
        "import poplib\np = poplib.POP3('{}', {}, timeout=10)\np.user('{fresh}')\np.pass_('{pass}')\n\
         print('stat', p.stat()[0])\nprint(b'\\n'.join(p.retr(1)[1]).decode())\np.quit()\n",
        pop3.ip(),
        pop3.port()
    ))
    .expect("POP3 through node A");
    assert!(
        read.contains("stat 1") && read.contains("Subject: via-node-b"),
        "{read}"
    );

    // B caches the owner of a mailbox it delivers to; A deletes the mailbox; B refuses
    // the next delivery within a second.
    let doomed = "user7@example.com";
    for round in 0..2 {
        let out = send(&b, doomed, &format!("before-{round}"));
        assert!(out.contains("rcpt 250"), "{out}");
    }
    let (code, text) = cli(&a, TOKEN, &["ctl", "mailbox", "rm", doomed]);
    assert_eq!(code, 0, "{text}");
    let deleted = Instant::now();
    let refused = loop {
        let out = send(&b, doomed, "after");
        if out.contains("rcpt 550") {
            break deleted.elapsed();
        }
        assert!(out.contains("rcpt 250"), "{out}");
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "node B still accepts for a mailbox node A deleted: {out}"
        );
    };
    eprintln!("node B refused the deleted mailbox after {refused:?}");
    assert_eq!(sample(&b, "protobalance_directory_cache_coherent"), 1);
    assert!(sample(&b, "protobalance_directory_changes_heard_total") >= 1);
}

/// POP3 login through `edge` (its second listener): the server's answer to PASS.
fn pop3_login(edge: &Edge, user: &str) -> String {
    let pop3 = edge.listeners[1];
    let pass = password_for(user).expect("password");
    python(&format!(
        "import poplib\np = poplib.POP3('{}', {}, timeout=10)\np.user('{user}')\n\
         try:\n    print(p.pass_('{pass}').decode()); p.quit()\n\
         except poplib.error_proto as e:\n    print(e.args[0].decode())\n",
        pop3.ip(),
        pop3.port()
    ))
    .expect("poplib")
    .trim()
    .to_owned()
}

#[test]
fn a_backend_added_or_taken_down_on_one_node_is_so_on_every_node() {
    let test = "a_backend_added_or_taken_down_on_one_node_is_so_on_every_node";
    if support::skip(test) || !require_postgres(test) {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let cluster = DovecotCluster::start(4, USERS + 10).expect("cluster");
    let sections: Vec<String> = cluster
        .backends()
        .iter()
        .take(3)
        .map(|b| backend_section(b, ""))
        .collect();
    let extra = format!(
        "[directory.postgres]\nurl = \"{}\"\n\
         [api]\n[[api.token]]\nname = \"crm\"\ntoken = \"{TOKEN}\"\naccess = \"read-write\"\n",
        pg.url()
    );
    let listeners = [Listen("smtp", None), Listen("pop3", None)];
    let mut a = start_edge_sections(&sections, &listeners, &extra);
    let b = start_edge_sections(&sections, &listeners, &extra);

    // backend4 is added through node A's API, with room for every new mailbox.
    let b4 = &cluster.backends()[3];
    let (code, text) = cli(
        &a,
        TOKEN,
        &[
            "ctl",
            "backend",
            "add",
            "backend4",
            "--address",
            &b4.ip().to_string(),
            "--pop3-port",
            &b4.pop3_port().to_string(),
            "--imap-port",
            &b4.imap_port().to_string(),
            "--lmtp-port",
            &b4.lmtp_port().to_string(),
            "--capacity",
            "100000",
        ],
    );
    assert_eq!(code, 0, "{text}");
    // Provisioned through node B, delivered through node B: node B must know backend4.
    let fresh = format!("user{}@example.com", USERS + 2);
    let (code, text) = cli(&b, TOKEN, &["ctl", "mailbox", "add", &fresh]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(owner(&b, &fresh), "backend4");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let out = send(&b, &fresh, "to-backend4");
        if out.contains("data 250") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node B cannot deliver to the backend node A added: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(b4.message_count(&fresh).expect("count"), 1);
    assert!(pop3_login(&b, &fresh).starts_with("+OK"));

    // Taken down on node A: both nodes answer its mailboxes with temporary failures;
    // brought back: both serve them again.
    let (code, text) = cli(&a, TOKEN, &["ctl", "backend", "down", "backend4"]);
    assert_eq!(code, 0, "{text}");
    for edge in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let answer = pop3_login(edge, &fresh);
            if answer.contains("[SYS/TEMP]") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still served while down: {answer}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = send(edge, &fresh, "while-down");
        assert!(
            !out.contains("data 250") && (out.contains("rcpt 4") || out.contains("data 4")),
            "a temporary refusal while down: {out}"
        );
    }
    // The state is the directory's: a restarted node starts with backend4 down.
    a.restart();
    let answer = pop3_login(&a, &fresh);
    assert!(
        answer.contains("[SYS/TEMP]"),
        "down after a restart: {answer}"
    );
    let (code, text) = cli(&a, TOKEN, &["ctl", "backend", "activate", "backend4"]);
    assert_eq!(code, 0, "{text}");
    for edge in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !pop3_login(edge, &fresh).starts_with("+OK") {
            assert!(Instant::now() < deadline, "not served after activate");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(
        b4.message_count(&fresh).expect("count"),
        1,
        "nothing delivered while down"
    );
}

/// A TCP relay to `backend` on loopback that holds back the backend's answers once the
/// client sent a LOGIN or AUTHENTICATE, by `delay`: a login under way for that long.
fn slow_login_relay(
    backend: SocketAddr,
    delay: Duration,
) -> (SocketAddr, protobalance_tests::process::ChildGuard) {
    let lo = std::net::IpAddr::from([127, 0, 0, 1]);
    let addr = SocketAddr::new(lo, protobalance_tests::free_port(lo).expect("port"));
    let script = format!(
        r#"
import socket, threading, time
listen = socket.socket()
listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listen.bind(("{ip}", {port}))
listen.listen(64)
def handle(c):
    b = socket.create_connection(("{bip}", {bport}))
    login = threading.Event()
    def up():
        while True:
            d = c.recv(65536)
            if not d:
                break
            if b"LOGIN" in d.upper() or b"AUTHENTICATE" in d.upper():
                login.set()
            b.sendall(d)
        b.close()
    def down():
        held = False
        while True:
            d = b.recv(65536)
            if not d:
                break
            if login.is_set() and not held:
                time.sleep({secs})
                held = True
            c.sendall(d)
        c.close()
    threading.Thread(target=up, daemon=True).start()
    threading.Thread(target=down, daemon=True).start()
while True:
    c, _ = listen.accept()
    handle(c)
"#,
        ip = addr.ip(),
        port = addr.port(),
        bip = backend.ip(),
        bport = backend.port(),
        secs = delay.as_secs_f64(),
    );
    let guard = protobalance_tests::process::ChildGuard::spawn(
        std::process::Command::new("python3").arg("-c").arg(script),
        "slow login relay",
    )
    .expect("relay");
    protobalance_tests::wait_for_port(addr, Duration::from_secs(10)).expect("relay listening");
    (addr, guard)
}

/// The race a move's switch can lose to a login: the owner changes (on another node)
/// while a login is under way to the old owner, before its session is registered, so
/// ending the registered sessions cannot reach it. The session checks the owner once
/// registered and closes; a login without a change in between stays open.
#[test]
fn a_login_under_way_when_the_owner_changes_does_not_stay_on_the_old_backend() {
    let test = "a_login_under_way_when_the_owner_changes_does_not_stay_on_the_old_backend";
    if support::skip(test) || !require_postgres(test) {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    // Every backend's IMAP behind a relay that holds logins for 3 s.
    let relays: Vec<_> = cluster
        .backends()
        .iter()
        .map(|b| {
            slow_login_relay(
                SocketAddr::new(b.ip(), b.imap_port()),
                Duration::from_secs(3),
            )
        })
        .collect();
    let sections: Vec<String> = cluster
        .backends()
        .iter()
        .zip(&relays)
        .map(|(b, (relay, _))| {
            format!(
                "[[backend]]\nname = \"{}\"\naddress = \"{}\"\npop3_port = {}\nimap_port = {}\nlmtp_port = {}\n",
                b.name(),
                relay.ip(),
                b.pop3_port(),
                relay.port(),
                b.lmtp_port()
            )
        })
        .collect();
    let extra = format!("[directory.postgres]\nurl = \"{}\"\n", pg.url());
    let edge = start_edge_sections(&sections, &[Listen("imap", None)], &extra);
    let imap = edge.listeners[0];
    // Logs in (held 3 s by the relay), then says whether the session stays open for 4 s.
    let session = |user: &str| support::imap_watcher(imap, user, 4);
    let control = python(&session("user2@example.com")).expect("control login");
    assert!(
        control.contains("login OK") && control.trim_end().ends_with("open"),
        "{control}"
    );

    let user = "user1@example.com";
    let from = owner(&edge, user);
    let to = if from == "backend1" {
        "backend2"
    } else {
        "backend1"
    };
    let out = std::thread::scope(|scope| {
        let client = scope.spawn(|| python(&session(user)).expect("login"));
        std::thread::sleep(Duration::from_millis(700));
        // Another node (here: straight in the shared database) changes the owner.
        pg.psql(&format!(
            "UPDATE mailboxes SET backend_id = (SELECT id FROM backends WHERE name = '{to}') \
             WHERE address = '{user}'"
        ))
        .expect("owner changed");
        client.join().expect("client thread")
    });
    assert!(out.contains("login OK"), "{out}");
    assert_eq!(
        out.lines().last(),
        Some("closed"),
        "the session on the old backend did not stay: {out}"
    );
    assert_eq!(owner(&edge, user), to);
}
