use std::sync::Arc;

use serde_json::{Value, json};

use super::*;

fn rs(replicas: i32) -> ReplicaSet {
    serde_json::from_value(json!({
        "metadata": {"name": "web-abc", "namespace": "default", "uid": "rs-uid", "generation": 3},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "weir/echo"}]}}}
    }))
    .expect("rs")
}

fn pod(name: &str, owner: Option<&str>, extra: Value) -> Arc<Pod> {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": {"app": "web"},
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True",
                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    });
    if let Some(uid) = owner {
        v["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "web-abc", "uid": uid, "controller": true}]);
    }
    merge(&mut v, extra);
    Arc::new(serde_json::from_value(v).expect("pod"))
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

fn now() -> Timestamp {
    "2026-01-02T00:00:00Z".parse().expect("time")
}

#[test]
fn creates_missing_pods_and_reports_status() {
    let pods = vec![pod("a", Some("rs-uid"), json!({}))];
    let p = plan(&rs(3), &pods, now()).expect("plan");
    assert_eq!(p.create, 2);
    assert!(p.delete.is_empty() && p.adopt.is_empty());
    assert_eq!(p.status.replicas, 1);
    assert_eq!(p.status.ready_replicas, Some(1));
    assert_eq!(p.status.available_replicas, Some(1));
    assert_eq!(p.status.observed_generation, Some(3));
}

#[test]
fn adopts_matching_orphans_but_not_others_pods() {
    let pods = vec![
        pod("orphan", None, json!({})),
        pod("foreign", Some("other-uid"), json!({})),
        pod(
            "unrelated",
            None,
            json!({"metadata": {"labels": {"app": "db"}}}),
        ),
    ];
    let p = plan(&rs(1), &pods, now()).expect("plan");
    assert_eq!(p.adopt, ["orphan"]);
    assert_eq!(p.create, 0);
}

#[test]
fn deletes_the_most_expendable_pods_first() {
    let pods = vec![
        pod("running-old", Some("rs-uid"), json!({})),
        pod(
            "unscheduled",
            Some("rs-uid"),
            json!({"spec": {"nodeName": null}, "status": {"phase": "Pending", "conditions": []}}),
        ),
        pod(
            "not-ready",
            Some("rs-uid"),
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        pod(
            "running-new",
            Some("rs-uid"),
            json!({"metadata": {"creationTimestamp": "2026-01-01T12:00:00Z"}}),
        ),
    ];
    let p = plan(&rs(1), &pods, now()).expect("plan");
    assert_eq!(p.delete, ["unscheduled", "not-ready", "running-new"]);
    // Status already leaves out the pods being deleted.
    assert_eq!(
        (p.status.replicas, p.status.available_replicas),
        (1, Some(1))
    );
}

#[test]
fn finished_and_terminating_pods_do_not_count() {
    let pods = vec![
        pod(
            "done",
            Some("rs-uid"),
            json!({"status": {"phase": "Failed"}}),
        ),
        pod(
            "going",
            Some("rs-uid"),
            json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
        ),
    ];
    let p = plan(&rs(2), &pods, now()).expect("plan");
    assert_eq!(p.create, 2);
    assert_eq!(p.status.replicas, 0);
}

#[test]
fn min_ready_seconds_gate_availability() {
    let mut set = rs(1);
    if let Some(spec) = set.spec.as_mut() {
        spec.min_ready_seconds = Some(3600);
    }
    let fresh = pod(
        "a",
        Some("rs-uid"),
        json!({"status": {"conditions": [{"type": "Ready",
        "status": "True", "lastTransitionTime": "2026-01-01T23:59:00Z"}]}}),
    );
    let p = plan(&set, &[fresh], now()).expect("plan");
    assert_eq!(
        (p.status.ready_replicas, p.status.available_replicas),
        (Some(1), Some(0))
    );
}

#[test]
fn template_pods_are_owned_and_labelled() {
    let pod = pod_from_template(&rs(1));
    let name = pod.name_any();
    assert!(
        name.starts_with("web-abc-") && name.len() == "web-abc-".len() + 5,
        "{name}"
    );
    assert_eq!(pod.labels().get("app").map(String::as_str), Some("web"));
    let owner = util::controller_of(&pod.metadata).expect("owner");
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ReplicaSet", "rs-uid")
    );
}

#[test]
fn a_bad_selector_is_a_clear_error() {
    let mut set = rs(1);
    if let Some(spec) = set.spec.as_mut() {
        spec.selector.match_expressions = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "app".into(),
                operator: "Near".into(),
                values: None,
            },
        ]);
    }
    let err = plan(&set, &[], now())
        .expect_err("bad operator")
        .to_string();
    assert!(
        err.contains("default/web-abc") && err.contains("spec.selector"),
        "{err}"
    );
}
