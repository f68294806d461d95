//! DNSBL/DNSWL lookups for inbound SMTP clients (`[dnsbl]`), like postscreen's
//! `postscreen_dnsbl_sites`: every configured list is asked in parallel when the client
//! connects (while the greeting delay runs), each list that names the client adds its
//! weight, and the total decides (`Listing::refused`) and is scored by the reputation
//! engine.
//!
//! hickory-resolver does the DNS work and caches answers for their TTL (negative answers
//! too), so a client that comes back costs no query. DNS failure never blocks mail: a
//! list that errs or does not answer within `timeout_ms` counts as not listing the client,
//! and is counted in `protobalance_dnsbl_lookups_total{result="error"|"timeout"}`.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
};
use prometheus::{IntCounterVec, Opts, Registry};

use crate::config::{DnsblConfig, DnsblSite};

/// What the lists say about one client.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing {
    /// Sum of the weights of the lists that name the client.
    pub score: f32,
    /// Those lists, with the answer they gave.
    pub listed_by: Vec<(String, Ipv4Addr)>,
}

impl Listing {
    /// The zones of the positive (block) lists naming the client, for the reply text.
    pub fn blocklists(&self, sites: &[DnsblSite]) -> Vec<String> {
        self.listed_by
            .iter()
            .filter(|(zone, _)| sites.iter().any(|s| &s.zone == zone && s.weight > 0.0))
            .map(|(zone, _)| zone.clone())
            .collect()
    }
}

enum Answer {
    Listed(Ipv4Addr),
    NotListed,
    Error,
    Timeout,
}

pub struct Dnsbl {
    resolver: TokioResolver,
    sites: Arc<[DnsblSite]>,
    threshold: f32,
    timeout: Duration,
    lookups: Option<IntCounterVec>,
}

impl Dnsbl {
    /// `protobalance_dnsbl_lookups_total`, registered once (a reload builds a new `Dnsbl`
    /// counting into the same).
    pub fn register_metrics(registry: &Registry) -> prometheus::Result<IntCounterVec> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "protobalance_dnsbl_lookups_total",
                "DNSBL/DNSWL lookups by zone and result",
            ),
            &["zone", "result"],
        )?;
        registry.register(Box::new(lookups.clone()))?;
        Ok(lookups)
    }

    /// `None` when no list is configured.
    pub fn new(
        config: &DnsblConfig,
        sites: Vec<DnsblSite>,
        lookups: Option<IntCounterVec>,
    ) -> Result<Option<Self>, String> {
        if sites.is_empty() {
            return Ok(None);
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        let builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| {
                format!(
                    "reading the system resolver configuration (/etc/resolv.conf): {e}; \
                     set dnsbl.nameservers"
                )
            })?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut options = ResolverOpts::default();
        options.timeout = timeout;
        options.attempts = 1;
        // Names are absolute: never try the search domains.
        options.ndots = 0;
        options.cache_size = 64 * 1024;
        let resolver = builder
            .with_options(options)
            .build()
            .map_err(|e| format!("DNS resolver: {e}"))?;
        Ok(Some(Self {
            resolver,
            sites: sites.into(),
            threshold: config.threshold,
            timeout,
            lookups,
        }))
    }

    pub fn sites(&self) -> &[DnsblSite] {
        &self.sites
    }

    /// A listing at or above the threshold refuses mail from the client.
    pub fn refuses(&self, listing: &Listing) -> bool {
        listing.score >= self.threshold
    }

    /// Asks every list about `ip` at once; each answer within the timeout counts.
    pub async fn check(self: Arc<Self>, ip: IpAddr) -> Listing {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, site) in self.sites.iter().enumerate() {
            let name = query_name(ip, &site.zone);
            let this = Arc::clone(&self);
            tasks.spawn(async move { (i, this.ask(&name, i).await) });
        }
        let mut listing = Listing::default();
        while let Some(joined) = tasks.join_next().await {
            let Ok((i, answer)) = joined else { continue };
            let site = &self.sites[i];
            let result = match answer {
                Answer::Listed(a) => {
                    listing.score += site.weight;
                    listing.listed_by.push((site.zone.clone(), a));
                    "listed"
                }
                Answer::NotListed => "not_listed",
                Answer::Error => "error",
                Answer::Timeout => "timeout",
            };
            if let Some(lookups) = &self.lookups {
                lookups.with_label_values(&[&site.zone, result]).inc();
            }
        }
        listing.listed_by.sort();
        listing
    }

    async fn ask(&self, name: &str, site: usize) -> Answer {
        let lookup = tokio::time::timeout(self.timeout, self.resolver.lookup(name, RecordType::A));
        match lookup.await {
            Err(_) => Answer::Timeout,
            Ok(Err(e)) if e.is_no_records_found() => Answer::NotListed,
            Ok(Err(error)) => {
                tracing::debug!(%name, %error, "DNSBL lookup failed");
                Answer::Error
            }
            Ok(Ok(lookup)) => {
                let answers = &self.sites[site].answers;
                lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .find(|a| answers.iter().any(|c| c.contains(IpAddr::V4(*a))))
                    .map_or(Answer::NotListed, Answer::Listed)
            }
        }
    }
}

/// `7.100.51.198.zone.` for 198.51.100.7; IPv6 as 32 reversed nibbles (RFC 5782 §2.4).
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let [x, y, z, w] = a.octets();
            format!("{w}.{z}.{y}.{x}.{zone}.")
        }
        IpAddr::V6(a) => {
            let mut name = String::with_capacity(64 + zone.len() + 1);
            for byte in a.octets().iter().rev() {
                name.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
                name.push('.');
                name.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
                name.push('.');
            }
            name.push_str(zone);
            name.push('.');
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_follow_rfc_5782() {
        assert_eq!(
            query_name("198.51.100.7".parse().expect("ip"), "bl.example"),
            "7.100.51.198.bl.example."
        );
        assert_eq!(
            query_name("::ffff:198.51.100.7".parse().expect("ip"), "bl.example"),
            "7.100.51.198.bl.example.",
            "a v4-mapped peer is the IPv4 client"
        );
        assert_eq!(
            query_name("2001:db8:1:2::7".parse().expect("ip"), "bl.example"),
            "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example."
        );
    }
}
