//! The SYN limiter: caps how fast one source (IPv4 /32, IPv6 /64) may open connections to
//! the mail ports. A token bucket per source lives in an LRU hash; a source that runs out
//! is dropped and put into a small non-LRU penalty hash until its penalty expires, so LRU
//! churn (e.g. from spoofed sources) can never evict a limited source back to a full bucket.
//!
//! Races: two CPUs updating one bucket at once may both take the same token (the update is
//! not atomic); that lets at most a SYN per extra CPU through, which a limiter can afford,
//! and keeps the program free of locks.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use protobalance_common::{
    Counter, SYN_BUCKETS_MAX_ENTRIES, SYN_PENALTY_MAX_ENTRIES, SYN_PORT_WORDS, SynBucket,
    SynLimitConfig, SynSourceKey,
};

use crate::parse::Source;

// Named exactly like protobalance_common::MAP_SYN_* (the loader finds them by name).
#[map]
static PB_SYN_CONFIG: Array<SynLimitConfig> = Array::with_max_entries(1, 0);

#[map]
static PB_SYN_PORTS: Array<u64> = Array::with_max_entries(SYN_PORT_WORDS, 0);

#[map]
static PB_SYN_BUCKETS: LruHashMap<SynSourceKey, SynBucket> =
    LruHashMap::with_max_entries(SYN_BUCKETS_MAX_ENTRIES, 0);

#[map]
static PB_SYN_PENALTY: HashMap<SynSourceKey, u64> =
    HashMap::with_max_entries(SYN_PENALTY_MAX_ENTRIES, 0);

/// What the limiter decided about a SYN.
pub enum SynVerdict {
    /// Not a limited port, limiter off, or a token was available.
    Pass,
    /// Source in the penalty map.
    DropPenalty,
    /// Bucket empty: dropped, source now in the penalty map (`penalised`), or not because
    /// the penalty map was full.
    DropLimit { penalised: bool },
}

impl SynVerdict {
    pub const fn counter(&self) -> Option<Counter> {
        match self {
            SynVerdict::Pass => None,
            SynVerdict::DropPenalty => Some(Counter::DropSynPenalty),
            SynVerdict::DropLimit { .. } => Some(Counter::DropSynLimit),
        }
    }
}

/// Judges a SYN from `source` to `dst_port`.
#[inline(always)]
pub fn judge(source: &Source, dst_port: u16) -> SynVerdict {
    // The array lookup is the cheapest check, so a disabled limiter costs one load.
    let Some(config) = PB_SYN_CONFIG.get(0) else {
        return SynVerdict::Pass;
    };
    let config = *config;
    if !config.enabled() {
        return SynVerdict::Pass;
    }
    let Some(word) = PB_SYN_PORTS.get(u32::from(dst_port) / 64) else {
        return SynVerdict::Pass;
    };
    if (*word >> (dst_port % 64)) & 1 == 0 {
        return SynVerdict::Pass;
    }
    // SAFETY: no preconditions. CLOCK_MONOTONIC_COARSE, like ban checks: refills come in
    // whole ticks (the fraction is kept in the bucket, so the rate is exact over time) and
    // penalties end at most a tick late, for the price of a load instead of a clock read.
    let now_ns = unsafe { bpf_ktime_get_coarse_ns() };
    let key = match source {
        Source::V4(addr) => SynSourceKey::v4(*addr),
        Source::V6(addr) => SynSourceKey::v6(addr),
    };
    let Some(bucket) = PB_SYN_BUCKETS.get_ptr_mut(key) else {
        // No bucket: a new source, or one the LRU evicted, so its penalty (if any) is only
        // in the penalty map.
        if let Some(expires) = PB_SYN_PENALTY.get_ptr(key) {
            // SAFETY: the pointer comes from a successful lookup of a plain u64; a
            // concurrent update can at worst give us the old or the new expiry.
            if unsafe { *expires } > now_ns {
                return SynVerdict::DropPenalty;
            }
        }
        // A full bucket, minus this SYN's token. If the insert fails, passing is what a
        // fresh bucket would have decided anyway (burst ≥ 1).
        let _ = PB_SYN_BUCKETS.insert(key, SynBucket::first(&config, now_ns), BPF_ANY.into());
        return SynVerdict::Pass;
    };
    // SAFETY: the pointer comes from a successful lookup and the value is plain data;
    // concurrent writers only make the count approximate (see the module comment).
    let bucket = unsafe { &mut *bucket };
    if bucket.penalty_ns > now_ns {
        return SynVerdict::DropPenalty;
    }
    if bucket.take(&config, now_ns) {
        return SynVerdict::Pass;
    }
    let expires = now_ns.saturating_add(config.penalty_ns);
    bucket.penalty_ns = expires;
    // BPF_ANY also replaces an expired entry of this source (an update of an existing key
    // never needs a free slot); a new key fails when the map is full.
    let penalised = PB_SYN_PENALTY.insert(key, expires, BPF_ANY.into()).is_ok();
    SynVerdict::DropLimit { penalised }
}
