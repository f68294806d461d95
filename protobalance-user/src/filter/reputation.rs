//! The reputation engine: every session reports what its client did ([`Event`]); each
//! client address (an IPv6 client by its /64, per `reputation.ipv6_prefix`) has a score
//! that halves every `half_life_seconds`; thresholds turn the score into a [`Verdict`]:
//! tarpit (slow replies), temp-fail (`421` / `-ERR [SYS/TEMP]` / `NO [UNAVAILABLE]`) or
//! ban. A ban goes into the kernel's ban map (when the XDP filter is loaded) with a TTL
//! that grows for repeat offenders, and is also enforced here at the door.
//!
//! Memory is bounded: records live in LRU caches (sharded to keep lock hold times short)
//! of `max_tracked` entries in all, each a few dozen bytes, so a flood of spoofed or
//! rotating addresses only pushes out the least recently seen. Allowlisted networks are
//! scored (for `explain`) but never tarpitted, refused or banned.
//!
//! Login failures are also counted per account (`AccountGuard`): an account attacked from
//! many addresses is locked for a while, except from addresses it recently logged in from.

use std::{
    hash::BuildHasher as _,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroUsize,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use lru::LruCache;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::{
    config::ReputationConfig,
    filter::{
        cidr::Cidr,
        xdp::{BanMaps, BanMode, BanTarget},
    },
};

/// What a session saw its client do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Event {
    /// Talked before the end of the SMTP banner.
    Pregreet = 0,
    /// Sent commands ahead of replies where pipelining is not allowed.
    Pipelining,
    /// Bare CR or LF in a command or in message data.
    BareLineEnding,
    /// Not SMTP at all (an HTTP request, CONNECT …).
    NonSmtp,
    /// RCPT to a mailbox that does not exist (dictionary harvest).
    UnknownRecipient,
    /// RCPT to a domain the edge does not serve.
    RelayAttempt,
    /// A refused login (POP3, IMAP, SMTP AUTH).
    AuthFailure,
    /// Over a rate or concurrency limit.
    RateExceeded,
    /// An unknown command or a syntax error.
    ProtocolError,
    /// Came back while refused.
    RetryWhileRefused,
    /// A session that delivered mail or logged in, with nothing held against it.
    CleanSession,
    /// Listed by a DNSBL (or, with a negative weight, a DNSWL).
    Dnsbl,
    /// Sent a message clamd found malware in.
    Malware,
    /// Sent a message refused as spam (rspamd, `[scan]`).
    Spam,
}

pub const EVENTS: usize = 14;

impl Event {
    pub const ALL: [Self; EVENTS] = [
        Self::Pregreet,
        Self::Pipelining,
        Self::BareLineEnding,
        Self::NonSmtp,
        Self::UnknownRecipient,
        Self::RelayAttempt,
        Self::AuthFailure,
        Self::RateExceeded,
        Self::ProtocolError,
        Self::RetryWhileRefused,
        Self::CleanSession,
        Self::Dnsbl,
        Self::Malware,
        Self::Spam,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pregreet => "pregreet",
            Self::Pipelining => "pipelining",
            Self::BareLineEnding => "bare_line_ending",
            Self::NonSmtp => "non_smtp",
            Self::UnknownRecipient => "unknown_recipient",
            Self::RelayAttempt => "relay_attempt",
            Self::AuthFailure => "auth_failure",
            Self::RateExceeded => "rate_exceeded",
            Self::ProtocolError => "protocol_error",
            Self::RetryWhileRefused => "retry_while_refused",
            Self::CleanSession => "clean_session",
            Self::Dnsbl => "dnsbl",
            Self::Malware => "malware",
            Self::Spam => "spam",
        }
    }

    /// The kernel ban's `reason`: 100 + the event that crossed the ban threshold.
    pub const fn ban_reason(self) -> u32 {
        100 + self as u32
    }
}

/// What to do with a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Accept,
    /// Serve it, slowly.
    Tarpit,
    /// Refuse with a temporary error and close.
    TempFail,
    /// Banned: refuse and close (the kernel drops its packets, when loaded).
    Ban,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Tarpit => "tarpit",
            Self::TempFail => "tempfail",
            Self::Ban => "ban",
        }
    }

    /// The session must end now.
    pub const fn refuses(self) -> bool {
        matches!(self, Self::TempFail | Self::Ban)
    }
}

/// Events kept per address for `explain` (the counts cover all of them).
const RECENT: usize = 4;
const SHARDS: usize = 16;

/// One address's (or prefix's) standing; small, because a million of them may be kept.
#[derive(Clone, Debug)]
struct Record {
    score: f32,
    /// Seconds since the engine started, at the last update of `score`.
    updated: u32,
    /// Seconds since start until which the address is banned; 0 when it is not.
    banned_until: u32,
    bans: u16,
    counts: [u16; EVENTS],
    /// The latest events, oldest overwritten first: (event, seconds since start).
    recent: [(u8, u32); RECENT],
    recent_next: u8,
}

impl Record {
    const fn new(now: u32) -> Self {
        Self {
            score: 0.0,
            updated: now,
            banned_until: 0,
            bans: 0,
            counts: [0; EVENTS],
            recent: [(u8::MAX, 0); RECENT],
            recent_next: 0,
        }
    }

    fn decay(&mut self, now: u32, half_life: f32) {
        let elapsed = now.saturating_sub(self.updated);
        if elapsed > 0 {
            self.score *= (-(elapsed as f32) / half_life).exp2();
            if self.score.abs() < 0.01 {
                self.score = 0.0;
            }
            self.updated = now;
        }
    }

    fn note(&mut self, event: Event, now: u32) {
        let i = event as usize;
        self.counts[i] = self.counts[i].saturating_add(1);
        self.recent[usize::from(self.recent_next)] = (event as u8, now);
        self.recent_next = (self.recent_next + 1) % RECENT as u8;
    }

    fn banned(&self, now: u32) -> bool {
        self.banned_until > now
    }

    /// Held against the client: anything scored above zero.
    fn clean(&self) -> bool {
        self.score <= 0.0 && self.bans == 0
    }
}

/// The key of an address: IPv4 as v4-mapped IPv6, IPv6 masked to the configured prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key(u128);

/// What `explain` shows of an address.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// The address or prefix the record is kept for.
    pub subject: String,
    pub score: f32,
    pub verdict: Verdict,
    pub allowlisted: bool,
    pub bans: u16,
    /// Time left of the current ban, if any.
    pub banned_for: Option<Duration>,
    pub counts: Vec<(Event, u16)>,
    /// Latest events, oldest first, with how long ago they happened.
    pub recent: Vec<(Event, Duration)>,
}

pub struct ReputationMetrics {
    events: IntCounterVec,
    verdicts: IntCounterVec,
    bans: IntCounterVec,
    tracked: IntGauge,
    accounts_locked: IntCounterVec,
}

impl ReputationMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "protobalance_reputation_events_total",
                "Client behaviour events reported by sessions",
            ),
            &["event"],
        )?;
        let verdicts = IntCounterVec::new(
            Opts::new(
                "protobalance_reputation_verdicts_total",
                "Sessions slowed, refused or banned by the reputation engine",
            ),
            &["verdict"],
        )?;
        let bans = IntCounterVec::new(
            Opts::new(
                "protobalance_reputation_bans_total",
                "Bans placed by the reputation engine, by where they are enforced",
            ),
            &["enforced"],
        )?;
        let tracked = IntGauge::new(
            "protobalance_reputation_tracked",
            "Client addresses (or IPv6 prefixes) the reputation engine keeps",
        )?;
        let accounts_locked = IntCounterVec::new(
            Opts::new(
                "protobalance_reputation_account_events_total",
                "Account login throttling: accounts locked and logins refused while locked",
            ),
            &["event"],
        )?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(verdicts.clone()))?;
        registry.register(Box::new(bans.clone()))?;
        registry.register(Box::new(tracked.clone()))?;
        registry.register(Box::new(accounts_locked.clone()))?;
        Ok(Self {
            events,
            verdicts,
            bans,
            tracked,
            accounts_locked,
        })
    }
}

/// What `[reputation]` (and `xdp.allowlist`) set, swapped whole on a config reload.
struct Settings {
    config: ReputationConfig,
    weights: [f32; EVENTS],
    allow: Vec<Cidr>,
}

impl Settings {
    fn new(config: ReputationConfig, allow: Vec<Cidr>) -> Self {
        let w = &config.weights;
        let mut weights = [0.0; EVENTS];
        for (event, weight) in [
            (Event::Pregreet, w.pregreet),
            (Event::Pipelining, w.pipelining),
            (Event::BareLineEnding, w.bare_line_ending),
            (Event::NonSmtp, w.non_smtp),
            (Event::UnknownRecipient, w.unknown_recipient),
            (Event::RelayAttempt, w.relay_attempt),
            (Event::AuthFailure, w.auth_failure),
            (Event::RateExceeded, w.rate_exceeded),
            (Event::ProtocolError, w.protocol_error),
            (Event::RetryWhileRefused, w.retry_while_refused),
            (Event::CleanSession, w.clean_session),
            (Event::Dnsbl, 0.0),
            (Event::Malware, w.malware),
            (Event::Spam, w.spam),
        ] {
            weights[event as usize] = weight;
        }
        Self {
            config,
            weights,
            allow,
        }
    }

    fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|c| c.contains(ip))
    }

    fn verdict(&self, record: &Record, now: u32, allowed: bool) -> Verdict {
        let c = &self.config;
        if allowed {
            Verdict::Accept
        } else if record.banned(now) || record.score >= c.ban_score {
            Verdict::Ban
        } else if record.score >= c.tempfail_score {
            Verdict::TempFail
        } else if record.score >= c.tarpit_score {
            Verdict::Tarpit
        } else {
            Verdict::Accept
        }
    }

    fn ban_ttl(&self, earlier_bans: u16) -> Duration {
        let c = &self.config;
        let factor = u64::from(c.ban_growth).saturating_pow(u32::from(earlier_bans.min(32)));
        Duration::from_secs(c.ban_seconds.saturating_mul(factor).min(c.ban_max_seconds))
    }

    fn half_life(&self) -> f32 {
        self.config.half_life_seconds as f32
    }
}

pub struct Reputation {
    /// Fixed at start (they size or key the records): `reputation.enabled`, and whether
    /// IPv6 clients are kept per /64 (`ipv6_prefix = 64`) or per address.
    enabled: bool,
    per_64: bool,
    settings: std::sync::RwLock<Arc<Settings>>,
    shards: Box<[Mutex<LruCache<Key, Record>>]>,
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
    kernel: OnceLock<Arc<Mutex<BanMaps>>>,
    /// The other nodes of a multi-node edge, told about every ban.
    shared: OnceLock<Arc<crate::filter::shared_bans::SharedBans>>,
    accounts: AccountGuard,
    metrics: Option<ReputationMetrics>,
}

impl Reputation {
    /// `allow` is `reputation.allow` plus the `xdp.allowlist`.
    pub fn new(
        config: ReputationConfig,
        allow: Vec<Cidr>,
        metrics: Option<ReputationMetrics>,
    ) -> Self {
        let per_shard = NonZeroUsize::new(config.max_tracked.div_ceil(SHARDS).max(1))
            .unwrap_or(NonZeroUsize::MIN);
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(LruCache::new(per_shard)))
            .collect();
        let accounts = AccountGuard::new(&config);
        Self {
            enabled: config.enabled,
            per_64: config.ipv6_prefix == 64,
            settings: std::sync::RwLock::new(Arc::new(Settings::new(config, allow))),
            shards,
            hasher: std::collections::hash_map::RandomState::new(),
            epoch: Instant::now(),
            kernel: OnceLock::new(),
            shared: OnceLock::new(),
            accounts,
            metrics,
        }
    }

    /// An engine that judges nothing (`reputation.enabled = false`).
    pub fn disabled() -> Self {
        let config = ReputationConfig {
            enabled: false,
            max_tracked: SHARDS,
            max_accounts: 1,
            ..ReputationConfig::default()
        };
        Self::new(config, Vec::new(), None)
    }

    fn s(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub const fn enabled(&self) -> bool {
        self.enabled
    }

    /// A reloaded config: weights, thresholds, delays, ban lengths, account rules and the
    /// allowlist apply from now on, the scores and bans so far stay. What sizes or keys
    /// the records (`enabled`, `ipv6_prefix`, `max_tracked`, `max_accounts`) keeps its
    /// old value until a restart; the keys that did are returned.
    pub fn reconfigure(&self, mut config: ReputationConfig, allow: Vec<Cidr>) -> Vec<&'static str> {
        let old = &self.s().config;
        let kept: Vec<&'static str> = [
            ("reputation.enabled", config.enabled != self.enabled),
            (
                "reputation.ipv6_prefix",
                (config.ipv6_prefix == 64) != self.per_64,
            ),
            // A disabled engine is built small: its sizes are not the config's.
            (
                "reputation.max_tracked",
                self.enabled && config.max_tracked != old.max_tracked,
            ),
            (
                "reputation.max_accounts",
                self.enabled && config.max_accounts != old.max_accounts,
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect();
        // Settings keep the sizes in force, so `explain`-like readers see the truth.
        config.enabled = self.enabled;
        config.ipv6_prefix = old.ipv6_prefix;
        config.max_tracked = old.max_tracked;
        config.max_accounts = old.max_accounts;
        *self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(Settings::new(config, allow));
        kept
    }

    /// From now on bans also go into the kernel's ban maps.
    pub fn set_kernel(&self, maps: Arc<Mutex<BanMaps>>) {
        let _ = self.kernel.set(maps);
    }

    /// From now on bans are also shared with the other nodes (PostgreSQL directory).
    pub fn set_shared(&self, shared: Arc<crate::filter::shared_bans::SharedBans>) {
        let _ = self.shared.set(shared);
    }

    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn key(&self, ip: IpAddr) -> Key {
        match ip.to_canonical() {
            IpAddr::V4(a) => Key(u128::from(a.to_ipv6_mapped())),
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                Key(if self.per_64 {
                    bits & !((1u128 << 64) - 1)
                } else {
                    bits
                })
            }
        }
    }

    fn subject(&self, ip: IpAddr) -> String {
        match ip.to_canonical() {
            IpAddr::V6(_) if self.per_64 => {
                format!("{}/64", Ipv6Addr::from(self.key(ip).0))
            }
            other => other.to_string(),
        }
    }

    fn shard(&self, key: Key) -> &Mutex<LruCache<Key, Record>> {
        let hash = self.hasher.hash_one(key);
        &self.shards[(hash as usize) % SHARDS]
    }

    /// Runs `f` on the address's record (created if new), with its score decayed to now.
    fn with_record<T>(
        &self,
        ip: IpAddr,
        create: bool,
        half_life: f32,
        f: impl FnOnce(&mut Record, u32) -> T,
    ) -> Option<T> {
        let key = self.key(ip);
        let now = self.now();
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(record) = shard.get_mut(&key) {
            record.decay(now, half_life);
            return Some(f(record, now));
        }
        if !create {
            return None;
        }
        let mut record = Record::new(now);
        let out = f(&mut record, now);
        let evicted = shard.push(key, record);
        if evicted.is_none()
            && let Some(m) = &self.metrics
        {
            m.tracked.inc();
        }
        Some(out)
    }

    /// The verdict for a new connection. A refused client that keeps coming back earns
    /// `retry_while_refused` (so a bot hammering through temp-fails ends up banned).
    pub fn admit(&self, ip: IpAddr) -> Verdict {
        if !self.enabled() {
            return Verdict::Accept;
        }
        let s = self.s();
        let allowed = s.allows(ip);
        let (verdict, banned) = self
            .with_record(ip, false, s.half_life(), |record, now| {
                (s.verdict(record, now, allowed), record.banned(now))
            })
            .unwrap_or((Verdict::Accept, false));
        // Refused, or over the ban score without a ban yet (thresholds lowered by a
        // reload): coming back counts, and places the ban.
        let verdict = if verdict == Verdict::TempFail || (verdict == Verdict::Ban && !banned) {
            let weight = s.weights[Event::RetryWhileRefused as usize];
            self.score(&s, ip, Event::RetryWhileRefused, weight)
        } else {
            verdict
        };
        if verdict != Verdict::Accept
            && let Some(m) = &self.metrics
        {
            m.verdicts.with_label_values(&[verdict.as_str()]).inc();
        }
        verdict
    }

    /// Scores `event` with its configured weight; the verdict after it.
    pub fn report(&self, ip: IpAddr, event: Event) -> Verdict {
        if !self.enabled {
            return Verdict::Accept;
        }
        let s = self.s();
        let weight = s.weights[event as usize];
        self.score(&s, ip, event, weight)
    }

    /// Scores `event` with `weight` (DNSBL sites carry their own weights).
    pub fn report_weighted(&self, ip: IpAddr, event: Event, weight: f32) -> Verdict {
        if !self.enabled {
            return Verdict::Accept;
        }
        self.score(&self.s(), ip, event, weight)
    }

    fn score(&self, s: &Settings, ip: IpAddr, event: Event, weight: f32) -> Verdict {
        if let Some(m) = &self.metrics {
            m.events.with_label_values(&[event.as_str()]).inc();
        }
        let allowed = s.allows(ip);
        let outcome = self.with_record(ip, true, s.half_life(), |record, now| {
            record.note(event, now);
            // Good behaviour earns at most `tarpit_score` of credit, so a client that built
            // a long clean history cannot spend it on a burst of abuse.
            let floor = -s.config.tarpit_score;
            record.score = (record.score + weight).clamp(floor, 1_000_000.0);
            let was_banned = record.banned(now);
            let verdict = s.verdict(record, now, allowed);
            let new_ban = (verdict == Verdict::Ban && !was_banned).then(|| {
                let ttl = s.ban_ttl(record.bans);
                record.bans = record.bans.saturating_add(1);
                record.banned_until =
                    now.saturating_add(u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX));
                // The ban is the punishment: once it ends the client starts over as
                // suspect (tarpitted) rather than straight back into the ban.
                record.score = record.score.min(s.config.tarpit_score);
                ttl
            });
            (verdict, new_ban)
        });
        let Some((verdict, new_ban)) = outcome else {
            return Verdict::Accept;
        };
        if let Some(ttl) = new_ban {
            self.place_ban(ip, ttl, event);
        }
        verdict
    }

    fn place_ban(&self, ip: IpAddr, ttl: Duration, event: Event) {
        let subject = self.subject(ip);
        let target = match ip.to_canonical() {
            IpAddr::V6(a) if self.per_64 => BanTarget::Ipv6Net64(a),
            other => BanTarget::Address(other),
        };
        let enforced = match self.kernel.get() {
            Some(maps) => {
                let result = maps.lock().unwrap_or_else(PoisonError::into_inner).ban(
                    target,
                    ttl,
                    BanMode::All,
                    event.ban_reason(),
                );
                match result {
                    Ok(()) => "kernel",
                    Err(error) => {
                        tracing::error!(%subject, %error, "reputation ban: kernel ban map failed; enforced by the proxy only");
                        "proxy"
                    }
                }
            }
            None => "proxy",
        };
        if let Some(shared) = self.shared.get() {
            shared.publish(target, ttl, BanMode::All, event.ban_reason());
        }
        tracing::warn!(
            client = %subject,
            seconds = ttl.as_secs(),
            last_event = event.as_str(),
            enforced,
            "reputation: client banned"
        );
        if let Some(m) = &self.metrics {
            m.bans.with_label_values(&[enforced]).inc();
        }
    }

    /// The SMTP greeting delay applies: the test is on and the client has not passed it.
    pub fn greeting_delay(&self, ip: IpAddr) -> Option<Duration> {
        let s = self.s();
        if !self.enabled || s.config.greeting_delay_ms == 0 || s.allows(ip) {
            return None;
        }
        let passed = self
            .with_record(ip, false, s.half_life(), |r, _| {
                r.clean() && r.counts[Event::CleanSession as usize] > 0
            })
            .unwrap_or(false);
        (!passed).then(|| Duration::from_millis(s.config.greeting_delay_ms))
    }

    pub fn tarpit_delay(&self) -> Duration {
        Duration::from_millis(self.s().config.tarpit_delay_ms)
    }

    /// The pause before answering the `n`th failed login of a session (1-based).
    pub fn auth_failure_delay(&self, n: u32) -> Duration {
        if !self.enabled() {
            return Duration::ZERO;
        }
        let s = self.s();
        let c = &s.config;
        let ms = c
            .auth_failure_delay_ms
            .saturating_mul(1u64 << n.saturating_sub(1).min(16));
        Duration::from_millis(ms.min(c.auth_failure_delay_max_ms))
    }

    pub fn explain(&self, ip: IpAddr) -> Option<Explanation> {
        let s = self.s();
        let allowed = s.allows(ip);
        let subject = self.subject(ip);
        self.with_record(ip, false, s.half_life(), |r, now| Explanation {
            subject,
            score: r.score,
            verdict: s.verdict(r, now, allowed),
            allowlisted: allowed,
            bans: r.bans,
            banned_for: r
                .banned(now)
                .then(|| Duration::from_secs(u64::from(r.banned_until - now))),
            counts: Event::ALL
                .iter()
                .filter(|e| r.counts[**e as usize] > 0)
                .map(|e| (*e, r.counts[*e as usize]))
                .collect(),
            recent: (0..RECENT)
                .map(|i| r.recent[(usize::from(r.recent_next) + i) % RECENT])
                .filter_map(|(kind, at)| {
                    let event = *Event::ALL.get(usize::from(kind))?;
                    Some((
                        event,
                        Duration::from_secs(u64::from(now.saturating_sub(at))),
                    ))
                })
                .collect(),
        })
    }

    /// Forgets an address (its score, history and proxy-side ban). The kernel ban, if any,
    /// is lifted separately (`DELETE /api/v1/bans/…`).
    pub fn forget(&self, ip: IpAddr) -> bool {
        let key = self.key(ip);
        let removed = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop(&key)
            .is_some();
        if removed && let Some(m) = &self.metrics {
            m.tracked.dec();
        }
        removed
    }

    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn account_metric(&self, event: &str) {
        if let Some(m) = &self.metrics {
            m.accounts_locked.with_label_values(&[event]).inc();
        }
    }

    /// Before a login for `account` from `ip` reaches a backend: `false` when the account
    /// is locked and `ip` is not one it recently logged in from.
    pub fn login_allowed(&self, account: &str, ip: IpAddr) -> bool {
        if !self.enabled() {
            return true;
        }
        let allowed = self.accounts.allowed(account, self.key(ip).0, self.now());
        if !allowed {
            self.account_metric("refused_while_locked");
            tracing::debug!(%account, client = %ip, "login refused: account locked after failed logins");
        }
        allowed
    }

    /// A failed login: scored for the address and counted for the account.
    pub fn login_failed(&self, account: Option<&str>, ip: IpAddr) -> Verdict {
        if let Some(account) = account
            && self.enabled()
            && self.accounts.failed(account, self.now(), &self.s().config)
        {
            self.account_metric("locked");
            tracing::warn!(%account, "account locked after failed logins");
        }
        self.report(ip, Event::AuthFailure)
    }

    /// A successful login: `ip` may log in to `account` even while it is locked.
    pub fn login_succeeded(&self, account: &str, ip: IpAddr) {
        if self.enabled() {
            self.accounts.succeeded(account, self.key(ip).0, self.now());
        }
    }
}

/// Failed logins per account.
pub struct AccountGuard {
    accounts: Mutex<LruCache<String, AccountRecord>>,
}

/// Addresses an account recently logged in from, exempt from its lock.
const KNOWN_ADDRESSES: usize = 4;

struct AccountRecord {
    failures: f32,
    updated: u32,
    locked_until: u32,
    known: [u128; KNOWN_ADDRESSES],
    known_next: u8,
}

impl AccountGuard {
    fn new(config: &ReputationConfig) -> Self {
        Self {
            accounts: Mutex::new(LruCache::new(
                NonZeroUsize::new(config.max_accounts).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, AccountRecord>> {
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn allowed(&self, account: &str, key: u128, now: u32) -> bool {
        let mut accounts = self.lock();
        let Some(record) = accounts.get_mut(account) else {
            return true;
        };
        record.locked_until <= now || record.known.contains(&key)
    }

    /// Counts a failure; `true` when it locks the account.
    fn failed(&self, account: &str, now: u32, config: &ReputationConfig) -> bool {
        let half_life = config.half_life_seconds as f32;
        let lock_seconds = u32::try_from(config.account_lock_seconds).unwrap_or(u32::MAX);
        let mut accounts = self.lock();
        let record = accounts.get_or_insert_mut(account.to_owned(), || AccountRecord {
            failures: 0.0,
            updated: now,
            locked_until: 0,
            known: [u128::MAX; KNOWN_ADDRESSES],
            known_next: 0,
        });
        let elapsed = now.saturating_sub(record.updated);
        record.failures *= (-(elapsed as f32) / half_life).exp2();
        record.updated = now;
        record.failures += 1.0;
        if record.failures >= config.account_failures && record.locked_until <= now {
            record.locked_until = now.saturating_add(lock_seconds);
            return true;
        }
        false
    }

    fn succeeded(&self, account: &str, key: u128, _now: u32) {
        let mut accounts = self.lock();
        let record = accounts.get_or_insert_mut(account.to_owned(), || AccountRecord {
            failures: 0.0,
            updated: 0,
            locked_until: 0,
            known: [u128::MAX; KNOWN_ADDRESSES],
            known_next: 0,
        });
        if !record.known.contains(&key) {
            record.known[usize::from(record.known_next)] = key;
            record.known_next = (record.known_next + 1) % KNOWN_ADDRESSES as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(extra: &str) -> Reputation {
        let text = format!("[reputation]\n{extra}\n");
        let validated = crate::config::Config::from_toml(&text, std::path::Path::new("t.toml"))
            .expect("valid config");
        Reputation::new(
            validated.config.reputation,
            validated.reputation_allow,
            None,
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn scores_climb_through_tarpit_tempfail_to_ban() {
        let r = engine("");
        let bot = ip("198.51.100.7");
        assert_eq!(r.admit(bot), Verdict::Accept);
        assert_eq!(r.report(bot, Event::Pregreet), Verdict::Tarpit, "6 points");
        assert_eq!(r.report(bot, Event::Pipelining), Verdict::TempFail, "10");
        assert_eq!(r.admit(bot), Verdict::TempFail, "retry while refused: 12");
    }

    #[test]
    fn retrying_while_refused_leads_to_a_ban_with_growing_ttl() {
        let r = engine("");
        let bot = ip("198.51.100.8");
        for _ in 0..10 {
            r.report(bot, Event::AuthFailure);
        }
        assert_eq!(r.admit(bot), Verdict::TempFail, "10 + 2 = 12");
        assert_eq!(r.admit(bot), Verdict::TempFail, "14");
        assert_eq!(r.admit(bot), Verdict::Ban, "16 ≥ 15");
        let e = r.explain(bot).expect("tracked");
        assert_eq!(e.bans, 1);
        assert_eq!(e.banned_for, Some(Duration::from_secs(600)));
        assert!(
            e.score <= 5.0,
            "score drops to the tarpit level: {}",
            e.score
        );
        assert_eq!(r.s().ban_ttl(1), Duration::from_secs(2400), "second ban ×4");
        assert_eq!(r.s().ban_ttl(10), Duration::from_secs(86_400), "capped");
    }

    #[test]
    fn other_addresses_and_allowlisted_ones_are_unaffected() {
        let r = engine("allow = [\"203.0.113.0/24\"]");
        for _ in 0..30 {
            r.report(ip("198.51.100.9"), Event::NonSmtp);
            assert_eq!(r.report(ip("203.0.113.5"), Event::NonSmtp), Verdict::Accept);
        }
        assert_eq!(r.admit(ip("198.51.100.9")), Verdict::Ban);
        assert_eq!(r.admit(ip("198.51.100.10")), Verdict::Accept);
        assert_eq!(r.admit(ip("203.0.113.5")), Verdict::Accept);
        let e = r.explain(ip("203.0.113.5")).expect("scored all the same");
        assert!(e.allowlisted && e.score > 100.0);
    }

    #[test]
    fn ipv6_clients_are_scored_per_64_unless_configured_per_address() {
        let r = engine("");
        r.report(ip("2001:db8:1:2::7"), Event::NonSmtp);
        assert_eq!(r.admit(ip("2001:db8:1:2:ffff::1")), Verdict::TempFail);
        assert_eq!(r.admit(ip("2001:db8:1:3::7")), Verdict::Accept);
        assert_eq!(
            r.explain(ip("2001:db8:1:2::9")).expect("kept").subject,
            "2001:db8:1:2::/64"
        );
        let r = engine("ipv6_prefix = 128");
        r.report(ip("2001:db8:1:2::7"), Event::NonSmtp);
        assert_eq!(r.admit(ip("2001:db8:1:2::8")), Verdict::Accept);
        // A v4-mapped peer (dual-stack socket) is the IPv4 client.
        let r = engine("");
        r.report(ip("::ffff:198.51.100.1"), Event::NonSmtp);
        assert_eq!(r.admit(ip("198.51.100.1")), Verdict::TempFail);
    }

    #[test]
    fn good_behaviour_earns_bounded_credit() {
        let r = engine("");
        let a = ip("198.51.100.15");
        for _ in 0..1000 {
            r.report(a, Event::CleanSession);
        }
        assert!((r.explain(a).expect("kept").score + 5.0).abs() < 0.01);
        // Credit of 5, then 15 points of abuse: refused.
        for _ in 0..15 {
            r.report(a, Event::ProtocolError);
        }
        assert_eq!(r.admit(a), Verdict::TempFail);
    }

    #[test]
    fn a_reload_changes_weights_and_thresholds_but_keeps_records_and_sizes() {
        let r = engine("ban_score = 100.0\ntempfail_score = 100.0\ntarpit_score = 100.0");
        let bot = ip("198.51.100.16");
        r.report(bot, Event::NonSmtp);
        assert_eq!(
            r.admit(bot),
            Verdict::Accept,
            "10 points, thresholds at 100"
        );
        let config: ReputationConfig =
            toml::from_str("max_tracked = 5000\n[weights]\nnon_smtp = 20.0\n").expect("config");
        let kept = r.reconfigure(config, Vec::new());
        assert_eq!(kept, ["reputation.max_tracked"]);
        assert_eq!(
            r.admit(bot),
            Verdict::TempFail,
            "same score, default thresholds"
        );
        assert_eq!(
            r.report(bot, Event::NonSmtp),
            Verdict::Ban,
            "new weight: 12 + 20"
        );
    }

    #[test]
    fn scores_decay_with_the_half_life() {
        let r = engine("half_life_seconds = 1");
        let a = ip("198.51.100.11");
        r.report(a, Event::NonSmtp);
        let mut record = r
            .with_record(a, false, 1.0, |rec, _| rec.clone())
            .expect("kept");
        record.decay(record.updated + 3, 1.0);
        assert!((record.score - 1.25).abs() < 0.01, "{}", record.score);
    }

    #[test]
    fn memory_is_bounded_by_max_tracked() {
        let r = engine("max_tracked = 1600");
        for i in 0..10_000u32 {
            r.report(IpAddr::from(i.to_be_bytes()), Event::ProtocolError);
        }
        assert!(r.tracked() <= 1600, "{}", r.tracked());
        assert!(r.tracked() >= 1500, "shards fill evenly: {}", r.tracked());
    }

    #[test]
    fn explain_lists_counts_and_recent_events_in_order() {
        let r = engine("");
        let a = ip("198.51.100.12");
        assert!(r.explain(a).is_none());
        for event in [
            Event::Pregreet,
            Event::UnknownRecipient,
            Event::UnknownRecipient,
            Event::RelayAttempt,
            Event::ProtocolError,
        ] {
            r.report(a, event);
        }
        let e = r.explain(a).expect("kept");
        assert_eq!(e.counts[1], (Event::UnknownRecipient, 2));
        let recent: Vec<Event> = e.recent.iter().map(|(e, _)| *e).collect();
        assert_eq!(
            recent,
            [
                Event::UnknownRecipient,
                Event::UnknownRecipient,
                Event::RelayAttempt,
                Event::ProtocolError
            ]
        );
        assert!(r.forget(a));
        assert!(r.explain(a).is_none());
    }

    #[test]
    fn clean_clients_skip_the_greeting_delay_once_they_passed() {
        let r = engine("greeting_delay_ms = 500");
        let a = ip("198.51.100.13");
        assert_eq!(r.greeting_delay(a), Some(Duration::from_millis(500)));
        r.report(a, Event::CleanSession);
        assert_eq!(r.greeting_delay(a), None);
        r.report(a, Event::Pregreet);
        assert!(r.greeting_delay(a).is_some(), "suspect again");
    }

    #[test]
    fn accounts_lock_after_failures_except_from_known_addresses() {
        let r = engine("account_failures = 5");
        let home = ip("198.51.100.20");
        r.login_succeeded("victim@example.com", home);
        for i in 0..5u8 {
            assert!(r.login_allowed("victim@example.com", IpAddr::from([203, 0, 113, i])));
            r.login_failed(Some("victim@example.com"), IpAddr::from([203, 0, 113, i]));
        }
        assert!(!r.login_allowed("victim@example.com", ip("203.0.113.99")));
        assert!(r.login_allowed("victim@example.com", home), "known address");
        assert!(r.login_allowed("other@example.com", ip("203.0.113.99")));
        assert_eq!(
            r.admit(ip("203.0.113.1")),
            Verdict::Accept,
            "one failure each: no address is punished"
        );
    }

    #[test]
    fn auth_failure_delays_double_up_to_the_maximum() {
        let r = engine("auth_failure_delay_ms = 100\nauth_failure_delay_max_ms = 350");
        let ms: Vec<u128> = (1..=4)
            .map(|n| r.auth_failure_delay(n).as_millis())
            .collect();
        assert_eq!(ms, [100, 200, 350, 350]);
    }

    #[test]
    fn a_disabled_engine_judges_nothing() {
        let r = Reputation::disabled();
        let a = ip("198.51.100.14");
        for _ in 0..100 {
            assert_eq!(r.report(a, Event::NonSmtp), Verdict::Accept);
        }
        assert_eq!(r.admit(a), Verdict::Accept);
        assert!(r.login_allowed("x", a));
    }
}
