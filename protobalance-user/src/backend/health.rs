//! Backend health: a circuit breaker per backend and service, fed two ways.
//!
//! * **Active checks** — every `interval` each (backend, service) gets a protocol-level
//!   probe: POP3 greeting + CAPA, IMAP greeting + NOOP, LMTP greeting + LHLO, then a polite
//!   goodbye. `rise` consecutive successes close the breaker, `fall` failures open it.
//! * **Passive results** — a failed connect during a real login counts as a failed check,
//!   so the breaker opens without waiting for the next probe.
//!
//! While the breaker is open, connects fail at once: the client gets its temporary failure
//! (`-ERR [SYS/TEMP]`, `NO [UNAVAILABLE]`, `451 4.4.x`) in microseconds instead of after a
//! connect timeout, and the dead backend is not hammered. Only the active check closes it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use super::{BackendStream, Service};

/// Breaker thresholds.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// Consecutive failures that open the breaker.
    pub fall: u32,
    /// Consecutive successful checks that close it again.
    pub rise: u32,
}

/// The breaker of one (backend, service).
#[derive(Debug)]
pub struct Breaker {
    up: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
}

impl Default for Breaker {
    fn default() -> Self {
        // Optimistic at start-up: the first check or login decides.
        Self {
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
        }
    }
}

impl Breaker {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Returns true when this result changed the state (for the log).
    pub fn record(&self, ok: bool, t: Thresholds) -> bool {
        if ok {
            self.failures.store(0, Relaxed);
            let successes = self.successes.fetch_add(1, Relaxed) + 1;
            successes >= t.rise && !self.up.swap(true, Relaxed)
        } else {
            self.successes.store(0, Relaxed);
            let failures = self.failures.fetch_add(1, Relaxed) + 1;
            failures >= t.fall && self.up.swap(false, Relaxed)
        }
    }

    /// A successful login connect proves the service answers, but only an active check
    /// may close an open breaker (a lucky connect must not flap it).
    pub fn record_passive(&self, ok: bool, t: Thresholds) -> bool {
        if ok {
            self.failures.store(0, Relaxed);
            false
        } else {
            self.record(false, t)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("unexpected answer `{0}`")]
    Answer(String),
    #[error("connection closed")]
    Closed,
}

/// What a probe says and expects for one service.
struct Script {
    greeting: &'static str,
    command: &'static [u8],
    /// `Some(true)`: the answer is complete and good; `Some(false)`: bad; `None`: read on.
    done: fn(&str) -> Option<bool>,
    bye: &'static [u8],
}

const fn script(service: Service) -> Script {
    match service {
        Service::Pop3 => Script {
            greeting: "+OK",
            command: b"CAPA\r\n",
            done: |l| {
                if l == "." {
                    Some(true)
                } else if l.starts_with("-ERR") {
                    Some(false)
                } else {
                    None
                }
            },
            bye: b"QUIT\r\n",
        },
        Service::Imap => Script {
            greeting: "* OK",
            command: b"h1 NOOP\r\n",
            done: |l| l.starts_with("h1 ").then(|| l.starts_with("h1 OK")),
            bye: b"h2 LOGOUT\r\n",
        },
        Service::Lmtp => Script {
            greeting: "220",
            command: b"LHLO protobalance.health\r\n",
            done: |l| (!l.starts_with("250-")).then(|| l.starts_with("250 ")),
            bye: b"QUIT\r\n",
        },
        Service::Smtp | Service::Submission => Script {
            greeting: "220",
            command: b"EHLO protobalance.health\r\n",
            done: |l| (!l.starts_with("250-")).then(|| l.starts_with("250 ")),
            bye: b"QUIT\r\n",
        },
    }
}

/// One protocol-level probe of `service` on an open connection (the caller bounds it
/// with the check timeout).
pub async fn probe(stream: BackendStream, service: Service) -> Result<(), CheckError> {
    let script = script(service);
    let mut stream = BufReader::new(stream);
    let line = read_line(&mut stream).await?;
    if !line.starts_with(script.greeting) {
        return Err(CheckError::Answer(line));
    }
    stream
        .get_mut()
        .write_all(script.command)
        .await
        .map_err(|_| CheckError::Closed)?;
    // Bounded: a backend that streams endless lines hits the overall timeout.
    loop {
        let line = read_line(&mut stream).await?;
        match (script.done)(&line) {
            Some(true) => break,
            Some(false) => return Err(CheckError::Answer(line)),
            None => {}
        }
    }
    let _ = stream.get_mut().write_all(script.bye).await;
    Ok(())
}

async fn read_line(stream: &mut BufReader<BackendStream>) -> Result<String, CheckError> {
    let mut line = String::new();
    let n = (&mut *stream)
        .take(4096)
        .read_line(&mut line)
        .await
        .map_err(|_| CheckError::Closed)?;
    if n == 0 {
        return Err(CheckError::Closed);
    }
    Ok(line.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { fall: 2, rise: 2 };

    #[test]
    fn opens_after_fall_failures_and_closes_after_rise_successes() {
        let b = Breaker::default();
        assert!(b.is_up());
        assert!(!b.record(false, T), "one failure is not enough");
        assert!(b.record(false, T), "second failure opens");
        assert!(!b.is_up());
        assert!(
            !b.record_passive(true, T),
            "a passive success does not close"
        );
        assert!(!b.is_up());
        assert!(!b.record(true, T));
        assert!(b.record(true, T), "two checks close");
        assert!(b.is_up());
        assert!(!b.record(false, T), "failures were reset by successes");
    }
}
