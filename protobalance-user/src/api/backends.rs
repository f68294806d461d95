//! `/api/v1/backends`: list with state, load and health; add a backend live (it is stored
//! in the directory with its definition, so it is back after a restart, and joins the
//! pool at once: the next new mailboxes may go there); drain / activate / take down;
//! change an added backend's capacity; remove a backend once it owns no mailboxes.
//! Address, ports and capacity of the config file's backends are the file's.

use hyper::{StatusCode, body::Incoming};

use super::{
    ApiError, ApiResponse, ApiState, no_content,
    xml::{Parser, Writer, collect_small},
    xml_response,
};
use crate::{
    config::{BackendConfig, validate_backend},
    directory::{BackendRecord, BackendState, MailboxDirectory as _},
};

/// The attributes of a `<backend>` that defines one, and their `[[backend]]` keys.
const DEFINITION: [(&str, &str, Kind); 10] = [
    ("name", "name", Kind::Text),
    ("address", "address", Kind::Text),
    ("capacity", "capacity", Kind::Number),
    ("pop3-port", "pop3_port", Kind::Number),
    ("imap-port", "imap_port", Kind::Number),
    ("lmtp-port", "lmtp_port", Kind::Number),
    ("delivery", "delivery", Kind::Text),
    ("smtp-port", "smtp_port", Kind::Number),
    ("submission-port", "submission_port", Kind::Number),
    ("proxy-protocol", "proxy_protocol", Kind::Flag),
];

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Number,
    Flag,
}

/// A backend definition from a `<backend>` element (plus `base`'s values for attributes
/// it leaves out), typed and checked like a `[[backend]]` section of the config file.
fn definition(
    element: &super::xml::Element,
    base: Option<&BackendConfig>,
) -> Result<BackendConfig, ApiError> {
    let mut table = match base {
        Some(base) => toml::Table::try_from(base).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?,
        None => toml::Table::new(),
    };
    for (attribute, key, kind) in DEFINITION {
        let Some(text) = element.attr(attribute) else {
            continue;
        };
        let invalid = |what: &str| {
            ApiError::invalid(
                "invalid_backend",
                format!("<backend> `{attribute}` is `{text}`: {what}"),
            )
        };
        let value = match kind {
            Kind::Text => toml::Value::String(text.to_owned()),
            Kind::Number => toml::Value::Integer(
                text.parse::<u32>()
                    .map_err(|_| invalid("use a whole number"))?
                    .into(),
            ),
            Kind::Flag => toml::Value::Boolean(
                text.parse::<bool>()
                    .map_err(|_| invalid("use true or false"))?,
            ),
        };
        table.insert(key.to_owned(), value);
    }
    let config: BackendConfig =
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                ApiError::invalid("invalid_backend", format!("<backend>: {}", e.message()))
            })?;
    validate_backend(&config)
        .map_err(|m| ApiError::invalid("invalid_backend", format!("<backend> {m}")))?;
    Ok(config)
}

fn spec(config: &BackendConfig) -> Result<String, ApiError> {
    toml::to_string(config)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// `POST /backends`: `<backend name address [capacity] [pop3-port] … [proxy-protocol]/>`.
pub async fn create(state: &ApiState, body: Incoming) -> Result<ApiResponse, ApiError> {
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("backend").await?;
    element.only(&DEFINITION.map(|(attribute, _, _)| attribute))?;
    element.required("name")?;
    element.required("address")?;
    let config = definition(&element, None)?;
    if managed(state, &config.name) == "config" {
        return Err(ApiError::conflict(
            "backend_exists",
            format!("backend `{}` is in the config file", config.name),
        ));
    }
    let store = state.directory.store();
    store
        .add_backend(&config.name, config.capacity, &spec(&config)?)
        .await?;
    // Keep the store and the pool in step: a backend the pool refused is not added.
    if let Some(pool) = &state.pool
        && let Err(error) = pool.add(config.clone())
    {
        let _ = store.remove_backend(&config.name).await;
        return Err(ApiError::invalid("invalid_backend", error.to_string()));
    }
    tracing::info!(backend = %config.name, address = %config.address, capacity = config.capacity, "backend added by API");
    let created = record(state, &config.name).await?;
    let mut w = Writer::document("backends", &[]);
    write_backend(state, &mut w, &created);
    Ok(xml_response(StatusCode::CREATED, w.finish()))
}

/// The stored definition of a backend added through the API.
async fn stored_definition(
    state: &ApiState,
    name: &str,
) -> Result<Option<BackendConfig>, ApiError> {
    let specs = state.directory.store().backend_specs().await?;
    let Some((_, text)) = specs.into_iter().find(|(n, _)| n == name) else {
        return Ok(None);
    };
    toml::from_str(&text).map(Some).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("stored definition of `{name}`: {e}"),
        )
    })
}

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
    let current = record(state, name).await?;
    if element.attr("capacity").is_some() {
        let Some(defined) = stored_definition(state, name).await? else {
            return Err(ApiError::conflict(
                "managed_by_config",
                format!(
                    "the capacity of backend `{name}` is set in the config file ([[backend]] capacity); change it there"
                ),
            ));
        };
        let mut only_capacity = element.clone();
        only_capacity.attributes.retain(|(n, _)| n == "capacity");
        let updated = definition(&only_capacity, Some(&defined))?;
        let store = state.directory.store();
        store
            .update_backend_spec(name, updated.capacity, &spec(&updated)?)
            .await?;
        if let Some(pool) = &state.pool {
            pool.add(updated.clone())
                .map_err(|e| ApiError::invalid("invalid_backend", e.to_string()))?;
        }
        tracing::info!(backend = %name, capacity = updated.capacity, "backend capacity changed by API");
    }
    if let Some(text) = element.attr("state") {
        let new = BackendState::parse(text).ok_or_else(|| {
            ApiError::invalid(
                "invalid_state",
                format!("<backend> `state` is `{text}`; use active, draining or down"),
            )
        })?;
        state.directory.store().set_backend_state(name, new).await?;
        if let Some(pool) = &state.pool {
            pool.set_admin_state(name, new);
        }
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
    if let Some(pool) = &state.pool {
        pool.remove(name);
    }
    tracing::info!(backend = %name, "backend removed by API");
    Ok(no_content())
}
