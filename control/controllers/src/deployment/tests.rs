use std::sync::Arc;

use k8s_openapi::api::apps::v1::ReplicaSetStatus;
use serde_json::{Value, json};

use super::*;

fn deployment(replicas: i32, args: &str, strategy: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default", "uid": "d-uid", "generation": 2},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": strategy,
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "c", "image": "weir/echo", "args": [args]}]}}
        }
    }))
    .expect("deployment")
}

fn now() -> Timestamp {
    "2026-01-02T00:00:00Z".parse().expect("time")
}

/// The cluster as the Deployment controller sees it: its ReplicaSets, whose pods appear at
/// once and become available one tick after they appear.
#[derive(Default)]
struct Sim {
    sets: Vec<ReplicaSet>,
    created: usize,
}

impl Sim {
    fn step(&mut self, d: &Deployment) -> Plan {
        let owned: Vec<Arc<ReplicaSet>> = self.sets.iter().cloned().map(Arc::new).collect();
        let p = plan(d, &owned, now()).expect("plan");
        if let Some(rs) = &p.create {
            let mut rs = rs.clone();
            rs.metadata.creation_timestamp = Some(Time(
                Timestamp::from_second(1_700_000_000 + self.created as i64).expect("ts"),
            ));
            self.created += 1;
            self.sets.push(rs);
        }
        for (name, n) in &p.scale {
            let rs = self
                .sets
                .iter_mut()
                .find(|r| r.name_any() == *name)
                .expect("rs");
            rs.spec.as_mut().expect("spec").replicas = Some(*n);
        }
        if let Some((name, rev)) = &p.set_revision {
            let rs = self
                .sets
                .iter_mut()
                .find(|r| r.name_any() == *name)
                .expect("rs");
            rs.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(REVISION.into(), rev.clone());
        }
        self.sets.retain(|r| !p.delete.contains(&r.name_any()));
        p
    }

    /// Pods follow spec; those that existed before this tick become available.
    fn tick(&mut self) {
        for rs in &mut self.sets {
            let want = replicas(rs);
            let st = rs.status.get_or_insert_with(ReplicaSetStatus::default);
            let was = st.replicas;
            st.replicas = want;
            st.available_replicas = Some(want.min(was));
            st.ready_replicas = st.available_replicas;
        }
    }

    fn available(&self) -> i32 {
        self.sets.iter().map(|r| status_of(r).2).sum()
    }

    fn pods(&self) -> i32 {
        self.sets.iter().map(|r| status_of(r).0).sum()
    }

    /// Run until the plan has nothing left to do, checking `each` after every tick.
    fn settle(&mut self, d: &Deployment, mut each: impl FnMut(&Sim)) -> Plan {
        for _ in 0..100 {
            let p = self.step(d);
            self.tick();
            each(self);
            if p.create.is_none() && p.scale.is_empty() && p.set_revision.is_none() {
                let p = self.step(d);
                if p.create.is_none() && p.scale.is_empty() {
                    return p;
                }
            }
        }
        panic!("deployment did not settle");
    }
}

#[test]
fn first_rollout_creates_one_revision_and_completes() {
    let d = deployment(3, "v1", json!({}));
    let mut sim = Sim::default();
    let last = sim.settle(&d, |_| {});
    assert_eq!(sim.sets.len(), 1);
    let rs = &sim.sets[0];
    assert_eq!(replicas(rs), 3);
    assert_eq!(
        rs.annotations().get(REVISION).map(String::as_str),
        Some("1")
    );
    let hash = template_hash(&d.spec.clone().unwrap_or_default().template);
    assert_eq!(rs.name_any(), format!("web-{hash}"));
    assert_eq!(rs.labels().get(HASH_LABEL), Some(&hash));
    let sel = rs
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    assert_eq!(
        sel.match_labels.unwrap_or_default().get(HASH_LABEL),
        Some(&hash)
    );
    assert_eq!(last.revision, "1");
    let st = last.status;
    assert_eq!(
        (st.replicas, st.updated_replicas, st.available_replicas),
        (Some(3), Some(3), Some(3))
    );
    assert_eq!(st.observed_generation, Some(2));
    let conds = st.conditions.unwrap_or_default();
    let reason = |t: &str| {
        conds
            .iter()
            .find(|c| c.type_ == t)
            .and_then(|c| c.reason.clone())
    };
    assert_eq!(
        reason("Available").as_deref(),
        Some("MinimumReplicasAvailable")
    );
    assert_eq!(
        reason("Progressing").as_deref(),
        Some("NewReplicaSetAvailable")
    );
}

#[test]
fn rolling_update_respects_max_surge_and_max_unavailable() {
    let strategy =
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}});
    let mut sim = Sim::default();
    sim.settle(&deployment(4, "v1", strategy.clone()), |_| {});
    let v2 = deployment(4, "v2", strategy);
    sim.settle(&v2, |s| {
        assert!(s.available() >= 3, "available dropped to {}", s.available());
        assert!(
            s.pods() <= 5,
            "{} pods exceed replicas + maxSurge",
            s.pods()
        );
    });
    let live: Vec<&ReplicaSet> = sim.sets.iter().filter(|r| replicas(r) > 0).collect();
    assert_eq!(live.len(), 1);
    assert_eq!(
        live[0].annotations().get(REVISION).map(String::as_str),
        Some("2")
    );
    assert_eq!(sim.sets.len(), 2, "the old revision is kept for rollback");
}

#[test]
fn percentages_round_like_kubernetes_and_zero_zero_means_one_unavailable() {
    let d = deployment(
        10,
        "v1",
        json!({"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
    );
    assert_eq!(surge_and_unavailable(&d, 10).expect("ok"), (3, 2));
    let d = deployment(
        3,
        "v1",
        json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}),
    );
    assert_eq!(surge_and_unavailable(&d, 3).expect("ok"), (0, 1));
    let d = deployment(3, "v1", json!({"rollingUpdate": {"maxSurge": "lots"}}));
    let err = surge_and_unavailable(&d, 3).expect_err("bad").to_string();
    assert!(err.contains("maxSurge"), "{err}");
}

#[test]
fn rollback_reuses_the_old_replica_set_as_the_newest_revision() {
    let mut sim = Sim::default();
    sim.settle(&deployment(2, "v1", json!({})), |_| {});
    let v1_name = sim.sets[0].name_any();
    sim.settle(&deployment(2, "v2", json!({})), |_| {});
    // `kubectl rollout undo` copies the old ReplicaSet's template back.
    let back = sim.settle(&deployment(2, "v1", json!({})), |_| {});
    assert_eq!(
        sim.sets.len(),
        2,
        "no third ReplicaSet for a template seen before"
    );
    let v1 = sim
        .sets
        .iter()
        .find(|r| r.name_any() == v1_name)
        .expect("v1");
    assert_eq!(replicas(v1), 2);
    assert_eq!(
        v1.annotations().get(REVISION).map(String::as_str),
        Some("3")
    );
    assert_eq!(back.revision, "3");
}

#[test]
fn recreate_empties_old_pods_before_starting_new_ones() {
    let strategy = json!({"type": "Recreate"});
    let mut sim = Sim::default();
    sim.settle(&deployment(3, "v1", strategy.clone()), |_| {});
    let v2 = deployment(3, "v2", strategy);
    let mut saw_gap = false;
    sim.settle(&v2, |s| {
        let live: Vec<&ReplicaSet> = s.sets.iter().filter(|r| status_of(r).0 > 0).collect();
        assert!(live.len() <= 1, "old and new pods never run together");
        saw_gap |= live.is_empty();
    });
    assert!(saw_gap);
}

#[test]
fn scaling_without_a_template_change_resizes_the_current_set() {
    let mut sim = Sim::default();
    sim.settle(&deployment(3, "v1", json!({})), |_| {});
    sim.settle(&deployment(5, "v1", json!({})), |_| {});
    assert_eq!(sim.sets.len(), 1);
    assert_eq!(replicas(&sim.sets[0]), 5);
    sim.settle(&deployment(1, "v1", json!({})), |_| {});
    assert_eq!(replicas(&sim.sets[0]), 1);
}

#[test]
fn history_beyond_the_limit_is_deleted_oldest_first() {
    let mut sim = Sim::default();
    let with_limit = |v: &str| {
        let mut d = deployment(1, v, json!({}));
        d.spec.as_mut().expect("spec").revision_history_limit = Some(1);
        d
    };
    for v in ["v1", "v2", "v3"] {
        sim.settle(&with_limit(v), |_| {});
    }
    let mut revs: Vec<String> = sim
        .sets
        .iter()
        .filter_map(|r| r.annotations().get(REVISION).cloned())
        .collect();
    revs.sort();
    assert_eq!(revs, ["2", "3"]);
}

#[test]
fn a_rollout_without_progress_for_the_deadline_times_out_and_recovers_on_progress() {
    let mut d = deployment(2, "v1", json!({}));
    d.spec.as_mut().expect("spec").progress_deadline_seconds = Some(10);
    let mut sim = Sim::default();
    sim.step(&d);
    // The new ReplicaSet's pods exist but never become available.
    for rs in &mut sim.sets {
        rs.status = Some(ReplicaSetStatus {
            replicas: 2,
            ..Default::default()
        });
    }
    let owned: Vec<Arc<ReplicaSet>> = sim.sets.iter().cloned().map(Arc::new).collect();
    let at = |d: &Deployment, secs: i64| {
        let t = now() + SignedDuration::from_secs(secs);
        plan(d, &owned, t).expect("plan").status
    };
    let progressing = |st: &DeploymentStatus| {
        st.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Progressing")
            .map(|c| {
                (
                    c.status.clone(),
                    c.reason.clone().unwrap_or_default(),
                    c.last_update_time.as_ref().map(|t| t.0),
                )
            })
            .expect("Progressing condition")
    };
    // Pods appeared: progress, counted from now.
    d.status = Some(at(&d, 0));
    assert_eq!(
        progressing(d.status.as_ref().expect("status")),
        ("True".into(), "ReplicaSetUpdated".into(), Some(now()))
    );
    assert_eq!(
        deadline_recheck(&d, d.status.as_ref().expect("status"), now()),
        Some(Duration::from_millis(10_500))
    );
    // Nothing changes within the deadline…
    assert_eq!(Some(at(&d, 9)), d.status);
    // …and past it the rollout has timed out, and stays so.
    let late = at(&d, 11);
    let (status, reason, _) = progressing(&late);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", DEADLINE_EXCEEDED)
    );
    let message = late
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing")
        .and_then(|c| c.message.clone());
    let name = sim.sets[0].name_any();
    assert_eq!(
        message,
        Some(format!("ReplicaSet \"{name}\" has timed out progressing."))
    );
    d.status = Some(late);
    assert_eq!(
        deadline_recheck(&d, d.status.as_ref().expect("status"), now()),
        None
    );
    assert_eq!(Some(at(&d, 60)), d.status);
    // A pod turns available: progress again, and a new deadline from then.
    let mut sets = sim.sets.clone();
    if let Some(st) = sets[0].status.as_mut() {
        st.ready_replicas = Some(1);
        st.available_replicas = Some(1);
    }
    let owned: Vec<Arc<ReplicaSet>> = sets.into_iter().map(Arc::new).collect();
    let t = now() + SignedDuration::from_secs(70);
    let again = plan(&d, &owned, t).expect("plan").status;
    assert_eq!(
        progressing(&again),
        ("True".into(), "ReplicaSetUpdated".into(), Some(t))
    );
}
