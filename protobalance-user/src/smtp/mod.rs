//! SMTP at the edge (RFC 5321): the sans-IO codec — client commands, replies in both
//! directions, and the DATA stream reader that enforces the end-of-data rule and the size
//! limit while the message streams through to the owning backend — and the inbound (MX)
//! and submission session driver with its LMTP/SMTP backend side and per-user limits.

pub mod codec;
pub mod deliver;
pub mod limits;
pub mod reuse;
pub mod session;
mod transaction;
