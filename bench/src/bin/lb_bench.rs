//! East-west Service latency: kube-proxy's iptables layout vs weir's eBPF socket LB vs direct
//! pod-to-pod, at 100, 1,000 and 10,000 Services × 2 backends, all inside network namespaces
//! this harness creates (needs root). Backends are `weir echo` (TCP echo) in two pod
//! namespaces; the client is a third pod; the measured Service is the last one programmed.
//! Writes the `lb` section of docs/benchmarks.md and docs/lb-bench.svg.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use weir_bench::{percentile, write_section};
use weir_lb::netlab::{Lab, Pod, TestBpfRoot, TestCgroup, in_netns, sysctl};
use weir_lb::{CancellationToken, MaglevConfig, ModelConfig, Syncer, load_and_attach, model};

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
    change: Option<(Duration, Duration)>,
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

/// `n` Services `svc-i` (ClusterIP `vip(i)`, port 80 → 8080) and one EndpointSlice each.
fn objects(n: usize, endpoints: &[Ipv4Addr]) -> Result<(Vec<Service>, Vec<EndpointSlice>)> {
    let mut svcs = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    let eps: Vec<_> = endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    for i in 0..n {
        svcs.push(serde_json::from_value(json!({
            "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
            "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": BACKEND_PORT}]}
        }))?);
        slices.push(serde_json::from_value(json!({
            "metadata": {"name": format!("svc-{i}-x"), "namespace": "default", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
            "endpoints": eps
        }))?);
    }
    Ok((svcs, slices))
}

fn main() -> Result<()> {
    let args = Args::parse();
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
        let (svcs, mut slices) = objects(n, &endpoints)?;
        let t = Instant::now();
        let (want, _) = model::desired(&svcs, &slices, &cfg);
        syncer.sync(&want)?;
        let program = t.elapsed();
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
        row.change = Some(p50_p99(changes));
        eprintln!(
            "n={n} weir: connect p50 {:?}, program {program:?}",
            row.connect.0
        );
        results.push((n, Mode::Weir, row));
        syncer.sync(&model::Desired::new())?;
    }
    shutdown.cancel();
    drop(syncer);
    let _ = weir_lb::unpin_all(&bpf.0);

    let md = report(&results, &args);
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

fn report(results: &[(usize, Mode, Row)], args: &Args) -> String {
    let mut md = String::from(
        "## Service load balancing (east-west)\n\n\
         Produced by `cargo run --release -p weir-bench --bin lb_bench` (root; everything runs in \
         network namespaces it creates). Client and `weir echo` backends are pods (netns + veth on a \
         bridge); each Service has 2 backends and the measured Service is the last of N. \
         (a) is kube-proxy's iptables nat layout loaded with `iptables-restore` (nft backend) with \
         `bridge-nf-call-iptables=1`; (b) is weir's cgroup connect4 rewrite; (c) connects to a backend pod IP directly.\n\n",
    );
    md.push_str(&format!(
        "{} samples per latency figure; req/s = sequential new connection + 64-byte request/response, one client.\n\n",
        args.samples
    ));
    md.push_str("| Services | path | connect p50 (µs) | connect p99 (µs) | req/resp p50 (µs) | req/resp p99 (µs) | new-conn req/s | program all Services | EndpointSlice change → map p50 / p99 |\n");
    md.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (n, mode, r) in results {
        let program = r
            .program
            .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "—".into());
        let change = r
            .change
            .map(|(a, b)| format!("{} / {} µs", us(a), us(b)))
            .unwrap_or_else(|| "—".into());
        md.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} | {:.0} | {program} | {change} |\n",
            mode.label(),
            us(r.connect.0),
            us(r.connect.1),
            us(r.rr.0),
            us(r.rr.1),
            r.conn_per_sec
        ));
    }
    md.push_str(
        "\nThe EndpointSlice → map figure is measured in process on the path the watch layer takes \
         for one changed slice: re-derive that Service's frontends, diff them against the map \
         mirror, write (one map write). It does not include the API server's watch delivery. \
         \"program all\" is the whole snapshot → desired state → diff → map writes from empty maps.\n\n![connect latency against Service count](lb-bench.svg)\n",
    );
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
