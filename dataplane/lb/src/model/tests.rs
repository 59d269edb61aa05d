use super::*;
use serde_json::json;

fn svc(v: serde_json::Value) -> Service {
    serde_json::from_value(v).expect("test Service")
}

fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).expect("test EndpointSlice")
}

fn web(extra: serde_json::Value) -> Service {
    let mut s = json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                           {"name": "dns", "port": 53, "protocol": "UDP"}]}
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        s["spec"][k] = v.clone();
    }
    svc(s)
}

fn endpoints(eps: serde_json::Value) -> EndpointSlice {
    slice(json!({
        "metadata": {"name": "web-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": eps
    }))
}

fn fe(port: u16, proto: u8) -> Frontend {
    Frontend {
        addr: SocketAddrV4::new([10, 96, 0, 10].into(), port),
        proto,
    }
}

fn addrs(d: &Desired, f: Frontend) -> Vec<String> {
    d[&f].backends.iter().map(ToString::to_string).collect()
}

#[test]
fn ports_map_to_endpoint_ports_by_name_and_protocol() {
    let eps = endpoints(
        json!([{"addresses": ["10.244.0.2"]}, {"addresses": ["10.244.0.3"], "conditions": {"ready": true}}]),
    );
    let (d, problems) = desired(&[web(json!({}))], &[eps], &ModelConfig::default());
    assert!(problems.is_empty());
    assert_eq!(
        addrs(&d, fe(80, PROTO_TCP)),
        ["10.244.0.2:8080", "10.244.0.3:8080"]
    );
    assert_eq!(
        addrs(&d, fe(53, PROTO_UDP)),
        ["10.244.0.2:5353", "10.244.0.3:5353"]
    );
    assert_eq!(d[&fe(80, PROTO_TCP)].service.port, "http");
}

#[test]
fn terminating_endpoints_only_when_no_ready_one_is_left() {
    let term = json!({"addresses": ["10.244.0.9"], "conditions": {"ready": false, "serving": true, "terminating": true}});
    let gone = json!({"addresses": ["10.244.0.8"], "conditions": {"ready": false, "serving": false, "terminating": true}});
    let ready = json!({"addresses": ["10.244.0.2"], "conditions": {"ready": true}});
    let (d, _) = desired(
        &[web(json!({}))],
        &[endpoints(json!([term, gone, ready]))],
        &ModelConfig::default(),
    );
    assert_eq!(addrs(&d, fe(80, PROTO_TCP)), ["10.244.0.2:8080"]);
    let (d, _) = desired(
        &[web(json!({}))],
        &[endpoints(json!([term, gone]))],
        &ModelConfig::default(),
    );
    assert_eq!(addrs(&d, fe(80, PROTO_TCP)), ["10.244.0.9:8080"]);
}

#[test]
fn no_slices_means_an_empty_frontend_not_a_missing_one() {
    let (d, _) = desired(
        &[web(json!({}))],
        &[] as &[EndpointSlice],
        &ModelConfig::default(),
    );
    assert!(
        d[&fe(80, PROTO_TCP)].backends.is_empty(),
        "an empty frontend is programmed so BPF refuses"
    );
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let eps = endpoints(
        json!([{"addresses": ["10.244.0.2"], "nodeName": "a"}, {"addresses": ["10.244.1.2"], "nodeName": "b"}]),
    );
    let cfg = ModelConfig {
        node_name: Some("b".into()),
        ..Default::default()
    };
    let (d, _) = desired(
        &[web(json!({"internalTrafficPolicy": "Local"}))],
        std::slice::from_ref(&eps),
        &cfg,
    );
    assert_eq!(addrs(&d, fe(80, PROTO_TCP)), ["10.244.1.2:8080"]);
    let (d, _) = desired(&[web(json!({}))], &[eps], &cfg);
    assert_eq!(d[&fe(80, PROTO_TCP)].backends.len(), 2);
}

#[test]
fn affinity_algorithm_and_skipped_services() {
    let mut s = web(
        json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
    );
    s.metadata.annotations =
        Some([(ALGORITHM_ANNOTATION.to_string(), "maglev".to_string())].into());
    let headless = svc(
        json!({"metadata": {"name": "h", "namespace": "default"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
    );
    let external = svc(
        json!({"metadata": {"name": "x", "namespace": "default"}, "spec": {"type": "ExternalName", "externalName": "example.com"}}),
    );
    let (d, _) = desired(
        &[s, headless, external],
        &[] as &[EndpointSlice],
        &ModelConfig::default(),
    );
    assert_eq!(d.len(), 2, "only web's two ports: {d:?}");
    let w = &d[&fe(80, PROTO_TCP)];
    assert_eq!(
        (w.algorithm, w.affinity_timeout_secs),
        (Algorithm::Maglev, Some(60))
    );
    let (d, _) = desired(
        &[web(json!({"sessionAffinity": "ClientIP"}))],
        &[] as &[EndpointSlice],
        &ModelConfig::default(),
    );
    assert_eq!(
        d[&fe(80, PROTO_TCP)].affinity_timeout_secs,
        Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
    );
}

#[test]
fn bad_fields_are_reported_by_name_and_the_rest_is_kept() {
    let mut s = web(json!({"externalIPs": ["not-an-ip", "192.0.2.7"]}));
    s.metadata.annotations =
        Some([(ALGORITHM_ANNOTATION.to_string(), "fastest".to_string())].into());
    let (d, problems) = desired(&[s], &[] as &[EndpointSlice], &ModelConfig::default());
    assert_eq!(
        d.len(),
        4,
        "clusterIP and the valid externalIP, two ports each"
    );
    let text: Vec<_> = problems.iter().map(|p| p.reason.as_str()).collect();
    assert!(
        text.iter()
            .any(|r| r.contains("weir.dev/lb-algorithm") && r.contains("fastest")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|r| r.contains("externalIPs") && r.contains("not-an-ip")),
        "{text:?}"
    );
}

fn at(ip: [u8; 4], port: u16, proto: u8) -> Frontend {
    Frontend {
        addr: SocketAddrV4::new(ip.into(), port),
        proto,
    }
}

#[test]
fn node_ports_external_ips_and_lb_ips_follow_external_traffic_policy() {
    let eps = endpoints(
        json!([{"addresses": ["10.244.0.2"], "nodeName": "a"}, {"addresses": ["10.244.1.2"], "nodeName": "b"}]),
    );
    let cfg = ModelConfig {
        node_name: Some("b".into()),
        node_ips: vec![[192, 168, 1, 5].into(), [192, 168, 2, 5].into()],
        ..Default::default()
    };
    let mut s = web(json!({
        "type": "LoadBalancer", "externalTrafficPolicy": "Local", "externalIPs": ["203.0.113.1"],
        "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                  {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]
    }));
    s.status = Some(serde_json::from_value(
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}, {"hostname": "lb.example"}]}}),
    ).expect("status"));
    let (d, problems) = desired(&[s], std::slice::from_ref(&eps), &cfg);
    assert!(problems.is_empty(), "{problems:?}");
    // ClusterIP + externalIP + LB IP on the port, both node IPs on the nodePort: 5 per port.
    assert_eq!(d.len(), 10, "{:?}", d.keys().collect::<Vec<_>>());
    assert_eq!(
        addrs(&d, fe(80, PROTO_TCP)).len(),
        2,
        "ClusterIP: every endpoint"
    );
    for f in [
        at([192, 168, 1, 5], 30080, PROTO_TCP),
        at([192, 168, 2, 5], 30053, PROTO_UDP),
        at([203, 0, 113, 1], 80, PROTO_TCP),
        at([198, 51, 100, 9], 53, PROTO_UDP),
    ] {
        assert_eq!(
            d[&f].backends.len(),
            1,
            "{f:?}: Local keeps this node's only"
        );
        assert_eq!(d[&f].backends[0].ip(), &Ipv4Addr::new(10, 244, 1, 2));
    }

    // Clients on this node get every endpoint of those external frontends (kube-proxy's
    // short-circuit); the ClusterIP has a single set.
    for f in d
        .keys()
        .filter(|f| f.addr.ip() != &Ipv4Addr::new(10, 96, 0, 10))
    {
        let internal = d[f].internal_backends.as_deref().unwrap_or_default();
        assert_eq!(internal.len(), 2, "{f:?}: in-node clients reach both nodes");
    }
    assert_eq!(d[&fe(80, PROTO_TCP)].internal_backends, None);

    // Cluster (the default): every endpoint; a ClusterIP Service gets no node port frontends
    // even if a stale nodePort is left in its spec.
    let s = web(
        json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
    );
    let (d, _) = desired(&[s], std::slice::from_ref(&eps), &cfg);
    assert_eq!(d[&at([192, 168, 1, 5], 30080, PROTO_TCP)].backends.len(), 2);
    assert!(d.values().all(|f| f.internal_backends.is_none()));
    let s = web(json!({"ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
    let (d, _) = desired(&[s], &[eps], &cfg);
    assert_eq!(d.len(), 1);
}

#[test]
fn a_node_port_out_of_range_is_reported() {
    let s = web(
        json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 70000}]}),
    );
    let cfg = ModelConfig {
        node_ips: vec![[192, 168, 1, 5].into()],
        ..Default::default()
    };
    let (d, problems) = desired(&[s], &[] as &[EndpointSlice], &cfg);
    assert_eq!(d.len(), 1, "the ClusterIP frontend stays");
    assert!(
        problems
            .iter()
            .any(|p| p.reason.contains("nodePort") && p.reason.contains("70000")),
        "{problems:?}"
    );
}

#[test]
fn of_two_services_claiming_one_frontend_the_later_one_wins() {
    let named = |name: &str| {
        svc(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}
        }))
    };
    for (first, second) in [("a", "b"), ("b", "a")] {
        let (d, _) = desired(
            &[named(first), named(second)],
            &[] as &[EndpointSlice],
            &ModelConfig::default(),
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[&fe(80, PROTO_TCP)].service.name, second);
    }
}

#[test]
fn in_node_clients_of_a_local_external_frontend_get_the_cluster_wide_endpoints() {
    // internalTrafficPolicy does not narrow them (kube-proxy: UsesClusterEndpoints); a node
    // with no endpoint of its own refuses outside traffic but serves its pods; terminating
    // endpoints stand in only when no ready one is left cluster-wide.
    let eps = endpoints(json!([
        {"addresses": ["10.244.0.2"], "nodeName": "a"},
        {"addresses": ["10.244.2.2"], "nodeName": "c"},
        {"addresses": ["10.244.1.2"], "nodeName": "b",
         "conditions": {"ready": false, "serving": true, "terminating": true}}
    ]));
    let cfg = ModelConfig {
        node_name: Some("b".into()),
        ..Default::default()
    };
    let s = web(json!({
        "type": "LoadBalancer", "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
        "externalIPs": ["203.0.113.1"]
    }));
    let (d, _) = desired(&[s], &[eps], &cfg);
    let ext = &d[&at([203, 0, 113, 1], 80, PROTO_TCP)];
    let ips = |b: &[SocketAddrV4]| b.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>();
    assert_eq!(
        ips(&ext.backends),
        ["10.244.1.2"],
        "node b's terminating one"
    );
    assert_eq!(
        ips(ext.internal_backends.as_deref().unwrap_or_default()),
        ["10.244.0.2", "10.244.2.2"],
        "every ready endpoint, on any node"
    );
    assert_eq!(
        addrs(&d, fe(80, PROTO_TCP)),
        ["10.244.1.2:8080"],
        "the ClusterIP follows internalTrafficPolicy"
    );
}
