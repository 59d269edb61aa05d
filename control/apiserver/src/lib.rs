//! weir's Kubernetes-compatible HTTPS API server, as a library the `weir` binary composes.
//!
//! [`Server::bind`] loads (or creates) the cluster's credentials and binds the listener;
//! [`Server::run`] creates the initial objects and serves until the shutdown future
//! resolves. All state lives in the [`weir_store::Store`] given in [`Config`].

mod admit;
mod alloc;
mod cacher;
mod discovery;
pub mod kubeconfig;
mod logs;
mod meta;
mod namespaces;
pub mod pki;
mod rest;
mod table;
mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use weir_api::ApiError;
use weir_store::Store;

pub use alloc::{CidrError, ServiceCidr};
pub use logs::AGENT_ENDPOINT_ANNOTATION;
pub use pki::{Pki, PkiError, User};
pub use rest::MAX_BODY;

/// How to run the API server.
pub struct Config {
    /// Address to listen on (port 0 picks a free port; see [`Server::local_addr`]).
    pub listen: SocketAddr,
    /// Credentials go to `<data_dir>/pki`.
    pub data_dir: PathBuf,
    pub store: Arc<dyn Store>,
    pub service_cidr: ServiceCidr,
    pub node_port_range: RangeInclusive<u16>,
    /// Extra names and addresses for the serving certificate, beyond `localhost`, the
    /// listen address and the in-cluster `kubernetes` names.
    pub extra_sans: Vec<String>,
}

impl Config {
    /// Defaults for a one-machine cluster: loopback 6443, 10.96.0.0/12, 30000–32767.
    pub fn new(data_dir: PathBuf, store: Arc<dyn Store>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
            data_dir,
            store,
            service_cidr: ServiceCidr::default(),
            node_port_range: 30000..=32767,
            extra_sans: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("credentials in {dir}: {source}")]
    Pki { dir: PathBuf, source: PkiError },
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("accepting connections: {0}")]
    Accept(std::io::Error),
}

/// State shared by every request.
pub(crate) struct Shared {
    store: Arc<dyn Store>,
    /// Watch caches, one per watched resource type.
    caches: cacher::Caches,
    alloc: alloc::Allocator,
    pki: Pki,
    listen: SocketAddr,
    /// Cancelled on shutdown: ends watches and background tasks.
    shutdown: CancellationToken,
    /// Namespaces last seen open, and when (see `rest::check_namespace_open`).
    open_namespaces: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Connections to node agents, for `pods/log`.
    agents: logs::AgentClient,
    /// True once the initial objects (namespaces `default`, `kube-system`…, the
    /// `kubernetes` Service) exist; `/readyz` fails until then.
    bootstrapped: tokio::sync::watch::Sender<bool>,
}

/// A bound, not yet serving API server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: TlsAcceptor,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let listen = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
        let mut hosts = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
            config.service_cidr.apiserver_ip().to_string(),
        ];
        let ip = listen.ip();
        if !ip.is_unspecified() && !hosts.contains(&ip.to_string()) {
            hosts.push(ip.to_string());
        }
        hosts.extend(config.extra_sans.iter().cloned());
        let dir = config.data_dir.join("pki");
        let pki_err = |source| ServeError::Pki {
            dir: dir.clone(),
            source,
        };
        let pki = Pki::load_or_create(&dir, &hosts).map_err(pki_err)?;
        let tls = TlsAcceptor::from(Arc::new(pki.server_config().map_err(pki_err)?));
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            caches: cacher::Caches::new(config.store.clone(), shutdown.clone()),
            alloc: alloc::Allocator::new(
                config.store.clone(),
                config.service_cidr,
                config.node_port_range,
            ),
            store: config.store,
            pki,
            listen,
            shutdown,
            open_namespaces: Default::default(),
            agents: logs::agent_client(),
            bootstrapped: tokio::sync::watch::Sender::new(false),
        });
        Ok(Self {
            listener,
            shared,
            tls,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// `https://<addr>`, for kubeconfigs.
    pub fn url(&self) -> String {
        let addr = self.local_addr();
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        format!("https://{host}:{}", addr.port())
    }

    pub fn pki(&self) -> &Pki {
        &self.shared.pki
    }

    /// Turns true once `run` has created the initial objects (namespace `default` among
    /// them), so a kubeconfig handed out after it never meets a missing namespace.
    pub fn bootstrapped(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.bootstrapped.subscribe()
    }

    /// Serve until `shutdown` resolves, then stop accepting, end watches, and give open
    /// requests a few seconds to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let shared = self.shared.clone();
        tokio::spawn(bootstrap_until_done(shared.clone()));
        let app = router(shared.clone());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let tls = self.tls.clone();
            let app = app.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let cert_user = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| pki::user_from_cert(c));
                let svc = app.layer(axum::Extension(PeerCert(cert_user)));
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(
                    TokioIo::new(stream),
                    TowerToHyperService::new(svc),
                );
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
            });
        }
        shared.shutdown.cancel();
        drop(self.listener);
        if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("open connections did not finish within 5s of shutdown");
        }
        Ok(())
    }
}

/// Create the initial objects, retrying while the store is unreachable.
async fn bootstrap_until_done(shared: Arc<Shared>) {
    let mut delay = Duration::from_millis(200);
    loop {
        match namespaces::bootstrap(&shared).await {
            Ok(()) => {
                shared.bootstrapped.send_replace(true);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "creating the initial objects; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The user of a verified client certificate on this connection, if any.
#[derive(Clone)]
struct PeerCert(Option<User>);

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/version", get(discovery::version))
        .route("/api", get(discovery::core_group))
        .route("/api/v1", get(discovery::core_v1))
        .route("/apis", get(discovery::groups))
        .route("/apis/{group}", get(discovery::group))
        .route("/apis/{group}/{version}", get(discovery::group_version))
        .route("/openapi/v3", get(discovery::openapi_v3_root))
        .route("/openapi/v3/{*path}", get(discovery::openapi_v3_gv))
        .fallback(rest::handle)
        .layer(middleware::from_fn_with_state(shared.clone(), authenticate))
        .with_state(shared)
}

/// Probes and `/version` are open, as kube-apiserver allows them to anonymous users;
/// everything else needs a token from the token file or a client certificate of the CA.
async fn authenticate(State(api): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let public = matches!(path, "/healthz" | "/livez" | "/readyz" | "/version");
    let by_token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| api.pki.user_for_token(t.trim()))
        .is_some();
    let by_cert = req
        .extensions()
        .get::<PeerCert>()
        .is_some_and(|p| p.0.is_some());
    if public || by_token || by_cert {
        next.run(req).await
    } else {
        rest::Failure(ApiError::unauthorized()).into_response()
    }
}

async fn healthz() -> Response {
    (StatusCode::OK, "ok").into_response()
}

/// Ready when the initial objects exist and the store answers within a second.
async fn readyz(State(api): State<Arc<Shared>>) -> Response {
    if !*api.bootstrapped.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "[-]poststarthook/bootstrap-controller failed: the initial namespaces are not created yet\nreadyz check failed",
        )
            .into_response();
    }
    match tokio::time::timeout(Duration::from_secs(1), api.store.current_revision()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok").into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("[-]etcd failed: {e}\nreadyz check failed"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "[-]etcd failed: no answer within 1s\nreadyz check failed",
        )
            .into_response(),
    }
}
