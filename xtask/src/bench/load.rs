//! The closed-loop load generator: `clients` threads, each running one session after
//! another on a fresh connection, mailboxes taken round-robin from a shared counter.
//! Throughput counts the sessions that *complete* inside the measured window (after the
//! warm-up), so a session straddling either edge neither inflates nor deflates the rate.
//! The phase stops by itself at its deadline (or on Ctrl-C); every socket op has a timeout.
//! [`interleaved`] compares two paths (direct, through protobalance) in alternating slices;
//! [`interleaved_paths`] any number of named ones.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{interrupted, protocol::Session, stats::PhaseResult, wire::LineConn};
use crate::util::step;

/// Pause after a failed session so a dead server is not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Before each measured slice of [`interleaved`] (its first on each path; later ones get
/// [`REWARM`]).
pub const WARMUP: Duration = Duration::from_secs(1);
/// The measured time per path is split into at most this many alternating slices (the
/// abuse bench's phases).
pub const MAX_ROUNDS: u64 = 5;
/// [`interleaved`]'s slices are about this long: the paths alternate every few seconds, so
/// a neighbour's load that drifts over tens of seconds (on a shared VM, measured: ±10 %
/// between 12 s slices of the same path) hits every path alike.
const SLICE_SECONDS: u64 = 2;
/// At most this many rounds, however long the run.
const MAX_SLICES: u64 = 60;
/// Warm-up before a path's later slices: the machine and the backends are warm by then.
const REWARM: Duration = Duration::from_millis(500);

/// Where one mailbox's (or recipient group's) sessions go in a phase, and what they do.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub session: Session,
}

#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub clients: u32,
    pub warmup: Duration,
    pub measure: Duration,
}

/// One client thread's tally.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

pub fn run(phase: Phase, endpoints: &[Endpoint]) -> Result<PhaseResult> {
    if endpoints.is_empty() {
        bail!("no mailboxes to run sessions against");
    }
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let window = (start + phase.warmup, start + phase.warmup + phase.measure);
    let tallies = thread::scope(|scope| {
        let handles: Vec<_> = (0..phase.clients)
            .map(|_| scope.spawn(|| client_loop(endpoints, &next, window)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a client thread panicked")))
            .collect::<Result<Vec<Tally>>>()
    })?;
    if interrupted() {
        bail!("interrupted");
    }
    let mut result = merge(tallies);
    result.measured = phase.measure;
    Ok(result)
}

fn client_loop(
    endpoints: &[Endpoint],
    next: &AtomicUsize,
    (measure_from, stop_at): (Instant, Instant),
) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < stop_at && !interrupted() {
        let endpoint = &endpoints[next.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        let started = Instant::now();
        let outcome =
            LineConn::connect(endpoint.addr).and_then(|mut conn| endpoint.session.run(&mut conn));
        let ended = Instant::now();
        let in_window = measure_from <= ended && ended <= stop_at;
        match outcome {
            Ok(()) if in_window => tally
                .latencies_ns
                .push(u64::try_from((ended - started).as_nanos()).unwrap_or(u64::MAX)),
            Ok(()) => {}
            Err(err) => {
                if in_window {
                    tally.errors += 1;
                    tally
                        .first_error
                        .get_or_insert_with(|| format!("{}: {err:#}", endpoint.session.mailbox()));
                }
                thread::sleep(ERROR_BACKOFF);
            }
        }
    }
    tally
}

fn merge(tallies: Vec<Tally>) -> PhaseResult {
    let mut latencies = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for tally in tallies {
        latencies.extend(tally.latencies_ns);
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
    }
    PhaseResult::new(latencies, errors, first_error)
}

/// Runs one session per endpoint, untimed, on up to `clients` threads (at most 8); the
/// first error ends the run. To prime: the first open of a mailbox (Dovecot moves `new/`
/// to `cur/`, builds its index; the first delivery creates the maildir) and protobalance's
/// first directory lookup cost more than every later one, and should count against no
/// phase.
pub fn once_each(clients: u32, endpoints: &[Endpoint]) -> Result<()> {
    let next = AtomicUsize::new(0);
    let threads = clients.clamp(1, 8);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| once_each_loop(endpoints, &next)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a session thread panicked"))?)
            .collect::<Result<Vec<()>>>()
    })?;
    Ok(())
}

fn once_each_loop(endpoints: &[Endpoint], next: &AtomicUsize) -> Result<()> {
    while let Some(endpoint) = endpoints.get(next.fetch_add(1, Ordering::Relaxed)) {
        if interrupted() {
            bail!("interrupted");
        }
        LineConn::connect(endpoint.addr)
            .and_then(|mut conn| endpoint.session.run(&mut conn))
            .with_context(|| {
                let mailbox = endpoint.session.mailbox();
                format!("session for {mailbox} via {}", endpoint.addr)
            })?;
    }
    Ok(())
}

/// How hard and how long the paths are compared.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub clients: u32,
    /// Measured seconds per path, in slices of about 2 s.
    pub seconds: u64,
}

/// Alternates the two paths in rounds (direct, protobalance, direct, …), each slice after
/// its own warm-up, so a neighbour's load that comes and goes hits both paths alike.
/// `settle` runs after every slice (e.g. until a queue that the slice filled is drained,
/// so its work does not load the next slice).
pub fn interleaved(
    what: &str,
    plan: Plan,
    paths: [&[Endpoint]; 2],
    settle: &dyn Fn() -> Result<()>,
) -> Result<[PhaseResult; 2]> {
    let [direct, proxy] = paths;
    let results = interleaved_paths(
        what,
        plan,
        &[("direct", direct), ("protobalance", proxy)],
        settle,
    )?;
    <[PhaseResult; 2]>::try_from(results)
        .map_err(|r| anyhow!("interleaved: two paths in, {} results out", r.len()))
}

/// The same load on each named path in turn, `plan.seconds` split into alternating slices
/// of about [`SLICE_SECONDS`] so every path sees the same machine; one merged result per
/// path, in order.
pub fn interleaved_paths(
    what: &str,
    plan: Plan,
    paths: &[(&str, &[Endpoint])],
    settle: &dyn Fn() -> Result<()>,
) -> Result<Vec<PhaseResult>> {
    let rounds = (plan.seconds / SLICE_SECONDS).clamp(1, MAX_SLICES);
    let phase = Phase {
        clients: plan.clients,
        warmup: WARMUP,
        measure: Duration::from_secs(plan.seconds) / u32::try_from(rounds)?,
    };
    let later = Phase {
        warmup: REWARM,
        ..phase
    };
    let names: Vec<&str> = paths.iter().map(|(name, _)| *name).collect();
    step(&format!(
        "{what} load: {} clients, {rounds} rounds of {}, each {:?} measured after a {:?} \
         warm-up ({:?} in the first round)",
        plan.clients,
        names.join(" then "),
        phase.measure,
        later.warmup,
        phase.warmup,
    ));
    let mut parts: Vec<Vec<PhaseResult>> = paths.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        let phase = if round == 1 { phase } else { later };
        for ((_, endpoints), part) in paths.iter().zip(&mut parts) {
            part.push(run(phase, endpoints)?);
            settle()?;
        }
        let rates: Vec<String> = names
            .iter()
            .zip(&parts)
            .map(|(name, part)| {
                let rate = part.last().map_or(0.0, PhaseResult::rate);
                format!("{name} {rate:.1}/s")
            })
            .collect();
        println!("  round {round}/{rounds}: {}", rates.join(", "));
    }
    names
        .iter()
        .zip(parts)
        .map(|(name, part)| {
            let merged = PhaseResult::merge(part);
            check(name, &merged)?;
            Ok(merged)
        })
        .collect()
}

/// Fails when nothing completed; reports failed sessions (a benchmark does not hide them).
pub fn check(path: &str, result: &PhaseResult) -> Result<()> {
    if let Some(error) = &result.first_error {
        if result.completed() == 0 {
            bail!("{path}: no session completed; first error: {error}");
        }
        println!(
            "  warning: {path}: {} failed sessions; first: {error}",
            result.errors
        );
    }
    Ok(())
}
