//! Submission (RFC 6409) for relay clients: AUTH PLAIN/LOGIN (RFC 4954, RFC 4616) only
//! over TLS, checked by the user's own backend. The edge holds no password database: the
//! login is looked up in the directory, the owner's `submission_port` is greeted (with
//! XCLIENT when offered, so its logs name the client) and the credentials are handed to
//! its `AUTH PLAIN`; its answer is the answer. The authenticated session stays open for
//! the user's transactions (MAIL, RCPT and DATA are forwarded; any recipient domain is
//! allowed for an authenticated user) and is re-opened with the same credentials when the
//! backend closed it in between (e.g. its idle timeout).

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Phase, ReadEnd, Scanned, Session, Step, log_scan, refused_data, send_spooled};
use crate::{
    backend::Service,
    config::Protocol,
    directory::Route,
    secret::Secret,
    smtp::{
        codec::{DataVerdict, ForwardPath, InitialResponse, Reply, SaslResponse, reply},
        deliver::{self, BackendSession, DeliverError},
        limits::Limit,
        transaction::{Transaction, backend_lost, needs_smtputf8, no_smtputf8_downstream},
    },
};

/// An authenticated user and the backend session that carries their mail.
pub(super) struct Account {
    pub user: String,
    /// The normalized account name limits and suspensions are kept under.
    pub key: String,
    password: Secret<String>,
    pub home: String,
    /// `None` after the backend closed or was abandoned mid-message; re-opened on demand.
    pub backend: Option<BackendSession>,
}

/// Why an AUTH exchange ended without credentials.
enum Abort {
    Reply(Vec<u8>),
    Read(ReadEnd),
}

impl From<ReadEnd> for Abort {
    fn from(end: ReadEnd) -> Self {
        Self::Read(end)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// AUTH: the checks of RFC 4954 §4, the SASL exchange, then the backend's verdict.
    pub(super) async fn auth(&mut self, mechanism: &str, initial: Option<InitialResponse>) -> Step {
        if !self.submission() {
            return self.error(502, "5.5.1", "Command not implemented").await;
        }
        if matches!(self.phase, Phase::Connected) {
            return self.error(503, "5.5.1", "Send EHLO first").await;
        }
        if self.account.is_some() {
            return self.error(503, "5.5.1", "Already authenticated").await;
        }
        if matches!(self.phase, Phase::Mail(_)) {
            return self
                .error(503, "5.5.1", "Mail transaction in progress")
                .await;
        }
        if !self.client.stream.is_tls() {
            let text = "Encryption required for requested authentication mechanism; use STARTTLS";
            return self.error(538, "5.7.11", text).await;
        }
        let credentials = match mechanism {
            "PLAIN" => self.sasl_plain(initial).await,
            "LOGIN" => self.sasl_login(initial).await,
            _ => Err(Abort::Reply(reply(
                504,
                Some("5.5.4"),
                "Unrecognized authentication type; use PLAIN or LOGIN",
            ))),
        };
        match credentials {
            Ok((user, password)) => self.verify(user, password).await,
            Err(Abort::Reply(answer)) => self.answer(&answer).await,
            Err(Abort::Read(end)) => Step::End(self.close(end).await),
        }
    }

    async fn sasl_plain(
        &mut self,
        initial: Option<InitialResponse>,
    ) -> Result<(String, Secret<String>), Abort> {
        let payload = match initial {
            Some(InitialResponse::Base64(payload)) => payload,
            Some(InitialResponse::Empty) | None => self.sasl_response("").await?,
        };
        let credentials = crate::imap::codec::parse_plain(payload.expose())
            .map_err(|_| Abort::Reply(malformed()))?;
        if credentials
            .authzid
            .as_ref()
            .is_some_and(|z| z != &credentials.authcid)
        {
            return Err(Abort::Reply(reply(
                535,
                Some("5.7.8"),
                "Authorization identities are not supported",
            )));
        }
        Ok((credentials.authcid, credentials.password))
    }

    async fn sasl_login(
        &mut self,
        initial: Option<InitialResponse>,
    ) -> Result<(String, Secret<String>), Abort> {
        let user = match initial {
            Some(InitialResponse::Base64(payload)) => payload,
            Some(InitialResponse::Empty) | None => self.sasl_response("VXNlcm5hbWU6").await?,
        };
        let user =
            crate::base64::decode_text(user.expose()).ok_or_else(|| Abort::Reply(malformed()))?;
        let password = self.sasl_response("UGFzc3dvcmQ6").await?;
        let password = crate::base64::decode_text(password.expose())
            .ok_or_else(|| Abort::Reply(malformed()))?;
        Ok((user, Secret::new(password)))
    }

    /// Sends `334 prompt` and reads the client's base64 answer (`*` cancels).
    async fn sasl_response(&mut self, prompt: &str) -> Result<Secret<String>, Abort> {
        if !self.client.send(&reply(334, None, prompt)).await {
            return Err(Abort::Read(ReadEnd::Closed));
        }
        match self.client.next_sasl_line().await? {
            Ok(SaslResponse::Base64(payload)) => Ok(payload),
            Ok(SaslResponse::Cancel) => Err(Abort::Reply(reply(
                501,
                Some("5.7.0"),
                "Authentication cancelled",
            ))),
            Err(_) => Err(Abort::Reply(malformed())),
        }
    }

    /// Routes the login and lets the owner's submission service judge the credentials.
    async fn verify(&mut self, user: String, password: Secret<String>) -> Step {
        let started = Instant::now();
        let route = match self.ctx.directory.route_login(&user).await {
            Ok(Ok(route)) => route,
            Ok(Err(_)) => {
                return self
                    .auth_failed(&user, None, "unknown_mailbox", started)
                    .await;
            }
            Err(error) => {
                tracing::error!(%error, "directory lookup failed");
                return self
                    .auth_unavailable(&user, None, "directory_error", started)
                    .await;
            }
        };
        let (home, candidate) = match route {
            Route::Owner { backend, .. } => (backend, None),
            Route::Candidate { mailbox, backend } => (backend, Some(mailbox)),
            Route::UnknownMailbox(_) | Route::ForeignDomain(_) => {
                return self
                    .auth_failed(&user, None, "unknown_mailbox", started)
                    .await;
            }
        };
        let account = crate::proxy::account_key(self.ctx, &user);
        let ip = self.conn.peer.ip();
        if !self.ctx.reputation.login_allowed(&account, ip) {
            return self
                .auth_failed(&user, Some(&home), "account_locked", started)
                .await;
        }
        let answer = self.open_backend(&home, &user, &password).await;
        match answer {
            Ok(Ok(backend)) => {
                if let Some(mailbox) = candidate {
                    match self.ctx.directory.confirm(&mailbox.mailbox, &home).await {
                        Ok(true) => {
                            tracing::info!(mailbox = %mailbox.mailbox, backend = %home, "mailbox provisioned on first login");
                        }
                        Ok(false) | Err(_) => {
                            let result = "directory_error";
                            return self
                                .auth_unavailable(&user, Some(&home), result, started)
                                .await;
                        }
                    }
                }
                self.record_login(&home, "ok", started);
                self.ctx.reputation.login_succeeded(&account, ip);
                tracing::info!(peer = %self.conn.peer, %user, backend = %home, "submission login");
                // Logged in: the session may now idle like a proxied one.
                self.client.timeout = self.ctx.limits().idle_timeout();
                self.account = Some(Account {
                    key: account.clone(),
                    user,
                    password,
                    home,
                    backend: Some(backend),
                });
                self.answer(&reply(235, Some("2.7.0"), "Authentication successful"))
                    .await
            }
            Ok(Err(refusal)) if refusal.is_permanent() => {
                self.auth_failed(&user, Some(&home), "refused", started)
                    .await
            }
            Ok(Err(_)) => {
                let result = "backend_error";
                self.auth_unavailable(&user, Some(&home), result, started)
                    .await
            }
            Err(error) => {
                tracing::warn!(%error, "submission backend unavailable");
                // A backend that answered but cannot authenticate is misconfigured, not down.
                let result = match error {
                    DeliverError::Refused { .. } => "backend_error",
                    _ => "backend_unavailable",
                };
                self.auth_unavailable(&user, Some(&home), result, started)
                    .await
            }
        }
    }

    /// Opens `home`'s submission service and authenticates there; the inner `Err` is the
    /// backend's refusal of the credentials.
    async fn open_backend(
        &self,
        home: &str,
        user: &str,
        password: &Secret<String>,
    ) -> Result<Result<BackendSession, Reply>, DeliverError> {
        let info = self.client_info.clone();
        let mut backend =
            BackendSession::open(self.ctx, self.conn, home, Service::Submission, &info).await?;
        if !backend.offers("AUTH") {
            // A configuration problem, not the user's: e.g. Postfix with
            // smtpd_tls_auth_only = yes offers AUTH only over TLS, and the edge talks
            // plaintext to its backends.
            backend.quit().await;
            tracing::error!(
                backend = %home,
                "the backend's submission_port offers no AUTH to the edge: enable SASL there \
                 for plaintext connections from the edge (Postfix: smtpd_sasl_auth_enable = yes, \
                 smtpd_tls_auth_only = no on that port)"
            );
            return Err(DeliverError::Refused {
                backend: home.to_owned(),
                step: "AUTH (not offered)",
                code: 0,
            });
        }
        let answer = backend.authenticate(user, password.expose()).await?;
        if answer.code == 235 {
            Ok(Ok(backend))
        } else {
            backend.quit().await;
            Ok(Err(answer))
        }
    }

    async fn auth_failed(
        &mut self,
        user: &str,
        home: Option<&str>,
        result: &str,
        started: Instant,
    ) -> Step {
        self.record_login(home.unwrap_or("none"), result, started);
        tracing::info!(peer = %self.conn.peer, %user, result, "submission login failed");
        self.auth_failures += 1;
        self.offences += 1;
        let account = crate::proxy::account_key(self.ctx, user);
        let reputation = &self.ctx.reputation;
        let verdict = reputation.login_failed(Some(&account), self.conn.peer.ip());
        tokio::time::sleep(reputation.auth_failure_delay(self.auth_failures)).await;
        if let Some(end) = self.apply(verdict).await {
            return end;
        }
        if result == "account_locked" {
            return self
                .answer(&reply(
                    454,
                    Some("4.7.0"),
                    "Too many failed logins for this account; try again later",
                ))
                .await;
        }
        if self.auth_failures >= self.ctx.limits().max_auth_failures {
            let bye = reply(421, Some("4.7.0"), "Too many failed logins; closing");
            self.client.send(&bye).await;
            return Step::End(crate::proxy::Outcome::AuthFailed);
        }
        self.answer(&reply(
            535,
            Some("5.7.8"),
            "Authentication credentials invalid",
        ))
        .await
    }

    async fn auth_unavailable(
        &mut self,
        user: &str,
        home: Option<&str>,
        result: &str,
        started: Instant,
    ) -> Step {
        self.record_login(home.unwrap_or("none"), result, started);
        tracing::warn!(peer = %self.conn.peer, %user, "submission login: mailbox server unavailable");
        self.answer(&reply(
            454,
            Some("4.7.0"),
            "Temporary authentication failure; try again later",
        ))
        .await
    }

    fn record_login(&self, backend: &str, result: &str, started: Instant) {
        self.ctx.metrics.login(
            Protocol::Submission,
            backend,
            result,
            started.elapsed().as_secs_f64(),
        );
    }

    /// The account's backend session, re-opened with the stored credentials when it was
    /// closed; `None` (the account is dropped) when that fails.
    pub(super) async fn account_backend(&mut self) -> Result<(), Vec<u8>> {
        let Some(account) = self.account.as_ref() else {
            return Err(reply(530, Some("5.7.0"), "Authentication required"));
        };
        if account.backend.is_some() {
            return Ok(());
        }
        let (home, user) = (account.home.clone(), account.user.clone());
        let password = Secret::new(account.password.expose().clone());
        match self.open_backend(&home, &user, &password).await {
            Ok(Ok(backend)) => {
                if let Some(account) = self.account.as_mut() {
                    account.backend = Some(backend);
                }
                Ok(())
            }
            Ok(Err(refusal)) => {
                tracing::warn!(%user, backend = %home, code = refusal.code, "submission backend refused the stored credentials");
                self.account = None;
                Err(reply(530, Some("5.7.0"), "Authentication required"))
            }
            Err(error) => {
                tracing::warn!(%error, "submission backend unavailable");
                Err(reply(
                    451,
                    Some("4.4.1"),
                    "Mailbox server unavailable; try again later",
                ))
            }
        }
    }

    /// The logged-in user's account key, or the `550 5.7.1` of its suspension.
    fn sender(&mut self) -> Result<String, Vec<u8>> {
        let user = self
            .account
            .as_ref()
            .map_or_else(String::new, |a| a.key.clone());
        match self.suspended(&user) {
            Some(refusal) => Err(refusal),
            None => Ok(user),
        }
    }

    /// `550 5.7.1` while the account is suspended from sending.
    pub(super) fn suspended(&mut self, user: &str) -> Option<Vec<u8>> {
        let suspension = self
            .ctx
            .submission_limits
            .suspension(user, Instant::now())?;
        self.offences += 1;
        let _ = self.ctx.reputation.report(
            self.conn.peer.ip(),
            crate::filter::reputation::Event::RateExceeded,
        );
        Some(reply(
            550,
            Some("5.7.1"),
            &format!(
                "Your account is suspended from sending mail ({}); contact your provider",
                suspension.reason.explain()
            ),
        ))
    }

    /// A per-user limit was reached: `451 4.7.1`, and an event for the reputation engine.
    pub(super) fn limited(&mut self, limit: Limit) -> Vec<u8> {
        self.offences += 1;
        let verdict = self.ctx.reputation.report(
            self.conn.peer.ip(),
            crate::filter::reputation::Event::RateExceeded,
        );
        self.tarpit |= verdict == crate::filter::reputation::Verdict::Tarpit;
        let user = self.account.as_ref().map_or("", |a| a.key.as_str());
        if self
            .ctx
            .submission_limits
            .suspension(user, Instant::now())
            .is_some()
        {
            // This refusal was one too many: suspended (`limit_hits`).
            self.ctx.submission_limits.save_later(user);
        }
        tracing::warn!(
            target: "protobalance::events",
            event = "submission_limit",
            limit = limit.as_str(),
            %user,
            peer = %self.conn.peer,
            "submission limit reached"
        );
        reply(
            451,
            Some("4.7.1"),
            &format!(
                "Sending limit reached ({}); try again later",
                limit.as_str()
            ),
        )
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    /// MAIL FROM on the user's backend; the backend's answer is relayed. A backend that
    /// closed since the last message is re-opened once.
    pub(super) async fn submit_mail(&mut self, tx: Transaction) -> Vec<u8> {
        let user = match self.sender() {
            Ok(user) => user,
            Err(refusal) => return refusal,
        };
        if let Err(limit) = self.ctx.submission_limits.may_send(&user, Instant::now()) {
            return self.limited(limit);
        }
        for attempt in 0..2 {
            if let Err(answer) = self.account_backend().await {
                return answer;
            }
            let Some(backend) = self.account.as_mut().and_then(|a| a.backend.as_mut()) else {
                return backend_lost();
            };
            if tx.envelope().smtputf8 && !backend.offers("SMTPUTF8") {
                return deliver::relay(&no_smtputf8_downstream());
            }
            match backend.mail(tx.envelope()).await {
                Ok(answer) if answer.is_positive() => {
                    self.phase = Phase::Mail(Box::new(tx.on_account()));
                    return reply(250, Some("2.1.0"), "OK");
                }
                Ok(refusal) => return deliver::relay(&refusal),
                Err(error) => {
                    tracing::debug!(%error, attempt, "submission backend lost at MAIL");
                    if let Some(account) = self.account.as_mut() {
                        account.backend = None;
                    }
                }
            }
        }
        backend_lost()
    }

    /// RCPT on the user's backend (any domain: the user is authenticated), within the
    /// per-message and hourly recipient limits.
    pub(super) async fn submit_rcpt(&mut self, to: &ForwardPath, no_params: bool) -> Vec<u8> {
        let Phase::Mail(tx) = &mut self.phase else {
            return reply(503, Some("5.5.1"), "Send MAIL first");
        };
        if !no_params {
            return reply(555, Some("5.5.4"), "Unsupported RCPT parameter");
        }
        let address = match to {
            ForwardPath::Path(path) if !path.is_ascii() && !tx.envelope().smtputf8 => {
                return needs_smtputf8();
            }
            ForwardPath::Path(path) if path.quoted_local => {
                let local = path.local.replace('\\', "\\\\").replace('"', "\\\"");
                format!("\"{local}\"@{}", path.domain)
            }
            ForwardPath::Path(path) => format!("{}@{}", path.local, path.domain),
            ForwardPath::Postmaster => "postmaster".to_owned(),
        };
        let pending = tx.accepted();
        let user = match self.sender() {
            Ok(user) => user,
            Err(refusal) => return refusal,
        };
        let check = self
            .ctx
            .submission_limits
            .may_add_recipient(&user, pending, Instant::now());
        if let Err(limit) = check {
            return self.limited(limit);
        }
        let Some(backend) = self.account.as_mut().and_then(|a| a.backend.as_mut()) else {
            return backend_lost();
        };
        let answer = backend.rcpt(&address).await;
        if let Ok(answer) = &answer {
            // Judged on the backend's verdict: a 4xx (greylisting, a full mailbox) is
            // no sign of spam, a 5xx (no such user, relay denied) may be.
            let refused = answer.code >= 500;
            let limits = &self.ctx.submission_limits;
            if limits
                .note_recipient(&user, &address, !refused, Instant::now())
                .is_some()
            {
                limits.save_later(&user);
                self.reset_backend().await;
                self.phase = Phase::Idle;
                return self.suspended(&user).unwrap_or_else(backend_lost);
            }
        }
        match answer {
            Ok(answer) if answer.is_positive() => {
                if let Phase::Mail(tx) = &mut self.phase {
                    tx.count_accepted();
                }
                reply(250, Some("2.1.5"), "OK")
            }
            Ok(refusal) => deliver::relay(&refusal),
            Err(error) => {
                tracing::warn!(%error, "submission backend lost during RCPT");
                if let Some(account) = self.account.as_mut() {
                    account.backend = None;
                }
                self.phase = Phase::Idle;
                backend_lost()
            }
        }
    }

    /// DATA on the user's backend: streamed like inbound mail; the backend's one reply
    /// decides, and an accepted message is charged to the user's hourly allowance.
    pub(super) async fn submit_data(&mut self, accepted: usize, sender: String) -> Step {
        if accepted == 0 {
            self.reset_backend().await;
            return self
                .answer(&reply(503, Some("5.5.1"), "No valid recipients"))
                .await;
        }
        let Some(account) = self.account.as_mut() else {
            return self
                .answer(&reply(530, Some("5.7.0"), "Authentication required"))
                .await;
        };
        let user = account.key.clone();
        if let Some(refusal) = self.suspended(&user) {
            self.reset_backend().await;
            return self.answer(&refusal).await;
        }
        let Some(account) = self.account.as_mut() else {
            return self.answer(&backend_lost()).await;
        };
        let mut slot = account.backend.take();
        if let Some(scanner) = self.ctx.scanner.clone() {
            let Some(backend) = slot else {
                return self.answer(&backend_lost()).await;
            };
            return self
                .submit_scanned(&scanner, backend, user, sender, accepted)
                .await;
        }
        let started = match slot.as_mut() {
            Some(backend) => backend.start_data().await,
            None => return self.answer(&backend_lost()).await,
        };
        if let Err(error) = started {
            tracing::warn!(%error, "submission backend DATA failed");
            return self.answer(&backend_lost()).await;
        }
        let go_on = reply(354, None, "End data with <CR><LF>.<CR><LF>");
        if !self.client.send(&go_on).await {
            return Step::End(self.finished());
        }
        let verdict = match self.stream_data(&mut slot).await {
            Ok(verdict) => verdict,
            Err(end) => return Step::End(self.close(end).await),
        };
        let (DataVerdict::Ok { .. }, Some(backend)) = (&verdict, slot) else {
            // Refused or lost: the backend connection was dropped mid-message (it discards
            // it); the next MAIL opens a fresh one.
            return self.answer(&refused_data(&verdict)).await;
        };
        self.end_submission(backend, &user, accepted).await
    }

    /// Submission with content scanning (`[scan]`, the default policy: the recipients are
    /// elsewhere). Malware suspends the account from sending (`suspend_seconds`, reason
    /// `malware`): a relay client that sends it is infected.
    async fn submit_scanned(
        &mut self,
        scanner: &crate::scan::Scanner,
        mut backend: crate::smtp::deliver::BackendSession,
        user: String,
        sender: String,
        accepted: usize,
    ) -> Step {
        use crate::scan::{Decision, Offence};
        let envelope = self.scan_envelope(sender, &backend, Some(user.clone()));
        // On every early way out the backend is dropped mid-transaction (it discards the
        // message); the next MAIL opens a fresh one.
        let (mut spool, outcome) =
            match self.receive_scanned(scanner, &envelope, &mut backend).await {
                Scanned::Message(held) => *held,
                Scanned::Refused(verdict) => return self.answer(&refused_data(&verdict)).await,
                Scanned::Failed(answer) => return self.answer(&answer).await,
                Scanned::Ended(step) => return step,
            };
        // The recipients are elsewhere: the default policy.
        let decision = scanner.decide(&outcome, std::iter::empty());
        log_scan(&envelope, &spool, &outcome, &decision);
        let refusal = match decision {
            Decision::Deliver { headers } => {
                if let Err(error) = send_spooled(&mut backend, &headers, &mut spool).await {
                    tracing::warn!(%error, "submission backend lost while sending a scanned message");
                    return self.answer(&backend_lost()).await;
                }
                return self.end_submission(backend, &user, accepted).await;
            }
            Decision::Refuse { reply, event } => {
                match event {
                    Some(Offence::Malware) => {
                        self.ctx.submission_limits.suspend_by_rule(
                            &user,
                            crate::smtp::limits::SuspendReason::Malware,
                            Instant::now(),
                        );
                        tracing::warn!(
                            %user, client = %self.conn.peer.ip(),
                            "account suspended from sending: it submitted malware"
                        );
                    }
                    // Not held against the address: many users may share it (NAT); the
                    // account's own limits deal with a spamming user.
                    Some(Offence::Spam) | None => {}
                }
                self.offences += 1;
                reply
            }
            Decision::Defer { reply } => reply,
        };
        // The backend transaction is abandoned; its session stays for the next MAIL.
        if backend.reset().await.is_ok()
            && let Some(account) = self.account.as_mut()
        {
            account.backend = Some(backend);
        }
        self.answer(&refusal).await
    }

    /// The end of a submitted message's DATA at the user's backend, and the answer.
    async fn end_submission(
        &mut self,
        mut backend: crate::smtp::deliver::BackendSession,
        user: &str,
        accepted: usize,
    ) -> Step {
        let answer = match backend.end_data().await {
            Ok(replies) => {
                let home = self.account.as_ref().map_or("", |a| a.home.as_str());
                match replies.first().map(|(_, r)| r) {
                    Some(r) if r.is_positive() => {
                        self.ctx
                            .submission_limits
                            .record(user, accepted, Instant::now());
                        self.delivered += 1;
                        tracing::info!(%user, backend = %home, recipients = accepted, "message submitted");
                        reply(250, Some("2.0.0"), "Message accepted for delivery")
                    }
                    Some(refusal) => deliver::relay(refusal),
                    None => backend_lost(),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "submission backend lost at the end of DATA");
                return self.answer(&backend_lost()).await;
            }
        };
        if let Some(account) = self.account.as_mut() {
            account.backend = Some(backend);
        }
        self.answer(&answer).await
    }
}

fn malformed() -> Vec<u8> {
    reply(501, Some("5.5.2"), "Invalid AUTH response")
}
