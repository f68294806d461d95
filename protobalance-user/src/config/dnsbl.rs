//! `[dnsbl]`: DNS block- and allowlists for inbound SMTP clients, postscreen-style: each
//! `[[dnsbl.site]]` that lists the client adds its weight (negative for a DNSWL); a total
//! of `threshold` or more refuses mail from the client (`554 5.7.1`), and every total is
//! also scored by the reputation engine.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use super::Problem;
use crate::filter::cidr::Cidr;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsblConfig {
    #[serde(default = "default_threshold", deserialize_with = "super::de_f32")]
    pub threshold: f32,
    /// How long a connection waits for the lookups (in parallel with the greeting delay);
    /// a list that does not answer in time counts as not listing the client.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Resolvers to ask (`"127.0.0.1:53"`); empty: those of /etc/resolv.conf. Public
    /// lists refuse queries from big public resolvers: use your own caching resolver.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The list's DNS zone, e.g. `zen.spamhaus.org`.
    pub zone: String,
    /// Added to the client's DNSBL score when it is listed (negative: an allowlist).
    #[serde(default = "default_weight", deserialize_with = "super::de_f32")]
    pub weight: f32,
    /// Answers that count as "listed": addresses or CIDRs. Default: any 127.0.0.0/8.
    #[serde(default)]
    pub answers: Vec<String>,
}

impl Default for DnsblConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

const fn default_threshold() -> f32 {
    3.0
}
const fn default_timeout() -> u64 {
    1500
}
const fn default_weight() -> f32 {
    1.0
}

/// A site as the filter uses it.
#[derive(Debug, Clone)]
pub struct Site {
    /// Without the trailing dot, lower case.
    pub zone: String,
    pub weight: f32,
    pub answers: Vec<Cidr>,
}

impl DnsblConfig {
    pub fn enabled(&self) -> bool {
        !self.sites.is_empty()
    }

    pub(super) fn validate(&self) -> Result<Vec<Site>, Problem> {
        if !(self.threshold.is_finite() && self.threshold > 0.0 && self.threshold <= 1000.0) {
            return Err(Problem::new(
                "dnsbl.threshold",
                format!("{} is not in (0, 1000]", self.threshold),
            ));
        }
        if !(50..=30_000).contains(&self.timeout_ms) {
            return Err(Problem::new(
                "dnsbl.timeout_ms",
                format!("{} is outside 50..=30000", self.timeout_ms),
            ));
        }
        let mut sites = Vec::new();
        for (i, site) in self.sites.iter().enumerate() {
            let key = |k: &str| format!("dnsbl.site[{i}].{k}");
            let zone = site.zone.trim_end_matches('.').to_ascii_lowercase();
            if !super::valid_hostname(&zone) || !zone.contains('.') {
                return Err(Problem::new(
                    &key("zone"),
                    format!(
                        "{:?} is not a DNS zone; use e.g. \"zen.spamhaus.org\"",
                        site.zone
                    ),
                ));
            }
            if !(site.weight.is_finite() && site.weight != 0.0 && site.weight.abs() <= 1000.0) {
                return Err(Problem::new(
                    &key("weight"),
                    format!("{} is not a non-zero number in -1000..=1000", site.weight),
                ));
            }
            let mut answers = Vec::new();
            for (j, text) in site.answers.iter().enumerate() {
                let cidr = text
                    .parse::<Cidr>()
                    .ok()
                    .filter(|c| matches!(c.addr(), IpAddr::V4(_)))
                    .ok_or_else(|| {
                        Problem::new(
                            &format!("dnsbl.site[{i}].answers[{j}]"),
                            format!("{text:?}: use an IPv4 address or CIDR like 127.0.0.2 or 127.0.0.0/24"),
                        )
                    })?;
                answers.push(cidr);
            }
            if answers.is_empty() {
                answers.push("127.0.0.0/8".parse().expect("CIDR"));
            }
            sites.push(Site {
                zone,
                weight: site.weight,
                answers,
            });
        }
        Ok(sites)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn check(text: &str) -> Result<crate::config::Validated, String> {
        Config::from_toml(text, std::path::Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn sites_are_checked_and_normalized() {
        let v = check(
            "[dnsbl]\n[[dnsbl.site]]\nzone = \"ZEN.Example.org.\"\nweight = 2.5\n\
             [[dnsbl.site]]\nzone = \"wl.example.org\"\nweight = -4\nanswers = [\"127.0.9.0/24\"]\n",
        )
        .expect("valid");
        assert_eq!(v.dnsbl_sites[0].zone, "zen.example.org");
        assert_eq!(v.dnsbl_sites[0].answers[0].to_string(), "127.0.0.0/8");
        assert_eq!(v.dnsbl_sites[1].answers[0].to_string(), "127.0.9.0/24");
        assert!(check("").expect("valid").dnsbl_sites.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("[dnsbl]\nthreshold = 0\n", "dnsbl.threshold"),
            ("[dnsbl]\ntimeout_ms = 10\n", "dnsbl.timeout_ms"),
            (
                "[[dnsbl.site]]\nzone = \"localhost\"\n",
                "dnsbl.site[0].zone",
            ),
            ("[[dnsbl.site]]\nzone = \"a b.org\"\n", "dnsbl.site[0].zone"),
            (
                "[[dnsbl.site]]\nzone = \"bl.org\"\nweight = 0\n",
                "dnsbl.site[0].weight",
            ),
            (
                "[[dnsbl.site]]\nzone = \"bl.org\"\nanswers = [\"2001:db8::1\"]\n",
                "dnsbl.site[0].answers[0]",
            ),
            ("[dnsbl]\nnameservers = [\"127.0.0.1\"]\n", "nameservers"),
        ] {
            let e = check(text).expect_err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
