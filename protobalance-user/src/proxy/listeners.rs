//! The running mail listeners, changed in place by a config reload.
//!
//! A listener is known by its address, protocol and TLS mode. A reload keeps every
//! listener whose three are unchanged (its socket is never closed: no connection attempt is
//! refused), stops accepting on those the config no longer has (their sessions go on to
//! the end), and opens the new ones. New sockets that do not take an address of a stopped
//! listener are bound before anything stops, so a bind failure (the port is taken) refuses
//! the reload with nothing changed.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::ProxyContext;
use crate::config::{ListenerConfig, Protocol, TlsMode};

/// The listening sockets by address, handed to the successor on a live upgrade; kept
/// current by every change of the listeners.
pub type ListenFds = Arc<Mutex<Vec<(SocketAddr, RawFd)>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerKey {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub tls: TlsMode,
}

struct Running {
    key: ListenerKey,
    /// The socket's fd, owned by the accept task while it runs.
    fd: RawFd,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub struct MailListeners {
    ctx: Arc<ProxyContext>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    running: tokio::sync::Mutex<Vec<Running>>,
    fds: ListenFds,
    /// The admin listener's entry in `fds` (it is not changed by a reload).
    admin: Option<(SocketAddr, RawFd)>,
}

/// What a change did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub opened: Vec<SocketAddr>,
    pub closed: Vec<SocketAddr>,
}

impl MailListeners {
    pub fn new(
        ctx: Arc<ProxyContext>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        fds: ListenFds,
        admin: Option<(SocketAddr, RawFd)>,
    ) -> Self {
        Self {
            ctx,
            tracker,
            shutdown,
            running: tokio::sync::Mutex::new(Vec::new()),
            fds,
            admin,
        }
    }

    /// Publishes the sockets of `running` (and the admin one) for a live upgrade.
    fn publish_fds(&self, running: &[Running]) {
        *self.fds.lock().unwrap_or_else(PoisonError::into_inner) = self
            .admin
            .into_iter()
            .chain(running.iter().map(|r| (r.key.addr, r.fd)))
            .collect();
    }

    /// Starts serving `listener` (already bound).
    pub async fn start(&self, key: ListenerKey, listener: TcpListener) {
        let running = self.spawn(key, listener);
        let mut all = self.running.lock().await;
        all.push(running);
        self.publish_fds(&all);
    }

    fn spawn(&self, key: ListenerKey, listener: TcpListener) -> Running {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, protocol = key.protocol.as_str(), tls = ?key.tls, "mail listener ready");
        }
        let fd = listener.as_raw_fd();
        let stop = self.shutdown.child_token();
        let task = self.tracker.spawn(super::listener::serve(
            listener,
            key.protocol,
            key.tls,
            Arc::clone(&self.ctx),
            stop.clone(),
            self.tracker.clone(),
        ));
        Running {
            key,
            fd,
            stop,
            task,
        }
    }

    /// Makes the running listeners those of `wanted` (see the module comment).
    pub async fn reconcile(
        &self,
        wanted: &[ListenerConfig],
        have_certificates: bool,
    ) -> Result<Changed, String> {
        let wanted: Vec<ListenerKey> = wanted
            .iter()
            .map(|l| ListenerKey {
                addr: l.listen,
                protocol: l.protocol,
                tls: l.tls_mode(have_certificates),
            })
            .collect();
        let mut running = self.running.lock().await;
        let (keep, stop): (Vec<Running>, Vec<Running>) = std::mem::take(&mut *running)
            .into_iter()
            .partition(|r| wanted.contains(&r.key));
        *running = keep;
        let new: Vec<ListenerKey> = wanted
            .iter()
            .filter(|k| !running.iter().any(|r| r.key == **k))
            .copied()
            .collect();
        // Addresses a stopping listener still holds are bound after it stopped.
        let (later, now): (Vec<ListenerKey>, Vec<ListenerKey>) = new
            .into_iter()
            .partition(|k| stop.iter().any(|r| r.key.addr == k.addr));
        let mut bound = Vec::new();
        for key in now {
            match TcpListener::bind(key.addr).await {
                Ok(listener) => bound.push((key, listener)),
                Err(e) => {
                    // Nothing changed: the stopping ones go back.
                    running.extend(stop);
                    return Err(format!(
                        "listener {} ({}): cannot bind: {e}",
                        key.addr,
                        key.protocol.as_str()
                    ));
                }
            }
        }
        // A live upgrade from now on hands over only the sockets that stay open.
        self.publish_fds(&running);
        let mut changed = Changed::default();
        for r in stop {
            r.stop.cancel();
            // The accept loop ends at once and drops its socket; sessions carry on.
            if tokio::time::timeout(Duration::from_secs(5), r.task)
                .await
                .is_err()
            {
                tracing::warn!(addr = %r.key.addr, "a stopped listener did not end within 5 s");
            }
            tracing::info!(addr = %r.key.addr, protocol = r.key.protocol.as_str(), "mail listener closed by reload; its sessions continue");
            changed.closed.push(r.key.addr);
        }
        let mut failed = Vec::new();
        for key in later {
            match TcpListener::bind(key.addr).await {
                Ok(listener) => bound.push((key, listener)),
                Err(e) => failed.push(format!("{} ({}): {e}", key.addr, key.protocol.as_str())),
            }
        }
        for (key, listener) in bound {
            changed.opened.push(key.addr);
            running.push(self.spawn(key, listener));
        }
        self.publish_fds(&running);
        if failed.is_empty() {
            Ok(changed)
        } else {
            Err(format!(
                "listeners closed for a change could not be opened again: {}",
                failed.join("; ")
            ))
        }
    }
}
