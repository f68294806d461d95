//! Login and recipient normalization: every lookup goes through [`Normalizer::normalize`],
//! so `User@Example.COM`, `user+news@example.com` and `user@example.com` are one mailbox.
//!
//! Steps: split off a master user (`user*master`, when configured), split at the last `@`,
//! lowercase the domain (and drop a trailing dot), strip a `+tag` (configurable separator),
//! fold the local part's case (configurable), then validate conservatively: source-routing
//! and quoting forms (`x%ext@ours`, `"x@ext"@ours`, `@a:x@ext`, `x!y@ours`) are rejected, so
//! they can never be auto-provisioned or relayed.

use std::fmt;

use serde::Deserialize;

/// Longest address we accept (RFC 5321 path limit minus the angle brackets).
pub const MAX_ADDRESS: usize = 254;
/// Longest local part (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL: usize = 64;

/// A normalized mailbox address: `local@domain`, already folded and validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mailbox(String);

impl Mailbox {
    /// An address read back from a directory store: it was normalized on the way in, so it
    /// is not normalized again (the normalizer's options may have changed since).
    pub(crate) fn from_store(address: String) -> Self {
        Self(address)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map_or("", |(_, d)| d)
    }

    pub fn local(&self) -> &str {
        self.0.rsplit_once('@').map_or("", |(l, _)| l)
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normalized {
    pub mailbox: Mailbox,
    /// The master user of a `user*master` login, passed on to the backend unchanged.
    pub master: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,
    #[error("address is longer than {MAX_ADDRESS} characters")]
    TooLong,
    #[error("`{0}` has no domain; use the full address, e.g. user@example.com")]
    NoDomain(String),
    #[error("`{0}`: invalid local part")]
    BadLocal(String),
    #[error("`{0}`: invalid domain")]
    BadDomain(String),
}

/// Case handling for the local part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalCase {
    /// `John` and `john` are one mailbox (what users expect; Dovecot's `auth_username_format=%Lu`).
    #[default]
    Fold,
    /// Local parts are case-sensitive, as RFC 5321 allows.
    Preserve,
}

#[derive(Clone, Debug)]
pub struct Normalizer {
    pub local_case: LocalCase,
    /// `+` for `user+tag@domain`; `None` disables tag stripping.
    pub tag_separator: Option<char>,
    /// `*` for Dovecot-style `user*master` logins; `None` disables.
    pub master_separator: Option<char>,
}

impl Default for Normalizer {
    fn default() -> Self {
        Self {
            local_case: LocalCase::Fold,
            tag_separator: Some('+'),
            master_separator: None,
        }
    }
}

impl Normalizer {
    pub fn normalize(&self, input: &str) -> Result<Normalized, AddressError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(AddressError::Empty);
        }
        if input.len() > MAX_ADDRESS {
            return Err(AddressError::TooLong);
        }
        let (address, master) = match self.master_separator.and_then(|sep| input.rsplit_once(sep)) {
            Some((address, master)) if !master.is_empty() => (address, Some(master.to_owned())),
            _ => (input, None),
        };
        let (local, domain) = address
            .rsplit_once('@')
            .ok_or_else(|| AddressError::NoDomain(input.to_owned()))?;
        let domain =
            normalize_domain(domain).ok_or_else(|| AddressError::BadDomain(input.to_owned()))?;
        let local = match self.tag_separator.and_then(|sep| local.split_once(sep)) {
            Some((base, _tag)) => base,
            None => local,
        };
        if !valid_local(local) {
            return Err(AddressError::BadLocal(input.to_owned()));
        }
        let local = match self.local_case {
            LocalCase::Fold => local.to_lowercase(),
            LocalCase::Preserve => local.to_owned(),
        };
        Ok(Normalized {
            mailbox: Mailbox(format!("{local}@{domain}")),
            master,
        })
    }

    /// Normalizes a bare domain name the same way addresses' domains are.
    pub fn domain(&self, domain: &str) -> Option<String> {
        normalize_domain(domain.trim())
    }
}

fn normalize_domain(domain: &str) -> Option<String> {
    let domain = domain.strip_suffix('.').unwrap_or(domain).to_lowercase();
    let labels_ok = domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_alphanumeric() || c == '-')
    });
    (labels_ok && domain.contains('.') && domain.len() <= 253).then_some(domain)
}

/// RFC 5322 dot-atom local parts, minus the characters used for source routing (`%`, `!`)
/// and path separators (`/`); UTF-8 letters allowed (SMTPUTF8). Quoted local parts are not.
fn valid_local(local: &str) -> bool {
    const SPECIAL: &str = "#$&'*+-=?^_`{|}~";
    !local.is_empty()
        && local.len() <= MAX_LOCAL
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || SPECIAL.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, AddressError> {
        Normalizer::default().normalize(s).map(|n| n.mailbox.0)
    }

    #[test]
    fn case_tags_and_trailing_dots_fold_to_one_mailbox() {
        for input in [
            "User@Example.COM",
            "user+news@example.com",
            "user@example.com.",
            "  user@EXAMPLE.com ",
        ] {
            assert_eq!(norm(input).as_deref(), Ok("user@example.com"), "{input}");
        }
    }

    #[test]
    fn preserve_case_and_no_tag_separator() {
        let n = Normalizer {
            local_case: LocalCase::Preserve,
            tag_separator: None,
            master_separator: None,
        };
        let got = n.normalize("John+x@Example.com").expect("valid").mailbox;
        assert_eq!(got.as_str(), "John+x@example.com");
    }

    #[test]
    fn master_user_is_split_off() {
        let n = Normalizer {
            master_separator: Some('*'),
            ..Normalizer::default()
        };
        let got = n.normalize("User@example.com*admin").expect("valid");
        assert_eq!(got.mailbox.as_str(), "user@example.com");
        assert_eq!(got.master.as_deref(), Some("admin"));
        // Without the option `*` is an ordinary atext character.
        assert_eq!(norm("a*b@example.com").as_deref(), Ok("a*b@example.com"));
    }

    #[test]
    fn routing_and_quoting_forms_are_rejected() {
        for input in [
            "x%ext@example.com",
            "\"x@ext\"@example.com",
            "@a:x@ext.example",
            "x!y@example.com",
            "a..b@example.com",
            ".a@example.com",
            "a b@example.com",
            "user@",
            "user@localhost",
            "user@exa_mple.com",
            "user@-x.com",
        ] {
            assert!(norm(input).is_err(), "{input} must be rejected");
        }
        assert_eq!(
            norm("nodomain"),
            Err(AddressError::NoDomain("nodomain".into()))
        );
        assert_eq!(norm(""), Err(AddressError::Empty));
        assert_eq!(
            norm(&format!("{}@example.com", "a".repeat(65))),
            Err(AddressError::BadLocal(format!(
                "{}@example.com",
                "a".repeat(65)
            )))
        );
        assert_eq!(
            norm(&format!("a@{}.com", "b".repeat(300))),
            Err(AddressError::TooLong)
        );
    }

    #[test]
    fn utf8_local_parts_fold() {
        assert_eq!(norm("Jörg@Example.com").as_deref(), Ok("jörg@example.com"));
    }
}
