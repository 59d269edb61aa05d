//! ingress_bench: weir's ingress proxy side by side with nginx and haproxy, each configured
//! as an equivalent keep-alive reverse proxy to the same `weir echo` backend on loopback.
//! Measures HTTP/1.1 with wrk at 64 and 256 connections (requests/s, p99), TLS + HTTP/2 with
//! h2load, and 100 routing changes (one per 100 ms) under wrk load with open WebSockets,
//! counting failed requests and dropped WebSockets. The HTTP/1.1 runs also measure haproxy as a
//! plain TCP relay, as a ceiling for what any proxy reaches here. Writes the `ingress` section of
//! `docs/benchmarks.md`.
//!
//! Run: `cargo run --release -p weir-bench --bin ingress_bench [-- --duration 10]`.
//! Everything listens on 127.0.0.1; the backend runs as a child process of this binary.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weir_bench::ChildGuard;
use weir_echo::EchoConfig;
use weir_ingress::fixtures::{annotate, backend, ingress, service, slice, tls_secret, with_tls};
use weir_ingress::metrics::Metrics;
use weir_ingress::table::{Builder, Snapshot};
use weir_ingress::{CancellationToken, IngressServer, SharedTable};

#[derive(Parser)]
struct Cli {
    /// Seconds of each measured wrk and h2load run (each is preceded by a short warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Measured rounds per wrk configuration; the table shows each proxy's median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// weir's worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    weir_workers: usize,
    /// Only the wrk -c64 comparison (for quick tuning runs); writes nothing.
    #[arg(long)]
    quick: bool,
    /// Print the table without writing docs/benchmarks.md.
    #[arg(long)]
    no_write: bool,
    /// Internal: serve the backend on (echo-0, echo-1, websocket-echo) and never return.
    #[arg(long, hide = true, num_args = 3)]
    backend: Option<Vec<SocketAddr>>,
}

#[derive(Parser)]
struct IngressCli {
    #[command(flatten)]
    args: weir_ingress::Args,
}

fn free_addr() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// How long a peer may take to start listening; 10 s was once too short on a loaded machine.
const LISTEN_WAIT: Duration = Duration::from_secs(60);

fn wait_listening(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + LISTEN_WAIT;
    while StdStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!(
                "{what} is not listening on {addr} after {} s",
                LISTEN_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(addrs) = cli.backend {
        return backend_main(&addrs);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(cli))
}

/// The backend process: two `weir echo` HTTP servers and a WebSocket-style upgrade echo.
fn backend_main(addrs: &[SocketAddr]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let token = CancellationToken::new();
        let echo = |i: usize| EchoConfig {
            http: Some(addrs[i]),
            tcp: None,
            udp: None,
            name: format!("echo-{i}"),
        };
        let (a, b, c) = tokio::join!(
            weir_echo::serve(echo(0), token.clone()),
            weir_echo::serve(echo(1), token.clone()),
            upgrade_echo(addrs[2]),
        );
        a?;
        b?;
        c
    })
}

/// Answers any request with 101 and then echoes bytes: the far end of the WebSockets.
async fn upgrade_echo(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let reply = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
            if s.write_all(reply).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// The row name of the TCP relay, whose requests/s marks about the most an HTTP proxy can reach.
const RELAY: &str = "L4 relay (haproxy mode tcp)";

struct Proxy {
    name: &'static str,
    /// The process whose CPU time is charged to this proxy.
    pid: u32,
    /// Also charge the process's children (nginx's workers; not weir's, which are the
    /// backend and the load generators).
    children: bool,
    http: SocketAddr,
    https: SocketAddr,
}

async fn bench(cli: Cli) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("weir-ingress-bench-")
        .tempdir()?;
    let (echo0, echo1, ws) = (free_addr()?, free_addr()?, free_addr()?);
    let exe = std::env::current_exe()?;
    let backend_proc = ChildGuard(
        Command::new(exe)
            .args([
                "--backend",
                &echo0.to_string(),
                &echo1.to_string(),
                &ws.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting the backend")?,
    );
    for a in [echo0, echo1, ws] {
        wait_listening(a, "backend")?;
    }

    let secret = tls_secret("bench", "bench-tls", &["bench.local"])?;
    let pem = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .unwrap_or_default()
    };
    std::fs::write(dir.path().join("tls.crt"), pem("tls.crt"))?;
    std::fs::write(dir.path().join("tls.key"), pem("tls.key"))?;
    std::fs::write(
        dir.path().join("combined.pem"),
        [pem("tls.crt"), pem("tls.key")].concat(),
    )?;

    // weir, in this process.
    let args = IngressCli::try_parse_from([
        "weir-ingress",
        "--http-addr=127.0.0.1:0",
        "--https-addr=127.0.0.1:0",
        "--metrics-addr=127.0.0.1:0",
        "--access-log=false",
        "--default-ssl-certificate=bench/bench-tls",
        &format!("--workers={}", cli.weir_workers),
    ])?
    .args;
    let weir_workers = match cli.weir_workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let table = weir_ingress::shared_table();
    let mut builder = Builder::new(Default::default(), args.default_ssl_certificate.clone());
    table.store(Arc::new(builder.build(&snapshot(&[echo0], ws, &secret, 0))));
    let server = IngressServer::bind(&args, table.clone(), Arc::new(Metrics::default())).await?;
    let (weir_http, weir_https, _) = server.addrs();
    let shutdown = CancellationToken::new();
    let weir_task = tokio::spawn(server.serve(shutdown.clone()));

    let (nginx, _nginx) = peer("nginx", true, |p| start_nginx(dir.path(), p, echo0))?;
    let (haproxy, _haproxy) = peer("haproxy", false, |p| start_haproxy(dir.path(), p, echo0))?;
    let (relay, _relay) = peer(RELAY, false, |p| start_relay(dir.path(), p, echo0))?;
    let weir = Proxy {
        pid: std::process::id(),
        children: false,
        name: "weir",
        http: weir_http,
        https: weir_https,
    };
    for p in [&nginx, &haproxy] {
        wait_listening(p.http, p.name)?;
        wait_listening(p.https, p.name)?;
    }
    wait_listening(relay.http, relay.name)?;
    let proxies = [&weir, &nginx, &haproxy];
    // HTTP/1.1 only: the relay passes bytes through, so it has no TLS + h2 to offer.
    let h1_proxies = [&weir, &nginx, &haproxy, &relay];

    let mut md = String::new();
    writeln!(md, "## Ingress proxy: weir vs nginx vs haproxy\n")?;
    writeln!(
        md,
        "Produced by `cargo run --release -p weir-bench --bin ingress_bench` ({} s per run after a 1 s warm-up). \
         Same run, loopback, 2 cores shared by load generator, proxy and backend; every proxy forwards to the same \
         `weir echo` backend over keep-alive HTTP/1.1 and sets X-Forwarded-For/-Proto.\n",
        cli.duration,
    )?;
    writeln!(
        md,
        "Configurations: weir {} workers (one thread, runtime, SO_REUSEPORT socket and upstream pool each), \
         `--access-log=false`; nginx {} `worker_processes auto`, upstream `keepalive 512`, `access_log off`; \
         haproxy {} `nbthread 2`, `http-reuse always`, no `log` line (no access log). Every proxy's upstream \
         connections are reused across requests.\n",
        weir_workers,
        tool_version("nginx", &["-v"]),
        tool_version("haproxy", &["-v"]),
    )?;
    writeln!(
        md,
        "The L4 relay row is not an HTTP proxy: haproxy in `mode tcp` (`nbthread 2`) copies each client \
         connection's bytes to a backend connection of its own and back, parsing nothing. Every proxy here must \
         at least read and write each request and each response once, which is all the relay does, so its \
         requests/s marks about the most an HTTP proxy can reach on this machine.\n"
    )?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    writeln!(
        md,
        "Load average when the run started: {} (other work on the machine shares the 2 cores; \
         repeat runs differ by ±30%, so read the ratios within one run).\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    writeln!(
        md,
        "### HTTP/1.1 keep-alive (wrk -t2 --latency; median of {} rounds, order rotated each round)\n",
        cli.rounds
    )?;
    writeln!(
        md,
        "| proxy | connections | requests/s | p50 | p99 | proxy CPU per request | errors | vs nginx req/s |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    let conn_counts: &[u32] = if cli.quick { &[64] } else { &[64, 256] };
    for &conns in conn_counts {
        let mut results: Vec<(&str, Vec<(WrkResult, f64)>)> =
            h1_proxies.iter().map(|p| (p.name, Vec::new())).collect();
        for round in 0..cli.rounds {
            // Rotate the order each round so no proxy always runs first or last.
            for k in 0..h1_proxies.len() {
                let i = (k + round) % h1_proxies.len();
                let p = h1_proxies[i];
                wrk(p.http, conns, 1).await?;
                let cpu = cpu_ticks(p.pid, p.children);
                let r = wrk(p.http, conns, cli.duration).await?;
                let cpu_us = (cpu_ticks(p.pid, p.children) - cpu) as f64 * 1e6
                    / ticks_per_sec()
                    / r.requests.max(1) as f64;
                eprintln!(
                    "{} c{conns} round {round}: {:.0} req/s p99 {:?} cpu {cpu_us:.1} µs/req errors {}",
                    p.name, r.rps, r.p99, r.errors
                );
                results[i].1.push((r, cpu_us));
            }
        }
        let med: Vec<(&str, Summary)> = results
            .iter()
            .map(|(n, rs)| (*n, Summary::of(rs)))
            .collect();
        let nginx_rps = med
            .iter()
            .find(|(n, _)| *n == "nginx")
            .map_or(1.0, |(_, s)| s.rps);
        for (name, m) in &med {
            writeln!(
                md,
                "| {name} | {conns} | {:.0} | {} | {} | {:.1} µs | {} | {:.2}× |",
                m.rps,
                fmt_dur(m.p50),
                fmt_dur(m.p99),
                m.cpu_us,
                m.errors,
                m.rps / nginx_rps
            )?;
        }
    }

    let backend_pid = backend_proc.0.id();
    let mut counted = Vec::new();
    for p in h1_proxies {
        wrk(p.http, 64, 1).await?;
        let c = count(p, backend_pid, 64, cli.duration.min(5)).await?;
        eprintln!(
            "{} counted: {:.0} req/s, {:.2} syscalls and {:.2} context switches per request",
            p.name,
            c.rps,
            c.syscalls.unwrap_or(f64::NAN),
            c.switches.unwrap_or(f64::NAN)
        );
        counted.push((p.name, c));
    }
    write_counts(&mut md, &counted, cli.duration.min(5))?;

    if cli.quick {
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), weir_task).await;
        print!("{md}");
        return Ok(());
    }
    writeln!(
        md,
        "\n### TLS + HTTP/2 (h2load -c32 -m10 -t2 -n {}, after a 20000-request warm-up; the run with the median requests/s of {} rounds, order rotated each round)\n",
        cli.duration * 30_000,
        cli.rounds
    )?;
    writeln!(
        md,
        "| proxy | requests/s | mean request time | proxy CPU per request | failed/errored | vs nginx |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let mut h2_runs: Vec<Vec<(H2Result, f64)>> = proxies.iter().map(|_| Vec::new()).collect();
    for round in 0..cli.rounds {
        for k in 0..proxies.len() {
            let i = (k + round) % proxies.len();
            let p = proxies[i];
            h2load(p.https, 20_000).await?;
            let cpu = cpu_ticks(p.pid, p.children);
            let n = cli.duration * 30_000;
            let r = h2load(p.https, n).await?;
            let cpu_us =
                (cpu_ticks(p.pid, p.children) - cpu) as f64 * 1e6 / ticks_per_sec() / n as f64;
            eprintln!(
                "{} h2 round {round}: {:.0} req/s mean {} cpu {cpu_us:.1} µs/req failed {}",
                p.name, r.rps, r.mean, r.failed
            );
            h2_runs[i].push((r, cpu_us));
        }
    }
    let mut h2 = Vec::new();
    for (p, mut runs) in proxies.iter().zip(h2_runs) {
        let failed: u64 = runs.iter().map(|(r, _)| r.failed).sum();
        runs.sort_by(|a, b| a.0.rps.total_cmp(&b.0.rps));
        let mid = runs.len() / 2;
        let Some((mut r, cpu_us)) = runs.into_iter().nth(mid) else {
            continue;
        };
        r.failed = failed;
        h2.push((p.name, r, cpu_us));
    }
    let nginx_h2 = h2
        .iter()
        .find(|(n, ..)| *n == "nginx")
        .map_or(1.0, |(_, r, _)| r.rps);
    for (name, r, cpu_us) in &h2 {
        writeln!(
            md,
            "| {name} | {:.0} | {} | {cpu_us:.1} µs | {} | {:.2}× |",
            r.rps,
            r.mean,
            r.failed,
            r.rps / nginx_h2
        )?;
    }

    let changes = route_changes(&table, &mut builder, &secret, weir.http, echo0, echo1, ws).await?;
    writeln!(md, "\n### Routing changes under load (weir)\n")?;
    writeln!(
        md,
        "100 changes, one every 100 ms, while wrk -c64 runs and {} WebSockets stay open through the proxy and \
         are pinged after every change. Each change flips the echo Service between one and two endpoints; every \
         fourth one also adds or removes an Ingress. Endpoint-only changes update the current table \
         (`Builder::update_endpoints`, as the watch does when only EndpointSlices changed); the others rebuild it \
         whole.\n",
        changes.websockets
    )?;
    writeln!(
        md,
        "| changes | requests during changes | failed requests | WebSockets dropped | full rebuild + swap (max) | endpoint update + swap (max) |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    writeln!(
        md,
        "| {} | {} | {} | {} of {} | {} | {} |",
        changes.applied,
        changes.wrk.requests,
        changes.wrk.errors,
        changes.dropped,
        changes.websockets,
        fmt_dur(changes.max_full),
        fmt_dur(changes.max_update)
    )?;

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), weir_task).await;
    print!("{md}");
    if !cli.no_write {
        weir_bench::write_section("ingress", &md)?;
        eprintln!(
            "wrote the ingress section of {}",
            weir_bench::benchmarks_md().display()
        );
    }
    Ok(())
}

/// The cluster the weir proxy serves: Service `echo` on `echo_eps`, Service `ws` for the
/// WebSockets, one hostless Ingress with TLS, and `extra` unrelated Ingresses.
fn snapshot(echo_eps: &[SocketAddr], ws: SocketAddr, secret: &Secret, extra: usize) -> Snapshot {
    let mut s = Snapshot::default();
    s.services
        .push(Arc::new(service("bench", "echo", &[("http", 80, None)])));
    s.services
        .push(Arc::new(service("bench", "ws", &[("http", 80, None)])));
    for (i, e) in echo_eps.iter().enumerate() {
        let ip = e.ip().to_string();
        s.slices.push(Arc::new(slice(
            "bench",
            &format!("echo-{i}"),
            "echo",
            ("http", e.port().into()),
            &[(&ip, true)],
        )));
    }
    let ip = ws.ip().to_string();
    s.slices.push(Arc::new(slice(
        "bench",
        "ws-0",
        "ws",
        ("http", ws.port().into()),
        &[(&ip, true)],
    )));
    let mut main = with_tls(
        ingress(
            "bench",
            "bench",
            vec![
                ("", "/", "Prefix", backend("echo", 80)),
                ("", "/ws", "Prefix", backend("ws", 80)),
            ],
        ),
        &["bench.local"],
        "bench-tls",
    );
    annotate(
        &mut main.metadata,
        &[("ingress.weir.io/ssl-redirect", "false")],
    );
    s.ingresses.push(Arc::new(main));
    for i in 0..extra {
        let host = format!("x{i}.bench.local");
        s.ingresses.push(Arc::new(ingress(
            "bench",
            &format!("extra-{i}"),
            vec![(&host, "/", "Prefix", backend("echo", 80))],
        )));
    }
    s.secrets.push(Arc::new(secret.clone()));
    s
}

fn tool_version(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output();
    let text = out
        .map(|o| String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned())
        .unwrap_or_default();
    let line = text.lines().next().unwrap_or("").trim();
    line.split_whitespace()
        .find(|w| w.contains('/') || w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or(line)
        .to_string()
}

/// A peer proxy on fresh loopback ports, started by `start`; its CPU time is that of the
/// process `start` spawns (and of that process's children if `children`).
fn peer(
    name: &'static str,
    children: bool,
    start: impl FnOnce(&Proxy) -> Result<ChildGuard>,
) -> Result<(Proxy, ChildGuard)> {
    let mut p = Proxy {
        pid: 0,
        children,
        name,
        http: free_addr()?,
        https: free_addr()?,
    };
    let child = start(&p)?;
    p.pid = child.0.id();
    Ok((p, child))
}

fn start_nginx(dir: &Path, p: &Proxy, backend: SocketAddr) -> Result<ChildGuard> {
    let d = dir.display();
    let conf = format!(
        r#"worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    upstream echo {{ server {backend}; keepalive 512; }}
    server {{
        listen {http};
        listen {https} ssl http2;
        ssl_certificate {d}/tls.crt;
        ssl_certificate_key {d}/tls.key;
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"#,
        http = p.http,
        https = p.https,
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .stdout(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    Ok(ChildGuard(child))
}

fn start_haproxy(dir: &Path, p: &Proxy, backend: SocketAddr) -> Result<ChildGuard> {
    let conf = format!(
        r#"global
    maxconn 8000
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend fe
    bind {http}
    bind {https} ssl crt {d}/combined.pem alpn h2,http/1.1
    option forwardfor
    default_backend be
backend be
    server echo {backend}
"#,
        http = p.http,
        https = p.https,
        d = dir.display(),
    );
    spawn_haproxy(&dir.join("haproxy.cfg"), &conf)
}

/// haproxy as a plain TCP relay: one backend connection per client connection, no HTTP.
fn start_relay(dir: &Path, p: &Proxy, backend: SocketAddr) -> Result<ChildGuard> {
    let conf = format!(
        r#"global
    maxconn 8000
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind {http}
    default_backend be
backend be
    server echo {backend}
"#,
        http = p.http,
    );
    spawn_haproxy(&dir.join("relay.cfg"), &conf)
}

fn spawn_haproxy(path: &Path, conf: &str) -> Result<ChildGuard> {
    std::fs::write(path, conf)?;
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(path)
        .arg("-db")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting haproxy with {}", path.display()))?;
    Ok(ChildGuard(child))
}

#[derive(Debug, Default)]
struct WrkResult {
    rps: f64,
    p50: Duration,
    p99: Duration,
    requests: u64,
    /// Socket errors plus non-2xx/3xx responses.
    errors: u64,
}

async fn wrk(addr: SocketAddr, conns: u32, secs: u64) -> Result<WrkResult> {
    Ok(wrk_counted(addr, conns, secs, None).await?.0)
}

/// wrk, under `perf stat -p <count>` when `count` names processes: perf opens its counters
/// before it starts wrk, so they cover the whole run. Returns perf's output too.
async fn wrk_counted(
    addr: SocketAddr,
    conns: u32,
    secs: u64,
    count: Option<&str>,
) -> Result<(WrkResult, String)> {
    let mut cmd = match count {
        Some(pids) => {
            let mut c = tokio::process::Command::new("perf");
            c.args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter,context-switches",
                "-p",
                pids,
                "--",
                "wrk",
            ]);
            c
        }
        None => tokio::process::Command::new("wrk"),
    };
    let out = cmd
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            "-H",
            "Host: bench.local",
        ])
        .arg(format!("http://{addr}/"))
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{stderr}");
    }
    let r = parse_wrk(&text).with_context(|| format!("parsing wrk output:\n{text}"))?;
    Ok((r, stderr))
}

/// Median over rounds of requests/s, p50, p99 and CPU per request; errors are summed.
struct Summary {
    rps: f64,
    p50: Duration,
    p99: Duration,
    cpu_us: f64,
    errors: u64,
}

impl Summary {
    fn of(runs: &[(WrkResult, f64)]) -> Summary {
        fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            v[v.len() / 2]
        }
        Summary {
            rps: median(runs.iter().map(|r| r.0.rps).collect()),
            p50: median(runs.iter().map(|r| r.0.p50).collect()),
            p99: median(runs.iter().map(|r| r.0.p99).collect()),
            cpu_us: median(runs.iter().map(|r| r.1).collect()),
            errors: runs.iter().map(|r| r.0.errors).sum(),
        }
    }
}

/// Per-request costs of one proxy and of its peers on the machine, from a wrk run of its
/// own under `perf stat`, apart from the timed runs that perf would slow. wrk's CPU time
/// includes perf's, which is small: the counting itself is charged to the counted threads.
struct Counts {
    rps: f64,
    user_us: f64,
    sys_us: f64,
    /// `None` when perf is missing or cannot attach.
    syscalls: Option<f64>,
    switches: Option<f64>,
    backend_us: f64,
    wrk_us: f64,
}

async fn count(p: &Proxy, backend_pid: u32, conns: u32, secs: u64) -> Result<Counts> {
    let pids = proxy_pids(p.pid, p.children);
    let list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (cpu, backend, reaped) = (
        cpu_split(&pids),
        cpu_ticks(backend_pid, false),
        reaped_children_ticks(),
    );
    let perf = Command::new("perf")
        .args(["stat", "-e", "context-switches", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let (r, perf_out) = wrk_counted(p.http, conns, secs, perf.then_some(list.as_str())).await?;
    let (cpu2, backend2, reaped2) = (
        cpu_split(&pids),
        cpu_ticks(backend_pid, false),
        reaped_children_ticks(),
    );
    let per_req = |ticks: u64| ticks as f64 * 1e6 / ticks_per_sec() / r.requests.max(1) as f64;
    let (mut syscalls, mut switches) = (None, None);
    for line in perf_out.lines() {
        let f: Vec<&str> = line.split(',').collect();
        let per = f
            .first()
            .and_then(|n| n.parse::<f64>().ok())
            .map(|n| n / r.requests.max(1) as f64);
        match f.get(2) {
            Some(&"raw_syscalls:sys_enter") => syscalls = per,
            Some(&"context-switches") => switches = per,
            _ => {}
        }
    }
    Ok(Counts {
        rps: r.rps,
        user_us: per_req(cpu2.0 - cpu.0),
        sys_us: per_req(cpu2.1 - cpu.1),
        syscalls,
        switches,
        backend_us: per_req(backend2 - backend),
        wrk_us: per_req(reaped2 - reaped),
    })
}

/// The "where the CPU goes" table, and what the 1.3× goal leaves the proxy to spend.
fn write_counts(md: &mut String, counted: &[(&str, Counts)], secs: u64) -> Result<()> {
    writeln!(
        md,
        "\n### Where the CPU goes (wrk -t2 -c64 -d{secs}s, one run per proxy under `perf stat -e raw_syscalls:sys_enter,context-switches`)\n"
    )?;
    writeln!(
        md,
        "Counted in a run of its own, as perf slows what it counts. Per request: the proxy's user and system \
         CPU time (/proc), its system calls and context switches (perf), and the CPU time of the backend and \
         of wrk (which perf starts and waits for; perf itself adds little) in the same run.\n"
    )?;
    writeln!(
        md,
        "| proxy | requests/s | user CPU | system CPU | syscalls | context switches | backend CPU | wrk CPU |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    for (name, c) in counted {
        writeln!(
            md,
            "| {name} | {:.0} | {:.1} µs | {:.1} µs | {} | {} | {:.1} µs | {:.1} µs |",
            c.rps,
            c.user_us,
            c.sys_us,
            opt(c.syscalls),
            opt(c.switches),
            c.backend_us,
            c.wrk_us
        )?;
    }
    let find = |n: &str| counted.iter().find(|(name, _)| *name == n).map(|(_, c)| c);
    if let (Some(w), Some(n)) = (find("weir"), find("nginx")) {
        // On a machine whose cores are saturated, requests/s goes as 1 / (CPU per request
        // of wrk + proxy + backend).
        let nginx_total = n.wrk_us + n.backend_us + n.user_us + n.sys_us;
        let budget = nginx_total / 1.3 - (w.wrk_us + w.backend_us);
        writeln!(
            md,
            "\nwrk, backend and proxy share the 2 cores, so requests/s goes as 1 / (their CPU per request). \
             Behind nginx they spent {nginx_total:.1} µs per request; for 1.3× nginx's requests/s, weir would \
             have to proxy a request in {budget:.1} µs of CPU, next to wrk's and the backend's {:.1} µs. weir's \
             own system time was {:.1} µs per request (nginx's {:.1} µs).",
            w.wrk_us + w.backend_us,
            w.sys_us,
            n.sys_us,
        )?;
        if let Some(r) = find(RELAY) {
            writeln!(
                md,
                " The L4 relay, which parses nothing, spent {:.1} µs of user and {:.1} µs of system CPU per request.",
                r.user_us, r.sys_us
            )?;
        }
    }
    Ok(())
}

/// User plus system CPU ticks of `pid`, and of its direct children if `children`.
fn cpu_ticks(pid: u32, children: bool) -> u64 {
    let (user, sys) = cpu_split(&proxy_pids(pid, children));
    user + sys
}

/// `/proc/<pid>/stat` fields after the parenthesised command (state is field 0).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    // The state letter is not a number; keep the positions of the rest.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// `pid`, and its direct children if `children` (nginx's workers).
fn proxy_pids(pid: u32, children: bool) -> Vec<u32> {
    let mut pids = vec![pid];
    if !children {
        return pids;
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(name) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Field 1 is the parent's pid.
        if stat_fields(name).and_then(|f| f.get(1).copied()) == Some(u64::from(pid))
            && let Ok(child) = name.parse()
        {
            pids.push(child);
        }
    }
    pids
}

/// User and system CPU ticks of `pids` (utime and stime, fields 11 and 12 here).
fn cpu_split(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .filter_map(|p| stat_fields(&p.to_string()))
        .fold((0, 0), |(u, s), f| {
            (
                u + f.get(11).copied().unwrap_or(0),
                s + f.get(12).copied().unwrap_or(0),
            )
        })
}

/// CPU ticks of this process's children that have been waited for (cutime + cstime): after
/// a wrk run returns, its CPU time (and perf's, when perf ran it) is added here.
fn reaped_children_ticks() -> u64 {
    stat_fields("self").map_or(0, |f| {
        f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0)
    })
}

/// The kernel's clock ticks per second for /proc CPU times (USER_HZ, 100 on Linux).
fn ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().ok()?,
            ["50%", v] => r.p50 = parse_dur(v)?,
            ["99%", v] => r.p99 = parse_dur(v)?,
            [n, "requests", "in", ..] => r.requests = n.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    (r.rps > 0.0).then_some(r)
}

fn parse_dur(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn fmt_dur(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

struct H2Result {
    rps: f64,
    mean: String,
    failed: u64,
}

/// `requests` TLS + h2 requests over 32 connections with 10 streams each. (h2load's
/// duration mode, `-D`, reported 0 requests here, so runs are sized by count.)
async fn h2load(addr: SocketAddr, requests: u64) -> Result<H2Result> {
    let out = tokio::process::Command::new("h2load")
        .args(["-c32", "-m10", "-t2", "-n", &requests.to_string()])
        .arg(format!("https://{addr}/"))
        .output()
        .await
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = H2Result {
        rps: 0.0,
        mean: String::new(),
        failed: 0,
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("finished in") {
            r.rps = words.get(3).and_then(|w| w.parse().ok()).unwrap_or(0.0);
        } else if line.starts_with("requests:") {
            let count = |label: &str| {
                words
                    .windows(2)
                    .find(|w| w[1].trim_end_matches(',') == label)
                    .and_then(|w| w[0].parse::<u64>().ok())
            };
            r.failed = count("failed").unwrap_or(0)
                + count("errored").unwrap_or(0)
                + count("timeout").unwrap_or(0);
        } else if line.starts_with("time for request:") {
            r.mean = words.get(5).map(|s| s.to_string()).unwrap_or_default();
        }
    }
    if r.rps == 0.0 {
        bail!(
            "h2load gave no result:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(r)
}

struct Changes {
    applied: usize,
    wrk: WrkResult,
    websockets: usize,
    dropped: usize,
    max_full: Duration,
    max_update: Duration,
}

async fn open_ws(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: bench.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("upgrade refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(s)
}

async fn ws_ping(s: &mut TcpStream, i: usize) -> bool {
    let msg = format!("ping {i:08}");
    let mut back = vec![0u8; msg.len()];
    let exchange = async {
        s.write_all(msg.as_bytes()).await?;
        s.read_exact(&mut back).await?;
        std::io::Result::Ok(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), exchange).await,
        Ok(Ok(()))
    ) && back == msg.as_bytes()
}

#[allow(clippy::too_many_arguments)]
async fn route_changes(
    table: &SharedTable,
    builder: &mut Builder,
    secret: &Secret,
    proxy: SocketAddr,
    echo0: SocketAddr,
    echo1: SocketAddr,
    ws: SocketAddr,
) -> Result<Changes> {
    const SOCKETS: usize = 50;
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        sockets.push(Some(open_ws(proxy).await?));
    }
    let load = tokio::spawn(wrk(proxy, 64, 12));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut max_full, mut max_update) = (Duration::ZERO, Duration::ZERO);
    for i in 0..100 {
        tick.tick().await;
        let eps: &[SocketAddr] = if i % 2 == 0 {
            &[echo0, echo1]
        } else {
            &[echo0]
        };
        let snap = snapshot(eps, ws, secret, (i / 4) % 7);
        let started = Instant::now();
        if i % 4 == 0 {
            table.store(Arc::new(builder.build(&snap)));
            max_full = max_full.max(started.elapsed());
        } else {
            table.store(Arc::new(builder.update_endpoints(&table.load(), &snap)));
            max_update = max_update.max(started.elapsed());
        }
        for (j, slot) in sockets.iter_mut().enumerate() {
            if let Some(s) = slot
                && !ws_ping(s, i * SOCKETS + j).await
            {
                *slot = None;
            }
        }
    }
    let wrk = load.await.context("joining wrk")??;
    let dropped = sockets.iter().filter(|s| s.is_none()).count();
    Ok(Changes {
        applied: 100,
        wrk,
        websockets: SOCKETS,
        dropped,
        max_full,
        max_update,
    })
}
