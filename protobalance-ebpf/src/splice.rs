//! The protobalance kernel splice: an `sk_skb` stream-verdict program on a sockhash.
//!
//! After a POP3/IMAP login over plain TCP, user space puts the client and backend sockets
//! in [`PB_SPLICE_SOCKS`] (keyed by socket cookie) and records each one's peer in
//! [`PB_SPLICE_PEERS`]. Every segment that then arrives on either socket is redirected to
//! the peer's send side inside the kernel, so a relayed command and its answer never wake
//! the proxy. The program counts the bytes it redirected per source socket; user space
//! reads the count at end of stream to pass the FIN on only after the peer was given them.
//!
//! A segment with no peer entry, or whose peer is not (or no longer) in the sockhash, is
//! passed to the socket's own receive queue: user space reads and forwards it. The only
//! segment dropped is an empty one (a bare FIN, see below): it carries no byte.
// Built for bpfel-unknown-none by protobalance-user's build.rs. On the host (cargo clippy
// --workspace) it compiles as an ordinary program with an empty main, so lints still run.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, sk_action},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use protobalance_common::{SPLICE_MAX_SOCKETS, SplicePeer};

// Named exactly like protobalance_common::MAP_SPLICE_* (the loader finds them by name).
#[map]
static PB_SPLICE_SOCKS: SockHash<u64> = SockHash::with_max_entries(SPLICE_MAX_SOCKETS, 0);

#[map]
static PB_SPLICE_PEERS: HashMap<u64, SplicePeer> =
    HashMap::with_max_entries(SPLICE_MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[stream_verdict]
pub fn pb_splice(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context of an sk_skb program is a socket buffer, which the helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(entry) = PB_SPLICE_PEERS.get_ptr_mut(cookie) else {
        return sk_action::SK_PASS;
    };
    let len = ctx.len();
    if len == 0 {
        // A bare FIN. An empty segment on any psock queue (the peer's send side, or this
        // socket's own queue while it holds bytes for its client) is taken for a broken
        // pipe: an error on that socket and the rest of its queue dropped. The FIN has
        // already marked the socket shut for reading, which user space sees as the end of
        // the stream without the empty segment, so it is dropped here.
        return sk_action::SK_DROP;
    }
    // SAFETY: a value from a successful lookup; user space never changes `peer` while the
    // socket is in the sockhash.
    let mut peer = unsafe { (*entry).peer };
    let verdict = PB_SPLICE_SOCKS.redirect_skb(&ctx, &mut peer, 0);
    if verdict == i64::from(sk_action::SK_PASS) {
        // SAFETY: as above; this socket's receive path is serialized by its lock, so no
        // other update of this entry's count runs at the same time.
        unsafe { (*entry).forwarded += u64::from(len) };
    }
    // Redirected, or (no peer in the sockhash) left for user space to forward.
    sk_action::SK_PASS
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
