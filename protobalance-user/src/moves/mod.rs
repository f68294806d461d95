//! Moving a mailbox to another backend with no downtime and no mail lost or duplicated.
//!
//! The copy runs over IMAP with the master user on both backends (`[moves]`): every
//! selectable folder is created on the new backend and every message appended there with
//! its flags and internal date. Then:
//!
//! 1. **Copy** everything the old backend has (pass 1, while mail keeps arriving there).
//! 2. **Switch** the directory entry in one transaction. Deliveries and logins from then on
//!    go to the new backend (other nodes hear it through the directory's notification);
//!    POP3/IMAP sessions still spliced to the old backend are ended (on every node), so no
//!    client keeps changing the old copy.
//! 3. **Settle**: passes copy what still reaches the old backend (a delivery routed just
//!    before the switch) until one finds nothing new and `settle_seconds` have passed
//!    since the switch. Then what clients changed on the old copy while it was copied is
//!    carried over: a copy whose original was expunged is expunged, changed flags are set
//!    (the copies' new UIDs come from APPENDUID, RFC 4315).
//! 4. **Delete** from the old backend exactly the messages that were copied (`UID STORE
//!    \Deleted` + `UID EXPUNGE`), when `delete_old` is set. A message that reached the old
//!    backend after the last pass stays there rather than being lost.
//!
//! Each message is copied once: a pass skips the UIDs (per folder and UIDVALIDITY) an
//! earlier pass copied.
//!
//! A move is recorded in the directory (`begin_move`), which makes it exclusive across
//! nodes; the run keeps a heartbeat on the record and writes each batch's copies to it
//! ([`Journal`]). A run that stops (node killed, backend failure) leaves the record; once
//! its heartbeat is older than `resume_after_seconds`, [`Mover::resume_stalled`] on any node
//! takes it over and finishes it: the directory's owner says whether it had switched, the
//! recorded copies are not made again, and copies appended but not yet recorded are
//! recognised on the new backend ([`adopt_unrecorded`]). UIDs on the new backend are new (IMAP clients resynchronise;
//! POP3 clients that leave mail on the server may fetch it once more).

pub mod imap;
pub mod jobs;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::{IntCounterVec, Opts, Registry};

use self::imap::{ImapClient, ImapError, append_uid, fetched, list_entry, quote, uid_validity};
use crate::{
    backend::Service,
    config::MovesConfig,
    directory::{DirectoryError, Mailbox, MailboxDirectory as _, MoveCopy, MoveRecord, Store},
    proxy::ProxyContext,
    secret::Secret,
};

/// Deadline of one IMAP exchange (a large message's FETCH or APPEND included).
const IMAP_TIMEOUT: Duration = Duration::from_secs(120);
/// Messages fetched per UID FETCH during a pass, and the most bytes of them held at once.
const FETCH_BATCH: usize = 50;
const BATCH_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("moves are not configured: set [moves] master_user and master_password_file")]
    NotConfigured,
    #[error("no mailbox {0} in the directory")]
    NoSuchMailbox(String),
    #[error("{mailbox} is on {backend} already")]
    AlreadyThere { mailbox: String, backend: String },
    #[error(
        "{0} is being moved already (by this node or another; a move whose run stopped is \
         finished automatically once moves.resume_after_seconds pass without its heartbeat)"
    )]
    Busy(String),
    #[error("the move stopped unexpectedly: {0}")]
    Internal(String),
    #[error(
        "{mailbox} is no longer on {from} (deleted or moved meanwhile): not switched, nothing \
         deleted; the copies made on {to} stay there"
    )]
    OwnerChanged {
        mailbox: String,
        from: String,
        to: String,
    },
    #[error(
        "the move of {0} was taken over by another run: this node could not record its \
         heartbeat for moves.resume_after_seconds"
    )]
    TakenOver(String),
    #[error(
        "the move of {0} stopped: its lease in the directory could not be renewed for half \
         of moves.resume_after_seconds; it is resumed once the lease ends"
    )]
    LeaseLost(String),
    #[error("no backend `{0}` in the pool")]
    UnknownBackend(String),
    #[error("backend `{backend}`: {source}")]
    Connect {
        backend: String,
        source: crate::backend::ConnectError,
    },
    #[error("backend `{backend}`: {source}")]
    Imap { backend: String, source: ImapError },
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("reading moves.master_password_file: {0}")]
    Password(std::io::Error),
    #[error(
        "backend `{backend}` holds {messages} messages for {mailbox} already (left by an earlier \
         move that failed, or kept with delete_old = false): remove them there, or move elsewhere"
    )]
    TargetNotEmpty {
        backend: String,
        mailbox: String,
        messages: u64,
    },
}

impl MoveError {
    /// The move could not be done as asked and nothing was touched (or what was, the
    /// error says): its record ends, nothing resumes it.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::NotConfigured
                | Self::NoSuchMailbox(_)
                | Self::AlreadyThere { .. }
                | Self::TargetNotEmpty { .. }
                | Self::Busy(_)
                | Self::OwnerChanged { .. }
                | Self::UnknownBackend(_)
        )
    }
}

/// What a move did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveReport {
    pub mailbox: String,
    pub from: String,
    pub to: String,
    pub folders: usize,
    /// Messages copied before the switch, and after it (settle passes).
    pub copied_before: u64,
    pub copied_after: u64,
    /// Messages deleted from the old backend.
    pub deleted: u64,
    /// Copies removed from the new backend because a client deleted the original on the
    /// old one during the copy; copies whose flags were brought up to date.
    pub expunged_on_new: u64,
    pub flags_synced: u64,
    pub millis: u64,
}

pub struct Mover {
    ctx: Arc<ProxyContext>,
    config: MovesConfig,
    /// This node's name in move records (its runs add a token of their own).
    node: String,
    runs: std::sync::atomic::AtomicU64,
    /// Mailboxes being moved now by this node (the directory's record makes a move
    /// exclusive across nodes too).
    moving: std::sync::Mutex<std::collections::HashSet<Mailbox>>,
    jobs: jobs::Jobs,
    moves: IntCounterVec,
    messages: IntCounterVec,
}

/// A folder's copy state: the UIDVALIDITY seen, the UIDs copied, and for each copy its
/// UID on the new backend and the flags it was copied with.
#[derive(Default)]
struct Folder {
    validity: Option<u32>,
    copied: BTreeSet<u32>,
    copies: BTreeMap<u32, (u32, Vec<String>)>,
}

/// How a run began: asked for now, or taking over a recorded move whose run stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    Fresh,
    Resumed,
}

/// Where a run records what it copied, and its lease: the directory's move record.
struct Journal<'a> {
    directory: &'a crate::directory::Directory<Store>,
    mailbox: &'a Mailbox,
    holder: &'a str,
    /// How long each renewal holds the move (`resume_after_seconds`).
    lease: Duration,
    /// When the lease was last renewed (Unix ms).
    renewed: std::sync::atomic::AtomicI64,
}

impl Journal<'_> {
    /// Records `copies` (after `forget`ting a recreated folder) and renews the lease;
    /// [`MoveError::TakenOver`] when the move is no longer this run's.
    async fn record(&self, forget: Option<&str>, copies: &[MoveCopy]) -> Result<(), MoveError> {
        let now = unix_ms();
        let expires = now.saturating_add(millis(self.lease));
        let ours = self
            .directory
            .store()
            .move_progress(self.mailbox, self.holder, expires, forget, copies)
            .await?;
        if !ours {
            return Err(MoveError::TakenOver(self.mailbox.to_string()));
        }
        self.renewed
            .store(now, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Renews the lease before a step that changes a backend: a run that cannot (the
    /// directory unreachable, or the move taken over) does not take the step.
    async fn fence(&self) -> Result<(), MoveError> {
        self.record(None, &[]).await
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Now, in Unix milliseconds (move leases and their API).
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Mover {
    pub fn new(
        ctx: Arc<ProxyContext>,
        config: MovesConfig,
        node: String,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let moves = IntCounterVec::new(
            Opts::new(
                "protobalance_mailbox_moves_total",
                "Mailbox moves by result (moved; refused: nothing touched; failed: resumed \
                 later; resumed: taken over after their run stopped)",
            ),
            &["result"],
        )?;
        let messages = IntCounterVec::new(
            Opts::new(
                "protobalance_mailbox_move_messages_total",
                "Messages handled by mailbox moves (copied, deleted from the old backend)",
            ),
            &["action"],
        )?;
        registry.register(Box::new(moves.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        Ok(Self {
            ctx,
            config,
            node,
            runs: std::sync::atomic::AtomicU64::new(0),
            moving: std::sync::Mutex::default(),
            jobs: jobs::Jobs::default(),
            moves,
            messages,
        })
    }

    /// A name for one run's hold on a move record: unique across nodes and restarts.
    fn holder(&self) -> String {
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        format!("{}#{}.{}.{run}", self.node, std::process::id(), unix_ms())
    }

    /// Moves `mailbox` to backend `to` (see the module comment).
    pub async fn move_mailbox(&self, mailbox: &Mailbox, to: &str) -> Result<MoveReport, MoveError> {
        self.move_mailbox_with(mailbox, to, &jobs::MoveProgress::default())
            .await
    }

    /// [`move_mailbox`](Self::move_mailbox), telling `progress` how it goes.
    pub async fn move_mailbox_with(
        &self,
        mailbox: &Mailbox,
        to: &str,
        progress: &jobs::MoveProgress,
    ) -> Result<MoveReport, MoveError> {
        let result = match self.claim(mailbox) {
            Some(_claim) => self.begin(mailbox, to, progress).await,
            None => Err(MoveError::Busy(mailbox.to_string())),
        };
        self.count(mailbox, to, &result);
        result
    }

    /// Finishes the recorded move `record`, which `holder` took over from a run that
    /// stopped.
    async fn resume(
        &self,
        mailbox: &Mailbox,
        record: &MoveRecord,
        holder: &str,
        progress: &jobs::MoveProgress,
    ) -> Result<MoveReport, MoveError> {
        self.moves.with_label_values(&["resumed"]).inc();
        let result = match self.claim(mailbox) {
            Some(_claim) => {
                self.held(mailbox, record, holder, Start::Resumed, progress)
                    .await
            }
            None => Err(MoveError::Busy(mailbox.to_string())),
        };
        self.count(mailbox, &record.to, &result);
        result
    }

    fn count(&self, mailbox: &Mailbox, to: &str, result: &Result<MoveReport, MoveError>) {
        let label = match result {
            Ok(report) => {
                tracing::info!(
                    %mailbox, from = %report.from, %to, folders = report.folders,
                    copied_before = report.copied_before, copied_after = report.copied_after,
                    deleted = report.deleted, ms = report.millis, "mailbox moved"
                );
                "moved"
            }
            Err(error) if error.is_refusal() => {
                tracing::info!(%mailbox, %to, %error, "mailbox move refused");
                "refused"
            }
            Err(error) => {
                tracing::error!(
                    %mailbox, %to, %error,
                    resume_after_s = self.config.resume_after_seconds,
                    "mailbox move failed: it is resumed once its record is stale"
                );
                "failed"
            }
        };
        self.moves.with_label_values(&[label]).inc();
    }

    /// Whether `mailbox` is owned by `to` now (unknown counts as yes: the caller keeps
    /// the move's record rather than strand mail).
    async fn switched(&self, mailbox: &Mailbox, to: &str) -> bool {
        match self.ctx.directory.store().owner_of(mailbox).await {
            Ok(owner) => owner.as_deref() == Some(to),
            Err(_) => true,
        }
    }

    fn is_moving(&self, mailbox: &Mailbox) -> bool {
        self.moving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(mailbox)
    }

    /// Marks `mailbox` as being moved until the claim drops; `None` when it is already.
    fn claim(&self, mailbox: &Mailbox) -> Option<Claim<'_>> {
        let mut moving = self
            .moving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        moving.insert(mailbox.clone()).then(|| Claim {
            mover: self,
            mailbox: mailbox.clone(),
        })
    }

    /// Checks a move asked for now and records it in the directory (exclusive across
    /// nodes), then runs it.
    async fn begin(
        &self,
        mailbox: &Mailbox,
        to: &str,
        progress: &jobs::MoveProgress,
    ) -> Result<MoveReport, MoveError> {
        if !self.config.enabled() {
            return Err(MoveError::NotConfigured);
        }
        let store = self.ctx.directory.store();
        let from = store
            .owner_of(mailbox)
            .await?
            .ok_or_else(|| MoveError::NoSuchMailbox(mailbox.to_string()))?;
        if from == to {
            return Err(MoveError::AlreadyThere {
                mailbox: mailbox.to_string(),
                backend: from,
            });
        }
        if !self.ctx.pool.contains(to) {
            return Err(MoveError::UnknownBackend(to.to_owned()));
        }
        // Copying onto messages already there would double them. Checked before the move
        // is recorded: whatever a run of this move finds on the target later (before the
        // switch) is its own copies.
        let password = Secret::new(self.config.password().map_err(MoveError::Password)?);
        let mut target = self.login(to, mailbox, &password).await?;
        let present = message_count(&mut target)
            .await
            .map_err(Sides { from: &from, to }.on_new())?;
        target.logout().await;
        if present > 0 {
            return Err(MoveError::TargetNotEmpty {
                backend: to.to_owned(),
                mailbox: mailbox.to_string(),
                messages: present,
            });
        }
        let holder = self.holder();
        let now = unix_ms();
        let record = MoveRecord {
            mailbox: mailbox.to_string(),
            from,
            to: to.to_owned(),
            holder: holder.clone(),
            started_ms: now,
            expires_ms: now.saturating_add(millis(self.config.resume_after())),
        };
        if !store.begin_move(&record).await? {
            return Err(MoveError::Busy(mailbox.to_string()));
        }
        self.held(mailbox, &record, &holder, Start::Fresh, progress)
            .await
    }

    /// Runs a recorded move while `holder` holds it. A heartbeat renews the lease every
    /// quarter of `resume_after_seconds`; a run that cannot renew it for half of that, or
    /// that lost the move to another run, stops (before another run may take it over),
    /// and every step that changes a backend after the copy renews it first. The record
    /// ends with the move, or with a failure that touched nothing; it never ends while the
    /// mailbox is switched to the new backend and unfinished. Otherwise it stays, and the
    /// move is resumed once the lease ends.
    async fn held(
        &self,
        mailbox: &Mailbox,
        record: &MoveRecord,
        holder: &str,
        start: Start,
        progress: &jobs::MoveProgress,
    ) -> Result<MoveReport, MoveError> {
        let lease = self.config.resume_after();
        let journal = Journal {
            directory: &self.ctx.directory,
            mailbox,
            holder,
            lease,
            // The lease written with the record began then, not now.
            renewed: std::sync::atomic::AtomicI64::new(
                record.expires_ms.saturating_sub(millis(lease)),
            ),
        };
        let heartbeat = async {
            let every = (lease / 4).max(Duration::from_millis(500));
            loop {
                tokio::time::sleep(every).await;
                match tokio::time::timeout(every, journal.record(None, &[])).await {
                    Ok(Ok(())) => {}
                    Ok(Err(MoveError::TakenOver(m))) => return MoveError::TakenOver(m),
                    Ok(Err(error)) => {
                        tracing::warn!(%mailbox, %error, "move lease not renewed");
                    }
                    Err(_) => tracing::warn!(%mailbox, "move lease not renewed in time"),
                }
            }
        };
        // The run stops the moment its lease is half gone since the last renewal (by the
        // heartbeat, a fence or a batch's record), whatever it is doing.
        let watchdog = async {
            loop {
                let deadline = journal
                    .renewed
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .saturating_add(millis(lease) / 2);
                let left = deadline.saturating_sub(unix_ms());
                if left <= 0 {
                    return MoveError::LeaseLost(mailbox.to_string());
                }
                tokio::time::sleep(Duration::from_millis(left.unsigned_abs())).await;
            }
        };
        // Set once the run may change the new backend: a failure before that touched
        // nothing.
        let touched = std::sync::atomic::AtomicBool::new(start == Start::Resumed);
        let result = tokio::select! {
            result = self.run(mailbox, record, start, &journal, &touched, progress) => result,
            lost = heartbeat => Err(lost),
            lost = watchdog => Err(lost),
        };
        let untouched = !touched.load(std::sync::atomic::Ordering::Relaxed);
        let end = match &result {
            Ok(_) => true,
            // Not this run's any more, or not renewable: the record is left to the lease.
            Err(MoveError::TakenOver(_) | MoveError::LeaseLost(_)) => false,
            // A fresh run that did not reach the target: nothing to finish.
            Err(_) if start == Start::Fresh && untouched => true,
            Err(error) => {
                (error.is_refusal() || untouched) && !self.switched(mailbox, &record.to).await
            }
        };
        if end && let Err(error) = self.ctx.directory.store().end_move(mailbox, holder).await {
            tracing::error!(
                %mailbox, %error,
                "move record not ended: it will be resumed, which finds nothing left to do"
            );
        }
        result
    }

    async fn run(
        &self,
        mailbox: &Mailbox,
        record: &MoveRecord,
        start: Start,
        journal: &Journal<'_>,
        touched: &std::sync::atomic::AtomicBool,
        progress: &jobs::MoveProgress,
    ) -> Result<MoveReport, MoveError> {
        if !self.config.enabled() {
            return Err(MoveError::NotConfigured);
        }
        let started = Instant::now();
        let directory = &self.ctx.directory;
        let (from, to) = (record.from.as_str(), record.to.as_str());
        let owner = directory
            .store()
            .owner_of(mailbox)
            .await?
            .ok_or_else(|| MoveError::NoSuchMailbox(mailbox.to_string()))?;
        // A resumed move may have switched already; the directory says.
        let switched_before = owner == to;
        if owner != from && !switched_before {
            return Err(MoveError::OwnerChanged {
                mailbox: mailbox.to_string(),
                from: from.to_owned(),
                to: to.to_owned(),
            });
        }
        for backend in [from, to] {
            if !self.ctx.pool.contains(backend) {
                return Err(MoveError::UnknownBackend(backend.to_owned()));
            }
        }
        let password = Secret::new(self.config.password().map_err(MoveError::Password)?);
        progress.set_phase("connecting");
        let mut old = self.login(from, mailbox, &password).await?;
        let mut new = self.login(to, mailbox, &password).await?;
        let sides = Sides { from, to };
        let mut folders: BTreeMap<String, Folder> = BTreeMap::new();
        // From here on the target may change (the check that it held nothing for the
        // mailbox came before the move was recorded).
        touched.store(true, std::sync::atomic::Ordering::Relaxed);
        if start == Start::Resumed {
            // What the stopped run copied is not copied again, nor are the copies it made
            // but had not recorded yet.
            for copy in directory.store().move_copies(mailbox).await? {
                let folder = folders.entry(copy.folder).or_default();
                folder.validity = Some(copy.validity);
                folder.copied.insert(copy.old_uid);
                if let Some(new_uid) = copy.new_uid {
                    let flags = copy.flags.split_whitespace().map(str::to_owned).collect();
                    folder.copies.insert(copy.old_uid, (new_uid, flags));
                }
            }
            let adopted =
                adopt_unrecorded(&mut old, &mut new, &mut folders, journal, sides).await?;
            tracing::info!(
                %mailbox, recorded = folders.values().map(|f| f.copied.len()).sum::<usize>(),
                adopted, switched = switched_before, "move resumed from its record"
            );
        }
        let total = message_count(&mut old).await.map_err(sides.on_old())?;
        progress
            .total
            .store(total, std::sync::atomic::Ordering::Relaxed);
        progress.set_phase("copying");
        let mut report = MoveReport {
            mailbox: mailbox.to_string(),
            from: from.to_owned(),
            to: to.to_owned(),
            ..MoveReport::default()
        };
        if !switched_before {
            // 1. Copy while mail still arrives at the old backend.
            report.copied_before =
                copy_pass(&mut old, &mut new, &mut folders, journal, sides, progress).await?;
            // 2. Switch.
            progress.set_phase("switching");
            journal.fence().await?;
            if !directory.reassign_from(mailbox, from, to).await?
                && !self.switched(mailbox, to).await
            {
                return Err(MoveError::OwnerChanged {
                    mailbox: mailbox.to_string(),
                    from: from.to_owned(),
                    to: to.to_owned(),
                });
            }
        }
        let switched = Instant::now();
        progress.set_phase("settling");
        // 3. Settle: what was routed to the old backend before the switch arrives there.
        let settle = Duration::from_secs(self.config.settle_seconds);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let copied =
                copy_pass(&mut old, &mut new, &mut folders, journal, sides, progress).await?;
            report.copied_after += copied;
            if copied == 0 && switched.elapsed() >= settle {
                break;
            }
        }
        // What clients changed on the old copy while it was copied (they could until the
        // switch ended their sessions) is carried over: deletions and flags. A run resumed
        // after the switch cannot tell a client's expunge from the stopped run's own
        // deleting, so it carries over only folders deleted altogether (a move never
        // deletes a folder).
        progress.set_phase("reconciling");
        journal.fence().await?;
        let whole = !switched_before;
        // Per folder, the originals whose copies were expunged: never deleted below (gone
        // already, or — should a FETCH answer have been misread — kept rather than lost).
        let mut expunged: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
        for (name, folder) in &folders {
            let (gone, flagged) = reconcile(&mut old, &mut new, name, folder, sides, whole).await?;
            report.expunged_on_new += gone.len() as u64;
            report.flags_synced += flagged;
            expunged.insert(name, gone);
        }
        // 4. Delete what was copied from the old backend.
        if self.config.delete_old {
            progress.set_phase("deleting");
            for (name, folder) in &folders {
                let keep = expunged.get(name.as_str());
                if folder
                    .copied
                    .iter()
                    .all(|uid| keep.is_some_and(|k| k.contains(uid)))
                {
                    continue;
                }
                journal.fence().await?;
                report.deleted += delete_copied(&mut old, name, folder, keep)
                    .await
                    .map_err(sides.on_old())?;
            }
        }
        report.folders = folders.len();
        old.logout().await;
        new.logout().await;
        self.messages
            .with_label_values(&["copied"])
            .inc_by(report.copied_before + report.copied_after);
        self.messages
            .with_label_values(&["deleted"])
            .inc_by(report.deleted);
        report.millis = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// An IMAP session on `backend` as the master user for `mailbox`.
    async fn login(
        &self,
        backend: &str,
        mailbox: &Mailbox,
        password: &Secret<String>,
    ) -> Result<ImapClient, MoveError> {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let stream = self
            .ctx
            .pool
            .connect(backend, Service::Imap, local, local)
            .await
            .map_err(|source| MoveError::Connect {
                backend: backend.to_owned(),
                source,
            })?;
        let imap = |source| MoveError::Imap {
            backend: backend.to_owned(),
            source,
        };
        let mut client = ImapClient::start(stream, IMAP_TIMEOUT)
            .await
            .map_err(imap)?;
        let user = format!(
            "{mailbox}{}{}",
            self.config.separator, self.config.master_user
        );
        client
            .run(
                &format!("LOGIN {} {}", quote(&user), quote(password.expose())),
                &[],
            )
            .await
            .map_err(imap)?;
        Ok(client)
    }
}

struct Claim<'a> {
    mover: &'a Mover,
    mailbox: Mailbox,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.mover
            .moving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.mailbox);
    }
}

/// The two backends of a move, for naming the one whose IMAP exchange failed.
#[derive(Clone, Copy)]
struct Sides<'a> {
    from: &'a str,
    to: &'a str,
}

impl Sides<'_> {
    fn on_old(self) -> impl Fn(ImapError) -> MoveError {
        let backend = self.from.to_owned();
        move |source| MoveError::Imap {
            backend: backend.clone(),
            source,
        }
    }

    fn on_new(self) -> impl Fn(ImapError) -> MoveError {
        let backend = self.to.to_owned();
        move |source| MoveError::Imap {
            backend: backend.clone(),
            source,
        }
    }
}

/// A message's UID, INTERNALDATE, RFC822.SIZE and flags.
type Envelope = (u32, Option<String>, u64, Vec<String>);

/// The [`Envelope`]s of the selected folder's messages from UID `first` on (`first:*`
/// names the last message even when its UID is lower: filtered here).
async fn envelopes(client: &mut ImapClient, first: u32) -> Result<Vec<Envelope>, ImapError> {
    Ok(client
        .run(
            &format!("UID FETCH {first}:* (UID FLAGS INTERNALDATE RFC822.SIZE)"),
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| {
            let f = fetched(r)?;
            Some((
                f.uid,
                f.internal_date,
                imap::message_size(r).unwrap_or(0),
                f.flags,
            ))
        })
        .filter(|(uid, ..)| *uid >= first)
        .collect())
}

/// The body of message `uid` in the selected folder.
async fn body_of(client: &mut ImapClient, uid: u32) -> Result<Option<Vec<u8>>, ImapError> {
    Ok(client
        .run(&format!("UID FETCH {uid} (UID BODY.PEEK[])"), &[])
        .await?
        .iter()
        .filter_map(fetched)
        .find(|f| f.uid == uid)
        .and_then(|f| f.body))
}

/// A resumed move's copies that the stopped run made but had not recorded (it stopped
/// between an APPEND and the batch's record): on the new backend they are the messages
/// after the last recorded copy; one whose internal date, size and bytes equal an
/// unrecorded original is that original's copy, and is recorded as such instead of being
/// copied a second time. Returns how many were adopted.
async fn adopt_unrecorded(
    old: &mut ImapClient,
    new: &mut ImapClient,
    folders: &mut BTreeMap<String, Folder>,
    journal: &Journal<'_>,
    sides: Sides<'_>,
) -> Result<u64, MoveError> {
    let listed = old
        .run("LIST \"\" \"*\"", &[])
        .await
        .map_err(sides.on_old())?;
    let names: Vec<String> = listed
        .iter()
        .filter_map(list_entry)
        .map(|(name, _)| name)
        .collect();
    let mut adopted = 0;
    for name in names {
        let folder = folders.entry(name.clone()).or_default();
        let after = folder
            .copies
            .values()
            .map(|(uid, _)| *uid)
            .max()
            .unwrap_or(0);
        match new.run(&format!("EXAMINE {}", quote(&name)), &[]).await {
            Ok(_) => {}
            Err(refused @ ImapError::Refused { .. }) => {
                if is_listed(new, &name).await.map_err(sides.on_new())? {
                    // There but not examinable now: retried rather than copied twice.
                    return Err(sides.on_new()(refused));
                }
                // Not created on the new backend yet: nothing there to adopt.
                continue;
            }
            Err(e) => return Err(sides.on_new()(e)),
        }
        // A copy recorded at the last possible UID leaves nothing after it to adopt.
        let Some(first) = after.checked_add(1) else {
            new.run("UNSELECT", &[]).await.map_err(sides.on_new())?;
            continue;
        };
        let fresh = envelopes(new, first).await.map_err(sides.on_new())?;
        if fresh.is_empty() {
            new.run("UNSELECT", &[]).await.map_err(sides.on_new())?;
            continue;
        }
        let selected = old
            .run(&format!("EXAMINE {}", quote(&name)), &[])
            .await
            .map_err(sides.on_old())?;
        let validity = uid_validity(&selected);
        if folder.validity.is_some() && folder.validity != validity {
            // Recreated on the old backend: the copy pass starts this folder over.
            old.run("UNSELECT", &[]).await.map_err(sides.on_old())?;
            new.run("UNSELECT", &[]).await.map_err(sides.on_new())?;
            continue;
        }
        folder.validity = validity;
        let mut originals: Vec<Envelope> = envelopes(old, 1)
            .await
            .map_err(sides.on_old())?
            .into_iter()
            .filter(|(uid, ..)| !folder.copied.contains(uid))
            .collect();
        let mut found = Vec::new();
        for (new_uid, date, size, copy_flags) in fresh {
            let Some(i) = originals
                .iter()
                .position(|(_, d, s, _)| *d == date && *s == size)
            else {
                continue;
            };
            let old_uid = originals[i].0;
            let copy = body_of(new, new_uid).await.map_err(sides.on_new())?;
            let original = body_of(old, old_uid).await.map_err(sides.on_old())?;
            if copy.is_some() && copy == original {
                // Recorded with the flags the copy has: reconcile carries over what
                // changed on the original since.
                originals.remove(i);
                let flags = copy_flags;
                folder.copied.insert(old_uid);
                found.push(MoveCopy {
                    folder: name.clone(),
                    validity: validity.unwrap_or(0),
                    old_uid,
                    new_uid: Some(new_uid),
                    flags: flags.join(" "),
                });
                folder.copies.insert(old_uid, (new_uid, flags));
            }
        }
        old.run("UNSELECT", &[]).await.map_err(sides.on_old())?;
        new.run("UNSELECT", &[]).await.map_err(sides.on_new())?;
        adopted += found.len() as u64;
        journal.record(None, &found).await?;
    }
    Ok(adopted)
}

/// Copies every message the old backend has that no earlier pass copied; how many. Each
/// batch's copies are recorded in the move's journal before the next batch.
async fn copy_pass(
    old: &mut ImapClient,
    new: &mut ImapClient,
    folders: &mut BTreeMap<String, Folder>,
    journal: &Journal<'_>,
    sides: Sides<'_>,
    progress: &jobs::MoveProgress,
) -> Result<u64, MoveError> {
    let (o, n) = (sides.on_old(), sides.on_new());
    let listed = old.run("LIST \"\" \"*\"", &[]).await.map_err(&o)?;
    let names: Vec<String> = listed
        .iter()
        .filter_map(list_entry)
        .map(|(name, _)| name)
        .collect();
    let mut copied = 0;
    for name in names {
        let folder = folders.entry(name.clone()).or_default();
        if !name.eq_ignore_ascii_case("INBOX") && folder.validity.is_none() {
            match new.run(&format!("CREATE {}", quote(&name)), &[]).await {
                Ok(_) => {}
                // It exists already (a second move, or created by the client meanwhile).
                Err(ImapError::Refused { .. }) => {}
                Err(e) => return Err(n(e)),
            }
        }
        let selected = match old.run(&format!("EXAMINE {}", quote(&name)), &[]).await {
            Ok(selected) => selected,
            Err(refused @ ImapError::Refused { .. }) => {
                if is_listed(old, &name).await.map_err(&o)? {
                    return Err(o(refused));
                }
                // Deleted or renamed by a client since the LIST: the next pass sees the
                // list as it is now.
                continue;
            }
            Err(e) => return Err(o(e)),
        };
        let validity = uid_validity(&selected);
        if folder.validity.is_some() && folder.validity != validity {
            // The folder was recreated on the old backend: its UIDs are new, and the
            // messages copied from the one before are gone (or, after an index rebuild,
            // are these again): their copies go, and the folder is copied afresh.
            let copies: Vec<u32> = folder.copies.values().map(|(uid, _)| *uid).collect();
            if !copies.is_empty() {
                new.run(&format!("SELECT {}", quote(&name)), &[])
                    .await
                    .map_err(&n)?;
                let mut copies = copies;
                copies.sort_unstable();
                expunge_selected(new, copies).await.map_err(&n)?;
                new.run("UNSELECT", &[]).await.map_err(&n)?;
            }
            folder.copied.clear();
            folder.copies.clear();
            journal.record(Some(&name), &[]).await?;
        }
        folder.validity = validity;
        let sizes: Vec<(u32, u64)> = old
            .run("UID FETCH 1:* (UID RFC822.SIZE)", &[])
            .await
            .map_err(&o)?
            .iter()
            .filter_map(|r| Some((fetched(r)?.uid, imap::message_size(r).unwrap_or(0))))
            .filter(|(uid, _)| !folder.copied.contains(uid))
            .collect();
        for batch in batches(&sizes) {
            let set = uid_set(batch.iter().copied());
            let messages = old
                .run(
                    &format!("UID FETCH {set} (UID FLAGS INTERNALDATE BODY.PEEK[])"),
                    &[],
                )
                .await
                .map_err(&o)?;
            let mut recorded = Vec::with_capacity(batch.len());
            for message in messages.iter().filter_map(fetched) {
                let Some(body) = message.body else { continue };
                let flags = message.flags.join(" ");
                let date = message
                    .internal_date
                    .map(|d| format!(" {}", quote(&d)))
                    .unwrap_or_default();
                let append = format!("APPEND {} ({flags}){date} {{{}}}", quote(&name), body.len());
                let (_, done) = match new.run_tagged(&append, &[&body]).await {
                    // The folder is gone on the new backend (a client deleted it there
                    // since it was created): created again, and the APPEND retried once.
                    Err(ImapError::Refused { answer, .. }) if answer.contains("[TRYCREATE]") => {
                        new.run(&format!("CREATE {}", quote(&name)), &[])
                            .await
                            .map_err(&n)?;
                        new.run_tagged(&append, &[&body]).await.map_err(&n)?
                    }
                    other => other.map_err(&n)?,
                };
                let new_uid = append_uid(&done);
                if let Some(uid) = new_uid {
                    folder
                        .copies
                        .insert(message.uid, (uid, message.flags.clone()));
                }
                folder.copied.insert(message.uid);
                recorded.push(MoveCopy {
                    folder: name.clone(),
                    validity: validity.unwrap_or(0),
                    old_uid: message.uid,
                    new_uid,
                    flags,
                });
                copied += 1;
                progress
                    .copied
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            journal.record(None, &recorded).await?;
        }
    }
    Ok(copied)
}

/// Brings the copies in `name` up to date with their originals: a copy whose original is
/// gone (a client expunged it before the switch) is expunged on the new backend; a copy
/// whose original's flags changed since the copy gets those flags. Copies without a known
/// new UID (a server without UIDPLUS) are left as they are. Not `whole`: only a folder
/// gone from the old backend is carried over (its copies expunged). Returns the old UIDs
/// whose copies were expunged, and how many copies got flags.
async fn reconcile(
    old: &mut ImapClient,
    new: &mut ImapClient,
    name: &str,
    folder: &Folder,
    sides: Sides<'_>,
    whole: bool,
) -> Result<(BTreeSet<u32>, u64), MoveError> {
    let (o, n) = (sides.on_old(), sides.on_new());
    if folder.copies.is_empty() {
        return Ok((BTreeSet::new(), 0));
    }
    let now: BTreeMap<u32, Vec<String>> = match old
        .run(&format!("EXAMINE {}", quote(name)), &[])
        .await
    {
        // Only deleted folders (see the caller).
        Ok(_) if !whole => {
            old.run("UNSELECT", &[]).await.map_err(&o)?;
            return Ok((BTreeSet::new(), 0));
        }
        Ok(selected) if uid_validity(&selected) == folder.validity => {
            let now = old
                .run("UID FETCH 1:* (UID FLAGS)", &[])
                .await
                .map_err(&o)?
                .iter()
                .filter_map(fetched)
                .map(|f| (f.uid, f.flags))
                .collect();
            old.run("UNSELECT", &[]).await.map_err(&o)?;
            now
        }
        // Recreated since the copy: the originals copied are gone.
        Ok(_) => {
            old.run("UNSELECT", &[]).await.map_err(&o)?;
            BTreeMap::new()
        }
        Err(refused @ ImapError::Refused { .. }) => {
            if is_listed(old, name).await.map_err(&o)? {
                // There, but not examinable now: a temporary failure, not a deletion.
                return Err(o(refused));
            }
            // Deleted (or renamed) by a client during the copy: so are its copies (a
            // renamed folder was copied under its new name).
            tracing::info!(folder = %name, "folder deleted or renamed on the old backend during the move: its copies are expunged");
            BTreeMap::new()
        }
        Err(e) => return Err(o(e)),
    };
    let mut gone = BTreeMap::new();
    let mut changed = Vec::new();
    for (old_uid, (new_uid, copied_flags)) in &folder.copies {
        match now.get(old_uid) {
            None => {
                gone.insert(*new_uid, *old_uid);
            }
            Some(flags) if !same_flags(flags, copied_flags) => {
                let lower = |f: &[String]| -> BTreeSet<String> {
                    f.iter().map(|x| x.to_ascii_lowercase()).collect()
                };
                let (was, is) = (lower(copied_flags), lower(flags));
                let added: Vec<&String> = flags
                    .iter()
                    .filter(|f| !was.contains(&f.to_ascii_lowercase()))
                    .collect();
                let removed: Vec<&String> = copied_flags
                    .iter()
                    .filter(|f| !is.contains(&f.to_ascii_lowercase()))
                    .collect();
                changed.push((*new_uid, join(&added), join(&removed)));
            }
            Some(_) => {}
        }
    }
    if gone.is_empty() && changed.is_empty() {
        return Ok((BTreeSet::new(), 0));
    }
    new.run(&format!("SELECT {}", quote(name)), &[])
        .await
        .map_err(&n)?;
    // Applied as differences: what a client set on the new copy since the switch stays.
    for (uid, added, removed) in &changed {
        if !added.is_empty() {
            new.run(&format!("UID STORE {uid} +FLAGS.SILENT ({added})"), &[])
                .await
                .map_err(&n)?;
        }
        if !removed.is_empty() {
            new.run(&format!("UID STORE {uid} -FLAGS.SILENT ({removed})"), &[])
                .await
                .map_err(&n)?;
        }
    }
    expunge_selected(new, gone.keys().copied())
        .await
        .map_err(&n)?;
    // UNSELECT, not CLOSE: CLOSE would expunge every message a user marked deleted on
    // the live copy.
    new.run("UNSELECT", &[]).await.map_err(&n)?;
    Ok((gone.into_values().collect(), changed.len() as u64))
}

/// `UID STORE +FLAGS.SILENT (\Deleted)` and `UID EXPUNGE` of exactly `uids` (sorted) in the
/// selected folder, in chunks.
async fn expunge_selected(
    client: &mut ImapClient,
    uids: impl IntoIterator<Item = u32>,
) -> Result<(), ImapError> {
    let uids: Vec<u32> = uids.into_iter().collect();
    for chunk in uids.chunks(UID_CHUNK) {
        let set = uid_set(chunk.iter().copied());
        client
            .run(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"), &[])
            .await?;
        client.run(&format!("UID EXPUNGE {set}"), &[]).await?;
    }
    Ok(())
}

/// Whether `name` is still listed (and selectable) on the server: a refused EXAMINE or
/// SELECT of a listed folder is a temporary failure, not a deletion.
async fn is_listed(client: &mut ImapClient, name: &str) -> Result<bool, ImapError> {
    Ok(client
        .run(&format!("LIST \"\" {}", quote(name)), &[])
        .await?
        .iter()
        .filter_map(list_entry)
        .any(|(listed, _)| listed == name))
}

fn same_flags(a: &[String], b: &[String]) -> bool {
    let set =
        |f: &[String]| -> BTreeSet<String> { f.iter().map(|x| x.to_ascii_lowercase()).collect() };
    set(a) == set(b)
}

/// Messages in every folder of the logged-in mailbox.
async fn message_count(client: &mut ImapClient) -> Result<u64, ImapError> {
    let listed = client.run("LIST \"\" \"*\"", &[]).await?;
    let mut total = 0;
    for (name, _) in listed.iter().filter_map(list_entry) {
        for status in client
            .run(&format!("STATUS {} (MESSAGES)", quote(&name)), &[])
            .await?
        {
            if let Some(n) = status
                .text
                .split("(MESSAGES ")
                .nth(1)
                .and_then(|t| t.split(')').next())
                .and_then(|t| t.trim().parse::<u64>().ok())
            {
                total += n;
            }
        }
    }
    Ok(total)
}

/// Flags and expunges the copied messages of `folder` on the old backend but those in
/// `keep`; how many.
async fn delete_copied(
    old: &mut ImapClient,
    name: &str,
    folder: &Folder,
    keep: Option<&BTreeSet<u32>>,
) -> Result<u64, ImapError> {
    let selected = match old.run(&format!("SELECT {}", quote(name)), &[]).await {
        Ok(selected) => selected,
        Err(refused @ ImapError::Refused { .. }) => {
            if is_listed(old, name).await? {
                // There, but not selectable now: a temporary failure (retried).
                return Err(refused);
            }
            // Deleted or renamed on the old backend: nothing of it to delete there.
            tracing::warn!(folder = %name, "folder gone from the old backend during the move: nothing deleted from it");
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    if uid_validity(&selected) != folder.validity {
        // Recreated since the copy: these UIDs name other messages now. Leave it.
        tracing::warn!(folder = %name, "folder recreated on the old backend during the move: its copy is not deleted");
        old.run("UNSELECT", &[]).await?;
        return Ok(0);
    }
    let uids: Vec<u32> = folder
        .copied
        .iter()
        .copied()
        .filter(|uid| keep.is_none_or(|k| !k.contains(uid)))
        .collect();
    for chunk in uids.chunks(UID_CHUNK) {
        let set = uid_set(chunk.iter().copied());
        old.run(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"), &[])
            .await?;
        // UID EXPUNGE (UIDPLUS): only these, never a message someone else marked deleted
        // (and UNSELECT below rather than CLOSE, for the same reason).
        old.run(&format!("UID EXPUNGE {set}"), &[]).await?;
    }
    old.run("UNSELECT", &[]).await?;
    Ok(uids.len() as u64)
}

/// UIDs per STORE/EXPUNGE command: keeps a set with gaps far below line limits (Dovecot:
/// 64 KiB).
const UID_CHUNK: usize = 500;

/// The UIDs to fetch, in batches of at most [`BATCH_BYTES`] of messages (and at most
/// [`FETCH_BATCH`] messages); a message larger than that is a batch alone.
fn batches(sizes: &[(u32, u64)]) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0u64;
    for &(uid, size) in sizes {
        let full = out
            .last()
            .is_none_or(|b| b.len() >= FETCH_BATCH || bytes + size > BATCH_BYTES);
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(last) = out.last_mut() {
            last.push(uid);
        }
    }
    out
}

fn join(flags: &[&String]) -> String {
    flags
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `1:3,7,9:10` for sorted UIDs.
fn uid_set(uids: impl IntoIterator<Item = u32>) -> String {
    let mut out = String::new();
    let mut run: Option<(u32, u32)> = None;
    let flush = |out: &mut String, (a, b): (u32, u32)| {
        if !out.is_empty() {
            out.push(',');
        }
        if a == b {
            out.push_str(&a.to_string());
        } else {
            out.push_str(&format!("{a}:{b}"));
        }
    };
    for uid in uids {
        run = match run {
            Some((a, b)) if b.checked_add(1) == Some(uid) => Some((a, uid)),
            Some(r) => {
                flush(&mut out, r);
                Some((uid, uid))
            }
            None => Some((uid, uid)),
        };
    }
    if let Some(r) = run {
        flush(&mut out, r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::uid_set;

    #[test]
    fn batches_hold_a_bounded_number_of_bytes() {
        use super::batches;
        let mb = 1024 * 1024;
        assert_eq!(
            batches(&[(1, 10 * mb), (2, 10 * mb), (3, 40 * mb), (4, 1)]),
            vec![vec![1], vec![2], vec![3], vec![4]]
        );
        assert_eq!(batches(&[(1, 1), (2, 1)]), vec![vec![1, 2]]);
        let many: Vec<(u32, u64)> = (1..=120).map(|u| (u, 100)).collect();
        assert_eq!(
            batches(&many).iter().map(Vec::len).collect::<Vec<_>>(),
            [50, 50, 20]
        );
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set([1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        // The largest UID a server may give does not overflow.
        assert_eq!(
            uid_set([u32::MAX - 1, u32::MAX]),
            format!("{}:{}", u32::MAX - 1, u32::MAX)
        );
        assert_eq!(uid_set([u32::MAX, 1]), format!("{},1", u32::MAX));
        assert_eq!(uid_set([5]), "5");
        assert_eq!(uid_set([]), "");
    }
}
