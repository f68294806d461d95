//! `[reputation]`: the proxy's judgement of client behaviour (see `filter::reputation`).
//! Weights are points added to an address's score per event; the score halves every
//! `half_life_seconds`; thresholds turn it into verdicts. `[reputation.weights]` may name
//! any subset of the events, the rest keep their defaults.

use serde::Deserialize;

use super::Problem;
use crate::filter::cidr::Cidr;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReputationConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// IPv6 clients are scored (and banned) per prefix: 64 (a whole /64, what one host
    /// usually owns) or 128 (single addresses).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    #[serde(default = "default_half_life")]
    pub half_life_seconds: u64,
    #[serde(default = "default_tarpit", deserialize_with = "super::de_f32")]
    pub tarpit_score: f32,
    #[serde(default = "default_tempfail", deserialize_with = "super::de_f32")]
    pub tempfail_score: f32,
    #[serde(default = "default_ban", deserialize_with = "super::de_f32")]
    pub ban_score: f32,
    /// Every SMTP reply to a tarpitted client waits this long.
    #[serde(default = "default_tarpit_delay")]
    pub tarpit_delay_ms: u64,
    /// First ban; each further ban of the same address multiplies it by `ban_growth`.
    #[serde(default = "default_ban_seconds")]
    pub ban_seconds: u64,
    #[serde(default = "default_ban_max")]
    pub ban_max_seconds: u64,
    #[serde(default = "default_ban_growth")]
    pub ban_growth: u32,
    /// Addresses (or IPv6 prefixes) remembered; the least recently seen are forgotten first.
    #[serde(default = "default_max_tracked")]
    pub max_tracked: usize,
    /// Networks never tarpitted, refused or banned (their events are still scored, for
    /// `explain`). The `xdp.allowlist` is added to these.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Inbound SMTP: the banner is held back this long after its first line (`220-`);
    /// a client that talks before the final `220 ` line is a pregreeter. 0 turns the test
    /// off; a client that once passed it and behaves skips it afterwards.
    #[serde(default)]
    pub greeting_delay_ms: u64,
    /// A failed login is answered after this delay, doubled for each further failure in
    /// the session, up to `auth_failure_delay_max_ms`.
    #[serde(default = "default_auth_delay")]
    pub auth_failure_delay_ms: u64,
    #[serde(default = "default_auth_delay_max")]
    pub auth_failure_delay_max_ms: u64,
    /// Failed logins (decaying like the scores) after which an account is locked: its
    /// logins get a temporary failure without reaching its backend, except from addresses
    /// it recently logged in from.
    #[serde(
        default = "default_account_failures",
        deserialize_with = "super::de_f32"
    )]
    pub account_failures: f32,
    #[serde(default = "default_account_lock")]
    pub account_lock_seconds: u64,
    /// Accounts tracked for login failures (LRU).
    #[serde(default = "default_max_accounts")]
    pub max_accounts: usize,
    #[serde(default)]
    pub weights: Weights,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// Points per event (negative for good behaviour).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    #[serde(default = "w_pregreet", deserialize_with = "super::de_f32")]
    pub pregreet: f32,
    #[serde(default = "w_pipelining", deserialize_with = "super::de_f32")]
    pub pipelining: f32,
    #[serde(default = "w_bare_line_ending", deserialize_with = "super::de_f32")]
    pub bare_line_ending: f32,
    #[serde(default = "w_non_smtp", deserialize_with = "super::de_f32")]
    pub non_smtp: f32,
    #[serde(default = "w_one", deserialize_with = "super::de_f32")]
    pub unknown_recipient: f32,
    #[serde(default = "w_relay", deserialize_with = "super::de_f32")]
    pub relay_attempt: f32,
    #[serde(default = "w_one", deserialize_with = "super::de_f32")]
    pub auth_failure: f32,
    #[serde(default = "w_two", deserialize_with = "super::de_f32")]
    pub rate_exceeded: f32,
    #[serde(default = "w_one", deserialize_with = "super::de_f32")]
    pub protocol_error: f32,
    #[serde(default = "w_two", deserialize_with = "super::de_f32")]
    pub retry_while_refused: f32,
    #[serde(default = "w_clean", deserialize_with = "super::de_f32")]
    pub clean_session: f32,
    /// A message with malware (`[scan]` with clamd).
    #[serde(default = "w_malware", deserialize_with = "super::de_f32")]
    pub malware: f32,
    /// A message rspamd judged spam (`[scan]` with rspamd).
    #[serde(default = "w_spam", deserialize_with = "super::de_f32")]
    pub spam: f32,
}

impl Default for Weights {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

const fn yes() -> bool {
    true
}
const fn default_ipv6_prefix() -> u8 {
    64
}
const fn default_half_life() -> u64 {
    600
}
const fn default_tarpit() -> f32 {
    5.0
}
const fn default_tempfail() -> f32 {
    10.0
}
const fn default_ban() -> f32 {
    15.0
}
const fn default_tarpit_delay() -> u64 {
    1000
}
const fn default_ban_seconds() -> u64 {
    600
}
const fn default_ban_max() -> u64 {
    86_400
}
const fn default_ban_growth() -> u32 {
    4
}
const fn default_max_tracked() -> usize {
    1_000_000
}
const fn default_auth_delay() -> u64 {
    500
}
const fn default_auth_delay_max() -> u64 {
    4000
}
const fn default_account_failures() -> f32 {
    10.0
}
const fn default_account_lock() -> u64 {
    300
}
const fn default_max_accounts() -> usize {
    100_000
}
const fn w_pregreet() -> f32 {
    6.0
}
const fn w_pipelining() -> f32 {
    4.0
}
const fn w_bare_line_ending() -> f32 {
    3.0
}
const fn w_non_smtp() -> f32 {
    10.0
}
const fn w_one() -> f32 {
    1.0
}
const fn w_two() -> f32 {
    2.0
}
const fn w_relay() -> f32 {
    4.0
}
const fn w_clean() -> f32 {
    -3.0
}
const fn w_malware() -> f32 {
    6.0
}
const fn w_spam() -> f32 {
    3.0
}

impl ReputationConfig {
    /// Checks ranges and order; returns the parsed `allow` networks.
    pub(super) fn validate(&self) -> Result<Vec<Cidr>, Problem> {
        if ![64, 128].contains(&self.ipv6_prefix) {
            return Err(Problem::new(
                "reputation.ipv6_prefix",
                format!(
                    "{} is not supported: use 64 (score and ban whole /64s) or 128 (single addresses)",
                    self.ipv6_prefix
                ),
            ));
        }
        let ranges = [
            (
                "reputation.half_life_seconds",
                self.half_life_seconds,
                1,
                86_400 * 7,
            ),
            (
                "reputation.tarpit_delay_ms",
                self.tarpit_delay_ms,
                0,
                60_000,
            ),
            ("reputation.ban_seconds", self.ban_seconds, 1, 365 * 86_400),
            (
                "reputation.ban_max_seconds",
                self.ban_max_seconds,
                1,
                365 * 86_400,
            ),
            ("reputation.ban_growth", u64::from(self.ban_growth), 1, 100),
            (
                "reputation.max_tracked",
                self.max_tracked as u64,
                1_000,
                100_000_000,
            ),
            (
                "reputation.greeting_delay_ms",
                self.greeting_delay_ms,
                0,
                30_000,
            ),
            (
                "reputation.auth_failure_delay_ms",
                self.auth_failure_delay_ms,
                0,
                60_000,
            ),
            (
                "reputation.auth_failure_delay_max_ms",
                self.auth_failure_delay_max_ms,
                0,
                60_000,
            ),
            (
                "reputation.account_lock_seconds",
                self.account_lock_seconds,
                1,
                86_400 * 7,
            ),
            (
                "reputation.max_accounts",
                self.max_accounts as u64,
                100,
                100_000_000,
            ),
        ];
        for (key, value, low, high) in ranges {
            if !(low..=high).contains(&value) {
                return Err(Problem::new(
                    key,
                    format!("{value} is outside {low}..={high}"),
                ));
            }
        }
        if self.ban_max_seconds < self.ban_seconds {
            return Err(Problem::new(
                "reputation.ban_max_seconds",
                format!(
                    "{} is less than ban_seconds ({}); the longest ban cannot be shorter than the first",
                    self.ban_max_seconds, self.ban_seconds
                ),
            ));
        }
        let scores = [
            ("reputation.tarpit_score", self.tarpit_score),
            ("reputation.tempfail_score", self.tempfail_score),
            ("reputation.ban_score", self.ban_score),
            ("reputation.account_failures", self.account_failures),
        ];
        for (key, value) in scores {
            if !(value.is_finite() && value > 0.0 && value <= 1_000_000.0) {
                return Err(Problem::new(key, format!("{value} is not in (0, 1000000]")));
            }
        }
        if !(self.tarpit_score <= self.tempfail_score && self.tempfail_score <= self.ban_score) {
            return Err(Problem::new(
                "reputation.tempfail_score",
                format!(
                    "thresholds must rise: tarpit_score ({}) <= tempfail_score ({}) <= ban_score ({})",
                    self.tarpit_score, self.tempfail_score, self.ban_score
                ),
            ));
        }
        for (name, value) in self.weights.named() {
            if !(value.is_finite() && value.abs() <= 1000.0) {
                return Err(Problem::new(
                    &format!("reputation.weights.{name}"),
                    format!("{value} is not in -1000..=1000"),
                ));
            }
        }
        let mut allow = Vec::new();
        for (i, text) in self.allow.iter().enumerate() {
            let cidr = text.parse::<Cidr>().map_err(|e| {
                Problem::new(
                    &format!("reputation.allow[{i}]"),
                    format!("{e}; use an address or CIDR like 198.51.100.0/24"),
                )
            })?;
            allow.push(cidr);
        }
        Ok(allow)
    }
}

impl Weights {
    pub fn named(&self) -> [(&'static str, f32); 11] {
        [
            ("pregreet", self.pregreet),
            ("pipelining", self.pipelining),
            ("bare_line_ending", self.bare_line_ending),
            ("non_smtp", self.non_smtp),
            ("unknown_recipient", self.unknown_recipient),
            ("relay_attempt", self.relay_attempt),
            ("auth_failure", self.auth_failure),
            ("rate_exceeded", self.rate_exceeded),
            ("protocol_error", self.protocol_error),
            ("retry_while_refused", self.retry_while_refused),
            ("clean_session", self.clean_session),
        ]
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn error(text: &str) -> String {
        Config::from_toml(
            &format!("[reputation]\n{text}\n"),
            std::path::Path::new("t.toml"),
        )
        .expect_err("invalid")
        .to_string()
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let e = error("ipv6_prefix = 48");
        assert!(
            e.contains("reputation.ipv6_prefix") && e.contains("use 64"),
            "{e}"
        );
        let e = error("tarpit_score = 20.0");
        assert!(e.contains("thresholds must rise"), "{e}");
        let e = error("ban_seconds = 100\nban_max_seconds = 10");
        assert!(e.contains("reputation.ban_max_seconds"), "{e}");
        let e = error("allow = [\"nonsense\"]");
        assert!(e.contains("reputation.allow[0]"), "{e}");
        let e = error("[reputation.weights]\npregreet = inf");
        assert!(e.contains("reputation.weights.pregreet"), "{e}");
        let e = error("[reputation.weights]\npregret = 1.0");
        assert!(e.contains("pregret"), "a typo is an error: {e}");
        let e = error("max_tracked = 10");
        assert!(e.contains("reputation.max_tracked"), "{e}");
    }

    #[test]
    fn defaults_are_valid_and_weights_can_be_partial() {
        let v = Config::from_toml(
            "[reputation]\n[reputation.weights]\npregreet = 20.0\n",
            std::path::Path::new("t.toml"),
        )
        .expect("valid");
        let r = &v.config.reputation;
        assert!(r.enabled);
        assert!((r.weights.pregreet - 20.0).abs() < f32::EPSILON);
        assert!((r.weights.pipelining - 4.0).abs() < f32::EPSILON);
    }
}
