//! `/api/v1/jobs`: long operations (mailbox moves) and how they go.

use hyper::StatusCode;

use super::{ApiError, ApiResponse, ApiState, xml::Writer, xml_response};
use crate::moves::{MoveError, jobs::Job};

/// The API error a failed move answers with (also shown on its job).
pub fn move_error(e: &MoveError) -> ApiError {
    use crate::directory::DirectoryError;
    match e {
        MoveError::NotConfigured => ApiError::conflict("moves_not_configured", e.to_string()),
        MoveError::NoSuchMailbox(_) => ApiError::not_found(e.to_string()),
        MoveError::AlreadyThere { .. } => ApiError::conflict("already_there", e.to_string()),
        MoveError::Busy(_) => ApiError::conflict("move_in_progress", e.to_string()),
        MoveError::OwnerChanged { .. } => ApiError::conflict("owner_changed", e.to_string()),
        MoveError::TargetNotEmpty { .. } => ApiError::conflict("target_not_empty", e.to_string()),
        MoveError::UnknownBackend(_) | MoveError::Directory(DirectoryError::UnknownBackend(_)) => {
            ApiError::invalid("unknown_backend", e.to_string())
        }
        MoveError::Directory(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "directory_unavailable",
            format!("{e}; the mailbox stays where the directory says"),
        ),
        other => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "move_failed",
            format!("{other}; the mailbox stays where the directory says"),
        ),
    }
}

/// A job's attributes: id, kind, mailbox, to, state (`running`, `done`, `failed`), phase,
/// copied, total, elapsed-ms; when done the move's report, when failed `error`, `status`
/// (what a waiting request would have answered) and `message`.
pub fn job_attributes(job: &Job) -> Vec<(&'static str, String)> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut attrs = vec![
        ("id", job.id.to_string()),
        ("kind", "move".to_owned()),
        ("mailbox", job.mailbox.clone()),
        ("to", job.to.clone()),
    ];
    let state = match job.outcome() {
        None => "running",
        Some(Ok(report)) => {
            attrs.extend([
                ("from", report.from.clone()),
                ("folders", report.folders.to_string()),
                ("copied-before-switch", report.copied_before.to_string()),
                ("copied-after-switch", report.copied_after.to_string()),
                ("deleted-from-old", report.deleted.to_string()),
                ("expunged-on-new", report.expunged_on_new.to_string()),
                ("flags-synced", report.flags_synced.to_string()),
            ]);
            "done"
        }
        Some(Err(error)) => {
            let api = move_error(&error);
            attrs.extend([
                ("error", api.code.to_owned()),
                ("status", api.status.as_u16().to_string()),
                ("message", api.message),
            ]);
            "failed"
        }
    };
    attrs.extend([
        ("state", state.to_owned()),
        ("phase", job.progress.phase().to_owned()),
        ("copied", job.progress.copied.load(Relaxed).to_string()),
        ("total", job.progress.total.load(Relaxed).to_string()),
        (
            "elapsed-ms",
            (job.started.elapsed().as_millis() as u64).to_string(),
        ),
    ]);
    attrs
}

fn borrowed<'a>(attrs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    attrs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// One job as a document.
pub fn job_document(job: &Job) -> String {
    Writer::document("job", &borrowed(&job_attributes(job))).finish()
}

pub(super) fn mover(state: &ApiState) -> Result<&crate::moves::Mover, ApiError> {
    state.mover.as_deref().ok_or_else(|| {
        ApiError::conflict(
            "moves_not_configured",
            "this node runs no mail listeners, so it runs no moves",
        )
    })
}

/// `GET jobs`: every kept job, newest first.
pub fn list(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let mut w = Writer::document("jobs", &[]);
    for job in mover(state)?.jobs().all() {
        w.empty("job", &borrowed(&job_attributes(&job)));
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// `GET jobs/{id}`.
pub fn get(state: &ApiState, id: &str) -> Result<ApiResponse, ApiError> {
    let job = id
        .parse()
        .ok()
        .and_then(|id| mover(state).ok()?.jobs().get(id))
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    Ok(xml_response(StatusCode::OK, job_document(&job)))
}
