//! Bulk import of mailboxes (provisioning tens of thousands at a time, or a migration of
//! millions). File format, one mailbox per line (documented in docs/directory.md):
//!
//! ```text
//! # comment (whole lines only: `#` is legal in addresses)
//! user@example.com              -> apportioned by capacity
//! other@example.com,backend2    -> pinned to backend2 (it must exist)
//! ```
//!
//! Everything is normalized like a login. The whole import is one transaction: it lands
//! completely or not at all. Apportioning happens in memory with the same rule as
//! `assign` (lowest mailboxes/capacity among active backends, ties by name), so an import
//! of N mailboxes spreads exactly as N single assignments would.

use std::{
    cmp::Ordering,
    collections::{BinaryHeap, HashMap},
    io::BufRead,
};

use rusqlite::{OptionalExtension as _, params};

use super::{DirectoryError, Mailbox, Normalizer, sqlite::SqliteDirectory};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// New mailboxes written.
    pub added: u64,
    /// Already present on the same backend (or apportioned earlier): unchanged.
    pub unchanged: u64,
    /// Present on another backend than the file names: left alone (moves are a separate
    /// operation that copies mail), listed here by address.
    pub conflicts: Vec<String>,
    /// New mailboxes per backend.
    pub per_backend: Vec<(String, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("line {line}: {message}")]
    Line { line: u64, message: String },
    #[error("reading the import file: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

/// A backend's load for the in-memory apportioning heap. Ordered so the heap's top is the
/// backend with the lowest mailboxes/capacity, then the smallest name.
pub(super) struct Load {
    id: i64,
    name: String,
    capacity: u64,
    mailboxes: u64,
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> Ordering {
        // a/b < c/d  <=>  a*d < c*b (capacities are > 0); reversed for the max-heap.
        let lhs = u128::from(self.mailboxes) * u128::from(other.capacity);
        let rhs = u128::from(other.mailboxes) * u128::from(self.capacity);
        rhs.cmp(&lhs).then_with(|| other.name.cmp(&self.name))
    }
}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Load {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Load {}

/// Imports `reader` into `dir`. `progress(lines_read)` is called every `every` lines.
pub fn import(
    dir: &SqliteDirectory,
    normalizer: &Normalizer,
    reader: impl BufRead,
    every: u64,
    mut progress: impl FnMut(u64),
) -> Result<ImportReport, ImportError> {
    let mut conn = dir.lock();
    let tx = conn.transaction().map_err(store)?;
    let (mut heap, ids) = loads(&tx)?;
    let mut report = ImportReport::default();
    let mut added: HashMap<i64, u64> = HashMap::new();
    {
        let mut find = tx
            .prepare("SELECT backend_id FROM mailboxes WHERE address = ?1")
            .map_err(store)?;
        let mut insert = tx
            .prepare("INSERT INTO mailboxes (address, backend_id) VALUES (?1, ?2)")
            .map_err(store)?;
        for (index, line) in reader.lines().enumerate() {
            let number = index as u64 + 1;
            if number.is_multiple_of(every) {
                progress(number);
            }
            let line = line?;
            let Some((address, pinned)) = parse_line(&line, number, normalizer, &ids)? else {
                continue;
            };
            let existing: Option<i64> = find
                .query_row([&address], |r| r.get(0))
                .optional()
                .map_err(store)?;
            match (existing, pinned) {
                (Some(have), Some(want)) if have != want => report.conflicts.push(address),
                (Some(_), _) => report.unchanged += 1,
                (None, want) => {
                    let id = match want {
                        Some(id) => {
                            bump(&mut heap, id);
                            id
                        }
                        None => take_lowest(&mut heap)?,
                    };
                    insert.execute(params![address, id]).map_err(store)?;
                    *added.entry(id).or_default() += 1;
                    report.added += 1;
                }
            }
        }
    }
    for (id, count) in &added {
        tx.execute(
            "UPDATE backends SET mailboxes = mailboxes + ?2 WHERE id = ?1",
            params![id, i64::try_from(*count).unwrap_or(i64::MAX)],
        )
        .map_err(store)?;
    }
    tx.commit().map_err(store)?;
    let names: HashMap<i64, String> = ids.into_iter().map(|(name, id)| (id, name)).collect();
    report.per_backend = added
        .into_iter()
        .map(|(id, n)| (names.get(&id).cloned().unwrap_or_default(), n))
        .collect();
    report.per_backend.sort();
    Ok(report)
}

/// One mailbox of an API import: normalized, optionally pinned to a backend.
#[derive(Debug, Clone)]
pub struct ImportEntry {
    pub mailbox: Mailbox,
    pub backend: Option<String>,
}

/// What happened to one [`ImportEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryOutcome {
    Added,
    /// Already present (on the backend named, if one was).
    Exists,
    /// Present on another backend than the one named: left alone (moving copies mail).
    Conflict,
    UnknownBackend,
    /// Pinned to a draining or down backend: not added.
    BackendNotActive,
}

impl EntryOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Exists => "exists",
            Self::Conflict => "conflict",
            Self::UnknownBackend => "unknown_backend",
            Self::BackendNotActive => "backend_not_active",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EntryResult {
    pub mailbox: Mailbox,
    pub outcome: EntryOutcome,
    /// The owner (added, exists, conflict).
    pub backend: Option<String>,
    pub message: Option<String>,
}

/// Imports one batch of entries in one transaction, apportioning unpinned ones exactly as
/// [`import`] does, and reports each entry instead of failing the batch for one bad line.
/// Stores call this through [`MailboxDirectory::import_entries`](super::MailboxDirectory).
pub(super) async fn import_entries(
    dir: &SqliteDirectory,
    entries: Vec<ImportEntry>,
) -> Result<Vec<EntryResult>, DirectoryError> {
    let dir = dir.clone();
    tokio::task::spawn_blocking(move || import_entries_blocking(&dir, entries))
        .await
        .map_err(|e| DirectoryError::Store(format!("import task failed: {e}")))?
}

fn import_entries_blocking(
    dir: &SqliteDirectory,
    entries: Vec<ImportEntry>,
) -> Result<Vec<EntryResult>, DirectoryError> {
    let to_dir = |e: ImportError| match e {
        ImportError::Directory(e) => e,
        other => DirectoryError::Store(other.to_string()),
    };
    let db = |e: rusqlite::Error| DirectoryError::Store(e.to_string());
    let mut conn = dir.lock();
    let tx = conn.transaction().map_err(db)?;
    let (heap, ids) = loads(&tx).map_err(to_dir)?;
    let mut planner = Planner::new(heap, ids);
    let (results, added) = {
        let find = tx
            .prepare("SELECT backend_id FROM mailboxes WHERE address = ?1")
            .map_err(db)?;
        let mut insert = tx
            .prepare("INSERT INTO mailboxes (address, backend_id) VALUES (?1, ?2)")
            .map_err(db)?;
        let mut find = find;
        planner.plan(
            entries,
            |address| {
                find.query_row([address], |r| r.get(0))
                    .optional()
                    .map_err(db)
            },
            |address, id| insert.execute(params![address, id]).map(drop).map_err(db),
        )?
    };
    for (id, count) in &added {
        tx.execute(
            "UPDATE backends SET mailboxes = mailboxes + ?2 WHERE id = ?1",
            params![id, i64::try_from(*count).unwrap_or(i64::MAX)],
        )
        .map_err(db)?;
    }
    tx.commit().map_err(db)?;
    Ok(results)
}

/// The apportioning of one import batch, apart from any store: which entries are added to
/// which backend, which exist, conflict or name a backend that cannot take them.
pub(super) struct Planner {
    heap: BinaryHeap<Load>,
    ids: BackendIds,
    names: HashMap<i64, String>,
    active: std::collections::HashSet<i64>,
}

/// New mailboxes per backend id, for the counter updates.
pub(super) type Added = HashMap<i64, u64>;

impl Planner {
    pub(super) fn new(heap: BinaryHeap<Load>, ids: BackendIds) -> Self {
        let names = ids.iter().map(|(n, id)| (*id, n.clone())).collect();
        let active = heap.iter().map(|l| l.id).collect();
        Self {
            heap,
            ids,
            names,
            active,
        }
    }

    /// Plans `entries`: `find(address)` is the stored owner id, `insert(address, id)`
    /// writes (or queues) a new row. An address twice in the batch is added once.
    pub(super) fn plan(
        &mut self,
        entries: Vec<ImportEntry>,
        mut find: impl FnMut(&str) -> Result<Option<i64>, DirectoryError>,
        mut insert: impl FnMut(&str, i64) -> Result<(), DirectoryError>,
    ) -> Result<(Vec<EntryResult>, Added), DirectoryError> {
        let mut results = Vec::with_capacity(entries.len());
        let mut added = Added::new();
        let mut planned: HashMap<String, i64> = HashMap::new();
        for entry in entries {
            let names = &self.names;
            let result = |outcome, backend: Option<&i64>, message: Option<String>| EntryResult {
                mailbox: entry.mailbox.clone(),
                outcome,
                backend: backend.and_then(|id| names.get(id).cloned()),
                message,
            };
            let pinned = match entry.backend.as_deref() {
                None => None,
                Some(name) => match self.ids.get(name) {
                    None => {
                        let message = format!("no backend `{name}`");
                        results.push(result(EntryOutcome::UnknownBackend, None, Some(message)));
                        continue;
                    }
                    Some(id) => Some(*id),
                },
            };
            let address = entry.mailbox.as_str();
            let existing = match planned.get(address) {
                Some(id) => Some(*id),
                None => find(address)?,
            };
            match (existing, pinned) {
                (Some(have), Some(want)) if have != want => {
                    let message = "exists on another backend; moving is a separate operation";
                    results.push(result(
                        EntryOutcome::Conflict,
                        Some(&have),
                        Some(message.into()),
                    ));
                }
                (Some(have), _) => results.push(result(EntryOutcome::Exists, Some(&have), None)),
                (None, Some(want)) if !self.active.contains(&want) => {
                    let message = "the backend is draining or down: it takes no new mailboxes";
                    results.push(result(
                        EntryOutcome::BackendNotActive,
                        Some(&want),
                        Some(message.into()),
                    ));
                }
                (None, want) => {
                    let id = match want {
                        Some(id) => {
                            bump(&mut self.heap, id);
                            id
                        }
                        None => take_lowest(&mut self.heap).map_err(|e| match e {
                            ImportError::Directory(e) => e,
                            other => DirectoryError::Store(other.to_string()),
                        })?,
                    };
                    insert(address, id)?;
                    planned.insert(address.to_owned(), id);
                    *added.entry(id).or_default() += 1;
                    results.push(result(EntryOutcome::Added, Some(&id), None));
                }
            }
        }
        Ok((results, added))
    }
}

fn store(e: rusqlite::Error) -> ImportError {
    ImportError::Directory(DirectoryError::Store(e.to_string()))
}

pub(super) type BackendIds = HashMap<String, i64>;

/// Active backends with capacity, as a heap; and every backend's name → id (an explicit
/// backend in the file may also be a draining one: the operator asked for it).
fn loads(tx: &rusqlite::Transaction<'_>) -> Result<(BinaryHeap<Load>, BackendIds), ImportError> {
    let mut stmt = tx
        .prepare("SELECT id, name, capacity, state, mailboxes FROM backends")
        .map_err(store)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(BackendRow {
                id: r.get(0)?,
                name: r.get(1)?,
                capacity: r.get(2)?,
                state: r.get(3)?,
                mailboxes: r.get(4)?,
            })
        })
        .map_err(store)?;
    let rows = rows.collect::<Result<Vec<_>, _>>().map_err(store)?;
    Ok(heap_of(rows))
}

/// One `backends` row as the apportioning reads it.
pub(super) struct BackendRow {
    pub id: i64,
    pub name: String,
    pub capacity: i64,
    pub state: String,
    pub mailboxes: i64,
}

/// The apportioning heap (active backends with capacity) and every backend's name → id.
pub(super) fn heap_of(rows: Vec<BackendRow>) -> (BinaryHeap<Load>, BackendIds) {
    let mut heap = BinaryHeap::new();
    let mut ids = HashMap::new();
    for row in rows {
        let (capacity, mailboxes) = (
            row.capacity.max(0).unsigned_abs(),
            row.mailboxes.max(0).unsigned_abs(),
        );
        if row.state == "active" && capacity > 0 {
            heap.push(Load {
                id: row.id,
                name: row.name.clone(),
                capacity,
                mailboxes,
            });
        }
        ids.insert(row.name, row.id);
    }
    (heap, ids)
}

fn take_lowest(heap: &mut BinaryHeap<Load>) -> Result<i64, ImportError> {
    let mut lowest = heap.pop().ok_or(DirectoryError::NoActiveBackend)?;
    lowest.mailboxes += 1;
    let id = lowest.id;
    heap.push(lowest);
    Ok(id)
}

/// A pinned mailbox still counts towards its backend's load for later apportioning.
fn bump(heap: &mut BinaryHeap<Load>, id: i64) {
    let mut loads = std::mem::take(heap).into_vec();
    if let Some(load) = loads.iter_mut().find(|l| l.id == id) {
        load.mailboxes += 1;
    }
    *heap = loads.into();
}

fn parse_line(
    line: &str,
    number: u64,
    normalizer: &Normalizer,
    ids: &BackendIds,
) -> Result<Option<(String, Option<i64>)>, ImportError> {
    // `#` is legal inside a local part, so only whole-line comments exist.
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let bad = |message: String| ImportError::Line {
        line: number,
        message,
    };
    let (address, backend) = match line.split_once(',') {
        Some((a, b)) => (a.trim(), Some(b.trim())),
        None => (line, None),
    };
    let mailbox = normalizer
        .normalize(address)
        .map_err(|e| bad(e.to_string()))?
        .mailbox;
    let pinned = match backend.filter(|b| !b.is_empty()) {
        None => None,
        Some(name) => match ids.get(name) {
            Some(id) => Some(*id),
            None => {
                return Err(bad(format!(
                    "unknown backend `{name}`; configure it under [[backend]] first"
                )));
            }
        },
    };
    Ok(Some((mailbox.as_str().to_owned(), pinned)))
}
