//! The one conformance suite both backends must pass: every check below runs against the
//! embedded store and against a real etcd started by [`EtcdProcess`](crate::EtcdProcess)
//! (see the `suite!` invocations at the end). The checks are what the API server relies on.

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::{
    EmbeddedStore, Error, EtcdProcess, EtcdStore, Event, KeyValue, ListOptions, Store, WatchStream,
};

/// A store under test and whatever must outlive it (temp dir, etcd process).
pub(crate) struct Backend {
    pub(crate) store: Arc<dyn Store>,
    _keep: Box<dyn Any + Send>,
}

pub(crate) async fn embedded() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path().join("store.redb")).expect("open embedded store");
    Backend {
        store: Arc::new(store),
        _keep: Box::new(dir),
    }
}

pub(crate) async fn etcd() -> Backend {
    let etcd = EtcdProcess::start().await.expect("start etcd");
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .expect("connect to etcd");
    Backend {
        store: Arc::new(store),
        _keep: Box::new(etcd),
    }
}

const WAIT: Duration = Duration::from_secs(10);

/// The next `n` events of `stream`, failing the test on an error, an end or a stall.
pub(crate) async fn next_events(stream: &mut WatchStream, n: usize) -> Vec<Event> {
    let mut events = Vec::new();
    while events.len() < n {
        let item = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("watch stalled after {} of {n} events", events.len()));
        match item {
            Some(Ok(batch)) => events.extend(batch),
            Some(Err(e)) => panic!("watch failed after {} of {n} events: {e}", events.len()),
            None => panic!("watch ended after {} of {n} events", events.len()),
        }
    }
    assert_eq!(events.len(), n, "more events than expected: {events:?}");
    events
}

/// Asserts that nothing arrives on `stream` for `quiet`.
pub(crate) async fn assert_quiet(stream: &mut WatchStream, quiet: Duration) {
    if let Ok(item) = tokio::time::timeout(quiet, stream.next()).await {
        panic!("expected no watch item, got {item:?}");
    }
}

fn put_kv(event: &Event) -> (&KeyValue, Option<&KeyValue>) {
    match event {
        Event::Put { kv, prev } => (kv, prev.as_ref()),
        Event::Delete { .. } => panic!("expected a put, got {event:?}"),
    }
}

fn keys(items: &[KeyValue]) -> Vec<&str> {
    items.iter().map(|kv| kv.key.as_str()).collect()
}

async fn crud(store: Arc<dyn Store>) {
    let s = store.as_ref();
    assert_eq!(s.get("/c/a").await.expect("get"), None);

    let created = s.create("/c/a", b"one".to_vec()).await.expect("create");
    assert_eq!(created.key, "/c/a");
    assert_eq!(created.value, b"one");
    assert_eq!(created.create_revision, created.mod_revision);
    assert_eq!(s.get("/c/a").await.expect("get"), Some(created.clone()));

    match s.create("/c/a", b"again".to_vec()).await {
        Err(Error::AlreadyExists { key }) => assert_eq!(key, "/c/a"),
        other => panic!("create of an existing key: {other:?}"),
    }

    let updated = s
        .update("/c/a", b"two".to_vec(), created.mod_revision)
        .await
        .expect("update");
    assert!(updated.mod_revision > created.mod_revision);
    assert_eq!(updated.create_revision, created.create_revision);
    assert_eq!(updated.value, b"two");

    match s
        .update("/c/a", b"stale".to_vec(), created.mod_revision)
        .await
    {
        Err(Error::Conflict {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, "/c/a");
            assert_eq!(expected, created.mod_revision);
            assert_eq!(actual, updated.mod_revision);
        }
        other => panic!("stale update: {other:?}"),
    }
    // An update with revision 0 must not create a missing key.
    match s.update("/c/missing", b"x".to_vec(), 0).await {
        Err(Error::NotFound { key }) => assert_eq!(key, "/c/missing"),
        other => panic!("update of a missing key: {other:?}"),
    }
    assert_eq!(s.get("/c/missing").await.expect("get"), None);
    assert_eq!(s.get("/c/a").await.expect("get"), Some(updated.clone()));

    match s.delete("/c/a", Some(created.mod_revision)).await {
        Err(Error::Conflict { actual, .. }) => assert_eq!(actual, updated.mod_revision),
        other => panic!("stale delete: {other:?}"),
    }
    let (deleted, at) = s
        .delete("/c/a", Some(updated.mod_revision))
        .await
        .expect("delete");
    assert_eq!(deleted, updated);
    assert!(at > updated.mod_revision);
    assert_eq!(s.get("/c/a").await.expect("get"), None);
    match s.delete("/c/a", None).await {
        Err(Error::NotFound { key }) => assert_eq!(key, "/c/a"),
        other => panic!("delete of a missing key: {other:?}"),
    }

    // A new life of the key starts a new create_revision.
    let again = s
        .create("/c/a", b"three".to_vec())
        .await
        .expect("re-create");
    assert!(again.create_revision > at);
    let (gone, _) = s.delete("/c/a", None).await.expect("unconditional delete");
    assert_eq!(gone, again);
}

async fn revisions(store: Arc<dyn Store>) {
    let s = store.as_ref();
    let mut last = s.current_revision().await.expect("current revision");
    for i in 0..5 {
        let kv = s
            .create(&format!("/r/{i}"), b"v".to_vec())
            .await
            .expect("create");
        assert_eq!(kv.mod_revision, last + 1, "each write is the next revision");
        last = kv.mod_revision;
        // Failed writes do not use up a revision.
        let _ = s.create(&format!("/r/{i}"), b"v".to_vec()).await;
        let _ = s.update(&format!("/r/{i}"), b"v".to_vec(), 1).await;
        assert_eq!(s.current_revision().await.expect("current revision"), last);
    }
    let kv = s
        .update("/r/0", b"w".to_vec(), last - 4)
        .await
        .expect("update");
    assert_eq!(kv.mod_revision, last + 1);
    let (_, at) = s.delete("/r/1", None).await.expect("delete");
    assert_eq!(at, last + 2);
    assert_eq!(s.current_revision().await.expect("current"), at);
}

async fn list_at_revision(store: Arc<dyn Store>) {
    let s = store.as_ref();
    let a = s.create("/l/a", b"a1".to_vec()).await.expect("create");
    let b = s.create("/l/b", b"b1".to_vec()).await.expect("create");
    s.create("/l/c", b"c1".to_vec()).await.expect("create");
    let before = s
        .list("/l/", ListOptions::default())
        .await
        .expect("list latest");
    assert_eq!(keys(&before.items), ["/l/a", "/l/b", "/l/c"]);
    assert_eq!(
        before.revision,
        s.current_revision().await.expect("current")
    );
    assert!(!before.more);

    s.update("/l/b", b"b2".to_vec(), b.mod_revision)
        .await
        .expect("update");
    s.delete("/l/a", Some(a.mod_revision))
        .await
        .expect("delete");
    s.create("/l/d", b"d1".to_vec()).await.expect("create");
    s.create("/l/a", b"a2".to_vec()).await.expect("re-create");

    let now = s
        .list("/l/", ListOptions::default())
        .await
        .expect("list latest");
    assert_eq!(keys(&now.items), ["/l/a", "/l/b", "/l/c", "/l/d"]);
    assert_eq!(now.items[0].value, b"a2");
    assert_eq!(now.items[1].value, b"b2");

    let then = s
        .list(
            "/l/",
            ListOptions {
                revision: before.revision,
                ..Default::default()
            },
        )
        .await
        .expect("list at the old revision");
    assert_eq!(then, before, "a list at a revision sees that revision");

    match s
        .list(
            "/l/",
            ListOptions {
                revision: now.revision + 100,
                ..Default::default()
            },
        )
        .await
    {
        Err(Error::FutureRevision { requested, current }) => {
            assert_eq!(requested, now.revision + 100);
            assert_eq!(current, now.revision);
        }
        other => panic!("list at a future revision: {other:?}"),
    }
}

async fn paging(store: Arc<dyn Store>) {
    let s = store.as_ref();
    for i in 0..10 {
        s.create(&format!("/p/{i:02}"), format!("v{i}").into_bytes())
            .await
            .expect("create");
    }
    let first = s
        .list(
            "/p/",
            ListOptions {
                limit: 4,
                ..Default::default()
            },
        )
        .await
        .expect("first page");
    assert_eq!(keys(&first.items), ["/p/00", "/p/01", "/p/02", "/p/03"]);
    assert!(first.more);

    // Writes between pages must not show in later pages read at the first page's revision.
    s.create("/p/05a", b"new".to_vec()).await.expect("create");
    s.delete("/p/07", None).await.expect("delete");
    let seven = s.get("/p/08").await.expect("get").expect("exists");
    s.update("/p/08", b"changed".to_vec(), seven.mod_revision)
        .await
        .expect("update");

    let mut all = first.items.clone();
    let mut more = first.more;
    while more {
        let page = s
            .list(
                "/p/",
                ListOptions {
                    revision: first.revision,
                    limit: 4,
                    start_after: all.last().map(|kv| kv.key.clone()),
                },
            )
            .await
            .expect("next page");
        assert_eq!(page.revision, first.revision);
        assert!(page.items.len() <= 4);
        more = page.more;
        all.extend(page.items);
    }
    let expected: Vec<String> = (0..10).map(|i| format!("/p/{i:02}")).collect();
    assert_eq!(keys(&all), expected);
    assert_eq!(
        all[8].value, b"v8",
        "page at the old revision shows the old value"
    );

    // The last page of exactly `limit` items has nothing more.
    let tail = s
        .list(
            "/p/",
            ListOptions {
                limit: 2,
                start_after: Some("/p/06".into()),
                ..Default::default()
            },
        )
        .await
        .expect("tail page");
    assert_eq!(keys(&tail.items), ["/p/08", "/p/09"]);
    assert!(!tail.more);
}

async fn watch_from_revision(store: Arc<dyn Store>) {
    let s = store.as_ref();
    let start = s.current_revision().await.expect("current");
    let a = s.create("/w/a", b"1".to_vec()).await.expect("create");
    s.create("/other/x", b"x".to_vec()).await.expect("create");
    let a2 = s
        .update("/w/a", b"2".to_vec(), a.mod_revision)
        .await
        .expect("update");
    let b = s.create("/w/b", b"b".to_vec()).await.expect("create");
    let (_, deleted_at) = s.delete("/w/a", None).await.expect("delete");

    let mut watch = s.watch("/w/", start).await.expect("watch");
    let events = next_events(&mut watch, 4).await;
    assert_eq!(
        events,
        [
            Event::Put {
                kv: a.clone(),
                prev: None
            },
            Event::Put {
                kv: a2.clone(),
                prev: Some(a.clone())
            },
            Event::Put {
                kv: b.clone(),
                prev: None
            },
            Event::Delete {
                prev: a2.clone(),
                revision: deleted_at
            },
        ]
    );

    // Then live events, after the history, in order.
    let c = s.create("/w/c", b"c".to_vec()).await.expect("create");
    s.create("/other/y", b"y".to_vec()).await.expect("create");
    let b2 = s
        .update("/w/b", b"b2".to_vec(), b.mod_revision)
        .await
        .expect("update");
    let live = next_events(&mut watch, 2).await;
    assert_eq!(
        live,
        [
            Event::Put { kv: c, prev: None },
            Event::Put {
                kv: b2,
                prev: Some(b.clone())
            },
        ]
    );
    assert_quiet(&mut watch, Duration::from_millis(200)).await;

    // From a revision in the middle: only what came after it.
    let mut mid = s.watch("/w/", a2.mod_revision).await.expect("watch");
    let events = next_events(&mut mid, 4).await;
    let revisions: Vec<i64> = events.iter().map(Event::revision).collect();
    assert_eq!(revisions[0], b.mod_revision);
    assert_eq!(revisions[1], deleted_at);
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
}

async fn compaction(store: Arc<dyn Store>) {
    let s = store.as_ref();
    let first = s.create("/k/a", b"1".to_vec()).await.expect("create");
    let mut last = first.clone();
    for i in 2..=5 {
        last = s
            .update("/k/a", format!("{i}").into_bytes(), last.mod_revision)
            .await
            .expect("update");
    }
    let compact_at = last.mod_revision - 1;
    s.compact(compact_at).await.expect("compact");

    let old = ListOptions {
        revision: first.mod_revision,
        ..Default::default()
    };
    match s.list("/k/", old).await {
        Err(Error::Compacted {
            requested,
            compact_revision,
        }) => {
            assert_eq!(requested, first.mod_revision);
            assert_eq!(compact_revision, compact_at);
        }
        other => panic!("list at a compacted revision: {other:?}"),
    }
    match s.watch("/k/", first.mod_revision).await {
        Err(Error::Compacted { .. }) => {}
        Ok(mut stream) => match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Err(Error::Compacted { .. }))) => {}
            other => panic!("watch from a compacted revision: {other:?}"),
        },
        Err(e) => panic!("watch from a compacted revision: {e}"),
    }
    match s.compact(compact_at - 1).await {
        Err(Error::Compacted { .. }) => {}
        other => panic!("compacting below the compact revision: {other:?}"),
    }

    // What is still kept works: a list at the compact revision, a watch after it.
    let at = s
        .list(
            "/k/",
            ListOptions {
                revision: compact_at,
                ..Default::default()
            },
        )
        .await
        .expect("list at the compact revision");
    assert_eq!(at.items[0].value, b"4");
    let mut watch = s.watch("/k/", compact_at).await.expect("watch");
    let events = next_events(&mut watch, 1).await;
    assert_eq!(put_kv(&events[0]).0, &last);
}

async fn prefix_isolation(store: Arc<dyn Store>) {
    let s = store.as_ref();
    let start = s.current_revision().await.expect("current");
    s.create("/a/x", b"1".to_vec()).await.expect("create");
    s.create("/ab/y", b"2".to_vec()).await.expect("create");
    s.create("/a", b"3".to_vec()).await.expect("create");
    s.create("/a/z", b"4".to_vec()).await.expect("create");
    let list = s.list("/a/", ListOptions::default()).await.expect("list");
    assert_eq!(keys(&list.items), ["/a/x", "/a/z"]);
    let mut watch = s.watch("/a/", start).await.expect("watch");
    let events = next_events(&mut watch, 2).await;
    let seen: Vec<&str> = events.iter().map(Event::key).collect();
    assert_eq!(seen, ["/a/x", "/a/z"]);
    assert_quiet(&mut watch, Duration::from_millis(200)).await;

    // The empty prefix is everything.
    let all = s.list("", ListOptions::default()).await.expect("list all");
    assert_eq!(keys(&all.items), ["/a", "/a/x", "/a/z", "/ab/y"]);
}

/// Objects up to etcd's default 1.5 MiB request limit, a list larger than gRPC's default
/// 4 MiB message limit, and a clear error (nothing stored) over the limit.
async fn large_values(store: Arc<dyn Store>) {
    let value = vec![b'v'; 1024 * 1024];
    for i in 0..5 {
        store
            .create(&format!("/big/{i}"), value.clone())
            .await
            .expect("create a 1 MiB value");
    }
    let list = store
        .list("/big/", ListOptions::default())
        .await
        .expect("list 5 MiB");
    assert_eq!(list.items.len(), 5);
    assert!(list.items.iter().all(|kv| kv.value == value));

    let huge = vec![b'v'; 2 * 1024 * 1024];
    match store.create("/big/huge", huge.clone()).await {
        Err(Error::ValueTooLarge { key, size, .. }) => {
            assert_eq!((key.as_str(), size), ("/big/huge", huge.len()));
        }
        other => panic!("create of a 2 MiB value: {other:?}"),
    }
    let kv = store.get("/big/0").await.expect("get").expect("exists");
    match store.update("/big/0", huge, kv.mod_revision).await {
        Err(Error::ValueTooLarge { .. }) => {}
        other => panic!("update to a 2 MiB value: {other:?}"),
    }
    assert_eq!(store.get("/big/0").await.expect("get"), Some(kv));
    assert_eq!(store.get("/big/huge").await.expect("get"), None);
}

const WRITERS: usize = 16;
const WRITES_EACH: usize = 50;

/// Many writers increment one key with a compare-and-swap loop: no update may be lost.
async fn one_key_many_writers(store: Arc<dyn Store>) {
    store
        .create("/n/counter", b"0".to_vec())
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0_usize;
            for _ in 0..WRITES_EACH {
                loop {
                    let kv = store
                        .get("/n/counter")
                        .await
                        .expect("get")
                        .expect("counter exists");
                    let n: u64 = std::str::from_utf8(&kv.value)
                        .expect("utf-8")
                        .parse()
                        .expect("a number");
                    match store
                        .update(
                            "/n/counter",
                            (n + 1).to_string().into_bytes(),
                            kv.mod_revision,
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(Error::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("increment failed: {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.expect("writer task");
    }
    let kv = store
        .get("/n/counter")
        .await
        .expect("get")
        .expect("counter exists");
    assert_eq!(kv.value, (WRITERS * WRITES_EACH).to_string().into_bytes());
    eprintln!(
        "one key, {WRITERS} writers x {WRITES_EACH} increments: no lost update, \
         {conflicts} conflicts retried"
    );
}

/// Many concurrent creates of distinct keys: all stored, each at its own revision, and a
/// watcher sees every one in revision order.
async fn many_keys_many_writers(store: Arc<dyn Store>) {
    let start = store.current_revision().await.expect("current");
    let mut watch = store.watch("/m/", start).await.expect("watch");
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..WRITES_EACH {
                let kv = store
                    .create(&format!("/m/{w:02}/{i:03}"), b"v".to_vec())
                    .await
                    .expect("create");
                revisions.push(kv.mod_revision);
            }
            revisions
        }));
    }
    let mut revisions = HashSet::new();
    for task in tasks {
        for r in task.await.expect("writer task") {
            assert!(revisions.insert(r), "revision {r} given twice");
        }
    }
    let total = WRITERS * WRITES_EACH;
    assert_eq!(revisions.len(), total);
    let list = store
        .list("/m/", ListOptions::default())
        .await
        .expect("list");
    assert_eq!(list.items.len(), total);
    let events = next_events(&mut watch, total).await;
    let seen: Vec<i64> = events.iter().map(Event::revision).collect();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "events out of order");
    assert_eq!(seen.iter().copied().collect::<HashSet<_>>(), revisions);
}

/// `create_all` writes every key or none, and a watch sees exactly the keys it wrote.
async fn create_all(store: Arc<dyn Store>) {
    let s = store.as_ref();
    let start = s.current_revision().await.expect("revision");
    let mut watch = s.watch("/c/", start).await.expect("watch");
    assert_eq!(s.create_all(Vec::new()).await.expect("nothing"), Vec::new());
    let made = s
        .create_all(vec![
            ("/c/a".into(), b"1".to_vec()),
            ("/c/b".into(), b"2".to_vec()),
        ])
        .await
        .expect("create both");
    assert_eq!(keys(&made), ["/c/a", "/c/b"]);
    for kv in &made {
        assert!(kv.mod_revision > start && kv.create_revision == kv.mod_revision);
        assert_eq!(s.get(&kv.key).await.expect("get").as_ref(), Some(kv));
    }
    // One existing key: nothing is written, and the error names that key.
    let before = s.current_revision().await.expect("revision");
    match s
        .create_all(vec![
            ("/c/x".into(), b"3".to_vec()),
            ("/c/b".into(), b"4".to_vec()),
        ])
        .await
    {
        Err(Error::AlreadyExists { key }) => assert_eq!(key, "/c/b"),
        other => panic!("expected AlreadyExists for /c/b, got {other:?}"),
    }
    match s
        .create_all(vec![
            ("/c/y".into(), b"5".to_vec()),
            ("/c/y".into(), b"6".to_vec()),
        ])
        .await
    {
        Err(Error::AlreadyExists { key }) => assert_eq!(key, "/c/y"),
        other => panic!("expected AlreadyExists for the repeated /c/y, got {other:?}"),
    }
    assert_eq!(s.get("/c/x").await.expect("get"), None);
    assert_eq!(s.get("/c/y").await.expect("get"), None);
    assert_eq!(s.current_revision().await.expect("revision"), before);
    let events = next_events(&mut watch, 2).await;
    let seen: Vec<&KeyValue> = events.iter().map(|e| put_kv(e).0).collect();
    assert_eq!(seen, made.iter().collect::<Vec<_>>());
    assert_quiet(&mut watch, Duration::from_millis(200)).await;
}

macro_rules! suite {
    ($backend:ident) => {
        mod $backend {
            macro_rules! check {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let backend = super::$backend().await;
                        super::$name(backend.store.clone()).await;
                    }
                };
            }
            check!(crud);
            check!(revisions);
            check!(list_at_revision);
            check!(paging);
            check!(watch_from_revision);
            check!(compaction);
            check!(prefix_isolation);
            check!(large_values);
            check!(one_key_many_writers);
            check!(many_keys_many_writers);
            check!(create_all);
        }
    };
}

suite!(embedded);
suite!(etcd);
