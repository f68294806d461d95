//! `protobalance ctl backend …`: list backends, add one live (`POST backends` with its
//! definition), change an added backend's capacity, drain / activate / take down, remove.
//! This module owns the subcommands and the `<backend>` bodies they send.

use std::io;

use clap::{Subcommand, ValueEnum};
use hyper::Method;

use super::{CtlError, client::encode, commands::Ctl, render};
use crate::api::xml::Writer;

#[derive(Subcommand, Debug)]
pub enum BackendCommand {
    /// List backends: state, capacity, mailboxes, load, services up.
    Ls,
    /// Add backend NAME live: it joins the pool at once (new mailboxes may go there) and
    /// is kept in the directory, so it is back after a restart.
    Add(Definition),
    /// Change the capacity of NAME (only for a backend added with `backend add`).
    Set {
        name: String,
        /// Relative weight for apportioning new mailboxes.
        #[arg(long, value_name = "N")]
        capacity: u32,
    },
    /// Keep serving NAME's mailboxes but give it no new ones.
    Drain { name: String },
    /// Let NAME take new mailboxes again.
    Activate { name: String },
    /// Take NAME down: its mailboxes get temporary failures.
    Down { name: String },
    /// Remove NAME once it owns no mailboxes (not one the config file lists).
    Rm { name: String },
    /// Move every mailbox of NAME to the other backends, by capacity (drain NAME first).
    Empty { name: String },
}

/// A backend's definition, as a `[[backend]]` section of the config file has it; what is
/// left out gets the same defaults there. The server checks every value.
#[derive(clap::Args, Debug)]
pub struct Definition {
    /// A stable name: the directory records each mailbox's backend by it.
    name: String,
    /// The backend's IP address.
    #[arg(long, value_name = "IP")]
    address: String,
    /// Relative weight for apportioning new mailboxes (default 100).
    #[arg(long, value_name = "N")]
    capacity: Option<u32>,
    /// POP3 port (default 110).
    #[arg(long, value_name = "PORT")]
    pop3_port: Option<u16>,
    /// IMAP port (default 143).
    #[arg(long, value_name = "PORT")]
    imap_port: Option<u16>,
    /// LMTP port, for --delivery lmtp (default 24).
    #[arg(long, value_name = "PORT")]
    lmtp_port: Option<u16>,
    /// How inbound mail reaches it (default lmtp).
    #[arg(long, value_enum)]
    delivery: Option<Delivery>,
    /// SMTP port, for --delivery smtp (default 25).
    #[arg(long, value_name = "PORT")]
    smtp_port: Option<u16>,
    /// Its authenticated submission port, for the edge's submission listeners.
    #[arg(long, value_name = "PORT")]
    submission_port: Option<u16>,
    /// Send a PROXY protocol v2 header first on POP3, IMAP and SMTP connections.
    #[arg(long)]
    proxy_protocol: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Delivery {
    Lmtp,
    Smtp,
}

impl Delivery {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Lmtp => "lmtp",
            Self::Smtp => "smtp",
        }
    }
}

impl Definition {
    /// `<backend name address …/>` for `POST backends`, with only the values given.
    fn body(&self) -> String {
        let mut values: Vec<(&str, String)> = vec![
            ("name", self.name.clone()),
            ("address", self.address.clone()),
        ];
        let text = |v: Option<u16>| v.map(|v| v.to_string());
        let optional = [
            ("capacity", self.capacity.map(|v| v.to_string())),
            ("pop3-port", text(self.pop3_port)),
            ("imap-port", text(self.imap_port)),
            ("lmtp-port", text(self.lmtp_port)),
            ("delivery", self.delivery.map(|d| d.as_str().to_owned())),
            ("smtp-port", text(self.smtp_port)),
            ("submission-port", text(self.submission_port)),
            (
                "proxy-protocol",
                self.proxy_protocol.then(|| "true".to_owned()),
            ),
        ];
        values.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
        let attributes: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Writer::document("backend", &attributes).finish()
    }
}

/// `<backend capacity="N"/>` for `PUT backends/NAME`.
fn capacity_body(capacity: u32) -> String {
    Writer::document("backend", &[("capacity", &capacity.to_string())]).finish()
}

impl Ctl {
    pub async fn backend(
        &self,
        out: &mut impl io::Write,
        command: BackendCommand,
    ) -> Result<(), CtlError> {
        let (name, state) = match command {
            BackendCommand::Ls => {
                let doc = self.fetch(Method::GET, "backends", None).await?;
                return self.human(|| render::backends(out, &doc));
            }
            BackendCommand::Add(definition) => {
                let body = definition.body();
                let doc = self.fetch(Method::POST, "backends", Some(body)).await?;
                return self.human(|| render::backend_added(out, &doc));
            }
            BackendCommand::Set { name, capacity } => {
                let path = format!("backends/{}", encode(&name));
                let body = capacity_body(capacity);
                let doc = self.fetch(Method::PUT, &path, Some(body)).await?;
                return self.human(|| render::backend_capacity(out, &doc));
            }
            BackendCommand::Empty { name } => return self.empty(out, &name).await,
            BackendCommand::Rm { name } => {
                self.call(Method::DELETE, &format!("backends/{}", encode(&name)), None)
                    .await?;
                return self.human(|| writeln!(out, "removed backend {name}"));
            }
            BackendCommand::Drain { name } => (name, "draining"),
            BackendCommand::Activate { name } => (name, "active"),
            BackendCommand::Down { name } => (name, "down"),
        };
        let body = Writer::document("backend", &[("state", state)]).finish();
        let path = format!("backends/{}", encode(&name));
        let doc = self.fetch(Method::PUT, &path, Some(body)).await?;
        self.human(|| render::backend_state(out, &doc))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::api::xml::NS;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: BackendCommand,
    }

    fn definition(args: &[&str]) -> Definition {
        let all = ["backend", "add"].iter().chain(args);
        match Cli::try_parse_from(all).expect("parses").command {
            BackendCommand::Add(definition) => definition,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn add_sends_only_the_values_given_escaped() {
        let body = definition(&["b&<\"9\">", "--address", "192.0.2.10"]).body();
        assert_eq!(
            body,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<backend xmlns=\"{NS}\" \
                 name=\"b&amp;&lt;&quot;9&quot;&gt;\" address=\"192.0.2.10\"></backend>\n"
            )
        );
        let body = definition(&[
            "b9",
            "--address",
            "2001:db8::9",
            "--capacity",
            "50",
            "--pop3-port",
            "1110",
            "--imap-port",
            "1143",
            "--lmtp-port",
            "1024",
            "--delivery",
            "smtp",
            "--smtp-port",
            "2525",
            "--submission-port",
            "1587",
            "--proxy-protocol",
        ])
        .body();
        assert!(
            body.contains(
                " name=\"b9\" address=\"2001:db8::9\" capacity=\"50\" pop3-port=\"1110\" \
                 imap-port=\"1143\" lmtp-port=\"1024\" delivery=\"smtp\" smtp-port=\"2525\" \
                 submission-port=\"1587\" proxy-protocol=\"true\"></backend>"
            ),
            "{body}"
        );
    }

    #[test]
    fn set_sends_the_capacity_alone() {
        assert!(capacity_body(7).ends_with(&format!(
            "<backend xmlns=\"{NS}\" capacity=\"7\"></backend>\n"
        )));
        let error = Cli::try_parse_from(["backend", "add", "b9"]).expect_err("no --address");
        assert!(error.to_string().contains("--address"), "{error}");
    }
}
