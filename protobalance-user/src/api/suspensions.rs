//! `/api/v1/suspensions`: accounts suspended from sending through the submission
//! listeners — by the rules against relay clients with malware (`[submission]`), or by an
//! operator — with their reason and time left; `POST` suspends, `DELETE` lifts.
//! Suspensions are kept per edge node, in memory and in the directory store (so they
//! survive a restart).

use std::time::{Duration, Instant};

use hyper::{StatusCode, body::Incoming};

use super::{
    ApiError, ApiResponse, ApiState, no_content,
    xml::{Parser, Writer, collect_small},
    xml_response,
};
use crate::smtp::limits::{SubmissionLimits, SuspendReason};

/// Longest suspension an operator places: 30 days.
const MAX_SECONDS: u64 = 30 * 86_400;

fn limits(state: &ApiState) -> Result<&SubmissionLimits, ApiError> {
    state
        .proxy
        .as_deref()
        .map(|p| &p.submission_limits)
        .ok_or_else(|| {
            ApiError::conflict(
                "submission_not_running",
                "no mail listeners run here, so nobody submits mail",
            )
        })
}

fn account(state: &ApiState, text: &str) -> String {
    match state.directory.normalizer().normalize(text) {
        Ok(n) => n.mailbox.to_string(),
        Err(_) => text.trim().to_lowercase(),
    }
}

pub fn list(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let now = Instant::now();
    let mut w = Writer::document("suspensions", &[]);
    for (account, s) in limits(state)?.suspensions(now) {
        let since = now.saturating_duration_since(s.since).as_secs().to_string();
        let left = s.until.saturating_duration_since(now).as_secs().to_string();
        w.empty(
            "suspension",
            &[
                ("account", &account),
                ("reason", s.reason.as_str()),
                ("seconds-ago", &since),
                ("remaining-seconds", &left),
            ],
        );
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// `<suspension account="user@example.com" seconds="3600"/>`.
pub async fn create(state: &ApiState, body: Incoming) -> Result<ApiResponse, ApiError> {
    let limits = limits(state)?;
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("suspension").await?;
    element.only(&["account", "seconds"])?;
    let account = account(state, element.required("account")?);
    if account.is_empty() {
        return Err(ApiError::invalid("invalid_account", "`account` is empty"));
    }
    let text = element.required("seconds")?;
    let seconds = text
        .parse::<u64>()
        .ok()
        .filter(|s| (1..=MAX_SECONDS).contains(s))
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid_seconds",
                format!("`seconds` is `{text}`: use 1..={MAX_SECONDS}"),
            )
        })?;
    limits.suspend(
        &account,
        SuspendReason::Operator,
        Duration::from_secs(seconds),
        Instant::now(),
    );
    limits.save(&account).await.map_err(store_error)?;
    let seconds = seconds.to_string();
    let w = Writer::document(
        "suspension",
        &[
            ("account", &account),
            ("reason", SuspendReason::Operator.as_str()),
            ("seconds-ago", "0"),
            ("remaining-seconds", &seconds),
        ],
    );
    Ok(xml_response(StatusCode::CREATED, w.finish()))
}

pub async fn delete(state: &ApiState, text: &str) -> Result<ApiResponse, ApiError> {
    let account = account(state, text);
    let limits = limits(state)?;
    if !limits.lift(&account) {
        return Err(ApiError::not_found(format!("{account} is not suspended")));
    }
    limits.save(&account).await.map_err(store_error)?;
    Ok(no_content())
}

fn store_error(error: crate::directory::DirectoryError) -> ApiError {
    tracing::error!(%error, "API: storing a suspension failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "directory_error",
        "the directory store failed; the change holds in memory until a restart",
    )
}
