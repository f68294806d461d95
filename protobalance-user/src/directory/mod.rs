//! The mailbox directory: which backend owns each mailbox. Durable (a re-hash would strand
//! mail on unshared storage), normalized before every lookup, cached in process.
//!
//! * [`MailboxDirectory`] — the store interface. [`sqlite::SqliteDirectory`] is the embedded
//!   default; [`postgres::PostgresDirectory`] is shared by the nodes of a multi-node edge;
//!   [`Store`] is the one a running edge chose.
//! * [`Directory`] — what sessions use: normalization + LRU cache + domain policy on top of
//!   a store. `route(login)` answers "which backend", auto-provisioning where the domain's
//!   policy says so.
//! * [`normalize`] — address normalization; [`import`] — bulk import files.

#[doc(hidden)]
pub mod contract;
pub mod import;
pub mod normalize;
pub mod postgres;
pub mod sqlite;

use std::{
    future::Future,
    num::NonZeroUsize,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lru::LruCache;
use serde::Deserialize;

pub use normalize::{AddressError, LocalCase, Mailbox, Normalized, Normalizer};

/// Whether a backend takes new mailboxes and logins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Serves its mailboxes and receives new ones.
    #[default]
    Active,
    /// Serves its mailboxes, receives no new ones (being emptied or retired).
    Draining,
    /// Administratively down: serves nothing; its mailboxes get temporary failures.
    Down,
}

impl BackendState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "draining" => Some(Self::Draining),
            "down" => Some(Self::Down),
            _ => None,
        }
    }
}

/// What the directory knows about a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRecord {
    pub name: String,
    /// Relative weight for apportioning new mailboxes (mailboxes per unit of capacity).
    pub capacity: u32,
    pub state: BackendState,
    pub mailboxes: u64,
}

/// What happens to a login or recipient whose mailbox is not in the directory yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainPolicy {
    /// Unknown mailboxes are refused (SMTP 550 5.1.1, login failure).
    #[default]
    Reject,
    /// Unknown mailboxes are assigned to a backend on first use.
    AutoProvision,
}

impl DomainPolicy {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Reject => "reject",
            Self::AutoProvision => "auto-provision",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reject" => Some(Self::Reject),
            "auto-provision" => Some(Self::AutoProvision),
            _ => None,
        }
    }
}

/// What the directory knows about a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRecord {
    pub name: String,
    pub policy: DomainPolicy,
    /// Mailboxes whose address ends in `@name`.
    pub mailboxes: u64,
}

/// Filters for listing mailboxes; `None` matches everything. Values are compared as stored
/// (normalized): pass a domain through [`Normalizer::domain`] first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailboxFilter {
    /// Only mailboxes of this domain.
    pub domain: Option<String>,
    /// Only mailboxes owned by this backend (which must exist).
    pub backend: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("directory store: {0}")]
    Store(String),
    #[error("no active backend with capacity can take new mailboxes")]
    NoActiveBackend,
    #[error("unknown backend `{0}`")]
    UnknownBackend(String),
    #[error("unknown domain `{0}`")]
    UnknownDomain(String),
    #[error("domain `{domain}` still has {mailboxes} mailboxes: delete them first")]
    DomainInUse { domain: String, mailboxes: u64 },
    #[error("backend `{backend}` still owns {mailboxes} mailboxes: move or delete them first")]
    BackendInUse { backend: String, mailboxes: u64 },
    #[error("backend `{0}` exists")]
    BackendExists(String),
}

/// The durable store. Methods are async so network stores (PostgreSQL) fit; the SQLite
/// store runs its queries on the blocking pool.
pub trait MailboxDirectory: Send + Sync + 'static {
    /// The backend that owns `mailbox`, if any.
    fn owner_of(
        &self,
        mailbox: &Mailbox,
    ) -> impl Future<Output = Result<Option<String>, DirectoryError>> + Send;

    /// The owner of `mailbox`, assigning it first (lowest mailboxes/capacity among active
    /// backends, ties broken by name) when it has none. Atomic: two concurrent first
    /// deliveries end on the same backend.
    fn assign(
        &self,
        mailbox: &Mailbox,
    ) -> impl Future<Output = Result<String, DirectoryError>> + Send;

    /// The backend `assign` would choose now, without assigning anything.
    fn candidate(&self) -> impl Future<Output = Result<String, DirectoryError>> + Send;

    /// The owner of `mailbox` after assigning it to `backend` if it had none (an existing
    /// owner wins and is returned).
    fn assign_to(
        &self,
        mailbox: &Mailbox,
        backend: &str,
    ) -> impl Future<Output = Result<String, DirectoryError>> + Send;

    /// The policy of `domain`, or `None` when the domain is not ours.
    fn domain_policy(
        &self,
        domain: &str,
    ) -> impl Future<Output = Result<Option<DomainPolicy>, DirectoryError>> + Send;

    fn upsert_backend(
        &self,
        name: &str,
        capacity: u32,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    fn set_backend_state(
        &self,
        name: &str,
        state: BackendState,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    fn upsert_domain(
        &self,
        domain: &str,
        policy: DomainPolicy,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    fn backends(&self) -> impl Future<Output = Result<Vec<BackendRecord>, DirectoryError>> + Send;

    /// Up to `limit` mailboxes (address order) strictly after `after`, matching `filter`,
    /// with their owners. Keyset paging: pass the last address of a page to get the next.
    /// `UnknownBackend` when the filter names a backend that does not exist.
    fn list_mailboxes(
        &self,
        filter: &MailboxFilter,
        after: Option<&Mailbox>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Mailbox, String)>, DirectoryError>> + Send;

    /// Removes `mailbox`; false when it did not exist. The owner's count drops by one.
    /// Sessions go through [`Directory::delete`], which also drops the cached owner.
    fn delete_mailbox(
        &self,
        mailbox: &Mailbox,
    ) -> impl Future<Output = Result<bool, DirectoryError>> + Send;

    /// Every domain with its policy and how many mailboxes it has, by name.
    fn domains(&self) -> impl Future<Output = Result<Vec<DomainRecord>, DirectoryError>> + Send;

    /// Removes a domain; refused with [`DirectoryError::DomainInUse`] while mailboxes of it
    /// exist; [`DirectoryError::UnknownDomain`] when absent.
    fn delete_domain(
        &self,
        domain: &str,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Removes a backend; refused with [`DirectoryError::BackendInUse`] while it owns
    /// mailboxes; [`DirectoryError::UnknownBackend`] when absent.
    fn remove_backend(&self, name: &str)
    -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Moves an existing `mailbox` to `backend` (any state: the operator chose it), adjusting
    /// both backends' counts in one transaction; returns the previous owner, `None` (and
    /// nothing changed) when the mailbox does not exist; [`DirectoryError::UnknownBackend`]
    /// when `backend` does not. Only the record moves: copying the mail is the caller's job.
    /// Sessions go through [`Directory::reassign`].
    fn reassign(
        &self,
        mailbox: &Mailbox,
        backend: &str,
    ) -> impl Future<Output = Result<Option<String>, DirectoryError>> + Send;

    /// Moves `mailbox` from `from` to `to` only if `from` still owns it (one transaction);
    /// false (and nothing changed) otherwise: deleted, or moved by someone else meanwhile.
    fn reassign_from(
        &self,
        mailbox: &Mailbox,
        from: &str,
        to: &str,
    ) -> impl Future<Output = Result<bool, DirectoryError>> + Send;

    /// Number of mailboxes in all.
    fn mailbox_count(&self) -> impl Future<Output = Result<u64, DirectoryError>> + Send;

    /// Adds a backend defined at run time (API) with its definition `spec` (TOML), so it is
    /// known again after a restart; [`DirectoryError::BackendExists`] when the name is taken.
    fn add_backend(
        &self,
        name: &str,
        capacity: u32,
        spec: &str,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Replaces the capacity and definition of a backend added at run time.
    fn update_backend_spec(
        &self,
        name: &str,
        capacity: u32,
        spec: &str,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Every blocklist entry added at run time, by list and CIDR.
    fn blocklist(&self) -> impl Future<Output = Result<Vec<BlockRecord>, DirectoryError>> + Send;

    /// Adds or replaces one entry.
    fn put_block(
        &self,
        entry: &BlockRecord,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Removes one entry; false when it was not there.
    fn remove_block(
        &self,
        list: &str,
        cidr: &str,
    ) -> impl Future<Output = Result<bool, DirectoryError>> + Send;

    /// Makes `list` hold exactly `entries` (one transaction).
    fn replace_block_list(
        &self,
        list: &str,
        entries: &[BlockRecord],
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Removes the entries that expired at or before `now` (Unix seconds); returns them.
    fn remove_expired_blocks(
        &self,
        now: i64,
    ) -> impl Future<Output = Result<Vec<BlockRecord>, DirectoryError>> + Send;

    /// Every stored suspension from sending (expired ones included until removed).
    fn suspensions(
        &self,
    ) -> impl Future<Output = Result<Vec<SuspensionRecord>, DirectoryError>> + Send;

    /// Adds or replaces the suspension of `record.account`; removes expired ones.
    fn put_suspension(
        &self,
        record: &SuspensionRecord,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Removes the suspension of `account`; false when there was none.
    fn remove_suspension(
        &self,
        account: &str,
    ) -> impl Future<Output = Result<bool, DirectoryError>> + Send;

    /// `(name, spec)` of every backend added at run time.
    fn backend_specs(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, String)>, DirectoryError>> + Send;

    /// Imports one batch in one transaction, apportioning unpinned entries as `assign`
    /// would one by one, and reports each entry (see [`import::EntryResult`]).
    fn import_entries(
        &self,
        entries: Vec<import::ImportEntry>,
    ) -> impl Future<Output = Result<Vec<import::EntryResult>, DirectoryError>> + Send;

    /// Records that `record.holder` moves `record.mailbox` from now on; false (nothing
    /// written) when a move of that mailbox is recorded already, on any node.
    fn begin_move(
        &self,
        record: &MoveRecord,
    ) -> impl Future<Output = Result<bool, DirectoryError>> + Send;

    /// Hands the recorded move of `mailbox` to `holder`, with a lease until `expires_ms`,
    /// when its lease ended before `now_ms` (its run stopped); the record as taken, `None`
    /// when there is none or its holder's lease runs.
    fn take_over_move(
        &self,
        mailbox: &Mailbox,
        holder: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> impl Future<Output = Result<Option<MoveRecord>, DirectoryError>> + Send;

    /// The heartbeat of `holder`'s move of `mailbox`: its lease runs until `expires_ms`;
    /// with the messages copied since the last one (all in one transaction); `forget`
    /// first drops what was recorded for that folder (recreated on the old backend: its
    /// UIDs are new). False when the move is no longer `holder`'s (taken over, or ended):
    /// the caller stops.
    fn move_progress(
        &self,
        mailbox: &Mailbox,
        holder: &str,
        expires_ms: i64,
        forget: Option<&str>,
        copies: &[MoveCopy],
    ) -> impl Future<Output = Result<bool, DirectoryError>> + Send;

    /// Ends `holder`'s move of `mailbox`: its record and copies are dropped.
    fn end_move(
        &self,
        mailbox: &Mailbox,
        holder: &str,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Every recorded move.
    fn moves(&self) -> impl Future<Output = Result<Vec<MoveRecord>, DirectoryError>> + Send;

    /// What the recorded move of `mailbox` copied.
    fn move_copies(
        &self,
        mailbox: &Mailbox,
    ) -> impl Future<Output = Result<Vec<MoveCopy>, DirectoryError>> + Send;
}

/// A mailbox move in progress as the store keeps it, so that another run (after the node
/// stopped, on this node or another) finishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveRecord {
    pub mailbox: String,
    pub from: String,
    pub to: String,
    /// The run holding it: the node's name and a token unique to the run.
    pub holder: String,
    pub started_ms: i64,
    /// The end of the holder's lease (Unix ms), pushed on by its heartbeat: after it,
    /// another run may take the move over.
    pub expires_ms: i64,
}

/// One message a move copied: its folder, UIDVALIDITY and UID on the old backend, the UID
/// of the copy on the new one (when the server said, APPENDUID), the flags copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveCopy {
    pub folder: String,
    pub validity: u32,
    pub old_uid: u32,
    pub new_uid: Option<u32>,
    pub flags: String,
}

/// The store a running edge uses, chosen by `[directory] store`.
#[derive(Clone)]
pub enum Store {
    /// One node: the embedded SQLite file.
    Sqlite(sqlite::SqliteDirectory),
    /// Several nodes sharing one PostgreSQL database.
    Postgres(postgres::PostgresDirectory),
}

impl Store {
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// `impl MailboxDirectory for Store`: each method forwarded to the chosen store. The
/// PostgreSQL futures are large (kilobytes): boxed, so that every future awaiting the
/// directory (a login, a session checking its owner) does not carry their size for as long
/// as it lives, which for a spliced session is hours.
macro_rules! forward {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl MailboxDirectory for Store {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> Result<$ret, DirectoryError> {
                    match self {
                        Self::Sqlite(s) => s.$name($($arg),*).await,
                        Self::Postgres(p) => Box::pin(p.$name($($arg),*)).await,
                    }
                }
            )*
        }
    };
}

forward! {
    fn owner_of(&self, mailbox: &Mailbox) -> Option<String>;
    fn assign(&self, mailbox: &Mailbox) -> String;
    fn candidate(&self) -> String;
    fn assign_to(&self, mailbox: &Mailbox, backend: &str) -> String;
    fn domain_policy(&self, domain: &str) -> Option<DomainPolicy>;
    fn upsert_backend(&self, name: &str, capacity: u32) -> ();
    fn set_backend_state(&self, name: &str, state: BackendState) -> ();
    fn upsert_domain(&self, domain: &str, policy: DomainPolicy) -> ();
    fn backends(&self) -> Vec<BackendRecord>;
    fn list_mailboxes(&self, filter: &MailboxFilter, after: Option<&Mailbox>, limit: usize)
        -> Vec<(Mailbox, String)>;
    fn delete_mailbox(&self, mailbox: &Mailbox) -> bool;
    fn domains(&self) -> Vec<DomainRecord>;
    fn delete_domain(&self, domain: &str) -> ();
    fn remove_backend(&self, name: &str) -> ();
    fn reassign(&self, mailbox: &Mailbox, backend: &str) -> Option<String>;
    fn reassign_from(&self, mailbox: &Mailbox, from: &str, to: &str) -> bool;
    fn mailbox_count(&self) -> u64;
    fn add_backend(&self, name: &str, capacity: u32, spec: &str) -> ();
    fn update_backend_spec(&self, name: &str, capacity: u32, spec: &str) -> ();
    fn blocklist(&self) -> Vec<BlockRecord>;
    fn put_block(&self, entry: &BlockRecord) -> ();
    fn remove_block(&self, list: &str, cidr: &str) -> bool;
    fn replace_block_list(&self, list: &str, entries: &[BlockRecord]) -> ();
    fn remove_expired_blocks(&self, now: i64) -> Vec<BlockRecord>;
    fn suspensions(&self) -> Vec<SuspensionRecord>;
    fn put_suspension(&self, record: &SuspensionRecord) -> ();
    fn remove_suspension(&self, account: &str) -> bool;
    fn backend_specs(&self) -> Vec<(String, String)>;
    fn import_entries(&self, entries: Vec<import::ImportEntry>) -> Vec<import::EntryResult>;
    fn begin_move(&self, record: &MoveRecord) -> bool;
    fn take_over_move(&self, mailbox: &Mailbox, holder: &str, now_ms: i64, expires_ms: i64)
        -> Option<MoveRecord>;
    fn move_progress(&self, mailbox: &Mailbox, holder: &str, expires_ms: i64, forget: Option<&str>,
        copies: &[MoveCopy]) -> bool;
    fn end_move(&self, mailbox: &Mailbox, holder: &str) -> ();
    fn moves(&self) -> Vec<MoveRecord>;
    fn move_copies(&self, mailbox: &Mailbox) -> Vec<MoveCopy>;
}

/// An account suspended from sending, as stored (times in Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuspensionRecord {
    pub account: String,
    pub reason: String,
    pub since: i64,
    pub until: i64,
}

/// A blocklist entry added at run time (the config file's lists are the file's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRecord {
    pub list: String,
    /// The network in canonical form (`198.51.100.0/24`).
    pub cidr: String,
    pub reason: String,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
}

/// Where a login or recipient goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Owner {
        mailbox: Normalized,
        backend: String,
    },
    /// A login to an unassigned mailbox of an auto-provisioning domain: try `backend`, and
    /// [`Directory::confirm`] the assignment only if it accepts the credentials — failed
    /// logins must not fill the directory with junk.
    Candidate {
        mailbox: Normalized,
        backend: String,
    },
    /// Our domain, no such mailbox, and the domain does not auto-provision.
    UnknownMailbox(Normalized),
    /// Not one of our domains.
    ForeignDomain(Normalized),
}

/// Whether resolving may assign an unassigned mailbox.
#[derive(Clone, Copy)]
enum Provision {
    Assign,
    Candidate,
}

/// Normalization + cache + domain policy over a store.
pub struct Directory<S> {
    store: S,
    normalizer: Normalizer,
    cache: Mutex<LruCache<Mailbox, String>>,
    /// Bumped (under the cache lock) by every invalidation. A lookup caches what it read
    /// from the store only if no invalidation happened since it started reading: otherwise
    /// a lookup racing a `reassign` could put the old owner back after the invalidation.
    generation: AtomicU64,
    /// Until when (ms after `epoch`) cached owners may be served; `u64::MAX` while the
    /// cache is known coherent (one node, or a shared store whose changes are heard).
    lease_until: AtomicU64,
    epoch: Instant,
    stats: CacheStats,
    /// Woken when another node (or anything) changed the stored blocklist.
    blocklist_changed: tokio::sync::Notify,
    ban_changes: BanChanges,
    /// Woken when a backend was added, removed or changed in a shared store.
    backends_changed: tokio::sync::Notify,
    live: LiveSessions,
    session_checks: std::sync::Arc<SessionChecks>,
}

/// Per mailbox: (session id, backend, the session's end signal).
type SessionMap =
    std::collections::HashMap<Mailbox, Vec<(u64, String, tokio_util::sync::CancellationToken)>>;

/// The POP3/IMAP sessions spliced to a backend now, by mailbox: a mailbox that moves
/// (or is deleted) has its sessions ended, so no client keeps working on the old copy.
#[derive(Default)]
pub struct LiveSessions {
    by_mailbox: Mutex<SessionMap>,
    next: AtomicU64,
}

/// A registered session; unregisters on drop.
pub struct LiveSession<'a> {
    sessions: &'a LiveSessions,
    mailbox: Mailbox,
    id: u64,
    token: tokio_util::sync::CancellationToken,
}

impl LiveSession<'_> {
    /// Completes when the mailbox moved away from this session's backend.
    pub async fn ended(&self) {
        self.token.cancelled().await;
    }
}

impl<S> Drop for Directory<S> {
    fn drop(&mut self) {
        // The session-checking task waits on these checks: it ends now.
        self.session_checks.closed.store(true, Ordering::Relaxed);
        self.session_checks.wake.notify_one();
    }
}

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        let mut map = self.sessions.lock();
        if let Some(list) = map.get_mut(&self.mailbox) {
            list.retain(|(id, _, _)| *id != self.id);
            if list.is_empty() {
                map.remove(&self.mailbox);
            }
        }
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionMap> {
        self.by_mailbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn register(&self, mailbox: &Mailbox, backend: &str) -> LiveSession<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = tokio_util::sync::CancellationToken::new();
        self.lock().entry(mailbox.clone()).or_default().push((
            id,
            backend.to_owned(),
            token.clone(),
        ));
        LiveSession {
            sessions: self,
            mailbox: mailbox.clone(),
            id,
            token,
        }
    }

    /// Ends the sessions of `mailbox` on any backend but `keep`; how many.
    pub fn end(&self, mailbox: &Mailbox, keep: Option<&str>) -> usize {
        let map = self.lock();
        let Some(list) = map.get(mailbox) else {
            return 0;
        };
        let mut ended = 0;
        for (_, backend, token) in list {
            if Some(backend.as_str()) != keep && !token.is_cancelled() {
                token.cancel();
                ended += 1;
            }
        }
        ended
    }

    /// Sessions of `mailbox` now.
    pub fn count(&self, mailbox: &Mailbox) -> usize {
        self.lock().get(mailbox).map_or(0, Vec::len)
    }

    /// The mailboxes with sessions now.
    pub fn mailboxes(&self) -> Vec<Mailbox> {
        self.lock().keys().cloned().collect()
    }
}

/// Targets whose shared ban changed, announced by the store and taken by the node's ban
/// applier. Bounded: past [`BanChanges::MAX`] the queue is dropped and a full resync asked
/// for instead, so a flood of bans cannot grow memory.
#[derive(Default)]
pub struct BanChanges {
    queue: Mutex<(Vec<String>, bool)>,
    wake: tokio::sync::Notify,
}

impl BanChanges {
    pub const MAX: usize = 10_000;

    pub fn push(&self, target: &str) {
        {
            let mut q = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if q.0.len() < Self::MAX {
                q.0.push(target.to_owned());
            } else {
                q.0.clear();
                q.1 = true;
            }
        }
        self.wake.notify_one();
    }

    /// Every ban must be read again (after missed notifications).
    pub fn resync(&self) {
        {
            let mut q = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            q.0.clear();
            q.1 = true;
        }
        self.wake.notify_one();
    }

    /// Waits for changes, then takes them: `(targets, resync_all)`.
    pub async fn next(&self) -> (Vec<String>, bool) {
        loop {
            {
                let mut q = self
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if q.1 || !q.0.is_empty() {
                    return std::mem::take(&mut *q);
                }
            }
            self.wake.notified().await;
        }
    }
}

/// Mailboxes whose sessions are to be checked against their owner, and whether every
/// mailbox with sessions is. A set: a mailbox is queued once however often it changes, and
/// only mailboxes with sessions are queued, so it is bounded by the sessions.
#[derive(Default)]
pub struct SessionChecks {
    queue: Mutex<(std::collections::HashSet<Mailbox>, bool)>,
    wake: tokio::sync::Notify,
    /// Set when the directory is dropped: the checking task ends.
    closed: AtomicBool,
}

impl SessionChecks {
    pub fn push(&self, mailbox: Mailbox) {
        self.lock().0.insert(mailbox);
        self.wake.notify_one();
    }

    /// Every mailbox with sessions (after changes may have gone unheard).
    pub fn all(&self) {
        self.lock().1 = true;
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (std::collections::HashSet<Mailbox>, bool)> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for checks, then takes them: `(mailboxes, all)`; `None` once the directory
    /// is gone.
    async fn next(&self) -> Option<(Vec<Mailbox>, bool)> {
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return None;
            }
            {
                let mut q = self.lock();
                if q.1 || !q.0.is_empty() {
                    let all = std::mem::take(&mut q.1);
                    return Some((q.0.drain().collect(), all));
                }
            }
            self.wake.notified().await;
        }
    }
}

/// Cache counters for the metrics.
#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Owners dropped because another node changed them (PostgreSQL notifications).
    pub notifications: AtomicU64,
    /// Whether change notifications are being heard (shared stores only).
    pub listening: AtomicBool,
}

impl<S: MailboxDirectory> Directory<S> {
    pub fn new(store: S, normalizer: Normalizer, cache_entries: NonZeroUsize) -> Self {
        Self {
            store,
            normalizer,
            cache: Mutex::new(LruCache::new(cache_entries)),
            generation: AtomicU64::new(0),
            lease_until: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            stats: CacheStats::default(),
            blocklist_changed: tokio::sync::Notify::new(),
            ban_changes: BanChanges::default(),
            backends_changed: tokio::sync::Notify::new(),
            live: LiveSessions::default(),
            session_checks: std::sync::Arc::default(),
        }
    }

    /// The sessions spliced to backends now, by mailbox.
    pub fn live_sessions(&self) -> &LiveSessions {
        &self.live
    }

    /// The owner of `mailbox`: the cached one while the cache may be served, else the
    /// store's. No lookup is counted.
    pub async fn owner_now(&self, mailbox: &Mailbox) -> Result<Option<String>, DirectoryError> {
        if self.cache_usable()
            && let Some(owner) = self.lock().peek(mailbox).cloned()
        {
            return Ok(Some(owner));
        }
        self.store.owner_of(mailbox).await
    }

    /// The mailboxes whose sessions are to be checked against their owner (another node
    /// changed it), worked through by [`check_sessions`](Self::check_sessions).
    pub fn session_checks(&self) -> &SessionChecks {
        &self.session_checks
    }

    /// Ends the sessions of `mailbox` that are not on its owner. Deleted: the sessions
    /// stay, as a local delete leaves them.
    pub async fn end_sessions_off_owner(&self, mailbox: &Mailbox) -> Result<(), DirectoryError> {
        if self.live.count(mailbox) == 0 {
            return Ok(());
        }
        let Some(owner) = self.store.owner_of(mailbox).await? else {
            return Ok(());
        };
        let ended = self.live.end(mailbox, Some(&owner));
        if ended > 0 {
            tracing::info!(%mailbox, %owner, sessions = ended, "sessions on a former owner ended");
        }
        Ok(())
    }

    /// One task per node, while the directory lives: ends the sessions on former owners
    /// of the mailboxes queued in [`session_checks`](Self::session_checks), one lookup at
    /// a time (a burst of changes does not flood the store), retrying those whose lookup
    /// failed.
    pub async fn check_sessions(directory: std::sync::Weak<Self>) {
        let Some(checks) = directory
            .upgrade()
            .map(|d| std::sync::Arc::clone(&d.session_checks))
        else {
            return;
        };
        while let Some((mut mailboxes, all)) = checks.next().await {
            let Some(this) = directory.upgrade() else {
                return;
            };
            if all {
                mailboxes.extend(this.live.mailboxes());
            }
            let mut failed = Vec::new();
            for mailbox in mailboxes {
                if let Err(error) = this.end_sessions_off_owner(&mailbox).await {
                    tracing::warn!(%mailbox, %error, "owner not read: its sessions are checked again");
                    failed.push(mailbox);
                }
            }
            drop(this);
            if !failed.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for mailbox in failed {
                    checks.push(mailbox);
                }
            }
        }
    }

    /// Woken (one permit kept) when the stored backends changed, on a shared store.
    pub fn backends_changed(&self) -> &tokio::sync::Notify {
        &self.backends_changed
    }

    /// Shared bans changed in the store (PostgreSQL).
    pub fn ban_changes(&self) -> &BanChanges {
        &self.ban_changes
    }

    /// Woken (one permit kept) when the stored blocklist changed, on a shared store.
    pub fn blocklist_changed(&self) -> &tokio::sync::Notify {
        &self.blocklist_changed
    }

    /// `None`: the cache is coherent (every change is heard) and serves without limit.
    /// `Some(grace)`: changes may be missed from now on; what is cached is served for at
    /// most `grace` more, nothing new is cached, and after `grace` every lookup asks the
    /// store. An existing deadline is never extended.
    pub fn cache_lease(&self, grace: Option<Duration>) {
        match grace {
            None => self.lease_until.store(u64::MAX, Ordering::Release),
            Some(grace) => {
                let until = self.now_ms().saturating_add(grace.as_millis() as u64);
                self.lease_until.fetch_min(until, Ordering::AcqRel);
            }
        }
    }

    /// Whether cached owners are served now.
    pub fn cache_usable(&self) -> bool {
        let until = self.lease_until.load(Ordering::Acquire);
        until == u64::MAX || self.now_ms() < until
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    pub fn cache_stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Where a delivery to `address` goes: its owner, auto-assigning it first where the
    /// domain's policy says so.
    pub async fn route(
        &self,
        address: &str,
    ) -> Result<Result<Route, AddressError>, DirectoryError> {
        self.resolve(address, Provision::Assign).await
    }

    /// Where a login goes: like [`route`](Self::route), but an unassigned mailbox of an
    /// auto-provisioning domain yields [`Route::Candidate`] and stays unassigned until
    /// [`confirm`](Self::confirm).
    pub async fn route_login(
        &self,
        login: &str,
    ) -> Result<Result<Route, AddressError>, DirectoryError> {
        self.resolve(login, Provision::Candidate).await
    }

    /// Assigns `mailbox` to `backend` after that backend accepted a login for it. False when
    /// a concurrent assignment chose another backend (the session must not continue there).
    pub async fn confirm(&self, mailbox: &Mailbox, backend: &str) -> Result<bool, DirectoryError> {
        let generation = self.generation();
        let owner = self.store.assign_to(mailbox, backend).await?;
        let agreed = owner == backend;
        self.remember(mailbox, owner, generation);
        Ok(agreed)
    }

    /// Removes `mailbox` from the directory and the cache; false when it did not exist. Its
    /// next delivery or login is routed by its domain's policy again.
    pub async fn delete(&self, mailbox: &Mailbox) -> Result<bool, DirectoryError> {
        let deleted = self.store.delete_mailbox(mailbox).await?;
        self.invalidate(mailbox);
        Ok(deleted)
    }

    /// Moves `mailbox` to `backend` (see [`MailboxDirectory::reassign`]) and drops its cached
    /// owner; returns the previous owner, `None` when the mailbox does not exist.
    pub async fn reassign(
        &self,
        mailbox: &Mailbox,
        backend: &str,
    ) -> Result<Option<String>, DirectoryError> {
        let previous = self.store.reassign(mailbox, backend).await;
        // Invalidate even on error: a failed commit leaves the owner unknown to us.
        self.invalidate(mailbox);
        if previous.is_ok() {
            self.live.end(mailbox, Some(backend));
        }
        previous
    }

    /// [`MailboxDirectory::reassign_from`], dropping the cached owner and ending the
    /// sessions on other backends when it moved.
    pub async fn reassign_from(
        &self,
        mailbox: &Mailbox,
        from: &str,
        to: &str,
    ) -> Result<bool, DirectoryError> {
        let moved = self.store.reassign_from(mailbox, from, to).await;
        self.invalidate(mailbox);
        if matches!(moved, Ok(true)) {
            self.live.end(mailbox, Some(to));
        }
        moved
    }

    async fn resolve(
        &self,
        input: &str,
        provision: Provision,
    ) -> Result<Result<Route, AddressError>, DirectoryError> {
        let normalized = match self.normalizer.normalize(input) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(backend) = self.cached(&normalized.mailbox) {
            return Ok(Ok(Route::Owner {
                mailbox: normalized,
                backend,
            }));
        }
        let generation = self.generation();
        if let Some(backend) = self.store.owner_of(&normalized.mailbox).await? {
            self.remember(&normalized.mailbox, backend.clone(), generation);
            return Ok(Ok(Route::Owner {
                mailbox: normalized,
                backend,
            }));
        }
        let route = match (
            self.store
                .domain_policy(normalized.mailbox.domain())
                .await?,
            provision,
        ) {
            (None, _) => Route::ForeignDomain(normalized),
            (Some(DomainPolicy::Reject), _) => Route::UnknownMailbox(normalized),
            (Some(DomainPolicy::AutoProvision), Provision::Candidate) => {
                let backend = self.store.candidate().await?;
                Route::Candidate {
                    mailbox: normalized,
                    backend,
                }
            }
            (Some(DomainPolicy::AutoProvision), Provision::Assign) => {
                let backend = self.store.assign(&normalized.mailbox).await?;
                self.remember(&normalized.mailbox, backend.clone(), generation);
                Route::Owner {
                    mailbox: normalized,
                    backend,
                }
            }
        };
        Ok(Ok(route))
    }

    /// Drops a cached owner: call after moving or deleting a mailbox.
    pub fn invalidate(&self, mailbox: &Mailbox) {
        let mut cache = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        cache.pop(mailbox);
    }

    /// Drops every cached owner (e.g. after a bulk import).
    pub fn invalidate_all(&self) {
        let mut cache = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        cache.clear();
    }

    /// Read before asking the store, passed to [`remember`](Self::remember) after.
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches an owner read from the store, unless an invalidation ran since `generation`.
    fn remember(&self, mailbox: &Mailbox, owner: String, generation: u64) {
        let mut cache = self.lock();
        // Nothing new is cached while changes may go unheard.
        let coherent = self.lease_until.load(Ordering::Acquire) == u64::MAX;
        if coherent && self.generation.load(Ordering::Acquire) == generation {
            cache.put(mailbox.clone(), owner);
        }
    }

    fn cached(&self, mailbox: &Mailbox) -> Option<String> {
        use Ordering::Relaxed;
        let hit = if self.cache_usable() {
            self.lock().get(mailbox).cloned()
        } else {
            None
        };
        let counter = if hit.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Relaxed);
        hit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Mailbox, String>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
