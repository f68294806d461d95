//! The SMTP and LMTP session script: greeting, EHLO (LHLO), MAIL FROM, RCPT TO for each
//! recipient, DATA, the message, the end of data, QUIT. Every reply is checked: each
//! recipient must be accepted, and after the data SMTP answers once for the message while
//! LMTP answers once per recipient (RFC 2033 §4.2), each a 250; so a session that
//! "finishes" really handed its message over.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::{
    protocol::Delivery,
    wire::{IO_TIMEOUT, LineConn},
};

/// Our EHLO/LHLO name; `.invalid` (RFC 2606) never resolves.
const CLIENT_NAME: &str = "bench.invalid";
const SENDER: &str = "bench@example.net";
/// Bound on the lines of one reply (an EHLO reply lists about ten extensions).
const MAX_REPLY_LINES: usize = 100;
/// Extra wait for the replies after the data, per MiB of message: the server stores the
/// whole message (LMTP: once per recipient) before it answers.
const STORE_TIME_PER_MIB: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Smtp,
    Lmtp,
}

pub fn session(conn: &mut LineConn, dialect: Dialect, delivery: &Delivery) -> Result<()> {
    reply(conn, "220", "connect (greeting)")?;
    let hello = match dialect {
        Dialect::Smtp => "EHLO",
        Dialect::Lmtp => "LHLO",
    };
    conn.send(format!("{hello} {CLIENT_NAME}\r\n").as_bytes())?;
    reply(conn, "250", hello)?;
    let mail = format!("MAIL FROM:<{SENDER}>\r\n");
    conn.command(mail.as_bytes(), "250", "MAIL FROM")?;
    for rcpt in &delivery.recipients {
        let command = format!("RCPT TO:<{rcpt}>\r\n");
        conn.command(command.as_bytes(), "250", "RCPT TO")
            .with_context(|| format!("recipient {rcpt}"))?;
    }
    conn.command(b"DATA\r\n", "354", "DATA")?;
    conn.send(&delivery.message)
        .context("sending the message")?;
    conn.send(b".\r\n").context("sending the end of data")?;
    let answers = match dialect {
        Dialect::Smtp => 1,
        Dialect::Lmtp => delivery.recipients.len(),
    };
    let mib = u32::try_from(delivery.message.len() >> 20).unwrap_or(u32::MAX);
    conn.set_read_timeout(IO_TIMEOUT + STORE_TIME_PER_MIB.saturating_mul(mib))?;
    for _ in 0..answers {
        reply(conn, "250", "end of data")?;
    }
    conn.set_read_timeout(IO_TIMEOUT)?;
    conn.command(b"QUIT\r\n", "221", "QUIT")?;
    Ok(())
}

/// Reads one reply, all its lines (`250-…` up to `250 …`), each with the expected code.
fn reply(conn: &mut LineConn, code: &str, after: &str) -> Result<()> {
    for _ in 0..MAX_REPLY_LINES {
        let line = conn.expect(code, after)?;
        if !is_continued(line) {
            return Ok(());
        }
    }
    bail!("after {after}: a reply of more than {MAX_REPLY_LINES} lines")
}

/// `250-PIPELINING` is followed by more lines of the same reply; `250 OK` and a bare
/// `250` end it.
fn is_continued(line: &[u8]) -> bool {
    line.get(3) == Some(&b'-')
}

#[cfg(test)]
mod tests {
    use super::is_continued;

    #[test]
    fn multi_line_replies() {
        assert!(is_continued(b"250-PIPELINING\r\n"));
        assert!(!is_continued(b"250 SIZE 1000\r\n"));
        assert!(!is_continued(b"250\r\n"));
    }
}
