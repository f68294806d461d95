//! `/api/v1/moves`: the mailbox moves recorded in the directory — running (on this node or
//! another) or stopped and waiting to be resumed — and giving up a stopped one.

use hyper::StatusCode;

use super::jobs::mover;
use super::{ApiError, ApiResponse, ApiState, no_content, xml::Writer, xml_response};
use crate::moves::{jobs::Abandoned, unix_ms};

/// `GET moves`: `<moves>` of `<recorded-move mailbox from to holder started-ms
/// lease-ends-ms state/>`; `state`: `running-here`, `running` (another node's lease runs)
/// or `stopped` (resumed once a node can).
pub async fn list(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let now = unix_ms();
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

/// `DELETE moves/{address}[?force=yes]`: abandons a stopped move (`force`: one whose
/// mailbox was switched already).
pub async fn delete(state: &ApiState, address: &str, query: &str) -> Result<ApiResponse, ApiError> {
    super::only_params(query, &["force"])?;
    let force = match super::query_param(query, "force")?.as_deref() {
        None => false,
        Some("yes") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "invalid_query",
                format!("force=`{other}`: the only value is `yes`"),
            ));
        }
    };
    let mailbox = super::mailboxes::mailbox(state, address)?;
    match mover(state)?.abandon(&mailbox, force).await? {
        Abandoned::Ended(_) => Ok(no_content()),
        Abandoned::NotRecorded => Err(ApiError::not_found(format!(
            "no move of {mailbox} is recorded"
        ))),
        Abandoned::Switched(record) => Err(ApiError::conflict(
            "move_switched",
            format!(
                "{mailbox} is switched to {} already: abandoning leaves what {} still holds \
                 out of its reach; let the move be retried, or abandon with ?force=yes and \
                 sort the mail out by hand",
                record.to, record.from
            ),
        )),
        Abandoned::Running(ends) => Err(ApiError::conflict(
            "move_running",
            format!(
                "a run holds the move of {mailbox} (its lease ends in {} s unless renewed): \
                 only a stopped move can be abandoned",
                ends.saturating_sub(unix_ms()).max(0) / 1000
            ),
        )),
    }
}
