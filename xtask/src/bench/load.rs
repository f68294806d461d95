//! The closed-loop load generator: `clients` threads, each running one session after
//! another on a fresh connection, mailboxes taken round-robin from a shared counter.
//! Throughput counts the sessions that *complete* inside the measured window (after the
//! warm-up), so a session straddling either edge neither inflates nor deflates the rate.
//! The phase stops by itself at its deadline (or on Ctrl-C); every socket op has a timeout.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{
    interrupted,
    protocol::{Login, Protocol},
    stats::PhaseResult,
    wire::LineConn,
};

/// Pause after a failed session so a dead server is not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Where one mailbox's sessions go in a phase, with its credentials.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub login: Login,
}

#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub protocol: Protocol,
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
            .map(|_| scope.spawn(|| client_loop(phase.protocol, endpoints, &next, window)))
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
    protocol: Protocol,
    endpoints: &[Endpoint],
    next: &AtomicUsize,
    (measure_from, stop_at): (Instant, Instant),
) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < stop_at && !interrupted() {
        let endpoint = &endpoints[next.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        let started = Instant::now();
        let outcome = LineConn::connect(endpoint.addr)
            .and_then(|mut conn| protocol.session(&mut conn, &endpoint.login));
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
                        .get_or_insert_with(|| format!("{}: {err:#}", endpoint.login.user));
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

/// Runs one session per endpoint, untimed, on up to `clients` threads: the first open of
/// a mailbox (Dovecot moves `new/` to `cur/`, builds its index) and protobalance's first
/// directory lookup cost more than every later one, and should count against no phase.
pub fn prime(protocol: Protocol, clients: u32, endpoints: &[Endpoint]) -> Result<()> {
    let next = AtomicUsize::new(0);
    let threads = clients.clamp(1, 8);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| prime_loop(protocol, endpoints, &next)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a priming thread panicked"))?)
            .collect::<Result<Vec<()>>>()
    })?;
    Ok(())
}

fn prime_loop(protocol: Protocol, endpoints: &[Endpoint], next: &AtomicUsize) -> Result<()> {
    while let Some(endpoint) = endpoints.get(next.fetch_add(1, Ordering::Relaxed)) {
        if interrupted() {
            bail!("interrupted");
        }
        LineConn::connect(endpoint.addr)
            .and_then(|mut conn| protocol.session(&mut conn, &endpoint.login))
            .with_context(|| format!("priming {} via {}", endpoint.login.user, endpoint.addr))?;
    }
    Ok(())
}
