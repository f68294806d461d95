//! `[scan]`: content scanning of inbound SMTP mail with rspamd (spam) and clamd (malware),
//! see `crate::scan`. Off unless `rspamd` or `clamd` is set.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::Problem;
use crate::scan::{ClamdAddr, FailureAction, Policy, SpamAction};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanConfig {
    /// rspamd's normal worker (or proxy in self-scan mode), e.g. `127.0.0.1:11333`.
    #[serde(default)]
    pub rspamd: Option<SocketAddr>,
    /// clamd: a socket path (`/run/clamav/clamd.ctl`) or `host:port`.
    #[serde(default)]
    pub clamd: Option<String>,
    /// clamd gets at most this much of a message: set it to clamd's `StreamMaxLength`
    /// (Debian's default: 25 MiB). The rest of a bigger message is not virus-scanned, and
    /// its `X-Virus-Scanned` header says so.
    #[serde(default = "default_clamd_max")]
    pub clamd_max_bytes: u64,
    /// How long after the end of a message the verdicts may take (and how long a scanner
    /// may hold up the transfer); past it, `on_failure` applies.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// A message is held in memory up to this size, then in an unlinked file in `spool_dir`.
    #[serde(default = "default_memory")]
    pub memory_bytes: usize,
    /// Where big messages are held while scanned; default: the system's temp directory.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    #[serde(flatten)]
    pub policy: PolicyConfig,
    /// Per-domain policies (`[[scan.domain]]`); a message to several domains gets the most
    /// severe outcome of their policies.
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainPolicyConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Spam at this rspamd score or more; unset: when rspamd's own action is `reject`.
    #[serde(default)]
    pub reject_score: Option<f64>,
    /// Tagged (`X-Spam-Flag: YES`) at this score or more; unset: when rspamd's action is
    /// `add header` or `rewrite subject`.
    #[serde(default)]
    pub tag_score: Option<f64>,
    /// `reject` (default: `550 5.7.1`) or `tag` (deliver with `X-Spam-Flag: YES`).
    #[serde(default)]
    pub spam: Option<SpamAction>,
    /// `tempfail` (default: `451 4.7.1`) or `accept` (deliver with `X-Scan-Warning`).
    #[serde(default)]
    pub on_failure: Option<FailureAction>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicyConfig {
    pub domain: String,
    #[serde(flatten)]
    pub policy: PolicyConfig,
}

impl Default for ScanConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

const fn default_timeout() -> u64 {
    10_000
}
const fn default_memory() -> usize {
    1 << 20
}
const fn default_clamd_max() -> u64 {
    25 << 20
}

impl PolicyConfig {
    /// This policy, with what it leaves unset taken from `base`.
    fn over(&self, base: Policy) -> Policy {
        Policy {
            reject_score: self.reject_score.or(base.reject_score),
            tag_score: self.tag_score.or(base.tag_score),
            spam: self.spam.unwrap_or(base.spam),
            on_failure: self.on_failure.unwrap_or(base.on_failure),
        }
    }
}

/// `[scan]` checked, ready for `Scanner::new`.
#[derive(Debug, Clone)]
pub struct ScanSettings {
    pub rspamd: Option<SocketAddr>,
    pub clamd: Option<ClamdAddr>,
    pub clamd_max_bytes: u64,
    pub timeout: Duration,
    pub memory_bytes: usize,
    pub spool_dir: PathBuf,
    pub default_policy: Policy,
    pub domains: HashMap<String, Policy>,
}

impl ScanConfig {
    pub fn enabled(&self) -> bool {
        self.rspamd.is_some() || self.clamd.is_some()
    }

    pub(super) fn validate(&self) -> Result<Option<ScanSettings>, Problem> {
        if !self.enabled() {
            return Ok(None);
        }
        if !(100..=300_000).contains(&self.timeout_ms) {
            return Err(Problem::new(
                "scan.timeout_ms",
                format!("{} is not in 100..=300000", self.timeout_ms),
            ));
        }
        if !(4096..=(1 << 30)).contains(&self.memory_bytes) {
            return Err(Problem::new(
                "scan.memory_bytes",
                format!("{} is not in 4096..=1073741824", self.memory_bytes),
            ));
        }
        if self.clamd_max_bytes < 1 << 20 {
            return Err(Problem::new(
                "scan.clamd_max_bytes",
                format!("{} is below 1 MiB (1048576)", self.clamd_max_bytes),
            ));
        }
        let clamd = self
            .clamd
            .as_deref()
            .map(ClamdAddr::parse)
            .transpose()
            .map_err(|e| Problem::new("scan.clamd", e))?;
        let check_scores = |key: &str, p: &PolicyConfig| -> Result<(), Problem> {
            for (name, score) in [("reject_score", p.reject_score), ("tag_score", p.tag_score)] {
                if score.is_some_and(|s| !s.is_finite()) {
                    return Err(Problem::new(
                        &format!("{key}.{name}"),
                        "not a finite number".into(),
                    ));
                }
            }
            Ok(())
        };
        check_scores("scan", &self.policy)?;
        let default_policy = self.policy.over(Policy {
            reject_score: None,
            tag_score: None,
            spam: SpamAction::Reject,
            on_failure: FailureAction::Tempfail,
        });
        let mut domains = HashMap::new();
        for (i, d) in self.domains.iter().enumerate() {
            let key = format!("scan.domain[{i}]");
            check_scores(&key, &d.policy)?;
            let domain = d.domain.trim().trim_end_matches('.').to_lowercase();
            if domain.is_empty() || domain.contains('@') {
                return Err(Problem::new(
                    &format!("{key}.domain"),
                    format!("`{}` is not a domain", d.domain),
                ));
            }
            if domains
                .insert(domain, d.policy.over(default_policy))
                .is_some()
            {
                return Err(Problem::new(
                    &format!("{key}.domain"),
                    format!("`{}` has a policy already", d.domain),
                ));
            }
        }
        let spool_dir = self.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
        if !spool_dir.is_dir() {
            return Err(Problem::new(
                "scan.spool_dir",
                format!("{} is not a directory", spool_dir.display()),
            ));
        }
        Ok(Some(ScanSettings {
            rspamd: self.rspamd,
            clamd,
            clamd_max_bytes: self.clamd_max_bytes,
            timeout: Duration::from_millis(self.timeout_ms),
            memory_bytes: self.memory_bytes,
            spool_dir,
            default_policy,
            domains,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<ScanSettings>, Problem> {
        toml::from_str::<ScanConfig>(text).expect("toml").validate()
    }

    #[test]
    fn off_by_default_and_domain_policies_inherit() {
        assert!(parse("").expect("valid").is_none());
        let s = parse(
            "rspamd = \"127.0.0.1:11333\"\nclamd = \"/run/clamav/clamd.ctl\"\n\
             reject_score = 12.5\non_failure = \"accept\"\n\
             [[domain]]\ndomain = \"Example.COM\"\nspam = \"tag\"\n",
        )
        .expect("valid")
        .expect("on");
        assert_eq!(s.default_policy.reject_score, Some(12.5));
        assert_eq!(s.default_policy.on_failure, FailureAction::Accept);
        let example = s.domains["example.com"];
        assert_eq!(example.spam, SpamAction::Tag);
        assert_eq!(example.reject_score, Some(12.5), "inherited");
        assert_eq!(
            s.clamd,
            Some(ClamdAddr::Unix("/run/clamav/clamd.ctl".into()))
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("clamd = \"clamd\"").expect_err("bad clamd");
        assert_eq!(e.key, "scan.clamd");
        let e = parse("rspamd = \"127.0.0.1:1\"\ntimeout_ms = 5").expect_err("timeout");
        assert_eq!(e.key, "scan.timeout_ms");
        let e =
            parse("rspamd = \"127.0.0.1:1\"\n[[domain]]\ndomain = \"a@b\"").expect_err("domain");
        assert_eq!(e.key, "scan.domain[0].domain");
    }
}
