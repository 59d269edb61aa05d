//! Endpoint selection for one Service port: least outstanding requests over two random
//! choices (the default) or round-robin, with passive health — an endpoint is ejected after
//! consecutive connect failures and tried again once its ejection has expired.
//!
//! Endpoint state (outstanding requests, failures, ejection) lives in `Arc<Endpoint>`s that
//! the table builder reuses across routing-table swaps, so a change elsewhere in the cluster
//! neither forgets an ejection nor resets the load counts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::uri::Authority;

/// How endpoints are chosen; set per Ingress with the `load-balance` annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Balance {
    /// Least outstanding requests of two endpoints picked at random.
    #[default]
    LeastRequest,
    RoundRobin,
}

/// When to eject an endpoint and for how long.
#[derive(Debug, Clone, Copy)]
pub struct EjectPolicy {
    /// Consecutive connect failures that eject an endpoint.
    pub failures: u32,
    /// How long an ejected endpoint is skipped.
    pub duration: Duration,
}

impl Default for EjectPolicy {
    fn default() -> Self {
        EjectPolicy {
            failures: 3,
            duration: Duration::from_secs(10),
        }
    }
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds since the first call; the clock that ejections are measured on.
pub fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// One ready endpoint address of a Service port.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `ip:port`, prebuilt so that forwarding never formats it.
    pub authority: Authority,
    outstanding: AtomicU32,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        // A SocketAddr always renders as a valid authority.
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid"));
        Endpoint {
            addr,
            authority,
            outstanding: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Record a connect failure; returns true if this one ejected the endpoint.
    pub fn connect_failed(&self, policy: &EjectPolicy, now_ms: u64) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= policy.failures {
            self.failures.store(0, Ordering::Relaxed);
            let until = now_ms + policy.duration.as_millis() as u64;
            self.ejected_until_ms.store(until, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Record a successful exchange: the failure streak is over.
    pub fn succeeded(&self) {
        // Read first so the common path does not dirty a shared cache line.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}

/// Counts a request against an endpoint's outstanding requests until dropped (at the end of
/// the response body, or when the exchange fails).
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(endpoint)
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The Service port a backend's endpoints come from, kept so that an EndpointSlice change
/// can recompute just those endpoints.
#[derive(Debug, Clone)]
pub struct Origin {
    pub namespace: String,
    pub service: String,
    pub port: k8s_openapi::api::core::v1::ServicePort,
}

/// The endpoints of one Service port and how to choose among them.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/service:port`, the `upstream` label of metrics and the access log.
    pub name: Arc<str>,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Speak HTTP/2 to the endpoints (the Service port's appProtocol says h2c or grpc).
    pub h2: bool,
    pub balance: Balance,
    /// `None` when the Service or its port does not exist (no endpoints, whatever the slices).
    pub origin: Option<Origin>,
    next: AtomicUsize,
}

impl Backend {
    pub fn new(
        name: Arc<str>,
        endpoints: Vec<Arc<Endpoint>>,
        h2: bool,
        balance: Balance,
        origin: Option<Origin>,
    ) -> Self {
        Backend {
            name,
            endpoints,
            h2,
            balance,
            origin,
            next: AtomicUsize::new(0),
        }
    }

    /// Choose an endpoint, skipping `tried` and ejected ones. When every untried endpoint is
    /// ejected the ejections are ignored (as Envoy's panic threshold does): a possibly-down
    /// endpoint beats a certain 503.
    pub fn pick(&self, tried: &[SocketAddr], now_ms: u64) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let usable = |e: &Arc<Endpoint>| !tried.contains(&e.addr) && !e.is_ejected(now_ms);
        let picked = match self.balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.endpoints[(start + i) % n])
                    .find(|e| usable(e))
            }
            Balance::LeastRequest => {
                let a = &self.endpoints[rand::random_range(0..n)];
                let b = &self.endpoints[rand::random_range(0..n)];
                match (usable(a), usable(b)) {
                    (true, true) if b.outstanding() < a.outstanding() => Some(b),
                    (true, _) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => {
                        let start = rand::random_range(0..n);
                        (0..n)
                            .map(|i| &self.endpoints[(start + i) % n])
                            .find(|e| usable(e))
                    }
                }
            }
        };
        picked.or_else(|| self.endpoints.iter().find(|e| !tried.contains(&e.addr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(n: u16, balance: Balance) -> Backend {
        let eps = (0..n)
            .map(|i| Arc::new(Endpoint::new(SocketAddr::from(([10, 0, 0, 1], 8000 + i)))))
            .collect();
        Backend::new("ns/svc:80".into(), eps, false, balance, None)
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let b = backend(3, Balance::RoundRobin);
        let ports: Vec<u16> = (0..6)
            .filter_map(|_| b.pick(&[], 0))
            .map(|e| e.addr.port())
            .collect();
        assert_eq!(ports, [8000, 8001, 8002, 8000, 8001, 8002]);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let b = backend(2, Balance::LeastRequest);
        let _busy: Vec<InFlight> = (0..5)
            .map(|_| InFlight::new(b.endpoints[0].clone()))
            .collect();
        // Whenever the two random choices differ, the idle one wins; over many picks the busy
        // endpoint can only be chosen when both choices landed on it.
        let idle = (0..400)
            .filter(|_| b.pick(&[], 0).map(|e| e.addr.port()) == Some(8001))
            .count();
        assert!(idle > 250, "idle endpoint chosen {idle}/400 times");
    }

    #[test]
    fn in_flight_guard_counts_until_dropped() {
        let b = backend(1, Balance::LeastRequest);
        let g = InFlight::new(b.endpoints[0].clone());
        assert_eq!(b.endpoints[0].outstanding(), 1);
        drop(g);
        assert_eq!(b.endpoints[0].outstanding(), 0);
    }

    #[test]
    fn consecutive_connect_failures_eject_until_expiry() {
        let policy = EjectPolicy {
            failures: 2,
            duration: Duration::from_millis(1000),
        };
        let b = backend(2, Balance::RoundRobin);
        let bad = &b.endpoints[0];
        assert!(!bad.connect_failed(&policy, 100));
        assert!(bad.connect_failed(&policy, 100));
        assert!(bad.is_ejected(500));
        for _ in 0..4 {
            assert_eq!(b.pick(&[], 500).map(|e| e.addr.port()), Some(8001));
        }
        // Back in rotation once the ejection has expired.
        assert!(!bad.is_ejected(1100));
        let ports: Vec<u16> = (0..2)
            .filter_map(|_| b.pick(&[], 1100))
            .map(|e| e.addr.port())
            .collect();
        assert!(ports.contains(&8000));
    }

    #[test]
    fn success_resets_the_failure_streak() {
        let policy = EjectPolicy {
            failures: 2,
            duration: Duration::from_secs(1),
        };
        let e = Endpoint::new(SocketAddr::from(([10, 0, 0, 1], 1)));
        assert!(!e.connect_failed(&policy, 0));
        e.succeeded();
        assert!(!e.connect_failed(&policy, 0));
        assert!(!e.is_ejected(0));
    }

    #[test]
    fn retries_skip_tried_endpoints_and_all_ejected_falls_back() {
        let policy = EjectPolicy {
            failures: 1,
            duration: Duration::from_secs(60),
        };
        let b = backend(2, Balance::LeastRequest);
        let first = b.endpoints[0].addr;
        for _ in 0..20 {
            assert_eq!(
                b.pick(&[first], 0).map(|e| e.addr),
                Some(b.endpoints[1].addr)
            );
        }
        assert!(b.pick(&[first, b.endpoints[1].addr], 0).is_none());
        for e in &b.endpoints {
            e.connect_failed(&policy, 0);
        }
        assert!(
            b.pick(&[], 10).is_some(),
            "all ejected still yields an endpoint"
        );
    }
}
