//! The watch path against the real API server: `weir server` (the binary from this workspace's
//! target dir, temp data dir, own port) → kube-rs watch → snapshot → map diff. A Service and
//! EndpointSlice created, changed and deleted through the API show up in the pinned maps, and
//! a LoadBalancer Service with `externalTrafficPolicy: Local` gets its health check served
//! on 127.0.0.1. Needs root (BPF) and `cargo build -p weir` first.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;
use weir_lb::netlab::{TestBpfRoot, TestCgroup};
use weir_lb::{Algorithm, Args, CancellationToken, LbMaps, ListRow};

struct ApiServer(Child);

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn weir_binary() -> Result<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/weir");
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo build -p weir` first",
            p.display()
        );
    }
    Ok(p)
}

async fn start_api(dir: &std::path::Path) -> Result<(ApiServer, Client)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(weir_binary()?)
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .context("start weir server")?;
    let server = ApiServer(child);
    let kubeconfig = dir.join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kubeconfig.exists() {
        if Instant::now() > deadline {
            bail!("weir server wrote no kubeconfig in 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok((server, Client::try_from(config)?))
}

async fn wait_for(
    bpf: &std::path::Path,
    what: &str,
    ok: impl Fn(&[ListRow]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(rows) = LbMaps::open_pinned(bpf).and_then(|m| m.list())
            && ok(&rows)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("maps never showed {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Status and JSON body of `GET /` on 127.0.0.1:`port` (hyper's HTTP/1.1 client).
async fn health(port: u16) -> Result<(u16, serde_json::Value)> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", "node")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body)?))
}

/// Waits until the health check on `port` answers `status` with `local_endpoints`, or is
/// closed (`None`).
async fn wait_health(port: u16, want: Option<(u16, u64)>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = health(port).await.ok();
        let seen = got
            .as_ref()
            .map(|(s, b)| (*s, b["localEndpoints"].as_u64().unwrap_or(u64::MAX)));
        if seen == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("health check on {port}: want {want:?}, last saw {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lb_args(bpf: &TestBpfRoot, cg: &TestCgroup, node_name: Option<&str>) -> Args {
    Args {
        bpf_root: bpf.0.clone(),
        cgroup: Some(cg.path.clone()),
        node_name: node_name.map(str::to_string),
        node_ips: vec![Ipv4Addr::LOCALHOST],
        devices: vec!["none".into()],
        lb_algorithm: Algorithm::Random,
        maglev_table_size: weir_lb::maglev::DEFAULT_TABLE_SIZE,
        maglev_seed: weir_lb::maglev::DEFAULT_SEED,
        metrics_addr: None,
    }
}

fn slice(ips: &[&str]) -> Result<EndpointSlice> {
    let eps: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    Ok(serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_the_api_reach_the_maps() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_server, client) = start_api(dir.path()).await?;
    let cg = TestCgroup::new()?;
    let bpf = TestBpfRoot::new();
    let args = lb_args(&bpf, &cg, None);
    let shutdown = CancellationToken::new();
    let lb = tokio::spawn(weir_lb::run(args, client.clone(), shutdown.clone()));

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.7.7", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))?;
    services.create(&PostParams::default(), &svc).await?;
    slices
        .create(
            &PostParams::default(),
            &slice(&["10.244.0.11", "10.244.0.12"])?,
        )
        .await?;
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 7, 7), 80);
    let backends = |ips: &[[u8; 4]]| -> Vec<SocketAddrV4> {
        ips.iter()
            .map(|&ip| SocketAddrV4::new(ip.into(), 8080))
            .collect()
    };
    let two = backends(&[[10, 244, 0, 11], [10, 244, 0, 12]]);
    wait_for(&bpf.0, "the new Service with 2 backends", |rows| {
        rows.iter().any(|r| r.frontend == vip && r.backends == two)
    })
    .await?;

    let mut changed = slices.get("web-1").await?;
    changed.endpoints.truncate(1);
    slices
        .replace("web-1", &PostParams::default(), &changed)
        .await?;
    let one = backends(&[[10, 244, 0, 11]]);
    wait_for(&bpf.0, "the endpoint removal", |rows| {
        rows.iter().any(|r| r.frontend == vip && r.backends == one)
    })
    .await?;

    services.delete("web", &DeleteParams::default()).await?;
    wait_for(&bpf.0, "the Service gone", |rows| {
        !rows.iter().any(|r| r.frontend == vip)
    })
    .await?;

    shutdown.cancel();
    lb.await??;
    weir_lb::unpin_all(&bpf.0)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_load_balancer_service_gets_its_health_check_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_server, client) = start_api(dir.path()).await?;
    let cg = TestCgroup::new()?;
    let bpf = TestBpfRoot::new();
    let shutdown = CancellationToken::new();
    let lb = tokio::spawn(weir_lb::run(
        lb_args(&bpf, &cg, Some("n1")),
        client.clone(),
        shutdown.clone(),
    ));

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))?;
    let created = services.create(&PostParams::default(), &svc).await?;
    let port = created
        .spec
        .as_ref()
        .and_then(|s| s.health_check_node_port)
        .context("the API server allocated no healthCheckNodePort")?;
    let port = u16::try_from(port)?;
    wait_health(port, Some((503, 0))).await?;

    let mut local = slice(&["10.244.0.11"])?;
    local.endpoints[0].node_name = Some("n1".into());
    slices.create(&PostParams::default(), &local).await?;
    wait_health(port, Some((200, 1))).await?;

    let mut moved = slices.get("web-1").await?;
    moved.endpoints[0].node_name = Some("n2".into());
    slices
        .replace("web-1", &PostParams::default(), &moved)
        .await?;
    wait_health(port, Some((503, 0))).await?;

    // Cluster policy: the API server drops the port, the node stops serving it.
    let mut cluster = services.get("web").await?;
    if let Some(spec) = cluster.spec.as_mut() {
        spec.external_traffic_policy = Some("Cluster".into());
    }
    let cluster = services
        .replace("web", &PostParams::default(), &cluster)
        .await?;
    assert_eq!(cluster.spec.and_then(|s| s.health_check_node_port), None);
    wait_health(port, None).await?;

    shutdown.cancel();
    lb.await??;
    weir_lb::unpin_all(&bpf.0)?;
    Ok(())
}
