//! What one load phase measured (completed sessions, errors, latencies) and how it is
//! printed. Numbers only: nothing here judges a timing.

use std::time::Duration;

/// The outcome of one closed-loop phase.
#[derive(Debug, Default)]
pub struct PhaseResult {
    /// Session latencies in nanoseconds, sorted ascending (completed sessions only).
    latencies_ns: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub measured: Duration,
}

impl PhaseResult {
    pub fn new(mut latencies_ns: Vec<u64>, errors: u64, first_error: Option<String>) -> Self {
        latencies_ns.sort_unstable();
        Self {
            latencies_ns,
            errors,
            first_error,
            measured: Duration::ZERO,
        }
    }

    /// One result from several slices of the same path.
    pub fn merge(parts: Vec<Self>) -> Self {
        let mut merged = Self::default();
        for part in parts {
            merged.latencies_ns.extend(part.latencies_ns);
            merged.errors += part.errors;
            merged.first_error = merged.first_error.or(part.first_error);
            merged.measured += part.measured;
        }
        merged.latencies_ns.sort_unstable();
        merged
    }

    pub fn completed(&self) -> u64 {
        self.latencies_ns.len() as u64
    }

    /// Completed sessions per second of the measured window.
    pub fn rate(&self) -> f64 {
        self.completed() as f64 / self.measured.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile in milliseconds; 0 when nothing completed.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        nearest_rank(&self.latencies_ns, p) as f64 / 1e6
    }
}

/// Nearest-rank percentile of an ascending slice; 0 for an empty one.
pub fn nearest_rank(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `direct 880.1/s p50 51.20ms p99 90.30ms`
pub fn describe(label: &str, phase: &PhaseResult) -> String {
    format!(
        "{label} {:.1}/s p50 {:.2}ms p99 {:.2}ms",
        phase.rate(),
        phase.percentile_ms(50.0),
        phase.percentile_ms(99.0)
    )
}

/// `other`'s rate as a fraction of `base`'s (protobalance's of direct's, usually).
pub fn ratio(base: &PhaseResult, other: &PhaseResult) -> f64 {
    other.rate() / base.rate().max(1e-9)
}

/// The median latency `other` adds to `base`, in milliseconds.
pub fn added_p50_ms(base: &PhaseResult, other: &PhaseResult) -> f64 {
    other.percentile_ms(50.0) - base.percentile_ms(50.0)
}

/// The table of both phases, then the one-line comparison. `unit`: what one session
/// completes (`sessions`, `messages`).
pub fn print_comparison(
    what: &str,
    unit: &str,
    clients: u32,
    direct: &PhaseResult,
    proxy: &PhaseResult,
) {
    print_table(unit, &[("direct", direct), ("protobalance", proxy)]);
    println!();
    print_ratio(what, clients, ("direct", direct), ("protobalance", proxy));
}

/// One row per path.
pub fn print_table(unit: &str, rows: &[(&str, &PhaseResult)]) {
    println!(
        "\n{:<14} {unit:>10} {:>7} {:>12} {:>9} {:>9}",
        "path",
        "errors",
        format!("{unit}/s"),
        "p50 ms",
        "p99 ms"
    );
    for (label, phase) in rows {
        println!(
            "{label:<14} {:>10} {:>7} {:>12.1} {:>9.2} {:>9.2}",
            phase.completed(),
            phase.errors,
            phase.rate(),
            phase.percentile_ms(50.0),
            phase.percentile_ms(99.0)
        );
    }
}

/// `other`'s rate as a fraction of `base`'s and the median latency it adds, on one line.
pub fn print_ratio(
    what: &str,
    clients: u32,
    (base_label, base): (&str, &PhaseResult),
    (other_label, other): (&str, &PhaseResult),
) {
    let (ratio, added) = (ratio(base, other), added_p50_ms(base, other));
    println!(
        "{what}  clients={clients}  {} | {} | ratio {ratio:.2} | added p50 {added:+.2}ms",
        describe(base_label, base),
        describe(other_label, other),
    );
}

#[cfg(test)]
mod tests {
    use super::nearest_rank;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 50.0), 50);
        assert_eq!(nearest_rank(&v, 99.0), 99);
        assert_eq!(nearest_rank(&v, 100.0), 100);
        assert_eq!(nearest_rank(&[7], 99.0), 7);
        assert_eq!(nearest_rank(&[], 50.0), 0);
    }
}
