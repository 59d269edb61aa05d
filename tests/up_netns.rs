//! End to end: `weir up` with every role, inside a network namespace this test creates (no
//! route out of it), then `examples/hello.yaml` through the real kubectl. Checks what a user
//! would: pods Running with their own IPs, each answering on it from inside a pod; from
//! inside a pod, the ClusterIP answers from several pods through the BPF socket load
//! balancer, cluster DNS answers A, SRV (with its target's address as additional data) and
//! PTR at 10.96.0.10, and `getent hosts hello` resolves through the pod's search path; the
//! ingress routes `Host: hello.example.com` to the pods, and HTTPS with a TLS Secret chosen
//! by SNI; a NodePort answers a client namespace outside
//! the node with its source address kept; no iptables nat rules exist; `kubectl logs`
//! reaches the agent; deleting the Service turns its name into NXDOMAIN.
//!
//! Needs root, bpffs, cgroup2 and kubectl, curl and dig (installed by `dev.sh`). Every
//! namespace, cgroup, pin and process it makes is removed on drop, even on failure.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{cgroup2_root, kill_and_remove_cgroups, run_ok};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");
/// curl's `-m` for requests that must succeed: generous, as a loaded CI machine can stall
/// a process for seconds; a request that works takes milliseconds.
const CURL_MAX_S: &str = "10";

/// Everything the test creates, torn down in reverse on drop.
struct Node {
    name: String,
    /// A namespace outside the node, linked to its eth0: "the internet" for NodePorts.
    client: String,
    dir: tempfile::TempDir,
    cgroup: PathBuf,
    bpf_root: PathBuf,
    weir: Option<Child>,
}

impl Node {
    fn start() -> Node {
        let id = std::process::id();
        let name = format!("weir-up-{id}");
        let node = Node {
            dir: tempfile::tempdir().expect("tempdir"),
            cgroup: cgroup2_root().join(format!("weir-up-{id}")),
            bpf_root: PathBuf::from(format!("/sys/fs/bpf/weir-up-{id}")),
            client: format!("weir-client-{id}"),
            name,
            weir: None,
        };
        // A "host" namespace with an address but no route out of it.
        for args in [
            vec!["netns", "add", &node.name],
            vec!["-n", &node.name, "link", "set", "lo", "up"],
            vec![
                "-n", &node.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
            ],
            vec![
                "-n",
                &node.name,
                "addr",
                "add",
                "172.30.0.2/24",
                "dev",
                "eth0",
            ],
            vec!["-n", &node.name, "link", "set", "eth0", "up"],
            // A client outside the node, on the other end of eth0.
            vec!["netns", "add", &node.client],
            vec![
                "-n",
                &node.name,
                "link",
                "set",
                "eth0p",
                "netns",
                &node.client,
            ],
            vec![
                "-n",
                &node.client,
                "addr",
                "add",
                "172.30.0.1/24",
                "dev",
                "eth0p",
            ],
            vec!["-n", &node.client, "link", "set", "eth0p", "up"],
        ] {
            run_ok(Command::new("ip").args(&args));
        }
        node
    }

    fn netns(&self) -> String {
        format!("--net=/run/netns/{}", self.name)
    }

    fn up(&mut self) {
        let data = self.dir.path().join("data");
        let log = std::fs::File::create(self.dir.path().join("weir.log")).expect("log");
        let subtree = self
            .cgroup
            .file_name()
            .and_then(|n| n.to_str())
            .expect("cgroup name")
            .to_string();
        let child = Command::new("nsenter")
            .arg(self.netns())
            .arg(WEIR)
            .args(["up", "--no-kubeconfig-merge", "--node-name", "e2e"])
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--lb-arg=--bpf-root={}", self.bpf_root.display()))
            .arg(format!("--lb-arg=--cgroup={}", self.cgroup.display()))
            .arg(format!("--agent-arg=--cgroup-subtree={subtree}/e2e"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weir up");
        self.weir = Some(child);
        self.wait_for("the node to be Ready", Duration::from_secs(120), || {
            let out = self.kubectl(&[
                "get",
                "node",
                "e2e",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            String::from_utf8_lossy(&out.stdout) == "True"
        });
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("data/kubeconfig")
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(self.netns())
            .arg("kubectl")
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
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
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run `argv` inside `pod_netns`, as a process of the load balancer's cgroup, as pod
    /// processes are.
    fn in_pod(&self, pod_netns: &str, argv: &[&str]) -> Output {
        self.in_cgroup(&format!("--net=/run/netns/{pod_netns}"), argv)
    }

    /// Run `argv` in the network and mount namespaces of process `pid` (a pod's container,
    /// so with the pod's own resolv.conf), as a process of the load balancer's cgroup.
    fn in_container(&self, pid: &str, argv: &[&str]) -> Output {
        self.in_cgroup(&format!("--target={pid} --net --mount"), argv)
    }

    fn in_cgroup(&self, nsenter_args: &str, argv: &[&str]) -> Output {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter {nsenter_args} \"$@\"",
            self.probe_cgroup().display()
        );
        Command::new("sh")
            .args(["-c", &script, "sh"])
            .args(argv)
            .output()
            .expect("run in pod")
    }

    fn probe_cgroup(&self) -> PathBuf {
        let p = self.cgroup.join("e2e-probe");
        std::fs::create_dir_all(&p).expect("probe cgroup");
        p
    }

    fn wait_for(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("weir.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("\n--- weir up log (tail) ---\n{tail}")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut weir) = self.weir.take() {
            // Remove the workload first so the agent stops the pods it runs.
            let _ = self.kubectl(&["delete", "namespace", "hello", "--timeout=30s"]);
            let _ = Command::new("kill")
                .args(["-TERM", &weir.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && matches!(weir.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = weir.kill();
            let _ = weir.wait();
        }
        // Whatever is left in the test's cgroups goes, then the cgroups themselves.
        kill_and_remove_cgroups(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.bpf_root);
        // Pod namespaces of this node (one per pod directory the agent keeps), then the node
        // namespace; never another test's pods.
        if let Ok(pods) = std::fs::read_dir(self.dir.path().join("data/agent/pods")) {
            for pod in pods.flatten() {
                let ns = format!("weir-{}", pod.file_name().to_string_lossy());
                let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            }
        }
        for ns in [&self.client, &self.name] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn weir_up_serves_hello_through_lb_dns_and_ingress() {
    let mut node = Node::start();
    node.up();

    // The example, with `weir echo` run from this build.
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello.yaml"))
            .expect("examples/hello.yaml")
            .replace("command: [\"weir\", ", &format!("command: [\"{WEIR}\", "));
    let path = node.dir.path().join("hello.yaml");
    std::fs::write(&path, manifest).expect("write manifest");
    node.kubectl_ok(&["apply", "-f", path.to_str().expect("path")]);
    node.kubectl_ok(&[
        "wait",
        "-n",
        "hello",
        "--for=condition=Ready",
        "pod",
        "-l",
        "app=hello",
        "--timeout=180s",
    ]);
    let ips = node.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        "hello",
        "-o",
        "jsonpath={.items[*].status.podIP}",
    ]);
    let ips: BTreeSet<&str> = ips.split_whitespace().collect();
    assert_eq!(ips.len(), 3, "three pods, each with its own IP: {ips:?}");

    let cluster_ip = node.kubectl_ok(&[
        "get",
        "svc",
        "hello",
        "-n",
        "hello",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let uid = node.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        "hello",
        "-o",
        "jsonpath={.items[0].metadata.uid}",
    ]);
    let pod_netns = format!("weir-{uid}");

    // Logs come from the node agent through the API server's pods/log.
    let pod = node.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        "hello",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    // A pod without a readiness probe is Ready once its process runs, which can be before
    // that process has written its first line.
    node.wait_for("weir echo's log line", Duration::from_secs(60), || {
        let out = node.kubectl(&["logs", "-n", "hello", &pod]);
        String::from_utf8_lossy(&out.stdout).contains("weir echo serving")
    });
    node.wait_for(
        "the Service in the BPF maps",
        Duration::from_secs(60),
        || {
            node.in_pod(
                &pod_netns,
                &["curl", "-s", "-m", "2", &format!("http://{cluster_ip}/")],
            )
            .status
            .success()
        },
    );

    // An HTTP GET from inside one pod: its body, and the output for failure messages.
    let curl_in_pod = |url: &str| {
        let out = node.in_pod(&pod_netns, &["curl", "-s", "-m", CURL_MAX_S, url]);
        (String::from_utf8_lossy(&out.stdout).into_owned(), out)
    };

    // From inside one pod, every pod answers on its own pod IP.
    for ip in &ips {
        let (body, out) = curl_in_pod(&format!("http://{ip}:8080/"));
        assert!(
            body.starts_with("pod=hello-"),
            "pod IP {ip}: {body:?} {out:?}"
        );
    }

    // ClusterIP from inside a pod: answered by more than one pod.
    let mut answered_by = BTreeSet::new();
    for _ in 0..12 {
        let (body, out) = curl_in_pod(&format!("http://{cluster_ip}/"));
        assert!(
            body.starts_with("pod=hello-"),
            "curl ClusterIP: {body:?} {out:?}"
        );
        answered_by.insert(
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(
        answered_by.len() >= 2,
        "load spread over pods: {answered_by:?}"
    );

    // Cluster DNS at 10.96.0.10, itself reached through the load balancer.
    let dig = |args: &[&str]| {
        let mut argv = vec!["dig", "+time=5", "+tries=3", "@10.96.0.10"];
        argv.extend_from_slice(args);
        String::from_utf8_lossy(&node.in_pod(&pod_netns, &argv).stdout).into_owned()
    };
    // The DNS server learns the Service from its own watch, independently of the LB.
    node.wait_for(
        "the Service in cluster DNS",
        Duration::from_secs(60),
        || dig(&["+short", "hello.hello.svc.cluster.local"]).trim() == cluster_ip,
    );
    // The short name through the pod's own resolv.conf (search path, ndots:5).
    let procs = node.cgroup.join(format!("e2e/pod{uid}/echo/cgroup.procs"));
    let procs = std::fs::read_to_string(&procs).expect("the echo container's cgroup.procs");
    let pid = procs
        .split_whitespace()
        .next()
        .expect("a process in the echo container");
    let getent = node.in_container(pid, &["getent", "hosts", "hello"]);
    let getent = String::from_utf8_lossy(&getent.stdout).into_owned();
    assert!(
        getent.starts_with(&format!("{cluster_ip} ")),
        "getent hosts hello: {getent:?}"
    );
    let srv = dig(&["+short", "SRV", "_http._tcp.hello.hello.svc.cluster.local"]);
    assert!(
        srv.contains("80 hello.hello.svc.cluster.local."),
        "SRV: {srv}"
    );
    // The SRV answer brings its target's address along in the additional section.
    let additional = dig(&[
        "+noall",
        "+additional",
        "SRV",
        "_http._tcp.hello.hello.svc.cluster.local",
    ]);
    assert!(
        additional.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 5
                && f[0] == "hello.hello.svc.cluster.local."
                && f[3] == "A"
                && f[4] == cluster_ip
        }),
        "SRV additional section: {additional}"
    );
    let ptr = dig(&["+short", "-x", &cluster_ip]);
    assert_eq!(ptr.trim(), "hello.hello.svc.cluster.local.", "PTR");

    // Ingress on the node's port 80, once the proxy has the route and its endpoints.
    let ingress = || {
        let out = Command::new("nsenter")
            .arg(node.netns())
            .args([
                "curl",
                "-s",
                "-m",
                CURL_MAX_S,
                "-H",
                "Host: hello.example.com",
                "http://127.0.0.1/",
            ])
            .output()
            .expect("curl ingress");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    node.wait_for("the Ingress route", Duration::from_secs(60), || {
        ingress().starts_with("pod=hello-")
    });
    let mut ingress_pods = BTreeSet::new();
    for _ in 0..9 {
        let body = ingress();
        assert!(body.starts_with("pod=hello-"), "ingress: {body:?}");
        ingress_pods.insert(
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(ingress_pods.len() >= 2, "ingress spreads: {ingress_pods:?}");

    // HTTPS on the node's port 443 with a certificate from a kubernetes.io/tls Secret, chosen
    // by SNI: curl verifies the chain against that certificate alone, so a handshake that
    // succeeds proves the proxy served the Secret's certificate for this name.
    let tls = rcgen::generate_simple_self_signed(vec!["hello.example.com".to_string()])
        .expect("self-signed certificate");
    let cert = node.dir.path().join("hello.crt");
    std::fs::write(&cert, tls.cert.pem()).expect("write cert");
    let key = node.dir.path().join("hello.key");
    std::fs::write(&key, tls.signing_key.serialize_pem()).expect("write key");
    node.kubectl_ok(&[
        "create",
        "secret",
        "tls",
        "hello-tls",
        "-n",
        "hello",
        &format!("--cert={}", cert.display()),
        &format!("--key={}", key.display()),
    ]);
    node.kubectl_ok(&[
        "patch",
        "ingress",
        "hello",
        "-n",
        "hello",
        "--type=merge",
        "-p",
        r#"{"spec":{"tls":[{"hosts":["hello.example.com"],"secretName":"hello-tls"}]}}"#,
    ]);
    let https = |host: &str| {
        Command::new("nsenter")
            .arg(node.netns())
            .args(["curl", "-s", "-m", CURL_MAX_S, "--cacert"])
            .arg(&cert)
            .arg("--resolve")
            .arg(format!("{host}:443:127.0.0.1"))
            .arg(format!("https://{host}/"))
            .output()
            .expect("curl https")
    };
    node.wait_for(
        "HTTPS with the Secret's certificate",
        Duration::from_secs(60),
        || String::from_utf8_lossy(&https("hello.example.com").stdout).starts_with("pod=hello-"),
    );
    // Another name does not get hello.example.com's certificate.
    let other = https("other.example.com");
    assert!(
        !other.status.success(),
        "SNI other.example.com must not verify with hello's certificate: {other:?}"
    );

    // NodePort from a client outside the node, through the tc programs on eth0; with
    // externalTrafficPolicy Local the pods see the client's own address.
    node.kubectl_ok(&[
        "patch",
        "svc",
        "hello",
        "-n",
        "hello",
        "--type=merge",
        "-p",
        r#"{"spec":{"type":"NodePort","externalTrafficPolicy":"Local"}}"#,
    ]);
    let node_port = node.kubectl_ok(&[
        "get",
        "svc",
        "hello",
        "-n",
        "hello",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    let from_outside = || {
        Command::new("ip")
            .args(["netns", "exec", &node.client])
            .args(["curl", "-s", "-m", CURL_MAX_S])
            .arg(format!("http://172.30.0.2:{node_port}/"))
            .output()
            .expect("curl NodePort")
    };
    node.wait_for("the NodePort from outside", Duration::from_secs(60), || {
        from_outside().status.success()
    });
    let mut node_port_pods = BTreeSet::new();
    for _ in 0..9 {
        let body = String::from_utf8_lossy(&from_outside().stdout).into_owned();
        assert!(
            body.starts_with("pod=hello-") && body.contains("client=172.30.0.1:"),
            "NodePort answer with the client's address: {body:?}"
        );
        node_port_pods.insert(
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(
        node_port_pods.len() >= 2,
        "NodePort spreads: {node_port_pods:?}"
    );

    // No iptables NAT anywhere in the node.
    let nat = Command::new("nsenter")
        .arg(node.netns())
        .args(["iptables-save", "-t", "nat"])
        .output()
        .expect("iptables-save");
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(
        !nat.contains("KUBE-") && !nat.to_lowercase().contains("weir"),
        "no service NAT rules: {nat}"
    );

    // Deleting the Service removes its name (the issue asks for within a second; this waits
    // up to 30 s and asserts no timing).
    node.kubectl_ok(&["delete", "svc", "hello", "-n", "hello"]);
    node.wait_for("NXDOMAIN after delete", Duration::from_secs(30), || {
        dig(&["hello.hello.svc.cluster.local"]).contains("status: NXDOMAIN")
    });
}
