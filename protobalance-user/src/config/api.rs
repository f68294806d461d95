//! `[api]`: the XML management API on the admin listener (docs/api.md).

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::Problem;

/// Shortest token accepted: 32 characters (e.g. `openssl rand -hex 32` gives 64).
pub const MIN_TOKEN: usize = 32;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer tokens; without any, every API request gets 401.
    #[serde(default, rename = "token")]
    pub tokens: Vec<ApiTokenConfig>,
    /// Largest body of a single-resource request.
    #[serde(default = "default_max_body")]
    pub max_body_octets: u64,
    /// Largest bulk-import body (it is streamed, not held).
    #[serde(default = "default_max_import")]
    pub max_import_octets: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            max_body_octets: default_max_body(),
            max_import_octets: default_max_import(),
        }
    }
}

const fn default_max_body() -> u64 {
    64 * 1024
}
const fn default_max_import() -> u64 {
    256 * 1024 * 1024
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiAccess {
    ReadOnly,
    ReadWrite,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenConfig {
    /// Who holds it (e.g. `crm`): named in the audit log, never the token itself.
    pub name: String,
    /// A file holding the token (first line; relative paths are from the config file).
    pub token_file: Option<PathBuf>,
    /// The token inline (prefer `token_file`: config files get copied around).
    pub token: Option<String>,
    pub access: ApiAccess,
}

impl ApiTokenConfig {
    /// The token text, read from `token_file` or inline.
    pub fn secret(&self) -> Result<String, String> {
        let text = match (&self.token, &self.token_file) {
            (Some(token), None) => token.clone(),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("reading {}: {e}", file.display()))?;
                text.lines().next().unwrap_or_default().trim().to_owned()
            }
            _ => return Err("set exactly one of `token_file` and `token`".into()),
        };
        if text.len() < MIN_TOKEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the token must be at least {MIN_TOKEN} printable characters without spaces \
                 (e.g. `openssl rand -hex 32`); got {} characters",
                text.len()
            ));
        }
        Ok(text)
    }
}

impl ApiConfig {
    pub(super) fn validate(&mut self, base: &Path) -> Result<(), Problem> {
        let mut names = HashSet::new();
        for (i, token) in self.tokens.iter_mut().enumerate() {
            let key = |field: &str| format!("api.token[{i}].{field}");
            let name_ok = !token.name.is_empty()
                && token.name.len() <= 64
                && token
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !name_ok {
                return Err(Problem::new(
                    &key("name"),
                    format!(
                        "`{}`: use 1-64 characters from A-Z a-z 0-9 . _ -",
                        token.name
                    ),
                ));
            }
            if !names.insert(token.name.clone()) {
                return Err(Problem::new(
                    &key("name"),
                    format!("`{}` is listed twice", token.name),
                ));
            }
            if let Some(file) = &mut token.token_file {
                *file = base.join(&*file);
            }
            let field = if token.token_file.is_some() {
                "token_file"
            } else {
                "token"
            };
            token
                .secret()
                .map_err(|message| Problem::new(&key(field), message))?;
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_octets) {
            return Err(Problem::new(
                "api.max_body_octets",
                format!("{} is outside 1024..=16777216", self.max_body_octets),
            ));
        }
        if !(1024..=(1 << 34)).contains(&self.max_import_octets) {
            return Err(Problem::new(
                "api.max_import_octets",
                format!("{} is outside 1024..=17179869184", self.max_import_octets),
            ));
        }
        Ok(())
    }
}
