//! The `pods/log` subresource: picks the container, finds the node agent of the pod's
//! node (the Node's `weir.dev/agent-endpoint` annotation) and streams the agent's
//! `containerLogs` answer through, frame by frame, so `kubectl logs -f` sees each line as
//! the container writes it.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use weir_api::{ApiError, StatusReason, registry};

use crate::rest::{Query, Target, store_error};
use crate::{Shared, meta};

/// The Node annotation that holds the base URL of its agent's HTTP endpoint.
pub const AGENT_ENDPOINT_ANNOTATION: &str = "weir.dev/agent-endpoint";

/// How long the agent has to connect and answer with headers; the body may then stream
/// for as long as the client follows.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Agent error bodies are short messages; a longer one is cut, not buffered whole.
const AGENT_ERROR_LIMIT: usize = 64 * 1024;

/// The pooled HTTP/1 client the server uses to reach node agents.
pub type AgentClient = Client<HttpConnector, Empty<Bytes>>;

pub fn agent_client() -> AgentClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(AGENT_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// `GET .../pods/{name}/log`.
pub async fn serve(api: &Shared, t: &Target, name: &str, q: &Query) -> Result<Response, ApiError> {
    let ns = t.namespace.as_deref().unwrap_or("");
    let forwarded = agent_query(q)?;
    let pod = crate::rest::get_object(api, t, name).await?;
    let container = container(&pod, name, q.get("container").map(String::as_str))?;
    let node = pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {name} does not have a host assigned"))
        })?;
    let base = agent_endpoint(api, node).await?;
    let uri: Uri = format!(
        "{}/containerLogs/{ns}/{name}/{container}?{forwarded}",
        base.trim_end_matches('/')
    )
    .parse()
    .map_err(|e| {
        no_agent(format!(
            "node {node:?} has an invalid {AGENT_ENDPOINT_ANNOTATION} annotation {base:?}: {e}"
        ))
    })?;
    if uri.scheme_str() != Some("http") {
        return Err(no_agent(format!(
            "node {node:?} has an invalid {AGENT_ENDPOINT_ANNOTATION} annotation {base:?}: only http:// endpoints are supported"
        )));
    }
    let unreachable = |why: String| {
        no_agent(format!(
            "the agent of node {node:?} at {base} did not answer for the logs of pod {name}: {why}"
        ))
    };
    let resp = match tokio::time::timeout(AGENT_TIMEOUT, api.agents.get(uri)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(unreachable(error_chain(&e))),
        Err(_) => return Err(unreachable(format!("no answer within {AGENT_TIMEOUT:?}"))),
    };
    let status = resp.status();
    if !status.is_success() {
        // The agent answers plain-text reasons (container waiting, no previous run):
        // pass them on as a Status with the agent's code.
        let body = Limited::new(resp.into_body(), AGENT_ERROR_LIMIT)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        let reason = match status.as_u16() {
            400 => StatusReason::BadRequest,
            404 => StatusReason::NotFound,
            _ => StatusReason::InternalError,
        };
        return Err(ApiError::new(status.as_u16(), reason, body));
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::new(resp.into_body()),
    )
        .into_response())
}

/// The query parameters the agent understands, checked as Kubernetes checks
/// `PodLogOptions`. (`timestamps`, `sinceSeconds` and `sinceTime` are not supported by the
/// agent and are ignored.)
fn agent_query(q: &Query) -> Result<String, ApiError> {
    let mut out: Vec<(&str, String)> = Vec::new();
    for flag in ["follow", "previous"] {
        match q.get(flag).map(String::as_str) {
            None | Some("") | Some("false") | Some("0") => {}
            Some("true") | Some("1") => out.push((flag, "true".into())),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "{flag}: Invalid value: {other:?}: must be true or false"
                )));
            }
        }
    }
    for (field, min) in [("tailLines", 0), ("limitBytes", 1)] {
        if let Some(v) = q.get(field).filter(|v| !v.is_empty()) {
            let n: u64 = v.parse().ok().filter(|n| *n >= min).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{field}: Invalid value: {v:?}: must be greater than or equal to {min}"
                ))
            })?;
            out.push((field, n.to_string()));
        }
    }
    serde_urlencoded::to_string(out).map_err(|e| ApiError::internal(&e.to_string()))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect()
}

/// The container asked for, or the only one; Kubernetes' messages otherwise.
fn container<'a>(
    pod: &'a Value,
    pod_name: &str,
    asked: Option<&'a str>,
) -> Result<&'a str, ApiError> {
    let containers = names(&pod["spec"]["containers"]);
    let init = names(&pod["spec"]["initContainers"]);
    let ephemeral = names(&pod["spec"]["ephemeralContainers"]);
    match asked.filter(|c| !c.is_empty()) {
        Some(c) if containers.contains(&c) || init.contains(&c) || ephemeral.contains(&c) => Ok(c),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {pod_name}"
        ))),
        None if containers.len() == 1 => Ok(containers[0]),
        None => {
            let mut msg = format!(
                "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                containers.join(" ")
            );
            if !init.is_empty() {
                msg.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init.join(" ")
                ));
            }
            Err(ApiError::bad_request(msg))
        }
    }
}

/// The agent endpoint of `node`, from its annotation.
async fn agent_endpoint(api: &Shared, node: &str) -> Result<String, ApiError> {
    let nodes = registry::find("", "v1", "nodes")
        .ok_or_else(|| ApiError::internal("the nodes resource is not registered"))?;
    let kv = api
        .store
        .get(&nodes.key(None, node))
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            no_agent(format!(
                "node {node:?} is not registered, so no agent serves its logs"
            ))
        })?;
    let obj = meta::from_kv(&kv)?;
    obj["metadata"]["annotations"][AGENT_ENDPOINT_ANNOTATION]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            no_agent(format!(
                "node {node:?} has no {AGENT_ENDPOINT_ANNOTATION} annotation, so its agent cannot be reached for logs"
            ))
        })
}

/// No agent to ask. 502, not 503: a 503 tells clients (client-go, kube-rs) to retry, and
/// a node without an agent endpoint does not gain one in the next seconds.
fn no_agent(msg: String) -> ApiError {
    ApiError::new(502, StatusReason::InternalError, msg)
}

/// An error with its sources, for messages that say why a connection failed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_only_container_is_the_default_and_several_need_a_name() {
        let one = json!({"spec": {"containers": [{"name": "app"}]}});
        assert_eq!(container(&one, "p", None).expect("default"), "app");
        assert_eq!(container(&one, "p", Some("")).expect("empty"), "app");
        let err = container(&one, "p", Some("nope")).expect_err("unknown");
        assert_eq!(
            (err.code, err.message.as_str()),
            (400, "container nope is not valid for pod p")
        );
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}],
            "initContainers": [{"name": "setup"}]}});
        let err = container(&two, "p", None).expect_err("ambiguous");
        assert_eq!(
            (err.code, err.message.as_str()),
            (
                400,
                "a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [setup]"
            )
        );
        assert_eq!(container(&two, "p", Some("setup")).expect("init"), "setup");
    }

    #[test]
    fn log_options_are_checked_and_forwarded() {
        let q: Query = [
            ("follow", "true"),
            ("tailLines", "5"),
            ("timestamps", "true"),
            ("container", "a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(agent_query(&q).expect("ok"), "follow=true&tailLines=5");
        for (k, v) in [("tailLines", "-1"), ("limitBytes", "0"), ("follow", "yes")] {
            let q: Query = [(k.to_string(), v.to_string())].into_iter().collect();
            let err = agent_query(&q).expect_err(k);
            assert_eq!(err.code, 400, "{k}");
            assert!(err.message.starts_with(k), "{}", err.message);
        }
    }
}
