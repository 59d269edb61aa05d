//! The etcd backend: the [`Store`] trait over etcd's v3 API through etcd-client.
//!
//! Writes are etcd transactions (a create compares `create_revision == 0`, an update or a
//! conditional delete compares `mod_revision`), so concurrent writers get [`Error::Conflict`]
//! rather than lost updates. Every unary call is bounded by the store's request timeout
//! ([`DEFAULT_REQUEST_TIMEOUT`] unless set): a dead etcd
//! gives [`Error::Unavailable`], a hung one [`Error::Timeout`], and the client reconnects on
//! its own once etcd is back. A watch survives a dropped connection: it re-creates the etcd watch from the last
//! delivered revision + 1, so no event is lost, or ends with [`Error::Compacted`] if etcd
//! compacted those revisions meanwhile.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient,
    PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions, WatchResponse,
};
use tokio::sync::mpsc;

use crate::{Error, Event, KeyValue, ListOptions, ListResult, Result, Store, WatchStream};

/// Default bound on every unary call: long enough to ride out fsync stalls on a busy disk
/// (5 s was seen to fail a `kubectl apply` while another etcd shared the disk), and half of
/// kube-apiserver's 60 s `--request-timeout`, so a hung etcd still becomes a 504 before a
/// client gives up on its own.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on connecting and on creating a watch, neither of which waits for a disk.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on establishing a connection to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Delay between attempts to re-create a broken watch, doubling up to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
const WATCH_BUFFER: usize = 256;
/// Largest etcd response accepted. tonic's 4 MiB default fails an unpaged list of a few
/// thousand objects; kube-apiserver lifts the limit the same way.
const MAX_MESSAGE: usize = i32::MAX as usize;

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    timeout: Duration,
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (client URLs) and checks that it answers.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::Unavailable("no etcd endpoints given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            // Keep-alive notices a silently dead connection, so a watch on it is re-created.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        // Nothing was written yet, so a timeout here is plainly "unavailable".
        let at = |e| match e {
            Error::Unavailable(msg) | Error::Timeout(msg) => {
                Error::Unavailable(format!("etcd at {}: {msg}", endpoints.join(",")))
            }
            other => other,
        };
        let client = bounded(SETUP_TIMEOUT, Client::connect(endpoints, Some(options)))
            .await
            .map_err(at)?;
        let store = Self {
            client,
            timeout: SETUP_TIMEOUT,
        };
        store.current_revision().await.map_err(at)?;
        Ok(Self {
            timeout: DEFAULT_REQUEST_TIMEOUT,
            ..store
        })
    }

    /// Bound every unary call by `timeout` instead of [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn with_request_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// Compacts etcd's history the way kube-apiserver does (`--etcd-compaction-interval`,
    /// 5 minutes there): every `interval`, drop the revisions older than the one seen an
    /// interval ago, so history stays bounded yet a watcher or paged list has at least one
    /// interval of slack. Stops when the returned handle is aborted or dropped with the
    /// runtime; errors (etcd down, already compacted by another server) are logged and the
    /// next tick tries again.
    pub fn spawn_compactor(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = None;
            loop {
                ticks.tick().await;
                if let Some(revision) = seen {
                    match store.compact(revision).await {
                        Ok(()) => tracing::debug!(revision, "compacted etcd history"),
                        Err(Error::Compacted { .. }) => {}
                        Err(e) => tracing::warn!(revision, error = %e, "etcd compaction failed"),
                    }
                }
                seen = store.current_revision().await.ok();
            }
        })
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    }

    /// Runs a write transaction of `value` to `key`.
    async fn txn(&self, txn: Txn, key: &str, value_len: usize) -> Result<TxnResponse> {
        let mut kv = self.kv();
        match tokio::time::timeout(self.timeout, kv.txn(txn)).await {
            Ok(Ok(resp)) => Ok(resp),
            // etcd refuses over `--max-request-bytes`; gRPC itself a little above that.
            Ok(Err(e))
                if ["request is too large", "received message larger than max"]
                    .iter()
                    .any(|m| e.to_string().contains(m)) =>
            {
                Err(Error::ValueTooLarge {
                    key: key.into(),
                    size: value_len,
                    limit: crate::MAX_VALUE_BYTES,
                })
            }
            Ok(Err(e)) => Err(map_err(e)),
            Err(_) => Err(timeout_error(self.timeout)),
        }
    }

    /// etcd reports compaction on a range without saying up to where; a watch from
    /// revision 1 does, in its cancel response.
    async fn compact_revision(&self) -> Result<i64> {
        let mut watch = self.client.watch_client();
        let probe = async move {
            let opts = WatchOptions::new().with_start_revision(1);
            let mut stream = watch.watch("\0", Some(opts)).await?;
            while let Some(resp) = stream.message().await? {
                if resp.compact_revision() > 0 || resp.canceled() {
                    return Ok(resp.compact_revision());
                }
            }
            Ok(0)
        };
        // A created watch on an uncompacted store sends nothing more; give up quickly.
        match tokio::time::timeout(Duration::from_millis(500), probe).await {
            Ok(r) => r.map_err(map_err),
            Err(_) => Ok(0),
        }
    }

    /// Maps a range/compact error about revision `requested` to the precise store error.
    async fn revision_error(&self, e: etcd_client::Error, requested: i64) -> Error {
        let msg = e.to_string();
        if msg.contains("required revision has been compacted") {
            let compact_revision = self.compact_revision().await.unwrap_or(0);
            Error::Compacted {
                requested,
                compact_revision,
            }
        } else if msg.contains("required revision is a future revision") {
            match self.current_revision().await {
                Ok(current) => Error::FutureRevision { requested, current },
                Err(e) => e,
            }
        } else {
            map_err(e)
        }
    }
}

/// Runs one etcd call under `timeout`.
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r.map_err(map_err),
        Err(_) => Err(timeout_error(timeout)),
    }
}

fn timeout_error(timeout: Duration) -> Error {
    Error::Timeout(format!(
        "etcd did not answer within {}s",
        timeout.as_secs_f32()
    ))
}

fn map_err(e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    use tonic::Code;
    match &e {
        E::GRpcStatus(status) => match status.code() {
            Code::DeadlineExceeded => Error::Timeout(format!("etcd: {}", status.message())),
            Code::Unavailable
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Unknown => Error::Unavailable(format!("etcd: {}", status.message())),
            _ => Error::Internal(format!("etcd: {}", status.message())),
        },
        E::TransportError(_) | E::IoError(_) => Error::Unavailable(format!("etcd: {e}")),
        _ => Error::Internal(format!("etcd: {e}")),
    }
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = kv
        .key_str()
        .map_err(|e| Error::Internal(format!("etcd: key is not UTF-8: {e}")))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

fn header_revision(resp: &TxnResponse) -> Result<i64> {
    resp.header()
        .map(|h| h.revision())
        .ok_or_else(|| Error::Internal("etcd: response without header".into()))
}

/// The end of etcd's key range for every key starting with `prefix` (etcd's `GetPrefix`).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty (or all-0xff) prefix: "\0" means every key from the start key on.
    vec![0]
}

/// etcd rejects an empty key, so the range over everything starts at "\0".
fn range_start(prefix: &str) -> Vec<u8> {
    if prefix.is_empty() {
        vec![0]
    } else {
        prefix.as_bytes().to_vec()
    }
}

/// The result of the `or_else` get: the key's current state, if any.
fn failed_get(resp: &TxnResponse) -> Result<Option<KeyValue>> {
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            return get.kvs().first().map(convert).transpose();
        }
    }
    Ok(None)
}

fn cas_error(key: &str, expected: i64, current: Option<KeyValue>) -> Error {
    match current {
        None => Error::NotFound { key: key.into() },
        Some(kv) => Error::Conflict {
            key: key.into(),
            expected,
            actual: kv.mod_revision,
        },
    }
}

fn convert_event(event: &etcd_client::Event, revision: i64) -> Result<Event> {
    let kv = event
        .kv()
        .ok_or_else(|| Error::Internal("etcd: watch event without kv".into()))?;
    let prev = event.prev_kv().map(convert).transpose()?;
    match event.event_type() {
        EventType::Put => Ok(Event::Put {
            kv: convert(kv)?,
            prev,
        }),
        EventType::Delete => match prev {
            Some(prev) => Ok(Event::Delete { prev, revision }),
            // etcd drops prev_kv when its revision was compacted; kube-apiserver fails the
            // watch in this case too, so the client re-lists.
            None => Err(Error::Internal(format!(
                "etcd: delete of {} at revision {revision} came without its previous value",
                String::from_utf8_lossy(kv.key())
            ))),
        },
    }
}

/// Creates an etcd watch from `start` and waits for etcd to confirm it.
async fn open_watch(
    client: &Client,
    prefix: &str,
    start: i64,
) -> Result<(etcd_client::WatchStream, Option<WatchResponse>)> {
    let mut watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let opts = WatchOptions::new()
        .with_range(prefix_end(prefix))
        .with_start_revision(start)
        .with_prev_key();
    let key = range_start(prefix);
    bounded(SETUP_TIMEOUT, async move {
        let mut stream = watch.watch(key, Some(opts)).await?;
        // The first response confirms creation; on a compacted start it may already be the
        // cancellation, which the caller handles like any response.
        let first = stream.message().await?;
        Ok((stream, first.filter(|r| !r.created() || r.canceled())))
    })
    .await
}

/// What one etcd watch response means for the store watch.
enum Step {
    Deliver(Vec<Event>),
    Compacted(i64),
    Nothing,
}

fn step(resp: &WatchResponse) -> Result<Step> {
    if resp.compact_revision() > 0 {
        return Ok(Step::Compacted(resp.compact_revision()));
    }
    if resp.canceled() {
        return Err(Error::Internal(format!(
            "etcd canceled the watch: {}",
            resp.cancel_reason()
        )));
    }
    let events = resp
        .events()
        .iter()
        .map(|e| {
            let revision = e.kv().map_or(0, |kv| kv.mod_revision());
            convert_event(e, revision)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(if events.is_empty() {
        Step::Nothing
    } else {
        Step::Deliver(events)
    })
}

/// Forwards etcd watch responses, re-creating the etcd watch from `next` whenever the
/// connection drops, until the consumer goes away or the history is compacted.
async fn run_watch(
    client: Client,
    prefix: String,
    mut next: i64,
    mut stream: etcd_client::WatchStream,
    mut pending: Option<WatchResponse>,
    tx: mpsc::Sender<Result<Vec<Event>>>,
) {
    let mut retry = RETRY_MIN;
    loop {
        let message = match pending.take() {
            Some(resp) => Ok(Some(resp)),
            None => tokio::select! {
                () = tx.closed() => return,
                m = stream.message() => m,
            },
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) | Err(_) => {
                tracing::debug!(%prefix, next, "etcd watch dropped; re-creating");
                loop {
                    tokio::select! {
                        () = tx.closed() => return,
                        () = tokio::time::sleep(retry) => {}
                    }
                    match open_watch(&client, &prefix, next).await {
                        Ok((s, first)) => {
                            (stream, pending) = (s, first);
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(%prefix, error = %e, "etcd watch re-create failed");
                            retry = (retry * 2).min(RETRY_MAX);
                        }
                    }
                }
                continue;
            }
        };
        retry = RETRY_MIN;
        match step(&resp) {
            Ok(Step::Deliver(events)) => {
                next = events.last().map_or(next, |e| e.revision() + 1);
                if tx.send(Ok(events)).await.is_err() {
                    return;
                }
            }
            Ok(Step::Nothing) => {}
            Ok(Step::Compacted(compact_revision)) => {
                let _ = tx
                    .send(Err(Error::Compacted {
                        requested: next - 1,
                        compact_revision,
                    }))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut kv = self.kv();
        let resp = bounded(self.timeout, kv.get(key, None)).await?;
        resp.kvs().first().map(convert).transpose()
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        let start = match opts.start_after.as_deref() {
            // The smallest key after `s`.
            Some(s) if s >= prefix => {
                let mut k = s.as_bytes().to_vec();
                k.push(0);
                k
            }
            _ => range_start(prefix),
        };
        let mut get = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_revision(opts.revision);
        if opts.limit > 0 {
            get = get.with_limit(i64::try_from(opts.limit).unwrap_or(i64::MAX));
        }
        let mut kv = self.kv();
        let resp = match tokio::time::timeout(self.timeout, kv.get(start, Some(get))).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(self.revision_error(e, opts.revision).await),
            Err(_) => return Err(timeout_error(self.timeout)),
        };
        let revision = if opts.revision > 0 {
            opts.revision
        } else {
            resp.header()
                .map(|h| h.revision())
                .ok_or_else(|| Error::Internal("etcd: response without header".into()))?
        };
        Ok(ListResult {
            items: resp.kvs().iter().map(convert).collect::<Result<_>>()?,
            revision,
            more: resp.more(),
        })
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue> {
        let len = value.len();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.clone(), None)]);
        let resp = self.txn(txn, key, len).await?;
        if !resp.succeeded() {
            return Err(Error::AlreadyExists { key: key.into() });
        }
        let revision = header_revision(&resp)?;
        Ok(KeyValue {
            key: key.into(),
            value,
            create_revision: revision,
            mod_revision: revision,
        })
    }

    async fn create_all(&self, kvs: Vec<(String, Vec<u8>)>) -> Result<Vec<KeyValue>> {
        let Some((first, _)) = kvs.first() else {
            return Ok(Vec::new());
        };
        // etcd refuses a transaction that puts one key twice; name it as the trait says.
        for (i, (key, _)) in kvs.iter().enumerate() {
            if kvs[..i].iter().any(|(k, _)| k == key) {
                return Err(Error::AlreadyExists { key: key.clone() });
            }
        }
        let len = kvs.iter().map(|(_, v)| v.len()).sum();
        let txn = Txn::new()
            .when(
                kvs.iter()
                    .map(|(k, _)| Compare::create_revision(k.as_str(), CompareOp::Equal, 0))
                    .collect::<Vec<_>>(),
            )
            .and_then(
                kvs.iter()
                    .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None))
                    .collect::<Vec<_>>(),
            )
            .or_else(
                kvs.iter()
                    .map(|(k, _)| TxnOp::get(k.as_str(), Some(GetOptions::new().with_count_only())))
                    .collect::<Vec<_>>(),
            );
        let resp = self.txn(txn, first, len).await?;
        if !resp.succeeded() {
            let existing = resp
                .op_responses()
                .into_iter()
                .zip(&kvs)
                .find_map(|(op, (key, _))| match op {
                    TxnOpResponse::Get(get) if get.count() > 0 => Some(key.clone()),
                    _ => None,
                });
            return Err(Error::AlreadyExists {
                // A key that existed at the compare but was gone at the get: still taken.
                key: existing.unwrap_or_else(|| first.clone()),
            });
        }
        let revision = header_revision(&resp)?;
        Ok(kvs
            .into_iter()
            .map(|(key, value)| KeyValue {
                key,
                value,
                create_revision: revision,
                mod_revision: revision,
            })
            .collect())
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected_revision: i64) -> Result<KeyValue> {
        let len = value.len();
        // Without the create_revision check, expected 0 would match an absent key and create it.
        let txn = Txn::new()
            .when([
                Compare::create_revision(key, CompareOp::Greater, 0),
                Compare::mod_revision(key, CompareOp::Equal, expected_revision),
            ])
            .and_then([TxnOp::put(
                key,
                value.clone(),
                Some(PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(txn, key, len).await?;
        if !resp.succeeded() {
            return Err(cas_error(key, expected_revision, failed_get(&resp)?));
        }
        let revision = header_revision(&resp)?;
        let create_revision = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Put(put) => put.prev_key().map(|p| p.create_revision()),
                _ => None,
            })
            .ok_or_else(|| Error::Internal("etcd: update returned no previous value".into()))?;
        Ok(KeyValue {
            key: key.into(),
            value,
            create_revision,
            mod_revision: revision,
        })
    }

    async fn delete(&self, key: &str, expected_revision: Option<i64>) -> Result<(KeyValue, i64)> {
        let delete = TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()));
        let txn = match expected_revision {
            Some(expected) => Txn::new()
                .when([
                    Compare::create_revision(key, CompareOp::Greater, 0),
                    Compare::mod_revision(key, CompareOp::Equal, expected),
                ])
                .and_then([delete])
                .or_else([TxnOp::get(key, None)]),
            None => Txn::new().and_then([delete]),
        };
        let resp = self.txn(txn, key, 0).await?;
        if !resp.succeeded() {
            let expected = expected_revision.unwrap_or_default();
            return Err(cas_error(key, expected, failed_get(&resp)?));
        }
        let prev = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().map(convert),
            _ => None,
        });
        match prev {
            Some(prev) => Ok((prev?, header_revision(&resp)?)),
            None => Err(Error::NotFound { key: key.into() }),
        }
    }

    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<WatchStream> {
        let start = after_revision + 1;
        let (stream, pending) = open_watch(&self.client, prefix, start).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(run_watch(
            self.client.clone(),
            prefix.to_owned(),
            start,
            stream,
            pending,
            tx,
        ));
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
    }

    async fn current_revision(&self) -> Result<i64> {
        let mut kv = self.kv();
        let opts = GetOptions::new().with_count_only();
        let resp = bounded(self.timeout, kv.get("\0", Some(opts))).await?;
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| Error::Internal("etcd: response without header".into()))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        let mut kv = self.kv();
        // Physical: return only once etcd has applied the compaction, so that a watch
        // started after this call really gets Compacted, as the trait promises (a logical
        // compaction let a racing watch still replay the compacted events).
        let opts = etcd_client::CompactionOptions::new().with_physical();
        match tokio::time::timeout(self.timeout, kv.compact(revision, Some(opts))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.revision_error(e, revision).await),
            Err(_) => Err(timeout_error(self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests;
