//! `/api/v1/bans`: timed bans in the kernel filter (an address, or an IPv6 /64), the same
//! maps `protobalance filter ban` and the abuse engine write. They live in the kernel maps:
//! with `xdp.pin_dir` they survive a restart of protobalance. Without a loaded filter
//! (no `xdp.interface`) the resource answers `409 filter_not_loaded`.

use std::time::Duration;

use hyper::{StatusCode, body::Incoming};

use super::{
    ApiError, ApiResponse, ApiState, no_content,
    xml::{Parser, Writer, collect_small},
    xml_response,
};
use crate::filter::xdp::{BanMode, BanTarget};

/// Longest ban the API places: a year.
const MAX_TTL: u64 = 365 * 24 * 3600;

fn maps(state: &ApiState) -> Result<&std::sync::Mutex<crate::filter::xdp::BanMaps>, ApiError> {
    state.bans.as_deref().ok_or_else(|| {
        ApiError::conflict(
            "filter_not_loaded",
            "the kernel filter is not loaded here (no xdp.interface): bans need it",
        )
    })
}

fn target(text: &str) -> Result<BanTarget, ApiError> {
    BanTarget::parse(text).map_err(|m| ApiError::invalid("invalid_target", m))
}

const fn mode_name(mode: BanMode) -> &'static str {
    match mode {
        BanMode::All => "all",
        BanMode::NewConnections => "new-connections",
    }
}

fn xdp_error(error: impl std::fmt::Display) -> ApiError {
    tracing::error!(%error, "API: kernel ban map failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "filter_error",
        "the kernel filter's ban map failed; see the server log",
    )
}

pub async fn list(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let bans = maps(state)?
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .list()
        .map_err(xdp_error)?;
    let mut w = Writer::document("bans", &[]);
    for ban in bans.iter().filter(|b| !b.remaining.is_zero()) {
        let target = ban.target.to_string();
        let reason = ban.reason.to_string();
        let remaining = ban.remaining.as_secs().to_string();
        w.empty(
            "ban",
            &[
                ("target", &target),
                ("mode", mode_name(ban.mode)),
                ("reason", &reason),
                ("remaining-seconds", &remaining),
            ],
        );
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// `<ban target="198.51.100.7" ttl-seconds="3600" [mode="all|new-connections"] [reason="N"]/>`.
pub async fn create(state: &ApiState, body: Incoming) -> Result<ApiResponse, ApiError> {
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("ban").await?;
    element.only(&["target", "ttl-seconds", "mode", "reason"])?;
    let target = target(element.required("target")?)?;
    let ttl_text = element.required("ttl-seconds")?;
    let ttl = ttl_text
        .parse::<u64>()
        .ok()
        .filter(|t| (1..=MAX_TTL).contains(t))
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid_ttl",
                format!("`ttl-seconds` is `{ttl_text}`: use 1..={MAX_TTL}"),
            )
        })?;
    let mode = match element.attr("mode").unwrap_or("all") {
        "all" => BanMode::All,
        "new-connections" => BanMode::NewConnections,
        other => {
            return Err(ApiError::invalid(
                "invalid_mode",
                format!("`mode` is `{other}`: use all or new-connections"),
            ));
        }
    };
    let reason = match element.attr("reason") {
        None => 0,
        Some(text) => text.parse::<u32>().map_err(|_| {
            ApiError::invalid(
                "invalid_reason",
                format!("`reason` is `{text}`: use a number"),
            )
        })?,
    };
    maps(state)?
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .ban(target, Duration::from_secs(ttl), mode, reason)
        .map_err(xdp_error)?;
    if let Some(shared) = &state.shared_bans {
        shared.publish(target, Duration::from_secs(ttl), mode, reason);
    }
    tracing::info!(%target, ttl, mode = mode_name(mode), reason, "ban placed by API");
    let target = target.to_string();
    let (reason, ttl) = (reason.to_string(), ttl.to_string());
    let w = Writer::document(
        "ban",
        &[
            ("target", &target),
            ("mode", mode_name(mode)),
            ("reason", &reason),
            ("remaining-seconds", &ttl),
        ],
    );
    Ok(xml_response(StatusCode::CREATED, w.finish()))
}

pub async fn delete(state: &ApiState, text: &str) -> Result<ApiResponse, ApiError> {
    let target = target(text)?;
    let maps = maps(state)?;
    let mut maps = maps
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let present = maps
        .list()
        .map_err(xdp_error)?
        .iter()
        .any(|b| b.target == target && !b.remaining.is_zero());
    if !present {
        return Err(ApiError::not_found(format!("no ban of {target}")));
    }
    maps.unban(target).map_err(xdp_error)?;
    if let Some(shared) = &state.shared_bans {
        shared.lift(target);
    }
    tracing::info!(%target, "ban lifted by API");
    Ok(no_content())
}
