//! `protobalance ctl ban …`: timed bans in the kernel filter (`/api/v1/bans`), the maps
//! `protobalance filter ban` writes. This module owns the subcommands and the `<ban>`
//! body; a server without a loaded filter answers `409 filter_not_loaded` (exit 3).

use std::io;

use clap::Subcommand;
use hyper::Method;

use super::{CtlError, client::encode, commands::Ctl, render};
use crate::api::xml::Writer;

#[derive(Subcommand, Debug)]
pub enum BanCommand {
    /// List the unexpired bans: target, mode, reason, time left.
    Ls,
    /// Ban TARGET (an address, or an IPv6 /64) for SECONDS: the kernel drops it at once.
    Add {
        target: String,
        /// How long the ban lasts (the server allows up to a year).
        #[arg(long, value_name = "SECONDS")]
        ttl: u64,
        /// Drop only new TCP connections, not those already open.
        #[arg(long)]
        new_connections: bool,
        /// A number recorded with the ban (as `protobalance filter ban` has it).
        #[arg(long, value_name = "N")]
        reason: Option<u32>,
    },
    /// Lift the ban of TARGET.
    Rm { target: String },
}

/// What `ban add` asks for.
struct Ban<'a> {
    target: &'a str,
    ttl: u64,
    new_connections: bool,
    reason: Option<u32>,
}

impl Ban<'_> {
    /// `<ban target ttl-seconds mode [reason]/>` for `POST bans`.
    fn body(&self) -> String {
        let ttl = self.ttl.to_string();
        let mode = if self.new_connections {
            "new-connections"
        } else {
            "all"
        };
        let reason = self.reason.map(|r| r.to_string());
        let mut attributes = vec![
            ("target", self.target),
            ("ttl-seconds", ttl.as_str()),
            ("mode", mode),
        ];
        if let Some(reason) = reason.as_deref() {
            attributes.push(("reason", reason));
        }
        Writer::document("ban", &attributes).finish()
    }
}

/// `bans/TARGET`, the `/` of a /64 as `%2F` (a path segment cannot hold it).
fn ban_path(target: &str) -> String {
    format!("bans/{}", encode(target))
}

impl Ctl {
    pub async fn ban(&self, out: &mut impl io::Write, command: BanCommand) -> Result<(), CtlError> {
        match command {
            BanCommand::Ls => {
                let doc = self.fetch(Method::GET, "bans", None).await?;
                self.human(|| render::bans(out, &doc))
            }
            BanCommand::Add {
                target,
                ttl,
                new_connections,
                reason,
            } => {
                let ban = Ban {
                    target: &target,
                    ttl,
                    new_connections,
                    reason,
                };
                let doc = self.fetch(Method::POST, "bans", Some(ban.body())).await?;
                self.human(|| render::ban_placed(out, &doc))
            }
            BanCommand::Rm { target } => {
                self.call(Method::DELETE, &ban_path(&target), None).await?;
                self.human(|| writeln!(out, "lifted the ban of {target}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::xml::NS;

    #[test]
    fn ban_bodies_carry_mode_and_escape_the_target() {
        let ban = Ban {
            target: "198.51.100.7",
            ttl: 3600,
            new_connections: false,
            reason: None,
        };
        assert_eq!(
            ban.body(),
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ban xmlns=\"{NS}\" \
                 target=\"198.51.100.7\" ttl-seconds=\"3600\" mode=\"all\"></ban>\n"
            )
        );
        let ban = Ban {
            target: "a\"<b>&'",
            ttl: 60,
            new_connections: true,
            reason: Some(4),
        };
        assert!(
            ban.body().contains(
                " target=\"a&quot;&lt;b&gt;&amp;&apos;\" ttl-seconds=\"60\" \
                 mode=\"new-connections\" reason=\"4\"></ban>"
            ),
            "{}",
            ban.body()
        );
    }

    #[test]
    fn a_64_target_keeps_its_slash_inside_one_segment() {
        assert_eq!(ban_path("198.51.100.7"), "bans/198.51.100.7");
        assert_eq!(
            ban_path("2001:db8:1:2::/64"),
            "bans/2001%3Adb8%3A1%3A2%3A%3A%2F64"
        );
    }
}
