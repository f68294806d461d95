//! The POP3 session script: greeting, USER, PASS, STAT, RETR 1 (the whole multi-line
//! body), QUIT. Every reply is checked, so a session that "finishes" really read mail.

use anyhow::{Context as _, Result, ensure};

use super::{protocol::Login, wire::LineConn};

/// Bound on one message body; the seeded message is ~10 KB.
const MAX_BODY: usize = 1024 * 1024;
/// Less than this means the seeded message was not what came back.
const MIN_BODY: usize = 1024;

pub fn session(conn: &mut LineConn, login: &Login) -> Result<()> {
    conn.expect("+OK", "connect (greeting)")?;
    conn.command(format!("USER {}\r\n", login.user).as_bytes(), "+OK", "USER")?;
    conn.command(
        format!("PASS {}\r\n", login.password).as_bytes(),
        "+OK",
        "PASS",
    )?;
    let stat = conn.command(b"STAT\r\n", "+OK", "STAT")?;
    let messages = stat_count(stat).context("parsing the STAT reply")?;
    ensure!(
        messages >= 1,
        "{}: empty mailbox (was the seed message delivered?)",
        login.user
    );
    conn.command(b"RETR 1\r\n", "+OK", "RETR 1")?;
    let body = read_multiline(conn)?;
    ensure!(body >= MIN_BODY, "RETR 1 returned only {body} bytes");
    conn.command(b"QUIT\r\n", "+OK", "QUIT")?;
    Ok(())
}

/// `+OK 1 10240` → 1.
fn stat_count(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    text.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Reads a dot-terminated multi-line response; returns the bytes read before the dot.
fn read_multiline(conn: &mut LineConn) -> Result<usize> {
    let mut total = 0;
    loop {
        let line = conn.read_line().context("reading the RETR body")?;
        if line == b".\r\n" {
            return Ok(total);
        }
        total += line.len();
        ensure!(total <= MAX_BODY, "RETR body over {MAX_BODY} bytes");
    }
}

#[cfg(test)]
mod tests {
    use super::stat_count;

    #[test]
    fn parses_stat() {
        assert_eq!(stat_count(b"+OK 1 10240\r\n"), Some(1));
        assert_eq!(stat_count(b"+OK 0 0\r\n"), Some(0));
        assert_eq!(stat_count(b"+OK\r\n"), None);
    }
}
