//! One inbound SMTP transaction (RFC 5321 §3.3), from MAIL FROM to the end of DATA: the
//! checks on MAIL (RFC 1870 SIZE, RFC 6152 BODY) and the routing of each RCPT.
//!
//! Routing rule: the first accepted recipient binds the transaction to its owner's
//! delivery service (LMTP or SMTP); a recipient owned by any other backend gets `452 4.5.3` (RFC 5321
//! §4.5.3.1.10), so the sender delivers it in a new transaction — nothing is spooled at
//! the edge and a mailbox is never delivered to a backend that does not own it. The edge
//! is no relay: foreign domains, address literals, source routes (`<@a:x@ext>`), quoted
//! local parts (`"x@ext"@ours`) and `%`/`!` routing (refused by the directory's
//! normalizer) all get `554 5.7.1`.

use super::codec::Reply;
use super::{
    codec::{Body, ForwardPath, MailParameters, ReversePath, reply},
    deliver::{self, BackendSession, ClientInfo, DeliverError, Envelope},
};
use crate::{
    directory::{AddressError, Route},
    proxy::{Conn, ProxyContext},
};

/// Accepted recipients per transaction; more get `452 4.5.3` (RFC 5321 §4.5.3.1.10).
const MAX_RECIPIENTS: usize = 100;

pub struct Transaction {
    envelope: Envelope,
    client: ClientInfo,
    binding: Binding,
}

/// The backend a transaction is bound to.
pub enum Binding {
    /// No recipient accepted yet.
    Unbound,
    /// Bound by its first accepted recipient; holds the open backend transaction.
    Bound(Box<BackendSession>),
    /// Recipients were accepted, then the backend connection failed: DATA gets `451`.
    Lost,
    /// Submission: the transaction runs on the authenticated user's backend session;
    /// `accepted` recipients so far.
    Account { accepted: usize },
}

impl Transaction {
    /// Checks MAIL FROM; `Err` is the refusal to send.
    pub fn begin(
        from: &ReversePath,
        params: &MailParameters,
        max_size: u64,
        client: ClientInfo,
    ) -> Result<Self, Vec<u8>> {
        if params.size.is_some_and(|size| size > max_size) {
            return Err(reply(
                552,
                Some("5.3.4"),
                "Message size exceeds fixed limit",
            ));
        }
        // Only what the EHLO reply offers; AUTH= is ignored (RFC 4954 §5).
        let unsupported = params.body == Some(Body::BinaryMime) || !params.other.is_empty();
        if unsupported {
            return Err(reply(555, Some("5.5.4"), "Unsupported MAIL parameter"));
        }
        let path = match from {
            ReversePath::Null => "",
            ReversePath::Path(path) if path.is_ascii() || params.smtputf8 => path.raw(),
            ReversePath::Path(_) => return Err(needs_smtputf8()),
        };
        let envelope = Envelope {
            reverse_path: format!("<{path}>"),
            eight_bit: params.body == Some(Body::EightBitMime),
            size: params.size,
            smtputf8: params.smtputf8,
        };
        Ok(Self {
            envelope,
            client,
            binding: Binding::Unbound,
        })
    }

    /// The sender side, for the backend's MAIL FROM.
    pub const fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Submission: the transaction runs on the user's own backend session.
    pub fn on_account(mut self) -> Self {
        self.binding = Binding::Account { accepted: 0 };
        self
    }

    /// Submission: one more recipient accepted by the backend.
    pub fn count_accepted(&mut self) {
        if let Binding::Account { accepted } = &mut self.binding {
            *accepted += 1;
        }
    }

    /// The sender as given in MAIL FROM, without the angle brackets (empty for a bounce).
    pub fn sender(&self) -> &str {
        let path = self.envelope.reverse_path.as_str();
        path.strip_prefix('<')
            .and_then(|p| p.strip_suffix('>'))
            .unwrap_or(path)
    }

    /// Ends the transaction, handing over its backend for DATA.
    pub fn into_binding(self) -> Binding {
        self.binding
    }

    /// Routes one RCPT and answers it.
    pub async fn rcpt(
        &mut self,
        ctx: &ProxyContext,
        conn: &Conn,
        to: &ForwardPath,
        no_params: bool,
    ) -> Vec<u8> {
        let mut answers = self.rcpt_batch(ctx, conn, &[(to, no_params)]).await;
        answers.pop().unwrap_or_else(backend_lost)
    }

    /// Routes RCPTs the client pipelined (RFC 2920) and answers each, in order. Those for
    /// the backend the transaction is bound to go to it together when it offers
    /// PIPELINING: one round trip for the lot instead of one each.
    pub async fn rcpt_batch(
        &mut self,
        ctx: &ProxyContext,
        conn: &Conn,
        items: &[(&ForwardPath, bool)],
    ) -> Vec<Vec<u8>> {
        let mut answers: Vec<Option<Vec<u8>>> = vec![None; items.len()];
        // (index, mailbox) waiting for the bound backend.
        let mut pending: Vec<(usize, String)> = Vec::new();
        for (i, (to, no_params)) in items.iter().enumerate() {
            let (mailbox, backend) = match self.plan(ctx, to, *no_params, pending.len()).await {
                Plan::Answer(answer) => {
                    answers[i] = Some(answer);
                    continue;
                }
                Plan::Offer { mailbox, backend } => (mailbox, backend),
            };
            match &self.binding {
                Binding::Bound(session) if session.backend() == backend => {
                    let duplicate = session.has_accepted(&mailbox)
                        || pending.iter().any(|(_, m)| *m == mailbox);
                    if duplicate {
                        answers[i] = Some(duplicate_recipient());
                    } else {
                        pending.push((i, mailbox));
                    }
                }
                _ => answers[i] = Some(self.offer(ctx, conn, &mailbox, &backend).await),
            }
        }
        if !pending.is_empty() {
            self.offer_many(&pending, &mut answers).await;
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(backend_lost))
            .collect()
    }

    /// What to do with one RCPT: answer it at once, or offer the mailbox to its owner.
    /// `pending` recipients are already on their way to the bound backend.
    async fn plan(
        &self,
        ctx: &ProxyContext,
        to: &ForwardPath,
        no_params: bool,
        pending: usize,
    ) -> Plan {
        if !no_params {
            // NOTIFY/ORCPT (RFC 3461) need DSN, which is not offered.
            return Plan::Answer(reply(555, Some("5.5.4"), "Unsupported RCPT parameter"));
        }
        let address = match to {
            ForwardPath::Path(path) if !path.is_ascii() && !self.envelope.smtputf8 => {
                return Plan::Answer(needs_smtputf8());
            }
            ForwardPath::Path(path)
                if !path.source_route && !path.quoted_local && !path.domain.starts_with('[') =>
            {
                format!("{}@{}", path.local, path.domain)
            }
            ForwardPath::Path(_) => return Plan::Answer(relay_denied()),
            // RFC 5321 §4.5.1: `<Postmaster>` without a domain must be accepted.
            ForwardPath::Postmaster => match &ctx.postmaster {
                Some(address) => address.clone(),
                None => {
                    let text = "No postmaster mailbox configured";
                    return Plan::Answer(reply(550, Some("5.1.1"), text));
                }
            },
        };
        if self.accepted() + pending >= MAX_RECIPIENTS {
            return Plan::Answer(too_many_recipients());
        }
        let answer = match ctx.directory.route(&address).await {
            Ok(Ok(Route::Owner { mailbox, backend })) => {
                return Plan::Offer {
                    mailbox: mailbox.mailbox.to_string(),
                    backend,
                };
            }
            Ok(Ok(Route::UnknownMailbox(_))) => reply(550, Some("5.1.1"), "No such mailbox"),
            Ok(Ok(Route::ForeignDomain(_))) => relay_denied(),
            // `route` assigns; a candidate is only ever a login's answer.
            Ok(Ok(Route::Candidate { .. })) => reply(451, Some("4.3.0"), "Try again later"),
            Ok(Err(AddressError::BadLocal(_) | AddressError::BadDomain(_))) => relay_denied(),
            Ok(Err(_)) => reply(501, Some("5.1.3"), "Bad recipient address syntax"),
            Err(error) => {
                tracing::error!(%error, "directory lookup failed");
                reply(451, Some("4.3.0"), "Directory unavailable; try again later")
            }
        };
        Plan::Answer(answer)
    }

    /// Offers `pending` mailboxes to the bound backend at once and fills their answers.
    async fn offer_many(&mut self, pending: &[(usize, String)], answers: &mut [Option<Vec<u8>>]) {
        let Binding::Bound(session) = &mut self.binding else {
            return;
        };
        let mailboxes: Vec<&str> = pending.iter().map(|(_, m)| m.as_str()).collect();
        let result = session.rcpt_many(&mailboxes).await;
        let accepted = session.accepted();
        match result {
            Ok(replies) => {
                for ((i, _), answer) in pending.iter().zip(replies) {
                    answers[*i] = Some(if answer.is_positive() {
                        reply(250, Some("2.1.5"), "OK")
                    } else {
                        deliver::relay(&answer)
                    });
                }
                if accepted == 0 {
                    self.binding = Binding::Unbound;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "backend lost during RCPT");
                for (i, _) in pending {
                    answers[*i] = Some(owner_unavailable());
                }
                self.binding = match accepted {
                    0 => Binding::Unbound,
                    _ => Binding::Lost,
                };
            }
        }
    }

    pub fn accepted(&self) -> usize {
        match &self.binding {
            Binding::Bound(backend) => backend.accepted(),
            Binding::Account { accepted } => *accepted,
            Binding::Unbound | Binding::Lost => 0,
        }
    }

    /// Offers `mailbox` to its owner `backend`, binding the transaction on first
    /// acceptance; the backend's own refusal is relayed.
    async fn offer(
        &mut self,
        ctx: &ProxyContext,
        conn: &Conn,
        mailbox: &str,
        backend: &str,
    ) -> Vec<u8> {
        if let Binding::Unbound = self.binding {
            return self.open_with(ctx, conn, backend, mailbox).await;
        }
        let session = match &mut self.binding {
            Binding::Bound(session) if session.backend() == backend => session,
            Binding::Bound(_) => return too_many_recipients(),
            Binding::Unbound | Binding::Lost | Binding::Account { .. } => return backend_lost(),
        };
        if session.has_accepted(mailbox) {
            return duplicate_recipient();
        }
        let answer = session.rcpt(mailbox).await;
        let accepted = session.accepted();
        match answer {
            Ok(answer) if answer.is_positive() => reply(250, Some("2.1.5"), "OK"),
            Ok(refusal) => {
                if accepted == 0 {
                    self.binding = Binding::Unbound;
                }
                deliver::relay(&refusal)
            }
            Err(error) => {
                tracing::warn!(%error, "backend lost during RCPT");
                self.binding = match accepted {
                    0 => Binding::Unbound,
                    _ => Binding::Lost,
                };
                owner_unavailable()
            }
        }
    }
}

impl Transaction {
    /// Opens the owner's delivery service and starts the transaction there with MAIL FROM
    /// and the first recipient (pipelined when offered); binds the transaction when the
    /// backend takes the recipient. The backend's refusals are relayed to the client.
    async fn open_with(
        &mut self,
        ctx: &ProxyContext,
        conn: &Conn,
        backend: &str,
        mailbox: &str,
    ) -> Vec<u8> {
        let Some(service) = ctx.pool.delivery_service(backend) else {
            tracing::warn!(%backend, "owner is not in the backend pool");
            return owner_unavailable();
        };
        // A pooled session found gone at its first command is dropped for the next one
        // (the pool is finite, and a fresh connection is never stale).
        let (mut session, begun) = loop {
            let opened = BackendSession::open(ctx, conn, backend, service, &self.client).await;
            let mut session = match opened {
                Ok(session) => session,
                Err(error) => {
                    tracing::warn!(%error, "owner unavailable for a recipient");
                    return owner_unavailable();
                }
            };
            if self.envelope.smtputf8 && !session.offers("SMTPUTF8") {
                session.quit().await;
                return deliver::relay(&no_smtputf8_downstream());
            }
            match session.mail_and_rcpt(&self.envelope, mailbox).await {
                Err(DeliverError::Stale(_)) => {
                    tracing::debug!(%backend, "pooled backend session was stale");
                    ctx.sessions.count(backend, "stale");
                }
                begun => break (session, begun),
            }
        };
        match begun {
            Ok((_, Some(rcpt))) if rcpt.is_positive() => {
                self.binding = Binding::Bound(Box::new(session));
                reply(250, Some("2.1.5"), "OK")
            }
            Ok((_, Some(refusal))) => {
                session.quit().await;
                deliver::relay(&refusal)
            }
            Ok((mail, None)) => {
                tracing::warn!(%backend, code = mail.code, "backend refused MAIL FROM");
                session.quit().await;
                deliver::relay(&mail)
            }
            Err(error) => {
                tracing::warn!(%error, "owner unavailable for a recipient");
                owner_unavailable()
            }
        }
    }
}

/// A non-ASCII address in a transaction without `SMTPUTF8` (RFC 6531 §3.4).
pub fn needs_smtputf8() -> Vec<u8> {
    reply(
        553,
        Some("5.6.7"),
        "Non-ASCII address needs MAIL FROM ... SMTPUTF8",
    )
}

/// The owner cannot take an SMTPUTF8 message (RFC 6531 §3.2: no downgrade here).
pub fn no_smtputf8_downstream() -> Reply {
    Reply {
        code: 553,
        enhanced: Some((5, 6, 7)),
        lines: vec!["Mailbox server does not support SMTPUTF8".into()],
    }
}

/// What [`Transaction::plan`] decided for one RCPT.
enum Plan {
    Answer(Vec<u8>),
    Offer { mailbox: String, backend: String },
}

/// A repeated recipient (after normalization: `User+tag@Example.com` twice, say) is
/// delivered once, as Postfix's queue manager would.
fn duplicate_recipient() -> Vec<u8> {
    reply(250, Some("2.1.5"), "OK (duplicate recipient)")
}

fn relay_denied() -> Vec<u8> {
    reply(554, Some("5.7.1"), "Relay access denied")
}

fn too_many_recipients() -> Vec<u8> {
    let text = "Too many recipients for this transaction; try again";
    reply(452, Some("4.5.3"), text)
}

fn owner_unavailable() -> Vec<u8> {
    reply(
        451,
        Some("4.4.1"),
        "Mailbox server unavailable; try again later",
    )
}

pub fn backend_lost() -> Vec<u8> {
    let text = "Connection to the mailbox server lost; try again later";
    reply(451, Some("4.4.2"), text)
}
