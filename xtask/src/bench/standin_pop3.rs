//! A stand-in POP3 backend for `bench memory`, inside this process. It greets, answers
//! `+OK` to USER, XCLIENT and anything else before login, the health check's CAPA with a
//! short list, QUIT with `+OK` and a close — and after PASS holds the connection open
//! without reading, as an idle mailbox session would be.
//!
//! A stand-in, not Dovecot: Dovecot runs a process per logged-in session and cannot hold
//! 10 000 of them on this machine, and what is measured is protobalance's memory alone.
//!
//! Not a thread per session either: a few workers share the listener, each runs one
//! connection's short login dialogue (protobalance sends it at once; every read has a
//! timeout) and then parks the socket, non-blocking, in `held`. One reaper thread sweeps
//! `held` twice a second and closes the sessions whose client went away (on a client's
//! close protobalance half-closes towards the backend and keeps the session until the
//! backend closes too, which Dovecot does on EOF). So 10 000 idle sessions are 10 000
//! sockets here and no threads.
//! Dropping the backend stops the threads and closes every socket.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    mem,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// In the PASS reply, which protobalance relays: proof that a login reached this backend.
pub const LOGGED_IN_MARKER: &str = "bench-stand-in";
const WORKERS: usize = 4;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// Commands before PASS (XCLIENT, USER, CAPA…); more means a confused peer.
const MAX_COMMANDS: usize = 16;
const MAX_LINE: u64 = 1024;
const REAP_EVERY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    held: Mutex<Vec<TcpStream>>,
    logins: AtomicUsize,
    first_failure: Mutex<Option<String>>,
}

pub struct StandInPop3 {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl StandInPop3 {
    /// Listens on a free port of `ip` (loopback): [`WORKERS`] workers and the reaper.
    pub fn start(ip: IpAddr) -> Result<Self> {
        let listener = TcpListener::bind((ip, 0)).context("binding the stand-in backend")?;
        // Non-blocking accept, so a worker sees `stop` within ACCEPT_POLL.
        listener.set_nonblocking(true)?;
        let mut backend = Self {
            addr: listener.local_addr()?,
            shared: Arc::default(),
            threads: Vec::with_capacity(WORKERS + 1),
        };
        let listener = Arc::new(listener);
        for i in 0..WORKERS {
            let listener = Arc::clone(&listener);
            backend.spawn(&format!("stand-in-pop3-{i}"), move |shared| {
                serve(&listener, shared);
            })?;
        }
        backend.spawn("stand-in-reaper", reap)?;
        Ok(backend)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn(&mut self, name: &str, body: impl FnOnce(&Shared) + Send + 'static) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(&shared))
            .with_context(|| format!("spawning the stand-in backend's {name} thread"))?;
        self.threads.push(thread);
        Ok(())
    }

    /// Logins (PASS) answered so far.
    pub fn logins(&self) -> usize {
        self.shared.logins.load(Relaxed)
    }

    /// The first connection that failed here (not counting peers that just hung up).
    pub fn first_failure(&self) -> Option<String> {
        lock(&self.shared.first_failure).clone()
    }
}

impl Drop for StandInPop3 {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        for thread in self.threads.drain(..) {
            // A panicked thread has nothing left to clean up; its sockets close with it.
            let _ = thread.join();
        }
        lock(&self.shared.held).clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn serve(listener: &TcpListener, shared: &Shared) {
    while !shared.stop.load(Relaxed) {
        let outcome = match listener.accept() {
            Ok((stream, _)) => dialogue(stream),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            // EMFILE and the like: record it and back off instead of spinning.
            Err(e) => {
                thread::sleep(ACCEPT_POLL);
                Err(e).context("accept")
            }
        };
        match outcome {
            Ok(Some(stream)) => {
                shared.logins.fetch_add(1, Relaxed);
                if stream.set_nonblocking(true).is_ok() {
                    lock(&shared.held).push(stream);
                }
            }
            Ok(None) => {}
            Err(error) => {
                lock(&shared.first_failure).get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
}

/// Closes the held sessions whose peer closed (or sent anything: an idle session's only
/// next command is QUIT, answered as such).
fn reap(shared: &Shared) {
    while !shared.stop.load(Relaxed) {
        thread::sleep(REAP_EVERY);
        let mut held = lock(&shared.held);
        let sessions = mem::take(&mut *held);
        held.extend(sessions.into_iter().filter(still_idle));
    }
}

fn still_idle(mut stream: &TcpStream) -> bool {
    match stream.read(&mut [0; 64]) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => true,
        Ok(0) | Err(_) => false,
        Ok(_) => {
            let _ = stream.write_all(b"+OK bye.\r\n");
            false
        }
    }
}

/// Greets and answers until PASS (the socket is returned, to be held) or QUIT or the
/// peer's close (`None`: a health check, or a probe that disliked the greeting).
fn dialogue(stream: TcpStream) -> Result<Option<TcpStream>> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = &stream;
    writer.write_all(b"+OK bench stand-in ready.\r\n")?;
    let mut reader = BufReader::with_capacity(512, &stream);
    let mut line = String::new();
    for _ in 0..MAX_COMMANDS {
        line.clear();
        if (&mut reader).take(MAX_LINE).read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let verb = line.split_ascii_whitespace().next().unwrap_or_default();
        match verb.to_ascii_uppercase().as_str() {
            "PASS" => {
                let reply = format!("+OK {LOGGED_IN_MARKER} logged in.\r\n");
                writer.write_all(reply.as_bytes())?;
                drop(reader);
                return Ok(Some(stream));
            }
            "QUIT" => {
                writer.write_all(b"+OK bye.\r\n")?;
                return Ok(None);
            }
            "CAPA" => writer.write_all(b"+OK\r\nUSER\r\n.\r\n")?,
            _ => writer.write_all(b"+OK\r\n")?,
        }
    }
    bail!("no PASS within {MAX_COMMANDS} commands")
}
