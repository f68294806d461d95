//! Child processes for tests: a guard that never leaves a process behind, running a
//! command with a deadline, and the Python helper tests use to drive real mail clients
//! (smtplib, poplib, imaplib) that nobody here wrote.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long [`python`] lets a script run before killing it.
pub const PYTHON_TIMEOUT: Duration = Duration::from_secs(30);

/// Kills and reaps a child process when dropped, including during a panic.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    /// Takes ownership of `child`; `what` names it in error messages.
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child,
            what: what.into(),
        }
    }

    /// Spawns `cmd` and guards the child.
    pub fn spawn(cmd: &mut Command, what: impl Into<String>) -> Result<Self> {
        let what = what.into();
        let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        Ok(Self::new(child, what))
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The guarded child, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        wait_child(&mut self.child, timeout).with_context(|| format!("waiting for {}", self.what))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Errors here mean the child is already gone; nothing is left to clean up.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether [`server_session`] puts servers in sessions of their own: benchmarks turn it
/// on ([`servers_in_own_sessions`]); tests leave it off, so a server started by a test that
/// is interrupted (Ctrl-C reaches the whole foreground process group) ends with it.
static OWN_SESSIONS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, servers this harness starts (Dovecot) get sessions of their own; see
/// [`in_own_session`] for why a benchmark wants that.
pub fn servers_in_own_sessions() {
    OWN_SESSIONS.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// [`in_own_session`] after [`servers_in_own_sessions`], else `cmd` unchanged.
pub fn server_session(cmd: &mut Command) -> &mut Command {
    if OWN_SESSIONS.load(std::sync::atomic::Ordering::Relaxed) {
        in_own_session(cmd)
    } else {
        cmd
    }
}

/// Makes the process `cmd` spawns the leader of a session of its own, as a service
/// manager would start a daemon (the Postfix master does it itself).
///
/// With the kernel's autogroup scheduling (`/proc/sys/kernel/sched_autogroup_enabled`)
/// a session is a scheduling group: the groups share the CPUs fairly, then the
/// processes within a group. A server left in its launcher's session competes for
/// one share with the launcher and the load generator, while a daemon in its own gets
/// a share of its own; under a saturating benchmark that skews any comparison of
/// servers started both ways.
pub fn in_own_session(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid(2), which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Polls `child` until it exits or `timeout` passes (`Ok(None)`).
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("try_wait")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion, capturing stdout and stderr; kills it after `timeout`.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(cmd, what.clone())?;
    let stdout = drain(guard.child_mut().stdout.take());
    let stderr = drain(guard.child_mut().stderr.take());
    let Some(status) = guard.wait_timeout(timeout)? else {
        drop(guard);
        bail!("{what} did not finish within {timeout:?}; killed");
    };
    Ok(Output {
        status,
        stdout: join_drain(stdout),
        stderr: join_drain(stderr),
    })
}

/// Reads a pipe to its end on a thread so a chatty child never blocks on a full pipe.
fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut pipe| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error only truncates captured output, which the caller reports anyway.
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    })
}

fn join_drain(handle: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}

/// Turns a finished command into its stdout, or an error carrying its stderr.
pub fn stdout_or_error(what: &str, output: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "{what} failed ({}):\nstderr: {stderr}\nstdout: {stdout}",
            output.status
        );
    }
    Ok(stdout)
}

/// Runs `python3 -c script` and returns its stdout; a non-zero exit is an error that
/// carries stderr (the Python traceback). Killed after [`PYTHON_TIMEOUT`].
pub fn python(script: &str) -> Result<String> {
    python_for(script, PYTHON_TIMEOUT)
}

/// [`python`] for a script that runs longer (a client loop during a long operation).
pub fn python_for(script: &str, timeout: Duration) -> Result<String> {
    let output = output_with_timeout(Command::new("python3").arg("-c").arg(script), timeout)?;
    stdout_or_error("python3 script", output)
}

/// True when this process runs with effective uid 0 (`/proc/self` is owned by the euid).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A process as identified in `/proc`: the start time tells a reused PID apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    start_time: u64,
}

/// `(ppid, state, start time)` from `/proc/<pid>/stat`; `None` if the process is gone.
fn proc_stat(pid: u32) -> Option<(u32, char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields restart after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    Some((
        fields.get(1)?.parse().ok()?,
        state,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Live direct children of `parent`.
pub fn child_pids(parent: u32) -> Vec<ProcId> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| match proc_stat(pid)? {
            (ppid, state, start_time) if ppid == parent && state != 'Z' => {
                Some(ProcId { pid, start_time })
            }
            _ => None,
        })
        .collect()
}

/// Live processes whose environment holds exactly `entry` (`NAME=value`), e.g. every
/// daemon of one Postfix instance (`MAIL_CONFIG=<its config dir>`). A process that
/// cannot be read (gone, or a zombie) does not count.
pub fn pids_with_env(entry: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == entry.as_bytes()))
        })
        .collect()
}

/// The command name of `pid` (`/proc/<pid>/comm`, e.g. `imap-login`).
pub fn comm(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
}

fn is_alive(proc: ProcId) -> bool {
    matches!(proc_stat(proc.pid), Some((_, state, start)) if state != 'Z' && start == proc.start_time)
}

/// Sends `signal` (e.g. `"TERM"`) to one process by PID; a vanished process is not an error.
pub fn signal(pid: u32, signal: &str) {
    // Best effort by design: the only failure that matters (process still alive) is
    // checked by the caller by waiting for it.
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Waits up to `timeout` for `procs` to exit, then SIGKILLs the ones still running.
pub fn reap_orphans(procs: &[ProcId], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while procs.iter().any(|p| is_alive(*p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    for proc in procs.iter().filter(|p| is_alive(**p)) {
        eprintln!("warning: pid {} outlived its parent; killing", proc.pid);
        signal(proc.pid, "KILL");
    }
}
