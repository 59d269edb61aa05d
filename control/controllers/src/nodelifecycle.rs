//! The node lifecycle controller: a node whose Lease in `kube-node-lease` has not been
//! renewed within the grace period (40 s) turns Ready=Unknown and gets the
//! `node.kubernetes.io/unreachable` NoSchedule/NoExecute taints; its pods turn not ready (so
//! they leave the ready endpoints at once) and, after their toleration of the NoExecute taint
//! (default 300 s, configurable), are deleted so their owners replace them elsewhere.
//! A node whose lease is renewed again loses the taints.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::runtime::{self, Next};
use crate::util::{self, Context as _, Error, Result};

pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// A lease older than this makes its node NotReady (kube's node-monitor-grace-period).
    pub grace_period: Duration,
    /// How long pods without their own toleration stay on an unreachable node.
    pub default_toleration: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grace_period: Duration::from_secs(40),
            default_toleration: Duration::from_secs(300),
        }
    }
}

/// Parses a duration as Kubernetes components' flags take it (Go's `time.ParseDuration`):
/// a sequence of decimal numbers with units `h`, `m`, `s` or `ms`, e.g. `40s`, `1m30s`,
/// `0.5s`, or a bare `0`.
pub fn parse_duration(value: &str) -> std::result::Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration {value:?}: {why} (e.g. 40s, 1m30s, 500ms)");
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = value;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| bad("missing unit"))?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad("not a number"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(bad("unknown unit")),
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad("out of range"))
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// When the node was last heard from: its lease's renewTime (or acquireTime), else the
/// node's creation, so a node that never renewed still gets its grace period.
pub fn last_heartbeat(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
        .map(|t| t.0)
        .or_else(|| node.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

pub fn is_unreachable(node: &Node, lease: Option<&Lease>, now: Timestamp, cfg: &Config) -> bool {
    last_heartbeat(node, lease).is_some_and(|t| now.duration_since(t) > signed(cfg.grace_period))
}

/// When the pod must leave a node tainted unreachable since `tainted_at`: its own
/// toleration's tolerationSeconds for the taint if it has one (none means forever), else the
/// default.
pub fn eviction_time(pod: &Pod, tainted_at: Timestamp, cfg: &Config) -> Option<Timestamp> {
    let own = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_ref())
        .into_iter()
        .flatten()
        .find(|t| {
            let key_ok = match t.key.as_deref() {
                None | Some("") => t.operator.as_deref() == Some("Exists"),
                Some(k) => k == TAINT_UNREACHABLE,
            };
            key_ok
                && t.effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == "NoExecute")
        });
    match own {
        Some(t) => t
            .toleration_seconds
            .map(|s| tainted_at + SignedDuration::from_secs(s.max(0))),
        None => Some(tainted_at + signed(cfg.default_toleration)),
    }
}

fn unreachable_taints(node: &Node) -> impl Iterator<Item = &Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.key == TAINT_UNREACHABLE)
}

struct Ctx {
    client: Client,
    leases: Store<Lease>,
    pods: Store<Pod>,
    config: Config,
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Next> {
    let name = node.name_any();
    if ctx.leases.wait_until_ready().await.is_err() || ctx.pods.wait_until_ready().await.is_err() {
        return Err(Error::NotReady(name));
    }
    let now = Timestamp::now();
    let lease = ctx
        .leases
        .get(&ObjectRef::new(&name).within(LEASE_NAMESPACE));
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let tainted_at = unreachable_taints(&node)
        .filter_map(|t| t.time_added.as_ref().map(|t| t.0))
        .min();
    if !is_unreachable(&node, lease.as_deref(), now, &ctx.config) {
        if unreachable_taints(&node).next().is_some() {
            info!(node = %name, "lease renewed; removing unreachable taints");
            let taints: Vec<Taint> = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.key != TAINT_UNREACHABLE)
                .collect();
            let patch = serde_json::json!({"spec": {"taints": taints}});
            nodes
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .context(|| format!("removing taints of node {name}"))?;
        }
        // Check again just after the lease would expire.
        let expires = last_heartbeat(&node, lease.as_deref())
            .map(|t| t + signed(ctx.config.grace_period))
            .map(|t| t.duration_since(now))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(ctx.config.grace_period);
        return Ok(Next::After(expires + Duration::from_secs(1)));
    }
    let Some(tainted_at) = tainted_at else {
        warn!(node = %name, "lease expired; marking node unreachable");
        mark_unreachable(&nodes, &node, now).await?;
        return Ok(Next::After(Duration::from_secs(1)));
    };
    let pods = ctx.pods.state_filter(|p| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
            && !util::is_terminal(p)
    });
    let mut next = ctx.config.default_toleration;
    for pod in pods {
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        if util::is_ready(&pod) {
            set_pod_not_ready(&api, &pod, now).await?;
        }
        if util::is_terminating(&pod.metadata) {
            continue;
        }
        match eviction_time(&pod, tainted_at, &ctx.config) {
            Some(at) if at <= now => {
                info!(node = %name, pod = %pod.name_any(), namespace = %ns, "evicting pod from unreachable node");
                match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                    Err(e) if !util::is_not_found(&e) => {
                        return Err(e).context(|| format!("evicting pod {ns}/{}", pod.name_any()));
                    }
                    _ => {}
                }
            }
            Some(at) => {
                if let Ok(d) = Duration::try_from(at.duration_since(now)) {
                    next = next.min(d);
                }
            }
            None => {}
        }
    }
    Ok(Next::After(next.max(Duration::from_secs(1))))
}

async fn mark_unreachable(nodes: &Api<Node>, node: &Node, now: Timestamp) -> Result<()> {
    let name = node.name_any();
    let mut taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    for effect in ["NoSchedule", "NoExecute"] {
        taints.push(Taint {
            key: TAINT_UNREACHABLE.into(),
            effect: effect.into(),
            time_added: Some(Time(now)),
            value: None,
        });
    }
    let mut conditions = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    conditions.retain(|c| c.type_ != "Ready");
    conditions.push(NodeCondition {
        type_: "Ready".into(),
        status: "Unknown".into(),
        reason: Some("NodeStatusUnknown".into()),
        message: Some("Kubelet stopped posting node status.".into()),
        last_transition_time: Some(Time(now)),
        last_heartbeat_time: None,
    });
    let status = serde_json::json!({"status": {"conditions": conditions}});
    nodes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context(|| format!("marking node {name} Ready=Unknown"))?;
    let spec = serde_json::json!({"spec": {"taints": taints}});
    nodes
        .patch(&name, &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .context(|| format!("tainting node {name} unreachable"))?;
    Ok(())
}

async fn set_pod_not_ready(api: &Api<Pod>, pod: &Pod, now: Timestamp) -> Result<()> {
    let mut conditions = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    for c in conditions
        .iter_mut()
        .filter(|c| c.type_ == "Ready" || c.type_ == "ContainersReady")
    {
        c.status = "False".into();
        c.reason = Some("NodeNotReady".into());
        c.last_transition_time = Some(Time(now));
    }
    let patch = serde_json::json!({"status": {"conditions": conditions}});
    api.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .context(|| format!("marking pod {} not ready", util::key(&pod.metadata)))?;
    Ok(())
}

/// Run the node lifecycle controller until `shutdown` resolves.
pub async fn run(client: Client, config: Config, shutdown: impl Future<Output = ()>) {
    let (nodes, node_events) =
        runtime::reflect(Api::<Node>::all(client.clone()), watcher::Config::default());
    let (leases, lease_events) = runtime::reflect(
        Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE),
        watcher::Config::default(),
    );
    let (pods, pod_events) =
        runtime::reflect(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let ctx = Arc::new(Ctx {
        client,
        leases,
        pods,
        config,
    });
    // Pod events only keep the pod store fresh; lease expiry is noticed by requeue timers.
    let triggers = vec![
        runtime::map(node_events, |n: &Node| Some(ObjectRef::from_obj(n))),
        runtime::map(lease_events, |l: &Lease| {
            Some(ObjectRef::new(&l.name_any()))
        }),
        runtime::map(pod_events, |_: &Pod| None),
    ];
    runtime::run(
        "nodelifecycle",
        nodes,
        triggers,
        move |n| reconcile(n, ctx.clone()),
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn node() -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": "n1", "creationTimestamp": "2026-01-01T00:00:00Z"}}),
        )
        .expect("node")
    }

    fn lease(renewed: &str) -> Lease {
        serde_json::from_value(
            json!({"metadata": {"name": "n1", "namespace": "kube-node-lease"},
                                      "spec": {"renewTime": renewed}}),
        )
        .expect("lease")
    }

    #[test]
    fn durations_parse_as_kubernetes_flags_take_them() {
        assert_eq!(parse_duration("40s"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "40", "s", "4x", "-1s", "1..2s"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("invalid duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_lease_older_than_the_grace_period_makes_the_node_unreachable() {
        let cfg = Config::default();
        let l = lease("2026-01-01T00:10:00.000000Z");
        assert!(!is_unreachable(
            &node(),
            Some(&l),
            ts("2026-01-01T00:10:39Z"),
            &cfg
        ));
        assert!(is_unreachable(
            &node(),
            Some(&l),
            ts("2026-01-01T00:10:41Z"),
            &cfg
        ));
        // No lease at all: the grace period runs from the node's creation.
        assert!(!is_unreachable(
            &node(),
            None,
            ts("2026-01-01T00:00:30Z"),
            &cfg
        ));
        assert!(is_unreachable(
            &node(),
            None,
            ts("2026-01-01T00:01:00Z"),
            &cfg
        ));
    }

    #[test]
    fn pods_leave_after_their_toleration_or_the_default() {
        let cfg = Config {
            default_toleration: Duration::from_secs(300),
            ..Config::default()
        };
        let at = ts("2026-01-01T00:00:00Z");
        let pod = |tolerations: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"},
                "spec": {"containers": [], "tolerations": tolerations}}))
            .expect("pod")
        };
        assert_eq!(
            eviction_time(&pod(json!([])), at, &cfg),
            Some(ts("2026-01-01T00:05:00Z"))
        );
        let short = pod(
            json!([{"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute",
                                "tolerationSeconds": 10}]),
        );
        assert_eq!(
            eviction_time(&short, at, &cfg),
            Some(ts("2026-01-01T00:00:10Z"))
        );
        let forever = pod(json!([{"operator": "Exists"}]));
        assert_eq!(eviction_time(&forever, at, &cfg), None);
        let other =
            pod(json!([{"key": "something-else", "operator": "Exists", "tolerationSeconds": 1}]));
        assert_eq!(
            eviction_time(&other, at, &cfg),
            Some(ts("2026-01-01T00:05:00Z"))
        );
    }
}
