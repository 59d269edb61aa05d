//! Prometheus metrics: requests by route, status and upstream; latency by route; errors by
//! side and kind; routing-table swaps. Served as text on `/metrics` of the metrics listener.
//! Labels hold `Arc<str>`s from the routing table, so counting a request copies no string,
//! and each worker keeps the series it counts into resolved ([`SeriesCache`]), so a request
//! takes no family lookup (a shared lock and a hash of the label strings) on its way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ProxyError;

/// A label value shared with the routing table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label(pub Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Label,
    status: u16,
    upstream: Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    side: &'static str,
    kind: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The proxy's metrics and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    errors: Family<ErrorLabels, Counter>,
    pub swaps: Counter,
    pub routes: Gauge,
    none: Label,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weir_ingress");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let errors = Family::<ErrorLabels, Counter>::default();
        let swaps = Counter::default();
        let routes = Gauge::default();
        registry.register(
            "requests",
            "Requests by route, status and upstream Service port",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency to response headers, by route",
            latency.clone(),
        );
        registry.register(
            "errors",
            "Failed requests by side (upstream, downstream, internal) and kind",
            errors.clone(),
        );
        registry.register(
            "table_swaps",
            "Routing table rebuilds swapped in",
            swaps.clone(),
        );
        registry.register(
            "routes",
            "Path rules in the current routing table",
            routes.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            errors,
            swaps,
            routes,
            none: Label("".into()),
        }
    }
}

/// Above this many cached series a worker starts over: entries of replaced routing tables
/// are not otherwise removed.
const MAX_CACHED_SERIES: usize = 4096;

/// One worker's resolved series, keyed by the addresses of the route and upstream label
/// strings of the routing table. Only its own worker locks it, so the lock is uncontended.
#[derive(Default)]
pub struct SeriesCache(Mutex<HashMap<(usize, usize), Series>>);

struct Series {
    /// Held so that the strings whose addresses key this entry are not freed (and their
    /// addresses reused by other labels) while it is cached.
    _labels: (Arc<str>, Arc<str>),
    latency: Histogram,
    /// Status 200, the common case; created on the first one, so no series is exposed
    /// for a status a route never answered with.
    ok: Option<Counter>,
}

impl Metrics {
    /// Count a request and its latency, through `cache` when it was routed.
    pub fn request(
        &self,
        cache: &SeriesCache,
        route: Option<&Arc<str>>,
        upstream: Option<&Arc<str>>,
        status: u16,
        elapsed: Duration,
    ) {
        if let (Some(r), Some(u)) = (route, upstream)
            && let Ok(mut map) = cache.0.lock()
        {
            let key = (
                Arc::as_ptr(r).cast::<u8>() as usize,
                Arc::as_ptr(u).cast::<u8>() as usize,
            );
            if map.len() >= MAX_CACHED_SERIES && !map.contains_key(&key) {
                map.clear();
            }
            let series = map.entry(key).or_insert_with(|| Series {
                _labels: (r.clone(), u.clone()),
                latency: self.latency.get_or_create_owned(&RouteLabels {
                    route: Label(r.clone()),
                }),
                ok: None,
            });
            series.latency.observe(elapsed.as_secs_f64());
            if status == 200 {
                series
                    .ok
                    .get_or_insert_with(|| {
                        self.requests.get_or_create_owned(&RequestLabels {
                            route: Label(r.clone()),
                            status,
                            upstream: Label(u.clone()),
                        })
                    })
                    .inc();
            } else {
                self.count(route, upstream, status);
            }
            return;
        }
        let label = |l: Option<&Arc<str>>| {
            l.map(|l| Label(l.clone()))
                .unwrap_or_else(|| self.none.clone())
        };
        self.latency
            .get_or_create(&RouteLabels {
                route: label(route),
            })
            .observe(elapsed.as_secs_f64());
        self.count(route, upstream, status);
    }

    fn count(&self, route: Option<&Arc<str>>, upstream: Option<&Arc<str>>, status: u16) {
        let label = |l: Option<&Arc<str>>| {
            l.map(|l| Label(l.clone()))
                .unwrap_or_else(|| self.none.clone())
        };
        self.requests
            .get_or_create(&RequestLabels {
                route: label(route),
                status,
                upstream: label(upstream),
            })
            .inc();
    }

    pub fn error(&self, e: &ProxyError) {
        self.errors
            .get_or_create(&ErrorLabels {
                side: e.side().as_str(),
                kind: e.kind.as_str(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn encodes_requests_and_errors() {
        let m = Metrics::default();
        let cache = SeriesCache::default();
        let route: Arc<str> = "ns/i:h/".into();
        let up: Arc<str> = "ns/web:80".into();
        m.request(
            &cache,
            Some(&route),
            Some(&up),
            200,
            Duration::from_millis(2),
        );
        m.request(
            &cache,
            Some(&route),
            Some(&up),
            200,
            Duration::from_millis(3),
        );
        m.request(
            &cache,
            Some(&route),
            Some(&up),
            503,
            Duration::from_millis(1),
        );
        // A rebuilt table's equal strings count into the same series.
        let route2: Arc<str> = "ns/i:h/".into();
        let up2: Arc<str> = "ns/web:80".into();
        m.request(
            &cache,
            Some(&route2),
            Some(&up2),
            200,
            Duration::from_millis(1),
        );
        m.request(&cache, None, None, 404, Duration::from_micros(50));
        m.error(&ProxyError::new(ErrorKind::UpstreamTimeout, "x"));
        let text = m.encode();
        assert!(text.contains(r#"weir_ingress_requests_total{route="ns/i:h/",status="200",upstream="ns/web:80"} 3"#), "{text}");
        assert!(text.contains(r#"weir_ingress_requests_total{route="ns/i:h/",status="503",upstream="ns/web:80"} 1"#), "{text}");
        assert!(
            text.contains(r#"weir_ingress_request_duration_seconds_count{route="ns/i:h/"} 4"#),
            "{text}"
        );
        assert!(text.contains(r#"status="404""#));
        assert!(
            text.contains(
                r#"weir_ingress_errors_total{side="upstream",kind="upstream timed out"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("weir_ingress_request_duration_seconds_bucket"));
    }
}
