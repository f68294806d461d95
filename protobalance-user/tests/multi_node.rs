//! Two protobalance nodes sharing one real PostgreSQL directory in front of three real
//! Dovecot backends: a mailbox provisioned through node A's API takes mail through node B
//! and is read through node A's POP3; a mailbox deleted on node A is refused by node B
//! within a second (its cached owner dropped by the change notification).

mod support;

use std::time::{Duration, Instant};

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
