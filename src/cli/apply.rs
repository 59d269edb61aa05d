//! `weir apply -f`: client-side apply as kubectl does it. The manifest is recorded in the
//! `kubectl.kubernetes.io/last-applied-configuration` annotation; an update is a three-way
//! JSON merge patch from that record, the manifest and the live object, so fields removed
//! from the manifest are removed from the object and fields the server or other clients set
//! are kept. An empty patch prints `unchanged`.

use std::path::PathBuf;

use http::Method;
use serde_json::{Map, Value};

use super::{Ctx, Target, is_not_found, kind_group, manifest, report, url};

pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// kubectl's default since 1.27: the server rejects fields the type does not declare
/// instead of dropping them silently, and records the writer like kubectl does.
const STRICT: &str = "fieldManager=kubectl-client-side-apply&fieldValidation=Strict";

#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub target: Target,
    /// Files or directories with the manifests (`-` for stdin). Repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
}

pub async fn apply(ctx: &Ctx, args: ApplyArgs) -> anyhow::Result<usize> {
    let mut failures = 0;
    for m in manifest::load(&args.files)? {
        match apply_one(ctx, &m).await {
            Ok(line) => println!("{line}"),
            Err(Failure::Api(e)) => {
                report(&e);
                failures += 1;
            }
            Err(Failure::Input(e)) => {
                eprintln!("error: {e:#}");
                failures += 1;
            }
        }
    }
    Ok(failures)
}

enum Failure {
    Api(kube::Error),
    Input(anyhow::Error),
}

impl From<kube::Error> for Failure {
    fn from(e: kube::Error) -> Self {
        Self::Api(e)
    }
}

async fn apply_one(ctx: &Ctx, m: &manifest::Manifest) -> Result<String, Failure> {
    let (res, ns, name) = m.locate(ctx).map_err(Failure::Input)?;
    let modified = with_last_applied(&m.obj, res.namespaced.then_some(ns.as_str()));
    let object_url = url(res, Some(&ns), Some(&name), None);
    let label = format!("{}/{name}", kind_group(res));
    match ctx.get(&object_url).await {
        Err(e) if is_not_found(&e) => {
            let collection = format!("{}?{STRICT}", url(res, Some(&ns), None, None));
            let body = (&modified, "application/json");
            ctx.request(Method::POST, &collection, Some(body), "application/json")
                .await?;
            Ok(format!("{label} created"))
        }
        Err(e) => Err(e.into()),
        Ok(current) => {
            let original: Option<Value> = current
                .pointer(&format!(
                    "/metadata/annotations/{}",
                    LAST_APPLIED.replace('/', "~1")
                ))
                .and_then(Value::as_str)
                .and_then(|s| serde_json::from_str(s).ok())
                .map(|mut v| {
                    drop_nulls(&mut v);
                    v
                });
            let patch = three_way(
                original.as_ref().and_then(Value::as_object),
                modified.as_object().unwrap_or(&Map::new()),
                current.as_object(),
            );
            if patch.is_empty() {
                return Ok(format!("{label} unchanged"));
            }
            let patch = Value::Object(patch);
            let body = (&patch, "application/merge-patch+json");
            let patch_url = format!("{object_url}?{STRICT}");
            ctx.request(Method::PATCH, &patch_url, Some(body), "application/json")
                .await?;
            Ok(format!("{label} configured"))
        }
    }
}

/// The manifest with the annotation recording it. The record is what kubectl writes —
/// compact JSON with sorted keys and a trailing newline, of the manifest with its namespace
/// filled in and an empty `annotations` map — so kubectl and weir see each other's applies
/// as `unchanged`. Nulls are dropped from the object itself only.
fn with_last_applied(manifest: &Value, namespace: Option<&str>) -> Value {
    let mut record = manifest.clone();
    if let Some(meta) = record.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(ns) = namespace {
            meta.insert("namespace".into(), Value::String(ns.into()));
        }
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(a) = annotations.as_object_mut() {
            a.remove(LAST_APPLIED);
        }
    }
    let mut modified = record.clone();
    drop_nulls(&mut modified);
    if let Some(a) = modified
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.insert(LAST_APPLIED.into(), Value::String(format!("{record}\n")));
    }
    modified
}

/// `null` in a manifest means "not set" (kubectl-generated YAML has `creationTimestamp:
/// null`); dropping it keeps re-applies `unchanged`.
fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Whether everything `a` sets is set the same in `b` (server defaults in `b` are fine).
fn subset(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .all(|(k, v)| b.get(k).is_some_and(|bv| subset(v, bv))),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| subset(x, y))
        }
        (a, b) => a == b,
    }
}

/// The JSON merge patch that turns `current` into what `modified` asks for: fields that were
/// applied before (`original`) but left the manifest are deleted; fields of the manifest that
/// differ in the live object are set. Lists are replaced whole, as JSON merge patch does.
fn three_way(
    original: Option<&Map<String, Value>>,
    modified: &Map<String, Value>,
    current: Option<&Map<String, Value>>,
) -> Map<String, Value> {
    let mut patch = Map::new();
    for key in original.into_iter().flat_map(Map::keys) {
        if !modified.contains_key(key) && current.is_some_and(|c| c.contains_key(key)) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    for (key, want) in modified {
        let live = current.and_then(|c| c.get(key));
        let before = original.and_then(|o| o.get(key));
        match (want, live) {
            (Value::Object(w), Some(Value::Object(l))) => {
                let sub = three_way(before.and_then(Value::as_object), w, Some(l));
                if !sub.is_empty() {
                    patch.insert(key.clone(), Value::Object(sub));
                }
            }
            // A list left the same in the manifest and still matching the live object stays.
            (Value::Array(_), Some(l)) if before == Some(want) && subset(want, l) => {}
            (Value::Array(_), _) => {
                patch.insert(key.clone(), want.clone());
            }
            (w, Some(l)) if w == l => {}
            (w, _) => {
                patch.insert(key.clone(), w.clone());
            }
        }
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch(original: Value, modified: Value, current: Value) -> Value {
        Value::Object(three_way(
            original.as_object(),
            modified.as_object().expect("object"),
            current.as_object(),
        ))
    }

    #[test]
    fn reapplying_the_same_manifest_is_unchanged() {
        let manifest = json!({"metadata": {"name": "web", "labels": {"app": "web"}},
                              "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}});
        // The live object has server defaults and metadata the manifest never set.
        let live = json!({"metadata": {"name": "web", "labels": {"app": "web"}, "uid": "u", "resourceVersion": "7"},
                          "spec": {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
                                   "selector": {"app": "web"}, "clusterIP": "10.96.0.10", "type": "ClusterIP"}});
        assert_eq!(patch(manifest.clone(), manifest, live), json!({}));
    }

    #[test]
    fn changes_and_removals_become_a_merge_patch() {
        let original = json!({"metadata": {"labels": {"app": "web", "old": "x"}},
                              "spec": {"replicas": 2, "paused": false, "ports": [{"port": 80}]}});
        let modified = json!({"metadata": {"labels": {"app": "web"}},
                              "spec": {"replicas": 3, "ports": [{"port": 80}, {"port": 443}]}});
        let live = json!({"metadata": {"labels": {"app": "web", "old": "x", "added-by-hand": "y"}},
                          "spec": {"replicas": 2, "paused": false, "ports": [{"port": 80, "protocol": "TCP"}],
                                   "clusterIP": "10.96.0.10"}});
        assert_eq!(
            patch(original, modified, live),
            json!({"metadata": {"labels": {"old": null}},
                   "spec": {"paused": null, "replicas": 3, "ports": [{"port": 80}, {"port": 443}]}})
        );
    }

    #[test]
    fn first_apply_over_an_object_created_otherwise_sends_lists_and_missing_fields() {
        let modified = json!({"spec": {"ports": [{"port": 80}]}, "data": {"k": "v"}});
        let live = json!({"spec": {"ports": [{"port": 80, "protocol": "TCP"}]}});
        assert_eq!(
            patch(Value::Null, modified.clone(), live),
            json!({"spec": {"ports": [{"port": 80}]}, "data": {"k": "v"}})
        );
    }

    #[test]
    fn last_applied_is_recorded_as_kubectl_writes_it() {
        let manifest = json!({"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": "a", "creationTimestamp": null}, "data": {"k": "v"}});
        let out = with_last_applied(&manifest, Some("shop"));
        assert_eq!(
            out["metadata"]["annotations"][LAST_APPLIED],
            "{\"apiVersion\":\"v1\",\"data\":{\"k\":\"v\"},\"kind\":\"ConfigMap\",\"metadata\":{\"annotations\":{},\"creationTimestamp\":null,\"name\":\"a\",\"namespace\":\"shop\"}}\n"
        );
        assert!(out["metadata"].get("creationTimestamp").is_none());
        assert_eq!(out["metadata"]["namespace"], "shop");
    }
}
