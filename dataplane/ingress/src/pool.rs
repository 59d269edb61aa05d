//! Upstream HTTP/1.1 keep-alive connections, one pool per proxy worker thread.
//!
//! Each worker owns its pools, so checking a connection out or in touches no state that
//! another thread writes (the lock is never contended) and a request and its upstream
//! exchange stay on one thread. Connections are kept per endpoint, last in first out so
//! that the warmest connection is reused and the surplus ages out. A connection goes back
//! to the pool only once its response has been read to the end; one dropped early is
//! closed, as HTTP/1.1 cannot abandon a response half-read.
//!
//! Two kinds of connection are pooled: `hyper::client::conn::http1` senders for requests
//! served through hyper ([`Pool::send`]), and plain sockets ([`Upstream`]) for the
//! HTTP/1.1 fast path in [`crate::h1`] and the h2 requests [`crate::raw`] forwards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::ReqBody;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: no connection within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP/1.1 handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error(transparent)]
    Exchange(hyper::Error),
}

impl UpstreamError {
    /// Whether no connection could be made, so the endpoint never saw the request.
    pub fn is_connect(&self) -> bool {
        !matches!(self, UpstreamError::Exchange(_))
    }
}

/// Limits of a [`Pool`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    /// An idle connection older than this is closed rather than reused.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint; more are closed when checked in.
    pub max_idle_per_endpoint: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_endpoint: 1024,
        }
    }
}

/// A connection the pool can keep: it knows, without blocking, whether the endpoint has
/// closed it.
pub trait Reusable {
    fn is_closed(&self) -> bool;
}

impl Reusable for SendRequest<ReqBody> {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

/// A plain upstream socket and what was read from it past the last response (nothing,
/// when it is idle in the pool).
pub struct Upstream {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Reusable for Upstream {
    /// An idle connection has nothing to read: readable means the endpoint closed it (or
    /// sent bytes nobody asked for). tokio answers from the readiness it has cached, so a
    /// connection known to be drained costs no system call.
    fn is_closed(&self) -> bool {
        !matches!(
            self.stream.try_read(&mut [0u8; 1]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

struct Inner<C> {
    cfg: PoolConfig,
    idle: Mutex<HashMap<SocketAddr, Vec<Idle<C>>>>,
}

/// One worker's idle upstream connections of one kind, by endpoint address.
pub struct Pool<C>(Arc<Inner<C>>);

impl<C> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool(self.0.clone())
    }
}

/// A connection checked out of the pool; [`Pooled::release`] gives it back.
pub struct Pooled<C: Reusable> {
    pub conn: C,
    addr: SocketAddr,
    pool: Pool<C>,
}

/// A hyper HTTP/1.1 sender checked out of the pool.
pub type Conn = Pooled<SendRequest<ReqBody>>;

impl<C: Reusable> Pooled<C> {
    /// Return the connection for reuse: call once the response has ended.
    pub fn release(self) {
        let Pooled { conn, addr, pool } = self;
        if conn.is_closed() {
            return;
        }
        let Ok(mut idle) = pool.0.idle.lock() else {
            return;
        };
        let list = idle.entry(addr).or_default();
        if list.len() < pool.0.cfg.max_idle_per_endpoint {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

impl<C: Reusable> Pool<C> {
    pub fn new(cfg: PoolConfig) -> Self {
        Pool(Arc::new(Inner {
            cfg,
            idle: Mutex::new(HashMap::new()),
        }))
    }

    /// The newest idle connection to `addr` that is still open, if any.
    pub fn checkout(&self, addr: SocketAddr) -> Option<Pooled<C>> {
        let mut idle = self.0.idle.lock().ok()?;
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        // The oldest sit at the front: drop the expired ones there, take the newest.
        let expired = list
            .iter()
            .take_while(|c| now.duration_since(c.since) > self.0.cfg.idle_timeout)
            .count();
        list.drain(..expired);
        while let Some(c) = list.pop() {
            if !c.conn.is_closed() {
                return Some(Pooled {
                    conn: c.conn,
                    addr,
                    pool: self.clone(),
                });
            }
        }
        None
    }

    /// A TCP connection to `addr` within the connect timeout, with Nagle off.
    async fn dial(&self, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let timeout = self.0.cfg.connect_timeout;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout }),
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Close idle connections that expired or whose endpoint closed them, including those
    /// of endpoints that no longer get requests; the worker calls this periodically.
    pub fn sweep(&self) {
        let Ok(mut idle) = self.0.idle.lock() else {
            return;
        };
        let now = Instant::now();
        idle.retain(|_, list| {
            list.retain(|c| {
                !c.conn.is_closed() && now.duration_since(c.since) <= self.0.cfg.idle_timeout
            });
            !list.is_empty()
        });
    }

    /// Idle connections held.
    pub fn idle_count(&self) -> usize {
        self.0
            .idle
            .lock()
            .map_or(0, |m| m.values().map(Vec::len).sum())
    }
}

impl Pool<Upstream> {
    /// A new plain connection to `addr`, checked out (release it to pool it).
    pub async fn connect(&self, addr: SocketAddr) -> Result<Pooled<Upstream>, UpstreamError> {
        let stream = self.dial(addr).await?;
        Ok(Pooled {
            conn: Upstream {
                stream,
                buf: BytesMut::with_capacity(8 * 1024),
            },
            addr,
            pool: self.clone(),
        })
    }
}

impl Pool<SendRequest<ReqBody>> {
    /// Send `req` to `addr` on an idle connection, or on a new one if none is usable. A
    /// request that an idle connection turned out unable to take (closed by the endpoint
    /// meanwhile) was never written, so it is sent again on a new connection.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        loop {
            let (mut conn, reused) = match self.checkout(addr) {
                Some(c) => (c, true),
                None => (self.handshake(addr).await?, false),
            };
            // A connection whose last response just ended becomes ready once its task has
            // seen the end; that is a poll away.
            if let Err(source) = conn.conn.ready().await {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Handshake { addr, source });
            }
            match conn.conn.try_send_request(req).await {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
    }

    async fn handshake(&self, addr: SocketAddr) -> Result<Conn, UpstreamError> {
        let stream = self.dial(addr).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Pooled {
            conn: sender,
            addr,
            pool: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    /// A real HTTP/1.1 server on loopback that counts the connections it accepted; with
    /// `close_idle` it closes each connection right after its first response.
    async fn server(close_idle: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"hello"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close_idle)
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<ReqBody> {
        let mut r = Request::new(ReqBody::Empty);
        r.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("t"));
        r
    }

    async fn exchange(pool: &Pool<SendRequest<ReqBody>>, addr: SocketAddr) -> Conn {
        let (resp, conn) = pool.send(addr, get()).await.expect("exchange");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"hello");
        conn
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = server(false).await;
        let pool: Pool<SendRequest<ReqBody>> = Pool::new(PoolConfig::default());
        for _ in 0..5 {
            exchange(&pool, addr).await.release();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_not_released_is_not_reused() {
        let (addr, accepted) = server(false).await;
        let pool: Pool<SendRequest<ReqBody>> = Pool::new(PoolConfig::default());
        let held = exchange(&pool, addr).await;
        exchange(&pool, addr).await.release();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(held);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn connections_the_endpoint_closed_are_replaced_without_an_error() {
        let (addr, accepted) = server(true).await;
        let pool: Pool<SendRequest<ReqBody>> = Pool::new(PoolConfig::default());
        for _ in 0..3 {
            let conn = exchange(&pool, addr).await;
            // Let the connection task see the server's close before the next checkout.
            tokio::time::sleep(Duration::from_millis(20)).await;
            conn.release();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn expired_idle_connections_are_not_reused() {
        let (addr, accepted) = server(false).await;
        let pool: Pool<SendRequest<ReqBody>> = Pool::new(PoolConfig {
            idle_timeout: Duration::from_millis(10),
            ..PoolConfig::default()
        });
        exchange(&pool, addr).await.release();
        tokio::time::sleep(Duration::from_millis(30)).await;
        exchange(&pool, addr).await.release();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("addr");
        let pool: Pool<SendRequest<ReqBody>> = Pool::new(PoolConfig::default());
        // The listener is gone, so the port refuses.
        match pool.send(addr, get()).await {
            Err(e) => assert!(e.is_connect(), "{e}"),
            Ok(_) => panic!("a refused port answered"),
        }
    }
}
