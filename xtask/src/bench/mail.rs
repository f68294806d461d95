//! `cargo xtask bench pop3` (and, with IMAP, `imap`): the same closed-loop load twice, once
//! straight to each mailbox's owner backend and once through protobalance, against three
//! real Dovecot backends (with `--relay` a third time, through the minimal TCP relay of
//! `relay`, the floor any proxy pays). Set-up: start the cluster, write protobalance's
//! config, import the users, seed each mailbox with one message on its owner, start
//! protobalance. Then one untimed session per mailbox on each path (first opens are
//! dearer), and the timed load in alternating slices so every path sees the same machine.

use std::{collections::HashMap, net::SocketAddr, path::Path};

use anyhow::{Context as _, Result};
use clap::Args;
use protobalance_tests::{DovecotCluster, password_for, test_dir::TestDir, user_name};

use super::{
    check_interrupted,
    edge::{BackendSpec, EdgeConfig, Limits},
    lmtp,
    load::{self, Endpoint, Plan},
    protocol::{Login, Retrieval},
    relay, stats, store,
};
use crate::util::step;

const BACKENDS: usize = 3;

#[derive(Debug, Clone, Args)]
pub struct MailArgs {
    /// Concurrent simulated clients (closed loop: each starts its next session when one ends).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=2000))]
    clients: u32,
    /// Measured seconds per path (in alternating slices of about 2 s, each after a warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Mailboxes (user1..userN@example.com), spread over the three backends.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    users: u32,
    /// protobalance's `splice.kernel`: `off` (its default) relays logged-in sessions in
    /// user space, `auto` splices them in the kernel (when the program loads).
    #[arg(long, default_value = "off", value_parser = ["auto", "off"])]
    kernel_splice: String,
    /// Also time a minimal TCP relay in front of each backend (no protocol work), in the
    /// same alternating slices: the floor any proxy pays on this machine.
    #[arg(long)]
    relay: bool,
}

/// (login, name of the backend that owns the mailbox), for user1..userN.
pub type Owners = Vec<(String, String)>;

pub fn run(binary: &Path, retrieval: Retrieval, args: &MailArgs) -> Result<()> {
    let users = args.users as usize;
    step(&format!(
        "starting {BACKENDS} Dovecot backends (each knows all {users} test users)"
    ));
    let cluster = DovecotCluster::start(BACKENDS, users)?;
    check_interrupted()?;
    let scratch = TestDir::new("bench")?;
    let specs: Vec<_> = cluster.backends().iter().map(BackendSpec::of).collect();
    let limits = Limits::for_clients(args.clients);
    let splice = format!("[splice]\nkernel = \"{}\"\n", args.kernel_splice);
    let protocol = Some(retrieval.protocol());
    let edge = EdgeConfig::write_with(&scratch, &specs, protocol, &limits, &splice)?;
    let owners = provision(binary, &edge, &scratch, users)?;
    seed(&cluster, &owners)?;
    step("starting protobalance");
    let _protobalance = edge.start(binary)?;
    compare(retrieval, args, &cluster, &edge, &owners)
}

/// Primes every mailbox on each path, then runs the timed phases and prints them.
fn compare(
    retrieval: Retrieval,
    args: &MailArgs,
    cluster: &DovecotCluster,
    edge: &EdgeConfig,
    owners: &Owners,
) -> Result<()> {
    let listener = edge
        .listener
        .context("the bench config has no mail listener")?;
    let direct = direct_endpoints(retrieval, cluster, owners)?;
    let proxied = endpoints(retrieval, owners, |_| Ok(listener))?;
    step("priming: one untimed session per mailbox, direct and through protobalance");
    load::once_each(args.clients, &direct)?;
    load::once_each(args.clients, &proxied)?;
    let plan = Plan {
        clients: args.clients,
        seconds: args.seconds,
    };
    let name = retrieval.protocol().as_str();
    if !args.relay {
        let [direct, proxy] = load::interleaved(name, plan, [&direct, &proxied], &|| Ok(()))?;
        stats::print_comparison(name, "sessions", args.clients, &direct, &proxy);
        return print_splices(edge, name);
    }
    step("starting the minimal TCP relay in front of each backend (--relay)");
    // 4 descriptors per relayed session in this process (the client's, cloned, and the
    // relay's two): more than the default soft limit at a few hundred clients.
    let limit = super::procfs::raise_own_nofile(4 * u64::from(args.clients) + 256)?;
    println!("  open-file limit for this process: {limit}");
    let addrs: Vec<SocketAddr> = cluster
        .backends()
        .iter()
        .map(|b| retrieval.backend_addr(b))
        .collect();
    let floor = relay::Relay::start(&addrs)?;
    // The direct path's sessions, each through the relay in front of its backend.
    let relayed = direct
        .iter()
        .map(|e| {
            Ok(Endpoint {
                addr: floor.front(e.addr)?,
                session: e.session.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    step("priming the relay path: one untimed session per mailbox");
    load::once_each(args.clients, &relayed)?;
    let paths = [
        ("direct", direct.as_slice()),
        ("relay", relayed.as_slice()),
        ("protobalance", proxied.as_slice()),
    ];
    let results = load::interleaved_paths(name, plan, &paths, &|| Ok(()))?;
    let [direct, relay, proxy] = results.as_slice() else {
        anyhow::bail!("three paths in, {} results out", results.len());
    };
    stats::print_table(
        "sessions",
        &[
            ("direct", direct),
            ("relay", relay),
            ("protobalance", proxy),
        ],
    );
    println!();
    let clients = args.clients;
    stats::print_ratio(name, clients, ("direct", direct), ("protobalance", proxy));
    stats::print_ratio(name, clients, ("direct", direct), ("relay", relay));
    stats::print_ratio(name, clients, ("relay", relay), ("protobalance", proxy));
    print_splices(edge, name)
}

/// Where the edge moved the logged-in sessions' bytes (`protobalance_splices_total`), so a
/// figure is never read as the kernel splice's when the program did not load.
fn print_splices(edge: &EdgeConfig, protocol: &str) -> Result<()> {
    let metrics = edge.metrics()?;
    let count = |mode: &str| {
        let series =
            format!("protobalance_splices_total{{mode=\"{mode}\",protocol=\"{protocol}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    println!(
        "{protocol}  sessions spliced in the kernel: {}, relayed in user space: {}",
        count("kernel"),
        count("user")
    );
    Ok(())
}

/// Imports user1..userN with `protobalance directory import` and reads back each owner.
pub fn provision(
    binary: &Path,
    edge: &EdgeConfig,
    scratch: &TestDir,
    users: usize,
) -> Result<Owners> {
    step(&format!(
        "provisioning {users} mailboxes (protobalance directory import)"
    ));
    let list = scratch.path().join("users.txt");
    let text: String = (1..=users).map(|i| user_name(i) + "\n").collect();
    std::fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;
    edge.import(binary, &list)?;
    let mut owners: HashMap<String, String> =
        store::all_owners(&store::open_read_only(&edge.directory)?)?;
    (1..=users)
        .map(|i| {
            let user = user_name(i);
            let owner = owners
                .remove(&user)
                .with_context(|| format!("{user} was not imported"))?;
            Ok((user, owner))
        })
        .collect()
}

/// One ~10 KB message per mailbox, delivered by LMTP to its owner only.
fn seed(cluster: &DovecotCluster, owners: &Owners) -> Result<()> {
    step(&format!(
        "seeding {} mailboxes with one ~10 KB message each (LMTP to the owner)",
        owners.len()
    ));
    let batches: Vec<(SocketAddr, Vec<String>)> = cluster
        .backends()
        .iter()
        .map(|b| {
            let mine = owners
                .iter()
                .filter(|(_, o)| o == b.name())
                .map(|(u, _)| u.clone());
            (b.lmtp_addr(), mine.collect())
        })
        .collect();
    lmtp::seed(&batches)
}

fn direct_endpoints(
    retrieval: Retrieval,
    cluster: &DovecotCluster,
    owners: &Owners,
) -> Result<Vec<Endpoint>> {
    endpoints(retrieval, owners, |owner| {
        let backend = cluster.backends().iter().find(|b| b.name() == owner);
        let backend =
            backend.with_context(|| format!("the directory names an unknown backend {owner}"))?;
        Ok(retrieval.backend_addr(backend))
    })
}

fn endpoints(
    retrieval: Retrieval,
    owners: &Owners,
    addr_of: impl Fn(&str) -> Result<SocketAddr>,
) -> Result<Vec<Endpoint>> {
    owners
        .iter()
        .map(|(user, owner)| {
            let password =
                password_for(user).with_context(|| format!("{user} is not a test user"))?;
            let login = Login {
                user: user.clone(),
                password,
            };
            Ok(Endpoint {
                addr: addr_of(owner)?,
                session: retrieval.session(login),
            })
        })
        .collect()
}
