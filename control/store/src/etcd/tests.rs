//! etcd-backend behaviour beyond the conformance suite: a real etcd killed while a watch and
//! writes are in flight, and started again.

use std::time::{Duration, Instant};

use super::*;
use crate::EtcdProcess;
use crate::conformance::{assert_quiet, next_events};

/// The request timeout of the stores these tests kill or freeze etcd under.
const TIMEOUT: Duration = SETUP_TIMEOUT;
/// A call against a dead etcd must give up within this: the timeout plus slack for a
/// loaded machine (this asserts "does not hang", not a latency).
const DEAD_BOUND: Duration = Duration::from_secs(TIMEOUT.as_secs() + 5);

#[test]
fn prefix_range_end() {
    assert_eq!(prefix_end("/a/"), b"/a0");
    assert_eq!(prefix_end("a\u{7f}"), [b'a', 0x80]);
    assert_eq!(prefix_end(""), b"\0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stopped_while_serving() {
    let mut etcd = EtcdProcess::start().await.expect("start etcd");
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .expect("connect")
        .with_request_timeout(TIMEOUT);
    let start = store.current_revision().await.expect("current");
    let mut watch = store.watch("/f/", start).await.expect("watch");
    let before = store
        .create("/f/before", b"1".to_vec())
        .await
        .expect("create");
    assert_eq!(
        next_events(&mut watch, 1).await[0].revision(),
        before.mod_revision
    );

    // Writes in flight when etcd dies, and writes while it is down.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0.. {
                let t = Instant::now();
                let result = store.create(&format!("/g/{i}"), b"v".to_vec()).await;
                let failed = result.is_err();
                outcomes.push((result.map(|_| ()), t.elapsed()));
                if failed && outcomes.iter().filter(|(r, _)| r.is_err()).count() >= 3 {
                    return outcomes;
                }
            }
            outcomes
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    etcd.stop();
    let outcomes = tokio::time::timeout(3 * DEAD_BOUND + Duration::from_secs(2), writer)
        .await
        .expect("writes against a dead etcd hang")
        .expect("writer task");
    for (result, took) in &outcomes {
        if let Err(e) = result {
            assert!(
                matches!(e, Error::Unavailable(_) | Error::Timeout(_)),
                "write error: {e:?}"
            );
            assert!(*took < DEAD_BOUND, "a failed write took {took:?}");
        }
    }

    for call in ["get", "list", "update", "current_revision", "watch"] {
        let t = Instant::now();
        let result = match call {
            "get" => store.get("/f/before").await.map(|_| ()),
            "list" => store.list("/f/", ListOptions::default()).await.map(|_| ()),
            "update" => store
                .update("/f/before", b"2".to_vec(), before.mod_revision)
                .await
                .map(|_| ()),
            "current_revision" => store.current_revision().await.map(|_| ()),
            _ => store.watch("/f/", start).await.map(|_| ()),
        };
        assert!(
            matches!(result, Err(Error::Unavailable(_) | Error::Timeout(_))),
            "{call} against a dead etcd: {result:?}"
        );
        assert!(t.elapsed() < DEAD_BOUND, "{call} took {:?}", t.elapsed());
    }
    // The open watch does not fail while etcd is away: it waits to resume.
    assert_quiet(&mut watch, Duration::from_millis(500)).await;

    etcd.start_again().await.expect("restart etcd");
    // The client reconnects by itself; give it a moment rather than a restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        match store.create("/f/after", b"2".to_vec()).await {
            Ok(kv) => break kv,
            Err(Error::Unavailable(e) | Error::Timeout(e)) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "etcd not reachable yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("write after etcd came back: {e}"),
        }
    };
    let updated = store
        .update("/f/after", b"3".to_vec(), after.mod_revision)
        .await
        .expect("update after etcd came back");
    let (deleted, deleted_at) = store
        .delete("/f/before", None)
        .await
        .expect("delete after etcd came back");

    // The watch resumed from its last delivered revision: exactly the events written since
    // the restart, none missed and none repeated.
    let events = next_events(&mut watch, 3).await;
    assert_eq!(
        events,
        [
            Event::Put {
                kv: after.clone(),
                prev: None
            },
            Event::Put {
                kv: updated,
                prev: Some(after)
            },
            Event::Delete {
                prev: deleted,
                revision: deleted_at
            },
        ]
    );
    assert_quiet(&mut watch, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn connect_to_a_dead_etcd_is_unavailable_quickly() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let t = Instant::now();
    match EtcdStore::connect(&[format!("http://127.0.0.1:{port}")]).await {
        Err(Error::Unavailable(msg)) => assert!(msg.contains(&port.to_string()), "{msg}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(t.elapsed() < DEAD_BOUND, "took {:?}", t.elapsed());
    match EtcdStore::connect(&[]).await {
        Err(Error::Unavailable(msg)) => assert!(msg.contains("no etcd endpoints"), "{msg}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// A hung etcd (frozen, connections open) must not hang callers: every call gives up at
/// the request timeout, and everything works again once etcd answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_etcd_times_out_and_recovers() {
    let etcd = EtcdProcess::start().await.expect("start etcd");
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .expect("connect")
        .with_request_timeout(TIMEOUT);
    let start = store.current_revision().await.expect("current");
    let mut watch = store.watch("/h/", start).await.expect("watch");

    etcd.pause().expect("pause etcd");
    let t = Instant::now();
    let (write, read) = tokio::join!(
        store.create("/h/a", b"1".to_vec()),
        store.list("/h/", ListOptions::default())
    );
    assert!(matches!(write, Err(Error::Timeout(_))), "{write:?}");
    assert!(matches!(read, Err(Error::Timeout(_))), "{read:?}");
    assert!(t.elapsed() < DEAD_BOUND, "took {:?}", t.elapsed());

    etcd.resume().expect("resume etcd");
    // The timed-out create may still have been applied once etcd thawed; either way the
    // store must work now and the watch must see every write.
    let created = match store.create("/h/a", b"1".to_vec()).await {
        Ok(kv) => kv,
        Err(Error::AlreadyExists { .. }) => store.get("/h/a").await.expect("get").expect("exists"),
        Err(e) => panic!("create after resume: {e}"),
    };
    let b = store.create("/h/b", b"2".to_vec()).await.expect("create");
    let events = next_events(&mut watch, 2).await;
    assert_eq!(events[0].revision(), created.mod_revision);
    assert_eq!(events[1].revision(), b.mod_revision);
}

#[tokio::test]
async fn compactor_bounds_history() {
    let etcd = EtcdProcess::start().await.expect("start etcd");
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .expect("connect");
    let first = store.create("/c/a", b"1".to_vec()).await.expect("create");
    let compactor = store.spawn_compactor(Duration::from_millis(100));
    let old = ListOptions {
        revision: first.mod_revision,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut kv = first.clone();
    loop {
        kv = store
            .update("/c/a", b"n".to_vec(), kv.mod_revision)
            .await
            .expect("update");
        match store.list("/c/", old.clone()).await {
            Err(Error::Compacted { .. }) => break,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("list at the first revision: {other:?}"),
        }
    }
    compactor.abort();
    // The latest state is never compacted away.
    let now = store
        .list("/c/", ListOptions::default())
        .await
        .expect("list latest");
    assert_eq!(now.items, [kv]);
}
