//! Downstream listeners: plain HTTP (HTTP/1.1 and h2c prior knowledge, detected per
//! connection) and TLS (ALPN h2/http1.1, SNI certificates), with header-read and handshake
//! timeouts against slow clients, and graceful shutdown — stop accepting, let in-flight
//! requests finish, close what is left at the deadline. HTTP/1.1 connections start on the
//! fast path ([`crate::h1`]) and move to hyper when a request needs it; h2 connections are
//! hyper's from the start. Also the metrics listener.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::h1;
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, Proxy};

/// Limits applied to downstream connections.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client must send its complete request headers (or TLS handshake) within this.
    pub header_read_timeout: Duration,
    /// How long an idle HTTP/1.1 connection on the fast path waits for its next request.
    pub keepalive_timeout: Duration,
    /// Largest request head; larger ones get 431.
    pub max_header_bytes: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(75),
            max_header_bytes: 32 * 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Accept on `listener` until `shutdown`, then drain. `tls` makes it an HTTPS listener.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        // hyper answers 431 when the request head outgrows its read buffer.
        .max_buf_size(cfg.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let limits = Arc::new(h1::Limits {
        header_read_timeout: cfg.header_read_timeout,
        keepalive_timeout: cfg.keepalive_timeout,
        max_header_bytes: cfg.max_header_bytes,
    });
    let graceful = GracefulShutdown::new();
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let watcher = graceful.watcher();
        let (proxy, builder, tls, limits, shutdown) = (
            proxy.clone(),
            builder.clone(),
            tls.clone(),
            limits.clone(),
            shutdown.clone(),
        );
        let timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match tls {
                None => {
                    // hyper's header timeout starts once the protocol is known; a client that
                    // connects and sends nothing is bounded here.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {
                            let info = Arc::new(ConnInfo::new(peer, false));
                            serve_h1(stream, info, proxy, watcher, &limits, &shutdown, &builder)
                                .await
                        }
                        _ => tracing::debug!(%peer, "connection closed or idle before a request"),
                    }
                }
                Some(acceptor) => {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let info = Arc::new(ConnInfo::new(peer, true));
                            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                                return serve_conn(tls, info, proxy, &builder, watcher).await;
                            }
                            serve_h1(tls, info, proxy, watcher, &limits, &shutdown, &builder).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!(addr = ?local, "ingress listener stopped accepting; draining connections");
    if tokio::time::timeout(cfg.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(addr = ?local, grace = ?cfg.shutdown_grace, "shutdown deadline passed; closing remaining connections");
    }
}

/// An HTTP/1.1 connection: the fast path, then hyper with what the fast path read if a
/// request needs it. The watcher is held throughout, so that shutdown waits for the fast
/// path's in-flight request too.
async fn serve_h1<I>(
    io: I,
    info: Arc<ConnInfo>,
    proxy: Arc<Proxy>,
    watcher: Watcher,
    limits: &h1::Limits,
    shutdown: &CancellationToken,
    builder: &auto::Builder<TokioExecutor>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let h1::Served::Hyper(io, read) = h1::serve(io, &proxy, &info, limits, shutdown).await {
        serve_conn(h1::Rewind::new(io, read), info, proxy, builder, watcher).await
    }
}

async fn serve_conn<I>(
    io: I,
    info: Arc<ConnInfo>,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let svc = service_fn(move |req| proxy.clone().handle(req, info.clone()));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Serve `/metrics` (Prometheus text) and `/healthz` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let stream: TcpStream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (http::StatusCode::OK, metrics.encode()),
                        "/healthz" => (http::StatusCode::OK, "ok\n".to_string()),
                        _ => (
                            http::StatusCode::NOT_FOUND,
                            "try /metrics or /healthz\n".to_string(),
                        ),
                    };
                    Ok::<_, std::convert::Infallible>(crate::proxy::local(status, body))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
