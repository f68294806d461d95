//! End-to-end test harness for protobalance: real Dovecot backends ([`dovecot`]),
//! network namespaces and veth pairs ([`netns`]), and helpers to drive real clients
//! ([`process::python`]) and wait for sockets ([`net`]). A normal library so both the
//! integration tests and `cargo xtask run` (a demo cluster) can use it.
//!
//! Everything that starts a process or creates kernel state is an RAII value: dropping
//! it (also while a test panics) stops the process or removes the state.

pub mod dovecot;
pub mod dovecot_cluster;
pub mod dovecot_config;
pub mod net;
pub mod netns;
pub mod process;
pub mod test_dir;

pub use dovecot::{BackendOptions, DovecotBackend, password_for, user_name};
pub use dovecot_cluster::{DovecotCluster, loopback_ip};
pub use net::{free_port, free_ports, wait_for_port};
pub use netns::{NetNs, TestSubnet, Veth, require_root};
pub use process::{ChildGuard, python};
