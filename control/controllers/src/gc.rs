//! The garbage collector: objects whose owners (by `ownerReferences` UID) are all gone are
//! deleted — background cascading, so deleting a Deployment takes its ReplicaSets and their
//! pods, and deleting a Service its EndpointSlices. Owners being deleted with the
//! `foregroundDeletion` finalizer get their dependents deleted first (then the finalizer is
//! removed); with the `orphan` finalizer their dependents are released instead.
//!
//! Absence is confirmed with a live GET before anything is deleted, so a watch that is
//! behind (an owner created after its dependent was seen) never causes a wrong deletion.
//!
//! A sweep looks at every object, so it runs only after an event that can change its
//! outcome (a delete, an owner in foreground or orphan deletion, a dependent whose owners
//! the caches do not hold) and every 30 s; an update of an object whose owner is present,
//! such as a pod's status or a slice's endpoints, costs one cache lookup per owner.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy,
};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

pub const FOREGROUND: &str = "foregroundDeletion";
pub const ORPHAN: &str = "orphan";

/// One object as the collector sees it.
#[derive(Clone, Debug)]
pub struct Obj {
    /// Index into the collector's resource list.
    pub kind: usize,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    pub owners: Vec<OwnerReference>,
    pub deleting: bool,
    pub finalizers: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Every owner is gone: delete (after confirming the owners' absence).
    DeleteOrphaned { obj: usize },
    /// A dependent of an owner in foreground deletion.
    DeleteForeground { obj: usize },
    /// Release a dependent of an owner deleted with orphan propagation.
    RemoveOwner { obj: usize, owner_uid: String },
    /// The owner's dependents are handled: let its deletion finish.
    RemoveFinalizer { obj: usize, finalizer: &'static str },
}

/// What to do about `objs`, given every object of the kinds the collector watches.
pub fn sweep(objs: &[Obj]) -> Vec<Action> {
    let uids: HashSet<&str> = objs.iter().map(|o| o.uid.as_str()).collect();
    let mut dependents: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, o) in objs.iter().enumerate() {
        for r in &o.owners {
            dependents.entry(r.uid.as_str()).or_default().push(i);
        }
    }
    let mut out = Vec::new();
    for (i, o) in objs.iter().enumerate() {
        if !o.owners.is_empty()
            && !o.deleting
            && o.owners.iter().all(|r| !uids.contains(r.uid.as_str()))
        {
            out.push(Action::DeleteOrphaned { obj: i });
        }
        if !o.deleting {
            continue;
        }
        let deps = dependents
            .get(o.uid.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        if o.finalizers.iter().any(|f| f == ORPHAN) {
            for &d in deps {
                out.push(Action::RemoveOwner {
                    obj: d,
                    owner_uid: o.uid.clone(),
                });
            }
            if deps.is_empty() {
                out.push(Action::RemoveFinalizer {
                    obj: i,
                    finalizer: ORPHAN,
                });
            }
        } else if o.finalizers.iter().any(|f| f == FOREGROUND) {
            for &d in deps {
                if !objs[d].deleting {
                    out.push(Action::DeleteForeground { obj: d });
                }
            }
            if deps.is_empty() {
                out.push(Action::RemoveFinalizer {
                    obj: i,
                    finalizer: FOREGROUND,
                });
            }
        }
    }
    out
}

fn resources() -> Vec<ApiResource> {
    vec![
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<ReplicaSet>(&()),
        ApiResource::erase::<Deployment>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<EndpointSlice>(&()),
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<Secret>(&()),
    ]
}

fn api(client: &Client, ar: &ApiResource, ns: Option<&str>) -> Api<DynamicObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// The index in `ars` of the owner's kind, if the collector knows it.
fn kind_of(ars: &[ApiResource], r: &OwnerReference) -> Option<usize> {
    ars.iter()
        .position(|a| a.kind == r.kind && a.api_version == r.api_version)
}

/// Whether the owner `r` of an object in `ns` is really gone (GET says 404 or another UID).
/// Owners of kinds the collector does not know are never presumed gone.
async fn owner_gone(
    client: &Client,
    ars: &[ApiResource],
    ns: Option<&str>,
    r: &OwnerReference,
) -> bool {
    let Some(kind) = kind_of(ars, r) else {
        return false;
    };
    match api(client, &ars[kind], ns).get_opt(&r.name).await {
        Ok(None) => true,
        Ok(Some(o)) => o.metadata.uid.as_deref() != Some(r.uid.as_str()),
        Err(_) => false,
    }
}

async fn act(
    client: &Client,
    ars: &[ApiResource],
    objs: &[Obj],
    action: &Action,
) -> Result<(), kube::Error> {
    let o = match action {
        Action::DeleteOrphaned { obj }
        | Action::DeleteForeground { obj }
        | Action::RemoveOwner { obj, .. }
        | Action::RemoveFinalizer { obj, .. } => &objs[*obj],
    };
    let a = api(client, &ars[o.kind], o.namespace.as_deref());
    let ignore_404 = |r: Result<(), kube::Error>| match r {
        Err(e) if crate::util::is_not_found(&e) => Ok(()),
        r => r,
    };
    match action {
        Action::DeleteOrphaned { .. } => {
            for r in &o.owners {
                if !owner_gone(client, ars, o.namespace.as_deref(), r).await {
                    return Ok(());
                }
            }
            info!(kind = %ars[o.kind].kind, namespace = ?o.namespace, name = %o.name, "deleting: every owner is gone");
            ignore_404(
                a.delete(&o.name, &DeleteParams::background())
                    .await
                    .map(drop),
            )
        }
        Action::DeleteForeground { .. } => {
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Foreground),
                ..DeleteParams::default()
            };
            ignore_404(a.delete(&o.name, &dp).await.map(drop))
        }
        Action::RemoveOwner { owner_uid, .. } => {
            let refs: Vec<&OwnerReference> =
                o.owners.iter().filter(|r| r.uid != *owner_uid).collect();
            let patch = serde_json::json!({"metadata": {"ownerReferences": refs}});
            ignore_404(
                a.patch(&o.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop),
            )
        }
        Action::RemoveFinalizer { finalizer, .. } => {
            let rest: Vec<&String> = o.finalizers.iter().filter(|f| f != finalizer).collect();
            let patch = serde_json::json!({"metadata": {"finalizers": rest}});
            ignore_404(
                a.patch(&o.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop),
            )
        }
    }
}

fn snapshot(stores: &[Store<DynamicObject>]) -> Vec<Obj> {
    stores
        .iter()
        .enumerate()
        .flat_map(|(kind, s)| {
            s.state().into_iter().map(move |o| Obj {
                kind,
                namespace: o.metadata.namespace.clone(),
                name: o.name_any(),
                uid: o.metadata.uid.clone().unwrap_or_default(),
                owners: o.metadata.owner_references.clone().unwrap_or_default(),
                deleting: o.metadata.deletion_timestamp.is_some(),
                finalizers: o.metadata.finalizers.clone().unwrap_or_default(),
            })
        })
        .collect()
}

/// Whether a sweep could act because `o` was created or changed (see the module header).
fn may_act(ars: &[ApiResource], stores: &[Store<DynamicObject>], o: &DynamicObject) -> bool {
    let finalizers = o.metadata.finalizers.iter().flatten();
    if o.metadata.deletion_timestamp.is_some() {
        return finalizers
            .into_iter()
            .any(|f| f == FOREGROUND || f == ORPHAN);
    }
    let owners = o.metadata.owner_references.as_deref().unwrap_or_default();
    let ns = o.metadata.namespace.as_deref();
    !owners.is_empty() && !owners.iter().any(|r| owner_cached(ars, stores, ns, r))
}

/// Whether the caches hold the owner `r` (same UID). Owners of kinds the collector does not
/// know count as held: they are never presumed gone.
fn owner_cached(
    ars: &[ApiResource],
    stores: &[Store<DynamicObject>],
    ns: Option<&str>,
    r: &OwnerReference,
) -> bool {
    let Some(kind) = kind_of(ars, r) else {
        return true;
    };
    let mut key = ObjectRef::new_with(&r.name, ars[kind].clone());
    if let Some(ns) = ns {
        key = key.within(ns);
    }
    stores[kind]
        .get(&key)
        .is_some_and(|owner| owner.metadata.uid.as_deref() == Some(r.uid.as_str()))
}

/// A watch event, as the collector's loop needs it.
enum Seen {
    /// Created or changed: check this object only.
    Applied(Box<DynamicObject>),
    /// A delete (it may free dependents or finish an owner), or a (re)listed cache.
    Sweep,
    Nothing,
}

/// How often the collector sweeps at most, and at least.
const MIN_INTERVAL: Duration = Duration::from_millis(500);
const MAX_INTERVAL: Duration = Duration::from_secs(30);

/// Run the garbage collector until `shutdown` resolves.
pub async fn run(client: Client, shutdown: impl Future<Output = ()>) {
    let ars = resources();
    let mut stores = Vec::new();
    let mut streams = Vec::new();
    for ar in &ars {
        let writer = reflector::store::Writer::new(ar.clone());
        let store = writer.as_reader();
        let events = watcher(api(&client, ar, None), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .map(|e| match e {
                Ok(watcher::Event::Apply(o)) => Seen::Applied(Box::new(o)),
                Ok(watcher::Event::Delete(_) | watcher::Event::InitDone) => Seen::Sweep,
                // Initial objects are swept at InitDone; a failed watch re-lists.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) | Err(_) => Seen::Nothing,
            })
            .boxed();
        stores.push(store);
        streams.push(events);
    }
    let mut events = stream::select_all(streams);
    tokio::pin!(shutdown);
    let mut dirty = false;
    let mut ticker = tokio::time::interval(MIN_INTERVAL);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            Some(seen) = events.next() => match seen {
                Seen::Applied(o) => dirty |= may_act(&ars, &stores, &o),
                Seen::Sweep => dirty = true,
                Seen::Nothing => {}
            },
            _ = ticker.tick() => {
                // A store still filling may miss an owner; the live GET before each
                // deletion covers that.
                if !dirty && last_sweep.elapsed() < MAX_INTERVAL {
                    continue;
                }
                dirty = false;
                last_sweep = tokio::time::Instant::now();
                let objs = snapshot(&stores);
                for action in sweep(&objs) {
                    if let Err(e) = act(&client, &ars, &objs, &action).await {
                        warn!(?action, error = %e, "garbage collection step failed; retried on the next sweep");
                        dirty = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(uid: &str, owners: &[&str]) -> Obj {
        Obj {
            kind: 0,
            namespace: Some("default".into()),
            name: uid.into(),
            uid: uid.into(),
            owners: owners
                .iter()
                .map(|u| OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "ReplicaSet".into(),
                    name: (*u).into(),
                    uid: (*u).into(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                })
                .collect(),
            deleting: false,
            finalizers: vec![],
        }
    }

    fn dynamic(
        ar: &ApiResource,
        name: &str,
        uid: &str,
        owner: Option<(&str, &str)>,
    ) -> DynamicObject {
        let mut o = DynamicObject::new(name, ar).within("default");
        o.metadata.uid = Some(uid.into());
        o.metadata.owner_references = owner.map(|(kind, uid)| {
            vec![OwnerReference {
                api_version: if kind == "ReplicaSet" {
                    "apps/v1"
                } else {
                    "example.com/v1"
                }
                .into(),
                kind: kind.into(),
                name: "owner".into(),
                uid: uid.into(),
                ..Default::default()
            }]
        });
        o
    }

    #[test]
    fn only_events_that_can_change_a_sweep_trigger_one() {
        let ars = resources();
        let mut writers: Vec<_> = ars
            .iter()
            .map(|ar| reflector::store::Writer::new(ar.clone()))
            .collect();
        let stores: Vec<_> = writers.iter().map(|w| w.as_reader()).collect();
        let (pod, rs) = (&ars[0], &ars[1]);
        writers[1].apply_watcher_event(&watcher::Event::Apply(dynamic(rs, "owner", "rs-1", None)));

        // A pod of a cached ReplicaSet: a status update cannot free it.
        assert!(!may_act(
            &ars,
            &stores,
            &dynamic(pod, "p", "p", Some(("ReplicaSet", "rs-1")))
        ));
        // Its owner of that name was replaced (another UID), or is of a kind never presumed gone.
        assert!(may_act(
            &ars,
            &stores,
            &dynamic(pod, "p", "p", Some(("ReplicaSet", "rs-0")))
        ));
        assert!(!may_act(
            &ars,
            &stores,
            &dynamic(pod, "p", "p", Some(("Widget", "w")))
        ));
        // No owner: nothing to collect.
        assert!(!may_act(&ars, &stores, &dynamic(pod, "p", "p", None)));
        // Owners in foreground or orphan deletion, but not plain graceful deletion.
        let mut deleting = dynamic(rs, "owner", "rs-1", None);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(!may_act(&ars, &stores, &deleting));
        deleting.metadata.finalizers = Some(vec![FOREGROUND.into()]);
        assert!(may_act(&ars, &stores, &deleting));
        deleting.metadata.finalizers = Some(vec![ORPHAN.into()]);
        assert!(may_act(&ars, &stores, &deleting));
    }

    #[test]
    fn dependents_of_gone_owners_are_collected_but_not_of_living_ones() {
        let objs = vec![
            obj("rs", &["deploy"]),
            obj("pod", &["rs"]),
            obj("free", &[]),
            obj("shared", &["rs", "gone"]),
        ];
        assert_eq!(sweep(&objs), vec![Action::DeleteOrphaned { obj: 0 }]);
    }

    #[test]
    fn foreground_deletes_dependents_first_then_lets_the_owner_go() {
        let mut owner = obj("rs", &[]);
        owner.deleting = true;
        owner.finalizers = vec![FOREGROUND.into()];
        let objs = vec![owner.clone(), obj("pod", &["rs"])];
        assert_eq!(sweep(&objs), vec![Action::DeleteForeground { obj: 1 }]);
        assert_eq!(
            sweep(&[owner]),
            vec![Action::RemoveFinalizer {
                obj: 0,
                finalizer: FOREGROUND
            }]
        );
    }

    #[test]
    fn orphan_propagation_releases_dependents() {
        let mut owner = obj("rs", &[]);
        owner.deleting = true;
        owner.finalizers = vec![ORPHAN.into()];
        let objs = vec![owner.clone(), obj("pod", &["rs"])];
        assert_eq!(
            sweep(&objs),
            vec![Action::RemoveOwner {
                obj: 1,
                owner_uid: "rs".into()
            }]
        );
        assert_eq!(
            sweep(&[owner]),
            vec![Action::RemoveFinalizer {
                obj: 0,
                finalizer: ORPHAN
            }]
        );
    }
}
