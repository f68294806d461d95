//! Prometheus metrics. Each module registers its metrics into the registry it is handed;
//! nothing here is a hidden global. Label values are bounded (fixed enums only).

use prometheus::{
    IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::{
    directory::{Directory, sqlite::SqliteDirectory},
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
        })
    }
}

impl Collector for XdpCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.packets.desc();
        descs.extend(self.bytes.desc());
        descs.extend(self.penalty_full.desc());
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
        families
    }
}

/// Directory cache hits and misses, read from the directory's counters at scrape time.
pub struct DirectoryCollector {
    directory: std::sync::Arc<Directory<SqliteDirectory>>,
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
    pub fn new(directory: std::sync::Arc<Directory<SqliteDirectory>>) -> prometheus::Result<Self> {
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
        lookups.collect()
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
