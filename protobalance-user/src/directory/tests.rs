//! Directory behaviour against the real SQLite store (in a temp file).

use std::{io::Cursor, num::NonZeroUsize, sync::Arc};

use super::{
    BackendState, Directory, DomainPolicy, MailboxDirectory as _, Normalizer, Route,
    import::{ImportError, import},
    sqlite::SqliteDirectory,
};

fn store() -> (SqliteDirectory, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteDirectory::open(&dir.path().join("directory.db")).expect("open");
    (store, dir)
}

async fn with_backends(store: &SqliteDirectory, backends: &[(&str, u32)]) {
    for (name, capacity) in backends {
        store
            .upsert_backend(name, *capacity)
            .await
            .expect("backend");
    }
    store
        .upsert_domain("example.com", DomainPolicy::AutoProvision)
        .await
        .expect("domain");
    store
        .upsert_domain("strict.example", DomainPolicy::Reject)
        .await
        .expect("domain");
}

fn directory(store: SqliteDirectory) -> Directory<SqliteDirectory> {
    Directory::new(
        store,
        Normalizer::default(),
        NonZeroUsize::new(1000).expect("nonzero"),
    )
}

fn counts(backends: &[super::BackendRecord]) -> Vec<(String, u64)> {
    backends
        .iter()
        .map(|b| (b.name.clone(), b.mailboxes))
        .collect()
}

#[tokio::test]
async fn assign_apportions_by_capacity_deterministically() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 2), ("b3", 1)]).await;
    let dir = directory(store);
    let mut first = Vec::new();
    for i in 0..400 {
        match dir
            .route(&format!("user{i}@example.com"))
            .await
            .expect("store")
            .expect("address")
        {
            Route::Owner { backend, .. } => first.push(backend),
            other => panic!("auto-provision expected, got {other:?}"),
        }
    }
    let backends = dir.store().backends().await.expect("backends");
    assert_eq!(
        counts(&backends),
        [("b1".into(), 100), ("b2".into(), 200), ("b3".into(), 100)]
    );
    // Ties go to the smallest name: the very first mailbox lands on b1.
    assert_eq!(first[0], "b1");
}

#[tokio::test]
async fn draining_and_down_backends_get_no_new_mailboxes_but_keep_theirs() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1)]).await;
    let owner = store
        .assign(&mb("early@example.com"))
        .await
        .expect("assign");
    assert_eq!(owner, "b1");
    store
        .set_backend_state("b1", BackendState::Draining)
        .await
        .expect("state");
    for i in 0..10 {
        assert_eq!(
            store
                .assign(&mb(&format!("n{i}@example.com")))
                .await
                .expect("assign"),
            "b2"
        );
    }
    assert_eq!(
        store
            .assign(&mb("early@example.com"))
            .await
            .expect("assign"),
        "b1",
        "existing owner kept"
    );
    store
        .set_backend_state("b2", BackendState::Down)
        .await
        .expect("state");
    assert!(matches!(
        store.assign(&mb("late@example.com")).await,
        Err(super::DirectoryError::NoActiveBackend)
    ));
    assert!(matches!(
        store.set_backend_state("nope", BackendState::Down).await,
        Err(super::DirectoryError::UnknownBackend(_))
    ));
}

#[tokio::test]
async fn route_applies_normalization_and_domain_policy() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1)]).await;
    let dir = directory(store);
    let owner = |r: Route| match r {
        Route::Owner { backend, .. } => backend,
        other => panic!("owner expected, got {other:?}"),
    };
    let a = owner(
        dir.route("User@Example.COM")
            .await
            .expect("store")
            .expect("addr"),
    );
    let b = owner(
        dir.route("user+news@example.com")
            .await
            .expect("store")
            .expect("addr"),
    );
    let c = owner(
        dir.route("user@example.com")
            .await
            .expect("store")
            .expect("addr"),
    );
    assert_eq!((a.as_str(), b.as_str()), (c.as_str(), c.as_str()));
    assert!(matches!(
        dir.route("x@strict.example").await.expect("store"),
        Ok(Route::UnknownMailbox(_))
    ));
    assert!(matches!(
        dir.route("x@elsewhere.example").await.expect("store"),
        Ok(Route::ForeignDomain(_))
    ));
    assert!(
        dir.route("x%y@example.com").await.expect("store").is_err(),
        "routing form refused"
    );
    let hits = dir
        .cache_stats()
        .hits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(hits, 2, "second and third lookups were cache hits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_deliveries_agree_on_one_owner() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1), ("b3", 1)]).await;
    store.assign(&mb("warm@example.com")).await.expect("assign"); // b1 now fuller
    let store = Arc::new(store);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.assign(&mb("race@example.com")).await })
        })
        .collect();
    let mut owners = Vec::new();
    for task in tasks {
        owners.push(task.await.expect("join").expect("assign"));
    }
    owners.dedup();
    assert_eq!(owners.len(), 1, "one owner for all: {owners:?}");
    let total: u64 = store
        .backends()
        .await
        .expect("backends")
        .iter()
        .map(|b| b.mailboxes)
        .sum();
    assert_eq!(total, 2, "counted once");
}

#[tokio::test]
async fn import_apportions_pins_and_reports_conflicts() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1), ("b3", 2)]).await;
    store
        .assign(&mb("already@example.com"))
        .await
        .expect("assign");
    let mut file = String::from(
        "# provisioning batch\n\nAlready@example.com\nalready@example.com,b3\npinned@example.com,b2\n",
    );
    for i in 0..1000 {
        file.push_str(&format!("bulk{i}@Example.com\n"));
    }
    let mut calls = 0;
    let report = import(
        &store,
        &Normalizer::default(),
        Cursor::new(file),
        100,
        |_| calls += 1,
    )
    .expect("import");
    assert_eq!(report.added, 1001);
    assert_eq!(report.unchanged, 1);
    assert_eq!(report.conflicts, ["already@example.com"]);
    assert!(calls >= 10, "progress reported");
    let backends = store.backends().await.expect("backends");
    // 1002 mailboxes over capacities 1:1:2 -> b1 251 (incl. `already`), b2 251 (incl. pinned), b3 500.
    assert_eq!(
        counts(&backends),
        [("b1".into(), 251), ("b2".into(), 251), ("b3".into(), 500)]
    );
    assert_eq!(
        store
            .owner_of(&mb("pinned@example.com"))
            .await
            .expect("owner")
            .as_deref(),
        Some("b2")
    );
}

#[tokio::test]
async fn import_is_all_or_nothing_and_names_the_bad_line() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1)]).await;
    let file = "ok1@example.com\nok2@example.com\nbad%route@example.com\n";
    let err = import(
        &store,
        &Normalizer::default(),
        Cursor::new(file),
        1000,
        |_| (),
    )
    .expect_err("bad line");
    assert!(matches!(err, ImportError::Line { line: 3, .. }), "{err}");
    let err = import(
        &store,
        &Normalizer::default(),
        Cursor::new("x@example.com,nosuch\n"),
        1000,
        |_| (),
    )
    .expect_err("unknown backend");
    assert!(
        err.to_string().contains("unknown backend `nosuch`"),
        "{err}"
    );
    assert_eq!(
        store.owner_of(&mb("ok1@example.com")).await.expect("owner"),
        None,
        "rolled back"
    );
}

#[tokio::test]
async fn assignments_survive_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("directory.db");
    {
        let store = SqliteDirectory::open(&path).expect("open");
        with_backends(&store, &[("b1", 1), ("b2", 1)]).await;
        store.assign(&mb("a@example.com")).await.expect("assign");
        store.assign(&mb("b@example.com")).await.expect("assign");
    }
    let store = SqliteDirectory::open(&path).expect("reopen");
    assert_eq!(
        store
            .owner_of(&mb("b@example.com"))
            .await
            .expect("owner")
            .as_deref(),
        Some("b2")
    );
    assert_eq!(
        store.domain_policy("example.com").await.expect("policy"),
        Some(DomainPolicy::AutoProvision)
    );
}

fn mb(address: &str) -> super::Mailbox {
    Normalizer::default()
        .normalize(address)
        .expect("valid")
        .mailbox
}

#[tokio::test]
async fn logins_provision_only_when_confirmed() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1)]).await;
    let dir = directory(store);
    let Ok(Route::Candidate { mailbox, backend }) =
        dir.route_login("New@Example.com").await.expect("store")
    else {
        panic!("candidate expected for an unassigned auto-provision mailbox");
    };
    assert_eq!(backend, "b1");
    assert_eq!(
        dir.store().owner_of(&mailbox.mailbox).await.expect("owner"),
        None,
        "nothing assigned yet"
    );
    // A delivery in the meantime assigns it (to b1, the same candidate) ...
    assert!(matches!(
        dir.route("other@example.com").await.expect("store"),
        Ok(Route::Owner { .. })
    ));
    // ... and a confirmation against a backend that lost the race is refused.
    assert!(
        dir.confirm(&mailbox.mailbox, "b2").await.expect("confirm"),
        "first confirmation wins"
    );
    assert!(
        !dir.confirm(&mailbox.mailbox, "b1").await.expect("confirm"),
        "second one disagrees"
    );
    assert!(matches!(
        dir.route_login("new@example.com").await.expect("store"),
        Ok(Route::Owner { ref backend, .. }) if backend == "b2"
    ));
    assert!(matches!(
        dir.route_login("x@strict.example").await.expect("store"),
        Ok(Route::UnknownMailbox(_))
    ));
}

mod manage;

#[tokio::test]
async fn move_records_follow_the_store_contract() {
    let (store, _dir) = store();
    super::contract::move_records(&store).await;
}

#[tokio::test]
async fn the_session_checking_task_ends_with_its_directory() {
    let (store, _dir) = store();
    let directory = std::sync::Arc::new(directory(store));
    let task = tokio::spawn(super::Directory::check_sessions(std::sync::Arc::downgrade(
        &directory,
    )));
    // A check of a mailbox without sessions is a no-op; the task keeps waiting.
    directory.session_checks().push(mb("nobody@example.com"));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!task.is_finished());
    drop(directory);
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the task ended")
        .expect("no panic");
}
