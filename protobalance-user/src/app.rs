//! Wiring: builds the runtime from a validated config, binds listeners, loads the kernel
//! filter, serves until the shutdown token fires, then drains within the grace period.
//!
//! Signals: SIGTERM and SIGINT (handled in main) mean "stop accepting, drain, exit";
//! SIGHUP reloads the config ([`crate::reload`]).

use std::{net::SocketAddr, sync::Arc};

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState},
    backend::BackendPool,
    config::StoreKind,
    config::{Config, Validated, XdpConfig},
    directory::{
        Directory, DirectoryError, MailboxDirectory as _, Store, postgres::PostgresDirectory,
        sqlite::SqliteDirectory,
    },
    filter::{
        reputation::{Reputation, ReputationMetrics},
        xdp::{Attached, SynLimit, XdpError, XdpFilter},
    },
    metrics,
    proxy::{
        ProxyContext, ProxyMetrics,
        admission::Admission,
        kernel_splice::KernelSplice,
        listeners::{ListenFds, ListenerKey, MailListeners},
    },
};

/// List id of the inline `xdp.blocklist`; each of `xdp.blocklist_files` gets its own.
pub const CONFIG_LIST_ID: u32 = crate::filter::xdp::INLINE_LIST_ID;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind the admin listener on {addr} (`admin.listen`): {source}")]
    BindAdmin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("kernel filter on `{iface}` (`xdp.interface`): {source}")]
    Xdp {
        iface: String,
        source: Box<XdpError>,
    },
    #[error("cannot bind the mail listener on {addr} (`listener[].listen`): {source}")]
    BindListener {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("directory (`directory.path`): {0}")]
    Directory(#[from] DirectoryError),
    #[error("backend pool: {0}")]
    Pool(#[from] crate::backend::PoolError),
    #[error("TLS certificates (`certificate`): {0}")]
    Tls(String),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("XML API (`api`): {0}")]
    Api(String),
    #[error("DNSBL (`dnsbl`): {0}")]
    Dnsbl(String),
}

/// A started but not yet serving protobalance: everything is bound and loaded.
pub struct App {
    validated: Validated,
    registry: Registry,
    admin: TcpListener,
    xdp: Option<(String, Arc<std::sync::Mutex<XdpFilter>>)>,
    /// The API's blocklists and their expiry sweeper, with the filter and a directory.
    blocklist: Option<Arc<crate::api::blocklist::BlocklistManager>>,
    mail: Vec<(ListenerKey, TcpListener)>,
    proxy: Option<Arc<ProxyContext>>,
    /// `admin.tls`: the admin listener's TLS acceptor.
    admin_tls: Option<crate::tls::TlsAcceptor>,
    /// The XML API's state, when the config has API tokens or mail listeners.
    api: Option<crate::api::ApiState>,
    /// Mailbox moves; it also finishes the recorded moves whose run stopped.
    mover: Option<Arc<crate::moves::Mover>>,
    /// The config file, re-read on SIGHUP (`None`: no reload, e.g. in tests).
    config_path: Option<std::path::PathBuf>,
    /// The listening sockets by their configured address, for a live upgrade (SIGUSR2).
    listen_fds: ListenFds,
    /// The admin listener's socket (never changed by a reload).
    admin_fd: (SocketAddr, std::os::fd::RawFd),
    /// The certificates behind the TLS acceptor, replaced by a reload.
    certificates: Option<crate::tls::Certificates>,
    /// Bans shared with the other nodes (PostgreSQL directory).
    shared_bans: Option<Arc<crate::filter::shared_bans::SharedBans>>,
}

impl App {
    pub async fn start(validated: Validated) -> Result<Self, AppError> {
        let registry = Registry::new();
        metrics::register_build_info(&registry)?;
        let addr = validated.config.admin.listen;
        let admin = crate::upgrade::bind(addr)
            .await
            .map_err(|source| AppError::BindAdmin { addr, source })?;
        let admin_fd = (addr, std::os::fd::AsRawFd::as_raw_fd(&admin));
        let mut listen_fds = vec![admin_fd];
        let have_certs = !validated.config.certificates.is_empty();
        let mut mail = Vec::new();
        for listener in &validated.config.listeners {
            let addr = listener.listen;
            let bound = crate::upgrade::bind(addr)
                .await
                .map_err(|source| AppError::BindListener { addr, source })?;
            listen_fds.push((addr, std::os::fd::AsRawFd::as_raw_fd(&bound)));
            let key = ListenerKey {
                addr,
                protocol: listener.protocol,
                tls: listener.tls_mode(have_certs),
            };
            mail.push((key, bound));
        }
        crate::upgrade::close_unused();
        let config = &validated.config;
        let directory = if mail.is_empty() && config.api.tokens.is_empty() {
            None
        } else {
            Some(shared_directory(config, &registry).await?)
        };
        // One acceptor (and one set of certificates, replaced by a reload) for the mail
        // listeners and the admin listener.
        let tls = crate::tls::reloadable_acceptor(&config.certificates)
            .map_err(|e| AppError::Tls(e.to_string()))?;
        let proxy = match &directory {
            Some(directory) if !mail.is_empty() => Some(Arc::new(
                proxy_context(&validated, Arc::clone(directory), tls.clone(), &registry).await?,
            )),
            _ => None,
        };
        // Blocklists added through the API are stored in the directory: they go into the
        // kernel with the config's, so a restart leaves no window without them.
        let api_lists = match &directory {
            Some(directory) => crate::api::blocklist::kernel_lists(
                crate::api::blocklist::stored_lists(directory).await?,
            ),
            None => Vec::new(),
        };
        let xdp =
            match validated.config.xdp.interface.clone() {
                Some(iface) => {
                    let syn_ports = syn_limited_ports(&validated.config.xdp, &mail);
                    let mut filter = start_xdp(&validated, &iface, &syn_ports, &api_lists)
                        .map_err(|source| AppError::Xdp {
                            iface: iface.clone(),
                            source: Box::new(source),
                        })?;
                    register_xdp_metrics(&mut filter, &iface, &registry)?;
                    Some((iface, Arc::new(std::sync::Mutex::new(filter))))
                }
                None => {
                    tracing::info!("no xdp.interface configured: kernel filter not loaded");
                    None
                }
            };
        if let (Some(proxy), Some((_, filter))) = (&proxy, &xdp) {
            proxy.reputation.set_kernel(lock(filter).ban_handle());
        }
        let shared_bans = directory.as_ref().and_then(|directory| {
            crate::filter::shared_bans::SharedBans::new(
                directory,
                xdp.as_ref().map(|(_, filter)| lock(filter).ban_handle()),
                node_name(&admin),
            )
        });
        if let (Some(proxy), Some(shared)) = (&proxy, &shared_bans) {
            proxy.reputation.set_shared(Arc::clone(shared));
        }
        let blocklist = match (&directory, &xdp) {
            (Some(directory), Some((_, filter))) => {
                Some(Arc::new(crate::api::blocklist::BlocklistManager::new(
                    Arc::clone(directory),
                    Arc::clone(filter),
                    validated.config.xdp.blocklists.clone(),
                )))
            }
            _ => None,
        };
        let mover = match &proxy {
            Some(ctx) => Some(Arc::new(crate::moves::Mover::new(
                Arc::clone(ctx),
                validated.config.moves.clone(),
                node_name(&admin),
                &registry,
            )?)),
            None => None,
        };
        let api = match directory {
            Some(directory) => Some(
                crate::api::ApiState::new(
                    &validated.config,
                    directory,
                    proxy.as_ref().map(|p| Arc::clone(&p.pool)),
                    xdp.as_ref().map(|(_, filter)| lock(filter).ban_handle()),
                    blocklist.clone(),
                    registry.clone(),
                )
                .map_err(AppError::Api)?
                .with_proxy(proxy.clone())
                .with_mover(mover.clone())
                .with_shared_bans(shared_bans.clone())
                .with_filter(xdp.as_ref().map(|(_, filter)| Arc::clone(filter))),
            ),
            None => None,
        };
        let admin_tls = if validated.config.admin.tls {
            // Never fall back to plaintext when TLS was asked for.
            Some(
                tls.as_ref()
                    .map(|(acceptor, _)| acceptor.clone())
                    .ok_or_else(|| AppError::Tls("admin.tls without a [[certificate]]".into()))?,
            )
        } else {
            None
        };
        Ok(Self {
            validated,
            registry,
            admin,
            admin_tls,
            xdp,
            mail,
            proxy,
            api,
            mover,
            blocklist,
            shared_bans,
            config_path: None,
            listen_fds: Arc::new(std::sync::Mutex::new(listen_fds)),
            admin_fd,
            certificates: tls.map(|(_, certificates)| certificates),
        })
    }

    /// Reload the config from `path` on SIGHUP ([`crate::reload`]).
    #[must_use]
    pub fn reload_from(mut self, path: std::path::PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The listening sockets (admin and mail) by configured address: what a live upgrade
    /// hands to the new process (`crate::upgrade`).
    pub fn listen_fds(&self) -> ListenFds {
        Arc::clone(&self.listen_fds)
    }

    /// Serves until `shutdown` is cancelled, then waits up to the grace period for tasks.
    pub async fn serve(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        if let Some(blocklist) = &self.blocklist {
            tracker.spawn(Arc::clone(blocklist).sweep(shutdown.clone()));
        }
        if let Some(shared) = &self.shared_bans {
            tracker.spawn(Arc::clone(shared).run(shutdown.clone()));
        }
        if let Some(mover) = &self.mover {
            tracker.spawn(Arc::clone(mover).resume_stalled(shutdown.clone()));
        }
        if let Some((_, filter)) = &self.xdp {
            let mut filter = lock(filter);
            if let Some(kernel_log) = filter.take_kernel_log() {
                tracker.spawn(kernel_log.run(shutdown.clone()));
            }
            let sweeper = metrics::BanSweeper::new(
                filter.ban_handle(),
                filter.syn_limiter_handle(),
                &self.registry,
            );
            match sweeper {
                Ok(sweeper) => {
                    tracker.spawn(sweeper.run(shutdown.clone()));
                }
                Err(error) => tracing::error!(%error, "ban metrics"),
            }
        }
        let mut listeners = None;
        if let Some(ctx) = &self.proxy {
            tracker.spawn(Arc::clone(&ctx.pool).run_health_checks(shutdown.clone()));
            if let Store::Postgres(store) = ctx.directory.store() {
                let config = &self.validated.config;
                let applied = store
                    .backend_specs()
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(name, _)| !config.backends.iter().any(|b| &b.name == name))
                    .collect();
                tracker.spawn(crate::backend::follow::follow(
                    Arc::clone(&ctx.directory),
                    Arc::clone(&ctx.pool),
                    applied,
                    shutdown.clone(),
                ));
            }
            tracker.spawn(Arc::clone(&ctx.sessions).sweep(shutdown.clone()));
            let mail = Arc::new(MailListeners::new(
                Arc::clone(ctx),
                tracker.clone(),
                shutdown.clone(),
                Arc::clone(&self.listen_fds),
                Some(self.admin_fd),
            ));
            for (key, listener) in self.mail {
                mail.start(key, listener).await;
            }
            listeners = Some(mail);
        }
        let mut api = self.api;
        if let Some(path) = self.config_path.clone() {
            let reloader = crate::reload::Reloader::new(
                path,
                self.validated.clone(),
                crate::reload::Parts {
                    filter: self.xdp.as_ref().map(|(_, filter)| Arc::clone(filter)),
                    blocklist: self.blocklist.clone(),
                    proxy: self.proxy.clone(),
                    listeners,
                    certificates: self.certificates.clone(),
                },
                &self.registry,
            );
            match reloader {
                Ok(reloader) => {
                    let reloader = Arc::new(reloader);
                    api = api.map(|api| api.with_reloader(Arc::clone(&reloader)));
                    tracker.spawn(reloader.run(shutdown.clone()));
                }
                Err(error) => tracing::error!(%error, "config reload metrics"),
            }
        }
        let state = Arc::new(AdminState {
            registry: self.registry,
            tls: self.admin_tls,
            api,
        });
        if let Ok(addr) = self.admin.local_addr() {
            tracing::info!(%addr, "admin listener ready: /metrics, /healthz");
        }
        tracker.spawn(admin::serve(
            self.admin,
            state,
            shutdown.clone(),
            tracker.clone(),
        ));
        tracing::info!("protobalance running");
        crate::upgrade::notify_ready();
        shutdown.cancelled().await;
        tracker.close();
        let grace = self.validated.config.shutdown.grace();
        tracing::info!(
            grace_s = grace.as_secs(),
            "shutting down: draining sessions"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("grace period over; closing the remaining sessions");
        }
        // The API's handle goes first, so this is the filter's last reference.
        drop(self.blocklist);
        if let Some((iface, filter)) = self.xdp {
            drop(filter);
            tracing::info!(%iface, "kernel filter released");
        }
    }
}

/// The ports the SYN limiter watches: `xdp.syn_limited_ports`, or else the ports the mail
/// listeners are bound to (their real ports, also for a configured port 0), deduplicated.
fn syn_limited_ports(cfg: &XdpConfig, mail: &[(ListenerKey, TcpListener)]) -> Vec<u16> {
    let mut ports: Vec<u16> = if cfg.syn_limited_ports.is_empty() {
        mail.iter()
            .filter_map(|(_, listener)| listener.local_addr().ok())
            .map(|addr| addr.port())
            .collect()
    } else {
        cfg.syn_limited_ports.clone()
    };
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn lock(filter: &std::sync::Mutex<XdpFilter>) -> std::sync::MutexGuard<'_, XdpFilter> {
    filter
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn start_xdp(
    validated: &Validated,
    iface: &str,
    syn_ports: &[u16],
    api_lists: &[crate::filter::blocklist::NamedList],
) -> Result<XdpFilter, XdpError> {
    let cfg = &validated.config.xdp;
    let mut filter = XdpFilter::load(cfg.pin_dir.as_deref())?;
    // With pinned maps the previous run's entries are still there: replace the lists.
    filter.replace_allowlist(&validated.allowlist)?;
    let mut lists = cfg.blocklists.clone();
    lists.extend(api_lists.iter().cloned());
    let replaced = filter.replace_named_lists(&lists)?;
    if replaced.removed > 0 || !replaced.dropped.is_empty() {
        tracing::info!(
            %iface, removed = replaced.removed, lists_dropped = ?replaced.dropped,
            "removed blocklist entries no longer in the config"
        );
    }
    // Set before attaching, like the lists, so the program never runs with a stale limit
    // (with pinned maps, the previous run's settings and ports are still there).
    let limit = SynLimit {
        rate_per_second: cfg.syn_rate_per_second,
        burst: cfg.syn_burst,
        penalty: std::time::Duration::from_secs(cfg.syn_penalty_seconds),
    };
    filter.set_syn_limit(limit, syn_ports)?;
    if limit.rate_per_second > 0 {
        tracing::info!(
            %iface, rate = limit.rate_per_second, burst = limit.burst,
            penalty_s = cfg.syn_penalty_seconds, ports = ?syn_ports,
            "SYN limiter on"
        );
    }
    let attached = filter.attach(iface, cfg.mode)?;
    match attached {
        Attached::Driver => tracing::info!(%iface, "XDP filter attached in driver (native) mode"),
        Attached::Skb => tracing::info!(%iface, "XDP filter attached in SKB (generic) mode"),
        Attached::PinnedLink => tracing::info!(
            %iface, "XDP filter swapped into the pinned link (loaded earlier by `filter load`); \
                     it stays attached after protobalance exits"
        ),
    }
    Ok(filter)
}

/// Registers the kernel filter's metrics: verdict counters (read at scrape time) and
/// blocklist sizes.
fn register_xdp_metrics(
    filter: &mut XdpFilter,
    iface: &str,
    registry: &Registry,
) -> Result<(), AppError> {
    let xdp_error = |source| AppError::Xdp {
        iface: iface.to_owned(),
        source: Box::new(source),
    };
    let sizes = filter.list_sizes().map_err(xdp_error)?;
    let names = filter.list_names().map_err(xdp_error)?;
    tracing::info!(%iface, v4 = sizes.v4, v6 = sizes.v6, lists = ?names, "blocklist loaded");
    registry.register(Box::new(metrics::XdpCollector::new(
        filter.counter_handle(),
    )?))?;
    Ok(())
}

/// Opens the directory store named by `[directory]` and makes its backends and domains
/// match the config: config backends are added or get their capacity updated (their state
/// — active/draining/down — is the directory's, changed at run time); domains get their
/// policy. Backends in the directory but not in the config are reported, not deleted:
/// their mailboxes would be stranded.
pub async fn open_directory(config: &Config) -> Result<Store, DirectoryError> {
    let store = match (config.directory.store, &config.directory.postgres) {
        (StoreKind::Postgres, Some(pg)) => {
            Store::Postgres(PostgresDirectory::connect(&pg.settings()).await?)
        }
        _ => {
            let path = &config.directory.path;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    DirectoryError::Store(format!("creating {}: {e}", parent.display()))
                })?;
            }
            Store::Sqlite(SqliteDirectory::open(path)?)
        }
    };
    for backend in &config.backends {
        store
            .upsert_backend(&backend.name, backend.capacity)
            .await?;
    }
    for domain in &config.domains {
        store
            .upsert_domain(&domain.name, domain.unknown_mailbox)
            .await?;
    }
    let added_by_api: Vec<String> = store
        .backend_specs()
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for known in store.backends().await? {
        if !config.backends.iter().any(|b| b.name == known.name)
            && !added_by_api.contains(&known.name)
        {
            tracing::warn!(
                backend = %known.name, mailboxes = known.mailboxes,
                "backend is in the directory but not in the config: its mailboxes cannot be served"
            );
        }
    }
    Ok(store)
}

/// The directory (store, normalizer, cache) the proxy and the API share, with its metrics.
async fn shared_directory(
    config: &Config,
    registry: &Registry,
) -> Result<Arc<Directory<Store>>, AppError> {
    let store = open_directory(config).await?;
    let settings = match &store {
        Store::Postgres(pg) => Some(pg.settings().clone()),
        Store::Sqlite(_) => None,
    };
    let directory = Arc::new(Directory::new(
        store,
        config.directory.normalizer(),
        config.directory.cache_entries,
    ));
    if let Some(settings) = settings {
        crate::directory::postgres::listen(&directory, settings);
    }
    registry.register(Box::new(metrics::DirectoryCollector::new(Arc::clone(
        &directory,
    ))?))?;
    Ok(directory)
}

/// The config file's backends plus those added through the API (kept in the directory;
/// a name in both is the config file's).
async fn all_backends(
    config: &Config,
    directory: &Directory<Store>,
) -> Result<Vec<crate::config::BackendConfig>, AppError> {
    let mut backends = config.backends.clone();
    for (name, spec) in directory.store().backend_specs().await? {
        if backends.iter().any(|b| b.name == name) {
            tracing::warn!(backend = %name, "backend added by API is also in the config file: the config file's definition is used");
            continue;
        }
        match toml::from_str::<crate::config::BackendConfig>(&spec) {
            Ok(backend) => backends.push(backend),
            Err(error) => {
                tracing::error!(backend = %name, %error, "stored definition of a backend added by API is unreadable: backend not served");
            }
        }
    }
    Ok(backends)
}

async fn proxy_context(
    validated: &Validated,
    directory: Arc<Directory<Store>>,
    tls: Option<(crate::tls::TlsAcceptor, crate::tls::Certificates)>,
    registry: &Registry,
) -> Result<ProxyContext, AppError> {
    let config = &validated.config;
    let backends = all_backends(config, &directory).await?;
    let pool = Arc::new(BackendPool::new(
        &backends,
        config.health,
        config.limits.backend_connect_timeout(),
        registry,
    )?);
    // Backends an operator took down stay down across restarts.
    for record in directory.store().backends().await? {
        pool.set_admin_state(&record.name, record.state);
    }
    let reputation = if config.reputation.enabled {
        let allow = [
            validated.reputation_allow.as_slice(),
            validated.allowlist.as_slice(),
        ]
        .concat();
        Reputation::new(
            config.reputation.clone(),
            allow,
            Some(ReputationMetrics::new(registry)?),
        )
    } else {
        tracing::info!("reputation.enabled = false: client behaviour is not judged");
        Reputation::disabled()
    };
    let dnsbl_lookups = crate::filter::dnsbl::Dnsbl::register_metrics(registry)?;
    let dnsbl = crate::filter::dnsbl::Dnsbl::new(
        &config.dnsbl,
        validated.dnsbl_sites.clone(),
        Some(dnsbl_lookups.clone()),
    )
    .map_err(AppError::Dnsbl)?
    .map(Arc::new);
    let submission_limits =
        crate::smtp::limits::SubmissionLimits::new(config.submission.clone(), registry)?
            .with_store(Arc::clone(&directory));
    let restored = submission_limits.restore().await?;
    if restored > 0 {
        tracing::info!(
            accounts = restored,
            "submission suspensions restored from the directory"
        );
    }
    let scanner = match &validated.scan {
        Some(s) => {
            tracing::info!(
                rspamd = ?s.rspamd, clamd = ?s.clamd.as_ref().map(ToString::to_string),
                timeout_ms = s.timeout.as_millis() as u64,
                "inbound mail is scanned before delivery"
            );
            Some(Arc::new(crate::scan::Scanner::new(s, registry)?))
        }
        None => None,
    };
    let kernel_splice = match config.splice.kernel {
        crate::config::KernelSplice::Off => None,
        crate::config::KernelSplice::Auto => match KernelSplice::load(registry) {
            Ok(splice) => {
                tracing::info!("POP3/IMAP sessions are spliced in the kernel after login");
                Some(Arc::new(splice))
            }
            Err(error) => {
                tracing::warn!(%error, "kernel splice unavailable; POP3/IMAP sessions are relayed in user space (set `splice.kernel = \"off\"` to silence this)");
                None
            }
        },
    };
    Ok(ProxyContext {
        kernel_splice,
        scanner,
        sessions: Arc::new(crate::smtp::reuse::SessionPool::new(
            config.limits.backend_idle_sessions,
            Some(registry),
        )?),
        dnsbl: std::sync::RwLock::new(dnsbl),
        dnsbl_lookups,
        reputation: Arc::new(reputation),
        directory,
        pool,
        limits: std::sync::RwLock::new(Arc::new(config.limits.clone())),
        banner: config.server.banner.clone(),
        hostname: config.server.hostname.clone(),
        postmaster: config.postmaster(),
        submission_limits,
        metrics: ProxyMetrics::new(registry)?,
        admission: Admission::new(config.limits.max_sessions_per_ip),
        certificates: tls.as_ref().map(|(_, certificates)| certificates.clone()),
        tls: tls.map(|(acceptor, _)| acceptor),
    })
}

/// This node's name in shared records: the host name and the admin listener.
fn node_name(admin: &TcpListener) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    match admin.local_addr() {
        Ok(addr) => format!("{host}/{addr}"),
        Err(_) => host,
    }
}
