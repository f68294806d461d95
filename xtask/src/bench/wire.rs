//! A blocking, line-oriented client connection shared by the session scripts and the LMTP
//! seeder. Bounded by construction: loopback addresses only, a timeout on every connect,
//! read and write, a length limit on every line, TCP_NODELAY so small commands are not
//! held back by Nagle (the latency measured is the servers', not the client's).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

/// Per socket operation; a session of n operations ends within n × this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LINE: u64 = 64 * 1024;

pub struct LineConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    line: Vec<u8>,
}

impl LineConn {
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        ensure!(
            addr.ip().is_loopback(),
            "benchmarks only talk to loopback addresses, not {addr}"
        );
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let writer = stream.try_clone().context("cloning the socket")?;
        Ok(Self {
            reader: BufReader::with_capacity(16 * 1024, stream),
            writer,
            line: Vec::with_capacity(256),
        })
    }

    /// Replaces [`IO_TIMEOUT`] for reads, e.g. while a server stores a large message.
    pub fn set_read_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .context("setting the read timeout")
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes).context("sending")
    }

    /// The next line, CRLF included.
    pub fn read_line(&mut self) -> Result<&[u8]> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut self.line)
            .context("reading a line")?;
        ensure!(n > 0, "connection closed by the server");
        ensure!(
            self.line.ends_with(b"\n"),
            "line longer than {MAX_LINE} bytes or cut off"
        );
        Ok(&self.line)
    }

    /// Reads and discards exactly `n` bytes (an IMAP literal's contents).
    pub fn skip_bytes(&mut self, n: u64) -> Result<()> {
        let read = std::io::copy(&mut (&mut self.reader).take(n), &mut std::io::sink())
            .context("reading a literal")?;
        ensure!(
            read == n,
            "connection closed after {read} of {n} literal bytes"
        );
        Ok(())
    }

    /// The bare socket, for a session held open and idle: the read buffer and the write
    /// clone (a second descriptor) are released.
    pub fn into_stream(self) -> Result<TcpStream> {
        ensure!(
            self.reader.buffer().is_empty(),
            "the server sent more than was asked for"
        );
        Ok(self.reader.into_inner())
    }

    /// Reads one line and fails unless it starts with `prefix`; returns the line.
    pub fn expect(&mut self, prefix: &str, after: &str) -> Result<&[u8]> {
        let line = self.read_line().with_context(|| format!("after {after}"))?;
        if !line.starts_with(prefix.as_bytes()) {
            bail!(
                "after {after}: expected {prefix:?}, got {:?}",
                String::from_utf8_lossy(line).trim_end()
            );
        }
        Ok(line)
    }

    /// Sends `command` and expects a reply line starting with `prefix`.
    pub fn command(&mut self, command: &[u8], prefix: &str, what: &str) -> Result<&[u8]> {
        self.send(command)
            .with_context(|| format!("sending {what}"))?;
        self.expect(prefix, what)
    }
}
