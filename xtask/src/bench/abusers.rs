//! `bench abuse`'s abusive clients: N distinct source addresses (127.1.0.1, 127.1.0.2, …,
//! 250 per /24) spread over a bounded pool of threads, each thread cycling over its share
//! and reconnecting at once. Every connection behaves like a spam bot: it sends its
//! whole script without waiting for the banner (pregreet and blind pipelining: EHLO, MAIL
//! FROM, 20 guessed RCPT TO, DATA), reads until the server closes (or
//! [`CONNECTION_DEADLINE`], when a tarpit makes it wait: a bot gives up), and closes.
//! Every socket operation has a timeout, so a thread notices the stop flag within
//! [`CONNECTION_DEADLINE`].
//!
//! How a connection ended is what the edge's reputation engine made of its address:
//! refused at the door as banned (`421 4.7.0 Your address is blocked …`), refused at the
//! door with a temporary failure (`421 4.7.0 Too many errors …`, before the ban), served
//! and then ended with `421` (its first sessions, while the score builds up), cut off by
//! our deadline (tarpitted: slow replies), or anything else.

use std::{
    fmt::{self, Write as _},
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

use super::{interrupted, source_addr};

/// Per socket operation (connect, write, each read).
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a bot stays on one connection.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(2);
/// What is kept of the server's answer to classify it (a whole session's replies fit).
const MAX_ANSWER: usize = 16 * 1024;
/// Source addresses per /24 (127.1.x.1 ..= 127.1.x.250).
const PER_NET: u32 = 250;
/// 127.1.0.0/16 holds this many of them.
pub const MAX_ABUSERS: u32 = PER_NET * 250;
const GUESSES: usize = 20;

/// The abusers and where they knock.
pub struct Pool {
    edge: SocketAddrV4,
    addresses: Vec<Ipv4Addr>,
    threads: usize,
    script: Vec<u8>,
}

/// How the connections of one period ended.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub connections: u64,
    /// `421 4.7.0 Your address is blocked …` before anything else.
    pub blocked: u64,
    /// `421 4.7.0 Too many errors …` before anything else: a temporary refusal.
    pub refused: u64,
    /// Greeted, then ended by the edge with `421 4.7.0 Too many errors …`.
    pub ended: u64,
    /// Still open at [`CONNECTION_DEADLINE`] (tarpitted).
    pub timed_out: u64,
    pub other: u64,
    pub first_other: Option<String>,
    /// How long the abusers ran (from their start until the last thread stopped).
    pub elapsed: Duration,
}

enum Ending {
    Blocked,
    Refused,
    Ended,
    TimedOut,
    Other(String),
}

/// How reading the answer stopped.
enum ReadEnd {
    Closed,
    Deadline,
    Failed(io::Error),
}

impl fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("closed by the server"),
            Self::Deadline => f.write_str("still open at the deadline"),
            Self::Failed(error) => write!(f, "read failed ({error})"),
        }
    }
}

impl Pool {
    /// `abusers` addresses (at most [`MAX_ABUSERS`]) on at most `threads` threads.
    pub fn new(edge: SocketAddrV4, abusers: u32, threads: u32) -> Self {
        let addresses: Vec<Ipv4Addr> = (0..abusers.min(MAX_ABUSERS)).map(address).collect();
        let threads = (threads as usize).clamp(1, addresses.len().max(1));
        Self {
            edge,
            addresses,
            threads,
            script: script(),
        }
    }

    pub const fn threads(&self) -> usize {
        self.threads
    }

    /// "127.1.0.1–127.1.3.250"
    pub fn range(&self) -> String {
        match (self.addresses.first(), self.addresses.last()) {
            (Some(first), Some(last)) => format!("{first}–{last}"),
            _ => "none".to_owned(),
        }
    }

    /// Runs `work` while the abusers hammer the edge; they start with it and are stopped
    /// (and joined) when it returns, also when it fails.
    pub fn during<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, Tally)> {
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let (outcome, tallies) = thread::scope(|scope| {
            let handles: Vec<_> = (0..self.threads)
                .map(|t| {
                    let mine: Vec<Ipv4Addr> = (self.addresses.iter().skip(t).step_by(self.threads))
                        .copied()
                        .collect();
                    let stop = &stop;
                    scope.spawn(move || self.abuse(&mine, stop))
                })
                .collect();
            let outcome = work();
            stop.store(true, Relaxed);
            let tallies = (handles.into_iter())
                .map(|h| h.join().map_err(|_| anyhow!("an abuser thread panicked")))
                .collect::<Result<Vec<Tally>>>();
            (outcome, tallies)
        });
        let mut tally = Tally::merge(tallies?);
        tally.elapsed = started.elapsed();
        Ok((outcome?, tally))
    }

    /// One thread: its addresses in turn, one connection each, until told to stop.
    fn abuse(&self, sources: &[Ipv4Addr], stop: &AtomicBool) -> Tally {
        let mut tally = Tally::default();
        for &source in sources.iter().cycle() {
            if stop.load(Relaxed) || interrupted() {
                break;
            }
            tally.add(self.connection(source));
        }
        tally
    }

    fn connection(&self, source: Ipv4Addr) -> Ending {
        let deadline = Instant::now() + CONNECTION_DEADLINE;
        let mut stream = match source_addr::connect_from(source, self.edge, OP_TIMEOUT) {
            Ok(stream) => stream,
            Err(error) => return Ending::Other(format!("connecting from {source}: {error}")),
        };
        if let Err(error) = stream.set_write_timeout(Some(OP_TIMEOUT)) {
            return Ending::Other(format!("setting the write timeout: {error}"));
        }
        // A client refused at the door may find the socket closed before it wrote it all;
        // the refusal is still there to read.
        let _ = stream.write_all(&self.script);
        let (answer, end) = read_answer(&mut stream, deadline);
        classify(&answer, end)
    }
}

/// 127.1.(i / 250).(i % 250 + 1): the i-th abuser's source address.
fn address(i: u32) -> Ipv4Addr {
    let net = u8::try_from(i / PER_NET).unwrap_or(u8::MAX);
    let host = u8::try_from(i % PER_NET + 1).unwrap_or(u8::MAX);
    Ipv4Addr::new(127, 1, net, host)
}

/// Everything at once: pregreet (before the banner) and blind pipelining.
fn script() -> Vec<u8> {
    let mut text = String::from("EHLO bot\r\nMAIL FROM:<x@bot.invalid>\r\n");
    for n in 1..=GUESSES {
        let _ = write!(text, "RCPT TO:<guess{n}@example.com>\r\n");
    }
    text.push_str("DATA\r\n");
    text.into_bytes()
}

/// The server's answer (its first [`MAX_ANSWER`] bytes) until it closes, the deadline
/// passes or a read fails.
fn read_answer(stream: &mut std::net::TcpStream, deadline: Instant) -> (Vec<u8>, ReadEnd) {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (answer, ReadEnd::Deadline);
        }
        if let Err(error) = stream.set_read_timeout(Some(left.min(OP_TIMEOUT))) {
            return (answer, ReadEnd::Failed(error));
        }
        match stream.read(&mut buf) {
            Ok(0) => return (answer, ReadEnd::Closed),
            Ok(n) => {
                let room = MAX_ANSWER.saturating_sub(answer.len());
                answer.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return (answer, ReadEnd::Deadline);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (answer, ReadEnd::Failed(e)),
        }
    }
}

fn classify(answer: &[u8], end: ReadEnd) -> Ending {
    let text = String::from_utf8_lossy(answer);
    if text.starts_with("421 4.7.0 Your address is blocked") {
        Ending::Blocked
    } else if text.starts_with("421 4.7.0 Too many errors") {
        Ending::Refused
    } else if text.starts_with("220") && text.contains("\n421 4.7.0 Too many errors") {
        Ending::Ended
    } else if matches!(end, ReadEnd::Deadline) {
        Ending::TimedOut
    } else {
        let last = text.lines().last().unwrap_or("nothing");
        Ending::Other(format!(
            "{end} after {} bytes; last line {last:?}",
            answer.len()
        ))
    }
}

impl Tally {
    fn add(&mut self, ending: Ending) {
        self.connections += 1;
        match ending {
            Ending::Blocked => self.blocked += 1,
            Ending::Refused => self.refused += 1,
            Ending::Ended => self.ended += 1,
            Ending::TimedOut => self.timed_out += 1,
            Ending::Other(what) => {
                self.other += 1;
                self.first_other.get_or_insert(what);
            }
        }
    }

    /// One tally from several (threads, or slices of a bench).
    pub fn merge(parts: impl IntoIterator<Item = Self>) -> Self {
        let mut sum = Self::default();
        for part in parts {
            sum.connections += part.connections;
            sum.blocked += part.blocked;
            sum.refused += part.refused;
            sum.ended += part.ended;
            sum.timed_out += part.timed_out;
            sum.other += part.other;
            sum.first_other = sum.first_other.or(part.first_other);
            sum.elapsed += part.elapsed;
        }
        sum
    }

    /// Connections per second of the time the abusers ran.
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// `812.3 conns/s: blocked 7000, refused 2000, ended 900, timed out 100, other 0`
    pub fn describe(&self) -> String {
        format!(
            "{:.1} conns/s: blocked {}, refused {}, ended {}, timed out {}, other {}",
            self.rate(),
            self.blocked,
            self.refused,
            self.ended,
            self.timed_out,
            self.other
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_fill_127_1_by_250_per_net() {
        assert_eq!(address(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(address(249), Ipv4Addr::new(127, 1, 0, 250));
        assert_eq!(address(250), Ipv4Addr::new(127, 1, 1, 1));
        assert_eq!(address(999), Ipv4Addr::new(127, 1, 3, 250));
        assert_eq!(address(MAX_ABUSERS - 1), Ipv4Addr::new(127, 1, 249, 250));
    }

    #[test]
    fn endings() {
        let door = |text: &str| classify(text.as_bytes(), ReadEnd::Closed);
        assert!(matches!(
            door("421 4.7.0 Your address is blocked for abuse; try again later\r\n"),
            Ending::Blocked
        ));
        assert!(matches!(
            door("421 4.7.0 Too many errors from your address; try again later\r\n"),
            Ending::Refused
        ));
        assert!(matches!(
            door("220 edge ESMTP\r\n250-edge\r\n250 OK\r\n421 4.7.0 Too many errors; closing\r\n"),
            Ending::Ended
        ));
        assert!(matches!(
            classify(b"220 edge ESMTP\r\n", ReadEnd::Deadline),
            Ending::TimedOut
        ));
        assert!(matches!(door(""), Ending::Other(_)));
    }

    #[test]
    fn the_script_pipelines_everything() {
        let text = String::from_utf8(script()).expect("ASCII");
        assert!(text.starts_with("EHLO bot\r\nMAIL FROM:<x@bot.invalid>\r\n"));
        assert_eq!(text.matches("RCPT TO:<guess").count(), GUESSES);
        assert!(text.ends_with("RCPT TO:<guess20@example.com>\r\nDATA\r\n"));
    }
}
