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
//!    since the switch.
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

use self::imap::{ImapClient, ImapError, fetched, list_entry, quote, uid_validity};
use crate::{
    backend::Service,
    config::MovesConfig,
    directory::{DirectoryError, Mailbox, MailboxDirectory as _},
    proxy::ProxyContext,
    secret::Secret,
};

/// Deadline of one IMAP exchange (a large message's FETCH or APPEND included).
const IMAP_TIMEOUT: Duration = Duration::from_secs(120);
/// Messages fetched per UID FETCH during a pass.
const FETCH_BATCH: usize = 50;

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

/// A folder's copy state: the UIDVALIDITY seen and the UIDs copied.
#[derive(Default)]
struct Folder {
    validity: Option<u32>,
    copied: BTreeSet<u32>,
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
        directory.reassign(mailbox, to).await?;
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
        // 4. Delete what was copied from the old backend.
        if self.config.delete_old {
            progress.set_phase("deleting");
            for (name, folder) in &folders {
                if folder.copied.is_empty() {
                    continue;
                }
                report.deleted += delete_copied(&mut old, name, &folder.copied)
                    .await
                    .map_err(imap(&from))?;
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
        }
        folder.validity = validity;
        let uids: Vec<u32> = old
            .run("UID FETCH 1:* (UID)", &[])
            .await
            .map_err(o)?
            .iter()
            .filter_map(fetched)
            .map(|f| f.uid)
            .filter(|uid| !folder.copied.contains(uid))
            .collect();
        for batch in uids.chunks(FETCH_BATCH) {
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
                new.run(
                    &format!("APPEND {} ({flags}){date} {{{}}}", quote(&name), body.len()),
                    &[&body],
                )
                .await
                .map_err(n)?;
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
    folder: &str,
    uids: &BTreeSet<u32>,
) -> Result<u64, ImapError> {
    old.run(&format!("SELECT {}", quote(folder)), &[]).await?;
    let set = uid_set(uids.iter().copied());
    old.run(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"), &[])
        .await?;
    // UID EXPUNGE (UIDPLUS): only these, never a message someone else marked deleted.
    old.run(&format!("UID EXPUNGE {set}"), &[]).await?;
    old.run("CLOSE", &[]).await?;
    Ok(uids.len() as u64)
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
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set([1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(uid_set([5]), "5");
        assert_eq!(uid_set([]), "");
    }
}
