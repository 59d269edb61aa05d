//! Update preparation: fields Kubernetes clears when an update makes them meaningless
//! (`dropTypeDependentFields` of the Service strategy), so that changing a Service's type
//! with `kubectl apply` works instead of tripping validation over values the server set.

use serde_json::Value;

use crate::registry::Resource;

/// Adjusts `obj`, the new version of a stored `old` object, before defaulting and
/// validation. A field is only cleared when the update left it as it was stored; a value the
/// client changed is kept and judged by validation.
pub fn prepare_update(res: &Resource, obj: &mut Value, old: &Value) {
    if res.group.is_empty() && res.kind == "Service" {
        service(obj, old);
    }
}

/// Whether a Service gets a `spec.healthCheckNodePort`: kube's `needsHCNodePort`, true for
/// `type: LoadBalancer` with `externalTrafficPolicy: Local`, whose nodes answer the cloud load
/// balancer's health checks on that port.
pub fn needs_health_check_node_port(svc: &Value) -> bool {
    service_type(svc) == "LoadBalancer"
        && svc
            .pointer("/spec/externalTrafficPolicy")
            .and_then(Value::as_str)
            == Some("Local")
}

fn service_type(obj: &Value) -> &str {
    obj.pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
}

fn node_ports(obj: &Value) -> Vec<Option<&Value>> {
    obj.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| p.get("nodePort"))
        .collect()
}

fn service(obj: &mut Value, old: &Value) {
    let new_type = service_type(obj).to_string();
    let has_node_ports = |t: &str| t == "NodePort" || t == "LoadBalancer";
    let same = |obj: &Value, field: &str| obj.pointer(field) == old.pointer(field);
    let mut clear: Vec<&str> = Vec::new();
    let clear_node_ports = has_node_ports(service_type(old))
        && !has_node_ports(&new_type)
        && node_ports(obj) == node_ports(old);
    if !has_node_ports(&new_type) && same(obj, "/spec/externalTrafficPolicy") {
        clear.push("externalTrafficPolicy");
    }
    if new_type != "LoadBalancer" {
        for field in ["allocateLoadBalancerNodePorts", "loadBalancerClass"] {
            if same(obj, &format!("/spec/{field}")) {
                clear.push(field);
            }
        }
    }
    // Also a LoadBalancer Service that leaves externalTrafficPolicy: Local.
    if needs_health_check_node_port(old)
        && !needs_health_check_node_port(obj)
        && same(obj, "/spec/healthCheckNodePort")
    {
        clear.push("healthCheckNodePort");
    }
    if new_type == "ExternalName" {
        if same(obj, "/spec/clusterIP") {
            clear.extend(["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"]);
        }
        if same(obj, "/spec/internalTrafficPolicy") {
            clear.push("internalTrafficPolicy");
        }
    }
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for field in clear {
        spec.remove(field);
    }
    if clear_node_ports {
        for port in spec
            .get_mut("ports")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(p) = port.as_object_mut() {
                p.remove("nodePort");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{default, validate};
    use crate::registry::find_by_name;
    use serde_json::json;

    fn svc() -> &'static Resource {
        find_by_name("svc").expect("svc")
    }

    #[test]
    fn node_port_to_cluster_ip_drops_what_the_server_set() {
        let old = json!({"metadata": {"name": "web", "namespace": "d"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.7", "externalTrafficPolicy": "Cluster",
                     "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP", "targetPort": 80}]}});
        // What a merge of `type: ClusterIP` into the stored object looks like.
        let mut new = old.clone();
        new["spec"]["type"] = json!("ClusterIP");
        let mut unprepared = new.clone();
        default(svc(), &mut unprepared);
        assert!(validate(svc(), &unprepared, Some(&old)).is_err());

        prepare_update(svc(), &mut new, &old);
        default(svc(), &mut new);
        assert_eq!(validate(svc(), &new, Some(&old)), Ok(()));
        assert!(new["spec"]["ports"][0].get("nodePort").is_none());
        assert!(new["spec"].get("externalTrafficPolicy").is_none());
        assert_eq!(new["spec"]["clusterIP"], "10.96.0.7");
    }

    #[test]
    fn leaving_load_balancer_local_drops_the_health_check_node_port() {
        let old = json!({"metadata": {"name": "web", "namespace": "d"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.7", "externalTrafficPolicy": "Local",
                     "healthCheckNodePort": 30999,
                     "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP", "targetPort": 80}]}});
        assert!(needs_health_check_node_port(&old));
        for (field, value) in [("externalTrafficPolicy", "Cluster"), ("type", "NodePort")] {
            let mut new = old.clone();
            new["spec"][field] = json!(value);
            assert!(!needs_health_check_node_port(&new));
            prepare_update(svc(), &mut new, &old);
            default(svc(), &mut new);
            assert_eq!(validate(svc(), &new, Some(&old)), Ok(()), "{field}");
            assert!(new["spec"].get("healthCheckNodePort").is_none(), "{field}");
            assert_eq!(new["spec"]["ports"][0]["nodePort"], 30080);
        }
        // Staying LoadBalancer + Local keeps it.
        let mut new = old.clone();
        prepare_update(svc(), &mut new, &old);
        assert_eq!(new["spec"]["healthCheckNodePort"], 30999);
        // A value the client changed is judged by validation.
        let mut new = old.clone();
        new["spec"]["externalTrafficPolicy"] = json!("Cluster");
        new["spec"]["healthCheckNodePort"] = json!(31000);
        prepare_update(svc(), &mut new, &old);
        assert_eq!(new["spec"]["healthCheckNodePort"], 31000);
    }

    #[test]
    fn values_the_client_changed_are_kept_for_validation() {
        let old = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}});
        let mut new =
            json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "nodePort": 30081}]}});
        prepare_update(svc(), &mut new, &old);
        assert_eq!(new["spec"]["ports"][0]["nodePort"], 30081);

        let old = json!({"spec": {"type": "ClusterIP", "clusterIP": "10.96.0.9", "internalTrafficPolicy": "Cluster"}});
        let mut new = json!({"spec": {"type": "ExternalName", "externalName": "db.example.com",
                                      "clusterIP": "10.96.0.9", "internalTrafficPolicy": "Cluster"}});
        prepare_update(svc(), &mut new, &old);
        assert_eq!(
            new["spec"],
            json!({"type": "ExternalName", "externalName": "db.example.com"})
        );
    }
}
