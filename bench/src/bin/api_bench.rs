//! API server throughput and watch latency on a real etcd and on the embedded store,
//! through HTTPS and kube-rs:
//! 10,000 Service creates from 16 concurrent clients (objects/s, p50/p99), then the delay
//! from a write to its event at each of 100 watchers (p50/p99), beside the latency of those
//! writes alone and etcd's WAL fsync count and mean time in each phase (the disk is shared);
//! then, on a fresh store, sequential merge PATCHes of one EndpointSlice with N Services and
//! their slices stored, for each N of `--patch-sizes` (a single-object write must not cost
//! more as the store grows). Writes the `api` section of `docs/benchmarks.md`.
//!
//! `cargo run --release -p weir-bench --bin api_bench [-- --services N --clients C --watchers W]`
//!
//! `--kubeconfig K1,K2` runs only the PATCH phase, against the servers these kubeconfigs
//! name (`weir server`s being profiled, say; one per size of `--patch-sizes`), and prints
//! its figures without touching the docs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use tokio::sync::Mutex;
use weir_apiserver::{Config, Server, kubeconfig};
use weir_bench::{percentile, write_section};
use weir_store::{EmbeddedStore, EtcdProcess, EtcdStore, Store};

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
    /// Services (each with one EndpointSlice) stored before each round of PATCHes.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    patch_sizes: Vec<usize>,
    /// Sequential PATCHes timed at each size.
    #[arg(long, default_value_t = 500)]
    patches: usize,
    /// Run only the PATCH phase, against the servers of these kubeconfigs (one per size of
    /// `--patch-sizes`, in turns as in the full run).
    #[arg(long, value_delimiter = ',')]
    kubeconfig: Vec<std::path::PathBuf>,
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// etcd's WAL fsyncs so far: (count, total seconds), from its Prometheus metrics. Every write
/// waits for one, so on a shared disk they explain much of the write latency.
async fn wal_fsyncs(client_url: &str) -> anyhow::Result<(f64, f64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = client_url
        .strip_prefix("http://")
        .context("etcd client URL is not http://")?;
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    let metric = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .with_context(|| format!("{name} not in etcd's metrics"))
    };
    Ok((
        metric("etcd_disk_wal_fsync_duration_seconds_count ")?,
        metric("etcd_disk_wal_fsync_duration_seconds_sum ")?,
    ))
}

/// "N fsyncs, mean X ms" between two readings of [`wal_fsyncs`].
fn fsyncs_between(before: (f64, f64), after: (f64, f64)) -> String {
    let n = after.0 - before.0;
    let mean = if n > 0.0 {
        (after.1 - before.1) / n * 1000.0
    } else {
        0.0
    };
    format!("{n:.0} WAL fsyncs, mean {mean:.2} ms")
}

/// What one backend measured, formatted for the table.
struct Figures {
    creates: String,
    create_latency: String,
    watch: String,
    writes: String,
    /// etcd's WAL fsyncs during the creates and during the watched writes.
    fsyncs: Option<(String, String)>,
}

/// An in-process API server on a store, with an admin client; stopped by [`Served::stop`]
/// (or, when dropped on an error path, as soon as `stop` is dropped).
struct Served {
    client: kube::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<Result<(), weir_apiserver::ServeError>>,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start(store: Arc<dyn Store>, name: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("weir-api-bench-{name}-"))
            .tempdir()?;
        let mut config = Config::new(dir.path().to_path_buf(), store);
        config.listen = "127.0.0.1:0".parse()?;
        let server = Server::bind(config).await?;
        let path = dir.path().join("kubeconfig");
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
        let client = client_of(&path).await?;
        Ok(Self {
            client,
            stop,
            serving,
            _dir: dir,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.serving.await;
    }
}

/// A client of the server `path` names, once that server has created the `default`
/// namespace. It does not retry 503/504 answers as kube-rs does by default: a figure must
/// not hide a failed write (nor a retried create's AlreadyExists).
async fn client_of(path: &std::path::Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)?;
    let mut client_config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    client_config.default_retry = false;
    let client = kube::Client::try_from(client_config)?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ready = Instant::now();
    while namespaces.get("default").await.is_err() {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(20),
            "server not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(client)
}

/// PATCH round trips with `n` Services and their EndpointSlices stored: (n, p50, p99).
type PatchRow = (usize, Duration, Duration);

/// Endpoints of a slice: a fixed one and `10.244.0.<last>`.
fn endpoints(last: u8) -> serde_json::Value {
    json!([
        {"addresses": ["10.244.0.10"], "conditions": {"ready": true}},
        {"addresses": [format!("10.244.0.{last}")], "conditions": {"ready": true}},
    ])
}

/// Tops the `default` namespace up to `n` Services `svc-i`, each with one EndpointSlice
/// `svc-i-x`, 16 creates in flight.
async fn fill(client: &kube::Client, n: usize) -> anyhow::Result<()> {
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    // Already there from an earlier run against the same server (`--kubeconfig`): the
    // objects are the same by construction.
    let exists = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        r => r,
    };
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            async move {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("svc-{i}")},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
                }))?;
                exists(svcs.create(&PostParams::default(), &svc).await.map(drop))?;
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("svc-{i}-x"),
                                 "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": endpoints(11),
                }))?;
                exists(
                    slices
                        .create(&PostParams::default(), &slice)
                        .await
                        .map(drop),
                )?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .with_context(|| format!("storing {n} Services and EndpointSlices"))?;
    eprintln!(
        "  {n} Services + slices stored in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Times `patches` sequential JSON merge PATCHes on each target, a server holding `n`
/// Services filled by [`fill`]: each swaps an endpoint of the last slice, as the load
/// balancer benchmark's endpoint changes do. The targets take turns, one PATCH each, so a
/// burst of load on this shared machine falls on all of them alike.
async fn patch_rounds(
    targets: &[(usize, kube::Client)],
    patches: usize,
) -> anyhow::Result<Vec<PatchRow>> {
    let mut lat = vec![Vec::with_capacity(patches); targets.len()];
    // Round 0 is not timed: it warms each connection and the servers' code paths.
    for k in 0..=patches {
        for ((n, client), lat) in targets.iter().zip(&mut lat) {
            let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
            let name = format!("svc-{}-x", n - 1);
            let patch = json!({"endpoints": endpoints(12 + (k % 2) as u8)});
            let t = Instant::now();
            slices
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .with_context(|| format!("PATCH {name}"))?;
            if k > 0 {
                lat.push(t.elapsed());
            }
        }
    }
    let mut rows = Vec::new();
    for ((n, _), lat) in targets.iter().zip(&mut lat) {
        let p50 = percentile(lat, 50.0).unwrap_or_default();
        let p99 = percentile(lat, 99.0).unwrap_or_default();
        println!("  {n} Services: PATCH p50 {}, p99 {}", ms(p50), ms(p99));
        rows.push((*n, p50, p99));
    }
    Ok(rows)
}

/// Creates and watch delivery against an API server on `store`; `etcd_url` to read etcd's
/// fsync metrics.
async fn run(
    args: &Args,
    store: Arc<dyn Store>,
    etcd_url: Option<&str>,
    name: &str,
) -> anyhow::Result<Figures> {
    let fsyncs = async || match etcd_url {
        Some(url) => wal_fsyncs(url).await.map(Some),
        None => Ok(None),
    };
    let served = Served::start(store, name).await?;
    let client = served.client.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    // Phase 1: creates.
    let fsyncs_start = fsyncs().await?;
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
    let fsyncs_creates = fsyncs().await?;
    let created = create_lat.len();
    let rate = created as f64 / elapsed.as_secs_f64();
    let c50 = percentile(&mut create_lat, 50.0).unwrap_or_default();
    let c99 = percentile(&mut create_lat, 99.0).unwrap_or_default();
    println!(
        "{name}: creates: {created} in {:.2}s = {rate:.0}/s, p50 {}, p99 {}",
        elapsed.as_secs_f64(),
        ms(c50),
        ms(c99)
    );

    // Phase 2: watch delivery.
    let fsyncs_watch_start = fsyncs().await?;
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
    let mut write_lat = Vec::with_capacity(args.writes);
    for i in 0..args.writes {
        let name = format!("watch-{i}");
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"bench": "watch"}},
            "data": {"i": i.to_string()},
        }))?;
        let t = Instant::now();
        sent.lock().await.insert(name, t);
        cms.create(&PostParams::default(), &cm).await?;
        write_lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut watch_lat = Vec::new();
    for w in watchers {
        watch_lat.extend(w.await??);
    }
    let fsyncs_watch = fsyncs().await?;
    let events = watch_lat.len();
    let w50 = percentile(&mut watch_lat, 50.0).unwrap_or_default();
    let w99 = percentile(&mut watch_lat, 99.0).unwrap_or_default();
    let wr50 = percentile(&mut write_lat, 50.0).unwrap_or_default();
    let wr99 = percentile(&mut write_lat, 99.0).unwrap_or_default();
    let fsyncs = match (
        fsyncs_start,
        fsyncs_creates,
        fsyncs_watch_start,
        fsyncs_watch,
    ) {
        (Some(a), Some(b), Some(c), Some(d)) => Some((fsyncs_between(a, b), fsyncs_between(c, d))),
        _ => None,
    };
    println!(
        "{name}: watch: {events} events at {} watchers, p50 {}, p99 {}; the writes alone: p50 {}, p99 {}",
        args.watchers,
        ms(w50),
        ms(w99),
        ms(wr50),
        ms(wr99)
    );
    if let Some((creates, watch)) = &fsyncs {
        println!("{name}: during creates: {creates}; during watched writes: {watch}");
    }

    served.stop().await;
    Ok(Figures {
        creates: format!("{rate:.0} objects/s in {:.2} s", elapsed.as_secs_f64()),
        create_latency: format!("{} / {}", ms(c50), ms(c99)),
        watch: format!("p50 {} / p99 {}", ms(w50), ms(w99)),
        writes: format!("p50 {} / p99 {}", ms(wr50), ms(wr99)),
        fsyncs,
    })
}

/// The share of the last minute in which some task waited for I/O (PSI), e.g. "12.3%":
/// on this shared disk it sets the tail of every fsync-bound write.
fn io_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/io")
        .ok()
        .and_then(|p| {
            let some = p.lines().find(|l| l.starts_with("some "))?;
            let avg = some
                .split_whitespace()
                .find_map(|f| f.strip_prefix("avg60="))?;
            Some(format!("{avg}%"))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The PATCH phase on one backend: an in-process API server on each of `stores` (fresh,
/// one per size of `--patch-sizes`), filled, then PATCHed in turns.
async fn patch_run(
    args: &Args,
    name: &str,
    stores: Vec<Arc<dyn Store>>,
) -> anyhow::Result<Vec<PatchRow>> {
    println!("{name}: PATCH of one EndpointSlice");
    let mut servers = Vec::new();
    let rows = async {
        for (&n, store) in args.patch_sizes.iter().zip(stores) {
            let served = Served::start(store, &format!("{name}-{n}")).await?;
            let client = served.client.clone();
            servers.push(served);
            fill(&client, n).await?;
        }
        let targets: Vec<_> = args
            .patch_sizes
            .iter()
            .zip(&servers)
            .map(|(n, s)| (*n, s.client.clone()))
            .collect();
        patch_rounds(&targets, args.patches).await
    }
    .await;
    for served in servers {
        served.stop().await;
    }
    rows
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The machine is shared: record how busy it was, so the figures can be read in context.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());

    let io_start = io_pressure();
    anyhow::ensure!(
        args.patch_sizes.windows(2).all(|w| w[0] < w[1]) && args.patch_sizes.first() > Some(&0),
        "--patch-sizes must be positive and ascending"
    );
    if !args.kubeconfig.is_empty() {
        anyhow::ensure!(
            args.kubeconfig.len() == args.patch_sizes.len(),
            "--kubeconfig needs one server per size of --patch-sizes"
        );
        let mut targets = Vec::new();
        for (&n, path) in args.patch_sizes.iter().zip(&args.kubeconfig) {
            let client = client_of(path).await?;
            fill(&client, n).await?;
            targets.push((n, client));
        }
        patch_rounds(&targets, args.patches).await?;
        return Ok(());
    }

    let etcd = EtcdProcess::start().await.context("starting etcd")?;
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .context("connecting to etcd")?;
    let on_etcd = run(&args, Arc::new(store), Some(&etcd.client_url()), "etcd").await?;
    drop(etcd);
    // The PATCH phase gets fresh stores, so N is exactly what each holds.
    let mut etcds = Vec::new();
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    for _ in &args.patch_sizes {
        let etcd = EtcdProcess::start().await.context("starting etcd")?;
        let store = EtcdStore::connect(&[etcd.client_url()])
            .await
            .context("connecting to etcd")?;
        stores.push(Arc::new(store));
        etcds.push(etcd);
    }
    let etcd_patches = patch_run(&args, "etcd", stores).await?;
    drop(etcds);

    let store_dir = tempfile::Builder::new()
        .prefix("weir-api-bench-store-")
        .tempdir()?;
    let on_embedded = async {
        let embedded = EmbeddedStore::open(store_dir.path().join("store.redb"))?;
        let figures = run(&args, Arc::new(embedded), None, "embedded").await?;
        let mut stores: Vec<Arc<dyn Store>> = Vec::new();
        for n in &args.patch_sizes {
            let path = store_dir.path().join(format!("patch-{n}.redb"));
            stores.push(Arc::new(EmbeddedStore::open(path)?));
        }
        let patches = patch_run(&args, "embedded", stores).await?;
        anyhow::Ok((figures, patches))
    }
    .await;
    drop(store_dir);
    let (on_embedded, embedded_patches) = on_embedded?;
    let mut patch_table = String::from(
        "| Services + EndpointSlices stored | etcd PATCH p50 / p99 | embedded PATCH p50 / p99 |\n\
         |---:|---|---|\n",
    );
    for ((n, e50, e99), (_, m50, m99)) in etcd_patches.iter().zip(&embedded_patches) {
        patch_table.push_str(&format!(
            "| {n} | {} / {} | {} / {} |\n",
            ms(*e50),
            ms(*e99),
            ms(*m50),
            ms(*m99)
        ));
    }

    let io_end = io_pressure();
    let (fsyncs_creates, fsyncs_watch) = on_etcd.fsyncs.clone().unwrap_or_default();
    let md = format!(
        "## API server\n\n\
         `cargo run --release -p weir-bench --bin api_bench`: weir's API server over HTTPS \
         (kube-rs clients, one TLS connection each), on a real etcd 3.4 started by the harness \
         and on the embedded redb store; all on loopback on this 2-core machine. Watches are \
         served by the API server's watch cache (one store watch per resource type, fanned \
         out in memory); a Service create is one store transaction (object and cluster IP \
         together).\n\n\
         | measurement | etcd | embedded (redb) | goal |\n|---|---|---|---|\n\
         | {services} Service creates, {clients} concurrent clients | {ec} | {mc} | ≥ 2,000/s |\n\
         | create latency p50 / p99 | {ecl} | {mcl} | p99 ≤ 1 s (Kubernetes SLO) |\n\
         | watch delivery, write → event, {watchers} watchers × {writes} writes | {ew} | {mw} | p99 ≤ 10 ms |\n\
         | the same writes alone, request → response | {ewr} | {mwr} | |\n\n\
         Watch delay runs from just before the create request is sent to the event's arrival \
         at each watcher, so it includes the write itself (next row), which waits for the \
         store's fsync. etcd during the creates: {fsyncs_creates}; during the watched writes: \
         {fsyncs_watch}. 1-minute load average when the run started: {load}; share of the \
         last minute in which some task waited for the disk (Linux I/O pressure, \
         `/proc/pressure/io` some avg60): {io_start} at the start, {io_end} at the end (other \
         work shares the 2 cores and the disk).\n\n\
         A single-object write must cost the same however many objects are stored: for each N \
         the harness runs an API server (alone, without `weir server`'s controllers) on a \
         fresh store holding N Services, each with an EndpointSlice, then times {patches} \
         sequential JSON merge PATCHes (request → response) that swap one endpoint of the \
         last slice, as the load balancer benchmark's endpoint changes do. The servers of \
         all sizes take turns, one PATCH each, so a burst of load on the machine falls on \
         every size alike.\n\n\
         {patch_table}",
        services = args.clients * (args.services / args.clients),
        clients = args.clients,
        watchers = args.watchers,
        writes = args.writes,
        ec = on_etcd.creates,
        mc = on_embedded.creates,
        ecl = on_etcd.create_latency,
        mcl = on_embedded.create_latency,
        ew = on_etcd.watch,
        mw = on_embedded.watch,
        ewr = on_etcd.writes,
        mwr = on_embedded.writes,
        patches = args.patches,
    );
    write_section("api", &md)?;
    Ok(())
}
