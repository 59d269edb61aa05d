//! The thin Kubernetes side: kube-rs reflectors keep local caches of Ingresses,
//! IngressClasses, Services, EndpointSlices and Secrets; after every burst of changes the
//! routing table is rebuilt from those caches (the pure [`Builder`]) and swapped in; a
//! burst that changed only EndpointSlices updates the current table's backends instead
//! ([`Builder::update_endpoints`]), the common case during rollouts and scaling.
//! Nothing is served from a partial cache: the first table is built once every watch has
//! finished its initial list. After each swap, Ingresses of our class whose
//! `status.loadBalancer` does not name the published address get it, through the status
//! subresource.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::table::{Builder, Snapshot, Table};

const KINDS: usize = 5;
/// The index of EndpointSlices among [`KINDS`].
const SLICES: usize = 3;

/// One watch: its index among [`KINDS`] and whether the event ended the initial list.
fn watch<K>(
    client: &Client,
    idx: usize,
    writer: reflector::store::Writer<K>,
) -> BoxStream<'static, (usize, bool)>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(move |event| async move {
            match event {
                Ok(watcher::Event::InitDone) => Some((idx, true)),
                Ok(_) => Some((idx, false)),
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "ingress watch failed; retrying");
                    None
                }
            }
        })
        .boxed()
}

struct Stores {
    ingresses: Store<Ingress>,
    classes: Store<IngressClass>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    secrets: Store<Secret>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            ingresses: self.ingresses.state(),
            classes: self.classes.state(),
            services: self.services.state(),
            slices: self.slices.state(),
            secrets: self.secrets.state(),
        }
    }
}

/// Watch the API server and keep `table` current until `shutdown`.
pub async fn run(
    client: Client,
    mut builder: Builder,
    table: Arc<ArcSwap<Table>>,
    metrics: Arc<Metrics>,
    publish: Option<IpAddr>,
    shutdown: CancellationToken,
) {
    let (ingresses, w0) = reflector::store();
    let (classes, w1) = reflector::store();
    let (services, w2) = reflector::store();
    let (slices, w3) = reflector::store();
    let (secrets, w4) = reflector::store();
    let stores = Stores {
        ingresses,
        classes,
        services,
        slices,
        secrets,
    };
    let mut events = futures::stream::select_all([
        watch::<Ingress>(&client, 0, w0),
        watch::<IngressClass>(&client, 1, w1),
        watch::<Service>(&client, 2, w2),
        watch::<EndpointSlice>(&client, 3, w3),
        watch::<Secret>(&client, 4, w4),
    ]);
    let mut listed = [false; KINDS];
    // Kinds changed since the last table; `None` until the first full build.
    let mut changed: Option<[bool; KINDS]> = None;
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        let Some((idx, init_done)) = first else {
            return;
        };
        let mut note = |idx: usize, init_done: bool| {
            listed[idx] |= init_done;
            if let Some(c) = changed.as_mut() {
                c[idx] = true;
            }
        };
        note(idx, init_done);
        // Coalesce a burst (an initial list, a rollout) into one rebuild.
        while let Some(Some((idx, init_done))) = events.next().now_or_never() {
            note(idx, init_done);
        }
        if !listed.iter().all(|l| *l) {
            continue;
        }
        let started = std::time::Instant::now();
        let slices_only = changed.is_some_and(|c| (0..KINDS).all(|k| c[k] == (k == SLICES)));
        let next = if slices_only {
            builder.update_endpoints(&table.load(), &stores.snapshot())
        } else {
            builder.build(&stores.snapshot())
        };
        changed = Some([false; KINDS]);
        for p in next.problems.iter().filter(|p| !reported.contains(*p)) {
            tracing::warn!(problem = %p, "ingress configuration");
        }
        reported = next.problems.iter().cloned().collect();
        metrics.routes.set(next.routes as i64);
        metrics.swaps.inc();
        tracing::info!(
            routes = next.routes,
            took_us = started.elapsed().as_micros() as u64,
            endpoints_only = slices_only,
            "routing table swapped"
        );
        table.store(Arc::new(next));
        if let Some(ip) = publish {
            publish_status(&client, &builder, &stores, ip);
        }
    }
}

/// Whether `ing`'s status.loadBalancer is exactly the one address `ip`.
fn publishes(ing: &Ingress, ip: &str) -> bool {
    let lb = ing
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    matches!(lb, [one] if one.ip.as_deref() == Some(ip) && one.hostname.is_none())
}

/// Patch, in the background, the status of every Ingress we serve that does not publish
/// `ip` yet. Our own patch comes back as a watch event and then matches, so nothing loops.
fn publish_status(client: &Client, builder: &Builder, stores: &Stores, ip: IpAddr) {
    let ip = ip.to_string();
    let classes = stores.classes.state();
    let stale: Vec<(String, String)> = stores
        .ingresses
        .state()
        .iter()
        .filter(|i| builder.is_ours(i, &classes) && !publishes(i, &ip))
        .filter_map(|i| Some((i.namespace()?, i.name_any())))
        .collect();
    if stale.is_empty() {
        return;
    }
    let client = client.clone();
    tokio::spawn(async move {
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
        for (ns, name) in stale {
            let api: Api<Ingress> = Api::namespaced(client.clone(), &ns);
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(ingress = %format!("{ns}/{name}"), %ip, "published the ingress address in status.loadBalancer")
                }
                Err(e) => {
                    tracing::warn!(ingress = %format!("{ns}/{name}"), error = %e, "cannot update Ingress status")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::{
        IngressLoadBalancerIngress, IngressLoadBalancerStatus, IngressStatus,
    };

    use super::*;

    fn with_status(ips: &[&str]) -> Ingress {
        Ingress {
            status: Some(IngressStatus {
                load_balancer: Some(IngressLoadBalancerStatus {
                    ingress: Some(
                        ips.iter()
                            .map(|ip| IngressLoadBalancerIngress {
                                ip: Some(ip.to_string()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn status_is_patched_only_when_it_differs() {
        assert!(publishes(&with_status(&["10.0.0.5"]), "10.0.0.5"));
        assert!(!publishes(&Ingress::default(), "10.0.0.5"));
        assert!(!publishes(&with_status(&["10.0.0.6"]), "10.0.0.5"));
        assert!(!publishes(
            &with_status(&["10.0.0.5", "10.0.0.6"]),
            "10.0.0.5"
        ));
    }
}
