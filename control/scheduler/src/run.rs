//! The scheduler as a Kubernetes client: watches nodes and pods into the snapshot, schedules
//! pending pods one at a time, binds them through `pods/binding` (concurrently, so an API
//! round trip never stalls the next decision), and marks pods that fit nowhere with
//! PodScheduled=False and kube-scheduler's reason, plus a `FailedScheduling` Warning Event
//! per attempt, aggregated into one Event per reason whose `count` grows
//! ([`crate::events`]; `kubectl describe pod` shows `(x3 over 40s)`). Unschedulable pods are
//! retried when a node changes in a way that matters to scheduling or a pod is deleted, and
//! at least every [`RunConfig::retry_interval`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Binding, Event, EventSource, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::core::{Config, Scheduler};
use crate::events::Recorder;
use crate::podinfo::PodInfo;
use crate::snapshot::NodeInfo;

#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Pods whose `spec.schedulerName` is this (or empty) are ours.
    pub scheduler_name: String,
    pub core: Config,
    /// How often pods that fit nowhere are retried even if nothing changed.
    pub retry_interval: Duration,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            scheduler_name: "default-scheduler".into(),
            core: Config::default(),
            retry_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("watch stream of {0} ended")]
    WatchEnded(&'static str),
}

/// The outcome of one binding request, reported back to the scheduling loop.
struct BindResult {
    uid: String,
    result: Result<(), kube::Error>,
}

struct State {
    core: Scheduler,
    config: RunConfig,
    recorder: Recorder,
    /// Pods waiting for a decision, by UID, in arrival order.
    queue: VecDeque<String>,
    pending: HashMap<String, Pod>,
    /// Pods that fit nowhere last time, retried on cluster changes.
    unschedulable: HashMap<String, Pod>,
    /// Pods assumed on a node whose binding is in flight.
    binding: HashMap<String, Pod>,
    /// UIDs seen during a watch re-list, to drop objects deleted while disconnected.
    relist_pods: Option<HashSet<String>>,
    relist_nodes: Option<HashSet<String>>,
}

/// Run the scheduler until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: RunConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let mut node_events = watcher(nodes, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut pod_events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let (bind_tx, mut bind_rx) = mpsc::unbounded_channel::<BindResult>();
    let mut retry = tokio::time::interval(config.retry_interval);
    let mut st = State {
        core: Scheduler::new(config.core),
        config,
        recorder: Recorder::new(client.clone()),
        queue: VecDeque::new(),
        pending: HashMap::new(),
        unschedulable: HashMap::new(),
        binding: HashMap::new(),
        relist_pods: None,
        relist_nodes: None,
    };
    tokio::pin!(shutdown);
    info!(scheduler = %st.config.scheduler_name, "scheduler started");
    loop {
        // Events first: a decision must see every node and pod change that has arrived.
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            ev = node_events.try_next() => match ev {
                Ok(Some(ev)) => st.on_node(ev),
                Ok(None) => return Err(RunError::WatchEnded("nodes")),
                Err(e) => warn!(error = %e, "node watch failed; retrying"),
            },
            ev = pod_events.try_next() => match ev {
                Ok(Some(ev)) => st.on_pod(ev),
                Ok(None) => return Err(RunError::WatchEnded("pods")),
                Err(e) => warn!(error = %e, "pod watch failed; retrying"),
            },
            Some(done) = bind_rx.recv() => st.on_bound(done),
            _ = retry.tick() => st.retry_unschedulable(),
            () = std::future::ready(()), if !st.queue.is_empty() => {
                st.schedule_next(&client, &bind_tx).await;
            }
        }
    }
}

fn uid(pod: &Pod) -> Option<String> {
    pod.metadata.uid.clone()
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl State {
    fn ours(&self, pod: &Pod) -> bool {
        let name = pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref());
        name.is_none_or(|n| n.is_empty() || n == self.config.scheduler_name)
    }

    fn on_node(&mut self, ev: watcher::Event<Node>) {
        match ev {
            watcher::Event::Init => self.relist_nodes = Some(HashSet::new()),
            watcher::Event::InitApply(node) | watcher::Event::Apply(node) => {
                if let (Some(seen), Some(name)) = (&mut self.relist_nodes, &node.metadata.name) {
                    seen.insert(name.clone());
                }
                match NodeInfo::from_node(&node) {
                    // A heartbeat changes nothing a filter reads: no retry, no new Event.
                    Ok(info) => {
                        if self.core.snapshot.upsert_node(info) {
                            self.retry_unschedulable();
                        }
                    }
                    Err(e) => {
                        warn!(node = ?node.metadata.name, error = %e, "ignoring node with unreadable allocatable")
                    }
                }
            }
            watcher::Event::Delete(node) => {
                if let Some(name) = &node.metadata.name {
                    self.core.snapshot.remove_node(name);
                }
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relist_nodes.take() {
                    for name in self.core.snapshot.node_names() {
                        if !seen.contains(&name) {
                            self.core.snapshot.remove_node(&name);
                        }
                    }
                }
                self.retry_unschedulable();
            }
        }
    }

    fn on_pod(&mut self, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Init => self.relist_pods = Some(HashSet::new()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                if let (Some(seen), Some(uid)) = (&mut self.relist_pods, uid(&pod)) {
                    seen.insert(uid);
                }
                self.pod_changed(pod);
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = uid(&pod) {
                    self.forget(&uid);
                    self.retry_unschedulable();
                }
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relist_pods.take() {
                    let gone: Vec<String> = self
                        .core
                        .snapshot
                        .pod_uids()
                        .chain(self.pending.keys().cloned())
                        .chain(self.unschedulable.keys().cloned())
                        .filter(|u| !seen.contains(u) && !self.binding.contains_key(u))
                        .collect();
                    for uid in gone {
                        self.forget(&uid);
                    }
                }
            }
        }
    }

    fn forget(&mut self, uid: &str) {
        self.core.snapshot.remove_pod(uid);
        self.pending.remove(uid);
        self.unschedulable.remove(uid);
    }

    fn pod_changed(&mut self, pod: Pod) {
        let Some(uid) = uid(&pod) else { return };
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        if is_terminal(&pod) {
            // A finished pod no longer holds its node's resources.
            self.forget(&uid);
            return;
        }
        if let Some(node) = node {
            self.pending.remove(&uid);
            self.unschedulable.remove(&uid);
            self.binding.remove(&uid);
            if self.core.snapshot.pod_node(&uid) != Some(node.as_str()) {
                match PodInfo::from_pod(&pod) {
                    Ok(info) => self.core.snapshot.add_pod(&info, &node),
                    Err(e) => {
                        warn!(pod = ?pod.metadata.name, error = %e, "bound pod not accounted")
                    }
                }
            }
            return;
        }
        if pod.metadata.deletion_timestamp.is_some() || !self.ours(&pod) {
            self.forget(&uid);
            return;
        }
        if self.binding.contains_key(&uid) {
            return; // assumed; the binding's outcome decides what happens next
        }
        if let Some(parked) = self.unschedulable.get_mut(&uid) {
            *parked = pod;
            return;
        }
        if self.pending.insert(uid.clone(), pod).is_none() {
            self.queue.push_back(uid);
        }
    }

    fn retry_unschedulable(&mut self) {
        for (uid, pod) in self.unschedulable.drain() {
            if self.pending.insert(uid.clone(), pod).is_none() {
                self.queue.push_back(uid);
            }
        }
    }

    async fn schedule_next(
        &mut self,
        client: &Client,
        bind_tx: &mpsc::UnboundedSender<BindResult>,
    ) {
        let Some(uid) = self.queue.pop_front() else {
            return;
        };
        let Some(pod) = self.pending.remove(&uid) else {
            return;
        };
        let info = match PodInfo::from_pod(&pod) {
            Ok(info) => info,
            Err(e) => {
                // Not retried until the pod changes: the same spec fails the same way.
                let msg = format!("pod spec cannot be scheduled: {e}");
                self.mark_unschedulable(client, &pod, "SchedulerError", &msg)
                    .await;
                return;
            }
        };
        match self.core.schedule(&info) {
            Ok(node) => {
                debug!(pod = %info.name, namespace = %info.namespace, %node, "binding");
                self.binding.insert(uid.clone(), pod);
                let api: Api<Pod> = Api::namespaced(client.clone(), &info.namespace);
                let tx = bind_tx.clone();
                tokio::spawn(async move {
                    let result = bind(&api, &info.name, &node).await;
                    let _ = tx.send(BindResult { uid, result });
                });
            }
            Err(fit) => {
                let msg = fit.to_string();
                info!(pod = %info.name, namespace = %info.namespace, reason = %msg, "unschedulable");
                self.mark_unschedulable(client, &pod, "Unschedulable", &msg)
                    .await;
                self.unschedulable.insert(uid, pod);
            }
        }
    }

    /// Set PodScheduled=False with `reason` and `message` (unless the condition already
    /// says so) and record a FailedScheduling Event, which the recorder aggregates.
    async fn mark_unschedulable(&self, client: &Client, pod: &Pod, reason: &str, message: &str) {
        let (Some(name), Some(ns)) = (&pod.metadata.name, &pod.metadata.namespace) else {
            return;
        };
        self.recorder.record(failed_scheduling_event(
            pod,
            message,
            &self.config.scheduler_name,
        ));
        let mut conditions = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        if conditions.iter().any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some(reason)
                && c.message.as_deref() == Some(message)
        }) {
            return;
        }
        conditions.retain(|c| c.type_ != "PodScheduled");
        conditions.push(k8s_openapi::api::core::v1::PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        });
        let patch = serde_json::json!({"status": {"conditions": conditions}});
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(pod = %name, namespace = %ns, error = %e, "could not record PodScheduled=False");
        }
    }

    fn on_bound(&mut self, done: BindResult) {
        let Some(pod) = self.binding.remove(&done.uid) else {
            return;
        };
        if let Err(e) = done.result {
            // The assumption was wrong: free the node again and retry the pod.
            self.core.snapshot.remove_pod(&done.uid);
            match &e {
                kube::Error::Api(s) if s.code == 404 => return,
                kube::Error::Api(s) if s.code == 409 => {
                    debug!(pod = ?pod.metadata.name, "already bound elsewhere");
                    return;
                }
                _ => warn!(pod = ?pod.metadata.name, error = %e, "binding failed; will retry"),
            }
            self.unschedulable.insert(done.uid, pod);
        }
    }
}

async fn bind(api: &Api<Pod>, name: &str, node: &str) -> Result<(), kube::Error> {
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..Default::default()
        },
    };
    api.create_subresource::<_, serde_json::Value>(
        "binding",
        name,
        &PostParams::default(),
        &binding,
    )
    .await
    .map(drop)
}

/// The core/v1 Event kube-scheduler records for a pod that could not be scheduled.
pub fn failed_scheduling_event(pod: &Pod, message: &str, scheduler: &str) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let name = pod.metadata.name.clone().unwrap_or_default();
    Event {
        metadata: ObjectMeta {
            // The recorder's naming: the object's name and a unique hex suffix.
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: pod.metadata.namespace.clone(),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            resource_version: pod.metadata.resource_version.clone(),
            ..Default::default()
        },
        reason: Some("FailedScheduling".into()),
        message: Some(message.into()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(scheduler.into()),
            host: None,
        }),
        reporting_component: Some(scheduler.into()),
        reporting_instance: Some(scheduler.into()),
        action: Some("Scheduling".into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
