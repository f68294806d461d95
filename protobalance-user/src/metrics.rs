//! Prometheus metrics. Each module registers its metrics into the registry it is handed;
//! nothing here is a hidden global. Label values are bounded (fixed enums only).

use prometheus::{
    IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::{
    directory::{Directory, Store},
    filter::xdp::{BanMaps, CounterHandle, SynLimiter},
};

/// Build/identity gauge, so dashboards can tell which version is running.
pub fn register_build_info(registry: &Registry) -> prometheus::Result<()> {
    let info = IntGaugeVec::new(
        Opts::new(
            "protobalance_build_info",
            "protobalance version running, always 1",
        ),
        &["version"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(info))
}

/// Exposes the XDP per-CPU verdict counters, read from the kernel at scrape time.
pub struct XdpCollector {
    handle: CounterHandle,
    /// Templates that only supply `desc()`; each scrape fills fresh vectors, so two
    /// concurrent scrapes never see each other's values.
    packets: IntCounterVec,
    bytes: IntCounterVec,
    penalty_full: prometheus::IntCounter,
    list_hits: IntCounterVec,
    /// The table metrics' templates, for `desc()`.
    tables: TableMetrics,
}

/// Sizes and generation of the live rule tables, read at scrape time.
struct TableMetrics {
    entries: IntGaugeVec,
    per_list: IntGaugeVec,
    generation: prometheus::IntGauge,
    publish: prometheus::Gauge,
}

impl TableMetrics {
    fn new() -> prometheus::Result<Self> {
        Ok(Self {
            entries: IntGaugeVec::new(
                Opts::new(
                    "protobalance_xdp_blocklist_entries",
                    "Entries in the kernel blocklists, by address family",
                ),
                &["family"],
            )?,
            per_list: IntGaugeVec::new(
                Opts::new(
                    "protobalance_xdp_list_entries",
                    "Entries of each blocklist in the kernel (a CIDR in two lists counts for \
                     the later one)",
                ),
                &["list"],
            )?,
            generation: prometheus::IntGauge::new(
                "protobalance_xdp_list_generation",
                "Rule-table generations published since the maps were created: each \
                 whole-list replacement (start-up, reload, API) makes a new one live \
                 atomically",
            )?,
            publish: prometheus::Gauge::new(
                "protobalance_xdp_list_publish_seconds",
                "How long the last rule-table publish took (compile, write both generations)",
            )?,
        })
    }

    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.entries.desc();
        descs.extend(self.per_list.desc());
        descs.extend(self.generation.desc());
        descs.extend(self.publish.desc());
        descs
    }

    /// Fresh metrics filled from `handle`.
    fn collect(handle: &CounterHandle) -> prometheus::Result<Vec<MetricFamily>> {
        let m = Self::new()?;
        let tables = handle.tables();
        m.entries
            .with_label_values(&["ipv4"])
            .set(tables.sizes.v4 as i64);
        m.entries
            .with_label_values(&["ipv6"])
            .set(tables.sizes.v6 as i64);
        match handle.list_entries() {
            Ok(lists) => {
                for (list, n) in lists {
                    m.per_list
                        .with_label_values(&[list.as_str()])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            Err(error) => tracing::warn!(%error, "reading XDP list names failed"),
        }
        m.generation
            .set(i64::try_from(tables.generation.serial).unwrap_or(i64::MAX));
        m.publish.set(tables.publish.as_secs_f64());
        let mut families = m.entries.collect();
        families.extend(m.per_list.collect());
        families.extend(m.generation.collect());
        families.extend(m.publish.collect());
        Ok(families)
    }
}

fn list_hits_vec() -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(
        Opts::new(
            "protobalance_xdp_list_hits_total",
            "Packets dropped by an entry of each blocklist (`#<id>` for entries of no named list)",
        ),
        &["list"],
    )
}

fn penalty_full_counter() -> prometheus::Result<prometheus::IntCounter> {
    prometheus::IntCounter::new(
        "protobalance_xdp_syn_penalty_full_total",
        "SYN-limited sources that could not be put into the full penalty map \
         (their SYN was dropped all the same, as reason=\"syn_limit\")",
    )
}

/// `unit` is "packets" or "bytes".
fn xdp_vec(unit: &str) -> prometheus::Result<IntCounterVec> {
    let help = match unit {
        "packets" => "Packets seen by the XDP filter, by verdict and reason",
        _ => "Bytes seen by the XDP filter, by verdict and reason",
    };
    IntCounterVec::new(
        Opts::new(format!("protobalance_xdp_{unit}_total"), help),
        &["verdict", "reason"],
    )
}

impl XdpCollector {
    pub fn new(handle: CounterHandle) -> prometheus::Result<Self> {
        Ok(Self {
            handle,
            packets: xdp_vec("packets")?,
            bytes: xdp_vec("bytes")?,
            penalty_full: penalty_full_counter()?,
            list_hits: list_hits_vec()?,
            tables: TableMetrics::new()?,
        })
    }
}

impl Collector for XdpCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.packets.desc();
        descs.extend(self.bytes.desc());
        descs.extend(self.penalty_full.desc());
        descs.extend(self.list_hits.desc());
        descs.extend(self.tables.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let counters = match self.handle.read() {
            Ok(counters) => counters,
            Err(error) => {
                tracing::warn!(%error, "reading XDP counters failed");
                return Vec::new();
            }
        };
        let (Ok(packets), Ok(bytes), Ok(penalty_full)) =
            (xdp_vec("packets"), xdp_vec("bytes"), penalty_full_counter())
        else {
            return Vec::new();
        };
        for (counter, value) in counters {
            match counter.labels() {
                Some((verdict, reason)) => {
                    let labels = [verdict, reason];
                    packets.with_label_values(&labels).inc_by(value.packets);
                    bytes.with_label_values(&labels).inc_by(value.bytes);
                }
                // The only event counter (not a verdict of its own).
                None => penalty_full.inc_by(value.packets),
            }
        }
        let mut families = packets.collect();
        families.extend(bytes.collect());
        families.extend(penalty_full.collect());
        families.extend(self.collect_list_hits());
        match TableMetrics::collect(&self.handle) {
            Ok(tables) => families.extend(tables),
            Err(error) => tracing::warn!(%error, "XDP table metrics"),
        }
        families
    }
}

impl XdpCollector {
    fn collect_list_hits(&self) -> Vec<MetricFamily> {
        let hits = match self.handle.list_hits() {
            Ok(hits) => hits,
            Err(error) => {
                tracing::warn!(%error, "reading XDP list counters failed");
                return Vec::new();
            }
        };
        let Ok(vec) = list_hits_vec() else {
            return Vec::new();
        };
        for (list, n) in hits {
            vec.with_label_values(&[list.as_str()]).inc_by(n);
        }
        vec.collect()
    }
}

/// Directory cache hits and misses, read from the directory's counters at scrape time.
pub struct DirectoryCollector {
    directory: std::sync::Arc<Directory<Store>>,
    template: IntCounterVec,
}

fn lookups_vec() -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(
        Opts::new(
            "protobalance_directory_lookups_total",
            "Directory lookups by cache result (hit ratio = hit / (hit + miss))",
        ),
        &["cache"],
    )
}

impl DirectoryCollector {
    pub fn new(directory: std::sync::Arc<Directory<Store>>) -> prometheus::Result<Self> {
        Ok(Self {
            directory,
            template: lookups_vec()?,
        })
    }
}

impl Collector for DirectoryCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.template.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use std::sync::atomic::Ordering::Relaxed;
        let Ok(lookups) = lookups_vec() else {
            return Vec::new();
        };
        let stats = self.directory.cache_stats();
        lookups
            .with_label_values(&["hit"])
            .inc_by(stats.hits.load(Relaxed));
        lookups
            .with_label_values(&["miss"])
            .inc_by(stats.misses.load(Relaxed));
        let mut families = lookups.collect();
        if let Store::Postgres(_) = self.directory.store() {
            if let Ok(heard) = prometheus::IntCounter::new(
                "protobalance_directory_changes_heard_total",
                "Cached owners dropped because a node changed them (PostgreSQL notifications)",
            ) {
                heard.inc_by(stats.notifications.load(Relaxed));
                families.extend(heard.collect());
            }
            if let Ok(coherent) = prometheus::IntGauge::new(
                "protobalance_directory_cache_coherent",
                "1 while this node hears the shared directory's changes; 0 while it does not \
                 (cached owners then expire after directory.postgres.stale_cache_seconds)",
            ) {
                coherent.set(i64::from(stats.listening.load(Relaxed)));
                families.extend(coherent.collect());
            }
        }
        families
    }
}

/// Frees the slots of expired bans and SYN-limiter penalties every few seconds and reports
/// how many of each are in force.
pub struct BanSweeper {
    bans: std::sync::Arc<std::sync::Mutex<BanMaps>>,
    active: prometheus::IntGauge,
    expired: prometheus::IntCounter,
    syn: std::sync::Arc<std::sync::Mutex<SynLimiter>>,
    penalised: prometheus::IntGauge,
    penalties_expired: prometheus::IntCounter,
}

impl BanSweeper {
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn new(
        bans: std::sync::Arc<std::sync::Mutex<BanMaps>>,
        syn: std::sync::Arc<std::sync::Mutex<SynLimiter>>,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let active = prometheus::IntGauge::new(
            "protobalance_xdp_bans_active",
            "Unexpired bans in the kernel",
        )?;
        let expired = prometheus::IntCounter::new(
            "protobalance_xdp_bans_expired_total",
            "Expired bans removed from the kernel maps by the sweeper",
        )?;
        let penalised = prometheus::IntGauge::new(
            "protobalance_xdp_syn_penalised_sources",
            "Sources (IPv4 addresses, IPv6 /64s) in the SYN limiter's penalty map, unexpired",
        )?;
        let penalties_expired = prometheus::IntCounter::new(
            "protobalance_xdp_syn_penalties_expired_total",
            "Expired SYN-limiter penalties removed from the kernel map by the sweeper",
        )?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(expired.clone()))?;
        registry.register(Box::new(penalised.clone()))?;
        registry.register(Box::new(penalties_expired.clone()))?;
        Ok(Self {
            bans,
            active,
            expired,
            syn,
            penalised,
            penalties_expired,
        })
    }

    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut ticker = tokio::time::interval(Self::INTERVAL);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => self.sweep(),
            }
        }
    }

    fn sweep(&self) {
        let mut bans = self
            .bans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match bans
            .sweep()
            .and_then(|swept| Ok((swept, bans.list()?.len())))
        {
            Ok((swept, active)) => {
                self.expired.inc_by(swept as u64);
                self.active.set(i64::try_from(active).unwrap_or(i64::MAX));
            }
            Err(error) => tracing::warn!(%error, "sweeping expired bans failed"),
        }
        drop(bans);
        let swept = self
            .syn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sweep();
        match swept {
            Ok((swept, left)) => {
                self.penalties_expired.inc_by(swept as u64);
                self.penalised.set(i64::try_from(left).unwrap_or(i64::MAX));
            }
            Err(error) => tracing::warn!(%error, "sweeping expired SYN penalties failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;
    use crate::filter::{blocklist::NamedList, xdp::XdpFilter};

    fn render(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .expect("encode");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn list_metrics_carry_list_names() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP list_metrics_carry_list_names: not root, cannot load BPF programs");
            return;
        }
        let mut filter = XdpFilter::load(None).expect("load");
        let list = |name: &str, nets: &[&str]| NamedList {
            name: name.to_owned(),
            entries: nets.iter().map(|n| n.parse().expect("cidr")).collect(),
        };
        filter
            .replace_named_lists(&[
                list("xdp.blocklist", &["192.0.2.0/24"]),
                list("drop.txt", &["203.0.113.0/24", "2001:db8:bad::/48"]),
            ])
            .expect("lists");
        filter
            .block("198.51.100.0/24".parse().expect("cidr"), 9)
            .expect("block");
        for src in ["203.0.113.1", "2001:db8:bad::1", "198.51.100.1"] {
            let frame = crate::filter::xdp::syn_frame(src.parse().expect("ip"), 25);
            assert_eq!(
                filter.test_run(&frame, 1).expect("run").0,
                1,
                "{src} dropped"
            );
        }
        let registry = Registry::new();
        registry
            .register(Box::new(
                XdpCollector::new(filter.counter_handle()).expect("collector"),
            ))
            .expect("register");
        let text = render(&registry);
        for line in [
            "protobalance_xdp_list_hits_total{list=\"drop.txt\"} 2",
            "protobalance_xdp_list_hits_total{list=\"xdp.blocklist\"} 0",
            "protobalance_xdp_list_hits_total{list=\"#9\"} 1",
            "protobalance_xdp_list_entries{list=\"drop.txt\"} 2",
            "protobalance_xdp_list_entries{list=\"xdp.blocklist\"} 1",
            "protobalance_xdp_list_entries{list=\"#9\"} 1",
            "protobalance_xdp_blocklist_entries{family=\"ipv4\"} 3",
            "protobalance_xdp_list_generation 3",
            "protobalance_xdp_packets_total{reason=\"blocklist\",verdict=\"drop\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}
