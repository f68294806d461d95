//! `cargo xtask …`: the developer and operator verbs.
//!
//! * `setup`  — install what is missing (apt packages, pinned toolchain + rust-src,
//!   bpf-linker built against LLVM 22, bpffs); idempotent, prints each step.
//! * `build`  — the XDP object and the release binary; prints where they are.
//! * `load` / `unload` — attach/detach the kernel filter alone, with pinned maps.
//! * `run`    — the demo cluster: three real Dovecot backends, a demo veth + namespace
//!   with the XDP filter on it, protobalance on examples/demo.toml. Ctrl-C stops it all.
//! * `test`   — setup, then the whole test suite, then a short fuzzing smoke run.
//! * `fuzz`   — the codec fuzz targets for longer.
//! * `bench`  — end-to-end benchmarks (`pop3`, `imap`, `smtp`, `memory`, `directory`, `abuse`);
//!   without a target, lists them.

mod bench;
mod demo;
mod fuzz;
mod setup;
mod util;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install missing prerequisites (apt packages, toolchain, bpf-linker). Idempotent.
    Setup,
    /// Build the XDP object and the release `protobalance` binary.
    Build,
    /// Attach the kernel filter to IFACE and pin it (it stays after this command exits).
    Load {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf/protobalance")]
        pin_dir: PathBuf,
        /// auto (driver, falling back to skb), driver or skb.
        #[arg(long, default_value = "auto")]
        mode: String,
    },
    /// Detach the pinned kernel filter from IFACE and remove its pins.
    Unload {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf/protobalance")]
        pin_dir: PathBuf,
    },
    /// Start the demo cluster (three Dovecot backends + protobalance). Ctrl-C stops it.
    Run {
        /// Test users per backend's passwd-file.
        #[arg(long, default_value_t = 3000)]
        users: usize,
        /// Edge nodes: 1 (SQLite directory) or 2 (sharing a PostgreSQL directory the demo
        /// starts; node 2 listens on 2110/2143/2025, admin 9926).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        nodes: u8,
    },
    /// Run the whole test suite (installs prerequisites first).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fuzz the protocol codecs (cargo-fuzz targets in fuzz/).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// End-to-end benchmarks; without a target, lists them.
    Bench {
        #[command(subcommand)]
        target: Option<bench::Target>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::Build => build().map(|_| ()),
        Command::Load {
            iface,
            pin_dir,
            mode,
        } => {
            let binary = build()?;
            let pin_dir = pin_dir.to_string_lossy().into_owned();
            util::run(util::cmd(&binary).args([
                "filter",
                "load",
                "--iface",
                &iface,
                "--pin-dir",
                &pin_dir,
                "--mode",
                &mode,
            ]))
        }
        Command::Unload { iface, pin_dir } => {
            let binary = build()?;
            let pin_dir = pin_dir.to_string_lossy().into_owned();
            util::run(util::cmd(&binary).args([
                "filter",
                "unload",
                "--iface",
                &iface,
                "--pin-dir",
                &pin_dir,
            ]))
        }
        Command::Run { users, nodes } => {
            let binary = build()?;
            demo::run(&binary, users, nodes)
        }
        Command::Test { args } => test(&args),
        Command::Bench { target } => bench::run(target),
        Command::Fuzz { seconds, targets } => {
            setup::run()?;
            fuzz::run(&targets, seconds)
        }
    }
}

/// Builds the release binary (its build.rs builds the XDP object) and returns its path.
fn build() -> Result<PathBuf> {
    setup::run()?;
    util::step("building protobalance (release) and the XDP object");
    util::run(util::cargo().args(["build", "--release", "-p", "protobalance-user"]))?;
    let root = util::workspace_root();
    let binary = root.join("target/release/protobalance");
    println!("  binary:     {}", binary.display());
    if let Some(object) = util::newest_xdp_object(&root.join("target/release/build")) {
        println!(
            "  XDP object: {} (embedded in the binary)",
            object.display()
        );
    }
    Ok(binary)
}

fn test(args: &[String]) -> Result<()> {
    setup::run()?;
    util::step("running the test suite (cargo test; privileged tests need root)");
    let mut cargo = util::cargo();
    cargo.args([
        "test",
        "--workspace",
        "--exclude",
        "protobalance-ebpf",
        "--no-fail-fast",
    ]);
    if !args.is_empty() {
        cargo.arg("--").args(args);
    }
    util::run(&mut cargo)?;
    if args.is_empty() {
        // A filtered run is a developer iterating; the full run includes the fuzz smoke.
        let seconds = std::env::var("PROTOBALANCE_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(15);
        fuzz::run(&[], seconds)?;
    }
    Ok(())
}
