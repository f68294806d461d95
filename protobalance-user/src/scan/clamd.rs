//! clamd's INSTREAM command (clamd(8)): `zINSTREAM\0`, then chunks each prefixed by its
//! length as a 4-byte big-endian integer, a zero length to end; the answer is one
//! NUL-terminated line: `stream: OK`, `stream: <signature> FOUND`, or `… ERROR` (for
//! instance `INSTREAM size limit exceeded. ERROR` past clamd's `StreamMaxLength`).

use std::path::PathBuf;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
};

/// Where clamd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl ClamdAddr {
    /// `127.0.0.1:3310` or a socket path (`/run/clamav/clamd.ctl`).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(text)));
        }
        text.parse().map(Self::Tcp).map_err(|_| {
            format!("`{text}` is neither a socket path (/run/clamav/clamd.ctl) nor host:port")
        })
    }
}

impl std::fmt::Display for ClamdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What clamd said about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdVerdict {
    Clean,
    Infected(String),
}

/// An open INSTREAM session.
pub struct Instream {
    stream: Box<dyn Conn>,
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Longest answer line read (a signature name is short).
const MAX_ANSWER: usize = 4096;

impl Instream {
    pub async fn open(addr: &ClamdAddr) -> std::io::Result<Self> {
        let mut stream: Box<dyn Conn> = match addr {
            ClamdAddr::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            ClamdAddr::Unix(p) => Box::new(UnixStream::connect(p).await?),
        };
        stream.write_all(b"zINSTREAM\0").await?;
        Ok(Self { stream })
    }

    /// Sends one chunk (empty chunks are skipped: a zero length would end the stream).
    pub async fn send(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        for piece in chunk.chunks(u32::MAX as usize) {
            if piece.is_empty() {
                continue;
            }
            let len = u32::try_from(piece.len()).unwrap_or(u32::MAX);
            self.stream.write_all(&len.to_be_bytes()).await?;
            self.stream.write_all(piece).await?;
        }
        Ok(())
    }

    /// Ends the stream and reads clamd's answer.
    pub async fn finish(mut self) -> std::io::Result<ClamdVerdict> {
        self.stream.write_all(&0u32.to_be_bytes()).await?;
        self.stream.flush().await?;
        self.answer().await
    }

    /// Reads clamd's answer line (also after a write failed: clamd answers, e.g. `INSTREAM
    /// size limit exceeded. ERROR`, and closes when a stream passes its StreamMaxLength).
    pub async fn answer(mut self) -> std::io::Result<ClamdVerdict> {
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            let n = self.stream.read(&mut byte).await?;
            if n == 0 || byte[0] == 0 || byte[0] == b'\n' || answer.len() >= MAX_ANSWER {
                break;
            }
            answer.push(byte[0]);
        }
        parse_answer(&String::from_utf8_lossy(&answer))
    }
}

fn parse_answer(answer: &str) -> std::io::Result<ClamdVerdict> {
    let answer = answer.trim();
    let body = answer.strip_prefix("stream: ").unwrap_or(answer);
    if body == "OK" {
        return Ok(ClamdVerdict::Clean);
    }
    if let Some(name) = body.strip_suffix(" FOUND") {
        return Ok(ClamdVerdict::Infected(name.trim().to_owned()));
    }
    Err(std::io::Error::other(if answer.is_empty() {
        "clamd closed the connection without an answer".to_owned()
    } else {
        format!("clamd: {answer}")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(parse_answer("stream: OK").expect("ok"), ClamdVerdict::Clean);
        assert_eq!(
            parse_answer("stream: Eicar-Test-Signature FOUND").expect("found"),
            ClamdVerdict::Infected("Eicar-Test-Signature".into())
        );
        let error = parse_answer("INSTREAM size limit exceeded. ERROR").expect_err("error");
        assert!(error.to_string().contains("size limit"), "{error}");
        assert!(parse_answer("").is_err());
        assert_eq!(
            ClamdAddr::parse("/run/clamav/clamd.ctl"),
            Ok(ClamdAddr::Unix("/run/clamav/clamd.ctl".into()))
        );
        assert!(ClamdAddr::parse("127.0.0.1:3310").is_ok());
        assert!(ClamdAddr::parse("clamd").is_err());
    }
}
