//! Per-Service Prometheus counters, fed from the BPF per-CPU counters of each frontend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::{Router, routing::get};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use weir_lb_common::Counters;

use crate::Syncer;
use crate::model::ServiceRef;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
    pub port: String,
}

/// The load balancer's metrics; cheap to clone (shared counters).
#[derive(Clone)]
pub struct LbMetrics {
    registry: Arc<Registry>,
    connections: Family<ServiceLabels, Counter>,
    packets: Family<ServiceLabels, Counter>,
    refused: Family<ServiceLabels, Counter>,
    last: Arc<Mutex<HashMap<u32, Counters>>>,
}

impl Default for LbMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LbMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weir_lb");
        let (connections, packets, refused) =
            (Family::default(), Family::default(), Family::default());
        registry.register(
            "connections",
            "Connects (TCP, connected UDP) sent to a Service backend",
            connections.clone(),
        );
        registry.register(
            "packets",
            "Unconnected UDP datagrams sent to a Service backend",
            packets.clone(),
        );
        registry.register(
            "refused",
            "Connects and datagrams refused: the Service had no usable endpoint",
            refused.clone(),
        );
        Self {
            registry: Arc::new(registry),
            connections,
            packets,
            refused,
            last: Arc::default(),
        }
    }

    /// Adds what the BPF counters gained since the last call. `names` maps service ids to the
    /// Service they program; a reused id starts again from zero, which `saturating_sub` absorbs.
    pub fn update(&self, syncer: &Syncer, names: &HashMap<u32, Arc<ServiceRef>>) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        for (id, svc) in names {
            let Ok(now) = syncer.maps().counters(*id) else {
                continue;
            };
            let prev = last.insert(*id, now).unwrap_or_default();
            let labels = ServiceLabels {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                port: svc.port.clone(),
            };
            let delta = |n: u64, p: u64| if n >= p { n - p } else { n };
            self.connections
                .get_or_create(&labels)
                .inc_by(delta(now.connections, prev.connections));
            self.packets
                .get_or_create(&labels)
                .inc_by(delta(now.packets, prev.packets));
            self.refused
                .get_or_create(&labels)
                .inc_by(delta(now.refused, prev.refused));
        }
        last.retain(|id, _| names.contains_key(id));
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Serves `GET /metrics` until `shutdown`.
    pub async fn serve(self, listener: tokio::net::TcpListener, shutdown: CancellationToken) {
        let app = Router::new().route("/metrics", get(move || std::future::ready(self.encode())));
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    }
}
