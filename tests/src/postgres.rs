//! A real PostgreSQL server for tests (Debian's `postgresql` package): a fresh cluster in a
//! temp directory, run as the `postgres` user, listening on 127.0.0.1 at a free port and on
//! a socket in the same directory. Durability is switched off (`fsync = off`): the tests
//! are about protobalance's behaviour, and a test cluster is thrown away. Stopped on drop.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    ChildGuard, free_port,
    process::{is_root, output_with_timeout, stdout_or_error},
    test_dir::TestDir,
};

/// The database and role the tests give protobalance.
pub const DATABASE: &str = "protobalance";

/// The newest installed server's `bin` directory (`/usr/lib/postgresql/<major>/bin`).
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

/// The `postgres` system user's uid and gid.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    })
}

/// True if a PostgreSQL server can run here; otherwise prints `SKIP <test>: <reason>`.
pub fn require_postgres(test: &str) -> bool {
    let reason = if postgres_bin_dir().is_none() {
        "PostgreSQL is not installed (Debian package postgresql; cargo xtask setup installs it)"
    } else if postgres_user().is_none() {
        "there is no `postgres` user (the postgresql package creates it)"
    } else if !is_root() {
        "not running as root (the test server runs as the postgres user)"
    } else {
        return true;
    };
    eprintln!("SKIP {test}: {reason}");
    false
}

pub struct PostgresServer {
    guard: Option<ChildGuard>,
    bin: PathBuf,
    uid: u32,
    gid: u32,
    port: u16,
    dir: TestDir,
}

impl PostgresServer {
    /// A fresh cluster with database and superuser `protobalance`, trusted on loopback.
    pub fn start() -> Result<Self> {
        let bin = postgres_bin_dir().context("PostgreSQL is not installed")?;
        let (uid, gid) = postgres_user().context("no postgres user")?;
        let dir = TestDir::new("postgres")?;
        for sub in ["data", "run"] {
            let path = dir.path().join(sub);
            std::fs::create_dir(&path)?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        let initdb = output_with_timeout(
            Command::new(bin.join("initdb"))
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-U", DATABASE, "--auth=trust", "-E", "UTF8", "--no-locale"])
                .args(["--no-sync", "--no-instructions"])
                .current_dir(dir.path())
                .uid(uid)
                .gid(gid),
            Duration::from_secs(120),
        )?;
        stdout_or_error("initdb", initdb)?;
        let mut server = Self {
            guard: None,
            bin,
            uid,
            gid,
            port: free_port(std::net::IpAddr::from([127, 0, 0, 1]))?,
            dir,
        };
        server.run()?;
        let created = output_with_timeout(
            Command::new(server.bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
                .args(["-U", DATABASE, DATABASE]),
            Duration::from_secs(60),
        )?;
        stdout_or_error("createdb", created)?;
        Ok(server)
    }

    fn run(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.log_path())?;
        std::os::unix::fs::chown(self.log_path(), Some(self.uid), Some(self.gid))?;
        let guard = ChildGuard::spawn(
            Command::new(self.bin.join("postgres"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-k")
                .arg(self.dir.path().join("run"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
                .current_dir(self.dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .uid(self.uid)
                .gid(self.gid),
            "postgres",
        )?;
        self.guard = Some(guard);
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, patience: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let ready = output_with_timeout(
                Command::new(self.bin.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .args(["-U", DATABASE, "-d", "postgres"]),
                Duration::from_secs(10),
            )?;
            if ready.status.success() {
                return Ok(());
            }
            if let Some(guard) = self.guard.as_mut()
                && let Some(status) = guard.wait_timeout(Duration::ZERO)?
            {
                bail!("postgres exited ({status}): {}", self.log());
            }
            if started.elapsed() > patience {
                bail!("postgres not ready within {patience:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The libpq connection string protobalance is given.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={DATABASE} dbname={DATABASE}",
            self.port
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `sql` with psql (unaligned, tuples only) and returns what it printed.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = output_with_timeout(
            Command::new(self.bin.join("psql"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", DATABASE, "-d", DATABASE])
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]),
            Duration::from_secs(60),
        )?;
        Ok(stdout_or_error("psql", out)?.trim().to_owned())
    }

    /// Serves TLS as well (`ssl = on`) with this certificate chain and key (PEM), from the
    /// next connection on; plaintext stays allowed (a client must insist on TLS itself).
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let data = self.dir.path().join("data");
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            std::os::unix::fs::chown(&path, Some(self.uid), Some(self.gid))?;
        }
        self.psql("ALTER SYSTEM SET ssl = on")?;
        self.psql("SELECT pg_reload_conf()")?;
        let started = Instant::now();
        while self.psql("SHOW ssl")? != "on" {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("ssl not on after a reload: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops the server (fast shutdown: sessions are ended); connections are then refused.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut guard) = self.guard.take() else {
            return Ok(());
        };
        crate::process::signal(guard.id(), "INT");
        if guard.wait_timeout(Duration::from_secs(30))?.is_none() {
            bail!("postgres did not stop within 30 s: {}", self.log());
        }
        Ok(())
    }

    /// Starts the stopped server again on the same port, data kept.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.run()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // A fast shutdown ends the backends too; the guard's SIGKILL is the fallback.
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
    }
}
