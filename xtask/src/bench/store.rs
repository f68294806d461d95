//! Read-only access to the directory's SQLite file, for the benchmarks only. xtask does not
//! depend on protobalance-user (that would pull the eBPF build into xtask), so the lookup
//! query is the store's own (`SqliteDirectory::owner_of_blocking`), copied: keep them equal.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension as _};

/// The query behind `MailboxDirectory::owner_of` (protobalance-user/src/directory/sqlite.rs).
pub const OWNER_OF: &str =
    "SELECT b.name FROM mailboxes m JOIN backends b ON b.id = m.backend_id WHERE m.address = ?1";

pub fn open_read_only(path: &Path) -> Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", path.display()))
}

/// The owner of one (normalized) address, through a cached prepared statement.
pub fn owner_of(conn: &Connection, address: &str) -> Result<Option<String>> {
    let mut stmt = conn
        .prepare_cached(OWNER_OF)
        .context("preparing the lookup")?;
    stmt.query_row([address], |row| row.get(0))
        .optional()
        .with_context(|| format!("looking up {address}"))
}

/// Every mailbox and its owner, in one scan (to seed and route a benchmark's users).
pub fn all_owners(conn: &Connection) -> Result<HashMap<String, String>> {
    let mut stmt = conn
        .prepare("SELECT m.address, b.name FROM mailboxes m JOIN backends b ON b.id = m.backend_id")
        .context("preparing the owner scan")?;
    let rows = stmt
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .context("scanning mailboxes")?;
    rows.collect::<rusqlite::Result<_>>()
        .context("reading mailboxes")
}

/// Bytes used by the database and its WAL/shared-memory files.
pub fn disk_use(db: &Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            std::fs::metadata(name).ok()
        })
        .map(|m| m.len())
        .sum()
}
