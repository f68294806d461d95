//! The PostgreSQL directory's layout and its versioned migrations. [`prepare`] runs on every
//! start: under a transaction-scoped advisory lock (two nodes starting at once take turns),
//! it applies the migrations the database has not seen, in order, each recorded in
//! `protobalance_schema`, and refuses a database written by a newer protobalance.
//!
//! Versions so far:
//! 1. `backends`, `domains`, `mailboxes (address → backend_id, domain)` with the same meaning
//!    as the SQLite layout; `blocklist`, `suspensions`; the `protobalance_mailbox` change
//!    notification (the address whose owner changed or that was deleted), which keeps every
//!    node's owner cache coherent.
//! 2. The `protobalance_blocklist` notification: blocklist entries added, replaced, removed
//!    or expired on one node reach every node's kernel filter. `bans` with the
//!    `protobalance_ban` notification: a ban placed on one node is enforced by every node.
//! 3. The `protobalance_backend` notification: backends added, removed, drained or taken
//!    down through one node reach every node's pool.
//! 4. `moves`, `move_copies`: mailbox moves in progress and what they copied (a move is
//!    exclusive across nodes, and one whose node stopped is finished by another run).
//!
//! Addresses use the "C" collation: keyset paging compares bytes, as SQLite does, whatever
//! locale the cluster was created with.

use deadpool_postgres::tokio_postgres::Client;

use super::{pg_err, pg_text};
use crate::directory::DirectoryError;

/// The channel of owner changes; the payload is the address.
pub const MAILBOX_CHANNEL: &str = "protobalance_mailbox";
/// The channel of blocklist changes (no payload: the lists are read again).
pub const BLOCKLIST_CHANNEL: &str = "protobalance_blocklist";
/// The channel of ban changes; the payload is the target (`198.51.100.7`, `2001:db8::/64`).
pub const BAN_CHANNEL: &str = "protobalance_ban";
/// The channel of backend changes (no payload: the backends are read again).
pub const BACKEND_CHANNEL: &str = "protobalance_backend";

/// Any fixed number shared by every node: the advisory lock key for migrations.
const MIGRATION_LOCK: i64 = 0x7062_6d69_6772; // "pbmigr"

const V1: &str = r#"
CREATE TABLE backends (
    id        bigserial PRIMARY KEY,
    name      text NOT NULL UNIQUE,
    capacity  bigint NOT NULL CHECK (capacity >= 0),
    state     text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'down')),
    mailboxes bigint NOT NULL DEFAULT 0,
    spec      text
);
CREATE TABLE domains (
    name   text COLLATE "C" PRIMARY KEY,
    policy text NOT NULL CHECK (policy IN ('reject', 'auto-provision'))
);
CREATE TABLE mailboxes (
    address    text COLLATE "C" PRIMARY KEY,
    backend_id bigint NOT NULL REFERENCES backends (id),
    domain     text COLLATE "C" GENERATED ALWAYS AS (substring(address from '[^@]*$')) STORED
);
CREATE INDEX mailboxes_by_domain ON mailboxes (domain, address);
CREATE INDEX mailboxes_by_backend ON mailboxes (backend_id, address);
CREATE TABLE blocklist (
    list       text NOT NULL,
    cidr       text NOT NULL,
    reason     text NOT NULL DEFAULT '',
    expires_at bigint,
    PRIMARY KEY (list, cidr)
);
CREATE TABLE suspensions (
    account text PRIMARY KEY,
    reason  text NOT NULL,
    since   bigint NOT NULL,
    until   bigint NOT NULL
);
CREATE FUNCTION protobalance_mailbox_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR OLD.backend_id IS DISTINCT FROM NEW.backend_id THEN
        PERFORM pg_notify('protobalance_mailbox', OLD.address);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER mailboxes_changed AFTER UPDATE OR DELETE ON mailboxes
    FOR EACH ROW EXECUTE FUNCTION protobalance_mailbox_changed();
"#;

/// Version 2: a change to the blocklist (any statement) notifies `protobalance_blocklist`,
/// and every node rewrites its kernel lists from the table. `bans`: the timed kernel bans
/// placed on any node (API, reputation engine), with their end in Unix milliseconds; a
/// change to a row notifies `protobalance_ban` with the target.
const V2: &str = r#"
CREATE TABLE bans (
    target     text PRIMARY KEY,
    mode       text NOT NULL CHECK (mode IN ('all', 'new-connections')),
    reason     bigint NOT NULL,
    expires_ms bigint NOT NULL,
    node       text NOT NULL
);
CREATE INDEX bans_by_expiry ON bans (expires_ms);
CREATE FUNCTION protobalance_ban_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('protobalance_ban', OLD.target);
    ELSE
        PERFORM pg_notify('protobalance_ban', NEW.target);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER bans_changed AFTER INSERT OR UPDATE OR DELETE ON bans
    FOR EACH ROW EXECUTE FUNCTION protobalance_ban_changed();
CREATE FUNCTION protobalance_blocklist_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('protobalance_blocklist', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER blocklist_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON blocklist
    FOR EACH STATEMENT EXECUTE FUNCTION protobalance_blocklist_changed();
"#;

/// Version 3: a backend added, removed or changed (definition, capacity, state) notifies
/// `protobalance_backend`: every node brings its pool up to date (a backend added through
/// one node's API serves on all of them; a backend taken down is down everywhere). The
/// mailbox counter is not among the columns: assignments do not notify.
const V3: &str = r#"
CREATE FUNCTION protobalance_backend_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('protobalance_backend', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER backends_changed
    AFTER INSERT OR DELETE OR UPDATE OF name, capacity, state, spec ON backends
    FOR EACH STATEMENT EXECUTE FUNCTION protobalance_backend_changed();
"#;

/// Version 4: `moves` and `move_copies`, the mailbox moves in progress (the run holding
/// each and its last heartbeat) and the messages each copied. One row per mailbox makes a
/// move exclusive across nodes; a move whose node stopped is taken over by another run,
/// which knows from `move_copies` what not to copy again.
const V4: &str = r#"
CREATE TABLE moves (
    mailbox      text COLLATE "C" PRIMARY KEY,
    from_backend text NOT NULL,
    to_backend   text NOT NULL,
    holder       text NOT NULL,
    started_ms   bigint NOT NULL,
    expires_ms   bigint NOT NULL
);
CREATE TABLE move_copies (
    mailbox  text COLLATE "C" NOT NULL REFERENCES moves (mailbox) ON DELETE CASCADE,
    folder   text NOT NULL,
    validity bigint NOT NULL,
    old_uid  bigint NOT NULL,
    new_uid  bigint,
    flags    text NOT NULL,
    PRIMARY KEY (mailbox, folder, old_uid)
);
"#;

/// `(version, what it adds, SQL)`, oldest first. Append only: a released migration never
/// changes, a new layout is a new entry.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "mailbox directory, blocklist, suspensions, change notifications",
        V1,
    ),
    (2, "blocklist change notifications, shared bans", V2),
    (3, "backend change notifications", V3),
    (4, "mailbox moves in progress", V4),
];

/// The newest layout this binary knows.
pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Creates or upgrades the schema in one transaction; returns the migrations applied.
pub(super) async fn prepare(client: &mut Client) -> Result<Vec<i32>, DirectoryError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    // "relation already exists, skipping" on every start is not news.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS protobalance_schema (
             version     integer PRIMARY KEY,
             description text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg_err)?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM protobalance_schema",
            &[],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    if current > LATEST {
        return Err(DirectoryError::Store(format!(
            "the PostgreSQL directory has schema version {current}, newer than this \
             protobalance knows ({LATEST}): upgrade protobalance on this node"
        )));
    }
    let mut applied = Vec::new();
    for &(version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await.map_err(|e| {
            DirectoryError::Store(format!(
                "PostgreSQL directory migration {version} ({description}): {}",
                pg_text(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO protobalance_schema (version, description) VALUES ($1, $2)",
            &[&version, &description],
        )
        .await
        .map_err(pg_err)?;
        applied.push(version);
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(applied)
}
