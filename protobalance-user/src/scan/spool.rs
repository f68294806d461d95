//! The message held while the scanners judge it: in memory up to a cap, then in an
//! unlinked temporary file (gone with the process, even after a crash), so a 30 MB message
//! costs the cap in memory, not 30 MB. It holds the message as the backend will receive it
//! (dot-stuffed, CRLF line endings, without the final `.`).

use std::{io::SeekFrom, path::Path};

use tokio::{
    fs::File,
    io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt},
};

pub struct Spool {
    memory: Vec<u8>,
    file: Option<File>,
    cap: usize,
    len: u64,
    /// Where [`Spool::read`] is in `memory`.
    read_at: usize,
}

impl Spool {
    pub fn new(cap: usize) -> Self {
        Self {
            memory: Vec::new(),
            file: None,
            cap,
            len: 0,
            read_at: 0,
        }
    }

    pub const fn len(&self) -> u64 {
        self.len
    }

    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the message went to disk.
    pub const fn spilled(&self) -> bool {
        self.file.is_some()
    }

    pub async fn write(&mut self, bytes: &[u8], dir: &Path) -> std::io::Result<()> {
        self.len += bytes.len() as u64;
        if self.file.is_none() && self.memory.len() + bytes.len() <= self.cap {
            self.memory.extend_from_slice(bytes);
            return Ok(());
        }
        if self.file.is_none() {
            let dir = dir.to_owned();
            let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
                .await
                .map_err(std::io::Error::other)??;
            let mut file = File::from_std(file);
            file.write_all(&self.memory).await?;
            self.memory = Vec::new();
            self.file = Some(file);
        }
        if let Some(file) = self.file.as_mut() {
            file.write_all(bytes).await?;
        }
        Ok(())
    }

    /// Back to the start, for [`Self::read`].
    pub async fn rewind(&mut self) -> std::io::Result<()> {
        self.read_at = 0;
        if let Some(file) = self.file.as_mut() {
            file.flush().await?;
            file.seek(SeekFrom::Start(0)).await?;
        }
        Ok(())
    }

    /// The next piece of the message into `buf`; 0 at the end.
    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(file) = self.file.as_mut() {
            return file.read(buf).await;
        }
        let rest = &self.memory[self.read_at.min(self.memory.len())..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.read_at += n;
        Ok(n)
    }
}

/// Undoes dot-stuffing in a stream of CRLF-terminated lines cut anywhere: the scanners see
/// the message as it will be stored.
#[derive(Debug)]
pub struct Unstuffer {
    at_line_start: bool,
}

impl Default for Unstuffer {
    fn default() -> Self {
        Self {
            at_line_start: true,
        }
    }
}

impl Unstuffer {
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.at_line_start && b == b'.' {
                self.at_line_start = false;
                continue;
            }
            self.at_line_start = b == b'\n';
            out.push(b);
        }
    }
}

/// Header fields the edge writes after scanning: removed from the message as it arrives,
/// so a sender cannot pass off its own `X-Virus-Scanned: … clean` as ours.
const SCAN_HEADERS: [&str; 5] = [
    "x-spam-score",
    "x-spam-status",
    "x-spam-flag",
    "x-virus-scanned",
    "x-scan-warning",
];

/// A header line longer than this is passed on as it is (memory stays bounded; such a line
/// is not one of ours anyway).
const MAX_HEADER_LINE: usize = 64 * 1024;

/// Removes [`SCAN_HEADERS`] fields (with their continuation lines) from the header section
/// of a CRLF-line stream cut anywhere; the body passes untouched.
#[derive(Debug)]
pub struct HeaderFilter {
    in_headers: bool,
    dropping: bool,
    /// Inside an over-long line that is being passed on as it is, up to its end.
    passing: bool,
    line: Vec<u8>,
}

impl Default for HeaderFilter {
    fn default() -> Self {
        Self {
            in_headers: true,
            dropping: false,
            passing: false,
            line: Vec::new(),
        }
    }
}

impl HeaderFilter {
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while self.in_headers && !input.is_empty() {
            let (piece, rest, complete) = match input.iter().position(|b| *b == b'\n') {
                Some(end) => (&input[..=end], &input[end + 1..], true),
                None => (input, &[][..], false),
            };
            input = rest;
            if self.passing {
                out.extend_from_slice(piece);
                self.passing = !complete;
                continue;
            }
            self.line.extend_from_slice(piece);
            if !complete {
                if self.line.len() > MAX_HEADER_LINE {
                    // Too long to be ours: passed on as it is, up to its end.
                    out.append(&mut self.line);
                    self.dropping = false;
                    self.passing = true;
                }
                continue;
            }
            let line = std::mem::take(&mut self.line);
            if line == b"\r\n" {
                self.in_headers = false;
                out.extend_from_slice(&line);
                continue;
            }
            if !matches!(line.first(), Some(b' ' | b'\t')) {
                let name = line
                    .iter()
                    .position(|b| *b == b':')
                    .map(|colon| &line[..colon]);
                self.dropping = name.is_some_and(|name| {
                    SCAN_HEADERS
                        .iter()
                        .any(|h| name.trim_ascii().eq_ignore_ascii_case(h.as_bytes()))
                });
            }
            if !self.dropping {
                out.extend_from_slice(&line);
            }
        }
        out.extend_from_slice(input);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_scan_headers_are_removed_from_the_headers_only() {
        let wire = b"Subject: hi\r\nX-Virus-Scanned: clamd (protobalance); clean\r\n\
                     x-spam-status: No,\r\n\tscore=-100\r\nX-Spam-Other: kept\r\n\r\n\
                     X-Virus-Scanned: in the body stays\r\n";
        for cut in 0..wire.len() {
            let mut filter = HeaderFilter::default();
            let mut out = Vec::new();
            filter.feed(&wire[..cut], &mut out);
            filter.feed(&wire[cut..], &mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                "Subject: hi\r\nX-Spam-Other: kept\r\n\r\nX-Virus-Scanned: in the body stays\r\n",
                "cut at {cut}"
            );
        }
        let mut filter = HeaderFilter::default();
        let mut out = Vec::new();
        let long = vec![b'a'; MAX_HEADER_LINE + 10];
        filter.feed(&long, &mut out);
        filter.feed(b"\r\nX-Spam-Flag: YES\r\nSubject: x\r\n", &mut out);
        assert_eq!(
            out.len(),
            long.len() + 2 + 12,
            "long line passed, forged header still removed"
        );
        assert!(out.ends_with(b"\r\nSubject: x\r\n"));
    }

    #[test]
    fn unstuffs_across_chunks() {
        let wire = b"Subject: x\r\n\r\n..dot\r\nplain.\r\n...\r\n";
        for cut in 0..wire.len() {
            let mut u = Unstuffer::default();
            let mut out = Vec::new();
            u.feed(&wire[..cut], &mut out);
            u.feed(&wire[cut..], &mut out);
            assert_eq!(
                out, b"Subject: x\r\n\r\n.dot\r\nplain.\r\n..\r\n",
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn spills_past_the_cap_and_replays_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spool = Spool::new(10);
        spool.write(b"0123456", dir.path()).await.expect("write");
        assert!(!spool.spilled());
        spool.write(b"789abcdef", dir.path()).await.expect("write");
        assert!(spool.spilled());
        assert_eq!(spool.len(), 16);
        for _ in 0..2 {
            spool.rewind().await.expect("rewind");
            let mut got = Vec::new();
            let mut buf = [0u8; 5];
            loop {
                let n = spool.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, b"0123456789abcdef");
        }
        let mut small = Spool::new(100);
        small.write(b"in memory", dir.path()).await.expect("write");
        small.rewind().await.expect("rewind");
        let mut buf = [0u8; 64];
        let n = small.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"in memory");
        assert_eq!(small.read(&mut buf).await.expect("read"), 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "the spill file is unlinked"
        );
    }
}
