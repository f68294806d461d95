//! The protobalance side of a benchmark: its config in a scratch directory, provisioning
//! with `protobalance directory import`, the running `protobalance run` (a [`ChildGuard`]:
//! killed when dropped, also on an error or Ctrl-C), and its admin endpoint.

use std::{
    fmt::Write as _,
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use protobalance_tests::{
    ChildGuard, DovecotBackend, PostfixBackend, free_port, process::in_own_session,
    test_dir::TestDir,
};

use super::protocol::Protocol;
use crate::util;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A written config and where its files live.
pub struct EdgeConfig {
    pub path: PathBuf,
    pub directory: PathBuf,
    pub admin: SocketAddr,
    /// The mail listener, when the config has one.
    pub listener: Option<SocketAddr>,
    dir: PathBuf,
}

/// `[[backend]]` as the config needs it: name, address, the three ports, and where
/// inbound mail goes.
pub struct BackendSpec {
    pub name: String,
    pub ip: IpAddr,
    pub ports: [u16; 3],
    /// `delivery = "smtp"` to this port (a Postfix in front of the backend); None:
    /// `delivery = "lmtp"` to the LMTP port.
    pub smtp_delivery: Option<u16>,
}

impl BackendSpec {
    pub fn of(backend: &DovecotBackend) -> Self {
        Self {
            name: backend.name().to_owned(),
            ip: backend.ip(),
            ports: [
                backend.pop3_port(),
                backend.imap_port(),
                backend.lmtp_port(),
            ],
            smtp_delivery: None,
        }
    }

    /// The Postfix's Dovecot, with inbound mail handed to the Postfix (same address).
    pub fn of_postfix(postfix: &PostfixBackend) -> Self {
        Self {
            smtp_delivery: Some(postfix.smtp_port()),
            ..Self::of(postfix.dovecot())
        }
    }
}

/// The `[limits]` a benchmark raises.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Every client of a benchmark comes from 127.0.0.1.
    pub max_sessions_per_ip: u32,
    /// None: protobalance's default (25 MiB).
    pub max_message_octets: Option<u64>,
}

impl Limits {
    /// Room for `clients` concurrent clients and as many sessions closing behind them.
    pub fn for_clients(clients: u32) -> Self {
        Self {
            max_sessions_per_ip: clients.saturating_mul(2).clamp(20, 100_000),
            max_message_octets: None,
        }
    }
}

impl EdgeConfig {
    /// Writes `protobalance.toml` into `dir`: the directory file beside it, domain
    /// example.com (unknown mailboxes rejected), the backends, a plaintext `protocol`
    /// listener on a free loopback port if asked, and `limits`.
    pub fn write(
        dir: &TestDir,
        backends: &[BackendSpec],
        protocol: Option<Protocol>,
        limits: &Limits,
    ) -> Result<Self> {
        Self::write_with(dir, backends, protocol, limits, "")
    }

    /// As [`Self::write`], with `extra` (whole TOML tables, e.g. `"[reputation]\n…"`)
    /// appended at the end.
    pub fn write_with(
        dir: &TestDir,
        backends: &[BackendSpec],
        protocol: Option<Protocol>,
        limits: &Limits,
        extra: &str,
    ) -> Result<Self> {
        let admin = SocketAddr::new(LOOPBACK, free_port(LOOPBACK)?);
        let directory = dir.path().join("directory.db");
        let mut text = format!(
            "[admin]\nlisten = \"{admin}\"\n[shutdown]\ngrace_seconds = 1\n\
             [directory]\npath = \"{}\"\n\
             [limits]\nmax_sessions_per_ip = {}\n",
            directory.display(),
            limits.max_sessions_per_ip
        );
        if let Some(octets) = limits.max_message_octets {
            writeln!(text, "max_message_octets = {octets}")?;
        }
        text.push_str("[[domain]]\nname = \"example.com\"\nunknown_mailbox = \"reject\"\n");
        let mut listener = None;
        if let Some(protocol) = protocol {
            let addr = SocketAddr::new(LOOPBACK, free_port(LOOPBACK)?);
            let name = protocol.as_str();
            write!(
                text,
                "[[listener]]\nprotocol = \"{name}\"\nlisten = \"{addr}\"\n"
            )?;
            listener = Some(addr);
        }
        for b in backends {
            let [pop3, imap, lmtp] = b.ports;
            write!(
                text,
                "[[backend]]\nname = \"{}\"\naddress = \"{}\"\n\
                 pop3_port = {pop3}\nimap_port = {imap}\nlmtp_port = {lmtp}\n",
                b.name, b.ip
            )?;
            if let Some(port) = b.smtp_delivery {
                write!(text, "delivery = \"smtp\"\nsmtp_port = {port}\n")?;
            }
        }
        text.push_str(extra);
        let path = dir.path().join("protobalance.toml");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            path,
            directory,
            admin,
            listener,
            dir: dir.path().to_owned(),
        })
    }

    /// `protobalance directory import --config C FILE`, its report printed as it runs.
    pub fn import(&self, binary: &Path, file: &Path) -> Result<()> {
        util::run(
            Command::new(binary)
                .args(["directory", "import", "--config"])
                .arg(&self.path)
                .arg(file),
        )
    }

    /// Starts `protobalance run` (log in the scratch directory) and waits for /healthz.
    pub fn start(&self, binary: &Path) -> Result<ChildGuard> {
        self.launch(Command::new(binary))
    }

    /// As [`Self::start`], under `prlimit --nofile=N:N` (util-linux, which then execs
    /// protobalance: the guard's pid is protobalance's), for more sockets than the
    /// inherited limit allows.
    pub fn start_with_nofile(&self, binary: &Path, nofile: u64) -> Result<ChildGuard> {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(binary);
        self.launch(command)
    }

    /// The text of `GET /metrics` (Prometheus format).
    pub fn metrics(&self) -> Result<String> {
        let response = http_get(self.admin, "/metrics")
            .with_context(|| format!("GET http://{}/metrics", self.admin))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no HTTP header end in the /metrics response")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("/metrics answered {:?}", head.lines().next());
        }
        Ok(body.to_owned())
    }

    /// `command` is protobalance or a launcher that execs it with the arguments added here.
    fn launch(&self, mut command: Command) -> Result<ChildGuard> {
        let log_path = self.dir.join("protobalance.log");
        let log = File::create(&log_path).context("creating protobalance.log")?;
        let mut guard = ChildGuard::spawn(
            in_own_session(&mut command)
                .arg("run")
                .arg("--config")
                .arg(&self.path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
            "protobalance",
        )?;
        self.wait_healthy(&mut guard).with_context(|| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            format!("protobalance did not start; its log:\n{log}")
        })?;
        Ok(guard)
    }

    fn wait_healthy(&self, guard: &mut ChildGuard) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = guard.wait_timeout(Duration::ZERO)? {
                bail!("protobalance exited during start-up ({status})");
            }
            if healthz(self.admin) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "no 200 from http://{}/healthz within {START_TIMEOUT:?}",
            self.admin
        )
    }
}

fn healthz(admin: SocketAddr) -> bool {
    http_get(admin, "/healthz").is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// The whole response (the admin server sends a Content-Length body, never chunks).
fn http_get(admin: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    Ok(response)
}
