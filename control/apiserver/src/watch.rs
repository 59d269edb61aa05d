//! Watches: a chunked stream of `{"type": ..., "object": ...}` lines, fed by the resource's
//! watch cache ([`crate::cacher`]), or by a store watch of its own when the cache no longer
//! holds the requested revision.
//!
//! `resourceVersion` unset or `0` (or `sendInitialEvents=true`) starts with the current
//! objects as ADDED events (from the cache for `0`, which accepts any recent state; from
//! the store for unset, which asks for the newest); otherwise events after that revision
//! are sent. A selector turns
//! an update that moves an object into or out of the selection into ADDED or DELETED, as
//! kube-apiserver does. A compacted revision ends the stream with an ERROR event holding a
//! 410 Expired Status, so clients re-list; a store failure ends the stream, and clients
//! re-watch from the last revision they saw.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use http::{StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use weir_api::{ApiError, Resource};
use weir_store::{Error as StoreError, Event, ListOptions, WatchStream};

use crate::Shared;
use crate::cacher::{CachedEvent, CachedObject};
use crate::meta;
use crate::rest::{Filter, Query, Repr, Result, Target, partial_metadata, store_error};
use crate::table;

/// Interval of BOOKMARK events for clients that allow them.
const BOOKMARK_EVERY: Duration = Duration::from_secs(15);
/// Longest watch when the client sets no `timeoutSeconds` (kube-apiserver: 30–60 min).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Encoder {
    res: &'static Resource,
    repr: Repr,
    /// Column definitions go out with the first Table only.
    sent_columns: bool,
}

impl Encoder {
    fn event(&mut self, ty: &str, obj: &Value) -> Bytes {
        let object = match self.repr {
            Repr::Object => {
                let mut o = obj.clone();
                meta::set_type(self.res, &mut o);
                o
            }
            Repr::Metadata => partial_metadata(obj),
            Repr::Table => {
                let mut t = table::table(self.res, std::slice::from_ref(obj), "", None);
                if self.sent_columns {
                    t["columnDefinitions"] = json!([]);
                }
                self.sent_columns = true;
                t
            }
        };
        line(&json!({"type": ty, "object": object}))
    }

    /// Like [`Encoder::event`], reusing the cached object's JSON for plain objects.
    fn cached(&mut self, ty: &str, o: &CachedObject) -> Bytes {
        if self.repr != Repr::Object {
            return self.event(ty, &o.obj);
        }
        let json = o.json();
        let mut b = Vec::with_capacity(json.len() + 32);
        b.extend_from_slice(b"{\"type\":\"");
        b.extend_from_slice(ty.as_bytes());
        b.extend_from_slice(b"\",\"object\":");
        b.extend_from_slice(json);
        b.extend_from_slice(b"}\n");
        Bytes::from(b)
    }

    fn bookmark(&self, rv: i64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = match self.repr {
            Repr::Object => json!({
                "kind": self.res.kind,
                "apiVersion": self.res.api_version(),
                "metadata": metadata,
            }),
            _ => json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
            }),
        };
        line(&json!({"type": "BOOKMARK", "object": object}))
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn error_event(e: &ApiError) -> Bytes {
    line(&json!({"type": "ERROR", "object": e.to_status()}))
}

fn flag(q: &Query, name: &str) -> bool {
    q.get(name).is_some_and(|v| v == "true" || v == "1")
}

pub async fn serve(api: Arc<Shared>, t: Target, q: Query, repr: Repr) -> Result<Response> {
    let filter = Filter::from_query(t.res, &q)?;
    let timeout = match q.get("timeoutSeconds").filter(|s| !s.is_empty()) {
        Some(s) => Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "timeoutSeconds: Invalid value: {s:?}: must be a non-negative integer"
            ))
        })?),
        None => DEFAULT_TIMEOUT,
    };
    let bookmarks = flag(&q, "allowWatchBookmarks");
    let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let send_initial = match q.get("sendInitialEvents").map(String::as_str) {
        Some("true") => true,
        Some(_) => false,
        None => rv.is_empty() || rv == "0",
    };
    let initial_end = flag(&q, "sendInitialEvents") && bookmarks;
    let prefix = t.res.namespace_prefix(t.namespace.as_deref());
    let mut enc = Encoder {
        res: t.res,
        repr,
        sent_columns: false,
    };
    // Without a cache (the store cannot list or watch right now) a watch falls back to a
    // store watch of its own, which reports the store's error to the client.
    let cacher = match api.caches.get(t.res).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::debug!(resource = t.res.plural, error = %e, "no watch cache");
            None
        }
    };

    let mut initial = Vec::new();
    let mut backlog = Vec::new();
    let (start, source) = match cacher {
        // "0" accepts any state, so the cache's own serves, as in kube-apiserver.
        Some(c) if send_initial && rv == "0" => {
            let snap = c.snapshot(&prefix);
            for o in &snap.objects {
                if filter.matches(&o.obj) {
                    initial.push(enc.cached("ADDED", o));
                }
            }
            if initial_end {
                initial.push(enc.bookmark(snap.revision, true));
            }
            let ended = c.ended.clone();
            (snap.revision, Ok(Source::Cache(snap.live, ended)))
        }
        cacher => {
            let start = if send_initial {
                // Unset: the newest state, read from the store itself.
                let list = api
                    .store
                    .list(&prefix, ListOptions::default())
                    .await
                    .map_err(store_error)?;
                for kv in &list.items {
                    let obj = meta::from_kv(kv)?;
                    if filter.matches(&obj) {
                        initial.push(enc.event("ADDED", &obj));
                    }
                }
                if initial_end {
                    initial.push(enc.bookmark(list.revision, true));
                }
                list.revision
            } else {
                rv.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "resourceVersion: Invalid value: {rv:?}: must be a number"
                    ))
                })?
            };
            let cached = cacher.and_then(|c| Some((c.subscribe(start)?, c.ended.clone())));
            let source = match cached {
                Some((sub, ended)) => {
                    backlog = sub.backlog;
                    Ok(Source::Cache(sub.live, ended))
                }
                // Older than the cache's ring: the store still has it, or answers 410.
                None => api.store.watch(&prefix, start).await.map(Source::Store),
            };
            (start, source)
        }
    };

    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let shutdown = api.shutdown.clone();
    tokio::spawn(async move {
        for b in initial {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        let source = match source {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Ok(error_event(&watch_error(e)))).await;
                return;
            }
        };
        let mut w = Watcher {
            tx,
            enc,
            filter,
            prefix,
            start,
            last_rv: start,
        };
        for event in backlog {
            if !w.cached(&event).await {
                return;
            }
        }
        w.pump(source, bookmarks, timeout, shutdown).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .map_err(|e| ApiError::internal(&e.to_string()).into())
}

/// Where a watch's events come from.
enum Source {
    /// The resource's watch cache, until it ends.
    Cache(broadcast::Receiver<Arc<CachedEvent>>, CancellationToken),
    /// A store watch of its own, for a revision the cache no longer holds.
    Store(WatchStream),
}

enum Next {
    Cached(Arc<CachedEvent>),
    Store(Vec<Event>),
    /// The watch is over, with the error event to send if any.
    End(Option<ApiError>),
}

impl Source {
    /// Cancel-safe: both receivers are.
    async fn next(&mut self) -> Next {
        match self {
            Source::Cache(live, ended) => tokio::select! {
                biased;
                r = live.recv() => match r {
                    Ok(e) => Next::Cached(e),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // As kube-apiserver does with a watcher that cannot keep up: close
                        // it; the client watches again from the last revision it saw.
                        tracing::info!(behind = n, "closing a watch that fell behind");
                        Next::End(None)
                    }
                    Err(broadcast::error::RecvError::Closed) => Next::End(None),
                },
                // Only once everything already broadcast to this watcher is sent.
                () = ended.cancelled() => Next::End(None),
            },
            Source::Store(stream) => match stream.next().await {
                None => Next::End(None),
                Some(Ok(events)) => Next::Store(events),
                Some(Err(e)) => {
                    let e = watch_error(e);
                    if e.code == 410 {
                        Next::End(Some(e))
                    } else {
                        tracing::info!(error = %e, "watch ended by a store error");
                        Next::End(None)
                    }
                }
            },
        }
    }
}

/// One HTTP watch: filters events, encodes them and sends them to the response body.
struct Watcher {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    enc: Encoder,
    filter: Filter,
    /// Namespace scope: the cache holds the whole resource type.
    prefix: String,
    /// The revision the watch starts after.
    start: i64,
    /// The revision of the last event seen, for bookmarks.
    last_rv: i64,
}

impl Watcher {
    /// Sends what a cached event means to this watcher; false once the client is gone.
    async fn cached(&mut self, event: &CachedEvent) -> bool {
        // The live feed of a watch that starts ahead of the cache begins before its start.
        // (Not `last_rv`: the events of one transaction share a revision.)
        if event.revision <= self.start {
            return true;
        }
        self.last_rv = event.revision;
        match convert_cached(&mut self.enc, &self.filter, &self.prefix, event) {
            Some(bytes) => self.tx.send(Ok(bytes)).await.is_ok(),
            None => true,
        }
    }

    async fn pump(
        mut self,
        mut source: Source,
        bookmarks: bool,
        timeout: Duration,
        shutdown: CancellationToken,
    ) {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        loop {
            let next = tokio::select! {
                _ = &mut deadline => return,
                _ = shutdown.cancelled() => return,
                _ = self.tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    if self.tx.send(Ok(self.enc.bookmark(self.last_rv, false))).await.is_err() {
                        return;
                    }
                    continue;
                }
                next = source.next() => next,
            };
            match next {
                Next::End(error) => {
                    if let Some(e) = error {
                        let _ = self.tx.send(Ok(error_event(&e))).await;
                    }
                    return;
                }
                Next::Cached(event) => {
                    if !self.cached(&event).await {
                        return;
                    }
                }
                Next::Store(events) => {
                    for event in events {
                        self.last_rv = event.revision();
                        let Some(bytes) = convert(&mut self.enc, &self.filter, &event) else {
                            continue;
                        };
                        if self.tx.send(Ok(bytes)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn watch_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Compacted {
            requested,
            compact_revision,
        } => ApiError::expired(format!(
            "too old resource version: {requested} ({compact_revision})"
        )),
        other => store_error(other),
    }
}

/// The watch event for one cached event, or None when this watch does not see it.
fn convert_cached(
    enc: &mut Encoder,
    filter: &Filter,
    prefix: &str,
    event: &CachedEvent,
) -> Option<Bytes> {
    if !event.key.starts_with(prefix) {
        return None;
    }
    let now = filter.matches(&event.obj.obj);
    if event.deleted {
        return now.then(|| enc.cached("DELETED", &event.obj));
    }
    let before = event.prev.as_ref().map(|p| filter.matches(&p.obj));
    match (before, now) {
        (None | Some(false), true) => Some(enc.cached("ADDED", &event.obj)),
        (Some(true), true) => Some(enc.cached("MODIFIED", &event.obj)),
        (Some(true), false) => Some(enc.cached("DELETED", &event.obj)),
        (None | Some(false), false) => None,
    }
}

/// The watch event for one store event, or None when the selection does not see it.
fn convert(enc: &mut Encoder, filter: &Filter, event: &Event) -> Option<Bytes> {
    match event {
        Event::Put { kv, prev } => {
            let obj = meta::from_kv(kv).ok()?;
            let now = filter.matches(&obj);
            let before = prev
                .as_ref()
                .and_then(|p| meta::from_kv(p).ok())
                .map(|p| filter.matches(&p))
                // An update whose previous value the backend did not send: assume it
                // stayed in the selection.
                .or((kv.create_revision != kv.mod_revision).then_some(now));
            match (before, now) {
                (None | Some(false), true) => Some(enc.event("ADDED", &obj)),
                (Some(true), true) => Some(enc.event("MODIFIED", &obj)),
                (Some(true), false) => Some(enc.event("DELETED", &obj)),
                (None | Some(false), false) => None,
            }
        }
        Event::Delete { prev, revision } => {
            let mut obj = meta::from_kv(prev).ok()?;
            if !filter.matches(&obj) {
                return None;
            }
            meta::set_rv(&mut obj, *revision);
            Some(enc.event("DELETED", &obj))
        }
    }
}
