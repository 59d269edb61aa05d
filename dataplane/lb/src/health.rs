//! kube-proxy's service health server (`pkg/proxy/healthcheck/service_health.go`): every
//! `type: LoadBalancer` Service with `externalTrafficPolicy: Local` gets an HTTP listener on
//! its `spec.healthCheckNodePort` at each node address, answering any path with 200 while this
//! node has a ready endpoint of the Service and 503 otherwise, so a cloud load balancer sends
//! the Service's traffic only to nodes that serve it locally (the tc path keeps only local
//! endpoints for such Services).
//!
//! [`health_checks`] derives what to serve from the watch snapshot (pure); [`HealthServer`]
//! opens and closes the listeners to match and holds the counts the handlers read.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio_util::sync::CancellationToken;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service's (namespace, name).
pub type ServiceName = (String, String);

/// What one Service's health check serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// Ready endpoints of the Service on this node, counted by IP as kube-proxy does (an
    /// endpoint serving two ports is one).
    pub local_endpoints: usize,
}

/// The health checks this node serves: one per `type: LoadBalancer`,
/// `externalTrafficPolicy: Local` Service with a `healthCheckNodePort`. An endpoint is local
/// when its `nodeName` is `node_name`, the same test the load balancer's maps use.
pub fn health_checks(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    node_name: Option<&str>,
) -> BTreeMap<ServiceName, HealthCheck> {
    let mut out: BTreeMap<ServiceName, HealthCheck> = services
        .iter()
        .map(Borrow::borrow)
        .filter_map(|svc| {
            let spec = svc.spec.as_ref()?;
            if spec.type_.as_deref() != Some("LoadBalancer")
                || spec.external_traffic_policy.as_deref() != Some("Local")
            {
                return None;
            }
            let port = u16::try_from(spec.health_check_node_port?)
                .ok()
                .filter(|p| *p != 0)?;
            let name = (
                svc.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                svc.metadata.name.clone()?,
            );
            Some((
                name,
                HealthCheck {
                    port,
                    local_endpoints: 0,
                },
            ))
        })
        .collect();
    if out.is_empty() {
        return out;
    }
    let mut local_ips: HashMap<ServiceName, HashSet<&str>> = HashMap::new();
    for slice in slices.iter().map(Borrow::borrow) {
        // kube-proxy builds its endpoints from slice ports: a slice without any serves nothing.
        if slice.address_type != "IPv4" || slice.ports.as_ref().is_none_or(Vec::is_empty) {
            continue;
        }
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
        let key = (ns.to_string(), svc.clone());
        if !out.contains_key(&key) {
            continue;
        }
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            // API contract: an unset `ready` means ready. Only terminating endpoints on the
            // node still fail the check, as in kube-proxy.
            let ready = cond.and_then(|c| c.ready).unwrap_or(true)
                && !cond.and_then(|c| c.terminating).unwrap_or(false);
            if ready && ep.node_name.as_deref() == node_name {
                let ips = local_ips.entry(key.clone()).or_default();
                ips.extend(ep.addresses.iter().map(String::as_str));
            }
        }
    }
    for (key, ips) in local_ips {
        if let Some(hc) = out.get_mut(&key) {
            hc.local_endpoints = ips.len();
        }
    }
    out
}

/// What the handlers read.
#[derive(Default)]
struct Shared {
    /// Each open port's Service and its local endpoint count.
    served: Mutex<HashMap<u16, (Arc<ServiceName>, usize)>>,
    /// kube-proxy's `serviceProxyHealthy`: here, whether the last sync wrote the maps.
    proxy_healthy: AtomicBool,
}

/// The listeners of one port, at every node address.
struct Listening {
    service: ServiceName,
    stop: CancellationToken,
}

/// The listeners of the health checks, kept equal to the desired ones.
pub struct HealthServer {
    addrs: Vec<IpAddr>,
    shared: Arc<Shared>,
    want: BTreeMap<ServiceName, HealthCheck>,
    /// By port, not Service: listeners close asynchronously, so a port that moves from one
    /// Service to another in one sync keeps its listener instead of failing to bind again.
    open: HashMap<u16, Listening>,
    shutdown: CancellationToken,
}

impl HealthServer {
    /// Listens on each of `node_ips` (kube-proxy's `--nodeport-addresses`), or on every
    /// address when there are none; every listener closes on `shutdown`.
    pub fn new(node_ips: &[Ipv4Addr], shutdown: CancellationToken) -> Self {
        let addrs = if node_ips.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            node_ips.iter().map(|ip| IpAddr::V4(*ip)).collect()
        };
        let shared = Arc::new(Shared::default());
        shared.proxy_healthy.store(true, Ordering::Relaxed);
        Self {
            addrs,
            shared,
            want: BTreeMap::new(),
            open: HashMap::new(),
            shutdown,
        }
    }

    /// Serves exactly `want`. Must run inside a tokio runtime (listeners are spawned on it).
    pub fn sync_all(&mut self, want: BTreeMap<ServiceName, HealthCheck>) {
        self.want = want;
        self.reconcile();
    }

    /// Serves `want` for the Services in `touched` (those missing from `want` stop being
    /// served); the others keep theirs.
    pub fn sync_some(
        &mut self,
        touched: &HashSet<ServiceName>,
        mut want: BTreeMap<ServiceName, HealthCheck>,
    ) {
        for name in touched {
            match want.remove(name) {
                Some(hc) => self.want.insert(name.clone(), hc),
                None => self.want.remove(name),
            };
        }
        self.reconcile();
    }

    /// Whether the load balancer is in step (`serviceProxyHealthy`); when it is not, every
    /// health check answers 503, as kube-proxy's do while its own health check fails.
    pub fn set_proxy_healthy(&self, healthy: bool) {
        self.shared.proxy_healthy.store(healthy, Ordering::Relaxed);
    }

    /// Closes listeners of ports no longer wanted, publishes what each port answers, and
    /// opens missing ones, which retries those that could not be bound before.
    fn reconcile(&mut self) {
        let mut by_port: BTreeMap<u16, (&ServiceName, usize)> = BTreeMap::new();
        for (name, hc) in &self.want {
            // The API server gives a port to one Service only; should two still ask for it,
            // the first keeps it, as kube-proxy's second bind would fail.
            if let Some((first, _)) = by_port.get(&hc.port) {
                tracing::warn!(service = %show(name), port = hc.port, other = %show(first), "health check port claimed twice");
                continue;
            }
            by_port.insert(hc.port, (name, hc.local_endpoints));
        }
        self.open.retain(|port, l| {
            let keep = by_port.contains_key(port);
            if !keep {
                tracing::info!(service = %show(&l.service), port, "closing health check");
                l.stop.cancel();
            }
            keep
        });
        if let Ok(mut served) = self.shared.served.lock() {
            *served = by_port
                .iter()
                .map(|(port, (name, count))| (*port, (Arc::new((*name).clone()), *count)))
                .collect();
        }
        for (&port, (name, _)) in &by_port {
            if let Some(l) = self.open.get_mut(&port) {
                l.service.clone_from(name);
                continue;
            }
            match self.listen(port) {
                Ok(stop) => {
                    tracing::info!(service = %show(name), port, "serving health check");
                    let service = (*name).clone();
                    self.open.insert(port, Listening { service, stop });
                }
                Err(e) => tracing::warn!(
                    service = %show(name),
                    port,
                    error = %e,
                    "could not open health check port; retrying on the next change"
                ),
            }
        }
    }

    /// Binds `port` on every address (all or none) and serves whichever Service has it.
    fn listen(&self, port: u16) -> std::io::Result<CancellationToken> {
        let listeners = self
            .addrs
            .iter()
            .map(|ip| {
                let addr = SocketAddr::new(*ip, port);
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let stop = self.shutdown.child_token();
        let app = Router::new()
            .fallback(answer)
            .with_state((self.shared.clone(), port));
        for listener in listeners {
            tokio::spawn(serve(listener, app.clone(), stop.clone()));
        }
        Ok(stop)
    }
}

/// The health checks end with their server: a load balancer whose watch failed must not
/// keep answering 200 from counts nobody updates.
impl Drop for HealthServer {
    fn drop(&mut self) {
        for l in self.open.values() {
            l.stop.cancel();
        }
    }
}

fn show((namespace, name): &ServiceName) -> String {
    format!("{namespace}/{name}")
}

/// Serves HTTP/1.1 (kube-proxy's Go server speaks no cleartext HTTP/2) on `listener` until
/// `stop`, which also drops every open connection, as kube-proxy's `http.Server.Close` does:
/// a closed health check leaves no task or socket behind, however its clients behave.
async fn serve(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: retrying at once would spin.
                    tracing::warn!(error = %e, "health check accept failed");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        // A client that sends no complete request head for 30 s (an idle keep-alive one too)
        // is dropped, so clients that stall cannot pile up sockets while the check is open.
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                done = conn => if let Err(e) = done {
                    tracing::debug!(error = %e, "health check connection ended");
                },
            }
        });
    }
}

/// The reply kube-proxy gives, byte for byte in the body.
async fn answer(State((shared, port)): State<(Arc<Shared>, u16)>) -> Response {
    let served = shared
        .served
        .lock()
        .ok()
        .and_then(|s| s.get(&port).cloned());
    // The port is closing; kube-proxy answers nothing here either.
    let Some((name, count)) = served else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let healthy = shared.proxy_healthy.load(Ordering::Relaxed);
    let status = if count != 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body(&name.0, &name.1, count, healthy),
    )
        .into_response()
}

/// kube-proxy's body: tab-indented, no trailing newline. Namespaces and names are DNS labels,
/// so `{:?}` quotes them exactly as Go's `%q` does.
fn body(namespace: &str, name: &str, count: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {namespace:?},\n\t\t\"name\": {name:?}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
    )
}

#[cfg(test)]
mod tests;
