//! The scheduler and every controller against weir's real API server (in-process, embedded
//! store, HTTPS) and the real kubectl: a Deployment behind a Service is scheduled across two
//! nodes, gets its EndpointSlice, heals a deleted pod, rolls an update without losing ready
//! endpoints, rolls back with `kubectl rollout undo`, a pod too big for any node says why, and
//! deleting the Deployment and Service garbage-collects their ReplicaSets, pods and slices;
//! a node whose heartbeat stops turns unreachable while its pods move to the other node;
//! pods stuck terminating on a dead node go once the node is deleted (`kubectl delete node`)
//! or tainted out of service (`kubectl taint`), and a pod bound to no real node goes too; and
//! a rollout whose pods never turn ready exceeds its progress deadline.
//! No node agent runs here: a "kubelet" task in the test writes pod status (Running, Ready,
//! an IP) through the status subresource and completes deletions, as the brief prescribes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use weir_apiserver::{Config, Server, kubeconfig};

struct Cluster {
    client: Client,
    kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(controllers: crate::Config) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = weir_store::EmbeddedStore::open(dir.path().join("store.redb")).expect("store");
    let mut config = Config::new(dir.path().to_path_buf(), Arc::new(store));
    config.listen = "127.0.0.1:0".parse().expect("addr");
    let server = Server::bind(config).await.expect("bind");
    let url = server.url();
    let path = dir.path().join("kubeconfig");
    kubeconfig::write(
        &path,
        &kubeconfig::Entry {
            name: "weir",
            user: "admin",
            server: &url,
            ca_pem: &server.pki().ca_pem,
            token: &server.pki().admin_token,
        },
    )
    .expect("kubeconfig");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (ctl_tx, ctl_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(server.run(async move {
        let _ = rx.await;
        let _ = ctl_tx.send(true);
    }));
    let kc = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let kconfig = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    let client = Client::try_from(kconfig).expect("client");
    let ns: Api<Namespace> = Api::all(client.clone());
    for _ in 0..100 {
        if ns.get_opt("kube-node-lease").await.ok().flatten().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(crate::run(
        client.clone(),
        controllers,
        stopped(ctl_rx.clone()),
    ));
    tokio::spawn(weir_scheduler::run(
        client.clone(),
        weir_scheduler::RunConfig::default(),
        stopped(ctl_rx),
    ));
    Cluster {
        client,
        kubeconfig: path,
        stop: Some(tx),
        _dir: dir,
    }
}

async fn add_node(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    let status = json!({"status": {
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("node status");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                 "renewTime": k8s_openapi::jiff::Timestamp::now().to_string()}
    }))
    .expect("lease");
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("lease");
}

/// Plays the node agent's part for pods: a bound pod gets Running, Ready and an IP; a pod
/// being deleted is removed once the endpoint controller had time to see it terminating.
async fn kubelet(client: Client, nodes: &'static [&'static str]) {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut next_ip = 10u32;
    let mut terminating_since: std::collections::HashMap<String, Instant> = Default::default();
    loop {
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for p in list {
                let ns = p.namespace().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                let bound = p.spec.as_ref().and_then(|s| s.node_name.clone());
                // Pods on a node whose "kubelet" is down are left alone.
                if bound.as_deref().is_some_and(|n| !nodes.contains(&n)) {
                    continue;
                }
                if p.metadata.deletion_timestamp.is_some() {
                    let since = terminating_since
                        .entry(p.name_any())
                        .or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_millis(1500) {
                        let _ = api
                            .delete(&p.name_any(), &DeleteParams::default().grace_period(0))
                            .await;
                    }
                    continue;
                }
                let has_ip = p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some();
                if bound.is_some() && !has_ip {
                    next_ip += 1;
                    let ip = format!("10.244.{}.{}", next_ip / 250, next_ip % 250 + 2);
                    let status = json!({"status": {
                        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                        "conditions": [
                            {"type": "PodScheduled", "status": "True"},
                            {"type": "Ready", "status": "True",
                             "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}]
                    }});
                    let _ = api
                        .patch_status(
                            &p.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(&status),
                        )
                        .await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl")
}

async fn active_pods(client: &Client) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.list(&ListParams::default().labels("app=web"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// (ready, terminating) endpoint counts of the web service's slices.
async fn endpoint_counts(client: &Client) -> (usize, usize) {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let eps: Vec<_> = list.iter().flat_map(|s| s.endpoints.iter()).collect();
    let cond = |f: fn(&k8s_openapi::api::discovery::v1::EndpointConditions) -> Option<bool>| {
        eps.iter()
            .filter(|e| e.conditions.as_ref().and_then(f) == Some(true))
            .count()
    };
    (cond(|c| c.ready), cond(|c| c.terminating))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_service_scheduling_healing_rollout_and_rollback() {
    let c = start(crate::Config::default()).await;
    add_node(&c.client, "node-a").await;
    add_node(&c.client, "node-b").await;
    // Live nodes for as long as the test takes, however loaded the machine.
    keep_alive(&c.client, "node-a").await;
    keep_alive(&c.client, "node-b").await;
    tokio::spawn(kubelet(c.client.clone(), &["node-a", "node-b"]));

    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    }))
    .expect("svc");
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "echo", "image": "weir/echo",
                            "command": ["weir", "echo"], "args": ["--v1"],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}}
        }
    }))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &deploy)
        .await
        .expect("create deployment");

    // Scheduled across both nodes.
    let client = c.client.clone();
    let nodes = wait_for("3 web pods bound", Duration::from_secs(20), || {
        let client = client.clone();
        async move {
            let pods = active_pods(&client).await;
            let nodes: HashSet<String> = pods
                .iter()
                .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                .collect();
            let bound = pods
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
                .count();
            (pods.len() == 3 && bound == 3).then_some(nodes)
        }
    })
    .await;
    assert_eq!(nodes.len(), 2, "replicas spread over both nodes: {nodes:?}");

    // The EndpointSlice lists them, ready, with the named port resolved.
    wait_for("3 ready endpoints", Duration::from_secs(20), || {
        let client = client.clone();
        async move { (endpoint_counts(&client).await.0 == 3).then_some(()) }
    })
    .await;
    let slices: Api<EndpointSlice> = Api::namespaced(c.client.clone(), "default");
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .expect("slices");
    let port = list.items[0]
        .ports
        .as_ref()
        .and_then(|p| p.first())
        .and_then(|p| p.port);
    assert_eq!(port, Some(8080));
    let out = kubectl(
        &c.kubeconfig,
        &["rollout", "status", "deployment/web", "--timeout=20s"],
    );
    assert!(
        out.status.success(),
        "rollout status: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A deleted pod is replaced; while it terminates it stays as a terminating endpoint.
    let victim = active_pods(&c.client).await[0].name_any();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    pods.delete(&victim, &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for("a terminating endpoint", Duration::from_secs(10), || {
        let client = client.clone();
        async move { (endpoint_counts(&client).await.1 == 1).then_some(()) }
    })
    .await;
    wait_for("replacement pod", Duration::from_secs(20), || {
        let client = client.clone();
        let victim = victim.clone();
        async move {
            let pods = active_pods(&client).await;
            (pods.len() == 3 && pods.iter().all(|p| p.name_any() != victim)).then_some(())
        }
    })
    .await;

    wait_for("the replacement ready", Duration::from_secs(20), || {
        let client = client.clone();
        async move { (endpoint_counts(&client).await == (3, 0)).then_some(()) }
    })
    .await;

    // A rolling update (maxUnavailable 0) never drops below 3 ready endpoints.
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "echo", "image": "weir/echo",
        "command": ["weir", "echo"], "args": ["--v2"],
        "ports": [{"name": "http", "containerPort": 8080}],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}}}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("update template");
    let mut min_ready = usize::MAX;
    let start = Instant::now();
    loop {
        let (ready, _) = endpoint_counts(&c.client).await;
        min_ready = min_ready.min(ready);
        let d = deployments.get("web").await.expect("get deployment");
        let st = d.status.clone().unwrap_or_default();
        let done = d.metadata.generation == st.observed_generation
            && st.updated_replicas == Some(3)
            && st.replicas == Some(3)
            && st.available_replicas == Some(3);
        if done && ready == 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "rollout did not finish: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        min_ready >= 3,
        "ready endpoints dropped to {min_ready} during the rollout"
    );
    let sets: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    assert_eq!(
        sets.list(&ListParams::default())
            .await
            .expect("rs")
            .items
            .len(),
        2
    );

    // kubectl rollout undo brings back revision 1's template as revision 3.
    let out = kubectl(&c.kubeconfig, &["rollout", "undo", "deployment/web"]);
    assert!(
        out.status.success(),
        "rollout undo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(
        &c.kubeconfig,
        &["rollout", "status", "deployment/web", "--timeout=40s"],
    );
    assert!(
        out.status.success(),
        "rollout status after undo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = deployments.get("web").await.expect("deployment");
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("3")
    );
    let args = d
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].args.clone());
    assert_eq!(args, Some(Some(vec!["--v1".to_string()])));

    // Requests larger than any node: pending, with kube-scheduler's reason.
    let big: Pod = serde_json::from_value(json!({
        "metadata": {"name": "big"},
        "spec": {"containers": [{"name": "c", "image": "weir/echo",
                 "resources": {"requests": {"cpu": "64"}}}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &big)
        .await
        .expect("create big pod");
    let msg = wait_for("PodScheduled=False", Duration::from_secs(20), || {
        let pods = pods.clone();
        async move {
            let p = pods.get("big").await.ok()?;
            let conds = p.status?.conditions?;
            let c = conds
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
            Some((c.reason, c.message))
        }
    })
    .await;
    assert_eq!(msg.0.as_deref(), Some("Unschedulable"));
    assert_eq!(
        msg.1.as_deref(),
        Some("0/2 nodes are available: 2 Insufficient cpu.")
    );

    // Garbage collection: deleting the Deployment takes its ReplicaSets and pods; deleting
    // the Service takes its EndpointSlices.
    deployments
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete deployment");
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete service");
    wait_for("dependents collected", Duration::from_secs(30), || {
        let client = client.clone();
        let sets = sets.clone();
        let slices = slices.clone();
        async move {
            let rs = sets.list(&ListParams::default()).await.ok()?.items.len();
            let sl = slices.list(&ListParams::default()).await.ok()?.items.len();
            let pods = active_pods(&client).await.len();
            (rs == 0 && sl == 0 && pods == 0).then_some(())
        }
    })
    .await;
}

/// Sets the node's Lease renewTime `hours` from now. An hour ahead keeps the node alive
/// however loaded the machine and however far behind the controller's watch (a heartbeat
/// task renewing every 500 ms against a 2 s grace period let live nodes lapse under load);
/// an hour back is an agent that died long ago.
async fn renewed(client: &Client, node: &str, hours: i64) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let at =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(hours);
    let patch = json!({"spec": {"renewTime": at.to_string()}});
    leases
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("renew lease");
}

async fn keep_alive(client: &Client, node: &str) {
    renewed(client, node, 1).await;
}

/// Writes what a node agent reports for a started pod: Running, Ready, an IP.
async fn set_running(pods: &Api<Pod>, name: &str, ip: &str) {
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

/// A node is unreachable after 2 s of silence and its pods are evicted 2 s later.
fn fast_node_lifecycle() -> crate::Config {
    crate::Config {
        node_lifecycle: crate::nodelifecycle::Config {
            grace_period: Duration::from_secs(2),
            default_toleration: Duration::from_secs(2),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_turns_unreachable_and_its_pods_move() {
    let c = start(fast_node_lifecycle()).await;
    // Both replicas start on node-a, the only node.
    add_node(&c.client, "node-a").await;
    keep_alive(&c.client, "node-a").await;
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "echo", "image": "weir/echo"}]}}}
    }))
    .expect("rs");
    let sets: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    sets.create(&PostParams::default(), &rs)
        .await
        .expect("create rs");
    let client = c.client.clone();
    let on_node = |node: &'static str| {
        let client = client.clone();
        move || {
            let client = client.clone();
            async move {
                let pods = active_pods(&client).await;
                let on = pods
                    .iter()
                    .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
                    .map(|p| p.name_any())
                    .collect::<Vec<_>>();
                (pods.len() == 2 && on.len() == 2).then_some(on)
            }
        }
    };
    let first = wait_for(
        "both replicas on node-a",
        Duration::from_secs(60),
        on_node("node-a"),
    )
    .await;

    // node-b joins; node-a's agent is "killed": its lease was last renewed long ago.
    add_node(&c.client, "node-b").await;
    keep_alive(&c.client, "node-b").await;
    tokio::spawn(kubelet(c.client.clone(), &["node-b"]));
    renewed(&c.client, "node-a", -1).await;

    // node-a turns unreachable, its pods are evicted (they stay terminating: no agent
    // finishes them) and the ReplicaSet's replacements go to node-b.
    wait_for(
        "both replicas on node-b",
        Duration::from_secs(120),
        on_node("node-b"),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    for name in &first {
        let p = pods.get(name).await.expect("evicted pod");
        assert!(p.metadata.deletion_timestamp.is_some(), "{name} evicted");
    }
    let nodes: Api<Node> = Api::all(c.client.clone());
    let a = nodes.get("node-a").await.expect("node-a");
    let taints = a.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        taints
            .iter()
            .any(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == "NoExecute"),
        "{taints:?}"
    );
    let ready = a
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status);
    assert_eq!(ready.as_deref(), Some("Unknown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_makes_no_progress_exceeds_its_deadline() {
    let c = start(crate::Config::default()).await;
    // A node whose "kubelet" never starts anything: pods are bound but never ready.
    add_node(&c.client, "node-a").await;
    keep_alive(&c.client, "node-a").await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "stuck"},
        "spec": {
            "replicas": 1,
            "progressDeadlineSeconds": 2,
            "selector": {"matchLabels": {"app": "stuck"}},
            "template": {"metadata": {"labels": {"app": "stuck"}},
                         "spec": {"containers": [{"name": "c", "image": "weir/echo"}]}}
        }
    }))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &deploy)
        .await
        .expect("create deployment");
    let progressing = wait_for("Progressing=False", Duration::from_secs(20), || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("stuck").await.ok()?;
            d.status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "Progressing" && c.status == "False")
        }
    })
    .await;
    assert_eq!(
        progressing.reason.as_deref(),
        Some("ProgressDeadlineExceeded")
    );
    let message = progressing.message.unwrap_or_default();
    assert!(
        message.starts_with("ReplicaSet \"stuck-")
            && message.ends_with("\" has timed out progressing."),
        "{message}"
    );
    // The real kubectl reads it as a failed rollout.
    let out = kubectl(
        &c.kubeconfig,
        &["rollout", "status", "deployment/stuck", "--timeout=20s"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("exceeded its progress deadline"),
        "rollout status: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_dead_node_go_when_it_is_deleted_or_out_of_service() {
    // The grace period is also PodGC's quarantine for a deleted node.
    let c = start(fast_node_lifecycle()).await;
    // Both nodes' agents are dead: no heartbeat, no pod status, no finished deletions.
    add_node(&c.client, "node-a").await;
    add_node(&c.client, "node-b").await;
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))
    .expect("svc");
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    for (name, node, app) in [
        ("web-a", "node-a", "web"),
        ("web-b", "node-b", "web"),
        // Bound to a node that never existed.
        ("stray", "ghost", "stray"),
    ] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "weir/echo"}]}
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
    }
    set_running(&pods, "web-a", "10.244.1.2").await;
    set_running(&pods, "web-b", "10.244.2.2").await;

    let client = c.client.clone();
    let gone = |name: &'static str| {
        let pods = pods.clone();
        move || {
            let pods = pods.clone();
            async move { matches!(pods.get_opt(name).await, Ok(None)).then_some(()) }
        }
    };
    wait_for(
        "the stray pod collected",
        Duration::from_secs(60),
        gone("stray"),
    )
    .await;
    // Both nodes turn unreachable and evict their pods, which no agent finishes: they stay
    // in the slice as terminating.
    wait_for("2 terminating endpoints", Duration::from_secs(60), || {
        let client = client.clone();
        async move { (endpoint_counts(&client).await == (0, 2)).then_some(()) }
    })
    .await;

    let out = kubectl(&c.kubeconfig, &["delete", "node", "node-a"]);
    assert!(
        out.status.success(),
        "delete node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("web-a collected", Duration::from_secs(60), gone("web-a")).await;
    let b = pods.get("web-b").await.expect("web-b is still there");
    assert!(
        b.metadata.deletion_timestamp.is_some(),
        "web-b is terminating"
    );

    // Non-graceful node shutdown: the operator declares node-b out of service.
    let out = kubectl(
        &c.kubeconfig,
        &[
            "taint",
            "nodes",
            "node-b",
            "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute",
        ],
    );
    assert!(
        out.status.success(),
        "taint node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("web-b collected", Duration::from_secs(60), gone("web-b")).await;
    wait_for("an empty slice", Duration::from_secs(60), || {
        let client = client.clone();
        async move { (endpoint_counts(&client).await == (0, 0)).then_some(()) }
    })
    .await;
}
