//! The ReplicaSet controller: creates and deletes pods until as many active pods as
//! `spec.replicas` carry the set's controller reference, adopts matching orphans, and
//! reports replicas, ready and available counts in status.
//!
//! Writes are tracked as expectations (as kube-controller-manager does): until the pods it
//! created or deleted show up in the watch, a ReplicaSet is not acted on again, so a slow
//! watch never doubles a scale-up.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use rand::Rng;
use tracing::{debug, info};

use crate::runtime::{self, Next};
use crate::util::{self, Context as _, Error, Result};

/// What one reconcile of a ReplicaSet should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Orphans to adopt (pod names).
    pub adopt: Vec<String>,
    /// Pods to create from the template.
    pub create: usize,
    /// Pods to delete, most expendable first (names).
    pub delete: Vec<String>,
    pub status: ReplicaSetStatus,
}

/// Desired minus actual for `rs` over the pods of its namespace.
pub fn plan(rs: &ReplicaSet, pods: &[Arc<Pod>], now: Timestamp) -> Result<Plan> {
    let spec = rs.spec.clone().unwrap_or_default();
    let selector = util::selector(&spec.selector).map_err(|reason| Error::Invalid {
        object: util::key(&rs.metadata),
        field: "spec.selector",
        reason,
    })?;
    let uid = rs.metadata.uid.as_deref().unwrap_or_default();
    let deleting = util::is_terminating(&rs.metadata);
    let mut adopt = Vec::new();
    let mut active: Vec<&Arc<Pod>> = Vec::new();
    for pod in pods {
        match util::controller_of(&pod.metadata) {
            Some(owner) if owner.uid == uid => {
                if util::is_active(pod) {
                    active.push(pod);
                }
            }
            Some(_) => {}
            None => {
                // Orphans that match are adopted (never while the set itself is being
                // deleted, or its pods would be caught in its deletion).
                if !deleting
                    && util::is_active(pod)
                    && util::labels_match(&selector, pod.metadata.labels.as_ref())
                {
                    adopt.push(pod.name_any());
                    active.push(pod);
                }
            }
        }
    }
    let want = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
    let mut plan = Plan {
        adopt,
        ..Default::default()
    };
    if !deleting {
        if active.len() < want {
            plan.create = want - active.len();
        } else if active.len() > want {
            let mut ranked = active.clone();
            ranked.sort_by_key(|p| deletion_rank(p));
            plan.delete = ranked[..active.len() - want]
                .iter()
                .map(|p| p.name_any())
                .collect();
        }
    }
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    // Status describes the pods as they are once this plan's deletions are made: a Deployment
    // scaling down by availability must never count a pod that is on its way out.
    active.retain(|p| !plan.delete.contains(&p.name_any()));
    let count = |f: &dyn Fn(&Pod) -> bool| active.iter().filter(|p| f(p)).count() as i32;
    plan.status = ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: Some(count(&|p| {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            template_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        })),
        ready_replicas: Some(count(&|p| util::is_ready(p))),
        available_replicas: Some(count(&|p| util::is_available(p, min_ready, now))),
        observed_generation: rs.metadata.generation,
        conditions: None,
        terminating_replicas: None,
    };
    Ok(plan)
}

/// Sort key: smaller means delete first — unscheduled before scheduled, pending before
/// running, not ready before ready, more restarts first, newer first (kube's ActivePods).
fn deletion_rank(pod: &Pod) -> (bool, u8, bool, i64, std::cmp::Reverse<Option<Timestamp>>) {
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let phase = match util::pod_phase(pod) {
        "Pending" => 0,
        "Unknown" => 1,
        _ => 2,
    };
    let restarts: i64 = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| i64::from(c.restart_count)).sum())
        .unwrap_or(0);
    (
        scheduled,
        phase,
        util::is_ready(pod),
        -restarts,
        std::cmp::Reverse(pod.metadata.creation_timestamp.as_ref().map(|t| t.0)),
    )
}

/// A pod for `rs` from its template, named like the API server's generateName would.
pub fn pod_from_template(rs: &ReplicaSet) -> Pod {
    let spec = rs.spec.clone().unwrap_or_default();
    let template = spec.template.unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-{}", rs.name_any(), random_suffix())),
            namespace: rs.metadata.namespace.clone(),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![util::owner_ref("apps/v1", "ReplicaSet", &rs.metadata)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }
}

/// Five characters from the API server's generateName alphabet (no vowels, no 0/1/3).
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Pods a ReplicaSet created or deleted and has not seen in the watch yet.
struct Expectation {
    created: HashSet<String>,
    deleted: HashSet<String>,
    until: Instant,
}

/// How long an unmet expectation blocks a ReplicaSet before it is recomputed anyway.
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(30);

struct Ctx {
    client: Client,
    pods: Store<Pod>,
    expectations: Mutex<HashMap<String, Expectation>>,
}

impl Ctx {
    fn satisfied(&self, key: &str, pods: &[Arc<Pod>]) -> bool {
        let mut all = self.expectations.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = all.get(key) else { return true };
        let names: HashSet<String> = pods.iter().map(|p| p.name_any()).collect();
        let created = e.created.iter().all(|n| names.contains(n));
        let deleted = e.deleted.iter().all(|n| {
            pods.iter()
                .find(|p| p.name_any() == *n)
                .is_none_or(|p| !util::is_active(p))
        });
        if (created && deleted) || Instant::now() > e.until {
            all.remove(key);
            return true;
        }
        false
    }

    fn expect(&self, key: String, created: HashSet<String>, deleted: HashSet<String>) {
        let mut all = self.expectations.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(
            key,
            Expectation {
                created,
                deleted,
                until: Instant::now() + EXPECTATION_TIMEOUT,
            },
        );
    }
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Next> {
    let key = util::key(&rs.metadata);
    if ctx.pods.wait_until_ready().await.is_err() {
        return Err(Error::NotReady(key));
    }
    let ns = rs.namespace().unwrap_or_default();
    let pods = ctx
        .pods
        .state_filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()));
    let mut plan = plan(&rs, &pods, Timestamp::now())?;
    // Until earlier creations and deletions show up, only the status is kept current (as
    // kube-controller-manager does); acting now would repeat them.
    let acting = ctx.satisfied(&key, &pods);
    if !acting {
        plan.adopt.clear();
        plan.create = 0;
        plan.delete.clear();
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for name in &plan.adopt {
        let Some(pod) = pods.iter().find(|p| p.name_any() == *name) else {
            continue;
        };
        let mut refs = pod.metadata.owner_references.clone().unwrap_or_default();
        refs.push(util::owner_ref("apps/v1", "ReplicaSet", &rs.metadata));
        // The uid makes the patch fail if the pod was replaced by a namesake meanwhile.
        let patch =
            serde_json::json!({"metadata": {"ownerReferences": refs, "uid": pod.metadata.uid}});
        info!(replicaset = %key, pod = %name, "adopting orphan");
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context(|| format!("adopting pod {ns}/{name} into {key}"))?;
    }
    let mut created = HashSet::new();
    let mut deleted = HashSet::new();
    let mut result = Ok(());
    for _ in 0..plan.create {
        let pod = pod_from_template(&rs);
        let name = pod.name_any();
        debug!(replicaset = %key, pod = %name, "creating pod");
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                created.insert(name);
            }
            Err(e) => {
                result = Err(e).context(|| format!("creating pod {ns}/{name} for {key}"));
                break;
            }
        }
    }
    for name in &plan.delete {
        debug!(replicaset = %key, pod = %name, "deleting pod");
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                deleted.insert(name.clone());
            }
            Err(e) if util::is_not_found(&e) => {}
            Err(e) => {
                result = Err(e).context(|| format!("deleting pod {ns}/{name} for {key}"));
                break;
            }
        }
    }
    if !created.is_empty() || !deleted.is_empty() {
        ctx.expect(key.clone(), created, deleted);
    }
    result?;
    if rs.status.as_ref() != Some(&plan.status) {
        let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({"status": plan.status});
        rs_api
            .patch_status(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .context(|| format!("updating status of {key}"))?;
    }
    if !acting {
        return Ok(Next::After(Duration::from_secs(1)));
    }
    // minReadySeconds makes availability change without any event.
    let min_ready = rs
        .spec
        .as_ref()
        .and_then(|s| s.min_ready_seconds)
        .unwrap_or(0);
    Ok(if min_ready > 0 {
        Next::After(Duration::from_secs(u64::try_from(min_ready).unwrap_or(1)))
    } else {
        Next::After(Duration::from_secs(300))
    })
}

/// Run the ReplicaSet controller until `shutdown` resolves.
pub async fn run(client: Client, shutdown: impl Future<Output = ()>) {
    let (sets, rs_events) = runtime::reflect(
        Api::<ReplicaSet>::all(client.clone()),
        watcher::Config::default(),
    );
    let (pods, pod_events) =
        runtime::reflect(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let set_store = sets.clone();
    // A pod matters to its controller, or, as an orphan, to every set that could adopt it.
    let sets_of = move |pod: &Pod| -> Vec<ObjectRef<ReplicaSet>> {
        let ns = pod.namespace().unwrap_or_default();
        match util::controller_of(&pod.metadata) {
            Some(o) if o.kind == "ReplicaSet" => vec![ObjectRef::new(&o.name).within(&ns)],
            Some(_) => vec![],
            None => set_store
                .state()
                .into_iter()
                .filter(|rs| rs.metadata.namespace.as_deref() == Some(ns.as_str()))
                .filter(|rs| {
                    rs.spec
                        .as_ref()
                        .and_then(|s| util::selector(&s.selector).ok())
                        .is_some_and(|sel| util::labels_match(&sel, pod.metadata.labels.as_ref()))
                })
                .map(|rs| ObjectRef::from_obj(&*rs))
                .collect(),
        }
    };
    let ctx = Arc::new(Ctx {
        client,
        pods,
        expectations: Mutex::new(HashMap::new()),
    });
    let triggers = vec![
        runtime::map(rs_events, |rs: &ReplicaSet| Some(ObjectRef::from_obj(rs))),
        runtime::map(pod_events, sets_of),
    ];
    runtime::run(
        "replicaset",
        sets,
        triggers,
        move |rs| reconcile(rs, ctx.clone()),
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests;
