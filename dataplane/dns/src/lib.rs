//! weir's cluster DNS server. It answers the cluster zone (Kubernetes DNS schema 1.1.0) from
//! an in-memory snapshot fed by watches of Services, EndpointSlices and Pods, and forwards
//! every other name to the node's upstream resolvers.
//!
//! Layers, from the wire up: [`wire`] parses queries and writes responses without
//! allocating; [`records`] maps Kubernetes objects to records (pure); [`zone`] applies
//! per-object diffs and publishes lock-free snapshots; [`handler`] answers a query from a
//! snapshot; [`forward`] resolves the rest upstream; [`server`] owns the sockets; [`watch`]
//! feeds the zone from the API server.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod forward;
pub mod handler;
pub mod metrics;
pub mod records;
pub mod server;
pub mod udp;
pub mod watch;
pub mod wire;
pub mod zone;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;

use crate::forward::Forwarder;
use crate::handler::Handler;
use crate::metrics::Metrics;
use crate::server::{Limits, Server};
use crate::zone::{Zone, ZoneReader};

/// `weir dns`: serve cluster DNS.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Address to serve DNS on, UDP and TCP. The cluster DNS Service (10.96.0.10:53 by
    /// default) reaches this address through weir's load balancer.
    #[arg(long = "dns-listen", default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,
    /// The cluster domain.
    #[arg(long = "cluster-domain", default_value = "cluster.local")]
    pub zone: String,
    /// TTL of cluster records, in seconds.
    #[arg(long = "dns-ttl", default_value_t = 5)]
    pub ttl: u32,
    /// Upstream resolvers for names outside the cluster zone (repeatable); by default the
    /// nameservers of --resolv-conf.
    #[arg(long = "dns-upstream")]
    pub upstreams: Vec<SocketAddr>,
    /// The node's resolv.conf: upstream nameservers and search domains (for autopath).
    #[arg(long = "resolv-conf", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Upper bound on an upstream exchange, across all upstreams; then SERVFAIL.
    #[arg(long = "dns-forward-timeout-ms", default_value_t = 2000)]
    pub forward_timeout_ms: u64,
    /// Entries in the forwarding cache.
    #[arg(long = "dns-cache-size", default_value_t = 10_000)]
    pub cache_size: usize,
    /// UDP worker threads; 0 means one per CPU.
    #[arg(long = "dns-udp-workers", default_value_t = 0)]
    pub udp_workers: usize,
    /// Do not answer search-expanded names server-side (CoreDNS's autopath).
    #[arg(long = "dns-no-autopath")]
    pub no_autopath: bool,
    /// Serve Prometheus metrics at http://<addr>/metrics.
    #[arg(long = "dns-metrics")]
    pub metrics: Option<SocketAddr>,
}

/// Errors that stop the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cluster domain: {0}")]
    Zone(#[from] wire::NameError),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error("reading {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serving metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A DNS server with its zone writer, before it is fed and started. Tests and benchmarks
/// feed the zone directly; [`run`] feeds it from the API server.
pub struct Dns {
    pub zone: Zone,
    pub reader: ZoneReader,
    pub server: Arc<Server>,
    pub bound: server::Bound,
}

/// Build the zone, handler, forwarder and sockets from `args`.
pub fn build(args: &Args) -> Result<Dns, DnsError> {
    let resolv = match std::fs::read_to_string(&args.resolv_conf) {
        Ok(text) => ResolvConf::parse(&text),
        // Explicit upstreams make the file optional.
        Err(_) if !args.upstreams.is_empty() => ResolvConf::default(),
        Err(source) => {
            return Err(DnsError::ResolvConf {
                path: args.resolv_conf.clone(),
                source,
            });
        }
    };
    let upstreams = if args.upstreams.is_empty() {
        resolv.nameservers
    } else {
        args.upstreams.clone()
    };
    let workers = match args.udp_workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let (zone, reader) = Zone::new(&args.zone, args.ttl)?;
    let soa = zone.names().soa_rdata(args.ttl)?;
    let mut handler = Handler::new(reader.clone(), &zone.names().zone_wire(), &soa, args.ttl);
    handler.set_autopath(!args.no_autopath);
    let metrics = Arc::new(Metrics::new(workers));
    let forwarder = Arc::new(Forwarder::new(
        upstreams,
        Duration::from_millis(args.forward_timeout_ms),
        args.cache_size,
        metrics.clone(),
    ));
    let server = Arc::new(Server::new(
        handler,
        forwarder,
        metrics,
        resolv.search,
        Limits::default(),
    ));
    let bound = Server::bind(args.listen, workers)?;
    Ok(Dns {
        zone,
        reader,
        server,
        bound,
    })
}

/// Serve cluster DNS fed from the API server behind `client`, until `shutdown`.
pub async fn run(
    args: Args,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    let dns = build(&args)?;
    tracing::info!(
        addr = %dns.bound.local_addr(),
        zone = %args.zone,
        upstreams = ?dns.server.forwarder.upstreams(),
        "serving cluster DNS"
    );
    if let Some(addr) = args.metrics {
        serve_metrics(addr, dns.server.metrics.clone(), shutdown.clone()).await?;
    }
    dns.serve_from(client, shutdown).await;
    Ok(())
}

impl Dns {
    /// Answers on the bound sockets, with the zone fed from the API server behind `client`,
    /// until `shutdown`. Callers that bound port 0 learn the address from `bound` first.
    pub async fn serve_from(self, client: kube::Client, shutdown: CancellationToken) {
        let watch = tokio::spawn(watch::run(
            client,
            self.zone,
            shutdown.clone(),
            CancellationToken::new(),
        ));
        self.server.serve(self.bound, shutdown).await;
        let _ = watch.await;
    }
}

/// Serve `/metrics` in the Prometheus text format on `addr` until `shutdown`; returns the
/// bound address (the port picked for port 0).
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, DnsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DnsError::Metrics { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DnsError::Metrics { addr, source })?;
    let registry = Arc::new(metrics.registry());
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                prometheus_client::encoding::text::encode(&mut body, &registry)
                    .map(|()| {
                        let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                        ([(axum::http::header::CONTENT_TYPE, ct)], body)
                    })
                    .map_err(|_| {
                        (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "encoding metrics failed",
                        )
                    })
            }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "DNS metrics server stopped");
        }
    });
    Ok(bound)
}

/// What weir takes from a resolv.conf: `nameserver` and `search` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
}

impl ResolvConf {
    pub fn parse(text: &str) -> ResolvConf {
        let mut rc = ResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                        rc.nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
                // The last search (or domain) line wins, as in glibc.
                Some("search" | "domain") => {
                    rc.search = words.map(str::to_string).collect();
                }
                _ => {}
            }
        }
        rc
    }
}

#[cfg(test)]
mod tests;
