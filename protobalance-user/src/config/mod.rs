//! The TOML configuration: parsed, then validated as a whole before anything binds, so a bad
//! file fails fast with a message that names the key and the fix.
//!
//! Sections: `[admin]` (metrics/API listener), `[shutdown]`, `[xdp]` (kernel filter),
//! `[directory]`, `[[domain]]`, `[[backend]]` (the cluster, in `cluster`), `[reputation]`, `[dnsbl]`. Unknown keys are
//! rejected so a typo never silently does nothing.

mod api;
mod cluster;
mod dnsbl;
mod listeners;
mod moves;
mod reputation;
mod scan;

pub use api::{ApiAccess, ApiConfig, ApiTokenConfig};
pub use cluster::{
    BackendConfig, Delivery, DirectoryConfig, DomainConfig, HealthConfig, PostgresConfig,
    StoreKind, validate_backend,
};
pub use dnsbl::{DnsblConfig, Site as DnsblSite, SiteConfig as DnsblSiteConfig};
pub use listeners::{
    CertificateConfig, LimitsConfig, ListenerConfig, Protocol, SubmissionConfig, TlsMode,
};
pub use moves::MovesConfig;
pub use reputation::{ReputationConfig, Weights};
pub use scan::{ScanConfig, ScanSettings};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::filter::{
    blocklist::{self, NamedList},
    cidr::Cidr,
    xdp::AttachMode,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub xdp: XdpConfig,
    #[serde(default)]
    pub splice: SpliceConfig,
    #[serde(default)]
    pub directory: DirectoryConfig,
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainConfig>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub submission: SubmissionConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateConfig>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub reputation: ReputationConfig,
    #[serde(default)]
    pub dnsbl: DnsblConfig,
    #[serde(default)]
    pub scan: ScanConfig,
    #[serde(default)]
    pub moves: MovesConfig,
}

/// How the edge presents itself: one name and banner for the whole cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Greeting text after `+OK ` (POP3) and `* OK [CAPABILITY …] ` (IMAP).
    #[serde(default = "default_banner")]
    pub banner: String,
    /// The cluster's host name in SMTP greetings (`220 <hostname> ESMTP …`, the first
    /// EHLO line). Default: this machine's host name.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// The mailbox `RCPT TO:<Postmaster>` (no domain, RFC 5321 §4.5.1) is delivered to.
    /// Default: `postmaster@` the first `[[domain]]`.
    pub postmaster: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            banner: default_banner(),
            hostname: default_hostname(),
            postmaster: None,
        }
    }
}

impl Config {
    /// `server.postmaster`, or `postmaster@` the first domain; `None` without domains.
    pub fn postmaster(&self) -> Option<String> {
        self.server.postmaster.clone().or_else(|| {
            self.domains
                .first()
                .map(|d| format!("postmaster@{}", d.name))
        })
    }
}

/// The kernel's host name, or `localhost` when it cannot be read or is not a domain name.
fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| valid_hostname(name))
        .unwrap_or_else(|| "localhost".into())
}

/// A domain name as SMTP greetings carry it: dot-separated labels of letters, digits and
/// inner hyphens, each 1-63 octets, 253 in all.
pub fn valid_hostname(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn default_banner() -> String {
    "Mail service ready.".into()
}

/// A validation failure before the file path is attached.
#[derive(Debug)]
pub(crate) struct Problem {
    key: String,
    message: String,
}

impl Problem {
    pub(crate) fn new(key: &str, message: String) -> Self {
        Self {
            key: key.to_owned(),
            message,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serves `/metrics` and `/healthz`. Binds loopback by default: it is not for the Internet.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// HTTPS (TLS from the first byte) with the `[[certificate]]`s, chosen by SNI like the
    /// mail listeners': for an admin listener (and its XML API tokens) off loopback.
    #[serde(default)]
    pub tls: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            tls: false,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9925))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long sessions get to finish after SIGTERM/SIGINT before they are cut.
    #[serde(default = "default_grace_seconds")]
    pub grace_seconds: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_seconds: default_grace_seconds(),
        }
    }
}

const fn default_grace_seconds() -> u64 {
    30
}

impl ShutdownConfig {
    pub const fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_seconds)
    }
}

/// Where a logged-in POP3/IMAP session's bytes are moved.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpliceConfig {
    #[serde(default)]
    pub kernel: KernelSplice,
}

/// `off` (the default): relayed in user space, the cheaper way for the short sessions most
/// mail clients make; `auto`: plain-TCP sessions are spliced in the kernel (a sockhash with
/// a stream-verdict program) when the program loads (root, or CAP_BPF + CAP_NET_ADMIN),
/// else relayed in user space with a warning — cheaper for bulk transfers (see
/// docs/operations.md, "Kernel splice").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelSplice {
    Auto,
    #[default]
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    /// Interface to attach the kernel filter to; without it no XDP program is loaded.
    pub interface: Option<String>,
    #[serde(default)]
    pub mode: AttachMode,
    /// bpffs directory for pinned maps/links; blocklists then survive restarts.
    pub pin_dir: Option<PathBuf>,
    /// Networks to drop in the kernel, e.g. `["192.0.2.0/24", "2001:db8:bad::/48"]`.
    #[serde(default)]
    pub blocklist: Vec<String>,
    /// Files with one CIDR per line (`#` comments); relative paths are from the config file.
    #[serde(default)]
    pub blocklist_files: Vec<PathBuf>,
    /// Networks that always pass, before blocklists and bans (monitoring, partners).
    #[serde(default)]
    pub allowlist: Vec<String>,
    /// Files like `blocklist_files`, for the allowlist.
    #[serde(default)]
    pub allowlist_files: Vec<PathBuf>,
    /// SYNs per second one source (IPv4 address, IPv6 /64) may send to the limited ports,
    /// on average; 0 turns the kernel SYN limiter off.
    #[serde(default)]
    pub syn_rate_per_second: u32,
    /// SYNs one source may send at once before the rate applies (the bucket's capacity).
    #[serde(default = "default_syn_burst")]
    pub syn_burst: u32,
    /// How long a source that exceeded the rate has all its SYNs to the ports dropped.
    #[serde(default = "default_syn_penalty_seconds")]
    pub syn_penalty_seconds: u64,
    /// Destination ports the limiter watches; empty = the ports of the `[[listener]]`s.
    #[serde(default)]
    pub syn_limited_ports: Vec<u16>,
    /// The blocklists one by one, filled in by validation: `blocklist` first, then one per
    /// file (named by its file name); drops are counted per list. Not read from the file.
    #[serde(skip)]
    pub blocklists: Vec<NamedList>,
}

impl Default for XdpConfig {
    fn default() -> Self {
        Self {
            interface: None,
            mode: AttachMode::default(),
            pin_dir: None,
            blocklist: Vec::new(),
            blocklist_files: Vec::new(),
            allowlist: Vec::new(),
            allowlist_files: Vec::new(),
            syn_rate_per_second: 0,
            syn_burst: default_syn_burst(),
            syn_penalty_seconds: default_syn_penalty_seconds(),
            syn_limited_ports: Vec::new(),
            blocklists: Vec::new(),
        }
    }
}

const fn default_syn_burst() -> u32 {
    20
}
const fn default_syn_penalty_seconds() -> u64 {
    60
}

impl XdpConfig {
    /// Most ports `syn_limited_ports` may list (the size of the kernel's port map).
    pub const MAX_SYN_LIMITED_PORTS: usize = protobalance_common::SYN_PORTS_MAX_ENTRIES as usize;
    /// Highest `syn_rate_per_second` and `syn_burst`.
    pub const MAX_SYN_RATE: u32 = 1_000_000;

    /// `blocklist` and each of `blocklist_files` as named lists (see [`blocklist::name_lists`]);
    /// errors name the key.
    fn named_blocklists(&self, base: &Path) -> Result<Vec<NamedList>, (String, String)> {
        let max_files = protobalance_common::LISTS_MAX as usize - 2;
        if self.blocklist_files.len() > max_files {
            return Err((
                "xdp.blocklist_files".into(),
                format!(
                    "{} files; the kernel counts drops for at most {max_files} lists: merge some",
                    self.blocklist_files.len()
                ),
            ));
        }
        let inline = cidr_list(&self.blocklist, &[], "xdp.blocklist", base)?;
        let mut files = Vec::with_capacity(self.blocklist_files.len());
        for (i, file) in self.blocklist_files.iter().enumerate() {
            let entries = blocklist::read(&base.join(file))
                .map_err(|e| (format!("xdp.blocklist_files[{i}]"), e.to_string()))?;
            files.push((file.as_path(), entries));
        }
        Ok(blocklist::name_lists(inline, files))
    }

    /// The SYN limiter keys; `have_listeners` says whether an empty port list can be
    /// filled from the `[[listener]]`s.
    fn validate_syn_limit(&self, have_listeners: bool) -> Result<(), Problem> {
        let rate = self.syn_rate_per_second;
        if rate > Self::MAX_SYN_RATE {
            return Err(Problem::new(
                "xdp.syn_rate_per_second",
                format!("{rate} is outside 0..={} (0 = off)", Self::MAX_SYN_RATE),
            ));
        }
        let burst = self.syn_burst;
        if burst > Self::MAX_SYN_RATE || (rate > 0 && burst == 0) {
            return Err(Problem::new(
                "xdp.syn_burst",
                format!(
                    "{burst} is outside 1..={}; with the limiter on, a source must be able \
                     to open at least one connection",
                    Self::MAX_SYN_RATE
                ),
            ));
        }
        if !(1..=86_400).contains(&self.syn_penalty_seconds) {
            return Err(Problem::new(
                "xdp.syn_penalty_seconds",
                format!("{} is outside 1..=86400", self.syn_penalty_seconds),
            ));
        }
        let ports = &self.syn_limited_ports;
        if ports.len() > Self::MAX_SYN_LIMITED_PORTS {
            return Err(Problem::new(
                "xdp.syn_limited_ports",
                format!(
                    "{} ports listed; at most {}",
                    ports.len(),
                    Self::MAX_SYN_LIMITED_PORTS
                ),
            ));
        }
        if let Some(i) = ports.iter().position(|p| *p == 0) {
            return Err(Problem::new(
                &format!("xdp.syn_limited_ports[{i}]"),
                "port 0 is not a port; use the mail ports, e.g. [25, 587, 110, 143]".into(),
            ));
        }
        if rate > 0 && self.interface.is_none() {
            return Err(Problem::new(
                "xdp.syn_rate_per_second",
                "the SYN limiter runs in the kernel filter: set xdp.interface, or 0 to turn it off"
                    .into(),
            ));
        }
        if rate > 0 && ports.is_empty() && !have_listeners {
            return Err(Problem::new(
                "xdp.syn_limited_ports",
                "the SYN limiter is on but there are no [[listener]]s to take the ports from; \
                 list the ports to limit, e.g. [25, 587]"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A config error: which key, what is wrong, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

/// A number for an `f32` key, written as an integer (`weight = 3`) or not (`3.5`).
pub(crate) fn de_f32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(i64),
        Float(f64),
    }
    Ok(match Number::deserialize(d)? {
        #[expect(clippy::cast_precision_loss, reason = "config weights are small")]
        Number::Int(i) => i as f32,
        #[expect(clippy::cast_possible_truncation, reason = "config weights are small")]
        Number::Float(f) => f as f32,
    })
}

/// The validated configuration plus what validation derived from it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    /// Every blocklist entry, inline and from files, parsed.
    pub blocklist: Vec<Cidr>,
    /// Every allowlist entry, inline and from files, parsed.
    pub allowlist: Vec<Cidr>,
    /// `reputation.allow`, parsed (the engine adds `allowlist`).
    pub reputation_allow: Vec<Cidr>,
    /// `[[dnsbl.site]]`, checked.
    pub dnsbl_sites: Vec<DnsblSite>,
    /// `[scan]`, checked; `None` when no scanner is configured.
    pub scan: Option<ScanSettings>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Validated, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates; `path` is used for messages and to resolve relative paths.
    pub fn from_toml(text: &str, path: &Path) -> Result<Validated, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        config.validate(path)
    }

    fn validate(mut self, path: &Path) -> Result<Validated, ConfigError> {
        let to_error = |p: Problem| ConfigError::Invalid {
            path: path.display().to_string(),
            key: p.key,
            message: p.message,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        self.directory.validate(base).map_err(to_error)?;
        cluster::validate_domains(&self.domains, &self.directory.normalizer()).map_err(to_error)?;
        cluster::validate_backends(&mut self.backends, base).map_err(to_error)?;
        for cert in &mut self.certificates {
            cert.cert = base.join(&cert.cert);
            cert.key = base.join(&cert.key);
        }
        // Loading the certificates is the only full check of the cert and key files.
        crate::tls::acceptor(&self.certificates).map_err(|e| {
            let key = match &e {
                crate::tls::TlsError::Load { index, .. } => format!("certificate[{index}]"),
                crate::tls::TlsError::Rustls(_) => "certificate".to_owned(),
            };
            to_error(Problem::new(&key, e.to_string()))
        })?;
        let have_certs = !self.certificates.is_empty();
        if self.admin.tls && !have_certs {
            return Err(to_error(Problem::new(
                "admin.tls",
                "TLS needs a certificate: add a [[certificate]] with cert and key".into(),
            )));
        }
        listeners::validate_listeners(&self.listeners, !self.backends.is_empty(), have_certs)
            .map_err(to_error)?;
        self.limits.validate().map_err(to_error)?;
        self.submission.validate().map_err(to_error)?;
        self.api.validate(base).map_err(to_error)?;
        let reputation_allow = self.reputation.validate().map_err(to_error)?;
        let dnsbl_sites = self.dnsbl.validate().map_err(to_error)?;
        let scan = self.scan.validate().map_err(to_error)?;
        self.moves.validate(base).map_err(to_error)?;
        if self
            .listeners
            .iter()
            .any(|l| l.protocol == Protocol::Submission)
            && let Some(i) = self
                .backends
                .iter()
                .position(|b| b.submission_port.is_none())
        {
            return Err(to_error(Problem::new(
                &format!("backend[{i}].submission_port"),
                "a submission listener is configured: set the port where this backend takes authenticated submission (e.g. 587, Postfix with Dovecot SASL)".into(),
            )));
        }
        self.health.validate().map_err(to_error)?;
        if self.server.banner.is_empty()
            || self.server.banner.len() > 200
            || self.server.banner.chars().any(char::is_control)
        {
            return Err(to_error(Problem::new(
                "server.banner",
                "use 1-200 printable characters".into(),
            )));
        }
        if !valid_hostname(&self.server.hostname) {
            return Err(to_error(Problem::new(
                "server.hostname",
                format!(
                    "{:?} is not a domain name; use letters, digits, hyphens and dots, e.g. \"mx.example.net\"",
                    self.server.hostname
                ),
            )));
        }
        if let Some(postmaster) = &self.server.postmaster {
            let ours = postmaster.rsplit_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && self.domains.iter().any(|d| d.name == domain)
            });
            if !ours {
                return Err(to_error(Problem::new(
                    "server.postmaster",
                    format!(
                        "{postmaster:?}: use a mailbox in one of the [[domain]]s, e.g. \"postmaster@example.com\""
                    ),
                )));
            }
        }
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            key: key.to_owned(),
            message,
        };
        if self.shutdown.grace_seconds > 3600 {
            return Err(invalid(
                "shutdown.grace_seconds",
                format!(
                    "{} s is more than an hour; use at most 3600",
                    self.shutdown.grace_seconds
                ),
            ));
        }
        let xdp = &self.xdp;
        xdp.validate_syn_limit(!self.listeners.is_empty())
            .map_err(to_error)?;
        if let Some(iface) = &xdp.interface
            && (iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']))
        {
            return Err(invalid(
                "xdp.interface",
                format!("`{iface}` is not a valid interface name (1-15 chars, no '/' or spaces)"),
            ));
        }
        if let Some(dir) = &xdp.pin_dir
            && !dir.is_absolute()
        {
            return Err(invalid(
                "xdp.pin_dir",
                format!(
                    "`{}` must be an absolute path on bpffs, e.g. /sys/fs/bpf/protobalance",
                    dir.display()
                ),
            ));
        }
        let blocklists = xdp
            .named_blocklists(base)
            .map_err(|(key, message)| invalid(&key, message))?;
        let entries: Vec<Cidr> = blocklists.iter().flat_map(|l| l.entries.clone()).collect();
        let allow = cidr_list(&xdp.allowlist, &xdp.allowlist_files, "xdp.allowlist", base)
            .map_err(|(key, message)| invalid(&key, message))?;
        if xdp.interface.is_none() && !(entries.is_empty() && allow.is_empty()) {
            return Err(invalid(
                "xdp.interface",
                "blocklist or allowlist entries are configured but no interface to filter on; \
                 set xdp.interface or remove the lists"
                    .into(),
            ));
        }
        self.xdp.blocklists = blocklists;
        Ok(Validated {
            config: self,
            blocklist: entries,
            allowlist: allow,
            reputation_allow,
            dnsbl_sites,
            scan,
        })
    }
}

/// Inline CIDRs (`{key}`) plus those of the files (`{key}_files`); errors name the key.
fn cidr_list(
    inline: &[String],
    files: &[PathBuf],
    key: &str,
    base: &Path,
) -> Result<Vec<Cidr>, (String, String)> {
    let mut entries = Vec::new();
    for (i, raw) in inline.iter().enumerate() {
        let cidr = raw
            .parse::<Cidr>()
            .map_err(|e| (format!("{key}[{i}]"), e.to_string()))?;
        entries.push(cidr);
    }
    for (i, file) in files.iter().enumerate() {
        let list = blocklist::read(&base.join(file))
            .map_err(|e| (format!("{key}_files[{i}]"), e.to_string()))?;
        entries.extend(list);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Validated, ConfigError> {
        Config::from_toml(text, Path::new("/etc/protobalance/test.toml"))
    }

    #[test]
    fn hostnames_are_domain_names() {
        for good in ["mx.example.net", "localhost", "a-1.b2"] {
            assert!(valid_hostname(good), "{good}");
        }
        let long = format!("{}.net", "a".repeat(64));
        for bad in [
            "",
            "mx..net",
            "-a.net",
            "a-.net",
            "a_b.net",
            "mx example",
            &long,
        ] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
        assert!(valid_hostname(&ServerConfig::default().hostname));
    }

    #[test]
    fn empty_file_gets_defaults() {
        let v = check("").expect("defaults are valid");
        assert_eq!(v.config.admin.listen.to_string(), "127.0.0.1:9925");
        assert_eq!(v.config.shutdown.grace_seconds, 30);
        assert!(v.config.xdp.interface.is_none());
        // Short sessions cost less CPU relayed in user space (docs/operations.md).
        assert_eq!(v.config.splice.kernel, KernelSplice::Off);
        let auto = check("[splice]\nkernel = \"auto\"\n").expect("valid");
        assert_eq!(auto.config.splice.kernel, KernelSplice::Auto);
    }

    #[test]
    fn cluster_sections_parse_and_resolve_paths() {
        let v = check(
            "[directory]\npath = \"dir.db\"\nmaster_separator = \"*\"\n\
             [[domain]]\nname = \"example.com\"\nunknown_mailbox = \"auto-provision\"\n\
             [[backend]]\nname = \"b1\"\naddress = \"127.0.1.1\"\ncapacity = 5\n",
        )
        .expect("valid");
        assert_eq!(
            v.config.directory.path,
            Path::new("/etc/protobalance/dir.db")
        );
        assert_eq!(v.config.directory.normalizer().master_separator, Some('*'));
        assert_eq!(v.config.backends[0].pop3_port, 110);
        assert_eq!(
            v.config.domains[0].unknown_mailbox,
            crate::directory::DomainPolicy::AutoProvision
        );
    }

    #[test]
    fn cluster_errors_name_the_key() {
        let cases = [
            (
                "[[backend]]\nname = \"b 1\"\naddress = \"127.0.1.1\"\n",
                "`backend[0].name`",
            ),
            (
                "[[backend]]\nname = \"b\"\naddress = \"127.0.1.1\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.1.2\"\n",
                "`backend[1].name`",
            ),
            (
                "[[backend]]\nname = \"b\"\naddress = \"127.0.1.1\"\npop3_port = 0\n",
                "`backend[0].pop3_port`",
            ),
            ("[[domain]]\nname = \"Example.COM\"\n", "`domain[0].name`"),
            (
                "[[domain]]\nname = \"example.com\"\nunknown_mailbox = \"accept\"\n",
                "accept",
            ),
            (
                "[directory]\ntag_separator = \"++\"\n",
                "`directory.tag_separator`",
            ),
            (
                "[directory]\ntag_separator = \"*\"\nmaster_separator = \"*\"\n",
                "`directory.master_separator`",
            ),
            ("[admin]\ntls = true\n", "`admin.tls`"),
            ("[server]\nhostname = \"mx example\"\n", "`server.hostname`"),
            (
                "[server]\nhostname = \"-mx.example\"\n",
                "`server.hostname`",
            ),
            (
                "[server]\nhostname = \"mx..example\"\n",
                "`server.hostname`",
            ),
            (
                "[directory]\nstore = \"postgres\"\n[directory.postgres]\n\
                 url = \"host=127.0.0.1 sslmode=require\"\n",
                "`directory.postgres.url`",
            ),
            (
                "[directory]\nstore = \"postgres\"\n[directory.postgres]\n\
                 url = \"host=127.0.0.1\"\nca_file = \"/nonexistent/pg-ca.pem\"\n",
                "`directory.postgres.ca_file`",
            ),
        ];
        for (text, key) in cases {
            let err = check(text).expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let err = check("[xdp]\ninterface = \"eth0\"\nblocklist = [\"10.0.0.1/8\"]\n")
            .expect_err("host bits");
        assert!(err.to_string().contains("`xdp.blocklist[0]`"), "{err}");
        let err = check("[admin]\nlisten = \"localhost\"\n").expect_err("not a socket addr");
        assert!(
            err.to_string().contains("admin.listen") || err.to_string().contains("listen"),
            "{err}"
        );
        let err = check("[xdp]\ninterfac = \"eth0\"\n").expect_err("typo");
        assert!(err.to_string().contains("interfac"), "{err}");
        let err =
            check("[xdp]\ninterface = \"eth0\"\nallowlist = [\"nope\"]\n").expect_err("bad allow");
        assert!(err.to_string().contains("`xdp.allowlist[0]`"), "{err}");
        let err = check("[xdp]\nblocklist = [\"192.0.2.0/24\"]\n").expect_err("no iface");
        assert!(err.to_string().contains("`xdp.interface`"), "{err}");
        let err = check("[xdp]\ninterface = \"a/b\"\n").expect_err("bad iface");
        assert!(err.to_string().contains("`xdp.interface`"), "{err}");
        let err = check("[xdp]\ninterface = \"eth0\"\nmode = \"turbo\"\n").expect_err("bad mode");
        assert!(err.to_string().contains("turbo"), "{err}");
    }
}
