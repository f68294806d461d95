//! `/api/v1/blocklist`: named blocklists in the kernel filter. The config file's lists
//! (`xdp.blocklist`, each of `xdp.blocklist_files`) are listed read-only; lists made
//! through the API hold entries with a reason and an optional expiry, kept in the
//! directory store (so they survive restarts) and written into the kernel tries.
//!
//! Every change rewrites the kernel's lists from the config's plus the stored ones with
//! [`XdpFilter::replace_named_lists`], which publishes the whole new set of lists as one
//! new generation of the kernel's rule tables: a packet meets the old lists or the new
//! ones, never a mix (see `filter::xdp::generations`). Expired entries are removed
//! by [`BlocklistManager::sweep`] every few seconds.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper::{StatusCode, body::Incoming};
use tokio_util::sync::CancellationToken;

use super::{
    ApiError, ApiResponse, ApiState, no_content,
    xml::{Item, Parser, Writer, collect_small},
    xml_response,
};
use crate::{
    directory::{BlockRecord, Directory, MailboxDirectory as _, Store},
    filter::{blocklist::NamedList, cidr::Cidr, xdp::XdpFilter},
};

/// Longest lifetime of an entry: ten years.
const MAX_TTL: u64 = 10 * 365 * 24 * 3600;
/// Entries in one `PUT` of a whole list.
const MAX_LIST: usize = 1_000_000;
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The kernel filter and the stored API lists, kept in step.
pub struct BlocklistManager {
    directory: Arc<Directory<Store>>,
    filter: Arc<Mutex<XdpFilter>>,
    /// The config file's lists, first the inline one: they head every rewrite. Replaced
    /// when the config is reloaded.
    config_lists: Mutex<Vec<NamedList>>,
    /// One rewrite at a time, so a slower one cannot write older lists over a newer one.
    applying: tokio::sync::Mutex<()>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl BlocklistManager {
    pub fn new(
        directory: Arc<Directory<Store>>,
        filter: Arc<Mutex<XdpFilter>>,
        config_lists: Vec<NamedList>,
    ) -> Self {
        Self {
            directory,
            filter,
            config_lists: Mutex::new(config_lists),
            applying: tokio::sync::Mutex::new(()),
        }
    }

    /// The config file's lists now.
    pub fn config_lists(&self) -> Vec<NamedList> {
        self.config_lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A reloaded config's lists: stored, then written into the kernel with the API's.
    pub async fn set_config_lists(&self, lists: Vec<NamedList>) -> Result<(), ApiError> {
        *self
            .config_lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = lists;
        self.apply().await
    }

    /// The stored lists as the kernel needs them (unexpired entries, by list name).
    async fn api_lists(&self) -> Result<BTreeMap<String, Vec<BlockRecord>>, ApiError> {
        Ok(stored_lists(&self.directory).await?)
    }

    /// Rewrites the kernel's lists: the config's, then every stored one.
    pub async fn apply(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.applying.lock().await;
        let mut lists = self.config_lists();
        lists.extend(kernel_lists(self.api_lists().await?));
        let mut filter = self
            .filter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        filter.replace_named_lists(&lists).map_err(|error| {
            tracing::error!(%error, "API: writing the kernel blocklists failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "filter_error",
                "writing the kernel blocklists failed; see the server log",
            )
        })?;
        Ok(())
    }

    /// Removes expired entries every few seconds, and applies changes other nodes made to
    /// a shared store as they are announced, until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.directory.blocklist_changed().notified() => {
                    // Another node changed the shared lists (PostgreSQL directory).
                    if let Err(error) = self.apply().await {
                        tracing::warn!(?error, "applying blocklist changes made on another node");
                    }
                    continue;
                }
                _ = ticker.tick() => {}
            }
            match self.directory.store().remove_expired_blocks(now()).await {
                Ok(expired) if expired.is_empty() => {}
                Ok(expired) => {
                    tracing::info!(count = expired.len(), "blocklist entries expired");
                    if let Err(error) = self.apply().await {
                        tracing::warn!(
                            ?error,
                            "removing expired blocklist entries from the kernel"
                        );
                    }
                }
                Err(error) => tracing::warn!(%error, "blocklist expiry sweep failed"),
            }
        }
    }

    fn is_config_list(&self, name: &str) -> bool {
        self.config_lists().iter().any(|l| l.name == name)
    }
}

/// The unexpired entries added through the API, by list name.
pub async fn stored_lists(
    directory: &Directory<Store>,
) -> Result<BTreeMap<String, Vec<BlockRecord>>, crate::directory::DirectoryError> {
    let now = now();
    let mut lists: BTreeMap<String, Vec<BlockRecord>> = BTreeMap::new();
    for entry in directory.store().blocklist().await? {
        if entry.expires_at.is_none_or(|t| t > now) {
            lists.entry(entry.list.clone()).or_default().push(entry);
        }
    }
    Ok(lists)
}

/// Stored lists in the form the kernel filter takes them.
pub fn kernel_lists(lists: BTreeMap<String, Vec<BlockRecord>>) -> Vec<NamedList> {
    lists
        .into_iter()
        .map(|(name, entries)| NamedList {
            name,
            entries: entries
                .iter()
                .filter_map(|e| e.cidr.parse::<Cidr>().ok())
                .collect(),
        })
        .collect()
}

/// Reads and discards a request body (at most `limit` bytes, for at most 30 s).
async fn drain(mut body: Incoming, limit: u64) {
    use http_body_util::BodyExt as _;
    let mut seen = 0u64;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > limit {
                break;
            }
        }
    })
    .await;
}

fn manager(state: &ApiState) -> Result<&BlocklistManager, ApiError> {
    state.blocklist.as_deref().ok_or_else(|| {
        ApiError::conflict(
            "filter_not_loaded",
            "the kernel filter is not loaded here (no xdp.interface): blocklists need it",
        )
    })
}

fn list_name(name: &str) -> Result<&str, ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(ApiError::invalid(
            "invalid_list",
            format!("list name `{name}`: use 1-48 characters from A-Z a-z 0-9 . _ -"),
        ))
    }
}

/// An `<entry cidr [reason] [ttl-seconds]/>` as a stored record of `list`.
fn entry(list: &str, element: &super::xml::Element) -> Result<BlockRecord, ApiError> {
    element.only(&["cidr", "reason", "ttl-seconds"])?;
    let text = element.required("cidr")?;
    let cidr: Cidr = text
        .parse()
        .map_err(|e| ApiError::invalid("invalid_cidr", format!("`{text}`: {e}")))?;
    let reason = element.attr("reason").unwrap_or_default().to_owned();
    let expires_at = match element.attr("ttl-seconds") {
        None => None,
        Some(ttl) => {
            let secs = ttl
                .parse::<u64>()
                .ok()
                .filter(|t| (1..=MAX_TTL).contains(t))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "invalid_ttl",
                        format!("`ttl-seconds` is `{ttl}`: use 1..={MAX_TTL}"),
                    )
                })?;
            Some(now().saturating_add(i64::try_from(secs).unwrap_or(i64::MAX)))
        }
    };
    Ok(BlockRecord {
        list: list.to_owned(),
        cidr: cidr.to_string(),
        reason,
        expires_at,
    })
}

fn write_entry(w: &mut Writer, e: &BlockRecord) {
    let expires = e.expires_at.map(|t| t.to_string());
    let mut attributes = vec![("cidr", e.cidr.as_str())];
    if !e.reason.is_empty() {
        attributes.push(("reason", e.reason.as_str()));
    }
    if let Some(expires) = expires.as_deref() {
        attributes.push(("expires-at", expires));
    }
    w.empty("entry", &attributes);
}

/// `GET /blocklist`: every list, the config file's and the API's, with sizes.
pub async fn lists(state: &ApiState) -> Result<ApiResponse, ApiError> {
    let manager = manager(state)?;
    let mut w = Writer::document("blocklists", &[]);
    for list in &manager.config_lists() {
        let entries = list.entries.len().to_string();
        w.empty(
            "list",
            &[
                ("name", &list.name),
                ("managed-by", "config"),
                ("entries", &entries),
            ],
        );
    }
    for (name, entries) in manager.api_lists().await? {
        let entries = entries.len().to_string();
        w.empty(
            "list",
            &[
                ("name", &name),
                ("managed-by", "api"),
                ("entries", &entries),
            ],
        );
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// `GET /blocklist/{list}`: its entries.
pub async fn show(state: &ApiState, name: &str) -> Result<ApiResponse, ApiError> {
    let manager = manager(state)?;
    if let Some(list) = manager.config_lists().iter().find(|l| l.name == name) {
        let mut w = Writer::document("list", &[("name", name), ("managed-by", "config")]);
        for cidr in &list.entries {
            w.empty("entry", &[("cidr", &cidr.to_string())]);
        }
        return Ok(xml_response(StatusCode::OK, w.finish()));
    }
    let lists = manager.api_lists().await?;
    let entries = lists
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("no blocklist `{name}`")))?;
    let mut w = Writer::document("list", &[("name", name), ("managed-by", "api")]);
    for e in entries {
        write_entry(&mut w, e);
    }
    Ok(xml_response(StatusCode::OK, w.finish()))
}

fn refuse_config(manager: &BlocklistManager, name: &str) -> Result<(), ApiError> {
    if manager.is_config_list(name) {
        return Err(ApiError::conflict(
            "managed_by_config",
            format!("blocklist `{name}` comes from the config file; change it there"),
        ));
    }
    Ok(())
}

/// `POST /blocklist/{list}`: `<entry cidr="…" [reason] [ttl-seconds]/>`; makes the list
/// when it is new.
pub async fn add(state: &ApiState, name: &str, body: Incoming) -> Result<ApiResponse, ApiError> {
    let manager = manager(state)?;
    let name = list_name(name)?;
    refuse_config(manager, name)?;
    let bytes = collect_small(body, state.max_body_octets).await?;
    let element = Parser::new(&bytes[..]).single("entry").await?;
    let record = entry(name, &element)?;
    manager.directory.store().put_block(&record).await?;
    manager.apply().await?;
    tracing::info!(list = %name, cidr = %record.cidr, reason = %record.reason, expires_at = ?record.expires_at, "blocklist entry added by API");
    let mut w = Writer::document("list", &[("name", name), ("managed-by", "api")]);
    write_entry(&mut w, &record);
    Ok(xml_response(StatusCode::CREATED, w.finish()))
}

/// `PUT /blocklist/{list}`: `<list><entry …/>…</list>` becomes the whole list.
pub async fn replace(
    state: &ApiState,
    name: &str,
    body: Incoming,
) -> Result<ApiResponse, ApiError> {
    let checked = manager(state).and_then(|manager| {
        let name = list_name(name)?;
        refuse_config(manager, name)?;
        Ok((manager, name))
    });
    let (manager, name) = match checked {
        Ok(checked) => checked,
        Err(error) => {
            // The client is still streaming a list that may be a million lines long: read
            // it to the end first, or closing on unread data resets the connection and the
            // client sees a broken pipe instead of this answer.
            drain(body, state.max_import_octets).await;
            return Err(error);
        }
    };
    let mut parser = Parser::new(super::xml::BodyReader::new(body, state.max_import_octets));
    let records = match read_list(&mut parser, name).await {
        Ok(records) => records,
        Err(error) => {
            // As above: the rest of a refused upload is read before the answer goes out.
            parser.into_source().drain().await;
            return Err(error);
        }
    };
    manager
        .directory
        .store()
        .replace_block_list(name, &records)
        .await?;
    manager.apply().await?;
    tracing::info!(list = %name, entries = records.len(), "blocklist replaced by API");
    let entries = records.len().to_string();
    let w = Writer::document(
        "list",
        &[("name", name), ("managed-by", "api"), ("entries", &entries)],
    );
    Ok(xml_response(StatusCode::OK, w.finish()))
}

/// The `<list>` document of `PUT /blocklist/{list}`, entry by entry.
async fn read_list(
    parser: &mut Parser<super::xml::BodyReader>,
    name: &str,
) -> Result<Vec<BlockRecord>, ApiError> {
    let root = parser.root("list").await?;
    root.only(&["name"])?;
    let mut records = Vec::new();
    loop {
        match parser.next().await? {
            Item::Open(e) if e.name == "entry" && !e.has_children => {
                records.push(entry(name, &e)?);
                if records.len() > MAX_LIST {
                    return Err(ApiError::invalid(
                        "list_too_long",
                        format!("a list holds at most {MAX_LIST} entries"),
                    ));
                }
            }
            Item::Open(e) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unknown_element",
                    format!("<list> holds <entry/> elements only; found <{}>", e.name),
                ));
            }
            Item::Close(_) => break,
            Item::End => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_xml",
                    "no </list>",
                ));
            }
        }
    }
    parser.finish().await?;
    Ok(records)
}

/// `DELETE /blocklist/{list}/{cidr}` (the `/` of the CIDR as `%2F`), or the whole list.
pub async fn remove(
    state: &ApiState,
    name: &str,
    cidr: Option<&str>,
) -> Result<ApiResponse, ApiError> {
    let manager = manager(state)?;
    let name = list_name(name)?;
    refuse_config(manager, name)?;
    let store = manager.directory.store();
    match cidr {
        Some(text) => {
            let cidr: Cidr = text
                .parse()
                .map_err(|e| ApiError::invalid("invalid_cidr", format!("`{text}`: {e}")))?;
            if !store.remove_block(name, &cidr.to_string()).await? {
                return Err(ApiError::not_found(format!(
                    "{cidr} is not on blocklist `{name}`"
                )));
            }
            tracing::info!(list = %name, %cidr, "blocklist entry removed by API");
        }
        None => {
            if !manager.api_lists().await?.contains_key(name) {
                return Err(ApiError::not_found(format!("no blocklist `{name}`")));
            }
            store.replace_block_list(name, &[]).await?;
            tracing::info!(list = %name, "blocklist deleted by API");
        }
    }
    manager.apply().await?;
    Ok(no_content())
}
