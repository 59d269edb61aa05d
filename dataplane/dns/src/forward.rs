//! Forwarding of names outside the cluster zone to upstream resolvers: a positive and
//! negative cache (TTLs from the answers and the SOA, RFC 2308), coalescing of identical
//! queries in flight into one upstream query, and a hard time bound after which the answer
//! is SERVFAIL. Upstream messages are parsed and built with hickory-proto.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::metrics::Metrics;

/// Upper bounds on cached TTLs (CoreDNS's cache plugin defaults).
const MAX_POSITIVE_TTL: u32 = 3600;
const MAX_NEGATIVE_TTL: u32 = 1800;
/// Negative answers without an SOA to take a TTL from.
const DEFAULT_NEGATIVE_TTL: u32 = 30;

/// An upstream's answer, as cached and as handed to the server.
#[derive(Clone, Debug)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
}

impl Answer {
    pub fn servfail() -> Answer {
        Answer {
            rcode: ResponseCode::ServFail,
            answers: Vec::new(),
            authorities: Vec::new(),
        }
    }

    /// How long this answer may be cached, or `None` if it must not be.
    fn cache_ttl(&self) -> Option<u32> {
        let soa_ttl = || {
            self.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
        };
        match self.rcode {
            ResponseCode::NoError if !self.answers.is_empty() => self
                .answers
                .iter()
                .map(|r| r.ttl)
                .min()
                .map(|t| t.min(MAX_POSITIVE_TTL)),
            ResponseCode::NoError | ResponseCode::NXDomain => Some(
                soa_ttl()
                    .unwrap_or(DEFAULT_NEGATIVE_TTL)
                    .min(MAX_NEGATIVE_TTL),
            ),
            _ => None,
        }
    }

    fn aged(&self, secs: u32) -> Answer {
        let mut a = self.clone();
        for r in a.answers.iter_mut().chain(a.authorities.iter_mut()) {
            r.ttl = r.ttl.saturating_sub(secs);
        }
        a
    }
}

type Key = (Name, RecordType);
type InFlight = Shared<BoxFuture<'static, Arc<Answer>>>;

struct Cached {
    answer: Arc<Answer>,
    stored: Instant,
    expires: Instant,
}

/// The forwarder: upstreams, cache and in-flight table.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    cache_size: usize,
    cache: Mutex<HashMap<Key, Cached>>,
    inflight: Mutex<HashMap<Key, InFlight>>,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    /// `timeout` bounds the whole upstream exchange, across all upstreams.
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        cache_size: usize,
        metrics: Arc<Metrics>,
    ) -> Forwarder {
        Forwarder {
            upstreams,
            timeout,
            cache_size,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Resolve `name`/`qtype` upstream, from the cache when possible. Never fails: upstream
    /// trouble is a SERVFAIL answer, within the configured timeout.
    pub async fn resolve(self: &Arc<Self>, name: &Name, qtype: RecordType) -> Arc<Answer> {
        let key = (name.to_lowercase(), qtype);
        if let Some(hit) = self.cached(&key) {
            self.metrics.cache_hits.inc();
            return hit;
        }
        self.metrics.cache_misses.inc();
        let fut = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = inflight.get(&key) {
                self.metrics.coalesced.inc();
                f.clone()
            } else {
                let this = self.clone();
                let k = key.clone();
                // A task of its own, so the upstream query completes (and fills the cache)
                // even if the client that started it goes away.
                let task = tokio::spawn(async move {
                    let answer = Arc::new(this.exchange(&k.0, k.1).await);
                    this.store(k.clone(), answer.clone());
                    this.inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&k);
                    answer
                });
                let f = task
                    .map(|r| r.unwrap_or_else(|_| Arc::new(Answer::servfail())))
                    .boxed()
                    .shared();
                inflight.insert(key, f.clone());
                f
            }
        };
        fut.await
    }

    fn cached(&self, key: &Key) -> Option<Arc<Answer>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let c = cache.get(key)?;
        let now = Instant::now();
        if now >= c.expires {
            return None;
        }
        let age = now.duration_since(c.stored).as_secs() as u32;
        Some(if age == 0 {
            c.answer.clone()
        } else {
            Arc::new(c.answer.aged(age))
        })
    }

    fn store(&self, key: Key, answer: Arc<Answer>) {
        let Some(ttl) = answer.cache_ttl().filter(|t| *t > 0) else {
            return;
        };
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.cache_size {
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= self.cache_size {
                return;
            }
        }
        cache.insert(
            key,
            Cached {
                answer,
                stored: now,
                expires: now + Duration::from_secs(ttl.into()),
            },
        );
    }

    /// Ask each upstream in turn, each with an equal share of the timeout.
    async fn exchange(&self, name: &Name, qtype: RecordType) -> Answer {
        if self.upstreams.is_empty() {
            return Answer::servfail();
        }
        let share = self.timeout / self.upstreams.len() as u32;
        for upstream in &self.upstreams {
            let started = Instant::now();
            let result = tokio::time::timeout(share, exchange_one(*upstream, name, qtype)).await;
            match result {
                Ok(Ok(msg)) => {
                    self.metrics
                        .forward_latency
                        .observe(started.elapsed().as_secs_f64());
                    return Answer {
                        rcode: msg.metadata.response_code,
                        answers: msg.answers,
                        authorities: msg.authorities,
                    };
                }
                Ok(Err(e)) => {
                    self.metrics.forward_errors.inc();
                    tracing::debug!(%upstream, %name, error = %e, "upstream query failed");
                }
                Err(_) => {
                    self.metrics.forward_errors.inc();
                    tracing::debug!(%upstream, %name, "upstream query timed out");
                }
            }
        }
        Answer::servfail()
    }
}

/// Why one upstream exchange failed.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("i/o with upstream: {0}")]
    Io(#[from] std::io::Error),
    #[error("building the query: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
    #[error("upstream response over TCP is not DNS: {0}")]
    Decode(#[from] hickory_proto::serialize::binary::DecodeError),
}

async fn exchange_one(
    upstream: SocketAddr,
    name: &Name,
    qtype: RecordType,
) -> Result<Message, ExchangeError> {
    let id: u16 = rand::random();
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name.clone(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(crate::wire::EDNS_UDP_MAX);
    query.set_edns(edns);
    let bytes = query.to_vec()?;

    let local: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(&bytes).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Anything that is not the answer to this question (spoofing attempts, stale
        // answers) is ignored; the caller's timeout bounds the wait.
        let Ok(msg) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if msg.metadata.id != id
            || msg.metadata.message_type != MessageType::Response
            || msg.queries.first().map(|q| (q.name(), q.query_type())) != Some((name, qtype))
        {
            continue;
        }
        if msg.metadata.truncation {
            return exchange_tcp(upstream, &bytes).await;
        }
        return Ok(msg);
    }
}

async fn exchange_tcp(upstream: SocketAddr, query: &[u8]) -> Result<Message, ExchangeError> {
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; len as usize];
    stream.read_exact(&mut buf).await?;
    Ok(Message::from_vec(&buf)?)
}
