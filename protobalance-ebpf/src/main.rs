//! The protobalance XDP program: the cheap first line of defence in front of the mail proxy.
//!
//! Per packet: parse Ethernet (up to two VLAN tags: 802.1Q, QinQ), IPv4 or IPv6 (extension
//! headers walked with a fixed bound; non-first fragments never read as TCP) and TCP, then
//! in this order: allowlisted source → pass; blocklisted source → drop (both from one
//! longest-prefix lookup in the live generation of the compiled rule tables: DIR-24 array,
//! /32 hash and /25–/31 trie for IPv4, /128 hash and trie for IPv6); source
//! under an unexpired ban (hash of the address, for IPv6 also of its /64) → drop, or only
//! its new connections (SYN without ACK) for a SYN-only ban; a SYN to a mail port from a
//! source over its SYN rate, or in the SYN penalty map → drop ([`syn_limit`]); count every
//! verdict in a per-CPU array, and blocklist drops per list id in another. Anything we cannot parse is *passed* (and counted as
//! malformed) so the kernel stack decides: a parser bug must never black-hole traffic, and the
//! program never returns `XDP_ABORTED`.
// Built for bpfel-unknown-none by protobalance-user's build.rs. On the host (cargo clippy
// --workspace) it compiles as an ordinary program with an empty main, so lints still run.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod parse;
mod rare;
mod syn_limit;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use protobalance_common::{
    ALLOWLIST_MAX_ENTRIES, BAN_ALL, BANS_MAX_ENTRIES, BLOCKLIST_MAX_ENTRIES, BanEntry, BlockEntry,
    CLASS_ALLOW, CLASS_NONE, Counter, CounterValue, DIR_CLASS_MASK, DIR_ENTRIES, DIR_HAS_EXACT,
    DIR_HAS_LONG, DIR_SLOTS_PER_VALUE, DirValue, EXACT_MAX_ENTRIES, GEN_NUMBER, GEN_V6_EXACT,
    GEN_V6_PREFIX, LISTS_MAX, ListGen, ListName, PREFIX_MAX_ENTRIES,
};

use crate::{
    parse::{L4, Parsed, Source},
    rare::Rare,
    syn_limit::SynVerdict,
};

// Map statics are named exactly like protobalance_common::MAP_* (the loader finds them by name).

// The source-of-truth tries: user space keeps them (listing, explaining, counting) and
// compiles them into the generation maps below; the program never reads them.
#[map]
static PB_BLOCK_V4: LpmTrie<[u8; 4], BlockEntry> =
    LpmTrie::with_max_entries(BLOCKLIST_MAX_ENTRIES, 0);

#[map]
static PB_BLOCK_V6: LpmTrie<[u8; 16], BlockEntry> =
    LpmTrie::with_max_entries(BLOCKLIST_MAX_ENTRIES, 0);

#[map]
static PB_ALLOW_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(ALLOWLIST_MAX_ENTRIES, 0);

#[map]
static PB_ALLOW_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(ALLOWLIST_MAX_ENTRIES, 0);

// The compiled rule tables, two generations (see protobalance_common, MAP_LIST_GEN).
#[map]
static PB_LIST_GEN: Array<ListGen> = Array::with_max_entries(1, 0);

#[map]
static PB_V4_DIR_0: Array<DirValue> = Array::with_max_entries(DIR_ENTRIES, BPF_F_MMAPABLE);

#[map]
static PB_V4_DIR_1: Array<DirValue> = Array::with_max_entries(DIR_ENTRIES, BPF_F_MMAPABLE);

#[map]
static PB_V4_EXACT_0: HashMap<[u8; 4], u32> =
    HashMap::with_max_entries(EXACT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static PB_V4_EXACT_1: HashMap<[u8; 4], u32> =
    HashMap::with_max_entries(EXACT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static PB_V4_LONG_0: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(PREFIX_MAX_ENTRIES, 0);

#[map]
static PB_V4_LONG_1: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(PREFIX_MAX_ENTRIES, 0);

#[map]
static PB_V6_EXACT_0: HashMap<[u8; 16], u32> =
    HashMap::with_max_entries(EXACT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static PB_V6_EXACT_1: HashMap<[u8; 16], u32> =
    HashMap::with_max_entries(EXACT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static PB_V6_PREFIX_0: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(PREFIX_MAX_ENTRIES, 0);

#[map]
static PB_V6_PREFIX_1: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(PREFIX_MAX_ENTRIES, 0);

#[map]
static PB_BANS_V4: HashMap<[u8; 4], BanEntry> = HashMap::with_max_entries(BANS_MAX_ENTRIES, 0);

#[map]
static PB_BANS_V6: HashMap<[u8; 16], BanEntry> = HashMap::with_max_entries(BANS_MAX_ENTRIES, 0);

#[map]
static PB_BANS_V6_64: HashMap<[u8; 8], BanEntry> = HashMap::with_max_entries(BANS_MAX_ENTRIES, 0);

#[map]
static PB_COUNTERS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Drops per blocklist list id (bounded: ids from LISTS_MAX on are not counted per list).
#[map]
static PB_LIST_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LISTS_MAX, 0);

/// List names by id: user space only (see protobalance_common::MAP_LIST_NAMES).
#[map]
static PB_LIST_NAMES: Array<ListName> = Array::with_max_entries(LISTS_MAX, 0);

#[xdp]
pub fn protobalance(ctx: XdpContext) -> u32 {
    let (counter, action) = classify(&ctx);
    count(counter, ctx.data_end() - ctx.data());
    action
}

fn classify(ctx: &XdpContext) -> (Counter, u32) {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    let (source, l4) = match parse::packet(ctx) {
        Ok(Parsed::Ip { source, l4 }) => (source, l4),
        Ok(Parsed::NotIp) => return (Counter::PassNonIp, PASS),
        Err(_) => {
            if rare::due(Rare::Malformed) {
                warn!(
                    ctx,
                    "passed a {} byte frame the parser could not read (at most one such line \
                     per second per CPU)",
                    ctx.data_end() - ctx.data()
                );
            }
            return (Counter::PassMalformed, PASS);
        }
    };
    match rule_class(&source) {
        CLASS_NONE => {}
        CLASS_ALLOW => return (Counter::PassAllowlist, PASS),
        class => {
            count_list_hit(u32::from(class) - 1);
            return (Counter::DropBlocklist, DROP);
        }
    }
    if is_banned(&source, matches!(l4, L4::TcpSyn { .. })) {
        return (Counter::DropBan, DROP);
    }
    match l4 {
        L4::Truncated => (Counter::PassMalformed, PASS),
        L4::TcpSyn { dst_port } => {
            let verdict = syn_limit::judge(&source, dst_port);
            if let SynVerdict::DropLimit { penalised: false } = verdict {
                // An event, not a verdict: no bytes, so byte counters still sum to traffic.
                count(Counter::SynPenaltyFull, 0);
                if rare::due(Rare::PenaltyFull) {
                    match &source {
                        Source::V4(addr) => warn!(
                            ctx,
                            "SYN penalty map full: {:i} held by its bucket only (at most one \
                             such line per second per CPU)",
                            *addr
                        ),
                        Source::V6(addr) => warn!(
                            ctx,
                            "SYN penalty map full: the /64 of {:i} held by its bucket only (at \
                             most one such line per second per CPU)",
                            *addr
                        ),
                    }
                }
            }
            match verdict.counter() {
                Some(counter) => (counter, DROP),
                None => (Counter::Pass, PASS),
            }
        }
        L4::Other | L4::Tcp => (Counter::Pass, PASS),
    }
}

/// The class of the longest allowlist or blocklist entry containing the source, from the
/// live generation: `CLASS_NONE`, `CLASS_ALLOW` or a list's class.
#[inline(always)]
fn rule_class(source: &Source) -> u8 {
    let Some(generation) = PB_LIST_GEN.get_ptr(0) else {
        return CLASS_NONE;
    };
    // One aligned 32-bit load: the generation and its flags come from the same write.
    // SAFETY: a successful array lookup's pointer; the field is a plain u32.
    let word = unsafe { core::ptr::read_volatile(&raw const (*generation).live) };
    match source {
        Source::V4(addr) => v4_class(word & GEN_NUMBER, addr),
        Source::V6(addr) => v6_class(word, addr),
    }
}

/// DIR-24 lookup: the /24's byte, then (only when the byte says so) the /32 hash and the
/// /25–/31 trie, longest first.
#[inline(always)]
fn v4_class(live: u32, addr: &[u8; 4]) -> u8 {
    let ip = u32::from_be_bytes(*addr);
    let index = ip >> 14;
    let slot = ((ip >> 8) as usize) % DIR_SLOTS_PER_VALUE;
    let value = if live == 0 {
        PB_V4_DIR_0.get(index)
    } else {
        PB_V4_DIR_1.get(index)
    };
    let Some(value) = value else {
        return CLASS_NONE;
    };
    let byte = value[slot];
    if byte & DIR_HAS_EXACT != 0 {
        let hit = if live == 0 {
            PB_V4_EXACT_0.get_ptr(addr)
        } else {
            PB_V4_EXACT_1.get_ptr(addr)
        };
        if let Some(class) = hit {
            // SAFETY: a successful lookup's pointer to a plain u32.
            return unsafe { *class } as u8;
        }
    }
    if byte & DIR_HAS_LONG != 0 {
        let key = Key::new(32, *addr);
        let hit = if live == 0 {
            PB_V4_LONG_0.get(&key)
        } else {
            PB_V4_LONG_1.get(&key)
        };
        if let Some(class) = hit {
            return *class as u8;
        }
    }
    byte & DIR_CLASS_MASK
}

/// The /128 hash, then the trie of every shorter prefix; each skipped while empty.
#[inline(always)]
fn v6_class(word: u32, addr: &[u8; 16]) -> u8 {
    let live = word & GEN_NUMBER;
    if word & GEN_V6_EXACT != 0 {
        let hit = if live == 0 {
            PB_V6_EXACT_0.get_ptr(addr)
        } else {
            PB_V6_EXACT_1.get_ptr(addr)
        };
        if let Some(class) = hit {
            // SAFETY: a successful lookup's pointer to a plain u32.
            return unsafe { *class } as u8;
        }
    }
    if word & GEN_V6_PREFIX != 0 {
        let key = Key::new(128, *addr);
        let hit = if live == 0 {
            PB_V6_PREFIX_0.get(&key)
        } else {
            PB_V6_PREFIX_1.get(&key)
        };
        if let Some(class) = hit {
            return *class as u8;
        }
    }
    CLASS_NONE
}

fn count_list_hit(list_id: u32) {
    // An id outside the array fails the lookup: bounded by the map itself.
    if let Some(slot) = PB_LIST_HITS.get_ptr_mut(list_id) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup; only this CPU
        // writes its slot while the program runs.
        unsafe { *slot += 1 };
    }
}

/// An unexpired ban of the source that covers this packet: every packet, or only connection
/// openings for a SYN-only ban. For IPv6 both the address and its /64 are consulted, so an
/// expired or SYN-only ban of the address never hides a ban of the whole /64.
fn is_banned(source: &Source, opens_connection: bool) -> bool {
    match source {
        Source::V4(addr) => covers(PB_BANS_V4.get_ptr(addr), opens_connection),
        Source::V6(addr) => {
            let mut net = [0u8; 8];
            net.copy_from_slice(&addr[..8]);
            covers(PB_BANS_V6.get_ptr(addr), opens_connection)
                || covers(PB_BANS_V6_64.get_ptr(net), opens_connection)
        }
    }
}

/// The clock is read only when a ban entry exists: most packets have none.
#[inline(always)]
fn covers(entry: Option<*const BanEntry>, opens_connection: bool) -> bool {
    let Some(entry) = entry else {
        return false;
    };
    // SAFETY: the pointer comes from a successful map lookup and the value is plain data;
    // a concurrent update from user space can at worst mix two valid entries.
    let entry = unsafe { *entry };
    // SAFETY: no preconditions. The coarse clock (CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC
    // at the last tick) costs a load where the precise one cost ~30 ns per packet here; a
    // ban ends at most one tick (1-10 ms) late.
    (entry.mode == BAN_ALL || opens_connection)
        && entry.expires_ns > unsafe { bpf_ktime_get_coarse_ns() }
}

fn count(counter: Counter, len: usize) {
    if let Some(slot) = PB_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup; per-CPU slots
        // are only written by this CPU while the program runs (no concurrent writer).
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += len as u64;
        }
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
