//! Prometheus metrics. Each module registers its metrics into the registry it is handed;
//! nothing here is a hidden global. Label values are bounded (fixed enums only).

use prometheus::{
    IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::{
    directory::{Directory, sqlite::SqliteDirectory},
    filter::xdp::CounterHandle,
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
        })
    }
}

impl Collector for XdpCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.packets.desc();
        descs.extend(self.bytes.desc());
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
        let (Ok(packets), Ok(bytes)) = (xdp_vec("packets"), xdp_vec("bytes")) else {
            return Vec::new();
        };
        for (counter, value) in counters {
            let labels = counter.labels();
            let labels = [labels.0, labels.1];
            packets.with_label_values(&labels).inc_by(value.packets);
            bytes.with_label_values(&labels).inc_by(value.bytes);
        }
        let mut families = packets.collect();
        families.extend(bytes.collect());
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

/// Frees the slots of expired bans every few seconds and reports the bans in force.
pub struct BanSweeper {
    bans: std::sync::Arc<std::sync::Mutex<crate::filter::xdp::BanMaps>>,
    active: prometheus::IntGauge,
    expired: prometheus::IntCounter,
}

impl BanSweeper {
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn new(
        bans: std::sync::Arc<std::sync::Mutex<crate::filter::xdp::BanMaps>>,
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
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(expired.clone()))?;
        Ok(Self {
            bans,
            active,
            expired,
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
    }
}
