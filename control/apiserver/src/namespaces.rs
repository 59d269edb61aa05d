//! The objects a cluster starts with (the `default`, `kube-system`, `kube-public` and
//! `kube-node-lease` namespaces and the `kubernetes` Service on the first service IP), and
//! namespace termination: deleting a namespace deletes everything in it, then the
//! namespace itself.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use weir_api::{ApiError, registry};
use weir_store::ListOptions;

use crate::Shared;
use crate::meta;
use crate::rest::{self, DeleteOpts};

pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Create what is missing of the initial objects, and resume the termination of namespaces
/// a previous run left terminating. Existing objects are left as they are.
pub async fn bootstrap(api: &Arc<Shared>) -> Result<(), ApiError> {
    let ns = namespaces();
    for name in SYSTEM_NAMESPACES {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        match rest::create_internal(api, ns, None, obj).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let svc = registry::find("", "v1", "services").ok_or_else(ApiError::unknown_resource)?;
    let kubernetes = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "kubernetes",
            "labels": {"component": "apiserver", "provider": "kubernetes"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": api.alloc.cidr.apiserver_ip().to_string(),
            "ports": [{
                "name": "https",
                "port": 443,
                "protocol": "TCP",
                "targetPort": api.listen.port(),
            }],
            "sessionAffinity": "None",
        },
    });
    match rest::create_internal(api, svc, Some("default"), kubernetes).await {
        Ok(_) => {}
        Err(e) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    let list = api
        .store
        .list(&ns.key_prefix(), ListOptions::default())
        .await
        .map_err(rest::store_error)?;
    for kv in &list.items {
        let obj = meta::from_kv(kv)?;
        if meta::meta_str(&obj, "deletionTimestamp").is_some() {
            spawn_termination(api.clone(), meta::name(&obj).to_string());
        }
    }
    Ok(())
}

fn namespaces() -> &'static weir_api::Resource {
    registry::find("", "v1", "namespaces").unwrap_or(&registry::all()[0])
}

/// Time between a namespace's delete and the first pass over its contents. Kubernetes'
/// namespace controller also works after the delete returns, and clients rely on that:
/// `kubectl delete -f` deletes a namespace and then each object of the manifest in it.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(2);

/// Delete everything in namespace `name`, then the namespace. Runs until done: objects held
/// by finalizers or by a node's graceful pod shutdown keep the namespace terminating.
pub fn spawn_termination(api: Arc<Shared>, name: String) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        tokio::select! {
            _ = tokio::time::sleep(FIRST_PASS_AFTER) => {}
            _ = api.shutdown.cancelled() => return,
        }
        loop {
            match terminate_once(&api, &name).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(namespace = %name, error = %e, "namespace termination"),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = api.shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    });
}

/// One pass: true when the namespace is gone.
async fn terminate_once(api: &Arc<Shared>, name: &str) -> Result<bool, ApiError> {
    let mut remaining = 0;
    for res in registry::all().iter().filter(|r| r.namespaced) {
        let list = api
            .store
            .list(&res.namespace_prefix(Some(name)), ListOptions::default())
            .await
            .map_err(rest::store_error)?;
        for kv in &list.items {
            remaining += 1;
            let obj = meta::from_kv(kv)?;
            if meta::meta_str(&obj, "deletionTimestamp").is_some() {
                continue;
            }
            match rest::delete(
                api,
                res,
                Some(name),
                meta::name(&obj),
                &DeleteOpts::default(),
            )
            .await
            {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    if remaining > 0 {
        // Check again: immediate deletes above may have emptied it.
        for res in registry::all().iter().filter(|r| r.namespaced) {
            let list = api
                .store
                .list(
                    &res.namespace_prefix(Some(name)),
                    ListOptions {
                        limit: 1,
                        ..ListOptions::default()
                    },
                )
                .await
                .map_err(rest::store_error)?;
            if !list.items.is_empty() {
                return Ok(false);
            }
        }
    }
    match api.store.delete(&namespaces().key(None, name), None).await {
        Ok(_) | Err(weir_store::Error::NotFound { .. }) => Ok(true),
        Err(e) => Err(rest::store_error(e)),
    }
}
