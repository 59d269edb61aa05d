//! The Deployment controller: one ReplicaSet per pod template revision, rolled with
//! RollingUpdate (maxSurge / maxUnavailable against available pods) or Recreate, revision
//! history in the ReplicaSets' `deployment.kubernetes.io/revision` annotation (which
//! `kubectl rollout history/undo` read), and the status `kubectl rollout status` waits on:
//! observedGeneration, updated/ready/available replicas and the Available and Progressing
//! conditions — Progressing=False with reason ProgressDeadlineExceeded once a rollout has
//! made no progress for `progressDeadlineSeconds` (default 600). Each reconcile takes one step, as kube-controller-manager does; the
//! ReplicaSets' status changes trigger the next.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tracing::info;

use crate::runtime::{self, Next};
use crate::util::{self, Context as _, Error, Result};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const HASH_LABEL: &str = "pod-template-hash";
const DEFAULT_HISTORY_LIMIT: i32 = 10;
/// The Progressing reason of a rollout that made no progress for progressDeadlineSeconds.
pub const DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";

/// spec.progressDeadlineSeconds (default 600); `None` when it is i32::MAX, which
/// Kubernetes reads as "no deadline".
fn progress_deadline(d: &Deployment) -> Option<SignedDuration> {
    let secs = d
        .spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(600);
    (secs != i32::MAX).then(|| SignedDuration::from_secs(i64::from(secs.max(0))))
}

/// When an unfinished rollout must be looked at again to notice it ran out of time: just
/// after its Progressing condition's lastUpdateTime plus the deadline.
pub fn deadline_recheck(
    d: &Deployment,
    status: &DeploymentStatus,
    now: Timestamp,
) -> Option<Duration> {
    if d.spec.as_ref().and_then(|s| s.paused) == Some(true) {
        return None;
    }
    let limit = progress_deadline(d)?;
    let c = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing")?;
    if c.status != "True" || c.reason.as_deref() == Some("NewReplicaSetAvailable") {
        return None;
    }
    let due = c.last_update_time.as_ref()?.0 + limit;
    let wait = Duration::try_from(due.duration_since(now)).unwrap_or(Duration::ZERO);
    Some(wait + Duration::from_millis(500))
}

/// What one reconcile of a Deployment should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// A new ReplicaSet for the current template.
    pub create: Option<ReplicaSet>,
    /// (ReplicaSet name, new spec.replicas).
    pub scale: Vec<(String, i32)>,
    /// (ReplicaSet name, revision): an old template came back (rollback) and becomes the
    /// newest revision.
    pub set_revision: Option<(String, String)>,
    /// Old, empty ReplicaSets beyond revisionHistoryLimit.
    pub delete: Vec<String>,
    pub status: DeploymentStatus,
    /// The deployment's own revision annotation.
    pub revision: String,
}

/// The pod-template-hash of a template: FNV-1a over its JSON (without the hash label),
/// printed in decimal and mapped into the API server's safe alphabet, as Kubernetes does.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let json = serde_json::to_vec(&strip_hash(template)).unwrap_or_default();
    let mut h: u32 = 0x811c_9dc5;
    for b in json {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()] as char)
        .collect()
}

fn strip_hash(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = template.clone();
    if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
    }
    t
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status
        .as_ref()
        .map(|s| {
            (
                s.replicas,
                s.ready_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

/// An int or a percentage of `total`, rounding up (surge) or down (unavailable).
fn scaled(
    v: Option<&IntOrString>,
    total: i32,
    round_up: bool,
    field: &'static str,
    key: &str,
) -> Result<i32> {
    let v = v.cloned().unwrap_or(IntOrString::String("25%".into()));
    match v {
        IntOrString::Int(i) if i >= 0 => Ok(i),
        IntOrString::String(s) if s.ends_with('%') => {
            let pct: i64 = s[..s.len() - 1].parse().map_err(|_| Error::Invalid {
                object: key.to_string(),
                field,
                reason: format!("{s:?} is not a percentage"),
            })?;
            let x = i64::from(total) * pct;
            let r = if round_up { (x + 99) / 100 } else { x / 100 };
            Ok(i32::try_from(r).unwrap_or(i32::MAX))
        }
        other => Err(Error::Invalid {
            object: key.to_string(),
            field,
            reason: format!("{other:?} must be a non-negative integer or a percentage"),
        }),
    }
}

/// (maxSurge, maxUnavailable) for `desired` replicas; both zero would deadlock, so
/// maxUnavailable becomes 1, as in Kubernetes.
pub fn surge_and_unavailable(d: &Deployment, desired: i32) -> Result<(i32, i32)> {
    let key = util::key(&d.metadata);
    let ru = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.clone())
        .unwrap_or_default();
    let surge = scaled(
        ru.max_surge.as_ref(),
        desired,
        true,
        "spec.strategy.rollingUpdate.maxSurge",
        &key,
    )?;
    let unavailable = scaled(
        ru.max_unavailable.as_ref(),
        desired,
        false,
        "spec.strategy.rollingUpdate.maxUnavailable",
        &key,
    )?;
    if surge == 0 && unavailable == 0 {
        return Ok((0, 1));
    }
    Ok((surge, unavailable.min(desired)))
}

/// One step of `d` over the ReplicaSets it controls.
pub fn plan(d: &Deployment, owned: &[Arc<ReplicaSet>], now: Timestamp) -> Result<Plan> {
    let spec = d.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let (surge, max_unavailable) = if recreate {
        (0, desired)
    } else {
        surge_and_unavailable(d, desired)?
    };
    let template = spec.template.clone();
    let hash = template_hash(&template);

    // Oldest first, so scale-downs take the oldest revisions first.
    let mut all: Vec<ReplicaSet> = owned.iter().map(|r| (**r).clone()).collect();
    all.sort_by_key(|r| {
        (
            revision_of(r),
            r.metadata.creation_timestamp.as_ref().map(|t| t.0),
        )
    });
    let new_idx = all.iter().position(|r| {
        r.spec
            .as_ref()
            .and_then(|s| s.template.as_ref())
            .is_some_and(|t| strip_hash(t) == template)
    });
    let max_old_rev = all
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != new_idx)
        .map(|(_, r)| revision_of(r))
        .max()
        .unwrap_or(0);
    let mut plan = Plan::default();
    let new_rev = match new_idx {
        Some(i) if revision_of(&all[i]) > max_old_rev => revision_of(&all[i]),
        Some(i) => {
            plan.set_revision = Some((all[i].name_any(), (max_old_rev + 1).to_string()));
            max_old_rev + 1
        }
        None => max_old_rev + 1,
    };
    plan.revision = new_rev.to_string();

    let old_idx: Vec<usize> = (0..all.len()).filter(|i| Some(*i) != new_idx).collect();
    let old_active = old_idx.iter().any(|&i| replicas(&all[i]) > 0);
    let old_pods = old_idx.iter().any(|&i| status_of(&all[i]).0 > 0);
    let total_spec: i32 = all.iter().map(replicas).sum();
    let mut targets: Vec<i32> = all.iter().map(replicas).collect();
    let mut new_target = new_idx.map(|i| targets[i]).unwrap_or(0);

    if spec.paused != Some(true) {
        if recreate {
            if old_active {
                for &i in &old_idx {
                    targets[i] = 0;
                }
            } else if !old_pods {
                new_target = desired;
            }
        } else if !old_active {
            // Nothing to replace: a plain scale.
            new_target = desired;
        } else if new_target > desired {
            new_target = desired;
        } else if new_target < desired && total_spec < desired + surge {
            new_target += (desired + surge - total_spec).min(desired - new_target);
        }
        let scaled_up = new_target > new_idx.map(|i| replicas(&all[i])).unwrap_or(0);
        if !recreate && old_active && !scaled_up {
            scale_down_old(
                &all,
                &old_idx,
                new_idx,
                desired,
                max_unavailable,
                &mut targets,
            );
        }
    }
    match new_idx {
        Some(i) => targets[i] = new_target,
        None => {
            let mut rs = new_replica_set(d, &template, &hash, new_rev);
            if let Some(s) = rs.spec.as_mut() {
                s.replicas = Some(new_target);
            }
            plan.create = Some(rs);
        }
    }
    for (i, rs) in all.iter().enumerate() {
        if targets[i] != replicas(rs) {
            plan.scale.push((rs.name_any(), targets[i]));
        }
    }
    // Revision history: empty old sets beyond the limit go, oldest first.
    let limit =
        usize::try_from(spec.revision_history_limit.unwrap_or(DEFAULT_HISTORY_LIMIT)).unwrap_or(0);
    let empty_old: Vec<&ReplicaSet> = old_idx
        .iter()
        .map(|&i| &all[i])
        .filter(|r| replicas(r) == 0 && status_of(r).0 == 0)
        .collect();
    if empty_old.len() > limit {
        plan.delete = empty_old[..empty_old.len() - limit]
            .iter()
            .map(|r| r.name_any())
            .collect();
    }
    plan.status = status(d, &all, new_idx, &plan, desired, max_unavailable, now);
    Ok(plan)
}

/// Scale old ReplicaSets down as far as maxUnavailable allows: first their unavailable
/// pods, then available ones while enough stay available (kube's reconcileOldReplicaSets).
fn scale_down_old(
    all: &[ReplicaSet],
    old_idx: &[usize],
    new_idx: Option<usize>,
    desired: i32,
    max_unavailable: i32,
    targets: &mut [i32],
) {
    let all_pods: i32 = targets.iter().sum();
    let min_available = desired - max_unavailable;
    let new_unavailable = new_idx
        .map(|i| replicas(&all[i]) - status_of(&all[i]).2)
        .unwrap_or(0)
        .max(0);
    let mut budget = all_pods - min_available - new_unavailable;
    if budget <= 0 {
        return;
    }
    for &i in old_idx {
        let unhealthy = (targets[i] - status_of(&all[i]).2).max(0);
        let n = unhealthy.min(budget);
        targets[i] -= n;
        budget -= n;
        if budget == 0 {
            break;
        }
    }
    let available: i32 = all.iter().map(|r| status_of(r).2).sum();
    let mut excess = available - min_available;
    for &i in old_idx {
        if excess <= 0 {
            break;
        }
        let n = targets[i].min(excess);
        targets[i] -= n;
        excess -= n;
    }
}

fn new_replica_set(
    d: &Deployment,
    template: &PodTemplateSpec,
    hash: &str,
    revision: i64,
) -> ReplicaSet {
    let spec = d.spec.clone().unwrap_or_default();
    let mut template = template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.into());
    let labels = meta.labels.clone();
    let mut selector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.into());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}", d.name_any())),
            namespace: d.metadata.namespace.clone(),
            labels,
            annotations: Some([(REVISION.to_string(), revision.to_string())].into()),
            owner_references: Some(vec![util::owner_ref("apps/v1", "Deployment", &d.metadata)]),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(0),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    }
}

fn status(
    d: &Deployment,
    all: &[ReplicaSet],
    new_idx: Option<usize>,
    plan: &Plan,
    desired: i32,
    max_unavailable: i32,
    now: Timestamp,
) -> DeploymentStatus {
    let spec_total: i32 = all.iter().map(replicas).sum();
    let (replicas, ready, available) = all
        .iter()
        .map(status_of)
        .fold((0, 0, 0), |a, s| (a.0 + s.0, a.1 + s.1, a.2 + s.2));
    let updated = new_idx.map(|i| status_of(&all[i]).0).unwrap_or(0);
    let old = d.status.clone().unwrap_or_default();
    let new_name = new_idx
        .map(|i| all[i].name_any())
        .or_else(|| plan.create.as_ref().map(|r| r.name_any()))
        .unwrap_or_default();
    let complete = updated == desired && replicas == desired && available == desired;
    let available_cond = if available >= desired - max_unavailable {
        (
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".to_string(),
        )
    } else {
        (
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".to_string(),
        )
    };
    // Progress as the deployment controller measures it: more updated, ready or available
    // pods, or fewer old ones, than the last status recorded.
    let old_count = |v: Option<i32>| v.unwrap_or(0);
    let progressed = updated > old_count(old.updated_replicas)
        || replicas - updated < old_count(old.replicas) - old_count(old.updated_replicas)
        || ready > old_count(old.ready_replicas)
        || available > old_count(old.available_replicas);
    let prev_progressing = old
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing");
    let prev_reason = prev_progressing.and_then(|c| c.reason.as_deref());
    let paused = d.spec.as_ref().and_then(|s| s.paused) == Some(true);
    let timed_out = !paused
        && (prev_reason == Some(DEADLINE_EXCEEDED)
            || progress_deadline(d)
                .zip(prev_progressing)
                .is_some_and(|(limit, c)| {
                    c.last_update_time
                        .as_ref()
                        .is_some_and(|t| now.duration_since(t.0) > limit)
                }));
    // `fresh`: the condition records progress now even if it reads as before, so its
    // lastUpdateTime (where the deadline counts from) moves.
    let (progressing, fresh) = if plan.create.is_some() {
        (
            (
                "True",
                "NewReplicaSetCreated",
                format!("Created new replica set \"{new_name}\""),
            ),
            true,
        )
    } else if complete || (prev_reason == Some("NewReplicaSetAvailable") && replicas == updated) {
        // Once complete, a rollout stays complete until the next template change.
        (
            (
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            ),
            false,
        )
    } else if progressed || (!timed_out && prev_progressing.is_none()) {
        (
            (
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{new_name}\" is progressing."),
            ),
            progressed,
        )
    } else if timed_out {
        (
            (
                "False",
                DEADLINE_EXCEEDED,
                format!("ReplicaSet \"{new_name}\" has timed out progressing."),
            ),
            false,
        )
    } else {
        // No progress yet, within the deadline: the condition stands as it was.
        let p = prev_progressing.cloned().unwrap_or_default();
        (
            (
                if p.status == "False" { "False" } else { "True" },
                prev_reason.unwrap_or("ReplicaSetUpdated"),
                p.message.unwrap_or_default(),
            ),
            false,
        )
    };
    let cond = |type_: &str, (status, reason, message): (&str, &str, String), fresh: bool| {
        let prev = old.conditions.iter().flatten().find(|c| c.type_ == type_);
        let same = prev.is_some_and(|p| {
            p.status == status
                && p.reason.as_deref() == Some(reason)
                && p.message.as_deref() == Some(message.as_str())
        });
        if same && !fresh {
            return prev.cloned().unwrap_or_default();
        }
        let transition = match prev {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => Some(Time(now)),
        };
        DeploymentCondition {
            type_: type_.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_update_time: Some(Time(now)),
            last_transition_time: transition,
        }
    };
    DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((spec_total - available).max(0)),
        conditions: Some(vec![
            cond("Available", available_cond, false),
            cond("Progressing", progressing, fresh),
        ]),
        collision_count: old.collision_count,
        terminating_replicas: None,
    }
}

struct Ctx {
    client: Client,
    sets: Store<ReplicaSet>,
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Next> {
    let key = util::key(&d.metadata);
    if ctx.sets.wait_until_ready().await.is_err() {
        return Err(Error::NotReady(key));
    }
    if util::is_terminating(&d.metadata) {
        return Ok(Next::Wait);
    }
    let ns = d.namespace().unwrap_or_default();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let owned = ctx.sets.state_filter(|rs| {
        rs.metadata.namespace.as_deref() == Some(ns.as_str())
            && util::controller_of(&rs.metadata).is_some_and(|o| o.uid == uid)
    });
    let plan = plan(&d, &owned, Timestamp::now())?;
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(rs) = &plan.create {
        info!(deployment = %key, replicaset = %rs.name_any(), "creating replica set");
        match rs_api.create(&PostParams::default(), rs).await {
            Err(kube::Error::Api(s)) if s.code == 409 => {} // seen on the next reconcile
            r => {
                r.context(|| format!("creating ReplicaSet {ns}/{} for {key}", rs.name_any()))?;
            }
        }
    }
    if let Some((name, rev)) = &plan.set_revision {
        let patch = serde_json::json!({"metadata": {"annotations": {REVISION: rev}}});
        rs_api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context(|| format!("setting revision of ReplicaSet {ns}/{name}"))?;
    }
    for (name, n) in &plan.scale {
        info!(deployment = %key, replicaset = %name, replicas = n, "scaling");
        let patch = serde_json::json!({"spec": {"replicas": n}});
        rs_api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context(|| format!("scaling ReplicaSet {ns}/{name} to {n}"))?;
    }
    for name in &plan.delete {
        match rs_api.delete(name, &DeleteParams::background()).await {
            Err(e) if !util::is_not_found(&e) => {
                return Err(e).context(|| format!("deleting old ReplicaSet {ns}/{name}"));
            }
            _ => {}
        }
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    if d.annotations().get(REVISION) != Some(&plan.revision) {
        let patch = serde_json::json!({"metadata": {"annotations": {REVISION: plan.revision}}});
        api.patch(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .context(|| format!("annotating revision of {key}"))?;
    }
    if d.status.as_ref() != Some(&plan.status) {
        let patch = serde_json::json!({"status": plan.status});
        api.patch_status(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .context(|| format!("updating status of {key}"))?;
    }
    let resync = Duration::from_secs(300);
    let next =
        deadline_recheck(&d, &plan.status, Timestamp::now()).map_or(resync, |t| t.min(resync));
    Ok(Next::After(next))
}

/// Run the Deployment controller until `shutdown` resolves.
pub async fn run(client: Client, shutdown: impl Future<Output = ()>) {
    let (deployments, d_events) = runtime::reflect(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    );
    let (sets, rs_events) = runtime::reflect(
        Api::<ReplicaSet>::all(client.clone()),
        watcher::Config::default(),
    );
    let owner_of = |rs: &ReplicaSet| {
        util::controller_of(&rs.metadata)
            .filter(|o| o.kind == "Deployment")
            .map(|o| ObjectRef::new(&o.name).within(&rs.namespace().unwrap_or_default()))
    };
    let ctx = Arc::new(Ctx { client, sets });
    let triggers = vec![
        runtime::map(d_events, |d: &Deployment| Some(ObjectRef::from_obj(d))),
        runtime::map(rs_events, owner_of),
    ];
    runtime::run(
        "deployment",
        deployments,
        triggers,
        move |d| reconcile(d, ctx.clone()),
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests;
