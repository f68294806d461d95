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
//! * `[dnsbl]`: the lists are rebuilt (new resolver, empty cache) for the next connections.
//!
//! Everything else (listeners, backends, certificates, limits) takes effect at the
//! next restart; a reload says so when those sections changed.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus::{IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use crate::{
    api::blocklist::BlocklistManager,
    config::{Config, Validated},
    filter::xdp::XdpFilter,
};

pub struct Reloader {
    path: PathBuf,
    /// What the running process was started with, to name the sections a reload cannot
    /// change.
    started: Validated,
    filter: Option<Arc<Mutex<XdpFilter>>>,
    blocklist: Option<Arc<BlocklistManager>>,
    /// The proxy (reputation engine), when mail listeners run.
    proxy: Option<Arc<crate::proxy::ProxyContext>>,
    reloads: IntCounterVec,
    /// One reload at a time (SIGHUP and API).
    reloading: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        started: Validated,
        filter: Option<Arc<Mutex<XdpFilter>>>,
        blocklist: Option<Arc<BlocklistManager>>,
        proxy: Option<Arc<crate::proxy::ProxyContext>>,
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
            started,
            filter,
            blocklist,
            proxy,
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
        let (old, cfg) = (&self.started.config, &new.config);
        if old.xdp.interface != cfg.xdp.interface || old.xdp.pin_dir != cfg.xdp.pin_dir {
            return Err(Refused::Invalid(
                "xdp.interface or xdp.pin_dir changed: that needs a restart".into(),
            ));
        }
        if let Some(filter) = &self.filter {
            let allowed = filter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .replace_allowlist(&new.allowlist)
                .map_err(|e| Refused::Failed(format!("kernel allowlist: {e}")))?;
            let lists = cfg.xdp.blocklists.clone();
            let entries: usize = lists.iter().map(|l| l.entries.len()).sum();
            match &self.blocklist {
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
        let mut later = restart_sections(old, cfg);
        if let Some(proxy) = &self.proxy {
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
        Ok(later)
    }
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
    let sections: [(&'static str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 13] = [
        ("admin", &old.admin, &new.admin),
        ("shutdown", &old.shutdown, &new.shutdown),
        ("health", &old.health, &new.health),
        ("listener", &old.listeners, &new.listeners),
        ("backend", &old.backends, &new.backends),
        ("domain", &old.domains, &new.domains),
        ("directory", &old.directory, &new.directory),
        ("limits", &old.limits, &new.limits),
        ("submission", &old.submission, &new.submission),
        ("server", &old.server, &new.server),
        ("certificate", &old.certificates, &new.certificates),
        ("api", &old.api, &new.api),
        ("scan", &old.scan, &new.scan),
    ];
    for (name, a, b) in sections {
        if !same(a, b) {
            changed.push(name);
        }
    }
    let syn = |x: &crate::config::XdpConfig| {
        (
            x.syn_rate_per_second,
            x.syn_burst,
            x.syn_penalty_seconds,
            x.syn_limited_ports.clone(),
            x.mode,
        )
    };
    if !same(&syn(&old.xdp), &syn(&new.xdp)) {
        changed.push("xdp.syn_limiter");
    }
    changed
}
