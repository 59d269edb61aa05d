//! East-west Service latency: kube-proxy's iptables layout vs weir's eBPF socket LB vs direct
//! pod-to-pod, at 100, 1,000 and 10,000 Services × 2 backends, all inside network namespaces
//! this harness creates (needs root). Backends are `weir echo` (TCP echo) in two pod
//! namespaces; the client is a third pod; the measured Service is the last one programmed.
//! EndpointSlice changes are timed through the real API server: `weir server` (this
//! workspace's release build) holds the same N Services, weir's watch and syncer follow it,
//! and the pinned map is polled for the new backend.
//! Writes the `lb` section of docs/benchmarks.md and docs/lb-bench.svg.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use weir_bench::{percentile, write_section};
use weir_lb::netlab::{Lab, Pod, TestBpfRoot, TestCgroup, in_netns, sysctl};
use weir_lb::plan::{backend_addr, service_key};
use weir_lb::{
    CancellationToken, LbMaps, MaglevConfig, ModelConfig, Syncer, load_and_attach, model,
};
use weir_lb_common::{Backend, BackendKey, PROTO_TCP, ServiceKey, ServiceValue};

#[derive(Parser)]
struct Args {
    /// Service counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    services: Vec<usize>,
    /// Samples per latency figure.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Endpoint changes timed per Service count.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Print the table but leave docs/ alone.
    #[arg(long)]
    no_write: bool,
}

const BACKEND_PORT: u16 = 8080;
/// Times "program all Services" is measured per count; the table shows the median.
const PROGRAM_ROUNDS: usize = 5;
const SERVICE_PORT: u16 = 80;

/// The i-th Service's ClusterIP: 10.96.0.0/12 from 10.96.1.0 up.
fn vip(i: usize) -> Ipv4Addr {
    let n = 256 + i as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Iptables,
    Weir,
    Direct,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Iptables => "(a) kube-proxy iptables",
            Mode::Weir => "(b) weir eBPF socket LB",
            Mode::Direct => "(c) direct pod-to-pod",
        }
    }
}

#[derive(Default, Clone)]
struct Row {
    connect: (Duration, Duration),
    rr: (Duration, Duration),
    conn_per_sec: f64,
    program: Option<Duration>,
    /// EndpointSlice PATCH sent → new backend in the pinned map, through the API server.
    change: Option<(Duration, Duration)>,
    /// The PATCH round trip alone (API write), same changes.
    patch: Option<(Duration, Duration)>,
    /// The syncer's share of it, in process: re-derive, diff, write.
    change_local: Option<(Duration, Duration)>,
}

fn p50_p99(mut v: Vec<Duration>) -> (Duration, Duration) {
    (
        percentile(&mut v, 50.0).unwrap_or_default(),
        percentile(&mut v, 99.0).unwrap_or_default(),
    )
}

/// Connect latency, request/response latency on one connection, and sequential
/// new-connection requests per second, from the client pod to `target`.
fn measure(client: &Pod, target: SocketAddr, samples: usize) -> Result<Row> {
    in_netns(&client.ns, move || -> std::io::Result<Row> {
        let msg = [b'x'; 64];
        let mut buf = [0u8; 64];
        let mut connects = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            let s = TcpStream::connect(target)?;
            connects.push(t.elapsed());
            drop(s);
        }
        let mut s = TcpStream::connect(target)?;
        s.set_nodelay(true)?;
        let mut rr = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            s.write_all(&msg)?;
            s.read_exact(&mut buf)?;
            rr.push(t.elapsed());
        }
        drop(s);
        let t = Instant::now();
        for _ in 0..samples {
            let mut s = TcpStream::connect(target)?;
            s.set_nodelay(true)?;
            s.write_all(&msg)?;
            s.read_exact(&mut buf)?;
        }
        let conn_per_sec = samples as f64 / t.elapsed().as_secs_f64();
        Ok(Row {
            connect: p50_p99(connects),
            rr: p50_p99(rr),
            conn_per_sec,
            ..Row::default()
        })
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    .context("client traffic")
}

/// kube-proxy's nat table for `n` Services with the given endpoints, in iptables-restore form:
/// KUBE-SERVICES → KUBE-SVC-* (statistic probabilities) → KUBE-SEP-* (DNAT), with
/// KUBE-MARK-MASQ / KUBE-POSTROUTING as kube-proxy writes them.
fn kube_proxy_rules(n: usize, endpoints: &[Ipv4Addr]) -> String {
    let chain = |kind: &str, key: &str| format!("KUBE-{kind}-{}", chain_hash(key));
    let mut heads = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for i in 0..n {
        let name = format!("default/svc-{i}:http");
        let svc = chain("SVC", &format!("{name}tcp"));
        let v = vip(i);
        heads.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {v}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}\n"
        ));
        for (k, ep) in endpoints.iter().enumerate() {
            let sep = chain("SEP", &format!("{name}tcp{ep}:{BACKEND_PORT}"));
            heads.push_str(&format!(":{sep} - [0:0]\n"));
            let left = endpoints.len() - k;
            let pick = if left > 1 {
                format!(
                    "-m statistic --mode random --probability {:.11} ",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            rules.push_str(&format!(
                "-A {svc} -m comment --comment \"{name} -> {ep}:{BACKEND_PORT}\" {pick}-j {sep}\n\
                 -A {sep} -s {ep}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}:{BACKEND_PORT}\n"
            ));
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n",
    );
    heads + &rules
}

/// 16 base32 characters of a 64-bit FNV hash: the shape of kube-proxy's chain suffixes.
fn chain_hash(key: &str) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| A[((h >> ((i * 4) % 60)) as usize + i) % 32] as char)
        .collect()
}

fn iptables_restore(ns: &str, rules: &str) -> Result<Duration> {
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-restore"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("iptables-restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed())
}

fn endpoints_json(endpoints: &[Ipv4Addr]) -> Vec<serde_json::Value> {
    endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect()
}

/// Services `svc-i` for i in `range` (ClusterIP `vip(i)`, port 80 → 8080), one EndpointSlice each.
fn objects(
    range: Range<usize>,
    endpoints: &[Ipv4Addr],
) -> Result<(Vec<Service>, Vec<EndpointSlice>)> {
    let mut svcs = Vec::with_capacity(range.len());
    let mut slices = Vec::with_capacity(range.len());
    let eps = endpoints_json(endpoints);
    for i in range {
        svcs.push(serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
            "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": BACKEND_PORT}]}
        }))?);
        slices.push(serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{i}-x"), "namespace": "default", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
            "endpoints": eps
        }))?);
    }
    Ok((svcs, slices))
}

/// `weir server` from this workspace's release build on a data dir of its own and a free
/// loopback port; killed and its data removed on drop.
struct ApiServer {
    child: Child,
    dir: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_api() -> Result<(ApiServer, kube::Client)> {
    let weir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/weir");
    if !weir.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p weir` first",
            weir.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("weir-lb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&weir)
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .context("start weir server")?;
    let server = ApiServer { child, dir };
    let kubeconfig = server.dir.join("kubeconfig");
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
    Ok((server, kube::Client::try_from(config)?))
}

/// Creates the objects through the API, 16 requests in flight.
async fn create(
    client: &kube::Client,
    svcs: Vec<Service>,
    slices: Vec<EndpointSlice>,
) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    futures::stream::iter(svcs)
        .map(|s| {
            let api = services.clone();
            async move { api.create(&PostParams::default(), &s).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .context("create Services")?;
    let eps: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    futures::stream::iter(slices)
        .map(|s| {
            let api = eps.clone();
            async move { api.create(&PostParams::default(), &s).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .context("create EndpointSlices")?;
    Ok(())
}

/// Read-only handles on the pinned service and backend maps: what the BPF programs see.
struct MapProbe {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, BackendKey, Backend>,
}

impl MapProbe {
    fn open(bpf_root: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = bpf_root.join("maps").join(name);
            let data =
                MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Self {
            services: open("WEIR_SERVICES")?.try_into()?,
            backends: open("WEIR_BACKENDS")?.try_into()?,
        })
    }

    /// The backends of TCP frontend `vip`, sorted.
    fn backends(&self, vip: SocketAddrV4) -> Vec<SocketAddrV4> {
        let key = service_key(&model::Frontend {
            addr: vip,
            proto: PROTO_TCP,
        });
        let Ok(v) = self.services.get(&key, 0) else {
            return Vec::new();
        };
        let mut out: Vec<SocketAddrV4> = (0..v.count as u32)
            .filter_map(|slot| {
                self.backends
                    .get(
                        &BackendKey {
                            service_id: v.id,
                            slot,
                        },
                        0,
                    )
                    .ok()
            })
            .map(|b| backend_addr(&b))
            .collect();
        out.sort();
        out
    }
}

/// EndpointSlice change → map through the API server: weir's watch and syncer follow
/// `client` into the maps pinned under `bpf_root`; each change is a merge PATCH swapping the
/// second endpoint of Service `n - 1`'s slice between `alt[0]` and `alt[1]`, timed from just
/// before the request is sent until the pinned map holds the new backend. Returns p50/p99 of
/// that and of the PATCH round trip alone.
fn api_changes(
    rt: &tokio::runtime::Runtime,
    client: &kube::Client,
    bpf_root: &Path,
    n: usize,
    changes: usize,
    first: Ipv4Addr,
    alt: [Ipv4Addr; 2],
) -> Result<((Duration, Duration), (Duration, Duration))> {
    let syncer = Syncer::new(LbMaps::open_pinned(bpf_root)?, MaglevConfig::default())?;
    let shutdown = CancellationToken::new();
    let watch = rt.spawn(weir_lb::watch::run(
        client.clone(),
        syncer,
        ModelConfig::default(),
        weir_lb::metrics::LbMetrics::new(),
        shutdown.clone(),
    ));
    let probe = MapProbe::open(bpf_root)?;
    let target = SocketAddrV4::new(vip(n - 1), SERVICE_PORT);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let name = format!("svc-{}-x", n - 1);
    let mut times = Vec::with_capacity(changes);
    let mut writes = Vec::with_capacity(changes);
    // Change 0 is not timed: it waits out the watch's initial list of all N Services.
    for k in 0..=changes {
        let ip = alt[k % 2];
        let mut want = vec![
            SocketAddrV4::new(first, BACKEND_PORT),
            SocketAddrV4::new(ip, BACKEND_PORT),
        ];
        want.sort();
        let patch = json!({"endpoints": endpoints_json(&[first, ip])});
        let (api, name) = (slices.clone(), name.clone());
        let t = Instant::now();
        let sent = rt.spawn(async move {
            let r = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await;
            (r, t.elapsed())
        });
        let deadline = t + Duration::from_secs(if k == 0 { 120 } else { 10 });
        while probe.backends(target) != want {
            if Instant::now() > deadline {
                bail!("change {k}: the map never showed {want:?}");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let took = t.elapsed();
        let (r, answered) = rt.block_on(sent)?;
        r.context("PATCH EndpointSlice")?;
        if k > 0 {
            times.push(took);
            writes.push(answered);
        }
    }
    shutdown.cancel();
    rt.block_on(watch)??;
    Ok((p50_p99(times), p50_p99(writes)))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let load_average = std::fs::read_to_string("/proc/loadavg")?
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string();
    let mut lab = Lab::new()?;
    let shutdown = CancellationToken::new();
    let mut backends = Vec::new();
    for n in 1..=3u8 {
        let pod = lab.add_pod(n)?;
        let token = shutdown.clone();
        let name = format!("pod{n}");
        in_netns(&pod.ns, move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let cfg = weir_echo::EchoConfig {
                http: None,
                tcp: Some(SocketAddr::from(([0, 0, 0, 0], BACKEND_PORT))),
                udp: None,
                name,
            };
            rt.block_on(weir_echo::serve(cfg, token))?;
            Ok(())
        })?;
        backends.push(pod);
    }
    let client = lab.add_pod(9)?;
    sysctl(&client.ns, "net.ipv4.tcp_tw_reuse", "1")?;
    sysctl(&client.ns, "net.ipv4.ip_local_port_range", "10000 65000")?;
    in_netns(&lab.host, || {
        weir_lb::install_unreachable_routes(&["10.96.0.0/12"])
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("route thread panicked"))??;
    std::thread::sleep(Duration::from_millis(200)); // echo listeners up
    let endpoints = [backends[0].ip, backends[1].ip];

    let mut cg = TestCgroup::new()?;
    let bpf = TestBpfRoot::new();
    let maps = load_and_attach(&bpf.0, &cg.path)?;
    let mut syncer = Syncer::new(maps, MaglevConfig::default())?;
    let cfg = ModelConfig::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (_api, api) = rt.block_on(start_api())?;
    // The API server holds Services 0..created; each count adds the ones it lacks.
    let mut created = 0;

    let mut results: Vec<(usize, Mode, Row)> = Vec::new();
    for &n in &args.services {
        let target = SocketAddr::from((vip(n - 1), SERVICE_PORT));
        // (c) the floor: straight to a backend, no Service, no hooks, no rules.
        let row = measure(
            &client,
            SocketAddr::from((backends[0].ip, BACKEND_PORT)),
            args.samples,
        )?;
        eprintln!("n={n} direct: connect p50 {:?}", row.connect.0);
        results.push((n, Mode::Direct, row));

        // (a) kube-proxy iptables: rules in the node namespace, bridged traffic through netfilter.
        let rules = kube_proxy_rules(n, &endpoints);
        lab.sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
        let program = iptables_restore(&lab.host, &rules)?;
        let mut row = measure(&client, target, args.samples)?;
        row.program = Some(program);
        iptables_restore(
            &lab.host,
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n",
        )?;
        lab.sysctl("net.bridge.bridge-nf-call-iptables", "0")?;
        eprintln!(
            "n={n} iptables: connect p50 {:?}, restore {program:?}",
            row.connect.0
        );
        results.push((n, Mode::Iptables, row));

        // (b) weir: program every Service from empty maps, then measure from inside the cgroup.
        let (svcs, mut slices) = objects(0..n, &endpoints)?;
        // The median of PROGRAM_ROUNDS from empty maps: one round on this shared machine is
        // easily doubled by a neighbour's burst.
        let mut rounds = Vec::with_capacity(PROGRAM_ROUNDS);
        for round in 0..PROGRAM_ROUNDS {
            if round > 0 {
                syncer.sync(&model::Desired::new())?;
            }
            let t = Instant::now();
            let (want, _) = model::desired(&svcs, &slices, &cfg);
            let t_desired = t.elapsed();
            // Where the time goes (stderr only): the plan alone, on the same empty mirror the
            // sync then plans from again, kept out of the figure.
            let tp = Instant::now();
            drop(weir_lb::plan::plan(
                syncer.state(),
                &want,
                MaglevConfig::default(),
            ));
            let t_plan = tp.elapsed();
            let ts = Instant::now();
            syncer.sync(&want)?;
            let t_sync = ts.elapsed();
            rounds.push(t_desired + t_sync);
            eprintln!(
                "n={n} program: desired state {t_desired:?}, sync {t_sync:?} (of which plan ~{t_plan:?})"
            );
        }
        let program = percentile(&mut rounds, 50.0).unwrap_or_default();
        cg.enter()?;
        let row = measure(&client, target, args.samples);
        cg.leave()?;
        let mut row = row?;
        row.program = Some(program);
        // EndpointSlice change → map, as the watch layer does it: re-derive the changed
        // Service's frontends from its objects, diff them against the map mirror, write.
        let mut changes = Vec::with_capacity(args.changes);
        let fronts: Vec<_> = model::desired(&svcs[n - 1..], &slices[n - 1..], &cfg)
            .0
            .into_keys()
            .collect();
        for k in 0..args.changes {
            let ip = if k % 2 == 0 {
                backends[2].ip
            } else {
                backends[1].ip
            };
            slices[n - 1].endpoints[1].addresses = vec![ip.to_string()];
            let t = Instant::now();
            let (want, _) = model::desired(&svcs[n - 1..], &slices[n - 1..], &cfg);
            let writes = syncer.sync_scoped(&want, &fronts)?;
            changes.push(t.elapsed());
            if writes != 1 {
                bail!("an endpoint swap must be one map write, was {writes}");
            }
        }
        row.change_local = Some(p50_p99(changes));
        if n > created {
            let t = Instant::now();
            let (svcs, slices) = objects(created..n, &endpoints)?;
            rt.block_on(create(&api, svcs, slices))?;
            eprintln!(
                "n={n}: created {} Services + slices through the API in {:?}",
                n - created,
                t.elapsed()
            );
            created = n;
        }
        // The watch takes over the maps; this syncer's mirror is read again afterwards.
        drop(syncer);
        let (change, patch) = api_changes(
            &rt,
            &api,
            &bpf.0,
            n,
            args.changes,
            backends[0].ip,
            [backends[2].ip, backends[1].ip],
        )?;
        row.change = Some(change);
        row.patch = Some(patch);
        syncer = Syncer::new(LbMaps::open_pinned(&bpf.0)?, MaglevConfig::default())?;
        eprintln!(
            "n={n} weir: connect p50 {:?}, program {program:?}, change → map {:?}",
            row.connect.0, row.change
        );
        results.push((n, Mode::Weir, row));
        syncer.sync(&model::Desired::new())?;
    }
    shutdown.cancel();
    drop(syncer);
    let _ = weir_lb::unpin_all(&bpf.0);

    let md = report(&results, &args, &load_average);
    println!("{md}");
    if !args.no_write {
        write_section("lb", &md)?;
        let svg = weir_bench::benchmarks_md().with_file_name("lb-bench.svg");
        std::fs::write(&svg, plot(&results))?;
    }
    Ok(())
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn report(results: &[(usize, Mode, Row)], args: &Args, load_average: &str) -> String {
    let mut md = String::from(
        "## Service load balancing (east-west)\n\n\
         Produced by `cargo run --release -p weir-bench --bin lb_bench` (root; everything runs in \
         network namespaces it creates). Client and `weir echo` backends are pods (netns + veth on a \
         bridge); each Service has 2 backends and the measured Service is the last of N. \
         (a) is kube-proxy's iptables nat layout loaded with `iptables-restore` (nft backend) with \
         `bridge-nf-call-iptables=1`; (b) is weir's cgroup connect4 rewrite; (c) connects to a backend pod IP directly.\n\n",
    );
    md.push_str(&format!(
        "{} samples per latency figure; req/s = sequential new connection + 64-byte request/response, one client. \
         \"program all\" is the median of {PROGRAM_ROUNDS} rounds. 1-minute load average when the run started: {} \
         (other work shares the 2 cores).\n\n",
        args.samples, load_average
    ));
    md.push_str("| Services | path | connect p50 (µs) | connect p99 (µs) | req/resp p50 (µs) | req/resp p99 (µs) | new-conn req/s | program all Services | EndpointSlice change → map p50 / p99 | PATCH round trip p50 / p99 | syncer in process p50 / p99 |\n");
    md.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (n, mode, r) in results {
        let program = r
            .program
            .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "—".into());
        let change = r
            .change
            .map(|(a, b)| {
                format!(
                    "{:.1} / {:.1} ms",
                    a.as_secs_f64() * 1e3,
                    b.as_secs_f64() * 1e3
                )
            })
            .unwrap_or_else(|| "—".into());
        let patch = r
            .patch
            .map(|(a, b)| {
                format!(
                    "{:.1} / {:.1} ms",
                    a.as_secs_f64() * 1e3,
                    b.as_secs_f64() * 1e3
                )
            })
            .unwrap_or_else(|| "—".into());
        let local = r
            .change_local
            .map(|(a, b)| format!("{} / {} µs", us(a), us(b)))
            .unwrap_or_else(|| "—".into());
        md.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} | {:.0} | {program} | {change} | {patch} | {local} |\n",
            mode.label(),
            us(r.connect.0),
            us(r.connect.1),
            us(r.rr.0),
            us(r.rr.1),
            r.conn_per_sec
        ));
    }
    md.push_str(&format!(
        "\nEndpointSlice change → map runs through the real API server: `weir server` (release build, \
         embedded store, HTTPS on loopback) holds the same N Services and slices, weir's watch \
         (kube-rs reflectors) and syncer follow it into the pinned maps, and {} JSON merge PATCHes \
         swap one of the two endpoints of the last Service's slice, one at a time. Each is timed from \
         just before the request is sent until a poll of the pinned BACKENDS map (every ~50 µs) sees \
         the new backend, so it includes the API write, watch delivery, the scoped sync and the map \
         write. The PATCH round trip is the same requests' time to their response (the API write \
         alone; the map may change before the response arrives). The in-process column is the syncer's share: re-derive the changed Service's \
         frontends, diff them against the map mirror, write (one map write). \
         \"program all\" is the whole snapshot → desired state → diff → map writes from empty maps.\n\n\
         ![connect latency against Service count](lb-bench.svg)\n",
        args.changes
    ));
    md
}

/// Connect p50 against Service count (log x), one line per path, as a small SVG.
fn plot(results: &[(usize, Mode, Row)]) -> String {
    let (w, h, l, r, t, b) = (640.0, 360.0, 70.0, 220.0, 30.0, 50.0);
    let ns: Vec<usize> = {
        let mut v: Vec<usize> = results.iter().map(|x| x.0).collect();
        v.dedup();
        v
    };
    let ymax = results
        .iter()
        .map(|x| x.2.connect.0.as_secs_f64() * 1e6)
        .fold(1.0, f64::max)
        * 1.15;
    let (lo, hi) = (
        (*ns.first().unwrap_or(&1) as f64).log10(),
        (*ns.last().unwrap_or(&10) as f64)
            .log10()
            .max((*ns.first().unwrap_or(&1) as f64).log10() + 1.0),
    );
    let x = |n: usize| l + ((n as f64).log10() - lo) / (hi - lo) * (w - l - r);
    let y = |v: f64| h - b - v / ymax * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{l}\" y=\"18\">TCP connect p50 to a ClusterIP (µs) vs number of Services</text>\n\
         <line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - b,
        w - r,
        h - b,
        h - b
    );
    for &n in &ns {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{n}</text>\n",
            x(n),
            h - b + 18.0
        ));
    }
    for k in 0..=4 {
        let v = ymax * k as f64 / 4.0;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>\n",
            l - 6.0,
            y(v) + 4.0
        ));
    }
    for (i, (mode, color)) in [
        (Mode::Iptables, "#d62728"),
        (Mode::Weir, "#1f77b4"),
        (Mode::Direct, "#2ca02c"),
    ]
    .into_iter()
    .enumerate()
    {
        let pts: Vec<String> = results
            .iter()
            .filter(|x| x.1 == mode)
            .map(|(n, _, r)| format!("{:.1},{:.1}", x(*n), y(r.connect.0.as_secs_f64() * 1e6)))
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        ));
        let ly = t + 20.0 + 20.0 * i as f64;
        s.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 35.0,
            ly + 4.0,
            mode.label()
        ));
    }
    s.push_str("</svg>\n");
    s
}
