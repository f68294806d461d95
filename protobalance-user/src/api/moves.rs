//! `/api/v1/moves`: the mailbox moves recorded in the directory — running (on this node or
//! another) or stopped and waiting to be resumed — and giving up a stopped one.

use hyper::StatusCode;

use super::{ApiError, ApiResponse, ApiState, no_content, xml::Writer, xml_response};
use crate::moves::jobs::Abandoned;

fn mover(state: &ApiState) -> Result<&crate::moves::Mover, ApiError> {
    state.mover.as_deref().ok_or_else(|| {
        ApiError::conflict(
            "moves_not_configured",
            "this node runs no mail listeners, so it runs no moves",
        )
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `GET moves`: `<moves>` of `<recorded-move mailbox from to holder started-ms
/// lease-ends-ms state/>`; `state`: `running-here`, `running` (another node's lease runs)
/// or `stopped` (resumed once a node can).
pub async fn list(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let now = now_ms();
    let mut w = Writer::document("moves", &[]);
    for (record, here) in mover(state)?.recorded().await? {
        let run = if here {
            "running-here"
        } else if record.expires_ms >= now {
            "running"
        } else {
            "stopped"
        };
        let (started, ends) = (record.started_ms.to_string(), record.expires_ms.to_string());
        w.empty(
            "recorded-move",
            &[
                ("mailbox", record.mailbox.as_str()),
                ("from", &record.from),
                ("to", &record.to),
                ("holder", &record.holder),
                ("started-ms", &started),
                ("lease-ends-ms", &ends),
                ("state", run),
            ],
        );
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// `DELETE moves/{address}`: abandons a stopped move.
pub async fn delete(state: &ApiState, address: &str) -> Result<ApiResponse, ApiError> {
    let mailbox = super::mailboxes::mailbox(state, address)?;
    match mover(state)?.abandon(&mailbox).await? {
        Abandoned::Ended(_) => Ok(no_content()),
        Abandoned::NotRecorded => Err(ApiError::not_found(format!(
            "no move of {mailbox} is recorded"
        ))),
        Abandoned::Running(ends) => Err(ApiError::conflict(
            "move_running",
            format!(
                "a run holds the move of {mailbox} (its lease ends in {} s unless renewed): \
                 only a stopped move can be abandoned",
                ends.saturating_sub(now_ms()).max(0) / 1000
            ),
        )),
    }
}
