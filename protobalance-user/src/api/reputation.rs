//! `/api/v1/reputation/{address}[?port=N]`: what the reputation engine holds against a
//! client address — score, verdict, the events that built it, the kernel bans covering it,
//! and (with the filter loaded) which kernel rule would decide a new connection from it to
//! `port` (25 by default), found by the side-effect-free probe of `filter explain` — and
//! `DELETE` to forgive it (forget the record and lift those bans). The same document
//! `protobalance explain` prints.

use std::net::IpAddr;

use hyper::StatusCode;

use super::{ApiError, ApiResponse, ApiState, no_content, xml::Writer, xml_response};
use crate::filter::{reputation::Reputation, xdp::BanMode};

fn engine(state: &ApiState) -> Result<&Reputation, ApiError> {
    state
        .proxy
        .as_deref()
        .map(|p| &*p.reputation)
        .ok_or_else(|| {
            ApiError::conflict(
                "reputation_not_running",
                "no mail listeners run here, so there is no reputation engine",
            )
        })
}

fn address(text: &str) -> Result<IpAddr, ApiError> {
    text.parse::<IpAddr>().map_err(|_| {
        ApiError::invalid(
            "invalid_address",
            format!("`{text}` is not an IP address (e.g. 198.51.100.7 or 2001:db8::7)"),
        )
    })
}

fn kernel_error(error: impl std::fmt::Display) -> ApiError {
    tracing::error!(%error, "API: kernel ban map failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "filter_error",
        "the kernel filter's ban map failed; see the server log",
    )
}

/// The kernel's verdict on a SYN from `ip` to `port`, by the probe (`None` without a
/// loaded filter).
async fn kernel_verdict(
    state: &ApiState,
    ip: IpAddr,
    port: u16,
) -> Result<Option<(bool, String)>, ApiError> {
    let Some(filter) = state.filter.clone() else {
        return Ok(None);
    };
    // Loading the probe is a few system calls and milliseconds: off the async workers.
    let explained = tokio::task::spawn_blocking(move || {
        filter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .explain(ip, port)
    })
    .await
    .map_err(|e| kernel_error(format!("explain task: {e}")))?
    .map_err(kernel_error)?;
    Ok(Some((explained.dropped(), explained.to_string())))
}

fn port(query: &str) -> Result<u16, ApiError> {
    let mut port = 25;
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if key == "port" {
            port = value
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    ApiError::invalid("invalid_port", format!("`port` is `{value}`: use 1-65535"))
                })?;
        }
    }
    Ok(port)
}

pub async fn get(state: &ApiState, text: &str, query: &str) -> Result<ApiResponse, ApiError> {
    let ip = address(text)?;
    let port = port(query)?;
    let engine = engine(state)?;
    let explained = engine.explain(ip);
    let kernel = match &state.bans {
        Some(maps) => maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .covering(ip)
            .map_err(kernel_error)?,
        None => Vec::new(),
    };
    let ip_text = ip.to_string();
    let enabled = if engine.enabled() { "true" } else { "false" };
    let mut w = match &explained {
        Some(e) => {
            let score = format!("{:.2}", e.score);
            let bans = e.bans.to_string();
            let mut attributes = vec![
                ("address", ip_text.as_str()),
                ("enabled", enabled),
                ("subject", e.subject.as_str()),
                ("tracked", "true"),
                ("score", score.as_str()),
                ("verdict", e.verdict.as_str()),
                ("allowlisted", if e.allowlisted { "true" } else { "false" }),
                ("bans", bans.as_str()),
            ];
            let banned = e.banned_for.map(|d| d.as_secs().to_string());
            if let Some(banned) = &banned {
                attributes.push(("banned-seconds", banned.as_str()));
            }
            let mut w = Writer::document("reputation", &attributes);
            for (event, count) in &e.counts {
                w.empty(
                    "event",
                    &[("name", event.as_str()), ("count", &count.to_string())],
                );
            }
            for (event, ago) in &e.recent {
                w.empty(
                    "recent",
                    &[
                        ("event", event.as_str()),
                        ("seconds-ago", &ago.as_secs().to_string()),
                    ],
                );
            }
            w
        }
        None => Writer::document(
            "reputation",
            &[
                ("address", ip_text.as_str()),
                ("enabled", enabled),
                ("tracked", "false"),
                ("score", "0.00"),
                ("verdict", "accept"),
                ("bans", "0"),
            ],
        ),
    };
    if let Some((dropped, text)) = kernel_verdict(state, ip, port).await? {
        w.empty(
            "kernel-verdict",
            &[
                ("port", &port.to_string()),
                ("action", if dropped { "drop" } else { "pass" }),
                ("explanation", &text),
            ],
        );
    }
    for ban in &kernel {
        let mode = match ban.mode {
            BanMode::All => "all",
            BanMode::NewConnections => "new-connections",
        };
        w.empty(
            "kernel-ban",
            &[
                ("target", &ban.target.to_string()),
                ("mode", mode),
                ("reason", &ban.reason.to_string()),
                ("remaining-seconds", &ban.remaining.as_secs().to_string()),
            ],
        );
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// Forgets the address and lifts the kernel bans covering it.
pub async fn delete(state: &ApiState, text: &str) -> Result<ApiResponse, ApiError> {
    let ip = address(text)?;
    let forgotten = engine(state)?.forget(ip);
    let mut lifted = 0;
    if let Some(maps) = &state.bans {
        let mut maps = maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ban in maps.covering(ip).map_err(kernel_error)? {
            maps.unban(ban.target).map_err(kernel_error)?;
            if let Some(shared) = &state.shared_bans {
                shared.lift(ban.target);
            }
            lifted += 1;
        }
    }
    if !forgotten && lifted == 0 {
        return Err(ApiError::not_found(format!(
            "nothing is held against {ip}: no score and no kernel ban"
        )));
    }
    tracing::info!(address = %ip, forgotten, kernel_bans_lifted = lifted, "reputation forgiven by API");
    Ok(no_content())
}
