//! Builders of Node and Pod objects for the unit tests.

use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};

use crate::podinfo::PodInfo;
use crate::snapshot::NodeInfo;

/// A Ready node with `cpu` and `memory` allocatable, 110 pods, and extra fields merged in.
pub fn node(name: &str, cpu: &str, memory: &str, extra: Value) -> NodeInfo {
    let mut v = json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    });
    merge(&mut v, extra);
    let n: Node = serde_json::from_value(v).expect("node json");
    NodeInfo::from_node(&n).expect("node info")
}

/// A pod `name` with one container requesting `cpu`/`memory` (empty = no request), and
/// extra fields merged in.
pub fn pod(name: &str, cpu: &str, memory: &str, extra: Value) -> PodInfo {
    let mut requests = serde_json::Map::new();
    if !cpu.is_empty() {
        requests.insert("cpu".into(), json!(cpu));
    }
    if !memory.is_empty() {
        requests.insert("memory".into(), json!(memory));
    }
    let mut v = json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "c", "resources": {"requests": requests}}]}
    });
    merge(&mut v, extra);
    let p: Pod = serde_json::from_value(v).expect("pod json");
    PodInfo::from_pod(&p).expect("pod info")
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}
