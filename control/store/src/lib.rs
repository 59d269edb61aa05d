//! weir's storage layer: one [`Store`] trait with the semantics of etcd's key-value API,
//! implemented by a real etcd (`etcd` module) and by an embedded on-disk backend
//! (`embedded` module), both held to one conformance suite (`conformance` module).
//!
//! Keys are opaque strings; the API server uses `/registry/<group>/<resource>/<ns>/<name>`.
//! Every write bumps one store-wide revision; a key's `mod_revision` is the API object's
//! `resourceVersion`.
//!
//! [`open`] turns a command-line [`StoreSpec`] into a running store; `etcd_harness` runs a
//! real etcd server for tests (this crate's and the API server's).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;

#[cfg(test)]
mod conformance;
pub mod embedded;
pub mod etcd;
pub mod etcd_harness;

pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use etcd::EtcdStore;
pub use etcd_harness::{EtcdProcess, HarnessError};

/// A stored key and its value at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key (in its current life).
    pub create_revision: i64,
    /// Revision of the last write to this key: the object's `resourceVersion`.
    pub mod_revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The key was created or updated. `prev` is the value before, if any.
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    /// The key was deleted at `revision`; `prev` is its last value.
    Delete { prev: KeyValue, revision: i64 },
}

impl Event {
    /// The revision at which this event happened.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put { kv, .. } => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    /// The key this event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put { kv, .. } => &kv.key,
            Event::Delete { prev, .. } => &prev.key,
        }
    }
}

/// A consistent list of keys under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    /// Sorted by key.
    pub items: Vec<KeyValue>,
    /// The store revision this list was read at.
    pub revision: i64,
    /// True when `limit` cut the list; continue after the last key at the same `revision`.
    pub more: bool,
}

/// Options of a list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Read at this revision (0 = latest). An older, compacted revision is [`Error::Compacted`].
    pub revision: i64,
    /// At most this many items (0 = no limit).
    pub limit: usize,
    /// Start after this key (exclusive), for paging.
    pub start_after: Option<String>,
}

/// A stream of watch events, in revision order. Events sharing a revision (one transaction)
/// are delivered together. An `Err` ends the stream.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Vec<Event>, Error>> + Send>>;

/// Store errors. The API server maps them to HTTP statuses in its own error type.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    /// A compare-and-swap failed: the key's mod_revision was not the expected one.
    #[error("key {key} was modified: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: i64,
        actual: i64,
    },
    /// The requested revision is older than the oldest one still kept. Clients re-list.
    #[error("revision {requested} is compacted; oldest available is {compact_revision}")]
    Compacted {
        requested: i64,
        compact_revision: i64,
    },
    /// The requested revision is in the future.
    #[error("revision {requested} is newer than the current revision {current}")]
    FutureRevision { requested: i64, current: i64 },
    /// The value is larger than the store accepts ([`MAX_VALUE_BYTES`] by default; etcd's
    /// own `--max-request-bytes`). The API server answers 413.
    #[error("value of {key} is {size} bytes, over the store's limit of {limit} bytes")]
    ValueTooLarge {
        key: String,
        size: usize,
        limit: usize,
    },
    /// The backend cannot be reached now; the request may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time. A write may or may not have been applied, so a
    /// caller must not blindly repeat it.
    #[error("store timeout: {0}")]
    Timeout(String),
    #[error("store internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Largest value the embedded store accepts: etcd's default `--max-request-bytes`
/// (1.5 MiB), so an object fits both backends or neither.
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// The key-value API that the API server needs. Both backends implement exactly these
/// semantics; see the conformance suite.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current value of `key`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// All keys starting with `prefix`, in key order, at one revision.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult>;

    /// Create `key`; fails with [`Error::AlreadyExists`] if it exists. Returns the new
    /// key-value (its `mod_revision` is the new revision).
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue>;

    /// Create every key of `kvs` in one atomic write: all of them, or none when any exists
    /// or is named twice ([`Error::AlreadyExists`] names the first such key). Returns the
    /// new key-values in the order given. etcd writes them at one revision; the embedded
    /// store at consecutive revisions of one commit. An object and the keys that record
    /// what it claims (a Service's cluster IP) are written this way in one round trip.
    async fn create_all(&self, kvs: Vec<(String, Vec<u8>)>) -> Result<Vec<KeyValue>>;

    /// Replace `key` only if its `mod_revision` is still `expected_revision`
    /// ([`Error::Conflict`] otherwise, [`Error::NotFound`] if absent).
    async fn update(&self, key: &str, value: Vec<u8>, expected_revision: i64) -> Result<KeyValue>;

    /// Delete `key`, only if its `mod_revision` is `expected_revision` when that is given.
    /// Returns the deleted key-value and the revision of the delete.
    async fn delete(&self, key: &str, expected_revision: Option<i64>) -> Result<(KeyValue, i64)>;

    /// Watch keys under `prefix`, delivering every event with revision > `after_revision`
    /// (so `after_revision` = a list's revision gives exactly the changes after that list).
    /// A compacted `after_revision` gives [`Error::Compacted`], at once or as the first item.
    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<WatchStream>;

    /// The current store revision.
    async fn current_revision(&self) -> Result<i64>;

    /// Drop history below `revision`: later lists at an older revision, and watches that
    /// need events at or below it, get [`Error::Compacted`]. Compacting to a revision at or
    /// below the current compact revision is [`Error::Compacted`] too (as in etcd).
    async fn compact(&self, revision: i64) -> Result<()>;
}

/// Which backend to run, as chosen on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// The embedded store in this redb file (created if missing).
    Embedded(PathBuf),
    /// An etcd cluster at these client URLs, e.g. `http://127.0.0.1:2379`.
    Etcd(Vec<String>),
}

/// How often [`open`] compacts an etcd store: kube-apiserver's default.
pub const ETCD_COMPACTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

/// Opens the store `spec` names, with bounded history: the embedded store compacts itself,
/// and for etcd this starts [`EtcdStore::spawn_compactor`] every
/// [`ETCD_COMPACTION_INTERVAL`] on the current tokio runtime. An unreachable etcd is
/// [`Error::Unavailable`].
pub async fn open(spec: &StoreSpec) -> Result<Arc<dyn Store>> {
    Ok(match spec {
        StoreSpec::Embedded(path) => Arc::new(EmbeddedStore::open(path)?),
        StoreSpec::Etcd(endpoints) => {
            let store = EtcdStore::connect(endpoints).await?;
            store.spawn_compactor(ETCD_COMPACTION_INTERVAL);
            Arc::new(store)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_from_a_spec() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = StoreSpec::Embedded(dir.path().join("state/store.redb"));
        let store = open(&spec).await.expect("open embedded");
        store.create("/k", b"v".to_vec()).await.expect("create");
        drop(store);
        let store = open(&spec).await.expect("reopen embedded");
        assert!(store.get("/k").await.expect("get").is_some());

        let etcd = EtcdProcess::start().await.expect("start etcd");
        let store = open(&StoreSpec::Etcd(vec![etcd.client_url()]))
            .await
            .expect("open etcd");
        store.create("/k", b"v".to_vec()).await.expect("create");

        match open(&StoreSpec::Etcd(Vec::new())).await {
            Err(Error::Unavailable(_)) => {}
            other => panic!("etcd without endpoints: {:?}", other.map(|_| ())),
        }
    }
}
