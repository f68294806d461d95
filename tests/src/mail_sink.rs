//! A stand-in for "the rest of the Internet": a tiny SMTP server on a loopback port that
//! accepts every message and remembers its envelope and data, so a test Postfix relays
//! somewhere real-looking without ever reaching a real MX. It understands just enough
//! SMTP for Postfix's client (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT), one
//! session per thread; it is a test fixture, not an SMTP implementation to learn from.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::net::free_port;

/// The name the sink greets with; it must differ from the sending Postfix's
/// `myhostname`, or Postfix reports "mail for … loops back to myself".
pub const SINK_HOSTNAME: &str = "mailsink.test";
/// Longest command or data line the sink reads; longer closes the session.
const MAX_LINE: usize = 64 * 1024;
/// Largest message the sink stores (room for the 50 MB test messages).
const MAX_MESSAGE: usize = 128 * 1024 * 1024;
const BIND_ATTEMPTS: usize = 3;

/// One message as the sink received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkMessage {
    /// The MAIL FROM path without angle brackets (empty for bounces).
    pub mail_from: String,
    pub rcpts: Vec<String>,
    /// The message as sent after DATA, dot-unstuffed, without the final `.` line.
    pub data: Vec<u8>,
}

impl SinkMessage {
    /// The data as text (lossy), for `contains` checks.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

type Messages = Arc<Mutex<Vec<SinkMessage>>>;

/// A running sink; stopped (listener closed, sessions cut, threads joined) on drop.
#[derive(Debug)]
pub struct MailSink {
    addr: SocketAddr,
    messages: Messages,
    stopping: Arc<AtomicBool>,
    /// A handle on every accepted connection, to cut sessions a client keeps open.
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl MailSink {
    /// Starts a sink on a free port of `ip`.
    pub fn start(ip: IpAddr) -> Result<Self> {
        for attempt in 1..=BIND_ATTEMPTS {
            let addr = SocketAddr::new(ip, free_port(ip)?);
            match TcpListener::bind(addr) {
                Ok(listener) => return Self::serve(listener),
                // Another process took the port between probe and bind; try another.
                Err(err) if err.kind() == io::ErrorKind::AddrInUse && attempt < BIND_ATTEMPTS => {}
                Err(err) => return Err(err).with_context(|| format!("binding sink to {addr}")),
            }
        }
        bail!("no free port for a sink on {ip} after {BIND_ATTEMPTS} attempts")
    }

    /// Starts a sink on `addr`, e.g. a port reserved earlier for a server that "comes
    /// back" after the sending MTA has deferred mail for it.
    pub fn start_at(addr: SocketAddr) -> Result<Self> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("binding sink to {addr}"))?;
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Result<Self> {
        let addr = listener.local_addr().context("sink local_addr")?;
        let messages = Messages::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = thread::Builder::new()
            .name(format!("mail-sink-{addr}"))
            .spawn({
                let (messages, stopping) = (messages.clone(), stopping.clone());
                let connections = connections.clone();
                move || accept_loop(&listener, &messages, &stopping, &connections)
            })
            .context("spawning the sink thread")?;
        Ok(Self {
            addr,
            messages,
            stopping,
            connections,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<SinkMessage> {
        lock(&self.messages).clone()
    }

    /// Waits until at least `n` messages have arrived; returns all of them.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Result<Vec<SinkMessage>> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= n {
                return Ok(messages);
            }
            if Instant::now() >= deadline {
                bail!(
                    "sink {} has {} of {n} messages after {timeout:?}",
                    self.addr,
                    messages.len()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for MailSink {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocking accept; if it fails the listener is already gone.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let sessions = self
            .acceptor
            .take()
            .and_then(|acceptor| acceptor.join().ok())
            .unwrap_or_default();
        for stream in lock(&self.connections).drain(..) {
            // Errors mean the peer already closed; the session thread then ends by itself.
            let _ = stream.shutdown(Shutdown::Both);
        }
        for session in sessions {
            let _ = session.join();
        }
    }
}

/// A poisoned lock only means a session thread panicked; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    listener: &TcpListener,
    messages: &Messages,
    stopping: &AtomicBool,
    connections: &Mutex<Vec<TcpStream>>,
) -> Vec<JoinHandle<()>> {
    let mut sessions = Vec::new();
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        lock(connections).push(handle);
        let messages = messages.clone();
        sessions.push(thread::spawn(move || {
            // A session error means the client hung up; the sink keeps serving others.
            if let Ok(session) = Session::new(stream) {
                let _ = session.run(&messages);
            }
        }));
    }
    sessions
}

/// What a `read_line` produced.
enum Line {
    Text(String),
    Eof,
    TooLong,
}

struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    mail_from: Option<String>,
    rcpts: Vec<String>,
}

impl Session {
    fn new(stream: TcpStream) -> io::Result<Self> {
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            mail_from: None,
            rcpts: Vec::new(),
        })
    }

    fn reply(&mut self, text: &str) -> io::Result<()> {
        self.writer.write_all(text.as_bytes())?;
        self.writer.write_all(b"\r\n")
    }

    fn read_line(&mut self) -> io::Result<Line> {
        let mut buf = Vec::new();
        let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX);
        let n = (&mut self.reader).take(limit).read_until(b'\n', &mut buf)?;
        Ok(match buf.last() {
            _ if n == 0 => Line::Eof,
            Some(b'\n') => Line::Text(String::from_utf8_lossy(&buf).into_owned()),
            _ if n >= MAX_LINE => Line::TooLong,
            _ => Line::Eof,
        })
    }

    /// Serves the session, then closes the connection (the sink's own handle on the
    /// stream would otherwise keep it open after QUIT).
    fn run(mut self, messages: &Mutex<Vec<SinkMessage>>) -> io::Result<()> {
        let result = self.converse(messages);
        // Fails only if the peer is gone already, which is what we want anyway.
        let _ = self.writer.shutdown(Shutdown::Both);
        result
    }

    fn converse(&mut self, messages: &Mutex<Vec<SinkMessage>>) -> io::Result<()> {
        self.reply(&format!("220 {SINK_HOSTNAME} ESMTP test sink"))?;
        loop {
            let line = match self.read_line()? {
                Line::Text(line) => line,
                Line::Eof => return Ok(()),
                Line::TooLong => return self.reply("500 5.5.2 Line too long"),
            };
            let line = line.trim_end();
            let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
            match verb.to_ascii_uppercase().as_str() {
                "EHLO" => self.reply(&format!(
                    "250-{SINK_HOSTNAME}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE {MAX_MESSAGE}"
                ))?,
                "HELO" => self.reply(&format!("250 {SINK_HOSTNAME}"))?,
                "MAIL" => {
                    self.mail_from = Some(path_of(arg));
                    self.rcpts.clear();
                    self.reply("250 2.1.0 Ok")?;
                }
                "RCPT" if self.mail_from.is_some() => {
                    self.rcpts.push(path_of(arg));
                    self.reply("250 2.1.5 Ok")?;
                }
                "DATA" if !self.rcpts.is_empty() => self.data(messages)?,
                "RCPT" | "DATA" => self.reply("503 5.5.1 Bad sequence of commands")?,
                "RSET" => {
                    self.mail_from = None;
                    self.rcpts.clear();
                    self.reply("250 2.0.0 Ok")?;
                }
                "NOOP" => self.reply("250 2.0.0 Ok")?,
                "QUIT" => return self.reply("221 2.0.0 Bye"),
                _ => self.reply("502 5.5.2 Command not recognized")?,
            }
        }
    }

    /// Reads the message up to the lone `.` line and stores it with the envelope.
    fn data(&mut self, messages: &Mutex<Vec<SinkMessage>>) -> io::Result<()> {
        self.reply("354 End data with <CR><LF>.<CR><LF>")?;
        let mut data = Vec::new();
        loop {
            let line = match self.read_line()? {
                Line::Text(line) => line,
                Line::Eof => return Ok(()),
                Line::TooLong => return self.reply("500 5.5.2 Line too long"),
            };
            if line == ".\r\n" || line == ".\n" {
                break;
            }
            let unstuffed = line.strip_prefix('.').unwrap_or(&line);
            if data.len() + unstuffed.len() > MAX_MESSAGE {
                return self.reply("552 5.3.4 Message too big");
            }
            data.extend_from_slice(unstuffed.as_bytes());
        }
        let message = SinkMessage {
            mail_from: self.mail_from.take().unwrap_or_default(),
            rcpts: std::mem::take(&mut self.rcpts),
            data,
        };
        lock(messages).push(message);
        self.reply("250 2.0.0 Ok: queued")
    }
}

/// `FROM:<a@b> SIZE=1` → `a@b`; `TO:<>` → ``.
fn path_of(arg: &str) -> String {
    let path = arg
        .split_once(':')
        .map_or(arg, |(_, rest)| rest)
        .trim_start();
    match path.strip_prefix('<') {
        Some(rest) => rest.split('>').next().unwrap_or_default().to_owned(),
        None => path
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(path_of("FROM:<a@b.test> SIZE=12 BODY=8BITMIME"), "a@b.test");
        assert_eq!(path_of("FROM:<>"), "");
        assert_eq!(path_of("TO: <c@d.test>"), "c@d.test");
        assert_eq!(path_of("TO:c@d.test"), "c@d.test");
    }

    #[test]
    fn records_a_message_and_stops() -> Result<()> {
        let sink = MailSink::start("127.0.0.1".parse()?)?;
        let mut stream = TcpStream::connect(sink.addr())?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(
            b"EHLO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\n\
              DATA\r\nSubject: s\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
        )?;
        let mut transcript = String::new();
        stream.read_to_string(&mut transcript)?;
        assert!(transcript.contains("250 2.0.0 Ok: queued"), "{transcript}");
        assert!(transcript.ends_with("221 2.0.0 Bye\r\n"), "{transcript}");
        let messages = sink.wait_for_messages(1, Duration::from_secs(5))?;
        assert_eq!(messages[0].mail_from, "a@x.test");
        assert_eq!(messages[0].rcpts, ["b@y.test", "c@y.test"]);
        assert_eq!(messages[0].text(), "Subject: s\r\n\r\n.dot\r\n");
        let addr = sink.addr();
        drop(sink);
        assert!(TcpStream::connect(addr).is_err(), "sink still listens");
        Ok(())
    }
}
