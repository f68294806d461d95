//! protobalance: an SMTP/POP3/IMAP clustering edge. This library holds everything the
//! `protobalance` binary runs; integration tests and xtask use it too.
//!
//! Module map (see docs/architecture.md): `config` → `app` (wiring, shutdown) → `admin`
//! (/metrics, later the XML API) and `filter` (`xdp` is the only aya user). The protocol
//! modules (`smtp`, `pop3`, `imap`), `directory` and `backend` arrive with later issues.

pub mod admin;
pub mod app;
pub mod config;
pub mod filter;
pub mod metrics;
