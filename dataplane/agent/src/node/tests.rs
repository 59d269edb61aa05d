//! The agent against weir's real API server (in-process, embedded store, HTTPS) and the real
//! kernel: registration, pod CIDR claims, heartbeat, pods run from the API with their
//! status written back, logs, graceful deletion, and routes between two nodes.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::ListParams;
use weir_apiserver::{Config, Server, kubeconfig};

use super::*;
use crate::testutil::{CgroupGuard, NetnsGuard, run_in, unique};

pub(crate) struct ApiServer {
    pub client: kube::Client,
    pub url: String,
    pub ca_file: PathBuf,
    pub token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), weir_apiserver::ServeError>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl ApiServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Self::start_in(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
        server._dir = Some(dir);
        server
    }

    /// An API server keeping its state in `dir` (so a restart there keeps CA and tokens).
    pub async fn start_in(dir: &Path, listen: std::net::SocketAddr) -> Self {
        let store = weir_store::EmbeddedStore::open(dir.join("store.redb")).unwrap();
        let mut config = Config::new(dir.to_path_buf(), Arc::new(store));
        config.listen = listen;
        let server = Server::bind(config).await.unwrap();
        let url = server.url();
        let path = dir.join("kubeconfig");
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
        .unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &server.pki().ca_pem).unwrap();
        let token = server.pki().admin_token.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let ns: Api<Namespace> = Api::all(client.clone());
        for _ in 0..100 {
            if ns.get_opt("kube-node-lease").await.ok().flatten().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            client,
            url,
            ca_file,
            token,
            stop: Some(tx),
            task: Some(task),
            _dir: None,
        }
    }

    /// Stops the server and waits until it has let go of its port and store.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// One agent in its own node namespace, stopped and cleaned up on drop.
pub(crate) struct TestNode {
    pub name: String,
    pub netns: NetnsGuard,
    pub state: tempfile::TempDir,
    pub args: Args,
    _cgroups: CgroupGuard,
    stop: Option<CancellationToken>,
}

impl TestNode {
    pub fn new(prefix: &str, node_ip: Ipv4Addr) -> Self {
        let name = unique(prefix);
        let netns = NetnsGuard::new("wnode");
        let state = tempfile::tempdir().unwrap();
        let cgroups = CgroupGuard::new();
        let args = Args {
            server: String::new(),
            token: String::new(),
            certificate_authority: None,
            insecure_skip_tls_verify: false,
            node_name: Some(name.clone()),
            node_ip: Some(node_ip),
            netns: Some(netns.name.clone()),
            state_dir: state.path().to_path_buf(),
            cluster_dns: Ipv4Addr::new(10, 96, 0, 10),
            cluster_domain: "cluster.local".into(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise_url: None,
            cgroup_subtree: Some(cgroups.subtree.clone()),
            heartbeat: Duration::from_millis(500),
            node_lease_duration_seconds: 40,
            backoff: Duration::from_millis(300),
        };
        Self {
            name,
            netns,
            state,
            _cgroups: cgroups,
            args,
            stop: None,
        }
    }

    pub fn start(&mut self, client: &kube::Client) {
        let stop = CancellationToken::new();
        let args = self.args.clone();
        let client = client.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = run(args, client, token.cancelled_owned()).await {
                panic!("agent failed: {e}");
            }
        });
        self.stop = Some(stop);
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            stop.cancel();
        }
        // Pods' namespaces are named after their UIDs; remove the ones this node made.
        let pods = self.state.path().join("pods");
        for entry in std::fs::read_dir(pods).into_iter().flatten().flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &PodNetwork::netns_name(&uid)])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

pub(crate) async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    for _ in 0..300 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

pub(crate) fn pod_manifest(name: &str, node: &str, argv: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": "weir/none",
                "command": argv,
                "env": [
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                    {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
            }],
        },
    }))
    .unwrap()
}

/// The ConfigMap and Secret that `pod_manifest` containers take their environment from.
pub(crate) async fn create_settings(client: &kube::Client) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = json!({"metadata": {"name": "settings"}, "data": {"mode": "fast"}});
    cms.create(&PostParams::default(), &serde_json::from_value(cm).unwrap())
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    // "hunter2", base64: the API stores Secret data encoded.
    let secret = json!({"metadata": {"name": "creds"}, "data": {"password": "aHVudGVyMg=="}});
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(secret).unwrap(),
        )
        .await
        .unwrap();
}

async fn http_get(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let authority = uri.authority()?.as_str().to_string();
    let stream = tokio::net::TcpStream::connect(&authority).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get(uri.path_and_query()?.as_str())
        .header("host", authority)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?
        .to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

fn running_and_ready(pod: &Pod) -> bool {
    let status = pod.status.clone().unwrap_or_default();
    status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

#[tokio::test]
async fn two_nodes_register_claim_cidrs_run_pods_and_route_to_each_other() {
    let api = ApiServer::start().await;
    let client = api.client.clone();
    // The two node namespaces are linked, as two hosts on one network.
    let mut a = TestNode::new("node-a", Ipv4Addr::new(192, 168, 61, 1));
    let mut b = TestNode::new("node-b", Ipv4Addr::new(192, 168, 61, 2));
    a.args.node_lease_duration_seconds = 25;
    let link = unique("l");
    assert!(run_in(
        &a.netns.name,
        &[
            "ip",
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "eth1",
            "netns",
            &b.netns.name
        ]
    ));
    assert!(run_in(
        &a.netns.name,
        &["ip", "addr", "add", "192.168.61.1/24", "dev", &link]
    ));
    assert!(run_in(&a.netns.name, &["ip", "link", "set", &link, "up"]));
    assert!(run_in(
        &b.netns.name,
        &["ip", "addr", "add", "192.168.61.2/24", "dev", "eth1"]
    ));
    assert!(run_in(&b.netns.name, &["ip", "link", "set", "eth1", "up"]));

    create_settings(&client).await;

    a.start(&client);
    b.start(&client);
    let nodes: Api<Node> = Api::all(client.clone());
    let ready_cidr = |name: String| {
        let nodes = nodes.clone();
        async move {
            let node = nodes.get_opt(&name).await.ok()??;
            let ready = node
                .status
                .as_ref()?
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready
                .then(|| node.spec.as_ref()?.pod_cidr.clone())
                .flatten()
                .map(|c| (c, node))
        }
    };
    let (cidr_a, node_a) = eventually("node a ready", || ready_cidr(a.name.clone())).await;
    let (cidr_b, _) = eventually("node b ready", || ready_cidr(b.name.clone())).await;
    assert_ne!(cidr_a, cidr_b, "each node claims its own /24");
    for cidr in [&cidr_a, &cidr_b] {
        assert!(
            cidr.starts_with("10.244.") && cidr.ends_with(".0/24"),
            "{cidr}"
        );
    }
    let status = node_a.status.clone().unwrap();
    let capacity = status.capacity.unwrap();
    assert_eq!(capacity["pods"].0, "110");
    assert!(capacity["cpu"].0.parse::<u32>().unwrap() >= 1);
    assert!(
        status
            .addresses
            .unwrap()
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "192.168.61.1")
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renewed = |name: String| {
        let leases = leases.clone();
        async move { leases.get_opt(&name).await.ok()??.spec?.renew_time }
    };
    let first = eventually("lease", || renewed(a.name.clone())).await;
    let lease = leases.get(&a.name).await.unwrap();
    assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(25));
    eventually("lease renewal", || {
        let r = renewed(a.name.clone());
        let first = first.clone();
        async move { r.await.filter(|t| *t != first) }
    })
    .await;

    // Pods bound to each node run there and reach each other across the nodes.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let script = "echo mode=$MODE pw=$PW ip=$MY_IP; exec python3 -m http.server 8080";
    pods.create(
        &PostParams::default(),
        &pod_manifest("pa", &a.name, &["sh", "-c", script]),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod_manifest("pb", &b.name, &["sh", "-c", script]),
    )
    .await
    .unwrap();
    let ready = |name: &'static str| {
        let pods = pods.clone();
        async move { pods.get_opt(name).await.ok()?.filter(running_and_ready) }
    };
    let pa = eventually("pod pa running", || ready("pa")).await;
    let pb = eventually("pod pb running", || ready("pb")).await;
    let ip_a: Ipv4Addr = pa
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    let ip_b: Ipv4Addr = pb
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cidr_a.parse::<Ipv4Cidr>().unwrap().contains(ip_a));
    assert!(cidr_b.parse::<Ipv4Cidr>().unwrap().contains(ip_b));
    assert_eq!(
        pa.status.as_ref().unwrap().host_ip.as_deref(),
        Some("192.168.61.1")
    );
    let netns_a =
        Path::new("/run/netns").join(PodNetwork::netns_name(pa.metadata.uid.as_deref().unwrap()));
    let netns_b =
        Path::new("/run/netns").join(PodNetwork::netns_name(pb.metadata.uid.as_deref().unwrap()));
    eventually("pa reaches pb across nodes", || {
        let netns_a = netns_a.clone();
        async move {
            crate::network::connect_in(&netns_a, (ip_b, 8080).into(), Duration::from_secs(1))
                .await
                .ok()
        }
    })
    .await;
    eventually("pb reaches pa across nodes", || {
        let netns_b = netns_b.clone();
        async move {
            crate::network::connect_in(&netns_b, (ip_a, 8080).into(), Duration::from_secs(1))
                .await
                .ok()
        }
    })
    .await;

    // Logs through the endpoint the node advertises.
    let node = nodes.get(&a.name).await.unwrap();
    let endpoint = node.metadata.annotations.unwrap()[LOG_ENDPOINT_ANNOTATION].clone();
    let logs = http_get(&format!("{endpoint}/containerLogs/default/pa/app"))
        .await
        .unwrap();
    assert!(
        logs.starts_with(&format!("mode=fast pw=hunter2 ip={ip_a}\n")),
        "{logs}"
    );

    // What `kubectl describe pod` lists under Events.
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let started = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|e| {
            e.involved_object.name.as_deref() == Some("pa")
                && e.reason.as_deref() == Some("Started")
        });
    assert_eq!(
        started.and_then(|e| e.message).as_deref(),
        Some("Started container app")
    );

    // Graceful deletion: the agent stops the pod, then finishes the deletion.
    pods.delete("pa", &DeleteParams::default()).await.unwrap();
    eventually("pa deleted", || {
        let pods = pods.clone();
        async move { pods.get_opt("pa").await.ok().filter(Option::is_none) }
    })
    .await;
    eventually("pa's netns removed", || {
        let netns_a = netns_a.clone();
        async move { (!netns_a.exists()).then_some(()) }
    })
    .await;
    let left = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(left.items.len(), 1);
    pods.delete("pb", &DeleteParams::default()).await.unwrap();
    eventually("pb deleted", || {
        let pods = pods.clone();
        async move { pods.get_opt("pb").await.ok().filter(Option::is_none) }
    })
    .await;
}

/// Not a test on its own: the body of a separate agent process, which
/// `agent_survives_kill_9` starts (re-executing this test binary) and kills with SIGKILL.
#[tokio::test]
#[ignore = "runs only as the child process of agent_survives_kill_9"]
async fn agent_process() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }
    let Ok(argv) = std::env::var("WEIR_AGENT_TEST_ARGV") else {
        return;
    };
    let argv: Vec<String> = serde_json::from_str(&argv).unwrap();
    let cli = <Cli as clap::Parser>::parse_from(argv);
    let client = cli.args.client().unwrap();
    run(cli.args, client, std::future::pending()).await.unwrap();
}

struct AgentProcess(std::process::Child);

impl AgentProcess {
    fn spawn(api: &ApiServer, node: &TestNode) -> Self {
        let args = &node.args;
        let argv = vec![
            "weir-node".to_string(),
            format!("--server={}", api.url),
            format!("--token={}", api.token),
            format!("--certificate-authority={}", api.ca_file.display()),
            format!("--node-name={}", node.name),
            format!("--node-ip={}", args.node_ip.unwrap()),
            format!("--netns={}", node.netns.name),
            format!("--state-dir={}", args.state_dir.display()),
            "--listen=127.0.0.1:0".into(),
            format!("--cgroup-subtree={}", args.cgroup_subtree.clone().unwrap()),
            "--heartbeat=0.5".into(),
            "--backoff=0.3".into(),
        ];
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "node::tests::agent_process",
                "--ignored",
                "--nocapture",
            ])
            .env(
                "WEIR_AGENT_TEST_ARGV",
                serde_json::to_string(&argv).unwrap(),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self(child)
    }

    fn kill_9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill_9();
    }
}

fn container_status(pod: &Pod) -> (Option<String>, i32) {
    let cs = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    cs.first()
        .map_or((None, -1), |c| (c.container_id.clone(), c.restart_count))
}

#[tokio::test]
async fn agent_survives_kill_9_adopts_running_pods_and_status_converges() {
    let api = ApiServer::start().await;
    let client = api.client.clone();
    let node = TestNode::new("node-k", Ipv4Addr::new(192, 168, 62, 1));
    create_settings(&client).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for name in ["steady", "victim"] {
        pods.create(
            &PostParams::default(),
            &pod_manifest(name, &node.name, &["sleep", "300"]),
        )
        .await
        .unwrap();
    }
    let mut agent = AgentProcess::spawn(&api, &node);
    let ready = |name: &'static str| {
        let pods = pods.clone();
        async move { pods.get_opt(name).await.ok()?.filter(running_and_ready) }
    };
    let steady = eventually("steady running", || ready("steady")).await;
    let victim = eventually("victim running", || ready("victim")).await;
    let (steady_id, _) = container_status(&steady);
    // Read again: the Ready transition may have been written after the first Running status.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let steady_times = {
        let s = pods.get("steady").await.unwrap().status.unwrap();
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        (s.start_time, ready.last_transition_time)
    };
    let (victim_id, _) = container_status(&victim);

    agent.kill_9();
    // While the agent is down, the victim's container dies (its shim with it).
    let shim: i32 = victim_id
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let cgroup = Cgroups::detect(node.args.cgroup_subtree.as_deref().unwrap())
        .unwrap()
        .pod(victim.metadata.uid.as_deref().unwrap());
    cgroup.kill_container("app").await.unwrap();
    assert!(!cgroup.populated("app"));
    let start_time = crate::runtime::start_time(shim).unwrap_or(0);
    assert!(
        !crate::runtime::Process {
            pid: shim,
            start_time
        }
        .alive()
    );

    let _agent = AgentProcess::spawn(&api, &node);
    let victim = eventually("victim restarted", || {
        let pods = pods.clone();
        async move {
            let pod = pods.get_opt("victim").await.ok()??;
            (running_and_ready(&pod) && container_status(&pod).1 == 1).then_some(pod)
        }
    })
    .await;
    let last = victim.status.unwrap().container_statuses.unwrap()[0]
        .last_state
        .clone()
        .unwrap();
    assert!(last.terminated.is_some(), "{last:?}");
    // Give the new agent time to (wrongly) restart the steady pod; it must not.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let steady = pods.get("steady").await.unwrap();
    assert!(running_and_ready(&steady));
    let times = |p: &Pod| {
        let s = p.status.clone().unwrap();
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        (s.start_time, ready.last_transition_time)
    };
    assert_eq!(
        times(&steady),
        steady_times,
        "adoption keeps startTime and transition times"
    );
    assert_eq!(
        container_status(&steady),
        (steady_id, 0),
        "steady pod was adopted, not restarted"
    );
}

#[tokio::test]
async fn status_of_a_replaced_pod_is_never_written_to_its_successor() {
    let api = ApiServer::start().await;
    let pods: Api<Pod> = Api::namespaced(api.client.clone(), "default");
    let pod = pods
        .create(
            &PostParams::default(),
            &pod_manifest("same-name", "nowhere", &["true"]),
        )
        .await
        .unwrap();
    let mut publisher = Publisher {
        client: api.client.clone(),
        node: "n".into(),
        pending: HashMap::new(),
    };
    let status = |phase: &str| {
        Box::new(k8s_openapi::api::core::v1::PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        })
    };
    let update = |uid: &str, phase: &str| Update::Status {
        namespace: "default".into(),
        name: "same-name".into(),
        uid: uid.into(),
        status: status(phase),
    };
    publisher.publish(update("an-older-pod", "Failed")).await;
    assert!(
        publisher.pending.is_empty(),
        "a refused patch is not retried"
    );
    let phase = pods
        .get("same-name")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase);
    assert_ne!(phase.as_deref(), Some("Failed"));
    publisher
        .publish(update(pod.metadata.uid.as_deref().unwrap(), "Running"))
        .await;
    let phase = pods
        .get("same-name")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase);
    assert_eq!(phase.as_deref(), Some("Running"));
}

#[tokio::test]
async fn agent_waits_for_an_api_server_that_is_not_up_yet() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // A first start makes the CA and token the agent is configured with; then it goes away.
    let api = ApiServer::start_in(dir.path(), port).await;
    let (url, token, ca_file) = (api.url.clone(), api.token.clone(), api.ca_file.clone());
    api.stop().await;

    let mut node = TestNode::new("node-w", Ipv4Addr::new(192, 168, 63, 1));
    node.args.server = url;
    node.args.token = token;
    node.args.certificate_authority = Some(ca_file);
    let client = node.args.client().unwrap();
    node.start(&client);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let api = ApiServer::start_in(dir.path(), port).await;
    let nodes: Api<Node> = Api::all(api.client.clone());
    let name = node.name.clone();
    eventually("node registered once the API server is up", || {
        let nodes = nodes.clone();
        let name = name.clone();
        async move {
            nodes
                .get_opt(&name)
                .await
                .ok()?
                .and_then(|n| n.spec?.pod_cidr)
        }
    })
    .await;
}

#[test]
fn the_lease_duration_flag_defaults_to_the_kubelets_40_and_must_be_positive() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }
    let base = [
        "weir-node",
        "--server",
        "https://127.0.0.1:6443",
        "--token",
        "t",
    ];
    let parse = |extra: &[&str]| {
        <Cli as clap::Parser>::try_parse_from(base.iter().chain(extra)).map(|c| c.args)
    };
    assert_eq!(parse(&[]).unwrap().node_lease_duration_seconds, 40);
    assert_eq!(
        parse(&["--node-lease-duration-seconds", "15"])
            .unwrap()
            .node_lease_duration_seconds,
        15
    );
    let err = parse(&["--node-lease-duration-seconds", "0"])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--node-lease-duration-seconds"), "{err}");
}

#[test]
fn the_log_endpoint_is_advertised_at_the_node_ip_when_bound_to_all_addresses() {
    let ip: Ipv4Addr = "172.30.0.7".parse().unwrap();
    assert_eq!(
        default_advertise_url("0.0.0.0:10250".parse().unwrap(), ip),
        "http://172.30.0.7:10250"
    );
    assert_eq!(
        default_advertise_url("127.0.0.1:10250".parse().unwrap(), ip),
        "http://127.0.0.1:10250"
    );
}
