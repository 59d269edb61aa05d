//! End-to-end test of the built-in client: a real `weir server` on a temporary data dir and
//! a loopback port it picks itself (port 0; the kubeconfig it writes names it), driven by `weir apply|get|scale|describe|delete`, with the real
//! kubectl checking that both clients see each other's applies as `unchanged`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

/// A running `weir server`, killed (and its data dir removed) when dropped.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // Port 0: a port found free here and bound later by the server could be taken in
        // between by another test.
        let child = Command::new(WEIR)
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("weir server starts");
        let server = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if server.kubeconfig().exists() && server.weir(&["get", "ns"]).status.success() {
                return server;
            }
            assert!(Instant::now() < deadline, "weir server did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn weir(&self, args: &[&str]) -> Output {
        Command::new(WEIR)
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("RUST_LOG", "warn")
            .output()
            .expect("weir runs")
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .expect("kubectl runs")
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must succeed and returns its stdout.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      creationTimestamp: null
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - {containerPort: 80, name: http}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
"#;

const EXTRAS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg, namespace: shop}
data: {mode: blue}
---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: shop}
data: {password: aHVudGVyMg==}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: shop}
spec:
  rules:
  - host: shop.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write manifest");
    path
}

#[test]
fn apply_get_scale_describe_delete_against_a_real_server() {
    let server = Server::start();
    let manifests = tempfile::tempdir().expect("manifest dir");
    let app = write(manifests.path(), "a-app.yaml", APP);
    write(manifests.path(), "b-extras.yaml", EXTRAS);
    let dir = manifests.path().to_str().expect("utf-8 path");

    // A directory of multi-document files, applied in order.
    assert_eq!(
        ok(server.weir(&["apply", "-f", dir])),
        "namespace/shop created\ndeployment.apps/web created\nservice/web created\n\
         configmap/cfg created\nsecret/creds created\ningress.networking.k8s.io/web created\n"
    );
    assert_eq!(
        ok(server.weir(&["apply", "-f", dir])),
        "namespace/shop unchanged\ndeployment.apps/web unchanged\nservice/web unchanged\n\
         configmap/cfg unchanged\nsecret/creds unchanged\ningress.networking.k8s.io/web unchanged\n"
    );
    // kubectl reads weir's last-applied record as its own, and the other way round.
    let kubectl = ok(server.kubectl(&["apply", "-f", dir]));
    assert!(!kubectl.contains("configured"), "{kubectl}");
    write(
        manifests.path(),
        "a-app.yaml",
        &APP.replace("nginx:1.27", "nginx:1.28"),
    );
    let out = ok(server.weir(&["apply", "-f", app.to_str().expect("utf-8")]));
    assert_eq!(
        out,
        "namespace/shop unchanged\ndeployment.apps/web configured\nservice/web unchanged\n"
    );
    let kubectl = ok(server.kubectl(&["apply", "-f", dir]));
    assert!(!kubectl.contains("configured"), "{kubectl}");

    // Tables with kubectl's columns; -A adds NAMESPACE; -l filters on the server.
    let table = ok(server.weir(&["get", "deploy", "-n", "shop"]));
    assert!(
        table.starts_with("NAME   READY   UP-TO-DATE   AVAILABLE   AGE\nweb    "),
        "{table}"
    );
    let all = ok(server.weir(&["get", "svc", "-A", "-l", "app=web"]));
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 2, "{all}");
    assert!(lines[0].starts_with("NAMESPACE   NAME   TYPE"), "{all}");
    assert!(
        lines[1].starts_with("shop        web    ClusterIP   10."),
        "{all}"
    );
    let wide = ok(server.weir(&["get", "svc", "web", "-n", "shop", "-o", "wide"]));
    assert!(
        wide.lines().next().is_some_and(|h| h.ends_with("SELECTOR")),
        "{wide}"
    );

    let many = ok(server.weir(&["get", "deploy,svc", "-n", "shop"]));
    assert!(
        many.contains("\ndeployment.apps/web ") && many.contains("\nservice/web "),
        "{many}"
    );

    // scale goes through the scale subresource; -o json shows the stored object.
    assert_eq!(
        ok(server.weir(&["scale", "deployment/web", "--replicas", "4", "-n", "shop"])),
        "deployment.apps/web scaled\n"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(
        server.weir(&["get", "deploy", "web", "-n", "shop", "-o", "json"])
    ))
    .expect("json output");
    assert_eq!(json["spec"]["replicas"], 4);
    assert_eq!(
        json["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.28"
    );
    let yaml = ok(server.weir(&["get", "cm", "-n", "shop", "-o", "yaml"]));
    assert!(
        yaml.contains("kind: List") && yaml.contains("mode: blue"),
        "{yaml}"
    );

    let describe = ok(server.weir(&["describe", "deploy", "web", "-n", "shop"]));
    assert!(describe.starts_with("Name:"), "{describe}");
    assert!(describe.contains("4 desired"), "{describe}");
    assert!(
        describe
            .lines()
            .any(|l| l.trim_start().starts_with("Image:") && l.ends_with("nginx:1.28")),
        "{describe}"
    );

    // Bad input: a clear message naming the field, a non-zero exit, nothing stored.
    let bad = write(
        manifests.path(),
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec:\n  ports:\n  - {name: a, port: 0, targetPort: 80}\n",
    );
    let out = server.weir(&["apply", "-f", bad.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert_eq!(
        stderr(&out),
        "The Service \"bad\" is invalid: spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive\n"
    );
    let out = server.weir(&["get", "svc", "bad", "-n", "shop"]);
    assert_eq!(
        stderr(&out),
        "Error from server (NotFound): services \"bad\" not found\n"
    );
    let unknown = write(
        manifests.path(),
        "unknown.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: u, namespace: shop}\ndata: {a: b}\nextra: 1\n",
    );
    let out = server.weir(&["apply", "-f", unknown.to_str().expect("utf-8")]);
    assert!(
        stderr(&out).contains("strict decoding error: unknown field \"extra\""),
        "{}",
        stderr(&out)
    );
    let garbled = write(
        manifests.path(),
        "garbled.yaml",
        "kind: Service\nmetadata: {name: x\n",
    );
    let out = server.weir(&["apply", "-f", garbled.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("garbled.yaml") && stderr(&out).contains("line"),
        "{}",
        stderr(&out)
    );
    let out = server.weir(&["get", "widgets"]);
    assert_eq!(
        stderr(&out),
        "error: the server doesn't have a resource type \"widgets\"\n"
    );

    std::fs::remove_file(&bad).expect("remove");
    std::fs::remove_file(&unknown).expect("remove");
    std::fs::remove_file(&garbled).expect("remove");
    let deleted = ok(server.weir(&[
        "delete",
        "-f",
        app.to_str().expect("utf-8"),
        "--ignore-not-found",
    ]));
    assert!(
        deleted.starts_with("namespace \"shop\" deleted\n"),
        "{deleted}"
    );
    let out = server.weir(&["get", "deploy", "web", "-n", "shop"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("(NotFound)"), "{}", stderr(&out));
}
