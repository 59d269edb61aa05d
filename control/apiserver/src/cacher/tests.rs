//! The watch cache against real stores (embedded and etcd): concurrent writers, many
//! watchers starting at different revisions; each must see exactly the store's own events
//! after its start, in order, none skipped or repeated.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use weir_api::registry;
use weir_store::{EmbeddedStore, EtcdProcess, EtcdStore, Store};

use super::*;

fn configmaps() -> &'static Resource {
    registry::find("", "v1", "configmaps").expect("configmaps are registered")
}

/// (revision, key, deleted) of every change, as the store's own watch reports them.
type Change = (i64, String, bool);

async fn reference(store: &dyn Store, prefix: &str, after: i64, n: usize) -> Vec<Change> {
    let mut watch = store.watch(prefix, after).await.expect("store watch");
    let mut seen = Vec::new();
    while seen.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .expect("store watch in time")
            .expect("store watch open")
            .expect("store watch event");
        for e in batch {
            let deleted = matches!(e, Event::Delete { .. });
            seen.push((e.revision(), e.key().to_string(), deleted));
        }
    }
    seen
}

/// Everything a cache subscription delivers until it has `n` changes.
async fn drain(mut sub: Subscription, n: usize) -> Vec<Change> {
    let mut seen: Vec<Change> = sub
        .backlog
        .iter()
        .map(|e| (e.revision, e.key.clone(), e.deleted))
        .collect();
    while seen.len() < n {
        let e = tokio::time::timeout(Duration::from_secs(20), sub.live.recv())
            .await
            .expect("cache event in time")
            .expect("cache subscription open (not lagged)");
        seen.push((e.revision, e.key.clone(), e.deleted));
    }
    seen
}

async fn ordered_and_complete(store: Arc<dyn Store>) {
    let res = configmaps();
    let prefix = res.key_prefix();
    let obj = |ns: &str, name: &str, v: usize| {
        json!({"metadata": {"name": name, "namespace": ns}, "data": {"v": v.to_string()}})
            .to_string()
            .into_bytes()
    };
    store
        .create(&res.key(Some("a"), "before"), obj("a", "before", 0))
        .await
        .expect("seed");
    let caches = Caches::new(store.clone(), CancellationToken::new());
    let cacher = caches.get(res).await.expect("cache");
    let start = store.current_revision().await.expect("revision");
    let snap = cacher.snapshot(&prefix);
    assert_eq!(snap.revision, start);
    assert_eq!(snap.objects.len(), 1);
    assert_eq!(snap.objects[0].obj["kind"], "ConfigMap");
    assert_eq!(
        snap.objects[0].obj["metadata"]["resourceVersion"],
        start.to_string()
    );

    // 4 writers × 30 keys: create, update, delete each (360 changes).
    const WRITERS: usize = 4;
    const KEYS: usize = 30;
    let total = WRITERS * KEYS * 3;
    let from_start = cacher
        .subscribe(start)
        .expect("subscribe at the cache's revision");
    let want = tokio::spawn({
        let store = store.clone();
        let prefix = prefix.clone();
        async move { reference(store.as_ref(), &prefix, start, total).await }
    });
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let ns = if w % 2 == 0 { "a" } else { "b" };
                for k in 0..KEYS {
                    let key = res.key(Some(ns), &format!("w{w}-{k}"));
                    let kv = store
                        .create(&key, obj(ns, &format!("w{w}-{k}"), 0))
                        .await
                        .expect("create");
                    let kv = store
                        .update(&key, obj(ns, &format!("w{w}-{k}"), 1), kv.mod_revision)
                        .await
                        .expect("update");
                    store
                        .delete(&key, Some(kv.mod_revision))
                        .await
                        .expect("delete");
                }
            })
        })
        .collect();
    // Watchers that join while the writers run, from revisions already in the ring.
    let mut late = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let after = cacher.lock().revision;
        let sub = cacher
            .subscribe(after)
            .expect("subscribe at the current revision");
        late.push((after, tokio::spawn(async move { sub })));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let want = want.await.expect("reference watch");
    assert_eq!(
        drain(from_start, total).await,
        want,
        "watcher from the start"
    );
    for (after, sub) in late {
        let sub = sub.await.expect("subscription");
        let expected: Vec<Change> = want.iter().filter(|c| c.0 > after).cloned().collect();
        let got = drain(sub, expected.len()).await;
        assert_eq!(got, expected, "watcher from revision {after}");
    }
    // Deletes carry the object's last state at the delete's revision.
    let state = cacher.lock();
    let last = state.ring.back().expect("events in the ring");
    assert!(last.deleted);
    assert_eq!(
        last.obj.obj["metadata"]["resourceVersion"],
        last.revision.to_string()
    );
    assert_eq!(last.prev.as_ref().expect("prev").obj["data"]["v"], "1");
    assert_eq!(state.objects.len(), 1, "only the seed object is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_ordered_and_complete_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path().join("s.redb")).expect("open");
    ordered_and_complete(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_ordered_and_complete_on_etcd() {
    let etcd = EtcdProcess::start().await.expect("etcd");
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .expect("connect");
    ordered_and_complete(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_bounds_history_and_slow_watchers_lag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(dir.path().join("s.redb")).expect("open"));
    let res = configmaps();
    let caches = Caches::new(store.clone(), CancellationToken::new());
    let cacher = caches.get(res).await.expect("cache");
    let start = store.current_revision().await.expect("revision");
    let mut slow = cacher.subscribe(start).expect("subscribe");
    let n = RING + 10;
    // 16 concurrent writers, so the embedded store's group commit shares the fsyncs.
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in (w..n).step_by(16) {
                    let key = res.key(Some("a"), &format!("c{i}"));
                    let value = json!({"metadata": {"name": format!("c{i}")}});
                    store
                        .create(&key, value.to_string().into_bytes())
                        .await
                        .expect("create");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    let last = store.current_revision().await.expect("revision");
    while cacher.lock().revision < last {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        cacher.subscribe(start).is_none(),
        "revisions before the ring are not served"
    );
    let recent = cacher.subscribe(last - 5).expect("recent revisions are");
    assert_eq!(recent.backlog.len(), 5);
    match slow.live.recv().await {
        Err(broadcast::error::RecvError::Lagged(_)) => {}
        other => panic!(
            "a watcher {n} events behind must lag, got {:?}",
            other.map(|e| e.revision)
        ),
    }
}
