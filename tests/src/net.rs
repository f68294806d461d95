//! Socket helpers for tests: picking a free port and waiting until a server listens.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A port that was free on `ip` a moment ago (bind port 0, read it, drop the socket).
/// Another process may take it before the caller binds; callers retry on bind failure.
pub fn free_port(ip: IpAddr) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    Ok(listener
        .local_addr()
        .context("local_addr of probe listener")?
        .port())
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
