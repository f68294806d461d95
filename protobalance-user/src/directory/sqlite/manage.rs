//! The management side of the SQLite store (listing, deleting, moving), in blocking form:
//! what the XML management API drives. Every write is one IMMEDIATE transaction that keeps
//! `backends.mailboxes` equal to the number of rows pointing at the backend.

use rusqlite::{Connection, OptionalExtension as _, ToSql, Transaction, TransactionBehavior};

use super::{SqliteDirectory, store_err};
use crate::directory::{DirectoryError, DomainPolicy, DomainRecord, Mailbox, MailboxFilter};

/// The page query for the filters given. Conditions are added only for filters that are
/// set: `(?3 IS NULL OR m.domain = ?3)` would keep SQLite from using the domain index.
pub(super) fn list_query(by_domain: bool, by_backend: bool) -> String {
    let mut sql = String::from(
        "SELECT m.address, b.name FROM mailboxes m JOIN backends b ON b.id = m.backend_id
         WHERE m.address > ?1",
    );
    let mut next = 3;
    for (set, column) in [(by_domain, "m.domain"), (by_backend, "m.backend_id")] {
        if set {
            sql.push_str(&format!(" AND {column} = ?{next}"));
            next += 1;
        }
    }
    sql.push_str(" ORDER BY m.address LIMIT ?2");
    sql
}

fn immediate(conn: &mut Connection) -> Result<Transaction<'_>, DirectoryError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(store_err)
}

fn count(conn: &Connection, sql: &str, param: &dyn ToSql) -> Result<u64, DirectoryError> {
    let n: i64 = conn
        .query_row(sql, [param], |row| row.get(0))
        .map_err(store_err)?;
    Ok(n.max(0).unsigned_abs())
}

impl SqliteDirectory {
    pub(super) fn list_blocking(
        conn: &mut Connection,
        filter: &MailboxFilter,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(Mailbox, String)>, DirectoryError> {
        // One read transaction: the backend lookup and the page see the same snapshot.
        let tx = conn.transaction().map_err(store_err)?;
        let backend_id = match &filter.backend {
            Some(name) => Some(Self::backend_by_name(&tx, name)?.0),
            None => None,
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut args: Vec<&dyn ToSql> = vec![&after, &limit];
        args.extend(filter.domain.as_ref().map(|d| d as &dyn ToSql));
        args.extend(backend_id.as_ref().map(|id| id as &dyn ToSql));
        let sql = list_query(filter.domain.is_some(), backend_id.is_some());
        let mut stmt = tx.prepare_cached(&sql).map_err(store_err)?;
        let rows = stmt
            .query_map(args.as_slice(), |row| {
                Ok((Mailbox::from_store(row.get(0)?), row.get(1)?))
            })
            .map_err(store_err)?;
        rows.collect::<Result<_, _>>().map_err(store_err)
    }

    pub(super) fn delete_blocking(
        conn: &mut Connection,
        address: &str,
    ) -> Result<bool, DirectoryError> {
        let tx = immediate(conn)?;
        let owner: Option<i64> = tx
            .query_row(
                "DELETE FROM mailboxes WHERE address = ?1 RETURNING backend_id",
                [address],
                |row| row.get(0),
            )
            .optional()
            .map_err(store_err)?;
        let Some(id) = owner else {
            return Ok(false);
        };
        tx.execute(
            "UPDATE backends SET mailboxes = mailboxes - 1 WHERE id = ?1",
            [id],
        )
        .map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        Ok(true)
    }

    pub(super) fn domains_blocking(conn: &Connection) -> Result<Vec<DomainRecord>, DirectoryError> {
        let mut stmt = conn
            .prepare_cached(
                "SELECT d.name, d.policy,
                        (SELECT count(*) FROM mailboxes m WHERE m.domain = d.name)
                 FROM domains d ORDER BY d.name",
            )
            .map_err(store_err)?;
        let rows = stmt
            .query_map([], |row| {
                let policy: String = row.get(1)?;
                Ok(DomainRecord {
                    name: row.get(0)?,
                    // The CHECK constraint admits only known policies; refusing is the
                    // safe reading of anything else.
                    policy: DomainPolicy::parse(&policy).unwrap_or(DomainPolicy::Reject),
                    mailboxes: row.get::<_, i64>(2)?.max(0).unsigned_abs(),
                })
            })
            .map_err(store_err)?;
        rows.collect::<Result<_, _>>().map_err(store_err)
    }

    pub(super) fn delete_domain_blocking(
        conn: &mut Connection,
        domain: &str,
    ) -> Result<(), DirectoryError> {
        let tx = immediate(conn)?;
        let known = tx
            .query_row(
                "SELECT 1 FROM domains WHERE name = ?1",
                [domain],
                |_| Ok(()),
            )
            .optional()
            .map_err(store_err)?;
        if known.is_none() {
            return Err(DirectoryError::UnknownDomain(domain.to_owned()));
        }
        let mailboxes = count(
            &tx,
            "SELECT count(*) FROM mailboxes WHERE domain = ?1",
            &domain,
        )?;
        if mailboxes > 0 {
            return Err(DirectoryError::DomainInUse {
                domain: domain.to_owned(),
                mailboxes,
            });
        }
        tx.execute("DELETE FROM domains WHERE name = ?1", [domain])
            .map_err(store_err)?;
        tx.commit().map_err(store_err)
    }

    pub(super) fn remove_backend_blocking(
        conn: &mut Connection,
        name: &str,
    ) -> Result<(), DirectoryError> {
        let tx = immediate(conn)?;
        let (id, _) = Self::backend_by_name(&tx, name)?;
        // Counted from the rows, not the counter: the foreign key would refuse the delete
        // on any row the counter missed, with a far less helpful message.
        let mailboxes = count(
            &tx,
            "SELECT count(*) FROM mailboxes WHERE backend_id = ?1",
            &id,
        )?;
        if mailboxes > 0 {
            return Err(DirectoryError::BackendInUse {
                backend: name.to_owned(),
                mailboxes,
            });
        }
        tx.execute("DELETE FROM backends WHERE id = ?1", [id])
            .map_err(store_err)?;
        tx.commit().map_err(store_err)
    }

    pub(super) fn reassign_blocking(
        conn: &mut Connection,
        address: &str,
        backend: &str,
    ) -> Result<Option<String>, DirectoryError> {
        let tx = immediate(conn)?;
        let (to, _) = Self::backend_by_name(&tx, backend)?;
        let current: Option<(i64, String)> = tx
            .query_row(
                "SELECT m.backend_id, b.name FROM mailboxes m JOIN backends b ON b.id = m.backend_id
                 WHERE m.address = ?1",
                [address],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(store_err)?;
        let Some((from, previous)) = current else {
            return Ok(None);
        };
        if from != to {
            tx.execute(
                "UPDATE mailboxes SET backend_id = ?2 WHERE address = ?1",
                rusqlite::params![address, to],
            )
            .map_err(store_err)?;
            for (id, delta) in [(from, -1), (to, 1)] {
                tx.execute(
                    "UPDATE backends SET mailboxes = mailboxes + ?2 WHERE id = ?1",
                    [id, delta],
                )
                .map_err(store_err)?;
            }
            tx.commit().map_err(store_err)?;
        }
        Ok(Some(previous))
    }

    pub(super) fn reassign_from_blocking(
        conn: &mut Connection,
        address: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, DirectoryError> {
        let tx = immediate(conn)?;
        let (to_id, _) = Self::backend_by_name(&tx, to)?;
        let (from_id, _) = Self::backend_by_name(&tx, from)?;
        let changed = tx
            .execute(
                "UPDATE mailboxes SET backend_id = ?3 WHERE address = ?1 AND backend_id = ?2",
                rusqlite::params![address, from_id, to_id],
            )
            .map_err(store_err)?;
        if changed == 0 || from_id == to_id {
            return Ok(changed > 0);
        }
        for (id, delta) in [(from_id, -1), (to_id, 1)] {
            tx.execute(
                "UPDATE backends SET mailboxes = mailboxes + ?2 WHERE id = ?1",
                [id, delta],
            )
            .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        Ok(true)
    }

    /// The sum of the per-backend counters, which every write keeps exact: O(backends),
    /// where `count(*)` would read a whole index (millions of rows) on every call.
    pub(super) fn mailbox_count_blocking(conn: &Connection) -> Result<u64, DirectoryError> {
        let n: i64 = conn
            .query_row(
                "SELECT coalesce(sum(mailboxes), 0) FROM backends",
                [],
                |row| row.get(0),
            )
            .map_err(store_err)?;
        Ok(n.max(0).unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::list_query;
    use crate::directory::sqlite::SqliteDirectory;

    /// Filtered pages are index range scans in address order, not scans of every mailbox
    /// followed by a sort.
    #[test]
    fn filtered_pages_use_the_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteDirectory::open(&dir.path().join("d.db")).expect("open");
        let conn = store.lock();
        let plan = |domain, backend| {
            let sql = format!("EXPLAIN QUERY PLAN {}", list_query(domain, backend));
            let mut stmt = conn.prepare(&sql).expect("prepare");
            let rows = stmt
                .query_map(
                    rusqlite::params_from_iter(std::iter::repeat_n(
                        rusqlite::types::Null,
                        stmt.parameter_count(),
                    )),
                    |row| row.get::<_, String>(3),
                )
                .expect("plan");
            rows.collect::<Result<Vec<_>, _>>()
                .expect("plan rows")
                .join("; ")
        };
        for (domain, backend, index) in [
            (true, false, "mailboxes_by_domain"),
            (false, true, "mailboxes_by_backend"),
            (false, false, "PRIMARY KEY"),
        ] {
            let plan = plan(domain, backend);
            assert!(plan.contains(index), "{domain}/{backend}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "sorted: {plan}");
        }
        let both = plan(true, true);
        assert!(both.contains("mailboxes_by_"), "{both}");
        assert!(!both.contains("TEMP B-TREE"), "sorted: {both}");
    }
}
