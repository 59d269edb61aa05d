//! A container's environment as Kubernetes builds it: `envFrom` first, then `env` in order,
//! values from ConfigMaps, Secrets and the pod's own fields, and `$(VAR)` references expanded
//! against the variables defined before them (also in `command` and `args`).

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, Pod};

/// Where ConfigMap and Secret data come from (the API server, through the agent's client).
pub trait Lookup: Send + Sync {
    /// The data of a ConfigMap, `None` if it does not exist.
    fn config_map<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, String>>;
    /// The decoded data of a Secret, `None` if it does not exist.
    fn secret<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, String>>;
}

/// Values of the pod that `fieldRef` can select.
pub struct PodFields<'a> {
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
}

impl PodFields<'_> {
    fn get(&self, path: &str) -> Option<String> {
        let meta = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        Some(match path {
            "metadata.name" => meta.name.clone()?,
            "metadata.namespace" => meta.namespace.clone()?,
            "metadata.uid" => meta.uid.clone()?,
            "spec.nodeName" => spec?.node_name.clone()?,
            "spec.serviceAccountName" => spec?.service_account_name.clone().unwrap_or_default(),
            "status.podIP" | "status.podIPs" => self.pod_ip.to_string(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.to_string(),
            _ => {
                let (map, key) = if let Some(rest) = path.strip_prefix("metadata.labels['") {
                    (meta.labels.as_ref()?, rest.strip_suffix("']")?)
                } else {
                    let rest = path.strip_prefix("metadata.annotations['")?;
                    (meta.annotations.as_ref()?, rest.strip_suffix("']")?)
                };
                map.get(key).cloned().unwrap_or_default()
            }
        })
    }
}

/// Expands `$(VAR)` from `vars`; `$$(VAR)` is an escaped literal `$(VAR)`; unknown
/// references stay as written — the rules of Kubernetes' `expansion` package.
pub fn expand(input: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn set(vars: &mut Vec<(String, String)>, key: String, value: String) {
    match vars.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => vars.push((key, value)),
    }
}

/// The environment of `container`, or the reason it cannot be built (which the agent shows
/// as waiting reason `CreateContainerConfigError`, with the kubelet's wording).
pub async fn build(
    fields: &PodFields<'_>,
    container: &Container,
    lookup: &dyn Lookup,
) -> Result<Vec<(String, String)>, String> {
    let namespace = fields
        .pod
        .metadata
        .namespace
        .as_deref()
        .unwrap_or("default");
    let mut vars: Vec<(String, String)> = Vec::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        let data = if let Some(cm) = &from.config_map_ref {
            match lookup.config_map(namespace, &cm.name).await? {
                Some(d) => d,
                None if cm.optional == Some(true) => continue,
                None => return Err(format!("configmap \"{}\" not found", cm.name)),
            }
        } else if let Some(s) = &from.secret_ref {
            match lookup.secret(namespace, &s.name).await? {
                Some(d) => d,
                None if s.optional == Some(true) => continue,
                None => return Err(format!("secret \"{}\" not found", s.name)),
            }
        } else {
            continue;
        };
        for (k, v) in data {
            set(&mut vars, format!("{prefix}{k}"), v);
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or(""), &vars),
            Some(from) => {
                if let Some(f) = &from.field_ref {
                    fields.get(&f.field_path).ok_or_else(|| {
                        format!(
                            "unsupported fieldPath {:?} in env {}",
                            f.field_path, var.name
                        )
                    })?
                } else if let Some(r) = &from.config_map_key_ref {
                    let data = lookup.config_map(namespace, &r.name).await?;
                    match data.as_ref().map(|d| d.get(&r.key)) {
                        Some(Some(v)) => v.clone(),
                        _ if r.optional == Some(true) => continue,
                        Some(None) => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {namespace}/{}",
                                r.key, r.name
                            ));
                        }
                        None => return Err(format!("configmap \"{}\" not found", r.name)),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let data = lookup.secret(namespace, &r.name).await?;
                    match data.as_ref().map(|d| d.get(&r.key)) {
                        Some(Some(v)) => v.clone(),
                        _ if r.optional == Some(true) => continue,
                        Some(None) => {
                            return Err(format!(
                                "couldn't find key {} in Secret {namespace}/{}",
                                r.key, r.name
                            ));
                        }
                        None => return Err(format!("secret \"{}\" not found", r.name)),
                    }
                } else {
                    return Err(format!(
                        "env {}: valueFrom.resourceFieldRef is not supported by weir",
                        var.name
                    ));
                }
            }
        };
        set(&mut vars, var.name.clone(), value);
    }
    if !vars.iter().any(|(k, _)| k == "PATH") {
        vars.push(("PATH".into(), crate::runtime::DEFAULT_PATH.into()));
    }
    if let Some(name) = &fields.pod.metadata.name
        && !vars.iter().any(|(k, _)| k == "HOSTNAME")
    {
        vars.push(("HOSTNAME".into(), name.clone()));
    }
    Ok(vars)
}

/// `command` + `args` with `$(VAR)` expanded, as the process runtime runs them.
pub fn argv(container: &Container, vars: &[(String, String)]) -> Vec<String> {
    container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|s| expand(s, vars))
        .collect()
}

#[cfg(test)]
mod tests;
