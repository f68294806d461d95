//! The protobalance XDP program: the cheap first line of defence in front of the mail proxy.
//!
//! Per packet: parse Ethernet (with one 802.1Q/802.1ad tag), IPv4 or IPv6 and — for the later
//! SYN limiter — TCP; drop when the source address is in the v4/v6 LPM-trie blocklist; count
//! every verdict in a per-CPU array. Anything we cannot parse is *passed* (and counted as
//! malformed) so the kernel stack decides: a parser bug must never black-hole traffic, and the
//! program never returns `XDP_ABORTED`.
// Built for bpfel-unknown-none by protobalance-user's build.rs. On the host (cargo clippy
// --workspace) it compiles as an ordinary program with an empty main, so lints still run.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use protobalance_common::{BLOCKLIST_MAX_ENTRIES, BlockEntry, Counter, CounterValue};

use crate::parse::{Parsed, Source};

// Map statics are named exactly like protobalance_common::MAP_* (the loader finds them by name).
#[map]
static PB_BLOCK_V4: LpmTrie<[u8; 4], BlockEntry> =
    LpmTrie::with_max_entries(BLOCKLIST_MAX_ENTRIES, 0);

#[map]
static PB_BLOCK_V6: LpmTrie<[u8; 16], BlockEntry> =
    LpmTrie::with_max_entries(BLOCKLIST_MAX_ENTRIES, 0);

#[map]
static PB_COUNTERS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[xdp]
pub fn protobalance(ctx: XdpContext) -> u32 {
    let (counter, action) = classify(&ctx);
    count(counter, ctx.data_end() - ctx.data());
    action
}

fn classify(ctx: &XdpContext) -> (Counter, u32) {
    let parsed = match parse::packet(ctx) {
        Ok(parsed) => parsed,
        Err(_) => return (Counter::PassMalformed, xdp_action::XDP_PASS),
    };
    let source = match parsed {
        Parsed::NotIp => return (Counter::PassNonIp, xdp_action::XDP_PASS),
        Parsed::Ip { source, .. } => source,
    };
    if is_blocklisted(&source) {
        return (Counter::DropBlocklist, xdp_action::XDP_DROP);
    }
    match parsed {
        Parsed::Ip { l4_ok: false, .. } => (Counter::PassMalformed, xdp_action::XDP_PASS),
        _ => (Counter::Pass, xdp_action::XDP_PASS),
    }
}

fn is_blocklisted(source: &Source) -> bool {
    match source {
        Source::V4(addr) => PB_BLOCK_V4.get(Key::new(32, *addr)).is_some(),
        Source::V6(addr) => PB_BLOCK_V6.get(Key::new(128, *addr)).is_some(),
    }
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
