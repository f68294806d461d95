//! The shared directory store of a multi-node edge: one PostgreSQL database that every node
//! reads and writes (tokio-postgres, pooled by deadpool).
//!
//! Same meaning as the SQLite store, write for write: every change that moves a counter is
//! one transaction that keeps `backends.mailboxes` equal to the rows pointing at the
//! backend; `assign` locks the chosen backend's row, so concurrent first deliveries on
//! different nodes agree on one owner. Every call has a deadline (`timeout_ms`): a database
//! that stops answering turns into temporary failures, never into a hung session.
//!
//! [`listen`] keeps a node's owner cache coherent: a trigger notifies
//! `protobalance_mailbox` with the address of every mailbox whose owner changes or that is
//! deleted, and the listening node drops that address from its cache. While the listening
//! connection is down the cache is served for at most `stale_cache_seconds`, then not at all
//! until the node listens again (and has dropped everything it might have missed).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
    tokio_postgres::{self, AsyncMessage, types::ToSql},
};

use super::{
    BackendRecord, BackendState, BlockRecord, Directory, DirectoryError, DomainPolicy,
    DomainRecord, Mailbox, MailboxDirectory, MailboxFilter, MoveCopy, MoveRecord, Store,
    SuspensionRecord,
    import::{self, BackendRow, EntryResult, ImportEntry},
};

pub mod schema;
pub mod tls;

/// How to reach the database (`[directory.postgres]`, checked).
#[derive(Clone, Debug)]
pub struct PostgresSettings {
    /// libpq connection string or `postgresql://` URL, as configured.
    pub url: String,
    /// Read at connect time; overrides a password in `url`.
    pub password_file: Option<PathBuf>,
    pub pool_size: usize,
    /// Deadline of every directory call (and of taking a pooled connection).
    pub timeout: Duration,
    /// How long cached owners are served while the change notifications cannot be heard.
    pub stale_cache: Duration,
    /// TLS, required and verified against these CA certificates; `None`: plaintext.
    pub ca_file: Option<PathBuf>,
}

impl PostgresSettings {
    /// The connection parameters, password file applied; errors name the key.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, DirectoryError> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| DirectoryError::Store(format!("directory.postgres.url: {e}")))?;
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                DirectoryError::Store(format!(
                    "directory.postgres.password_file {}: {e}",
                    path.display()
                ))
            })?;
            config.password(text.lines().next().unwrap_or_default());
        }
        if config.get_application_name().is_none() {
            config.application_name("protobalance");
        }
        config.connect_timeout(self.timeout);
        config.keepalives_idle(Duration::from_secs(10));
        if self.ca_file.is_some() {
            // Never a plaintext fallback once TLS is configured.
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        } else if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(DirectoryError::Store(
                "directory.postgres.url asks for sslmode=require: set directory.postgres.ca_file \
                 (the CA certificates the server's certificate chains to)"
                    .into(),
            ));
        } else {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        Ok(config)
    }

    /// The TLS connector for [`pg_config`](Self::pg_config).
    pub fn tls(&self) -> Result<tls::PgTls, DirectoryError> {
        match &self.ca_file {
            Some(path) => tls::PgTls::with_ca_file(path)
                .map_err(|e| DirectoryError::Store(format!("directory.postgres.ca_file {e}"))),
            None => Ok(tls::PgTls::off()),
        }
    }
}

#[derive(Clone)]
pub struct PostgresDirectory {
    pool: Pool,
    settings: PostgresSettings,
}

/// A PostgreSQL error with its SQLSTATE and the server's message (the plain `Display` of a
/// server error is just "db error").
pub(super) fn pg_err(e: tokio_postgres::Error) -> DirectoryError {
    DirectoryError::Store(pg_text(&e))
}

/// The text of [`pg_err`].
pub(super) fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("PostgreSQL {}: {}", db.code().code(), db.message()),
        None => {
            let mut text = format!("PostgreSQL: {e}");
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                text.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            text
        }
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> DirectoryError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => DirectoryError::Store(format!("PostgreSQL pool: {other}")),
    }
}

fn count(n: i64) -> u64 {
    n.max(0).unsigned_abs()
}

const OWNER: &str = "SELECT b.name FROM mailboxes m JOIN backends b ON b.id = m.backend_id \
                     WHERE m.address = $1";

const CANDIDATE: &str = "SELECT id, name FROM backends WHERE state = 'active' AND capacity > 0 \
                         ORDER BY mailboxes::float8 / capacity, name LIMIT 1";

impl PostgresDirectory {
    /// Connects, brings the schema up to date and returns the store. Fails (naming the
    /// problem) when the database cannot be reached: a node must not start without its
    /// directory.
    pub async fn connect(settings: &PostgresSettings) -> Result<Self, DirectoryError> {
        let manager = Manager::from_config(
            settings.pg_config()?,
            settings.tls()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .build()
            .map_err(|e| DirectoryError::Store(format!("PostgreSQL pool: {e}")))?;
        let this = Self {
            pool,
            settings: settings.clone(),
        };
        let mut client = this.client().await?;
        let applied = this.timed(schema::prepare(&mut client)).await?;
        if !applied.is_empty() {
            tracing::info!(migrations = ?applied, version = schema::LATEST, "PostgreSQL directory schema migrated");
        }
        Ok(this)
    }

    pub fn settings(&self) -> &PostgresSettings {
        &self.settings
    }

    async fn client(&self) -> Result<Object, DirectoryError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Runs `f` under the configured deadline.
    async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, DirectoryError>>,
    ) -> Result<T, DirectoryError> {
        tokio::time::timeout(self.settings.timeout, f)
            .await
            .unwrap_or_else(|_| {
                Err(DirectoryError::Store(format!(
                    "PostgreSQL did not answer within {} ms",
                    self.settings.timeout.as_millis()
                )))
            })
    }

    /// One statement's rows.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, DirectoryError> {
        self.timed(async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(sql).await.map_err(pg_err)?;
            client.query(&stmt, params).await.map_err(pg_err)
        })
        .await
    }

    /// One statement's changed-row count.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, DirectoryError> {
        self.timed(async {
            let client = self.client().await?;
            let stmt = client.prepare_cached(sql).await.map_err(pg_err)?;
            client.execute(&stmt, params).await.map_err(pg_err)
        })
        .await
    }

    async fn assign_to_inner(
        &self,
        address: &str,
        to: Option<&str>,
    ) -> Result<String, DirectoryError> {
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            if let Some(row) = tx.query_opt(OWNER, &[&address]).await.map_err(pg_err)? {
                return Ok(row.get(0));
            }
            // The chosen backend's row stays locked until commit: its counter is written
            // below, and a concurrent assignment to it waits instead of double counting.
            let chosen = match to {
                None => tx
                    .query_opt(&format!("{CANDIDATE} FOR UPDATE"), &[])
                    .await
                    .map_err(pg_err)?
                    .ok_or(DirectoryError::NoActiveBackend)?,
                Some(name) => tx
                    .query_opt(
                        "SELECT id, name FROM backends WHERE name = $1 FOR UPDATE",
                        &[&name],
                    )
                    .await
                    .map_err(pg_err)?
                    .ok_or_else(|| DirectoryError::UnknownBackend(name.to_owned()))?,
            };
            let (id, name): (i64, String) = (chosen.get(0), chosen.get(1));
            let inserted = tx
                .execute(
                    "INSERT INTO mailboxes (address, backend_id) VALUES ($1, $2) \
                     ON CONFLICT (address) DO NOTHING",
                    &[&address, &id],
                )
                .await
                .map_err(pg_err)?;
            if inserted == 0 {
                // Another node assigned it since our first look (the insert waited for
                // its commit): its choice stands.
                let owner: String = tx
                    .query_one(OWNER, &[&address])
                    .await
                    .map_err(pg_err)?
                    .get(0);
                tx.commit().await.map_err(pg_err)?;
                return Ok(owner);
            }
            tx.execute(
                "UPDATE backends SET mailboxes = mailboxes + 1 WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(name)
        })
        .await
    }
}

const MOVE_COLUMNS: &str = "mailbox, from_backend, to_backend, holder, started_ms, expires_ms";

fn move_row(r: &tokio_postgres::Row) -> MoveRecord {
    MoveRecord {
        mailbox: r.get(0),
        from: r.get(1),
        to: r.get(2),
        holder: r.get(3),
        started_ms: r.get(4),
        expires_ms: r.get(5),
    }
}

impl MailboxDirectory for PostgresDirectory {
    async fn begin_move(&self, record: &MoveRecord) -> Result<bool, DirectoryError> {
        self.execute(
            &format!(
                "INSERT INTO moves ({MOVE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (mailbox) DO NOTHING"
            ),
            &[
                &record.mailbox,
                &record.from,
                &record.to,
                &record.holder,
                &record.started_ms,
                &record.expires_ms,
            ],
        )
        .await
        .map(|n| n > 0)
    }

    async fn take_over_move(
        &self,
        mailbox: &Mailbox,
        holder: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Option<MoveRecord>, DirectoryError> {
        let rows = self
            .rows(
                &format!(
                    "UPDATE moves SET holder = $2, expires_ms = $4 \
                     WHERE mailbox = $1 AND expires_ms < $3 RETURNING {MOVE_COLUMNS}"
                ),
                &[&mailbox.as_str(), &holder, &now_ms, &expires_ms],
            )
            .await?;
        Ok(rows.first().map(move_row))
    }

    async fn move_progress(
        &self,
        mailbox: &Mailbox,
        holder: &str,
        expires_ms: i64,
        forget: Option<&str>,
        copies: &[MoveCopy],
    ) -> Result<bool, DirectoryError> {
        let address = mailbox.as_str();
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let ours = tx
                .execute(
                    "UPDATE moves SET expires_ms = $3 WHERE mailbox = $1 AND holder = $2",
                    &[&address, &holder, &expires_ms],
                )
                .await
                .map_err(pg_err)?
                > 0;
            if !ours {
                return Ok(false);
            }
            if let Some(folder) = forget {
                tx.execute(
                    "DELETE FROM move_copies WHERE mailbox = $1 AND folder = $2",
                    &[&address, &folder],
                )
                .await
                .map_err(pg_err)?;
            }
            if !copies.is_empty() {
                // One statement per batch: the copies as parallel arrays.
                let folders: Vec<&str> = copies.iter().map(|c| c.folder.as_str()).collect();
                let validity: Vec<i64> = copies.iter().map(|c| i64::from(c.validity)).collect();
                let old: Vec<i64> = copies.iter().map(|c| i64::from(c.old_uid)).collect();
                let new: Vec<Option<i64>> =
                    copies.iter().map(|c| c.new_uid.map(i64::from)).collect();
                let flags: Vec<&str> = copies.iter().map(|c| c.flags.as_str()).collect();
                tx.execute(
                    "INSERT INTO move_copies (mailbox, folder, validity, old_uid, new_uid, flags) \
                     SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::bigint[], \
                     $5::bigint[], $6::text[]) \
                     ON CONFLICT (mailbox, folder, old_uid) DO UPDATE SET \
                     validity = excluded.validity, new_uid = excluded.new_uid, \
                     flags = excluded.flags",
                    &[&address, &folders, &validity, &old, &new, &flags],
                )
                .await
                .map_err(pg_err)?;
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(true)
        })
        .await
    }

    async fn end_move(&self, mailbox: &Mailbox, holder: &str) -> Result<(), DirectoryError> {
        self.execute(
            "DELETE FROM moves WHERE mailbox = $1 AND holder = $2",
            &[&mailbox.as_str(), &holder],
        )
        .await
        .map(drop)
    }

    async fn moves(&self) -> Result<Vec<MoveRecord>, DirectoryError> {
        let rows = self
            .rows(
                &format!("SELECT {MOVE_COLUMNS} FROM moves ORDER BY started_ms"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(move_row).collect())
    }

    async fn move_copies(&self, mailbox: &Mailbox) -> Result<Vec<MoveCopy>, DirectoryError> {
        let rows = self
            .rows(
                "SELECT folder, validity, old_uid, new_uid, flags FROM move_copies \
                 WHERE mailbox = $1 ORDER BY folder, old_uid",
                &[&mailbox.as_str()],
            )
            .await?;
        // Stored from u32s: the conversions cannot fail on rows this code wrote.
        let uid = |v: i64| u32::try_from(v).unwrap_or(0);
        Ok(rows
            .iter()
            .map(|r| MoveCopy {
                folder: r.get(0),
                validity: uid(r.get(1)),
                old_uid: uid(r.get(2)),
                new_uid: r.get::<_, Option<i64>>(3).map(uid),
                flags: r.get(4),
            })
            .collect())
    }

    async fn owner_of(&self, mailbox: &Mailbox) -> Result<Option<String>, DirectoryError> {
        let rows = self.rows(OWNER, &[&mailbox.as_str()]).await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn assign(&self, mailbox: &Mailbox) -> Result<String, DirectoryError> {
        self.assign_to_inner(mailbox.as_str(), None).await
    }

    async fn candidate(&self) -> Result<String, DirectoryError> {
        let rows = self.rows(CANDIDATE, &[]).await?;
        rows.first()
            .map(|r| r.get(1))
            .ok_or(DirectoryError::NoActiveBackend)
    }

    async fn assign_to(&self, mailbox: &Mailbox, backend: &str) -> Result<String, DirectoryError> {
        self.assign_to_inner(mailbox.as_str(), Some(backend)).await
    }

    async fn domain_policy(&self, domain: &str) -> Result<Option<DomainPolicy>, DirectoryError> {
        let rows = self
            .rows("SELECT policy FROM domains WHERE name = $1", &[&domain])
            .await?;
        Ok(rows
            .first()
            .and_then(|r| DomainPolicy::parse(r.get::<_, &str>(0))))
    }

    async fn upsert_backend(&self, name: &str, capacity: u32) -> Result<(), DirectoryError> {
        self.execute(
            "INSERT INTO backends (name, capacity) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET capacity = excluded.capacity",
            &[&name, &i64::from(capacity)],
        )
        .await
        .map(drop)
    }

    async fn set_backend_state(
        &self,
        name: &str,
        state: BackendState,
    ) -> Result<(), DirectoryError> {
        let changed = self
            .execute(
                "UPDATE backends SET state = $2 WHERE name = $1",
                &[&name, &state.as_str()],
            )
            .await?;
        if changed == 0 {
            return Err(DirectoryError::UnknownBackend(name.to_owned()));
        }
        Ok(())
    }

    async fn upsert_domain(
        &self,
        domain: &str,
        policy: DomainPolicy,
    ) -> Result<(), DirectoryError> {
        self.execute(
            "INSERT INTO domains (name, policy) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET policy = excluded.policy",
            &[&domain, &policy.as_str()],
        )
        .await
        .map(drop)
    }

    async fn backends(&self) -> Result<Vec<BackendRecord>, DirectoryError> {
        let rows = self
            .rows(
                "SELECT name, capacity, state, mailboxes FROM backends ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| BackendRecord {
                name: r.get(0),
                capacity: u32::try_from(r.get::<_, i64>(1)).unwrap_or(u32::MAX),
                state: BackendState::parse(r.get(2)).unwrap_or(BackendState::Down),
                mailboxes: count(r.get(3)),
            })
            .collect())
    }

    async fn list_mailboxes(
        &self,
        filter: &MailboxFilter,
        after: Option<&Mailbox>,
        limit: usize,
    ) -> Result<Vec<(Mailbox, String)>, DirectoryError> {
        let after = after.map_or("", |m| m.as_str());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let backend_id: Option<i64> = match &filter.backend {
            None => None,
            Some(name) => Some(
                self.rows("SELECT id FROM backends WHERE name = $1", &[name])
                    .await?
                    .first()
                    .map(|r| r.get(0))
                    .ok_or_else(|| DirectoryError::UnknownBackend(name.clone()))?,
            ),
        };
        // Conditions only for the filters set, so the planner picks the matching index.
        let mut sql = String::from(
            "SELECT m.address, b.name FROM mailboxes m JOIN backends b ON b.id = m.backend_id \
             WHERE m.address > $1",
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after, &limit];
        if let Some(domain) = &filter.domain {
            params.push(domain);
            sql.push_str(&format!(" AND m.domain = ${}", params.len()));
        }
        if let Some(id) = &backend_id {
            params.push(id);
            sql.push_str(&format!(" AND m.backend_id = ${}", params.len()));
        }
        sql.push_str(" ORDER BY m.address LIMIT $2");
        let rows = self.rows(&sql, &params).await?;
        Ok(rows
            .iter()
            .map(|r| (Mailbox::from_store(r.get(0)), r.get(1)))
            .collect())
    }

    async fn delete_mailbox(&self, mailbox: &Mailbox) -> Result<bool, DirectoryError> {
        // One statement: the CTE's delete and the counter update commit together.
        let changed = self
            .execute(
                "WITH gone AS (DELETE FROM mailboxes WHERE address = $1 RETURNING backend_id) \
                 UPDATE backends SET mailboxes = mailboxes - 1 \
                 WHERE id = (SELECT backend_id FROM gone)",
                &[&mailbox.as_str()],
            )
            .await?;
        Ok(changed > 0)
    }

    async fn domains(&self) -> Result<Vec<DomainRecord>, DirectoryError> {
        let rows = self
            .rows(
                "SELECT d.name, d.policy, \
                        (SELECT count(*) FROM mailboxes m WHERE m.domain = d.name) \
                 FROM domains d ORDER BY d.name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| DomainRecord {
                name: r.get(0),
                policy: DomainPolicy::parse(r.get(1)).unwrap_or(DomainPolicy::Reject),
                mailboxes: count(r.get(2)),
            })
            .collect())
    }

    async fn delete_domain(&self, domain: &str) -> Result<(), DirectoryError> {
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let known = tx
                .query_opt(
                    "SELECT 1 FROM domains WHERE name = $1 FOR UPDATE",
                    &[&domain],
                )
                .await
                .map_err(pg_err)?;
            if known.is_none() {
                return Err(DirectoryError::UnknownDomain(domain.to_owned()));
            }
            let mailboxes: i64 = tx
                .query_one(
                    "SELECT count(*) FROM mailboxes WHERE domain = $1",
                    &[&domain],
                )
                .await
                .map_err(pg_err)?
                .get(0);
            if mailboxes > 0 {
                return Err(DirectoryError::DomainInUse {
                    domain: domain.to_owned(),
                    mailboxes: count(mailboxes),
                });
            }
            tx.execute("DELETE FROM domains WHERE name = $1", &[&domain])
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)
        })
        .await
    }

    async fn remove_backend(&self, name: &str) -> Result<(), DirectoryError> {
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let id: i64 = tx
                .query_opt(
                    "SELECT id FROM backends WHERE name = $1 FOR UPDATE",
                    &[&name],
                )
                .await
                .map_err(pg_err)?
                .ok_or_else(|| DirectoryError::UnknownBackend(name.to_owned()))?
                .get(0);
            let mailboxes: i64 = tx
                .query_one(
                    "SELECT count(*) FROM mailboxes WHERE backend_id = $1",
                    &[&id],
                )
                .await
                .map_err(pg_err)?
                .get(0);
            if mailboxes > 0 {
                return Err(DirectoryError::BackendInUse {
                    backend: name.to_owned(),
                    mailboxes: count(mailboxes),
                });
            }
            tx.execute("DELETE FROM backends WHERE id = $1", &[&id])
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)
        })
        .await
    }

    async fn reassign(
        &self,
        mailbox: &Mailbox,
        backend: &str,
    ) -> Result<Option<String>, DirectoryError> {
        let address = mailbox.as_str();
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let to: i64 = tx
                .query_opt("SELECT id FROM backends WHERE name = $1", &[&backend])
                .await
                .map_err(pg_err)?
                .ok_or_else(|| DirectoryError::UnknownBackend(backend.to_owned()))?
                .get(0);
            let Some(current) = tx
                .query_opt(
                    "SELECT m.backend_id, b.name FROM mailboxes m \
                     JOIN backends b ON b.id = m.backend_id \
                     WHERE m.address = $1 FOR UPDATE OF m",
                    &[&address],
                )
                .await
                .map_err(pg_err)?
            else {
                return Ok(None);
            };
            let (from, previous): (i64, String) = (current.get(0), current.get(1));
            if from != to {
                tx.execute(
                    "UPDATE mailboxes SET backend_id = $2 WHERE address = $1",
                    &[&address, &to],
                )
                .await
                .map_err(pg_err)?;
                // Both counters in one statement: rows are locked in one order, no deadlock
                // with a concurrent move the other way.
                tx.execute(
                    "UPDATE backends SET mailboxes = mailboxes + \
                     CASE WHEN id = $2 THEN 1 ELSE -1 END WHERE id IN ($1, $2)",
                    &[&from, &to],
                )
                .await
                .map_err(pg_err)?;
                tx.commit().await.map_err(pg_err)?;
            }
            Ok(Some(previous))
        })
        .await
    }

    async fn reassign_from(
        &self,
        mailbox: &Mailbox,
        from: &str,
        to: &str,
    ) -> Result<bool, DirectoryError> {
        let address = mailbox.as_str();
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let ids = tx
                .query(
                    "SELECT name, id FROM backends WHERE name = $1 OR name = $2",
                    &[&from, &to],
                )
                .await
                .map_err(pg_err)?;
            let find = |name: &str| {
                ids.iter()
                    .find(|r| r.get::<_, &str>(0) == name)
                    .map(|r| r.get::<_, i64>(1))
                    .ok_or_else(|| DirectoryError::UnknownBackend(name.to_owned()))
            };
            let (from_id, to_id) = (find(from)?, find(to)?);
            let changed = tx
                .execute(
                    "UPDATE mailboxes SET backend_id = $3 WHERE address = $1 AND backend_id = $2",
                    &[&address, &from_id, &to_id],
                )
                .await
                .map_err(pg_err)?;
            if changed == 0 || from_id == to_id {
                return Ok(changed > 0);
            }
            tx.execute(
                "UPDATE backends SET mailboxes = mailboxes + \
                 CASE WHEN id = $2 THEN 1 ELSE -1 END WHERE id IN ($1, $2)",
                &[&from_id, &to_id],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(true)
        })
        .await
    }

    async fn mailbox_count(&self) -> Result<u64, DirectoryError> {
        let rows = self
            .rows(
                "SELECT coalesce(sum(mailboxes), 0)::bigint FROM backends",
                &[],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| count(r.get(0))))
    }

    async fn add_backend(
        &self,
        name: &str,
        capacity: u32,
        spec: &str,
    ) -> Result<(), DirectoryError> {
        let added = self
            .execute(
                "INSERT INTO backends (name, capacity, spec) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &i64::from(capacity), &spec],
            )
            .await?;
        if added == 0 {
            return Err(DirectoryError::BackendExists(name.to_owned()));
        }
        Ok(())
    }

    async fn update_backend_spec(
        &self,
        name: &str,
        capacity: u32,
        spec: &str,
    ) -> Result<(), DirectoryError> {
        let changed = self
            .execute(
                "UPDATE backends SET capacity = $2, spec = $3 WHERE name = $1",
                &[&name, &i64::from(capacity), &spec],
            )
            .await?;
        if changed == 0 {
            return Err(DirectoryError::UnknownBackend(name.to_owned()));
        }
        Ok(())
    }

    async fn blocklist(&self) -> Result<Vec<BlockRecord>, DirectoryError> {
        let rows = self
            .rows(
                "SELECT list, cidr, reason, expires_at FROM blocklist ORDER BY list, cidr",
                &[],
            )
            .await?;
        Ok(rows.iter().map(block_row).collect())
    }

    async fn put_block(&self, entry: &BlockRecord) -> Result<(), DirectoryError> {
        self.execute(
            "INSERT INTO blocklist (list, cidr, reason, expires_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (list, cidr) DO UPDATE SET reason = excluded.reason, \
             expires_at = excluded.expires_at",
            &[&entry.list, &entry.cidr, &entry.reason, &entry.expires_at],
        )
        .await
        .map(drop)
    }

    async fn remove_block(&self, list: &str, cidr: &str) -> Result<bool, DirectoryError> {
        self.execute(
            "DELETE FROM blocklist WHERE list = $1 AND cidr = $2",
            &[&list, &cidr],
        )
        .await
        .map(|n| n > 0)
    }

    async fn replace_block_list(
        &self,
        list: &str,
        entries: &[BlockRecord],
    ) -> Result<(), DirectoryError> {
        let cidrs: Vec<&str> = entries.iter().map(|e| e.cidr.as_str()).collect();
        let reasons: Vec<&str> = entries.iter().map(|e| e.reason.as_str()).collect();
        let expiries: Vec<Option<i64>> = entries.iter().map(|e| e.expires_at).collect();
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            tx.execute("DELETE FROM blocklist WHERE list = $1", &[&list])
                .await
                .map_err(pg_err)?;
            // The last of duplicate CIDRs wins, as with row-by-row replacing inserts.
            tx.execute(
                "INSERT INTO blocklist (list, cidr, reason, expires_at) \
                 SELECT DISTINCT ON (cidr) $1, cidr, reason, expires_at \
                 FROM unnest($2::text[], $3::text[], $4::bigint[]) \
                      WITH ORDINALITY AS e(cidr, reason, expires_at, n) \
                 ORDER BY cidr, n DESC",
                &[&list, &cidrs, &reasons, &expiries],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)
        })
        .await
    }

    async fn remove_expired_blocks(&self, now: i64) -> Result<Vec<BlockRecord>, DirectoryError> {
        let rows = self
            .rows(
                "DELETE FROM blocklist WHERE expires_at IS NOT NULL AND expires_at <= $1 \
                 RETURNING list, cidr, reason, expires_at",
                &[&now],
            )
            .await?;
        Ok(rows.iter().map(block_row).collect())
    }

    async fn suspensions(&self) -> Result<Vec<SuspensionRecord>, DirectoryError> {
        let rows = self
            .rows(
                "SELECT account, reason, since, until FROM suspensions ORDER BY account",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| SuspensionRecord {
                account: r.get(0),
                reason: r.get(1),
                since: r.get(2),
                until: r.get(3),
            })
            .collect())
    }

    async fn put_suspension(&self, record: &SuspensionRecord) -> Result<(), DirectoryError> {
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            tx.execute(
                "DELETE FROM suspensions WHERE until <= $1",
                &[&record.since],
            )
            .await
            .map_err(pg_err)?;
            tx.execute(
                "INSERT INTO suspensions (account, reason, since, until) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (account) DO UPDATE SET reason = excluded.reason, \
                 since = excluded.since, until = excluded.until",
                &[
                    &record.account,
                    &record.reason,
                    &record.since,
                    &record.until,
                ],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)
        })
        .await
    }

    async fn remove_suspension(&self, account: &str) -> Result<bool, DirectoryError> {
        self.execute("DELETE FROM suspensions WHERE account = $1", &[&account])
            .await
            .map(|n| n > 0)
    }

    async fn backend_specs(&self) -> Result<Vec<(String, String)>, DirectoryError> {
        let rows = self
            .rows(
                "SELECT name, spec FROM backends WHERE spec IS NOT NULL ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn import_entries(
        &self,
        entries: Vec<ImportEntry>,
    ) -> Result<Vec<EntryResult>, DirectoryError> {
        let addresses: Vec<&str> = entries.iter().map(|e| e.mailbox.as_str()).collect();
        // A batch of thousands: allow it the deadline of a few calls.
        let deadline = self.settings.timeout * 8;
        let work = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            // Every backend row locked: single assignments on other nodes wait for this
            // batch, so the counters and the apportioning agree.
            let backends = tx
                .query(
                    "SELECT id, name, capacity, state, mailboxes FROM backends \
                     ORDER BY id FOR UPDATE",
                    &[],
                )
                .await
                .map_err(pg_err)?
                .iter()
                .map(|r| BackendRow {
                    id: r.get(0),
                    name: r.get(1),
                    capacity: r.get(2),
                    state: r.get(3),
                    mailboxes: r.get(4),
                })
                .collect();
            let existing: HashMap<String, i64> = tx
                .query(
                    "SELECT address, backend_id FROM mailboxes WHERE address = ANY($1)",
                    &[&addresses],
                )
                .await
                .map_err(pg_err)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let (heap, ids) = import::heap_of(backends);
            let mut planner = import::Planner::new(heap, ids);
            let mut new_addresses = Vec::new();
            let mut new_owners = Vec::new();
            let (results, added) = planner.plan(
                entries.clone(),
                |address| Ok(existing.get(address).copied()),
                |address, id| {
                    new_addresses.push(address.to_owned());
                    new_owners.push(id);
                    Ok(())
                },
            )?;
            tx.execute(
                "INSERT INTO mailboxes (address, backend_id) \
                 SELECT * FROM unnest($1::text[], $2::bigint[])",
                &[&new_addresses, &new_owners],
            )
            .await
            .map_err(pg_err)?;
            let (ids, counts): (Vec<i64>, Vec<i64>) = added
                .into_iter()
                .map(|(id, n)| (id, i64::try_from(n).unwrap_or(i64::MAX)))
                .unzip();
            tx.execute(
                "UPDATE backends b SET mailboxes = b.mailboxes + a.n \
                 FROM unnest($1::bigint[], $2::bigint[]) AS a(id, n) WHERE b.id = a.id",
                &[&ids, &counts],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(results)
        };
        tokio::time::timeout(deadline, work)
            .await
            .unwrap_or_else(|_| {
                Err(DirectoryError::Store(format!(
                    "PostgreSQL did not finish an import batch within {} ms",
                    deadline.as_millis()
                )))
            })
    }
}

/// A ban as the nodes share it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BanRecord {
    /// `198.51.100.7`, `2001:db8::1` or `2001:db8:1:2::/64`.
    pub target: String,
    /// `all` or `new-connections`.
    pub mode: String,
    pub reason: u32,
    /// When it ends, Unix milliseconds (every node computes its own remaining time).
    pub expires_ms: i64,
    /// The node that placed it (its hostname), for the operator.
    pub node: String,
}

impl PostgresDirectory {
    /// Adds or replaces the ban of `record.target`.
    pub async fn put_ban(&self, record: &BanRecord) -> Result<(), DirectoryError> {
        self.execute(
            "INSERT INTO bans (target, mode, reason, expires_ms, node) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (target) DO UPDATE SET mode = excluded.mode, reason = excluded.reason, \
             expires_ms = excluded.expires_ms, node = excluded.node",
            &[
                &record.target,
                &record.mode,
                &i64::from(record.reason),
                &record.expires_ms,
                &record.node,
            ],
        )
        .await
        .map(drop)
    }

    /// Removes the ban of `target`; false when there was none.
    pub async fn remove_ban(&self, target: &str) -> Result<bool, DirectoryError> {
        self.execute("DELETE FROM bans WHERE target = $1", &[&target])
            .await
            .map(|n| n > 0)
    }

    /// The bans unexpired at `now_ms`: all of them, or those of `targets`.
    pub async fn bans(
        &self,
        targets: Option<&[String]>,
        now_ms: i64,
    ) -> Result<Vec<BanRecord>, DirectoryError> {
        let rows = match targets {
            None => {
                self.rows(
                    "SELECT target, mode, reason, expires_ms, node FROM bans \
                     WHERE expires_ms > $1 ORDER BY target",
                    &[&now_ms],
                )
                .await?
            }
            Some(targets) => {
                self.rows(
                    "SELECT target, mode, reason, expires_ms, node FROM bans \
                     WHERE expires_ms > $1 AND target = ANY($2) ORDER BY target",
                    &[&now_ms, &targets],
                )
                .await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| BanRecord {
                target: r.get(0),
                mode: r.get(1),
                reason: u32::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                expires_ms: r.get(3),
                node: r.get(4),
            })
            .collect())
    }

    /// Deletes the bans ended at `now_ms`; how many.
    pub async fn remove_expired_bans(&self, now_ms: i64) -> Result<u64, DirectoryError> {
        self.execute("DELETE FROM bans WHERE expires_ms <= $1", &[&now_ms])
            .await
    }
}

fn block_row(r: &tokio_postgres::Row) -> BlockRecord {
    BlockRecord {
        list: r.get(0),
        cidr: r.get(1),
        reason: r.get(2),
        expires_at: r.get(3),
    }
}

/// How often the listening connection is checked with a query: a peer that vanished
/// without closing the TCP connection is noticed within this plus the call deadline.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Keeps `directory`'s owner cache coherent with changes made by any node, until the
/// directory is dropped. See the module comment.
pub fn listen(directory: &Arc<Directory<Store>>, settings: PostgresSettings) {
    // Until the node hears other nodes' changes, nothing is cached.
    directory.cache_lease(Some(Duration::ZERO));
    let weak = Arc::downgrade(directory);
    tokio::spawn(Directory::check_sessions(Weak::clone(&weak)));
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = listen_once(&weak, &settings).await;
            let Some(directory) = weak.upgrade() else {
                return;
            };
            directory.cache_lease(Some(settings.stale_cache));
            directory
                .cache_stats()
                .listening
                .store(false, Ordering::Relaxed);
            match outcome {
                Ok(()) => return,
                Err(error) => tracing::warn!(
                    %error, retry_ms = backoff.as_millis() as u64,
                    stale_cache_seconds = settings.stale_cache.as_secs(),
                    "directory change notifications lost: cached owners are served only for \
                     stale_cache_seconds, then every lookup asks PostgreSQL"
                ),
            }
            drop(directory);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

/// One listening connection, until it fails (`Err`) or the directory is gone (`Ok`).
async fn listen_once(
    weak: &Weak<Directory<Store>>,
    settings: &PostgresSettings,
) -> Result<(), DirectoryError> {
    let config = settings.pg_config()?;
    let tls = settings.tls()?;
    let (client, mut connection) = tokio::time::timeout(settings.timeout, config.connect(tls))
        .await
        .map_err(|_| DirectoryError::Store("PostgreSQL: connect timed out".into()))?
        .map_err(pg_err)?;
    // Bounded: while the loop below is busy, the pump stops reading the connection (the
    // server holds the notifications) instead of queueing them here without limit.
    let (tx, mut notifications) = tokio::sync::mpsc::channel(1024);
    let mut pump = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(message)) => {
                    if tx.send(message).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Err(e)) => return Err(pg_err(e)),
                None => {
                    return Err(DirectoryError::Store(
                        "PostgreSQL closed the connection".into(),
                    ));
                }
            }
        }
    });
    let _abort = AbortOnDrop(pump.abort_handle());
    let command = format!(
        "LISTEN {}; LISTEN {}; LISTEN {}; LISTEN {}",
        schema::MAILBOX_CHANNEL,
        schema::BLOCKLIST_CHANNEL,
        schema::BAN_CHANNEL,
        schema::BACKEND_CHANNEL
    );
    tokio::time::timeout(settings.timeout, client.batch_execute(&command))
        .await
        .map_err(|_| DirectoryError::Store("PostgreSQL: LISTEN timed out".into()))?
        .map_err(pg_err)?;
    {
        let Some(directory) = weak.upgrade() else {
            return Ok(());
        };
        // Changes made while nobody listened were not heard: forget everything.
        directory.invalidate_all();
        directory.cache_lease(None);
        // Moves may have been missed: sessions on a former owner end (checked by the
        // node's session task: one owner lookup per mailbox with sessions must not delay
        // listening). Blocklist, ban and backend changes may have been missed as well.
        directory.session_checks().all();
        directory.blocklist_changed().notify_one();
        directory.ban_changes().resync();
        directory.backends_changed().notify_one();
        directory
            .cache_stats()
            .listening
            .store(true, Ordering::Relaxed);
        tracing::info!("listening for directory changes: the owner cache is coherent");
    }
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = notifications.recv() => {
                let Some(message) = message else {
                    // The pump ended: it says why.
                    return match (&mut pump).await {
                        Ok(Err(e)) => Err(e),
                        _ => Err(DirectoryError::Store("PostgreSQL connection ended".into())),
                    };
                };
                let Some(directory) = weak.upgrade() else {
                    return Ok(());
                };
                match message {
                    AsyncMessage::Notification(n) if n.channel() == schema::BLOCKLIST_CHANNEL => {
                        directory.blocklist_changed().notify_one();
                    }
                    AsyncMessage::Notification(n) if n.channel() == schema::BAN_CHANNEL => {
                        directory.ban_changes().push(n.payload());
                    }
                    AsyncMessage::Notification(n) if n.channel() == schema::BACKEND_CHANNEL => {
                        directory.backends_changed().notify_one();
                    }
                    AsyncMessage::Notification(n) => {
                        let mailbox = Mailbox::from_store(n.payload().to_owned());
                        directory.invalidate(&mailbox);
                        // Moved or deleted by another node: sessions here on the old
                        // owner end (those on the new owner are looked up and kept) —
                        // by the node's session task, so the owner lookup does not hold
                        // up the notifications behind this one.
                        directory.cache_stats().notifications.fetch_add(1, Ordering::Relaxed);
                        if directory.live_sessions().count(&mailbox) > 0 {
                            directory.session_checks().push(mailbox);
                        }
                    }
                    _ => {}
                }
            }
            _ = heartbeat.tick() => {
                if weak.strong_count() == 0 {
                    return Ok(());
                }
                tokio::time::timeout(settings.timeout, client.simple_query(""))
                    .await
                    .map_err(|_| DirectoryError::Store(format!(
                        "PostgreSQL did not answer the listener's heartbeat within {} ms",
                        settings.timeout.as_millis()
                    )))?
                    .map_err(pg_err)?;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
