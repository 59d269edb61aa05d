//! The thin Kubernetes side: kube-rs reflectors keep local caches of Ingresses,
//! IngressClasses, Services, EndpointSlices and Secrets; after every burst of changes the
//! routing table is rebuilt from those caches (the pure [`Builder`]) and swapped in; a
//! burst that changed only EndpointSlices updates the current table's backends instead
//! ([`Builder::update_endpoints`]), the common case during rollouts and scaling.
//! Nothing is served from a partial cache: the first table is built once every watch has
//! finished its initial list. After each swap, Ingresses of our class whose
//! `status.loadBalancer` does not name the published address get it, through the status
//! subresource, and Ingresses no longer ours lose the entry we wrote there.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use futures::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass, IngressLoadBalancerIngress};
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
    let cleared = Arc::new(Mutex::new(HashSet::new()));
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
            publish_status(&client, &builder, &stores, ip, &cleared);
        }
    }
}

/// `ing`'s `status.loadBalancer.ingress`.
fn lb_entries(ing: &Ingress) -> &[IngressLoadBalancerIngress] {
    ing.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default()
}

/// Whether `e` is the entry weir writes for `ip`: the address alone.
fn is_our_entry(e: &IngressLoadBalancerIngress, ip: &str) -> bool {
    e.ip.as_deref() == Some(ip)
        && e.hostname.is_none()
        && e.ports.as_deref().is_none_or(<[_]>::is_empty)
}

/// Whether `ing`'s status.loadBalancer is exactly the one address `ip`.
fn publishes(ing: &Ingress, ip: &str) -> bool {
    matches!(lb_entries(ing), [one] if is_our_entry(one, ip))
}

/// The `status.loadBalancer.ingress` entries `ing` keeps once weir's entry for `ip` is
/// taken out, or `None` when it carries no entry of ours: then it is not ours to touch,
/// whatever another controller wrote there.
fn without_ours(ing: &Ingress, ip: &str) -> Option<Vec<IngressLoadBalancerIngress>> {
    let lb = lb_entries(ing);
    lb.iter().any(|e| is_our_entry(e, ip)).then(|| {
        lb.iter()
            .filter(|e| !is_our_entry(e, ip))
            .cloned()
            .collect()
    })
}

/// The status merge patch that leaves `rest` in `status.loadBalancer.ingress`. It carries
/// the resourceVersion the decision was made on, so an entry another controller wrote
/// meanwhile is never overwritten: the API server answers 409 and that write's watch event
/// brings the next decision. An empty `rest` removes the list, leaving `loadBalancer: {}`,
/// which is what kube-apiserver stores when a controller empties it (the field is
/// `omitempty`) and what `kubectl get ingress` shows as no ADDRESS.
fn clear_patch(resource_version: &str, rest: &[IngressLoadBalancerIngress]) -> serde_json::Value {
    let ingress = if rest.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!(rest)
    };
    serde_json::json!({
        "metadata": {"resourceVersion": resource_version},
        "status": {"loadBalancer": {"ingress": ingress}},
    })
}

/// An Ingress we no longer serve that still shows our address.
#[derive(Debug, PartialEq)]
struct Clear {
    ns: String,
    name: String,
    uid: String,
    patch: serde_json::Value,
}

/// The status writes for `ingresses`: those `ours` whose status does not publish `ip` yet,
/// and those not ours that still carry our entry. `cleared` holds the uids of Ingresses
/// not ours whose entry was taken out (or is being taken out) since they stopped being
/// ours; each is cleared once, so if another controller publishes the same address on
/// one of them (two controllers on one node) weir does not fight it. An Ingress that is
/// ours again, or gone, leaves `cleared`.
fn plan<'a>(
    ingresses: impl IntoIterator<Item = &'a Ingress>,
    ours: impl Fn(&Ingress) -> bool,
    ip: &str,
    cleared: &mut HashSet<String>,
) -> (Vec<(String, String)>, Vec<Clear>) {
    let (mut publish, mut clear) = (Vec::new(), Vec::new());
    let mut still_cleared = HashSet::new();
    for ing in ingresses {
        let (Some(ns), name, Some(uid)) = (ing.namespace(), ing.name_any(), ing.uid()) else {
            continue;
        };
        if ours(ing) {
            if !publishes(ing, ip) {
                publish.push((ns, name));
            }
        } else if cleared.contains(&uid) {
            still_cleared.insert(uid);
        } else if let (Some(rest), Some(rv)) = (without_ours(ing, ip), ing.resource_version()) {
            let patch = clear_patch(&rv, &rest);
            still_cleared.insert(uid.clone());
            clear.push(Clear {
                ns,
                name,
                uid,
                patch,
            });
        }
    }
    *cleared = still_cleared;
    (publish, clear)
}

/// Patch, in the background, the status of every Ingress we serve that does not publish
/// `ip` yet, and take our entry out of the Ingresses we no longer serve (see [`plan`]).
/// Our own patches come back as watch events and then match, so nothing loops. A failed
/// clear leaves `cleared`, so the next rebuild tries it again.
fn publish_status(
    client: &Client,
    builder: &Builder,
    stores: &Stores,
    ip: IpAddr,
    cleared: &Arc<Mutex<HashSet<String>>>,
) {
    let ip = ip.to_string();
    let classes = stores.classes.state();
    let (stale, clear) = plan(
        stores.ingresses.state().iter().map(|i| &**i),
        |i| builder.is_ours(i, &classes),
        &ip,
        &mut cleared.lock().unwrap_or_else(PoisonError::into_inner),
    );
    if stale.is_empty() && clear.is_empty() {
        return;
    }
    let client = client.clone();
    let cleared = cleared.clone();
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
        for c in clear {
            let api: Api<Ingress> = Api::namespaced(client.clone(), &c.ns);
            match api
                .patch_status(&c.name, &PatchParams::default(), &Patch::Merge(&c.patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(ingress = %format!("{}/{}", c.ns, c.name), %ip, "not ours any more: took the ingress address out of status.loadBalancer")
                }
                Err(e) => {
                    cleared
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&c.uid);
                    tracing::warn!(ingress = %format!("{}/{}", c.ns, c.name), error = %e, "cannot take the ingress address out of a status no longer ours")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::{
        IngressLoadBalancerStatus, IngressPortStatus, IngressStatus,
    };

    use super::*;
    use crate::fixtures::{backend, ingress};
    use crate::table::ClassFilter;

    fn entry(ip: &str) -> IngressLoadBalancerIngress {
        IngressLoadBalancerIngress {
            ip: Some(ip.to_string()),
            ..Default::default()
        }
    }

    fn with_entries(entries: Vec<IngressLoadBalancerIngress>) -> Ingress {
        Ingress {
            status: Some(IngressStatus {
                load_balancer: Some(IngressLoadBalancerStatus {
                    ingress: Some(entries),
                }),
            }),
            ..Default::default()
        }
    }

    fn with_status(ips: &[&str]) -> Ingress {
        with_entries(ips.iter().map(|ip| entry(ip)).collect())
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

    #[test]
    fn only_our_entry_is_taken_out() {
        let ip = "10.0.0.5";
        assert_eq!(without_ours(&with_status(&[ip]), ip), Some(vec![]));
        assert_eq!(
            without_ours(&with_status(&["10.0.0.6", ip, "10.0.0.7"]), ip),
            Some(vec![entry("10.0.0.6"), entry("10.0.0.7")])
        );
        // No entry of ours: not ours to touch.
        assert_eq!(without_ours(&Ingress::default(), ip), None);
        assert_eq!(without_ours(&with_status(&[]), ip), None);
        assert_eq!(without_ours(&with_status(&["10.0.0.6"]), ip), None);
        // Our address in an entry weir never writes (a hostname, ports) is another
        // controller's.
        let hostname = IngressLoadBalancerIngress {
            hostname: Some("lb.example.com".into()),
            ..entry(ip)
        };
        let ports = IngressLoadBalancerIngress {
            ports: Some(vec![IngressPortStatus {
                port: 443,
                protocol: "TCP".into(),
                error: None,
            }]),
            ..entry(ip)
        };
        assert_eq!(
            without_ours(&with_entries(vec![hostname.clone()]), ip),
            None
        );
        assert_eq!(without_ours(&with_entries(vec![ports.clone()]), ip), None);
        assert!(!publishes(&with_entries(vec![ports]), ip));
        assert_eq!(
            without_ours(&with_entries(vec![hostname.clone(), entry(ip)]), ip),
            Some(vec![hostname])
        );
    }

    #[test]
    fn a_cleared_status_keeps_the_other_entries_or_empties_the_load_balancer() {
        assert_eq!(
            clear_patch("42", &[]),
            serde_json::json!({
                "metadata": {"resourceVersion": "42"},
                "status": {"loadBalancer": {"ingress": null}},
            })
        );
        assert_eq!(
            clear_patch("42", &[entry("10.0.0.6")]),
            serde_json::json!({
                "metadata": {"resourceVersion": "42"},
                "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.6"}]}},
            })
        );
    }

    /// An Ingress `name` of class `class`, with status `ips`, uid `uid-<name>` and
    /// resourceVersion `rv`.
    fn ing(name: &str, class: &str, ips: &[&str], rv: &str) -> Ingress {
        let mut i = ingress(
            "default",
            name,
            vec![("a.example.com", "/", "Prefix", backend("svc", 80))],
        );
        if let Some(spec) = i.spec.as_mut() {
            spec.ingress_class_name = Some(class.into());
        }
        i.metadata.uid = Some(format!("uid-{name}"));
        i.metadata.resource_version = Some(rv.into());
        i.status = with_status(ips).status;
        i
    }

    fn names(clear: &[Clear]) -> Vec<&str> {
        clear.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn an_ingress_that_stops_being_ours_is_cleared_once() {
        let ip = "10.0.0.5";
        let builder = Builder::new(ClassFilter::default(), None);
        let ours = |i: &Ingress| builder.is_ours(i, &[]);
        let mut cleared = HashSet::new();

        let gone_nginx = ing("moved", "nginx", &[ip], "7");
        let ingresses = [
            ing("new", "weir", &[], "1"),
            ing("served", "weir", &[ip], "2"),
            gone_nginx.clone(),
            ing("shared", "nginx", &["10.0.0.6", ip], "8"),
            ing("theirs", "nginx", &["10.0.0.6"], "9"),
            ing("bare", "nginx", &[], "10"),
        ];
        let (publish, clear) = plan(&ingresses, ours, ip, &mut cleared);
        assert_eq!(publish, [("default".to_string(), "new".to_string())]);
        assert_eq!(names(&clear), ["moved", "shared"]);
        assert_eq!(clear[0].patch, clear_patch("7", &[]));
        assert_eq!(clear[1].patch, clear_patch("8", &[entry("10.0.0.6")]));
        assert_eq!(
            cleared,
            HashSet::from(["uid-moved".into(), "uid-shared".into()])
        );

        // The cache has not seen our patch yet, or another controller on this node
        // publishes the same address: weir does not write again.
        let (_, clear) = plan(&ingresses, ours, ip, &mut cleared);
        assert!(clear.is_empty(), "{clear:?}");
        // Our patch came back: nothing to do, still remembered while not ours.
        let ingresses = [
            ing("moved", "nginx", &[], "11"),
            ing("shared", "nginx", &["10.0.0.6"], "12"),
        ];
        let (publish, clear) = plan(&ingresses, ours, ip, &mut cleared);
        assert!(
            publish.is_empty() && clear.is_empty(),
            "{publish:?} {clear:?}"
        );
        assert_eq!(cleared.len(), 2);

        // Ours again: published, and forgotten; once it moves away again it is cleared again.
        let back = [ing("moved", "weir", &[], "13")];
        let (publish, _) = plan(&back, ours, ip, &mut cleared);
        assert_eq!(publish, [("default".to_string(), "moved".to_string())]);
        assert!(cleared.is_empty(), "{cleared:?}");
        let (_, clear) = plan([&gone_nginx], ours, ip, &mut cleared);
        assert_eq!(names(&clear), ["moved"]);

        // A failed clear is forgotten by the patch task; the next rebuild tries again.
        cleared.remove("uid-moved");
        let (_, clear) = plan([&gone_nginx], ours, ip, &mut cleared);
        assert_eq!(names(&clear), ["moved"]);
    }
}
