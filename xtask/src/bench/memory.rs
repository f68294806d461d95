//! `cargo xtask bench memory`: protobalance's userspace memory per idle proxied session.
//!
//! protobalance runs one POP3 listener in front of a stand-in backend in this process
//! ([`StandInPop3`]; see there why it is not Dovecot), so the figure is protobalance's
//! alone. Baseline: its VmRSS and Pss after start-up. Then N/10 and N POP3 sessions are
//! opened, logged in (USER/PASS, cycling through 300 mailboxes) and held idle; at each
//! checkpoint — protobalance's `sessions_active` and the backend's logins both equal to it
//! — memory is sampled: per session = (with − baseline) / sessions, and the growth between
//! the two checkpoints per session added (free of one-off start-up costs). A last sample
//! after closing them all shows what the allocator keeps. Kernel socket buffers are not in
//! RSS: this is userspace alone.
//!
//! Descriptors: protobalance holds two per session (client, backend) and so does this
//! process (client, the stand-in's end). This process raises its RLIMIT_NOFILE and starts
//! protobalance under `prlimit` with the same limit, whatever it would do itself; past the
//! hard limit that needs CAP_SYS_RESOURCE, and without it N is capped to what fits (and
//! the cap printed). All clients come from 127.0.0.1, admitted by a `max_sessions_per_ip`
//! above N.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::Args;
use protobalance_tests::{password_for, test_dir::TestDir, user_name};

use super::{
    check_interrupted,
    edge::{BackendSpec, EdgeConfig, Limits},
    memory_report::{self, Row},
    procfs,
    protocol::{Login, Protocol},
    standin_pop3::{LOGGED_IN_MARKER, StandInPop3},
    wire::LineConn,
};
use crate::util::step;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Mailboxes the sessions cycle through (their directory cache entries count as sessions'
/// cost: a few KiB in all).
const USERS: usize = 300;
/// Descriptors beyond two per session. protobalance holds 16 at rest (listeners, log,
/// epoll, the directory); this process ~10 and one per opener in flight.
const SPARE_FDS: u64 = 64;
const OPENERS: usize = 8;
const OPEN_DEADLINE: Duration = Duration::from_secs(180);
const COUNT_DEADLINE: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(1);
const ACTIVE_SERIES: &str = "protobalance_sessions_active{protocol=\"pop3\"}";

#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Idle logged-in POP3 sessions to hold (memory is also sampled at a tenth of this);
    /// fewer if the open-file limit cannot fit them. At most 25 000: every client takes an
    /// ephemeral port of 127.0.0.1.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(10..=25_000))]
    sessions: u32,
    /// protobalance's `splice.kernel`: `off` (its default) relays the logged-in sessions in
    /// user space, `auto` splices them in the kernel (when the program loads).
    #[arg(long, default_value = "off", value_parser = ["auto", "off"])]
    kernel_splice: String,
}

/// The running pair the samples are taken from.
struct Bench<'a> {
    pid: u32,
    edge: &'a EdgeConfig,
    backend: &'a StandInPop3,
    listener: SocketAddr,
    logins: Vec<Login>,
}

pub fn run(binary: &Path, args: &MemoryArgs) -> Result<()> {
    let (sessions, fds) = fd_budget(args.sessions)?;
    let backend = StandInPop3::start(LOOPBACK)?;
    step(&format!(
        "stand-in POP3 backend on {} (in this process, not Dovecot: protobalance alone is measured)",
        backend.addr()
    ));
    let scratch = TestDir::new("bench-memory")?;
    // Health checks probe imap and lmtp on the same port and mark them down: POP3 only here.
    let spec = BackendSpec {
        name: "standin".into(),
        ip: LOOPBACK,
        ports: [backend.addr().port(); 3],
        smtp_delivery: None,
    };
    let limits = Limits {
        max_sessions_per_ip: u32::try_from(sessions)? + 100,
        max_message_octets: None,
    };
    let splice = format!("[splice]\nkernel = \"{}\"\n", args.kernel_splice);
    let edge = EdgeConfig::write_with(&scratch, &[spec], Some(Protocol::Pop3), &limits, &splice)?;
    let logins = provision(binary, &edge, &scratch)?;
    step(&format!(
        "starting protobalance under prlimit --nofile={fds}:{fds}"
    ));
    let protobalance = edge.start_with_nofile(binary, fds)?;
    let pid = protobalance.id();
    let (soft, hard) = procfs::nofile_limit(pid)?;
    println!("  protobalance pid {pid}, open-file limit {soft} (hard {hard})");
    let bench = Bench {
        pid,
        edge: &edge,
        backend: &backend,
        listener: edge
            .listener
            .context("the bench config has no POP3 listener")?,
        logins,
    };
    let rows = bench.measure(sessions)?;
    memory_report::print(&rows);
    Ok(())
}

/// Sessions that fit, and the open-file limit to run with: protobalance and this process
/// each need two descriptors per session. Past the hard limit only CAP_SYS_RESOURCE can
/// raise it; without that the session count is capped, and the cap is printed.
fn fd_budget(wanted: u32) -> Result<(usize, u64)> {
    let wanted = u64::from(wanted);
    let limit = procfs::raise_own_nofile(2 * wanted + SPARE_FDS)?;
    let sessions = wanted.min(limit.saturating_sub(SPARE_FDS) / 2);
    println!("  open-file limit for this process and protobalance: {limit}");
    if sessions < wanted {
        println!(
            "  note: only {sessions} of {wanted} sessions fit (2 descriptors each, in both \
             processes, + {SPARE_FDS} spare); the hard limit cannot be raised here \
             (no CAP_SYS_RESOURCE)"
        );
    }
    ensure!(
        sessions >= 10,
        "an open-file limit of {limit} leaves no room for sessions"
    );
    Ok((usize::try_from(sessions)?, limit))
}

/// Imports user1..user[`USERS`] (all owned by the stand-in) and returns their logins.
fn provision(binary: &Path, edge: &EdgeConfig, scratch: &TestDir) -> Result<Vec<Login>> {
    step(&format!("provisioning {USERS} mailboxes"));
    let list = scratch.path().join("users.txt");
    let users: Vec<String> = (1..=USERS).map(user_name).collect();
    std::fs::write(&list, users.join("\n") + "\n")
        .with_context(|| format!("writing {}", list.display()))?;
    edge.import(binary, &list)?;
    users
        .into_iter()
        .map(|user| {
            let password =
                password_for(&user).with_context(|| format!("{user} is not a test user"))?;
            Ok(Login { user, password })
        })
        .collect()
}

impl Bench<'_> {
    /// Samples the baseline, opens and holds sessions up to each checkpoint, sampling
    /// there, then closes them all and samples once more.
    fn measure(&self, sessions: usize) -> Result<Vec<Row>> {
        let mut rows = vec![self.sample("baseline", 0)?];
        let before = self.backend.logins();
        let mut held = Vec::with_capacity(sessions);
        for checkpoint in [sessions / 10, sessions] {
            self.open(&mut held, checkpoint)?;
            self.wait_active(checkpoint)?;
            rows.push(self.sample(&checkpoint.to_string(), checkpoint)?);
            let logged_in = self.backend.logins() - before;
            ensure!(
                logged_in == checkpoint,
                "the backend saw {logged_in} logins, not {checkpoint}"
            );
        }
        step("closing every session");
        drop(held);
        self.wait_active(0)?;
        rows.push(self.sample("closed", 0)?);
        Ok(rows)
    }

    /// Opens sessions on [`OPENERS`] threads until `held` has `upto`.
    fn open(&self, held: &mut Vec<TcpStream>, upto: usize) -> Result<()> {
        step(&format!(
            "opening sessions {}..={upto}: greeting, USER, PASS, then idle",
            held.len() + 1
        ));
        let next = AtomicUsize::new(held.len());
        let failed = AtomicBool::new(false);
        let deadline = Instant::now() + OPEN_DEADLINE;
        let batches = thread::scope(|scope| {
            let handles: Vec<_> = (0..OPENERS)
                .map(|_| scope.spawn(|| self.opener(&next, upto, &failed, deadline)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("an opener thread panicked"))?)
                .collect::<Result<Vec<_>>>()
        });
        let batches = batches.map_err(|e| match self.backend.first_failure() {
            Some(failure) => e.context(format!("the stand-in backend's first failure: {failure}")),
            None => e,
        })?;
        held.extend(batches.into_iter().flatten());
        Ok(())
    }

    fn opener(
        &self,
        next: &AtomicUsize,
        upto: usize,
        failed: &AtomicBool,
        deadline: Instant,
    ) -> Result<Vec<TcpStream>> {
        let mut mine = Vec::new();
        loop {
            let i = next.fetch_add(1, Relaxed);
            if i >= upto || failed.load(Relaxed) {
                return Ok(mine);
            }
            let login = &self.logins[i % self.logins.len()];
            let opened = check_interrupted()
                .and_then(|()| before(deadline, "opening the sessions"))
                .and_then(|()| self.open_one(login));
            match opened {
                Ok(stream) => mine.push(stream),
                Err(e) => {
                    failed.store(true, Relaxed);
                    return Err(e.context(format!("session {} ({})", i + 1, login.user)));
                }
            }
        }
    }

    /// One logged-in session through protobalance, reduced to its socket.
    fn open_one(&self, login: &Login) -> Result<TcpStream> {
        let mut conn = LineConn::connect(self.listener)?;
        conn.expect("+OK", "connect (greeting)")?;
        conn.command(format!("USER {}\r\n", login.user).as_bytes(), "+OK", "USER")?;
        let pass = format!("PASS {}\r\n", login.password);
        let reply = conn.command(pass.as_bytes(), "+OK", "PASS")?;
        ensure!(
            String::from_utf8_lossy(reply).contains(LOGGED_IN_MARKER),
            "PASS was not answered by the backend: {:?}",
            String::from_utf8_lossy(reply).trim_end()
        );
        conn.into_stream()
    }

    /// Waits until protobalance reports `expected` open POP3 sessions.
    fn wait_active(&self, expected: usize) -> Result<()> {
        let deadline = Instant::now() + COUNT_DEADLINE;
        loop {
            let metrics = self.edge.metrics()?;
            let active = gauge(&metrics, ACTIVE_SERIES);
            if active == Some(expected as f64) {
                return Ok(());
            }
            check_interrupted()?;
            before(deadline, "waiting for protobalance's session count")
                .with_context(|| format!("{ACTIVE_SERIES} is {active:?}, not {expected}"))?;
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Samples after [`SETTLE`], so lazily freed memory and late allocations are counted.
    fn sample(&self, label: &str, sessions: usize) -> Result<Row> {
        thread::sleep(SETTLE);
        check_interrupted()?;
        Ok(Row {
            label: label.to_owned(),
            sessions,
            memory: procfs::memory(self.pid)?,
            fds: procfs::open_fds(self.pid)?,
        })
    }
}

fn before(deadline: Instant, what: &str) -> Result<()> {
    if Instant::now() > deadline {
        bail!("{what} took too long");
    }
    Ok(())
}

/// The value of one exact series (name and labels) in Prometheus text.
fn gauge(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::gauge;

    #[test]
    fn reads_one_series() {
        let text = "# TYPE x gauge\nx{protocol=\"imap\"} 2\nx{protocol=\"pop3\"} 10000\n";
        assert_eq!(gauge(text, "x{protocol=\"pop3\"}"), Some(10_000.0));
        assert_eq!(gauge(text, "x{protocol=\"smtp\"}"), None);
    }
}
