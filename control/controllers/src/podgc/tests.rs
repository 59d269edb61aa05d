use serde_json::{Value, json};

use super::*;

fn pod(name: &str, node: Option<&str>, extra: Value) -> Arc<Pod> {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "default", "uid": name,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [], "nodeName": node},
        "status": {"phase": "Running"},
    });
    merge(&mut v, extra);
    Arc::new(serde_json::from_value(v).expect("pod"))
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

fn node(name: &str, ready: &str, taints: Value) -> Arc<Node> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }))
        .expect("node"),
    )
}

fn names(plan: &[(Arc<Pod>, Reason)]) -> Vec<(String, Reason)> {
    plan.iter().map(|(p, r)| (p.name_any(), *r)).collect()
}

const DELETING: &str = "2026-01-01T00:01:00Z";

#[test]
fn pods_of_a_confirmed_gone_node_are_collected_and_missing_ones_are_reported() {
    let nodes = [node("a", "True", json!([]))];
    let lookup = |n: &str| nodes.iter().find(|x| x.name_any() == n).cloned();
    let pods = vec![
        pod("on-a", Some("a"), json!({})),
        pod("on-b", Some("b"), json!({})),
        pod(
            "on-b-done",
            Some("b"),
            json!({"status": {"phase": "Succeeded"}}),
        ),
        pod("on-c", Some("c"), json!({})),
        pod("pending", None, json!({})),
    ];
    let missing = missing_nodes(&pods, lookup);
    assert_eq!(missing, HashSet::from(["b", "c"]));
    // Only "b" has served its quarantine and been confirmed gone.
    let gone = HashSet::from(["b".to_string()]);
    assert_eq!(
        names(&plan(&pods, lookup, &gone, 0)),
        vec![
            ("on-b".into(), Reason::NodeGone),
            ("on-b-done".into(), Reason::NodeGone)
        ]
    );
}

#[test]
fn terminating_pods_go_only_from_a_not_ready_out_of_service_node() {
    let oos =
        json!([{"key": TAINT_OUT_OF_SERVICE, "value": "nodeshutdown", "effect": "NoExecute"}]);
    let nodes = [
        node("down", "Unknown", oos.clone()),
        node("up-tainted", "True", oos),
        node("down-untainted", "False", json!([])),
    ];
    let lookup = |n: &str| nodes.iter().find(|x| x.name_any() == n).cloned();
    let deleting = json!({"metadata": {"deletionTimestamp": DELETING}});
    let pods = vec![
        pod("t-down", Some("down"), deleting.clone()),
        pod("running-down", Some("down"), json!({})),
        pod("t-up", Some("up-tainted"), deleting.clone()),
        pod("t-untainted", Some("down-untainted"), deleting.clone()),
        pod("t-unscheduled", None, deleting),
    ];
    assert_eq!(
        names(&plan(&pods, lookup, &HashSet::new(), 0)),
        vec![
            ("t-down".into(), Reason::OutOfService),
            ("t-unscheduled".into(), Reason::UnscheduledTerminating)
        ]
    );
}

#[test]
fn finished_pods_beyond_the_threshold_go_evicted_first_then_oldest() {
    let nodes = [node("a", "True", json!([]))];
    let lookup = |n: &str| nodes.iter().find(|x| x.name_any() == n).cloned();
    let done = |name: &str, created: &str, extra: Value| {
        let mut e = json!({"metadata": {"creationTimestamp": created},
                           "status": {"phase": "Failed"}});
        merge(&mut e, extra);
        pod(name, Some("a"), e)
    };
    let pods = vec![
        done("new", "2026-01-03T00:00:00Z", json!({})),
        done("old", "2026-01-01T00:00:00Z", json!({})),
        done(
            "evicted-new",
            "2026-01-04T00:00:00Z",
            json!({"status": {"reason": "Evicted"}}),
        ),
        done(
            "mid",
            "2026-01-02T00:00:00Z",
            json!({"status": {"phase": "Succeeded"}}),
        ),
        pod("running", Some("a"), json!({})),
    ];
    assert_eq!(
        names(&plan(&pods, lookup, &HashSet::new(), 2)),
        vec![
            ("evicted-new".into(), Reason::OverThreshold),
            ("old".into(), Reason::OverThreshold)
        ]
    );
    assert!(plan(&pods, lookup, &HashSet::new(), 4).is_empty());
    // 0 disables the threshold, as upstream's flag.
    assert!(plan(&pods, lookup, &HashSet::new(), 0).is_empty());
}

#[test]
fn a_node_is_due_after_its_quarantine_and_forgotten_when_it_returns() {
    let period = Duration::from_secs(40);
    let t0 = Instant::now();
    let mut q = Quarantine::default();
    let missing = HashSet::from(["b"]);
    assert!(q.update(&missing, t0, period).is_empty());
    assert_eq!(q.next_due(period), Some(t0 + period));
    assert!(
        q.update(&missing, t0 + Duration::from_secs(39), period)
            .is_empty()
    );
    assert_eq!(
        q.update(&missing, t0 + period, period),
        vec!["b".to_string()]
    );
    // A live GET found it after all: the quarantine starts over.
    q.restart("b", t0 + period);
    assert!(
        q.update(&missing, t0 + period + Duration::from_secs(1), period)
            .is_empty()
    );
    // Back in the watch: forgotten; missing again later starts from then.
    assert!(
        q.update(&HashSet::new(), t0 + period * 2, period)
            .is_empty()
    );
    assert_eq!(q.next_due(period), None);
    assert!(q.update(&missing, t0 + period * 3, period).is_empty());
}

#[test]
fn only_pod_changes_that_can_matter_wake_a_sweep() {
    let (store, mut writer) = kube::runtime::reflector::store::<Node>();
    writer.apply_watcher_event(&watcher::Event::Apply(
        (*node("a", "True", json!([]))).clone(),
    ));
    let matters = |p: Arc<Pod>| may_matter(&p, &store);
    assert!(!matters(pod("running-on-a", Some("a"), json!({}))));
    assert!(!matters(pod("pending", None, json!({}))));
    assert!(matters(pod("on-missing", Some("b"), json!({}))));
    assert!(matters(pod(
        "done",
        Some("a"),
        json!({"status": {"phase": "Failed"}})
    )));
    assert!(matters(pod(
        "deleting",
        Some("a"),
        json!({"metadata": {"deletionTimestamp": DELETING}})
    )));
}
