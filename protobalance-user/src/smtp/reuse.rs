//! Idle backend sessions for reuse by the next inbound transaction, per backend and
//! delivery service. A message through the edge otherwise costs the backend a new
//! connection, a greeting and an LHLO/EHLO each time (and a QUIT); a reused session costs
//! only the new client's XCLIENT and the greeting after it, or just a RSET when the client
//! has the same address and HELO as the last one there — sent in the same write as the
//! transaction's MAIL FROM and first RCPT when the backend offers PIPELINING, so it costs
//! no round trip of its own.
//!
//! Only sessions whose client identity can be replaced are kept: those of backends that
//! take the identity by XCLIENT (Dovecot LMTP and Postfix allow XCLIENT again outside a
//! transaction) or of backends that take none. A PROXY-protocol header binds a connection
//! to one client, so those are never reused; neither are submission sessions (they are
//! authenticated as one user). A session is put back only after a completed transaction
//! whose replies all came in, and never if the backend refused anything in an unexpected
//! way. A kept session that turns out to be closed or refuses the new XCLIENT is dropped
//! and a fresh one opened instead; a backend that refuses a second XCLIENT is not pooled
//! again.
//!
//! Bounded: `max_per_backend` idle sessions per backend and service, each kept at most
//! `IDLE_LIMIT` (well under the backends' own idle timeouts: Dovecot LMTP and Postfix
//! smtpd wait 5 minutes); a sweeper closes the expired ones.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus::{IntCounterVec, Opts, Registry};
use tokio_util::sync::CancellationToken;

use super::deliver::BackendSession;
use crate::backend::Service;

/// Longest time a session waits in the pool.
pub const IDLE_LIMIT: Duration = Duration::from_secs(30);
const SWEEP_EVERY: Duration = Duration::from_secs(5);

type Key = (String, Service);

pub struct SessionPool {
    idle: Mutex<HashMap<Key, VecDeque<(BackendSession, Instant)>>>,
    /// Backends that refused a repeated XCLIENT: their sessions are not kept.
    no_reuse: Mutex<HashSet<Key>>,
    max_per_backend: usize,
    outcomes: Option<IntCounterVec>,
}

impl SessionPool {
    /// `max_per_backend` 0 turns reuse off.
    pub fn new(max_per_backend: usize, registry: Option<&Registry>) -> prometheus::Result<Self> {
        let outcomes = match registry {
            Some(registry) => {
                let outcomes = IntCounterVec::new(
                    Opts::new(
                        "protobalance_backend_sessions_total",
                        "Backend delivery sessions by how they were obtained: reused from \
                         the idle pool, opened fresh, or found stale in the pool",
                    ),
                    &["backend", "result"],
                )?;
                registry.register(Box::new(outcomes.clone()))?;
                Some(outcomes)
            }
            None => None,
        };
        Ok(Self {
            idle: Mutex::default(),
            no_reuse: Mutex::default(),
            max_per_backend,
            outcomes,
        })
    }

    pub fn count(&self, backend: &str, result: &str) {
        if let Some(outcomes) = &self.outcomes {
            outcomes.with_label_values(&[backend, result]).inc();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, VecDeque<(BackendSession, Instant)>>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently parked session of `backend`'s `service`, if one is fresh enough.
    pub fn take(&self, backend: &str, service: Service) -> Option<BackendSession> {
        if self.max_per_backend == 0 {
            return None;
        }
        let mut idle = self.lock();
        let queue = idle.get_mut(&(backend.to_owned(), service))?;
        while let Some((session, since)) = queue.pop_back() {
            if since.elapsed() < IDLE_LIMIT {
                return Some(session);
            }
            // Expired: dropped, which closes it.
        }
        None
    }

    /// Parks a session after a completed transaction; the oldest goes when full.
    pub fn put(&self, session: BackendSession, service: Service) {
        if self.max_per_backend == 0 {
            return;
        }
        let key = (session.backend().to_owned(), service);
        if self
            .no_reuse
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&key)
        {
            return;
        }
        let mut idle = self.lock();
        let queue = idle.entry(key).or_default();
        queue.push_back((session, Instant::now()));
        while queue.len() > self.max_per_backend {
            queue.pop_front();
        }
    }

    /// The backend refused a second XCLIENT: stop keeping its sessions.
    pub fn refuse_reuse(&self, backend: &str, service: Service) {
        let key = (backend.to_owned(), service);
        tracing::warn!(%backend, "the backend refuses a repeated XCLIENT: its sessions are not reused");
        self.lock().remove(&key);
        self.no_reuse
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key);
    }

    /// Closes expired sessions every few seconds until `shutdown`, and all at the end.
    pub async fn sweep(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let expired: Vec<BackendSession> = {
                let mut idle = self.lock();
                let mut out = Vec::new();
                for queue in idle.values_mut() {
                    while queue
                        .front()
                        .is_some_and(|(_, since)| since.elapsed() >= IDLE_LIMIT)
                    {
                        if let Some((session, _)) = queue.pop_front() {
                            out.push(session);
                        }
                    }
                }
                out
            };
            for mut session in expired {
                session.quit().await;
            }
        }
        let all: Vec<BackendSession> = self
            .lock()
            .drain()
            .flat_map(|(_, queue)| queue.into_iter().map(|(s, _)| s))
            .collect();
        for mut session in all {
            session.quit().await;
        }
    }
}
