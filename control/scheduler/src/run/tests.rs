//! The scheduler against weir's real API server (in-process, embedded store, HTTPS): a pod
//! that fits nowhere gets PodScheduled=False and a FailedScheduling Event with
//! kube-scheduler's message, and is scheduled as soon as a node is added or a pod is
//! deleted — with the periodic retry set to an hour, so only the change can have done it.
//! A pod that keeps failing the same way has one Event whose count grows, as `kubectl
//! describe pod` shows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use weir_apiserver::{Config, Server, kubeconfig};

struct Cluster {
    client: Client,
    kubeconfig: std::path::PathBuf,
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

async fn start() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let store = weir_store::EmbeddedStore::open(dir.path().join("store.redb")).unwrap();
    let mut config = Config::new(dir.path().to_path_buf(), Arc::new(store));
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = Server::bind(config).await.unwrap();
    let path = dir.path().join("kubeconfig");
    kubeconfig::write(
        &path,
        &kubeconfig::Entry {
            name: "weir",
            user: "admin",
            server: &server.url(),
            ca_pem: &server.pki().ca_pem,
            token: &server.pki().admin_token,
        },
    )
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (sched_tx, mut sched_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(server.run(async move {
        let _ = rx.await;
        let _ = sched_tx.send(true);
    }));
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let kconfig = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let client = Client::try_from(kconfig).unwrap();
    let ns: Api<Namespace> = Api::all(client.clone());
    for _ in 0..100 {
        if ns.get_opt("default").await.ok().flatten().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = crate::RunConfig {
        retry_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    tokio::spawn(crate::run(client.clone(), config, async move {
        let _ = sched_rx.wait_for(|s| *s).await;
    }));
    Cluster {
        client,
        kubeconfig: path,
        stop: Some(tx),
        _dir: dir,
    }
}

async fn add_node(client: &Client, name: &str, cpu: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = json!({"status": {
        "allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True"}]
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn create_pod(pods: &Api<Pod>, name: &str, cpu: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "weir/echo",
                 "resources": {"requests": {"cpu": cpu}}}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

async fn node_of(pods: &Api<Pod>, name: &str, timeout: Duration) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(node) = pods.get(name).await.ok().and_then(|p| p.spec?.node_name) {
            return Some(node);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn failed_scheduling(events: &Api<Event>, pod: &str) -> Vec<String> {
    let start = Instant::now();
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        let found: Vec<String> = list
            .items
            .into_iter()
            .filter(|e| {
                e.involved_object.name.as_deref() == Some(pod)
                    && e.reason.as_deref() == Some("FailedScheduling")
                    && e.type_.as_deref() == Some("Warning")
            })
            .filter_map(|e| e.message)
            .collect();
        if !found.is_empty() || start.elapsed() > Duration::from_secs(30) {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pods_get_an_event_and_are_retried_on_node_and_pod_changes() {
    let c = start().await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    add_node(&c.client, "small", "1").await;

    // Too big for the only node: an event says why, in kube-scheduler's words.
    create_pod(&pods, "big", "2").await;
    assert_eq!(
        failed_scheduling(&events, "big").await,
        vec!["0/1 nodes are available: 1 Insufficient cpu.".to_string()]
    );
    assert_eq!(
        node_of(&pods, "big", Duration::from_millis(500)).await,
        None
    );
    // A node that fits arrives: the pod is bound without waiting for the periodic retry.
    add_node(&c.client, "large", "4").await;
    assert_eq!(
        node_of(&pods, "big", Duration::from_secs(30))
            .await
            .as_deref(),
        Some("large")
    );

    // Both nodes full: "fill" takes the rest of large, "one" all of small.
    create_pod(&pods, "fill", "2").await;
    create_pod(&pods, "one", "1").await;
    assert!(
        node_of(&pods, "fill", Duration::from_secs(30))
            .await
            .is_some()
    );
    assert!(
        node_of(&pods, "one", Duration::from_secs(30))
            .await
            .is_some()
    );
    create_pod(&pods, "waiting", "1").await;
    assert_eq!(
        failed_scheduling(&events, "waiting").await,
        vec!["0/2 nodes are available: 2 Insufficient cpu.".to_string()]
    );
    // A pod deleted frees room: the waiting pod takes its place.
    pods.delete("one", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert_eq!(
        node_of(&pods, "waiting", Duration::from_secs(30))
            .await
            .as_deref(),
        Some("small")
    );
}

/// The FailedScheduling Events of `pod`: (message, count).
async fn failed_scheduling_counts(events: &Api<Event>, pod: &str) -> Vec<(String, i32)> {
    let list = events.list(&ListParams::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(pod)
                && e.reason.as_deref() == Some("FailedScheduling")
        })
        .map(|e| (e.message.unwrap_or_default(), e.count.unwrap_or(0)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_failing_the_same_way_has_one_event_whose_count_grows() {
    let c = start().await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    let nodes: Api<Node> = Api::all(c.client.clone());
    add_node(&c.client, "small", "1").await;
    create_pod(&pods, "big", "2").await;
    let message = "0/1 nodes are available: 1 Insufficient cpu.".to_string();
    // Each label change is a node change that matters, so the pod is tried again and fails
    // the same way; the periodic retry is an hour, so nothing else tries it.
    for round in 1..=3 {
        if round > 1 {
            let patch = json!({"metadata": {"labels": {"round": round.to_string()}}});
            nodes
                .patch("small", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        let start = Instant::now();
        loop {
            let seen = failed_scheduling_counts(&events, "big").await;
            if seen.len() == 1 && seen[0].0 == message && seen[0].1 >= round {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "round {round}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["describe", "pod", "big"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.contains("FailedScheduling"))
        .unwrap_or_else(|| panic!("no event in describe: {text}"));
    assert!(
        row.contains("(x3 over") && row.contains(&message),
        "describe row: {row}"
    );
}
