//! What every proxied session shares: the directory, the backend pool, limits, metrics,
//! per-address admission, and the splice that joins client and backend after login.

pub mod admission;
pub mod client_io;
pub mod kernel_splice;
pub mod listener;
pub mod listeners;
pub mod splice;
pub mod target;

use std::sync::Arc;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::{
    backend::BackendPool,
    config::{LimitsConfig, Protocol},
    directory::{Directory, Store},
};

/// One accepted connection's addresses and what it may do.
pub struct Conn {
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    /// Set when the listener offers STLS/STARTTLS (plaintext listeners with a certificate).
    pub starttls: Option<crate::tls::TlsAcceptor>,
    /// The reputation verdict at connect (`Accept` or `Tarpit`).
    pub admitted: crate::filter::reputation::Verdict,
}

/// What the reputation engine needs around one login attempt.
pub struct LoginJudge {
    pub account: String,
    pub ip: std::net::IpAddr,
    /// Paused before a refusal is answered.
    pub penalty: std::time::Duration,
    /// No failed login before this one in the session.
    pub first_try: bool,
}

impl LoginJudge {
    /// For the login of `name` from `ip` after `failures` failed ones in this session.
    pub fn new(ctx: &ProxyContext, name: &str, ip: std::net::IpAddr, failures: u32) -> Self {
        Self {
            account: account_key(ctx, name),
            ip,
            penalty: ctx.reputation.auth_failure_delay(failures + 1),
            first_try: failures == 0,
        }
    }

    /// `false` when the account is locked for this address: refuse without asking the
    /// backend.
    pub fn allowed(&self, ctx: &ProxyContext) -> bool {
        ctx.reputation.login_allowed(&self.account, self.ip)
    }

    pub async fn refused(&self) {
        tokio::time::sleep(self.penalty).await;
    }

    /// Scores the failure; the verdict says whether the session may go on.
    pub fn failed(&self, ctx: &ProxyContext) -> crate::filter::reputation::Verdict {
        ctx.reputation.login_failed(Some(&self.account), self.ip)
    }

    pub fn succeeded(&self, ctx: &ProxyContext) {
        ctx.reputation.login_succeeded(&self.account, self.ip);
        if self.first_try {
            ctx.reputation
                .report(self.ip, crate::filter::reputation::Event::CleanSession);
        }
    }
}

/// The name login failures are counted under: the normalized mailbox when the login is
/// an address (so `User@Example.COM` and `user@example.com` are one account), else the
/// login as given, lower-cased.
pub fn account_key(ctx: &ProxyContext, login: &str) -> String {
    match ctx.directory.normalizer().normalize(login) {
        Ok(normalized) => normalized.mailbox.to_string(),
        Err(_) => login.trim().to_lowercase(),
    }
}

pub struct ProxyContext {
    pub directory: Arc<Directory<Store>>,
    pub pool: Arc<BackendPool>,
    /// `[limits]`; replaced by a config reload (sessions read it as they need it).
    pub limits: std::sync::RwLock<Arc<LimitsConfig>>,
    /// `[[certificate]]`s behind `tls`, replaced by a config reload.
    pub certificates: Option<crate::tls::Certificates>,
    pub banner: String,
    /// `server.hostname`: the name in SMTP greetings and LHLO/EHLO to backends.
    pub hostname: String,
    /// Where `RCPT TO:<Postmaster>` goes (`server.postmaster`).
    pub postmaster: Option<String>,
    /// `[submission]`: per-user sending limits.
    pub submission_limits: crate::smtp::limits::SubmissionLimits,
    pub metrics: ProxyMetrics,
    pub admission: admission::Admission,
    /// Certificates for implicit-TLS listeners and STLS/STARTTLS; `None` without any.
    pub tls: Option<crate::tls::TlsAcceptor>,
    /// Judges client behaviour; sessions report events to it.
    pub reputation: Arc<crate::filter::reputation::Reputation>,
    /// DNSBL/DNSWL lookups for inbound SMTP clients, when `[[dnsbl.site]]`s are configured;
    /// replaced by a config reload.
    pub dnsbl: std::sync::RwLock<Option<Arc<crate::filter::dnsbl::Dnsbl>>>,
    /// `protobalance_dnsbl_lookups_total`, shared by every `Dnsbl` a reload builds.
    pub dnsbl_lookups: prometheus::IntCounterVec,
    /// Idle backend delivery sessions for reuse (`limits.backend_idle_sessions`).
    pub sessions: Arc<crate::smtp::reuse::SessionPool>,
    /// rspamd/clamd content scanning of inbound mail (`[scan]`), when configured.
    pub scanner: Option<Arc<crate::scan::Scanner>>,
    /// Splicing logged-in POP3/IMAP sessions in the kernel (`[splice] kernel`), when the
    /// program loaded.
    pub kernel_splice: Option<Arc<kernel_splice::KernelSplice>>,
}

impl ProxyContext {
    /// The limits in force now.
    pub fn limits(&self) -> Arc<LimitsConfig> {
        Arc::clone(
            &self
                .limits
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// A reloaded `[limits]`: for sessions from now on (and the per-address cap).
    pub fn set_limits(&self, limits: LimitsConfig) {
        self.admission.set_max_per_ip(limits.max_sessions_per_ip);
        *self
            .limits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(limits);
    }

    /// The DNS lists in force now.
    pub fn dnsbl(&self) -> Option<Arc<crate::filter::dnsbl::Dnsbl>> {
        self.dnsbl
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Rebuilds the DNS lists from a reloaded `[dnsbl]`.
    pub fn set_dnsbl(
        &self,
        config: &crate::config::DnsblConfig,
        sites: Vec<crate::config::DnsblSite>,
    ) -> Result<(), String> {
        let dnsbl =
            crate::filter::dnsbl::Dnsbl::new(config, sites, Some(self.dnsbl_lookups.clone()))?
                .map(Arc::new);
        *self
            .dnsbl
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = dnsbl;
        Ok(())
    }
}

/// How a session ended; the `outcome` label of `protobalance_sessions_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Logged in and proxied until one side closed.
    Proxied,
    /// The client quit (or vanished) before logging in.
    ClientQuit,
    /// Too many failed logins.
    AuthFailed,
    /// The owning backend (or the directory) was unavailable: temporary failure.
    BackendUnavailable,
    /// Protocol violation, over-long line, timeout.
    ClientError,
    /// Refused at the door: too many sessions from the address.
    Refused,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Proxied => "proxied",
            Self::ClientQuit => "client_quit",
            Self::AuthFailed => "auth_failed",
            Self::BackendUnavailable => "backend_unavailable",
            Self::ClientError => "client_error",
            Self::Refused => "refused",
        }
    }
}

pub struct ProxyMetrics {
    sessions: IntCounterVec,
    proxied: IntCounterVec,
    proxied_active: IntGaugeVec,
    active: IntGaugeVec,
    logins: IntCounterVec,
    login_seconds: HistogramVec,
    splices: IntCounterVec,
}

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let sessions = IntCounterVec::new(
            Opts::new(
                "protobalance_sessions_total",
                "Finished client sessions by protocol and outcome",
            ),
            &["protocol", "outcome"],
        )?;
        let active = IntGaugeVec::new(
            Opts::new(
                "protobalance_sessions_active",
                "Open client sessions by protocol",
            ),
            &["protocol"],
        )?;
        let logins = IntCounterVec::new(
            Opts::new(
                "protobalance_logins_total",
                "Login attempts by protocol, backend and result",
            ),
            &["protocol", "backend", "result"],
        )?;
        let login_seconds = HistogramVec::new(
            HistogramOpts::new(
                "protobalance_login_duration_seconds",
                "From the login command to the backend's answer (directory + connect + replay)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["protocol"],
        )?;
        let proxied = IntCounterVec::new(
            Opts::new(
                "protobalance_proxied_sessions_total",
                "Sessions spliced to a backend after login",
            ),
            &["protocol", "backend"],
        )?;
        let proxied_active = IntGaugeVec::new(
            Opts::new(
                "protobalance_proxied_sessions_active",
                "Logged-in sessions now spliced to each backend",
            ),
            &["protocol", "backend"],
        )?;
        let splices = IntCounterVec::new(
            Opts::new(
                "protobalance_splices_total",
                "Logged-in sessions by protocol and where their bytes are moved: \
                 `kernel` (sockhash + stream verdict, no copy through the edge) or `user`",
            ),
            &["protocol", "mode"],
        )?;
        registry.register(Box::new(splices.clone()))?;
        registry.register(Box::new(proxied.clone()))?;
        registry.register(Box::new(proxied_active.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(logins.clone()))?;
        registry.register(Box::new(login_seconds.clone()))?;
        Ok(Self {
            sessions,
            proxied,
            proxied_active,
            active,
            logins,
            login_seconds,
            splices,
        })
    }

    /// A logged-in session starts being spliced, in the kernel or in user space.
    pub fn spliced(&self, protocol: Protocol, in_kernel: bool) {
        let mode = if in_kernel { "kernel" } else { "user" };
        self.splices
            .with_label_values(&[protocol.as_str(), mode])
            .inc();
    }

    pub fn session_started(&self, protocol: Protocol) {
        self.active.with_label_values(&[protocol.as_str()]).inc();
    }

    pub fn session_ended(&self, protocol: Protocol, outcome: Outcome) {
        self.active.with_label_values(&[protocol.as_str()]).dec();
        self.refused_or_ended(protocol, outcome);
    }

    /// Counts a session that never started (refused at admission).
    pub fn refused_or_ended(&self, protocol: Protocol, outcome: Outcome) {
        self.sessions
            .with_label_values(&[protocol.as_str(), outcome.as_str()])
            .inc();
    }

    /// A session starts (`true`) or stops (`false`) being spliced to `backend`.
    pub fn proxied(&self, protocol: Protocol, backend: &str, started: bool) {
        let labels = [protocol.as_str(), backend];
        if started {
            self.proxied.with_label_values(&labels).inc();
            self.proxied_active.with_label_values(&labels).inc();
        } else {
            self.proxied_active.with_label_values(&labels).dec();
        }
    }

    /// `backend` is a configured backend name or `none`, so the label stays bounded.
    pub fn login(&self, protocol: Protocol, backend: &str, result: &str, seconds: f64) {
        self.logins
            .with_label_values(&[protocol.as_str(), backend, result])
            .inc();
        self.login_seconds
            .with_label_values(&[protocol.as_str()])
            .observe(seconds);
    }
}
