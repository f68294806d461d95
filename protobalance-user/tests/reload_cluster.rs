//! What a config reload changes in a running edge, against real Dovecot backends: a backend
//! added to the file joins the pool and takes new mailboxes by capacity; removing a backend
//! that still owns mailboxes is refused and the running config stays; certificates
//! rewritten in place are served from the next handshake.

use std::time::{Duration, Instant};

use protobalance_tests::{DovecotCluster, process, python};

mod support;

use support::{
    Edge, Listen, USERS, backend_section, cli, make_certificates, owner, sample,
    start_edge_sections,
};

const TOKEN: &str = "reload-cluster-token-0123456789abcd";

fn reload(edge: &Edge, result: &str) {
    let series = format!("protobalance_config_reloads_total{{result=\"{result}\"}}");
    let before = sample(edge, &series);
    process::signal(edge.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(15);
    while sample(edge, &series) == before {
        assert!(Instant::now() < deadline, "no reload counted as {result}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SHA-256 of the certificate the implicit-TLS POP3 listener presents for `name`.
fn fingerprint(edge: &Edge, name: &str) -> String {
    let addr = edge.listeners[1];
    python(&format!(
        "import hashlib, socket, ssl\nctx = ssl.create_default_context()\n\
         ctx.check_hostname = False\nctx.verify_mode = ssl.CERT_NONE\n\
         s = ctx.wrap_socket(socket.create_connection(('{}', {}), timeout=10), server_hostname='{name}')\n\
         print(hashlib.sha256(s.getpeercert(True)).hexdigest())\ns.close()\n",
        addr.ip(),
        addr.port()
    ))
    .expect("TLS handshake")
    .trim()
    .to_owned()
}

#[test]
fn a_reload_adds_a_backend_refuses_removing_an_owner_and_swaps_certificates() {
    let test = "a_reload_adds_a_backend_refuses_removing_an_owner_and_swaps_certificates";
    if support::skip(test) {
        return;
    }
    let cluster = DovecotCluster::start(4, USERS + 5).expect("cluster");
    let sections: Vec<String> = cluster
        .backends()
        .iter()
        .map(|b| backend_section(b, ""))
        .collect();
    let certs_dir = tempfile::tempdir().expect("tempdir");
    let certificates = make_certificates(certs_dir.path());
    let extra = format!(
        "{certificates}[api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\naccess = \"read-write\"\n"
    );
    // Three of the four backends at first.
    let edge = start_edge_sections(
        &sections[..3],
        &[
            Listen("smtp", Some("none")),
            Listen("pop3", Some("implicit")),
        ],
        &extra,
    );
    let path = edge.dir.path().join("pb.toml");
    let base = std::fs::read_to_string(&path).expect("config");

    // backend4 joins with a large capacity: the next new mailbox goes there.
    let with_four = format!(
        "{base}{}",
        backend_section(&cluster.backends()[3], "capacity = 100000")
    );
    std::fs::write(&path, &with_four).expect("config");
    reload(&edge, "applied");
    let fresh = format!("user{}@example.com", USERS + 1);
    let (code, text) = cli(&edge, TOKEN, &["ctl", "mailbox", "add", &fresh]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(owner(&edge, &fresh), "backend4", "{text}");
    let smtp = edge.listeners[0];
    let out = python(&format!(
        "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=10)\n\
         print(s.sendmail('a@example.net', ['{fresh}'], 'Subject: to backend4\\r\\n\\r\\nhi\\r\\n'))\ns.quit()\n",
        smtp.ip(),
        smtp.port()
    ))
    .expect("smtplib");
    assert!(out.contains("{}"), "{out}");
    assert_eq!(
        cluster.backends()[3].message_count(&fresh).expect("count"),
        1,
        "delivered to the backend that joined by reload"
    );

    // Removing backend1 while it owns mailboxes is refused; it keeps serving.
    let without_one = with_four.replacen(&sections[0], "", 1);
    assert_ne!(without_one, with_four);
    std::fs::write(&path, &without_one).expect("config");
    reload(&edge, "invalid");
    let user = (1..=USERS)
        .map(|i| format!("user{i}@example.com"))
        .find(|u| owner(&edge, u) == "backend1")
        .expect("a backend1 mailbox");
    let out = python(&format!(
        "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=10)\n\
         print(s.sendmail('a@example.net', ['{user}'], 'Subject: still\\r\\n\\r\\nhi\\r\\n'))\ns.quit()\n",
        smtp.ip(),
        smtp.port()
    ))
    .expect("smtplib");
    assert!(out.contains("{}"), "backend1 still takes mail: {out}");
    std::fs::write(&path, &with_four).expect("config");

    // Certificates rewritten under the same names: the next handshake gets the new one.
    let name = "mail.example.test";
    let before = fingerprint(&edge, name);
    assert_eq!(
        fingerprint(&edge, name),
        before,
        "stable between handshakes"
    );
    make_certificates(certs_dir.path());
    reload(&edge, "applied");
    let after = fingerprint(&edge, name);
    assert_ne!(
        after, before,
        "the renewed certificate is served after the reload"
    );
}
