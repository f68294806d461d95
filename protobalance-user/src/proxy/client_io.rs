//! Reading client input before login, shared by the protocol drivers: every read is
//! bounded by the session's deadline, and the buffer only grows by one read at a time
//! (the codecs bound what a complete command may hold).

use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Why no more client input came.
pub enum ReadStop {
    Closed,
    TimedOut,
}

/// Reads more client input into `buf` (reserving `reserve` octets first) before `deadline`.
pub async fn fill<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    reserve: usize,
    deadline: Instant,
) -> Result<(), ReadStop> {
    buf.reserve(reserve);
    match tokio::time::timeout_at(deadline.into(), stream.read_buf(buf)).await {
        Err(_) => Err(ReadStop::TimedOut),
        Ok(Ok(0) | Err(_)) => Err(ReadStop::Closed),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Buffered input longer than `max_line` (the configured limit, tighter than the codec's
/// own bound) that has no line end yet.
pub fn line_too_long(buf: &[u8], max_line: usize) -> bool {
    buf.len() > max_line && !buf.contains(&b'\n')
}
