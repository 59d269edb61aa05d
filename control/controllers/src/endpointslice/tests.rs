use std::sync::Arc;

use serde_json::{Value, json};

use super::*;

fn svc(extra: Value) -> Service {
    let mut v = json!({
        "metadata": {"name": "web", "namespace": "default", "uid": "svc-uid"},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                           {"name": "metrics", "port": 9090, "targetPort": 9090}]}
    });
    merge(&mut v, extra);
    serde_json::from_value(v).expect("service")
}

fn pod(name: &str, ip: &str, http_port: i32, extra: Value) -> Arc<Pod> {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": http_port}]}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True"}]}
    });
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

/// Apply a plan to a set of slices, as the API server would.
fn apply(existing: &mut Vec<Arc<EndpointSlice>>, plan: Plan) {
    existing.retain(|s| !plan.delete.contains(&s.name_any()));
    for s in plan.update {
        let i = existing
            .iter()
            .position(|e| e.name_any() == s.name_any())
            .expect("updated slice exists");
        existing[i] = Arc::new(s);
    }
    existing.extend(plan.create.into_iter().map(Arc::new));
}

fn names(slices: &[Arc<EndpointSlice>]) -> HashSet<String> {
    slices.iter().map(|s| s.name_any()).collect()
}

fn conditions(e: &Endpoint) -> (bool, bool, bool) {
    let c = e.conditions.clone().unwrap_or_default();
    (
        c.ready.unwrap_or(false),
        c.serving.unwrap_or(false),
        c.terminating.unwrap_or(false),
    )
}

#[test]
fn endpoints_carry_address_node_target_and_conditions() {
    let s = svc(json!({}));
    let ready = pod("a", "10.244.0.5", 8080, json!({}));
    let e = pod_endpoint(&s, &ready).expect("endpoint");
    assert_eq!(e.addresses, ["10.244.0.5"]);
    assert_eq!(e.node_name.as_deref(), Some("node-a"));
    let target = e.target_ref.clone().expect("targetRef");
    assert_eq!(
        (target.kind.as_deref(), target.name.as_deref()),
        (Some("Pod"), Some("a"))
    );
    assert_eq!(conditions(&e), (true, true, false));

    let not_ready = pod(
        "b",
        "10.244.0.6",
        8080,
        json!({"status": {"conditions": [
        {"type": "Ready", "status": "False"}]}}),
    );
    assert_eq!(
        conditions(&pod_endpoint(&s, &not_ready).expect("endpoint")),
        (false, false, false)
    );

    let terminating = pod(
        "c",
        "10.244.0.7",
        8080,
        json!({"metadata": {
        "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    );
    assert_eq!(
        conditions(&pod_endpoint(&s, &terminating).expect("kept")),
        (false, false, true)
    );

    let publish = svc(json!({"spec": {"publishNotReadyAddresses": true}}));
    assert_eq!(
        conditions(&pod_endpoint(&publish, &not_ready).expect("endpoint")),
        (true, true, false)
    );

    let no_ip = pod("d", "", 8080, json!({}));
    assert!(pod_endpoint(&s, &no_ip).is_none());
    let done = pod(
        "e",
        "10.244.0.8",
        8080,
        json!({"status": {"phase": "Succeeded"}}),
    );
    assert!(pod_endpoint(&s, &done).is_none());
}

#[test]
fn named_target_ports_resolve_per_pod_into_separate_slices() {
    let s = svc(json!({}));
    let pods = vec![
        pod("a", "10.244.0.5", 8080, json!({})),
        pod("b", "10.244.0.6", 8081, json!({})),
        pod("c", "10.244.0.7", 8080, json!({})),
    ];
    let plan = plan(&s, &pods, &[], &HashSet::new());
    assert_eq!(plan.create.len(), 2);
    let by_port: BTreeMap<i32, usize> = plan
        .create
        .iter()
        .map(|sl| {
            let http = sl
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some("http"));
            (
                http.and_then(|p| p.port).unwrap_or_default(),
                sl.endpoints.len(),
            )
        })
        .collect();
    assert_eq!(by_port, BTreeMap::from([(8080, 2), (8081, 1)]));
    // A pod that does not declare the named port serves only the numeric one.
    let bare = pod(
        "d",
        "10.244.0.9",
        0,
        json!({"spec": {"containers": [{"name": "c"}]}}),
    );
    let ports = pod_ports(
        s.spec
            .as_ref()
            .and_then(|sp| sp.ports.as_deref())
            .unwrap_or_default(),
        &bare,
    );
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, Some(9090));
    let first = &plan.create[0];
    assert_eq!(first.address_type, "IPv4");
    let labels = first.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(LABEL_SERVICE_NAME).map(String::as_str),
        Some("web")
    );
    assert_eq!(
        labels.get(LABEL_MANAGED_BY).map(String::as_str),
        Some(MANAGED_BY)
    );
    let owner = &first.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Service", "svc-uid")
    );
}

#[test]
fn at_most_100_endpoints_per_slice_and_endpoints_stay_put() {
    let s = svc(json!({}));
    let mut pods: Vec<Arc<Pod>> = (0..250)
        .map(|i| {
            pod(
                &format!("p{i:03}"),
                &format!("10.244.{}.{}", i / 200, i % 200 + 1),
                8080,
                json!({}),
            )
        })
        .collect();
    let mut slices = Vec::new();
    apply(&mut slices, plan(&s, &pods, &[], &HashSet::new()));
    let mut sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
    sizes.sort();
    assert_eq!(sizes, [50, 100, 100]);

    // Nothing changed: nothing to write.
    assert_eq!(plan(&s, &pods, &slices, &names(&slices)), Plan::default());

    // One pod gone, one pod added: the freed place is reused, no slice is created.
    pods.remove(10);
    pods.push(pod("new", "10.244.9.9", 8080, json!({})));
    let p = plan(&s, &pods, &slices, &names(&slices));
    assert!(p.create.is_empty() && p.delete.is_empty(), "{p:?}");
    assert!(p.update.len() <= 2, "only the touched slices are rewritten");
    apply(&mut slices, p);
    let total: usize = slices.iter().map(|s| s.endpoints.len()).sum();
    assert_eq!(total, 250);
    assert!(
        slices
            .iter()
            .all(|s| s.endpoints.len() <= MAX_ENDPOINTS_PER_SLICE)
    );
}

#[test]
fn a_service_without_endpoints_keeps_one_empty_slice() {
    let s = svc(json!({}));
    let pods = vec![
        pod("a", "10.244.0.5", 8080, json!({})),
        pod("b", "10.244.0.6", 8081, json!({})),
    ];
    let mut slices = Vec::new();
    apply(&mut slices, plan(&s, &pods, &[], &HashSet::new()));
    assert_eq!(slices.len(), 2);
    let p = plan(&s, &[], &slices, &names(&slices));
    apply(&mut slices, p);
    assert_eq!(slices.len(), 1);
    assert!(slices[0].endpoints.is_empty());
    assert_eq!(plan(&s, &[], &slices, &names(&slices)), Plan::default());
    // From nothing at all, a placeholder is created.
    let p = plan(&s, &[], &[], &HashSet::new());
    assert_eq!(p.create.len(), 1);
    assert!(p.create[0].endpoints.is_empty());
}

#[test]
fn new_slice_names_avoid_every_name_in_the_namespace() {
    let s = svc(json!({}));
    let taken = HashSet::from(["web-0".to_string(), "web-1".to_string()]);
    let p = plan(&s, &[pod("a", "10.244.0.5", 8080, json!({}))], &[], &taken);
    assert_eq!(p.create[0].name_any(), "web-2");
}

#[test]
fn terminating_pods_stay_until_gone() {
    let s = svc(json!({}));
    let mut slices = Vec::new();
    apply(
        &mut slices,
        plan(
            &s,
            &[pod("a", "10.244.0.5", 8080, json!({}))],
            &[],
            &HashSet::new(),
        ),
    );
    let terminating = pod(
        "a",
        "10.244.0.5",
        8080,
        json!({"metadata": {
        "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
    );
    let p = plan(&s, &[terminating], &slices, &names(&slices));
    assert_eq!(p.update.len(), 1);
    apply(&mut slices, p);
    assert_eq!(conditions(&slices[0].endpoints[0]), (false, false, true));
    let p = plan(&s, &[], &slices, &names(&slices));
    apply(&mut slices, p);
    assert!(slices[0].endpoints.is_empty());
}
