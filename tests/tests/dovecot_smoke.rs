//! Smoke tests for the harness itself: real Dovecot backends answer real Python
//! clients, and test namespaces carry TCP and disappear on drop.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use protobalance_tests::dovecot::{DovecotBackend, require_dovecot};
use protobalance_tests::netns::{link_exists, netns_exists};
use protobalance_tests::process::child_pids;
use protobalance_tests::{
    BackendOptions, ChildGuard, DovecotCluster, NetNs, TestSubnet, Veth, password_for, python,
    require_root, user_name,
};

fn deliver_by_lmtp(backend: &DovecotBackend, rcpt: &str, subject: &str, body: &str) -> Result<()> {
    python(&format!(
        r#"
import smtplib
msg = "From: sender@example.net\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
with smtplib.LMTP("{ip}", {port}) as lmtp:
    refused = lmtp.sendmail("sender@example.net", ["{rcpt}"], msg)
    assert not refused, refused
"#,
        ip = backend.ip(),
        port = backend.lmtp_port(),
    ))
    .map(drop)
}

/// Logs in with USER/PASS and prints the first message, or `REJECTED` if PASS fails.
fn pop3_retrieve_first(backend: &DovecotBackend, user: &str, password: &str) -> Result<String> {
    python(&format!(
        r#"
import poplib
pop = poplib.POP3("{ip}", {port}, timeout=10)
pop.user("{user}")
try:
    pop.pass_("{password}")
except poplib.error_proto as err:
    print("REJECTED", err)
else:
    print("\n".join(line.decode() for line in pop.retr(1)[1]))
pop.quit()
"#,
        ip = backend.ip(),
        port = backend.pop3_port(),
    ))
}

fn imap_inbox_count(backend: &DovecotBackend, user: &str, password: &str) -> Result<usize> {
    let out = python(&format!(
        r#"
import imaplib
imap = imaplib.IMAP4("{ip}", {port}, timeout=10)
imap.login("{user}", "{password}")
typ, data = imap.select("INBOX", readonly=True)
assert typ == "OK", (typ, data)
print(int(data[0]))
imap.logout()
"#,
        ip = backend.ip(),
        port = backend.imap_port(),
    ))?;
    out.trim()
        .parse()
        .with_context(|| format!("IMAP count in {out:?}"))
}

#[test]
fn lmtp_delivery_is_read_back_over_pop3_and_imap() -> Result<()> {
    if !require_dovecot("lmtp_delivery_is_read_back_over_pop3_and_imap") {
        return Ok(());
    }
    let started = Instant::now();
    let cluster = DovecotCluster::start(3, 2000)?;
    eprintln!(
        "3 backends with 2000 users each ready in {:?}",
        started.elapsed()
    );
    let (backend1, backend2) = (cluster.backend(1)?, cluster.backend(2)?);
    let user = user_name(42);
    let password = password_for(&user).context("user42 is a test user")?;
    let subject = format!("smoke test {}", std::process::id());

    deliver_by_lmtp(backend2, &user, &subject, "hello through LMTP")?;
    let message = pop3_retrieve_first(backend2, &user, &password)?;
    ensure!(
        message.contains(&format!("Subject: {subject}")),
        "subject missing in:\n{message}"
    );
    ensure!(
        message.contains("hello through LMTP"),
        "body missing in:\n{message}"
    );

    assert_eq!(imap_inbox_count(backend2, &user, &password)?, 1);
    assert_eq!(backend2.message_count(&user)?, 1);
    // The master user reads any mailbox (what a mailbox move logs in with); a wrong
    // master password is refused.
    let as_master = format!("{user}*{}", protobalance_tests::MASTER_USER);
    assert_eq!(
        imap_inbox_count(backend2, &as_master, protobalance_tests::MASTER_PASSWORD)?,
        1
    );
    ensure!(
        imap_inbox_count(backend2, &as_master, "wrong").is_err(),
        "a wrong master password logs in"
    );
    assert_eq!(
        backend1.message_count(&user)?,
        0,
        "backend1 must not have the message"
    );

    let wrong = pop3_retrieve_first(backend2, &user, "not-the-password")?;
    ensure!(
        wrong.starts_with("REJECTED"),
        "wrong password accepted:\n{wrong}"
    );
    let stopping = Instant::now();
    drop(cluster);
    eprintln!("3 backends stopped in {:?}", stopping.elapsed());
    Ok(())
}

#[test]
fn backend_on_caller_address_trusts_caller_networks() -> Result<()> {
    if !require_dovecot("backend_on_caller_address_trusts_caller_networks") {
        return Ok(());
    }
    let options = BackendOptions {
        users: 3,
        trusted_networks: vec!["198.51.100.0/24".into()],
        ..Default::default()
    };
    let cluster = DovecotCluster::start_with(&[IpAddr::V6(Ipv6Addr::LOCALHOST)], &options)?;
    let backend = cluster.backend(1)?;
    let config = std::fs::read_to_string(backend.config_path())?;
    ensure!(config.contains("login_trusted_networks = 127.0.0.0/8 ::1 198.51.100.0/24"));
    assert_eq!(imap_inbox_count(backend, "user3@example.com", "pass3")?, 0);
    Ok(())
}

#[test]
fn backend_is_stopped_when_a_test_panics() -> Result<()> {
    if !require_dovecot("backend_is_stopped_when_a_test_panics") {
        return Ok(());
    }
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let options = BackendOptions {
            users: 1,
            ..Default::default()
        };
        let backend =
            DovecotBackend::start("panicky", "127.0.1.200".parse().expect("ip"), &options)
                .expect("backend starts");
        pid_tx
            .send((backend.pid(), backend.dir().to_owned()))
            .expect("send pid");
        panic!("deliberate panic with a running backend");
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (pid, dir) = pid_rx.recv()?;
    let pid = pid.context("backend had a master pid")?;
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "master {pid} survived"
    );
    assert!(child_pids(pid).is_empty(), "children of {pid} survived");
    if std::env::var("PROTOBALANCE_KEEP_TEST_DIRS").as_deref() != Ok("1") {
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
    Ok(())
}

/// Starts a one-shot TCP server inside `ns` on `ip`; returns it and its port.
fn serve_once_in(ns: &NetNs, ip: IpAddr) -> Result<(ChildGuard, u16)> {
    let script = format!(
        r#"
import socket
srv = socket.create_server(("{ip}", 0), family=socket.AF_INET6 if ":" in "{ip}" else socket.AF_INET)
print(srv.getsockname()[1], flush=True)
conn, peer = srv.accept()
conn.sendall(b"hello from the namespace\n")
conn.close()
"#
    );
    let mut cmd = ns.command("python3", ["-c", &script]);
    cmd.stdout(Stdio::piped());
    let mut server = ns.spawn(&mut cmd)?;
    let stdout = server
        .child_mut()
        .stdout
        .take()
        .context("listener stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port = line
        .trim()
        .parse()
        .with_context(|| format!("listener port from {line:?}"))?;
    Ok((server, port))
}

fn fetch_greeting(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut greeting = String::new();
    stream.read_to_string(&mut greeting)?;
    Ok(greeting)
}

#[test]
fn namespace_veth_carries_tcp_and_is_removed_on_drop() -> Result<()> {
    if !require_root("namespace_veth_carries_tcp_and_is_removed_on_drop") {
        return Ok(());
    }
    let ns = NetNs::new("smoke")?;
    let veth = Veth::with_unique_name(&ns, "eth0")?;
    let subnet = TestSubnet::next()?;
    subnet.assign(&veth)?;
    veth.up()?;
    let (ns_name, host_if) = (ns.name().to_owned(), veth.host_ifname().to_owned());

    for ip in [IpAddr::V4(subnet.ns_v4), IpAddr::V6(subnet.ns_v6)] {
        let (_server, port) = serve_once_in(&ns, ip)?;
        assert_eq!(
            fetch_greeting(SocketAddr::new(ip, port))?,
            "hello from the namespace\n"
        );
    }

    drop(veth);
    drop(ns);
    assert!(!netns_exists(&ns_name)?, "namespace {ns_name} left behind");
    assert!(!link_exists(&host_if), "link {host_if} left behind");
    Ok(())
}

#[test]
fn namespace_is_removed_when_a_test_panics() -> Result<()> {
    if !require_root("namespace_is_removed_when_a_test_panics") {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let ns = NetNs::new("panic").expect("namespace");
        let veth = Veth::with_unique_name(&ns, "eth0").expect("veth");
        tx.send((ns.name().to_owned(), veth.host_ifname().to_owned()))
            .expect("send names");
        panic!("deliberate panic with a namespace and a veth");
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (ns_name, host_if) = rx.recv()?;
    assert!(!netns_exists(&ns_name)?, "namespace {ns_name} left behind");
    assert!(!link_exists(&host_if), "link {host_if} left behind");
    Ok(())
}
