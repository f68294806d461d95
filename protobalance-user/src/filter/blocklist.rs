//! Blocklist files: one CIDR (or bare address) per line, `#` starts a comment, blank lines
//! are ignored. Parsing reports the file and line of the first bad entry. Each list has a
//! name (`NamedList`), which the kernel filter counts its drops under.

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

/// One blocklist as configured: its name (`xdp.blocklist` for the inline list, the file
/// name for a file) and entries. The kernel counts drops per list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamedList {
    pub name: String,
    pub entries: Vec<Cidr>,
}

/// The name of the inline list (`xdp.blocklist` in the config file).
pub const INLINE_LIST_NAME: &str = "xdp.blocklist";

/// Names the configured lists: the inline one [`INLINE_LIST_NAME`], each file by its file
/// name. A name already taken (two `drop.txt` in different directories) becomes the file's
/// config key instead (`xdp.blocklist_files[3]`). Names are cut to what the kernel's list
/// names hold ([`fit_name`]).
pub fn name_lists(inline: Vec<Cidr>, files: Vec<(&Path, Vec<Cidr>)>) -> Vec<NamedList> {
    let mut lists = vec![NamedList {
        name: INLINE_LIST_NAME.to_owned(),
        entries: inline,
    }];
    for (i, (path, entries)) in files.into_iter().enumerate() {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let name = fit_name(&name);
        let name = if name.is_empty() || lists.iter().any(|l| l.name == name) {
            format!("xdp.blocklist_files[{i}]")
        } else {
            name
        };
        lists.push(NamedList { name, entries });
    }
    lists
}

/// `name` cut to what a kernel list name holds (`LIST_NAME_LEN` bytes, at a character
/// boundary).
pub fn fit_name(name: &str) -> String {
    let mut end = name.len().min(protobalance_common::LIST_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
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
    fn lists_are_named_by_file_name_and_stay_distinct() {
        let cidr = |s: &str| s.parse::<Cidr>().expect("cidr");
        let lists = name_lists(
            vec![cidr("192.0.2.0/24")],
            vec![
                (Path::new("lists/drop.txt"), vec![cidr("198.51.100.0/24")]),
                (Path::new("/etc/other/drop.txt"), vec![]),
                (Path::new("xdp.blocklist"), vec![]),
                (Path::new(&"n".repeat(80)), vec![]),
            ],
        );
        let names: Vec<&str> = lists.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names[..4],
            [
                "xdp.blocklist",
                "drop.txt",
                "xdp.blocklist_files[1]",
                "xdp.blocklist_files[2]"
            ]
        );
        assert_eq!(names[4].len(), protobalance_common::LIST_NAME_LEN);
        assert_eq!(lists[1].entries, [cidr("198.51.100.0/24")]);
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
