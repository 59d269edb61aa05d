use super::*;
use crate::admission::default;
use crate::registry::find_by_name;

fn res(name: &str) -> &'static Resource {
    find_by_name(name).expect("resource")
}

/// Defaults then validates, as the server does, returning `field: message` lines.
fn problems(kind: &str, mut obj: Value, old: Option<&Value>) -> Vec<String> {
    default(res(kind), &mut obj);
    match validate(res(kind), &obj, old) {
        Ok(()) => Vec::new(),
        Err(causes) => causes.iter().map(Cause::line).collect(),
    }
}

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27",
                                         "ports": [{"containerPort": 80, "name": "http"}]}]}
            }
        }
    })
}

fn service() -> Value {
    json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}
    })
}

#[test]
fn valid_objects_pass() {
    assert_eq!(problems("deploy", deployment(), None), Vec::<String>::new());
    assert_eq!(problems("svc", service(), None), Vec::<String>::new());
    let ing = json!({"metadata": {"name": "i", "namespace": "default"}, "spec": {"rules": [
        {"host": "*.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix",
          "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}});
    assert_eq!(problems("ing", ing, None), Vec::<String>::new());
    let ns = json!({"metadata": {"name": "team-a"}});
    assert_eq!(problems("ns", ns, None), Vec::<String>::new());
}

#[test]
fn service_port_out_of_range_is_reported_like_kubernetes() {
    let mut svc = service();
    svc["spec"]["ports"][0]["port"] = json!(0);
    assert_eq!(
        problems("svc", svc, None),
        ["spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"]
    );
}

#[test]
fn service_ports_need_unique_names_and_known_protocols() {
    let mut svc = service();
    svc["spec"]["ports"] = json!([
        {"name": "http", "port": 80},
        {"name": "http", "port": 81, "protocol": "ICMP"},
        {"port": 82}
    ]);
    let p = problems("svc", svc, None);
    assert!(
        p.contains(&"spec.ports[1].name: Duplicate value: \"http\"".to_string()),
        "{p:?}"
    );
    assert!(p.contains(&"spec.ports[1].protocol: Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\"".to_string()), "{p:?}");
    assert!(
        p.contains(&"spec.ports[2].name: Required value".to_string()),
        "{p:?}"
    );
}

#[test]
fn service_type_ip_and_node_port_checks() {
    let mut svc = service();
    svc["spec"]["clusterIP"] = json!("10.96.0.300");
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    svc["spec"]["type"] = json!("Weird");
    let p = problems("svc", svc, None);
    assert!(
        p.iter()
            .any(|l| l.starts_with("spec.clusterIP: Invalid value: \"10.96.0.300\"")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("spec.type: Unsupported value: \"Weird\"")),
        "{p:?}"
    );

    let mut svc = service();
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    assert_eq!(
        problems("svc", svc, None),
        ["spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]
    );
    let mut svc = service();
    svc["spec"]["ports"] = json!([]);
    assert_eq!(
        problems("svc", svc.clone(), None),
        ["spec.ports: Required value"]
    );
    svc["spec"]["clusterIP"] = json!("None");
    assert!(
        problems("svc", svc, None).is_empty(),
        "headless without ports is fine"
    );
    let ext =
        json!({"metadata": {"name": "e", "namespace": "d"}, "spec": {"type": "ExternalName"}});
    assert_eq!(
        problems("svc", ext, None),
        ["spec.externalName: Required value"]
    );
}

fn load_balancer_local(health_check_node_port: u16) -> Value {
    let mut svc = service();
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    svc["spec"]["healthCheckNodePort"] = json!(health_check_node_port);
    svc
}

#[test]
fn health_check_node_port_only_for_load_balancer_with_local_policy() {
    let mut svc = load_balancer_local(30999);
    assert_eq!(problems("svc", svc.clone(), None), Vec::<String>::new());
    svc["spec"]["healthCheckNodePort"] = json!(70000);
    assert_eq!(
        problems("svc", svc.clone(), None),
        ["spec.healthCheckNodePort: Invalid value: 70000: must be between 1 and 65535, inclusive"]
    );
    // Unset and 0 both ask the server for one.
    svc["spec"]["healthCheckNodePort"] = json!(0);
    assert_eq!(problems("svc", svc.clone(), None), Vec::<String>::new());

    let only =
        "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'";
    svc["spec"]["healthCheckNodePort"] = json!(30999);
    svc["spec"]["externalTrafficPolicy"] = json!("Cluster");
    assert_eq!(
        problems("svc", svc.clone(), None),
        [format!(
            "spec.healthCheckNodePort: Invalid value: 30999: {only}"
        )]
    );
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    assert_eq!(
        problems("svc", svc, None),
        [format!(
            "spec.healthCheckNodePort: Invalid value: 30999: {only}"
        )]
    );
}

#[test]
fn health_check_node_port_is_immutable_while_load_balancer_local() {
    let old = load_balancer_local(30999);
    let mut new = old.clone();
    new["spec"]["healthCheckNodePort"] = json!(31000);
    assert_eq!(
        problems("svc", new.clone(), Some(&old)),
        ["spec.healthCheckNodePort: Forbidden: field is immutable"]
    );
    // Unset, it is carried over by the server; leaving Local may drop it.
    new["spec"]["healthCheckNodePort"] = json!(0);
    assert_eq!(problems("svc", new, Some(&old)), Vec::<String>::new());
    // Old and new both LoadBalancer + Local only: a Service entering Local may ask for one.
    let mut cluster = old.clone();
    cluster["spec"]["externalTrafficPolicy"] = json!("Cluster");
    cluster["spec"]
        .as_object_mut()
        .map(|s| s.remove("healthCheckNodePort"));
    let mut local = cluster.clone();
    local["spec"]["externalTrafficPolicy"] = json!("Local");
    local["spec"]["healthCheckNodePort"] = json!(31000);
    assert_eq!(problems("svc", local, Some(&cluster)), Vec::<String>::new());
}

#[test]
fn service_cluster_ip_is_immutable() {
    let mut old = service();
    old["spec"]["clusterIP"] = json!("10.96.0.10");
    let mut new = old.clone();
    new["spec"]["clusterIP"] = json!("10.96.0.11");
    assert_eq!(
        problems("svc", new, Some(&old)),
        ["spec.clusterIP: Invalid value: \"10.96.0.11\": field is immutable"]
    );
    let same = old.clone();
    assert!(problems("svc", same, Some(&old)).is_empty());
}

#[test]
fn names_are_checked_per_kind() {
    let mut svc = service();
    svc["metadata"]["name"] = json!("1web");
    let p = problems("svc", svc, None);
    assert!(
        p[0].starts_with("metadata.name: Invalid value: \"1web\": a DNS-1035 label"),
        "{p:?}"
    );
    let mut d = deployment();
    d["metadata"]["name"] = json!("Web_App");
    let p = problems("deploy", d, None);
    assert!(
        p[0].starts_with(
            "metadata.name: Invalid value: \"Web_App\": a lowercase RFC 1123 subdomain"
        ),
        "{p:?}"
    );
    let ns = json!({"metadata": {"name": "a.b"}});
    assert!(problems("ns", ns, None)[0].contains("RFC 1123 label"));
    let mut nameless = service();
    nameless["metadata"] = json!({"namespace": "default"});
    assert_eq!(
        problems("svc", nameless.clone(), None),
        ["metadata.name: Required value: name or generateName is required"]
    );
    nameless["metadata"]["generateName"] = json!("web-");
    assert!(problems("svc", nameless, None).is_empty());
}

#[test]
fn labels_and_annotations_syntax_and_size() {
    let mut d = deployment();
    d["metadata"]["labels"] = json!({"bad key": "x", "ok": "bad value!"});
    d["metadata"]["annotations"] = json!({"big": "x".repeat(300 * 1024)});
    let p = problems("deploy", d, None);
    assert!(
        p.iter().any(|l| l
            .starts_with("metadata.labels: Invalid value: \"bad key\": name part must consist")),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.starts_with("metadata.labels: Invalid value: \"bad value!\": a valid label")), "{p:?}");
    assert!(
        p.contains(
            &"metadata.annotations: Too long: may not be more than 262144 bytes".to_string()
        ),
        "{p:?}"
    );
}

#[test]
fn pods_need_named_unique_containers_with_images() {
    let pod = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [
        {"name": "a", "image": "x", "ports": [{"containerPort": 70000}],
         "volumeMounts": [{"name": "data", "mountPath": "/d"}]},
        {"name": "a", "image": ""},
        {"image": "y", "imagePullPolicy": "Sometimes"}
    ], "restartPolicy": "Sometimes"}});
    let p = problems("pods", pod, None);
    for want in [
        "spec.containers[0].ports[0].containerPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
        "spec.containers[0].volumeMounts[0].name: Not found: \"data\"",
        "spec.containers[1].image: Required value",
        "spec.containers[1].name: Duplicate value: \"a\"",
        "spec.containers[2].name: Required value",
        "spec.containers[2].imagePullPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"",
        "spec.restartPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"Never\", \"OnFailure\"",
    ] {
        assert!(p.contains(&want.to_string()), "missing {want:?} in {p:?}");
    }
    let shared_port_names = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [
        {"name": "a", "image": "x", "ports": [{"name": "metrics", "containerPort": 9090}]},
        {"name": "b", "image": "y", "ports": [{"name": "metrics", "containerPort": 9091},
                                                {"name": "metrics", "containerPort": 9092}]}]}});
    assert_eq!(
        problems("pods", shared_port_names, None),
        ["spec.containers[1].ports[1].name: Duplicate value: \"metrics\""]
    );
    let empty = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": []}});
    assert_eq!(
        problems("pods", empty, None),
        ["spec.containers: Required value"]
    );
}

#[test]
fn pod_spec_is_immutable_but_images_and_binding_may_change() {
    let mut old = json!({"metadata": {"name": "p", "namespace": "d"},
                         "spec": {"containers": [{"name": "a", "image": "x:1"}]}});
    default(res("pods"), &mut old);
    let mut new = old.clone();
    new["spec"]["containers"][0]["image"] = json!("x:2");
    new["spec"]["nodeName"] = json!("node-1");
    assert!(problems("pods", new.clone(), Some(&old)).is_empty());
    let mut moved = new.clone();
    moved["spec"]["nodeName"] = json!("node-2");
    assert!(
        problems("pods", moved, Some(&new))[0]
            .starts_with("spec: Forbidden: pod updates may not change fields")
    );
    let mut env = old.clone();
    env["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "1"}]);
    assert_eq!(problems("pods", env, Some(&old)).len(), 1);
}

#[test]
fn deployment_selector_must_match_template_and_stay_fixed() {
    let mut d = deployment();
    d["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
    assert_eq!(
        problems("deploy", d, None),
        [
            "spec.template.metadata.labels: Invalid value: {\"app\":\"other\"}: `selector` does not match template `labels`"
        ]
    );
    let mut d = deployment();
    d["spec"].as_object_mut().expect("spec").remove("selector");
    assert!(problems("deploy", d, None).contains(&"spec.selector: Required value".to_string()));
    let mut d = deployment();
    d["spec"]["selector"] = json!({});
    assert!(problems("deploy", d, None)[0].ends_with("empty selector is invalid for deployment"));

    let old = deployment();
    let mut new = deployment();
    new["spec"]["selector"]["matchLabels"]["tier"] = json!("x");
    new["spec"]["template"]["metadata"]["labels"]["tier"] = json!("x");
    assert_eq!(
        problems("deploy", new, Some(&old)),
        [
            "spec.selector: Invalid value: {\"matchLabels\":{\"app\":\"web\",\"tier\":\"x\"}}: field is immutable"
        ]
    );
}

#[test]
fn deployment_replicas_strategy_and_template_restart_policy() {
    let mut d = deployment();
    d["spec"]["replicas"] = json!(-1);
    d["spec"]["strategy"] =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}});
    d["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
    let p = problems("deploy", d, None);
    for want in [
        "spec.replicas: Invalid value: -1: must be greater than or equal to 0",
        "spec.strategy.rollingUpdate.maxUnavailable: Invalid value: \"0%\": may not be 0 when `maxSurge` is 0",
        "spec.template.spec.restartPolicy: Unsupported value: \"Never\": supported values: \"Always\"",
    ] {
        assert!(p.contains(&want.to_string()), "missing {want:?} in {p:?}");
    }
    let mut d = deployment();
    d["spec"]["strategy"] = json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}});
    assert_eq!(
        problems("deploy", d, None),
        [
            "spec.strategy.rollingUpdate: Forbidden: may not be specified when strategy `type` is 'Recreate'"
        ]
    );
}

#[test]
fn ingress_paths_need_a_path_type_and_a_backend() {
    let ing = json!({"metadata": {"name": "i", "namespace": "d"}, "spec": {"rules": [
        {"host": "10.0.0.1", "http": {"paths": [
            {"path": "/a", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
            {"path": "b", "pathType": "Exact", "backend": {"service": {"name": "web", "port": {}}}},
            {"path": "/c", "pathType": "Regex", "backend": {}}
        ]}},
        {"http": {"paths": []}}
    ]}});
    let p = problems("ing", ing, None);
    for want in [
        "spec.rules[0].host: Invalid value: \"10.0.0.1\": must be a DNS name, not an IP address",
        "spec.rules[0].http.paths[0].pathType: Required value: pathType must be specified",
        "spec.rules[0].http.paths[1].path: Invalid value: \"b\": must be an absolute path",
        "spec.rules[0].http.paths[1].backend.service.port: Required value: port name or number is required",
        "spec.rules[0].http.paths[2].pathType: Unsupported value: \"Regex\": supported values: \"Exact\", \"ImplementationSpecific\", \"Prefix\"",
        "spec.rules[0].http.paths[2].backend: Required value: one of `service` or `resource` must be specified",
        "spec.rules[1].http.paths: Required value",
    ] {
        assert!(p.contains(&want.to_string()), "missing {want:?} in {p:?}");
    }
    let empty = json!({"metadata": {"name": "i", "namespace": "d"}, "spec": {}});
    assert!(
        problems("ing", empty, None)[0]
            .ends_with("either `defaultBackend` or `rules` must be specified")
    );
}

#[test]
fn secrets_and_config_maps() {
    let s = json!({"metadata": {"name": "s", "namespace": "d"}, "type": "kubernetes.io/tls",
                   "data": {"tls.crt": "eA==", "bad key": "eA=="}});
    let p = problems("secret", s, None);
    assert!(
        p.contains(&"data[tls.key]: Required value".to_string()),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.starts_with("data[bad key]: Invalid value: \"bad key\": a valid config key")), "{p:?}");

    let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; DATA_MAX + 1]);
    let s = json!({"metadata": {"name": "s", "namespace": "d"}, "data": {"blob": big}});
    assert_eq!(
        problems("secret", s, None),
        ["data: Too long: may not be more than 1048576 bytes"]
    );

    let old =
        json!({"metadata": {"name": "c", "namespace": "d"}, "immutable": true, "data": {"a": "1"}});
    let mut new = old.clone();
    new["data"]["a"] = json!("2");
    assert_eq!(
        problems("cm", new, Some(&old)),
        ["data: Forbidden: field is immutable when `immutable` is set"]
    );
    let dup = json!({"metadata": {"name": "c", "namespace": "d"}, "data": {"a": "1"}, "binaryData": {"a": "eA=="}});
    assert_eq!(
        problems("cm", dup, None),
        ["data[a]: Invalid value: \"a\": duplicate of key present in binaryData"]
    );
}

#[test]
fn endpoint_slices_check_address_type_and_addresses() {
    let es = json!({"metadata": {"name": "e", "namespace": "d"}, "addressType": "IPv4",
                    "endpoints": [{"addresses": ["10.244.0.5", "fd00::1"]}, {"addresses": []}],
                    "ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]});
    let p = problems("endpointslices", es.clone(), None);
    for want in [
        "endpoints[0].addresses[1]: Invalid value: \"fd00::1\": must be a valid IPv4 address",
        "endpoints[1].addresses: Required value: must contain at least 1 address, at most 100",
        "ports[1].name: Duplicate value: \"http\"",
    ] {
        assert!(p.contains(&want.to_string()), "missing {want:?} in {p:?}");
    }
    let mut v6 = es.clone();
    v6["addressType"] = json!("IPv5");
    assert!(
        problems("endpointslices", v6, None)
            .iter()
            .any(|l| l.starts_with("addressType: Unsupported value: \"IPv5\""))
    );
    let mut changed = es.clone();
    changed["addressType"] = json!("IPv6");
    changed["endpoints"] = json!([]);
    changed["ports"] = json!([]);
    assert_eq!(
        problems("endpointslices", changed, Some(&es)),
        ["addressType: Invalid value: \"IPv6\": field is immutable"]
    );
}

#[test]
fn cluster_scoped_objects_reject_a_namespace() {
    let node = json!({"metadata": {"name": "n1", "namespace": "default"}});
    assert_eq!(
        problems("nodes", node, None),
        ["metadata.namespace: Forbidden: not allowed on this type"]
    );
    let svc = json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 1}]}});
    assert_eq!(
        problems("svc", svc, None),
        ["metadata.namespace: Required value"]
    );
}
