//! `cargo xtask bench …`: end-to-end benchmark drivers (criterion is for micro-benchmarks).
//!
//! * `pop3` — sessions/s and per-session latency (p50/p99) of a closed-loop POP3 load
//!   (connect, greeting, USER, PASS, STAT, RETR 1 of a ~10 KB message, QUIT) against
//!   three real Dovecot backends, once direct to each mailbox's owner and once through
//!   protobalance; prints the ratio proxy/direct and the latency protobalance adds.
//! * `imap` — the same for IMAP (connect, greeting, LOGIN, SELECT INBOX, FETCH 1 (RFC822)
//!   read by its literal size, LOGOUT).
//! * `memory` — protobalance's RSS/Pss per idle logged-in POP3 session (10 000 by default),
//!   in front of a stand-in backend, since Dovecot cannot hold that many sessions here.
//! * `directory` — `protobalance directory import` rate (mailboxes/s) for N mailboxes, the
//!   disk it takes, and the latency of random owner lookups on the resulting SQLite file.
//!
//! Benchmarks are not tests: they print figures and assert nothing about timings (they
//! only fail when a session or lookup gives a wrong answer, or set-up fails). Load, proxy
//! and backends share this machine's cores, so compare figures from one run, not across
//! machines. Everything started is an RAII guard; Ctrl-C stops the load and cleans up.
//! A debug `cargo xtask` re-runs itself optimized, so the client side is not the bottleneck.

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
mod standin_pop3;
mod stats;
mod store;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::util;

#[derive(Debug, Clone, Subcommand)]
pub enum Target {
    /// POP3 sessions/s and latency: direct to Dovecot vs through protobalance.
    Pop3(mail::MailArgs),
    /// IMAP sessions/s and latency: direct to Dovecot vs through protobalance.
    Imap(mail::MailArgs),
    /// protobalance's memory (RSS, Pss) per idle logged-in POP3 session.
    Memory(memory::MemoryArgs),
    /// Directory import rate (mailboxes/s), disk use and owner-lookup latency.
    Directory(directory::DirectoryArgs),
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
    if matches!(target, Target::Pop3(_) | Target::Imap(_)) && !util::is_root() {
        bail!(
            "the POP3 and IMAP benches run real Dovecot backends, which must start as root \
             to switch to the mail user: run `cargo xtask bench pop3|imap` as root"
        );
    }
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    if cfg!(debug_assertions) {
        return rerun_optimized();
    }
    let binary = crate::build()?;
    match target {
        Target::Pop3(args) => mail::run(&binary, protocol::Protocol::Pop3, &args),
        Target::Imap(args) => mail::run(&binary, protocol::Protocol::Imap, &args),
        Target::Memory(args) => memory::run(&binary, &args),
        Target::Directory(args) => directory::run(&binary, &args),
    }
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
}
