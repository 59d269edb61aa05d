//! Pod garbage collection, as kube-controller-manager's PodGC. It force-deletes (grace 0)
//! pods nothing else will ever finish:
//! - pods bound to a Node that no longer exists, once the node has been missing for the
//!   quarantine period and a live GET confirms it is gone (upstream waits a fixed 40 s; weir
//!   reuses the node lifecycle's `--node-monitor-grace-period`, default 40 s);
//! - terminating pods on a node that is not Ready and carries the
//!   `node.kubernetes.io/out-of-service` taint (non-graceful node shutdown, KEP-2268);
//! - terminating pods that were never scheduled;
//! - the oldest finished (Succeeded/Failed) pods beyond the terminated-pod threshold
//!   (`--terminated-pod-gc-threshold`, default 12,500), evicted ones first.
//!
//! A pod that has not finished is first marked `phase: Failed` (with a `DisruptionTarget`
//! condition when its node is gone), so its owners see why it went. Without this, pods
//! evicted from a dead node stay Terminating for ever, and in their Service's EndpointSlice.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::runtime;
use crate::util::{self, Context as _, Result};

pub const TAINT_OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";
/// kube-controller-manager's default `--terminated-pod-gc-threshold`.
pub const TERMINATED_POD_THRESHOLD: usize = 12_500;

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// How long a node must be missing before its pods are collected.
    pub quarantine: Duration,
    /// Finished pods kept at most; 0 keeps them all (as upstream's flag).
    pub terminated_pod_threshold: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            quarantine: Duration::from_secs(40),
            terminated_pod_threshold: TERMINATED_POD_THRESHOLD,
        }
    }
}

/// Why a pod is collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    NodeGone,
    OutOfService,
    UnscheduledTerminating,
    OverThreshold,
}

fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn out_of_service(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.key == TAINT_OUT_OF_SERVICE))
}

/// Names of the nodes pods are bound to that `node` does not know.
pub fn missing_nodes(pods: &[Arc<Pod>], node: impl Fn(&str) -> Option<Arc<Node>>) -> HashSet<&str> {
    pods.iter()
        .filter_map(|p| node_name(p))
        .filter(|n| node(n).is_none())
        .collect()
}

/// The pods to collect, each once, with why. `gone` are nodes confirmed deleted.
pub fn plan(
    pods: &[Arc<Pod>],
    node: impl Fn(&str) -> Option<Arc<Node>>,
    gone: &HashSet<String>,
    threshold: usize,
) -> Vec<(Arc<Pod>, Reason)> {
    let mut out = Vec::new();
    let mut finished = Vec::new();
    for pod in pods {
        let terminating = util::is_terminating(&pod.metadata);
        let reason = match node_name(pod) {
            Some(n) if gone.contains(n) => Some(Reason::NodeGone),
            Some(n) if terminating && !util::is_terminal(pod) => node(n)
                .filter(|n| !node_ready(n) && out_of_service(n))
                .map(|_| Reason::OutOfService),
            Some(_) => None,
            None if terminating => Some(Reason::UnscheduledTerminating),
            None => None,
        };
        match reason {
            Some(r) => out.push((pod.clone(), r)),
            None if util::is_terminal(pod) => finished.push(pod.clone()),
            None => {}
        }
    }
    if threshold > 0 && finished.len() > threshold {
        let evicted =
            |p: &Pod| p.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("Evicted");
        finished.sort_by(|a, b| {
            evicted(b)
                .cmp(&evicted(a))
                .then_with(|| {
                    a.metadata
                        .creation_timestamp
                        .cmp(&b.metadata.creation_timestamp)
                })
                .then_with(|| a.name_any().cmp(&b.name_any()))
        });
        let excess = finished.len() - threshold;
        out.extend(
            finished
                .into_iter()
                .take(excess)
                .map(|p| (p, Reason::OverThreshold)),
        );
    }
    out
}

/// Since when each node that pods are bound to has been missing from the node watch.
#[derive(Debug, Default)]
pub struct Quarantine {
    since: HashMap<String, Instant>,
}

impl Quarantine {
    /// Record the nodes missing `now`; returns those missing for at least `period`.
    pub fn update(
        &mut self,
        missing: &HashSet<&str>,
        now: Instant,
        period: Duration,
    ) -> Vec<String> {
        self.since.retain(|n, _| missing.contains(n.as_str()));
        for n in missing {
            self.since.entry((*n).to_string()).or_insert(now);
        }
        self.since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= period)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The node exists after all (the watch was behind): start its quarantine again.
    pub fn restart(&mut self, node: &str, now: Instant) {
        self.since.insert(node.to_string(), now);
    }

    /// When the next node's quarantine ends.
    pub fn next_due(&self, period: Duration) -> Option<Instant> {
        self.since.values().min().map(|t| *t + period)
    }
}

/// Mark a pod that has not finished Failed, then delete it at once.
async fn collect(client: &Client, pod: &Pod, reason: Reason) -> Result<()> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    info!(namespace = %ns, pod = %name, ?reason, "PodGC is force deleting pod");
    if !util::is_terminal(pod) {
        let mut conditions = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        if reason == Reason::NodeGone {
            conditions.retain(|c| c.type_ != "DisruptionTarget");
            conditions.push(PodCondition {
                type_: "DisruptionTarget".into(),
                status: "True".into(),
                reason: Some("DeletionByPodGC".into()),
                message: Some("PodGC: node no longer exists".into()),
                last_transition_time: Some(Time(Timestamp::now())),
                ..Default::default()
            });
        }
        // The resourceVersion pins the pod we decided on: a newer pod that took the name,
        // or a change since, is a conflict, and the next sweep decides again.
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": pod.metadata.resource_version},
            "status": {"phase": "Failed", "conditions": conditions},
        });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(e) if util::is_not_found(&e) => return Ok(()),
            r => r
                .map(drop)
                .context(|| format!("marking pod {ns}/{name} Failed"))?,
        }
    }
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        // Never a newer pod that took the name.
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        // Gone already, or the name belongs to a newer pod.
        Err(e) if util::is_not_found(&e) || matches!(&e, kube::Error::Api(s) if s.code == 409) => {
            Ok(())
        }
        r => r.map(drop).context(|| format!("deleting pod {ns}/{name}")),
    }
}

/// Whether the node is really gone: a live GET says 404, not just a watch that is behind.
async fn confirmed_gone(nodes: &Api<Node>, name: &str) -> bool {
    matches!(nodes.get_opt(name).await, Ok(None))
}

/// Whether a change of `pod` can give a sweep something to do: it is terminating, finished,
/// or bound to a node the cache lacks. A status update of a running pod on a known node
/// cannot, and sweeping every pod for each one would grow with the cluster.
fn may_matter(pod: &Pod, nodes: &Store<Node>) -> bool {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    pod.metadata.deletion_timestamp.is_some()
        || util::is_terminal(pod)
        || node.is_some_and(|n| !n.is_empty() && nodes.get(&ObjectRef::new(n)).is_none())
}

/// Sweep when something changed, at most this often.
const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// Sweep at least this often, as upstream's gcCheckPeriod.
const CHECK_PERIOD: Duration = Duration::from_secs(20);

/// Run the pod garbage collector until `shutdown` resolves.
pub async fn run(client: Client, config: Config, shutdown: impl Future<Output = ()>) {
    let nodes_api: Api<Node> = Api::all(client.clone());
    let (pods, pod_events) =
        runtime::reflect(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let (nodes, node_events) = runtime::reflect(nodes_api.clone(), watcher::Config::default());
    let cached = nodes.clone();
    let pod_events = pod_events.filter(move |p| std::future::ready(may_matter(p, &cached)));
    let mut events = stream::select(pod_events.map(drop), node_events.map(drop));
    let mut quarantine = Quarantine::default();
    let mut ticker = tokio::time::interval(MIN_INTERVAL);
    let mut dirty = false;
    let mut last_sweep = Instant::now();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            Some(()) = events.next() => dirty = true,
            _ = ticker.tick() => {
                let now = Instant::now();
                let due = quarantine.next_due(config.quarantine).is_some_and(|t| t <= now);
                if !(dirty || due || now.duration_since(last_sweep) >= CHECK_PERIOD) {
                    continue;
                }
                // Before both caches are filled every node would look missing.
                if pods.wait_until_ready().now_or_never().is_none()
                    || nodes.wait_until_ready().now_or_never().is_none()
                {
                    continue;
                }
                dirty = false;
                last_sweep = now;
                if sweep(&client, &nodes_api, &pods, &nodes, &mut quarantine, &config).await {
                    dirty = true;
                }
            }
        }
    }
}

/// One pass; true if a step failed and the next tick should try again.
async fn sweep(
    client: &Client,
    nodes_api: &Api<Node>,
    pods: &Store<Pod>,
    nodes: &Store<Node>,
    quarantine: &mut Quarantine,
    config: &Config,
) -> bool {
    let all = pods.state();
    let lookup = |n: &str| nodes.get(&ObjectRef::new(n));
    let missing = missing_nodes(&all, lookup);
    let now = Instant::now();
    let mut gone = HashSet::new();
    for node in quarantine.update(&missing, now, config.quarantine) {
        if confirmed_gone(nodes_api, &node).await {
            gone.insert(node);
        } else {
            quarantine.restart(&node, now);
        }
    }
    let mut failed = false;
    for (pod, reason) in plan(&all, lookup, &gone, config.terminated_pod_threshold) {
        if let Err(e) = collect(client, &pod, reason).await {
            warn!(error = %e, "pod garbage collection step failed; retried on the next sweep");
            failed = true;
        }
    }
    failed
}

#[cfg(test)]
mod tests;
