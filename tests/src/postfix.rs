//! Real Postfix 3.7 backends for end-to-end tests: each instance is a `master` child with
//! its own directory (config, queue, data, `maillog`) on the loopback IP of the Dovecot
//! backend it owns, which stores its mail (LMTP) and checks its SMTP AUTH (Dovecot SASL
//! over TCP). Mail for other domains goes only to the instance's [`MailSink`]. Dropping
//! the instance stops every process of it, also while a test panics.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::dovecot::PROXY_V2_LOCAL;
use crate::dovecot::{BackendOptions, DovecotBackend};
use crate::mail_sink::MailSink;
use crate::net::free_port;
use crate::postfix_config::{
    PostfixSpec, QueueTimers, prepare_dir, render_main_cf, render_master_cf,
};
use crate::process::{self, ChildGuard, output_with_timeout, stdout_or_error};
use crate::test_dir::TestDir;

/// Run with our own `-c`, never the default /etc/postfix (which has no main.cf here).
pub const POSTFIX_BIN: &str = "/usr/sbin/postfix";
/// The master daemon, started directly: `postfix start-fg` only stays in the foreground
/// as PID 1; otherwise it leaves `master -s` running behind a shell that exits.
pub const MASTER_BIN: &str = "/usr/lib/postfix/sbin/master";
pub const POSTQUEUE_BIN: &str = "/usr/sbin/postqueue";
pub const POSTSUPER_BIN: &str = "/usr/sbin/postsuper";
/// util-linux `script` (package bsdutils, always installed): runs a command on a pty.
const SCRIPT_BIN: &str = "/usr/bin/script";
/// Bound on waiting for the smtpd greeting after spawning the master.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// `postfix check` walks the queue and the packaged file list; generous on a slow CI.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts with a fresh port when another process took it between probe and bind.
const BIND_ATTEMPTS: usize = 3;
const LOG_TAIL_LINES: usize = 30;

/// How an instance differs from the default MX in front of Dovecot.
#[derive(Debug, Clone, Default)]
pub struct PostfixOptions {
    /// How often the queue manager scans the deferred queue (Postfix default 300 s).
    pub queue_run_delay: Option<Duration>,
    /// Shortest wait before retrying a deferred message (default 300 s).
    pub minimal_backoff_time: Option<Duration>,
    /// Longest wait before retrying a deferred message (default 4000 s).
    pub maximal_backoff_time: Option<Duration>,
    /// Relay every message, `@example.com` too, to this SMTP server (e.g. the edge) with
    /// `relayhost` and a catch-all `transport_maps`, instead of LMTP and the sink.
    pub relay_all_to: Option<SocketAddr>,
    /// Extra `main.cf` lines (`name = value`), appended last; each replaces the generated
    /// line for the same parameter.
    pub extra_main_cf: Vec<String>,
    /// smtpd expects a PROXY protocol header first (`smtpd_upstream_proxy_protocol =
    /// haproxy`); the readiness probe then sends a v2 LOCAL header.
    pub haproxy: bool,
}

impl PostfixOptions {
    /// Retries deferred mail within about a second, for tests where this Postfix sends.
    pub fn with_fast_retries(mut self) -> Self {
        let second = Some(Duration::from_secs(1));
        self.queue_run_delay = second;
        self.minimal_backoff_time = second;
        self.maximal_backoff_time = second;
        self
    }
}

/// True if Postfix backends can run here; otherwise prints `SKIP <test>: <reason>`.
pub fn require_postfix(test_name: &str) -> bool {
    let reason = if !Path::new(POSTFIX_BIN).exists() || !Path::new(MASTER_BIN).exists() {
        "postfix is not installed (cargo xtask setup installs it)"
    } else if !process::is_root() {
        "not running as root (Postfix must own its queue as root and run as user postfix)"
    } else {
        return true;
    };
    eprintln!("SKIP {test_name}: {reason}");
    false
}

/// One running Postfix instance and the Dovecot backend behind it.
#[derive(Debug)]
pub struct PostfixBackend {
    name: String,
    ip: IpAddr,
    smtp_port: u16,
    master: Option<ChildGuard>,
    sink: MailSink,
    dovecot: DovecotBackend,
    haproxy: bool,
    // Declared last: dropped after `Drop::drop` has stopped Postfix and Dovecot.
    dir: TestDir,
}

impl PostfixBackend {
    /// Starts an instance in front of `dovecot` (started with `auth_listener: true`) on
    /// the same IP, and waits until its smtpd greets.
    pub fn start(name: &str, dovecot: DovecotBackend, options: &PostfixOptions) -> Result<Self> {
        let ip = dovecot.ip();
        ensure!(
            ip.is_ipv4(),
            "postfix {name}: {ip} is not IPv4 (inet_protocols = ipv4)"
        );
        let sasl_port = dovecot.auth_port().with_context(|| {
            format!("postfix {name}: start the Dovecot backend with `auth_listener: true`")
        })?;
        let dir = TestDir::new(&format!("postfix-{name}"))?;
        prepare_dir(dir.path())?;
        let sink = MailSink::start(IpAddr::from([127, 0, 0, 1]))?;
        let mut backend = Self {
            name: name.to_owned(),
            ip,
            smtp_port: 0,
            master: None,
            sink,
            dovecot,
            haproxy: options.haproxy,
            dir,
        };
        let sasl = SocketAddr::new(ip, sasl_port);
        for attempt in 1..=BIND_ATTEMPTS {
            backend.smtp_port = free_port(ip)?;
            backend.write_config(sasl, options)?;
            if attempt == 1 {
                // Creates the queue directories with Postfix's owners and modes, and
                // reports configuration errors, which the master would not log anywhere.
                backend.postfix_command("check")?;
            }
            match backend.spawn_and_wait() {
                Ok(()) => return Ok(backend),
                // The master's own fatal errors (a failed bind among them) are lost: they
                // happen before its postlogd runs. A port someone else holds now is the
                // tell-tale of losing the race between probe and bind.
                Err(_) if attempt < BIND_ATTEMPTS && port_taken(backend.smtp_addr()) => {}
                Err(err) => return Err(err),
            }
        }
        bail!("postfix {name}: no free port after {BIND_ATTEMPTS} attempts")
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
    pub fn smtp_port(&self) -> u16 {
        self.smtp_port
    }
    pub fn smtp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.smtp_port)
    }
    /// The Dovecot backend that stores `@example.com` mail and checks passwords.
    pub fn dovecot(&self) -> &DovecotBackend {
        &self.dovecot
    }
    /// Where mail for every other domain ends up (unless `relay_all_to` is set).
    pub fn sink(&self) -> &MailSink {
        &self.sink
    }
    /// The instance directory (`conf/`, `queue/`, `data/`, `maillog`, `master.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// The `-c` directory with `main.cf` and `master.cf`.
    pub fn config_dir(&self) -> PathBuf {
        self.dir().join("conf")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("maillog")
    }
    /// The whole mail log so far (every daemon of the instance writes to it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    /// PID of the master process while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.master.as_ref().map(ChildGuard::id)
    }

    /// Messages in any queue (incoming, active, deferred, hold), from `postqueue -j`.
    pub fn queue_len(&self) -> Result<usize> {
        let listing = self.postqueue("-j")?;
        Ok(listing.lines().filter(|l| l.starts_with('{')).count())
    }

    pub fn queue_is_empty(&self) -> Result<bool> {
        Ok(self.queue_len()? == 0)
    }

    /// Releases every message on hold (`postsuper -H ALL`, which moves them to the
    /// deferred queue) and has them delivered now (`postqueue -f`).
    pub fn release_held(&self) -> Result<()> {
        let output = output_with_timeout(
            Command::new(POSTSUPER_BIN)
                .arg("-c")
                .arg(self.config_dir())
                .args(["-H", "ALL"]),
            COMMAND_TIMEOUT,
        )?;
        stdout_or_error(&format!("postsuper -H ALL for {}", self.name), output)?;
        self.postqueue("-f").map(drop)
    }

    /// A sending MTA for tests: a Postfix on `ip` (with a one-user Dovecot there for its
    /// SASL) that relays all mail to `relay_to`, with 1 s retry timers.
    pub fn start_sender(ip: IpAddr, relay_to: SocketAddr) -> Result<Self> {
        let options = PostfixOptions {
            relay_all_to: Some(relay_to),
            ..PostfixOptions::default()
        }
        .with_fast_retries();
        let dovecot = DovecotBackend::start(
            "sender",
            ip,
            &BackendOptions {
                users: 1,
                auth_listener: true,
                ..BackendOptions::default()
            },
        )?;
        Self::start("sender", dovecot, &options)
    }

    /// Waits until the queue is empty. Postfix retries on its own (1 s timers with
    /// `with_fast_retries`), but its queue manager now and then skips a message that is
    /// "still being delivered" and only comes back to it much later: after `patience` the
    /// queue is flushed once (the same retry, just not waited for) and given 40 s more.
    pub fn drain(&self, patience: Duration) -> Result<()> {
        if self.wait_until_queue_empty(patience).is_ok() {
            return Ok(());
        }
        self.flush()?;
        self.wait_until_queue_empty(Duration::from_secs(40))
    }

    /// `postqueue -f`: attempt every deferred message now (what an operator does when
    /// the retry timers are not worth waiting for).
    pub fn flush(&self) -> Result<()> {
        self.postqueue("-f").map(drop)
    }

    /// Waits until every message has left the queue (delivered or bounced).
    pub fn wait_until_queue_empty(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.queue_is_empty()? {
            if Instant::now() >= deadline {
                let queue = self
                    .postqueue("-p")
                    .unwrap_or_else(|err| format!("{err:#}"));
                bail!(
                    "postfix {}: queue not empty after {timeout:?}:\n{queue}\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The last `lines` lines of the mail log and of the master's own output.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for file in ["maillog", "master.log"] {
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

    fn write_config(&self, sasl: SocketAddr, options: &PostfixOptions) -> Result<()> {
        let mut extra = options.extra_main_cf.clone();
        if options.haproxy {
            extra.push("smtpd_upstream_proxy_protocol = haproxy".to_owned());
        }
        let spec = PostfixSpec {
            name: &self.name,
            dir: self.dir(),
            ip: self.ip,
            smtp_port: self.smtp_port,
            lmtp: self.dovecot.lmtp_addr(),
            sasl,
            relayhost: self.sink.addr(),
            relay_all_to: options.relay_all_to,
            timers: QueueTimers {
                queue_run_delay: options.queue_run_delay,
                minimal_backoff_time: options.minimal_backoff_time,
                maximal_backoff_time: options.maximal_backoff_time,
            },
            extra_main_cf: &extra,
        };
        let conf = self.config_dir();
        std::fs::write(conf.join("main.cf"), render_main_cf(&spec)?).context("writing main.cf")?;
        std::fs::write(
            conf.join("master.cf"),
            render_master_cf(self.ip, self.smtp_port)?,
        )
        .context("writing master.cf")
    }

    /// Runs `postfix -c <conf> <verb>` under `script`, in a pseudo-terminal: Postfix
    /// commands print their errors only to a terminal, and before the instance's postlogd
    /// runs they reach no log file either. As root, a non-default `-c` needs no
    /// `alternate_config_directories` entry in /etc/postfix/main.cf (which has none here).
    fn postfix_command(&self, verb: &str) -> Result<String> {
        let what = format!("postfix {verb} for {}", self.name);
        let conf = shell_quote(&self.config_dir().to_string_lossy());
        let mut output = output_with_timeout(
            Command::new(SCRIPT_BIN)
                .args(["-q", "-e", "-c"])
                .arg(format!("{POSTFIX_BIN} -c {conf} {verb}"))
                .arg("/dev/null"),
            COMMAND_TIMEOUT,
        )?;
        // The pty turns every "\n" into "\r\n".
        let stdout = String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n");
        output.stdout = stdout.into_bytes();
        stdout_or_error(&what, output)
    }

    fn postqueue(&self, flag: &str) -> Result<String> {
        let output = output_with_timeout(
            Command::new(POSTQUEUE_BIN)
                .arg("-c")
                .arg(self.config_dir())
                .arg(flag),
            COMMAND_TIMEOUT,
        )?;
        stdout_or_error(&format!("postqueue {flag} for {}", self.name), output)
    }

    /// Spawns the master, which stays in the foreground (only `-w` would fork) and makes
    /// itself a session and process-group leader; `-s` keeps its stdout open. Then waits
    /// for the smtpd greeting.
    fn spawn_and_wait(&mut self) -> Result<()> {
        let out = File::create(self.dir().join("master.log")).context("creating master.log")?;
        let err = out.try_clone().context("cloning master.log")?;
        let mut cmd = Command::new(MASTER_BIN);
        cmd.arg("-c")
            .arg(self.config_dir())
            .arg("-s")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.master = Some(ChildGuard::spawn(
            &mut cmd,
            format!("postfix {}", self.name),
        )?);
        self.wait_ready().map_err(|err| {
            let tail = self.log_tail(LOG_TAIL_LINES);
            self.stop();
            let keep = crate::test_dir::KEEP_ENV;
            // The master's own errors before its postlogd starts reach no log file.
            anyhow!(
                "postfix {} on {}: {err:#} (set {keep}=1 to keep {}; `postfix -c <conf> start` \
                 in a terminal shows the master's startup errors)\n{tail}",
                self.name,
                self.smtp_addr(),
                self.dir().display()
            )
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = self.smtp_addr();
        let haproxy = self.haproxy;
        let master = self.master.as_mut().context("postfix master not spawned")?;
        loop {
            if let Some(status) = master.wait_timeout(Duration::ZERO)? {
                bail!("master exited during startup ({status})");
            }
            if smtp_greets(addr, haproxy) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("no 220 greeting from {addr} within {START_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops Postfix (SIGTERM to the master, which passes it to its whole process group),
    /// then kills whatever process of this instance is left after 5 s. The Dovecot
    /// backend keeps running until the instance is dropped. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        process::signal(master.id(), "TERM");
        if !matches!(master.wait_timeout(STOP_TIMEOUT), Ok(Some(_))) {
            eprintln!(
                "warning: postfix {} master ignored SIGTERM; killing",
                self.name
            );
        }
        drop(master);
        stop_instance_processes(&self.config_dir(), STOP_TIMEOUT);
    }
}

impl Drop for PostfixBackend {
    fn drop(&mut self) {
        // The Dovecot backend stops in its own drop, after Postfix no longer delivers to it.
        self.stop();
    }
}

/// PIDs of processes that belong to the instance configured in `config_dir`. Every
/// Postfix program run with `-c` has `MAIL_CONFIG=<config_dir>` in its environment
/// (the master exports it to its daemons), while only the master shows the directory on
/// its command line; so this finds daemons that `pgrep -f <dir>` would miss.
pub fn instance_pids(config_dir: &Path) -> Vec<u32> {
    process::pids_with_env(&format!("MAIL_CONFIG={}", config_dir.display()))
}

/// Waits up to `timeout` for the instance's processes to exit, then SIGKILLs the rest.
fn stop_instance_processes(config_dir: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = instance_pids(config_dir);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for pid in left {
                eprintln!("warning: postfix process {pid} outlived its master; killing");
                process::signal(pid, "KILL");
            }
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `text` as one single-quoted `sh` word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// True when another socket holds `addr` (binding it fails with "address in use").
fn port_taken(addr: SocketAddr) -> bool {
    matches!(TcpListener::bind(addr), Err(err) if err.kind() == ErrorKind::AddrInUse)
}

/// True when `addr` sends an SMTP `220` greeting (then says QUIT); `haproxy`: after a
/// PROXY v2 LOCAL header.
fn smtp_greets(addr: SocketAddr, haproxy: bool) -> bool {
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
    let greeted = matches!(read, Ok(n) if buf[..n].starts_with(b"220 "));
    // The probe is done either way; a failed QUIT only leaves a log line in smtpd.
    let _ = stream.write_all(b"QUIT\r\n");
    greeted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
