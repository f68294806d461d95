//! The `protobalance` command line: `run`, `check`, and `filter load|unload` for operators
//! who attach the kernel filter at boot, before the proxy starts; `filter ban|unban|bans|
//! explain` on the pinned maps of a running filter.

use std::{io::IsTerminal as _, path::PathBuf, time::Duration};

use anyhow::Context as _;

mod directory_cli;
use clap::{Parser, Subcommand};
use protobalance::ctl;
use protobalance::{
    app::App,
    config::Config,
    filter::xdp::{self, AttachMode, BanMaps, BanMode, BanTarget, XdpFilter},
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "protobalance",
    version,
    about = "SMTP/POP3/IMAP clustering edge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config, bind, load the kernel filter and serve until SIGTERM/SIGINT;
    /// SIGHUP re-reads the config's kernel lists.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the config and exit: 0 when valid, 1 with a message naming the bad key.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Attach or detach the kernel filter alone, with pinned maps and link.
    #[command(subcommand)]
    Filter(FilterCommand),
    /// Inspect and provision the mailbox directory.
    #[command(subcommand)]
    Directory(DirectoryCommand),
    /// Drive a running protobalance through its XML management API (docs/api.md).
    Ctl(ctl::Args),
    /// Why is ADDRESS treated as it is? The reputation engine's score, verdict and events,
    /// and the kernel bans covering it (`ctl explain`; same options).
    Explain(ctl::ExplainArgs),
}

#[derive(Subcommand)]
enum DirectoryCommand {
    /// Import mailboxes from FILE (one `address[,backend]` per line; see docs/directory.md).
    Import {
        #[arg(long, short)]
        config: PathBuf,
        file: PathBuf,
    },
    /// Print the backend that owns LOGIN (after normalization), without assigning it.
    Lookup {
        #[arg(long, short)]
        config: PathBuf,
        login: String,
    },
    /// List backends with their state and mailbox counts.
    Backends {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum FilterCommand {
    /// Load the XDP filter, attach it to IFACE and pin it so it stays after this exits.
    Load {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf/protobalance")]
        pin_dir: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        mode: CliMode,
    },
    /// Detach the pinned filter from IFACE and remove its pins (blocklists included).
    Unload {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf/protobalance")]
        pin_dir: PathBuf,
        /// Keep the pinned maps (blocklists, counters) for the next load.
        #[arg(long)]
        keep_maps: bool,
    },
    /// Ban an address (or an IPv6 /64: `2001:db8:1:2::/64`) in the pinned filter.
    Ban {
        target: String,
        /// Seconds until the ban expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Drop only new connections (TCP SYN); open sessions continue.
        #[arg(long)]
        new_connections: bool,
        /// A number recorded with the ban (why it was placed).
        #[arg(long, default_value_t = 0)]
        reason: u32,
        #[arg(long, default_value = "/sys/fs/bpf/protobalance")]
        pin_dir: PathBuf,
    },
    /// Lift a ban placed with `filter ban` (or by protobalance).
    Unban {
        target: String,
        #[arg(long, default_value = "/sys/fs/bpf/protobalance")]
        pin_dir: PathBuf,
    },
    /// List the bans in the pinned filter with the time they have left.
    Bans {
        #[arg(long, default_value = "/sys/fs/bpf/protobalance")]
        pin_dir: PathBuf,
    },
    /// Say which rule of the pinned filter would decide a new connection from IP to PORT
    /// (a synthetic SYN through a side-effect-free copy of the program).
    Explain {
        ip: std::net::IpAddr,
        /// Destination port of the connection.
        #[arg(long, default_value_t = 25)]
        port: u16,
        #[arg(long, default_value = "/sys/fs/bpf/protobalance")]
        pin_dir: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CliMode {
    Auto,
    Driver,
    Skb,
}

impl From<CliMode> for AttachMode {
    fn from(mode: CliMode) -> Self {
        match mode {
            CliMode::Auto => AttachMode::Auto,
            CliMode::Driver => AttachMode::Driver,
            CliMode::Skb => AttachMode::Skb,
        }
    }
}

fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::try_parse().unwrap_or_else(|error| ctl::exit_on_parse_error(error));
    match dispatch(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("protobalance: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { config } => {
            let validated = Config::load(&config)?;
            println!(
                "{}: ok ({} blocklist entries)",
                config.display(),
                validated.blocklist.len()
            );
            Ok(())
        }
        Command::Run { config } => {
            let validated = Config::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(run(validated, config))
        }
        Command::Directory(command) => directory_cli::run(command),
        Command::Ctl(args) => std::process::exit(ctl::run(args)),
        Command::Explain(args) => std::process::exit(ctl::run_explain(args)),
        Command::Filter(FilterCommand::Load {
            iface,
            pin_dir,
            mode,
        }) => {
            let mut filter = XdpFilter::load(Some(&pin_dir))?;
            let attached = filter.attach(&iface, mode.into())?;
            let link = filter.pin_attachment(&iface)?;
            println!(
                "XDP filter attached to {iface} ({attached:?}); link pinned at {}",
                link.display()
            );
            Ok(())
        }
        Command::Filter(
            command @ (FilterCommand::Ban { .. }
            | FilterCommand::Unban { .. }
            | FilterCommand::Bans { .. }),
        ) => bans_cli(command),
        Command::Filter(FilterCommand::Explain { ip, port, pin_dir }) => {
            println!("{}", xdp::explain_pinned(&pin_dir, ip, port)?);
            Ok(())
        }
        Command::Filter(FilterCommand::Unload {
            iface,
            pin_dir,
            keep_maps,
        }) => {
            let had_link = xdp::unload_pinned(&pin_dir, &iface, !keep_maps)?;
            if had_link {
                println!("XDP filter detached from {iface}");
            } else {
                println!(
                    "no pinned XDP filter for {iface} under {}",
                    pin_dir.display()
                );
            }
            Ok(())
        }
    }
}

/// Each proxied session holds two sockets; the usual soft limit of 1024 descriptors would
/// cap the edge at ~500 sessions. Raise the soft limit to the hard one.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < 16_384 => tracing::warn!(
            limit,
            "file descriptor limit is low: about {} concurrent sessions; raise LimitNOFILE",
            limit / 2
        ),
        Ok(limit) => tracing::info!(limit, "file descriptor limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the file descriptor limit"),
    }
}

/// `filter ban|unban|bans` on the maps a running (or boot-loaded) filter pinned.
fn bans_cli(command: FilterCommand) -> anyhow::Result<()> {
    match command {
        FilterCommand::Ban {
            target,
            ttl,
            new_connections,
            reason,
            pin_dir,
        } => {
            let target = parse_ban_target(&target)?;
            let mode = if new_connections {
                BanMode::NewConnections
            } else {
                BanMode::All
            };
            BanMaps::open_pinned(&pin_dir)?.ban(target, Duration::from_secs(ttl), mode, reason)?;
            println!("banned {target:?} for {ttl} s ({mode:?})");
        }
        FilterCommand::Unban { target, pin_dir } => {
            let target = parse_ban_target(&target)?;
            BanMaps::open_pinned(&pin_dir)?.unban(target)?;
            println!("unbanned {target:?}");
        }
        FilterCommand::Bans { pin_dir } => {
            for ban in BanMaps::open_pinned(&pin_dir)?.list()? {
                println!(
                    "{:?}\t{:?}\treason {}\t{} s left",
                    ban.target,
                    ban.mode,
                    ban.reason,
                    ban.remaining.as_secs()
                );
            }
        }
        FilterCommand::Load { .. }
        | FilterCommand::Unload { .. }
        | FilterCommand::Explain { .. } => {}
    }
    Ok(())
}

/// `198.51.100.7`, `2001:db8::7`, or `2001:db8:1:2::/64` (a whole IPv6 /64).
fn parse_ban_target(text: &str) -> anyhow::Result<BanTarget> {
    if let Some(net) = text.strip_suffix("/64") {
        let addr: std::net::Ipv6Addr = net
            .parse()
            .with_context(|| format!("`{text}`: expected an IPv6 /64 like 2001:db8:1:2::/64"))?;
        return Ok(BanTarget::Ipv6Net64(addr));
    }
    let addr: std::net::IpAddr = text
        .parse()
        .with_context(|| format!("`{text}` is not an IP address (or IPv6 /64)"))?;
    Ok(BanTarget::Address(addr))
}

async fn run(validated: protobalance::config::Validated, path: PathBuf) -> anyhow::Result<()> {
    raise_fd_limit();
    let exe = protobalance::upgrade::current_exe();
    let app = App::start(validated).await?.reload_from(path);
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match exe {
        Some(exe) => {
            tokio::spawn(protobalance::upgrade::on_signal(
                exe,
                app.listen_fds(),
                shutdown.clone(),
            ));
        }
        None => tracing::warn!("cannot tell this binary's path: no live upgrade on SIGUSR2"),
    }
    app.serve(shutdown).await;
    Ok(())
}

/// SIGTERM and SIGINT: stop accepting, drain, exit.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop protobalance with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROTOBALANCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
