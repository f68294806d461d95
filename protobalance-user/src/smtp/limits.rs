//! Per-user submission limits (`[submission]`): messages per hour, recipients per message
//! and recipients per hour. The hourly ones are token buckets that refill evenly over the
//! hour and start full, so a user may send the whole hour's allowance in a burst and then
//! one more unit each `3600 / limit` seconds. Usage is kept for the most recently active
//! users only (a bounded LRU), per edge node.

use std::{
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use lru::LruCache;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::config::SubmissionConfig;

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

#[derive(Debug, Clone, Copy)]
struct Usage {
    messages: Bucket,
    recipients: Bucket,
}

pub struct SubmissionLimits {
    config: SubmissionConfig,
    users: Mutex<LruCache<String, Usage>>,
    limited: IntCounterVec,
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
        Ok(Self::with_metric(config, limited))
    }

    fn with_metric(config: SubmissionConfig, limited: IntCounterVec) -> Self {
        let capacity = NonZeroUsize::new(TRACKED_USERS).unwrap_or(NonZeroUsize::MIN);
        Self {
            config,
            users: Mutex::new(LruCache::new(capacity)),
            limited,
        }
    }

    /// May `user` start another message now?
    pub fn may_send(&self, user: &str, now: Instant) -> Result<(), Limit> {
        let capacity = self.config.max_messages_per_hour;
        let ok = self.with_usage(user, now, |u| u.messages.level(capacity, now) >= 1.0);
        self.verdict(ok, Limit::MessagesPerHour)
    }

    /// May `user` add a recipient to a message that has `pending` accepted ones?
    pub fn may_add_recipient(&self, user: &str, pending: usize, now: Instant) -> Result<(), Limit> {
        let per_message =
            usize::try_from(self.config.max_recipients_per_message).unwrap_or(usize::MAX);
        if pending >= per_message {
            return self.verdict(false, Limit::RecipientsPerMessage);
        }
        let capacity = self.config.max_recipients_per_hour;
        let wanted = pending as f64 + 1.0;
        let ok = self.with_usage(user, now, |u| u.recipients.level(capacity, now) >= wanted);
        self.verdict(ok, Limit::RecipientsPerHour)
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

    fn verdict(&self, ok: bool, limit: Limit) -> Result<(), Limit> {
        if ok {
            return Ok(());
        }
        self.limited.with_label_values(&[limit.as_str()]).inc();
        Err(limit)
    }

    fn with_usage<T>(&self, user: &str, now: Instant, f: impl FnOnce(&mut Usage) -> T) -> T {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let usage = users.get_or_insert_mut(user.to_owned(), || Usage {
            messages: Bucket::full(self.config.max_messages_per_hour, now),
            recipients: Bucket::full(self.config.max_recipients_per_hour, now),
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
            },
            metric,
        )
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
