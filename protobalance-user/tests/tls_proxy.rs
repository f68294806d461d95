//! TLS towards clients: STLS (POP3) and STARTTLS (IMAP, SMTP) on plaintext listeners,
//! implicit TLS listeners (the 995/993/465 kind), certificates chosen by SNI, and plaintext pipelined
//! behind STLS/STARTTLS discarded. Real Dovecot backends, Python's poplib/imaplib/ssl with
//! a CA made here by rcgen.

mod support;

use protobalance_tests::{DovecotCluster, password_for, python};
use support::{Edge, Listen, USERS, deliver, make_certificates, owner, start_edge};

struct Tls {
    edge: Edge,
    certs: tempfile::TempDir,
}

impl Tls {
    fn addr(&self, i: usize) -> (String, u16) {
        (
            self.edge.listeners[i].ip().to_string(),
            self.edge.listeners[i].port(),
        )
    }

    /// A Python prelude with `ctx`: verifies the chain against our CA; host names are
    /// checked only where a test sends SNI itself.
    fn prelude(&self) -> String {
        format!(
            "import ssl, socket, poplib, imaplib, sys\n\
             ctx = ssl.create_default_context(cafile='{}/ca.pem')\nctx.check_hostname = False\n",
            self.certs.path().display()
        )
    }
}

const POP3_STARTTLS: usize = 0;
const POP3_IMPLICIT: usize = 1;
const IMAP_STARTTLS: usize = 2;
const IMAP_IMPLICIT: usize = 3;
const SMTP_STARTTLS: usize = 4;
const SMTP_IMPLICIT: usize = 5;

fn start(cluster: &DovecotCluster) -> Tls {
    let certs = tempfile::tempdir().expect("tempdir");
    let sections = make_certificates(certs.path());
    let listeners = [
        Listen("pop3", None), // starttls: the default once a certificate exists
        Listen("pop3", Some("implicit")),
        Listen("imap", Some("starttls")),
        Listen("imap", Some("implicit")),
        Listen("smtp", Some("starttls")),
        Listen("smtp", Some("implicit")),
    ];
    let edge = start_edge(cluster, &listeners, &sections);
    Tls { edge, certs }
}

#[test]
fn logins_over_stls_starttls_and_implicit_tls_read_the_owners_mail() {
    if support::skip("tls_proxy") {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let tls = start(&cluster);
    let user = "user17@example.com";
    let pass = password_for(user).expect("test user");
    deliver(&cluster, &owner(&tls.edge, user), user, "tls-token");
    let (host, p0) = tls.addr(POP3_STARTTLS);
    let (_, p1) = tls.addr(POP3_IMPLICIT);
    let (_, i0) = tls.addr(IMAP_STARTTLS);
    let (_, i1) = tls.addr(IMAP_IMPLICIT);
    let script = format!(
        "{}\
         p = poplib.POP3('{host}', {p0}, timeout=10)\n\
         assert 'STLS' in p.capa(), p.capa()\n\
         p.stls(context=ctx)\nassert 'STLS' not in p.capa()\n\
         p.user('{user}'); p.pass_('{pass}')\nprint('stls', b'\\n'.join(p.retr(1)[1]).decode()); p.quit()\n\
         p = poplib.POP3_SSL('{host}', {p1}, context=ctx, timeout=10)\n\
         p.user('{user}'); p.pass_('{pass}')\nprint('pop3s', p.stat()); p.quit()\n\
         m = imaplib.IMAP4('{host}', {i0}, timeout=10)\n\
         assert 'STARTTLS' in m.capabilities, m.capabilities\n\
         m.starttls(ssl_context=ctx)\nm.login('{user}', '{pass}')\n\
         typ, d = m.select('INBOX'); print('starttls EXISTS', d[0].decode()); m.logout()\n\
         m = imaplib.IMAP4_SSL('{host}', {i1}, ssl_context=ctx, timeout=10)\n\
         assert 'STARTTLS' not in m.capabilities, m.capabilities\n\
         m.login('{user}', '{pass}'); m.select('INBOX')\n\
         typ, d = m.fetch('1', '(RFC822)'); print('imaps', d[0][1].decode()); m.logout()\n",
        tls.prelude()
    );
    let out = python(&script).expect("TLS sessions");
    // The message, read once over STLS and once over implicit-TLS IMAP.
    assert!(
        out.starts_with("stls Return-Path: <sender@example.net>"),
        "{out}"
    );
    assert_eq!(out.matches("Subject: tls-token").count(), 2, "{out}");
    assert_eq!(out.matches("body tls-token").count(), 2, "{out}");
    assert!(out.contains("pop3s (1, "), "{out}");
    assert!(out.contains("starttls EXISTS 1"), "{out}");
    assert!(
        out.contains("imaps Return-Path: <sender@example.net>"),
        "{out}"
    );
}

#[test]
fn certificates_follow_sni_and_plaintext_after_starttls_is_discarded() {
    if support::skip("tls_proxy") {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let tls = start(&cluster);
    let (host, p1) = tls.addr(POP3_IMPLICIT);
    let (_, p0) = tls.addr(POP3_STARTTLS);
    let (_, i0) = tls.addr(IMAP_STARTTLS);
    let (_, s0) = tls.addr(SMTP_STARTTLS);
    // SNI picks the certificate; no or unknown SNI gets the first (default) one. The
    // client checks the host name here, so a wrong certificate fails the handshake.
    let script = format!(
        "{}\
         strict = ssl.create_default_context(cafile=ctx.get_ca_certs() and '{}/ca.pem')\n\
         def subject(name, check):\n\
         \x20   c = strict if check else ctx\n\
         \x20   s = c.wrap_socket(socket.create_connection(('{host}', {p1}), 10), server_hostname=name)\n\
         \x20   alt = s.getpeercert()['subjectAltName'][0][1]; s.close(); return alt\n\
         print('mail', subject('mail.example.test', True))\n\
         print('other', subject('other.example.test', True))\n\
         print('unknown', subject('unknown.example.test', False))\n\
         print('none', subject(None, False))\n\
         def upgrade(port, first, upgrade_cmd, then):\n\
         \x20   s = socket.create_connection(('{host}', port), 10); f = s.makefile('rb')\n\
         \x20   f.readline()\n\
         \x20   s.sendall(upgrade_cmd + then)  # pipelined plaintext behind the upgrade\n\
         \x20   line = f.readline(); assert line.startswith(first), line\n\
         \x20   t = ctx.wrap_socket(s, server_hostname='mail.example.test')\n\
         \x20   t.sendall(then); return t.recv(4096).decode()\n\
         print('pop3', repr(upgrade({p0}, b'+OK', b'STLS\\r\\n', b'CAPA\\r\\n')))\n\
         print('imap', repr(upgrade({i0}, b'a OK', b'a STARTTLS\\r\\n', b'b CAPABILITY\\r\\n')))\n\
         print('smtp', repr(upgrade({s0}, b'220 2.0.0', b'STARTTLS\\r\\n', b'EHLO x.example.net\\r\\n')))\n",
        tls.prelude(),
        tls.certs.path().display()
    );
    let out = python(&script).expect("SNI and pipelining script");
    assert!(out.contains("mail mail.example.test"), "{out}");
    assert!(out.contains("other other.example.test"), "{out}");
    assert!(
        out.contains("unknown mail.example.test"),
        "default certificate: {out}"
    );
    assert!(
        out.contains("none mail.example.test"),
        "default certificate without SNI: {out}"
    );
    // The handshake succeeded (the pipelined plaintext did not corrupt it) and the command
    // sent over TLS got exactly one answer, without STLS/STARTTLS on offer any more.
    let pop3 = out
        .lines()
        .find(|l| l.starts_with("pop3 "))
        .expect("pop3 line");
    assert!(
        pop3.contains("+OK") && pop3.contains("SASL PLAIN LOGIN") && !pop3.contains("STLS"),
        "{pop3}"
    );
    assert_eq!(pop3.matches("+OK").count(), 1, "one CAPA answer: {pop3}");
    let imap = out
        .lines()
        .find(|l| l.starts_with("imap "))
        .expect("imap line");
    assert!(
        imap.contains("b OK") && !imap.contains("STARTTLS"),
        "{imap}"
    );
    assert_eq!(
        imap.matches("b OK").count(),
        1,
        "one CAPABILITY answer: {imap}"
    );
    // SMTP: one EHLO answer over TLS (the pipelined plaintext EHLO was dropped), and
    // STARTTLS is no longer on offer.
    let smtp = out
        .lines()
        .find(|l| l.starts_with("smtp "))
        .expect("smtp line");
    assert!(
        smtp.contains("250-PIPELINING") && !smtp.contains("STARTTLS"),
        "{smtp}"
    );
    assert_eq!(smtp.matches("250 ").count(), 1, "one EHLO answer: {smtp}");
}

/// SMTP over STARTTLS and implicit TLS delivers to the owner; STARTTLS is advertised only
/// before TLS, refused inside a transaction and once TLS is up, and a failed handshake is
/// the end of that session only.
#[test]
fn smtp_starttls_and_implicit_tls_deliver_to_the_owner() {
    if support::skip("tls_proxy") {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let tls = start(&cluster);
    let user = "user23@example.com";
    let (host, s0) = tls.addr(SMTP_STARTTLS);
    let (_, s1) = tls.addr(SMTP_IMPLICIT);
    let script = format!(
        "{}import smtplib\n\
         s = smtplib.SMTP('{host}', {s0}, timeout=10)\n\
         code, text = s.ehlo('client.example.net'); print('ehlo1', code, text.split(b'\\n')[0].decode())\n\
         assert s.has_extn('starttls')\n\
         s.mail('a@example.net'); print('in-tx', s.docmd('STARTTLS')); s.rset()\n\
         print('tls', s.starttls(context=ctx)[0])\n\
         s.ehlo('client.example.net'); print('offered-after', s.has_extn('starttls'))\n\
         print('again', s.docmd('STARTTLS'))\n\
         s.sendmail('sender@example.net', ['{user}'], 'Subject: starttls-token\\r\\n\\r\\nbody\\r\\n'); s.quit()\n\
         s = smtplib.SMTP_SSL('{host}', {s1}, context=ctx, timeout=10)\n\
         s.ehlo('client.example.net'); print('implicit-offers', s.has_extn('starttls'))\n\
         s.sendmail('sender@example.net', ['{user}'], 'Subject: smtps-token\\r\\n\\r\\nbody\\r\\n'); s.quit()\n\
         raw = socket.create_connection(('{host}', {s0}), 10); f = raw.makefile('rb'); f.readline()\n\
         raw.sendall(b'STARTTLS\\r\\n'); f.readline(); raw.sendall(b'not a TLS hello\\r\\n' * 100)\n\
         print('after-bad-handshake', repr(raw.recv(100)))\n",
        tls.prelude()
    );
    let out = python(&script).expect("SMTP TLS script");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert!(
        out.contains(&format!("ehlo1 250 {}", hostname.trim())),
        "EHLO names the host: {out}"
    );
    assert!(
        out.contains("in-tx (503, b'5.5.1 Mail transaction in progress')"),
        "{out}"
    );
    assert!(out.contains("tls 220"), "{out}");
    assert!(out.contains("offered-after False"), "{out}");
    assert!(
        out.contains("again (503, b'5.5.1 TLS already active')"),
        "{out}"
    );
    assert!(out.contains("implicit-offers False"), "{out}");
    // The server closes on a failed handshake (an alert or nothing, never a command reply).
    assert!(!out.contains("after-bad-handshake b'5"), "{out}");
    let home = owner(&tls.edge, user);
    let backend = cluster
        .backends()
        .iter()
        .find(|b| b.name() == home)
        .expect("owner");
    assert_eq!(backend.message_count(user).expect("count"), 2, "{out}");
}

#[test]
fn tls_config_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |text: &str| support::check_config(dir.path(), text);
    let backend = "[[backend]]\nname = \"b1\"\naddress = \"127.0.1.1\"\n";
    let (ok, err) = check(&format!(
        "{backend}[[listener]]\nprotocol = \"pop3\"\nlisten = \"127.0.0.1:1995\"\ntls = \"implicit\"\n"
    ));
    assert!(
        !ok && err.contains("`listener[0].tls`") && err.contains("[[certificate]]"),
        "{err}"
    );
    std::fs::write(dir.path().join("bad.pem"), "not a certificate\n").expect("write");
    let (ok, err) = check("[[certificate]]\ncert = \"bad.pem\"\nkey = \"bad.pem\"\n");
    assert!(
        !ok && err.contains("`certificate[0]`") && err.contains("bad.pem"),
        "{err}"
    );
    let (ok, err) = check("[[certificate]]\ncert = \"missing.pem\"\nkey = \"missing.key\"\n");
    assert!(
        !ok && err.contains("`certificate[0]`") && err.contains("missing.pem"),
        "{err}"
    );
}
