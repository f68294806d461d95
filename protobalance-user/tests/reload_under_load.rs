//! Zero-downtime operation under load: SMTP and POP3 clients (Python's smtplib and poplib)
//! loop against protobalance in front of real Dovecot backends while the config is
//! reloaded ten times (SIGHUP) — a listener opened and closed, `[limits]` and a backend's
//! capacity changed, the certificate-less config kept — and the binary is then restarted in
//! place (SIGUSR2). No client may see a refused connection or a failed session, and every
//! message accepted with 250 must be in its owner's mailbox.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use protobalance_tests::{DovecotCluster, free_port, process, python};

mod support;

use support::{Listen, USERS, delivered, running, sample, start_edge, upgrade_in_place};

const RELOADS: u64 = 10;

/// The load: one SMTP and one POP3 client thread, each looping whole sessions until the
/// file `stop` exists. Prints `smtp_ok pop3_ok failures` and then one line per accepted
/// message (`rcpt`), and the failures.
fn load_script(smtp: SocketAddr, pop3: SocketAddr, stop: &std::path::Path) -> String {
    format!(
        r#"
import os, poplib, smtplib, threading, time
stop = {stop:?}
accepted, failures, counts = [], [], {{"smtp": 0, "pop3": 0}}
def smtp_loop():
    n = 0
    while not os.path.exists(stop):
        n += 1
        rcpt = "user%d@example.com" % (1 + n % 30)
        try:
            s = smtplib.SMTP("{sh}", {sp}, timeout=15)
            s.ehlo("load.example.net")
            refused = s.sendmail("load@example.net", [rcpt], "Subject: load %d\r\n\r\nbody %d\r\n" % (n, n))
            s.quit()
            if refused:
                failures.append("smtp refused %r" % (refused,))
            else:
                accepted.append(rcpt); counts["smtp"] += 1
        except Exception as e:
            failures.append("smtp %r" % (e,))
def pop3_loop():
    n = 0
    while not os.path.exists(stop):
        n += 1
        user = "user%d@example.com" % (100 + n % 30)
        try:
            p = poplib.POP3("{ph}", {pp}, timeout=15)
            p.user(user); p.pass_("pass%d" % (100 + n % 30)); p.stat(); p.quit()
            counts["pop3"] += 1
        except Exception as e:
            failures.append("pop3 %r" % (e,))
threads = [threading.Thread(target=smtp_loop), threading.Thread(target=pop3_loop)]
for t in threads: t.start()
for t in threads: t.join()
print(counts["smtp"], counts["pop3"], len(failures))
for rcpt in accepted: print("rcpt", rcpt)
for f in failures[:10]: print("failure", f)
"#,
        sh = smtp.ip(),
        sp = smtp.port(),
        ph = pop3.ip(),
        pp = pop3.port(),
    )
}

/// Writes the config atomically (a reload must never read half a file).
fn write_config(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("replace config");
}

fn wait_for_reloads(edge: &support::Edge, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let applied = sample(
            edge,
            "protobalance_config_reloads_total{result=\"applied\"}",
        );
        if applied >= n {
            assert_eq!(applied, n, "one reload per SIGHUP");
            let refused = sample(
                edge,
                "protobalance_config_reloads_total{result=\"invalid\"}",
            ) + sample(edge, "protobalance_config_reloads_total{result=\"failed\"}");
            assert_eq!(refused, 0, "a reload was refused: see the log");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reload {n} not applied after 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connects(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

#[test]
fn ten_reloads_and_a_restart_under_load_fail_no_session_and_lose_no_mail() {
    let test = "ten_reloads_and_a_restart_under_load_fail_no_session_and_lose_no_mail";
    if support::skip(test) {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("smtp", None), Listen("pop3", None)], "");
    let (smtp, pop3) = (edge.listeners[0], edge.listeners[1]);
    let path = edge.dir.path().join("pb.toml");
    let base = std::fs::read_to_string(&path).expect("config");
    let lo = std::net::IpAddr::from([127, 0, 0, 1]);
    let extra = SocketAddr::new(lo, free_port(lo).expect("port"));
    // The variant: one more POP3 listener, other limits, backend3 with twice the capacity.
    let variant =
        base.replace(
            "[limits]\n",
            "[limits]\nmax_message_octets = 20000000\nmax_sessions_per_ip = 500\n",
        )
        .replace(
            "name = \"backend3\"\n",
            "name = \"backend3\"\ncapacity = 200\n",
        ) + &format!("[[listener]]\nprotocol = \"pop3\"\nlisten = \"{extra}\"\n");
    assert_ne!(variant, base);
    let before: HashMap<String, usize> = (1..=30)
        .map(|i| {
            let user = format!("user{i}@example.com");
            let n = delivered(&cluster, &user);
            (user, n)
        })
        .collect();

    let stop = edge.dir.path().join("stop-load");
    let script = load_script(smtp, pop3, &stop);
    let old = edge.pid();
    let (output, successor) = std::thread::scope(|scope| {
        let load = scope.spawn(|| python(&script).expect("load script"));
        std::thread::sleep(Duration::from_millis(500));
        for i in 1..=RELOADS {
            let text = if i % 2 == 1 { &variant } else { &base };
            write_config(&path, text);
            process::signal(old, "HUP");
            wait_for_reloads(&edge, i);
            assert_eq!(
                connects(extra),
                i % 2 == 1,
                "reload {i}: the extra listener is open exactly in the variant"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // And a restart: the binary replaced in place (SIGUSR2), sockets handed over.
        let successor = upgrade_in_place(&edge, old);
        std::thread::sleep(Duration::from_secs(1));
        std::fs::write(&stop, "").expect("stop the load");
        (load.join().expect("load thread"), successor)
    });
    assert!(running(successor.0), "the successor serves");

    let mut head = output.lines().next().unwrap_or_default().split(' ');
    let mut field = || {
        head.next()
            .and_then(|n| n.parse::<u64>().ok())
            .expect("count")
    };
    let (smtp_ok, pop3_ok, failures) = (field(), field(), field());
    eprintln!(
        "under 10 reloads and a restart: {smtp_ok} SMTP and {pop3_ok} POP3 sessions, {failures} failed"
    );
    assert_eq!(failures, 0, "sessions failed:\n{output}");
    assert!(smtp_ok >= 20 && pop3_ok >= 20, "the load ran: {output}");
    // Every accepted message is in its owner's mailbox, once.
    let mut accepted: HashMap<&str, usize> = HashMap::new();
    for rcpt in output.lines().filter_map(|l| l.strip_prefix("rcpt ")) {
        *accepted.entry(rcpt).or_default() += 1;
    }
    for (user, n) in &accepted {
        assert_eq!(
            delivered(&cluster, user),
            before[*user] + n,
            "{user}: accepted {n} messages"
        );
    }
}
