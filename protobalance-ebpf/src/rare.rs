//! Rare diagnostic events, logged through aya-log (surfaced in protobalance's own log) at
//! most once per second per CPU and per kind: an attack made of such packets must not turn
//! into a flood of log records. Never on the common path: only frames the parser gave up on
//! and SYN-limited sources the full penalty map could not take.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, macros::map, maps::PerCpuArray};

/// The kinds, as indexes of [`PB_LOG_RATE`].
#[derive(Clone, Copy)]
pub enum Rare {
    Malformed = 0,
    PenaltyFull = 1,
}

const KINDS: u32 = 2;
const INTERVAL_NS: u64 = 1_000_000_000;

/// When each kind was last logged on this CPU (CLOCK_MONOTONIC_COARSE ns, 0: never).
#[map]
static PB_LOG_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(KINDS, 0);

/// Whether a record of `kind` may be written now (and if so, notes that it was).
#[inline(always)]
pub fn due(kind: Rare) -> bool {
    let Some(last) = PB_LOG_RATE.get_ptr_mut(kind as u32) else {
        return false;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a per-CPU slot from a successful lookup; only this CPU writes it.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}
