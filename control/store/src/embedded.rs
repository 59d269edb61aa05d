//! The embedded backend: etcd's key-value semantics on one redb file, for a single machine.
//!
//! Layout: table `kv` holds every live key with its create/mod revision; table `log` holds one
//! entry per revision (the key, its new value or a tombstone, and its previous value), which
//! serves both watch catch-up and list-at-an-old-revision (the current state with the log
//! after that revision undone); table `meta` holds the store revision and compact revision.
//!
//! Writes go through one writer thread fed by a channel. It takes every request that is
//! queued, applies them in order inside one redb transaction and commits once, so the fsync
//! of a commit is shared by all concurrent writers (group commit). Each request still gets
//! its own revision and its own compare-and-swap check, made against the state the earlier
//! requests of the batch left. Events are broadcast only after the commit is durable.
//!
//! History policy: the log keeps at least the last [`EmbeddedOptions::history_revisions`]
//! revisions. Once it holds a step more than that (a tenth of the history, at most
//! [`COMPACTION_STEP`]), the writer drops the oldest entries in the same transaction as the
//! write that crossed the line, so history on disk stays bounded. Reads and watches from before the kept history get [`Error::Compacted`],
//! exactly as with an etcd compacted by the API server.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    Error, Event, KeyValue, ListOptions, ListResult, MAX_VALUE_BYTES, Result, Store, WatchStream,
};

/// Live keys: key → (create_revision, mod_revision, value).
const KV: TableDefinition<'static, &str, (i64, i64, &[u8])> = TableDefinition::new("kv");
/// One entry per revision: revision → (key, new (create_revision, value) or None for a
/// delete, previous (create_revision, mod_revision, value) if the key existed).
type LogValue<'a> = (
    &'a str,
    Option<(i64, &'a [u8])>,
    Option<(i64, i64, &'a [u8])>,
);
const LOG: TableDefinition<'static, i64, LogValue<'static>> = TableDefinition::new("log");
const META: TableDefinition<'static, &str, i64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_COMPACT: &str = "compact_revision";

/// Auto-compaction runs once the log exceeds the kept history by a step of up to this many
/// revisions, so its cost is paid once per step rather than on every write.
pub const COMPACTION_STEP: i64 = 1_000;
/// Most requests the writer folds into one transaction.
const MAX_BATCH: usize = 1_024;

/// Tuning of the embedded store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Revisions of history kept for list-at-revision and watch-from-revision.
    pub history_revisions: i64,
    /// Write batches a watcher may fall behind live delivery (and event batches each watch
    /// stream buffers) before it falls back to re-reading the log from disk.
    pub watch_backlog: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        // A watcher or a paged list may lag this many writes before getting 410 Gone:
        // comparable to what kube-apiserver's 5-minute etcd compaction leaves on a busy cluster.
        Self {
            history_revisions: 20_000,
            watch_backlog: 1_024,
        }
    }
}

/// The default single-machine store: redb on disk, etcd semantics.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    db: Database,
    /// Last committed revision, for [`Store::current_revision`] without a read transaction.
    revision: AtomicI64,
    events: broadcast::Sender<Arc<[Event]>>,
    watch_backlog: usize,
}

enum Op {
    Create {
        key: String,
        value: Vec<u8>,
    },
    /// All of these keys, at consecutive revisions, or none.
    CreateAll {
        kvs: Vec<(String, Vec<u8>)>,
    },
    Update {
        key: String,
        value: Vec<u8>,
        expected: i64,
    },
    Delete {
        key: String,
        expected: Option<i64>,
    },
    Compact {
        revision: i64,
    },
}

struct Request {
    op: Op,
    /// The events the write produced; none for a compaction.
    reply: oneshot::Sender<Result<Vec<Event>>>,
}

fn storage<E: std::fmt::Display>(context: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Internal(format!("embedded store: {context}: {e}"))
}

impl EmbeddedStore {
    /// Open (or create) the store in the redb file at `path`, with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, EmbeddedOptions::default())
    }

    /// Open (or create) the store in the redb file at `path`.
    pub fn open_with(path: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self> {
        let path = path.as_ref();
        if options.history_revisions < 1 || options.watch_backlog < 1 {
            return Err(Error::Internal(format!(
                "embedded store: history_revisions and watch_backlog must be at least 1, \
                 got {options:?}"
            )));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Internal(format!("embedded store: creating {}: {e}", dir.display()))
            })?;
        }
        let db = Database::create(path).map_err(|e| {
            Error::Internal(format!("embedded store: opening {}: {e}", path.display()))
        })?;
        let revision = init_meta(&db)?;
        let (events, _) = broadcast::channel(options.watch_backlog);
        let shared = Arc::new(Shared {
            db,
            revision: AtomicI64::new(revision),
            events,
            watch_backlog: options.watch_backlog,
        });
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("weir-store-writer".into())
            .spawn(move || run_writer(&writer_shared, rx, options.history_revisions))
            .map_err(storage("spawning the writer thread"))?;
        Ok(Self {
            shared,
            requests: Some(tx),
            writer: Some(writer),
        })
    }

    async fn write(&self, op: Op) -> Result<Vec<Event>> {
        let values: Vec<(&String, &Vec<u8>)> = match &op {
            Op::Create { key, value } | Op::Update { key, value, .. } => vec![(key, value)],
            Op::CreateAll { kvs } => kvs.iter().map(|(k, v)| (k, v)).collect(),
            _ => Vec::new(),
        };
        if let Some((key, value)) = values.iter().find(|(_, v)| v.len() > MAX_VALUE_BYTES) {
            return Err(Error::ValueTooLarge {
                key: key.to_string(),
                size: value.len(),
                limit: MAX_VALUE_BYTES,
            });
        }
        let (reply, rx) = oneshot::channel();
        let closed = || Error::Unavailable("embedded store is shutting down".into());
        let requests = self.requests.as_ref().ok_or_else(closed)?;
        requests
            .send(Request { op, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared.db))
            .await
            .map_err(storage("read task"))?
    }
}

impl Drop for EmbeddedStore {
    /// Closing the channel stops the writer after its current batch; joining it means the
    /// file is released when this returns, so the same path can be opened again at once.
    fn drop(&mut self) {
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn init_meta(db: &Database) -> Result<i64> {
    let txn = db.begin_write().map_err(storage("begin"))?;
    let revision = {
        let mut meta = txn.open_table(META).map_err(storage("open meta"))?;
        txn.open_table(KV).map_err(storage("open kv"))?;
        txn.open_table(LOG).map_err(storage("open log"))?;
        let current = meta
            .get(META_REVISION)
            .map_err(storage("read revision"))?
            .map(|v| v.value());
        match current {
            Some(rev) => rev,
            None => {
                // Like etcd, an empty store is at revision 1; the first write is revision 2.
                meta.insert(META_REVISION, 1).map_err(storage("init"))?;
                meta.insert(META_COMPACT, 0).map_err(storage("init"))?;
                1
            }
        }
    };
    txn.commit().map_err(storage("commit"))?;
    Ok(revision)
}

fn run_writer(shared: &Shared, mut rx: mpsc::Receiver<Request>, history: i64) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let start = shared.revision.load(Ordering::Acquire);
        match commit_batch(&shared.db, &batch, start, history) {
            Ok((results, revision)) => {
                shared.revision.store(revision, Ordering::Release);
                let events: Vec<Event> = results
                    .iter()
                    .filter_map(|r| r.as_ref().ok())
                    .flatten()
                    .cloned()
                    .collect();
                if !events.is_empty() {
                    // No receiver is fine: nobody watches.
                    let _ = shared.events.send(events.into());
                }
                for (req, result) in batch.into_iter().zip(results) {
                    let _ = req.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded store: write batch failed");
                for req in batch {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

type Tables<'t> = (
    redb::Table<'t, &'static str, (i64, i64, &'static [u8])>,
    redb::Table<'t, i64, LogValue<'static>>,
);

/// Applies a batch in one transaction. The outer error aborts the whole batch (storage
/// failure); the inner results are the per-request outcomes.
fn commit_batch(
    db: &Database,
    batch: &[Request],
    start: i64,
    history: i64,
) -> Result<(Vec<Result<Vec<Event>>>, i64)> {
    let txn = db.begin_write().map_err(storage("begin"))?;
    let mut revision = start;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut tables: Tables<'_> = (
            txn.open_table(KV).map_err(storage("open kv"))?,
            txn.open_table(LOG).map_err(storage("open log"))?,
        );
        let mut meta = txn.open_table(META).map_err(storage("open meta"))?;
        let mut compact = meta
            .get(META_COMPACT)
            .map_err(storage("read compact revision"))?
            .map_or(0, |v| v.value());
        for req in batch {
            let result = match &req.op {
                Op::Compact { revision: to } => {
                    compact_to(&mut tables.1, &mut compact, *to, revision).map(|()| Vec::new())
                }
                Op::CreateAll { kvs } => create_all(&mut tables, kvs, &mut revision)?,
                op => apply(&mut tables, op, revision + 1)?.map(|event| {
                    revision += 1;
                    vec![event]
                }),
            };
            results.push(result);
        }
        let step = (history / 10).clamp(1, COMPACTION_STEP);
        if revision - compact > history + step {
            compact_to(&mut tables.1, &mut compact, revision - history, revision)?;
        }
        meta.insert(META_REVISION, revision)
            .map_err(storage("write revision"))?;
        meta.insert(META_COMPACT, compact)
            .map_err(storage("write compact revision"))?;
    }
    txn.commit().map_err(storage("commit"))?;
    Ok((results, revision))
}

fn compact_to(
    log: &mut redb::Table<'_, i64, LogValue<'static>>,
    compact: &mut i64,
    to: i64,
    current: i64,
) -> Result<()> {
    if to > current {
        return Err(Error::FutureRevision {
            requested: to,
            current,
        });
    }
    if to <= *compact {
        return Err(Error::Compacted {
            requested: to,
            compact_revision: *compact,
        });
    }
    log.retain_in(..=to, |_, _| false)
        .map_err(storage("compact log"))?;
    *compact = to;
    Ok(())
}

/// Creates every key of `kvs` after `revision`, one revision each, or none of them if any
/// exists (or is named twice). A storage error (outer `Err`) aborts the batch.
fn create_all(
    tables: &mut Tables<'_>,
    kvs: &[(String, Vec<u8>)],
    revision: &mut i64,
) -> Result<Result<Vec<Event>>> {
    for (i, (key, _)) in kvs.iter().enumerate() {
        let exists = tables.0.get(key.as_str()).map_err(storage("read key"))?;
        if exists.is_some() || kvs[..i].iter().any(|(k, _)| k == key) {
            return Ok(Err(Error::AlreadyExists { key: key.clone() }));
        }
    }
    let mut events = Vec::with_capacity(kvs.len());
    for (key, value) in kvs {
        let op = Op::Create {
            key: key.clone(),
            value: value.clone(),
        };
        // Checked above: every create succeeds.
        match apply(tables, &op, *revision + 1)? {
            Ok(event) => events.push(event),
            Err(e) => return Err(Error::Internal(format!("embedded store: {e} after check"))),
        }
        *revision += 1;
    }
    Ok(Ok(events))
}

/// One write at `revision`. Checks come before any table change, so a rejected request
/// leaves nothing behind; a storage error (outer `Err`) aborts the batch.
fn apply(tables: &mut Tables<'_>, op: &Op, revision: i64) -> Result<Result<Event>> {
    let (kv, log) = tables;
    let key = match op {
        Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } => key.as_str(),
        Op::Compact { .. } | Op::CreateAll { .. } => {
            return Err(Error::Internal("not a single key write".into()));
        }
    };
    let prev = kv
        .get(key)
        .map_err(storage("read key"))?
        .map(|g| to_kv(key, g.value()));
    let event = match (op, prev) {
        (Op::Create { .. }, Some(_)) => {
            return Ok(Err(Error::AlreadyExists { key: key.into() }));
        }
        (Op::Update { .. } | Op::Delete { .. }, None) => {
            return Ok(Err(Error::NotFound { key: key.into() }));
        }
        (Op::Update { expected, .. }, Some(p)) if p.mod_revision != *expected => {
            return Ok(Err(conflict(p, *expected)));
        }
        (
            Op::Delete {
                expected: Some(expected),
                ..
            },
            Some(p),
        ) if p.mod_revision != *expected => return Ok(Err(conflict(p, *expected))),
        (Op::Create { value, .. }, None) => Event::Put {
            kv: KeyValue {
                key: key.into(),
                value: value.clone(),
                create_revision: revision,
                mod_revision: revision,
            },
            prev: None,
        },
        (Op::Update { value, .. }, Some(p)) => Event::Put {
            kv: KeyValue {
                key: key.into(),
                value: value.clone(),
                create_revision: p.create_revision,
                mod_revision: revision,
            },
            prev: Some(p),
        },
        (Op::Delete { .. }, Some(p)) => Event::Delete { prev: p, revision },
        (Op::Compact { .. } | Op::CreateAll { .. }, _) => {
            return Err(Error::Internal("not a single key write".into()));
        }
    };
    match &event {
        Event::Put { kv: new, prev } => {
            kv.insert(
                key,
                (new.create_revision, new.mod_revision, new.value.as_slice()),
            )
            .map_err(storage("write key"))?;
            let prev = prev
                .as_ref()
                .map(|p| (p.create_revision, p.mod_revision, p.value.as_slice()));
            log.insert(
                revision,
                (key, Some((new.create_revision, new.value.as_slice())), prev),
            )
            .map_err(storage("write log"))?;
        }
        Event::Delete { prev, .. } => {
            kv.remove(key).map_err(storage("delete key"))?;
            let prev = (
                prev.create_revision,
                prev.mod_revision,
                prev.value.as_slice(),
            );
            log.insert(revision, (key, None, Some(prev)))
                .map_err(storage("write log"))?;
        }
    }
    Ok(Ok(event))
}

fn conflict(found: KeyValue, expected: i64) -> Error {
    Error::Conflict {
        key: found.key,
        expected,
        actual: found.mod_revision,
    }
}

fn to_kv(key: &str, (create_revision, mod_revision, value): (i64, i64, &[u8])) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.to_vec(),
        create_revision,
        mod_revision,
    }
}

fn log_event(revision: i64, (key, new, prev): LogValue<'_>) -> Result<Event> {
    let prev = prev.map(|p| to_kv(key, p));
    match (new, prev) {
        (Some((create_revision, value)), prev) => Ok(Event::Put {
            kv: to_kv(key, (create_revision, revision, value)),
            prev,
        }),
        (None, Some(prev)) => Ok(Event::Delete { prev, revision }),
        // `apply` always records what a delete removed.
        (None, None) => Err(Error::Internal(format!(
            "embedded store: log entry {revision} has neither a value nor a previous value"
        ))),
    }
}

/// A consistent snapshot's revision and compact revision.
fn snapshot_meta(txn: &redb::ReadTransaction) -> Result<(i64, i64)> {
    let meta = txn.open_table(META).map_err(storage("open meta"))?;
    let get = |name| {
        meta.get(name)
            .map_err(storage("read meta"))
            .map(|v| v.map_or(0, |v| v.value()))
    };
    Ok((get(META_REVISION)?, get(META_COMPACT)?))
}

fn in_prefix<'a>(prefix: &'a str) -> impl Fn(&str) -> bool + 'a {
    move |key| key.starts_with(prefix)
}

fn list_blocking(db: &Database, prefix: &str, opts: &ListOptions) -> Result<ListResult> {
    let txn = db.begin_read().map_err(storage("begin read"))?;
    let (current, compact) = snapshot_meta(&txn)?;
    let at = if opts.revision == 0 {
        current
    } else {
        opts.revision
    };
    if at > current {
        return Err(Error::FutureRevision {
            requested: at,
            current,
        });
    }
    if at < compact {
        return Err(Error::Compacted {
            requested: at,
            compact_revision: compact,
        });
    }
    let after = |key: &str| opts.start_after.as_deref().is_none_or(|s| key > s);
    let matches = |key: &str| key.starts_with(prefix) && after(key);

    // Keys changed after `at`, with their state at `at` (None: absent then). The first
    // event after `at` for a key carries that state as its `prev`.
    let mut overlay: BTreeMap<String, Option<KeyValue>> = BTreeMap::new();
    if at < current {
        let log = txn.open_table(LOG).map_err(storage("open log"))?;
        for entry in log.range((at + 1)..).map_err(storage("read log"))? {
            let (_, v) = entry.map_err(storage("read log"))?;
            let (key, _, prev) = v.value();
            if matches(key) && !overlay.contains_key(key) {
                overlay.insert(key.to_owned(), prev.map(|p| to_kv(key, p)));
            }
        }
    }

    let kv = txn.open_table(KV).map_err(storage("open kv"))?;
    let lower = match opts.start_after.as_deref() {
        Some(s) if s >= prefix => Bound::Excluded(s),
        _ => Bound::Included(prefix),
    };
    let mut live = kv
        .range::<&str>((lower, Bound::Unbounded))
        .map_err(storage("read kv"))?
        .map(|entry| {
            entry.map_err(storage("read kv")).map(|(k, v)| {
                let key = k.value();
                to_kv(key, v.value())
            })
        })
        .take_while(|r| r.as_ref().map_or(true, |kv| kv.key.starts_with(prefix)))
        .peekable();
    let mut changed = overlay.into_iter().peekable();

    let limit = if opts.limit == 0 {
        usize::MAX
    } else {
        opts.limit
    };
    let mut items = Vec::new();
    let mut more = false;
    loop {
        let live_key = match live.peek() {
            Some(Ok(kv)) => Some(kv.key.as_str()),
            Some(Err(e)) => return Err(e.clone()),
            None => None,
        };
        let next = match (live_key, changed.peek()) {
            (None, None) => break,
            (Some(l), Some((c, _))) if l == c.as_str() => {
                live.next();
                changed.next().and_then(|(_, state)| state)
            }
            (Some(l), Some((c, _))) if c.as_str() < l => changed.next().and_then(|(_, s)| s),
            (None, Some(_)) => changed.next().and_then(|(_, s)| s),
            (Some(_), _) => live.next().and_then(Result::ok),
        };
        if let Some(item) = next {
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(item);
        }
    }
    Ok(ListResult {
        items,
        revision: at,
        more,
    })
}

/// Events under `prefix` after `after`, from the log, and the snapshot revision read at.
fn history_blocking(db: &Database, prefix: &str, after: i64) -> Result<(Vec<Event>, i64)> {
    let txn = db.begin_read().map_err(storage("begin read"))?;
    let (current, compact) = snapshot_meta(&txn)?;
    if after < compact {
        return Err(Error::Compacted {
            requested: after,
            compact_revision: compact,
        });
    }
    let log = txn.open_table(LOG).map_err(storage("open log"))?;
    let matches = in_prefix(prefix);
    let mut events = Vec::new();
    for entry in log.range((after + 1)..).map_err(storage("read log"))? {
        let (rev, v) = entry.map_err(storage("read log"))?;
        let value = v.value();
        if matches(value.0) {
            events.push(log_event(rev.value(), value)?);
        }
    }
    Ok((events, current))
}

/// Feeds one watch: catch-up from the log, then live batches from the broadcast. On lag it
/// re-reads the log from the last delivered revision, so a slow watcher misses nothing (or
/// gets `Compacted` if it fell behind the kept history).
async fn run_watch(
    shared: Weak<Shared>,
    mut sub: broadcast::Receiver<Arc<[Event]>>,
    prefix: String,
    mut last: i64,
    tx: mpsc::Sender<Result<Vec<Event>>>,
) {
    let matches = in_prefix(&prefix);
    loop {
        let batch = tokio::select! {
            () = tx.closed() => return,
            batch = sub.recv() => batch,
        };
        let events: Vec<Event> = match batch {
            Ok(batch) => {
                let events = batch
                    .iter()
                    .filter(|e| e.revision() > last && matches(e.key()))
                    .cloned()
                    .collect();
                last = last.max(batch.last().map_or(last, Event::revision));
                events
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let Some(shared) = shared.upgrade() else {
                    let _ = tx.send(Err(closed_error())).await;
                    return;
                };
                sub = sub.resubscribe();
                let (p, from) = (prefix.clone(), last);
                let read =
                    tokio::task::spawn_blocking(move || history_blocking(&shared.db, &p, from))
                        .await
                        .map_err(storage("read task"))
                        .and_then(|r| r);
                match read {
                    Ok((events, snapshot)) => {
                        last = last.max(snapshot);
                        events
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => {
                let _ = tx.send(Err(closed_error())).await;
                return;
            }
        };
        if !events.is_empty() && tx.send(Ok(events)).await.is_err() {
            return;
        }
    }
}

fn closed_error() -> Error {
    Error::Unavailable("embedded store closed".into())
}

fn expect_put(events: Vec<Event>) -> Result<KeyValue> {
    match events.into_iter().next() {
        Some(Event::Put { kv, .. }) => Ok(kv),
        _ => Err(Error::Internal("embedded store: write gave no put".into())),
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(storage("begin read"))?;
            let kv = txn.open_table(KV).map_err(storage("open kv"))?;
            let found = kv.get(key.as_str()).map_err(storage("read key"))?;
            Ok(found.map(|g| to_kv(&key, g.value())))
        })
        .await
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        let prefix = prefix.to_owned();
        self.read(move |db| list_blocking(db, &prefix, &opts)).await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue> {
        let key = key.to_owned();
        expect_put(self.write(Op::Create { key, value }).await?)
    }

    async fn create_all(&self, kvs: Vec<(String, Vec<u8>)>) -> Result<Vec<KeyValue>> {
        self.write(Op::CreateAll { kvs })
            .await?
            .into_iter()
            .map(|e| expect_put(vec![e]))
            .collect()
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected_revision: i64) -> Result<KeyValue> {
        let key = key.to_owned();
        let op = Op::Update {
            key,
            value,
            expected: expected_revision,
        };
        expect_put(self.write(op).await?)
    }

    async fn delete(&self, key: &str, expected_revision: Option<i64>) -> Result<(KeyValue, i64)> {
        let key = key.to_owned();
        let op = Op::Delete {
            key,
            expected: expected_revision,
        };
        match self.write(op).await?.into_iter().next() {
            Some(Event::Delete { prev, revision }) => Ok((prev, revision)),
            _ => Err(Error::Internal(
                "embedded store: delete gave no delete".into(),
            )),
        }
    }

    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<WatchStream> {
        // Subscribe before reading the log: every commit is either in the snapshot read
        // below or broadcast to this receiver (or both; `last` drops the duplicates).
        let sub = self.shared.events.subscribe();
        let owned = prefix.to_owned();
        let (history, snapshot) = self
            .read(move |db| history_blocking(db, &owned, after_revision))
            .await?;
        let (tx, rx) = mpsc::channel(self.shared.watch_backlog);
        if !history.is_empty() {
            // The channel is fresh, so the first send cannot block or fail.
            let _ = tx.try_send(Ok(history));
        }
        tokio::spawn(run_watch(
            Arc::downgrade(&self.shared),
            sub,
            prefix.to_owned(),
            snapshot.max(after_revision),
            tx,
        ));
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
    }

    async fn current_revision(&self) -> Result<i64> {
        Ok(self.shared.revision.load(Ordering::Acquire))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.write(Op::Compact { revision }).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests;
