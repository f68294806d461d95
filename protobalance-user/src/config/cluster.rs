//! `[directory]`, `[[domain]]` and `[[backend]]`: the mail cluster behind the edge.

use std::{
    collections::HashSet,
    net::IpAddr,
    num::NonZeroUsize,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::Problem;
use crate::{
    backend::Service,
    directory::{DomainPolicy, LocalCase, Normalizer},
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// The SQLite file; relative paths are from the config file's directory.
    #[serde(default = "default_directory_path")]
    pub path: PathBuf,
    /// Owners kept in the in-process LRU cache.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: NonZeroUsize,
    #[serde(default)]
    pub local_part_case: LocalCase,
    /// `user+tag@domain` → `user@domain`; empty string disables.
    #[serde(default = "default_tag_separator")]
    pub tag_separator: String,
    /// Dovecot-style master logins `user*master`; empty (default) disables.
    #[serde(default)]
    pub master_separator: String,
    /// `sqlite` (one node, `path`) or `postgres` (nodes sharing `[directory.postgres]`).
    #[serde(default)]
    pub store: StoreKind,
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Postgres,
}

/// `[directory.postgres]`: the database the nodes of one edge share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq connection string (`host=/run/postgresql dbname=protobalance user=…`) or a
    /// `postgresql://` URL.
    pub url: String,
    /// A file whose first line is the password (keeps it out of the config file).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Deadline of every directory call.
    #[serde(default = "default_pg_timeout_ms")]
    pub timeout_ms: u64,
    /// How long cached owners are still served once change notifications cannot be heard.
    #[serde(default = "default_stale_cache_seconds")]
    pub stale_cache_seconds: u64,
    /// TLS to the database, required and verified: the CA certificates (PEM) the server's
    /// certificate chains to. Unset: plaintext (a Unix socket or a trusted network).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_pool_size() -> usize {
    16
}

fn default_pg_timeout_ms() -> u64 {
    2000
}

fn default_stale_cache_seconds() -> u64 {
    30
}

impl PostgresConfig {
    pub fn settings(&self) -> crate::directory::postgres::PostgresSettings {
        crate::directory::postgres::PostgresSettings {
            url: self.url.clone(),
            password_file: self.password_file.clone(),
            pool_size: self.pool_size,
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            stale_cache: std::time::Duration::from_secs(self.stale_cache_seconds),
            ca_file: self.ca_file.clone(),
        }
    }
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            path: default_directory_path(),
            cache_entries: default_cache_entries(),
            local_part_case: LocalCase::default(),
            tag_separator: default_tag_separator(),
            master_separator: String::new(),
            store: StoreKind::default(),
            postgres: None,
        }
    }
}

fn default_directory_path() -> PathBuf {
    PathBuf::from("/var/lib/protobalance/directory.db")
}

fn default_cache_entries() -> NonZeroUsize {
    NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN)
}

fn default_tag_separator() -> String {
    "+".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    /// `reject` (default) or `auto-provision`.
    #[serde(default)]
    pub unknown_mailbox: DomainPolicy,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Stable identifier stored in the directory; renaming a backend orphans its mailboxes.
    pub name: String,
    pub address: IpAddr,
    /// Relative weight for apportioning new mailboxes.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    #[serde(default = "default_pop3_port")]
    pub pop3_port: u16,
    #[serde(default = "default_imap_port")]
    pub imap_port: u16,
    #[serde(default = "default_lmtp_port")]
    pub lmtp_port: u16,
    /// How inbound (MX) mail reaches this backend: `lmtp` (e.g. Dovecot, on `lmtp_port`)
    /// or `smtp` (e.g. Postfix, on `smtp_port`).
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default = "default_smtp_port")]
    pub smtp_port: u16,
    /// The backend's authenticated submission port (e.g. Postfix 587 with Dovecot SASL):
    /// the edge's submission listeners check a user's AUTH there and hand the message on.
    pub submission_port: Option<u16>,
    /// Send a PROXY protocol v2 header first on POP3, IMAP and SMTP/submission
    /// connections (Dovecot: `haproxy = yes` on those listeners and this edge in
    /// `haproxy_trusted_networks`; Postfix: `smtpd_upstream_proxy_protocol = haproxy`).
    /// Without it, SMTP and LMTP backends get the client's address by XCLIENT when they
    /// offer it.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Speak TLS to this backend's POP3 and IMAP ports (then implicit-TLS ports, e.g. 995
    /// and 993), verifying its certificate against `tls_ca`.
    #[serde(default)]
    pub tls: bool,
    /// PEM CA certificate(s) the backend's certificate must chain to; relative paths are
    /// from the config file. Required with `tls = true`.
    pub tls_ca: Option<PathBuf>,
    /// The name the backend's certificate is checked against (and sent as SNI); default:
    /// `address` (then the certificate needs that IP address as a subject alt name).
    pub tls_name: Option<String>,
}

/// The protocol inbound mail is handed on in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    #[default]
    Lmtp,
    Smtp,
}

impl BackendConfig {
    /// The services this backend offers the edge; each has its health checks and breaker.
    pub fn services(&self) -> Vec<Service> {
        let mut services = vec![Service::Pop3, Service::Imap, self.delivery_service()];
        if self.submission_port.is_some() {
            services.push(Service::Submission);
        }
        services
    }

    /// Where inbound mail goes.
    pub const fn delivery_service(&self) -> Service {
        match self.delivery {
            Delivery::Lmtp => Service::Lmtp,
            Delivery::Smtp => Service::Smtp,
        }
    }

    /// The port of `service`, when the backend offers it.
    pub fn port(&self, service: Service) -> Option<u16> {
        match service {
            Service::Pop3 => Some(self.pop3_port),
            Service::Imap => Some(self.imap_port),
            Service::Lmtp => Some(self.lmtp_port),
            Service::Smtp => Some(self.smtp_port),
            Service::Submission => self.submission_port,
        }
    }
}

const fn default_smtp_port() -> u16 {
    25
}

const fn default_capacity() -> u32 {
    100
}
const fn default_pop3_port() -> u16 {
    110
}
const fn default_imap_port() -> u16 {
    143
}
const fn default_lmtp_port() -> u16 {
    24
}

impl DirectoryConfig {
    pub fn normalizer(&self) -> Normalizer {
        Normalizer {
            local_case: self.local_part_case,
            tag_separator: self.tag_separator.chars().next(),
            master_separator: self.master_separator.chars().next(),
        }
    }

    pub(super) fn validate(&mut self, base: &Path) -> Result<(), Problem> {
        for (key, value) in [
            ("directory.tag_separator", &self.tag_separator),
            ("directory.master_separator", &self.master_separator),
        ] {
            let mut chars = value.chars();
            let ok = match (chars.next(), chars.next()) {
                (None, _) => true,
                (Some(c), None) => "+-_=*%#~".contains(c),
                _ => false,
            };
            if !ok {
                return Err(Problem::new(
                    key,
                    format!("`{value}` must be empty or one of + - _ = * % # ~"),
                ));
            }
        }
        if !self.tag_separator.is_empty() && self.tag_separator == self.master_separator {
            return Err(Problem::new(
                "directory.master_separator",
                "must differ from directory.tag_separator".into(),
            ));
        }
        if self.path.is_relative() {
            self.path = base.join(&self.path);
        }
        match (self.store, &mut self.postgres) {
            (StoreKind::Postgres, None) => {
                return Err(Problem::new(
                    "directory.store",
                    "`postgres` needs a [directory.postgres] section with `url`".into(),
                ));
            }
            (StoreKind::Sqlite, Some(_)) => {
                return Err(Problem::new(
                    "directory.postgres",
                    "is set but directory.store is `sqlite`: set store = \"postgres\" or remove the section".into(),
                ));
            }
            (StoreKind::Postgres, Some(pg)) => {
                if let Err(e) = pg.url.parse::<tokio_postgres::Config>() {
                    return Err(Problem::new("directory.postgres.url", e.to_string()));
                }
                if !(1..=1024).contains(&pg.pool_size) {
                    return Err(Problem::new(
                        "directory.postgres.pool_size",
                        format!("{} must be 1..=1024", pg.pool_size),
                    ));
                }
                if !(50..=60_000).contains(&pg.timeout_ms) {
                    return Err(Problem::new(
                        "directory.postgres.timeout_ms",
                        format!("{} must be 50..=60000", pg.timeout_ms),
                    ));
                }
                if pg.stale_cache_seconds > 3600 {
                    return Err(Problem::new(
                        "directory.postgres.stale_cache_seconds",
                        format!("{} must be at most 3600", pg.stale_cache_seconds),
                    ));
                }
                if let Some(path) = &mut pg.password_file
                    && path.is_relative()
                {
                    *path = base.join(&*path);
                }
                if let Some(path) = &mut pg.ca_file {
                    if path.is_relative() {
                        *path = base.join(&*path);
                    }
                    if let Err(e) = crate::tls::connector(path) {
                        return Err(Problem::new(
                            "directory.postgres.ca_file",
                            format!("{}: {e}", path.display()),
                        ));
                    }
                }
                let asks_tls = pg
                    .url
                    .parse::<tokio_postgres::Config>()
                    .is_ok_and(|c| c.get_ssl_mode() == tokio_postgres::config::SslMode::Require);
                if asks_tls && pg.ca_file.is_none() {
                    return Err(Problem::new(
                        "directory.postgres.url",
                        "sslmode=require needs directory.postgres.ca_file (the CA certificates \
                         the server's certificate chains to)"
                            .into(),
                    ));
                }
            }
            (StoreKind::Sqlite, None) => {}
        }
        Ok(())
    }
}

pub(super) fn validate_domains(
    domains: &[DomainConfig],
    normalizer: &Normalizer,
) -> Result<(), Problem> {
    let mut seen = HashSet::new();
    for (i, domain) in domains.iter().enumerate() {
        let key = format!("domain[{i}].name");
        let name = normalizer
            .domain(&domain.name)
            .ok_or_else(|| Problem::new(&key, format!("`{}` is not a domain name", domain.name)))?;
        if name != domain.name {
            return Err(Problem::new(
                &key,
                format!("write `{name}` (lower case, no trailing dot)"),
            ));
        }
        if !seen.insert(name) {
            return Err(Problem::new(
                &key,
                format!("`{}` is listed twice", domain.name),
            ));
        }
    }
    Ok(())
}

pub(super) fn validate_backends(
    backends: &mut [BackendConfig],
    base: &Path,
) -> Result<(), Problem> {
    let mut names = HashSet::new();
    for (i, backend) in backends.iter_mut().enumerate() {
        if let Some(ca) = &mut backend.tls_ca {
            *ca = base.join(&*ca);
        }
        validate_backend_tls(i, backend)?;
        let key = |field: &str| format!("backend[{i}].{field}");
        let name_ok = !backend.name.is_empty()
            && backend.name.len() <= 64
            && backend
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok {
            return Err(Problem::new(
                &key("name"),
                format!(
                    "`{}`: use 1-64 characters from A-Z a-z 0-9 . _ -",
                    backend.name
                ),
            ));
        }
        if !names.insert(backend.name.as_str()) {
            return Err(Problem::new(
                &key("name"),
                format!("`{}` is listed twice", backend.name),
            ));
        }
        if backend.capacity > 1_000_000 {
            return Err(Problem::new(
                &key("capacity"),
                "is a relative weight; use 0..=1000000".into(),
            ));
        }
        for (field, port) in [
            ("pop3_port", backend.pop3_port),
            ("imap_port", backend.imap_port),
            ("lmtp_port", backend.lmtp_port),
            ("smtp_port", backend.smtp_port),
            ("submission_port", backend.submission_port.unwrap_or(587)),
        ] {
            if port == 0 {
                return Err(Problem::new(
                    &key(field),
                    "port 0 is not a backend port".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Checks one backend defined at run time (API) the way the config file's are checked;
/// the message names the field.
pub fn validate_backend(backend: &BackendConfig) -> Result<(), String> {
    let mut one = [backend.clone()];
    validate_backends(&mut one, Path::new("/")).map_err(|p| {
        let field = p.key.rsplit_once('.').map_or(p.key.as_str(), |(_, f)| f);
        format!("`{field}`: {}", p.message)
    })
}

/// `[health]`: active checks and the circuit breaker of every backend service.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_health_interval")]
    pub interval_seconds: u64,
    #[serde(default = "default_health_timeout")]
    pub timeout_seconds: u64,
    /// Consecutive failures (checks or login connects) that mark a service down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Consecutive successful checks that mark it up again.
    #[serde(default = "default_rise")]
    pub rise: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_seconds: default_health_interval(),
            timeout_seconds: default_health_timeout(),
            fall: default_fall(),
            rise: default_rise(),
        }
    }
}

const fn default_health_interval() -> u64 {
    5
}
const fn default_health_timeout() -> u64 {
    2
}
const fn default_fall() -> u32 {
    2
}
const fn default_rise() -> u32 {
    2
}

impl HealthConfig {
    pub const fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.interval_seconds)
    }

    pub const fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_seconds)
    }

    pub(super) fn validate(&self) -> Result<(), Problem> {
        let checks = [
            ("health.interval_seconds", self.interval_seconds, 1, 3600),
            ("health.timeout_seconds", self.timeout_seconds, 1, 60),
            ("health.fall", u64::from(self.fall), 1, 100),
            ("health.rise", u64::from(self.rise), 1, 100),
        ];
        for (key, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(Problem::new(
                    key,
                    format!("{value} is outside {min}..={max}"),
                ));
            }
        }
        if self.timeout_seconds > self.interval_seconds {
            return Err(Problem::new(
                "health.timeout_seconds",
                "must not exceed health.interval_seconds".into(),
            ));
        }
        Ok(())
    }
}

fn validate_backend_tls(i: usize, backend: &BackendConfig) -> Result<(), Problem> {
    let key = |field: &str| format!("backend[{i}].{field}");
    match (&backend.tls_ca, backend.tls) {
        (None, true) => Err(Problem::new(
            &key("tls_ca"),
            "tls = true needs the CA file that signed the backend's certificate".into(),
        )),
        (Some(ca), true) => crate::tls::connector(ca)
            .map(drop)
            .map_err(|e| Problem::new(&key("tls_ca"), format!("{}: {e}", ca.display()))),
        (_, false) => Ok(()),
    }?;
    if let Some(name) = &backend.tls_name
        && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        return Err(Problem::new(
            &key("tls_name"),
            format!("`{name}` is not a DNS name or IP address"),
        ));
    }
    Ok(())
}
