//! `/api/v1/domains`: list, create, change the unknown-mailbox policy, delete. Domains the
//! config file lists are managed there (`[[domain]]` is applied at every start): the API
//! refuses to change or delete them rather than have a restart undo the change.

use hyper::{StatusCode, body::Incoming};

use super::{
    ApiError, ApiResponse, ApiState, no_content,
    xml::{Element, Parser, Writer, collect_small},
    xml_response,
};
use crate::directory::{DomainPolicy, MailboxDirectory as _};

fn domain_name(state: &ApiState, name: &str) -> Result<String, ApiError> {
    state.directory.normalizer().domain(name).ok_or_else(|| {
        ApiError::invalid("invalid_domain", format!("`{name}` is not a domain name"))
    })
}

fn policy(element: &Element) -> Result<Option<DomainPolicy>, ApiError> {
    element
        .attr("unknown-mailbox")
        .map(|p| {
            DomainPolicy::parse(p).ok_or_else(|| {
                ApiError::invalid(
                    "invalid_policy",
                    format!("<domain> `unknown-mailbox` is `{p}`; use reject or auto-provision"),
                )
            })
        })
        .transpose()
}

fn managed(state: &ApiState, name: &str) -> &'static str {
    if state.config_domains.iter().any(|d| d == name) {
        "config"
    } else {
        "api"
    }
}

fn refuse_config_managed(state: &ApiState, name: &str) -> Result<(), ApiError> {
    if managed(state, name) == "config" {
        return Err(ApiError::conflict(
            "managed_by_config",
            format!("domain {name} is defined in the config file ([[domain]]); change it there"),
        ));
    }
    Ok(())
}

pub async fn list(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let domains = state.directory.store().domains().await?;
    let mut w = Writer::document("domains", &[]);
    for d in &domains {
        let mailboxes = d.mailboxes.to_string();
        w.empty(
            "domain",
            &[
                ("name", &d.name),
                ("unknown-mailbox", d.policy.as_str()),
                ("mailboxes", &mailboxes),
                ("managed-by", managed(state, &d.name)),
            ],
        );
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

fn one(state: &ApiState, name: &str, policy: DomainPolicy, mailboxes: u64) -> String {
    let mailboxes = mailboxes.to_string();
    Writer::document(
        "domain",
        &[
            ("name", name),
            ("unknown-mailbox", policy.as_str()),
            ("mailboxes", &mailboxes),
            ("managed-by", managed(state, name)),
        ],
    )
    .finish()
}

pub async fn create(state: &ApiState, body: Incoming) -> Result<ApiResponse, ApiError> {
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("domain").await?;
    element.only(&["name", "unknown-mailbox"])?;
    let name = domain_name(state, element.required("name")?)?;
    let policy = policy(&element)?.unwrap_or_default();
    let store = state.directory.store();
    if store.domain_policy(&name).await?.is_some() {
        return Err(ApiError::conflict(
            "domain_exists",
            format!("domain {name} exists"),
        ));
    }
    store.upsert_domain(&name, policy).await?;
    tracing::info!(domain = %name, policy = policy.as_str(), "domain created by API");
    Ok(xml_response(
        StatusCode::CREATED,
        one(state, &name, policy, 0),
    ))
}

pub async fn update(state: &ApiState, name: &str, body: Incoming) -> Result<ApiResponse, ApiError> {
    let name = domain_name(state, name)?;
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("domain").await?;
    element.only(&["name", "unknown-mailbox"])?;
    if element.attr("name").is_some_and(|n| n != name) {
        return Err(ApiError::invalid(
            "name_mismatch",
            "the body's `name` differs from the path; domains cannot be renamed",
        ));
    }
    refuse_config_managed(state, &name)?;
    let store = state.directory.store();
    let Some(record) = store.domains().await?.into_iter().find(|d| d.name == name) else {
        return Err(ApiError::not_found(format!("no domain {name}")));
    };
    let policy = policy(&element)?.unwrap_or(record.policy);
    store.upsert_domain(&name, policy).await?;
    tracing::info!(domain = %name, policy = policy.as_str(), "domain changed by API");
    Ok(xml_response(
        StatusCode::OK,
        one(state, &name, policy, record.mailboxes),
    ))
}

pub async fn delete(state: &ApiState, name: &str) -> Result<ApiResponse, ApiError> {
    let name = domain_name(state, name)?;
    refuse_config_managed(state, &name)?;
    state.directory.store().delete_domain(&name).await?;
    tracing::info!(domain = %name, "domain deleted by API");
    Ok(no_content())
}
