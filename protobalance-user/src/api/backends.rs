//! `/api/v1/backends`: list with state, load and health; drain / activate / take down;
//! remove a backend the config no longer lists once it owns no mailboxes. Address, ports
//! and capacity of configured backends are the config file's.

use hyper::{StatusCode, body::Incoming};

use super::{
    ApiError, ApiResponse, ApiState, no_content,
    xml::{Parser, Writer, collect_small},
    xml_response,
};
use crate::directory::{BackendRecord, BackendState, MailboxDirectory as _};

fn managed(state: &ApiState, name: &str) -> &'static str {
    if state.config_backends.iter().any(|b| b == name) {
        "config"
    } else {
        "directory"
    }
}

fn write_backend(state: &ApiState, w: &mut Writer, b: &BackendRecord) {
    let capacity = b.capacity.to_string();
    let mailboxes = b.mailboxes.to_string();
    let load = if b.capacity == 0 {
        "0".to_owned()
    } else {
        format!("{:.3}", b.mailboxes as f64 / f64::from(b.capacity))
    };
    let address = state
        .pool
        .as_ref()
        .and_then(|p| p.backend_address(&b.name))
        .map(|a| a.to_string());
    let mut attributes = vec![
        ("name", b.name.as_str()),
        ("state", b.state.as_str()),
        ("capacity", capacity.as_str()),
        ("mailboxes", mailboxes.as_str()),
        ("load", load.as_str()),
        ("managed-by", managed(state, &b.name)),
    ];
    if let Some(address) = address.as_deref() {
        attributes.push(("address", address));
    }
    let health = state
        .pool
        .as_ref()
        .map(|p| p.health(&b.name))
        .unwrap_or_default();
    if health.is_empty() {
        w.empty("backend", &attributes);
        return;
    }
    w.start("backend", &attributes);
    for (service, up) in health {
        w.empty(
            "service",
            &[
                ("name", service.as_str()),
                ("up", if up { "true" } else { "false" }),
            ],
        );
    }
    w.end();
}

pub async fn list(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let backends = state.directory.store().backends().await?;
    let mut w = Writer::document("backends", &[]);
    for b in &backends {
        write_backend(state, &mut w, b);
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

async fn record(state: &ApiState, name: &str) -> Result<BackendRecord, ApiError> {
    state
        .directory
        .store()
        .backends()
        .await?
        .into_iter()
        .find(|b| b.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no backend `{name}`")))
}

/// `<backend state="draining"/>`: `active` takes new mailboxes, `draining` serves its
/// own but takes no new ones, `down` serves nothing (temporary failures).
pub async fn update(state: &ApiState, name: &str, body: Incoming) -> Result<ApiResponse, ApiError> {
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("backend").await?;
    element.only(&["name", "state", "capacity"])?;
    if element.attr("name").is_some_and(|n| n != name) {
        return Err(ApiError::invalid(
            "name_mismatch",
            "the body's `name` differs from the path; backends cannot be renamed",
        ));
    }
    if element.attr("capacity").is_some() {
        return Err(ApiError::conflict(
            "managed_by_config",
            format!(
                "the capacity of backend `{name}` is set in the config file ([[backend]] capacity); change it there"
            ),
        ));
    }
    let current = record(state, name).await?;
    if let Some(text) = element.attr("state") {
        let new = BackendState::parse(text).ok_or_else(|| {
            ApiError::invalid(
                "invalid_state",
                format!("<backend> `state` is `{text}`; use active, draining or down"),
            )
        })?;
        state.directory.store().set_backend_state(name, new).await?;
        tracing::info!(backend = %name, from = current.state.as_str(), to = new.as_str(), "backend state changed by API");
    }
    let updated = record(state, name).await?;
    let mut w = Writer::document("backends", &[]);
    write_backend(state, &mut w, &updated);
    Ok(xml_response(StatusCode::OK, w.finish()))
}

pub async fn delete(state: &ApiState, name: &str) -> Result<ApiResponse, ApiError> {
    if managed(state, name) == "config" {
        return Err(ApiError::conflict(
            "managed_by_config",
            format!(
                "backend `{name}` is in the config file: drain it, move its mailboxes, then remove its [[backend]] and restart"
            ),
        ));
    }
    state.directory.store().remove_backend(name).await?;
    tracing::info!(backend = %name, "backend removed by API");
    Ok(no_content())
}
