//! The embedded directory store: one SQLite file (rusqlite, bundled SQLite).
//!
//! `synchronous = FULL` with WAL: an assignment that was acknowledged survives a power cut
//! (losing one could send a mailbox's next delivery to another backend and split it).
//! Queries run on tokio's blocking pool; the connection sits behind a mutex, which is fine
//! because lookups are served from the in-process cache and take microseconds otherwise.
//!
//! `schema` owns the file layout and its migrations; `manage` the listing, deleting and
//! moving that the management API drives.

use std::{
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use super::{
    BackendRecord, BackendState, BlockRecord, DirectoryError, DomainPolicy, DomainRecord, Mailbox,
    MailboxDirectory, MailboxFilter, MoveCopy, MoveRecord, SuspensionRecord,
};

mod manage;
mod schema;

#[derive(Clone)]
pub struct SqliteDirectory {
    conn: Arc<Mutex<Connection>>,
}

fn block_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BlockRecord> {
    Ok(BlockRecord {
        list: r.get(0)?,
        cidr: r.get(1)?,
        reason: r.get(2)?,
        expires_at: r.get(3)?,
    })
}

fn store_err(e: impl std::fmt::Display) -> DirectoryError {
    DirectoryError::Store(e.to_string())
}

impl SqliteDirectory {
    /// Opens (creating if needed) the directory at `path`; `:memory:` for tests.
    pub fn open(path: &Path) -> Result<Self, DirectoryError> {
        let mut conn = Connection::open(path)
            .map_err(|e| DirectoryError::Store(format!("{}: {e}", path.display())))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(store_err)?;
        schema::prepare(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, DirectoryError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DirectoryError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&mut this.lock()))
            .await
            .map_err(|e| DirectoryError::Store(format!("directory task failed: {e}")))?
    }

    /// The blocking form of [`MailboxDirectory::owner_of`], for CLIs and benchmarks.
    pub fn owner_of_blocking(
        conn: &Connection,
        address: &str,
    ) -> Result<Option<String>, DirectoryError> {
        conn.prepare_cached(
            "SELECT b.name FROM mailboxes m JOIN backends b ON b.id = m.backend_id WHERE m.address = ?1",
        )
        .and_then(|mut stmt| stmt.query_row([address], |row| row.get(0)).optional())
        .map_err(store_err)
    }

    /// The active backend with capacity that has the lowest mailboxes/capacity (ties: name).
    fn candidate_blocking(conn: &Connection) -> Result<(i64, String), DirectoryError> {
        conn.query_row(
            "SELECT id, name FROM backends WHERE state = 'active' AND capacity > 0
             ORDER BY CAST(mailboxes AS REAL) / capacity, name LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(store_err)?
        .ok_or(DirectoryError::NoActiveBackend)
    }

    /// The owner of `address` after assigning it — to `to`, or to the candidate — when it
    /// has none. One IMMEDIATE transaction: concurrent callers agree on one owner.
    fn assign_blocking(
        conn: &mut Connection,
        address: &str,
        to: Option<&str>,
    ) -> Result<String, DirectoryError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(store_err)?;
        if let Some(owner) = Self::owner_of_blocking(&tx, address)? {
            return Ok(owner);
        }
        let (id, name) = match to {
            None => Self::candidate_blocking(&tx)?,
            Some(name) => Self::backend_by_name(&tx, name)?,
        };
        tx.execute(
            "INSERT INTO mailboxes (address, backend_id) VALUES (?1, ?2)",
            params![address, id],
        )
        .map_err(store_err)?;
        tx.execute(
            "UPDATE backends SET mailboxes = mailboxes + 1 WHERE id = ?1",
            [id],
        )
        .map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(name)
    }

    /// The id and name of backend `name`; `UnknownBackend` when there is none.
    fn backend_by_name(conn: &Connection, name: &str) -> Result<(i64, String), DirectoryError> {
        conn.query_row(
            "SELECT id, name FROM backends WHERE name = ?1",
            [name],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(store_err)?
        .ok_or_else(|| DirectoryError::UnknownBackend(name.to_owned()))
    }

    fn backends_blocking(conn: &Connection) -> Result<Vec<BackendRecord>, DirectoryError> {
        let mut stmt = conn
            .prepare_cached("SELECT name, capacity, state, mailboxes FROM backends ORDER BY name")
            .map_err(store_err)?;
        let rows = stmt
            .query_map([], |row| {
                let state: String = row.get(2)?;
                Ok(BackendRecord {
                    name: row.get(0)?,
                    capacity: row.get(1)?,
                    state: BackendState::parse(&state).unwrap_or(BackendState::Down),
                    mailboxes: row.get::<_, i64>(3)?.max(0).unsigned_abs(),
                })
            })
            .map_err(store_err)?;
        rows.collect::<Result<_, _>>().map_err(store_err)
    }
}

fn move_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MoveRecord> {
    Ok(MoveRecord {
        mailbox: r.get(0)?,
        from: r.get(1)?,
        to: r.get(2)?,
        holder: r.get(3)?,
        started_ms: r.get(4)?,
        expires_ms: r.get(5)?,
    })
}

const MOVE_COLUMNS: &str = "mailbox, from_backend, to_backend, holder, started_ms, expires_ms";

impl MailboxDirectory for SqliteDirectory {
    async fn begin_move(&self, record: &MoveRecord) -> Result<bool, DirectoryError> {
        let record = record.clone();
        self.blocking(move |conn| {
            conn.execute(
                &format!(
                    "INSERT INTO moves ({MOVE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (mailbox) DO NOTHING"
                ),
                params![
                    record.mailbox,
                    record.from,
                    record.to,
                    record.holder,
                    record.started_ms,
                    record.expires_ms
                ],
            )
            .map(|n| n > 0)
            .map_err(store_err)
        })
        .await
    }

    async fn take_over_move(
        &self,
        mailbox: &Mailbox,
        holder: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Option<MoveRecord>, DirectoryError> {
        let (mailbox, holder) = (mailbox.as_str().to_owned(), holder.to_owned());
        self.blocking(move |conn| {
            conn.query_row(
                &format!(
                    "UPDATE moves SET holder = ?2, expires_ms = ?4 \
                     WHERE mailbox = ?1 AND expires_ms < ?3 RETURNING {MOVE_COLUMNS}"
                ),
                params![mailbox, holder, now_ms, expires_ms],
                move_row,
            )
            .optional()
            .map_err(store_err)
        })
        .await
    }

    async fn move_progress(
        &self,
        mailbox: &Mailbox,
        holder: &str,
        expires_ms: i64,
        forget: Option<&str>,
        copies: &[MoveCopy],
    ) -> Result<bool, DirectoryError> {
        let (mailbox, holder) = (mailbox.as_str().to_owned(), holder.to_owned());
        let (forget, copies) = (forget.map(str::to_owned), copies.to_vec());
        self.blocking(move |conn| {
            let tx = conn.transaction().map_err(store_err)?;
            let ours = tx
                .execute(
                    "UPDATE moves SET expires_ms = ?3 WHERE mailbox = ?1 AND holder = ?2",
                    params![mailbox, holder, expires_ms],
                )
                .map_err(store_err)?
                > 0;
            if !ours {
                return Ok(false);
            }
            if let Some(folder) = forget {
                tx.execute(
                    "DELETE FROM move_copies WHERE mailbox = ?1 AND folder = ?2",
                    params![mailbox, folder],
                )
                .map_err(store_err)?;
            }
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO move_copies \
                         (mailbox, folder, validity, old_uid, new_uid, flags) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(store_err)?;
                for c in &copies {
                    insert
                        .execute(params![
                            mailbox, c.folder, c.validity, c.old_uid, c.new_uid, c.flags
                        ])
                        .map_err(store_err)?;
                }
            }
            tx.commit().map_err(store_err)?;
            Ok(true)
        })
        .await
    }

    async fn end_move(&self, mailbox: &Mailbox, holder: &str) -> Result<(), DirectoryError> {
        let (mailbox, holder) = (mailbox.as_str().to_owned(), holder.to_owned());
        self.blocking(move |conn| {
            conn.execute(
                "DELETE FROM moves WHERE mailbox = ?1 AND holder = ?2",
                params![mailbox, holder],
            )
            .map(drop)
            .map_err(store_err)
        })
        .await
    }

    async fn moves(&self) -> Result<Vec<MoveRecord>, DirectoryError> {
        self.blocking(|conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {MOVE_COLUMNS} FROM moves ORDER BY started_ms"
                ))
                .map_err(store_err)?;
            stmt.query_map([], move_row)
                .and_then(Iterator::collect)
                .map_err(store_err)
        })
        .await
    }

    async fn move_copies(&self, mailbox: &Mailbox) -> Result<Vec<MoveCopy>, DirectoryError> {
        let mailbox = mailbox.as_str().to_owned();
        self.blocking(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT folder, validity, old_uid, new_uid, flags FROM move_copies \
                     WHERE mailbox = ?1 ORDER BY folder, old_uid",
                )
                .map_err(store_err)?;
            stmt.query_map([mailbox], |r| {
                Ok(MoveCopy {
                    folder: r.get(0)?,
                    validity: r.get(1)?,
                    old_uid: r.get(2)?,
                    new_uid: r.get(3)?,
                    flags: r.get(4)?,
                })
            })
            .and_then(Iterator::collect)
            .map_err(store_err)
        })
        .await
    }

    async fn owner_of(&self, mailbox: &Mailbox) -> Result<Option<String>, DirectoryError> {
        let address = mailbox.as_str().to_owned();
        self.blocking(move |conn| Self::owner_of_blocking(conn, &address))
            .await
    }

    async fn assign(&self, mailbox: &Mailbox) -> Result<String, DirectoryError> {
        let address = mailbox.as_str().to_owned();
        self.blocking(move |conn| Self::assign_blocking(conn, &address, None))
            .await
    }

    async fn candidate(&self) -> Result<String, DirectoryError> {
        self.blocking(|conn| Self::candidate_blocking(conn).map(|(_, name)| name))
            .await
    }

    async fn assign_to(&self, mailbox: &Mailbox, backend: &str) -> Result<String, DirectoryError> {
        let (address, backend) = (mailbox.as_str().to_owned(), backend.to_owned());
        self.blocking(move |conn| Self::assign_blocking(conn, &address, Some(&backend)))
            .await
    }

    async fn domain_policy(&self, domain: &str) -> Result<Option<DomainPolicy>, DirectoryError> {
        let domain = domain.to_owned();
        self.blocking(move |conn| {
            let policy: Option<String> = conn
                .prepare_cached("SELECT policy FROM domains WHERE name = ?1")
                .and_then(|mut stmt| stmt.query_row([domain], |row| row.get(0)).optional())
                .map_err(store_err)?;
            Ok(policy.and_then(|p| DomainPolicy::parse(&p)))
        })
        .await
    }

    async fn upsert_backend(&self, name: &str, capacity: u32) -> Result<(), DirectoryError> {
        let name = name.to_owned();
        self.blocking(move |conn| {
            conn.execute(
                "INSERT INTO backends (name, capacity) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET capacity = excluded.capacity",
                params![name, capacity],
            )
            .map(drop)
            .map_err(store_err)
        })
        .await
    }

    async fn set_backend_state(
        &self,
        name: &str,
        state: BackendState,
    ) -> Result<(), DirectoryError> {
        let name = name.to_owned();
        self.blocking(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE backends SET state = ?2 WHERE name = ?1",
                    params![name, state.as_str()],
                )
                .map_err(store_err)?;
            if changed == 0 {
                return Err(DirectoryError::UnknownBackend(name));
            }
            Ok(())
        })
        .await
    }

    async fn upsert_domain(
        &self,
        domain: &str,
        policy: DomainPolicy,
    ) -> Result<(), DirectoryError> {
        let domain = domain.to_owned();
        self.blocking(move |conn| {
            conn.execute(
                "INSERT INTO domains (name, policy) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET policy = excluded.policy",
                params![domain, policy.as_str()],
            )
            .map(drop)
            .map_err(store_err)
        })
        .await
    }

    async fn backends(&self) -> Result<Vec<BackendRecord>, DirectoryError> {
        self.blocking(|conn| Self::backends_blocking(conn)).await
    }

    async fn list_mailboxes(
        &self,
        filter: &MailboxFilter,
        after: Option<&Mailbox>,
        limit: usize,
    ) -> Result<Vec<(Mailbox, String)>, DirectoryError> {
        let filter = filter.clone();
        // Every address sorts after "" (none is empty).
        let after = after.map_or_else(String::new, |m| m.as_str().to_owned());
        self.blocking(move |conn| Self::list_blocking(conn, &filter, &after, limit))
            .await
    }

    async fn delete_mailbox(&self, mailbox: &Mailbox) -> Result<bool, DirectoryError> {
        let address = mailbox.as_str().to_owned();
        self.blocking(move |conn| Self::delete_blocking(conn, &address))
            .await
    }

    async fn domains(&self) -> Result<Vec<DomainRecord>, DirectoryError> {
        self.blocking(|conn| Self::domains_blocking(conn)).await
    }

    async fn delete_domain(&self, domain: &str) -> Result<(), DirectoryError> {
        let domain = domain.to_owned();
        self.blocking(move |conn| Self::delete_domain_blocking(conn, &domain))
            .await
    }

    async fn remove_backend(&self, name: &str) -> Result<(), DirectoryError> {
        let name = name.to_owned();
        self.blocking(move |conn| Self::remove_backend_blocking(conn, &name))
            .await
    }

    async fn reassign(
        &self,
        mailbox: &Mailbox,
        backend: &str,
    ) -> Result<Option<String>, DirectoryError> {
        let (address, backend) = (mailbox.as_str().to_owned(), backend.to_owned());
        self.blocking(move |conn| Self::reassign_blocking(conn, &address, &backend))
            .await
    }

    async fn reassign_from(
        &self,
        mailbox: &Mailbox,
        from: &str,
        to: &str,
    ) -> Result<bool, DirectoryError> {
        let (address, from, to) = (mailbox.as_str().to_owned(), from.to_owned(), to.to_owned());
        self.blocking(move |conn| Self::reassign_from_blocking(conn, &address, &from, &to))
            .await
    }

    async fn add_backend(
        &self,
        name: &str,
        capacity: u32,
        spec: &str,
    ) -> Result<(), DirectoryError> {
        let (name, spec) = (name.to_owned(), spec.to_owned());
        self.blocking(move |conn| {
            let added = conn
                .execute(
                    "INSERT INTO backends (name, capacity, spec) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO NOTHING",
                    params![name, capacity, spec],
                )
                .map_err(store_err)?;
            if added == 0 {
                return Err(DirectoryError::BackendExists(name));
            }
            Ok(())
        })
        .await
    }

    async fn update_backend_spec(
        &self,
        name: &str,
        capacity: u32,
        spec: &str,
    ) -> Result<(), DirectoryError> {
        let (name, spec) = (name.to_owned(), spec.to_owned());
        self.blocking(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE backends SET capacity = ?2, spec = ?3 WHERE name = ?1",
                    params![name, capacity, spec],
                )
                .map_err(store_err)?;
            if changed == 0 {
                return Err(DirectoryError::UnknownBackend(name));
            }
            Ok(())
        })
        .await
    }

    async fn blocklist(&self) -> Result<Vec<BlockRecord>, DirectoryError> {
        self.blocking(|conn| {
            let mut stmt = conn
                .prepare("SELECT list, cidr, reason, expires_at FROM blocklist ORDER BY list, cidr")
                .map_err(store_err)?;
            let rows = stmt.query_map([], block_row).map_err(store_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(store_err)
        })
        .await
    }

    async fn put_block(&self, entry: &BlockRecord) -> Result<(), DirectoryError> {
        let entry = entry.clone();
        self.blocking(move |conn| {
            conn.execute(
                "INSERT INTO blocklist (list, cidr, reason, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (list, cidr) DO UPDATE SET reason = excluded.reason,
                 expires_at = excluded.expires_at",
                params![entry.list, entry.cidr, entry.reason, entry.expires_at],
            )
            .map(drop)
            .map_err(store_err)
        })
        .await
    }

    async fn suspensions(&self) -> Result<Vec<SuspensionRecord>, DirectoryError> {
        self.blocking(|conn| {
            let mut stmt = conn
                .prepare("SELECT account, reason, since, until FROM suspensions ORDER BY account")
                .map_err(store_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(SuspensionRecord {
                        account: r.get(0)?,
                        reason: r.get(1)?,
                        since: r.get(2)?,
                        until: r.get(3)?,
                    })
                })
                .map_err(store_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(store_err)
        })
        .await
    }

    async fn put_suspension(&self, record: &SuspensionRecord) -> Result<(), DirectoryError> {
        let record = record.clone();
        self.blocking(move |conn| {
            let tx = conn.transaction().map_err(store_err)?;
            tx.execute(
                "DELETE FROM suspensions WHERE until <= ?1",
                params![record.since],
            )
            .map_err(store_err)?;
            tx.execute(
                "INSERT INTO suspensions (account, reason, since, until) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (account) DO UPDATE SET reason = excluded.reason,
                 since = excluded.since, until = excluded.until",
                params![record.account, record.reason, record.since, record.until],
            )
            .map_err(store_err)?;
            tx.commit().map_err(store_err)
        })
        .await
    }

    async fn remove_suspension(&self, account: &str) -> Result<bool, DirectoryError> {
        let account = account.to_owned();
        self.blocking(move |conn| {
            conn.execute(
                "DELETE FROM suspensions WHERE account = ?1",
                params![account],
            )
            .map(|n| n > 0)
            .map_err(store_err)
        })
        .await
    }

    async fn remove_block(&self, list: &str, cidr: &str) -> Result<bool, DirectoryError> {
        let (list, cidr) = (list.to_owned(), cidr.to_owned());
        self.blocking(move |conn| {
            conn.execute(
                "DELETE FROM blocklist WHERE list = ?1 AND cidr = ?2",
                params![list, cidr],
            )
            .map(|n| n > 0)
            .map_err(store_err)
        })
        .await
    }

    async fn replace_block_list(
        &self,
        list: &str,
        entries: &[BlockRecord],
    ) -> Result<(), DirectoryError> {
        let (list, entries) = (list.to_owned(), entries.to_vec());
        self.blocking(move |conn| {
            let tx = conn.transaction().map_err(store_err)?;
            tx.execute("DELETE FROM blocklist WHERE list = ?1", params![list])
                .map_err(store_err)?;
            {
                let mut insert = tx
                    .prepare(
                        "INSERT OR REPLACE INTO blocklist (list, cidr, reason, expires_at)
                         VALUES (?1, ?2, ?3, ?4)",
                    )
                    .map_err(store_err)?;
                for e in &entries {
                    insert
                        .execute(params![list, e.cidr, e.reason, e.expires_at])
                        .map_err(store_err)?;
                }
            }
            tx.commit().map_err(store_err)
        })
        .await
    }

    async fn remove_expired_blocks(&self, now: i64) -> Result<Vec<BlockRecord>, DirectoryError> {
        self.blocking(move |conn| {
            let tx = conn.transaction().map_err(store_err)?;
            let expired = {
                let mut stmt = tx
                    .prepare(
                        "SELECT list, cidr, reason, expires_at FROM blocklist
                         WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                    )
                    .map_err(store_err)?;
                let rows = stmt.query_map(params![now], block_row).map_err(store_err)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(store_err)?
            };
            tx.execute(
                "DELETE FROM blocklist WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                params![now],
            )
            .map_err(store_err)?;
            tx.commit().map_err(store_err)?;
            Ok(expired)
        })
        .await
    }

    async fn backend_specs(&self) -> Result<Vec<(String, String)>, DirectoryError> {
        self.blocking(|conn| {
            let mut stmt = conn
                .prepare("SELECT name, spec FROM backends WHERE spec IS NOT NULL ORDER BY name")
                .map_err(store_err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(store_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(store_err)
        })
        .await
    }

    async fn mailbox_count(&self) -> Result<u64, DirectoryError> {
        self.blocking(|conn| Self::mailbox_count_blocking(conn))
            .await
    }

    async fn import_entries(
        &self,
        entries: Vec<super::import::ImportEntry>,
    ) -> Result<Vec<super::import::EntryResult>, DirectoryError> {
        super::import::import_entries(self, entries).await
    }
}
