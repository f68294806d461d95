//! The backend pool: where each backend is and how to reach it. Connections set
//! TCP_NODELAY (login exchanges are tiny request/response pairs; Nagle would add tens of
//! milliseconds per session) and have a connect timeout, so a dead backend costs the
//! client a quick temporary failure, not a hang. Health checks and the circuit breaker
//! extend this module next.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use crate::config::BackendConfig;

/// Which service on a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Pop3,
    Imap,
    Lmtp,
}

impl Service {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pop3 => "pop3",
            Self::Imap => "imap",
            Self::Lmtp => "lmtp",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("backend `{0}` is not configured")]
    Unknown(String),
    #[error("backend `{name}` ({addr}): connect timed out after {timeout:?}")]
    Timeout {
        name: String,
        addr: SocketAddr,
        timeout: Duration,
    },
    #[error("backend `{name}` ({addr}): {source}")]
    Io {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct BackendPool {
    backends: HashMap<String, BackendConfig>,
    connect_timeout: Duration,
}

impl BackendPool {
    pub fn new(backends: &[BackendConfig], connect_timeout: Duration) -> Self {
        Self {
            backends: backends
                .iter()
                .map(|b| (b.name.clone(), b.clone()))
                .collect(),
            connect_timeout,
        }
    }

    pub fn address(&self, name: &str, service: Service) -> Option<SocketAddr> {
        let b = self.backends.get(name)?;
        let port = match service {
            Service::Pop3 => b.pop3_port,
            Service::Imap => b.imap_port,
            Service::Lmtp => b.lmtp_port,
        };
        Some(SocketAddr::new(b.address, port))
    }

    pub async fn connect(&self, name: &str, service: Service) -> Result<TcpStream, ConnectError> {
        let addr = self
            .address(name, service)
            .ok_or_else(|| ConnectError::Unknown(name.to_owned()))?;
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout {
                name: name.to_owned(),
                addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| ConnectError::Io {
                name: name.to_owned(),
                addr,
                source,
            })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}
