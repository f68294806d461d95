//! Real content scanners for tests: clamd (Debian's clamav-daemon) with a signature
//! database the test writes itself — the official databases come from the Internet, which
//! these machines cannot reach — and rspamd (Debian's rspamd) with a local configuration
//! that makes no network look-ups. Both listen on loopback or a socket in a temp directory
//! and are stopped on drop.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{ChildGuard, test_dir::TestDir};

pub const CLAMD: &str = "/usr/sbin/clamd";
pub const RSPAMD: &str = "/usr/bin/rspamd";

/// The EICAR anti-virus test file (68 bytes): every scanner's harmless "virus".
pub const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// True if `binary` is installed; otherwise prints `SKIP <test>: <reason>`.
pub fn require_scanner(test: &str, binary: &str, package: &str) -> bool {
    if Path::new(binary).exists() {
        return true;
    }
    eprintln!("SKIP {test}: {binary} is not installed (Debian package {package})");
    false
}

/// A clamd on a Unix socket, knowing one signature: EICAR (`Eicar-Test-Signature`).
pub struct ClamdServer {
    guard: Option<ChildGuard>,
    dir: TestDir,
}

impl ClamdServer {
    pub fn start() -> Result<Self> {
        let dir = TestDir::new("clamd")?;
        let db = dir.path().join("db");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&db)?;
        std::fs::create_dir_all(&tmp)?;
        // An extended signature (.ndb): name, any file type, any offset, the bytes in hex.
        let hex: String = EICAR.bytes().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            db.join("protobalance-test.ndb"),
            format!("Eicar-Test-Signature:0:*:{hex}\n"),
        )?;
        let socket = dir.path().join("clamd.sock");
        let config = dir.path().join("clamd.conf");
        std::fs::write(
            &config,
            format!(
                "Foreground yes\nLocalSocket {}\nDatabaseDirectory {}\nTemporaryDirectory {}\n\
                 LogFile {}\nPidFile {}\nStreamMaxLength 64M\nMaxScanSize 64M\n\
                 MaxFileSize 64M\nLogVerbose yes\n",
                socket.display(),
                db.display(),
                tmp.display(),
                dir.path().join("clamd.log").display(),
                dir.path().join("clamd.pid").display(),
            ),
        )?;
        let guard = ChildGuard::spawn(
            Command::new(CLAMD)
                .arg("--config-file")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "clamd",
        )?;
        let mut server = Self {
            guard: Some(guard),
            dir,
        };
        server.wait_ready(Duration::from_secs(60))?;
        Ok(server)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("clamd.sock")
    }

    fn wait_ready(&mut self, patience: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if ping(&self.socket()).unwrap_or(false) {
                return Ok(());
            }
            if let Some(guard) = self.guard.as_mut()
                && let Some(status) = guard.wait_timeout(Duration::ZERO)?
            {
                bail!("clamd exited ({status}): {}", self.log());
            }
            if started.elapsed() > patience {
                bail!(
                    "clamd did not answer PING within {patience:?}: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// clamd's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("clamd.log")).unwrap_or_default()
    }

    /// Stops clamd (the socket then refuses connections).
    pub fn stop(&mut self) {
        drop(self.guard.take());
        let _ = std::fs::remove_file(self.socket());
    }
}

fn ping(socket: &Path) -> Result<bool> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"zPING\0")?;
    let mut answer = [0u8; 5];
    stream.read_exact(&mut answer).context("clamd answer")?;
    Ok(&answer[..4] == b"PONG")
}

impl Drop for ClamdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Modules of Debian's rspamd that look things up on the network (DNS lists, remote maps,
/// fuzzy storage, redis) or need the client's reverse DNS: all off, so the test rspamd
/// never sends a packet beyond loopback (checked with strace when this was written).
const RSPAMD_NETWORK_MODULES: [&str; 35] = [
    "antivirus",
    "arc",
    "asn",
    "bimi",
    "clickhouse",
    "dcc",
    "dkim",
    "dkim_signing",
    "dmarc",
    "elastic",
    "emails",
    "external_services",
    "fuzzy_check",
    "greylist",
    "hfilter",
    "history_redis",
    "metadata_exporter",
    "metric_exporter",
    "mid",
    "multimap",
    "mx_check",
    "neural",
    "once_received",
    "p0f",
    "phishing",
    "ratelimit",
    "rbl",
    "replies",
    "reputation",
    "rspamd_update",
    "spamtrap",
    "spf",
    "surbl",
    "url_redirector",
    "whitelist",
];

/// Our own top-level config: Debian's common settings, one normal worker on loopback (no
/// controller, proxy or fuzzy worker), state and logs in the test's directory.
const RSPAMD_CONF: &str = r#".include "$CONFDIR/common.conf"
options {
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/options.inc"
}
logging {
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    .include "$CONFDIR/logging.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/logging.inc"
}
worker "normal" {
    bind_socket = "127.0.0.1:${PORT}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}
"#;

/// Only filters that need no network; DNS goes to a loopback port nothing listens on (and
/// /etc/resolv.conf is never consulted); no "is this list alive" monitoring.
const RSPAMD_OPTIONS: &str = r#"filters = "chartable,regexp";
dns {
    nameserver = ["127.0.0.1:${DNSPORT}"];
    timeout = 1s;
    retransmits = 1;
}
disable_monitoring = true;
hs_cache_dir = "${HSCACHEDIR}/";
"#;

/// MIME type checks from the packaged map only (not https://maps.rspamd.com).
const RSPAMD_MIME_TYPES: &str = "file = [\"${CONFDIR}/maps.d/mime_types.inc\"];\n";

/// A real rspamd (normal worker) on a loopback port, answering `/checkv2`. GTUBE comes back
/// as `reject`, a short plain-text message as `no action`.
pub struct RspamdServer {
    guard: Option<ChildGuard>,
    dir: TestDir,
    addr: std::net::SocketAddr,
}

impl RspamdServer {
    pub fn start() -> Result<Self> {
        let dir = TestDir::new("rspamd")?;
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(conf.join("local.d"))?;
        std::fs::create_dir_all(conf.join("override.d"))?;
        std::fs::write(conf.join("rspamd.conf"), RSPAMD_CONF)?;
        std::fs::write(conf.join("local.d/options.inc"), RSPAMD_OPTIONS)?;
        std::fs::write(conf.join("override.d/mime_types.conf"), RSPAMD_MIME_TYPES)?;
        for module in RSPAMD_NETWORK_MODULES {
            std::fs::write(
                conf.join("local.d").join(format!("{module}.conf")),
                "enabled = false;\n",
            )?;
        }
        let state = dir.path().join("state");
        for sub in ["db", "run", "log"] {
            std::fs::create_dir_all(state.join(sub))?;
        }
        // The hyperscan cache of rspamd's TLD list takes ~10 s to build; kept across runs.
        let hs_cache = std::env::temp_dir().join("protobalance-rspamd-hs-cache");
        std::fs::create_dir_all(&hs_cache)?;
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let port = crate::free_port(ip)?;
        let dns_port = crate::free_port(ip)?;
        let var = |name: &str, value: &dyn std::fmt::Display| format!("{name}={value}");
        let guard = ChildGuard::spawn(
            Command::new(RSPAMD)
                .args(["-f", "-u", "root", "-g", "root", "-c"])
                .arg(conf.join("rspamd.conf"))
                .args(["--var", &var("CONFDIR", &"/etc/rspamd")])
                .args(["--var", &var("LOCAL_CONFDIR", &conf.display())])
                .args(["--var", &var("DBDIR", &state.join("db").display())])
                .args(["--var", &var("RUNDIR", &state.join("run").display())])
                .args(["--var", &var("LOGDIR", &state.join("log").display())])
                .args(["--var", &var("PORT", &port)])
                .args(["--var", &var("DNSPORT", &dns_port)])
                .args(["--var", &var("HSCACHEDIR", &hs_cache.display())])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "rspamd",
        )?;
        let mut server = Self {
            guard: Some(guard),
            dir,
            addr: std::net::SocketAddr::new(ip, port),
        };
        server.wait_ready(Duration::from_secs(90))?;
        Ok(server)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    fn wait_ready(&mut self, patience: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if self.ping().unwrap_or(false) {
                return Ok(());
            }
            if let Some(guard) = self.guard.as_mut()
                && let Some(status) = guard.wait_timeout(Duration::ZERO)?
            {
                bail!("rspamd exited ({status}): {}", self.log());
            }
            if started.elapsed() > patience {
                bail!(
                    "rspamd did not answer /ping within {patience:?}: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ping(&self) -> Result<bool> {
        let mut stream = std::net::TcpStream::connect(self.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /ping HTTP/1.0\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer.contains("pong"))
    }

    /// The last lines of rspamd's log, for failure messages.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("state/log/rspamd.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops rspamd: SIGTERM, so the main process reaps its workers, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            crate::process::signal(guard.id(), "TERM");
            let _ = guard.wait_timeout(Duration::from_secs(10));
        }
    }
}

impl Drop for RspamdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
