//! The XML management API (`/api/v1/…` on the admin listener): what accounting, CRM and
//! admin software drive the cluster with. Every document is in the namespace
//! [`xml::NS`] and described by `docs/api.xsd`; `docs/api.md` lists the resources.
//!
//! * Auth: `Authorization: Bearer <token>` with a token from `[[api.token]]`; each is
//!   read-only or read-write. Without a valid one: `401`, nothing changed. A read-only
//!   token on a change: `403`.
//! * Errors: an `<error code="…" status="…"><message>…</message></error>` document with a
//!   stable `code` and a message naming the bad element or value.
//! * Every request is audited in the log (target `protobalance::audit`): token name,
//!   method, path, status.
//! * Changes go to the directory store (durable, live at once).

mod backends;
mod bans;
pub mod blocklist;
mod domains;
mod jobs;
mod mailboxes;
mod moves;
mod reputation;
mod stats;
mod suspensions;
pub mod xml;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use prometheus::Registry;

use crate::{
    backend::BackendPool,
    config::{ApiAccess, Config},
    directory::{Directory, DirectoryError, Store},
    secret::Secret,
};
use xml::{Writer, XmlError};

/// The path prefix of the API.
pub const PREFIX: &str = "/api/v1/";

/// A configured token.
pub struct Token {
    pub name: String,
    pub secret: Secret<String>,
    pub access: ApiAccess,
}

/// What the API serves from.
pub struct ApiState {
    pub tokens: Vec<Token>,
    pub directory: Arc<Directory<Store>>,
    /// The backend pool (health), when mail listeners run.
    pub pool: Option<Arc<BackendPool>>,
    /// Backend and domain names the config file defines: their config-owned settings are
    /// changed in the file, not through the API.
    pub config_backends: Vec<String>,
    pub config_domains: Vec<String>,
    pub registry: Registry,
    /// The kernel filter's ban maps, when the filter is loaded.
    pub bans: Option<Arc<std::sync::Mutex<crate::filter::xdp::BanMaps>>>,
    /// Bans placed or lifted here reach the other nodes (PostgreSQL directory).
    pub shared_bans: Option<Arc<crate::filter::shared_bans::SharedBans>>,
    /// The blocklists (config and API), when the filter is loaded.
    pub blocklist: Option<Arc<blocklist::BlocklistManager>>,
    /// The proxy (reputation engine, submission limits), when mail listeners run.
    pub proxy: Option<Arc<crate::proxy::ProxyContext>>,
    /// The kernel filter, for `reputation/{address}`'s view of the kernel's verdict.
    pub filter: Option<Arc<std::sync::Mutex<crate::filter::xdp::XdpFilter>>>,
    /// `POST reload` (when the server runs from a config file).
    pub reloader: Option<Arc<crate::reload::Reloader>>,
    /// Mailbox moves (`[moves]`), when mail listeners run.
    pub mover: Option<Arc<crate::moves::Mover>>,
    pub max_body_octets: u64,
    pub max_import_octets: u64,
}

impl ApiState {
    /// The API's state for `config`: tokens read from their files.
    pub fn new(
        config: &Config,
        directory: Arc<Directory<Store>>,
        pool: Option<Arc<BackendPool>>,
        bans: Option<Arc<std::sync::Mutex<crate::filter::xdp::BanMaps>>>,
        blocklist: Option<Arc<blocklist::BlocklistManager>>,
        registry: Registry,
    ) -> Result<Self, String> {
        let tokens = config
            .api
            .tokens
            .iter()
            .map(|t| {
                Ok(Token {
                    name: t.name.clone(),
                    secret: Secret::new(t.secret()?),
                    access: t.access,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            tokens,
            directory,
            pool,
            config_backends: config.backends.iter().map(|b| b.name.clone()).collect(),
            config_domains: config.domains.iter().map(|d| d.name.clone()).collect(),
            registry,
            bans,
            shared_bans: None,
            blocklist,
            proxy: None,
            filter: None,
            reloader: None,
            mover: None,
            max_body_octets: config.api.max_body_octets,
            max_import_octets: config.api.max_import_octets,
        })
    }
}

impl ApiState {
    #[must_use]
    pub fn with_mover(mut self, mover: Option<Arc<crate::moves::Mover>>) -> Self {
        self.mover = mover;
        self
    }

    #[must_use]
    pub fn with_reloader(mut self, reloader: Arc<crate::reload::Reloader>) -> Self {
        self.reloader = Some(reloader);
        self
    }

    #[must_use]
    pub fn with_filter(
        mut self,
        filter: Option<Arc<std::sync::Mutex<crate::filter::xdp::XdpFilter>>>,
    ) -> Self {
        self.filter = filter;
        self
    }

    #[must_use]
    pub fn with_proxy(mut self, proxy: Option<Arc<crate::proxy::ProxyContext>>) -> Self {
        self.proxy = proxy;
        self
    }

    #[must_use]
    pub fn with_shared_bans(
        mut self,
        shared: Option<Arc<crate::filter::shared_bans::SharedBans>>,
    ) -> Self {
        self.shared_bans = shared;
        self
    }
}

pub type ApiResponse = Response<Full<Bytes>>;

/// `POST reload`: what SIGHUP does, answered with the outcome.
async fn reload(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let reloader = state.reloader.as_ref().ok_or_else(|| {
        ApiError::conflict(
            "reload_unavailable",
            "this server was not started from a config file",
        )
    })?;
    match reloader.reload().await {
        Ok(later) => {
            let later = later.join(" ");
            let w = Writer::document(
                "reload",
                &[("result", "applied"), ("restart-needed", &later)],
            );
            Ok(xml_response(StatusCode::OK, w.finish()))
        }
        Err(crate::reload::Refused::Invalid(message)) => {
            Err(ApiError::invalid("invalid_config", message))
        }
        Err(crate::reload::Refused::Failed(message)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "reload_failed",
            message,
        )),
    }
}

/// An API failure: HTTP status, stable code, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    fn response(&self) -> ApiResponse {
        let status = self.status.as_u16().to_string();
        let mut w = Writer::document("error", &[("code", self.code), ("status", &status)]);
        w.text("message", &self.message);
        xml_response(self.status, w.finish())
    }
}

impl From<XmlError> for ApiError {
    fn from(error: XmlError) -> Self {
        let status = match error.code {
            "body_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, error.code, error.message)
    }
}

impl From<DirectoryError> for ApiError {
    fn from(error: DirectoryError) -> Self {
        match &error {
            DirectoryError::UnknownBackend(_) => {
                Self::invalid("unknown_backend", error.to_string())
            }
            DirectoryError::UnknownDomain(_) => Self::not_found(error.to_string()),
            DirectoryError::NoActiveBackend => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_active_backend",
                error.to_string(),
            ),
            DirectoryError::BackendExists(_) => Self::conflict("backend_exists", error.to_string()),
            DirectoryError::BackendInUse { .. } => {
                Self::conflict("backend_in_use", error.to_string())
            }
            DirectoryError::DomainInUse { .. } => {
                Self::conflict("domain_in_use", error.to_string())
            }
            DirectoryError::Store(_) => {
                tracing::error!(%error, "API: directory store failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "directory_unavailable",
                    "the directory store failed; see the server log",
                )
            }
        }
    }
}

pub fn xml_response(status: StatusCode, body: String) -> ApiResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/xml; charset=utf-8"),
    );
    response
}

/// An empty `204 No Content`.
pub fn no_content() -> ApiResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// Serves one API request (`path` starts with [`PREFIX`]).
pub async fn handle(state: &ApiState, req: Request<Incoming>) -> ApiResponse {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let token = authenticate(state, &req);
    let who = token.map_or("-", |t| t.name.as_str()).to_owned();
    let result = match token {
        None => Err(unauthorized(state)),
        Some(token) if method != Method::GET && token.access != ApiAccess::ReadWrite => {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "read_only_token",
                format!(
                    "token `{}` is read-only; changes need a read-write token",
                    token.name
                ),
            ))
        }
        Some(_) => route(state, req).await,
    };
    let response = result.unwrap_or_else(|error| error.response());
    let status = response.status().as_u16();
    tracing::info!(target: "protobalance::audit", token = %who, %method, %path, status, "API request");
    response
}

fn unauthorized(state: &ApiState) -> ApiError {
    let message = if state.tokens.is_empty() {
        "the API has no tokens: add an [[api.token]] to the config"
    } else {
        "send `Authorization: Bearer <token>` with a configured API token"
    };
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// The token the request carries, compared in constant time against each configured one.
fn authenticate<'a>(state: &'a ApiState, req: &Request<Incoming>) -> Option<&'a Token> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))?
        .1
        .trim();
    state
        .tokens
        .iter()
        .find(|t| constant_time_eq(t.secret.expose().as_bytes(), presented.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn route(state: &ApiState, req: Request<Incoming>) -> Result<ApiResponse, ApiError> {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix(PREFIX).unwrap_or_default();
    let segments: Vec<String> = rest
        .split('/')
        .map(percent_decode)
        .collect::<Result<_, _>>()?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["mailboxes"]) => mailboxes::list(state, &query).await,
        (&Method::POST, ["mailboxes"]) => mailboxes::create(state, req.into_body()).await,
        (&Method::POST, ["mailboxes", "import"]) => {
            mailboxes::import(state, req.into_body(), &query).await
        }
        (&Method::GET, ["mailboxes", address]) => mailboxes::get(state, address).await,
        (&Method::DELETE, ["mailboxes", address]) => mailboxes::delete(state, address).await,
        (&Method::POST, ["mailboxes", address, "move"]) => {
            mailboxes::move_to(state, address, &query, req.into_body()).await
        }
        (&Method::GET, ["jobs"]) => jobs::list(state),
        (&Method::GET, ["jobs", id]) => jobs::get(state, id),
        (&Method::GET, ["moves"]) => moves::list(state).await,
        (&Method::DELETE, ["moves", address]) => moves::delete(state, address, &query).await,
        (&Method::GET, ["domains"]) => domains::list(state).await,
        (&Method::POST, ["domains"]) => domains::create(state, req.into_body()).await,
        (&Method::PUT, ["domains", name]) => domains::update(state, name, req.into_body()).await,
        (&Method::DELETE, ["domains", name]) => domains::delete(state, name).await,
        (&Method::GET, ["backends"]) => backends::list(state).await,
        (&Method::POST, ["backends"]) => backends::create(state, req.into_body()).await,
        (&Method::PUT, ["backends", name]) => backends::update(state, name, req.into_body()).await,
        (&Method::DELETE, ["backends", name]) => backends::delete(state, name).await,
        (&Method::GET, ["stats"]) => Ok(stats::get(state).await),
        (&Method::GET, ["blocklist"]) => blocklist::lists(state).await,
        (&Method::GET, ["blocklist", list]) => blocklist::show(state, list).await,
        (&Method::POST, ["blocklist", list]) => blocklist::add(state, list, req.into_body()).await,
        (&Method::PUT, ["blocklist", list]) => {
            blocklist::replace(state, list, req.into_body()).await
        }
        (&Method::DELETE, ["blocklist", list]) => blocklist::remove(state, list, None).await,
        (&Method::DELETE, ["blocklist", list, cidr]) => {
            blocklist::remove(state, list, Some(cidr)).await
        }
        (&Method::GET, ["bans"]) => bans::list(state).await,
        (&Method::POST, ["bans"]) => bans::create(state, req.into_body()).await,
        (&Method::DELETE, ["bans", target]) => bans::delete(state, target).await,
        (&Method::GET, ["reputation", address]) => reputation::get(state, address, &query).await,
        (&Method::DELETE, ["reputation", address]) => reputation::delete(state, address).await,
        (&Method::POST, ["reload"]) => reload(state).await,
        (&Method::GET, ["suspensions"]) => suspensions::list(state),
        (&Method::POST, ["suspensions"]) => suspensions::create(state, req.into_body()).await,
        (&Method::DELETE, ["suspensions", account]) => suspensions::delete(state, account).await,
        (
            _,
            [
                "mailboxes" | "domains" | "backends" | "stats" | "bans" | "blocklist"
                | "reputation" | "suspensions" | "reload" | "jobs" | "moves",
                ..,
            ],
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not defined for {path}; see docs/api.md"),
        )),
        _ => Err(ApiError::not_found(format!(
            "no resource {path}; the API has {PREFIX}mailboxes, domains, backends, jobs, moves, blocklist, bans, reputation, suspensions, reload and stats"
        ))),
    }
}

/// `%XX` decoding of one path segment (addresses may contain `+`, `%40`, …).
fn percent_decode(segment: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_path",
            format!("bad %-escape in `{segment}`"),
        )
    };
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// The value of `key` in a query string (`a=1&b=2`), %-decoded.
pub fn query_param(query: &str, key: &str) -> Result<Option<String>, ApiError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == key {
            return percent_decode(&v.replace('+', " ")).map(Some);
        }
    }
    Ok(None)
}

/// Refuses query parameters other than `allowed`.
pub fn only_params(query: &str, allowed: &[&str]) -> Result<(), ApiError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !allowed.contains(&key) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_parameter",
                format!(
                    "unknown query parameter `{key}`; allowed: {}",
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_queries_decode() {
        assert_eq!(percent_decode("a%40b.com").expect("ok"), "a@b.com");
        assert_eq!(percent_decode("a+b@x").expect("ok"), "a+b@x");
        assert!(percent_decode("a%4").is_err());
        assert!(percent_decode("%ff%fe").is_err(), "not UTF-8");
        let q = "domain=example.com&limit=10&after=a%2Bb%40example.com";
        assert_eq!(query_param(q, "limit").expect("ok").as_deref(), Some("10"));
        assert_eq!(
            query_param(q, "after").expect("ok").as_deref(),
            Some("a+b@example.com")
        );
        assert_eq!(query_param(q, "backend").expect("ok"), None);
        assert!(only_params(q, &["domain", "limit", "after"]).is_ok());
        let error = only_params(q, &["domain"]).expect_err("unknown");
        assert!(error.message.contains("`limit`"));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
