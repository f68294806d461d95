//! `cargo xtask bench smtp`: inbound mail (MX traffic), direct vs through protobalance, on
//! two kinds of backend side by side. (a) Dovecot: direct LMTP to the mailbox's owner vs
//! SMTP through an edge with `delivery = "lmtp"`. (b) A real Postfix in front of each
//! Dovecot: direct SMTP to the owner's Postfix vs SMTP through a second edge with
//! `delivery = "smtp"`. Each with 1 and with 5 recipients per ~10 KB message; the 5 have
//! one owner, so the edge takes them in one transaction (other owners' would get 452).
//! First, on the fresh LMTP edge, its memory while it streams DATA ([`smtp_memory`]).
//!
//! Both edges list the same backends and import the same mailboxes (apportioning is
//! deterministic; checked), so both paths of a comparison deliver to the same mailbox on
//! the same backend. Mailboxes only grow (~10 KB per recipient and message); the disk the
//! backends took is printed at the end.
//!
//! Postfix answers 250 once the message is queued and delivers to Dovecot afterwards. By
//! default it holds what it accepts during a slice ([`HOLD_ACCEPTED`]); between slices the
//! queues are released and drained, so one slice's deliveries load neither that slice nor
//! the next. Why: on a machine whose CPUs the load saturates, a backlog delivering
//! meanwhile takes every moment a path waits, so the path with more round trips (each
//! command through the edge is two) loses throughput to work the bench does not count:
//! measured on 2 cores with 20 clients, the edge's ratio was 0.6–0.8 with deliveries
//! running and 0.95–1.1 without, while the edge itself used about a tenth of a core.
//! `--postfix-delivers-meanwhile` measures the old way.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use clap::Args;
use protobalance_tests::{
    BackendOptions, DovecotBackend, PostfixBackend, PostfixOptions, loopback_ip, test_dir::TestDir,
};

use super::{
    check_interrupted,
    edge::{BackendSpec, EdgeConfig, Limits},
    lmtp,
    load::{self, Endpoint, Plan},
    mail::{self, Owners},
    protocol::{Delivery, Protocol, Session},
    smtp_memory::{self, StreamingMemory},
    stats::{self, PhaseResult},
};
use crate::util::step;

const BACKENDS: usize = 3;
const RECIPIENT_COUNTS: [usize; 2] = [1, 5];
/// Bound on waiting for the Postfix queues to empty after a slice.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// The goal: protobalance's messages/s at least this fraction of direct's.
const TARGET_RATIO: f64 = 0.9;

#[derive(Debug, Clone, Args)]
pub struct SmtpArgs {
    /// Concurrent simulated clients (closed loop: each sends its next message when one ends).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=2000))]
    clients: u32,
    /// Measured seconds per path and recipient count (in alternating slices of about 2 s,
    /// each after a warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Mailboxes (user1..userN@example.com), spread over the three backends.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    users: u32,
    /// Compare only the deliveries to this backend kind (default: both).
    #[arg(long, value_enum)]
    only: Option<Backend>,
    /// Let Postfix deliver what it accepts to Dovecot during the measured slices too
    /// (by default it holds it until the slice ends; see the module documentation).
    #[arg(long)]
    postfix_delivers_meanwhile: bool,
}

/// What the mail is handed to: Dovecot's LMTP, or the Postfix in front of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Dovecot,
    Postfix,
}

impl Backend {
    const fn label(self) -> &'static str {
        match self {
            Self::Dovecot => "Dovecot LMTP",
            Self::Postfix => "Postfix SMTP",
        }
    }
}

/// One comparison, for the summary.
struct Row {
    backend: Backend,
    recipients: usize,
    direct: PhaseResult,
    proxy: PhaseResult,
}

/// The running backends, the mailboxes' owners and the message every session sends.
struct Bench<'a> {
    args: &'a SmtpArgs,
    backends: &'a [PostfixBackend],
    owners: Owners,
    message: Arc<[u8]>,
}

pub fn run(binary: &Path, args: &SmtpArgs) -> Result<()> {
    let backends = start_backends(args.users as usize, args)?;
    check_interrupted()?;
    let edges = Edges::write(binary, &backends, args)?;
    step("starting protobalance twice: delivery = \"lmtp\", and delivery = \"smtp\" (Postfix)");
    let lmtp_protobalance = edges.lmtp.start(binary)?;
    let _smtp_protobalance = edges.smtp.start(binary)?;
    let lmtp_listener = listener(&edges.lmtp)?;
    let memory = smtp_memory::measure(lmtp_protobalance.id(), lmtp_listener, &edges.owners)?;
    let bench = Bench {
        args,
        backends: &backends,
        owners: edges.owners,
        message: lmtp::message(lmtp::BODY_BYTES).into(),
    };
    let mut rows = Vec::new();
    for (backend, edge) in [
        (Backend::Dovecot, lmtp_listener),
        (Backend::Postfix, listener(&edges.smtp)?),
    ] {
        if args.only.is_some_and(|only| only != backend) {
            continue;
        }
        for recipients in RECIPIENT_COUNTS {
            rows.push(bench.compare(backend, recipients, edge)?);
        }
    }
    print_summary(args.clients, &rows, &memory);
    print_disk_use(&backends);
    Ok(())
}

/// The two edges' configs, one per delivery, with the same backends and mailboxes.
struct Edges {
    lmtp: EdgeConfig,
    smtp: EdgeConfig,
    owners: Owners,
    _dirs: [TestDir; 2],
}

impl Edges {
    /// Writes both configs and imports user1..userN into each; apportioning is
    /// deterministic, so both directories must name the same owners (checked).
    fn write(binary: &Path, backends: &[PostfixBackend], args: &SmtpArgs) -> Result<Self> {
        let limits = Limits {
            max_message_octets: Some(smtp_memory::MAX_MESSAGE_OCTETS),
            ..Limits::for_clients(args.clients)
        };
        let to_dovecot: Vec<_> = (backends.iter())
            .map(|b| BackendSpec::of(b.dovecot()))
            .collect();
        let to_postfix: Vec<_> = backends.iter().map(BackendSpec::of_postfix).collect();
        let dirs = [TestDir::new("bench-lmtp")?, TestDir::new("bench-smtp")?];
        let lmtp = EdgeConfig::write(&dirs[0], &to_dovecot, Some(Protocol::Smtp), &limits)?;
        let smtp = EdgeConfig::write(&dirs[1], &to_postfix, Some(Protocol::Smtp), &limits)?;
        let users = args.users as usize;
        let owners = mail::provision(binary, &lmtp, &dirs[0], users)?;
        let again = mail::provision(binary, &smtp, &dirs[1], users)?;
        ensure!(
            again == owners,
            "the two edges apportioned the same mailboxes differently"
        );
        Ok(Self {
            lmtp,
            smtp,
            owners,
            _dirs: dirs,
        })
    }
}

fn listener(edge: &EdgeConfig) -> Result<SocketAddr> {
    edge.listener
        .context("the bench config has no SMTP listener")
}

/// Three Dovecot backends (with the auth listener Postfix needs), each behind its own
/// Postfix, started in parallel; all stopped if one fails.
fn start_backends(users: usize, args: &SmtpArgs) -> Result<Vec<PostfixBackend>> {
    step(&format!(
        "starting {BACKENDS} Dovecot backends (each knows all {users} test users), \
         each behind a Postfix{}",
        if args.postfix_delivers_meanwhile {
            " that delivers while it accepts"
        } else {
            " that holds what it accepts until the slice ends"
        }
    ));
    let mut extra_main_cf = postfix_limits(args.clients);
    if !args.postfix_delivers_meanwhile {
        extra_main_cf.push(HOLD_ACCEPTED.to_owned());
    }
    let options = &PostfixOptions {
        extra_main_cf,
        ..PostfixOptions::default()
    };
    thread::scope(|scope| {
        let handles: Vec<_> = (1..=BACKENDS)
            .map(|n| scope.spawn(move || start_backend(n, users, options)))
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

fn start_backend(n: usize, users: usize, options: &PostfixOptions) -> Result<PostfixBackend> {
    let name = format!("backend{n}");
    let dovecot_options = BackendOptions {
        users,
        auth_listener: true,
        ..BackendOptions::default()
    };
    let dovecot = DovecotBackend::start(&name, loopback_ip(n)?, &dovecot_options)?;
    PostfixBackend::start(&name, dovecot, options)
}

/// Every message Postfix accepts goes to its hold queue (access(5) `HOLD`, for any
/// client): stored and answered 250 as usual, delivered only once [`drain`] releases it.
const HOLD_ACCEPTED: &str = "smtpd_data_restrictions = check_client_access static:HOLD";

/// Room in Postfix for every client at once, on both paths alike: the bench and the edge
/// both connect from 127.0.0.1, which would get `421` past the default 50 connections per
/// client, and each connection holds an `smtpd` process (default limit 100).
fn postfix_limits(clients: u32) -> Vec<String> {
    vec![
        "smtpd_client_connection_count_limit = 0".to_owned(),
        format!(
            "default_process_limit = {}",
            clients.saturating_add(50).max(100)
        ),
    ]
}

impl Bench<'_> {
    /// Primes, then runs one comparison in alternating slices and prints it.
    fn compare(&self, backend: Backend, recipients: usize, edge: SocketAddr) -> Result<Row> {
        let [direct, proxied] = self.endpoints(backend, recipients, edge)?;
        let what = format!("smtp to {} rcpts={recipients}", backend.label());
        let settle = || match backend {
            Backend::Dovecot => Ok(()),
            Backend::Postfix => drain(self.backends),
        };
        step(&format!(
            "{what}: priming, one untimed message per recipient group on both paths"
        ));
        load::once_each(self.args.clients, &direct)?;
        load::once_each(self.args.clients, &proxied)?;
        settle()?;
        let plan = Plan {
            clients: self.args.clients,
            seconds: self.args.seconds,
        };
        let [direct, proxy] = load::interleaved(&what, plan, [&direct, &proxied], &settle)?;
        stats::print_comparison(&what, "messages", self.args.clients, &direct, &proxy);
        Ok(Row {
            backend,
            recipients,
            direct,
            proxy,
        })
    }

    /// (direct to the owner, through the edge at `edge`), one endpoint per recipient group.
    fn endpoints(
        &self,
        backend: Backend,
        recipients: usize,
        edge: SocketAddr,
    ) -> Result<[Vec<Endpoint>; 2]> {
        let groups = groups(&self.owners, recipients);
        ensure!(
            !groups.is_empty(),
            "--users {} leaves no backend with {recipients} mailboxes",
            self.args.users
        );
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        for (owner, recipients) in groups {
            let owner = self.backend(owner)?;
            let delivery = Delivery {
                recipients,
                message: Arc::clone(&self.message),
            };
            direct.push(match backend {
                Backend::Dovecot => Endpoint {
                    addr: owner.dovecot().lmtp_addr(),
                    session: Session::Lmtp(delivery.clone()),
                },
                Backend::Postfix => Endpoint {
                    addr: owner.smtp_addr(),
                    session: Session::Smtp(delivery.clone()),
                },
            });
            proxied.push(Endpoint {
                addr: edge,
                session: Session::Smtp(delivery),
            });
        }
        Ok([direct, proxied])
    }

    fn backend(&self, name: &str) -> Result<&PostfixBackend> {
        self.backends
            .iter()
            .find(|b| b.name() == name)
            .with_context(|| format!("the directory names an unknown backend {name}"))
    }
}

/// Recipient lists of `size` mailboxes with one owner each, the owners taking turns (so
/// consecutive sessions go to different backends). Mailboxes that do not fill a list are
/// left out.
pub(super) fn groups(owners: &Owners, size: usize) -> Vec<(&str, Vec<String>)> {
    let mut by_owner: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (user, owner) in owners {
        by_owner.entry(owner).or_default().push(user.clone());
    }
    let lists: Vec<Vec<(&str, Vec<String>)>> = by_owner
        .into_iter()
        .map(|(owner, users)| {
            let chunks = users.chunks_exact(size.max(1));
            chunks.map(|chunk| (owner, chunk.to_vec())).collect()
        })
        .collect();
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest)
        .flat_map(|i| lists.iter().filter_map(move |list| list.get(i).cloned()))
        .collect()
}

/// Releases what every Postfix holds and waits until it delivered all it queued (its 250
/// came before that); a message still queued after [`DRAIN_TIMEOUT`] is an error, with
/// the mail log's tail.
fn drain(backends: &[PostfixBackend]) -> Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    for backend in backends {
        backend.release_held()?;
    }
    for backend in backends {
        while !backend.queue_is_empty()? {
            check_interrupted()?;
            ensure!(
                Instant::now() < deadline,
                "postfix {}: {} messages still queued after {DRAIN_TIMEOUT:?}\n{}",
                backend.name(),
                backend.queue_len()?,
                backend.log_tail(20)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Bytes in the files under `dir`; what vanished while it was walked (a queue file that
/// was delivered meanwhile) is not counted.
fn disk_use(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => disk_use(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn print_disk_use(backends: &[PostfixBackend]) {
    let bytes: u64 = (backends.iter())
        .map(|b| disk_use(b.dir()) + disk_use(b.dovecot().dir()))
        .sum();
    println!(
        "backends' disk use (mail, queues, logs): {:.0} MiB",
        bytes as f64 / f64::from(1 << 20)
    );
}

fn print_summary(clients: u32, rows: &[Row], memory: &StreamingMemory) {
    println!(
        "\nsmtp summary: clients={clients}, ~10 KB messages; \
         target: protobalance >= {TARGET_RATIO:.2} x direct messages/s"
    );
    println!(
        "{:<13} {:>5} {:>12} {:>8} {:>8} {:>12} {:>8} {:>8} {:>6} {:>10}",
        "backends",
        "rcpts",
        "direct msg/s",
        "p50 ms",
        "p99 ms",
        "edge msg/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "added p50"
    );
    for row in rows {
        let (d, p) = (&row.direct, &row.proxy);
        println!(
            "{:<13} {:>5} {:>12.1} {:>8.2} {:>8.2} {:>12.1} {:>8.2} {:>8.2} {:>6.2} {:>+8.2}ms",
            row.backend.label(),
            row.recipients,
            d.rate(),
            d.percentile_ms(50.0),
            d.percentile_ms(99.0),
            p.rate(),
            p.percentile_ms(50.0),
            p.percentile_ms(99.0),
            stats::ratio(d, p),
            stats::added_p50_ms(d, p),
        );
    }
    memory.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_have_one_owner_and_take_turns() {
        let owners: Owners = (1..=13)
            .map(|i| (format!("user{i}"), format!("b{}", i % 2)))
            .collect();
        let groups = groups(&owners, 5);
        // b1 owns 7 mailboxes, b0 six: one full list each, the rest left out.
        let names: Vec<&str> = groups.iter().map(|(owner, _)| *owner).collect();
        assert_eq!(names, ["b0", "b1"]);
        for (owner, users) in &groups {
            assert_eq!(users.len(), 5);
            for user in users {
                let (_, o) = owners.iter().find(|(u, _)| u == user).expect("listed");
                assert_eq!(o, owner);
            }
        }
        assert_eq!(super::groups(&owners, 1).len(), 13);
        assert_eq!(
            super::groups(&owners, 1)[..2],
            [
                ("b0", vec!["user2".to_owned()]),
                ("b1", vec!["user1".to_owned()])
            ]
        );
    }
}
