//! Self-test of the Postfix harness: a real Postfix in front of a real Dovecot delivers
//! over LMTP, trusts XCLIENT from loopback, checks passwords with Dovecot SASL, relays
//! only for authenticated clients (to its sink), retries quickly when asked to, and
//! leaves no process behind.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use protobalance_tests::dovecot::require_dovecot;
use protobalance_tests::postfix::instance_pids;
use protobalance_tests::process::output_with_timeout;
use protobalance_tests::{
    BackendOptions, DovecotBackend, MailSink, PostfixBackend, PostfixOptions, free_port,
    password_for, python, require_postfix, user_name,
};

/// Postfix delivers asynchronously; this bounds every wait for mail to arrive.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

fn start(name: &str, ip: &str, options: &PostfixOptions) -> Result<PostfixBackend> {
    let dovecot_options = BackendOptions {
        users: 3,
        auth_listener: true,
        ..BackendOptions::default()
    };
    let dovecot = DovecotBackend::start(name, ip.parse()?, &dovecot_options)?;
    PostfixBackend::start(name, dovecot, options)
}

fn require(test_name: &str) -> bool {
    require_dovecot(test_name) && require_postfix(test_name)
}

/// Sends one message over plain SMTP without AUTH.
fn send(postfix: &PostfixBackend, from: &str, rcpt: &str, subject: &str) -> Result<()> {
    python(&format!(
        r#"
import smtplib
msg = "From: {from}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nhello through Postfix\r\n"
with smtplib.SMTP("{ip}", {port}, timeout=10) as smtp:
    refused = smtp.sendmail("{from}", ["{rcpt}"], msg)
    assert not refused, refused
"#,
        ip = postfix.ip(),
        port = postfix.smtp_port(),
    ))
    .map(drop)
}

/// The messages in `user`'s INBOX once there are `n` of them.
fn wait_for_mail(dovecot: &DovecotBackend, user: &str, n: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while dovecot.message_count(user)? < n {
        if Instant::now() >= deadline {
            bail!("{user} has fewer than {n} messages after {DELIVERY_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let maildir = dovecot.maildir(user)?;
    let mut messages = Vec::new();
    for sub in ["new", "cur"] {
        for entry in std::fs::read_dir(maildir.join(sub))? {
            messages.push(std::fs::read_to_string(entry?.path())?);
        }
    }
    Ok(messages)
}

/// The rest of the line printed as `<key> ...` by a client script.
fn reply<'a>(output: &'a str, key: &str) -> Result<&'a str> {
    output
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
        .with_context(|| format!("no `{key}` line in:\n{output}"))
}

fn xclient_then_send(postfix: &PostfixBackend, rcpt: &str) -> Result<String> {
    python(&format!(
        r#"
import smtplib
smtp = smtplib.SMTP("{ip}", {port}, timeout=10)
smtp.ehlo("tester.example.org")
print("offered", "xclient" in smtp.esmtp_features)
code, text = smtp.docmd("XCLIENT", "ADDR=198.51.100.7 HELO=client.example.net")
print("xclient", code, text.decode())
# XCLIENT restarts the session: Postfix greets again and expects a new EHLO.
smtp.ehlo("client.example.net")
msg = "From: far@example.net\r\nTo: {rcpt}\r\nSubject: via xclient\r\n\r\nhi\r\n"
print("refused", smtp.sendmail("far@example.net", ["{rcpt}"], msg))
smtp.quit()
"#,
        ip = postfix.ip(),
        port = postfix.smtp_port(),
    ))
}

/// AUTH PLAIN with a wrong and then the right password, an authenticated relay to
/// another domain, and the same relay attempt without AUTH on a second connection.
fn auth_and_relay(postfix: &PostfixBackend, user: &str, password: &str) -> Result<String> {
    python(&format!(
        r#"
import base64, smtplib
def plain(user, password):
    return "PLAIN " + base64.b64encode(f"\0{{user}}\0{{password}}".encode()).decode()
msg = "From: {user}\r\nTo: someone@elsewhere.test\r\nSubject: relayed\r\n\r\nout\r\n"
smtp = smtplib.SMTP("{ip}", {port}, timeout=10)
smtp.ehlo("tester.example.org")
print("mechanisms", smtp.esmtp_features.get("auth", ""))
code, text = smtp.docmd("AUTH", plain("{user}", "not-the-password"))
print("wrong", code, text.decode())
code, text = smtp.docmd("AUTH", plain("{user}", "{password}"))
print("right", code, text.decode())
print("refused", smtp.sendmail("{user}", ["someone@elsewhere.test"], msg))
smtp.quit()
anonymous = smtplib.SMTP("{ip}", {port}, timeout=10)
anonymous.ehlo("tester.example.org")
anonymous.mail("stranger@example.net")
code, text = anonymous.rcpt("someone@elsewhere.test")
print("anonymous", code, text.decode())
anonymous.quit()
"#,
        ip = postfix.ip(),
        port = postfix.smtp_port(),
    ))
}

/// Asserts that no process of the instance configured in `config_dir` is left, by
/// environment (every daemon) and by `pgrep -f` (the master's command line).
fn assert_no_process_left(config_dir: &Path, master: u32) -> Result<()> {
    let left = instance_pids(config_dir);
    ensure!(left.is_empty(), "postfix processes left: {left:?}");
    ensure!(
        !Path::new(&format!("/proc/{master}")).exists(),
        "master {master} survived"
    );
    let pgrep = output_with_timeout(
        Command::new("pgrep").arg("-f").arg(config_dir),
        Duration::from_secs(5),
    )?;
    ensure!(
        pgrep.status.code() == Some(1),
        "pgrep -f {} found: {}",
        config_dir.display(),
        String::from_utf8_lossy(&pgrep.stdout)
    );
    Ok(())
}

#[test]
fn postfix_delivers_trusts_xclient_and_relays_only_for_users() -> Result<()> {
    if !require("postfix_delivers_trusts_xclient_and_relays_only_for_users") {
        return Ok(());
    }
    let started = Instant::now();
    let postfix = start("pf-mx", "127.0.1.221", &PostfixOptions::default())?;
    eprintln!("dovecot + postfix ready in {:?}", started.elapsed());
    let (config_dir, master) = (postfix.config_dir(), postfix.pid().context("master pid")?);
    ensure!(
        !instance_pids(&config_dir).is_empty(),
        "no daemon found by MAIL_CONFIG"
    );

    // (a) Mail for a local user is handed to Dovecot over LMTP.
    let user1 = user_name(1);
    send(&postfix, "sender@example.net", &user1, "to the maildir")?;
    let stored = wait_for_mail(postfix.dovecot(), &user1, 1)?;
    ensure!(
        stored[0].contains("Subject: to the maildir"),
        "{}",
        stored[0]
    );

    // (b) XCLIENT from loopback is trusted; the Received header names the given client.
    let user2 = user_name(2);
    let out = xclient_then_send(&postfix, &user2)?;
    assert_eq!(reply(&out, "offered")?, "True");
    ensure!(reply(&out, "xclient")?.starts_with("220 "), "{out}");
    assert_eq!(reply(&out, "refused")?, "{}");
    let stored = wait_for_mail(postfix.dovecot(), &user2, 1)?;
    // Dovecot's own Return-Path, Delivered-To and Received (from Postfix) come first.
    ensure!(
        stored[0]
            .lines()
            .any(|l| l.starts_with("Received: from client.example.net (unknown [198.51.100.7])")),
        "no Received header for the XCLIENT address:\n{}",
        stored[0]
    );

    // (c) Dovecot SASL: a wrong password fails, the right one lets the user relay; a
    // client without AUTH may not relay.
    let password = password_for(&user1).context("user1 is a test user")?;
    let out = auth_and_relay(&postfix, &user1, &password)?;
    ensure!(reply(&out, "mechanisms")?.contains("PLAIN"), "{out}");
    ensure!(reply(&out, "wrong")?.starts_with("535 5.7.8"), "{out}");
    ensure!(reply(&out, "right")?.starts_with("235 2.7.0"), "{out}");
    assert_eq!(reply(&out, "refused")?, "{}");
    assert_eq!(
        reply(&out, "anonymous")?,
        "554 5.7.1 <someone@elsewhere.test>: Relay access denied"
    );
    let relayed = postfix.sink().wait_for_messages(1, DELIVERY_TIMEOUT)?;
    assert_eq!(relayed.len(), 1, "only the authenticated message leaves");
    assert_eq!(relayed[0].mail_from, user1);
    assert_eq!(relayed[0].rcpts, ["someone@elsewhere.test"]);
    ensure!(relayed[0].text().contains("Subject: relayed"));
    postfix.wait_until_queue_empty(DELIVERY_TIMEOUT)?;
    ensure!(postfix.log().contains("sasl_username=user1@example.com"));

    // (d) Dropping the instance stops every one of its processes.
    drop(postfix);
    assert_no_process_left(&config_dir, master)
}

#[test]
fn relay_all_to_retries_quickly_until_the_target_answers() -> Result<()> {
    if !require("relay_all_to_retries_quickly_until_the_target_answers") {
        return Ok(());
    }
    let loopback = IpAddr::from([127, 0, 0, 1]);
    // Reserved but not yet listening: the first delivery attempt is refused.
    let target = SocketAddr::new(loopback, free_port(loopback)?);
    let options = PostfixOptions {
        relay_all_to: Some(target),
        ..PostfixOptions::default()
    }
    .with_fast_retries();
    let postfix = start("pf-sender", "127.0.1.222", &options)?;
    let user1 = user_name(1);
    send(&postfix, "sender@example.net", &user1, "via the target")?;

    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while !postfix.log().contains("status=deferred") {
        ensure!(
            Instant::now() < deadline,
            "never deferred:\n{}",
            postfix.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(postfix.queue_len()?, 1);

    let target = MailSink::start_at(target)?;
    let arrived = Instant::now();
    // Postfix's queue manager now and then skips a message it believes is "still being
    // delivered" and comes back to it much later (see `PostfixBackend::drain`); then the
    // queue is flushed once, the same retry an operator would ask for.
    let relayed = match target.wait_for_messages(1, DELIVERY_TIMEOUT) {
        Ok(relayed) => relayed,
        Err(err) => {
            eprintln!(
                "{err:#}; flushing the queue once:\n{}",
                postfix.log_tail(40)
            );
            postfix.flush()?;
            target.wait_for_messages(1, Duration::from_secs(40))?
        }
    };
    eprintln!("retried within {:?}", arrived.elapsed());
    assert_eq!(relayed[0].rcpts, std::slice::from_ref(&user1));
    postfix.wait_until_queue_empty(DELIVERY_TIMEOUT)?;
    assert_eq!(
        postfix.dovecot().message_count(&user1)?,
        0,
        "LMTP was bypassed"
    );
    ensure!(postfix.sink().messages().is_empty());
    Ok(())
}

#[test]
fn postfix_is_stopped_when_a_test_panics() -> Result<()> {
    if !require("postfix_is_stopped_when_a_test_panics") {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = thread::spawn(move || {
        let postfix =
            start("pf-panicky", "127.0.1.223", &PostfixOptions::default()).expect("postfix starts");
        tx.send((
            postfix.config_dir(),
            postfix.pid(),
            postfix.dir().to_owned(),
        ))
        .expect("send");
        panic!("deliberate panic with a running Postfix");
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (config_dir, master, dir) = rx.recv()?;
    assert_no_process_left(&config_dir, master.context("master pid")?)?;
    if std::env::var("PROTOBALANCE_KEEP_TEST_DIRS").as_deref() != Ok("1") {
        ensure!(!dir.exists(), "{} was not removed", dir.display());
    }
    Ok(())
}

#[test]
fn a_bad_config_is_an_error_that_names_the_problem() -> Result<()> {
    if !require("a_bad_config_is_an_error_that_names_the_problem") {
        return Ok(());
    }
    let options = PostfixOptions {
        extra_main_cf: vec!["inet_interfaces = 192.0.2.250".into()],
        ..PostfixOptions::default()
    };
    let err = start("pf-bad", "127.0.1.224", &options).expect_err("192.0.2.250 is not local");
    let message = format!("{err:#}");
    ensure!(
        message.contains("no local interface found for 192.0.2.250"),
        "{message}"
    );
    Ok(())
}
