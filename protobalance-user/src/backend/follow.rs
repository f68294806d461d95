//! A node of a multi-node edge follows the backends other nodes change: added or removed
//! through an API (their definitions are stored in the shared directory), drained, taken
//! down or brought back. Woken by the directory's `protobalance_backend` notification (and
//! after a reconnect, when changes may have been missed).

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::BackendPool;
use crate::{
    config::BackendConfig,
    directory::{Directory, DirectoryError, MailboxDirectory as _, Store},
};

/// Keeps `pool` in step with the directory until `shutdown`. `applied` is what the pool
/// was built with: the definitions (TOML) of the backends added at run time, by name.
pub async fn follow(
    directory: Arc<Directory<Store>>,
    pool: Arc<BackendPool>,
    mut applied: HashMap<String, String>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = directory.backends_changed().notified() => {}
        }
        if let Err(error) = sync(&directory, &pool, &mut applied).await {
            tracing::warn!(%error, "backends changed on another node were not applied; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            directory.backends_changed().notify_one();
        }
    }
}

async fn sync(
    directory: &Directory<Store>,
    pool: &BackendPool,
    applied: &mut HashMap<String, String>,
) -> Result<(), DirectoryError> {
    let store = directory.store();
    let specs = store.backend_specs().await?;
    for (name, spec) in &specs {
        if applied.get(name) == Some(spec) {
            continue;
        }
        match toml::from_str::<BackendConfig>(spec) {
            Ok(backend) => match pool.add(backend) {
                Ok(()) => {
                    tracing::info!(backend = %name, "backend added or changed on another node: in the pool");
                    applied.insert(name.clone(), spec.clone());
                }
                Err(error) => {
                    tracing::error!(backend = %name, %error, "backend from the directory not served")
                }
            },
            Err(error) => {
                tracing::error!(backend = %name, %error, "stored definition of a backend is unreadable: not served")
            }
        }
    }
    let gone: Vec<String> = applied
        .keys()
        .filter(|name| !specs.iter().any(|(n, _)| n == *name))
        .cloned()
        .collect();
    for name in gone {
        pool.remove(&name);
        applied.remove(&name);
        tracing::info!(backend = %name, "backend removed on another node: left the pool");
    }
    for record in store.backends().await? {
        pool.set_admin_state(&record.name, record.state);
    }
    Ok(())
}
