//! End to end: a two-node cluster on one machine. Two "host" network namespaces joined by a
//! veth pair (node IPs on that link, no route out of either), `weir server` in host A
//! listening on A's address, and a `weir node` agent in each host with its own data dir,
//! node name, node IP and cgroup subtree. A Deployment of four `weir echo` pods spreads over
//! both nodes, and pods on A and B reach each other by pod IP through the inter-node routes
//! the agents install. Then node B is killed (its agent and every pod process, `kill -9`):
//! it turns NotReady when its Lease expires, its pods leave the ready endpoints, and after
//! the toleration they are evicted and replaced on A.
//!
//! Needs root, cgroup2 and curl and kubectl. The grace period and toleration are shortened
//! with the control plane's `--node-monitor-grace-period` and
//! `--default-unreachable-toleration-seconds`. Every namespace, cgroup and process it makes
//! is removed on drop, even on failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{cgroup2_root, kill_and_remove_cgroups, run_ok};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const SERVER_IP: &str = "172.30.77.1";

/// One node: its host namespace, address and agent.
struct Host {
    node: &'static str,
    netns: String,
    ip: &'static str,
    agent: Option<Child>,
}

/// Everything the test creates, torn down on drop.
struct Cluster {
    dir: tempfile::TempDir,
    /// This test's cgroup2 subtree; each agent has a child of it.
    cgroup: PathBuf,
    hosts: [Host; 2],
    server: Option<Child>,
}

impl Cluster {
    fn start() -> Cluster {
        let id = std::process::id();
        let cluster = Cluster {
            dir: tempfile::tempdir().expect("tempdir"),
            cgroup: cgroup2_root().join(format!("weir-2n-{id}")),
            hosts: [
                Host {
                    node: "node-a",
                    netns: format!("weir-2n-a-{id}"),
                    ip: SERVER_IP,
                    agent: None,
                },
                Host {
                    node: "node-b",
                    netns: format!("weir-2n-b-{id}"),
                    ip: "172.30.77.2",
                    agent: None,
                },
            ],
            server: None,
        };
        let [a, b] = [&cluster.hosts[0].netns, &cluster.hosts[1].netns];
        for args in [
            vec!["netns", "add", a],
            vec!["netns", "add", b],
            vec!["-n", a, "link", "set", "lo", "up"],
            vec!["-n", b, "link", "set", "lo", "up"],
            // The "LAN": one veth pair, one end in each host. No default route anywhere.
            vec![
                "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b,
            ],
            vec!["-n", a, "addr", "add", "172.30.77.1/24", "dev", "eth0"],
            vec!["-n", b, "addr", "add", "172.30.77.2/24", "dev", "eth0"],
            vec!["-n", a, "link", "set", "eth0", "up"],
            vec!["-n", b, "link", "set", "eth0", "up"],
        ] {
            run_ok(Command::new("ip").args(&args));
        }
        cluster
    }

    fn data(&self, what: &str) -> PathBuf {
        self.dir.path().join(what)
    }

    fn log(&self, what: &str) -> std::fs::File {
        std::fs::File::create(self.data(&format!("{what}.log"))).expect("log file")
    }

    fn server_up(&mut self) {
        let netns = format!("--net=/run/netns/{}", self.hosts[0].netns);
        let child = Command::new("nsenter")
            .arg(netns)
            .arg(WEIR)
            .arg("server")
            .arg(format!("--data-dir={}", self.data("server").display()))
            .arg(format!("--listen={SERVER_IP}:6443"))
            .args([
                "--node-monitor-grace-period=6s",
                "--default-unreachable-toleration-seconds=4",
            ])
            .stdout(Stdio::null())
            .stderr(self.log("server"))
            .spawn()
            .expect("spawn weir server");
        self.server = Some(child);
        self.wait_for("the API server", Duration::from_secs(60), || {
            self.data("server/kubeconfig").exists() && self.kubectl(&["get", "ns"]).status.success()
        });
    }

    fn agent_up(&mut self, i: usize) {
        let token = self.kubectl_ok(&[
            "config",
            "view",
            "--raw",
            "-o",
            "jsonpath={.users[0].user.token}",
        ]);
        let host = &self.hosts[i];
        let cgroup = format!(
            "{}/{}",
            self.cgroup
                .file_name()
                .and_then(|n| n.to_str())
                .expect("name"),
            host.node
        );
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", host.netns))
            .arg(WEIR)
            .arg("node")
            .arg(format!("--server=https://{SERVER_IP}:6443"))
            .arg(format!(
                "--certificate-authority={}",
                self.data("server/pki/ca.crt").display()
            ))
            .arg(format!("--node-name={}", host.node))
            .args(match i {
                // A: the address and log endpoint given; B: both found by the agent (its
                // one global address; the log endpoint advertised at it).
                0 => vec![
                    format!("--node-ip={}", host.ip),
                    format!("--listen={}:10250", host.ip),
                ],
                _ => vec!["--listen=0.0.0.0:10250".to_string()],
            })
            .arg(format!(
                "--state-dir={}",
                self.data(&format!("{}-state", host.node)).display()
            ))
            .arg(format!("--cgroup-subtree={cgroup}"))
            .arg("--heartbeat=1")
            .env("WEIR_TOKEN", token.trim())
            .stdout(Stdio::null())
            .stderr(self.log(host.node))
            .spawn()
            .expect("spawn weir node");
        self.hosts[i].agent = Some(child);
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.hosts[0].netns))
            .arg("kubectl")
            .arg(format!(
                "--kubeconfig={}",
                self.data("server/kubeconfig").display()
            ))
            .args(args)
            .output()
            .expect("run kubectl")
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tails()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn node_ready(&self, node: &str) -> String {
        let out = self.kubectl(&[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The echo pods not being deleted: name → (node, pod IP, uid, ready).
    fn pods(&self) -> BTreeMap<String, (String, String, String, bool)> {
        let out = self.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            "two",
            "-l",
            "app=echo",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP} \
             {.metadata.uid} {.status.conditions[?(@.type==\"Ready\")].status} \
             {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ]);
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // A sixth field is the deletion timestamp: the pod is going.
                (f.len() == 5).then(|| {
                    (
                        f[0].to_string(),
                        (
                            f[1].to_string(),
                            f[2].to_string(),
                            f[3].to_string(),
                            f[4] == "True",
                        ),
                    )
                })
            })
            .collect()
    }

    /// Ready endpoints of the echo Service: (address, nodeName).
    fn ready_endpoints(&self) -> BTreeSet<(String, String)> {
        let out = self.kubectl_ok(&[
            "get",
            "endpointslices",
            "-n",
            "two",
            "-l",
            "kubernetes.io/service-name=echo",
            "-o",
            "jsonpath={range .items[*].endpoints[*]}{.addresses[0]} {.nodeName} \
             {.conditions.ready}{\"\\n\"}{end}",
        ]);
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[2] == "true").then(|| (f[0].to_string(), f[1].to_string()))
            })
            .collect()
    }

    /// `curl` from inside the network namespace of the pod with `uid`.
    fn curl_from_pod(&self, uid: &str, url: &str) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/weir-{uid}"))
            .args(["curl", "-s", "-m", "10", url])
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn log_tails(&self) -> String {
        let mut s = String::new();
        for what in ["server", "node-a", "node-b"] {
            let log =
                std::fs::read_to_string(self.data(&format!("{what}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            s.push_str(&format!("\n--- {what} log (tail) ---\n{tail}"));
        }
        s
    }

    /// `kill -9` node B: its agent, then every process of its pods.
    fn kill_node_b(&mut self) {
        if let Some(mut agent) = self.hosts[1].agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let subtree = self.cgroup.join(self.hosts[1].node);
        std::fs::write(subtree.join("cgroup.kill"), "1").expect("cgroup.kill of node-b");
    }
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            if let Some(agent) = host.agent.as_mut() {
                stop(agent);
            }
        }
        if let Some(server) = self.server.as_mut() {
            stop(server);
        }
        // Agents leave pods running when they stop: end every process in the test's cgroups.
        kill_and_remove_cgroups(&self.cgroup);
        // The pods' namespaces, named after the pods each agent recorded in its state dir.
        for host in &self.hosts {
            let pods = self.data(&format!("{}-state/pods", host.node));
            for entry in std::fs::read_dir(pods).into_iter().flatten().flatten() {
                let ns = format!("weir-{}", entry.file_name().to_string_lossy());
                if Path::new("/run/netns").join(&ns).exists() {
                    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
                }
            }
        }
        for host in &self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &host.netns])
                .status();
        }
    }
}

fn manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: two
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: two
spec:
  replicas: 4
  selector:
    matchLabels: {{app: echo}}
  template:
    metadata:
      labels: {{app: echo}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: echo
        image: weir/echo
        command: ["{WEIR}", "echo", "--http", "0.0.0.0:8080"]
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe:
          httpGet: {{path: /, port: http}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: two
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
    )
}

#[test]
fn two_nodes_spread_pods_reach_each_other_and_a_dead_node_is_healed() {
    let mut c = Cluster::start();
    c.server_up();
    c.agent_up(0);
    c.agent_up(1);
    c.wait_for("both nodes Ready", Duration::from_secs(60), || {
        c.node_ready("node-a") == "True" && c.node_ready("node-b") == "True"
    });

    let path = c.data("echo.yaml");
    std::fs::write(&path, manifest()).expect("write manifest");
    c.kubectl_ok(&["apply", "-f", path.to_str().expect("path")]);
    c.wait_for("4 ready echo pods", Duration::from_secs(120), || {
        let pods = c.pods();
        pods.len() == 4 && pods.values().all(|p| p.3)
    });
    let pods = c.pods();
    let on = |node: &str| -> Vec<(String, String, String)> {
        pods.iter()
            .filter(|(_, p)| p.0 == node)
            .map(|(name, p)| (name.clone(), p.1.clone(), p.2.clone()))
            .collect()
    };
    let (on_a, on_b) = (on("node-a"), on("node-b"));
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "pods spread over both nodes: {pods:?}"
    );
    let ips: BTreeSet<&String> = pods.values().map(|p| &p.1).collect();
    assert_eq!(ips.len(), 4, "each pod has its own IP: {pods:?}");

    // Pod to pod across nodes, both ways, by pod IP, without NAT: the echo sees the
    // caller's own pod IP. Each agent installs its route to the other node's pod CIDR when
    // it sees that Node's podCIDR, which may come after the pods are ready.
    for (from, to) in [(&on_a[0], &on_b[0]), (&on_b[0], &on_a[0])] {
        let url = format!("http://{}:8080/", to.1);
        c.wait_for(
            "a route to the other node's pods",
            Duration::from_secs(60),
            || c.curl_from_pod(&from.2, &url).starts_with("pod="),
        );
        let body = c.curl_from_pod(&from.2, &url);
        assert!(
            body.starts_with(&format!("pod={} client={}:", to.0, from.1)),
            "{} ({}) -> {} ({}): {body:?}",
            from.0,
            from.1,
            to.0,
            to.1
        );
    }
    c.wait_for("4 ready endpoints", Duration::from_secs(60), || {
        c.ready_endpoints().len() == 4
    });
    let addresses = c.kubectl_ok(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.addresses[?(@.type==\"InternalIP\")].address} {end}",
    ]);
    assert_eq!(
        addresses.trim(),
        "node-a=172.30.77.1 node-b=172.30.77.2",
        "node IPs"
    );
    // The API server in host A proxies `kubectl logs` to node B's agent.
    c.wait_for(
        "weir echo's log line through node B",
        Duration::from_secs(60),
        || {
            let out = c.kubectl(&["logs", "-n", "two", &on_b[0].0]);
            String::from_utf8_lossy(&out.stdout).contains("weir echo serving")
        },
    );

    // Node B dies.
    c.kill_node_b();
    c.wait_for("node-b NotReady", Duration::from_secs(60), || {
        c.node_ready("node-b") == "Unknown"
    });
    c.wait_for(
        "node-b's pods out of the ready endpoints",
        Duration::from_secs(60),
        || c.ready_endpoints().iter().all(|(_, node)| node == "node-a"),
    );
    // After the toleration, node-b's pods are evicted and replaced on node-a.
    c.wait_for(
        "4 ready echo pods on node-a",
        Duration::from_secs(120),
        || {
            let pods = c.pods();
            pods.len() == 4 && pods.values().all(|p| p.0 == "node-a" && p.3)
        },
    );
    c.wait_for(
        "4 ready endpoints on node-a",
        Duration::from_secs(60),
        || {
            let eps = c.ready_endpoints();
            eps.len() == 4 && eps.iter().all(|(_, node)| node == "node-a")
        },
    );
    let taints = c.kubectl_ok(&[
        "get",
        "node",
        "node-b",
        "-o",
        "jsonpath={.spec.taints[*].key}",
    ]);
    assert!(
        taints.contains("node.kubernetes.io/unreachable"),
        "node-b tainted: {taints}"
    );
    // The replacements answer from node-a's other pods.
    let pods = c.pods();
    let mut it = pods.iter();
    let (Some(a), Some(b)) = (it.next(), it.next()) else {
        panic!("pods: {pods:?}")
    };
    let body = c.curl_from_pod(&a.1.2, &format!("http://{}:8080/", b.1.1));
    assert!(body.starts_with(&format!("pod={} ", b.0)), "{body:?}");
}
