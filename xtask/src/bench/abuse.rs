//! `cargo xtask bench abuse`: what 1 000 abusive clients cost the clean ones, and what the
//! reputation engine costs in memory. Three real Dovecot backends behind one edge with an
//! SMTP listener and the reputation engine on (defaults, but `ban_seconds = 60`, so in a
//! long run bans expire and the abusers get back in to be judged again).
//!
//! The clean load is `bench smtp`'s closed loop through the edge (EHLO, MAIL FROM, RCPT TO
//! × 1, DATA of a ~10 KB message, QUIT) from 127.0.0.1. It runs in alternating slices,
//! alone and while the abusers ([`abusers`]) hammer the edge from 127.1.0.0/16, each slice
//! after its own warm-up; the abusers start with the warm-up and keep what the engine
//! made of them (scores, bans) from one slice to the next. So the first slice with
//! abusers catches the onset and the later ones the steady state: the per-round lines
//! show both. With the default weights an abuser's first session is its last: pipelining
//! and the 20 unknown recipients (answered as one pipelined group) take its score past
//! `ban_score` at once, so it is served, ended with `421` and banned, and every later
//! connection from its address is refused at the door (`blocked`) until the ban expires.
//!
//! Reading the figures: `ratio` is the clean messages/s with abusers over those without;
//! the abusers' connections/s is how many the edge accepted, judged and closed meanwhile.
//! The abusers are a tight loop of connect, write, read, close on this machine's cores,
//! like the edge, the backends and the clean clients: on a small machine much of the
//! drop is CPU taken by the abusers themselves, not by the edge's work. The CPU line
//! tells them apart: protobalance's share of a core alone and with abusers, and this
//! process's (clean clients plus abusers). A clean session that fails is counted and its
//! first error printed (the clean client must never be refused). Afterwards `cargo bench
//! -p protobalance-user --bench reputation_memory` measures the engine alone: bytes per
//! tracked address at 1 M addresses and ns per report and admit.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use protobalance_tests::{DovecotCluster, test_dir::TestDir};

use super::{
    abusers::{self, Pool, Tally},
    check_interrupted,
    edge::{BackendSpec, EdgeConfig, Limits},
    lmtp,
    load::{self, Endpoint, Phase},
    mail::{self, Owners},
    procfs,
    protocol::{Delivery, Protocol, Session},
    stats::PhaseResult,
};
use crate::util::{self, step};

const BACKENDS: usize = 3;
/// Appended to the edge's config: everything else of `[reputation]` is the default.
const REPUTATION: &str = "[reputation]\nban_seconds = 60\n";
/// After a slice with abusers: the edge finishes the refusals still in flight.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Args)]
pub struct AbuseArgs {
    /// Concurrent clean clients (closed loop: each sends its next message when one ends).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=2000))]
    clients: u32,
    /// Measured seconds without and with abusers each (in up to 5 alternating slices, each
    /// after a 1 s warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Abusive clients, each its own source address in 127.1.0.0/16.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=i64::from(abusers::MAX_ABUSERS)))]
    abusers: u32,
    /// Threads the abusers share (each cycles over its share of the addresses).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    abuser_threads: u32,
    /// Mailboxes (user1..userN@example.com), spread over the three backends.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    users: u32,
    /// Let the kernel enforce the bans: the XDP filter on `lo` (SKB mode, SYN limiter
    /// off), so a banned abuser's packets are dropped before they cost a socket. Without
    /// it every refusal is the proxy's (a door answer per connection).
    #[arg(long)]
    xdp: bool,
    /// Addresses the engine-only memory bench tracks.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..=16_000_000))]
    tracked: u32,
}

/// What the edge's admin endpoint and /proc say at one moment.
struct Snapshot {
    rss_kib: u64,
    bans: f64,
    tracked: f64,
    /// Door verdicts so far: (ban, tempfail, tarpit).
    verdicts: [f64; 3],
}

/// CPU time used during the slices of one kind, and their wall time.
#[derive(Debug, Default, Clone, Copy)]
struct CpuUse {
    wall: Duration,
    /// protobalance's.
    edge: Duration,
    /// This process's: the clean clients and, with them, the abusers.
    bench: Duration,
}

/// Both sides of the comparison and what the abusers did.
struct Outcome {
    alone: PhaseResult,
    besieged: PhaseResult,
    abusers: Tally,
    /// Alone, with abusers.
    cpu: [CpuUse; 2],
    before: Snapshot,
    after: Snapshot,
    peak_rss_kib: u64,
}

pub fn run(binary: &Path, args: &AbuseArgs) -> Result<()> {
    // Scoped: the backends and protobalance are stopped before the engine bench builds.
    measure_edge(binary, args)?;
    check_interrupted()?;
    engine_memory(args.tracked)
}

fn measure_edge(binary: &Path, args: &AbuseArgs) -> Result<()> {
    let users = args.users as usize;
    step(&format!(
        "starting {BACKENDS} Dovecot backends (each knows all {users} test users)"
    ));
    let cluster = DovecotCluster::start(BACKENDS, users)?;
    check_interrupted()?;
    let scratch = TestDir::new("bench-abuse")?;
    let specs: Vec<_> = cluster.backends().iter().map(BackendSpec::of).collect();
    let limits = Limits::for_clients(args.clients);
    // The kernel filter on loopback: its blocklists are empty and its SYN limiter off, so
    // only the reputation engine's bans (of 127.1.x.y abusers) drop anything.
    let extra = if args.xdp {
        format!("{REPUTATION}[xdp]\ninterface = \"lo\"\nmode = \"skb\"\nsyn_rate_per_second = 0\n")
    } else {
        REPUTATION.to_owned()
    };
    let edge = EdgeConfig::write_with(&scratch, &specs, Some(Protocol::Smtp), &limits, &extra)?;
    let owners = mail::provision(binary, &edge, &scratch, users)?;
    step(if args.xdp {
        "starting protobalance (reputation on, ban_seconds = 60; bans enforced by XDP on lo)"
    } else {
        "starting protobalance (reputation on, ban_seconds = 60; bans enforced by the proxy)"
    });
    let protobalance = edge.start(binary)?;
    let listener = listener(&edge)?;
    let clean = endpoints(&owners, listener);
    step("priming: one untimed message per mailbox (the first delivery creates the maildir)");
    load::once_each(args.clients, &clean)?;
    let pool = Pool::new(listener, args.abusers, args.abuser_threads);
    let outcome = compare(args, &pool, &clean, &edge, protobalance.id())?;
    print_summary(args, &pool, &outcome);
    Ok(())
}

fn listener(edge: &EdgeConfig) -> Result<SocketAddrV4> {
    match edge.listener {
        Some(SocketAddr::V4(addr)) => Ok(addr),
        Some(other) => bail!("the bench's SMTP listener {other} is not IPv4"),
        None => bail!("the bench config has no SMTP listener"),
    }
}

/// One message of ~10 KB per mailbox, one recipient each, all through the edge.
fn endpoints(owners: &Owners, listener: SocketAddrV4) -> Vec<Endpoint> {
    let message: Arc<[u8]> = lmtp::message(lmtp::BODY_BYTES).into();
    (owners.iter())
        .map(|(user, _)| Endpoint {
            addr: SocketAddr::V4(listener),
            session: Session::Smtp(Delivery {
                recipients: vec![user.clone()],
                message: Arc::clone(&message),
            }),
        })
        .collect()
}

/// The clean load alone and with the abusers, in alternating slices.
fn compare(
    args: &AbuseArgs,
    pool: &Pool,
    clean: &[Endpoint],
    edge: &EdgeConfig,
    pid: u32,
) -> Result<Outcome> {
    let rounds = args.seconds.min(load::MAX_ROUNDS);
    let phase = Phase {
        clients: args.clients,
        warmup: load::WARMUP,
        measure: Duration::from_secs(args.seconds) / u32::try_from(rounds)?,
    };
    step(&format!(
        "smtp load: {} clients from 127.0.0.1, {rounds} rounds of alone then with {} abusers \
         ({}, {} threads), each {:?} warm-up + {:?} measured",
        args.clients,
        args.abusers,
        pool.range(),
        pool.threads(),
        phase.warmup,
        phase.measure
    ));
    let before = Snapshot::take(edge, pid)?;
    let (mut alone, mut besieged, mut tallies) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu = [CpuUse::default(); 2];
    for round in 1..=rounds {
        alone.push(cpu[0].meter(pid, || load::run(phase, clean))?);
        let (result, tally) = cpu[1].meter(pid, || pool.during(|| load::run(phase, clean)))?;
        thread::sleep(SETTLE);
        let now = Snapshot::take(edge, pid)?;
        println!(
            "  round {round}/{rounds}: alone {:.1}/s, with abusers {:.1}/s ({} failed); \
             abusers {}; bans so far {:.0}, tracked {:.0}",
            alone.last().map_or(0.0, PhaseResult::rate),
            result.rate(),
            result.errors,
            tally.describe(),
            now.bans - before.bans,
            now.tracked
        );
        besieged.push(result);
        tallies.push(tally);
    }
    let [alone, besieged] = [alone, besieged].map(PhaseResult::merge);
    load::check("alone", &alone)?;
    load::check("with abusers", &besieged)?;
    Ok(Outcome {
        alone,
        besieged,
        abusers: Tally::merge(tallies),
        cpu,
        before,
        after: Snapshot::take(edge, pid)?,
        peak_rss_kib: procfs::peak_rss_kib(pid)?,
    })
}

impl CpuUse {
    /// Runs `work`, adding its wall time and the CPU time protobalance (`pid`) and this
    /// process used meanwhile.
    fn meter<T>(&mut self, pid: u32, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let me = std::process::id();
        let started = Instant::now();
        let (edge, bench) = (procfs::cpu_time(pid)?, procfs::cpu_time(me)?);
        let outcome = work()?;
        self.wall += started.elapsed();
        self.edge += procfs::cpu_time(pid)?.saturating_sub(edge);
        self.bench += procfs::cpu_time(me)?.saturating_sub(bench);
        Ok(outcome)
    }

    /// Percent of one core, protobalance's and this process's.
    fn percent(&self) -> [f64; 2] {
        let wall = self.wall.as_secs_f64().max(1e-9);
        [self.edge, self.bench].map(|used| 100.0 * used.as_secs_f64() / wall)
    }
}

impl Snapshot {
    fn take(edge: &EdgeConfig, pid: u32) -> Result<Self> {
        let metrics = edge.metrics()?;
        let verdict = |v: &str| {
            metric(
                &metrics,
                &format!("protobalance_reputation_verdicts_total{{verdict=\"{v}\"}}"),
            )
        };
        Ok(Self {
            rss_kib: procfs::rss_kib(pid)?,
            bans: metric(&metrics, "protobalance_reputation_bans_total"),
            tracked: metric(&metrics, "protobalance_reputation_tracked"),
            verdicts: [verdict("ban"), verdict("tempfail"), verdict("tarpit")],
        })
    }
}

/// The sum of the samples named `name` in Prometheus text: `name value` and, when `name`
/// has no labels, every `name{…} value`. 0 when there is none (a counter not yet touched).
fn metric(text: &str, name: &str) -> f64 {
    (text.lines())
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(key, _)| {
            *key == name
                || (!name.contains('{')
                    && key.strip_prefix(name).is_some_and(|l| l.starts_with('{')))
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

fn print_summary(args: &AbuseArgs, pool: &Pool, o: &Outcome) {
    println!(
        "\nabuse summary: {} clean clients from 127.0.0.1 (~10 KB messages, 1 recipient), \
         {} abusers ({}) on {} threads",
        args.clients,
        args.abusers,
        pool.range(),
        pool.threads()
    );
    println!(
        "{:<14} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "clean load", "messages", "errors", "msg/s", "p50 ms", "p99 ms"
    );
    for (label, phase) in [("alone", &o.alone), ("with abusers", &o.besieged)] {
        println!(
            "{label:<14} {:>9} {:>7} {:>9.1} {:>9.2} {:>9.2}",
            phase.completed(),
            phase.errors,
            phase.rate(),
            phase.percentile_ms(50.0),
            phase.percentile_ms(99.0)
        );
    }
    let ratio = o.besieged.rate() / o.alone.rate().max(1e-9);
    let added = |p: f64| o.besieged.percentile_ms(p) - o.alone.percentile_ms(p);
    println!(
        "ratio with/without abusers {ratio:.2} | added p50 {:+.2}ms | added p99 {:+.2}ms",
        added(50.0),
        added(99.0)
    );
    let a = &o.abusers;
    println!(
        "abusers: {} connections in {:.1} s = {}",
        a.connections,
        a.elapsed.as_secs_f64(),
        a.describe()
    );
    if let Some(other) = &a.first_other {
        println!("  first \"other\" ending: {other}");
    }
    let [ban, tempfail, tarpit] = o.after.verdicts;
    let [ban0, tempfail0, tarpit0] = o.before.verdicts;
    println!(
        "reputation: bans placed {:.0}, addresses tracked {:.0}; door verdicts: \
         ban {:.0}, tempfail {:.0}, tarpit {:.0}",
        o.after.bans - o.before.bans,
        o.after.tracked,
        ban - ban0,
        tempfail - tempfail0,
        tarpit - tarpit0
    );
    let [[edge_alone, bench_alone], [edge_besieged, bench_besieged]] = o.cpu.map(|c| c.percent());
    let cores = thread::available_parallelism().map_or(1, usize::from);
    println!(
        "CPU, % of one core ({cores} cores here): protobalance {edge_alone:.0}% alone, \
         {edge_besieged:.0}% with abusers; this process (clean clients, abusers) \
         {bench_alone:.0}%, {bench_besieged:.0}%"
    );
    println!(
        "protobalance VmRSS: before the abusers {} KiB, after {} KiB ({:+} KiB), VmHWM {} KiB",
        o.before.rss_kib,
        o.after.rss_kib,
        i128::from(o.after.rss_kib) - i128::from(o.before.rss_kib),
        o.peak_rss_kib
    );
}

/// The engine alone at `tracked` addresses, in its own (optimized) bench binary: xtask
/// does not link protobalance-user.
fn engine_memory(tracked: u32) -> Result<()> {
    step(&format!(
        "the reputation engine alone at {tracked} tracked addresses \
         (cargo bench -p protobalance-user --bench reputation_memory)"
    ));
    util::run(
        util::cargo()
            .args(["bench", "-p", "protobalance-user"])
            .args(["--bench", "reputation_memory", "--"])
            .arg(tracked.to_string()),
    )
    .context("the reputation memory bench")
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn sums_prometheus_samples() {
        let text = "# HELP protobalance_reputation_bans_total Bans\n\
                    # TYPE protobalance_reputation_bans_total counter\n\
                    protobalance_reputation_bans_total{enforced=\"proxy\"} 998\n\
                    protobalance_reputation_bans_total{enforced=\"kernel\"} 2\n\
                    protobalance_reputation_bans_totally 5\n\
                    protobalance_reputation_tracked 1001\n";
        assert_eq!(metric(text, "protobalance_reputation_bans_total"), 1000.0);
        assert_eq!(
            metric(
                text,
                "protobalance_reputation_bans_total{enforced=\"kernel\"}"
            ),
            2.0
        );
        assert_eq!(metric(text, "protobalance_reputation_tracked"), 1001.0);
        assert_eq!(metric(text, "protobalance_reputation_verdicts_total"), 0.0);
    }
}
