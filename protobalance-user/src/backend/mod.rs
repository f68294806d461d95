//! The backend pool: where each backend is and how to reach it. Connections set
//! TCP_NODELAY (login exchanges are tiny request/response pairs; Nagle would add tens of
//! milliseconds per session) and have a connect timeout; a circuit breaker per backend and
//! service (`health`) makes a dead backend cost the client a fast temporary failure.

pub mod follow;
pub mod health;
pub mod proxy_protocol;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{BackendConfig, HealthConfig};
use health::{Breaker, CheckError, Thresholds};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsStream;

use crate::tls::{MaybeTls, TlsConnector};

/// Which service on a backend; each one a backend offers has its own breaker
/// ([`BackendConfig::services`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Pop3,
    Imap,
    /// Inbound delivery over LMTP (`delivery = "lmtp"`).
    Lmtp,
    /// Inbound delivery over SMTP (`delivery = "smtp"`).
    Smtp,
    /// Authenticated submission (`submission_port`).
    Submission,
}

impl Service {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pop3 => "pop3",
            Self::Imap => "imap",
            Self::Lmtp => "lmtp",
            Self::Smtp => "smtp",
            Self::Submission => "submission",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("backend `{name}` ({addr}): TLS handshake: {source}")]
    Tls {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend `{0}` {1} is marked down by its health checks")]
    Down(String, &'static str),
    #[error("backend `{0}` is down (state set by an operator: `ctl backend activate` ends it)")]
    AdminDown(String),
    #[error("backend `{0}` is not configured")]
    Unknown(String),
    #[error("backend `{name}` ({addr}): connect timed out after {timeout:?}")]
    Timeout {
        name: String,
        addr: SocketAddr,
        timeout: Duration,
    },
    #[error("backend `{name}` ({addr}): {source}")]
    Io {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("backend `{0}` TLS: {1}")]
    Tls(String, String),
}

/// A connection to a backend: plaintext, or TLS for backends with `tls = true`.
pub type BackendStream = MaybeTls<TcpStream>;

/// The backends the pool knows, replaced whole (copy on write) when one is added or
/// removed, so sessions read a consistent set without holding a lock across awaits.
#[derive(Default, Clone)]
struct Members {
    backends: HashMap<String, BackendConfig>,
    /// Connector and expected certificate name of each backend with `tls = true`.
    tls: HashMap<String, (TlsConnector, ServerName<'static>)>,
    /// Shared with the previous set: a breaker's state survives membership changes.
    breakers: HashMap<(String, Service), Arc<Breaker>>,
}

pub struct BackendPool {
    members: std::sync::RwLock<Arc<Members>>,
    /// Backends an operator took down (directory state `down`): every connect to them
    /// fails at once, so their mailboxes get temporary failures. Kept apart from
    /// `members`, which a definition change replaces.
    admin_down: std::sync::RwLock<std::collections::HashSet<String>>,
    health: HealthConfig,
    connect_timeout: Duration,
    metrics: BackendMetrics,
}

/// The TLS connector and certificate name for a backend with `tls = true`.
fn tls_for(b: &BackendConfig) -> Result<(TlsConnector, ServerName<'static>), PoolError> {
    let ca = b
        .tls_ca
        .as_deref()
        .ok_or_else(|| PoolError::Tls(b.name.clone(), "no tls_ca".into()))?;
    let connector = crate::tls::connector(ca).map_err(|e| PoolError::Tls(b.name.clone(), e))?;
    let name = b.tls_name.clone().unwrap_or_else(|| b.address.to_string());
    let name =
        ServerName::try_from(name).map_err(|e| PoolError::Tls(b.name.clone(), e.to_string()))?;
    Ok((connector, name))
}

impl BackendPool {
    pub fn new(
        backends: &[BackendConfig],
        health: HealthConfig,
        connect_timeout: Duration,
        registry: &Registry,
    ) -> Result<Self, PoolError> {
        let pool = Self {
            members: std::sync::RwLock::new(Arc::new(Members::default())),
            admin_down: std::sync::RwLock::default(),
            health,
            connect_timeout,
            metrics: BackendMetrics::new(registry)?,
        };
        for b in backends {
            pool.add(b.clone())?;
        }
        Ok(pool)
    }

    fn members(&self) -> Arc<Members> {
        Arc::clone(
            &self
                .members
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Adds (or replaces) a backend: it serves logins and deliveries at once; its services
    /// start optimistic (up) until the first check or connect says otherwise.
    pub fn add(&self, b: BackendConfig) -> Result<(), PoolError> {
        let tls = b.tls.then(|| tls_for(&b)).transpose()?;
        let mut guard = self
            .members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Members::clone(&guard);
        next.breakers.retain(|(name, _), _| name != &b.name);
        for service in b.services() {
            let breaker = guard
                .breakers
                .get(&(b.name.clone(), service))
                .cloned()
                .unwrap_or_default();
            next.breakers.insert((b.name.clone(), service), breaker);
            self.metrics
                .up
                .with_label_values(&[b.name.as_str(), service.as_str()])
                .set(1);
        }
        next.tls.remove(&b.name);
        if let Some(tls) = tls {
            next.tls.insert(b.name.clone(), tls);
        }
        next.backends.insert(b.name.clone(), b);
        *guard = Arc::new(next);
        Ok(())
    }

    /// Forgets a backend (its mailboxes must have moved away first).
    pub fn remove(&self, name: &str) {
        let mut guard = self
            .members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = Members::clone(&guard);
        next.backends.remove(name);
        next.tls.remove(name);
        next.breakers.retain(|(n, service), _| {
            let keep = n != name;
            if !keep {
                let _ = self
                    .metrics
                    .up
                    .remove_label_values(&[name, service.as_str()]);
            }
            keep
        });
        *guard = Arc::new(next);
    }

    /// Applies a backend's directory state: `down` refuses every connect to it.
    pub fn set_admin_state(&self, name: &str, state: crate::directory::BackendState) {
        let mut down = self
            .admin_down
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = if state == crate::directory::BackendState::Down {
            down.insert(name.to_owned())
        } else {
            down.remove(name)
        };
        if changed {
            tracing::info!(backend = %name, state = state.as_str(), "backend state applied to the pool");
        }
    }

    /// Whether an operator took `name` down.
    pub fn is_admin_down(&self, name: &str) -> bool {
        self.admin_down
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(name)
    }

    /// Whether the pool knows `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.members().backends.contains_key(name)
    }

    pub fn address(&self, name: &str, service: Service) -> Option<SocketAddr> {
        let members = self.members();
        let b = members.backends.get(name)?;
        Some(SocketAddr::new(b.address, b.port(service)?))
    }

    /// Whether each service `name` offers is up (its breaker closed), in config order.
    pub fn health(&self, name: &str) -> Vec<(Service, bool)> {
        let members = self.members();
        members.backends.get(name).map_or_else(Vec::new, |b| {
            b.services()
                .into_iter()
                .map(|s| {
                    let up = members
                        .breakers
                        .get(&(name.to_owned(), s))
                        .is_some_and(|b| b.is_up());
                    (s, up)
                })
                .collect()
        })
    }

    /// The configured address of `name`.
    pub fn backend_address(&self, name: &str) -> Option<std::net::IpAddr> {
        self.members().backends.get(name).map(|b| b.address)
    }

    /// The service inbound mail for `name`'s mailboxes goes to (LMTP or SMTP).
    pub fn delivery_service(&self, name: &str) -> Option<Service> {
        self.members()
            .backends
            .get(name)
            .map(BackendConfig::delivery_service)
    }

    /// Whether `name` offers authenticated submission.
    pub fn offers_submission(&self, name: &str) -> bool {
        self.members()
            .backends
            .get(name)
            .is_some_and(|b| b.submission_port.is_some())
    }

    /// PROXY headers go to every service but LMTP (which takes XCLIENT, when offered).
    pub fn uses_proxy_protocol(&self, name: &str, service: Service) -> bool {
        service != Service::Lmtp
            && self
                .members()
                .backends
                .get(name)
                .is_some_and(|b| b.proxy_protocol)
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds {
            fall: self.health.fall,
            rise: self.health.rise,
        }
    }

    /// Connects to `service` on backend `name` for a client that connected from `client`
    /// to our `local` address, failing at once while the breaker is open. Backends with
    /// `proxy_protocol` get a PROXY v2 header first; `tls` backends a TLS handshake.
    pub async fn connect(
        &self,
        name: &str,
        service: Service,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<BackendStream, ConnectError> {
        let breaker = self
            .members()
            .breakers
            .get(&(name.to_owned(), service))
            .cloned();
        if self.is_admin_down(name) {
            return Err(ConnectError::AdminDown(name.to_owned()));
        }
        if breaker.as_ref().is_some_and(|b| !b.is_up()) {
            return Err(ConnectError::Down(name.to_owned(), service.as_str()));
        }
        let header = self
            .uses_proxy_protocol(name, service)
            .then(|| proxy_protocol::proxy(client, local));
        let result = self.open(name, service, header).await;
        if let Some(breaker) = breaker
            && breaker.record_passive(result.is_ok(), self.thresholds())
        {
            self.state_changed(name, service, false, "connect failed during a login");
        }
        result
    }

    /// TCP connect (bounded by the connect timeout), optional PROXY header, optional TLS.
    async fn open(
        &self,
        name: &str,
        service: Service,
        header: Option<Vec<u8>>,
    ) -> Result<BackendStream, ConnectError> {
        let addr = self
            .address(name, service)
            .ok_or_else(|| ConnectError::Unknown(name.to_owned()))?;
        let io_error = |source| ConnectError::Io {
            name: name.to_owned(),
            addr,
            source,
        };
        let timed_out = || ConnectError::Timeout {
            name: name.to_owned(),
            addr,
            timeout: self.connect_timeout,
        };
        let mut stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())?
            .map_err(io_error)?;
        let _ = stream.set_nodelay(true);
        if let Some(header) = header {
            stream.write_all(&header).await.map_err(io_error)?;
        }
        // TLS is for the login services; mail services stay on the trusted backend network.
        let login = matches!(service, Service::Pop3 | Service::Imap);
        let tls = self.members().tls.get(name).filter(|_| login).cloned();
        let Some((connector, server_name)) = tls else {
            return Ok(MaybeTls::Plain(stream));
        };
        // Boxed like the client-side handshakes: kilobytes of state, short-lived.
        let handshake = Box::pin(connector.connect(server_name.clone(), stream));
        let tls = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| ConnectError::Tls {
                name: name.to_owned(),
                addr,
                source,
            })?;
        Ok(MaybeTls::Tls(Box::new(TlsStream::Client(tls))))
    }

    /// Probes every backend service each `health.interval` until `shutdown`.
    pub async fn run_health_checks(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.health.interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let mut checks = tokio::task::JoinSet::new();
            for (name, service) in self.members().breakers.keys() {
                let (this, name, service) = (Arc::clone(&self), name.clone(), *service);
                checks.spawn(async move { this.check_one(&name, service).await });
            }
            while checks.join_next().await.is_some() {}
        }
    }

    async fn check_one(&self, name: &str, service: Service) {
        let Some(breaker) = self
            .members()
            .breakers
            .get(&(name.to_owned(), service))
            .cloned()
        else {
            return;
        };
        let header = self
            .uses_proxy_protocol(name, service)
            .then(proxy_protocol::local);
        let probe = async {
            let stream = self
                .open(name, service, header)
                .await
                .map_err(|e| CheckError::Connect(e.to_string()))?;
            health::probe(stream, service).await
        };
        let result = tokio::time::timeout(self.health.timeout(), probe)
            .await
            .unwrap_or(Err(CheckError::Timeout));
        let ok = result.is_ok();
        self.metrics
            .checks
            .with_label_values(&[name, service.as_str(), if ok { "ok" } else { "failed" }])
            .inc();
        if breaker.record(ok, self.thresholds()) {
            let why = result
                .err()
                .map_or_else(|| "checks pass again".to_owned(), |e| e.to_string());
            self.state_changed(name, service, ok, &why);
        }
    }

    fn state_changed(&self, name: &str, service: Service, up: bool, why: &str) {
        self.metrics
            .up
            .with_label_values(&[name, service.as_str()])
            .set(i64::from(up));
        if up {
            tracing::info!(backend = %name, service = service.as_str(), why, "backend is up");
        } else {
            tracing::warn!(backend = %name, service = service.as_str(), why, "backend is down: its mailboxes get temporary failures");
        }
    }
}

struct BackendMetrics {
    up: IntGaugeVec,
    checks: IntCounterVec,
}

impl BackendMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let up = IntGaugeVec::new(
            Opts::new(
                "protobalance_backend_up",
                "1 while the backend service's circuit breaker is closed",
            ),
            &["backend", "service"],
        )?;
        let checks = IntCounterVec::new(
            Opts::new(
                "protobalance_backend_checks_total",
                "Active health checks by result",
            ),
            &["backend", "service", "result"],
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(checks.clone()))?;
        Ok(Self { up, checks })
    }
}
