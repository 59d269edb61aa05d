//! Pod workers against the real kernel: a test netns plays the node, pods get their own
//! netns, cgroups live under a per-test subtree, processes are real.

use std::collections::HashMap;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::api::core::v1::{ExecAction, HTTPGetAction, PodSpec, Probe, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::agent::Agent;
use crate::testutil::{CgroupGuard, NetnsGuard, unique};

struct NoObjects;

impl Lookup for NoObjects {
    fn config_map<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, String>> {
        async { Ok(None) }.boxed()
    }
    fn secret<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, String>> {
        async { Ok(None) }.boxed()
    }
}

struct Harness {
    agent: Agent,
    updates: mpsc::UnboundedReceiver<Update>,
    stop: CancellationToken,
    statuses: HashMap<String, PodStatus>,
    gone: Vec<String>,
    events: Vec<(&'static str, String)>,
    uids: Vec<String>,
    _dir: tempfile::TempDir,
    _cgroups: CgroupGuard,
    node: NetnsGuard,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
        for uid in &self.uids {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &PodNetwork::netns_name(uid)])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn runtime(node: &NetnsGuard, cgroups: &CgroupGuard, dir: &Path) -> Arc<Runtime> {
    Arc::new(Runtime {
        node_name: "node-a".into(),
        node_ip: Ipv4Addr::new(192, 168, 50, 1),
        state_dir: dir.to_path_buf(),
        cluster_dns: Ipv4Addr::new(10, 96, 0, 10),
        cluster_domain: "cluster.local".into(),
        backoff_initial: Duration::from_millis(300),
        backoff_max: Duration::from_secs(2),
        network: PodNetwork::new(
            Some(node.name.clone()),
            "10.244.9.0/24".parse().unwrap(),
            dir.join("ipam"),
        ),
        cgroups: cgroups.cgroups.clone(),
        lookup: Arc::new(NoObjects),
    })
}

impl Harness {
    async fn new() -> Self {
        let node = NetnsGuard::new("wpn");
        let cgroups = CgroupGuard::new();
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(&node, &cgroups, dir.path());
        rt.network.ensure_bridge().await.unwrap();
        let stop = CancellationToken::new();
        let (agent, updates) = Agent::new(rt, stop.clone());
        Self {
            agent,
            updates,
            stop,
            statuses: HashMap::new(),
            gone: Vec::new(),
            events: Vec::new(),
            uids: Vec::new(),
            _dir: dir,
            _cgroups: cgroups,
            node,
        }
    }

    fn pod(
        &mut self,
        name: &str,
        policy: &str,
        init: Vec<Container>,
        containers: Vec<Container>,
    ) -> Pod {
        let uid = unique("u");
        self.uids.push(uid.clone());
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("default".into());
        pod.metadata.uid = Some(uid);
        pod.spec = Some(PodSpec {
            containers,
            init_containers: Some(init),
            restart_policy: Some(policy.into()),
            termination_grace_period_seconds: Some(1),
            node_name: Some("node-a".into()),
            ..Default::default()
        });
        pod
    }

    async fn wait(
        &mut self,
        pod: &Pod,
        what: &str,
        pred: impl Fn(&PodStatus) -> bool,
    ) -> PodStatus {
        let uid = pod.metadata.uid.clone().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.statuses.get(&uid)
                && pred(s)
            {
                return s.clone();
            }
            match tokio::time::timeout_at(deadline, self.updates.recv()).await {
                Ok(Some(Update::Status { uid, status, .. })) => {
                    self.statuses.insert(uid, *status);
                }
                Ok(Some(Update::Gone { uid, .. })) => self.gone.push(uid),
                Ok(Some(Update::Event {
                    reason, message, ..
                })) => self.events.push((reason, message)),
                _ => panic!(
                    "timed out waiting for {what}; last status: {:#?}",
                    self.statuses.get(&uid)
                ),
            }
        }
    }

    async fn wait_gone(&mut self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap();
        let deadline = Instant::now() + WAIT;
        while !self.gone.contains(&uid) {
            match tokio::time::timeout_at(deadline, self.updates.recv()).await {
                Ok(Some(Update::Status { uid, status, .. })) => {
                    self.statuses.insert(uid, *status);
                }
                Ok(Some(Update::Gone { uid, .. })) => self.gone.push(uid),
                Ok(Some(Update::Event {
                    reason, message, ..
                })) => self.events.push((reason, message)),
                _ => panic!("pod {uid} was not torn down"),
            }
        }
    }

    async fn delete(&mut self, pod: &Pod) {
        let mut deleted = pod.clone();
        deleted.metadata.deletion_timestamp = Some(now());
        self.agent.sync(deleted);
        self.wait_gone(pod).await;
        let uid = pod.metadata.uid.as_deref().unwrap();
        assert!(
            !Path::new("/run/netns")
                .join(PodNetwork::netns_name(uid))
                .exists()
        );
    }
}

/// How long a pod may take to reach a state: generous, since on a loaded 2-core CI machine
/// starting processes and probing them can take many seconds; a passing test never waits it.
const WAIT: Duration = Duration::from_secs(60);

fn container(name: &str, argv: &[&str]) -> Container {
    Container {
        name: name.into(),
        image: Some("weir/none:latest".into()),
        command: Some(argv.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

fn probe(period: i32, failure: i32) -> Probe {
    Probe {
        period_seconds: Some(period),
        failure_threshold: Some(failure),
        ..Default::default()
    }
}

fn status_of<'a>(s: &'a PodStatus, name: &str) -> &'a ContainerStatus {
    s.container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == name)
        .unwrap()
}

fn condition(s: &PodStatus, kind: &str) -> bool {
    s.conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == kind && c.status == "True")
}

fn ready(s: &PodStatus) -> bool {
    condition(s, "Ready")
}

#[tokio::test]
async fn pods_become_ready_behind_probes_reach_each_other_and_terminate() {
    let mut h = Harness::new().await;
    let server = |name: &str| {
        let mut c = container(name, &["python3", "-m", "http.server", "8080"]);
        c.readiness_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::Int(8080),
                path: Some("/".into()),
                ..Default::default()
            }),
            ..probe(1, 3)
        });
        c.resources = Some(ResourceRequirements {
            limits: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("500m".into())),
                ("memory".to_string(), Quantity("128Mi".into())),
            ])),
            ..Default::default()
        });
        c.liveness_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(8080),
                host: None,
            }),
            ..probe(1, 3)
        });
        c
    };
    let a = h.pod("web-a", "Always", vec![], vec![server("web")]);
    let b = h.pod("web-b", "Always", vec![], vec![server("web")]);
    h.agent.sync(a.clone());
    h.agent.sync(b.clone());
    let sa = h.wait(&a, "web-a ready", ready).await;
    let sb = h.wait(&b, "web-b ready", ready).await;
    assert_eq!(sa.phase.as_deref(), Some("Running"));
    assert_eq!(sa.host_ip.as_deref(), Some("192.168.50.1"));
    let (ip_a, ip_b) = (sa.pod_ip.clone().unwrap(), sb.pod_ip.clone().unwrap());
    assert_ne!(ip_a, ip_b);
    assert!(
        condition(&sa, "Initialized")
            && condition(&sa, "ContainersReady")
            && condition(&sa, "PodScheduled")
    );
    let cgroup = h
        .agent
        .runtime()
        .cgroups
        .pod(a.metadata.uid.as_deref().unwrap());
    assert_eq!(
        cgroup.effective_limits().unwrap(),
        (Some(50_000), Some(128 << 20))
    );
    let web = status_of(&sa, "web");
    assert!(
        web.ready && web.started == Some(true) && web.state.as_ref().unwrap().running.is_some()
    );

    // From inside pod a, pod b answers on its pod IP (HTTP over the bridge).
    let netns_a =
        Path::new("/run/netns").join(PodNetwork::netns_name(a.metadata.uid.as_deref().unwrap()));
    let target = probe::Target {
        netns: netns_a,
        pod_ip: ip_a.parse().unwrap(),
        shim_pid: 0,
    };
    let get_b = Probe {
        http_get: Some(HTTPGetAction {
            host: Some(ip_b.clone()),
            port: IntOrString::Int(8080),
            ..Default::default()
        }),
        ..Default::default()
    };
    probe::check(&get_b, &container("x", &[]), &target)
        .await
        .unwrap();

    // resolv.conf and hosts of the pod, as a process inside sees them.
    let dir = h
        .agent
        .runtime()
        .pod_dir(a.metadata.uid.as_deref().unwrap());
    let resolv = std::fs::read_to_string(dir.join("resolv.conf")).unwrap();
    assert_eq!(
        resolv,
        "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
    );
    let hosts = std::fs::read_to_string(dir.join("hosts")).unwrap();
    assert!(hosts.contains(&format!("{ip_a}\tweb-a\n")), "{hosts}");

    h.delete(&a).await;
    h.delete(&b).await;
    let routes = std::process::Command::new("ip")
        .args(["-n", &h.node.name, "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&routes.stdout).contains("veth"),
        "veths left behind"
    );
}

#[tokio::test]
async fn missing_command_waits_with_a_clear_reason_and_backs_off() {
    let mut h = Harness::new().await;
    let pod = h.pod(
        "broken",
        "Always",
        vec![],
        vec![container("app", &["/no/such/binary", "--serve"])],
    );
    h.agent.sync(pod.clone());
    let s = h
        .wait(&pod, "restartCount 2", |s| {
            status_of(s, "app").restart_count >= 2
        })
        .await;
    let app = status_of(&s, "app");
    let waiting = app.state.as_ref().and_then(|st| st.waiting.clone());
    let last = app
        .last_state
        .as_ref()
        .and_then(|st| st.terminated.clone())
        .unwrap();
    assert_eq!(last.reason.as_deref(), Some("StartError"));
    assert_eq!(last.exit_code, 128);
    if let Some(w) = waiting {
        assert_eq!(w.reason.as_deref(), Some("RunContainerError"));
        let msg = w.message.unwrap();
        assert!(
            msg.contains("stat /no/such/binary: no such file or directory")
                && msg.contains("back-off"),
            "{msg}"
        );
    }
    assert!(!ready(&s));
    let failed = h.events.iter().find(|(r, _)| *r == "Failed").unwrap();
    assert!(
        failed.1.starts_with("Error: exec: \"/no/such/binary\""),
        "{failed:?}"
    );
    assert!(
        h.events
            .iter()
            .any(|(r, m)| *r == "BackOff" && m.contains("container app"))
    );
    h.delete(&pod).await;
}

#[tokio::test]
async fn killed_process_restarts_and_liveness_failure_restarts() {
    let dead = format!("/tmp/{}", unique("weir-dead"));
    let mut h = Harness::new().await;
    let mut live = container("live", &["sleep", "300"]);
    live.liveness_probe = Some(Probe {
        exec: Some(ExecAction {
            command: Some(vec!["test".into(), "!".into(), "-e".into(), dead.clone()]),
        }),
        ..probe(1, 1)
    });
    let pod = h.pod(
        "crashy",
        "Always",
        vec![],
        vec![container("app", &["sleep", "300"]), live],
    );
    h.agent.sync(pod.clone());
    let s = h
        .wait(&pod, "running", |s| {
            status_of(s, "app").ready && status_of(s, "live").ready
        })
        .await;
    assert_eq!(status_of(&s, "app").restart_count, 0);

    // kill -9 of the container's process (PID 1 of its namespace, seen from the node).
    let cgroup = h
        .agent
        .runtime()
        .cgroups
        .pod(pod.metadata.uid.as_deref().unwrap());
    let procs = std::fs::read_to_string(cgroup.container("app").join("cgroup.procs")).unwrap();
    let shim = status_of(&s, "app").container_id.clone().unwrap();
    let shim_pid = shim.rsplit('/').next().unwrap();
    let command_pid = procs.lines().find(|p| *p != shim_pid).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(command_pid.parse().unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    let s = h
        .wait(&pod, "app restarted", |s| {
            let app = status_of(s, "app");
            app.restart_count == 1 && app.state.as_ref().is_some_and(|st| st.running.is_some())
        })
        .await;
    let last = status_of(&s, "app")
        .last_state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (last.exit_code, last.reason.as_deref()),
        (137, Some("Error"))
    );

    // Failing liveness: the file appears inside the container's /tmp (the node's /tmp: the
    // runtime shares the node's file system) and the container is restarted with the reason.
    std::fs::write(&dead, "").unwrap();
    let s = h
        .wait(&pod, "live restarted", |s| {
            status_of(s, "live").restart_count >= 1
        })
        .await;
    std::fs::remove_file(&dead).unwrap();
    let last = status_of(&s, "live")
        .last_state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert!(
        last.message
            .unwrap_or_default()
            .starts_with("Liveness probe failed")
    );
    h.delete(&pod).await;
}

#[tokio::test]
async fn init_containers_run_in_order_and_restart_policy_is_honoured() {
    let mut h = Harness::new().await;
    let marker = format!("/tmp/{}", unique("init"));
    let first = container("first", &["sh", "-c", &format!("echo one > {marker}")]);
    let second = container("second", &["sh", "-c", &format!("echo two >> {marker}")]);
    let app = container(
        "app",
        &[
            "sh",
            "-c",
            &format!("cat {marker}; echo pod=$HOSTNAME; exit 0"),
        ],
    );
    let pod = h.pod("job", "Never", vec![first, second], vec![app]);
    h.agent.sync(pod.clone());
    let s = h
        .wait(&pod, "Succeeded", |s| {
            s.phase.as_deref() == Some("Succeeded")
        })
        .await;
    let _ = std::fs::remove_file(&marker);
    assert!(condition(&s, "Initialized") && !ready(&s));
    let inits = s.init_container_statuses.clone().unwrap();
    assert_eq!(inits.len(), 2);
    assert!(inits.iter().all(|c| {
        c.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code
            == 0
    }));
    let dir = h
        .agent
        .runtime()
        .pod_dir(pod.metadata.uid.as_deref().unwrap());
    let (log, _) = run_files(&dir, "app", 0);
    assert_eq!(std::fs::read_to_string(log).unwrap(), "one\ntwo\npod=job\n");
    h.delete(&pod).await;

    // OnFailure restarts a failing container; Never leaves a failed one failed.
    let flaky = h.pod(
        "flaky",
        "OnFailure",
        vec![],
        vec![container("app", &["sh", "-c", "exit 2"])],
    );
    h.agent.sync(flaky.clone());
    let s = h
        .wait(&flaky, "restarted", |s| {
            status_of(s, "app").restart_count >= 1
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Running"));
    h.delete(&flaky).await;
    let failed = h.pod(
        "failed",
        "Never",
        vec![],
        vec![container("app", &["sh", "-c", "exit 2"])],
    );
    h.agent.sync(failed.clone());
    let s = h
        .wait(&failed, "Failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    assert_eq!(status_of(&s, "app").restart_count, 0);
    h.delete(&failed).await;
}

#[tokio::test]
async fn a_restarted_agent_adopts_running_containers() {
    let mut h = Harness::new().await;
    let pod = h.pod(
        "steady",
        "Always",
        vec![],
        vec![container("app", &["sleep", "300"])],
    );
    h.agent.sync(pod.clone());
    let before = h.wait(&pod, "ready", ready).await;
    let id = status_of(&before, "app").container_id.clone();

    // The agent stops (its workers end, processes stay); a new agent takes over.
    h.stop.cancel();
    h.stop = CancellationToken::new();
    let rt = h.agent.runtime().clone();
    let (agent, updates) = Agent::new(rt, h.stop.clone());
    h.agent = agent;
    h.updates = updates;
    h.statuses.clear();
    h.agent.resync(vec![pod.clone()]).await;
    let after = h.wait(&pod, "ready again", ready).await;
    let app = status_of(&after, "app");
    assert_eq!(app.container_id, id, "same process, not a new one");
    assert_eq!(app.restart_count, 0);
    assert_eq!(after.pod_ip, before.pod_ip);
    h.delete(&pod).await;
}

#[tokio::test]
async fn host_network_pods_run_in_the_nodes_namespace() {
    let mut h = Harness::new().await;
    let argv = ["sh", "-c", "grep -c weir0 /proc/net/dev; sleep 300"];
    let mut pod = h.pod("host", "Always", vec![], vec![container("app", &argv)]);
    pod.spec.as_mut().unwrap().host_network = Some(true);
    let plain = h.pod("plain", "Always", vec![], vec![container("app", &argv)]);
    h.agent.sync(pod.clone());
    h.agent.sync(plain.clone());
    let s = h.wait(&pod, "host pod ready", ready).await;
    assert_eq!(
        s.pod_ip.as_deref(),
        Some("192.168.50.1"),
        "a host-network pod has the node's IP"
    );
    h.wait(&plain, "plain pod ready", ready).await;
    let log = |p: &Pod| {
        let dir = h
            .agent
            .runtime()
            .pod_dir(p.metadata.uid.as_deref().unwrap());
        std::fs::read_to_string(run_files(&dir, "app", 0).0).unwrap_or_default()
    };
    let deadline = Instant::now() + WAIT;
    while (log(&pod).is_empty() || log(&plain).is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(log(&pod), "1\n", "the node's bridge is visible");
    assert_eq!(log(&plain), "0\n", "a pod's own namespace has no bridge");
    let node_dns = h
        .agent
        .runtime()
        .pod_dir(pod.metadata.uid.as_deref().unwrap())
        .join("resolv.conf");
    assert!(
        !std::fs::read_to_string(node_dns)
            .unwrap()
            .contains("10.96.0.10")
    );
    h.delete(&pod).await;
    h.delete(&plain).await;
}
