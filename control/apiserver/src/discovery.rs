//! What clients read before they make a request: `/version`, legacy discovery (`/api`,
//! `/api/v1`, `/apis`, `/apis/<g>`, `/apis/<g>/<v>`), aggregated discovery
//! (`apidiscovery.k8s.io/v2`, which kubectl 1.32 asks for first), and the OpenAPI v3
//! documents kubectl reads to learn that PATCH takes `fieldValidation` (so `apply` uses
//! server-side field validation). Everything is derived from the resource registry.

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};
use weir_api::{ApiError, Resource, registry};

use crate::rest::{Failure, json_response};

/// The Kubernetes release whose API weir follows.
pub const KUBE_VERSION: (&str, &str) = ("1", "33");

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub async fn version() -> Response {
    let (major, minor) = KUBE_VERSION;
    json_response(
        StatusCode::OK,
        &json!({
            "major": major,
            "minor": minor,
            "gitVersion": format!("v{major}.{minor}.0+weir.{}", env!("CARGO_PKG_VERSION")),
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "1970-01-01T00:00:00Z",
            "goVersion": "rust",
            "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, go_arch()),
        }),
    )
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Subresource: (verbs, group, version, kind) of what it returns.
fn subresource(res: &Resource, sub: &str) -> (&'static [&'static str], Value) {
    let own = json!({"group": res.group, "version": res.version, "kind": res.kind});
    match sub {
        "scale" => (
            &["get", "patch", "update"],
            json!({"group": "autoscaling", "version": "v1", "kind": "Scale"}),
        ),
        "binding" => (
            &["create"],
            json!({"group": "", "version": "v1", "kind": "Binding"}),
        ),
        "finalize" => (&["update"], own),
        "log" => (&["get"], own),
        _ => (&["get", "patch", "update"], own),
    }
}

fn wants_aggregated(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|media| {
                let params: Vec<&str> = media.split(';').map(str::trim).collect();
                params.contains(&"as=APIGroupDiscoveryList")
                    && params.contains(&"g=apidiscovery.k8s.io")
                    && params.contains(&"v=v2")
            })
        })
}

fn with_vary(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::VARY, http::HeaderValue::from_static("Accept"));
    resp
}

fn aggregated(items: Vec<Value>) -> Response {
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    });
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    with_vary((StatusCode::OK, [(header::CONTENT_TYPE, AGGREGATED)], bytes).into_response())
}

fn resources_of(group: &str, version: &str) -> impl Iterator<Item = &'static Resource> {
    registry::all()
        .iter()
        .filter(move |r| r.group == group && r.version == version)
}

fn aggregated_version(group: &str, version: &str) -> Value {
    let resources: Vec<Value> = resources_of(group, version)
        .map(|r| {
            let subresources: Vec<Value> = r
                .subresources
                .iter()
                .map(|s| {
                    let (verbs, kind) = subresource(r, s);
                    json!({"subresource": s, "responseKind": kind, "verbs": verbs})
                })
                .collect();
            let mut d = json!({
                "resource": r.plural,
                "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": r.singular,
                "verbs": VERBS,
            });
            if !r.short_names.is_empty() {
                d["shortNames"] = json!(r.short_names);
            }
            if !r.categories.is_empty() {
                d["categories"] = json!(r.categories);
            }
            if !subresources.is_empty() {
                d["subresources"] = json!(subresources);
            }
            d
        })
        .collect();
    json!({"version": version, "resources": resources, "freshness": "Current"})
}

fn resource_list(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for r in resources_of(group, version) {
        let mut d = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            d["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            d["categories"] = json!(r.categories);
        }
        resources.push(d);
        for s in r.subresources {
            let (verbs, kind) = subresource(r, s);
            let mut d = json!({
                "name": format!("{}/{s}", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind["kind"],
                "verbs": verbs,
            });
            if kind["group"] != r.group || kind["version"] != r.version {
                d["group"] = kind["group"].clone();
                d["version"] = kind["version"].clone();
            }
            resources.push(d);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn api_group(group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

pub async fn core_group(headers: HeaderMap) -> Response {
    if wants_aggregated(&headers) {
        return aggregated(vec![json!({
            "metadata": {"creationTimestamp": null},
            "versions": [aggregated_version("", "v1")],
        })]);
    }
    with_vary(json_response(
        StatusCode::OK,
        &json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }),
    ))
}

pub async fn core_v1() -> Response {
    json_response(StatusCode::OK, &resource_list("", "v1"))
}

pub async fn groups(headers: HeaderMap) -> Response {
    let groups = registry::groups();
    if wants_aggregated(&headers) {
        let items = groups
            .iter()
            .map(|(g, versions)| {
                json!({
                    "metadata": {"name": g, "creationTimestamp": null},
                    "versions": versions.iter().map(|v| aggregated_version(g, v)).collect::<Vec<_>>(),
                })
            })
            .collect();
        return aggregated(items);
    }
    let list: Vec<Value> = groups.iter().map(|(g, v)| api_group(g, v)).collect();
    with_vary(json_response(
        StatusCode::OK,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}),
    ))
}

fn find_group(group: &str) -> Result<Vec<&'static str>, Failure> {
    registry::groups()
        .into_iter()
        .find(|(g, _)| *g == group)
        .map(|(_, v)| v)
        .ok_or_else(|| Failure(ApiError::unknown_resource()))
}

pub async fn group(Path(group): Path<String>) -> Result<Response, Failure> {
    let versions = find_group(&group)?;
    let mut body = api_group(&group, &versions);
    body["kind"] = json!("APIGroup");
    body["apiVersion"] = json!("v1");
    Ok(json_response(StatusCode::OK, &body))
}

pub async fn group_version(
    Path((group, version)): Path<(String, String)>,
) -> Result<Response, Failure> {
    if !find_group(&group)?.contains(&version.as_str()) {
        return Err(Failure(ApiError::unknown_resource()));
    }
    Ok(json_response(
        StatusCode::OK,
        &resource_list(&group, &version),
    ))
}

/// `api/v1` or `apis/<group>/<version>`: the OpenAPI v3 path keys.
fn openapi_gvs() -> Vec<(String, &'static str, &'static str)> {
    let mut out = vec![("api/v1".to_string(), "", "v1")];
    for (g, versions) in registry::groups() {
        for v in versions {
            out.push((format!("apis/{g}/{v}"), g, v));
        }
    }
    out
}

fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016X}")
}

pub async fn openapi_v3_root() -> Response {
    let mut paths = serde_json::Map::new();
    for (key, g, v) in openapi_gvs() {
        let doc = serde_json::to_vec(&openapi_gv(g, v)).unwrap_or_default();
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={}", fnv(&doc))}),
        );
    }
    json_response(StatusCode::OK, &json!({"paths": paths}))
}

pub async fn openapi_v3_gv(Path(path): Path<String>) -> Result<Response, Failure> {
    let (_, g, v) = openapi_gvs()
        .into_iter()
        .find(|(key, _, _)| *key == path.trim_matches('/'))
        .ok_or_else(|| Failure(ApiError::unknown_resource()))?;
    Ok(json_response(StatusCode::OK, &openapi_gv(g, v)))
}

fn param(name: &str, location: &str) -> Value {
    let mut p =
        json!({"name": name, "in": location, "schema": {"type": "string", "uniqueItems": true}});
    if location == "path" {
        p["required"] = json!(true);
    }
    p
}

fn operation(r: &Resource, action: &str, query: &[&str]) -> Value {
    json!({
        "operationId": format!("{action}{}", r.kind),
        "parameters": query.iter().map(|q| param(q, "query")).collect::<Vec<_>>(),
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
    })
}

/// One group-version's OpenAPI v3 document: the paths and operations of its resources,
/// with the query parameters each verb takes.
fn openapi_gv(group: &str, version: &str) -> Value {
    let base = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let write = ["dryRun", "fieldManager", "fieldValidation", "pretty"];
    let list = [
        "allowWatchBookmarks",
        "continue",
        "fieldSelector",
        "labelSelector",
        "limit",
        "resourceVersion",
        "resourceVersionMatch",
        "sendInitialEvents",
        "timeoutSeconds",
        "watch",
    ];
    let mut paths = serde_json::Map::new();
    for r in resources_of(group, version) {
        let (coll, item, mut params) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
                vec![param("namespace", "path")],
            )
        } else {
            (
                format!("{base}/{}", r.plural),
                format!("{base}/{}/{{name}}", r.plural),
                vec![],
            )
        };
        paths.insert(
            coll,
            json!({
                "get": operation(r, "list", &list),
                "post": operation(r, "post", &write),
                "delete": operation(r, "deletecollection", &list),
                "parameters": params.clone(),
            }),
        );
        params.push(param("name", "path"));
        let mut patch_params = write.to_vec();
        patch_params.push("force");
        paths.insert(
            item,
            json!({
                "get": operation(r, "get", &[]),
                "put": operation(r, "put", &write),
                "patch": operation(r, "patch", &patch_params),
                "delete": operation(r, "delete", &["dryRun", "gracePeriodSeconds", "propagationPolicy"]),
                "parameters": params,
            }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{}.{}.0", KUBE_VERSION.0, KUBE_VERSION.1)},
        "paths": paths,
        "components": {"schemas": {}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_lists_carry_subresources_with_their_kinds() {
        let apps = resource_list("apps", "v1");
        let scale = apps["resources"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == "deployments/scale"))
            .expect("deployments/scale");
        assert_eq!(scale["kind"], "Scale");
        assert_eq!(scale["group"], "autoscaling");
        let core = resource_list("", "v1");
        assert!(
            core["resources"]
                .as_array()
                .is_some_and(|a| a.iter().any(|r| r["name"] == "pods/binding"))
        );
    }

    #[test]
    fn aggregated_accept_is_recognised() {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json".parse().expect("hv"));
        assert!(wants_aggregated(&h));
        h.insert(header::ACCEPT, "application/json".parse().expect("hv"));
        assert!(!wants_aggregated(&h));
    }

    #[test]
    fn openapi_patch_operations_take_field_validation() {
        let doc = openapi_gv("apps", "v1");
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "fieldValidation"))
        );
        let nodes = openapi_gv("", "v1");
        assert!(nodes["paths"]["/api/v1/nodes/{name}"]["patch"].is_object());
    }
}
