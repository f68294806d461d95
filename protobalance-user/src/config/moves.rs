//! `[moves]`: how mailboxes are moved between backends (`POST /mailboxes/{a}/move`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Problem;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MovesConfig {
    /// The master (admin) user every backend accepts as `<mailbox><separator><user>` over
    /// IMAP (Dovecot: a `master = yes` passdb and `auth_master_user_separator`).
    #[serde(default)]
    pub master_user: String,
    /// A file whose first line is the master user's password.
    #[serde(default)]
    pub master_password_file: Option<PathBuf>,
    #[serde(default = "default_separator")]
    pub separator: String,
    /// Delete the old copy once the mailbox moved (false: leave it for the operator).
    #[serde(default = "yes")]
    pub delete_old: bool,
    /// After the switch, passes copy what still reaches the old backend until one finds
    /// nothing new and this long has passed since the switch.
    #[serde(default = "default_settle_seconds")]
    pub settle_seconds: u64,
    /// A move whose run stopped (the node stopped, or a backend failed after the copy
    /// began) is taken over and finished once its heartbeat is this old — by this node
    /// or another one sharing the directory.
    #[serde(default = "default_resume_after_seconds")]
    pub resume_after_seconds: u64,
}

fn default_separator() -> String {
    "*".into()
}

const fn yes() -> bool {
    true
}

const fn default_settle_seconds() -> u64 {
    3
}

const fn default_resume_after_seconds() -> u64 {
    60
}

impl Default for MovesConfig {
    fn default() -> Self {
        Self {
            master_user: String::new(),
            master_password_file: None,
            separator: default_separator(),
            delete_old: true,
            settle_seconds: default_settle_seconds(),
            resume_after_seconds: default_resume_after_seconds(),
        }
    }
}

impl MovesConfig {
    /// Whether moves are configured (a master user and its password).
    pub fn enabled(&self) -> bool {
        !self.master_user.is_empty() && self.master_password_file.is_some()
    }

    /// How long a move's heartbeat may be silent before another run takes it over.
    pub fn resume_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.resume_after_seconds)
    }

    pub(super) fn validate(&mut self, base: &Path) -> Result<(), Problem> {
        if self.master_user.is_empty() != self.master_password_file.is_none() {
            return Err(Problem::new(
                "moves.master_user",
                "set both master_user and master_password_file, or neither".into(),
            ));
        }
        if self
            .master_user
            .chars()
            .any(|c| c.is_whitespace() || c == '"')
        {
            return Err(Problem::new(
                "moves.master_user",
                format!("`{}` must not contain spaces or quotes", self.master_user),
            ));
        }
        if self.separator.chars().count() != 1 {
            return Err(Problem::new(
                "moves.separator",
                format!(
                    "`{}` must be one character (Dovecot's default is *)",
                    self.separator
                ),
            ));
        }
        if self.settle_seconds > 3600 {
            return Err(Problem::new(
                "moves.settle_seconds",
                format!("{} must be at most 3600", self.settle_seconds),
            ));
        }
        if !(2..=86_400).contains(&self.resume_after_seconds) {
            return Err(Problem::new(
                "moves.resume_after_seconds",
                format!("{} must be between 2 and 86400", self.resume_after_seconds),
            ));
        }
        if let Some(path) = &mut self.master_password_file {
            if path.is_relative() {
                *path = base.join(&*path);
            }
            let text = std::fs::read_to_string(&*path).map_err(|e| {
                Problem::new(
                    "moves.master_password_file",
                    format!("{}: {e}", path.display()),
                )
            })?;
            if text.lines().next().is_none_or(str::is_empty) {
                return Err(Problem::new(
                    "moves.master_password_file",
                    format!("{}: the first line (the password) is empty", path.display()),
                ));
            }
        }
        Ok(())
    }

    /// The master password (first line of the file).
    pub fn password(&self) -> std::io::Result<String> {
        let path = self
            .master_password_file
            .as_deref()
            .ok_or_else(|| std::io::Error::other("moves.master_password_file is not set"))?;
        Ok(std::fs::read_to_string(path)?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::MovesConfig;

    fn problem(config: MovesConfig) -> Option<(String, String)> {
        let mut config = config;
        config
            .validate(std::path::Path::new("/"))
            .err()
            .map(|p| (p.key, p.message))
    }

    #[test]
    fn bad_moves_settings_name_the_key_and_the_fix() {
        assert_eq!(problem(MovesConfig::default()), None, "moves off is valid");
        let (key, message) = problem(MovesConfig {
            master_user: "admin".into(),
            ..MovesConfig::default()
        })
        .expect("a user without a password file");
        assert_eq!(key, "moves.master_user");
        assert!(message.contains("master_password_file"), "{message}");
        for seconds in [0, 1, 86_401] {
            let (key, message) = problem(MovesConfig {
                resume_after_seconds: seconds,
                ..MovesConfig::default()
            })
            .expect("out of range");
            assert_eq!(key, "moves.resume_after_seconds");
            assert!(message.contains("between 2 and 86400"), "{message}");
        }
        let (key, _) = problem(MovesConfig {
            separator: "**".into(),
            ..MovesConfig::default()
        })
        .expect("two characters");
        assert_eq!(key, "moves.separator");
        let (key, message) = problem(MovesConfig {
            master_user: "admin".into(),
            master_password_file: Some("/nonexistent/protobalance-password".into()),
            ..MovesConfig::default()
        })
        .expect("a missing file");
        assert_eq!(key, "moves.master_password_file");
        assert!(
            message.contains("/nonexistent/protobalance-password"),
            "{message}"
        );
    }
}
