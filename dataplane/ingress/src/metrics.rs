//! Prometheus metrics: requests by route, status and upstream; latency by route; errors by
//! side and kind; routing-table swaps. Served as text on `/metrics` of the metrics listener.
//! Labels hold `Arc<str>`s from the routing table, so counting a request copies no string.

use std::sync::Arc;
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

impl Metrics {
    pub fn request(
        &self,
        route: Option<&Arc<str>>,
        upstream: Option<&Arc<str>>,
        status: u16,
        elapsed: Duration,
    ) {
        let label = |l: Option<&Arc<str>>| {
            l.map(|l| Label(l.clone()))
                .unwrap_or_else(|| self.none.clone())
        };
        let route = label(route);
        self.latency
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                route,
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
        let route: Arc<str> = "ns/i:h/".into();
        let up: Arc<str> = "ns/web:80".into();
        m.request(Some(&route), Some(&up), 200, Duration::from_millis(2));
        m.request(None, None, 404, Duration::from_micros(50));
        m.error(&ProxyError::new(ErrorKind::UpstreamTimeout, "x"));
        let text = m.encode();
        assert!(text.contains(r#"weir_ingress_requests_total{route="ns/i:h/",status="200",upstream="ns/web:80"} 1"#), "{text}");
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
