//! Content scanning in the SMTP path: rspamd (spam) and clamd (malware), in parallel with
//! the message transfer.
//!
//! While the client sends DATA, each chunk goes into a [`spool::Spool`] (memory up to
//! `scan.memory_bytes`, then an unlinked temp file) and, dot-stuffing undone, to both
//! scanners as a stream (rspamd's `/checkv2` with chunked transfer, clamd's `INSTREAM`).
//! At the end of data the verdicts are awaited (`scan.timeout_ms`), and only then does the
//! backend see the message: rejected or deferred mail never reaches it, and accepted mail
//! goes out with the scan headers in front (`X-Spam-*`, `X-Virus-Scanned`) — which is why
//! the edge holds the message rather than streaming it to the backend as it does without
//! scanning: headers cannot be put in front of a message the backend already has.
//!
//! Policy ([`Policy`], per recipient domain, the strictest of a transaction's domains):
//! malware is always refused (`550 5.7.1`); spam is refused (`550 5.7.1`) or only tagged
//! (`X-Spam-Flag: YES`); rspamd's `soft reject` defers (`451 4.7.1`); a scanner that fails
//! or answers too late either defers the message (`tempfail`, the default) or lets it
//! through tagged as unscanned (`accept`). Never a hang (every wait is bounded) and never a
//! silent loss (every outcome is an SMTP reply, a log line and a metric).

pub mod clamd;
pub mod rspamd;
pub mod spool;

use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::{sync::mpsc, task::JoinHandle};

pub use clamd::{ClamdAddr, ClamdVerdict};
pub use rspamd::{Envelope, RspamdVerdict};

/// What to do when a scanner fails or does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// `451 4.7.1`: the sender tries again later.
    Tempfail,
    /// Deliver, with `X-Scan-Warning` naming the scanner that did not answer.
    Accept,
}

/// What is done with spam.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpamAction {
    Reject,
    Tag,
}

/// The scan policy of a domain (or the default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Reject (or, with `spam = tag`, tag) at this rspamd score; `None`: when rspamd's own
    /// action is `reject`.
    pub reject_score: Option<f64>,
    /// Tag as spam at this score; `None`: when rspamd's action is `add header` or
    /// `rewrite subject`.
    pub tag_score: Option<f64>,
    pub spam: SpamAction,
    pub on_failure: FailureAction,
}

/// The scanners and the policy, from `[scan]`.
pub struct Scanner {
    pub settings: crate::config::ScanSettings,
    metrics: ScanMetrics,
}

#[derive(Clone)]
struct ScanMetrics {
    verdicts: IntCounterVec,
    seconds: HistogramVec,
    errors: IntCounterVec,
}

impl ScanMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let verdicts = IntCounterVec::new(
            Opts::new(
                "protobalance_scan_verdicts_total",
                "Scanned messages by outcome: accept, tag (spam, delivered tagged), reject \
                 (spam), malware, soft_reject (rspamd said try later), tempfail (a scanner \
                 failed, mail deferred), unscanned (a scanner failed, mail delivered tagged)",
            ),
            &["action"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "protobalance_scan_seconds",
                "Time from the end of the message to each scanner's verdict",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["scanner"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "protobalance_scan_errors_total",
                "Scanner failures (connect, protocol, timeout), by scanner",
            ),
            &["scanner"],
        )?;
        registry.register(Box::new(verdicts.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Self {
            verdicts,
            seconds,
            errors,
        })
    }
}

/// The scanners' verdicts on one message (`Err`: failed or too late; `None`: not configured).
#[derive(Debug)]
pub struct Outcome {
    pub rspamd: Option<Result<RspamdVerdict, String>>,
    pub clamd: Option<Result<ClamdVerdict, String>>,
    /// clamd saw only the first this many bytes (the message was bigger than its limit).
    pub clamd_partial: Option<u64>,
}

/// What happens to the message.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Deliver with these header lines (CRLF-terminated) in front.
    Deliver { headers: Vec<u8> },
    /// Refuse: the SMTP reply, and whether the client sent malware or spam (for reputation).
    Refuse {
        reply: Vec<u8>,
        event: Option<Offence>,
    },
    /// Defer: the SMTP reply.
    Defer { reply: Vec<u8> },
}

impl Decision {
    /// For logs.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Deliver { .. } => "deliver",
            Self::Refuse { .. } => "refuse",
            Self::Defer { .. } => "defer",
        }
    }
}

/// A unique id for a scanned message (rspamd's `Queue-Id`, our log line).
pub fn queue_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "PB{:X}{:05X}{:04X}",
        now.as_secs(),
        now.subsec_micros(),
        NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

/// What the client is held responsible for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offence {
    Malware,
    Spam,
}

impl Scanner {
    pub fn new(
        settings: &crate::config::ScanSettings,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        Ok(Self {
            settings: settings.clone(),
            metrics: ScanMetrics::new(registry)?,
        })
    }

    /// The policies of the recipients' domains, each once.
    fn policies_for<'r>(&self, recipients: impl IntoIterator<Item = &'r str>) -> Vec<Policy> {
        let mut out: Vec<Policy> = Vec::new();
        for rcpt in recipients {
            let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d).to_lowercase();
            let policy = self
                .settings
                .domains
                .get(&domain)
                .copied()
                .unwrap_or(self.settings.default_policy);
            if !out.contains(&policy) {
                out.push(policy);
            }
        }
        if out.is_empty() {
            out.push(self.settings.default_policy);
        }
        out
    }

    /// Starts both scans; feed the message with [`Job::feed`].
    pub fn start(&self, envelope: &Envelope) -> Job {
        let mut job = Job {
            rspamd: None,
            clamd: None,
            clamd_left: self.settings.clamd_max_bytes,
            clamd_partial: None,
            sent: 0,
            unstuffer: spool::Unstuffer::default(),
            scratch: Vec::new(),
            timeout: self.settings.timeout,
            metrics: self.metrics.clone(),
        };
        if let Some(addr) = self.settings.rspamd {
            let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
            let envelope = envelope.clone();
            let task = tokio::spawn(async move { rspamd::check(addr, &envelope, rx).await });
            job.rspamd = Some(Feed::new(tx, task));
        }
        if let Some(addr) = self.settings.clamd.clone() {
            let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
            let task = tokio::spawn(async move {
                let mut stream = clamd::Instream::open(&addr)
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                while let Some(chunk) = rx.recv().await {
                    if let Err(error) = stream.send(&chunk).await {
                        // clamd may have answered before closing (size limit): say what.
                        return Err(match stream.answer().await {
                            Err(answer) => answer.to_string(),
                            Ok(_) => format!("sending: {error}"),
                        });
                    }
                }
                stream.finish().await.map_err(|e| e.to_string())
            });
            job.clamd = Some(Feed::new(tx, task));
        }
        job
    }

    /// The decision for `outcome` under the policy of each recipient's domain: the most
    /// severe of them (refuse, then defer, then deliver — tagged if any policy tags), so
    /// every recipient gets at least the protection its own domain asked for. Counted in
    /// the metrics.
    pub fn decide<'r>(
        &self,
        outcome: &Outcome,
        recipients: impl IntoIterator<Item = &'r str>,
    ) -> Decision {
        let (decision, action) = self
            .policies_for(recipients)
            .into_iter()
            .map(|policy| decide(outcome, policy))
            .max_by_key(|(decision, action)| severity(decision, action))
            .unwrap_or_else(|| decide(outcome, self.settings.default_policy));
        self.metrics.verdicts.with_label_values(&[action]).inc();
        decision
    }
}

/// Chunks in flight to a scanner (a slow scanner holds the client back, not our memory).
const CHANNEL_CHUNKS: usize = 16;

/// One scanner's stream and its task.
struct Feed<T> {
    tx: Option<mpsc::Sender<Bytes>>,
    task: JoinHandle<Result<T, String>>,
    /// Why feeding stopped early (the scanner closed or stalled).
    failed: Option<String>,
    /// Time the transfer waited for this scanner so far: all of it counts against the
    /// timeout, so a scanner cannot hold a message up for a timeout per chunk.
    stalled: Duration,
}

impl<T> Feed<T> {
    fn new(tx: mpsc::Sender<Bytes>, task: JoinHandle<Result<T, String>>) -> Self {
        Self {
            tx: Some(tx),
            task,
            failed: None,
            stalled: Duration::ZERO,
        }
    }

    /// Ends the stream early (the scanner judges what it got).
    fn close(&mut self) {
        self.tx = None;
    }

    async fn send(&mut self, chunk: &Bytes, timeout: Duration) {
        let Some(tx) = &self.tx else { return };
        let started = Instant::now();
        let budget = timeout.saturating_sub(self.stalled);
        let sent = tokio::time::timeout(budget, tx.send(chunk.clone())).await;
        self.stalled += started.elapsed();
        match sent {
            Ok(Ok(())) => {}
            // The task ended (it failed): its error comes out of the join.
            Ok(Err(_)) => self.tx = None,
            Err(_) => {
                self.failed = Some(format!(
                    "held the transfer up for {} ms in all",
                    timeout.as_millis()
                ));
                self.tx = None;
                self.task.abort();
            }
        }
    }

    async fn finish(mut self, deadline: Instant) -> Result<T, String> {
        drop(self.tx.take());
        if let Some(why) = self.failed.take() {
            return Err(why);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, &mut self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(format!("scan task failed: {join}")),
            Err(_) => {
                self.task.abort();
                Err("no answer in time".to_owned())
            }
        }
    }
}

impl<T> Drop for Feed<T> {
    /// A session that ends mid-message (client gone) stops its scans.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The scans of one message.
pub struct Job {
    rspamd: Option<Feed<RspamdVerdict>>,
    clamd: Option<Feed<ClamdVerdict>>,
    /// Bytes clamd may still be sent.
    clamd_left: u64,
    clamd_partial: Option<u64>,
    /// Bytes of the message so far (unstuffed).
    sent: u64,
    unstuffer: spool::Unstuffer,
    scratch: Vec<u8>,
    timeout: Duration,
    metrics: ScanMetrics,
}

impl Job {
    /// The next piece of the message as the backend would receive it (dot-stuffed).
    pub async fn feed(&mut self, wire: &[u8]) {
        self.scratch.clear();
        self.unstuffer.feed(wire, &mut self.scratch);
        if self.scratch.is_empty() {
            return;
        }
        let chunk = Bytes::copy_from_slice(&self.scratch);
        self.sent += chunk.len() as u64;
        if let Some(feed) = self.rspamd.as_mut() {
            feed.send(&chunk, self.timeout).await;
        }
        if let Some(feed) = self.clamd.as_mut()
            && self.clamd_partial.is_none()
        {
            let take = (chunk.len() as u64).min(self.clamd_left) as usize;
            if take > 0 {
                feed.send(&chunk.slice(..take), self.timeout).await;
                self.clamd_left -= take as u64;
            }
            if take < chunk.len() {
                // Past clamd's limit: it scans what it got (the stream ends at finish).
                self.clamd_partial = Some(self.sent - (chunk.len() - take) as u64);
                feed.close();
            }
        }
    }

    /// The message ended: the verdicts, each within the timeout.
    pub async fn finish(self) -> Outcome {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let metrics = self.metrics;
        let timed = |scanner: &'static str, ok: bool| {
            metrics
                .seconds
                .with_label_values(&[scanner])
                .observe(started.elapsed().as_secs_f64());
            if !ok {
                metrics.errors.with_label_values(&[scanner]).inc();
            }
        };
        let rspamd = async {
            match self.rspamd {
                Some(feed) => {
                    let result = feed.finish(deadline).await;
                    timed("rspamd", result.is_ok());
                    Some(result)
                }
                None => None,
            }
        };
        let clamd = async {
            match self.clamd {
                Some(feed) => {
                    let result = feed.finish(deadline).await;
                    timed("clamd", result.is_ok());
                    Some(result)
                }
                None => None,
            }
        };
        let clamd_partial = self.clamd_partial;
        let (rspamd, clamd) = tokio::join!(rspamd, clamd);
        Outcome {
            rspamd,
            clamd,
            clamd_partial,
        }
    }
}

/// The decision and its metric label.
fn decide(outcome: &Outcome, policy: Policy) -> (Decision, &'static str) {
    let mut headers = Vec::new();
    let mut unscanned = Vec::new();
    match &outcome.clamd {
        Some(Ok(ClamdVerdict::Infected(name))) => {
            let text = format!("Message contains malware ({})", printable(name));
            return (
                Decision::Refuse {
                    reply: crate::smtp::codec::reply(550, Some("5.7.1"), &text),
                    event: Some(Offence::Malware),
                },
                "malware",
            );
        }
        Some(Ok(ClamdVerdict::Clean)) => match outcome.clamd_partial {
            None => headers.extend_from_slice(b"X-Virus-Scanned: clamd (protobalance); clean\r\n"),
            Some(bytes) => headers.extend_from_slice(
                format!(
                    "X-Virus-Scanned: clamd (protobalance); clean in the first {bytes} bytes \
                     (scan.clamd_max_bytes), the rest not scanned\r\n"
                )
                .as_bytes(),
            ),
        },
        Some(Err(why)) => unscanned.push(format!("clamd: {}", printable(why))),
        None => {}
    }
    let mut spam = false;
    match &outcome.rspamd {
        Some(Ok(v)) => {
            let reject = policy
                .reject_score
                .map_or(v.action == "reject", |t| v.score >= t);
            if reject && policy.spam == SpamAction::Reject {
                let text = format!("Message rejected as spam (score {:.2})", v.score);
                return (
                    Decision::Refuse {
                        reply: crate::smtp::codec::reply(550, Some("5.7.1"), &text),
                        event: Some(Offence::Spam),
                    },
                    "reject",
                );
            }
            if !reject && v.action == "soft reject" {
                return (
                    Decision::Defer {
                        reply: crate::smtp::codec::reply(
                            451,
                            Some("4.7.1"),
                            "Message deferred by the spam filter; try again later",
                        ),
                    },
                    "soft_reject",
                );
            }
            spam = reject
                || policy.tag_score.map_or(
                    matches!(v.action.as_str(), "add header" | "rewrite subject"),
                    |t| v.score >= t,
                );
            let tests: Vec<&str> = v.symbols.iter().map(|(name, _)| name.as_str()).collect();
            headers.extend_from_slice(
                format!(
                    "X-Spam-Score: {:.2}\r\nX-Spam-Status: {}, score={:.2} required={:.2} \
                     action=\"{}\" tests={}\r\n",
                    v.score,
                    if spam { "Yes" } else { "No" },
                    v.score,
                    v.required_score,
                    printable(&v.action),
                    printable(&tests.join(","))
                )
                .as_bytes(),
            );
            if spam {
                headers.extend_from_slice(b"X-Spam-Flag: YES\r\n");
            }
        }
        Some(Err(why)) => unscanned.push(format!("rspamd: {}", printable(why))),
        None => {}
    }
    if !unscanned.is_empty() {
        if policy.on_failure == FailureAction::Tempfail {
            return (
                Decision::Defer {
                    reply: crate::smtp::codec::reply(
                        451,
                        Some("4.7.1"),
                        "Message could not be scanned; try again later",
                    ),
                },
                "tempfail",
            );
        }
        headers.extend_from_slice(
            format!("X-Scan-Warning: not scanned ({})\r\n", unscanned.join("; ")).as_bytes(),
        );
        return (Decision::Deliver { headers }, "unscanned");
    }
    let action = if spam { "tag" } else { "accept" };
    (Decision::Deliver { headers }, action)
}

/// Orders decisions: refuse > defer > deliver tagged > deliver.
fn severity(decision: &Decision, action: &str) -> u8 {
    match decision {
        Decision::Refuse { .. } => 3,
        Decision::Defer { .. } => 2,
        Decision::Deliver { .. } if action == "tag" || action == "unscanned" => 1,
        Decision::Deliver { .. } => 0,
    }
}

/// Text safe for a header or reply line: printable ASCII, at most 200 characters.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const POLICY: Policy = Policy {
        reject_score: None,
        tag_score: None,
        spam: SpamAction::Reject,
        on_failure: FailureAction::Tempfail,
    };

    fn rspamd(score: f64, action: &str) -> Option<Result<RspamdVerdict, String>> {
        Some(Ok(RspamdVerdict {
            score,
            required_score: 15.0,
            action: action.into(),
            symbols: vec![("SYM".into(), score)],
        }))
    }

    fn code(decision: &Decision) -> u16 {
        let reply = match decision {
            Decision::Refuse { reply, .. } | Decision::Defer { reply } => reply,
            Decision::Deliver { .. } => return 250,
        };
        String::from_utf8_lossy(&reply[..3]).parse().expect("code")
    }

    #[test]
    fn malware_beats_everything_and_spam_follows_the_policy() {
        let infected = Outcome {
            rspamd: Some(Err("down".into())),
            clamd: Some(Ok(ClamdVerdict::Infected("Eicar\r\nX".into()))),
            clamd_partial: None,
        };
        let (d, action) = decide(&infected, POLICY);
        assert_eq!((code(&d), action), (550, "malware"));
        assert!(
            matches!(d, Decision::Refuse { event: Some(Offence::Malware), ref reply } if !reply[..reply.len() - 2].contains(&b'\n'))
        );

        let gtube = Outcome {
            rspamd: rspamd(0.0, "reject"),
            clamd: Some(Ok(ClamdVerdict::Clean)),
            clamd_partial: None,
        };
        assert_eq!(decide(&gtube, POLICY).1, "reject");
        let tag = Policy {
            spam: SpamAction::Tag,
            ..POLICY
        };
        let (d, action) = decide(&gtube, tag);
        assert_eq!(action, "tag");
        let Decision::Deliver { headers } = d else {
            panic!("delivered")
        };
        let headers = String::from_utf8(headers).expect("utf8");
        assert!(headers.contains("X-Spam-Flag: YES\r\n"), "{headers}");
        assert!(headers.contains("X-Virus-Scanned: clamd"), "{headers}");

        let scored = Policy {
            reject_score: Some(10.0),
            ..POLICY
        };
        assert_eq!(
            decide(
                &Outcome {
                    rspamd: rspamd(12.0, "add header"),
                    clamd: None,
                    clamd_partial: None
                },
                scored
            )
            .1,
            "reject"
        );
        assert_eq!(
            decide(
                &Outcome {
                    rspamd: rspamd(7.0, "add header"),
                    clamd: None,
                    clamd_partial: None
                },
                scored
            )
            .1,
            "tag"
        );
        assert_eq!(
            decide(
                &Outcome {
                    rspamd: rspamd(1.0, "no action"),
                    clamd: None,
                    clamd_partial: None
                },
                scored
            )
            .1,
            "accept"
        );
        assert_eq!(
            decide(
                &Outcome {
                    rspamd: rspamd(5.0, "soft reject"),
                    clamd: None,
                    clamd_partial: None
                },
                POLICY
            )
            .1,
            "soft_reject"
        );
    }

    #[test]
    fn a_failed_scanner_defers_or_tags_as_configured() {
        let failed = Outcome {
            rspamd: rspamd(1.0, "no action"),
            clamd: Some(Err("no answer in time".into())),
            clamd_partial: None,
        };
        let (d, action) = decide(&failed, POLICY);
        assert_eq!((code(&d), action), (451, "tempfail"));
        let accept = Policy {
            on_failure: FailureAction::Accept,
            ..POLICY
        };
        let (d, action) = decide(&failed, accept);
        assert_eq!(action, "unscanned");
        let Decision::Deliver { headers } = d else {
            panic!("delivered")
        };
        assert!(
            String::from_utf8_lossy(&headers)
                .contains("X-Scan-Warning: not scanned (clamd: no answer in time)")
        );
    }

    #[test]
    fn each_domain_gets_at_least_its_own_protection() {
        let tags_at_5 = Policy {
            reject_score: Some(5.0),
            tag_score: None,
            spam: SpamAction::Tag,
            on_failure: FailureAction::Accept,
        };
        let lax = Policy {
            reject_score: Some(20.0),
            ..POLICY
        };
        let registry = Registry::new();
        let scanner = Scanner {
            settings: crate::config::ScanSettings {
                rspamd: None,
                clamd: None,
                clamd_max_bytes: 1 << 20,
                timeout: Duration::from_secs(1),
                memory_bytes: 4096,
                spool_dir: std::env::temp_dir(),
                default_policy: POLICY,
                domains: HashMap::from([
                    ("tag.example".to_owned(), tags_at_5),
                    ("lax.example".to_owned(), lax),
                ]),
            },
            metrics: ScanMetrics::new(&registry).expect("metrics"),
        };
        let code_for = |outcome: &Outcome, rcpts: &[&str]| {
            code(&scanner.decide(outcome, rcpts.iter().copied()))
        };
        // Score 6: the default domain delivers, tag.example tags: neither rejects.
        let six = Outcome {
            rspamd: rspamd(6.0, "no action"),
            clamd: None,
            clamd_partial: None,
        };
        assert_eq!(code_for(&six, &["a@example.com", "b@tag.example"]), 250);
        let Decision::Deliver { headers } =
            scanner.decide(&six, ["a@example.com", "b@tag.example"])
        else {
            panic!("delivered")
        };
        assert!(
            String::from_utf8_lossy(&headers).contains("X-Spam-Flag: YES"),
            "tagged for tag.example"
        );
        // rspamd says reject at 16: the default domain refuses even if lax.example would not.
        let sixteen = Outcome {
            rspamd: rspamd(16.0, "reject"),
            clamd: None,
            clamd_partial: None,
        };
        assert_eq!(code_for(&sixteen, &["a@lax.example"]), 250);
        assert_eq!(code_for(&sixteen, &["a@lax.example", "b@example.com"]), 550);
        // A failed scanner: tempfail for the default domain beats accept for tag.example.
        let failed = Outcome {
            rspamd: Some(Err("down".into())),
            clamd: None,
            clamd_partial: None,
        };
        assert_eq!(code_for(&failed, &["b@tag.example"]), 250);
        assert_eq!(code_for(&failed, &["b@tag.example", "a@example.com"]), 451);
    }
}
