//! `protobalance directory …`: provisioning and inspection from the command line.

use std::{io::BufReader, time::Instant};

use anyhow::Context as _;
use protobalance::{
    app::open_directory,
    config::Config,
    directory::{MailboxDirectory as _, Store, import, sqlite::SqliteDirectory},
};

use crate::DirectoryCommand;

pub fn run(command: DirectoryCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        match command {
            DirectoryCommand::Import { config, file } => {
                let config = Config::load(&config)?.config;
                let store = match open_directory(&config).await? {
                    Store::Sqlite(store) => store,
                    Store::Postgres(_) => anyhow::bail!(
                        "`directory import` writes the SQLite directory; with \
                         directory.store = \"postgres\" import through a running node: \
                         `protobalance ctl mailbox import {}`",
                        file.display()
                    ),
                };
                import_file(&store, &config, &file)
            }
            DirectoryCommand::Lookup { config, login } => {
                let config = Config::load(&config)?.config;
                let store = open_directory(&config).await?;
                let mailbox = config.directory.normalizer().normalize(&login)?.mailbox;
                match store.owner_of(&mailbox).await? {
                    Some(backend) => println!("{mailbox} -> {backend}"),
                    None => println!("{mailbox}: not in the directory"),
                }
                Ok(())
            }
            DirectoryCommand::Backends { config } => {
                let config = Config::load(&config)?.config;
                let store = open_directory(&config).await?;
                println!(
                    "{:<24} {:>9} {:>10} {:>12}",
                    "backend", "state", "capacity", "mailboxes"
                );
                for b in store.backends().await? {
                    println!(
                        "{:<24} {:>9} {:>10} {:>12}",
                        b.name,
                        b.state.as_str(),
                        b.capacity,
                        b.mailboxes
                    );
                }
                Ok(())
            }
        }
    })
}

fn import_file(
    store: &SqliteDirectory,
    config: &Config,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    let reader =
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let started = Instant::now();
    let progress = |lines: u64| {
        let rate = lines as f64 / started.elapsed().as_secs_f64().max(1e-3);
        eprintln!("  {lines} lines read ({rate:.0}/s)");
    };
    let normalizer = config.directory.normalizer();
    let report = import::import(
        store,
        &normalizer,
        BufReader::new(reader),
        100_000,
        progress,
    )
    .with_context(|| format!("importing {} (nothing was written)", file.display()))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {} new mailboxes in {secs:.1} s ({:.0}/s); {} unchanged; {} conflicts",
        report.added,
        report.added as f64 / secs.max(1e-3),
        report.unchanged,
        report.conflicts.len()
    );
    for (backend, n) in &report.per_backend {
        println!("  {backend}: +{n}");
    }
    for address in report.conflicts.iter().take(20) {
        println!("  conflict: {address} is on another backend than the file says (not moved)");
    }
    Ok(())
}
