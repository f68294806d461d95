//! Per-user submission limits (`[submission]`): messages per hour, recipients per message
//! and recipients per hour. The hourly ones are token buckets that refill evenly over the
//! hour and start full, so a user may send the whole hour's allowance in a burst and then
//! one more unit each `3600 / limit` seconds. Usage is kept for the most recently active
//! users only (a bounded LRU), per edge node.
//!
//! Suspension, for relay clients with spam malware: within an hour, more distinct
//! recipients than `max_distinct_recipients_per_hour`, a share of recipients refused by the
//! backend above `max_rejected_recipient_share`, or `suspend_after_limit_hits` refusals for
//! the limits above suspend the account from sending for `suspend_seconds` (`550 5.7.1`).
//! Suspensions are kept apart from the LRU, so a busy edge cannot forget them early, and
//! written to the directory store, so a restart does not free a spammer; they can be
//! listed, placed and lifted through the API.

use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use lru::LruCache;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::{
    config::SubmissionConfig,
    directory::{Directory, DirectoryError, MailboxDirectory as _, Store, SuspensionRecord},
};

/// Users whose usage is remembered; the least recently active beyond this start afresh.
const TRACKED_USERS: usize = 100_000;
const HOUR: Duration = Duration::from_secs(3600);

/// Which limit a user reached; the `limit` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MessagesPerHour,
    RecipientsPerMessage,
    RecipientsPerHour,
}

impl Limit {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MessagesPerHour => "messages_per_hour",
            Self::RecipientsPerMessage => "recipients_per_message",
            Self::RecipientsPerHour => "recipients_per_hour",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(capacity),
            at: now,
        }
    }

    /// Tokens available at `now` (refilled at `capacity` per hour, never above it).
    fn level(&mut self, capacity: u32, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let capacity = f64::from(capacity);
        self.tokens = (self.tokens + elapsed * capacity / HOUR.as_secs_f64()).min(capacity);
        self.at = now;
        self.tokens
    }
}

/// Why an account was suspended; the `reason` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendReason {
    DistinctRecipients,
    RejectedRecipients,
    LimitHits,
    /// Placed through the API.
    Operator,
    /// Sent a message with malware (`[scan]`): an infected relay client.
    Malware,
}

impl SuspendReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::DistinctRecipients => "distinct_recipients",
            Self::RejectedRecipients => "rejected_recipients",
            Self::LimitHits => "limit_hits",
            Self::Operator => "operator",
            Self::Malware => "malware",
        }
    }

    /// For the `550 5.7.1` reply.
    fn parse(text: &str) -> Self {
        match text {
            "distinct_recipients" => Self::DistinctRecipients,
            "rejected_recipients" => Self::RejectedRecipients,
            "limit_hits" => Self::LimitHits,
            "malware" => Self::Malware,
            _ => Self::Operator,
        }
    }

    pub const fn explain(self) -> &'static str {
        match self {
            Self::DistinctRecipients => "too many different recipients",
            Self::RejectedRecipients => "too many refused recipients",
            Self::LimitHits => "sending limits exceeded again and again",
            Self::Operator => "suspended by the administrator",
            Self::Malware => "it sent a message with malware",
        }
    }
}

/// A suspended account.
#[derive(Debug, Clone, Copy)]
pub struct Suspension {
    pub reason: SuspendReason,
    pub since: Instant,
    pub until: Instant,
}

/// What one user did in the current hour, for the suspension rules.
#[derive(Debug, Clone)]
struct Window {
    start: Instant,
    limit_hits: u32,
    recipients: u32,
    rejected: u32,
    /// Hashes of the distinct recipients, up to one past the limit.
    distinct: Vec<u64>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            limit_hits: 0,
            recipients: 0,
            rejected: 0,
            distinct: Vec::new(),
        }
    }

    fn current(&mut self, now: Instant) -> &mut Self {
        if now.saturating_duration_since(self.start) >= HOUR {
            *self = Self::new(now);
        }
        self
    }
}

#[derive(Debug, Clone)]
struct Usage {
    messages: Bucket,
    recipients: Bucket,
    window: Window,
}

pub struct SubmissionLimits {
    config: SubmissionConfig,
    users: Mutex<LruCache<String, Usage>>,
    suspended: Mutex<HashMap<String, Suspension>>,
    hasher: std::collections::hash_map::RandomState,
    limited: IntCounterVec,
    suspensions: Option<(IntCounterVec, IntGauge)>,
    /// Where suspensions are kept across restarts.
    store: Option<std::sync::Arc<Directory<Store>>>,
}

/// Unix seconds of `at` (an `Instant` near now).
fn unix(at: Instant, now: Instant) -> i64 {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let now_unix = i64::try_from(now_unix).unwrap_or(i64::MAX);
    let offset = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    if at >= now {
        now_unix.saturating_add(offset(at - now))
    } else {
        now_unix.saturating_sub(offset(now - at))
    }
}

impl SubmissionLimits {
    pub fn new(config: SubmissionConfig, registry: &Registry) -> prometheus::Result<Self> {
        let limited = IntCounterVec::new(
            Opts::new(
                "protobalance_submission_limited_total",
                "Submission commands refused because the user reached a [submission] limit",
            ),
            &["limit"],
        )?;
        registry.register(Box::new(limited.clone()))?;
        let suspensions = IntCounterVec::new(
            Opts::new(
                "protobalance_submission_suspensions_total",
                "Accounts suspended from sending, by reason",
            ),
            &["reason"],
        )?;
        let suspended = IntGauge::new(
            "protobalance_submission_suspended_accounts",
            "Accounts suspended from sending now",
        )?;
        registry.register(Box::new(suspensions.clone()))?;
        registry.register(Box::new(suspended.clone()))?;
        let mut this = Self::with_metric(config, limited);
        this.suspensions = Some((suspensions, suspended));
        Ok(this)
    }

    fn with_metric(config: SubmissionConfig, limited: IntCounterVec) -> Self {
        let capacity = NonZeroUsize::new(TRACKED_USERS).unwrap_or(NonZeroUsize::MIN);
        Self {
            config,
            users: Mutex::new(LruCache::new(capacity)),
            suspended: Mutex::default(),
            hasher: std::collections::hash_map::RandomState::new(),
            limited,
            suspensions: None,
            store: None,
        }
    }

    /// Keeps suspensions in `store` from now on.
    #[must_use]
    pub fn with_store(mut self, store: std::sync::Arc<Directory<Store>>) -> Self {
        self.store = Some(store);
        self
    }

    /// Loads the stored suspensions that have not ended; returns how many.
    pub async fn restore(&self) -> Result<usize, DirectoryError> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let records = store.store().suspensions().await?;
        let now = Instant::now();
        let now_unix = unix(now, now);
        let mut map = self.suspensions_lock();
        for r in records.iter().filter(|r| r.until > now_unix) {
            let ago = Duration::from_secs(u64::try_from(now_unix - r.since).unwrap_or(0));
            let left = Duration::from_secs(u64::try_from(r.until - now_unix).unwrap_or(0));
            map.insert(
                r.account.clone(),
                Suspension {
                    reason: SuspendReason::parse(&r.reason),
                    since: now.checked_sub(ago).unwrap_or(now),
                    until: now + left,
                },
            );
        }
        self.update_gauge(map.len());
        Ok(map.len())
    }

    /// Writes `user`'s suspension (or its absence) to the store; the future is `'static`,
    /// for a session to spawn or the API to await.
    pub fn save(
        &self,
        user: &str,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send + 'static {
        let store = self.store.clone();
        let now = Instant::now();
        let record = self.suspension(user, now).map(|s| SuspensionRecord {
            account: user.to_owned(),
            reason: s.reason.as_str().to_owned(),
            since: unix(s.since, now),
            until: unix(s.until, now),
        });
        let user = user.to_owned();
        async move {
            let Some(store) = store else { return Ok(()) };
            match record {
                Some(record) => store.store().put_suspension(&record).await,
                None => store.store().remove_suspension(&user).await.map(drop),
            }
        }
    }

    /// [`Self::save`] in the background, logging a failure (the suspension holds in memory
    /// all the same).
    pub fn save_later(&self, user: &str) {
        if self.store.is_none() {
            return;
        }
        let save = self.save(user);
        let user = user.to_owned();
        tokio::spawn(async move {
            if let Err(error) = save.await {
                tracing::error!(%user, %error, "storing a submission suspension failed; it holds until a restart");
            }
        });
    }

    fn suspensions_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Suspension>> {
        self.suspended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The suspension of `user`, if it is suspended now.
    pub fn suspension(&self, user: &str, now: Instant) -> Option<Suspension> {
        let mut map = self.suspensions_lock();
        match map.get(user) {
            Some(s) if s.until > now => Some(*s),
            Some(_) => {
                map.remove(user);
                self.update_gauge(map.len());
                None
            }
            None => None,
        }
    }

    /// Every current suspension, by account.
    pub fn suspensions(&self, now: Instant) -> Vec<(String, Suspension)> {
        let mut map = self.suspensions_lock();
        map.retain(|_, s| s.until > now);
        self.update_gauge(map.len());
        let mut list: Vec<_> = map.iter().map(|(u, s)| (u.clone(), *s)).collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    /// Suspends `user` for `duration` (the API's, or a rule's, with `suspend_seconds`).
    pub fn suspend(&self, user: &str, reason: SuspendReason, duration: Duration, now: Instant) {
        let mut map = self.suspensions_lock();
        // Ended ones go here too, so accounts never seen again do not pile up.
        map.retain(|_, s| s.until > now);
        map.insert(
            user.to_owned(),
            Suspension {
                reason,
                since: now,
                until: now + duration,
            },
        );
        self.update_gauge(map.len());
        if let Some((total, _)) = &self.suspensions {
            total.with_label_values(&[reason.as_str()]).inc();
        }
        tracing::warn!(
            target: "protobalance::events",
            event = "submission_suspended",
            %user,
            reason = reason.as_str(),
            seconds = duration.as_secs(),
            "account suspended from sending"
        );
    }

    /// Lifts the suspension of `user` (and forgets the hour's counts that led to it).
    pub fn lift(&self, user: &str) -> bool {
        let mut map = self.suspensions_lock();
        let lifted = map.remove(user).is_some();
        self.update_gauge(map.len());
        drop(map);
        if lifted {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(usage) = users.get_mut(user) {
                usage.window = Window::new(Instant::now());
            }
            tracing::info!(%user, "submission suspension lifted");
        }
        lifted
    }

    fn update_gauge(&self, len: usize) {
        if let Some((_, gauge)) = &self.suspensions {
            gauge.set(i64::try_from(len).unwrap_or(i64::MAX));
        }
    }

    /// Counts a recipient the backend accepted or refused; `Some` when this suspends the
    /// account.
    pub fn note_recipient(
        &self,
        user: &str,
        recipient: &str,
        accepted: bool,
        now: Instant,
    ) -> Option<SuspendReason> {
        let hash = self.hasher.hash_one(recipient.to_ascii_lowercase());
        let c = &self.config;
        let max_distinct =
            usize::try_from(c.max_distinct_recipients_per_hour).unwrap_or(usize::MAX);
        let reason = self.with_usage(user, now, |u| {
            let w = u.window.current(now);
            w.recipients += 1;
            w.rejected += u32::from(!accepted);
            if accepted && w.distinct.len() <= max_distinct && !w.distinct.contains(&hash) {
                w.distinct.push(hash);
            }
            if w.distinct.len() > max_distinct {
                return Some(SuspendReason::DistinctRecipients);
            }
            let share = f64::from(w.rejected) / f64::from(w.recipients);
            (w.recipients >= c.rejected_share_min_recipients
                && share > f64::from(c.max_rejected_recipient_share))
            .then_some(SuspendReason::RejectedRecipients)
        })?;
        self.suspend_by_rule(user, reason, now);
        Some(reason)
    }

    /// Suspends `user` for `suspend_seconds`, unless already suspended.
    pub fn suspend_by_rule(&self, user: &str, reason: SuspendReason, now: Instant) {
        if self.suspension(user, now).is_none() {
            let duration = Duration::from_secs(self.config.suspend_seconds);
            self.suspend(user, reason, duration, now);
        }
    }

    /// Counts a refusal for a limit; `Some` when this suspends the account.
    fn note_limit_hit(&self, user: &str, now: Instant) -> Option<SuspendReason> {
        let hits = self.with_usage(user, now, |u| {
            let w = u.window.current(now);
            w.limit_hits += 1;
            w.limit_hits
        });
        (hits >= self.config.suspend_after_limit_hits).then(|| {
            self.suspend_by_rule(user, SuspendReason::LimitHits, now);
            SuspendReason::LimitHits
        })
    }

    /// May `user` start another message now?
    pub fn may_send(&self, user: &str, now: Instant) -> Result<(), Limit> {
        let capacity = self.config.max_messages_per_hour;
        let ok = self.with_usage(user, now, |u| u.messages.level(capacity, now) >= 1.0);
        self.verdict(user, now, ok, Limit::MessagesPerHour)
    }

    /// May `user` add a recipient to a message that has `pending` accepted ones?
    pub fn may_add_recipient(&self, user: &str, pending: usize, now: Instant) -> Result<(), Limit> {
        let per_message =
            usize::try_from(self.config.max_recipients_per_message).unwrap_or(usize::MAX);
        if pending >= per_message {
            return self.verdict(user, now, false, Limit::RecipientsPerMessage);
        }
        let capacity = self.config.max_recipients_per_hour;
        let wanted = pending as f64 + 1.0;
        let ok = self.with_usage(user, now, |u| u.recipients.level(capacity, now) >= wanted);
        self.verdict(user, now, ok, Limit::RecipientsPerHour)
    }

    /// Charges a message the backend accepted, with its `recipients`.
    pub fn record(&self, user: &str, recipients: usize, now: Instant) {
        let (messages, rcpts) = (
            self.config.max_messages_per_hour,
            self.config.max_recipients_per_hour,
        );
        self.with_usage(user, now, |u| {
            u.messages.tokens = (u.messages.level(messages, now) - 1.0).max(0.0);
            u.recipients.tokens = (u.recipients.level(rcpts, now) - recipients as f64).max(0.0);
        });
    }

    fn verdict(&self, user: &str, now: Instant, ok: bool, limit: Limit) -> Result<(), Limit> {
        if ok {
            return Ok(());
        }
        self.limited.with_label_values(&[limit.as_str()]).inc();
        let _ = self.note_limit_hit(user, now);
        Err(limit)
    }

    fn with_usage<T>(&self, user: &str, now: Instant, f: impl FnOnce(&mut Usage) -> T) -> T {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let usage = users.get_or_insert_mut(user.to_owned(), || Usage {
            messages: Bucket::full(self.config.max_messages_per_hour, now),
            recipients: Bucket::full(self.config.max_recipients_per_hour, now),
            window: Window::new(now),
        });
        f(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(messages: u32, per_message: u32, recipients: u32) -> SubmissionLimits {
        let metric = IntCounterVec::new(Opts::new("t", "t"), &["limit"]).expect("metric");
        SubmissionLimits::with_metric(
            SubmissionConfig {
                max_messages_per_hour: messages,
                max_recipients_per_message: per_message,
                max_recipients_per_hour: recipients,
                ..SubmissionConfig::default()
            },
            metric,
        )
    }

    fn suspending(extra: &str) -> SubmissionLimits {
        let metric = IntCounterVec::new(Opts::new("t", "t"), &["limit"]).expect("metric");
        let config = toml::from_str(extra).expect("config");
        SubmissionLimits::with_metric(config, metric)
    }

    #[test]
    fn too_many_distinct_recipients_suspend_the_account_for_an_hour() {
        let l = suspending("max_distinct_recipients_per_hour = 3\nsuspend_seconds = 600\n");
        let t0 = Instant::now();
        for i in 0..3 {
            // The same recipients again (in any case) are not new.
            assert_eq!(l.note_recipient("a@x", &format!("r{i}@y"), true, t0), None);
            assert_eq!(l.note_recipient("a@x", &format!("R{i}@Y"), true, t0), None);
        }
        assert!(l.suspension("a@x", t0).is_none());
        assert_eq!(
            l.note_recipient("a@x", "r3@y", true, t0),
            Some(SuspendReason::DistinctRecipients)
        );
        let s = l.suspension("a@x", t0).expect("suspended");
        assert_eq!(s.reason, SuspendReason::DistinctRecipients);
        assert!(l.suspension("b@x", t0).is_none(), "others unaffected");
        assert!(
            l.suspension("a@x", t0 + Duration::from_secs(601)).is_none(),
            "expires"
        );
        // A new hour starts afresh.
        let t1 = t0 + Duration::from_secs(3601);
        assert_eq!(l.note_recipient("a@x", "r9@y", true, t1), None);
    }

    #[test]
    fn a_high_share_of_refused_recipients_suspends_once_there_are_enough() {
        let l =
            suspending("rejected_share_min_recipients = 10\nmax_rejected_recipient_share = 0.5\n");
        let t0 = Instant::now();
        for i in 0..9 {
            assert_eq!(
                l.note_recipient("a@x", &format!("n{i}@y"), false, t0),
                None,
                "{i}"
            );
        }
        assert_eq!(
            l.note_recipient("a@x", "n9@y", false, t0),
            Some(SuspendReason::RejectedRecipients)
        );
        // Half refused is not more than half.
        let l = suspending("rejected_share_min_recipients = 4\n");
        for (i, ok) in [true, false, true, false].into_iter().enumerate() {
            assert_eq!(l.note_recipient("b@x", &format!("{i}@y"), ok, t0), None);
        }
    }

    #[test]
    fn repeated_limit_hits_suspend_and_lifting_starts_afresh() {
        let l = suspending("max_messages_per_hour = 1\nsuspend_after_limit_hits = 3\n");
        let t0 = Instant::now();
        l.record("a@x", 1, t0);
        for _ in 0..3 {
            assert_eq!(l.may_send("a@x", t0), Err(Limit::MessagesPerHour));
        }
        assert_eq!(
            l.suspension("a@x", t0).map(|s| s.reason),
            Some(SuspendReason::LimitHits)
        );
        assert_eq!(l.suspensions(t0).len(), 1);
        assert!(l.lift("a@x"));
        assert!(!l.lift("a@x"));
        assert!(l.suspension("a@x", t0).is_none());
        assert!(l.suspensions(t0).is_empty());
    }

    #[test]
    fn messages_per_hour_burst_then_refill() {
        let l = limits(3, 100, 1000);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.may_send("a@x", t0), Ok(()));
            l.record("a@x", 1, t0);
        }
        assert_eq!(l.may_send("a@x", t0), Err(Limit::MessagesPerHour));
        // Other users are not affected.
        assert_eq!(l.may_send("b@x", t0), Ok(()));
        // One message's worth refills in 20 minutes (3 per hour).
        assert_eq!(
            l.may_send("a@x", t0 + Duration::from_secs(19 * 60)),
            Err(Limit::MessagesPerHour)
        );
        assert_eq!(l.may_send("a@x", t0 + Duration::from_secs(20 * 60)), Ok(()));
        // Never more than the hour's allowance, however long the pause.
        let later = t0 + Duration::from_secs(10 * 3600);
        for _ in 0..3 {
            l.record("a@x", 0, later);
        }
        assert_eq!(l.may_send("a@x", later), Err(Limit::MessagesPerHour));
    }

    #[test]
    fn recipients_per_message_and_per_hour() {
        let l = limits(100, 2, 5);
        let t0 = Instant::now();
        assert_eq!(l.may_add_recipient("a@x", 0, t0), Ok(()));
        assert_eq!(l.may_add_recipient("a@x", 1, t0), Ok(()));
        assert_eq!(
            l.may_add_recipient("a@x", 2, t0),
            Err(Limit::RecipientsPerMessage)
        );
        l.record("a@x", 2, t0);
        l.record("a@x", 2, t0);
        // One recipient left this hour.
        assert_eq!(l.may_add_recipient("a@x", 0, t0), Ok(()));
        assert_eq!(
            l.may_add_recipient("a@x", 1, t0),
            Err(Limit::RecipientsPerHour)
        );
        assert_eq!(
            l.limited.with_label_values(&["recipients_per_hour"]).get(),
            1
        );
        assert_eq!(
            l.limited
                .with_label_values(&["recipients_per_message"])
                .get(),
            1
        );
    }
}
