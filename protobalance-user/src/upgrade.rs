//! Binary upgrade (and restart) without refusing a connection, nginx-style: on SIGUSR2 the
//! running protobalance starts the binary at its own path again — the new version, if the
//! file was replaced — with the same arguments, handing it its listening sockets (the mail
//! listeners and the admin listener) as inherited file descriptors. The new process adopts
//! them instead of binding, so the kernel's accept queues are never closed: during the
//! overlap both processes accept from the same sockets. Once the new process serves, it says
//! so on a pipe; only then does the old one stop accepting, drain its sessions (the
//! `[shutdown]` grace) and exit. If the new process fails (a bad binary or config), it never
//! says ready and the old one keeps serving: the upgrade is abandoned, logged.
//!
//! The kernel filter: with `xdp.pin_dir` the new process swaps its program into the pinned
//! link (no moment without a filter); without it, its attach would find the interface taken
//! and it fails, so upgrade with `pin_dir` set when `xdp.interface` is.

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, RawFd},
    sync::Mutex,
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `addr=fd;addr=fd` of the listening sockets a new process inherits.
pub const FDS_ENV: &str = "PROTOBALANCE_INHERIT_FDS";
/// The pipe on which a new process says it is ready.
pub const READY_ENV: &str = "PROTOBALANCE_READY_FD";

/// How long the old process waits for the new one to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What this process inherited from the one it replaces (read once, at start).
static INHERITED: Mutex<Option<HashMap<SocketAddr, RawFd>>> = Mutex::new(None);

fn inherited() -> std::sync::MutexGuard<'static, Option<HashMap<SocketAddr, RawFd>>> {
    let mut guard = INHERITED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if guard.is_none() {
        // Read, not removed (removing is unsafe with threads running): a later upgrade
        // sets it anew for its own successor.
        let fds = std::env::var(FDS_ENV)
            .map(|v| parse_fds(&v))
            .unwrap_or_default();
        *guard = Some(fds);
    }
    guard
}

fn parse_fds(text: &str) -> HashMap<SocketAddr, RawFd> {
    text.split(';')
        .filter_map(|pair| {
            let (addr, fd) = pair.rsplit_once('=')?;
            Some((addr.parse().ok()?, fd.parse().ok()?))
        })
        .collect()
}

/// A listener on `addr`: the inherited socket when the replaced process handed one over,
/// otherwise a new one.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let fd = inherited().as_mut().and_then(|fds| fds.remove(&addr));
    match fd {
        Some(fd) => {
            // SAFETY: the replaced process passed this fd as its listening socket on
            // `addr`, and nothing else in this process owns it (removed from the table).
            let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            listener.set_nonblocking(true)?;
            tracing::info!(%addr, fd, "listening socket taken over from the replaced process");
            TcpListener::from_std(listener)
        }
        None => TcpListener::bind(addr).await,
    }
}

/// Closes inherited sockets the config no longer listens on.
pub fn close_unused() {
    if let Some(fds) = inherited().as_mut() {
        for (addr, fd) in fds.drain() {
            tracing::info!(%addr, "an inherited listening socket is not in the config: closed");
            // SAFETY: an inherited fd nothing in this process adopted.
            drop(unsafe { std::net::TcpListener::from_raw_fd(fd) });
        }
    }
}

/// Tells the process this one replaces that it serves (once; no-op when not an upgrade).
pub fn notify_ready() {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let Ok(text) = std::env::var(READY_ENV) else {
        return;
    };
    let Ok(fd) = text.parse::<RawFd>() else {
        return;
    };
    // SAFETY: the replaced process gave us this pipe's write end; nothing else owns it.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    if let Err(error) = pipe.write_all(b"ready\n") {
        tracing::warn!(%error, "could not tell the replaced process we are ready");
    }
}

/// The binary to start on SIGUSR2: this one's path, as it was at start (a replaced file is
/// then the new version).
pub fn current_exe() -> Option<std::path::PathBuf> {
    std::env::current_exe().ok()
}

/// On SIGUSR2: starts the new process with `listeners` (as they are then: a config reload
/// may have changed them) handed over, waits until it is ready, then cancels `shutdown`
/// (this process drains and exits).
pub async fn on_signal(
    exe: std::path::PathBuf,
    listeners: crate::proxy::listeners::ListenFds,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        tracing::warn!("cannot install the SIGUSR2 handler: no live upgrade");
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = usr2.recv() => {}
        }
        tracing::info!(binary = %exe.display(), "SIGUSR2: starting the new process");
        let now = listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match start_successor(&exe, &now).await {
            Ok(pid) => {
                tracing::info!(
                    new_pid = pid,
                    "the new process serves on the same sockets; draining and exiting"
                );
                shutdown.cancel();
                return;
            }
            Err(error) => {
                tracing::error!(%error, "upgrade abandoned: this process keeps serving");
            }
        }
    }
}

async fn start_successor(
    exe: &std::path::Path,
    listeners: &[(SocketAddr, RawFd)],
) -> Result<u32, String> {
    let (read, write) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let fds: Vec<String> = listeners
        .iter()
        .map(|(addr, fd)| format!("{addr}={fd}"))
        .collect();
    let inherit: Vec<RawFd> = listeners
        .iter()
        .map(|(_, fd)| *fd)
        .chain([write.as_raw_fd()])
        .collect();
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(FDS_ENV, fds.join(";"))
        .env(READY_ENV, write.as_raw_fd().to_string());
    // SAFETY: between fork and exec only async-signal-safe fcntl calls, on fds that are
    // open in this process (the listeners live until shutdown, the pipe until below).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            for fd in &inherit {
                if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    drop(write);
    let pid = child.id();
    // Read "ready" (or EOF: the new process died) off the async runtime.
    let waited = tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut answer = String::new();
        let mut read = read;
        let _ = read.read_to_string(&mut answer);
        answer
    });
    match tokio::time::timeout(READY_TIMEOUT, waited).await {
        Ok(Ok(answer)) if answer.starts_with("ready") => {
            // The child outlives us; it is reaped by whoever adopts it.
            std::mem::forget(child);
            Ok(pid)
        }
        Ok(_) => {
            let status = child.wait().map_err(|e| e.to_string())?;
            Err(format!(
                "the new process (pid {pid}) exited before it was ready: {status}"
            ))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "the new process (pid {pid}) was not ready within {}s; killed",
                READY_TIMEOUT.as_secs()
            ))
        }
    }
}

/// A pipe whose both ends are close-on-exec (the write end is handed over explicitly).
fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_handed_over_sockets() {
        let fds = parse_fds("127.0.0.1:25=5;[::1]:110=6;junk;127.0.0.1:x=7");
        assert_eq!(fds.len(), 2);
        assert_eq!(fds[&"127.0.0.1:25".parse().expect("addr")], 5);
        assert_eq!(fds[&"[::1]:110".parse().expect("addr")], 6);
    }
}
