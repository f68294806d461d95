//! The mail protocols the load generator can speak, each as one session script. Adding a
//! protocol is a variant here, its script module, and a target in `mod.rs`.

use std::net::SocketAddr;

use anyhow::Result;
use protobalance_tests::DovecotBackend;

use super::{imap, pop3, wire::LineConn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pop3,
    Imap,
}

/// One mailbox's credentials, formatted once so the hot loop does not allocate them.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
}

impl Protocol {
    /// The name used in the protobalance config (`[[listener]] protocol`) and the report.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pop3 => "pop3",
            Self::Imap => "imap",
        }
    }

    /// Where a client talks this protocol to a backend directly.
    pub fn backend_addr(self, backend: &DovecotBackend) -> SocketAddr {
        match self {
            Self::Pop3 => backend.pop3_addr(),
            Self::Imap => backend.imap_addr(),
        }
    }

    /// One whole session on a fresh connection: greeting, login, read the one message
    /// delivered to the mailbox, log out.
    pub fn session(self, conn: &mut LineConn, login: &Login) -> Result<()> {
        match self {
            Self::Pop3 => pop3::session(conn, login),
            Self::Imap => imap::session(conn, login),
        }
    }
}
