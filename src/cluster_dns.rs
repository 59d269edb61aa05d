//! Publishes `weir up`'s DNS server as the cluster DNS Service: `kube-system/kube-dns` at
//! 10.96.0.10:53 (UDP and TCP), without a selector, with an EndpointSlice naming this node's
//! pod-bridge address (the first address of its pod CIDR). Pods' resolv.conf points at the
//! ClusterIP; the load balancer's socket hooks carry their queries to the DNS server.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

pub const CLUSTER_DNS_IP: &str = "10.96.0.10";
const NAMESPACE: &str = "kube-system";
const SERVICE: &str = "kube-dns";
const MANAGED_BY: &str = "weir-up";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("node {node} has an invalid podCIDR {cidr:?}")]
    PodCidr { node: String, cidr: String },
}

/// Publish the Service and its endpoint once this node has a pod CIDR, then hold until
/// `shutdown`.
pub async fn publish(
    client: kube::Client,
    node_name: Option<String>,
    dns_port: u16,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let node_name = node_name.unwrap_or_else(weir_agent::default_node_name);
    let nodes: Api<Node> = Api::all(client.clone());
    let gateway = loop {
        if let Ok(node) = nodes.get(&node_name).await
            && let Some(cidr) = node.spec.and_then(|s| s.pod_cidr)
        {
            break first_address(&cidr).ok_or(Error::PodCidr {
                node: node_name.clone(),
                cidr,
            })?;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    ensure(&services, service(dns_port)).await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    ensure(&slices, slice(&node_name, gateway, dns_port)).await?;
    tracing::info!(%gateway, dns_port, "cluster DNS published at {CLUSTER_DNS_IP}:53");
    shutdown.cancelled().await;
    Ok(())
}

/// Create `obj`, or replace the stored one with it (keeping server-owned fields).
async fn ensure<K>(api: &Api<K>, obj: K) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let what = format!(
        "publishing {} {NAMESPACE}/{name}",
        K::kind(&Default::default())
    );
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let current = api.get(&name).await.map_err(|source| Error::Api {
                what: what.clone(),
                source,
            })?;
            let mut obj = obj;
            obj.meta_mut().resource_version = current.meta().resource_version.clone();
            api.replace(&name, &PostParams::default(), &obj)
                .await
                .map(|_| ())
                .map_err(|source| Error::Api { what, source })
        }
        Err(source) => Err(Error::Api { what, source }),
    }
}

fn service(dns_port: u16) -> Service {
    let port = |name: &str, protocol: &str| ServicePort {
        name: Some(name.into()),
        port: 53,
        protocol: Some(protocol.into()),
        target_port: Some(IntOrString::Int(i32::from(dns_port))),
        ..Default::default()
    };
    Service {
        metadata: ObjectMeta {
            name: Some(SERVICE.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([("k8s-app".into(), "kube-dns".into())])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(CLUSTER_DNS_IP.into()),
            ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(node: &str, address: Ipv4Addr, dns_port: u16) -> EndpointSlice {
    let port = |name: &str, protocol: &str| EndpointPort {
        name: Some(name.into()),
        port: Some(i32::from(dns_port)),
        protocol: Some(protocol.into()),
        ..Default::default()
    };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{SERVICE}-{MANAGED_BY}")),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/service-name".into(), SERVICE.into()),
                (
                    "endpointslice.kubernetes.io/managed-by".into(),
                    MANAGED_BY.into(),
                ),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec![address.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: Some(node.into()),
            ..Default::default()
        }],
        ports: Some(vec![port("dns", "UDP"), port("dns-tcp", "TCP")]),
    }
}

/// The first host address of an IPv4 CIDR (`10.244.3.0/24` → `10.244.3.1`).
fn first_address(cidr: &str) -> Option<Ipv4Addr> {
    let (net, len) = cidr.split_once('/')?;
    let net: Ipv4Addr = net.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    if !(1..=30).contains(&len) {
        return None;
    }
    let mask = u32::MAX << (32 - len);
    Some(Ipv4Addr::from((u32::from(net) & mask) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_is_the_first_address_of_the_pod_cidr() {
        assert_eq!(
            first_address("10.244.3.0/24"),
            Some(Ipv4Addr::new(10, 244, 3, 1))
        );
        assert_eq!(
            first_address("10.244.3.77/24"),
            Some(Ipv4Addr::new(10, 244, 3, 1))
        );
        assert_eq!(first_address("10.244.3.0"), None);
        assert_eq!(first_address("10.244.3.0/32"), None);
        assert_eq!(first_address("nonsense/24"), None);
    }

    #[test]
    fn service_and_slice_point_port_53_at_the_dns_server() {
        let svc = service(5353);
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some(CLUSTER_DNS_IP));
        assert!(
            spec.selector.is_none(),
            "the endpoint is published, not selected"
        );
        let slice = slice("n1", Ipv4Addr::new(10, 244, 0, 1), 5353);
        assert_eq!(slice.endpoints[0].addresses, vec!["10.244.0.1"]);
        let ports = slice.ports.expect("ports");
        assert!(ports.iter().all(|p| p.port == Some(5353)));
    }
}
