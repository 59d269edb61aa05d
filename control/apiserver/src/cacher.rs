//! The watch cache, as kube-apiserver's "cacher": for each resource type that is watched,
//! ONE store watch feeds an in-memory copy of the type's objects and a ring of its recent
//! events, and every HTTP watch of the type is served from that copy instead of opening a
//! store watch of its own.
//!
//! Objects are decoded once per event, not once per watcher, and the JSON of an object is
//! encoded once however many watchers send it. Events reach watchers through a bounded
//! broadcast: a watcher that falls more than [`WATCHER_BUFFER`] events behind is closed, as
//! kube-apiserver closes a slow watcher, and its client watches again from the last
//! `resourceVersion` it saw. A cache whose store watch ends (store unreachable, history
//! compacted) is marked ended: its watchers are closed after the events they already have,
//! and the next watch of the type builds a new cache. Lists with `resourceVersion=0` (any
//! recent state will do) are served from the cache too.
//!
//! Order: the state lock is held while an event is applied, appended to the ring and
//! broadcast, and while a watcher copies the ring and subscribes, so a watcher gets every
//! event after its starting revision exactly once, in store order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use weir_api::Resource;
use weir_store::{Error as StoreError, Event, KeyValue, ListOptions, Store, WatchStream};

use crate::meta;

/// Recent events kept per resource type. A watch from a revision older than the ring
/// (and newer than the cache) is served by a store watch of its own instead.
pub const RING: usize = 4096;
/// Events a watcher may fall behind the cache before it is closed.
pub const WATCHER_BUFFER: usize = 1024;

/// One object as the cache holds it: decoded, with `kind`, `apiVersion` and
/// `resourceVersion` set, and its JSON encoded on first use.
pub struct CachedObject {
    pub obj: Value,
    json: OnceLock<Bytes>,
}

impl CachedObject {
    fn new(obj: Value) -> Arc<Self> {
        Arc::new(Self {
            obj,
            json: OnceLock::new(),
        })
    }

    fn decode(res: &Resource, kv: &KeyValue) -> Option<Arc<Self>> {
        match meta::from_kv(kv) {
            Ok(mut obj) => {
                meta::set_type(res, &mut obj);
                Some(Self::new(obj))
            }
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e.message, "watch cache skips an undecodable object");
                None
            }
        }
    }

    /// The object's JSON, encoded once.
    pub fn json(&self) -> &Bytes {
        self.json
            .get_or_init(|| Bytes::from(serde_json::to_vec(&self.obj).unwrap_or_default()))
    }
}

/// One change of the resource type.
pub struct CachedEvent {
    pub revision: i64,
    pub key: String,
    /// The object after a put; on a delete, its last state with the delete's revision.
    pub obj: Arc<CachedObject>,
    /// The object before: `None` for a create.
    pub prev: Option<Arc<CachedObject>>,
    pub deleted: bool,
}

struct State {
    /// The revision the cache reflects.
    revision: i64,
    /// Every event after this revision is in `ring`.
    oldest: i64,
    ring: VecDeque<Arc<CachedEvent>>,
    objects: BTreeMap<String, Arc<CachedObject>>,
    tx: broadcast::Sender<Arc<CachedEvent>>,
}

/// The cache of one resource type.
pub struct Cacher {
    res: &'static Resource,
    state: Mutex<State>,
    /// Cancelled when the store watch feeding the cache has ended.
    pub ended: CancellationToken,
}

/// What a watcher starts from: the events it missed, then the live ones.
pub struct Subscription {
    pub backlog: Vec<Arc<CachedEvent>>,
    pub live: broadcast::Receiver<Arc<CachedEvent>>,
}

/// The cached objects under a prefix and the revision they are at, with a subscription to
/// every event after it.
pub struct Snapshot {
    pub objects: Vec<Arc<CachedObject>>,
    pub revision: i64,
    pub live: broadcast::Receiver<Arc<CachedEvent>>,
}

impl Cacher {
    fn new(res: &'static Resource, items: &[KeyValue], revision: i64) -> Self {
        let objects = items
            .iter()
            .filter_map(|kv| Some((kv.key.clone(), CachedObject::decode(res, kv)?)))
            .collect();
        let (tx, _) = broadcast::channel(WATCHER_BUFFER);
        Self {
            res,
            state: Mutex::new(State {
                revision,
                oldest: revision,
                ring: VecDeque::with_capacity(RING),
                objects,
                tx,
            }),
            ended: CancellationToken::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping every watch would; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every event after `after`, or `None` when the ring no longer holds them all.
    pub fn subscribe(&self, after: i64) -> Option<Subscription> {
        let state = self.lock();
        if after < state.oldest {
            return None;
        }
        let first = state.ring.partition_point(|e| e.revision <= after);
        Some(Subscription {
            backlog: state.ring.range(first..).cloned().collect(),
            live: state.tx.subscribe(),
        })
    }

    /// The current objects under `prefix`, in key order, and a subscription to what follows.
    pub fn snapshot(&self, prefix: &str) -> Snapshot {
        let state = self.lock();
        Snapshot {
            objects: objects_under(&state, prefix),
            revision: state.revision,
            live: state.tx.subscribe(),
        }
    }

    /// The current objects under `prefix`, in key order, and the revision they are at.
    pub fn list(&self, prefix: &str) -> (Vec<Arc<CachedObject>>, i64) {
        let state = self.lock();
        (objects_under(&state, prefix), state.revision)
    }

    fn apply(&self, events: Vec<Event>) {
        let mut state = self.lock();
        for event in events {
            let revision = event.revision();
            state.revision = revision;
            let key = event.key().to_string();
            let cached = match &event {
                Event::Put { kv, .. } => {
                    let Some(obj) = CachedObject::decode(self.res, kv) else {
                        state.objects.remove(&key);
                        continue;
                    };
                    let prev = state.objects.insert(key.clone(), obj.clone());
                    CachedEvent {
                        revision,
                        key,
                        obj,
                        prev,
                        deleted: false,
                    }
                }
                Event::Delete { prev, .. } => {
                    let before = state
                        .objects
                        .remove(&key)
                        .or_else(|| CachedObject::decode(self.res, prev));
                    let Some(before) = before else { continue };
                    let mut obj = before.obj.clone();
                    meta::set_rv(&mut obj, revision);
                    CachedEvent {
                        revision,
                        key,
                        obj: CachedObject::new(obj),
                        prev: Some(before),
                        deleted: true,
                    }
                }
            };
            let cached = Arc::new(cached);
            if state.ring.len() == RING
                && let Some(dropped) = state.ring.pop_front()
            {
                state.oldest = dropped.revision;
            }
            state.ring.push_back(cached.clone());
            // No receiver is fine: nobody watches right now.
            let _ = state.tx.send(cached);
        }
    }

    /// Applies the store watch to the cache until it ends or the server shuts down.
    async fn feed(self: Arc<Self>, mut stream: WatchStream, shutdown: CancellationToken) {
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => break,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(events)) => self.apply(events),
                Some(Err(e)) => {
                    tracing::info!(resource = self.res.plural, error = %e, "watch cache ended by a store error; the next watch rebuilds it");
                    break;
                }
                None => break,
            }
        }
        self.ended.cancel();
    }
}

fn objects_under(state: &State, prefix: &str) -> Vec<Arc<CachedObject>> {
    state
        .objects
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(_, o)| o.clone())
        .collect()
}

/// The caches of every watched resource type, built on first use.
pub struct Caches {
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    by_prefix: Mutex<HashMap<String, Arc<Cacher>>>,
    /// Serialises building, so concurrent first watches of a type share one cache.
    building: tokio::sync::Mutex<()>,
}

impl Caches {
    pub fn new(store: Arc<dyn Store>, shutdown: CancellationToken) -> Self {
        Self {
            store,
            shutdown,
            by_prefix: Mutex::default(),
            building: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self, prefix: &str) -> Option<Arc<Cacher>> {
        let map = self.by_prefix.lock().unwrap_or_else(|p| p.into_inner());
        map.get(prefix).filter(|c| !c.ended.is_cancelled()).cloned()
    }

    /// The cache of `res`, built (one list and one store watch) if there is none yet.
    pub async fn get(&self, res: &'static Resource) -> Result<Arc<Cacher>, StoreError> {
        let prefix = res.key_prefix();
        if let Some(c) = self.live(&prefix) {
            return Ok(c);
        }
        let _building = self.building.lock().await;
        if let Some(c) = self.live(&prefix) {
            return Ok(c);
        }
        let list = self.store.list(&prefix, ListOptions::default()).await?;
        let stream = self.store.watch(&prefix, list.revision).await?;
        let cacher = Arc::new(Cacher::new(res, &list.items, list.revision));
        tokio::spawn(cacher.clone().feed(stream, self.shutdown.clone()));
        self.by_prefix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(prefix, cacher.clone());
        Ok(cacher)
    }
}

#[cfg(test)]
mod tests;
