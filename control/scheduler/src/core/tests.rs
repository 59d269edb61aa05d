use serde_json::json;

use super::*;
use crate::testutil::{node, pod};

fn scheduler(nodes: Vec<crate::snapshot::NodeInfo>) -> Scheduler {
    let mut s = Scheduler::new(Config::default());
    for n in nodes {
        s.snapshot.upsert_node(n);
    }
    s
}

fn owned(name: &str, owner: &str, extra: serde_json::Value) -> crate::PodInfo {
    let mut p = pod(name, "100m", "64Mi", extra);
    p.owner = Some(owner.into());
    p
}

#[test]
fn unschedulable_message_reads_like_kube_scheduler() {
    let mut s = scheduler(vec![
        node(
            "big",
            "1",
            "4Gi",
            json!({"metadata": {"labels": {"disk": "ssd"}}}),
        ),
        node("b", "8", "4Gi", json!({})),
        node("c", "8", "4Gi", json!({})),
    ]);
    let p = pod(
        "p",
        "2",
        "1Gi",
        json!({"spec": {"nodeSelector": {"disk": "ssd"}}}),
    );
    let err = s.schedule(&p).expect_err("fits nowhere");
    assert_eq!(
        err.to_string(),
        "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."
    );
    assert!(!s.snapshot.has_pod(&p.uid), "a failed pod is not assumed");
    let none = scheduler(vec![]).schedule(&p).expect_err("no nodes");
    assert_eq!(none.to_string(), "no nodes available to schedule pods");
}

#[test]
fn assumed_pods_use_up_the_node_and_forgetting_frees_it() {
    let mut s = scheduler(vec![node("a", "1", "1Gi", json!({}))]);
    let first = pod("p1", "600m", "", json!({}));
    assert_eq!(s.schedule(&first).as_deref(), Ok("a"));
    let second = pod("p2", "600m", "", json!({}));
    assert_eq!(
        s.schedule(&second).map_err(|e| e.to_string()),
        Err("0/1 nodes are available: 1 Insufficient cpu.".into())
    );
    s.snapshot.remove_pod(&first.uid);
    assert_eq!(s.schedule(&second).as_deref(), Ok("a"));
}

#[test]
fn least_allocated_picks_the_emptier_node() {
    let mut s = scheduler(vec![
        node("a", "4", "4Gi", json!({})),
        node("b", "4", "4Gi", json!({})),
    ]);
    s.snapshot.add_pod(&pod("big", "3", "3Gi", json!({})), "a");
    assert_eq!(
        s.schedule(&pod("p", "100m", "100Mi", json!({}))).as_deref(),
        Ok("b")
    );
}

#[test]
fn pods_of_one_owner_spread_across_nodes() {
    let mut s = scheduler(
        (0..3)
            .map(|i| node(&format!("n{i}"), "8", "8Gi", json!({})))
            .collect(),
    );
    // Make n0 the emptiest by resources so spreading, not allocation, drives the choice.
    for i in 1..3 {
        s.snapshot.add_pod(
            &pod(&format!("other{i}"), "10m", "1Mi", json!({})),
            &format!("n{i}"),
        );
    }
    let mut placed: Vec<String> = (0..3)
        .map(|i| {
            s.schedule(&owned(&format!("r{i}"), "rs-1", json!({})))
                .expect("fits")
        })
        .collect();
    placed.sort();
    assert_eq!(placed, ["n0", "n1", "n2"]);
}

#[test]
fn required_anti_affinity_on_hostname_keeps_replicas_apart_and_then_refuses() {
    let mut s = scheduler(vec![
        node("a", "8", "8Gi", json!({})),
        node("b", "8", "8Gi", json!({})),
    ]);
    let anti = |name: &str| {
        pod(
            name,
            "100m",
            "",
            json!({
            "metadata": {"labels": {"app": "db"}},
            "spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "kubernetes.io/hostname"}]}}}}),
        )
    };
    let a = s.schedule(&anti("db0")).expect("first");
    let b = s.schedule(&anti("db1")).expect("second");
    assert_ne!(a, b);
    let err = s.schedule(&anti("db2")).expect_err("no third node");
    assert_eq!(
        err.to_string(),
        "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules."
    );
    // Symmetry: a pod without rules of its own but matched by existing pods' anti-affinity.
    let plain_db = pod(
        "x",
        "100m",
        "",
        json!({"metadata": {"labels": {"app": "db"}}}),
    );
    assert_eq!(
        s.schedule(&plain_db).map_err(|e| e.to_string()),
        Err(
            "0/2 nodes are available: 2 node(s) didn't satisfy existing pods anti-affinity rules."
                .into()
        )
    );
    // A pod in another namespace is not matched by the default (own-namespace) terms.
    let mut other_ns = plain_db.clone();
    other_ns.namespace = "other".into();
    assert!(s.schedule(&other_ns).is_ok());
}

#[test]
fn required_affinity_follows_matching_pods_and_lets_the_first_one_in() {
    let mut s = scheduler(
        (0..3)
            .map(|i| node(&format!("n{i}"), "8", "8Gi", json!({})))
            .collect(),
    );
    let with_cache = |name: &str| {
        pod(
            name,
            "100m",
            "",
            json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}]}}}}),
        )
    };
    assert_eq!(
        s.schedule(&with_cache("w0")).map_err(|e| e.to_string()),
        Err("0/3 nodes are available: 3 node(s) didn't match pod affinity rules.".into())
    );
    s.snapshot.add_pod(
        &pod(
            "cache",
            "",
            "",
            json!({"metadata": {"labels": {"app": "cache"}}}),
        ),
        "n2",
    );
    assert_eq!(s.schedule(&with_cache("w1")).as_deref(), Ok("n2"));
    // A pod matching its own affinity term may start a group anywhere.
    let mut s = scheduler(vec![node("a", "8", "8Gi", json!({}))]);
    let selfish = pod(
        "g",
        "",
        "",
        json!({
        "metadata": {"labels": {"app": "grp"}},
        "spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["grp"]}]},
             "topologyKey": "kubernetes.io/hostname"}]}}}}),
    );
    assert_eq!(s.schedule(&selfish).as_deref(), Ok("a"));
}

#[test]
fn preferred_affinities_steer_the_choice() {
    let mut s = scheduler(vec![
        node("a", "8", "8Gi", json!({})),
        node(
            "b",
            "8",
            "8Gi",
            json!({"metadata": {"labels": {"disk": "ssd"}}}),
        ),
    ]);
    let pref = pod(
        "p",
        "100m",
        "",
        json!({"spec": {"affinity": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}}]}}}}),
    );
    assert_eq!(s.select(&pref).as_deref(), Ok("b"));

    s.snapshot.add_pod(
        &pod(
            "cache",
            "",
            "",
            json!({"metadata": {"labels": {"app": "cache"}}}),
        ),
        "a",
    );
    let near = pod(
        "q",
        "100m",
        "",
        json!({"spec": {"affinity": {"podAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}}]}}}}),
    );
    assert_eq!(s.select(&near).as_deref(), Ok("a"));
    let far = pod(
        "r",
        "100m",
        "",
        json!({"spec": {"affinity": {"podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}}]}}}}),
    );
    assert_eq!(s.select(&far).as_deref(), Ok("b"));
}

#[test]
fn cordoned_not_ready_and_deleted_nodes_are_skipped() {
    let mut s = scheduler(vec![
        node(
            "cordoned",
            "8",
            "8Gi",
            json!({"spec": {"unschedulable": true}}),
        ),
        node(
            "sick",
            "8",
            "8Gi",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        node("gone", "8", "8Gi", json!({})),
    ]);
    s.snapshot.remove_node("gone");
    assert_eq!(
        s.schedule(&pod("p", "", "", json!({}))).map_err(|e| e.to_string()),
        Err("0/2 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, 1 node(s) were unschedulable.".into())
    );
    s.snapshot.upsert_node(node("gone", "8", "8Gi", json!({})));
    assert_eq!(
        s.schedule(&pod("p", "", "", json!({}))).as_deref(),
        Ok("gone")
    );
}

#[test]
fn large_clusters_score_an_adaptive_share_of_nodes_like_kube_scheduler() {
    let s = Scheduler::new(Config::default());
    assert_eq!(s.feasible_nodes_to_find(50), 50);
    assert_eq!(s.feasible_nodes_to_find(1000), 420);
    assert_eq!(s.feasible_nodes_to_find(5000), 500);
    assert_eq!(s.feasible_nodes_to_find(100_000), 5000);
    let all = Scheduler::new(Config {
        percentage_of_nodes_to_score: 100,
    });
    assert_eq!(all.feasible_nodes_to_find(5000), 5000);
}

#[test]
fn rebinding_a_pod_moves_its_accounting() {
    let mut s = scheduler(vec![
        node("a", "1", "1Gi", json!({})),
        node("b", "1", "1Gi", json!({})),
    ]);
    let p = pod("p", "500m", "", json!({}));
    s.snapshot.add_pod(&p, "a");
    s.snapshot.add_pod(&p, "b");
    assert_eq!(s.snapshot.node(0).requested.milli_cpu, 0);
    assert_eq!(s.snapshot.node(1).requested.milli_cpu, 500);
    assert_eq!(s.snapshot.pod_node(&p.uid), Some("b"));
}

#[test]
fn only_changes_a_filter_reads_count_as_node_changes() {
    let mut s = scheduler(vec![]);
    assert!(
        s.snapshot.upsert_node(node("a", "1", "1Gi", json!({}))),
        "new"
    );
    let heartbeat = json!({"status": {"conditions": [{"type": "Ready", "status": "True",
        "lastHeartbeatTime": "2026-01-01T00:00:10Z"}]}});
    assert!(!s.snapshot.upsert_node(node("a", "1", "1Gi", heartbeat)));
    let labelled = json!({"metadata": {"labels": {"disk": "ssd"}}});
    assert!(s.snapshot.upsert_node(node("a", "1", "1Gi", labelled)));
    assert!(s.snapshot.upsert_node(node("a", "2", "1Gi", json!({}))));
    let not_ready = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    assert!(s.snapshot.upsert_node(node("a", "2", "1Gi", not_ready)));
    s.snapshot.remove_node("a");
    assert!(
        s.snapshot.upsert_node(node("a", "2", "1Gi", json!({}))),
        "back"
    );
}
