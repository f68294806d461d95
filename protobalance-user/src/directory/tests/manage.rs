//! The management operations (listing, deleting, moving) and the schema migration, against
//! the real SQLite store. Every test that writes checks that the per-backend counters still
//! equal the rows.

use std::io::Cursor;

use super::{counts, directory, mb, store, with_backends};
use crate::directory::{
    BackendState, DirectoryError, DomainPolicy, DomainRecord, MailboxDirectory as _, MailboxFilter,
    Normalizer, Route, import::import, sqlite::SqliteDirectory,
};

/// Imports `lines` (the import file format) into `store`.
fn provision(store: &SqliteDirectory, lines: &[String]) {
    import(
        store,
        &Normalizer::default(),
        Cursor::new(lines.join("\n")),
        u64::MAX,
        |_| (),
    )
    .expect("import");
}

/// `backends.mailboxes` equals the rows pointing at each backend, and `mailbox_count` their sum.
async fn assert_counters_exact(store: &SqliteDirectory) {
    let rows: Vec<(String, u64)> = {
        let conn = store.lock();
        let mut stmt = conn
            .prepare(
                "SELECT b.name, count(m.address) FROM backends b
                 LEFT JOIN mailboxes m ON m.backend_id = b.id GROUP BY b.id ORDER BY b.name",
            )
            .expect("prepare");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.unsigned_abs())))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    assert_eq!(counts(&store.backends().await.expect("backends")), rows);
    let total: u64 = rows.iter().map(|(_, n)| n).sum();
    assert_eq!(store.mailbox_count().await.expect("count"), total);
}

fn filter(domain: Option<&str>, backend: Option<&str>) -> MailboxFilter {
    MailboxFilter {
        domain: domain.map(str::to_owned),
        backend: backend.map(str::to_owned),
    }
}

/// Every page of `limit` matching `filter`, concatenated.
async fn all_pages(
    store: &SqliteDirectory,
    filter: &MailboxFilter,
    limit: usize,
) -> (Vec<(String, String)>, usize) {
    let (mut all, mut pages) = (Vec::new(), 0);
    let mut after = None;
    loop {
        let page = store
            .list_mailboxes(filter, after.as_ref(), limit)
            .await
            .expect("page");
        assert!(page.len() <= limit, "page over the limit");
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        pages += 1;
        all.extend(page.into_iter().map(|(m, b)| (m.as_str().to_owned(), b)));
    }
    (all, pages)
}

#[tokio::test]
async fn paging_returns_every_mailbox_once_in_address_order() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1), ("b3", 2)]).await;
    // Not in address order in the file: user1000 sorts before user101.
    let lines: Vec<String> = (0..1050).map(|i| format!("user{i}@example.com")).collect();
    provision(&store, &lines);

    let (all, pages) = all_pages(&store, &MailboxFilter::default(), 100).await;
    assert_eq!(pages, 11, "10 full pages and one of 50");
    let mut expected: Vec<String> = lines.clone();
    expected.sort();
    let addresses: Vec<String> = all.iter().map(|(a, _)| a.clone()).collect();
    assert_eq!(addresses, expected, "each exactly once, in order");
    for (address, owner) in all.iter().step_by(97) {
        let stored = store.owner_of(&mb(address)).await.expect("owner");
        assert_eq!(stored.as_deref(), Some(owner.as_str()), "{address}");
    }
    assert!(
        store
            .list_mailboxes(&MailboxFilter::default(), None, 0)
            .await
            .expect("limit 0")
            .is_empty()
    );
    let last = mb(expected.last().expect("nonempty"));
    assert!(
        store
            .list_mailboxes(&MailboxFilter::default(), Some(&last), 100)
            .await
            .expect("after the last")
            .is_empty()
    );
    assert_eq!(store.mailbox_count().await.expect("count"), 1050);
    assert_counters_exact(&store).await;
}

#[tokio::test]
async fn filters_by_domain_and_backend_alone_and_together() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1)]).await;
    let mut lines = Vec::new();
    for i in 0..40 {
        let backend = if i % 3 == 0 { "b1" } else { "b2" };
        for domain in [
            "example.com",
            "other.example",
            "sub.example.com",
            "xexample.com",
        ] {
            lines.push(format!("m{i}@{domain},{backend}"));
        }
    }
    provision(&store, &lines);
    let (everything, _) = all_pages(&store, &MailboxFilter::default(), 1000).await;
    assert_eq!(everything.len(), 160);

    for (domain, backend) in [
        (Some("example.com"), None),
        (None, Some("b1")),
        (Some("example.com"), Some("b1")),
        (Some("sub.example.com"), Some("b2")),
        (Some("nowhere.example"), None),
    ] {
        let expected: Vec<(String, String)> = everything
            .iter()
            .filter(|(a, b)| {
                domain.is_none_or(|d| a.ends_with(&format!("@{d}")))
                    && backend.is_none_or(|want| b == want)
            })
            .cloned()
            .collect();
        let filter = filter(domain, backend);
        for limit in [1, 7, 1000] {
            let (got, _) = all_pages(&store, &filter, limit).await;
            assert_eq!(got, expected, "{filter:?}, pages of {limit}");
        }
        assert!(
            store
                .list_mailboxes(&filter, None, 0)
                .await
                .expect("limit 0")
                .is_empty()
        );
    }
    // 40 mailboxes of example.com, 14 of them (i % 3 == 0) on b1.
    assert_eq!(
        all_pages(&store, &filter(Some("example.com"), Some("b1")), 5)
            .await
            .0
            .len(),
        14
    );
    // `after` need not be a listed address: the page starts after it in byte order, where
    // digits sort before `@` (m21@, m24@, m27@ < m2@ < m30@).
    let page = store
        .list_mailboxes(
            &filter(Some("example.com"), Some("b1")),
            Some(&mb("m2@example.com")),
            2,
        )
        .await
        .expect("page");
    let page: Vec<&str> = page.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(page, ["m30@example.com", "m33@example.com"]);
    assert!(matches!(
        store.list_mailboxes(&filter(None, Some("nope")), None, 10).await,
        Err(DirectoryError::UnknownBackend(b)) if b == "nope"
    ));
}

#[tokio::test]
async fn delete_adjusts_counts_and_the_cache() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1)]).await;
    let dir = directory(store);
    let owner = |route: Route| match route {
        Route::Owner { backend, .. } => backend,
        other => panic!("owner expected, got {other:?}"),
    };
    let first = dir
        .route("a@example.com")
        .await
        .expect("store")
        .expect("addr");
    assert_eq!(owner(first), "b1");
    dir.route("a@example.com")
        .await
        .expect("store")
        .expect("addr"); // now cached

    assert!(dir.delete(&mb("a@example.com")).await.expect("delete"));
    assert!(
        !dir.delete(&mb("a@example.com")).await.expect("delete"),
        "already gone"
    );
    assert_eq!(
        dir.store()
            .owner_of(&mb("a@example.com"))
            .await
            .expect("owner"),
        None
    );
    assert_counters_exact(dir.store()).await;
    assert_eq!(dir.store().mailbox_count().await.expect("count"), 0);

    // Re-routed by policy, not from the cache: with b1 draining it now lands on b2.
    dir.store()
        .set_backend_state("b1", BackendState::Draining)
        .await
        .expect("state");
    let again = dir
        .route("A@example.com")
        .await
        .expect("store")
        .expect("addr");
    assert_eq!(owner(again), "b2");
    assert_counters_exact(dir.store()).await;

    // A rejecting domain: once deleted, the mailbox is unknown.
    let strict = mb("x@strict.example");
    dir.store().assign_to(&strict, "b1").await.expect("assign");
    let cached = dir
        .route("x@strict.example")
        .await
        .expect("store")
        .expect("addr");
    assert_eq!(owner(cached), "b1");
    assert!(dir.delete(&strict).await.expect("delete"));
    assert!(matches!(
        dir.route("x@strict.example").await.expect("store"),
        Ok(Route::UnknownMailbox(_))
    ));
    assert_counters_exact(dir.store()).await;
}

#[tokio::test]
async fn reassign_moves_the_count_and_the_cached_owner() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1)]).await;
    let dir = directory(store);
    let a = mb("a@example.com");
    let routed = |r: Route| match r {
        Route::Owner { backend, .. } => backend,
        other => panic!("owner expected, got {other:?}"),
    };
    assert_eq!(
        routed(dir.route("a@example.com").await.expect("s").expect("a")),
        "b1"
    );

    assert_eq!(
        dir.reassign(&a, "b2").await.expect("move").as_deref(),
        Some("b1")
    );
    assert_eq!(
        routed(dir.route("a@example.com").await.expect("s").expect("a")),
        "b2"
    );
    assert_eq!(
        counts(&dir.store().backends().await.expect("backends")),
        [("b1".into(), 0), ("b2".into(), 1)]
    );
    assert_counters_exact(dir.store()).await;

    // To the same backend: nothing changes. To a draining one: the operator's choice.
    assert_eq!(
        dir.reassign(&a, "b2").await.expect("same").as_deref(),
        Some("b2")
    );
    dir.store()
        .set_backend_state("b1", BackendState::Draining)
        .await
        .expect("state");
    assert_eq!(
        dir.reassign(&a, "b1").await.expect("back").as_deref(),
        Some("b2")
    );
    assert_eq!(
        routed(dir.route("a@example.com").await.expect("s").expect("a")),
        "b1"
    );
    assert_counters_exact(dir.store()).await;

    assert!(matches!(
        dir.reassign(&a, "nope").await,
        Err(DirectoryError::UnknownBackend(b)) if b == "nope"
    ));
    // The conditional move of a mailbox move: only from the owner it names.
    let owner = dir.store().owner_of(&a).await.expect("owner").expect("a");
    let other = if owner == "b1" { "b2" } else { "b1" };
    assert!(
        !dir.reassign_from(&a, other, owner.as_str())
            .await
            .expect("not from other")
    );
    assert!(
        dir.reassign_from(&a, &owner, other)
            .await
            .expect("from owner")
    );
    assert!(dir.reassign_from(&a, other, &owner).await.expect("back"));
    assert!(
        !dir.reassign_from(&mb("ghost@example.com"), "b1", "b2")
            .await
            .expect("absent")
    );
    assert_counters_exact(dir.store()).await;
    assert_eq!(
        dir.reassign(&mb("ghost@example.com"), "b2")
            .await
            .expect("absent"),
        None
    );
    assert_eq!(
        dir.store()
            .owner_of(&mb("ghost@example.com"))
            .await
            .expect("owner"),
        None
    );
    assert_counters_exact(dir.store()).await;
}

#[tokio::test]
async fn a_lookup_racing_a_move_does_not_cache_the_old_owner() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1)]).await;
    let dir = directory(store);
    let a = mb("a@example.com");
    dir.store().assign_to(&a, "b1").await.expect("assign");
    // A lookup reads the owner (b1) from the store ...
    let started = dir.generation();
    // ... a move commits and invalidates meanwhile ...
    dir.reassign(&a, "b2").await.expect("move");
    // ... and the lookup's answer arrives late: it must not be cached.
    dir.remember(&a, "b1".into(), started);
    assert!(matches!(
        dir.route("a@example.com").await.expect("store"),
        Ok(Route::Owner { ref backend, .. }) if backend == "b2"
    ));
}

#[tokio::test]
async fn domains_and_backends_in_use_are_not_removed() {
    let (store, _dir) = store();
    with_backends(&store, &[("b1", 1), ("b2", 1), ("spare", 1)]).await;
    let a = mb("a@example.com");
    store.assign_to(&a, "b1").await.expect("assign");
    store
        .assign_to(&mb("b@example.com"), "b1")
        .await
        .expect("assign");
    assert_eq!(
        store.domains().await.expect("domains"),
        [
            DomainRecord {
                name: "example.com".into(),
                policy: DomainPolicy::AutoProvision,
                mailboxes: 2
            },
            DomainRecord {
                name: "strict.example".into(),
                policy: DomainPolicy::Reject,
                mailboxes: 0
            },
        ]
    );

    let err = store
        .delete_domain("example.com")
        .await
        .expect_err("in use");
    assert!(
        matches!(err, DirectoryError::DomainInUse { ref domain, mailboxes: 2 } if domain == "example.com"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "domain `example.com` still has 2 mailboxes: delete them first"
    );
    let err = store.remove_backend("b1").await.expect_err("in use");
    assert_eq!(
        err.to_string(),
        "backend `b1` still owns 2 mailboxes: move or delete them first"
    );
    assert!(matches!(
        store.delete_domain("nowhere.example").await,
        Err(DirectoryError::UnknownDomain(_))
    ));
    assert!(matches!(
        store.remove_backend("nope").await,
        Err(DirectoryError::UnknownBackend(_))
    ));

    // Unused ones go; used ones go once emptied.
    store.remove_backend("spare").await.expect("unused backend");
    store
        .delete_domain("strict.example")
        .await
        .expect("unused domain");
    store.reassign(&a, "b2").await.expect("move");
    assert!(
        store
            .delete_mailbox(&mb("b@example.com"))
            .await
            .expect("delete")
    );
    store.remove_backend("b1").await.expect("emptied backend");
    assert!(matches!(
        store.remove_backend("b2").await,
        Err(DirectoryError::BackendInUse { mailboxes: 1, .. })
    ));
    assert!(store.delete_mailbox(&a).await.expect("delete"));
    store
        .delete_domain("example.com")
        .await
        .expect("emptied domain");
    store.remove_backend("b2").await.expect("emptied backend");
    assert!(store.backends().await.expect("backends").is_empty());
    assert!(store.domains().await.expect("domains").is_empty());
    assert_eq!(
        store.domain_policy("example.com").await.expect("policy"),
        None
    );
}

/// The layout-1 schema exactly as files created before the `domain` column have it.
const LAYOUT_1: &str = "
CREATE TABLE backends (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL UNIQUE,
    capacity  INTEGER NOT NULL CHECK (capacity >= 0),
    state     TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'down')),
    mailboxes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE domains (
    name   TEXT PRIMARY KEY,
    policy TEXT NOT NULL CHECK (policy IN ('reject', 'auto-provision'))
) WITHOUT ROWID;
CREATE TABLE mailboxes (
    address    TEXT PRIMARY KEY,
    backend_id INTEGER NOT NULL REFERENCES backends (id)
) WITHOUT ROWID;
INSERT INTO backends (id, name, capacity, mailboxes) VALUES (1, 'b1', 1, 3), (2, 'b2', 1, 1);
INSERT INTO domains VALUES ('example.com', 'auto-provision'), ('other.example', 'reject');
INSERT INTO mailboxes VALUES ('a@example.com', 1), ('b@example.com', 2),
    ('c@other.example', 1), ('jörg@example.com', 1);
";

#[tokio::test]
async fn files_with_the_old_schema_are_migrated_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("directory.db");
    rusqlite::Connection::open(&path)
        .expect("create")
        .execute_batch(LAYOUT_1)
        .expect("old schema");

    for _ in 0..2 {
        // Twice: opening a migrated file changes nothing.
        let store = SqliteDirectory::open(&path).expect("open migrates");
        let (example, _) = all_pages(&store, &filter(Some("example.com"), None), 2).await;
        assert_eq!(
            example,
            [
                ("a@example.com".into(), "b1".into()),
                ("b@example.com".into(), "b2".into()),
                ("jörg@example.com".into(), "b1".into()),
            ]
        );
        let domains = store.domains().await.expect("domains");
        let per_domain: Vec<(&str, u64)> = domains
            .iter()
            .map(|d| (d.name.as_str(), d.mailboxes))
            .collect();
        assert_eq!(per_domain, [("example.com", 3), ("other.example", 1)]);
        assert_counters_exact(&store).await;
    }

    let store = SqliteDirectory::open(&path).expect("open");
    store
        .assign(&mb("new@other.example"))
        .await
        .expect("assign");
    let (other, _) = all_pages(&store, &filter(Some("other.example"), None), 10).await;
    assert_eq!(other.len(), 2, "new rows get their domain too: {other:?}");
    let indexes: Vec<String> = {
        let conn = store.lock();
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'mailboxes' AND sql IS NOT NULL ORDER BY name")
            .expect("prepare");
        stmt.query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    assert_eq!(indexes, ["mailboxes_by_backend", "mailboxes_by_domain"]);
}

#[tokio::test]
async fn suspensions_are_stored_replaced_and_removed_and_expired_ones_pruned() {
    use crate::directory::SuspensionRecord;
    let (store, _dir) = store();
    let record = |account: &str, since: i64, until: i64| SuspensionRecord {
        account: account.to_owned(),
        reason: "operator".to_owned(),
        since,
        until,
    };
    store
        .put_suspension(&record("a@x", 100, 200))
        .await
        .expect("put");
    store
        .put_suspension(&record("b@x", 150, 500))
        .await
        .expect("put");
    // Replaced in place; and writing at t=300 prunes a@x, which ended at 200.
    store
        .put_suspension(&record("b@x", 300, 900))
        .await
        .expect("put");
    assert_eq!(
        store.suspensions().await.expect("list"),
        [record("b@x", 300, 900)]
    );
    assert!(store.remove_suspension("b@x").await.expect("remove"));
    assert!(!store.remove_suspension("b@x").await.expect("remove"));
    assert!(store.suspensions().await.expect("list").is_empty());
}
