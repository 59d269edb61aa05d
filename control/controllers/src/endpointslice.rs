//! The EndpointSlice controller: for each Service with a selector, the endpoints of the pods
//! it selects, in slices of at most 100, which the load balancer, DNS and ingress consume.
//!
//! Endpoints keep their slice across reconciles (only changed slices are written), named
//! targetPorts are resolved per pod (pods resolving to different numbers land in different
//! slices, as each slice has one port list), and terminating pods stay as
//! `serving=false, terminating=true` until they are gone so the dataplane can drain them.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tracing::debug;

use crate::runtime::{self, Next};
use crate::util::{self, Context as _, Error, Result};

pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// Writes that bring a service's slices to the desired state.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub create: Vec<EndpointSlice>,
    pub update: Vec<EndpointSlice>,
    pub delete: Vec<String>,
}

/// The ports of `svc` as `pod` serves them; a named targetPort the pod does not declare
/// leaves that port out for this pod, as Kubernetes does.
pub fn pod_ports(svc_ports: &[ServicePort], pod: &Pod) -> Vec<EndpointPort> {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let mut out: Vec<EndpointPort> = svc_ports
        .iter()
        .filter_map(|sp| {
            let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
            let port = match &sp.target_port {
                None => sp.port,
                Some(IntOrString::Int(0)) => sp.port,
                Some(IntOrString::Int(p)) => *p,
                Some(IntOrString::String(name)) => match name.parse::<i32>() {
                    Ok(p) => p,
                    Err(_) => {
                        containers
                            .iter()
                            .flat_map(|c| c.ports.iter().flatten())
                            .find(|cp| {
                                cp.name.as_deref() == Some(name.as_str())
                                    && cp.protocol.as_deref().unwrap_or("TCP") == protocol
                            })?
                            .container_port
                    }
                },
            };
            Some(EndpointPort {
                name: Some(sp.name.clone().unwrap_or_default()),
                port: Some(port),
                protocol: Some(protocol),
                app_protocol: sp.app_protocol.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.port.cmp(&b.port)));
    out
}

/// The endpoint of `pod` for `svc`, or `None` when the pod has no IPv4 address yet or has
/// finished.
pub fn pod_endpoint(svc: &Service, pod: &Pod) -> Option<Endpoint> {
    if util::is_terminal(pod) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ip = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .find(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())?;
    let spec = svc.spec.as_ref()?;
    let terminating = util::is_terminating(&pod.metadata);
    let ready = util::is_ready(pod);
    let publish = spec.publish_not_ready_addresses == Some(true);
    let pod_spec = pod.spec.as_ref();
    // A headless service gives pods with a matching subdomain a DNS hostname.
    let hostname = pod_spec
        .filter(|s| s.subdomain.as_deref() == svc.metadata.name.as_deref())
        .and_then(|s| s.hostname.clone());
    Some(Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(!terminating && (ready || publish)),
            serving: Some(!terminating && (ready || publish)),
            terminating: Some(terminating),
        }),
        hostname,
        node_name: pod_spec.and_then(|s| s.node_name.clone()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn endpoint_id(e: &Endpoint) -> String {
    e.target_ref
        .as_ref()
        .and_then(|r| r.uid.clone())
        .unwrap_or_else(|| e.addresses.join(","))
}

fn ports_key(ports: &[EndpointPort]) -> String {
    serde_json::to_string(ports).unwrap_or_default()
}

/// Whether `slice` is one this controller manages for `svc_name`.
pub fn is_managed_for(slice: &EndpointSlice, svc_name: &str) -> bool {
    let labels = slice.metadata.labels.as_ref();
    labels
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .map(String::as_str)
        == Some(svc_name)
        && labels
            .and_then(|l| l.get(LABEL_MANAGED_BY))
            .map(String::as_str)
            == Some(MANAGED_BY)
}

/// The writes that make the slices of `svc` list exactly the endpoints of `pods` (already
/// filtered by the service's selector and namespace). `existing` are the service's managed
/// slices; `taken` are all slice names in the namespace, so new names never collide.
pub fn plan(
    svc: &Service,
    pods: &[Arc<Pod>],
    existing: &[Arc<EndpointSlice>],
    taken: &HashSet<String>,
) -> Plan {
    let svc_name = svc.name_any();
    let svc_ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    // Desired endpoints grouped by the port list they serve.
    let mut groups: BTreeMap<String, (Vec<EndpointPort>, BTreeMap<String, Endpoint>)> =
        BTreeMap::new();
    for pod in pods {
        if let Some(ep) = pod_endpoint(svc, pod) {
            let ports = pod_ports(&svc_ports, pod);
            let group = groups
                .entry(ports_key(&ports))
                .or_insert_with(|| (ports, BTreeMap::new()));
            group.1.insert(endpoint_id(&ep), ep);
        }
    }
    let mut existing: Vec<&Arc<EndpointSlice>> = existing.iter().collect();
    existing.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    // 1. Endpoints stay in the slice that already holds them.
    let mut slices: Vec<Draft<'_>> = Vec::new();
    for slice in &existing {
        let key = ports_key(slice.ports.as_deref().unwrap_or_default());
        let Some((ports, remaining)) = groups.get_mut(&key) else {
            slices.push(Draft {
                old: Some(slice),
                key,
                ports: Vec::new(),
                endpoints: Vec::new(),
            });
            continue;
        };
        let kept = slice
            .endpoints
            .iter()
            .filter_map(|e| remaining.remove(&endpoint_id(e)))
            .collect();
        slices.push(Draft {
            old: Some(slice),
            key,
            ports: ports.clone(),
            endpoints: kept,
        });
    }
    // 2. New endpoints fill slices with room, then new slices.
    let mut names: HashSet<String> = taken.clone();
    let mut next_name = || {
        (0..)
            .map(|i| format!("{svc_name}-{i}"))
            .find(|n| names.insert(n.clone()))
            .unwrap_or_default()
    };
    for (key, (ports, remaining)) in groups {
        let mut remaining = remaining.into_values();
        for d in slices.iter_mut().filter(|d| d.key == key) {
            let room = MAX_ENDPOINTS_PER_SLICE.saturating_sub(d.endpoints.len());
            d.endpoints.extend(remaining.by_ref().take(room));
        }
        let rest: Vec<Endpoint> = remaining.collect();
        for chunk in rest.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(Draft {
                old: None,
                key: key.clone(),
                ports: ports.clone(),
                endpoints: chunk.to_vec(),
            });
        }
    }
    let any = slices.iter().any(|d| !d.endpoints.is_empty());
    let mut plan = Plan::default();
    let mut placeholder_kept = false;
    for Draft {
        old,
        ports,
        endpoints: mut eps,
        ..
    } in slices
    {
        if eps.is_empty() {
            // A service without endpoints keeps one empty slice, so consumers can tell
            // "no endpoints" from "not processed yet", as Kubernetes does.
            if any || placeholder_kept {
                if let Some(old) = old {
                    plan.delete.push(old.name_any());
                }
                continue;
            }
            placeholder_kept = true;
        }
        eps.sort_by(|a, b| a.addresses.cmp(&b.addresses));
        let name = old.map(|o| o.name_any()).unwrap_or_else(&mut next_name);
        let desired = slice_object(svc, &name, ports, eps);
        match old {
            None => plan.create.push(desired),
            Some(old) if differs(old, &desired) => {
                let mut updated = desired;
                updated.metadata.resource_version = old.metadata.resource_version.clone();
                plan.update.push(updated);
            }
            Some(_) => {}
        }
    }
    if !any && !placeholder_kept {
        let name = next_name();
        plan.create
            .push(slice_object(svc, &name, Vec::new(), Vec::new()));
    }
    plan
}

/// A slice being planned: the existing one it becomes (if any), its port-list key, ports
/// and endpoints.
struct Draft<'a> {
    old: Option<&'a EndpointSlice>,
    key: String,
    ports: Vec<EndpointPort>,
    endpoints: Vec<Endpoint>,
}

fn slice_object(
    svc: &Service,
    name: &str,
    ports: Vec<EndpointPort>,
    eps: Vec<Endpoint>,
) -> EndpointSlice {
    let mut labels: BTreeMap<String, String> = svc.metadata.labels.clone().unwrap_or_default();
    labels.insert(LABEL_SERVICE_NAME.into(), svc.name_any());
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![util::owner_ref("v1", "Service", &svc.metadata)]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: eps,
        ports: if ports.is_empty() { None } else { Some(ports) },
    }
}

fn differs(old: &EndpointSlice, new: &EndpointSlice) -> bool {
    old.endpoints != new.endpoints
        || old.ports.as_deref().unwrap_or_default() != new.ports.as_deref().unwrap_or_default()
        || old.metadata.labels != new.metadata.labels
        || old.metadata.owner_references != new.metadata.owner_references
        || old.address_type != new.address_type
}

struct Ctx {
    client: Client,
    pods: Store<Pod>,
    slices: Store<EndpointSlice>,
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Next> {
    let key = util::key(&svc.metadata);
    if ctx.pods.wait_until_ready().await.is_err() || ctx.slices.wait_until_ready().await.is_err() {
        return Err(Error::NotReady(key));
    }
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let spec = svc.spec.clone().unwrap_or_default();
    // Services without a selector (and ExternalName ones) have user-managed endpoints.
    let selector = match spec.selector.filter(|s| !s.is_empty()) {
        Some(s) if spec.type_.as_deref() != Some("ExternalName") => s,
        _ => return Ok(Next::Wait),
    };
    if util::is_terminating(&svc.metadata) {
        return Ok(Next::Wait);
    }
    let pods: Vec<Arc<Pod>> = ctx.pods.state_filter(|p| {
        p.metadata.namespace.as_deref() == Some(ns.as_str())
            && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
    });
    let in_ns: Vec<Arc<EndpointSlice>> = ctx
        .slices
        .state_filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()));
    let taken: HashSet<String> = in_ns.iter().map(|s| s.name_any()).collect();
    let mine: Vec<Arc<EndpointSlice>> = in_ns
        .into_iter()
        .filter(|s| is_managed_for(s, &name))
        .collect();
    let plan = plan(&svc, &pods, &mine, &taken);
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    for s in &plan.create {
        debug!(service = %key, slice = ?s.metadata.name, endpoints = s.endpoints.len(), "creating slice");
        api.create(&PostParams::default(), s)
            .await
            .context(|| format!("creating EndpointSlice {ns}/{} for {key}", s.name_any()))?;
    }
    for s in &plan.update {
        debug!(service = %key, slice = ?s.metadata.name, endpoints = s.endpoints.len(), "updating slice");
        api.replace(&s.name_any(), &PostParams::default(), s)
            .await
            .context(|| format!("updating EndpointSlice {ns}/{} for {key}", s.name_any()))?;
    }
    for n in &plan.delete {
        match api.delete(n, &DeleteParams::default()).await {
            Err(e) if !util::is_not_found(&e) => {
                return Err(e).context(|| format!("deleting EndpointSlice {ns}/{n} for {key}"));
            }
            _ => {}
        }
    }
    Ok(Next::After(RESYNC))
}

/// Level-triggered safety net: every service is recomputed at least this often.
const RESYNC: Duration = Duration::from_secs(300);

/// Run the EndpointSlice controller until `shutdown` resolves.
pub async fn run(client: Client, shutdown: impl Future<Output = ()>) {
    let (services, svc_events) = runtime::reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let (pods, pod_events) =
        runtime::reflect(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let (slices, slice_events) = runtime::reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}")),
    );
    // A pod change can matter to any service in its namespace: one whose selector matches
    // the pod now, or matched it before its labels changed.
    let svc_store = services.clone();
    let services_of = move |pod: &Pod| -> Vec<ObjectRef<Service>> {
        let ns = pod.metadata.namespace.clone();
        svc_store
            .state()
            .into_iter()
            .filter(|s| s.metadata.namespace == ns)
            .filter(|s| s.spec.as_ref().is_some_and(|sp| sp.selector.is_some()))
            .map(|s| ObjectRef::from_obj(&*s))
            .collect()
    };
    let owner_of = |slice: &EndpointSlice| {
        slice
            .labels()
            .get(LABEL_SERVICE_NAME)
            .map(|n| ObjectRef::new(n).within(&slice.namespace().unwrap_or_default()))
    };
    let ctx = Arc::new(Ctx {
        client,
        pods,
        slices,
    });
    let triggers = vec![
        runtime::map(svc_events, |s: &Service| Some(ObjectRef::from_obj(s))),
        runtime::map(pod_events, services_of),
        runtime::map(slice_events, owner_of),
    ];
    runtime::run(
        "endpointslice",
        services,
        triggers,
        move |svc| reconcile(svc, ctx.clone()),
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests;
