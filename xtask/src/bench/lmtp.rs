//! Seeds every benchmark mailbox with one ~10 KB message by LMTP on its owner backend (only
//! there: a mailbox lives on one backend). One LMTP connection per backend, backends in
//! parallel, one transaction per mailbox. Also builds the benches' messages ([`message`]).

use std::{net::SocketAddr, thread};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{interrupted, wire::LineConn};

/// Size of the seeded (and `bench smtp`'s) message body (headers add ~150 bytes).
pub const BODY_BYTES: usize = 10 * 1024;
const LINE_WIDTH: usize = 78;

/// `batches`: (a backend's LMTP address, the mailboxes it owns).
pub fn seed(batches: &[(SocketAddr, Vec<String>)]) -> Result<()> {
    let message = message(BODY_BYTES);
    thread::scope(|scope| {
        let handles: Vec<_> = batches
            .iter()
            .map(|(addr, users)| scope.spawn(|| deliver_all(*addr, users, &message)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("an LMTP thread panicked"))?)
            .collect::<Result<Vec<()>>>()
    })?;
    Ok(())
}

fn deliver_all(addr: SocketAddr, users: &[String], message: &[u8]) -> Result<()> {
    let mut conn = LineConn::connect(addr).context("LMTP")?;
    conn.expect("220", "connect (LMTP greeting)")?;
    conn.send(b"LHLO bench.invalid\r\n")?;
    while !conn.expect("250", "LHLO")?.starts_with(b"250 ") {}
    for user in users {
        if interrupted() {
            bail!("interrupted");
        }
        deliver(&mut conn, user, message).with_context(|| format!("LMTP {addr} to {user}"))?;
    }
    conn.command(b"QUIT\r\n", "221", "QUIT")?;
    Ok(())
}

fn deliver(conn: &mut LineConn, user: &str, message: &[u8]) -> Result<()> {
    conn.command(b"MAIL FROM:<bench@example.net>\r\n", "250", "MAIL FROM")?;
    conn.command(format!("RCPT TO:<{user}>\r\n").as_bytes(), "250", "RCPT TO")?;
    conn.command(b"DATA\r\n", "354", "DATA")?;
    conn.send(message)?;
    conn.command(b".\r\n", "250", "end of data")?;
    Ok(())
}

/// A message of about `body_bytes` after its headers: CRLF lines, none starting with a
/// dot, ending in CRLF (so `.\r\n` terminates it).
pub fn message(body_bytes: usize) -> Vec<u8> {
    let mut text = String::from(
        "From: bench@example.net\r\nTo: undisclosed-recipients:;\r\n\
         Subject: protobalance bench\r\nMessage-ID: <bench@example.net>\r\n\r\n",
    );
    let lines = body_bytes / (LINE_WIDTH + 2);
    text.reserve(lines * (LINE_WIDTH + 2));
    for i in 0..lines {
        let line = format!("bench line {i:04} ");
        text.push_str(&format!("{line:x<LINE_WIDTH$}\r\n"));
    }
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_about_10_kb_of_crlf_lines() {
        let m = message(BODY_BYTES);
        assert!((BODY_BYTES - 200..BODY_BYTES + 400).contains(&m.len()));
        assert!(m.ends_with(b"\r\n"));
        assert!(!m.windows(3).any(|w| w == b"\n.\r" || w == b"\n.."));
    }
}
