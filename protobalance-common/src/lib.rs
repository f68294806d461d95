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
/// Every map the loader pins under `xdp.pin_dir` (and `filter unload` removes).
pub const PINNED_MAPS: [&str; 8] = [
    MAP_BLOCK_V4,
    MAP_BLOCK_V6,
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
    MAP_BANS_V4,
    MAP_BANS_V6,
    MAP_BANS_V6_64,
    MAP_COUNTERS,
];

/// Name of the XDP program inside the object file.
pub const PROG_XDP: &str = "protobalance";

/// Capacity of each blocklist trie. Large enough for full public DROP/EDROP-style lists.
pub const BLOCKLIST_MAX_ENTRIES: u32 = 262_144;

/// What a blocklist entry carries: which list it came from, so drops can be attributed.
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
}

impl Counter {
    /// Number of counter slots; the size of [`MAP_COUNTERS`].
    pub const COUNT: u32 = 6;
    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Pass,
        Counter::DropBlocklist,
        Counter::PassNonIp,
        Counter::PassMalformed,
        Counter::PassAllowlist,
        Counter::DropBan,
    ];

    /// `(verdict, reason)` labels used for the Prometheus metric.
    pub const fn labels(self) -> (&'static str, &'static str) {
        match self {
            Counter::Pass => ("pass", "allowed"),
            Counter::DropBlocklist => ("drop", "blocklist"),
            Counter::PassNonIp => ("pass", "non_ip"),
            Counter::PassMalformed => ("pass", "malformed"),
            Counter::PassAllowlist => ("pass", "allowlist"),
            Counter::DropBan => ("drop", "ban"),
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) of two u32, no padding.
    unsafe impl aya::Pod for super::BlockEntry {}
    // SAFETY: repr(C) of two u64, no padding.
    unsafe impl aya::Pod for super::CounterValue {}
    // SAFETY: repr(C) of u64 + two u32, no padding.
    unsafe impl aya::Pod for super::BanEntry {}
}
