//! What the benches speak. [`Protocol`] names what protobalance listens for (the
//! `[[listener]] protocol` a bench configures); [`Session`] is one client connection's
//! script together with what it needs: a mailbox read after login (POP3, IMAP) or one
//! message handed to its recipients (SMTP, LMTP). Adding a script is a `Session` variant
//! and its module; adding a target is a `Target` in `mod.rs`.

use std::{fmt, net::SocketAddr, sync::Arc};

use anyhow::Result;
use protobalance_tests::DovecotBackend;

use super::{
    imap, pop3,
    smtp::{self, Dialect},
    wire::LineConn,
};

/// A protocol of protobalance's mail listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pop3,
    Imap,
    Smtp,
}

impl Protocol {
    /// The name used in the protobalance config (`[[listener]] protocol`) and the report.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pop3 => "pop3",
            Self::Imap => "imap",
            Self::Smtp => "smtp",
        }
    }
}

/// How `bench pop3|imap` reads a mailbox: the protocols with a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retrieval {
    Pop3,
    Imap,
}

impl Retrieval {
    pub const fn protocol(self) -> Protocol {
        match self {
            Self::Pop3 => Protocol::Pop3,
            Self::Imap => Protocol::Imap,
        }
    }

    /// Where a client talks this protocol to a backend directly.
    pub fn backend_addr(self, backend: &DovecotBackend) -> SocketAddr {
        match self {
            Self::Pop3 => backend.pop3_addr(),
            Self::Imap => backend.imap_addr(),
        }
    }

    pub fn session(self, login: Login) -> Session {
        match self {
            Self::Pop3 => Session::Pop3(login),
            Self::Imap => Session::Imap(login),
        }
    }
}

/// One mailbox's credentials, formatted once so the hot loop does not allocate them.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
}

/// One message and the mailboxes it goes to.
#[derive(Clone)]
pub struct Delivery {
    pub recipients: Vec<String>,
    /// CRLF lines, none starting with a dot, without the terminating `.`; shared by every
    /// session of a phase.
    pub message: Arc<[u8]>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("recipients", &self.recipients)
            .field("message_bytes", &self.message.len())
            .finish()
    }
}

/// One whole session on a fresh connection, and what it works on.
#[derive(Debug, Clone)]
pub enum Session {
    /// Greeting, login, read the one message delivered to the mailbox, log out.
    Pop3(Login),
    Imap(Login),
    /// One message in one transaction: EHLO, …, one reply after the data.
    Smtp(Delivery),
    /// The same to an LMTP server: LHLO, …, one reply per recipient after the data.
    Lmtp(Delivery),
}

impl Session {
    pub fn run(&self, conn: &mut LineConn) -> Result<()> {
        match self {
            Self::Pop3(login) => pop3::session(conn, login),
            Self::Imap(login) => imap::session(conn, login),
            Self::Smtp(delivery) => smtp::session(conn, Dialect::Smtp, delivery),
            Self::Lmtp(delivery) => smtp::session(conn, Dialect::Lmtp, delivery),
        }
    }

    /// The mailbox an error report names (a delivery's first recipient).
    pub fn mailbox(&self) -> &str {
        match self {
            Self::Pop3(login) | Self::Imap(login) => &login.user,
            Self::Smtp(delivery) | Self::Lmtp(delivery) => {
                delivery.recipients.first().map_or("", String::as_str)
            }
        }
    }
}
