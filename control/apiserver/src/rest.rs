//! The REST verbs on registry resources: URL parsing, content negotiation, and
//! get/list/create/update/patch/delete/deletecollection plus the `status`, `scale` and
//! `binding` subresources. Watches are in [`crate::watch`], tables in [`crate::table`],
//! `pods/log` in [`crate::logs`].
//!
//! Every write is a single store compare-and-swap (a new Service's cluster IP and node
//! ports are claimed in the same atomic write); anything an update claims before its write
//! is released when the write fails, so a failed request stores nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderMap, Method, StatusCode, header};
use serde_json::{Value, json};
use weir_api::selector::{FieldSelector, LabelSelector};
use weir_api::{ApiError, Resource, StatusReason, registry};
use weir_store::{Error as StoreError, KeyValue, ListOptions};

use crate::Shared;
use crate::admit::{Write, admit};
use crate::alloc::Held;
use crate::meta;
use crate::table;
use crate::watch;

/// Request bodies above this are refused with 413, as kube-apiserver does (3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// A failed request, rendered as a Kubernetes `Status`.
#[derive(Debug)]
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.0.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = json_response(code, &self.0.to_status());
        if code == StatusCode::SERVICE_UNAVAILABLE {
            // Clients that honour it (client-go, kube-rs) retry soon, not with a long backoff.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        resp
    }
}

pub type Result<T, E = Failure> = std::result::Result<T, E>;

pub fn json_response(code: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

/// Store errors as API errors; `NotFound`/`AlreadyExists`/`Conflict` are mapped with the
/// object's name by callers that know it.
pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound { key } => {
            ApiError::new(404, StatusReason::NotFound, format!("{key} not found"))
        }
        StoreError::AlreadyExists { key } => ApiError::new(
            409,
            StatusReason::AlreadyExists,
            format!("{key} already exists"),
        ),
        StoreError::Conflict { key, .. } => ApiError::new(
            409,
            StatusReason::Conflict,
            format!(
                "Operation cannot be fulfilled on {key}: the object has been modified; please apply your changes to the latest version and try again"
            ),
        ),
        StoreError::Compacted {
            requested,
            compact_revision,
        } => ApiError::expired(format!(
            "too old resource version: {requested} ({compact_revision})"
        )),
        StoreError::FutureRevision { requested, current } => ApiError::timeout(&format!(
            "Too large resource version: {requested}, current resource version: {current}"
        )),
        StoreError::Unavailable(msg) => {
            ApiError::unavailable(format!("storage is unavailable: {msg}"))
        }
        // 504 without Retry-After, as kube-apiserver answers: a timed-out create may have
        // been applied, and a client that retried it would get AlreadyExists.
        StoreError::Timeout(msg) => ApiError::timeout(&format!(
            "request did not complete within the allowed duration: {msg}"
        )),
        // Under the request limit but over what one store value may hold (etcd refuses
        // such writes too): the client must send less, so 413 as kube-apiserver answers.
        StoreError::ValueTooLarge { size, limit, .. } => ApiError::too_large(&format!(
            "the object is {size} bytes when stored, over the storage limit of {limit} bytes"
        )),
        other => ApiError::internal(&other.to_string()),
    }
}

pub(crate) fn object_error(res: &Resource, name: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound { .. } => ApiError::not_found(res, name),
        StoreError::AlreadyExists { .. } => ApiError::already_exists(res, name),
        StoreError::Conflict { .. } => ApiError::stale(res, name),
        other => store_error(other),
    }
}

/// Which resource, namespace, object and subresource a URL names.
#[derive(Debug, Clone)]
pub struct Target {
    pub res: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
    /// The deprecated `/watch/` path form.
    pub watch_path: bool,
}

impl Target {
    pub fn parse(path: &str) -> Result<Self, ApiError> {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, version, mut rest) = match parts.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return Err(ApiError::unknown_resource()),
        };
        let watch_path = rest.first() == Some(&"watch");
        if watch_path {
            rest = &rest[1..];
        }
        let mut namespace = None;
        if rest.len() >= 3 && rest[0] == "namespaces" {
            // `namespaces/<ns>/status` is the Namespace's own subresource.
            let own_sub =
                group.is_empty() && rest.len() == 3 && ["status", "finalize"].contains(&rest[2]);
            if !own_sub {
                namespace = Some(rest[1].to_string());
                rest = &rest[2..];
            }
        }
        let (plural, name, sub) = match rest {
            [p] => (*p, None, None),
            [p, n] => (*p, Some(n.to_string()), None),
            [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
            _ => return Err(ApiError::unknown_resource()),
        };
        let res = registry::find(group, version, plural).ok_or_else(ApiError::unknown_resource)?;
        if namespace.is_some() && !res.namespaced {
            return Err(ApiError::unknown_resource());
        }
        if res.namespaced && namespace.is_none() && name.is_some() {
            return Err(ApiError::unknown_resource());
        }
        if let Some(s) = &sub
            && !res.has_subresource(s)
        {
            return Err(ApiError::unknown_resource());
        }
        Ok(Self {
            res,
            namespace,
            name,
            sub,
            watch_path,
        })
    }

    fn key(&self, name: &str) -> String {
        self.res.key(self.namespace.as_deref(), name)
    }
}

/// How the client wants objects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr {
    Object,
    /// `meta.k8s.io/v1 Table`, what `kubectl get` asks for.
    Table,
    /// `PartialObjectMetadata(List)`, what metadata-only informers ask for.
    Metadata,
}

pub fn negotiate(headers: &HeaderMap) -> Result<Repr, ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Repr::Object);
    };
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let mime = parts.next().unwrap_or("");
        let params: HashMap<&str, &str> = parts.filter_map(|p| p.split_once('=')).collect();
        if !matches!(
            mime,
            "application/json" | "*/*" | "application/*" | "application/yaml"
        ) {
            continue;
        }
        match (params.get("as"), params.get("g"), params.get("v")) {
            (None, _, _) => return Ok(Repr::Object),
            (Some(&"Table"), Some(&"meta.k8s.io"), Some(&"v1")) => return Ok(Repr::Table),
            (
                Some(&"PartialObjectMetadata" | &"PartialObjectMetadataList"),
                Some(&"meta.k8s.io"),
                Some(&"v1"),
            ) => {
                return Ok(Repr::Metadata);
            }
            _ => continue,
        }
    }
    Err(ApiError::not_acceptable(accept))
}

pub type Query = HashMap<String, String>;

fn query_of(req: &Request) -> Query {
    req.uri()
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default()
}

fn strict(q: &Query) -> bool {
    q.get("fieldValidation").is_some_and(|v| v == "Strict")
}

/// Bodies over [`MAX_BODY`] are still read (and dropped) up to this size, so that the
/// client, still sending, reads the 413 instead of a broken connection.
const DRAIN_LIMIT: usize = 4 * MAX_BODY;

async fn read_body(req: Request) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || ApiError::too_large(&format!("limit is {MAX_BODY}"));
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && len > DRAIN_LIMIT
    {
        return Err(too_large());
    }
    let mut body = req.into_body();
    let mut buf = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= MAX_BODY {
                buf.extend_from_slice(&data);
            } else if total > DRAIN_LIMIT {
                break;
            }
        }
    }
    if total > MAX_BODY {
        return Err(too_large());
    }
    Ok(buf.freeze())
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|| "application/json".to_string())
}

/// A request body as JSON (or YAML, by `Content-Type`); the object must be a JSON object.
fn parse_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let value = weir_api::admission::parse_body(body, content_type)?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// Label and field selectors of a list or watch, plus the name of a single-object watch.
pub struct Filter {
    res: &'static Resource,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    pub fn from_query(res: &'static Resource, q: &Query) -> Result<Self, ApiError> {
        Ok(Self {
            res,
            labels: LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?,
            fields: FieldSelector::parse(
                res,
                q.get("fieldSelector").map(String::as_str).unwrap_or(""),
            )?,
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(self.res, obj)
    }
}

/// The axum fallback: every path under `/api` and `/apis` that discovery does not serve.
pub async fn handle(State(api): State<Arc<Shared>>, req: Request) -> Response {
    match dispatch(&api, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(api: &Arc<Shared>, req: Request) -> Result<Response> {
    let mut t = Target::parse(req.uri().path())?;
    let q = query_of(&req);
    let repr = negotiate(req.headers())?;
    let method = req.method().clone();
    if method != Method::GET && q.contains_key("dryRun") {
        return Err(ApiError::bad_request("dryRun is not supported by this server").into());
    }
    let ctype = content_type(req.headers());
    let is_watch = t.watch_path || q.get("watch").is_some_and(|w| w == "true" || w == "1");
    match (method, t.name.clone(), t.sub.clone()) {
        (Method::GET, None, None) if is_watch => watch::serve(api.clone(), t, q, repr).await,
        (Method::GET, Some(name), None) if is_watch => {
            // A watch of one object is a watch of its collection filtered by name.
            t.name = None;
            let mut q = q;
            let by_name = format!("metadata.name={name}");
            let fs = match q.get("fieldSelector").filter(|s| !s.is_empty()) {
                Some(f) => format!("{f},{by_name}"),
                None => by_name,
            };
            q.insert("fieldSelector".into(), fs);
            watch::serve(api.clone(), t, q, repr).await
        }
        (Method::GET, None, None) => list(api, &t, &q, repr).await,
        (Method::GET, Some(name), None | Some(_))
            if t.sub.as_deref() != Some("scale") && t.sub.as_deref() != Some("log") =>
        {
            let obj = get_object(api, &t, &name).await?;
            Ok(respond(StatusCode::OK, t.res, obj, repr))
        }
        (Method::GET, Some(name), Some(sub)) if sub == "log" => {
            Ok(crate::logs::serve(api, &t, &name, &q).await?)
        }
        (Method::GET, Some(name), Some(sub)) if sub == "scale" => {
            let obj = get_object(api, &t, &name).await?;
            Ok(json_response(StatusCode::OK, &scale_of(&obj)))
        }
        (Method::POST, None, None) => {
            let body = parse_body(&ctype, &read_body(req).await?)?;
            let obj = create(api, &t, body, strict(&q)).await?;
            Ok(respond(StatusCode::CREATED, t.res, obj, repr))
        }
        (Method::POST, Some(name), Some(sub)) if sub == "binding" => {
            let body = parse_body(&ctype, &read_body(req).await?)?;
            bind(api, &t, &name, &body).await
        }
        (Method::PUT, Some(name), sub) => {
            let body = parse_body(&ctype, &read_body(req).await?)?;
            let obj = match sub.as_deref() {
                Some("scale") => scale_update(api, &t, &name, ScaleChange::Replace(body)).await?,
                sub => update(api, &t, &name, body, sub, strict(&q)).await?,
            };
            Ok(respond(StatusCode::OK, t.res, obj, repr))
        }
        (Method::PATCH, Some(name), sub) => {
            let patch = read_body(req).await?;
            let obj = match sub.as_deref() {
                Some("scale") => {
                    scale_update(api, &t, &name, ScaleChange::Patch(&ctype, &patch)).await?
                }
                sub => patch_object(api, &t, &name, sub, &ctype, &patch, strict(&q)).await?,
            };
            Ok(respond(StatusCode::OK, t.res, obj, repr))
        }
        (Method::DELETE, Some(name), None) => {
            let body = read_body(req).await?;
            let opts = DeleteOpts::parse(&q, &body)?;
            let (code, obj) = delete(api, t.res, t.namespace.as_deref(), &name, &opts).await?;
            Ok(respond(code, t.res, obj, repr))
        }
        (Method::DELETE, None, None) => {
            let body = read_body(req).await?;
            let opts = DeleteOpts::parse(&q, &body)?;
            delete_collection(api, &t, &q, &opts, repr).await
        }
        _ => Err(ApiError::method_not_allowed().into()),
    }
}

/// An object in the representation the client asked for.
fn respond(code: StatusCode, res: &'static Resource, obj: Value, repr: Repr) -> Response {
    let body = match repr {
        Repr::Object => obj,
        Repr::Table => table::table(res, std::slice::from_ref(&obj), "", None),
        Repr::Metadata => partial_metadata(&obj),
    };
    json_response(code, &body)
}

pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

async fn get_kv(api: &Shared, t: &Target, name: &str) -> Result<KeyValue, ApiError> {
    api.store
        .get(&t.key(name))
        .await
        .map_err(|e| object_error(t.res, name, e))?
        .ok_or_else(|| ApiError::not_found(t.res, name))
}

pub(crate) async fn get_object(api: &Shared, t: &Target, name: &str) -> Result<Value, ApiError> {
    meta::from_kv(&get_kv(api, t, name).await?)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: i64,
    start: String,
}

async fn list(api: &Shared, t: &Target, q: &Query, repr: Repr) -> Result<Response> {
    let filter = Filter::from_query(t.res, q)?;
    let limit: usize = match q.get("limit").filter(|s| !s.is_empty()) {
        Some(l) => l.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "limit: Invalid value: {l:?}: must be a non-negative integer"
            ))
        })?,
        None => 0,
    };
    let (mut start_after, mut revision) = match q.get("continue").filter(|s| !s.is_empty()) {
        Some(token) => {
            let token: ContinueToken = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| ApiError::bad_request("continue key is not valid".to_string()))?;
            (Some(token.start), token.rv)
        }
        None => (None, list_revision(q)?),
    };
    let min_revision = match q.get("resourceVersionMatch").map(String::as_str) {
        Some("Exact") => 0,
        _ => requested_rv(q)?.unwrap_or(0),
    };
    let prefix = t.res.namespace_prefix(t.namespace.as_deref());
    let mut items = Vec::new();
    let mut more = false;
    // `resourceVersion=0` accepts any recent state: kube-apiserver answers it from its watch
    // cache, and so does this server. A limit or a continue token pages through the store.
    let cached = if q.get("resourceVersion").is_some_and(|v| v == "0")
        && limit == 0
        && start_after.is_none()
        && matches!(
            q.get("resourceVersionMatch").map(String::as_str),
            None | Some("" | "NotOlderThan")
        ) {
        api.caches.get(t.res).await.ok()
    } else {
        None
    };
    if let Some(cacher) = &cached {
        let (objects, at) = cacher.list(&prefix);
        items.extend(
            objects
                .iter()
                .filter(|o| filter.matches(&o.obj))
                .map(|o| o.obj.clone()),
        );
        revision = at;
    }
    while cached.is_none() {
        let want = if limit > 0 { limit - items.len() } else { 0 };
        let page = api
            .store
            .list(
                &prefix,
                ListOptions {
                    revision,
                    limit: want,
                    start_after: start_after.clone(),
                },
            )
            .await
            .map_err(|e| match e {
                StoreError::Compacted { .. } if q.contains_key("continue") => ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ),
                e => store_error(e),
            })?;
        if page.revision < min_revision {
            return Err(ApiError::timeout(&format!(
                "Too large resource version: {min_revision}, current resource version: {}",
                page.revision
            ))
            .into());
        }
        revision = page.revision;
        for kv in &page.items {
            let obj = meta::from_kv(kv)?;
            if filter.matches(&obj) {
                items.push(obj);
            }
            start_after = Some(kv.key.clone());
        }
        if !page.more {
            break;
        }
        if limit > 0 && items.len() >= limit {
            more = true;
            break;
        }
    }
    let cont = match (more, start_after) {
        (true, Some(start)) => {
            let token = serde_json::to_vec(&ContinueToken {
                rv: revision,
                start,
            })
            .unwrap_or_default();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
        }
        _ => String::new(),
    };
    let body = match repr {
        Repr::Table => table::table(t.res, &items, &revision.to_string(), Some(&cont)),
        Repr::Metadata => {
            let mut meta = json!({"resourceVersion": revision.to_string()});
            if !cont.is_empty() {
                meta["continue"] = json!(cont);
            }
            json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": meta,
                "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
            })
        }
        Repr::Object => {
            let mut meta = json!({"resourceVersion": revision.to_string()});
            if !cont.is_empty() {
                meta["continue"] = json!(cont);
            }
            let items: Vec<Value> = items
                .into_iter()
                .map(|mut o| {
                    meta::set_type(t.res, &mut o);
                    o
                })
                .collect();
            json!({
                "kind": t.res.list_kind(),
                "apiVersion": t.res.api_version(),
                "metadata": meta,
                "items": items,
            })
        }
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn requested_rv(q: &Query) -> Result<Option<i64>, ApiError> {
    match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion: Invalid value: {s:?}: must be a number"
            ))
        }),
    }
}

/// The store revision to list at: `resourceVersionMatch=Exact` pins it; otherwise the
/// newest state is at least as new as anything asked for.
fn list_revision(q: &Query) -> Result<i64, ApiError> {
    let rv = requested_rv(q)?;
    match q.get("resourceVersionMatch").map(String::as_str) {
        None | Some("") | Some("NotOlderThan") => Ok(0),
        Some("Exact") => match rv {
            Some(rv) if rv > 0 => Ok(rv),
            _ => Err(ApiError::bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\" or unset",
            )),
        },
        Some(other) => Err(ApiError::bad_request(format!(
            "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
        ))),
    }
}

/// Fill in server-owned metadata of a new object and store it.
pub async fn create(
    api: &Shared,
    t: &Target,
    body: Value,
    strict: bool,
) -> Result<Value, ApiError> {
    let res = t.res;
    meta::check_type(res, &body)?;
    let mut obj = body;
    meta::set_type(res, &mut obj);
    {
        let m = meta::metadata_mut(&mut obj);
        if res.namespaced {
            let url_ns = t.namespace.as_deref().unwrap_or("");
            match m.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() && ns != url_ns => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({ns}) does not match the namespace sent on the request ({url_ns})"
                    )));
                }
                _ => {
                    m.insert("namespace".into(), json!(url_ns));
                }
            }
        } else {
            m.remove("namespace");
        }
        let has_name = m
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        if !has_name
            && let Some(prefix) = m
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
        {
            let name = format!("{prefix}{}", meta::name_suffix());
            m.insert("name".into(), json!(name));
        }
        m.insert("uid".into(), json!(meta::uid()));
        m.insert("creationTimestamp".into(), json!(meta::now()));
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ] {
            m.remove(f);
        }
    }
    if res.has_subresource("status")
        && let Some(o) = obj.as_object_mut()
    {
        o.remove("status");
    }
    if obj.get("spec").is_some() {
        meta::metadata_mut(&mut obj).insert("generation".into(), json!(1));
    } else {
        meta::metadata_mut(&mut obj).remove("generation");
    }
    let mut obj = admit(res, obj, Write::Create, strict)?;
    let name = meta::name(&obj).to_string();
    if name.is_empty() {
        return Err(ApiError::invalid(
            res,
            "",
            vec![weir_api::Cause::required(
                "metadata.name",
                "name or generateName is required",
            )],
        ));
    }
    if let Some(ns) = t.namespace.as_deref().filter(|_| res.namespaced) {
        check_namespace_open(api, ns, res, &name).await?;
    }
    if res.kind == "Service" {
        return api.alloc.create(res, obj, &t.key(&name)).await;
    }
    let kv = api
        .store
        .create(&t.key(&name), meta::to_stored(&obj))
        .await
        .map_err(|e| object_error(res, &name, e))?;
    meta::set_rv(&mut obj, kv.mod_revision);
    Ok(obj)
}

fn namespaces() -> &'static Resource {
    registry::find("", "v1", "namespaces").unwrap_or(&registry::all()[0])
}

/// How long a namespace seen open is trusted without reading it again. Like the informer
/// cache of kube-apiserver's NamespaceLifecycle admission, this saves a store read per
/// create; an object that slips into a namespace that began terminating within this window
/// is removed by the termination, which runs until the namespace is empty.
const OPEN_NAMESPACE_TTL: Duration = Duration::from_secs(1);

/// A namespaced create needs its namespace to exist and not be terminating.
async fn check_namespace_open(
    api: &Shared,
    ns: &str,
    res: &Resource,
    name: &str,
) -> Result<(), ApiError> {
    let seen = api
        .open_namespaces
        .lock()
        .ok()
        .and_then(|m| m.get(ns).copied());
    if seen.is_some_and(|t| t.elapsed() < OPEN_NAMESPACE_TTL) {
        return Ok(());
    }
    let nsres = namespaces();
    let kv = api
        .store
        .get(&nsres.key(None, ns))
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found(nsres, ns))?;
    let obj = meta::from_kv(&kv)?;
    if meta::meta_str(&obj, "deletionTimestamp").is_some() {
        return Err(ApiError::forbidden(
            res,
            name,
            &format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        ));
    }
    if let Ok(mut m) = api.open_namespaces.lock() {
        m.insert(ns.to_string(), Instant::now());
    }
    Ok(())
}

/// PUT of an object or its `status`.
async fn update(
    api: &Shared,
    t: &Target,
    name: &str,
    body: Value,
    sub: Option<&str>,
    strict: bool,
) -> Result<Value, ApiError> {
    meta::check_type(t.res, &body)?;
    let precondition = meta::client_rv(&body)?;
    let kv = get_kv(api, t, name).await?;
    let old = meta::from_kv(&kv)?;
    commit(api, t, name, kv, old, body, sub, precondition, strict).await
}

/// Write `new` over the stored `kv`/`old` as an update of the object (`sub` None) or of its
/// status, keeping server-owned fields.
#[allow(clippy::too_many_arguments)]
async fn commit(
    api: &Shared,
    t: &Target,
    name: &str,
    kv: KeyValue,
    old: Value,
    mut new: Value,
    sub: Option<&str>,
    precondition: Option<i64>,
    strict: bool,
) -> Result<Value, ApiError> {
    let res = t.res;
    if let Some(rv) = precondition
        && rv != kv.mod_revision
    {
        return Err(ApiError::stale(res, name));
    }
    let body_name = meta::name(&new);
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if let (Some(url_ns), Some(ns)) = (t.namespace.as_deref(), meta::meta_str(&new, "namespace"))
        && !ns.is_empty()
        && ns != url_ns
    {
        return Err(ApiError::bad_request(format!(
            "the namespace of the provided object ({ns}) does not match the namespace sent on the request ({url_ns})"
        )));
    }
    match sub {
        Some("status") => {
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        Some("finalize") => {
            let finalizers = new["spec"]["finalizers"].clone();
            new = old.clone();
            new["spec"]["finalizers"] = finalizers;
        }
        _ => {
            if res.has_subresource("status") {
                match (new.as_object_mut(), old.get("status")) {
                    (Some(o), Some(s)) => {
                        o.insert("status".into(), s.clone());
                    }
                    (Some(o), None) => {
                        o.remove("status");
                    }
                    _ => {}
                }
            }
        }
    }
    meta::set_type(res, &mut new);
    {
        let old_meta = meta::metadata(&old).cloned().unwrap_or_default();
        let m = meta::metadata_mut(&mut new);
        m.insert("name".into(), json!(name));
        for f in [
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old_meta.get(f) {
                Some(v) => m.insert(f.into(), v.clone()),
                None => m.remove(f),
            };
        }
        m.insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
        m.remove("managedFields");
        m.remove("selfLink");
    }
    let write = match sub {
        None => Write::Update(&old),
        Some(_) => Write::Subresource(&old),
    };
    let mut new = admit(res, new, write, strict)?;
    if let Some(g) = meta::metadata(&old)
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64)
        && meta::spec_changed(&old, &new)
    {
        meta::metadata_mut(&mut new).insert("generation".into(), json!(g + 1));
    }
    // Only writes of the object itself allocate: a status write keeps the stored spec, and
    // Kubernetes never allocates there (a Service stored before it needed a port gets it on
    // its next update, not from a load balancer controller's status write).
    let (claimed, freed) = if res.kind == "Service" && sub.is_none() {
        let claimed = api.alloc.assign(res, &mut new, Some(&old)).await?;
        (claimed, Held::of(&old).minus(&Held::of(&new)))
    } else {
        (Held::default(), Held::default())
    };
    if new == old {
        return Ok(old);
    }
    let key = t.key(name);
    // The last finalizer is gone from an object whose deletion has no grace period left to
    // run (kube-apiserver's shouldDeleteDuringUpdate): its deletion completes now. A pod
    // deleted gracefully keeps its grace period, and its node's status writes meanwhile
    // are plain updates; the node ends it with a delete of grace 0.
    let no_grace_left = meta::metadata(&old)
        .and_then(|m| m.get("deletionGracePeriodSeconds"))
        .and_then(Value::as_i64)
        .is_none_or(|g| g == 0);
    if meta::meta_str(&old, "deletionTimestamp").is_some()
        && no_grace_left
        && meta::finalizers_empty(&new)
    {
        return match api.store.delete(&key, Some(kv.mod_revision)).await {
            Ok((_, rev)) => {
                release_object(api, res, &old).await;
                meta::set_rv(&mut new, rev);
                Ok(new)
            }
            Err(e) => {
                api.alloc.release(&claimed).await;
                Err(object_error(res, name, e))
            }
        };
    }
    match api
        .store
        .update(&key, meta::to_stored(&new), kv.mod_revision)
        .await
    {
        Ok(kv) => {
            api.alloc.release(&freed).await;
            meta::set_rv(&mut new, kv.mod_revision);
            Ok(new)
        }
        Err(e) => {
            api.alloc.release(&claimed).await;
            Err(object_error(res, name, e))
        }
    }
}

/// PATCH: apply the patch to the stored object and write it back, retrying on a conflict
/// with a concurrent writer unless the patch itself pins a `resourceVersion`.
#[allow(clippy::too_many_arguments)]
async fn patch_object(
    api: &Shared,
    t: &Target,
    name: &str,
    sub: Option<&str>,
    ctype: &str,
    patch: &[u8],
    strict: bool,
) -> Result<Value, ApiError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let kv = get_kv(api, t, name).await?;
        let old = meta::from_kv(&kv)?;
        let patched = crate::admit::apply_patch(t.res, &old, ctype, patch)?;
        let pinned = meta::client_rv(&patched)?.filter(|rv| *rv != kv.mod_revision);
        if pinned.is_some() {
            return Err(ApiError::stale(t.res, name));
        }
        match commit(api, t, name, kv, old, patched, sub, None, strict).await {
            Err(e) if e.reason == StatusReason::Conflict && attempts < 5 => continue,
            r => return r,
        }
    }
}

/// `autoscaling/v1 Scale` of a Deployment or ReplicaSet.
fn scale_of(obj: &Value) -> Value {
    let m = meta::metadata(obj).cloned().unwrap_or_default();
    let mut metadata = json!({});
    for f in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = m.get(f) {
            metadata[f] = v.clone();
        }
    }
    let selector = meta::selector_string(&obj["spec"]["selector"]);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": metadata,
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector,
        },
    })
}

enum ScaleChange<'a> {
    Replace(Value),
    Patch(&'a str, &'a [u8]),
}

async fn scale_update(
    api: &Shared,
    t: &Target,
    name: &str,
    change: ScaleChange<'_>,
) -> Result<Value, ApiError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let kv = get_kv(api, t, name).await?;
        let old = meta::from_kv(&kv)?;
        let current = scale_of(&old);
        let scale = match &change {
            ScaleChange::Replace(body) => body.clone(),
            ScaleChange::Patch(ctype, patch) => {
                crate::admit::apply_patch(t.res, &current, ctype, patch)?
            }
        };
        // A patch starts from the current Scale, so its resourceVersion pins the object only
        // when the patch itself set another one; otherwise a conflict is retried.
        let pinned = match &change {
            ScaleChange::Replace(_) => meta::client_rv(&scale)?,
            ScaleChange::Patch(..) => meta::client_rv(&scale)?.filter(|rv| *rv != kv.mod_revision),
        };
        // Scale's `replicas` is `omitempty` in Go, so a client scaling to zero sends no field.
        let replicas = match &scale["spec"]["replicas"] {
            Value::Null => 0,
            v => v.as_i64().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "spec.replicas: Invalid value: {v}: must be an integer"
                ))
            })?,
        };
        if replicas < 0 {
            return Err(ApiError::new(
                422,
                StatusReason::Invalid,
                format!(
                    "Scale.autoscaling {name:?} is invalid: spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
                ),
            ));
        }
        let mut new = old.clone();
        new["spec"]["replicas"] = json!(replicas);
        match commit(api, t, name, kv, old, new, None, pinned, false).await {
            Err(e) if e.reason == StatusReason::Conflict && pinned.is_none() && attempts < 5 => {
                continue;
            }
            r => return r.map(|o| scale_of(&o)),
        }
    }
}

/// `pods/<name>/binding`: set `spec.nodeName` once.
async fn bind(api: &Shared, t: &Target, name: &str, body: &Value) -> Result<Response> {
    let node = body["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                t.res,
                name,
                vec![weir_api::Cause::required("target.name", "")],
            )
        })?;
    loop {
        let kv = get_kv(api, t, name).await?;
        let mut pod = meta::from_kv(&kv)?;
        if let Some(bound) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
            return Err(ApiError::conflict(
                t.res,
                name,
                &format!("pod {name} is already assigned to node {bound:?}"),
            )
            .into());
        }
        if meta::meta_str(&pod, "deletionTimestamp").is_some() {
            return Err(ApiError::conflict(
                t.res,
                name,
                "pod is being deleted, cannot be assigned to a host",
            )
            .into());
        }
        pod["spec"]["nodeName"] = json!(node);
        match api
            .store
            .update(&kv.key, meta::to_stored(&pod), kv.mod_revision)
            .await
        {
            Ok(_) => {
                return Ok(json_response(
                    StatusCode::CREATED,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                ));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(object_error(t.res, name, e).into()),
        }
    }
}

/// `DeleteOptions` from the body and the query.
#[derive(Debug, Default)]
pub struct DeleteOpts {
    grace: Option<i64>,
    uid: Option<String>,
    rv: Option<i64>,
    /// `Orphan` or `Foreground`: the garbage collector's finalizer to add. `Background`
    /// (the default) deletes at once and leaves dependents to the collector.
    propagation: Option<String>,
}

impl DeleteOpts {
    fn parse(q: &Query, body: &[u8]) -> Result<Self, ApiError> {
        let mut opts = Self::default();
        if !body.iter().all(u8::is_ascii_whitespace) {
            let v: Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the DeleteOptions body is not valid JSON: {e}"))
            })?;
            opts.grace = v["gracePeriodSeconds"].as_i64();
            opts.uid = v["preconditions"]["uid"].as_str().map(str::to_string);
            opts.rv = v["preconditions"]["resourceVersion"]
                .as_str()
                .and_then(|s| s.parse().ok());
            opts.propagation = v["propagationPolicy"].as_str().map(str::to_string);
        }
        if let Some(p) = q.get("propagationPolicy") {
            opts.propagation = Some(p.clone());
        }
        match opts.propagation.as_deref() {
            None | Some("Background" | "Foreground" | "Orphan") => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "propagationPolicy: Unsupported value: {other:?}: supported values: \"Background\", \"Foreground\", \"Orphan\""
                )));
            }
        }
        if let Some(g) = q.get("gracePeriodSeconds") {
            opts.grace = Some(g.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "gracePeriodSeconds: Invalid value: {g:?}: must be an integer"
                ))
            })?);
        }
        Ok(opts)
    }
}

/// Delete one object: at once, or by marking it (`deletionTimestamp`) when finalizers,
/// a bound pod's grace period, or namespace termination must run first.
pub async fn delete(
    api: &Arc<Shared>,
    res: &'static Resource,
    namespace: Option<&str>,
    name: &str,
    opts: &DeleteOpts,
) -> Result<(StatusCode, Value), ApiError> {
    let key = res.key(namespace, name);
    loop {
        let kv = api
            .store
            .get(&key)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::not_found(res, name))?;
        let mut obj = meta::from_kv(&kv)?;
        if let Some(uid) = &opts.uid
            && meta::meta_str(&obj, "uid") != Some(uid)
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta::meta_str(&obj, "uid").unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = opts.rv
            && rv != kv.mod_revision
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    kv.mod_revision
                ),
            ));
        }
        let marked = meta::meta_str(&obj, "deletionTimestamp").is_some();
        let gc_finalizer = match opts.propagation.as_deref() {
            Some("Foreground") => Some("foregroundDeletion"),
            Some("Orphan") => Some("orphan"),
            _ => None,
        };
        if let Some(f) = gc_finalizer.filter(|_| res.kind != "Namespace") {
            let m = meta::metadata_mut(&mut obj);
            let list = m.entry("finalizers").or_insert_with(|| json!([]));
            if let Some(list) = list.as_array_mut()
                && !list.iter().any(|v| v == f)
            {
                list.push(json!(f));
            }
        }
        let bound_pod = res.kind == "Pod"
            && obj["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty())
            && opts.grace != Some(0);
        let mark = if res.kind == "Namespace" {
            if !marked {
                let m = meta::metadata_mut(&mut obj);
                m.insert("deletionTimestamp".into(), json!(meta::now()));
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
                obj["spec"]["finalizers"] = json!(["kubernetes"]);
                obj["status"]["phase"] = json!("Terminating");
            }
            if let Ok(mut open) = api.open_namespaces.lock() {
                open.remove(name);
            }
            true
        } else if !meta::finalizers_empty(&obj) {
            if !marked {
                let m = meta::metadata_mut(&mut obj);
                m.insert("deletionTimestamp".into(), json!(meta::now()));
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
            }
            true
        } else if bound_pod {
            // The node agent stops the containers and then deletes with grace 0.
            let grace = opts
                .grace
                .or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30)
                .max(1);
            let current = meta::metadata(&obj)
                .and_then(|m| m.get("deletionGracePeriodSeconds"))
                .and_then(Value::as_i64);
            if current.is_none_or(|c| grace < c) {
                let m = meta::metadata_mut(&mut obj);
                m.insert("deletionTimestamp".into(), json!(meta::now_plus(grace)));
                m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            true
        } else {
            false
        };
        if mark {
            let stored = meta::from_kv(&kv)?;
            if stored != obj {
                match api
                    .store
                    .update(&key, meta::to_stored(&obj), kv.mod_revision)
                    .await
                {
                    Ok(new_kv) => meta::set_rv(&mut obj, new_kv.mod_revision),
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(object_error(res, name, e)),
                }
            }
            if res.kind == "Namespace" && !marked {
                crate::namespaces::spawn_termination(api.clone(), name.to_string());
            }
            return Ok((StatusCode::OK, obj));
        }
        match api.store.delete(&key, Some(kv.mod_revision)).await {
            Ok((_, rev)) => {
                release_object(api, res, &obj).await;
                meta::set_rv(&mut obj, rev);
                return Ok((StatusCode::OK, obj));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(StoreError::NotFound { .. }) => return Err(ApiError::not_found(res, name)),
            Err(e) => return Err(store_error(e)),
        }
    }
}

/// Release what a deleted object held.
async fn release_object(api: &Shared, res: &Resource, obj: &Value) {
    if res.kind == "Service" {
        api.alloc.release(&Held::of(obj)).await;
    }
}

async fn delete_collection(
    api: &Arc<Shared>,
    t: &Target,
    q: &Query,
    opts: &DeleteOpts,
    repr: Repr,
) -> Result<Response> {
    let filter = Filter::from_query(t.res, q)?;
    let prefix = t.res.namespace_prefix(t.namespace.as_deref());
    let page = api
        .store
        .list(&prefix, ListOptions::default())
        .await
        .map_err(store_error)?;
    let mut deleted = Vec::new();
    for kv in &page.items {
        let obj = meta::from_kv(kv)?;
        if !filter.matches(&obj) {
            continue;
        }
        let ns = meta::meta_str(&obj, "namespace").map(str::to_string);
        match delete(api, t.res, ns.as_deref(), meta::name(&obj), opts).await {
            Ok((_, o)) => deleted.push(o),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let body = match repr {
        Repr::Table => table::table(t.res, &deleted, &page.revision.to_string(), None),
        _ => json!({
            "kind": t.res.list_kind(),
            "apiVersion": t.res.api_version(),
            "metadata": {"resourceVersion": page.revision.to_string()},
            "items": deleted,
        }),
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// Create an object from inside the server (bootstrap), as a client would.
pub async fn create_internal(
    api: &Shared,
    res: &'static Resource,
    namespace: Option<&str>,
    obj: Value,
) -> Result<Value, ApiError> {
    let t = Target {
        res,
        namespace: namespace.map(str::to_string),
        name: None,
        sub: None,
        watch_path: false,
    };
    create(api, &t, obj, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resource_namespace_object_and_subresource() {
        let t = Target::parse("/api/v1/namespaces/default/pods/p1/status").expect("pods");
        assert_eq!(
            (
                t.res.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            ("pods", Some("default"), Some("p1"), Some("status"))
        );
        let t = Target::parse("/api/v1/namespaces/kube-system").expect("ns");
        assert_eq!(
            (t.res.plural, t.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let t = Target::parse("/api/v1/namespaces/x/status").expect("ns status");
        assert_eq!(
            (t.res.plural, t.name.as_deref(), t.sub.as_deref()),
            ("namespaces", Some("x"), Some("status"))
        );
        let t = Target::parse("/apis/apps/v1/deployments").expect("all deployments");
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = Target::parse("/api/v1/watch/namespaces/a/services").expect("watch");
        assert!(t.watch_path);
        assert_eq!(t.namespace.as_deref(), Some("a"));
        for bad in [
            "/api/v1/widgets",
            "/apis/apps/v1/pods",
            "/api/v1/nodes/n/scale",
            "/api/v1/namespaces/a/nodes",
            "/api/v1/pods/p",
            "/api/v2/pods",
            "/foo",
        ] {
            let err = Target::parse(bad).expect_err(bad);
            assert_eq!(err.code, 404, "{bad}");
        }
    }

    #[test]
    fn accept_headers_pick_the_representation() {
        let mut h = HeaderMap::new();
        assert_eq!(negotiate(&h).expect("none"), Repr::Object);
        h.insert(header::ACCEPT, "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json".parse().expect("hv"));
        assert_eq!(negotiate(&h).expect("table"), Repr::Table);
        h.insert(
            header::ACCEPT,
            "application/vnd.kubernetes.protobuf, application/json"
                .parse()
                .expect("hv"),
        );
        assert_eq!(negotiate(&h).expect("json"), Repr::Object);
        h.insert(
            header::ACCEPT,
            "application/vnd.kubernetes.protobuf".parse().expect("hv"),
        );
        assert_eq!(negotiate(&h).expect_err("406").code, 406);
    }

    #[test]
    fn bodies_parse_as_json_or_yaml_with_positions() {
        let v = parse_body("application/yaml", b"kind: Pod\nmetadata:\n  name: a\n").expect("yaml");
        assert_eq!(v["metadata"]["name"], "a");
        let err = parse_body("application/json", b"{\"kind\": \"Pod\",\n \"x\": }")
            .expect_err("bad json");
        assert_eq!(err.code, 400);
        assert!(err.message.contains("line 2 column"), "{}", err.message);
        let err = parse_body("application/yaml", b"a: [1,\n b: }").expect_err("bad yaml");
        assert_eq!(err.code, 400);
        assert!(err.message.contains("line"), "{}", err.message);
        assert_eq!(parse_body("text/plain", b"{}").expect_err("415").code, 415);
        assert_eq!(
            parse_body("application/json", b"[1]")
                .expect_err("array")
                .code,
            400
        );
    }

    #[test]
    fn an_unreachable_store_is_retried_and_a_timed_out_write_is_not() {
        let down = Failure(store_error(StoreError::Unavailable("refused".into()))).into_response();
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(down.headers().contains_key(header::RETRY_AFTER));
        let slow = Failure(store_error(StoreError::Timeout("5s".into()))).into_response();
        assert_eq!(slow.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(!slow.headers().contains_key(header::RETRY_AFTER));
    }
}
