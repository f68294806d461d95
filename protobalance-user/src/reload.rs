//! Config reload on SIGHUP (or `POST /api/v1/reload`): the file `run` was started with is
//! read and validated again;
//! a config that does not validate is refused (logged with the key and the fix, counted)
//! and the running one stays. A valid one applies, without cutting any session:
//!
//! * the kernel filter's allowlist and the config's blocklists (`xdp.blocklist`,
//!   `xdp.blocklist_files` re-read), written together with the API's lists; each becomes
//!   live atomically as a new generation of the kernel's rule tables;
//! * `[reputation]`: weights, thresholds, delays, ban lengths, account rules and `allow`
//!   (scores and bans so far stay; what sizes or keys the records waits for a restart);
//! * `[dnsbl]`: the lists are rebuilt (new resolver, empty cache) for the next connections;
//! * `[[listener]]`: unchanged listeners keep their sockets (no connection is refused),
//!   removed ones stop accepting (their sessions go on), new ones open
//!   ([`crate::proxy::listeners`]);
//! * `[[certificate]]`: loaded and served from the next handshake on;
//! * `[limits]`: for sessions from now on (the per-address cap at once);
//! * `[[backend]]` and `[[domain]]`: new backends join the pool and the directory (new
//!   mailboxes flow to them by capacity), changed ones are updated, and a backend removed
//!   from the file leaves — refused while it still owns mailboxes; domain policies apply;
//! * the SYN limiter's rate, burst, penalty and ports.
//!
//! What the running process cannot change in place (`[admin]`, `[directory]`, `[api]`,
//! `[scan]`, `[submission]`, `[server]`, `[health]`, `[shutdown]`, the XDP interface and
//! mode) takes effect at the next restart; a reload says so when those changed.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus::{IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use crate::{
    api::blocklist::BlocklistManager,
    config::{Config, Validated},
    directory::MailboxDirectory as _,
    filter::xdp::XdpFilter,
    proxy::listeners::{Changed, MailListeners},
};

pub struct Reloader {
    path: PathBuf,
    /// The config in force (what started, then each applied reload), to tell what changed.
    current: Mutex<Validated>,
    parts: Parts,
    reloads: IntCounterVec,
    /// One reload at a time (SIGHUP and API).
    reloading: tokio::sync::Mutex<()>,
}

/// What a reload changes in the running process.
pub struct Parts {
    pub filter: Option<Arc<Mutex<XdpFilter>>>,
    pub blocklist: Option<Arc<BlocklistManager>>,
    /// The proxy (reputation engine, pool, limits), when mail listeners run.
    pub proxy: Option<Arc<crate::proxy::ProxyContext>>,
    pub listeners: Option<Arc<MailListeners>>,
    pub certificates: Option<crate::tls::Certificates>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        started: Validated,
        parts: Parts,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let reloads = IntCounterVec::new(
            Opts::new(
                "protobalance_config_reloads_total",
                "Config reloads (SIGHUP) by result: applied, or refused as invalid or failed",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(Self {
            path,
            current: Mutex::new(started),
            parts,
            reloads,
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// Reloads on every SIGHUP until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler: config reload is off");
            return;
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = hangup.recv() => {}
            }
            tracing::info!(path = %self.path.display(), "SIGHUP: reloading the config");
            let _ = self.reload().await;
        }
    }

    /// Reloads now: `Ok` with the changed sections that wait for a restart.
    pub async fn reload(&self) -> Result<Vec<&'static str>, Refused> {
        let _one_at_a_time = self.reloading.lock().await;
        let result = self.apply().await;
        let label = match &result {
            Ok(_) => "applied",
            Err(Refused::Invalid(error)) => {
                tracing::error!(%error, "config reload refused; the running config stays");
                "invalid"
            }
            Err(Refused::Failed(error)) => {
                tracing::error!(%error, "config reload failed to apply");
                "failed"
            }
        };
        self.reloads.with_label_values(&[label]).inc();
        result
    }

    async fn apply(&self) -> Result<Vec<&'static str>, Refused> {
        // Reading and checking the file (blocklist files may hold a million lines, the
        // certificates are parsed) is blocking work: off the async workers.
        let path = self.path.clone();
        let new = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| Refused::Failed(format!("reading the config: {e}")))?
            .map_err(|e| Refused::Invalid(e.to_string()))?;
        let started = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (old, cfg) = (&started.config, &new.config);
        if old.xdp.interface != cfg.xdp.interface || old.xdp.pin_dir != cfg.xdp.pin_dir {
            return Err(Refused::Invalid(
                "xdp.interface or xdp.pin_dir changed: that needs a restart".into(),
            ));
        }
        let mut later = Vec::new();
        // Checked before anything changes: what cannot apply refuses the whole reload.
        self.check_cluster(old, cfg).await?;
        if let Some(listeners) = &self.parts.listeners {
            // A listener's default TLS mode follows the certificates this process serves
            // (gaining or losing all of them waits for a restart).
            let changed = listeners
                .reconcile(&cfg.listeners, self.parts.certificates.is_some())
                .await
                .map_err(Refused::Failed)?;
            if changed != Changed::default() {
                tracing::info!(opened = ?changed.opened, closed = ?changed.closed, "config reloaded: mail listeners changed");
            }
        } else if format!("{:?}", old.listeners) != format!("{:?}", cfg.listeners) {
            later.push("listener");
        }
        match (&self.parts.certificates, cfg.certificates.is_empty()) {
            // Always read again: a renewal rewrites the files under the same names.
            (Some(certificates), false) => {
                certificates
                    .replace(&cfg.certificates)
                    .map_err(|e| Refused::Invalid(format!("certificate {e}")))?;
                tracing::info!(
                    certificates = cfg.certificates.len(),
                    "config reloaded: certificates read again, served from the next handshake"
                );
            }
            (None, true) => {}
            _ => later.push("certificate"),
        }
        self.apply_cluster(old, cfg).await?;
        if let Some(proxy) = &self.parts.proxy
            && format!("{:?}", old.limits) != format!("{:?}", cfg.limits)
        {
            proxy.set_limits(cfg.limits.clone());
            tracing::info!("config reloaded: [limits] in force for new sessions");
            if old.limits.backend_idle_sessions != cfg.limits.backend_idle_sessions
                || old.limits.backend_connect_timeout_seconds
                    != cfg.limits.backend_connect_timeout_seconds
            {
                later.push("limits.backend_*");
            }
        }
        let syn_changed = format!("{:?}", syn_settings(old)) != format!("{:?}", syn_settings(cfg))
            || old
                .listeners
                .iter()
                .map(|l| l.listen)
                .ne(cfg.listeners.iter().map(|l| l.listen));
        if let Some(filter) = self.parts.filter.as_ref().filter(|_| syn_changed) {
            let ports = syn_ports(cfg);
            let limit = crate::filter::xdp::SynLimit {
                rate_per_second: cfg.xdp.syn_rate_per_second,
                burst: cfg.xdp.syn_burst,
                penalty: std::time::Duration::from_secs(cfg.xdp.syn_penalty_seconds),
            };
            filter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .set_syn_limit(limit, &ports)
                .map_err(|e| Refused::Failed(format!("SYN limiter: {e}")))?;
            tracing::info!(rate = limit.rate_per_second, burst = limit.burst, ports = ?ports, "config reloaded: SYN limiter set");
        }
        if let Some(filter) = &self.parts.filter {
            let allowed = filter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .replace_allowlist(&new.allowlist)
                .map_err(|e| Refused::Failed(format!("kernel allowlist: {e}")))?;
            let lists = cfg.xdp.blocklists.clone();
            let entries: usize = lists.iter().map(|l| l.entries.len()).sum();
            match &self.parts.blocklist {
                Some(manager) => manager
                    .set_config_lists(lists)
                    .await
                    .map_err(|e| Refused::Failed(format!("kernel blocklists: {}", e.message)))?,
                None => {
                    filter
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .replace_named_lists(&lists)
                        .map_err(|e| Refused::Failed(format!("kernel blocklists: {e}")))?;
                }
            }
            tracing::info!(
                blocklist_entries = entries,
                allowlist_entries = new.allowlist.len(),
                stale_allowlist_entries_removed = allowed,
                "config reloaded: kernel blocklists and allowlist replaced"
            );
        }
        later.extend(restart_sections(old, cfg));
        if let Some(proxy) = &self.parts.proxy {
            proxy
                .set_dnsbl(&cfg.dnsbl, new.dnsbl_sites.clone())
                .map_err(|e| Refused::Failed(format!("DNS lists: {e}")))?;
            let allow = [new.reputation_allow.as_slice(), new.allowlist.as_slice()].concat();
            let kept = proxy.reputation.reconfigure(cfg.reputation.clone(), allow);
            later.extend(kept);
            tracing::info!("config reloaded: [reputation] weights, thresholds and allow in force");
        } else {
            for (name, a, b) in [
                (
                    "reputation",
                    format!("{:?}", old.reputation),
                    format!("{:?}", cfg.reputation),
                ),
                (
                    "dnsbl",
                    format!("{:?}", old.dnsbl),
                    format!("{:?}", cfg.dnsbl),
                ),
            ] {
                if a != b {
                    later.push(name);
                }
            }
        }
        if !later.is_empty() {
            tracing::warn!(
                sections = ?later,
                "these sections changed and take effect at the next restart"
            );
        }
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
        Ok(later)
    }

    /// Refuses a reload whose backends or domains cannot apply: a backend removed from the
    /// file that still owns mailboxes.
    async fn check_cluster(&self, old: &Config, cfg: &Config) -> Result<(), Refused> {
        let Some(proxy) = &self.parts.proxy else {
            return Ok(());
        };
        let owned = proxy
            .directory
            .store()
            .backends()
            .await
            .map_err(|e| Refused::Failed(format!("reading the directory: {e}")))?;
        for gone in removed_backends(old, cfg) {
            if let Some(record) = owned.iter().find(|r| r.name == gone && r.mailboxes > 0) {
                return Err(Refused::Invalid(format!(
                    "backend `{gone}` was removed from the config but still owns {} mailboxes:                      drain it, move its mailboxes, then remove it",
                    record.mailboxes
                )));
            }
        }
        Ok(())
    }

    /// New and changed backends join the pool and the directory; removed ones leave;
    /// domain policies are written.
    async fn apply_cluster(&self, old: &Config, cfg: &Config) -> Result<(), Refused> {
        let Some(proxy) = &self.parts.proxy else {
            return Ok(());
        };
        let store = proxy.directory.store();
        let failed =
            |what: &str, e: &dyn std::fmt::Display| Refused::Failed(format!("{what}: {e}"));
        for backend in &cfg.backends {
            let before = old.backends.iter().find(|b| b.name == backend.name);
            if before.is_some_and(|b| format!("{b:?}") == format!("{backend:?}")) {
                continue;
            }
            store
                .upsert_backend(&backend.name, backend.capacity)
                .await
                .map_err(|e| failed("directory", &e))?;
            proxy
                .pool
                .add(backend.clone())
                .map_err(|e| failed(&format!("backend {}", backend.name), &e))?;
            tracing::info!(backend = %backend.name, capacity = backend.capacity, new = before.is_none(), "config reloaded: backend in the pool");
        }
        for gone in removed_backends(old, cfg) {
            // The directory first: it refuses while the backend owns mailboxes (one may
            // have been assigned since the check), and then the backend keeps serving.
            match store.remove_backend(&gone).await {
                Ok(()) | Err(crate::directory::DirectoryError::UnknownBackend(_)) => {}
                Err(crate::directory::DirectoryError::BackendInUse { mailboxes, .. }) => {
                    return Err(Refused::Invalid(format!(
                        "backend `{gone}` was removed from the config but owns {mailboxes} \
                         mailboxes now: drain it, move its mailboxes, then remove it"
                    )));
                }
                Err(e) => return Err(failed("directory", &e)),
            }
            proxy.pool.remove(&gone);
            tracing::info!(backend = %gone, "config reloaded: backend removed");
        }
        for domain in &cfg.domains {
            store
                .upsert_domain(&domain.name, domain.unknown_mailbox)
                .await
                .map_err(|e| failed("directory", &e))?;
        }
        Ok(())
    }
}

fn removed_backends(old: &Config, cfg: &Config) -> Vec<String> {
    old.backends
        .iter()
        .filter(|b| !cfg.backends.iter().any(|n| n.name == b.name))
        .map(|b| b.name.clone())
        .collect()
}

/// The ports the SYN limiter watches after the reload.
fn syn_ports(cfg: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = if cfg.xdp.syn_limited_ports.is_empty() {
        cfg.listeners.iter().map(|l| l.listen.port()).collect()
    } else {
        cfg.xdp.syn_limited_ports.clone()
    };
    ports.sort_unstable();
    ports.dedup();
    ports
}

pub enum Refused {
    /// The file does not validate (or changes what a reload cannot).
    Invalid(String),
    /// Valid, but writing it into the kernel failed.
    Failed(String),
}

/// The sections that differ between `old` and `new` and that only a restart applies.
fn restart_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let mut changed = Vec::new();
    let sections: [(&'static str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 8] = [
        ("admin", &old.admin, &new.admin),
        ("shutdown", &old.shutdown, &new.shutdown),
        ("health", &old.health, &new.health),
        ("directory", &old.directory, &new.directory),
        ("submission", &old.submission, &new.submission),
        ("server", &old.server, &new.server),
        ("api", &old.api, &new.api),
        ("scan", &old.scan, &new.scan),
    ];
    for (name, a, b) in sections {
        if !same(a, b) {
            changed.push(name);
        }
    }
    if old.xdp.mode != new.xdp.mode {
        changed.push("xdp.mode");
    }
    changed
}

/// The SYN limiter's settings, which a reload applies.
fn syn_settings(cfg: &Config) -> (u32, u32, u64, Vec<u16>) {
    (
        cfg.xdp.syn_rate_per_second,
        cfg.xdp.syn_burst,
        cfg.xdp.syn_penalty_seconds,
        cfg.xdp.syn_limited_ports.clone(),
    )
}
