//! Moves as jobs: each runs in its own task (a client that goes away does not stop it)
//! and can be watched while it runs (`GET /api/v1/jobs/{id}`): its phase, the messages
//! copied of those the old backend had, and at the end the report or the error. The last
//! [`KEEP`] jobs are kept.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{MoveError, MoveReport, Mover};
use crate::directory::{Mailbox, MailboxDirectory as _, MoveRecord};

/// Finished and running jobs kept for `GET /jobs`.
pub const KEEP: usize = 1000;

/// What a running move has done so far.
#[derive(Default)]
pub struct MoveProgress {
    phase: Mutex<&'static str>,
    /// Messages copied so far.
    pub copied: AtomicU64,
    /// Messages the old backend had when the move began.
    pub total: AtomicU64,
}

impl MoveProgress {
    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
    }

    pub fn phase(&self) -> &'static str {
        let phase = *self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        if phase.is_empty() { "starting" } else { phase }
    }
}

pub struct Job {
    pub id: u64,
    pub mailbox: String,
    pub to: String,
    pub started: Instant,
    pub progress: MoveProgress,
    outcome: Mutex<Option<Result<MoveReport, Arc<MoveError>>>>,
    done: tokio::sync::Notify,
}

impl Job {
    /// The result once the move ended.
    pub fn outcome(&self) -> Option<Result<MoveReport, Arc<MoveError>>> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits for the end of the move.
    pub async fn finished(&self) -> Result<MoveReport, Arc<MoveError>> {
        loop {
            // Created before the check: a wakeup between the two is not missed.
            let notified = self.done.notified();
            if let Some(outcome) = self.outcome() {
                return outcome;
            }
            notified.await;
        }
    }
}

#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<VecDeque<Arc<Job>>>,
}

impl Jobs {
    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.lock().iter().find(|j| j.id == id).cloned()
    }

    /// Every kept job, newest first.
    pub fn all(&self) -> Vec<Arc<Job>> {
        self.lock().iter().rev().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Mover {
    /// Starts moving `mailbox` to `to` in its own task; the job reports how it goes.
    pub fn start(self: &Arc<Self>, mailbox: Mailbox, to: String) -> Arc<Job> {
        self.spawn_job(mailbox, to, None)
    }

    /// Starts finishing `record`, taken over by `holder`, as a job.
    fn start_resumed(self: &Arc<Self>, mailbox: Mailbox, record: MoveRecord, holder: String) {
        let to = record.to.clone();
        self.spawn_job(mailbox, to, Some((record, holder)));
    }

    fn spawn_job(
        self: &Arc<Self>,
        mailbox: Mailbox,
        to: String,
        resumed: Option<(MoveRecord, String)>,
    ) -> Arc<Job> {
        let job = Arc::new(Job {
            id: self.jobs.next.fetch_add(1, Ordering::Relaxed) + 1,
            mailbox: mailbox.to_string(),
            to: to.clone(),
            started: Instant::now(),
            progress: MoveProgress::default(),
            outcome: Mutex::new(None),
            done: tokio::sync::Notify::new(),
        });
        {
            let mut jobs = self.jobs.lock();
            if jobs.len() >= KEEP {
                // The oldest finished job makes room; running ones are never dropped.
                if let Some(i) = jobs.iter().position(|j| j.outcome().is_some()) {
                    jobs.remove(i);
                }
            }
            jobs.push_back(Arc::clone(&job));
        }
        let (mover, running) = (Arc::clone(self), Arc::clone(&job));
        tokio::spawn(async move {
            // The move in a task of its own: a panic in it ends as a failed job, never as
            // a job that runs forever.
            let watched = Arc::clone(&running);
            let inner = tokio::spawn(async move {
                match resumed {
                    None => {
                        mover
                            .move_mailbox_with(&mailbox, &to, &watched.progress)
                            .await
                    }
                    Some((record, holder)) => {
                        mover
                            .resume(&mailbox, &record, &holder, &watched.progress)
                            .await
                    }
                }
            });
            let result = match inner.await {
                Ok(result) => result.map_err(Arc::new),
                Err(e) => Err(Arc::new(MoveError::Internal(e.to_string()))),
            };
            running
                .progress
                .set_phase(if result.is_ok() { "done" } else { "failed" });
            *running
                .outcome
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(result);
            running.done.notify_waiters();
        });
        job
    }

    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Takes over and finishes the recorded moves whose lease ended (their node stopped,
    /// or their run failed), until `shutdown`. Every node sharing the directory runs this;
    /// the take-over is one conditional update, so one node wins each. A node takes over
    /// only moves between backends its pool has.
    pub async fn resume_stalled(self: Arc<Self>, shutdown: CancellationToken) {
        let lease = self.config.resume_after();
        let every = (lease / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut warned = std::collections::HashSet::new();
        // Per mailbox: the take-overs so far and when the next may be: a move that keeps
        // failing is retried at doubling intervals (up to an hour), not at every lease end.
        let mut attempts: std::collections::HashMap<String, (u32, Instant)> =
            std::collections::HashMap::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let store = self.ctx.directory.store();
            let records = match store.moves().await {
                Ok(records) => records,
                Err(error) => {
                    tracing::warn!(%error, "recorded mailbox moves not read");
                    continue;
                }
            };
            attempts.retain(|mailbox, _| records.iter().any(|r| &r.mailbox == mailbox));
            let now = super::unix_ms();
            for record in records.into_iter().filter(|r| r.expires_ms < now) {
                if attempts
                    .get(&record.mailbox)
                    .is_some_and(|(_, next)| Instant::now() < *next)
                {
                    continue;
                }
                let unable = if !self.config.enabled() {
                    Some("[moves] is not configured here".to_owned())
                } else {
                    [&record.from, &record.to]
                        .into_iter()
                        .find(|b| !self.ctx.pool.contains(b))
                        .map(|b| format!("backend `{b}` is not in this node's pool"))
                };
                if let Some(why) = unable {
                    if warned.insert(record.mailbox.clone()) {
                        tracing::warn!(
                            mailbox = %record.mailbox, from = %record.from, to = %record.to,
                            "a stopped mailbox move is recorded but this node cannot resume it: {why}"
                        );
                    }
                    continue;
                }
                let mailbox = Mailbox::from_store(record.mailbox.clone());
                if self.is_moving(&mailbox) {
                    continue;
                }
                let holder = self.holder();
                // The clock read per record: the lease written starts now.
                let now = super::unix_ms();
                let expires = now.saturating_add(super::millis(lease));
                match store.take_over_move(&mailbox, &holder, now, expires).await {
                    Ok(Some(taken)) => {
                        let (tries, next) = attempts
                            .entry(record.mailbox.clone())
                            .or_insert((0, Instant::now()));
                        *tries += 1;
                        let backoff = lease.saturating_mul(1 << (*tries - 1).min(12));
                        *next = Instant::now() + backoff.min(Duration::from_secs(3600));
                        tracing::warn!(
                            %mailbox, from = %taken.from, to = %taken.to, was = %record.holder,
                            attempt = *tries, "resuming a mailbox move whose run stopped"
                        );
                        self.start_resumed(mailbox, taken, holder);
                    }
                    // Another node took it first, or its lease was renewed after all.
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%mailbox, %error, "stopped mailbox move not taken over");
                    }
                }
            }
        }
    }
}

/// What [`Mover::abandon`] did.
pub enum Abandoned {
    /// The record is gone: nothing resumes the move.
    Ended(MoveRecord),
    /// No move of the mailbox is recorded.
    NotRecorded,
    /// The mailbox is switched to the move's target and the move not finished: what the
    /// old backend still holds would be out of its owner's reach (`force` abandons it
    /// anyway).
    Switched(MoveRecord),
    /// A run holds the move (this node's, or another's whose lease runs until the time
    /// given, Unix ms).
    Running(i64),
}

impl Mover {
    /// Every recorded move (running here or elsewhere, or stopped and waiting to be
    /// resumed), and whether this node runs it.
    pub async fn recorded(
        &self,
    ) -> Result<Vec<(MoveRecord, bool)>, crate::directory::DirectoryError> {
        Ok(self
            .ctx
            .directory
            .store()
            .moves()
            .await?
            .into_iter()
            .map(|r| {
                let here = self.is_moving(&Mailbox::from_store(r.mailbox.clone()));
                (r, here)
            })
            .collect())
    }

    /// Gives up a stopped move (one whose run failed and keeps failing): its record is
    /// ended, so nothing resumes it. What the old backend still holds stays there, and
    /// the copies made stay on the new one. A move a run holds is not abandoned, nor,
    /// without `force`, one whose mailbox was switched already.
    pub async fn abandon(
        &self,
        mailbox: &Mailbox,
        force: bool,
    ) -> Result<Abandoned, crate::directory::DirectoryError> {
        let store = self.ctx.directory.store();
        let Some(record) = store
            .moves()
            .await?
            .into_iter()
            .find(|r| r.mailbox == mailbox.as_str())
        else {
            return Ok(Abandoned::NotRecorded);
        };
        if self.is_moving(mailbox) {
            return Ok(Abandoned::Running(record.expires_ms));
        }
        if !force && store.owner_of(mailbox).await?.as_deref() == Some(record.to.as_str()) {
            return Ok(Abandoned::Switched(record));
        }
        // Taken over (only once its lease ended), then ended: no run can hold it between.
        let holder = format!("{}!abandon", self.holder());
        let now = super::unix_ms();
        match store
            .take_over_move(mailbox, &holder, now, now.saturating_add(60_000))
            .await?
        {
            Some(_) => {
                store.end_move(mailbox, &holder).await?;
                tracing::warn!(
                    %mailbox, from = %record.from, to = %record.to,
                    "mailbox move abandoned: what the old backend still holds stays there"
                );
                Ok(Abandoned::Ended(record))
            }
            None if store
                .moves()
                .await?
                .iter()
                .any(|r| r.mailbox == record.mailbox) =>
            {
                Ok(Abandoned::Running(record.expires_ms))
            }
            // Finished or abandoned meanwhile.
            None => Ok(Abandoned::NotRecorded),
        }
    }
}
