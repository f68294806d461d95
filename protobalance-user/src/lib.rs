//! protobalance: an SMTP/POP3/IMAP clustering edge. This library holds everything the
//! `protobalance` binary runs; integration tests and xtask use it too.
//!
//! Module map (see docs/development.md): `config` → `app` (wiring, shutdown) → `admin`
//! (/metrics, the XML API in `api`; `ctl` is its command-line client) and `filter`
//! (`xdp` is the only aya user). Protocol modules (`pop3`, `imap`, `smtp`) each hold a
//! sans-IO `codec` (bytes in, commands out; no sockets) and a session driver (SMTP's
//! arrives with the SMTP edge). `secret` keeps credentials out of logs.

pub mod admin;
pub mod api;
pub mod app;
pub mod backend;
pub mod base64;
pub mod config;
pub mod ctl;
pub mod directory;
pub mod filter;
pub mod imap;
pub mod metrics;
pub mod moves;
pub mod pop3;
pub mod proxy;
pub mod reload;
pub mod scan;
pub mod secret;
pub mod smtp;
pub mod tls;
pub mod upgrade;
