//! Splicing a logged-in POP3/IMAP session inside the kernel (`[splice] kernel = "auto"`).
//!
//! The user-space relay copies every relayed command and answer through the edge, which is
//! on the path of each of them. When both sides are plain TCP, the sockets go into a
//! sockhash instead, with the `protobalance-splice` stream-verdict program attached (see
//! that program): every segment that arrives on one socket is queued to the other's send
//! side by the kernel. The edge is still woken after each segment (the socket signals its
//! reader), but off the path of the bytes, and it only watches for the ends of the streams,
//! errors and idleness.
//!
//! Ordering and completeness, which the relay has to guarantee as much as a user-space copy:
//! * Only sessions with nothing to pass on by hand are joined: neither socket holds unread
//!   bytes (a partly read segment would be redirected whole), the client pipelined nothing
//!   behind its login and the backend sent nothing past its verdict. Others are relayed in
//!   user space, as are TLS sessions.
//! * The pair is joined after the edge's last own write (the login verdict) and after the
//!   mailbox's owner was checked once more: whatever the client sends meanwhile waits on
//!   its socket, so no command reaches the backend early and no answer overtakes the
//!   verdict. At the join each socket hands what arrived meanwhile to the program (a peek
//!   runs the program over the socket's queue), ahead of anything newer.
//! * End of stream: the kernel does not pass a FIN on. When one side's stream ends, the edge
//!   waits until the peer's socket has taken every byte the program redirected to it (the
//!   program counts them; the peer's TCP counts what it was given) and only then shuts the
//!   peer down for writing, so the last answer (`+OK`, `* BYE`) is not cut off. A peer that
//!   takes nothing for the idle timeout is given up on, as an idle session would be.
//! * A segment the program cannot redirect (its peer is not in the sockhash) is left on
//!   its socket; the edge reads and forwards it.
//! * If joining fails half-way, the session relays in user space with what was joined
//!   left in place: reads still work through the sockhash, and the program passes every
//!   segment to them because the peer is missing.

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, SockHash},
    programs::{ProgramError, SkSkb},
};
use prometheus::{IntGauge, Registry};
use protobalance_common::{
    MAP_SPLICE_PEERS, MAP_SPLICE_SOCKS, PROG_SPLICE, SPLICE_MAX_SOCKETS, SplicePeer,
};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::splice::SpliceEnd;

/// The splice object, built by build.rs from the protobalance-ebpf crate.
static SPLICE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/protobalance-splice"));

#[derive(Debug, thiserror::Error)]
pub enum KernelSpliceError {
    #[error(
        "the embedded splice object is empty: this binary was built with AYA_BUILD_SKIP; \
         rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error("loading the splice program failed (needs root or CAP_BPF+CAP_NET_ADMIN): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the splice object has no {0}; the object and this binary are out of step")]
    Missing(&'static str),
    #[error("splice program: {0}")]
    Program(#[from] ProgramError),
    #[error("splice map: {0}")]
    Map(#[from] MapError),
    #[error("splice metric: {0}")]
    Metric(#[from] prometheus::Error),
}

/// The loaded program and its maps, shared by every session.
pub struct KernelSplice {
    socks: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, SplicePeer>>,
    /// Sessions joined now (`protobalance_kernel_splices_active`); a session beyond the
    /// maps' capacity relays in user space.
    active: IntGauge,
    /// Owns the program and its attachment to the sockhash.
    _ebpf: Ebpf,
}

impl KernelSplice {
    pub fn load(registry: &Registry) -> Result<Self, KernelSpliceError> {
        if SPLICE_OBJECT.is_empty() {
            return Err(KernelSpliceError::NoObject);
        }
        let mut ebpf = EbpfLoader::new().load(SPLICE_OBJECT)?;
        let socks = ebpf
            .take_map(MAP_SPLICE_SOCKS)
            .ok_or(KernelSpliceError::Missing(MAP_SPLICE_SOCKS))?;
        let socks: SockHash<MapData, u64> = SockHash::try_from(socks)?;
        let peers = ebpf
            .take_map(MAP_SPLICE_PEERS)
            .ok_or(KernelSpliceError::Missing(MAP_SPLICE_PEERS))?;
        let peers: HashMap<MapData, u64, SplicePeer> = HashMap::try_from(peers)?;
        let program: &mut SkSkb = ebpf
            .program_mut(PROG_SPLICE)
            .ok_or(KernelSpliceError::Missing(PROG_SPLICE))?
            .try_into()?;
        program.load()?;
        program.attach(socks.fd())?;
        let active = IntGauge::new(
            "protobalance_kernel_splices_active",
            "Logged-in sessions with a socket in the kernel splice's sockhash now (joined, or half-joined and relayed in user space)",
        )?;
        registry.register(Box::new(active.clone()))?;
        Ok(Self {
            socks: Mutex::new(socks),
            peers: Mutex::new(peers),
            active,
            _ebpf: ebpf,
        })
    }

    /// Whether `stream` can be joined as it is: nothing unread on it (a partly read segment
    /// would be redirected whole) and its peer has not closed.
    pub fn quiet(stream: &TcpStream) -> bool {
        peek(stream.as_raw_fd()).is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Joins `client` and `backend`, once the edge has written everything of its own (the
    /// login verdict) and routed the session: records both as each other's peer, puts the
    /// backend and then the client in the sockhash, and has both sockets hand what arrived
    /// meanwhile to the program, in order, ahead of anything newer. Until then the client's
    /// bytes wait on its socket, so nothing it sent can reach the backend early; the backend
    /// sends nothing unasked before the client's next command (only something unsolicited,
    /// such as a shutdown's `* BYE`, in the microseconds between the two insertions would be
    /// passed on by user space). A pair that cannot be joined (maps full, a client whose
    /// stream already ended) is relayed in user space by [`Joined::splice`], with whatever
    /// was joined left in place until the relay ends (segments the program cannot redirect
    /// wait on their socket for the relay; taking a socket out of the map would drop them).
    pub fn join<'a>(&'a self, client: &TcpStream, backend: &TcpStream) -> Joined<'a> {
        let mut joined = Joined {
            owner: self,
            peers: Vec::with_capacity(2),
            socks: Vec::with_capacity(2),
            client: Side::default(),
            backend: Side::default(),
        };
        let capacity = i64::from(SPLICE_MAX_SOCKETS / 2);
        if self.active.get() >= capacity {
            tracing::warn!(
                capacity,
                "kernel splice maps are full; this session is relayed in user space"
            );
            return joined;
        }
        let (client_fd, backend_fd) = (client.as_raw_fd(), backend.as_raw_fd());
        let (Ok(client_side), Ok(backend_side)) = (side(client_fd), side(backend_fd)) else {
            tracing::warn!("kernel splice: no socket cookie or TCP_INFO; relaying in user space");
            return joined;
        };
        joined.client = client_side;
        joined.backend = backend_side;
        {
            let mut peers = self.lock_peers();
            for (from, to) in [
                (client_side.cookie, backend_side.cookie),
                (backend_side.cookie, client_side.cookie),
            ] {
                let entry = SplicePeer {
                    peer: to,
                    forwarded: 0,
                };
                if let Err(error) = peers.insert(from, entry, 0) {
                    tracing::warn!(%error, "kernel splice: cannot record a peer; relaying in user space");
                    return joined;
                }
                joined.peers.push(from);
            }
        }
        if !joined.insert(backend_side.cookie, backend_fd)
            || !joined.insert(client_side.cookie, client_fd)
        {
            return joined;
        }
        // Has each socket hand the segments already on it to the program: a receive (here a
        // one-byte peek that takes nothing) on a socket in the sockhash runs the program over
        // its queue under the socket lock before looking for data.
        for fd in [client_fd, backend_fd] {
            let _ = peek(fd);
        }
        joined
    }

    fn lock_socks(&self) -> std::sync::MutexGuard<'_, SockHash<MapData, u64>> {
        self.socks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_peers(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, SplicePeer>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes the program has redirected from the socket with `cookie` to its peer.
    fn forwarded(&self, cookie: u64) -> u64 {
        self.lock_peers()
            .get(&cookie, 0)
            .map_or(0, |entry| entry.forwarded)
    }
}

/// One direction's receiving socket: its cookie and how many bytes it had been given (by
/// the edge's own writes) when it was joined.
#[derive(Default, Clone, Copy)]
struct Side {
    cookie: u64,
    given: u64,
}

/// A joined pair; dropping it takes both sockets out of the maps.
pub struct Joined<'a> {
    owner: &'a KernelSplice,
    /// Cookies with a peer entry, and those in the sockhash (removed on drop).
    peers: Vec<u64>,
    socks: Vec<u64>,
    client: Side,
    backend: Side,
}

impl Joined<'_> {
    /// Both sockets are in the sockhash: the kernel moves the bytes.
    pub const fn in_kernel(&self) -> bool {
        self.socks.len() == 2
    }

    /// Adds one socket to the sockhash; `false` (logged) when the kernel refused it.
    fn insert(&mut self, cookie: u64, fd: RawFd) -> bool {
        if let Err(error) = self.owner.lock_socks().insert(cookie, fd, 0) {
            // Also a client whose stream ended meanwhile (only established sockets go into
            // a sockhash): not worth a warning.
            tracing::debug!(%error, "kernel splice: cannot add a socket; relaying in user space");
            return false;
        }
        if self.socks.is_empty() {
            self.owner.active.inc();
        }
        self.socks.push(cookie);
        true
    }

    /// Moves bytes between `client` and `backend` (the pair this was joined from) until both
    /// streams have ended, nothing moved for `idle`, or an error: in the kernel when the
    /// join was complete, else by the user-space relay.
    pub async fn splice(
        self,
        client: &mut TcpStream,
        backend: &mut TcpStream,
        idle: Duration,
    ) -> SpliceEnd {
        if self.in_kernel() {
            return self.run(client, backend, idle).await;
        }
        let end = super::splice::splice_tcp(client, backend, idle).await;
        drop(self);
        end
    }

    async fn run(
        mut self,
        client: &mut TcpStream,
        backend: &mut TcpStream,
        idle: Duration,
    ) -> SpliceEnd {
        let mut up_open = true;
        let mut down_open = true;
        loop {
            if !up_open && !down_open {
                return SpliceEnd::Closed;
            }
            let quiet_for = idle_for(client, backend);
            let wait = idle.saturating_sub(quiet_for);
            if wait.is_zero() {
                return SpliceEnd::Idle;
            }
            tokio::select! {
                ready = client.readable(), if up_open => {
                    if ready.is_err() {
                        return SpliceEnd::Error;
                    }
                    match self.pass_on(client, backend, Direction::Up, idle).await {
                        Step::Open => {}
                        Step::Ended => up_open = false,
                        Step::Failed => return SpliceEnd::Error,
                    }
                }
                ready = backend.readable(), if down_open => {
                    if ready.is_err() {
                        return SpliceEnd::Error;
                    }
                    match self.pass_on(backend, client, Direction::Down, idle).await {
                        Step::Open => {}
                        Step::Ended => down_open = false,
                        Step::Failed => return SpliceEnd::Error,
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// `from` was signalled readable: usually the program already moved its bytes and this
    /// is the wake-up that follows them; at end of stream, passes the end on to `to` once
    /// `to` holds everything redirected to it.
    async fn pass_on(
        &mut self,
        from: &mut TcpStream,
        to: &mut TcpStream,
        direction: Direction,
        idle: Duration,
    ) -> Step {
        let (from_cookie, to_given) = match direction {
            Direction::Up => (self.client.cookie, self.backend.given),
            Direction::Down => (self.backend.cookie, self.client.given),
        };
        // Only bytes the program could not redirect are read here: rare and small.
        let mut spill = [0u8; 512];
        let owed = || to_given + self.owner.forwarded(from_cookie);
        match from.try_read(&mut spill) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Step::Open,
            Err(error) => {
                // A reset after the last answer: `to` still gets what came before it, as
                // from a copying relay, before the session is torn down.
                tracing::debug!(%error, "kernel splice: a side failed");
                drained(to.as_raw_fd(), owed(), idle).await;
                Step::Failed
            }
            Ok(0) => {
                if drained(to.as_raw_fd(), owed(), idle).await && to.shutdown().await.is_ok() {
                    Step::Ended
                } else {
                    Step::Failed
                }
            }
            // Not redirected (the program found no peer): forward it here, and count it
            // as given by the edge.
            Ok(n) => match to.write_all(spill.get(..n).unwrap_or_default()).await {
                Ok(()) => {
                    let given = match direction {
                        Direction::Up => &mut self.backend.given,
                        Direction::Down => &mut self.client.given,
                    };
                    *given += u64::try_from(n).unwrap_or(u64::MAX);
                    Step::Open
                }
                Err(_) => Step::Failed,
            },
        }
    }
}

/// Client to backend, or back.
#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

enum Step {
    Open,
    Ended,
    Failed,
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        {
            let mut socks = self.owner.lock_socks();
            for cookie in &self.socks {
                // Already gone when the socket was closed.
                let _ = socks.remove(cookie);
            }
        }
        let mut peers = self.owner.lock_peers();
        for cookie in &self.peers {
            let _ = peers.remove(cookie);
        }
        drop(peers);
        if !self.socks.is_empty() {
            self.owner.active.dec();
        }
    }
}

/// Waits until the socket `fd` has been given `owed` bytes in all (acknowledged by its peer
/// or still in its send queue); `false` when the socket failed, or took nothing for `idle`
/// (a reader that stalls as long as an idle session is treated like one).
async fn drained(fd: RawFd, owed: u64, idle: Duration) -> bool {
    let mut progress = Instant::now();
    let mut last = 0;
    let mut pause = Duration::from_micros(50);
    loop {
        if tcp_info(fd).is_ok_and(|info| info.state == TCP_CLOSE) {
            // Reset or gone: the kernel dropped what it still held for it.
            return false;
        }
        // An unsettled reading (acknowledgements kept arriving) counts as no progress yet.
        if let Ok(given) = written(fd) {
            if given >= owed {
                return true;
            }
            if given > last {
                last = given;
                progress = Instant::now();
            }
        }
        if progress.elapsed() >= idle {
            tracing::info!(
                owed,
                given = last,
                "kernel splice: the peer took nothing for the idle timeout; closing"
            );
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Time since either socket last received data: the session's idle time.
fn idle_for(client: &TcpStream, backend: &TcpStream) -> Duration {
    let since = |stream: &TcpStream| {
        tcp_info(stream.as_raw_fd()).map_or(Duration::ZERO, |info| {
            Duration::from_millis(u64::from(info.last_data_recv_ms))
        })
    };
    since(client).min(since(backend))
}

/// The socket's cookie and what it has been given so far.
fn side(fd: RawFd) -> std::io::Result<Side> {
    Ok(Side {
        cookie: cookie(fd)?,
        given: written(fd)?,
    })
}

/// The socket's cookie: its key in the maps.
fn cookie(fd: RawFd) -> std::io::Result<u64> {
    let mut value = 0u64;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: `value` and `len` are ours and sized for SO_COOKIE's u64.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            std::ptr::from_mut(&mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A non-blocking one-byte `MSG_PEEK`: how many bytes are waiting (0 or 1; `Ok(0)` is the
/// peer's end of stream), leaving them in place.
fn peek(fd: RawFd) -> std::io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer we own; MSG_PEEK leaves any data in place.
    let peeked = unsafe {
        libc::recv(
            fd,
            std::ptr::from_mut(&mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(peeked).map_err(|_| std::io::Error::last_os_error())
}

/// The parts of Linux's `struct tcp_info` we read.
struct TcpInfo {
    state: u8,
    last_data_recv_ms: u32,
    bytes_acked: u64,
}

/// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h), stable since Linux 4.1.
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_LEN: usize = 136;
/// `tcpi_state` of a closed socket (TCP_CLOSE in include/net/tcp_states.h).
const TCP_CLOSE: u8 = 7;

fn tcp_info(fd: RawFd) -> std::io::Result<TcpInfo> {
    let mut raw = [0u8; TCPI_LEN];
    let mut len = libc::socklen_t::try_from(TCPI_LEN).unwrap_or(0);
    // SAFETY: `raw` has `len` bytes; the kernel writes at most that many.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            raw.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if usize::try_from(len).unwrap_or(0) < TCPI_BYTES_ACKED + 8 {
        return Err(std::io::Error::other(
            "TCP_INFO too short (kernel older than 4.1)",
        ));
    }
    let u32_at = |at: usize| {
        raw.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_ne_bytes)
    };
    let u64_at = |at: usize| {
        raw.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_ne_bytes)
    };
    Ok(TcpInfo {
        state: raw.first().copied().unwrap_or(0),
        last_data_recv_ms: u32_at(TCPI_LAST_DATA_RECV),
        bytes_acked: u64_at(TCPI_BYTES_ACKED),
    })
}

/// Bytes the socket has been given to send since it was connected: acknowledged by the
/// peer plus still queued. Exact, not an estimate: the join's baseline must not be low (an
/// end of stream would be passed on before the last bytes), so the two counters are read
/// again until no acknowledgement came in between; a socket whose acknowledgements keep
/// arriving through every try gives an error instead.
fn written(fd: RawFd) -> std::io::Result<u64> {
    for _ in 0..WRITTEN_TRIES {
        let acked = tcp_info(fd)?.bytes_acked;
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one c_int.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // `bytes_acked` grows with every advance of the acknowledged sequence, so equal
        // readings around SIOCOUTQ mean it measured from the same point.
        if tcp_info(fd)?.bytes_acked == acked {
            return Ok(acked + u64::try_from(queued).unwrap_or(0));
        }
    }
    Err(std::io::Error::other("send counters kept moving"))
}

/// Attempts at a settled reading in [`written`].
const WRITTEN_TRIES: usize = 64;
