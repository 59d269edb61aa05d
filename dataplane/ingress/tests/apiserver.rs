//! The ingress fed by the real weir API server: `weir server` (the binary from the target
//! dir, temp data dir, free port, the kubeconfig it writes) stores a Service, an
//! EndpointSlice and an Ingress created through kube-rs; the proxy's watch picks them up
//! and serves them, and a change made through the API reaches the proxy without a restart.
//! The proxy publishes its address in the status of the Ingresses it serves, and takes it
//! out again when one stops being its own.
//!
//! Needs the `weir` binary: `cargo build -p weir` (or set WEIR_BIN).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use weir_ingress::fixtures::{backend, ingress, service, slice};
use weir_ingress::{Args, CancellationToken};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn weir_bin() -> PathBuf {
    std::env::var_os("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/weir")
        })
}

fn free_addr() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// A backend answering `pod=<name>` to everything.
async fn upstream(name: &'static str) -> SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        format!("pod={name}"),
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// GET with `host` until the body equals `want`, or fail after 15 s with the last answer.
async fn eventually(url: &str, host: &str, want: &str) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        let req = hyper::Request::get(url)
            .header("host", host)
            .body(Full::default())
            .expect("request");
        if let Ok(resp) = client.request(req).await {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            last = format!("{status} {}", String::from_utf8_lossy(&body));
            if status == 200 && body == want.as_bytes() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} (host {host}) never answered {want:?}; last answer: {last}");
}

/// Wait up to 15 s for the addresses in Ingress `name`'s `status.loadBalancer.ingress` to
/// be `want` (`None`: no list at all, as in `loadBalancer: {}`), and return the Ingress.
async fn status_becomes(api: &Api<Ingress>, name: &str, want: Option<&[&str]>) -> Ingress {
    let want = want.map(|w| w.iter().map(|ip| Some(ip.to_string())).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ing = api.get_status(name).await.expect("get ingress status");
        let ips = ing
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .map(|l| l.iter().map(|i| i.ip.clone()).collect::<Vec<_>>());
        if ips == want {
            return ing;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: status.loadBalancer.ingress never became {want:?}: {ips:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A status merge patch setting `status.loadBalancer.ingress` to `ips`.
fn lb_status(ips: &[&str]) -> Patch<serde_json::Value> {
    let ingress: Vec<_> = ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
    Patch::Merge(serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}}))
}

/// A merge patch setting `spec.ingressClassName` to `class`.
fn class(class: &str) -> Patch<serde_json::Value> {
    Patch::Merge(serde_json::json!({"spec": {"ingressClassName": class}}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_the_api_server_reach_the_proxy() {
    let bin = weir_bin();
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p weir` or set WEIR_BIN",
        bin.display()
    );
    let data = tempfile::tempdir().expect("tempdir");
    let api_addr = free_addr();
    let _server = Kill(
        Command::new(&bin)
            .arg("server")
            .arg("--data-dir")
            .arg(data.path())
            .arg("--listen")
            .arg(api_addr.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("start weir server"),
    );
    let kubeconfig = data.path().join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(kubeconfig.exists() && std::net::TcpStream::connect(api_addr).is_ok()) {
        assert!(
            Instant::now() < deadline,
            "weir server did not come up on {api_addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    let client = kube::Client::try_from(config).expect("kube client");

    let (a, b) = (upstream("a").await, upstream("b").await);
    let pp = PostParams::default();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), "default");
    for (name, addr) in [("svc-a", a), ("svc-b", b)] {
        services
            .create(&pp, &service("default", name, &[("http", 80, None)]))
            .await
            .expect("create service");
        let s = slice(
            "default",
            &format!("{name}-1"),
            name,
            ("http", addr.port().into()),
            &[("127.0.0.1", true)],
        );
        slices.create(&pp, &s).await.expect("create endpointslice");
    }
    let ing = ingress(
        "default",
        "hello",
        vec![("hello.example.com", "/", "Prefix", backend("svc-a", 80))],
    );
    ingresses.create(&pp, &ing).await.expect("create ingress");

    let http = free_addr();
    let cli = Cli::try_parse_from([
        "weir-ingress",
        &format!("--http-addr={http}"),
        &format!("--https-addr={}", free_addr()),
        &format!("--metrics-addr={}", free_addr()),
    ])
    .expect("flags");
    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(weir_ingress::run(
        cli.args,
        client.clone(),
        shutdown.clone(),
    ));

    let url = format!("http://{http}/");
    eventually(&url, "hello.example.com", "pod=a").await;

    // The proxy publishes its listen address (127.0.0.1 here) in the Ingress status.
    status_becomes(&ingresses, "hello", Some(&["127.0.0.1"])).await;

    // Point the Ingress at the other Service through the API.
    let patch = serde_json::json!({"spec": {"rules": [{"host": "hello.example.com", "http": {"paths": [
        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "svc-b", "port": {"number": 80}}}}
    ]}}]}});
    ingresses
        .patch("hello", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch ingress");
    eventually(&url, "hello.example.com", "pod=b").await;

    // Endpoints change too: svc-b's slice now lists a's port.
    let patch = serde_json::json!({"ports": [{"name": "http", "port": a.port()}]});
    slices
        .patch("svc-b-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch slice");
    eventually(&url, "hello.example.com", "pod=a").await;

    // Ingresses of another class: one shows only its controller's address and is never
    // touched; one also shows ours (written while it was ours) and loses only that entry.
    for name in ["theirs", "shared"] {
        let mut i = ingress(
            "default",
            name,
            vec![("other.example.com", "/", "Prefix", backend("svc-a", 80))],
        );
        i.spec
            .as_mut()
            .expect("fixture has a spec")
            .ingress_class_name = Some("nginx".into());
        ingresses.create(&pp, &i).await.expect("create ingress");
    }
    let theirs = ingresses
        .patch_status(
            "theirs",
            &PatchParams::default(),
            &lb_status(&["192.0.2.7"]),
        )
        .await
        .expect("patch status");
    ingresses
        .patch_status(
            "shared",
            &PatchParams::default(),
            &lb_status(&["192.0.2.7", "127.0.0.1"]),
        )
        .await
        .expect("patch status");
    status_becomes(&ingresses, "shared", Some(&["192.0.2.7"])).await;

    // An IngressClass with weir's controller makes an Ingress ours; deleting the class (its
    // controller is immutable) makes it not ours, and our address goes.
    let classes: Api<IngressClass> = Api::all(client.clone());
    let mine: IngressClass = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mine"},
        "spec": {"controller": "weir.io/ingress-controller"},
    }))
    .expect("IngressClass");
    classes
        .create(&pp, &mine)
        .await
        .expect("create ingressclass");
    ingresses
        .patch("hello", &PatchParams::default(), &class("mine"))
        .await
        .expect("patch ingress");
    eventually(&url, "hello.example.com", "pod=a").await;
    status_becomes(&ingresses, "hello", Some(&["127.0.0.1"])).await;
    classes
        .delete("mine", &DeleteParams::default())
        .await
        .expect("delete ingressclass");
    status_becomes(&ingresses, "hello", None).await;

    // Ours again: published again; then another class by name: cleared again.
    ingresses
        .patch("hello", &PatchParams::default(), &class("weir"))
        .await
        .expect("patch ingress");
    status_becomes(&ingresses, "hello", Some(&["127.0.0.1"])).await;
    ingresses
        .patch("hello", &PatchParams::default(), &class("nginx"))
        .await
        .expect("patch ingress");
    status_becomes(&ingresses, "hello", None).await;

    let now = ingresses.get_status("theirs").await.expect("get ingress");
    assert_eq!(
        now.metadata.resource_version, theirs.metadata.resource_version,
        "an Ingress without our address was written: {:?}",
        now.status
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), proxy)
        .await
        .expect("stopped")
        .expect("join")
        .expect("run");
}
