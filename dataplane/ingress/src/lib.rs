//! weir's ingress proxy: serves networking.k8s.io/v1 Ingress routes to the ready endpoints
//! of Services, over HTTP/1.1, h2c and TLS (ALPN h2/http1.1, SNI certificates from Secrets).
//!
//! Data flow: API server → [`watch`] (kube-rs reflectors) → [`table::Snapshot`] →
//! [`table::Builder::build`] (pure) → `ArcSwap<Table>` → per request, on connections
//! accepted by [`server`]: the plain HTTP/1.1 fast path [`h1`], or hyper and
//! [`proxy::Proxy::handle`] for everything else (whose h2 requests to HTTP/1.1 backends
//! mostly go out over the fast path's upstream sockets, [`raw`]). A change swaps the table; nothing reloads, and
//! in-flight requests, keep-alive connections and WebSockets are untouched.
//!
//! Entry points: [`run`] (watch + serve, for `weir up` and `weir ingress`), and
//! [`IngressServer`] (serve a table the caller maintains, for tests and benchmarks).

pub mod annotations;
pub mod balance;
pub mod error;
pub mod fixtures;
pub mod h1;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod raw;
pub mod server;
pub mod table;
pub mod tls;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
/// The shutdown signal [`run`] and [`IngressServer::serve`] take.
pub use tokio_util::sync::CancellationToken;

use crate::balance::EjectPolicy;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyConfig};
use crate::server::ServerConfig;
use crate::table::{Builder, ClassFilter, Table};

/// Why the ingress could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("binding the ingress {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("ingress TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

fn duration(s: &str) -> Result<Duration, String> {
    annotations::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 500ms, 10s or 2m"))
}

/// `weir ingress` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Plain HTTP (HTTP/1.1 and h2c) listen address.
    #[arg(long, default_value = "0.0.0.0:80")]
    pub http_addr: SocketAddr,
    /// HTTPS listen address.
    #[arg(long, default_value = "0.0.0.0:443")]
    pub https_addr: SocketAddr,
    /// Prometheus `/metrics` and `/healthz` listen address.
    #[arg(long, default_value = "127.0.0.1:10254")]
    pub metrics_addr: SocketAddr,
    /// IngressClass name served (also without an IngressClass object).
    #[arg(long, default_value = "weir")]
    pub ingress_class: String,
    /// `spec.controller` value of IngressClasses served.
    #[arg(long, default_value = "weir.io/ingress-controller")]
    pub controller: String,
    /// `namespace/name` of a kubernetes.io/tls Secret for unknown SNI names; a self-signed
    /// certificate is generated if unset.
    #[arg(long)]
    pub default_ssl_certificate: Option<String>,
    /// Time a client has to send its request headers or complete the TLS handshake.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// How long an idle HTTP/1.1 client connection is kept open between requests
    /// (ingress-nginx's `keep-alive`). HTTP/1.1 connections handed to hyper mid-way (after a
    /// chunked upload, say) close after --header-read-timeout of idleness instead.
    #[arg(long, default_value = "75s", value_parser = duration)]
    pub keepalive_timeout: Duration,
    /// Largest request head in bytes (431 beyond).
    #[arg(long, default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: u64,
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub upstream_connect_timeout: Duration,
    /// Time for an upstream's response headers unless a route's proxy-read-timeout says otherwise.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub upstream_read_timeout: Duration,
    /// Other endpoints tried after a failure, for idempotent requests without a body.
    #[arg(long, default_value_t = 2)]
    pub retries: usize,
    /// Consecutive connect failures that eject an endpoint.
    #[arg(long, default_value_t = 3)]
    pub eject_after_failures: u32,
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub eject_duration: Duration,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Proxy worker threads, each with its own accept socket (SO_REUSEPORT), runtime and
    /// upstream connection pool, so a request never crosses threads; 0 means one per CPU.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Address written to `status.loadBalancer.ingress[].ip` of the Ingresses served (the
    /// node address clients reach the proxy on, as ingress-nginx's `--publish-status-address`);
    /// defaults to the HTTP listen address's IP unless that is unspecified (0.0.0.0 or ::).
    #[arg(long)]
    pub publish_address: Option<std::net::IpAddr>,
    /// One structured log line per request (target `weir_ingress::access`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
}

impl Args {
    pub fn proxy_config(&self) -> ProxyConfig {
        ProxyConfig {
            max_body_bytes: self.max_body_bytes,
            connect_timeout: self.upstream_connect_timeout,
            read_timeout: self.upstream_read_timeout,
            retries: self.retries,
            eject: EjectPolicy {
                failures: self.eject_after_failures,
                duration: self.eject_duration,
            },
            https_port: self.https_addr.port(),
            access_log: self.access_log,
        }
    }

    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            header_read_timeout: self.header_read_timeout,
            keepalive_timeout: self.keepalive_timeout,
            max_header_bytes: self.max_header_bytes,
            shutdown_grace: self.shutdown_grace,
        }
    }
}

/// The routing table as the proxy reads it: swapped whole, read without locks.
pub type SharedTable = Arc<ArcSwap<Table>>;

/// An empty shared table (every request gets 404 until a table is stored).
pub fn shared_table() -> SharedTable {
    Arc::new(ArcSwap::from_pointee(Table::default()))
}

/// Bound listeners, ready to serve whatever table is in the shared table.
pub struct IngressServer {
    /// Per worker: its HTTP and HTTPS accept sockets, all bound to the same two addresses.
    sockets: Vec<(std::net::TcpListener, std::net::TcpListener)>,
    metrics_listener: std::net::TcpListener,
    tls: TlsAcceptor,
    table: SharedTable,
    metrics: Arc<Metrics>,
    proxy_cfg: ProxyConfig,
    server_cfg: ServerConfig,
}

/// `n` listening sockets on `addr` sharing the port through SO_REUSEPORT, so the kernel
/// spreads connections over the workers. With port 0 the later ones take the first's port.
fn bind_reuseport(
    what: &'static str,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let bound = (|| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(4096)?;
            Ok(std::net::TcpListener::from(s))
        })();
        let l: std::net::TcpListener =
            bound.map_err(|source| Error::Bind { what, addr, source })?;
        addr = l
            .local_addr()
            .map_err(|source| Error::Bind { what, addr, source })?;
        out.push(l);
    }
    Ok(out)
}

impl IngressServer {
    /// Bind the HTTP, HTTPS and metrics listeners of `args` (port 0 picks a free port).
    pub async fn bind(
        args: &Args,
        table: SharedTable,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let fallback = tls::self_signed("weir-ingress-default")?;
        let tls = TlsAcceptor::from(tls::server_config(tls::SniResolver::new(
            table.clone(),
            fallback,
        ))?);
        let workers = match args.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let http = bind_reuseport("http", args.http_addr, workers)?;
        let https = bind_reuseport("https", args.https_addr, workers)?;
        let mut proxy_cfg = args.proxy_config();
        // Redirects name the port actually bound (it differs when asked for port 0).
        proxy_cfg.https_port = https[0]
            .local_addr()
            .map_or(proxy_cfg.https_port, |a| a.port());
        let metrics_listener = bind_reuseport("metrics", args.metrics_addr, 1)?.remove(0);
        Ok(IngressServer {
            sockets: http.into_iter().zip(https).collect(),
            metrics_listener,
            tls,
            table,
            metrics,
            proxy_cfg,
            server_cfg: args.server_config(),
        })
    }

    /// The bound (HTTP, HTTPS, metrics) addresses.
    pub fn addrs(&self) -> (SocketAddr, SocketAddr, SocketAddr) {
        let a = |l: &std::net::TcpListener| {
            l.local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        let (http, https) = &self.sockets[0];
        (a(http), a(https), a(&self.metrics_listener))
    }

    /// Serve until `shutdown`, then drain in-flight requests within the grace period. The
    /// proxy runs on its own worker threads; metrics are served on the caller's runtime.
    pub async fn serve(self, shutdown: CancellationToken) {
        let mut threads = Vec::new();
        for (i, (http, https)) in self.sockets.into_iter().enumerate() {
            let (tls, shutdown) = (self.tls.clone(), shutdown.clone());
            let proxy = Proxy::new(
                self.table.clone(),
                self.proxy_cfg.clone(),
                self.metrics.clone(),
            );
            let cfg = self.server_cfg.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ingress-{i}"))
                .spawn(move || worker(http, https, tls, Arc::new(proxy), cfg, shutdown));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start ingress worker thread {i}"),
            }
        }
        match tokio::net::TcpListener::from_std(self.metrics_listener) {
            Ok(l) => server::serve_metrics(l, self.metrics, shutdown.clone()).await,
            Err(e) => {
                tracing::error!(error = %e, "metrics listener");
                shutdown.cancelled().await;
            }
        }
        let _ =
            tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())))
                .await;
    }
}

/// One worker thread: a single-threaded runtime serving its own HTTP and HTTPS sockets,
/// so each request and its upstream exchange stay on one thread.
fn worker(
    http: std::net::TcpListener,
    https: std::net::TcpListener,
    tls: TlsAcceptor,
    proxy: Arc<Proxy>,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return tracing::error!(error = %e, "cannot build the ingress worker runtime"),
    };
    rt.block_on(async move {
        let (http, https) = match (TcpListener::from_std(http), TcpListener::from_std(https)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                return tracing::error!(error = %e, "ingress worker listeners");
            }
        };
        tokio::join!(
            server::serve(http, None, proxy.clone(), cfg.clone(), shutdown.clone()),
            server::serve(https, Some(tls), proxy.clone(), cfg, shutdown.clone()),
            proxy.sweep_idle(Duration::from_secs(15), &shutdown),
        );
    });
}

/// Run the ingress: watch the API server through `client`, serve until `shutdown`.
pub async fn run(
    args: Args,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let table = shared_table();
    let metrics = Arc::new(Metrics::default());
    let server = IngressServer::bind(&args, table.clone(), metrics.clone()).await?;
    let (http, https, m) = server.addrs();
    tracing::info!(%http, %https, metrics = %m, class = %args.ingress_class, "ingress listening");
    let builder = Builder::new(
        ClassFilter {
            class: args.ingress_class.clone(),
            controller: args.controller.clone(),
        },
        args.default_ssl_certificate.clone(),
    );
    let publish = args
        .publish_address
        .or(Some(http.ip()).filter(|ip| !ip.is_unspecified()));
    if publish.is_none() {
        tracing::info!(
            "no --publish-address and a wildcard listen address: Ingress status.loadBalancer is left alone"
        );
    }
    let watch = watch::run(client, builder, table, metrics, publish, shutdown.clone());
    tokio::join!(watch, server.serve(shutdown));
    Ok(())
}

#[cfg(test)]
mod tests;
