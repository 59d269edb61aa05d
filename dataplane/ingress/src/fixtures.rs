//! Constructors for the Kubernetes objects the routing table is built from, shared by the
//! unit tests, the end-to-end tests and the route-matching benchmark so that none of them
//! spells out k8s-openapi structs by hand.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// A backend reference to `service` by port number.
pub fn backend(service: &str, port: i32) -> IngressBackend {
    IngressBackend {
        service: Some(IngressServiceBackend {
            name: service.into(),
            port: Some(ServiceBackendPort {
                number: Some(port),
                name: None,
            }),
        }),
        resource: None,
    }
}

/// A backend reference to `service` by port name.
pub fn backend_named(service: &str, port: &str) -> IngressBackend {
    IngressBackend {
        service: Some(IngressServiceBackend {
            name: service.into(),
            port: Some(ServiceBackendPort {
                name: Some(port.into()),
                number: None,
            }),
        }),
        resource: None,
    }
}

/// One path rule: (host, path, pathType, backend).
pub type Rule<'a> = (&'a str, &'a str, &'a str, IngressBackend);

/// An Ingress of class `weir` with `rules`; an empty host means "any host".
pub fn ingress(ns: &str, name: &str, rules: Vec<Rule<'_>>) -> Ingress {
    let mut by_host: Vec<IngressRule> = Vec::new();
    for (host, path, path_type, backend) in rules {
        let p = HTTPIngressPath {
            path: Some(path.into()),
            path_type: path_type.into(),
            backend,
        };
        let host = (!host.is_empty()).then(|| host.to_string());
        match by_host.iter_mut().find(|r| r.host == host) {
            Some(r) => r.http.get_or_insert_with(Default::default).paths.push(p),
            None => by_host.push(IngressRule {
                host,
                http: Some(HTTPIngressRuleValue { paths: vec![p] }),
            }),
        }
    }
    Ingress {
        metadata: meta(ns, name),
        spec: Some(IngressSpec {
            ingress_class_name: Some("weir".into()),
            rules: Some(by_host),
            ..Default::default()
        }),
        status: None,
    }
}

/// Add `annotations` to an object's metadata.
pub fn annotate(meta: &mut ObjectMeta, annotations: &[(&str, &str)]) {
    let map = meta.annotations.get_or_insert_with(BTreeMap::new);
    for (k, v) in annotations {
        map.insert(k.to_string(), v.to_string());
    }
}

/// Add a TLS section for `hosts` served from Secret `secret`.
pub fn with_tls(mut ing: Ingress, hosts: &[&str], secret: &str) -> Ingress {
    let spec = ing.spec.get_or_insert_with(Default::default);
    spec.tls.get_or_insert_with(Vec::new).push(IngressTLS {
        hosts: Some(hosts.iter().map(|h| h.to_string()).collect()),
        secret_name: Some(secret.into()),
    });
    ing
}

/// A ClusterIP Service with named ports `(name, port, appProtocol)`.
pub fn service(ns: &str, name: &str, ports: &[(&str, i32, Option<&str>)]) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, proto)| ServicePort {
                        name: (!n.is_empty()).then(|| n.to_string()),
                        port: *p,
                        app_protocol: proto.map(str::to_string),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

/// An IPv4 EndpointSlice of `service` with one port `(name, port)` and `(address, ready)`s.
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    port: (&str, i32),
    endpoints: &[(&str, bool)],
) -> EndpointSlice {
    let mut m = meta(ns, name);
    m.labels = Some(
        [(
            "kubernetes.io/service-name".to_string(),
            service.to_string(),
        )]
        .into(),
    );
    EndpointSlice {
        metadata: m,
        address_type: "IPv4".into(),
        endpoints: endpoints
            .iter()
            .map(|(a, ready)| Endpoint {
                addresses: vec![a.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: (!port.0.is_empty()).then(|| port.0.to_string()),
            port: Some(port.1),
            ..Default::default()
        }]),
    }
}

/// A `kubernetes.io/tls` Secret holding a fresh self-signed certificate for `hosts`.
pub fn tls_secret(ns: &str, name: &str, hosts: &[&str]) -> Result<Secret, rcgen::Error> {
    let generated = rcgen::generate_simple_self_signed(
        hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    )?;
    let data = [
        (
            "tls.crt".to_string(),
            ByteString(generated.cert.pem().into_bytes()),
        ),
        (
            "tls.key".to_string(),
            ByteString(generated.signing_key.serialize_pem().into_bytes()),
        ),
    ];
    Ok(Secret {
        metadata: meta(ns, name),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data.into_iter().collect()),
        ..Default::default()
    })
}
