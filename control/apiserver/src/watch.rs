//! Watches: a chunked stream of `{"type": ..., "object": ...}` lines fed by a store watch.
//!
//! `resourceVersion` unset or `0` (or `sendInitialEvents=true`) starts with the current
//! objects as ADDED events; otherwise events after that revision are sent. A selector turns
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
use tokio::sync::mpsc;
use weir_api::{ApiError, Resource};
use weir_store::{Error as StoreError, Event, ListOptions, WatchStream};

use crate::Shared;
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
    let prefix = t.res.namespace_prefix(t.namespace.as_deref());
    let mut enc = Encoder {
        res: t.res,
        repr,
        sent_columns: false,
    };

    let mut initial = Vec::new();
    let start = if send_initial {
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
        if flag(&q, "sendInitialEvents") && bookmarks {
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

    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let stream = api.store.watch(&prefix, start).await;
    let shutdown = api.shutdown.clone();
    tokio::spawn(async move {
        for b in initial {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Ok(error_event(&watch_error(e)))).await;
                return;
            }
        };
        pump(stream, tx, enc, filter, start, bookmarks, timeout, shutdown).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .map_err(|e| ApiError::internal(&e.to_string()).into())
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

#[allow(clippy::too_many_arguments)]
async fn pump(
    mut stream: WatchStream,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    mut enc: Encoder,
    filter: Filter,
    mut last_rv: i64,
    bookmarks: bool,
    timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(BOOKMARK_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            _ = tick.tick(), if bookmarks => {
                if tx.send(Ok(enc.bookmark(last_rv, false))).await.is_err() {
                    return;
                }
            }
            next = stream.next() => match next {
                None => return,
                Some(Err(e)) => {
                    let e = watch_error(e);
                    if e.code == 410 {
                        let _ = tx.send(Ok(error_event(&e))).await;
                    } else {
                        tracing::info!(error = %e, "watch ended by a store error");
                    }
                    return;
                }
                Some(Ok(events)) => {
                    for event in events {
                        last_rv = event.revision();
                        let Some(bytes) = convert(&mut enc, &filter, &event) else { continue };
                        if tx.send(Ok(bytes)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
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
