//! Object metadata as the server manages it: timestamps, uids, generated names, and the
//! conversion between stored bytes and API objects (the stored form carries no
//! `resourceVersion`; it is the key's `mod_revision`, filled in on every read).

use k8s_openapi::jiff::{Timestamp, Unit};
use rand::Rng;
use serde_json::{Map, Value};
use weir_api::{ApiError, Resource};
use weir_store::KeyValue;

/// The current time.
pub fn timestamp_now() -> Timestamp {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_second(since_epoch.as_secs() as i64).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Now, as Kubernetes writes timestamps (RFC 3339, whole seconds, UTC).
pub fn now() -> String {
    timestamp_now()
        .round(Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| timestamp_now().to_string())
}

/// `now + seconds`, for `deletionTimestamp` of graceful deletes.
pub fn now_plus(seconds: i64) -> String {
    let t = timestamp_now()
        .round(Unit::Second)
        .unwrap_or(timestamp_now());
    t.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds))
        .unwrap_or(t)
        .to_string()
}

pub fn uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The 5-character suffix `generateName` gets, from the alphabet Kubernetes uses (no
/// vowels, no confusable digits).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

pub fn metadata(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata")?.as_object()
}

/// `obj.metadata`, created if missing; a non-object `obj` becomes an empty object.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(root) = obj else {
        unreachable!("made an object above")
    };
    let meta = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    match meta {
        Value::Object(m) => m,
        _ => unreachable!("made an object above"),
    }
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    metadata(obj)?.get(field)?.as_str()
}

pub fn name(obj: &Value) -> &str {
    meta_str(obj, "name").unwrap_or("")
}

pub fn finalizers_empty(obj: &Value) -> bool {
    metadata(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
}

/// Decode a stored value into the API object, with `resourceVersion` from the store.
pub fn from_kv(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut obj: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(&format!("stored object at {} is corrupt: {e}", kv.key)))?;
    set_rv(&mut obj, kv.mod_revision);
    Ok(obj)
}

pub fn set_rv(obj: &mut Value, rev: i64) {
    metadata_mut(obj).insert("resourceVersion".into(), Value::String(rev.to_string()));
}

/// The bytes to store: the object without `resourceVersion` (which the store assigns).
pub fn to_stored(obj: &Value) -> Vec<u8> {
    let mut obj = obj.clone();
    metadata_mut(&mut obj).remove("resourceVersion");
    serde_json::to_vec(&obj).unwrap_or_default()
}

/// The `resourceVersion` a client sent, if any; a non-number is a 400.
pub fn client_rv(obj: &Value) -> Result<Option<i64>, ApiError> {
    match meta_str(obj, "resourceVersion") {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "metadata.resourceVersion: Invalid value: {s:?}: must be a number"
            ))
        }),
    }
}

/// The `apiVersion`/`kind` a body must carry for `res` (either may be omitted).
pub fn check_type(res: &Resource, obj: &Value) -> Result<(), ApiError> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str);
    let kind = obj.get("kind").and_then(Value::as_str);
    if api_version.is_some_and(|v| v != res.api_version()) || kind.is_some_and(|k| k != res.kind) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version ({}) or kind {} is not {}",
            api_version.unwrap_or(""),
            res.api_version(),
            kind.unwrap_or(""),
            res.kind
        )));
    }
    Ok(())
}

/// Set `apiVersion` and `kind` as the resource serves them.
pub fn set_type(res: &Resource, obj: &mut Value) {
    if let Some(map) = obj.as_object_mut() {
        map.insert("apiVersion".into(), Value::String(res.api_version()));
        map.insert("kind".into(), Value::String(res.kind.to_string()));
    }
}

/// Whether anything outside `metadata` and `status` differs: the rule for bumping
/// `metadata.generation`.
pub fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| -> Value {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        v
    };
    strip(old) != strip(new)
}

/// A `metav1.LabelSelector` in the query-string form (`app=web,tier in (a,b)`), as
/// `Scale.status.selector` and `kubectl get -o wide` show it.
pub fn selector_string(selector: &Value) -> String {
    let mut terms: Vec<String> = Vec::new();
    if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in labels {
            terms.push(format!("{k}={}", v.as_str().unwrap_or("")));
        }
    }
    for e in selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or("");
        let values = e["values"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        terms.push(match e["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            _ => continue,
        });
    }
    terms.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_are_whole_seconds_utc() {
        let t = now();
        assert!(t.ends_with('Z'), "{t}");
        assert_eq!(t.len(), "2024-01-01T00:00:00Z".len(), "{t}");
        assert!(now_plus(30) > t);
    }

    #[test]
    fn stored_form_drops_resource_version() {
        let mut obj = json!({"metadata": {"name": "a", "resourceVersion": "7"}});
        let kv = KeyValue {
            key: "k".into(),
            value: to_stored(&obj),
            create_revision: 3,
            mod_revision: 9,
        };
        assert!(!String::from_utf8_lossy(&kv.value).contains("resourceVersion"));
        set_rv(&mut obj, 9);
        assert_eq!(from_kv(&kv).expect("decode"), obj);
    }

    #[test]
    fn generation_follows_spec_only() {
        let a = json!({"metadata": {"labels": {}}, "spec": {"replicas": 1}, "status": {}});
        let mut b = a.clone();
        b["metadata"]["labels"]["x"] = json!("y");
        b["status"]["replicas"] = json!(1);
        assert!(!spec_changed(&a, &b));
        b["spec"]["replicas"] = json!(2);
        assert!(spec_changed(&a, &b));
        assert_eq!(name_suffix().len(), 5);
    }

    #[test]
    fn selectors_print_in_query_form() {
        let sel = serde_json::json!({"matchLabels": {"app": "web"}, "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"}]});
        assert_eq!(selector_string(&sel), "app=web,tier in (a,b),!canary");
    }
}
