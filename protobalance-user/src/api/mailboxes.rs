//! `/api/v1/mailboxes`: list (keyset paging, filters), get, create (apportioned or pinned),
//! delete, and the streamed bulk import with a per-item report.

use std::collections::HashMap;

use hyper::{StatusCode, body::Incoming, header};

use super::{
    ApiError, ApiResponse, ApiState, no_content, only_params, query_param,
    xml::{BodyReader, Item, Parser, Writer, collect_small},
    xml_response,
};
use crate::directory::{
    BackendState, Mailbox, MailboxDirectory as _, MailboxFilter, import::ImportEntry,
};

const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;
/// Mailboxes written per directory transaction during an import.
const IMPORT_BATCH: usize = 5000;

pub(super) fn mailbox(state: &ApiState, address: &str) -> Result<Mailbox, ApiError> {
    state
        .directory
        .normalizer()
        .normalize(address)
        .map(|n| n.mailbox)
        .map_err(|e| ApiError::invalid("invalid_address", format!("`{address}`: {e}")))
}

pub async fn list(state: &ApiState, query: &str) -> Result<ApiResponse, ApiError> {
    only_params(query, &["domain", "backend", "after", "limit"])?;
    let limit = match query_param(query, "limit")? {
        None => PAGE_DEFAULT,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=PAGE_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_parameter",
                    format!("limit `{text}`: use 1..={PAGE_MAX}"),
                )
            })?,
    };
    let domain = match query_param(query, "domain")? {
        None => None,
        Some(d) => Some(state.directory.normalizer().domain(&d).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_parameter",
                format!("domain `{d}` is not a domain name"),
            )
        })?),
    };
    let after = match query_param(query, "after")? {
        None => None,
        Some(a) => Some(mailbox(state, &a)?),
    };
    let filter = MailboxFilter {
        domain,
        backend: query_param(query, "backend")?,
    };
    let store = state.directory.store();
    let mut rows = store
        .list_mailboxes(&filter, after.as_ref(), limit + 1)
        .await?;
    let next = (rows.len() > limit).then(|| {
        rows.truncate(limit);
        rows.last()
            .map(|(m, _)| m.as_str().to_owned())
            .unwrap_or_default()
    });
    let count = rows.len().to_string();
    let mut attributes = vec![("count", count.as_str())];
    if let Some(next) = next.as_deref() {
        attributes.push(("next", next));
    }
    let mut w = Writer::document("mailboxes", &attributes);
    for (mailbox, backend) in &rows {
        w.empty(
            "mailbox",
            &[("address", mailbox.as_str()), ("backend", backend)],
        );
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

pub async fn get(state: &ApiState, address: &str) -> Result<ApiResponse, ApiError> {
    let mailbox = mailbox(state, address)?;
    let store = state.directory.store();
    let Some(backend) = store.owner_of(&mailbox).await? else {
        return Err(ApiError::not_found(format!("no mailbox {mailbox}")));
    };
    let backend_state = store
        .backends()
        .await?
        .into_iter()
        .find(|b| b.name == backend)
        .map_or("unknown", |b| b.state.as_str());
    let w = Writer::document(
        "mailbox",
        &[
            ("address", mailbox.as_str()),
            ("backend", &backend),
            ("backend-state", backend_state),
        ],
    );
    Ok(xml_response(StatusCode::OK, w.finish()))
}

pub async fn create(state: &ApiState, body: Incoming) -> Result<ApiResponse, ApiError> {
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("mailbox").await?;
    element.only(&["address", "backend"])?;
    let mailbox = mailbox(state, element.required("address")?)?;
    let store = state.directory.store();
    let domain = mailbox.domain();
    if store.domain_policy(domain).await?.is_none() {
        return Err(ApiError::invalid(
            "foreign_domain",
            format!(
                "{domain} is not one of the cluster's domains; add it first (POST {}domains)",
                super::PREFIX
            ),
        ));
    }
    if let Some(owner) = store.owner_of(&mailbox).await? {
        return Err(ApiError::conflict(
            "mailbox_exists",
            format!("{mailbox} already exists on backend `{owner}`"),
        ));
    }
    let backend = match element.attr("backend") {
        Some(name) => {
            let record = store.backends().await?.into_iter().find(|b| b.name == name);
            match record {
                None => {
                    return Err(ApiError::invalid(
                        "unknown_backend",
                        format!("no backend `{name}`"),
                    ));
                }
                Some(b) if b.state != BackendState::Active => {
                    return Err(ApiError::conflict(
                        "backend_not_active",
                        format!(
                            "backend `{name}` is {}: it takes no new mailboxes",
                            b.state.as_str()
                        ),
                    ));
                }
                Some(_) => store.assign_to(&mailbox, name).await?,
            }
        }
        None => store.assign(&mailbox).await?,
    };
    tracing::info!(%mailbox, %backend, "mailbox created by API");
    let w = Writer::document(
        "mailbox",
        &[("address", mailbox.as_str()), ("backend", &backend)],
    );
    let mut response = xml_response(StatusCode::CREATED, w.finish());
    let location = format!("{}mailboxes/{}", super::PREFIX, mailbox.as_str());
    if let Ok(value) = header::HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

pub async fn delete(state: &ApiState, address: &str) -> Result<ApiResponse, ApiError> {
    let mailbox = mailbox(state, address)?;
    // A move in progress would copy on to a backend that no longer owns the mailbox.
    let store = state.directory.store();
    if let Some(record) = store
        .moves()
        .await?
        .into_iter()
        .find(|r| r.mailbox == mailbox.as_str())
    {
        return Err(ApiError::conflict(
            "move_in_progress",
            format!(
                "{mailbox} is being moved from {} to {}: delete it once the move ended (or \
                 was abandoned: DELETE /moves/{mailbox})",
                record.from, record.to
            ),
        ));
    }
    if !state.directory.delete(&mailbox).await? {
        return Err(ApiError::not_found(format!("no mailbox {mailbox}")));
    }
    tracing::info!(%mailbox, "mailbox deleted by API (its mail stays on the backend)");
    Ok(no_content())
}

/// `POST /mailboxes/{address}/move` with `<move [backend=".."]/>`: copies the mailbox to
/// `backend` (default: where a new mailbox would go now) and switches it there
/// (`crate::moves`); answers when done with what was copied and deleted.
pub async fn move_to(
    state: &ApiState,
    address: &str,
    query: &str,
    body: Incoming,
) -> Result<ApiResponse, ApiError> {
    only_params(query, &["wait"])?;
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("move").await?;
    element.only(&["backend"])?;
    let mailbox = mailbox(state, address)?;
    let mover = state.mover.clone().ok_or_else(|| {
        ApiError::conflict(
            "moves_not_configured",
            "this node runs no mail listeners, so it moves no mailboxes",
        )
    })?;
    let to = match element.attr("backend") {
        Some(name) => name.to_owned(),
        None => state.directory.store().candidate().await?,
    };
    // A job in its own task: a client that gives up (or times out) does not stop a move
    // halfway. `?wait=no` answers at once with the job to watch.
    let job = mover.start(mailbox, to);
    if query_param(query, "wait")?.as_deref() == Some("no") {
        let mut response = xml_response(StatusCode::ACCEPTED, super::jobs::job_document(&job));
        if let Ok(location) =
            header::HeaderValue::from_str(&format!("{}jobs/{}", super::PREFIX, job.id))
        {
            response.headers_mut().insert(header::LOCATION, location);
        }
        return Ok(response);
    }
    let report = job
        .finished()
        .await
        .map_err(|e| super::jobs::move_error(&e))?;
    let numbers = [
        report.folders.to_string(),
        report.copied_before.to_string(),
        report.copied_after.to_string(),
        report.deleted.to_string(),
        report.millis.to_string(),
        report.expunged_on_new.to_string(),
        report.flags_synced.to_string(),
    ];
    let w = Writer::document(
        "move",
        &[
            ("mailbox", &report.mailbox),
            ("from", &report.from),
            ("to", &report.to),
            ("folders", &numbers[0]),
            ("copied-before-switch", &numbers[1]),
            ("copied-after-switch", &numbers[2]),
            ("deleted-from-old", &numbers[3]),
            ("expunged-on-new", &numbers[5]),
            ("flags-synced", &numbers[6]),
            ("milliseconds", &numbers[4]),
        ],
    );
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// One item's outcome in the import report.
struct Outcome {
    address: String,
    result: &'static str,
    backend: Option<String>,
    message: Option<String>,
}

/// `POST /mailboxes/import`: `<import><mailbox address=".." [backend=".."]/>…</import>`,
/// parsed as it arrives and written in batches; `?report=errors` leaves the successful
/// items out of the report.
pub async fn import(
    state: &ApiState,
    body: Incoming,
    query: &str,
) -> Result<ApiResponse, ApiError> {
    only_params(query, &["report"])?;
    let errors_only = match query_param(query, "report")?.as_deref() {
        None | Some("all") => false,
        Some("errors") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_parameter",
                format!("report `{other}`: use all or errors"),
            ));
        }
    };
    let store = state.directory.store();
    // Whether each domain seen is ours, asked once per distinct domain (bounded).
    let mut known: HashMap<String, bool> = HashMap::new();
    let mut parser = Parser::new(BodyReader::new(body, state.max_import_octets));
    let root = parser.root("import").await?;
    root.only(&[])?;
    let mut report = Report {
        errors_only,
        ..Report::default()
    };
    let mut batch: Vec<ImportEntry> = Vec::with_capacity(IMPORT_BATCH);
    loop {
        match parser.next().await? {
            Item::Open(element) if element.name == "mailbox" && !element.has_children => {
                element.only(&["address", "backend"])?;
                let address = element.required("address")?.to_owned();
                let normalized = match state.directory.normalizer().normalize(&address) {
                    Ok(n) => n,
                    Err(e) => {
                        report.record(Outcome {
                            address,
                            result: "invalid",
                            backend: None,
                            message: Some(e.to_string()),
                        });
                        continue;
                    }
                };
                let domain = normalized.mailbox.domain();
                let ours = match known.get(domain) {
                    Some(ours) => *ours,
                    None => {
                        let ours = store.domain_policy(domain).await?.is_some();
                        if known.len() < KNOWN_DOMAINS {
                            known.insert(domain.to_owned(), ours);
                        }
                        ours
                    }
                };
                if !ours {
                    report.record(Outcome {
                        message: Some(format!("{domain} is not one of the cluster's domains")),
                        address,
                        result: "foreign_domain",
                        backend: None,
                    });
                    continue;
                }
                batch.push(ImportEntry {
                    mailbox: normalized.mailbox,
                    backend: element.attr("backend").map(str::to_owned),
                });
                if batch.len() >= IMPORT_BATCH {
                    flush(state, &mut batch, &mut report).await?;
                }
            }
            Item::Open(element) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unknown_element",
                    format!(
                        "<import> holds <mailbox/> elements only; found <{}>",
                        element.name
                    ),
                ));
            }
            Item::Close(_) => break,
            Item::End => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_xml",
                    "no </import>",
                ));
            }
        }
    }
    parser.finish().await?;
    flush(state, &mut batch, &mut report).await?;
    let totals = &report.totals;
    tracing::info!(
        added = totals.added,
        existing = totals.existing,
        failed = totals.failed,
        "mailbox import by API"
    );
    let (added, existing, failed) = (
        totals.added.to_string(),
        totals.existing.to_string(),
        totals.failed.to_string(),
    );
    let mut w = Writer::document(
        "import-report",
        &[
            ("added", &added),
            ("existing", &existing),
            ("failed", &failed),
        ],
    );
    for o in &report.outcomes {
        let mut attributes = vec![("address", o.address.as_str()), ("result", o.result)];
        if let Some(backend) = o.backend.as_deref() {
            attributes.push(("backend", backend));
        }
        if let Some(message) = o.message.as_deref() {
            attributes.push(("message", message));
        }
        w.empty("item", &attributes);
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// Distinct domains whose ownership an import remembers; beyond, it asks each time.
const KNOWN_DOMAINS: usize = 10_000;

/// The import's counts and the items the report lists (with `report=errors` only the
/// failures are kept, so memory follows the failures, not the import's size).
#[derive(Default)]
struct Report {
    errors_only: bool,
    outcomes: Vec<Outcome>,
    totals: Totals,
}

impl Report {
    fn record(&mut self, outcome: Outcome) {
        self.totals.count(outcome.result);
        if !self.errors_only || !matches!(outcome.result, "added" | "exists") {
            self.outcomes.push(outcome);
        }
    }
}

#[derive(Default)]
struct Totals {
    added: u64,
    existing: u64,
    failed: u64,
}

impl Totals {
    fn count(&mut self, result: &str) {
        match result {
            "added" => self.added += 1,
            "exists" => self.existing += 1,
            _ => self.failed += 1,
        }
    }
}

async fn flush(
    state: &ApiState,
    batch: &mut Vec<ImportEntry>,
    report: &mut Report,
) -> Result<(), ApiError> {
    if batch.is_empty() {
        return Ok(());
    }
    let entries = std::mem::take(batch);
    let results = state.directory.store().import_entries(entries).await?;
    for result in results {
        report.record(Outcome {
            address: result.mailbox.as_str().to_owned(),
            result: result.outcome.as_str(),
            backend: result.backend,
            message: result.message,
        });
    }
    Ok(())
}
