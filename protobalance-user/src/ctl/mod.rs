//! `protobalance ctl …`: the XML management API (docs/api.md) from the command line.
//! This module owns the command tree, the token (from a file or the environment, never
//! argv), the exit codes scripts rely on and the `protobalance ctl: <code>: <message>`
//! error line. [`commands`] runs each command: [`client`] speaks HTTP to the admin
//! listener, [`doc`] reads the answers, [`render`] prints them for people (`--xml` prints
//! the server's body as is), and [`import`] streams a mailbox file as one `<import>`
//! document. [`backend`], [`bans`] and [`blocklist`] own their subcommands and bodies.

mod backend;
mod bans;
mod blocklist;
mod client;
mod commands;
mod doc;
mod import;
mod render;

use std::{
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Subcommand, ValueEnum};

use crate::secret::Secret;
use backend::BackendCommand;
use bans::BanCommand;
use blocklist::BlockCommand;
use client::{Client, Endpoint};
use commands::Ctl;

/// What `--help` says about exits; docs/api.md has the same table.
const EXIT_HELP: &str = "\
Exit codes:
  0  success
  1  usage, connection or I/O error (the message says which and how to fix it)
  2  not found (HTTP 404)
  3  conflict with the current state (HTTP 409)
  4  no token, or the server refused it (HTTP 401, 403)
  5  invalid request (HTTP 400, 405, 413, 422)
  6  server error (HTTP 5xx)
  7  `mailbox import` ran, but some mailboxes were not imported (each is listed)
Errors go to stderr as `protobalance ctl: <code>: <message>`; <code> is the server's
stable error code (docs/api.md) or a local one (connection_failed, timeout, no_token, …).

The token comes from --token-file FILE or $PROTOBALANCE_TOKEN: never from an argument,
which every user could read in `ps`.";

/// The `ctl` subcommand and its global options.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_HELP)]
pub struct Args {
    /// The admin listener (admin.listen) of the protobalance to drive.
    #[arg(
        long,
        env = "PROTOBALANCE_URL",
        default_value = "http://127.0.0.1:9925",
        global = true
    )]
    url: String,
    /// A file whose first line is the API token (else $PROTOBALANCE_TOKEN is used).
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Print the server's XML answer as is (for scripts) instead of a table.
    #[arg(long, global = true)]
    xml: bool,
    /// Seconds to wait for the connection and for each answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, global = true,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Mailboxes: add, show, remove, list, bulk import.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Domains and their unknown-mailbox policy.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Backends: list with health and load; add, set capacity, drain, activate, take
    /// down, remove.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Timed bans in the kernel filter: list, add, lift (needs xdp.interface).
    #[command(subcommand)]
    Ban(BanCommand),
    /// Named blocklists in the kernel filter: list, add, remove, replace from a file
    /// (needs xdp.interface).
    #[command(subcommand)]
    Block(BlockCommand),
    /// The directory's total and every protobalance_* metric (as /metrics has them).
    Stats,
    /// What the reputation engine holds against ADDRESS: score, verdict, the events that
    /// built it, and the kernel bans covering it.
    Explain { address: String },
    /// Forgive ADDRESS: forget its score and history and lift the kernel bans covering it.
    Forgive { address: String },
    /// Accounts suspended from sending (submission): list, suspend, lift.
    #[command(subcommand)]
    Suspension(SuspensionCommand),
    /// Reload the server's config file now (as SIGHUP does); exits 5 when it is invalid.
    Reload,
}

#[derive(Subcommand, Debug)]
enum SuspensionCommand {
    /// List suspended accounts: reason, since, time left.
    Ls,
    /// Suspend ACCOUNT from sending for SECONDS.
    Add {
        account: String,
        #[arg(long, value_name = "SECONDS")]
        seconds: u64,
    },
    /// Lift the suspension of ACCOUNT.
    Rm { account: String },
}

#[derive(Subcommand, Debug)]
enum MailboxCommand {
    /// Add ADDRESS: apportioned by capacity, or pinned with --backend.
    Add {
        address: String,
        #[arg(long)]
        backend: Option<String>,
    },
    /// Show the backend that owns ADDRESS and that backend's state.
    Show { address: String },
    /// Remove ADDRESS from the directory (its mail stays on its backend).
    Rm { address: String },
    /// Move ADDRESS with its mail to another backend (default: where a new mailbox would
    /// go now): copied over IMAP, switched, the old copy deleted (`[moves]`).
    Move {
        address: String,
        /// The backend to move to.
        #[arg(long, value_name = "BACKEND")]
        to: Option<String>,
    },
    /// List the moves recorded in the directory: running (on this node or another) or
    /// stopped and waiting to be resumed.
    Moves,
    /// Give up the stopped move of ADDRESS: nothing resumes it; what its old backend still
    /// holds stays there (refused while a run holds the move).
    AbandonMove {
        address: String,
        /// Abandon it even though the mailbox was switched already (what the old backend
        /// still holds is then for the operator to move by hand).
        #[arg(long)]
        force: bool,
    },
    /// List mailboxes in address order: one page, or every page with --all.
    Ls {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        backend: Option<String>,
        /// Mailboxes per page, 1-1000 (default 100; 1000 with --all).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: Option<u16>,
        /// Follow `next` through every page (with --xml: one document per page).
        #[arg(long)]
        all: bool,
    },
    /// Import the mailboxes of FILE, streamed as it is read.
    ///
    /// FILE (`-`: stdin) has one `address[,backend]` per line and whole-line `#` comments,
    /// as for `protobalance directory import`. Prints the summary and every mailbox not
    /// imported; exits 7 if there was any (the others are imported all the same).
    Import {
        file: PathBuf,
        /// Leave added and existing mailboxes out of the server's report (what --xml
        /// prints; the human output lists failures only anyway).
        #[arg(long)]
        errors_only: bool,
        /// Print progress on stderr even when it is not a terminal.
        #[arg(long)]
        progress: bool,
        /// Lines between progress reports.
        #[arg(long, value_name = "N", default_value_t = 10_000,
              value_parser = clap::value_parser!(u64).range(1..))]
        progress_every: u64,
    },
}

#[derive(Subcommand, Debug)]
enum DomainCommand {
    /// List domains: policy, mailboxes, and whether the config file or the API manages them.
    Ls,
    /// Add domain NAME (unknown mailboxes rejected unless told otherwise).
    Add {
        name: String,
        #[arg(long, value_enum)]
        unknown_mailbox: Option<Policy>,
    },
    /// Change the unknown-mailbox policy of NAME.
    Set {
        name: String,
        #[arg(long, value_enum)]
        unknown_mailbox: Policy,
    },
    /// Remove domain NAME (refused while it has mailboxes).
    Rm { name: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Policy {
    Reject,
    AutoProvision,
}

impl Policy {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Reject => "reject",
            Self::AutoProvision => "auto-provision",
        }
    }
}

/// The exit status of `protobalance ctl`; see [`EXIT_HELP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    Failure = 1,
    NotFound = 2,
    Conflict = 3,
    Auth = 4,
    Invalid = 5,
    Server = 6,
    ImportIncomplete = 7,
}

impl Exit {
    pub const fn for_status(status: u16) -> Self {
        match status {
            401 | 403 => Self::Auth,
            404 => Self::NotFound,
            409 => Self::Conflict,
            400..=499 => Self::Invalid,
            500..=599 => Self::Server,
            _ => Self::Failure,
        }
    }
}

/// Why a `ctl` command failed; `Display` is the `<code>: <message>` of the error line.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The server's `<error>` document (or a non-API answer with an error status).
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("no_token: {0}")]
    Token(String),
    #[error("usage: {0}")]
    Usage(String),
    #[error("connection_failed: {0}")]
    Connect(String),
    #[error("timeout: {0}")]
    Timeout(String),
    #[error("io: {0}")]
    Io(String),
    #[error("bad_response: {0}")]
    BadResponse(String),
    #[error("output: writing to stdout: {0}")]
    Output(io::Error),
    #[error(
        "import_incomplete: {failed} mailboxes were not imported (see the report); the others were"
    )]
    ImportIncomplete { failed: u64 },
}

impl CtlError {
    pub const fn exit(&self) -> Exit {
        match self {
            Self::Api { status, .. } => Exit::for_status(*status),
            Self::Token(_) => Exit::Auth,
            Self::ImportIncomplete { .. } => Exit::ImportIncomplete,
            Self::Usage(_)
            | Self::Connect(_)
            | Self::Timeout(_)
            | Self::Io(_)
            | Self::BadResponse(_)
            | Self::Output(_) => Exit::Failure,
        }
    }

    /// Appends `note` to the message of a local failure.
    fn with_note(self, note: &str) -> Self {
        match self {
            Self::Io(m) => Self::Io(format!("{m}; {note}")),
            Self::Timeout(m) => Self::Timeout(format!("{m}; {note}")),
            other => other,
        }
    }
}

/// Runs `protobalance ctl …` and returns its exit code.
pub fn run(args: Args) -> i32 {
    let exit = match run_command(args) {
        Ok(()) => Exit::Success,
        // `ctl mailbox ls --all | head`: the reader has what it wanted.
        Err(CtlError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Exit::Success,
        Err(error) => {
            let _ = io::stdout().flush();
            eprintln!("protobalance ctl: {error}");
            error.exit()
        }
    };
    let _ = io::stdout().flush();
    exit as i32
}

/// Prints a command-line parse error (or help) and exits: with 1 for `ctl` usage errors,
/// as its exit codes promise, and clap's own code otherwise.
pub fn exit_on_parse_error(error: clap::Error) -> ! {
    let ctl = std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "ctl" || a == "explain");
    let code = if ctl && error.use_stderr() {
        Exit::Failure as i32
    } else {
        error.exit_code()
    };
    let _ = error.print();
    std::process::exit(code)
}

/// `protobalance explain ADDRESS`: `ctl explain` under a shorter name, with the same
/// options (`--url`, `--token-file`, `--xml`, `--timeout`) and exit codes.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_HELP)]
pub struct ExplainArgs {
    /// The client address to explain (an IPv6 client is judged by its /64 by default).
    address: String,
    /// The admin listener (admin.listen) of the protobalance to ask.
    #[arg(
        long,
        env = "PROTOBALANCE_URL",
        default_value = "http://127.0.0.1:9925"
    )]
    url: String,
    /// A file whose first line is the API token (else $PROTOBALANCE_TOKEN is used).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print the server's XML answer as is.
    #[arg(long)]
    xml: bool,
    /// Seconds to wait for the connection and the answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
}

pub fn run_explain(args: ExplainArgs) -> i32 {
    run(Args {
        url: args.url,
        token_file: args.token_file,
        xml: args.xml,
        timeout: args.timeout,
        command: CtlCommand::Explain {
            address: args.address,
        },
    })
}

fn run_command(args: Args) -> Result<(), CtlError> {
    let endpoint = Endpoint::parse(&args.url)?;
    let token = token(args.token_file.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CtlError::Io(format!("starting the tokio runtime: {e}")))?;
    let ctl = Ctl::new(
        Client::new(endpoint, token, Duration::from_secs(args.timeout)),
        args.xml,
    );
    runtime.block_on(ctl.dispatch(args.command))
}

/// The token: first line of `--token-file`, else `$PROTOBALANCE_TOKEN`.
fn token(file: Option<&Path>) -> Result<Secret<String>, CtlError> {
    let hint = "a token from the server's [[api.token]] (docs/api.md)";
    if let Some(file) = file {
        let mut text = String::new();
        std::fs::File::open(file)
            .and_then(|f| f.take(64 * 1024).read_to_string(&mut text))
            .map_err(|e| CtlError::Io(format!("reading --token-file {}: {e}", file.display())))?;
        let first = text.lines().next().unwrap_or_default().trim();
        if first.is_empty() {
            return Err(CtlError::Token(format!(
                "--token-file {} is empty: its first line must be {hint}",
                file.display()
            )));
        }
        return Ok(Secret::new(first.to_owned()));
    }
    match std::env::var("PROTOBALANCE_TOKEN") {
        Ok(text) if !text.trim().is_empty() => Ok(Secret::new(text.trim().to_owned())),
        Ok(_) => Err(CtlError::Token(format!(
            "PROTOBALANCE_TOKEN is empty: set it to {hint}, or pass --token-file FILE"
        ))),
        Err(std::env::VarError::NotUnicode(_)) => Err(CtlError::Token(
            "PROTOBALANCE_TOKEN is not valid UTF-8".into(),
        )),
        Err(std::env::VarError::NotPresent) => Err(CtlError::Token(format!(
            "no API token: set PROTOBALANCE_TOKEN or pass --token-file FILE with {hint} \
             (never as an argument: ps would show it)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_documented_exit_codes() {
        let cases = [
            (404, 2),
            (409, 3),
            (401, 4),
            (403, 4),
            (400, 5),
            (405, 5),
            (413, 5),
            (422, 5),
            (500, 6),
            (503, 6),
            (302, 1),
        ];
        for (status, code) in cases {
            assert_eq!(Exit::for_status(status) as i32, code, "{status}");
        }
        let missing = CtlError::Token("x".into());
        assert_eq!(missing.exit(), Exit::Auth);
        assert_eq!(CtlError::ImportIncomplete { failed: 1 }.exit() as i32, 7);
        assert_eq!(CtlError::Connect("x".into()).exit() as i32, 1);
    }

    #[test]
    fn the_token_comes_from_the_first_line_of_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("t");
        std::fs::write(&file, "  abc123  \nsecond\n").expect("write");
        assert_eq!(token(Some(&file)).expect("token").expose(), "abc123");
        std::fs::write(&file, "\n").expect("write");
        assert!(matches!(token(Some(&file)), Err(CtlError::Token(_))));
        let error = token(Some(&dir.path().join("none"))).expect_err("missing");
        assert!(matches!(error, CtlError::Io(_)), "{error}");
        assert!(error.to_string().contains("--token-file"), "{error}");
    }
}
