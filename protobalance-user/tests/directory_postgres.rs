//! The PostgreSQL directory store against a real PostgreSQL server: the same contract as the
//! SQLite store (assignment, counters, moves, listing, management, blocklist, suspensions,
//! imports), with two "nodes" (two stores, two caches) working on one database at once;
//! versioned migrations; cache coherence through LISTEN/NOTIFY; what a node does while
//! PostgreSQL is unreachable; TLS to PostgreSQL (verified, never a plaintext fallback).

use std::{
    collections::HashMap,
    num::NonZeroUsize,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use protobalance::directory::{
    BackendState, BlockRecord, Directory, DirectoryError, DomainPolicy, Mailbox,
    MailboxDirectory as _, MailboxFilter, Normalizer, Route, Store, SuspensionRecord,
    import::{EntryOutcome, ImportEntry},
    postgres::{self, BanRecord, PostgresDirectory, PostgresSettings},
};
use protobalance_tests::{PostgresServer, require_postgres};

fn settings(pg: &PostgresServer) -> PostgresSettings {
    PostgresSettings {
        url: pg.url(),
        password_file: None,
        pool_size: 8,
        timeout: Duration::from_millis(1500),
        stale_cache: Duration::from_secs(2),
        ca_file: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn mailbox(address: &str) -> Mailbox {
    Normalizer::default()
        .normalize(address)
        .expect("address")
        .mailbox
}

/// The stored counters equal the rows, per backend.
fn assert_counters_exact(pg: &PostgresServer) {
    let wrong = pg
        .psql(
            "SELECT b.name || ':' || b.mailboxes || '/' || count(m.address) FROM backends b \
             LEFT JOIN mailboxes m ON m.backend_id = b.id GROUP BY b.id \
             HAVING b.mailboxes <> count(m.address)",
        )
        .expect("psql");
    assert!(wrong.is_empty(), "counters differ from rows: {wrong}");
}

#[test]
fn two_nodes_share_one_postgres_directory_with_exact_counters() {
    if !require_postgres("two_nodes_share_one_postgres_directory_with_exact_counters") {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let rt = runtime();
    rt.block_on(async {
        let a = Arc::new(
            PostgresDirectory::connect(&settings(&pg))
                .await
                .expect("node a"),
        );
        let b = Arc::new(
            PostgresDirectory::connect(&settings(&pg))
                .await
                .expect("node b"),
        );
        for (name, capacity) in [("alpha", 1), ("beta", 1), ("gamma", 2)] {
            a.upsert_backend(name, capacity).await.expect("backend");
        }
        a.upsert_domain("example.com", DomainPolicy::AutoProvision)
            .await
            .expect("domain");
        assert_eq!(
            b.domain_policy("example.com").await.expect("policy"),
            Some(DomainPolicy::AutoProvision)
        );
        assert_eq!(b.domain_policy("example.org").await.expect("policy"), None);

        // Both nodes assign at once, 100 addresses in common: every address ends with one
        // owner, and both nodes were told that owner.
        let mut tasks = Vec::new();
        for (node, range) in [(&a, 0..300), (&b, 200..500)] {
            for i in range {
                let node = Arc::clone(node);
                tasks.push(tokio::spawn(async move {
                    let address = format!("user{i}@example.com");
                    let owner = node.assign(&mailbox(&address)).await.expect("assign");
                    (address, owner)
                }));
            }
        }
        let mut owners: HashMap<String, String> = HashMap::new();
        for task in tasks {
            let (address, owner) = task.await.expect("task");
            if let Some(earlier) = owners.insert(address.clone(), owner.clone()) {
                assert_eq!(earlier, owner, "{address}: two nodes, two owners");
            }
        }
        assert_eq!(owners.len(), 500);
        assert_eq!(a.mailbox_count().await.expect("count"), 500);
        let loads: HashMap<String, u64> = b
            .backends()
            .await
            .expect("backends")
            .into_iter()
            .map(|r| (r.name, r.mailboxes))
            .collect();
        // Apportioned by capacity 1:1:2 (concurrency may blur the last few).
        for (name, want) in [("alpha", 125), ("beta", 125), ("gamma", 250)] {
            let got = loads[name] as i64;
            assert!(
                (got - want).abs() <= 3,
                "{name}: {got} mailboxes, want ~{want}"
            );
        }
        assert_counters_exact(&pg);

        // Assignment to a named backend; an existing owner wins.
        let pinned = mailbox("pinned@example.com");
        assert_eq!(
            a.assign_to(&pinned, "beta").await.expect("assign_to"),
            "beta"
        );
        assert_eq!(
            b.assign_to(&pinned, "alpha").await.expect("assign_to"),
            "beta"
        );
        assert!(matches!(
            a.assign_to(&mailbox("x@example.com"), "nosuch").await,
            Err(DirectoryError::UnknownBackend(n)) if n == "nosuch"
        ));

        // Moves keep both counters exact; a missing mailbox moves nowhere.
        let previous = b.reassign(&pinned, "gamma").await.expect("reassign");
        assert_eq!(previous.as_deref(), Some("beta"));
        assert_eq!(
            a.owner_of(&pinned).await.expect("owner").as_deref(),
            Some("gamma")
        );
        assert_eq!(
            a.reassign(&mailbox("ghost@example.com"), "gamma")
                .await
                .expect("reassign"),
            None
        );
        assert!(matches!(
            a.reassign(&pinned, "nosuch").await,
            Err(DirectoryError::UnknownBackend(_))
        ));
        // A conditional move happens only from the owner it names.
        assert!(
            !b.reassign_from(&pinned, "beta", "alpha")
                .await
                .expect("not from beta")
        );
        assert_eq!(
            a.owner_of(&pinned).await.expect("owner").as_deref(),
            Some("gamma")
        );
        assert!(
            b.reassign_from(&pinned, "gamma", "alpha")
                .await
                .expect("from gamma")
        );
        assert!(
            a.reassign_from(&pinned, "alpha", "gamma")
                .await
                .expect("back")
        );
        assert!(
            !a.reassign_from(&mailbox("ghost@example.com"), "gamma", "alpha")
                .await
                .expect("no such mailbox")
        );
        assert_counters_exact(&pg);

        // Keyset paging, by backend and by domain, in byte order.
        let mut paged = Vec::new();
        let mut after: Option<Mailbox> = None;
        let filter = MailboxFilter {
            domain: None,
            backend: Some("alpha".into()),
        };
        loop {
            let page = a
                .list_mailboxes(&filter, after.as_ref(), 7)
                .await
                .expect("page");
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            assert!(page.iter().all(|(_, owner)| owner == "alpha"));
            paged.extend(page.into_iter().map(|(m, _)| m.as_str().to_owned()));
        }
        let mut sorted = paged.clone();
        sorted.sort();
        assert_eq!(paged, sorted, "pages are in address order");
        assert_eq!(paged.len() as u64, loads["alpha"]);
        let by_domain = a
            .list_mailboxes(
                &MailboxFilter {
                    domain: Some("example.com".into()),
                    backend: None,
                },
                None,
                1000,
            )
            .await
            .expect("domain page");
        assert_eq!(by_domain.len(), 501);
        assert!(matches!(
            a.list_mailboxes(
                &MailboxFilter {
                    domain: None,
                    backend: Some("nosuch".into())
                },
                None,
                10
            )
            .await,
            Err(DirectoryError::UnknownBackend(_))
        ));

        // Deleting: mailboxes, then the refusals for domains and backends still in use.
        assert!(a.delete_mailbox(&pinned).await.expect("delete"));
        assert!(!b.delete_mailbox(&pinned).await.expect("delete again"));
        assert!(matches!(
            a.remove_backend("alpha").await,
            Err(DirectoryError::BackendInUse { mailboxes, .. }) if mailboxes == loads["alpha"]
        ));
        assert!(matches!(
            a.delete_domain("example.com").await,
            Err(DirectoryError::DomainInUse { mailboxes: 500, .. })
        ));
        assert!(matches!(
            a.delete_domain("example.org").await,
            Err(DirectoryError::UnknownDomain(_))
        ));
        let domains = b.domains().await.expect("domains");
        assert_eq!(domains.len(), 1);
        assert_eq!(domains[0].mailboxes, 500);
        assert_counters_exact(&pg);

        // No active backend: assignment says so.
        for name in ["alpha", "beta", "gamma"] {
            a.set_backend_state(name, BackendState::Draining)
                .await
                .expect("drain");
        }
        assert!(matches!(
            b.assign(&mailbox("late@example.com")).await,
            Err(DirectoryError::NoActiveBackend)
        ));
        assert!(matches!(
            b.candidate().await,
            Err(DirectoryError::NoActiveBackend)
        ));
        assert!(matches!(
            a.set_backend_state("nosuch", BackendState::Down).await,
            Err(DirectoryError::UnknownBackend(_))
        ));
        for name in ["alpha", "beta", "gamma"] {
            a.set_backend_state(name, BackendState::Active)
                .await
                .expect("activate");
        }

        // Backends added at run time, with their definitions.
        a.add_backend("delta", 3, "name = \"delta\"")
            .await
            .expect("add");
        assert!(matches!(
            b.add_backend("delta", 3, "x").await,
            Err(DirectoryError::BackendExists(_))
        ));
        b.update_backend_spec("delta", 4, "name = \"delta\"\ncapacity = 4")
            .await
            .expect("update");
        assert_eq!(
            a.backend_specs().await.expect("specs"),
            vec![(
                "delta".to_owned(),
                "name = \"delta\"\ncapacity = 4".to_owned()
            )]
        );
        a.remove_backend("delta")
            .await
            .expect("an empty backend goes");
        assert!(matches!(
            a.remove_backend("delta").await,
            Err(DirectoryError::UnknownBackend(_))
        ));
    });
}

#[test]
fn postgres_move_records_follow_the_store_contract() {
    if !require_postgres("postgres_move_records_follow_the_store_contract") {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    runtime().block_on(async {
        let store = PostgresDirectory::connect(&settings(&pg))
            .await
            .expect("connect");
        protobalance::directory::contract::move_records(&store).await;
    });
}

#[test]
fn postgres_blocklist_suspensions_and_imports_follow_the_store_contract() {
    if !require_postgres("postgres_blocklist_suspensions_and_imports_follow_the_store_contract") {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let rt = runtime();
    rt.block_on(async {
        let store = PostgresDirectory::connect(&settings(&pg))
            .await
            .expect("connect");
        let block = |cidr: &str, reason: &str, expires_at| BlockRecord {
            list: "abuse".into(),
            cidr: cidr.into(),
            reason: reason.into(),
            expires_at,
        };
        store
            .put_block(&block("198.51.100.0/24", "first", None))
            .await
            .expect("put");
        store
            .put_block(&block("198.51.100.0/24", "replaced", Some(50)))
            .await
            .expect("put again");
        assert_eq!(
            store.blocklist().await.expect("list"),
            vec![block("198.51.100.0/24", "replaced", Some(50))]
        );
        // A whole list replaced at once; of duplicates the last wins.
        store
            .replace_block_list(
                "abuse",
                &[
                    block("203.0.113.7/32", "old", Some(10)),
                    block("203.0.113.0/24", "net", None),
                    block("203.0.113.7/32", "new", Some(100)),
                ],
            )
            .await
            .expect("replace");
        assert_eq!(
            store.blocklist().await.expect("list"),
            vec![
                block("203.0.113.0/24", "net", None),
                block("203.0.113.7/32", "new", Some(100)),
            ]
        );
        assert_eq!(
            store.remove_expired_blocks(99).await.expect("expire"),
            Vec::new()
        );
        assert_eq!(
            store.remove_expired_blocks(100).await.expect("expire"),
            vec![block("203.0.113.7/32", "new", Some(100))]
        );
        assert!(
            store
                .remove_block("abuse", "203.0.113.0/24")
                .await
                .expect("rm")
        );
        assert!(
            !store
                .remove_block("abuse", "203.0.113.0/24")
                .await
                .expect("rm")
        );
        assert!(store.blocklist().await.expect("list").is_empty());

        let suspension = |account: &str, since, until| SuspensionRecord {
            account: account.into(),
            reason: "malware".into(),
            since,
            until,
        };
        store
            .put_suspension(&suspension("a@example.com", 10, 20))
            .await
            .expect("suspend");
        // A later suspension removes the expired one.
        store
            .put_suspension(&suspension("b@example.com", 30, 40))
            .await
            .expect("suspend");
        assert_eq!(
            store.suspensions().await.expect("list"),
            vec![suspension("b@example.com", 30, 40)]
        );
        assert!(store.remove_suspension("b@example.com").await.expect("rm"));
        assert!(!store.remove_suspension("b@example.com").await.expect("rm"));

        // Shared bans: replaced by target, read unexpired (all or by target), swept.
        let ban = |target: &str, expires_ms| BanRecord {
            target: target.into(),
            mode: "all".into(),
            reason: 103,
            expires_ms,
            node: "node-a".into(),
        };
        store
            .put_ban(&ban("198.51.100.7", 5_000))
            .await
            .expect("ban");
        store
            .put_ban(&ban("198.51.100.7", 9_000))
            .await
            .expect("ban again");
        store
            .put_ban(&ban("2001:db8:1:2::/64", 2_000))
            .await
            .expect("ban /64");
        assert_eq!(
            store.bans(None, 1_000).await.expect("bans"),
            vec![ban("198.51.100.7", 9_000), ban("2001:db8:1:2::/64", 2_000)]
        );
        assert_eq!(
            store.bans(None, 2_000).await.expect("bans"),
            vec![ban("198.51.100.7", 9_000)],
            "ended bans are not read"
        );
        assert_eq!(
            store
                .bans(Some(&["2001:db8:1:2::/64".to_owned()]), 1_000)
                .await
                .expect("bans"),
            vec![ban("2001:db8:1:2::/64", 2_000)]
        );
        assert_eq!(store.remove_expired_bans(2_000).await.expect("sweep"), 1);
        assert!(store.remove_ban("198.51.100.7").await.expect("lift"));
        assert!(!store.remove_ban("198.51.100.7").await.expect("lift again"));
        assert!(store.bans(None, 0).await.expect("bans").is_empty());

        // Imports: apportioned like single assignments, every entry reported.
        store.upsert_backend("one", 1).await.expect("backend");
        store.upsert_backend("two", 1).await.expect("backend");
        store.upsert_backend("idle", 1).await.expect("backend");
        store
            .set_backend_state("idle", BackendState::Draining)
            .await
            .expect("drain");
        let entry = |address: &str, backend: Option<&str>| ImportEntry {
            mailbox: mailbox(address),
            backend: backend.map(str::to_owned),
        };
        let mut entries: Vec<ImportEntry> = (0..1000)
            .map(|i| entry(&format!("bulk{i}@example.net"), None))
            .collect();
        entries.push(entry("bulk1@example.net", None));
        entries.push(entry("bulk2@example.net", Some("nosuch")));
        entries.push(entry("pinned@example.net", Some("idle")));
        let results = store.import_entries(entries).await.expect("import");
        let outcomes: Vec<EntryOutcome> = results.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == EntryOutcome::Added)
                .count(),
            1000
        );
        assert_eq!(
            outcomes[1000],
            EntryOutcome::Exists,
            "a duplicate in the batch"
        );
        assert_eq!(outcomes[1001], EntryOutcome::UnknownBackend);
        assert_eq!(outcomes[1002], EntryOutcome::BackendNotActive);
        let again = store
            .import_entries(vec![
                entry("bulk3@example.net", None),
                entry("bulk4@example.net", Some("idle")),
            ])
            .await
            .expect("import again");
        assert_eq!(again[0].outcome, EntryOutcome::Exists);
        assert_eq!(again[1].outcome, EntryOutcome::Conflict);
        let loads: Vec<u64> = store
            .backends()
            .await
            .expect("backends")
            .iter()
            .map(|b| b.mailboxes)
            .collect();
        assert_eq!(loads, vec![0, 500, 500], "idle, one, two");
        assert_counters_exact(&pg);
    });
}

#[test]
fn postgres_schema_is_versioned_and_a_newer_one_is_refused() {
    if !require_postgres("postgres_schema_is_versioned_and_a_newer_one_is_refused") {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let rt = runtime();
    rt.block_on(async {
        // Two nodes starting at once: the migrations run once.
        let (sa, sb) = (settings(&pg), settings(&pg));
        let (a, b) = tokio::join!(
            PostgresDirectory::connect(&sa),
            PostgresDirectory::connect(&sb)
        );
        a.expect("node a");
        b.expect("node b");
    });
    let every_version = (1..=postgres::schema::LATEST)
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let versions =
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM protobalance_schema";
    assert_eq!(pg.psql(versions).expect("psql"), every_version);

    // A database left at version 1 (what the first release wrote) with mailboxes in it is
    // brought to the latest version on the next start, its data kept (the objects of the
    // later versions are dropped here to make one).
    pg.psql(
        "INSERT INTO backends (name, capacity) VALUES ('one', 1); \
         INSERT INTO mailboxes (address, backend_id) SELECT 'kept@example.com', id FROM backends; \
         UPDATE backends SET mailboxes = 1; \
         DROP TABLE bans; DROP FUNCTION protobalance_ban_changed(); \
         DROP TRIGGER blocklist_changed ON blocklist; DROP FUNCTION protobalance_blocklist_changed(); \
         DROP TRIGGER backends_changed ON backends; DROP FUNCTION protobalance_backend_changed(); \
         DROP TABLE move_copies; DROP TABLE moves; \
         DELETE FROM protobalance_schema WHERE version > 1",
    )
    .expect("back to version 1");
    rt.block_on(async {
        let store = PostgresDirectory::connect(&settings(&pg))
            .await
            .expect("upgrade from version 1");
        assert_eq!(
            store
                .owner_of(&mailbox("kept@example.com"))
                .await
                .expect("owner"),
            Some("one".to_owned())
        );
        store
            .put_ban(&BanRecord {
                target: "198.51.100.9".into(),
                mode: "all".into(),
                reason: 0,
                expires_ms: i64::MAX,
                node: "n".into(),
            })
            .await
            .expect("the version 2 table is there");
    });
    assert_eq!(pg.psql(versions).expect("psql"), every_version);

    pg.psql("INSERT INTO protobalance_schema (version, description) VALUES (999, 'future')")
        .expect("psql");
    let err = rt
        .block_on(PostgresDirectory::connect(&settings(&pg)))
        .err()
        .expect("a newer schema is refused");
    let text = err.to_string();
    assert!(
        text.contains("999") && text.contains("upgrade protobalance"),
        "{text}"
    );

    // An unreachable database is an error that says where it looked.
    let mut unreachable = settings(&pg);
    unreachable.url = "host=127.0.0.1 port=1 user=protobalance dbname=protobalance".into();
    let err = rt
        .block_on(PostgresDirectory::connect(&unreachable))
        .err()
        .expect("nothing listens on port 1");
    assert!(err.to_string().contains("PostgreSQL"), "{err}");
}

/// A node: a store, its cache, and its listener.
fn node(pg: &PostgresServer, rt: &tokio::runtime::Runtime) -> Arc<Directory<Store>> {
    node_with(settings(pg), rt)
}

/// [`node`] with these settings.
fn node_with(settings: PostgresSettings, rt: &tokio::runtime::Runtime) -> Arc<Directory<Store>> {
    rt.block_on(async {
        let store = PostgresDirectory::connect(&settings)
            .await
            .expect("connect");
        let directory = Arc::new(Directory::new(
            Store::Postgres(store),
            Normalizer::default(),
            NonZeroUsize::new(1000).expect("nonzero"),
        ));
        postgres::listen(&directory, settings);
        directory
    })
}

fn wait_listening(directory: &Directory<Store>, within: Duration) {
    let deadline = Instant::now() + within;
    while !directory.cache_stats().listening.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "not listening after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn owner_via(rt: &tokio::runtime::Runtime, d: &Directory<Store>, address: &str) -> Option<String> {
    match rt
        .block_on(d.route(address))
        .expect("route")
        .expect("address")
    {
        Route::Owner { backend, .. } => Some(backend),
        _ => None,
    }
}

#[test]
fn a_change_on_one_node_reaches_the_other_nodes_cache_within_a_second() {
    if !require_postgres("a_change_on_one_node_reaches_the_other_nodes_cache_within_a_second") {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let rt = runtime();
    let (a, b) = (node(&pg, &rt), node(&pg, &rt));
    wait_listening(&a, Duration::from_secs(5));
    wait_listening(&b, Duration::from_secs(5));
    rt.block_on(async {
        let store = a.store();
        store.upsert_backend("one", 1).await.expect("backend");
        store.upsert_backend("two", 1).await.expect("backend");
        store
            .upsert_domain("example.com", DomainPolicy::Reject)
            .await
            .expect("domain");
        store
            .assign_to(&mailbox("moved@example.com"), "one")
            .await
            .expect("assign");
        store
            .assign_to(&mailbox("gone@example.com"), "one")
            .await
            .expect("assign");
    });
    // Node B caches both owners: the second lookup is a hit.
    for address in ["moved@example.com", "gone@example.com"] {
        assert_eq!(owner_via(&rt, &b, address).as_deref(), Some("one"));
        let hits = b.cache_stats().hits.load(Ordering::Relaxed);
        assert_eq!(owner_via(&rt, &b, address).as_deref(), Some("one"));
        assert_eq!(
            b.cache_stats().hits.load(Ordering::Relaxed),
            hits + 1,
            "cached"
        );
    }
    // Node A moves one and deletes the other; node B follows within a second.
    let changed = Instant::now();
    rt.block_on(a.reassign(&mailbox("moved@example.com"), "two"))
        .expect("reassign");
    rt.block_on(a.delete(&mailbox("gone@example.com")))
        .expect("delete");
    let mut seen = None;
    while changed.elapsed() < Duration::from_secs(1) {
        let moved = owner_via(&rt, &b, "moved@example.com");
        let gone = owner_via(&rt, &b, "gone@example.com");
        if moved.as_deref() == Some("two") && gone.is_none() {
            seen = Some(changed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let seen = seen.expect("node B still routes by the old owners after 1 s");
    eprintln!("node B saw node A's changes after {seen:?}");
    assert!(b.cache_stats().notifications.load(Ordering::Relaxed) >= 2);
    // A move through the store alone (another tool, or a node that crashed before
    // invalidating its own cache) reaches both caches the same way.
    rt.block_on(b.store().reassign(&mailbox("moved@example.com"), "one"))
        .expect("reassign");
    let deadline = Instant::now() + Duration::from_secs(1);
    while owner_via(&rt, &a, "moved@example.com").as_deref() != Some("one") {
        assert!(Instant::now() < deadline, "node A never heard the move");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn while_postgres_is_down_cached_owners_serve_for_a_bounded_time_only() {
    if !require_postgres("while_postgres_is_down_cached_owners_serve_for_a_bounded_time_only") {
        return;
    }
    let mut pg = PostgresServer::start().expect("postgres");
    let rt = runtime();
    let b = node(&pg, &rt);
    wait_listening(&b, Duration::from_secs(5));
    rt.block_on(async {
        let store = b.store();
        store.upsert_backend("one", 1).await.expect("backend");
        store
            .upsert_domain("example.com", DomainPolicy::Reject)
            .await
            .expect("domain");
        for user in ["cached", "uncached"] {
            store
                .assign_to(&mailbox(&format!("{user}@example.com")), "one")
                .await
                .expect("assign");
        }
    });
    assert_eq!(
        owner_via(&rt, &b, "cached@example.com").as_deref(),
        Some("one")
    );

    // The listener may notice while the server is still shutting down: the bound is
    // counted from the moment the shutdown began.
    let stopped = Instant::now();
    pg.stop().expect("stop postgres");
    // The listener notices within its heartbeat plus the deadline.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.cache_stats().listening.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the outage went unnoticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Cached: still served (stale_cache = 2 s). Not cached: a store error, i.e. a
    // temporary failure for the client — never a guess.
    assert_eq!(
        owner_via(&rt, &b, "cached@example.com").as_deref(),
        Some("one")
    );
    let err = rt
        .block_on(b.route("uncached@example.com"))
        .expect_err("nothing to serve it from");
    assert!(matches!(err, DirectoryError::Store(_)), "{err}");
    // After the bound the cache is not served either.
    while b.cache_usable() {
        assert!(
            stopped.elapsed() < Duration::from_secs(8),
            "cache served past its bound"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "the cache stopped serving before stale_cache"
    );
    let err = rt
        .block_on(b.route("cached@example.com"))
        .expect_err("stale beyond the bound");
    assert!(matches!(err, DirectoryError::Store(_)), "{err}");

    // PostgreSQL back: the node listens again and serves (and caches) as before.
    pg.restart().expect("restart postgres");
    wait_listening(&b, Duration::from_secs(15));
    assert_eq!(
        owner_via(&rt, &b, "cached@example.com").as_deref(),
        Some("one")
    );
    let hits = b.cache_stats().hits.load(Ordering::Relaxed);
    assert_eq!(
        owner_via(&rt, &b, "cached@example.com").as_deref(),
        Some("one")
    );
    assert_eq!(b.cache_stats().hits.load(Ordering::Relaxed), hits + 1);
}

/// A CA and a certificate it signed for 127.0.0.1 (IP address SAN): `(ca, cert, key)`.
fn test_ca(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, name);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "postgres.test");
    let cert = params.signed_by(&key, &ca).expect("sign");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn postgres_over_tls_is_verified_and_never_falls_back_to_plaintext() {
    if !require_postgres("postgres_over_tls_is_verified_and_never_falls_back_to_plaintext") {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = test_ca("directory test CA");
    let (other_ca, _, _) = test_ca("some other CA");
    let (ca_file, other_file) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&ca_file, ca).expect("ca file");
    std::fs::write(&other_file, other_ca).expect("other ca file");
    let with_ca = |file: &std::path::Path| PostgresSettings {
        ca_file: Some(file.to_owned()),
        ..settings(&pg)
    };
    let rt = runtime();
    let connect = |settings: PostgresSettings| {
        rt.block_on(PostgresDirectory::connect(&settings))
            .map(drop)
            .map_err(|e| e.to_string())
    };

    // TLS asked for, the server has none: refused, not plaintext.
    let error = connect(with_ca(&ca_file)).expect_err("no TLS on the server yet");
    assert!(error.contains("does not support TLS"), "{error}");

    pg.enable_tls(&cert, &key).expect("server TLS");
    // A certificate from a CA the node does not trust: refused.
    let error = connect(with_ca(&other_file)).expect_err("untrusted certificate");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    // The right CA: every connection of the node is encrypted, its listener's included.
    let node = node_with(with_ca(&ca_file), &rt);
    wait_listening(&node, Duration::from_secs(5));
    rt.block_on(node.store().mailbox_count())
        .expect("a query over TLS");
    let encrypted = pg
        .psql(
            "SELECT string_agg(s.ssl::text, ',') FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'protobalance'",
        )
        .expect("psql");
    assert!(
        encrypted.split(',').count() >= 2 && encrypted.split(',').all(|s| s == "true"),
        "the node's connections (pool and listener), encrypted: {encrypted}"
    );

    // sslmode=require without a CA file: a message that names the fix.
    let error = PostgresSettings {
        url: format!("{} sslmode=require", pg.url()),
        ..settings(&pg)
    }
    .pg_config()
    .expect_err("sslmode=require alone");
    assert!(error.to_string().contains("ca_file"), "{error}");
}
