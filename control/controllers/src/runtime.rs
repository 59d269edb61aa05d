//! A small controller runtime on kube-rs reflectors: every watched resource is reflected
//! into a store first and only then mapped to the primary objects it affects, so a reconcile
//! always sees at least the state that triggered it. (kube's `Controller` can only share
//! reflected streams behind an unstable feature flag; this keeps one watch per resource.)
//! Keys are deduplicated, one key is never reconciled twice at once, and failures back off.

use std::collections::{HashSet, VecDeque};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{self, BoxStream, FuturesUnordered};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::util::{Backoff, Error};

/// Reconciles running at once per controller.
const CONCURRENCY: usize = 8;

/// What a reconcile asks for next.
pub enum Next {
    /// Nothing until something changes.
    Wait,
    /// Reconcile again after this long even if nothing changes.
    After(Duration),
}

/// Reflect `api` into a store. The returned stream must be polled (by [`run`]) for the store
/// to fill; it yields every object applied or deleted, after the store has it.
pub fn reflect<K>(api: Api<K>, wc: watcher::Config) -> (Store<K>, BoxStream<'static, K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, wc)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .filter_map(|r| async move {
            r.map_err(|e| warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying"))
                .ok()
        })
        .boxed();
    (store, events)
}

/// Turn a stream of changed objects into the primary keys they affect.
pub fn map<K, P, I>(
    events: BoxStream<'static, K>,
    mapper: impl Fn(&K) -> I + Send + 'static,
) -> BoxStream<'static, ObjectRef<P>>
where
    K: Send + 'static,
    P: Resource<DynamicType = ()> + 'static,
    I: IntoIterator<Item = ObjectRef<P>>,
    I::IntoIter: Send + 'static,
{
    events
        .flat_map(move |obj| stream::iter(mapper(&obj)))
        .boxed()
}

/// Reconcile objects of `store` whose keys arrive on `triggers`, until `shutdown`.
pub async fn run<K, F, Fut>(
    name: &'static str,
    store: Store<K>,
    triggers: Vec<BoxStream<'static, ObjectRef<K>>>,
    reconcile: F,
    shutdown: impl Future<Output = ()>,
) where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    ObjectRef<K>: Hash + Eq + Clone,
    F: Fn(Arc<K>) -> Fut,
    Fut: Future<Output = Result<Next, Error>> + Send + 'static,
{
    let (requeue_tx, mut requeue_rx) = mpsc::unbounded_channel::<ObjectRef<K>>();
    let mut inputs = stream::select_all(triggers);
    let mut queue: VecDeque<ObjectRef<K>> = VecDeque::new();
    let mut queued: HashSet<ObjectRef<K>> = HashSet::new();
    let mut running: HashSet<ObjectRef<K>> = HashSet::new();
    let mut dirty: HashSet<ObjectRef<K>> = HashSet::new();
    let mut inflight = FuturesUnordered::new();
    let backoff = Backoff::default();
    let requeue = |key: ObjectRef<K>, after: Duration| {
        let tx = requeue_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(key);
        });
    };
    tokio::pin!(shutdown);
    loop {
        while inflight.len() < CONCURRENCY {
            let Some(key) = queue.pop_front() else { break };
            queued.remove(&key);
            // Deleted since it was queued: nothing to reconcile (owned objects go through
            // their ownerReferences and the garbage collector).
            let Some(obj) = store.get(&key) else { continue };
            running.insert(key.clone());
            let fut = reconcile(obj);
            inflight.push(async move { (key, fut.await) });
        }
        tokio::select! {
            () = &mut shutdown => return,
            Some(key) = inputs.next() => enqueue(key, &running, &mut dirty, &mut queued, &mut queue),
            Some(key) = requeue_rx.recv() => enqueue(key, &running, &mut dirty, &mut queued, &mut queue),
            Some((key, result)) = inflight.next(), if !inflight.is_empty() => {
                running.remove(&key);
                let id = key.to_string();
                match result {
                    Ok(Next::Wait) => backoff.succeeded(&id),
                    Ok(Next::After(d)) => {
                        backoff.succeeded(&id);
                        requeue(key.clone(), d);
                    }
                    Err(e) => {
                        let delay = backoff.failed(&id);
                        warn!(controller = name, object = %id, error = %e, retry_in = ?delay, "reconcile failed");
                        requeue(key.clone(), delay);
                    }
                }
                if dirty.remove(&key) {
                    debug!(controller = name, object = %key, "changed while reconciling; again");
                    enqueue(key, &running, &mut dirty, &mut queued, &mut queue);
                }
            }
        }
    }
}

fn enqueue<T: Hash + Eq + Clone>(
    key: T,
    running: &HashSet<T>,
    dirty: &mut HashSet<T>,
    queued: &mut HashSet<T>,
    queue: &mut VecDeque<T>,
) {
    if running.contains(&key) {
        dirty.insert(key);
    } else if queued.insert(key.clone()) {
        queue.push_back(key);
    }
}
