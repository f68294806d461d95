//! Abuse filtering. `xdp` is the only module in the crate that touches aya; `cidr` and
//! `blocklist` are the plain data it is fed with. Reputation and DNSBL arrive in later issues.

pub mod blocklist;
pub mod cidr;
pub mod xdp;
