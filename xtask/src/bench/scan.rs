//! `cargo xtask bench scan`: inbound SMTP messages/s and latency (one recipient, a ~10 KB
//! message) through an edge without `[scan]` vs one that scans every message with real
//! rspamd and clamd (the test suite's configurations: Debian's packages, no network
//! look-ups, clamd with a one-signature database), same load, alternating slices; both
//! edges deliver by LMTP to the same three Dovecot backends.
//!
//! Reading the figures: with scanning, the edge holds each message until both verdicts are
//! in, and rspamd and clamd take CPU from the same two cores as the edge, the backends and
//! the load generator; the ratio is the whole cost of scanning on this machine, not the
//! edge's share of it. clamd with a full signature database would cost more than with one
//! signature.

use std::{net::SocketAddr, path::Path, sync::Arc, thread};

use anyhow::{Context as _, Result, anyhow, ensure};
use clap::Args;
use protobalance_tests::{
    BackendOptions, ClamdServer, DovecotBackend, RspamdServer, loopback_ip, test_dir::TestDir,
};

use super::{
    check_interrupted,
    edge::{BackendSpec, EdgeConfig, Limits},
    lmtp,
    load::{self, Endpoint, Plan},
    mail,
    protocol::{Delivery, Protocol, Session},
    smtp_bench::groups,
    stats,
};
use crate::util::step;

const BACKENDS: usize = 3;

#[derive(Debug, Clone, Args)]
pub struct ScanArgs {
    /// Concurrent simulated clients (closed loop).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=2000))]
    clients: u32,
    /// Measured seconds per path (in alternating slices of about 2 s, each after a warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Mailboxes (user1..userN@example.com), spread over the three backends.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    users: u32,
}

pub fn run(binary: &Path, args: &ScanArgs) -> Result<()> {
    let users = args.users as usize;
    step(&format!(
        "starting {BACKENDS} Dovecot backends ({users} users), rspamd and clamd"
    ));
    let backends = start_backends(users)?;
    let rspamd = RspamdServer::start().context("rspamd")?;
    let clamd = ClamdServer::start().context("clamd")?;
    check_interrupted()?;
    let specs: Vec<_> = backends.iter().map(BackendSpec::of).collect();
    let limits = Limits::for_clients(args.clients);
    let dirs = [TestDir::new("bench-noscan")?, TestDir::new("bench-scan")?];
    let plain = EdgeConfig::write(&dirs[0], &specs, Some(Protocol::Smtp), &limits)?;
    let scan = format!(
        "[scan]\nrspamd = \"{}\"\nclamd = \"{}\"\ntimeout_ms = 10000\n",
        rspamd.addr(),
        clamd.socket().display()
    );
    let scanned = EdgeConfig::write_with(&dirs[1], &specs, Some(Protocol::Smtp), &limits, &scan)?;
    let owners = mail::provision(binary, &plain, &dirs[0], users)?;
    let again = mail::provision(binary, &scanned, &dirs[1], users)?;
    ensure!(
        again == owners,
        "the two edges apportioned the same mailboxes differently"
    );
    step("starting protobalance twice: without [scan], and with rspamd + clamd");
    let _plain_edge = plain.start(binary)?;
    let _scanned_edge = scanned.start(binary)?;
    let message: Arc<[u8]> = lmtp::message(lmtp::BODY_BYTES).into();
    let endpoints = |edge: SocketAddr| -> Vec<Endpoint> {
        groups(&owners, 1)
            .into_iter()
            .map(|(_, recipients)| Endpoint {
                addr: edge,
                session: Session::Smtp(Delivery {
                    recipients,
                    message: Arc::clone(&message),
                }),
            })
            .collect()
    };
    let off = endpoints(plain.listener.context("listener")?);
    let on = endpoints(scanned.listener.context("listener")?);
    let what = "smtp rcpts=1, scanning off (\"direct\") vs on (\"protobalance\")";
    step(&format!("{what}: priming"));
    load::once_each(args.clients, &off)?;
    load::once_each(args.clients, &on)?;
    let plan = Plan {
        clients: args.clients,
        seconds: args.seconds,
    };
    let [off, on] = load::interleaved(what, plan, [&off, &on], &|| Ok(()))?;
    stats::print_comparison(what, "messages", args.clients, &off, &on);
    let metrics = scanned.metrics()?;
    let verdicts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("protobalance_scan_verdicts_total{"))
        .collect();
    println!(
        "\nscanning on / off: {:.2} of the messages/s, p50 {:.2} ms vs {:.2} ms\n\
         verdicts of the scanning edge: {}",
        stats::ratio(&off, &on),
        on.percentile_ms(50.0),
        off.percentile_ms(50.0),
        verdicts.join(", ")
    );
    ensure!(
        on.errors == 0 && off.errors == 0,
        "sessions failed: {:?} / {:?}",
        off.first_error,
        on.first_error
    );
    Ok(())
}

fn start_backends(users: usize) -> Result<Vec<DovecotBackend>> {
    thread::scope(|scope| {
        let handles: Vec<_> = (1..=BACKENDS)
            .map(|n| {
                scope.spawn(move || {
                    let options = BackendOptions {
                        users,
                        ..BackendOptions::default()
                    };
                    DovecotBackend::start(&format!("backend{n}"), loopback_ip(n)?, &options)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("a backend start thread panicked"))?
            })
            .collect()
    })
}
