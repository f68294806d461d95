//! Abuse filtering. `xdp` is the only module in the crate that touches aya; `cidr` and
//! `blocklist` are the plain data it is fed with. `reputation` judges
//! client behaviour and feeds bans to `xdp`; `dnsbl` asks DNS block- and allowlists;
//! `shared_bans` hands bans to the other nodes of a multi-node edge.

pub mod blocklist;
pub mod cidr;
pub mod dnsbl;
pub mod reputation;
pub mod shared_bans;
pub mod xdp;
