//! Embedded-store behaviour beyond the shared conformance suite: persistence across a
//! restart, bounded history, and a watcher that falls behind live delivery.

use futures::StreamExt;

use super::*;
use crate::conformance::next_events;

fn log_len(store: &EmbeddedStore) -> u64 {
    let txn = store.shared.db.begin_read().expect("begin read");
    let log = txn.open_table(LOG).expect("open log");
    redb::ReadableTableMetadata::len(&log).expect("log length")
}

#[tokio::test]
async fn restart_keeps_data_history_and_revisions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nested/store.redb");
    let (a2, deleted_at) = {
        let store = EmbeddedStore::open(&path).expect("open");
        let a = store.create("/x/a", b"1".to_vec()).await.expect("create");
        let a2 = store
            .update("/x/a", b"2".to_vec(), a.mod_revision)
            .await
            .expect("update");
        store.create("/x/b", b"b".to_vec()).await.expect("create");
        let (_, deleted_at) = store.delete("/x/b", None).await.expect("delete");
        (a2, deleted_at)
    };

    let store = EmbeddedStore::open(&path).expect("reopen right after drop");
    assert_eq!(store.current_revision().await.expect("current"), deleted_at);
    assert_eq!(store.get("/x/a").await.expect("get"), Some(a2.clone()));
    assert_eq!(store.get("/x/b").await.expect("get"), None);
    let c = store.create("/x/c", b"c".to_vec()).await.expect("create");
    assert_eq!(c.mod_revision, deleted_at + 1, "revisions continue");

    // History survived too: a list at an old revision and a watch from the beginning.
    let old = store
        .list(
            "/x/",
            ListOptions {
                revision: deleted_at - 1,
                ..Default::default()
            },
        )
        .await
        .expect("list at an old revision");
    assert_eq!(old.items.len(), 2);
    let mut watch = store.watch("/x/", 1).await.expect("watch");
    let events = next_events(&mut watch, 5).await;
    assert_eq!(events.last().map(Event::revision), Some(c.mod_revision));
}

#[tokio::test]
async fn history_is_compacted_automatically() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = EmbeddedOptions {
        history_revisions: 20,
        ..Default::default()
    };
    let store = EmbeddedStore::open_with(dir.path().join("s.redb"), options).expect("open");
    let first = store.create("/h/k", b"0".to_vec()).await.expect("create");
    let mut kv = first.clone();
    for i in 1..60 {
        kv = store
            .update("/h/k", i.to_string().into_bytes(), kv.mod_revision)
            .await
            .expect("update");
        // History never exceeds the kept revisions plus one step (2 here).
        assert!(
            log_len(&store) <= 22,
            "log holds {} entries",
            log_len(&store)
        );
    }
    let old = ListOptions {
        revision: first.mod_revision,
        ..Default::default()
    };
    match store.list("/h/", old).await {
        Err(Error::Compacted {
            compact_revision, ..
        }) => assert!(compact_revision >= kv.mod_revision - 22),
        other => panic!("list at an auto-compacted revision: {other:?}"),
    }
    // The kept window still works.
    let mut watch = store
        .watch("/h/", kv.mod_revision - 20)
        .await
        .expect("watch within the kept history");
    let events = next_events(&mut watch, 20).await;
    assert_eq!(events.last().map(Event::revision), Some(kv.mod_revision));
}

#[tokio::test]
async fn slow_watcher_catches_up_from_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = EmbeddedOptions {
        watch_backlog: 2,
        ..Default::default()
    };
    let store = EmbeddedStore::open_with(dir.path().join("s.redb"), options).expect("open");
    let start = store.current_revision().await.expect("current");
    let mut watch = store.watch("/s/", start).await.expect("watch");
    // Far more write batches than the backlog, while the watcher reads nothing.
    for i in 0..40 {
        store
            .create(&format!("/s/{i:02}"), b"v".to_vec())
            .await
            .expect("create");
    }
    let events = next_events(&mut watch, 40).await;
    let revisions: Vec<i64> = events.iter().map(Event::revision).collect();
    let expected: Vec<i64> = (start + 1..=start + 40).collect();
    assert_eq!(revisions, expected, "no gap and no duplicate after lagging");
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(100), watch.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn dropping_the_store_ends_watches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path().join("s.redb")).expect("open");
    let mut watch = store.watch("/", 1).await.expect("watch");
    drop(store);
    match tokio::time::timeout(std::time::Duration::from_secs(5), watch.next()).await {
        Ok(Some(Err(Error::Unavailable(_))) | None) => {}
        other => panic!("watch after the store closed: {other:?}"),
    }
}

#[test]
fn invalid_options_are_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = EmbeddedOptions {
        history_revisions: 0,
        ..Default::default()
    };
    match EmbeddedStore::open_with(dir.path().join("s.redb"), options) {
        Err(Error::Internal(msg)) => assert!(msg.contains("history_revisions"), "{msg}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("history_revisions 0 was accepted"),
    }
}
