//! Where a login goes: the directory's answer turned into the backend to use and the name
//! to log in with there, shared by the POP3 and IMAP drivers.

use super::ProxyContext;
use crate::directory::{DirectoryError, Mailbox, Normalized, Route};

/// The backend for a login.
pub struct Target {
    pub backend: String,
    /// The mailbox the login is for (without a master part).
    pub mailbox: Mailbox,
    /// The normalized mailbox, plus `<separator><master>` when a master user logged in.
    pub login_name: String,
    /// Set for a mailbox of an auto-provisioning domain that has no owner yet: it is
    /// assigned to `backend` only once that backend accepted the credentials.
    pub unconfirmed: Option<Mailbox>,
}

/// `None` for a login that is no mailbox of ours (unknown, foreign domain, not an address).
pub async fn login_target(
    ctx: &ProxyContext,
    login: &str,
) -> Result<Option<Target>, DirectoryError> {
    let separator = ctx.directory.normalizer().master_separator;
    Ok(match ctx.directory.route_login(login).await? {
        Ok(Route::Owner { mailbox, backend }) => Some(Target {
            backend,
            mailbox: mailbox.mailbox.clone(),
            login_name: login_name(mailbox, separator),
            unconfirmed: None,
        }),
        Ok(Route::Candidate { mailbox, backend }) => Some(Target {
            backend,
            mailbox: mailbox.mailbox.clone(),
            unconfirmed: Some(mailbox.mailbox.clone()),
            login_name: login_name(mailbox, separator),
        }),
        Ok(Route::UnknownMailbox(_) | Route::ForeignDomain(_)) | Err(_) => None,
    })
}

fn login_name(mailbox: Normalized, separator: Option<char>) -> String {
    match (mailbox.master, separator) {
        (Some(master), Some(separator)) => format!("{}{separator}{master}", mailbox.mailbox),
        _ => mailbox.mailbox.to_string(),
    }
}

/// Records the assignment of a newly provisioned mailbox after a successful login. False
/// when the session must not continue: the directory failed, or a concurrent login or
/// delivery assigned the mailbox to another backend first.
pub async fn confirm(ctx: &ProxyContext, target: &Target) -> bool {
    let Some(mailbox) = &target.unconfirmed else {
        return true;
    };
    match ctx.directory.confirm(mailbox, &target.backend).await {
        Ok(true) => {
            tracing::info!(%mailbox, backend = %target.backend, "mailbox provisioned on first login");
            true
        }
        Ok(false) => {
            tracing::warn!(%mailbox, backend = %target.backend, "mailbox was assigned elsewhere meanwhile; login refused");
            false
        }
        Err(error) => {
            tracing::error!(%mailbox, %error, "recording a provisioned mailbox failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::login_name;
    use crate::directory::Normalizer;

    #[test]
    fn master_logins_keep_the_master_part() {
        let normalizer = Normalizer {
            master_separator: Some('*'),
            ..Normalizer::default()
        };
        let master = normalizer
            .normalize("Bob@Example.com*admin")
            .expect("address");
        assert_eq!(login_name(master, Some('*')), "bob@example.com*admin");
        let plain = normalizer
            .normalize("bob+tag@example.com")
            .expect("address");
        assert_eq!(login_name(plain, Some('*')), "bob@example.com");
    }
}
