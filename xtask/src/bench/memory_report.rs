//! The `bench memory` table: protobalance's memory at each sample, and per session
//! (with − baseline) / sessions against the target, which is printed, not asserted.

use super::procfs::Memory;

/// The goal for one idle proxied session.
const TARGET_KIB: f64 = 8.0;

/// What protobalance looked like at one point.
pub struct Row {
    pub label: String,
    pub sessions: usize,
    pub memory: Memory,
    pub fds: usize,
}

/// (with − baseline) / sessions, for one memory figure; None for rows without sessions.
fn per_session(row: &Row, base: &Row, pick: fn(&Memory) -> Option<u64>) -> Option<f64> {
    let (with, base) = (pick(&row.memory)?, pick(&base.memory)?);
    (row.sessions > 0).then(|| (with as f64 - base as f64) / row.sessions as f64)
}

fn rss(m: &Memory) -> Option<u64> {
    Some(m.rss_kib)
}

fn pss(m: &Memory) -> Option<u64> {
    m.pss_kib
}

fn cell<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn kib(v: Option<f64>) -> String {
    cell(v.map(|v| format!("{v:.2}")))
}

/// Growth per session added between the first and the last checkpoint: what one more
/// session costs, free of what the first ones paid once (runtime, allocator arenas).
fn marginal(rows: &[Row]) -> Option<String> {
    let mut checkpoints = rows.iter().filter(|row| row.sessions > 0);
    let (first, last) = (checkpoints.next()?, checkpoints.next_back()?);
    let added = last
        .sessions
        .checked_sub(first.sessions)
        .filter(|&n| n > 0)? as f64;
    let growth = |pick: fn(&Memory) -> Option<u64>| {
        Some((pick(&last.memory)? as f64 - pick(&first.memory)? as f64) / added)
    };
    Some(format!(
        "{}->{}: RSS {} Pss {} KiB/session added",
        first.sessions,
        last.sessions,
        kib(growth(rss)),
        kib(growth(pss))
    ))
}

pub fn print(rows: &[Row]) {
    let Some(base) = rows.first() else { return };
    println!(
        "\n{:<10} {:>10} {:>10} {:>7} {:>17} {:>17}",
        "sessions", "VmRSS KiB", "Pss KiB", "fds", "RSS KiB/session", "Pss KiB/session"
    );
    for row in rows {
        println!(
            "{:<10} {:>10} {:>10} {:>7} {:>17} {:>17}",
            row.label,
            row.memory.rss_kib,
            cell(row.memory.pss_kib),
            row.fds,
            kib(per_session(row, base, rss)),
            kib(per_session(row, base, pss)),
        );
    }
    let mut figures: Vec<String> = rows
        .iter()
        .filter(|row| row.sessions > 0)
        .map(|row| {
            let (r, p) = (per_session(row, base, rss), per_session(row, base, pss));
            format!(
                "{} sessions: RSS {} Pss {} KiB/session",
                row.sessions,
                kib(r),
                kib(p)
            )
        })
        .collect();
    figures.extend(marginal(rows));
    println!(
        "\nmemory  {} | target <= {TARGET_KIB} KiB/session",
        figures.join(" | ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_session_is_growth_over_sessions() {
        let row = |sessions, rss_kib| Row {
            label: String::new(),
            sessions,
            memory: Memory {
                rss_kib,
                pss_kib: None,
            },
            fds: 0,
        };
        let base = row(0, 10_000);
        assert_eq!(per_session(&row(1000, 15_000), &base, rss), Some(5.0));
        assert_eq!(per_session(&row(1000, 15_000), &base, pss), None);
        assert_eq!(per_session(&row(0, 12_000), &base, rss), None);
        let rows = [base, row(1000, 15_000), row(10_000, 60_000)];
        assert_eq!(
            marginal(&rows).as_deref(),
            Some("1000->10000: RSS 5.00 Pss - KiB/session added")
        );
    }
}
