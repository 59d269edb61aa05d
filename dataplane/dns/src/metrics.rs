//! Prometheus metrics of the DNS server. Query counters are sharded per UDP worker (one cache
//! line each, relaxed atomics) so counting costs the hot path no contention; a custom
//! collector sums the shards at scrape time. Forwarding metrics use prometheus-client types.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::wire::{self, Rcode};

const TYPES: [(u16, &str); 10] = [
    (wire::TYPE_A, "A"),
    (wire::TYPE_AAAA, "AAAA"),
    (wire::TYPE_SRV, "SRV"),
    (wire::TYPE_PTR, "PTR"),
    (wire::TYPE_CNAME, "CNAME"),
    (wire::TYPE_TXT, "TXT"),
    (wire::TYPE_SOA, "SOA"),
    (wire::TYPE_NS, "NS"),
    (wire::TYPE_MX, "MX"),
    (wire::TYPE_ANY, "ANY"),
];
const OTHER_TYPE: usize = TYPES.len();
const RCODES: [(Rcode, &str); 7] = [
    (Rcode::NoError, "NOERROR"),
    (Rcode::FormErr, "FORMERR"),
    (Rcode::ServFail, "SERVFAIL"),
    (Rcode::NxDomain, "NXDOMAIN"),
    (Rcode::NotImp, "NOTIMP"),
    (Rcode::Refused, "REFUSED"),
    (Rcode::BadVers, "BADVERS"),
];

#[repr(align(128))]
#[derive(Debug)]
struct Shard {
    queries: [[AtomicU64; RCODES.len()]; TYPES.len() + 1],
    dropped: AtomicU64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            queries: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            dropped: AtomicU64::new(0),
        }
    }
}

/// All metrics of one DNS server.
#[derive(Debug)]
pub struct Metrics {
    shards: Box<[Shard]>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Queries that joined an identical query already in flight upstream.
    pub coalesced: Counter,
    pub forward_errors: Counter,
    /// Seconds from sending a query upstream to its answer.
    pub forward_latency: Histogram,
}

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            coalesced: Counter::default(),
            forward_errors: Counter::default(),
            forward_latency: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
        }
    }

    /// Count one answered query on `shard` (taken modulo the shard count).
    pub fn query(&self, shard: usize, qtype: u16, rcode: Rcode) {
        let t = TYPES
            .iter()
            .position(|(t, _)| *t == qtype)
            .unwrap_or(OTHER_TYPE);
        let r = RCODES
            .iter()
            .position(|(r, _)| *r == rcode)
            .unwrap_or_default();
        self.shards[shard % self.shards.len()].queries[t][r].fetch_add(1, Ordering::Relaxed);
    }

    /// Count a message that got no answer (not a query, or over a limit).
    pub fn dropped(&self, shard: usize) {
        self.shards[shard % self.shards.len()]
            .dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The total of one counter cell across shards (tests and the benchmark read this).
    pub fn queries_total(&self, qtype: u16, rcode: Rcode) -> u64 {
        let t = TYPES
            .iter()
            .position(|(t, _)| *t == qtype)
            .unwrap_or(OTHER_TYPE);
        let r = RCODES
            .iter()
            .position(|(r, _)| *r == rcode)
            .unwrap_or_default();
        self.shards
            .iter()
            .map(|s| s.queries[t][r].load(Ordering::Relaxed))
            .sum()
    }

    /// A registry with every metric of this server, prefixed `weir_dns_`.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut reg = Registry::with_prefix("weir_dns");
        reg.register(
            "cache_hits",
            "Forwarded queries answered from the cache",
            self.cache_hits.clone(),
        );
        reg.register(
            "cache_misses",
            "Forwarded queries not found in the cache",
            self.cache_misses.clone(),
        );
        reg.register(
            "coalesced",
            "Queries that joined an identical upstream query in flight",
            self.coalesced.clone(),
        );
        reg.register(
            "forward_errors",
            "Upstream queries that failed or timed out",
            self.forward_errors.clone(),
        );
        reg.register(
            "forward_latency_seconds",
            "Upstream query latency",
            self.forward_latency.clone(),
        );
        reg.register_collector(Box::new(QueryCollector(self.clone())));
        reg
    }
}

#[derive(Debug)]
struct QueryCollector(Arc<Metrics>);

impl Collector for QueryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "queries",
            "DNS queries answered, by query type and response code",
            None,
            MetricType::Counter,
        )?;
        for t in 0..=OTHER_TYPE {
            let tname = TYPES.get(t).map_or("other", |(_, n)| *n);
            for (r, (_, rname)) in RCODES.iter().enumerate() {
                let v: u64 = self
                    .0
                    .shards
                    .iter()
                    .map(|s| s.queries[t][r].load(Ordering::Relaxed))
                    .sum();
                if v == 0 {
                    continue;
                }
                let labels = [("type", tname), ("rcode", *rname)];
                let c = Counter::<u64>::default();
                c.inc_by(v);
                c.encode(family.encode_family(&labels)?)?;
            }
        }
        let dropped: u64 = self
            .0
            .shards
            .iter()
            .map(|s| s.dropped.load(Ordering::Relaxed))
            .sum();
        let c = Counter::<u64>::default();
        c.inc_by(dropped);
        c.encode(encoder.encode_descriptor(
            "dropped",
            "Messages dropped without an answer",
            None,
            MetricType::Counter,
        )?)
    }
}
