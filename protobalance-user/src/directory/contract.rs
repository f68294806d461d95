//! Checks of the store contract that every [`MailboxDirectory`] must meet, run against the
//! SQLite store by the unit tests and against real PostgreSQL by the integration tests.
//! Not part of the API.

use super::{Mailbox, MailboxDirectory, MoveCopy, MoveRecord};

fn copy(folder: &str, old_uid: u32, new_uid: Option<u32>) -> MoveCopy {
    MoveCopy {
        folder: folder.into(),
        validity: 7,
        old_uid,
        new_uid,
        flags: "\\Seen".into(),
    }
}

/// Move records: one per mailbox, held by one run; progress (which renews the lease) only
/// by the holder; a take-over only once the lease ended; ending drops the copies with the
/// record.
pub async fn move_records<S: MailboxDirectory>(store: &S) {
    let mailbox = Mailbox::from_store("moving@example.com".into());
    let record = MoveRecord {
        mailbox: mailbox.to_string(),
        from: "backend1".into(),
        to: "backend2".into(),
        holder: "node-a#1".into(),
        started_ms: 1_000,
        expires_ms: 1_500,
    };
    assert!(store.begin_move(&record).await.expect("begin"));
    let second = MoveRecord {
        holder: "node-b#1".into(),
        to: "backend3".into(),
        ..record.clone()
    };
    assert!(
        !store.begin_move(&second).await.expect("begin again"),
        "one move per mailbox"
    );
    assert_eq!(
        store
            .take_over_move(&mailbox, "node-b#1", 1_400, 9_000)
            .await
            .expect("take over"),
        None,
        "a live holder keeps its move"
    );
    let progress = |holder: &'static str, expires: i64, forget, copies: Vec<MoveCopy>| {
        let mailbox = mailbox.clone();
        async move {
            store
                .move_progress(&mailbox, holder, expires, forget, &copies)
                .await
                .expect("progress")
        }
    };
    assert!(
        progress(
            "node-a#1",
            1_600,
            None,
            vec![copy("INBOX", 1, Some(11)), copy("INBOX", 2, None)]
        )
        .await
    );
    assert!(
        !progress("node-b#1", 1_600, None, vec![copy("INBOX", 3, Some(13))]).await,
        "only the holder records progress"
    );
    assert!(progress("node-a#1", 1_700, None, vec![copy("Archive", 1, Some(1))]).await);
    assert_eq!(
        store.move_copies(&mailbox).await.expect("copies"),
        [
            copy("Archive", 1, Some(1)),
            copy("INBOX", 1, Some(11)),
            copy("INBOX", 2, None)
        ]
    );
    // A folder recreated on the old backend: what was recorded for it is dropped.
    assert!(
        progress(
            "node-a#1",
            1_800,
            Some("INBOX"),
            vec![copy("INBOX", 5, Some(15))]
        )
        .await
    );
    assert_eq!(
        store.move_copies(&mailbox).await.expect("copies"),
        [copy("Archive", 1, Some(1)), copy("INBOX", 5, Some(15))]
    );
    // The holder's lease, last renewed until 1 800, ended.
    assert_eq!(
        store
            .take_over_move(&mailbox, "node-b#2", 1_700, 9_000)
            .await
            .expect("take over"),
        None,
        "not before the lease ends"
    );
    let taken = store
        .take_over_move(&mailbox, "node-b#2", 5_000, 8_000)
        .await
        .expect("take over")
        .expect("a stale move is taken over");
    assert_eq!(
        taken,
        MoveRecord {
            holder: "node-b#2".into(),
            expires_ms: 8_000,
            ..record.clone()
        }
    );
    assert_eq!(
        store
            .take_over_move(&mailbox, "node-c#1", 5_001, 9_000)
            .await
            .expect("take over"),
        None,
        "taken once"
    );
    assert!(
        !progress("node-a#1", 5_100, None, Vec::new()).await,
        "the old holder learns it lost the move"
    );
    store.end_move(&mailbox, "node-a#1").await.expect("end");
    assert_eq!(store.moves().await.expect("moves"), [taken]);
    store.end_move(&mailbox, "node-b#2").await.expect("end");
    assert!(store.moves().await.expect("moves").is_empty());
    assert!(
        store
            .move_copies(&mailbox)
            .await
            .expect("copies")
            .is_empty(),
        "the copies end with the record"
    );
}
