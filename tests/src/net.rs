//! Socket helpers for tests: picking a free port and waiting until a server listens.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Ports this process has handed out already. The kernel picks ephemeral ports at random,
/// so two probes in a row (or two test threads) can be given the same port; remembering
/// what was handed out keeps one process from giving the same port to two servers.
static HANDED_OUT: Mutex<BTreeSet<(IpAddr, u16)>> = Mutex::new(BTreeSet::new());

/// A port that was free on `ip` a moment ago (bind port 0, read it, drop the socket).
/// Another process may take it before the caller binds; callers retry on bind failure.
pub fn free_port(ip: IpAddr) -> Result<u16> {
    Ok(free_ports(ip, 1)?[0])
}

/// `n` distinct ports that were free on `ip` a moment ago and that this process has not
/// handed out before. All probe sockets are held until every port is chosen, so the kernel
/// cannot return the same port twice within one call.
pub fn free_ports(ip: IpAddr, n: usize) -> Result<Vec<u16>> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    let mut probes = 0;
    while ports.len() < n {
        probes += 1;
        if probes > 64 * n + 64 {
            bail!("no unused port on {ip} after {probes} probes");
        }
        let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
        let port = listener
            .local_addr()
            .context("local_addr of probe listener")?
            .port();
        held.push(listener);
        if handed_out.insert((ip, port)) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// Waits until a TCP connect to `addr` succeeds, for at most `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(err) if Instant::now() >= deadline => {
                bail!("{addr} did not accept connections within {timeout:?}: {err}")
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}
