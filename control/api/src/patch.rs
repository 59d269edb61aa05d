//! PATCH bodies applied to stored objects: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902) and Kubernetes strategic merge patch with the patch merge keys of the covered
//! types and the `$patch`, `$retainKeys`, `$setElementOrder/…` and
//! `$deleteFromPrimitiveList/…` directives that `kubectl apply` emits.
//!
//! The result is an unchecked object: the server runs it through
//! [`crate::admission::decode_value`], defaulting and validation like any other write.

use serde_json::{Map, Value};

use crate::registry::Resource;
use crate::status::{ApiError, StatusReason};

/// Applies `patch` (of media type `content_type`) to `current`, an object of `res`.
pub fn apply_patch(
    res: &Resource,
    current: &Value,
    content_type: &str,
    patch: &[u8],
) -> Result<Value, ApiError> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/merge-patch+json" => {
            let patch = parse_object(patch)?;
            let mut doc = current.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        "application/json-patch+json" => {
            let ops: json_patch::Patch = serde_json::from_slice(patch)
                .map_err(|e| ApiError::bad_request(format!("error decoding JSON patch: {e}")))?;
            let mut doc = current.clone();
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    StatusReason::Invalid,
                    format!("the JSON patch could not be applied: {e}"),
                )
            })?;
            Ok(doc)
        }
        "application/strategic-merge-patch+json" => {
            let patch = parse_object(patch)?;
            let (Value::Object(orig), Value::Object(patch)) = (current, &patch) else {
                return Err(ApiError::bad_request(
                    "strategic merge patch needs a JSON object on both sides",
                ));
            };
            let mut path = Vec::new();
            let merged = merge_map(res, orig.clone(), patch, &mut path).map_err(|e| {
                ApiError::bad_request(format!("invalid strategic merge patch: {e}"))
            })?;
            Ok(Value::Object(merged.unwrap_or_default()))
        }
        _ => Err(ApiError::unsupported_media_type(content_type)),
    }
}

fn parse_object(patch: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(patch)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the patch must be a JSON object"));
    }
    Ok(value)
}

/// How a list field merges, from the `patchStrategy`/`patchMergeKey` tags of the Kubernetes
/// types. Lists without tags (tolerations, ingress rules, endpoints, taints, …) are atomic.
#[derive(Debug, PartialEq, Eq)]
enum ListStrategy {
    Atomic,
    MergeKey(&'static str),
    /// A list of primitives merged as a set (`finalizers`, `podCIDRs`).
    Set,
}

const CONTAINER_LISTS: &[&str] = &["containers", "initContainers", "ephemeralContainers"];

/// `path` is the chain of object keys from the root to the list (array indices left out).
fn list_strategy(res: &Resource, path: &[String]) -> ListStrategy {
    let Some(last) = path.last().map(String::as_str) else {
        return ListStrategy::Atomic;
    };
    let parent = path.len().checked_sub(2).map(|i| path[i].as_str());
    let in_container = parent.is_some_and(|p| CONTAINER_LISTS.contains(&p));
    match last {
        k if CONTAINER_LISTS.contains(&k) => ListStrategy::MergeKey("name"),
        "env" | "volumeMounts" | "volumeDevices" | "ports" | "resizePolicy" if in_container => {
            match last {
                "env" => ListStrategy::MergeKey("name"),
                "volumeMounts" => ListStrategy::MergeKey("mountPath"),
                "volumeDevices" => ListStrategy::MergeKey("devicePath"),
                "resizePolicy" => ListStrategy::Atomic,
                _ => ListStrategy::MergeKey("containerPort"),
            }
        }
        "ports" if res.kind == "Service" && path.len() == 2 => ListStrategy::MergeKey("port"),
        "volumes" | "imagePullSecrets" | "resourceClaims" | "schedulingGates" => {
            ListStrategy::MergeKey("name")
        }
        "hostAliases" | "podIPs" | "hostIPs" => ListStrategy::MergeKey("ip"),
        "topologySpreadConstraints" => ListStrategy::MergeKey("topologyKey"),
        "conditions" => ListStrategy::MergeKey("type"),
        "ownerReferences" if parent == Some("metadata") => ListStrategy::MergeKey("uid"),
        "finalizers" if parent == Some("metadata") => ListStrategy::Set,
        "addresses" if res.kind == "Node" && parent == Some("status") => {
            ListStrategy::MergeKey("type")
        }
        "podCIDRs" => ListStrategy::Set,
        _ => ListStrategy::Atomic,
    }
}

const ORDER: &str = "$setElementOrder/";
const DELETE_PRIMITIVE: &str = "$deleteFromPrimitiveList/";

fn directive_str<'a>(patch: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    patch.get(key).and_then(Value::as_str)
}

/// Merges `patch` into `orig`. `None` means the map itself is deleted (`$patch: delete`).
fn merge_map(
    res: &Resource,
    mut orig: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<Option<Map<String, Value>>, String> {
    match directive_str(patch, "$patch") {
        None | Some("merge") => {}
        Some("delete") => return Ok(None),
        Some("replace") => {
            let rest: Map<String, Value> = patch
                .iter()
                .filter(|(k, _)| k.as_str() != "$patch")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            return merge_map(res, Map::new(), &rest, path);
        }
        Some(other) => return Err(format!("unknown $patch directive {other:?}")),
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keys: Vec<&str> = retain
            .as_array()
            .ok_or("$retainKeys must be a list of strings")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        orig.retain(|k, _| keys.contains(&k.as_str()));
    }
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix(DELETE_PRIMITIVE) {
            let drop = value
                .as_array()
                .ok_or_else(|| format!("{key} must be a list"))?;
            if let Some(Value::Array(items)) = orig.get_mut(field) {
                items.retain(|v| !drop.contains(v));
            }
        }
    }
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        path.push(key.clone());
        let merged = match (orig.remove(key), value) {
            (_, Value::Null) => None,
            (Some(Value::Object(o)), Value::Object(p)) => {
                merge_map(res, o, p, path)?.map(Value::Object)
            }
            (None, Value::Object(p)) => merge_map(res, Map::new(), p, path)?.map(Value::Object),
            (Some(Value::Array(o)), Value::Array(p)) => {
                Some(Value::Array(merge_list(res, o, p, path)?))
            }
            (None, Value::Array(p)) => Some(Value::Array(merge_list(res, Vec::new(), p, path)?)),
            (_, v) => Some(v.clone()),
        };
        path.pop();
        if let Some(v) = merged {
            orig.insert(key.clone(), v);
        }
    }
    for (key, order) in patch {
        if let Some(field) = key.strip_prefix(ORDER) {
            let order = order
                .as_array()
                .ok_or_else(|| format!("{key} must be a list"))?;
            path.push(field.to_string());
            let strategy = list_strategy(res, path);
            path.pop();
            if let Some(Value::Array(items)) = orig.get_mut(field) {
                reorder(items, order, &strategy);
            }
        }
    }
    Ok(Some(orig))
}

fn same_key(a: &Value, b: &Value, key: &str) -> bool {
    matches!((a.get(key), b.get(key)), (Some(x), Some(y)) if x == y)
}

fn merge_list(
    res: &Resource,
    orig: Vec<Value>,
    patch: &[Value],
    path: &mut Vec<String>,
) -> Result<Vec<Value>, String> {
    let strategy = list_strategy(res, path);
    let replace = patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"));
    let clean = |items: &mut dyn Iterator<Item = &Value>, path: &mut Vec<String>| {
        items
            .filter(|p| p.get("$patch").is_none())
            .map(|p| match p {
                Value::Object(m) => merge_map(res, Map::new(), m, path)
                    .map(|m| Value::Object(m.unwrap_or_default())),
                other => Ok(other.clone()),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let key = match strategy {
        ListStrategy::Atomic => return clean(&mut patch.iter(), path),
        _ if replace => return clean(&mut patch.iter(), path),
        ListStrategy::Set => {
            let mut out = orig;
            for p in patch {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
            return Ok(out);
        }
        ListStrategy::MergeKey(key) => key,
    };
    let mut out = orig;
    for p in patch {
        let Value::Object(pm) = p else {
            return Err(format!(
                "list {} merges by {key:?} and needs objects",
                path.join(".")
            ));
        };
        if pm.get(key).is_none() {
            return Err(format!(
                "an element of {} lacks its merge key {key:?}",
                path.join(".")
            ));
        }
        let found = out.iter().position(|o| same_key(o, p, key));
        match (directive_str(pm, "$patch"), found) {
            (Some("delete"), Some(_)) => out.retain(|o| !same_key(o, p, key)),
            (Some("delete"), None) => {}
            (_, Some(i)) => {
                let current = match out.remove(i) {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                if let Some(m) = merge_map(res, current, pm, path)? {
                    out.insert(i, Value::Object(m));
                }
            }
            (_, None) => {
                if let Some(m) = merge_map(res, Map::new(), pm, path)? {
                    out.push(Value::Object(m));
                }
            }
        }
    }
    Ok(out)
}

/// Puts the elements named in `order` first, in that order; the rest keep their places after.
fn reorder(items: &mut Vec<Value>, order: &[Value], strategy: &ListStrategy) {
    let mut rest = std::mem::take(items);
    for want in order {
        let pos = rest.iter().position(|item| match strategy {
            ListStrategy::MergeKey(key) => same_key(item, want, key),
            _ => item == want,
        });
        if let Some(i) = pos {
            items.push(rest.remove(i));
        }
    }
    items.append(&mut rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::find_by_name;
    use serde_json::json;

    fn smp(res: &str, current: Value, patch: Value) -> Value {
        apply_patch(
            find_by_name(res).expect("resource"),
            &current,
            "application/strategic-merge-patch+json",
            patch.to_string().as_bytes(),
        )
        .expect("patch applies")
    }

    fn deployment() -> Value {
        json!({"metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"replicas": 1, "template": {"spec": {
                   "containers": [
                       {"name": "web", "image": "nginx:1.27",
                        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                        "ports": [{"containerPort": 80, "protocol": "TCP"}]},
                       {"name": "side", "image": "busybox"}],
                   "volumes": [{"name": "data", "emptyDir": {}}],
                   "tolerations": [{"key": "a", "operator": "Exists"}]}}}})
    }

    #[test]
    fn kubectl_apply_image_change_merges_containers_by_name() {
        // What `kubectl apply` sends after editing one image in the manifest.
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "web"}, {"name": "side"}],
            "containers": [{"image": "nginx:1.28", "name": "web"}]}}}});
        let out = smp("deploy", deployment(), patch);
        let containers = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[0]["image"], "nginx:1.28");
        assert_eq!(containers[0]["env"][1]["value"], "2");
        assert_eq!(containers[1]["name"], "side");
    }

    #[test]
    fn kubectl_apply_removing_a_container_and_an_env_var() {
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "web"}],
            "containers": [
                {"$setElementOrder/env": [{"name": "A"}], "env": [{"$patch": "delete", "name": "B"}], "name": "web"},
                {"$patch": "delete", "name": "side"}]}}}});
        let out = smp("deploy", deployment(), patch);
        let containers = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("list");
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0]["env"], json!([{"name": "A", "value": "1"}]));
    }

    #[test]
    fn label_scale_and_null_deletes() {
        // `kubectl label deploy web tier=front` and `kubectl label deploy web app-`.
        let out = smp(
            "deploy",
            deployment(),
            json!({"metadata": {"labels": {"tier": "front"}}}),
        );
        assert_eq!(
            out["metadata"]["labels"],
            json!({"app": "web", "tier": "front"})
        );
        let out = smp(
            "deploy",
            out,
            json!({"metadata": {"labels": {"app": null}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"tier": "front"}));
        // `kubectl scale` patches the scale subresource with a merge patch.
        let scaled = apply_patch(
            find_by_name("deploy").expect("deploy"),
            &deployment(),
            "application/merge-patch+json",
            br#"{"spec":{"replicas":3}}"#,
        )
        .expect("merge patch");
        assert_eq!(scaled["spec"]["replicas"], 3);
        assert_eq!(scaled["spec"]["template"], deployment()["spec"]["template"]);
    }

    #[test]
    fn atomic_lists_replace_and_ports_merge_by_their_keys() {
        let patch = json!({"spec": {"template": {"spec": {
            "tolerations": [{"key": "b", "operator": "Exists"}],
            "containers": [{"name": "web", "ports": [{"containerPort": 443}]}]}}}});
        let out = smp("deploy", deployment(), patch);
        let spec = &out["spec"]["template"]["spec"];
        assert_eq!(
            spec["tolerations"],
            json!([{"key": "b", "operator": "Exists"}])
        );
        assert_eq!(
            spec["containers"][0]["ports"].as_array().map(Vec::len),
            Some(2)
        );

        let svc = json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
        let out = smp(
            "svc",
            svc,
            json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}, {"port": 443, "name": "https"}]}}),
        );
        assert_eq!(
            out["spec"]["ports"][0],
            json!({"name": "http", "port": 80, "targetPort": 9090})
        );
        assert_eq!(out["spec"]["ports"][1]["port"], 443);
    }

    #[test]
    fn replace_retain_keys_and_primitive_list_directives() {
        // Switching a Deployment to Recreate: kubectl sends $retainKeys for the strategy.
        let current = json!({"spec": {"strategy": {"type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}});
        let out = smp(
            "deploy",
            current,
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));

        let out = smp(
            "deploy",
            deployment(),
            json!({"spec": {"template": {"spec": {
            "volumes": [{"name": "cfg", "configMap": {"name": "c"}}, {"$patch": "replace"}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["volumes"],
            json!([{"name": "cfg", "configMap": {"name": "c"}}])
        );
        let out = smp(
            "deploy",
            deployment(),
            json!({"metadata": {"labels": {"$patch": "replace", "x": "y"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"x": "y"}));

        let ns = json!({"metadata": {"name": "n", "finalizers": ["a/x", "b/y"]}});
        let out = smp(
            "ns",
            ns.clone(),
            json!({"metadata": {"finalizers": ["c/z"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["a/x", "b/y", "c/z"]));
        let out = smp(
            "ns",
            ns,
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a/x"],
                                                    "$setElementOrder/finalizers": ["b/y"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["b/y"]));
    }

    #[test]
    fn patch_captured_from_kubectl_apply() {
        // Sent by kubectl v1.33 (`apply -v=9`) after the manifest dropped container `b`, env
        // `B`, port 81 and the volumes, switched to Recreate and added a label (the
        // last-applied annotation value is shortened here).
        let live = json!({"metadata": {"name": "p", "labels": {"app": "p"}},
            "spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                     "template": {"spec": {
                        "containers": [
                            {"name": "a", "image": "x:1", "imagePullPolicy": "IfNotPresent",
                             "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                             "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 81, "protocol": "TCP"}]},
                            {"name": "b", "image": "y:1"}],
                        "volumes": [{"name": "v", "emptyDir": {}}]}}}});
        let patch = json!({"metadata":{"annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{...}\n"},"labels":{"tier":"t"}},
            "spec":{"strategy":{"$retainKeys":["type"],"type":"Recreate"},"template":{"spec":{
                "$setElementOrder/containers":[{"name":"a"}],
                "containers":[{"$setElementOrder/env":[{"name":"A"}],"$setElementOrder/ports":[{"containerPort":80}],
                               "env":[{"$patch":"delete","name":"B"}],"image":"x:2","name":"a",
                               "ports":[{"$patch":"delete","containerPort":81}]},
                              {"$patch":"delete","name":"b"}],
                "volumes":null}}}});
        let out = smp("deploy", live, patch);
        assert_eq!(out["metadata"]["labels"], json!({"app": "p", "tier": "t"}));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(
            out["spec"]["template"]["spec"],
            json!({"containers": [{"name": "a", "image": "x:2", "imagePullPolicy": "IfNotPresent",
                                   "env": [{"name": "A", "value": "1"}],
                                   "ports": [{"containerPort": 80, "protocol": "TCP"}]}]})
        );
    }

    #[test]
    fn conditions_merge_by_type() {
        let current = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]}});
        let out = smp(
            "pods",
            current,
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}])
        );
    }

    #[test]
    fn json_patch_and_bad_patches() {
        let res = find_by_name("deploy").expect("deploy");
        let out = apply_patch(
            res,
            &deployment(),
            "application/json-patch+json",
            br#"[{"op":"replace","path":"/spec/replicas","value":5},{"op":"add","path":"/metadata/labels/x","value":"y"}]"#,
        )
        .expect("json patch");
        assert_eq!(out["spec"]["replicas"], 5);
        assert_eq!(out["metadata"]["labels"]["x"], "y");

        let err = apply_patch(
            res,
            &deployment(),
            "application/json-patch+json",
            br#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
        )
        .expect_err("test fails");
        assert_eq!(err.code, 422);
        let err = apply_patch(
            res,
            &deployment(),
            "application/json-patch+json",
            br#"[{"op":"jump"}]"#,
        )
        .expect_err("bad op");
        assert_eq!(err.code, 400);
        let err = apply_patch(
            res,
            &deployment(),
            "application/merge-patch+json",
            b"{\"spec\": ",
        )
        .expect_err("malformed");
        assert_eq!(err.code, 400);
        assert!(err.message.contains("line 1 column 9"), "{}", err.message);
        let err = apply_patch(
            res,
            &deployment(),
            "application/strategic-merge-patch+json",
            br#"{"spec":{"$patch":"explode"}}"#,
        )
        .expect_err("bad directive");
        assert_eq!(err.code, 400);
        let err = apply_patch(
            res,
            &deployment(),
            "application/strategic-merge-patch+json",
            br#"{"spec":{"template":{"spec":{"containers":[{"image":"x"}]}}}}"#,
        )
        .expect_err("no merge key");
        assert!(
            err.message.contains("lacks its merge key \"name\""),
            "{}",
            err.message
        );
        let err = apply_patch(res, &deployment(), "text/plain", b"{}").expect_err("media");
        assert_eq!(err.code, 415);
    }
}
