//! Shared fixtures of the end-to-end proxy tests: a real Dovecot cluster (from the
//! `protobalance_tests` harness), protobalance started as a process on a config written
//! for it, users provisioned through the library's import, and small client helpers.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use protobalance::{
    app::open_directory,
    config::Config,
    directory::{MailboxDirectory as _, Normalizer, import::ImportEntry},
};
use protobalance_tests::{
    ChildGuard, DovecotBackend, DovecotCluster, free_port, python, require_root,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub const BIN: &str = env!("CARGO_BIN_EXE_protobalance");
pub const USERS: usize = 300;
/// The client's own loopback address, so "real client IP" differs from the proxy's.
pub const CLIENT_IP: &str = "127.0.0.77";

/// protobalance running on a config written for `cluster`.
pub struct Edge {
    _guard: ChildGuard,
    /// One address per requested listener, in order.
    pub listeners: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

/// A listener to open: protocol and optional `tls` mode (`starttls`, `implicit`, `none`).
pub struct Listen<'a>(pub &'a str, pub Option<&'a str>);

/// Starts protobalance in front of `cluster` with `listeners`; `extra` is appended to the
/// config (e.g. `[[certificate]]` sections). Users 1..=USERS are provisioned first.
pub fn start_edge(cluster: &DovecotCluster, listeners: &[Listen<'_>], extra: &str) -> Edge {
    start_edge_with(cluster, listeners, extra, |b| backend_section(b, ""))
}

/// The `[[backend]]` section for a harness backend, plus `extra` keys.
pub fn backend_section(b: &DovecotBackend, extra: &str) -> String {
    format!(
        "[[backend]]\nname = \"{}\"\naddress = \"{}\"\npop3_port = {}\nimap_port = {}\nlmtp_port = {}\n{extra}\n",
        b.name(),
        b.ip(),
        b.pop3_port(),
        b.imap_port(),
        b.lmtp_port()
    )
}

/// [`start_edge`], with each `[[backend]]` section written by `backend`.
pub fn start_edge_with(
    cluster: &DovecotCluster,
    listeners: &[Listen<'_>],
    extra: &str,
    backend: impl Fn(&DovecotBackend) -> String,
) -> Edge {
    let sections: Vec<String> = cluster.backends().iter().map(backend).collect();
    start_edge_sections(&sections, listeners, extra)
}

/// Starts protobalance with these `[[backend]]` sections (any kind of backend), the
/// `listeners` and `extra` config; users 1..=USERS are apportioned evenly.
pub fn start_edge_sections(sections: &[String], listeners: &[Listen<'_>], extra: &str) -> Edge {
    start_edge_on(IpAddr::from([127, 0, 0, 1]), sections, listeners, extra)
}

/// [`start_edge_sections`] with the mail listeners on `listen_ip` (e.g. the host end of a
/// test namespace's veth); the admin listener stays on loopback.
pub fn start_edge_on(
    listen_ip: IpAddr,
    sections: &[String],
    listeners: &[Listen<'_>],
    extra: &str,
) -> Edge {
    let dir = tempfile::tempdir().expect("tempdir");
    let lo = IpAddr::from([127, 0, 0, 1]);
    let admin = SocketAddr::new(lo, free_port(lo).expect("port"));
    // A test may bring its own [limits]; otherwise short timeouts keep tests fast.
    let limits = if extra.contains("[limits]") {
        ""
    } else {
        "[limits]\npre_auth_timeout_seconds = 2\nmax_auth_failures = 3\n"
    };
    // Many tests send hostile input on purpose from one address: the reputation engine
    // would end them early. Its own tests bring a [reputation] section.
    let reputation = if extra.contains("[reputation]") {
        ""
    } else {
        "[reputation]\nenabled = false\n"
    };
    let domain = if extra.contains("[[domain]]") {
        ""
    } else {
        "[[domain]]\nname = \"example.com\"\nunknown_mailbox = \"reject\"\n"
    };
    // A test that brings [directory.postgres] shares that database (see start_node).
    let store = if extra.contains("[directory.postgres]") {
        "store = \"postgres\"\n"
    } else {
        ""
    };
    let mut text = format!(
        "[admin]\nlisten = \"{admin}\"\n[shutdown]\ngrace_seconds = 1\n[directory]\npath = \"dir.db\"\n\
         {store}{limits}{reputation}\
         [health]\ninterval_seconds = 1\ntimeout_seconds = 1\nfall = 1\nrise = 1\n\
         {domain}{extra}\n"
    );
    let mut addrs = Vec::new();
    for Listen(protocol, tls) in listeners {
        let addr = SocketAddr::new(listen_ip, free_port(listen_ip).expect("port"));
        let tls = tls.map(|t| format!("tls = \"{t}\"\n")).unwrap_or_default();
        text.push_str(&format!(
            "[[listener]]\nprotocol = \"{protocol}\"\nlisten = \"{addr}\"\n{tls}"
        ));
        addrs.push(addr);
    }
    for section in sections {
        text.push_str(section);
    }
    let path = dir.path().join("pb.toml");
    std::fs::write(&path, text).expect("config");
    let config = Config::load(&path).expect("valid config").config;
    provision(&config);
    let guard = ChildGuard::spawn(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null()),
        "protobalance",
    )
    .expect("spawn");
    wait_healthy(admin);
    Edge {
        _guard: guard,
        listeners: addrs,
        admin,
        config,
        dir,
    }
}

impl Edge {
    /// Stops protobalance (SIGKILL: nothing may depend on a clean exit) and starts it again
    /// on the same config and directory file.
    pub fn restart(&mut self) {
        let path = self.dir.path().join("pb.toml");
        // Dropping the old guard kills the old process before the new one binds the ports.
        let old = std::mem::replace(
            &mut self._guard,
            ChildGuard::spawn(&mut Command::new("true"), "placeholder").expect("spawn true"),
        );
        drop(old);
        self._guard = ChildGuard::spawn(
            Command::new(BIN)
                .arg("run")
                .arg("--config")
                .arg(&path)
                .stdout(Stdio::null()),
            "protobalance",
        )
        .expect("spawn");
        wait_healthy(self.admin);
    }

    /// Kills protobalance (SIGKILL) and leaves it stopped; [`restart`](Self::restart)
    /// starts it again.
    pub fn kill(&mut self) {
        drop(std::mem::replace(
            &mut self._guard,
            ChildGuard::spawn(&mut Command::new("true"), "placeholder").expect("spawn true"),
        ));
    }

    /// protobalance's process id.
    pub fn pid(&self) -> u32 {
        self._guard.id()
    }

    /// protobalance's resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self._guard.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS")
    }
}

/// Imports user1..USERS (apportioned by capacity: 100 each over three equal backends),
/// unless the directory has mailboxes already (a second node on a shared directory).
fn provision(config: &Config) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store = runtime.block_on(open_directory(config)).expect("directory");
    if runtime.block_on(store.mailbox_count()).expect("count") > 0 {
        return;
    }
    let normalizer = Normalizer::default();
    let entries = (1..=USERS)
        .map(|i| ImportEntry {
            mailbox: normalizer
                .normalize(&format!("user{i}@example.com"))
                .expect("address")
                .mailbox,
            backend: None,
        })
        .collect();
    let results = runtime
        .block_on(store.import_entries(entries))
        .expect("import");
    let added = results
        .iter()
        .filter(|r| r.outcome == protobalance::directory::import::EntryOutcome::Added)
        .count();
    assert_eq!(added, USERS);
    let counts: Vec<u64> = runtime
        .block_on(store.backends())
        .expect("backends")
        .iter()
        .map(|b| b.mailboxes)
        .collect();
    let even = USERS as u64 / counts.len() as u64;
    assert!(
        counts.iter().all(|&c| c == even),
        "apportioned evenly over equal capacities: {counts:?}"
    );
}

pub fn get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    Some(response)
}

/// A Python IMAP client: logs `user` in at `addr` and selects INBOX, then sends NOOPs for
/// up to `seconds`. Prints `login <status>`, then `open`, or `closed` as soon as the
/// server ends the session.
pub fn imap_watcher(addr: SocketAddr, user: &str, seconds: u64) -> String {
    let pass = protobalance_tests::password_for(user).expect("password");
    format!(
        r#"
import imaplib, time
m = imaplib.IMAP4("{ip}", {port}, timeout=10)
print("login", m.login("{user}", "{pass}")[0])
try:
    m.select("INBOX")
except Exception:
    pass
end = time.time() + {seconds}
state = "open"
while time.time() < end:
    try:
        m.noop()
    except Exception:
        state = "closed"
        break
    time.sleep(0.1)
print(state)
"#,
        ip = addr.ip(),
        port = addr.port(),
    )
}

/// [`get`] with an API bearer token.
pub fn get_with_token(admin: SocketAddr, path: &str, token: &str) -> Option<String> {
    let mut s = TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    Some(response)
}

fn wait_healthy(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !get(admin, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(
            Instant::now() < deadline,
            "protobalance did not become healthy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn metrics(edge: &Edge) -> String {
    get(edge.admin, "/metrics").expect("metrics")
}

/// The value of the /metrics sample `series` (name and labels exactly as exposed); 0 when
/// there is none yet.
pub fn sample(edge: &Edge, series: &str) -> u64 {
    metrics(edge)
        .lines()
        .find(|l| l.strip_prefix(series).is_some_and(|v| v.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `protobalance_backend_sessions_total` for `backend` and `result` (`fresh`, `reused`,
/// `stale`): how the edge got its delivery sessions there.
pub fn backend_sessions(edge: &Edge, backend: &str, result: &str) -> u64 {
    sample(
        edge,
        &format!(
            "protobalance_backend_sessions_total{{backend=\"{backend}\",result=\"{result}\"}}"
        ),
    )
}

/// Messages `user` has on all the backends of `cluster`.
pub fn delivered(cluster: &DovecotCluster, user: &str) -> usize {
    cluster
        .backends()
        .iter()
        .map(|b| b.message_count(user).expect("count"))
        .sum()
}

/// `protobalance <args> --url <the edge's admin listener>` with API `token`: (exit code,
/// stdout followed by stderr).
pub fn cli(edge: &Edge, token: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--url", &format!("http://{}", edge.admin)])
        .env("PROTOBALANCE_TOKEN", token)
        .output()
        .expect("run protobalance");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Waits up to 2 s for a /metrics line holding all of `parts`; returns it.
pub fn metric_line(edge: &Edge, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let metrics = get(edge.admin, "/metrics").unwrap_or_default();
        if let Some(line) = metrics
            .lines()
            .find(|line| parts.iter().all(|part| line.contains(part)))
        {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no metric with {parts:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The backend that owns `user`, from the directory file the edge uses.
pub fn owner(edge: &Edge, user: &str) -> String {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store = runtime
        .block_on(open_directory(&edge.config))
        .expect("directory");
    let mailbox = Normalizer::default()
        .normalize(user)
        .expect("address")
        .mailbox;
    runtime
        .block_on(store.owner_of(&mailbox))
        .expect("lookup")
        .expect("provisioned")
}

/// `backendN` -> N.
pub fn backend_index(name: &str) -> usize {
    name.trim_start_matches("backend")
        .parse()
        .expect("backendN")
}

/// Delivers a message with `token` in subject and body to `user` on `backend` by LMTP.
pub fn deliver(cluster: &DovecotCluster, backend: &str, user: &str, token: &str) {
    let b = cluster.backend(backend_index(backend)).expect("backend");
    python(&format!(
        "import smtplib\nl=smtplib.LMTP('{}',{})\n\
         l.sendmail('sender@example.net',['{user}'],'Subject: {token}\\r\\n\\r\\nbody {token}\\r\\nline two\\r\\n')\nl.quit()",
        b.ip(),
        b.lmtp_port()
    ))
    .expect("LMTP delivery");
}

/// True when the privileged, Dovecot-backed tests cannot run here (and says why).
pub fn skip(test: &str) -> bool {
    !require_root(test) || !protobalance_tests::dovecot::require_dovecot(test)
}

/// Python prelude that makes every client socket come from CLIENT_IP.
pub fn python_from_client_ip() -> String {
    format!(
        "import socket\norig = socket.create_connection\n\
         socket.create_connection = lambda a, t=None, s=None: orig(a, t, ('{CLIENT_IP}', 0))\n"
    )
}

/// Wraps Python client code so the time it takes is printed to stderr as
/// `elapsed <seconds>`, even when it raises: timing the protocol exchange alone, without
/// the interpreter's start-up.
pub fn timed(code: &str) -> String {
    let body: String = code.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "import sys, time\n_t = time.monotonic()\ntry:\n{body}finally:\n    print('elapsed', time.monotonic() - _t, file=sys.stderr)\n"
    )
}

/// The seconds printed by [`timed`] code, from its output or error text.
pub fn elapsed(text: &str) -> f64 {
    text.split("elapsed ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("no elapsed time in {text}"))
}

/// Logs `user` in through the edge's first two listeners (POP3, then IMAP) from
/// CLIENT_IP and checks both sessions worked; returns the owner's Dovecot log lines of
/// those logins (`pop3-login` and `imap-login` lines naming the user).
pub fn login_pop3_and_imap(cluster: &DovecotCluster, edge: &Edge, user: &str) -> Vec<String> {
    let pass = protobalance_tests::password_for(user).expect("test user");
    let (pop3, imap) = (edge.listeners[0], edge.listeners[1]);
    let out = python(&format!(
        "{}import poplib, imaplib\n\
         p = poplib.POP3('{}', {}, timeout=10); p.user('{user}'); p.pass_('{pass}'); print('pop3', p.stat()); p.quit()\n\
         m = imaplib.IMAP4('{}', {}, timeout=10); m.login('{user}', '{pass}'); print('imap', m.select('INBOX')[0]); m.logout()\n",
        python_from_client_ip(),
        pop3.ip(),
        pop3.port(),
        imap.ip(),
        imap.port()
    ))
    .expect("POP3 and IMAP logins through the edge");
    assert!(
        out.contains("pop3 (0, 0)") && out.contains("imap OK"),
        "{out}"
    );
    let backend = owner(edge, user);
    let owner = cluster
        .backends()
        .iter()
        .find(|b| b.name() == backend)
        .expect("owner");
    let log = std::fs::read_to_string(owner.log_path()).expect("dovecot log");
    log.lines()
        .filter(|l| {
            (l.contains("pop3-login") || l.contains("imap-login"))
                && l.contains(&format!("<{user}>"))
        })
        .map(str::to_owned)
        .collect()
}

/// Runs `protobalance check` on `text` written to `dir`/pb.toml: (success, stderr).
pub fn check_config(dir: &std::path::Path, text: &str) -> (bool, String) {
    let path = dir.join("pb.toml");
    std::fs::write(&path, text).expect("config");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes ca.pem and two leaf certificates (mail.example.test, other.example.test) signed
/// by it; returns the `[[certificate]]` config sections (mail first: the default).
pub fn make_certificates(dir: &std::path::Path) -> String {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "protobalance test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca");
    let mut config = String::new();
    for name in ["mail.example.test", "other.example.test"] {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca).expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
        config.push_str(&format!(
            "[[certificate]]\nnames = [\"{name}\"]\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n",
            dir.display()
        ));
    }
    config
}

/// [`skip`], and also when xmllint (which the API tests validate every answer with) is
/// missing; says why.
pub fn skip_api(test: &str) -> bool {
    if skip(test) {
        return true;
    }
    if Command::new("xmllint").arg("--version").output().is_err() {
        eprintln!("SKIP {test}: xmllint is not installed (libxml2-utils; cargo xtask setup)");
        return true;
    }
    false
}

/// docs/api.xsd, the schema of every XML API document.
pub fn api_xsd() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/api.xsd")
}

/// Asserts that `text` is one document valid against docs/api.xsd (xmllint).
pub fn validate_api_xml(text: &str) {
    let mut child = Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(api_xsd())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("xmllint");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("xmllint output");
    assert!(
        out.status.success(),
        "not valid against docs/api.xsd:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Live upgrade of `edge` (SIGUSR2): waits for the successor to appear and the old process
/// (`old`) to exit, both within 30 s; the successor, killed when dropped.
pub fn upgrade_in_place(edge: &Edge, old: u32) -> KillOnDrop {
    protobalance_tests::process::signal(old, "USR2");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Not looked for among the old process's children: with no session to drain it exits
    // at once, and the successor is re-parented.
    let config = edge.dir.path().join("pb.toml").display().to_string();
    let successor = loop {
        if let Some(pid) = processes_running(&config).into_iter().find(|p| *p != old) {
            break KillOnDrop(pid);
        }
        assert!(Instant::now() < deadline, "no successor process appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    while running(old) {
        assert!(
            Instant::now() < deadline,
            "the old process did not exit after its successor was ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    successor
}

/// Kills a process by pid when dropped (the successor is not our child).
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        protobalance_tests::process::signal(self.0, "KILL");
    }
}

/// protobalance processes whose command line names `config`.
pub fn processes_running(config: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    running(*pid)
                        && protobalance_tests::process::comm(*pid).as_deref()
                            == Some("protobalance")
                        && std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(config))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Alive and not a zombie.
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat.get(stat.rfind(')')? + 2..)?.to_owned();
            rest.chars().next()
        })
        .is_some_and(|state| state != 'Z')
}
