//! API server throughput and watch latency on a real etcd, through HTTPS and kube-rs:
//! 10,000 Service creates from 16 concurrent clients (objects/s, p50/p99), then the delay
//! from a write to its event at each of 100 watchers (p50/p99). Writes the `api` section of
//! `docs/benchmarks.md`.
//!
//! `cargo run --release -p weir-bench --bin api_bench [-- --services N --clients C --watchers W]`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use tokio::sync::Mutex;
use weir_apiserver::{Config, Server, kubeconfig};
use weir_bench::{percentile, write_section};
use weir_store::{EtcdProcess, EtcdStore};

#[derive(Parser)]
struct Args {
    /// Services to create.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Concurrent creating clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Concurrent watchers.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Writes whose events the watchers time.
    #[arg(long, default_value_t = 200)]
    writes: usize,
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let etcd = EtcdProcess::start().await.context("starting etcd")?;
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .context("connecting to etcd")?;
    let dir = std::env::temp_dir().join(format!("weir-api-bench-{}", std::process::id()));
    let mut config = Config::new(dir.clone(), Arc::new(store));
    config.listen = "127.0.0.1:0".parse()?;
    let server = Server::bind(config).await?;
    let path = dir.join("kubeconfig");
    kubeconfig::write(
        &path,
        &kubeconfig::Entry {
            name: "bench",
            user: "admin",
            server: &server.url(),
            ca_pem: &server.pki().ca_pem,
            token: &server.pki().admin_token,
        },
    )?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    let client_config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = kube::Client::try_from(client_config)?;

    // The `default` namespace appears once the server has bootstrapped.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let ready = Instant::now();
    while cms.list(&Default::default()).await.is_err() {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(20),
            "server not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The machine is shared: record how busy it was, so the figures can be read in context.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());

    // Phase 1: creates.
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let per_client = args.services / args.clients;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let svcs = svcs.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("bench-{c}-{i}"), "labels": {"app": "bench"}},
                    "spec": {"selector": {"app": "bench"}, "ports": [{"port": 80, "targetPort": 8080}]},
                }))?;
                let t = Instant::now();
                svcs.create(&PostParams::default(), &svc).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut create_lat = Vec::new();
    for t in tasks {
        create_lat.extend(t.await??);
    }
    let elapsed = started.elapsed();
    let created = create_lat.len();
    let rate = created as f64 / elapsed.as_secs_f64();
    let c50 = percentile(&mut create_lat, 50.0).unwrap_or_default();
    let c99 = percentile(&mut create_lat, 99.0).unwrap_or_default();
    println!(
        "creates: {created} in {:.2}s = {rate:.0}/s, p50 {}, p99 {}",
        elapsed.as_secs_f64(),
        ms(c50),
        ms(c99)
    );

    // Phase 2: watch delivery.
    let rv = cms
        .list(&Default::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let cms = cms.clone();
        let rv = rv.clone();
        let sent = sent.clone();
        let writes = args.writes;
        watchers.push(tokio::spawn(async move {
            let mut stream = cms
                .watch(&WatchParams::default().labels("bench=watch"), &rv)
                .await?
                .boxed();
            let mut lat = Vec::with_capacity(writes);
            while lat.len() < writes {
                let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
                    .await
                    .context("no watch event within 30s")?
                    .context("watch ended")??;
                let arrived = Instant::now();
                if let WatchEvent::Added(cm) = event {
                    let name = cm.metadata.name.unwrap_or_default();
                    if let Some(t) = sent.lock().await.get(&name) {
                        lat.push(arrived - *t);
                    }
                }
            }
            anyhow::Ok(lat)
        }));
    }
    // Let every watch connect before the first write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..args.writes {
        let name = format!("watch-{i}");
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"bench": "watch"}},
            "data": {"i": i.to_string()},
        }))?;
        sent.lock().await.insert(name, Instant::now());
        cms.create(&PostParams::default(), &cm).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut watch_lat = Vec::new();
    for w in watchers {
        watch_lat.extend(w.await??);
    }
    let events = watch_lat.len();
    let w50 = percentile(&mut watch_lat, 50.0).unwrap_or_default();
    let w99 = percentile(&mut watch_lat, 99.0).unwrap_or_default();
    println!(
        "watch: {events} events at {} watchers, p50 {}, p99 {}",
        args.watchers,
        ms(w50),
        ms(w99)
    );

    let _ = stop.send(());
    let _ = serving.await;
    let _ = std::fs::remove_dir_all(&dir);
    drop(etcd);

    let md = format!(
        "## API server (etcd backend)\n\n\
         `cargo run --release -p weir-bench --bin api_bench`: weir's API server over HTTPS \
         (kube-rs clients, one TLS connection each) on a real etcd 3.4 started by the harness; \
         both on loopback on this 2-core machine.\n\n\
         | measurement | result | goal |\n|---|---|---|\n\
         | {created} Service creates, {clients} concurrent clients | {rate:.0} objects/s in {secs:.2} s | ≥ 2,000/s |\n\
         | create latency p50 / p99 | {c50} / {c99} | p99 ≤ 1 s (Kubernetes SLO) |\n\
         | watch delivery, write → event, {watchers} watchers × {writes} writes | p50 {w50} / p99 {w99} | p99 ≤ 10 ms |\n\n\
         Watch delay runs from just before the create request is sent to the event's arrival \
         at each watcher, so it includes the write itself. 1-minute load average when the \
         run started: {load} (other work shares the 2 cores).\n",
        clients = args.clients,
        secs = elapsed.as_secs_f64(),
        c50 = ms(c50),
        c99 = ms(c99),
        watchers = args.watchers,
        writes = args.writes,
        w50 = ms(w50),
        w99 = ms(w99),
    );
    write_section("api", &md)?;
    Ok(())
}
