//! weir's ingress proxy: serves networking.k8s.io/v1 Ingress routes to the ready endpoints
//! of Services, over HTTP/1.1, h2c and TLS (ALPN h2/http1.1, SNI certificates from Secrets).
//!
//! Data flow: API server → [`watch`] (kube-rs reflectors) → [`table::Snapshot`] →
//! [`table::Builder::build`] (pure) → `ArcSwap<Table>` → [`proxy::Proxy`] per request, on
//! connections accepted by [`server`]. A change swaps the table; nothing reloads, and
//! in-flight requests, keep-alive connections and WebSockets are untouched.
//!
//! Entry points: [`run`] (watch + serve, for `weir up` and `weir ingress`), and
//! [`IngressServer`] (serve a table the caller maintains, for tests and benchmarks).

pub mod annotations;
pub mod balance;
pub mod error;
pub mod fixtures;
pub mod metrics;
pub mod proxy;
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
use tokio_util::sync::CancellationToken;

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
            max_header_bytes: self.max_header_bytes,
            shutdown_grace: self.shutdown_grace,
        }
    }
}

/// Bound listeners and the proxy behind them, serving whatever table is in `table`.
pub struct IngressServer {
    http: TcpListener,
    https: TcpListener,
    metrics_listener: TcpListener,
    tls: TlsAcceptor,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    server_cfg: ServerConfig,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

impl IngressServer {
    /// Bind the HTTP, HTTPS and metrics listeners of `args` (port 0 picks a free port).
    pub async fn bind(
        args: &Args,
        table: Arc<ArcSwap<Table>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let fallback = tls::self_signed("weir-ingress-default")?;
        let tls = TlsAcceptor::from(tls::server_config(tls::SniResolver::new(
            table.clone(),
            fallback,
        ))?);
        let http = bind("http", args.http_addr).await?;
        let https = bind("https", args.https_addr).await?;
        let mut cfg = args.proxy_config();
        // Redirects name the port actually bound (it differs when asked for port 0).
        cfg.https_port = https.local_addr().map_or(cfg.https_port, |a| a.port());
        let proxy = Arc::new(Proxy::new(table, cfg, metrics.clone()));
        Ok(IngressServer {
            http,
            https,
            metrics_listener: bind("metrics", args.metrics_addr).await?,
            tls,
            proxy,
            metrics,
            server_cfg: args.server_config(),
        })
    }

    /// The bound (HTTP, HTTPS, metrics) addresses.
    pub fn addrs(&self) -> (SocketAddr, SocketAddr, SocketAddr) {
        let a = |l: &TcpListener| {
            l.local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        (a(&self.http), a(&self.https), a(&self.metrics_listener))
    }

    /// Serve until `shutdown`, then drain in-flight requests within the grace period.
    pub async fn serve(self, shutdown: CancellationToken) {
        let http = server::serve(
            self.http,
            None,
            self.proxy.clone(),
            self.server_cfg.clone(),
            shutdown.clone(),
        );
        let https = server::serve(
            self.https,
            Some(self.tls),
            self.proxy,
            self.server_cfg,
            shutdown.clone(),
        );
        let metrics = server::serve_metrics(self.metrics_listener, self.metrics, shutdown);
        tokio::join!(http, https, metrics);
    }
}

/// Run the ingress: watch the API server through `client`, serve until `shutdown`.
pub async fn run(
    args: Args,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let table = Arc::new(ArcSwap::from_pointee(Table::default()));
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
    let watch = watch::run(client, builder, table, metrics, shutdown.clone());
    tokio::join!(watch, server.serve(shutdown));
    Ok(())
}

#[cfg(test)]
mod tests;
