//! `cargo xtask bench directory`: how fast `protobalance directory import` provisions N
//! mailboxes (one transaction, wall clock of the whole command), the disk it takes, and the
//! latency of random owner lookups on the result — the SQLite query alone (no LRU cache,
//! no tokio blocking-pool hop), with a warm OS page cache since the file was just written.

use std::{
    io::{BufWriter, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use protobalance_tests::{test_dir::TestDir, user_name};

use super::{
    check_interrupted,
    edge::{BackendSpec, EdgeConfig, Limits},
    stats::nearest_rank,
    store,
};
use crate::util::step;

const PROGRESS_EVERY: u64 = 1_000_000;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Args)]
pub struct DirectoryArgs {
    /// Mailboxes to import (the issue asks for 1 M and 10 M; 10 M takes minutes and ~1 GB).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    mailboxes: u64,
    /// Random lookups of existing addresses to time.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    lookups: u64,
}

pub fn run(binary: &Path, args: &DirectoryArgs) -> Result<()> {
    let n = args.mailboxes;
    let scratch = TestDir::new("bench-directory")?;
    // Never contacted: the import only records backends and apportions over them.
    let backends: Vec<BackendSpec> = (1..=3)
        .map(|i| BackendSpec {
            name: format!("backend{i}"),
            ip: IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)),
            ports: [110, 143, 24],
            smtp_delivery: None,
        })
        .collect();
    let edge = EdgeConfig::write(&scratch, &backends, None, &Limits::for_clients(1))?;
    let list = scratch.path().join("mailboxes.txt");
    generate(&list, n)?;
    step(&format!(
        "importing {n} mailboxes (protobalance directory import)"
    ));
    let started = Instant::now();
    edge.import(binary, &list)?;
    let import_secs = started.elapsed().as_secs_f64();
    let db_bytes = store::disk_use(&edge.directory);
    let list_bytes = std::fs::metadata(&list).map(|m| m.len()).unwrap_or(0);
    step(&format!(
        "{} random owner lookups (SQLite, read-only, cached statement)",
        args.lookups
    ));
    let (p50, p99) = time_lookups(&edge.directory, n, args.lookups)?;
    println!(
        "\ndirectory  mailboxes={n}  import {import_secs:.1} s ({:.0} mailboxes/s) | \
         disk {:.1} MiB (import file {:.1} MiB) | lookup p50 {p50:.1}µs p99 {p99:.1}µs",
        n as f64 / import_secs.max(1e-9),
        db_bytes as f64 / MIB,
        list_bytes as f64 / MIB,
    );
    Ok(())
}

/// `user1@example.com` .. `user<n>@example.com`, one per line.
fn generate(path: &Path, n: u64) -> Result<()> {
    step(&format!("generating {n} addresses in {}", path.display()));
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    for i in 1..=n {
        writeln!(out, "{}", user_name(i as usize)).context("writing the import file")?;
        if i % PROGRESS_EVERY == 0 {
            check_interrupted()?;
            println!("  {i} / {n} addresses written");
        }
    }
    out.flush().context("writing the import file")
}

/// p50 and p99 in µs of `count` lookups of random existing addresses.
fn time_lookups(db: &Path, n: u64, count: u64) -> Result<(f64, f64)> {
    let conn = store::open_read_only(db)?;
    let mut rng = SplitMix64(0x5eed_b0a7);
    // Addresses are built before timing: the figure is the lookup, not string formatting.
    let addresses: Vec<String> = (0..count)
        .map(|_| user_name((rng.next() % n + 1) as usize))
        .collect();
    store::owner_of(&conn, &user_name(1))?; // prepares and caches the statement
    let mut latencies = Vec::with_capacity(addresses.len());
    for address in &addresses {
        let started = Instant::now();
        let owner = store::owner_of(&conn, address)?;
        latencies.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        if owner.is_none() {
            bail!("{address} was imported but is not in the directory");
        }
    }
    latencies.sort_unstable();
    let us = |p| nearest_rank(&latencies, p) as f64 / 1e3;
    Ok((us(50.0), us(99.0)))
}

/// A fixed-seed generator: the same addresses every run, no dependency for it.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
