//! The directory file's layout and its migrations. [`prepare`] runs on every open: it
//! creates a new file, brings an older one up to date, and changes nothing on a current one.
//!
//! Layouts so far:
//! 1. `backends`, `domains`, `mailboxes (address → backend_id)`.
//! 2. `mailboxes.domain`, the part of the address after its last `@`, plus indexes on
//!    `(domain, address)` and `(backend_id, address)`: listing by domain or backend, the
//!    in-use checks before deleting either, and the foreign-key check when a backend row is
//!    deleted would otherwise scan every mailbox.
//!
//! 3. `backends.spec`: the definition (TOML of a `[[backend]]`) of a backend added through
//!    the API; `NULL` for the config file's backends. `blocklist`: the blocklist entries
//!    added through the API (list name, CIDR, reason, expiry in Unix seconds or NULL).
//!    `suspensions`: accounts suspended from sending (submission), with reason and the
//!    Unix seconds of start and end — a new table, created on the next open of any file.
//! 4. `moves` and `move_copies`: the mailbox moves in progress (who holds each, its last
//!    heartbeat) and the messages each copied, so that a move cut short by a stop is
//!    finished by the next run without copying a message twice — new tables again.
//!
//! `domain` is a VIRTUAL generated column rather than one written on insert: SQLite derives
//! it, so no writer (the import, a future tool) can forget it or get it wrong, and adding it
//! to a layout-1 file is a change to the schema alone — no backfill; building the index
//! reads each row once, on the first open after the upgrade.

use rusqlite::{Connection, TransactionBehavior};

use super::store_err;
use crate::directory::DirectoryError;

/// The column definition of `mailboxes.domain`. `rtrim(a, replace(a, '@', ''))` strips every
/// character that is not `@` from the right, leaving the address up to its last `@`
/// (SQLite has no "last index of").
macro_rules! domain_column {
    () => {
        "domain TEXT GENERATED ALWAYS AS \
         (substr(address, length(rtrim(address, replace(address, '@', ''))) + 1)) VIRTUAL"
    };
}

const TABLES: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS backends (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL UNIQUE,
    capacity  INTEGER NOT NULL CHECK (capacity >= 0),
    state     TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'down')),
    mailboxes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS blocklist (
    list       TEXT NOT NULL,
    cidr       TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    expires_at INTEGER,
    PRIMARY KEY (list, cidr)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS suspensions (
    account TEXT PRIMARY KEY,
    reason  TEXT NOT NULL,
    since   INTEGER NOT NULL,
    until   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS domains (
    name   TEXT PRIMARY KEY,
    policy TEXT NOT NULL CHECK (policy IN ('reject', 'auto-provision'))
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS moves (
    mailbox      TEXT PRIMARY KEY,
    from_backend TEXT NOT NULL,
    to_backend   TEXT NOT NULL,
    holder       TEXT NOT NULL,
    started_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS move_copies (
    mailbox  TEXT NOT NULL REFERENCES moves (mailbox) ON DELETE CASCADE,
    folder   TEXT NOT NULL,
    validity INTEGER NOT NULL,
    old_uid  INTEGER NOT NULL,
    new_uid  INTEGER,
    flags    TEXT NOT NULL,
    PRIMARY KEY (mailbox, folder, old_uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailboxes (
    address    TEXT PRIMARY KEY,
    backend_id INTEGER NOT NULL REFERENCES backends (id),
    ",
    domain_column!(),
    "
) WITHOUT ROWID;
"
);

/// Layout 1 → 2.
const ADD_DOMAIN: &str = concat!("ALTER TABLE mailboxes ADD COLUMN ", domain_column!(), ";");

/// Secondary index entries of a WITHOUT ROWID table end in the primary key anyway; naming
/// `address` says what the order is for (keyset paging within a domain or backend).
const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS mailboxes_by_domain ON mailboxes (domain, address);
CREATE INDEX IF NOT EXISTS mailboxes_by_backend ON mailboxes (backend_id, address);
";

/// Creates or upgrades the schema in one IMMEDIATE transaction, so two processes opening
/// an old file at once do not both try to add the column.
pub(super) fn prepare(conn: &mut Connection) -> Result<(), DirectoryError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(store_err)?;
    tx.execute_batch(TABLES).map_err(store_err)?;
    // table_xinfo, not table_info: the latter hides generated columns.
    let has_domain: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_xinfo('mailboxes') WHERE name = 'domain')",
            [],
            |row| row.get(0),
        )
        .map_err(store_err)?;
    if !has_domain {
        tx.execute_batch(ADD_DOMAIN).map_err(store_err)?;
    }
    let has_spec: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('backends') WHERE name = 'spec')",
            [],
            |row| row.get(0),
        )
        .map_err(store_err)?;
    if !has_spec {
        tx.execute_batch("ALTER TABLE backends ADD COLUMN spec TEXT;")
            .map_err(store_err)?;
    }
    tx.execute_batch(INDEXES).map_err(store_err)?;
    tx.commit().map_err(store_err)
}
