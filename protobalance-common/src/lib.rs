//! Types shared by the XDP program (`protobalance-ebpf`) and its user-space loader
//! (`protobalance-user::filter::xdp`): map names, map key/value layouts and counter ids.
//!
//! Everything here is `#[repr(C)]` and `no_std`: both sides must agree on the exact bytes.
#![no_std]

/// Name of the IPv4 source blocklist (LPM trie keyed by `{prefix_len: u32, addr: [u8; 4]}`
/// in network byte order, value [`BlockEntry`]).
pub const MAP_BLOCK_V4: &str = "PB_BLOCK_V4";
/// Name of the IPv6 source blocklist (LPM trie keyed by `{prefix_len: u32, addr: [u8; 16]}`,
/// value [`BlockEntry`]).
pub const MAP_BLOCK_V6: &str = "PB_BLOCK_V6";
/// Name of the IPv4 allowlist (LPM trie like the blocklist; value: list id). Allowed
/// sources pass before any other rule.
pub const MAP_ALLOW_V4: &str = "PB_ALLOW_V4";
/// Name of the IPv6 allowlist.
pub const MAP_ALLOW_V6: &str = "PB_ALLOW_V6";
/// Name of the IPv4 bans (hash: address in network byte order -> [`BanEntry`]).
pub const MAP_BANS_V4: &str = "PB_BANS_V4";
/// Name of the IPv6 bans of single addresses (hash: 16 bytes -> [`BanEntry`]).
pub const MAP_BANS_V6: &str = "PB_BANS_V6";
/// Name of the IPv6 bans of whole /64 networks (hash: first 8 bytes -> [`BanEntry`]).
pub const MAP_BANS_V6_64: &str = "PB_BANS_V6_64";
/// Capacity of each bans map and of each allowlist.
pub const BANS_MAX_ENTRIES: u32 = 65_536;
pub const ALLOWLIST_MAX_ENTRIES: u32 = 16_384;

/// A timed ban: drop while `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) is below `expires_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BanEntry {
    pub expires_ns: u64,
    /// [`BAN_ALL`] or [`BAN_SYN_ONLY`].
    pub mode: u32,
    /// Why (reputation verdict, API, …); reported by the user side, not used in the kernel.
    pub reason: u32,
}

/// Drop every packet of the banned source.
pub const BAN_ALL: u32 = 0;
/// Drop only new connections (TCP SYN without ACK); established ones continue.
pub const BAN_SYN_ONLY: u32 = 1;

/// Name of the per-CPU verdict counters (array indexed by [`Counter`], value [`CounterValue`]).
pub const MAP_COUNTERS: &str = "PB_COUNTERS";
/// Name of the per-list hit counters: a per-CPU array indexed by [`BlockEntry::list_id`]
/// (`0..LISTS_MAX`), value: packets dropped by a blocklist entry of that list.
pub const MAP_LIST_HITS: &str = "PB_LIST_HITS";
/// Name of the list names: an array indexed by list id, value [`ListName`]. Only user
/// space reads and writes it (the program never looks at it); it lives in the object so it
/// is created and pinned with the other maps, and a restart keeps each name on its id.
pub const MAP_LIST_NAMES: &str = "PB_LIST_NAMES";
/// List ids with their own hit counter and name: `0..LISTS_MAX`. An entry with a larger
/// id still drops, but is counted only in the verdict counters.
pub const LISTS_MAX: u32 = 61;
/// Bytes of a list name.
pub const LIST_NAME_LEN: usize = 64;
/// A list name: UTF-8, NUL-padded; all zeros = no list has this id.
pub type ListName = [u8; LIST_NAME_LEN];

/// The compiled rule tables of both generations and their selector (see [`MAP_LIST_GEN`]).
pub const GENERATION_MAPS: [&str; 11] = [
    MAP_LIST_GEN,
    MAP_V4_DIR[0],
    MAP_V4_DIR[1],
    MAP_V4_EXACT[0],
    MAP_V4_EXACT[1],
    MAP_V4_LONG[0],
    MAP_V4_LONG[1],
    MAP_V6_EXACT[0],
    MAP_V6_EXACT[1],
    MAP_V6_PREFIX[0],
    MAP_V6_PREFIX[1],
];

/// `a` then `b`, as one array of `N` (= A + B, checked at compile time) names.
pub const fn concat_names<const A: usize, const B: usize, const N: usize>(
    a: [&'static str; A],
    b: [&'static str; B],
) -> [&'static str; N] {
    assert!(A + B == N, "N must be A + B");
    let mut out = [""; N];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - A];
        i += 1;
    }
    out
}

/// Every map the loader pins under `xdp.pin_dir` (and `filter unload` removes).
pub const PINNED_MAPS: [&str; 25] = concat_names(
    GENERATION_MAPS,
    [
        MAP_BLOCK_V4,
        MAP_BLOCK_V6,
        MAP_ALLOW_V4,
        MAP_ALLOW_V6,
        MAP_BANS_V4,
        MAP_BANS_V6,
        MAP_BANS_V6_64,
        MAP_COUNTERS,
        MAP_SYN_LIMIT_CONFIG,
        MAP_SYN_PORTS,
        MAP_SYN_BUCKETS,
        MAP_SYN_PENALTY,
        MAP_LIST_HITS,
        MAP_LIST_NAMES,
    ],
);

/// Name of the XDP program inside the object file.
pub const PROG_XDP: &str = "protobalance";

/// Capacity of each blocklist trie (allocated as entries are added, not up front): 2 M
/// entries, for aggregated feeds of a million bot addresses and more.
pub const BLOCKLIST_MAX_ENTRIES: u32 = 2_097_152;

// The rule tables the program reads: the allowlist and blocklists compiled by user space
// into one longest-prefix-match function per family, in two generations, so a whole new
// set of lists replaces the old one atomically (see protobalance-user's
// filter::xdp::generations for the design and the proof that the verdicts equal the
// reference model's). The tries above stay the source of truth that user space lists,
// explains and counts from; the program itself never reads them.
//
// IPv4, per generation g:
// * `PB_V4_DIR_g` — DIR-24 first stage: one byte per /24 ([`CLASS_*`] in the low six bits,
//   [`DIR_HAS_EXACT`], [`DIR_HAS_LONG`]), packed [`DIR_SLOTS_PER_VALUE`] to an array
//   value, indexed by the top 18 bits of the address (16 MiB, mmap-able, written by user
//   space as memory);
// * `PB_V4_EXACT_g` — hash of /32 entries: address -> class, consulted only when the /24's
//   byte has [`DIR_HAS_EXACT`];
// * `PB_V4_LONG_g` — LPM trie of /25–/31 entries -> class, only when [`DIR_HAS_LONG`].
// IPv6: `PB_V6_EXACT_g` (hash of /128 entries) then `PB_V6_PREFIX_g` (LPM trie of the
// rest), each skipped while empty (flags in [`ListGen::live`]).

/// Name of the generation selector: an array with one [`ListGen`] at index 0.
pub const MAP_LIST_GEN: &str = "PB_LIST_GEN";
pub const MAP_V4_DIR: [&str; 2] = ["PB_V4_DIR_0", "PB_V4_DIR_1"];
pub const MAP_V4_EXACT: [&str; 2] = ["PB_V4_EXACT_0", "PB_V4_EXACT_1"];
pub const MAP_V4_LONG: [&str; 2] = ["PB_V4_LONG_0", "PB_V4_LONG_1"];
pub const MAP_V6_EXACT: [&str; 2] = ["PB_V6_EXACT_0", "PB_V6_EXACT_1"];
pub const MAP_V6_PREFIX: [&str; 2] = ["PB_V6_PREFIX_0", "PB_V6_PREFIX_1"];

/// /24 slots per `PB_V4_DIR_g` value (one byte each).
pub const DIR_SLOTS_PER_VALUE: usize = 64;
/// `PB_V4_DIR_g` entries: 2²⁴ /24 slots / [`DIR_SLOTS_PER_VALUE`].
pub const DIR_ENTRIES: u32 = (1 << 24) / DIR_SLOTS_PER_VALUE as u32;
/// One `PB_V4_DIR_g` value.
pub type DirValue = [u8; DIR_SLOTS_PER_VALUE];
/// Capacity of the exact-match hashes (allocated as entries are added): room for every
/// blocklist and allowlist entry, so whatever the tries accept also compiles.
pub const EXACT_MAX_ENTRIES: u32 = BLOCKLIST_MAX_ENTRIES + ALLOWLIST_MAX_ENTRIES;
/// Capacity of `PB_V4_LONG_g` and `PB_V6_PREFIX_g` (likewise).
pub const PREFIX_MAX_ENTRIES: u32 = BLOCKLIST_MAX_ENTRIES + ALLOWLIST_MAX_ENTRIES;

/// A DIR byte's class bits.
pub const DIR_CLASS_MASK: u8 = 0x3f;
/// Some /32 entry lies inside this /24: consult `PB_V4_EXACT_g` first.
pub const DIR_HAS_EXACT: u8 = 0x40;
/// Some /25–/31 entry lies inside this /24: consult `PB_V4_LONG_g` next.
pub const DIR_HAS_LONG: u8 = 0x80;
/// Class: no rule.
pub const CLASS_NONE: u8 = 0;
/// Class: allowlisted (passes before bans and the SYN limiter).
pub const CLASS_ALLOW: u8 = 63;
/// Classes `1..=LISTS_MAX + 1` are "blocked by list id `class - 1`"; list ids from
/// [`LISTS_MAX`] on share the last one (they drop but have no per-list counter).
pub const fn class_of_list(list_id: u32) -> u8 {
    let id = if list_id < LISTS_MAX {
        list_id
    } else {
        LISTS_MAX
    };
    id as u8 + 1
}

/// [`ListGen::live`] bit: the generation (0 or 1) whose maps are live.
pub const GEN_NUMBER: u32 = 1;
/// [`ListGen::live`] bit: `PB_V6_EXACT_g` of the live generation has entries.
pub const GEN_V6_EXACT: u32 = 2;
/// [`ListGen::live`] bit: `PB_V6_PREFIX_g` of the live generation has entries.
pub const GEN_V6_PREFIX: u32 = 4;

/// Which generation the program reads; user space flips it after filling the other one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListGen {
    /// The live generation ([`GEN_NUMBER`]) and what its IPv6 maps hold
    /// ([`GEN_V6_EXACT`], [`GEN_V6_PREFIX`]), in one word: the program reads it with a
    /// single load, so a packet never pairs one generation with the other's flags.
    pub live: u32,
    /// Unused (zero).
    pub reserved: u32,
    /// Counts generations published since the maps were created (the metric).
    pub serial: u64,
}

/// What a blocklist entry carries: which list it came from, so drops can be attributed
/// (see [`MAP_LIST_HITS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockEntry {
    pub list_id: u32,
    pub flags: u32,
}

/// One per-CPU counter slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Verdict counters, one slot each in [`MAP_COUNTERS`]. The discriminant is the index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IPv4/IPv6 packet whose source is not blocklisted.
    Pass = 0,
    /// Packet dropped because its source matched a blocklist entry.
    DropBlocklist = 1,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed untouched.
    PassNonIp = 2,
    /// Truncated or malformed headers: passed for the kernel stack to judge, never aborted.
    PassMalformed = 3,
    /// Source in the allowlist: passed before any other rule.
    PassAllowlist = 4,
    /// Source under an unexpired ban.
    DropBan = 5,
    /// SYN to a mail port from a source whose token bucket was empty; the source was put
    /// into the penalty map (or, if that was full, [`Counter::SynPenaltyFull`] says so).
    DropSynLimit = 6,
    /// SYN to a mail port from a source in the SYN-limiter penalty map.
    DropSynPenalty = 7,
    /// Not a verdict but an event: a [`Counter::DropSynLimit`] drop whose source could not
    /// be put into the penalty map because it was full. The packet is counted as
    /// `DropSynLimit` too; only the penalty is missing (its bucket still limits it).
    SynPenaltyFull = 8,
}

impl Counter {
    /// Number of counter slots; the size of [`MAP_COUNTERS`].
    pub const COUNT: u32 = 9;
    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Pass,
        Counter::DropBlocklist,
        Counter::PassNonIp,
        Counter::PassMalformed,
        Counter::PassAllowlist,
        Counter::DropBan,
        Counter::DropSynLimit,
        Counter::DropSynPenalty,
        Counter::SynPenaltyFull,
    ];

    /// `(verdict, reason)` labels used for the Prometheus packet/byte metrics, or `None`
    /// for an event counter ([`Counter::SynPenaltyFull`]): every packet is counted in
    /// exactly one slot that has labels, so those slots sum to all packets seen.
    pub const fn labels(self) -> Option<(&'static str, &'static str)> {
        Some(match self {
            Counter::Pass => ("pass", "allowed"),
            Counter::DropBlocklist => ("drop", "blocklist"),
            Counter::PassNonIp => ("pass", "non_ip"),
            Counter::PassMalformed => ("pass", "malformed"),
            Counter::PassAllowlist => ("pass", "allowlist"),
            Counter::DropBan => ("drop", "ban"),
            Counter::DropSynLimit => ("drop", "syn_limit"),
            Counter::DropSynPenalty => ("drop", "syn_penalty"),
            Counter::SynPenaltyFull => return None,
        })
    }
}

// ---- SYN limiter -------------------------------------------------------------------------
//
// For TCP SYNs (SYN without ACK) to a port in [`MAP_SYN_PORTS`] that passed the allowlist,
// blocklist and bans: one token bucket per source (IPv4 /32, IPv6 /64) in an LRU hash
// ([`MAP_SYN_BUCKETS`]). A SYN without a token is dropped and its source goes into the
// non-LRU penalty hash ([`MAP_SYN_PENALTY`]) until `now + penalty_ns`; while there, all
// its SYNs to those ports are dropped, even when the LRU has evicted its bucket. So churning
// the LRU with spoofed sources can never hand a limited source a fresh, full bucket early.
//
// Kernel map names are at most 15 bytes (BPF_OBJ_NAME_LEN), hence the short names.

/// Name of the limiter's settings: an array with one [`SynLimitConfig`] at index 0.
pub const MAP_SYN_LIMIT_CONFIG: &str = "PB_SYN_CONFIG";
/// Name of the set of limited destination ports: a bitmap, an array of
/// [`SYN_PORT_WORDS`] u64 words; port p is bit `p % 64` of word `p / 64` (an array lookup
/// the verifier inlines, where a hash lookup cost ~20 ns per SYN).
pub const MAP_SYN_PORTS: &str = "PB_SYN_PORTS";
/// Words of the port bitmap: 65 536 bits.
pub const SYN_PORT_WORDS: u32 = 1024;
/// Name of the token buckets (LRU hash: [`SynSourceKey`] -> [`SynBucket`]).
pub const MAP_SYN_BUCKETS: &str = "PB_SYN_BUCKETS";
/// Name of the penalty map (hash, not LRU: [`SynSourceKey`] -> expiry, CLOCK_MONOTONIC ns).
pub const MAP_SYN_PENALTY: &str = "PB_SYN_PENALTY";
/// Most ports the limiter can watch.
pub const SYN_PORTS_MAX_ENTRIES: u32 = 64;
/// Token buckets kept; the least recently used one is evicted beyond this (an evicted
/// source simply starts again with a full bucket, unless it is in the penalty map).
pub const SYN_BUCKETS_MAX_ENTRIES: u32 = 65_536;
/// Sources that can be in the penalty at the same time. When full, a limited source is
/// still dropped but only its (empty) bucket holds it back ([`Counter::SynPenaltyFull`]).
pub const SYN_PENALTY_MAX_ENTRIES: u32 = 16_384;
/// One SYN's worth of tokens: buckets hold tokens × 10⁹, so a refill of `rate` tokens per
/// second is exactly `rate` units per elapsed nanosecond (integer arithmetic only).
pub const SYN_TOKEN: u64 = 1_000_000_000;

/// [`SynSourceKey::family`] of an IPv4 source (the key holds the address, zero padded).
pub const SYN_SOURCE_V4: u32 = 4;
/// [`SynSourceKey::family`] of an IPv6 source (the key holds its /64).
pub const SYN_SOURCE_V6_64: u32 = 6;

/// The limiter's settings, changed by user space without reloading the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynLimitConfig {
    /// Tokens added per second; 0 turns the limiter off.
    pub rate_per_second: u32,
    /// Bucket capacity (and the start value of a new bucket); 0 also turns the limiter off.
    pub burst: u32,
    /// How long a source that ran out of tokens stays in the penalty map.
    pub penalty_ns: u64,
}

impl SynLimitConfig {
    /// Whether the limiter judges packets at all.
    pub const fn enabled(&self) -> bool {
        self.rate_per_second > 0 && self.burst > 0
    }
}

/// Who a bucket or penalty belongs to. The family keeps an IPv4 address and an IPv6 /64
/// with the same leading bytes apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SynSourceKey {
    /// [`SYN_SOURCE_V4`] or [`SYN_SOURCE_V6_64`].
    pub family: u32,
    /// IPv4: the 4 address bytes then zeros. IPv6: the first 8 bytes (the /64).
    pub addr: [u8; 8],
}

impl SynSourceKey {
    pub const fn v4(addr: [u8; 4]) -> Self {
        Self {
            family: SYN_SOURCE_V4,
            addr: [addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0],
        }
    }

    /// The /64 of `addr`.
    pub const fn v6(addr: &[u8; 16]) -> Self {
        Self {
            family: SYN_SOURCE_V6_64,
            addr: [
                addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
            ],
        }
    }
}

/// One source's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynBucket {
    /// Tokens × [`SYN_TOKEN`], at most `burst × SYN_TOKEN`.
    pub tokens: u64,
    /// When `tokens` was last brought up to date (CLOCK_MONOTONIC ns).
    pub updated_ns: u64,
    /// Until when this source is in the penalty (CLOCK_MONOTONIC ns; 0: never was). A copy
    /// of its penalty-map entry, so a SYN from a source with a bucket costs one lookup, not
    /// two; the penalty map is consulted only for a source without a bucket (new, or
    /// evicted from the LRU), which keeps a limited source limited through LRU churn.
    pub penalty_ns: u64,
}

impl SynBucket {
    /// A new source's bucket after its first SYN took a token. `config` must be
    /// [`SynLimitConfig::enabled`] (burst ≥ 1).
    pub const fn first(config: &SynLimitConfig, now_ns: u64) -> Self {
        Self {
            tokens: capacity(config).saturating_sub(SYN_TOKEN),
            updated_ns: now_ns,
            penalty_ns: 0,
        }
    }

    /// Refills for the time since the last update, then takes one token if there is one.
    /// Returns whether the SYN may pass. No floats, no loops, no overflow for any `u32`
    /// rate and burst: `capacity ≤ 2³² × 10⁹ < 2⁶³`, the refill is only multiplied out when
    /// it is known to stay below the capacity, so `tokens + refill < 2⁶⁴`.
    pub fn take(&mut self, config: &SynLimitConfig, now_ns: u64) -> bool {
        let rate = config.rate_per_second as u64;
        let capacity = capacity(config);
        // A clock that went backwards (never with CLOCK_MONOTONIC) refills nothing.
        let elapsed = now_ns.saturating_sub(self.updated_ns);
        let refill = if elapsed < 1 << 31 {
            // The usual case (SYNs of one source come seconds apart at most), without a
            // division: elapsed < 2³¹ and rate < 2³², so the product fits.
            elapsed * rate
        } else {
            // Time to fill an empty bucket; `None` only for rate 0, which refills nothing.
            let fill_ns = capacity.checked_div(rate).unwrap_or(u64::MAX);
            if elapsed >= fill_ns {
                capacity
            } else {
                // elapsed < capacity / rate, so elapsed × rate < capacity: no overflow.
                elapsed * rate
            }
        };
        self.tokens = self.tokens.saturating_add(refill).min(capacity);
        self.updated_ns = now_ns;
        if self.tokens >= SYN_TOKEN {
            self.tokens -= SYN_TOKEN;
            true
        } else {
            false
        }
    }
}

/// The bucket capacity in token units.
const fn capacity(config: &SynLimitConfig) -> u64 {
    config.burst as u64 * SYN_TOKEN
}

/// The kernel splice (`protobalance-splice`, an `sk_skb` stream-verdict program): after a
/// POP3/IMAP login over plain TCP, both sockets go into [`MAP_SPLICE_SOCKS`] and the
/// program moves every byte that arrives on one to the other's send side without waking
/// user space.
pub const PROG_SPLICE: &str = "pb_splice";
/// Sockets being spliced (sockhash keyed by socket cookie).
pub const MAP_SPLICE_SOCKS: &str = "PB_SPLICE_SOCKS";
/// Socket cookie -> [`SplicePeer`] (hash; entries are written by user space, the program
/// only counts in them).
pub const MAP_SPLICE_PEERS: &str = "PB_SPLICE_PEERS";
/// Sockets both maps hold (two per spliced session); a full map makes new sessions relay
/// in user space.
pub const SPLICE_MAX_SOCKETS: u32 = 262_144;

/// Where the bytes arriving on one spliced socket go, and how many went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplicePeer {
    /// Cookie of the socket the bytes are redirected to.
    pub peer: u64,
    /// Bytes redirected so far. Only the program writes it, one update at a time (a
    /// socket's receive path runs under its lock); user space reads it to know when the
    /// peer has been given everything before it passes an end of stream on.
    pub forwarded: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) of two u32, no padding.
    unsafe impl aya::Pod for super::BlockEntry {}

    // SAFETY: repr(C), plain integers, no padding.
    unsafe impl aya::Pod for super::ListGen {}
    // SAFETY: repr(C) of two u64, no padding.
    unsafe impl aya::Pod for super::CounterValue {}
    // SAFETY: repr(C) of u64 + two u32, no padding.
    unsafe impl aya::Pod for super::BanEntry {}
    // SAFETY: repr(C) of two u32 + u64, no padding.
    unsafe impl aya::Pod for super::SynLimitConfig {}
    // SAFETY: repr(C) of u32 + [u8; 8] (12 bytes, alignment 4), no padding.
    unsafe impl aya::Pod for super::SynSourceKey {}
    // SAFETY: repr(C) of two u64, no padding.
    unsafe impl aya::Pod for super::SynBucket {}
    // SAFETY: repr(C) of two u64, no padding.
    unsafe impl aya::Pod for super::SplicePeer {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn config(rate_per_second: u32, burst: u32) -> SynLimitConfig {
        SynLimitConfig {
            rate_per_second,
            burst,
            penalty_ns: 60 * SECOND,
        }
    }

    fn passes(bucket: &mut SynBucket, config: &SynLimitConfig, now: u64, n: usize) -> usize {
        (0..n).filter(|_| bucket.take(config, now)).count()
    }

    #[test]
    fn burst_then_rate() {
        let c = config(1, 3);
        let t0 = 5 * SECOND;
        let mut b = SynBucket::first(&c, t0);
        assert_eq!(passes(&mut b, &c, t0, 10), 2, "burst 3 = first + 2");
        assert_eq!(passes(&mut b, &c, t0 + SECOND / 2, 5), 0, "half a token");
        assert_eq!(
            passes(&mut b, &c, t0 + SECOND, 5),
            1,
            "one token per second"
        );
        assert_eq!(
            passes(&mut b, &c, t0 + 100 * SECOND, 10),
            3,
            "capped at burst"
        );
    }

    #[test]
    fn fractional_refills_accumulate() {
        let c = config(5, 10);
        let mut b = SynBucket::first(&c, 0);
        assert_eq!(passes(&mut b, &c, 0, 20), 9);
        // Ten steps of 20 ms = 200 ms = exactly one token at 5/s.
        let got: usize = (1..=10u64)
            .map(|i| passes(&mut b, &c, i * 20_000_000, 1))
            .sum();
        assert_eq!(got, 1);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let huge = config(u32::MAX, u32::MAX);
        let mut b = SynBucket::first(&huge, 0);
        assert!(b.take(&huge, u64::MAX));
        assert_eq!(b.tokens, u64::from(u32::MAX) * SYN_TOKEN - SYN_TOKEN);
        let slow = config(1, u32::MAX);
        let mut b = SynBucket {
            tokens: 0,
            updated_ns: 0,
            penalty_ns: 0,
        };
        assert!(b.take(&slow, u64::MAX));
        // A clock behind the bucket refills nothing.
        let c = config(1, 1);
        let mut b = SynBucket {
            tokens: 0,
            updated_ns: 10 * SECOND,
            penalty_ns: 0,
        };
        assert!(!b.take(&c, SECOND));
        assert!(!config(0, 5).enabled() && !config(5, 0).enabled());
    }

    #[test]
    fn source_keys_keep_families_apart() {
        let v4 = SynSourceKey::v4([1, 2, 3, 4]);
        let mut v6 = [0u8; 16];
        v6[..4].copy_from_slice(&[1, 2, 3, 4]);
        assert_ne!(v4, SynSourceKey::v6(&v6));
        v6[15] = 9;
        let mut other = v6;
        other[8] = 7;
        assert_eq!(SynSourceKey::v6(&v6), SynSourceKey::v6(&other), "same /64");
        assert_eq!(core::mem::size_of::<SynSourceKey>(), 12);
    }
}
