//! The reputation engine's memory and speed at N tracked addresses (default 1 000 000,
//! the default `reputation.max_tracked`), without criterion: an engine with
//! `max_tracked = N` is given one `protocol_error` for each of N distinct addresses, and
//! VmRSS (/proc/self/status) is read before the engine is built, once it is built (its
//! LRU shards reserve their tables up front, but untouched pages are not resident) and
//! after the reports. Then `admit()` looks every address up again.
//!
//! Run: `cargo bench -p protobalance-user --bench reputation_memory [-- N]` (also the last
//! step of `cargo xtask bench abuse`). Each address family is measured in a fresh process
//! (this binary runs itself with `--family v4`, then `--family v6`), so the second does
//! not start in the first one's freed heap: IPv4 addresses 10.0.0.0 + i, then IPv6
//! 2001:db8:…/64 prefixes (the engine keys IPv6 by /64).
//!
//! Reading the figures: bytes per tracked address is the RSS growth over the empty
//! process divided by the addresses kept (a record, its LRU node, its hash slot, the
//! allocator's overhead). The engine splits `max_tracked` over 16 shards, so a shard that
//! hashing favoured evicts a few before the whole engine is full: "tracked" can read a
//! little under N. `report` creates a record (first sighting), `report again` updates it,
//! `admit` reads it; each is one lock of one shard, single-threaded here.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use protobalance::{
    config::ReputationConfig,
    filter::reputation::{Event, Reputation, Verdict},
};

const DEFAULT_ADDRESSES: u32 = 1_000_000;
/// IPv4 addresses are 10.0.0.0 + i: room for 2^24.
const MAX_ADDRESSES: u32 = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const fn name(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::V6 => "v6",
        }
    }

    /// The i-th distinct subject: an IPv4 address, or an address in the i-th IPv6 /64.
    fn address(self, i: u32) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            Self::V6 => {
                let [a, b, c, d] = i.to_be_bytes();
                let (high, low) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
                IpAddr::V6(Ipv6Addr::new(0x2001, 0x0db8, high, low, 0, 0, 0, 1))
            }
        }
    }
}

fn main() -> Result<()> {
    let (addresses, family) = parse_args()?;
    match family {
        Some(family) => measure(family, addresses),
        None => {
            for family in [Family::V4, Family::V6] {
                run_child(family, addresses)?;
            }
            Ok(())
        }
    }
}

/// `[N] [--family v4|v6]`; anything else starting with `--` (cargo bench adds `--bench`)
/// is ignored. N also from `REPUTATION_MEMORY_ADDRESSES`.
fn parse_args() -> Result<(u32, Option<Family>)> {
    let mut addresses = match std::env::var("REPUTATION_MEMORY_ADDRESSES") {
        Ok(n) => Some(parse_count(&n)?),
        Err(_) => None,
    };
    let mut family = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--family" {
            family = Some(match args.next().as_deref() {
                Some("v4") => Family::V4,
                Some("v6") => Family::V6,
                other => bail!("--family v4|v6, not {other:?}"),
            });
        } else if !arg.starts_with("--") {
            addresses = Some(parse_count(&arg)?);
        }
    }
    Ok((addresses.unwrap_or(DEFAULT_ADDRESSES), family))
}

fn parse_count(text: &str) -> Result<u32> {
    let n: u32 = (text.replace('_', "").parse())
        .with_context(|| format!("the address count {text:?} is not a number"))?;
    ensure!(
        (1..=MAX_ADDRESSES).contains(&n),
        "the address count must be 1..={MAX_ADDRESSES}, not {n}"
    );
    Ok(n)
}

fn run_child(family: Family, addresses: u32) -> Result<()> {
    let me = std::env::current_exe().context("finding this bench's executable")?;
    let status = Command::new(&me)
        .arg(addresses.to_string())
        .args(["--family", family.name()])
        .status()
        .with_context(|| format!("running {}", me.display()))?;
    ensure!(
        status.success(),
        "the {} measurement failed ({status})",
        family.name()
    );
    Ok(())
}

fn measure(family: Family, n: u32) -> Result<()> {
    let start_kib = rss_kib()?;
    let config = ReputationConfig {
        max_tracked: n as usize,
        ..ReputationConfig::default()
    };
    let engine = Reputation::new(config, vec![], None);
    let empty_kib = rss_kib()?;
    let report = time_each(n, |i| {
        black_box(engine.report(family.address(i), Event::ProtocolError));
    });
    let full_kib = rss_kib()?;
    let tracked = engine.tracked();
    let mut refused = 0u32;
    let admit = time_each(n, |i| {
        refused += u32::from(black_box(engine.admit(family.address(i))) != Verdict::Accept);
    });
    // One protocol error is far below every threshold: nobody may be refused.
    ensure!(
        refused == 0,
        "{refused} of {n} addresses with one protocol error were refused"
    );
    ensure!(tracked > 0, "the engine tracks nothing");
    let again = time_each(n, |i| {
        black_box(engine.report(family.address(i), Event::ProtocolError));
    });
    print(&Figures {
        family,
        n,
        tracked,
        start_kib,
        empty_kib,
        full_kib,
        report,
        again,
        admit,
    });
    Ok(())
}

/// Mean time per call of `f(0..n)`.
fn time_each(n: u32, mut f: impl FnMut(u32)) -> Duration {
    let started = Instant::now();
    for i in 0..n {
        f(i);
    }
    started.elapsed() / n.max(1)
}

struct Figures {
    family: Family,
    n: u32,
    tracked: usize,
    start_kib: u64,
    empty_kib: u64,
    full_kib: u64,
    report: Duration,
    again: Duration,
    admit: Duration,
}

fn print(f: &Figures) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let grown_kib = f.full_kib.saturating_sub(f.start_kib);
    let per_address = grown_kib as f64 * 1024.0 / f.tracked.max(1) as f64;
    let what = match f.family {
        Family::V4 => "IPv4 addresses",
        Family::V6 => "IPv6 /64 prefixes",
    };
    println!(
        "reputation engine, {what}: {} reported, {} tracked (max_tracked {}; {} evicted by \
         full shards)",
        f.n,
        f.tracked,
        f.n,
        (f.n as usize).saturating_sub(f.tracked)
    );
    println!(
        "  VmRSS: {:.1} MiB before, {:.1} MiB with the empty engine, {:.1} MiB full: \
         +{:.1} MiB = {per_address:.0} bytes per tracked address",
        mib(f.start_kib),
        mib(f.empty_kib),
        mib(f.full_kib),
        mib(grown_kib)
    );
    println!(
        "  ns per call: report (new record) {}, report again {}, admit {}",
        f.report.as_nanos(),
        f.again.as_nanos(),
        f.admit.as_nanos()
    );
}

/// This process's VmRSS in KiB.
fn rss_kib() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    (status.lines())
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_ascii_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .context("no VmRSS in /proc/self/status")
}
