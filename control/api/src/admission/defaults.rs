//! Defaulting: the values the Kubernetes API server fills in (`pkg/apis/*/v1/defaults.go`),
//! so `get -o yaml` shows what kubectl users expect. Allocation (cluster IPs, node ports,
//! `ipFamilies`) is the server's job, not done here.

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::registry::Resource;

/// Fills in defaults on an object of `res` in place. Idempotent: explicit values are kept.
pub fn default(res: &Resource, obj: &mut Value) {
    match (res.group, res.kind) {
        ("", "Pod") => {
            if let Some(spec) = obj.get_mut("spec") {
                pod_spec(spec);
                requests_from_limits(spec);
            }
            let qos = qos_class(obj.get("spec").unwrap_or(&Value::Null));
            let status = entry(obj, "status");
            set(status, "phase", json!("Pending"));
            set(status, "qosClass", json!(qos));
        }
        ("", "Service") => {
            if let Some(spec) = obj.get_mut("spec") {
                service_spec(spec);
            }
        }
        ("", "Secret") => secret(obj),
        ("", "Namespace") => {
            let spec = entry(obj, "spec");
            set(spec, "finalizers", json!(["kubernetes"]));
            set(entry(obj, "status"), "phase", json!("Active"));
        }
        ("apps", "Deployment") => {
            let Some(spec) = obj.get_mut("spec") else {
                return;
            };
            set(spec, "replicas", json!(1));
            set(spec, "revisionHistoryLimit", json!(10));
            set(spec, "progressDeadlineSeconds", json!(600));
            let strategy = entry(spec, "strategy");
            set(strategy, "type", json!("RollingUpdate"));
            if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                let rolling = entry(strategy, "rollingUpdate");
                set(rolling, "maxUnavailable", json!("25%"));
                set(rolling, "maxSurge", json!("25%"));
            }
            template(spec);
        }
        ("apps", "ReplicaSet") => {
            let Some(spec) = obj.get_mut("spec") else {
                return;
            };
            set(spec, "replicas", json!(1));
            template(spec);
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            for port in items_mut(obj, "ports") {
                set(port, "protocol", json!("TCP"));
            }
        }
        _ => {}
    }
}

/// Sets `key` on an object when it is absent or null.
fn set(obj: &mut Value, key: &str, value: Value) {
    if let Some(map) = obj.as_object_mut() {
        let slot = map.entry(key).or_insert(Value::Null);
        if slot.is_null() {
            *slot = value;
        }
    }
}

/// The object under `key`, created empty when absent.
fn entry<'a>(obj: &'a mut Value, key: &str) -> &'a mut Value {
    set(obj, key, Value::Object(Map::new()));
    match obj {
        Value::Object(map) => map.entry(key).or_insert(Value::Null),
        // Only reachable for a non-object parent; hand back the parent so writes are no-ops.
        other => other,
    }
}

/// The elements of the array under `key` (none when absent).
fn items_mut<'a>(obj: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    obj.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

fn template(spec: &mut Value) {
    // kube-apiserver serialises the template's zero creationTimestamp as `null`; kubectl's
    // apply patches compare against it, and without it every re-apply of a manifest
    // carrying `creationTimestamp: null` (as kubectl-generated ones do) is "configured".
    if let Some(Value::Object(template)) = spec.get_mut("template") {
        let meta = template
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(meta) = meta.as_object_mut() {
            meta.entry("creationTimestamp").or_insert(Value::Null);
        }
    }
    if let Some(pod) = spec.pointer_mut("/template/spec") {
        pod_spec(pod);
    }
}

fn pod_spec(spec: &mut Value) {
    set(spec, "restartPolicy", json!("Always"));
    set(spec, "dnsPolicy", json!("ClusterFirst"));
    set(spec, "terminationGracePeriodSeconds", json!(30));
    set(spec, "schedulerName", json!("default-scheduler"));
    set(spec, "securityContext", json!({}));
    set(spec, "enableServiceLinks", json!(true));
    for key in ["containers", "initContainers", "ephemeralContainers"] {
        for c in items_mut(spec, key) {
            container(c);
        }
    }
    for volume in items_mut(spec, "volumes") {
        volume_source(volume);
    }
}

/// A Pod's container without a request for a resource it limits requests the limit
/// (`SetDefaults_Pod`; templates are left alone, their Pods get it when created).
fn requests_from_limits(spec: &mut Value) {
    for key in ["containers", "initContainers"] {
        for c in items_mut(spec, key) {
            let Some(limits) = c
                .pointer("/resources/limits")
                .and_then(Value::as_object)
                .cloned()
            else {
                continue;
            };
            let requests = entry(entry(c, "resources"), "requests");
            for (resource, quantity) in limits {
                set(requests, &resource, quantity);
            }
        }
    }
}

/// `Guaranteed` when every container limits CPU and memory and requests exactly that,
/// `BestEffort` when none requests or limits anything, `Burstable` otherwise.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten()
        .collect();
    let set_any = |c: &Value, kind: &str| {
        c.pointer(&format!("/resources/{kind}"))
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
    };
    if !containers
        .iter()
        .any(|c| set_any(c, "limits") || set_any(c, "requests"))
    {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = c.pointer(&format!("/resources/limits/{r}"));
            limit.is_some() && limit == c.pointer(&format!("/resources/requests/{r}"))
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// `Always` for `:latest` or untagged images, `IfNotPresent` otherwise (digests included).
fn pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn container(c: &mut Value) {
    if let Some(image) = c.get("image").and_then(Value::as_str) {
        let policy = pull_policy(image);
        set(c, "imagePullPolicy", json!(policy));
    }
    set(c, "terminationMessagePath", json!("/dev/termination-log"));
    set(c, "terminationMessagePolicy", json!("File"));
    set(c, "resources", json!({}));
    for port in items_mut(c, "ports") {
        set(port, "protocol", json!("TCP"));
    }
    for env in items_mut(c, "env") {
        if let Some(field_ref) = env.pointer_mut("/valueFrom/fieldRef") {
            set(field_ref, "apiVersion", json!("v1"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe) {
            set(p, "timeoutSeconds", json!(1));
            set(p, "periodSeconds", json!(10));
            set(p, "successThreshold", json!(1));
            set(p, "failureThreshold", json!(3));
            if let Some(http) = p.get_mut("httpGet") {
                set(http, "scheme", json!("HTTP"));
            }
        }
    }
}

const VOLUME_SOURCES: &[&str] = &[
    "emptyDir",
    "hostPath",
    "secret",
    "configMap",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "nfs",
    "csi",
    "ephemeral",
    "image",
];

fn volume_source(volume: &mut Value) {
    if !VOLUME_SOURCES.iter().any(|s| volume.get(s).is_some()) {
        set(volume, "emptyDir", json!({}));
    }
    for source in ["secret", "configMap", "downwardAPI", "projected"] {
        if let Some(s) = volume.get_mut(source) {
            // 0644, which kubectl prints as 420.
            set(s, "defaultMode", json!(420));
        }
    }
    if let Some(host) = volume.get_mut("hostPath") {
        set(host, "type", json!(""));
    }
}

fn service_spec(spec: &mut Value) {
    set(spec, "type", json!("ClusterIP"));
    set(spec, "sessionAffinity", json!("None"));
    let kind = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind != "ExternalName" {
        set(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    if kind == "NodePort" || kind == "LoadBalancer" {
        set(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if kind == "LoadBalancer" {
        set(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if spec.get("sessionAffinity").and_then(Value::as_str) == Some("ClientIP") {
        let config = entry(spec, "sessionAffinityConfig");
        set(entry(config, "clientIP"), "timeoutSeconds", json!(10800));
    }
    for port in items_mut(spec, "ports") {
        set(port, "protocol", json!("TCP"));
        let unset = match port.get("targetPort") {
            None | Some(Value::Null) => true,
            Some(Value::Number(n)) => n.as_i64() == Some(0),
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        };
        if unset && let Some(p) = port.get("port").cloned() {
            port["targetPort"] = p;
        }
    }
}

/// Type `Opaque`, and `stringData` folded into `data` (base64), as the API server does on
/// write: `stringData` is write-only and never stored.
fn secret(obj: &mut Value) {
    set(obj, "type", json!("Opaque"));
    let Some(Value::Object(strings)) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    let data = entry(obj, "data");
    if let Some(data) = data.as_object_mut() {
        for (k, v) in strings {
            let text = v.as_str().unwrap_or_default();
            let encoded = base64::engine::general_purpose::STANDARD.encode(text);
            data.insert(k, Value::String(encoded));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::find_by_name;

    fn defaulted(res: &str, mut obj: Value) -> Value {
        default(find_by_name(res).expect("resource"), &mut obj);
        obj
    }

    #[test]
    fn service_defaults() {
        let svc = defaulted(
            "svc",
            json!({"spec": {"ports": [{"port": 80}, {"port": 443, "targetPort": "https", "protocol": "UDP"}]}}),
        );
        assert_eq!(
            svc["spec"],
            json!({"type": "ClusterIP", "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
                   "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"},
                             {"port": 443, "targetPort": "https", "protocol": "UDP"}]})
        );
        let np = defaulted(
            "svc",
            json!({"spec": {"type": "NodePort", "sessionAffinity": "ClientIP"}}),
        );
        assert_eq!(np["spec"]["externalTrafficPolicy"], "Cluster");
        assert_eq!(
            np["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
    }

    #[test]
    fn deployment_and_pod_template_defaults() {
        let d = defaulted(
            "deploy",
            json!({"spec": {"template": {"spec": {"containers": [
                {"name": "web", "image": "nginx", "ports": [{"containerPort": 80}],
                 "readinessProbe": {"httpGet": {"port": 80}}},
                {"name": "side", "image": "busybox:1.36"}]}}}}),
        );
        let spec = &d["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(spec["revisionHistoryLimit"], 10);
        assert_eq!(spec["progressDeadlineSeconds"], 600);
        assert_eq!(
            spec["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        );
        assert_eq!(
            spec["template"]["metadata"],
            json!({"creationTimestamp": null})
        );
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Always");
        assert_eq!(pod["dnsPolicy"], "ClusterFirst");
        assert_eq!(pod["terminationGracePeriodSeconds"], 30);
        assert_eq!(pod["schedulerName"], "default-scheduler");
        let web = &pod["containers"][0];
        assert_eq!(web["imagePullPolicy"], "Always");
        assert_eq!(web["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(web["ports"][0]["protocol"], "TCP");
        assert_eq!(web["readinessProbe"]["periodSeconds"], 10);
        assert_eq!(web["readinessProbe"]["httpGet"]["scheme"], "HTTP");
        assert_eq!(pod["containers"][1]["imagePullPolicy"], "IfNotPresent");

        let recreate = defaulted(
            "deploy",
            json!({"spec": {"strategy": {"type": "Recreate"}}}),
        );
        assert!(recreate["spec"]["strategy"].get("rollingUpdate").is_none());
        assert_eq!(pull_policy("reg:5000/app@sha256:abc"), "IfNotPresent");
        assert_eq!(pull_policy("reg:5000/app"), "Always");
    }

    #[test]
    fn secret_namespace_replicaset_defaults() {
        let s = defaulted(
            "secret",
            json!({"data": {"a": "eA=="}, "stringData": {"b": "hello"}}),
        );
        assert_eq!(s["type"], "Opaque");
        assert_eq!(s["data"], json!({"a": "eA==", "b": "aGVsbG8="}));
        assert!(s.get("stringData").is_none());
        let ns = defaulted("ns", json!({"metadata": {"name": "x"}}));
        assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(ns["status"]["phase"], "Active");
        let rs = defaulted("rs", json!({"spec": {"replicas": 0}}));
        assert_eq!(rs["spec"]["replicas"], 0);
    }

    #[test]
    fn pods_start_pending_with_requests_from_limits_and_a_qos_class() {
        let pod = defaulted(
            "pods",
            json!({"spec": {"containers": [{"name": "a", "image": "x",
                   "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}}}]}}),
        );
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["requests"],
            json!({"cpu": "500m", "memory": "64Mi"})
        );
        assert_eq!(
            pod["status"],
            json!({"phase": "Pending", "qosClass": "Guaranteed"})
        );
        let burstable = defaulted(
            "pods",
            json!({"spec": {"containers": [{"name": "a", "image": "x",
                   "resources": {"requests": {"cpu": "100m"}}}]}}),
        );
        assert_eq!(burstable["status"]["qosClass"], "Burstable");
        let best = defaulted(
            "pods",
            json!({"spec": {"containers": [{"name": "a", "image": "x"}]}}),
        );
        assert_eq!(best["status"]["qosClass"], "BestEffort");
        let running = defaulted(
            "pods",
            json!({"spec": {}, "status": {"phase": "Running", "qosClass": "BestEffort"}}),
        );
        assert_eq!(running["status"]["phase"], "Running");
    }

    #[test]
    fn defaulting_is_idempotent() {
        let once = defaulted(
            "deploy",
            json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x"}],
                   "volumes": [{"name": "v"}, {"name": "s", "secret": {"secretName": "s"}}]}}}}),
        );
        let vols = &once["spec"]["template"]["spec"]["volumes"];
        assert_eq!(vols[0]["emptyDir"], json!({}));
        assert_eq!(vols[1]["secret"]["defaultMode"], 420);
        assert_eq!(defaulted("deploy", once.clone()), once);
    }
}
