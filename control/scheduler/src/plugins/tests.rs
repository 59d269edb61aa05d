use serde_json::json;

use super::*;
use crate::testutil::{node, pod};

#[test]
fn resource_fit_counts_bound_requests_and_reports_every_shortfall() {
    let mut n = node("n1", "1", "1Gi", json!({}));
    let p = pod("p", "600m", "600Mi", json!({}));
    assert_eq!(resource_fit(&p, &n), Ok(()));
    n.requested.milli_cpu = 500;
    n.requested.memory = 512 * 1024 * 1024;
    assert_eq!(
        resource_fit(&p, &n),
        Err(vec![
            Reason::Insufficient("cpu"),
            Reason::Insufficient("memory")
        ])
    );
    n.requested = Default::default();
    n.pod_count = 110;
    assert_eq!(resource_fit(&p, &n), Err(vec![Reason::TooManyPods]));
    // A pod that requests nothing fits anywhere there is a pod slot.
    n.pod_count = 0;
    n.requested.milli_cpu = 1000;
    assert_eq!(resource_fit(&pod("q", "", "", json!({})), &n), Ok(()));
}

#[test]
fn taints_need_tolerations_and_not_ready_is_an_implicit_taint() {
    let tainted = node(
        "n1",
        "1",
        "1Gi",
        json!({"spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                                    {"key": "soft", "effect": "PreferNoSchedule"}]}}),
    );
    let plain = pod("p", "", "", json!({}));
    assert_eq!(
        taint_toleration(&plain, &tainted),
        Err(Reason::UntoleratedTaint {
            key: "dedicated".into(),
            value: "gpu".into()
        })
    );
    assert_eq!(
        Reason::UntoleratedTaint {
            key: "dedicated".into(),
            value: "gpu".into()
        }
        .to_string(),
        "node(s) had untolerated taint {dedicated: gpu}"
    );
    let equal = pod(
        "p",
        "",
        "",
        json!({"spec": {"tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}}),
    );
    assert_eq!(taint_toleration(&equal, &tainted), Ok(()));
    let wrong_value = pod(
        "p",
        "",
        "",
        json!({"spec": {"tolerations": [
        {"key": "dedicated", "value": "cpu"}]}}),
    );
    assert!(taint_toleration(&wrong_value, &tainted).is_err());
    let exists_all = pod(
        "p",
        "",
        "",
        json!({"spec": {"tolerations": [{"operator": "Exists"}]}}),
    );
    assert_eq!(taint_toleration(&exists_all, &tainted), Ok(()));
    let wrong_effect = pod(
        "p",
        "",
        "",
        json!({"spec": {"tolerations": [
        {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}]}}),
    );
    assert!(taint_toleration(&wrong_effect, &tainted).is_err());

    let not_ready = node(
        "n2",
        "1",
        "1Gi",
        json!({"status": {"conditions": [
        {"type": "Ready", "status": "Unknown"}]}}),
    );
    assert_eq!(
        taint_toleration(&plain, &not_ready).map_err(|r| r.to_string()),
        Err("node(s) had untolerated taint {node.kubernetes.io/not-ready: }".into())
    );
    let tolerant = pod(
        "p",
        "",
        "",
        json!({"spec": {"tolerations": [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists"}]}}),
    );
    assert_eq!(taint_toleration(&tolerant, &not_ready), Ok(()));
}

#[test]
fn cordoned_nodes_take_only_pods_tolerating_unschedulable() {
    let n = node("n1", "1", "1Gi", json!({"spec": {"unschedulable": true}}));
    assert_eq!(
        node_unschedulable(&pod("p", "", "", json!({})), &n),
        Err(Reason::Unschedulable)
    );
    let tolerant = pod(
        "p",
        "",
        "",
        json!({"spec": {"tolerations": [
        {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]}}),
    );
    assert_eq!(node_unschedulable(&tolerant, &n), Ok(()));
}

#[test]
fn node_name_and_selector_and_required_affinity() {
    let n = node(
        "n1",
        "1",
        "1Gi",
        json!({"metadata": {"labels": {"disk": "ssd", "gen": "5"}}}),
    );
    assert_eq!(
        node_name(&pod("p", "", "", json!({"spec": {"nodeName": "n2"}})), &n),
        Err(Reason::NodeName)
    );
    assert_eq!(
        node_name(&pod("p", "", "", json!({"spec": {"nodeName": "n1"}})), &n),
        Ok(())
    );

    let sel = |s: serde_json::Value| pod("p", "", "", json!({"spec": {"nodeSelector": s}}));
    assert_eq!(node_affinity(&sel(json!({"disk": "ssd"})), &n), Ok(()));
    assert_eq!(
        node_affinity(&sel(json!({"disk": "hdd"})), &n),
        Err(Reason::NodeAffinity)
    );

    let req = |exprs: serde_json::Value| {
        pod(
            "p",
            "",
            "",
            json!({"spec": {"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": exprs}}}}}),
        )
    };
    let ok = |p: &PodInfo| node_affinity(p, &n).is_ok();
    assert!(ok(&req(
        json!([{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd", "nvme"]}]}])
    )));
    assert!(!ok(&req(
        json!([{"matchExpressions": [{"key": "disk", "operator": "NotIn", "values": ["ssd"]}]}])
    )));
    assert!(ok(&req(
        json!([{"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}])
    )));
    assert!(ok(&req(
        json!([{"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]}]}])
    )));
    assert!(!ok(&req(
        json!([{"matchExpressions": [{"key": "gen", "operator": "Lt", "values": ["4"]}]}])
    )));
    assert!(ok(&req(
        json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}])
    )));
    // Terms are ORed; an empty term matches nothing.
    assert!(ok(&req(
        json!([{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["hdd"]}]},
                           {"matchExpressions": [{"key": "disk", "operator": "Exists"}]}])
    )));
    assert!(!ok(&req(json!([{}]))));
}

#[test]
fn scores_prefer_free_and_balanced_nodes_and_matching_preferences() {
    let p = pod("p", "100m", "100Mi", json!({}));
    let empty = node("a", "4", "4Gi", json!({}));
    let mut busy = node("b", "4", "4Gi", json!({}));
    busy.nonzero_requested.milli_cpu = 3000;
    assert!(least_allocated(&p, &empty) > least_allocated(&p, &busy));
    assert!(balanced_allocation(&p, &empty) > balanced_allocation(&p, &busy));
    assert!((0..=100).contains(&least_allocated(&p, &busy)));

    let pref = pod(
        "p",
        "",
        "",
        json!({"spec": {"affinity": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 30, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}},
            {"weight": 5, "preference": {"matchExpressions": [{"key": "gen", "operator": "Exists"}]}}]}}}}),
    );
    let ssd = node(
        "c",
        "1",
        "1Gi",
        json!({"metadata": {"labels": {"disk": "ssd", "gen": "1"}}}),
    );
    assert_eq!(preferred_node_affinity(&pref, &ssd), 35);
    assert_eq!(preferred_node_affinity(&pref, &empty), 0);
}

#[test]
fn pod_parse_errors_name_the_field() {
    let bad = serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(json!({
        "metadata": {"name": "p", "uid": "u"},
        "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "lots"}}}]}
    }))
    .expect("pod json");
    let err = PodInfo::from_pod(&bad).expect_err("bad cpu").to_string();
    assert!(
        err.contains("spec.containers[0].resources.requests.cpu"),
        "{err}"
    );
    assert!(err.contains("lots"), "{err}");
}

#[test]
fn requests_take_init_containers_limits_and_defaults_into_account() {
    let p = pod(
        "p",
        "",
        "",
        json!({"spec": {
        "containers": [
            {"name": "a", "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}}},
            {"name": "b", "resources": {"requests": {"cpu": "300m"}}}],
        "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "1", "memory": "1Mi"}}}]}}),
    );
    assert_eq!(p.requests.milli_cpu, 1000);
    assert_eq!(p.requests.memory, 64 * 1024 * 1024);
    // Container b requests no memory: scoring assumes kube-scheduler's 200Mi default for it.
    assert_eq!(p.nonzero_requests.memory, (64 + 200) * 1024 * 1024);
}
