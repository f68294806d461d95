//! The XML management API over real HTTP (curl and a raw socket) on a running protobalance
//! in front of three real Dovecot backends: every resource's happy path and errors, auth,
//! every response validated against docs/api.xsd with xmllint, live effect (a mailbox
//! created by the API receives mail through the edge and is read back from its backend;
//! a drained backend gets no new mailboxes), persistence across a restart, and a hostile
//! corpus (entity bomb, XXE, 100 MB body, deep nesting, invalid UTF-8, a giant tag)
//! refused without side effects and with bounded memory.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use protobalance_tests::{BackendOptions, DovecotCluster, loopback_ip, password_for, python};
use support::{Edge, Listen, USERS, owner, start_edge};

const WRITE_TOKEN: &str = "crm-0123456789abcdef0123456789abcdef";
const READ_TOKEN: &str = "mon-0123456789abcdef0123456789abcdef";
const NS: &str = "urn:protobalance:api:1";

fn skip() -> bool {
    support::skip_api("api")
}

/// An HTTP answer: status and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    /// Asserts the status and that the body (if any) validates against the XSD.
    fn expect(self, status: u16) -> Self {
        assert_eq!(self.status, status, "{}", self.body);
        if !self.body.is_empty() {
            validate(&self.body);
        }
        self
    }

    fn error_code(&self) -> String {
        let start = self.body.find("code=\"").expect("an error document") + 6;
        let end = self.body[start..].find('"').expect("closing quote") + start;
        self.body[start..end].to_owned()
    }
}

fn validate(text: &str) {
    support::validate_api_xml(text);
}

/// One request with curl (a real HTTP client).
fn curl(edge: &Edge, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Answer {
    let url = format!("http://{}/api/v1/{path}", edge.admin);
    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "--max-time",
            "30",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg(&url);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    if body.is_some() {
        command
            .args(["-H", "Content-Type: application/xml", "--data-binary", "@-"])
            .stdin(Stdio::piped());
    }
    command.stdout(Stdio::piped());
    let mut child = command.spawn().expect("curl");
    if let Some(body) = body {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("body");
    }
    let out = child.wait_with_output().expect("curl output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("status line");
    Answer {
        status: status.trim().parse().expect("status"),
        body: body.to_owned(),
    }
}

fn write(edge: &Edge, method: &str, path: &str, body: Option<&str>) -> Answer {
    curl(edge, method, path, Some(WRITE_TOKEN), body)
}

fn read(edge: &Edge, path: &str) -> Answer {
    curl(edge, "GET", path, Some(READ_TOKEN), None)
}

fn doc(body: &str) -> String {
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}")
}

fn start(cluster: &DovecotCluster) -> (Edge, tempfile::TempDir) {
    let tokens = tempfile::tempdir().expect("tempdir");
    let file = tokens.path().join("monitor.token");
    std::fs::write(&file, format!("{READ_TOKEN}\n")).expect("token file");
    let extra = format!(
        "[api]\n\
         [[api.token]]\nname = \"crm\"\ntoken = \"{WRITE_TOKEN}\"\naccess = \"read-write\"\n\
         [[api.token]]\nname = \"monitor\"\ntoken_file = \"{}\"\naccess = \"read-only\"\n",
        file.display()
    );
    let edge = start_edge(
        cluster,
        &[Listen("smtp", None), Listen("pop3", None)],
        &extra,
    );
    (edge, tokens)
}

/// 3 backends whose Dovecot knows 320 users; the directory holds user1..user300.
fn cluster() -> DovecotCluster {
    let ips: Vec<_> = (1..=3).map(|n| loopback_ip(n).expect("ip")).collect();
    DovecotCluster::start_with(
        &ips,
        &BackendOptions {
            users: USERS + 20,
            ..BackendOptions::default()
        },
    )
    .expect("cluster")
}

#[test]
fn auth_is_required_and_read_only_tokens_change_nothing() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (edge, _tokens) = start(&cluster);
    let create = doc(&format!(
        "<mailbox xmlns=\"{NS}\" address=\"user301@example.com\"/>"
    ));
    let none = curl(&edge, "GET", "mailboxes", None, None).expect(401);
    assert_eq!(none.error_code(), "unauthorized");
    let wrong = curl(&edge, "GET", "mailboxes", Some(&"x".repeat(40)), None).expect(401);
    assert_eq!(wrong.error_code(), "unauthorized");
    let unauth = curl(&edge, "POST", "mailboxes", None, Some(&create)).expect(401);
    assert_eq!(unauth.error_code(), "unauthorized");
    let ro = curl(&edge, "POST", "mailboxes", Some(READ_TOKEN), Some(&create)).expect(403);
    assert_eq!(ro.error_code(), "read_only_token");
    // Nothing was created by any of them.
    read(&edge, "mailboxes/user301@example.com").expect(404);
    // The read-only token reads.
    let list = read(&edge, "mailboxes?limit=5").expect(200);
    assert!(list.body.contains("count=\"5\""), "{}", list.body);
    // Unknown paths and methods are errors documents too.
    assert_eq!(read(&edge, "nothing").expect(404).error_code(), "not_found");
    let patch = write(&edge, "PATCH", "mailboxes", None).expect(405);
    assert_eq!(patch.error_code(), "method_not_allowed");
}

#[test]
fn a_mailbox_created_by_the_api_receives_and_serves_mail_and_survives_a_restart() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (mut edge, _tokens) = start(&cluster);
    let user = "user305@example.com";
    let body = doc(&format!(
        "<mailbox xmlns=\"{NS}\" address=\"User305@Example.COM\" backend=\"backend2\"/>"
    ));
    let created = write(&edge, "POST", "mailboxes", Some(&body)).expect(201);
    assert!(
        created
            .body
            .contains(&format!("address=\"{user}\" backend=\"backend2\"")),
        "normalized and pinned: {}",
        created.body
    );
    let again = write(&edge, "POST", "mailboxes", Some(&body)).expect(409);
    assert_eq!(again.error_code(), "mailbox_exists");
    let got = read(&edge, &format!("mailboxes/{user}")).expect(200);
    assert!(
        got.body.contains("backend-state=\"active\""),
        "{}",
        got.body
    );

    // Live: mail through the edge lands on backend2 and is read back through the edge.
    let smtp = edge.listeners[0];
    let pop3 = edge.listeners[1];
    let password = password_for(user).expect("password");
    let out = python(&format!(
        "import smtplib, poplib\ns = smtplib.SMTP('{}', {}, timeout=10)\n\
         print(s.sendmail('a@far.example', ['{user}'], 'Subject: via-api\\r\\n\\r\\nhi\\r\\n')); s.quit()\n\
         p = poplib.POP3('{}', {}, timeout=10); p.user('{user}'); p.pass_('{password}')\n\
         print(b'\\n'.join(p.retr(1)[1]).decode()); p.quit()\n",
        smtp.ip(),
        smtp.port(),
        pop3.ip(),
        pop3.port()
    ))
    .expect("deliver and read");
    assert!(
        out.starts_with("{}") && out.contains("Subject: via-api"),
        "{out}"
    );
    assert_eq!(
        cluster
            .backend(2)
            .expect("backend2")
            .message_count(user)
            .expect("count"),
        1
    );

    // Errors name the problem.
    let bad = |address: &str, backend: &str| {
        let extra = if backend.is_empty() {
            String::new()
        } else {
            format!(" backend=\"{backend}\"")
        };
        doc(&format!(
            "<mailbox xmlns=\"{NS}\" address=\"{address}\"{extra}/>"
        ))
    };
    let foreign = write(
        &edge,
        "POST",
        "mailboxes",
        Some(&bad("x@elsewhere.test", "")),
    )
    .expect(422);
    assert_eq!(foreign.error_code(), "foreign_domain");
    let invalid = write(&edge, "POST", "mailboxes", Some(&bad("not an address", ""))).expect(422);
    assert_eq!(invalid.error_code(), "invalid_address");
    let unknown = write(
        &edge,
        "POST",
        "mailboxes",
        Some(&bad("user306@example.com", "nope")),
    )
    .expect(422);
    assert_eq!(unknown.error_code(), "unknown_backend");
    let extra_attr = doc(&format!(
        "<mailbox xmlns=\"{NS}\" address=\"user306@example.com\" colour=\"red\"/>"
    ));
    let attr = write(&edge, "POST", "mailboxes", Some(&extra_attr)).expect(400);
    assert_eq!(attr.error_code(), "unknown_attribute");
    assert!(attr.body.contains("colour"), "{}", attr.body);

    // Survives a restart (SIGKILL, so nothing depends on a clean shutdown).
    edge.restart();
    let got = read(&edge, &format!("mailboxes/{user}")).expect(200);
    assert!(got.body.contains("backend=\"backend2\""), "{}", got.body);

    // Delete: gone from the directory (its mail stays on the backend), then 404.
    write(&edge, "DELETE", &format!("mailboxes/{user}"), None).expect(204);
    read(&edge, &format!("mailboxes/{user}")).expect(404);
    write(&edge, "DELETE", &format!("mailboxes/{user}"), None).expect(404);
}

#[test]
fn lists_page_and_filter_and_imports_report_each_item() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (edge, _tokens) = start(&cluster);
    // Walk every page of 70: each of the 300 mailboxes exactly once, in order.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let path = if after.is_empty() {
            "mailboxes?limit=70".to_owned()
        } else {
            format!("mailboxes?limit=70&after={after}")
        };
        let page = read(&edge, &path).expect(200);
        for part in page.body.split("<mailbox address=\"").skip(1) {
            seen.push(part.split('"').next().expect("address").to_owned());
        }
        match page.body.split("next=\"").nth(1) {
            Some(rest) => after = rest.split('"').next().expect("next").to_owned(),
            None => break,
        }
    }
    assert_eq!(seen.len(), USERS);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "in order, no duplicates");
    let on2 = read(&edge, "mailboxes?backend=backend2&limit=1000").expect(200);
    assert!(on2.body.contains("count=\"100\""), "{}", &on2.body[..200]);
    let bad = read(&edge, "mailboxes?limit=0").expect(400);
    assert_eq!(bad.error_code(), "bad_parameter");
    let unknown = read(&edge, "mailboxes?colour=red").expect(400);
    assert_eq!(unknown.error_code(), "unknown_parameter");

    // Import: new ones apportioned or pinned, existing ones reported, bad ones named.
    let mut items = String::new();
    for n in 301..=310 {
        items.push_str(&format!("<mailbox address=\"user{n}@example.com\"/>\n"));
    }
    items.push_str("<mailbox address=\"user311@example.com\" backend=\"backend3\"/>\n");
    items.push_str("<mailbox address=\"user1@example.com\"/>\n");
    items.push_str("<mailbox address=\"x@elsewhere.test\"/>\n");
    items.push_str("<mailbox address=\"bad address\"/>\n");
    items.push_str("<mailbox address=\"user312@example.com\" backend=\"nope\"/>\n");
    let body = doc(&format!("<import xmlns=\"{NS}\">\n{items}</import>"));
    let report = write(&edge, "POST", "mailboxes/import", Some(&body)).expect(200);
    assert!(
        report
            .body
            .contains("added=\"11\" existing=\"1\" failed=\"3\""),
        "{}",
        report.body
    );
    for (address, result) in [
        ("user311@example.com", "added\" backend=\"backend3"),
        ("user1@example.com", "exists"),
        ("x@elsewhere.test", "foreign_domain"),
        ("bad address", "invalid"),
        ("user312@example.com", "unknown_backend"),
    ] {
        assert!(
            report
                .body
                .contains(&format!("address=\"{address}\" result=\"{result}")),
            "{address}: {}",
            report.body
        );
    }
    let errors = write(&edge, "POST", "mailboxes/import?report=errors", Some(&body)).expect(200);
    assert!(!errors.body.contains("result=\"added\""), "{}", errors.body);
    read(&edge, "mailboxes/user305@example.com").expect(200);
}

#[test]
fn domains_and_backends_are_managed_live() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (edge, _tokens) = start(&cluster);
    let org = doc(&format!(
        "<domain xmlns=\"{NS}\" name=\"Example.ORG\" unknown-mailbox=\"reject\"/>"
    ));
    let created = write(&edge, "POST", "domains", Some(&org)).expect(201);
    assert!(
        created.body.contains("name=\"example.org\""),
        "{}",
        created.body
    );
    write(&edge, "POST", "domains", Some(&org)).expect(409);
    let list = read(&edge, "domains").expect(200);
    assert!(list.body.contains("name=\"example.com\" unknown-mailbox=\"reject\" mailboxes=\"300\" managed-by=\"config\""), "{}", list.body);
    assert!(
        list.body.contains(
            "name=\"example.org\" unknown-mailbox=\"reject\" mailboxes=\"0\" managed-by=\"api\""
        ),
        "{}",
        list.body
    );
    let auto = doc(&format!(
        "<domain xmlns=\"{NS}\" unknown-mailbox=\"auto-provision\"/>"
    ));
    let changed = write(&edge, "PUT", "domains/example.org", Some(&auto)).expect(200);
    assert!(changed.body.contains("auto-provision"), "{}", changed.body);
    let config = write(&edge, "PUT", "domains/example.com", Some(&auto)).expect(409);
    assert_eq!(config.error_code(), "managed_by_config");
    let bad = doc(&format!(
        "<domain xmlns=\"{NS}\" unknown-mailbox=\"accept\"/>"
    ));
    assert_eq!(
        write(&edge, "PUT", "domains/example.org", Some(&bad))
            .expect(422)
            .error_code(),
        "invalid_policy"
    );
    // A mailbox in it, then deleting the domain is refused until the mailbox is gone.
    let mb = doc(&format!(
        "<mailbox xmlns=\"{NS}\" address=\"a@example.org\"/>"
    ));
    write(&edge, "POST", "mailboxes", Some(&mb)).expect(201);
    let in_use = write(&edge, "DELETE", "domains/example.org", None).expect(409);
    assert_eq!(in_use.error_code(), "domain_in_use");
    write(&edge, "DELETE", "mailboxes/a@example.org", None).expect(204);
    write(&edge, "DELETE", "domains/example.org", None).expect(204);
    write(&edge, "DELETE", "domains/example.org", None).expect(404);

    // Backends: health and load; draining one keeps new mailboxes off it.
    let list = read(&edge, "backends").expect(200);
    assert_eq!(
        list.body
            .matches("<service name=\"pop3\" up=\"true\"/>")
            .count(),
        3,
        "{}",
        list.body
    );
    assert!(
        list.body.contains(
            "name=\"backend3\" state=\"active\" capacity=\"100\" mailboxes=\"100\" load=\"1.000\""
        ),
        "{}",
        list.body
    );
    let drain = doc(&format!("<backend xmlns=\"{NS}\" state=\"draining\"/>"));
    let drained = write(&edge, "PUT", "backends/backend3", Some(&drain)).expect(200);
    assert!(
        drained.body.contains("state=\"draining\""),
        "{}",
        drained.body
    );
    for n in 301..=306 {
        let mb = doc(&format!(
            "<mailbox xmlns=\"{NS}\" address=\"user{n}@example.com\"/>"
        ));
        let made = write(&edge, "POST", "mailboxes", Some(&mb)).expect(201);
        assert!(
            !made.body.contains("backend3"),
            "draining backend got {}",
            made.body
        );
    }
    let pin = doc(&format!(
        "<mailbox xmlns=\"{NS}\" address=\"user307@example.com\" backend=\"backend3\"/>"
    ));
    assert_eq!(
        write(&edge, "POST", "mailboxes", Some(&pin))
            .expect(409)
            .error_code(),
        "backend_not_active"
    );
    let capacity = doc(&format!("<backend xmlns=\"{NS}\" capacity=\"5\"/>"));
    assert_eq!(
        write(&edge, "PUT", "backends/backend3", Some(&capacity))
            .expect(409)
            .error_code(),
        "managed_by_config"
    );
    assert_eq!(
        write(&edge, "DELETE", "backends/backend3", None)
            .expect(409)
            .error_code(),
        "managed_by_config"
    );
    assert_eq!(
        write(&edge, "PUT", "backends/nope", Some(&drain))
            .expect(404)
            .error_code(),
        "not_found"
    );

    // Stats: the metrics' numbers, and the directory's total.
    let stats = read(&edge, "stats").expect(200);
    assert!(
        stats.body.contains("<directory mailboxes=\"306\"/>"),
        "{}",
        &stats.body[..300]
    );
    assert!(
        stats.body.contains("name=\"protobalance_backend_up\""),
        "stats lists metric families"
    );
    let _ = owner(&edge, "user1@example.com");
}

/// Sends raw bytes as one HTTP request and returns the status (0 if the server closed
/// before answering) and the body.
fn raw_request(edge: &Edge, path: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(edge.admin).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST /api/v1/{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITE_TOKEN}\r\n\
         Connection: close\r\n{headers}\r\n"
    );
    let _ = s.write_all(head.as_bytes());
    // The server may answer and close before the whole body is sent: that is fine.
    for chunk in body.chunks(64 * 1024) {
        if s.write_all(chunk).is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn hostile_xml_is_refused_without_side_effects() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (edge, _tokens) = start(&cluster);
    let before = edge.rss_kib();
    let bomb = doc(&format!(
        "<!DOCTYPE m [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\">\
         <!ENTITY c \"&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;\"><!ENTITY d \"&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;\">]>\
         <mailbox xmlns=\"{NS}\" address=\"&d;@example.com\"/>"
    ));
    let xxe = doc(&format!(
        "<!DOCTYPE m [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><mailbox xmlns=\"{NS}\" address=\"&x;\"/>"
    ));
    let undeclared = doc(&format!(
        "<mailbox xmlns=\"{NS}\" address=\"&x;@example.com\"/>"
    ));
    let deep = doc(&format!(
        "<import xmlns=\"{NS}\">{}{}</import>",
        "<mailbox>".repeat(50),
        "</mailbox>".repeat(50)
    ));
    let namespace = doc("<mailbox xmlns=\"urn:evil\" address=\"user320@example.com\"/>");
    let no_namespace = doc("<mailbox address=\"user320@example.com\"/>");
    let cases: [(&str, &str, &str); 6] = [
        ("mailboxes", &bomb, "doctype_refused"),
        ("mailboxes", &xxe, "doctype_refused"),
        ("mailboxes", &undeclared, "entity_refused"),
        // Nesting is refused at the first element that may not have children.
        ("mailboxes/import", &deep, "unknown_element"),
        ("mailboxes", &namespace, "wrong_namespace"),
        ("mailboxes", &no_namespace, "wrong_namespace"),
    ];
    for (path, body, code) in cases {
        let answer = write(&edge, "POST", path, Some(body)).expect(400);
        assert_eq!(answer.error_code(), code, "{body}");
    }
    // Invalid UTF-8.
    let mut latin1 = doc(&format!("<mailbox xmlns=\"{NS}\" address=\"")).into_bytes();
    latin1.extend_from_slice(b"j\xf6rg@example.com\"/>");
    let (status, body) = raw_request(
        &edge,
        "mailboxes",
        &format!("Content-Length: {}\r\n", latin1.len()),
        &latin1,
    );
    assert_eq!(status, 400, "{body}");
    validate(&body);
    // 100 MB to a single-resource endpoint: 413 without reading it all.
    let huge = vec![b' '; 100 * 1024 * 1024];
    let (status, body) = raw_request(
        &edge,
        "mailboxes",
        &format!("Content-Length: {}\r\n", huge.len()),
        &huge,
    );
    assert_eq!(status, 413, "{body}");
    // One giant tag in a streamed import: refused once it passes the tag bound.
    let mut giant = doc(&format!("<import xmlns=\"{NS}\"><mailbox address=\"")).into_bytes();
    giant.extend(std::iter::repeat_n(b'a', 20 * 1024 * 1024));
    let (status, body) = raw_request(
        &edge,
        "mailboxes/import",
        &format!("Content-Length: {}\r\n", giant.len()),
        &giant,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("tag_too_long"), "{body}");
    // Nothing was created, and memory stayed bounded.
    read(&edge, "mailboxes/user320@example.com").expect(404);
    let count = read(&edge, "stats").expect(200);
    assert!(count.body.contains("<directory mailboxes=\"300\"/>"));
    let grown = edge.rss_kib().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "hostile bodies grew protobalance by {grown} KiB"
    );
}

/// A backend added through the API joins at once (the next new mailboxes go there, mail
/// is delivered to and read from it through the edge), is back after a restart, and can
/// only be removed once it owns nothing.
#[test]
fn a_backend_added_live_receives_the_next_mailboxes_and_survives_a_restart() {
    if skip() {
        return;
    }
    let ips: Vec<_> = (1..=4).map(|n| loopback_ip(n).expect("ip")).collect();
    let cluster = DovecotCluster::start_with(
        &ips,
        &BackendOptions {
            users: USERS + 20,
            ..BackendOptions::default()
        },
    )
    .expect("cluster");
    let tokens = tempfile::tempdir().expect("tempdir");
    let file = tokens.path().join("monitor.token");
    std::fs::write(&file, format!("{READ_TOKEN}\n")).expect("token file");
    let extra = format!(
        "[api]\n[[api.token]]\nname = \"crm\"\ntoken = \"{WRITE_TOKEN}\"\naccess = \"read-write\"\n\
         [[api.token]]\nname = \"monitor\"\ntoken_file = \"{}\"\naccess = \"read-only\"\n",
        file.display()
    );
    // The config file knows backends 1-3 only.
    let sections: Vec<String> = cluster.backends()[..3]
        .iter()
        .map(|b| support::backend_section(b, ""))
        .collect();
    let mut edge = support::start_edge_sections(
        &sections,
        &[Listen("smtp", None), Listen("pop3", None)],
        &extra,
    );
    let b4 = cluster.backend(4).expect("backend4");
    let add = doc(&format!(
        "<backend xmlns=\"{NS}\" name=\"backend4\" address=\"{}\" capacity=\"100\" \
         pop3-port=\"{}\" imap-port=\"{}\" lmtp-port=\"{}\"/>",
        b4.ip(),
        b4.pop3_port(),
        b4.imap_port(),
        b4.lmtp_port()
    ));
    let added = write(&edge, "POST", "backends", Some(&add)).expect(201);
    assert!(
        added.body.contains("name=\"backend4\" state=\"active\""),
        "{}",
        added.body
    );
    assert!(
        added.body.contains("managed-by=\"directory\""),
        "{}",
        added.body
    );
    write(&edge, "POST", "backends", Some(&add)).expect(409);
    let bad = doc(&format!(
        "<backend xmlns=\"{NS}\" name=\"backend5\" address=\"not-an-ip\"/>"
    ));
    assert_eq!(
        write(&edge, "POST", "backends", Some(&bad))
            .expect(422)
            .error_code(),
        "invalid_backend"
    );
    let bad_port = doc(&format!(
        "<backend xmlns=\"{NS}\" name=\"backend5\" address=\"127.0.1.5\" pop3-port=\"0\"/>"
    ));
    let refused = write(&edge, "POST", "backends", Some(&bad_port)).expect(422);
    assert!(refused.body.contains("pop3_port"), "{}", refused.body);

    // The next new mailboxes go to the empty backend4; mail reaches it through the edge.
    let user = "user311@example.com";
    let mb = doc(&format!("<mailbox xmlns=\"{NS}\" address=\"{user}\"/>"));
    let made = write(&edge, "POST", "mailboxes", Some(&mb)).expect(201);
    assert!(made.body.contains("backend=\"backend4\""), "{}", made.body);
    let (smtp, pop3) = (edge.listeners[0], edge.listeners[1]);
    let password = password_for(user).expect("password");
    let read_back = |edge_pop3: std::net::SocketAddr| {
        python(&format!(
            "import poplib\np = poplib.POP3('{}', {}, timeout=10); p.user('{user}'); p.pass_('{password}')\n\
             print(p.stat()[0]); p.quit()\n",
            edge_pop3.ip(),
            edge_pop3.port()
        ))
        .expect("pop3")
    };
    python(&format!(
        "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=10)\n\
         s.sendmail('a@far.example', ['{user}'], 'Subject: to backend4\\r\\n\\r\\nhi\\r\\n'); s.quit()\n",
        smtp.ip(),
        smtp.port()
    ))
    .expect("smtp");
    assert_eq!(b4.message_count(user).expect("count"), 1);
    assert_eq!(read_back(pop3).trim(), "1");

    // Capacity of an added backend changes through the API; a restart keeps it all.
    let cap = doc(&format!("<backend xmlns=\"{NS}\" capacity=\"300\"/>"));
    let changed = write(&edge, "PUT", "backends/backend4", Some(&cap)).expect(200);
    assert!(
        changed.body.contains("capacity=\"300\""),
        "{}",
        changed.body
    );
    edge.restart();
    let list = read(&edge, "backends").expect(200);
    assert!(
        list.body
            .contains("name=\"backend4\" state=\"active\" capacity=\"300\" mailboxes=\"1\""),
        "{}",
        list.body
    );
    let pop3 = edge.listeners[1];
    assert_eq!(read_back(pop3).trim(), "1", "served after the restart");

    // Removal: refused while it owns a mailbox, then it leaves the pool.
    assert_eq!(
        write(&edge, "DELETE", "backends/backend4", None)
            .expect(409)
            .error_code(),
        "backend_in_use"
    );
    write(&edge, "DELETE", &format!("mailboxes/{user}"), None).expect(204);
    write(&edge, "DELETE", "backends/backend4", None).expect(204);
    let list = read(&edge, "backends").expect(200);
    assert!(!list.body.contains("backend4"), "{}", list.body);
}

/// `admin.tls = true`: the admin listener (metrics and the API) speaks HTTPS with the
/// configured certificate, verified by curl against the test CA; plaintext gets nothing.
#[test]
fn the_admin_listener_serves_https_when_asked() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let certificates = support::make_certificates(dir.path());
    let port = protobalance_tests::free_port([127, 0, 0, 1].into()).expect("port");
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntls = true\n[shutdown]\ngrace_seconds = 1\n\
         [directory]\npath = \"dir.db\"\n[[domain]]\nname = \"example.com\"\n\
         [[backend]]\nname = \"b1\"\naddress = \"127.0.1.1\"\n{certificates}\
         [api]\n[[api.token]]\nname = \"crm\"\ntoken = \"{WRITE_TOKEN}\"\naccess = \"read-write\"\n"
    );
    let path = dir.path().join("pb.toml");
    std::fs::write(&path, config).expect("config");
    let _edge = protobalance_tests::ChildGuard::spawn(
        Command::new(support::BIN)
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null()),
        "protobalance",
    )
    .expect("spawn");
    let ca = dir.path().join("ca.pem");
    let https = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &format!("mail.example.test:{port}:127.0.0.1")])
            .args(["-H", &format!("Authorization: Bearer {WRITE_TOKEN}")])
            .arg(format!("https://mail.example.test:{port}{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !https("/healthz").ends_with("200") {
        assert!(std::time::Instant::now() < deadline, "no HTTPS /healthz");
        std::thread::sleep(Duration::from_millis(100));
    }
    let backends = https("/api/v1/backends");
    assert!(
        backends.ends_with("200") && backends.contains("name=\"b1\""),
        "{backends}"
    );
    let plain = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{port}/healthz"))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        "000",
        "plaintext HTTP gets no answer from an HTTPS listener"
    );
}
