//! dns_bench: weir's cluster DNS side by side with Knot DNS serving the same records as a
//! static zone. 10,000 ClusterIP Services (one named port each) in 50 namespaces; dnsperf
//! over loopback UDP with a mix of 70% A of existing Services, 10% SRV, 10% PTR and 10%
//! names that do not exist. Measures queries/s at saturation, p99 latency at a fixed offered
//! load (dnsperf -v per-query latencies), and resident memory after loading. Then, against a
//! real `weir server`, the time from a Service create/delete through the API to the DNS answer
//! that shows it. Writes the `dns` section of `docs/benchmarks.md`.
//!
//! Run: `cargo run --release -p weir-bench --bin dns_bench [-- --seconds 10]`.
//! weir runs as a child process of this binary (so its memory is its own), Knot as `knotd`
//! with a config and zone files in a scratch directory; both listen on 127.0.0.1 only.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weir_bench::ChildGuard;
use weir_dns::CancellationToken;

#[derive(Parser)]
struct Cli {
    /// Services to create.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Namespaces they are spread over.
    #[arg(long, default_value_t = 50)]
    namespaces: usize,
    /// Seconds of each saturation run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Offered load (queries/s) of the latency runs.
    #[arg(long, default_value_t = 20_000)]
    latency_qps: u64,
    /// Services created and deleted through the API server to time change-to-answer.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// The weir binary whose `weir server` the freshness part talks to (default: WEIR_BIN,
    /// then target/release/weir, then target/debug/weir).
    #[arg(long)]
    weir_bin: Option<PathBuf>,
    /// Print the table without writing docs/benchmarks.md.
    #[arg(long)]
    no_write: bool,
    /// Internal: serve weir DNS with the generated Services on this port and never return.
    #[arg(long, hide = true)]
    serve: Option<u16>,
}

/// The generated cluster: Service i is `svc-i` in `ns-(i % namespaces)`, ClusterIP
/// 10.96.(1 + i / 250).(1 + i % 250), port `http` 80/TCP.
struct Cluster {
    services: usize,
    namespaces: usize,
}

impl Cluster {
    fn name(&self, i: usize) -> (String, String) {
        (format!("svc-{i}"), format!("ns-{}", i % self.namespaces))
    }

    fn ip(&self, i: usize) -> [u8; 4] {
        [10, 96, (1 + i / 250) as u8, (1 + i % 250) as u8]
    }

    fn service(&self, i: usize) -> Service {
        let (name, ns) = self.name(i);
        let ip = self.ip(i);
        let ip = format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]);
        Service {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(ns),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.clone()),
                cluster_ips: Some(vec![ip]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Zone files for Knot: cluster.local and the reverse zone 96.10.in-addr.arpa.
    fn knot_zones(&self, dir: &Path) -> Result<()> {
        let mut fwd = String::from(
            "$ORIGIN cluster.local.\n$TTL 5\n\
             @ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n\
             @ IN NS ns.dns.cluster.local.\nns.dns IN A 10.96.0.10\n\
             dns-version IN TXT \"1.1.0\"\n",
        );
        let mut rev = String::from(
            "$ORIGIN 96.10.in-addr.arpa.\n$TTL 5\n\
             @ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n\
             @ IN NS ns.dns.cluster.local.\n",
        );
        for i in 0..self.services {
            let (name, ns) = self.name(i);
            let ip = self.ip(i);
            let host = format!("{name}.{ns}.svc");
            writeln!(fwd, "{host} IN A {}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])?;
            writeln!(
                fwd,
                "_http._tcp.{host} IN SRV 0 100 80 {host}.cluster.local."
            )?;
            writeln!(rev, "{}.{} IN PTR {host}.cluster.local.", ip[3], ip[2])?;
        }
        std::fs::write(dir.join("cluster.local.zone"), fwd)?;
        std::fs::write(dir.join("96.10.in-addr.arpa.zone"), rev)?;
        Ok(())
    }

    /// dnsperf input: 70% A, 10% SRV, 10% PTR, 10% NXDOMAIN, in a fixed pseudo-random order.
    fn queries(&self, path: &Path, n: usize) -> Result<()> {
        let mut out = String::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..n {
            // xorshift64: a fixed, dependency-free sequence so every run asks the same.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x >> 8) as usize % self.services;
            let (name, ns) = self.name(i);
            let ip = self.ip(i);
            match x % 10 {
                0 => writeln!(out, "_http._tcp.{name}.{ns}.svc.cluster.local SRV")?,
                1 => writeln!(out, "{}.{}.96.10.in-addr.arpa PTR", ip[3], ip[2])?,
                2 => writeln!(out, "missing-{i}.{ns}.svc.cluster.local A")?,
                _ => writeln!(out, "{name}.{ns}.svc.cluster.local A")?,
            }
        }
        std::fs::write(path, out)?;
        Ok(())
    }
}

fn free_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A hand-built A query (the harness needs no DNS library to probe readiness).
fn probe_query(name: &str) -> Result<Vec<u8>> {
    let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend(weir_dns::wire::name_to_wire(name)?);
    q.extend([0, 1, 0, 1]);
    Ok(q)
}

/// Wait until `port` answers `name` with NOERROR and at least one record.
fn wait_ready(port: u16, name: &str, within: Duration) -> Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let q = probe_query(name)?;
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&q, ("127.0.0.1", port))?;
        if let Ok(n) = sock.recv(&mut buf)
            && n >= 12
            && buf[3] & 0x0f == 0
            && u16::from_be_bytes([buf[6], buf[7]]) > 0
        {
            return Ok(());
        }
    }
    bail!("DNS server on port {port} did not answer {name} within {within:?}")
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS missing from /proc/<pid>/status")
}

struct Perf {
    qps: f64,
    lost: String,
    avg_us: f64,
}

fn dnsperf(port: u16, queries: &Path, seconds: u64) -> Result<Perf> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args([
            "-l",
            &seconds.to_string(),
            "-c",
            "8",
            "-q",
            "500",
            "-T",
            "1",
        ])
        .output()
        .context("running dnsperf (apt package dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("dnsperf output lacks {label:?}:\n{text}"))
    };
    let qps = field("Queries per second:")?.parse()?;
    let lost = field("Queries lost:")?;
    let avg = field("Average Latency (s):")?;
    let avg_us = avg
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .context("average latency")?
        * 1e6;
    Ok(Perf { qps, lost, avg_us })
}

/// p50 and p99 latency at a fixed offered load, from dnsperf's per-query report.
fn latency(port: u16, queries: &Path, qps: u64) -> Result<(Duration, Duration)> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args(["-l", "5", "-c", "8", "-q", "500", "-T", "1", "-v"])
        .args(["-Q", &qps.to_string()])
        .output()
        .context("running dnsperf -v")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut samples: Vec<Duration> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .collect();
    if samples.len() < 1000 {
        bail!("dnsperf -v reported only {} latencies", samples.len());
    }
    let p50 = weir_bench::percentile(&mut samples, 50.0).context("samples")?;
    let p99 = weir_bench::percentile(&mut samples, 99.0).context("samples")?;
    Ok((p50, p99))
}

fn start_knot(dir: &Path, cluster: &Cluster) -> Result<(ChildGuard, u16)> {
    cluster.knot_zones(dir)?;
    let port = free_port()?;
    let conf = format!(
        "server:\n    listen: 127.0.0.1@{port}\n    rundir: {d}\n    udp-workers: 2\n    \
         tcp-workers: 1\n    background-workers: 1\n\
         database:\n    storage: {d}\n\
         template:\n  - id: default\n    storage: {d}\n    file: \"%s.zone\"\n    \
         zonefile-sync: -1\n    journal-content: none\n\
         zone:\n  - domain: cluster.local\n  - domain: 96.10.in-addr.arpa\n\
         log:\n  - target: stderr\n    any: error\n",
        d = dir.display()
    );
    let conf_path = dir.join("knot.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new("knotd")
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .spawn()
        .context("starting knotd (apt package knot)")?;
    Ok((ChildGuard(child), port))
}

fn start_weir(cluster: &Cluster) -> Result<(ChildGuard, u16)> {
    let port = free_port()?;
    let child = Command::new(std::env::current_exe()?)
        .args(["--serve", &port.to_string()])
        .args(["--services", &cluster.services.to_string()])
        .args(["--namespaces", &cluster.namespaces.to_string()])
        .stdin(Stdio::piped())
        .spawn()
        .context("starting the weir DNS child")?;
    Ok((ChildGuard(child), port))
}

/// The child side: weir DNS with the generated Services loaded, until stdin closes.
fn serve(port: u16, cluster: &Cluster) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let args = weir_dns::Args {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            zone: "cluster.local".into(),
            ttl: 5,
            upstreams: Vec::new(),
            resolv_conf: "/dev/null".into(),
            forward_timeout_ms: 2000,
            cache_size: 10_000,
            udp_workers: 2,
            no_autopath: false,
            metrics: None,
        };
        let mut dns = weir_dns::build(&args)?;
        for i in 0..cluster.services {
            dns.zone.apply_service(&cluster.service(i));
        }
        dns.zone.publish();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        // The parent closes our stdin (or dies): stop then.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            shutdown.cancel();
        });
        dns.server.serve(dns.bound, token).await;
        Ok(())
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let cluster = Cluster {
        services: cli.services,
        namespaces: cli.namespaces,
    };
    if let Some(port) = cli.serve {
        return serve(port, &cluster);
    }
    let dir = tempfile::Builder::new()
        .prefix("weir-dns-bench-")
        .tempdir()?;
    let queries = dir.path().join("queries.txt");
    cluster.queries(&queries, 100_000)?;
    let probe = "svc-0.ns-0.svc.cluster.local";

    let loaded = Instant::now();
    let (weir, weir_port) = start_weir(&cluster)?;
    wait_ready(weir_port, probe, Duration::from_secs(60))?;
    let weir_load = loaded.elapsed();
    let weir_rss = rss_kib(weir.0.id())?;
    let loaded = Instant::now();
    let (knot, knot_port) = start_knot(dir.path(), &cluster)?;
    wait_ready(knot_port, probe, Duration::from_secs(60))?;
    let knot_load = loaded.elapsed();
    let knot_rss = rss_kib(knot.0.id())?;
    eprintln!("weir on :{weir_port} ({weir_rss} KiB), knot on :{knot_port} ({knot_rss} KiB)");

    // Warm up both, then measure them alternately, twice, and keep each one's better run.
    dnsperf(weir_port, &queries, 2)?;
    dnsperf(knot_port, &queries, 2)?;
    let mut best: [Option<Perf>; 2] = [None, None];
    for _ in 0..2 {
        for (slot, port) in [(0, weir_port), (1, knot_port)] {
            let p = dnsperf(port, &queries, cli.seconds)?;
            eprintln!("port {port}: {:.0} q/s, lost {}", p.qps, p.lost);
            if best[slot].as_ref().is_none_or(|b| p.qps > b.qps) {
                best[slot] = Some(p);
            }
        }
    }
    let [Some(w), Some(k)] = best else {
        bail!("no dnsperf results");
    };
    let (w50, w99) = latency(weir_port, &queries, cli.latency_qps)?;
    let (k50, k99) = latency(knot_port, &queries, cli.latency_qps)?;
    let weir_rss_after = rss_kib(weir.0.id())?;
    drop(knot);
    drop(weir);
    let fresh = match weir_bin(cli.weir_bin.clone()) {
        Some(bin) => Some((freshness(&bin, dir.path(), cli.changes)?, bin)),
        None => None,
    };

    let mut md = String::new();
    writeln!(md, "## Cluster DNS: weir vs Knot DNS\n")?;
    writeln!(
        md,
        "{} ClusterIP Services (one named port each) in {} namespaces. dnsperf 2.10 over loopback \
         UDP, `-c 8 -q 500 -T 1`, {} s per run, best of two alternating runs each; query mix 70% A \
         of existing Services, 10% SRV, 10% PTR, 10% non-existent names (NXDOMAIN). Knot DNS {} \
         serves the same records as static zones (cluster.local and 96.10.in-addr.arpa) with 2 UDP \
         workers; weir serves them from its watch-fed snapshot with 2 UDP workers. Latency: dnsperf \
         `-v` per-query times at a fixed {} queries/s. Resident memory: VmRSS after loading (weir: \
         after the load and again after all runs).\n",
        cli.services,
        cli.namespaces,
        cli.seconds,
        knot_version(),
        cli.latency_qps
    )?;
    writeln!(
        md,
        "| server | queries/s | lost | avg latency (saturated) | p50 @ {q} q/s | p99 @ {q} q/s | RSS after load | ready after start |",
        q = cli.latency_qps
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    writeln!(
        md,
        "| weir | {:.0} | {} | {:.0} µs | {} µs | {} µs | {:.1} MiB ({:.1} MiB after runs) | {} ms |",
        w.qps,
        w.lost,
        w.avg_us,
        w50.as_micros(),
        w99.as_micros(),
        weir_rss as f64 / 1024.0,
        weir_rss_after as f64 / 1024.0,
        weir_load.as_millis()
    )?;
    writeln!(
        md,
        "| Knot DNS | {:.0} | {} | {:.0} µs | {} µs | {} µs | {:.1} MiB | {} ms |",
        k.qps,
        k.lost,
        k.avg_us,
        k50.as_micros(),
        k99.as_micros(),
        knot_rss as f64 / 1024.0,
        knot_load.as_millis()
    )?;
    match &fresh {
        Some((f, bin)) => {
            let profile = bin
                .parent()
                .and_then(|p| p.file_name())
                .map_or("?".into(), |p| p.to_string_lossy());
            writeln!(
                md,
                "\n### API change → DNS answer\n\n`weir server` ({profile} build, embedded store) on loopback, weir \
                 DNS watching it through kube-rs; {} Services created one at a time through the \
                 API, then deleted. Time from the API's acknowledgement of the write to the first \
                 answer that shows it (the harness re-asks as soon as each answer arrives), and from sending the \
                 request.\n",
                cli.changes
            )?;
            writeln!(
                md,
                "| change | from API ack p50 | p99 | max | from request p50 | p99 |"
            )?;
            writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
            for (what, mut acked, mut sent) in [
                (
                    "create → A answer",
                    f.create_acked.clone(),
                    f.create_sent.clone(),
                ),
                (
                    "delete → NXDOMAIN",
                    f.delete_acked.clone(),
                    f.delete_sent.clone(),
                ),
            ] {
                let p = |s: &mut Vec<Duration>, q| {
                    weir_bench::percentile(s, q)
                        .map_or("-".into(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
                };
                writeln!(
                    md,
                    "| {what} | {} | {} | {} | {} | {} |",
                    p(&mut acked, 50.0),
                    p(&mut acked, 99.0),
                    p(&mut acked, 100.0),
                    p(&mut sent, 50.0),
                    p(&mut sent, 99.0),
                )?;
            }
        }
        None => writeln!(
            md,
            "\nAPI change → answer latency: not measured in this run (no `weir` binary; build it \
             with `cargo build --release -p weir` or pass --weir-bin)."
        )?,
    }
    writeln!(
        md,
        "\nweir/Knot queries/s: **{:.2}×**. Anchors: CoreDNS's kubernetes plugin is published at \
         33,669 queries/s on 2 vCPUs and ≈ 49 MB + 0.86 KB per Service/Pod (≈ 57.6 MB at 10,000).\n\
         \nReproduce: `cargo run --release -p weir-bench --bin dns_bench`.",
        w.qps / k.qps
    )?;
    print!("{md}");
    std::io::stdout().flush()?;
    if !cli.no_write {
        weir_bench::write_section("dns", &md)?;
    }
    Ok(())
}

fn weir_bin(explicit: Option<PathBuf>) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    explicit
        .or_else(|| std::env::var_os("WEIR_BIN").map(PathBuf::from))
        .into_iter()
        .chain([
            root.join("target/release/weir"),
            root.join("target/debug/weir"),
        ])
        .find(|p| p.exists())
}

#[derive(Default)]
struct Freshness {
    create_acked: Vec<Duration>,
    create_sent: Vec<Duration>,
    delete_acked: Vec<Duration>,
    delete_sent: Vec<Duration>,
}

/// Create and delete `n` Services through a real `weir server` and time how long each change
/// takes to show in weir DNS's answers.
fn freshness(bin: &Path, dir: &Path, n: usize) -> Result<Freshness> {
    let data = dir.join("apiserver");
    let api_port = free_port()?;
    let _api = ChildGuard(
        Command::new(bin)
            .arg("server")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} server", bin.display()))?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let kubeconfig = data.join("kubeconfig");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(kubeconfig.exists()
            && std::net::TcpStream::connect(("127.0.0.1", api_port)).is_ok())
        {
            if Instant::now() > deadline {
                bail!("weir server did not come up");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let client = kube::Client::try_from(config)?;
        let dns_port = free_port()?;
        let args = weir_dns::Args {
            listen: SocketAddr::from(([127, 0, 0, 1], dns_port)),
            zone: "cluster.local".into(),
            ttl: 5,
            upstreams: Vec::new(),
            resolv_conf: "/dev/null".into(),
            forward_timeout_ms: 2000,
            cache_size: 10_000,
            udp_workers: 1,
            no_autopath: false,
            metrics: None,
        };
        let shutdown = CancellationToken::new();
        let dns = tokio::spawn(weir_dns::run(args, client.clone(), shutdown.clone()));
        let api: kube::Api<Service> = kube::Api::namespaced(client, "default");
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(1)))?;
        let mut f = Freshness::default();
        let pp = kube::api::PostParams::default();
        let service = |name: &str| {
            let mut svc = Cluster {
                services: 1,
                namespaces: 1,
            }
            .service(0);
            svc.metadata = ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            };
            if let Some(spec) = svc.spec.as_mut() {
                spec.cluster_ip = None;
                spec.cluster_ips = None;
            }
            svc
        };
        // Untimed: the DNS server's watches must be established before timing starts.
        api.create(&pp, &service("warm-up")).await?;
        let warm = "warm-up.default.svc.cluster.local";
        if let Err(e) = wait_rcode(&sock, dns_port, warm, true, Duration::from_secs(60)) {
            if dns.is_finished() {
                dns.await??;
            }
            return Err(e);
        }
        api.delete("warm-up", &Default::default()).await?;
        wait_rcode(&sock, dns_port, warm, false, Duration::from_secs(60))?;
        for i in 0..n {
            let name = format!("fresh-{i}");
            let fqdn = format!("{name}.default.svc.cluster.local");
            let svc = service(&name);
            let sent = Instant::now();
            api.create(&pp, &svc).await?;
            let acked = Instant::now();
            wait_rcode(&sock, dns_port, &fqdn, true, Duration::from_secs(5))?;
            f.create_acked.push(acked.elapsed());
            f.create_sent.push(sent.elapsed());
            let sent = Instant::now();
            api.delete(&name, &Default::default()).await?;
            let acked = Instant::now();
            wait_rcode(&sock, dns_port, &fqdn, false, Duration::from_secs(5))?;
            f.delete_acked.push(acked.elapsed());
            f.delete_sent.push(sent.elapsed());
        }
        shutdown.cancel();
        dns.await??;
        Ok(f)
    })
}

/// Re-ask `name` until it has an answer (`exists`) or is NXDOMAIN (`!exists`).
fn wait_rcode(
    sock: &UdpSocket,
    port: u16,
    name: &str,
    exists: bool,
    within: Duration,
) -> Result<()> {
    let q = probe_query(name)?;
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&q, ("127.0.0.1", port))?;
        if let Ok(n) = sock.recv(&mut buf) {
            let rcode = buf[3] & 0x0f;
            let answers = u16::from_be_bytes([buf[6], buf[7]]);
            if n >= 12
                && (if exists {
                    rcode == 0 && answers > 0
                } else {
                    rcode == 3
                })
            {
                return Ok(());
            }
        }
    }
    bail!(
        "{name} did not {} within 5 s",
        if exists { "appear" } else { "disappear" }
    )
}

fn knot_version() -> String {
    Command::new("knotd")
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .last()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(version unknown)".into())
}
