//! A set of Dovecot backends started together (in parallel) and stopped together:
//! by default `backend1..backendN` on 127.0.1.1..127.0.1.N, or on caller addresses.

use std::net::{IpAddr, Ipv4Addr};
use std::thread;

use anyhow::{Context, Result, anyhow};

use crate::dovecot::{BackendOptions, DovecotBackend};

/// `127.0.1.<n>`, the default address of backend `n` (1-based).
pub fn loopback_ip(n: usize) -> Result<IpAddr> {
    let last = u8::try_from(n).ok().filter(|b| (1..=254).contains(b));
    let last = last.ok_or_else(|| anyhow!("backend number {n} is outside 1..=254"))?;
    Ok(IpAddr::V4(Ipv4Addr::new(127, 0, 1, last)))
}

/// N Dovecot backends named `backend1..backendN`; all stopped on drop.
#[derive(Debug)]
pub struct DovecotCluster {
    backends: Vec<DovecotBackend>,
}

impl DovecotCluster {
    /// `n` backends on 127.0.1.1..127.0.1.n, each with `users` test users.
    pub fn start(n: usize, users: usize) -> Result<Self> {
        let ips = (1..=n).map(loopback_ip).collect::<Result<Vec<_>>>()?;
        Self::start_on(&ips, users)
    }

    /// One backend per address in `ips` (e.g. addresses inside a test namespace).
    pub fn start_on(ips: &[IpAddr], users: usize) -> Result<Self> {
        Self::start_with(
            ips,
            &BackendOptions {
                users,
                ..BackendOptions::default()
            },
        )
    }

    /// Starts all backends in parallel; if one fails, the others are stopped again.
    pub fn start_with(ips: &[IpAddr], options: &BackendOptions) -> Result<Self> {
        let backends = thread::scope(|scope| {
            let handles: Vec<_> = (ips.iter().enumerate())
                .map(|(i, &ip)| {
                    scope.spawn(move || {
                        DovecotBackend::start(&format!("backend{}", i + 1), ip, options)
                    })
                })
                .collect();
            let results: Vec<Result<DovecotBackend>> = (handles.into_iter())
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("backend start thread panicked")))
                })
                .collect();
            results.into_iter().collect::<Result<Vec<_>>>()
        })?;
        Ok(Self { backends })
    }

    pub fn backends(&self) -> &[DovecotBackend] {
        &self.backends
    }

    /// Backend `n`, 1-based like the names (`backend(2)` is `backend2`).
    pub fn backend(&self, n: usize) -> Result<&DovecotBackend> {
        let index = n.checked_sub(1).context("backends are numbered from 1")?;
        self.backends
            .get(index)
            .with_context(|| format!("no backend{n} in a cluster of {}", self.backends.len()))
    }

    /// Mutable access, e.g. to stop one backend in a failure test.
    pub fn backend_mut(&mut self, n: usize) -> Result<&mut DovecotBackend> {
        let count = self.backends.len();
        let index = n.checked_sub(1).context("backends are numbered from 1")?;
        self.backends
            .get_mut(index)
            .with_context(|| format!("no backend{n} in a cluster of {count}"))
    }
}

impl Drop for DovecotCluster {
    fn drop(&mut self) {
        // Each stop is mostly waiting on the master's shutdown; overlap them.
        thread::scope(|scope| {
            for backend in &mut self.backends {
                scope.spawn(|| backend.stop());
            }
        });
    }
}
