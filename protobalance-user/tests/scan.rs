//! Content scanning end to end: real clamd (Debian's clamav-daemon, with a signature
//! database this test writes: the official ones come from the Internet) and real rspamd
//! (local configuration, no network look-ups) judge mail that real clients (smtplib) send
//! through protobalance to real Dovecot backends. Malware and spam are refused and never
//! reach Dovecot, clean mail arrives with the scan headers, a scanner that is down or
//! silent defers (or tags) within the timeout, and a 30 MB message is scanned with bounded
//! memory.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use protobalance_tests::{
    ClamdServer, DovecotCluster, EICAR, RspamdServer, python, require_scanner,
    scanners::{CLAMD, RSPAMD},
    user_name,
};

mod support;

use support::{Edge, Listen, delivered, sample, start_edge};

fn skip_clamd(test: &str) -> bool {
    support::skip(test) || !require_scanner(test, CLAMD, "clamav-daemon")
}

/// GTUBE: the standard test string every spam filter refuses.
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// A message with the EICAR test file as a base64 attachment.
fn eicar_message() -> String {
    let b64 = python(&format!(
        "import base64\nprint(base64.b64encode({EICAR:?}.encode()).decode())"
    ))
    .expect("base64");
    format!(
        "Subject: invoice\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n\
         --b\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"eicar.com\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--b--\r\n",
        b64.trim()
    )
}

/// Sends `body` to `to` through the edge: smtplib's outcome as `(code, text, seconds)`,
/// code 250 when accepted.
fn send(edge: &Edge, to: &str, body: &str) -> (u16, String, f64) {
    let addr = edge.listeners[0];
    let path = edge.dir.path().join(format!("msg-{}.eml", rand_suffix()));
    std::fs::write(&path, body).expect("write message");
    let out = python(&format!(
        "import smtplib, time\nt = time.monotonic()\nbody = open({:?}, 'rb').read()\n\
         try:\n\
         \x20   s = smtplib.SMTP('{}', {}, timeout=60)\n\
         \x20   s.ehlo('client.example.net')\n\
         \x20   s.sendmail('sender@example.net', ['{to}'], body)\n\
         \x20   print('CODE 250 accepted')\n\
         \x20   s.quit()\n\
         except smtplib.SMTPDataError as e:\n\
         \x20   print('CODE', e.smtp_code, e.smtp_error.decode())\n\
         except Exception as e:\n\
         \x20   print('CODE 0', repr(e))\n\
         print('SECONDS', time.monotonic() - t)\n",
        path.display().to_string(),
        addr.ip(),
        addr.port()
    ))
    .expect("smtplib");
    let code = out
        .lines()
        .find_map(|l| l.strip_prefix("CODE "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let seconds = out
        .lines()
        .find_map(|l| l.strip_prefix("SECONDS "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(f64::NAN);
    (code, out, seconds)
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// Every stored message of `user`, as text (Dovecot stores LF line endings).
fn stored(cluster: &DovecotCluster, user: &str) -> Vec<String> {
    let mut out = Vec::new();
    for b in cluster.backends() {
        let maildir = b.maildir(user).expect("maildir");
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(maildir.join(sub)) {
                for e in entries.flatten() {
                    let bytes = std::fs::read(e.path()).expect("read");
                    out.push(String::from_utf8_lossy(&bytes).replace("\r\n", "\n"));
                }
            }
        }
    }
    out
}

/// The stored message of `user` that contains `needle` (panics when there is none).
fn stored_with(cluster: &DovecotCluster, user: &str, needle: &str) -> String {
    stored(cluster, user)
        .into_iter()
        .find(|m| m.contains(needle))
        .unwrap_or_else(|| panic!("no stored message of {user} contains {needle:?}"))
}

fn clamd_section(clamd: &ClamdServer, extra: &str) -> String {
    clamd_section_with(clamd, 2000, extra)
}

fn clamd_section_with(clamd: &ClamdServer, timeout_ms: u64, extra: &str) -> String {
    format!(
        "[scan]\nclamd = \"{}\"\ntimeout_ms = {timeout_ms}\n{extra}\n",
        clamd.socket().display()
    )
}

#[test]
fn malware_is_refused_and_clean_mail_arrives_scanned() {
    let test = "malware_is_refused_and_clean_mail_arrives_scanned";
    if skip_clamd(test) {
        return;
    }
    let cluster = DovecotCluster::start(1, 20).expect("cluster");
    let clamd = ClamdServer::start().expect("clamd");
    let edge = start_edge(
        &cluster,
        &[Listen("smtp", None)],
        &clamd_section(&clamd, ""),
    );
    let user = user_name(3);

    let (code, out, _) = send(&edge, &user, "Subject: hello\r\n\r\nJust a note.\r\n");
    assert_eq!(code, 250, "{out}");
    let messages = stored(&cluster, &user);
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0].contains("\nX-Virus-Scanned: clamd (protobalance); clean\nSubject: hello\n"),
        "{}",
        messages[0]
    );
    assert!(messages[0].contains("Just a note."), "{}", messages[0]);

    let (code, out, _) = send(&edge, &user, &eicar_message());
    assert_eq!(code, 550, "{out}");
    assert!(
        out.contains("5.7.1") && out.contains("Eicar-Test-Signature"),
        "{out}"
    );
    assert_eq!(
        delivered(&cluster, &user),
        1,
        "the malware never reached Dovecot"
    );
    assert_eq!(
        sample(
            &edge,
            "protobalance_scan_verdicts_total{action=\"malware\"}"
        ),
        1
    );
    assert_eq!(
        sample(&edge, "protobalance_scan_verdicts_total{action=\"accept\"}"),
        1,
        "the clean message so far"
    );
    // Scan headers the sender wrote are dropped: only the edge's own may say "clean".
    let forged = "X-Virus-Scanned: forged; clean\r\nX-Spam-Flag: NO\r\n\tcontinued\r\n\
                  Subject: forged\r\n\r\nbody\r\n";
    let (code, out, _) = send(&edge, &user, forged);
    assert_eq!(code, 250, "{out}");
    let stored_forged = stored_with(&cluster, &user, "Subject: forged");
    assert!(!stored_forged.contains("forged; clean"), "{stored_forged}");
    assert!(
        !stored_forged.contains("X-Spam-Flag") && !stored_forged.contains("continued"),
        "{stored_forged}"
    );
    assert_eq!(
        stored_forged.matches("X-Virus-Scanned:").count(),
        1,
        "{stored_forged}"
    );
    // A message with a dot-stuffed line arrives as sent.
    let (code, out, _) = send(
        &edge,
        &user,
        "Subject: dots\r\n\r\n.leading dot\r\n..two\r\n",
    );
    assert_eq!(code, 250, "{out}");
    assert!(
        stored(&cluster, &user)
            .iter()
            .any(|m| m.contains("\n.leading dot\n..two\n")),
        "dot-stuffing undone exactly once"
    );
}

#[test]
fn a_scanner_that_is_down_or_silent_defers_or_tags_within_the_timeout() {
    let test = "a_scanner_that_is_down_or_silent_defers_or_tags_within_the_timeout";
    if skip_clamd(test) {
        return;
    }
    let cluster = DovecotCluster::start(1, 20).expect("cluster");
    let mut clamd = ClamdServer::start().expect("clamd");
    let tempfail = start_edge(
        &cluster,
        &[Listen("smtp", None)],
        &clamd_section(&clamd, ""),
    );
    let accept = start_edge(
        &cluster,
        &[Listen("smtp", None)],
        &clamd_section(&clamd, "on_failure = \"accept\""),
    );
    let user = user_name(4);
    assert_eq!(send(&tempfail, &user, "Subject: a\r\n\r\nup\r\n").0, 250);
    clamd.stop();

    let (code, out, seconds) = send(&tempfail, &user, "Subject: b\r\n\r\ndown\r\n");
    assert_eq!(code, 451, "clamd down: deferred: {out}");
    assert!(out.contains("4.7.1"), "{out}");
    assert!(seconds < 3.0, "answered within the timeout: {seconds} s");
    let (code, out, _) = send(&accept, &user, "Subject: c\r\n\r\ndown, accepted\r\n");
    assert_eq!(code, 250, "{out}");
    let tagged = stored_with(&cluster, &user, "down, accepted");
    assert!(
        tagged.contains("X-Scan-Warning: not scanned (clamd: connect "),
        "{tagged}"
    );

    // A clamd that accepts the connection and never answers: bounded by the timeout too.
    let silent = TcpListener::bind("127.0.0.1:0").expect("listener");
    let section = format!(
        "[scan]\nclamd = \"{}\"\ntimeout_ms = 1500\n",
        silent.local_addr().expect("addr")
    );
    let hanging = start_edge(&cluster, &[Listen("smtp", None)], &section);
    let started = Instant::now();
    let (code, out, _) = send(&hanging, &user, "Subject: d\r\n\r\nsilent scanner\r\n");
    assert_eq!(code, 451, "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "no hang: {:?}",
        started.elapsed()
    );
    assert_eq!(
        sample(
            &hanging,
            "protobalance_scan_errors_total{scanner=\"clamd\"}"
        ),
        1
    );
    assert_eq!(
        delivered(&cluster, &user),
        2,
        "deferred mail was not stored"
    );
    drop(silent);
}

#[test]
fn a_30_mb_message_is_scanned_with_bounded_memory() {
    let test = "a_30_mb_message_is_scanned_with_bounded_memory";
    if skip_clamd(test) {
        return;
    }
    let cluster = DovecotCluster::start(1, 20).expect("cluster");
    let clamd = ClamdServer::start().expect("clamd");
    let edge = start_edge(
        &cluster,
        &[Listen("smtp", None)],
        &format!(
            "[limits]\nmax_message_octets = 40000000\n{}",
            clamd_section_with(&clamd, 30_000, "")
        ),
    );
    let user = user_name(5);
    let before = edge.rss_kib();
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n";
    let body = format!(
        "Subject: big\r\n\r\n{}",
        line.repeat(30_000_000 / line.len())
    );
    let (code, out, _) = send(&edge, &user, &body);
    assert_eq!(code, 250, "{out}");
    let after = edge.rss_kib();
    let messages = stored(&cluster, &user);
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].matches(line.trim_end()).count(),
        30_000_000 / line.len(),
        "the whole message arrived"
    );
    // Bigger than clamd's share (scan.clamd_max_bytes, 25 MiB by default): the header says
    // how much of it was virus-scanned.
    assert!(
        messages[0]
            .contains("X-Virus-Scanned: clamd (protobalance); clean in the first 26214400 bytes"),
        "{}",
        &messages[0][..600]
    );
    assert!(
        after.saturating_sub(before) < 24 * 1024,
        "RSS grew from {before} KiB to {after} KiB for a 30 MB message"
    );
    eprintln!("RSS {before} KiB before, {after} KiB after a 30 MB scanned message");
}

#[test]
fn spam_is_refused_or_tagged_per_policy_and_clean_mail_gets_the_spam_headers() {
    let test = "spam_is_refused_or_tagged_per_policy_and_clean_mail_gets_the_spam_headers";
    if skip_clamd(test) || !require_scanner(test, RSPAMD, "rspamd") {
        return;
    }
    let cluster = DovecotCluster::start(1, 20).expect("cluster");
    let rspamd = RspamdServer::start().expect("rspamd");
    let clamd = ClamdServer::start().expect("clamd");
    let scan = |policy: &str| {
        format!(
            "[scan]\nrspamd = \"{}\"\nclamd = \"{}\"\ntimeout_ms = 5000\n{policy}\n",
            rspamd.addr(),
            clamd.socket().display()
        )
    };
    // Reputation on: a refused spam costs the client.
    let refusing = start_edge(
        &cluster,
        &[Listen("smtp", None)],
        &format!("[reputation]\n{}", scan("")),
    );
    let tagging = start_edge(
        &cluster,
        &[Listen("smtp", None)],
        &scan("[[scan.domain]]\ndomain = \"example.com\"\nspam = \"tag\""),
    );
    let user = user_name(6);
    let gtube = format!("Subject: offer\r\n\r\nBuy now. {GTUBE}\r\n");

    let (code, out, _) = send(&refusing, &user, &gtube);
    assert_eq!(code, 550, "GTUBE refused: {out}\n{}", rspamd.log());
    assert!(out.contains("5.7.1") && out.contains("spam"), "{out}");
    assert_eq!(
        delivered(&cluster, &user),
        0,
        "refused spam never reached Dovecot"
    );
    assert_eq!(
        sample(
            &refusing,
            "protobalance_reputation_events_total{event=\"spam\"}"
        ),
        1,
        "the client lost reputation"
    );

    // A well-formed message: rspamd scores the missing From, To, Date and Message-ID.
    let date = python("import email.utils\nprint(email.utils.formatdate())").expect("date");
    let lunch = format!(
        "From: Sender <sender@example.net>\r\nTo: <{user}>\r\nDate: {}\r\n\
         Message-ID: <lunch.1@example.net>\r\nSubject: lunch\r\n\r\n\
         Noon at the usual place?\r\n",
        date.trim()
    );
    let (code, out, _) = send(&refusing, &user, &lunch);
    assert_eq!(code, 250, "{out}");
    let clean = stored(&cluster, &user).pop().expect("clean message stored");
    for header in [
        "\nX-Spam-Score: ",
        "\nX-Spam-Status: No, score=",
        "action=\"no action\"",
        "\nX-Virus-Scanned: clamd (protobalance); clean\n",
    ] {
        assert!(clean.contains(header), "{header:?} in:\n{clean}");
    }
    assert!(!clean.contains("X-Spam-Flag"), "{clean}");

    let (code, out, _) = send(&tagging, &user, &gtube);
    assert_eq!(code, 250, "GTUBE tagged under spam = \"tag\": {out}");
    let tagged = stored_with(&cluster, &user, "Subject: offer");
    assert!(tagged.contains("\nX-Spam-Flag: YES\n"), "{tagged}");
    assert!(tagged.contains("\nX-Spam-Status: Yes, score="), "{tagged}");
    assert_eq!(
        sample(&tagging, "protobalance_scan_verdicts_total{action=\"tag\"}"),
        1
    );
    assert_eq!(
        sample(
            &refusing,
            "protobalance_scan_verdicts_total{action=\"reject\"}"
        ),
        1
    );
    let latency = sample(
        &refusing,
        "protobalance_scan_seconds_count{scanner=\"rspamd\"}",
    );
    assert_eq!(latency, 2, "each scan timed");

    // rspamd gone: deferred at once (connection refused), not a hang, not a loss.
    let mut rspamd = rspamd;
    rspamd.stop();
    let before = delivered(&cluster, &user);
    let (code, out, seconds) = send(&refusing, &user, &lunch);
    assert_eq!(code, 451, "rspamd down: deferred: {out}");
    assert!(seconds < 5.0, "within the timeout: {seconds} s");
    assert_eq!(delivered(&cluster, &user), before, "nothing stored");
    assert_eq!(
        sample(
            &refusing,
            "protobalance_scan_errors_total{scanner=\"rspamd\"}"
        ),
        1
    );
}
