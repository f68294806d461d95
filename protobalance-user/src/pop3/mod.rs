//! POP3 at the edge: the pre-login codec (sans-IO) and, later, the session driver.

pub mod codec;
