//! `--relay`: the floor under any proxy on this machine. A minimal TCP relay in front of
//! each backend: accept, connect to the backend at once, TCP_NODELAY on both, copy both
//! ways with tokio (the runtime protobalance uses, with as many worker threads) until both
//! sides have closed. It does no protocol work at all — no greeting of its own, no login,
//! no directory, no metrics — so what it adds to a direct session is what the second TCP
//! connection and one relay hop per exchange cost here, which no proxy can avoid. The
//! bench times it side by side with direct and protobalance, in the same alternating
//! slices, so protobalance's figures can be read against it.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Pending connections per listener: above the bench's largest client count.
const BACKLOG: u32 = 4096;
/// Pause after a failed accept (e.g. out of descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// A failure is printed once per run; the bench counts the sessions it breaks.
static REPORTED: AtomicBool = AtomicBool::new(false);

/// The relay's runtime and one listener per backend; dropping it stops the relay (the
/// runtime drops its tasks, which closes their sockets).
pub struct Relay {
    _runtime: tokio::runtime::Runtime,
    /// (backend address, relay address in front of it).
    fronts: Vec<(SocketAddr, SocketAddr)>,
}

impl Relay {
    /// One listener on an ephemeral loopback port in front of each of `backends`.
    pub fn start(backends: &[SocketAddr]) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_io()
            .enable_time()
            .thread_name("bench-relay")
            .build()
            .context("starting the relay's tokio runtime")?;
        let mut fronts = Vec::with_capacity(backends.len());
        for &backend in backends {
            let listener = runtime
                .block_on(async { listen() })
                .context("binding the relay listener")?;
            let front = listener.local_addr().context("relay listener address")?;
            runtime.spawn(serve(listener, backend));
            fronts.push((backend, front));
        }
        Ok(Self {
            _runtime: runtime,
            fronts,
        })
    }

    /// The relay address in front of `backend`.
    pub fn front(&self, backend: SocketAddr) -> Result<SocketAddr> {
        self.fronts
            .iter()
            .find(|(b, _)| *b == backend)
            .map(|(_, front)| *front)
            .with_context(|| format!("no relay in front of {backend}"))
    }
}

/// An ephemeral loopback port with a backlog for every client of the bench.
fn listen() -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(BACKLOG)
}

fn report(what: &str, error: &std::io::Error) {
    if !REPORTED.swap(true, Ordering::Relaxed) {
        eprintln!("  relay: {what}: {error} (reported once; the bench counts the failed sessions)");
    }
}

async fn serve(listener: TcpListener, backend: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(relay(client, backend));
            }
            Err(error) => {
                report("accept", &error);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn relay(mut client: TcpStream, backend: SocketAddr) {
    let mut upstream = match TcpStream::connect(backend).await {
        Ok(upstream) => upstream,
        Err(error) => {
            report(&format!("connecting to {backend}"), &error);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::Relay;

    #[test]
    fn relays_both_ways_and_passes_the_end_on() {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = backend.local_addr().expect("addr");
        let echo = std::thread::spawn(move || {
            let (mut conn, _) = backend.accept().expect("accept");
            let mut got = Vec::new();
            conn.read_to_end(&mut got).expect("read");
            conn.write_all(&got).expect("echo");
        });
        let relay = Relay::start(&[addr]).expect("relay");
        let mut client =
            std::net::TcpStream::connect(relay.front(addr).expect("front")).expect("connect");
        client.write_all(b"hello through the relay").expect("write");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).expect("read back");
        assert_eq!(back, b"hello through the relay");
        echo.join().expect("echo thread");
        assert!(relay.front("127.0.0.1:1".parse().expect("addr")).is_err());
    }
}
