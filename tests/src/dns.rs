//! A real DNS server for tests: dnsmasq (Debian's `dnsmasq-base`, no service) serving
//! test zones on a loopback address and a free port, answering only from its own records
//! (no upstream, no /etc/hosts, no config file), so DNSBL lookups never leave the machine.
//! Stopping it (drop, or [`DnsServer::stop`]) lets tests check that DNS failure never
//! blocks mail.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Result, bail};

use crate::{ChildGuard, free_port, wait_for_port};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// True if dnsmasq can run here; otherwise prints `SKIP <test>: <reason>`.
pub fn require_dnsmasq(test: &str) -> bool {
    if Path::new(DNSMASQ).exists() {
        return true;
    }
    eprintln!("SKIP {test}: dnsmasq is not installed (Debian package dnsmasq-base)");
    false
}

pub struct DnsServer {
    guard: Option<ChildGuard>,
    addr: SocketAddr,
}

impl DnsServer {
    /// Serves `zones` (names under them that have no record get NXDOMAIN) with A records
    /// `records` (`name`, address), each with a TTL of `ttl` seconds.
    pub fn start(
        ip: IpAddr,
        zones: &[&str],
        records: &[(String, IpAddr)],
        ttl: u32,
    ) -> Result<Self> {
        let port = free_port(ip)?;
        let mut command = Command::new(DNSMASQ);
        command.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--pid-file=",
            "--user=root",
            "--log-facility=-",
            "--log-queries",
        ]);
        command
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--port={port}"))
            .arg(format!("--local-ttl={ttl}"));
        for zone in zones {
            command.arg(format!("--local=/{zone}/"));
        }
        for (name, address) in records {
            command.arg(format!("--host-record={name},{address}"));
        }
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let mut guard = ChildGuard::spawn(&mut command, "dnsmasq")?;
        let addr = SocketAddr::new(ip, port);
        // dnsmasq answers over TCP too: its port accepting means it is serving.
        if let Err(error) = wait_for_port(addr, Duration::from_secs(10)) {
            if let Ok(Some(status)) = guard.wait_timeout(Duration::ZERO) {
                bail!("dnsmasq exited with {status} (port {port} taken?): {error}");
            }
            return Err(error);
        }
        Ok(Self {
            guard: Some(guard),
            addr,
        })
    }

    pub const fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server: queries get no answer from now on.
    pub fn stop(&mut self) {
        self.guard = None;
    }
}
