//! SMTP with real Postfix: three backends, each a real Postfix (delivery = "smtp", and
//! the submission port with Dovecot SASL) in front of a real Dovecot. Inbound mail through
//! the edge is handed to the owner's Postfix with XCLIENT and read back through the edge
//! by POP3; submission (587 STARTTLS, 465 implicit TLS) authenticates at the user's own
//! Postfix and relays through it, within the per-user limits; and a real Postfix as the
//! sending MTA delivers a 5-recipient message spread over the three backends through the
//! edge, retrying the `452 4.5.3` recipients, so every recipient gets exactly one copy.

mod support;

use std::time::{Duration, Instant};

use protobalance_tests::{
    BackendOptions, ClamdServer, DovecotBackend, EICAR, PostfixBackend, PostfixOptions,
    loopback_ip, password_for, python, require_postfix, require_scanner, scanners::CLAMD,
};
use support::{Edge, Listen, USERS, make_certificates, metric_line, owner, start_edge_sections};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

const SMTP: usize = 0;
const SUBMISSION: usize = 1;
const SUBMISSIONS: usize = 2;
const POP3: usize = 3;

fn skip(test: &str) -> bool {
    support::skip(test) || !require_postfix(test)
}

struct Cluster {
    backends: Vec<PostfixBackend>,
    edge: Edge,
    _certs: tempfile::TempDir,
}

impl Cluster {
    fn start(extra: &str) -> Self {
        Self::start_with(extra, false, &[])
    }

    /// `proxy`: every backend service takes a PROXY v2 header (Dovecot `haproxy = yes`,
    /// Postfix `smtpd_upstream_proxy_protocol = haproxy`, `proxy_protocol = true`).
    /// `main_cf`: extra main.cf lines for every Postfix.
    fn start_with(extra: &str, proxy: bool, main_cf: &[&str]) -> Self {
        let backends: Vec<PostfixBackend> = (1..=3)
            .map(|n| {
                let name = format!("backend{n}");
                let options = BackendOptions {
                    users: USERS,
                    auth_listener: true,
                    haproxy: proxy,
                    ..BackendOptions::default()
                };
                let ip = loopback_ip(n).expect("ip");
                let dovecot = DovecotBackend::start(&name, ip, &options).expect("dovecot");
                let postfix = PostfixOptions {
                    haproxy: proxy,
                    // Debian's default; the harness turns it off.
                    extra_main_cf: std::iter::once("smtputf8_enable = yes")
                        .chain(main_cf.iter().copied())
                        .map(str::to_owned)
                        .collect(),
                    ..PostfixOptions::default()
                };
                PostfixBackend::start(&name, dovecot, &postfix).expect("postfix")
            })
            .collect();
        let sections: Vec<String> = backends
            .iter()
            .map(|p| {
                let d = p.dovecot();
                format!(
                    "[[backend]]\nname = \"{}\"\naddress = \"{}\"\npop3_port = {}\nimap_port = {}\n\
                     lmtp_port = {}\ndelivery = \"smtp\"\nsmtp_port = {}\nsubmission_port = {}\n\
                     proxy_protocol = {proxy}\n",
                    d.name(),
                    d.ip(),
                    d.pop3_port(),
                    d.imap_port(),
                    d.lmtp_port(),
                    p.smtp_port(),
                    p.smtp_port()
                )
            })
            .collect();
        let certs = tempfile::tempdir().expect("tempdir");
        let extra = format!("{}{extra}", make_certificates(certs.path()));
        let listeners = [
            Listen("smtp", Some("starttls")),
            Listen("submission", Some("starttls")),
            Listen("submission", Some("implicit")),
            Listen("pop3", None),
        ];
        let edge = start_edge_sections(&sections, &listeners, &extra);
        Self {
            backends,
            edge,
            _certs: certs,
        }
    }

    fn backend(&self, name: &str) -> &PostfixBackend {
        self.backends
            .iter()
            .find(|b| b.name() == name)
            .expect("backend")
    }

    fn addr(&self, listener: usize) -> (String, u16) {
        let addr = self.edge.listeners[listener];
        (addr.ip().to_string(), addr.port())
    }

    /// Waits until `user` has `n` messages on its owner; asserts none anywhere else.
    fn wait_for(&self, user: &str, n: usize) {
        let home = owner(&self.edge, user);
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let count = self
                .backend(&home)
                .dovecot()
                .message_count(user)
                .expect("count");
            if count >= n {
                assert_eq!(count, n, "{user}: more than {n} messages");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{user} has {count} of {n} messages"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for b in self.backends.iter().filter(|b| b.name() != home) {
            let count = b.dovecot().message_count(user).expect("count");
            assert_eq!(count, 0, "{user} has mail on {}", b.name());
        }
    }
}

/// Python prelude: `ctx` trusts the edge's test certificate without checking names.
const TLS_PRELUDE: &str = "import smtplib, ssl, poplib, base64, socket\n\
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE\n";

#[test]
fn inbound_mail_reaches_the_owners_postfix_with_the_clients_identity() {
    if skip("smtp_postfix") {
        return;
    }
    let cluster = Cluster::start("");
    let user = "user41@example.com";
    let (host, smtp) = cluster.addr(SMTP);
    let (_, pop3) = cluster.addr(POP3);
    let password = password_for(user).expect("password");
    let out = python(&format!(
        "{TLS_PRELUDE}\
         s = smtplib.SMTP('{host}', {smtp}, timeout=10, source_address=('127.0.0.9', 0))\n\
         s.ehlo('client.example.net'); s.starttls(context=ctx); s.ehlo('client.example.net')\n\
         print('refused', s.sendmail('far@sender.example.net', ['{user}'], \
         'Subject: via-postfix\\r\\n\\r\\nbody via postfix\\r\\n')); s.quit()\n"
    ))
    .expect("smtplib");
    assert!(out.contains("refused {}"), "{out}");
    cluster.wait_for(user, 1);
    // Read back through the edge: POP3 lands on the same backend the MX delivered to.
    let out = python(&format!(
        "import poplib\np = poplib.POP3('{host}', {pop3}, timeout=10)\n\
         p.user('{user}'); p.pass_('{password}')\n\
         print(b'\\n'.join(p.retr(1)[1]).decode()); p.quit()\n"
    ))
    .expect("poplib");
    assert!(out.contains("Subject: via-postfix"), "{out}");
    // Postfix took the client's address and HELO name from XCLIENT, not the edge's.
    assert!(
        out.contains("from client.example.net (unknown [127.0.0.9])"),
        "Postfix's Received header: {out}"
    );
    let log = cluster.backend(&owner(&cluster.edge, user)).log();
    assert!(log.contains("client=unknown[127.0.0.9]"), "{log}");
    // A second client: the edge reuses its idle session to that Postfix, and XCLIENT
    // again gives Postfix the second client's identity, not the first's.
    let out = python(&format!(
        "import smtplib\ns = smtplib.SMTP('{host}', {smtp}, timeout=10, source_address=('127.0.0.10', 0))\n\
         s.ehlo('second.example.net')\n\
         print('refused', s.sendmail('far@sender.example.net', ['{user}'], 'Subject: again\\r\\n\\r\\nx\\r\\n'))\n\
         s.quit()\n"
    ))
    .expect("smtplib");
    assert!(out.contains("refused {}"), "{out}");
    cluster.wait_for(user, 2);
    let home = owner(&cluster.edge, user);
    let log = cluster.backend(&home).log();
    assert!(log.contains("client=unknown[127.0.0.10]"), "{log}");
    metric_line(
        &cluster.edge,
        &[
            "protobalance_backend_sessions_total",
            &format!("backend=\"{home}\""),
            "result=\"reused\"} 1",
        ],
    );
    // The edge still refuses relaying on its MX port: Postfix would accept only with AUTH.
    let out = python(&format!(
        "import smtplib\ns = smtplib.SMTP('{host}', {smtp}, timeout=10)\ns.ehlo('c.example.net')\n\
         s.mail('a@b.example'); print('relay', s.rcpt('x@elsewhere.test'))\n\
         print('auth', s.docmd('AUTH PLAIN AGEAYg=='))\n"
    ))
    .expect("smtplib");
    assert!(
        out.contains("relay (554, b'5.7.1 Relay access denied')"),
        "{out}"
    );
    assert!(out.contains("auth (502,"), "no AUTH on the MX port: {out}");
    // Postfix offers SMTPUTF8, so an SMTPUTF8 transaction is handed on with it.
    let out = python(&format!(
        "import smtplib\ns = smtplib.SMTP('{host}', {smtp}, timeout=10)\ns.ehlo('c.example.net')\n\
         s.command_encoding = 'utf-8'\n\
         print('mail', s.docmd('MAIL FROM:<pelé@far.example> SMTPUTF8'))\n\
         print('rcpt', s.docmd('RCPT TO:<{user}>'))\n\
         print('data', s.data('Subject: utf8\\r\\n\\r\\nolá\\r\\n'.encode()))\n"
    ))
    .expect("smtplib");
    assert!(
        out.contains("mail (250,") && out.contains("rcpt (250,"),
        "{out}"
    );
    assert!(out.contains("data (250,"), "{out}");
    let log = cluster.backend(&owner(&cluster.edge, user)).log();
    assert!(log.contains("from=<pelé@far.example>"), "{log}");
}

#[test]
fn submission_authenticates_at_the_users_backend_and_relays_through_it() {
    if skip("smtp_postfix") {
        return;
    }
    let limits = "[submission]\nmax_messages_per_hour = 3\nmax_recipients_per_message = 2\n";
    let cluster = Cluster::start(limits);
    let user = "user52@example.com";
    let password = password_for(user).expect("password");
    let home = owner(&cluster.edge, user);
    let (host, sub) = cluster.addr(SUBMISSION);
    let (_, subs) = cluster.addr(SUBMISSIONS);
    let plain = |u: &str, p: &str| {
        use std::fmt::Write as _;
        let raw = format!("\0{u}\0{p}");
        let mut b64 = String::new();
        // Python decodes the same base64 the edge does; build it there.
        let _ = write!(b64, "base64.b64encode({raw:?}.encode()).decode()");
        b64
    };
    let script = format!(
        "{TLS_PRELUDE}\
         s = smtplib.SMTP('{host}', {sub}, timeout=10, source_address=('127.0.0.9', 0))\n\
         code, text = s.ehlo('laptop.example.net')\n\
         print('plain-offers-auth', s.has_extn('auth'))\n\
         print('auth-before-tls', s.docmd('AUTH', 'PLAIN ' + {wrong}))\n\
         print('mail-before-auth', s.docmd('MAIL FROM:<{user}>'))\n\
         s.starttls(context=ctx); s.ehlo('laptop.example.net')\n\
         print('tls-auth', s.esmtp_features.get('auth', '').strip())\n\
         print('mail-before-auth-tls', s.docmd('MAIL FROM:<{user}>'))\n\
         print('wrong', s.docmd('AUTH', 'PLAIN ' + {wrong}))\n\
         print('right', s.docmd('AUTH', 'PLAIN ' + {right}))\n\
         print('again', s.docmd('AUTH', 'PLAIN ' + {right}))\n\
         print('sent', s.sendmail('{user}', ['friend@elsewhere.test'], \
         'Subject: submitted-1\\r\\n\\r\\nfrom a laptop\\r\\n'))\n\
         s.mail('{user}'); print('r1', s.rcpt('a@elsewhere.test')); print('r2', s.rcpt('b@elsewhere.test'))\n\
         print('r3', s.rcpt('c@elsewhere.test')); s.rset()\n\
         s.quit()\n\
         s = smtplib.SMTP_SSL('{host}', {subs}, context=ctx, timeout=10)\n\
         s.ehlo('laptop.example.net')\n\
         print('login', s.docmd('AUTH LOGIN'), s.docmd(base64.b64encode(b'{user}').decode()), \
         s.docmd(base64.b64encode(b'{password}').decode()))\n\
         print('sent2', s.sendmail('{user}', ['friend@elsewhere.test'], 'Subject: submitted-2\\r\\n\\r\\nx\\r\\n'))\n\
         print('sent3', s.sendmail('{user}', ['friend@elsewhere.test'], 'Subject: submitted-3\\r\\n\\r\\nx\\r\\n'))\n\
         print('over', s.mail('{user}'))\n\
         s.quit()\n\
         s = smtplib.SMTP_SSL('{host}', {subs}, context=ctx, timeout=10); s.ehlo('x.example.net')\n\
         for i in range(3):\n    print('bad', i, s.docmd('AUTH', 'PLAIN ' + {unknown}))\n",
        wrong = plain(user, "not-the-password"),
        right = plain(user, &password),
        unknown = plain("nobody@example.com", "x"),
    );
    let out = python(&script).expect("submission script");
    let has = |needle: &str| assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    has("plain-offers-auth False");
    has("auth-before-tls (538, b'5.7.11");
    has("mail-before-auth (530, b'5.7.0 Authentication required')");
    has("tls-auth PLAIN LOGIN");
    has("mail-before-auth-tls (530,");
    has("wrong (535, b'5.7.8 Authentication credentials invalid')");
    has("right (235, b'2.7.0 Authentication successful')");
    has("again (503, b'5.5.1 Already authenticated')");
    has("sent {}");
    has("r1 (250,");
    has("r2 (250,");
    has("r3 (451, b'4.7.1 Sending limit reached (recipients_per_message)");
    has("login (334, b'VXNlcm5hbWU6') (334, b'UGFzc3dvcmQ6') (235,");
    has("sent2 {}");
    has("sent3 {}");
    // Three messages this hour: the fourth is refused before it reaches the backend.
    has("over (451, b'4.7.1 Sending limit reached (messages_per_hour)");
    has("bad 0 (535,");
    has("bad 1 (535,");
    assert!(
        out.contains("bad 2 (421, b'4.7.0 Too many failed logins"),
        "{out}"
    );
    // The user's own Postfix relayed the three messages to the outside world, as the user.
    let sink = cluster.backend(&home).sink();
    let messages = sink
        .wait_for_messages(3, DELIVERY_TIMEOUT)
        .expect("relayed messages");
    assert_eq!(messages.len(), 3, "exactly three relayed");
    // Postfix's queue may deliver them in any order.
    for m in &messages {
        assert_eq!(m.mail_from, user);
        assert_eq!(m.rcpts, ["friend@elsewhere.test"]);
    }
    for token in ["submitted-1", "submitted-2", "submitted-3"] {
        let carrying = messages.iter().filter(|m| m.text().contains(token)).count();
        assert_eq!(carrying, 1, "{token} relayed exactly once");
    }
    for other in cluster.backends.iter().filter(|b| b.name() != home) {
        assert!(
            other.sink().messages().is_empty(),
            "{} relayed mail",
            other.name()
        );
    }
    let log = cluster.backend(&home).log();
    assert!(
        log.contains(&format!("sasl_username={user}")),
        "Postfix logged the authenticated user: {log}"
    );
    assert!(log.contains("client=unknown[127.0.0.9]"), "{log}");
    let limited = metric_line(
        &cluster.edge,
        &[
            "protobalance_submission_limited_total",
            "recipients_per_message",
        ],
    );
    assert!(limited.ends_with(" 1"), "{limited}");
}

/// A relay client with spam malware: an authenticated user writing to more distinct
/// recipients in an hour than allowed is suspended from sending (`550 5.7.1`, metrics, the
/// API lists it), while another user sends on; lifting the suspension lets it send again.
#[test]
fn a_relay_client_with_malware_is_suspended_while_others_send_on() {
    if skip("smtp_postfix") {
        return;
    }
    let token = "suspension-test-token-0123456789abcdef";
    let mut cluster = Cluster::start(&format!(
        "[submission]\nmax_distinct_recipients_per_hour = 5\nsuspend_seconds = 600\n\
         [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{token}\"\naccess = \"read-write\"\n"
    ));
    let (infected, other) = ("user61@example.com", "user62@example.com");
    let (host, subs) = cluster.addr(SUBMISSIONS);
    let session = |user: &str, body: &str| {
        let password = password_for(user).expect("password");
        let body = body.replace("{user}", user);
        python(&format!(
            "{TLS_PRELUDE}\
             s = smtplib.SMTP_SSL('{host}', {subs}, context=ctx, timeout=10)\n\
             s.login('{user}', '{password}')\n{body}s.quit()\n"
        ))
        .expect("submission script")
    };
    let out = session(
        infected,
        "print('first', s.sendmail('{user}', ['r0@elsewhere.test', 'r1@elsewhere.test', \
         'r2@elsewhere.test', 'r3@elsewhere.test', 'r4@elsewhere.test'], 'Subject: burst\\r\\n\\r\\nx\\r\\n'))\n\
         s.mail('{user}'); print('sixth', s.rcpt('r5@elsewhere.test')); s.rset()\n\
         print('after', s.mail('{user}'))\n",
    );
    assert!(out.contains("first {}"), "{out}");
    assert!(
        out.contains("sixth (550, b'5.7.1 Your account is suspended from sending mail (too many different recipients)"),
        "{out}"
    );
    assert!(
        out.contains("after (550, b'5.7.1 Your account is suspended"),
        "{out}"
    );
    let out = session(
        other,
        "print('other', s.sendmail('{user}', ['friend@elsewhere.test'], 'Subject: fine\\r\\n\\r\\nx\\r\\n'))\n",
    );
    assert!(out.contains("other {}"), "another user sends on: {out}");

    let (code, text) = ctl(&cluster.edge, token, &["suspension", "ls"]);
    assert!(
        code == 0 && text.contains(infected) && text.contains("distinct_recipients"),
        "{text}"
    );
    let (code, xml) = ctl(&cluster.edge, token, &["suspension", "ls", "--xml"]);
    assert_eq!(code, 0, "{xml}");
    support::validate_api_xml(&xml);
    let suspended = metric_line(
        &cluster.edge,
        &[
            "protobalance_submission_suspensions_total",
            "distinct_recipients",
        ],
    );
    assert!(suspended.ends_with(" 1"), "{suspended}");
    // (The sample line, not the HELP line, which names the metric too.)
    metric_line(
        &cluster.edge,
        &["protobalance_submission_suspended_accounts 1"],
    );

    // Kept in the directory store: a restart does not free the spammer.
    cluster.edge.restart();
    let (code, text) = ctl(&cluster.edge, token, &["suspension", "ls"]);
    assert!(
        code == 0 && text.contains(infected) && text.contains("distinct_recipients"),
        "after a restart: {text}"
    );
    let out = session(infected, "print('restarted', s.mail('{user}'))\n");
    assert!(out.contains("restarted (550, b'5.7.1"), "{out}");

    let (code, text) = ctl(&cluster.edge, token, &["suspension", "rm", infected]);
    assert!(code == 0, "{text}");
    let (code, _) = ctl(&cluster.edge, token, &["suspension", "rm", infected]);
    assert_eq!(code, 2, "nothing left to lift");
    let out = session(
        infected,
        "print('lifted', s.sendmail('{user}', ['r6@elsewhere.test'], 'Subject: again\\r\\n\\r\\nx\\r\\n'))\n",
    );
    assert!(out.contains("lifted {}"), "{out}");
    // The outside world got the burst and the message after the lift, never r5's.
    let home = owner(&cluster.edge, infected);
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let messages = cluster.backend(&home).sink().messages();
        let from_infected = messages.iter().filter(|m| m.mail_from == infected).count();
        if from_infected >= 2 {
            assert_eq!(from_infected, 2, "burst and after the lift");
            break;
        }
        assert!(Instant::now() < deadline, "relayed: {from_infected} of 2");
        std::thread::sleep(Duration::from_millis(100));
    }
    for b in &cluster.backends {
        for m in b.sink().messages() {
            assert!(
                !m.rcpts.iter().any(|r| r.starts_with("r5@")),
                "{:?}",
                m.rcpts
            );
        }
    }
    // An operator can suspend too.
    let (code, text) = ctl(
        &cluster.edge,
        token,
        &["suspension", "add", other, "--seconds", "60"],
    );
    assert!(
        code == 0 && text.contains("suspended user62@example.com"),
        "{text}"
    );
    cluster.edge.restart();
    let out = session(other, "print('op', s.mail('{user}'))\n");
    assert!(out.contains("op (550, b'5.7.1 Your account is suspended from sending mail (suspended by the administrator)"), "{out}");
}

/// A real Postfix as the sending MTA relays one 5-recipient message (recipients on all
/// three backends) through the edge: the edge takes one backend's recipients per
/// transaction and answers `452 4.5.3` for the rest; Postfix retries those, and every
/// recipient ends up with exactly one copy.
#[test]
fn a_sending_postfix_delivers_five_recipients_over_three_backends_once_each() {
    if skip("smtp_postfix") {
        return;
    }
    let cluster = Cluster::start("");
    let (_, smtp) = cluster.addr(SMTP);
    // Two recipients on each of two backends and one on the third.
    let mut by_backend: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for n in 100..=USERS {
        let user = format!("user{n}@example.com");
        let list = by_backend.entry(owner(&cluster.edge, &user)).or_default();
        if list.len() < 2 {
            list.push(user);
        }
    }
    let mut recipients: Vec<String> = by_backend.values().flatten().cloned().collect();
    recipients.truncate(5);
    assert_eq!(recipients.len(), 5);

    let edge_smtp = std::net::SocketAddr::new([127, 0, 0, 1].into(), smtp);
    let sender =
        PostfixBackend::start_sender(loopback_ip(20).expect("ip"), edge_smtp).expect("sender");
    let rcpts = recipients
        .iter()
        .map(|r| format!("'{r}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let user = "user1@example.com";
    let password = password_for(user).expect("password");
    let out = python(&format!(
        "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=10)\ns.ehlo('mua.example.net')\n\
         s.login('{user}', '{password}')\n\
         print('refused', s.sendmail('{user}', [{rcpts}], 'Subject: fan-out\\r\\n\\r\\nto five\\r\\n'))\n\
         s.quit()\n",
        sender.ip(),
        sender.smtp_port()
    ))
    .expect("inject into the sending Postfix");
    assert!(out.contains("refused {}"), "{out}");
    // Postfix retries on its own; `drain` flushes its queue once after 20 s.
    sender
        .drain(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sender.log_tail(40)));
    for r in &recipients {
        cluster.wait_for(r, 1);
    }
    // The edge really split the transaction: the sender saw 452s and retried.
    let log = sender.log();
    assert!(
        log.contains("452 4.5.3"),
        "the sending Postfix should have met a 452 4.5.3: {log}"
    );
    // Nothing arrives twice, even after the retries settled.
    std::thread::sleep(Duration::from_secs(2));
    for r in &recipients {
        cluster.wait_for(r, 1);
    }
}

/// With `proxy_protocol = true` the SMTP and submission connections to Postfix carry the
/// client's address in a PROXY v2 header (no XCLIENT), and POP3 to Dovecot likewise.
#[test]
fn proxy_protocol_backends_see_the_client_in_the_header() {
    if skip("smtp_postfix") {
        return;
    }
    let cluster = Cluster::start_with("", true, &[]);
    let user = "user77@example.com";
    let password = password_for(user).expect("password");
    let home = owner(&cluster.edge, user);
    let (host, smtp) = cluster.addr(SMTP);
    let (_, sub) = cluster.addr(SUBMISSION);
    let (_, pop3) = cluster.addr(POP3);
    let out = python(&format!(
        "{TLS_PRELUDE}\
         s = smtplib.SMTP('{host}', {smtp}, timeout=10, source_address=('127.0.0.9', 0))\n\
         s.ehlo('client.example.net')\n\
         print('in', s.sendmail('a@far.example', ['{user}'], 'Subject: proxied-in\\r\\n\\r\\nx\\r\\n')); s.quit()\n\
         s = smtplib.SMTP('{host}', {sub}, timeout=10, source_address=('127.0.0.9', 0))\n\
         s.ehlo('laptop.example.net'); s.starttls(context=ctx); s.ehlo('laptop.example.net')\n\
         s.login('{user}', '{password}')\n\
         print('out', s.sendmail('{user}', ['x@elsewhere.test'], 'Subject: proxied-out\\r\\n\\r\\nx\\r\\n')); s.quit()\n"
    ))
    .expect("smtplib");
    assert!(out.contains("in {}") && out.contains("out {}"), "{out}");
    cluster.wait_for(user, 1);
    let text = python(&format!(
        "import poplib\np = poplib.POP3('{host}', {pop3}, timeout=10)\n\
         p.user('{user}'); p.pass_('{password}')\nprint(b'\\n'.join(p.retr(1)[1]).decode()); p.quit()\n"
    ))
    .expect("poplib");
    assert!(
        text.contains("from client.example.net (unknown [127.0.0.9])"),
        "Received names the client from the PROXY header: {text}"
    );
    let sink = cluster.backend(&home).sink();
    let relayed = sink
        .wait_for_messages(1, DELIVERY_TIMEOUT)
        .expect("relayed");
    assert!(relayed[0].text().contains("proxied-out"));
    let log = cluster.backend(&home).log();
    assert!(
        log.contains("client=unknown[127.0.0.9], sasl_method=PLAIN"),
        "{log}"
    );
    assert!(!log.contains("XCLIENT"), "no XCLIENT behind PROXY: {log}");
}

/// A backend whose submission port offers no AUTH (here: SASL switched off) is a
/// configuration problem: users get a temporary `454 4.7.0`, never a `535` that would
/// blame their password, and the edge logs what to fix.
#[test]
fn a_submission_backend_without_auth_is_a_temporary_failure() {
    if skip("smtp_postfix") {
        return;
    }
    let cluster = Cluster::start_with("", false, &["smtpd_sasl_auth_enable = no"]);
    let user = "user60@example.com";
    let password = password_for(user).expect("password");
    let (host, sub) = cluster.addr(SUBMISSION);
    let out = python(&format!(
        "{TLS_PRELUDE}\
         s = smtplib.SMTP('{host}', {sub}, timeout=10)\n\
         s.ehlo('laptop.example.net'); s.starttls(context=ctx); s.ehlo('laptop.example.net')\n\
         print('auth', s.docmd('AUTH', 'PLAIN ' + base64.b64encode(b'\\0{user}\\0{password}').decode()))\n"
    ))
    .expect("smtplib");
    assert!(
        out.contains("auth (454, b'4.7.0 Temporary authentication failure"),
        "{out}"
    );
    let failed = metric_line(
        &cluster.edge,
        &["protobalance_logins_total", "submission", "backend_error"],
    );
    assert!(failed.ends_with(" 1"), "{failed}");
}

/// The edge answers DATA with 354 while the backend's own answer is on its way (one round
/// trip less per message). A backend that refuses DATA (here every Postfix, by
/// `smtpd_data_restrictions`) gets nothing of the message: the edge reads it to its end and
/// then relays the refusal, in the same session, which goes on; the refused backend
/// session is not kept for reuse; nothing is queued.
#[test]
fn a_backend_refusing_data_has_its_refusal_relayed_after_the_message() {
    if skip("smtp_postfix") {
        return;
    }
    let cluster = Cluster::start_with("", false, &["smtpd_data_restrictions = reject"]);
    let user = "user41@example.com";
    let (host, smtp) = cluster.addr(SMTP);
    let out = python(&format!(
        "import smtplib\ns = smtplib.SMTP('{host}', {smtp}, timeout=10)\ns.ehlo('c.example.net')\n\
         for i in range(2):\n\
         \x20   print('mail', s.mail('a@sender.example.net')[0], 'rcpt', s.rcpt('{user}')[0])\n\
         \x20   print('data', s.data('Subject: refused\\r\\n\\r\\n' + 'x' * 200000 + '\\r\\n'))\n\
         print('noop', s.noop()[0]); s.quit()\n"
    ))
    .expect("smtplib");
    assert_eq!(out.matches("mail 250 rcpt 250").count(), 2, "{out}");
    assert_eq!(
        out.matches("data (554, b'5.7.1 <DATA>: Data command rejected")
            .count(),
        2,
        "{out}"
    );
    assert!(out.contains("noop 250"), "{out}");
    let home = owner(&cluster.edge, user);
    let backend = cluster.backend(&home);
    assert_eq!(backend.queue_len().expect("queue"), 0, "nothing queued");
    assert_eq!(backend.dovecot().message_count(user).expect("count"), 0);
    let sessions = |result: &str| support::backend_sessions(&cluster.edge, &home, result);
    assert_eq!((sessions("fresh"), sessions("reused")), (2, 0), "{out}");

    // Submission waits for the backend's 354 before its own: the refusal is a temporary
    // failure at DATA, and no byte of a message goes to the backend.
    let password = password_for(user).expect("password");
    let (_, sub) = cluster.addr(SUBMISSION);
    let out = python(&format!(
        "{TLS_PRELUDE}\
         s = smtplib.SMTP('{host}', {sub}, timeout=10)\n\
         s.ehlo('laptop.example.net'); s.starttls(context=ctx); s.ehlo('laptop.example.net')\n\
         s.login('{user}', '{password}')\n\
         print('mail', s.mail('{user}')[0], 'rcpt', s.rcpt('friend@elsewhere.test')[0])\n\
         print('data', s.docmd('DATA'))\n\
         print('noop', s.noop()[0]); s.quit()\n"
    ))
    .expect("smtplib");
    assert!(out.contains("mail 250 rcpt 250"), "{out}");
    assert!(out.contains("data (451, b'4.4.2"), "{out}");
    assert!(out.contains("noop 250"), "{out}");
    assert_eq!(backend.queue_len().expect("queue"), 0, "nothing queued");
}

/// `protobalance ctl <args>` against `edge` with `token`: (exit code, output).
fn ctl(edge: &Edge, token: &str, args: &[&str]) -> (i32, String) {
    support::cli(edge, token, &[&["ctl"], args].concat())
}

/// `[scan]` on submission: an authenticated relay client that sends malware has it refused
/// (it never reaches the user's Postfix) and is suspended from sending; clean mail before
/// it went through with the scan header.
#[test]
fn submitted_malware_is_refused_and_suspends_the_account() {
    let test = "submitted_malware_is_refused_and_suspends_the_account";
    if skip("smtp_postfix") || !require_scanner(test, CLAMD, "clamav-daemon") {
        return;
    }
    let clamd = ClamdServer::start().expect("clamd");
    let cluster = Cluster::start(&format!(
        "[scan]\nclamd = \"{}\"\ntimeout_ms = 5000\n",
        clamd.socket().display()
    ));
    let user = "user53@example.com";
    let password = password_for(user).expect("password");
    let (host, subs) = cluster.addr(SUBMISSIONS);
    let script = format!(
        "{TLS_PRELUDE}\
         eicar = base64.b64encode({EICAR:?}.encode()).decode()\n\
         bad = ('Subject: invoice\\r\\nMIME-Version: 1.0\\r\\n'\n\
         \x20   'Content-Type: multipart/mixed; boundary=\"b\"\\r\\n\\r\\n--b\\r\\n'\n\
         \x20   'Content-Type: application/octet-stream\\r\\n'\n\
         \x20   'Content-Transfer-Encoding: base64\\r\\n\\r\\n' + eicar + '\\r\\n--b--\\r\\n')\n\
         s = smtplib.SMTP_SSL('{host}', {subs}, context=ctx, timeout=15)\n\
         s.ehlo('laptop.example.net')\n\
         s.login('{user}', '{password}')\n\
         print('clean', s.sendmail('{user}', ['friend@elsewhere.test'], 'Subject: fine\\r\\n\\r\\nhello\\r\\n'))\n\
         try:\n\
         \x20   s.sendmail('{user}', ['friend@elsewhere.test'], bad)\n\
         \x20   print('malware accepted')\n\
         except smtplib.SMTPDataError as e:\n\
         \x20   print('malware', e.smtp_code, e.smtp_error.decode())\n\
         print('after', s.mail('{user}'))\n"
    );
    let out = python(&script).expect("submission script");
    let has = |needle: &str| assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    has("clean {}");
    has("malware 550 5.7.1 Message contains malware (Eicar-Test-Signature");
    has(
        "after (550, b'5.7.1 Your account is suspended from sending mail (it sent a message with malware)",
    );
    metric_line(
        &cluster.edge,
        &["protobalance_scan_verdicts_total", "action=\"malware\"} 1"],
    );
    metric_line(
        &cluster.edge,
        &["protobalance_scan_verdicts_total", "action=\"accept\"} 1"],
    );
    let home = owner(&cluster.edge, user);
    let sink = cluster.backend(&home).sink();
    let relayed = sink
        .wait_for_messages(1, DELIVERY_TIMEOUT)
        .expect("the clean message relayed");
    assert!(
        relayed[0]
            .text()
            .contains("X-Virus-Scanned: clamd (protobalance); clean"),
        "{}",
        relayed[0].text()
    );
    // Give a wrongly accepted second message time to arrive: only the clean one may.
    std::thread::sleep(Duration::from_secs(2));
    let relayed = sink.messages();
    assert_eq!(relayed.len(), 1, "the malware never reached Postfix");
    assert!(relayed[0].text().contains("Subject: fine"));
}
