//! Blocklist files: one CIDR (or bare address) per line, `#` starts a comment, blank lines
//! are ignored. Parsing reports the file and line of the first bad entry.

use std::path::Path;

use crate::filter::cidr::{Cidr, CidrError};

#[derive(Debug, thiserror::Error)]
pub enum BlocklistError {
    #[error("cannot read blocklist file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {source}")]
    Entry {
        path: String,
        line: usize,
        source: CidrError,
    },
}

/// Parses blocklist text; `origin` names the file in error messages.
pub fn parse(origin: &str, text: &str) -> Result<Vec<Cidr>, BlocklistError> {
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let cidr = line.parse().map_err(|source| BlocklistError::Entry {
            path: origin.to_owned(),
            line: index + 1,
            source,
        })?;
        entries.push(cidr);
    }
    Ok(entries)
}

pub fn read(path: &Path) -> Result<Vec<Cidr>, BlocklistError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| BlocklistError::Read {
        path: origin.clone(),
        source,
    })?;
    parse(&origin, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_comments_and_blank_lines() {
        let text = "# spamhaus-style list\n\n198.51.100.0/24  # botnet\n2001:db8::/48\n  \n";
        let entries = parse("list.txt", text).expect("valid");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].to_string(), "2001:db8::/48");
    }

    #[test]
    fn names_file_and_line_of_a_bad_entry() {
        let err = parse("list.txt", "198.51.100.0/24\n\n10.1.2.3/8\n").expect_err("host bits");
        assert!(
            err.to_string()
                .starts_with("list.txt:3: `10.1.2.3/8` has host bits set")
        );
    }
}
