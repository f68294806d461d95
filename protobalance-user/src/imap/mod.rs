//! IMAP at the edge: the pre-login codec (sans-IO), the session driver, and the login
//! hand-over to the owning backend.

pub mod codec;
mod login;
pub mod session;
