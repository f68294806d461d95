//! `[[listener]]` (the mail ports the edge serves) and `[limits]` (what one client may do).

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::Problem;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Pop3,
    Imap,
    /// Inbound mail (MX, port 25) delivered to the owner's LMTP or SMTP service.
    Smtp,
    /// Authenticated submission (587 STARTTLS, 465 implicit TLS) for relay clients,
    /// handed to the user's backend's `submission_port`.
    Submission,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pop3 => "pop3",
            Self::Imap => "imap",
            Self::Smtp => "smtp",
            Self::Submission => "submission",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub protocol: Protocol,
    /// e.g. `"0.0.0.0:110"` in production, a loopback address in tests.
    pub listen: SocketAddr,
    /// `starttls` (plaintext, STLS/STARTTLS offered), `implicit` (TLS from the first
    /// byte: 995, 993) or `none`. Default: `starttls` when a `[[certificate]]` exists.
    pub tls: Option<TlsMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

impl ListenerConfig {
    /// The effective mode: explicit, or `starttls` when certificates exist.
    pub fn tls_mode(&self, have_certificates: bool) -> TlsMode {
        self.tls.unwrap_or(if have_certificates {
            TlsMode::Starttls
        } else {
            TlsMode::None
        })
    }
}

/// `[[certificate]]`: a PEM chain and key, served for its SNI `names` (exact or
/// `*.example.com`); the first one is the default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    #[serde(default)]
    pub names: Vec<String>,
    /// PEM certificate chain, leaf first; relative paths are from the config file.
    pub cert: std::path::PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Failed logins in one session before it is closed.
    #[serde(default = "default_max_auth_failures")]
    pub max_auth_failures: u32,
    /// Seconds a client may take to log in (whole pre-login phase).
    #[serde(default = "default_pre_auth_timeout")]
    pub pre_auth_timeout_seconds: u64,
    /// Seconds without a byte in either direction before a proxied session is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// Concurrent sessions from one client address, all listeners together.
    #[serde(default = "default_sessions_per_ip")]
    pub max_sessions_per_ip: u32,
    /// Longest command line a client may send before login (the codecs' own bounds, 1024
    /// for POP3 and 8192 for IMAP, still apply above it).
    #[serde(default = "default_max_line")]
    pub max_line_octets: usize,
    /// Seconds to wait for a backend's TCP connect.
    #[serde(default = "default_connect_timeout")]
    pub backend_connect_timeout_seconds: u64,
    /// Largest message SMTP accepts, in octets as RFC 1870 counts them (advertised as
    /// `SIZE`; larger ones get `552 5.3.4`).
    #[serde(default = "default_max_message")]
    pub max_message_octets: u64,
    /// Idle delivery sessions (LMTP/SMTP) kept per backend for the next inbound message;
    /// 0: a new connection for every message.
    #[serde(default = "default_idle_sessions")]
    pub backend_idle_sessions: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_auth_failures: default_max_auth_failures(),
            pre_auth_timeout_seconds: default_pre_auth_timeout(),
            idle_timeout_seconds: default_idle_timeout(),
            max_sessions_per_ip: default_sessions_per_ip(),
            backend_connect_timeout_seconds: default_connect_timeout(),
            max_line_octets: default_max_line(),
            max_message_octets: default_max_message(),
            backend_idle_sessions: default_idle_sessions(),
        }
    }
}

const fn default_max_auth_failures() -> u32 {
    3
}
const fn default_pre_auth_timeout() -> u64 {
    60
}
const fn default_idle_timeout() -> u64 {
    1800
}
const fn default_sessions_per_ip() -> u32 {
    20
}
const fn default_max_line() -> usize {
    8192
}
const fn default_connect_timeout() -> u64 {
    3
}
const fn default_idle_sessions() -> usize {
    16
}
const fn default_max_message() -> u64 {
    25 * 1024 * 1024
}

impl LimitsConfig {
    pub const fn pre_auth_timeout(&self) -> Duration {
        Duration::from_secs(self.pre_auth_timeout_seconds)
    }
    pub const fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_seconds)
    }
    pub const fn backend_connect_timeout(&self) -> Duration {
        Duration::from_secs(self.backend_connect_timeout_seconds)
    }

    pub(super) fn validate(&self) -> Result<(), Problem> {
        let checks = [
            (
                "limits.max_auth_failures",
                u64::from(self.max_auth_failures),
                1,
                100,
            ),
            (
                "limits.pre_auth_timeout_seconds",
                self.pre_auth_timeout_seconds,
                1,
                3600,
            ),
            (
                "limits.idle_timeout_seconds",
                self.idle_timeout_seconds,
                1,
                86_400,
            ),
            (
                "limits.backend_idle_sessions",
                self.backend_idle_sessions as u64,
                0,
                10_000,
            ),
            (
                "limits.max_sessions_per_ip",
                u64::from(self.max_sessions_per_ip),
                1,
                100_000,
            ),
            (
                "limits.backend_connect_timeout_seconds",
                self.backend_connect_timeout_seconds,
                1,
                60,
            ),
            (
                "limits.max_line_octets",
                self.max_line_octets as u64,
                256,
                65_536,
            ),
            (
                "limits.max_message_octets",
                self.max_message_octets,
                1024,
                1 << 31,
            ),
        ];
        for (key, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(Problem::new(
                    key,
                    format!("{value} is outside {min}..={max}"),
                ));
            }
        }
        Ok(())
    }
}

/// `[submission]`: what one authenticated user may send through the submission listeners
/// (counted per edge node, as token buckets refilled evenly over the hour).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmissionConfig {
    #[serde(default = "default_messages_per_hour")]
    pub max_messages_per_hour: u32,
    #[serde(default = "default_recipients_per_message")]
    pub max_recipients_per_message: u32,
    #[serde(default = "default_recipients_per_hour")]
    pub max_recipients_per_hour: u32,
    /// Suspension (relay clients with malware): more distinct recipients in an hour …
    #[serde(default = "default_distinct_per_hour")]
    pub max_distinct_recipients_per_hour: u32,
    /// … or this share of recipients refused by the backend (once there are
    /// `rejected_share_min_recipients` in the hour) …
    #[serde(default = "default_rejected_share", deserialize_with = "super::de_f32")]
    pub max_rejected_recipient_share: f32,
    #[serde(default = "default_share_min")]
    pub rejected_share_min_recipients: u32,
    /// … or this many refusals for a limit in an hour suspend the account from sending
    /// for `suspend_seconds`.
    #[serde(default = "default_suspend_after")]
    pub suspend_after_limit_hits: u32,
    #[serde(default = "default_suspend_seconds")]
    pub suspend_seconds: u64,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

const fn default_distinct_per_hour() -> u32 {
    500
}
const fn default_rejected_share() -> f32 {
    0.5
}
const fn default_share_min() -> u32 {
    20
}
const fn default_suspend_after() -> u32 {
    20
}
const fn default_suspend_seconds() -> u64 {
    3600
}

const fn default_messages_per_hour() -> u32 {
    200
}
const fn default_recipients_per_message() -> u32 {
    100
}
const fn default_recipients_per_hour() -> u32 {
    1000
}

impl SubmissionConfig {
    pub(super) fn validate(&self) -> Result<(), Problem> {
        let checks = [
            (
                "submission.max_messages_per_hour",
                self.max_messages_per_hour,
            ),
            (
                "submission.max_recipients_per_message",
                self.max_recipients_per_message,
            ),
            (
                "submission.max_recipients_per_hour",
                self.max_recipients_per_hour,
            ),
            (
                "submission.max_distinct_recipients_per_hour",
                self.max_distinct_recipients_per_hour,
            ),
            (
                "submission.rejected_share_min_recipients",
                self.rejected_share_min_recipients,
            ),
            (
                "submission.suspend_after_limit_hits",
                self.suspend_after_limit_hits,
            ),
        ];
        for (key, value) in checks {
            if !(1..=1_000_000).contains(&value) {
                return Err(Problem::new(key, format!("{value} is outside 1..=1000000")));
            }
        }
        let share = self.max_rejected_recipient_share;
        if !(share > 0.0 && share <= 1.0) {
            return Err(Problem::new(
                "submission.max_rejected_recipient_share",
                format!("{share} is not a share in (0, 1], e.g. 0.5"),
            ));
        }
        if !(1..=30 * 86_400).contains(&self.suspend_seconds) {
            return Err(Problem::new(
                "submission.suspend_seconds",
                format!("{} is outside 1..=2592000", self.suspend_seconds),
            ));
        }
        Ok(())
    }
}

pub(super) fn validate_listeners(
    listeners: &[ListenerConfig],
    have_backends: bool,
    have_certificates: bool,
) -> Result<(), Problem> {
    let mut seen = HashSet::new();
    for (i, listener) in listeners.iter().enumerate() {
        if !seen.insert(listener.listen) {
            return Err(Problem::new(
                &format!("listener[{i}].listen"),
                format!("{} is used twice", listener.listen),
            ));
        }
        if listener.tls_mode(have_certificates) != TlsMode::None && !have_certificates {
            return Err(Problem::new(
                &format!("listener[{i}].tls"),
                "TLS needs a certificate: add a [[certificate]] with cert and key".into(),
            ));
        }
        if listener.protocol == Protocol::Submission
            && listener.tls_mode(have_certificates) == TlsMode::None
        {
            return Err(Problem::new(
                &format!("listener[{i}].tls"),
                "submission offers AUTH only over TLS: use \"starttls\" (587) or \"implicit\" (465) and a [[certificate]]".into(),
            ));
        }
    }
    if !listeners.is_empty() && !have_backends {
        return Err(Problem::new(
            "backend",
            "mail listeners are configured but no [[backend]] to route to".into(),
        ));
    }
    Ok(())
}
