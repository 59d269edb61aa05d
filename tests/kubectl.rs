//! The real kubectl (`/usr/bin/kubectl`, v1.32) against `weir up`, unchanged: the commands
//! a newcomer runs, on the embedded store and on a real etcd, plus a restart that keeps the
//! state. `weir up` merges its context into `$KUBECONFIG`, which each test points at a
//! temporary file, so plain `kubectl` (no flags) finds the cluster as it would in
//! `~/.kube/config`. The `kubectl create <generator>` commands send protobuf bodies
//! (client-go's typed clients), so they test the protobuf decoder end to end.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello.yaml");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed (and reaped) when the test ends, pass or fail.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    extra: Vec<String>,
    weir: Option<Proc>,
}

impl Cluster {
    fn start(extra: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Cluster {
            kubeconfig: dir.path().join("merged-kubeconfig"),
            dir,
            extra: extra.to_vec(),
            weir: None,
        };
        c.up();
        c
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn up(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("weir.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("up")
            // kubectl against the control plane only: node roles would bind ports 53/80/443,
            // build a bridge and attach BPF in the test runner's own network namespace.
            .arg("--control-plane-only")
            .arg("--data-dir")
            .arg(self.data_dir())
            // Port 0 (also after a restart): weir picks a free port and merges the URL into
            // $KUBECONFIG; a port found free here could be taken before weir binds it.
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(&self.extra)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn weir up");
        self.weir = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self.kubectl(&["get", "--raw", "/readyz"]);
            let ns = self.kubectl(&["get", "namespace", "default"]);
            if ready.status.success() && ns.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "weir up did not get ready: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, as a service manager stops it; weir must exit cleanly.
    fn stop(&mut self) {
        let Some(mut proc) = self.weir.take() else {
            return;
        };
        let pid = proc.0.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.0.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "weir exited with {status}: {}",
                    self.log()
                );
                return;
            }
            assert!(Instant::now() < deadline, "weir did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weir.log")).unwrap_or_default()
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .output()
            .expect("run kubectl")
    }

    /// Run kubectl, require success, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

fn lines_with<'a>(out: &'a str, needle: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.contains(needle)).collect()
}

fn newcomer_flow(c: &mut Cluster) {
    // The context is merged and current: no --kubeconfig, no --context.
    assert_eq!(c.ok(&["config", "current-context"]).trim(), "weir");
    c.ok(&["get", "nodes"]);
    let pods = c.ok(&["get", "pods", "-A", "-o", "wide"]);
    assert!(pods.is_empty() || pods.starts_with("NAMESPACE"), "{pods}");

    let created = c.ok(&["apply", "-f", MANIFEST]);
    for obj in [
        "namespace/hello",
        "configmap/hello",
        "secret/hello",
        "deployment.apps/hello",
        "service/hello",
        "ingress.networking.k8s.io/hello",
    ] {
        assert!(created.contains(&format!("{obj} created")), "{created}");
    }
    let again = c.ok(&["apply", "-f", MANIFEST]);
    for obj in [
        "namespace/hello",
        "configmap/hello",
        "deployment.apps/hello",
        "service/hello",
    ] {
        assert!(again.contains(&format!("{obj} unchanged")), "{again}");
    }
    let text = std::fs::read_to_string(MANIFEST).expect("manifest");
    let changed = c.dir.path().join("changed.yaml");
    std::fs::write(&changed, text.replace("hello from weir", "hello again")).expect("write");
    let configured = c.ok(&["apply", "-f", changed.to_str().expect("utf8")]);
    assert!(
        configured.contains("configmap/hello configured"),
        "{configured}"
    );
    assert!(
        configured.contains("deployment.apps/hello unchanged"),
        "{configured}"
    );
    let data = c.ok(&[
        "get",
        "configmap",
        "hello",
        "-n",
        "hello",
        "-o",
        "jsonpath={.data.greeting}",
    ]);
    assert_eq!(data, "hello again");

    // Server-side field validation: an unknown field is refused, not dropped.
    let bad = c.dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad\n  namespace: hello\ndatta:\n  a: b\n")
        .expect("write");
    let out = c.kubectl(&["apply", "-f", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field \"datta\""));

    let svc = c.ok(&["get", "svc", "-n", "hello", "hello", "-o", "yaml"]);
    assert!(svc.contains("clusterIP: 10."), "{svc}");
    let table = c.ok(&["get", "svc", "-n", "hello"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(lines_with(&table, "hello")[0].contains("80/TCP"), "{table}");

    let scaled = c.ok(&[
        "scale",
        "deployment",
        "hello",
        "-n",
        "hello",
        "--replicas=5",
    ]);
    assert!(scaled.contains("deployment.apps/hello scaled"), "{scaled}");
    let replicas = c.ok(&[
        "get",
        "deploy",
        "hello",
        "-n",
        "hello",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "5");

    // get --watch prints the change made while it runs.
    let mut watch = Proc(
        Command::new("kubectl")
            .args(["get", "configmaps", "-n", "hello", "--watch"])
            .env("KUBECONFIG", &c.kubeconfig)
            .env("HOME", c.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl get --watch"),
    );
    let stdout = watch.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    let watched = c.dir.path().join("watched.yaml");
    std::fs::write(
        &watched,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: watched\n  namespace: hello\n",
    )
    .expect("write");
    c.ok(&["apply", "-f", watched.to_str().expect("utf8")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.starts_with("watched")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("kubectl get --watch did not show the new ConfigMap: {seen:?}"),
        }
    }
    drop(watch);

    let resources = c.ok(&["api-resources"]);
    for want in [
        "deployments",
        "apps/v1",
        "ingresses",
        "networking.k8s.io/v1",
        "endpointslices",
    ] {
        assert!(resources.contains(want), "{resources}");
    }

    let deleted = c.ok(&["delete", "-f", MANIFEST]);
    assert!(deleted.contains("namespace \"hello\" deleted"), "{deleted}");
    assert!(
        deleted.contains("deployment.apps \"hello\" deleted"),
        "{deleted}"
    );
    let gone = c.kubectl(&["get", "namespace", "hello"]);
    assert!(
        !gone.status.success(),
        "the namespace is gone once delete returns"
    );
}

fn restart_keeps_state(c: &mut Cluster) {
    let keep = c.dir.path().join("keep.yaml");
    std::fs::write(
        &keep,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: keep\ndata:\n  a: b\n",
    )
    .expect("write");
    c.ok(&["apply", "-f", keep.to_str().expect("utf8")]);
    let ip_before = c.ok(&[
        "get",
        "svc",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    c.stop();
    c.up();
    let data = c.ok(&["get", "configmap", "keep", "-o", "jsonpath={.data.a}"]);
    assert_eq!(data, "b");
    let ip_after = c.ok(&[
        "get",
        "svc",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(
        (ip_before.as_str(), ip_after.as_str()),
        ("10.96.0.1", "10.96.0.1")
    );
}

#[test]
fn kubectl_against_weir_up_on_the_embedded_store() {
    let mut c = Cluster::start(&[]);
    newcomer_flow(&mut c);
    restart_keeps_state(&mut c);
}

/// `kubectl get -o json` of one object.
fn get_json(c: &Cluster, kind: &str, name: &str) -> serde_json::Value {
    let out = c.ok(&["get", kind, name, "-n", "gen", "-o", "json"]);
    serde_json::from_str(&out).expect("kubectl -o json")
}

fn base64_decode(s: &str) -> Vec<u8> {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(s.as_bytes())?;
            child.wait_with_output()
        })
        .expect("base64 -d");
    assert!(out.status.success(), "base64 -d {s:?}");
    out.stdout
}

#[test]
fn kubectl_create_generators_send_protobuf() {
    let c = Cluster::start(&[]);
    let created = c.ok(&["create", "namespace", "gen"]);
    assert_eq!(created.trim(), "namespace/gen created");
    assert_eq!(
        get_json(&c, "namespace", "gen")["status"]["phase"],
        "Active"
    );

    let tls = rcgen::generate_simple_self_signed(vec!["gen.example.com".to_string()])
        .expect("self-signed certificate");
    let (cert, key) = (c.dir.path().join("tls.crt"), c.dir.path().join("tls.key"));
    std::fs::write(&cert, tls.cert.pem()).expect("write cert");
    std::fs::write(&key, tls.signing_key.serialize_pem()).expect("write key");
    c.ok(&[
        "create",
        "secret",
        "tls",
        "gen-tls",
        "-n",
        "gen",
        "--cert",
        cert.to_str().expect("utf8"),
        "--key",
        key.to_str().expect("utf8"),
    ]);
    let secret = get_json(&c, "secret", "gen-tls");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let data = &secret["data"];
    assert_eq!(
        base64_decode(data["tls.crt"].as_str().expect("tls.crt")),
        tls.cert.pem().into_bytes()
    );
    assert_eq!(
        base64_decode(data["tls.key"].as_str().expect("tls.key")),
        tls.signing_key.serialize_pem().into_bytes()
    );

    // Every byte value, so a lossy text conversion anywhere would show.
    let bin = c.dir.path().join("bin");
    let bytes: Vec<u8> = (0..=255u8).collect();
    std::fs::write(&bin, &bytes).expect("write bin");
    c.ok(&[
        "create",
        "secret",
        "generic",
        "gen",
        "-n",
        "gen",
        "--from-literal=user=admin",
        &format!("--from-file=bin={}", bin.display()),
    ]);
    let data = &get_json(&c, "secret", "gen")["data"];
    assert_eq!(
        base64_decode(data["user"].as_str().expect("user")),
        b"admin"
    );
    assert_eq!(base64_decode(data["bin"].as_str().expect("bin")), bytes);

    c.ok(&[
        "create",
        "configmap",
        "gen",
        "-n",
        "gen",
        "--from-literal=greeting=hello world",
    ]);
    assert_eq!(
        get_json(&c, "configmap", "gen")["data"],
        serde_json::json!({"greeting": "hello world"})
    );

    c.ok(&[
        "create",
        "deployment",
        "web",
        "-n",
        "gen",
        "--image=registry.example/web:1",
        "--replicas=3",
        "--port=8080",
        "--",
        "web",
        "--listen=:8080",
    ]);
    let deploy = get_json(&c, "deployment", "web");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/web:1");
    assert_eq!(
        container["command"],
        serde_json::json!(["web", "--listen=:8080"])
    );
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert_eq!(
        deploy["spec"]["selector"]["matchLabels"],
        serde_json::json!({"app": "web"})
    );
    // A pointer field set to zero is kept, not defaulted.
    c.ok(&[
        "create",
        "deployment",
        "idle",
        "-n",
        "gen",
        "--image=registry.example/web:1",
        "--replicas=0",
    ]);
    assert_eq!(get_json(&c, "deployment", "idle")["spec"]["replicas"], 0);

    c.ok(&[
        "create",
        "service",
        "clusterip",
        "web",
        "-n",
        "gen",
        "--tcp=80:8080",
    ]);
    let svc = get_json(&c, "service", "web");
    assert_eq!(
        svc["spec"]["ports"],
        serde_json::json!([{"name": "80-8080", "port": 80, "protocol": "TCP", "targetPort": 8080}])
    );
    assert!(
        svc["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.")),
        "{svc}"
    );

    c.ok(&[
        "create",
        "ingress",
        "web",
        "-n",
        "gen",
        "--class=weir",
        "--rule=gen.example.com/api*=web:80,tls=gen-tls",
    ]);
    let spec = &get_json(&c, "ingress", "web")["spec"];
    assert_eq!(spec["ingressClassName"], "weir");
    assert_eq!(
        spec["rules"],
        serde_json::json!([{"host": "gen.example.com", "http": {"paths": [{
            "path": "/api",
            "pathType": "Prefix",
            "backend": {"service": {"name": "web", "port": {"number": 80}}},
        }]}}])
    );
    assert_eq!(
        spec["tls"],
        serde_json::json!([{"hosts": ["gen.example.com"], "secretName": "gen-tls"}])
    );

    // The same generated Deployment sent as JSON (`create -f` uses the dynamic client) is
    // stored with the same spec as the protobuf one: both paths admit the same object.
    let generate = |name: &'static str, extra: &[&'static str]| {
        let mut args = vec![
            "create",
            "deployment",
            name,
            "-n",
            "gen",
            "--image=registry.example/web:1",
            "--port=8080",
        ];
        args.extend_from_slice(extra);
        c.ok(&args)
    };
    let manifest = generate("as-json", &["--dry-run=client", "-o", "json"]);
    let file = c.dir.path().join("as-json.json");
    std::fs::write(&file, manifest).expect("write manifest");
    c.ok(&["create", "-f", file.to_str().expect("utf8")]);
    generate("as-protobuf", &[]);
    let (json, proto) = (
        get_json(&c, "deployment", "as-json"),
        get_json(&c, "deployment", "as-protobuf"),
    );
    let relabel = |v: &serde_json::Value| v.to_string().replace("as-json", "as-protobuf");
    assert_eq!(relabel(&json["spec"]), relabel(&proto["spec"]));
}

/// etcd on free loopback ports with a temporary data dir, killed when dropped.
struct Etcd {
    _proc: Proc,
    url: String,
    _dir: tempfile::TempDir,
}

/// Starts etcd and waits until its own log says it serves the client port. A port found
/// free here can be taken by another process before etcd binds it: etcd then exits, and
/// the start is tried again on fresh ports (a bare connect could reach the other process).
fn start_etcd() -> Etcd {
    let mut last_log = String::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let log_path = dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = Command::new("/usr/bin/etcd")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let mut proc = Proc(child);
        let serving = format!("serving insecure client requests on 127.0.0.1:{client},");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if last_log.contains(&serving) {
                return Etcd {
                    _proc: proc,
                    url,
                    _dir: dir,
                };
            }
            if proc.0.try_wait().expect("wait").is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "etcd did not start: {last_log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("etcd exited at start three times; last log: {last_log}");
}

#[test]
fn kubectl_against_weir_up_on_etcd() {
    let etcd = start_etcd();
    let mut c = Cluster::start(&["--etcd".to_string(), etcd.url.clone()]);
    newcomer_flow(&mut c);
    restart_keeps_state(&mut c);
}
