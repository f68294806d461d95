//! `cargo xtask bench …`: end-to-end benchmark drivers (criterion is for micro-benchmarks).
//!
//! * `pop3` — sessions/s and per-session latency (p50/p99) of a closed-loop POP3 load
//!   (connect, greeting, USER, PASS, STAT, RETR 1 of a ~10 KB message, QUIT) against
//!   three real Dovecot backends, once direct to each mailbox's owner and once through
//!   protobalance; prints the ratio proxy/direct and the latency protobalance adds. With
//!   `--relay`, also through a minimal TCP relay (the floor any proxy pays; `relay`).
//! * `imap` — the same for IMAP (connect, greeting, LOGIN, SELECT INBOX, FETCH 1 (RFC822)
//!   read by its literal size, LOGOUT).
//! * `smtp` — messages/s and per-message latency of inbound mail (connect, 220, EHLO, MAIL
//!   FROM, RCPT TO × 1 or × 5 of one backend, DATA, a ~10 KB message, QUIT), direct vs
//!   through protobalance, on two kinds of backend side by side: direct LMTP to Dovecot vs
//!   an edge with `delivery = "lmtp"`, and direct SMTP to a real Postfix in front of each
//!   Dovecot vs an edge with `delivery = "smtp"`; prints the ratios and the latency added.
//!   Also protobalance's RSS while it streams 10 KB vs 20 MiB messages.
//! * `abuse` — clean SMTP messages/s (and p50/p99) through an edge with three real Dovecot
//!   backends while 1 000 abusive clients (distinct source addresses, pregreet and blind
//!   pipelining of guessed recipients) hammer it, vs without them, in alternating slices;
//!   prints the ratio, the abusers' connections/s and how the edge ended them, the bans
//!   placed and protobalance's RSS; then the reputation engine alone: bytes per tracked
//!   address at 1 M addresses and ns per report/admit (`protobalance-user` bench
//!   `reputation_memory`).
//! * `memory` — protobalance's RSS/Pss per idle logged-in POP3 session (10 000 by default),
//!   in front of a stand-in backend, since Dovecot cannot hold that many sessions here.
//! * `xdp` — the XDP program's ns/packet (`BPF_PROG_TEST_RUN`) for pass, blocklisted, banned
//!   and SYN-limited frames with 1 … 1 M blocklist CIDRs, side by side with Debian's
//!   `xdp-filter`; the time to load each list; a veth flood's drops/s vs an nftables
//!   netdev-ingress rule (`protobalance-user` bench `xdp`).
//! * `scan` — inbound SMTP messages/s with `[scan]` (real rspamd and clamd) vs without.
//! * `directory` — `protobalance directory import` rate (mailboxes/s) for N mailboxes, the
//!   disk it takes, and the latency of random owner lookups on the resulting SQLite file.
//!
//! Benchmarks are not tests: they print figures and assert nothing about timings (they
//! only fail when a session or lookup gives a wrong answer, or set-up fails). Load, proxy
//! and backends share this machine's cores, so compare figures from one run, not across
//! machines. Everything started is an RAII guard; Ctrl-C stops the load and cleans up.
//! A debug `cargo xtask` re-runs itself optimized, so the client side is not the bottleneck.

mod abuse;
mod abusers;
mod directory;
mod edge;
mod imap;
mod lmtp;
mod load;
mod mail;
mod memory;
mod memory_report;
mod pop3;
mod procfs;
mod protocol;
mod relay;
mod scan;
mod smtp;
mod smtp_bench;
mod smtp_memory;
mod source_addr;
mod standin_pop3;
mod stats;
mod store;
mod wire;
mod xdp;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use protobalance_tests::postfix::MASTER_BIN;

use crate::util;

#[derive(Debug, Clone, Subcommand)]
pub enum Target {
    /// POP3 sessions/s and latency: direct to Dovecot vs through protobalance.
    Pop3(mail::MailArgs),
    /// IMAP sessions/s and latency: direct to Dovecot vs through protobalance.
    Imap(mail::MailArgs),
    /// SMTP messages/s and latency: direct to Dovecot or Postfix vs through protobalance.
    ///
    /// Inbound mail with 1 and 5 recipients: direct LMTP to Dovecot vs protobalance with
    /// `delivery = "lmtp"`, direct SMTP to Postfix vs protobalance with `delivery = "smtp"`;
    /// then protobalance's RSS while it streams 10 KB vs 20 MiB messages.
    Smtp(smtp_bench::SmtpArgs),
    /// Clean SMTP messages/s while 1 000 abusive clients hammer the edge, vs without them.
    ///
    /// Also the bans placed, protobalance's RSS, and the reputation engine's memory per
    /// tracked address at 1 M addresses (`cargo bench -p protobalance-user --bench
    /// reputation_memory`).
    Abuse(abuse::AbuseArgs),
    /// protobalance's memory (RSS, Pss) per idle logged-in POP3 session.
    Memory(memory::MemoryArgs),
    /// Directory import rate (mailboxes/s), disk use and owner-lookup latency.
    Directory(directory::DirectoryArgs),
    /// SMTP messages/s with [scan] (real rspamd + clamd) vs without, same load.
    Scan(scan::ScanArgs),
    /// XDP ns/packet with 1 … 1 M blocklist CIDRs vs Debian's xdp-filter; veth flood vs nftables.
    Xdp(xdp::XdpArgs),
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once Ctrl-C (SIGINT/SIGTERM) arrived: loops stop and set-up steps return an error,
/// so every guard is dropped and nothing outlives the benchmark.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

pub fn run(target: Option<Target>) -> Result<()> {
    let Some(target) = target else {
        print_targets();
        return Ok(());
    };
    preflight(&target)?;
    if let Target::Xdp(args) = &target {
        // A cargo bench binary (optimized by cargo itself), not the edge binary.
        return xdp::run(args);
    }
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    // As a service manager would start them (see `in_own_session`); a Ctrl-C still stops
    // them: the handler above lets the guards run.
    protobalance_tests::process::servers_in_own_sessions();
    if cfg!(debug_assertions) {
        return rerun_optimized();
    }
    let binary = crate::build()?;
    match target {
        Target::Pop3(args) => mail::run(&binary, protocol::Retrieval::Pop3, &args),
        Target::Imap(args) => mail::run(&binary, protocol::Retrieval::Imap, &args),
        Target::Smtp(args) => smtp_bench::run(&binary, &args),
        Target::Abuse(args) => abuse::run(&binary, &args),
        Target::Memory(args) => memory::run(&binary, &args),
        Target::Directory(args) => directory::run(&binary, &args),
        Target::Scan(args) => scan::run(&binary, &args),
        Target::Xdp(_) => unreachable!("handled above"),
    }
}

/// What a target needs from this machine, checked before the (slow) optimized build.
fn preflight(target: &Target) -> Result<()> {
    let backends = matches!(
        target,
        Target::Pop3(_) | Target::Imap(_) | Target::Smtp(_) | Target::Abuse(_) | Target::Scan(_)
    );
    if backends && !util::is_root() {
        bail!(
            "the POP3, IMAP, SMTP and abuse benches run real Dovecot (and Postfix) backends, \
             which must start as root to switch to their users: run `cargo xtask bench \
             pop3|imap|smtp|abuse` as root"
        );
    }
    if matches!(target, Target::Smtp(_)) && !std::path::Path::new(MASTER_BIN).exists() {
        bail!(
            "`bench smtp` runs real Postfix backends, and {MASTER_BIN} is missing: \
             `cargo xtask setup` installs postfix"
        );
    }
    Ok(())
}

/// `cargo xtask` is a debug build: its load generator and its SQLite (C compiled at -O0)
/// would measure themselves — unoptimized SQLite doubles the lookup figure. So the bench
/// runs as `cargo run --release -p xtask -- <the same arguments>`; Ctrl-C reaches both
/// processes, and this one just waits for the optimized one to clean up.
fn rerun_optimized() -> Result<()> {
    util::step("re-running the bench as an optimized build (cargo run --release -p xtask)");
    let outcome = util::run(
        util::cargo()
            .args(["run", "--release", "--quiet", "-p", "xtask", "--"])
            .args(std::env::args_os().skip(1)),
    );
    if outcome.is_err() && interrupted() {
        bail!("interrupted");
    }
    outcome
}

fn print_targets() {
    let command = Target::augment_subcommands(clap::Command::new("cargo xtask bench"));
    println!(
        "usage: cargo xtask bench <TARGET> [OPTIONS]   (--help on a target for its options)\n"
    );
    println!("targets:");
    for target in command.get_subcommands() {
        let about = target
            .get_about()
            .map(ToString::to_string)
            .unwrap_or_default();
        println!("  {:<10} {about}", target.get_name());
    }
    println!(
        "\npop3, imap, smtp and abuse start real Dovecot backends (smtp also a Postfix in \
         front of each): run them as root."
    );
}
