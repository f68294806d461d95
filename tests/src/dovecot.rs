//! Real Dovecot 2.3 backends for end-to-end tests: each instance is a `dovecot -F`
//! child with its own directory (config, base_dir, passwd-file, maildirs, log) and its
//! own IP, stopped on drop (SIGTERM, then SIGKILL) so no process outlives the test.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub use crate::dovecot_cluster::{DovecotCluster, loopback_ip};
use crate::dovecot_config::{InstanceSpec, TlsListeners, render_config, write_users_file};
pub use crate::dovecot_config::{MailOwner, Ports, TEST_DOMAIN, password_for, user_name};
use crate::net::free_ports;
use crate::process::{self, wait_child};
use crate::test_dir::TestDir;

/// The packaged binary; always run with our own `-c`, never the default /etc/dovecot.
pub const DOVECOT_BIN: &str = "/usr/sbin/dovecot";
/// The master user every test backend has (`user@example.com*admin`): what a mailbox move
/// logs in with.
pub const MASTER_USER: &str = "admin";
pub const MASTER_PASSWORD: &str = "master-secret-for-tests";

/// Bound on waiting for all three listeners after spawning the master.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts with fresh ports when another process took one between probe and bind.
const BIND_ATTEMPTS: usize = 3;
const LOG_TAIL_LINES: usize = 30;

/// What every backend of a cluster is configured with.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Number of test users `user1@example.com..user<users>@example.com`.
    pub users: usize,
    /// Extra networks (CIDR) trusted for XCLIENT / ID x-originating-ip / PROXY, on top
    /// of `127.0.0.0/8 ::1`.
    pub trusted_networks: Vec<String>,
    /// POP3 and IMAP expect a PROXY protocol v2 header first (Dovecot `haproxy = yes`).
    pub haproxy: bool,
    /// PEM certificate and key for implicit-TLS POP3S/IMAPS listeners on free ports.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Fixed ports instead of free ones (the demo cluster's well-known addresses). A bind
    /// failure is then an error, not a retry.
    pub fixed_ports: Option<Ports>,
    /// An auth inet listener on a free port, so Postfix can authenticate SMTP clients with
    /// Dovecot SASL over TCP (`smtpd_sasl_path = inet:<ip>:<auth_port>`). Also turns off
    /// Dovecot's per-IP auth penalty on this backend (see `write_auth_listener`).
    pub auth_listener: bool,
    /// No per-IP auth penalty (2, 4, 8… s after failed logins from one client address):
    /// for tests that make many failed logins on purpose.
    pub no_auth_penalty: bool,
}

/// True if Dovecot backends can run here; otherwise prints `SKIP <test>: <reason>`.
pub fn require_dovecot(test_name: &str) -> bool {
    let reason = if !Path::new(DOVECOT_BIN).exists() {
        "dovecot is not installed (dovecot-core dovecot-pop3d dovecot-imapd dovecot-lmtpd)"
    } else if !process::is_root() {
        "not running as root (Dovecot must switch to the unprivileged mail user)"
    } else {
        return true;
    };
    eprintln!("SKIP {test_name}: {reason}");
    false
}

/// One running Dovecot instance.
#[derive(Debug)]
pub struct DovecotBackend {
    name: String,
    ip: IpAddr,
    ports: Ports,
    /// POP3/IMAP listeners expect a PROXY protocol header.
    haproxy: bool,
    /// POP3S and IMAPS ports, when started with a certificate.
    tls_ports: Option<(u16, u16)>,
    /// The Dovecot SASL (auth client) port, when started with `auth_listener`.
    auth_port: Option<u16>,
    master: Option<Child>,
    // Declared last: dropped after `Drop::drop` has stopped the master.
    dir: TestDir,
}

impl DovecotBackend {
    /// Starts an instance listening on `ip` and waits until LMTP, POP3 and IMAP accept
    /// connections.
    pub fn start(name: &str, ip: IpAddr, options: &BackendOptions) -> Result<Self> {
        let dir = TestDir::new(&format!("dovecot-{name}"))?;
        let owner = MailOwner::lookup()?;
        prepare_dir(dir.path(), owner, options.users)?;
        let ports = Ports {
            lmtp: 0,
            pop3: 0,
            imap: 0,
        };
        let mut backend = Self {
            name: name.to_owned(),
            ip,
            ports,
            haproxy: options.haproxy,
            tls_ports: None,
            auth_port: None,
            master: None,
            dir,
        };
        for attempt in 1..=BIND_ATTEMPTS {
            match backend.launch(owner, options) {
                Ok(()) => return Ok(backend),
                Err(_)
                    if attempt < BIND_ATTEMPTS
                        && options.fixed_ports.is_none()
                        && backend.log_contains("Address already in use") =>
                {
                    continue;
                }
                Err(err) => return Err(err),
            }
        }
        bail!("dovecot {name}: no free ports after {BIND_ATTEMPTS} attempts")
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
    pub fn lmtp_port(&self) -> u16 {
        self.ports.lmtp
    }
    pub fn pop3_port(&self) -> u16 {
        self.ports.pop3
    }
    pub fn imap_port(&self) -> u16 {
        self.ports.imap
    }
    /// The implicit-TLS POP3 port (0 without a certificate).
    pub fn pop3s_port(&self) -> u16 {
        self.tls_ports.map_or(0, |(pop3s, _)| pop3s)
    }
    /// The implicit-TLS IMAP port (0 without a certificate).
    pub fn imaps_port(&self) -> u16 {
        self.tls_ports.map_or(0, |(_, imaps)| imaps)
    }
    /// The Dovecot SASL port for Postfix (`None` unless started with `auth_listener`).
    pub fn auth_port(&self) -> Option<u16> {
        self.auth_port
    }
    pub fn lmtp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports.lmtp)
    }
    pub fn pop3_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports.pop3)
    }
    pub fn imap_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports.imap)
    }
    /// The instance directory (config, `run/`, `users`, `mail/`, `dovecot.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("dovecot.conf")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("dovecot.log")
    }
    /// PID of the master process while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.master.as_ref().map(Child::id)
    }

    /// The INBOX maildir of `user` (`user42@example.com`).
    pub fn maildir(&self, user: &str) -> Result<PathBuf> {
        let (local, domain) = user.split_once('@').context("user must be local@domain")?;
        let home = self
            .dir()
            .join("mail")
            .join(domain.to_lowercase())
            .join(local.to_lowercase());
        Ok(home.join("Maildir"))
    }

    /// Messages stored in `user`'s INBOX on disk (`new/` + `cur/`); 0 if never delivered.
    pub fn message_count(&self, user: &str) -> Result<usize> {
        let maildir = self.maildir(user)?;
        let mut count = 0;
        for sub in ["new", "cur"] {
            let path = maildir.join(sub);
            match std::fs::read_dir(&path) {
                Ok(entries) => count += entries.count(),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
            }
        }
        Ok(count)
    }

    /// The last `lines` lines of the Dovecot log and of the master's stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for file in ["dovecot.log", "stderr.log"] {
            let text = std::fs::read_to_string(self.dir().join(file)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {file} ---\n"));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn log_contains(&self, needle: &str) -> bool {
        self.log_tail(LOG_TAIL_LINES).contains(needle)
    }

    /// One attempt: fresh ports, config, spawn, wait for listeners.
    fn launch(&mut self, owner: MailOwner, options: &BackendOptions) -> Result<()> {
        let trusted_networks = &options.trusted_networks;
        // Every port of one instance comes from one call, so no two listeners collide.
        let fresh = free_ports(self.ip, 5 + usize::from(options.auth_listener))?;
        if options.tls.is_some() {
            self.tls_ports = Some((fresh[3], fresh[4]));
        }
        self.auth_port = options.auth_listener.then(|| fresh[5]);
        self.ports = match options.fixed_ports {
            Some(ports) => ports,
            None => Ports {
                lmtp: fresh[0],
                pop3: fresh[1],
                imap: fresh[2],
            },
        };
        let spec =
            InstanceSpec {
                name: &self.name,
                dir: self.dir(),
                ip: self.ip,
                ports: self.ports,
                owner,
                trusted_networks,
                haproxy: self.haproxy,
                tls: options.tls.as_ref().zip(self.tls_ports).map(
                    |((cert, key), (pop3s, imaps))| TlsListeners {
                        cert,
                        key,
                        pop3s,
                        imaps,
                    },
                ),
                auth_port: self.auth_port,
                no_auth_penalty: options.no_auth_penalty,
            };
        let config_path = self.config_path();
        std::fs::write(&config_path, render_config(&spec)?).context("writing dovecot.conf")?;
        self.spawn_and_wait()
    }

    /// Starts a stopped instance again with the same config and ports: a backend that
    /// comes back after an outage. A running instance is left alone.
    pub fn restart(&mut self) -> Result<()> {
        if self.master.is_some() {
            return Ok(());
        }
        self.spawn_and_wait()
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let config_path = self.config_path();
        let stderr = File::create(self.dir().join("stderr.log")).context("creating stderr.log")?;
        // A fresh log per attempt, so a retry is not confused by the last attempt's errors.
        File::create(self.log_path()).context("creating dovecot.log")?;
        let child = crate::process::server_session(&mut Command::new(DOVECOT_BIN))
            .arg("-F")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {DOVECOT_BIN}"))?;
        self.master = Some(child);
        self.wait_ready().map_err(|err| {
            self.stop();
            let tail = self.log_tail(LOG_TAIL_LINES);
            let keep = crate::test_dir::KEEP_ENV;
            anyhow!(
                "dovecot {} on {}: {err:#} (set {keep}=1 to keep {})\n{tail}",
                self.name,
                self.ip,
                self.dir().display()
            )
        })
    }

    /// Waits until every listener sends its greeting; Dovecot's login processes greet
    /// only once the auth service is up, so a greeting means logins will work.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pending = vec![
            (self.lmtp_addr(), "220 ", false),
            (self.pop3_addr(), "+OK", self.haproxy),
            (self.imap_addr(), "* OK", self.haproxy),
        ];
        let master = self.master.as_mut().context("dovecot master not spawned")?;
        loop {
            if let Some(status) = master.try_wait().context("try_wait on dovecot")? {
                bail!("dovecot exited during startup ({status})");
            }
            pending.retain(|(addr, greeting, haproxy)| !greets(*addr, greeting, *haproxy));
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("no greeting from {pending:?} within {START_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the instance: SIGTERM to the master, its login processes and its log
    /// process; SIGKILL to whatever still runs after 5 s. Idempotent. Without the direct
    /// SIGTERMs the master waits about 1 s for the log process to drain, and up to 6 s
    /// for login processes that are still starting.
    pub fn stop(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        let pid = master.id();
        let children = process::child_pids(pid);
        process::signal(pid, "TERM");
        for child in &children {
            if process::comm(child.pid)
                .is_some_and(|name| name.ends_with("-login") || name == "log")
            {
                process::signal(child.pid, "TERM");
            }
        }
        if !matches!(wait_child(&mut master, STOP_TIMEOUT), Ok(Some(_))) {
            eprintln!(
                "warning: dovecot {} (pid {pid}) ignored SIGTERM; killing",
                self.name
            );
            process::reap_orphans(&process::child_pids(pid), Duration::ZERO);
            // Errors mean it already exited; there is nothing else to clean up.
            let _ = master.kill();
            let _ = master.wait();
        }
        process::reap_orphans(&children, STOP_TIMEOUT);
    }
}

impl Drop for DovecotBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The PROXY protocol v2 header of a LOCAL connection (no client behind it).
/// PROXY protocol v2, LOCAL command, no addresses (a health check's header).
pub(crate) const PROXY_V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

fn greets(addr: SocketAddr, greeting: &str, haproxy: bool) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    if haproxy && stream.write_all(PROXY_V2_LOCAL).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let read = stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .and_then(|()| stream.read(&mut buf));
    matches!(read, Ok(n) if buf[..n].starts_with(greeting.as_bytes()))
}

/// Writes the passwd-file and creates `mail/`, owned by the unprivileged mail user.
fn prepare_dir(dir: &Path, owner: MailOwner, users: usize) -> Result<()> {
    write_users_file(&dir.join("users"), users, owner)?;
    std::fs::write(
        dir.join("masters"),
        format!("{MASTER_USER}:{MASTER_PASSWORD}\n"),
    )
    .context("writing the master users file")?;
    let mail = dir.join("mail");
    std::fs::create_dir(&mail).with_context(|| format!("creating {}", mail.display()))?;
    chown(&mail, Some(owner.uid), Some(owner.gid))
        .with_context(|| format!("chown {}", mail.display()))
}
