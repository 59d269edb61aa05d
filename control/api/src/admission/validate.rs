//! Validation: the checks of `pkg/apis/*/validation` that a manifest meets, with field paths
//! and messages as Kubernetes prints them. Runs on defaulted objects; `old` is the stored
//! object on update, for immutable fields.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use base64::Engine;
use serde_json::{Value, json};

use crate::names;
use crate::registry::Resource;
use crate::selector::LabelSelector;
use crate::status::Cause;

const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";
const IMMUTABLE: &str = "field is immutable";
const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
/// Total size of all annotations (keys and values) of one object.
const ANNOTATIONS_MAX: usize = 256 * 1024;
/// Total size of the data of a Secret or ConfigMap.
const DATA_MAX: usize = 1024 * 1024;

/// Validates an object of `res`; `old` is the stored version on update. Returns every
/// problem found, not just the first, as Kubernetes does.
pub fn validate(res: &Resource, obj: &Value, old: Option<&Value>) -> Result<(), Vec<Cause>> {
    let mut errs = Vec::new();
    metadata(res, obj, old.is_none(), &mut errs);
    match (res.group, res.kind) {
        ("", "Pod") => {
            pod_spec(
                obj.get("spec").unwrap_or(&Value::Null),
                "spec",
                false,
                &mut errs,
            );
            if let Some(old) = old {
                pod_update(obj, old, &mut errs);
            }
        }
        ("", "Service") => service(obj, old, &mut errs),
        ("", "Secret") => {
            secret(obj, &mut errs);
            data_immutable(obj, old, &["data"], &mut errs);
        }
        ("", "ConfigMap") => {
            config_map(obj, &mut errs);
            data_immutable(obj, old, &["data", "binaryData"], &mut errs);
        }
        ("apps", "Deployment") => workload(obj, old, true, &mut errs),
        ("apps", "ReplicaSet") => workload(obj, old, false, &mut errs),
        ("networking.k8s.io", "Ingress") => ingress(obj, &mut errs),
        ("networking.k8s.io", "IngressClass") => {
            immutable(obj, old, "/spec/controller", "spec.controller", &mut errs);
        }
        ("discovery.k8s.io", "EndpointSlice") => endpoint_slice(obj, old, &mut errs),
        ("coordination.k8s.io", "Lease") => {
            if let Some(d) = obj
                .pointer("/spec/leaseDurationSeconds")
                .and_then(Value::as_i64)
                && d <= 0
            {
                errs.push(Cause::invalid(
                    "spec.leaseDurationSeconds",
                    &json!(d),
                    "must be greater than 0",
                ));
            }
        }
        _ => {}
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> Option<&'a str> {
    obj.pointer(pointer).and_then(Value::as_str)
}

fn items<'a>(obj: &'a Value, key: &str) -> &'a [Value] {
    obj.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn name_check(kind: &str) -> fn(&str) -> Vec<String> {
    match kind {
        "Namespace" => names::dns1123_label,
        "Service" => names::dns1035_label,
        _ => names::dns1123_subdomain,
    }
}

fn push_invalid(errs: &mut Vec<Cause>, field: &str, value: &str, problems: Vec<String>) {
    for p in problems {
        errs.push(Cause::invalid(field, &json!(value), &p));
    }
}

fn metadata(res: &Resource, obj: &Value, create: bool, errs: &mut Vec<Cause>) {
    let check = name_check(res.kind);
    match (
        str_at(obj, "/metadata/name"),
        str_at(obj, "/metadata/generateName"),
    ) {
        (Some(name), _) if !name.is_empty() => {
            push_invalid(errs, "metadata.name", name, check(name));
        }
        (_, Some(prefix)) if create && !prefix.is_empty() => {
            // A generated name appends random characters, so a trailing '-' is fine.
            let base = prefix.trim_end_matches('-');
            push_invalid(errs, "metadata.generateName", prefix, check(base));
        }
        _ => errs.push(Cause::required(
            "metadata.name",
            "name or generateName is required",
        )),
    }
    match str_at(obj, "/metadata/namespace") {
        Some(ns) if !ns.is_empty() && !res.namespaced => {
            errs.push(Cause::forbidden(
                "metadata.namespace",
                "not allowed on this type",
            ));
        }
        Some(ns) if !ns.is_empty() => {
            push_invalid(errs, "metadata.namespace", ns, names::dns1123_label(ns));
        }
        _ if res.namespaced => errs.push(Cause::required("metadata.namespace", "")),
        _ => {}
    }
    labels(obj.pointer("/metadata/labels"), "metadata.labels", errs);
    if let Some(annotations) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut total = 0;
        for (k, v) in annotations {
            push_invalid(
                errs,
                "metadata.annotations",
                k,
                names::qualified_name(&k.to_ascii_lowercase()),
            );
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > ANNOTATIONS_MAX {
            errs.push(Cause::too_long("metadata.annotations", ANNOTATIONS_MAX));
        }
    }
    for (i, f) in items(obj.get("metadata").unwrap_or(&Value::Null), "finalizers")
        .iter()
        .enumerate()
    {
        let f = f.as_str().unwrap_or_default();
        push_invalid(
            errs,
            &format!("metadata.finalizers[{i}]"),
            f,
            names::qualified_name(f),
        );
    }
    for (i, owner) in items(
        obj.get("metadata").unwrap_or(&Value::Null),
        "ownerReferences",
    )
    .iter()
    .enumerate()
    {
        for field in ["apiVersion", "kind", "name", "uid"] {
            if owner
                .get(field)
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                errs.push(Cause::required(
                    &format!("metadata.ownerReferences[{i}].{field}"),
                    "",
                ));
            }
        }
    }
}

/// Label keys and values (object labels, selectors, node selectors).
fn labels(map: Option<&Value>, field: &str, errs: &mut Vec<Cause>) {
    for (k, v) in map.and_then(Value::as_object).into_iter().flatten() {
        push_invalid(errs, field, k, names::qualified_name(k));
        let v = v.as_str().unwrap_or_default();
        push_invalid(errs, field, v, names::label_value(v));
    }
}

fn port_range(errs: &mut Vec<Cause>, field: &str, port: Option<i64>) {
    match port {
        None => errs.push(Cause::required(field, "")),
        Some(p) if !(1..=65535).contains(&p) => {
            errs.push(Cause::invalid(field, &json!(p), PORT_RANGE))
        }
        Some(_) => {}
    }
}

fn one_of(errs: &mut Vec<Cause>, field: &str, value: Option<&str>, supported: &[&str]) {
    if let Some(v) = value
        && !supported.contains(&v)
    {
        errs.push(Cause::not_supported(field, &json!(v), supported));
    }
}

/// A pod spec, alone or as a template (`template` limits restartPolicy to Always).
fn pod_spec(spec: &Value, path: &str, template: bool, errs: &mut Vec<Cause>) {
    let containers = items(spec, "containers");
    if containers.is_empty() {
        errs.push(Cause::required(&format!("{path}.containers"), ""));
    }
    let volumes: BTreeSet<&str> = items(spec, "volumes")
        .iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .collect();
    let mut seen_names = BTreeSet::new();
    for key in ["initContainers", "containers"] {
        for (i, c) in items(spec, key).iter().enumerate() {
            let cpath = format!("{path}.{key}[{i}]");
            container(c, &cpath, &volumes, errs);
            match c.get("name").and_then(Value::as_str) {
                Some(name) if !seen_names.insert(name) => {
                    errs.push(Cause::duplicate(&format!("{cpath}.name"), &json!(name)));
                }
                _ => {}
            }
        }
    }
    let mut seen_volumes = BTreeSet::new();
    for (i, v) in items(spec, "volumes").iter().enumerate() {
        let field = format!("{path}.volumes[{i}].name");
        match v.get("name").and_then(Value::as_str) {
            None | Some("") => errs.push(Cause::required(&field, "")),
            Some(name) => {
                push_invalid(errs, &field, name, names::dns1123_label(name));
                if !seen_volumes.insert(name) {
                    errs.push(Cause::duplicate(&field, &json!(name)));
                }
            }
        }
    }
    let restart = str_at(spec, "/restartPolicy");
    if template {
        one_of(errs, &format!("{path}.restartPolicy"), restart, &["Always"]);
    } else {
        one_of(
            errs,
            &format!("{path}.restartPolicy"),
            restart,
            &["Always", "Never", "OnFailure"],
        );
    }
    one_of(
        errs,
        &format!("{path}.dnsPolicy"),
        str_at(spec, "/dnsPolicy"),
        &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
    );
    if let Some(g) = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
        && g < 0
    {
        errs.push(Cause::invalid(
            &format!("{path}.terminationGracePeriodSeconds"),
            &json!(g),
            "must be greater than or equal to 0",
        ));
    }
    labels(
        spec.get("nodeSelector"),
        &format!("{path}.nodeSelector"),
        errs,
    );
}

/// One container; port names are unique within it (not across the pod), as in Kubernetes.
fn container(c: &Value, path: &str, volumes: &BTreeSet<&str>, errs: &mut Vec<Cause>) {
    let mut seen_ports = BTreeSet::new();
    match c.get("name").and_then(Value::as_str) {
        None | Some("") => errs.push(Cause::required(&format!("{path}.name"), "")),
        Some(name) => push_invalid(
            errs,
            &format!("{path}.name"),
            name,
            names::dns1123_label(name),
        ),
    }
    if c.get("image")
        .and_then(Value::as_str)
        .is_none_or(|i| i.trim().is_empty())
    {
        errs.push(Cause::required(&format!("{path}.image"), ""));
    }
    one_of(
        errs,
        &format!("{path}.imagePullPolicy"),
        str_at(c, "/imagePullPolicy"),
        &["Always", "IfNotPresent", "Never"],
    );
    for (i, p) in items(c, "ports").iter().enumerate() {
        let ppath = format!("{path}.ports[{i}]");
        port_range(
            errs,
            &format!("{ppath}.containerPort"),
            p.get("containerPort").and_then(Value::as_i64),
        );
        if let Some(h) = p.get("hostPort").and_then(Value::as_i64)
            && h != 0
        {
            port_range(errs, &format!("{ppath}.hostPort"), Some(h));
        }
        if let Some(name) = p.get("name").and_then(Value::as_str) {
            push_invalid(errs, &format!("{ppath}.name"), name, names::port_name(name));
            if !seen_ports.insert(name) {
                errs.push(Cause::duplicate(&format!("{ppath}.name"), &json!(name)));
            }
        }
        one_of(
            errs,
            &format!("{ppath}.protocol"),
            str_at(p, "/protocol"),
            PROTOCOLS,
        );
    }
    for (i, e) in items(c, "env").iter().enumerate() {
        if e.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errs.push(Cause::required(&format!("{path}.env[{i}].name"), ""));
        }
    }
    for (i, m) in items(c, "volumeMounts").iter().enumerate() {
        let mpath = format!("{path}.volumeMounts[{i}]");
        let name = m.get("name").and_then(Value::as_str).unwrap_or_default();
        if !volumes.contains(name) {
            errs.push(Cause::not_found(&format!("{mpath}.name"), &json!(name)));
        }
        if m.get("mountPath")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errs.push(Cause::required(&format!("{mpath}.mountPath"), ""));
        }
    }
}

const POD_UPDATE: &str = "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

/// A pod's spec is fixed once created, except images and a few fields. `spec.nodeName` may
/// go from unset to set, which is what binding a pod does.
fn pod_update(obj: &Value, old: &Value, errs: &mut Vec<Cause>) {
    let masked = |spec: Option<&Value>, bound: bool| {
        let mut spec = spec.cloned().unwrap_or(Value::Null);
        if let Some(map) = spec.as_object_mut() {
            for key in [
                "activeDeadlineSeconds",
                "tolerations",
                "terminationGracePeriodSeconds",
            ] {
                map.remove(key);
            }
            if !bound {
                map.remove("nodeName");
            }
            for key in ["containers", "initContainers"] {
                for c in map
                    .get_mut(key)
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(c) = c.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
        spec
    };
    let was_bound = str_at(old, "/spec/nodeName").is_some_and(|n| !n.is_empty());
    if masked(obj.get("spec"), was_bound) != masked(old.get("spec"), was_bound) {
        errs.push(Cause::forbidden("spec", POD_UPDATE));
    }
}

fn immutable(obj: &Value, old: Option<&Value>, pointer: &str, field: &str, errs: &mut Vec<Cause>) {
    if let Some(old) = old
        && obj.pointer(pointer) != old.pointer(pointer)
    {
        errs.push(Cause::invalid(
            field,
            obj.pointer(pointer).unwrap_or(&Value::Null),
            IMMUTABLE,
        ));
    }
}

fn service(obj: &Value, old: Option<&Value>, errs: &mut Vec<Cause>) {
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    let kind = str_at(spec, "/type").unwrap_or("ClusterIP");
    one_of(
        errs,
        "spec.type",
        Some(kind),
        &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
    );
    let cluster_ip = str_at(spec, "/clusterIP").unwrap_or_default();
    if !cluster_ip.is_empty() && cluster_ip != "None" && cluster_ip.parse::<IpAddr>().is_err() {
        errs.push(Cause::invalid(
            "spec.clusterIP",
            &json!(cluster_ip),
            "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
        ));
    }
    let ports = items(spec, "ports");
    if ports.is_empty() && kind != "ExternalName" && cluster_ip != "None" {
        errs.push(Cause::required("spec.ports", ""));
    }
    if kind == "ExternalName" {
        match str_at(spec, "/externalName") {
            None | Some("") => errs.push(Cause::required("spec.externalName", "")),
            Some(n) => push_invalid(
                errs,
                "spec.externalName",
                n,
                names::dns1123_subdomain(n.trim_end_matches('.')),
            ),
        }
    }
    let mut seen_names = BTreeSet::new();
    let mut seen_ports = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        match p.get("name").and_then(Value::as_str) {
            None | Some("") if ports.len() > 1 => {
                errs.push(Cause::required(&format!("{path}.name"), ""));
            }
            None | Some("") => {}
            Some(name) => {
                push_invalid(
                    errs,
                    &format!("{path}.name"),
                    name,
                    names::dns1123_label(name),
                );
                if !seen_names.insert(name) {
                    errs.push(Cause::duplicate(&format!("{path}.name"), &json!(name)));
                }
            }
        }
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        port_range(errs, &format!("{path}.port"), Some(port));
        let protocol = str_at(p, "/protocol").unwrap_or("TCP");
        one_of(errs, &format!("{path}.protocol"), Some(protocol), PROTOCOLS);
        if !seen_ports.insert((port, protocol)) {
            errs.push(Cause::duplicate(
                &path,
                &json!({"port": port, "protocol": protocol}),
            ));
        }
        match p.get("targetPort") {
            Some(Value::Number(n)) => {
                let n = n.as_i64().unwrap_or(-1);
                port_range(errs, &format!("{path}.targetPort"), Some(n));
            }
            Some(Value::String(s)) => {
                push_invalid(errs, &format!("{path}.targetPort"), s, names::port_name(s));
            }
            _ => {}
        }
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64)
            && np != 0
        {
            if kind == "ClusterIP" {
                errs.push(Cause::forbidden(
                    &format!("{path}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            } else {
                port_range(errs, &format!("{path}.nodePort"), Some(np));
            }
        }
    }
    one_of(
        errs,
        "spec.sessionAffinity",
        str_at(spec, "/sessionAffinity"),
        &["ClientIP", "None"],
    );
    one_of(
        errs,
        "spec.internalTrafficPolicy",
        str_at(spec, "/internalTrafficPolicy"),
        &["Cluster", "Local"],
    );
    if let Some(policy) = str_at(spec, "/externalTrafficPolicy") {
        if kind == "ClusterIP" || kind == "ExternalName" {
            errs.push(Cause::forbidden(
                "spec.externalTrafficPolicy",
                "may only be set for externally-accessible services",
            ));
        } else {
            one_of(
                errs,
                "spec.externalTrafficPolicy",
                Some(policy),
                &["Cluster", "Local"],
            );
        }
    }
    // Unset or 0 on a LoadBalancer + Local Service: the server allocates one after admission.
    if let Some(hc) = spec.get("healthCheckNodePort").and_then(Value::as_i64)
        && hc != 0
    {
        if super::needs_health_check_node_port(obj) {
            port_range(errs, "spec.healthCheckNodePort", Some(hc));
            // Kubernetes' validateServiceExternalTrafficFieldsUpdate.
            if let Some(old) = old.filter(|o| super::needs_health_check_node_port(o))
                && old
                    .pointer("/spec/healthCheckNodePort")
                    .and_then(Value::as_i64)
                    != Some(hc)
            {
                errs.push(Cause::forbidden("spec.healthCheckNodePort", IMMUTABLE));
            }
        } else {
            errs.push(Cause::invalid(
                "spec.healthCheckNodePort",
                &json!(hc),
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
            ));
        }
    }
    labels(spec.get("selector"), "spec.selector", errs);
    // The server carries an allocated IP over when an update leaves it empty; a different
    // non-empty value is a change.
    if let Some(old_ip) = old.and_then(|o| str_at(o, "/spec/clusterIP"))
        && !old_ip.is_empty()
        && !cluster_ip.is_empty()
        && old_ip != cluster_ip
        && kind != "ExternalName"
    {
        errs.push(Cause::invalid(
            "spec.clusterIP",
            &json!(cluster_ip),
            IMMUTABLE,
        ));
    }
}

/// Deployments (`deployment`) and ReplicaSets.
fn workload(obj: &Value, old: Option<&Value>, deployment: bool, errs: &mut Vec<Cause>) {
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    let noun = if deployment {
        "deployment"
    } else {
        "replicaset"
    };
    if let Some(r) = spec.get("replicas").and_then(Value::as_i64)
        && r < 0
    {
        errs.push(Cause::invalid(
            "spec.replicas",
            &json!(r),
            "must be greater than or equal to 0",
        ));
    }
    match spec.get("selector") {
        None | Some(Value::Null) => errs.push(Cause::required("spec.selector", "")),
        Some(sel) => {
            let empty = sel
                .get("matchLabels")
                .and_then(Value::as_object)
                .is_none_or(|m| m.is_empty())
                && items(sel, "matchExpressions").is_empty();
            if empty {
                errs.push(Cause::invalid(
                    "spec.selector",
                    sel,
                    &format!("empty selector is invalid for {noun}"),
                ));
            } else {
                match LabelSelector::from_label_selector(sel, "spec.selector") {
                    Err(causes) => errs.extend(causes),
                    Ok(selector) => {
                        let tmpl_labels = obj.pointer("/spec/template/metadata/labels");
                        if !selector.matches_labels(tmpl_labels) {
                            errs.push(Cause::invalid(
                                "spec.template.metadata.labels",
                                tmpl_labels.unwrap_or(&json!({})),
                                "`selector` does not match template `labels`",
                            ));
                        }
                    }
                }
            }
        }
    }
    labels(
        obj.pointer("/spec/template/metadata/labels"),
        "spec.template.metadata.labels",
        errs,
    );
    pod_spec(
        obj.pointer("/spec/template/spec").unwrap_or(&Value::Null),
        "spec.template.spec",
        true,
        errs,
    );
    for field in ["minReadySeconds", "revisionHistoryLimit"] {
        if let Some(v) = spec.get(field).and_then(Value::as_i64)
            && v < 0
        {
            errs.push(Cause::invalid(
                &format!("spec.{field}"),
                &json!(v),
                "must be greater than or equal to 0",
            ));
        }
    }
    if deployment {
        deployment_strategy(spec, errs);
        if let Some(deadline) = spec.get("progressDeadlineSeconds").and_then(Value::as_i64) {
            let min_ready = spec
                .get("minReadySeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if deadline <= min_ready {
                errs.push(Cause::invalid(
                    "spec.progressDeadlineSeconds",
                    &json!(deadline),
                    "must be greater than minReadySeconds",
                ));
            }
        }
    }
    immutable(obj, old, "/spec/selector", "spec.selector", errs);
}

/// An int-or-percent value; `Some(percent)` or `Some(count)`, `None` when malformed.
fn int_or_percent(v: &Value) -> Option<(i64, bool)> {
    match v {
        Value::Number(n) => n.as_i64().map(|n| (n, false)),
        Value::String(s) => s
            .strip_suffix('%')
            .and_then(|n| n.parse().ok())
            .map(|n| (n, true)),
        _ => None,
    }
}

fn deployment_strategy(spec: &Value, errs: &mut Vec<Cause>) {
    let Some(strategy) = spec.get("strategy") else {
        return;
    };
    let kind = str_at(strategy, "/type");
    one_of(
        errs,
        "spec.strategy.type",
        kind,
        &["Recreate", "RollingUpdate"],
    );
    let Some(rolling) = strategy.get("rollingUpdate") else {
        return;
    };
    if kind == Some("Recreate") {
        errs.push(Cause::forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        ));
        return;
    }
    let mut zero = BTreeMap::new();
    for field in ["maxUnavailable", "maxSurge"] {
        let Some(v) = rolling.get(field) else {
            continue;
        };
        let path = format!("spec.strategy.rollingUpdate.{field}");
        match int_or_percent(v) {
            None => errs.push(Cause::invalid(&path, v, "a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')")),
            Some((n, _)) if n < 0 => errs.push(Cause::invalid(&path, v, "must be greater than or equal to 0")),
            Some((n, true)) if n > 100 && field == "maxUnavailable" => {
                errs.push(Cause::invalid(&path, v, "must not be greater than 100%"));
            }
            Some((n, _)) => {
                zero.insert(field, n == 0);
            }
        }
    }
    if zero.get("maxUnavailable") == Some(&true) && zero.get("maxSurge") == Some(&true) {
        errs.push(Cause::invalid(
            "spec.strategy.rollingUpdate.maxUnavailable",
            rolling.get("maxUnavailable").unwrap_or(&Value::Null),
            "may not be 0 when `maxSurge` is 0",
        ));
    }
}

/// An Ingress host: a DNS subdomain, optionally with one leading `*.` wildcard label.
fn ingress_host(errs: &mut Vec<Cause>, field: &str, host: &str) {
    if host.parse::<IpAddr>().is_ok() {
        errs.push(Cause::invalid(
            field,
            &json!(host),
            "must be a DNS name, not an IP address",
        ));
        return;
    }
    let base = host.strip_prefix("*.").unwrap_or(host);
    push_invalid(errs, field, host, names::dns1123_subdomain(base));
}

fn ingress_backend(b: &Value, path: &str, errs: &mut Vec<Cause>) {
    match (b.get("service"), b.get("resource")) {
        (Some(_), Some(_)) => errs.push(Cause::invalid(
            path,
            &json!(""),
            "cannot set both resource and service backends",
        )),
        (None, None) => errs.push(Cause::required(
            path,
            "one of `service` or `resource` must be specified",
        )),
        (None, Some(_)) => {}
        (Some(svc), None) => {
            let spath = format!("{path}.service");
            match svc.get("name").and_then(Value::as_str) {
                None | Some("") => errs.push(Cause::required(&format!("{spath}.name"), "")),
                Some(n) => push_invalid(errs, &format!("{spath}.name"), n, names::dns1035_label(n)),
            }
            let port = svc.get("port").unwrap_or(&Value::Null);
            let name = port
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty());
            let number = port
                .get("number")
                .and_then(Value::as_i64)
                .filter(|n| *n != 0);
            match (name, number) {
                (Some(_), Some(_)) => errs.push(Cause::invalid(
                    &format!("{spath}.port"),
                    port,
                    "cannot set both port name & port number",
                )),
                (None, None) => errs.push(Cause::required(
                    &format!("{spath}.port"),
                    "port name or number is required",
                )),
                (Some(n), None) => {
                    push_invalid(errs, &format!("{spath}.port.name"), n, names::port_name(n))
                }
                (None, Some(n)) => port_range(errs, &format!("{spath}.port.number"), Some(n)),
            }
        }
    }
}

fn ingress(obj: &Value, errs: &mut Vec<Cause>) {
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    let rules = items(spec, "rules");
    if let Some(b) = spec.get("defaultBackend") {
        ingress_backend(b, "spec.defaultBackend", errs);
    } else if rules.is_empty() {
        errs.push(Cause::invalid(
            "spec",
            spec,
            "either `defaultBackend` or `rules` must be specified",
        ));
    }
    if let Some(class) = str_at(spec, "/ingressClassName") {
        push_invalid(
            errs,
            "spec.ingressClassName",
            class,
            names::dns1123_subdomain(class),
        );
    }
    for (i, rule) in rules.iter().enumerate() {
        let rpath = format!("spec.rules[{i}]");
        if let Some(host) = str_at(rule, "/host").filter(|h| !h.is_empty()) {
            ingress_host(errs, &format!("{rpath}.host"), host);
        }
        let Some(http) = rule.get("http") else {
            continue;
        };
        let paths = items(http, "paths");
        if paths.is_empty() {
            errs.push(Cause::required(&format!("{rpath}.http.paths"), ""));
        }
        for (j, p) in paths.iter().enumerate() {
            let ppath = format!("{rpath}.http.paths[{j}]");
            let path = str_at(p, "/path").unwrap_or_default();
            match str_at(p, "/pathType") {
                None | Some("") => errs.push(Cause::required(
                    &format!("{ppath}.pathType"),
                    "pathType must be specified",
                )),
                Some("Exact" | "Prefix") => {
                    if !path.starts_with('/') {
                        errs.push(Cause::invalid(
                            &format!("{ppath}.path"),
                            &json!(path),
                            "must be an absolute path",
                        ));
                    }
                }
                Some("ImplementationSpecific") => {
                    if !path.is_empty() && !path.starts_with('/') {
                        errs.push(Cause::invalid(
                            &format!("{ppath}.path"),
                            &json!(path),
                            "must be an absolute path",
                        ));
                    }
                }
                Some(other) => errs.push(Cause::not_supported(
                    &format!("{ppath}.pathType"),
                    &json!(other),
                    &["Exact", "ImplementationSpecific", "Prefix"],
                )),
            }
            ingress_backend(
                p.get("backend").unwrap_or(&json!({})),
                &format!("{ppath}.backend"),
                errs,
            );
        }
    }
    for (i, tls) in items(spec, "tls").iter().enumerate() {
        for (j, host) in items(tls, "hosts").iter().enumerate() {
            ingress_host(
                errs,
                &format!("spec.tls[{i}].hosts[{j}]"),
                host.as_str().unwrap_or_default(),
            );
        }
    }
}

/// Keys of Secret and ConfigMap data: `[-._a-zA-Z0-9]+`, not `.` or `..`.
fn config_key(errs: &mut Vec<Cause>, field: &str, key: &str) {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        errs.push(Cause::invalid(field, &json!(key), "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
    }
}

fn secret(obj: &Value, errs: &mut Vec<Cause>) {
    let data = obj.get("data").and_then(Value::as_object);
    let mut total = 0;
    for (k, v) in data.into_iter().flatten() {
        config_key(errs, &format!("data[{k}]"), k);
        let encoded = v.as_str().unwrap_or_default();
        match base64::engine::general_purpose::STANDARD.decode(encoded) {
            Ok(bytes) => total += bytes.len(),
            Err(e) => errs.push(Cause::invalid(
                &format!("data[{k}]"),
                &json!(encoded),
                &e.to_string(),
            )),
        }
    }
    if total > DATA_MAX {
        errs.push(Cause::too_long("data", DATA_MAX));
    }
    let has = |k: &str| data.is_some_and(|d| d.contains_key(k));
    let required: &[&str] = match str_at(obj, "/type").unwrap_or("Opaque") {
        "kubernetes.io/tls" => &["tls.crt", "tls.key"],
        "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
        "kubernetes.io/dockercfg" => &[".dockercfg"],
        "kubernetes.io/ssh-auth" => &["ssh-privatekey"],
        _ => &[],
    };
    for key in required {
        if !has(key) {
            errs.push(Cause::required(&format!("data[{key}]"), ""));
        }
    }
}

fn config_map(obj: &Value, errs: &mut Vec<Cause>) {
    let data = obj.get("data").and_then(Value::as_object);
    let binary = obj.get("binaryData").and_then(Value::as_object);
    let mut total = 0;
    for (k, v) in data.into_iter().flatten() {
        config_key(errs, &format!("data[{k}]"), k);
        total += v.as_str().map_or(0, str::len);
        if binary.is_some_and(|b| b.contains_key(k)) {
            errs.push(Cause::invalid(
                &format!("data[{k}]"),
                &json!(k),
                "duplicate of key present in binaryData",
            ));
        }
    }
    for (k, v) in binary.into_iter().flatten() {
        config_key(errs, &format!("binaryData[{k}]"), k);
        total += v.as_str().map_or(0, |s| s.len() / 4 * 3);
    }
    if total > DATA_MAX {
        errs.push(Cause::too_long("data", DATA_MAX));
    }
}

/// `immutable: true` Secrets and ConfigMaps keep their data and stay immutable.
fn data_immutable(obj: &Value, old: Option<&Value>, fields: &[&str], errs: &mut Vec<Cause>) {
    let Some(old) = old else { return };
    if old.get("immutable").and_then(Value::as_bool) != Some(true) {
        return;
    }
    if obj.get("immutable").and_then(Value::as_bool) != Some(true) {
        errs.push(Cause::forbidden(
            "immutable",
            "field is immutable when `immutable` is set",
        ));
    }
    for f in fields {
        if obj.get(*f) != old.get(*f) {
            errs.push(Cause::forbidden(
                f,
                "field is immutable when `immutable` is set",
            ));
        }
    }
}

fn endpoint_slice(obj: &Value, old: Option<&Value>, errs: &mut Vec<Cause>) {
    let address_type = str_at(obj, "/addressType");
    match address_type {
        None | Some("") => errs.push(Cause::required("addressType", "")),
        Some(t) => one_of(errs, "addressType", Some(t), &["FQDN", "IPv4", "IPv6"]),
    }
    for (i, ep) in items(obj, "endpoints").iter().enumerate() {
        let addrs = items(ep, "addresses");
        let apath = format!("endpoints[{i}].addresses");
        if addrs.is_empty() || addrs.len() > 100 {
            errs.push(Cause::required(
                &apath,
                "must contain at least 1 address, at most 100",
            ));
        }
        for (j, a) in addrs.iter().enumerate() {
            let a = a.as_str().unwrap_or_default();
            let field = format!("{apath}[{j}]");
            match address_type {
                Some("IPv4") if !a.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv4()) => {
                    errs.push(Cause::invalid(
                        &field,
                        &json!(a),
                        "must be a valid IPv4 address",
                    ));
                }
                Some("IPv6") if !a.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) => {
                    errs.push(Cause::invalid(
                        &field,
                        &json!(a),
                        "must be a valid IPv6 address",
                    ));
                }
                Some("FQDN") => push_invalid(errs, &field, a, names::dns1123_subdomain(a)),
                _ => {}
            }
        }
    }
    let mut seen = BTreeSet::new();
    for (i, p) in items(obj, "ports").iter().enumerate() {
        let path = format!("ports[{i}]");
        let name = str_at(p, "/name").unwrap_or_default();
        if !name.is_empty() {
            push_invalid(
                errs,
                &format!("{path}.name"),
                name,
                names::dns1123_label(name),
            );
        }
        if !seen.insert(name) {
            errs.push(Cause::duplicate(&format!("{path}.name"), &json!(name)));
        }
        if let Some(port) = p.get("port").and_then(Value::as_i64) {
            port_range(errs, &format!("{path}.port"), Some(port));
        }
        one_of(
            errs,
            &format!("{path}.protocol"),
            str_at(p, "/protocol"),
            PROTOCOLS,
        );
    }
    immutable(obj, old, "/addressType", "addressType", errs);
}

#[cfg(test)]
mod tests;
