//! The watch path against the real API server: `weir server` (the binary from this workspace's
//! target dir, temp data dir, own port) → kube-rs watch → snapshot → map diff. A Service and
//! EndpointSlice created, changed and deleted through the API show up in the pinned maps.
//! Needs root (BPF) and `cargo build -p weir` first.

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
    let args = Args {
        bpf_root: bpf.0.clone(),
        cgroup: Some(cg.path.clone()),
        node_name: None,
        node_ips: Vec::new(),
        devices: vec!["none".into()],
        lb_algorithm: Algorithm::Random,
        maglev_table_size: weir_lb::maglev::DEFAULT_TABLE_SIZE,
        maglev_seed: weir_lb::maglev::DEFAULT_SEED,
        metrics_addr: None,
    };
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
