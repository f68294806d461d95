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
//! earlier pass copied. UIDs on the new backend are new (IMAP clients resynchronise;
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
    directory::{DirectoryError, Mailbox, MailboxDirectory as _},
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
    #[error("{0} is being moved already")]
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
    /// Mailboxes being moved now: a second move of one of them is refused.
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

impl Mover {
    pub fn new(
        ctx: Arc<ProxyContext>,
        config: MovesConfig,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let moves = IntCounterVec::new(
            Opts::new(
                "protobalance_mailbox_moves_total",
                "Mailbox moves by result (moved; refused: nothing touched; failed)",
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
            moving: std::sync::Mutex::default(),
            jobs: jobs::Jobs::default(),
            moves,
            messages,
        })
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
            Some(_claim) => self.run(mailbox, to, progress).await,
            None => Err(MoveError::Busy(mailbox.to_string())),
        };
        let label = match &result {
            Ok(report) => {
                tracing::info!(
                    %mailbox, from = %report.from, %to, folders = report.folders,
                    copied_before = report.copied_before, copied_after = report.copied_after,
                    deleted = report.deleted, ms = report.millis, "mailbox moved"
                );
                "moved"
            }
            // The request could not be done as asked: nothing was touched.
            Err(
                error @ (MoveError::NotConfigured
                | MoveError::NoSuchMailbox(_)
                | MoveError::AlreadyThere { .. }
                | MoveError::TargetNotEmpty { .. }
                | MoveError::Busy(_)
                | MoveError::OwnerChanged { .. }
                | MoveError::UnknownBackend(_)),
            ) => {
                tracing::info!(%mailbox, %to, %error, "mailbox move refused");
                "refused"
            }
            Err(error) => {
                tracing::error!(%mailbox, %to, %error, "mailbox move failed");
                "failed"
            }
        };
        self.moves.with_label_values(&[label]).inc();
        result
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

    async fn run(
        &self,
        mailbox: &Mailbox,
        to: &str,
        progress: &jobs::MoveProgress,
    ) -> Result<MoveReport, MoveError> {
        if !self.config.enabled() {
            return Err(MoveError::NotConfigured);
        }
        let started = Instant::now();
        let directory = &self.ctx.directory;
        let from = directory
            .store()
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
        let password = Secret::new(self.config.password().map_err(MoveError::Password)?);
        progress.set_phase("connecting");
        let mut old = self.login(&from, mailbox, &password).await?;
        let mut new = self.login(to, mailbox, &password).await?;
        let imap = |backend: &str| {
            let backend = backend.to_owned();
            move |source| MoveError::Imap { backend, source }
        };
        // Copying onto messages already there would double them.
        let present = message_count(&mut new).await.map_err(imap(to))?;
        if present > 0 {
            return Err(MoveError::TargetNotEmpty {
                backend: to.to_owned(),
                mailbox: mailbox.to_string(),
                messages: present,
            });
        }
        let mut folders: BTreeMap<String, Folder> = BTreeMap::new();
        let total = message_count(&mut old).await.map_err(imap(&from))?;
        progress
            .total
            .store(total, std::sync::atomic::Ordering::Relaxed);
        progress.set_phase("copying");
        let mut report = MoveReport {
            mailbox: mailbox.to_string(),
            from: from.clone(),
            to: to.to_owned(),
            ..MoveReport::default()
        };
        // 1. Copy while mail still arrives at the old backend.
        report.copied_before = copy_pass(&mut old, &mut new, &mut folders, progress)
            .await
            .map_err(|(side, e)| imap(if side == Side::Old { &from } else { to })(e))?;
        // 2. Switch.
        progress.set_phase("switching");
        if !directory.reassign_from(mailbox, &from, to).await? {
            return Err(MoveError::OwnerChanged {
                mailbox: mailbox.to_string(),
                from: from.clone(),
                to: to.to_owned(),
            });
        }
        let switched = Instant::now();
        progress.set_phase("settling");
        // 3. Settle: what was routed to the old backend before the switch arrives there.
        let settle = Duration::from_secs(self.config.settle_seconds);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let copied = copy_pass(&mut old, &mut new, &mut folders, progress)
                .await
                .map_err(|(side, e)| imap(if side == Side::Old { &from } else { to })(e))?;
            report.copied_after += copied;
            if copied == 0 && switched.elapsed() >= settle {
                break;
            }
        }
        // What clients changed on the old copy while it was copied (they could until the
        // switch ended their sessions) is carried over: deletions and flags.
        progress.set_phase("reconciling");
        for (name, folder) in &folders {
            let (expunged, flagged) = reconcile(&mut old, &mut new, name, folder)
                .await
                .map_err(|(side, e)| imap(if side == Side::Old { &from } else { to })(e))?;
            report.expunged_on_new += expunged;
            report.flags_synced += flagged;
        }
        // 4. Delete what was copied from the old backend.
        if self.config.delete_old {
            progress.set_phase("deleting");
            for (name, folder) in &folders {
                if folder.copied.is_empty() {
                    continue;
                }
                report.deleted += delete_copied(&mut old, name, folder)
                    .await
                    .map_err(imap(&from))?;
            }
            // Those a client expunged during the copy were not there to delete.
            report.deleted = report.deleted.saturating_sub(report.expunged_on_new);
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Old,
    New,
}

/// Copies every message the old backend has that no earlier pass copied; how many.
async fn copy_pass(
    old: &mut ImapClient,
    new: &mut ImapClient,
    folders: &mut BTreeMap<String, Folder>,
    progress: &jobs::MoveProgress,
) -> Result<u64, (Side, ImapError)> {
    let o = |e| (Side::Old, e);
    let n = |e| (Side::New, e);
    let listed = old.run("LIST \"\" \"*\"", &[]).await.map_err(o)?;
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
        let selected = old
            .run(&format!("EXAMINE {}", quote(&name)), &[])
            .await
            .map_err(o)?;
        let validity = uid_validity(&selected);
        if folder.validity.is_some() && folder.validity != validity {
            // The folder was recreated on the old backend: its UIDs are new.
            folder.copied.clear();
            folder.copies.clear();
        }
        folder.validity = validity;
        let sizes: Vec<(u32, u64)> = old
            .run("UID FETCH 1:* (UID RFC822.SIZE)", &[])
            .await
            .map_err(o)?
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
                .map_err(o)?;
            for message in messages.iter().filter_map(fetched) {
                let Some(body) = message.body else { continue };
                let flags = message.flags.join(" ");
                let date = message
                    .internal_date
                    .map(|d| format!(" {}", quote(&d)))
                    .unwrap_or_default();
                let (_, done) = new
                    .run_tagged(
                        &format!("APPEND {} ({flags}){date} {{{}}}", quote(&name), body.len()),
                        &[&body],
                    )
                    .await
                    .map_err(n)?;
                if let Some(uid) = append_uid(&done) {
                    folder
                        .copies
                        .insert(message.uid, (uid, message.flags.clone()));
                }
                folder.copied.insert(message.uid);
                copied += 1;
                progress
                    .copied
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    Ok(copied)
}

/// Brings the copies in `name` up to date with their originals: a copy whose original is
/// gone (a client expunged it before the switch) is expunged on the new backend; a copy
/// whose original's flags changed since the copy gets those flags. Copies without a known
/// new UID (a server without UIDPLUS) are left as they are.
async fn reconcile(
    old: &mut ImapClient,
    new: &mut ImapClient,
    name: &str,
    folder: &Folder,
) -> Result<(u64, u64), (Side, ImapError)> {
    let o = |e| (Side::Old, e);
    let n = |e| (Side::New, e);
    if folder.copies.is_empty() {
        return Ok((0, 0));
    }
    old.run(&format!("EXAMINE {}", quote(name)), &[])
        .await
        .map_err(o)?;
    let now: BTreeMap<u32, Vec<String>> = old
        .run("UID FETCH 1:* (UID FLAGS)", &[])
        .await
        .map_err(o)?
        .iter()
        .filter_map(fetched)
        .map(|f| (f.uid, f.flags))
        .collect();
    let mut gone = Vec::new();
    let mut changed = Vec::new();
    for (old_uid, (new_uid, copied_flags)) in &folder.copies {
        match now.get(old_uid) {
            None => gone.push(*new_uid),
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
    old.run("UNSELECT", &[]).await.map_err(o)?;
    if gone.is_empty() && changed.is_empty() {
        return Ok((0, 0));
    }
    new.run(&format!("SELECT {}", quote(name)), &[])
        .await
        .map_err(n)?;
    // Applied as differences: what a client set on the new copy since the switch stays.
    for (uid, added, removed) in &changed {
        if !added.is_empty() {
            new.run(&format!("UID STORE {uid} +FLAGS.SILENT ({added})"), &[])
                .await
                .map_err(n)?;
        }
        if !removed.is_empty() {
            new.run(&format!("UID STORE {uid} -FLAGS.SILENT ({removed})"), &[])
                .await
                .map_err(n)?;
        }
    }
    gone.sort_unstable();
    for chunk in gone.chunks(UID_CHUNK) {
        let set = uid_set(chunk.iter().copied());
        new.run(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"), &[])
            .await
            .map_err(n)?;
        new.run(&format!("UID EXPUNGE {set}"), &[])
            .await
            .map_err(n)?;
    }
    // UNSELECT, not CLOSE: CLOSE would expunge every message a user marked deleted on
    // the live copy.
    new.run("UNSELECT", &[]).await.map_err(n)?;
    Ok((gone.len() as u64, changed.len() as u64))
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

/// Flags and expunges exactly `uids` in `folder`; how many.
async fn delete_copied(
    old: &mut ImapClient,
    name: &str,
    folder: &Folder,
) -> Result<u64, ImapError> {
    let selected = old.run(&format!("SELECT {}", quote(name)), &[]).await?;
    if uid_validity(&selected) != folder.validity {
        // Recreated since the copy: these UIDs name other messages now. Leave it.
        tracing::warn!(folder = %name, "folder recreated on the old backend during the move: its copy is not deleted");
        old.run("UNSELECT", &[]).await?;
        return Ok(0);
    }
    let uids: Vec<u32> = folder.copied.iter().copied().collect();
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
            Some((a, b)) if uid == b + 1 => Some((a, uid)),
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
        assert_eq!(uid_set([5]), "5");
        assert_eq!(uid_set([]), "");
    }
}
