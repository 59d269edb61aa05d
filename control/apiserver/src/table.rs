//! Server-side printing: `meta.k8s.io/v1 Table` objects with the columns kubectl users know
//! from kube-apiserver (`pkg/printers/internalversion`). Columns with priority 1 are the
//! ones `kubectl get -o wide` adds.

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use weir_api::Resource;

use crate::meta;
use crate::rest::partial_metadata;

/// (column name, type, priority)
type Column = (&'static str, &'static str, u8);

fn columns(res: &Resource) -> &'static [Column] {
    match (res.group, res.kind) {
        ("", "Pod") => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        ("", "Node") => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        ("", "Service") => &[
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ],
        ("", "Namespace") => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Age", "string", 0),
        ],
        ("", "ConfigMap") => &[
            ("Name", "string", 0),
            ("Data", "integer", 0),
            ("Age", "string", 0),
        ],
        ("", "Secret") => &[
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Data", "integer", 0),
            ("Age", "string", 0),
        ],
        ("", "Event") => &[
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        ("apps", "Deployment") => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("apps", "ReplicaSet") => &[
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("networking.k8s.io", "Ingress") => &[
            ("Name", "string", 0),
            ("Class", "string", 0),
            ("Hosts", "string", 0),
            ("Address", "string", 0),
            ("Ports", "string", 0),
            ("Age", "string", 0),
        ],
        ("networking.k8s.io", "IngressClass") => &[
            ("Name", "string", 0),
            ("Controller", "string", 0),
            ("Parameters", "string", 0),
            ("Age", "string", 0),
        ],
        ("discovery.k8s.io", "EndpointSlice") => &[
            ("Name", "string", 0),
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        ("coordination.k8s.io", "Lease") => &[
            ("Name", "string", 0),
            ("Holder", "string", 0),
            ("Age", "string", 0),
        ],
        _ => &[("Name", "string", 0), ("Age", "string", 0)],
    }
}

/// A Table of `items` (all of resource `res`), with the list's `resourceVersion` and
/// `continue` token.
pub fn table(res: &Resource, items: &[Value], rv: &str, cont: Option<&str>) -> Value {
    let defs: Vec<Value> = columns(res)
        .iter()
        .map(|(name, ty, priority)| {
            let mut d = json!({
                "name": name,
                "type": ty,
                "format": if *name == "Name" { "name" } else { "" },
                "description": "",
                "priority": priority,
            });
            if *name == "Name" {
                d["description"] = json!("Name must be unique within a namespace.");
            }
            d
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|obj| json!({"cells": cells(res, obj), "object": partial_metadata(obj)}))
        .collect();
    let mut metadata = json!({});
    if !rv.is_empty() {
        metadata["resourceVersion"] = json!(rv);
    }
    if let Some(c) = cont.filter(|c| !c.is_empty()) {
        metadata["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn age(obj: &Value) -> String {
    meta::meta_str(obj, "creationTimestamp")
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map(|t| human_duration(crate::meta::timestamp_now().as_second() - t.as_second()))
        .unwrap_or_else(|| "<unknown>".into())
}

/// kubectl's short durations (`apimachinery/pkg/util/duration.HumanDuration`).
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (minutes, hours) = (secs / 60, secs / 3600);
    let days = hours / 24;
    if secs < 120 {
        format!("{secs}s")
    } else if minutes < 10 {
        match secs % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if hours < 24 * 365 * 2 {
        format!("{days}d")
    } else if hours < 24 * 365 * 8 {
        match days % 365 {
            0 => format!("{}y", days / 365),
            d => format!("{}y{d}d", days / 365),
        }
    } else {
        format!("{}y", days / 365)
    }
}

fn join<'a>(items: impl Iterator<Item = &'a str>, sep: &str) -> String {
    items
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(sep)
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn map_selector(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn cells(res: &Resource, obj: &Value) -> Vec<Value> {
    let name = json!(meta::name(obj));
    let spec = &obj["spec"];
    let status = &obj["status"];
    match (res.group, res.kind) {
        ("", "Pod") => {
            let containers = arr(&spec["containers"]).len();
            let statuses = arr(&status["containerStatuses"]);
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses.iter().map(|c| int(&c["restartCount"])).sum();
            let waiting = statuses
                .iter()
                .find_map(|c| c["state"]["waiting"]["reason"].as_str())
                .or_else(|| {
                    statuses
                        .iter()
                        .find_map(|c| c["state"]["terminated"]["reason"].as_str())
                });
            let mut phase = s(&status["reason"]).to_string();
            if phase.is_empty() {
                phase = waiting.unwrap_or(s(&status["phase"])).to_string();
            }
            if meta::meta_str(obj, "deletionTimestamp").is_some() {
                phase = "Terminating".into();
            }
            vec![
                name,
                json!(format!("{ready}/{containers}")),
                json!(none_if_empty(phase)),
                json!(restarts.to_string()),
                json!(age(obj)),
                json!(none_if_empty(s(&status["podIP"]).into())),
                json!(none_if_empty(s(&spec["nodeName"]).into())),
                json!("<none>"),
                json!("<none>"),
            ]
        }
        ("", "Node") => {
            let ready = arr(&status["conditions"])
                .iter()
                .find(|c| c["type"] == "Ready")
                .map(|c| match s(&c["status"]) {
                    "True" => "Ready",
                    "False" => "NotReady",
                    _ => "Unknown",
                })
                .unwrap_or("Unknown");
            let mut st = ready.to_string();
            if spec["unschedulable"] == true {
                st.push_str(",SchedulingDisabled");
            }
            let roles = meta::metadata(obj)
                .and_then(|m| m.get("labels"))
                .and_then(Value::as_object)
                .map(|l| {
                    join(
                        l.keys()
                            .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/")),
                        ",",
                    )
                })
                .unwrap_or_default();
            let addr = |ty: &str| {
                none_if_empty(join(
                    arr(&status["addresses"])
                        .iter()
                        .filter(|a| a["type"] == ty)
                        .map(|a| s(&a["address"])),
                    ",",
                ))
            };
            let info = &status["nodeInfo"];
            vec![
                name,
                json!(st),
                json!(none_if_empty(roles)),
                json!(age(obj)),
                json!(s(&info["kubeletVersion"])),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(none_if_empty(s(&info["osImage"]).into())),
                json!(none_if_empty(s(&info["kernelVersion"]).into())),
                json!(none_if_empty(s(&info["containerRuntimeVersion"]).into())),
            ]
        }
        ("", "Service") => {
            let ty = s(&spec["type"]);
            let external = match ty {
                "ExternalName" => s(&spec["externalName"]).to_string(),
                "LoadBalancer" => {
                    let ips = join(
                        arr(&status["loadBalancer"]["ingress"])
                            .iter()
                            .map(|i| i["ip"].as_str().unwrap_or(s(&i["hostname"]))),
                        ",",
                    );
                    if ips.is_empty() {
                        "<pending>".into()
                    } else {
                        ips
                    }
                }
                _ => join(arr(&spec["externalIPs"]).iter().map(s), ","),
            };
            let ports = join(
                arr(&spec["ports"])
                    .iter()
                    .map(|p| {
                        let proto = p["protocol"].as_str().unwrap_or("TCP");
                        match p["nodePort"].as_i64() {
                            Some(np) => format!("{}:{np}/{proto}", int(&p["port"])),
                            None => format!("{}/{proto}", int(&p["port"])),
                        }
                    })
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str),
                ",",
            );
            vec![
                name,
                json!(ty),
                json!(none_if_empty(s(&spec["clusterIP"]).into())),
                json!(none_if_empty(external)),
                json!(none_if_empty(ports)),
                json!(age(obj)),
                json!(none_if_empty(map_selector(&spec["selector"]))),
            ]
        }
        ("", "Namespace") => vec![name, json!(s(&status["phase"])), json!(age(obj))],
        ("", "ConfigMap") => {
            let n = obj["data"].as_object().map_or(0, |m| m.len())
                + obj["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, json!(n), json!(age(obj))]
        }
        ("", "Secret") => {
            let n = obj["data"].as_object().map_or(0, |m| m.len());
            vec![name, json!(s(&obj["type"])), json!(n), json!(age(obj))]
        }
        ("", "Event") => {
            let last = obj["lastTimestamp"]
                .as_str()
                .or(obj["eventTime"].as_str())
                .and_then(|t| t.parse::<Timestamp>().ok())
                .map(|t| human_duration(crate::meta::timestamp_now().as_second() - t.as_second()))
                .unwrap_or_else(|| "<unknown>".into());
            let involved = &obj["involvedObject"];
            vec![
                json!(last),
                json!(s(&obj["type"])),
                json!(s(&obj["reason"])),
                json!(format!(
                    "{}/{}",
                    s(&involved["kind"]).to_ascii_lowercase(),
                    s(&involved["name"])
                )),
                json!(s(&obj["message"])),
            ]
        }
        ("apps", "Deployment") | ("apps", "ReplicaSet") => {
            let containers = arr(&spec["template"]["spec"]["containers"]);
            let names = json!(join(containers.iter().map(|c| s(&c["name"])), ","));
            let images = json!(join(containers.iter().map(|c| s(&c["image"])), ","));
            let selector = meta::selector_string(&spec["selector"]);
            let desired = spec["replicas"].as_i64().unwrap_or(1);
            let ready = int(&status["readyReplicas"]);
            if res.kind == "Deployment" {
                vec![
                    name,
                    json!(format!("{ready}/{desired}")),
                    json!(int(&status["updatedReplicas"])),
                    json!(int(&status["availableReplicas"])),
                    json!(age(obj)),
                    names,
                    images,
                    json!(none_if_empty(selector)),
                ]
            } else {
                vec![
                    name,
                    json!(desired),
                    json!(int(&status["replicas"])),
                    json!(ready),
                    json!(age(obj)),
                    names,
                    images,
                    json!(none_if_empty(selector)),
                ]
            }
        }
        ("networking.k8s.io", "Ingress") => {
            let hosts = join(arr(&spec["rules"]).iter().map(|r| s(&r["host"])), ",");
            let address = join(
                arr(&status["loadBalancer"]["ingress"])
                    .iter()
                    .map(|i| i["ip"].as_str().unwrap_or(s(&i["hostname"]))),
                ",",
            );
            let ports = if arr(&spec["tls"]).is_empty() {
                "80"
            } else {
                "80, 443"
            };
            vec![
                name,
                json!(none_if_empty(s(&spec["ingressClassName"]).into())),
                json!(if hosts.is_empty() { "*".into() } else { hosts }),
                json!(address),
                json!(ports),
                json!(age(obj)),
            ]
        }
        ("networking.k8s.io", "IngressClass") => {
            let params = &spec["parameters"];
            let p = if params.is_object() {
                format!("{}/{}", s(&params["kind"]), s(&params["name"]))
            } else {
                "<none>".into()
            };
            vec![
                name,
                json!(s(&spec["controller"])),
                json!(p),
                json!(age(obj)),
            ]
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            let ports = join(
                arr(&obj["ports"])
                    .iter()
                    .map(|p| int(&p["port"]).to_string())
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str),
                ",",
            );
            let addrs: Vec<&str> = arr(&obj["endpoints"])
                .iter()
                .flat_map(|e| arr(&e["addresses"]).iter().map(s))
                .collect();
            let mut shown = addrs.iter().take(3).copied().collect::<Vec<_>>().join(",");
            if addrs.len() > 3 {
                shown.push_str(&format!(" + {} more...", addrs.len() - 3));
            }
            vec![
                name,
                json!(s(&obj["addressType"])),
                json!(none_if_empty(ports)),
                json!(none_if_empty(shown)),
                json!(age(obj)),
            ]
        }
        ("coordination.k8s.io", "Lease") => vec![
            name,
            json!(none_if_empty(s(&spec["holderIdentity"]).into())),
            json!(age(obj)),
        ],
        _ => vec![name, json!(age(obj))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_api::registry::find_by_name;

    #[test]
    fn durations_read_like_kubectl() {
        for (secs, want) in [
            (5, "5s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (10 * 3600, "10h"),
            (3 * 86400 + 3600, "3d1h"),
            (30 * 86400, "30d"),
            (3 * 365 * 86400, "3y"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn service_rows_show_ports_and_selector() {
        let svc = json!({"metadata": {"name": "web", "creationTimestamp": meta::now()},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.9", "selector": {"app": "web"},
              "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}});
        let t = table(find_by_name("svc").expect("svc"), &[svc], "5", None);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(
            cells,
            &json!([
                "web",
                "NodePort",
                "10.96.0.9",
                "<none>",
                "80:30080/TCP,53/UDP",
                "0s",
                "app=web"
            ])
        );
        assert_eq!(t["columnDefinitions"][6]["priority"], 1);
        assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "web");
        assert_eq!(t["metadata"]["resourceVersion"], "5");
    }

    #[test]
    fn pod_rows_count_ready_containers() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{}, {}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.244.0.5", "containerStatuses": [
                {"ready": true, "restartCount": 1}, {"ready": false, "restartCount": 2}]}});
        let t = table(find_by_name("po").expect("po"), &[pod], "", None);
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "p",
                "1/2",
                "Running",
                "3",
                "<unknown>",
                "10.244.0.5",
                "n1",
                "<none>",
                "<none>"
            ])
        );
    }
}
