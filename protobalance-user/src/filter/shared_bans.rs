//! Bans shared by the nodes of one edge through the PostgreSQL directory.
//!
//! A ban placed on any node — through the API or by the reputation engine — is written into
//! the kernel ban map there (as before) and, with [`SharedBans::publish`], into the `bans`
//! table with its end as a Unix time. The table's trigger announces the target on the
//! `protobalance_ban` channel; every node's [`SharedBans::run`] reads that row and writes
//! the ban into its own kernel map with the time that is left, or lifts it when the row is
//! gone (lifted, or expired and swept). After a lost connection a node reads every
//! unexpired ban again. The expiry is the same instant on every node, give or take their
//! clocks' difference.
//!
//! Bans placed offline with `protobalance filter ban` (pinned maps, no server) stay local.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

use crate::{
    directory::{
        Directory, Store,
        postgres::{BanRecord, PostgresDirectory},
    },
    filter::xdp::{BanMaps, BanMode, BanTarget},
};

/// How often this node deletes ended bans from the table (every node does; deleting is
/// idempotent).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

const fn mode_name(mode: BanMode) -> &'static str {
    match mode {
        BanMode::All => "all",
        BanMode::NewConnections => "new-connections",
    }
}

pub struct SharedBans {
    store: PostgresDirectory,
    directory: Arc<Directory<Store>>,
    /// This node's kernel bans; `None` without a loaded filter (it still publishes).
    maps: Option<Arc<Mutex<BanMaps>>>,
    node: String,
    /// Targets this node banned because the table said so: a resync lifts those the
    /// table no longer has (bans placed only here, e.g. offline, are left alone).
    applied: Mutex<std::collections::HashSet<String>>,
}

impl SharedBans {
    /// `None` unless the directory is shared (PostgreSQL).
    pub fn new(
        directory: &Arc<Directory<Store>>,
        maps: Option<Arc<Mutex<BanMaps>>>,
        node: String,
    ) -> Option<Arc<Self>> {
        match directory.store() {
            Store::Postgres(store) => Some(Arc::new(Self {
                store: store.clone(),
                directory: Arc::clone(directory),
                maps,
                node,
                applied: Mutex::default(),
            })),
            Store::Sqlite(_) => None,
        }
    }

    /// Records a ban placed on this node so every node enforces it. Returns at once; a
    /// failure to record is logged (the ban holds here all the same).
    pub fn publish(&self, target: BanTarget, ttl: Duration, mode: BanMode, reason: u32) {
        let record = BanRecord {
            target: target.to_string(),
            mode: mode_name(mode).to_owned(),
            reason,
            expires_ms: now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            node: self.node.clone(),
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = store.put_ban(&record).await {
                tracing::error!(target = %record.target, %error, "ban not shared with the other nodes: the directory refused it");
            }
        });
    }

    /// Lifts a ban on every node (this one has lifted it already).
    pub fn lift(&self, target: BanTarget) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = store.remove_ban(&target.to_string()).await {
                tracing::error!(%target, %error, "ban lift not shared with the other nodes");
            }
        });
    }

    /// Applies changes announced by the directory to this node's kernel map, and sweeps
    /// ended bans from the table, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            let (targets, all) = tokio::select! {
                () = shutdown.cancelled() => return,
                changes = self.directory.ban_changes().next() => changes,
                _ = sweep.tick() => {
                    match self.store.remove_expired_bans(now_ms()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(bans = n, "ended shared bans removed"),
                        Err(error) => tracing::warn!(%error, "sweeping ended shared bans"),
                    }
                    continue;
                }
            };
            if let Err(error) = self.apply(&targets, all).await {
                tracing::warn!(%error, "shared bans not applied; reading them all again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.directory.ban_changes().resync();
            }
        }
    }

    /// Makes the kernel map agree with the table for `targets` (or every stored ban).
    async fn apply(
        &self,
        targets: &[String],
        all: bool,
    ) -> Result<(), crate::directory::DirectoryError> {
        let Some(maps) = &self.maps else {
            return Ok(());
        };
        let now = now_ms();
        let records = self.store.bans((!all).then_some(targets), now).await?;
        let mut maps = maps.lock().unwrap_or_else(PoisonError::into_inner);
        let mut from_table = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        let mut applied = 0usize;
        for record in &records {
            let Ok(target) = BanTarget::parse(&record.target) else {
                tracing::warn!(target = %record.target, "shared ban with an unreadable target ignored");
                continue;
            };
            let mode = if record.mode == "new-connections" {
                BanMode::NewConnections
            } else {
                BanMode::All
            };
            let left =
                Duration::from_millis(record.expires_ms.saturating_sub(now).max(0).unsigned_abs());
            match maps.ban(target, left, mode, record.reason) {
                Ok(()) => {
                    applied += 1;
                    from_table.insert(record.target.clone());
                }
                Err(error) => tracing::error!(%target, %error, "shared ban: kernel ban map failed"),
            }
        }
        // A target announced but not (or no longer) stored: lifted or ended everywhere. On
        // a resync: every target the table gave us that it no longer has.
        let mut lifted = 0usize;
        let stale: Vec<String> = if all {
            from_table
                .iter()
                .filter(|t| !records.iter().any(|r| &r.target == *t))
                .cloned()
                .collect()
        } else {
            targets.to_vec()
        };
        {
            for text in &stale {
                if records.iter().any(|r| &r.target == text) {
                    continue;
                }
                from_table.remove(text);
                if let Ok(target) = BanTarget::parse(text) {
                    match maps.unban(target) {
                        Ok(()) => lifted += 1,
                        Err(error) => {
                            tracing::error!(%target, %error, "shared ban lift: kernel ban map failed")
                        }
                    }
                }
            }
        }
        tracing::debug!(applied, lifted, all, "shared bans applied");
        Ok(())
    }
}
