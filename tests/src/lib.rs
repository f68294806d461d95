//! End-to-end test harness for protobalance: real Dovecot backends ([`dovecot`]), real
//! Postfix MTAs in front of them ([`postfix`]) with a [`mail_sink`] for everything else,
//! a DNS server for DNSBL tests ([`dns`]), PostgreSQL for the shared directory ([`postgres`]), network namespaces and veth pairs ([`netns`]), and helpers to drive real clients
//! ([`process::python`]) and wait for sockets ([`net`]). A normal library so both the
//! integration tests and `cargo xtask run` (a demo cluster) can use it.
//!
//! Everything that starts a process or creates kernel state is an RAII value: dropping
//! it (also while a test panics) stops the process or removes the state.

pub mod dns;
pub mod dovecot;
pub mod dovecot_cluster;
pub mod dovecot_config;
pub mod mail_sink;
pub mod net;
pub mod netns;
pub mod postfix;
pub mod postfix_config;
pub mod postgres;
pub mod process;
pub mod scanners;
pub mod test_dir;

pub use dns::{DnsServer, require_dnsmasq};
pub use dovecot::{
    BackendOptions, DovecotBackend, MASTER_PASSWORD, MASTER_USER, password_for, user_name,
};
pub use dovecot_cluster::{DovecotCluster, loopback_ip};
pub use mail_sink::{MailSink, SinkMessage};
pub use net::{free_port, free_ports, wait_for_port};
pub use netns::{NetNs, TestSubnet, Veth, require_root};
pub use postfix::{PostfixBackend, PostfixOptions, require_postfix};
pub use postgres::{PostgresServer, require_postgres};
pub use process::{ChildGuard, python};
pub use scanners::{ClamdServer, EICAR, RspamdServer, require_scanner};
