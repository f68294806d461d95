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
    time::Instant,
};

use super::{MoveError, MoveReport, Mover};
use crate::directory::Mailbox;

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
                mover
                    .move_mailbox_with(&mailbox, &to, &watched.progress)
                    .await
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
}
